//! Validation: a parsed [`Config`] checked as a whole and turned into a [`Topology`] whose
//! values are typed (port ranges parsed, prefixes normalised, references resolved).
//!
//! Every error names the field path (`pools[2].ipv4[0].shares[1].ports`) and the bad value, and
//! all errors are reported at once.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use ipnet::{IpNet, Ipv6Net};

use crate::config::Config;

/// One problem in a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// All problems of a config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidConfig(pub Vec<Invalid>);

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid config ({} problem{}):",
            self.0.len(),
            if self.0.len() == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// Lowest and highest port a share may hold (below 1024 stays the server's own).
pub const PORT_MIN: u16 = 1024;
pub const PORT_MAX: u16 = 65535;
/// Most locations one IPv4 pool address may be announced from.
pub const MAX_LOCATIONS_PER_ADDRESS: usize = 4;
/// Longest IPv6 pool prefix: leaves 16 bits for server ids.
pub const MAX_V6_PREFIX_LEN: u8 = 112;

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn overlaps(&self, o: &PortRange) -> bool {
        self.first <= o.last && o.first <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// A server's share of a pool's IPv4 address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Share {
    pub address: Ipv4Addr,
    pub server: String,
    pub ports: PortRange,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub name: String,
    pub id: u32,
    pub ipv6_prefix: Option<Ipv6Net>,
    /// Every IPv4 address of the pool, shared or reserved.
    pub addresses: Vec<Ipv4Addr>,
    pub shares: Vec<Share>,
}

/// One `(mark, destination)` → pool rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub mark: u32,
    pub destination: IpNet,
    pub pool: String,
    /// Index of the policy in the config (`policies[i]`).
    pub policy: usize,
}

/// A server placed in the topology: what planning and explaining look up, resolved once.
#[derive(Debug, Clone, PartialEq)]
pub struct Placed {
    pub name: String,
    pub id: u32,
    pub fabric: Ipv4Addr,
    pub datacenter: String,
    pub location: String,
    /// The location's latitude and longitude.
    pub coords: (f64, f64),
}

/// A validated config: only [`validate`] makes one, so every name in it resolves (pools of
/// rules, servers of shares, datacenters and locations of servers) and the lookups below
/// need no fallbacks.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    config: Config,
    /// Pools by name.
    pools: BTreeMap<String, Pool>,
    rules: Vec<Rule>,
    /// Servers by name.
    servers: HashMap<String, Placed>,
    /// Each location's coordinates.
    locations: HashMap<String, (f64, f64)>,
}

impl Topology {
    /// The config as validated.
    pub fn config(&self) -> &Config {
        &self.config
    }
    /// Pools by name.
    pub fn pools(&self) -> &BTreeMap<String, Pool> {
        &self.pools
    }
    /// One rule per (policy, destination).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
    /// Server `name`, placed (None: not in the topology).
    pub fn server(&self, name: &str) -> Option<&Placed> {
        self.servers.get(name)
    }
    /// The coordinates of location `name`.
    pub fn coords(&self, location: &str) -> Option<(f64, f64)> {
        self.locations.get(location).copied()
    }

    /// Builds the indexes of a config that passed every check.
    fn resolved(config: &Config, pools: BTreeMap<String, Pool>, rules: Vec<Rule>) -> Topology {
        let locations: HashMap<String, (f64, f64)> = config
            .locations
            .iter()
            .map(|l| (l.name.clone(), (l.latitude, l.longitude)))
            .collect();
        let location_of: HashMap<&str, &str> = config
            .datacenters
            .iter()
            .map(|d| (d.name.as_str(), d.location.as_str()))
            .collect();
        let servers = config
            .servers
            .iter()
            .map(|s| {
                let location = location_of
                    .get(s.datacenter.as_str())
                    .copied()
                    .unwrap_or_default()
                    .to_string();
                let placed = Placed {
                    name: s.name.clone(),
                    id: s.id,
                    fabric: s.fabric,
                    datacenter: s.datacenter.clone(),
                    coords: locations.get(&location).copied().unwrap_or_default(),
                    location,
                };
                (s.name.clone(), placed)
            })
            .collect();
        Topology {
            config: config.clone(),
            pools,
            rules,
            servers,
            locations,
        }
    }
}

/// An uplink must be a name Linux accepts for an interface that can carry traffic out: 1-15
/// bytes, no '/', ':' or whitespace, not "." or "..", and not the loopback.
fn check_ifname(name: &str) -> Result<(), String> {
    let ok = (1..=15).contains(&name.len())
        && !matches!(name, "." | "..")
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b < 0x20);
    if !ok {
        return Err(format!(
            "{name:?} is not an interface name (1-15 characters, no '/', ':' or spaces)"
        ));
    }
    if name == "lo" {
        return Err("\"lo\" is the loopback, not an uplink".into());
    }
    Ok(())
}

/// A pool address must be one an origin can see as a source: unicast, routable.
fn check_pool_address(a: Ipv4Addr) -> Result<(), String> {
    let why = match not_a_host(a) {
        Some(why) => why,
        None if a.is_link_local() => "link-local",
        None => return Ok(()),
    };
    Err(format!(
        "{a} is {why}, not a source address an origin can see"
    ))
}

/// Why `a` cannot be a host's own address, if it cannot.
fn not_a_host(a: Ipv4Addr) -> Option<&'static str> {
    Some(if a.is_unspecified() {
        "unspecified"
    } else if a.is_broadcast() {
        "the broadcast address"
    } else if a.is_multicast() {
        "multicast"
    } else if a.is_loopback() {
        "loopback"
    } else if a.octets()[0] == 0 || a.octets()[0] >= 240 {
        "reserved"
    } else {
        return None;
    })
}

/// A fabric address must be one a host can have: GRE between servers runs between them.
fn check_fabric_address(a: Ipv4Addr) -> Result<(), String> {
    match not_a_host(a) {
        Some(why) => Err(format!(
            "{a} is {why}, not an address a server's fabric interface can have"
        )),
        None => Ok(()),
    }
}

