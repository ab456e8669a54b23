//! An independent model of the two TC programs, written from the README's "Datapath rules" only:
//! (map contents, `FRAGS`, hook, skb mark, sent hint, packet) → (verdict, output packet, the
//! counter that moved, the flow table and `FRAGS` afterwards). It never runs the BPF programs.
//! `FRAGS` cannot be read from the programs: the caller carries the model's own from one packet
//! of a sequence to the next.
//!
//! Where the rules leave a choice to a hash (the port a new connection claims, the next hop of
//! a forwarded one) the caller passes the choice in [`Choices`]; the model checks that the rules
//! allow it. Where the rules are silent the model answers [`Answer::Silent`] with the reason,
//! or marks the part of its answer it cannot give (`flows_unspecified`, `l2_unspecified`).
//!
//! `FLOWS` is taken never to be full (the harness's table is far larger than any case), so
//! `drop_flow_table_full` is never the model's answer; `PEER_LOAD` is not modelled: with a
//! non-zero peer budget a new peer connection is silent.
//!
//! Rule 1 of either hook: a bad IP header includes an IP length field (IPv4 total length,
//! IPv6 payload length) beyond the frame (egress drops it, `egress_malformed`; ingress passes
//! it, `ingress_malformed`). A quoted header in an ICMP error may speak of more than the quote
//! (not malformed); the quote ends at the error's IP length, and the bytes after it (padding)
//! are never read as quote nor rewritten ([`Outcome::padding_kept`]). An inner packet of a
//! tunnel whose length goes beyond the GRE payload is not named by Tunnel rule 1: silent.
//!
//! No policy covers IPv4 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/3 or IPv6 ::/16,
//! fe80::/10, ff00::/8, whatever the prefixes say ([`never_covered`]), nor an ICMPv6 neighbour
//! discovery message ([`ND_TYPES`]), wherever a policy is asked. A SYN translated to any IPv4 pool address in `OWNERS` (split or held whole) has its
//! MSS clamped. The MSS is read only as the first TCP option lying wholly within the IP
//! packet: an option whose bytes reach past the IP length (the data offset claims it, the
//! frame may hold it as padding) is never clamped. (A data offset beyond the packet with the
//! MSS itself inside it stays silent: the rules name only where the option lies.)
//!
//! Egress rule 3: an *outbound* entry naming a tunnel (a peer's connection translated here
//! under the tuple this host's packet repeats) drops the packet (`drop_peer_tuple`), whatever
//! the packet (a SYN that would reopen a closed entry, a FIN, an RST), and leaves the entry
//! untouched ([`Outcome::untouched`]: not refreshed, not flagged, not removed).
//!
//! Ethernet is read through up to two VLAN tags in the frame data (`wire::l2`): the IP header
//! follows the last tag, rewrites keep the tags, and a tagged frame is never encapsulated nor
//! taken as a tunnel packet (`drop_vlan_tunnel`). A third tag makes the frame malformed (rule 1:
//! `egress_malformed`, dropped; `ingress_malformed`, passed); an odd TPID is not IP.
//!
//! Timestamps and FIN/RST flags of flow entries are read, not computed: a SYN without ACK on an
//! outbound or forwarded entry that saw a FIN or RST (its `FLOW_F_CLOSING` bits) starts a new
//! connection (egress rule 3). What the model knows of the flags it names: a reopened tuple's
//! old reverse entry keeps them (`keep_flags`); an entry the socket's FIN or RST went through
//! has them (`closing_after`).
//!
//! `ACTIONS` may hold what the agent's planner never writes (egress rule 7): a *forward* action
//! without next hops (`drop_no_hops`), an action of an unknown kind (`drop_bad_action`). `LOCAL`
//! may be not written yet ([`World::local`] `None`): a packet that must be encapsulated or
//! redirected is dropped (`drop_not_configured`); where that competes with another drop of the
//! same packet (VLAN tags, too big, no route, a TTL of 0 or 1, an owner down, an MSS to clamp)
//! or where a rule needs this server's fabric address (egress rule 2, Tunnel rule 1, whose
//! port range is this server's) the model is silent.
//!
//! *Fragments*: a `FRAGS` entry's key holds, besides the datagram's (source, destination, IP
//! identification, protocol) as it arrived, the way its later fragments go ([`Way`]): *leaving*
//! through the uplink (egress SNAT's *source*, egress forward's *encapsulate*, and *ours*, a
//! peer's datagram as translated here) or *arriving* on it (everything else: *destination*,
//! soft-unicast's *encapsulate*, a peer's *source* in a tunnel, *deliver*). A later fragment
//! asks its own way's entry only — egress *leaving*, plain ingress and a tunnel *arriving* —
//! and a first fragment replaces only an entry of its key and way: a peer's first fragment
//! with this host's own (source, destination, id, protocol) leaves this host's entry in place,
//! and a plain arriving later fragment under the key of a datagram this host sends out is not
//! followed (rule 3, as without an entry).
//!
//! Tunnel rule 2: kinds *reply* and *soft-unicast* bring replies only; an inner ICMP echo
//! request there (whole, or a first fragment; an echo request cut short is `drop_truncated_l4`
//! first, an ICMP error goes to rule 3) is dropped (`drop_tunnel_kind`) before the per-kind
//! rules look at any entry — also one whose swapped tuple is a forwarded echo's key (an echo
//! forwarded with identifier 0: its remote port is 0 too).
//!
//! `PEERS` values are read for their flags only where the rules do: soft-unicast (ingress rule
//! 6) to an owner whose fabric probes go unanswered is dropped (the other bits — lease gone,
//! holding down, fenced by its own account — do not stop it). A tunnel packet of kind *probe*
//! (Tunnel rule 6) is decided by its pool bits alone, once the outer headers and the inner IPv4
//! header have passed rule 1: a request is echoed with pool bits 2, or 3 while `LOCAL`'s
//! *fenced* is nonzero; pool bits 2 and 3 (replies) pass. *Fenced* is read by no other rule.
//!
//! The *sent hint* (`hinted`: the packet given to the egress hook carries the ingress
//! program's sent hint *for itself*: the `SENT_HINT` word and the keyed tag of its own tuple —
//! source, destination, ports (an echo request: its identifier and 0), protocol; the caller
//! decides that, the model never sees a key) is read by TC egress rule 5 alone. An IPv4
//! packet so hinted is asked nothing at all: right after rules 1 and 2 (a later fragment is
//! handed to *Fragments* by rule 2 first, as any) it passes (`ours_hinted`) whatever rules 3–5
//! would have said and whatever the flow table holds (no reverse entry needed; an outbound,
//! forwarded or reverse entry of its tuple neither used nor touched, a closed tuple not
//! reopened). The tag is of the packet's tuple: a packet that has none (an echo reply or
//! other ICMP, a protocol without ports, a transport header cut short) carries no hint for
//! itself, whatever the caller says. The hint word without its packet's tag (a stack
//! leftover, a tag of another packet) is `hinted == false`: the packet goes through rules 3–7
//! like any other (rule 5 then asks the reverse entry, `ours_passed`). The hint is written by
//! one decision alone: ingress's `peer_snat` (Tunnel rule 5, sent out of the uplink); an
//! ingress packet is taken to arrive without one, and egress never writes the control block:
//! the hint a packet came with stays its own afterwards only while its tuple is unchanged (a
//! rewritten source or an encapsulation leaves a tag of another packet)
//! ([`Outcome::hint_after`]).

#![allow(dead_code, reason = "the differential test uses a subset")]

pub mod wire;

use std::collections::{BTreeMap, HashMap};

use egress::plan::MapContents;

/// The key of an address in the plan's `PEERS`/`OWNERS` (a plan is computed in generation 0).
fn gen0(addr: [u8; 4]) -> egress_common::fabric::AddrKey {
    egress_common::fabric::AddrKey::new(addr, 0)
}
use egress_common::{
    action::{ActionKey, ActionKind, FAMILY_V4, FAMILY_V6, SnatTarget},
    fabric::Local,
    flow::{FLOW_F_CLOSING, FLOW_FORWARDED, FLOW_OUTBOUND, FLOW_REVERSE, FlowKey, FlowValue},
};
use wire::*;

pub type Flows = HashMap<FlowKey, FlowValue>;

/// *Tunnel keys*: the GRE key is `kind << 30 | pool id`.
pub const KIND_PROBE: u32 = 0;
pub const KIND_CONNECTION: u32 = 1;
pub const KIND_SOFT_UNICAST: u32 = 2;
pub const KIND_REPLY: u32 = 3;
pub const POOL_MASK: u32 = (1 << 30) - 1;
/// Kind *probe*: the pool bits of a request, of a reply, and of a reply from a server whose
/// `LOCAL` says *fenced*.
pub const PROBE_REQUEST: u32 = 1;
pub const PROBE_REPLY: u32 = 2;
pub const PROBE_REPLY_FENCED: u32 = 3;

/// *Liveness in the maps*: the `PEERS` flag "fabric probes unanswered".
pub const PEER_PROBES_UNANSWERED: u32 = 1;

/// The GRE key of a `kind` packet of `pool`.
pub fn tunnel_key(kind: u32, pool: u32) -> u32 {
    kind << 30 | pool
}

/// `FRAGS`: (source, destination, IP identification, protocol, family) of a first fragment as
/// it arrived, and the way its later fragments go ([`Way`]) → what was done with it. The
/// programs' map cannot be read; the model keeps its own over a sequence of packets.
pub type Frags = HashMap<FragKey, FragEntry>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub way: Way,
}

/// *Fragments* rule 1: the way a datagram's later fragments go, part of its entry's key. An
/// entry of one way is neither replaced by a first fragment of the other way nor asked by its
/// later fragments (rules 1–3): a peer may send any inner source, this host's own included, and
/// a sender on the uplink any plain one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Way {
    /// Out through the uplink: egress SNAT, egress forward, and *ours* (a peer's datagram as
    /// translated here). Asked by later fragments on egress.
    Leaving,
    /// In on the uplink: everything else (a reply translated back, soft-unicast, a peer's
    /// *source* entry in a tunnel, *deliver*). Asked by later fragments on plain ingress and
    /// in a tunnel.
    Arriving,
}

