//! `egress agent`: run the agent of one server until SIGINT/SIGTERM; SIGHUP or a changed config
//! file reloads; metrics over HTTP.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use log::{info, warn};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use crate::{
    agent::{Agent, Initial, Options},
    config::Config,
    fleet, validate,
};

/// Load the programs onto this server's uplink, write its plan, and keep it current.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Topology config (TOML), watched for changes. Without it, the embedded default.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Which server of the config this is (default: the config's `server`).
    #[arg(long)]
    server: Option<String>,
    /// Where to pin maps and links (default: /sys/fs/bpf/egress/<server>).
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    /// Flow table size (entries; full, new connections are refused). Takes effect when the map is
    /// created, not when adopted.
    #[arg(
        long,
        default_value_t = egress_common::flow::FLOWS_CAPACITY,
        value_parser = clap::value_parser!(u32).range(1024..=MAX_FLOW_CAPACITY)
    )]
    flow_capacity: u32,
    /// Most connections one peer may have translated here at once; beyond it the peer's new
    /// connections are refused (drop_peer_budget). 0: no limit. Default: a quarter of the flow
    /// table's entries (half its connections).
    #[arg(long)]
    peer_budget: Option<u32>,
    /// Recreate pinned maps whose layout differs from this version's (an upgrade), carrying the
    /// flow entries over where their layout allows, instead of refusing to start.
    #[arg(long)]
    migrate: bool,
    /// How often expired flows are collected and usage refreshed, in seconds.
    #[arg(long, default_value_t = 5)]
    gc_interval: u64,
    /// Where to serve Prometheus metrics (GET /metrics).
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_addr: SocketAddr,
    /// Serve no metrics.
    #[arg(long)]
    no_metrics: bool,
    /// On exit, remove the pinned links and maps (the programs detach). By default they stay,
    /// so traffic keeps flowing and a restarted agent adopts them.
    #[arg(long)]
    detach_on_exit: bool,
    /// Compute, report and serve metrics for the plan without loading programs (no root
    /// needed): a fleet simulated on one machine.
    #[arg(long)]
    no_dataplane: bool,
    /// Seconds a peer that came back must keep answering its probes (and hold its lease)
    /// before it takes new connections from this server again.
    #[arg(long, default_value_t = crate::liveness::HOLD_DOWN.as_secs_f64())]
    hold_down: f64,
    /// Fleet mode: the time to live (whole seconds) asked for the lease that keeps this agent's
    /// keys; its peers take it as down this long after it (or its link to etcd) dies. etcd
    /// grants at least its own minimum: 1.5 election timeouts rounded up (2 s by default).
    #[arg(long, default_value_t = fleet::watch::LEASE_TTL, value_parser = clap::value_parser!(i64).range(1..=60))]
    lease_ttl: i64,
    /// Fleet mode: on SIGINT/SIGTERM the programs keep running, so the alive key is kept this
    /// many seconds on a lease of its own for the next agent to take over (peers go on
    /// forwarding through this server meanwhile); 0, or --detach-on-exit: it goes at once.
    #[arg(long, default_value_t = fleet::watch::RESTART_GRACE, value_parser = clap::value_parser!(i64).range(0..=3600))]
    restart_grace: i64,
    /// Fleet mode: while on an etcd member other than the first of its order (its first did
    /// not answer), the agent checks every this many seconds (plus up to half as much again)
    /// whether a member it ranks higher answers again, and moves back to it keeping its
    /// lease; 0: never (it moves only when its member fails).
    #[arg(long, default_value_t = fleet::watch::FAILBACK.as_secs(), value_parser = clap::value_parser!(u64).range(0..=86400))]
    etcd_failback: u64,
    /// Log one datapath decision in N (default 100) with its counter, verdict and the packet's
    /// addresses (aya-log; target egress::trace). Off (the default), the logging step is
    /// removed by the verifier: no cost.
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "100",
          value_parser = clap::value_parser!(u32).range(1..))]
    trace: Option<u32>,
    /// Also attach xdp_ingress to the uplink (native XDP): replies translated back or
    /// re-encapsulated, peers' established connections, forwarded connections' replies and
    /// soft-unicast are finished before the kernel builds an skb; the TC programs handle the
    /// rest (and everything, where the driver has no native XDP). Needs complete checksums on
    /// received frames, as every NIC delivers (a veth fed by a sender with transmit checksum
    /// offload on does not).
    #[arg(long)]
    xdp: bool,
    /// Fleet mode: read and watch the topology in etcd instead of a file.
    #[command(flatten)]
    etcd: crate::fleet::EtcdArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Fleet credentials are checked before anything else: a bad file is named at once.
    let fleet = fleet_endpoint(&args)?;
    let opts = Options {
        config_path: args.config.clone(),
        server: args.server.clone(),
        pin_dir: args.pin_dir.clone(),
        flow_capacity: args.flow_capacity,
        peer_budget: args.peer_budget,
        metrics_addr: (!args.no_metrics).then_some(args.metrics_addr),
        migrate: args.migrate,
        no_dataplane: args.no_dataplane,
        trace_every: args.trace.unwrap_or(0),
        xdp: args.xdp,
    };
    let hold_down =
        Duration::try_from_secs_f64(args.hold_down.max(0.0)).context("--hold-down: seconds")?;
    let every = Duration::from_secs(args.gc_interval.max(1));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // spawn_local: the metrics and etcd tasks share the loop's thread (the agent is not Send).
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut signals = Signals::new()?;
        // Fleet mode: the server's and the pin directory's locks before etcd, where the agent
        // writes its alive and status keys at once — a second agent for this server would
        // otherwise write over the running one's, and take its alive key with it on exit
        // (peers would count the server gone), and collect its flows while it waits. The
        // uplink's lock needs the topology: taken at start.
        let (_server_lock, pins) = match &fleet {
            Some((_, server)) if !opts.no_dataplane => (
                Some(crate::loader::lock_server(server)?),
                Some(crate::loader::lock_pins(&crate::loader::pin_dir(
                    opts.pin_dir.as_deref(),
                    server,
                ))?),
            ),
            _ => (None, None),
        };
        let mut etcd = fleet
            .map(|(ep, server)| EtcdLink::start(ep, server, &args))
            .transpose()?;
        let initial = match etcd.as_mut() {
            None => None,
            Some(link) => {
                let pin_dir = crate::loader::pin_dir(opts.pin_dir.as_deref(), &link.server);
                let waiting = first_topology(
                    &mut link.events,
                    &link.server,
                    &mut signals,
                    &pin_dir,
                    every,
                );
                let Some(initial) = waiting.await else {
                    if let Some(link) = etcd {
                        link.stop();
                    }
                    return Ok(ExitCode::SUCCESS);
                };
                Some(initial)
            }
        };
        let (mut agent, mode, listener) = Agent::start(&opts, initial, pins)?;
        let (link, thread, renewals) = match etcd {
            Some(e) => {
                agent.interest = Some(e.interest);
                (Some((e.events, e.status)), Some(e.thread), Some(e.renewals))
            }
            None => (None, None, None),
        };
        // A fence said while the agent waited for its first topology was not applied.
        if let Some(r) = renewals.as_ref().and_then(|r| r.last())
            && std::time::Instant::now() >= r.at + r.ttl.mul_f64(fleet::watch::FENCE_AFTER)
        {
            agent.fence(true);
        }
        let liveness = agent.start_liveness(hold_down, renewals)?;
        // The address actually bound (`--metrics-addr 127.0.0.1:0` picks a port).
        let metrics_at = listener.as_ref().and_then(|l| l.local_addr().ok());
        let metrics = listener.map(TcpListener::from_std).transpose()?;
        agent.housekeeping();
        info!("{}", ready(&agent, mode, metrics_at));
        serve(&mut agent, metrics, every, &mut signals, link, liveness)
            .await
            .context("agent loop")?;
        // The status sender went with the loop: the etcd thread revokes the lease (the status
        // key goes at once, not after its TTL) and ends.
        join_etcd(thread);
        agent.shutdown(args.detach_on_exit)?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Fleet mode's etcd endpoint and this agent's server, checked: None in file mode.
