//! The TC programs attached to a server's uplink. This file declares the programs and strings
//! the steps together (parse → look up → decide → rewrite/encapsulate → route → count); the
//! work lives in modules by concern.
#![no_std]
#![no_main]

mod budget;
mod clock;
mod csum;
mod encap;
mod fabric;
mod flow;
mod frag;
mod icmp;
mod nat;
mod parse;
mod policy;
mod redirect;
mod reference;
mod stats;
mod trace;
mod xdp;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use aya_ebpf::{btf_maps::ProgramArray, macros::btf_map};
use egress_common::{
    action::{ActionKind, FAMILY_V4, MAX_HOPS},
    fabric::{INNER_OFF, IPPROTO_GRE, Local, tunnel},
    flow::{FLOW_FORWARDED, FLOW_OUTBOUND, FLOW_REVERSE, FlowKey, FlowValue},
    stats::Stat,
};
use egress_common::{
    flow::{FRAG_DELIVER, FRAG_DST, FRAG_ENCAP, FRAG_IN, FRAG_OURS, FRAG_OUT, FRAG_SRC},
    prog_names::{
        JUMP_FRAG_IN, JUMP_FRAG_OUT, JUMP_ICMP_ERROR, JUMP_NEW_OUT, JUMP_SLOTS, JUMP_TUNNEL,
    },
};
use icmp::Quoted;
use parse::{Dir, Ip, IpError, Ports, PortsError};
use redirect::From;

/// The programs `tc_ingress` hands packets on to (tail calls), filled by the agent.
#[btf_map]
static JUMP: ProgramArray<{ JUMP_SLOTS as usize }> = ProgramArray::new();

/// What happens to a packet, with the counter that records why.
#[derive(Clone, Copy)]
enum Verdict {
    Pass(Stat),
    Drop(Stat),
    /// Sent on by a helper (TC_ACT_OK after rewriting L2 on egress, or a redirect verdict).
    Sent(Stat, i32),
}

/// Counts the verdict and turns it into a TC return code.
#[inline(always)]
fn finish(ctx: &TcContext, v: Verdict) -> i32 {
    let (stat, code) = match v {
        Verdict::Pass(s) => (s, TC_ACT_OK),
        Verdict::Drop(s) => (s, TC_ACT_SHOT),
        Verdict::Sent(s, code) => (s, code),
    };
    stats::count(stat, ctx.len());
    trace::decision(ctx, stat, code);
    code
}

/// Ok and Err both carry the verdict; Err short-circuits with `?`.
type Step<T> = Result<T, Verdict>;

/// Whether the outcome drops the packet (what a first fragment got is remembered only if not).
#[inline(always)]
fn dropped(outcome: &Step<Verdict>) -> bool {
    matches!(outcome, Ok(Verdict::Drop(_)) | Err(Verdict::Drop(_)))
}

/// The TC return code of a program's outcome, counted.
#[inline(always)]
fn conclude(ctx: &TcContext, outcome: Step<Verdict>) -> i32 {
    let (Ok(v) | Err(v)) = outcome;
    finish(ctx, v)
}

fn drop_with(s: Stat) -> Verdict {
    Verdict::Drop(s)
}

#[inline(always)]
fn mark(ctx: &TcContext) -> u32 {
    // SAFETY: reading the skb's mark field.
    unsafe { (*ctx.skb.skb).mark }
}

#[inline(always)]
fn ports(ctx: &TcContext, ip: &Ip, dir: Dir) -> Step<Ports> {
    if ip.later_fragment() {
        return Err(Verdict::Drop(Stat::Fragment));
    }
    parse::ports(ctx, ip, dir).map_err(|e| {
        Verdict::Drop(match e {
            PortsError::Unsupported => Stat::UnsupportedL4,
            PortsError::Truncated => Stat::TruncatedL4,
        })
    })
}

/// This server's fabric settings; a program without them (agent not started yet) drops what it
/// would have to encapsulate or redirect.
#[inline(always)]
fn local() -> Step<&'static Local> {
    fabric::local().ok_or(Verdict::Drop(Stat::NotConfigured))
}

/// The uplink MTU, from the tunnel MSS the agent derived from it.
#[inline(always)]
fn mtu(local: &Local) -> u32 {
    egress_common::wire::mtu_of_tunnel_mss(local.mss_v4)
}

#[inline(always)]
fn v4(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

// ---------------------------------------------------------------------------------------------
// Egress: locally originated packets leaving through the uplink.

#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    stats::count(Stat::EgressSeen, ctx.len());
    conclude(&ctx, egress(&ctx))
}

#[inline(always)]
fn egress(ctx: &TcContext) -> Step<Verdict> {
    let ip = match parse::ip(ctx) {
        Ok(ip) => ip,
        Err(IpError::NotIp) => return Ok(Verdict::Pass(Stat::EgressNotIp)),
        Err(IpError::Malformed) => return Ok(Verdict::Drop(Stat::EgressMalformed)),
    };
    if is_own_tunnel(&ip) {
        learn_route(ctx, &ip);
        return Ok(Verdict::Pass(Stat::Ours));
    }
    if ip.later_fragment() {
        return Ok(jump(ctx, JUMP_FRAG_OUT));
    }
    // No policy and no flow entry anywhere near the destination (the agent's pass filter):
    // rules 3 and 4 can find nothing, so neither is asked, nor are the ports read. A packet
    // with the sent hint's word has its tag checked first instead.
    let hinted = fabric::hint_word(ctx);
    if !hinted && policy::filtered_out(&ip) {
        return Ok(Verdict::Pass(Stat::EgressNoPolicy));
    }
    let parsed = ports(ctx, &ip, Dir::Egress);
    let verdict = egress_packet(ctx, &ip, &parsed, hinted);
    // One place for first fragments (rare), so the common path keeps its stack small. An
    // already translated one (ours) follows no entry of its own tuple.
    if ip.frag == parse::FRAG_FIRST
        && !dropped(&verdict)
        && !matches!(verdict, Ok(Verdict::Pass(Stat::Ours | Stat::OursHinted)))
        && let Ok(p) = &parsed
    {
        remember_first_out(&ip, p);
    }
    verdict
}

