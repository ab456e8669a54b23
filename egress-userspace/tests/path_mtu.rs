//! End to end, path MTU discovery through the dataplane: an origin behind a router whose next
//! link has an MTU of 1300. The router's "fragmentation needed" goes to the pool address; the
//! dataplane translates it back (and returns it through the tunnel for a forwarded connection),
//! so a TCP upload with the kernel's defaults (no MTU probing) completes instead of stalling.

mod common;

use std::net::Ipv4Addr;

use common::WantSrc;

const SERVERS: [&str; 5] = ["fra-a-1", "fra-a-2", "fra-b-1", "ams-a-1", "sin-a-1"];
/// Behind the origin, under acme's policy (203.0.113.0/24).
const FAR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 80);
const VIA_FRA_A_1: WantSrc = WantSrc {
    addr: "192.0.2.10",
    ports: (1024, 32767),
};
const SIZE: u64 = 4 << 20;

#[test]
fn uploads_complete_across_a_smaller_mtu_local_and_forwarded() {
    let mut lab = common::lab_with_agents(&SERVERS);
    lab.add_far_origin(FAR, 1300).expect("far origin");
    // fra-a-1 translates its own connection; fra-a-2's goes through fra-a-1 (same data
    // center). 192.0.2.10 is announced via fra-a-1, so the errors arrive there.
    for (socket, counter) in [
        ("fra-a-1", "icmp_error_nat"),
        ("fra-a-2", "icmp_error_reencap"),
    ] {
        let before = common::counter(&lab, "fra-a-1", counter);
        common::check_upload(&lab, socket, FAR.into(), SIZE, VIA_FRA_A_1);
        assert!(
            common::counter(&lab, "fra-a-1", counter) > before,
            "{socket}: fra-a-1 translated the router's errors ({counter})"
        );
    }
}
