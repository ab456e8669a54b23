//! Hostile load: a flood of unsolicited UDP at the server that announces a pool address, for
//! ports another server owns (the announcer sends each on by soft-unicast; the owner refuses
//! it, `drop_tunnel_kind`), while a forwarded download runs through the announcer (fra-a-2's
//! connection, translated by fra-a-1, replies re-encapsulated to fra-a-2). Rounds alternate
//! without and with the flood; both the flood and the download are bounded in time.

use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

use crate::{
    config::Config,
    lab::{self, Lab, LabSpec},
};

/// ams-a-1 owns 32768-65535 of 192.0.2.10, which the lab routes to fra-a-1.
const FLOOD_TO: &str = "192.0.2.10:40000";
const FLOWS: u16 = 20_000;

#[derive(Debug, Clone, Serialize)]
pub struct Flood {
    /// Forwarded download (iperf3 -R from fra-a-2), Mbit/s, per round.
    pub alone_mbit: Vec<f64>,
    pub flooded_mbit: Vec<f64>,
    /// Flood packets offered per second (sent by the origin), median of rounds.
    pub flood_pps: f64,
    /// Flood packets the owner refused (drop_tunnel_kind), per second, median of rounds.
    pub refused_pps: f64,
    /// Median flooded over median alone.
    pub ratio: f64,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn refused(lab: &Lab) -> anyhow::Result<u64> {
    Ok(crate::stats::read(&lab.pin_dir("ams-a-1"))?
        .iter()
        .find(|s| s.name == "drop_tunnel_kind")
        .map_or(0, |s| s.packets))
}

fn download(lab: &Lab, seconds: u64) -> anyhow::Result<f64> {
    super::e2e::iperf3_mbit(lab, &lab.server_ns("fra-a-2"), seconds, &["-R"])
}

pub fn measure(egress_bin: &std::path::Path, rounds: usize, seconds: u64) -> anyhow::Result<Flood> {
    let mut lab = Lab::up(LabSpec::new(Config::embedded(), egress_bin))?;
    for s in ["fra-a-1", "fra-a-2", "ams-a-1"] {
        lab.start_agent(s)?;
    }
    lab.spawn("iperf3", &lab.origin_ns(), "iperf3", &["-s", "-p", "5201"])?;
    std::thread::sleep(Duration::from_millis(300));
    let bin = egress_bin.to_str().context("utf-8 path")?;
    let (mut alone, mut flooded, mut offered, mut refused_rate) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        alone.push(download(&lab, seconds)?);
        let before = refused(&lab)?;
        // The flood outlasts the download a little on both ends.
        let flood = lab::netns::command_in(&lab.origin_ns(), bin)
            .args(["lab", "udp-flood", FLOOD_TO, "--flows", &FLOWS.to_string()])
            .args(["--frame", "64", "--seconds", &(seconds + 1).to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(300));
        let rate = download(&lab, seconds);
        let out = flood.wait_with_output()?;
        let rate = rate?;
        let sent: f64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("udp-flood count")?;
        std::thread::sleep(Duration::from_millis(100));
        let secs = (seconds + 1) as f64;
        offered.push(sent / secs);
        refused_rate.push((refused(&lab)? - before) as f64 / secs);
        flooded.push(rate);
        eprintln!(
            "[bench] flood round {}: download {:.0} → {:.0} Mbit/s under {:.0} pps",
            round + 1,
            alone[round],
            rate,
            sent / secs
        );
    }
    let ratio = median(&flooded) / median(&alone);
    Ok(Flood {
        flood_pps: median(&offered),
        refused_pps: median(&refused_rate),
        alone_mbit: alone,
        flooded_mbit: flooded,
        ratio,
    })
}

/// The report's section.
pub fn markdown(f: &Flood) -> String {
    format!(
        "## Under a flood\n\nA forwarded download (iperf3 -R, fra-a-2 through fra-a-1) while the origin floods fra-a-1 with unsolicited UDP for ports ams-a-1 owns (soft-unicast there, refused: `drop_tunnel_kind`): {:.0} Mbit/s alone, {:.0} Mbit/s flooded (×{:.2}), flood {:.0} pps offered, {:.0} pps refused by the owner (medians of {} rounds; the flood and the download share the machine's {} CPUs). Per-packet cost of a refusal: the `unsolicited refused (owner)` row above.\n\n",
        median(&f.alone_mbit),
        median(&f.flooded_mbit),
        f.ratio,
        f.flood_pps,
        f.refused_pps,
        f.alone_mbit.len(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    )
}
