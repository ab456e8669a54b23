//! The path catalogue (`egress::testrun::paths`) at both frame sizes, and `--trace`.

use super::*;

/// Every path of the catalogue the benchmark times, at both frame sizes: output and counter
/// (each fixture a few times: fresh ones open a new connection each time).
#[test]
fn every_path_of_the_catalogue_at_both_frame_sizes() {
    let (net, mut dp) = datapath(TOPOLOGY);
    for frame in [64, 1500] {
        for f in egress::testrun::paths::catalogue() {
            // Sequence numbers distinct across frame sizes: fresh ones are new connections.
            for seq in (0..3).map(|i| i + frame as u32) {
                let prepared = f.prepare(&mut dp, frame, seq).unwrap();
                f.check(&mut dp, &net, frame, &prepared)
                    .unwrap_or_else(|e| panic!("{e:#}"));
            }
        }
    }
}

/// Every receive path of the catalogue that passes the packet on into this host, on
/// CHECKSUM_COMPLETE skbs (a NIC that sums every packet it receives, as most server NICs do):
/// `skb->csum` stays right for the packet as rewritten, or the stack would find its checksum
/// "wrong", log a hardware checksum fault and sum it again in software. (What a path sends
/// out of the uplink is not checked against `skb->csum`. Kernels before 6.11 cannot run this:
/// skipped.)
#[test]
fn every_path_into_the_host_keeps_a_checksum_complete_skbs_sum_right() {
    let (net, mut dp) = datapath(TOPOLOGY);
    dp.checksum_complete = true;
    let probe = tcp("198.51.100.7", 80, "192.0.2.10", 40001, TCP_ACK);
    if let Err(e) = dp.run(Hook::Ingress, 0, &probe)
        && format!("{e}").contains("Invalid argument")
    {
        eprintln!("skipped: this kernel has no BPF_F_TEST_SKB_CHECKSUM_COMPLETE ({e})");
        return;
    }
    let (mut wrong, mut checked) = (Vec::new(), 0);
    for frame in [64, 1500] {
        for f in egress::testrun::paths::catalogue() {
            let into_host = matches!(
                (f.want)(frame),
                egress::testrun::paths::Want::Unchanged
                    | egress::testrun::paths::Want::BackTo(..)
                    | egress::testrun::paths::Want::Decapsulated
            );
            if f.hook != Hook::Ingress || !into_host {
                continue;
            }
            checked += 1;
            for seq in (0..2).map(|i| i + frame as u32) {
                if let Err(e) = f
                    .prepare(&mut dp, frame, seq)
                    .and_then(|prepared| f.check(&mut dp, &net, frame, &prepared))
                {
                    wrong.push(format!("{} ({frame} B): {e:#}", f.path));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Reverse translation (IPv4, IPv6), forwarded reply, arriving not ours; both sizes.
    assert_eq!(checked, 4 * 2);
}

/// `xdp_ingress` (`egress agent --xdp`) on every path of the catalogue: the receive paths it
/// finishes give TC's output and counter (and `xdp_done`); everything else, refusals
/// included, goes on to TC untouched and uncounted.
#[test]
fn xdp_gives_what_tc_gives_on_every_path_it_takes_and_leaves_the_rest() {
    let (net, mut dp) = datapath(TOPOLOGY);
    let mut taken = 0;
    for frame in [64, 1500] {
        for f in egress::testrun::paths::catalogue() {
            for seq in (0..3).map(|i| i + frame as u32) {
                let prepared = f.prepare(&mut dp, frame, seq).unwrap();
                f.check_xdp(&mut dp, &net, frame, &prepared)
                    .unwrap_or_else(|e| panic!("{e:#}"));
                taken += usize::from(f.in_xdp(frame));
            }
        }
    }
    // Reverse translation (IPv4 and IPv6), peer, reply re-encapsulation, soft-unicast,
    // forwarded reply.
    assert_eq!(taken, 6 * 2 * 3);
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