/// Ranges no pool's IPv6 prefix may overlap: their addresses are not sources an origin can
/// answer (`::/8` holds the unspecified and loopback addresses and the IPv4-mapped range).
const V6_NOT_SOURCES: [(&str, &str); 3] = [
    ("::/8", "reserved (unspecified, loopback, IPv4-mapped)"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
];

fn check_pool_prefix_v6(prefix: Ipv6Net) -> Result<(), String> {
    for (range, why) in V6_NOT_SOURCES {
        let r: Ipv6Net = range.parse().expect("literal prefix");
        if r.contains(&prefix.network()) || prefix.contains(&r.network()) {
            return Err(format!(
                "{prefix} overlaps {range}, {why}: not a source address an origin can see"
            ));
        }
    }
    Ok(())
}

/// The destination ranges no policy covers (`egress_common::policy::coverable`, which the
/// programs ask), named for the refusal of a destination that lies wholly inside one.
const NEVER_COVERED: [(&str, &str); 7] = [
    ("0.0.0.0/8", "unspecified"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/3", "multicast, reserved and broadcast"),
    ("::/16", "unspecified, loopback and IPv4-mapped"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
];

/// A policy destination lying wholly inside a range no policy covers would match nothing (a
/// wider one, a catch-all, simply skips those ranges).
fn check_coverable(net: IpNet) -> Result<(), String> {
    for (range, why) in NEVER_COVERED {
        let r: IpNet = range.parse().expect("literal prefix");
        if r.contains(&net) {
            return Err(format!(
                "{net} lies within {range} ({why}), which no policy covers: it would match nothing"
            ));
        }
    }
    Ok(())
}

/// Parses "first-last" (or a single port).
pub fn parse_ports(s: &str) -> Result<PortRange, String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    // Digits only: no spaces, no signs (u32's parser would take "+1024").
    let parse = |p: &str| {
        p.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| p.parse::<u32>().ok())
            .flatten()
            .ok_or_else(|| format!("{s:?} is not a port range like \"1024-32767\""))
    };
    let (first, last) = (parse(a)?, parse(b)?);
    if first > last {
        return Err(format!("{s:?} is reversed (first port above last)"));
    }
    if first < u32::from(PORT_MIN) || last > u32::from(PORT_MAX) {
        return Err(format!("{s:?} is outside {PORT_MIN}-{PORT_MAX}"));
    }
    Ok(PortRange {
        first: first as u16,
        last: last as u16,
    })
}

/// Parses a policy destination: a prefix, or a bare address (a host route). Host bits must be 0.
pub fn parse_destination(s: &str) -> Result<IpNet, String> {
    let net = match s.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match s.parse::<IpAddr>() {
            Ok(a) => IpNet::from(a),
            Err(_) => return Err(format!("{s:?} is not an IP prefix or address")),
        },
    };
    if net.trunc() != net {
        return Err(format!(
            "{s:?} has host bits set (did you mean {}?)",
            net.trunc()
        ));
    }
    Ok(net)
}

#[derive(Default)]
struct Errors(Vec<Invalid>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Invalid {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Where an item sits in the config (`pools[3].ipv4[0].shares[1]`, then a field), rendered
/// only when a message names it: a large config has hundreds of thousands of items and,
/// usually, no error.
#[derive(Clone, Copy, Debug)]
struct At {
    levels: [(&'static str, usize); 3],
    depth: usize,
    field: Option<&'static str>,
}

impl At {
    fn new(section: &'static str, i: usize) -> At {
        At {
            levels: [(section, i), ("", 0), ("", 0)],
            depth: 1,
            field: None,
        }
    }
    /// Item `i` of list `name` inside this one.
    fn sub(self, name: &'static str, i: usize) -> At {
        let mut at = self;
        if at.depth < at.levels.len() {
            at.levels[at.depth] = (name, i);
            at.depth += 1;
        }
        at
    }
    /// Field `name` of this item.
    fn field(self, name: &'static str) -> At {
        At {
            field: Some(name),
            ..self
        }
    }
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, (name, i)) in self.levels[..self.depth].iter().enumerate() {
            if k > 0 {
                f.write_str(".")?;
            }
            write!(f, "{name}[{i}]")?;
        }
        match self.field {
            Some(field) => write!(f, ".{field}"),
            None => Ok(()),
        }
    }
}

impl From<At> for String {
    fn from(at: At) -> String {
        at.to_string()
    }
}

/// Checks that `name` was not seen before among `kind`; records it.
fn unique<T: std::hash::Hash + Eq + Clone + fmt::Debug>(
    errs: &mut Errors,
    seen: &mut HashMap<T, At>,
    value: &T,
    at: At,
    what: &str,
) {
    if let Some(first) = seen.get(value) {
        errs.add(at, format!("duplicate {what} {value:?} (first at {first})"));
    } else {
        seen.insert(value.clone(), at);
    }
}

/// Validates a config; returns every problem found. One function per section; each records
/// what later sections look up (names, each server's location).
pub fn validate(c: &Config) -> Result<Topology, InvalidConfig> {
    let mut errs = Errors::default();
    if c.servers.is_empty() {
        errs.add("servers", "no servers: a topology needs at least one");
    }
    let locations = locations(&mut errs, c);
    let dc_location = datacenters(&mut errs, c, &locations);
    let servers = servers(&mut errs, c, &dc_location);
    let pools = pools(&mut errs, c, &servers);
    let rules = policies(&mut errs, c, &pools);
    capacities(&mut errs, c, &rules);
    if errs.0.is_empty() {
        Ok(Topology::resolved(c, pools, rules))
    } else {
        Err(InvalidConfig(errs.0))
    }
}

/// `locations`: unique names, coordinates on the globe. Returns the names.
fn locations(errs: &mut Errors, c: &Config) -> HashMap<String, At> {
    let mut locations = HashMap::new();
    for (i, l) in c.locations.iter().enumerate() {
        let p = At::new("locations", i);
        unique(
            errs,
            &mut locations,
            &l.name,
            p.field("name"),
            "location name",
        );
        if !(-90.0..=90.0).contains(&l.latitude) {
            errs.add(
                p.field("latitude"),
                format!("{} is outside -90..90", l.latitude),
            );
        }
        if !(-180.0..=180.0).contains(&l.longitude) {
            errs.add(
                p.field("longitude"),
                format!("{} is outside -180..180", l.longitude),
            );
        }
    }
    locations
}

/// `datacenters`: unique names, known locations. Returns each datacenter's location.
fn datacenters<'c>(
    errs: &mut Errors,
    c: &'c Config,
    locations: &HashMap<String, At>,
) -> HashMap<&'c str, &'c str> {
    let mut dc_location = HashMap::new();
    let mut dcs = HashMap::new();
    for (i, d) in c.datacenters.iter().enumerate() {
        let p = At::new("datacenters", i);
        unique(errs, &mut dcs, &d.name, p.field("name"), "datacenter name");
        if !locations.contains_key(&d.location) {
            errs.add(
                p.field("location"),
                format!("unknown location {:?}", d.location),
            );
        }
        dc_location.insert(d.name.as_str(), d.location.as_str());
    }
    dc_location
}

/// What the server section tells the pool section.
struct Servers<'c> {
    /// Every server name seen.
    names: HashMap<String, At>,
    /// Each server's location (servers of a known datacenter).
    location: HashMap<&'c str, &'c str>,
    /// Fabric addresses and the server holding each.
    fabrics: HashMap<Ipv4Addr, &'c str>,
}

