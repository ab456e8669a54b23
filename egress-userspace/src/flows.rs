//! The flow table from userspace: collecting expired connections.
//!
//! The datapath refreshes `last_seen_ns` on every packet of each direction; a connection expires
//! when both directions have been idle longer than its protocol's timeout (shorter once a FIN or
//! RST was seen). Both entries go together.

use std::collections::HashMap as StdHashMap;

use aya::maps::{HashMap, MapData, MapError};
use egress_common::flow::{FLOW_F_FIN, FLOW_F_RST, FLOW_FORWARDED, FlowKey, FlowValue, timeouts};

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

/// Idle timeout in ns for a connection of `proto` whose entries carry `flags` (FLOW_F_*): a RST
/// ends it soonest; after a FIN it is kept long enough that the origin's TIME_WAIT for the
/// translated tuple is over before the port is handed out again.
pub fn timeout_ns(proto: u8, flags: u8) -> u64 {
    let secs = match proto {
        6 if flags & FLOW_F_RST != 0 => timeouts::TCP_RST,
        6 if flags & FLOW_F_FIN != 0 => timeouts::TCP_FIN,
        6 => timeouts::TCP_ESTABLISHED,
        17 => timeouts::UDP,
        _ => timeouts::ICMP,
    };
    secs * NS
}

/// Whether the connection with entry `v` (and its other direction `other`, if present) has
/// been idle past its timeout at `now`.
pub fn expired(key: &FlowKey, v: &FlowValue, other: Option<&FlowValue>, now: u64) -> bool {
    let last = other.map_or(v.last_seen_ns, |o| o.last_seen_ns.max(v.last_seen_ns));
    let flags = v.flags | other.map_or(0, |o| o.flags);
    now.saturating_sub(last) > timeout_ns(key.proto, flags)
}

/// Deletes every expired connection (both directions); returns how many connections went.
pub fn collect(
    flows: &mut HashMap<MapData, FlowKey, FlowValue>,
    now: u64,
) -> Result<usize, MapError> {
    let snapshot: StdHashMap<FlowKey, FlowValue> = flows.iter().collect::<Result<_, _>>()?;
    let mut removed = 0;
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
        if expired(k, v, other, now) {
            // An entry the LRU evicted meanwhile is already gone: not an error.
            let _ = flows.remove(k);
            gone.insert(*k);
            if other.is_some() {
                let _ = flows.remove(&other_key);
                gone.insert(other_key);
            }
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use egress_common::flow::{FLOW_OUTBOUND, FLOW_REVERSE};

    use super::*;

    fn entry(kind: u8, last: u64, flags: u8) -> FlowValue {
        FlowValue {
            kind,
            last_seen_ns: last * NS,
            flags,
            ..Default::default()
        }
    }

    #[test]
    fn expiry_table() {
        let tcp = FlowKey {
            proto: 6,
            ..Default::default()
        };
        let udp = FlowKey {
            proto: 17,
            ..Default::default()
        };
        let icmp = FlowKey {
            proto: 1,
            ..Default::default()
        };
        struct Case {
            name: &'static str,
            key: FlowKey,
            v: FlowValue,
            other: Option<FlowValue>,
            now: u64,
            want: bool,
        }
        let cases = [
            Case {
                name: "tcp idle 1h-1s stays",
                key: tcp,
                v: entry(FLOW_OUTBOUND, 0, 0),
                other: None,
                now: 3599,
                want: false,
            },
            Case {
                name: "tcp idle past 1h goes",
                key: tcp,
                v: entry(FLOW_OUTBOUND, 0, 0),
                other: None,
                now: 3601,
                want: true,
            },
            Case {
                name: "tcp reset goes after 10s",
                key: tcp,
                v: entry(FLOW_OUTBOUND, 0, FLOW_F_RST),
                other: None,
                now: 11,
                want: true,
            },
            Case {
                name: "tcp reset stays 9s",
                key: tcp,
                v: entry(FLOW_OUTBOUND, 0, FLOW_F_RST),
                other: None,
                now: 9,
                want: false,
            },
            Case {
                name: "tcp after FIN is held past the origin's TIME_WAIT (60 s)",
                key: tcp,
                v: entry(FLOW_OUTBOUND, 0, FLOW_F_FIN),
                other: Some(entry(FLOW_REVERSE, 0, FLOW_F_FIN)),
                now: 119,
                want: false,
            },
            Case {
                name: "tcp after FIN goes after 120s",
                key: tcp,
                v: entry(FLOW_OUTBOUND, 0, FLOW_F_FIN),
                other: None,
                now: 121,
                want: true,
            },
            Case {
                name: "a RST seen on the reply side counts",
                key: tcp,
                v: entry(FLOW_OUTBOUND, 0, 0),
                other: Some(entry(FLOW_REVERSE, 0, FLOW_F_RST)),
                now: 11,
                want: true,
            },
            Case {
                name: "recent reply keeps an idle outbound side",
                key: udp,
                v: entry(FLOW_OUTBOUND, 0, 0),
                other: Some(entry(FLOW_REVERSE, 100, 0)),
                now: 130,
                want: false,
            },
            Case {
                name: "udp idle past 60s goes",
                key: udp,
                v: entry(FLOW_OUTBOUND, 0, 0),
                other: None,
                now: 61,
                want: true,
            },
            Case {
                name: "icmp idle past 30s goes",
                key: icmp,
                v: entry(FLOW_OUTBOUND, 0, 0),
                other: None,
                now: 31,
                want: true,
            },
            Case {
                name: "icmp idle 29s stays",
                key: icmp,
                v: entry(FLOW_OUTBOUND, 0, 0),
                other: None,
                now: 29,
                want: false,
            },
        ];
        for c in cases {
            assert_eq!(
                expired(&c.key, &c.v, c.other.as_ref(), c.now * NS),
                c.want,
                "{}",
                c.name
            );
        }
    }
}
