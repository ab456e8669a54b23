//! End to end, forwarding: connections from servers that hold no share of a pool go through a
//! peer (GRE in BPF) and the origin sees the peer's pool address and port range. All five
//! servers of the default lab run agents. Default config: acme (192.0.2.10) is held by
//! fra-a-1 (1024-32767) and ams-a-1 (32768-65535) and announced via fra-a-1; beta
//! (192.0.2.20, destinations 203.0.113.128/25) by ams-a-1 only.

mod common;

use common::WantSrc;
use egress::lab::{self, Lab};

const SERVERS: [&str; 5] = ["fra-a-1", "fra-a-2", "fra-b-1", "ams-a-1", "sin-a-1"];
const VIA_FRA_A_1: WantSrc = WantSrc {
    addr: "192.0.2.10",
    ports: (1024, 32767),
};
const VIA_AMS_A_1_BETA: WantSrc = WantSrc {
    addr: "192.0.2.20",
    ports: (1024, 65535),
};
const AMS_A_1_ACME: WantSrc = WantSrc {
    addr: "192.0.2.10",
    ports: (32768, 65535),
};
const MB50: u64 = 50 << 20;

fn full_lab() -> Lab {
    common::lab_with_agents(&SERVERS)
}

/// curl, 100 concurrent connections and a 50 MB download through one tier.
fn tier(from: &str, host: std::net::Ipv4Addr, want: WantSrc) {
    let lab = full_lab();
    common::check_curl(&lab, from, host.into(), want);
    common::check_concurrent(&lab, from, host.into(), 100, want);
    common::check_download(&lab, from, host.into(), MB50, want);
}

#[test]
fn tier_2_same_datacenter() {
    tier("fra-a-2", lab::ORIGIN_V4, VIA_FRA_A_1);
}

#[test]
fn tier_3_same_location() {
    tier("fra-b-1", lab::ORIGIN_V4, VIA_FRA_A_1);
}

#[test]
fn tier_4_nearest_location() {
    // From fra the nearest location holding beta is ams; from sin, acme's nearest is fra.
    tier("fra-a-2", lab::ORIGIN_V4_HIGH, VIA_AMS_A_1_BETA);
    let lab = full_lab();
    common::check_curl(&lab, "sin-a-1", lab::ORIGIN_V4.into(), VIA_FRA_A_1);
}

#[test]
fn replies_arriving_at_the_wrong_server_complete_the_connection() {
    // ams-a-1 translates locally to its ports of 192.0.2.10, but the origin routes
    // 192.0.2.10 to fra-a-1, which sends the replies on to ams-a-1.
    let lab = full_lab();
    let before = egress::stats::read(&lab.pin_dir("fra-a-1")).unwrap();
    common::check_curl(&lab, "ams-a-1", lab::ORIGIN_V4.into(), AMS_A_1_ACME);
    common::check_download(&lab, "ams-a-1", lab::ORIGIN_V4.into(), MB50, AMS_A_1_ACME);
    let after = egress::stats::read(&lab.pin_dir("fra-a-1")).unwrap();
    // Bytes, not packets: with GSO the origin's segments arrive in skbs of up to 64 KB.
    let soft =
        |v: &[egress::stats::StatValue]| v.iter().find(|s| s.name == "soft_unicast").unwrap().bytes;
    let moved = soft(&after) - soft(&before);
    assert!(
        moved >= MB50,
        "fra-a-1 passed every reply byte on to ams-a-1 (soft-unicast): {moved} bytes"
    );
    for s in ["fra-a-1", "ams-a-1"] {
        assert_eq!(
            common::counter(&lab, s, "drop_encap_too_big"),
            0,
            "{s}: nothing too big for the tunnel"
        );
    }
}

