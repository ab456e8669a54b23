//! Differential test: the real TC programs (BPF_PROG_TEST_RUN) against an independent model of
//! the README's "Datapath rules" (`tests/model/`), on seeded random topologies, flow tables and
//! packets. Every case must agree byte for byte on verdict, output packet, the counter that
//! moved and the flow-table changes, and every output must keep the invariants (checksums,
//! pool sources towards policy destinations, drops counted). A case is a flow table and one or
//! more packets run one after another through the same datapath (a fragmented datagram: first
//! and later fragments, in order or not); the model's `FRAGS` follows the sequence, the
//! programs' is not read. Counters are compared by name: one the programs lack (e.g.
//! `fragment_followed` before fragments are implemented) is a disagreement. A few cases run
//! with an odd plan (`ACTIONS` the planner never writes: a forward without next hops, an
//! unknown kind, a pool without actions), with `LOCAL` not written or with `LOCAL`'s *fenced*
//! set (the programs' map and the model's `World` alike); all are put back after the case.
//!
//! Coverage floor (default mode: all cases, at least the default number): the model may be
//! silent on at most `MAX_SILENT_PERCENT` of the steps, and every rule family (`families`, and
//! the facts the model notes of its decisions: `Outcome::notes`, e.g. an address held whole
//! whose SYN was clamped, a destination no policy covers under a catch-all, an ICMP error with
//! padding past its IP length, a packet passed by its sent hint without a reverse entry; and
//! an egress step carrying the sent hint's word without its packet's tag, by what the rules
//! did with it: `leftover_family`) needs `FAMILY_FLOOR` agreeing steps; the per-family counts
//! are printed.
//!
//! Environment:
//! - `EGRESS_DIFF_SEED` (decimal or 0x-hex), `EGRESS_DIFF_CASES`: seed and number of cases;
//! - `EGRESS_DIFF_CASE=N`: run only case N of that seed, verbosely (replay);
//! - `EGRESS_DIFF_REPORT=1`: run every case and print a table of disagreement classes with one
//!   example each instead of stopping at the first.

#[path = "differential/cases.rs"]
mod cases;
#[path = "differential/check.rs"]
mod check;
mod common;
mod model;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    time::Instant,
};

use cases::{Case, Rng, Step, Topo};
use egress::testrun::{self, GATEWAY_MAC, Hint, PEER_MAC, TestDatapath, TestNet};
use egress_common::{
    action::{Action, ActionKey},
    fabric::{SENT_HINT, SENT_HINT_CB, SENT_TAG_CB},
    flow::{FLOW_F_CLOSING, FLOW_FORWARDED, FLOW_OUTBOUND, FLOW_REVERSE, FlowKey, FlowValue},
    stats::Stat,
};
use model::{Answer, Choices, Env, Flows, Frags, Hook, Outcome, Verdict, World};

const DEFAULT_SEED: u64 = 0xe9e5_5eed;
const DEFAULT_CASES: usize = 20_000;
/// Cases in a row on one topology (switching rewrites the plan maps).
const CASES_PER_TOPOLOGY: usize = 50;
const GENERATED_TOPOLOGIES: usize = 5;
const TC_ACT_REDIRECT: u32 = 7;
/// At most this share of the steps run may be ones the model is silent on (default mode).
const MAX_SILENT_PERCENT: f64 = 5.0;
/// Agreeing steps each rule family needs in default mode.
const FAMILY_FLOOR: usize = 36;

/// VLAN tags in an input frame's data, as the rules read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tags {
    Untagged,
    /// One or two tags (TPID 0x8100 or 0x88a8), IPv4/IPv6 after them.
    ReadThrough,
    /// A third tag (0x8100 or 0x88a8 after two of them): malformed.
    ThirdTag,
    /// An odd TPID, untagged or after one or two tags (or a frame ending inside a tag): not IP.
    NotIp,
}

fn tags_of(p: &[u8]) -> Tags {
    use model::wire::L2;
    if p.len() < 14 {
        return Tags::Untagged;
    }
    match model::wire::l2(p) {
        L2::Read {
            ethertype: 0x0800 | 0x86dd,
            tags: 0,
            ..
        } => Tags::Untagged,
        L2::Read {
            ethertype: 0x0800 | 0x86dd,
            ..
        } => Tags::ReadThrough,
        L2::Read {
            ethertype, tags, ..
        } if tags > 0 || cases::ODD_TPIDS.contains(&ethertype) => Tags::NotIp,
        L2::Read { .. } => Tags::Untagged,
        L2::ThirdTag => Tags::ThirdTag,
        L2::Short => Tags::NotIp,
    }
}

/// The rule families an agreeing outcome belongs to (counter, the model's rule; the input
/// frame's VLAN tags, whether its IP header left rewritten with the tags it came with, and
/// whether the case ran with `LOCAL`'s *fenced* set).
fn families(
    counter: &str,
    rule: &str,
    tags: Tags,
    rewritten: bool,
    fenced: bool,
) -> Vec<&'static str> {
    let mut f = Vec::new();
    let reply = matches!(counter, "reverse_nat" | "reply_reencap");
    for (yes, name) in [
        (counter == "snat_new", "egress SNAT new"),
        (counter == "snat_established", "egress SNAT established"),
        (counter.starts_with("forward_"), "egress forward"),
        (
            reply && rule.starts_with("ingress"),
            "reverse NAT (plain ingress)",
        ),
        (
            reply && rule.starts_with("tunnel"),
            "tunnel reply (reverse entry)",
        ),
        (counter == "peer_snat", "tunnel peer SNAT"),
        (counter == "forwarded_reply", "tunnel forwarded reply"),
        (counter == "soft_unicast", "soft-unicast"),
        (
            counter == "drop_owner_down",
            "soft-unicast to an owner down",
        ),
        (
            rule == "tunnel 6: probe request",
            "tunnel probe request echoed",
        ),
        (
            rule == "tunnel 6: probe request, fenced",
            "tunnel probe request echoed while fenced (pool bits 3)",
        ),
        (rule == "tunnel 6: probe reply", "tunnel probe reply passed"),
        (
            rule == "tunnel 6: probe reply, fenced",
            "tunnel probe reply, fenced (pool bits 3), passed",
        ),
        (
            fenced && counter == "peer_snat",
            "LOCAL fenced: a peer's connection translated as usual",
        ),
        (
            fenced && !rule.starts_with("tunnel 6"),
            "LOCAL fenced: any rule but probes, as usual",
        ),
        (rule.starts_with("icmp"), "ICMP errors"),
        (rule.starts_with("fragments"), "fragments"),
        (
            counter.starts_with("drop_") || counter == "egress_malformed",
            "drops",
        ),
        (
            rule == "tunnel 5: to a pool address",
            "tunnel stray to a pool address",
        ),
        (
            rule == "tunnel 5: another peer's outbound entry",
            "tunnel another peer's tuple",
        ),
        (
            rule == "fragments 3: egress, only an arriving entry",
            "egress fragment under only an arriving entry (a peer's source): not followed",
        ),
        (counter == "drop_tunnel_kind", "tunnel key of another kind"),
        (
            counter == "drop_reply_shaped",
            "egress packet shaped like a reply (reverse entry)",
        ),
        (
            counter == "drop_no_hops",
            "odd plan: a forward action without next hops",
        ),
        (
            counter == "drop_bad_action",
            "odd plan: an action of an unknown kind",
        ),
        (
            counter == "drop_not_configured",
            "LOCAL not written: a packet to encapsulate dropped",
        ),
        (counter == "drop_ttl_exceeded", "hop with TTL 0 or 1"),
        (
            tags == Tags::ReadThrough,
            "VLAN-tagged frame, IP read through the tags",
        ),
        (
            tags == Tags::ReadThrough && rewritten,
            "VLAN-tagged frame rewritten, tags kept",
        ),
        (
            counter == "drop_vlan_tunnel" && !rule.starts_with("tunnel 1"),
            "drop_vlan_tunnel: tagged frame not encapsulated",
        ),
        (
            counter == "drop_vlan_tunnel" && rule.starts_with("tunnel 1"),
            "drop_vlan_tunnel: tagged GRE (tunnel rule 1)",
        ),
        (
            tags == Tags::ThirdTag && counter.ends_with("_malformed"),
            "VLAN: a third tag, malformed",
        ),
        (
            tags == Tags::NotIp && counter.ends_with("_not_ip"),
            "VLAN: an odd TPID (untagged or after a tag), not IP",
        ),
        (
            rule == "egress 1: IP length beyond the frame",
            "IP length beyond the frame: dropped on egress (egress_malformed)",
        ),
        (
            rule == "ingress 1: IP length beyond the frame",
            "IP length beyond the frame: passed on ingress (ingress_malformed)",
        ),
    ] {
        if yes {
            f.push(name);
        }
    }
    f
}
const UNTESTABLE: &str = "BPF_PROG_TEST_RUN refuses the packet (EINVAL): not run";

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    Some(match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).unwrap_or_else(|e| panic!("{name}={v}: {e}")),
        None => v.parse().unwrap_or_else(|e| panic!("{name}={v}: {e}")),
    })
}