/// What the first fragment `ip` got on egress, from its connection's entry, for its later
/// fragments.
#[inline(always)]
fn remember_first_out(ip: &Ip, ports: &Ports) {
    if let Some(e) = flow::get_any(&flow::key(ip, ports)) {
        let v = e.value();
        match v.kind {
            FLOW_OUTBOUND => frag::remember(ip, FRAG_OUT, FRAG_SRC, &v.addr, [0; 4], v.pool),
            FLOW_FORWARDED => frag::remember(ip, FRAG_OUT, FRAG_ENCAP, &[0; 16], v.tunnel, v.pool),
            _ => {}
        }
    }
}

/// A whole packet or first fragment leaving: its connection's path, or a new one by policy.
#[inline(always)]
fn egress_packet(ctx: &TcContext, ip: &Ip, parsed: &Step<Ports>, hinted: bool) -> Step<Verdict> {
    // The ingress program's own output (a peer's connection it translated, tagged) passes
    // without a lookup.
    if let Ok(p) = parsed
        && hinted
        && ip.family == FAMILY_V4
        && fabric::hinted(
            ctx,
            fabric::tag(v4(&ip.src), v4(&ip.dst), p.src_be, p.dst_be, ip.proto),
        )
    {
        learn_route(ctx, ip);
        return Ok(Verdict::Pass(Stat::OursHinted));
    }
    // A known connection keeps its path whatever the plan says now, even if a reload removed
    // its policy: the flow table is consulted before the policy.
    if let Ok(p) = parsed {
        let key = flow::key(ip, p);
        if let Some(e) = flow::get_any(&key) {
            // Whether it reopens is judged on the flags before this packet.
            let before = e.value();
            // A peer's connection translated here under this very tuple (a peer may send any
            // inner source): this host's packet never takes its binding, nor ends it.
            if before.kind == FLOW_OUTBOUND && before.tunnel != [0; 4] {
                return Ok(Verdict::Drop(Stat::PeerTuple));
            }
            let v = e.touch(p);
            if !flow::reopens(&before, p) {
                return established(ctx, ip, p, &v);
            }
            flow::retire(&key, &before);
        }
    }
    // (Neighbour discovery parses as no ports: asked only of packets that do not.)
    if (parsed.is_err() && parse::neighbour_discovery(ctx, ip))
        || policy::pool_for(ip, mark(ctx), policy::generation()).is_none()
    {
        return Ok(Verdict::Pass(Stat::EgressNoPolicy));
    }
    if let Ok(p) = parsed
        && already_translated(ctx, ip, p)
    {
        return Ok(Verdict::Pass(Stat::Ours));
    }
    // A new connection: a program of its own (tail call), for stack.
    Ok(jump(ctx, JUMP_NEW_OUT))
}

/// A peer's connection translated here and sent out by the ingress program: its source is
/// already a translated endpoint (the swapped tuple has a reverse entry of a peer's
/// connection: a local one's would let a host socket on a pool address speak for it).
#[inline(always)]
fn already_translated(ctx: &TcContext, ip: &Ip, p: &Ports) -> bool {
    let Some(e) = flow::get(&flow::key_swapped(ip, p), FLOW_REVERSE) else {
        return false;
    };
    if e.tunnel() == [0; 4] {
        return false;
    }
    learn_route(ctx, ip);
    true
}

/// New connections leaving through the uplink (tail-called from `tc_egress`).
#[classifier]
pub fn tc_new_out(ctx: TcContext) -> i32 {
    conclude(&ctx, new_out(&ctx))
}

#[inline(always)]
fn new_out(ctx: &TcContext) -> Step<Verdict> {
    let ip = parse::ip(ctx).map_err(|_| Verdict::Drop(Stat::EgressMalformed))?;
    // One plan generation for every lookup of this decision.
    let g = policy::generation();
    let Some(pool) = policy::pool_for(&ip, mark(ctx), g) else {
        return Ok(Verdict::Pass(Stat::EgressNoPolicy));
    };
    // Only now is an unparsable transport header a reason to drop: it cannot be translated.
    let ports = ports(ctx, &ip, Dir::Egress)?;
    let verdict = new_connection(ctx, &ip, &ports, pool, g);
    if ip.frag == parse::FRAG_FIRST && !dropped(&verdict) {
        remember_first_out(&ip, &ports);
    }
    verdict
}

