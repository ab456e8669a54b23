//! The agent's side of fleet mode: one task that reads the published topology, watches it, and
//! keeps the agent's status key alive under a lease. It reconnects with backoff; the agent's
//! loop only receives [`Event`]s and sends [`super::Status`] updates.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::bail;
use etcd_client::{Client, PutOptions, WatchOptions};
use tokio::sync::{mpsc, watch};

use super::{
    Endpoint, Published, Status,
    alive::{AliveView, Created},
    describe, read_published,
};

/// The lease's time to live asked for by default, in seconds: the agent's keys vanish this long
/// after the agent (or its link to etcd) dies, and its peers take it as down. etcd grants at
/// least its own minimum (1.5 election timeouts, rounded up to a second: 2 s with etcd's
/// defaults); the agent goes by what is granted.
pub const LEASE_TTL: i64 = 1;
/// Default `--restart-grace`, seconds: long enough for a service manager to start the next
/// agent, short enough that a server whose agent stopped for good is not counted on long.
pub const RESTART_GRACE: i64 = 30;
pub const BACKOFF_FIRST: Duration = Duration::from_millis(250);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub enum Event {
    /// A session is up (read, watching, alive) on the member of this URL.
    Connected(String),
    /// What is published (after connecting, then on every change).
    Published(Published),
    /// Nothing is published under the prefix (yet).
    Nothing,
    /// The connection to etcd failed: why. The agent keeps its plan; the task reconnects.
    Lost(String),
    /// etcd refuses this agent's status key (its identity may not write it): why. The topology
    /// is still read and watched; no status is written in this session.
    StatusRefused(String),
    /// Of the peers asked about (the agent's next hops), those whose agent's alive key (its
    /// lease) exists now.
    Leases(BTreeSet<String>),
    /// The peers' leases cannot be read (this identity may not: roles from before `alive/`):
    /// the agent judges peers by probes alone.
    LeasesUnknown,
    /// True: this agent's lease has not been renewed for [`FENCE_AFTER`] of its time to live
    /// (etcd is about to drop it and its peers to take this server as gone): it should take
    /// itself out of new connections now. False: renewed again (or a new lease holds the
    /// alive key).
    Fenced(bool),
}

/// Which etcd member an agent's session is on, from its events ([`Event::Connected`] once a
/// session is up, [`Event::Lost`]); a change of member is logged once.
#[derive(Debug, Clone, Default)]
pub struct MemberView {
    /// The member of the session that is up.
    current: Option<String>,
    /// The member last logged.
    logged: Option<String>,
}

impl MemberView {
    /// [`Event::Connected`]: whether the member differs from the one last logged (then it is
    /// logged).
    pub fn connected(&mut self, url: String) -> bool {
        let new = self.logged.as_ref() != Some(&url);
        if new {
            log::info!("etcd: on member {url}");
            self.logged = Some(url.clone());
        }
        self.current = Some(url);
        new
    }

    /// [`Event::Lost`].
    pub fn lost(&mut self) {
        self.current = None;
    }

    /// The member of the session that is up.
    pub fn current(&self) -> Option<&str> {
        self.current.as_deref()
    }
}

/// The renew deadline, as a fraction of the lease's time to live (like a Kubernetes leader's
/// renew deadline inside its lease duration): past it with no renewal, the agent fences itself
/// rather than letting its peers find out at the lease's expiry (and etcd's expiry check).
pub const FENCE_AFTER: f64 = 0.75;

/// When the lease holding the alive key was last renewed (the send time of the request etcd
/// answered), and its time to live. None: no lease yet (nothing to fence: peers have not seen
/// this agent).
pub type Renewed = Option<Renewal>;

/// One renewal of this agent's lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Renewal {
    /// When the request etcd answered was sent (etcd renewed the lease after it).
    pub at: Instant,
    /// The lease's time to live.
    pub ttl: Duration,
    /// Since when renewals have come without a gap (none more than a keep-alive period and a
    /// half after the one before): how long etcd has been answering this agent.
    pub run_since: Instant,
}

impl Renewal {
    /// The renewal at `at` following `previous`.
    pub fn after(previous: Renewed, at: Instant, ttl: Duration) -> Self {
        let gap = (ttl / 3).mul_f64(1.5);
        let run_since = previous
            .filter(|p| at.saturating_duration_since(p.at) <= gap)
            .map_or(at, |p| p.run_since);
        Self { at, ttl, run_since }
    }
}