fn hex(p: &[u8]) -> String {
    p.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the programs did.
struct Real {
    verdict: u32,
    packet: Vec<u8>,
    /// The sent hint's words of the skb's control block after the run; None when `xdp_ingress`
    /// finished the packet (no skb, no control block).
    hint: Option<Hint>,
    /// Whether that is the ingress program's own hint on the packet it returned (the word and
    /// the tag of the packet's tuple).
    hinted_after: Option<bool>,
    /// Counters that moved (packets), `*_seen` excluded.
    moved: BTreeMap<&'static str, u64>,
    flows: Flows,
}

fn counters(dp: &TestDatapath) -> Vec<u64> {
    Stat::ALL.iter().map(|s| dp.counter(*s)).collect()
}

/// The flow table a case starts from (later entries of the same key win, as in the map).
fn dp_flows_or(c: &Case) -> Flows {
    c.flows.iter().copied().collect()
}

/// Whether the pass filter passes the untagged frame `packet`'s destination at once (None: no
/// whole IP destination in it).
fn filter_passes(dp: &mut TestDatapath, packet: &[u8]) -> Option<bool> {
    let mut dst = [0u8; 16];
    let family = match packet.get(12..14)? {
        [0x08, 0x00] => {
            dst[..4].copy_from_slice(packet.get(30..34)?);
            4
        }
        [0x86, 0xdd] => {
            dst.copy_from_slice(packet.get(38..54)?);
            6
        }
        _ => return None,
    };
    Some(
        dp.maps
            .plan
            .filter
            .passes(family, &dst)
            .expect("PASS_FILTER read"),
    )
}

/// Writes `ACTIONS` entries (generation-0 keys; `None`: removed) into the generation in force.
fn put_actions(dp: &mut TestDatapath, entries: &[(ActionKey, Option<Action>)]) {
    use egress::apply::{GenerationCell, InGeneration, Table as _};
    let generation = GenerationCell::get(&dp.maps.plan.generation).expect("GENERATION read");
    let mut t = InGeneration {
        table: &mut dp.maps.plan.actions,
        generation,
    };
    for (k, a) in entries {
        match a {
            Some(a) => t.put(k, a),
            None => t.delete(k),
        }
        .expect("ACTIONS written");
    }
}

fn flows_of(dp: &TestDatapath) -> Flows {
    dp.maps
        .flows
        .iter()
        .map(|r| r.expect("FLOWS iterates"))
        .collect()
}

fn set_flows(dp: &mut TestDatapath, entries: &[(FlowKey, FlowValue)]) {
    let keys: Vec<FlowKey> = dp
        .maps
        .flows
        .keys()
        .map(|k| k.expect("FLOWS keys"))
        .collect();
    for k in keys {
        dp.maps.flows.remove(&k).expect("FLOWS remove");
    }
    for (k, v) in entries {
        dp.maps.flows.insert(k, v, 0).expect("FLOWS insert");
    }
}

/// The outcome of the step's hook on `packet`. About half the ingress packets (by a hash of
/// their bytes: a replay takes the same way) run as on an uplink with `egress agent --xdp`:
/// `xdp_ingress` first, `tc_ingress` only for what it leaves; an XDP verdict is given as the
/// TC verdict of the same meaning. The rules are the same either way.
/// The second value: `xdp_ingress` finished the packet.
fn run_hooks(
    dp: &mut TestDatapath,
    s: &Step,
    hint: Hint,
    packet: &[u8],
) -> anyhow::Result<(testrun::Outcome, bool)> {
    if !s.ingress {
        return Ok((
            dp.run_hinted(testrun::Hook::Egress, s.mark, hint, packet)?,
            false,
        ));
    }
    let hash = packet
        .iter()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(*b)));
    if hash % 2 == 1 {
        let mut x = dp.run(testrun::Hook::Xdp, s.mark, packet)?;
        if x.verdict != testrun::XDP_PASS || x.xdp_done {
            x.verdict = match x.verdict {
                testrun::XDP_PASS => testrun::TC_ACT_OK,
                testrun::XDP_TX => TC_ACT_REDIRECT,
                _ => testrun::TC_ACT_SHOT,
            };
            return Ok((x, true));
        }
        assert_eq!(
            x.packet, packet,
            "xdp_ingress changed a packet it left to TC"
        );
    }
    Ok((dp.run(testrun::Hook::Ingress, s.mark, packet)?, false))
}

