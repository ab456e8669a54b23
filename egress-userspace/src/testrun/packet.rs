//! A small packet builder and an independent parser/checksum verifier for packet tests.
//!
//! Checksums are computed here from scratch (RFC 1071 sums over the whole header or segment),
//! never with the datapath's incremental arithmetic.

use std::net::IpAddr;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP / ICMPv6 echo request (`request`) or reply.
    Echo {
        id: u16,
        seq: u16,
        request: bool,
    },
    /// Any other IP protocol with a raw payload.
    Raw {
        proto: u8,
    },
}

/// Ones-complement sum of `data` (odd length padded with zero), not yet folded.
fn sum(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn addr_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut acc = sum(&addr_bytes(src), 0);
    acc = sum(&addr_bytes(dst), acc);
    acc + u32::from(proto) + len as u32
}

/// A TCP segment without payload between textual addresses (tests' shorthand).
pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Vec<u8> {
    let addr = |s: &str| {
        s.parse::<IpAddr>()
            .unwrap_or_else(|e| panic!("address {s:?}: {e}"))
    };
    build(
        addr(src),
        addr(dst),
        L4::Tcp {
            sport,
            dport,
            flags,
        },
        b"",
    )
}

/// Builds Ethernet + IP + transport + payload with correct checksums.
pub fn build(src: IpAddr, dst: IpAddr, l4: L4, payload: &[u8]) -> Vec<u8> {
    let v6 = src.is_ipv6();
    let (proto, mut seg) = match l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
        } => {
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[4..8].copy_from_slice(&1000u32.to_be_bytes());
            h[12] = 5 << 4;
            h[13] = flags;
            h[14..16].copy_from_slice(&64240u16.to_be_bytes());
            (6u8, h)
        }
        L4::Udp { sport, dport } => {
            let mut h = vec![0u8; 8];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            (17, h)
        }
        L4::Echo { id, seq, request } => {
            let mut h = vec![0u8; 8];
            h[0] = match (v6, request) {
                (false, true) => 8,
                (false, false) => 0,
                (true, true) => 128,
                (true, false) => 129,
            };
            h[4..6].copy_from_slice(&id.to_be_bytes());
            h[6..8].copy_from_slice(&seq.to_be_bytes());
            (if v6 { 58 } else { 1 }, h)
        }
        L4::Raw { proto } => (proto, vec![]),
    };
    seg.extend_from_slice(payload);
    let csum_at = match proto {
        6 => Some(16),
        17 => Some(6),
        1 | 58 => Some(2),
        _ => None,
    };
    if let Some(at) = csum_at {
        let acc = if proto == 1 {
            0
        } else {
            pseudo_sum(src, dst, proto, seg.len())
        };
        let mut c = fold(sum(&seg, acc));
        if proto == 17 && c == 0 {
            c = 0xffff;
        }
        seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }

    let mut p = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    if v6 {
        p.extend_from_slice(&[0x86, 0xdd]);
        let mut ip = vec![0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(seg.len() as u16).to_be_bytes());
        ip[6] = proto;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&addr_bytes(src));
        ip[24..40].copy_from_slice(&addr_bytes(dst));
        p.extend_from_slice(&ip);
    } else {
        p.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + seg.len()) as u16).to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&addr_bytes(src));
        ip[16..20].copy_from_slice(&addr_bytes(dst));
        let c = fold(sum(&ip, 0));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(&ip);
    }
    p.extend_from_slice(&seg);
    p
}

/// The fields a test checks, read back from a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// TCP/UDP ports; for echo the identifier in both.
    pub sport: u16,
    pub dport: u16,
}

pub fn parse(p: &[u8]) -> Parsed {
    let (src, dst, proto, l4) = if p[12..14] == [0x86, 0xdd] {
        let s: [u8; 16] = p[22..38].try_into().unwrap();
        let d: [u8; 16] = p[38..54].try_into().unwrap();
        (IpAddr::from(s), IpAddr::from(d), p[20], 54)
    } else {
        let s: [u8; 4] = p[26..30].try_into().unwrap();
        let d: [u8; 4] = p[30..34].try_into().unwrap();
        (
            IpAddr::from(s),
            IpAddr::from(d),
            p[23],
            14 + usize::from(p[14] & 0xf) * 4,
        )
    };
    let (sport, dport) = match proto {
        1 | 58 => {
            let id = u16::from_be_bytes([p[l4 + 4], p[l4 + 5]]);
            (id, id)
        }
        _ => (
            u16::from_be_bytes([p[l4], p[l4 + 1]]),
            u16::from_be_bytes([p[l4 + 2], p[l4 + 3]]),
        ),
    };
    Parsed {
        src,
        dst,
        proto,
        sport,
        dport,
    }
}

