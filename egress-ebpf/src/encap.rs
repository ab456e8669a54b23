//! GRE encapsulation in the program (this kernel has no GRE device): outer IPv4 + GRE with key.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_GRE,
        BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::{bpf_skb_change_tail, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::{TcContext, XdpContext},
};
use egress_common::{
    fabric::{ENCAP_LEN, GRE_FLAG_KEY, INNER_OFF, IPPROTO_GRE},
    stats::Stat,
};

use crate::parse::{ETH_LEN, IPPROTO_UDP, Ip, Packet, read, write};

/// A UDP header.
const UDP_HDR_LEN: u32 = 8;

use egress_common::wire::ETH_P_IP;

/// Outer IPv4 header and GRE header with key, as written on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct Outer {
    ver_ihl: u8,
    tos: u8,
    tot_len_be: u16,
    id: u16,
    frag_off_be: u16,
    ttl: u8,
    proto: u8,
    check: u16,
    src: [u8; 4],
    dst: [u8; 4],
    gre_flags_be: u16,
    gre_proto_be: u16,
    gre_key_be: u32,
}
const _: () = assert!(core::mem::size_of::<Outer>() == ENCAP_LEN as usize);

/// RFC 1071 checksum of a 20-byte IPv4 header given as 10 words.
#[inline(always)]
pub fn ipv4_checksum(words: &[u16; 10]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 10 {
        sum += u32::from(words[i]);
        i += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Wraps the (IPv4) packet `ip` in outer IPv4 `src` → `dst` and GRE with `key`. The segment
/// size of GSO packets is kept (FIXED_GSO): the MSS clamp leaves room for the 28 bytes.
///
/// A non-GSO packet that would not fit `mtu` once encapsulated is refused (counted) instead of
/// being dropped silently by the device; the MSS clamps keep TCP below it. A frame with VLAN
/// tags in its data is refused too: the tunnel is built for an untagged uplink.
#[inline(always)]
pub fn encapsulate(
    ctx: &TcContext,
    ip: &Ip,
    src: [u8; 4],
    dst: [u8; 4],
    key: u32,
    mtu: u32,
) -> Result<(), Stat> {
    // A tag in the frame data, or one the kernel keeps beside it (a VLAN device's packet).
    // SAFETY: reading the skb's vlan_present field.
    if ip.l3_off != ETH_LEN || unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return Err(Stat::VlanTunnel);
    }
    trim(ctx, ip.end)?;
    let inner_len = ctx.len() - ETH_LEN as u32;
    // SAFETY: reading the skb's gso_size field.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 && inner_len + ENCAP_LEN > mtu {
        return Err(Stat::EncapTooBig);
    }
    // A UDP GSO packet (UDP_SEGMENT, QUIC) is cut into IP and UDP headers plus `gso_size`
    // bytes each: nothing clamps those as the MSS clamp does TCP's, and each would leave the
    // tunnel too big for the uplink, dropped silently by a device.
    let segment = (ip.l4_off - ip.l3_off) as u32 + UDP_HDR_LEN + gso_size;
    if gso_size != 0 && ip.proto == IPPROTO_UDP && segment + ENCAP_LEN > mtu {
        return Err(Stat::EncapTooBig);
    }
    let flags = u64::from(
        BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_GRE,
    );
    ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| Stat::EncapFailed)?;
    write_outer(ctx, src, dst, key, inner_len)
}

/// Points a tunnelled packet at another server: writes a fresh outer header (`src` → `dst`,
/// `key`) over the one it arrived with. Such an skb often carries encapsulation state (from the
/// sending server's `adjust_room` when it crossed a veth, from GRO on a real NIC), which a
/// second `adjust_room` encapsulation refuses; a rewrite in place needs none.
#[inline(always)]
pub fn retarget(
    ctx: &TcContext,
    end: usize,
    src: [u8; 4],
    dst: [u8; 4],
    key: u32,
) -> Result<(), Stat> {
    trim(ctx, end)?;
    write_outer(ctx, src, dst, key, ctx.len() - INNER_OFF as u32)
}

/// Cuts what follows the IP packet ending at `end` (Ethernet padding of a short frame), so that
/// the tunnel carries the packet and nothing else.
#[inline(always)]
fn trim(ctx: &TcContext, end: usize) -> Result<(), Stat> {
    if ctx.len() as usize > end {
        // SAFETY: plain helper call on this program's skb.
        let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb as *mut _, end as u32, 0) };
        if rc != 0 {
            return Err(Stat::EncapFailed);
        }
    }
    Ok(())
}

