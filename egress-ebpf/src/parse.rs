//! Parsing: Ethernet → IPv4/IPv6 ([`Ip`]) → TCP/UDP/ICMP echo ([`Ports`]).
//!
//! Reads are direct packet accesses when the bytes are in the linear part of the skb (the
//! usual case; a helper call costs ~10-15 ns each), and fall back to `bpf_skb_load_bytes` for
//! non-linear data, so every packet parses the same.

use aya_ebpf::{
    helpers::{bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    programs::{TcContext, XdpContext},
};
use egress_common::action::{FAMILY_V4, FAMILY_V6};

pub use egress_common::wire::ETH_LEN;

/// What parsing and rewriting need of a program's packet: TC's skb or XDP's buffer. Direct
/// access covers the linear data; the helpers reach the rest.
pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The packet's length in bytes.
    fn size(&self) -> u32;
    /// The segment size of a GSO packet (0: not GSO; XDP buffers never are).
    fn gso_size(&self) -> u32;
    /// Reads a `T` at `off` through the load helper.
    fn load_helper<T: Copy>(&self, off: usize) -> Result<T, ()>;
    /// Writes `v` at `off` through the store helper.
    fn store_helper<T: Copy>(&self, off: usize, v: &T) -> Result<(), ()>;
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn size(&self) -> u32 {
        TcContext::len(self)
    }
    #[inline(always)]
    fn gso_size(&self) -> u32 {
        // SAFETY: reading the skb's gso_size field.
        unsafe { (*self.skb.skb).gso_size }
    }
    #[inline(always)]
    fn load_helper<T: Copy>(&self, off: usize) -> Result<T, ()> {
        self.load(off).map_err(|_| ())
    }
    #[inline(always)]
    fn store_helper<T: Copy>(&self, off: usize, v: &T) -> Result<(), ()> {
        self.store(off, v, 0).map_err(|_| ())
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn size(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }
    #[inline(always)]
    fn gso_size(&self) -> u32 {
        0
    }
    #[inline(always)]
    fn load_helper<T: Copy>(&self, off: usize) -> Result<T, ()> {
        let mut v = core::mem::MaybeUninit::<T>::uninit();
        // SAFETY: the helper writes size_of::<T>() bytes into v or fails.
        let rc = unsafe {
            bpf_xdp_load_bytes(
                self.ctx,
                off as u32,
                v.as_mut_ptr() as *mut _,
                core::mem::size_of::<T>() as u32,
            )
        };
        if rc != 0 {
            return Err(());
        }
        // SAFETY: filled by the helper above.
        Ok(unsafe { v.assume_init() })
    }
    #[inline(always)]
    fn store_helper<T: Copy>(&self, off: usize, v: &T) -> Result<(), ()> {
        // SAFETY: the helper reads size_of::<T>() bytes of v.
        let rc = unsafe {
            bpf_xdp_store_bytes(
                self.ctx,
                off as u32,
                v as *const T as *mut _,
                core::mem::size_of::<T>() as u32,
            )
        };
        if rc != 0 { Err(()) } else { Ok(()) }
    }
}

/// Writes `v` at `off`: directly into the linear data, else through the store helper. Direct
/// writes must come before any helper that may move packet data in the same step.
#[inline(always)]
pub fn write<T: Copy>(ctx: &impl Packet, off: usize, v: &T) -> Result<(), ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + core::mem::size_of::<T>() <= end {
        // SAFETY: bounds checked against data_end just above.
        unsafe { core::ptr::write_unaligned((start + off) as *mut T, *v) };
        return Ok(());
    }
    ctx.store_helper(off, v)
}

