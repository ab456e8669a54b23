//! The running agent: owns the loaded programs and maps of one server, applies plans as
//! differences (at start and on every reload), collects expired flows, watches port pressure,
//! and renders metrics. The CLI (`cli/agent.rs`) drives it from signals and timers.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
};
use egress_common::{
    flow::{FlowKey, FlowValue},
    map_names,
    stats::{Counter, Stat},
};
use log::{error, info, warn};

mod metrics;

use crate::{
    apply::Diff,
    config::{Config, ConfigError},
    flows,
    loader::{self, AttachMode, Maps},
    plan::{self, Plan},
    validate::{self, Topology},
};

/// What the agent is started with.
#[derive(Debug, Clone)]
pub struct Options {
    /// The config file; None = the embedded default (nothing to reload from).
    pub config_path: Option<PathBuf>,
    pub server: Option<String>,
    pub pin_dir: Option<PathBuf>,
    pub flow_capacity: u32,
    /// Most connections one peer may have translated here at once (0: no limit); None: a
    /// quarter of the flow table's entries (half its connections).
    pub peer_budget: Option<u32>,
    /// Where to serve metrics; bound before anything is written (None: no metrics).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Recreate pinned maps whose layout differs from the programs' (carrying flow entries
    /// over where their layout allows) instead of refusing to start.
    pub migrate: bool,
    /// Compute and report the plan, load nothing (no root needed).
    pub no_dataplane: bool,
    /// One datapath decision in this many is logged (0: none, and no cost).
    pub trace_every: u32,
    /// Attach `xdp_ingress` to the uplink (native mode) in front of the TC programs.
    pub xdp: bool,
}

/// Usage of one port slice (a share of a pool address held by this server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceUsage {
    pub address: Ipv4Addr,
    pub first: u16,
    pub last: u16,
    /// Distinct ports of the slice in use by live connections.
    pub used: u32,
}

impl SliceUsage {
    pub fn size(&self) -> u32 {
        u32::from(self.last - self.first) + 1
    }
}

/// Share of a slice in use above which the agent warns.
pub const SLICE_WARN: f64 = 0.8;

#[derive(Debug, Default, Clone)]
struct Observed {
    entries: BTreeMap<&'static str, i64>,
    /// Entries of the plan maps (as last written).
    map_entries: BTreeMap<&'static str, i64>,
    slices: Vec<SliceUsage>,
    collected: u64,
    /// Unreplied connections removed early under table pressure.
    early_dropped: u64,
    /// Whether the last collection found the table under pressure (logged on change).
    pressure: bool,
    /// How long the last housekeeping pass took.
    pass_seconds: f64,
    /// Connections translated here per peer (fabric address), at the last housekeeping.
    peer_load: BTreeMap<Ipv4Addr, u64>,
    /// Buckets the pass filter passes early (IPv4, IPv6), as last refined.
    pass_filter: (u32, u32),
}

