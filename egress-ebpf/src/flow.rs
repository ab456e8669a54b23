//! The flow table (connection tracking): lookups, refresh, and the atomic port claim.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    btf_maps::{HashMap, PerCpuArray},
    macros::btf_map,
};
use egress_common::{
    action::{Action, MAX_SNAT},
    flow::{
        FLOW_F_CLOSING, FLOW_F_FIN, FLOW_F_REPLIED, FLOW_F_RST, FLOW_FORWARDED, FLOW_OUTBOUND,
        FLOW_REVERSE, FLOWS_CAPACITY, FlowKey, FlowValue,
    },
    stats::Stat,
};

use crate::{
    parse::{Ip, Ports},
    stats,
};

#[btf_map]
// A plain (preallocated) hash, not an LRU: an LRU evicts whatever is oldest on the inserting
// CPU, which may be one direction of an idle established connection (it then gets a new port
// mid-connection). Here nothing is evicted; both entries of a connection go together, by the
// agent's collector, which also drops unreplied connections first under pressure. Full, an
// insert fails and the new connection is refused, counted.
static FLOWS: HashMap<FlowKey, FlowValue, { FLOWS_CAPACITY as usize }> = HashMap::new();

/// What an insert-if-absent returns when the key exists (any other error: the table is full).
const EEXIST: i32 = -17;

/// Ports tried per new connection, spread round-robin over the action's SNAT targets.
const PROBES: u32 = 32;

/// The flow-table key of a packet as it is on the wire.
#[inline(always)]
pub fn key(ip: &Ip, ports: &Ports) -> FlowKey {
    FlowKey {
        src: ip.src,
        dst: ip.dst,
        src_port_be: ports.src_be,
        dst_port_be: ports.dst_be,
        proto: ip.proto,
        family: ip.family,
        _pad: [0; 2],
    }
}

/// The key of the other direction of a packet as it is on the wire (source and destination
/// swapped): a reply's key finds the outbound entry of its connection.
#[inline(always)]
pub fn key_swapped(ip: &Ip, ports: &Ports) -> FlowKey {
    FlowKey {
        src: ip.dst,
        dst: ip.src,
        src_port_be: ports.dst_be,
        dst_port_be: ports.src_be,
        proto: ip.proto,
        family: ip.family,
        _pad: [0; 2],
    }
}

/// An entry of the flow table found by a lookup in this program run: the only way code outside
/// this module reaches one.
///
/// Invariant (what makes the accessors sound): the pointer comes from a successful lookup in
/// `FLOWS` during this run. `FLOWS` is preallocated: its elements are never freed, so the
/// pointer stays valid memory of the map's value size for the whole run, and every field is a
/// plain integer, so any racing read sees some value of each field, never an invalid one.
/// What the map does not give: exclusion. Other CPUs may write the element meanwhile, and if
/// the collector (or another CPU's reopen) deletes it and a new connection's insert recycles
/// it within this run, a write here (the clock, a FIN flag) lands on that connection's entry —
/// at worst it expires earlier than it should. The kernel's own lookups share this window.
#[derive(Clone, Copy)]
pub struct Entry(*mut FlowValue);

impl Entry {
    /// A copy of the entry as it is now.
    #[inline(always)]
    pub fn value(self) -> FlowValue {
        // SAFETY: the type's invariant.
        unsafe { *self.0 }
    }

    /// The peer the entry's connection belongs to (0.0.0.0: a local one).
    #[inline(always)]
    pub fn tunnel(self) -> [u8; 4] {
        // SAFETY: the type's invariant.
        unsafe { (*self.0).tunnel }
    }

    /// The entry's flags (read alone: the per-packet path needs no copy of the whole entry).
    #[inline(always)]
    fn flags(self) -> u8 {
        // SAFETY: the type's invariant.
        unsafe { (*self.0).flags }
    }

    /// Records that a packet of the flow leaving from its socket's side was seen now (a FIN
    /// marks it closing) and returns a copy of the entry as updated.
    #[inline(always)]
    pub fn touch(self, ports: &Ports) -> FlowValue {
        if ports.rst() {
            // Always stamped: the agent orders the socket's RST against the latest reply by
            // the two entries' clocks, and a reply may have moved the other's within the
            // granule (the connection would keep its full timeout).
            self.stamp(crate::clock::now());
        } else {
            self.refresh();
        }
        let mut flags = if ports.rst() {
            self.flags() | FLOW_F_RST
        } else {
            self.flags() & !FLOW_F_RST
        };
        if ports.fin() {
            flags |= FLOW_F_FIN;
        }
        self.set_flags(flags);
        self.value()
    }

    /// Records that a reply of the flow (from the remote side, which anyone can spoof) was seen
    /// now and returns a copy of the entry as updated. A reply's FIN or RST is never taken as
    /// closing: only the socket's own are (a blind spoofed RST, out of the window, is dropped
    /// by the socket without an answer, and would otherwise cut an idle connection's timeout
    /// to 10 s).
    #[inline(always)]
    pub fn touch_reply(self, ports: &Ports) -> FlowValue {
        self.refresh();
        let mut flags = self.flags() | FLOW_F_REPLIED;
        // Any other reply shows the connection alive after a RST of the socket's.
        if !ports.rst() {
            flags &= !FLOW_F_RST;
        }
        self.set_flags(flags);
        self.value()
    }

