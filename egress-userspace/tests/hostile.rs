//! Hostile input, packet-exact (BPF_PROG_TEST_RUN): what an attacker on the internet, or one
//! able to spoof a fabric address, can send, and the invariant each attack must not break — no
//! state created, no port taken, the established connection intact, the right counter moved.
//! End to end in a multi-server lab: `tests/adversarial.rs`.

mod common;

use egress::flows;
use egress::testrun::{
    FIXTURE_TOPOLOGY as TOPOLOGY, Hook, TC_ACT_OK, TC_ACT_SHOT, TestDatapath, TestNet,
    packet::{
        self, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, gre_frame, parse, tcp, verify_checksums, with_ttl,
    },
};
use egress_common::{fabric::tunnel, stats::Stat};

const NS: u64 = 1_000_000_000;
const TC_ACT_REDIRECT: u32 = 7;
/// This server (a) and its peers b, c in the fixture.
const A: [u8; 4] = [10, 50, 0, 11];
const B: [u8; 4] = [10, 50, 0, 12];

fn datapath_with(capacity: u32) -> (TestNet, TestDatapath) {
    common::require_root();
    let net = TestNet::enter();
    let dp = TestDatapath::fixture_with_flow_capacity(&net, TOPOLOGY, capacity)
        .expect("programs load and the plan is written");
    (net, dp)
}

/// Opens a local connection from `sport` to the origin and returns its translated port; with
/// `reply`, the origin answers once.
fn open(dp: &mut TestDatapath, sport: u16, reply: bool) -> Option<u16> {
    let out = dp
        .run(
            Hook::Egress,
            0,
            &tcp("10.50.0.11", sport, "203.0.113.1", 80, TCP_SYN),
        )
        .unwrap();
    if out.verdict != TC_ACT_OK {
        return None;
    }
    let port = parse(&out.packet).sport;
    if reply {
        let synack = tcp("203.0.113.1", 80, "192.0.2.10", port, TCP_SYN | TCP_ACK);
        let back = dp.run(Hook::Ingress, 0, &synack).unwrap();
        assert_eq!(back.verdict, TC_ACT_OK);
        assert_eq!(
            parse(&back.packet).dport,
            sport,
            "the reply is translated back"
        );
    }
    Some(port)
}

/// The translated source port of the connection's next packet (and its verdict is a pass).
fn port_of(dp: &mut TestDatapath, sport: u16) -> u16 {
    let out = dp
        .run(
            Hook::Egress,
            0,
            &tcp("10.50.0.11", sport, "203.0.113.1", 80, TCP_ACK),
        )
        .unwrap();
    assert_eq!(out.verdict, TC_ACT_OK);
    parse(&out.packet).sport
}

fn entries(dp: &TestDatapath) -> usize {
    dp.maps.flows.keys().count()
}

/// A full table refuses new connections, counted, and never evicts an established one; the
/// collector makes room by dropping unreplied connections first.
#[test]
fn a_full_flow_table_refuses_new_connections_and_keeps_established_ones() {
    const CAPACITY: u32 = 64;
    let (_net, mut dp) = datapath_with(CAPACITY);
    let established = open(&mut dp, 9000, true).expect("the first connection gets a port");

    // Unreplied connections (a SYN flood from local sockets, or origins that never answer)
    // until the table refuses one.
    let mut opened = 0;
    let refused_at = (9001..9001 + CAPACITY as u16)
        .find(|&sport| {
            let ok = open(&mut dp, sport, false).is_some();
            opened += u32::from(ok);
            !ok
        })
        .expect("a table of 64 entries refuses a 33rd connection");
    assert_eq!(dp.counter(Stat::FlowTableFull), 1, "the refusal is counted");
    let mut snapshot = flows::Snapshot::read(&dp.maps.flows).unwrap();
    snapshot.sort();
    assert!(snapshot.batched, "read with BPF_MAP_LOOKUP_BATCH");
    assert_eq!(snapshot.len(), entries(&dp), "every entry, once");
    assert!(
        opened >= 30,
        "{opened} connections fit in {CAPACITY} entries"
    );
    let n = entries(&dp);
    assert!(
        n <= CAPACITY as usize && n.is_multiple_of(2),
        "{n} entries: whole connections only, no half left by the refused one"
    );
    assert_eq!(
        port_of(&mut dp, 9000),
        established,
        "the established connection keeps its port"
    );
    let reply = tcp("203.0.113.1", 80, "192.0.2.10", established, TCP_ACK);
    let back = dp.run(Hook::Ingress, 0, &reply).unwrap();
    assert_eq!(parse(&back.packet).dport, 9000, "and its replies");

    // Under pressure, the collector drops the unreplied connections idle for a second.
    let now = flows::monotonic_ns();
    let done = flows::collect(&mut dp.maps.flows, now + 2 * NS, CAPACITY).unwrap();
    assert_eq!(done.expired, 0, "nothing has timed out");
    assert_eq!(
        done.early_dropped as u32, opened,
        "every unreplied connection"
    );
    assert_eq!(entries(&dp), 2, "the established connection alone is left");
    assert!(
        open(&mut dp, refused_at, false).is_some(),
        "the refused connection gets a port now"
    );
    assert_eq!(port_of(&mut dp, 9000), established);

    // Without pressure, unreplied connections are left to their (short) timeout.
    let done = flows::collect(&mut dp.maps.flows, now + 2 * NS, CAPACITY).unwrap();
    assert_eq!((done.expired, done.early_dropped), (0, 0));
}

