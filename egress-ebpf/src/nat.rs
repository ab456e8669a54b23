//! Rewriting addresses and ports, with incremental checksum fixes.
//!
//! The kernel's csum helpers do the arithmetic and know about CHECKSUM_PARTIAL: for an offloaded
//! packet the L4 field holds only the pseudo-header sum, so address changes (BPF_F_PSEUDO_HDR)
//! are applied to it and port changes are left to the final checksum computation.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use egress_common::{action::FAMILY_V4, stats::Stat};

use crate::csum;
use crate::parse::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Ip, Packet, read, write};

/// Which end of the packet to rewrite: the source on egress, the destination on ingress.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Src,
    Dst,
}

/// Offset of the transport checksum, and flags every L4 checksum update needs.
#[inline(always)]
fn l4_csum(ip: &Ip) -> (usize, u64) {
    match ip.proto {
        IPPROTO_TCP => (ip.l4_off + 16, 0),
        // A zero UDP checksum means "none" (IPv4) and must stay zero; a computed zero is 0xffff.
        IPPROTO_UDP => (ip.l4_off + 6, u64::from(BPF_F_MARK_MANGLED_0)),
        _ => (ip.l4_off + 2, 0), // ICMP, ICMPv6
    }
}

/// Offset of the port (ICMP echo: identifier) on `side`.
#[inline(always)]
fn port_off(ip: &Ip, side: Side) -> usize {
    match (ip.proto, side) {
        (IPPROTO_TCP | IPPROTO_UDP, Side::Src) => ip.l4_off,
        (IPPROTO_TCP | IPPROTO_UDP, Side::Dst) => ip.l4_off + 2,
        _ => ip.l4_off + 4,
    }
}

/// Offset of the address on `side` (IPv4: 12 / 16, IPv6: 8 / 24 into the header).
#[inline(always)]
fn addr_off(ip: &Ip, side: Side) -> usize {
    ip.l3_off
        + match (ip.family == FAMILY_V4, side) {
            (true, Side::Src) => 12,
            (true, Side::Dst) => 16,
            (false, Side::Src) => 8,
            (false, Side::Dst) => 24,
        }
}

/// Rewrites the address and port of `side` from (`old_addr`, `old_port_be`) to (`addr`,
/// `port_be`) and fixes the IPv4 header and transport checksums.
///
/// The new address, port and the IPv4 header checksum are written directly (plain arithmetic:
/// the IP header has no offload state). The transport checksum goes through the kernel helper,
/// which knows CHECKSUM_PARTIAL: there the field holds only the pseudo-header sum, so the
/// address change (BPF_F_PSEUDO_HDR) applies and the port change must not.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    ip: &Ip,
    side: Side,
    addr: &[u8; 16],
    port_be: u16,
    old_port_be: u16,
) -> Result<(), Stat> {
    let old_addr = if side == Side::Src { &ip.src } else { &ip.dst };
    let (csum_off, l4_flags) = l4_csum(ip);
    let fail = |()| Stat::RewriteFailed;
    // Direct writes first: the helpers below may move packet data.
    if port_be != old_port_be {
        write(ctx, port_off(ip, side), &port_be).map_err(fail)?;
    }
    if ip.family == FAMILY_V4 {
        let old4 = u32::from_ne_bytes([old_addr[0], old_addr[1], old_addr[2], old_addr[3]]);
        let new4 = u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]);
        if old4 != new4 {
            write_ipv4_addr(ctx, ip, side, old4, new4)?;
            // ICMPv4 has no pseudo-header; TCP and UDP do.
            if ip.proto != IPPROTO_ICMP {
                ctx.l4_csum_replace(
                    csum_off,
                    u64::from(old4),
                    u64::from(new4),
                    l4_flags | u64::from(BPF_F_PSEUDO_HDR) | 4,
                )
                .map_err(|_| Stat::RewriteFailed)?;
            }
        }
    } else if old_addr != addr {
        rewrite_addr_v6(ctx, ip, side, old_addr, addr, csum_off, l4_flags)?;
    }
    if port_be != old_port_be {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_port_be),
            u64::from(port_be),
            l4_flags | 2,
        )
        .map_err(|_| Stat::RewriteFailed)?;
    }
    Ok(())
}

