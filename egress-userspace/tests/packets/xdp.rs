//! `xdp_ingress` (`egress agent --xdp`) against `tc_ingress` on the same packets in the same
//! state: what XDP finishes must be byte for byte what TC makes of it, with the same counter;
//! whatever it cannot finish exactly as TC would (a SYN to clamp, a TTL about to expire, a
//! frame too big for the tunnel, a stranger's GRE, tags, fragments, ICMP) goes on to TC
//! untouched and uncounted.

use super::*;
use egress::testrun::{XDP_PASS, XDP_TX};

/// Runs `input` through XDP, then (on a fresh copy, same state) through TC. Returns the XDP
/// outcome and whether XDP finished the packet, having checked: finished → TC's bytes, TC's
/// counter (`stat`), and a verdict that means what TC's means; left → unchanged, uncounted.
fn xdp_then_tc(dp: &mut TestDatapath, name: &str, input: &[u8], stat: Stat) -> (Outcome, bool) {
    let counted = |dp: &TestDatapath| (dp.counter(stat), dp.counter(Stat::XdpDone));
    let before = counted(dp);
    let x = dp.run(Hook::Xdp, 0, input).unwrap();
    let mid = counted(dp);
    let t = dp.run(Hook::Ingress, 0, input).unwrap();
    let after = counted(dp);
    assert_eq!(
        after.0 - mid.0,
        1,
        "{name}: TC counts {} (the fixture is what it says)",
        stat.name()
    );
    let finished = x.verdict != XDP_PASS || x.xdp_done;
    if !finished {
        assert_eq!(x.packet, input, "{name}: left to TC unchanged");
        assert_eq!(mid, before, "{name}: left to TC uncounted");
        return (x, false);
    }
    assert_eq!(
        (mid.0 - before.0, mid.1 - before.1),
        (1, 1),
        "{name}: XDP counts {} and xdp_done",
        stat.name()
    );
    let same_meaning = matches!(
        (x.verdict, t.verdict),
        (XDP_PASS, TC_ACT_OK) | (XDP_TX, TC_ACT_REDIRECT)
    );
    assert!(
        same_meaning && x.xdp_done == (x.verdict == XDP_PASS),
        "{name}: XDP verdict {} (done {}) against TC's {}",
        x.verdict,
        x.xdp_done,
        t.verdict
    );
    assert_eq!(x.packet, t.packet, "{name}: XDP's bytes are TC's");
    verify_checksums(&strip_tunnel(&x.packet)).unwrap_or_else(|e| panic!("{name}: {e}"));
    (x, true)
}

/// The packet inside a GRE frame as a frame of its own; a plain frame as it is.
fn strip_tunnel(frame: &[u8]) -> Vec<u8> {
    if frame.len() > 42 && frame[12..14] == [8, 0] && frame[23] == 47 {
        let mut p = frame[..14].to_vec();
        p.extend_from_slice(&frame[42..]);
        p
    } else {
        frame.to_vec()
    }
}

/// The source port `frame` left with (after the egress program translated it).
fn bound_port(dp: &mut TestDatapath, frame: &[u8]) -> u16 {
    let out = dp.run(Hook::Egress, 0, frame).unwrap();
    assert_eq!(out.verdict, TC_ACT_OK);
    parse(&out.packet).sport
}

/// A peer's (b's) packet in GRE with key `key`.
fn from_b(inner: &[u8], key: u32) -> Vec<u8> {
    packet::gre_frame(B, A, key, inner)
}

