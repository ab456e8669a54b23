//! XDP on the uplink (`egress agent --xdp`): the receive paths that need no socket and create no
//! state, finished before the kernel builds an skb — a reply translated back (to the local
//! socket, or re-encapsulated to the peer whose connection it is), a peer's established
//! connection (decapsulated, translated, sent to its destination), a forwarded connection's
//! reply (decapsulated), and soft-unicast (sent to the owner of the port).
//!
//! Each path first checks everything that could make it differ from `tc_ingress` (a SYN to
//! clamp, a fragment, an ICMP error, a TTL about to expire, a frame too big for the tunnel, an
//! unresolved next hop, tags, an unknown or dead peer...) and only then writes; whatever it
//! leaves goes on untouched to `tc_ingress`, which decides it with its own counters. A packet
//! finished here and passed up carries [`XDP_DONE`] in its metadata so that `tc_ingress` does
//! not look at it again.
//!
//! Checksums are updated by arithmetic: a received frame's checksums are complete (a NIC never
//! hands up CHECKSUM_PARTIAL; a veth can, which is why the lab turns transmit checksum offload
//! off on the links that feed an uplink with XDP).

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_xdp_adjust_meta,
    macros::xdp,
    programs::XdpContext,
};
use egress_common::{
    action::FAMILY_V4,
    fabric::{ENCAP_LEN, INNER_OFF, IPPROTO_GRE, Local, XDP_DONE, tunnel},
    flow::{FLOW_FORWARDED, FLOW_OUTBOUND, FLOW_REVERSE, FlowValue},
    stats::Stat,
};

use crate::{
    encap, fabric, flow, nat,
    parse::{self, Dir, ETH_LEN, IPPROTO_TCP, IPPROTO_UDP, Ip, Packet, Ports},
    policy, redirect, stats, v4,
};

/// What the XDP program did with a packet it took: the path's counter and the XDP verdict.
type Done = (Stat, u32);

#[xdp]
pub fn xdp_ingress(ctx: XdpContext) -> u32 {
    let len = ctx.size();
    // unwrap_or: a value on every path (LLVM may otherwise read None's unset payload, which
    // the verifier refuses).
    let (stat, action) = receive(&ctx).unwrap_or((Stat::IngressSeen, LEFT));
    if action == LEFT {
        return XDP_PASS;
    }
    stats::count(Stat::IngressSeen, len);
    stats::count(Stat::XdpDone, len);
    stats::count(stat, ctx.size());
    action
}

/// Not an XDP verdict: the packet goes on to TC untouched.
const LEFT: u32 = u32::MAX;

