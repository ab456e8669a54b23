//! Per-packet program cost of every path with BPF_PROG_TEST_RUN, as the marginal cost over an
//! empty TC program measured the same way.
//!
//! test_run reuses one skb across `repeat`, so a rewriting program would see its own output
//! from the second repetition on: every figure here is the median of many single runs, each
//! on a fresh copy of the input packet.

use std::net::IpAddr;

use serde::Serialize;

use egress_common::{fabric::tunnel, prog_names};

use crate::testrun::{
    FIXTURE_TOPOLOGY, Hook, TestDatapath, TestNet,
    packet::{self, L4, TCP_ACK, TCP_SYN},
};

#[derive(Debug, Clone, Serialize)]
pub struct PathCost {
    pub path: &'static str,
    /// Ethernet frame size class (64 or 1500): the frame entering the program, except that paths
    /// which encapsulate take the largest frame that still fits the uplink afterwards (1486).
    pub frame: usize,
    pub median_ns: f64,
    pub min_ns: f64,
    pub max_ns: f64,
    /// Median minus the empty program's median at the same frame size.
    pub marginal_ns: f64,
    pub runs: usize,
    /// The reference program of the least work this path must do (a row of its own too).
    pub reference: Option<&'static str>,
    /// Marginal cost over the reference's marginal cost, same frame size, same run.
    pub ratio: Option<f64>,
}

/// The reference rows, by what they do (`egress-ebpf/src/reference.rs`).
pub const REFERENCES: [(&str, &str); 6] = [
    ("reference: parse, pass", prog_names::REF_PASS),
    ("reference: rewrite", prog_names::REF_REWRITE),
    ("reference: rewrite + 2 inserts", prog_names::REF_CLAIM),
    ("reference: push GRE, redirect", prog_names::REF_ENCAP),
    (
        "reference: rewrite, push GRE, redirect",
        prog_names::REF_RW_ENCAP,
    ),
    (
        "reference: pop GRE, rewrite, redirect",
        prog_names::REF_DECAP,
    ),
];

/// Each path's reference (by row name) and the most its ratio may be.
pub fn reference_of(path: &str) -> Option<(&'static str, f64)> {
    let r = |i: usize| REFERENCES[i].0;
    Some(match path {
        "no policy match" => (r(0), 1.2),
        "new flow SNAT" => (r(2), 2.0),
        "established SNAT" | "reverse translation" => (r(1), 1.2),
        "forward (encapsulate)" | "soft-unicast owner redirect" => (r(3), 1.2),
        "reply re-encapsulation" => (r(4), 1.2),
        "peer (decapsulate + SNAT)" => (r(5), 1.2),
        _ => return None,
    })
}

/// The hot paths the ≤ 100 ns target applies to (all of them).
pub const PATHS: [&str; 9] = [
    "no policy match",
    "new flow SNAT",
    "established SNAT",
    "reverse translation",
    "forward (encapsulate)",
    "peer (decapsulate + SNAT)",
    "reply re-encapsulation",
    "soft-unicast owner redirect",
    "empty program",
];

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal address")
}

/// A TCP packet padded to a `frame`-byte Ethernet frame.
fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8, frame: usize) -> Vec<u8> {
    let header = if src.contains(':') {
        14 + 40 + 20
    } else {
        14 + 20 + 20
    };
    let payload = vec![0x5a; frame.saturating_sub(header)];
    packet::build(
        ip(src),
        ip(dst),
        L4::Tcp {
            sport,
            dport,
            flags,
        },
        &payload,
    )
}

fn stats(path: &'static str, frame: usize, mut ns: Vec<u64>, empty: f64) -> PathCost {
    ns.sort_unstable();
    let median = ns[ns.len() / 2] as f64;
    PathCost {
        path,
        frame,
        median_ns: median,
        min_ns: ns[0] as f64,
        max_ns: ns[ns.len() - 1] as f64,
        marginal_ns: median - empty,
        runs: ns.len(),
        reference: None,
        ratio: None,
    }
}