/// Rewrites an IPv6 address (no header checksum) and carries its change into the transport
/// checksum: the address written directly and the change summed by arithmetic (two helper
/// calls fewer than `bpf_skb_store_bytes` and `bpf_csum_diff`, ~100 ns here), the sum handed
/// to the checksum helper, which knows CHECKSUM_PARTIAL.
#[inline(always)]
fn rewrite_addr_v6(
    ctx: &TcContext,
    ip: &Ip,
    side: Side,
    old: &[u8; 16],
    new: &[u8; 16],
    csum_off: usize,
    l4_flags: u64,
) -> Result<(), Stat> {
    let mut d = csum::Delta::default();
    d.bytes16(old, new);
    write(ctx, addr_off(ip, side), new).map_err(|()| Stat::RewriteFailed)?;
    // Size 0 in the flags: `to` is a checksum difference, `from` must be 0.
    ctx.l4_csum_replace(
        csum_off,
        0,
        u64::from(d.sum()),
        l4_flags | u64::from(BPF_F_PSEUDO_HDR),
    )
    .map_err(|_| Stat::RewriteFailed)?;
    // On a CHECKSUM_COMPLETE skb the helper also takes the difference off `skb->csum`, as for
    // IPv4, where the header checksum moves too. An IPv6 header has none: the address and the
    // transport checksum cancel out in the packet's sum, so the difference goes back on
    // (kernels before 6.16 have no BPF_F_IPV6 to say so; a UDP checksum of 0, which the
    // helper leaves alone, needs the same). A no-op on any other skb.
    csum_moved(ctx, d.sum());
    Ok(())
}

/// Adds `diff` to `skb->csum` of a CHECKSUM_COMPLETE skb (a NIC's sum of the whole packet):
/// bytes of the packet changed by `diff` with nothing else in it compensating. Other skbs
/// carry no packet sum and are left alone.
#[inline(always)]
fn csum_moved(ctx: &TcContext, diff: u32) {
    // SAFETY: the program's own skb; the helper only adds to skb->csum of a CHECKSUM_COMPLETE
    // skb and fails harmlessly (-ENOTSUPP) on any other.
    let _ = unsafe { aya_ebpf::helpers::bpf_csum_update(ctx.skb.skb, diff) };
}

/// Lowers the MSS option of a SYN or SYN-ACK to `max` so that the peer's segments fit the
/// tunnel. Only an MSS in the first option slot is handled: every common stack puts it there.
/// Returns whether the packet was changed.
#[inline(always)]
pub fn clamp_mss(ctx: &TcContext, ip: &Ip, max: u16) -> Result<bool, Stat> {
    let doff: u8 = ctx.load(ip.l4_off + 12).map_err(|_| Stat::TruncatedL4)?;
    // The option must lie within the IP packet: what follows it is padding, not an option.
    if doff >> 4 < 6 || ip.l4_off + 24 > ip.end {
        return Ok(false);
    }
    let opt: [u8; 4] = ctx.load(ip.l4_off + 20).map_err(|_| Stat::TruncatedL4)?;
    let mss = u16::from_be_bytes([opt[2], opt[3]]);
    if opt[0] != 2 || opt[1] != 4 || mss <= max {
        return Ok(false);
    }
    let (old_be, new_be) = (mss.to_be(), max.to_be());
    ctx.store(ip.l4_off + 22, &new_be, 0)
        .map_err(|_| Stat::RewriteFailed)?;
    ctx.l4_csum_replace(ip.l4_off + 16, u64::from(old_be), u64::from(new_be), 2)
        .map_err(|_| Stat::RewriteFailed)?;
    Ok(true)
}

