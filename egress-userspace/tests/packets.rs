//! Packet-exact tests of each path through BPF_PROG_TEST_RUN: the real programs, crafted
//! packets, and every output's checksums recomputed from scratch.

mod common;

use std::net::IpAddr;

use egress::testrun::packet::{self, L4, TCP_ACK, TCP_SYN, build, parse, tcp, verify_checksums};
use egress::{
    config::Config,
    testrun::{Hook, Outcome, TC_ACT_OK, TC_ACT_SHOT, TestDatapath},
    validate,
};
use egress_common::{fabric::tunnel, stats::Stat};

use egress::testrun::FIXTURE_TOPOLOGY as TOPOLOGY;

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

#[test]
fn egress_fixtures() {
    let (_net, mut dp) = datapath(TOPOLOGY);
    let fixtures = [
        Fixture {
            name: "new TCP SYN v4 → pool address and a port of this server's range",
            hook: Hook::Egress,
            mark: 0,
            packet: tcp("10.50.0.11", 5000, "203.0.113.1", 80, TCP_SYN),
            want: Want::Src("192.0.2.10", 40000, 40999),
            counter: Stat::SnatNew,
        },
        Fixture {
            name: "new TCP SYN v6 → this server's address in the pool prefix, full port range",
            hook: Hook::Egress,
            mark: 0,
            packet: tcp("fd00:50::b", 5000, "2001:db8:beef::1", 443, TCP_SYN),
            want: Want::Src("2001:db8:7::b", 1024, 65535),
            counter: Stat::SnatNew,
        },
        Fixture {
            name: "UDP v4 with payload",
            hook: Hook::Egress,
            mark: 0,
            packet: build(
                ip("10.50.0.11"),
                ip("203.0.113.9"),
                L4::Udp {
                    sport: 6000,
                    dport: 53,
                },
                b"query!",
            ),
            want: Want::Src("192.0.2.10", 40000, 40999),
            counter: Stat::SnatNew,
        },
        Fixture {
            name: "UDP v6 with odd-length payload",
            hook: Hook::Egress,
            mark: 0,
            packet: build(
                ip("fd00:50::b"),
                ip("2001:db8:beef::9"),
                L4::Udp {
                    sport: 6000,
                    dport: 53,
                },
                b"odd",
            ),
            want: Want::Src("2001:db8:7::b", 1024, 65535),
            counter: Stat::SnatNew,
        },
        Fixture {
            name: "ICMP echo request v4: identifier translated like a port",
            hook: Hook::Egress,
            mark: 0,
            packet: build(
                ip("10.50.0.11"),
                ip("203.0.113.1"),
                L4::Echo {
                    id: 77,
                    seq: 1,
                    request: true,
                },
                b"ping",
            ),
            want: Want::Src("192.0.2.10", 40000, 40999),
            counter: Stat::SnatNew,
        },
        Fixture {
            name: "ICMPv6 echo request: identifier and pseudo-header",
            hook: Hook::Egress,
            mark: 0,
            packet: build(
                ip("fd00:50::b"),
                ip("2001:db8:beef::1"),
                L4::Echo {
                    id: 78,
                    seq: 1,
                    request: true,
                },
                b"ping",
            ),
            want: Want::Src("2001:db8:7::b", 1024, 65535),
            counter: Stat::SnatNew,
        },
        Fixture {
            name: "mark-specific policy beats mark 0",
            hook: Hook::Egress,
            mark: 42,
            packet: tcp("10.50.0.11", 5001, "203.0.113.1", 80, TCP_SYN),
            want: Want::Src("192.0.2.20", 2000, 2999),
            counter: Stat::SnatNew,
        },
        Fixture {
            name: "a mark without policies falls back to mark 0",
            hook: Hook::Egress,
            mark: 99,
            packet: tcp("10.50.0.11", 5002, "203.0.113.1", 80, TCP_SYN),
            want: Want::Src("192.0.2.10", 40000, 40999),
            counter: Stat::SnatNew,
        },
        Fixture {
            name: "no policy match → unchanged",
            hook: Hook::Egress,
            mark: 0,
            packet: tcp("10.50.0.11", 5003, "198.51.100.1", 80, TCP_SYN),
            want: Want::Unchanged,
            counter: Stat::EgressNoPolicy,
        },
        Fixture {
            name: "ARP → unchanged",
            hook: Hook::Egress,
            mark: 0,
            packet: {
                let mut p = vec![0xff; 6];
                p.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
                p.extend_from_slice(&[0u8; 28]);
                p
            },
            want: Want::Unchanged,
            counter: Stat::EgressNotIp,
        },
    ];
    for f in &fixtures {
        check(&mut dp, f);
    }
}

#[test]
fn established_reuses_binding_and_replies_translate_back() {
    let (_net, mut dp) = datapath(TOPOLOGY);
    struct Case {
        name: &'static str,
        local: &'static str,
        remote: &'static str,
        out: fn(&str, &str, u16) -> Vec<u8>,
        reply: fn(&str, &str, u16) -> Vec<u8>,
    }
    let cases = [
        Case {
            name: "TCP v4",
            local: "10.50.0.11",
            remote: "203.0.113.1",
            out: |l, r, _| tcp(l, 5000, r, 80, TCP_ACK),
            reply: |r, pool, port| tcp(r, 80, pool, port, TCP_ACK),
        },
        Case {
            name: "TCP v6",
            local: "fd00:50::b",
            remote: "2001:db8:beef::1",
            out: |l, r, _| tcp(l, 5000, r, 80, TCP_ACK),
            reply: |r, pool, port| tcp(r, 80, pool, port, TCP_ACK),
        },
        Case {
            name: "UDP v4",
            local: "10.50.0.11",
            remote: "203.0.113.1",
            out: |l, r, _| {
                build(
                    ip(l),
                    ip(r),
                    L4::Udp {
                        sport: 7000,
                        dport: 7,
                    },
                    b"hello",
                )
            },
            reply: |r, pool, port| {
                build(
                    ip(r),
                    ip(pool),
                    L4::Udp {
                        sport: 7,
                        dport: port,
                    },
                    b"hello back",
                )
            },
        },
        Case {
            name: "ICMP echo v4",
            local: "10.50.0.11",
            remote: "203.0.113.1",
            out: |l, r, _| {
                build(
                    ip(l),
                    ip(r),
                    L4::Echo {
                        id: 300,
                        seq: 1,
                        request: true,
                    },
                    b"x",
                )
            },
            reply: |r, pool, id| {
                build(
                    ip(r),
                    ip(pool),
                    L4::Echo {
                        id,
                        seq: 1,
                        request: false,
                    },
                    b"x",
                )
            },
        },
        Case {
            name: "ICMPv6 echo",
            local: "fd00:50::b",
            remote: "2001:db8:beef::1",
            out: |l, r, _| {
                build(
                    ip(l),
                    ip(r),
                    L4::Echo {
                        id: 300,
                        seq: 1,
                        request: true,
                    },
                    b"x",
                )
            },
            reply: |r, pool, id| {
                build(
                    ip(r),
                    ip(pool),
                    L4::Echo {
                        id,
                        seq: 1,
                        request: false,
                    },
                    b"x",
                )
            },
        },
    ];
    for c in cases {
        let name = c.name;
        let first = (c.out)(c.local, c.remote, 0);
        let o1 = dp.run(Hook::Egress, 0, &first).unwrap();
        let b1 = parse(&o1.packet);
        let established_before = dp.counter(Stat::SnatEstablished);
        let o2 = dp.run(Hook::Egress, 0, &first).unwrap();
        assert_eq!(o2.verdict, TC_ACT_OK, "{name}: second packet passes");
        assert_eq!(
            parse(&o2.packet),
            b1,
            "{name}: second packet reuses the binding"
        );
        assert_eq!(
            dp.counter(Stat::SnatEstablished),
            established_before + 1,
            "{name}: established counted"
        );
        verify_checksums(&o2.packet).unwrap_or_else(|e| panic!("{name}: {e}"));

        let reply = (c.reply)(c.remote, &b1.src.to_string(), b1.sport);
        let reverse_before = dp.counter(Stat::ReverseNat);
        let back = dp.run(Hook::Ingress, 0, &reply).unwrap();
        assert_eq!(back.verdict, TC_ACT_OK, "{name}: reply passes");
        let r = parse(&back.packet);
        let orig = parse(&first);
        assert_eq!(
            (r.dst, r.dport),
            (orig.src, orig.sport),
            "{name}: reply goes back to the socket"
        );
        assert_eq!(
            (r.src, r.sport),
            (orig.dst, orig.dport),
            "{name}: reply source unchanged"
        );
        assert_eq!(
            dp.counter(Stat::ReverseNat),
            reverse_before + 1,
            "{name}: reverse counted"
        );
        verify_checksums(&back.packet).unwrap_or_else(|e| panic!("{name} reply: {e}"));
    }

    // A reply to a port nobody claimed is passed unchanged and counted.
    let stray = tcp("203.0.113.1", 80, "192.0.2.10", 40999, TCP_ACK);
    let before = dp.counter(Stat::IngressNoFlow);
    let out = dp.run(Hook::Ingress, 0, &stray).unwrap();
    assert_eq!(
        (out.verdict, &out.packet),
        (TC_ACT_OK, &stray),
        "stray reply unchanged"
    );
    assert_eq!(dp.counter(Stat::IngressNoFlow), before + 1);
}