/// Reads a `T` at `off`: directly from the linear data, else through the load helper.
#[inline(always)]
pub fn read<T: Copy>(ctx: &impl Packet, off: usize) -> Result<T, ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + core::mem::size_of::<T>() <= end {
        // SAFETY: bounds checked against data_end just above.
        return Ok(unsafe { core::ptr::read_unaligned((start + off) as *const T) });
    }
    ctx.load_helper(off)
}
use egress_common::wire::{ETH_P_IP, ETH_P_IPV6, IPPROTO_FRAGMENT};
pub use egress_common::wire::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
use network_types::ip::Ipv6Hdr;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The network layer of a packet. `repr(C)` with the addresses at 8-byte offsets of an 8-byte
/// aligned struct, so that addresses built as values (`v4_addr`) are stored by words.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Ip {
    /// FAMILY_V4 or FAMILY_V6.
    pub family: u8,
    /// Transport protocol (IPv6: the first next-header).
    pub proto: u8,
    /// [`FRAG_NONE`], [`FRAG_FIRST`] (carries the transport header) or [`FRAG_LATER`].
    pub frag: u8,
    /// The IP identification of a fragment (IPv4: 16 bits as in the packet; IPv6: 32 bits).
    pub frag_id: u32,
    /// Offset of the IP header (after Ethernet, or after the outer headers of a tunnel).
    pub l3_off: usize,
    /// Offset of the transport header.
    pub l4_off: usize,
    /// Offset of the end of the IP packet by its length field (Ethernet padding lies beyond).
    pub end: usize,
    /// IPv4 in the first 4 bytes (rest zero).
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// `Ip::frag`: a whole packet.
pub const FRAG_NONE: u8 = 0;
/// The first fragment of a datagram (offset 0, more to come): has the transport header.
pub const FRAG_FIRST: u8 = 1;
/// A later fragment (offset ≠ 0): no transport header.
pub const FRAG_LATER: u8 = 2;

impl Ip {
    /// A later fragment: it carries no ports and follows its first fragment.
    #[inline(always)]
    pub fn later_fragment(&self) -> bool {
        self.frag == FRAG_LATER
    }
}

pub enum IpError {
    /// Not IPv4/IPv6.
    NotIp,
    /// Truncated or inconsistent IP header, or a length beyond the frame.
    Malformed,
}

/// Parses Ethernet (with up to two VLAN tags in the frame data: 802.1Q, 802.1ad) and the IP
/// header.
#[inline(always)]
pub fn ip<C: Packet>(ctx: &C) -> Result<Ip, IpError> {
    let mut off = ETH_LEN;
    let mut proto = u16::from_be(read::<u16>(ctx, off - 2).map_err(|_| IpError::NotIp)?);
    // Unrolled: at most two tags (a tag and its outer service tag).
    if is_vlan(proto) {
        off += VLAN_LEN;
        proto = u16::from_be(read::<u16>(ctx, off - 2).map_err(|_| IpError::NotIp)?);
        if is_vlan(proto) {
            off += VLAN_LEN;
            proto = u16::from_be(read::<u16>(ctx, off - 2).map_err(|_| IpError::NotIp)?);
            // A third tag: not a frame this parser reads, and not "not IP" either (egress
            // must not pass what may be a policy packet untranslated).
            if is_vlan(proto) {
                return Err(IpError::Malformed);
            }
        }
    }
    let ip = match proto {
        ETH_P_IP => ipv4(ctx, off)?,
        ETH_P_IPV6 => ipv6(ctx, off)?,
        _ => return Err(IpError::NotIp),
    };
    // A length field beyond the frame (the stack drops such a packet; a tunnel would carry
    // it to a peer that must). Checked here, not in `ipv4`: a quoted header in an ICMP error
    // describes a packet longer than the quote.
    if ip.end > ctx.size() as usize {
        return Err(IpError::Malformed);
    }
    Ok(ip)
}

/// A VLAN tag's length: TPID (the ethertype slot) and TCI; the next ethertype follows.
const VLAN_LEN: usize = 4;

/// An 802.1Q (customer) or 802.1ad (service) tag protocol id.
#[inline(always)]
fn is_vlan(ethertype: u16) -> bool {
    ethertype == 0x8100 || ethertype == 0x88a8
}

/// The length of what follows `off` by its length field `len`; a GSO packet above 64 KiB (BIG
/// TCP) says 0 there, and its length is the skb's, as the kernel's `iph_totlen` takes it.
#[inline(always)]
fn big_len<C: Packet>(ctx: &C, off: usize, len: usize) -> usize {
    if len == 0 && ctx.gso_size() != 0 {
        return (ctx.size() as usize).saturating_sub(off);
    }
    len
}

