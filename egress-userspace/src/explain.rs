//! `explain`: which policy, pool, tier and next hops apply to a destination from one server,
//! and why. Pure, like the planner; the lookup mirrors the datapath's (the packet's mark first,
//! longest prefix; then mark 0).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::{
    plan::{self, Entry, Family, Tier},
    validate::{Rule, Topology},
};

/// The policy rule a destination matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Matched {
    /// `policies[i]` in the config.
    pub policy: usize,
    pub mark: u32,
    pub destination: IpNet,
    pub pool: String,
    /// The packet's mark had no rule for this destination; mark 0's applied.
    pub fell_back_to_mark_0: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explanation {
    pub server: String,
    pub destination: IpAddr,
    pub mark: u32,
    pub matched: Option<Matched>,
    pub entry: Option<Entry>,
    pub why: String,
}

/// The longest-prefix rule for `dst` among rules of `mark`.
fn lookup(rules: &[Rule], dst: IpAddr, mark: u32) -> Option<&Rule> {
    rules
        .iter()
        .filter(|r| r.mark == mark && r.destination.contains(&dst))
        .max_by_key(|r| r.destination.prefix_len())
}

pub fn explain(t: &Topology, server: &str, dst: IpAddr, mark: u32) -> Explanation {
    // The programs' rule (egress_common::policy::pool_for_mark), over the config's rules.
    let mut found = None;
    let (family, bytes) = egress_common::policy::family_and_bytes(dst);
    let coverable = egress_common::policy::coverable(family, &bytes);
    if coverable {
        egress_common::policy::pool_for_mark(mark, |m| {
            found = lookup(t.rules(), dst, m);
            found.map(|_| m)
        });
    }
    let direct = found.filter(|r| r.mark == mark);
    let rule = found;
    let Some(rule) = rule else {
        return Explanation {
            server: server.to_string(),
            destination: dst,
            mark,
            matched: None,
            entry: None,
            why: if coverable {
                format!(
                    "no policy covers {dst} (mark {mark}{}): sent unchanged from {server}'s own address",
                    if mark != 0 { " or 0" } else { "" }
                )
            } else {
                format!(
                    "no policy covers {dst}: unspecified, loopback, link-local, multicast and broadcast destinations are never translated; sent unchanged from {server}'s own address"
                )
            },
        };
    };
    let family = if dst.is_ipv4() {
        Family::Ipv4
    } else {
        Family::Ipv6
    };
    let p = plan::plan(t, server);
    let entry = p
        .entries
        .into_iter()
        .find(|e| e.pool == rule.pool && e.family == family);
    let why = match &entry {
        None => format!(
            "pool {} has no IPv6 prefix: new connections are dropped (drop_no_action)",
            rule.pool
        ),
        Some(e) => reason(t, server, e),
    };
    Explanation {
        server: server.to_string(),
        destination: dst,
        mark,
        matched: Some(Matched {
            policy: rule.policy,
            mark: rule.mark,
            destination: rule.destination,
            pool: rule.pool.clone(),
            fell_back_to_mark_0: direct.is_none(),
        }),
        entry,
        why,
    }
}