/// The collector works from a snapshot: a connection that saw a packet after it was read must
/// not be deleted.
#[test]
fn the_collector_spares_a_connection_active_since_its_snapshot() {
    let (_net, mut dp) = datapath_with(1024);
    open(&mut dp, 9100, false).unwrap();
    let now = flows::monotonic_ns();
    // The race itself (a packet between snapshot and delete) cannot be timed from here; the
    // re-read that guards against it can be checked directly.
    let key = *dp.maps.flows.keys().next().unwrap().as_ref().unwrap();
    let mut v = dp.maps.flows.get(&key, 0).unwrap();
    v.last_seen_ns += 1;
    assert!(
        flows::moved(&dp.maps.flows, &key, &v),
        "a changed entry counts as active"
    );
    v.last_seen_ns -= 1;
    assert!(
        !flows::moved(&dp.maps.flows, &key, &v),
        "an unchanged one not"
    );
    let done = flows::collect(&mut dp.maps.flows, now + 31 * NS, 1024).unwrap();
    assert_eq!(done.expired, 1, "an unreplied connection goes after 30 s");
}

/// A RST or FIN from the internet with a made-up sequence number must not cost a live
/// connection its translation: a reply's RST or FIN never shortens the timeout, whether the
/// socket answers it (a challenge ACK) or drops it silently (out of the window); only the
/// socket's own do.
#[test]
fn spoofed_rst_and_fin_do_not_cut_a_live_connection() {
    let (_net, mut dp) = datapath_with(1024);
    let port = open(&mut dp, 9200, true).unwrap();
    let now = flows::monotonic_ns();
    let collect = |dp: &mut TestDatapath, s: u64| {
        flows::collect(&mut dp.maps.flows, now + s * NS, 1024)
            .unwrap()
            .expired
    };

    // The spoofed RST arrives and is delivered (the socket judges its sequence number) ...
    let rst = tcp("203.0.113.1", 80, "192.0.2.10", port, TCP_RST);
    let out = dp.run(Hook::Ingress, 0, &rst).unwrap();
    assert_eq!(out.verdict, TC_ACT_OK);
    // ... and the socket's challenge ACK follows.
    assert_eq!(port_of(&mut dp, 9200), port);
    assert_eq!(collect(&mut dp, 60), 0, "alive a minute later");

    // A spoofed FIN: the connection keeps its full timeout.
    let fin = tcp("203.0.113.1", 80, "192.0.2.10", port, TCP_FIN | TCP_ACK);
    assert_eq!(dp.run(Hook::Ingress, 0, &fin).unwrap().verdict, TC_ACT_OK);
    assert_eq!(collect(&mut dp, 600), 0, "alive ten minutes later");
    assert_eq!(entries(&dp), 2);

    // A blind spoofed RST (out of the window: the socket drops it without a word) as the
    // latest packet: the idle connection keeps its full timeout.
    let out = dp.run(Hook::Ingress, 0, &rst).unwrap();
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(collect(&mut dp, 900), 0, "alive fifteen minutes later");

    // The socket's own RST ends it soon.
    let own = tcp("10.50.0.11", 9200, "203.0.113.1", 80, TCP_RST);
    assert_eq!(dp.run(Hook::Egress, 0, &own).unwrap().verdict, TC_ACT_OK);
    assert_eq!(collect(&mut dp, 11), 1, "the socket's RST ends it");
    assert_eq!(entries(&dp), 0);
    assert_eq!(dp.counter(Stat::SnatNew), 1);
}

