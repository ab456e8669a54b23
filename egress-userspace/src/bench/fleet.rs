//! Fleet convergence: the time from `publish` to each agent reporting the new revision in its
//! status key, for the lab's five agents and a crowd of `--no-dataplane` agents in the control
//! namespace, all watching one real 3-member etcd cluster. Measured with TLS and client
//! certificates (as deployed) and in plain text, in the same run, to give TLS's cost. Also each
//! agent's memory and CPU at idle.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::Serialize;

use crate::{
    config::{Config, DEFAULT_CONFIG},
    fleet::{self, EtcdArgs, pki},
    lab::{Lab, LabSpec, netns},
};

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub tls: bool,
    /// Agents watching (the lab's real ones and the simulated ones).
    pub agents: usize,
    /// Per publish: each agent's time to report the revision, ms, sorted.
    pub rounds: Vec<Vec<f64>>,
    /// Over every agent of every round.
    pub p50_ms: f64,
    pub max_ms: f64,
    /// Per publish, the last agent's time; their median.
    pub last_p50_ms: f64,
    pub idle: Idle,
}

/// Resident memory and CPU use at idle (10 s after converging), medians per kind of agent.
#[derive(Debug, Clone, Serialize)]
pub struct Idle {
    pub real_rss_mib: f64,
    pub real_cpu_percent: f64,
    pub sim_rss_mib: f64,
    pub sim_cpu_percent: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Fleet {
    pub tls: Run,
    pub plain: Run,
}

const REAL: [&str; 5] = ["fra-a-1", "fra-a-2", "fra-b-1", "ams-a-1", "sin-a-1"];

/// The default topology with `sims` more servers (holding no share: they forward).
pub fn topology(sims: usize, moved: bool) -> String {
    let mut text = if moved {
        DEFAULT_CONFIG.replace(
            r#"{ server = "ams-a-1", ports = "32768-65535" },"#,
            r#"{ server = "ams-a-1", ports = "32768-39999" },
  { server = "fra-a-2", ports = "40000-49999" },
  { server = "ams-a-1", ports = "50000-65535" },"#,
        )
    } else {
        DEFAULT_CONFIG.to_string()
    };
    let dcs = ["fra-a", "fra-b", "ams-a", "sin-a"];
    for i in 0..sims {
        text.push_str(&format!(
            "\n[[servers]]\nname = \"sim-{i:03}\"\nid = {}\ndatacenter = \"{}\"\nfabric = \"10.50.{}.{}\"\nuplink = \"eth0\"\n",
            1000 + i,
            dcs[i % dcs.len()],
            10 + i / 250,
            i % 250 + 1
        ));
    }
    text
}

pub fn measure(bin: &Path, sims: usize, rounds: usize) -> anyhow::Result<Fleet> {
    Ok(Fleet {
        tls: run(bin, true, sims, rounds)?,
        plain: run(bin, false, sims, rounds)?,
    })
}

fn sim_name(i: usize) -> String {
    format!("sim-{i:03}")
}

fn run(bin: &Path, tls: bool, sims: usize, rounds: usize) -> anyhow::Result<Run> {
    let mut lab = Lab::up(LabSpec::new(Config::embedded(), bin))?;
    let a = topology(sims, false);
    let b = topology(sims, true);
    let file = lab.work_path("fleet.toml");
    std::fs::write(&file, &a)?;
    let f = lab.start_fleet_with(tls, file)?;
    let first = lab.publish(&a)?;
    for s in REAL {
        lab.start_fleet_agent(s, &[])?;
    }
    let bin_str = bin.to_str().context("binary path")?;
    for i in 0..sims {
        let name = sim_name(i);
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--no-dataplane".into(),
            "--no-metrics".into(),
            "--server".into(),
            name.clone(),
        ];
        args.extend(f.args(&pki::agent_user(&name)));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.spawn(&format!("agent-{name}"), &f.ns, bin_str, &args)?;
    }
    let mut names: Vec<String> = REAL.iter().map(|s| s.to_string()).collect();
    names.extend((0..sims).map(sim_name));
    let publisher = EtcdArgs {
        urls: f.urls.clone(),
        etcd_tls: tls.then(|| pki::identity_dir(&f.ca_dir, pki::PUBLISHER_USER)),
        etcd_plaintext: !tls,
        prefix: f.prefix.clone(),
        ..Default::default()
    }
    .endpoint()?;
    // Everyone on the first revision before measuring.
    netns::in_ns(&f.ns, || {
        fleet::block_on(wait_all(&publisher, &names, first, Duration::from_secs(60)))?
    })?;
    let idle = idle(&lab, sims)?;
    let mut all = Vec::new();
    let mut per_round = Vec::new();
    for r in 0..rounds {
        let text = if r % 2 == 0 { &b } else { &a };
        let times = netns::in_ns(&f.ns, || {
            fleet::block_on(publish_and_time(&publisher, &names, text))?
        })?;
        all.extend(times.iter().copied());
        per_round.push(times);
    }
    all.sort_by(f64::total_cmp);
    let mut lasts: Vec<f64> = per_round
        .iter()
        .map(|t| t.last().copied().unwrap_or(0.0))
        .collect();
    lasts.sort_by(f64::total_cmp);
    Ok(Run {
        tls,
        agents: names.len(),
        p50_ms: all.get(all.len() / 2).copied().unwrap_or(0.0),
        max_ms: all.last().copied().unwrap_or(0.0),
        last_p50_ms: lasts.get(lasts.len() / 2).copied().unwrap_or(0.0),
        rounds: per_round,
        idle,
    })
}