/// Fills each path's reference and ratio from the reference rows of the same frame size.
fn relate(rows: &mut [PathCost]) {
    let refs: Vec<(&'static str, usize, f64)> = rows
        .iter()
        .filter(|r| r.path.starts_with("reference: "))
        .map(|r| (r.path, r.frame, r.marginal_ns))
        .collect();
    for row in rows.iter_mut() {
        let Some((name, _)) = reference_of(row.path) else {
            continue;
        };
        if let Some((_, _, base)) = refs.iter().find(|(n, f, _)| *n == name && *f == row.frame) {
            row.reference = Some(name);
            row.ratio = Some(row.marginal_ns / base.max(1.0));
        }
    }
}

/// Runs each path `runs` times at 64 and 1500 bytes. Runs on its own thread, which enters a
/// test namespace (FIB lookups for the encapsulating paths).
pub fn measure(runs: usize) -> anyhow::Result<Vec<PathCost>> {
    std::thread::spawn(move || measure_here(runs))
        .join()
        .map_err(|_| anyhow::anyhow!("per-packet benchmark thread panicked"))?
}

fn measure_here(runs: usize) -> anyhow::Result<Vec<PathCost>> {
    let net = TestNet::enter();
    let mut dp = TestDatapath::fixture_with_references(&net, FIXTURE_TOPOLOGY)?;
    let mut out = Vec::new();
    let mut fresh_port: u32 = 0;
    for frame in [64usize, 1500] {
        let mut r = Runner {
            dp: &mut dp,
            runs,
            frame,
            empty: 0.0,
            fresh_port: &mut fresh_port,
            out: &mut out,
        };
        r.empty_program()?;
        let local = r.local_paths()?;
        let tunnel = r.tunnel_paths()?;
        r.references(&local, &tunnel)?;
    }
    drop(net);
    relate(&mut out);
    Ok(out)
}

/// The packets the references replay (each its path's).
struct Sample {
    established: Vec<u8>,
    forwarded: Vec<u8>,
}
struct TunnelSample {
    peer: Vec<u8>,
    reply: Vec<u8>,
}

/// Times the paths at one frame size, each row against the empty program's median.
struct Runner<'a> {
    dp: &'a mut TestDatapath,
    runs: usize,
    frame: usize,
    empty: f64,
    fresh_port: &'a mut u32,
    out: &'a mut Vec<PathCost>,
}