#[test]
fn xdp_finishes_what_tc_would_do_the_same_way_and_leaves_the_rest() {
    let (_net, mut dp) = datapath(TOPOLOGY);

    // State, made by TC as traffic would: a local connection (acme, IPv4 and IPv6, TCP and
    // UDP), a peer's connection translated here, a local connection forwarded to b.
    let local4 = bound_port(
        &mut dp,
        &tcp("10.50.0.11", 7600, "203.0.113.1", 80, TCP_ACK),
    );
    let udp4 = bound_port(
        &mut dp,
        &udp_datagram("10.50.0.11", 7601, "203.0.113.1", 53, 40),
    );
    let local6 = bound_port(
        &mut dp,
        &tcp("2001:db8:50::11", 7602, "2001:db8:beef::1", 443, TCP_ACK),
    );
    let peer_conn = tcp("10.50.0.12", 7700, "203.0.113.1", 80, TCP_ACK);
    let out = dp
        .run(Hook::Ingress, 0, &from_b(&peer_conn, conn_key(7)))
        .unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let peer_port = parse(&out.packet).sport;
    let out = dp
        .run(
            Hook::Egress,
            0,
            &tcp("10.50.0.11", 7800, "203.0.113.200", 80, TCP_ACK),
        )
        .unwrap();
    assert_eq!(out.verdict, TC_ACT_OK, "forwarded to b");
    let src6 = parse(
        &dp.run(
            Hook::Egress,
            0,
            &tcp("2001:db8:50::11", 7602, "2001:db8:beef::1", 443, TCP_ACK),
        )
        .unwrap()
        .packet,
    )
    .src
    .to_string();

    let reply4 = tcp("203.0.113.1", 80, "192.0.2.10", local4, TCP_ACK);
    let mut udp_reply = udp_datagram("203.0.113.1", 53, "192.0.2.10", udp4, 40);
    let mut udp_no_sum = udp_reply.clone();
    udp_no_sum[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    let reply6 = tcp("2001:db8:beef::1", 443, &src6, local6, TCP_ACK);
    let to_peer = tcp("203.0.113.1", 80, "192.0.2.10", peer_port, TCP_ACK);
    let forwarded_reply = tcp("203.0.113.200", 80, "10.50.0.11", 7800, TCP_ACK);
    let soft = tcp("203.0.113.1", 80, "192.0.2.10", 41500, TCP_ACK);

    // Finished in XDP.
    let finished: Vec<(&str, Vec<u8>, Stat)> = vec![
        ("reply (TCP)", reply4.clone(), Stat::ReverseNat),
        (
            "reply (UDP)",
            std::mem::take(&mut udp_reply),
            Stat::ReverseNat,
        ),
        (
            "reply (UDP without checksum: stays without)",
            udp_no_sum,
            Stat::ReverseNat,
        ),
        ("reply (IPv6)", reply6, Stat::ReverseNat),
        (
            "reply to a peer's connection",
            to_peer.clone(),
            Stat::ReplyReencap,
        ),
        (
            "peer's connection",
            from_b(&peer_conn, conn_key(7)),
            Stat::PeerSnat,
        ),
        (
            "forwarded connection's reply",
            from_b(&forwarded_reply, reply_key(9)),
            Stat::ForwardedReply,
        ),
        ("soft-unicast", soft.clone(), Stat::SoftUnicast),
    ];
    for (name, input, stat) in &finished {
        let (x, done) = xdp_then_tc(&mut dp, name, input, *stat);
        assert!(done, "{name}: finished in XDP (verdict {})", x.verdict);
    }
    let no_sum = dp.run(Hook::Xdp, 0, &finished[2].1).unwrap().packet;
    assert_eq!(
        &no_sum[14 + 20 + 6..14 + 20 + 8],
        &[0, 0],
        "UDP checksum stays 0"
    );

    // Left to TC, which decides with its own counter.
    let c = [10, 50, 0, 13];
    let (first, _) = packet::fragments(
        &udp_datagram("203.0.113.1", 53, "192.0.2.10", udp4, 64),
        32,
        9,
    );
    let mut longer = soft.clone();
    let claimed = u16::from_be_bytes([longer[16], longer[17]]) + 8;
    longer[16..18].copy_from_slice(&claimed.to_be_bytes());
    let left: Vec<(&str, Vec<u8>, Stat)> = vec![
        (
            "peer's SYN (MSS to clamp)",
            from_b(
                &tcp("10.50.0.12", 7701, "203.0.113.1", 80, TCP_SYN),
                conn_key(7),
            ),
            Stat::PeerSnat,
        ),
        (
            "peer's packet with TTL 1",
            from_b(&packet::with_ttl(&peer_conn, 1), conn_key(7)),
            Stat::TtlExceeded,
        ),
        (
            "reply to a peer's connection with TTL 1",
            packet::with_ttl(&to_peer, 1),
            Stat::TtlExceeded,
        ),
        (
            "soft-unicast with TTL 1",
            packet::with_ttl(&soft, 1),
            Stat::TtlExceeded,
        ),
        (
            "reply to a peer's connection too big for the tunnel",
            egress::testrun::paths::tcp("203.0.113.1", 80, "192.0.2.10", peer_port, TCP_ACK, 1500),
            Stat::EncapTooBig,
        ),
        (
            "GRE from a stranger",
            packet::gre_frame([10, 50, 0, 99], A, conn_key(7), &peer_conn),
            Stat::GreUnknownPeer,
        ),
        (
            "GRE for another server",
            packet::gre_frame(B, c, conn_key(7), &peer_conn),
            Stat::GreNotLocal,
        ),
        (
            "forwarded reply from another peer",
            packet::gre_frame(c, A, reply_key(9), &forwarded_reply),
            Stat::PeerPolicy,
        ),
        (
            "tagged reply",
            packet::tagged(&reply4, &[(0x8100, 7)]),
            Stat::ReverseNat,
        ),
        ("first fragment of a reply", first, Stat::ReverseNat),
        (
            "soft-unicast whose IP length claims more than the frame",
            longer,
            Stat::IngressMalformed,
        ),
    ];
    for (name, input, stat) in &left {
        let (x, done) = xdp_then_tc(&mut dp, name, input, *stat);
        assert!(!done, "{name}: left to TC (XDP verdict {})", x.verdict);
    }
}

/// Hostile and odd frames: XDP leaves every one to TC without a change or a counter (TC
/// counts them: its own tests cover what it does).
#[test]
fn xdp_leaves_malformed_frames_to_tc_untouched() {
    let (_net, mut dp) = datapath(TOPOLOGY);
    let peer_conn = tcp("10.50.0.12", 7700, "203.0.113.1", 80, TCP_ACK);
    dp.run(Hook::Ingress, 0, &from_b(&peer_conn, conn_key(7)))
        .unwrap();
    let whole = from_b(&peer_conn, conn_key(7));
    // (BPF_PROG_TEST_RUN takes no XDP frame shorter than an Ethernet header.)
    let mut frames: Vec<(String, Vec<u8>)> = (14..whole.len())
        .step_by(3)
        .map(|n| (format!("cut to {n} bytes"), whole[..n].to_vec()))
        .collect();
    let mut no_key = whole.clone();
    no_key[14 + 20] = 0; // GRE flags: no key
    frames.push(("GRE without key".into(), no_key));
    let mut inner_longer = whole.clone();
    inner_longer[42 + 2..42 + 4].copy_from_slice(&2000u16.to_be_bytes());
    frames.push(("inner length beyond the outer packet".into(), inner_longer));
    let mut bad_ihl = whole.clone();
    bad_ihl[14] = 0x44;
    frames.push(("outer IHL 16".into(), bad_ihl));
    for (name, frame) in frames {
        let seen = dp.counter(Stat::IngressSeen);
        let out = dp.run(Hook::Xdp, 0, &frame).unwrap();
        assert_eq!(
            (
                out.verdict,
                out.xdp_done,
                &out.packet,
                dp.counter(Stat::IngressSeen)
            ),
            (XDP_PASS, false, &frame, seen),
            "{name}"
        );
    }
}

/// Pins the calling thread to its current CPU: the route cache is per CPU, and a test that
/// reads what an earlier run learnt must run on the same one.
fn stay_on_this_cpu() {
    // SAFETY: plain libc calls on a zeroed cpu_set_t.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity"
        );
    }
}

