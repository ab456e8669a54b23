//! ICMP errors translated back: local, peer, tunnelled, by port owner, returned.

use super::*;

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
    // What is delivered into this host arrives as a NIC that sums every packet hands it
    // (CHECKSUM_COMPLETE): the translation must leave that sum right (steps 1-3, 7, 8).
    dp.checksum_complete = true;
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
    // tunnel, translated. (Sent out: steps 4-6 are not checked against a packet sum.)
    dp.checksum_complete = false;
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
    dp.checksum_complete = true;
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

/// The quote ends where the error's IP length says: bytes after it (Ethernet padding, or junk
/// a sender appends) are neither read as quote nor rewritten, and the error's checksum stays
/// right.
#[test]
fn an_icmp_errors_quote_ends_with_its_ip_length_not_the_frame() {
    let (_net, mut dp) = datapath(TOPOLOGY);
    let router4 = ip("198.51.100.254");
    let syn = tcp("10.50.0.11", 5310, "203.0.113.1", 80, TCP_SYN);
    let sent = dp.run(Hook::Egress, 0, &syn).unwrap().packet;
    // Padding that continues the quoted packet exactly (so it would pass for quote).
    let padded = |quote: usize| {
        let mut f = packet::icmp_error(router4, ip("192.0.2.10"), (11, 0), 0, &sent, quote);
        let pad = sent[14 + quote..14 + 40].to_vec();
        f.extend_from_slice(&pad);
        (f, pad.len())
    };

    // 8 bytes of TCP quoted, the TCP checksum in the padding: the quote is translated, the
    // padding left as it was.
    let (err, pad) = padded(28);
    let out = dp.run(Hook::Ingress, 0, &err).unwrap();
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(dp.counter(Stat::IcmpErrorNat), 1, "translated");
    let end = out.packet.len() - pad;
    assert_eq!(
        out.packet[end..],
        err[err.len() - pad..],
        "padding untouched"
    );
    verify_checksums(&out.packet[..end]).unwrap_or_else(|e| panic!("8 bytes quoted: {e}"));
    assert_eq!(
        ip_part(&packet::quoted_frame(&out.packet[..end]), 28),
        ip_part(&syn, 28),
        "the quoted header is the socket's"
    );

    // 4 bytes of TCP quoted, the rest of its first 8 in the padding: not a quote this
    // datapath reads (at least 8 bytes) — passed untouched.
    let (err, _) = padded(24);
    let before = dp.counter(Stat::IngressNoFlow);
    let out = dp.run(Hook::Ingress, 0, &err).unwrap();
    assert_eq!(
        (out.verdict, &out.packet),
        (TC_ACT_OK, &err),
        "short quote: untouched"
    );
    assert_eq!(dp.counter(Stat::IngressNoFlow), before + 1);
    assert_eq!(dp.counter(Stat::IcmpErrorNat), 1, "not translated");
}
