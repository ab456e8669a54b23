//! The peer budget: how many connections one peer may have translated here at once. Whoever
//! can put packets with a peer's fabric address on the wire could otherwise fill the flow table
//! and a pool's ports; the budget bounds what any one peer (or an impostor) can take.
//!
//! `PEER_LOAD` counts up here on every claim; the agent recounts it from the flow table on each
//! collection (entries leave only through the collector), so it never drifts. The count is a
//! plain read-modify-write (the BPF target has no atomic add in `core`): two CPUs claiming for
//! the same peer at the same instant may count one; the recount corrects it.

use aya_ebpf::{bindings::BPF_NOEXIST, btf_maps::HashMap, macros::btf_map};
use egress_common::{fabric::PEERS_CAPACITY, stats::Stat};

#[btf_map]
static PEER_LOAD: HashMap<[u8; 4], u64, { PEERS_CAPACITY as usize }> = HashMap::new();

/// Counts one more connection for `peer`, or refuses it when the peer already holds `budget`
/// (0: no limit).
#[inline(always)]
pub fn take(peer: [u8; 4], budget: u32) -> Result<(), Stat> {
    if budget == 0 {
        return Ok(());
    }
    if let Some(n) = PEER_LOAD.get_ptr_mut(peer) {
        // SAFETY: a map value of this run.
        unsafe {
            if *n >= u64::from(budget) {
                return Err(Stat::PeerBudget);
            }
            *n += 1;
        }
        return Ok(());
    }
    // First of this peer (or another CPU's insert won: then its count stands, one low until the
    // agent recounts).
    let _ = PEER_LOAD.insert(peer, 1, BPF_NOEXIST as u64);
    Ok(())
}

/// Gives back a connection taken for `peer` whose first packet was then dropped.
#[inline(always)]
pub fn give_back(peer: [u8; 4]) {
    if let Some(n) = PEER_LOAD.get_ptr_mut(peer) {
        // SAFETY: a map value of this run.
        unsafe { *n = (*n).saturating_sub(1) };
    }
}