/// The socket's RST ends its connection even when it comes right after a reply: an entry's
/// clock is written at most every 100 ms, but a RST always stamps it (the agent orders the RST
/// against the latest reply by the two entries' clocks).
#[test]
fn the_sockets_rst_right_after_a_reply_ends_the_connection() {
    let (_net, mut dp) = datapath_with(1024);
    let port = open(&mut dp, 9250, true).unwrap();
    let pause = |ms| std::thread::sleep(std::time::Duration::from_millis(ms));
    // Past the clock's granule: the next packets each way write their entry's clock, the
    // reply's 50 ms after the socket's (more than two CPUs' clocks may differ).
    pause(150);
    let data = tcp("10.50.0.11", 9250, "203.0.113.1", 80, TCP_ACK);
    assert_eq!(dp.run(Hook::Egress, 0, &data).unwrap().verdict, TC_ACT_OK);
    pause(50);
    let reply = tcp("203.0.113.1", 80, "192.0.2.10", port, TCP_ACK);
    assert_eq!(dp.run(Hook::Ingress, 0, &reply).unwrap().verdict, TC_ACT_OK);
    pause(30);
    // The socket's RST, 80 ms after its last packet (within the granule).
    let own = tcp("10.50.0.11", 9250, "203.0.113.1", 80, TCP_RST);
    assert_eq!(dp.run(Hook::Egress, 0, &own).unwrap().verdict, TC_ACT_OK);
    let now = flows::monotonic_ns();
    let done = flows::collect(&mut dp.maps.flows, now + 11 * NS, 1024).unwrap();
    assert_eq!(done.expired, 1, "the socket's RST ends it after 10 s");
    assert_eq!(entries(&dp), 0);
}

/// `frame` with its IP length field (IPv4 total length, IPv6 payload length) saying `more`
/// bytes beyond the frame.
fn longer_than_the_frame(frame: &[u8], more: u16) -> Vec<u8> {
    let mut p = frame.to_vec();
    let at = if p[14] >> 4 == 4 { 14 + 2 } else { 14 + 4 };
    let len = u16::from_be_bytes([p[at], p[at + 1]]) + more;
    p[at..at + 2].copy_from_slice(&len.to_be_bytes());
    p
}

