//! Reading packets and fixing checksums the way the README says the programs do: headers parsed
//! from the frame, checksums fixed incrementally (RFC 1624, eqn. 3), never recomputed over the
//! payload.

pub const ETH_LEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// The two VLAN tag protocol identifiers the rules read through (802.1Q, 802.1ad).
pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88a8;
/// At most this many VLAN tags are read through.
pub const MAX_VLAN_TAGS: usize = 2;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_GRE: u8 = 47;
pub const PROTO_ICMPV6: u8 = 58;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub fn be16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

pub fn be32(p: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

pub fn put16(p: &mut [u8], at: usize, v: u16) {
    p[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// One's complement sum folded to 16 bits (not complemented).
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Sum of the 16-bit big-endian words of `data` (odd length: last byte padded with zero).
pub fn sum(data: &[u8]) -> u64 {
    data.chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// A checksum computed from scratch over `data` (for headers the model builds itself).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data))
}

/// RFC 1624 eqn. 3: the checksum `csum` after the 16-bit-aligned bytes `old` became `new`.
pub fn csum_update(csum: u16, old: &[u8], new: &[u8]) -> u16 {
    debug_assert_eq!(old.len(), new.len());
    let mut acc = u64::from(!csum);
    for (o, n) in old.chunks(2).zip(new.chunks(2)) {
        let ow = u16::from_be_bytes([o[0], *o.get(1).unwrap_or(&0)]);
        let nw = u16::from_be_bytes([n[0], *n.get(1).unwrap_or(&0)]);
        acc += u64::from(!ow) + u64::from(nw);
    }
    !fold(acc)
}

/// Ethernet as both programs read it (*Datapath rules*, the paragraph on VLAN tags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2 {
    /// Read through up to two VLAN tags in the frame data (TPID 0x8100 or 0x88a8, in either
    /// order): the ethertype after the tags read, the frame offset of what follows it (the IP
    /// header follows the last tag), the tags read. An odd TPID (untagged, or after one or two
    /// tags) is left as the ethertype: not IPv4/IPv6.
    Read {
        ethertype: u16,
        l3: usize,
        tags: usize,
    },
    /// A third tag (0x8100 or 0x88a8 again after two tags): the frame is malformed (rule 1).
    ThirdTag,
    /// The frame ends inside a tag (the rules do not say).
    Short,
}

/// Reads the Ethernet header of a frame and its VLAN tags (see [`L2`]).
pub fn l2(p: &[u8]) -> L2 {
    let is_tpid = |t| matches!(t, TPID_8021Q | TPID_8021AD);
    let mut at = ETH_LEN;
    let mut ethertype = be16(p, 12);
    let mut tags = 0;
    while is_tpid(ethertype) {
        if tags == MAX_VLAN_TAGS {
            return L2::ThirdTag;
        }
        if p.len() < at + 4 {
            return L2::Short;
        }
        ethertype = be16(p, at + 2);
        at += 4;
        tags += 1;
    }
    L2::Read {
        ethertype,
        l3: at,
        tags,
    }
}

/// A parsed IP header (IPv4 or IPv6) starting at `at` in a frame.
#[derive(Debug, Clone)]
pub struct Ip {
    pub v6: bool,
    pub at: usize,
    pub hdr_len: usize,
    /// Frame offset just past the IP packet (from its length field).
    pub end: usize,
    /// The frame holds bytes past `end` (e.g. Ethernet padding).
    pub padded: bool,
    pub proto: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Where the packet stands as a fragment.
    pub frag: Frag,
    /// IPv4 identification, IPv6 Fragment header identification (0 without one).
    pub id: u32,
    /// IPv6: an extension header the rules do not name (anything but one Fragment header right
    /// after the fixed header).
    pub ext: bool,
}

/// Fragments as the rules see them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// A whole packet (also an IPv6 Fragment header with offset 0 and M clear).
    Whole,
    /// Offset 0, more fragments: carries the transport header, goes through the rules.
    First,
    /// Offset ≠ 0: no transport header.
    Later,
}

impl Ip {
    pub fn l4(&self) -> usize {
        self.at + self.hdr_len
    }
    pub fn src4(&self) -> [u8; 4] {
        self.src[..4].try_into().unwrap()
    }
    pub fn dst4(&self) -> [u8; 4] {
        self.dst[..4].try_into().unwrap()
    }
    pub fn first(&self) -> bool {
        self.frag == Frag::First
    }
    pub fn later(&self) -> bool {
        self.frag == Frag::Later
    }
    /// Any kind of fragment (first or later).
    pub fn fragment(&self) -> bool {
        self.frag != Frag::Whole
    }
    pub fn family(&self) -> u8 {
        if self.v6 { 6 } else { 4 }
    }
    /// Byte range of the source / destination address in the frame.
    pub fn src_at(&self) -> (usize, usize) {
        if self.v6 {
            (self.at + 8, 16)
        } else {
            (self.at + 12, 4)
        }
    }
    pub fn dst_at(&self) -> (usize, usize) {
        if self.v6 {
            (self.at + 24, 16)
        } else {
            (self.at + 16, 4)
        }
    }
}

pub enum IpParse {
    NotIp,
    /// A bad IP header (version, IHL < 5, cut short).
    Bad,
    /// An IP length field (IPv4 total length, IPv6 payload length) beyond the frame: a bad IP
    /// header too for TC egress and ingress rule 1, which say so; where the rules name no such
    /// case (a quote in an ICMP error, which may describe more than it quotes; the inner packet
    /// of a tunnel) the caller decides.
    Long(&'static str),
    /// A header the rules do not describe (lengths that disagree with each other).
    Silent(&'static str),
    Ok(Ip),
}

/// Parses the IP header at `at`. `ethertype` is `None` for a packet inside GRE (IPv4 expected).
pub fn parse_ip(p: &[u8], at: usize, ethertype: Option<u16>) -> IpParse {
    let v6 = match ethertype {
        Some(ETHERTYPE_IPV4) | None => false,
        Some(ETHERTYPE_IPV6) => true,
        Some(_) => return IpParse::NotIp,
    };
    if v6 {
        if p.len() < at + 40 || p[at] >> 4 != 6 {
            return IpParse::Bad;
        }
        let end = at + 40 + usize::from(be16(p, at + 4));
        if end > p.len() {
            return IpParse::Long("IPv6 payload length beyond the frame");
        }
        let mut nh = p[at + 6];
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src.copy_from_slice(&p[at + 8..at + 24]);
        dst.copy_from_slice(&p[at + 24..at + 40]);
        let (mut hdr_len, mut frag, mut id) = (40, Frag::Whole, 0);
        if nh == 44 {
            if end < at + 48 {
                return IpParse::Silent("IPv6 Fragment header cut short");
            }
            let off = be16(p, at + 42);
            frag = match (off >> 3, off & 1) {
                (0, 0) => Frag::Whole,
                (0, _) => Frag::First,
                _ => Frag::Later,
            };
            id = be32(p, at + 44);
            nh = p[at + 40];
            hdr_len = 48;
        }
        return IpParse::Ok(Ip {
            v6,
            at,
            hdr_len,
            end,
            padded: end < p.len(),
            proto: nh,
            src,
            dst,
            frag,
            id,
            ext: matches!(nh, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140 | 253 | 254),
        });
    }
    if p.len() < at + 20 || p[at] >> 4 != 4 || p[at] & 0xf < 5 {
        return IpParse::Bad;
    }
    let hdr_len = usize::from(p[at] & 0xf) * 4;
    if p.len() < at + hdr_len {
        return IpParse::Bad;
    }
    let total = usize::from(be16(p, at + 2));
    if total < hdr_len {
        return IpParse::Silent("IPv4 total length shorter than the header");
    }
    let end = at + total;
    if end > p.len() {
        return IpParse::Long("IPv4 total length beyond the frame");
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src[..4].copy_from_slice(&p[at + 12..at + 16]);
    dst[..4].copy_from_slice(&p[at + 16..at + 20]);
    let frag_field = be16(p, at + 6);
    let frag = match (frag_field & 0x1fff, frag_field & 0x2000) {
        (0, 0) => Frag::Whole,
        (0, _) => Frag::First,
        _ => Frag::Later,
    };
    IpParse::Ok(Ip {
        v6,
        at,
        hdr_len,
        end,
        padded: end < p.len(),
        proto: p[at + 9],
        src,
        dst,
        frag,
        id: u32::from(be16(p, at + 4)),
        ext: false,
    })
}

/// The transport header as far as the rules care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        doff: usize,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Echo {
        request: bool,
        id: u16,
    },
    /// ICMPv4 3/11, ICMPv6 1/2/3 (at least the type byte present).
    IcmpError,
    /// Any other ICMP type (with at least 8 bytes).
    IcmpOther,
    /// TCP or UDP whose header is cut short, ICMP (not an error) shorter than 8 bytes;
    /// `icmp_type` when it is ICMP and the type byte is there.
    Truncated {
        icmp: bool,
        icmp_type: Option<u8>,
    },
    /// Another IP protocol (or ICMP of the other family).
    Other,
}

pub fn is_icmp(ip: &Ip) -> bool {
    (!ip.v6 && ip.proto == PROTO_ICMP) || (ip.v6 && ip.proto == PROTO_ICMPV6)
}

pub fn is_error_type(v6: bool, t: u8) -> bool {
    if v6 {
        matches!(t, 1..=3)
    } else {
        matches!(t, 3 | 11)
    }
}

pub fn is_echo(v6: bool, t: u8) -> bool {
    let (req, rep) = echo_types(v6);
    t == req || t == rep
}

pub fn echo_types(v6: bool) -> (u8, u8) {
    if v6 { (128, 129) } else { (8, 0) }
}

/// Parses the transport header of `ip` (a later fragment has none: `Other`). The TCP data offset
/// plays no part in it (only in finding the MSS option).
pub fn parse_l4(p: &[u8], ip: &Ip) -> Result<L4, &'static str> {
    let at = ip.l4();
    let avail = ip.end - at;
    if ip.ext || ip.later() {
        return Ok(L4::Other);
    }
    if ip.proto == PROTO_TCP {
        if avail < 20 {
            return Ok(L4::Truncated {
                icmp: false,
                icmp_type: None,
            });
        }
        let doff = usize::from(p[at + 12] >> 4) * 4;
        return Ok(L4::Tcp {
            sport: be16(p, at),
            dport: be16(p, at + 2),
            flags: p[at + 13],
            doff,
        });
    }
    if ip.proto == PROTO_UDP {
        if avail < 8 {
            return Ok(L4::Truncated {
                icmp: false,
                icmp_type: None,
            });
        }
        return Ok(L4::Udp {
            sport: be16(p, at),
            dport: be16(p, at + 2),
        });
    }
    if is_icmp(ip) {
        if avail < 1 {
            return Ok(L4::Truncated {
                icmp: true,
                icmp_type: None,
            });
        }
        let t = p[at];
        if is_error_type(ip.v6, t) {
            return Ok(L4::IcmpError);
        }
        let (req, rep) = echo_types(ip.v6);
        if avail < 8 {
            return Ok(L4::Truncated {
                icmp: true,
                icmp_type: Some(t),
            });
        }
        if t == req || t == rep {
            return Ok(L4::Echo {
                request: t == req,
                id: be16(p, at + 4),
            });
        }
        return Ok(L4::IcmpOther);
    }
    Ok(L4::Other)
}

/// Offset of the transport checksum from the transport header, and whether it covers a
/// pseudo-header.
pub fn l4_csum(v6: bool, proto: u8) -> Option<(usize, bool)> {
    match proto {
        PROTO_TCP => Some((16, true)),
        PROTO_UDP => Some((6, true)),
        PROTO_ICMP if !v6 => Some((2, false)),
        PROTO_ICMPV6 if v6 => Some((2, true)),
        _ => None,
    }
}

/// Writes `new` at `at` in `p` and fixes the checksum at `csum_at` for that change (UDP
/// semantics when `udp`: a zero checksum stays zero, a computed zero becomes 0xffff).
pub fn fix_csum(p: &mut [u8], csum_at: usize, udp: bool, old: &[u8], new: &[u8]) {
    let c = be16(p, csum_at);
    if udp && c == 0 {
        return;
    }
    let mut n = csum_update(c, old, new);
    if udp && n == 0 {
        n = 0xffff;
    }
    put16(p, csum_at, n);
}
