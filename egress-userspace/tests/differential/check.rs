//! Invariants checked on every output, independent of the model: checksums recomputed from
//! scratch (also inside GRE and inside ICMP errors' messages), sources of packets that leave
//! towards policy destinations.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

fn sum(data: &[u8], mut acc: u64) -> u64 {
    for c in data.chunks(2) {
        acc += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn folds_to_zero(acc: u64) -> bool {
    let mut a = acc;
    while a > 0xffff {
        a = (a & 0xffff) + (a >> 16);
    }
    a == 0xffff
}

/// The outer IP header of a frame, read through up to two VLAN tags (TPID 0x8100 or 0x88a8):
/// (source, destination, protocol, header start, header length, end of the IP packet). None
/// when the frame is not a whole IP packet.
pub fn outer(p: &[u8]) -> Option<(IpAddr, IpAddr, u8, usize, usize, usize)> {
    if p.len() < 14 {
        return None;
    }
    let mut at = 14;
    let mut et = u16::from_be_bytes([p[12], p[13]]);
    for _ in 0..2 {
        if !matches!(et, 0x8100 | 0x88a8) {
            break;
        }
        if p.len() < at + 4 {
            return None;
        }
        et = u16::from_be_bytes([p[at + 2], p[at + 3]]);
        at += 4;
    }
    ip_at(p, at, et == 0x86dd).filter(|_| et == 0x0800 || et == 0x86dd)
}

fn ip_at(p: &[u8], at: usize, v6: bool) -> Option<(IpAddr, IpAddr, u8, usize, usize, usize)> {
    if v6 {
        if p.len() < at + 40 || p[at] >> 4 != 6 {
            return None;
        }
        let end = at + 40 + usize::from(u16::from_be_bytes([p[at + 4], p[at + 5]]));
        if end > p.len() {
            return None;
        }
        let s: [u8; 16] = p[at + 8..at + 24].try_into().unwrap();
        let d: [u8; 16] = p[at + 24..at + 40].try_into().unwrap();
        return Some((
            IpAddr::V6(Ipv6Addr::from(s)),
            IpAddr::V6(Ipv6Addr::from(d)),
            p[at + 6],
            at,
            40,
            end,
        ));
    }
    if p.len() < at + 20 || p[at] >> 4 != 4 || p[at] & 0xf < 5 {
        return None;
    }
    let hl = usize::from(p[at] & 0xf) * 4;
    let end = at + usize::from(u16::from_be_bytes([p[at + 2], p[at + 3]]));
    if p.len() < at + hl || end > p.len() || end < at + hl {
        return None;
    }
    let s: [u8; 4] = p[at + 12..at + 16].try_into().unwrap();
    let d: [u8; 4] = p[at + 16..at + 20].try_into().unwrap();
    Some((
        IpAddr::V4(Ipv4Addr::from(s)),
        IpAddr::V4(Ipv4Addr::from(d)),
        p[at + 9],
        at,
        hl,
        end,
    ))
}

fn addr_sum(a: IpAddr, acc: u64) -> u64 {
    match a {
        IpAddr::V4(v) => sum(&v.octets(), acc),
        IpAddr::V6(v) => sum(&v.octets(), acc),
    }
}

/// Recomputes every checksum of the frame from scratch. Ok(false): nothing checkable (not a
/// whole IP packet, or a fragment); Err names the wrong one.
pub fn verify(p: &[u8]) -> Result<bool, String> {
    let Some(ip) = outer(p) else {
        return Ok(false);
    };
    verify_ip(p, ip, 0)
}

fn verify_ip(
    p: &[u8],
    (src, dst, proto, at, hl, end): (IpAddr, IpAddr, u8, usize, usize, usize),
    depth: usize,
) -> Result<bool, String> {
    let v6 = src.is_ipv6();
    let what = if depth == 0 { "outer" } else { "inner" };
    if !v6 {
        if !folds_to_zero(sum(&p[at..at + hl], 0)) {
            return Err(format!("{what} IPv4 header checksum"));
        }
        let frag = u16::from_be_bytes([p[at + 6], p[at + 7]]);
        if frag & 0x3fff != 0 {
            return Ok(true);
        }
    }
    let seg = &p[at + hl..end];
    match proto {
        47 if !v6 && depth == 0 => {
            if seg.len() >= 8
                && seg[0..4] == [0x20, 0, 0x08, 0]
                && let Some(inner) = ip_at(p, at + hl + 8, false)
            {
                return verify_ip(p, inner, 1);
            }
            Ok(true)
        }
        6 if seg.len() >= 20 => {
            if !folds_to_zero(sum(seg, addr_sum(dst, addr_sum(src, 6 + seg.len() as u64)))) {
                return Err(format!("{what} TCP checksum"));
            }
            Ok(true)
        }
        17 if seg.len() >= 8 => {
            if seg[6..8] == [0, 0] {
                return Ok(true);
            }
            if !folds_to_zero(sum(
                seg,
                addr_sum(dst, addr_sum(src, 17 + seg.len() as u64)),
            )) {
                return Err(format!("{what} UDP checksum"));
            }
            Ok(true)
        }
        1 if !v6 && seg.len() >= 4 => {
            if !folds_to_zero(sum(seg, 0)) {
                return Err(format!("{what} ICMP checksum"));
            }
            Ok(true)
        }
        58 if v6 && seg.len() >= 4 => {
            if !folds_to_zero(sum(
                seg,
                addr_sum(dst, addr_sum(src, 58 + seg.len() as u64)),
            )) {
                return Err(format!("{what} ICMPv6 checksum"));
            }
            Ok(true)
        }
        _ => Ok(true),
    }
}

/// Checksums of the quoted packet inside an ICMP error (IP header always; the quoted transport
/// checksum only if the whole quoted packet is there).
pub fn verify_quote(p: &[u8]) -> Result<(), String> {
    let Some((src, _, proto, at, hl, end)) = outer(p) else {
        return Ok(());
    };
    let v6 = src.is_ipv6();
    let icmp = at + hl;
    let is_err = match (v6, proto) {
        (false, 1) => end > icmp && matches!(p[icmp], 3 | 11),
        (true, 58) => end > icmp && matches!(p[icmp], 1..=3),
        _ => false,
    };
    if !is_err || end < icmp + 8 {
        return Ok(());
    }
    let q = &p[..end];
    let Some(qip) = ip_at_quote(q, icmp + 8, v6) else {
        return Ok(());
    };
    let (qs, qd, qproto, qat, qhl, qend) = qip;
    if !v6 && !folds_to_zero(sum(&q[qat..qat + qhl], 0)) {
        return Err("quoted IPv4 header checksum".into());
    }
    if qend <= q.len() {
        let seg = &q[qat + qhl..qend];
        let ok = match qproto {
            6 if seg.len() >= 20 => {
                folds_to_zero(sum(seg, addr_sum(qd, addr_sum(qs, 6 + seg.len() as u64))))
            }
            17 if seg.len() >= 8 => {
                seg[6..8] == [0, 0]
                    || folds_to_zero(sum(seg, addr_sum(qd, addr_sum(qs, 17 + seg.len() as u64))))
            }
            1 if !v6 && seg.len() >= 4 => folds_to_zero(sum(seg, 0)),
            58 if v6 && seg.len() >= 4 => {
                folds_to_zero(sum(seg, addr_sum(qd, addr_sum(qs, 58 + seg.len() as u64))))
            }
            _ => true,
        };
        if !ok {
            return Err(format!("quoted protocol {qproto} checksum"));
        }
    }
    Ok(())
}

/// Like `ip_at` but the length field may speak of more than the quote holds (then `end` is
/// past the slice).
fn ip_at_quote(p: &[u8], at: usize, v6: bool) -> Option<(IpAddr, IpAddr, u8, usize, usize, usize)> {
    if v6 {
        if p.len() < at + 40 || p[at] >> 4 != 6 {
            return None;
        }
        let end = at + 40 + usize::from(u16::from_be_bytes([p[at + 4], p[at + 5]]));
        let s: [u8; 16] = p[at + 8..at + 24].try_into().unwrap();
        let d: [u8; 16] = p[at + 24..at + 40].try_into().unwrap();
        return Some((s.into(), d.into(), p[at + 6], at, 40, end));
    }
    if p.len() < at + 20 || p[at] >> 4 != 4 || p[at] & 0xf < 5 {
        return None;
    }
    let hl = usize::from(p[at] & 0xf) * 4;
    if p.len() < at + hl {
        return None;
    }
    let end = at + usize::from(u16::from_be_bytes([p[at + 2], p[at + 3]]));
    let s: [u8; 4] = p[at + 12..at + 16].try_into().unwrap();
    let d: [u8; 4] = p[at + 16..at + 20].try_into().unwrap();
    Some((s.into(), d.into(), p[at + 9], at, hl, end))
}

/// Frames `egress::testrun::packet::verify_checksums` can read: untagged IPv4/IPv6 TCP (≥ 20),
/// UDP (≥ 8), ICMP (≥ 8), no padding, no IPv6 extension headers, not a fragment.
pub fn plain_transport(p: &[u8]) -> bool {
    let Some((src, _, proto, at, hl, end)) = outer(p) else {
        return false;
    };
    if at != 14 {
        return false;
    }
    if end != p.len() {
        return false;
    }
    if src.is_ipv4() && u16::from_be_bytes([p[at + 6], p[at + 7]]) & 0x3fff != 0 {
        return false;
    }
    if src.is_ipv6()
        && proto == 17
        && p.len() >= at + hl + 8
        && p[at + hl + 6..at + hl + 8] == [0, 0]
    {
        return false;
    }
    let n = end - at - hl;
    match proto {
        6 => n >= 20,
        17 => n >= 8,
        1 => src.is_ipv4() && n >= 8,
        58 => src.is_ipv6() && n >= 8,
        _ => false,
    }
}
