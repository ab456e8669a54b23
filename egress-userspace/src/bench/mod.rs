//! `egress bench`: what the dataplane costs, measured side by side with its baselines in one
//! run (absolute numbers on these machines drift by 10-25 %, ratios do not): per-packet cost of
//! every path (BPF_PROG_TEST_RUN), end-to-end rates against bare routing and nftables, and
//! scale. Writes `report.json`, `report.md` and `ratios.png`.

pub mod e2e;
pub mod failover;
pub mod fleet;
pub mod flood;
pub mod perpacket;
pub mod report;
pub mod scale;

use std::path::{Path, PathBuf};

use serde::Serialize;

#[derive(Debug, Clone)]
pub struct Options {
    /// A few seconds' smoke run (small sizes, one round, two setups): keeps the bench working.
    pub quick: bool,
    pub out_dir: PathBuf,
    pub egress_bin: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
}

/// A target we hold ourselves to, and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub goal: String,
    pub measured: String,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub date: String,
    pub machine: Machine,
    pub quick: bool,
    pub per_packet: Vec<perpacket::PathCost>,
    pub end_to_end: Vec<e2e::Row>,
    /// The programs' run time per run during the end-to-end loads.
    pub in_situ: Vec<e2e::InSitu>,
    pub flood: flood::Flood,
    pub fleet: fleet::Fleet,
    pub failover: failover::Failover,
    pub scale: scale::Scale,
    pub targets: Vec<Target>,
}

fn machine() -> Machine {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Machine {
        kernel,
        cpus,
        cpu_model,
    }
}

fn today() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let runs = if opts.quick { 200 } else { 20_000 };
    eprintln!("[bench] per-packet cost, {runs} single runs per path and size");
    let per_packet = perpacket::measure(runs)?;
    eprintln!("[bench] scale");
    let scale = scale::measure(opts.quick)?;
    eprintln!("[bench] end to end through the lab");
    let plan = if opts.quick {
        e2e::Plan {
            rounds: 1,
            udp_seconds: 0.3,
            tcp_seconds: 1.0,
            setups: vec![e2e::Setup::Bare, e2e::Setup::Local],
            loads: vec![e2e::LOADS[0], e2e::LOADS[4]],
        }
    } else {
        e2e::Plan {
            rounds: 3,
            udp_seconds: 2.0,
            tcp_seconds: 3.0,
            setups: e2e::Setup::ALL.to_vec(),
            loads: e2e::LOADS.to_vec(),
        }
    };
    let (end_to_end, in_situ) = e2e::measure(&opts.egress_bin, &plan)?;
    eprintln!("[bench] a forwarded download under a flood of unsolicited packets");
    let flood = if opts.quick {
        flood::measure(&opts.egress_bin, 1, 1)?
    } else {
        flood::measure(&opts.egress_bin, 3, 3)?
    };
    eprintln!("[bench] fleet convergence through etcd");
    let fleet = if opts.quick {
        fleet::measure(&opts.egress_bin, 10, 2)?
    } else {
        fleet::measure(&opts.egress_bin, 200, 10)?
    };
    eprintln!("[bench] failover");
    let failover = failover::measure(&opts.egress_bin, if opts.quick { 1 } else { 5 })?;
    let mut r = Report {
        date: today(),
        machine: machine(),
        quick: opts.quick,
        per_packet,
        end_to_end,
        in_situ,
        flood,
        fleet,
        failover,
        scale,
        targets: vec![],
    };
    r.targets = report::targets(&r);
    write(&r, &opts.out_dir)?;
    Ok(r)
}

fn write(r: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(r)?)?;
    let md = report::markdown(r);
    std::fs::write(dir.join("report.md"), &md)?;
    std::fs::write(dir.join("performance.md"), report::performance_section(r))?;
    if let Err(e) = report::chart(r, &dir.join("ratios.png")) {
        eprintln!("[bench] no chart: {e:#}");
    }
    println!("{md}");
    Ok(())
}