#[test]
fn malformed_and_untranslatable_packets_are_counted_never_crash() {
    let (_net, mut dp) = datapath(TOPOLOGY);
    let syn = tcp("10.50.0.11", 5000, "203.0.113.1", 80, TCP_SYN);
    // test_run refuses frames shorter than a whole IP header, so truncation is shown with a
    // header length (60 bytes of options) that runs past the end of the packet.
    let mut ip_cut = syn.clone();
    ip_cut[14] = 0x4f;
    let mut bad_version = syn.clone();
    bad_version[14] = 0x55;
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x43;
    let truncated_tcp = syn[..14 + 20 + 10].to_vec();
    let truncated_no_policy = tcp("10.50.0.11", 5000, "198.51.100.1", 80, TCP_SYN)[..44].to_vec();
    // A later fragment (offset 128 bytes) whose first fragment was never seen.
    let mut fragment = syn.clone();
    fragment[20..22].copy_from_slice(&[0x00, 0x10]);
    let gre = build(
        ip("10.50.0.11"),
        ip("203.0.113.1"),
        L4::Raw { proto: 47 },
        &[0u8; 8],
    );
    let echo_reply_out = build(
        ip("10.50.0.11"),
        ip("203.0.113.1"),
        L4::Echo {
            id: 1,
            seq: 1,
            request: false,
        },
        b"",
    );
    let fixtures = [
        Fixture {
            name: "IPv4 options run past the end (the IP header is cut short)",
            hook: Hook::Egress,
            mark: 0,
            packet: ip_cut.clone(),
            want: Want::Dropped,
            counter: Stat::EgressMalformed,
        },
        Fixture {
            name: "IP version 5 in an IPv4 frame",
            hook: Hook::Egress,
            mark: 0,
            packet: bad_version,
            want: Want::Dropped,
            counter: Stat::EgressMalformed,
        },
        Fixture {
            name: "IPv4 header length 12",
            hook: Hook::Egress,
            mark: 0,
            packet: bad_ihl.clone(),
            want: Want::Dropped,
            counter: Stat::EgressMalformed,
        },
        Fixture {
            name: "TCP cut short, policy destination",
            hook: Hook::Egress,
            mark: 0,
            packet: truncated_tcp.clone(),
            want: Want::Dropped,
            counter: Stat::TruncatedL4,
        },
        Fixture {
            name: "TCP cut short, no policy",
            hook: Hook::Egress,
            mark: 0,
            packet: truncated_no_policy,
            want: Want::Unchanged,
            counter: Stat::EgressNoPolicy,
        },
        Fixture {
            name: "a later fragment to a policy destination, its first fragment unseen",
            hook: Hook::Egress,
            mark: 0,
            packet: fragment,
            want: Want::Dropped,
            counter: Stat::Fragment,
        },
        Fixture {
            name: "GRE to a policy destination",
            hook: Hook::Egress,
            mark: 0,
            packet: gre,
            want: Want::Dropped,
            counter: Stat::UnsupportedL4,
        },
        Fixture {
            name: "ICMP echo reply leaving to a policy destination",
            hook: Hook::Egress,
            mark: 0,
            packet: echo_reply_out,
            want: Want::Dropped,
            counter: Stat::UnsupportedL4,
        },
        Fixture {
            name: "ingress: IPv4 options run past the end",
            hook: Hook::Ingress,
            mark: 0,
            packet: ip_cut,
            want: Want::Unchanged,
            counter: Stat::IngressMalformed,
        },
        Fixture {
            name: "ingress: IPv4 header length 12",
            hook: Hook::Ingress,
            mark: 0,
            packet: bad_ihl,
            want: Want::Unchanged,
            counter: Stat::IngressMalformed,
        },
        Fixture {
            name: "ingress: TCP cut short",
            hook: Hook::Ingress,
            mark: 0,
            packet: truncated_tcp,
            want: Want::Unchanged,
            counter: Stat::IngressNoFlow,
        },
    ];
    for f in &fixtures {
        check(&mut dp, f);
    }
}

#[test]
fn full_port_range_is_a_counted_drop() {
    let small = TOPOLOGY.replace("40000-40999", "40000-40003");
    let (_net, mut dp) = datapath(&small);
    let mut ports = std::collections::BTreeSet::new();
    for i in 0..4 {
        let out = dp
            .run(
                Hook::Egress,
                0,
                &tcp("10.50.0.11", 6000 + i, "203.0.113.1", 80, TCP_SYN),
            )
            .unwrap();
        assert_eq!(out.verdict, TC_ACT_OK, "flow {i} gets a port");
        ports.insert(parse(&out.packet).sport);
    }
    assert_eq!(
        ports,
        (40000..=40003).collect(),
        "the four ports are handed out once each"
    );
    let before = dp.counter(Stat::PortExhausted);
    let out = dp
        .run(
            Hook::Egress,
            0,
            &tcp("10.50.0.11", 6004, "203.0.113.1", 80, TCP_SYN),
        )
        .unwrap();
    assert_eq!(out.verdict, TC_ACT_SHOT, "fifth flow dropped");
    assert_eq!(
        dp.counter(Stat::PortExhausted),
        before + 1,
        "exhaustion counted"
    );
    // Another destination reuses the same ports: claims are per remote endpoint.
    let other = dp
        .run(
            Hook::Egress,
            0,
            &tcp("10.50.0.11", 6004, "203.0.113.2", 80, TCP_SYN),
        )
        .unwrap();
    assert_eq!(
        other.verdict, TC_ACT_OK,
        "a different remote can use the same ports"
    );
}

#[test]
fn packet_builder_checksums_are_valid() {
    // The verifier must accept what the builder makes and reject a flipped byte.
    let p = packet::build(
        ip("10.0.0.1"),
        ip("10.0.0.2"),
        L4::Tcp {
            sport: 1,
            dport: 2,
            flags: TCP_SYN,
        },
        b"abc",
    );
    verify_checksums(&p).unwrap();
    let mut bad = p.clone();
    *bad.last_mut().unwrap() ^= 1;
    assert!(
        verify_checksums(&bad).is_err(),
        "a corrupted payload fails the TCP checksum"
    );
    let mut bad_ip = p;
    bad_ip[22] ^= 1; // TTL
    assert!(
        verify_checksums(&bad_ip).is_err(),
        "a corrupted IPv4 header fails its checksum"
    );
}

