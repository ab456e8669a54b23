//! End to end, BIG TCP: every lab link allows GSO/GRO packets of up to 185,000 bytes (IPv4 BIG
//! TCP: such packets carry a total length of 0), so the programs see packets larger than an IPv4
//! length field can say, on every path: translated here, forwarded through a peer (encapsulated,
//! and decapsulated after GRO at the peer), replies re-encapsulated. Transfers both ways must
//! complete intact, and the receiving namespaces must have seen packets above 64 KiB (else the
//! test proves nothing).

mod common;

use common::WantSrc;
use egress::lab::{self, Lab};

const SERVERS: [&str; 5] = ["fra-a-1", "fra-a-2", "fra-b-1", "ams-a-1", "sin-a-1"];
const VIA_FRA_A_1: WantSrc = WantSrc {
    addr: "192.0.2.10",
    ports: (1024, 32767),
};
const SIZE: u64 = 64 << 20;
const BIG: u32 = 185_000;

/// Raises the GSO/GRO limits of every interface in every lab namespace.
fn enable_big_tcp(lab: &Lab) {
    for ns in lab.namespaces() {
        let links = lab::netns::ip_in(ns, &["-o", "link", "show"]).unwrap();
        for name in links.lines().filter_map(|l| {
            let name = l.split(':').nth(1)?.trim();
            Some(name.split('@').next()?.to_string())
        }) {
            if name == "lo" {
                continue;
            }
            lab::netns::ip_in(
                ns,
                &[
                    "link",
                    "set",
                    "dev",
                    &name,
                    "gso_max_size",
                    &BIG.to_string(),
                    "gro_max_size",
                    &BIG.to_string(),
                ],
            )
            .unwrap_or_else(|e| panic!("{ns} {name}: {e:#}"));
            lab::netns::set_ipv4_big_tcp(ns, &name, BIG)
                .unwrap_or_else(|e| panic!("{ns} {name}: {e:#}"));
        }
    }
}

/// Counts, in `ns`, packets of more than 64 KiB delivered locally (nftables input hook).
fn count_big(lab: &Lab, ns: &str) {
    for args in [
        "add table inet big",
        "add chain inet big in { type filter hook input priority 0 ; }",
        "add rule inet big in meta length > 65535 counter",
    ] {
        let args: Vec<&str> = args.split(' ').collect();
        lab.run(ns, "nft", &args).expect("nft");
    }
}

fn big_seen(lab: &Lab, ns: &str) -> u64 {
    let out = lab
        .run(ns, "nft", &["list", "table", "inet", "big"])
        .unwrap();
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn big_tcp_transfers_complete_local_and_forwarded() {
    let lab = common::lab_with_agents(&SERVERS);
    enable_big_tcp(&lab);
    let origin = lab.origin_ns();
    count_big(&lab, &origin);
    for server in ["fra-a-1", "fra-a-2"] {
        count_big(&lab, &lab.server_ns(server));
    }
    // fra-a-1 translates its own connections; fra-a-2's go through fra-a-1.
    for server in ["fra-a-1", "fra-a-2"] {
        let ns = lab.server_ns(server);
        let before = big_seen(&lab, &ns);
        common::check_download(&lab, server, lab::ORIGIN_V4.into(), SIZE, VIA_FRA_A_1);
        let big = big_seen(&lab, &ns) - before;
        assert!(
            big > 0,
            "{server}: no packet above 64 KiB arrived: not a BIG TCP test"
        );

        let before = big_seen(&lab, &origin);
        common::check_upload(&lab, server, lab::ORIGIN_V4.into(), SIZE, VIA_FRA_A_1);
        let big = big_seen(&lab, &origin) - before;
        assert!(
            big > 0,
            "{server} upload: no packet above 64 KiB arrived at the origin"
        );
    }
    // Nothing was refused as malformed on the way.
    for server in ["fra-a-1", "fra-a-2"] {
        assert_eq!(
            common::counter(&lab, server, "ingress_malformed"),
            0,
            "{server}: BIG TCP packets parsed"
        );
    }
}