/// A packet whose IP length says more than the frame holds is malformed wherever it meets the
/// datapath: never translated, never carried through a tunnel (the peer would count it
/// against an innocent fabric), never given state. Arriving, it is passed as malformed (the
/// stack drops it); leaving, dropped.
#[test]
fn a_length_beyond_the_frame_is_malformed_never_translated_or_tunnelled() {
    let (_net, mut dp) = datapath_with(1024);
    let port = open(&mut dp, 9500, true).unwrap();
    let stats = |dp: &TestDatapath| {
        [
            Stat::IngressMalformed,
            Stat::EgressMalformed,
            Stat::SoftUnicast,
            Stat::ReverseNat,
            Stat::SnatNew,
            Stat::SnatEstablished,
        ]
        .map(|s| dp.counter(s))
    };
    let arriving = [
        // To a port of 192.0.2.10 that b owns (soft-unicast), and a reply of the connection.
        (
            "soft-unicast",
            tcp("203.0.113.1", 80, "192.0.2.10", 41500, TCP_ACK),
        ),
        ("reply", tcp("203.0.113.1", 80, "192.0.2.10", port, TCP_ACK)),
    ];
    for (name, whole) in arriving {
        // The whole packet takes its path (the length is what makes the difference) ...
        let out = dp.run(Hook::Ingress, 0, &whole).unwrap();
        assert_ne!(out.packet, whole, "{name}: a whole packet takes its path");
        for more in [1, 1000] {
            let p = longer_than_the_frame(&whole, more);
            let before = stats(&dp);
            let flows: Vec<_> = dp.maps.flows.iter().map(|e| e.unwrap()).collect();
            let out = dp.run(Hook::Ingress, 0, &p).unwrap();
            assert_eq!(
                out.verdict, TC_ACT_OK,
                "{name} +{more}: passed to the stack"
            );
            assert_eq!(out.packet, p, "{name} +{more}: untouched");
            let mut want = before;
            want[0] += 1;
            assert_eq!(
                stats(&dp),
                want,
                "{name} +{more}: counted as ingress_malformed only"
            );
            let after: Vec<_> = dp.maps.flows.iter().map(|e| e.unwrap()).collect();
            assert_eq!(flows, after, "{name} +{more}: no flow entry touched");
        }
    }
    let leaving = [
        (
            "established",
            tcp("10.50.0.11", 9500, "203.0.113.1", 80, TCP_ACK),
        ),
        ("new", tcp("10.50.0.11", 9501, "203.0.113.1", 80, TCP_SYN)),
        (
            "IPv6",
            tcp("2001:db8:100::11", 9502, "2001:db8:f::1", 80, TCP_SYN),
        ),
    ];
    for (name, whole) in leaving {
        let p = longer_than_the_frame(&whole, 1);
        let before = stats(&dp);
        let flows = entries(&dp);
        let out = dp.run(Hook::Egress, 0, &p).unwrap();
        assert_eq!(out.verdict, TC_ACT_SHOT, "{name}: dropped");
        let mut want = before;
        want[1] += 1;
        assert_eq!(stats(&dp), want, "{name}: counted as egress_malformed only");
        assert_eq!(entries(&dp), flows, "{name}: no flow entry made");
    }
}

/// A host socket that sends from a translated endpoint of a local connection (a pool address
/// configured on the host, the very port) is not "already translated": it is a connection of
/// its own, translated to a port of its own, and cannot speak in the other's name.
#[test]
fn a_host_socket_on_a_translated_endpoint_is_not_taken_as_already_translated() {
    let (_net, mut dp) = datapath_with(1024);
    let port = open(&mut dp, 9600, true).unwrap();
    let imposter = tcp("192.0.2.10", port, "203.0.113.1", 80, TCP_ACK);
    let out = dp.run(Hook::Egress, 0, &imposter).unwrap();
    assert_eq!(dp.counter(Stat::Ours), 0, "not passed as ours");
    assert_eq!(out.verdict, TC_ACT_OK);
    let p = parse(&out.packet);
    assert_eq!(p.src.to_string(), "192.0.2.10");
    assert_ne!(p.sport, port, "translated to a port of its own");
    assert_eq!(dp.counter(Stat::SnatNew), 2);
    // The original connection still gets its replies.
    let reply = tcp("203.0.113.1", 80, "192.0.2.10", port, TCP_ACK);
    let back = dp.run(Hook::Ingress, 0, &reply).unwrap();
    assert_eq!(
        parse(&back.packet).dport,
        9600,
        "the original socket's reply"
    );
}

/// Runs `p` on ingress and checks that it was dropped with `stat` and changed no flow entry.
fn refused(dp: &mut TestDatapath, name: &str, p: &[u8], stat: Stat) {
    let before: Vec<_> = dp.maps.flows.iter().map(|e| e.unwrap()).collect();
    let count = dp.counter(stat);
    let out = dp.run(Hook::Ingress, 0, p).unwrap();
    assert_eq!(out.verdict, TC_ACT_SHOT, "{name}: dropped");
    assert_eq!(
        dp.counter(stat),
        count + 1,
        "{name}: {} counted",
        stat.name()
    );
    let after: Vec<_> = dp.maps.flows.iter().map(|e| e.unwrap()).collect();
    assert_eq!(before, after, "{name}: no flow entry created or touched");
}

