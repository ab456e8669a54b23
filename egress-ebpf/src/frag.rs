//! Fragments: the first fragment of a datagram decides (it has the ports); later fragments find
//! what it got in `FRAGS`, keyed by (source, destination, IP id, protocol) as they arrive.

use aya_ebpf::{bindings::BPF_ANY, btf_maps::LruHashMap, macros::btf_map};
use egress_common::flow::{FRAGS_CAPACITY, FragKey, FragValue};

use crate::parse::{FRAG_FIRST, Ip};

#[btf_map]
static FRAGS: LruHashMap<FragKey, FragValue, { FRAGS_CAPACITY as usize }> = LruHashMap::new();

#[inline(always)]
fn key(ip: &Ip, src: &[u8; 16]) -> FragKey {
    FragKey {
        src: *src,
        dst: ip.dst,
        id: ip.frag_id,
        proto: ip.proto,
        family: ip.family,
        _pad: [0; 2],
    }
}

/// Records what the first fragment `ip` got, for its later fragments (nothing for a whole
/// packet). An entry under the same key (an earlier datagram with the same id) is replaced.
#[inline(always)]
pub fn remember(ip: &Ip, kind: u8, addr: &[u8; 16], tunnel: [u8; 4], pool: u32) {
    remember_as(ip, &ip.src, kind, addr, tunnel, pool);
}

/// Like [`remember`], keyed with `src` as the source (a translated first fragment).
#[inline(always)]
pub fn remember_as(ip: &Ip, src: &[u8; 16], kind: u8, addr: &[u8; 16], tunnel: [u8; 4], pool: u32) {
    if ip.frag != FRAG_FIRST {
        return;
    }
    let v = FragValue {
        addr: *addr,
        tunnel,
        pool,
        kind,
        _pad: [0; 7],
    };
    // A failed insert (out of memory) leaves later fragments to be dropped and counted.
    let _ = FRAGS.insert(key(ip, src), v, BPF_ANY as u64);
}

/// What the first fragment of later fragment `ip`'s datagram got, if it was seen.
#[inline(always)]
pub fn lookup(ip: &Ip) -> Option<FragValue> {
    // SAFETY: the value is copied out at once, within this run.
    unsafe { FRAGS.get(key(ip, &ip.src)) }.copied()
}