impl Runner<'_> {
    /// `runs` single runs of `hook` on fresh copies of `pkt(i)` (after one unmeasured run that
    /// primes the flow state the path relies on).
    fn time(
        &mut self,
        hook: Hook,
        pkt: &mut dyn FnMut(usize) -> Vec<u8>,
    ) -> anyhow::Result<Vec<u64>> {
        self.dp.run(hook, 0, &pkt(usize::MAX))?;
        (0..self.runs)
            .map(|i| Ok(self.dp.run(hook, 0, &pkt(i))?.duration.as_nanos() as u64))
            .collect()
    }

    /// A row: `path` through `hook`, the same packet every run.
    fn row(&mut self, path: &'static str, hook: Hook, packet: &[u8]) -> anyhow::Result<()> {
        let ns = self.time(hook, &mut |_| packet.to_vec())?;
        self.out.push(stats(path, self.frame, ns, self.empty));
        Ok(())
    }

    /// A TCP packet of this frame size (or `frame`: the largest that fits once encapsulated).
    fn tcp(
        &self,
        src: &str,
        sport: u16,
        dst: &str,
        dport: u16,
        flags: u8,
        frame: usize,
    ) -> Vec<u8> {
        tcp(src, sport, dst, dport, flags, frame)
    }

    /// Each run a new connection: a new remote port, so port claims never run out.
    fn new_connection(&mut self, hook: Hook, sport: u16) -> anyhow::Result<Vec<u64>> {
        let (frame, fresh) = (self.frame, &mut *self.fresh_port);
        let mut next = |_| {
            *fresh += 1;
            tcp(
                "10.50.0.11",
                sport,
                "203.0.113.3",
                (1 + *fresh % 65000) as u16,
                TCP_SYN,
                frame,
            )
        };
        self.dp.run(hook, 0, &next(0))?;
        (0..self.runs)
            .map(|_| Ok(self.dp.run(hook, 0, &next(0))?.duration.as_nanos() as u64))
            .collect()
    }

    fn empty_program(&mut self) -> anyhow::Result<()> {
        let p = self.tcp("10.50.0.11", 5000, "203.0.113.1", 80, TCP_ACK, self.frame);
        let mut v = self.time(Hook::Empty, &mut |_| p.clone())?;
        v.sort_unstable();
        self.empty = v[v.len() / 2] as f64;
        self.out.push(PathCost {
            path: "empty program",
            frame: self.frame,
            median_ns: self.empty,
            min_ns: self.empty,
            max_ns: self.empty,
            marginal_ns: 0.0,
            runs: self.runs,
            reference: None,
            ratio: None,
        });
        Ok(())
    }

    /// This server's own connections: no match, new, established, their replies, forwarded.
    fn local_paths(&mut self) -> anyhow::Result<Sample> {
        let frame = self.frame;
        let no_match = self.tcp("10.50.0.11", 5000, "198.51.100.1", 80, TCP_ACK, frame);
        self.row("no policy match", Hook::Egress, &no_match)?;
        let ns = self.new_connection(Hook::Egress, 5000)?;
        self.out.push(stats("new flow SNAT", frame, ns, self.empty));
        let est = self.tcp(
            "10.50.0.11",
            7000 + frame as u16,
            "203.0.113.1",
            80,
            TCP_ACK,
            frame,
        );
        let bound = packet::parse(&self.dp.run(Hook::Egress, 0, &est)?.packet);
        self.row("established SNAT", Hook::Egress, &est)?;
        let reply = self.tcp(
            "203.0.113.1",
            80,
            &bound.src.to_string(),
            bound.sport,
            TCP_ACK,
            frame,
        );
        self.row("reverse translation", Hook::Ingress, &reply)?;
        let fwd = self.tcp(
            "10.50.0.11",
            7100 + frame as u16,
            "203.0.113.200",
            80,
            TCP_ACK,
            tunnelled(frame),
        );
        self.row("forward (encapsulate)", Hook::Egress, &fwd)?;
        Ok(Sample {
            established: est,
            forwarded: fwd,
        })
    }

    /// What arrives from the fabric or for another server: a peer's connection, its replies,
    /// soft-unicast, and an unsolicited packet refused at the owner (a flood's cost).
    fn tunnel_paths(&mut self) -> anyhow::Result<TunnelSample> {
        let frame = self.frame;
        // A peer's connection arriving in GRE: the frame size includes the 28 outer bytes.
        let inner = self.tcp(
            "10.50.0.12",
            7200 + frame as u16,
            "203.0.113.1",
            80,
            TCP_ACK,
            frame - 28,
        );
        let gre = packet::gre_frame(
            [10, 50, 0, 12],
            [10, 50, 0, 11],
            tunnel::key(tunnel::CONNECTION, 7),
            &inner,
        );
        let peer_bound = packet::parse(&self.dp.run(Hook::Ingress, 0, &gre)?.packet);
        self.row("peer (decapsulate + SNAT)", Hook::Ingress, &gre)?;
        let back = self.tcp(
            "203.0.113.1",
            80,
            "192.0.2.10",
            peer_bound.sport,
            TCP_ACK,
            tunnelled(frame),
        );
        self.row("reply re-encapsulation", Hook::Ingress, &back)?;
        let stray = self.tcp(
            "203.0.113.1",
            80,
            "192.0.2.10",
            41500,
            TCP_ACK,
            tunnelled(frame),
        );
        self.row("soft-unicast owner redirect", Hook::Ingress, &stray)?;
        let unsolicited = packet::gre_frame(
            [10, 50, 0, 12],
            [10, 50, 0, 11],
            tunnel::key(tunnel::SOFT_UNICAST, 7),
            &self.tcp(
                "198.51.100.9",
                4444,
                "192.0.2.10",
                40500,
                TCP_SYN,
                frame - 28,
            ),
        );
        self.row("unsolicited refused (owner)", Hook::Ingress, &unsolicited)?;
        Ok(TunnelSample {
            peer: gre,
            reply: back,
        })
    }

    /// The references, on the same packets as their paths.
    fn references(&mut self, local: &Sample, tunnel: &TunnelSample) -> anyhow::Result<()> {
        for (name, prog) in REFERENCES {
            let hook = Hook::Reference(prog);
            let packet = match prog {
                prog_names::REF_CLAIM => {
                    let ns = self.new_connection(hook, 5001)?;
                    self.out.push(stats(name, self.frame, ns, self.empty));
                    continue;
                }
                prog_names::REF_ENCAP => &local.forwarded,
                prog_names::REF_RW_ENCAP => &tunnel.reply,
                prog_names::REF_DECAP => &tunnel.peer,
                _ => &local.established,
            };
            self.row(name, hook, packet)?;
        }
        Ok(())
    }
}

/// Paths that encapsulate take the largest packet that still fits the uplink afterwards.
fn tunnelled(frame: usize) -> usize {
    frame.min(1514 - 28)
}
