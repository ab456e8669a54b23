//! The flow table from userspace: collecting expired connections.
//!
//! The datapath refreshes `last_seen_ns` on every packet of each direction; a connection expires
//! when both directions have been idle longer than its timeout: by protocol, shorter once the
//! socket's side sent a FIN or the latest packet was a RST, and short while no reply was seen.
//! Both entries go together. Under pressure (the table nearly full) unreplied connections go
//! first, as conntrack's early drop: the table never evicts by itself, so an established
//! connection is never pushed out by new ones.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::maps::{HashMap, IterableMap as _, MapData, MapError};
use egress_common::flow::{
    FLOW_F_FIN, FLOW_F_REPLIED, FLOW_F_RST, FLOW_FORWARDED, FLOW_OUTBOUND, FLOW_REVERSE, FlowKey,
    FlowValue, timeouts,
};

const NS: u64 = 1_000_000_000;

/// CLOCK_MONOTONIC in ns: the clock of the entries' stamps (the programs' coarse clock, which
/// is never ahead of this one, so `now - stamp` never goes negative; see
/// `egress_common::clock`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * NS + ts.tv_nsec as u64
}

/// How far two CPUs' datapath clocks may be apart: each is at most two ticks behind
/// CLOCK_MONOTONIC (20 ms at HZ=100, the slowest tick).
const CPU_CLOCK_SKEW_NS: u64 = 20_000_000;

/// How a connection stands, from its entries' flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// A reply was seen.
    pub replied: bool,
    /// The socket's side sent a FIN.
    pub fin: bool,
    /// The latest packet of the connection was a RST.
    pub rst: bool,
}

impl State {
    /// The state of the connection with entry `v` and, if present, its other direction `other`.
    pub fn of(v: &FlowValue, other: Option<&FlowValue>) -> State {
        let replied = (v.flags | other.map_or(0, |o| o.flags)) & FLOW_F_REPLIED != 0;
        // The RST bit says the latest packet in that direction was a RST; it ends the
        // connection only if nothing came after it in the other direction either.
        // (A RST always stamps its entry; the other's clock may come from another CPU's,
        // up to two ticks apart: a reply within that of the RST does not count as after it.)
        let rst_last = |a: &FlowValue, b: Option<&FlowValue>| {
            a.flags & FLOW_F_RST != 0
                && b.is_none_or(|b| a.last_seen_ns + CPU_CLOCK_SKEW_NS >= b.last_seen_ns)
        };
        let rst = rst_last(v, other) || other.is_some_and(|o| rst_last(o, Some(v)));
        // Only the socket's side's FIN counts (the outbound entry of a pair; a single entry's
        // own flag): a reply's FIN is anyone's to spoof.
        let fin = match other {
            None => v.flags & FLOW_F_FIN != 0,
            Some(o) => [v, o]
                .iter()
                .any(|e| e.kind == FLOW_OUTBOUND && e.flags & FLOW_F_FIN != 0),
        };
        State { replied, fin, rst }
    }
}

/// Idle timeout in ns of a connection of `proto` in `state`: a RST ends it soonest; after a FIN
/// it is kept long enough that the origin's TIME_WAIT for the translated tuple is over before
/// the port is handed out again; without a reply, it is short.
pub fn timeout_ns(proto: u8, state: State) -> u64 {
    let secs = match proto {
        6 if state.rst => timeouts::TCP_RST,
        6 if state.fin => timeouts::TCP_FIN,
        6 => timeouts::TCP_ESTABLISHED,
        17 => timeouts::UDP,
        _ => timeouts::ICMP,
    };
    let secs = if state.replied {
        secs
    } else {
        secs.min(timeouts::UNREPLIED)
    };
    secs * NS
}

/// The latest packet of the connection in either direction.
fn last_seen(v: &FlowValue, other: Option<&FlowValue>) -> u64 {
    other.map_or(v.last_seen_ns, |o| o.last_seen_ns.max(v.last_seen_ns))
}

/// Whether the connection with entry `v` (and its other direction `other`, if present) has
/// been idle past its timeout at `now`.
pub fn expired(key: &FlowKey, v: &FlowValue, other: Option<&FlowValue>, now: u64) -> bool {
    let state = State::of(v, other);
    now.saturating_sub(last_seen(v, other)) > timeout_ns(key.proto, state)
}

