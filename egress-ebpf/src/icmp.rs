//! ICMP errors about translated connections. The quoted packet names the connection (it is one
//! we sent, so its swapped tuple is a reply's); the error is translated back: its destination,
//! the quoted source address and port, and every checksum those touch.

use aya_ebpf::programs::TcContext;
use egress_common::{action::FAMILY_V4, stats::Stat};

use crate::{
    csum::Delta,
    parse::{
        self, FRAG_NONE, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Ip, Ports, read,
        write,
    },
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_ECHO: u8 = 8;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_ECHO_REQUEST: u8 = 128;
/// ICMP header in front of the quoted packet.
const ICMP_HDR_LEN: usize = 8;

/// The packet an ICMP error quotes.
pub struct Quoted {
    /// Its IP header; the offsets point into the error.
    pub ip: Ip,
    /// Its ports as quoted: the source is our (translated) side.
    pub ports: Ports,
}

/// Whether `ip` is an ICMP error of a kind the dataplane translates (unreachable, including
/// fragmentation needed and packet too big, and time exceeded).
#[inline(always)]
pub fn is_error(ctx: &TcContext, ip: &Ip) -> bool {
    if ip.frag != FRAG_NONE {
        return false;
    }
    // Type and code together: a 1-byte direct read compiles to a bounds check the verifier
    // cannot follow.
    let Ok([t, _code]) = read::<[u8; 2]>(ctx, ip.l4_off) else {
        return false;
    };
    match (ip.proto, ip.family == FAMILY_V4) {
        (IPPROTO_ICMP, true) => t == ICMP_DEST_UNREACH || t == ICMP_TIME_EXCEEDED,
        (IPPROTO_ICMPV6, false) => {
            t == ICMPV6_DEST_UNREACH || t == ICMPV6_PKT_TOOBIG || t == ICMPV6_TIME_EXCEED
        }
        _ => false,
    }
}

/// The quoted packet of an ICMP error, when `ip` is one and it quotes an IP header (not a
/// fragment) and the first 8 bytes of TCP, UDP or an ICMP echo request.
#[inline(always)]
pub fn quoted(ctx: &TcContext, ip: &Ip) -> Option<Quoted> {
    if !is_error(ctx, ip) {
        return None;
    }
    let off = ip.l4_off + ICMP_HDR_LEN;
    let q = if ip.family == FAMILY_V4 {
        parse::ipv4(ctx, off)
    } else {
        parse::ipv6(ctx, off)
    }
    .ok()?;
    // The quote ends where the error's IP length says; what follows is padding, not quote.
    if q.frag != FRAG_NONE || q.l4_off + 8 > ip.end {
        return None;
    }
    let h: [u8; 8] = read(ctx, q.l4_off).ok()?;
    let (src_be, dst_be) = match q.proto {
        IPPROTO_TCP | IPPROTO_UDP => (
            u16::from_ne_bytes([h[0], h[1]]),
            u16::from_ne_bytes([h[2], h[3]]),
        ),
        // (The quote is of the error's family: `ipv4` or `ipv6` above.)
        IPPROTO_ICMP if h[0] == ICMP_ECHO && ip.family == FAMILY_V4 => {
            (u16::from_ne_bytes([h[4], h[5]]), 0)
        }
        IPPROTO_ICMPV6 if h[0] == ICMPV6_ECHO_REQUEST && ip.family != FAMILY_V4 => {
            (u16::from_ne_bytes([h[4], h[5]]), 0)
        }
        _ => return None,
    };
    Some(Quoted {
        ip: q,
        ports: Ports {
            src_be,
            dst_be,
            tcp_flags: 0,
        },
    })
}

/// Replaces the 16-bit field at `off` with `f(old)` and records the change in `d`.
#[inline(always)]
fn update16(
    ctx: &TcContext,
    off: usize,
    d: &mut Delta,
    f: impl FnOnce(u16) -> u16,
) -> Result<(), Stat> {
    let old: u16 = read(ctx, off).map_err(|_| Stat::RewriteFailed)?;
    let new = f(old);
    write(ctx, off, &new).map_err(|_| Stat::RewriteFailed)?;
    d.word(old, new);
    Ok(())
}

/// Translates error `ip` quoting `q` back to the connection's original endpoint (`addr`,
/// `port_be`): the error's destination, the quoted source address and port, the quoted IPv4
/// header checksum, the quoted transport checksum where the quote holds it, and the error's own
/// checksum (ICMPv6: with its pseudo-header).
#[inline(always)]
pub fn translate(
    ctx: &TcContext,
    ip: &Ip,
    q: &Quoted,
    addr: &[u8; 16],
    port_be: u16,
) -> Result<(), Stat> {
    let v4 = ip.family == FAMILY_V4;
    let fail = |()| Stat::RewriteFailed;
    // Changes inside the ICMP message (and, for ICMPv6, its pseudo-header).
    let mut icmp = Delta::default();

    // The error's destination.
    if v4 {
        let new = [addr[0], addr[1], addr[2], addr[3]];
        let mut hdr = Delta::default();
        hdr.addr(true, &ip.dst, addr);
        write(ctx, ip.l3_off + 16, &new).map_err(fail)?;
        update16(ctx, ip.l3_off + 10, &mut Delta::default(), |c| hdr.apply(c))?;
    } else {
        write(ctx, ip.l3_off + 24, addr).map_err(fail)?;
        icmp.addr(false, &ip.dst, addr);
    }

    // The quoted transport checksum: its pseudo-header source and its source port change.
    let mut l4 = Delta::default();
    l4.word(q.ports.src_be, port_be);
    match q.ip.proto {
        IPPROTO_TCP => {
            l4.addr(v4, &q.ip.src, addr);
            // Only when the quote (within the error's IP length: not padding) holds it;
            // routers quote at least 8 bytes.
            if q.ip.l4_off + 18 <= ip.end {
                update16(ctx, q.ip.l4_off + 16, &mut icmp, |c| l4.apply(c))?;
            }
        }
        IPPROTO_UDP => {
            l4.addr(v4, &q.ip.src, addr);
            update16(ctx, q.ip.l4_off + 6, &mut icmp, |c| match c {
                0 => 0, // no checksum
                c => match l4.apply(c) {
                    0 => 0xffff,
                    n => n,
                },
            })?;
        }
        IPPROTO_ICMPV6 => {
            l4.addr(false, &q.ip.src, addr);
            update16(ctx, q.ip.l4_off + 2, &mut icmp, |c| l4.apply(c))?;
        }
        _ => update16(ctx, q.ip.l4_off + 2, &mut icmp, |c| l4.apply(c))?, // ICMP echo
    }

    // The quoted source port (echo: identifier).
    let port_off = if matches!(q.ip.proto, IPPROTO_TCP | IPPROTO_UDP) {
        q.ip.l4_off
    } else {
        q.ip.l4_off + 4
    };
    update16(ctx, port_off, &mut icmp, |_| port_be)?;

    // The quoted source address, and the quoted IPv4 header's checksum.
    if v4 {
        let mut hdr = Delta::default();
        hdr.addr(true, &q.ip.src, addr);
        write(ctx, q.ip.l3_off + 12, &[addr[0], addr[1], addr[2], addr[3]]).map_err(fail)?;
        icmp.addr(true, &q.ip.src, addr);
        update16(ctx, q.ip.l3_off + 10, &mut icmp, |c| hdr.apply(c))?;
    } else {
        write(ctx, q.ip.l3_off + 8, addr).map_err(fail)?;
        icmp.addr(false, &q.ip.src, addr);
    }

    // The error's own checksum.
    update16(ctx, ip.l4_off + 2, &mut Delta::default(), |c| icmp.apply(c))
}