/// Every reply path: for each tier, the socket's server S, the owner of the port range O and
/// the server the origin's replies arrive at A ∈ {S, O, a third server}; a 50 MB download
/// checked by hash each time. acme's forwarded tiers all lead to fra-a-1 (ports 1024-32767).
#[test]
fn every_reply_path_completes_whoever_receives_the_replies() {
    let lab = full_lab();
    let counted = |c: &str| common::counter(&lab, "fra-a-1", c);
    let (peer0, hinted0) = (counted("peer_snat"), counted("ours_hinted"));
    every_reply_path(&lab, MB50);
    // fra-a-1 translates the forwarded tiers' connections: each packet it sends on leaves
    // through tc_egress once more carrying the sent hint and its tag (the kernel kept the
    // control block through the redirect, and both programs hold the load's key), and passes
    // without a lookup.
    let (peer, hinted) = (
        counted("peer_snat") - peer0,
        counted("ours_hinted") - hinted0,
    );
    eprintln!("fra-a-1: {peer} peer_snat, {hinted} ours_hinted");
    assert!(
        peer > 1000,
        "fra-a-1 translated the peers' connections ({peer})"
    );
    assert_eq!(
        hinted, peer,
        "every peer_snat packet took the hinted second pass"
    );
}

/// The same with `egress agent --xdp` on every server: the reply paths (reverse translation,
/// re-encapsulation to a peer, soft-unicast, a peer's connection, a forwarded connection's
/// reply) are finished in XDP, and every byte still arrives intact.
#[test]
fn every_reply_path_completes_with_xdp_in_front() {
    common::require_root();
    let mut lab = common::lab(egress::config::Config::embedded());
    for s in SERVERS {
        lab.start_agent_xdp(s).expect("agent starts");
        lab.wait_for_log(
            &format!("agent-{s}"),
            0,
            &["xdp_ingress attached"],
            std::time::Duration::from_secs(5),
        )
        .expect("xdp_ingress attached in native mode");
    }
    let counted = |s: &str| {
        (
            common::counter(&lab, s, "xdp_done"),
            common::counter(&lab, s, "ingress_no_flow"),
        )
    };
    let before: Vec<(u64, u64)> = SERVERS.iter().map(|s| counted(s)).collect();
    every_reply_path(&lab, 20 << 20);
    for (s, (done0, stray0)) in SERVERS.iter().zip(before) {
        let (done1, stray1) = counted(s);
        let (done, stray) = (done1 - done0, stray1 - stray0);
        eprintln!("{s}: {done} packets finished in XDP, {stray} ingress_no_flow");
        // Each server holds a socket of one tier or announces acme in one: replies pass it.
        assert!(done > 1000, "{s}: replies finished in XDP ({done})");
        // What XDP passed up is not looked at again by tc_ingress (which would count the
        // translated packets as ingress_no_flow).
        assert!(
            stray * 10 < done,
            "{s}: {stray} ingress_no_flow against {done}"
        );
    }
}

/// Downloads of `size` bytes from sockets on servers of every tier, with acme's replies
/// arriving at each server that may receive them; nothing dropped on the way.
fn every_reply_path(lab: &Lab, size: u64) {
    let acme = std::net::Ipv4Addr::new(192, 0, 2, 10);
    let cases: [(&str, &str, &[&str]); 4] = [
        ("same-server", "fra-a-1", &["fra-a-1", "ams-a-1"]),
        (
            "same-datacenter",
            "fra-a-2",
            &["fra-a-2", "fra-a-1", "ams-a-1"],
        ),
        (
            "same-location",
            "fra-b-1",
            &["fra-b-1", "fra-a-1", "sin-a-1"],
        ),
        (
            "nearest-location",
            "sin-a-1",
            &["sin-a-1", "fra-a-1", "fra-b-1"],
        ),
    ];
    for (tier, socket, announcers) in cases {
        for announcer in announcers {
            lab.announce(acme, announcer).unwrap();
            let before = common::counter(lab, announcer, "soft_unicast");
            eprintln!("{tier}: socket on {socket}, replies arrive at {announcer}");
            common::check_download(lab, socket, lab::ORIGIN_V4.into(), size, VIA_FRA_A_1);
            if *announcer != "fra-a-1" {
                assert!(
                    common::counter(lab, announcer, "soft_unicast") > before,
                    "{tier}: {announcer} passed the replies on to the owner"
                );
            }
        }
    }
    for s in SERVERS {
        for c in ["drop_encap_failed", "drop_encap_too_big", "drop_no_route"] {
            assert_eq!(common::counter(lab, s, c), 0, "{s}: {c}");
        }
    }
}

#[test]
fn ipv6_is_never_forwarded() {
    let lab = full_lab();
    let want = WantSrc {
        addr: "2001:db8:7::c",
        ports: (1024, 65535),
    };
    common::check_curl(&lab, "fra-a-2", lab::ORIGIN_V6.into(), want);
}
