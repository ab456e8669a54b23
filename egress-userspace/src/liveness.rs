//! Liveness of this server's next hops, from two signals:
//!
//! - **fabric probes**: every [`PROBE_INTERVAL`] a GRE packet of tunnel kind *probe* goes to
//!   each peer the plan forwards to, through the same path a forwarded connection takes (this
//!   server's programs let it out, the peer's programs reflect it); a peer that misses
//!   [`MISSES`] probes in a row is down;
//! - **the peer's agent lease** in etcd (fleet mode): its status key gone is down. While this
//!   agent has no etcd (file mode, or etcd unreachable) the lease says nothing and the probes
//!   decide alone.
//!
//! Either signal lost means down for new connections from here. A peer that was down is up
//! again only after answering every probe, with its lease present, for the hold-down time.
//!
//! [`Liveness`] is the pure state machine (table-tested); [`Prober`] does the I/O.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

pub const PROBE_INTERVAL: Duration = Duration::from_millis(150);
/// Probes missed in a row that make a peer down (450 ms at [`PROBE_INTERVAL`]).
pub const MISSES: u32 = 3;
/// Default time a recovered peer must stay answering before it takes new connections again.
pub const HOLD_DOWN: Duration = Duration::from_secs(5);
/// A peer that never answered yet gets this long, from when it is first watched, before its
/// missed probes count: agents of a fleet (or a lab) start one after the other.
pub const GRACE: Duration = Duration::from_secs(3);

/// Why a peer is down (bits of `egress_common::fabric::Peer::flags`).
pub mod why {
    pub use egress_common::fabric::{
        PEER_DOWN_FENCED as FENCED, PEER_DOWN_LEASE as LEASE, PEER_DOWN_PROBES as PROBES,
        PEER_HOLD_DOWN as HOLD_DOWN,
    };

    /// The reasons that say a peer is gone (not merely holding down after recovering).
    pub const LOST: u32 = PROBES | LEASE | FENCED;