fn reason(t: &Topology, server: &str, e: &Entry) -> String {
    let (dc, loc) = t
        .server(server)
        .map_or(("?", "?"), |p| (p.datacenter.as_str(), p.location.as_str()));
    let hops: Vec<&str> = e.next_hops.iter().map(|h| h.server.as_str()).collect();
    let snat: Vec<String> = e
        .snat
        .iter()
        .map(|s| format!("{} ports {}-{}", s.address, s.ports[0], s.ports[1]))
        .collect();
    match (e.family, e.tier) {
        (Family::Ipv6, _) => format!(
            "IPv6 is never forwarded: {server} translates to its own address in the pool's prefix ({})",
            snat.join(", ")
        ),
        (_, Tier::SameServer) => format!(
            "{server} holds a share of {}: translated here to {}",
            e.pool,
            snat.join(", ")
        ),
        (_, Tier::SameDatacenter) => format!(
            "{server} holds no share of {}; in its data center {dc}, {} do: forwarded there",
            e.pool,
            hops.join(", ")
        ),
        (_, Tier::SameLocation) => format!(
            "no server of data center {dc} holds {}; elsewhere in location {loc}, {} do: forwarded there",
            e.pool,
            hops.join(", ")
        ),
        (_, Tier::NearestLocation) => {
            let hop_loc = e
                .next_hops
                .first()
                .and_then(|h| t.server(&h.server))
                .map(|p| p.location.clone())
                .unwrap_or_default();
            let km = match (t.coords(loc), t.coords(&hop_loc)) {
                (Some(a), Some(b)) => format!(" ({:.0} km)", plan::distance_km(a, b)),
                _ => String::new(),
            };
            format!(
                "no server of location {loc} holds {}; the nearest location holding it is {hop_loc}{km}: forwarded to {}",
                e.pool,
                hops.join(", ")
            )
        }
        (_, Tier::Unreachable) => format!(
            "no server holds a share of {}: new connections are dropped (drop_pool_unreachable)",
            e.pool
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, validate::validate};

    #[test]
    fn explains_the_default_lab() {
        let t = validate(&Config::embedded()).unwrap();
        struct Case {
            server: &'static str,
            dst: &'static str,
            mark: u32,
            pool: Option<&'static str>,
            tier: Option<Tier>,
            says: &'static str,
        }
        let cases = [
            Case {
                server: "fra-a-1",
                dst: "203.0.113.1",
                mark: 0,
                pool: Some("acme"),
                tier: Some(Tier::SameServer),
                says: "translated here to 192.0.2.10 ports 1024-32767",
            },
            Case {
                server: "fra-a-2",
                dst: "203.0.113.1",
                mark: 0,
                pool: Some("acme"),
                tier: Some(Tier::SameDatacenter),
                says: "in its data center fra-a, fra-a-1 do",
            },
            Case {
                server: "fra-b-1",
                dst: "203.0.113.9",
                mark: 7,
                pool: Some("acme"),
                tier: Some(Tier::SameLocation),
                says: "location fra",
            },
            Case {
                server: "fra-a-1",
                dst: "203.0.113.200",
                mark: 0,
                pool: Some("beta"),
                tier: Some(Tier::NearestLocation),
                says: "nearest location holding it is ams (",
            },
            Case {
                server: "sin-a-1",
                dst: "2001:db8:beef::5",
                mark: 0,
                pool: Some("acme"),
                tier: Some(Tier::SameServer),
                says: "IPv6 is never forwarded",
            },
            Case {
                server: "fra-a-1",
                dst: "198.51.100.1",
                mark: 0,
                pool: None,
                tier: None,
                says: "no policy covers 198.51.100.1",
            },
        ];
        for c in cases {
            let e = explain(&t, c.server, c.dst.parse().unwrap(), c.mark);
            assert_eq!(
                e.matched.as_ref().map(|m| m.pool.as_str()),
                c.pool,
                "{} {}",
                c.server,
                c.dst
            );
            assert_eq!(
                e.entry.as_ref().map(|e| e.tier),
                c.tier,
                "{} {}",
                c.server,
                c.dst
            );
            assert!(e.why.contains(c.says), "{} {}: {}", c.server, c.dst, e.why);
            if c.mark != 0 && c.pool.is_some() {
                assert!(
                    e.matched.unwrap().fell_back_to_mark_0,
                    "mark {} has no rules: fallback",
                    c.mark
                );
            }
        }
    }

    #[test]
    fn longest_prefix_and_mark_first() {
        let extra =
            "\n[[policies]]\npool = \"beta\"\nmark = 9\ndestinations = [\"203.0.113.0/24\"]\n";
        let t = validate(
            &Config::parse(&format!("{}{extra}", crate::config::DEFAULT_CONFIG), "t").unwrap(),
        )
        .unwrap();
        let by_mark = explain(&t, "fra-a-1", "203.0.113.1".parse().unwrap(), 9);
        assert_eq!(
            by_mark.matched.unwrap().pool,
            "beta",
            "mark 9's rule wins over mark 0"
        );
        let longest = explain(&t, "fra-a-1", "203.0.113.200".parse().unwrap(), 0);
        assert_eq!(
            longest.matched.unwrap().destination.to_string(),
            "203.0.113.128/25"
        );
    }

    #[test]
    fn a_catch_all_never_covers_link_local_multicast_or_broadcast() {
        let extra = "\n[[policies]]\npool = \"beta\"\nmark = 9\ndestinations = [\"0.0.0.0/0\"]\n";
        let t = validate(
            &Config::parse(&format!("{}{extra}", crate::config::DEFAULT_CONFIG), "t").unwrap(),
        )
        .unwrap();
        let e = explain(&t, "fra-a-1", "198.51.100.1".parse().unwrap(), 9);
        assert_eq!(
            e.matched.unwrap().pool,
            "beta",
            "the catch-all covers unicast"
        );
        for dst in [
            "224.0.0.251",
            "255.255.255.255",
            "169.254.1.1",
            "ff02::1",
            "fe80::1",
        ] {
            let e = explain(&t, "fra-a-1", dst.parse().unwrap(), 9);
            assert!(e.matched.is_none(), "{dst}: {e:?}");
            assert!(e.why.contains("never translated"), "{dst}: {}", e.why);
        }
        for (dst, want) in [
            ("0.0.0.1", false),
            ("1.0.0.0", true),
            ("126.255.255.255", true),
            ("127.0.0.1", false),
            ("169.253.0.1", true),
            ("169.254.0.1", false),
            ("169.255.0.1", true),
            ("223.255.255.255", true),
            ("224.0.0.0", false),
            ("::1", false),
            ("::ffff:192.0.2.1", false),
            ("64:ff9b::c000:201", true),
            ("64:ff9b:1::1", true),
            ("100::1", true),
            ("fe7f::1", true),
            ("fe80::1", false),
            ("febf::1", false),
            ("fec0::1", true),
            ("feff::1", true),
            ("ff00::1", false),
        ] {
            let (f, b) = egress_common::policy::family_and_bytes(dst.parse().unwrap());
            assert_eq!(egress_common::policy::coverable(f, &b), want, "{dst}");
        }
    }
}
