//! The planner: a pure function from a validated topology and "which server am I" to what this
//! server does with new connections of each pool and family, and the map contents that say so.
//!
//! Precedence for IPv4 (first that applies): this server holds a share (`same-server`, SNAT
//! here with all its shares) → servers of the same data center hold shares (`same-datacenter`)
//! → servers of another data center of the same location (`same-location`) → the location with
//! the smallest great-circle distance (ties: smaller name) whose servers hold shares
//! (`nearest-location`) → `unreachable` (drop). IPv6 is always `same-server`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use egress_common::{
    action::{Action, ActionKey, ActionKind, FAMILY_V4, FAMILY_V6, MAX_HOPS, MAX_SNAT, SnatTarget},
    fabric::{AddrKey, OwnerRange, Owners, Peer},
    policy::{POOL_BITS, PeerPolicyKey, PolicyKeyV4, PolicyKeyV6, PolicyValue, prefix_len},
};
use ipnet::IpNet;
use serde::Serialize;

use crate::{
    config::server_ipv6,
    validate::{PORT_MAX, PORT_MIN, Topology},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tier {
    SameServer,
    SameDatacenter,
    SameLocation,
    NearestLocation,
    Unreachable,
}

impl Tier {
    /// The name used in `plan` output.
    pub const fn as_str(self) -> &'static str {
        match self {
            Tier::SameServer => "same-server",
            Tier::SameDatacenter => "same-datacenter",
            Tier::SameLocation => "same-location",
            Tier::NearestLocation => "nearest-location",
            Tier::Unreachable => "unreachable",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionName {
    Snat,
    Forward,
    Drop,
}

/// A pool address and the port range this server hands out from it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Snat {
    pub address: IpAddr,
    pub ports: [u16; 2],
}

/// A peer new connections are forwarded to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct NextHop {
    pub server: String,
    pub fabric: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub pool: String,
    pub pool_id: u32,
    pub family: Family,
    pub tier: Tier,
    pub action: ActionName,
    pub snat: Vec<Snat>,
    pub next_hops: Vec<NextHop>,
}

/// What one server does with each pool and family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub server: String,
    pub entries: Vec<Entry>,
    /// Servers down for new connections from this one, and why (`PEER_*` bits): skipped as
    /// next hops, marked in `PEERS`. Empty unless liveness says otherwise.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub down: BTreeMap<String, u32>,
}

/// A short hash of what a server's plan puts in its maps (what fleet status compares): the
/// first 16 hex digits of the sha256 of its plan and map contents. Equal plans, equal hashes,
/// whichever agent (of one version) computed them.
pub fn plan_hash(t: &Topology, p: &Plan) -> String {
    plan_hash_of(p, &map_contents(t, p))
}

/// [`plan_hash`] of a plan whose map contents are already at hand.
pub fn plan_hash_of(p: &Plan, contents: &MapContents) -> String {
    use sha2::Digest as _;
    use std::io::Write as _;
    // Written into the hash as it is formatted (no text of it is kept).
    let mut h = sha2::Sha256::new();
    serde_json::to_writer(&mut h, p).expect("a plan always serialises");
    write!(h, "\n{contents:?}").expect("a hash takes any bytes");
    crate::fleet::hex(&h.finalize())[..16].to_string()
}

/// Great-circle distance in km between two (latitude, longitude) points, haversine formula.
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    const R: f64 = 6371.0;
    let (la1, lo1, la2, lo2) = (
        a.0.to_radians(),
        a.1.to_radians(),
        b.0.to_radians(),
        b.1.to_radians(),
    );
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * R * h.sqrt().asin()
}

/// Plans `server`'s entries with every server up. `server` must be a server of the topology.
pub fn plan(t: &Topology, server: &str) -> Plan {
    plan_with(t, server, &BTreeMap::new())
}