/// This agent's renewals, for its prober: a peer's fenced answer counts only once this agent
/// has itself renewed its lease after receiving it (proof that etcd is there, and that the
/// peer is the one cut off: when etcd itself is away every agent fences and none of them is
/// taken down for it). `nudge` asks for a renewal at once instead of at the next keep-alive.
#[derive(Clone, Debug)]
pub struct Renewals {
    pub renewed: watch::Receiver<Renewed>,
    pub nudge: std::sync::Arc<tokio::sync::Notify>,
}

impl Renewals {
    /// The session's end and the prober's end.
    pub fn new() -> (watch::Sender<Renewed>, Self) {
        let (tx, renewed) = watch::channel(None);
        let nudge = std::sync::Arc::new(tokio::sync::Notify::new());
        (tx, Self { renewed, nudge })
    }

    /// This agent's last renewal.
    pub fn last(&self) -> Renewed {
        *self.renewed.borrow()
    }
}

/// A session that lasted this long was healthy: the next failure starts the backoff over.
const HEALTHY: Duration = Duration::from_secs(10);

/// Who this agent is in etcd.
pub struct Identity {
    pub server: String,
    /// The lease's time to live to ask for (seconds).
    pub lease_ttl: i64,
    /// Seconds the alive key outlives this agent when it exits and leaves its programs
    /// running (0: it goes with the agent's lease).
    pub restart_grace: i64,
    /// How often, while on a member it ranks below others, the agent checks whether a better
    /// one answers again (None: never).
    pub failback: Option<Duration>,
}

/// Runs until `events` is closed.
pub async fn run(
    ep: Endpoint,
    me: Identity,
    events: mpsc::UnboundedSender<Event>,
    mut status: watch::Receiver<Status>,
    mut interest: watch::Receiver<BTreeSet<String>>,
    renewed: watch::Sender<Renewed>,
    nudge: std::sync::Arc<tokio::sync::Notify>,
) {
    let fenced = renewed.subscribe();
    let link = Link {
        events: &events,
        renewed: std::sync::Arc::new(renewed),
        nudge,
    };
    tokio::select! {
        () = sessions(&ep, &me, &link, &mut status, &mut interest) => {}
        () = fence(fenced, &events) => {}
    }
}

/// What a session reports to and hears from the agent besides status and interest.
struct Link<'a> {
    events: &'a mpsc::UnboundedSender<Event>,
    renewed: std::sync::Arc<watch::Sender<Renewed>>,
    nudge: std::sync::Arc<tokio::sync::Notify>,
}