/// Recomputes the IPv4 header checksum and the transport checksum from scratch; Err names the
/// one that is wrong.
pub fn verify_checksums(p: &[u8]) -> Result<(), String> {
    let v6 = p[12..14] == [0x86, 0xdd];
    let parsed = parse(p);
    let l4 = if v6 {
        54
    } else {
        let ihl = usize::from(p[14] & 0xf) * 4;
        let c = fold(sum(&p[14..14 + ihl], 0));
        if c != 0 {
            return Err(format!(
                "IPv4 header checksum wrong (sum folds to {c:#06x})"
            ));
        }
        14 + ihl
    };
    let seg = &p[l4..];
    let proto = parsed.proto;
    if proto == 17 && !v6 && seg[6..8] == [0, 0] {
        return Ok(()); // UDP over IPv4 without checksum
    }
    let acc = if proto == 1 {
        0
    } else {
        pseudo_sum(parsed.src, parsed.dst, proto, seg.len())
    };
    match proto {
        1 | 6 | 17 | 58 => {
            let c = fold(sum(seg, acc));
            if c != 0 {
                return Err(format!(
                    "protocol {proto} checksum wrong (sum folds to {c:#06x})"
                ));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A TCP SYN (or SYN-ACK with `flags`) carrying an MSS option.
pub fn tcp_with_mss(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    flags: u8,
    mss: u16,
) -> Vec<u8> {
    let mut p = build(
        src,
        dst,
        L4::Tcp {
            sport,
            dport,
            flags,
        },
        &[],
    );
    let l4 = if src.is_ipv6() { 54 } else { 34 };
    // Grow the header by one option word: MSS (kind 2, length 4).
    p[l4 + 12] = 6 << 4;
    p.splice(l4 + 20..l4 + 20, [2, 4, (mss >> 8) as u8, mss as u8]);
    let seg_len = p.len() - l4;
    if src.is_ipv6() {
        p[18..20].copy_from_slice(&(seg_len as u16).to_be_bytes());
    } else {
        p[16..18].copy_from_slice(&((20 + seg_len) as u16).to_be_bytes());
        p[24..26].copy_from_slice(&[0, 0]);
        let c = fold(sum(&p[14..34], 0));
        p[24..26].copy_from_slice(&c.to_be_bytes());
    }
    p[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
    let c = fold(sum(&p[l4..], pseudo_sum(src, dst, 6, seg_len)));
    p[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
    p
}

/// The MSS option of a TCP SYN built by [`tcp_with_mss`] (frame with Ethernet header).
pub fn mss_of(frame: &[u8]) -> u16 {
    let l4 = 14 + usize::from(frame[14] & 0xf) * 4;
    assert_eq!(&frame[l4 + 20..l4 + 22], &[2, 4], "MSS option first");
    u16::from_be_bytes([frame[l4 + 22], frame[l4 + 23]])
}

/// The 28 bytes of outer IPv4 (DF, TTL 64, protocol 47, checksum computed here) and GRE
/// (key flag, IPv4 payload, `key`) that wrap an inner IPv4 packet of `inner_len` bytes.
pub fn gre_outer(src: [u8; 4], dst: [u8; 4], key: u32, inner_len: usize) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((inner_len + 28) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0, 0x40, 0, 64, 47, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = fold(sum(&h, 0));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(&[0x20, 0x00, 0x08, 0x00]);
    h.extend_from_slice(&key.to_be_bytes());
    h
}

/// An Ethernet frame carrying `inner` (a frame built by [`build`]) in GRE from `src` to `dst`
/// with `gre` as the 8 GRE bytes (use [`gre_outer`]'s for a well-formed one).
pub fn gre_frame(src: [u8; 4], dst: [u8; 4], key: u32, inner: &[u8]) -> Vec<u8> {
    let mut p = inner[..14].to_vec();
    p.extend_from_slice(&gre_outer(src, dst, key, inner.len() - 14));
    p.extend_from_slice(&inner[14..]);
    p
}

/// An ICMP (IPv4) or ICMPv6 error from `src` to `dst` of `kind` (type, code) with the 4 bytes
/// after the checksum set to `rest` (e.g. the MTU), quoting the first `quote` bytes of the IP
/// packet inside `frame` (an Ethernet frame as `build` makes them).
pub fn icmp_error(
    src: IpAddr,
    dst: IpAddr,
    kind: (u8, u8),
    rest: u32,
    frame: &[u8],
    quote: usize,
) -> Vec<u8> {
    let ip = &frame[14..];
    let mut msg = vec![kind.0, kind.1, 0, 0];
    msg.extend_from_slice(&rest.to_be_bytes());
    msg.extend_from_slice(&ip[..quote.min(ip.len())]);
    let proto = if src.is_ipv6() { 58 } else { 1 };
    build(src, dst, L4::Raw { proto }, &msg)
}

/// The quoted IP packet of an ICMP error frame, as an Ethernet frame of its own.
pub fn quoted_frame(error: &[u8]) -> Vec<u8> {
    let l4 = if error[12..14] == [0x86, 0xdd] {
        54
    } else {
        14 + usize::from(error[14] & 0xf) * 4
    };
    let mut f = error[..14].to_vec();
    f.extend_from_slice(&error[l4 + 8..]);
    f
}

/// Splits the IP datagram in `frame` into a first fragment carrying `first` payload bytes (a
/// multiple of 8) and a later fragment with the rest, both with identification `id`. IPv4:
/// more-fragments and offset in the header; IPv6: a Fragment header after the fixed header.
pub fn fragments(frame: &[u8], first: usize, id: u32) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(first % 8, 0, "fragment payloads are multiples of 8 bytes");
    let v6 = frame[12..14] == [0x86, 0xdd];
    let hlen = if v6 {
        40
    } else {
        usize::from(frame[14] & 0xf) * 4
    };
    let (l2, hdr, payload) = (&frame[..14], &frame[14..14 + hlen], &frame[14 + hlen..]);
    let piece = |data: &[u8], offset: usize, more: bool| -> Vec<u8> {
        let mut h = hdr.to_vec();
        let mut p = l2.to_vec();
        if v6 {
            let proto = h[6];
            h[6] = 44;
            h[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
            p.extend_from_slice(&h);
            let off_m = ((offset / 8) << 3) as u16 | u16::from(more);
            p.extend_from_slice(&[proto, 0]);
            p.extend_from_slice(&off_m.to_be_bytes());
            p.extend_from_slice(&id.to_be_bytes());
        } else {
            h[2..4].copy_from_slice(&((hlen + data.len()) as u16).to_be_bytes());
            h[4..6].copy_from_slice(&(id as u16).to_be_bytes());
            let flags = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
            h[6..8].copy_from_slice(&flags.to_be_bytes());
            h[10..12].copy_from_slice(&[0, 0]);
            let c = fold(sum(&h, 0));
            h[10..12].copy_from_slice(&c.to_be_bytes());
            p.extend_from_slice(&h);
        }
        p.extend_from_slice(data);
        p
    };
    (
        piece(&payload[..first], 0, true),
        piece(&payload[first..], first, false),
    )
}

/// Puts a first and a later fragment (as `fragments` makes them, possibly rewritten) back
/// together into one frame, with the first fragment's header, so its checksums can be verified.
pub fn reassemble(first: &[u8], later: &[u8]) -> Vec<u8> {
    let v6 = first[12..14] == [0x86, 0xdd];
    let mut p;
    if v6 {
        p = first[..14 + 40].to_vec();
        p[20] = first[54]; // the Fragment header's next header
        p.extend_from_slice(&first[62..]);
        p.extend_from_slice(&later[62..]);
        let len = (p.len() - 54) as u16;
        p[18..20].copy_from_slice(&len.to_be_bytes());
    } else {
        let hlen = usize::from(first[14] & 0xf) * 4;
        p = first.to_vec();
        p.extend_from_slice(&later[14 + hlen..]);
        let len = (p.len() - 14) as u16;
        p[16..18].copy_from_slice(&len.to_be_bytes());
        p[20..22].copy_from_slice(&[0, 0]);
        p[24..26].copy_from_slice(&[0, 0]);
        let c = fold(sum(&p[14..14 + hlen], 0));
        p[24..26].copy_from_slice(&c.to_be_bytes());
    }
    p
}

/// Whether a frame's IPv4 header checksum is right (fragments: the transport checksum covers
/// the whole datagram, see `reassemble`).
pub fn ipv4_header_ok(p: &[u8]) -> bool {
    let hlen = usize::from(p[14] & 0xf) * 4;
    fold(sum(&p[14..14 + hlen], 0)) == 0
}

/// `frame` as a router sends it on: IPv4 TTL one lower, header checksum recomputed.
pub fn hopped(frame: &[u8]) -> Vec<u8> {
    with_ttl(frame, frame[14 + 8] - 1)
}

/// `frame` (IPv4) with TTL `ttl`, header checksum recomputed.
pub fn with_ttl(frame: &[u8], ttl: u8) -> Vec<u8> {
    let mut p = frame.to_vec();
    let hlen = usize::from(p[14] & 0xf) * 4;
    p[14 + 8] = ttl;
    p[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let check = fold(sum(&p[14..14 + hlen], 0));
    p[14 + 10..14 + 12].copy_from_slice(&check.to_be_bytes());
    p
}

/// `frame` with VLAN tags (TPID, VLAN id), outermost first, inserted after the MAC addresses.
pub fn tagged(frame: &[u8], tags: &[(u16, u16)]) -> Vec<u8> {
    let mut p = frame[..12].to_vec();
    for (tpid, vid) in tags {
        p.extend_from_slice(&tpid.to_be_bytes());
        p.extend_from_slice(&vid.to_be_bytes());
    }
    p.extend_from_slice(&frame[12..]);
    p
}

/// `frame` without its VLAN tags (802.1Q, 802.1ad), and the tags it had.
pub fn untagged(frame: &[u8]) -> (Vec<u8>, Vec<(u16, u16)>) {
    let mut tags = Vec::new();
    let mut off = 12;
    loop {
        let tpid = u16::from_be_bytes([frame[off], frame[off + 1]]);
        if tpid != 0x8100 && tpid != 0x88a8 {
            break;
        }
        tags.push((tpid, u16::from_be_bytes([frame[off + 2], frame[off + 3]])));
        off += 4;
    }
    let mut p = frame[..12].to_vec();
    p.extend_from_slice(&frame[off..]);
    (p, tags)
}
