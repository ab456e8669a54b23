//! End-to-end rates through the lab, side by side in one run: bare routing (no programs), this
//! dataplane's local SNAT, nftables `snat` on the same path, bare routing from the forwarding
//! server, and this dataplane's forwarding path (encap → peer → origin). Configurations are
//! interleaved round by round; every load is bounded in time and stays inside the lab.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::Context as _;
use serde::Serialize;

use crate::{
    config::Config,
    lab::{self, Lab, LabSpec},
};

/// One configuration of the path under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Setup {
    /// fra-a-1 routes to the origin from its own address, no programs.
    Bare,
    /// fra-a-1 with its agent: SNAT to its share of 192.0.2.10.
    Local,
    /// fra-a-1 with an nftables snat rule to the same address and ports, no programs.
    Nftables,
    /// fra-a-2 routes to the origin from its own address, no programs.
    BareForward,
    /// fra-a-2 forwards (GRE) to fra-a-1, which translates.
    Forward,
    /// fra-a-2 routes to the origin via fra-a-1 (plain IP forwarding there, replies back the
    /// same way), no programs: the two hops forwarding takes, without the dataplane.
    TwoHop,
    /// The two hops with nftables `snat` on fra-a-1 to its share of 192.0.2.10: stock Linux
    /// doing what forwarding does.
    TwoHopNftables,
    /// [`Setup::Forward`] with `egress agent --xdp` on both servers (their fabric links made
    /// NIC-like first: `Lab::prepare_xdp`).
    ForwardXdp,
}

impl Setup {
    pub const ALL: [Setup; 8] = [
        Setup::Bare,
        Setup::Local,
        Setup::Nftables,
        Setup::BareForward,
        Setup::TwoHop,
        Setup::TwoHopNftables,
        Setup::Forward,
        Setup::ForwardXdp,
    ];
    fn from(self) -> &'static str {
        match self {
            Setup::BareForward
            | Setup::Forward
            | Setup::ForwardXdp
            | Setup::TwoHop
            | Setup::TwoHopNftables => "fra-a-2",
            _ => "fra-a-1",
        }
    }
    /// The plain-routing setup its ratio is taken against: one hop for local SNAT (and the
    /// single-hop row from fra-a-2, for information), two hops for forwarding.
    pub fn baseline(self) -> Setup {
        match self {
            Setup::BareForward | Setup::TwoHop => Setup::BareForward,
            Setup::Forward | Setup::ForwardXdp | Setup::TwoHopNftables => Setup::TwoHop,
            _ => Setup::Bare,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Setup::Bare => "bare routing",
            Setup::Local => "dataplane local SNAT",
            Setup::Nftables => "nftables snat",
            Setup::BareForward => "bare routing (fra-a-2)",
            Setup::Forward => "dataplane forwarding",
            Setup::TwoHop => "two-hop routing",
            Setup::TwoHopNftables => "two-hop nftables snat",
            Setup::ForwardXdp => "dataplane forwarding, XDP",
        }
    }
}

/// One load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Load {
    pub name: &'static str,
    /// UDP 64-byte frames (flows, generator threads) or TCP (streams).
    pub udp_flows: u16,
    pub cores: usize,
    pub tcp_streams: usize,
}

pub const LOADS: [Load; 6] = [
    Load {
        name: "udp 64B 1 flow 1 core",
        udp_flows: 1,
        cores: 1,
        tcp_streams: 0,
    },
    Load {
        name: "udp 64B 64k flows 1 core",
        udp_flows: 65000,
        cores: 1,
        tcp_streams: 0,
    },
    Load {
        name: "udp 64B 1 flow 2 cores",
        udp_flows: 1,
        cores: 2,
        tcp_streams: 0,
    },
    Load {
        name: "udp 64B 64k flows 2 cores",
        udp_flows: 65000,
        cores: 2,
        tcp_streams: 0,
    },
    Load {
        name: "tcp bulk 1 stream",
        udp_flows: 0,
        cores: 0,
        tcp_streams: 1,
    },
    Load {
        name: "tcp bulk 4 streams",
        udp_flows: 0,
        cores: 0,
        tcp_streams: 4,
    },
];

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub setup: Setup,
    pub setup_name: &'static str,
    pub load: &'static str,
    /// pps (UDP, received by the origin) or Mbit/s (TCP, iperf3 receiver).
    pub unit: &'static str,
    pub values: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Median over the median of the bare-routing baseline for the same load.
    pub ratio_to_bare: f64,
}

const NFT_TWO_HOP_RULES: &str = "table ip egressbench {
  chain post {
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr 10.50.0.12 ip daddr 203.0.113.0/24 ip protocol tcp snat to 192.0.2.10:1024-32767
    ip saddr 10.50.0.12 ip daddr 203.0.113.0/24 ip protocol udp snat to 192.0.2.10:1024-32767
  }
}
";

