//! Per-packet program cost of every path with BPF_PROG_TEST_RUN, as the marginal cost over an
//! empty TC program measured the same way.
//!
//! test_run reuses one skb across `repeat`, so a rewriting program would see its own output
//! from the second repetition on: every figure here is from many single runs, each on a fresh
//! copy of the input packet. The kernel times a single run in 10 ns steps (on the machines we
//! measure on: every run reads x0 or x1 ns), so a median moves in 10 ns steps; the mean of the
//! middle half of the runs (interquartile mean) keeps the median's indifference to outliers
//! and, as the runs spread over two or three steps, resolves a few ns.

use std::collections::BTreeMap;

use serde::Serialize;

use egress_common::prog_names;

use crate::testrun::{
    FIXTURE_TOPOLOGY, Hook, TC_ACT_SHOT, TestDatapath, TestNet,
    packet::TCP_ACK,
    paths::{self, PathFixture, tcp},
};

#[derive(Debug, Clone, Serialize)]
pub struct PathCost {
    pub path: &'static str,
    /// Ethernet frame size class (64 or 1500): the frame entering the program, except that paths
    /// which encapsulate take the largest frame that still fits the uplink afterwards (1486),
    /// and IPv6 packets are 74 bytes at the smallest.
    pub frame: usize,
    /// Interquartile mean of the single runs (see the module's docs).
    pub typical_ns: f64,
    pub min_ns: f64,
    pub max_ns: f64,
    /// Typical minus the empty program's typical at the same frame size.
    pub marginal_ns: f64,
    pub runs: usize,
    /// The reference program of the least work this path must do (a row of its own too).
    pub reference: Option<&'static str>,
    /// Marginal cost over the reference's marginal cost, same frame size, same run.
    pub ratio: Option<f64>,
}

/// The reference rows, by what they do (`egress-ebpf/src/reference.rs`).
pub const REFERENCES: [(&str, &str); 7] = [
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
    // For information (no path is held to it): a lookup in a table as large as the flow
    // table before the rewrite, on the established SNAT packet.
    ("reference: lookup, rewrite", prog_names::REF_LOOKUP),
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
        // The same paths finished in XDP (`egress agent --xdp`): the same least work.
        _ => {
            return XDP_ROWS
                .iter()
                .find(|(_, xdp)| *xdp == path)
                .and_then(|(tc, _)| reference_of(tc));
        }
    })
}

/// The paths `xdp_ingress` finishes, and their rows when timed there (against the empty XDP
/// program); and, for information, what it costs a packet it leaves to TC.
pub const XDP_ROWS: [(&str, &str); 7] = [
    ("reverse translation", "reverse translation, XDP"),
    (
        "reverse translation, IPv6",
        "reverse translation, IPv6, XDP",
    ),
    (
        "peer (decapsulate + SNAT)",
        "peer (decapsulate + SNAT), XDP",
    ),
    ("reply re-encapsulation", "reply re-encapsulation, XDP"),
    (
        "soft-unicast owner redirect",
        "soft-unicast owner redirect, XDP",
    ),
    (
        "forwarded reply (decapsulate)",
        "forwarded reply (decapsulate), XDP",
    ),
    ("arriving, not ours", "arriving, not ours, XDP"),
];

/// The rows of the table, in order (then the references, the XDP rows and the trace rows).
pub const PATHS: [&str; 16] = [
    "no policy match",
    "new flow SNAT",
    "established SNAT",
    "reverse translation",
    // For information (no goal): the same two paths for IPv6.
    "established SNAT, IPv6",
    "reverse translation, IPv6",
    "forward (encapsulate)",
    "peer (decapsulate + SNAT)",
    "peer's packet leaving (second pass)",
    "peer's packet leaving, no hint",
    "reply re-encapsulation",
    "soft-unicast owner redirect",
    "forwarded reply (decapsulate)",
    "unsolicited refused (owner)",
    "arriving, not ours",
    "empty program",
];

/// The XDP baseline row.
pub const EMPTY_XDP: &str = "empty XDP program";