/// Says [`Event::Fenced`] when the renew deadline passes with no renewal (across sessions: a
/// reconnect that puts the alive key on a new lease in time never fences), and when renewed.
/// Ends when `events` is closed.
async fn fence(mut renewed: watch::Receiver<Renewed>, events: &mpsc::UnboundedSender<Event>) {
    let mut fenced = false;
    loop {
        let deadline = renewed
            .borrow_and_update()
            .map(|r| r.at + r.ttl.mul_f64(FENCE_AFTER));
        let late = deadline.is_some_and(|d| Instant::now() >= d);
        if late != fenced {
            fenced = late;
            if events.send(Event::Fenced(fenced)).is_err() {
                return;
            }
        }
        match deadline {
            Some(d) if !late => tokio::select! {
                _ = tokio::time::sleep_until(d.into()) => {}
                changed = renewed.changed() => if changed.is_err() { return },
            },
            _ => {
                if renewed.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn sessions(
    ep: &Endpoint,
    me: &Identity,
    link: &Link<'_>,
    status: &mut watch::Receiver<Status>,
    interest: &mut watch::Receiver<BTreeSet<String>>,
) {
    let events = link.events;
    let mut backoff = BACKOFF_FIRST;
    let mut carried = Carried {
        kept: None,
        ready: None,
        failback: me.failback,
    };
    loop {
        let started = Instant::now();
        let failed_back = carried.ready.is_some();
        let why = match session(ep, me, link, status, interest, &mut carried).await {
            Ok(Ended::AgentGone) => return,
            Ok(Ended::Failback(ready)) => {
                carried.ready = Some(ready);
                backoff = Duration::ZERO;
                continue;
            }
            Err(e) => crate::cli::error_text(&e),
        };
        if failed_back {
            carried.failback = if started.elapsed() >= HEALTHY {
                me.failback
            } else {
                carried.failback.map(|d| (d * 2).min(FAILBACK_MAX))
            };
        }
        // Only a session that ran well for a while resets the backoff: one that fails right
        // after connecting (a refusal, a member that answers reads and nothing else) must not
        // turn into a tight reconnect loop.
        // After a healthy one, the first retry (on the next member) is at once: the lease
        // is kept only if renewed within its time to live.
        if started.elapsed() >= HEALTHY {
            backoff = Duration::ZERO;
        }
        ep.session_ended();
        if events.send(Event::Lost(why)).is_err() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).clamp(BACKOFF_FIRST, BACKOFF_MAX);
    }
}

/// How often an agent on a member it ranks below others checks whether a better one answers
/// again (`agent --etcd-failback`).
pub const FAILBACK: Duration = Duration::from_secs(60);

/// The longest interval failback checks back off to.
const FAILBACK_MAX: Duration = Duration::from_secs(600);

/// How a session ended without an error.
enum Ended {
    /// The agent is gone (its ends of the channels closed).
    AgentGone,
    /// A member this agent ranks higher answers again (a connection to it made): the next
    /// session runs on it, keeping the lease.
    Failback(Ready),
}

/// A member (its place in the URLs) and a connection made to it.
type Ready = (usize, Box<Client>);

/// What one session hands the next.
struct Carried {
    /// The lease of the last session: the next one keeps it if it is still alive, so a
    /// reconnect (a member restarted) within its time to live is not seen by the peers.
    kept: Option<(i64, i64)>,
    /// A connection made to a better member (failback) for the next session.
    ready: Option<Ready>,
    /// How often to check for a better member: doubled (to [`FAILBACK_MAX`]) while failing
    /// back ends in a quick failure (a member that answers the check but fails sessions),
    /// reset once a session after a failback holds.
    failback: Option<Duration>,
}

/// An agent's checks of the members it ranks above the one in use: every `every` (plus
/// [`jitter`]), one check at a time, each on a task of its own.
struct Failback {
    every: Option<Duration>,
    at: Option<Instant>,
    check: Option<AbortOnDrop<Option<Ready>>>,
}

impl Failback {
    fn new(every: Option<Duration>) -> Failback {
        Failback {
            every,
            at: every.map(|d| Instant::now() + d + jitter(d)),
            check: None,
        }
    }

    /// The first of `better` (best first) that answered a check, with the connection made
    /// to it; pending until one does (forever without checks).
    async fn next(&mut self, ep: &Endpoint, better: &[usize]) -> Option<Ready> {
        loop {
            if let Some(check) = self.check.as_mut() {
                let found = (&mut check.0).await.ok().flatten();
                self.check = None;
                self.at = self.every.map(|d| Instant::now() + d + jitter(d));
                if found.is_some() {
                    return found;
                }
            }
            let Some(at) = self.at else {
                return std::future::pending().await;
            };
            tokio::time::sleep_until(at.into()).await;
            let (ep, better) = (ep.clone(), better.to_vec());
            self.check = Some(AbortOnDrop(tokio::spawn(async move {
                for i in better {
                    if let Some(client) = ep.answers(i).await {
                        return Some((i, Box::new(client)));
                    }
                    log::debug!("etcd: failback check: {} does not answer", ep.url(i));
                }
                None
            })));
        }
    }
}

/// Up to half of `d` more, different from call to call: a fleet's agents do not check their
/// members in step.
fn jitter(d: Duration) -> Duration {
    d.mul_f64((crate::random_u64() % 1000) as f64 / 2000.0)
}

/// A lease kept alive on this session's connection.
struct Lease {
    id: i64,
    /// Its time to live, seconds.
    ttl: i64,
    keeper: etcd_client::LeaseKeeper,
    acks: etcd_client::LeaseKeepAliveStream,
    /// etcd granted or renewed it after this instant.
    renewed_at: Instant,
}

/// The previous session's lease if etcd still has it (renewed now), else a new one. (The
/// client's keep-alive stream takes the answer to its opening request itself: it fails when
/// the lease is gone.)
async fn keep_or_grant(
    client: &mut etcd_client::Client,
    urls: &str,
    me: &Identity,
    previous: Option<(i64, i64)>,
) -> anyhow::Result<Lease> {
    if let Some((id, ttl)) = previous {
        let renewed_at = Instant::now();
        match client.lease_keep_alive(id).await {
            Ok((keeper, acks)) => {
                log::debug!("lease {id:x} kept across the reconnect");
                return Ok(Lease {
                    id,
                    ttl,
                    keeper,
                    acks,
                    renewed_at,
                });
            }
            Err(etcd_client::Error::LeaseKeepAliveError(_)) => {} // gone: a new one
            Err(e) => return Err(describe(e, urls, None)),
        }
    }
    let renewed_at = Instant::now();
    let granted = client
        .lease_grant(me.lease_ttl, None)
        .await
        .map_err(|e| describe(e, urls, None))?;
    let (id, ttl) = (granted.id(), granted.ttl().max(1));
    if ttl != me.lease_ttl {
        log::debug!(
            "etcd granted a lease of {ttl} s (asked for {} s)",
            me.lease_ttl
        );
    }
    let (keeper, acks) = client
        .lease_keep_alive(id)
        .await
        .map_err(|e| describe(e, urls, None))?;
    Ok(Lease {
        id,
        ttl,
        keeper,
        acks,
        renewed_at,
    })
}

fn denied(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated))
}

/// One connection: read, then watch and keep the lease until something fails.
async fn session(
    ep: &Endpoint,
    me: &Identity,
    link: &Link<'_>,
    status: &mut watch::Receiver<Status>,
    interest: &mut watch::Receiver<BTreeSet<String>>,
    carried: &mut Carried,
) -> anyhow::Result<Ended> {
    let events = link.events;
    let urls = ep.urls.join(",");
    let mut client = match carried.ready.take() {
        Some((i, client)) => {
            ep.connected_to(i);
            *client
        }
        None => ep.connect().await?,
    };
    let (published, at) = read_published(&mut client, ep).await?;
    if events
        .send(published.map_or(Event::Nothing, Event::Published))
        .is_err()
    {
        return Ok(Ended::AgentGone);
    }
    let mut stream = client
        .watch(
            ep.keys.topology(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(at + 1),
            ),
        )
        .await
        .map_err(|e| describe(e, &urls, Some(&ep.keys.topology())))?;
    let lease = keep_or_grant(&mut client, &urls, me, carried.kept).await?;
    carried.kept = Some((lease.id, lease.ttl));
    // The peers' view of this agent: written once per session, on the lease (and again if it
    // is deleted under it). Peers watch this key and not the status key, which changes with
    // every plan (a publish would otherwise fan out to every watcher of every agent).
    let alive_put = put_alive(&mut client, ep, me, lease.id).await?;
    let id = lease.id;
    // The keep-alives on a task of their own: a slow request of the session (a status put
    // during a publish, a read) never delays them, nor the answers that feed the fence.
    let keep = KeepAlive::new(lease, link.renewed.clone(), link.nudge.clone());
    let mut keeping = AbortOnDrop(tokio::spawn(keep.run(urls.clone())));
    let mut s = Session {
        ep,
        me,
        events,
        urls,
        client,
        lease: id,
        refused: false,
        names: interest.borrow_and_update().clone(),
        alive: None,
        view_refused: false,
        own_put: alive_put.as_ref().ok().copied(),
    };
    let current = status.borrow_and_update().clone();
    s.put_status(current).await?;
    // One report: an identity refused its status key is refused its alive key as well.
    if let Err(why) = alive_put
        && !s.refused
        && events.send(Event::StatusRefused(why)).is_err()
    {
        return Ok(Ended::AgentGone);
    }
    // The leases of the peers the agent asks about, watched key by key (not the whole
    // status prefix: an agent hears about its next hops, not about the fleet).
    if !s.view_leases().await? {
        return Ok(Ended::AgentGone);
    }
    // Up: read, watching, alive.
    let url = ep.member_url().unwrap_or_default().to_string();
    if events.send(Event::Connected(url.clone())).is_err() {
        return Ok(Ended::AgentGone);
    }
    // On a member this agent ranks below others: now and then, whether a better one answers
    // again (it comes back after a restart); then this session ends for it (the lease kept).
    // The checks run on a task of their own: a better member that does not answer costs its
    // timeouts there, never this loop's status puts and watch events.
    let better = ep.better_members();
    let mut failback = Failback::new(carried.failback.filter(|_| !better.is_empty()));
    loop {
        // In this order when several are ready: a peer's lease news first (cheap, and what
        // failover waits on); a new plan's status before the leases of its peers are read and
        // watched (the agent hands those over after it).
        let going = tokio::select! {
            biased;
            ended = &mut keeping.0 => match ended {
                Ok(Err(e)) => return Err(e),
                Ok(Ok(())) => bail!("the keep-alives ended"),
                Err(e) => bail!("the keep-alive task: {e}"),
            },
            msg = async {
                match s.alive.as_mut() {
                    Some(v) => v.stream.message().await,
                    None => std::future::pending().await,
                }
            } => {
                let msg = msg.map_err(|e| describe(e, &s.urls, Some(&ep.keys.alives())))?;
                s.alive_keys(msg).await?
            }
            changed = status.changed() => {
                if changed.is_err() {
                    s.exit().await;
                    return Ok(Ended::AgentGone);
                }
                let current = status.borrow_and_update().clone();
                s.put_status(current).await?;
                true
            }
            msg = stream.message() => {
                let msg = msg.map_err(|e| describe(e, &s.urls, Some(&ep.keys.topology())))?;
                s.topology(msg).await?
            }
            found = failback.next(ep, &better) => {
                if let Some(ready) = found {
                    log::info!(
                        "etcd: member {} answers again, ranked above {url} for this server: moving back",
                        ep.url(ready.0)
                    );
                    // A fresh renewal first: the next session has the lease's whole time to
                    // live to take it over (this session's keep-alives end with it).
                    renew_now(link).await;
                    return Ok(Ended::Failback(ready));
                }
                true
            }
            changed = interest.changed() => {
                if changed.is_err() {
                    return Ok(Ended::AgentGone);
                }
                let names = interest.borrow_and_update().clone();
                // Refused for these very peers: not asked again until they change (the agent
                // hands the peers over after every plan, changed or not).
                if s.view_refused && s.alive.is_none() && names == s.names {
                    true
                } else {
                    s.names = names;
                    s.view_leases().await?
                }
            }
        };
        if !going {
            return Ok(Ended::AgentGone); // the agent is gone
        }
    }
}

/// Asks the keep-alive task for a renewal now and waits (a second at most) for etcd's answer.
async fn renew_now(link: &Link<'_>) {
    let mut renewed = link.renewed.subscribe();
    renewed.borrow_and_update();
    link.nudge.notify_one();
    let _ = tokio::time::timeout(Duration::from_secs(1), renewed.changed()).await;
}

/// Aborts the task when the session ends.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The lease's keep-alives: sent every third of its time to live (one lost on the way does
/// not end it), and at once when the prober asks (`nudge`: a peer says it is fenced); each
/// answer tells the fence and the prober when etcd last renewed it.
struct KeepAlive {
    keeper: etcd_client::LeaseKeeper,
    acks: etcd_client::LeaseKeepAliveStream,
    period: Duration,
    ttl: Duration,
    answered: Instant,
    /// When each keep-alive not answered yet was sent (bounded: it ends after a time to live
    /// without answers).
    unanswered: std::collections::VecDeque<Instant>,
    renewed: std::sync::Arc<watch::Sender<Renewed>>,
    nudge: std::sync::Arc<tokio::sync::Notify>,
}

impl KeepAlive {
    fn new(
        lease: Lease,
        renewed: std::sync::Arc<watch::Sender<Renewed>>,
        nudge: std::sync::Arc<tokio::sync::Notify>,
    ) -> Self {
        let ttl = Duration::from_secs(lease.ttl as u64);
        let previous = *renewed.borrow();
        renewed.send_replace(Some(Renewal::after(previous, lease.renewed_at, ttl)));
        Self {
            keeper: lease.keeper,
            acks: lease.acks,
            period: ttl / 3,
            ttl,
            answered: Instant::now(),
            unanswered: std::collections::VecDeque::new(),
            renewed,
            nudge,
        }
    }

    /// Keeps the lease until etcd stops answering (or says it is gone).
    async fn run(mut self, urls: String) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(self.period);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if self.answered.elapsed() > self.ttl + self.period {
                        bail!("no answer from etcd for {:?}", self.answered.elapsed());
                    }
                    self.send(&urls).await?;
                }
                () = self.nudge.notified() => self.send(&urls).await?,
                ack = self.acks.message() => {
                    let ack = ack.map_err(|e| describe(e, &urls, None))?;
                    self.answered(ack)?;
                }
            }
        }
    }

    async fn send(&mut self, urls: &str) -> anyhow::Result<()> {
        self.unanswered.push_back(Instant::now());
        self.keeper
            .keep_alive()
            .await
            .map_err(|e| describe(e, urls, None))
    }

    fn answered(&mut self, ack: Option<etcd_client::LeaseKeepAliveResponse>) -> anyhow::Result<()> {
        match ack {
            Some(a) if a.ttl() > 0 => {
                self.answered = Instant::now();
                // Answers come in order, one per request: etcd renewed the lease after the
                // oldest request still unanswered was sent.
                if let Some(sent) = self.unanswered.pop_front() {
                    let previous = *self.renewed.borrow();
                    self.renewed
                        .send_replace(Some(Renewal::after(previous, sent, self.ttl)));
                }
                Ok(())
            }
            Some(_) => bail!("the status key's lease expired"),
            None => bail!("etcd closed the lease stream"),
        }
    }
}

