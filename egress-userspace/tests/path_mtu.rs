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
    let file = lab.work_dir().join("upload.bin");
    let data: Vec<u8> = (0..SIZE).map(egress::lab::origin::payload_byte).collect();
    std::fs::write(&file, data).unwrap();
    // fra-a-1 translates its own connection; fra-a-2's goes through fra-a-1 (same data
    // center). 192.0.2.10 is announced via fra-a-1, so the errors arrive there.
    for (socket, counter) in [
        ("fra-a-1", "icmp_error_nat"),
        ("fra-a-2", "icmp_error_reencap"),
    ] {
        let before = common::counter(&lab, "fra-a-1", counter);
        let body = lab
            .run(
                &lab.server_ns(socket),
                "curl",
                &[
                    "-sS",
                    "--max-time",
                    "30",
                    "--data-binary",
                    &format!("@{}", file.display()),
                    &format!("http://{FAR}/upload"),
                ],
            )
            .unwrap_or_else(|e| panic!("{socket}: upload across the 1300-byte link: {e:#}"));
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON answer");
        want_src(socket, &v);
        assert_eq!(v["bytes"], SIZE, "{socket}: every byte arrived");
        assert_eq!(
            v["sha256"].as_str().unwrap(),
            egress::lab::origin::payload_sha256(SIZE),
            "{socket}: content"
        );
        assert!(
            common::counter(&lab, "fra-a-1", counter) > before,
            "{socket}: fra-a-1 translated the router's errors ({counter})"
        );
    }
}

fn want_src(socket: &str, v: &serde_json::Value) {
    VIA_FRA_A_1.check(
        socket,
        &(
            v["src"].as_str().unwrap().to_string(),
            v["port"].as_u64().unwrap() as u16,
        ),
    );
}