#[test]
fn expired_connections_are_collected_both_directions_together() {
    use egress::flows;
    let (_net, mut dp) = datapath(TOPOLOGY);
    let cap = dp.maps.flow_capacity;
    let send = |dp: &mut TestDatapath, sport: u16, flags: u8| {
        dp.run(
            Hook::Egress,
            0,
            &tcp("10.50.0.11", sport, "203.0.113.1", 80, flags),
        )
        .unwrap()
    };
    // Open TCP connections (replied): one stays open, one is reset and one sees the socket's
    // FIN. A fourth never gets a reply.
    for sport in [7000, 7001, 7002, 7003] {
        let out = send(&mut dp, sport, TCP_SYN);
        if sport != 7003 {
            let port = parse(&out.packet).sport;
            let reply = tcp("203.0.113.1", 80, "192.0.2.10", port, TCP_SYN | TCP_ACK);
            assert_eq!(dp.run(Hook::Ingress, 0, &reply).unwrap().verdict, TC_ACT_OK);
        }
    }
    send(&mut dp, 7001, packet::TCP_FIN | TCP_ACK);
    send(&mut dp, 7002, packet::TCP_RST);
    let count = |dp: &TestDatapath| dp.maps.flows.keys().count();
    assert_eq!(count(&dp), 8, "four connections, two entries each");

    let now = flows::monotonic_ns();
    let at = |s: u64| now + s * 1_000_000_000;
    let collect = |dp: &mut TestDatapath, s| {
        flows::collect(&mut dp.maps.flows, at(s), cap)
            .unwrap()
            .expired
    };
    assert_eq!(collect(&mut dp, 0), 0, "nothing is idle yet");
    assert_eq!(
        collect(&mut dp, 11),
        1,
        "the reset connection goes after 10 s"
    );
    assert_eq!(count(&dp), 6, "with both of its entries");
    assert_eq!(
        collect(&mut dp, 31),
        1,
        "the connection that never saw a reply after 30 s"
    );
    assert_eq!(
        collect(&mut dp, 119),
        0,
        "after a FIN the translated tuple is held past the origin's TIME_WAIT"
    );
    assert_eq!(collect(&mut dp, 121), 1, "the closed one after 120 s");
    assert_eq!(collect(&mut dp, 3601), 1, "the open one after an hour");
    assert_eq!(count(&dp), 0);

    // The port is free again: the same connection gets a binding anew.
    let out = send(&mut dp, 7000, TCP_SYN);
    assert_eq!(out.verdict, TC_ACT_OK);
}

/// A tuple reused after a FIN (the socket's port reopened towards the same origin) must not go
/// out with the old translated tuple, which the origin may still hold in TIME_WAIT.
#[test]
fn a_reopened_tuple_gets_a_new_port_while_the_old_one_is_held() {
    use egress::flows;
    let (_net, mut dp) = datapath(TOPOLOGY);
    let send = |dp: &mut TestDatapath, flags: u8| {
        let out = dp
            .run(
                Hook::Egress,
                0,
                &tcp("10.50.0.11", 7100, "203.0.113.1", 80, flags),
            )
            .unwrap();
        assert_eq!(out.verdict, TC_ACT_OK);
        parse(&out.packet).sport
    };
    let first = send(&mut dp, TCP_SYN);
    assert_eq!(send(&mut dp, TCP_ACK), first, "same connection, same port");
    send(&mut dp, packet::TCP_FIN | TCP_ACK);
    let before = dp.counter(Stat::SnatNew);
    let second = send(&mut dp, TCP_SYN);
    assert_ne!(
        second, first,
        "the reopened tuple is translated to another port"
    );
    assert_eq!(dp.counter(Stat::SnatNew), before + 1, "as a new connection");
    assert_eq!(send(&mut dp, TCP_ACK), second, "and keeps its new port");
    let new_reply = tcp("203.0.113.1", 80, "192.0.2.10", second, TCP_ACK);
    assert_eq!(
        dp.run(Hook::Ingress, 0, &new_reply).unwrap().verdict,
        TC_ACT_OK
    );
    // The old reply tuple still maps the old port: nothing else can take it.
    let old_reply = tcp("203.0.113.1", 80, "192.0.2.10", first, TCP_ACK);
    let out = dp.run(Hook::Ingress, 0, &old_reply).unwrap();
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(
        parse(&out.packet).dport,
        7100,
        "the old port's reverse entry is still held"
    );
    assert_eq!(dp.maps.flows.keys().count(), 3, "old reverse + new pair");
    // Expiry takes the old reverse entry alone, never the new connection's entries.
    let now = flows::monotonic_ns();
    let cap = dp.maps.flow_capacity;
    let removed = flows::collect(&mut dp.maps.flows, now + 121 * 1_000_000_000, cap).unwrap();
    assert_eq!(
        removed.expired, 1,
        "only the old entry is idle past 120 s after its FIN"
    );
    assert_eq!(
        dp.maps.flows.keys().count(),
        2,
        "the new connection stays whole"
    );
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

#[test]
fn forwarding_paths() {
    let (net, mut dp) = datapath(TOPOLOGY);

    // 1. A new connection to gamma (held by b): encapsulated to b with key 9, MSS clamped.
    let syn = packet::tcp_with_mss(
        ip("10.50.0.11"),
        ip("203.0.113.200"),
        5000,
        80,
        TCP_SYN,
        1460,
    );
    let out = dp.run(Hook::Egress, 0, &syn).unwrap();
    assert_eq!(out.verdict, TC_ACT_OK, "forward: leaves through the uplink");
    let inner = check_encapsulated(
        "forward SYN",
        &net,
        &out.packet,
        egress::testrun::PEER_MAC,
        B,
        conn_key(9),
    );
    assert_eq!(
        parse(&inner),
        parse(&syn),
        "forward SYN: inner addresses and ports untouched"
    );
    assert_eq!(
        packet::mss_of(&inner),
        1432,
        "forward SYN: MSS clamped to fit the tunnel"
    );
    assert_eq!(
        (dp.counter(Stat::ForwardNew), dp.counter(Stat::MssClamped)),
        (1, 1)
    );

    // 2. The next packet of the connection follows the recorded path.
    let ack = tcp("10.50.0.11", 5000, "203.0.113.200", 80, TCP_ACK);
    let out = dp.run(Hook::Egress, 0, &ack).unwrap();
    let inner = check_encapsulated(
        "forward ACK",
        &net,
        &out.packet,
        egress::testrun::PEER_MAC,
        B,
        conn_key(9),
    );
    assert_eq!(
        inner[14..],
        ack[14..],
        "forward ACK: inner packet unchanged"
    );
    assert_eq!(dp.counter(Stat::ForwardEstablished), 1);

    // 3. b returns the SYN-ACK in GRE: decapsulated, MSS clamped, delivered.
    let synack = packet::tcp_with_mss(
        ip("203.0.113.200"),
        ip("10.50.0.11"),
        80,
        5000,
        TCP_SYN | TCP_ACK,
        1460,
    );
    let out = dp
        .run(
            Hook::Ingress,
            0,
            &packet::gre_frame(B, A, reply_key(9), &synack),
        )
        .unwrap();
    assert_eq!(out.verdict, TC_ACT_OK, "forwarded reply delivered");
    assert_eq!(
        parse(&out.packet),
        parse(&synack),
        "forwarded reply: decapsulated"
    );
    assert_eq!(
        packet::mss_of(&out.packet),
        1432,
        "forwarded reply: MSS clamped"
    );
    verify_checksums(&out.packet).unwrap();
    assert_eq!(dp.counter(Stat::ForwardedReply), 1);

    // 4. b forwards one of its connections for acme to a: decapsulated, translated with a's
    //    share, sent to the origin's gateway.
    let req = tcp("10.50.0.12", 6000, "203.0.113.1", 80, TCP_SYN);
    let out = dp
        .run(
            Hook::Ingress,
            0,
            &packet::gre_frame(B, A, conn_key(7), &req),
        )
        .unwrap();
    assert_eq!(
        out.verdict, TC_ACT_REDIRECT,
        "peer SNAT: redirected out of the uplink"
    );
    assert_eq!(
        &out.packet[0..6],
        &egress::testrun::GATEWAY_MAC,
        "peer SNAT: towards the origin's gateway"
    );
    assert_eq!(&out.packet[6..12], &net.mac);
    let o = parse(&out.packet);
    assert_eq!(o.src, ip("192.0.2.10"), "peer SNAT: pool address");
    assert!(
        (40000..=40999).contains(&o.sport),
        "peer SNAT: a's port range"
    );
    assert_eq!((o.dst, o.dport), (ip("203.0.113.1"), 80));
    verify_checksums(&out.packet).unwrap();
    assert_eq!(dp.counter(Stat::PeerSnat), 1);

    // 5. The origin's reply is translated back and encapsulated to b, which owns the socket.
    let reply = tcp("203.0.113.1", 80, "192.0.2.10", o.sport, TCP_SYN | TCP_ACK);
    let out = dp.run(Hook::Ingress, 0, &reply).unwrap();
    assert_eq!(
        out.verdict, TC_ACT_REDIRECT,
        "reply re-encapsulated and redirected"
    );
    let inner = check_encapsulated(
        "reply re-encap",
        &net,
        &out.packet,
        egress::testrun::PEER_MAC,
        B,
        reply_key(7),
    );
    let r = parse(&inner);
    assert_eq!(
        (r.dst, r.dport),
        (ip("10.50.0.12"), 6000),
        "reply goes back to b's socket"
    );
    assert_eq!((r.src, r.sport), (ip("203.0.113.1"), 80));
    assert_eq!(dp.counter(Stat::ReplyReencap), 1);

    // 6. A packet to a port of 192.0.2.10 that b owns goes to b unchanged (soft-unicast).
    let stray = tcp("203.0.113.1", 80, "192.0.2.10", 41500, TCP_ACK);
    let out = dp.run(Hook::Ingress, 0, &stray).unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "soft-unicast redirected");
    let inner = check_encapsulated(
        "soft-unicast",
        &net,
        &out.packet,
        egress::testrun::PEER_MAC,
        B,
        soft_key(7),
    );
    assert_eq!(
        inner[14..],
        packet::hopped(&stray)[14..],
        "soft-unicast: inner packet unchanged but for the TTL"
    );
    assert_eq!(dp.counter(Stat::SoftUnicast), 1);

    // 7. A packet to a port a owns but no connection uses is passed (the stack answers it).
    let own = tcp("203.0.113.1", 80, "192.0.2.10", 40998, TCP_ACK);
    let out = dp.run(Hook::Ingress, 0, &own).unwrap();
    assert_eq!(
        (out.verdict, &out.packet),
        (TC_ACT_OK, &own),
        "own range, no flow: passed"
    );
}

