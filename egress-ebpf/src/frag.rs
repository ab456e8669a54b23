//! Fragments: the first fragment of a datagram decides (it has the ports); later fragments find
//! what it got in `FRAGS`, keyed by (source, destination, IP id, protocol) as they arrive and by
//! the way they go (out through the uplink, or in).

use aya_ebpf::{bindings::BPF_ANY, btf_maps::LruHashMap, macros::btf_map};
use egress_common::flow::{FRAGS_CAPACITY, FragKey, FragValue};

use crate::parse::{FRAG_FIRST, Ip};

#[btf_map]
static FRAGS: LruHashMap<FragKey, FragValue, { FRAGS_CAPACITY as usize }> = LruHashMap::new();

#[inline(always)]
fn key(ip: &Ip, src: &[u8; 16], dir: u8) -> FragKey {
    FragKey {
        src: *src,
        dst: ip.dst,
        id: ip.frag_id,
        proto: ip.proto,
        family: ip.family,
        dir,
        _pad: 0,
    }
}

/// Records what the first fragment `ip` got, for its later fragments going `dir`
/// (`FRAG_OUT`, `FRAG_IN`; nothing for a whole packet). An entry under the same key (an
/// earlier datagram with the same id, the same way) is replaced.
#[inline(always)]
pub fn remember(ip: &Ip, dir: u8, kind: u8, addr: &[u8; 16], tunnel: [u8; 4], pool: u32) {
    remember_as(ip, &ip.src, dir, kind, addr, tunnel, pool);
}

/// Like [`remember`], keyed with `src` as the source (a translated first fragment).
#[inline(always)]
pub fn remember_as(
    ip: &Ip,
    src: &[u8; 16],
    dir: u8,
    kind: u8,
    addr: &[u8; 16],
    tunnel: [u8; 4],
    pool: u32,
) {
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
    let _ = FRAGS.insert(key(ip, src, dir), v, BPF_ANY as u64);
}

/// What the first fragment of later fragment `ip`'s datagram got, if it was seen, for
/// fragments going `dir`.
#[inline(always)]
pub fn lookup(ip: &Ip, dir: u8) -> Option<FragValue> {
    // SAFETY: the value is copied out at once, within this run.
    unsafe { FRAGS.get(key(ip, &ip.src, dir)) }.copied()
}