/// The sent hint on an egress step's own packet (by a hash of the packet, so a replay takes the
/// same): one in eight the ingress program's own for it (the word and the packet's tag, which
/// passes it whatever the state), one in eight the word alone, as if the stack had left those
/// bytes in the control block (which counts for nothing), with every kind of flow entry.
/// Packets of established connections — a peer's translated here (its reverse entry: rule 5
/// passes the word alone by the lookup) and local ones (an outbound entry: rule 3 would
/// translate what the genuine hint passes) — take two in eight and three in eight, so that
/// both meet the hint often enough for the coverage floor.
fn stack_hint(dp: &TestDatapath, s: &Step) -> Hint {
    let hash = s
        .packet
        .iter()
        .fold(7u32, |h, b| h.wrapping_mul(33).wrapping_add(u32::from(*b)));
    let established = s.class.starts_with("egress already translated")
        || s.class.starts_with("egress established");
    let (genuine, leftover) = if established { (2, 3) } else { (1, 1) };
    match hash % 8 {
        _ if s.ingress => Hint::NONE,
        h if h < genuine => dp.hint_for(&s.packet),
        h if h < genuine + leftover => Hint::LEFTOVER,
        _ => Hint::NONE,
    }
}

/// None: BPF_PROG_TEST_RUN refuses the packet (e.g. an IPv6 frame cut inside the header).
fn run_real(dp: &mut TestDatapath, s: &Step, hint: Hint, packet: &[u8]) -> Option<Real> {
    let before = counters(dp);
    let (out, in_xdp) = match run_hooks(dp, s, hint, packet) {
        Ok(r) => r,
        Err(e) if format!("{e:#}").contains("os error 22") => return None,
        Err(e) => panic!("BPF_PROG_TEST_RUN of {}: {e:#}", hex(packet)),
    };
    let after = counters(dp);
    let moved = Stat::ALL
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(s, (b, a))| {
            a != b && !matches!(s, Stat::EgressSeen | Stat::IngressSeen | Stat::XdpDone)
        })
        .map(|(s, (b, a))| (s.name(), a - b))
        .collect();
    Some(Real {
        verdict: out.verdict,
        hinted_after: (!in_xdp).then(|| dp.hint_is_genuine(out.hint, &out.packet)),
        hint: (!in_xdp).then_some(out.hint),
        packet: out.packet,
        moved,
        flows: flows_of(dp),
    })
}

// ------------------------------------------------------------------ flow tables

type Masked = (u8, [u8; 16], u16, u32, [u8; 4]);

/// What the rules say of an entry: kind, address and port (not for forwarded entries), pool,
/// tunnel. Timestamps and the closing flag are not compared here (the model names the entries
/// whose FIN/RST flag it knows: `keep_flags`, `closing_after`).
fn masked(v: &FlowValue) -> Masked {
    if v.kind == FLOW_FORWARDED {
        (v.kind, [0; 16], 0, v.pool, v.tunnel)
    } else {
        (v.kind, v.addr, v.port_be, v.pool, v.tunnel)
    }
}

fn key_bytes(k: &FlowKey) -> Vec<u8> {
    let mut b = k.src.to_vec();
    b.extend_from_slice(&k.dst);
    b.extend_from_slice(&k.src_port_be.to_ne_bytes());
    b.extend_from_slice(&k.dst_port_be.to_ne_bytes());
    b.extend_from_slice(&[k.proto, k.family]);
    b
}

fn table(f: &Flows) -> BTreeMap<Vec<u8>, (FlowKey, Masked)> {
    f.iter()
        .map(|(k, v)| (key_bytes(k), (*k, masked(v))))
        .collect()
}

fn show_key(k: &FlowKey) -> String {
    let proto = match k.proto {
        6 => "tcp",
        17 => "udp",
        1 => "icmp",
        58 => "icmp6",
        _ => "?",
    };
    format!(
        "{proto} {}:{} → {}:{}",
        model::show_addr(&k.src, k.family),
        u16::from_be(k.src_port_be),
        model::show_addr(&k.dst, k.family),
        u16::from_be(k.dst_port_be)
    )
}

fn show_val(family: u8, m: &Masked) -> String {
    let kind = match m.0 {
        FLOW_OUTBOUND => "outbound",
        FLOW_REVERSE => "reverse",
        FLOW_FORWARDED => "forwarded",
        _ => "?",
    };
    let t = if m.4 == [0; 4] {
        String::new()
    } else {
        format!(" tunnel {}", std::net::Ipv4Addr::from(m.4))
    };
    if m.0 == FLOW_FORWARDED {
        format!("{kind} pool {}{t}", m.3)
    } else {
        format!(
            "{kind} {}:{} pool {}{t}",
            model::show_addr(&m.1, family),
            u16::from_be(m.2),
            m.3
        )
    }
}

/// An entry with its flags and timestamps.
fn show_full(family: u8, v: Option<&FlowValue>) -> String {
    match v {
        None => "absent".into(),
        Some(v) => format!(
            "{} flags {:#x} last_seen {} created {}",
            show_val(family, &masked(v)),
            v.flags,
            v.last_seen_ns,
            v.created_ns
        ),
    }
}

/// The changes from `before` to `after`, one line each.
fn changes(before: &Flows, after: &Flows) -> Vec<String> {
    let (b, a) = (table(before), table(after));
    let mut out = Vec::new();
    for (kb, (k, v)) in &a {
        match b.get(kb) {
            None => out.push(format!("+ {} ⇒ {}", show_key(k), show_val(k.family, v))),
            Some((_, old)) if old != v => out.push(format!(
                "~ {} ⇒ {} (was {})",
                show_key(k),
                show_val(k.family, v),
                show_val(k.family, old)
            )),
            _ => {}
        }
    }
    for (kb, (k, v)) in &b {
        if !a.contains_key(kb) {
            out.push(format!("- {} ({})", show_key(k), show_val(k.family, v)));
        }
    }
    out
}

/// The choices the programs made: the claimed reverse entry, the next hop of a new forwarded
/// entry.
fn choices(before: &Flows, after: &Flows) -> Choices {
    let mut c = Choices::default();
    for (k, v) in after {
        let old = before.get(k);
        if v.kind == FLOW_REVERSE && old.is_none() && c.snat.is_none() {
            c.snat = Some((k.dst, u16::from_be(k.dst_port_be)));
        }
        // Compared whole: a reopened tuple's new forwarded entry may name the old one's peer
        // (then only its flags and timestamps tell it is new).
        if v.kind == FLOW_FORWARDED && old != Some(v) && c.hop.is_none() {
            c.hop = Some(v.tunnel);
        }
    }
    c
}

// ------------------------------------------------------------------ comparison

fn verdict_name(v: u32) -> String {
    match v {
        0 => "pass (TC_ACT_OK)".into(),
        2 => "drop (TC_ACT_SHOT)".into(),
        7 => "sent (TC_ACT_REDIRECT)".into(),
        x => format!("verdict {x}"),
    }
}

fn verdict_ok(m: Verdict, real: u32) -> bool {
    match m {
        Verdict::Pass => real == 0,
        Verdict::Drop => real == 2,
        Verdict::Send => real == TC_ACT_REDIRECT,
    }
}

fn first_diff(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!(
            "first difference at byte {i}: model {:02x}, programs {:02x}",
            a[i], b[i]
        ),
        None => format!("lengths differ: model {}, programs {}", a.len(), b.len()),
    }
}