#[test]
fn gre_is_accepted_from_known_peers_only() {
    let (_net, mut dp) = datapath(TOPOLOGY);
    let inner = tcp("10.50.0.12", 6000, "203.0.113.1", 80, TCP_SYN);
    let unknown = packet::gre_frame([10, 50, 9, 9], A, conn_key(7), &inner);
    let mut no_key = packet::gre_frame(B, A, conn_key(7), &inner);
    no_key[14 + 20] = 0; // clear the key flag
    let mut ipv6_inside = packet::gre_frame(B, A, conn_key(7), &inner);
    ipv6_inside[14 + 22..14 + 24].copy_from_slice(&[0x86, 0xdd]);
    // gamma (key 9) covers 203.0.113.128/25 and a holds no share of it.
    let not_held = packet::gre_frame(
        B,
        A,
        conn_key(9),
        &tcp("10.50.0.12", 6000, "203.0.113.200", 80, TCP_SYN),
    );
    // acme (key 7) has no policy towards 198.51.100.1: a peer may not use a's share for it.
    let off_policy = packet::gre_frame(
        B,
        A,
        conn_key(7),
        &tcp("10.50.0.12", 6000, "198.51.100.1", 80, TCP_SYN),
    );
    // A reply-shaped packet (to a pool address) that no connection here explains.
    let stray_reply = packet::gre_frame(
        B,
        A,
        conn_key(7),
        &tcp("203.0.113.1", 80, "192.0.2.10", 40500, TCP_SYN | TCP_ACK),
    );
    let fixtures = [
        Fixture {
            name: "GRE from an unknown source",
            hook: Hook::Ingress,
            mark: 0,
            packet: unknown,
            want: Want::Dropped,
            counter: Stat::GreUnknownPeer,
        },
        Fixture {
            name: "GRE without a key",
            hook: Hook::Ingress,
            mark: 0,
            packet: no_key,
            want: Want::Dropped,
            counter: Stat::GreMalformed,
        },
        Fixture {
            name: "GRE carrying IPv6",
            hook: Hook::Ingress,
            mark: 0,
            packet: ipv6_inside,
            want: Want::Dropped,
            counter: Stat::GreMalformed,
        },
        Fixture {
            name: "forwarded request for a pool not held here",
            hook: Hook::Ingress,
            mark: 0,
            packet: not_held,
            want: Want::Dropped,
            counter: Stat::PeerNotHeld,
        },
        Fixture {
            name: "forwarded request to a destination no policy of its pool covers",
            hook: Hook::Ingress,
            mark: 0,
            packet: off_policy,
            want: Want::Dropped,
            counter: Stat::PeerPolicy,
        },
        Fixture {
            name: "forwarded packet only a reply could explain creates nothing",
            hook: Hook::Ingress,
            mark: 0,
            packet: stray_reply,
            want: Want::Dropped,
            counter: Stat::PeerPolicy,
        },
    ];
    for f in &fixtures {
        check(&mut dp, f);
    }
    assert_eq!(
        dp.maps.flows.iter().count(),
        0,
        "refused peer packets left no flow entries"
    );
}

/// The programs' own packets pass egress untouched because of what they are; nothing else does,
/// whatever the skb mark says.
#[test]
fn own_packets_are_recognised_by_what_they_are_never_by_the_mark() {
    let (_net, mut dp) = datapath(TOPOLOGY);
    // A peer's connection translated here, as the ingress program sends it out.
    let inner = tcp("10.50.0.12", 6000, "203.0.113.1", 80, TCP_SYN);
    let out = dp
        .run(
            Hook::Ingress,
            0,
            &packet::gre_frame(B, A, conn_key(7), &inner),
        )
        .unwrap();
    assert_eq!(dp.counter(Stat::PeerSnat), 1, "peer SNAT");
    let sent = out.packet;
    assert_eq!(parse(&sent).src, ip("192.0.2.10"), "translated by the peer");
    let gre_to_peer = packet::gre_frame(A, B, conn_key(7), &inner);
    let gre_to_origin = packet::gre_frame(A, [203, 0, 113, 1], conn_key(7), &inner);
    let own = [
        ("GRE from this server to a peer", gre_to_peer),
        ("a peer's connection translated here", sent),
    ];
    for (name, p) in &own {
        for mark in [0, 0x8000_0000, 0xffff_ffff] {
            let before = dp.counter(Stat::Ours);
            let out = dp.run(Hook::Egress, mark, p).unwrap();
            assert_eq!(
                (out.verdict, &out.packet),
                (TC_ACT_OK, p),
                "{name} (mark {mark:#x}): untouched"
            );
            assert_eq!(dp.counter(Stat::Ours), before + 1, "{name}: ours_passed");
        }
    }
    // GRE to a policy destination is not ours: the policy applies and GRE cannot be translated.
    let before = dp.counter(Stat::UnsupportedL4);
    let out = dp.run(Hook::Egress, 0, &gre_to_origin).unwrap();
    assert_eq!(out.verdict, TC_ACT_SHOT, "GRE to an origin is dropped");
    assert_eq!(dp.counter(Stat::UnsupportedL4), before + 1);
    // Bit 31 (or any mark) set by some other software: still translated.
    for (i, mark) in [0x8000_0000u32, 0xffff_ffff, 0x8000_002a]
        .into_iter()
        .enumerate()
    {
        let f = Fixture {
            name: "a marked packet to a policy destination is translated",
            hook: Hook::Egress,
            mark,
            packet: tcp("10.50.0.11", 7000 + i as u16, "203.0.113.1", 80, TCP_SYN),
            want: Want::Src("192.0.2.10", 40000, 40999),
            counter: Stat::SnatNew,
        };
        check(&mut dp, &f);
    }
}

