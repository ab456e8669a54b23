//! End to end, local egress: real connections from a server holding a pool address, checked
//! against what the origin saw. Default config: fra-a-1 holds 192.0.2.10 ports 1024-32767 and,
//! like every server, its own address in 2001:db8:7::/64 for destinations 203.0.113.0/24 and
//! 2001:db8:beef::/48.

mod common;

use common::seen;
use egress::lab;

const SERVER: &str = "fra-a-1";
const FRA_A_1: common::WantSrc = common::WantSrc {
    addr: "192.0.2.10",
    ports: (1024, 32767),
};

#[test]
fn curl_v4_and_v6_leave_from_the_pool_and_no_policy_from_the_server() {
    let lab = common::lab_with_agents(&[SERVER]);
    let (src, port) = seen(
        &lab.curl(SERVER, &format!("http://{}/", lab::ORIGIN_V4))
            .unwrap(),
    );
    assert_eq!(src, "192.0.2.10", "v4 source is the pool address");
    assert!(
        (1024..=32767).contains(&port),
        "v4 port {port} is in fra-a-1's share"
    );

    let (src, port) = seen(
        &lab.curl(SERVER, &format!("http://[{}]/", lab::ORIGIN_V6))
            .unwrap(),
    );
    assert_eq!(
        src, "2001:db8:7::b",
        "v6 source is the pool prefix + server id 11"
    );
    assert!(port >= 1024, "v6 port {port} is in 1024-65535");

    let (src, _) = seen(
        &lab.curl(SERVER, &format!("http://{}/", lab::ORIGIN_V4_NO_POLICY))
            .unwrap(),
    );
    assert_eq!(src, "10.50.0.11", "no policy: the server's own address");
    let (src, _) = seen(
        &lab.curl(SERVER, &format!("http://[{}]/", lab::ORIGIN_V6_NO_POLICY))
            .unwrap(),
    );
    assert_eq!(src, "fd00:50::b", "no policy: the server's own v6 address");
}

#[test]
fn two_hundred_concurrent_connections_get_distinct_ports() {
    let lab = common::lab_with_agents(&[SERVER]);
    common::check_concurrent(&lab, SERVER, lab::ORIGIN_V4.into(), 200, FRA_A_1);
}

#[test]
fn udp_request_response_both_families() {
    let lab = common::lab_with_agents(&[SERVER]);
    let ns = lab.server_ns(SERVER);
    let egress = env!("CARGO_BIN_EXE_egress");
    let v4 = lab
        .run(
            &ns,
            egress,
            &[
                "lab",
                "udp-probe",
                &format!("{}:{}", lab::ORIGIN_V4, lab::UDP_PORT),
            ],
        )
        .expect("UDP v4 answer");
    let (src, port) = seen(&v4);
    assert_eq!(src, "192.0.2.10");
    assert!((1024..=32767).contains(&port));
    let v6 = lab
        .run(
            &ns,
            egress,
            &[
                "lab",
                "udp-probe",
                &format!("[{}]:{}", lab::ORIGIN_V6, lab::UDP_PORT),
            ],
        )
        .expect("UDP v6 answer");
    assert_eq!(seen(&v6).0, "2001:db8:7::b");
}

#[test]
fn fifty_megabyte_download_arrives_intact() {
    let lab = common::lab_with_agents(&[SERVER]);
    common::check_download(&lab, SERVER, lab::ORIGIN_V4.into(), 50 << 20, FRA_A_1);
    let v6 = common::WantSrc {
        addr: "2001:db8:7::b",
        ports: (1024, 65535),
    };
    common::check_download(&lab, SERVER, lab::ORIGIN_V6.into(), 50 << 20, v6);
}

#[test]
fn icmp_echo_leaves_from_the_pool_and_replies_come_back() {
    let lab = common::lab_with_agents(&[SERVER]);
    let ns = lab.server_ns(SERVER);
    let before = egress::stats::read(&lab.pin_dir(SERVER)).unwrap();
    for origin in [lab::ORIGIN_V4.to_string(), lab::ORIGIN_V6.to_string()] {
        lab.run(&ns, "ping", &["-c", "3", "-i", "0.05", "-W", "2", &origin])
            .unwrap_or_else(|e| panic!("echo to {origin} answered: {e:#}"));
    }
    let after = egress::stats::read(&lab.pin_dir(SERVER)).unwrap();
    let moved = |name: &str| {
        let get =
            |v: &[egress::stats::StatValue]| v.iter().find(|s| s.name == name).unwrap().packets;
        get(&after) - get(&before)
    };
    assert!(
        moved("snat_new") + moved("snat_established") >= 6,
        "6 requests translated"
    );
    assert!(moved("reverse_nat") >= 6, "6 replies translated back");
}

/// Other software on the host setting skb mark bit 31 (here an nftables rule marking every
/// packet the server sends, as some network stacks do) must not make policy traffic skip
/// translation: the origin still sees the pool address, for a local and a forwarded connection.
#[test]
fn a_high_mark_set_by_other_software_never_bypasses_translation() {
    let lab = common::lab_with_agents(&[SERVER, "fra-a-2"]);
    for server in [SERVER, "fra-a-2"] {
        let ns = lab.server_ns(server);
        for rule in [
            &["add", "table", "inet", "marker"][..],
            &[
                "add", "chain", "inet", "marker", "out", "{", "type", "route", "hook", "output",
                "priority", "0", ";", "}",
            ],
            &[
                "add",
                "rule",
                "inet",
                "marker",
                "out",
                "meta",
                "mark",
                "set",
                "0x80000000",
            ],
        ] {
            lab.run(&ns, "nft", rule).expect("nft rule");
        }
        let (src, port) = seen(
            &lab.curl(server, &format!("http://{}/", lab::ORIGIN_V4))
                .unwrap(),
        );
        assert_eq!(
            src, "192.0.2.10",
            "{server}: marked traffic still leaves from the pool"
        );
        FRA_A_1.check(server, &(src, port));
    }
}