    /// The reasons in words, for logs and `explain`.
    pub fn words(flags: u32) -> String {
        let mut w = Vec::new();
        if flags & PROBES != 0 {
            w.push("fabric probes unanswered");
        }
        if flags & LEASE != 0 {
            w.push("agent lease gone");
        }
        if flags & FENCED != 0 {
            w.push("fenced: its agent cannot renew its lease");
        }
        if flags & HOLD_DOWN != 0 {
            w.push("holding down after recovering");
        }
        w.join(", ")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PeerState {
    pub name: String,
    /// Probes sent since the last reply (0: the last one answered).
    pub unanswered: u32,
    /// The lease: Some(present), None: unknown (no etcd).
    pub lease: Option<bool>,
    /// Whether its lease was ever present: a peer whose agent never started is caught by its
    /// probes; a lease *gone* is what says an agent died.
    pub lease_seen: bool,
    /// Its last answer said it takes no new connections.
    pub fenced: bool,
    /// Since when its answers say it takes no new connections (its agent cannot renew its
    /// lease); None: its last answer did not.
    pub fenced_since: Option<Instant>,
    /// Its fence counts: this agent renewed its own lease after the first fenced answer (etcd
    /// is there, so the peer is the one cut off from it).
    pub fence_confirmed: bool,
    /// Since when it has answered every probe with its lease present, after being down.
    pub stable_since: Option<Instant>,
    /// Down for new connections (a signal lost, or holding down).
    pub down: bool,
    pub rtt: Option<Duration>,
    pub transitions: u64,
    /// Whether it has answered while up: one that never did (not started yet when this agent
    /// began watching) is up at its first answer, with no hold-down; the hold-down is for
    /// peers that worked, failed, and came back.
    pub proven: bool,
    /// When this agent began watching it.
    pub watched_since: Instant,
}

impl PeerState {
    fn new(name: String) -> Self {
        Self {
            name,
            unanswered: 0,
            lease: None,
            lease_seen: false,
            fenced: false,
            fenced_since: None,
            fence_confirmed: false,
            stable_since: None,
            down: false,
            rtt: None,
            transitions: 0,
            proven: false,
            watched_since: Instant::now(),
        }
    }

    /// Its agent's lease was there and is gone.
    pub fn lease_lost(&self) -> bool {
        self.lease_seen && self.lease == Some(false)
    }

    /// The `why` bits now.
    pub fn flags(&self) -> u32 {
        let mut f = 0;
        if self.unanswered > MISSES {
            f |= why::PROBES;
        }
        if self.lease_lost() {
            f |= why::LEASE;
        }
        if self.fence_confirmed {
            f |= why::FENCED;
        }
        if self.down && f == 0 {
            f |= why::HOLD_DOWN;
        }
        f
    }
}

/// Whether this agent's renewal `r` confirms a fence first answered at `since`: etcd renewed
/// our lease after it, and had been answering us without a gap since a fence delay before it
/// (or, our own run of renewals younger, for a whole fence delay since). So when etcd itself
/// was away (an outage, a leader election: every agent fences), the peers that renew first
/// do not take down those a keep-alive period behind them.
fn confirms(r: &crate::fleet::watch::Renewal, since: Instant) -> bool {
    let delay = r.ttl.mul_f64(crate::fleet::watch::FENCE_AFTER);
    r.at > since.max(r.run_since + delay)
}

/// Every next hop's state, by fabric address.
#[derive(Debug, Clone)]
pub struct Liveness {
    pub peers: BTreeMap<Ipv4Addr, PeerState>,
    pub hold_down: Duration,
    /// When this agent's own lease was last renewed (fleet mode): what confirms a peer's
    /// fence. None: never (file mode, or etcd away since the start): fences never count.
    pub renewed: crate::fleet::watch::Renewed,
}

impl Liveness {
    pub fn new(hold_down: Duration) -> Self {
        Self {
            peers: BTreeMap::new(),
            hold_down,
            renewed: None,
        }
    }

    /// The peers to watch (the plan's next hops). New ones start up (until they miss); gone
    /// ones are forgotten.
    pub fn set_peers(&mut self, peers: &BTreeMap<Ipv4Addr, String>) {
        self.peers.retain(|a, _| peers.contains_key(a));
        for (a, name) in peers {
            self.peers
                .entry(*a)
                .or_insert_with(|| PeerState::new(name.clone()));
        }
    }

    /// Peers a previous agent left down (its `PEERS` flags, adopted with the maps): they stay
    /// down as if their probes had gone unanswered all along, and come up at their first
    /// answer. Without this a restarted agent would send new connections to a dead peer for
    /// its first grace period.
    pub fn inherit_down(&mut self, down: &BTreeSet<Ipv4Addr>, now: Instant) {
        for (_, p) in self.peers.iter_mut().filter(|(a, _)| down.contains(a)) {
            p.down = true;
            p.proven = false;
            p.unanswered = MISSES + 1;
            p.watched_since = now.checked_sub(GRACE).unwrap_or(p.watched_since);
        }
    }

    /// A probe round: one more unanswered probe for each peer.
    pub fn sent(&mut self) {
        for p in self.peers.values_mut() {
            p.unanswered = p.unanswered.saturating_add(1);
        }
    }

    /// A reply from `peer`, fenced or not.
    pub fn reply(&mut self, peer: Ipv4Addr, rtt: Duration, fenced: bool) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.unanswered = 0;
            p.rtt = Some(rtt);
            if !fenced {
                p.fenced_since = None;
                p.fence_confirmed = false;
            }
            p.fenced = fenced;
            if !p.down {
                p.proven = true;
            }
        }
    }

    /// The lease of every peer named (by server name); None: unknown (no etcd now).
    pub fn leases(&mut self, present: Option<&BTreeSet<String>>) {
        for p in self.peers.values_mut() {
            p.lease = present.map(|s| s.contains(&p.name));
            p.lease_seen |= p.lease == Some(true);
        }
    }

    /// Applies the rules at `now`, the end of a probe round; returns the peers whose state
    /// changed.
    pub fn evaluate(&mut self, now: Instant) -> Vec<Ipv4Addr> {
        self.evaluate_with(now, 0)
    }

    /// [`Self::evaluate`] in the middle of a round: the probe sent at its start is not
    /// overdue yet (its answer may still come).
    pub fn evaluate_in_round(&mut self, now: Instant) -> Vec<Ipv4Addr> {
        self.evaluate_with(now, 1)
    }

