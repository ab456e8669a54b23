//! Packet-exact tests of each path through BPF_PROG_TEST_RUN: the real programs, crafted
//! packets, and every output's checksums recomputed from scratch.

#[path = "../common/mod.rs"]
mod common;

use std::net::IpAddr;

use egress::testrun::packet::{self, L4, TCP_ACK, TCP_SYN, build, parse, tcp, verify_checksums};
use egress::{
    config::Config,
    testrun::{Hint, Hook, Outcome, TC_ACT_OK, TC_ACT_SHOT, TestDatapath},
    validate,
};
use egress_common::{fabric::tunnel, stats::Stat};

use egress::testrun::FIXTURE_TOPOLOGY as TOPOLOGY;

mod catalogue;
mod forwarding;
mod fragments;
mod icmp;
mod local;
mod xdp;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The programs with server `a`'s plan, run from a test namespace (kept alive by the first
/// value) whose uplink the programs use for encapsulated and redirected packets.
fn datapath(toml: &str) -> (egress::testrun::TestNet, TestDatapath) {
    common::require_root();
    let net = egress::testrun::TestNet::enter();
    let dp = TestDatapath::fixture(&net, toml).expect("programs load and the plan is written");
    (net, dp)
}

/// b's connection 10.50.0.12:6000 → 203.0.113.1:80 (a SYN) arriving in GRE for acme and
/// translated here: what the ingress program sends out.
fn peer_connection_sent(dp: &mut TestDatapath) -> Outcome {
    let inner = tcp("10.50.0.12", 6000, "203.0.113.1", 80, TCP_SYN);
    let out = dp
        .run(
            Hook::Ingress,
            0,
            &packet::gre_frame(B, A, conn_key(7), &inner),
        )
        .unwrap();
    assert_eq!(dp.counter(Stat::PeerSnat), 1, "peer SNAT");
    out
}

/// What a fixture expects of the output packet.
enum Want {
    /// Passed, byte for byte unchanged.
    Unchanged,
    /// Passed with this source (address, port range) and destination unchanged.
    Src(&'static str, u16, u16),
    /// Dropped.
    Dropped,
}

struct Fixture {
    name: &'static str,
    hook: Hook,
    mark: u32,
    packet: Vec<u8>,
    want: Want,
    counter: Stat,
}

fn check(dp: &mut TestDatapath, f: &Fixture) -> Outcome {
    let before = dp.counter(f.counter);
    let name = f.name;
    let out = dp
        .run(f.hook, f.mark, &f.packet)
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    assert_eq!(
        dp.counter(f.counter),
        before + 1,
        "{name}: counter {:?} moved by one",
        f.counter
    );
    match f.want {
        Want::Unchanged => {
            assert_eq!(out.verdict, TC_ACT_OK, "{name}: verdict");
            assert_eq!(out.packet, f.packet, "{name}: packet unchanged");
        }
        Want::Dropped => assert_eq!(out.verdict, TC_ACT_SHOT, "{name}: verdict"),
        Want::Src(addr, lo, hi) => {
            assert_eq!(out.verdict, TC_ACT_OK, "{name}: verdict");
            let (i, o) = (parse(&f.packet), parse(&out.packet));
            assert_eq!(o.src, ip(addr), "{name}: source address");
            assert!(
                (lo..=hi).contains(&o.sport),
                "{name}: source port {} in {lo}-{hi}",
                o.sport
            );
            assert_eq!(o.dst, i.dst, "{name}: destination unchanged");
            if !matches!(i.proto, 1 | 58) {
                assert_eq!(o.dport, i.dport, "{name}: destination port unchanged");
            }
            verify_checksums(&out.packet).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
    out
}

const A: [u8; 4] = [10, 50, 0, 11];

const B: [u8; 4] = [10, 50, 0, 12];

const TC_ACT_REDIRECT: u32 = 7;

/// GRE keys of the fixture's pools (acme 7, gamma 9), by what the tunnel carries.
fn conn_key(pool: u32) -> u32 {
    tunnel::key(tunnel::CONNECTION, pool)
}

fn soft_key(pool: u32) -> u32 {
    tunnel::key(tunnel::SOFT_UNICAST, pool)
}

fn reply_key(pool: u32) -> u32 {
    tunnel::key(tunnel::REPLY, pool)
}

/// Checks an encapsulated frame byte for byte up to the inner packet: L2 to `dmac` from the
/// uplink, outer IPv4 and GRE exactly as built independently by the test, inner checksums valid.
/// Returns the inner packet as a frame of its own.
fn check_encapsulated(
    name: &str,
    net: &egress::testrun::TestNet,
    out: &[u8],
    dmac: [u8; 6],
    dst: [u8; 4],
    key: u32,
) -> Vec<u8> {
    assert_eq!(&out[0..6], &dmac, "{name}: destination MAC");
    assert_eq!(&out[6..12], &net.mac, "{name}: source MAC is the uplink's");
    assert_eq!(&out[12..14], &[0x08, 0x00], "{name}: ethertype");
    let want = packet::gre_outer(A, dst, key, out.len() - 14 - 28);
    assert_eq!(
        &out[14..42],
        &want[..],
        "{name}: outer IPv4 + GRE header byte for byte"
    );
    let mut inner = out[..14].to_vec();
    inner.extend_from_slice(&out[42..]);
    verify_checksums(&inner).unwrap_or_else(|e| panic!("{name}: inner {e}"));
    inner
}

/// A UDP datagram of `len` payload bytes.
fn udp_datagram(src: &str, sport: u16, dst: &str, dport: u16, len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    build(ip(src), ip(dst), L4::Udp { sport, dport }, &payload)
}