/// What the agent holds of the kernel: programs, maps, links, and the locks that make it the
/// only agent of its server. Absent with `--no-dataplane`.
pub struct Dataplane {
    ebpf: Ebpf,
    maps: Maps,
    /// Held while the agent runs: one agent per pin directory.
    _lock: [loader::AgentLock; 2],
    uplink: String,
    /// Attached with tcx links (pinned); false for clsact filters.
    tcx: bool,
    /// Whether the last check found the programs attached (their links pinned).
    attached: bool,
    /// A descriptor of each pinned link (tcx), so that a removed pin does not detach anything.
    links: Vec<(&'static str, Option<aya::programs::links::PinnedLink>)>,
    /// `xdp_ingress` is attached to the uplink (`--xdp`, and the driver took it).
    xdp: bool,
}

pub struct Agent {
    dp: Option<Dataplane>,
    config_path: Option<PathBuf>,
    /// The text of the config the running plan came from (reload on change).
    config_text: String,
    pub server: String,
    pub pin_dir: PathBuf,
    topology: Topology,
    plan: Plan,
    pub generation: u64,
    reloads_ok: u64,
    reloads_failed: u64,
    flow_capacity: u32,
    peer_budget: u32,
    observed: Observed,
    warned_slices: std::collections::BTreeSet<(Ipv4Addr, u16)>,
    /// Times something removed from under the agent was restored.
    repairs: u64,
    /// Hash of the plan in force ([`plan::plan_hash`]).
    plan_hash: String,
    /// Fleet mode: the published revision in force and the link to etcd.
    pub fleet: Option<FleetState>,
    /// Liveness of the next hops (None: no dataplane, nothing probed).
    liveness: Option<crate::liveness::Shared>,
    /// The peers the plan in force treats as down, and why.
    down: BTreeMap<String, u32>,
    /// Connections removed because the peer they went through died.
    peer_resets: u64,
    /// After a liveness switch that failed to be written: not before this again, and the delay
    /// used (it doubles per failure, up to [`RETRY_MAX`], as a reload's).
    liveness_retry_at: Option<(std::time::Instant, std::time::Duration)>,
    /// Fleet mode: the peers whose leases the etcd thread watches.
    pub interest: Option<tokio::sync::watch::Sender<std::collections::BTreeSet<String>>>,
    /// Peers to watch since the last plan change, not yet handed to the etcd thread
    /// ([`Agent::flush_interest`]).
    interest_due: Option<std::collections::BTreeSet<String>>,
    started_at: u64,
    /// Fleet mode: the published text (and revision) being applied, kept for a retry.
    pending: Option<crate::fleet::Published>,
    /// After a plan that failed to be written: when to try it again, and the delay used (it
    /// doubles per failure, up to [`RETRY_MAX`]; a new config text starts over).
    retry: Option<(std::time::Instant, std::time::Duration)>,
    /// Registered at the first scrape.
    metrics: std::sync::OnceLock<metrics::Metrics>,
    /// Plans written to the maps (each attempt): a collection pass refines the pass filter
    /// only if none was written since it began reading ([`crate::filter`]).
    plan_writes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The buckets of the plan in force (None: not known yet, read back from the maps).
    plan_buckets: Option<crate::filter::Buckets>,
}

/// The collector: one pass over the flow table at a time, on a thread of its own.
pub struct Housekeeper {
    flows: HashMap<MapData, FlowKey, FlowValue>,
    peer_load: HashMap<MapData, [u8; 4], u64>,
    capacity: u32,
    plan_writes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Housekeeper {
    /// Collects, counts, and writes the recounted peer loads.
    pub fn run(&mut self) -> Result<flows::Pass, String> {
        let before = loader::read_peer_load(&self.peer_load);
        let writes = self.plan_writes.load(std::sync::atomic::Ordering::SeqCst);
        let mut p = flows::pass(&mut self.flows, flows::monotonic_ns(), self.capacity)
            .map_err(|e| e.to_string())?;
        p.plan_writes = writes;
        loader::write_peer_load(&mut self.peer_load, &p.peer_load, &before)
            .map_err(|e| e.to_string())?;
        Ok(p)
    }
}

impl Housekeeper {
    /// A collector on the flow table a previous agent left pinned in `pin_dir` (None: none
    /// there). While a fleet agent waits for its first topology, the programs left attached
    /// keep translating; this keeps their flow table from filling with expired entries.
    pub fn from_pins(pin_dir: &Path) -> Option<Housekeeper> {
        use aya::maps::Map;
        let open = |name: &str| MapData::from_pin(pin_dir.join(name)).ok();
        let flows = open(map_names::FLOWS)?;
        let capacity = flows.info().ok()?.max_entries();
        Some(Housekeeper {
            flows: HashMap::try_from(Map::HashMap(flows)).ok()?,
            peer_load: HashMap::try_from(Map::HashMap(open(map_names::PEER_LOAD)?)).ok()?,
            capacity,
            // No agent writes a plan meanwhile; nor does anything read its passes' filter.
            plan_writes: Default::default(),
        })
    }
}

/// First and longest wait before a plan that failed to be written is tried again.
const RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(5);
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(300);

/// The delay before the next try of a plan that failed to be written, after `previous`
/// (None: the first failure).
fn backoff(previous: Option<std::time::Duration>) -> std::time::Duration {
    previous.map_or(RETRY_FIRST, |d| (d * 2).min(RETRY_MAX))
}

/// An error as one line: the same problems `egress validate` lists, separated by ';'.
pub fn one_line(e: &anyhow::Error) -> String {
    let msg: Vec<String> = format!("{e:#}")
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    msg.join("; ")
}

fn read_config(path: Option<&Path>) -> Result<(String, Config), ConfigError> {
    match path {
        None => Ok((
            crate::config::DEFAULT_CONFIG.to_string(),
            Config::embedded(),
        )),
        Some(p) => {
            let text = crate::config::read_text(p)?;
            let c = Config::parse(&text, &p.display().to_string())?;
            Ok((text, c))
        }
    }
}

impl Dataplane {
    /// Loads the programs, adopting the maps pinned in `pin_dir` (those of another layout
    /// refused, or with `--migrate` recreated with their flows carried over). Returns the
    /// pins a migration set aside: removed once the new programs are attached.
    fn load(
        opts: &Options,
        server: &crate::config::Server,
        pin_dir: &std::path::Path,
        lock: [loader::AgentLock; 2],
    ) -> anyhow::Result<(Dataplane, Vec<std::path::PathBuf>)> {
        // Adopted maps must have the layout the programs expect (checked before anything is
        // loaded or written).
        let mismatches = loader::check_pins(pin_dir, opts.flow_capacity)?;
        // A migration that failed after setting maps aside: its flows are carried now.
        let (unfinished, left_aside) = loader::unfinished_migration(pin_dir)?;
        if !left_aside.is_empty() {
            warn!(
                "an earlier migration did not finish: {} set aside, {} flow entries to carry over",
                left_aside
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                unfinished.len()
            );
        }
        let (saved, mut set_aside) = match mismatches.first() {
            None => (Vec::new(), Vec::new()),
            Some(m) if !opts.migrate => return Err(m.error().into()),
            Some(_) => {
                for m in &mismatches {
                    warn!(
                        "migrating {}: pinned {}, recreated as {}",
                        m.name, m.pinned, m.expected
                    );
                }
                loader::migrate(&mismatches)?
            }
        };
        let carrying = !mismatches.is_empty() || !left_aside.is_empty();
        set_aside.extend(left_aside);
        let mut ebpf = loader::load(pin_dir, opts.flow_capacity, opts.trace_every)?;
        if opts.trace_every != 0 {
            trace_log(&mut ebpf, opts.trace_every)?;
            loader::enable_trace(&mut ebpf)?;
        }
        let mut maps = loader::take_maps(&mut ebpf)?;
        // An adopted filter may pass what this agent's maps no longer justify (one left by an
        // older version, or by this one before a rollback and its flows): nothing passes early
        // until this agent's first collection, right after start, narrows it.
        maps.plan
            .filter
            .clear()
            .context("clearing the pass filter (PASS_FILTER)")?;
        let mut dp = Dataplane {
            ebpf,
            maps,
            _lock: lock,
            uplink: server.uplink.clone(),
            tcx: false,
            attached: false,
            links: Vec::new(),
            xdp: false,
        };
        if carrying {
            // The unfinished migration's entries only where the table has none: what this
            // start migrated, or the programs made since, is newer.
            const BPF_NOEXIST: u64 = 1;
            let carried = saved
                .iter()
                .map(|e| (e, 0))
                .chain(unfinished.iter().map(|e| (e, BPF_NOEXIST)))
                .filter(|((k, v), flags)| dp.maps.flows.insert(k, v, *flags).is_ok())
                .count();
            info!(
                "migration: {carried} of {} flow entries carried over",
                saved.len() + unfinished.len()
            );
        }
        if dp.maps.flow_capacity != opts.flow_capacity {
            warn!(
                "the pinned flow table holds {} entries, not --flow-capacity {}: kept (egress detach, then start, to resize)",
                dp.maps.flow_capacity, opts.flow_capacity
            );
        }
        Ok((dp, set_aside))
    }

    /// With `wanted` (`--xdp`), attaches `xdp_ingress` to the uplink in front of the TC
    /// programs; where the driver cannot take it the TC programs do all the work (said once).
    /// Without, detaches one an earlier agent left. Returns whether it is attached.
    fn xdp_in_front(&mut self, wanted: bool, pin_dir: &Path) -> bool {
        let uplink = &self.uplink;
        if !wanted {
            match loader::detach_xdp(pin_dir) {
                Ok(true) => info!("xdp_ingress detached from {uplink} (started without --xdp)"),
                Ok(false) => {}
                Err(e) => warn!("detaching xdp_ingress from {uplink}: {e}"),
            }
            return false;
        }
        match loader::attach_xdp(&mut self.ebpf, uplink, pin_dir) {
            Ok(adopted) => {
                let how = if adopted { ", its link adopted" } else { "" };
                info!("xdp_ingress attached to {uplink} (native mode{how})");
                true
            }
            Err(e) => {
                // An earlier agent's program must not go on running in front of these.
                let _ = loader::detach_xdp(pin_dir);
                warn!(
                    "--xdp: {:#}; the TC programs handle every packet",
                    anyhow::Error::from(e)
                );
                false
            }
        }
    }