/// Mismatches between the model's outcome and the programs': (kind, detail).
fn compare(m: &Outcome, real: &Real, before: &Flows) -> Vec<(&'static str, String)> {
    let mut bad = Vec::new();
    if let (Some(h), Some(hinted)) = (real.hint, real.hinted_after)
        && hinted != m.hint_after
    {
        bad.push((
            "sent hint",
            format!(
                "model {}, programs cb words {:#x} {:#x} (the packet's own hint: {hinted})",
                m.hint_after, h.word, h.tag
            ),
        ));
    }
    if !verdict_ok(m.verdict, real.verdict) {
        bad.push((
            "verdict",
            format!(
                "model {:?}, programs {}",
                m.verdict,
                verdict_name(real.verdict)
            ),
        ));
    }
    let main: Vec<(&str, u64)> = real
        .moved
        .iter()
        .filter(|(n, _)| !matches!(**n, "port_collision" | "mss_clamped"))
        .map(|(n, d)| (*n, *d))
        .collect();
    if main != [(m.counter, 1)] {
        // Looked up by name: a counter the programs' Stat does not have is a disagreement.
        let known = Stat::ALL.iter().any(|s| s.name() == m.counter);
        bad.push((
            "counter",
            format!(
                "model {}{}, programs {main:?}",
                m.counter,
                if known {
                    ""
                } else {
                    " (no such counter in the programs' Stat)"
                }
            ),
        ));
    }
    let clamped = real.moved.get("mss_clamped").copied().unwrap_or(0);
    // A claim released because the packet was then dropped leaves no trace of the address
    // chosen, so whether it was a shared one (and the SYN clamped) is unknown.
    let released = m.missing_choice.is_some() && m.verdict == Verdict::Drop;
    if !released && clamped != u64::from(m.mss_clamped) {
        bad.push((
            "mss_clamped",
            format!("model {}, programs {clamped}", u64::from(m.mss_clamped)),
        ));
    }
    let coll = real.moved.get("port_collision").copied().unwrap_or(0);
    if !(m.collisions.0..=m.collisions.1).contains(&coll) {
        bad.push((
            "port_collision",
            format!(
                "model {}..={}, programs {coll}",
                m.collisions.0, m.collisions.1
            ),
        ));
    }
    let dropped = m.verdict == Verdict::Drop && real.verdict == 2;
    if !dropped && verdict_ok(m.verdict, real.verdict) {
        // Padding the input had past its IP packet may stay after the output's.
        let real_packet = if m.tail_unspecified && real.packet.len() > m.packet.len() {
            &real.packet[..m.packet.len()]
        } else {
            &real.packet[..]
        };
        let (a, b) = if m.l2_unspecified {
            (
                &m.packet[12.min(m.packet.len())..],
                &real_packet[12.min(real_packet.len())..],
            )
        } else {
            (&m.packet[..], real_packet)
        };
        if a != b {
            let at = if m.l2_unspecified { 12 } else { 0 };
            let mut d = first_diff(a, b);
            if at > 0 {
                d += " (from byte 12: the Ethernet addresses are not compared)";
            }
            bad.push(("bytes", d));
        }
        // An ICMP error's padding (past its IP length) is never rewritten: kept, it is kept
        // as it came.
        if let Some(padding) = &m.padding_kept
            && real.packet.len() > m.packet.len()
            && real.packet[m.packet.len()..] != padding[..]
        {
            bad.push((
                "bytes",
                format!(
                    "the padding past the IP length was {}, left as {}",
                    hex(padding),
                    hex(&real.packet[m.packet.len()..])
                ),
            ));
        }
    }
    if m.flows_unspecified.is_none() && table(&m.flows) != table(&real.flows) {
        bad.push((
            "flows",
            format!(
                "model {:?}, programs {:?}",
                changes(before, &m.flows),
                changes(before, &real.flows)
            ),
        ));
    }
    for k in &m.keep_flags {
        let was = before.get(k).map(|v| v.flags & FLOW_F_CLOSING);
        let now = real.flows.get(k).map(|v| v.flags & FLOW_F_CLOSING);
        if was != now {
            bad.push((
                "flows",
                format!(
                    "{}: the old reverse entry's FIN/RST flag {was:?} became {now:?}",
                    show_key(k)
                ),
            ));
        }
    }
    for k in &m.closing_after {
        let now = real.flows.get(k).map(|v| v.flags & FLOW_F_CLOSING);
        if now.is_none_or(|f| f == 0) {
            bad.push((
                "flows",
                format!(
                    "{}: the socket's FIN or RST went through this entry, but its FIN/RST flag is {now:?}",
                    show_key(k)
                ),
            ));
        }
    }
    for k in &m.untouched {
        let (was, now) = (before.get(k), real.flows.get(k));
        if was != now {
            bad.push((
                "flows",
                format!(
                    "{}: left untouched by the rules, but {} became {}",
                    show_key(k),
                    show_full(k.family, was),
                    show_full(k.family, now)
                ),
            ));
        }
    }
    if let Some(what) = m.missing_choice
        && m.verdict != Verdict::Drop
    {
        bad.push(("choice", format!("the model needed {what}")));
    }
    bad
}

