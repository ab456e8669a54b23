//! This server's own connections: new, established, replies, malformed input, port
//! exhaustion, expiry, reopened tuples, own packets, dropped first packets.

use super::*;

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
    // Cut short with the IP length saying so (30 bytes: 10 of TCP); one byte longer than the
    // frame is a malformed IP header instead.
    let cut_to_44 = |mut p: Vec<u8>| {
        p.truncate(14 + 20 + 10);
        p[16..18].copy_from_slice(&30u16.to_be_bytes());
        p
    };
    let truncated_tcp = cut_to_44(syn.clone());
    let truncated_no_policy = cut_to_44(tcp("10.50.0.11", 5000, "198.51.100.1", 80, TCP_SYN));
    let mut longer = syn.clone();
    longer[16..18].copy_from_slice(&(syn.len() as u16 - 14 + 1).to_be_bytes());
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
    // An echo request of the other family's ICMP: IPv4 carrying protocol 58, IPv6 carrying 1.
    let echo = |src: &str, dst: &str, proto: u8| {
        let mut p = build(
            ip(src),
            ip(dst),
            L4::Echo {
                id: 1,
                seq: 1,
                request: true,
            },
            b"",
        );
        let at = if p[14] >> 4 == 4 { 14 + 9 } else { 14 + 6 };
        p[at] = proto;
        // The type an echo request has in the protocol it now claims.
        let l4 = if p[14] >> 4 == 4 { 34 } else { 54 };
        p[l4] = if proto == 58 { 128 } else { 8 };
        p
    };
    let icmpv6_in_v4 = echo("10.50.0.11", "203.0.113.1", 58);
    let icmp_in_v6 = echo("fd00:50::b", "2001:db8:beef::1", 1);
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
            name: "IPv4 total length one byte beyond the frame",
            hook: Hook::Egress,
            mark: 0,
            packet: longer.clone(),
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
            name: "an ICMPv6 echo request in IPv4 to a policy destination",
            hook: Hook::Egress,
            mark: 0,
            packet: icmpv6_in_v4,
            want: Want::Dropped,
            counter: Stat::UnsupportedL4,
        },
        Fixture {
            name: "an ICMP echo request in IPv6 to a policy destination",
            hook: Hook::Egress,
            mark: 0,
            packet: icmp_in_v6,
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
            name: "ingress: IPv4 total length one byte beyond the frame",
            hook: Hook::Ingress,
            mark: 0,
            packet: longer,
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

/// The programs stamp entries with CLOCK_MONOTONIC at a tick's resolution (the coarse clock,
/// read once per tick per CPU): a stamp is never ahead of the agent's clock nor more than a few
/// ticks behind it, and it moves on with time on every CPU (a CPU's copy that stopped at one
/// tick would make every connection it stamps look idle since then).
#[test]
fn entries_carry_the_monotonic_clock_and_it_moves_on() {
    use egress::flows::monotonic_ns;
    use egress_common::flow::FLOW_OUTBOUND;
    let (_net, mut dp) = datapath(TOPOLOGY);
    // Two ticks at HZ=100 (the copy may hold the previous tick's time, the coarse clock lags by
    // up to a tick), with room for a late tick on a loaded machine.
    const BEHIND: u64 = 60_000_000;
    // Above the 100 ms granule even for a stamp that lags by BEHIND.
    const PAUSE: std::time::Duration = std::time::Duration::from_millis(200);
    let stamp = |dp: &TestDatapath| {
        let entries: Vec<_> = dp.maps.flows.iter().map(|e| e.unwrap().1).collect();
        let out: Vec<_> = entries.iter().filter(|v| v.kind == FLOW_OUTBOUND).collect();
        assert_eq!(out.len(), 1, "one outbound entry: {entries:?}");
        (out[0].created_ns, out[0].last_seen_ns)
    };
    let send = |dp: &mut TestDatapath, flags: u8| {
        let out = dp.run(
            Hook::Egress,
            0,
            &tcp("10.50.0.11", 7100, "203.0.113.1", 80, flags),
        );
        assert_eq!(out.unwrap().verdict, TC_ACT_OK);
    };
    let within = |what: &str, at: u64, before: u64, after: u64| {
        assert!(
            at + BEHIND >= before && at <= after,
            "{what}: stamped {at}, clock read {before}..{after}"
        );
    };
    let before = monotonic_ns();
    send(&mut dp, TCP_SYN);
    let after = monotonic_ns();
    let (created, seen) = stamp(&dp);
    assert_eq!(created, seen, "a new entry is seen when it is created");
    within("created", created, before, after);
    // A test run runs on the calling thread's CPU: each CPU's copy in turn, twice, each time
    // past the granule so that the packet writes the entry's clock again.
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: a zeroed cpu_set_t filled by the kernel with the CPUs this thread may use.
    let allowed = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, size, &mut set),
            0,
            "affinity read"
        );
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect::<Vec<_>>()
    };
    for round in 0..2 * allowed.len() {
        let cpu = allowed[round % allowed.len()];
        // SAFETY: a zeroed cpu_set_t with one CPU set, for the calling thread.
        let pinned = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, size, &set)
        };
        assert_eq!(pinned, 0, "pinned to CPU {cpu}");
        std::thread::sleep(PAUSE);
        let before = monotonic_ns();
        send(&mut dp, TCP_ACK);
        let after = monotonic_ns();
        let (c, seen) = stamp(&dp);
        assert_eq!(c, created, "the creation time stays");
        within(&format!("round {round} on CPU {cpu}"), seen, before, after);
    }
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

