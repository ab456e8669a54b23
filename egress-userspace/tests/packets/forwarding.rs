//! Forwarding and the tunnel: encapsulation, GRE from peers, soft-unicast, replies from
//! their own peer only, tunnel MTU, probes.

use super::*;

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
    let out = peer_connection_sent(&mut dp);
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
    // 192.0.2.20 (beta, mark 42) is held whole by a, but announced like any pool address: its
    // replies reaching another server come through a tunnel just the same.
    let whole = packet::tcp_with_mss(ip("10.50.0.11"), ip("203.0.113.1"), 9001, 80, TCP_SYN, 1460);
    let out = dp.run(Hook::Egress, 42, &whole).unwrap();
    assert_eq!(
        packet::mss_of(&out.packet),
        1432,
        "address held whole: MSS leaves room for the tunnel"
    );
    verify_checksums(&out.packet).unwrap();
    // A SYN whose data offset claims the option but whose IP length ends before it: the bytes
    // after the IP packet (padding) are not an option to clamp.
    let mut short =
        packet::tcp_with_mss(ip("10.50.0.11"), ip("203.0.113.1"), 9003, 80, TCP_SYN, 1460);
    short[16..18].copy_from_slice(&40u16.to_be_bytes());
    let short = packet::with_ttl(&short, short[22]); // (the header checksum again)
    let out = dp.run(Hook::Egress, 0, &short).unwrap();
    assert_eq!(
        out.packet.get(56..58),
        Some(&1460u16.to_be_bytes()[..]),
        "padding left alone"
    );
    verify_checksums(&out.packet).unwrap_or_else(|e| panic!("short SYN: {e}"));
    // IPv6 is never tunnelled: translated, its MSS untouched.
    let v6 = packet::tcp_with_mss(
        ip("fd00:50::b"),
        ip("2001:db8:beef::1"),
        9002,
        443,
        TCP_SYN,
        1440,
    );
    let out = dp.run(Hook::Egress, 0, &v6).unwrap();
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_ne!(out.packet, v6, "IPv6 SYN translated");
    let mss_at = 14 + 40 + 20 + 2;
    assert_eq!(
        out.packet[mss_at..mss_at + 2],
        1440u16.to_be_bytes(),
        "IPv6: MSS untouched"
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
    // UDP GSO (UDP_SEGMENT): no MSS to clamp; segments of 1452 bytes would leave the tunnel at
    // 1508. Refused and counted; 1444-byte segments (1500 once encapsulated) pass the check.
    let gso = build(
        ip("10.50.0.11"),
        ip("203.0.113.200"),
        L4::Udp {
            sport: 9004,
            dport: 443,
        },
        &[0u8; 400],
    );
    let before = dp.counter(Stat::EncapTooBig);
    let out = dp.run_gso(Hook::Egress, 1452, &gso).unwrap();
    assert_eq!(out.verdict, egress::testrun::TC_ACT_SHOT, "UDP GSO too big");
    assert_eq!(dp.counter(Stat::EncapTooBig), before + 1);
    // (The run's skb has a GSO size but no GSO type, which BPF_PROG_TEST_RUN cannot set and
    // `bpf_skb_adjust_room` wants: it ends at `drop_encap_failed`, past the size check.)
    let failed = dp.counter(Stat::EncapFailed);
    dp.run_gso(Hook::Egress, 1444, &gso).unwrap();
    assert_eq!(
        dp.counter(Stat::EncapTooBig),
        before + 1,
        "UDP GSO that fits"
    );
    assert_eq!(dp.counter(Stat::EncapFailed), failed + 1);
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

/// b opens `inner` through a; then every one of `intruders` is dropped with its counter,
/// leaving b's entries as they were (times, flags, binding), and b keeps its port.
fn intruders_leave_bs_connection_alone(inner: &[u8], intruders: impl IntoIterator<Item = Fixture>) {
    let (_net, mut dp) = datapath(TOPOLOGY);
    let open = |dp: &mut TestDatapath| {
        dp.run(
            Hook::Ingress,
            0,
            &packet::gre_frame(B, A, conn_key(7), inner),
        )
        .unwrap()
    };
    let out = open(&mut dp);
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "b's connection translated");
    let port = parse(&out.packet).sport;
    let before: Vec<_> = dp.maps.flows.iter().map(|e| e.unwrap()).collect();
    for f in intruders {
        check(&mut dp, &f);
    }
    let after: Vec<_> = dp.maps.flows.iter().map(|e| e.unwrap()).collect();
    assert_eq!(
        before, after,
        "b's entries untouched (times, flags, binding)"
    );
    assert_eq!(parse(&open(&mut dp).packet).sport, port, "b keeps its port");
}