    /// Opens a descriptor on each pinned link and keeps it: the links then live as long as the
    /// agent, whatever happens to their pins.
    fn hold_links(&mut self, pin_dir: &Path) {
        if !self.tcx {
            return;
        }
        let xdp = self.xdp.then_some(egress_common::prog_names::XDP_INGRESS);
        self.links = loader::PROGRAMS
            .iter()
            .map(|(name, _)| *name)
            .chain(xdp)
            .map(|name| {
                let path = loader::link_pin(pin_dir, name);
                (name, aya::programs::links::PinnedLink::from_pin(&path).ok())
            })
            .collect();
    }
}

/// The topology an agent starts with when it does not read it itself (fleet mode).
pub struct Initial {
    pub text: String,
    pub topology: Topology,
    pub published: crate::fleet::Published,
    /// The etcd member as the events before the start told it (empty when the topology
    /// arrived before the session was up: its `Connected` then reaches the agent).
    pub member: crate::fleet::watch::MemberView,
}

/// Fleet mode: what the agent knows of the published topology and of its link to etcd.
#[derive(Debug, Clone, Default)]
pub struct FleetState {
    pub applied_revision: i64,
    pub applied_serial: u64,
    /// The newest revision seen (applied or rejected): each is handled once.
    pub seen_revision: i64,
    pub rejected_revisions: u64,
    /// Why the newest revision was rejected, while it is the newest.
    pub rejected: Option<String>,
    pub connected: bool,
    /// The etcd member the session is on.
    pub member: crate::fleet::watch::MemberView,
    /// Since when (Unix seconds) the plan may be stale: etcd unreachable.
    pub stale_since: Option<u64>,
    /// When the plan in force was last confirmed current (Unix seconds): applied, or found
    /// unchanged on reconnecting.
    pub updated_at: u64,
    /// Why etcd refuses this agent's status key (logged once per reason).
    pub status_refused: Option<String>,
    /// This server answers probes "fenced" (its lease could not be renewed in time).
    pub fenced: bool,
}

/// Logs the programs' sampled decisions (`--trace`) from a thread of its own, which owns the
/// log's ring buffer for the agent's life (the programs need the map to load).
fn trace_log(ebpf: &mut aya::Ebpf, every: u32) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    let mut logger =
        aya_log::EbpfLogger::init_with_logger(ebpf, Named).context("the programs' decision log")?;
    info!("tracing one datapath decision in {every} (log target egress::trace)");
    std::thread::Builder::new()
        .name("trace".into())
        .spawn(move || {
            loop {
                let mut pfd = libc::pollfd {
                    fd: logger.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 1000) };
                logger.flush();
            }
        })?;
    Ok(())
}

/// Passes the programs' decision lines on to the agent's log, counter and verdict named.
struct Named;

impl log::Log for Named {
    fn enabled(&self, m: &log::Metadata) -> bool {
        log::logger().enabled(m)
    }

    fn log(&self, record: &log::Record) {
        let line = loader::trace_line(&record.args().to_string());
        log::logger().log(
            &log::Record::builder()
                .args(format_args!("{line}"))
                .level(record.level())
                .target("egress::trace")
                .build(),
        );
    }

    fn flush(&self) {}
}