/// The GRE key says what a tunnel packet carries; a packet whose kind does not fit what it
/// meets here is dropped and creates nothing: a soft-unicast packet only ever meets an existing
/// connection, a reply only a connection forwarded to that very peer.
#[test]
fn a_tunnel_packet_is_taken_only_as_the_kind_it_says() {
    let (_net, mut dp) = datapath_with(1024);
    let key = |kind| tunnel::key(kind, 7);
    // A peer-connection-shaped packet (b's socket to an origin), under each other kind.
    let conn = tcp("10.50.0.12", 6000, "203.0.113.1", 80, TCP_SYN);
    refused(
        &mut dp,
        "a connection sent as soft-unicast",
        &gre_frame(B, A, key(tunnel::SOFT_UNICAST), &conn),
        Stat::TunnelKind,
    );
    refused(
        &mut dp,
        "a connection sent as a reply",
        &gre_frame(B, A, key(tunnel::REPLY), &conn),
        Stat::TunnelKind,
    );
    refused(
        &mut dp,
        "a key without a kind",
        &gre_frame(B, A, 7, &conn),
        Stat::TunnelKind,
    );

    // A connection translated here and one forwarded from here (gamma → b).
    let port = open(&mut dp, 9300, true).unwrap();
    let fwd = tcp("10.50.0.11", 9301, "203.0.113.200", 80, TCP_SYN);
    assert_eq!(dp.run(Hook::Egress, 0, &fwd).unwrap().verdict, TC_ACT_OK);
    let reply_here = tcp("203.0.113.1", 80, "192.0.2.10", port, TCP_ACK);
    let reply_fwd = tcp("203.0.113.200", 80, "10.50.0.11", 9301, TCP_SYN | TCP_ACK);
    refused(
        &mut dp,
        "a reply to a translation made here, sent as a reply of a forwarded connection",
        &gre_frame(B, A, key(tunnel::REPLY), &reply_here),
        Stat::TunnelKind,
    );
    refused(
        &mut dp,
        "a reply to a translation made here, sent as a connection",
        &gre_frame(B, A, key(tunnel::CONNECTION), &reply_here),
        Stat::PeerPolicy,
    );
    refused(
        &mut dp,
        "a forwarded connection's reply sent as soft-unicast",
        &gre_frame(B, A, tunnel::key(tunnel::SOFT_UNICAST, 9), &reply_fwd),
        Stat::TunnelKind,
    );
    // Each as the kind it is: taken.
    let out = dp
        .run(
            Hook::Ingress,
            0,
            &gre_frame(B, A, key(tunnel::SOFT_UNICAST), &reply_here),
        )
        .unwrap();
    assert_eq!(
        (out.verdict, parse(&out.packet).dport),
        (TC_ACT_OK, 9300),
        "soft-unicast reply delivered"
    );
    let out = dp
        .run(
            Hook::Ingress,
            0,
            &gre_frame(B, A, tunnel::key(tunnel::REPLY, 9), &reply_fwd),
        )
        .unwrap();
    assert_eq!(out.verdict, TC_ACT_OK, "forwarded reply delivered");
    assert_eq!(dp.counter(Stat::ForwardedReply), 1);
}