/// `servers` (and `server`): unique names, ids and fabric addresses; names that can name a
/// pin directory; Linux interface names; known datacenters.
fn servers<'c>(
    errs: &mut Errors,
    c: &'c Config,
    dc_location: &HashMap<&'c str, &'c str>,
) -> Servers<'c> {
    let mut location = HashMap::new();
    let (mut names, mut ids, mut fabrics) = (HashMap::new(), HashMap::new(), HashMap::new());
    for (i, s) in c.servers.iter().enumerate() {
        let p = At::new("servers", i);
        unique(errs, &mut names, &s.name, p.field("name"), "server name");
        unique(errs, &mut ids, &s.id, p.field("id"), "server id");
        unique(
            errs,
            &mut fabrics,
            &s.fabric,
            p.field("fabric"),
            "fabric address",
        );
        if let Err(m) = check_fabric_address(s.fabric) {
            errs.add(p.field("fabric"), m);
        }
        if !(1..=65535).contains(&s.id) {
            errs.add(p.field("id"), format!("{} is outside 1..=65535", s.id));
        }
        if let Err(m) = check_ifname(&s.uplink) {
            errs.add(p.field("uplink"), m);
        }
        if s.name.trim().is_empty() {
            errs.add(p.field("name"), "is empty");
        } else if matches!(s.name.as_str(), "." | "..")
            || s.name.contains('/')
            || s.name.chars().any(char::is_control)
        {
            // It names the server's pin directory.
            errs.add(
                p.field("name"),
                format!(
                    "{:?} cannot name a directory (no '/', '.', '..' or control characters)",
                    s.name
                ),
            );
        }
        match dc_location.get(s.datacenter.as_str()) {
            Some(loc) => {
                location.insert(s.name.as_str(), *loc);
            }
            None => errs.add(
                p.field("datacenter"),
                format!("unknown datacenter {:?}", s.datacenter),
            ),
        }
    }
    if let Some(s) = &c.server
        && !names.contains_key(s)
    {
        errs.add("server", format!("unknown server {s:?}"));
    }
    let fabrics = c
        .servers
        .iter()
        .map(|s| (s.fabric, s.name.as_str()))
        .collect();
    Servers {
        names,
        location,
        fabrics,
    }
}

/// `pools`: unique names, ids and addresses; ids that fit the GRE key; IPv6 prefixes; each
/// address's shares ([`pool_address`]); at most `MAX_SNAT` shares of a pool per server.
fn pools(errs: &mut Errors, c: &Config, servers: &Servers) -> BTreeMap<String, Pool> {
    let mut pools = BTreeMap::new();
    let (mut pool_names, mut pool_ids, mut addresses) =
        (HashMap::new(), HashMap::new(), HashMap::new());
    let mut prefixes: Vec<(Ipv6Net, usize, &str)> = Vec::new();
    for (i, pool) in c.pools.iter().enumerate() {
        let p = At::new("pools", i);
        unique(
            errs,
            &mut pool_names,
            &pool.name,
            p.field("name"),
            "pool name",
        );
        unique(errs, &mut pool_ids, &pool.id, p.field("id"), "pool id");
        // The GRE key carries the id in 30 bits (the other two say what the tunnel carries).
        let max = egress_common::fabric::tunnel::MAX_POOL_ID;
        if !(1..=u64::from(max)).contains(&pool.id) {
            errs.add(p.field("id"), format!("{} is outside 1..={max}", pool.id));
        }
        if let Some(prefix) = pool.ipv6_prefix {
            if prefix.prefix_len() > MAX_V6_PREFIX_LEN {
                errs.add(
                    p.field("ipv6_prefix"),
                    format!("{prefix} is longer than /{MAX_V6_PREFIX_LEN}"),
                );
            } else if prefix.trunc() != prefix {
                errs.add(
                    p.field("ipv6_prefix"),
                    format!(
                        "{prefix} has host bits set (did you mean {}?)",
                        prefix.trunc()
                    ),
                );
            } else if let Err(m) = check_pool_prefix_v6(prefix) {
                errs.add(p.field("ipv6_prefix"), m);
            }
            prefixes.push((prefix, i, pool.name.as_str()));
        }
        let mut shares = Vec::new();
        for (j, a) in pool.ipv4.iter().enumerate() {
            let ap = p.sub("ipv4", j);
            unique(
                errs,
                &mut addresses,
                &a.address,
                ap.field("address"),
                "pool address",
            );
            shares.extend(pool_address(errs, a, ap, servers));
        }
        shares.sort();
        // One action carries at most MAX_SNAT targets per server.
        let mut per_server: BTreeMap<&str, usize> = BTreeMap::new();
        for s in &shares {
            *per_server.entry(s.server.as_str()).or_default() += 1;
        }
        for (server, n) in per_server {
            if n > egress_common::action::MAX_SNAT {
                errs.add(
                    p.field("ipv4"),
                    format!(
                        "server {server:?} holds {n} shares of pool {:?}; at most {}",
                        pool.name,
                        egress_common::action::MAX_SNAT
                    ),
                );
            }
        }
        pools.insert(
            pool.name.clone(),
            Pool {
                name: pool.name.clone(),
                id: pool.id as u32,
                ipv6_prefix: pool.ipv6_prefix,
                addresses: pool.ipv4.iter().map(|a| a.address).collect(),
                shares,
            },
        );
    }
    overlapping_prefixes(errs, prefixes);
    pools
}