/// Does nothing: the baseline of the benchmark's XDP rows (never attached by the agent).
#[xdp]
pub fn xdp_empty(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// A packet this program finishes, or None: it goes on to `tc_ingress` unchanged.
#[inline(always)]
fn receive(ctx: &XdpContext) -> Option<Done> {
    let ip = parse::ip(ctx).ok()?;
    // Tagged frames, fragments, anything but TCP/UDP (ICMP echo and errors): TC's. (A packet
    // longer by its header than the frame is refused by `parse::ip` already; the last test
    // restates it where the rewrites below rely on it.)
    if ip.l3_off != ETH_LEN || ip.frag != parse::FRAG_NONE || ctx.data() + ip.end > ctx.data_end() {
        return None;
    }
    if ip.family == FAMILY_V4 && ip.proto == IPPROTO_GRE {
        return tunnelled(ctx, &ip, fabric::local()?);
    }
    // Not TCP or UDP, or for no pool address and no reverse entry (the pass filter, as in
    // `tc_ingress`): TC's, at the cost of one array read here.
    if (ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP) || policy::filtered_out(&ip) {
        return None;
    }
    let local = fabric::local()?;
    let ports = parse::ports(ctx, &ip, Dir::Ingress).ok()?;
    if let Some(e) = flow::get(&flow::key(&ip, &ports), FLOW_REVERSE) {
        return reply(ctx, &ip, &ports, e, local);
    }
    if ip.family != FAMILY_V4 {
        return None;
    }
    soft_unicast(ctx, &ip, &ports, local)
}

/// The IPv4 TTL of `ip` allows one more hop (at 1, TC refuses it with its counter).
#[inline(always)]
fn may_hop(ctx: &XdpContext, ip: &Ip) -> Option<()> {
    let ttl: u8 = parse::read(ctx, ip.l3_off + 8).ok()?;
    (ttl > 1).then_some(())
}

/// `ip` fits the uplink's MTU once encapsulated.
#[inline(always)]
fn fits_tunnel(ip: &Ip, local: &Local) -> Option<()> {
    let mtu = egress_common::wire::mtu_of_tunnel_mss(local.mss_v4);
    ((ip.end - ETH_LEN) as u32 + ENCAP_LEN <= mtu).then_some(())
}

/// Marks a packet passed up as finished here (see [`XDP_DONE`]); None when the driver keeps
/// no metadata: the packet is then left to TC (nothing was changed yet).
#[inline(always)]
fn mark_done(ctx: &XdpContext) -> Option<()> {
    // SAFETY: plain helper call on this program's buffer.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -4) } != 0 {
        return None;
    }
    let (meta, data) = (ctx.metadata(), ctx.data());
    if meta + 4 > data {
        // SAFETY: as above; gives back the 4 bytes just taken (no unset metadata left).
        unsafe { bpf_xdp_adjust_meta(ctx.ctx, 4) };
        return None;
    }
    // SAFETY: 4 bytes of metadata, bounds checked just above.
    unsafe { core::ptr::write_unaligned(meta as *mut u32, XDP_DONE) };
    Some(())
}

/// A write failed after the checks: the packet is half-changed and can only be dropped.
#[inline(always)]
fn dropped(s: Stat) -> Done {
    (s, XDP_DROP)
}

/// A reply of a connection translated here (reverse entry `e`), arrived plain.
#[inline(always)]
fn reply(ctx: &XdpContext, ip: &Ip, ports: &Ports, e: flow::Entry, local: &Local) -> Option<Done> {
    let v = e.value();
    if v.tunnel == [0; 4] {
        mark_done(ctx)?;
        e.touch_reply(ports);
        return Some(match translate_dst(ctx, ip, ports, &v) {
            Ok(()) => (Stat::ReverseNat, XDP_PASS),
            Err(s) => dropped(s),
        });
    }
    // A peer's connection: its reply goes back through the tunnel (IPv4 only: IPv6 is never
    // forwarded).
    if ip.family != FAMILY_V4 {
        return None;
    }
    may_hop(ctx, ip)?;
    fits_tunnel(ip, local)?;
    let route = redirect::resolved(ctx, v.tunnel, local.ifindex)?;
    e.touch_reply(ports);
    let key = tunnel::key(tunnel::REPLY, v.pool);
    Some(
        translate_dst(ctx, ip, ports, &v)
            .and_then(|()| nat::hop(ctx, ip))
            .and_then(|()| encap::encapsulate_xdp(ctx, ip, local.fabric, v.tunnel, key))
            .and_then(|()| redirect::send_xdp(ctx, &route))
            .map_or_else(dropped, |action| (Stat::ReplyReencap, action)),
    )
}

/// A packet for a port of a shared pool address that another (live) server owns: to it,
/// unchanged but for the hop.
#[inline(always)]
fn soft_unicast(ctx: &XdpContext, ip: &Ip, ports: &Ports, local: &Local) -> Option<Done> {
    let g = policy::generation();
    let dst = v4(&ip.dst);
    let (pool, owner) = fabric::owner_of(&dst, u16::from_be(ports.dst_be), g)?;
    if owner == local.fabric || fabric::tunnel_dead(&owner, g) {
        return None;
    }
    may_hop(ctx, ip)?;
    fits_tunnel(ip, local)?;
    let route = redirect::resolved(ctx, owner, local.ifindex)?;
    let key = tunnel::key(tunnel::SOFT_UNICAST, pool);
    Some(
        nat::hop(ctx, ip)
            .and_then(|()| encap::encapsulate_xdp(ctx, ip, local.fabric, owner, key))
            .and_then(|()| redirect::send_xdp(ctx, &route))
            .map_or_else(dropped, |action| (Stat::SoftUnicast, action)),
    )
}