/// The metrics listener, bound before anything is written (a taken port fails the start).
fn bind_metrics(addr: std::net::SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let l =
        std::net::TcpListener::bind(addr).with_context(|| format!("binding metrics on {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

impl Agent {
    /// Validates the config, loads (adopting pinned maps), writes the plan, then attaches
    /// (adopting pinned links). The plan is in the maps before any new program sees a packet.
    /// With `initial` (fleet mode) that topology is used instead of reading a config file;
    /// `pins`: the pin directory's lock, when the caller took it already.
    pub fn start(
        opts: &Options,
        initial: Option<Initial>,
        pins: Option<loader::AgentLock>,
    ) -> anyhow::Result<(Agent, Option<AttachMode>, Option<std::net::TcpListener>)> {
        let (config_text, topology, published, member) = match initial {
            Some(i) => (i.text, i.topology, Some(i.published), Some(i.member)),
            None => {
                let (text, config) = read_config(opts.config_path.as_deref())?;
                (text, validate::validate(&config)?, None, None)
            }
        };
        let server = topology
            .config()
            .select_server(opts.server.as_deref())?
            .clone();
        let pin_dir = loader::pin_dir(opts.pin_dir.as_deref(), &server.name);
        let lock = if opts.no_dataplane {
            None
        } else {
            loader::preflight(&server.uplink, server.fabric, &server.name, &pin_dir)?;
            Some(loader::lock_all(pins, &pin_dir, &server.uplink)?)
        };
        // Everything that can fail comes before the first write: the metrics port too.
        let listener = opts.metrics_addr.map(bind_metrics).transpose()?;
        let mut agent = Agent::new(
            opts,
            config_text,
            topology,
            published,
            &server.name,
            &pin_dir,
        );
        if let (Some(f), Some(m)) = (agent.fleet.as_mut(), member) {
            f.member = m;
        }
        let Some(lock) = lock else {
            agent.generation = 1;
            info!(
                "plan generation 1 for {} computed (no dataplane): {} entries, hash {}",
                agent.server,
                agent.plan.entries.len(),
                agent.plan_hash
            );
            return Ok((agent, None, listener));
        };
        let (dp, set_aside) = Dataplane::load(opts, &server, &pin_dir, lock)?;
        agent.flow_capacity = dp.maps.flow_capacity;
        agent.peer_budget = opts.peer_budget.unwrap_or(agent.flow_capacity / 4);
        agent.dp = Some(dp);
        let dp = agent.dp.as_mut().expect("set above");
        dp.maps.set_local(&loader::local_settings(
            server.fabric,
            &server.uplink,
            agent.peer_budget,
        )?)?;
        agent.inherit_down();
        let diff = agent.write_plan()?;
        agent.generation = 1;
        info!(
            "plan generation 1 for {}: {} entries; maps: {} added, {} updated, {} removed",
            agent.server,
            agent.plan.entries.len(),
            diff.added,
            diff.updated,
            diff.removed
        );
        let dp = agent.dp.as_mut().expect("set above");
        let mode = loader::attach(&mut dp.ebpf, &server.uplink, &pin_dir)?;
        // Migrated: the old maps were kept aside until now, in case anything above failed.
        for p in set_aside {
            let _ = std::fs::remove_file(&p);
        }
        dp.tcx = mode != AttachMode::Clsact;
        dp.attached = true;
        dp.xdp = dp.xdp_in_front(opts.xdp, &pin_dir);
        dp.hold_links(&pin_dir);
        Ok((agent, Some(mode), listener))
    }

    /// The peers the previous agent left down (the adopted `PEERS` flags): the first plan
    /// goes around them, and the prober keeps them down until they answer — not a grace
    /// period of new connections sent into a dead peer's tunnel after every restart.
    fn inherit_down(&mut self) {
        let Some(dp) = self.dp.as_mut() else { return };
        let peers = match dp.maps.plan.in_force() {
            Ok(m) => m.peers,
            Err(e) => {
                warn!("reading the previous agent's PEERS: {e}; every peer starts up");
                return;
            }
        };
        let down: BTreeMap<String, u32> = self
            .topology
            .config()
            .servers
            .iter()
            .filter(|s| s.name != self.server)
            .filter_map(|s| {
                let p = peers.get(&egress_common::fabric::AddrKey::new(s.fabric.octets(), 0))?;
                // Lost (not merely holding down: one answering comes back at its first
                // answer anyway, and would only cost two switches).
                (p.flags & crate::liveness::why::LOST != 0).then(|| (s.name.clone(), p.flags))
            })
            .collect();
        if down.is_empty() {
            return;
        }
        info!(
            "down when the previous agent stopped, kept down until they answer: {}",
            down.iter()
                .map(|(n, f)| format!("{n} ({})", crate::liveness::why::words(*f)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.down = down;
        self.plan = plan::plan_with(&self.topology, &self.server, &self.down);
    }

    /// The agent of `server` with the plan of `topology` computed, nothing loaded yet.
    fn new(
        opts: &Options,
        config_text: String,
        topology: Topology,
        published: Option<crate::fleet::Published>,
        server: &str,
        pin_dir: &std::path::Path,
    ) -> Agent {
        let plan = plan::plan(&topology, server);
        Agent {
            dp: None,
            config_path: opts.config_path.clone(),
            config_text,
            server: server.to_string(),
            pin_dir: pin_dir.to_path_buf(),
            plan_hash: plan::plan_hash(&topology, &plan),
            plan,
            topology,
            generation: 0,
            reloads_ok: 0,
            reloads_failed: 0,
            flow_capacity: 0,
            peer_budget: 0,
            observed: Observed::default(),
            warned_slices: Default::default(),
            repairs: 0,
            fleet: published.map(|p| FleetState {
                applied_revision: p.revision,
                applied_serial: p.meta.as_ref().map_or(0, |m| m.serial),
                seen_revision: p.revision,
                connected: true,
                updated_at: crate::fleet::unix_now(),
                ..Default::default()
            }),
            started_at: crate::fleet::unix_now(),
            liveness: None,
            down: BTreeMap::new(),
            peer_resets: 0,
            liveness_retry_at: None,
            interest: None,
            interest_due: None,
            pending: None,
            retry: None,
            metrics: std::sync::OnceLock::new(),
            plan_writes: Default::default(),
            plan_buckets: None,
        }
    }

    fn write_plan(&mut self) -> anyhow::Result<Diff> {
        for e in self
            .plan
            .entries
            .iter()
            .filter(|e| e.next_hops.len() > egress_common::action::MAX_HOPS)
        {
            warn!(
                "pool {}: {} next hops, the datapath uses the first {} (by server name)",
                e.pool,
                e.next_hops.len(),
                egress_common::action::MAX_HOPS
            );
        }
        let want = plan::map_contents(&self.topology, &self.plan);
        self.plan_hash = plan::plan_hash_of(&self.plan, &want);
        self.watch_peers();
        let Some(dp) = self.dp.as_mut() else {
            return Ok(Diff::default());
        };
        let applied = dp.maps.plan.apply(&want);
        self.plan_writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // Failed, the plan in force is the one before (apply switches only when all is written).
        let diff = applied.context("writing the plan to the maps")?;
        self.plan_buckets = Some(crate::filter::Buckets::of_plan(&want));
        if let Some(n) = self
            .dp
            .as_mut()
            .and_then(|dp| dp.maps.plan.filter.passing().ok())
        {
            self.observed.pass_filter = n;
        }
        // What the plan maps hold now, for the metrics (counted once per plan, not per pass).
        self.observed.map_entries = [
            (map_names::POLICY_V4, want.policies_v4.len() as i64),
            (map_names::POLICY_V6, want.policies_v6.len() as i64),
            (map_names::ACTIONS, want.actions.len() as i64),
            (map_names::PEERS, want.peers.len() as i64),
            (map_names::OWNERS, want.owners.len() as i64),
            (map_names::PEER_POLICY, want.peer_policies.len() as i64),
        ]
        .into();
        Ok(diff)
    }

    /// Whether a plan that failed to be written is due to be tried again.
    pub fn retry_due(&self) -> bool {
        self.retry
            .is_some_and(|(at, _)| std::time::Instant::now() >= at)
    }

    /// Whether the config file's content differs from the running plan's.
    pub fn config_changed(&self) -> bool {
        match &self.config_path {
            None => false,
            Some(p) => crate::config::read_text(p).is_ok_and(|t| t != self.config_text),
        }
    }

    /// Reads, validates and applies the config as a difference. An invalid config leaves the
    /// running plan in force; the error is logged exactly as `egress validate` words it. A
    /// refused config also ends the retries of a plan that failed to be written: the file no
    /// longer holds it, and the next change of the file is read anyway.
    pub fn reload(&mut self, why: &str) {
        let result = read_config(self.config_path.as_deref())
            .map_err(anyhow::Error::from)
            .and_then(|(text, c)| Ok((text, validate::validate(&c)?)));
        let (text, topology) = match result {
            Ok(ok) => ok,
            Err(e) => {
                self.reloads_failed += 1;
                self.retry = None;
                // Remember the text so an unchanged invalid file is not retried every second.
                if let Some(p) = &self.config_path {
                    self.config_text = crate::config::read_text(p).unwrap_or_default();
                }
                error!(
                    "reload ({why}) rejected, plan generation {} stays in force: {}",
                    self.generation,
                    one_line(&e)
                );
                return;
            }
        };
        if topology.config().select_server(Some(&self.server)).is_err() {
            self.reloads_failed += 1;
            self.retry = None;
            self.config_text = text;
            error!(
                "reload ({why}) rejected: server {:?} is no longer in the config",
                self.server
            );
            return;
        }
        if let Err(e) = self.fixed_at_start(&topology) {
            self.reloads_failed += 1;
            self.retry = None;
            self.config_text = text;
            error!(
                "reload ({why}) rejected, plan generation {} stays in force: {e}",
                self.generation
            );
            return;
        }
        let _ = self.switch(text, topology, why);
    }

    /// What a running agent cannot follow in its own server's entry: the uplink (the programs
    /// are attached to it) and the fabric address (in `LOCAL`: the tunnels' source, what peers
    /// know it by, the probes' socket). Err names the change; a restart applies it.
    fn fixed_at_start(&self, t: &Topology) -> Result<(), String> {
        let me = Some(self.server.as_str());
        let (Ok(now), Ok(new)) = (
            self.topology.config().select_server(me),
            t.config().select_server(me),
        ) else {
            return Ok(()); // presence is checked by the callers
        };
        if new.uplink != now.uplink {
            return Err(format!(
                "servers.{}.uplink changed from {:?} to {:?}: the programs are attached to {:?}; \
                 restart the agent to move them",
                self.server, now.uplink, new.uplink, now.uplink
            ));
        }
        if new.fabric != now.fabric {
            return Err(format!(
                "servers.{}.fabric changed from {} to {}: tunnels and probes run from {}; \
                 restart the agent to take the new address",
                self.server, now.fabric, new.fabric, now.fabric
            ));
        }
        Ok(())
    }

    /// Applies a validated topology as a difference; on a failed write, restores the previous
    /// plan and schedules a retry (once per change, then with a growing delay).
    fn switch(&mut self, text: String, topology: Topology, why: &str) -> Result<(), String> {
        let previous = std::mem::replace(&mut self.topology, topology);
        let fresh_text = text != self.config_text;
        match self.replan(why) {
            Ok(()) => {
                self.reloads_ok += 1;
                self.config_text = text;
                self.retry = None;
                Ok(())
            }
            Err(e) => {
                self.reloads_failed += 1;
                let delay = backoff(self.retry.filter(|_| !fresh_text).map(|(_, d)| d));
                self.retry = Some((std::time::Instant::now() + delay, delay));
                self.config_text = text;
                error!(
                    "reload ({why}) failed while writing maps: {e}; generation {} stays in force (the switch did not happen); trying again in {delay:?}",
                    self.generation
                );
                self.topology = previous;
                self.plan_in_force();
                Err(e)
            }
        }
    }

    /// After a switch that did not happen: the plan (and its hash and watched peers) of the
    /// topology and peers down that are still in force.
    fn plan_in_force(&mut self) {
        self.plan = plan::plan_with(&self.topology, &self.server, &self.down);
        self.plan_hash = plan::plan_hash(&self.topology, &self.plan);
        self.watch_peers();
    }

    /// Plans the topology in force around `self.down` and switches to it; on failure the plan
    /// in force is untouched (the caller restores what it changed).
    fn replan(&mut self, why: &str) -> Result<(), String> {
        self.plan = plan::plan_with(&self.topology, &self.server, &self.down);
        let d = self.write_plan().map_err(|e| format!("{e:#}"))?;
        self.generation += 1;
        info!(
            "reload ({why}): plan generation {}: {} entries; maps: {} added, {} updated, {} removed",
            self.generation,
            self.plan.entries.len(),
            d.added,
            d.updated,
            d.removed
        );
        Ok(())
    }

    /// A plan that failed to be written, due to be tried again: the file is read again; in
    /// fleet mode, the text that failed.
    pub fn retry_now(&mut self) {
        if self.fleet.is_none() {
            return self.reload("retrying the plan that failed to be written");
        }
        let Some(p) = self.pending.clone() else {
            return;
        };
        let Ok(topology) = Config::parse(&p.text, "the published topology")
            .map_err(anyhow::Error::from)
            .and_then(|c| Ok(validate::validate(&c)?))
        else {
            // (Validated when it was taken in: not a text to try again every second.)
            self.retry = None;
            return;
        };
        if self
            .switch(p.text.clone(), topology, "retrying the published revision")
            .is_ok()
        {
            self.applied(&p);
        }
    }

    /// Fleet mode: what the etcd task reports.
    pub fn fleet_event(&mut self, event: crate::fleet::watch::Event) {
        use crate::fleet::watch::Event;
        let Some(f) = self.fleet.as_mut() else {
            return;
        };
        match event {
            Event::Connected(url) => {
                f.member.connected(url);
            }
            Event::Lost(why) => {
                f.member.lost();
                if f.connected {
                    let since = crate::fleet::unix_now();
                    f.stale_since.get_or_insert(since);
                    warn!(
                        "etcd connection lost ({why}): plan at revision {} kept and forwarding; it may be stale since {}; reconnecting",
                        f.applied_revision,
                        crate::fleet::rfc3339(since)
                    );
                }
                f.connected = false;
                // Our own etcd is away: peers' leases say nothing now; probes decide alone.
                self.leases(None);
            }
            Event::Leases(present) => self.leases(Some(&present)),
            Event::Fenced(fenced) => self.fence(fenced),
            Event::LeasesUnknown => self.leases(None),
            Event::StatusRefused(why) => {
                if f.status_refused.as_deref() != Some(why.as_str()) {
                    error!(
                        "etcd refuses a key of this agent's ({why}): the topology is still read and applied, but fleet status or its peers (the alive key: they go by probes alone) will not see this server; check the identity (--etcd-tls) matches --server and that `fleet init` ran with this version"
                    );
                    f.status_refused = Some(why);
                }
            }
            Event::Nothing => {
                f.connected = true;
                f.stale_since = None;
                if f.seen_revision != 0 {
                    warn!(
                        "nothing is published under the prefix any more (the topology was deleted): plan at revision {} kept",
                        f.applied_revision
                    );
                }
                f.seen_revision = 0;
            }
            Event::Published(p) => {
                f.connected = true;
                if let Some(since) = f.stale_since.take() {
                    info!(
                        "etcd reachable again after {} s; published revision {}",
                        crate::fleet::unix_now().saturating_sub(since),
                        p.revision
                    );
                }
                self.apply_published(p);
            }
        }
    }

    /// Takes this server out of new connections from its peers (its programs answer probes
    /// "fenced") while its lease cannot be renewed, or back in.
    pub fn fence(&mut self, fenced: bool) {
        if let Some(f) = self.fleet.as_mut() {
            f.fenced = fenced;
        }
        if fenced {
            warn!(
                "lease not renewed for {:.0} % of its time to live: fenced (probes are answered \"fenced\": peers take no new connections here and reset the connections they forwarded here once they confirm it)",
                crate::fleet::watch::FENCE_AFTER * 100.0
            );
        } else {
            info!("lease renewed: no longer fenced");
        }
        let Some(dp) = self.dp.as_mut() else {
            return;
        };
        if let Err(e) = dp.maps.set_fenced(fenced) {
            warn!("writing the fence flag: {e}");
        }
    }

    /// Validates and applies a published revision (each revision is handled once: a rejected
    /// one is logged and counted once, the last good plan staying in force).
    fn apply_published(&mut self, p: crate::fleet::Published) {
        let Some(f) = self.fleet.as_mut() else {
            return;
        };
        if p.revision == f.seen_revision {
            if p.revision == f.applied_revision {
                f.updated_at = crate::fleet::unix_now();
            }
            return;
        }
        f.seen_revision = p.revision;
        // A newer revision supersedes one that failed to be written and waits for a retry:
        // valid, it is applied now; invalid, the plan in force stays and nothing older comes
        // back behind the operator's back.
        self.pending = None;
        self.retry = None;
        let why = format!("published revision {}", p.revision);
        let checked = Config::parse(&p.text, "the published topology")
            .map_err(anyhow::Error::from)
            .and_then(|c| Ok(validate::validate(&c)?))
            .and_then(|t| {
                t.config()
                    .select_server(Some(&self.server))
                    .map_err(|_| anyhow::anyhow!("server {:?} is not in it", self.server))?;
                self.fixed_at_start(&t).map_err(anyhow::Error::msg)?;
                Ok(t)
            });
        let topology = match checked {
            Ok(t) => t,
            Err(e) => {
                let msg = one_line(&e);
                error!(
                    "{why} rejected, plan generation {} (revision {}) stays in force: {msg}",
                    self.generation,
                    self.fleet.as_ref().map_or(0, |f| f.applied_revision)
                );
                if let Some(f) = self.fleet.as_mut() {
                    f.rejected_revisions += 1;
                    f.rejected = Some(format!("revision {}: {msg}", p.revision));
                }
                return;
            }
        };
        self.pending = Some(p.clone());
        if self.switch(p.text.clone(), topology, &why).is_ok() {
            self.applied(&p);
        }
    }

    fn applied(&mut self, p: &crate::fleet::Published) {
        self.pending = None;
        if let Some(f) = self.fleet.as_mut() {
            f.applied_revision = p.revision;
            f.applied_serial = p.meta.as_ref().map_or(0, |m| m.serial);
            f.rejected = None;
            f.updated_at = crate::fleet::unix_now();
        }
    }

    /// Starts probing this server's next hops (a thread of its own); returns the channel that
    /// says when some peer went down or up. None without a dataplane.
    pub fn start_liveness(
        &mut self,
        hold_down: std::time::Duration,
        renewals: Option<crate::fleet::watch::Renewals>,
    ) -> anyhow::Result<Option<tokio::sync::mpsc::UnboundedReceiver<()>>> {
        if self.dp.is_none() {
            return Ok(None);
        }
        let fabric = self
            .topology
            .config()
            .select_server(Some(&self.server))?
            .fabric;
        let prober = crate::liveness::Prober::open(fabric)
            .with_context(|| format!("opening the probe socket on {fabric}"))?;
        let shared: crate::liveness::Shared = std::sync::Arc::new(std::sync::Mutex::new(
            crate::liveness::Liveness::new(hold_down),
        ));
        self.liveness = Some(shared.clone());
        self.watch_peers();
        self.flush_interest();
        let inherited: std::collections::BTreeSet<Ipv4Addr> = self
            .topology
            .config()
            .servers
            .iter()
            .filter(|s| self.down.contains_key(&s.name))
            .map(|s| s.fabric)
            .collect();
        shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .inherit_down(&inherited, std::time::Instant::now());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        crate::liveness::spawn(prober, shared, tx, renewals)?;
        Ok(Some(rx))
    }

    /// The peers whose liveness matters here: every next hop the plan would use with everyone
    /// up, those it uses now (the next tier), the owners of the shares of the addresses this
    /// server holds (where soft-unicast goes), and every peer down now.
    fn peers_to_watch(&self) -> BTreeMap<Ipv4Addr, String> {
        let mut peers = BTreeMap::new();
        let all_up = plan::plan(&self.topology, &self.server);
        for e in all_up.entries.iter().chain(&self.plan.entries) {
            for h in &e.next_hops {
                peers.insert(h.fabric, h.server.clone());
            }
        }
        let fabric_of: BTreeMap<&str, Ipv4Addr> = self
            .topology
            .config()
            .servers
            .iter()
            .map(|s| (s.name.as_str(), s.fabric))
            .collect();
        // A peer down now stays watched until its own signals bring it back. Dropped (no plan
        // needs it now: say its pool became unreachable because it is down), it would come back
        // as a fresh peer, up, with its lease never seen.
        for name in self.down.keys() {
            if let Some(f) = fabric_of.get(name.as_str()) {
                peers.insert(*f, name.clone());
            }
        }
        for pool in self.topology.pools().values() {
            let mine: std::collections::BTreeSet<Ipv4Addr> = pool
                .shares
                .iter()
                .filter(|s| s.server == self.server)
                .map(|s| s.address)
                .collect();
            for s in pool
                .shares
                .iter()
                .filter(|s| mine.contains(&s.address) && s.server != self.server)
            {
                if let Some(f) = fabric_of.get(s.server.as_str()) {
                    peers.insert(*f, s.server.clone());
                }
            }
        }
        peers
    }

    /// Tells the prober which peers to watch (after every plan change), and keeps them for the
    /// etcd thread ([`Agent::flush_interest`]).
    fn watch_peers(&mut self) {
        let peers = self.peers_to_watch();
        if let Some(l) = &self.liveness {
            l.lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_peers(&peers);
        }
        // Without a dataplane nothing is probed: no lease to watch either.
        if self.interest.is_some() && self.liveness.is_some() {
            self.interest_due = Some(peers.into_values().collect());
        }
    }

    /// Hands the peers to watch to the etcd thread. The agent's loop calls this after it has
    /// sent its status: the etcd thread then writes the status of a new plan before it reads
    /// and watches the new peers' leases (a transaction and a watch, round trips a status
    /// would otherwise wait behind).
    pub fn flush_interest(&mut self) {
        let (Some(i), Some(names)) = (&self.interest, self.interest_due.take()) else {
            return;
        };
        // Sent even when the names are the same: set_peers may have dropped and re-added a
        // peer (a switch that failed restores the plan in force), which then starts with its
        // lease unknown until the etcd thread tells it again.
        i.send_replace(names);
    }

    /// The peers' leases as etcd says now (None: unknown, our etcd is away).
    pub fn leases(&mut self, present: Option<&std::collections::BTreeSet<String>>) {
        let Some(l) = &self.liveness else { return };
        let changed = {
            let mut l = l.lock().unwrap_or_else(|e| e.into_inner());
            l.leases(present);
            // Between the prober's rounds: their probes in flight are not overdue.
            !l.evaluate_in_round(std::time::Instant::now()).is_empty()
        };
        if changed {
            self.liveness_changed();
        }
    }

    /// Some peer went down or came back: plans anew around the peers down (a switch like a
    /// reload's), and removes the connections of peers that just died.
    pub fn liveness_changed(&mut self) {
        let Some(l) = &self.liveness else { return };
        let down = l.lock().unwrap_or_else(|e| e.into_inner()).down();
        if down == self.down
            || self
                .liveness_retry_at
                .is_some_and(|(at, _)| std::time::Instant::now() < at)
        {
            return;
        }
        let lost = crate::liveness::why::LOST;
        let died: Vec<String> = down
            .iter()
            .filter(|(n, f)| **f & lost != 0 && self.down.get(*n).is_none_or(|o| o & lost == 0))
            .map(|(n, _)| n.clone())
            .collect();
        let said: Vec<String> = down
            .iter()
            .map(|(n, f)| format!("{n} ({})", crate::liveness::why::words(*f)))
            .collect();
        let back: Vec<&String> = self
            .down
            .keys()
            .filter(|n| !down.contains_key(*n))
            .collect();
        let why = format!(
            "liveness: down {}{}",
            if said.is_empty() {
                "none".into()
            } else {
                said.join(", ")
            },
            if back.is_empty() {
                String::new()
            } else {
                format!(
                    "; back: {}",
                    back.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        // The topology in force, re-planned: the config text and a pending reload's retry are
        // not this change's (a liveness switch never stands for a config).
        let previous = std::mem::replace(&mut self.down, down);
        if let Err(e) = self.replan(&why) {
            // Not switched: the plan in force still reflects `previous`; a check after the
            // delay tries again (5 s, doubling to 5 min, as a reload's retries).
            let delay = backoff(self.liveness_retry_at.map(|(_, d)| d));
            self.reloads_failed += 1;
            error!("{why}: writing the plan failed: {e}; trying again in {delay:?}");
            self.liveness_retry_at = Some((std::time::Instant::now() + delay, delay));
            self.down = previous;
            self.plan_in_force();
            return;
        }
        self.liveness_retry_at = None;
        // Their translation state died with them: their connections must not hang.
        let Some(dp) = self.dp.as_mut() else { return };
        let dead: Vec<(String, [u8; 4])> = died
            .into_iter()
            .filter_map(|name| {
                let fabric = self
                    .topology
                    .config()
                    .select_server(Some(&name))
                    .ok()?
                    .fabric;
                Some((name, fabric.octets()))
            })
            .collect();
        if dead.is_empty() {
            return;
        }
        let fabrics: Vec<[u8; 4]> = dead.iter().map(|(_, f)| *f).collect();
        let gone = match flows::remove_peers(&mut dp.maps.flows, &fabrics) {
            Ok(g) => g,
            Err(e) => {
                let names: Vec<&str> = dead.iter().map(|(n, _)| n.as_str()).collect();
                warn!("removing the connections through {}: {e}", names.join(", "));
                return;
            }
        };
        for ((name, _), gone) in dead.iter().zip(gone) {
            // Local sockets of forwarded TCP connections are aborted at once (a downloading
            // client would otherwise wait on a peer that is gone).
            let aborted = gone
                .iter()
                .filter(|(_, v)| v.kind == egress_common::flow::FLOW_FORWARDED)
                .filter(|(k, _)| crate::liveness::abort_socket(k).unwrap_or(false))
                .count();
            self.peer_resets += gone.len() as u64;
            if !gone.is_empty() {
                warn!(
                    "{name} died: removed {} connections through it; {aborted} local sockets aborted (ECONNABORTED), the others' next packet starts anew",
                    gone.len()
                );
            }
        }
    }

    /// What this agent reports in its status key.
    pub fn status(&self) -> crate::fleet::Status {
        let f = self.fleet.clone().unwrap_or_default();
        let drops = self
            .counters()
            .unwrap_or_default()
            .iter()
            .filter(|(s, _)| s.name().starts_with("drop_"))
            .map(|(_, c)| c.packets)
            .sum();
        crate::fleet::Status {
            server: self.server.clone(),
            host: crate::fleet::hostname(),
            pid: std::process::id(),
            started_at: self.started_at,
            updated_at: f.updated_at,
            applied_revision: f.applied_revision,
            applied_serial: f.applied_serial,
            plan_hash: self.plan_hash.clone(),
            generation: self.generation,
            rejected_revisions: f.rejected_revisions,
            failed_writes: self.reloads_failed,
            drops,
            dataplane: self.dp.is_some(),
            rejected: f.rejected,
            peers_down: self.down.clone(),
        }
    }

    /// Restores what was removed from under the agent: the pin directory, a map's pin (the
    /// agent still holds every map), a link's pin (the link went with it, so the programs are
    /// attached anew). Without this, a removed pin directory silently detaches the programs
    /// (policy traffic then leaves from the server's own address). Returns what was restored.
    pub fn repair(&mut self) -> Vec<String> {
        let mut fixed = Vec::new();
        let Some(dp) = self.dp.as_mut() else {
            return fixed;
        };
        if !self.pin_dir.exists() {
            if let Err(e) = std::fs::create_dir_all(&self.pin_dir) {
                warn!("recreating {}: {e}", self.pin_dir.display());
                dp.attached = false;
                return fixed;
            }
            fixed.push(format!("pin directory {}", self.pin_dir.display()));
        }
        for name in map_names::ALL {
            let path = self.pin_dir.join(name);
            if path.exists() {
                continue;
            }
            let pinned = match dp.maps.data(name) {
                Some(d) => d.pin(&path).map_err(|e| e.to_string()),
                None => dp
                    .ebpf
                    .map(name)
                    .ok_or_else(|| "not in the object".to_string())
                    .and_then(|m| m.pin(&path).map_err(|e| e.to_string())),
            };
            match pinned {
                Ok(()) => fixed.push(format!("map {name}")),
                Err(e) => warn!("re-pinning map {name}: {e}"),
            }
        }
        // A link whose pin went is still held here (the agent keeps a descriptor of each): it
        // stays attached and is pinned again, with no moment detached.
        for (name, held) in dp.links.iter_mut() {
            let path = loader::link_pin(&self.pin_dir, name);
            if path.exists() {
                continue;
            }
            let Some(link) = held.take() else { continue };
            match aya::programs::links::FdLink::from(link).pin(&path) {
                Ok(p) => {
                    *held = Some(p);
                    fixed.push(format!("link {}", path.display()));
                }
                Err(e) => warn!("re-pinning {}: {e}", path.display()),
            }
        }
        let links_gone = dp.tcx
            && loader::PROGRAMS
                .iter()
                .any(|(name, _)| !loader::link_pin(&self.pin_dir, name).exists());
        if links_gone {
            match loader::attach(&mut dp.ebpf, &dp.uplink, &self.pin_dir) {
                Ok(_) => {
                    dp.hold_links(&self.pin_dir);
                    fixed.push(format!("programs on {}", dp.uplink))
                }
                Err(e) => {
                    error!("re-attaching the programs to {}: {e:#}", dp.uplink);
                    dp.attached = false;
                    return fixed;
                }
            }
        }
        dp.attached = true;
        if !fixed.is_empty() {
            self.repairs += 1;
            warn!(
                "repaired: {} had been removed; restored (maps and flows kept)",
                fixed.join(", ")
            );
        }
        fixed
    }

    /// One housekeeping pass on the agent's own thread (at start; the loop runs them on the
    /// collector thread, see [`Agent::housekeeper`]).
    pub fn housekeeping(&mut self) {
        let Some(dp) = self.dp.as_mut() else {
            return;
        };
        let before = loader::read_peer_load(&dp.maps.peer_load);
        let writes = self.plan_writes.load(std::sync::atomic::Ordering::SeqCst);
        let pass = flows::pass(
            &mut dp.maps.flows,
            flows::monotonic_ns(),
            self.flow_capacity,
        )
        .map_err(|e| e.to_string())
        .and_then(|mut p| {
            p.plan_writes = writes;
            loader::write_peer_load(&mut dp.maps.peer_load, &p.peer_load, &before)
                .map_err(|e| e.to_string())?;
            Ok(p)
        });
        self.apply_pass(pass);
    }

    /// Narrows the pass filter to the plan in force and the destinations `p` read, unless a
    /// plan was written since `p` began reading: an entry made under the plan before that
    /// write, after the read passed its place, would be missing from `p` (the next pass will
    /// see it).
    fn refine_filter(&mut self, p: &flows::Pass) {
        let Some(dp) = self.dp.as_mut() else {
            return;
        };
        if p.plan_writes != self.plan_writes.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let mut maybe = match &self.plan_buckets {
            Some(b) => b.clone(),
            None => match dp.maps.plan.in_force() {
                Ok(c) => crate::filter::Buckets::of_plan(&c),
                Err(e) => {
                    warn!("reading the plan in force for the pass filter: {e}");
                    return;
                }
            },
        };
        maybe.union(&p.destinations);
        let filter = &mut dp.maps.plan.filter;
        match filter.refine(&maybe).and_then(|_| filter.passing()) {
            Ok(n) => self.observed.pass_filter = n,
            Err(e) => warn!("writing the pass filter ({}): {e}", map_names::PASS_FILTER),
        }
    }

    /// A collector with handles of its own on the flow table and `PEER_LOAD`, to run passes
    /// off the agent's loop (a pass over a million entries takes a while; the loop must not).
    pub fn housekeeper(&self) -> anyhow::Result<Option<Housekeeper>> {
        let Some(dp) = self.dp.as_ref() else {
            return Ok(None);
        };
        use aya::maps::IterableMap as _;
        use std::os::fd::AsFd as _;
        let dup = |m: &MapData| -> anyhow::Result<MapData> {
            Ok(MapData::from_fd(m.fd().as_fd().try_clone_to_owned()?)?)
        };
        Ok(Some(Housekeeper {
            flows: HashMap::try_from(aya::maps::Map::HashMap(dup(dp.maps.flows.map())?))?,
            peer_load: HashMap::try_from(aya::maps::Map::HashMap(dup(dp.maps.peer_load.map())?))?,
            capacity: self.flow_capacity,
            plan_writes: self.plan_writes.clone(),
        }))
    }

    /// Takes in what a pass found: counts, logs pressure changes, refreshes port-slice usage
    /// (warning once when a slice passes 80 %).
    pub fn apply_pass(&mut self, pass: Result<flows::Pass, String>) {
        let p = match pass {
            Ok(p) => p,
            Err(e) => {
                warn!("collecting expired flows: {e}");
                return;
            }
        };
        self.refine_filter(&p);
        let done = p.collected;
        self.observed.collected += done.expired as u64;
        self.observed.early_dropped += done.early_dropped as u64;
        self.observed.pass_seconds = p.took.as_secs_f64();
        if done.expired > 0 {
            info!("collected {} expired connections", done.expired);
        }
        let pressure = flows::under_pressure(done.entries, self.flow_capacity);
        if pressure && !self.observed.pressure {
            warn!(
                "flow table under pressure: {} of {} entries; unreplied connections are dropped early ({} now), new ones refused when full (drop_flow_table_full)",
                done.entries, self.flow_capacity, done.early_dropped
            );
        } else if !pressure && self.observed.pressure {
            info!(
                "flow table pressure over: {} of {} entries",
                done.entries, self.flow_capacity
            );
        }
        self.observed.pressure = pressure;
        let mut slices = Vec::new();
        for e in self
            .plan
            .entries
            .iter()
            .filter(|e| e.family == plan::Family::Ipv4)
        {
            for s in &e.snat {
                let std::net::IpAddr::V4(address) = s.address else {
                    continue;
                };
                let used = p
                    .in_use
                    .get(&address.octets())
                    .map_or(0, |ports| ports.count_in(s.ports[0], s.ports[1]));
                slices.push(SliceUsage {
                    address,
                    first: s.ports[0],
                    last: s.ports[1],
                    used,
                });
            }
        }
        for s in &slices {
            let key = (s.address, s.first);
            let share = f64::from(s.used) / f64::from(s.size());
            if share > SLICE_WARN && self.warned_slices.insert(key) {
                warn!(
                    "port slice {} {}-{} is {:.0}% used ({} of {} ports)",
                    s.address,
                    s.first,
                    s.last,
                    share * 100.0,
                    s.used,
                    s.size()
                );
            } else if share <= SLICE_WARN {
                self.warned_slices.remove(&key);
            }
        }
        self.observed.entries = p.by_kind;
        self.observed.slices = slices;
        self.observed.peer_load = p.peer_load;
    }

    /// Reads every datapath counter (packets, bytes), summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<Vec<(Stat, Counter)>> {
        let Some(dp) = self.dp.as_ref() else {
            return Ok(Vec::new());
        };
        let map = dp.ebpf.map(map_names::STATS).context("STATS map")?;
        let arr: PerCpuArray<_, Counter> = PerCpuArray::try_from(map)?;
        Stat::ALL
            .iter()
            .map(|&s| Ok((s, crate::stats::total(&arr, s)?)))
            .collect()
    }

    /// Prometheus text exposition of everything the agent knows (the metrics are registered
    /// at the first call, once).
    pub fn render_metrics(&self) -> anyhow::Result<String> {
        self.metrics
            .get_or_init(|| metrics::Metrics::new(self.fleet.is_some()))
            .render(self)
    }

    /// Exits: with `detach`, removes the pinned links (the programs detach) and maps.
    pub fn shutdown(self, detach: bool) -> anyhow::Result<()> {
        let pin_dir = self.pin_dir.clone();
        if self.dp.is_none() {
            info!("exiting (no dataplane)");
            return Ok(());
        }
        if detach {
            // Still holding the locks: no other agent can adopt the pins as they go.
            let removed = loader::detach(&pin_dir)
                .with_context(|| format!("removing {}", pin_dir.display()))?;
            drop(self);
            info!(
                "detached: removed {} pins in {}",
                removed.len(),
                pin_dir.display()
            );
        } else {
            drop(self);
            info!(
                "exiting; programs stay attached and maps pinned in {} (egress detach removes them)",
                pin_dir.display()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// Plan writes that keep failing (a reload's, a liveness switch's) are tried again after
    /// 5 s, then twice as long each time, never more than 5 min apart.
    #[test]
    fn failed_plan_writes_back_off_from_5_s_to_5_min() {
        let mut d = None;
        let mut seen = Vec::new();
        for _ in 0..9 {
            let next = super::backoff(d);
            seen.push(next.as_secs());
            d = Some(next);
        }
        assert_eq!(seen, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(super::backoff(None), Duration::from_secs(5));
    }
}
