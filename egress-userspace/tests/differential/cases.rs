//! Seeded generation of topologies, flow-table states and packets for the differential test.
//! Packets are built here with checksums computed from scratch.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use egress::{
    config::Config,
    plan::{self, MapContents},
    validate::{self, Topology},
};
use egress_common::{
    action::{Action, ActionKey, ActionKind, FAMILY_V4, FAMILY_V6},
    fabric::{AddrKey, Owners},
    flow::{
        FLOW_F_CLOSING, FLOW_F_FIN, FLOW_F_REPLIED, FLOW_F_RST, FLOW_FORWARDED, FLOW_OUTBOUND,
        FLOW_REVERSE, FlowKey, FlowValue,
    },
    policy::MARK_BITS,
};
use ipnet::IpNet;

// ------------------------------------------------------------------ PRNG

/// SplitMix64: small, seedable, good enough for test generation.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut r = Rng(seed ^ 0x6a09_e667_f3bc_c908);
        r.next();
        r
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
    pub fn u16(&mut self) -> u16 {
        self.next() as u16
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

// ------------------------------------------------------------------ packet building

fn sum(data: &[u8], mut acc: u64) -> u64 {
    for c in data.chunks(2) {
        acc += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u64 {
    sum(&octets(dst), sum(&octets(src), 0)) + u64::from(proto) + len as u64
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// A transport payload to build.
#[derive(Debug, Clone)]
pub enum Tp {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        opts: Vec<u8>,
        payload: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
        zero_csum: bool,
    },
    /// ICMP / ICMPv6 message: type, code, the 4 bytes after the checksum, body.
    Icmp {
        typ: u8,
        code: u8,
        rest: [u8; 4],
        body: Vec<u8>,
    },
    Raw {
        proto: u8,
        payload: Vec<u8>,
    },
}

impl Tp {
    pub fn echo(v6: bool, request: bool, id: u16, seq: u16, body: Vec<u8>) -> Tp {
        let typ = match (v6, request) {
            (false, true) => 8,
            (false, false) => 0,
            (true, true) => 128,
            (true, false) => 129,
        };
        let mut rest = [0u8; 4];
        rest[..2].copy_from_slice(&id.to_be_bytes());
        rest[2..].copy_from_slice(&seq.to_be_bytes());
        Tp::Icmp {
            typ,
            code: 0,
            rest,
            body,
        }
    }
    pub fn proto(&self, v6: bool) -> u8 {
        match self {
            Tp::Tcp { .. } => 6,
            Tp::Udp { .. } => 17,
            Tp::Icmp { .. } => {
                if v6 {
                    58
                } else {
                    1
                }
            }
            Tp::Raw { proto, .. } => *proto,
        }
    }
    /// (source port, destination port) as the flow table keys this packet when it opens a
    /// connection (echo request: identifier, 0).
    /// The same with the connection's own port (TCP/UDP source port, echo identifier) set to
    /// `port`; anything else unchanged.
    pub fn with_conn_sport(&self, port: u16) -> Tp {
        let mut tp = self.clone();
        match &mut tp {
            Tp::Tcp { sport, .. } | Tp::Udp { sport, .. } => *sport = port,
            Tp::Icmp { rest, .. } => rest[..2].copy_from_slice(&port.to_be_bytes()),
            Tp::Raw { .. } => {}
        }
        tp
    }

    pub fn conn_ports(&self) -> (u16, u16) {
        match self {
            Tp::Tcp { sport, dport, .. } | Tp::Udp { sport, dport, .. } => (*sport, *dport),
            Tp::Icmp { rest, .. } => (u16::from_be_bytes([rest[0], rest[1]]), 0),
            Tp::Raw { .. } => (0, 0),
        }
    }
    /// The same packet's ports as a reply (echo reply: 0, identifier).
    pub fn reply_ports(&self) -> (u16, u16) {
        match self {
            Tp::Icmp { rest, .. } => (0, u16::from_be_bytes([rest[0], rest[1]])),
            _ => self.conn_ports(),
        }
    }
}

/// The transport bytes of `tp` between `src` and `dst`, checksums computed from scratch.
pub fn segment(src: IpAddr, dst: IpAddr, tp: &Tp) -> Vec<u8> {
    let v6 = src.is_ipv6();
    let proto = tp.proto(v6);
    let mut seg;
    let csum_at;
    match tp {
        Tp::Tcp {
            sport,
            dport,
            flags,
            opts,
            payload,
        } => {
            let mut o = opts.clone();
            while o.len() % 4 != 0 {
                o.push(0);
            }
            seg = vec![0u8; 20];
            seg[0..2].copy_from_slice(&sport.to_be_bytes());
            seg[2..4].copy_from_slice(&dport.to_be_bytes());
            seg[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
            if flags & TCP_ACK != 0 {
                seg[8..12].copy_from_slice(&0x0bad_cafeu32.to_be_bytes());
            }
            seg[12] = (((20 + o.len()) / 4) as u8) << 4;
            seg[13] = *flags;
            seg[14..16].copy_from_slice(&64240u16.to_be_bytes());
            seg.extend_from_slice(&o);
            seg.extend_from_slice(payload);
            csum_at = Some(16);
        }
        Tp::Udp {
            sport,
            dport,
            payload,
            zero_csum,
        } => {
            seg = vec![0u8; 8];
            seg[0..2].copy_from_slice(&sport.to_be_bytes());
            seg[2..4].copy_from_slice(&dport.to_be_bytes());
            seg[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            seg.extend_from_slice(payload);
            csum_at = if *zero_csum { None } else { Some(6) };
        }
        Tp::Icmp {
            typ,
            code,
            rest,
            body,
        } => {
            seg = vec![*typ, *code, 0, 0];
            seg.extend_from_slice(rest);
            seg.extend_from_slice(body);
            csum_at = Some(2);
        }
        Tp::Raw { payload, .. } => {
            seg = payload.clone();
            csum_at = None;
        }
    }
    if let Some(at) = csum_at {
        let acc = if proto == 1 {
            0
        } else {
            pseudo(src, dst, proto, seg.len())
        };
        let mut c = fold(sum(&seg, acc));
        if proto == 17 && c == 0 {
            c = 0xffff;
        }
        seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    seg
}

/// IPv4 header fields the generator varies.
#[derive(Debug, Clone)]
pub struct V4 {
    pub tos: u8,
    pub id: u16,
    /// Flags and fragment offset.
    pub frag: u16,
    pub ttl: u8,
    pub options: Vec<u8>,
}

impl Default for V4 {
    fn default() -> Self {
        V4 {
            tos: 0,
            id: 0x1c46,
            frag: 0x4000,
            ttl: 64,
            options: vec![],
        }
    }
}

/// An IP packet (no Ethernet) carrying `payload` as protocol `proto`.
pub fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, h: &V4, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let hl = 20 + h.options.len();
            assert_eq!(hl % 4, 0);
            let mut ip = vec![0u8; 20];
            ip[0] = 0x40 | (hl / 4) as u8;
            ip[1] = h.tos;
            ip[2..4].copy_from_slice(&((hl + payload.len()) as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&h.id.to_be_bytes());
            ip[6..8].copy_from_slice(&h.frag.to_be_bytes());
            ip[8] = h.ttl;
            ip[9] = proto;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            ip.extend_from_slice(&h.options);
            let c = fold(sum(&ip, 0));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            ip.extend_from_slice(payload);
            ip
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut ip = vec![0u8; 40];
            ip[0] = 0x60 | (h.tos >> 4);
            ip[1] = h.tos << 4;
            ip[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
            ip[6] = proto;
            ip[7] = h.ttl;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            ip.extend_from_slice(payload);
            ip
        }
        _ => panic!("mixed families"),
    }
}

/// IP packet of a transport message.
pub fn ip_tp(src: IpAddr, dst: IpAddr, h: &V4, tp: &Tp) -> Vec<u8> {
    ip_packet(src, dst, tp.proto(src.is_ipv6()), h, &segment(src, dst, tp))
}

/// *Tunnel keys*: `kind << 30 | pool id`.
pub const KIND_PROBE: u32 = 0;
pub const KIND_CONNECTION: u32 = 1;
pub const KIND_SOFT_UNICAST: u32 = 2;
pub const KIND_REPLY: u32 = 3;
/// Kind *probe*: the pool bits of a request, of a reply, and of a reply from a server that
/// says it is fenced.
pub const PROBE_REQUEST: u32 = 1;
pub const PROBE_REPLY: u32 = 2;
pub const PROBE_REPLY_FENCED: u32 = 3;

fn kind_name(kind: u32) -> &'static str {
    match kind {
        KIND_CONNECTION => "connection",
        KIND_SOFT_UNICAST => "soft-unicast",
        KIND_REPLY => "reply",
        _ => "probe",
    }
}

pub const FRAME_DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const FRAME_SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

pub fn frame(ethertype: u16, ip: &[u8]) -> Vec<u8> {
    let mut f = FRAME_DST.to_vec();
    f.extend_from_slice(&FRAME_SRC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(ip);
    f
}

pub fn ip_frame(ip: &[u8]) -> Vec<u8> {
    frame(if ip[0] >> 4 == 6 { 0x86dd } else { 0x0800 }, ip)
}

/// A GRE packet (outer IPv4) around `inner` (IP bytes).
pub fn gre_packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    h: &V4,
    flags: u16,
    proto: u16,
    key: u32,
    inner: &[u8],
) -> Vec<u8> {
    let mut g = flags.to_be_bytes().to_vec();
    g.extend_from_slice(&proto.to_be_bytes());
    if flags & 0x8000 != 0 {
        g.extend_from_slice(&[0, 0, 0, 0]);
    }
    if flags & 0x2000 != 0 {
        g.extend_from_slice(&key.to_be_bytes());
    }
    if flags & 0x1000 != 0 {
        g.extend_from_slice(&[0, 0, 0, 1]);
    }
    g.extend_from_slice(inner);
    ip_packet(src.into(), dst.into(), 47, h, &g)
}

// ------------------------------------------------------------------ topologies

/// One topology as generation sees it, with the map contents of server `a`.
pub struct Topo {
    pub name: String,
    pub toml: String,
    pub topology: Topology,
    pub contents: MapContents,
    /// (mark, destination, pool id).
    pub policies: Vec<(u32, IpNet, u32)>,
    pub actions: Vec<(ActionKey, Action)>,
    pub owners: Vec<([u8; 4], Owners)>,
    pub peers: Vec<[u8; 4]>,
}

pub const FABRIC: [u8; 4] = [10, 50, 0, 11];

impl Topo {
    pub fn new(name: &str, toml: &str) -> Result<Topo, String> {
        Topo::with_down(name, toml, &BTreeMap::new())
    }

    /// Planned with the servers of `down` seen down by `a` (`PEERS` flags: 1 fabric probes
    /// unanswered, 2 agent lease gone, 4 holding down, 8 fenced by its own account): skipped
    /// as next hops, marked in `PEERS`. The name says who is down.
    pub fn with_down(name: &str, toml: &str, down: &BTreeMap<String, u32>) -> Result<Topo, String> {
        let config = Config::parse(toml, name).map_err(|e| e.to_string())?;
        let topology = validate::validate(&config).map_err(|e| e.to_string())?;
        let p = plan::plan_with(&topology, "a", down);
        let contents = plan::map_contents(&topology, &p);
        let name = if down.is_empty() {
            name.to_string()
        } else {
            let d: Vec<String> = down.iter().map(|(s, f)| format!("{s} flags {f}")).collect();
            format!("{name} (down: {})", d.join(", "))
        };
        let mut policies = Vec::new();
        for ((plen, k), v) in &contents.policies_v4 {
            let net = IpNet::new(IpAddr::from(k.addr), (plen - MARK_BITS) as u8).unwrap();
            policies.push((u32::from_be(k.mark_be), net, v.pool));
        }
        for ((plen, k), v) in &contents.policies_v6 {
            let net = IpNet::new(IpAddr::from(k.addr), (plen - MARK_BITS) as u8).unwrap();
            policies.push((u32::from_be(k.mark_be), net, v.pool));
        }
        Ok(Topo {
            name,
            toml: toml.to_string(),
            actions: contents.actions.iter().map(|(k, v)| (*k, *v)).collect(),
            owners: contents.owners.iter().map(|(k, v)| (k.addr, *v)).collect(),
            peers: contents.peers.keys().map(|k| k.addr).collect(),
            policies,
            topology,
            contents,
        })
    }

    /// Pool ids with an action of `kind` for `family`.
    pub fn pools_with(&self, kind: ActionKind, family: u8) -> Vec<(u32, Action)> {
        self.actions
            .iter()
            .filter(|(k, a)| k.family == family && a.kind == kind as u8)
            .map(|(k, a)| (k.pool, *a))
            .collect()
    }

    pub fn pool_ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.actions.iter().map(|(k, _)| k.pool).collect();
        v.dedup();
        v
    }

    /// Every pool address of the topology (IPv4 addresses; IPv6 prefixes).
    pub fn is_pool_address(&self, a: IpAddr) -> bool {
        self.topology.pools().values().any(|p| match a {
            IpAddr::V4(v4) => p.addresses.contains(&v4),
            IpAddr::V6(v6) => p.ipv6_prefix.is_some_and(|n| n.contains(&v6)),
        })
    }
}

/// Catch-all policies (`0.0.0.0/0`, `::/0`, and `0.0.0.0/0` under another mark): pool and
/// fabric addresses are policy destinations. Addresses shared, held whole here, held whole by
/// another server.
pub const CATCH_ALL_TOPOLOGY: &str = r#"
server = "a"
[[locations]]
name = "l1"
latitude = 50.0
longitude = 8.0
[[locations]]
name = "l2"
latitude = 52.3
longitude = 4.9
[[datacenters]]
name = "d1"
location = "l1"
[[datacenters]]
name = "d2"
location = "l1"
[[datacenters]]
name = "d3"
location = "l2"
[[servers]]
name = "a"
id = 11
datacenter = "d1"
fabric = "10.50.0.11"
uplink = "eth0"
[[servers]]
name = "b"
id = 12
datacenter = "d1"
fabric = "10.50.0.12"
uplink = "eth0"
[[servers]]
name = "c"
id = 13
datacenter = "d2"
fabric = "10.50.0.13"
uplink = "eth0"
[[servers]]
name = "d"
id = 14
datacenter = "d3"
fabric = "10.50.0.14"
uplink = "eth0"
[[pools]]
name = "wide"
id = 21
ipv6_prefix = "2001:db8:21::/64"
[[pools.ipv4]]
address = "192.0.2.40"
shares = [{ server = "a", ports = "1024-20000" }, { server = "b", ports = "20001-40000" }, { server = "c", ports = "40001-65535" }]
[[pools.ipv4]]
address = "192.0.2.41"
shares = [{ server = "a", ports = "1024-65535" }]
[[pools]]
name = "marked"
id = 22
[[pools.ipv4]]
address = "192.0.2.42"
shares = [{ server = "a", ports = "3000-3999" }, { server = "d", ports = "4000-4999" }]
[[pools]]
name = "elsewhere"
id = 23
[[pools.ipv4]]
address = "192.0.2.43"
shares = [{ server = "d", ports = "1024-65535" }]
[[pools]]
name = "nearby"
id = 24
[[pools.ipv4]]
address = "192.0.2.44"
shares = [{ server = "b", ports = "1024-65535" }]
[[policies]]
pool = "wide"
destinations = ["0.0.0.0/0", "::/0"]
[[policies]]
pool = "marked"
mark = 42
destinations = ["0.0.0.0/0"]
[[policies]]
pool = "elsewhere"
mark = 7
destinations = ["0.0.0.0/0", "203.0.113.0/24"]
[[policies]]
pool = "nearby"
destinations = ["198.51.100.0/24"]
"#;

/// Who server `a` sees down in the catch-all topology's second plan: `b` (its probes go
/// unanswered) and `d` (and holding down) are down for soft-unicast; `c`'s lease is gone but its
/// probes are answered (flag 2 only): soft-unicast still goes to it.
pub const CATCH_ALL_DOWN: [(&str, u32); 3] = [("b", 1), ("c", 2), ("d", 1 | 4)];

pub const SERVERS: [(&str, u32, &str); 5] = [
    ("a", 11, "d1"),
    ("b", 12, "d1"),
    ("c", 13, "d2"),
    ("d", 14, "d3"),
    ("e", 15, "d4"),
];

const DESTINATIONS: [&str; 13] = [
    "0.0.0.0/0",
    "::/0",
    "203.0.113.0/24",
    "203.0.113.0/25",
    "203.0.113.128/25",
    "203.0.113.64/26",
    "203.0.113.7",
    "198.51.100.0/24",
    "198.51.100.0/25",
    "2001:db8:beef::/48",
    "2001:db8:beef:1::/64",
    "2001:db8:cafe::/64",
    "2001:db8:beef::1",
];

/// A random valid topology (retries until it validates), sometimes planned with servers
/// seen down.
pub fn topology(rng: &mut Rng, name: &str) -> Topo {
    for _ in 0..200 {
        let toml = topology_toml(rng);
        let down = down_servers(rng);
        match Topo::with_down(name, &toml, &down) {
            Ok(t) => return t,
            Err(_) => continue,
        }
    }
    panic!("no valid topology generated in 200 tries");
}

/// Servers other than `a` seen down (often none), each with its `PEERS` flags: mostly with
/// flag 1 (probes unanswered: soft-unicast to it is dropped), sometimes only the others (2 lease
/// gone, 4 holding down, 8 fenced by its own account: soft-unicast still goes to it).
fn down_servers(rng: &mut Rng) -> BTreeMap<String, u32> {
    let mut down = BTreeMap::new();
    if rng.chance(50) {
        for (name, ..) in &SERVERS[1..] {
            if rng.chance(40) {
                down.insert(
                    name.to_string(),
                    *rng.pick(&[1u32, 1, 1, 3, 5, 7, 9, 2, 4, 6, 8, 10]),
                );
            }
        }
    }
    down
}

fn topology_toml(rng: &mut Rng) -> String {
    let mut t = String::from("server = \"a\"\n");
    for (n, lat, lon) in [("l1", 50.0, 8.0), ("l2", 52.3, 4.9), ("l3", 1.3, 103.8)] {
        t += &format!("[[locations]]\nname = \"{n}\"\nlatitude = {lat}\nlongitude = {lon}\n");
    }
    for (d, l) in [("d1", "l1"), ("d2", "l1"), ("d3", "l2"), ("d4", "l3")] {
        t += &format!("[[datacenters]]\nname = \"{d}\"\nlocation = \"{l}\"\n");
    }
    let nservers = rng.range(2, 5) as usize;
    let servers: Vec<_> = SERVERS[..nservers].to_vec();
    for (name, id, dc) in &servers {
        // b sometimes moves to another data center so every tier occurs.
        let dc = if *name == "b" && rng.chance(30) {
            "d3"
        } else {
            dc
        };
        t += &format!(
            "[[servers]]\nname = \"{name}\"\nid = {id}\ndatacenter = \"{dc}\"\nfabric = \"10.50.0.{id}\"\nuplink = \"eth0\"\n"
        );
    }
    let npools = rng.range(2, 4);
    let mut pools = Vec::new();
    let mut addr_seq = 10u8;
    for i in 0..npools {
        let id: u64 = match rng.below(4) {
            0 => 7 + i,
            1 => 100 + i,
            // The largest pool ids: the GRE key's top two bits are its kind.
            2 => 0x3fff_fff0 + i,
            _ => 0x0102_0304 + i,
        };
        let name = format!("p{i}");
        let v6 = rng.chance(50);
        t += &format!("[[pools]]\nname = \"{name}\"\nid = {id}\n");
        if v6 {
            if rng.chance(70) {
                t += &format!("ipv6_prefix = \"2001:db8:{:x}::/64\"\n", 0x100 + i);
            } else {
                t += &format!("ipv6_prefix = \"2001:db8:{:x}:1::/112\"\n", 0x100 + i);
            }
        }
        let naddr = rng.range(1, 2);
        for _ in 0..naddr {
            addr_seq += 1;
            t += &format!("[[pools.ipv4]]\naddress = \"192.0.2.{addr_seq}\"\n");
            let mut shares = Vec::new();
            let mut next = 1024u32 + rng.below(3000) as u32;
            let holders = rng.below(4);
            for _ in 0..holders {
                let s = rng.pick(&servers).0;
                let size = *rng.pick(&[1u32, 2, 3, 4, 8, 16, 40, 100, 1000, 20000]);
                if next + size - 1 > 65535 {
                    break;
                }
                shares.push(format!(
                    "{{ server = \"{s}\", ports = \"{}-{}\" }}",
                    next,
                    next + size - 1
                ));
                next += size + rng.below(3) as u32;
            }
            t += &format!("shares = [{}]\n", shares.join(", "));
        }
        pools.push((name, v6));
    }
    let mut used = std::collections::BTreeSet::new();
    for (name, v6) in &pools {
        for _ in 0..rng.range(1, 2) {
            let mark: u32 = if rng.chance(60) {
                0
            } else {
                *rng.pick(&[1u32, 42, 77, 0x7fff_ffff])
            };
            let mut dests = Vec::new();
            for _ in 0..rng.range(1, 3) {
                let d = *rng.pick(&DESTINATIONS);
                if d.contains(':') && !v6 {
                    continue;
                }
                if used.insert((mark, d)) {
                    dests.push(format!("\"{d}\""));
                }
            }
            if dests.is_empty() {
                continue;
            }
            t += &format!(
                "[[policies]]\npool = \"{name}\"\nmark = {mark}\ndestinations = [{}]\n",
                dests.join(", ")
            );
        }
    }
    t
}

// ------------------------------------------------------------------ cases

/// One packet of a case, run through the datapath after the steps before it.
pub struct Step {
    pub class: String,
    pub ingress: bool,
    pub mark: u32,
    pub packet: Vec<u8>,
    /// Run on egress the programs' output of the step before (a packet they sent out through
    /// the uplink), instead of `packet`.
    pub prev_output: bool,
}

/// A flow table and the packets run one after another through the same datapath (one for
/// most cases; a fragmented datagram's fragments for sequences).
pub struct Case {
    pub class: String,
    pub steps: Vec<Step>,
    pub flows: Vec<(FlowKey, FlowValue)>,
    /// `ACTIONS` entries (generation-0 keys) this case runs with instead of the plan's, as the
    /// planner never writes them (`None`: the entry removed); put back after the case.
    pub actions: Vec<(ActionKey, Option<Action>)>,
    /// `LOCAL` is not written (all zero, as just after loading) while this case runs.
    pub unconfigured: bool,
    /// `LOCAL`'s *fenced* while this case runs (0: not fenced; never with `unconfigured`).
    pub fenced: u8,
}

/// The share of cases (percent) run with `LOCAL` not written, of any class.
const UNCONFIGURED_PERCENT: u64 = 3;
/// The share of cases (percent) run with `LOCAL`'s *fenced* set, of any class (only Tunnel
/// rule 6 reads it); more of the probes ([`PROBE_FENCED_PERCENT`]) and of a peer's
/// connections ([`PEER_FENCED_PERCENT`], translated as usual: fencing is the peers' business).
const FENCED_PERCENT: u64 = 6;
const PROBE_FENCED_PERCENT: u64 = 55;
const PEER_FENCED_PERCENT: u64 = 65;
/// Nonzero values of `LOCAL`'s *fenced* (the agent writes 1; any nonzero byte is fenced).
const FENCED_VALUES: [u8; 5] = [1, 1, 1, 0x80, 0xff];
/// The share (percent) of egress new-connection and tunnel peer-connection cases run with an
/// odd plan (an action without next hops, of an unknown kind, or missing).
const ODD_PLAN_PERCENT: u64 = 12;
/// Action kinds no agent writes (1 snat, 2 unreachable, 3 forward are known).
const UNKNOWN_KINDS: [u8; 5] = [0, 4, 5, 0x7f, 0xff];

/// An odd plan for the case: every IPv4 action a *forward* without next hops (what was in
/// `hops` kept, `hop_count` 0), every action of an unknown kind (the rest kept), or the
/// actions of one pool removed. Not from the agent's planner (egress rule 7).
fn odd_plan(g: &mut G) -> Vec<(ActionKey, Option<Action>)> {
    match g.r.below(5) {
        0 | 1 => {
            g.tag("odd plan: forward without next hops");
            g.t.actions
                .iter()
                .filter(|(k, _)| k.family == FAMILY_V4)
                .map(|(k, a)| {
                    let a = Action {
                        kind: ActionKind::Forward as u8,
                        hop_count: 0,
                        ..*a
                    };
                    (*k, Some(a))
                })
                .collect()
        }
        2 | 3 => {
            let kind = *g.r.pick(&UNKNOWN_KINDS);
            g.tag(format!("odd plan: actions of kind {kind}"));
            g.t.actions
                .iter()
                .map(|(k, a)| (*k, Some(Action { kind, ..*a })))
                .collect()
        }
        _ => {
            let pools = g.t.pool_ids();
            if pools.is_empty() {
                return Vec::new();
            }
            let pool = *g.r.pick(&pools);
            g.tag(format!("odd plan: pool {pool} without actions"));
            g.t.actions
                .iter()
                .filter(|(k, _)| k.pool == pool)
                .map(|(k, _)| (*k, None))
                .collect()
        }
    }
}

/// A case from what `g` generated: the odd plan and `LOCAL` (not written, or *fenced* in
/// `fenced_percent` of the cases) are drawn last, so that the rest of a case is what it would
/// be without them.
fn finish(mut g: G, steps: Vec<Step>, odd_plan_allowed: bool, fenced_percent: u64) -> Case {
    let actions = if odd_plan_allowed && g.r.chance(ODD_PLAN_PERCENT) {
        odd_plan(&mut g)
    } else {
        Vec::new()
    };
    let unconfigured = g.r.chance(UNCONFIGURED_PERCENT);
    let mut fenced = 0;
    if unconfigured {
        g.tag("LOCAL not written");
    } else if g.r.chance(fenced_percent) {
        fenced = *g.r.pick(&FENCED_VALUES);
        g.tag(format!("LOCAL fenced {fenced:#x}"));
    }
    Case {
        class: g.class.join(" / "),
        steps,
        flows: g.flows,
        actions,
        unconfigured,
        fenced,
    }
}

fn a16(a: IpAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    let o = octets(a);
    b[..o.len()].copy_from_slice(&o);
    b
}

pub fn fkey(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src: a16(src),
        dst: a16(dst),
        src_port_be: sport.to_be(),
        dst_port_be: dport.to_be(),
        proto,
        family: if src.is_ipv6() { 6 } else { 4 },
        _pad: [0; 2],
    }
}

pub fn fval(kind: u8, addr: IpAddr, port: u16, pool: u32, tunnel: [u8; 4], flags: u8) -> FlowValue {
    FlowValue {
        addr: a16(addr),
        port_be: port.to_be(),
        kind,
        flags,
        pool,
        last_seen_ns: 1,
        created_ns: 1,
        tunnel,
        _pad: [0; 4],
    }
}

fn v4(a: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}

fn target_addr(t: &egress_common::action::SnatTarget, family: u8) -> IpAddr {
    if family == FAMILY_V6 {
        IpAddr::V6(Ipv6Addr::from(t.addr))
    } else {
        v4(t.addr[..4].try_into().unwrap())
    }
}

struct G<'a> {
    t: &'a Topo,
    r: &'a mut Rng,
    flows: Vec<(FlowKey, FlowValue)>,
    class: Vec<String>,
}

const LOCAL_V4: [[u8; 4]; 3] = [[10, 50, 0, 11], [10, 0, 3, 7], [172, 16, 5, 9]];
const LOCAL_V6: [&str; 2] = ["fd00:50::b", "2001:db8:aaaa::5"];
const REMOTE_V4: [[u8; 4]; 5] = [
    [203, 0, 113, 1],
    [203, 0, 113, 200],
    [198, 51, 100, 1],
    [8, 8, 8, 8],
    [192, 0, 2, 99],
];
const REMOTE_V6: [&str; 3] = ["2001:db8:beef::1", "2001:db8:cafe::1", "2001:4860::8888"];
/// Tunnel endpoints in flow entries: peers (resolved), a fabric address without a neighbour,
/// an address without a route.
const ODD_TUNNELS: [[u8; 4]; 2] = [[10, 50, 0, 40], [10, 60, 0, 1]];

impl G<'_> {
    fn tag(&mut self, s: impl Into<String>) {
        self.class.push(s.into());
    }

    fn rand_in(&mut self, net: IpNet) -> IpAddr {
        if net.prefix_len() == 0 {
            // A catch-all: the addresses that matter (remotes, fabric, pool addresses).
            return self.catch_all_pick(net.addr().is_ipv6());
        }
        match net {
            IpNet::V4(n) => {
                let host = 32 - u32::from(n.prefix_len());
                let mask = if host == 32 {
                    u32::MAX
                } else {
                    (1u32 << host) - 1
                };
                IpAddr::V4(Ipv4Addr::from(
                    u32::from(n.network()) | (self.r.next() as u32 & mask),
                ))
            }
            IpNet::V6(n) => {
                let host = 128 - u32::from(n.prefix_len());
                let mask = if host == 128 {
                    u128::MAX
                } else {
                    (1u128 << host) - 1
                };
                let r = (u128::from(self.r.next()) << 64 | u128::from(self.r.next())) & mask;
                IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | r))
            }
        }
    }

    /// An address a catch-all policy's prefix holds that the rules treat apart: a remote, a
    /// fabric address (peer or not), a pool address, one in a range no policy covers (or at
    /// the edge of one).
    fn catch_all_pick(&mut self, v6: bool) -> IpAddr {
        if v6 {
            return match self.r.below(4) {
                0 => "2001:db8:100::b".parse().unwrap(),
                1 => self.never_covered_pick(true),
                _ => self.remote(true),
            };
        }
        if self.r.chance(15) {
            return self.never_covered_pick(false);
        }
        match self.r.below(10) {
            0..=3 => self.remote(false),
            4 | 5 => {
                let mut f: Vec<[u8; 4]> = self.t.peers.clone();
                f.push([10, 50, 0, 40]);
                v4(*self.r.pick(&f))
            }
            6..=8 if !self.t.owners.is_empty() => {
                let a = self.r.pick(&self.t.owners).0;
                v4(a)
            }
            // Some unicast address (not multicast, broadcast or this host's).
            _ => v4([
                *self.r.pick(&[1u8, 45, 100, 185, 203, 223]),
                self.r.next() as u8,
                self.r.next() as u8,
                self.r.range(1, 254) as u8,
            ]),
        }
    }

    /// A destination in a range no policy covers whatever its prefixes say (egress rule 4:
    /// IPv4 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/3; IPv6 ::/16, fe80::/10,
    /// ff00::/8: the host's own DHCP, IGMP, neighbour discovery), now and then one just
    /// outside such a range (covered as usual).
    fn never_covered_pick(&mut self, v6: bool) -> IpAddr {
        if v6 {
            if self.r.chance(20) {
                self.tag("just outside a range no policy covers");
                let a = *self.r.pick(&[
                    "fec0::1",
                    "100::1",
                    "1::1",
                    "ff:ffff::1",
                    "64:ff9b::c633:6401",
                    "fe7f:ffff::1",
                    "fe00::1",
                ]);
                return a.parse().unwrap();
            }
            self.tag("destination no policy covers");
            let a = *self.r.pick(&[
                "fe80::1",
                "fe80::4a:2ff:fe00:1",
                "febf:ffff::1",
                "ff02::1",
                "ff02::1:2",
                "ff05::1:3",
                "ff02::16",
                "::1",
                "::",
                "::ffff:203.0.113.1",
                "::ffff:0:198.51.100.1",
                "0:ffff::1",
            ]);
            return a.parse().unwrap();
        }
        if self.r.chance(20) {
            self.tag("just outside a range no policy covers");
            let a = *self.r.pick(&[
                [169u8, 253, 255, 254],
                [169, 255, 0, 1],
                [223, 255, 255, 254],
                [1, 0, 0, 1],
                [126, 255, 255, 254],
                [128, 0, 0, 1],
            ]);
            return v4(a);
        }
        self.tag("destination no policy covers");
        let x = self.r.next() as u8;
        let y = self.r.range(1, 254) as u8;
        v4(*self.r.pick(&[
            [169u8, 254, x, y],
            [169, 254, 169, 254],
            [224, 0, 0, y],
            [224, 0, 0, 22],
            [239, 255, 255, 250],
            [232, x, 1, y],
            [255, 255, 255, 255],
            [240, x, 0, y],
            [127, 0, 0, 1],
            [127, x, 3, y],
            [0, 0, 0, 0],
            [0, x, 0, y],
        ]))
    }

    /// A destination no policy covers although a catch-all policy's prefix holds it, with
    /// the mark that selects that policy (None: no catch-all of the family).
    fn never_covered_dst(&mut self, v6: bool) -> Option<(IpAddr, u32, u32)> {
        let all: Vec<_> = self
            .t
            .policies
            .iter()
            .filter(|(_, n, _)| n.prefix_len() == 0 && n.addr().is_ipv6() == v6)
            .copied()
            .collect();
        if all.is_empty() {
            return None;
        }
        let (mark, _, pool) = *self.r.pick(&all);
        Some((self.never_covered_pick(v6), mark, pool))
    }

    fn local(&mut self, v6: bool) -> IpAddr {
        if v6 {
            self.r.pick(&LOCAL_V6).parse().unwrap()
        } else {
            v4(*self.r.pick(&LOCAL_V4))
        }
    }

    fn remote(&mut self, v6: bool) -> IpAddr {
        if v6 {
            self.r.pick(&REMOTE_V6).parse().unwrap()
        } else {
            v4(*self.r.pick(&REMOTE_V4))
        }
    }

    /// A destination: mostly inside a policy's prefix (with a mark that selects it), else a
    /// random remote. Returns (destination, mark).
    fn dst(&mut self, v6: bool) -> (IpAddr, u32) {
        let pols: Vec<_> = self
            .t
            .policies
            .iter()
            .filter(|(_, n, _)| n.addr().is_ipv6() == v6)
            .copied()
            .collect();
        if !pols.is_empty() && self.r.chance(75) {
            let (mark, net, _) = *self.r.pick(&pols);
            let d = self.rand_in(net);
            (d, self.mark_near(mark))
        } else {
            let d = self.remote(v6);
            let m = self.mark_near(0);
            (d, m)
        }
    }

    /// A destination covered by a policy of `pool` and the mark that selects it.
    fn dst_of_pool(&mut self, pool: u32, v6: bool) -> Option<(IpAddr, u32)> {
        let pols: Vec<_> = self
            .t
            .policies
            .iter()
            .filter(|(_, n, p)| *p == pool && n.addr().is_ipv6() == v6)
            .copied()
            .collect();
        if pols.is_empty() {
            return None;
        }
        let (mark, net, _) = *self.r.pick(&pols);
        Some((self.rand_in(net), mark))
    }

    fn mark_near(&mut self, m: u32) -> u32 {
        match self.r.below(10) {
            0..=4 => m,
            5 => 0,
            6 => m | 0x8000_0000,
            7 => 0x8000_0000,
            8 => *self.r.pick(&[42, 1, 77, 0x7fff_ffff, 0xffff_ffff]),
            _ => self.r.next() as u32,
        }
    }

    fn port(&mut self) -> u16 {
        match self.r.below(4) {
            0 => *self.r.pick(&[80, 443, 53, 7, 123]),
            _ => self.r.range(1, 65535) as u16,
        }
    }

    fn payload(&mut self) -> Vec<u8> {
        let n = match self.r.below(5) {
            0 | 1 => 0,
            2 => 1,
            3 => self.r.range(2, 40),
            _ => self.r.range(41, 300),
        };
        self.r.bytes(n as usize)
    }

    fn tcp_opts(&mut self) -> (Vec<u8>, &'static str) {
        let mss = *self
            .r
            .pick(&[536u16, 1200, 1400, 1432, 1433, 1460, 8960, 65495]);
        let [h, l] = mss.to_be_bytes();
        match self.r.below(10) {
            0..=3 => (vec![], "no options"),
            4..=6 => (vec![2, 4, h, l], "MSS"),
            7 => (vec![2, 4, h, l, 4, 2, 1, 3, 3, 7], "MSS,SACK,WS"),
            8 => (vec![1, 1, 2, 4, h, l], "NOP,NOP,MSS"),
            _ => (vec![1, 3, 3, 7], "WS only"),
        }
    }

    fn tcp(&mut self, sport: u16, dport: u16, flags: Option<u8>) -> Tp {
        let flags = flags.unwrap_or_else(|| {
            *self.r.pick(&[
                TCP_SYN,
                TCP_SYN,
                TCP_SYN | TCP_ACK,
                TCP_ACK,
                TCP_PSH | TCP_ACK,
                TCP_FIN | TCP_ACK,
                TCP_RST,
                TCP_RST | TCP_ACK,
                TCP_SYN | 0xc0,
            ])
        });
        let (opts, o) = if flags & TCP_SYN != 0 || self.r.chance(10) {
            self.tcp_opts()
        } else {
            (vec![], "no options")
        };
        let payload = if flags & TCP_SYN != 0 {
            vec![]
        } else {
            self.payload()
        };
        self.tag(format!("tcp {} {o}", flag_name(flags)));
        Tp::Tcp {
            sport,
            dport,
            flags,
            opts,
            payload,
        }
    }

    fn udp(&mut self, sport: u16, dport: u16) -> Tp {
        let zero = self.r.chance(15);
        self.tag(if zero { "udp zero-csum" } else { "udp" });
        let payload = self.payload();
        Tp::Udp {
            sport,
            dport,
            payload,
            zero_csum: zero,
        }
    }

    /// A transport for a packet opening/continuing a connection from `sport` to `dport`.
    fn conn_tp(&mut self, v6: bool, sport: u16, dport: u16) -> Tp {
        match self.r.below(20) {
            0..=8 => self.tcp(sport, dport, None),
            9..=14 => self.udp(sport, dport),
            15..=17 => {
                self.tag("echo request");
                let body = self.payload();
                Tp::echo(v6, true, sport, self.r.u16(), body)
            }
            18 => {
                self.tag("echo reply");
                let body = self.payload();
                Tp::echo(v6, false, sport, self.r.u16(), body)
            }
            _ => self.other_tp(v6),
        }
    }

    fn other_tp(&mut self, v6: bool) -> Tp {
        match self.r.below(5) {
            0 => {
                self.tag("icmp timestamp/other");
                Tp::Icmp {
                    typ: if v6 { 135 } else { 13 },
                    code: 0,
                    rest: [0; 4],
                    body: self.r.bytes(12),
                }
            }
            1 => {
                self.tag("icmp error");
                let q = self.r.bytes(28);
                Tp::Icmp {
                    typ: if v6 { 1 } else { 3 },
                    code: 3,
                    rest: [0; 4],
                    body: q,
                }
            }
            2 => {
                self.tag("sctp");
                Tp::Raw {
                    proto: 132,
                    payload: self.r.bytes(16),
                }
            }
            3 => {
                self.tag("esp");
                Tp::Raw {
                    proto: 50,
                    payload: self.r.bytes(24),
                }
            }
            _ => {
                self.tag("gre");
                Tp::Raw {
                    proto: 47,
                    payload: vec![0x20, 0, 8, 0, 0, 0, 0, 7],
                }
            }
        }
    }

    /// The GRE key of a tunnel packet of `pool`: mostly with the kind that fits what is sent,
    /// sometimes another kind or kind 0 (the receiver takes a packet only as its kind).
    fn gre_key(&mut self, fits: u32, pool: u32) -> u32 {
        let kind = match self.r.below(20) {
            0..=15 => fits,
            16..=18 => {
                let others: Vec<u32> = [KIND_CONNECTION, KIND_SOFT_UNICAST, KIND_REPLY]
                    .into_iter()
                    .filter(|k| *k != fits)
                    .collect();
                let k = *self.r.pick(&others);
                self.tag(format!("kind {} for {}", kind_name(k), kind_name(fits)));
                k
            }
            _ => {
                // Kind *probe*: with this pool's bits (refused) or a probe's.
                let probe = [PROBE_REQUEST, PROBE_REPLY, PROBE_REPLY_FENCED];
                let bits = *self.r.pick(&[pool, pool, probe[0], probe[1], probe[2]]);
                self.tag(format!("kind probe, pool bits {bits:#x}"));
                return KIND_PROBE << 30 | bits;
            }
        };
        kind << 30 | pool
    }

    /// The TTL of a packet that may be sent on to another host (a hop): mostly an ordinary
    /// one, sometimes 0 or 1 (dropped) or 2 (the last that goes on).
    fn hop_ttl(&mut self) -> u8 {
        if self.r.chance(15) {
            let t = *self.r.pick(&[0u8, 1, 2]);
            self.tag(format!("TTL {t}"));
            t
        } else {
            64
        }
    }

    /// An IPv4 header of a packet arriving from the uplink (see [`G::v4hdr`]) that may be a
    /// hop.
    fn hop_hdr(&mut self) -> V4 {
        let mut h = self.v4hdr();
        if h.ttl == 64 {
            h.ttl = self.hop_ttl();
        }
        h
    }

    fn v4hdr(&mut self) -> V4 {
        let mut h = V4::default();
        if self.r.chance(20) {
            h.tos = self.r.next() as u8;
            h.id = self.r.u16();
            h.ttl = self.r.range(1, 255) as u8;
            h.frag = if self.r.chance(50) { 0 } else { 0x4000 };
        }
        if self.r.chance(5) {
            self.tag("ip options");
            h.options = vec![1, 1, 1, 0];
        }
        h
    }

    /// Noise entries: unrelated connections in the table.
    fn noise(&mut self) {
        for _ in 0..self.r.below(3) {
            let src = self.local(false);
            let dst = self.remote(false);
            let (sp, dp) = (self.r.u16(), self.r.u16());
            let k = fkey(src, dst, sp, dp, 6);
            let v = fval(FLOW_OUTBOUND, v4([192, 0, 2, 10]), 40001, 7, [0; 4], 0);
            self.flows.push((k, v));
        }
    }

    fn tunnel(&mut self) -> [u8; 4] {
        if self.r.chance(80) && !self.t.peers.is_empty() {
            *self.r.pick(&self.t.peers)
        } else {
            self.tag("odd tunnel");
            *self.r.pick(&ODD_TUNNELS)
        }
    }

    fn closing(&mut self) -> u8 {
        if self.r.chance(30) {
            self.tag("closing");
            FLOW_F_CLOSING
        } else {
            0
        }
    }

    /// The flags of a forwarded entry: sometimes replied, sometimes closed by the socket (its
    /// FIN, its RST, or both).
    fn forwarded_flags(&mut self) -> u8 {
        let replied = if self.r.chance(50) { FLOW_F_REPLIED } else { 0 };
        if !self.r.chance(30) {
            return replied;
        }
        let (bits, name) = *self.r.pick(&[
            (FLOW_F_FIN, "closing (FIN)"),
            (FLOW_F_RST, "closing (RST)"),
            (FLOW_F_CLOSING, "closing (FIN, RST)"),
        ]);
        self.tag(name);
        bits | replied
    }

    /// A local connection's two entries: `(src, dst, sport, dport, proto)` leaving as
    /// `(addr, port)` of `pool`, and the reverse entry its replies find.
    fn push_local(&mut self, t: (IpAddr, IpAddr, u16, u16, u8), binding: (IpAddr, u16, u32)) {
        let ((src, dst, sport, dport, proto), (addr, port, pool)) = (t, binding);
        self.flows.push((
            fkey(src, dst, sport, dport, proto),
            fval(FLOW_OUTBOUND, addr, port, pool, [0; 4], 0),
        ));
        self.flows.push((
            fkey(dst, addr, dport, port, proto),
            fval(FLOW_REVERSE, src, sport, pool, [0; 4], 0),
        ));
    }

    /// A pool address of this server and a port: (addr, port, pool, family).
    fn own_binding(&mut self, v6: bool) -> Option<(IpAddr, u16, u32)> {
        let fam = if v6 { FAMILY_V6 } else { FAMILY_V4 };
        let snat = self.t.pools_with(ActionKind::Snat, fam);
        if snat.is_empty() {
            return None;
        }
        let (pool, a) = *self.r.pick(&snat);
        let t = a.snat[self.r.below(u64::from(a.snat_count)) as usize];
        let port = self.r.range(u64::from(t.port_min), u64::from(t.port_max)) as u16;
        Some((target_addr(&t, fam), port, pool))
    }

    /// A shared IPv4 address and a port in another server's range.
    fn others_port(&mut self) -> Option<([u8; 4], u16, u32)> {
        let mut c = Vec::new();
        for (a, o) in &self.t.owners {
            for r in &o.ranges[..o.count as usize] {
                if r.fabric != FABRIC {
                    c.push((*a, r.port_min, r.port_max, o.pool));
                }
            }
        }
        if c.is_empty() {
            return None;
        }
        let (a, lo, hi, pool) = *self.r.pick(&c);
        Some((a, self.r.range(u64::from(lo), u64::from(hi)) as u16, pool))
    }

    /// A pool address (own share, other's share, outside any range) as replies arrive.
    fn reply_target(&mut self, v6: bool) -> (IpAddr, u16) {
        match self.r.below(10) {
            0..=5 => {
                if let Some((a, p, _)) = self.own_binding(v6) {
                    self.tag("own range");
                    return (a, p);
                }
            }
            6..=7 if !v6 => {
                if let Some((a, p, _)) = self.others_port() {
                    self.tag("other's range");
                    return (v4(a), p);
                }
            }
            _ => {}
        }
        self.tag("outside ranges");
        let a = if v6 {
            "2001:db8:100::b".parse().unwrap()
        } else if let Some((a, _)) = self.t.owners.first() {
            v4(*a)
        } else {
            v4([192, 0, 2, 10])
        };
        (a, *self.r.pick(&[80, 1023, 65535, 1024]))
    }
}