impl Way {
    fn other(self) -> Way {
        match self {
            Way::Leaving => Way::Arriving,
            Way::Arriving => Way::Leaving,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FragEntry {
    /// Egress SNAT (leaving), or a peer's connection in a tunnel (`peer`; arriving): the
    /// translated source.
    Source {
        addr: [u8; 16],
        peer: Option<[u8; 4]>,
    },
    /// A reply translated back (plain or in a tunnel; arriving): the original destination, the
    /// connection's tunnel and pool.
    Destination {
        addr: [u8; 16],
        tunnel: [u8; 4],
        pool: u32,
    },
    /// Egress forward (leaving), soft-unicast (arriving): the peer or owner and the pool.
    Encapsulate { to: [u8; 4], pool: u32 },
    /// A forwarded connection's reply from its peer (Tunnel rule 4; arriving): that peer.
    Deliver { peer: [u8; 4] },
    /// A peer's first fragment translated here, under its translated key (leaving).
    Ours,
}

/// The key of `ip`'s datagram (as it arrived) for later fragments going `way`.
fn frag_key(ip: &Ip, way: Way) -> FragKey {
    FragKey {
        src: ip.src,
        dst: ip.dst,
        id: ip.id,
        proto: ip.proto,
        family: ip.family(),
        way,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Egress,
    Ingress,
}

/// What the kernel's FIB and neighbour tables hold (the test namespace's, written down).
#[derive(Debug, Clone)]
pub struct Env {
    pub uplink_mac: [u8; 6],
    pub mtu: usize,
    /// Addresses of the uplink itself.
    pub local_addrs: Vec<[u8; 4]>,
    /// Directly connected prefixes of the uplink.
    pub connected: Vec<([u8; 4], u8)>,
    /// (prefix, length, gateway).
    pub routes: Vec<([u8; 4], u8, [u8; 4])>,
    pub neighbours: BTreeMap<[u8; 4], [u8; 6]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fib {
    NoRoute,
    /// A local, loopback, "this network" or broadcast destination: the rules do not say.
    Odd,
    Resolved([u8; 6]),
    Unresolved,
}

fn in_prefix(addr: &[u8], prefix: &[u8], bits: u32) -> bool {
    let bits = bits as usize;
    (0..bits).all(|i| {
        let (byte, bit) = (i / 8, 7 - i % 8);
        (addr[byte] >> bit) & 1 == (prefix[byte] >> bit) & 1
    })
}

impl Env {
    pub fn fib(&self, dst: [u8; 4]) -> Fib {
        if self.local_addrs.contains(&dst)
            || dst[3] == 255
            || dst[0] >= 224
            || matches!(dst[0], 0 | 127)
        {
            return Fib::Odd;
        }
        let next = if self
            .connected
            .iter()
            .any(|(p, l)| in_prefix(&dst, p, u32::from(*l)))
        {
            dst
        } else if let Some((_, _, gw)) = self
            .routes
            .iter()
            .filter(|(p, l, _)| in_prefix(&dst, p, u32::from(*l)))
            .max_by_key(|(_, l, _)| *l)
        {
            *gw
        } else {
            return Fib::NoRoute;
        };
        match self.neighbours.get(&next) {
            Some(mac) => Fib::Resolved(*mac),
            None => Fib::Unresolved,
        }
    }
}

/// What the maps hold apart from the flow table.
pub struct World<'a> {
    pub maps: &'a MapContents,
    /// `LOCAL`; `None` while it is not written yet (all zero, as just after loading): a packet
    /// that must be encapsulated or redirected is then dropped (`drop_not_configured`). Its
    /// *fenced* byte is read by Tunnel rule 6 alone (the pool bits of a probe's echo).
    pub local: Option<Local>,
    pub env: &'a Env,
}

/// Choices the rules leave to a hash, read from what the programs did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Choices {
    /// (pool address, port) of the claimed reverse entry.
    pub snat: Option<([u8; 16], u16)>,
    /// The peer of a new forwarded entry.
    pub hop: Option<[u8; 4]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// TC_ACT_OK.
    Pass,
    /// TC_ACT_SHOT.
    Drop,
    /// Redirected (TC_ACT_REDIRECT). "Send" is this, except on egress with the neighbour
    /// resolved, where it is TC_ACT_OK ([`Verdict::Pass`]).
    Send,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub verdict: Verdict,
    /// The packet as it leaves (meaningless for a drop).
    pub packet: Vec<u8>,
    /// The one counter the outcome increments (README name).
    pub counter: &'static str,
    /// `mss_clamped` counted on top.
    pub mss_clamped: bool,
    /// How many `port_collision` events the rules allow (inclusive).
    pub collisions: (u64, u64),
    /// The flow table afterwards.
    pub flows: Flows,
    /// `FRAGS` afterwards.
    pub frags: Frags,
    /// Entries whose FIN/RST flag must be what it was (a reopened tuple's old reverse entry).
    pub keep_flags: Vec<FlowKey>,
    /// Entries that must carry a FIN/RST flag afterwards: the socket's FIN or RST went through
    /// its outbound or forwarded entry (egress rule 3: the entry "saw a FIN or RST").
    pub closing_after: Vec<FlowKey>,
    /// Entries the rules leave untouched (no refresh, no flags): compared whole, timestamps
    /// included (another peer's packet on a peer's outbound entry).
    pub untouched: Vec<FlowKey>,
    /// The input frame had bytes past its IP packet (Ethernet padding): the model's packet
    /// ends with the IP packet, the programs' may keep the padding after it.
    pub tail_unspecified: bool,
    /// The bytes the input frame had past its IP packet, when the programs must leave them as
    /// they were if they keep them: an ICMP error passed (its padding is never read as quote,
    /// never rewritten). The programs' packet may end with the model's, or go on with exactly
    /// these bytes.
    pub padding_kept: Option<Vec<u8>>,
    /// Facts of the decision the rules single out, for the differential test's coverage tally
    /// (e.g. a catch-all's prefix over a destination no policy covers).
    pub notes: Vec<&'static str>,
    /// Why the flow table afterwards is not given by the rules (e.g. a drop after recording).
    pub flows_unspecified: Option<&'static str>,
    /// The Ethernet addresses are not given (neighbour unresolved: `bpf_redirect_neigh`).
    pub l2_unspecified: bool,
    /// A choice the model needed but the caller did not give (it used a placeholder).
    pub missing_choice: Option<&'static str>,
    /// The rule that decided.
    pub rule: &'static str,
    /// The skb carries the sent hint for the packet it returns (the word and that packet's
    /// tag) afterwards: on egress the hint it came with while the tuple the tag covers is
    /// unchanged (egress never writes the control block); on ingress set only by `peer_snat`
    /// (the one decision that writes it).
    pub hint_after: bool,
}

#[derive(Debug, Clone)]
pub enum Answer {
    Sure(Box<Outcome>),
    /// The README rules do not decide this packet.
    Silent(&'static str),
    /// The programs' choice (port or next hop) is not one the rules allow.
    BadChoice(String),
}

enum Stop {
    Silent(&'static str),
    BadChoice(String),
}

type R = Result<(Verdict, &'static str, &'static str), Stop>;

fn silent<T>(why: &'static str) -> Result<T, Stop> {
    Err(Stop::Silent(why))
}

/// Egress rule 4: no policy ever covers a destination in IPv4 0.0.0.0/8, 127.0.0.0/8,
/// 169.254.0.0/16 or 224.0.0.0/3 (multicast, reserved, broadcast), or IPv6 ::/16 (NAT64's
/// 64:ff9b::/96 stays coverable), fe80::/10 or ff00::/8, whatever its prefixes say (a
/// catch-all never translates or drops the host's multicast, broadcast and link-local
/// traffic); wherever a policy is asked (egress rule 4, *Fragments*, Tunnel rule 5). `dst`:
/// the address's bytes (at least 4, IPv4; 16, IPv6). Nor does a policy cover an ICMPv6
/// neighbour discovery message ([`ND_TYPES`], to whatever destination).
pub fn never_covered(v6: bool, dst: &[u8]) -> bool {
    if v6 {
        (dst[0] == 0 && dst[1] == 0) || (dst[0] == 0xfe && dst[1] & 0xc0 == 0x80) || dst[0] == 0xff
    } else {
        matches!(dst[0], 0 | 127 | 224..=255) || (dst[0] == 169 && dst[1] == 254)
    }
}

/// [`Outcome::notes`]: a policy's prefix covers the destination, but it lies in a range no
/// policy covers (egress rule 4, or a later fragment on egress; a peer's connection under
/// Tunnel rule 5).
/// ICMPv6 neighbour discovery (router solicitation and advertisement, neighbour solicitation
/// and advertisement, redirect): no policy covers such a message, whatever its destination.
pub const ND_TYPES: std::ops::RangeInclusive<u8> = 133..=137;

pub const NOTE_NEVER_COVERED_ND: &str =
    "no policy covers ICMPv6 neighbour discovery, types 133-137 (a prefix would)";
pub const NOTE_NEVER_COVERED_V4: &str =
    "no policy covers 0/8, 127/8, 169.254/16, 224/3 (a prefix would): IPv4 egress rule 4";
pub const NOTE_NEVER_COVERED_V6: &str =
    "no policy covers ::/16, fe80::/10, ff00::/8 (a prefix would): IPv6 egress rule 4";
pub const NOTE_NEVER_COVERED_FRAGMENT: &str = "no policy covers 0/8, 127/8, ::/16, fe80::/10 ... (a prefix would): a later fragment on egress";
pub const NOTE_NEVER_COVERED_PEER: &str =
    "no policy covers 0/8, 127/8, 169.254/16, 224/3 (a prefix would): a peer's connection";
/// [`Outcome::notes`]: the MSS of a SYN translated to an IPv4 pool address clamped, by how
/// `OWNERS` holds the address.
pub const NOTE_MSS_WHOLE: &str =
    "MSS clamped: translated to an IPv4 pool address of one share (held whole by one server)";
pub const NOTE_MSS_SPLIT: &str = "MSS clamped: translated to an IPv4 address split between shares";
/// [`Outcome::notes`]: a SYN on a path that clamps whose data offset claims the MSS option but
/// whose IP length ends before the option's end, the frame holding an MSS above the tunnel MSS
/// there (padding): not an option, not clamped. By path.
pub const NOTE_MSS_PADDING_FORWARDED: &str =
    "MSS past the IP length (padding) not clamped: forwarded on egress";
pub const NOTE_MSS_PADDING_TRANSLATED: &str =
    "MSS past the IP length (padding) not clamped: translated here to an IPv4 pool address";
pub const NOTE_MSS_PADDING_PEER: &str =
    "MSS past the IP length (padding) not clamped: a peer's connection translated here";
pub const NOTE_MSS_PADDING_REPLY: &str =
    "MSS past the IP length (padding) not clamped: a forwarded connection's reply SYN-ACK";
/// [`Outcome::notes`]: this host's packet on a tuple whose outbound entry names a tunnel (a
/// peer's connection translated here), dropped (`drop_peer_tuple`, egress rule 3), by packet.
pub const NOTE_PEER_TUPLE_SYN: &str = "drop_peer_tuple: a SYN on a peer's open entry";
pub const NOTE_PEER_TUPLE_SYN_CLOSED: &str =
    "drop_peer_tuple: a SYN on a peer's entry that saw a FIN or RST (not reopened)";
pub const NOTE_PEER_TUPLE_DATA: &str = "drop_peer_tuple: TCP data or ACK";
pub const NOTE_PEER_TUPLE_FIN: &str = "drop_peer_tuple: a FIN (the entry not flagged)";
pub const NOTE_PEER_TUPLE_RST: &str = "drop_peer_tuple: an RST (the entry not flagged)";
pub const NOTE_PEER_TUPLE_OTHER: &str = "drop_peer_tuple: UDP or ICMP echo request";
pub const NOTE_PEER_TUPLE_FRAGMENT: &str = "drop_peer_tuple: a first fragment";
/// [`Outcome::notes`]: ICMP errors with bytes past the error's IP length (padding).
pub const NOTE_ICMP_PADDED_SHORT: &str =
    "ICMP error padded: fewer than 8 quoted transport bytes within its IP length, no quote";
pub const NOTE_ICMP_PADDED_CSUM: &str =
    "ICMP error padded: quoted transport checksum past its IP length, not rewritten";
pub const NOTE_ICMP_PADDED_NAT: &str = "ICMP error padded: translated within its IP length";

/// [`Outcome::notes`]: *Fragments* rules 1–3, entries kept apart by the way their later
/// fragments go. A later fragment on egress followed by this host's own leaving entry while an
/// arriving entry (a peer's first fragment in a tunnel, say) holds the same (source,
/// destination, id, protocol); a plain arriving later fragment under the key of a datagram
/// this host SNATs or forwards (leaving), not followed; a later fragment in a tunnel under the
/// key of only a leaving entry, dropped.
pub const NOTE_FRAG_OWN_SNAT: &str =
    "fragments: egress follows its own SNAT entry (leaving), an arriving one under its key";
pub const NOTE_FRAG_OWN_FORWARD: &str =
    "fragments: egress follows its own forward entry (leaving), an arriving one under its key";
pub const NOTE_FRAG_INGRESS_SNAT: &str =
    "fragments: plain ingress under the key of a datagram SNAT'd here (leaving): not followed";
pub const NOTE_FRAG_INGRESS_FORWARD: &str =
    "fragments: plain ingress under the key of a datagram forwarded here (leaving): not followed";
pub const NOTE_FRAG_TUNNEL_LEAVING: &str =
    "fragments: in a tunnel under the key of only a leaving entry: dropped";
/// [`Outcome::notes`]: Tunnel rule 2, kinds *reply* and *soft-unicast* bring replies only: an
/// inner echo request dropped (`drop_tunnel_kind`); for kind *reply*, one whose swapped tuple
/// is a forwarded entry of this very peer (an echo forwarded with identifier 0).
pub const NOTE_ECHO_REQUEST_REPLY_FORWARDED: &str = "drop_tunnel_kind: an echo request in a reply tunnel from the peer of a forwarded echo its swapped tuple matches";
pub const NOTE_ECHO_REQUEST_REPLY: &str = "drop_tunnel_kind: an echo request in a reply tunnel";
pub const NOTE_ECHO_REQUEST_SOFT_UNICAST: &str =
    "drop_tunnel_kind: an echo request in a soft-unicast tunnel";

/// [`Outcome::notes`]: an IPv4 packet carrying the sent hint for itself, passed
/// (`ours_hinted`, egress rule 5, right after rule 2) by what its tuple has in the flow table.
pub const NOTE_HINT_REVERSE: &str =
    "ours_hinted: the swapped tuple has a peer's reverse entry (the usual second pass)";
pub const NOTE_HINT_NO_REVERSE: &str =
    "ours_hinted: no peer's reverse entry for the swapped tuple (nothing asked)";
pub const NOTE_HINT_OUTBOUND: &str =
    "ours_hinted: the tuple has a local outbound entry (rule 3 would translate)";

/// The fields of an (untagged) IPv4 frame the sent hint's tag covers (*Sent hint*): source,
/// destination, ports (ICMP: the identifier and 0), protocol. None for anything else.
fn sent_tuple(p: &[u8]) -> Option<([u8; 8], u16, u16, u8)> {
    if p.get(12..14)? != ETHERTYPE_IPV4.to_be_bytes() {
        return None;
    }
    let l4 = ETH_LEN + usize::from(p.get(ETH_LEN)? & 0xf) * 4;
    let addrs: [u8; 8] = p.get(ETH_LEN + 12..ETH_LEN + 20)?.try_into().ok()?;
    let proto = *p.get(ETH_LEN + 9)?;
    let at = |i: usize| Some(u16::from_be_bytes(p.get(i..i + 2)?.try_into().ok()?));
    let (sp, dp) = match proto {
        PROTO_TCP | PROTO_UDP => (at(l4)?, at(l4 + 2)?),
        PROTO_ICMP => (at(l4 + 4)?, 0),
        _ => return None,
    };
    Some((addrs, sp, dp, proto))
}

pub fn key(family: u8, proto: u8, src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> FlowKey {
    FlowKey {
        src,
        dst,
        src_port_be: sport.to_be(),
        dst_port_be: dport.to_be(),
        proto,
        family,
        _pad: [0; 2],
    }
}

pub fn swap(k: &FlowKey) -> FlowKey {
    FlowKey {
        src: k.dst,
        dst: k.src,
        src_port_be: k.dst_port_be,
        dst_port_be: k.src_port_be,
        ..*k
    }
}

/// The tuple of a packet as the side that opened the connection sends it (TCP/UDP ports; echo
/// request: identifier, 0).
fn conn_tuple(ip: &Ip, l4: &L4) -> Option<FlowKey> {
    let k = |s, d| Some(key(ip.family(), ip.proto, ip.src, ip.dst, s, d));
    match *l4 {
        L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => k(sport, dport),
        L4::Echo { request: true, id } => k(id, 0),
        _ => None,
    }
}

/// The tuple of a packet as a reply arrives (TCP/UDP ports; echo reply: 0, identifier).
fn reply_tuple(ip: &Ip, l4: &L4) -> Option<FlowKey> {
    let k = |s, d| Some(key(ip.family(), ip.proto, ip.src, ip.dst, s, d));
    match *l4 {
        L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => k(sport, dport),
        L4::Echo { request: false, id } => k(0, id),
        _ => None,
    }
}

fn addr16(a: &[u8]) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..a.len()].copy_from_slice(a);
    b
}

fn a4(a: &[u8; 16]) -> [u8; 4] {
    a[..4].try_into().unwrap()
}

/// What the skb carries besides the packet: its mark, and on egress whether its control block
/// holds the ingress program's sent hint for this very packet (the hint word and the tag of
/// the packet's own tuple; the word alone, or with another packet's tag, is `false`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Skb {
    pub mark: u32,
    pub hinted: bool,
}

/// Runs the model on one packet.
pub fn run(
    w: &World,
    flows: &Flows,
    frags: &Frags,
    hook: Hook,
    skb: Skb,
    packet: &[u8],
    choices: &Choices,
) -> Answer {
    let Skb { mark, hinted } = skb;
    let mut cx = Cx {
        w,
        ch: choices,
        flows: flows.clone(),
        frags: frags.clone(),
        keep_flags: Vec::new(),
        closing_after: Vec::new(),
        untouched: Vec::new(),
        tail_unspecified: false,
        padding: Vec::new(),
        notes: Vec::new(),
        hook,
        p: packet.to_vec(),
        l3: ETH_LEN,
        vlan_tags: 0,
        mss_clamped: false,
        collisions: (0, 0),
        flows_unspecified: None,
        l2_unspecified: false,
        missing_choice: None,
    };
    let r = match hook {
        Hook::Egress => cx.egress(mark, hinted),
        Hook::Ingress => cx.ingress(),
    };
    match r {
        Ok((verdict, counter, rule)) => Answer::Sure(Box::new(Outcome {
            // *Sent hint*: written by the ingress program when it translates a peer's
            // connection and redirects it out of the uplink (`peer_snat`), by no other path.
            hint_after: match hook {
                Hook::Egress => hinted && sent_tuple(&cx.p) == sent_tuple(packet),
                Hook::Ingress => counter == "peer_snat" && verdict == Verdict::Send,
            },
            verdict,
            packet: cx.p,
            counter,
            mss_clamped: cx.mss_clamped,
            collisions: cx.collisions,
            flows: cx.flows,
            frags: cx.frags,
            keep_flags: cx.keep_flags,
            closing_after: cx.closing_after,
            untouched: cx.untouched,
            tail_unspecified: cx.tail_unspecified,
            // ICMP errors: bytes after the error's IP length are never rewritten.
            padding_kept: (hook == Hook::Ingress
                && rule.starts_with("icmp")
                && verdict == Verdict::Pass
                && !cx.padding.is_empty())
            .then(|| cx.padding.clone()),
            notes: cx.notes,
            flows_unspecified: cx.flows_unspecified,
            l2_unspecified: cx.l2_unspecified,
            missing_choice: cx.missing_choice,
            rule,
        })),
        Err(Stop::Silent(why)) => Answer::Silent(why),
        Err(Stop::BadChoice(why)) => Answer::BadChoice(why),
    }
}

struct Cx<'a> {
    w: &'a World<'a>,
    ch: &'a Choices,
    flows: Flows,
    frags: Frags,
    keep_flags: Vec<FlowKey>,
    closing_after: Vec<FlowKey>,
    untouched: Vec<FlowKey>,
    tail_unspecified: bool,
    /// The input frame's bytes past its IP packet (cut off by [`Cx::trim`]).
    padding: Vec<u8>,
    /// [`Outcome::notes`].
    notes: Vec<&'static str>,
    hook: Hook,
    p: Vec<u8>,
    /// Frame offset of the (outer) IP header: after the Ethernet header and its VLAN tags.
    l3: usize,
    /// VLAN tags read in the frame data (up to two).
    vlan_tags: usize,
    mss_clamped: bool,
    collisions: (u64, u64),
    flows_unspecified: Option<&'static str>,
    l2_unspecified: bool,
    missing_choice: Option<&'static str>,
}

fn pass(counter: &'static str, rule: &'static str) -> R {
    Ok((Verdict::Pass, counter, rule))
}
fn drop(counter: &'static str, rule: &'static str) -> R {
    Ok((Verdict::Drop, counter, rule))
}

impl Cx<'_> {
    // ---------------------------------------------------------------- map look-ups

    /// POLICY_V4/V6 for exactly this mark: longest prefix over generation ‖ mark ‖
    /// destination (a computed plan is generation 0).
    fn lookup(&self, mark: u32, ip: &Ip) -> Option<u32> {
        let mut want = 0u32.to_be_bytes().to_vec();
        want.extend_from_slice(&mark.to_be_bytes());
        if ip.v6 {
            want.extend_from_slice(&ip.dst);
            self.w
                .maps
                .policies_v6
                .iter()
                .filter(|((plen, k), _)| {
                    let mut have = k.gen_be.to_ne_bytes().to_vec();
                    have.extend_from_slice(&k.mark_be.to_ne_bytes());
                    have.extend_from_slice(&k.addr);
                    in_prefix(&want, &have, *plen)
                })
                .max_by_key(|((plen, _), _)| *plen)
                .map(|(_, v)| v.pool)
        } else {
            want.extend_from_slice(&ip.dst[..4]);
            self.w
                .maps
                .policies_v4
                .iter()
                .filter(|((plen, k), _)| {
                    let mut have = k.gen_be.to_ne_bytes().to_vec();
                    have.extend_from_slice(&k.mark_be.to_ne_bytes());
                    have.extend_from_slice(&k.addr);
                    in_prefix(&want, &have, *plen)
                })
                .max_by_key(|((plen, _), _)| *plen)
                .map(|(_, v)| v.pool)
        }
    }

    /// Egress rule 4: (mark, destination), else (0, destination); never a destination no
    /// policy covers ([`never_covered`]).
    fn policy(&mut self, mark: u32, ip: &Ip) -> Option<u32> {
        let pool = self
            .lookup(mark, ip)
            .or_else(|| if mark != 0 { self.lookup(0, ip) } else { None });
        if pool.is_some() && self.nd_message(ip) {
            self.notes.push(NOTE_NEVER_COVERED_ND);
            return None;
        }
        if pool.is_some() && never_covered(ip.v6, &ip.dst) {
            self.notes.push(match (ip.later(), ip.v6) {
                (true, _) => NOTE_NEVER_COVERED_FRAGMENT,
                (false, true) => NOTE_NEVER_COVERED_V6,
                (false, false) => NOTE_NEVER_COVERED_V4,
            });
            return None;
        }
        pool
    }

    /// An ICMPv6 neighbour discovery message (by its type, [`ND_TYPES`]): a whole packet or
    /// first fragment whose ICMPv6 type byte is there (the type decides, however short).
    fn nd_message(&self, ip: &Ip) -> bool {
        ip.v6
            && ip.proto == PROTO_ICMPV6
            && !ip.ext
            && !ip.later()
            && ip.end > ip.l4()
            && ND_TYPES.contains(&self.p[ip.l4()])
    }

    /// PEER_POLICY: a policy of `pool` (any mark) covers the IPv4 destination (never one in
    /// the ranges no policy covers, [`never_covered`]).
    fn peer_policy(&mut self, pool: u32, dst: [u8; 4]) -> bool {
        let covered = self.w.maps.policies_v4.iter().any(|((plen, k), v)| {
            let bits = egress_common::policy::MARK_BITS;
            v.pool == pool && *plen >= bits && in_prefix(&dst, &k.addr, plen - bits)
        });
        if covered && never_covered(false, &dst) {
            self.notes.push(NOTE_NEVER_COVERED_PEER);
            return false;
        }
        covered
    }

    /// Whether an address is an IPv4 pool address in `OWNERS`, split between shares or held
    /// whole by one server: the MSS of a SYN translated to it is clamped (its replies may reach
    /// another announcing server and come through a tunnel).
    fn in_owners(&self, addr: [u8; 4]) -> bool {
        self.w.maps.owners.contains_key(&gen0(addr))
    }

    /// The owner of `port` of a shared IPv4 address (any key of `OWNERS`, one share or more)
    /// when it is another server: (owner, pool).
    ///
    /// While `LOCAL` is not written this server's fabric address is unknown: a range of a
    /// server in `PEERS` is another server's; any other range (this server's own, as a rule)
    /// the rules do not decide.
    fn other_owner(&self, addr: [u8; 4], port: u16) -> Result<Option<([u8; 4], u32)>, Stop> {
        let Some(o) = self.w.maps.owners.get(&gen0(addr)) else {
            return Ok(None);
        };
        let Some(r) = o.ranges[..(o.count as usize).min(o.ranges.len())]
            .iter()
            .find(|r| (r.port_min..=r.port_max).contains(&port))
        else {
            return Ok(None);
        };
        match self.w.local {
            Some(l) => Ok((r.fabric != l.fabric).then_some((r.fabric, o.pool))),
            None if self.is_peer(r.fabric) => Ok(Some((r.fabric, o.pool))),
            None => silent(
                "LOCAL not written: is a port range of a server not in PEERS this server's own",
            ),
        }
    }

    /// `LOCAL`, for a rule that reads it: while it is not written (this server's fabric
    /// address unknown) the rules do not say what such a rule decides.
    fn local(&self, why: &'static str) -> Result<Local, Stop> {
        self.w.local.ok_or(Stop::Silent(why))
    }

    fn is_peer(&self, a: [u8; 4]) -> bool {
        self.w.maps.peers.contains_key(&gen0(a))
    }

    /// The owner's `PEERS` entry says its fabric probes go unanswered (flag 1; the other bits
    /// play no part in the rules).
    fn owner_down(&self, owner: [u8; 4]) -> bool {
        self.w
            .maps
            .peers
            .get(&gen0(owner))
            .is_some_and(|p| p.flags & PEER_PROBES_UNANSWERED != 0)
    }

    // ---------------------------------------------------------------- choices

    /// The claim of a port (egress rule 7): the reverse entry's insert-if-absent over up to 32
    /// probes of `targets`. Ok(None): every probe failed.
    fn claim(
        &mut self,
        targets: &[SnatTarget],
        family: u8,
        proto: u8,
        remote: [u8; 16],
        rport: u16,
        // The packet will be dropped after the claim (which is then released, leaving no trace).
        released: bool,
    ) -> Result<Option<(SnatTarget, u16)>, Stop> {
        if targets.is_empty() {
            return silent("snat action without targets");
        }
        let taken = |t: &SnatTarget, flows: &Flows| -> u64 {
            flows
                .keys()
                .filter(|k| {
                    k.family == family
                        && k.proto == proto
                        && k.src == remote
                        && k.src_port_be == rport.to_be()
                        && k.dst == t.addr
                        && (t.port_min..=t.port_max).contains(&u16::from_be(k.dst_port_be))
                })
                .count() as u64
        };
        let n = 32 / targets.len() as u64;
        let mut certain = true;
        let mut possible = true;
        let mut any = false;
        for t in targets {
            let range = u64::from(t.port_max.saturating_sub(t.port_min)) + 1;
            let k = taken(t, &self.flows);
            any |= k > 0;
            certain &= k >= range;
            possible &= k >= range.min(n);
        }
        match self.ch.snat {
            Some((addr, port)) => {
                let Some(t) = targets
                    .iter()
                    .find(|t| t.addr == addr && (t.port_min..=t.port_max).contains(&port))
                else {
                    return Err(Stop::BadChoice(format!(
                        "claimed {}:{port}, not in this server's SNAT targets {:?}",
                        show_addr(&addr, family),
                        targets
                            .iter()
                            .map(|t| format!(
                                "{} {}-{}",
                                show_addr(&t.addr, family),
                                t.port_min,
                                t.port_max
                            ))
                            .collect::<Vec<_>>()
                    )));
                };
                let rk = key(family, proto, remote, t.addr, rport, port);
                if self.flows.contains_key(&rk) {
                    return Err(Stop::BadChoice(format!(
                        "claimed {}:{port}, which collides with an existing entry",
                        show_addr(&addr, family)
                    )));
                }
                if certain {
                    return Err(Stop::BadChoice(
                        "claimed a port although every port of every target was taken".into(),
                    ));
                }
                self.collisions = if any { (0, 31) } else { (0, 0) };
                Ok(Some((*t, port)))
            }
            None if possible && released => {
                silent("no claim visible: every probe collided, or a claim was released")
            }
            None if possible => {
                self.collisions = (32, 32);
                Ok(None)
            }
            None => {
                // No claim visible: the programs claimed none, or released it when the packet
                // was then dropped (any number of probes may have collided first).
                self.missing_choice = Some("a port claim (the programs claimed none)");
                self.collisions = if any { (0, 31) } else { (0, 0) };
                for t in targets {
                    for port in t.port_min..=t.port_max {
                        if !self
                            .flows
                            .contains_key(&key(family, proto, remote, t.addr, rport, port))
                        {
                            return Ok(Some((*t, port)));
                        }
                    }
                }
                unreachable!("not every port is taken")
            }
        }
    }

    /// The next hop of a new forwarded connection; `None` for an action without next hops
    /// (egress rule 7: `drop_no_hops`).
    fn hop(&mut self, hops: &[[u8; 4]]) -> Result<Option<[u8; 4]>, Stop> {
        if hops.is_empty() {
            return Ok(None);
        }
        match self.ch.hop {
            Some(h) if hops.contains(&h) => Ok(Some(h)),
            Some(h) => Err(Stop::BadChoice(format!(
                "forwarded to {}, not one of the planned hops {:?}",
                show_addr(&addr16(&h), 4),
                hops.iter()
                    .map(|h| show_addr(&addr16(h), 4))
                    .collect::<Vec<_>>()
            ))),
            None => {
                self.missing_choice = Some("a next hop (the programs recorded none)");
                Ok(Some(hops[0]))
            }
        }
    }

    // ---------------------------------------------------------------- rewrites

    /// Rewrites the source (`src`) or destination address of `ip`, fixing the IPv4 header
    /// checksum and the transport checksum when it covers a pseudo-header.
    fn set_addr(&mut self, ip: &Ip, src: bool, new: &[u8; 16], l4_csum_of: Option<usize>) {
        let (at, n) = if src { ip.src_at() } else { ip.dst_at() };
        let old = self.p[at..at + n].to_vec();
        let new = &new[..n];
        if !ip.v6 {
            fix_csum(&mut self.p, ip.at + 10, false, &old, new);
        }
        if let Some(l4) = l4_csum_of
            && let Some((off, true)) = l4_csum(ip.v6, ip.proto)
        {
            fix_csum(&mut self.p, l4 + off, ip.proto == PROTO_UDP, &old, new);
        }
        self.p[at..at + n].copy_from_slice(new);
    }

    /// Writes a 16-bit word of the transport header of `ip` at `at`, fixing its checksum.
    fn set_l4_word(&mut self, ip: &Ip, at: usize, v: u16) {
        let old = self.p[at..at + 2].to_vec();
        let (off, _) = l4_csum(ip.v6, ip.proto).expect("a transport with a checksum");
        fix_csum(
            &mut self.p,
            ip.l4() + off,
            ip.proto == PROTO_UDP,
            &old,
            &v.to_be_bytes(),
        );
        put16(&mut self.p, at, v);
    }

    /// Source → (addr, port): the port is the TCP/UDP source port or the echo identifier.
    fn snat(&mut self, ip: &Ip, l4: &L4, addr: [u8; 16], port: u16) {
        self.set_addr(ip, true, &addr, Some(ip.l4()));
        let at = match l4 {
            L4::Echo { .. } => ip.l4() + 4,
            _ => ip.l4(),
        };
        self.set_l4_word(ip, at, port);
    }

    /// Destination → (addr, port): TCP/UDP destination port or the echo identifier.
    fn dnat(&mut self, ip: &Ip, l4: &L4, addr: [u8; 16], port: u16) {
        self.set_addr(ip, false, &addr, Some(ip.l4()));
        let at = match l4 {
            L4::Echo { .. } => ip.l4() + 4,
            _ => ip.l4() + 2,
        };
        self.set_l4_word(ip, at, port);
    }

    /// The MSS exceeds the tunnel MSS, read only where it is the first TCP option and lies
    /// within the IP packet: bytes past the IP length are padding, never an option (an option
    /// reaching past it is not clamped, its bytes inside the packet or not). `padding_note`:
    /// noted when the frame holds, past the IP length, an MSS option above the tunnel MSS where
    /// the data offset claims one (what a clamp reading the frame would have taken).
    fn mss_too_big(
        &mut self,
        ip: &Ip,
        l4: &L4,
        padding_note: Option<&'static str>,
    ) -> Result<bool, Stop> {
        let L4::Tcp { doff, .. } = *l4 else {
            return Ok(false);
        };
        let at = ip.l4();
        if doff < 24 {
            return Ok(false);
        }
        if at + 24 > ip.end {
            // Not within the IP packet: not an option.
            if let Some(note) = padding_note
                && self.padding_mss_too_big(at)
            {
                self.notes.push(note);
            }
            return Ok(false);
        }
        if self.p[at + 20] != 2 {
            return Ok(false);
        }
        let mss = self
            .local("an MSS to clamp while LOCAL (the tunnel MSS) is not written")?
            .mss_v4;
        if doff > ip.end - at && be16(&self.p, at + 22) > mss {
            return silent("TCP data offset beyond the packet, an MSS in its place: clamp or not");
        }
        if self.p[at + 21] != 4 {
            return silent("MSS option whose length is not 4");
        }
        Ok(be16(&self.p, at + 22) > mss)
    }

    /// The frame (the packet, then the padding [`Cx::trim`] cut off) holds an MSS option above
    /// the tunnel MSS at the first option's place, `at` the TCP header.
    fn padding_mss_too_big(&self, at: usize) -> bool {
        let byte = |i: usize| match self.p.get(i) {
            Some(b) => Some(*b),
            None => self.padding.get(i - self.p.len()).copied(),
        };
        let (Some(kind), Some(len), Some(hi), Some(lo)) =
            (byte(at + 20), byte(at + 21), byte(at + 22), byte(at + 23))
        else {
            return false;
        };
        let Some(local) = self.w.local else {
            return false;
        };
        kind == 2 && len == 4 && u16::from_be_bytes([hi, lo]) > local.mss_v4
    }

    /// Clamps the MSS of `ip` (a segment with SYN set on a path that clamps); `padding_note`
    /// names the path for an MSS past the IP length (not clamped).
    fn clamp(&mut self, ip: &Ip, l4: &L4, padding_note: &'static str) -> Result<(), Stop> {
        if self.mss_too_big(ip, l4, Some(padding_note))? {
            let at = ip.l4() + 22;
            let mss = self
                .local("an MSS to clamp while LOCAL is not written")?
                .mss_v4;
            self.set_l4_word(ip, at, mss);
            self.mss_clamped = true;
        }
        Ok(())
    }

    fn tcp_flags(l4: &L4) -> u8 {
        match *l4 {
            L4::Tcp { flags, .. } => flags,
            _ => 0,
        }
    }

    /// A segment with SYN set (SYN or SYN-ACK) translated here (or by a peer's connection) to
    /// `to`: clamped when it is an IPv4 pool address in `OWNERS`, split or held whole.
    fn clamp_translated(&mut self, ip: &Ip, l4: &L4, to: [u8; 16]) -> Result<(), Stop> {
        if Self::tcp_flags(l4) & TCP_SYN == 0 || ip.v6 || !self.in_owners(a4(&to)) {
            return Ok(());
        }
        let padding_note = match self.hook {
            Hook::Egress => NOTE_MSS_PADDING_TRANSLATED,
            Hook::Ingress => NOTE_MSS_PADDING_PEER,
        };
        self.clamp(ip, l4, padding_note)?;
        if self.mss_clamped {
            let split = self
                .w
                .maps
                .owners
                .get(&gen0(a4(&to)))
                .is_some_and(|o| o.count > 1);
            self.notes.push(if split {
                NOTE_MSS_SPLIT
            } else {
                NOTE_MSS_WHOLE
            });
        }
        Ok(())
    }

    /// How "send" ends: TC_ACT_OK on egress with the neighbour resolved, else a redirect.
    fn sent(&self) -> Verdict {
        if self.hook == Hook::Egress && !self.l2_unspecified {
            Verdict::Pass
        } else {
            Verdict::Send
        }
    }

    /// Ethernet padding is not part of the packet: the model's frame ends with the IP packet.
    fn trim(&mut self, ip: &mut Ip) {
        if ip.padded {
            self.padding = self.p[ip.end..].to_vec();
            self.p.truncate(ip.end);
            ip.padded = false;
            self.tail_unspecified = true;
        }
    }

    /// *Hops*: a packet sent on to another host has its IPv4 TTL (`ip`: the inner packet of a
    /// tunnelled one) decremented and the header checksum fixed, before anything else is
    /// written. Err(drop counter) for a TTL of 0 or 1.
    fn hop_ttl(&mut self, ip: &Ip) -> Result<Result<(), &'static str>, Stop> {
        if ip.v6 {
            return silent("IPv6 packet to be sent on to another host (GRE carries IPv4)");
        }
        let at = ip.at + 8;
        let ttl = self.p[at];
        if ttl <= 1 {
            // Every hop is then encapsulated or redirected: the rules do not order
            // `drop_ttl_exceeded` and `drop_not_configured`.
            self.local("TTL 0 or 1 on a hop while LOCAL is not written: which drop")?;
            return Ok(Err("drop_ttl_exceeded"));
        }
        let (old, new) = ([ttl, self.p[at + 1]], [ttl - 1, self.p[at + 1]]);
        fix_csum(&mut self.p, ip.at + 10, false, &old, &new);
        self.p[at] = ttl - 1;
        Ok(Ok(()))
    }