/// A new local connection to a destination of `pool`: translated here or forwarded, as the
/// plan says.
#[inline(always)]
fn new_connection(ctx: &TcContext, ip: &Ip, ports: &Ports, pool: u32, g: u8) -> Step<Verdict> {
    let key = flow::key(ip, ports);
    let action = policy::action_for(pool, ip.family, g).ok_or(Verdict::Drop(Stat::NoAction))?;
    match ActionKind::from_u8(action.kind) {
        Some(ActionKind::Snat) => {
            let bound = flow::claim(&key, action, pool, [0; 4]).map_err(drop_with)?;
            clamp_if_pool(ctx, ip, ports, &bound, g);
            if let Err(v) = translate_src(ctx, ip, ports, &bound) {
                // A dropped packet holds no state.
                flow::release(&key, &bound);
                return Err(v);
            }
            Ok(Verdict::Pass(Stat::SnatNew))
        }
        Some(ActionKind::Forward) => {
            if ip.family != FAMILY_V4 {
                return Ok(Verdict::Drop(Stat::ForwardV6));
            }
            let count = u32::from(action.hop_count).min(MAX_HOPS as u32);
            if count == 0 {
                return Ok(Verdict::Drop(Stat::NoHops));
            }
            let peer = action.hops[flow::pick(&key, count) & (MAX_HOPS - 1)];
            let rec = flow::record_forwarded(&key, peer, pool).map_err(drop_with)?;
            let sent = forward(ctx, ip, ports, rec.tunnel, pool, Stat::ForwardNew);
            if dropped(&sent) {
                // A dropped packet holds no state.
                flow::remove(&key);
            }
            sent
        }
        Some(ActionKind::Drop) => Ok(Verdict::Drop(Stat::PoolUnreachable)),
        None => Ok(Verdict::Drop(Stat::BadAction)),
    }
}

/// GRE from this server's fabric address to a known peer: a packet the programs encapsulated
/// (redirected ones pass this hook again). Recognised by what it is, never by a mark that other
/// software could set too.
#[inline(always)]
fn is_own_tunnel(ip: &Ip) -> bool {
    ip.family == FAMILY_V4
        && ip.proto == IPPROTO_GRE
        && fabric::local().is_some_and(|l| l.fabric == v4(&ip.src))
        && fabric::is_peer(&v4(&ip.dst), policy::generation())
}

/// A packet the programs sent on (a tunnel packet, a peer's translated packet) leaves with the
/// MACs the kernel gave it when it routed it itself (`bpf_redirect_neigh`): its next hop is
/// learnt for the packets after it (see `redirect::learn`).
#[inline(always)]
fn learn_route(ctx: &TcContext, ip: &Ip) {
    // SAFETY: reading the skb's vlan_present field (a VLAN device's packet: not the uplink's
    // own route).
    if ip.family == FAMILY_V4
        && ip.l3_off == parse::ETH_LEN
        && unsafe { (*ctx.skb.skb).vlan_present } == 0
        && let Some(local) = fabric::local()
    {
        redirect::learn(ctx, v4(&ip.dst), local.ifindex);
    }
}

/// A packet of a connection with an entry: translated with its binding, or forwarded to its peer.
#[inline(always)]
fn established(ctx: &TcContext, ip: &Ip, ports: &Ports, v: &FlowValue) -> Step<Verdict> {
    match v.kind {
        FLOW_OUTBOUND => {
            // The plan's generation only matters to a SYN: not read for the others.
            if ports.syn() {
                clamp_if_pool(ctx, ip, ports, v, policy::generation());
            }
            translate_src(ctx, ip, ports, v)?;
            Ok(Verdict::Pass(Stat::SnatEstablished))
        }
        FLOW_FORWARDED => forward(ctx, ip, ports, v.tunnel, v.pool, Stat::ForwardEstablished),
        _ => Ok(Verdict::Drop(Stat::ReplyShaped)),
    }
}

/// Rewrites the source to the connection's translated address and port.
#[inline(always)]
fn translate_src(ctx: &TcContext, ip: &Ip, ports: &Ports, bound: &FlowValue) -> Step<()> {
    nat::rewrite(
        ctx,
        ip,
        nat::Side::Src,
        &bound.addr,
        bound.port_be,
        ports.src_be,
    )
    .map_err(drop_with)
}

/// Rewrites the destination of a reply to the connection's original address and port.
#[inline(always)]
fn translate_dst(ctx: &TcContext, ip: &Ip, ports: &Ports, v: &FlowValue) -> Step<()> {
    nat::rewrite(ctx, ip, nat::Side::Dst, &v.addr, v.port_be, ports.dst_be).map_err(drop_with)
}

/// Encapsulates a local connection's packet to `peer` (GRE key = pool) and sends it there.
#[inline(always)]
fn forward(
    ctx: &TcContext,
    ip: &Ip,
    ports: &Ports,
    peer: [u8; 4],
    pool: u32,
    stat: Stat,
) -> Step<Verdict> {
    let local = local()?;
    clamp(ctx, ip, ports, local);
    let key = tunnel::key(tunnel::CONNECTION, pool);
    encap::encapsulate(ctx, ip, local.fabric, peer, key, mtu(local)).map_err(drop_with)?;
    let code = redirect::to(ctx, peer, local.ifindex, From::Egress).map_err(drop_with)?;
    Ok(Verdict::Sent(stat, code))
}

/// A connection translated to an IPv4 pool address may get its replies through a tunnel
/// (soft-unicast from whichever announcing server they reach), whether the address is split or
/// held whole: its SYN's MSS must leave room for the encapsulation too.
#[inline(always)]
fn clamp_if_pool(ctx: &TcContext, ip: &Ip, ports: &Ports, bound: &FlowValue, g: u8) {
    if ip.family == FAMILY_V4
        && ip.proto == parse::IPPROTO_TCP
        && ports.syn()
        && fabric::is_pool_address(&v4(&bound.addr), g)
        && let Some(local) = fabric::local()
    {
        clamp(ctx, ip, ports, local);
    }
}