/// The mean of the middle half of `sorted` (its interquartile mean).
fn interquartile_mean(sorted: &[u64]) -> f64 {
    let q = sorted.len() / 4;
    let middle = &sorted[q..sorted.len() - q];
    middle.iter().sum::<u64>() as f64 / middle.len().max(1) as f64
}

fn stats(path: &'static str, frame: usize, mut ns: Vec<u64>, empty: f64) -> PathCost {
    ns.sort_unstable();
    let typical = interquartile_mean(&ns);
    PathCost {
        path,
        frame,
        typical_ns: typical,
        min_ns: ns[0] as f64,
        max_ns: ns[ns.len() - 1] as f64,
        marginal_ns: typical - empty,
        runs: ns.len(),
        reference: None,
        ratio: None,
    }
}

/// `egress agent --trace`'s cost: the established SNAT path with the programs loaded to log
/// one decision in N (sampled: a random number and a branch per packet; logged: a tail call
/// to `tc_trace` and a ring buffer record). Off (every other row) the verifier has removed
/// the step.
pub const TRACE_ROWS: [(&str, u32); 2] = [
    ("established SNAT, --trace 100", 100),
    ("established SNAT, --trace 1", 1),
];

fn traced(net: &TestNet, runs: usize, out: &mut Vec<PathCost>) -> anyhow::Result<()> {
    let established = paths::catalogue()
        .into_iter()
        .find(|f| f.path == "established SNAT")
        .expect("in the catalogue");
    for (path, every) in TRACE_ROWS {
        let mut dp = TestDatapath::fixture_traced(net, FIXTURE_TOPOLOGY, every)?;
        for frame in [64usize, 1500] {
            let empty = out
                .iter()
                .find(|r| r.path == "empty program" && r.frame == frame)
                .map_or(0.0, |r| r.typical_ns);
            let prepared = established.prepare(&mut dp, frame, 0)?;
            established.check(&mut dp, net, frame, &prepared)?;
            let input = prepared.input;
            let mut ns = Vec::with_capacity(runs);
            for i in 0..runs {
                // Read out between runs, so the log never fills and drops records.
                if i % 256 == 0 {
                    dp.trace_lines();
                }
                ns.push(dp.run(established.hook, 0, &input)?.duration.as_nanos() as u64);
            }
            out.push(stats(path, frame, ns, empty));
        }
    }
    Ok(())
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
    let mut seq: u32 = 0;
    for frame in [64usize, 1500] {
        let mut r = Runner {
            dp: &mut dp,
            net: &net,
            runs,
            frame,
            empty: 0.0,
            empty_xdp: 0.0,
            seq: &mut seq,
            out: &mut out,
        };
        r.empty_program()?;
        let packets = r.paths()?;
        r.references(&packets)?;
    }
    traced(&net, runs, &mut out)?;
    drop(net);
    relate(&mut out);
    Ok(out)
}

