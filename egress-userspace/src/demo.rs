//! The demo: build the built-in lab, run one agent per server, make real connections and show
//! what the origin saw against what the plan says it should see.

use std::path::Path;

use anyhow::Context as _;

use crate::{
    config::Config,
    lab::{self, Lab, LabSpec},
    plan, stats, validate,
};

/// How a scenario talks to the origin.
#[derive(Debug, Clone, Copy)]
enum Probe {
    Http,
    Udp,
}

/// One connection of the demo: from which server, to which origin address, and which source
/// (address and port range) the origin must see.
struct Scenario {
    name: &'static str,
    from: &'static str,
    to: std::net::IpAddr,
    probe: Probe,
    egress_server: &'static str,
    want_src: &'static str,
    want_ports: (u16, u16),
}

/// One verdict.
#[derive(Debug)]
pub struct Row {
    pub scenario: String,
    pub family: &'static str,
    pub from: String,
    pub expected: String,
    pub seen: String,
    pub ok: bool,
}

fn scenarios() -> Vec<Scenario> {
    use lab::{
        ORIGIN_V4 as V4, ORIGIN_V4_HIGH as V4B, ORIGIN_V4_NO_POLICY as V4N, ORIGIN_V6 as V6,
        ORIGIN_V6_NO_POLICY as V6N,
    };
    let s =
        |name, from, to: std::net::IpAddr, probe, egress_server, want_src, want_ports| Scenario {
            name,
            from,
            to,
            probe,
            egress_server,
            want_src,
            want_ports,
        };
    let fra = (1024, 32767);
    let ams = (32768, 65535);
    vec![
        s(
            "1 same-server",
            "fra-a-1",
            V4.into(),
            Probe::Http,
            "fra-a-1",
            "192.0.2.10",
            fra,
        ),
        s(
            "2 same-datacenter",
            "fra-a-2",
            V4.into(),
            Probe::Http,
            "fra-a-1",
            "192.0.2.10",
            fra,
        ),
        s(
            "2 same-datacenter, UDP",
            "fra-a-2",
            V4.into(),
            Probe::Udp,
            "fra-a-1",
            "192.0.2.10",
            fra,
        ),
        s(
            "3 same-location",
            "fra-b-1",
            V4.into(),
            Probe::Http,
            "fra-a-1",
            "192.0.2.10",
            fra,
        ),
        s(
            "4 nearest-location",
            "sin-a-1",
            V4.into(),
            Probe::Http,
            "fra-a-1",
            "192.0.2.10",
            fra,
        ),
        s(
            "4 nearest-location",
            "fra-a-2",
            V4B.into(),
            Probe::Http,
            "ams-a-1",
            "192.0.2.20",
            (1024, 65535),
        ),
        s(
            "soft-unicast replies",
            "ams-a-1",
            V4.into(),
            Probe::Http,
            "ams-a-1",
            "192.0.2.10",
            ams,
        ),
        s(
            "IPv6 always local",
            "fra-a-2",
            V6.into(),
            Probe::Http,
            "fra-a-2",
            "2001:db8:7::c",
            (1024, 65535),
        ),
        s(
            "IPv6 always local",
            "sin-a-1",
            V6.into(),
            Probe::Http,
            "sin-a-1",
            "2001:db8:7::29",
            (1024, 65535),
        ),
        s(
            "no policy: own address",
            "fra-a-2",
            V4N.into(),
            Probe::Http,
            "fra-a-2",
            "10.50.0.12",
            (1, 65535),
        ),
        s(
            "no policy: own address",
            "fra-a-2",
            V6N.into(),
            Probe::Http,
            "fra-a-2",
            "fd00:50::c",
            (1, 65535),
        ),
    ]
}

fn probe(lab: &Lab, egress_bin: &Path, s: &Scenario) -> anyhow::Result<(String, u16)> {
    let body = match s.probe {
        Probe::Http => {
            let url = match s.to {
                std::net::IpAddr::V4(a) => format!("http://{a}/"),
                std::net::IpAddr::V6(a) => format!("http://[{a}]/"),
            };
            lab.curl(s.from, &url)?
        }
        Probe::Udp => {
            let to = std::net::SocketAddr::new(s.to, lab::UDP_PORT).to_string();
            lab.run(
                &lab.server_ns(s.from),
                egress_bin.to_str().context("utf-8 path")?,
                &["lab", "udp-probe", &to],
            )?
        }
    };
    let seen: lab::Seen = serde_json::from_str(body.trim()).context("origin answer")?;
    Ok((seen.src, seen.port))
}

/// Runs the demo with `egress_bin` as agent and origin; returns the rows (printed as they come).
pub fn run(egress_bin: &Path) -> anyhow::Result<Vec<Row>> {
    let config = Config::embedded();
    let topology = validate::validate(&config)?;
    let mut lab = Lab::up(LabSpec::new(config.clone(), egress_bin))?;
    println!(
        "lab {} up: {} servers, origin, fabric",
        lab.prefix,
        config.servers.len()
    );
    for s in &config.servers {
        lab.start_agent(&s.name)?;
    }
    println!("agents attached on every server\n");
    println!("plan (IPv4):");
    for s in &config.servers {
        for e in plan::plan(&topology, &s.name)
            .entries
            .iter()
            .filter(|e| e.family == plan::Family::Ipv4)
        {
            let hops: Vec<&str> = e.next_hops.iter().map(|h| h.server.as_str()).collect();
            println!(
                "  {:<9} pool {:<6} {:<17} {}",
                s.name,
                e.pool,
                e.tier.as_str(),
                if hops.is_empty() {
                    String::new()
                } else {
                    format!(
                        "→ {} (forwarding: not yet in the datapath)",
                        hops.join(", ")
                    )
                }
            );
        }
    }
    println!();
    println!(
        "{:<26} {:<6} {:<8} {:<8} {:<32} {:<28} ok",
        "scenario", "family", "from", "egress", "expected source", "source seen by origin"
    );
    let mut rows = Vec::new();
    for s in scenarios() {
        let expected = format!("{} ports {}-{}", s.want_src, s.want_ports.0, s.want_ports.1);
        let (seen, ok) = match probe(&lab, egress_bin, &s) {
            Ok((src, port)) => (
                format!("{src}:{port}"),
                src == s.want_src && (s.want_ports.0..=s.want_ports.1).contains(&port),
            ),
            Err(e) => (format!("error: {e:#}"), false),
        };
        let row = Row {
            scenario: s.name.to_string(),
            family: if s.to.is_ipv4() { "ipv4" } else { "ipv6" },
            from: s.from.to_string(),
            expected: format!("{} ({expected})", s.egress_server),
            seen,
            ok,
        };
        println!(
            "{:<26} {:<6} {:<8} {:<8} {:<32} {:<28} {}",
            row.scenario,
            row.family,
            row.from,
            s.egress_server,
            expected,
            row.seen,
            if row.ok { "yes" } else { "NO" }
        );
        rows.push(row);
    }
    println!();
    for s in &config.servers {
        let values = stats::read(&lab.pin_dir(&s.name))?;
        let shown: Vec<String> = values
            .iter()
            .filter(|v| v.packets > 0)
            .map(|v| format!("{}={}", v.name, v.packets))
            .collect();
        println!("counters {:<9} {}", s.name, shown.join(" "));
    }
    drop(lab);
    println!("lab removed");
    Ok(rows)
}