    fn evaluate_with(&mut self, now: Instant, pending: u32) -> Vec<Ipv4Addr> {
        let mut changed = Vec::new();
        for (a, p) in self.peers.iter_mut() {
            // "Missed" counts probes whose answer is overdue: the one just sent is not. A peer
            // that never answered gets a grace period first.
            let missed = p.unanswered > MISSES + pending
                && (p.proven || now.saturating_duration_since(p.watched_since) >= GRACE);
            if p.fenced {
                let since = *p.fenced_since.get_or_insert(now);
                p.fence_confirmed |= self.renewed.is_some_and(|r| confirms(&r, since));
            }
            let lost = missed || p.lease_lost() || p.fence_confirmed;
            let down = if lost {
                p.stable_since = None;
                true
            } else if p.down && p.proven {
                // Answering again: up after the hold-down.
                let since = *p.stable_since.get_or_insert(now);
                now.duration_since(since) < self.hold_down
            } else if p.down {
                // Answering for the first time (it was not up yet): up now.
                p.proven = true;
                false
            } else {
                false
            };
            if down != p.down {
                p.down = down;
                p.transitions += 1;
                if !down {
                    p.stable_since = None;
                }
                changed.push(*a);
            }
        }
        changed
    }

    /// Whether some peer's fence waits for this agent's own renewal to count.
    pub fn fence_unconfirmed(&self) -> bool {
        self.peers.values().any(|p| p.fenced && !p.fence_confirmed)
    }

    /// The peers down now, with why.
    pub fn down(&self) -> BTreeMap<String, u32> {
        self.peers
            .values()
            .filter(|p| p.down)
            .map(|p| (p.name.clone(), p.flags()))
            .collect()
    }
}

/// The probe's payload after the inner IPv4 header: magic, sequence, send time, and this
/// prober's random token (a reply must carry it: one forged by someone who never saw a probe
/// cannot keep a dead peer alive).
const MAGIC: u32 = 0x4547_5052; // "EGPR"
const PAYLOAD: usize = 24;
const GRE_LEN: usize = 8;
const INNER: usize = 20;
/// The inner header's protocol: 253, reserved for experimentation (RFC 3692).
const INNER_PROTO: u8 = 253;

/// Sends probes and reads their replies on a raw GRE socket bound to this server's fabric
/// address (in the agent's network namespace).
pub struct Prober {
    fd: std::os::fd::OwnedFd,
    fabric: Ipv4Addr,
    seq: u32,
    epoch: Instant,
    token: [u8; 8],
}