fn fleet_endpoint(args: &Args) -> anyhow::Result<Option<(fleet::Endpoint, String)>> {
    if !args.etcd.given() {
        return Ok(None);
    }
    if args.config.is_some() {
        anyhow::bail!("--config and --etcd: the topology comes from one of them, not both");
    }
    let Some(server) = args.server.clone() else {
        anyhow::bail!("--etcd: name this agent's server with --server NAME");
    };
    let mut ep = args.etcd.endpoint()?;
    ep.spread_by(&server);
    // An agent identity may write only its own server's status: another one is a mix-up.
    if let Some(user) = ep.user()
        && user.starts_with("egress-agent-")
        && user != fleet::pki::agent_user(&server)
    {
        anyhow::bail!(
            "the etcd identity is {user}, not {}: --etcd-tls names another server's credentials than --server {server}",
            fleet::pki::agent_user(&server)
        );
    }
    Ok(Some((ep, server)))
}

/// The agent's ends of its etcd thread (fleet mode).
struct EtcdLink {
    server: String,
    events: tokio::sync::mpsc::UnboundedReceiver<fleet::watch::Event>,
    status: tokio::sync::watch::Sender<fleet::Status>,
    interest: tokio::sync::watch::Sender<std::collections::BTreeSet<String>>,
    renewals: fleet::watch::Renewals,
    thread: std::thread::JoinHandle<()>,
}

