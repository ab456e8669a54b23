//! The path catalogue: one fixture per datapath path of server `a` of [`super::FIXTURE_TOPOLOGY`]
//! — its packet at any frame size (from the layered builder in [`super::packet`]), the state it
//! needs first, the output it must give and the counter it moves. The packet tests check every
//! fixture at both frame sizes (`tests/packets/catalogue.rs`); the per-packet benchmark checks each the
//! same way before timing it (for a path that opens a connection per packet, the first).

use std::net::IpAddr;

use egress_common::{fabric::tunnel, stats::Stat};

use super::{
    Hook, Outcome, PEER_MAC, TC_ACT_OK, TC_ACT_SHOT, TestDatapath, TestNet, XDP_DROP, XDP_PASS,
    XDP_TX,
    packet::{self, L4, Parsed, TCP_ACK, TCP_SYN},
};

/// `bpf_redirect`'s verdict: sent out of the uplink by the program itself.
pub const TC_ACT_REDIRECT: u32 = 7;
/// This server (`a`) and the peer (`b`) on the fabric.
pub const A: [u8; 4] = [10, 50, 0, 11];
pub const B: [u8; 4] = [10, 50, 0, 12];
/// acme's shared address (`a` holds 40000-40999, `b` 41000-42000).
pub const ACME: &str = "192.0.2.10";
/// Server `a`'s address in acme's IPv6 prefix (its id, 11, in the last bits).
pub const ACME_V6: &str = "2001:db8:7::b";

/// What the state a path needs is made of.
#[derive(Clone, Copy)]
pub enum Prime {
    /// Nothing: the packet stands alone.
    None,
    /// The packet itself, once (an established connection's next packet).
    Same,
    /// Another packet through `hook`; the fixture's packet is built from what it became.
    Packet(Hook, fn(usize) -> Vec<u8>),
}