/// Clamps the MSS of a forwarded connection's SYN or SYN-ACK to fit the tunnel.
#[inline(always)]
fn clamp(ctx: &TcContext, ip: &Ip, ports: &Ports, local: &Local) {
    if ip.proto == parse::IPPROTO_TCP
        && ports.syn()
        && matches!(nat::clamp_mss(ctx, ip, local.mss_v4), Ok(true))
    {
        stats::count(Stat::MssClamped, 0);
    }
}

// ---------------------------------------------------------------------------------------------
// Ingress: packets arriving on the uplink.

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    if xdp::done(&ctx) {
        return TC_ACT_OK;
    }
    stats::count(Stat::IngressSeen, ctx.len());
    conclude(&ctx, ingress(&ctx))
}

/// How a packet arrived: plain, or inside a tunnel from a peer (outer headers still on).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Arrived {
    Plain,
    Tunnel,
}

#[inline(always)]
fn ingress(ctx: &TcContext) -> Step<Verdict> {
    let ip = match parse::ip(ctx) {
        Ok(ip) => ip,
        Err(IpError::NotIp) => return Ok(Verdict::Pass(Stat::IngressNotIp)),
        Err(IpError::Malformed) => return Ok(Verdict::Pass(Stat::IngressMalformed)),
    };
    // The tunnel and ICMP error paths are programs of their own (tail calls): each BPF program
    // has 512 bytes of stack, and the three paths together need more.
    if ip.family == FAMILY_V4 && ip.proto == IPPROTO_GRE && ip.frag == parse::FRAG_NONE {
        return Ok(jump(ctx, JUMP_TUNNEL));
    }
    if icmp::is_error(ctx, &ip) {
        return Ok(jump(ctx, JUMP_ICMP_ERROR));
    }
    if ip.later_fragment() {
        return Ok(jump(ctx, JUMP_FRAG_IN));
    }
    // Most of what a server receives is its own traffic: no pool address and no reverse
    // entry's destination in the packet's bucket, so neither lookup below can match.
    if policy::filtered_out(&ip) {
        return Ok(Verdict::Pass(Stat::IngressNoFlow));
    }
    let Ok(ports) = ports(ctx, &ip, Dir::Ingress) else {
        return Ok(Verdict::Pass(Stat::IngressNoFlow));
    };
    if let Some(v) = reverse_entry(&ip, &ports) {
        return reply(ctx, &ip, &ports, &v, Arrived::Plain);
    }
    if ip.family != FAMILY_V4 {
        return Ok(Verdict::Pass(Stat::IngressNoFlow));
    }
    soft_unicast(ctx, &ip, &v4(&ip.dst), ports.dst_be)
}

/// The reverse entry a reply matches, refreshed.
#[inline(always)]
fn reverse_entry(ip: &Ip, ports: &Ports) -> Option<FlowValue> {
    Some(flow::get(&flow::key(ip, ports), FLOW_REVERSE)?.touch_reply(ports))
}

/// A reply of a connection translated here (entry `v`): translated back and delivered; what a
/// first fragment got is remembered for the rest of its datagram.
#[inline(always)]
fn reply(
    ctx: &TcContext,
    ip: &Ip,
    ports: &Ports,
    v: &FlowValue,
    arrived: Arrived,
) -> Step<Verdict> {
    translate_dst(ctx, ip, ports, v)?;
    let to = Gre::of(v);
    let sent = deliver(ctx, ip, &to, arrived, Stat::ReverseNat, Stat::ReplyReencap);
    if !dropped(&sent) {
        frag::remember(ip, FRAG_IN, FRAG_DST, &v.addr, v.tunnel, v.pool);
    }
    sent
}

/// Sends a reply `ip` translated back on: up to the local socket, or through `to` (tunnel and
/// pool of the connection) to the server that owns the socket when it came through a tunnel
/// (a hop: TTL decremented). A packet that arrived in a tunnel keeps its outer header,
/// rewritten (see `encap::retarget`): it is never decapsulated and encapsulated again.
#[inline(always)]
fn deliver(
    ctx: &TcContext,
    ip: &Ip,
    to: &Gre,
    arrived: Arrived,
    here: Stat,
    onward: Stat,
) -> Step<Verdict> {
    let peer = to.peer;
    if peer == [0; 4] {
        if arrived == Arrived::Tunnel {
            encap::decapsulate(ctx).map_err(drop_with)?;
        }
        return Ok(Verdict::Pass(here));
    }
    let local = local()?;
    nat::hop(ctx, ip).map_err(drop_with)?;
    let key = tunnel::key(tunnel::REPLY, to.pool);
    match arrived {
        Arrived::Plain => encap::encapsulate(ctx, ip, local.fabric, peer, key, mtu(local)),
        Arrived::Tunnel => encap::retarget(ctx, ip.end, local.fabric, peer, key),
    }
    .map_err(drop_with)?;
    let code = redirect::to(ctx, peer, local.ifindex, From::Ingress).map_err(drop_with)?;
    Ok(Verdict::Sent(onward, code))
}

