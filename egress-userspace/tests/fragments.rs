//! End to end, fragments: a 4000-byte UDP datagram (three fragments on a 1500-byte path)
//! reaches the origin whole and from the pool address, translated here and forwarded through
//! a peer, IPv4 and IPv6. The lab's fabric has an MTU of 1600 (room for the tunnel's 28 bytes)
//! while the paths to the internet keep 1500, as in a data centre with a jumbo-frame fabric.

mod common;

use egress::{
    config::Config,
    lab::{self, Lab, LabSpec},
};

const SIZE: usize = 4000;

#[test]
fn a_large_udp_datagram_arrives_whole_from_the_pool_address() {
    common::require_root();
    let mut spec = LabSpec::new(Config::embedded(), common::EGRESS);
    spec.fabric_mtu = 1600;
    let mut lab = Lab::up(spec).expect("lab builds");
    for s in ["fra-a-1", "fra-a-2"] {
        lab.start_agent(s).expect("agent starts");
    }
    let want_sha = egress::fleet::hex(&{
        use sha2::Digest as _;
        let data: Vec<u8> = (0..SIZE as u64)
            .map(egress::lab::origin::payload_byte)
            .collect();
        sha2::Sha256::digest(&data)
    });
    // fra-a-1 translates (v4 and v6); fra-a-2 forwards v4 to fra-a-1.
    let cases: [(&str, std::net::IpAddr, &str, (u16, u16)); 3] = [
        (
            "fra-a-1",
            lab::ORIGIN_V4.into(),
            "192.0.2.10",
            (1024, 32767),
        ),
        (
            "fra-a-1",
            lab::ORIGIN_V6.into(),
            "2001:db8:7::b",
            (1024, 65535),
        ),
        (
            "fra-a-2",
            lab::ORIGIN_V4.into(),
            "192.0.2.10",
            (1024, 32767),
        ),
    ];
    for (server, to, want_src, ports) in cases {
        let followed = common::counter(&lab, server, "fragment_followed");
        let to = std::net::SocketAddr::new(to, lab::UDP_PORT).to_string();
        let out = lab
            .run(
                &lab.server_ns(server),
                common::EGRESS,
                &["lab", "udp-probe", &to, "--size", &SIZE.to_string()],
            )
            .unwrap_or_else(|e| panic!("{server} → {to}: {e:#}"));
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON answer");
        common::WantSrc {
            addr: want_src,
            ports,
        }
        .check(
            server,
            &(
                v["src"].as_str().unwrap().to_string(),
                v["port"].as_u64().unwrap() as u16,
            ),
        );
        assert_eq!(
            v["bytes"], SIZE,
            "{server} → {to}: the whole datagram arrived"
        );
        assert_eq!(v["sha256"], want_sha.as_str(), "{server} → {to}: content");
        assert!(
            common::counter(&lab, server, "fragment_followed") >= followed + 2,
            "{server} → {to}: the later fragments followed the first"
        );
    }
    assert_eq!(common::counter(&lab, "fra-a-2", "drop_encap_too_big"), 0);
}