/// Each server's address in a pool is the pool's IPv6 prefix and the server's id: two pools
/// whose prefixes overlap would send one customer's connections from the other's allowlisted
/// addresses. Prefixes overlap only by one holding the other: sorted by address then length,
/// each is checked against the chain of earlier ones still holding it (n log n; a topology
/// may have a hundred thousand pools). Said at the pool listed later.
fn overlapping_prefixes(errs: &mut Errors, mut prefixes: Vec<(Ipv6Net, usize, &str)>) {
    prefixes.sort_by_key(|(n, i, _)| (n.network(), n.prefix_len(), *i));
    let mut chain: Vec<(Ipv6Net, usize, &str)> = Vec::new();
    for (prefix, i, name) in prefixes {
        while chain
            .last()
            .is_some_and(|(o, _, _)| !o.contains(&prefix.network()))
        {
            chain.pop();
        }
        if let Some(&(other, j, other_name)) = chain.last() {
            let ((at, at_prefix), (them, them_prefix)) = if i > j {
                ((i, prefix), (other_name, other))
            } else {
                ((j, other), (name, prefix))
            };
            errs.add(
                At::new("pools", at).field("ipv6_prefix"),
                format!("{at_prefix} overlaps pool {them:?}'s {them_prefix}"),
            );
        }
        chain.push((prefix, i, name));
    }
}

/// One pool address (at `ap`): routable, its shares held by known servers with port ranges
/// that parse and do not overlap, at most `MAX_SHARES_PER_ADDRESS` shares over at most
/// `MAX_LOCATIONS_PER_ADDRESS` locations. Returns its valid shares.
fn pool_address(
    errs: &mut Errors,
    a: &crate::config::PoolAddress,
    ap: At,
    servers: &Servers,
) -> Vec<Share> {
    if let Err(m) = check_pool_address(a.address) {
        errs.add(ap.field("address"), m);
    }
    if let Some(server) = servers.fabrics.get(&a.address) {
        errs.add(
            ap.field("address"),
            format!("{} is server {server:?}'s fabric address", a.address),
        );
    }
    let mut shares = Vec::new();
    let mut ranges: Vec<(PortRange, usize)> = Vec::new();
    let mut locs = BTreeSet::new();
    for (k, sh) in a.shares.iter().enumerate() {
        let sp = ap.sub("shares", k);
        match servers.location.get(sh.server.as_str()) {
            Some(loc) => {
                locs.insert(*loc);
            }
            None if !servers.names.contains_key(&sh.server) => errs.add(
                sp.field("server"),
                format!("unknown server {:?}", sh.server),
            ),
            None => {} // its datacenter is already reported
        }
        match parse_ports(&sh.ports) {
            Err(m) => errs.add(sp.field("ports"), m),
            Ok(r) => {
                if let Some((o, ok)) = ranges.iter().find(|(o, _)| o.overlaps(&r)) {
                    errs.add(
                        sp.field("ports"),
                        format!("{r} overlaps {o} of {}", ap.sub("shares", *ok)),
                    );
                }
                ranges.push((r, k));
                shares.push(Share {
                    address: a.address,
                    server: sh.server.clone(),
                    ports: r,
                });
            }
        }
    }
    if a.shares.len() > egress_common::fabric::MAX_SHARES_PER_ADDRESS {
        errs.add(
            ap.field("shares"),
            format!(
                "{} has {} shares; at most {}",
                a.address,
                a.shares.len(),
                egress_common::fabric::MAX_SHARES_PER_ADDRESS
            ),
        );
    }
    if locs.len() > MAX_LOCATIONS_PER_ADDRESS {
        errs.add(
            ap.field("shares"),
            format!(
                "{} is shared over {} locations ({}); at most {MAX_LOCATIONS_PER_ADDRESS}",
                a.address,
                locs.len(),
                locs.into_iter().collect::<Vec<_>>().join(", ")
            ),
        );
    }
    shares
}

/// `policies`: known pools, destinations that parse, unique (mark, destination), IPv6 only
/// for pools with an IPv6 prefix. Returns one rule per destination.
fn policies(errs: &mut Errors, c: &Config, pools: &BTreeMap<String, Pool>) -> Vec<Rule> {
    let mut rules = Vec::new();
    let mut seen_rules = HashMap::new();
    for (i, pol) in c.policies.iter().enumerate() {
        let p = At::new("policies", i);
        let pool = pools.get(&pol.pool);
        if pool.is_none() {
            errs.add(p.field("pool"), format!("unknown pool {:?}", pol.pool));
        }
        if pol.destinations.is_empty() {
            errs.add(p.field("destinations"), "is empty");
        }
        for (j, d) in pol.destinations.iter().enumerate() {
            let dp = p.sub("destinations", j);
            match parse_destination(d) {
                Err(m) => errs.add(dp, m),
                Ok(net) => {
                    unique(
                        errs,
                        &mut seen_rules,
                        &(pol.mark, net),
                        dp,
                        "(mark, destination)",
                    );
                    if let Err(m) = check_coverable(net) {
                        errs.add(dp, m);
                    }
                    if let (IpNet::V6(_), Some(pool)) = (net, pool)
                        && pool.ipv6_prefix.is_none()
                    {
                        errs.add(
                            dp,
                            format!("{net} is IPv6 but pool {:?} has no ipv6_prefix", pool.name),
                        );
                    }
                    rules.push(Rule {
                        mark: pol.mark,
                        destination: net,
                        pool: pol.pool.clone(),
                        policy: i,
                    });
                }
            }
        }
    }
    rules
}