/// Whether the connection is a candidate for early drop at `now`: no reply yet and idle for
/// [`timeouts::EARLY_DROP_IDLE`].
pub fn early_droppable(v: &FlowValue, other: Option<&FlowValue>, now: u64) -> bool {
    !State::of(v, other).replied
        && now.saturating_sub(last_seen(v, other)) >= timeouts::EARLY_DROP_IDLE * NS
}

/// Whether `entries` of `capacity` is pressure enough for early drop.
pub fn under_pressure(entries: usize, capacity: u32) -> bool {
    entries as u64 * 1000 >= u64::from(capacity) * timeouts::EARLY_DROP_PER_MILLE
}

/// What one collection removed (connections, each with all its entries).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Idle past their timeout.
    pub expired: usize,
    /// Unreplied, removed early because the table was under pressure.
    pub early_dropped: usize,
    /// Entries in the table when the pass began.
    pub entries: usize,
}

/// The flow table as read at one moment; sorted by key when a connection's other entry must be
/// found (binary search): the whole costs the entries themselves (88 bytes each), nothing more.
pub struct Snapshot {
    entries: Vec<(FlowKey, FlowValue)>,
    sorted: bool,
    /// Read with BPF_MAP_LOOKUP_BATCH (else key by key).
    pub batched: bool,
}

/// Entries read per batch.
const BATCH: usize = 4096;
/// BPF_MAP_LOOKUP_BATCH.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// `union bpf_attr` as BPF_MAP_*_BATCH reads it.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// A key's bytes: the snapshot's order (one memcmp per comparison).
fn order(k: &FlowKey) -> &[u8; 40] {
    // SAFETY: FlowKey is repr(C), 40 bytes of integers and explicit padding (size asserted in
    // egress-common); the bytes are only compared.
    unsafe { &*(k as *const FlowKey as *const [u8; 40]) }
}

/// Ports of one address, one bit each.
#[derive(Debug, Clone)]
pub struct PortSet(Box<[u64; 1024]>);

impl Default for PortSet {
    fn default() -> Self {
        PortSet(Box::new([0; 1024]))
    }
}

impl PortSet {
    pub fn insert(&mut self, port: u16) {
        self.0[usize::from(port >> 6)] |= 1 << (port & 63);
    }

    /// Ports set in `first..=last`.
    pub fn count_in(&self, first: u16, last: u16) -> u32 {
        (first..=last)
            .filter(|p| self.0[usize::from(p >> 6)] & (1 << (p & 63)) != 0)
            .count() as u32
    }
}

impl Snapshot {
    /// Reads every entry of `map`: in batches of [`BATCH`] (one syscall each), or key by key
    /// where the kernel cannot batch.
    pub fn read(flows: &HashMap<MapData, FlowKey, FlowValue>) -> Result<Snapshot, MapError> {
        let (entries, batched) = match dump_batched(flows.map()) {
            Ok(e) => (e, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                (flows.iter().collect::<Result<_, _>>()?, false)
            }
            Err(io_error) => {
                return Err(MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_lookup_batch",
                    io_error,
                }));
            }
        };
        Ok(Snapshot {
            entries,
            sorted: false,
            batched,
        })
    }

    /// Sorts by key (once), so that [`Snapshot::get`] can search.
    pub fn sort(&mut self) {
        if !self.sorted {
            self.entries
                .sort_unstable_by(|(a, _), (b, _)| order(a).cmp(order(b)));
            self.sorted = true;
        }
    }

    /// The entry of `k`, as read (the snapshot must be sorted).
    pub fn get(&self, k: &FlowKey) -> Option<&FlowValue> {
        debug_assert!(self.sorted, "Snapshot::get before sort");
        self.entries
            .binary_search_by(|(e, _)| order(e).cmp(order(k)))
            .ok()
            .map(|i| &self.entries[i].1)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &(FlowKey, FlowValue)> {
        self.entries.iter()
    }

    /// The other direction of entry `k`/`v`, if present and pointing back (a forwarded
    /// connection has a single entry here; after a reopened tuple an old reverse entry and the
    /// new outbound entry share a key but are different connections).
    fn other(&self, k: &FlowKey, v: &FlowValue) -> Option<(FlowKey, &FlowValue)> {
        if v.kind == FLOW_FORWARDED {
            return None;
        }
        let other_key = k.other_direction(v);
        self.get(&other_key)
            .filter(|o| o.kind != v.kind && other_key.other_direction(o) == *k)
            .map(|o| (other_key, o))
    }
}

