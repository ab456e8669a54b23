//! Fragments following their first fragment.

use super::*;

/// Later fragments get what their datagram's first fragment got, in every direction; the
/// translated datagram, put back together, has valid checksums; a later fragment whose first
/// fragment was not seen never leaves untranslated.
#[test]
fn fragments_follow_their_first_fragment() {
    let (net, mut dp) = datapath(TOPOLOGY);
    // Delivered replies arrive as a NIC that sums every packet hands them (CHECKSUM_COMPLETE):
    // the rewrites must leave that sum right.
    dp.checksum_complete = true;
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
    // The first fragment's second pass, with the ingress program's hint, passes as ours even
    // when its translated tuple also has an outbound entry (a local socket on the pool
    // address), and records nothing of that entry: the later fragment stays ours.
    assert_eq!(f.hint, dp.hint_for(&f.packet), "first fragment hinted");
    let s = parse(&f.packet);
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (s.src, s.dst) else {
        unreachable!()
    };
    let mut key = egress_common::flow::FlowKey {
        src_port_be: s.sport.to_be(),
        dst_port_be: s.dport.to_be(),
        proto: 17,
        family: 4,
        ..Default::default()
    };
    key.src[..4].copy_from_slice(&src.octets());
    key.dst[..4].copy_from_slice(&dst.octets());
    let mut pool_addr = [0u8; 16];
    pool_addr[..4].copy_from_slice(&src.octets());
    let outbound = egress_common::flow::FlowValue::new(
        egress_common::flow::FLOW_OUTBOUND,
        pool_addr,
        40999u16.to_be(),
        7,
        [0; 4],
        0,
    );
    dp.maps.flows.insert(key, outbound, 0).unwrap();
    let hinted = dp.counter(Stat::OursHinted);
    let out = dp.run_hinted(Hook::Egress, 0, f.hint, &f.packet).unwrap();
    assert_eq!(
        (out.verdict, &out.packet),
        (TC_ACT_OK, &f.packet),
        "hinted first fragment: untouched"
    );
    assert_eq!(dp.counter(Stat::OursHinted), hinted + 1);
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

/// A fragment entry answers only fragments going its own way: a datagram this host sends and
/// one that arrives with the same (source, destination, id, protocol) — a peer may send any
/// inner source, a spoofer any plain one — neither replace nor answer each other's entries.
#[test]
fn fragment_entries_answer_only_their_own_direction() {
    let (_net, mut dp) = datapath(TOPOLOGY);
    let run = |dp: &mut TestDatapath, hook, p: &[u8]| dp.run(hook, 0, p).unwrap();

    // A forwarded datagram's entry (encapsulate to b) is for its later fragments leaving: a
    // plain arriving later fragment under its key is not reflected into the tunnel.
    let dgram = udp_datagram("10.50.0.11", 5360, "203.0.113.200", 53, 1200);
    let (first, later) = packet::fragments(&dgram, 800, 0x6001);
    assert_eq!(dp.counter(Stat::ForwardNew), 0);
    run(&mut dp, Hook::Egress, &first);
    assert_eq!(dp.counter(Stat::ForwardNew), 1, "first fragment forwarded");
    let before = dp.counter(Stat::IngressNoFlow);
    let out = run(&mut dp, Hook::Ingress, &later);
    assert_eq!(
        (out.verdict, &out.packet),
        (TC_ACT_OK, &later),
        "arriving under a leaving datagram's key: passed untouched"
    );
    assert_eq!(dp.counter(Stat::IngressNoFlow), before + 1);

    // This host's datagram, translated here; then a peer's datagram under the same key (this
    // host's own source address, another port). The peer's entry does not replace this
    // host's: its later fragment still leaves translated.
    let ours = udp_datagram("10.50.0.11", 5361, "203.0.113.1", 53, 1200);
    let (first, later) = packet::fragments(&ours, 800, 0x6002);
    let f = run(&mut dp, Hook::Egress, &first);
    assert_eq!(
        parse(&f.packet).src,
        ip("192.0.2.10"),
        "first from the pool"
    );
    let peers = udp_datagram("10.50.0.11", 6001, "203.0.113.1", 53, 1200);
    let (peer_first, _) = packet::fragments(&peers, 800, 0x6002);
    let before = dp.counter(Stat::PeerSnat);
    run(
        &mut dp,
        Hook::Ingress,
        &packet::gre_frame(B, A, conn_key(7), &peer_first),
    );
    assert_eq!(
        dp.counter(Stat::PeerSnat),
        before + 1,
        "the peer's first fragment translated"
    );
    let before = dp.counter(Stat::FragmentFollowed);
    let l = run(&mut dp, Hook::Egress, &later);
    assert_eq!(
        (l.verdict, parse(&l.packet).src),
        (TC_ACT_OK, ip("192.0.2.10")),
        "this host's later fragment: still its own datagram's"
    );
    assert_eq!(dp.counter(Stat::FragmentFollowed), before + 1);
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