/// The programs' own packets pass egress untouched because of what they are; nothing else does,
/// whatever the skb mark says.
#[test]
fn own_packets_are_recognised_by_what_they_are_never_by_the_mark() {
    let (_net, mut dp) = datapath(TOPOLOGY);
    // A peer's connection translated here, as the ingress program sends it out.
    let sent = peer_connection_sent(&mut dp).packet;
    let inner = tcp("10.50.0.12", 6000, "203.0.113.1", 80, TCP_SYN);
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

    // The pass filter: the reload admitted nothing new and passed nothing; a collection that
    // finds the connection's entries keeps its destination admitted.
    let origin = v4([203, 0, 113, 1]);
    assert!(!dp.maps.plan.filter.passes(4, &origin).unwrap());
    dp.maps.refine_filter().unwrap();
    assert!(
        !dp.maps.plan.filter.passes(4, &origin).unwrap(),
        "a live connection's destination is never passed early"
    );
    let again = dp.run(Hook::Egress, 0, &ack_of(8000)).unwrap();
    assert_eq!(parse(&again.packet).src, bound.src, "still translated");
    // Once its entries are gone (expired), the next collection passes the destination early:
    // its packets leave untouched, as the plan says, without a lookup.
    let keys: Vec<_> = dp.maps.flows.keys().map(|k| k.unwrap()).collect();
    for k in keys {
        dp.maps.flows.remove(&k).unwrap();
    }
    dp.maps.refine_filter().unwrap();
    assert!(dp.maps.plan.filter.passes(4, &origin).unwrap());
    let before = dp.counter(Stat::EgressNoPolicy);
    let late = dp.run(Hook::Egress, 0, &ack_of(8000)).unwrap();
    assert_eq!(late.packet, ack_of(8000), "passed untouched");
    assert_eq!(dp.counter(Stat::EgressNoPolicy), before + 1);
    // The pool addresses stay admitted (the plan still translates to them).
    assert!(!dp.maps.plan.filter.passes(4, &v4([192, 0, 2, 10])).unwrap());
}

fn ack_of(sport: u16) -> Vec<u8> {
    tcp("10.50.0.11", sport, "203.0.113.1", 80, TCP_ACK)
}

fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut d = [0; 16];
    d[..4].copy_from_slice(&a);
    d
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