/// Where the inner packet of an encapsulated output goes.
#[derive(Clone, Copy, Debug)]
pub enum Inner {
    /// Unchanged.
    Unchanged,
    /// Unchanged but for the TTL, one less (it was routed a hop).
    Hopped,
    /// Its destination translated back to this socket (address, port).
    BackTo(&'static str, u16),
}

/// What a path must do with its packet.
#[derive(Clone, Copy, Debug)]
pub enum Want {
    /// Passed up, byte for byte unchanged.
    Unchanged,
    /// Sent on (`verdict`) with the source translated to `addr` and a port in `ports`;
    /// destination unchanged.
    Snat {
        verdict: u32,
        addr: &'static str,
        ports: (u16, u16),
    },
    /// Passed up with the destination translated back to this socket (address, port).
    BackTo(&'static str, u16),
    /// Encapsulated from this server to `peer` under GRE `key`, sent with `verdict`.
    Encapsulated {
        verdict: u32,
        peer: [u8; 4],
        key: u32,
        inner: Inner,
    },
    Dropped,
    /// Decapsulated (the outer IPv4 and GRE headers gone, the Ethernet header kept) and passed
    /// up.
    Decapsulated,
}

/// How a program type says pass, drop and "sent out of the uplink by the program".
#[derive(Clone, Copy)]
pub struct Codes {
    pass: u32,
    drop: u32,
    sent: u32,
}

/// TC's verdicts ([`Want`]'s verdicts are written as these).
pub const TC: Codes = Codes {
    pass: TC_ACT_OK,
    drop: TC_ACT_SHOT,
    sent: TC_ACT_REDIRECT,
};
/// XDP's: passed up, dropped, transmitted back out of the uplink.
pub const XDP: Codes = Codes {
    pass: XDP_PASS,
    drop: XDP_DROP,
    sent: XDP_TX,
};

impl Codes {
    /// The verdict of this program type for TC verdict `tc`.
    fn of(self, tc: u32) -> u32 {
        match tc {
            TC_ACT_OK => self.pass,
            TC_ACT_SHOT => self.drop,
            _ => self.sent,
        }
    }
}

/// One path: what goes in, what must come out, which counter says so.
pub struct PathFixture {
    /// The benchmark's row name.
    pub path: &'static str,
    pub hook: Hook,
    pub prime: Prime,
    /// The packet at frame size `frame` (encapsulating paths: the largest that fits once
    /// encapsulated), given what the priming packet became and a sequence number (paths that
    /// open a new connection per packet use it for a fresh remote port).
    pub packet: fn(frame: usize, primed: Option<&Parsed>, seq: u32) -> Vec<u8>,
    /// What the packet must become at frame size `frame`.
    pub want: fn(frame: usize) -> Want,
    pub counter: Stat,
    /// Each packet opens a new connection (`seq` varies per run).
    pub fresh: bool,
}

/// A TCP packet padded to a `frame`-byte Ethernet frame.
pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8, frame: usize) -> Vec<u8> {
    let header = if src.contains(':') {
        14 + 40 + 20
    } else {
        14 + 20 + 20
    };
    let payload = vec![0x5a; frame.saturating_sub(header)];
    packet::build(
        ip(src),
        ip(dst),
        L4::Tcp {
            sport,
            dport,
            flags,
        },
        &payload,
    )
}

/// Paths that encapsulate take the largest packet that still fits the uplink afterwards.
pub fn tunnelled(frame: usize) -> usize {
    frame.min(1514 - 28)
}

/// Distinct connections per frame size (one datapath serves both sizes).
fn port(base: u16, frame: usize) -> u16 {
    base + frame as u16
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal address")
}

/// A peer's (b's) connection to the origin arriving in GRE, the frame `frame` bytes in all.
fn from_peer(sport: u16, frame: usize) -> Vec<u8> {
    let inner = tcp("10.50.0.12", sport, "203.0.113.1", 80, TCP_ACK, frame - 28);
    packet::gre_frame(B, A, tunnel::key(tunnel::CONNECTION, 7), &inner)
}

/// A peer's connection as translated here (`sent`: what `from_peer` became), leaving through
/// egress once more.
fn leaving_again(frame: usize, sent: Option<&Parsed>, _: u32) -> Vec<u8> {
    let s = sent.expect("primed");
    tcp(ACME, s.sport, "203.0.113.1", 80, TCP_ACK, frame - 28)
}

const OURS: (u16, u16) = (40000, 40999);
/// An IPv6 address of a server is its own: every port is its to hand out.
const ALL_PORTS: (u16, u16) = (1024, 65535);
/// An origin of acme's IPv6 policy.
const V6_ORIGIN: &str = "2001:db8:beef::1";

/// Every path, in the benchmark's order.
pub fn catalogue() -> Vec<PathFixture> {
    vec![
        PathFixture {
            path: "no policy match",
            hook: Hook::Egress,
            prime: Prime::None,
            packet: |f, _, _| tcp("10.50.0.11", 5000, "198.51.100.1", 80, TCP_ACK, f),
            want: |_| Want::Unchanged,
            counter: Stat::EgressNoPolicy,
            fresh: false,
        },
        PathFixture {
            path: "new flow SNAT",
            hook: Hook::Egress,
            prime: Prime::None,
            packet: |f, _, seq| {
                // A new remote port each time, and a new local port every 65,000.
                let (sport, dport) = (5000 + (seq / 65000) as u16, (1 + seq % 65000) as u16);
                tcp("10.50.0.11", sport, "203.0.113.3", dport, TCP_SYN, f)
            },
            want: |_| Want::Snat {
                verdict: TC_ACT_OK,
                addr: ACME,
                ports: OURS,
            },
            counter: Stat::SnatNew,
            fresh: true,
        },
        PathFixture {
            path: "established SNAT",
            hook: Hook::Egress,
            prime: Prime::Same,
            packet: |f, _, _| tcp("10.50.0.11", port(7000, f), "203.0.113.1", 80, TCP_ACK, f),
            want: |_| Want::Snat {
                verdict: TC_ACT_OK,
                addr: ACME,
                ports: OURS,
            },
            counter: Stat::SnatEstablished,
            fresh: false,
        },
        PathFixture {
            path: "reverse translation",
            hook: Hook::Ingress,
            prime: Prime::Packet(Hook::Egress, |f| {
                tcp("10.50.0.11", port(7400, f), "203.0.113.1", 80, TCP_ACK, f)
            }),
            packet: |f, bound, _| {
                let b = bound.expect("primed");
                tcp("203.0.113.1", 80, &b.src.to_string(), b.sport, TCP_ACK, f)
            },
            want: |f| Want::BackTo("10.50.0.11", port(7400, f)),
            counter: Stat::ReverseNat,
            fresh: false,
        },
        PathFixture {
            path: "forward (encapsulate)",
            hook: Hook::Egress,
            prime: Prime::Same,
            packet: |f, _, _| {
                let f = tunnelled(f);
                tcp("10.50.0.11", port(7100, f), "203.0.113.200", 80, TCP_ACK, f)
            },
            want: |_| Want::Encapsulated {
                verdict: TC_ACT_OK,
                peer: B,
                key: tunnel::key(tunnel::CONNECTION, 9),
                inner: Inner::Unchanged,
            },
            counter: Stat::ForwardEstablished,
            fresh: false,
        },
        PathFixture {
            path: "peer (decapsulate + SNAT)",
            hook: Hook::Ingress,
            prime: Prime::Same,
            packet: |f, _, _| from_peer(port(7200, f), f),
            want: |_| Want::Snat {
                verdict: TC_ACT_REDIRECT,
                addr: ACME,
                ports: OURS,
            },
            counter: Stat::PeerSnat,
            fresh: false,
        },
        PathFixture {
            path: "peer's packet leaving (second pass)",
            hook: Hook::EgressHinted,
            prime: Prime::Packet(Hook::Ingress, |f| from_peer(port(7250, f), f)),
            packet: leaving_again,
            want: |_| Want::Unchanged,
            counter: Stat::OursHinted,
            fresh: false,
        },
        PathFixture {
            path: "peer's packet leaving, no hint",
            hook: Hook::Egress,
            prime: Prime::Packet(Hook::Ingress, |f| from_peer(port(7260, f), f)),
            packet: leaving_again,
            want: |_| Want::Unchanged,
            counter: Stat::Ours,
            fresh: false,
        },
        PathFixture {
            path: "reply re-encapsulation",
            hook: Hook::Ingress,
            prime: Prime::Packet(Hook::Ingress, |f| from_peer(port(7300, f), f)),
            packet: |f, bound, _| {
                let b = bound.expect("primed");
                tcp("203.0.113.1", 80, ACME, b.sport, TCP_ACK, tunnelled(f))
            },
            want: |f| Want::Encapsulated {
                verdict: TC_ACT_REDIRECT,
                peer: B,
                key: tunnel::key(tunnel::REPLY, 7),
                inner: Inner::BackTo("10.50.0.12", port(7300, f)),
            },
            counter: Stat::ReplyReencap,
            fresh: false,
        },
        PathFixture {
            path: "soft-unicast owner redirect",
            hook: Hook::Ingress,
            prime: Prime::None,
            packet: |f, _, _| tcp("203.0.113.1", 80, ACME, 41500, TCP_ACK, tunnelled(f)),
            want: |_| Want::Encapsulated {
                verdict: TC_ACT_REDIRECT,
                peer: B,
                key: tunnel::key(tunnel::SOFT_UNICAST, 7),
                inner: Inner::Hopped,
            },
            counter: Stat::SoftUnicast,
            fresh: false,
        },
        PathFixture {
            path: "forwarded reply (decapsulate)",
            hook: Hook::Ingress,
            prime: Prime::Packet(Hook::Egress, |f| {
                let f = tunnelled(f);
                tcp("10.50.0.11", port(7500, f), "203.0.113.200", 80, TCP_ACK, f)
            }),
            packet: |f, _, _| {
                let sport = port(7500, tunnelled(f));
                let inner = tcp("203.0.113.200", 80, "10.50.0.11", sport, TCP_ACK, f - 28);
                packet::gre_frame(B, A, tunnel::key(tunnel::REPLY, 9), &inner)
            },
            want: |_| Want::Decapsulated,
            counter: Stat::ForwardedReply,
            fresh: false,
        },
        // Most of what an edge server receives: traffic of its own (a client of the edge, a
        // reply from an origin no pool serves), to none of the pools' addresses.
        PathFixture {
            path: "arriving, not ours",
            hook: Hook::Ingress,
            prime: Prime::None,
            packet: |f, _, _| tcp("198.51.100.20", 51000, "198.18.0.10", 443, TCP_ACK, f),
            want: |_| Want::Unchanged,
            counter: Stat::IngressNoFlow,
            fresh: false,
        },
        PathFixture {
            path: "unsolicited refused (owner)",
            hook: Hook::Ingress,
            prime: Prime::None,
            packet: |f, _, _| {
                let inner = tcp("198.51.100.9", 4444, ACME, 40500, TCP_SYN, f - 28);
                packet::gre_frame(B, A, tunnel::key(tunnel::SOFT_UNICAST, 7), &inner)
            },
            want: |_| Want::Dropped,
            counter: Stat::TunnelKind,
            fresh: false,
        },
        // IPv6 (never forwarded): the smallest frame is 74 bytes (40-byte header).
        PathFixture {
            path: "established SNAT, IPv6",
            hook: Hook::Egress,
            prime: Prime::Same,
            packet: |f, _, _| tcp("fd00:50::b", port(7800, f), V6_ORIGIN, 443, TCP_ACK, f),
            want: |_| Want::Snat {
                verdict: TC_ACT_OK,
                addr: ACME_V6,
                ports: ALL_PORTS,
            },
            counter: Stat::SnatEstablished,
            fresh: false,
        },
        PathFixture {
            path: "reverse translation, IPv6",
            hook: Hook::Ingress,
            prime: Prime::Packet(Hook::Egress, |f| {
                tcp("fd00:50::b", port(7900, f), V6_ORIGIN, 443, TCP_ACK, f)
            }),
            packet: |f, bound, _| {
                let b = bound.expect("primed");
                tcp(V6_ORIGIN, 443, &b.src.to_string(), b.sport, TCP_ACK, f)
            },
            want: |f| Want::BackTo("fd00:50::b", port(7900, f)),
            counter: Stat::ReverseNat,
            fresh: false,
        },
    ]
}

/// A path's packet with the state it needs made (see [`PathFixture::prepare`]).
pub struct Prepared {
    pub input: Vec<u8>,
    /// What the priming run of the same packet gave (`Prime::Same`): a later run must give the
    /// very same bytes (the connection keeps the binding or path it got then).
    primed: Option<Vec<u8>>,
}

impl PathFixture {
    /// Makes the state the path needs; returns its packet at `frame` (sequence number `seq`).
    pub fn prepare(
        &self,
        dp: &mut TestDatapath,
        frame: usize,
        seq: u32,
    ) -> anyhow::Result<Prepared> {
        Ok(match self.prime {
            Prime::None => Prepared {
                input: (self.packet)(frame, None, seq),
                primed: None,
            },
            Prime::Same => {
                let input = (self.packet)(frame, None, seq);
                let primed = Some(dp.run(self.hook, 0, &input)?.packet);
                Prepared { input, primed }
            }
            Prime::Packet(hook, build) => {
                let out = dp.run(hook, 0, &build(frame))?;
                Prepared {
                    input: (self.packet)(frame, Some(&packet::parse(&out.packet)), seq),
                    primed: None,
                }
            }
        })
    }