/// Invariants of one output (the programs' or the model's): Err describes the violation.
///
/// `hinted`: the input carried the ingress program's sent hint for itself. Only `peer_snat`
/// leaves one, on a packet it translated to a pool address; the generator hands genuine hints
/// to any egress packet, so a hinted packet leaving with the source it came with is exempt
/// from the pool-source check.
#[allow(
    clippy::too_many_arguments,
    reason = "one output and what it came from"
)]
fn invariants(
    topo: &Topo,
    hook: Hook,
    mark: u32,
    input: &[u8],
    hinted: bool,
    verdict: u32,
    out: &[u8],
    moved: Option<&BTreeMap<&'static str, u64>>,
) -> Vec<String> {
    let mut bad = Vec::new();
    if verdict == 2 {
        // The README names every drop `drop_*`, except that its egress rule 1 drops a bad IP
        // header as `egress_malformed`: that one exception is accepted.
        if let Some(moved) = moved
            && !moved
                .keys()
                .any(|n| n.starts_with("drop_") || *n == "egress_malformed")
        {
            bad.push(format!("dropped without a drop_* counter ({moved:?})"));
        }
        return bad;
    }
    if verdict != 0 && verdict != TC_ACT_REDIRECT {
        bad.push(format!("unexpected verdict {verdict}"));
        return bad;
    }
    // Checksums: whatever was valid going in is valid going out.
    if matches!(check::verify(input), Ok(true)) {
        if let Err(e) = check::verify(out) {
            bad.push(format!("checksum: {e}"));
        }
        if check::verify_quote(input).is_ok()
            && let Err(e) = check::verify_quote(out)
        {
            bad.push(format!("checksum: {e}"));
        }
        if check::plain_transport(out)
            && let Err(e) = testrun::packet::verify_checksums(out)
        {
            bad.push(format!("checksum (testrun verifier): {e}"));
        }
    }
    // Sources towards policy destinations.
    let leaves = match hook {
        Hook::Egress => true,
        Hook::Ingress => verdict == TC_ACT_REDIRECT,
    };
    // The tunnel itself (GRE from this server's fabric address, own packets by egress rule 2)
    // is not tenant traffic, also when a catch-all policy covers the fabric.
    if leaves
        && let Some((src, dst, proto, ..)) = check::outer(out)
        && !(proto == 47 && src == std::net::IpAddr::from(cases::FABRIC))
    {
        let covered = |m: u32| {
            topo.policies
                .iter()
                .any(|(pm, net, _)| *pm == m && net.contains(&dst))
        };
        // No policy ever covers link-local, multicast, broadcast, loopback or unspecified
        // destinations, whatever its prefixes say, nor ICMPv6 neighbour discovery to any
        // destination (egress rule 4).
        let nd = proto == 58
            && check::outer(out).is_some_and(|(_, _, _, at, hl, end)| {
                end > at + hl && model::ND_TYPES.contains(&out[at + hl])
            });
        let never = nd
            || match dst {
                std::net::IpAddr::V4(a) => model::never_covered(false, &a.octets()),
                std::net::IpAddr::V6(a) => model::never_covered(true, &a.octets()),
            };
        let policy = !never
            && match hook {
                Hook::Egress => covered(mark) || covered(0),
                Hook::Ingress => topo.policies.iter().any(|(_, net, _)| net.contains(&dst)),
            };
        let vouched = hinted && check::outer(input).is_some_and(|(s, ..)| s == src);
        if policy && !topo.is_pool_address(src) && !vouched {
            bad.push(format!(
                "leaves towards policy destination {dst} from {src}, not a pool address"
            ));
        }
    }
    bad
}

// ------------------------------------------------------------------ the test

struct Disagreement {
    count: usize,
    example: String,
}

#[derive(Default)]
struct Tally {
    agreed: BTreeMap<String, usize>,
    families: BTreeMap<&'static str, usize>,
    silent: BTreeMap<&'static str, (usize, String)>,
    disagree: BTreeMap<String, Disagreement>,
}

#[allow(clippy::too_many_arguments, reason = "one description of one step")]
fn describe_case(
    seed: u64,
    i: usize,
    topo: &Topo,
    c: &Case,
    si: usize,
    packet: &[u8],
    before: &Flows,
    history: &str,
) -> String {
    let st = &c.steps[si];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "case {i} of seed {seed:#x} (replay: EGRESS_DIFF_SEED={seed:#x} EGRESS_DIFF_CASE={i} cargo xtask test -- --test differential)"
    );
    let _ = writeln!(s, "  topology {}; class: {}", topo.name, c.class);
    s += history;
    let _ = writeln!(
        s,
        "  step {si} of {}: {} mark {:#x}; {}",
        c.steps.len(),
        if st.ingress { "ingress" } else { "egress" },
        st.mark,
        st.class
    );
    let _ = writeln!(s, "  packet  {}", hex(packet));
    for (k, v) in before {
        let _ = writeln!(
            s,
            "  flow    {} ⇒ {}",
            show_key(k),
            show_val(k.family, &masked(v))
        );
    }
    s
}

fn describe_real(real: &Real, before: &Flows) -> String {
    format!(
        "  programs: {}; counters {:?}\n            packet {}\n            flows {:?}\n",
        verdict_name(real.verdict),
        real.moved,
        if real.verdict == 2 {
            "-".into()
        } else {
            hex(&real.packet)
        },
        changes(before, &real.flows)
    )
}

fn describe_model(m: &Outcome, before: &Flows) -> String {
    format!(
        "  model:    {:?} {}{} ({}); collisions {}..={}\n            packet {}{}\n            flows {:?}{}\n",
        m.verdict,
        m.counter,
        if m.mss_clamped { " + mss_clamped" } else { "" },
        m.rule,
        m.collisions.0,
        m.collisions.1,
        if m.verdict == Verdict::Drop {
            "-".into()
        } else {
            hex(&m.packet)
        },
        if m.l2_unspecified {
            " (Ethernet addresses unspecified)"
        } else {
            ""
        },
        changes(before, &m.flows),
        m.flows_unspecified
            .map(|w| format!(" (unspecified: {w})"))
            .unwrap_or_default(),
    )
}

/// Whether the model's output (agreeing with the programs') keeps the input's Ethernet header
/// and VLAN tags with a rewritten IP header after them.
fn rewritten(input: &[u8], m: &Outcome) -> bool {
    let model::wire::L2::Read { l3, .. } = model::wire::l2(input) else {
        return false;
    };
    let hdr = |p: &[u8]| p.get(l3..l3 + 20).map(<[u8]>::to_vec);
    m.verdict != Verdict::Drop
        && m.packet.get(12..l3) == input.get(12..l3)
        && hdr(&m.packet).is_some()
        && hdr(&m.packet) != hdr(input)
}

fn model_verdict(v: Verdict) -> u32 {
    match v {
        Verdict::Pass => 0,
        Verdict::Drop => 2,
        Verdict::Send => TC_ACT_REDIRECT,
    }
}