#[test]
fn established_connections_survive_the_removal_of_their_policy() {
    let (_net, mut dp) = datapath(TOPOLOGY);
    let syn = tcp("10.50.0.11", 8000, "203.0.113.1", 80, TCP_SYN);
    let bound = parse(&dp.run(Hook::Egress, 0, &syn).unwrap().packet);
    // A reload removes every policy.
    let mut c = Config::parse(TOPOLOGY, "test").unwrap();
    c.policies.clear();
    let t = validate::validate(&c).unwrap();
    let d = dp
        .maps
        .plan
        .apply(&egress::plan::map_contents(
            &t,
            &egress::plan::plan(&t, "a"),
        ))
        .unwrap();
    assert!(d.removed >= 4, "policies removed from the maps: {d:?}");
    let ack = dp
        .run(
            Hook::Egress,
            0,
            &tcp("10.50.0.11", 8000, "203.0.113.1", 80, TCP_ACK),
        )
        .unwrap();
    assert_eq!(
        parse(&ack.packet).src,
        bound.src,
        "the established connection keeps its translation"
    );
    assert_eq!(parse(&ack.packet).sport, bound.sport);
    let fresh = tcp("10.50.0.11", 8001, "203.0.113.1", 80, TCP_SYN);
    let out = dp.run(Hook::Egress, 0, &fresh).unwrap();
    assert_eq!(
        out.packet, fresh,
        "a new connection follows the new plan (no policy: unchanged)"
    );
}

#[test]
fn tunnels_never_carry_packets_larger_than_the_uplink() {
    let (_net, mut dp) = datapath(TOPOLOGY);
    // 192.0.2.10 is shared with b: replies may come back through a tunnel, so the SYN of a
    // connection translated here is clamped too.
    let shared = packet::tcp_with_mss(ip("10.50.0.11"), ip("203.0.113.1"), 9000, 80, TCP_SYN, 1460);
    let out = dp.run(Hook::Egress, 0, &shared).unwrap();
    assert_eq!(
        packet::mss_of(&out.packet),
        1432,
        "shared address: MSS leaves room for the tunnel"
    );
    verify_checksums(&out.packet).unwrap();
    // 192.0.2.20 (beta, mark 42) is a only: its replies never travel in a tunnel.
    let own = packet::tcp_with_mss(ip("10.50.0.11"), ip("203.0.113.1"), 9001, 80, TCP_SYN, 1460);
    let out = dp.run(Hook::Egress, 42, &own).unwrap();
    assert_eq!(
        packet::mss_of(&out.packet),
        1460,
        "unshared address: MSS untouched"
    );

    // A full-size packet (not GSO) cannot be encapsulated into a 1500-byte uplink: refused and
    // counted, not lost silently in the device.
    let big = build(
        ip("10.50.0.11"),
        ip("203.0.113.200"),
        L4::Udp {
            sport: 9002,
            dport: 53,
        },
        &[0u8; 1472],
    );
    assert_eq!(big.len(), 14 + 1500);
    let before = dp.counter(Stat::EncapTooBig);
    let out = dp.run(Hook::Egress, 0, &big).unwrap();
    assert_eq!(
        out.verdict,
        egress::testrun::TC_ACT_SHOT,
        "too big for the tunnel"
    );
    assert_eq!(dp.counter(Stat::EncapTooBig), before + 1);
    // One that fits after the 28 bytes goes through.
    let fits = build(
        ip("10.50.0.11"),
        ip("203.0.113.200"),
        L4::Udp {
            sport: 9003,
            dport: 53,
        },
        &[0u8; 1444],
    );
    assert_eq!(dp.run(Hook::Egress, 0, &fits).unwrap().verdict, TC_ACT_OK);
}

/// The IP part of a frame (what an ICMP error quotes).
fn ip_part(frame: &[u8], len: usize) -> &[u8] {
    &frame[14..(14 + len).min(frame.len())]
}

/// ICMP errors about translated connections come back translated: the error's destination, the
/// quoted packet exactly as the socket sent it (addresses, port, checksums), the error's own
/// checksum; through the tunnel for a peer's connection; to the port's owner otherwise.
#[test]
fn icmp_errors_are_translated_back() {
    let (net, mut dp) = datapath(TOPOLOGY);
    let router4 = ip("198.51.100.254");
    let run = |dp: &mut TestDatapath, hook, p: &[u8]| dp.run(hook, 0, p).unwrap();

    // 1. A local UDP flow; the router says "fragmentation needed", quoting all of it.
    let udp = build(
        ip("10.50.0.11"),
        ip("203.0.113.1"),
        L4::Udp {
            sport: 5300,
            dport: 53,
        },
        b"query",
    );
    let sent = run(&mut dp, Hook::Egress, &udp).packet;
    let err = packet::icmp_error(router4, ip("192.0.2.10"), (3, 4), 1300, &sent, 1000);
    let before = dp.counter(Stat::IcmpErrorNat);
    let out = run(&mut dp, Hook::Ingress, &err);
    assert_eq!(out.verdict, TC_ACT_OK, "frag needed: delivered");
    assert_eq!(dp.counter(Stat::IcmpErrorNat), before + 1, "icmp_error_nat");
    assert_eq!(
        parse(&out.packet).dst,
        ip("10.50.0.11"),
        "to the socket's address"
    );
    verify_checksums(&out.packet).unwrap_or_else(|e| panic!("frag needed: {e}"));
    assert_eq!(
        ip_part(&packet::quoted_frame(&out.packet), 1000),
        ip_part(&udp, 1000),
        "the quoted packet is the socket's own, byte for byte"
    );

    // 2. A local TCP connection; time exceeded quoting only 8 bytes of TCP (no checksum).
    let syn = tcp("10.50.0.11", 5301, "203.0.113.1", 80, TCP_SYN);
    let sent = run(&mut dp, Hook::Egress, &syn).packet;
    let err = packet::icmp_error(router4, ip("192.0.2.10"), (11, 0), 0, &sent, 28);
    let out = run(&mut dp, Hook::Ingress, &err);
    assert_eq!(out.verdict, TC_ACT_OK);
    verify_checksums(&out.packet).unwrap_or_else(|e| panic!("time exceeded: {e}"));
    assert_eq!(
        ip_part(&packet::quoted_frame(&out.packet), 28),
        ip_part(&syn, 28),
        "time exceeded: the quoted header is the socket's"
    );

    // 3. IPv6: packet too big about a translated TCP connection.
    let syn6 = tcp("fd00:50::b", 5302, "2001:db8:beef::1", 443, TCP_SYN);
    let sent = run(&mut dp, Hook::Egress, &syn6).packet;
    let err = packet::icmp_error(
        ip("2001:db8:beef::1"),
        parse(&sent).src,
        (2, 0),
        1280,
        &sent,
        1000,
    );
    let out = run(&mut dp, Hook::Ingress, &err);
    assert_eq!(out.verdict, TC_ACT_OK, "packet too big: delivered");
    assert_eq!(parse(&out.packet).dst, ip("fd00:50::b"));
    verify_checksums(&out.packet).unwrap_or_else(|e| panic!("packet too big: {e}"));
    assert_eq!(
        ip_part(&packet::quoted_frame(&out.packet), 1000),
        ip_part(&syn6, 1000),
        "packet too big: the quoted packet is the socket's"
    );

    // 4. A peer's connection translated here: the error goes back to the peer through the
    // tunnel, translated.
    let inner = tcp("10.50.0.12", 6000, "203.0.113.1", 80, TCP_SYN);
    let sent = run(
        &mut dp,
        Hook::Ingress,
        &packet::gre_frame(B, A, conn_key(7), &inner),
    )
    .packet;
    let err = packet::icmp_error(router4, ip("192.0.2.10"), (3, 4), 1300, &sent, 1000);
    let before = dp.counter(Stat::IcmpErrorReencap);
    let out = run(&mut dp, Hook::Ingress, &err);
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "peer's error: sent on");
    assert_eq!(dp.counter(Stat::IcmpErrorReencap), before + 1);
    let back = check_encapsulated(
        "error to the peer",
        &net,
        &out.packet,
        egress::testrun::PEER_MAC,
        B,
        reply_key(7),
    );
    assert_eq!(parse(&back).dst, ip("10.50.0.12"));
    // As this server sent it on: one hop further.
    let inner_sent = packet::hopped(&inner);
    assert_eq!(
        ip_part(&packet::quoted_frame(&back), 1000),
        ip_part(&inner_sent, 1000),
        "the peer gets its socket's packet quoted"
    );

    // 5. The same error brought here by soft-unicast (in a tunnel): retargeted in place.
    let out = run(
        &mut dp,
        Hook::Ingress,
        &packet::gre_frame(B, A, soft_key(7), &err),
    );
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "tunnelled error: sent on");
    let back = check_encapsulated(
        "tunnelled error to the peer",
        &net,
        &out.packet,
        egress::testrun::PEER_MAC,
        B,
        reply_key(7),
    );
    assert_eq!(
        ip_part(&packet::quoted_frame(&back), 1000),
        ip_part(&inner_sent, 1000)
    );

    // 6. An error about b's port range (41000-42000) goes to b unchanged.
    let theirs = tcp("192.0.2.10", 41500, "203.0.113.1", 80, TCP_SYN);
    let err = packet::icmp_error(router4, ip("192.0.2.10"), (3, 4), 1300, &theirs, 1000);
    let before = dp.counter(Stat::SoftUnicast);
    let out = run(&mut dp, Hook::Ingress, &err);
    assert_eq!(
        dp.counter(Stat::SoftUnicast),
        before + 1,
        "soft-unicast by port"
    );
    let inner_out = check_encapsulated(
        "error to the owner",
        &net,
        &out.packet,
        egress::testrun::PEER_MAC,
        B,
        soft_key(7),
    );
    assert_eq!(
        &inner_out[14..],
        &packet::hopped(&err)[14..],
        "unchanged but for the TTL"
    );

    // 7. An error about nothing here: untouched.
    let nobody = tcp("192.0.2.10", 40500, "203.0.113.1", 80, TCP_SYN);
    let err = packet::icmp_error(router4, ip("192.0.2.10"), (3, 3), 0, &nobody, 1000);
    let before = dp.counter(Stat::IngressNoFlow);
    let out = run(&mut dp, Hook::Ingress, &err);
    assert_eq!((out.verdict, &out.packet), (TC_ACT_OK, &err), "untouched");
    assert_eq!(dp.counter(Stat::IngressNoFlow), before + 1);

    // 8. An error the peer returns about a connection this server forwarded (gamma → b).
    let fwd = tcp("10.50.0.11", 5400, "203.0.113.200", 80, TCP_SYN);
    run(&mut dp, Hook::Egress, &fwd);
    let err = packet::icmp_error(router4, ip("10.50.0.11"), (3, 4), 1300, &fwd, 1000);
    let before = dp.counter(Stat::ForwardedReply);
    let out = run(
        &mut dp,
        Hook::Ingress,
        &packet::gre_frame(B, A, reply_key(9), &err),
    );
    assert_eq!(out.verdict, TC_ACT_OK, "returned error delivered");
    assert_eq!(dp.counter(Stat::ForwardedReply), before + 1);
    assert_eq!(&out.packet[14..], &err[14..], "decapsulated, unchanged");
}