/// Writes the outer IPv4 and GRE headers in front of an inner packet of `inner_len` bytes.
#[inline(always)]
fn write_outer(
    ctx: &impl Packet,
    src: [u8; 4],
    dst: [u8; 4],
    key: u32,
    inner_len: u32,
) -> Result<(), Stat> {
    let mut outer = Outer {
        ver_ihl: 0x45,
        tos: 0,
        tot_len_be: total_len_field(inner_len + ENCAP_LEN).to_be(),
        id: 0,
        frag_off_be: 0x4000u16.to_be(), // DF
        ttl: 64,
        proto: IPPROTO_GRE,
        check: 0,
        src,
        dst,
        gre_flags_be: GRE_FLAG_KEY.to_be(),
        gre_proto_be: ETH_P_IP.to_be(),
        gre_key_be: key.to_be(),
    };
    // SAFETY: the first 20 bytes of Outer are the IPv4 header, 10 aligned u16 words.
    let words = unsafe { &*(&outer as *const Outer as *const [u16; 10]) };
    outer.check = ipv4_checksum(words);
    write(ctx, ETH_LEN, &outer).map_err(|()| Stat::EncapFailed)
}

/// The IPv4 total length field for a packet of `len` bytes: a GSO packet above 64 KiB (BIG
/// TCP) says 0, as the kernel writes it, instead of a length wrapped to 16 bits.
#[inline(always)]
fn total_len_field(len: u32) -> u16 {
    if len > u32::from(u16::MAX) {
        0
    } else {
        len as u16
    }
}

/// Checks the GRE header of `outer` (key present, no checksum or sequence, IPv4 inside) and
/// returns the key.
#[inline(always)]
pub fn gre_key(ctx: &impl Packet, outer: &Ip) -> Result<u32, Stat> {
    let h: [u8; 8] = read(ctx, outer.l4_off).map_err(|()| Stat::GreMalformed)?;
    let flags = u16::from_be_bytes([h[0], h[1]]);
    let proto = u16::from_be_bytes([h[2], h[3]]);
    // The key must be in the packet, not in the frame's padding after it.
    if flags != GRE_FLAG_KEY
        || proto != ETH_P_IP
        || outer.l4_off != ETH_LEN + 20
        || outer.l4_off + 8 > outer.end
    {
        return Err(Stat::GreMalformed);
    }
    Ok(u32::from_be_bytes([h[4], h[5], h[6], h[7]]))
}

/// Removes the outer IPv4 and GRE headers. Every parsed offset is stale afterwards.
#[inline(always)]
pub fn decapsulate(ctx: &TcContext) -> Result<(), Stat> {
    let flags = u64::from(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4);
    ctx.adjust_room(-(ENCAP_LEN as i32), BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| Stat::EncapFailed)
}

// ---------------------------------------------------------------------------------------------
// XDP: the same headers, with the buffer's head moved instead of an skb's room adjusted. The
// caller has checked that the packet is untagged (`ip.l3_off == ETH_LEN`) and fits the MTU.

/// Wraps the IPv4 packet `ip` of an XDP buffer in outer IPv4 `src` → `dst` and GRE with `key`.
/// The Ethernet addresses are left to the routing step.
#[inline(always)]
pub fn encapsulate_xdp(
    ctx: &XdpContext,
    ip: &Ip,
    src: [u8; 4],
    dst: [u8; 4],
    key: u32,
) -> Result<(), Stat> {
    let excess = ctx.size() as i32 - ip.end as i32;
    // SAFETY: plain helper calls on this program's buffer.
    if excess > 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -excess) } != 0 {
        return Err(Stat::EncapFailed);
    }
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(ENCAP_LEN as i32)) } != 0 {
        return Err(Stat::EncapFailed);
    }
    write(ctx, ETH_LEN - 2, &ETH_P_IP.to_be()).map_err(|()| Stat::EncapFailed)?;
    write_outer(ctx, src, dst, key, (ip.end - ETH_LEN) as u32)
}

/// Removes the outer IPv4 and GRE headers of an XDP buffer, keeping its Ethernet header.
#[inline(always)]
pub fn decapsulate_xdp(ctx: &XdpContext) -> Result<(), Stat> {
    let eth: [u8; ETH_LEN] = read(ctx, 0).map_err(|()| Stat::EncapFailed)?;
    write(ctx, ENCAP_LEN as usize, &eth).map_err(|()| Stat::EncapFailed)?;
    // SAFETY: plain helper call on this program's buffer.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, ENCAP_LEN as i32) } != 0 {
        return Err(Stat::EncapFailed);
    }
    Ok(())
}