/// Parses the IPv4 header at `off` (the inner packet of a tunnel, or a quoted one).
#[inline(always)]
pub fn ipv4<C: Packet>(ctx: &C, off: usize) -> Result<Ip, IpError> {
    // The header as five words (bytes in packet order), so that the addresses are built in
    // registers and stored into `Ip` by words (`v4_addr`).
    let b: [u8; 20] = read(ctx, off).map_err(|_| IpError::Malformed)?;
    let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let h = [word(0), word(4), word(8), word(12), word(16)];
    let [ver_ihl, _tos, len_hi, len_lo] = h[0].to_ne_bytes();
    let ihl = usize::from(ver_ihl & 0xf) * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 {
        return Err(IpError::Malformed);
    }
    let tot = big_len(ctx, off, usize::from(u16::from_be_bytes([len_hi, len_lo])));
    if tot < ihl {
        return Err(IpError::Malformed);
    }
    let [id0, id1, frag_hi, frag_lo] = h[1].to_ne_bytes();
    let frag = u16::from_be_bytes([frag_hi, frag_lo]);
    let [_ttl, proto, _, _] = h[2].to_ne_bytes();
    Ok(Ip {
        family: FAMILY_V4,
        proto,
        l3_off: off,
        l4_off: off + ihl,
        end: off + tot,
        src: v4_addr(h[3]),
        dst: v4_addr(h[4]),
        frag: if frag & 0x1fff != 0 {
            FRAG_LATER
        } else if frag & 0x2000 != 0 {
            FRAG_FIRST
        } else {
            FRAG_NONE
        },
        frag_id: u32::from(u16::from_ne_bytes([id0, id1])),
    })
}

/// An IPv4 address (a word, bytes in packet order) in the 16 bytes `Ip` keeps, the rest zero:
/// a value, not a byte array on the stack copied byte by byte into `Ip` (LLVM assumes no
/// alignment for a `[u8; N]` local on the BPF target: that copy cost every path ~25 ns).
#[inline(always)]
fn v4_addr(word: u32) -> [u8; 16] {
    const { assert!(cfg!(target_endian = "little")) };
    u128::from(word).to_ne_bytes()
}

/// Parses the IPv6 header at `off`.
#[inline(always)]
pub fn ipv6<C: Packet>(ctx: &C, off: usize) -> Result<Ip, IpError> {
    let h: Ipv6Hdr = read(ctx, off).map_err(|_| IpError::Malformed)?;
    if h.vcf[0] >> 4 != 6 {
        return Err(IpError::Malformed);
    }
    let mut ip = Ip {
        family: FAMILY_V6,
        proto: h.next_hdr,
        l3_off: off,
        l4_off: off + 40,
        end: off
            + 40
            + big_len(
                ctx,
                off + 40,
                usize::from(u16::from_be_bytes(h.payload_len)),
            ),
        src: h.src_addr,
        dst: h.dst_addr,
        frag: FRAG_NONE,
        frag_id: 0,
    };
    if h.next_hdr == IPPROTO_FRAGMENT {
        // Next header, reserved, offset (13 bits) | M, identification.
        let f: [u8; 8] = read(ctx, off + 40).map_err(|_| IpError::Malformed)?;
        let offset_m = u16::from_be_bytes([f[2], f[3]]);
        ip.proto = f[0];
        ip.l4_off = off + 48;
        ip.frag_id = u32::from_ne_bytes([f[4], f[5], f[6], f[7]]);
        ip.frag = if offset_m >> 3 != 0 {
            FRAG_LATER
        } else if offset_m & 1 != 0 {
            FRAG_FIRST
        } else {
            FRAG_NONE // an atomic fragment: a whole packet
        };
    }
    Ok(ip)
}

/// Which way a packet goes: ICMP echo requests leave, replies arrive; a packet out of a tunnel
/// may be either (a peer's request, or a reply returned to us).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Egress,
    Ingress,
    Tunnel,
}

/// The transport fields a translation needs.
#[derive(Clone, Copy)]
pub struct Ports {
    /// Network order. ICMP echo: the identifier on the local side, 0 on the remote side.
    pub src_be: u16,
    pub dst_be: u16,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
}