/// A UDP datagram of `len` payload bytes.
fn udp_datagram(src: &str, sport: u16, dst: &str, dport: u16, len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    build(ip(src), ip(dst), L4::Udp { sport, dport }, &payload)
}

/// Later fragments get what their datagram's first fragment got, in every direction; the
/// translated datagram, put back together, has valid checksums; a later fragment whose first
/// fragment was not seen never leaves untranslated.
#[test]
fn fragments_follow_their_first_fragment() {
    let (net, mut dp) = datapath(TOPOLOGY);
    let run = |dp: &mut TestDatapath, hook, p: &[u8]| dp.run(hook, 0, p).unwrap();
    let followed = |dp: &TestDatapath| dp.counter(Stat::FragmentFollowed);

    // 1. Local SNAT, IPv4 and IPv6: both fragments leave from the pool, the datagram whole.
    for (name, src, dst, want_src) in [
        ("v4", "10.50.0.11", "203.0.113.1", "192.0.2.10"),
        ("v6", "fd00:50::b", "2001:db8:beef::1", "2001:db8:7::b"),
    ] {
        let dgram = udp_datagram(src, 5353, dst, 53, 2000);
        let (first, later) = packet::fragments(&dgram, 1496, 0x4242);
        let f = run(&mut dp, Hook::Egress, &first);
        assert_eq!(f.verdict, TC_ACT_OK, "{name}: first fragment");
        assert_eq!(
            parse(&f.packet).src,
            ip(want_src),
            "{name}: first from the pool"
        );
        let before = followed(&dp);
        let l = run(&mut dp, Hook::Egress, &later);
        assert_eq!(l.verdict, TC_ACT_OK, "{name}: later fragment");
        assert_eq!(followed(&dp), before + 1, "{name}: fragment_followed");
        assert_eq!(
            parse(&l.packet).src,
            ip(want_src),
            "{name}: later from the pool"
        );
        if name == "v4" {
            assert!(
                packet::ipv4_header_ok(&l.packet),
                "{name}: later header checksum"
            );
        }
        let whole = packet::reassemble(&f.packet, &l.packet);
        verify_checksums(&whole).unwrap_or_else(|e| panic!("{name}: reassembled {e}"));
        let sport = parse(&whole).sport;

        // 2. The reply, fragmented, comes back to the socket in both pieces.
        let reply = udp_datagram(dst, 53, want_src, sport, 2000);
        let (rf, rl) = packet::fragments(&reply, 1496, 0x5151);
        let rf = run(&mut dp, Hook::Ingress, &rf);
        let rl = run(&mut dp, Hook::Ingress, &rl);
        assert_eq!(
            parse(&rf.packet).dst,
            ip(src),
            "{name}: reply first to the socket"
        );
        assert_eq!(
            parse(&rl.packet).dst,
            ip(src),
            "{name}: reply later to the socket"
        );
        verify_checksums(&packet::reassemble(&rf.packet, &rl.packet))
            .unwrap_or_else(|e| panic!("{name}: reply reassembled {e}"));
    }

    // 3. Forwarded (gamma, held by b): both fragments go to b in the tunnel.
    let dgram = udp_datagram("10.50.0.11", 5354, "203.0.113.200", 53, 1200);
    let (first, later) = packet::fragments(&dgram, 800, 0x4343);
    for (what, p) in [("first", &first), ("later", &later)] {
        let out = run(&mut dp, Hook::Egress, p);
        let inner = check_encapsulated_fragment(&net, &out.packet);
        assert_eq!(
            &inner[14..],
            &p[14..],
            "forwarded {what} fragment: unchanged inside"
        );
    }
    // b returns a fragmented reply: both pieces reach the socket, decapsulated.
    let reply = udp_datagram("203.0.113.200", 53, "10.50.0.11", 5354, 1200);
    let (rf, rl) = packet::fragments(&reply, 800, 0x4747);
    let before = followed(&dp);
    for (what, p) in [("first", &rf), ("later", &rl)] {
        let out = run(
            &mut dp,
            Hook::Ingress,
            &packet::gre_frame(B, A, reply_key(9), p),
        );
        assert_eq!(
            (out.verdict, &out.packet[14..]),
            (TC_ACT_OK, &p[14..]),
            "forwarded reply's {what} fragment: delivered decapsulated"
        );
    }
    assert_eq!(followed(&dp), before + 1, "the later one followed");

    // 4. A peer's datagram in the tunnel: translated here, both pieces; the later one then
    // passes egress as this server's own.
    let dgram = udp_datagram("10.50.0.12", 6000, "203.0.113.1", 53, 1200);
    let (first, later) = packet::fragments(&dgram, 800, 0x4444);
    let f = run(
        &mut dp,
        Hook::Ingress,
        &packet::gre_frame(B, A, conn_key(7), &first),
    );
    assert_eq!(
        dp.counter(Stat::PeerSnat),
        1,
        "peer's first fragment translated"
    );
    let before = followed(&dp);
    let l = run(
        &mut dp,
        Hook::Ingress,
        &packet::gre_frame(B, A, conn_key(7), &later),
    );
    assert_eq!(followed(&dp), before + 1, "peer's later fragment followed");
    assert_eq!(parse(&l.packet).src, ip("192.0.2.10"));
    verify_checksums(&packet::reassemble(&f.packet, &l.packet))
        .unwrap_or_else(|e| panic!("peer reassembled {e}"));
    let ours = dp.counter(Stat::Ours);
    let out = run(&mut dp, Hook::Egress, &l.packet);
    assert_eq!(
        (out.verdict, &out.packet),
        (TC_ACT_OK, &l.packet),
        "ours: untouched"
    );
    assert_eq!(dp.counter(Stat::Ours), ours + 1);
    // Another peer (c) sending a fragment under b's datagram key gets nothing.
    let stranger = packet::gre_frame([10, 50, 0, 13], A, conn_key(7), &later);
    let before = dp.counter(Stat::Fragment);
    assert_eq!(run(&mut dp, Hook::Ingress, &stranger).verdict, TC_ACT_SHOT);
    assert_eq!(
        dp.counter(Stat::Fragment),
        before + 1,
        "another peer's: drop_fragment"
    );

    // 5. A later fragment that overtook its first fragment: dropped towards a policy
    // destination, passed elsewhere, never translated or sent from the server's address.
    let dgram = udp_datagram("10.50.0.11", 5355, "203.0.113.1", 53, 1200);
    let (_, later) = packet::fragments(&dgram, 800, 0x4545);
    let before = dp.counter(Stat::Fragment);
    assert_eq!(run(&mut dp, Hook::Egress, &later).verdict, TC_ACT_SHOT);
    assert_eq!(dp.counter(Stat::Fragment), before + 1, "drop_fragment");
    let elsewhere = udp_datagram("10.50.0.11", 5355, "198.51.100.1", 53, 1200);
    let (_, later) = packet::fragments(&elsewhere, 800, 0x4646);
    let out = run(&mut dp, Hook::Egress, &later);
    assert_eq!(
        (out.verdict, &out.packet),
        (TC_ACT_OK, &later),
        "no policy: untouched"
    );
}