/// Rewrites only the address of `side` (a later fragment: no transport header to fix); for IPv4
/// the header checksum follows.
#[inline(always)]
pub fn rewrite_addr(ctx: &TcContext, ip: &Ip, side: Side, addr: &[u8; 16]) -> Result<(), Stat> {
    if ip.family == FAMILY_V4 {
        let old_addr = if side == Side::Src { &ip.src } else { &ip.dst };
        let old4 = u32::from_ne_bytes([old_addr[0], old_addr[1], old_addr[2], old_addr[3]]);
        let new4 = u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]);
        write_ipv4_addr(ctx, ip, side, old4, new4)
    } else {
        let old_addr = if side == Side::Src { &ip.src } else { &ip.dst };
        let mut d = csum::Delta::default();
        d.bytes16(old_addr, addr);
        write(ctx, addr_off(ip, side), addr).map_err(|()| Stat::RewriteFailed)?;
        // No transport header here to take the change: the packet's sum moves by it.
        csum_moved(ctx, d.sum());
        Ok(())
    }
}

/// Writes IPv4 address `new4` (as stored) on `side` over `old4` and fixes the header checksum.
#[inline(always)]
fn write_ipv4_addr(
    ctx: &impl Packet,
    ip: &Ip,
    side: Side,
    old4: u32,
    new4: u32,
) -> Result<(), Stat> {
    let fail = |()| Stat::RewriteFailed;
    let check: u16 = read(ctx, ip.l3_off + 10).map_err(fail)?;
    write(ctx, addr_off(ip, side), &new4).map_err(fail)?;
    write(ctx, ip.l3_off + 10, &csum::replace4(check, old4, new4)).map_err(fail)
}

/// Decrements the TTL of an IPv4 packet this server sends on to another host, as a router does,
/// and fixes the header checksum. A packet whose TTL would reach 0 is refused: a forwarding
/// loop (a misrouted pool address) dies out instead of circling. IPv6 is never sent on.
#[inline(always)]
pub fn hop(ctx: &impl Packet, ip: &Ip) -> Result<(), Stat> {
    if ip.family != FAMILY_V4 {
        return Ok(());
    }
    let fail = |()| Stat::RewriteFailed;
    // TTL and protocol: one checksum word.
    let w: [u8; 2] = read(ctx, ip.l3_off + 8).map_err(fail)?;
    if w[0] <= 1 {
        return Err(Stat::TtlExceeded);
    }
    let next = [w[0] - 1, w[1]];
    let check: u16 = read(ctx, ip.l3_off + 10).map_err(fail)?;
    let mut d = csum::Delta::default();
    d.word(u16::from_ne_bytes(w), u16::from_ne_bytes(next));
    write(ctx, ip.l3_off + 8, &next).map_err(fail)?;
    write(ctx, ip.l3_off + 10, &d.apply(check)).map_err(fail)
}

/// [`rewrite`] for a buffer whose checksums are complete (XDP: a received frame, never
/// CHECKSUM_PARTIAL on a NIC), TCP or UDP only: every checksum by arithmetic, no helper.
#[inline(always)]
pub fn rewrite_complete(
    ctx: &impl Packet,
    ip: &Ip,
    side: Side,
    addr: &[u8; 16],
    port_be: u16,
    old_port_be: u16,
) -> Result<(), Stat> {
    let fail = |()| Stat::RewriteFailed;
    let old_addr = if side == Side::Src { &ip.src } else { &ip.dst };
    let (csum_off, _) = l4_csum(ip);
    let check: u16 = read(ctx, csum_off).map_err(fail)?;
    let v4 = ip.family == FAMILY_V4;
    let mut d = csum::Delta::default();
    d.addr(v4, old_addr, addr);
    d.word(old_port_be, port_be);
    write(ctx, port_off(ip, side), &port_be).map_err(fail)?;
    if v4 {
        let old4 = u32::from_ne_bytes([old_addr[0], old_addr[1], old_addr[2], old_addr[3]]);
        let new4 = u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]);
        write_ipv4_addr(ctx, ip, side, old4, new4)?;
    } else {
        write(ctx, addr_off(ip, side), addr).map_err(fail)?;
    }
    // A UDP checksum of 0 means "none" (IPv4) and stays so (IPv6 too, as TC's helper leaves
    // it); a computed 0 is sent as 0xffff.
    let udp = ip.proto == IPPROTO_UDP;
    if udp && check == 0 {
        return Ok(());
    }
    let mut new = d.apply(check);
    if udp && new == 0 {
        new = 0xffff;
    }
    write(ctx, csum_off, &new).map_err(fail)
}