/// Times the paths at one frame size, each row against the empty program's typical cost.
struct Runner<'a> {
    dp: &'a mut TestDatapath,
    net: &'a TestNet,
    runs: usize,
    frame: usize,
    empty: f64,
    empty_xdp: f64,
    /// The next sequence number of a path that opens a connection per packet (fresh remote
    /// ports across both frame sizes, so port claims never run out).
    seq: &'a mut u32,
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
        let first = self.dp.run(hook, 0, &pkt(usize::MAX))?.verdict;
        (0..self.runs)
            .map(|i| {
                let out = self.dp.run(hook, 0, &pkt(i))?;
                // A run that went another way (a table filled, a port range ran out) would
                // time another path.
                anyhow::ensure!(
                    out.verdict == first,
                    "{hook:?} at {} B: run {i} gave verdict {}, the first {first}",
                    self.frame,
                    out.verdict
                );
                Ok(out.duration.as_nanos() as u64)
            })
            .collect()
    }

    /// Each run a new connection of the fresh path `f` (through `hook`: its own, or a
    /// reference's): one unmeasured, then `runs` timed.
    fn new_connections(&mut self, f: &PathFixture, hook: Hook) -> anyhow::Result<Vec<u64>> {
        let mut next = || {
            *self.seq += 1;
            (f.packet)(self.frame, None, *self.seq)
        };
        // Every run, the unmeasured first too: a refused one would time a drop.
        (0..=self.runs)
            .map(|i| {
                let p = next();
                let out = self.dp.run(hook, 0, &p)?;
                anyhow::ensure!(
                    out.verdict != TC_ACT_SHOT,
                    "{}: {hook:?} refused new connection {i} at {} B",
                    f.path,
                    self.frame
                );
                Ok(out.duration.as_nanos() as u64)
            })
            .skip(1)
            .collect()
    }

    /// The empty TC and XDP programs: the baselines of the TC and XDP rows.
    fn empty_program(&mut self) -> anyhow::Result<()> {
        let p = tcp("10.50.0.11", 5000, "203.0.113.1", 80, TCP_ACK, self.frame);
        for (path, hook) in [("empty program", Hook::Empty), (EMPTY_XDP, Hook::XdpEmpty)] {
            let cost = stats(path, self.frame, self.time(hook, &mut |_| p.clone())?, 0.0);
            if hook == Hook::Empty {
                self.empty = cost.typical_ns;
            } else {
                self.empty_xdp = cost.typical_ns;
            }
            // The baseline itself: nothing on top of it.
            self.out.push(PathCost {
                marginal_ns: 0.0,
                ..cost
            });
        }
        Ok(())
    }

    /// Every path of the catalogue: checked once (output and counter, as the packet tests do),
    /// then timed. Returns each path's packet (the references replay them).
    fn paths(&mut self) -> anyhow::Result<BTreeMap<&'static str, Vec<u8>>> {
        let mut packets = BTreeMap::new();
        for f in paths::catalogue() {
            *self.seq += 1;
            let prepared = f.prepare(self.dp, self.frame, *self.seq)?;
            f.check(self.dp, self.net, self.frame, &prepared)?;
            let input = prepared.input.clone();
            let ns = if f.fresh {
                self.new_connections(&f, f.hook)?
            } else {
                self.time(f.hook, &mut |_| input.clone())?
            };
            self.out.push(stats(f.path, self.frame, ns, self.empty));
            if let Some((_, row)) = XDP_ROWS.iter().find(|(tc, _)| *tc == f.path) {
                f.check_xdp(self.dp, self.net, self.frame, &prepared)?;
                let ns = self.time(Hook::Xdp, &mut |_| input.clone())?;
                self.out.push(stats(row, self.frame, ns, self.empty_xdp));
            }
            packets.insert(f.path, input);
        }
        Ok(packets)
    }

    /// The references, on the same packets as their paths.
    fn references(&mut self, packets: &BTreeMap<&'static str, Vec<u8>>) -> anyhow::Result<()> {
        let fresh = paths::catalogue()
            .into_iter()
            .find(|f| f.fresh)
            .expect("the catalogue has a new-connection path");
        for (name, prog) in REFERENCES {
            let hook = Hook::Reference(prog);
            let ns = if prog == prog_names::REF_CLAIM {
                self.new_connections(&fresh, hook)?
            } else {
                let path = match prog {
                    prog_names::REF_ENCAP => "forward (encapsulate)",
                    prog_names::REF_RW_ENCAP => "reply re-encapsulation",
                    prog_names::REF_DECAP => "peer (decapsulate + SNAT)",
                    _ => "established SNAT",
                };
                let packet = packets[path].clone();
                let ns = self.time(hook, &mut |_| packet.clone())?;
                // A reference that refused its packet would time less than the least work.
                let again = self.dp.run(hook, 0, &packet)?;
                anyhow::ensure!(
                    again.verdict != TC_ACT_SHOT,
                    "{name} refused the {path} packet at {} B",
                    self.frame
                );
                ns
            };
            self.out.push(stats(name, self.frame, ns, self.empty));
        }
        Ok(())
    }
}