/// The inner packet of an encapsulated fragment sent to b (key 9), checked up to the inner
/// packet like `check_encapsulated` (fragments carry no verifiable transport checksum).
fn check_encapsulated_fragment(net: &egress::testrun::TestNet, out: &[u8]) -> Vec<u8> {
    assert_eq!(&out[6..12], &net.mac, "source MAC is the uplink's");
    let want = packet::gre_outer(A, B, conn_key(9), out.len() - 14 - 28);
    assert_eq!(
        &out[14..42],
        &want[..],
        "outer IPv4 + GRE header byte for byte"
    );
    let mut inner = out[..14].to_vec();
    inner.extend_from_slice(&out[42..]);
    inner
}

/// Unsolicited packets to a pool address, brought by soft-unicast, never become a peer's
/// connection, even when a policy covers the pool address itself (here 0.0.0.0/0): that would
/// claim a port, send the packet back to the announcer and round again.
#[test]
fn soft_unicast_strays_create_nothing_even_under_a_catch_all_policy() {
    let topology = format!(
        "{TOPOLOGY}\n[[policies]]\npool = \"acme\"\nmark = 99\ndestinations = [\"0.0.0.0/0\"]\n"
    );
    let (_net, mut dp) = datapath(&topology);
    // Whether it says it is soft-unicast (it matches no connection) or a connection (to a pool
    // address).
    for (key, counter) in [
        (soft_key(7), Stat::TunnelKind),
        (conn_key(7), Stat::PeerPolicy),
    ] {
        for (sport, dport) in [(80, 40500), (4444, 41500), (53, 2500)] {
            let stray = packet::gre_frame(
                B,
                A,
                key,
                &tcp("198.51.100.9", sport, "192.0.2.10", dport, TCP_SYN),
            );
            let f = Fixture {
                name: "a stray to a pool address in a tunnel",
                hook: Hook::Ingress,
                mark: 0,
                packet: stray,
                want: Want::Dropped,
                counter,
            };
            check(&mut dp, &f);
        }
    }
    assert_eq!(dp.maps.flows.iter().count(), 0, "no state created");
}

/// A second peer's packet on the first peer's connection tuple neither refreshes nor takes it.
#[test]
fn another_peer_cannot_touch_a_peers_connection() {
    let (_net, mut dp) = datapath(TOPOLOGY);
    let inner = tcp("10.50.0.12", 6100, "203.0.113.1", 80, TCP_SYN);
    let out = dp
        .run(
            Hook::Ingress,
            0,
            &packet::gre_frame(B, A, conn_key(7), &inner),
        )
        .unwrap();
    let port = parse(&out.packet).sport;
    let before: Vec<_> = dp.maps.flows.iter().map(|e| e.unwrap()).collect();
    for flags in [packet::TCP_RST, TCP_SYN, packet::TCP_FIN | TCP_ACK] {
        let theirs = tcp("10.50.0.12", 6100, "203.0.113.1", 80, flags);
        let f = Fixture {
            name: "c on b's connection",
            hook: Hook::Ingress,
            mark: 0,
            packet: packet::gre_frame([10, 50, 0, 13], A, conn_key(7), &theirs),
            want: Want::Dropped,
            counter: Stat::PeerPolicy,
        };
        check(&mut dp, &f);
    }
    let after: Vec<_> = dp.maps.flows.iter().map(|e| e.unwrap()).collect();
    assert_eq!(
        before, after,
        "b's entries untouched (times, flags, binding)"
    );
    let again = dp
        .run(
            Hook::Ingress,
            0,
            &packet::gre_frame(B, A, conn_key(7), &inner),
        )
        .unwrap();
    assert_eq!(parse(&again.packet).sport, port, "b keeps its port");
}

/// Every tunnel check is strict: GRE must be addressed to this server, and a forwarded
/// connection's replies (and ICMP errors about it) come back only from the peer it went to.
#[test]
fn tunnels_are_for_this_server_and_replies_from_their_own_peer() {
    let (_net, mut dp) = datapath(TOPOLOGY);
    let inner = tcp("10.50.0.12", 6200, "203.0.113.1", 80, TCP_SYN);
    let f = Fixture {
        name: "GRE from a peer to another fabric address",
        hook: Hook::Ingress,
        mark: 0,
        packet: packet::gre_frame(B, [10, 50, 0, 99], conn_key(7), &inner),
        want: Want::Dropped,
        counter: Stat::GreNotLocal,
    };
    check(&mut dp, &f);
    // a forwards a gamma connection to b; c answers in b's place.
    let syn = tcp("10.50.0.11", 5500, "203.0.113.200", 80, TCP_SYN);
    dp.run(Hook::Egress, 0, &syn).unwrap();
    let before: Vec<_> = dp.maps.flows.iter().map(|e| e.unwrap()).collect();
    let synack = tcp("203.0.113.200", 80, "10.50.0.11", 5500, TCP_SYN | TCP_ACK);
    let err = packet::icmp_error(
        ip("198.51.100.254"),
        ip("10.50.0.11"),
        (3, 4),
        1300,
        &syn,
        1000,
    );
    for (name, p) in [("reply", &synack), ("ICMP error", &err)] {
        let f = Fixture {
            name,
            hook: Hook::Ingress,
            mark: 0,
            packet: packet::gre_frame([10, 50, 0, 13], A, reply_key(9), p),
            want: Want::Dropped,
            counter: Stat::PeerPolicy,
        };
        check(&mut dp, &f);
    }
    let after: Vec<_> = dp.maps.flows.iter().map(|e| e.unwrap()).collect();
    assert_eq!(before, after, "the forwarded entry untouched");
    // From b itself, both are delivered.
    for p in [&synack, &err] {
        let before = dp.counter(Stat::ForwardedReply);
        let out = dp
            .run(Hook::Ingress, 0, &packet::gre_frame(B, A, reply_key(9), p))
            .unwrap();
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(
            dp.counter(Stat::ForwardedReply),
            before + 1,
            "from its peer"
        );
    }
}