fn flag_name(f: u8) -> &'static str {
    match f {
        TCP_SYN => "SYN",
        x if x == TCP_SYN | TCP_ACK => "SYN-ACK",
        TCP_ACK => "ACK",
        x if x == TCP_PSH | TCP_ACK => "PSH-ACK",
        x if x == TCP_FIN | TCP_ACK => "FIN-ACK",
        TCP_RST => "RST",
        x if x == TCP_RST | TCP_ACK => "RST-ACK",
        x if x == TCP_SYN | 0xc0 => "SYN-ECE-CWR",
        _ => "other flags",
    }
}

/// Generates case `idx` for topology `t` (`idx` makes IP identifications of fragments unique
/// over a run: the programs' `FRAGS` is not emptied between cases).
pub fn case(t: &Topo, r: &mut Rng, idx: usize) -> Case {
    let mut g = G {
        t,
        r,
        flows: Vec::new(),
        class: Vec::new(),
    };
    let roll = g.r.below(100);
    if matches!(roll, 94 | 95) {
        let mut steps = gre_probe(&mut g);
        if g.r.chance(30) {
            g.noise();
        }
        tag_sequence(&mut g, &mut steps);
        return finish(g, steps, false, PROBE_FENCED_PERCENT);
    }
    if matches!(roll, 86) || (roll == 85 && g.r.chance(50)) {
        let local = g.r.chance(40);
        let mut steps = second_peer(&mut g, local);
        tag_sequence(&mut g, &mut steps);
        return finish(g, steps, false, FENCED_PERCENT);
    }
    if roll == 31 {
        let mut steps = forwarded_reopen(&mut g);
        if g.r.chance(30) {
            g.noise();
        }
        tag_sequence(&mut g, &mut steps);
        return finish(g, steps, false, FENCED_PERCENT);
    }
    if matches!(roll, 11..=13) {
        let mut steps = fragment_ways(&mut g, idx);
        if g.r.chance(30) {
            g.noise();
        }
        tag_sequence(&mut g, &mut steps);
        return finish(g, steps, false, FENCED_PERCENT);
    }
    if matches!(roll, 14 | 15 | 40..=42) {
        let mut steps = fragment_sequence(&mut g, idx);
        if g.r.chance(30) {
            g.noise();
        }
        tag_sequence(&mut g, &mut steps);
        return finish(g, steps, false, FENCED_PERCENT);
    }
    let (ingress, mark, mut packet) = match roll {
        11..=13 => unreachable!("fragments leaving and arriving under one key"),
        0..=15 => egress_new(&mut g, false),
        16..=21 => egress_new(&mut g, true),
        22..=30 => egress_established(&mut g),
        31 => unreachable!("reopened forwarded tuples"),
        32..=35 => egress_translated(&mut g),
        36..=39 => egress_own_gre(&mut g),
        40..=42 => unreachable!("sequences"),
        43..=46 => malformed(&mut g),
        47..=49 => egress_big(&mut g),
        50..=52 => egress_exhaustion(&mut g),
        53..=61 => ingress_reply(&mut g),
        62 => ingress_soft_unicast(&mut g),
        63..=71 => ingress_icmp_error(&mut g),
        72..=75 => gre_peer(&mut g),
        76 | 77 => gre_stray(&mut g),
        78..=82 => gre_reply(&mut g),
        83..=86 => gre_forwarded_reply(&mut g),
        87..=89 => gre_icmp_error(&mut g),
        90..=93 => gre_malformed(&mut g),
        94 | 95 => unreachable!("probes"),
        _ => ingress_misc(&mut g),
    };
    if g.r.chance(LONG_PERCENT) {
        ip_length_beyond(&mut g, &mut packet);
    }
    if g.r.chance(4) && packet.len() < 60 {
        g.tag("ethernet padding");
        packet.resize(60, 0);
    }
    if g.r.chance(30) {
        g.noise();
    }
    if g.r.chance(VLAN_PERCENT) {
        let tags = vlan_tags(&mut g);
        packet.splice(12..12, tags);
    }
    let mut steps = vec![Step {
        class: String::new(),
        ingress,
        mark,
        packet,
        prev_output: false,
    }];
    // A peer's connection sent on leaves through tc_egress once more, with the control block
    // the ingress program left (the sent hint).
    if matches!(roll, 72..=75) && g.r.chance(50) {
        steps.push(Step {
            class: "its second pass, on egress".into(),
            ingress: false,
            mark: *g.r.pick(&[0u32, 42, 0x8000_0000]),
            packet: vec![],
            prev_output: true,
        });
    }
    // New connections meet the action (egress rule 7, Tunnel rule 5).
    let fenced_percent = if matches!(roll, 72..=75) {
        PEER_FENCED_PERCENT
    } else {
        FENCED_PERCENT
    };
    let mut c = finish(g, steps, matches!(roll, 0..=21 | 72..=75), fenced_percent);
    // The one step's class is the case's, complete once `finish` drew the plan and `LOCAL`.
    c.steps[0].class = c.class.clone();
    c
}