/// The plan must fit the maps: a topology that does not is refused here, naming the map and
/// its size, instead of failing half-way through writing a plan. (Counts are the same on
/// every server: peers, owners, actions per pool and family, and rules are global.)
fn capacities(errs: &mut Errors, c: &Config, rules: &[Rule]) {
    use egress_common::{action::ACTIONS_CAPACITY, fabric, policy::POLICY_CAPACITY};
    let v4_rules = rules
        .iter()
        .filter(|r| r.destination.addr().is_ipv4())
        .count();
    // Every pool gets an IPv4 action (unreachable when nobody holds it); IPv6 ones with a
    // prefix.
    let v4_pools = c.pools.len();
    let v6_pools = c.pools.iter().filter(|p| p.ipv6_prefix.is_some()).count();
    let checks = [
        (
            "servers",
            c.servers.len().saturating_sub(1),
            "PEERS",
            fabric::PEERS_CAPACITY,
            "peers",
        ),
        (
            "pools",
            c.pools.iter().map(|p| p.ipv4.len()).sum(),
            "OWNERS",
            fabric::OWNERS_CAPACITY,
            "pool IPv4 addresses",
        ),
        (
            "pools",
            v4_pools + v6_pools,
            "ACTIONS",
            ACTIONS_CAPACITY,
            "(pool, family) actions",
        ),
        (
            "policies",
            v4_rules,
            "POLICY_V4",
            POLICY_CAPACITY,
            "IPv4 rules",
        ),
        (
            "policies",
            rules.len() - v4_rules,
            "POLICY_V6",
            POLICY_CAPACITY,
            "IPv6 rules",
        ),
    ];
    // A reload writes the next plan beside the one in force (one switch, see
    // `egress_common::generation`): a plan may fill half of each map.
    for (path, n, map, cap, what) in checks {
        if n > cap as usize / 2 {
            errs.add(
                path,
                format!(
                    "{n} {what} do not fit map {map} ({cap} entries, half of them per plan: the next plan is written beside the one in force)"
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ranges validation names are exactly where the programs' rule refuses: each range's
    /// first and last address are not coverable, the addresses just outside are.
    #[test]
    fn never_covered_ranges_are_the_programs_rule() {
        use egress_common::policy::{coverable, family_and_bytes};
        let covered = |a: IpAddr| {
            let (f, b) = family_and_bytes(a);
            coverable(f, &b)
        };
        for (range, _) in NEVER_COVERED {
            let r: IpNet = range.parse().unwrap();
            let (first, last) = (r.network(), r.broadcast());
            assert!(
                !covered(first) && !covered(last),
                "{range} is never covered"
            );
            let (before, after) = match (first, last) {
                (IpAddr::V4(f), IpAddr::V4(l)) => (
                    u32::from(f)
                        .checked_sub(1)
                        .map(|a| IpAddr::from(Ipv4Addr::from(a))),
                    u32::from(l)
                        .checked_add(1)
                        .map(|a| IpAddr::from(Ipv4Addr::from(a))),
                ),
                (IpAddr::V6(f), IpAddr::V6(l)) => (
                    u128::from(f)
                        .checked_sub(1)
                        .map(|a| IpAddr::from(std::net::Ipv6Addr::from(a))),
                    u128::from(l)
                        .checked_add(1)
                        .map(|a| IpAddr::from(std::net::Ipv6Addr::from(a))),
                ),
                _ => unreachable!(),
            };
            for a in [before, after].into_iter().flatten() {
                assert!(covered(a), "{a}, just outside {range}, is coverable");
            }
        }
        // A wider destination (a catch-all) is fine: it covers what it can.
        for d in [
            "0.0.0.0/0",
            "::/0",
            "192.0.0.0/2",
            "fe00::/7",
            "64:ff9b::/96",
        ] {
            assert_eq!(check_coverable(d.parse().unwrap()), Ok(()), "{d}");
        }
    }

    #[test]
    fn a_topology_larger_than_the_maps_is_refused_naming_the_map() {
        let mut c = Config::parse(BASE, "base").unwrap();
        // One IPv4 address and an IPv6 prefix each: two actions per pool. Half of each map is
        // what one plan may use (the next is written beside it).
        let extra = egress_common::fabric::OWNERS_CAPACITY as usize / 2 + 10;
        for i in 0..extra as u32 {
            let v6 = (0x2001_0db8u128 << 96) | (u128::from(i) << 64);
            c.pools.push(crate::config::Pool {
                name: format!("p{i}"),
                id: u64::from(100_000 + i),
                ipv6_prefix: Some(Ipv6Net::new(std::net::Ipv6Addr::from(v6), 64).unwrap()),
                ipv4: vec![crate::config::PoolAddress {
                    address: Ipv4Addr::from(0x6440_0000 + i),
                    shares: vec![],
                }],
            });
        }
        let err = validate(&c).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "do not fit map ACTIONS ({} entries, half of them per plan",
                egress_common::action::ACTIONS_CAPACITY
            )),
            "{err}"
        );
        assert!(
            err.contains(&format!(
                "do not fit map OWNERS ({} entries, half of them per plan",
                egress_common::fabric::OWNERS_CAPACITY
            )),
            "{err}"
        );
    }

    /// A valid base config; each case edits it.
    const BASE: &str = r#"
[[locations]]
name = "fra"
latitude = 50.11
longitude = 8.68
[[locations]]
name = "ams"
latitude = 52.37
longitude = 4.90
[[datacenters]]
name = "fra-a"
location = "fra"
[[datacenters]]
name = "ams-a"
location = "ams"
[[servers]]
name = "fra-a-1"
id = 11
datacenter = "fra-a"
fabric = "10.50.0.11"
uplink = "eth0"
[[servers]]
name = "ams-a-1"
id = 31
datacenter = "ams-a"
fabric = "10.50.2.31"
uplink = "eth0"
[[pools]]
name = "acme"
id = 7
ipv6_prefix = "2001:db8:7::/64"
[[pools.ipv4]]
address = "192.0.2.10"
shares = [
  { server = "fra-a-1", ports = "1024-32767" },
  { server = "ams-a-1", ports = "32768-65535" },
]
[[policies]]
pool = "acme"
destinations = ["203.0.113.0/24", "2001:db8:beef::/48"]
"#;

    fn check(toml: &str) -> Result<Topology, Vec<Invalid>> {
        let c = Config::parse(toml, "t").expect("parses");
        validate(&c).map_err(|e| e.0)
    }

    #[test]
    fn base_is_valid() {
        let t = check(BASE).unwrap();
        assert_eq!(t.rules().len(), 2);
        assert_eq!(t.pools()["acme"].shares.len(), 2);
    }

    #[test]
    fn rejections_name_the_field_and_value() {
        struct Case {
            name: &'static str,
            edit: (&'static str, &'static str),
            path: &'static str,
            says: &'static str,
        }
        let cases = [
            Case {
                name: "unspecified pool address",
                edit: ("address = \"192.0.2.10\"", "address = \"0.0.0.0\""),
                path: "pools[0].ipv4[0].address",
                says: "0.0.0.0 is unspecified",
            },
            Case {
                name: "broadcast pool address",
                edit: ("address = \"192.0.2.10\"", "address = \"255.255.255.255\""),
                path: "pools[0].ipv4[0].address",
                says: "the broadcast address",
            },
            Case {
                name: "multicast pool address",
                edit: ("address = \"192.0.2.10\"", "address = \"224.0.0.1\""),
                path: "pools[0].ipv4[0].address",
                says: "224.0.0.1 is multicast",
            },
            Case {
                name: "loopback pool address",
                edit: ("address = \"192.0.2.10\"", "address = \"127.0.0.1\""),
                path: "pools[0].ipv4[0].address",
                says: "127.0.0.1 is loopback",
            },
            Case {
                name: "loopback fabric address",
                edit: ("fabric = \"10.50.0.11\"", "fabric = \"127.0.0.1\""),
                path: "servers[0].fabric",
                says: "127.0.0.1 is loopback",
            },
            Case {
                name: "unspecified fabric address",
                edit: ("fabric = \"10.50.0.11\"", "fabric = \"0.0.0.0\""),
                path: "servers[0].fabric",
                says: "0.0.0.0 is unspecified",
            },
            Case {
                name: "multicast fabric address",
                edit: ("fabric = \"10.50.2.31\"", "fabric = \"224.0.0.1\""),
                path: "servers[1].fabric",
                says: "224.0.0.1 is multicast",
            },
            Case {
                name: "pool address that is a fabric address",
                edit: ("fabric = \"10.50.2.31\"", "fabric = \"192.0.2.10\""),
                path: "pools[0].ipv4[0].address",
                says: "192.0.2.10 is server \"ams-a-1\"'s fabric address",
            },
            Case {
                name: "IPv6 prefix over the loopback address",
                edit: (
                    "ipv6_prefix = \"2001:db8:7::/64\"",
                    "ipv6_prefix = \"::/112\"",
                ),
                path: "pools[0].ipv6_prefix",
                says: "::/112 overlaps ::/8, reserved",
            },
            Case {
                name: "IPv6 prefix of everything",
                edit: (
                    "ipv6_prefix = \"2001:db8:7::/64\"",
                    "ipv6_prefix = \"::/0\"",
                ),
                path: "pools[0].ipv6_prefix",
                says: "::/0 overlaps ::/8",
            },
            Case {
                name: "link-local IPv6 prefix",
                edit: (
                    "ipv6_prefix = \"2001:db8:7::/64\"",
                    "ipv6_prefix = \"fe80::/64\"",
                ),
                path: "pools[0].ipv6_prefix",
                says: "fe80::/64 overlaps fe80::/10, link-local",
            },
            Case {
                name: "multicast IPv6 prefix",
                edit: (
                    "ipv6_prefix = \"2001:db8:7::/64\"",
                    "ipv6_prefix = \"ff02::/64\"",
                ),
                path: "pools[0].ipv6_prefix",
                says: "ff02::/64 overlaps ff00::/8, multicast",
            },
            Case {
                name: "uplink with a slash",
                edit: (
                    "uplink = \"eth0\"\n[[servers]]",
                    "uplink = \"a/b\"\n[[servers]]",
                ),
                path: "servers[0].uplink",
                says: "\"a/b\" is not an interface name",
            },
            Case {
                name: "uplink ..",
                edit: (
                    "uplink = \"eth0\"\n[[servers]]",
                    "uplink = \"..\"\n[[servers]]",
                ),
                path: "servers[0].uplink",
                says: "\"..\" is not an interface name",
            },
            Case {
                name: "uplink with a trailing space",
                edit: (
                    "uplink = \"eth0\"\n[[servers]]",
                    "uplink = \"eth0 \"\n[[servers]]",
                ),
                path: "servers[0].uplink",
                says: "\"eth0 \" is not an interface name",
            },
            Case {
                name: "uplink with a newline",
                edit: (
                    "uplink = \"eth0\"\n[[servers]]",
                    "uplink = \"eth0\\n\"\n[[servers]]",
                ),
                path: "servers[0].uplink",
                says: "is not an interface name",
            },
            Case {
                name: "uplink lo",
                edit: (
                    "uplink = \"eth0\"\n[[servers]]",
                    "uplink = \"lo\"\n[[servers]]",
                ),
                path: "servers[0].uplink",
                says: "\"lo\" is the loopback",
            },
            Case {
                name: "ports with spaces",
                edit: ("ports = \"1024-32767\"", "ports = \" 1024 - 2000 \""),
                path: "pools[0].ipv4[0].shares[0].ports",
                says: "is not a port range",
            },
            Case {
                name: "ports with signs",
                edit: ("ports = \"1024-32767\"", "ports = \"+1024-+2000\""),
                path: "pools[0].ipv4[0].shares[0].ports",
                says: "\"+1024-+2000\" is not a port range",
            },
            Case {
                name: "empty server name",
                edit: ("name = \"fra-a-1\"", "name = \"\""),
                path: "servers[0].name",
                says: "is empty",
            },
            Case {
                name: "unknown location",
                edit: ("location = \"ams\"", "location = \"lhr\""),
                path: "datacenters[1].location",
                says: "unknown location \"lhr\"",
            },
            Case {
                name: "unknown datacenter",
                edit: ("datacenter = \"ams-a\"", "datacenter = \"ams-b\""),
                path: "servers[1].datacenter",
                says: "unknown datacenter",
            },
            Case {
                name: "unknown server in a share",
                edit: (
                    "{ server = \"ams-a-1\", ports",
                    "{ server = \"ams-a-9\", ports",
                ),
                path: "pools[0].ipv4[0].shares[1].server",
                says: "unknown server \"ams-a-9\"",
            },
            Case {
                name: "unknown pool in a policy",
                edit: ("pool = \"acme\"", "pool = \"beta\""),
                path: "policies[0].pool",
                says: "unknown pool \"beta\"",
            },
            Case {
                name: "duplicate location",
                edit: ("name = \"ams\"", "name = \"fra\""),
                path: "locations[1].name",
                says: "duplicate location name \"fra\"",
            },
            Case {
                name: "duplicate server name",
                edit: ("name = \"ams-a-1\"", "name = \"fra-a-1\""),
                path: "servers[1].name",
                says: "duplicate server name",
            },
            Case {
                name: "duplicate server id",
                edit: ("id = 31", "id = 11"),
                path: "servers[1].id",
                says: "duplicate server id 11",
            },
            Case {
                name: "server id 0",
                edit: ("id = 31", "id = 0"),
                path: "servers[1].id",
                says: "outside 1..=65535",
            },
            Case {
                name: "server id too big",
                edit: ("id = 31", "id = 70000"),
                path: "servers[1].id",
                says: "outside 1..=65535",
            },
            Case {
                name: "duplicate fabric",
                edit: ("10.50.2.31", "10.50.0.11"),
                path: "servers[1].fabric",
                says: "duplicate fabric address 10.50.0.11",
            },
            Case {
                name: "pool id 0",
                edit: ("id = 7", "id = 0"),
                path: "pools[0].id",
                says: "outside 1..=1073741823",
            },
            Case {
                name: "port range above 65535",
                edit: ("32768-65535", "32768-70000"),
                path: "pools[0].ipv4[0].shares[1].ports",
                says: "\"32768-70000\" is outside 1024-65535",
            },
            Case {
                name: "port range below 1024",
                edit: ("1024-32767", "80-32767"),
                path: "pools[0].ipv4[0].shares[0].ports",
                says: "outside 1024-65535",
            },
            Case {
                name: "reversed range",
                edit: ("1024-32767", "32767-1024"),
                path: "pools[0].ipv4[0].shares[0].ports",
                says: "reversed",
            },
            Case {
                name: "not a range",
                edit: ("1024-32767", "lots"),
                path: "pools[0].ipv4[0].shares[0].ports",
                says: "not a port range",
            },
            Case {
                name: "overlapping ranges",
                edit: ("32768-65535", "30000-65535"),
                path: "pools[0].ipv4[0].shares[1].ports",
                says: "30000-65535 overlaps 1024-32767 of pools[0].ipv4[0].shares[0]",
            },
            Case {
                name: "latitude out of range",
                edit: ("latitude = 52.37", "latitude = 95.0"),
                path: "locations[1].latitude",
                says: "outside -90..90",
            },
            Case {
                name: "longitude out of range",
                edit: ("longitude = 4.90", "longitude = -181.0"),
                path: "locations[1].longitude",
                says: "outside -180..180",
            },
            Case {
                name: "bad destination",
                edit: ("203.0.113.0/24", "203.0.113.0/33"),
                path: "policies[0].destinations[0]",
                says: "not an IP prefix",
            },
            Case {
                name: "destination no policy can cover",
                edit: ("203.0.113.0/24", "ff02::/16"),
                path: "policies[0].destinations[0]",
                says: "ff02::/16 lies within ff00::/8 (multicast), which no policy covers",
            },
            Case {
                name: "IPv4 destination no policy can cover",
                edit: ("203.0.113.0/24", "169.254.169.254"),
                path: "policies[0].destinations[0]",
                says: "169.254.169.254/32 lies within 169.254.0.0/16 (link-local)",
            },
            Case {
                name: "destination with host bits",
                edit: ("203.0.113.0/24", "203.0.113.7/24"),
                path: "policies[0].destinations[0]",
                says: "did you mean 203.0.113.0/24",
            },
            Case {
                name: "v6 prefix too long",
                edit: ("2001:db8:7::/64", "2001:db8:7::/120"),
                path: "pools[0].ipv6_prefix",
                says: "longer than /112",
            },
            Case {
                name: "v6 prefix with host bits",
                edit: ("2001:db8:7::/64", "2001:db8:7::1/64"),
                path: "pools[0].ipv6_prefix",
                says: "host bits",
            },
            Case {
                name: "same (mark, destination) twice",
                edit: (
                    "\"2001:db8:beef::/48\"]",
                    "\"2001:db8:beef::/48\", \"203.0.113.0/24\"]",
                ),
                path: "policies[0].destinations[2]",
                says: "duplicate (mark, destination)",
            },
            Case {
                name: "default server unknown",
                edit: (
                    "[[locations]]\nname = \"fra\"",
                    "server = \"nope\"\n[[locations]]\nname = \"fra\"",
                ),
                path: "server",
                says: "unknown server \"nope\"",
            },
        ];
        for c in cases {
            assert!(
                BASE.contains(c.edit.0),
                "{}: edit target not in BASE",
                c.name
            );
            let errs = check(&BASE.replacen(c.edit.0, c.edit.1, 1))
                .err()
                .unwrap_or_else(|| panic!("{}: accepted", c.name));
            assert!(
                errs.iter()
                    .any(|e| e.path == c.path && e.message.contains(c.says)),
                "{}: want {} ~ {:?}, got {:?}",
                c.name,
                c.path,
                c.says,
                errs
            );
        }
    }

    #[test]
    fn same_address_in_two_pools() {
        let toml = format!(
            "{BASE}\n[[pools]]\nname = \"beta\"\nid = 8\n[[pools.ipv4]]\naddress = \"192.0.2.10\"\n"
        );
        let errs = check(&toml).unwrap_err();
        assert!(
            errs.iter().any(|e| e.path == "pools[1].ipv4[0].address"
                && e.message.contains("duplicate pool address 192.0.2.10")),
            "{errs:?}"
        );
    }

    #[test]
    fn overlapping_ipv6_prefixes_in_two_pools() {
        // The same prefix, one inside the other either way round; a neighbour is fine.
        for (prefix, other) in [
            ("2001:db8:7::/64", "2001:db8:7::/64"),
            ("2001:db8::/32", "2001:db8:7::/64"),
            ("2001:db8:7::/96", "2001:db8:7::/64"),
        ] {
            let toml =
                format!("{BASE}\n[[pools]]\nname = \"beta\"\nid = 8\nipv6_prefix = \"{prefix}\"\n");
            let errs = check(&toml).unwrap_err();
            let says = format!("{prefix} overlaps pool \"acme\"'s {other}");
            assert!(
                errs.iter()
                    .any(|e| e.path == "pools[1].ipv6_prefix" && e.message == says),
                "{prefix}: {errs:?}"
            );
        }
        let toml = format!(
            "{BASE}\n[[pools]]\nname = \"beta\"\nid = 8\nipv6_prefix = \"2001:db8:8::/64\"\n"
        );
        check(&toml).unwrap();
    }

    #[test]
    fn duplicate_policy_across_policies_and_mark_distinguishes() {
        let dup =
            format!("{BASE}\n[[policies]]\npool = \"acme\"\ndestinations = [\"203.0.113.0/24\"]\n");
        let errs = check(&dup).unwrap_err();
        assert!(
            errs.iter().any(|e| e.path == "policies[1].destinations[0]"),
            "{errs:?}"
        );
        let other_mark = format!(
            "{BASE}\n[[policies]]\npool = \"acme\"\nmark = 5\ndestinations = [\"203.0.113.0/24\"]\n"
        );
        assert!(
            check(&other_mark).is_ok(),
            "another mark is a different rule"
        );
    }

    #[test]
    fn more_than_four_locations_on_one_address() {
        let mut toml = String::from(BASE);
        let mut shares = String::new();
        for (i, loc) in ["l1", "l2", "l3", "l4"].iter().enumerate() {
            toml.push_str(&format!(
                "\n[[locations]]\nname = \"{loc}\"\nlatitude = 1.0\nlongitude = 1.0\n[[datacenters]]\nname = \"{loc}-a\"\nlocation = \"{loc}\"\n[[servers]]\nname = \"{loc}-1\"\nid = {}\ndatacenter = \"{loc}-a\"\nfabric = \"10.50.9.{}\"\nuplink = \"eth0\"\n",
                100 + i,
                i + 1
            ));
            shares.push_str(&format!(
                "{{ server = \"{loc}-1\", ports = \"{}-{}\" }},",
                2000 + i * 10,
                2005 + i * 10
            ));
        }
        toml.push_str(&format!("\n[[pools]]\nname = \"wide\"\nid = 9\n[[pools.ipv4]]\naddress = \"192.0.2.99\"\nshares = [{shares} {{ server = \"fra-a-1\", ports = \"3000-3001\" }}]\n"));
        let errs = check(&toml).unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.path == "pools[1].ipv4[0].shares" && e.message.contains("5 locations")),
            "{errs:?}"
        );
    }

    #[test]
    fn reserved_address_without_shares_is_valid() {
        let toml = format!(
            "{BASE}\n[[pools]]\nname = \"beta\"\nid = 8\n[[pools.ipv4]]\naddress = \"192.0.2.11\"\n"
        );
        assert!(check(&toml).is_ok());
    }

    #[test]
    fn parse_errors_name_the_field() {
        let bad_addr = Config::parse(&BASE.replace("10.50.2.31", "10.50.2.x"), "t")
            .unwrap_err()
            .to_string();
        assert!(bad_addr.contains("servers[1].fabric"), "{bad_addr}");
        let unknown = Config::parse(
            &BASE.replace(
                "uplink = \"eth0\"\n[[servers]]",
                "uplink = \"eth0\"\ncolour = 1\n[[servers]]",
            ),
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(unknown.contains("colour"), "{unknown}");
        let bad_prefix = Config::parse(&BASE.replace("2001:db8:7::/64", "2001:db8:7::/129"), "t")
            .unwrap_err()
            .to_string();
        assert!(bad_prefix.contains("pools[0].ipv6_prefix"), "{bad_prefix}");
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;

    /// Values an operator (or a bad script) might put anywhere.
    const HOSTILE: &[&str] = &[
        "\"\"",
        "0",
        "-1",
        "1e400",
        "nan",
        "-inf",
        "99999999999999999999",
        "\"a/b\"",
        "\"..\"",
        "\"lo\"",
        "\"eth0 \"",
        "[[1]]",
        "{}",
        "true",
        "\"0.0.0.0\"",
        "\"255.255.255.255\"",
        "\"224.0.0.1\"",
        "\"10.50.0.300\"",
        "\"::\"",
        "\"1024-\"",
        "\"65535-1024\"",
        "\" 1024 - 2000 \"",
        "\"+1024-+2000\"",
        "\"2001:db8::/129\"",
        "\"203.0.113.1/24\"",
        "[]",
        "[\"\"]",
        "\"x\"",
        "4294967296",
        "1073741824",
    ];

    /// Seeded, bounded: every mutation of the default config either validates or is refused
    /// with a message naming a field; none panics.
    #[test]
    fn mutated_configs_are_refused_naming_a_field_never_a_panic() {
        let base = crate::config::DEFAULT_CONFIG;
        let lines: Vec<&str> = base.lines().collect();
        let value_lines: Vec<usize> = (0..lines.len())
            .filter(|&i| {
                let l = lines[i].trim_start();
                !l.starts_with('#') && !l.starts_with('[') && l.contains(" = ")
            })
            .collect();
        let mut state: u64 = 0x5eed_f00d;
        let mut next = |n: usize| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as usize) % n
        };
        let (mut refused, mut valid) = (0, 0);
        for _ in 0..3000 {
            let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
            // One to three values replaced.
            for _ in 0..=next(3) {
                let i = value_lines[next(value_lines.len())];
                let (key, _) = lines[i].split_once(" = ").unwrap();
                edited[i] = format!("{key} = {}", HOSTILE[next(HOSTILE.len())]);
            }
            let text = edited.join("\n");
            let outcome = std::panic::catch_unwind(|| {
                Config::parse(&text, "fuzz").map(|c| validate(&c).map(drop))
            });
            let Ok(outcome) = outcome else {
                panic!("panicked on:\n{text}");
            };
            match outcome {
                Ok(Ok(())) => valid += 1,
                Ok(Err(invalid)) => {
                    refused += 1;
                    for e in &invalid.0 {
                        assert!(
                            !e.path.is_empty() && e.path != "." && !e.message.is_empty(),
                            "a problem without a field: {e}\n{text}"
                        );
                    }
                }
                Err(e) => {
                    refused += 1;
                    let msg = e.to_string();
                    // "cannot parse config fuzz: <field>: ..."
                    let field = msg
                        .strip_prefix("cannot parse config fuzz: ")
                        .and_then(|m| m.split_once(": "))
                        .map(|(f, _)| f);
                    assert!(
                        field.is_some_and(|f| !f.contains(' ') && !f.is_empty()),
                        "a parse error without a field: {msg}\n{text}"
                    );
                }
            }
        }
        assert!(
            refused > 2000 && valid > 0,
            "{refused} refused, {valid} valid"
        );
    }
}
