//! A client that opens a new connection every 50 ms from a server of the lab and records each
//! answer: what failover is measured with (tests and benchmark).

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::{Lab, netns};

/// Milliseconds since the Unix epoch (what the client's lines carry).
pub fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// One attempt: when it started (ms) and the source the origin saw (None: it failed).
pub type Attempt = (u128, Option<(String, u16)>);

pub struct Attempts {
    child: Child,
    out: PathBuf,
}

impl Attempts {
    /// `count` attempts from `server` to `dst` (HTTP), 50 ms apart, each bounded to `timeout`.
    pub fn start(
        lab: &Lab,
        server: &str,
        dst: std::net::Ipv4Addr,
        count: u32,
        timeout: Duration,
    ) -> anyhow::Result<Attempts> {
        let out = lab.work_path(&format!("attempts-{server}-{}.txt", now_ms()));
        let script = format!(
            "for i in $(seq 1 {count}); do t=$(date +%s%3N); r=$(curl -s -m {:.2} http://{dst}/ || echo FAIL); echo \"$t ${{r:-FAIL}}\"; sleep 0.05; done",
            timeout.as_secs_f64()
        );
        let child = netns::command_in(&lab.server_ns(server), "bash")
            .args(["-c", &script])
            .stdout(std::fs::File::create(&out)?)
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Attempts { child, out })
    }

    /// Waits for the client; every attempt in order.
    pub fn finish(mut self) -> anyhow::Result<Vec<Attempt>> {
        self.child.wait()?;
        Ok(std::fs::read_to_string(&self.out)?
            .lines()
            .filter_map(|l| {
                let (t, r) = l.split_once(' ')?;
                let seen = if r.contains("FAIL") {
                    None
                } else {
                    let v: super::Seen = serde_json::from_str(r.trim()).ok()?;
                    Some((v.src, v.port))
                };
                Some((t.parse().ok()?, seen))
            })
            .collect())
    }
}

/// How long after `fault` (ms) the first attempt answered from `addr` within `ports` started,
/// and how many later attempts were not answered from there; an error when none was.
pub fn failed_over(
    attempts: &[Attempt],
    fault: u128,
    addr: &str,
    ports: (u16, u16),
) -> Result<(Duration, Vec<Attempt>), String> {
    let ok = |s: &Option<(String, u16)>| {
        s.as_ref()
            .is_some_and(|(src, port)| src == addr && (ports.0..=ports.1).contains(port))
    };
    let first = attempts
        .iter()
        .position(|(t, s)| *t >= fault && ok(s))
        .ok_or_else(|| format!("no connection through the next candidate: {attempts:?}"))?;
    let after: Vec<Attempt> = attempts[first..]
        .iter()
        .filter(|(_, s)| !ok(s))
        .cloned()
        .collect();
    Ok((
        Duration::from_millis((attempts[first].0.saturating_sub(fault)) as u64),
        after,
    ))
}

/// Waits (up to `within`) until a new connection from `server` to `dst` is answered from
/// `addr` within `ports`; returns how long it took.
pub fn wait_for_source(
    lab: &Lab,
    server: &str,
    dst: std::net::Ipv4Addr,
    addr: &str,
    ports: (u16, u16),
    within: Duration,
) -> anyhow::Result<Duration> {
    let t = std::time::Instant::now();
    loop {
        let seen = lab
            .curl(server, &format!("http://{dst}/"))
            .ok()
            .and_then(|b| serde_json::from_str::<super::Seen>(b.trim()).ok());
        if seen.is_some_and(|s| s.src == addr && (ports.0..=ports.1).contains(&s.port)) {
            return Ok(t.elapsed());
        }
        if t.elapsed() > within {
            anyhow::bail!(
                "{server}: no connection to {dst} from {addr} {ports:?} within {within:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
