//! Policy tries: `(mark, destination prefix)` → pool. One LPM trie per family.
//!
//! The trie key is the plan generation and the mark (each matched in full: 32 bits) followed by
//! the address, so the prefix length stored in the trie is `64 + prefix length`. A packet whose
//! mark has no entry falls back to mark 0.

/// Key data of `POLICY_V4` (the LPM trie adds the prefix length in front).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKeyV4 {
    /// Plan generation ([`crate::generation`]), big-endian.
    pub gen_be: u32,
    /// Tenant id from SO_MARK, big-endian so the trie matches it byte by byte.
    pub mark_be: u32,
    /// Destination address, network order.
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<PolicyKeyV4>() == 12);

/// Key data of `POLICY_V6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKeyV6 {
    pub gen_be: u32,
    pub mark_be: u32,
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<PolicyKeyV6>() == 24);

/// Key data of `PEER_POLICY`: which destinations a pool's policies cover, whatever their mark.
/// A peer's forwarded packet (GRE key = pool) is translated only towards these.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerPolicyKey {
    pub gen_be: u32,
    /// Pool id, big-endian so the trie matches it byte by byte.
    pub pool_be: u32,
    /// Destination address, network order.
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<PeerPolicyKey>() == 12);

/// Bits in front of the address in a `PEER_POLICY` key: generation and pool id.
pub const POOL_BITS: u32 = 64;

/// Bits in front of the address in a policy trie key: generation and mark.
pub const MARK_BITS: u32 = 64;

impl PolicyKeyV4 {
    /// The key of `addr` under `mark` in plan generation `generation`.
    pub const fn new(generation: u8, mark: u32, addr: [u8; 4]) -> Self {
        PolicyKeyV4 {
            gen_be: (generation as u32).to_be(),
            mark_be: mark.to_be(),
            addr,
        }
    }
}

impl PolicyKeyV6 {
    /// The key of `addr` under `mark` in plan generation `generation`.
    pub const fn new(generation: u8, mark: u32, addr: [u8; 16]) -> Self {
        PolicyKeyV6 {
            gen_be: (generation as u32).to_be(),
            mark_be: mark.to_be(),
            addr,
        }
    }
}

/// The trie prefix length of a policy covering the first `addr_bits` of the address (a lookup
/// of one address: all of its bits).
pub const fn prefix_len(addr_bits: u32) -> u32 {
    MARK_BITS + addr_bits
}

/// The policy lookup rule, one for the programs, `explain` and `explain --live`: the rules of
/// the packet's mark first, then (for a marked packet) those of mark 0, which apply to every
/// mark. `lookup(mark)` finds the pool of the longest prefix among one mark's rules.
#[inline(always)]
pub fn pool_for_mark(mark: u32, mut lookup: impl FnMut(u32) -> Option<u32>) -> Option<u32> {
    match lookup(mark) {
        Some(pool) => Some(pool),
        None if mark != 0 => lookup(0),
        None => None,
    }
}

/// Whether a policy may cover destination `dst` (an IPv4 address in its first 4 bytes) at
/// all: never the unspecified, loopback, link-local, multicast or broadcast ranges (IPv4 0/8,
/// 127/8, 169.254/16, 224/3; IPv6 ::/16, fe80::/10, ff00::/8), so that a catch-all policy
/// (`0.0.0.0/0`, `::/0`) never translates the host's own neighbour discovery, IGMP or DHCP.
/// Asked before every policy lookup, by the programs and `explain` alike.
#[inline(always)]
pub fn coverable(family: u8, dst: &[u8; 16]) -> bool {
    let (a, b) = (dst[0], dst[1]);
    if family == crate::action::FAMILY_V4 {
        !(a == 0 || a == 127 || a >= 224 || (a == 169 && b == 254))
    } else {
        // ::/16, not ::/8: NAT64's 64:ff9b::/96 and 64:ff9b:1::/48 begin with byte 0.
        !((a == 0 && b == 0) || a == 0xff || (a == 0xfe && b & 0xc0 == 0x80))
    }
}

/// An address as the programs hold it: its family, and 16 bytes (IPv4 in the first 4).
pub fn family_and_bytes(a: core::net::IpAddr) -> (u8, [u8; 16]) {
    match a {
        core::net::IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            (crate::action::FAMILY_V4, b)
        }
        core::net::IpAddr::V6(v6) => (crate::action::FAMILY_V6, v6.octets()),
    }
}

/// Value of both policy tries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    /// Pool id from the config; the action is looked up by `(pool, family)`.
    pub pool: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 4);

/// Entries each policy trie can hold (no preallocation: memory follows use).
pub const POLICY_CAPACITY: u32 = 1 << 20;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields only, no padding (sizes asserted above).
    unsafe impl aya::Pod for super::PolicyKeyV4 {}
    unsafe impl aya::Pod for super::PolicyKeyV6 {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::PeerPolicyKey {}
}