/// Every entry of the flow table, as the kernel hands them out in batches (unsorted): the
/// baseline a pass is measured against.
pub fn dump(
    flows: &HashMap<MapData, FlowKey, FlowValue>,
) -> std::io::Result<Vec<(FlowKey, FlowValue)>> {
    dump_batched(flows.map())
}

/// Every entry of the hash map `map`, BPF_MAP_LOOKUP_BATCH at a time.
fn dump_batched(map: &MapData) -> std::io::Result<Vec<(FlowKey, FlowValue)>> {
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let mut keys = vec![FlowKey::default(); BATCH];
    let mut values = vec![FlowValue::default(); BATCH];
    let mut out = Vec::new();
    // The batch cursor of a hash map is a bucket index (u32); 8 bytes leave room.
    let (mut cursor_in, mut cursor_out) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &cursor_in as *const u64 as u64
            },
            out_batch: &mut cursor_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd,
            ..Default::default()
        };
        // SAFETY: the attribute points at buffers of BATCH keys and values, and at the cursors;
        // all outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = (rc < 0).then(std::io::Error::last_os_error);
        let n = (attr.count as usize).min(BATCH);
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match err {
            None => {}
            // The end of the table.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Some(e) => return Err(e),
        }
        cursor_in = cursor_out;
        first = false;
    }
}

/// What one pass over the flow table found and did.
#[derive(Debug, Clone, Default)]
pub struct Pass {
    pub collected: Collected,
    /// Entries left, by kind.
    pub by_kind: BTreeMap<&'static str, i64>,
    /// Ports in use per pool address (reverse entries are keyed by the translated port).
    pub in_use: BTreeMap<[u8; 4], PortSet>,
    /// Connections translated here per peer.
    pub peer_load: BTreeMap<Ipv4Addr, u64>,
    /// Wall time of the pass.
    pub took: std::time::Duration,
    /// The buckets of every entry's destination (as read, also those then collected) and the
    /// agent's count of plan writes before the read began ([`crate::filter`]).
    pub destinations: crate::filter::Buckets,
    pub plan_writes: u64,
}

/// One pass: reads the table once, collects what expired (and, under pressure, what never saw
/// a reply), and counts what is left.
pub fn pass(
    flows: &mut HashMap<MapData, FlowKey, FlowValue>,
    now: u64,
    capacity: u32,
) -> Result<Pass, MapError> {
    let t0 = std::time::Instant::now();
    let mut snapshot = Snapshot::read(flows)?;
    let (collected, gone) = collect_in(flows, &mut snapshot, now, capacity);
    let mut p = Pass {
        collected,
        ..Default::default()
    };
    for (k, _) in snapshot.iter() {
        p.destinations.add_addr(k.family, &k.dst);
    }
    // Outbound, reverse, forwarded.
    let mut kinds = [0i64; 3];
    for (i, (k, v)) in snapshot.iter().enumerate() {
        if gone[i] {
            continue;
        }
        match v.kind {
            FLOW_OUTBOUND => kinds[0] += 1,
            FLOW_REVERSE => kinds[1] += 1,
            FLOW_FORWARDED => kinds[2] += 1,
            _ => continue,
        }
        if v.kind == FLOW_REVERSE && k.family == 4 {
            p.in_use
                .entry([k.dst[0], k.dst[1], k.dst[2], k.dst[3]])
                .or_default()
                .insert(u16::from_be(k.dst_port_be));
        }
    }
    p.peer_load = peer_load(
        snapshot
            .iter()
            .zip(&gone)
            .filter(|(_, gone)| !**gone)
            .map(|((_, v), _)| *v),
    );
    p.by_kind = [
        ("outbound", kinds[0]),
        ("reverse", kinds[1]),
        ("forwarded", kinds[2]),
    ]
    .into();
    p.took = t0.elapsed();
    Ok(p)
}

/// Deletes every expired connection (both directions) and, when the table of `capacity` entries
/// is under pressure, every early-droppable one.
pub fn collect(
    flows: &mut HashMap<MapData, FlowKey, FlowValue>,
    now: u64,
    capacity: u32,
) -> Result<Collected, MapError> {
    let mut snapshot = Snapshot::read(flows)?;
    Ok(collect_in(flows, &mut snapshot, now, capacity).0)
}