    /// Sets the entry's clock to now, unless it is within [`CLOCK_GRANULE_NS`] of it already.
    #[inline(always)]
    fn refresh(self) {
        // The coarse clock (a tick's resolution, far below every timeout; see `clock`). A stamp
        // a little ahead of it (written by the agent or another CPU) reads as stale and is
        // simply rewritten.
        let now = crate::clock::now();
        // SAFETY: the type's invariant.
        if now.wrapping_sub(unsafe { (*self.0).last_seen_ns }) >= CLOCK_GRANULE_NS {
            self.stamp(now);
        }
    }

    /// Sets the entry's clock to `now`.
    #[inline(always)]
    fn stamp(self, now: u64) {
        // SAFETY: the type's invariant.
        unsafe { (*self.0).last_seen_ns = now };
    }

    /// Writes the entry's flags only when they change (the same cache line as the clock).
    #[inline(always)]
    fn set_flags(self, flags: u8) {
        if self.flags() != flags {
            // SAFETY: the type's invariant.
            unsafe { (*self.0).flags = flags };
        }
    }
}

/// How stale an entry's clock may be before a packet writes it again: far below every timeout
/// (the shortest, early drop, is 1 s), and it spares the cache line that CPUs sending the same
/// flow share one write per packet.
const CLOCK_GRANULE_NS: u64 = 100_000_000;

/// The entry for `key` if it is of `kind`.
#[inline(always)]
pub fn get(key: &FlowKey, kind: u8) -> Option<Entry> {
    get_any(key).filter(|e| e.value().kind == kind)
}

/// The entry for `key`, whatever its kind.
#[inline(always)]
pub fn get_any(key: &FlowKey) -> Option<Entry> {
    FLOWS.get_ptr_mut(key).map(Entry)
}

/// Picks one of `count` next hops for the flow (by its hash).
#[inline(always)]
pub fn pick(key: &FlowKey, count: u32) -> usize {
    if count == 0 {
        return 0;
    }
    core::hint::black_box((hash(key) % count) as usize)
}

/// Records that the local connection `out` is forwarded to `peer`, so it keeps that path even
/// if the plan changes. If another CPU recorded it first, that record wins.
#[inline(always)]
pub fn record_forwarded(out: &FlowKey, peer: [u8; 4], pool: u32) -> Result<FlowValue, Stat> {
    let now = crate::clock::now();
    // Only the tunnel matters for a forwarded entry; the rest mirrors the key.
    let value = FlowValue::new(FLOW_FORWARDED, out.src, out.src_port_be, pool, peer, now);
    match FLOWS.insert(out, value, BPF_NOEXIST as u64) {
        Ok(()) => return Ok(value),
        Err(e) if e != EEXIST => return Err(Stat::FlowTableFull),
        Err(_) => {}
    }
    match get(out, FLOW_FORWARDED) {
        Some(existing) => Ok(existing.value()),
        None => Err(Stat::FlowInsertFailed),
    }
}

/// Whether a packet opening a connection meets a closed one's outbound or forwarded entry: the
/// tuple is being reused by a new connection, which gets a port of its own and a path chosen
/// by the plan in force (not the old connection's peer).
#[inline(always)]
pub fn reopens(v: &FlowValue, ports: &Ports) -> bool {
    (v.kind == FLOW_OUTBOUND || v.kind == FLOW_FORWARDED)
        && v.flags & FLOW_F_CLOSING != 0
        && ports.opens()
}

/// Removes the entry of `key` (a forwarded connection whose first packet was dropped).
#[inline(always)]
pub fn remove(key: &FlowKey) {
    let _ = FLOWS.remove(key);
}

/// Releases a connection claimed for a packet that was then dropped: both its entries go, and
/// its port is free again.
#[inline(always)]
pub fn release(out: &FlowKey, v: &FlowValue) {
    let _ = FLOWS.remove(out.other_direction(v));
    let _ = FLOWS.remove(out);
}

/// Retires the entry `v` of `key` when its tuple is reopened. An outbound entry's reverse
/// entry stays, holding the old port away from new connections, and takes over the closing
/// flags so that it expires on the closed connection's schedule. A forwarded entry has none
/// here (its peer holds the port and retires its own entry when the new SYN reaches it).
#[inline(always)]
pub fn retire(key: &FlowKey, v: &FlowValue) {
    if v.kind == FLOW_OUTBOUND
        && let Some(r) = get(&key.other_direction(v), FLOW_REVERSE)
    {
        r.set_flags(r.flags() | (v.flags & FLOW_F_CLOSING));
    }
    let _ = FLOWS.remove(key);
}

