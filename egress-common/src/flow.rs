//! The flow table: one entry per direction of every translated connection.
//!
//! An *outbound* entry is keyed by the connection as the local socket sends it and holds the
//! translated source; a *reverse* entry is keyed by the reply as it arrives and holds the
//! original source. The reverse entry is inserted first with `BPF_NOEXIST`: that insert is the
//! atomic claim of the translated port. ICMP echo uses the identifier as the local port (source
//! port of requests, destination port of replies) and 0 as the remote port.

/// Key of `FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// IPv4 in the first 4 bytes (rest zero), or IPv6; network order.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network order, as in the packet.
    pub src_port_be: u16,
    pub dst_port_be: u16,
    /// IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP or IPPROTO_ICMPV6.
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// `FlowValue::kind`.
pub const FLOW_OUTBOUND: u8 = 1;
pub const FLOW_REVERSE: u8 = 2;
/// A local connection this server forwarded (GRE) to `tunnel`; keyed like an outbound entry,
/// untranslated, no reverse entry here (the peer translates).
pub const FLOW_FORWARDED: u8 = 3;

/// `FlowValue::flags`: a FIN was seen; the entries are kept for [`timeouts::TCP_FIN`] so the
/// translated tuple is not reused while the origin may hold it in TIME_WAIT.
pub const FLOW_F_FIN: u8 = 1;
/// `FlowValue::flags`: the latest packet in this direction was a RST (a later packet without
/// RST clears it). A connection whose latest packet overall was a RST expires after
/// [`timeouts::TCP_RST`]; a spoofed RST the socket answers (RFC 5961 challenge ACK) does not.
pub const FLOW_F_RST: u8 = 2;
/// Either closing flag.
pub const FLOW_F_CLOSING: u8 = FLOW_F_FIN | FLOW_F_RST;
/// `FlowValue::flags` of a reverse or forwarded entry: a reply was seen. A connection without
/// one expires after [`timeouts::UNREPLIED`] and is the first to go when the table fills up.
pub const FLOW_F_REPLIED: u8 = 4;

/// Value of `FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Outbound: the translated source address. Reverse: the original (local) source address.
    pub addr: [u8; 16],
    /// Outbound: the translated source port. Reverse: the original source port. Network order.
    pub port_be: u16,
    /// [`FLOW_OUTBOUND`] or [`FLOW_REVERSE`].
    pub kind: u8,
    /// `FLOW_F_*` bits.
    pub flags: u8,
    /// Pool the connection belongs to.
    pub pool: u32,
    /// The programs' clock (CLOCK_MONOTONIC, up to about two ticks behind: [`crate::clock`])
    /// at the latest packet in this direction, refreshed at most every 100 ms.
    pub last_seen_ns: u64,
    /// The programs' clock when the connection was created.
    pub created_ns: u64,
    /// Fabric address of the other server of a forwarded connection, network order; zero when
    /// the connection is purely local. Forwarded: the peer it goes to. Outbound and reverse
    /// entries on a peer: the server that owns the socket (replies are encapsulated to it).
    pub tunnel: [u8; 4],
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 48);

/// Default entries of `FLOWS` (a hash map that never evicts; the agent can set another size at
/// load): 524,288 connections, about 150 MiB preallocated. Full, it refuses new connections
/// (`drop_flow_table_full`); an edge server sees bursts of short unreplied flows that an LRU
/// used to absorb by evicting, so the table is sized for them.
pub const FLOWS_CAPACITY: u32 = 1 << 20;

/// Idle timeouts the agent applies when collecting expired flows, in seconds.
pub mod timeouts {
    pub const TCP_ESTABLISHED: u64 = 3600;
    /// After a FIN: conntrack's TIME_WAIT, longer than the 2 MSL an origin may hold the tuple.
    pub const TCP_FIN: u64 = 120;
    /// After a RST: nothing holds the tuple any more (conntrack's CLOSE).
    pub const TCP_RST: u64 = 10;
    pub const UDP: u64 = 60;
    pub const ICMP: u64 = 30;
    /// A connection that never saw a reply (conntrack's UNREPLIED; SYN_SENT is longer there,
    /// but a retransmitted SYN simply claims again).
    pub const UNREPLIED: u64 = 30;
    /// Table pressure: from this share of the capacity (per mille) on, the collector also
    /// removes every unreplied connection idle for [`EARLY_DROP_IDLE`] s (conntrack's early
    /// drop), so that connections with replies are never crowded out.
    pub const EARLY_DROP_PER_MILLE: u64 = 875;
    pub const EARLY_DROP_IDLE: u64 = 1;
}

