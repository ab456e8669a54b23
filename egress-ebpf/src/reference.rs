//! Reference programs for the per-packet benchmark (never attached by the agent): for each
//! path, the least work it must do, with no lookups (but the inserts a new connection needs,
//! and the one lookup of the informational `ref_lookup`), written plainly for the benchmark's
//! packets (Ethernet, IPv4 with a 20-byte header, TCP). A path's cost is reported as a ratio
//! to its reference's, both measured in the same run.
//!
//! - `ref_pass`: parse Ethernet, IPv4 and the ports; pass.
//! - `ref_rewrite`: rewrite the source address and port, fix both checksums.
//! - `ref_claim`: `ref_rewrite` plus the two inserts a new connection needs.
//! - `ref_lookup`: one lookup of the packet's connection in a table as large as the flow
//!   table, then `ref_rewrite` (for information: what a path that keeps state cannot go
//!   below; the first run inserts the entry).
//! - `ref_encap`: push outer IPv4 + GRE (grow, write), set the MACs, redirect.
//! - `ref_rw_encap`: `ref_rewrite` (of the destination) then `ref_encap`.
//! - `ref_decap`: pop outer IPv4 + GRE, `ref_rewrite` the inner packet, redirect.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_GRE,
        BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    btf_maps::HashMap,
    helpers::bpf_redirect,
    macros::{btf_map, classifier},
    programs::TcContext,
};
use egress_common::{
    fabric::ENCAP_LEN,
    flow::{FLOW_OUTBOUND, FLOW_REVERSE, FlowKey, FlowValue},
};

use crate::parse::{read, write};

const ETH: usize = 14;
const L4: usize = ETH + 20;
const ETH_P_IP_BE: u16 = egress_common::wire::ETH_P_IP.to_be();
const NEW_ADDR: [u8; 4] = [192, 0, 2, 10];
const NEW_PORT_BE: u16 = 40000u16.to_be();
const PEER: [u8; 4] = [10, 50, 0, 12];
const FABRIC: [u8; 4] = [10, 50, 0, 11];
const MACS: [u8; 12] = [2, 0, 0, 0, 0, 0x12, 2, 0, 0, 0, 0, 0x11];

/// What `ref_claim` inserts into: sized by the benchmark at load (one entry otherwise).
#[btf_map]
static REF_FLOWS: HashMap<FlowKey, FlowValue, 1> = HashMap::new();

/// The headers' fields a path reads: source and destination address (IPv4) and ports.
struct Min {
    src: [u8; 4],
    dst: [u8; 4],
    sport_be: u16,
    dport_be: u16,
}

#[inline(always)]
fn parse_at(ctx: &TcContext, l3: usize) -> Option<Min> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + l3 + 24 > end {
        return None;
    }
    // SAFETY: l3 + 24 bytes are within the linear data (checked above).
    let (ver_ihl, proto) = unsafe {
        (
            *((start + l3) as *const u8),
            *((start + l3 + 9) as *const u8),
        )
    };
    if ver_ihl != 0x45 || proto != 6 {
        return None;
    }
    Some(Min {
        src: read(ctx, l3 + 12).ok()?,
        dst: read(ctx, l3 + 16).ok()?,
        sport_be: read(ctx, l3 + 20).ok()?,
        dport_be: read(ctx, l3 + 22).ok()?,
    })
}

#[inline(always)]
fn parse_min(ctx: &TcContext) -> Option<Min> {
    if read::<u16>(ctx, 12).ok()? != ETH_P_IP_BE {
        return None;
    }
    parse_at(ctx, ETH)
}

/// Rewrites the source (or destination) address and port of the IPv4/TCP packet at ETH.
#[inline(always)]
fn rewrite(ctx: &TcContext, m: &Min, dst_side: bool) -> Option<()> {
    let (addr_off, port_off, old, old_port) = if dst_side {
        (ETH + 16, L4 + 2, m.dst, m.dport_be)
    } else {
        (ETH + 12, L4, m.src, m.sport_be)
    };
    let (old, new) = (u32::from_ne_bytes(old), u32::from_ne_bytes(NEW_ADDR));
    write(ctx, addr_off, &NEW_ADDR).ok()?;
    write(ctx, port_off, &NEW_PORT_BE).ok()?;
    ctx.l3_csum_replace(ETH + 10, u64::from(old), u64::from(new), 4)
        .ok()?;
    let flags = u64::from(BPF_F_PSEUDO_HDR);
    ctx.l4_csum_replace(L4 + 16, u64::from(old), u64::from(new), flags | 4)
        .ok()?;
    ctx.l4_csum_replace(L4 + 16, u64::from(old_port), u64::from(NEW_PORT_BE), 2)
        .ok()
}

