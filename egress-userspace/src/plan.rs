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
    action::{Action, ActionKey, ActionKind, FAMILY_V4, FAMILY_V6, MAX_SNAT, SnatTarget},
    policy::{MARK_BITS, PolicyKeyV4, PolicyKeyV6, PolicyValue},
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

/// Plans `server`'s entries. `server` must be a server of the topology.
pub fn plan(t: &Topology, server: &str) -> Plan {
    let c = &t.config;
    let dc_of: BTreeMap<&str, &str> = c
        .servers
        .iter()
        .map(|s| (s.name.as_str(), s.datacenter.as_str()))
        .collect();
    let loc_of_dc: BTreeMap<&str, &str> = c
        .datacenters
        .iter()
        .map(|d| (d.name.as_str(), d.location.as_str()))
        .collect();
    let loc_of = |s: &str| dc_of.get(s).and_then(|dc| loc_of_dc.get(dc)).copied();
    let coords: BTreeMap<&str, (f64, f64)> = c
        .locations
        .iter()
        .map(|l| (l.name.as_str(), (l.latitude, l.longitude)))
        .collect();
    let me = c
        .servers
        .iter()
        .find(|s| s.name == server)
        .expect("server is in the topology");
    let my_dc = me.datacenter.as_str();
    let my_loc = loc_of(server);

    let mut entries = Vec::new();
    for pool in t.pools.values() {
        let holders: BTreeMap<&str, Vec<Snat>> =
            pool.shares.iter().fold(BTreeMap::new(), |mut m, s| {
                m.entry(s.server.as_str())
                    .or_insert_with(Vec::new)
                    .push(Snat {
                        address: IpAddr::V4(s.address),
                        ports: [s.ports.first, s.ports.last],
                    });
                m
            });
        let hops = |pred: &dyn Fn(&str) -> bool| -> Vec<NextHop> {
            c.servers
                .iter()
                .filter(|s| {
                    s.name != server && holders.contains_key(s.name.as_str()) && pred(&s.name)
                })
                .map(|s| NextHop {
                    server: s.name.clone(),
                    fabric: s.fabric,
                })
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
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
            let same_dc = hops(&|s| dc_of.get(s) == Some(&my_dc));
            let same_loc = hops(&|s| loc_of(s).is_some() && loc_of(s) == my_loc);
            if !same_dc.is_empty() {
                entry(Tier::SameDatacenter, vec![], same_dc)
            } else if !same_loc.is_empty() {
                entry(Tier::SameLocation, vec![], same_loc)
            } else {
                let here = my_loc
                    .and_then(|l| coords.get(l))
                    .copied()
                    .unwrap_or((0.0, 0.0));
                let nearest = holders
                    .keys()
                    .filter_map(|s| loc_of(s))
                    .filter(|l| Some(*l) != my_loc)
                    .map(|l| {
                        (
                            distance_km(here, coords.get(l).copied().unwrap_or((0.0, 0.0))),
                            l,
                        )
                    })
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
    }
}

/// Key of a policy trie entry as the agent handles it: (prefix length incl. mark bits, data).
pub type LpmKeyV4 = (u32, PolicyKeyV4);
pub type LpmKeyV6 = (u32, PolicyKeyV6);

/// Everything the agent writes to the maps for one plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapContents {
    pub policies_v4: BTreeMap<LpmKeyV4, PolicyValue>,
    pub policies_v6: BTreeMap<LpmKeyV6, PolicyValue>,
    pub actions: BTreeMap<ActionKey, Action>,
}

fn addr16(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            b
        }
        IpAddr::V6(v6) => v6.octets(),
    }
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
        // Forwarding has no datapath yet: such pools pass unchanged, counted as not held here.
        ActionName::Forward => a.kind = ActionKind::NotHeld as u8,
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
    for r in &t.rules {
        let value = PolicyValue {
            pool: t.pools[&r.pool].id,
        };
        let mark_be = r.mark.to_be();
        match r.destination {
            IpNet::V4(n) => {
                let key = PolicyKeyV4 {
                    mark_be,
                    addr: n.network().octets(),
                };
                m.policies_v4
                    .insert((MARK_BITS + u32::from(n.prefix_len()), key), value);
            }
            IpNet::V6(n) => {
                let key = PolicyKeyV6 {
                    mark_be,
                    addr: n.network().octets(),
                };
                m.policies_v6
                    .insert((MARK_BITS + u32::from(n.prefix_len()), key), value);
            }
        }
    }
    m
}
