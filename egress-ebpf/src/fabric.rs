//! This server's fabric settings, known peers, and the owners of shared pool port ranges.

use aya_ebpf::{
    btf_maps::{Array, HashMap},
    macros::btf_map,
};
use egress_common::fabric::{
    AddrKey, Local, MAX_SHARES_PER_ADDRESS, OWNERS_CAPACITY, Owners, PEER_DOWN_PROBES,
    PEERS_CAPACITY, Peer,
};

#[btf_map]
static LOCAL: Array<Local, 1> = Array::new();
#[btf_map]
static PEERS: HashMap<AddrKey, Peer, { PEERS_CAPACITY as usize }> = HashMap::new();
#[btf_map]
// Not preallocated: sized for a large fleet's pool addresses, it costs only what the plan holds.
static OWNERS: HashMap<
    AddrKey,
    Owners,
    { OWNERS_CAPACITY as usize },
    { aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// This server's settings; None until the agent has written them.
#[inline(always)]
pub fn local() -> Option<&'static Local> {
    LOCAL.get(0).filter(|l| l.ifindex != 0)
}

/// Whether GRE from `addr` is accepted.
#[inline(always)]
pub fn is_peer(addr: &[u8; 4], g: u8) -> bool {
    // SAFETY: read-only use of the value within this run.
    unsafe { PEERS.get(AddrKey::new(*addr, g)) }.is_some()
}

/// Whether the tunnel to peer `addr` is dead: its fabric probes go unanswered (the agent's
/// liveness view). A peer down only by its lease, or holding down, still gets what is its own.
#[inline(always)]
pub fn tunnel_dead(addr: &[u8; 4], g: u8) -> bool {
    // SAFETY: read-only use of the value within this run.
    unsafe { PEERS.get(AddrKey::new(*addr, g)) }.is_some_and(|p| p.flags & PEER_DOWN_PROBES != 0)
}

/// Whether `addr` is a pool IPv4 address (one with shares in the plan).
#[inline(always)]
pub fn is_pool_address(addr: &[u8; 4], g: u8) -> bool {
    // SAFETY: read-only use of the value within this run.
    unsafe { OWNERS.get(AddrKey::new(*addr, g)) }.is_some()
}

/// The pool and the owner's fabric address for `port` (host order) of pool address `addr`.
#[inline(always)]
pub fn owner_of(addr: &[u8; 4], port: u16, g: u8) -> Option<(u32, [u8; 4])> {
    // SAFETY: read-only use of the value within this run.
    let owners = unsafe { OWNERS.get(AddrKey::new(*addr, g)) }?;
    let mut i = 0;
    while i < MAX_SHARES_PER_ADDRESS {
        if i as u32 >= owners.count {
            break;
        }
        let r = &owners.ranges[i];
        if r.port_min <= port && port <= r.port_max {
            return Some((owners.pool, r.fabric));
        }
        i += 1;
    }
    None
}
