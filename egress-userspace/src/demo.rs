//! The demo: build the built-in lab, run one agent per server, make real connections and show
//! what the origin saw.

use std::path::Path;

use anyhow::Context as _;
use serde::Deserialize;

use crate::{
    config::Config,
    lab::{self, Lab, LabSpec},
    stats,
};

/// One connection of the demo and its verdict.
#[derive(Debug)]
pub struct Row {
    pub scenario: String,
    pub family: &'static str,
    pub from: String,
    pub expected: String,
    pub seen: String,
    pub ok: bool,
}

/// The origin's answer.
#[derive(Debug, Deserialize)]
pub struct Seen {
    pub src: String,
    pub port: u16,
}

/// Runs the demo with `egress_bin` as agent and origin; returns the rows (printed as they come).
pub fn run(egress_bin: &Path) -> anyhow::Result<Vec<Row>> {
    let config = Config::embedded();
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
    println!(
        "{:<28} {:<6} {:<9} {:<22} {:<30} ok",
        "scenario", "family", "from", "expected source", "source seen by origin"
    );
    let mut rows = Vec::new();
    for s in &config.servers {
        for (family, url, expected) in [
            (
                "ipv4",
                format!("http://{}/", lab::ORIGIN_V4),
                s.fabric.to_string(),
            ),
            (
                "ipv6",
                format!("http://[{}]/", lab::ORIGIN_V6),
                lab::fabric_v6(s.id).to_string(),
            ),
        ] {
            let seen = lab
                .curl(&s.name, &url)
                .and_then(|body| serde_json::from_str::<Seen>(&body).context("origin answer"));
            let (seen, ok) = match seen {
                Ok(seen) => (format!("{}:{}", seen.src, seen.port), seen.src == expected),
                Err(e) => (format!("error: {e:#}"), false),
            };
            let row = Row {
                scenario: "pass-through (skeleton)".into(),
                family,
                from: s.name.clone(),
                expected,
                seen,
                ok,
            };
            println!(
                "{:<28} {:<6} {:<9} {:<22} {:<30} {}",
                row.scenario,
                row.family,
                row.from,
                row.expected,
                row.seen,
                if row.ok { "yes" } else { "NO" }
            );
            rows.push(row);
        }
    }
    println!();
    for s in &config.servers {
        let values = stats::read(&lab.pin_dir(&s.name))?;
        let shown: Vec<String> = values
            .iter()
            .map(|v| format!("{}={}", v.name, v.packets))
            .collect();
        println!("counters {:<9} {}", s.name, shown.join(" "));
    }
    drop(lab);
    println!("lab removed");
    Ok(rows)
}