    /// Runs the prepared packet and checks the output and the counter; Err says what differs.
    pub fn check(
        &self,
        dp: &mut TestDatapath,
        net: &TestNet,
        frame: usize,
        p: &Prepared,
    ) -> anyhow::Result<Outcome> {
        let input = &p.input;
        let before = dp.counter(self.counter);
        let out = dp.run(self.hook, 0, input)?;
        let moved = dp.counter(self.counter) - before;
        let name = self.path;
        anyhow::ensure!(
            moved == 1,
            "{name} at {frame} B: counter {} moved by {moved}",
            self.counter.name()
        );
        check_output(&(self.want)(frame), net, input, &out, TC)
            .map_err(|e| anyhow::anyhow!("{name} at {frame} B: {e}"))?;
        if let Some(primed) = &p.primed {
            anyhow::ensure!(
                out.packet == *primed,
                "{name} at {frame} B: not what the same packet became before (another binding?)"
            );
        }
        Ok(out)
    }

    /// Whether `xdp_ingress` finishes this path (`egress agent --xdp`): the receive paths that
    /// send or deliver; refusals and everything else it leaves to TC.
    pub fn in_xdp(&self, frame: usize) -> bool {
        self.hook == Hook::Ingress && !matches!((self.want)(frame), Want::Dropped | Want::Unchanged)
    }

