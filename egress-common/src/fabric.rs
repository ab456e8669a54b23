//! The fabric: this server's own settings, the peers GRE is accepted from, and who owns which
//! port range of each shared IPv4 pool address (for soft-unicast).

/// Outer IPv4 (20) + GRE with key (8).
pub const ENCAP_LEN: u32 = 28;
pub const GRE_FLAG_KEY: u16 = 0x2000;
pub use crate::wire::IPPROTO_GRE;

/// The GRE key of every tunnel packet: what it carries in the top two bits, the pool id in the
/// other 30. The receiver checks the kind against what it finds: a soft-unicast packet may only
/// meet an existing connection, a reply only a connection forwarded to that peer.
pub mod tunnel {
    /// A forwarded connection's packet, from the socket's server to the peer that translates.
    pub const CONNECTION: u32 = 1;
    /// A packet for a pool port another server owns, from the server the address is routed to.
    pub const SOFT_UNICAST: u32 = 2;
    /// A reply (or ICMP error) translated back, from the translating peer to the socket's server.
    pub const REPLY: u32 = 3;
    /// A liveness probe between agents (the pool bits say which way): the peer's programs
    /// reflect a request as a reply, through the path forwarded connections take.
    pub const PROBE: u32 = 0;
    pub const PROBE_REQUEST: u32 = 1;
    pub const PROBE_REPLY: u32 = 2;
    /// A reply from a server that has taken itself out of new connections ([`super::Local`]'s
    /// `fenced`: its agent cannot renew its lease): the prober counts it down at once.
    pub const PROBE_REPLY_FENCED: u32 = 3;
    const KIND_SHIFT: u32 = 30;
    /// Largest pool id (validated): the key's low 30 bits.
    pub const MAX_POOL_ID: u32 = (1 << KIND_SHIFT) - 1;

    /// The key of a `kind` packet of `pool`.
    pub const fn key(kind: u32, pool: u32) -> u32 {
        (kind << KIND_SHIFT) | (pool & MAX_POOL_ID)
    }

    /// The kind a key says.
    pub const fn kind(key: u32) -> u32 {
        key >> KIND_SHIFT
    }

    /// The pool a key names.
    pub const fn pool(key: u32) -> u32 {
        key & MAX_POOL_ID
    }
}

/// Value of the one-entry `LOCAL` array: this server's settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Local {
    /// This server's fabric address (outer source of its GRE packets), network order.
    pub fabric: [u8; 4],
    /// Interface index of the uplink (where encapsulated and redirected packets leave).
    pub ifindex: u32,
    /// Largest TCP MSS of a forwarded IPv4 connection: uplink MTU - 40 - ENCAP_LEN.
    pub mss_v4: u16,
    /// Nonzero: this server takes no new connections from its peers (its agent cannot renew
    /// its lease in etcd, so it is about to be taken as gone): probes are answered with
    /// [`tunnel::PROBE_REPLY_FENCED`]. Written by the agent alone, not by the plan.
    pub fenced: u8,
    pub _pad: u8,
    /// Most connections one peer may have translated here at once (`PEER_LOAD`); 0: no limit.
    pub peer_budget: u32,
}
const _: () = assert!(core::mem::size_of::<Local>() == 16);

/// Key of `PEERS` (a peer's fabric address) and `OWNERS` (a pool IPv4 address), in a plan
/// generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    /// Network order.
    pub addr: [u8; 4],
    pub gen_: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<AddrKey>() == 8);

impl AddrKey {
    pub const fn new(addr: [u8; 4], generation: u8) -> Self {
        Self {
            addr,
            gen_: generation,
            _pad: [0; 3],
        }
    }
}

/// Value of `PEERS` (key: [`AddrKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// The peer's server id.
    pub id: u32,
    /// Why it is down for new connections from here (`PEER_*` bits; 0: up).
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<Peer>() == 8);

/// [`Peer::flags`]: missed its fabric probes.
pub const PEER_DOWN_PROBES: u32 = 1;
/// [`Peer::flags`]: its agent's lease in etcd is gone.
pub const PEER_DOWN_LEASE: u32 = 2;
/// [`Peer::flags`]: back, but not yet stable for the hold-down time.
pub const PEER_HOLD_DOWN: u32 = 4;
/// [`Peer::flags`]: it says (in its probe answers) that it takes no new connections: its agent
/// cannot renew its lease.
pub const PEER_DOWN_FENCED: u32 = 8;

/// One share of a pool address: a port range and the server holding it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerRange {
    /// Inclusive, host order.
    pub port_min: u16,
    pub port_max: u16,
    /// Fabric address of the owner, network order.
    pub fabric: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<OwnerRange>() == 8);

/// Most shares one pool address may be split into (validated).
pub const MAX_SHARES_PER_ADDRESS: usize = 16;

/// Value of `OWNERS` (key: [`AddrKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owners {
    /// Pool id, the GRE key of soft-unicast packets.
    pub pool: u32,
    /// Valid entries in `ranges`.
    pub count: u32,
    pub ranges: [OwnerRange; MAX_SHARES_PER_ADDRESS],
}
const _: () = assert!(core::mem::size_of::<Owners>() == 136);