/// Outer IPv4 + GRE with key, written in front of the inner packet (after adjust_room).
#[inline(always)]
fn push_outer(ctx: &TcContext) -> Option<()> {
    let inner = ctx.len() - ETH as u32;
    let flags = u64::from(
        BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_GRE,
    );
    ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
        .ok()?;
    let total = (inner + ENCAP_LEN) as u16;
    let mut h: [u16; 10] = [
        0x4500u16.to_be(),
        total.to_be(),
        0,
        0x4000u16.to_be(),
        0x402fu16.to_be(),
        0,
        u16::from_ne_bytes([FABRIC[0], FABRIC[1]]),
        u16::from_ne_bytes([FABRIC[2], FABRIC[3]]),
        u16::from_ne_bytes([PEER[0], PEER[1]]),
        u16::from_ne_bytes([PEER[2], PEER[3]]),
    ];
    h[5] = crate::encap::ipv4_checksum(&h);
    write(ctx, ETH, &h).ok()?;
    let gre: [u16; 4] = [0x2000u16.to_be(), 0x0800u16.to_be(), 0, 7u16.to_be()];
    write(ctx, ETH + 20, &gre).ok()
}

#[inline(always)]
fn redirect(ctx: &TcContext) -> Option<i32> {
    write(ctx, 0, &MACS).ok()?;
    // SAFETY: reading the skb's ifindex; a plain helper call.
    Some(unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 })
}

#[inline(always)]
fn verdict(r: Option<i32>) -> i32 {
    r.unwrap_or(TC_ACT_SHOT)
}

#[classifier]
pub fn ref_pass(ctx: TcContext) -> i32 {
    verdict(parse_min(&ctx).map(|_| TC_ACT_OK))
}

#[classifier]
pub fn ref_rewrite(ctx: TcContext) -> i32 {
    verdict(
        parse_min(&ctx)
            .and_then(|m| rewrite(&ctx, &m, false))
            .map(|_| TC_ACT_OK),
    )
}

#[classifier]
pub fn ref_claim(ctx: TcContext) -> i32 {
    verdict(claim(&ctx))
}

#[inline(always)]
fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut x = [0u8; 16];
    x[..4].copy_from_slice(&a);
    x
}

/// The flow-table key of the packet `m` (IPv4, TCP).
#[inline(always)]
fn key_of(m: &Min) -> FlowKey {
    FlowKey {
        src: v4(m.src),
        dst: v4(m.dst),
        src_port_be: m.sport_be,
        dst_port_be: m.dport_be,
        proto: 6,
        family: 4,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn claim(ctx: &TcContext) -> Option<i32> {
    let m = parse_min(ctx)?;
    let out = key_of(&m);
    let back = FlowKey {
        src: out.dst,
        dst: v4(NEW_ADDR),
        src_port_be: m.dport_be,
        dst_port_be: NEW_PORT_BE,
        ..out
    };
    let reverse = FlowValue::new(FLOW_REVERSE, out.src, m.sport_be, 1, [0; 4], 0);
    let outbound = FlowValue::new(FLOW_OUTBOUND, v4(NEW_ADDR), NEW_PORT_BE, 1, [0; 4], 0);
    REF_FLOWS
        .insert(back, reverse, u64::from(BPF_NOEXIST))
        .ok()?;
    REF_FLOWS
        .insert(out, outbound, u64::from(BPF_NOEXIST))
        .ok()?;
    rewrite(ctx, &m, false)?;
    Some(TC_ACT_OK)
}

#[classifier]
pub fn ref_lookup(ctx: TcContext) -> i32 {
    verdict(lookup(&ctx))
}

#[inline(always)]
fn lookup(ctx: &TcContext) -> Option<i32> {
    let m = parse_min(ctx)?;
    let out = key_of(&m);
    // SAFETY: read-only use of the value within this run.
    match unsafe { REF_FLOWS.get(out) } {
        Some(v) if v.kind == FLOW_OUTBOUND => {}
        Some(_) => return None,
        None => {
            let outbound = FlowValue::new(FLOW_OUTBOUND, v4(NEW_ADDR), NEW_PORT_BE, 1, [0; 4], 0);
            REF_FLOWS
                .insert(out, outbound, u64::from(BPF_NOEXIST))
                .ok()?;
        }
    }
    rewrite(ctx, &m, false)?;
    Some(TC_ACT_OK)
}

#[classifier]
pub fn ref_encap(ctx: TcContext) -> i32 {
    verdict(
        parse_min(&ctx)
            .and_then(|_| push_outer(&ctx))
            .and_then(|_| redirect(&ctx)),
    )
}

#[classifier]
pub fn ref_rw_encap(ctx: TcContext) -> i32 {
    verdict(
        parse_min(&ctx)
            .and_then(|m| rewrite(&ctx, &m, true))
            .and_then(|_| push_outer(&ctx))
            .and_then(|_| redirect(&ctx)),
    )
}

#[classifier]
pub fn ref_decap(ctx: TcContext) -> i32 {
    verdict(decap(&ctx))
}

#[inline(always)]
fn decap(ctx: &TcContext) -> Option<i32> {
    if read::<u16>(ctx, 12).ok()? != ETH_P_IP_BE {
        return None;
    }
    // The outer header must be GRE to this server; the inner packet is what gets rewritten.
    if read::<u8>(ctx, ETH + 9).ok()? != 47 {
        return None;
    }
    parse_at(ctx, ETH + ENCAP_LEN as usize)?;
    let flags = u64::from(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4);
    ctx.adjust_room(-(ENCAP_LEN as i32), BPF_ADJ_ROOM_MAC, flags)
        .ok()?;
    let m = parse_at(ctx, ETH)?;
    rewrite(ctx, &m, false)?;
    redirect(ctx)
}