/// A packet for port `port_be` of shared pool address `addr` that another server owns goes to
/// that server unchanged.
#[inline(always)]
fn soft_unicast(ctx: &TcContext, ip: &Ip, addr: &[u8; 4], port_be: u16) -> Step<Verdict> {
    let g = policy::generation();
    let Some((pool, owner)) = fabric::owner_of(addr, u16::from_be(port_be), g) else {
        return Ok(Verdict::Pass(Stat::IngressNoFlow));
    };
    let Some(local) = fabric::local() else {
        // Not configured yet: a range a known peer owns is another server's, to be
        // encapsulated, which cannot be done yet; this server's own range passes.
        return Ok(if fabric::is_peer(&owner, g) {
            Verdict::Drop(Stat::NotConfigured)
        } else {
            Verdict::Pass(Stat::IngressNoFlow)
        });
    };
    if owner == local.fabric {
        return Ok(Verdict::Pass(Stat::IngressNoFlow));
    }
    // Never into a dead tunnel: the owner's connections died with it.
    if fabric::tunnel_dead(&owner, g) {
        return Ok(Verdict::Drop(Stat::OwnerDown));
    }
    nat::hop(ctx, ip).map_err(drop_with)?;
    let key = tunnel::key(tunnel::SOFT_UNICAST, pool);
    encap::encapsulate(ctx, ip, local.fabric, owner, key, mtu(local)).map_err(drop_with)?;
    let code = redirect::to(ctx, owner, local.ifindex, From::Ingress).map_err(drop_with)?;
    frag::remember(ip, FRAG_IN, FRAG_ENCAP, &[0; 16], owner, pool);
    Ok(Verdict::Sent(Stat::SoftUnicast, code))
}

/// Tail-calls program `index` of `JUMP`. Returns only when the slot is empty (the agent had not
/// filled it): a counted drop.
#[inline(always)]
fn jump(ctx: &TcContext, index: u32) -> Verdict {
    // SAFETY: a tail call; on success control never comes back here.
    unsafe { JUMP.tail_call(ctx, index) };
    Verdict::Drop(Stat::MissingProgram)
}

/// ICMP errors arriving on the uplink, plain or inside a tunnel (tail-called from `tc_ingress`
/// and `tc_tunnel`).
#[classifier]
pub fn tc_icmp_error(ctx: TcContext) -> i32 {
    conclude(&ctx, icmp_error(&ctx))
}

#[inline(always)]
fn icmp_error(ctx: &TcContext) -> Step<Verdict> {
    let outer = parse::ip(ctx).map_err(|_| Verdict::Pass(Stat::IngressMalformed))?;
    let (ip, arrived, from) = if outer.family == FAMILY_V4 && outer.proto == IPPROTO_GRE {
        let from = tunnel_source(ctx, &outer)?;
        let ip = parse::ipv4(ctx, INNER_OFF).map_err(|_| Verdict::Drop(Stat::GreMalformed))?;
        (ip, Arrived::Tunnel, from)
    } else {
        (outer, Arrived::Plain, Gre::NONE)
    };
    let Some(q) = icmp::quoted(ctx, &ip) else {
        return Ok(match arrived {
            Arrived::Plain => Verdict::Pass(Stat::IngressNoFlow),
            Arrived::Tunnel => Verdict::Drop(Stat::PeerPolicy),
        });
    };
    icmp_quoting(ctx, &ip, &q, arrived, &from)
}

/// An ICMP error quoting `q`, a packet we sent: translated back and delivered when it is about
/// a connection translated here; passed to the owner of the quoted port otherwise.
#[inline(always)]
fn icmp_quoting(
    ctx: &TcContext,
    ip: &Ip,
    q: &Quoted,
    arrived: Arrived,
    from: &Gre,
) -> Step<Verdict> {
    let reply_key = flow::key_swapped(&q.ip, &q.ports);
    // In a tunnel, only soft-unicast brings an error about a connection translated here.
    if (arrived == Arrived::Plain || from.kind == tunnel::SOFT_UNICAST)
        && ip.dst == q.ip.src
        && let Some(e) = flow::get(&reply_key, FLOW_REVERSE)
    {
        let v = e.value();
        icmp::translate(ctx, ip, q, &v.addr, v.port_be).map_err(drop_with)?;
        let to = Gre::of(&v);
        return deliver(
            ctx,
            ip,
            &to,
            arrived,
            Stat::IcmpErrorNat,
            Stat::IcmpErrorReencap,
        );
    }
    if arrived == Arrived::Tunnel {
        // An error about a connection this server forwarded, returned by the peer it went to.
        if from.kind == tunnel::REPLY
            && let Some(e) = flow::get(&flow::key(&q.ip, &q.ports), FLOW_FORWARDED)
            && e.tunnel() == from.peer
        {
            encap::decapsulate(ctx).map_err(drop_with)?;
            return Ok(Verdict::Pass(Stat::ForwardedReply));
        }
        return Ok(Verdict::Drop(Stat::PeerPolicy));
    }
    if q.ip.family != FAMILY_V4 || ip.dst != q.ip.src {
        return Ok(Verdict::Pass(Stat::IngressNoFlow));
    }
    soft_unicast(ctx, ip, &v4(&q.ip.src), q.ports.src_be)
}

/// The sender and key of a tunnelled packet: a known peer, sending to this server's fabric
/// address, with a well-formed GRE header.
#[inline(always)]
fn tunnel_source(ctx: &TcContext, outer: &Ip) -> Step<Gre> {
    let peer = v4(&outer.src);
    // Tagged: in the frame data, or the tag the kernel took off on receive (vlan_present).
    // SAFETY: reading the skb's vlan_present field.
    if outer.l3_off != parse::ETH_LEN || unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return Err(Verdict::Drop(Stat::VlanTunnel));
    }
    // One plan generation for every lookup about this packet (the peer, then its policy).
    let g = policy::generation();
    if !fabric::is_peer(&peer, g) {
        return Err(Verdict::Drop(Stat::GreUnknownPeer));
    }
    if v4(&outer.dst) != local()?.fabric {
        return Err(Verdict::Drop(Stat::GreNotLocal));
    }
    let key = encap::gre_key(ctx, outer).map_err(drop_with)?;
    Ok(Gre {
        peer,
        pool: tunnel::pool(key),
        kind: tunnel::kind(key),
        g,
    })
}

