//! The TC programs attached to a server's uplink. This file only declares the programs and
//! strings the steps together; the work lives in modules by concern.
#![no_std]
#![no_main]

mod flow;
mod nat;
mod parse;
mod policy;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use egress_common::{
    action::ActionKind,
    flow::{FLOW_OUTBOUND, FLOW_REVERSE},
    stats::Stat,
};
use parse::{Dir, Ip, IpError, PortsError};

/// What happens to a packet, with the counter that records why.
enum Verdict {
    Pass(Stat),
    Drop(Stat),
}

/// Counts the verdict and turns it into a TC return code.
#[inline(always)]
fn finish(ctx: &TcContext, v: Verdict) -> i32 {
    match v {
        Verdict::Pass(s) => {
            stats::count(s, ctx.len());
            TC_ACT_OK
        }
        Verdict::Drop(s) => {
            stats::count(s, ctx.len());
            TC_ACT_SHOT
        }
    }
}

/// Locally originated packets leaving through the uplink.
#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    stats::count(Stat::EgressSeen, ctx.len());
    let v = egress(&ctx);
    finish(&ctx, v)
}

#[inline(always)]
fn egress(ctx: &TcContext) -> Verdict {
    let ip = match parse::ip(ctx) {
        Ok(ip) => ip,
        Err(IpError::NotIp) => return Verdict::Pass(Stat::EgressNotIp),
        Err(IpError::Malformed) => return Verdict::Drop(Stat::EgressMalformed),
    };
    // SAFETY: reading the skb's mark field.
    let mark = unsafe { (*ctx.skb.skb).mark };
    match policy::pool_for(&ip, mark) {
        None => Verdict::Pass(Stat::EgressNoPolicy),
        Some(pool) => match snat(ctx, &ip, pool) {
            Ok(s) | Err(s @ (Stat::PoolNotHeld | Stat::EgressNoPolicy)) => Verdict::Pass(s),
            Err(s) => Verdict::Drop(s),
        },
    }
}

/// A packet to a policy destination of `pool`: translate it with its connection's binding, or
/// claim a new one. Ok = translated; Err = the counter saying why not.
#[inline(always)]
fn snat(ctx: &TcContext, ip: &Ip, pool: u32) -> Result<Stat, Stat> {
    if ip.fragment {
        return Err(Stat::Fragment);
    }
    let ports = parse::ports(ctx, ip, Dir::Egress).map_err(|e| match e {
        PortsError::Unsupported => Stat::UnsupportedL4,
        PortsError::Truncated => Stat::TruncatedL4,
    })?;
    let key = flow::key(ip, &ports);
    if let Some(v) = flow::get(&key, FLOW_OUTBOUND) {
        flow::touch(v, &ports);
        // SAFETY: map value pointer valid for this run.
        let (addr, port) = unsafe { ((*v).addr, (*v).port_be) };
        nat::rewrite(ctx, ip, nat::Side::Src, &addr, port, ports.src_be)?;
        return Ok(Stat::SnatEstablished);
    }
    let action = policy::action_for(pool, ip.family).ok_or(Stat::NoAction)?;
    match ActionKind::from_u8(action.kind) {
        Some(ActionKind::Snat) => {
            let bound = flow::claim(&key, action, pool)?;
            nat::rewrite(
                ctx,
                ip,
                nat::Side::Src,
                &bound.addr,
                bound.port_be,
                ports.src_be,
            )?;
            Ok(Stat::SnatNew)
        }
        Some(ActionKind::NotHeld) => Err(Stat::PoolNotHeld),
        Some(ActionKind::Drop) => Err(Stat::PoolUnreachable),
        None => Err(Stat::NoAction),
    }
}

/// Packets arriving on the uplink.
#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    stats::count(Stat::IngressSeen, ctx.len());
    let v = ingress(&ctx);
    finish(&ctx, v)
}

#[inline(always)]
fn ingress(ctx: &TcContext) -> Verdict {
    let ip = match parse::ip(ctx) {
        Ok(ip) => ip,
        Err(IpError::NotIp) => return Verdict::Pass(Stat::IngressNotIp),
        Err(IpError::Malformed) => return Verdict::Pass(Stat::IngressMalformed),
    };
    if ip.fragment {
        return Verdict::Pass(Stat::IngressNoFlow);
    }
    let Ok(ports) = parse::ports(ctx, &ip, Dir::Ingress) else {
        return Verdict::Pass(Stat::IngressNoFlow);
    };
    let Some(v) = flow::get(&flow::key(&ip, &ports), FLOW_REVERSE) else {
        return Verdict::Pass(Stat::IngressNoFlow);
    };
    flow::touch(v, &ports);
    // SAFETY: map value pointer valid for this run.
    let (addr, port) = unsafe { ((*v).addr, (*v).port_be) };
    match nat::rewrite(ctx, &ip, nat::Side::Dst, &addr, port, ports.dst_be) {
        Ok(()) => Verdict::Pass(Stat::ReverseNat),
        Err(s) => Verdict::Drop(s),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