/// One connection's state besides its streams. Handlers return false when the agent is gone.
struct Session<'a> {
    ep: &'a Endpoint,
    me: &'a Identity,
    events: &'a mpsc::UnboundedSender<Event>,
    urls: String,
    client: etcd_client::Client,
    lease: i64,
    /// etcd refused the status key: reported once, no status writes for the session.
    refused: bool,
    /// The peers asked about, and the watches of their alive keys (None: not open, or etcd
    /// refused them).
    names: BTreeSet<String>,
    alive: Option<AliveView>,
    /// etcd refused the lease watches for `names`.
    view_refused: bool,
    /// The revision this session wrote its alive key at: the first view watches the key from
    /// the next one on (a delete right after the put is not missed). Later views watch from
    /// their opening (an old revision may have been compacted away by then).
    own_put: Option<i64>,
}

impl Session<'_> {
    /// The agent is exiting: its status key goes with its lease. Its programs keep running
    /// (unless it detaches them), so with a restart grace the alive key is first moved onto a
    /// lease of that time to live: peers go on forwarding through this server while its next
    /// agent starts, which puts the key on its own lease; if none does, the key lapses.
    async fn exit(&mut self) {
        if self.me.restart_grace > 0 {
            match self.client.lease_grant(self.me.restart_grace, None).await {
                Ok(grace) => {
                    match put_alive(&mut self.client, self.ep, self.me, grace.id()).await {
                        Ok(Ok(_)) => log::info!(
                            "exiting: the alive key is kept {} s for the next agent (--restart-grace)",
                            grace.ttl()
                        ),
                        Ok(Err(why)) => log::warn!("exiting: alive key not kept: {why}"),
                        Err(e) => log::warn!("exiting: alive key not kept: {e:#}"),
                    }
                }
                Err(e) => log::warn!("exiting: alive key not kept (no lease): {e}"),
            }
        }
        let _ = self.client.lease_revoke(self.lease).await;
    }

    /// Writes the status on the lease.
    async fn put_status(&mut self, s: Status) -> anyhow::Result<()> {
        if self.refused {
            return Ok(());
        }
        let key = self.ep.keys.status(&self.me.server);
        let value = serde_json::to_vec(&s)?;
        let options = Some(PutOptions::new().with_lease(self.lease));
        match self.client.put(key.as_str(), value, options).await {
            Ok(_) => Ok(()),
            Err(e) if denied(&e) => {
                self.refused = true;
                let why = crate::cli::error_text(&describe(e, &self.urls, Some(&key)));
                let _ = self.events.send(Event::StatusRefused(why));
                Ok(())
            }
            Err(e) => Err(describe(e, &self.urls, Some(&key))),
        }
    }

    /// Reads and watches the leases of the peers asked about now (opening the watch stream
    /// first if needed) and tells the agent which exist; a refusal by etcd is reported and the
    /// peers' leases are unknown until the next change of peers. False: the agent is gone.
    async fn view_leases(&mut self) -> anyhow::Result<bool> {
        let result = match self.alive.as_mut() {
            Some(v) => v.update(&mut self.client, self.ep, &self.names).await,
            None => match AliveView::open(
                &mut self.client,
                self.ep,
                &self.me.server,
                self.own_put.take(),
            )
            .await
            {
                Ok(mut v) => {
                    let r = v.update(&mut self.client, self.ep, &self.names).await;
                    self.alive = Some(v);
                    r
                }
                Err(e) => Err(e),
            },
        };
        let event = match result {
            // Sent after every change of peers, even if the same peers are present: the new
            // ones learn their lease is known.
            Ok(()) => {
                self.view_refused = false;
                Event::Leases(self.present())
            }
            Err(e) if denied(&e) => {
                let why = describe(e, &self.urls, Some(&self.ep.keys.alives()));
                self.alive = None;
                self.view_refused = true;
                if self
                    .events
                    .send(Event::StatusRefused(crate::cli::error_text(&why)))
                    .is_err()
                {
                    return Ok(false);
                }
                Event::LeasesUnknown
            }
            Err(e) => return Err(describe(e, &self.urls, Some(&self.ep.keys.alives()))),
        };
        Ok(self.events.send(event).is_ok())
    }

    fn present(&self) -> BTreeSet<String> {
        self.alive
            .as_ref()
            .map(|v| v.book.present(&self.names))
            .unwrap_or_default()
    }

    /// A response of the topology's watch.
    async fn topology(&mut self, msg: Option<etcd_client::WatchResponse>) -> anyhow::Result<bool> {
        let Some(resp) = msg else {
            bail!("etcd closed the watch");
        };
        if resp.canceled() {
            bail!("etcd cancelled the watch: {}", resp.cancel_reason());
        }
        let event = match from_events(self.ep, resp.events()) {
            Seen::Nothing => return Ok(true),
            Seen::Event(e) => e,
            // Only one of the two keys: read both, from one revision.
            Seen::Partial => {
                let (published, _) = read_published(&mut self.client, self.ep).await?;
                published.map_or(Event::Nothing, Event::Published)
            }
        };
        Ok(self.events.send(event).is_ok())
    }

    /// A response of the alive keys' watch: a watch confirmed or cancelled, or peers come and
    /// go; our own key deleted under a live lease (by hand, a cleanup) is put back, or peers
    /// would take us as gone.
    async fn alive_keys(
        &mut self,
        msg: Option<etcd_client::WatchResponse>,
    ) -> anyhow::Result<bool> {
        let Some(resp) = msg else {
            bail!("etcd closed the lease watch");
        };
        let before = self.present();
        let Some(view) = self.alive.as_mut() else {
            return Ok(true);
        };
        if resp.canceled() && !resp.created() && view.book.cancelled(resp.watch_id()) {
            return Ok(true); // one this session cancelled
        }
        if resp.canceled() {
            // A watch etcd's roles refuse is cancelled (and confirmed), not refused outright.
            if !resp.cancel_reason().contains("permission denied") {
                bail!("etcd cancelled the lease watch: {}", resp.cancel_reason());
            }
            self.alive = None;
            self.view_refused = true;
            let why = format!(
                "permission denied by etcd on key {}: {} (this identity's role does not cover it: roles from before alive keys? run `fleet init` again)",
                self.ep.keys.alives(),
                resp.cancel_reason()
            );
            return Ok(self.events.send(Event::StatusRefused(why)).is_ok()
                && self.events.send(Event::LeasesUnknown).is_ok());
        }
        if resp.created() {
            match view.book.created(resp.watch_id(), &self.names) {
                Created::Kept => {}
                Created::Cancel(id) => view
                    .stream
                    .cancel(id)
                    .await
                    .map_err(|e| describe(e, &self.urls, Some(&self.ep.keys.alives())))?,
                Created::Unexpected => bail!(
                    "etcd confirmed lease watch {} that was not asked for",
                    resp.watch_id()
                ),
            }
        }
        let prefix = self.ep.keys.alives();
        let mut own_deleted = false;
        for e in resp.events() {
            let Some(kv) = e.kv() else { continue };
            let Some(name) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else {
                continue;
            };
            let deleted = e.event_type() == etcd_client::EventType::Delete;
            if name == self.me.server {
                own_deleted |= deleted;
            } else {
                view.book.heard(name, kv.mod_revision(), !deleted);
            }
        }
        if own_deleted {
            // (A refusal here was reported when the session first wrote it.)
            let _ = put_alive(&mut self.client, self.ep, self.me, self.lease).await?;
        }
        let now = self.present();
        Ok(now == before || self.events.send(Event::Leases(now)).is_ok())
    }
}