/// GRE on the uplink: from a known peer to this server, well formed, carrying an unfragmented
/// TCP or UDP packet of a peer's connection or a forwarded connection's reply.
#[inline(always)]
fn tunnelled(ctx: &XdpContext, outer: &Ip, local: &Local) -> Option<Done> {
    let g = policy::generation();
    let peer = v4(&outer.src);
    if v4(&outer.dst) != local.fabric || !fabric::is_peer(&peer, g) {
        return None;
    }
    let key = encap::gre_key(ctx, outer).ok()?;
    let ip = parse::ipv4(ctx, INNER_OFF).ok()?;
    if ip.end > outer.end
        || ip.frag != parse::FRAG_NONE
        || (ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP)
    {
        return None;
    }
    let ports = parse::ports(ctx, &ip, Dir::Tunnel).ok()?;
    // A SYN or SYN-ACK has its MSS clamped: TC's.
    if ports.syn() {
        return None;
    }
    match tunnel::kind(key) {
        tunnel::CONNECTION => peer_connection(ctx, &ip, &ports, peer, local),
        tunnel::REPLY => forwarded_reply(ctx, &ip, &ports, peer),
        _ => None,
    }
}

/// An established connection of `peer` translated here: hop, translate, decapsulate, send on.
#[inline(always)]
fn peer_connection(
    ctx: &XdpContext,
    ip: &Ip,
    ports: &Ports,
    peer: [u8; 4],
    local: &Local,
) -> Option<Done> {
    let key = flow::key(ip, ports);
    let e = flow::get(&key, FLOW_OUTBOUND)?;
    if e.tunnel() != peer || flow::reopens(&e.value(), ports) {
        return None;
    }
    may_hop(ctx, ip)?;
    let route = redirect::resolved(ctx, v4(&ip.dst), local.ifindex)?;
    let v = e.touch(ports);
    Some(
        nat::hop(ctx, ip)
            .and_then(|()| translate_src(ctx, ip, ports, &v))
            .and_then(|()| encap::decapsulate_xdp(ctx))
            .and_then(|()| redirect::send_xdp(ctx, &route))
            .map_or_else(dropped, |action| (Stat::PeerSnat, action)),
    )
}

/// A reply of a connection this server forwarded, from the peer it went to: decapsulated and
/// passed up to the socket.
#[inline(always)]
fn forwarded_reply(ctx: &XdpContext, ip: &Ip, ports: &Ports, peer: [u8; 4]) -> Option<Done> {
    let e = flow::get(&flow::key_swapped(ip, ports), FLOW_FORWARDED)?;
    if e.tunnel() != peer {
        return None;
    }
    mark_done(ctx)?;
    e.touch_reply(ports);
    Some(match encap::decapsulate_xdp(ctx) {
        Ok(()) => (Stat::ForwardedReply, XDP_PASS),
        Err(s) => dropped(s),
    })
}

#[inline(always)]
fn translate_src(ctx: &XdpContext, ip: &Ip, ports: &Ports, v: &FlowValue) -> Result<(), Stat> {
    nat::rewrite_complete(ctx, ip, nat::Side::Src, &v.addr, v.port_be, ports.src_be)
}

#[inline(always)]
fn translate_dst(ctx: &XdpContext, ip: &Ip, ports: &Ports, v: &FlowValue) -> Result<(), Stat> {
    nat::rewrite_complete(ctx, ip, nat::Side::Dst, &v.addr, v.port_be, ports.dst_be)
}

/// A packet `xdp_ingress` finished and passed up: its metadata says so (`tc_ingress` lets it
/// through untouched).
#[inline(always)]
pub fn done(ctx: &aya_ebpf::programs::TcContext) -> bool {
    // SAFETY: reading the skb's data_meta field.
    let meta = unsafe { (*ctx.skb.skb).data_meta } as usize;
    // SAFETY: 4 bytes of metadata, bounds checked against the packet start first.
    meta + 4 <= ctx.data() && unsafe { core::ptr::read_unaligned(meta as *const u32) } == XDP_DONE
}
