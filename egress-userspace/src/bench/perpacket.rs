//! Per-packet program cost of every path with BPF_PROG_TEST_RUN, as the marginal cost over an
//! empty TC program measured the same way.
//!
//! test_run reuses one skb across `repeat`, so a rewriting program would see its own output
//! from the second repetition on: every figure here is the median of many single runs, each
//! on a fresh copy of the input packet.

use std::net::IpAddr;

use serde::Serialize;

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
    let mut dp = TestDatapath::fixture(&net, FIXTURE_TOPOLOGY)?;
    let mut out = Vec::new();
    let mut fresh_port: u32 = 0;
    for frame in [64usize, 1500] {
        let time = |dp: &mut TestDatapath,
                    hook: Hook,
                    pkt: &mut dyn FnMut(usize) -> Vec<u8>|
         -> anyhow::Result<Vec<u64>> {
            // One unmeasured run primes the flow state the path relies on.
            dp.run(hook, 0, &pkt(usize::MAX))?;
            (0..runs)
                .map(|i| Ok(dp.run(hook, 0, &pkt(i))?.duration.as_nanos() as u64))
                .collect()
        };
        let empty = {
            let p = tcp("10.50.0.11", 5000, "203.0.113.1", 80, TCP_ACK, frame);
            let mut v = time(&mut dp, Hook::Empty, &mut |_| p.clone())?;
            v.sort_unstable();
            v[v.len() / 2] as f64
        };
        let no_match = tcp("10.50.0.11", 5000, "198.51.100.1", 80, TCP_ACK, frame);
        out.push(stats(
            "no policy match",
            frame,
            time(&mut dp, Hook::Egress, &mut |_| no_match.clone())?,
            empty,
        ));

        // Each run a new connection: a new remote port, so port claims never run out.
        let ns = time(&mut dp, Hook::Egress, &mut |_| {
            fresh_port += 1;
            tcp(
                "10.50.0.11",
                5000,
                "203.0.113.3",
                (1 + fresh_port % 65000) as u16,
                packet::TCP_SYN,
                frame,
            )
        })?;
        out.push(stats("new flow SNAT", frame, ns, empty));

        let est = tcp(
            "10.50.0.11",
            7000 + frame as u16,
            "203.0.113.1",
            80,
            TCP_ACK,
            frame,
        );
        let bound = packet::parse(&dp.run(Hook::Egress, 0, &est)?.packet);
        out.push(stats(
            "established SNAT",
            frame,
            time(&mut dp, Hook::Egress, &mut |_| est.clone())?,
            empty,
        ));
        let reply = tcp(
            "203.0.113.1",
            80,
            &bound.src.to_string(),
            bound.sport,
            TCP_ACK,
            frame,
        );
        out.push(stats(
            "reverse translation",
            frame,
            time(&mut dp, Hook::Ingress, &mut |_| reply.clone())?,
            empty,
        ));

        // Paths that encapsulate take the largest packet that still fits the uplink afterwards.
        let tunnelled = frame.min(1514 - 28);
        let fwd = tcp(
            "10.50.0.11",
            7100 + frame as u16,
            "203.0.113.200",
            80,
            TCP_ACK,
            tunnelled,
        );
        out.push(stats(
            "forward (encapsulate)",
            frame,
            time(&mut dp, Hook::Egress, &mut |_| fwd.clone())?,
            empty,
        ));

        // A peer's connection arriving in GRE: the frame size includes the 28 outer bytes.
        let inner = tcp(
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
            egress_common::fabric::tunnel::key(egress_common::fabric::tunnel::CONNECTION, 7),
            &inner,
        );
        let peer_bound = packet::parse(&dp.run(Hook::Ingress, 0, &gre)?.packet);
        out.push(stats(
            "peer (decapsulate + SNAT)",
            frame,
            time(&mut dp, Hook::Ingress, &mut |_| gre.clone())?,
            empty,
        ));
        let back = tcp(
            "203.0.113.1",
            80,
            "192.0.2.10",
            peer_bound.sport,
            TCP_ACK,
            frame,
        );
        out.push(stats(
            "reply re-encapsulation",
            frame,
            time(&mut dp, Hook::Ingress, &mut |_| back.clone())?,
            empty,
        ));

        let stray = tcp("203.0.113.1", 80, "192.0.2.10", 41500, TCP_ACK, tunnelled);
        out.push(stats(
            "soft-unicast owner redirect",
            frame,
            time(&mut dp, Hook::Ingress, &mut |_| stray.clone())?,
            empty,
        ));
        // Hostile input at the owner: an unsolicited packet the announcer sent on, which matches
        // no connection here — the per-packet cost of refusing a flood.
        let unsolicited = packet::gre_frame(
            [10, 50, 0, 12],
            [10, 50, 0, 11],
            egress_common::fabric::tunnel::key(egress_common::fabric::tunnel::SOFT_UNICAST, 7),
            &tcp(
                "198.51.100.9",
                4444,
                "192.0.2.10",
                40500,
                TCP_SYN,
                frame - 28,
            ),
        );
        out.push(stats(
            "unsolicited refused (owner)",
            frame,
            time(&mut dp, Hook::Ingress, &mut |_| unsolicited.clone())?,
            empty,
        ));
        out.push(PathCost {
            path: "empty program",
            frame,
            median_ns: empty,
            min_ns: empty,
            max_ns: empty,
            marginal_ns: 0.0,
            runs,
        });
    }
    drop(net);
    Ok(out)
}