/// What one watch response says.
enum Seen {
    /// No change of the published keys.
    Nothing,
    /// A whole publication (both keys in one transaction), or the config deleted.
    Event(Event),
    /// One key alone changed (written by something else than `fleet publish`).
    Partial,
}

/// A publish writes both keys in one transaction: its watch response carries both, and the
/// agent needs no read of its own (a thousand agents re-reading would double etcd's work).
fn from_events(ep: &Endpoint, events: &[etcd_client::Event]) -> Seen {
    let (config, meta) = (ep.keys.config(), ep.keys.meta());
    let mut text = None;
    let mut meta_value = None;
    let mut deleted = false;
    for e in events {
        let Some(kv) = e.kv() else { continue };
        let key = kv.key_str().unwrap_or_default();
        let put = e.event_type() == etcd_client::EventType::Put;
        if key == config {
            if put {
                text = Some((
                    String::from_utf8_lossy(kv.value()).into_owned(),
                    kv.mod_revision(),
                ));
            } else {
                deleted = true;
            }
        } else if key == meta && put {
            meta_value = Some((kv.value().to_vec(), kv.mod_revision()));
        }
    }
    match (text, meta_value) {
        (Some((text, revision)), Some((m, meta_revision))) if meta_revision == revision => {
            Seen::Event(Event::Published(Published {
                text,
                meta: serde_json::from_slice(&m).ok(),
                revision,
            }))
        }
        (None, None) if deleted => Seen::Event(Event::Nothing),
        (None, None) => Seen::Nothing,
        _ => Seen::Partial,
    }
}