impl EtcdLink {
    /// Starts the etcd thread: a thread and runtime of its own, so that loading programs,
    /// writing a large plan or a slow repair on the agent's loop never delays the lease's
    /// keep-alives.
    fn start(ep: fleet::Endpoint, server: String, args: &Args) -> anyhow::Result<Self> {
        let (status, status_rx) = tokio::sync::watch::channel(fleet::Status {
            server: server.clone(),
            dataplane: !args.no_dataplane,
            started_at: fleet::unix_now(),
            pid: std::process::id(),
            host: fleet::hostname(),
            ..Default::default()
        });
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let (interest, interest_rx) = tokio::sync::watch::channel(Default::default());
        let (renewed_tx, renewals) = fleet::watch::Renewals::new();
        let nudge = renewals.nudge.clone();
        info!(
            "fleet mode: reading the topology from etcd {} under {} as {}",
            ep.urls.join(","),
            ep.keys.prefix(),
            ep.user().unwrap_or("(plain text, no identity)")
        );
        let me = fleet::watch::Identity {
            server: server.clone(),
            lease_ttl: args.lease_ttl,
            // Detached on exit, or no dataplane: nothing keeps carrying its connections.
            restart_grace: if args.detach_on_exit || args.no_dataplane {
                0
            } else {
                args.restart_grace
            },
            failback: (args.etcd_failback > 0).then(|| Duration::from_secs(args.etcd_failback)),
        };
        let thread = std::thread::Builder::new()
            .name("etcd".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(fleet::watch::run(
                        ep,
                        me,
                        tx,
                        status_rx,
                        interest_rx,
                        renewed_tx,
                        nudge,
                    )),
                    Err(e) => log::error!("etcd thread: no runtime: {e}"),
                }
            })?;
        Ok(Self {
            server,
            events,
            status,
            interest,
            renewals,
            thread,
        })
    }

    /// Closes the agent's ends (the thread revokes the lease) and waits for the thread.
    fn stop(self) {
        drop((self.events, self.status, self.interest));
        join_etcd(Some(self.thread));
    }
}

/// The line that says the agent is up.
fn ready(
    agent: &Agent,
    mode: Option<crate::loader::AttachMode>,
    metrics: Option<SocketAddr>,
) -> String {
    format!(
        "ready: server {} {}, {}, metrics {}",
        agent.server,
        match mode {
            Some(m) => format!("attached ({m:?})"),
            None => "planned (no dataplane)".to_string(),
        },
        match &agent.fleet {
            Some(f) => format!("published revision {}", f.applied_revision),
            None => format!("maps pinned in {}", agent.pin_dir.display()),
        },
        match metrics {
            None => "off".to_string(),
            Some(a) => format!("http://{a}/metrics"),
        }
    )
}

/// Waits (a little: a supervisor's stop timeout is often a few seconds) for the etcd thread to
/// move the alive key onto its grace lease, revoke its lease and end; says so when it did not.
fn join_etcd(thread: Option<std::thread::JoinHandle<()>>) {
    let Some(t) = thread else { return };
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while !t.is_finished() && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    if t.is_finished() {
        let _ = t.join();
    } else {
        log::warn!(
            "exiting before etcd answered: the lease lapses on its own, and an alive key meant for --restart-grace may not have been kept"
        );
    }
}

