//! The TC programs attached to a server's uplink. This file declares the programs and strings
//! the steps together (parse → look up → decide → rewrite/encapsulate → route → count); the
//! work lives in modules by concern.
#![no_std]
#![no_main]

mod encap;
mod fabric;
mod flow;
mod nat;
mod parse;
mod policy;
mod redirect;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use egress_common::{
    action::{ActionKind, FAMILY_V4, MAX_HOPS},
    fabric::{IPPROTO_GRE, Local, SKB_MARK_OURS},
    flow::{FLOW_FORWARDED, FLOW_OUTBOUND, FLOW_REVERSE, FlowValue},
    stats::Stat,
};
use parse::{Dir, Ip, IpError, Ports, PortsError};
use redirect::From;

/// What happens to a packet, with the counter that records why.
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
    code
}

/// Ok and Err both carry the verdict; Err short-circuits with `?`.
type Step<T> = Result<T, Verdict>;

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
    if ip.fragment {
        return Err(Verdict::Drop(Stat::Fragment));
    }
    parse::ports(ctx, ip, dir).map_err(|e| {
        Verdict::Drop(match e {
            PortsError::Unsupported => Stat::UnsupportedL4,
            PortsError::Truncated => Stat::TruncatedL4,
        })
    })
}

/// The uplink MTU, from the tunnel MSS the agent derived from it.
#[inline(always)]
fn mtu(local: &Local) -> u32 {
    u32::from(local.mss_v4) + 40 + egress_common::fabric::ENCAP_LEN
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
    let v = match egress(&ctx) {
        Ok(v) | Err(v) => v,
    };
    finish(&ctx, v)
}