/// Mixes the flow's key into 32 bits (spreads ports and SNAT targets).
#[inline(always)]
fn hash(k: &FlowKey) -> u32 {
    const WORDS: usize = core::mem::size_of::<FlowKey>() / 4;
    let words = k as *const FlowKey as *const u32;
    let mut h: u32 = 0x9e37_79b9;
    let mut i = 0;
    while i < WORDS {
        // SAFETY: word i < 10 lies within the 40-byte key; the key is only 2-byte aligned, and
        // read_unaligned asks for no alignment (no reference to a misaligned u32 is made).
        let word = unsafe { core::ptr::read_unaligned(words.add(i)) };
        h = (h ^ word).wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        i += 1;
    }
    h ^ (h >> 16)
}

/// What a claim builds while it probes: per CPU, so that its key and entries live in map memory
/// rather than on the stack of the programs that claim, the two largest (kept on the stack,
/// LLVM held their fields in registers across each insert and spilled them one by one, and
/// those programs had a few bytes of the 512 left). Programs on one CPU do not interleave, and
/// nothing is kept from one claim to the next.
#[repr(C)]
pub struct ClaimScratch {
    rkey: FlowKey,
    reverse: FlowValue,
    outbound: FlowValue,
}

#[btf_map]
static CLAIM: PerCpuArray<ClaimScratch, 1> = PerCpuArray::new();

/// Claims a translated address and port for the new outbound connection `out` and records both
/// directions. The reverse entry goes in first with BPF_NOEXIST: that insert is the claim, so two
/// CPUs never hand out the same port towards the same remote. Returns the outbound entry.
///
/// One flat loop with a single branch per probe: nested loops with helper calls inside made the
/// verifier's path count explode.
#[inline(always)]
pub fn claim(
    out: &FlowKey,
    action: &Action,
    pool: u32,
    tunnel: [u8; 4],
) -> Result<FlowValue, Stat> {
    let h = hash(out);
    let now = crate::clock::now();
    let count = u32::from(action.snat_count).min(MAX_SNAT as u32);
    if count == 0 {
        return Err(Stat::PortExhausted);
    }
    let Some(s) = CLAIM.get_ptr_mut(0) else {
        return Err(Stat::FlowInsertFailed);
    };
    // SAFETY: this CPU's slot, valid for the run and used by this call alone (see `CLAIM`).
    let s = unsafe { &mut *s };
    s.reverse = FlowValue::new(FLOW_REVERSE, out.src, out.src_port_be, pool, tunnel, now);
    // The reply's key: the remote side is the connection's; the translated endpoint is written
    // per probe.
    s.rkey = FlowKey {
        src: out.dst,
        dst: [0; 16],
        src_port_be: out.dst_port_be,
        dst_port_be: 0,
        proto: out.proto,
        family: out.family,
        _pad: [0; 2],
    };
    let mut i = 0;
    while i < PROBES {
        // The verifier loses bounds through `%`, and LLVM drops a mask it can prove redundant;
        // black_box keeps the mask (MAX_SNAT is a power of two) so the index is provably valid.
        let idx =
            core::hint::black_box(((h >> 8).wrapping_add(i) % count) as usize) & (MAX_SNAT - 1);
        let target = &action.snat[idx];
        let range = u32::from(target.port_max.wrapping_sub(target.port_min)) + 1;
        let port = target
            .port_min
            .wrapping_add((h.wrapping_add(i / count) % range) as u16);
        s.rkey.dst = target.addr;
        s.rkey.dst_port_be = port.to_be();
        // By reference: a copy by value would land on the stack again.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let inserted = FLOWS.insert(&s.rkey, &s.reverse, BPF_NOEXIST as u64);
        if inserted.is_ok() {
            if i > 0 {
                stats::add(Stat::PortCollision, u64::from(i));
            }
            s.outbound =
                FlowValue::new(FLOW_OUTBOUND, target.addr, port.to_be(), pool, tunnel, now);
            return record_outbound(out, &s.outbound);
        }
        if inserted.err() != Some(EEXIST) {
            // Not a taken port: the table is full; probing on cannot help.
            return Err(Stat::FlowTableFull);
        }
        i += 1;
    }
    stats::add(Stat::PortCollision, u64::from(PROBES));
    Err(Stat::PortExhausted)
}

/// Inserts the outbound entry. If another CPU recorded this connection meanwhile (a
/// retransmitted first packet), its binding wins and our reverse entry is released.
#[inline(always)]
fn record_outbound(out: &FlowKey, value: &FlowValue) -> Result<FlowValue, Stat> {
    let inserted = FLOWS.insert(out, value, BPF_NOEXIST as u64);
    if inserted.is_ok() {
        return Ok(*value);
    }
    let _ = FLOWS.remove(out.other_direction(value));
    if inserted.err() != Some(EEXIST) {
        return Err(Stat::FlowTableFull);
    }
    match get(out, FLOW_OUTBOUND) {
        Some(existing) => Ok(existing.value()),
        // Not a race but a failed insert (e.g. out of memory).
        None => Err(Stat::FlowInsertFailed),
    }
}