/// IPv4 GRE arriving on the uplink (tail-called from `tc_ingress`).
#[classifier]
pub fn tc_tunnel(ctx: TcContext) -> i32 {
    conclude(&ctx, from_tunnel(&ctx))
}

/// GRE from the fabric: a reply for a translation made here (soft-unicast), a reply for one of
/// our forwarded connections, or a peer's connection to translate here. The inner packet is
/// examined in place, behind the outer headers.
#[inline(always)]
fn from_tunnel(ctx: &TcContext) -> Step<Verdict> {
    let outer = parse::ip(ctx).map_err(|_| Verdict::Drop(Stat::GreMalformed))?;
    let from = tunnel_source(ctx, &outer)?;
    let ip = parse::ipv4(ctx, INNER_OFF).map_err(|_| Verdict::Drop(Stat::GreMalformed))?;
    // The inner packet lies within the outer one (not in the frame's padding after it).
    if ip.end > outer.end {
        return Ok(Verdict::Drop(Stat::GreMalformed));
    }
    if from.kind == tunnel::PROBE {
        return probe(ctx, &outer, &from);
    }
    if icmp::is_error(ctx, &ip) {
        return Ok(jump(ctx, JUMP_ICMP_ERROR));
    }
    if ip.later_fragment() {
        return Ok(jump(ctx, JUMP_FRAG_IN));
    }
    let ports = ports(ctx, &ip, Dir::Tunnel)?;
    // Replies and soft-unicast bring replies only: an echo request there is none (with
    // identifier 0 it would have matched a local echo's entry).
    if from.kind != tunnel::CONNECTION && icmp_type(ctx, &ip) == Some(ICMP_ECHO_REQUEST) {
        return Ok(Verdict::Drop(Stat::TunnelKind));
    }
    match from.kind {
        tunnel::CONNECTION => peer_connection(ctx, &ip, &ports, &from),
        // Only a reply to a translation made here (the announcing server sent it on); never
        // anything that creates state.
        tunnel::SOFT_UNICAST => match reverse_entry(&ip, &ports) {
            Some(v) => reply(ctx, &ip, &ports, &v, Arrived::Tunnel),
            None => Ok(Verdict::Drop(Stat::TunnelKind)),
        },
        tunnel::REPLY => forwarded_reply(ctx, &ip, &ports, &from),
        _ => Ok(Verdict::Drop(Stat::TunnelKind)),
    }
}

/// A liveness probe from a known peer (checked by `tunnel_source`): a request goes straight
/// back to it as a reply, by the path forwarded connections take; a reply to this agent's own
/// probe goes up to the agent's socket.
#[inline(always)]
fn probe(ctx: &TcContext, outer: &Ip, from: &Gre) -> Step<Verdict> {
    match from.pool {
        tunnel::PROBE_REQUEST => {
            let local = local()?;
            // A fenced server still answers (its dataplane works) but says it takes nothing new.
            let bits = if local.fenced != 0 {
                tunnel::PROBE_REPLY_FENCED
            } else {
                tunnel::PROBE_REPLY
            };
            let key = tunnel::key(tunnel::PROBE, bits);
            encap::retarget(ctx, outer.end, local.fabric, from.peer, key).map_err(drop_with)?;
            let code =
                redirect::to(ctx, from.peer, local.ifindex, From::Ingress).map_err(drop_with)?;
            Ok(Verdict::Sent(Stat::ProbeEchoed, code))
        }
        tunnel::PROBE_REPLY | tunnel::PROBE_REPLY_FENCED => Ok(Verdict::Pass(Stat::ProbeReply)),
        _ => Ok(Verdict::Drop(Stat::TunnelKind)),
    }
}

/// A reply of a connection this server forwarded, from the peer it went to: delivered to the
/// socket. Another peer has no say in that connection.
#[inline(always)]
fn forwarded_reply(ctx: &TcContext, ip: &Ip, ports: &Ports, from: &Gre) -> Step<Verdict> {
    let Some(e) = flow::get(&flow::key_swapped(ip, ports), FLOW_FORWARDED) else {
        return Ok(Verdict::Drop(Stat::TunnelKind));
    };
    if e.tunnel() != from.peer {
        return Ok(Verdict::Drop(Stat::PeerPolicy));
    }
    e.touch_reply(ports);
    clamp(ctx, ip, ports, local()?);
    encap::decapsulate(ctx).map_err(drop_with)?;
    frag::remember(ip, FRAG_IN, FRAG_DELIVER, &[0; 16], from.peer, 0);
    Ok(Verdict::Pass(Stat::ForwardedReply))
}

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

/// The ICMP type of an inner IPv4 ICMP packet (its ports parsed: the type is there); None for
/// other protocols.
#[inline(always)]
fn icmp_type(ctx: &TcContext, ip: &Ip) -> Option<u8> {
    if ip.proto != parse::IPPROTO_ICMP {
        return None;
    }
    // (unwrap_or: a value on every path; LLVM may otherwise read the unset Ok bytes, which the
    // verifier refuses.)
    Some(parse::read::<[u8; 2]>(ctx, ip.l4_off).unwrap_or([u8::MAX; 2])[0])
}