/// A second peer's packet on the first peer's connection tuple neither refreshes nor takes it.
#[test]
fn another_peer_cannot_touch_a_peers_connection() {
    let inner = tcp("10.50.0.12", 6100, "203.0.113.1", 80, TCP_SYN);
    intruders_leave_bs_connection_alone(
        &inner,
        [packet::TCP_RST, TCP_SYN, packet::TCP_FIN | TCP_ACK].map(|flags| Fixture {
            name: "c on b's connection",
            hook: Hook::Ingress,
            mark: 0,
            packet: packet::gre_frame(
                [10, 50, 0, 13],
                A,
                conn_key(7),
                &tcp("10.50.0.12", 6100, "203.0.113.1", 80, flags),
            ),
            want: Want::Dropped,
            counter: Stat::PeerPolicy,
        }),
    );
}

/// A peer may send any inner source, this server's own addresses included: a peer's
/// connection recorded under a tuple of this host's own sockets is never used by them (its
/// replies would go back to the peer) nor ended by them. The socket's packets are dropped,
/// counted; the peer's connection goes on untouched.
#[test]
fn this_hosts_sockets_never_take_a_peers_connection_under_their_tuple() {
    // b "opens" 10.50.0.11:40100 → 203.0.113.1:80, a tuple of a's own sockets; a's socket then
    // uses it: a SYN, data, a FIN, a RST.
    let inner = tcp("10.50.0.11", 40100, "203.0.113.1", 80, TCP_SYN);
    intruders_leave_bs_connection_alone(
        &inner,
        [TCP_SYN, TCP_ACK, packet::TCP_FIN | TCP_ACK, packet::TCP_RST].map(|flags| Fixture {
            name: "a's socket on b's tuple",
            hook: Hook::Egress,
            mark: 0,
            packet: tcp("10.50.0.11", 40100, "203.0.113.1", 80, flags),
            want: Want::Dropped,
            counter: Stat::PeerTuple,
        }),
    );
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
    // A forwarded echo (identifier 0: its entry's remote port is 0 too): its reply is
    // delivered; an echo request in the reply tunnel, which the swapped tuple also matches,
    // is no reply.
    let echo = |request: bool, src: &str, dst: &str| {
        packet::build(
            ip(src),
            ip(dst),
            L4::Echo {
                id: 0,
                seq: 1,
                request,
            },
            b"ping",
        )
    };
    let out = dp
        .run(Hook::Egress, 0, &echo(true, "10.50.0.11", "203.0.113.200"))
        .unwrap();
    assert_eq!(out.verdict, TC_ACT_OK, "echo forwarded to b");
    for (request, want, counter) in [
        (true, Want::Dropped, Stat::TunnelKind),
        (false, Want::Unchanged, Stat::ForwardedReply),
    ] {
        let inner = echo(request, "203.0.113.200", "10.50.0.11");
        let before = dp.counter(counter);
        let out = dp
            .run(
                Hook::Ingress,
                0,
                &packet::gre_frame(B, A, reply_key(9), &inner),
            )
            .unwrap();
        assert_eq!(dp.counter(counter), before + 1, "echo request {request}");
        match want {
            Want::Dropped => assert_eq!(out.verdict, TC_ACT_SHOT),
            _ => assert_eq!((out.verdict, &out.packet[14..]), (TC_ACT_OK, &inner[14..])),
        }
    }
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

/// The ingress program leaves a hint on the peer's connections it sends out (the hint word and
/// a keyed tag of the packet's tuple), so that their second pass through `tc_egress` passes
/// without a lookup. The hint word alone (whatever the stack left in a local packet's control
/// block) counts for nothing: such a packet goes through the rules like any.
#[test]
fn the_ingress_programs_hint_passes_its_own_packet_and_nothing_else() {
    use egress_common::flow::{FLOW_OUTBOUND, FLOW_REVERSE, FlowKey, FlowValue};
    let (_net, mut dp) = datapath(TOPOLOGY);
    let out = peer_connection_sent(&mut dp);
    let sent = out.packet;
    assert_eq!(
        out.hint,
        dp.hint_for(&sent),
        "the peer's translated packet carries the hint and its tag"
    );
    let genuine = out.hint;
    let s = parse(&sent);
    // Other redirects and passes leave the control block alone.
    let reply = tcp("203.0.113.1", 80, "192.0.2.10", s.sport, TCP_SYN | TCP_ACK);
    let out = dp.run(Hook::Ingress, 0, &reply).unwrap();
    assert_eq!(dp.counter(Stat::ReplyReencap), 1);
    assert_eq!(
        out.hint,
        Hint::NONE,
        "a re-encapsulated reply carries no hint"
    );

    let key = |src: &str, sport: u16, dst: &str, dport: u16| {
        let (IpAddr::V4(a), IpAddr::V4(b)) = (ip(src), ip(dst)) else {
            unreachable!()
        };
        let mut k = FlowKey {
            src_port_be: sport.to_be(),
            dst_port_be: dport.to_be(),
            proto: 6,
            family: 4,
            ..FlowKey::default()
        };
        k.src[..4].copy_from_slice(&a.octets());
        k.dst[..4].copy_from_slice(&b.octets());
        k
    };
    let reverse_key = key("203.0.113.1", 80, "192.0.2.10", s.sport);
    let reverse: FlowValue = dp.maps.flows.get(&reverse_key, 0).unwrap();
    assert_eq!(reverse.kind, FLOW_REVERSE);

    let egress = |dp: &mut TestDatapath, hint: Hint, p: &[u8], stat: Stat| {
        let before = dp.counter(stat);
        let out = dp.run_hinted(Hook::Egress, 0, hint, p).unwrap();
        assert_eq!(dp.counter(stat), before + 1, "{stat:?} (hint {hint:x?})");
        out
    };
    // The usual case: ours either way: by the hint without a lookup, by rule 5 without it or
    // with the word alone.
    for (hint, stat) in [
        (genuine, Stat::OursHinted),
        (Hint::NONE, Stat::Ours),
        (Hint::LEFTOVER, Stat::Ours),
    ] {
        let out = egress(&mut dp, hint, &sent, stat);
        assert_eq!((out.verdict, &out.packet), (TC_ACT_OK, &sent));
    }
    // The hint needs no state: the packet it was left on passes even without its reverse
    // entry (the lookup it saves).
    dp.maps.flows.remove(&reverse_key).unwrap();
    let out = egress(&mut dp, genuine, &sent, Stat::OursHinted);
    assert_eq!((out.verdict, &out.packet), (TC_ACT_OK, &sent));
    dp.maps.flows.insert(reverse_key, reverse, 0).unwrap();
    // Its tuple also has an outbound entry (a local socket bound to the pool address): without
    // the hint, rule 3 translates it again; with it, the peer's translation stands.
    let mut outbound = reverse;
    outbound.kind = FLOW_OUTBOUND;
    outbound.port_be = 40999u16.to_be();
    outbound.tunnel = [0; 4]; // a local connection's
    dp.maps
        .flows
        .insert(key("192.0.2.10", s.sport, "203.0.113.1", 80), outbound, 0)
        .unwrap();
    let out = egress(&mut dp, Hint::LEFTOVER, &sent, Stat::SnatEstablished);
    assert_eq!(
        parse(&out.packet).sport,
        40999,
        "translated again with the hint word alone"
    );
    let out = egress(&mut dp, genuine, &sent, Stat::OursHinted);
    assert_eq!((out.verdict, &out.packet), (TC_ACT_OK, &sent));
    // A tag binds the hint to its packet: another packet of the connection (a different
    // tuple: another port), or a tag under another load's key, counts for nothing.
    let other = tcp("192.0.2.10", s.sport + 1, "203.0.113.1", 80, TCP_ACK);
    let out = egress(&mut dp, genuine, &other, Stat::SnatNew);
    assert_ne!(
        out.packet, other,
        "another tuple: a new connection of this host's"
    );
    let foreign = Hint {
        tag: egress_common::fabric::sent_tag(
            !0,
            [192, 0, 2, 10],
            [203, 0, 113, 1],
            s.sport.to_be(),
            80u16.to_be(),
            6,
        ),
        ..genuine
    };
    assert_ne!(foreign, genuine);
    let out = egress(&mut dp, foreign, &sent, Stat::SnatEstablished);
    assert_eq!(parse(&out.packet).sport, 40999, "a foreign tag: rule 3");
    // A leftover hint on a local connection's packet changes nothing: it is translated.
    let local = tcp("10.50.0.11", 7100, "203.0.113.1", 80, TCP_SYN);
    let out = egress(&mut dp, Hint::LEFTOVER, &local, Stat::SnatNew);
    assert_eq!(parse(&out.packet).src, ip("192.0.2.10"));
}