type Gen = (bool, u32, Vec<u8>);

/// The share of single-packet cases (percent) whose IP length field is made to reach beyond
/// the frame, whatever the packet (TC rule 1 of either hook: a bad IP header).
const LONG_PERCENT: u64 = 3;

/// Makes the (untagged) frame's IP length field (IPv4 total length, IPv6 payload length)
/// reach beyond the frame: the frame cut short of it, or the field raised (the IPv4 header
/// checksum fixed).
fn ip_length_beyond(g: &mut G, frame: &mut Vec<u8>) {
    let v6 = match frame.get(12..14) {
        Some([0x08, 0x00]) => false,
        Some([0x86, 0xdd]) => true,
        _ => return,
    };
    let (hl, len_at) = if v6 { (40, 18) } else { (20, 16) };
    if frame.len() < 14 + hl {
        return;
    }
    let field = usize::from(u16::from_be_bytes([frame[len_at], frame[len_at + 1]]));
    let end = 14 + field + if v6 { 40 } else { 0 };
    let k = *g.r.pick(&[1usize, 1, 2, 3, 4, 7, 8, 20]);
    match g.r.below(4) {
        0 | 1 if end >= 14 + hl + k && end <= frame.len() => {
            g.tag(format!("IP length beyond the frame: cut by {k}"));
            frame.truncate(end - k);
        }
        3 => {
            g.tag("IP length beyond the frame: length 65535");
            frame[len_at..len_at + 2].copy_from_slice(&[0xff, 0xff]);
        }
        _ => {
            g.tag(format!("IP length beyond the frame: length raised by {k}"));
            let n = (field + (frame.len() - end.min(frame.len())) + k).min(0xffff) as u16;
            frame[len_at..len_at + 2].copy_from_slice(&n.to_be_bytes());
        }
    }
    let ihl = usize::from(frame[14] & 0xf) * 4;
    if !v6 && ihl >= 20 && frame.len() >= 14 + ihl {
        frame[24..26].copy_from_slice(&[0, 0]);
        let c = fold(sum(&frame[14..14 + ihl], 0));
        frame[24..26].copy_from_slice(&c.to_be_bytes());
    }
}

/// The share of cases (percent) whose frames carry VLAN tags in their data, drawn last so the
/// rest of a case is what it would be untagged.
const VLAN_PERCENT: u64 = 7;

/// Tag protocol identifiers the rules do not read through (802.1Q-in-Q of old, 802.1ah).
pub const ODD_TPIDS: [u16; 3] = [0x9100, 0x9200, 0x88e7];

/// VLAN tags to insert after the Ethernet addresses (tags in the frame data, the ethertype
/// after them): mostly one 802.1Q tag or an 802.1ad service tag over one; the other orders
/// of the two TPIDs the rules name; a few the rules do not read through: a third tag, which
/// makes the frame malformed, and an odd TPID, which leaves a frame that is not IPv4/IPv6.
fn vlan_tags(g: &mut G) -> Vec<u8> {
    let (tpids, name): (&[u16], &str) = match g.r.below(40) {
        0..=16 => (&[0x8100], "vlan: 802.1Q tag"),
        17..=28 => (&[0x88a8, 0x8100], "vlan: 802.1ad over 802.1Q"),
        29 | 30 => (&[0x88a8], "vlan: 802.1ad tag alone"),
        31 => (&[0x8100, 0x8100], "vlan: two 802.1Q tags"),
        32 => (&[0x8100, 0x88a8], "vlan: 802.1Q over 802.1ad"),
        33 | 34 => (&[0x88a8, 0x8100, 0x8100], "vlan: a third tag"),
        35 => (&[0x8100, 0x8100, 0x8100], "vlan: three 802.1Q tags"),
        36 => (&[ODD_TPIDS[0]], "vlan: odd TPID"),
        37 => (&[ODD_TPIDS[1]], "vlan: odd TPID"),
        38 => (&[0x88a8, ODD_TPIDS[0]], "vlan: odd TPID after a tag"),
        _ => (&[0x8100, ODD_TPIDS[2]], "vlan: odd TPID after a tag"),
    };
    g.tag(name);
    let mut b = Vec::new();
    for tpid in tpids {
        // PCP, DEI and VID; now and then a priority tag (VID 0).
        let vid = if g.r.chance(10) {
            0
        } else {
            g.r.range(1, 4094) as u16
        };
        let tci = (g.r.below(8) as u16) << 13 | vid;
        b.extend_from_slice(&tpid.to_be_bytes());
        b.extend_from_slice(&tci.to_be_bytes());
    }
    b
}

