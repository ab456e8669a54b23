//! The flow table from userspace: collecting expired connections.
//!
//! The datapath refreshes `last_seen_ns` on every packet of each direction; a connection expires
//! when both directions have been idle longer than its timeout: by protocol, shorter once the
//! socket's side sent a FIN or the latest packet was a RST, and short while no reply was seen.
//! Both entries go together. Under pressure (the table nearly full) unreplied connections go
//! first, as conntrack's early drop: the table never evicts by itself, so an established
//! connection is never pushed out by new ones.

use std::collections::HashMap as StdHashMap;

use aya::maps::{HashMap, MapData, MapError};
use egress_common::flow::{
    FLOW_F_FIN, FLOW_F_REPLIED, FLOW_F_RST, FLOW_FORWARDED, FLOW_OUTBOUND, FlowKey, FlowValue,
    timeouts,
};

const NS: u64 = 1_000_000_000;

/// CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns().
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * NS + ts.tv_nsec as u64
}

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
        let rst_last = |a: &FlowValue, b: Option<&FlowValue>| {
            a.flags & FLOW_F_RST != 0 && b.is_none_or(|b| a.last_seen_ns >= b.last_seen_ns)
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

/// Deletes every expired connection (both directions) and, when the table of `capacity` entries
/// is under pressure, every early-droppable one.
pub fn collect(
    flows: &mut HashMap<MapData, FlowKey, FlowValue>,
    now: u64,
    capacity: u32,
) -> Result<Collected, MapError> {
    let snapshot: StdHashMap<FlowKey, FlowValue> = flows.iter().collect::<Result<_, _>>()?;
    let pressure = under_pressure(snapshot.len(), capacity);
    let mut done = Collected {
        entries: snapshot.len(),
        ..Default::default()
    };
    let mut gone = std::collections::HashSet::new();
    for (k, v) in &snapshot {
        if gone.contains(k) {
            continue;
        }
        let other_key = k.other_direction(v);
        // A forwarded connection has a single entry here (the peer holds the translation). The
        // other entry must point back: after a reopened tuple, an old reverse entry and the new
        // outbound entry share a key but are different connections.
        let other = snapshot.get(&other_key).filter(|o| {
            v.kind != FLOW_FORWARDED && o.kind != v.kind && other_key.other_direction(o) == *k
        });
        let why = if expired(k, v, other, now) {
            &mut done.expired
        } else if pressure && early_droppable(v, other, now) {
            &mut done.early_dropped
        } else {
            continue;
        };
        // The snapshot is old by now: a packet since then means the connection lives on.
        if moved(flows, k, v) || other.is_some_and(|o| moved(flows, &other_key, o)) {
            continue;
        }
        let _ = flows.remove(k);
        gone.insert(*k);
        if other.is_some() {
            let _ = flows.remove(&other_key);
            gone.insert(other_key);
        }
        *why += 1;
    }
    Ok(done)
}

/// Connections translated here per peer: the outbound entries naming it as their tunnel.
pub fn peer_load(
    entries: impl IntoIterator<Item = FlowValue>,
) -> std::collections::BTreeMap<std::net::Ipv4Addr, u64> {
    let mut load = std::collections::BTreeMap::new();
    for v in entries {
        if v.kind == FLOW_OUTBOUND && v.tunnel != [0; 4] {
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
                "a reply's RST as the latest packet counts",
                6,
                out(0, 0),
                Some(rev(1, R | FLOW_F_RST)),
                12,
                true,
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