/// Plans `server`'s entries, skipping the servers in `down` as next hops: a dead holder is
/// passed over; when every holder of a tier is down, the next tier takes over (same data
/// center → same location → nearest location with a live holder → unreachable).
pub fn plan_with(t: &Topology, server: &str, down: &BTreeMap<String, u32>) -> Plan {
    // A server not in the topology holds nothing and reaches nobody: an empty plan.
    let Some(me) = t.server(server) else {
        return Plan {
            server: server.to_string(),
            entries: Vec::new(),
            down: down.clone(),
        };
    };
    // The topology's indexes: consulted per share of every pool (millions of times at fleet
    // scale).
    let dc_of = |s: &str| t.server(s).map(|p| p.datacenter.as_str());
    let loc_of = |s: &str| t.server(s).map(|p| p.location.as_str());
    let fabric_of = |s: &str| t.server(s).map(|p| (p.name.as_str(), p.fabric));
    let my_dc = Some(me.datacenter.as_str());
    let my_loc = Some(me.location.as_str());

    let mut entries = Vec::new();
    for pool in t.pools().values() {
        let holders: BTreeMap<&str, Vec<Snat>> = pool
            .shares
            .iter()
            .filter(|s| s.server == server || !down.contains_key(&s.server))
            .fold(BTreeMap::new(), |mut m, s| {
                m.entry(s.server.as_str())
                    .or_insert_with(Vec::new)
                    .push(Snat {
                        address: IpAddr::V4(s.address),
                        ports: [s.ports.first, s.ports.last],
                    });
                m
            });
        // Only the pool's holders are candidates (a handful), so planning stays linear in
        // the number of shares, not pools × servers. `holders` is ordered by server name.
        let hops = |pred: &dyn Fn(&str) -> bool| -> Vec<NextHop> {
            holders
                .keys()
                .filter(|name| **name != server && pred(name))
                .filter_map(|name| fabric_of(name))
                .map(|(name, fabric)| NextHop {
                    server: name.to_string(),
                    fabric,
                })
                .collect()
        };
        let entry = |tier, snat: Vec<Snat>, next_hops: Vec<NextHop>| Entry {
            pool: pool.name.clone(),
            pool_id: pool.id,
            family: Family::Ipv4,
            tier,
            action: match tier {
                Tier::SameServer => ActionName::Snat,
                Tier::Unreachable => ActionName::Drop,
                _ => ActionName::Forward,
            },
            snat,
            next_hops,
        };

        let v4 = if let Some(mine) = holders.get(server) {
            let mut snat = mine.clone();
            snat.sort();
            entry(Tier::SameServer, snat, vec![])
        } else {
            let same_dc = hops(&|s| dc_of(s) == my_dc);
            let same_loc = hops(&|s| loc_of(s).is_some() && loc_of(s) == my_loc);
            if !same_dc.is_empty() {
                entry(Tier::SameDatacenter, vec![], same_dc)
            } else if !same_loc.is_empty() {
                entry(Tier::SameLocation, vec![], same_loc)
            } else {
                let here = me.coords;
                let nearest = holders
                    .keys()
                    .filter_map(|s| loc_of(s))
                    .filter(|l| Some(*l) != my_loc)
                    .map(|l| (distance_km(here, t.coords(l).unwrap_or((0.0, 0.0))), l))
                    .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(b.1)));
                match nearest {
                    Some((_, loc)) => entry(
                        Tier::NearestLocation,
                        vec![],
                        hops(&|s| loc_of(s) == Some(loc)),
                    ),
                    None => entry(Tier::Unreachable, vec![], vec![]),
                }
            }
        };
        entries.push(v4);

        if let Some(prefix) = pool.ipv6_prefix {
            entries.push(Entry {
                pool: pool.name.clone(),
                pool_id: pool.id,
                family: Family::Ipv6,
                tier: Tier::SameServer,
                action: ActionName::Snat,
                snat: vec![Snat {
                    address: IpAddr::V6(server_ipv6(prefix, me.id)),
                    ports: [PORT_MIN, PORT_MAX],
                }],
                next_hops: vec![],
            });
        }
    }
    entries.sort_by(|a, b| (&a.pool, a.family).cmp(&(&b.pool, b.family)));
    Plan {
        server: server.to_string(),
        entries,
        down: down.clone(),
    }
}

/// Key of a policy trie entry as the agent handles it: (prefix length incl. mark bits, data).
pub type LpmKeyV4 = (u32, PolicyKeyV4);
pub type LpmKeyV6 = (u32, PolicyKeyV6);
pub type LpmKeyPeer = (u32, PeerPolicyKey);

/// Everything the agent writes to the maps for one plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapContents {
    pub policies_v4: BTreeMap<LpmKeyV4, PolicyValue>,
    pub policies_v6: BTreeMap<LpmKeyV6, PolicyValue>,
    /// (pool, IPv4 destination prefix) of every policy, whatever its mark: where a peer's
    /// forwarded connections may go.
    pub peer_policies: BTreeMap<LpmKeyPeer, PolicyValue>,
    pub actions: BTreeMap<ActionKey, Action>,
    /// Fabric address → peer: every other server (GRE is accepted from these only).
    pub peers: BTreeMap<AddrKey, Peer>,
    /// Pool IPv4 address → its shares' owners (soft-unicast).
    pub owners: BTreeMap<AddrKey, Owners>,
}