/// A packet dropped after its connection was recorded (no room in the tunnel, no route) leaves
/// no entry behind: the port it claimed is free again.
#[test]
fn a_dropped_first_packet_holds_no_state() {
    let topology = format!(
        "{TOPOLOGY}\n[[policies]]\npool = \"acme\"\nmark = 99\ndestinations = [\"0.0.0.0/0\"]\n"
    );
    let (_net, mut dp) = datapath(&topology);
    // Forwarded (gamma → b), but too big for the tunnel and not GSO.
    let big = udp_datagram("10.50.0.11", 5600, "203.0.113.200", 53, 1472);
    let f = Fixture {
        name: "a forwarded first packet too big for the tunnel",
        hook: Hook::Egress,
        mark: 0,
        packet: big,
        want: Want::Dropped,
        counter: Stat::EncapTooBig,
    };
    check(&mut dp, &f);
    assert_eq!(dp.maps.flows.iter().count(), 0, "no forwarded entry left");
    // A peer's connection to a destination this server has no route to.
    let inner = tcp("10.50.0.12", 6300, "198.51.100.9", 80, TCP_SYN);
    let f = Fixture {
        name: "a peer's first packet with no route onward",
        hook: Hook::Ingress,
        mark: 0,
        packet: packet::gre_frame(B, A, conn_key(7), &inner),
        want: Want::Dropped,
        counter: Stat::NoRoute,
    };
    check(&mut dp, &f);
    assert_eq!(dp.maps.flows.iter().count(), 0, "no claim left");
}

/// A forwarded connection's tuple reused after the socket's FIN is a new connection: it takes
/// the path the plan in force gives (here: no policy any more, so untouched), not the old
/// connection's peer; a SYN on an open forwarded entry (a retransmission) keeps its peer.
#[test]
fn a_reopened_forwarded_tuple_follows_the_plan_in_force() {
    let (net, mut dp) = datapath(TOPOLOGY);
    let to_gamma = |sport: u16, flags: u8| tcp("10.50.0.11", sport, "203.0.113.200", 80, flags);
    for sport in [5100, 5101] {
        let out = dp.run(Hook::Egress, 0, &to_gamma(sport, TCP_SYN)).unwrap();
        check_encapsulated(
            "forward",
            &net,
            &out.packet,
            egress::testrun::PEER_MAC,
            B,
            conn_key(9),
        );
    }
    let fin = dp
        .run(Hook::Egress, 0, &to_gamma(5100, packet::TCP_FIN | TCP_ACK))
        .unwrap();
    check_encapsulated(
        "FIN",
        &net,
        &fin.packet,
        egress::testrun::PEER_MAC,
        B,
        conn_key(9),
    );
    // The plan changes: no policy sends gamma's traffic anywhere now.
    let mut c = Config::parse(TOPOLOGY, "test").unwrap();
    c.policies.clear();
    let t = validate::validate(&c).unwrap();
    dp.maps
        .plan
        .apply(&egress::plan::map_contents(
            &t,
            &egress::plan::plan(&t, "a"),
        ))
        .unwrap();
    let forwarded_before = dp.counter(Stat::ForwardEstablished);
    let retransmitted = dp.run(Hook::Egress, 0, &to_gamma(5101, TCP_SYN)).unwrap();
    check_encapsulated(
        "a SYN on an open forwarded entry",
        &net,
        &retransmitted.packet,
        egress::testrun::PEER_MAC,
        B,
        conn_key(9),
    );
    assert_eq!(
        dp.counter(Stat::ForwardEstablished),
        forwarded_before + 1,
        "the open connection keeps its peer"
    );
    let reopened = to_gamma(5100, TCP_SYN);
    let out = dp.run(Hook::Egress, 0, &reopened).unwrap();
    assert_eq!(
        out.packet, reopened,
        "the reopened tuple is a new connection under the new plan (no policy: untouched)"
    );
    assert_eq!(dp.counter(Stat::EgressNoPolicy), 1);
    let ports: Vec<u16> = dp
        .maps
        .flows
        .keys()
        .map(|k| u16::from_be(k.unwrap().src_port_be))
        .collect();
    assert_eq!(
        ports,
        [5101],
        "the closed connection's forwarded entry is gone, the open one stays"
    );
}

/// A probe request is reflected to its sender by the path tunnels take; while the agent has
/// fenced this server (`LOCAL.fenced`: its lease cannot be renewed) the reflection says so in
/// its pool bits. Replies of either kind go up to the agent's socket.
#[test]
fn probes_are_reflected_and_say_when_this_server_is_fenced() {
    let (net, mut dp) = datapath(TOPOLOGY);
    let inner = tcp("10.50.0.12", 1, "10.50.0.11", 1, TCP_SYN);
    let request = packet::gre_frame(
        B,
        A,
        tunnel::key(tunnel::PROBE, tunnel::PROBE_REQUEST),
        &inner,
    );
    for (fenced, bits) in [
        (false, tunnel::PROBE_REPLY),
        (true, tunnel::PROBE_REPLY_FENCED),
        (false, tunnel::PROBE_REPLY),
    ] {
        dp.maps.set_fenced(fenced).unwrap();
        let before = dp.counter(Stat::ProbeEchoed);
        let out = dp.run(Hook::Ingress, 0, &request).unwrap();
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "fenced {fenced}: sent back");
        let echoed = check_encapsulated(
            &format!("probe echo, fenced {fenced}"),
            &net,
            &out.packet,
            egress::testrun::PEER_MAC,
            B,
            tunnel::key(tunnel::PROBE, bits),
        );
        assert_eq!(
            echoed[14..],
            inner[14..],
            "the probe's payload is untouched"
        );
        assert_eq!(dp.counter(Stat::ProbeEchoed), before + 1);
    }
    for bits in [tunnel::PROBE_REPLY, tunnel::PROBE_REPLY_FENCED] {
        let f = Fixture {
            name: "a probe reply, fenced or not",
            hook: Hook::Ingress,
            mark: 0,
            packet: packet::gre_frame(B, A, tunnel::key(tunnel::PROBE, bits), &inner),
            want: Want::Unchanged,
            counter: Stat::ProbeReply,
        };
        check(&mut dp, &f);
    }
    let f = Fixture {
        name: "a probe of unknown pool bits",
        hook: Hook::Ingress,
        mark: 0,
        packet: packet::gre_frame(B, A, tunnel::key(tunnel::PROBE, 4), &inner),
        want: Want::Dropped,
        counter: Stat::TunnelKind,
    };
    check(&mut dp, &f);
}

/// Every path of the catalogue the benchmark times, at both frame sizes: output and counter
/// (each fixture a few times: fresh ones open a new connection each time).
#[test]
fn every_path_of_the_catalogue_at_both_frame_sizes() {
    let (net, mut dp) = datapath(TOPOLOGY);
    for frame in [64, 1500] {
        for f in egress::testrun::paths::catalogue() {
            // Sequence numbers distinct across frame sizes: fresh ones are new connections.
            for seq in (0..3).map(|i| i + frame as u32) {
                let input = f.prepare(&mut dp, frame, seq).unwrap();
                f.check(&mut dp, &net, frame, &input)
                    .unwrap_or_else(|e| panic!("{e:#}"));
            }
        }
    }
}

/// `egress agent --trace`: each sampled decision is logged with its counter, verdict and the
/// packet's addresses as it leaves; off, the verifier removes the step (the translated
/// programs are smaller than with it on).
#[test]
fn traced_decisions_name_the_counter_and_the_addresses_and_cost_nothing_off() {
    common::require_root();
    let net = egress::testrun::TestNet::enter();
    let mut on = TestDatapath::fixture_traced(&net, TOPOLOGY, 1).unwrap();
    let syn = tcp("10.50.0.11", 5000, "203.0.113.1", 80, TCP_SYN);
    on.run(Hook::Egress, 0, &syn).unwrap();
    let stray = tcp("198.51.100.7", 80, "192.0.2.10", 40001, TCP_ACK);
    on.run(Hook::Ingress, 0, &stray).unwrap();
    let lines = on.trace_lines();
    assert!(
        lines
            .iter()
            .any(|l| l == "snat_new pass: proto 6 192.0.2.10 -> 203.0.113.1"),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l == "ingress_no_flow pass: proto 6 198.51.100.7 -> 192.0.2.10"),
        "{lines:?}"
    );
    let mut off = TestDatapath::fixture(&net, TOPOLOGY).unwrap();
    off.run(Hook::Egress, 0, &syn).unwrap();
    assert!(off.trace_lines().is_empty());
    for prog in [
        egress_common::prog_names::TC_EGRESS,
        egress_common::prog_names::TC_INGRESS,
    ] {
        let (o, f) = (
            on.translated_size(prog).unwrap(),
            off.translated_size(prog).unwrap(),
        );
        assert!(f < o, "{prog}: {f} bytes off, {o} on");
    }
}