/// [`collect`] from a snapshot; also says which of its entries went.
fn collect_in(
    flows: &mut HashMap<MapData, FlowKey, FlowValue>,
    snapshot: &mut Snapshot,
    now: u64,
    capacity: u32,
) -> (Collected, Vec<bool>) {
    let pressure = under_pressure(snapshot.len(), capacity);
    // An entry seen more recently than the shortest timeout stays whatever its other entry
    // says, unless early drop is on: only the others need that entry looked up.
    let settled =
        |v: &FlowValue| !pressure && now.saturating_sub(v.last_seen_ns) <= timeouts::TCP_RST * NS;
    if snapshot.iter().all(|(_, v)| settled(v)) {
        return (
            Collected {
                entries: snapshot.len(),
                ..Default::default()
            },
            vec![false; snapshot.len()],
        );
    }
    snapshot.sort();
    let mut done = Collected {
        entries: snapshot.len(),
        ..Default::default()
    };
    let mut gone = vec![false; snapshot.len()];
    for (i, (k, v)) in snapshot.iter().enumerate() {
        if gone[i] {
            continue;
        }
        if settled(v) {
            continue;
        }
        let other = snapshot.other(k, v);
        let other_v = other.map(|(_, o)| o);
        let why = if expired(k, v, other_v, now) {
            &mut done.expired
        } else if pressure && early_droppable(v, other_v, now) {
            &mut done.early_dropped
        } else {
            continue;
        };
        // The snapshot is old by now: a packet since then means the connection lives on.
        if moved(flows, k, v) || other.is_some_and(|(ok, o)| moved(flows, &ok, o)) {
            continue;
        }
        let _ = flows.remove(k);
        gone[i] = true;
        if let Some((ok, _)) = other {
            let _ = flows.remove(&ok);
            if let Ok(j) = snapshot
                .entries
                .binary_search_by(|(e, _)| order(e).cmp(order(&ok)))
            {
                gone[j] = true;
            }
        }
        *why += 1;
    }
    (done, gone)
}

/// Connections translated here per peer: the reverse entries naming it as their tunnel (each
/// claim makes exactly one, and a reopened tuple's old one still holds its port).
pub fn peer_load(
    entries: impl IntoIterator<Item = FlowValue>,
) -> std::collections::BTreeMap<std::net::Ipv4Addr, u64> {
    let mut load = std::collections::BTreeMap::new();
    for v in entries {
        if v.kind == FLOW_REVERSE && v.tunnel != [0; 4] {
            *load.entry(std::net::Ipv4Addr::from(v.tunnel)).or_default() += 1;
        }
    }
    load
}

/// Whether entry `k` saw a packet since `was` was read (or is gone).
pub fn moved(flows: &HashMap<MapData, FlowKey, FlowValue>, k: &FlowKey, was: &FlowValue) -> bool {
    flows
        .get(k, 0)
        .map_or(true, |now| now.last_seen_ns != was.last_seen_ns)
}