const NFT_RULES: &str = "table ip egressbench {
  chain post {
    type nat hook postrouting priority srcnat; policy accept;
    ip daddr 203.0.113.0/24 ip protocol tcp snat to 192.0.2.10:1024-32767
    ip daddr 203.0.113.0/24 ip protocol udp snat to 192.0.2.10:1024-32767
    ip daddr 203.0.113.0/24 snat to 192.0.2.10
  }
}
";

fn nft(lab: &Lab, rules: &str) -> anyhow::Result<()> {
    let f = lab.work_dir().join("bench.nft");
    std::fs::write(&f, rules)?;
    lab.run(
        &lab.server_ns("fra-a-1"),
        "nft",
        &["-f", f.to_str().context("utf-8")?],
    )
    .map(drop)
}

fn setup(lab: &mut Lab, s: Setup) -> anyhow::Result<()> {
    match s {
        Setup::Bare | Setup::BareForward => Ok(()),
        Setup::TwoHop => lab.route_via("fra-a-2", "fra-a-1", true),
        Setup::TwoHopNftables => {
            lab.route_via("fra-a-2", "fra-a-1", true)?;
            nft(lab, NFT_TWO_HOP_RULES)
        }
        Setup::Local => lab.start_agent("fra-a-1"),
        Setup::Forward => {
            lab.start_agent("fra-a-1")?;
            lab.start_agent("fra-a-2")
        }
        Setup::Nftables => nft(lab, NFT_RULES),
        Setup::ForwardXdp => {
            lab.start_agent_xdp("fra-a-1")?;
            lab.start_agent_xdp("fra-a-2")
        }
    }
}

fn teardown(lab: &mut Lab, s: Setup) -> anyhow::Result<()> {
    match s {
        Setup::Bare | Setup::BareForward => Ok(()),
        Setup::TwoHop => lab.route_via("fra-a-2", "fra-a-1", false),
        Setup::TwoHopNftables => {
            lab.run(
                &lab.server_ns("fra-a-1"),
                "nft",
                &["delete", "table", "ip", "egressbench"],
            )?;
            lab.route_via("fra-a-2", "fra-a-1", false)
        }
        Setup::Local => lab.remove_agent("fra-a-1"),
        Setup::Forward => {
            lab.remove_agent("fra-a-2")?;
            lab.remove_agent("fra-a-1")
        }
        Setup::ForwardXdp => {
            for s in ["fra-a-2", "fra-a-1"] {
                lab.remove_agent(s)?;
                lab.unprepare_xdp(s)?;
            }
            Ok(())
        }
        Setup::Nftables => lab
            .run(
                &lab.server_ns("fra-a-1"),
                "nft",
                &["delete", "table", "ip", "egressbench"],
            )
            .map(drop),
    }
}