/// Tags (sometimes) the frames of a sequence: every packet it builds, or one of them (the
/// programs' output of a step before stays as it is).
fn tag_sequence(g: &mut G, steps: &mut [Step]) {
    if !g.r.chance(VLAN_PERCENT) {
        return;
    }
    let own: Vec<usize> = (0..steps.len())
        .filter(|i| !steps[*i].prev_output)
        .collect();
    if own.is_empty() {
        return;
    }
    let tags = vlan_tags(g);
    let which: Vec<usize> = if own.len() > 1 && g.r.chance(40) {
        g.tag("one packet tagged");
        vec![*g.r.pick(&own)]
    } else {
        own
    };
    for i in which {
        steps[i].packet.splice(12..12, tags.iter().copied());
        steps[i].class += " / tagged";
    }
}

fn egress_new(g: &mut G, v6: bool) -> Gen {
    if !v6 && g.r.chance(MSS_PADDING_PERCENT) {
        return egress_mss_padding(g);
    }
    g.tag(if v6 { "egress new v6" } else { "egress new v4" });
    let src = g.local(v6);
    let picked = if g.r.chance(8) {
        g.never_covered_dst(v6)
    } else {
        None
    };
    let (dst, mark) = match picked {
        Some((d, m, _)) => (d, g.mark_near(m)),
        None => g.dst(v6),
    };
    let (sp, dp) = (g.port(), g.port());
    if !v6
        && picked.is_none()
        && g.r.chance(10)
        && let Some((dst, mark, tp)) = whole_address_syn(g, sp, dp)
    {
        let h = g.v4hdr();
        return (false, mark, ip_frame(&ip_tp(src, dst, &h, &tp)));
    }
    if v6 && g.r.chance(12) {
        let (dst, tp) = neighbour_discovery(g, dst);
        return (false, mark, ip_frame(&ip_tp(src, dst, &V4::default(), &tp)));
    }
    let tp = g.conn_tp(v6, sp, dp);
    // Ports already taken towards this remote (collisions).
    if g.r.chance(25) {
        fill_claims(g, dst, &tp, v6, false);
    }
    let h = g.v4hdr();
    (false, mark, ip_frame(&ip_tp(src, dst, &h, &tp)))
}

/// An ICMPv6 neighbour discovery message (types 133–137: no policy covers it, to whatever
/// destination), now and then a type just outside that range (untranslatable under a policy)
/// or one cut short; to `dst` (a policy's destination, as a rule), a multicast or a
/// link-local address.
fn neighbour_discovery(g: &mut G, dst: IpAddr) -> (IpAddr, Tp) {
    let typ = *g.r.pick(&[133u8, 134, 135, 135, 136, 136, 137, 132, 138]);
    let dst = match g.r.below(10) {
        0..=5 => dst,
        6 => "ff02::1".parse().unwrap(),
        7 => "ff02::1:ff00:1".parse().unwrap(),
        8 => "fe80::1".parse().unwrap(),
        _ => g.remote(true),
    };
    if g.r.chance(10) {
        g.tag(format!("icmp6 type {typ}, cut short"));
        let n = g.r.range(1, 7) as usize;
        let mut payload = vec![typ];
        payload.extend(g.r.bytes(n - 1));
        return (dst, Tp::Raw { proto: 58, payload });
    }
    g.tag(if ND_TYPES.contains(&typ) {
        format!("icmp6 neighbour discovery type {typ}")
    } else {
        format!("icmp6 type {typ}, next to neighbour discovery")
    });
    // Reserved (or flags) and a target address, options.
    let n = *g.r.pick(&[4usize, 20, 28, 36]);
    let body = g.r.bytes(n - 4);
    (
        dst,
        Tp::Icmp {
            typ,
            code: 0,
            rest: [0; 4],
            body,
        },
    )
}

/// ICMPv6 neighbour discovery types.
const ND_TYPES: std::ops::RangeInclusive<u8> = 133..=137;

/// A SYN whose MSS (the first option) is above the tunnel MSS, to a destination of a *snat*
/// pool with an IPv4 address `OWNERS` holds whole (one share): clamped when translated to it
/// as to an address split between shares (the programs' hash picks the target). With the mark
/// that selects the pool's policy; None when no such pool has a policy.
fn whole_address_syn(g: &mut G, sp: u16, dp: u16) -> Option<(IpAddr, u32, Tp)> {
    let whole = |a: [u8; 4]| g.t.owners.iter().any(|(o, own)| *o == a && own.count == 1);
    let pools: Vec<u32> =
        g.t.pools_with(ActionKind::Snat, FAMILY_V4)
            .into_iter()
            .filter(|(_, a)| {
                a.snat[..usize::from(a.snat_count).min(a.snat.len())]
                    .iter()
                    .any(|t| whole(t.addr[..4].try_into().unwrap()))
            })
            .map(|(p, _)| p)
            .collect();
    if pools.is_empty() {
        return None;
    }
    let pool = *g.r.pick(&pools);
    let (dst, mark) = g.dst_of_pool(pool, false)?;
    let mss = *g.r.pick(&[1433u16, 1460, 8960, 65495]);
    let [h, l] = mss.to_be_bytes();
    let flags = *g.r.pick(&[TCP_SYN, TCP_SYN, TCP_SYN | 0xc0]);
    g.tag(format!(
        "tcp {} MSS {mss} to a pool with an address held whole",
        flag_name(flags)
    ));
    let opts = if g.r.chance(50) {
        vec![2, 4, h, l]
    } else {
        vec![2, 4, h, l, 4, 2, 1, 3, 3, 7]
    };
    Some((
        dst,
        mark,
        Tp::Tcp {
            sport: sp,
            dport: dp,
            flags,
            opts,
            payload: vec![],
        },
    ))
}

/// Reverse entries occupying ports of the SNAT targets towards the packet's remote.
fn fill_claims(g: &mut G, remote: IpAddr, tp: &Tp, v6: bool, all: bool) {
    let fam = if v6 { FAMILY_V6 } else { FAMILY_V4 };
    let (_, rport) = tp.conn_ports();
    let proto = tp.proto(v6);
    let targets: Vec<_> =
        g.t.pools_with(ActionKind::Snat, fam)
            .into_iter()
            .flat_map(|(pool, a)| {
                a.snat[..a.snat_count as usize]
                    .iter()
                    .map(move |t| (pool, *t))
                    .collect::<Vec<_>>()
            })
            .collect();
    if targets.is_empty() {
        return;
    }
    g.tag(if all {
        "up to 64 ports taken"
    } else {
        "some ports taken"
    });
    for (pool, t) in targets {
        let range = u32::from(t.port_max - t.port_min) + 1;
        let n = if all || range <= 8 {
            range.min(64)
        } else {
            g.r.range(1, 6) as u32
        };
        for i in 0..n {
            let port = if all || range <= 8 {
                t.port_min + i as u16
            } else {
                g.r.range(u64::from(t.port_min), u64::from(t.port_max)) as u16
            };
            let k = fkey(remote, target_addr(&t, fam), rport, port, proto);
            let v = fval(FLOW_REVERSE, g.local(v6), g.r.u16(), pool, [0; 4], 0);
            g.flows.push((k, v));
        }
    }
}

fn egress_established(g: &mut G) -> Gen {
    if g.r.chance(PEER_TUPLE_PERCENT) {
        return egress_peer_tuple(g);
    }
    g.tag("egress established");
    let v6 = g.r.chance(20);
    let src = g.local(v6);
    let (dst, mark) = g.dst(v6);
    let (sp, dp) = (g.port(), g.port());
    let tp = g.conn_tp(v6, sp, dp);
    let (csp, cdp) = tp.conn_ports();
    let proto = tp.proto(v6);
    let k = fkey(src, dst, csp, cdp, proto);
    if !v6 && g.r.chance(35) {
        g.tag("forwarded entry");
        let pool = *g.r.pick(&g.t.pool_ids());
        let tunnel = g.tunnel();
        let flags = g.forwarded_flags();
        g.flows
            .push((k, fval(FLOW_FORWARDED, src, csp, pool, tunnel, flags)));
    } else if let Some((addr, port, pool)) = g.own_binding(v6) {
        g.tag("outbound entry");
        let flags = g.closing();
        let tunnel = if g.r.chance(15) { g.tunnel() } else { [0; 4] };
        g.flows
            .push((k, fval(FLOW_OUTBOUND, addr, port, pool, tunnel, flags)));
        let rk = fkey(dst, addr, cdp, port, proto);
        g.flows
            .push((rk, fval(FLOW_REVERSE, src, csp, pool, tunnel, flags)));
    } else {
        g.tag("no entry (no snat pool)");
    }
    let h = g.v4hdr();
    (false, mark, ip_frame(&ip_tp(src, dst, &h, &tp)))
}

/// The share (percent) of `egress_established` cases that are this host's packets on a
/// peer's tuple ([`egress_peer_tuple`]).
const PEER_TUPLE_PERCENT: u64 = 30;

/// This host's packet on a tuple whose outbound entry names a tunnel (a peer's connection
/// translated here, whose inner tuple this host's own packet repeats): dropped
/// (`drop_peer_tuple`, egress rule 3), the entry untouched — a SYN on an entry that saw a FIN
/// or RST does not reopen it, a FIN or RST does not flag it. SYN, SYN-ACK, data, FIN, RST, UDP
/// and echo requests.
fn egress_peer_tuple(g: &mut G) -> Gen {
    g.tag("egress on a peer's tuple");
    let v6 = g.r.chance(10);
    let src = g.local(v6);
    let (dst, mark) = g.dst(v6);
    let (sp, dp) = (g.port(), g.port());
    let tp = match g.r.below(12) {
        0..=3 => {
            let f =
                *g.r.pick(&[TCP_SYN, TCP_SYN, TCP_SYN | 0xc0, TCP_SYN | TCP_ACK]);
            g.tcp(sp, dp, Some(f))
        }
        4 | 5 => {
            let f = *g.r.pick(&[TCP_ACK, TCP_PSH | TCP_ACK]);
            g.tcp(sp, dp, Some(f))
        }
        6 | 7 => g.tcp(sp, dp, Some(TCP_FIN | TCP_ACK)),
        8 | 9 => {
            let f = *g.r.pick(&[TCP_RST, TCP_RST | TCP_ACK]);
            g.tcp(sp, dp, Some(f))
        }
        10 => g.udp(sp, dp),
        _ => {
            g.tag("echo request");
            let b = g.payload();
            Tp::echo(v6, true, sp, 6, b)
        }
    };
    let (csp, cdp) = tp.conn_ports();
    let proto = tp.proto(v6);
    let (addr, port, pool) = match g.own_binding(v6) {
        Some(b) => b,
        None => {
            g.tag("binding outside the pools");
            let a = if v6 {
                "2001:db8:100::b".parse().unwrap()
            } else {
                v4([192, 0, 2, 10])
            };
            (a, 40000, *g.r.pick(&g.t.pool_ids()))
        }
    };
    let syn_only =
        matches!(tp, Tp::Tcp { flags, .. } if flags & TCP_SYN != 0 && flags & TCP_ACK == 0);
    // A SYN meets an entry that saw a FIN or RST half the time: it would reopen a tuple of
    // this host's own.
    let flags = if syn_only && g.r.chance(50) {
        let (bits, name) = *g.r.pick(&[
            (FLOW_F_FIN, "closing (FIN)"),
            (FLOW_F_RST, "closing (RST)"),
            (FLOW_F_CLOSING, "closing (FIN, RST)"),
        ]);
        g.tag(name);
        bits
    } else {
        g.closing()
    };
    let tunnel = g.tunnel();
    g.flows.push((
        fkey(src, dst, csp, cdp, proto),
        fval(FLOW_OUTBOUND, addr, port, pool, tunnel, flags),
    ));
    g.flows.push((
        fkey(dst, addr, cdp, port, proto),
        fval(FLOW_REVERSE, src, csp, pool, tunnel, flags),
    ));
    let h = g.v4hdr();
    (false, mark, ip_frame(&ip_tp(src, dst, &h, &tp)))
}

/// The share (percent) of new IPv4 egress cases that are SYNs whose MSS lies past the IP
/// length ([`egress_mss_padding`]); four times that of peers' connections and forwarded
/// replies in a tunnel.
const MSS_PADDING_PERCENT: u64 = 7;

/// A TCP segment with SYN set (`flags`) whose data offset claims an MSS option (mostly above
/// the tunnel MSS) as its first option, but whose IP packet ends before the option's end (at
/// the option, or 1 to 3 bytes into it): the IP packet (its length and the TCP checksum cover
/// the bytes within it) and the bytes after it in the frame (the option and what follows:
/// padding, never an option).
#[allow(clippy::too_many_arguments, reason = "one segment")]
fn mss_past_ip_length(
    g: &mut G,
    src: IpAddr,
    dst: IpAddr,
    h: &V4,
    sp: u16,
    dp: u16,
    flags: u8,
) -> (Vec<u8>, Vec<u8>) {
    let mss = *g.r.pick(&[1433u16, 1460, 1460, 8960, 65495, 1200]);
    let [hi, lo] = mss.to_be_bytes();
    let opts = if g.r.chance(50) {
        vec![2, 4, hi, lo]
    } else {
        vec![2, 4, hi, lo, 4, 2, 1, 3, 3, 7]
    };
    let tp = Tp::Tcp {
        sport: sp,
        dport: dp,
        flags,
        opts,
        payload: vec![],
    };
    let mut seg = segment(src, dst, &tp);
    let k = *g.r.pick(&[0usize, 0, 0, 1, 2, 3]);
    g.tag(format!(
        "tcp {} MSS {mss} past the IP length ({k} bytes of it within)",
        flag_name(flags)
    ));
    let padding = seg.split_off(20 + k);
    seg[16..18].copy_from_slice(&[0, 0]);
    let c = fold(sum(&seg, pseudo(src, dst, 6, seg.len())));
    seg[16..18].copy_from_slice(&c.to_be_bytes());
    (ip_packet(src, dst, 6, h, &seg), padding)
}

/// IPv4 *snat* pools with a target `OWNERS` holds (split or whole): translated to it, a SYN is
/// clamped. (pool, those targets' addresses.)
fn snat_pools_in_owners(g: &G) -> Vec<(u32, Vec<[u8; 4]>)> {
    g.t.pools_with(ActionKind::Snat, FAMILY_V4)
        .into_iter()
        .filter_map(|(p, a)| {
            let owned: Vec<[u8; 4]> = a.snat[..usize::from(a.snat_count).min(a.snat.len())]
                .iter()
                .map(|t| <[u8; 4]>::try_from(&t.addr[..4]).unwrap())
                .filter(|x| g.t.owners.iter().any(|(o, _)| o == x))
                .collect();
            (!owned.is_empty()).then_some((p, owned))
        })
        .collect()
}

/// A SYN on an egress path that clamps — forwarded (new, or on a forwarded entry), translated
/// to an IPv4 pool address (new, or on an outbound entry) — whose data offset claims the MSS
/// option but whose IP length ends before it, the option in the frame as padding: not
/// clamped.
fn egress_mss_padding(g: &mut G) -> Gen {
    g.tag("egress SYN, MSS past the IP length");
    let src = g.local(false);
    let (sp, dp) = (g.port(), g.port());
    let fwd = g.t.pools_with(ActionKind::Forward, FAMILY_V4);
    let owned = snat_pools_in_owners(g);
    let established = g.r.chance(35);
    let forward = !fwd.is_empty() && (owned.is_empty() || g.r.chance(50));
    let (dst, mark) = if forward {
        g.tag(if established {
            "forwarded entry"
        } else {
            "forward pool"
        });
        let (pool, _) = *g.r.pick(&fwd);
        let (d, m) = g.dst_of_pool(pool, false).unwrap_or_else(|| g.dst(false));
        if established {
            let tunnel = g.tunnel();
            g.flows.push((
                fkey(src, d, sp, dp, 6),
                fval(FLOW_FORWARDED, src, sp, pool, tunnel, 0),
            ));
        }
        (d, m)
    } else if !owned.is_empty() {
        g.tag(if established {
            "outbound entry to an address in OWNERS"
        } else {
            "snat pool with an address in OWNERS"
        });
        let (pool, addrs) = g.r.pick(&owned).clone();
        let (d, m) = g.dst_of_pool(pool, false).unwrap_or_else(|| g.dst(false));
        if established {
            let addr = v4(*g.r.pick(&addrs));
            let port = g.r.range(1024, 65535) as u16;
            g.push_local((src, d, sp, dp, 6), (addr, port, pool));
        }
        (d, m)
    } else {
        g.tag("no pool that clamps");
        g.dst(false)
    };
    let flags = if established {
        *g.r.pick(&[TCP_SYN | TCP_ACK, TCP_SYN | TCP_ACK, TCP_SYN])
    } else {
        *g.r.pick(&[TCP_SYN, TCP_SYN, TCP_SYN | 0xc0])
    };
    let h = g.v4hdr();
    let (ip, padding) = mss_past_ip_length(g, src, dst, &h, sp, dp, flags);
    let mut frame = ip_frame(&ip);
    frame.extend_from_slice(&padding);
    (false, mark, frame)
}