    /// Runs `input` (from [`Self::prepare`]) through `xdp_ingress`: a path it finishes must
    /// give the output TC gives, with the same counter (and `xdp_done`); any other packet
    /// must go on to TC unchanged and uncounted.
    pub fn check_xdp(
        &self,
        dp: &mut TestDatapath,
        net: &TestNet,
        frame: usize,
        p: &Prepared,
    ) -> anyhow::Result<Outcome> {
        let input = &p.input[..];
        let counters = |dp: &TestDatapath| (dp.counter(self.counter), dp.counter(Stat::XdpDone));
        let before = counters(dp);
        let out = dp.run(Hook::Xdp, 0, input)?;
        let after = counters(dp);
        let moved = (after.0 - before.0, after.1 - before.1);
        let name = self.path;
        if !self.in_xdp(frame) {
            anyhow::ensure!(
                out.verdict == XDP_PASS && !out.xdp_done && out.packet == input && moved == (0, 0),
                "{name} at {frame} B in XDP: not left to TC untouched (verdict {}, done {}, counters moved {moved:?})",
                out.verdict,
                out.xdp_done
            );
            return Ok(out);
        }
        anyhow::ensure!(
            moved == (1, 1),
            "{name} at {frame} B in XDP: counters {} and xdp_done moved by {moved:?}",
            self.counter.name()
        );
        anyhow::ensure!(
            out.xdp_done == (out.verdict == XDP_PASS),
            "{name} at {frame} B in XDP: XDP_DONE metadata {} with verdict {}",
            out.xdp_done,
            out.verdict
        );
        check_output(&(self.want)(frame), net, input, &out, XDP)
            .map_err(|e| anyhow::anyhow!("{name} at {frame} B in XDP: {e}"))?;
        Ok(out)
    }
}

fn check_output(
    want: &Want,
    net: &TestNet,
    input: &[u8],
    out: &Outcome,
    codes: Codes,
) -> Result<(), String> {
    let verdict = |tc: u32| {
        let v = codes.of(tc);
        if out.verdict == v {
            Ok(())
        } else {
            Err(format!("verdict {} (want {v})", out.verdict))
        }
    };
    match *want {
        Want::Unchanged => {
            verdict(TC_ACT_OK)?;
            if out.packet != input {
                return Err("packet changed".into());
            }
        }
        Want::Dropped => verdict(TC_ACT_SHOT)?,
        Want::Decapsulated => {
            verdict(TC_ACT_OK)?;
            if out.packet != inner_of(input) {
                return Err("not the inner packet, unchanged, behind the Ethernet header".into());
            }
            packet::verify_checksums(&out.packet)?;
        }
        Want::Snat {
            verdict: v,
            addr,
            ports: (lo, hi),
        } => {
            verdict(v)?;
            // The input may be encapsulated (a peer's packet): compare with what it carried.
            let i = packet::parse(&inner_of(input));
            let o = packet::parse(&out.packet);
            if o.src != ip(addr) || !(lo..=hi).contains(&o.sport) {
                return Err(format!(
                    "source {}:{} (want {addr}:{lo}-{hi})",
                    o.src, o.sport
                ));
            }
            if (o.dst, o.dport) != (i.dst, i.dport) {
                return Err(format!("destination {}:{} changed", o.dst, o.dport));
            }
            packet::verify_checksums(&out.packet)?;
        }
        Want::BackTo(addr, port) => {
            verdict(TC_ACT_OK)?;
            back_to(&out.packet, input, addr, port)?;
        }
        Want::Encapsulated {
            verdict: v,
            peer,
            key,
            inner,
        } => {
            verdict(v)?;
            let p = &out.packet;
            if p.len() < 42 || p[0..6] != PEER_MAC || p[6..12] != net.mac || p[12..14] != [8, 0] {
                return Err("Ethernet header: not to the peer from the uplink".into());
            }
            if p[14..42] != packet::gre_outer(A, peer, key, p.len() - 42)[..] {
                return Err(format!("outer IPv4 + GRE header {:02x?}", &p[14..42]));
            }
            let carried = inner_of(p);
            packet::verify_checksums(&carried).map_err(|e| format!("inner {e}"))?;
            match inner {
                Inner::Unchanged if carried[14..] != input[14..] => {
                    return Err("inner packet changed".into());
                }
                Inner::Unchanged => {}
                Inner::Hopped if carried[14..] != packet::hopped(input)[14..] => {
                    return Err("inner packet changed (but for the TTL)".into());
                }
                Inner::Hopped => {}
                Inner::BackTo(addr, port) => back_to(&carried, input, addr, port)?,
            }
        }
    }
    Ok(())
}

/// `out` is `input` with its destination translated back to `addr`:`port`, source unchanged.
fn back_to(out: &[u8], input: &[u8], addr: &str, port: u16) -> Result<(), String> {
    let (i, o) = (packet::parse(input), packet::parse(out));
    if (o.dst, o.dport) != (ip(addr), port) {
        return Err(format!(
            "destination {}:{} (want {addr}:{port})",
            o.dst, o.dport
        ));
    }
    if (o.src, o.sport) != (i.src, i.sport) {
        return Err(format!("source {}:{} changed", o.src, o.sport));
    }
    packet::verify_checksums(out)
}

/// The packet a GRE frame carries, as a frame of its own (a plain frame: itself).
fn inner_of(frame: &[u8]) -> Vec<u8> {
    if frame.len() > 42 && frame[12..14] == [8, 0] && frame[23] == 47 {
        let mut inner = frame[..14].to_vec();
        inner.extend_from_slice(&frame[42..]);
        inner
    } else {
        frame.to_vec()
    }
}