fn addr16(a: IpAddr) -> [u8; 16] {
    egress_common::policy::family_and_bytes(a).1
}

/// The map encoding of one plan entry.
pub fn action_of(e: &Entry) -> Action {
    let mut a = Action::default();
    match e.action {
        ActionName::Snat => {
            a.kind = ActionKind::Snat as u8;
            for (slot, s) in a.snat.iter_mut().zip(&e.snat) {
                *slot = SnatTarget {
                    addr: addr16(s.address),
                    port_min: s.ports[0],
                    port_max: s.ports[1],
                };
            }
            a.snat_count = e.snat.len().min(MAX_SNAT) as u8;
        }
        ActionName::Forward => {
            a.kind = ActionKind::Forward as u8;
            for (slot, h) in a.hops.iter_mut().zip(&e.next_hops) {
                *slot = h.fabric.octets();
            }
            a.hop_count = e.next_hops.len().min(MAX_HOPS) as u8;
        }
        ActionName::Drop => a.kind = ActionKind::Drop as u8,
    }
    a
}

/// The map contents for `plan` under the topology's policy rules.
pub fn map_contents(t: &Topology, plan: &Plan) -> MapContents {
    let mut m = MapContents::default();
    for e in &plan.entries {
        let family = match e.family {
            Family::Ipv4 => FAMILY_V4,
            Family::Ipv6 => FAMILY_V6,
        };
        m.actions
            .insert(ActionKey::new(e.pool_id, family), action_of(e));
    }
    for s in t.config().servers.iter().filter(|s| s.name != plan.server) {
        let flags = plan.down.get(&s.name).copied().unwrap_or(0);
        m.peers
            .insert(AddrKey::new(s.fabric.octets(), 0), Peer { id: s.id, flags });
    }
    let fabric_of: BTreeMap<&str, Ipv4Addr> = t
        .config()
        .servers
        .iter()
        .map(|s| (s.name.as_str(), s.fabric))
        .collect();
    for pool in t.pools().values() {
        for share in &pool.shares {
            let o = m
                .owners
                .entry(AddrKey::new(share.address.octets(), 0))
                .or_insert(Owners {
                    pool: pool.id,
                    ..Default::default()
                });
            // Validation bounds the shares per address; a longer list cannot reach here.
            if let Some(slot) = o.ranges.get_mut(o.count as usize) {
                *slot = OwnerRange {
                    port_min: share.ports.first,
                    port_max: share.ports.last,
                    fabric: fabric_of[share.server.as_str()].octets(),
                };
                o.count += 1;
            }
        }
    }
    for r in t.rules() {
        let value = PolicyValue {
            pool: t.pools()[&r.pool].id,
        };
        match r.destination {
            IpNet::V4(n) => {
                let key = PolicyKeyV4::new(0, r.mark, n.network().octets());
                m.policies_v4
                    .insert((prefix_len(u32::from(n.prefix_len())), key), value);
                let peer_key = PeerPolicyKey {
                    gen_be: 0,
                    pool_be: value.pool.to_be(),
                    addr: n.network().octets(),
                };
                m.peer_policies
                    .insert((POOL_BITS + u32::from(n.prefix_len()), peer_key), value);
            }
            IpNet::V6(n) => {
                let key = PolicyKeyV6::new(0, r.mark, n.network().octets());
                m.policies_v6
                    .insert((prefix_len(u32::from(n.prefix_len())), key), value);
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, validate::validate};

    /// fra (two data centers), ams (near fra), sin (far); pools chosen per tier.
    const TOPO: &str = r#"
[[locations]]
name = "fra"
latitude = 50.11
longitude = 8.68
[[locations]]
name = "ams"
latitude = 52.37
longitude = 4.90
[[locations]]
name = "sin"
latitude = 1.35
longitude = 103.82
[[datacenters]]
name = "fra-a"
location = "fra"
[[datacenters]]
name = "fra-b"
location = "fra"
[[datacenters]]
name = "ams-a"
location = "ams"
[[datacenters]]
name = "sin-a"
location = "sin"
[[servers]]
name = "fra-a-1"
id = 11
datacenter = "fra-a"
fabric = "10.50.0.11"
uplink = "eth0"
[[servers]]
name = "fra-a-2"
id = 12
datacenter = "fra-a"
fabric = "10.50.0.12"
uplink = "eth0"
[[servers]]
name = "fra-b-1"
id = 21
datacenter = "fra-b"
fabric = "10.50.1.21"
uplink = "eth0"
[[servers]]
name = "ams-a-1"
id = 31
datacenter = "ams-a"
fabric = "10.50.2.31"
uplink = "eth0"
[[servers]]
name = "ams-a-2"
id = 32
datacenter = "ams-a"
fabric = "10.50.2.32"
uplink = "eth0"
[[servers]]
name = "sin-a-1"
id = 41
datacenter = "sin-a"
fabric = "10.50.3.41"
uplink = "eth0"

# fra-a-1 holds two shares on two addresses; ams-a-1 one.
[[pools]]
name = "acme"
id = 7
ipv6_prefix = "2001:db8:7::/64"
[[pools.ipv4]]
address = "192.0.2.11"
shares = [{ server = "fra-a-1", ports = "20000-29999" }, { server = "ams-a-1", ports = "30000-39999" }]
[[pools.ipv4]]
address = "192.0.2.10"
shares = [{ server = "fra-a-1", ports = "1024-9999" }, { server = "fra-a-1", ports = "10000-10999" }]

# Only fra-b-1 (other data center of fra).
[[pools]]
name = "beta"
id = 8
[[pools.ipv4]]
address = "192.0.2.20"
shares = [{ server = "fra-b-1", ports = "1024-65535" }]

# Only the ams servers and sin: ams is nearest to fra.
[[pools]]
name = "gamma"
id = 9
[[pools.ipv4]]
address = "192.0.2.30"
shares = [{ server = "ams-a-2", ports = "1024-30000" }, { server = "ams-a-1", ports = "30001-65535" }]
[[pools.ipv4]]
address = "192.0.2.31"
shares = [{ server = "sin-a-1", ports = "1024-65535" }]

# Reserved only: nobody can carry it.
[[pools]]
name = "delta"
id = 10
[[pools.ipv4]]
address = "192.0.2.40"

# Equidistant tie: "zzz" and "ams2" sit at the same point as ams.
[[pools]]
name = "tie"
id = 11
[[pools.ipv4]]
address = "192.0.2.50"
shares = [{ server = "sin-a-1", ports = "1024-65535" }]
"#;

    fn topo(extra: &str) -> Topology {
        validate(&Config::parse(&format!("{TOPO}{extra}"), "t").unwrap()).unwrap()
    }

    fn entry<'a>(p: &'a Plan, pool: &str, family: Family) -> &'a Entry {
        p.entries
            .iter()
            .find(|e| e.pool == pool && e.family == family)
            .unwrap()
    }

    fn hops(e: &Entry) -> Vec<&str> {
        e.next_hops.iter().map(|h| h.server.as_str()).collect()
    }

    #[test]
    fn tiers_table() {
        let t = topo("");
        struct Case {
            name: &'static str,
            server: &'static str,
            pool: &'static str,
            tier: Tier,
            action: ActionName,
            hops: &'static [&'static str],
        }
        let cases = [
            Case {
                name: "holder SNATs here",
                server: "fra-a-1",
                pool: "acme",
                tier: Tier::SameServer,
                action: ActionName::Snat,
                hops: &[],
            },
            Case {
                name: "same data center",
                server: "fra-a-2",
                pool: "acme",
                tier: Tier::SameDatacenter,
                action: ActionName::Forward,
                hops: &["fra-a-1"],
            },
            Case {
                name: "same location, other data center",
                server: "fra-b-1",
                pool: "acme",
                tier: Tier::SameLocation,
                action: ActionName::Forward,
                hops: &["fra-a-1"],
            },
            Case {
                name: "same data center beats a holder elsewhere in the location",
                server: "ams-a-2",
                pool: "acme",
                tier: Tier::SameDatacenter,
                action: ActionName::Forward,
                hops: &["ams-a-1"],
            },
            Case {
                name: "other data center of the location",
                server: "fra-a-1",
                pool: "beta",
                tier: Tier::SameLocation,
                action: ActionName::Forward,
                hops: &["fra-b-1"],
            },
            Case {
                name: "nearest location, all its holders",
                server: "fra-a-1",
                pool: "gamma",
                tier: Tier::NearestLocation,
                action: ActionName::Forward,
                hops: &["ams-a-1", "ams-a-2"],
            },
            Case {
                name: "from sin the nearest of fra/ams holders",
                server: "sin-a-1",
                pool: "beta",
                tier: Tier::NearestLocation,
                action: ActionName::Forward,
                hops: &["fra-b-1"],
            },
            Case {
                name: "reserved-only pool is unreachable",
                server: "fra-a-1",
                pool: "delta",
                tier: Tier::Unreachable,
                action: ActionName::Drop,
                hops: &[],
            },
        ];
        for c in cases {
            let p = plan(&t, c.server);
            let e = entry(&p, c.pool, Family::Ipv4);
            assert_eq!((e.tier, e.action), (c.tier, c.action), "{}", c.name);
            assert_eq!(hops(e), c.hops, "{}", c.name);
        }
    }

    /// With servers down: the planner skips them, tier by tier, down to unreachable.
    #[test]
    fn down_holders_are_skipped_tier_by_tier() {
        let t = topo("");
        // (case, server, pool, servers down, tier, next hops)
        type Case<'a> = (
            &'a str,
            &'a str,
            &'a str,
            &'a [&'a str],
            Tier,
            &'a [&'a str],
        );
        let cases: &[Case] = &[
            (
                "same data center holder down: nearest location",
                "fra-a-2",
                "acme",
                &["fra-a-1"],
                Tier::NearestLocation,
                &["ams-a-1"],
            ),
            (
                "same location holder down: nearest location",
                "fra-b-1",
                "acme",
                &["fra-a-1"],
                Tier::NearestLocation,
                &["ams-a-1"],
            ),
            (
                "one of two nearest holders down: the other",
                "fra-a-1",
                "gamma",
                &["ams-a-2"],
                Tier::NearestLocation,
                &["ams-a-1"],
            ),
            (
                "every holder of the nearest location down: the next location",
                "fra-a-1",
                "gamma",
                &["ams-a-1", "ams-a-2"],
                Tier::NearestLocation,
                &["sin-a-1"],
            ),
            (
                "every holder down: unreachable",
                "fra-a-1",
                "beta",
                &["fra-b-1"],
                Tier::Unreachable,
                &[],
            ),
            (
                "a server never skips itself",
                "fra-a-1",
                "acme",
                &["fra-a-1", "ams-a-1"],
                Tier::SameServer,
                &[],
            ),
            (
                "someone else down changes nothing",
                "fra-a-2",
                "acme",
                &["sin-a-1"],
                Tier::SameDatacenter,
                &["fra-a-1"],
            ),
        ];
        for (name, server, pool, down, tier, want) in cases {
            let down: BTreeMap<String, u32> = down.iter().map(|d| (d.to_string(), 1)).collect();
            let p = plan_with(&t, server, &down);
            let e = entry(&p, pool, Family::Ipv4);
            assert_eq!(e.tier, *tier, "{name}");
            assert_eq!(hops(e), *want, "{name}");
            // Down peers are marked in PEERS, the rest not.
            let m = map_contents(&t, &p);
            for (k, peer) in &m.peers {
                let s = t
                    .config()
                    .servers
                    .iter()
                    .find(|s| s.fabric.octets() == k.addr)
                    .unwrap();
                assert_eq!(
                    peer.flags != 0,
                    down.contains_key(&s.name),
                    "{name}: {}",
                    s.name
                );
            }
        }
    }

    #[test]
    fn several_shares_sorted_by_address_then_port() {
        let p = plan(&topo(""), "fra-a-1");
        let e = entry(&p, "acme", Family::Ipv4);
        let got: Vec<(String, [u16; 2])> = e
            .snat
            .iter()
            .map(|s| (s.address.to_string(), s.ports))
            .collect();
        assert_eq!(
            got,
            vec![
                ("192.0.2.10".to_string(), [1024, 9999]),
                ("192.0.2.10".to_string(), [10000, 10999]),
                ("192.0.2.11".to_string(), [20000, 29999]),
            ]
        );
    }

    #[test]
    fn ipv6_is_always_same_server_with_the_server_id() {
        let p = plan(&topo(""), "sin-a-1");
        let e = entry(&p, "acme", Family::Ipv6);
        assert_eq!((e.tier, e.action), (Tier::SameServer, ActionName::Snat));
        assert_eq!(
            e.snat,
            vec![Snat {
                address: "2001:db8:7::29".parse().unwrap(),
                ports: [1024, 65535]
            }]
        );
        assert!(
            p.entries
                .iter()
                .all(|e| e.family == Family::Ipv4 || e.pool == "acme"),
            "no v6 entry without a prefix"
        );
    }

    #[test]
    fn equidistant_locations_tie_break_on_the_smaller_name() {
        // Two more locations at exactly the same point, each with a holder of "tie".
        let extra = r#"
[[locations]]
name = "zzz"
latitude = 1.35
longitude = 103.82
[[locations]]
name = "aaa"
latitude = 1.35
longitude = 103.82
[[datacenters]]
name = "zzz-a"
location = "zzz"
[[datacenters]]
name = "aaa-a"
location = "aaa"
[[servers]]
name = "zzz-1"
id = 51
datacenter = "zzz-a"
fabric = "10.50.5.51"
uplink = "eth0"
[[servers]]
name = "aaa-1"
id = 61
datacenter = "aaa-a"
fabric = "10.50.6.61"
uplink = "eth0"
[[pools]]
name = "tie2"
id = 12
[[pools.ipv4]]
address = "192.0.2.60"
shares = [{ server = "zzz-1", ports = "1024-2000" }, { server = "aaa-1", ports = "2001-3000" }]
"#;
        let p = plan(&topo(extra), "fra-a-1");
        let e = entry(&p, "tie2", Family::Ipv4);
        assert_eq!(e.tier, Tier::NearestLocation);
        assert_eq!(hops(e), ["aaa-1"], "aaa < zzz at equal distance");
    }

    #[test]
    fn entries_sorted_by_pool_then_family() {
        let p = plan(&topo(""), "fra-a-1");
        let keys: Vec<(&str, Family)> = p
            .entries
            .iter()
            .map(|e| (e.pool.as_str(), e.family))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(keys[0], ("acme", Family::Ipv4));
        assert_eq!(keys[1], ("acme", Family::Ipv6));
    }

    #[test]
    fn distance_is_great_circle() {
        let fra = (50.11, 8.68);
        let ams = (52.37, 4.90);
        let d = distance_km(fra, ams);
        assert!((350.0..380.0).contains(&d), "fra-ams {d} km");
        assert!(distance_km(fra, (1.35, 103.82)) > 10_000.0);
    }

    #[test]
    fn a_server_not_in_the_topology_gets_an_empty_plan_not_a_panic() {
        let t = topo("");
        let p = plan(&t, "nowhere-1");
        assert!(p.entries.is_empty(), "{p:?}");
        assert_eq!(p.server, "nowhere-1");
        assert!(!plan(&t, "fra-a-1").entries.is_empty());
    }

    #[test]
    fn map_contents_encode_snat_and_marks() {
        let extra = "\n[[policies]]\npool = \"acme\"\nmark = 5\ndestinations = [\"203.0.113.0/24\", \"2001:db8:beef::/48\"]\n";
        let t = topo(extra);
        let m = map_contents(&t, &plan(&t, "fra-a-1"));
        let a = m.actions[&ActionKey::new(7, FAMILY_V4)];
        assert_eq!((a.kind, a.snat_count), (ActionKind::Snat as u8, 3));
        assert_eq!(&a.snat[0].addr[..4], &[192, 0, 2, 10]);
        assert_eq!((a.snat[0].port_min, a.snat[0].port_max), (1024, 9999));
        assert_eq!(
            m.actions[&ActionKey::new(10, FAMILY_V4)].kind,
            ActionKind::Drop as u8
        );
        let fwd = m.actions[&ActionKey::new(8, FAMILY_V4)];
        assert_eq!(
            (fwd.kind, fwd.hop_count, fwd.hops[0]),
            (ActionKind::Forward as u8, 1, [10, 50, 1, 21])
        );
        assert_eq!(m.peers.len(), 5, "every other server is a peer");
        assert!(
            !m.peers.contains_key(&AddrKey::new([10, 50, 0, 11], 0)),
            "not this server itself"
        );
        let o = m.owners[&AddrKey::new([192, 0, 2, 11], 0)];
        assert_eq!((o.pool, o.count), (7, 2));
        let ams = o.ranges[..2]
            .iter()
            .find(|r| r.port_min == 30000)
            .expect("ams-a-1's range");
        assert_eq!((ams.port_max, ams.fabric), (39999, [10, 50, 2, 31]));
        let k = (
            egress_common::policy::MARK_BITS + 24,
            PolicyKeyV4 {
                gen_be: 0,
                mark_be: 5u32.to_be(),
                addr: [203, 0, 113, 0],
            },
        );
        assert_eq!(m.policies_v4[&k], PolicyValue { pool: 7 });
        assert_eq!(m.policies_v6.len(), 1);
    }
}
