//! Packet-exact tests of each path through BPF_PROG_TEST_RUN: the real programs, crafted
//! packets, and every output's checksums recomputed from scratch.

mod common;

use std::net::IpAddr;

use common::packet::{self, L4, TCP_ACK, TCP_SYN, build, parse, verify_checksums};
use egress::{
    config::Config,
    testrun::{Hook, Outcome, TC_ACT_OK, TC_ACT_SHOT, TestDatapath},
    validate,
};
use egress_common::stats::Stat;

/// Server `a` holds acme (192.0.2.10 40000-40999, and the IPv6 prefix) and beta (mark 42);
/// gamma (a longer prefix of the same destinations) is held by `b` only.
const TOPOLOGY: &str = r#"
server = "a"
[[locations]]
name = "l1"
latitude = 50.0
longitude = 8.0
[[datacenters]]
name = "d1"
location = "l1"
[[servers]]
name = "a"
id = 11
datacenter = "d1"
fabric = "10.50.0.11"
uplink = "eth0"
[[servers]]
name = "b"
id = 12
datacenter = "d1"
fabric = "10.50.0.12"
uplink = "eth0"
[[pools]]
name = "acme"
id = 7
ipv6_prefix = "2001:db8:7::/64"
[[pools.ipv4]]
address = "192.0.2.10"
shares = [{ server = "a", ports = "40000-40999" }, { server = "b", ports = "41000-42000" }]
[[pools]]
name = "beta"
id = 8
[[pools.ipv4]]
address = "192.0.2.20"
shares = [{ server = "a", ports = "2000-2999" }]
[[pools]]
name = "gamma"
id = 9
[[pools.ipv4]]
address = "192.0.2.30"
shares = [{ server = "b", ports = "2000-2999" }]
[[policies]]
pool = "acme"
destinations = ["203.0.113.0/24", "2001:db8:beef::/48"]
[[policies]]
pool = "beta"
mark = 42
destinations = ["203.0.113.0/24"]
[[policies]]
pool = "gamma"
destinations = ["203.0.113.128/25"]
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn datapath(toml: &str) -> TestDatapath {
    common::require_root();
    let t = validate::validate(&Config::parse(toml, "test").unwrap()).unwrap();
    TestDatapath::new(&t, "a").expect("programs load and the plan is written")
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

fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Vec<u8> {
    build(
        ip(src),
        ip(dst),
        L4::Tcp {
            sport,
            dport,
            flags,
        },
        b"",
    )
}

#[test]
fn egress_fixtures() {
    let mut dp = datapath(TOPOLOGY);
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
            name: "longest prefix picks a pool this server does not hold → unchanged, counted",
            hook: Hook::Egress,
            mark: 0,
            packet: tcp("10.50.0.11", 5004, "203.0.113.200", 80, TCP_SYN),
            want: Want::Unchanged,
            counter: Stat::PoolNotHeld,
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
    let mut dp = datapath(TOPOLOGY);
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
    let mut dp = datapath(TOPOLOGY);
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
    let mut fragment = syn.clone();
    fragment[20] = 0x20; // MF
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
            name: "IPv4 options run past the end",
            hook: Hook::Egress,
            mark: 0,
            packet: ip_cut.clone(),
            want: Want::Dropped,
            counter: Stat::TruncatedL4,
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
            name: "fragment to a policy destination",
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
            counter: Stat::IngressNoFlow,
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
    let mut dp = datapath(&small);
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
    let mut dp = datapath(TOPOLOGY);
    // An open TCP connection and one that has seen a FIN.
    dp.run(
        Hook::Egress,
        0,
        &tcp("10.50.0.11", 7000, "203.0.113.1", 80, TCP_SYN),
    )
    .unwrap();
    dp.run(
        Hook::Egress,
        0,
        &tcp("10.50.0.11", 7001, "203.0.113.1", 80, TCP_SYN),
    )
    .unwrap();
    dp.run(
        Hook::Egress,
        0,
        &tcp(
            "10.50.0.11",
            7001,
            "203.0.113.1",
            80,
            packet::TCP_FIN | TCP_ACK,
        ),
    )
    .unwrap();
    let count = |dp: &TestDatapath| dp.maps.flows.keys().count();
    assert_eq!(count(&dp), 4, "two connections, two entries each");

    let now = flows::monotonic_ns();
    assert_eq!(
        flows::collect(&mut dp.maps.flows, now).unwrap(),
        0,
        "nothing is idle yet"
    );
    let removed = flows::collect(&mut dp.maps.flows, now + 11 * 1_000_000_000).unwrap();
    assert_eq!(removed, 1, "the closing connection goes after 10 s");
    assert_eq!(count(&dp), 2, "with both of its entries");
    let removed = flows::collect(&mut dp.maps.flows, now + 3601 * 1_000_000_000).unwrap();
    assert_eq!(removed, 1, "the open one after an hour");
    assert_eq!(count(&dp), 0);

    // The port is free again: the same connection gets a binding anew.
    let out = dp
        .run(
            Hook::Egress,
            0,
            &tcp("10.50.0.11", 7000, "203.0.113.1", 80, TCP_SYN),
        )
        .unwrap();
    assert_eq!(out.verdict, TC_ACT_OK);
}