#[inline(always)]
fn egress(ctx: &TcContext) -> Step<Verdict> {
    let mark = mark(ctx);
    if mark & SKB_MARK_OURS != 0 {
        return Ok(Verdict::Pass(Stat::Ours));
    }
    let ip = match parse::ip(ctx) {
        Ok(ip) => ip,
        Err(IpError::NotIp) => return Ok(Verdict::Pass(Stat::EgressNotIp)),
        Err(IpError::Malformed) => return Ok(Verdict::Drop(Stat::EgressMalformed)),
    };
    let parsed = ports(ctx, &ip, Dir::Egress);
    // A known connection keeps its path whatever the plan says now, even if a reload removed
    // its policy: the flow table is consulted before the policy.
    if let Ok(p) = &parsed
        && let Some(v) = flow::get_any(&flow::key(&ip, p))
    {
        flow::touch(v, p);
        // SAFETY: map value pointer valid for this run.
        let v = unsafe { *v };
        return match v.kind {
            FLOW_OUTBOUND => {
                clamp_if_shared(ctx, &ip, p, &v);
                translate_src(ctx, &ip, p, &v)?;
                Ok(Verdict::Pass(Stat::SnatEstablished))
            }
            FLOW_FORWARDED => forward(ctx, &ip, p, v.tunnel, v.pool, Stat::ForwardEstablished),
            _ => Ok(Verdict::Drop(Stat::NoAction)),
        };
    }
    let Some(pool) = policy::pool_for(&ip, mark) else {
        return Ok(Verdict::Pass(Stat::EgressNoPolicy));
    };
    // Only now is an unparsable transport header a reason to drop: it cannot be translated.
    let ports = parsed?;
    let key = flow::key(&ip, &ports);
    let action = policy::action_for(pool, ip.family).ok_or(Verdict::Drop(Stat::NoAction))?;
    match ActionKind::from_u8(action.kind) {
        Some(ActionKind::Snat) => {
            let bound = flow::claim(&key, action, pool, [0; 4]).map_err(drop_with)?;
            clamp_if_shared(ctx, &ip, &ports, &bound);
            translate_src(ctx, &ip, &ports, &bound)?;
            Ok(Verdict::Pass(Stat::SnatNew))
        }
        Some(ActionKind::Forward) => {
            if ip.family != FAMILY_V4 {
                return Ok(Verdict::Drop(Stat::ForwardV6));
            }
            let count = u32::from(action.hop_count).min(MAX_HOPS as u32);
            if count == 0 {
                return Ok(Verdict::Drop(Stat::NoAction));
            }
            let peer = action.hops[flow::pick(&key, count) & (MAX_HOPS - 1)];
            let rec = flow::record_forwarded(&key, peer, pool).map_err(drop_with)?;
            forward(ctx, &ip, &ports, rec.tunnel, pool, Stat::ForwardNew)
        }
        Some(ActionKind::Drop) => Ok(Verdict::Drop(Stat::PoolUnreachable)),
        None => Ok(Verdict::Drop(Stat::NoAction)),
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
    let local = fabric::local().ok_or(Verdict::Drop(Stat::NoAction))?;
    clamp(ctx, ip, ports, local);
    encap::encapsulate(ctx, local.fabric, peer, pool, mtu(local)).map_err(drop_with)?;
    let code = redirect::to(ctx, peer, local.ifindex, From::Egress).map_err(drop_with)?;
    Ok(Verdict::Sent(stat, code))
}

/// A connection translated here to a shared IPv4 pool address may get its replies through a
/// tunnel (soft-unicast from the server the address is routed to): its SYN's MSS must leave
/// room for the encapsulation too.
#[inline(always)]
fn clamp_if_shared(ctx: &TcContext, ip: &Ip, ports: &Ports, bound: &FlowValue) {
    if ip.family == FAMILY_V4
        && ip.proto == parse::IPPROTO_TCP
        && ports.syn()
        && fabric::is_shared(&v4(&bound.addr))
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
    stats::count(Stat::IngressSeen, ctx.len());
    let v = match ingress(&ctx) {
        Ok(v) | Err(v) => v,
    };
    finish(&ctx, v)
}

#[inline(always)]
fn ingress(ctx: &TcContext) -> Step<Verdict> {
    let ip = match parse::ip(ctx) {
        Ok(ip) => ip,
        Err(IpError::NotIp) => return Ok(Verdict::Pass(Stat::IngressNotIp)),
        Err(IpError::Malformed) => return Ok(Verdict::Pass(Stat::IngressMalformed)),
    };
    if ip.family == FAMILY_V4 && ip.proto == IPPROTO_GRE && !ip.fragment {
        return from_tunnel(ctx, &ip);
    }
    let Ok(ports) = ports(ctx, &ip, Dir::Ingress) else {
        return Ok(Verdict::Pass(Stat::IngressNoFlow));
    };
    if let Some(v) = reverse_entry(&ip, &ports) {
        return reply(ctx, &ip, &ports, &v);
    }
    soft_unicast(ctx, &ip, &ports)
}

/// The reverse entry a reply matches, refreshed.
#[inline(always)]
fn reverse_entry(ip: &Ip, ports: &Ports) -> Option<FlowValue> {
    let v = flow::get(&flow::key(ip, ports), FLOW_REVERSE)?;
    flow::touch(v, ports);
    // SAFETY: map value pointer valid for this run.
    Some(unsafe { *v })
}

/// A reply of a connection translated here: back to its original destination, and on to the
/// server owning the socket when the connection came through a tunnel.
#[inline(always)]
fn reply(ctx: &TcContext, ip: &Ip, ports: &Ports, v: &FlowValue) -> Step<Verdict> {
    nat::rewrite(ctx, ip, nat::Side::Dst, &v.addr, v.port_be, ports.dst_be).map_err(drop_with)?;
    if v.tunnel == [0; 4] {
        return Ok(Verdict::Pass(Stat::ReverseNat));
    }
    let local = fabric::local().ok_or(Verdict::Drop(Stat::NoAction))?;
    encap::encapsulate(ctx, local.fabric, v.tunnel, v.pool, mtu(local)).map_err(drop_with)?;
    let code = redirect::to(ctx, v.tunnel, local.ifindex, From::Ingress).map_err(drop_with)?;
    Ok(Verdict::Sent(Stat::ReplyReencap, code))
}

/// A packet to a pool address:port owned by another server goes to that server unchanged.
#[inline(always)]
fn soft_unicast(ctx: &TcContext, ip: &Ip, ports: &Ports) -> Step<Verdict> {
    if ip.family != FAMILY_V4 {
        return Ok(Verdict::Pass(Stat::IngressNoFlow));
    }
    let dst = v4(&ip.dst);
    let (Some(local), Some((pool, owner))) = (
        fabric::local(),
        fabric::owner_of(&dst, u16::from_be(ports.dst_be)),
    ) else {
        return Ok(Verdict::Pass(Stat::IngressNoFlow));
    };
    if owner == local.fabric {
        return Ok(Verdict::Pass(Stat::IngressNoFlow));
    }
    encap::encapsulate(ctx, local.fabric, owner, pool, mtu(local)).map_err(drop_with)?;
    let code = redirect::to(ctx, owner, local.ifindex, From::Ingress).map_err(drop_with)?;
    Ok(Verdict::Sent(Stat::SoftUnicast, code))
}

/// GRE from the fabric: a peer's forwarded connection to translate here, a reply for one of
/// ours, or a soft-unicast packet for a port range this server owns.
#[inline(always)]
fn from_tunnel(ctx: &TcContext, outer: &Ip) -> Step<Verdict> {
    let peer = v4(&outer.src);
    if !fabric::is_peer(&peer) {
        return Ok(Verdict::Drop(Stat::GreUnknownPeer));
    }
    let pool = encap::gre_key(ctx, outer).map_err(drop_with)?;
    encap::decapsulate(ctx).map_err(drop_with)?;
    let ip = match parse::ip(ctx) {
        Ok(ip) if ip.family == FAMILY_V4 => ip,
        _ => return Ok(Verdict::Drop(Stat::GreMalformed)),
    };
    let ports = ports(ctx, &ip, Dir::Tunnel)?;
    let local = fabric::local().ok_or(Verdict::Drop(Stat::NoAction))?;

    // A reply to a translation made here (soft-unicast brought it from the announcing server).
    if let Some(v) = reverse_entry(&ip, &ports) {
        return reply(ctx, &ip, &ports, &v);
    }
    // A reply of a connection this server forwarded: deliver it to the socket.
    let swapped = flow::key_swapped(&ip, &ports);
    if let Some(v) = flow::get(&swapped, FLOW_FORWARDED) {
        flow::touch(v, &ports);
        clamp(ctx, &ip, &ports, local);
        return Ok(Verdict::Pass(Stat::ForwardedReply));
    }
    // A peer's connection: translate with this server's share and send it to the origin.
    let key = flow::key(&ip, &ports);
    let bound = match flow::get(&key, FLOW_OUTBOUND) {
        Some(v) => {
            flow::touch(v, &ports);
            // SAFETY: map value pointer valid for this run.
            unsafe { *v }
        }
        None => {
            let action =
                policy::action_for(pool, FAMILY_V4).ok_or(Verdict::Drop(Stat::PeerNotHeld))?;
            if ActionKind::from_u8(action.kind) != Some(ActionKind::Snat) {
                return Ok(Verdict::Drop(Stat::PeerNotHeld));
            }
            flow::claim(&key, action, pool, peer).map_err(drop_with)?
        }
    };
    translate_src(ctx, &ip, &ports, &bound)?;
    let code = redirect::to(ctx, v4(&ip.dst), local.ifindex, From::Ingress).map_err(drop_with)?;
    Ok(Verdict::Sent(Stat::PeerSnat, code))
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