/// SIGTERM, SIGINT and SIGHUP, registered once.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Fleet mode, before anything is loaded: waits for a published topology that is valid and
/// has this server. Until then nothing is attached or written (fail closed: what a previous
/// agent left pinned keeps running as it was). None: asked to stop while waiting.
async fn first_topology(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<fleet::watch::Event>,
    server: &str,
    signals: &mut Signals,
    pin_dir: &std::path::Path,
    every: Duration,
) -> Option<Initial> {
    use fleet::watch::Event;
    // Programs a previous agent left attached keep translating meanwhile: their flow table is
    // collected as usual (on the collector's schedule), so it does not fill while we wait.
    let mut keeper = crate::agent::Housekeeper::from_pins(pin_dir);
    if keeper.is_some() {
        warn!(
            "waiting for the topology; the programs a previous agent left in {} keep running on their plan, their flows collected meanwhile",
            pin_dir.display()
        );
    }
    let mut collect = tokio::time::interval(every);
    let mut member = fleet::watch::MemberView::default();
    // Each thing said once: a rejected revision, and the connection's state while it stays.
    let mut said = std::collections::BTreeSet::new();
    let mut say = |line: String| {
        if said.insert(line.clone()) {
            warn!("{line}");
        }
    };
    loop {
        let event = tokio::select! {
            _ = signals.term.recv() => return None,
            _ = signals.int.recv() => return None,
            _ = collect.tick(), if keeper.is_some() => {
                if let Some(Err(e)) = keeper.as_mut().map(|k| k.run()) {
                    warn!("collecting the pinned flow table: {e}");
                }
                continue;
            }
            e = events.recv() => e?,
        };
        match event {
            Event::Connected(url) => {
                member.connected(url);
            }
            Event::Lost(why) => {
                member.lost();
                say(format!(
                    "etcd connection failed ({why}): no plan yet, nothing attached; retrying"
                ));
            }
            // Nothing is planned yet: leases matter once it is; nothing is attached to fence
            // (the state is looked at again once the agent has started).
            Event::Leases(_) | Event::LeasesUnknown | Event::Fenced(_) => {}
            Event::StatusRefused(why) => say(format!(
                "etcd refuses this agent's status key ({why}); check the identity (--etcd-tls) matches --server"
            )),
            Event::Nothing => {
                say(
                    "nothing published under the prefix yet: no plan, nothing attached; waiting"
                        .to_string(),
                );
            }
            Event::Published(p) => {
                let checked = Config::parse(&p.text, "the published topology")
                    .map_err(anyhow::Error::from)
                    .and_then(|c| Ok(validate::validate(&c)?))
                    .and_then(|t| {
                        t.config()
                            .select_server(Some(server))
                            .map_err(|_| anyhow::anyhow!("server {server:?} is not in it"))?;
                        Ok(t)
                    });
                match checked {
                    Ok(topology) => {
                        return Some(Initial {
                            text: p.text.clone(),
                            topology,
                            published: p,
                            member,
                        });
                    }
                    Err(e) => say(format!(
                        "published revision {} rejected: {}; no plan, nothing attached; waiting for a valid one",
                        p.revision,
                        crate::agent::one_line(&e)
                    )),
                }
            }
        }
    }
}

/// Largest flow table (entries; about 100 bytes each, preallocated: 1.6 GiB).
const MAX_FLOW_CAPACITY: i64 = 16 << 20;

/// Requests from the metrics server to the agent's loop: a channel to send the rendered text on.
type Render = tokio::sync::oneshot::Sender<Result<String, String>>;

/// Scrapes served at once; more wait in the kernel's accept queue.
const METRICS_CONNECTIONS: usize = 8;
/// What a scraper gets to send its request, and to take the answer.
const METRICS_IO: Duration = Duration::from_secs(2);

/// Fleet mode's channels: events from the etcd task, status to it.
type FleetLink = (
    tokio::sync::mpsc::UnboundedReceiver<fleet::watch::Event>,
    tokio::sync::watch::Sender<fleet::Status>,
);

/// A status changes in substance (anything but the drop count and the time): sent at once;
/// otherwise at most every [`STATUS_REFRESH`].
const STATUS_REFRESH: Duration = Duration::from_secs(10);

fn substance(s: &fleet::Status) -> fleet::Status {
    fleet::Status {
        drops: 0,
        updated_at: 0,
        ..s.clone()
    }
}