pub const PEERS_CAPACITY: u32 = 65536;
/// Default [`Local::peer_budget`]: half the default flow table (two entries each), so that no
/// one peer can fill it while a busy peer still forwards hundreds of thousands.
pub const PEER_BUDGET: u32 = crate::flow::FLOWS_CAPACITY / 4;
/// The XDP metadata (4 bytes before the frame) `xdp_ingress` leaves on a packet it finished and
/// passed up (a reply translated back, a forwarded connection's reply decapsulated):
/// `tc_ingress` lets such a packet through untouched and uncounted. Only XDP programs write
/// metadata, so a sender cannot set it.
pub const XDP_DONE: u32 = 0x4547_5844;
/// The word of the skb's control block (`__sk_buff.cb[SENT_HINT_CB]`; `--trace` uses cb[0..2])
/// in which the ingress program leaves [`SENT_HINT`] on a peer's connection it translated and
/// redirected out of the uplink, with [`sent_tag`] of the packet in the next word, so that the
/// packet's second pass through `tc_egress` passes it without a lookup. The control block of a
/// locally sent packet holds whatever the stack left there: the hint word alone counts for
/// nothing.
pub const SENT_HINT_CB: usize = 2;
pub const SENT_HINT: u32 = 0x4547_5354;
/// The word after [`SENT_HINT_CB`]: [`sent_tag`] of the packet the hint was left on.
pub const SENT_TAG_CB: usize = 3;

/// The tag of a translated IPv4 packet (its tuple as `tc_egress` parses it: for an echo
/// request the identifier and 0) under `key`, a random number the agent gives the programs at
/// load (the `SENT_KEY` global, one per load). A keyed hash, not a MAC: only privileged code
/// can read the key or a control block (code that could bypass the datapath anyway); anything
/// else that leaves the hint word matches a tag only by a 2^-32 chance.
#[inline(always)]
pub fn sent_tag(
    key: u32,
    src: [u8; 4],
    dst: [u8; 4],
    src_port_be: u16,
    dst_port_be: u16,
    proto: u8,
) -> u32 {
    const M: u32 = 0x9e37_79b1;
    let ports = (u32::from(src_port_be) << 16) | u32::from(dst_port_be);
    let mut h = (key ^ u32::from_ne_bytes(src))
        .wrapping_mul(M)
        .rotate_left(13);
    h = (h ^ u32::from_ne_bytes(dst))
        .wrapping_mul(M)
        .rotate_left(13);
    h = (h ^ ports).wrapping_mul(M).rotate_left(13);
    h = (h ^ u32::from(proto)).wrapping_mul(M);
    h ^ (h >> 16)
}
/// Bytes of the outer headers of a tunnelled packet: Ethernet + outer IPv4 + GRE. The inner
/// packet's IP header starts here.
pub const INNER_OFF: usize = 14 + ENCAP_LEN as usize;
/// Entries of `OWNERS` (one per pool IPv4 address; not preallocated).
pub const OWNERS_CAPACITY: u32 = 262_144;

/// One slot of `ROUTES`, the programs' per-CPU cache of FIB results (direct-mapped by the
/// next hop's address): where a packet to `dst` leaves and with which MACs, as the kernel said
/// at `at_ns` (coarse monotonic clock). Used for [`ROUTE_TTL_NS`], then looked up again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteSlot {
    /// IPv4, network order (0: empty slot).
    pub dst: [u8; 4],
    /// The uplink the lookup was made for.
    pub ifindex_in: u32,
    /// The device the route leaves through.
    pub ifindex_out: u32,
    /// Destination then source MAC, as written into the frame.
    pub macs: [u8; 12],
    pub at_ns: u64,
}
const _: () = assert!(core::mem::size_of::<RouteSlot>() == 32);
/// Slots of `ROUTES` per CPU (a power of two).
pub const ROUTE_SLOTS: u32 = 1024;
/// How long a cached route is used: a changed route or neighbour takes effect within it.
pub const ROUTE_TTL_NS: u64 = 1_000_000_000;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields and arrays only, explicit padding (sizes asserted above).
    unsafe impl aya::Pod for super::Local {}
    unsafe impl aya::Pod for super::Peer {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::Owners {}
}

#[cfg(test)]
mod tests {
    use super::sent_tag;

    /// Every input moves the tag: a hint left on one packet, or under one load's key, is no
    /// hint for another.
    #[test]
    fn every_field_of_the_tuple_and_the_key_moves_the_tag() {
        let base = (0x1234_5678, [192, 0, 2, 10], [203, 0, 113, 1], 40000, 80, 6);
        let tag = |(k, s, d, sp, dp, p): (u32, [u8; 4], [u8; 4], u16, u16, u8)| {
            sent_tag(k, s, d, sp, dp, p)
        };
        let t = tag(base);
        let (k, s, d, sp, dp, p) = base;
        for (what, other) in [
            ("key", (k ^ 1, s, d, sp, dp, p)),
            ("source", (k, [192, 0, 2, 11], d, sp, dp, p)),
            ("destination", (k, s, [203, 0, 113, 2], sp, dp, p)),
            ("source port", (k, s, d, sp + 1, dp, p)),
            ("destination port", (k, s, d, sp, dp + 1, p)),
            ("ports swapped", (k, s, d, dp, sp, p)),
            ("addresses swapped", (k, d, s, sp, dp, p)),
            ("protocol", (k, s, d, sp, dp, 17)),
        ] {
            assert_ne!(tag(other), t, "{what}");
        }
    }
}