impl Prober {
    pub fn open(fabric: Ipv4Addr) -> std::io::Result<Self> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: plain socket call.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::IPPROTO_GRE,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor just returned to us.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let addr = sockaddr(fabric);
        // SAFETY: a valid sockaddr_in of the size passed.
        let rc = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &addr as *const libc::sockaddr_in as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut token = [0u8; 8];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut token)?;
        Ok(Self {
            fd,
            fabric,
            seq: 0,
            epoch: Instant::now(),
            token,
        })
    }

    /// One probe to `peer`: GRE (key: probe request) around an IPv4 packet carrying the send
    /// time. The kernel adds the outer IPv4 header.
    pub fn send(&mut self, peer: Ipv4Addr) -> std::io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let mut b = [0u8; GRE_LEN + INNER + PAYLOAD];
        b[0..2].copy_from_slice(&egress_common::fabric::GRE_FLAG_KEY.to_be_bytes());
        b[2..4].copy_from_slice(&0x0800u16.to_be_bytes());
        let key = egress_common::fabric::tunnel::key(
            egress_common::fabric::tunnel::PROBE,
            egress_common::fabric::tunnel::PROBE_REQUEST,
        );
        b[4..8].copy_from_slice(&key.to_be_bytes());
        let ip = &mut b[GRE_LEN..GRE_LEN + INNER];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((INNER + PAYLOAD) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = INNER_PROTO;
        ip[12..16].copy_from_slice(&self.fabric.octets());
        ip[16..20].copy_from_slice(&peer.octets());
        let sum = checksum(ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let p = &mut b[GRE_LEN + INNER..];
        p[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        p[4..8].copy_from_slice(&self.seq.to_be_bytes());
        let sent = self.epoch.elapsed().as_nanos() as u64;
        p[8..16].copy_from_slice(&sent.to_be_bytes());
        p[16..24].copy_from_slice(&self.token);
        let to = sockaddr(peer);
        // SAFETY: a valid buffer and sockaddr_in of the sizes passed.
        let rc = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                b.as_ptr().cast(),
                b.len(),
                0,
                &to as *const libc::sockaddr_in as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for replies; returns each (peer, round-trip time, fenced) as soon
    /// as some have come.
    pub fn receive(&self, timeout: Duration) -> Vec<(Ipv4Addr, Duration, bool)> {
        let mut got = Vec::new();
        let raw = std::os::fd::AsRawFd::as_raw_fd(&self.fd);
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: raw,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n <= 0 {
                return got;
            }
            let mut buf = [0u8; 512];
            loop {
                // SAFETY: a valid buffer of the size passed.
                let len = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if len <= 0 {
                    break;
                }
                if let Some(r) = self.parse(&buf[..len as usize]) {
                    got.push(r);
                }
            }
            if left.is_zero() || !got.is_empty() {
                return got;
            }
        }
    }

    /// A probe reply (the outer IPv4 header included, as raw sockets deliver it).
    fn parse(&self, b: &[u8]) -> Option<(Ipv4Addr, Duration, bool)> {
        use egress_common::fabric::tunnel;
        let ihl = usize::from(*b.first()? & 0x0f) * 4;
        let from = Ipv4Addr::new(*b.get(12)?, *b.get(13)?, *b.get(14)?, *b.get(15)?);
        let gre = b.get(ihl..ihl + GRE_LEN)?;
        let key = u32::from_be_bytes(gre[4..8].try_into().ok()?);
        let fenced = match (tunnel::kind(key), tunnel::pool(key)) {
            (tunnel::PROBE, tunnel::PROBE_REPLY) => false,
            (tunnel::PROBE, tunnel::PROBE_REPLY_FENCED) => true,
            _ => return None,
        };
        let p = b.get(ihl + GRE_LEN + INNER..ihl + GRE_LEN + INNER + PAYLOAD)?;
        if u32::from_be_bytes(p[0..4].try_into().ok()?) != MAGIC || p[16..24] != self.token {
            return None;
        }
        let sent = u64::from_be_bytes(p[8..16].try_into().ok()?);
        let now = self.epoch.elapsed().as_nanos() as u64;
        Some((from, Duration::from_nanos(now.saturating_sub(sent)), fenced))
    }
}

fn sockaddr(a: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.octets()),
        },
        sin_zero: [0; 8],
    }
}

fn checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Shared between the probing thread, the agent's loop (leases, the plan's peers) and metrics.
pub type Shared = std::sync::Arc<std::sync::Mutex<Liveness>>;

/// Probes every [`PROBE_INTERVAL`] on a thread of its own; sends `()` on `changed` when some
/// peer went down or up. Ends when `changed` is closed. Answers are acted on as they arrive;
/// a fenced one asks `renewals` (fleet mode) for a renewal of this agent's own lease and counts
/// once it is there.
pub fn spawn(
    mut prober: Prober,
    state: Shared,
    changed: tokio::sync::mpsc::UnboundedSender<()>,
    renewals: Option<crate::fleet::watch::Renewals>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("prober".into())
        .spawn(move || {
            while !changed.is_closed() {
                let round = Instant::now();
                let end = round + PROBE_INTERVAL;
                let peers: Vec<Ipv4Addr> = {
                    let mut l = state.lock().unwrap_or_else(|e| e.into_inner());
                    l.sent();
                    l.peers.keys().copied().collect()
                };
                for p in &peers {
                    // A send that fails (no route: the link is down) is a probe missed.
                    let _ = prober.send(*p);
                }
                let mut nudged = false;
                loop {
                    let left = end.saturating_duration_since(Instant::now());
                    // Waiting for our own renewal: look again soon.
                    let wait = if nudged { left.min(CONFIRM_POLL) } else { left };
                    let replies = prober.receive(wait);
                    let mut l = state.lock().unwrap_or_else(|e| e.into_inner());
                    l.renewed = renewals.as_ref().and_then(|r| r.last());
                    for (from, rtt, fenced) in replies {
                        l.reply(from, rtt, fenced);
                    }
                    let now = Instant::now();
                    let moved = if now >= end {
                        l.evaluate(now)
                    } else {
                        l.evaluate_in_round(now)
                    };
                    if !moved.is_empty() && changed.send(()).is_err() {
                        return;
                    }
                    if !nudged
                        && l.fence_unconfirmed()
                        && let Some(r) = &renewals
                    {
                        r.nudge.notify_one();
                        nudged = true;
                    }
                    if Instant::now() >= end {
                        break;
                    }
                }
            }
        })
}