/// Every packet this server sends on to another host is a router hop: its (inner) TTL goes down
/// by one, with a valid checksum, and at 1 it is dropped, counted, leaving nothing behind. A
/// forwarding loop dies out.
#[test]
fn every_hop_decrements_the_ttl_and_drops_at_one() {
    let (_net, mut dp) = datapath_with(1024);
    // Soft-unicast: a packet for b's port range of 192.0.2.10.
    let stray = tcp("203.0.113.1", 80, "192.0.2.10", 41500, TCP_ACK);
    refused(
        &mut dp,
        "soft-unicast at TTL 1",
        &with_ttl(&stray, 1),
        Stat::TtlExceeded,
    );
    let out = dp.run(Hook::Ingress, 0, &with_ttl(&stray, 2)).unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "soft-unicast at TTL 2: sent");
    let inner = inner_of(&out.packet);
    assert_eq!(inner[14 + 8], 1, "soft-unicast: TTL 2 → 1");
    verify_checksums(&inner).unwrap();

    // A peer's connection: translated and sent to the origin.
    let conn = tcp("10.50.0.12", 6000, "203.0.113.1", 80, TCP_SYN);
    let conn_key = tunnel::key(tunnel::CONNECTION, 7);
    refused(
        &mut dp,
        "a peer's new connection at TTL 1",
        &gre_frame(B, A, conn_key, &with_ttl(&conn, 1)),
        Stat::TtlExceeded,
    );
    assert_eq!(entries(&dp), 0, "its claim released");
    let out = dp
        .run(Hook::Ingress, 0, &gre_frame(B, A, conn_key, &conn))
        .unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(out.packet[14 + 8], 63, "peer SNAT: TTL 64 → 63");
    verify_checksums(&out.packet).unwrap();
    let port = parse(&out.packet).sport;

    // The origin's reply, sent on to b.
    let reply = tcp("203.0.113.1", 80, "192.0.2.10", port, TCP_SYN | TCP_ACK);
    // (It refreshes its connection's entry like any reply, then is dropped.)
    let out = dp.run(Hook::Ingress, 0, &with_ttl(&reply, 1)).unwrap();
    assert_eq!(out.verdict, TC_ACT_SHOT, "a reply re-encapsulated at TTL 1");
    assert_eq!(dp.counter(Stat::TtlExceeded), 3);
    assert_eq!(entries(&dp), 2);
    let out = dp.run(Hook::Ingress, 0, &reply).unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let inner = inner_of(&out.packet);
    assert_eq!(inner[14 + 8], 63, "reply re-encap: TTL 64 → 63");
    verify_checksums(&inner).unwrap();

    // Replies delivered here are not hops: the TTL stays.
    let local = open(&mut dp, 9400, false).unwrap();
    let back = tcp("203.0.113.1", 80, "192.0.2.10", local, TCP_SYN | TCP_ACK);
    let out = dp.run(Hook::Ingress, 0, &with_ttl(&back, 1)).unwrap();
    assert_eq!(
        (out.verdict, out.packet[14 + 8]),
        (TC_ACT_OK, 1),
        "a local delivery at TTL 1"
    );
}

/// The inner packet of an encapsulated frame, as a frame of its own.
fn inner_of(frame: &[u8]) -> Vec<u8> {
    let mut inner = frame[..14].to_vec();
    inner.extend_from_slice(&frame[14 + 28..]);
    inner
}

/// One peer (or whoever spoofs its fabric address) can hold at most its budget of connections
/// translated here; beyond it new ones are refused, counted, leaving nothing behind, while other
/// peers and established connections are unaffected. The agent's recount frees the budget as
/// connections expire.
#[test]
fn a_peer_gets_no_more_than_its_budget() {
    let (net, mut dp) = datapath_with(1024);
    dp.maps
        .set_local(&egress_common::fabric::Local {
            fabric: A,
            ifindex: net.ifindex,
            mss_v4: 1432,
            fenced: 0,
            _pad: 0,
            peer_budget: 3,
        })
        .unwrap();
    let key = tunnel::key(tunnel::CONNECTION, 7);
    let syn = |sport| tcp("10.50.0.12", sport, "203.0.113.1", 80, TCP_SYN);
    let from = |peer: [u8; 4], sport| gre_frame(peer, A, key, &syn(sport));
    for sport in 6000..6003 {
        let out = dp.run(Hook::Ingress, 0, &from(B, sport)).unwrap();
        assert_eq!(
            out.verdict, TC_ACT_REDIRECT,
            "b's connection {sport} translated"
        );
    }
    refused(
        &mut dp,
        "b's fourth connection",
        &from(B, 6003),
        Stat::PeerBudget,
    );
    assert_eq!(entries(&dp), 6, "b's three connections only");
    // b's established connections go on.
    let ack = gre_frame(
        B,
        A,
        key,
        &tcp("10.50.0.12", 6000, "203.0.113.1", 80, TCP_ACK),
    );
    assert_eq!(
        dp.run(Hook::Ingress, 0, &ack).unwrap().verdict,
        TC_ACT_REDIRECT
    );
    // Another peer has a budget of its own.
    let c = [10, 50, 0, 13];
    let out = dp.run(Hook::Ingress, 0, &from(c, 7000)).unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "c's connection translated");

    // The connections expire (no reply); the recount frees b's budget.
    let before = egress::loader::read_peer_load(&dp.maps.peer_load);
    let now = flows::monotonic_ns();
    let done = flows::collect(&mut dp.maps.flows, now + 31 * NS, 1024).unwrap();
    assert_eq!(done.expired, 4);
    let load = flows::peer_load(dp.maps.flows.iter().map(|e| e.unwrap().1));
    assert!(load.is_empty(), "nothing left to count: {load:?}");
    egress::loader::write_peer_load(&mut dp.maps.peer_load, &load, &before).unwrap();
    let out = dp.run(Hook::Ingress, 0, &from(B, 6003)).unwrap();
    assert_eq!(
        out.verdict, TC_ACT_REDIRECT,
        "b may open a connection again"
    );
    let load = flows::peer_load(dp.maps.flows.iter().map(|e| e.unwrap().1));
    assert_eq!(load.get(&std::net::Ipv4Addr::from(B)), Some(&1));
}