/// A peer's SYN in a tunnel (new, or on an outbound entry of this peer) to a destination of a
/// *snat* pool with an address in `OWNERS`, whose inner data offset claims the MSS option but
/// whose inner IP length ends before it; the outer IPv4 length ends with the inner packet,
/// the option in the frame as padding: translated, not clamped.
fn gre_peer_mss_padding(g: &mut G) -> Gen {
    g.tag("GRE peer SYN, MSS past the IP length");
    let owned = snat_pools_in_owners(g);
    let (pool, addrs) = if owned.is_empty() {
        g.tag("no snat pool with an address in OWNERS");
        (*g.r.pick(&g.t.pool_ids()), vec![])
    } else {
        g.r.pick(&owned).clone()
    };
    let (dst, _) = g.dst_of_pool(pool, false).unwrap_or_else(|| g.dst(false));
    let inner_src = v4(*g.r.pick(&[[10u8, 9, 8, 7], [172, 16, 0, 1]]));
    let (sp, dp) = (g.port(), g.port());
    let (peer, h) = gre_outer(g);
    if !addrs.is_empty() && g.r.chance(30) {
        g.tag("outbound entry of this peer");
        let addr = v4(*g.r.pick(&addrs));
        let port = g.r.range(1024, 65535) as u16;
        let tunnel = peer.octets();
        g.flows.push((
            fkey(inner_src, dst, sp, dp, 6),
            fval(FLOW_OUTBOUND, addr, port, pool, tunnel, 0),
        ));
        g.flows.push((
            fkey(dst, addr, dp, port, 6),
            fval(FLOW_REVERSE, inner_src, sp, pool, tunnel, 0),
        ));
    }
    let flags =
        *g.r.pick(&[TCP_SYN, TCP_SYN, TCP_SYN | 0xc0, TCP_SYN | TCP_ACK]);
    let ih = V4 {
        ttl: g.hop_ttl(),
        ..V4::default()
    };
    let (inner, padding) = mss_past_ip_length(g, inner_src, dst, &ih, sp, dp, flags);
    let key = KIND_CONNECTION << 30 | pool;
    (
        true,
        g.r.next() as u32,
        gre_frame_padded(peer, &h, key, &inner, &padding),
    )
}

/// A GRE packet (no Ethernet header) from `peer` to this server, a plain outer header, key
/// `key`, around `inner`.
fn gre_from(peer: impl Into<Ipv4Addr>, key: u32, inner: &[u8]) -> Vec<u8> {
    gre_packet(
        peer.into(),
        FABRIC.into(),
        &V4::default(),
        0x2000,
        0x0800,
        key,
        inner,
    )
}

/// A GRE frame from `peer` to this server (outer header `h`, key `key`) around `inner`,
/// with `padding` after the outer packet.
fn gre_frame_padded(peer: Ipv4Addr, h: &V4, key: u32, inner: &[u8], padding: &[u8]) -> Vec<u8> {
    let mut frame = ip_frame(&gre_packet(
        peer,
        FABRIC.into(),
        h,
        0x2000,
        0x0800,
        key,
        inner,
    ));
    frame.extend_from_slice(padding);
    frame
}

/// A forwarded connection's reply SYN-ACK in a tunnel from the entry's own peer (now and
/// then a bare SYN), whose inner data offset claims the MSS option but whose inner IP length
/// ends before it; the outer IPv4 length ends with the inner packet, the option in the frame
/// as padding: delivered, not clamped.
fn gre_forwarded_reply_mss_padding(g: &mut G) -> Gen {
    g.tag("GRE forwarded reply SYN-ACK, MSS past the IP length");
    let local = g.local(false);
    let (remote, _) = g.dst(false);
    let (lport, rport) = (g.port(), g.port());
    let (peer, h) = gre_outer(g);
    let pool = *g.r.pick(&g.t.pool_ids());
    g.flows.push((
        fkey(local, remote, lport, rport, 6),
        fval(FLOW_FORWARDED, local, lport, pool, peer.octets(), 0),
    ));
    let flags = if g.r.chance(15) {
        TCP_SYN
    } else {
        TCP_SYN | TCP_ACK
    };
    let ih = V4 {
        ttl: g.hop_ttl(),
        ..V4::default()
    };
    let (inner, padding) = mss_past_ip_length(g, remote, local, &ih, rport, lport, flags);
    let key = KIND_REPLY << 30 | pool;
    (
        true,
        g.r.next() as u32,
        gre_frame_padded(peer, &h, key, &inner, &padding),
    )
}

/// A forwarded connection the socket closed (its FIN or RST through the entry, or an entry
/// that saw one), then a SYN on the same tuple: a new connection on the plan in force (egress
/// rule 3), not the old one's peer — which may be down now, or not a next hop any more. Now
/// and then a SYN-ACK instead (not a new connection), the SYN without the close (a
/// retransmission), and the next packets of the tuple after the SYN.
fn forwarded_reopen(g: &mut G) -> Vec<Step> {
    g.tag("forwarded tuple reopened");
    let fwd = g.t.pools_with(ActionKind::Forward, FAMILY_V4);
    let mut old_hops: Vec<[u8; 4]> = Vec::new();
    let (dst, mark, pool) = match (fwd.is_empty(), g.r.chance(60)) {
        (false, true) => {
            let (pool, a) = *g.r.pick(&fwd);
            old_hops = a.hops[..usize::from(a.hop_count).min(a.hops.len())].to_vec();
            match g.dst_of_pool(pool, false) {
                Some((d, m)) => (d, g.mark_near(m), pool),
                None => {
                    let (d, m) = g.dst(false);
                    (d, m, pool)
                }
            }
        }
        _ => {
            let (d, m) = g.dst(false);
            let pool = *g.r.pick(&g.t.pool_ids());
            (d, m, pool)
        }
    };
    // The old connection's peer: one the plan forwards to now (the new connection may take it
    // again), another peer (one that went down, or a tier that changed) or an odd address.
    let tunnel = if !old_hops.is_empty() && g.r.chance(40) {
        g.tag("old peer a planned hop");
        *g.r.pick(&old_hops)
    } else {
        g.tunnel()
    };
    let src = g.local(false);
    let (sp, dp) = (g.port(), g.port());
    let k = fkey(src, dst, sp, dp, 6);
    let pkt = |g: &mut G, flags: u8| -> Vec<u8> {
        let tp = g.tcp(sp, dp, Some(flags));
        let h = g.v4hdr();
        ip_frame(&ip_tp(src, dst, &h, &tp))
    };
    let egress = |class: &str, packet: Vec<u8>| Step {
        class: class.to_string(),
        ingress: false,
        mark,
        packet,
        prev_output: false,
    };
    let mut steps = Vec::new();
    let replied = if g.r.chance(60) { FLOW_F_REPLIED } else { 0 };
    match g.r.below(10) {
        0..=4 => {
            g.tag("closed by the socket's packet");
            g.flows
                .push((k, fval(FLOW_FORWARDED, src, sp, pool, tunnel, replied)));
            let f = *g.r.pick(&[TCP_FIN | TCP_ACK, TCP_RST, TCP_RST | TCP_ACK]);
            let p = pkt(g, f);
            steps.push(egress("socket closes the forwarded connection", p));
            if f & TCP_FIN != 0 && g.r.chance(30) {
                g.tag("last ACK after the FIN");
                let p = pkt(g, TCP_ACK);
                steps.push(egress("socket's last ACK", p));
            }
        }
        5..=7 => {
            let bits = *g.r.pick(&[FLOW_F_FIN, FLOW_F_RST, FLOW_F_CLOSING]);
            g.tag(format!("entry closed (flags {bits:#x})"));
            g.flows.push((
                k,
                fval(FLOW_FORWARDED, src, sp, pool, tunnel, bits | replied),
            ));
        }
        _ => {
            g.tag("entry open (a retransmitted SYN)");
            g.flows
                .push((k, fval(FLOW_FORWARDED, src, sp, pool, tunnel, replied)));
        }
    }
    let syn = if g.r.chance(15) {
        g.tag("SYN-ACK, not a new connection");
        TCP_SYN | TCP_ACK
    } else {
        *g.r.pick(&[TCP_SYN, TCP_SYN, TCP_SYN | 0xc0])
    };
    let p = pkt(g, syn);
    steps.push(egress("SYN on the tuple", p));
    match g.r.below(4) {
        0 => {
            g.tag("SYN retransmitted");
            let p = pkt(g, TCP_SYN);
            steps.push(egress("SYN again", p));
        }
        1 | 2 => {
            let p = pkt(g, TCP_ACK);
            steps.push(egress("the new connection's next packet", p));
        }
        _ => {}
    }
    steps
}

fn egress_translated(g: &mut G) -> Gen {
    g.tag("egress already translated");
    let v6 = g.r.chance(20);
    let Some((addr, port, pool)) = g.own_binding(v6) else {
        return egress_new(g, v6);
    };
    let (dst, mark) = g.dst(v6);
    let dp = g.port();
    let tp = g.conn_tp(v6, port, dp);
    let (csp, cdp) = tp.conn_ports();
    let proto = tp.proto(v6);
    if g.r.chance(75) {
        g.tag("reverse entry");
        let peer = g.tunnel();
        let orig = v4([10, 9, 8, 7]);
        let orig = if v6 { g.local(true) } else { orig };
        g.flows.push((
            fkey(dst, addr, cdp, csp, proto),
            fval(
                FLOW_REVERSE,
                orig,
                g.r.u16(),
                pool,
                if v6 { [0; 4] } else { peer },
                0,
            ),
        ));
    }
    let h = g.v4hdr();
    if g.r.chance(20) {
        // Shaped like a reply (remote → pool address), sent by this host.
        let reply = match tp {
            Tp::Tcp {
                sport,
                dport,
                flags,
                opts,
                payload,
            } => Some(Tp::Tcp {
                sport: dport,
                dport: sport,
                flags,
                opts,
                payload,
            }),
            Tp::Udp {
                sport,
                dport,
                payload,
                zero_csum,
            } => Some(Tp::Udp {
                sport: dport,
                dport: sport,
                payload,
                zero_csum,
            }),
            _ => None,
        };
        if let Some(tp) = reply {
            g.tag("reply-shaped, sent by this host");
            return (false, mark, ip_frame(&ip_tp(dst, addr, &h, &tp)));
        }
        return (
            false,
            mark,
            ip_frame(&ip_tp(addr, dst, &h, &g.udp(port, dp))),
        );
    }
    (false, mark, ip_frame(&ip_tp(addr, dst, &h, &tp)))
}

fn egress_own_gre(g: &mut G) -> Gen {
    g.tag("egress GRE");
    let src = if g.r.chance(80) {
        g.tag("from fabric");
        FABRIC
    } else {
        g.tag("from elsewhere");
        [10, 50, 0, 77]
    };
    let dst = if g.r.chance(75) && !g.t.peers.is_empty() {
        g.tag("to peer");
        *g.r.pick(&g.t.peers)
    } else {
        g.tag("to non-peer");
        *g.r.pick(&[[10u8, 50, 0, 99], [203, 0, 113, 1]])
    };
    let inner_src = g.local(false);
    let (inner_dst, _) = g.dst(false);
    let (sp, dp) = (g.port(), g.port());
    let tp = g.tcp(sp, dp, None);
    let inner = ip_tp(inner_src, inner_dst, &V4::default(), &tp);
    let key = KIND_CONNECTION << 30 | *g.r.pick(&g.t.pool_ids());
    let mark = *g.r.pick(&[0u32, 0x8000_0000, 42, 0x8000_002a, 7]);
    let p = gre_packet(
        src.into(),
        dst.into(),
        &V4::default(),
        0x2000,
        0x0800,
        key,
        &inner,
    );
    (false, mark, ip_frame(&p))
}

/// The IP packets of one datagram cut into fragments: the first (offset 0, more fragments) and
/// the later ones, checksums computed over the whole datagram. `ttl`: the IPv4 TTL of a
/// datagram that may be a hop (a later fragment sometimes with a low one of its own).
fn fragment_datagram(
    g: &mut G,
    src: IpAddr,
    dst: IpAddr,
    tp: &Tp,
    id: u32,
    ttl: Option<u8>,
) -> Vec<Vec<u8>> {
    let v6 = src.is_ipv6();
    let proto = tp.proto(v6);
    let seg = segment(src, dst, tp);
    let hdr = match tp {
        Tp::Tcp { opts, .. } => 20 + opts.len().div_ceil(4) * 4,
        _ => 8,
    };
    // The first fragment carries the transport header; 1–3 later ones carry the rest.
    let first = (hdr.div_ceil(8) + g.r.below(3) as usize) * 8;
    let first = first.min((seg.len() - 1) / 8 * 8).max(8);
    if src.is_ipv6() && g.r.chance(10) {
        g.tag("atomic fragment (offset 0, M clear)");
        let mut fh = vec![proto, 0, 0, 0];
        fh.extend_from_slice(&id.to_be_bytes());
        fh.extend_from_slice(&seg);
        return vec![ip_packet(src, dst, 44, &V4::default(), &fh)];
    }
    let mut cuts = vec![0, first];
    let pieces = g.r.range(1, 3) as usize;
    for i in 1..pieces {
        let left = seg.len().saturating_sub(*cuts.last().unwrap());
        let step = (left / (pieces - i + 1)) / 8 * 8;
        if step >= 8 {
            cuts.push(cuts.last().unwrap() + step);
        }
    }
    cuts.push(seg.len());
    cuts.dedup();
    let mut out = Vec::new();
    for w in cuts.windows(2) {
        let (off, end) = (w[0], w[1]);
        let more = end < seg.len();
        let chunk = &seg[off..end];
        if v6 {
            let mut fh = vec![proto, 0];
            fh.extend_from_slice(&(((off / 8) as u16) << 3 | u16::from(more)).to_be_bytes());
            fh.extend_from_slice(&id.to_be_bytes());
            fh.extend_from_slice(chunk);
            out.push(ip_packet(src, dst, 44, &V4::default(), &fh));
        } else {
            let ttl = match ttl {
                Some(_) if off != 0 && g.r.chance(15) => {
                    let t = *g.r.pick(&[0u8, 1, 2]);
                    g.tag(format!("a later fragment with TTL {t}"));
                    t
                }
                Some(t) => t,
                None => 64,
            };
            let h = V4 {
                id: id as u16,
                frag: (off / 8) as u16 | if more { 0x2000 } else { 0 },
                ttl,
                ..V4::default()
            };
            out.push(ip_packet(src, dst, proto, &h, chunk));
        }
    }
    out
}

/// A transport for a fragmented datagram: TCP, UDP or an echo (request unless `reply`) with a
/// payload long enough to be cut.
fn big_tp(g: &mut G, v6: bool, sport: u16, dport: u16, reply: bool) -> Tp {
    let n = g.r.range(40, 600) as usize;
    let payload = g.r.bytes(n);
    match g.r.below(10) {
        0..=3 => {
            let flags = if reply {
                *g.r.pick(&[TCP_ACK, TCP_PSH | TCP_ACK, TCP_SYN | TCP_ACK])
            } else {
                *g.r.pick(&[TCP_ACK, TCP_PSH | TCP_ACK, TCP_SYN])
            };
            let (opts, o) = if flags & TCP_SYN != 0 {
                g.tcp_opts()
            } else {
                (vec![], "no options")
            };
            g.tag(format!("tcp {} {o}", flag_name(flags)));
            Tp::Tcp {
                sport,
                dport,
                flags,
                opts,
                payload,
            }
        }
        4..=7 => {
            let zero = g.r.chance(10);
            g.tag(if zero { "udp zero-csum" } else { "udp" });
            Tp::Udp {
                sport,
                dport,
                payload,
                zero_csum: zero,
            }
        }
        _ => {
            g.tag(if reply { "echo reply" } else { "echo request" });
            let id = if reply { dport } else { sport };
            Tp::echo(v6, !reply, id, 5, payload)
        }
    }
}

fn step(class: &str, ingress: bool, mark: u32, ip: &[u8]) -> Step {
    Step {
        class: class.to_string(),
        ingress,
        mark,
        packet: ip_frame(ip),
        prev_output: false,
    }
}