    /// Ethernet addresses towards `dst`. Err(drop counter) without a route.
    fn route(&mut self, dst: [u8; 4]) -> Result<Result<(), &'static str>, Stop> {
        match self.w.env.fib(dst) {
            Fib::NoRoute => Ok(Err("drop_no_route")),
            Fib::Odd => silent("next hop is a local or broadcast address"),
            Fib::Unresolved => {
                self.l2_unspecified = true;
                self.p[6..12].copy_from_slice(&self.w.env.uplink_mac);
                Ok(Ok(()))
            }
            Fib::Resolved(mac) => {
                self.p[0..6].copy_from_slice(&mac);
                self.p[6..12].copy_from_slice(&self.w.env.uplink_mac);
                Ok(Ok(()))
            }
        }
    }

    /// Wraps the IPv4 packet at 14 in outer IPv4 + GRE to `peer` with `gre_key`.
    /// Err(drop counter) when the frame is tagged, does not fit or has no route.
    fn encap(
        &mut self,
        ip: &Ip,
        peer: [u8; 4],
        gre_key: u32,
    ) -> Result<Result<(), &'static str>, Stop> {
        // *Encapsulation*: a frame with VLAN tags in its data is never encapsulated, checked
        // first (the tunnel is built for an untagged uplink).
        let tagged = self.vlan_tags > 0;
        if tagged && self.w.local.is_some() {
            return Ok(Err("drop_vlan_tunnel"));
        }
        if ip.v6 {
            return silent("IPv6 packet to be encapsulated (GRE carries IPv4)");
        }
        debug_assert!(!ip.padded, "trimmed first");
        let inner_len = self.p.len() - self.l3;
        let too_big = inner_len + 28 > self.w.env.mtu;
        let Some(local) = self.w.local else {
            // A packet that must be encapsulated while `LOCAL` is not written (egress rule 7,
            // "in every program"). Where that drop stands among the encapsulation's own (tags,
            // too big, no route) the rules do not say.
            if tagged
                || too_big
                || !matches!(self.w.env.fib(peer), Fib::Resolved(_) | Fib::Unresolved)
            {
                return silent(
                    "LOCAL not written and the encapsulation fails too (tags, too big, no route): which drop",
                );
            }
            return Ok(Err("drop_not_configured"));
        };
        debug_assert_eq!(self.l3, ETH_LEN, "untagged");
        // *Encapsulation*: too big is checked before the route.
        if too_big {
            return Ok(Err("drop_encap_too_big"));
        }
        // Ethernet padding after the IP packet is cut before encapsulating (trimmed already).
        self.tail_unspecified = false;
        let mut outer = vec![0x45, 0];
        outer.extend_from_slice(&((inner_len + 28) as u16).to_be_bytes());
        outer.extend_from_slice(&[0, 0, 0x40, 0, 64, PROTO_GRE, 0, 0]);
        outer.extend_from_slice(&local.fabric);
        outer.extend_from_slice(&peer);
        let c = checksum(&outer);
        put16(&mut outer, 10, c);
        outer.extend_from_slice(&[0x20, 0x00, 0x08, 0x00]);
        outer.extend_from_slice(&gre_key.to_be_bytes());
        let mut p = self.p[..ETH_LEN].to_vec();
        p[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        p.extend_from_slice(&outer);
        p.extend_from_slice(&self.p[ETH_LEN..]);
        self.p = p;
        self.route(peer)
    }

    /// Removes the outer IPv4 + GRE (28 bytes after the Ethernet header; a tunnel packet is
    /// untagged, tagged ones are dropped by Tunnel rule 1).
    fn strip(&mut self) {
        debug_assert_eq!(self.l3, ETH_LEN, "untagged");
        self.p.drain(ETH_LEN..ETH_LEN + 28);
    }

    /// Tunnel rule 2 with a tunnel (and rule 6, a probe request): a fresh outer header, exactly
    /// as *Encapsulation* builds one, written over the one the packet came with.
    fn reencap_in_place(
        &mut self,
        tunnel: [u8; 4],
        pool: u32,
    ) -> Result<Result<(), &'static str>, Stop> {
        debug_assert_eq!(self.l3, ETH_LEN, "untagged");
        // Only tunnel packets come here, on which the model is silent without `LOCAL`.
        let local = self.local("a tunnel packet while LOCAL is not written")?;
        let o = ETH_LEN;
        let total = (self.p.len() - ETH_LEN) as u16;
        let mut outer = vec![0x45, 0];
        outer.extend_from_slice(&total.to_be_bytes());
        outer.extend_from_slice(&[0, 0, 0x40, 0, 64, PROTO_GRE, 0, 0]);
        outer.extend_from_slice(&local.fabric);
        outer.extend_from_slice(&tunnel);
        let c = checksum(&outer);
        put16(&mut outer, 10, c);
        outer.extend_from_slice(&[0x20, 0x00, 0x08, 0x00]);
        outer.extend_from_slice(&pool.to_be_bytes());
        self.p[o..o + 28].copy_from_slice(&outer);
        self.route(tunnel)
    }

    // ---------------------------------------------------------------- TC egress

    /// Ethernet through up to two VLAN tags: the ethertype after them (the IP header's offset
    /// and the tags read are kept); `None` for a third tag, which makes the frame malformed
    /// (rule 1 of either hook).
    fn read_l2(&mut self) -> Result<Option<u16>, Stop> {
        match l2(&self.p) {
            L2::Read {
                ethertype,
                l3,
                tags,
            } => {
                self.l3 = l3;
                self.vlan_tags = tags;
                Ok(Some(ethertype))
            }
            L2::ThirdTag => Ok(None),
            L2::Short => silent("frame ends inside a VLAN tag"),
        }
    }

    fn egress(&mut self, mark: u32, hinted: bool) -> R {
        let Some(ethertype) = self.read_l2()? else {
            return drop("egress_malformed", "egress 1: a third VLAN tag");
        };
        let mut ip = match parse_ip(&self.p, self.l3, Some(ethertype)) {
            IpParse::NotIp => return pass("egress_not_ip", "egress 1: not IP"),
            IpParse::Bad => return drop("egress_malformed", "egress 1: bad IP header"),
            // An IP length beyond the frame is a bad IP header too.
            IpParse::Long(_) => {
                return drop("egress_malformed", "egress 1: IP length beyond the frame");
            }
            IpParse::Silent(s) => return silent(s),
            IpParse::Ok(ip) => ip,
        };
        self.trim(&mut ip);
        // 2. Own packets.
        if !ip.v6 && ip.proto == PROTO_GRE && self.is_peer(ip.dst4()) {
            let local = self.local("egress GRE to a peer while LOCAL (this server's fabric address) is not written: own or not")?;
            if ip.src4() == local.fabric {
                return pass("ours_passed", "egress 2: own GRE");
            }
        }
        if ip.later() {
            return self.egress_later_fragment(&ip, mark);
        }
        let l4 = parse_l4(&self.p, &ip).or_else(silent)?;
        // A leaving echo reply is not translatable (*Encapsulation*): it has no connection
        // tuple, so rules 3 and 5 do not see it; under a policy rule 6 drops it.
        let tuple = conn_tuple(&ip, &l4);
        // 5, the sent hint: an IPv4 packet (whole or a first fragment) carrying the ingress
        // program's hint for itself (the word and its own tuple's tag) is asked nothing at
        // all: it passes right after rule 2, whatever rules 3–5 would have said and whatever
        // the flow table holds (nothing in it is read or changed: no reopen, no refresh). The
        // tag is of the packet's tuple (*Sent hint*: source, destination, ports — an echo
        // request: its identifier and 0 —, protocol): a packet without one (an echo reply or
        // other ICMP, a protocol without ports, a transport header cut short) has no tag of
        // its own, and the hint word on it counts for nothing.
        if hinted && !ip.v6 && tuple.is_some() {
            self.note_hinted(tuple);
            return pass(
                "ours_hinted",
                "egress 5: the sent hint (right after rule 2)",
            );
        }
        // 3. Established. A TCP SYN without ACK on an outbound or forwarded entry that saw a
        // FIN or RST (the socket's: its FIN/RST flags) starts a new connection: the old entry
        // goes and the packet goes on to rule 4, whatever rules 4–7 then decide.
        let mut reopened: Option<u8> = None;
        if let Some(k) = tuple
            && let Some(v) = self.flows.get(&k).copied()
        {
            let f = Self::tcp_flags(&l4);
            let tcp = matches!(l4, L4::Tcp { .. });
            let syn_only = tcp && f & TCP_SYN != 0 && f & TCP_ACK == 0;
            let reopens = syn_only && v.flags & FLOW_F_CLOSING != 0;
            // The socket's FIN or RST on its entry: the entry has seen it (what makes a later
            // SYN on the tuple a new connection).
            let closes = tcp && f & (TCP_FIN | TCP_RST) != 0;
            match v.kind {
                // A peer's connection translated here under this very tuple: this host's
                // packet never takes its binding. Dropped, the entry untouched (not refreshed,
                // not flagged by a FIN or RST, not retired by a SYN that would reopen it).
                FLOW_OUTBOUND if v.tunnel != [0; 4] => {
                    self.untouched.push(k);
                    self.notes.push(if ip.first() {
                        NOTE_PEER_TUPLE_FRAGMENT
                    } else if syn_only && v.flags & FLOW_F_CLOSING != 0 {
                        NOTE_PEER_TUPLE_SYN_CLOSED
                    } else if tcp && f & TCP_SYN != 0 {
                        NOTE_PEER_TUPLE_SYN
                    } else if tcp && f & TCP_RST != 0 {
                        NOTE_PEER_TUPLE_RST
                    } else if tcp && f & TCP_FIN != 0 {
                        NOTE_PEER_TUPLE_FIN
                    } else if tcp {
                        NOTE_PEER_TUPLE_DATA
                    } else {
                        NOTE_PEER_TUPLE_OTHER
                    });
                    return drop("drop_peer_tuple", "egress 3: a peer's outbound entry");
                }
                FLOW_OUTBOUND if reopens => {
                    // Reopened: the old outbound entry goes, its reverse entry stays as it is
                    // (old port, old FIN/RST flags).
                    self.flows.remove(&k);
                    let rk = key(
                        k.family,
                        k.proto,
                        k.dst,
                        v.addr,
                        u16::from_be(k.dst_port_be),
                        u16::from_be(v.port_be),
                    );
                    if self.flows.contains_key(&rk) {
                        self.keep_flags.push(rk);
                    }
                    reopened = Some(FLOW_OUTBOUND);
                }
                FLOW_OUTBOUND => {
                    let port = u16::from_be(v.port_be);
                    self.snat(&ip, &l4, v.addr, port);
                    self.clamp_translated(&ip, &l4, v.addr)?;
                    self.record_frag(
                        &ip,
                        Way::Leaving,
                        FragEntry::Source {
                            addr: v.addr,
                            peer: None,
                        },
                    );
                    if closes {
                        self.closing_after.push(k);
                    }
                    return pass("snat_established", "egress 3: outbound entry");
                }
                FLOW_FORWARDED if reopens => {
                    // Reopened: the old forwarded entry goes (there is no reverse entry here),
                    // and the new connection takes the path the plan gives now, not the old
                    // peer.
                    self.flows.remove(&k);
                    reopened = Some(FLOW_FORWARDED);
                }
                FLOW_FORWARDED => {
                    if f & TCP_SYN != 0 {
                        self.clamp(&ip, &l4, NOTE_MSS_PADDING_FORWARDED)?;
                    }
                    let first = frag_key(&ip, Way::Leaving);
                    let gre_key = tunnel_key(KIND_CONNECTION, v.pool);
                    return match self.encap(&ip, v.tunnel, gre_key)? {
                        Ok(()) => {
                            self.record_frag_at(
                                &ip,
                                first,
                                FragEntry::Encapsulate {
                                    to: v.tunnel,
                                    pool: v.pool,
                                },
                            );
                            if closes {
                                self.closing_after.push(k);
                            }
                            Ok((
                                self.sent(),
                                "forward_established",
                                "egress 3: forwarded entry",
                            ))
                        }
                        Err(c) => drop(c, "egress 3: forwarded entry, encapsulation failed"),
                    };
                }
                _ => return drop("drop_reply_shaped", "egress 3: reverse entry"),
            }
        }
        // The rule of a reopened tuple's packet names what it reopened.
        let rule =
            |plain: &'static str, outbound: &'static str, forwarded: &'static str| match reopened {
                None => plain,
                Some(FLOW_OUTBOUND) => outbound,
                Some(_) => forwarded,
            };
        // 4. Policy.
        let Some(pool) = self.policy(mark, &ip) else {
            return pass(
                "egress_no_policy",
                rule(
                    "egress 4: no policy",
                    "egress 4: no policy (a reopened outbound tuple)",
                    "egress 4: no policy (a reopened forwarded tuple)",
                ),
            );
        };
        // 5. Already translated.
        if self.already_translated(tuple) {
            return pass(
                "ours_passed",
                rule(
                    "egress 5: already translated",
                    "egress 5: already translated (a reopened outbound tuple)",
                    "egress 5: already translated (a reopened forwarded tuple)",
                ),
            );
        }
        // 6. Untranslatable.
        if ip.ext {
            return silent("IPv6 extension header to a policy destination");
        }
        match l4 {
            L4::Tcp { .. } | L4::Udp { .. } | L4::Echo { request: true, .. } => {}
            L4::Truncated { icmp: false, .. } => {
                return drop("drop_truncated_l4", "egress 6: transport cut short");
            }
            L4::Truncated {
                icmp: true,
                icmp_type: Some(t),
            } => {
                let (req, rep) = echo_types(ip.v6);
                // The type decides first: only types other than echo request or reply are
                // unsupported however short.
                return if t == req || t == rep {
                    drop("drop_truncated_l4", "egress 6: echo cut short")
                } else {
                    drop(
                        "drop_unsupported_l4",
                        "egress 6: short ICMP of another type",
                    )
                };
            }
            // No type byte: nothing makes it unsupported; fewer than 8 bytes: cut short.
            L4::Truncated {
                icmp: true,
                icmp_type: None,
            } => return drop("drop_truncated_l4", "egress 6: ICMP without a type byte"),
            _ => return drop("drop_unsupported_l4", "egress 6: unsupported transport"),
        }
        let k = tuple.expect("translatable packets have a tuple");
        // 7. The action.
        let family = if ip.v6 { FAMILY_V6 } else { FAMILY_V4 };
        let Some(action) = self
            .w
            .maps
            .actions
            .get(&ActionKey::new(pool, family))
            .copied()
        else {
            return drop("drop_no_action", "egress 7: no action");
        };
        match ActionKind::from_u8(action.kind) {
            Some(ActionKind::Snat) => {
                let targets = &action.snat[..usize::from(action.snat_count).min(action.snat.len())];
                let remote_port = u16::from_be(k.dst_port_be);
                let Some((t, port)) =
                    self.claim(targets, family, ip.proto, ip.dst, remote_port, false)?
                else {
                    return drop("drop_port_exhausted", "egress 7: every probe collided");
                };
                self.record(&k, &t, port, pool, [0; 4]);
                self.snat(&ip, &l4, t.addr, port);
                self.clamp_translated(&ip, &l4, t.addr)?;
                self.record_frag(
                    &ip,
                    Way::Leaving,
                    FragEntry::Source {
                        addr: t.addr,
                        peer: None,
                    },
                );
                pass(
                    "snat_new",
                    rule(
                        "egress 7: snat",
                        "egress 7: snat (a reopened outbound tuple)",
                        "egress 7: snat (a reopened forwarded tuple)",
                    ),
                )
            }
            Some(ActionKind::Forward) if ip.v6 => {
                drop("drop_forward_ipv6", "egress 7: forward IPv6")
            }
            Some(ActionKind::Forward) => {
                let hops = &action.hops[..usize::from(action.hop_count).min(action.hops.len())];
                let Some(peer) = self.hop(hops)? else {
                    return drop(
                        "drop_no_hops",
                        rule(
                            "egress 7: forward without next hops",
                            "egress 7: forward without next hops (a reopened outbound tuple)",
                            "egress 7: forward without next hops (a reopened forwarded tuple)",
                        ),
                    );
                };
                let before = self.flows.clone();
                self.flows
                    .insert(k, FlowValue::new(FLOW_FORWARDED, [0; 16], 0, pool, peer, 0));
                if Self::tcp_flags(&l4) & TCP_SYN != 0 {
                    self.clamp(&ip, &l4, NOTE_MSS_PADDING_FORWARDED)?;
                }
                let first = frag_key(&ip, Way::Leaving);
                match self.encap(&ip, peer, tunnel_key(KIND_CONNECTION, pool))? {
                    Ok(()) => {
                        self.record_frag_at(&ip, first, FragEntry::Encapsulate { to: peer, pool });
                        Ok((
                            self.sent(),
                            "forward_new",
                            rule(
                                "egress 7: forward",
                                "egress 7: forward (a reopened outbound tuple)",
                                "egress 7: forward (a reopened forwarded tuple)",
                            ),
                        ))
                    }
                    Err(c) => {
                        // A dropped packet holds no state (egress rule 7).
                        self.flows = before;
                        drop(c, "egress 7: forward, encapsulation failed")
                    }
                }
            }
            Some(ActionKind::Drop) => drop(
                "drop_pool_unreachable",
                rule(
                    "egress 7: unreachable",
                    "egress 7: unreachable (a reopened outbound tuple)",
                    "egress 7: unreachable (a reopened forwarded tuple)",
                ),
            ),
            None => drop(
                "drop_bad_action",
                rule(
                    "egress 7: an action of an unknown kind",
                    "egress 7: an action of an unknown kind (a reopened outbound tuple)",
                    "egress 7: an action of an unknown kind (a reopened forwarded tuple)",
                ),
            ),
        }
    }

    /// [`Outcome::notes`] of a packet passed by the sent hint: what the flow table holds for
    /// its tuple, which the hint does not ask (coverage only; the decision is the same).
    fn note_hinted(&mut self, tuple: Option<FlowKey>) {
        let entry = tuple.and_then(|k| self.flows.get(&k).copied());
        self.notes.push(match entry {
            Some(v) if v.kind == FLOW_OUTBOUND && v.tunnel == [0; 4] => NOTE_HINT_OUTBOUND,
            _ if self.already_translated(tuple) => NOTE_HINT_REVERSE,
            _ => NOTE_HINT_NO_REVERSE,
        });
    }

    /// Egress rule 5's question: the swapped connection tuple has a reverse entry with a
    /// tunnel (a peer's connection translated here; a local connection's reverse entry does
    /// not count).
    fn already_translated(&self, tuple: Option<FlowKey>) -> bool {
        tuple.is_some_and(|k| {
            self.flows
                .get(&swap(&k))
                .is_some_and(|v| v.kind == FLOW_REVERSE && v.tunnel != [0; 4])
        })
    }

    /// A first fragment translated, forwarded, soft-unicast or translated back: its entry under
    /// its key as it arrived (`ip` still describes the packet as it arrived) and the way its
    /// later fragments go (*Fragments* rule 1: leaving for egress SNAT and forward, arriving
    /// for everything ingress and the tunnel record but *ours*). Only an entry of the same key
    /// and way is replaced.
    fn record_frag(&mut self, ip: &Ip, way: Way, e: FragEntry) {
        self.record_frag_at(ip, frag_key(ip, way), e);
    }

    fn record_frag_at(&mut self, ip: &Ip, k: FragKey, e: FragEntry) {
        if ip.first() {
            self.frags.insert(k, e);
        }
    }

    /// *Fragments* 2 and 3 on egress: only a *leaving* entry is asked (this host's SNAT or
    /// forward, *ours*); an arriving one under the same (source, destination, id, protocol) —
    /// a peer's datagram in a tunnel, a reply — neither answers nor has replaced it.
    fn egress_later_fragment(&mut self, ip: &Ip, mark: u32) -> R {
        let arriving = self.frags.contains_key(&frag_key(ip, Way::Arriving));
        match self.frags.get(&frag_key(ip, Way::Leaving)).copied() {
            Some(FragEntry::Source { addr, peer: None }) => {
                if arriving {
                    self.notes.push(NOTE_FRAG_OWN_SNAT);
                }
                self.set_addr(ip, true, &addr, None);
                pass("fragment_followed", "fragments 2: egress, source")
            }
            // This host's own datagram: not a hop.
            Some(FragEntry::Encapsulate { to, pool }) => {
                match self.encap(ip, to, tunnel_key(KIND_CONNECTION, pool))? {
                    Ok(()) => {
                        if arriving {
                            self.notes.push(NOTE_FRAG_OWN_FORWARD);
                        }
                        Ok((
                            self.sent(),
                            "fragment_followed",
                            "fragments 2: egress, encapsulate",
                        ))
                    }
                    Err(c) => drop(c, "fragments 2: egress, encapsulation failed"),
                }
            }
            Some(FragEntry::Ours) => pass("ours_passed", "fragments 2: egress, ours"),
            // Recorded arriving only (rule 1): never under a leaving key.
            Some(
                FragEntry::Destination { .. }
                | FragEntry::Deliver { .. }
                | FragEntry::Source { peer: Some(_), .. },
            ) => silent("a leaving fragment entry of a kind only arriving datagrams record"),
            // Rule 3: no entry of its way (none, or only an arriving one: it went the other
            // way); the policy as in egress rule 4.
            None => {
                let rule = if arriving {
                    "fragments 3: egress, only an arriving entry"
                } else {
                    "fragments 3: egress, no entry"
                };
                if self.policy(mark, ip).is_some() {
                    return drop("drop_fragment", rule);
                }
                pass("egress_no_policy", rule)
            }
        }
    }

    /// Records the outbound entry at `k` (translated to `t.addr:port`) and its reverse entry.
    fn record(&mut self, k: &FlowKey, t: &SnatTarget, port: u16, pool: u32, tunnel: [u8; 4]) {
        let rk = FlowKey {
            src: k.dst,
            dst: t.addr,
            src_port_be: k.dst_port_be,
            dst_port_be: port.to_be(),
            ..*k
        };
        self.flows.insert(
            rk,
            FlowValue::new(FLOW_REVERSE, k.src, k.src_port_be, pool, tunnel, 0),
        );
        self.flows.insert(
            *k,
            FlowValue::new(FLOW_OUTBOUND, t.addr, port.to_be(), pool, tunnel, 0),
        );
    }

    // ---------------------------------------------------------------- TC ingress

    fn ingress(&mut self) -> R {
        let Some(ethertype) = self.read_l2()? else {
            return pass("ingress_malformed", "ingress 1: a third VLAN tag");
        };
        let mut ip = match parse_ip(&self.p, self.l3, Some(ethertype)) {
            IpParse::NotIp => return pass("ingress_not_ip", "ingress 1: not IP"),
            IpParse::Bad => return pass("ingress_malformed", "ingress 1: bad IP header"),
            // As on egress: never translated or tunnelled, passed for the stack to drop.
            IpParse::Long(_) => {
                return pass("ingress_malformed", "ingress 1: IP length beyond the frame");
            }
            IpParse::Silent(s) => return silent(s),
            IpParse::Ok(ip) => ip,
        };
        self.trim(&mut ip);
        if ip.ext {
            return silent("ingress IPv6 extension header (other than one Fragment header)");
        }
        if !ip.v6 && ip.proto == PROTO_GRE && !ip.fragment() {
            return self.tunnel(&ip);
        }
        if ip.later() {
            return self.ingress_later_fragment(&ip);
        }
        let l4 = parse_l4(&self.p, &ip).or_else(silent)?;
        if l4 == L4::IcmpError {
            return self.icmp_error(&ip, None);
        }
        // An arriving echo request is never a reply (ingress rule 6): passed.
        if let L4::Echo { request: true, .. } = l4 {
            return pass("ingress_no_flow", "ingress 6: echo request");
        }
        let Some(k) = reply_tuple(&ip, &l4) else {
            return pass("ingress_no_flow", "ingress 4/7: no tuple");
        };
        // 5. Reverse entry.
        if let Some(v) = self.flows.get(&k).copied() {
            if v.kind != FLOW_REVERSE {
                return silent("ingress tuple is the key of an outbound or forwarded entry");
            }
            let first = frag_key(&ip, Way::Arriving);
            let entry = FragEntry::Destination {
                addr: v.addr,
                tunnel: v.tunnel,
                pool: v.pool,
            };
            if v.tunnel == [0; 4] {
                self.dnat(&ip, &l4, v.addr, u16::from_be(v.port_be));
                self.record_frag_at(&ip, first, entry);
                return pass("reverse_nat", "ingress 5: reverse entry");
            }
            // A hop: the TTL first (the entry is refreshed all the same, not compared).
            if let Err(c) = self.hop_ttl(&ip)? {
                return drop(c, "ingress 5: reverse entry, tunnel, a hop");
            }
            self.dnat(&ip, &l4, v.addr, u16::from_be(v.port_be));
            return match self.encap(&ip, v.tunnel, tunnel_key(KIND_REPLY, v.pool))? {
                Ok(()) => {
                    self.record_frag_at(&ip, first, entry);
                    Ok((
                        Verdict::Send,
                        "reply_reencap",
                        "ingress 5: reverse entry, tunnel",
                    ))
                }
                Err(c) => drop(c, "ingress 5: re-encapsulation failed"),
            };
        }
        // 6. Soft-unicast.
        if !ip.v6
            && let Some((owner, pool)) = self.other_owner(ip.dst4(), u16::from_be(k.dst_port_be))?
        {
            // Never into a dead tunnel: checked before the hop.
            if self.owner_down(owner) {
                self.local("soft-unicast to an owner down while LOCAL is not written: which drop")?;
                return drop("drop_owner_down", "ingress 6: soft-unicast, owner down");
            }
            let first = frag_key(&ip, Way::Arriving);
            if let Err(c) = self.hop_ttl(&ip)? {
                return drop(c, "ingress 6: soft-unicast, a hop");
            }
            return match self.encap(&ip, owner, tunnel_key(KIND_SOFT_UNICAST, pool))? {
                Ok(()) => {
                    self.record_frag_at(&ip, first, FragEntry::Encapsulate { to: owner, pool });
                    Ok((Verdict::Send, "soft_unicast", "ingress 6: soft-unicast"))
                }
                Err(c) => drop(c, "ingress 6: soft-unicast encapsulation failed"),
            };
        }
        pass("ingress_no_flow", "ingress 7: no flow")
    }

    /// *Fragments* 2 and 3 on plain ingress: only an *arriving* entry is asked; a leaving one
    /// under the same key (a datagram this host SNATs or forwards, *ours*) neither answers nor
    /// has been replaced (a sender on the uplink may send any plain source).
    fn ingress_later_fragment(&mut self, ip: &Ip) -> R {
        let leaving = self.frags.get(&frag_key(ip, Way::Leaving)).copied();
        match self.frags.get(&frag_key(ip, Way::Arriving)).copied() {
            Some(FragEntry::Destination { addr, tunnel, pool }) => {
                if tunnel == [0; 4] {
                    self.set_addr(ip, false, &addr, None);
                    return pass("fragment_followed", "fragments 2: ingress, destination");
                }
                if let Err(c) = self.hop_ttl(ip)? {
                    return drop(c, "fragments 2: ingress, destination, tunnel, a hop");
                }
                self.set_addr(ip, false, &addr, None);
                match self.encap(ip, tunnel, tunnel_key(KIND_REPLY, pool))? {
                    Ok(()) => Ok((
                        Verdict::Send,
                        "fragment_followed",
                        "fragments 2: ingress, destination, tunnel",
                    )),
                    Err(c) => drop(c, "fragments 2: ingress, encapsulation failed"),
                }
            }
            Some(FragEntry::Encapsulate { to, pool }) => {
                if let Err(c) = self.hop_ttl(ip)? {
                    return drop(c, "fragments 2: ingress, encapsulate, a hop");
                }
                match self.encap(ip, to, tunnel_key(KIND_SOFT_UNICAST, pool))? {
                    Ok(()) => Ok((
                        Verdict::Send,
                        "fragment_followed",
                        "fragments 2: ingress, encapsulate",
                    )),
                    Err(c) => drop(c, "fragments 2: ingress, encapsulation failed"),
                }
            }
            // Plain ingress is named with *destination* and *encapsulate* only (rule 2), and
            // rule 3's other entries are a tunnel's.
            Some(FragEntry::Source { .. } | FragEntry::Deliver { .. }) => {
                silent("plain ingress later fragment whose arriving entry says source or deliver")
            }
            Some(FragEntry::Ours) => {
                silent("an arriving fragment entry of a kind only leaving datagrams record")
            }
            // Rule 3: no entry of its way (it went the other way, say).
            None => {
                match leaving {
                    Some(FragEntry::Source { .. }) => self.notes.push(NOTE_FRAG_INGRESS_SNAT),
                    Some(FragEntry::Encapsulate { .. }) => {
                        self.notes.push(NOTE_FRAG_INGRESS_FORWARD);
                    }
                    _ => {}
                }
                pass("ingress_no_flow", "fragments 3: ingress, no entry")
            }
        }
    }

    /// *Fragments* 2 and 3 in a tunnel from `peer` whose key says `kind` (outer headers still
    /// on): only an *arriving* entry is asked, and followed only with the kind that made it.
    fn tunnel_later_fragment(&mut self, ip: &Ip, peer: [u8; 4], kind: u32) -> R {
        let leaving = self.frags.contains_key(&frag_key(ip, Way::Leaving));
        match self.frags.get(&frag_key(ip, Way::Arriving)).copied() {
            Some(FragEntry::Source {
                addr,
                peer: Some(p),
            }) if p == peer && kind == KIND_CONNECTION => {
                if let Err(c) = self.hop_ttl(ip)? {
                    return drop(c, "fragments 2: tunnel, source of this peer, a hop");
                }
                self.set_addr(ip, true, &addr, None);
                self.strip();
                match self.route(ip.dst4())? {
                    Ok(()) => Ok((
                        Verdict::Send,
                        "fragment_followed",
                        "fragments 2: tunnel, source of this peer",
                    )),
                    Err(c) => drop(c, "fragments 2: tunnel, no route"),
                }
            }
            Some(FragEntry::Destination { addr, tunnel, pool }) if kind == KIND_SOFT_UNICAST => {
                self.set_addr(ip, false, &addr, None);
                let v = FlowValue::new(FLOW_REVERSE, addr, 0, pool, tunnel, 0);
                self.tunnel_reply(
                    ip,
                    v,
                    "fragment_followed",
                    "fragment_followed",
                    "fragments 2: tunnel, destination",
                )
            }
            Some(FragEntry::Deliver { peer: p }) if p == peer && kind == KIND_REPLY => {
                self.strip();
                pass(
                    "fragment_followed",
                    "fragments 2: tunnel, deliver of this peer",
                )
            }
            // Rule 3: another peer, another kind, or neither *source*, *destination* nor
            // *deliver* (soft-unicast's *encapsulate*).
            Some(
                FragEntry::Source { .. }
                | FragEntry::Destination { .. }
                | FragEntry::Deliver { .. }
                | FragEntry::Encapsulate { .. },
            ) => drop(
                "drop_fragment",
                "fragments 3: tunnel, an entry of another peer or kind, or encapsulate",
            ),
            Some(FragEntry::Ours) => {
                silent("an arriving fragment entry of a kind only leaving datagrams record")
            }
            // Rule 3: no entry of its way (a leaving one, this host's own datagram, say).
            None => {
                if leaving {
                    self.notes.push(NOTE_FRAG_TUNNEL_LEAVING);
                }
                drop("drop_fragment", "fragments 3: tunnel, no entry")
            }
        }
    }

    // ---------------------------------------------------------------- Tunnel

    fn tunnel(&mut self, outer: &Ip) -> R {
        // 1. VLAN tags in the frame data: checked first.
        if self.vlan_tags > 0 {
            return drop("drop_vlan_tunnel", "tunnel 1: VLAN tags");
        }
        let peer = outer.src4();
        if !self.is_peer(peer) {
            return drop("drop_gre_unknown_peer", "tunnel 1: unknown peer");
        }
        // Without `LOCAL` this server's fabric address is unknown: whether the packet is
        // addressed to it (`drop_gre_not_local`) the rules do not say.
        let local = self.local(
            "a tunnel packet from a peer while LOCAL (this server's fabric address) is not written",
        )?;
        if outer.dst4() != local.fabric {
            return drop("drop_gre_not_local", "tunnel 1: not to this server");
        }
        let malformed = |why| drop("drop_gre_malformed", why);
        if outer.hdr_len != 20 {
            return malformed("tunnel 1: outer options");
        }
        let g = outer.l4();
        if outer.end < g + 4 {
            return malformed("tunnel 1: GRE cut short");
        }
        if be16(&self.p, g) != 0x2000 {
            return malformed("tunnel 1: GRE flags");
        }
        if be16(&self.p, g + 2) != ETHERTYPE_IPV4 {
            return malformed("tunnel 1: GRE payload protocol");
        }
        if outer.end < g + 8 {
            return malformed("tunnel 1: GRE key cut short");
        }
        // *Tunnel keys*: the kind and the pool.
        let gre_key = be32(&self.p, g + 4);
        let (kind, pool) = (gre_key >> 30, gre_key & POOL_MASK);
        let ip = match parse_ip(&self.p, g + 8, None) {
            IpParse::NotIp | IpParse::Bad => return malformed("tunnel 1: inner not IPv4"),
            // Tunnel rule 1 names the inner header's version, IHL and length cut short, not an
            // inner length beyond the GRE payload (TC rule 1's "IP length beyond the frame" is
            // the outer packet's, checked before the tunnel rules).
            IpParse::Long(_) => return silent("inner IPv4 total length beyond the GRE payload"),
            IpParse::Silent(s) => return silent(s),
            IpParse::Ok(ip) => ip,
        };
        // 6. Kind *probe*: before the inner packet is looked at (its header is valid IPv4).
        if kind == KIND_PROBE {
            return self.tunnel_probe(peer, pool);
        }
        if ip.padded {
            return silent("inner IPv4 shorter than the GRE payload");
        }
        // 2. Later fragments; what is not TCP, UDP or ICMP echo (an ICMP error goes on to 3).
        if ip.later() {
            return self.tunnel_later_fragment(&ip, peer, kind);
        }
        let l4 = parse_l4(&self.p, &ip).or_else(silent)?;
        match l4 {
            L4::Tcp { .. } | L4::Udp { .. } | L4::Echo { .. } | L4::IcmpError => {}
            L4::Truncated {
                icmp: true,
                icmp_type: Some(t),
            } if !is_echo(ip.v6, t) => {
                return drop("drop_unsupported_l4", "tunnel 2: short ICMP, not echo");
            }
            L4::Truncated {
                icmp: true,
                icmp_type: None,
            } => {
                return drop(
                    "drop_truncated_l4",
                    "tunnel 2: inner ICMP without a type byte",
                );
            }
            L4::Truncated { .. } => {
                return drop("drop_truncated_l4", "tunnel 2: inner transport cut short");
            }
            L4::IcmpOther | L4::Other => {
                return drop(
                    "drop_unsupported_l4",
                    "tunnel 2: inner not TCP, UDP, ICMP echo",
                );
            }
        }
        // 3. Inner ICMP error, whatever the kind (ICMP errors rules 1 and 2 look at it).
        if l4 == L4::IcmpError {
            return self.icmp_error(&ip, Some((peer, kind)));
        }
        // 2. Kinds *reply* and *soft-unicast* bring replies only: an inner echo request there
        // is dropped before the per-kind rules (whatever entry its tuple, swapped or not, has).
        if let L4::Echo { request: true, .. } = l4
            && matches!(kind, KIND_REPLY | KIND_SOFT_UNICAST)
        {
            if kind == KIND_SOFT_UNICAST {
                self.notes.push(NOTE_ECHO_REQUEST_SOFT_UNICAST);
            } else if conn_tuple(&ip, &l4)
                .and_then(|k| self.flows.get(&swap(&k)))
                .is_some_and(|v| v.kind == FLOW_FORWARDED && v.tunnel == peer)
            {
                self.notes.push(NOTE_ECHO_REQUEST_REPLY_FORWARDED);
            } else {
                self.notes.push(NOTE_ECHO_REQUEST_REPLY);
            }
            return drop(
                "drop_tunnel_kind",
                "tunnel 2: an echo request in a reply or soft-unicast tunnel",
            );
        }
        // 2. Then by kind.
        match kind {
            KIND_SOFT_UNICAST => self.tunnel_soft_unicast(&ip, &l4),
            KIND_REPLY => self.tunnel_forwarded_reply(&ip, &l4, peer),
            KIND_CONNECTION => self.tunnel_connection(&ip, &l4, peer, pool),
            _ => drop("drop_tunnel_kind", "tunnel 2: no such kind"),
        }
    }

    /// Tunnel rule 6, kind *probe* from `peer` (`bits`: the key's pool bits). A request is
    /// echoed to its sender under a fresh outer header (kind *probe*, pool bits 2, or 3 when
    /// `LOCAL`'s *fenced* is nonzero; the rest unchanged, the inner TTL too: not a hop),
    /// trimmed to the outer IPv4 length; a reply (pool bits 2 or 3, whatever this server's own
    /// *fenced*) is passed unchanged. No flow entry is read or written, no `FRAGS` entry either.
    fn tunnel_probe(&mut self, peer: [u8; 4], bits: u32) -> R {
        self.untouched = self.flows.keys().copied().collect();
        match bits {
            PROBE_REQUEST => {
                // Tunnel rule 1 already needed `LOCAL` (this server's fabric address).
                let fenced = self.local("a probe while LOCAL is not written")?.fenced != 0;
                let (answer, rule) = if fenced {
                    (PROBE_REPLY_FENCED, "tunnel 6: probe request, fenced")
                } else {
                    (PROBE_REPLY, "tunnel 6: probe request")
                };
                // Ethernet padding after the outer IPv4 packet was cut when it was parsed.
                self.tail_unspecified = false;
                match self.reencap_in_place(peer, tunnel_key(KIND_PROBE, answer))? {
                    Ok(()) => Ok((Verdict::Send, "probe_echoed", rule)),
                    Err(c) => drop(c, "tunnel 6: probe request, no route to the sender"),
                }
            }
            PROBE_REPLY => pass("probe_reply", "tunnel 6: probe reply"),
            PROBE_REPLY_FENCED => pass("probe_reply", "tunnel 6: probe reply, fenced"),
            _ => drop("drop_tunnel_kind", "tunnel 6: probe, other pool bits"),
        }
    }

    /// Tunnel rule 2, kind *soft-unicast*: a reply with a reverse entry (an echo request was
    /// dropped before, `drop_tunnel_kind`: this kind brings replies only), else nothing is
    /// created.
    fn tunnel_soft_unicast(&mut self, ip: &Ip, l4: &L4) -> R {
        let Some(v) = reply_tuple(ip, l4)
            .and_then(|k| self.flows.get(&k).copied())
            .filter(|v| v.kind == FLOW_REVERSE)
        else {
            return drop(
                "drop_tunnel_kind",
                "tunnel 2: soft-unicast without a reverse entry",
            );
        };
        self.dnat(ip, l4, v.addr, u16::from_be(v.port_be));
        let r = self.tunnel_reply(
            ip,
            v,
            "reverse_nat",
            "reply_reencap",
            "tunnel 2: reverse entry",
        );
        if matches!(r, Ok((verdict, ..)) if verdict != Verdict::Drop) {
            self.record_frag(
                ip,
                Way::Arriving,
                FragEntry::Destination {
                    addr: v.addr,
                    tunnel: v.tunnel,
                    pool: v.pool,
                },
            );
        }
        r
    }

    /// Tunnel rule 4, kind *reply*: the reply of a connection forwarded from here, from its own
    /// peer only. Delivered here: not a hop.
    fn tunnel_forwarded_reply(&mut self, ip: &Ip, l4: &L4, peer: [u8; 4]) -> R {
        let Some((k, v)) = reply_tuple(ip, l4)
            .map(|k| swap(&k))
            .and_then(|k| self.flows.get(&k).map(|v| (k, *v)))
            .filter(|(_, v)| v.kind == FLOW_FORWARDED)
        else {
            return drop(
                "drop_tunnel_kind",
                "tunnel 4: reply without a forwarded entry",
            );
        };
        if v.tunnel != peer {
            self.untouched.push(k);
            return drop(
                "drop_peer_policy",
                "tunnel 4: another peer's forwarded entry",
            );
        }
        let f = Self::tcp_flags(l4);
        if f & TCP_SYN != 0 {
            if f & TCP_ACK != 0 {
                self.clamp(ip, l4, NOTE_MSS_PADDING_REPLY)?;
            } else if self.mss_too_big(ip, l4, None)? {
                return silent(
                    "SYN (not SYN-ACK) replying to a forwarded connection: clamp or not",
                );
            }
        }
        self.strip();
        self.record_frag(ip, Way::Arriving, FragEntry::Deliver { peer });
        pass("forwarded_reply", "tunnel 4: forwarded entry")
    }

    /// Tunnel rule 5, kind *connection*: a peer's connection translated here (`pool`: the one
    /// the key names).
    fn tunnel_connection(&mut self, ip: &Ip, l4: &L4, peer: [u8; 4], pool: u32) -> R {
        let Some(k) = conn_tuple(ip, l4) else {
            return drop("drop_peer_policy", "tunnel 5: not TCP, UDP or echo request");
        };
        let first = frag_key(ip, Way::Arriving);
        let existing = self.flows.get(&k).copied();
        if let Some(v) = existing.filter(|v| v.kind == FLOW_OUTBOUND) {
            if v.tunnel != peer {
                // Left untouched: no refresh, no flags.
                self.untouched.push(k);
                return drop(
                    "drop_peer_policy",
                    "tunnel 5: another peer's outbound entry",
                );
            }
            let f = Self::tcp_flags(l4);
            if matches!(l4, L4::Tcp { .. })
                && f & TCP_SYN != 0
                && f & TCP_ACK == 0
                && v.flags & FLOW_F_CLOSING != 0
            {
                return silent("a peer's SYN on its own closed outbound entry: reopened or not");
            }
            // A hop: the inner TTL before anything else is written.
            if let Err(c) = self.hop_ttl(ip)? {
                return drop(c, "tunnel 5: outbound entry, a hop");
            }
            let port = u16::from_be(v.port_be);
            self.snat(ip, l4, v.addr, port);
            self.clamp_translated(ip, l4, v.addr)?;
            self.strip();
            return match self.route(ip.dst4())? {
                Ok(()) => {
                    self.record_peer_frags(ip, first, v.addr, peer);
                    Ok((Verdict::Send, "peer_snat", "tunnel 5: outbound entry"))
                }
                Err(c) => drop(c, "tunnel 5: no route"),
            };
        }
        // Without an outbound entry (a reverse or forwarded entry under the tuple is not one).
        if self.w.maps.owners.contains_key(&gen0(ip.dst4())) {
            return drop("drop_peer_policy", "tunnel 5: to a pool address");
        }
        if !self.peer_policy(pool, ip.dst4()) {
            return drop("drop_peer_policy", "tunnel 5: no policy of the key's pool");
        }
        let action = self
            .w
            .maps
            .actions
            .get(&ActionKey::new(pool, FAMILY_V4))
            .copied();
        let Some(action) = action.filter(|a| a.kind == ActionKind::Snat as u8) else {
            return drop("drop_peer_not_held", "tunnel 5: pool not held here");
        };
        if existing.is_some() {
            return silent("a peer's new connection on the key of a reverse or forwarded entry");
        }
        // PEER_LOAD is not modelled: only "no budget" (0) is.
        if self
            .local("a peer's connection while LOCAL is not written")?
            .peer_budget
            != 0
        {
            return silent("a peer budget: the peer's load is not modelled");
        }
        let targets = &action.snat[..usize::from(action.snat_count).min(action.snat.len())];
        // Dropped after the claim (TTL, no route onward), the claim is released again (tunnel
        // rule 5): no trace of it is left, and "every probe collided" may look the same.
        let released = self.p[ip.at + 8] <= 1 || matches!(self.w.env.fib(ip.dst4()), Fib::NoRoute);
        let Some((t, port)) = self.claim(
            targets,
            4,
            ip.proto,
            ip.dst,
            u16::from_be(k.dst_port_be),
            released,
        )?
        else {
            return drop("drop_port_exhausted", "tunnel 5: every probe collided");
        };
        let before = self.flows.clone();
        self.record(&k, &t, port, pool, peer);
        // A hop: after the claim, before anything is written.
        if let Err(c) = self.hop_ttl(ip)? {
            self.flows = before;
            return drop(c, "tunnel 5: new peer connection, a hop");
        }
        self.snat(ip, l4, t.addr, port);
        self.clamp_translated(ip, l4, t.addr)?;
        self.strip();
        match self.route(ip.dst4())? {
            Ok(()) => {
                self.record_peer_frags(ip, first, t.addr, peer);
                Ok((Verdict::Send, "peer_snat", "tunnel 5: new peer connection"))
            }
            Err(c) => {
                // A dropped packet holds no state (tunnel rule 5).
                self.flows = before;
                drop(c, "tunnel 5: no route")
            }
        }
    }

    /// A peer's first fragment translated here: *source* under its key as it arrived (its later
    /// fragments arrive in the tunnel), *ours* under its translated key (they leave through the
    /// uplink, translated).
    fn record_peer_frags(&mut self, ip: &Ip, first: FragKey, addr: [u8; 16], peer: [u8; 4]) {
        self.record_frag_at(
            ip,
            first,
            FragEntry::Source {
                addr,
                peer: Some(peer),
            },
        );
        let ours = FragKey {
            src: addr,
            way: Way::Leaving,
            ..first
        };
        self.record_frag_at(ip, ours, FragEntry::Ours);
    }

    /// Tunnel rule 2's ending (`ip`: the inner packet): no tunnel → strip and pass; else a hop,
    /// then a fresh outer header of kind *reply* in place of the old one, and send.
    fn tunnel_reply(
        &mut self,
        ip: &Ip,
        v: FlowValue,
        plain: &'static str,
        reencap: &'static str,
        rule: &'static str,
    ) -> R {
        if v.tunnel == [0; 4] {
            self.strip();
            return pass(plain, rule);
        }
        // The TTL is written before the rewrite in the rules; the checksum comes out the same.
        if let Err(c) = self.hop_ttl(ip)? {
            return drop(c, "tunnel: retarget to the tunnel, a hop");
        }
        match self.reencap_in_place(v.tunnel, tunnel_key(KIND_REPLY, v.pool))? {
            Ok(()) => Ok((Verdict::Send, reencap, rule)),
            Err(c) => drop(c, "tunnel: no route to the tunnel"),
        }
    }

    // ---------------------------------------------------------------- ICMP errors

    /// An ICMP error `ip` (after the Ethernet header and its VLAN tags, or inside a tunnel from a peer with the key's kind).
    fn icmp_error(&mut self, ip: &Ip, tunnel: Option<([u8; 4], u32)>) -> R {
        let in_tunnel = tunnel.is_some();
        let (peer, kind) = tunnel.unwrap_or(([0; 4], 0));
        let otherwise = |_: ()| -> R {
            if in_tunnel {
                drop("drop_peer_policy", "icmp 4: unmatched in a tunnel")
            } else {
                pass("ingress_no_flow", "icmp 4: unmatched")
            }
        };
        let icmp = ip.l4();
        if ip.end < icmp + 8 {
            return otherwise(());
        }
        let q = icmp + 8;
        let qip = match parse_ip(
            &self.p[..ip.end],
            q,
            Some(if ip.v6 {
                ETHERTYPE_IPV6
            } else {
                ETHERTYPE_IPV4
            }),
        ) {
            IpParse::Ok(qip) => qip,
            // A quote is cut short by design: its length field speaks of the whole packet (not
            // a bad header), and the quote ends at the error's IP length (bytes after it are
            // padding, cut off above: never read as quote).
            IpParse::Long(_) | IpParse::Silent(_) => match quoted_ip(&self.p[..ip.end], q, ip.v6) {
                Some(qip) => qip,
                None => return otherwise(()),
            },
            _ => return otherwise(()),
        };
        if qip.ext {
            return otherwise(());
        }
        // ICMP errors quoting a fragment are not translated; a later fragment has no ports.
        if qip.later() {
            return otherwise(());
        }
        let ql4 = qip.l4();
        let qavail = ip.end.saturating_sub(ql4);
        if qavail < 8 {
            // Padding past the error's IP length is never read as quote.
            if !self.padding.is_empty() {
                self.notes.push(NOTE_ICMP_PADDED_SHORT);
            }
            return otherwise(());
        }
        let (sport, dport) = match qip.proto {
            PROTO_TCP | PROTO_UDP => (be16(&self.p, ql4), be16(&self.p, ql4 + 2)),
            pr if (pr == PROTO_ICMP && !ip.v6) || (pr == PROTO_ICMPV6 && ip.v6) => {
                if self.p[ql4] != echo_types(ip.v6).0 {
                    return otherwise(());
                }
                (be16(&self.p, ql4 + 4), 0)
            }
            _ => return otherwise(()),
        };
        let qk = key(qip.family(), qip.proto, qip.src, qip.dst, sport, dport);
        // 1. A reverse entry for the swapped quoted tuple, the error addressed to the quoted
        // source; in a tunnel only with kind *soft-unicast*.
        if let Some(v) = self.flows.get(&swap(&qk)).copied()
            && v.kind == FLOW_REVERSE
            && ip.dst == qip.src
            && !qip.fragment()
            && (!in_tunnel || kind == KIND_SOFT_UNICAST)
        {
            let before = self.p[icmp..ip.end].to_vec();
            // The quoted source address, its header checksum, its transport checksum.
            let (sat, n) = qip.src_at();
            let old = self.p[sat..sat + n].to_vec();
            let new = v.addr[..n].to_vec();
            if !qip.v6 {
                fix_csum(&mut self.p, qip.at + 10, false, &old, &new);
            }
            let qcsum = l4_csum(qip.v6, qip.proto).map(|(off, pseudo)| (ql4 + off, pseudo));
            // The quoted transport checksum is rewritten only within the error's IP length.
            let holds = |at: usize| at + 2 <= ip.end;
            if !self.padding.is_empty() {
                self.notes.push(NOTE_ICMP_PADDED_NAT);
                if qcsum.is_some_and(|(cat, pseudo)| pseudo && !holds(cat)) {
                    self.notes.push(NOTE_ICMP_PADDED_CSUM);
                }
            }
            if let Some((cat, true)) = qcsum
                && holds(cat)
            {
                fix_csum(&mut self.p, cat, qip.proto == PROTO_UDP, &old, &new);
            }
            self.p[sat..sat + n].copy_from_slice(&new);
            // The quoted source port / echo identifier.
            let pat = if matches!(qip.proto, PROTO_TCP | PROTO_UDP) {
                ql4
            } else {
                ql4 + 4
            };
            let oldp = self.p[pat..pat + 2].to_vec();
            let newp = v.port_be.to_ne_bytes();
            if let Some((cat, _)) = qcsum
                && holds(cat)
            {
                fix_csum(&mut self.p, cat, qip.proto == PROTO_UDP, &oldp, &newp);
            }
            self.p[pat..pat + 2].copy_from_slice(&newp);
            // The error's own checksum over every changed word of its message.
            let after = self.p[icmp..ip.end].to_vec();
            let c = csum_update(be16(&self.p, icmp + 2), &before, &after);
            put16(&mut self.p, icmp + 2, c);
            // The error's destination (and for ICMPv6 its pseudo-header).
            let mut err_ip = ip.clone();
            err_ip.proto = if ip.v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
            self.set_addr(&err_ip, false, &v.addr, Some(icmp));
            if in_tunnel {
                return self.tunnel_reply(
                    ip,
                    v,
                    "icmp_error_nat",
                    "icmp_error_reencap",
                    "icmp 1: reverse entry (tunnel)",
                );
            }
            if v.tunnel == [0; 4] {
                return pass("icmp_error_nat", "icmp 1: reverse entry");
            }
            // A hop: the error's TTL (the checksum comes out as if written first).
            if let Err(c) = self.hop_ttl(ip)? {
                return drop(c, "icmp 1: reverse entry, tunnel, a hop");
            }
            return match self.encap(ip, v.tunnel, tunnel_key(KIND_REPLY, v.pool))? {
                Ok(()) => Ok((
                    Verdict::Send,
                    "icmp_error_reencap",
                    "icmp 1: reverse entry, tunnel",
                )),
                Err(c) => drop(c, "icmp 1: re-encapsulation failed"),
            };
        }
        // Quoting a (first) fragment: not translated, ICMP errors rule 4.
        if qip.fragment() {
            return otherwise(());
        }
        // 2. In a tunnel with kind *reply* from the connection's own peer: the quoted tuple is a
        // forwarded entry.
        if in_tunnel
            && kind == KIND_REPLY
            && self
                .flows
                .get(&qk)
                .is_some_and(|v| v.kind == FLOW_FORWARDED && v.tunnel == peer)
        {
            self.strip();
            return pass("forwarded_reply", "icmp 2: forwarded entry");
        }
        // 3. Plain IPv4: the quoted source port belongs to another server.
        if !in_tunnel
            && !ip.v6
            && ip.dst == qip.src
            && let Some((owner, pool)) = self.other_owner(qip.src4(), sport)?
        {
            // As ingress rule 6: never into a dead tunnel, checked first.
            if self.owner_down(owner) {
                self.local("soft-unicast to an owner down while LOCAL is not written: which drop")?;
                return drop("drop_owner_down", "icmp 3: soft-unicast, owner down");
            }
            if let Err(c) = self.hop_ttl(ip)? {
                return drop(c, "icmp 3: soft-unicast, a hop");
            }
            return match self.encap(ip, owner, tunnel_key(KIND_SOFT_UNICAST, pool))? {
                Ok(()) => Ok((Verdict::Send, "soft_unicast", "icmp 3: soft-unicast")),
                Err(c) => drop(c, "icmp 3: soft-unicast encapsulation failed"),
            };
        }
        otherwise(())
    }
}

/// The quoted IP header of an ICMP error (its length field may exceed the quote).
fn quoted_ip(p: &[u8], at: usize, v6: bool) -> Option<Ip> {
    let mut q = p.to_vec();
    // Parse with the length field pretending the quote is whole.
    if v6 {
        if q.len() < at + 40 {
            return None;
        }
        let len = (q.len() - at - 40) as u16;
        put16(&mut q, at + 4, len);
    } else {
        if q.len() < at + 20 {
            return None;
        }
        let len = (q.len() - at) as u16;
        put16(&mut q, at + 2, len);
    }
    match parse_ip(
        &q,
        at,
        Some(if v6 { ETHERTYPE_IPV6 } else { ETHERTYPE_IPV4 }),
    ) {
        IpParse::Ok(ip) => Some(Ip {
            padded: false,
            ..ip
        }),
        _ => None,
    }
}

pub fn show_addr(a: &[u8; 16], family: u8) -> String {
    if family == 6 {
        std::net::Ipv6Addr::from(*a).to_string()
    } else {
        std::net::Ipv4Addr::from(a4(a)).to_string()
    }
}
