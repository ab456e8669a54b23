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
