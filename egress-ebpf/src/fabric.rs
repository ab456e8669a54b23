//! This server's fabric settings, known peers, and the owners of shared pool port ranges.

use aya_ebpf::{
    Global,
    btf_maps::{Array, HashMap},
    macros::btf_map,
    programs::TcContext,
};
use egress_common::fabric::{
    AddrKey, Local, MAX_SHARES_PER_ADDRESS, OWNERS_CAPACITY, Owners, PEER_DOWN_PROBES,
    PEERS_CAPACITY, Peer, SENT_HINT, SENT_HINT_CB, SENT_TAG_CB, sent_tag,
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

/// The key of the sent hint's tag (`egress_common::fabric::sent_tag`): random, written by the
/// loader (`prog_names::SENT_KEY`), one per load.
#[unsafe(no_mangle)]
static SENT_KEY: Global<u32> = Global::new(0);

/// The sent hint's tag of a translated IPv4 packet: source, destination, their ports as
/// `tc_egress` parses them, protocol.
#[inline(always)]
pub fn tag(src: [u8; 4], dst: [u8; 4], src_port_be: u16, dst_port_be: u16, proto: u8) -> u32 {
    sent_tag(SENT_KEY.load(), src, dst, src_port_be, dst_port_be, proto)
}

/// Leaves the sent hint on a peer's connection translated and redirected out of the uplink:
/// the hint word and the packet's `tag`.
#[inline(always)]
pub fn leave_hint(ctx: &TcContext, tag: u32) {
    // SAFETY: the verifier-checked context of this program; cb[0..5] are writable from TC.
    unsafe {
        (*ctx.skb.skb).cb[SENT_HINT_CB] = SENT_HINT;
        (*ctx.skb.skb).cb[SENT_TAG_CB] = tag;
    }
}

/// Whether the control block holds the hint word (a shortcut: alone it proves nothing).
#[inline(always)]
pub fn hint_word(ctx: &TcContext) -> bool {
    ctx.cb()[SENT_HINT_CB] == SENT_HINT
}

/// Whether the packet carries the sent hint the ingress program left on it: the word and
/// `tag`, its own tuple's.
#[inline(always)]
pub fn hinted(ctx: &TcContext, tag: u32) -> bool {
    let cb = ctx.cb();
    cb[SENT_HINT_CB] == SENT_HINT && cb[SENT_TAG_CB] == tag
}

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