/// A tunnel end and key: where a tunnelled packet came from (the peer's fabric address and the
/// GRE key: pool id and kind), or where a reply goes on to (zero address: nowhere, it is local).
struct Gre {
    peer: [u8; 4],
    pool: u32,
    /// A `tunnel::*` kind.
    kind: u32,
    /// For a received tunnel packet: the plan generation its lookups use (read once).
    g: u8,
}

impl Gre {
    /// No tunnel (a packet that arrived plain).
    const NONE: Gre = Gre {
        peer: [0; 4],
        pool: 0,
        kind: 0,
        g: 0,
    };

    /// Where a reply of the connection with entry `v` goes on to.
    #[inline(always)]
    fn of(v: &FlowValue) -> Gre {
        Gre {
            peer: v.tunnel,
            pool: v.pool,
            kind: tunnel::REPLY,
            g: 0,
        }
    }
}

/// A peer's connection: translated with this server's share of `pool` (the GRE key) and sent
/// to its destination. Only towards a destination of the pool's policies, and only with the
/// peer's own connections.
#[inline(always)]
fn peer_connection(ctx: &TcContext, ip: &Ip, ports: &Ports, from: &Gre) -> Step<Verdict> {
    let (peer, pool) = (from.peer, from.pool);
    // Peers send connections, never replies: an echo reply here is not a connection of theirs.
    if icmp_type(ctx, ip) == Some(ICMP_ECHO_REPLY) {
        return Ok(Verdict::Drop(Stat::PeerPolicy));
    }
    let local = local()?;
    let key = flow::key(ip, ports);
    let (bound, fresh) = match existing_outbound(&key, ports, peer)? {
        Some(v) => (v, false),
        None => {
            // Never towards a pool address: that is a reply or soft-unicast packet nothing here
            // explains (a policy may well cover pool addresses, e.g. 0.0.0.0/0), and translating
            // it would send it back to the announcer, to be soft-unicast here again.
            if fabric::is_pool_address(&v4(&ip.dst), from.g)
                || !policy::peer_allowed(pool, &ip.dst, from.g)
            {
                return Ok(Verdict::Drop(Stat::PeerPolicy));
            }
            let action = policy::action_for(pool, FAMILY_V4, from.g)
                .ok_or(Verdict::Drop(Stat::PeerNotHeld))?;
            if ActionKind::from_u8(action.kind) != Some(ActionKind::Snat) {
                return Ok(Verdict::Drop(Stat::PeerNotHeld));
            }
            budget::take(peer, local.peer_budget).map_err(drop_with)?;
            match flow::claim(&key, action, pool, peer) {
                Ok(bound) => (bound, true),
                Err(s) => {
                    budget::give_back(peer);
                    return Ok(Verdict::Drop(s));
                }
            }
        }
    };
    let sent = peer_send(ctx, ip, ports, &bound, local.ifindex, from.g);
    if dropped(&sent) {
        if fresh {
            // A dropped packet holds no state.
            flow::release(&key, &bound);
            budget::give_back(peer);
        }
        return sent;
    }
    frag::remember(ip, FRAG_IN, FRAG_SRC, &bound.addr, peer, pool);
    // Its later fragments leave through egress with the translated source: ours.
    frag::remember_as(ip, &bound.addr, FRAG_OUT, FRAG_OURS, &[0; 16], [0; 4], 0);
    sent
}

/// Translates a peer's packet with `bound`, strips the tunnel and sends it on to its
/// destination out of `ifindex`.
#[inline(always)]
fn peer_send(
    ctx: &TcContext,
    ip: &Ip,
    ports: &Ports,
    bound: &FlowValue,
    ifindex: u32,
    g: u8,
) -> Step<Verdict> {
    nat::hop(ctx, ip).map_err(drop_with)?;
    clamp_if_pool(ctx, ip, ports, bound, g);
    translate_src(ctx, ip, ports, bound)?;
    encap::decapsulate(ctx).map_err(drop_with)?;
    let code = redirect::to(ctx, v4(&ip.dst), ifindex, From::Ingress).map_err(drop_with)?;
    let tag = fabric::tag(
        v4(&bound.addr),
        v4(&ip.dst),
        bound.port_be,
        ports.dst_be,
        ip.proto,
    );
    fabric::leave_hint(ctx, tag);
    Ok(Verdict::Sent(Stat::PeerSnat, code))
}

/// The outbound entry of `key` for a packet from `peer`, refreshed; None when there is none or
/// the packet reopens a closed connection's tuple (its old entry is removed: the new connection
/// claims anew). Another peer's entry is neither refreshed nor touched: a drop.
#[inline(always)]
fn existing_outbound(key: &FlowKey, ports: &Ports, peer: [u8; 4]) -> Step<Option<FlowValue>> {
    let Some(e) = flow::get(key, FLOW_OUTBOUND) else {
        return Ok(None);
    };
    if e.tunnel() != peer {
        return Err(Verdict::Drop(Stat::PeerPolicy));
    }
    let before = e.value();
    let v = e.touch(ports);
    if flow::reopens(&before, ports) {
        flow::retire(key, &before);
        return Ok(None);
    }
    Ok(Some(v))
}

// ---------------------------------------------------------------------------------------------
// Later fragments: no ports; they get what their datagram's first fragment got.

/// Later fragments leaving through the uplink (tail-called from `tc_egress`).
#[classifier]
pub fn tc_frag_out(ctx: TcContext) -> i32 {
    conclude(&ctx, fragment_out(&ctx))
}