async fn serve(
    agent: &mut Agent,
    metrics: Option<TcpListener>,
    every: Duration,
    signals: &mut Signals,
    fleet: Option<FleetLink>,
    mut liveness: Option<tokio::sync::mpsc::UnboundedReceiver<()>>,
) -> std::io::Result<()> {
    let mut watch = tokio::time::interval(Duration::from_secs(1));
    // The collector runs on a thread of its own and reports each pass; the loop only takes the
    // results in.
    let (pass_tx, mut passes) = tokio::sync::mpsc::unbounded_channel();
    if let Some(mut keeper) = agent.housekeeper().map_err(std::io::Error::other)? {
        std::thread::Builder::new()
            .name("collector".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(every);
                    // A pass that panics is reported and the next one runs: the table never
                    // evicts, so a collector that stopped would end in refused connections.
                    let pass =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| keeper.run()))
                            .unwrap_or_else(|_| Err("the collector's pass panicked".into()));
                    if pass_tx.send(pass).is_err() {
                        return;
                    }
                }
            })?;
    }
    // Metrics are served on tasks of their own; the loop only renders the text on request, so
    // a slow or idle scraper never delays a reload or a collection.
    let (render_tx, mut render_rx) = tokio::sync::mpsc::channel::<Render>(METRICS_CONNECTIONS);
    if let Some(listener) = metrics {
        tokio::task::spawn_local(accept_scrapes(listener, render_tx));
    }
    let (mut events, status_tx) = match fleet {
        Some((e, s)) => (Some(e), Some(s)),
        None => (None, None),
    };
    let mut sent_at = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = signals.term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = signals.int.recv() => { info!("SIGINT: shutting down"); break; }
            _ = signals.hup.recv() => {
                if agent.fleet.is_some() {
                    info!("SIGHUP: fleet mode reads the topology from etcd; nothing to reload");
                } else {
                    agent.reload("SIGHUP")
                }
            }
            _ = watch.tick() => {
                agent.repair();
                // A liveness change whose switch failed is tried again.
                agent.liveness_changed();
                if agent.config_changed() {
                    agent.reload("config file changed")
                } else if agent.retry_due() {
                    agent.retry_now()
                }
            }
            Some(event) = async { events.as_mut()?.recv().await } => agent.fleet_event(event),
            Some(()) = async { liveness.as_mut()?.recv().await } => agent.liveness_changed(),
            Some(pass) = passes.recv() => agent.apply_pass(pass),
            Some(reply) = render_rx.recv() => {
                let _ = reply.send(agent.render_metrics().map_err(|e| format!("{e:#}")));
            }
        }
        if let Some(tx) = &status_tx {
            let now = agent.status();
            let due = sent_at.elapsed() >= STATUS_REFRESH;
            let changed = tx.send_if_modified(|s| {
                if substance(s) != substance(&now) || (due && *s != now) {
                    *s = now;
                    true
                } else {
                    false
                }
            });
            if changed {
                sent_at = std::time::Instant::now();
            }
        }
        agent.flush_interest();
    }
    Ok(())
}

/// Accepts scrapes, at most [`METRICS_CONNECTIONS`] at once, each bounded in time.
async fn accept_scrapes(listener: TcpListener, render: tokio::sync::mpsc::Sender<Render>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((conn, _)) = listener.accept().await else {
            // Out of descriptors, say: wait a little instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let render = render.clone();
        tokio::task::spawn_local(async move {
            let _permit = permit;
            if tokio::time::timeout(METRICS_IO * 3, scrape(conn, render))
                .await
                .is_err()
            {
                warn!("metrics: a scrape took too long and was cut");
            }
        });
    }
}

/// One request per connection: GET /metrics, answered and closed.
async fn scrape(mut conn: tokio::net::TcpStream, render: tokio::sync::mpsc::Sender<Render>) {
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(METRICS_IO, conn.read(&mut buf))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(0);
    let req = String::from_utf8_lossy(&buf[..n]);
    let (status, body) = if req.starts_with("GET /metrics") {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let answer = match render.send(tx).await {
            Ok(()) => rx.await.unwrap_or_else(|_| Err("agent loop gone".into())),
            Err(_) => Err("agent loop gone".into()),
        };
        match answer {
            Ok(b) => ("200 OK", b),
            Err(e) => {
                warn!("rendering metrics: {e}");
                ("500 Internal Server Error", format!("{e}\n"))
            }
        }
    } else {
        ("404 Not Found", "try /metrics\n".to_string())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        conn.write_all(head.as_bytes()).await?;
        conn.write_all(body.as_bytes()).await
    };
    let _ = tokio::time::timeout(METRICS_IO, write).await;
}