/// Writes this agent's alive key on `lease`: the revision it was written at, or why etcd refuses
/// it (peers then judge this server by probes alone; the session goes on).
async fn put_alive(
    client: &mut etcd_client::Client,
    ep: &Endpoint,
    me: &Identity,
    lease: i64,
) -> anyhow::Result<Result<i64, String>> {
    let urls = ep.urls.join(",");
    let alive = ep.keys.alive(&me.server);
    let since = serde_json::json!({ "pid": std::process::id(), "since": super::unix_now() });
    match client
        .put(
            alive.as_str(),
            since.to_string(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
    {
        Ok(r) => Ok(Ok(r.header().map_or(0, |h| h.revision()))),
        Err(e) if denied(&e) => Ok(Err(crate::cli::error_text(&describe(
            e,
            &urls,
            Some(&alive),
        )))),
        Err(e) => Err(describe(e, &urls, Some(&alive))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The member shown is the one of the session that is up; a change is logged once (a
    /// reconnect to the same member is not news).
    #[test]
    fn the_member_shown_is_the_session_up() {
        let mut m = MemberView::default();
        assert_eq!(m.current(), None);
        assert!(m.connected("https://a:2379".into()), "first: logged");
        assert_eq!(m.current(), Some("https://a:2379"));
        m.lost();
        assert_eq!(m.current(), None, "lost: on none");
        assert!(
            !m.connected("https://a:2379".into()),
            "same member again: not logged"
        );
        assert!(m.connected("https://b:2379".into()), "another: logged");
        assert_eq!(m.current(), Some("https://b:2379"));
    }

    /// The fence follows the renewals: nothing before a lease, fenced once the renew deadline
    /// passes with no renewal, lifted by the next one. (Checks order, not speed: only
    /// "not before" is asserted with a time.)
    #[test]
    fn the_fence_follows_the_renewals() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let (tx, renewals) = Renewals::new();
            let (events_tx, mut events) = mpsc::unbounded_channel();
            let rx = renewals.renewed.clone();
            let task = tokio::spawn(async move { fence(rx, &events_tx).await });
            let fenced =
                async |events: &mut mpsc::UnboundedReceiver<Event>| match tokio::time::timeout(
                    Duration::from_secs(10),
                    events.recv(),
                )
                .await
                {
                    Ok(Some(Event::Fenced(f))) => f,
                    other => panic!("expected a fence event, got {other:?}"),
                };
            let quiet = async |events: &mut mpsc::UnboundedReceiver<Event>, ms| {
                let got = tokio::time::timeout(Duration::from_millis(ms), events.recv()).await;
                assert!(got.is_err(), "nothing yet, got {got:?}");
            };
            // No lease yet: nothing to fence.
            quiet(&mut events, 300).await;
            let ttl = Duration::from_millis(400);
            let renewed_at = Instant::now();
            tx.send_replace(Some(Renewal::after(None, renewed_at, ttl)));
            // Not before 3/4 of the time to live.
            quiet(&mut events, 200).await;
            assert!(fenced(&mut events).await);
            assert!(renewed_at.elapsed() >= ttl.mul_f64(FENCE_AFTER));
            assert_eq!(renewals.last().map(|r| r.at), Some(renewed_at));
            // Renewed: lifted at once, and fenced again only after another silence.
            tx.send_replace(Some(Renewal::after(None, Instant::now(), ttl)));
            assert!(!fenced(&mut events).await);
            assert!(fenced(&mut events).await);
            drop(events);
            tx.send_replace(Some(Renewal::after(None, Instant::now(), ttl)));
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the fence task ends with the agent")
                .unwrap();
        });
    }
}
