//! Numbers of the wire formats, one definition for the programs and the agent.

/// Ethernet type of IPv4 and IPv6 (host order).
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// An untagged Ethernet header.
pub const ETH_LEN: usize = 14;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_GRE: u8 = 47;
pub const IPPROTO_ICMPV6: u8 = 58;

/// An IPv4 header without options plus a TCP header without options: what an MSS leaves out.
pub const IPV4_TCP_HEADERS: u32 = 20 + 20;

/// The MSS of an IPv4 TCP segment that still fits an `mtu`-byte link once encapsulated
/// (outer IPv4 + GRE with key), as the tunnel's MSS clamp uses it.
pub const fn tunnel_mss(mtu: u32) -> u16 {
    let mss = mtu.saturating_sub(IPV4_TCP_HEADERS + crate::fabric::ENCAP_LEN);
    if mss > u16::MAX as u32 {
        u16::MAX
    } else {
        mss as u16
    }
}

/// The link MTU a tunnel MSS was derived from ([`tunnel_mss`] undone).
pub const fn mtu_of_tunnel_mss(mss: u16) -> u32 {
    mss as u32 + IPV4_TCP_HEADERS + crate::fabric::ENCAP_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tunnel_mss_of_a_1500_byte_link_is_1432() {
        assert_eq!(tunnel_mss(1500), 1432);
        assert_eq!(mtu_of_tunnel_mss(tunnel_mss(1500)), 1500);
        assert_eq!(tunnel_mss(40), 0);
    }
}