#[inline(always)]
fn fragment_out(ctx: &TcContext) -> Step<Verdict> {
    let ip = parse::ip(ctx).map_err(|_| Verdict::Drop(Stat::EgressMalformed))?;
    let Some(f) = frag::lookup(&ip, FRAG_OUT) else {
        // Never let a fragment to a policy destination leave untranslated.
        return Ok(
            match policy::pool_for(&ip, mark(ctx), policy::generation()) {
                Some(_) => Verdict::Drop(Stat::Fragment),
                None => Verdict::Pass(Stat::EgressNoPolicy),
            },
        );
    };
    match f.kind {
        // Only a local datagram's entry (a peer's has its tunnel set).
        FRAG_SRC if f.tunnel == [0; 4] => {
            nat::rewrite_addr(ctx, &ip, nat::Side::Src, &f.addr).map_err(drop_with)?;
            Ok(Verdict::Pass(Stat::FragmentFollowed))
        }
        FRAG_ENCAP => {
            let local = local()?;
            let key = tunnel::key(tunnel::CONNECTION, f.pool);
            encap::encapsulate(ctx, &ip, local.fabric, f.tunnel, key, mtu(local))
                .map_err(drop_with)?;
            let code =
                redirect::to(ctx, f.tunnel, local.ifindex, From::Egress).map_err(drop_with)?;
            Ok(Verdict::Sent(Stat::FragmentFollowed, code))
        }
        FRAG_OURS => Ok(Verdict::Pass(Stat::Ours)),
        _ => Ok(Verdict::Drop(Stat::Fragment)),
    }
}

/// Later fragments arriving on the uplink, plain or inside a tunnel (tail-called from
/// `tc_ingress` and `tc_tunnel`).
#[classifier]
pub fn tc_frag_in(ctx: TcContext) -> i32 {
    conclude(&ctx, fragment_in(&ctx))
}

#[inline(always)]
fn fragment_in(ctx: &TcContext) -> Step<Verdict> {
    let outer = parse::ip(ctx).map_err(|_| Verdict::Pass(Stat::IngressMalformed))?;
    let tunnelled =
        outer.family == FAMILY_V4 && outer.proto == IPPROTO_GRE && outer.frag == parse::FRAG_NONE;
    let (ip, arrived, from) = if tunnelled {
        let from = tunnel_source(ctx, &outer)?;
        let ip = parse::ipv4(ctx, INNER_OFF).map_err(|_| Verdict::Drop(Stat::GreMalformed))?;
        (ip, Arrived::Tunnel, from)
    } else {
        (outer, Arrived::Plain, Gre::NONE)
    };
    let unknown = match arrived {
        Arrived::Plain => Verdict::Pass(Stat::IngressNoFlow),
        Arrived::Tunnel => Verdict::Drop(Stat::Fragment),
    };
    let Some(f) = frag::lookup(&ip, FRAG_IN) else {
        return Ok(unknown);
    };
    // In a tunnel, each entry kind only with the packet kind that made it.
    let kind_fits = match f.kind {
        FRAG_DST => tunnel::SOFT_UNICAST,
        FRAG_SRC => tunnel::CONNECTION,
        FRAG_DELIVER => tunnel::REPLY,
        _ => 0,
    } == from.kind;
    if arrived == Arrived::Tunnel && !kind_fits {
        return Ok(unknown);
    }
    match (f.kind, arrived) {
        (FRAG_DST, _) => {
            nat::rewrite_addr(ctx, &ip, nat::Side::Dst, &f.addr).map_err(drop_with)?;
            let to = Gre {
                peer: f.tunnel,
                pool: f.pool,
                kind: tunnel::REPLY,
                g: 0,
            };
            deliver(
                ctx,
                &ip,
                &to,
                arrived,
                Stat::FragmentFollowed,
                Stat::FragmentFollowed,
            )
        }
        (FRAG_ENCAP, Arrived::Plain) => {
            let local = local()?;
            nat::hop(ctx, &ip).map_err(drop_with)?;
            let key = tunnel::key(tunnel::SOFT_UNICAST, f.pool);
            encap::encapsulate(ctx, &ip, local.fabric, f.tunnel, key, mtu(local))
                .map_err(drop_with)?;
            let code =
                redirect::to(ctx, f.tunnel, local.ifindex, From::Ingress).map_err(drop_with)?;
            Ok(Verdict::Sent(Stat::FragmentFollowed, code))
        }
        (FRAG_SRC, Arrived::Tunnel) if f.tunnel == from.peer => {
            let local = local()?;
            nat::hop(ctx, &ip).map_err(drop_with)?;
            nat::rewrite_addr(ctx, &ip, nat::Side::Src, &f.addr).map_err(drop_with)?;
            encap::decapsulate(ctx).map_err(drop_with)?;
            let code =
                redirect::to(ctx, v4(&ip.dst), local.ifindex, From::Ingress).map_err(drop_with)?;
            Ok(Verdict::Sent(Stat::FragmentFollowed, code))
        }
        (FRAG_DELIVER, Arrived::Tunnel) if f.tunnel == from.peer => {
            encap::decapsulate(ctx).map_err(drop_with)?;
            Ok(Verdict::Pass(Stat::FragmentFollowed))
        }
        _ => Ok(unknown),
    }
}

/// Does nothing: the baseline the benchmarks subtract (never attached by the agent).
#[classifier]
pub fn tc_empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