fn rx_packets(lab: &Lab) -> anyhow::Result<u64> {
    let out = lab::netns::ip_in(&lab.origin_ns(), &["-s", "-j", "link", "show", "eth0"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("rx packets")
}

/// Runs one load from `from` and returns pps or Mbit/s.
fn run_load(
    lab: &Lab,
    egress_bin: &Path,
    from: &str,
    load: Load,
    seconds: f64,
) -> anyhow::Result<f64> {
    let ns = lab.server_ns(from);
    if load.tcp_streams > 0 {
        return iperf3_mbit(
            lab,
            &ns,
            seconds.ceil() as u64,
            &["-P", &load.tcp_streams.to_string()],
        );
    }
    let before = rx_packets(lab)?;
    let bin = egress_bin.to_str().context("utf-8 path")?;
    let to = format!("{}:{}", lab::ORIGIN_V4, 1024);
    let children: Vec<std::process::Child> = (0..load.cores)
        .map(|cpu| {
            lab::netns::command_in(&ns, bin)
                .args([
                    "lab",
                    "udp-flood",
                    &to,
                    "--flows",
                    &load.udp_flows.to_string(),
                    "--frame",
                    "64",
                ])
                .args(["--seconds", &seconds.to_string(), "--cpu", &cpu.to_string()])
                .stdout(std::process::Stdio::null())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    for mut c in children {
        c.wait()?;
    }
    // Let the last packets cross the veths before reading the counter.
    std::thread::sleep(Duration::from_millis(100));
    Ok((rx_packets(lab)? - before) as f64 / seconds)
}

/// An iperf3 run from `ns` to the origin for `seconds` (more options in `extra`): the rate the
/// receiver saw, in Mbit/s.
pub fn iperf3_mbit(lab: &Lab, ns: &str, seconds: u64, extra: &[&str]) -> anyhow::Result<f64> {
    let origin = lab::ORIGIN_V4.to_string();
    let secs = seconds.to_string();
    let mut args = vec!["-c", &origin, "-t", &secs, "-J"];
    args.extend_from_slice(extra);
    let out = lab.run(ns, "iperf3", &args)?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 received rate")?;
    Ok(bps / 1e6)
}

pub struct Plan {
    pub rounds: usize,
    pub udp_seconds: f64,
    pub tcp_seconds: f64,
    pub setups: Vec<Setup>,
    pub loads: Vec<Load>,
}

/// One program's cost while a load ran through the lab (`kernel.bpf_stats_enabled`): what
/// BPF_PROG_TEST_RUN measures in isolation, seen in place.
#[derive(Debug, Clone, Serialize)]
pub struct InSitu {
    pub setup: Setup,
    pub load: &'static str,
    pub program: String,
    pub runs: u64,
    pub ns_per_run: f64,
}

/// Run time and count of every loaded program named like the dataplane's (`tc_…`), summed by
/// name over the lab's agents.
fn bpf_totals() -> BTreeMap<String, (u64, u64)> {
    let mut t: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for p in aya::programs::loaded_programs().flatten() {
        let Some(name) = p.name_as_str().filter(|n| n.starts_with("tc_")) else {
            continue;
        };
        let e = t.entry(name.to_string()).or_default();
        e.0 += p.run_time().as_nanos() as u64;
        e.1 += p.run_count();
    }
    t
}

/// One more round of the dataplane's setups with the kernel's BPF run-time statistics on (a
/// round of its own: the statistics cost every run two clock reads, which must not weigh on
/// the ratios).
fn in_situ(lab: &mut Lab, egress_bin: &Path, p: &Plan) -> anyhow::Result<Vec<InSitu>> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling BPF run-time statistics")?;
    let mut out = Vec::new();
    for s in [Setup::Local, Setup::Forward] {
        if !p.setups.contains(&s) {
            continue;
        }
        setup(lab, s)?;
        for &load in &p.loads {
            let secs = if load.tcp_streams > 0 {
                p.tcp_seconds
            } else {
                p.udp_seconds
            };
            let before = bpf_totals();
            run_load(lab, egress_bin, s.from(), load, secs)?;
            for (program, (ns, runs)) in bpf_totals() {
                let (ns0, runs0) = before.get(&program).copied().unwrap_or_default();
                let runs = runs.saturating_sub(runs0);
                if runs > 0 {
                    out.push(InSitu {
                        setup: s,
                        load: load.name,
                        program,
                        runs,
                        ns_per_run: ns.saturating_sub(ns0) as f64 / runs as f64,
                    });
                }
            }
        }
        teardown(lab, s)?;
    }
    Ok(out)
}

pub fn measure(egress_bin: &Path, p: &Plan) -> anyhow::Result<(Vec<Row>, Vec<InSitu>)> {
    let mut lab = Lab::up(LabSpec::new(Config::embedded(), egress_bin))?;
    lab.spawn("iperf3", &lab.origin_ns(), "iperf3", &["-s", "-p", "5201"])?;
    std::thread::sleep(Duration::from_millis(300));
    let mut values: BTreeMap<(Setup, Load), Vec<f64>> = BTreeMap::new();
    for round in 0..p.rounds {
        for &s in &p.setups {
            setup(&mut lab, s).with_context(|| format!("setting up {}", s.name()))?;
            for &load in &p.loads {
                let secs = if load.tcp_streams > 0 {
                    p.tcp_seconds
                } else {
                    p.udp_seconds
                };
                let v = run_load(&lab, egress_bin, s.from(), load, secs)
                    .with_context(|| format!("{} / {}", s.name(), load.name))?;
                eprintln!(
                    "[bench] round {} {:<24} {:<26} {:>12.0}",
                    round + 1,
                    s.name(),
                    load.name,
                    v
                );
                values.entry((s, load)).or_default().push(v);
            }
            teardown(&mut lab, s).with_context(|| format!("tearing down {}", s.name()))?;
        }
    }
    eprintln!("[bench] in situ: one more round of the dataplane with bpf_stats on");
    let in_situ = in_situ(&mut lab, egress_bin, p)?;
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let rows = values
        .iter()
        .map(|((s, load), v)| {
            let base = values
                .get(&(s.baseline(), *load))
                .map_or(f64::NAN, |b| median(b));
            Row {
                setup: *s,
                setup_name: s.name(),
                load: load.name,
                unit: if load.tcp_streams > 0 {
                    "Mbit/s"
                } else {
                    "pps"
                },
                values: v.clone(),
                median: median(v),
                min: v.iter().copied().fold(f64::INFINITY, f64::min),
                max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                ratio_to_bare: median(v) / base,
            }
        })
        .collect();
    Ok((rows, in_situ))
}