/// On an uplink without IP forwarding (as a server's usually is) the FIB helper refuses:
/// TC has the kernel route the packet (`bpf_redirect_neigh`), and the next hop is learnt
/// from the MACs the kernel gave it as it leaves (tc_egress); XDP then sends the next packets
/// itself. Only a packet this CPU just handed to the kernel teaches: a frame no redirect
/// preceded, or one leaving while the route is cached (it may carry the very MACs the cache
/// gave it), does not.
#[test]
fn next_hops_are_learnt_from_what_the_kernel_routed_when_the_fib_helper_refuses() {
    let (net, mut dp) = datapath(TOPOLOGY);
    stay_on_this_cpu();
    let off = std::process::Command::new("sysctl")
        .args(["-qw", "net.ipv4.conf.up0.forwarding=0"])
        .status()
        .unwrap();
    assert!(off.success(), "sysctl");
    let soft = tcp("203.0.113.1", 80, "192.0.2.10", 41500, TCP_ACK);
    // A tunnel frame leaving that no redirect of ours preceded (a local raw sender's) teaches
    // nothing.
    let mut forged = packet::gre_frame(A, B, soft_key(7), &packet::hopped(&soft));
    forged[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 0x66]);
    forged[6..12].copy_from_slice(&net.mac);
    dp.run(Hook::Egress, 0, &forged).unwrap();
    let x = dp.run(Hook::Xdp, 0, &soft).unwrap();
    assert!(
        x.verdict == XDP_PASS && !x.xdp_done && x.packet == soft,
        "no next hop yet: left to TC"
    );
    let t = dp.run(Hook::Ingress, 0, &soft).unwrap();
    assert_eq!(t.verdict, TC_ACT_REDIRECT, "TC has the kernel route it");
    // What the kernel sends: the tunnel packet with the peer's MAC, through tc_egress.
    let mut sent = t.packet.clone();
    sent[0..6].copy_from_slice(&egress::testrun::PEER_MAC);
    sent[6..12].copy_from_slice(&net.mac);
    let e = dp.run(Hook::Egress, 0, &sent).unwrap();
    assert_eq!(
        e.verdict, TC_ACT_OK,
        "tc_egress lets its own tunnel packet go"
    );
    let x = dp.run(Hook::Xdp, 0, &soft).unwrap();
    assert_eq!(x.verdict, XDP_TX, "XDP sends it with the learnt next hop");
    assert_eq!(x.packet, sent, "byte for byte what the kernel sent");
    // Another MAC leaving while the route is fresh does not replace it.
    let mut other = sent.clone();
    other[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 0x99]);
    dp.run(Hook::Egress, 0, &other).unwrap();
    let x = dp.run(Hook::Xdp, 0, &soft).unwrap();
    assert_eq!(&x.packet[0..6], &egress::testrun::PEER_MAC, "kept");
}