/// How often a probe round looks for this agent's own renewal after asking for one.
const CONFIRM_POLL: Duration = Duration::from_millis(5);

/// Aborts the local TCP socket of `key` (a forwarded connection whose peer died): the
/// application gets ECONNABORTED at once instead of waiting on a connection that can never
/// answer (a downloading client sends nothing that could draw a reset). Uses the kernel's
/// SOCK_DESTROY (netlink sock_diag, as `ss -K` does). Returns whether a socket was destroyed.
pub fn abort_socket(key: &egress_common::flow::FlowKey) -> std::io::Result<bool> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const SOCK_DESTROY: u16 = 21;
    let _ = SOCK_DIAG_BY_FAMILY;
    if key.proto != libc::IPPROTO_TCP as u8 || key.family != 4 {
        return Ok(false);
    }
    // SAFETY: plain socket call.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned to us.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // nlmsghdr (16) + inet_diag_req_v2 (56).
    let mut m = [0u8; 72];
    m[0..4].copy_from_slice(&72u32.to_ne_bytes());
    m[4..6].copy_from_slice(&SOCK_DESTROY.to_ne_bytes());
    m[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    let r = &mut m[16..];
    r[0] = libc::AF_INET as u8; // sdiag_family
    r[1] = libc::IPPROTO_TCP as u8; // sdiag_protocol
    r[4..8].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
    // inet_diag_sockid: sport, dport (network order), src[4], dst[4], if, cookie.
    r[8..10].copy_from_slice(&key.src_port_be.to_ne_bytes());
    r[10..12].copy_from_slice(&key.dst_port_be.to_ne_bytes());
    r[12..16].copy_from_slice(&key.src[..4]);
    r[28..32].copy_from_slice(&key.dst[..4]);
    r[48..56].copy_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    // SAFETY: a valid buffer of the size passed.
    let sent = unsafe { libc::send(fd.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut ack = [0u8; 256];
    // SAFETY: a valid buffer of the size passed.
    let n = unsafe { libc::recv(fd.as_raw_fd(), ack.as_mut_ptr().cast(), ack.len(), 0) };
    if n < 20 {
        return Err(std::io::Error::last_os_error());
    }
    // NLMSG_ERROR with error 0: destroyed; -ENOENT: no such socket (not local, or gone).
    let error = i32::from_ne_bytes([ack[16], ack[17], ack[18], ack[19]]);
    match -error {
        0 => Ok(true),
        libc::ENOENT => Ok(false),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one() -> (Liveness, Ipv4Addr) {
        let a = Ipv4Addr::new(10, 50, 0, 11);
        let mut l = Liveness::new(Duration::from_secs(5));
        l.set_peers(&[(a, "fra-a-1".to_string())].into());
        (l, a)
    }

    /// Each row: what happens in one probe round (reply or not, lease), and whether the peer
    /// is down after it. Rounds are PROBE_INTERVAL apart.
    #[test]
    fn probes_leases_and_hold_down() {
        struct Round {
            replies: bool,
            lease: Option<bool>,
            fenced: bool,
            /// This agent renewed its own lease after the round's answers came.
            renewed: bool,
            down: bool,
        }
        let r = |replies, lease, down| Round {
            replies,
            lease,
            fenced: false,
            renewed: true,
            down,
        };
        // An answer saying "fenced" (the peer's lease still there), and whether this agent
        // renewed its own lease after it.
        let fenced = |renewed, down| Round {
            replies: true,
            lease: Some(true),
            fenced: true,
            renewed,
            down,
        };
        let cases: &[(&str, Vec<Round>)] = &[
            (
                "answering peer stays up",
                (0..10).map(|_| r(true, None, false)).collect(),
            ),
            (
                "three missed probes: down at the fourth round",
                vec![
                    r(true, None, false),
                    r(false, None, false),
                    r(false, None, false),
                    r(false, None, false),
                    r(false, None, true),
                ],
            ),
            (
                "two missed then an answer: never down",
                vec![
                    r(false, None, false),
                    r(false, None, false),
                    r(true, None, false),
                    r(false, None, false),
                    r(false, None, false),
                    r(true, None, false),
                ],
            ),
            (
                "lease gone with probes answered: down at once",
                vec![r(true, Some(true), false), r(true, Some(false), true)],
            ),
            (
                "a fenced answer, confirmed by our own renewal: down at once; unfenced: holding down",
                vec![
                    r(true, Some(true), false),
                    fenced(true, true),
                    fenced(true, true),
                    r(true, Some(true), true),
                    r(true, Some(true), true),
                ],
            ),
            (
                "fenced answers while our own lease is not renewed (etcd away for us too): never down",
                vec![
                    r(true, Some(true), false),
                    fenced(false, false),
                    fenced(false, false),
                    r(true, Some(true), false),
                ],
            ),
            (
                "a fence confirmed rounds later counts then",
                vec![
                    fenced(false, false),
                    fenced(false, false),
                    fenced(true, true),
                ],
            ),
            (
                "fenced, then its lease lapses: stays down",
                vec![
                    r(true, Some(true), false),
                    fenced(true, true),
                    r(true, Some(false), true),
                ],
            ),
            (
                "lease unknown (our etcd away): probes decide",
                vec![r(true, None, false), r(true, None, false)],
            ),
        ];
        let t0 = Instant::now();
        for (name, rounds) in cases {
            let (mut l, a) = one();
            let mut now = t0 + Duration::from_secs(10);
            for (i, round) in rounds.iter().enumerate() {
                l.sent();
                if round.replies {
                    l.reply(a, Duration::from_micros(100), round.fenced);
                }
                l.leases(
                    round
                        .lease
                        .map(|present| {
                            if present {
                                ["fra-a-1".to_string()].into()
                            } else {
                                BTreeSet::new()
                            }
                        })
                        .as_ref(),
                );
                // The answers are acted on; then (maybe) this agent's own renewal comes.
                l.evaluate(now);
                if round.renewed {
                    // A renewal after the answers, etcd answering us for long.
                    l.renewed = Some(crate::fleet::watch::Renewal {
                        at: now + Duration::from_micros(1),
                        ttl: Duration::from_secs(1),
                        run_since: t0,
                    });
                }
                l.evaluate(now + Duration::from_micros(2));
                assert_eq!(l.peers[&a].down, round.down, "{name}: round {i}");
                let confirmed = l.peers[&a].flags() & why::FENCED != 0;
                assert_eq!(
                    confirmed,
                    round.fenced && round.down,
                    "{name}: round {i}: why"
                );
                now += PROBE_INTERVAL;
            }
        }
    }

    /// A fence counts only with etcd answering us across it: rows are (our run of renewals
    /// began, our renewal, the fenced answer came) in ms, and whether that confirms it.
    #[test]
    fn a_fence_is_confirmed_only_by_renewals_without_a_gap_across_it() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let rows = [
            (
                "healthy for long, renewed after the answer",
                0,
                5_010,
                5_000,
                true,
            ),
            (
                "healthy for long, last renewal before the answer",
                0,
                4_990,
                5_000,
                false,
            ),
            (
                "etcd back 100 ms ago (an outage, an election)",
                4_900,
                5_010,
                5_000,
                false,
            ),
            (
                "etcd back, renewing for a whole fence delay since",
                4_900,
                5_700,
                5_000,
                true,
            ),
            (
                "etcd back, not quite a fence delay",
                4_900,
                5_640,
                5_000,
                false,
            ),
        ];
        for (name, run, at, since, want) in rows {
            let r = crate::fleet::watch::Renewal {
                at: ms(at),
                ttl: Duration::from_secs(1),
                run_since: ms(run),
            };
            assert_eq!(confirms(&r, ms(since)), want, "{name}");
        }
    }

    /// Mid-round, the probe just sent is not overdue: three missed and the fourth pending
    /// is not down until the round ends unanswered.
    #[test]
    fn misses_count_at_the_end_of_a_round() {
        let (mut l, a) = one();
        let t0 = Instant::now();
        l.sent();
        l.reply(a, Duration::from_micros(80), false);
        l.evaluate(t0);
        for _ in 0..4 {
            l.sent();
        }
        assert!(
            l.evaluate_in_round(t0).is_empty(),
            "its answer may still come"
        );
        l.reply(a, Duration::from_micros(80), false);
        assert!(l.evaluate(t0).is_empty(), "answered within the round: up");
        for _ in 0..4 {
            l.sent();
        }
        assert_eq!(l.evaluate(t0), vec![a], "the round ended unanswered");
    }

    #[test]
    fn a_recovered_peer_waits_out_the_hold_down_and_a_miss_restarts_it() {
        let (mut l, a) = one();
        let t0 = Instant::now();
        // It worked once.
        l.sent();
        l.reply(a, Duration::from_micros(80), false);
        l.evaluate(t0);
        for _ in 0..5 {
            l.sent();
        }
        assert_eq!(l.evaluate(t0), vec![a]);
        assert_eq!(l.peers[&a].flags(), why::PROBES);
        // Answering again: still down (holding down) until 5 s of answers.
        l.sent();
        l.reply(a, Duration::from_micros(80), false);
        l.evaluate(t0 + Duration::from_secs(1));
        assert!(l.peers[&a].down);
        assert_eq!(l.peers[&a].flags(), why::HOLD_DOWN);
        l.evaluate(t0 + Duration::from_secs(3));
        assert!(l.peers[&a].down);
        // A loss in the middle starts the hold-down over.
        for _ in 0..4 {
            l.sent();
        }
        l.evaluate(t0 + Duration::from_secs(4));
        l.sent();
        l.reply(a, Duration::from_micros(80), false);
        l.evaluate(t0 + Duration::from_secs(5));
        assert!(l.peers[&a].down, "hold-down restarted at 5 s");
        l.evaluate(t0 + Duration::from_millis(9_900));
        assert!(l.peers[&a].down);
        assert_eq!(l.evaluate(t0 + Duration::from_secs(10)), vec![a]);
        assert!(!l.peers[&a].down);
        assert_eq!(l.peers[&a].transitions, 2);
        assert!(l.down().is_empty());
    }

    #[test]
    fn a_peer_that_never_answered_is_up_at_its_first_answer() {
        // Not started yet when this agent began: down after its misses, up at once after.
        let (mut l, a) = one();
        let t0 = Instant::now();
        for _ in 0..5 {
            l.sent();
        }
        assert!(l.evaluate(t0).is_empty(), "within its grace");
        assert_eq!(l.evaluate(t0 + GRACE), vec![a]);
        l.sent();
        l.reply(a, Duration::from_micros(80), false);
        assert_eq!(l.evaluate(t0 + GRACE + PROBE_INTERVAL), vec![a]);
        assert!(!l.peers[&a].down, "no hold-down for a first answer");
    }

    #[test]
    fn a_peer_inherited_down_stays_down_until_it_answers() {
        // The previous agent left it down: no grace, no switch at the first evaluation.
        let (mut l, a) = one();
        let t0 = Instant::now();
        l.inherit_down(&[a].into(), t0);
        assert!(l.peers[&a].down);
        assert_eq!(
            l.down()[&l.peers[&a].name],
            why::PROBES,
            "down for its probes"
        );
        for i in 1..5u32 {
            l.sent();
            assert!(
                l.evaluate(t0 + PROBE_INTERVAL * i).is_empty(),
                "round {i}: still down"
            );
        }
        // An inherited peer not among the watched ones is ignored.
        l.inherit_down(&[Ipv4Addr::new(192, 0, 2, 1)].into(), t0);
        assert_eq!(l.peers.len(), 1);
        // Its first answer brings it up (as a peer never seen answering).
        l.sent();
        l.reply(a, Duration::from_micros(80), false);
        assert_eq!(l.evaluate(t0 + PROBE_INTERVAL * 6), vec![a]);
        assert!(!l.peers[&a].down);
    }

    #[test]
    fn peers_follow_the_plan() {
        let (mut l, a) = one();
        let b = Ipv4Addr::new(10, 50, 2, 31);
        l.set_peers(&[(b, "ams-a-1".to_string())].into());
        assert!(!l.peers.contains_key(&a));
        assert!(!l.peers[&b].down, "a new peer starts up");
    }
}