/// A fragmented datagram through one datapath: the first fragment and its later ones (in
/// order; a later one overtaking the first; the first lost), in the scenarios the *Fragments*
/// rules name: egress SNAT and forward, a peer's connection in a tunnel (and its translated
/// fragments on egress), replies plain and in a tunnel, soft-unicast, a forwarded connection's
/// reply in a tunnel (delivered).
fn fragment_sequence(g: &mut G, idx: usize) -> Vec<Step> {
    g.tag("fragments");
    let id4 = u32::from((idx as u16).wrapping_mul(40503) ^ 0x5a5a);
    let id6 = 0x4000_0000 | idx as u32;
    // A peer's connection (2) twice as often: its later fragments go three ways (in the
    // tunnel, translated and untranslated on egress), and a key of the wrong kind loses some.
    let scenario = match g.r.below(9) {
        8 => 2,
        s => s,
    };
    let v6 = matches!(scenario, 0 | 3) && g.r.chance(35);
    let id = if v6 { id6 } else { id4 };
    g.tag(if v6 { "v6" } else { "v4" });
    let mut egress_mark = 0;
    // (source, destination, transport, hook of the plain packets, mark, GRE wrapper: peer, key)
    let (src, dst, tp, ingress, mark, gre): (
        IpAddr,
        IpAddr,
        Tp,
        bool,
        u32,
        Option<(Ipv4Addr, u32)>,
    ) = match scenario {
        0 | 1 => {
            let kind = if scenario == 0 {
                ActionKind::Snat
            } else {
                ActionKind::Forward
            };
            g.tag(if scenario == 0 {
                "egress snat"
            } else {
                "egress forward"
            });
            let fam = if v6 { FAMILY_V6 } else { FAMILY_V4 };
            let pools = g.t.pools_with(kind, fam);
            let never = if g.r.chance(40) {
                g.never_covered_dst(v6)
            } else {
                None
            };
            let (dst, mark) = if let Some((d, m, _)) = never {
                // Its later fragments ask the policy too (*Fragments* rule 3).
                (d, m)
            } else if pools.is_empty() {
                g.dst(v6)
            } else {
                let (pool, _) = *g.r.pick(&pools);
                g.dst_of_pool(pool, v6).unwrap_or_else(|| g.dst(v6))
            };
            let src = g.local(v6);
            let (sp, dp) = (g.port(), g.port());
            let tp = big_tp(g, v6, sp, dp, false);
            let peer_tuple = g.r.chance(35);
            if peer_tuple {
                // A peer's connection translated here under this very tuple: the first
                // fragment is dropped (`drop_peer_tuple`), nothing recorded for the later
                // ones.
                let (a, b) = tp.conn_ports();
                let proto = tp.proto(v6);
                let (addr, port, pool) = g.own_binding(v6).unwrap_or_else(|| {
                    let a = if v6 {
                        "2001:db8:100::b".parse().unwrap()
                    } else {
                        v4([192, 0, 2, 10])
                    };
                    (a, 40000, 1)
                });
                let tunnel = g.tunnel();
                let flags = g.closing();
                g.tag("outbound entry of a peer");
                g.flows.push((
                    fkey(src, dst, a, b, proto),
                    fval(FLOW_OUTBOUND, addr, port, pool, tunnel, flags),
                ));
                g.flows.push((
                    fkey(dst, addr, b, port, proto),
                    fval(FLOW_REVERSE, src, a, pool, tunnel, flags),
                ));
            } else if g.r.chance(30) {
                // An established connection.
                let (a, b) = tp.conn_ports();
                let proto = tp.proto(v6);
                if scenario == 1 && !v6 {
                    g.tag("forwarded entry");
                    let pool = *g.r.pick(&g.t.pool_ids());
                    let tunnel = g.tunnel();
                    g.flows.push((
                        fkey(src, dst, a, b, proto),
                        fval(FLOW_FORWARDED, src, a, pool, tunnel, 0),
                    ));
                } else if let Some((addr, port, pool)) = g.own_binding(v6) {
                    g.tag("outbound entry");
                    g.push_local((src, dst, a, b, proto), (addr, port, pool));
                }
            }
            (src, dst, tp, false, mark, None)
        }
        2 => {
            g.tag("peer in tunnel");
            let snat = g.t.pools_with(ActionKind::Snat, FAMILY_V4);
            let pool = if snat.is_empty() {
                *g.r.pick(&g.t.pool_ids())
            } else {
                g.r.pick(&snat).0
            };
            let (dst, m) = g.dst_of_pool(pool, false).unwrap_or_else(|| g.dst(false));
            // The mark of the datagram's later fragments sent untranslated on egress.
            egress_mark = if g.r.chance(70) { m } else { 0 };
            let src = v4(*g.r.pick(&[[10u8, 9, 8, 7], [172, 16, 0, 1]]));
            let (sp, dp) = (g.port(), g.port());
            let tp = big_tp(g, false, sp, dp, false);
            let peer = if g.t.peers.is_empty() {
                [10, 50, 0, 12]
            } else {
                *g.r.pick(&g.t.peers)
            };
            let key = g.gre_key(KIND_CONNECTION, pool);
            (src, dst, tp, true, 0, Some((peer.into(), key)))
        }
        3 | 4 => {
            g.tag(if scenario == 3 {
                "reply plain"
            } else {
                "reply in tunnel"
            });
            let (to, port) = g.reply_target(v6);
            let (from, _) = g.dst(v6);
            let rport = g.port();
            let tp = big_tp(g, v6, rport, port, true);
            let (a, b) = tp.reply_ports();
            if g.r.chance(85) {
                let tunnel = if !v6 && g.r.chance(40) {
                    g.tag("reverse entry with tunnel");
                    g.tunnel()
                } else {
                    g.tag("reverse entry");
                    [0; 4]
                };
                let orig = g.local(v6);
                let pool = *g.r.pick(&g.t.pool_ids());
                g.flows.push((
                    fkey(from, to, a, b, tp.proto(v6)),
                    fval(FLOW_REVERSE, orig, g.r.u16(), pool, tunnel, 0),
                ));
            }
            let gre = if scenario == 4 {
                let peer = if g.t.peers.is_empty() {
                    [10, 50, 0, 12]
                } else {
                    *g.r.pick(&g.t.peers)
                };
                // Soft-unicast brings a reply to the server that owns its port.
                let pool = *g.r.pick(&g.t.pool_ids());
                Some((peer.into(), g.gre_key(KIND_SOFT_UNICAST, pool)))
            } else {
                None
            };
            (from, to, tp, true, g.r.next() as u32, gre)
        }
        5 => {
            g.tag("soft-unicast");
            let (to, port) = match g.others_port() {
                Some((a, p, _)) => (v4(a), p),
                None => g.reply_target(false),
            };
            let (from, _) = g.dst(false);
            let rport = g.port();
            let tp = big_tp(g, false, rport, port, true);
            (from, to, tp, true, 0, None)
        }
        6 => {
            g.tag("later fragments alone");
            let ingress = g.r.chance(50);
            let (src, (dst, mark)) = if ingress {
                let (a, _) = g.reply_target(false);
                (g.remote(false), (a, 0))
            } else {
                (g.local(false), g.dst(false))
            };
            let (sp, dp) = (g.port(), g.port());
            let tp = big_tp(g, false, sp, dp, ingress);
            let gre = if ingress && g.r.chance(40) {
                let peer = if g.t.peers.is_empty() {
                    [10, 50, 0, 12]
                } else {
                    *g.r.pick(&g.t.peers)
                };
                let kind =
                    *g.r.pick(&[0, KIND_CONNECTION, KIND_SOFT_UNICAST, KIND_REPLY]);
                Some((peer.into(), kind << 30 | *g.r.pick(&g.t.pool_ids())))
            } else {
                None
            };
            (src, dst, tp, ingress, mark, gre)
        }
        _ => {
            g.tag("forwarded reply in tunnel");
            let local = g.local(false);
            let (remote, _) = g.dst(false);
            let (lport, rport) = (g.port(), g.port());
            let tp = big_tp(g, false, rport, lport, true);
            let peer = if g.t.peers.is_empty() {
                [10, 50, 0, 12]
            } else {
                *g.r.pick(&g.t.peers)
            };
            let pool = *g.r.pick(&g.t.pool_ids());
            if g.r.chance(90) {
                let tunnel = if g.r.chance(85) {
                    g.tag("forwarded entry of this peer");
                    peer
                } else {
                    g.tag("forwarded entry, any tunnel");
                    g.tunnel()
                };
                let (a, b) = tp.reply_ports();
                g.flows.push((
                    fkey(local, remote, b, a, tp.proto(false)),
                    fval(FLOW_FORWARDED, local, b, pool, tunnel, 0),
                ));
            }
            let key = g.gre_key(KIND_REPLY, pool);
            (remote, local, tp, true, 0, Some((peer.into(), key)))
        }
    };
    // Packets from the uplink may be hops: their TTL matters.
    let ttl = if ingress && !v6 {
        Some(g.hop_ttl())
    } else {
        None
    };
    let frags = fragment_datagram(g, src, dst, &tp, id, ttl);
    let wrap = |g: &mut G, ip: &[u8], other_peer: bool, other_kind: bool| -> Vec<u8> {
        let (peer, mut key) = gre.expect("a tunnel");
        if other_kind {
            let kind = (key >> 30) + g.r.range(1, 3) as u32;
            g.tag("a later fragment with another kind");
            key = (kind % 4) << 30 | key & ((1 << 30) - 1);
        }
        let peer = if other_peer {
            g.tag("a later fragment from another peer");
            g.t.peers
                .iter()
                .copied()
                .find(|p| Ipv4Addr::from(*p) != peer)
                .map_or(Ipv4Addr::new(10, 50, 0, 99), Ipv4Addr::from)
        } else {
            peer
        };
        gre_packet(peer, FABRIC.into(), &V4::default(), 0x2000, 0x0800, key, ip)
    };
    // The order they arrive in.
    let mut order: Vec<usize> = (0..frags.len()).collect();
    if scenario == 6 {
        order.remove(0);
    } else if order.len() > 1 {
        match g.r.below(10) {
            0..=1 => {
                g.tag("a later fragment overtakes the first");
                order.swap(0, 1);
            }
            2 => {
                g.tag("first fragment lost");
                order.remove(0);
            }
            3 => {
                g.tag("a later fragment twice");
                order.push(*order.last().unwrap());
            }
            _ => g.tag("in order"),
        }
    }
    let mut steps = Vec::new();
    for i in order {
        let name = if i == 0 {
            "first fragment".to_string()
        } else {
            format!("later fragment {i}")
        };
        let ip = &frags[i];
        if gre.is_some() && (scenario != 4 || i == 0 || g.r.chance(70)) {
            let other = i != 0 && matches!(scenario, 2 | 7) && g.r.chance(10);
            let other_kind = i != 0 && matches!(scenario, 2 | 4 | 7) && g.r.chance(10);
            let p = wrap(g, ip, other, other_kind);
            steps.push(step(&format!("{name} in GRE"), true, 0, &p));
            if scenario == 2 && g.r.chance(60) {
                steps.push(Step {
                    class: format!("{name} translated, on egress"),
                    ingress: false,
                    mark: 0,
                    packet: vec![],
                    prev_output: true,
                });
            }
            if scenario == 2 && i != 0 && g.r.chance(60) {
                // The same later fragment sent by this host: a peer's *source* entry is not
                // followed on egress.
                steps.push(step(
                    &format!("{name} untranslated, on egress"),
                    false,
                    egress_mark,
                    ip,
                ));
            }
        } else {
            steps.push(step(&name, ingress, mark, ip));
        }
    }
    steps
}

/// *Fragments* rules 1–3, entries kept apart by the way their later fragments go: this host's
/// own IPv4 datagram leaving through the uplink (forwarded or SNAT'd: an established entry, or
/// a new connection by the plan), and under its very (source, destination, id, protocol)
/// either
/// - later fragments arriving on the uplink (plain, or now and then in a tunnel): its leaving
///   entry neither answers them (plain ingress: `ingress_no_flow`; a tunnel: `drop_fragment`)
///   nor is it replaced; this host's own later fragments still follow it; or
/// - a peer's datagram in a tunnel (kind *connection*, other ports: a new connection of a pool
///   this server translates), its first fragment before or after this host's: translated
///   here, its *source* entry arriving, while this host's later fragments follow their own
///   leaving entry, and the peer's its own.
fn fragment_ways(g: &mut G, idx: usize) -> Vec<Step> {
    g.tag("fragments: leaving and arriving under one key");
    let id = u32::from((idx as u16).wrapping_mul(40503) ^ 0x5a5a);
    // A destination a peer's connection may be translated to here: a policy of a pool whose
    // IPv4 action is snat (its peer policy covers it too).
    let snat = g.t.pools_with(ActionKind::Snat, FAMILY_V4);
    let pool = if snat.is_empty() {
        *g.r.pick(&g.t.pool_ids())
    } else {
        g.r.pick(&snat).0
    };
    let (dst, mark) = g.dst_of_pool(pool, false).unwrap_or_else(|| g.dst(false));
    let src = g.local(false);
    let (sp, dp) = (g.port(), g.port());
    let tp = big_tp(g, false, sp, dp, false);
    let (a, b) = tp.conn_ports();
    let proto = tp.proto(false);
    let peer_of = |g: &mut G| -> [u8; 4] {
        if g.t.peers.is_empty() {
            [10, 50, 0, 12]
        } else {
            *g.r.pick(&g.t.peers)
        }
    };
    match g.r.below(10) {
        0..=4 => {
            g.tag("forwarded entry");
            let tunnel = peer_of(g);
            let pool = *g.r.pick(&g.t.pool_ids());
            g.flows.push((
                fkey(src, dst, a, b, proto),
                fval(FLOW_FORWARDED, src, a, pool, tunnel, 0),
            ));
        }
        5..=8 => {
            if let Some((addr, port, pool)) = g.own_binding(false) {
                g.tag("outbound entry");
                g.push_local((src, dst, a, b, proto), (addr, port, pool));
            } else {
                g.tag("new connection");
            }
        }
        _ => g.tag("new connection"),
    }
    let own = fragment_datagram(g, src, dst, &tp, id, None);
    let own_later = |g: &mut G, steps: &mut Vec<Step>| {
        for (i, ip) in own.iter().enumerate().skip(1) {
            steps.push(step(
                &format!("own later fragment {i}, on egress"),
                false,
                mark,
                ip,
            ));
            if g.r.chance(20) {
                g.tag("own later fragment twice");
                steps.push(step(
                    &format!("own later fragment {i} again, on egress"),
                    false,
                    mark,
                    ip,
                ));
            }
        }
    };
    let mut steps = vec![step("own first fragment, on egress", false, mark, &own[0])];
    if own.len() == 1 {
        // An atomic fragment has no later ones (IPv6 only: not here).
        return steps;
    }
    if g.r.chance(45) {
        g.tag("its later fragments arriving");
        for (i, ip) in own.iter().enumerate().skip(1) {
            if g.r.chance(75) {
                steps.push(step(
                    &format!("later fragment {i} arriving, plain"),
                    true,
                    0,
                    ip,
                ));
            } else {
                let peer = peer_of(g);
                let kind = *g.r.pick(&[
                    KIND_CONNECTION,
                    KIND_CONNECTION,
                    KIND_SOFT_UNICAST,
                    KIND_REPLY,
                ]);
                let key = kind << 30 | pool;
                g.tag(format!(
                    "later fragment arriving in a {} tunnel",
                    kind_name(kind)
                ));
                let p = gre_from(peer, key, ip);
                steps.push(step(
                    &format!("later fragment {i} arriving in GRE"),
                    true,
                    0,
                    &p,
                ));
            }
        }
        if g.r.chance(70) {
            own_later(g, &mut steps);
        }
        return steps;
    }
    // A peer's datagram with this very (source, destination, id, protocol), other ports.
    g.tag("a peer's datagram under its key");
    let other = |p: u16| p ^ ((1 + (p & 0xff)) | 0x100);
    let theirs_tp = tp.with_conn_sport(other(tp.conn_ports().0));
    let theirs = fragment_datagram(g, src, dst, &theirs_tp, id, Some(64));
    let peer = peer_of(g);
    let key = KIND_CONNECTION << 30 | pool;
    let wrap = |ip: &[u8]| gre_from(peer, key, ip);
    let their_first = step("a peer's first fragment in GRE", true, 0, &wrap(&theirs[0]));
    if g.r.chance(30) {
        g.tag("the peer's first fragment first");
        steps.insert(0, their_first);
    } else {
        steps.push(their_first);
    }
    let their_later = |g: &mut G, steps: &mut Vec<Step>, i: usize| {
        if let Some(ip) = theirs.get(i)
            && g.r.chance(60)
        {
            steps.push(step(
                &format!("a peer's later fragment {i} in GRE"),
                true,
                0,
                &wrap(ip),
            ));
        }
    };
    their_later(g, &mut steps, 1);
    own_later(g, &mut steps);
    for i in 2..theirs.len() {
        their_later(g, &mut steps, i);
    }
    steps
}

fn malformed(g: &mut G) -> Gen {
    let ingress = g.r.chance(40);
    g.tag(if ingress {
        "ingress malformed"
    } else {
        "egress malformed"
    });
    let v6 = g.r.chance(25);
    let src = g.local(v6);
    let (dst, mark) = g.dst(v6);
    let (sp, dp) = (g.port(), g.port());
    let tp = g.conn_tp(v6, sp, dp);
    let h = V4::default();
    let mut ip = ip_tp(src, dst, &h, &tp);
    let p = match g.r.below(9) {
        0 => {
            g.tag("not IP (ARP)");
            frame(0x0806, &g.r.bytes(28))
        }
        1 => {
            g.tag("bad version");
            ip[0] = (ip[0] & 0x0f) | 0x50;
            ip_frame_as(v6, &ip)
        }
        2 if !v6 => {
            g.tag("IHL < 5");
            ip[0] = 0x44;
            ip_frame(&ip)
        }
        3 => {
            g.tag("cut inside the IP header");
            let n = g.r.range(1, if v6 { 39 } else { 19 }) as usize;
            ip_frame_as(v6, &ip[..n])
        }
        4 => {
            g.tag("IP length beyond the frame");
            let cut = ip
                .len()
                .saturating_sub(g.r.range(1, 8) as usize)
                .max(if v6 { 40 } else { 20 });
            ip_frame_as(v6, &ip[..cut])
        }
        5..=7 => {
            g.tag("transport cut short (consistent lengths)");
            let hl = if v6 { 40 } else { 20 };
            let keep = g.r.range(0, 7) as usize;
            let mut cut = ip[..(hl + keep).min(ip.len())].to_vec();
            fix_len(&mut cut, v6);
            ip_frame_as(v6, &cut)
        }
        _ => {
            g.tag("TCP data offset bad");
            let tp = g.tcp(sp, dp, Some(TCP_SYN));
            let mut ip = ip_tp(src, dst, &h, &tp);
            let hl = if v6 { 40 } else { 20 };
            ip[hl + 12] = if g.r.chance(50) { 0x40 } else { 0xf0 };
            ip_frame_as(v6, &ip)
        }
    };
    (ingress, mark, p)
}

fn ip_frame_as(v6: bool, ip: &[u8]) -> Vec<u8> {
    frame(if v6 { 0x86dd } else { 0x0800 }, ip)
}