/// VLAN tags in the frame data (one 802.1Q tag, or an 802.1ad service tag over it) never let a
/// policy packet pass untranslated: translations work through them, and what would need a
/// tunnel is refused, counted, leaving nothing behind.
#[test]
fn vlan_tagged_frames_are_translated_never_passed() {
    let (_net, mut dp) = datapath_with(1024);
    for (name, tags) in [
        ("802.1Q", vec![(0x8100, 100)]),
        ("802.1ad", vec![(0x88a8, 10), (0x8100, 100)]),
    ] {
        let sport = 9500 + tags.len() as u16;
        let syn = tcp("10.50.0.11", sport, "203.0.113.1", 80, TCP_SYN);
        let out = dp
            .run(Hook::Egress, 0, &packet::tagged(&syn, &tags))
            .unwrap();
        assert_eq!(out.verdict, TC_ACT_OK, "{name}: translated");
        let (plain, kept) = packet::untagged(&out.packet);
        assert_eq!(kept, tags, "{name}: tags kept");
        verify_checksums(&plain).unwrap();
        let o = parse(&plain);
        assert_eq!(o.src.to_string(), "192.0.2.10", "{name}: from the pool");
        let reply = tcp("203.0.113.1", 80, "192.0.2.10", o.sport, TCP_SYN | TCP_ACK);
        let back = dp
            .run(Hook::Ingress, 0, &packet::tagged(&reply, &tags))
            .unwrap();
        let (plain, _) = packet::untagged(&back.packet);
        verify_checksums(&plain).unwrap();
        assert_eq!(parse(&plain).dport, sport, "{name}: reply translated back");

        // Forwarded (gamma → b): refused, nothing left behind.
        let before = entries(&dp);
        let fwd = tcp("10.50.0.11", sport, "203.0.113.200", 80, TCP_SYN);
        let out = dp
            .run(Hook::Egress, 0, &packet::tagged(&fwd, &tags))
            .unwrap();
        assert_eq!(out.verdict, TC_ACT_SHOT, "{name}: a tunnel is refused");
        assert_eq!(entries(&dp), before, "{name}: no forwarded entry left");
    }
    assert_eq!(dp.counter(Stat::VlanTunnel), 2);
    assert_eq!(dp.counter(Stat::SnatNew), 2);
    // A third tag: malformed, never passed untranslated.
    let syn = tcp("10.50.0.11", 9600, "203.0.113.1", 80, TCP_SYN);
    let three = packet::tagged(&syn, &[(0x88a8, 10), (0x8100, 100), (0x8100, 200)]);
    let before = dp.counter(Stat::EgressMalformed);
    assert_eq!(
        dp.run(Hook::Egress, 0, &three).unwrap().verdict,
        TC_ACT_SHOT
    );
    assert_eq!(dp.counter(Stat::EgressMalformed), before + 1, "three tags");
    // A tunnel packet still tagged (a second tag the kernel did not take off).
    let inner = tcp("10.50.0.12", 6000, "203.0.113.1", 80, TCP_SYN);
    let gre = gre_frame(B, A, tunnel::key(tunnel::CONNECTION, 7), &inner);
    refused(
        &mut dp,
        "tagged GRE",
        &packet::tagged(&gre, &[(0x8100, 100)]),
        Stat::VlanTunnel,
    );
}