#[test]
fn differential() {
    common::require_root();
    let seed = env_u64("EGRESS_DIFF_SEED").unwrap_or(DEFAULT_SEED);
    let cases = env_u64("EGRESS_DIFF_CASES").map_or(DEFAULT_CASES, |n| n as usize);
    let only = env_u64("EGRESS_DIFF_CASE").map(|n| n as usize);
    let report = std::env::var("EGRESS_DIFF_REPORT").is_ok_and(|v| v == "1");
    let started = Instant::now();

    let net = TestNet::enter();
    // Permanent neighbours for every generated peer (10.50.0.12 and the gateway exist).
    let mut neighbours = BTreeMap::from([
        ([10, 50, 0, 12], PEER_MAC),
        ([10, 50, 255, 254], GATEWAY_MAC),
    ]);
    for (_, id, _) in &cases::SERVERS[2..] {
        let mac = [0x02, 0, 0, 0, 0, *id as u8];
        let ip = format!("10.50.0.{id}");
        let lladdr = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let st = std::process::Command::new("ip")
            .args([
                "-n",
                &net.name,
                "neigh",
                "add",
                &ip,
                "lladdr",
                &lladdr,
                "dev",
                "up0",
                "nud",
                "permanent",
            ])
            .status()
            .expect("ip neigh add");
        assert!(st.success(), "ip neigh add {ip}");
        neighbours.insert([10, 50, 0, *id as u8], mac);
    }
    let env = Env {
        uplink_mac: net.mac,
        mtu: 1500,
        local_addrs: vec![cases::FABRIC],
        connected: vec![([10, 50, 0, 0], 16)],
        routes: vec![([203, 0, 113, 0], 24, [10, 50, 255, 254])],
        neighbours,
    };

    let mut topos =
        vec![Topo::new("fixture", testrun::FIXTURE_TOPOLOGY).expect("fixture topology")];
    let mut trng = Rng::new(seed);
    for n in 0..GENERATED_TOPOLOGIES {
        topos.push(cases::topology(&mut trng, &format!("generated-{n}")));
    }
    topos.push(Topo::new("catch-all", cases::CATCH_ALL_TOPOLOGY).expect("catch-all topology"));
    let down = cases::CATCH_ALL_DOWN
        .iter()
        .map(|(s, f)| (s.to_string(), *f))
        .collect();
    topos.push(
        Topo::with_down("catch-all", cases::CATCH_ALL_TOPOLOGY, &down)
            .expect("catch-all topology, peers down"),
    );
    let mut dp = TestDatapath::fixture(&net, testrun::FIXTURE_TOPOLOGY).expect("programs load");
    let local = egress_common::fabric::Local {
        fabric: cases::FABRIC,
        ifindex: net.ifindex,
        mss_v4: 1432,
        fenced: 0,
        _pad: 0,
        // No budget: the model sees one case at a time, not the load of earlier ones.
        peer_budget: 0,
    };

    let mut tally = Tally::default();
    let mut current = usize::MAX;
    let range = match only {
        Some(i) => i..i + 1,
        None => 0..cases,
    };
    let mut ran = 0usize;
    let mut replay_failed = false;
    for i in range {
        let ti = (i / CASES_PER_TOPOLOGY) % topos.len();
        let topo = &topos[ti];
        if ti != current {
            dp.maps.plan.apply(&topo.contents).expect("plan written");
            current = ti;
        }
        let mut rng = Rng::new(seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let c = cases::case(topo, &mut rng, i);
        ran += 1;
        set_flows(&mut dp, &c.flows);
        // An odd plan (actions the planner never writes) and an unwritten `LOCAL` last for the
        // case only.
        let odd_contents;
        let maps = if c.actions.is_empty() {
            &topo.contents
        } else {
            let mut m = topo.contents.clone();
            for (k, a) in &c.actions {
                match a {
                    Some(a) => m.actions.insert(*k, *a),
                    None => m.actions.remove(k),
                };
            }
            put_actions(&mut dp, &c.actions);
            odd_contents = m;
            &odd_contents
        };
        if c.unconfigured {
            dp.maps
                .set_local(&egress_common::fabric::Local::default())
                .expect("LOCAL zeroed");
        }
        let case_local = egress_common::fabric::Local {
            fenced: c.fenced,
            ..local
        };
        if c.fenced != 0 {
            dp.maps.set_local(&case_local).expect("LOCAL fenced");
        }
        // The pass filter as the agent's collector would leave it for this plan and these
        // entries (the model knows nothing of it: with it, every outcome must stay the same).
        dp.maps.refine_filter().expect("pass filter refined");
        let world = World {
            maps,
            local: (!c.unconfigured).then_some(case_local),
            env: &env,
        };
        let mut before: Flows = dp_flows_or(&c);
        // The model's FRAGS over the sequence; None once a step left it unknown.
        let mut frags: Option<Frags> = Some(Frags::new());
        let mut prev_out: Option<(Vec<u8>, Hint)> = None;
        let mut history = String::new();
        for (si, st) in c.steps.iter().enumerate() {
            let (packet, hint) = if st.prev_output {
                // The control block travels with the packet the programs sent out.
                match prev_out.take() {
                    Some(p) => p,
                    None => continue,
                }
            } else {
                (st.packet.clone(), stack_hint(&dp, st))
            };
            prev_out = None;
            let mut head = describe_case(seed, i, topo, &c, si, &packet, &before, &history);
            if hint != Hint::NONE {
                head += &format!(
                    "\n  (egress with cb[{SENT_HINT_CB}] = {:#x}, cb[{SENT_TAG_CB}] = {:#x}: {})",
                    hint.word,
                    hint.tag,
                    if dp.hint_is_genuine(hint, &packet) {
                        "the ingress program's own hint on this packet"
                    } else {
                        "not this packet's hint"
                    }
                );
            }
            let Some(real) = run_real(&mut dp, st, hint, &packet) else {
                let e = tally.silent.entry(UNTESTABLE).or_insert((0, String::new()));
                e.0 += 1;
                if e.1.is_empty() {
                    e.1 = head;
                }
                break;
            };
            let hook = if st.ingress {
                Hook::Ingress
            } else {
                Hook::Egress
            };
            let ch = choices(&before, &real.flows);
            // The egress packet carries the ingress program's sent hint for itself.
            let hinted = !st.ingress && dp.hint_is_genuine(hint, &packet);
            let answer = match &frags {
                Some(f) => model::run(
                    &world,
                    &before,
                    f,
                    hook,
                    model::Skb {
                        mark: st.mark,
                        hinted,
                    },
                    &packet,
                    &ch,
                ),
                None => Answer::Silent("a step before in the sequence the rules are silent on"),
            };
            let sequence = c.steps.len() > 1 || c.class.starts_with("fragments");
            let mut scenario = if sequence {
                // One class per scenario and kind of step (not per fragment number or transport).
                let head = c.class.split(" / ").take(3).collect::<Vec<_>>().join(" / ");
                let what = st.class.split(" / ").next().unwrap_or("");
                let what: String = what.chars().filter(|c| !c.is_ascii_digit()).collect();
                format!("{head}: {}", what.replace("  ", " "))
            } else {
                st.class.split(" / ").next().unwrap_or("").to_string()
            };
            let padded = c.class.contains("ethernet padding");
            if padded {
                scenario = "frame with Ethernet padding".into();
            } else if c.class.contains("inner fragment") {
                scenario += ": inner first fragment";
            }
            if !sequence
                && !padded
                && let Some(l4) = c.class.split(" / ").find_map(|t| {
                    [
                        "tcp",
                        "udp",
                        "echo request",
                        "echo reply",
                        "quotes echo",
                        "icmp",
                        "sctp",
                        "esp",
                        "gre",
                    ]
                    .into_iter()
                    .find(|p| t.starts_with(p))
                })
            {
                scenario += &format!(" ({l4})");
            }
            if !sequence && !padded && !st.ingress && st.mark & 0x8000_0000 != 0 {
                scenario += " [mark bit 31]";
            }
            if !c.actions.is_empty() {
                scenario += " [odd plan]";
            }
            if c.unconfigured {
                scenario += " [LOCAL not written]";
            }
            if c.fenced != 0 {
                scenario += " [LOCAL fenced]";
            }
            match tags_of(&packet) {
                Tags::Untagged => {}
                Tags::ReadThrough => scenario += " [VLAN tags]",
                Tags::ThirdTag => scenario += " [a third VLAN tag]",
                Tags::NotIp => scenario += " [odd TPID]",
            }

            let mut problems: Vec<(String, String)> = Vec::new();
            for v in invariants(
                topo,
                hook,
                st.mark,
                &packet,
                hinted,
                real.verdict,
                &real.packet,
                Some(&real.moved),
            ) {
                problems.push(("programs invariant".into(), v));
            }
            let mut model_out = None;
            match &answer {
                Answer::Silent(why) => {
                    // Only a first fragment records in FRAGS: after a silent later fragment
                    // the model's FRAGS still holds.
                    if !st.class.starts_with("later fragment") {
                        frags = None;
                    }
                    let e = tally.silent.entry(why).or_insert((0, String::new()));
                    e.0 += 1;
                    if e.1.is_empty() {
                        e.1 = format!("{head}{}", describe_real(&real, &before));
                    }
                }
                Answer::BadChoice(why) => {
                    frags = None;
                    problems.push(("choice not allowed by the rules".into(), why.clone()))
                }
                Answer::Sure(m) => {
                    for (kind, d) in compare(m, &real, &before) {
                        problems.push((
                            format!(
                                "{kind}: model {} / programs {:?}",
                                m.counter,
                                real.moved.keys().collect::<Vec<_>>()
                            ),
                            d,
                        ));
                    }
                    for v in invariants(
                        topo,
                        hook,
                        st.mark,
                        &packet,
                        hinted,
                        model_verdict(m.verdict),
                        &m.packet,
                        None,
                    ) {
                        problems.push(("model invariant".into(), v));
                    }
                    frags = frags.map(|_| m.frags.clone());
                    model_out = Some(m);
                }
            }
            let mut text = head;
            if let Some(m) = model_out {
                text += &describe_model(m, &before);
            } else if let Answer::Silent(w) = &answer {
                let _ = writeln!(text, "  model:    the rules are silent: {w}");
            }
            text += &describe_real(&real, &before);
            if only.is_some() {
                if si == 0 {
                    println!("topology {}:\n{}", topo.name, topo.toml);
                }
                println!("{text}");
            }
            let _ = writeln!(
                history,
                "  step {si} ({}{}): programs {} {:?}; model {}",
                st.class.split(" / ").next().unwrap_or(""),
                if st.prev_output {
                    ", the step before's output"
                } else {
                    ""
                },
                verdict_name(real.verdict),
                real.moved.keys().collect::<Vec<_>>(),
                match &answer {
                    Answer::Sure(m) => format!("{:?} {}", m.verdict, m.counter),
                    Answer::Silent(_) => "silent".into(),
                    Answer::BadChoice(_) => "bad choice".into(),
                }
            );
            if real.verdict != 2 {
                prev_out = Some((real.packet.clone(), real.hint.unwrap_or(Hint::NONE)));
            }
            before = real.flows.clone();
            if problems.is_empty() {
                if let Some(m) = model_out {
                    let how = if hook == Hook::Egress && m.counter.contains("forward")
                        || m.rule.contains("egress, encapsulate")
                    {
                        format!(" [{}]", verdict_name(real.verdict))
                    } else {
                        String::new()
                    };
                    let tags = tags_of(&packet);
                    let vlan = match tags {
                        Tags::Untagged => "",
                        Tags::ReadThrough => " [VLAN tags]",
                        Tags::ThirdTag => " [a third VLAN tag]",
                        Tags::NotIp => " [odd TPID]",
                    };
                    *tally
                        .agreed
                        .entry(format!("{} ({}){how}{vlan}", m.counter, m.rule))
                        .or_default() += 1;
                    let fenced = c.fenced != 0;
                    for f in families(m.counter, m.rule, tags, rewritten(&packet, m), fenced) {
                        *tally.families.entry(f).or_default() += 1;
                    }
                    // What the model singles out of its decision (its notes).
                    for f in &m.notes {
                        *tally.families.entry(f).or_default() += 1;
                    }
                    // The sent hint's word without this packet's tag counts for nothing
                    // (egress rule 5): such packets go through rules 3–7 like any other.
                    if hook == Hook::Egress
                        && hint.word == SENT_HINT
                        && !hinted
                        && let Some(f) = leftover_family(m)
                    {
                        *tally.families.entry(f).or_default() += 1;
                    }
                    let filtered = match (hook, m.counter) {
                        (Hook::Egress, "egress_no_policy") => Some("egress no policy"),
                        (Hook::Ingress, "ingress_no_flow") => Some("ingress no flow"),
                        _ => None,
                    };
                    if let Some(what) = filtered
                        && matches!(tags, Tags::Untagged)
                    {
                        let f = match (what, filter_passes(&mut dp, &packet)) {
                            ("egress no policy", Some(true)) => {
                                Some("egress no policy: passed by the pass filter")
                            }
                            ("egress no policy", Some(false)) => {
                                Some("egress no policy: looked up")
                            }
                            (_, Some(true)) => Some("ingress no flow: passed by the pass filter"),
                            (_, Some(false)) => Some("ingress no flow: looked up"),
                            (_, None) => None,
                        };
                        if let Some(f) = f {
                            *tally.families.entry(f).or_default() += 1;
                        }
                    }
                }
                continue;
            }
            for (k, d) in &problems {
                let _ = writeln!(text, "  ✗ {k}: {d}");
            }
            if only.is_some() {
                // Replaying one case: every step is shown, the test fails after the last.
                for (k, d) in &problems {
                    println!("  ✗ {k}: {d}");
                }
                replay_failed = true;
                continue;
            }
            if !report {
                panic!("model and programs disagree\n{text}");
            }
            let kinds: BTreeSet<&str> = problems
                .iter()
                .map(|(k, _)| k.split(':').next().unwrap_or(""))
                .collect();
            let class = format!(
                "{scenario} | model {} | programs {} | {}",
                model_out.map_or_else(|| "silent".to_string(), |m| m.counter.to_string()),
                real.moved
                    .keys()
                    .filter(|n| !matches!(**n, "port_collision" | "mss_clamped"))
                    .copied()
                    .collect::<Vec<_>>()
                    .join("+"),
                kinds.into_iter().collect::<Vec<_>>().join(",")
            );
            let e = tally.disagree.entry(class).or_insert(Disagreement {
                count: 0,
                example: text,
            });
            e.count += 1;
        }
        // The plan and `LOCAL` as the next case expects them.
        if !c.actions.is_empty() {
            let back: Vec<_> = c
                .actions
                .iter()
                .map(|(k, _)| (*k, topo.contents.actions.get(k).copied()))
                .collect();
            put_actions(&mut dp, &back);
        }
        if c.unconfigured || c.fenced != 0 {
            dp.maps.set_local(&local).expect("LOCAL written back");
        }
    }
    assert!(!replay_failed, "model and programs disagree (steps above)");
    let secs = started.elapsed().as_secs_f64();
    let agreed: usize = tally.agreed.values().sum();
    let silent: usize = tally.silent.values().map(|(n, _)| n).sum();
    let disagreed: usize = tally.disagree.values().map(|d| d.count).sum();
    println!(
        "differential: seed {seed:#x}, {ran} cases in {secs:.1} s ({} topologies): {agreed} agree, {silent} where the rules are silent, {disagreed} disagree",
        topos.len()
    );
    println!("agreeing outcomes:");
    for (k, n) in &tally.agreed {
        println!("  {n:6}  {k}");
    }
    println!("silent (byte comparison skipped):");
    for (k, (n, _)) in &tally.silent {
        println!("  {n:6}  {k}");
    }
    let all_families = families_all();
    println!("agreeing steps per rule family (floor {FAMILY_FLOOR} in default mode):");
    for f in &all_families {
        println!("  {:6}  {f}", tally.families.get(f).copied().unwrap_or(0));
    }
    let steps = agreed + silent + disagreed;
    let silent_pct = 100.0 * silent as f64 / steps.max(1) as f64;
    println!("silent: {silent_pct:.2} % of {steps} steps (at most {MAX_SILENT_PERCENT} %)");
    // The coverage floor: the model may not go silent on too much, nor lose a rule family.
    let floor_failures: Vec<String> = if only.is_none() && cases >= DEFAULT_CASES {
        let mut v: Vec<String> = all_families
            .iter()
            .filter(|f| tally.families.get(*f).copied().unwrap_or(0) < FAMILY_FLOOR)
            .map(|f| format!("rule family \"{f}\" has fewer than {FAMILY_FLOOR} agreeing steps"))
            .collect();
        if silent_pct > MAX_SILENT_PERCENT {
            v.push(format!(
                "the model is silent on {silent_pct:.2} % of the steps (at most {MAX_SILENT_PERCENT} %)"
            ));
        }
        v
    } else {
        Vec::new()
    };
    if report {
        println!("disagreement classes (scenario | model | programs | what differs):");
        for (k, d) in &tally.disagree {
            println!("  {:6}  {k}", d.count);
        }
        for (k, d) in &tally.disagree {
            println!("\n=== {k} ({} cases)\n{}", d.count, d.example);
        }
        if std::env::var("EGRESS_DIFF_SILENT_EXAMPLES").is_ok_and(|v| v == "1") {
            for (k, (_, ex)) in &tally.silent {
                println!("\n--- silent: {k}\n{ex}");
            }
        }
        assert_eq!(disagreed, 0, "{disagreed} cases disagree (table above)");
    }
    assert!(
        floor_failures.is_empty(),
        "coverage floor: {}",
        floor_failures.join("; ")
    );
}

/// Families of an egress step carrying the sent hint's word without its packet's tag (what the
/// stack may leave in a local packet's control block): the rules as for any packet.
const HINT_WORD_PEER: &str =
    "sent hint's word alone: a peer's packet passed by rule 5's reverse entry (ours_passed)";
const HINT_WORD_NEW: &str =
    "sent hint's word alone: a local new connection (snat_new, forward_new)";

fn leftover_family(m: &Outcome) -> Option<&'static str> {
    match m.counter {
        "ours_passed" if m.rule.starts_with("egress 5") => Some(HINT_WORD_PEER),
        "snat_new" | "forward_new" => Some(HINT_WORD_NEW),
        _ => None,
    }
}