/// Sets the IP length field to the bytes present (and the IPv4 header checksum).
fn fix_len(ip: &mut [u8], v6: bool) {
    if v6 {
        let n = (ip.len() - 40) as u16;
        ip[4..6].copy_from_slice(&n.to_be_bytes());
    } else {
        let n = ip.len() as u16;
        ip[2..4].copy_from_slice(&n.to_be_bytes());
        ip[10..12].copy_from_slice(&[0, 0]);
        let c = fold(sum(&ip[..20], 0));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
}

fn egress_big(g: &mut G) -> Gen {
    g.tag("egress near the MTU");
    let fwd = g.t.pools_with(ActionKind::Forward, FAMILY_V4);
    let (dst, mark) = match fwd.is_empty() {
        false => {
            let (pool, _) = *g.r.pick(&fwd);
            g.dst_of_pool(pool, false).unwrap_or_else(|| g.dst(false))
        }
        true => g.dst(false),
    };
    let src = g.local(false);
    let total = g.r.range(1440, 1500) as usize;
    let (sp, dp) = (g.port(), g.port());
    let tp = if g.r.chance(50) {
        g.tag("udp");
        Tp::Udp {
            sport: sp,
            dport: dp,
            payload: g.r.bytes(total - 28),
            zero_csum: false,
        }
    } else {
        g.tag("tcp");
        Tp::Tcp {
            sport: sp,
            dport: dp,
            flags: TCP_ACK | TCP_PSH,
            opts: vec![],
            payload: g.r.bytes(total - 40),
        }
    };
    if g.r.chance(30) {
        let tunnel = g.tunnel();
        let pool = *g.r.pick(&g.t.pool_ids());
        let (a, b) = tp.conn_ports();
        g.tag("forwarded entry");
        g.flows.push((
            fkey(src, dst, a, b, tp.proto(false)),
            fval(FLOW_FORWARDED, src, a, pool, tunnel, 0),
        ));
    }
    (false, mark, ip_frame(&ip_tp(src, dst, &V4::default(), &tp)))
}

fn egress_exhaustion(g: &mut G) -> Gen {
    g.tag("egress port exhaustion");
    let v6 = false;
    let snat = g.t.pools_with(ActionKind::Snat, FAMILY_V4);
    if snat.is_empty() {
        return egress_new(g, v6);
    }
    let (pool, _) = *g.r.pick(&snat);
    let Some((dst, mark)) = g.dst_of_pool(pool, v6) else {
        return egress_new(g, v6);
    };
    let src = g.local(v6);
    let (sp, dp) = (g.port(), g.port());
    let tp = if g.r.chance(70) {
        g.tcp(sp, dp, Some(TCP_SYN))
    } else {
        g.udp(sp, dp)
    };
    let all = g.r.chance(60);
    fill_claims(g, dst, &tp, v6, all);
    (false, mark, ip_frame(&ip_tp(src, dst, &V4::default(), &tp)))
}

fn ingress_reply(g: &mut G) -> Gen {
    g.tag("ingress reply");
    let v6 = g.r.chance(25);
    let (to, port) = g.reply_target(v6);
    let from = if g.r.chance(70) {
        g.dst(v6).0
    } else {
        g.remote(v6)
    };
    let rport = g.port();
    let tp = match g.r.below(10) {
        0..=4 => {
            let f = *g.r.pick(&[
                TCP_SYN | TCP_ACK,
                TCP_ACK,
                TCP_PSH | TCP_ACK,
                TCP_FIN | TCP_ACK,
                TCP_RST,
            ]);
            g.tcp(rport, port, Some(f))
        }
        5 | 6 => g.udp(rport, port),
        7 => {
            g.tag("udp near the MTU");
            let n = g.r.range(1400, 1472) as usize;
            Tp::Udp {
                sport: rport,
                dport: port,
                payload: g.r.bytes(n),
                zero_csum: false,
            }
        }
        8 => {
            g.tag("echo reply");
            let b = g.payload();
            Tp::echo(v6, false, port, 1, b)
        }
        _ => {
            g.tag("echo request");
            let b = g.payload();
            Tp::echo(v6, true, port, 1, b)
        }
    };
    let (a, b) = tp.reply_ports();
    if g.r.chance(60) {
        let tunnel = if !v6 && g.r.chance(40) {
            g.tag("reverse entry with tunnel");
            g.tunnel()
        } else {
            g.tag("reverse entry");
            [0; 4]
        };
        let orig = g.local(v6);
        let pool = *g.r.pick(&g.t.pool_ids());
        let flags = g.closing();
        g.flows.push((
            fkey(from, to, a, b, tp.proto(v6)),
            fval(FLOW_REVERSE, orig, g.r.u16(), pool, tunnel, flags),
        ));
    }
    // Re-encapsulated or soft-unicast, it is a hop.
    let h = g.hop_hdr();
    (true, g.r.next() as u32, ip_frame(&ip_tp(from, to, &h, &tp)))
}

/// A packet from the internet to a port of a pool address another server owns, which nothing
/// here explains: soft-unicast to the owner, or dropped when the owner's `PEERS` flags say its
/// probes go unanswered.
fn ingress_soft_unicast(g: &mut G) -> Gen {
    g.tag("ingress to another's port");
    let Some((to, port, _)) = g.others_port() else {
        return ingress_reply(g);
    };
    let owner =
        g.t.owners
            .iter()
            .find(|(a, _)| *a == to)
            .and_then(|(_, o)| {
                o.ranges[..o.count as usize]
                    .iter()
                    .find(|r| (r.port_min..=r.port_max).contains(&port))
                    .map(|r| r.fabric)
            });
    let flags = owner
        .and_then(|f| g.t.contents.peers.get(&AddrKey::new(f, 0)))
        .map_or(0, |p| p.flags);
    g.tag(if flags & 1 != 0 {
        "owner's probes unanswered"
    } else if flags != 0 {
        "owner down, probes answered"
    } else {
        "owner up"
    });
    let from = if g.r.chance(70) {
        g.dst(false).0
    } else {
        g.remote(false)
    };
    let rport = g.port();
    let tp = match g.r.below(10) {
        0..=4 => {
            let f =
                *g.r.pick(&[TCP_SYN | TCP_ACK, TCP_ACK, TCP_PSH | TCP_ACK, TCP_RST]);
            g.tcp(rport, port, Some(f))
        }
        5..=7 => g.udp(rport, port),
        _ => {
            g.tag("echo reply");
            let b = g.payload();
            Tp::echo(false, false, port, 4, b)
        }
    };
    (
        true,
        g.r.next() as u32,
        ip_frame(&ip_tp(from, v4(to), &g.hop_hdr(), &tp)),
    )
}

/// A packet in a tunnel to a pool address (a reply or soft-unicast packet nothing here
/// explains: no reverse entry): a peer's packet to a pool address never becomes a connection.
fn gre_stray(g: &mut G) -> Gen {
    g.tag("GRE stray to a pool address");
    if g.t.owners.is_empty() {
        return gre_peer(g);
    }
    let (to, port) = g.reply_target(false);
    let from = if g.r.chance(70) {
        g.dst(false).0
    } else {
        v4(*g.r.pick(&[[10u8, 9, 8, 7], [172, 16, 0, 1]]))
    };
    let rport = g.port();
    let tp = match g.r.below(10) {
        0..=5 => {
            let f = *g.r.pick(&[
                TCP_SYN,
                TCP_SYN | TCP_ACK,
                TCP_ACK,
                TCP_FIN | TCP_ACK,
                TCP_RST,
            ]);
            g.tcp(rport, port, Some(f))
        }
        6..=8 => g.udp(rport, port),
        _ => {
            g.tag("echo request");
            let b = g.payload();
            Tp::echo(false, true, port, 2, b)
        }
    };
    let to4: [u8; 4] = match to {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => unreachable!("IPv4 reply target"),
    };
    let pool = match g.t.owners.iter().find(|(a, _)| *a == to4) {
        Some((_, o)) if g.r.chance(70) => o.pool,
        _ => *g.r.pick(&g.t.pool_ids()),
    };
    // Brought by soft-unicast (no reverse entry explains it), or a peer's "connection" to a
    // pool address.
    let fits = if g.r.chance(50) {
        KIND_SOFT_UNICAST
    } else {
        KIND_CONNECTION
    };
    let key = g.gre_key(fits, pool);
    let inner = ip_tp(from, to, &g.hop_hdr(), &tp);
    gre_ingress(g, key, &inner)
}

/// A second peer sending on a first peer's connection tuple: dropped, the first peer's
/// outbound entry left untouched; the first peer's next packet still translated. `local`:
/// this host's own packets on the tuple instead (a peer may send any inner source, this
/// host's own included): dropped (`drop_peer_tuple`, egress rule 3), the entry untouched
/// (a FIN or RST does not flag it, a SYN does not reopen it), the peer's next packet still
/// translated.
fn second_peer(g: &mut G, local: bool) -> Vec<Step> {
    if local {
        g.tag("this host on a peer's tuple");
    } else {
        g.tag("second peer on a peer's tuple");
    }
    let snat = g.t.pools_with(ActionKind::Snat, FAMILY_V4);
    let peers: Vec<[u8; 4]> = g.t.peers.clone();
    if snat.is_empty() || peers.len() < 2 {
        g.tag("(no snat pool or one peer)");
        let (ingress, mark, packet) = gre_peer(g);
        return vec![Step {
            class: g.class.join(" / "),
            ingress,
            mark,
            packet,
            prev_output: false,
        }];
    }
    let (pool, _) = *g.r.pick(&snat);
    let (dst, mark) = match g.dst_of_pool(pool, false) {
        Some((d, m)) => (d, m),
        None => g.dst(false),
    };
    // This host's own address as the peer's inner source, or another.
    let src = if local && g.r.chance(70) {
        g.local(false)
    } else {
        v4(*g.r.pick(&[[10u8, 9, 8, 7], [172, 16, 0, 1]]))
    };
    let first = *g.r.pick(&peers);
    let second = *g.r.pick(
        &peers
            .iter()
            .copied()
            .filter(|p| *p != first)
            .collect::<Vec<_>>(),
    );
    let (sp, dp) = (g.port(), g.port());
    let udp = g.r.chance(20);
    let mk = |g: &mut G, flags: u8| -> Tp {
        if udp {
            g.udp(sp, dp)
        } else {
            g.tcp(sp, dp, Some(flags))
        }
    };
    let wrap = |peer: [u8; 4], tp: &Tp| -> Vec<u8> {
        let inner = ip_tp(src, dst, &V4::default(), tp);
        ip_frame(&gre_from(peer, KIND_CONNECTION << 30 | pool, &inner))
    };
    let mut steps = Vec::new();
    if g.r.chance(50) {
        g.tag("entry made by the first peer's SYN");
        let tp = mk(g, TCP_SYN);
        steps.push(step_frame("first peer opens in GRE", &wrap(first, &tp)));
    } else if let Some((addr, port, bpool)) = g.own_binding(false) {
        let flags = g.closing();
        g.tag("first peer's entry in the table");
        let proto = if udp { 17 } else { 6 };
        g.flows.push((
            fkey(src, dst, sp, dp, proto),
            fval(FLOW_OUTBOUND, addr, port, bpool, first, flags),
        ));
        g.flows.push((
            fkey(dst, addr, dp, sp, proto),
            fval(FLOW_REVERSE, src, sp, bpool, first, flags),
        ));
    }
    let f = *g.r.pick(&[
        TCP_SYN,
        TCP_FIN | TCP_ACK,
        TCP_RST,
        TCP_RST | TCP_ACK,
        TCP_ACK,
    ]);
    if local {
        // One or two of this host's packets on the tuple (a SYN after its FIN or RST would
        // reopen a tuple of its own).
        let n = if g.r.chance(40) { 2 } else { 1 };
        for i in 0..n {
            let f = if i == 1 {
                TCP_SYN
            } else {
                *g.r.pick(&[
                    TCP_SYN,
                    TCP_SYN,
                    TCP_ACK,
                    TCP_PSH | TCP_ACK,
                    TCP_FIN | TCP_ACK,
                    TCP_RST,
                    TCP_RST | TCP_ACK,
                ])
            };
            let tp = mk(g, f);
            let h = g.v4hdr();
            steps.push(Step {
                class: "this host on the tuple, on egress".into(),
                ingress: false,
                mark: g.mark_near(mark),
                packet: ip_frame(&ip_tp(src, dst, &h, &tp)),
                prev_output: false,
            });
        }
    } else {
        let tp = mk(g, f);
        steps.push(step_frame(
            "second peer on the tuple in GRE",
            &wrap(second, &tp),
        ));
    }
    let tp = mk(g, TCP_ACK);
    steps.push(step_frame("first peer again in GRE", &wrap(first, &tp)));
    steps
}

fn step_frame(class: &str, frame: &[u8]) -> Step {
    Step {
        class: class.to_string(),
        ingress: true,
        mark: 0,
        packet: frame.to_vec(),
        prev_output: false,
    }
}

/// The packet an ICMP error quotes: one this server sent, from `from:port` to `to`.
fn quoted(g: &mut G, from: IpAddr, port: u16, to: IpAddr) -> (Vec<u8>, FlowKey) {
    let v6 = from.is_ipv6();
    let rport = g.port();
    let tp = match g.r.below(7) {
        0..=2 => {
            let f = *g.r.pick(&[TCP_SYN, TCP_ACK, TCP_PSH | TCP_ACK]);
            g.tcp(port, rport, Some(f))
        }
        3..=4 => g.udp(port, rport),
        5 => {
            g.tag("quotes echo request");
            let b = g.payload();
            Tp::echo(v6, true, port, 9, b)
        }
        _ => {
            g.tag("quotes echo reply");
            let b = g.payload();
            Tp::echo(v6, false, port, 9, b)
        }
    };
    let (a, b) = tp.conn_ports();
    let k = fkey(from, to, a, b, tp.proto(v6));
    let mut h = V4::default();
    if g.r.chance(10) {
        g.tag("quote with IP options");
        h.options = vec![1, 1, 1, 0];
    }
    if !v6 && g.r.chance(8) {
        h.frag = *g.r.pick(&[0x2000u16, 0x2000 | 20, 20]);
        g.tag(if h.frag == 0x2000 {
            "quotes a first fragment"
        } else {
            "quotes a later fragment"
        });
    }
    (ip_tp(from, to, &h, &tp), k)
}

/// An ICMP error about `q` (IP bytes), sent by `router` to `to`.
///
/// The second value: bytes to put after the error's IP packet in the frame (padding past its
/// IP length: never read as quote, never rewritten), mostly none; now and then the rest of the
/// quote the error's IP length leaves out (what a quote bounded by the frame would read), or
/// other bytes.
fn icmp_error(g: &mut G, router: IpAddr, to: IpAddr, q: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let v6 = router.is_ipv6();
    let hl = if v6 {
        40
    } else {
        (usize::from(q[0] & 0xf)) * 4
    };
    let mut padded = false;
    let n = match g.r.below(9) {
        0 => {
            g.tag("quote: header + 8");
            hl + 8
        }
        1 => {
            g.tag("quote: header + 4");
            hl + 4
        }
        2..=4 => {
            // Fewer than 8 transport bytes (no quote), 8 and a TCP checksum left out (at 16),
            // half of it in, all of it.
            let k =
                *g.r.pick(&[0usize, 4, 7, 8, 8, 12, 16, 16, 17, 18, 20, 1000]);
            padded = true;
            g.tag(format!("padded: quote header + {k} within the IP length"));
            hl + k
        }
        _ => {
            g.tag("quote: whole");
            q.len()
        }
    }
    .min(q.len());
    let mut padding = Vec::new();
    if padded {
        padding.extend_from_slice(&q[n..]);
        if padding.is_empty() || g.r.chance(25) {
            let extra = g.r.range(1, 12) as usize;
            let zero = g.r.chance(50);
            padding.extend((0..extra).map(|_| if zero { 0 } else { g.r.next() as u8 }));
        }
    }
    let (typ, code, rest) = if v6 {
        match g.r.below(5) {
            0 => (1, g.r.below(5) as u8, [0; 4]),
            1 => (2, 0, 1280u32.to_be_bytes()),
            2 => (3, 0, [0; 4]),
            3 => (4, 0, [0, 0, 0, 8]),
            _ => (1, 4, [0; 4]),
        }
    } else {
        match g.r.below(6) {
            0 => (3, 4, [0, 0, 0x05, 0x78]),
            1 => (3, 3, [0; 4]),
            2 => (3, 1, [0; 4]),
            3 => (11, 0, [0; 4]),
            4 => (12, 0, [20, 0, 0, 0]),
            _ => (3, 13, [0; 4]),
        }
    };
    g.tag(format!("type {typ} code {code}"));
    let tp = Tp::Icmp {
        typ,
        code,
        rest,
        body: q[..n].to_vec(),
    };
    // Translated back to a tunnel, or soft-unicast, an error is a hop.
    let h = V4 {
        frag: 0,
        tos: 0xc0,
        ttl: if v6 { 64 } else { g.hop_ttl() },
        ..V4::default()
    };
    (ip_tp(router, to, &h, &tp), padding)
}

fn ingress_icmp_error(g: &mut G) -> Gen {
    g.tag("ingress ICMP error");
    let v6 = g.r.chance(25);
    let (from, port) = g.reply_target(v6);
    let (remote, _) = g.dst(v6);
    let (q, qk) = quoted(g, from, port, remote);
    if g.r.chance(60) {
        let tunnel = if !v6 && g.r.chance(40) {
            g.tag("reverse entry with tunnel");
            g.tunnel()
        } else {
            g.tag("reverse entry");
            [0; 4]
        };
        let orig = g.local(v6);
        let pool = *g.r.pick(&g.t.pool_ids());
        let rk = FlowKey {
            src: qk.dst,
            dst: qk.src,
            src_port_be: qk.dst_port_be,
            dst_port_be: qk.src_port_be,
            ..qk
        };
        g.flows
            .push((rk, fval(FLOW_REVERSE, orig, g.r.u16(), pool, tunnel, 0)));
    }
    let router = if g.r.chance(50) {
        remote
    } else if v6 {
        "2001:db8:beef::fe".parse().unwrap()
    } else {
        v4([198, 51, 100, 254])
    };
    let to = if g.r.chance(85) {
        from
    } else {
        g.tag("addressed elsewhere");
        g.local(v6)
    };
    let (p, padding) = icmp_error(g, router, to, &q);
    let mut frame = ip_frame(&p);
    frame.extend_from_slice(&padding);
    (true, g.r.next() as u32, frame)
}

fn gre_outer(g: &mut G) -> (Ipv4Addr, V4) {
    let src = if g.r.chance(90) && !g.t.peers.is_empty() {
        *g.r.pick(&g.t.peers)
    } else {
        g.tag("unknown peer");
        [10, 50, 0, 99]
    };
    let mut h = V4::default();
    if g.r.chance(30) {
        h.tos = g.r.next() as u8;
        h.id = g.r.u16();
        h.ttl = g.r.range(2, 255) as u8;
        h.frag = if g.r.chance(50) { 0 } else { 0x4000 };
    }
    (src.into(), h)
}

fn gre_ingress(g: &mut G, key: u32, inner: &[u8]) -> Gen {
    let (src, h) = gre_outer(g);
    let p = gre_packet(src, FABRIC.into(), &h, 0x2000, 0x0800, key, inner);
    (true, g.r.next() as u32, ip_frame(&p))
}

fn gre_peer(g: &mut G) -> Gen {
    if g.r.chance(MSS_PADDING_PERCENT * 4) {
        return gre_peer_mss_padding(g);
    }
    g.tag("GRE peer connection");
    let inner_src = v4(*g
        .r
        .pick(&[[10u8, 9, 8, 7], [10, 50, 0, 12], [172, 16, 0, 1]]));
    let pools = g.t.pool_ids();
    let pool = *g.r.pick(&pools);
    let never = if g.r.chance(25) {
        g.never_covered_dst(false)
    } else {
        None
    };
    let (dst, key) = match g.r.below(10) {
        // A catch-all's pool and a destination no policy covers (Tunnel rule 5 asks a policy).
        _ if never.is_some() => {
            let (d, _, p) = never.expect("picked");
            (d, p)
        }
        0..=6 => match g.dst_of_pool(pool, false) {
            Some((d, _)) => (d, pool),
            None => (g.dst(false).0, pool),
        },
        7 | 8 => {
            g.tag("destination of another pool");
            (g.dst(false).0, pool)
        }
        _ => {
            g.tag("unknown pool");
            (g.dst(false).0, 0xdead)
        }
    };
    let key = g.gre_key(KIND_CONNECTION, key);
    let (sp, dp) = (g.port(), g.port());
    let tp = g.conn_tp(false, sp, dp);
    let (peer, h) = gre_outer(g);
    if g.r.chance(30) {
        let (a, b) = tp.conn_ports();
        if let Some((addr, port, pool)) = g.own_binding(false) {
            let tunnel = if g.r.chance(75) {
                g.tag("outbound entry of this peer");
                peer.octets()
            } else {
                g.tag("outbound entry of another peer");
                g.tunnel()
            };
            let k = fkey(inner_src, dst, a, b, tp.proto(false));
            g.flows
                .push((k, fval(FLOW_OUTBOUND, addr, port, pool, tunnel, 0)));
            g.flows.push((
                fkey(dst, addr, b, port, tp.proto(false)),
                fval(FLOW_REVERSE, inner_src, a, pool, tunnel, 0),
            ));
        }
    } else if g.r.chance(15) {
        let all = g.r.chance(50);
        fill_claims(g, dst, &tp, false, all);
    }
    // Sent on to its destination, it is a hop (the inner TTL).
    let ih = V4 {
        ttl: g.hop_ttl(),
        ..V4::default()
    };
    let inner = ip_tp(inner_src, dst, &ih, &tp);
    let p = gre_packet(peer, FABRIC.into(), &h, 0x2000, 0x0800, key, &inner);
    (true, g.r.next() as u32, ip_frame(&p))
}

fn gre_reply(g: &mut G) -> Gen {
    g.tag("GRE reply (soft-unicast brought)");
    let (to, port) = g.reply_target(false);
    let (from, _) = g.dst(false);
    let rport = g.port();
    if g.r.chance(ECHO_REQUEST_PERCENT) {
        // Kind *soft-unicast* brings replies only (Tunnel rule 2): an echo request is dropped
        // whatever entry an echo reply of its identifier would have.
        g.tag("echo request");
        let ident = *g.r.pick(&[port, 0]);
        if g.r.chance(80) {
            g.tag("reverse entry of its identifier's reply");
            let pool = *g.r.pick(&g.t.pool_ids());
            let orig = g.local(false);
            g.flows.push((
                fkey(from, to, 0, ident, 1),
                fval(FLOW_REVERSE, orig, g.r.u16(), pool, [0; 4], 0),
            ));
        }
        let b = g.payload();
        let inner = ip_tp(from, to, &g.hop_hdr(), &Tp::echo(false, true, ident, 4, b));
        let pool = *g.r.pick(&g.t.pool_ids());
        let key = KIND_SOFT_UNICAST << 30 | pool;
        return gre_ingress(g, key, &inner);
    }
    let tp = match g.r.below(6) {
        0..=2 => {
            let f = *g.r.pick(&[TCP_SYN | TCP_ACK, TCP_ACK, TCP_FIN | TCP_ACK]);
            g.tcp(rport, port, Some(f))
        }
        3 | 4 => g.udp(rport, port),
        _ => {
            g.tag("echo reply");
            let b = g.payload();
            Tp::echo(false, false, port, 3, b)
        }
    };
    let pool = *g.r.pick(&g.t.pool_ids());
    if g.r.chance(80) {
        let (a, b) = tp.reply_ports();
        let tunnel = if g.r.chance(50) {
            g.tag("reverse entry with tunnel");
            g.tunnel()
        } else {
            g.tag("reverse entry");
            [0; 4]
        };
        let orig = g.local(false);
        g.flows.push((
            fkey(from, to, a, b, tp.proto(false)),
            fval(FLOW_REVERSE, orig, g.r.u16(), pool, tunnel, 0),
        ));
    }
    let inner = ip_tp(from, to, &g.hop_hdr(), &tp);
    let pool = if g.r.chance(80) { pool } else { 0xdead };
    let key = g.gre_key(KIND_SOFT_UNICAST, pool);
    gre_ingress(g, key, &inner)
}

fn gre_forwarded_reply(g: &mut G) -> Gen {
    if g.r.chance(MSS_PADDING_PERCENT * 4) {
        return gre_forwarded_reply_mss_padding(g);
    }
    if g.r.chance(REPLY_ECHO_REQUEST_PERCENT) {
        return gre_reply_echo_request(g);
    }
    g.tag("GRE forwarded reply");
    let local = g.local(false);
    let (remote, _) = g.dst(false);
    let lport = g.port();
    let rport = g.port();
    let tp = match g.r.below(6) {
        0..=2 => {
            let f =
                *g.r.pick(&[TCP_SYN | TCP_ACK, TCP_SYN | TCP_ACK, TCP_ACK, TCP_SYN]);
            g.tcp(rport, lport, Some(f))
        }
        3 | 4 => g.udp(rport, lport),
        _ => {
            g.tag("echo reply");
            let b = g.payload();
            Tp::echo(false, false, lport, 3, b)
        }
    };
    let pool = *g.r.pick(&g.t.pool_ids());
    if g.r.chance(85) {
        g.tag("forwarded entry");
        let (a, b) = tp.reply_ports();
        let tunnel = g.tunnel();
        g.flows.push((
            fkey(local, remote, b, a, tp.proto(false)),
            fval(FLOW_FORWARDED, local, b, pool, tunnel, 0),
        ));
    }
    // Delivered here, not a hop: its TTL plays no part.
    let h = V4 {
        ttl: g.hop_ttl(),
        ..V4::default()
    };
    let inner = ip_tp(remote, local, &h, &tp);
    let key = g.gre_key(KIND_REPLY, pool);
    gre_ingress(g, key, &inner)
}

/// The share of soft-unicast and of reply tunnel packets (percent) that carry an echo request.
const ECHO_REQUEST_PERCENT: u64 = 20;
const REPLY_ECHO_REQUEST_PERCENT: u64 = 30;

/// An echo request in a tunnel of kind *reply* from the peer of a connection forwarded from
/// here (Tunnel rule 2: that kind brings replies only, `drop_tunnel_kind`): mostly with
/// identifier 0 beside a forwarded echo with identifier 0, whose key (its remote port 0) is the
/// request's tuple swapped.
fn gre_reply_echo_request(g: &mut G) -> Gen {
    g.tag("GRE echo request in a reply tunnel");
    let local = g.local(false);
    let (remote, _) = g.dst(false);
    let ident = if g.r.chance(80) {
        g.tag("identifier 0");
        0
    } else {
        g.port()
    };
    let pool = *g.r.pick(&g.t.pool_ids());
    let peer = if g.t.peers.is_empty() {
        [10, 50, 0, 12]
    } else {
        *g.r.pick(&g.t.peers)
    };
    if g.r.chance(90) {
        // A forwarded echo with identifier 0: (local, remote, 0, 0).
        g.tag("forwarded echo, identifier 0");
        let tunnel = if g.r.chance(85) { peer } else { g.tunnel() };
        let flags = g.forwarded_flags();
        g.flows.push((
            fkey(local, remote, 0, 0, 1),
            fval(FLOW_FORWARDED, local, 0, pool, tunnel, flags),
        ));
    }
    let b = g.payload();
    let h = V4 {
        ttl: g.hop_ttl(),
        ..V4::default()
    };
    let inner = ip_tp(remote, local, &h, &Tp::echo(false, true, ident, 9, b));
    let key = KIND_REPLY << 30 | pool;
    let p = gre_from(peer, key, &inner);
    (true, g.r.next() as u32, ip_frame(&p))
}

fn gre_icmp_error(g: &mut G) -> Gen {
    g.tag("GRE ICMP error");
    let (remote, _) = g.dst(false);
    let pool = *g.r.pick(&g.t.pool_ids());
    // (quote, its tuple, the error's destination, the kind that brings it)
    let (q, qk, to, fits) = if g.r.chance(60) {
        let (from, port) = g.reply_target(false);
        let (q, qk) = quoted(g, from, port, remote);
        if g.r.chance(80) {
            let tunnel = if g.r.chance(50) {
                g.tag("reverse entry with tunnel");
                g.tunnel()
            } else {
                g.tag("reverse entry");
                [0; 4]
            };
            let orig = g.local(false);
            let rk = FlowKey {
                src: qk.dst,
                dst: qk.src,
                src_port_be: qk.dst_port_be,
                dst_port_be: qk.src_port_be,
                ..qk
            };
            g.flows
                .push((rk, fval(FLOW_REVERSE, orig, g.r.u16(), pool, tunnel, 0)));
        }
        (q, qk, from, KIND_SOFT_UNICAST)
    } else {
        g.tag("about a forwarded connection");
        let local = g.local(false);
        let lport = g.port();
        let (q, qk) = quoted(g, local, lport, remote);
        if g.r.chance(80) {
            g.tag("forwarded entry");
            let tunnel = g.tunnel();
            g.flows
                .push((qk, fval(FLOW_FORWARDED, local, lport, pool, tunnel, 0)));
        }
        (q, qk, local, KIND_REPLY)
    };
    let _ = qk;
    let (inner, padding) = icmp_error(g, remote, to, &q);
    let key = g.gre_key(fits, pool);
    // Padding past the outer IPv4 length (the inner error ends with it).
    let (ingress, mark, mut frame) = gre_ingress(g, key, &inner);
    frame.extend_from_slice(&padding);
    (ingress, mark, frame)
}

fn gre_malformed(g: &mut G) -> Gen {
    g.tag("GRE odd");
    let (mut src, mut h) = gre_outer(g);
    let (dst, _) = g.dst(false);
    let (sp, dp) = (g.port(), g.port());
    let tp = g.tcp(sp, dp, Some(TCP_SYN));
    let mut inner = ip_tp(v4([10, 9, 8, 7]), dst, &V4::default(), &tp);
    let key = KIND_CONNECTION << 30 | *g.r.pick(&g.t.pool_ids());
    let (mut flags, mut proto) = (0x2000u16, 0x0800u16);
    match g.r.below(12) {
        0 => {
            g.tag("unknown peer");
            src = Ipv4Addr::new(203, 0, 113, 9);
        }
        1 => {
            flags =
                *g.r.pick(&[0x0000u16, 0x3000, 0xa000, 0x2001, 0x2080, 0x8000]);
            g.tag(format!("flags {flags:#06x}"));
        }
        2 => {
            proto = *g.r.pick(&[0x86ddu16, 0x6558, 0x0806]);
            g.tag(format!("protocol {proto:#06x}"));
        }
        3 => {
            g.tag("outer options");
            h.options = vec![1, 1, 1, 0];
        }
        4 => {
            g.tag("inner version 6");
            inner[0] = 0x65;
        }
        5 => {
            g.tag("inner IHL 4");
            inner[0] = 0x44;
        }
        6 => {
            g.tag("inner cut inside its header");
            inner.truncate(g.r.range(0, 19) as usize);
        }
        7 => {
            g.tag("inner length beyond the GRE payload");
            inner.truncate(inner.len() - 4);
        }
        8 => {
            g.tag("inner fragment");
            let seg = segment(v4([10, 9, 8, 7]), dst, &tp);
            let hh = V4 {
                frag: 0x2000,
                ..V4::default()
            };
            inner = ip_packet(v4([10, 9, 8, 7]), dst, 6, &hh, &seg);
        }
        9 => {
            g.tag("GRE cut short");
            let p = ip_packet(
                src.into(),
                FABRIC.into(),
                47,
                &h,
                &[0x20, 0, 8, 0, 0][..g.r.range(1, 5) as usize],
            );
            return (true, 0, ip_frame(&p));
        }
        11 => {
            h.frag = *g.r.pick(&[0x2000u16, 0x2000 | 3, 3]);
            g.tag(if h.frag == 0x2000 {
                "outer GRE first fragment"
            } else {
                "outer GRE later fragment"
            });
        }
        _ => {
            g.tag("inner IPv6 with IPv6 protocol");
            proto = 0x86dd;
            inner = ip_tp(
                "2001:db8:aaaa::5".parse().unwrap(),
                "2001:db8:beef::1".parse().unwrap(),
                &V4::default(),
                &tp,
            );
        }
    }
    let p = gre_packet(src, FABRIC.into(), &h, flags, proto, key, &inner);
    (true, g.r.next() as u32, ip_frame(&p))
}

/// A liveness probe (GRE key kind *probe*) from a peer: a request (pool bits 1), echoed to its
/// sender under a fresh outer header (pool bits 2, or 3 when this server's `LOCAL` says
/// *fenced*: drawn in [`finish`]); a reply (pool bits 2, or 3 from a fenced peer), passed to
/// this host unchanged; other pool bits, refused. What a probe carries is not looked at (any transport, an inner
/// fragment or ICMP error, an inner TTL of 0 or 1: not a hop), but it must be IPv4. Sometimes
/// the programs' echo runs on egress next (own GRE: passed).
fn gre_probe(g: &mut G) -> Vec<Step> {
    g.tag("GRE probe");
    let bits = match g.r.below(20) {
        0..=9 => {
            g.tag("request");
            PROBE_REQUEST
        }
        10..=13 => {
            g.tag("reply");
            PROBE_REPLY
        }
        14..=17 => {
            g.tag("reply, fenced");
            PROBE_REPLY_FENCED
        }
        _ => {
            let pool = *g.r.pick(&g.t.pool_ids());
            let bits = *g.r.pick(&[0u32, 4, 7, 0x0102_0304, (1 << 30) - 1, pool]);
            g.tag(format!("pool bits {bits:#x}"));
            bits
        }
    };
    let (src, mut h) = gre_outer(g);
    let dst = if g.r.chance(5) {
        g.tag("not to this server");
        Ipv4Addr::new(10, 50, 0, 40)
    } else {
        FABRIC.into()
    };
    let (mut flags, mut proto) = (0x2000u16, 0x0800u16);
    // What it carries: mostly the prober's datagram between the two fabric addresses.
    let (isrc, idst): (IpAddr, IpAddr) = if g.r.chance(80) {
        (src.into(), FABRIC.into())
    } else {
        (g.remote(false), g.local(false))
    };
    let (sp, dp) = (g.port(), g.port());
    let tp = match g.r.below(10) {
        0..=5 => {
            g.tag("udp token");
            let n = *g.r.pick(&[8usize, 16, 24]);
            Tp::Udp {
                sport: sp,
                dport: dp,
                payload: g.r.bytes(n),
                zero_csum: false,
            }
        }
        6 => g.udp(sp, dp),
        7 => g.tcp(sp, dp, None),
        8 => {
            g.tag("echo request");
            let b = g.payload();
            Tp::echo(false, true, sp, 9, b)
        }
        _ => g.other_tp(false),
    };
    if g.r.chance(15) {
        // A reverse entry under the inner tuple: no flow entry is read or written.
        let tunnel = g.tunnel();
        let (a, b) = tp.reply_ports();
        let pool = *g.r.pick(&g.t.pool_ids());
        let (orig, oport) = (g.local(false), g.r.u16());
        g.tag("an entry under the inner tuple");
        g.flows.push((
            fkey(isrc, idst, a, b, tp.proto(false)),
            fval(FLOW_REVERSE, orig, oport, pool, tunnel, 0),
        ));
    }
    let ih = V4 {
        ttl: g.hop_ttl(),
        ..V4::default()
    };
    let mut inner = if g.r.chance(8) {
        g.tag("inner later fragment");
        let seg = segment(isrc, idst, &tp);
        let hh = V4 {
            frag: 0x2000 | 5,
            ..ih
        };
        ip_packet(isrc, idst, tp.proto(false), &hh, &seg)
    } else {
        ip_tp(isrc, idst, &ih, &tp)
    };
    match g.r.below(25) {
        0 => {
            g.tag("inner IHL 4");
            inner[0] = 0x44;
        }
        1 => {
            g.tag("inner version 6");
            inner[0] = 0x65;
        }
        2 => {
            g.tag("inner cut inside its header");
            inner.truncate(g.r.range(0, 19) as usize);
        }
        3 => {
            g.tag("outer options");
            h.options = vec![1, 1, 1, 0];
        }
        4 => {
            flags = *g.r.pick(&[0x0000u16, 0x3000, 0xa000, 0x2001]);
            g.tag(format!("flags {flags:#06x}"));
        }
        5 => {
            proto = *g.r.pick(&[0x86ddu16, 0x6558]);
            g.tag(format!("protocol {proto:#06x}"));
        }
        _ => {}
    }
    let key = KIND_PROBE << 30 | bits;
    let mut frame = ip_frame(&gre_packet(src, dst, &h, flags, proto, key, &inner));
    if g.r.chance(10) {
        // Trimmed to the outer IPv4 length when echoed.
        g.tag("bytes past the outer IPv4 length");
        let n = g.r.range(1, 24) as usize;
        frame.extend(g.r.bytes(n));
    }
    let mut steps = vec![step_frame("probe in GRE", &frame)];
    if bits == PROBE_REQUEST && g.r.chance(40) {
        // Sent out through the uplink: GRE from this server's fabric address to a peer.
        steps.push(Step {
            class: "probe echo, on egress".into(),
            ingress: false,
            mark: *g.r.pick(&[0u32, 0x8000_0000, 42, 7]),
            packet: vec![],
            prev_output: true,
        });
    }
    steps
}

fn ingress_misc(g: &mut G) -> Gen {
    g.tag("ingress misc");
    let v6 = g.r.chance(30);
    let from = g.remote(v6);
    let to = if g.r.chance(50) {
        g.reply_target(v6).0
    } else {
        g.local(v6)
    };
    let tp = match g.r.below(3) {
        0 => g.other_tp(v6),
        1 => {
            let (a, b) = (g.port(), g.port());
            g.tcp(a, b, None)
        }
        _ => {
            let (a, b) = (g.port(), g.port());
            g.udp(a, b)
        }
    };
    (true, 0, ip_frame(&ip_tp(from, to, &g.hop_hdr(), &tp)))
}