/// Removes every entry of connections through any of `peers` (forwarded to one, or its own
/// connections translated here): their translation state died with it. One pass over the
/// table whatever the number of peers (a data center going down at once). Returns, per peer,
/// the connections (their socket-side entries) that went.
pub fn remove_peers(
    flows: &mut HashMap<MapData, FlowKey, FlowValue>,
    peers: &[[u8; 4]],
) -> Result<Vec<Vec<(FlowKey, FlowValue)>>, MapError> {
    // Read in batches, as the collector does: key by key costs two syscalls per entry, seconds
    // over a full table on the agent's loop.
    let doomed: Vec<(usize, FlowKey, FlowValue)> = Snapshot::read(flows)?
        .iter()
        .filter_map(|(k, v)| Some((peers.iter().position(|p| *p == v.tunnel)?, *k, *v)))
        .collect();
    let mut removed = vec![Vec::new(); peers.len()];
    for (i, k, v) in doomed {
        // Gone already (its other direction's removal, or the collector) is fine.
        if flows.remove(&k).is_ok() && v.kind != FLOW_REVERSE {
            removed[i].push((k, v));
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use egress_common::flow::{FLOW_OUTBOUND, FLOW_REVERSE};

    use super::*;

    const R: u8 = FLOW_F_REPLIED;

    fn entry(kind: u8, last: u64, flags: u8) -> FlowValue {
        FlowValue {
            kind,
            last_seen_ns: last * NS,
            flags,
            ..Default::default()
        }
    }

    fn out(last: u64, flags: u8) -> FlowValue {
        entry(FLOW_OUTBOUND, last, flags)
    }

    fn rev(last: u64, flags: u8) -> FlowValue {
        entry(FLOW_REVERSE, last, flags)
    }

    fn key(proto: u8) -> FlowKey {
        FlowKey {
            proto,
            ..Default::default()
        }
    }

    #[test]
    fn expiry_table() {
        struct Case {
            name: &'static str,
            proto: u8,
            v: FlowValue,
            other: Option<FlowValue>,
            now: u64,
            want: bool,
        }
        let case = |name, proto, v, other, now, want| Case {
            name,
            proto,
            v,
            other,
            now,
            want,
        };
        let cases = [
            case(
                "tcp idle 1h-1s stays",
                6,
                out(0, 0),
                Some(rev(0, R)),
                3599,
                false,
            ),
            case(
                "tcp idle past 1h goes",
                6,
                out(0, 0),
                Some(rev(0, R)),
                3601,
                true,
            ),
            case(
                "tcp without a reply goes after 30 s",
                6,
                out(0, 0),
                Some(rev(0, 0)),
                31,
                true,
            ),
            case(
                "tcp without a reply stays 29 s",
                6,
                out(0, 0),
                Some(rev(0, 0)),
                29,
                false,
            ),
            case(
                "a RST last goes after 10 s",
                6,
                out(0, R | FLOW_F_RST),
                None,
                11,
                true,
            ),
            case(
                "a RST last stays 9 s",
                6,
                out(0, R | FLOW_F_RST),
                None,
                9,
                false,
            ),
            case(
                "the socket's RST as the latest packet counts",
                6,
                out(1, FLOW_F_RST),
                Some(rev(0, R)),
                12,
                true,
            ),
            case(
                "a reply a CPU's clock skew after the socket's RST does not outlive it",
                6,
                out(10, FLOW_F_RST),
                Some(FlowValue {
                    last_seen_ns: 10 * NS + 15_000_000,
                    ..rev(0, R)
                }),
                21,
                true,
            ),
            case(
                "a reply well after the socket's RST keeps the connection",
                6,
                out(10, FLOW_F_RST),
                Some(FlowValue {
                    last_seen_ns: 10 * NS + 50_000_000,
                    ..rev(0, R)
                }),
                21,
                false,
            ),
            case(
                "a RST answered by the socket (challenge ACK) does not",
                6,
                out(2, 0),
                Some(rev(1, R | FLOW_F_RST)),
                100,
                false,
            ),
            case(
                "after the socket's FIN the tuple is held past the origin's TIME_WAIT",
                6,
                out(0, FLOW_F_FIN),
                Some(rev(0, R)),
                119,
                false,
            ),
            case(
                "after the socket's FIN it goes after 120 s",
                6,
                out(0, FLOW_F_FIN),
                Some(rev(0, R)),
                121,
                true,
            ),
            case(
                "a reply's FIN alone does not shorten the timeout",
                6,
                rev(0, R | FLOW_F_FIN),
                Some(out(0, 0)),
                121,
                false,
            ),
            case(
                "a forwarded entry's own FIN counts",
                6,
                entry(FLOW_FORWARDED, 0, R | FLOW_F_FIN),
                None,
                121,
                true,
            ),
            case(
                "recent reply keeps an idle outbound side",
                17,
                out(0, 0),
                Some(rev(100, R)),
                130,
                false,
            ),
            case(
                "udp idle past 60 s goes",
                17,
                out(0, 0),
                Some(rev(0, R)),
                61,
                true,
            ),
            case(
                "icmp idle past 30 s goes",
                1,
                out(0, 0),
                Some(rev(0, R)),
                31,
                true,
            ),
            case(
                "icmp idle 29 s stays",
                1,
                out(0, 0),
                Some(rev(0, R)),
                29,
                false,
            ),
        ];
        for c in cases {
            assert_eq!(
                expired(&key(c.proto), &c.v, c.other.as_ref(), c.now * NS),
                c.want,
                "{}",
                c.name
            );
        }
    }

    #[test]
    fn early_drop_takes_only_unreplied_idle_connections_under_pressure() {
        assert!(early_droppable(&out(0, 0), Some(&rev(0, 0)), NS));
        assert!(
            !early_droppable(&out(0, 0), Some(&rev(0, R)), 100 * NS),
            "replied"
        );
        assert!(
            !early_droppable(&out(0, 0), Some(&rev(0, 0)), NS / 2),
            "active"
        );
        assert!(!under_pressure(874, 1000));
        assert!(under_pressure(875, 1000));
        assert!(under_pressure(1000, 1000));
    }
}