/// Every family [`families`] can name, in the order printed.
fn families_all() -> Vec<&'static str> {
    vec![
        "egress no policy: passed by the pass filter",
        "egress no policy: looked up",
        "ingress no flow: passed by the pass filter",
        "ingress no flow: looked up",
        "egress SNAT new",
        "egress SNAT established",
        "egress forward",
        "reverse NAT (plain ingress)",
        "tunnel reply (reverse entry)",
        "tunnel peer SNAT",
        "tunnel forwarded reply",
        "soft-unicast",
        "soft-unicast to an owner down",
        "tunnel probe request echoed",
        "tunnel probe request echoed while fenced (pool bits 3)",
        "tunnel probe reply passed",
        "tunnel probe reply, fenced (pool bits 3), passed",
        "LOCAL fenced: a peer's connection translated as usual",
        "LOCAL fenced: any rule but probes, as usual",
        "ICMP errors",
        "fragments",
        "drops",
        "tunnel stray to a pool address",
        "tunnel another peer's tuple",
        "egress fragment under only an arriving entry (a peer's source): not followed",
        "tunnel key of another kind",
        "egress packet shaped like a reply (reverse entry)",
        "odd plan: a forward action without next hops",
        "odd plan: an action of an unknown kind",
        "LOCAL not written: a packet to encapsulate dropped",
        "hop with TTL 0 or 1",
        "VLAN-tagged frame, IP read through the tags",
        "VLAN-tagged frame rewritten, tags kept",
        "drop_vlan_tunnel: tagged frame not encapsulated",
        "drop_vlan_tunnel: tagged GRE (tunnel rule 1)",
        "VLAN: a third tag, malformed",
        "VLAN: an odd TPID (untagged or after a tag), not IP",
        "IP length beyond the frame: dropped on egress (egress_malformed)",
        "IP length beyond the frame: passed on ingress (ingress_malformed)",
        model::NOTE_NEVER_COVERED_V4,
        model::NOTE_NEVER_COVERED_V6,
        model::NOTE_NEVER_COVERED_ND,
        model::NOTE_NEVER_COVERED_FRAGMENT,
        model::NOTE_NEVER_COVERED_PEER,
        model::NOTE_MSS_WHOLE,
        model::NOTE_MSS_SPLIT,
        model::NOTE_MSS_PADDING_FORWARDED,
        model::NOTE_MSS_PADDING_TRANSLATED,
        model::NOTE_MSS_PADDING_PEER,
        model::NOTE_MSS_PADDING_REPLY,
        model::NOTE_PEER_TUPLE_SYN,
        model::NOTE_PEER_TUPLE_SYN_CLOSED,
        model::NOTE_PEER_TUPLE_DATA,
        model::NOTE_PEER_TUPLE_FIN,
        model::NOTE_PEER_TUPLE_RST,
        model::NOTE_PEER_TUPLE_OTHER,
        model::NOTE_PEER_TUPLE_FRAGMENT,
        model::NOTE_ICMP_PADDED_SHORT,
        model::NOTE_ICMP_PADDED_CSUM,
        model::NOTE_ICMP_PADDED_NAT,
        model::NOTE_FRAG_OWN_SNAT,
        model::NOTE_FRAG_OWN_FORWARD,
        model::NOTE_FRAG_INGRESS_SNAT,
        model::NOTE_FRAG_INGRESS_FORWARD,
        model::NOTE_FRAG_TUNNEL_LEAVING,
        model::NOTE_ECHO_REQUEST_REPLY_FORWARDED,
        model::NOTE_ECHO_REQUEST_REPLY,
        model::NOTE_ECHO_REQUEST_SOFT_UNICAST,
        model::NOTE_HINT_REVERSE,
        model::NOTE_HINT_NO_REVERSE,
        model::NOTE_HINT_OUTBOUND,
        HINT_WORD_PEER,
        HINT_WORD_NEW,
    ]
}
