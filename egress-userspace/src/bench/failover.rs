//! Failover: from a fault of the only holder of a tier to the first successful new connection
//! through the next candidate, for each kind of fault, over several trials. The lab runs in
//! fleet mode (leases) with fabric probes; fra-a-2's connections for acme go to fra-a-1 (same
//! data center) and, when it is down, to ams-a-1 (nearest location). A client on fra-a-2
//! opens a new connection every 50 ms, each bounded to 300 ms.

use std::{path::Path, time::Duration};

use serde::Serialize;

use crate::{
    config::{Config, DEFAULT_CONFIG},
    lab::{
        self, Lab, LabSpec,
        attempts::{Attempts, failed_over, now_ms, wait_for_source},
    },
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Fault {
    /// Agent SIGKILLed and fabric cable out.
    Dead,
    /// Fabric cable out, agent alive (lease kept).
    FabricOnly,
    /// Management link down (lease lost), fabric fine.
    ControlOnly,
}

impl Fault {
    pub const ALL: [Fault; 3] = [Fault::Dead, Fault::FabricOnly, Fault::ControlOnly];
    pub fn name(self) -> &'static str {
        match self {
            Fault::Dead => "holder dead (agent killed, cable out)",
            Fault::FabricOnly => "fabric only (cable out, agent alive)",
            Fault::ControlOnly => "control only (lease lost, fabric fine)",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Kind {
    pub fault: Fault,
    pub name: &'static str,
    /// Fault to first success through the next candidate, per trial, ms.
    pub ms: Vec<f64>,
    /// Attempts after the first success that failed anyway (all trials; each bounded to
    /// 300 ms on a loaded two-core machine).
    pub late_failures: usize,
    pub p50_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failover {
    pub kinds: Vec<Kind>,
    pub hold_down_s: f64,
}

const HOLD_DOWN: &str = "1";
const VIA_FRA_A_1: (&str, (u16, u16)) = ("192.0.2.10", (1024, 32767));
const VIA_AMS_A_1: (&str, (u16, u16)) = ("192.0.2.10", (32768, 65535));

pub fn measure(bin: &Path, trials: usize) -> anyhow::Result<Failover> {
    let mut lab = Lab::up(LabSpec::new(Config::embedded(), bin))?;
    lab.start_fleet(true)?;
    lab.publish(DEFAULT_CONFIG)?;
    for s in ["fra-a-1", "fra-a-2", "ams-a-1"] {
        lab.start_fleet_agent(s, &["--hold-down", HOLD_DOWN])?;
    }
    back(&lab)?;
    let mut kinds = Vec::new();
    for fault in Fault::ALL {
        let mut ms = Vec::new();
        let mut late_failures = 0;
        for trial in 0..trials {
            let attempts = Attempts::start(
                &lab,
                "fra-a-2",
                lab::ORIGIN_V4_CHECK,
                // About 3.5 s of attempts: a lease lapses 1 s after its last keep-alive, and
                // etcd checks expiries every 500 ms.
                70,
                Duration::from_millis(300),
            )?;
            std::thread::sleep(Duration::from_millis(400));
            let at = now_ms();
            match fault {
                Fault::Dead => {
                    lab.kill_agent("fra-a-1")?;
                    lab.set_fabric_port("fra-a-1", false)?;
                }
                Fault::FabricOnly => lab.set_fabric_port("fra-a-1", false)?,
                Fault::ControlOnly => lab.set_mgmt_link("fra-a-1", false)?,
            }
            let seen = attempts.finish()?;
            let (took, late) =
                failed_over(&seen, at, VIA_AMS_A_1.0, VIA_AMS_A_1.1).map_err(|e| {
                    let log =
                        std::fs::read_to_string(lab.log_path("agent-fra-a-2")).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(8).collect();
                    anyhow::anyhow!(
                        "{}, trial {trial}: {e}; fra-a-2 said (last lines first): {}",
                        fault.name(),
                        tail.join(" | ")
                    )
                })?;
            eprintln!(
                "[bench] failover, {}: trial {trial}: {took:?}, {} later attempts failed",
                fault.name(),
                late.len()
            );
            if !late.is_empty() {
                // Worth seeing why: the attempts themselves and what fra-a-2 decided.
                let log =
                    std::fs::read_to_string(lab.log_path("agent-fra-a-2")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(12).collect();
                eprintln!(
                    "[bench]   late (ms since fault, source): {:?}; fra-a-2 said (last lines first): {}",
                    late.iter()
                        .map(|(t, s)| (t.saturating_sub(at), s))
                        .collect::<Vec<_>>(),
                    tail.join(" | ")
                );
            }
            late_failures += late.len();
            ms.push(took.as_secs_f64() * 1e3);
            match fault {
                Fault::Dead => {
                    lab.set_fabric_port("fra-a-1", true)?;
                    lab.start_fleet_agent("fra-a-1", &["--hold-down", HOLD_DOWN])?;
                }
                Fault::FabricOnly => lab.set_fabric_port("fra-a-1", true)?,
                Fault::ControlOnly => lab.set_mgmt_link("fra-a-1", true)?,
            }
            back(&lab)?;
        }
        let mut sorted = ms.clone();
        sorted.sort_by(f64::total_cmp);
        kinds.push(Kind {
            fault,
            name: fault.name(),
            p50_ms: sorted[sorted.len() / 2],
            max_ms: *sorted.last().unwrap_or(&0.0),
            ms,
            late_failures,
        });
    }
    Ok(Failover {
        kinds,
        hold_down_s: HOLD_DOWN.parse().unwrap_or(0.0),
    })
}

/// Waits until fra-a-2's new connections go through fra-a-1 again (after its hold-down).
fn back(lab: &Lab) -> anyhow::Result<()> {
    wait_for_source(
        lab,
        "fra-a-2",
        lab::ORIGIN_V4_CHECK,
        VIA_FRA_A_1.0,
        VIA_FRA_A_1.1,
        Duration::from_secs(20),
    )
    .map(drop)
}

pub fn markdown(f: &Failover) -> String {
    let mut s = format!(
        "## Failover\n\nFault of fra-a-1 (the only holder of acme's same-data-center tier) to fra-a-2's first successful new connection through ams-a-1 (nearest location); fra-a-2 opens one every 50 ms, each bounded to 300 ms. Probes every 150 ms (down after 3 missed), leases of 1 s (the lab's etcd grants 1 s: heartbeat 100 ms, election timeout 600 ms), an agent that cannot renew its lease fences itself after 750 ms (control only: the management link is cut); hold-down {} s between trials.\n\n| fault | trials | p50 ms | max ms | later attempts failed |\n|---|---|---|---|---|\n",
        f.hold_down_s
    );
    for k in &f.kinds {
        s.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {} |\n",
            k.name,
            k.ms.len(),
            k.p50_ms,
            k.max_ms,
            k.late_failures
        ));
    }
    s.push('\n');
    s
}