/// A catch-all policy (`0.0.0.0/0`, `::/0`) translates every unicast destination but never the
/// host's own link traffic: multicast (IGMP, mDNS, neighbour discovery), broadcast (DHCP),
/// link-local, loopback and unspecified destinations pass untouched and make no state — nor
/// may a peer have its connection to one translated here.
#[test]
fn a_catch_all_policy_never_takes_link_local_multicast_or_broadcast() {
    let topology = format!(
        "{TOPOLOGY}
[[policies]]
pool = \"beta\"
mark = 43
destinations = [\"0.0.0.0/0\"]
[[policies]]
pool = \"acme\"
mark = 44
destinations = [\"::/0\"]
"
    );
    let (_net, mut dp) = datapath(&topology);
    let udp = |src: &str, dst: &str, dport| udp_datagram(src, 5353, dst, dport, 32);
    // ICMPv6 neighbour discovery (link-scoped) of `kind` to a unicast destination.
    let nd = |kind: u8, dst: &str| {
        build(
            ip("fd00:50::b"),
            ip(dst),
            L4::Raw { proto: 58 },
            &[
                kind, 0, 0, 0, 0, 0, 0, 0, 0xfd, 0, 0, 0x50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0c,
            ],
        )
    };
    let never = [
        (
            43,
            udp("10.50.0.11", "224.0.0.251", 5353),
            "IPv4 multicast (mDNS)",
        ),
        (43, udp("10.50.0.11", "239.1.2.3", 5000), "IPv4 multicast"),
        (
            43,
            udp("0.0.0.0", "255.255.255.255", 67),
            "broadcast (DHCP)",
        ),
        (43, udp("10.50.0.11", "240.0.0.1", 5000), "IPv4 reserved"),
        (
            43,
            tcp("10.50.0.11", 5000, "169.254.169.254", 80, TCP_SYN),
            "IPv4 link-local",
        ),
        (
            43,
            tcp("10.50.0.11", 5000, "127.0.0.1", 80, TCP_SYN),
            "IPv4 loopback",
        ),
        (
            43,
            tcp("10.50.0.11", 5000, "0.1.2.3", 80, TCP_SYN),
            "IPv4 0/8",
        ),
        (
            44,
            udp("fe80::1", "ff02::fb", 5353),
            "IPv6 multicast (mDNS)",
        ),
        (
            44,
            udp("fe80::1", "ff02::1:ff00:1", 5000),
            "IPv6 solicited-node",
        ),
        (
            44,
            tcp("fd00:50::b", 5000, "fe80::2", 80, TCP_SYN),
            "IPv6 link-local",
        ),
        (
            44,
            tcp("fd00:50::b", 5000, "::1", 80, TCP_SYN),
            "IPv6 loopback",
        ),
        (
            44,
            nd(135, "fd00:50::c"),
            "neighbour solicitation to a unicast address",
        ),
        (
            44,
            nd(136, "fd00:50::c"),
            "neighbour advertisement to a unicast address",
        ),
        (
            44,
            nd(133, "fd00:50::1"),
            "router solicitation to a unicast address",
        ),
    ];
    for (mark, p, name) in &never {
        let before = dp.counter(Stat::EgressNoPolicy);
        let out = dp.run(Hook::Egress, *mark, p).unwrap();
        assert_eq!(
            (out.verdict, &out.packet),
            (TC_ACT_OK, p),
            "{name}: passed untouched"
        );
        assert_eq!(
            dp.counter(Stat::EgressNoPolicy),
            before + 1,
            "{name}: egress_no_policy"
        );
        assert_eq!(dp.maps.flows.iter().count(), 0, "{name}: no state");
    }
    // The catch-alls do take unicast destinations: the rule is not "no policy at all".
    let v4 = tcp("10.50.0.11", 5001, "198.51.100.7", 80, TCP_SYN);
    let out = dp.run(Hook::Egress, 43, &v4).unwrap();
    assert_eq!(
        parse(&out.packet).src,
        ip("192.0.2.20"),
        "0.0.0.0/0 translates"
    );
    let v6 = tcp("fd00:50::b", 5001, "2001:db8:99::7", 80, TCP_SYN);
    let out = dp.run(Hook::Egress, 44, &v6).unwrap();
    assert_ne!(out.packet, v6, "::/0 translates");
    // NAT64's prefix begins with byte 0 but is an ordinary (coverable) destination.
    let nat64 = tcp("fd00:50::b", 5002, "64:ff9b::c633:6407", 80, TCP_SYN);
    let out = dp.run(Hook::Egress, 44, &nat64).unwrap();
    assert_ne!(out.packet, nat64, "::/0 translates to NAT64's prefix");
    // Any other ICMPv6 under the catch-all is untranslatable, as ever.
    let other = build(
        ip("fd00:50::b"),
        ip("fd00:50::c"),
        L4::Raw { proto: 58 },
        &[138, 0, 0, 0, 0, 0, 0, 0],
    );
    let before = dp.counter(Stat::UnsupportedL4);
    assert_eq!(
        dp.run(Hook::Egress, 44, &other).unwrap().verdict,
        TC_ACT_SHOT
    );
    assert_eq!(
        dp.counter(Stat::UnsupportedL4),
        before + 1,
        "type 138: not neighbour discovery"
    );
    assert_eq!(dp.counter(Stat::SnatNew), 3);
    // A peer's connection (b sends it for beta) to a multicast destination: refused.
    let conn = udp("10.50.0.12", "224.0.0.251", 5353);
    let before = dp.counter(Stat::PeerPolicy);
    let out = dp
        .run(
            Hook::Ingress,
            0,
            &packet::gre_frame(B, A, conn_key(8), &conn),
        )
        .unwrap();
    assert_eq!(
        out.verdict, TC_ACT_SHOT,
        "peer's multicast connection dropped"
    );
    assert_eq!(dp.counter(Stat::PeerPolicy), before + 1);
    // ... while its unicast one passes the policy (and, this test net having no route there,
    // stops at the route).
    let conn = udp("10.50.0.12", "198.51.100.7", 5353);
    let frame = packet::gre_frame(B, A, conn_key(8), &conn);
    assert_eq!(
        dp.run(Hook::Ingress, 0, &frame).unwrap().verdict,
        TC_ACT_SHOT
    );
    assert_eq!(
        dp.counter(Stat::PeerPolicy),
        before + 1,
        "unicast: policy passed"
    );
    assert_eq!(dp.counter(Stat::NoRoute), 1, "unicast: no route");
}