/// Publishes `text` and times each agent's status reporting it (from just before the
/// publish), through a watch on the status keys started first.
async fn publish_and_time(
    ep: &fleet::Endpoint,
    names: &[String],
    text: &str,
) -> anyhow::Result<Vec<f64>> {
    let mut client = ep.connect().await?;
    let mut watch = client
        .watch(
            ep.keys.statuses(),
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await?;
    let t0 = Instant::now();
    let p = fleet::publish(&mut client, ep, text, None).await?;
    let mut seen: BTreeMap<String, f64> = BTreeMap::new();
    let deadline = t0 + Duration::from_secs(10);
    while seen.len() < names.len() {
        let msg = tokio::time::timeout_at(deadline.into(), watch.message())
            .await
            .with_context(|| {
                format!(
                    "revision {}: {} of {} agents reported it within 10 s",
                    p.revision,
                    seen.len(),
                    names.len()
                )
            })??
            .context("watch ended")?;
        let at = t0.elapsed().as_secs_f64() * 1e3;
        for e in msg.events() {
            let Some(s) = e
                .kv()
                .and_then(|kv| serde_json::from_slice::<fleet::Status>(kv.value()).ok())
            else {
                continue;
            };
            if s.applied_revision >= p.revision {
                seen.entry(s.server).or_insert(at);
            }
        }
    }
    let mut t: Vec<f64> = seen.into_values().collect();
    t.sort_by(f64::total_cmp);
    Ok(t)
}

/// Waits until every agent reports `revision` (or later).
async fn wait_all(
    ep: &fleet::Endpoint,
    names: &[String],
    revision: i64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut client = ep.connect().await?;
    let t = Instant::now();
    loop {
        let statuses = fleet::read_statuses(&mut client, ep).await?;
        let done = statuses
            .iter()
            .filter(|s| {
                s.status
                    .as_ref()
                    .is_ok_and(|st| st.applied_revision >= revision)
                    && names.contains(&s.server)
            })
            .count();
        if done == names.len() {
            return Ok(());
        }
        if t.elapsed() > timeout {
            anyhow::bail!(
                "{done} of {} agents on revision {revision} after {timeout:?}",
                names.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// CPU ticks (user + system) and resident KiB of a process.
fn usage(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((ticks, rss))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Memory and CPU over 10 s of idle, per kind of agent.
fn idle(lab: &Lab, sims: usize) -> anyhow::Result<Idle> {
    let pids = |names: Vec<String>| -> Vec<u32> {
        names
            .iter()
            .filter_map(|n| lab.pid(&format!("agent-{n}")))
            .collect()
    };
    let real = pids(REAL.iter().map(|s| s.to_string()).collect());
    let sim = pids((0..sims).map(sim_name).collect());
    let before: Vec<Option<(u64, u64)>> = real.iter().chain(&sim).map(|p| usage(*p)).collect();
    let window = Duration::from_secs(10);
    std::thread::sleep(window);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut cpu = Vec::new();
    let mut rss = Vec::new();
    for (p, b) in real.iter().chain(&sim).zip(before) {
        let (Some((t0, _)), Some((t1, kib))) = (b, usage(*p)) else {
            continue;
        };
        cpu.push((t1 - t0) as f64 / hz / window.as_secs_f64() * 100.0);
        rss.push(kib as f64 / 1024.0);
    }
    let n = real.len().min(cpu.len());
    Ok(Idle {
        real_rss_mib: median(rss[..n].to_vec()),
        real_cpu_percent: median(cpu[..n].to_vec()),
        sim_rss_mib: median(rss[n..].to_vec()),
        sim_cpu_percent: median(cpu[n..].to_vec()),
    })
}

pub fn markdown(f: &Fleet) -> String {
    let row = |r: &Run| {
        format!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.1} MiB, {:.2} % | {:.1} MiB, {:.2} % |\n",
            if r.tls {
                "TLS, client certificates, roles"
            } else {
                "plain text"
            },
            r.agents,
            r.p50_ms,
            r.max_ms,
            r.last_p50_ms,
            r.idle.real_rss_mib,
            r.idle.real_cpu_percent,
            r.idle.sim_rss_mib,
            r.idle.sim_cpu_percent,
        )
    };
    let mut s = format!(
        "## Fleet convergence\n\nFrom `publish` to each agent's status key reporting the new revision (a port-range move published back and forth, {} publishes), the lab's 5 agents and {} `--no-dataplane` agents all watching a 3-member etcd cluster on this machine. TLS costs ×{:.2} on the median.\n\n",
        f.tls.rounds.len(),
        f.tls.agents - REAL.len(),
        if f.plain.p50_ms > 0.0 {
            f.tls.p50_ms / f.plain.p50_ms
        } else {
            0.0
        }
    );
    s.push_str("| etcd | agents | p50 ms | max ms | last agent, p50 ms | idle agent (dataplane) | idle agent (no dataplane) |\n|---|---|---|---|---|---|---|\n");
    s.push_str(&row(&f.tls));
    s.push_str(&row(&f.plain));
    s.push('\n');
    s
}