impl FlowValue {
    /// A fresh entry seen now (`now_ns`, CLOCK_MONOTONIC).
    pub const fn new(
        kind: u8,
        addr: [u8; 16],
        port_be: u16,
        pool: u32,
        tunnel: [u8; 4],
        now_ns: u64,
    ) -> Self {
        FlowValue {
            addr,
            port_be,
            kind,
            flags: 0,
            pool,
            last_seen_ns: now_ns,
            created_ns: now_ns,
            tunnel,
            _pad: [0; 4],
        }
    }
}

impl FlowKey {
    /// The key of the other direction of the connection, given this entry's value.
    pub const fn other_direction(&self, value: &FlowValue) -> FlowKey {
        let (src, dst, src_port_be, dst_port_be) = if value.kind == FLOW_REVERSE {
            // Reply key (remote → translated); the value holds the local endpoint.
            (value.addr, self.src, value.port_be, self.src_port_be)
        } else {
            // Outbound key (local → remote); the value holds the translated source.
            (self.dst, value.addr, self.dst_port_be, value.port_be)
        };
        FlowKey {
            src,
            dst,
            src_port_be,
            dst_port_be,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }
}

/// Key of `FRAGS`: one datagram's fragments, as they arrive.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// IPv4 in the first 4 bytes (rest zero), or IPv6; network order.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The IP identification (IPv4: 16 bits), as in the packet.
    pub id: u32,
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// Which way the datagram's later fragments go: [`FRAG_OUT`] or [`FRAG_IN`]. Entries of one
    /// direction never answer, nor replace, the other's (a peer may send any inner tuple, this
    /// host's own included).
    pub dir: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);

/// `FragKey::dir`: later fragments leaving through the uplink (TC egress).
pub const FRAG_OUT: u8 = 1;
/// `FragKey::dir`: later fragments arriving on the uplink, plain or in a tunnel.
pub const FRAG_IN: u8 = 2;

/// `FragValue::kind`: rewrite the source to `addr` (egress SNAT; a peer's connection).
pub const FRAG_SRC: u8 = 1;
/// Rewrite the destination to `addr`, then on through `tunnel` if set (a reply).
pub const FRAG_DST: u8 = 2;
/// Encapsulate unchanged to `tunnel` with key `pool` (egress forward; soft-unicast).
pub const FRAG_ENCAP: u8 = 3;
/// Sent by this server itself (a peer's connection translated here): egress passes it.
pub const FRAG_OURS: u8 = 4;
/// Strip the tunnel and pass up (a reply of a connection forwarded to `tunnel`, from it).
pub const FRAG_DELIVER: u8 = 5;

/// Value of `FRAGS`: what the first fragment of a datagram got; later fragments get the same.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    /// The address to write (FRAG_SRC: source; FRAG_DST: destination); network order.
    pub addr: [u8; 16],
    /// Fabric address to send through (FRAG_ENCAP, FRAG_DST of a forwarded connection), or the
    /// peer a FRAG_SRC datagram came from; zero when none.
    pub tunnel: [u8; 4],
    /// GRE key when tunnelled.
    pub pool: u32,
    /// A `FRAG_*` kind.
    pub kind: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(core::mem::size_of::<FragValue>() == 32);

/// Entries of `FRAGS` (LRU): datagrams in flight at once.
pub const FRAGS_CAPACITY: u32 = 65_536;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields and arrays only, explicit padding (sizes asserted above).
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_of_reverse_is_the_original() {
        let out = FlowKey {
            src: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [203, 0, 113, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            src_port_be: 1111u16.to_be(),
            dst_port_be: 80u16.to_be(),
            proto: 6,
            family: 4,
            _pad: [0; 2],
        };
        let out_val = FlowValue {
            addr: [192, 0, 2, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port_be: 2000u16.to_be(),
            kind: FLOW_OUTBOUND,
            ..Default::default()
        };
        let rev = out.other_direction(&out_val);
        assert_eq!(rev.src, out.dst);
        assert_eq!(rev.dst, out_val.addr);
        assert_eq!(rev.src_port_be, 80u16.to_be());
        assert_eq!(rev.dst_port_be, 2000u16.to_be());
        let rev_val = FlowValue {
            addr: out.src,
            port_be: out.src_port_be,
            kind: FLOW_REVERSE,
            ..Default::default()
        };
        assert_eq!(rev.other_direction(&rev_val), out);
    }
}