impl Ports {
    /// A FIN: the connection is closing.
    pub fn fin(&self) -> bool {
        self.tcp_flags & TCP_FIN != 0
    }
    /// A RST: the connection is gone.
    pub fn rst(&self) -> bool {
        self.tcp_flags & TCP_RST != 0
    }
    /// A SYN without ACK: the first packet of a connection.
    pub fn opens(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
    /// A SYN or SYN-ACK: carries the MSS option.
    pub fn syn(&self) -> bool {
        self.tcp_flags & TCP_SYN != 0
    }
}

pub enum PortsError {
    /// A protocol (or ICMP type) that cannot be translated.
    Unsupported,
    /// The transport header is cut short.
    Truncated,
}

/// Reads the `T` at the start of the transport header, if the packet (by its IP length) holds it.
#[inline(always)]
fn l4_header<T: Copy>(ctx: &impl Packet, ip: &Ip) -> Result<T, PortsError> {
    if ip.l4_off + core::mem::size_of::<T>() > ip.end {
        return Err(PortsError::Truncated);
    }
    read(ctx, ip.l4_off).map_err(|_| PortsError::Truncated)
}

/// Whether `ip` is an ICMPv6 neighbour discovery message (types 133–137: router and neighbour
/// solicitation and advertisement, redirect): link-scoped, never a policy's, whatever its
/// destination.
#[inline(always)]
pub fn neighbour_discovery<C: Packet>(ctx: &C, ip: &Ip) -> bool {
    if ip.family != FAMILY_V6 || ip.proto != IPPROTO_ICMPV6 || ip.l4_off >= ip.end {
        return false;
    }
    ctx.load_helper::<u8>(ip.l4_off)
        .is_ok_and(|t| (133..=137).contains(&t))
}

/// Parses the transport header of a whole packet or a first fragment.
#[inline(always)]
pub fn ports<C: Packet>(ctx: &C, ip: &Ip, dir: Dir) -> Result<Ports, PortsError> {
    match ip.proto {
        IPPROTO_TCP => {
            let h: [u8; 20] = l4_header(ctx, ip)?;
            Ok(Ports {
                src_be: u16::from_ne_bytes([h[0], h[1]]),
                dst_be: u16::from_ne_bytes([h[2], h[3]]),
                tcp_flags: h[13],
            })
        }
        IPPROTO_UDP => {
            let h: [u8; 8] = l4_header(ctx, ip)?;
            Ok(Ports {
                src_be: u16::from_ne_bytes([h[0], h[1]]),
                dst_be: u16::from_ne_bytes([h[2], h[3]]),
                tcp_flags: 0,
            })
        }
        // ICMP of the packet's own family only (ICMPv6 in IPv4 is no echo: its checksum
        // rules differ).
        IPPROTO_ICMP | IPPROTO_ICMPV6 if (ip.proto == IPPROTO_ICMP) == (ip.family == FAMILY_V4) => {
            let (request, reply) = if ip.proto == IPPROTO_ICMP {
                (8, 0)
            } else {
                (128, 129)
            };
            // The type decides first: anything but echo cannot be translated, however short
            // (one byte is enough to tell; the helper reads it, as a 1-byte direct read
            // compiles to a bounds check the verifier cannot follow).
            let t: u8 = if ip.l4_off >= ip.end {
                return Err(PortsError::Truncated);
            } else {
                ctx.load_helper(ip.l4_off)
                    .map_err(|_| PortsError::Truncated)?
            };
            if t != request && t != reply {
                return Err(PortsError::Unsupported);
            }
            let h: [u8; 8] = l4_header(ctx, ip)?;
            let id = u16::from_ne_bytes([h[4], h[5]]);
            match (dir, h[0]) {
                (Dir::Egress | Dir::Tunnel, t) if t == request => Ok(Ports {
                    src_be: id,
                    dst_be: 0,
                    tcp_flags: 0,
                }),
                (Dir::Ingress | Dir::Tunnel, t) if t == reply => Ok(Ports {
                    src_be: 0,
                    dst_be: id,
                    tcp_flags: 0,
                }),
                _ => Err(PortsError::Unsupported),
            }
        }
        _ => Err(PortsError::Unsupported),
    }
}
