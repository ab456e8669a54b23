//! Per-CPU counters: one slot per [`Stat`], each counting packets and bytes.

/// Value of one slot of the `STATS` per-CPU array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

#[cfg(feature = "user")]
// SAFETY: repr(C), two u64s, no padding.
unsafe impl aya::Pod for Counter {}

/// Slots reserved in the `STATS` map. Fixed, larger than the number of counters, so that a newer
/// agent can adopt an older pinned map without recreating it.
pub const STATS_CAPACITY: u32 = 64;

macro_rules! stats {
    ($( $(#[doc = $doc:literal])* $variant:ident = $idx:literal => $name:literal, )*) => {
        /// Index of every counter the datapath keeps. The one list used by both sides: the
        /// programs count with it, the agent names and exports with it.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Stat {
            $( $(#[doc = $doc])* $variant = $idx, )*
        }

        impl Stat {
            /// Every counter, in index order.
            pub const ALL: &'static [Stat] = &[$(Stat::$variant,)*];

            /// Stable snake_case name, used in `egress stats` and metrics.
            pub const fn name(self) -> &'static str {
                match self { $(Stat::$variant => $name,)* }
            }

            /// The counter of slot `index` (a decision handed between programs).
            pub const fn from_index(index: u32) -> Option<Stat> {
                match index { $($idx => Some(Stat::$variant),)* _ => None }
            }

            /// One-line description for `egress stats` and metric help.
            pub const fn help(self) -> &'static str {
                match self { $(Stat::$variant => concat!($($doc,)*),)* }
            }
        }
    };
}

stats! {
    /// Packets seen by the TC egress program.
    EgressSeen = 0 => "egress_seen",
    /// Packets seen by the TC ingress program.
    IngressSeen = 1 => "ingress_seen",
    /// Egress: not IPv4/IPv6 (ARP, …); passed.
    EgressNotIp = 2 => "egress_not_ip",
    /// Egress: IP header truncated or malformed; dropped (it could not be matched to a policy).
    EgressMalformed = 3 => "egress_malformed",
    /// Egress: destination matches no policy; passed unchanged.
    EgressNoPolicy = 4 => "egress_no_policy",
    /// Egress: a new connection translated to a pool address and a freshly claimed port.
    SnatNew = 5 => "snat_new",
    /// Egress: a packet of a known connection translated with its recorded binding.
    SnatEstablished = 6 => "snat_established",
    /// Egress: the programs' own packet, recognised by what it is (GRE from this server's fabric
    /// address to a known peer, or a peer's connection translated here); passed untouched.
    Ours = 7 => "ours_passed",
    /// Egress: policy matched but no action is planned for the pool and family; dropped.
    NoAction = 8 => "drop_no_action",
    /// Egress: the plan says no server can carry the pool; dropped.
    PoolUnreachable = 9 => "drop_pool_unreachable",
    /// A packet to translate (local, or a peer's from the tunnel) whose protocol cannot be
    /// translated (not TCP, UDP or ICMP echo); dropped.
    UnsupportedL4 = 10 => "drop_unsupported_l4",
    /// A packet to translate (local, or a peer's from the tunnel) whose transport header is cut
    /// short; dropped.
    TruncatedL4 = 11 => "drop_truncated_l4",
    /// A later fragment to a policy destination (or in a tunnel) whose first fragment was not
    /// seen (lost, or overtaken); dropped.
    Fragment = 12 => "drop_fragment",
    /// A new connection (local, or a peer's translated here): every probed port of every SNAT
    /// target was taken; dropped.
    PortExhausted = 13 => "drop_port_exhausted",
    /// Recording a connection (local, forwarded, or a peer's) in the flow table failed; dropped.
    FlowInsertFailed = 14 => "drop_flow_insert_failed",
    /// Either direction: rewriting the packet (store or checksum helper) failed; dropped.
    RewriteFailed = 15 => "drop_rewrite_failed",
    /// A new connection's probed port (local, or a peer's) was already taken by another
    /// connection (one per collision).
    PortCollision = 16 => "port_collision",
    /// Ingress: a reply translated back to the connection's original address and port.
    ReverseNat = 17 => "reverse_nat",
    /// Ingress: not IPv4/IPv6; passed.
    IngressNotIp = 18 => "ingress_not_ip",
    /// Ingress: no translated connection matches; passed unchanged.
    IngressNoFlow = 19 => "ingress_no_flow",
    /// Ingress: header truncated or malformed; passed to the stack, which judges it.
    IngressMalformed = 20 => "ingress_malformed",
    /// Egress: a new connection forwarded (GRE) to a peer holding the pool.
    ForwardNew = 21 => "forward_new",
    /// Egress: a packet of a forwarded connection encapsulated to its recorded peer.
    ForwardEstablished = 22 => "forward_established",
    /// Ingress: GRE from an address that is not a known fabric peer; dropped.
    GreUnknownPeer = 23 => "drop_gre_unknown_peer",
    /// Ingress: GRE without the expected header (key, IPv4 payload) or a bad inner packet; dropped.
    GreMalformed = 24 => "drop_gre_malformed",
    /// Ingress: a forwarded connection's packet translated here and sent on to the origin.
    PeerSnat = 25 => "peer_snat",
    /// Ingress: a forwarded packet for a pool this server cannot translate; dropped.
    PeerNotHeld = 26 => "drop_peer_not_held",
    /// Ingress: a reply translated back and encapsulated to the server owning the socket.
    ReplyReencap = 27 => "reply_reencap",
    /// Ingress: a decapsulated reply of a connection this server forwarded; delivered.
    ForwardedReply = 28 => "forwarded_reply",
    /// Ingress: a packet to a pool port range another server owns, encapsulated to it unchanged.
    SoftUnicast = 29 => "soft_unicast",
    /// Either direction: growing or shrinking the packet for GRE failed; dropped.
    EncapFailed = 30 => "drop_encap_failed",
    /// Either direction: no route or neighbour towards a peer or the origin; dropped.
    NoRoute = 31 => "drop_no_route",
    /// A TCP SYN or SYN-ACK of a forwarded connection whose MSS was lowered to fit the tunnel.
    MssClamped = 32 => "mss_clamped",
    /// Egress: IPv6 cannot be forwarded (only IPv4 pools are shared); dropped.
    ForwardV6 = 33 => "drop_forward_ipv6",
    /// Either direction: a packet that would exceed the uplink MTU once encapsulated (not GSO,
    /// so it cannot be segmented); dropped here rather than silently by the device.
    EncapTooBig = 34 => "drop_encap_too_big",
    /// Ingress: a peer's packet whose inner destination no policy of the GRE key's pool covers,
    /// that belongs to another peer's connection, or that only a reply could explain; dropped.
    PeerPolicy = 35 => "drop_peer_policy",
    /// Ingress: an ICMP error about a connection translated here, translated back and delivered.
    IcmpErrorNat = 36 => "icmp_error_nat",
    /// Ingress: an ICMP error about a peer's connection translated here, translated back and
    /// sent through the tunnel to the server owning the socket.
    IcmpErrorReencap = 37 => "icmp_error_reencap",
    /// Ingress: a tail-called program was missing (the agent had not installed it); dropped.
    MissingProgram = 38 => "drop_missing_program",
    /// Either direction: a later fragment handled as its datagram's first fragment was.
    FragmentFollowed = 39 => "fragment_followed",
    /// Ingress: GRE from a known peer but addressed to another fabric address than this
    /// server's; dropped.
    GreNotLocal = 40 => "drop_gre_not_local",
    /// A new connection refused because the flow table is full (established connections are
    /// never evicted to make room); dropped.
    FlowTableFull = 41 => "drop_flow_table_full",
    /// Ingress: a tunnel packet whose kind (GRE key bits: connection, soft-unicast, reply) does
    /// not fit what it carries, e.g. a soft-unicast packet that matches no connection; dropped.
    TunnelKind = 42 => "drop_tunnel_kind",
    /// Ingress: a packet this server would forward to another host (soft-unicast, reply
    /// re-encapsulation, a peer's connection) whose TTL would reach 0; dropped, as by a router.
    TtlExceeded = 43 => "drop_ttl_exceeded",
    /// Ingress: a peer's new connection refused because that peer already holds its budget of
    /// connections translated here; dropped.
    PeerBudget = 44 => "drop_peer_budget",
    /// A packet to encapsulate, or a tunnel packet, with VLAN tags in the frame data (the
    /// tunnel is built for an untagged uplink); dropped.
    VlanTunnel = 45 => "drop_vlan_tunnel",
    /// Tunnel: a liveness probe from a peer, reflected back to it.
    ProbeEchoed = 46 => "probe_echoed",
    /// Tunnel: the reply to one of this agent's liveness probes, passed to it.
    ProbeReply = 47 => "probe_reply",
    /// Ingress: a packet for a pool port whose owner does not answer its fabric probes:
    /// dropped, never sent into a dead tunnel.
    OwnerDown = 48 => "drop_owner_down",
    /// A packet to encapsulate or redirect before the agent wrote this server's fabric settings
    /// (`LOCAL`: its programs are loaded but not configured yet); dropped.
    NotConfigured = 49 => "drop_not_configured",
    /// Egress: a packet of this host shaped like a reply of a connection translated here (its
    /// tuple is a reverse entry's key); dropped.
    ReplyShaped = 50 => "drop_reply_shaped",
    /// Egress: a forward action with no next hop (a plan not written by the agent); dropped.
    NoHops = 51 => "drop_no_hops",
    /// Egress: an action of a kind these programs do not know (a plan from another version of
    /// the agent); dropped.
    BadAction = 52 => "drop_bad_action",
    /// Ingress: a packet the XDP program finished (`egress agent --xdp`); it is also counted
    /// under its path's counter, and the TC programs never saw it.
    XdpDone = 53 => "xdp_done",
    /// Egress: a peer's connection translated here, recognised by the ingress program's sent
    /// hint and its reverse entry (its second pass, one lookup); passed untouched.
    OursHinted = 54 => "ours_hinted",
    /// Egress: a packet of this host whose tuple is that of a peer's connection translated here
    /// (an outbound entry naming a tunnel): never sent with that connection's binding (its
    /// replies would go to the peer); dropped, the entry untouched.
    PeerTuple = 55 => "drop_peer_tuple",
}

const _: () = assert!((Stat::ALL.len() as u32) <= STATS_CAPACITY);

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn indexes_are_dense_and_names_unique() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{s:?} is out of order");
            assert!(!s.help().is_empty(), "{s:?} has no help");
        }
        let mut names: std::vec::Vec<_> = Stat::ALL.iter().map(|s| s.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Stat::ALL.len(), "duplicate counter names");
    }
}
