//! Loading the BPF object, pinning its maps, attaching the TC programs to an interface.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, ProgramArray, lpm_trie::LpmTrie},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
    util::KernelVersion,
};
use egress_common::{
    action::{Action, ActionKey},
    fabric::{AddrKey, Local, Owners, Peer},
    flow::{FlowKey, FlowValue},
    map_names,
    policy::{PeerPolicyKey, PolicyKeyV4, PolicyKeyV6, PolicyValue},
    prog_names,
};

use crate::apply::PlanTables;

/// The compiled programs, built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress"));

/// The compiled BPF object (for tools that load it their own way, such as the benchmarks).
pub fn object() -> &'static [u8] {
    EBPF_OBJECT
}

/// Where maps are pinned when `--pin-dir` is not given.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/egress";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("must run as root (loading BPF programs needs CAP_BPF and CAP_NET_ADMIN)")]
    NotRoot,
    #[error(
        "interface {iface:?} does not exist in this network namespace (it is the uplink of server {server:?} in the config)"
    )]
    NoInterface { iface: String, server: String },
    /// The probes are sent from (and answered to) the server's fabric address.
    #[error(
        "{addr} (the fabric address of server {server:?} in the config) is not an address of this host (network namespace): is --server right?"
    )]
    NotLocal {
        addr: std::net::Ipv4Addr,
        server: String,
    },
    /// The uplink's MTU decides the tunnel MSS: never guessed.
    #[error("reading the MTU of {iface:?} (it sizes the tunnel's MSS clamp): {source}")]
    Mtu {
        iface: String,
        source: std::io::Error,
    },
    #[error(
        "{dir} is not on a bpf filesystem (is bpffs mounted? `mount -t bpf bpf /sys/fs/bpf`, which `cargo xtask setup` does)"
    )]
    NoBpffs { dir: String },
    #[error("cannot create pin directory {dir}: {source}")]
    PinDir { dir: String, source: std::io::Error },
    #[error(
        "another agent ({holder}) is running on {what} (lock {lock}): stop it first; two agents would write each other's plans and programs"
    )]
    Locked {
        what: String,
        holder: String,
        lock: String,
    },
    #[error("cannot take the agent lock {lock}: {source}")]
    Lock {
        lock: String,
        source: std::io::Error,
    },
    #[error("loading the BPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("map {name} is missing from the BPF object")]
    MissingMap { name: &'static str },
    #[error(
        "pinned map {name} ({path}) has another layout than these programs expect: pinned {pinned}, expected {expected}; `egress agent --migrate` recreates it (flow entries are carried over when their key and value sizes match), or `egress detach` first (live connections lose their translation)"
    )]
    Layout {
        name: String,
        path: String,
        pinned: Layout,
        expected: Layout,
    },
    #[error("the BPF object's map definitions cannot be read")]
    Object(#[source] aya_obj::ParseError),
    #[error("the BPF object: {0}")]
    ObjectShape(String),
    #[error("pinned map {path}")]
    PinnedMap {
        path: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("migration: {0}")]
    Migrate(String),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("program {name} is missing from the BPF object")]
    MissingProgram { name: &'static str },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("pinned link {path}")]
    Link {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    #[error("attaching {name} to {iface}: {source}")]
    Attach {
        name: &'static str,
        iface: String,
        source: aya::programs::ProgramError,
    },
}

/// `PEER_LOAD` as it stands (before a recount: what the programs count meanwhile is kept).
pub fn read_peer_load(
    map: &HashMap<MapData, [u8; 4], u64>,
) -> std::collections::BTreeMap<[u8; 4], u64> {
    map.iter().filter_map(Result::ok).collect()
}

/// Writes the per-peer connection counts recounted from the flow table into `PEER_LOAD`, plus
/// what the programs counted since `before` was read (the recount's snapshot cannot see those
/// claims); peers with none are removed.
pub fn write_peer_load(
    map: &mut HashMap<MapData, [u8; 4], u64>,
    load: &std::collections::BTreeMap<std::net::Ipv4Addr, u64>,
    before: &std::collections::BTreeMap<[u8; 4], u64>,
) -> Result<(), LoadError> {
    let bad = |source| LoadError::Map {
        name: map_names::PEER_LOAD,
        source,
    };
    // Peers without connections in the snapshot: what the programs counted since stays.
    let stale: Vec<([u8; 4], u64)> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| !load.contains_key(&std::net::Ipv4Addr::from(*k)))
        .collect();
    for (k, now) in stale {
        let since = now.saturating_sub(before.get(&k).copied().unwrap_or(0));
        if since == 0 {
            // Gone meanwhile is fine.
            let _ = map.remove(&k);
        } else {
            map.insert(k, since, 0).map_err(bad)?;
        }
    }
    for (peer, n) in load {
        let key = peer.octets();
        let since = map
            .get(&key, 0)
            .unwrap_or(0)
            .saturating_sub(before.get(&key).copied().unwrap_or(0));
        map.insert(key, n + since, 0).map_err(bad)?;
    }
    Ok(())
}

/// What the kernel must have for a map the programs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// BPF_MAP_TYPE_*.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.map_type {
            1 => "hash".to_string(),
            2 => "array".to_string(),
            3 => "prog_array".to_string(),
            6 => "percpu_array".to_string(),
            9 => "lru_hash".to_string(),
            11 => "lpm_trie".to_string(),
            t => format!("type {t}"),
        };
        write!(
            f,
            "{kind}, key {} B, value {} B, {} entries, flags {:#x}",
            self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// The layout of every map, as the object file defines it (`FLOWS` with `flow_capacity`).
pub fn expected_layouts(
    flow_capacity: u32,
) -> Result<std::collections::BTreeMap<String, Layout>, LoadError> {
    let obj = aya_obj::Object::parse(EBPF_OBJECT).map_err(LoadError::Object)?;
    Ok(obj
        .maps
        .iter()
        .filter(|(name, _)| map_names::ALL.contains(&name.as_str()))
        .map(|(name, m)| {
            let max_entries = if name == map_names::FLOWS {
                flow_capacity
            } else {
                m.max_entries()
            };
            (
                name.clone(),
                Layout {
                    map_type: m.map_type(),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries,
                    flags: m.map_flags(),
                },
            )
        })
        .collect())
}

/// The layout of the map pinned at `path`, if there is one.
fn pinned_layout(path: &Path) -> Result<Option<Layout>, LoadError> {
    if !path.exists() {
        return Ok(None);
    }
    let bad = |source| LoadError::PinnedMap {
        path: path.display().to_string(),
        source,
    };
    let info = MapData::from_pin(path).map_err(bad)?.info().map_err(bad)?;
    Ok(Some(Layout {
        map_type: info.map_type().map_err(bad)? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    }))
}

/// A pinned map the programs cannot use as it is.
#[derive(Debug, Clone)]
pub struct Mismatch {
    pub name: String,
    pub path: PathBuf,
    pub pinned: Layout,
    pub expected: Layout,
}

impl Mismatch {
    /// The refusal naming the map and both layouts.
    pub fn error(&self) -> LoadError {
        LoadError::Layout {
            name: self.name.clone(),
            path: self.path.display().to_string(),
            pinned: self.pinned,
            expected: self.expected,
        }
    }
}

/// Every map pinned under `pin_dir` whose layout differs from what the programs expect. A
/// flow table of another capacity is not a mismatch: it is kept (its capacity is the kernel's).
pub fn check_pins(pin_dir: &Path, flow_capacity: u32) -> Result<Vec<Mismatch>, LoadError> {
    let mut out = Vec::new();
    for (name, expected) in expected_layouts(flow_capacity)? {
        let path = pin_dir.join(&name);
        let Some(pinned) = pinned_layout(&path)? else {
            continue;
        };
        let same = if name == map_names::FLOWS {
            Layout {
                max_entries: expected.max_entries,
                ..pinned
            } == expected
        } else {
            pinned == expected
        };
        if !same {
            out.push(Mismatch {
                name,
                path,
                pinned,
                expected,
            });
        }
    }
    Ok(out)
}

/// Flow entries read out of a pinned flow table that is about to be recreated.
pub type SavedFlows = Vec<(FlowKey, FlowValue)>;

/// Sets every mismatched map aside (pinned again as `<name>_pre_migrate`, removed by the caller
/// once the new programs are attached; left in place if anything fails) so that loading creates
/// it anew. Returns the flow entries of an old flow table whose key and value sizes match, to be
/// written into the new one, and the pins set aside. Carried entries count as replied and not
/// reset: older versions did not record replies, and an idle connection must not be collected
/// as unreplied after the upgrade.
pub fn migrate(mismatches: &[Mismatch]) -> Result<(SavedFlows, Vec<PathBuf>), LoadError> {
    let mut saved = Vec::new();
    let mut aside = Vec::new();
    for m in mismatches {
        let same_entries = m.pinned.key_size == m.expected.key_size
            && m.pinned.value_size == m.expected.value_size;
        if m.name == map_names::FLOWS && same_entries {
            saved.extend(read_old_flows(&m.path, m.pinned.map_type)?);
        }
        // bpffs cannot rename: pin the same map under the new name, then drop the old pin.
        // bpffs names may not hold a dot.
        let to = m.path.with_file_name(format!("{}_pre_migrate", m.name));
        let bad = |e: String| {
            LoadError::Migrate(format!(
                "setting {} aside as {}: {e}",
                m.path.display(),
                to.display()
            ))
        };
        let _ = std::fs::remove_file(&to);
        MapData::from_pin(&m.path)
            .map_err(|e| bad(e.to_string()))?
            .pin(&to)
            .map_err(|e| bad(e.to_string()))?;
        std::fs::remove_file(&m.path).map_err(|e| bad(e.to_string()))?;
        aside.push(to);
    }
    Ok((saved, aside))
}

/// The entries of an older flow table pinned at `path` (BPF map type `map_type`), as a
/// migration carries them: replied, not reset (older versions did not record replies, and an
/// idle connection must not be collected as unreplied after the upgrade).
fn read_old_flows(path: &Path, map_type: u32) -> Result<SavedFlows, LoadError> {
    let bad = |source| LoadError::PinnedMap {
        path: path.display().to_string(),
        source,
    };
    let data = MapData::from_pin(path).map_err(bad)?;
    let map = match map_type {
        9 => aya::maps::Map::LruHashMap(data),
        _ => aya::maps::Map::HashMap(data),
    };
    let flows: HashMap<MapData, FlowKey, FlowValue> = HashMap::try_from(map).map_err(bad)?;
    Ok(flows
        .iter()
        .filter_map(Result::ok)
        .map(|(k, mut v)| {
            v.flags =
                (v.flags | egress_common::flow::FLOW_F_REPLIED) & !egress_common::flow::FLOW_F_RST;
            (k, v)
        })
        .collect())
}

/// What a migration that did not finish left in `pin_dir` (it set maps aside as
/// `<name>_pre_migrate`, then failed before the new programs were attached — a verifier
/// refusal, memory for the new table): the flow entries of the old flow table set aside (when
/// their layout is the programs'), to be carried into the table as a migration's are, and every
/// pin set aside, to be removed once the programs are attached. Without this a restart would
/// find no mismatch left and start on an empty table.
pub fn unfinished_migration(pin_dir: &Path) -> Result<(SavedFlows, Vec<PathBuf>), LoadError> {
    let (mut saved, mut aside) = (Vec::new(), Vec::new());
    let Ok(dir) = std::fs::read_dir(pin_dir) else {
        return Ok((saved, aside));
    };
    for entry in dir.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(original) = name.strip_suffix("_pre_migrate") else {
            continue;
        };
        if original == map_names::FLOWS
            && let Some(l) = pinned_layout(&path)?
            && l.key_size as usize == std::mem::size_of::<FlowKey>()
            && l.value_size as usize == std::mem::size_of::<FlowValue>()
        {
            saved.extend(read_old_flows(&path, l.map_type)?);
        }
        aside.push(path);
    }
    Ok((saved, aside))
}

/// Refuses while an agent holds `pin_dir` (its maps and links would be restored at once, and
/// the agent would go on with pins another command removed).
pub fn ensure_no_agent(pin_dir: &Path) -> Result<(), LoadError> {
    lock_pins(pin_dir).map(drop)
}

/// The lock of pin directory `pin_dir`: named by its canonical path (see [`pins_lock_name`]),
/// so that every spelling of one directory names the same lock. Where earlier versions named
/// it otherwise (a path with `_` or `%`, or a spelling through a symlink or `..`), their name
/// is taken too: an agent or `egress detach` of this version and an earlier version's agent
/// still exclude each other.
pub fn lock_pins(pin_dir: &Path) -> Result<AgentLock, LoadError> {
    let canonical = canonical(pin_dir);
    let what = if canonical == pin_dir {
        pin_dir.display().to_string()
    } else {
        format!("{} ({})", pin_dir.display(), canonical.display())
    };
    let mut l = lock(&pins_lock_name(pin_dir), &what)?;
    let abs = std::path::absolute(pin_dir).unwrap_or_else(|_| pin_dir.to_path_buf());
    let legacy = abs.to_string_lossy().trim_matches('/').replace('/', "_");
    if legacy != pins_lock_name(pin_dir) {
        l._legacy = Some(lock(&legacy, &what)?._file);
    }
    Ok(l)
}

/// The lock name of pin directory `pin_dir`: its canonical path (absolute, `.` and `..` and
/// symlinks resolved as far as the path exists, the rest taken as written), escaped by
/// [`lock_escape`]. A canonical path without `_` or `%` keeps the name earlier versions gave it.
pub fn pins_lock_name(pin_dir: &Path) -> String {
    lock_escape(canonical(pin_dir).to_string_lossy().trim_matches('/'))
}

/// A lock file name for `s`, one per `s`: `%` written `%25`, `_` written `%5f`, then `/`
/// written `_` (so `/a_b`, `/a/b` and `/a%5fb` all differ).
fn lock_escape(s: &str) -> String {
    s.replace('%', "%25").replace('_', "%5f").replace('/', "_")
}

/// `path` made absolute, with its longest existing prefix canonicalized (symlinks, `.`, `..`)
/// and the rest normalized by its components.
fn canonical(path: &Path) -> PathBuf {
    use std::path::Component;
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut missing = Vec::new();
    let mut existing = abs.as_path();
    let mut out = loop {
        if let Ok(c) = std::fs::canonicalize(existing) {
            break c;
        }
        match (existing.parent(), existing.components().next_back()) {
            (Some(parent), Some(last)) => {
                missing.push(last);
                existing = parent;
            }
            _ => break PathBuf::from("/"),
        }
    };
    for c in missing.into_iter().rev() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name),
            _ => {}
        }
    }
    out
}

/// Fleet mode's lock of server `name` in this network namespace (the host's, as a rule): its
/// etcd keys are one agent's, whatever pin directory another is given.
pub fn lock_server(name: &str) -> Result<AgentLock, LoadError> {
    let netns = netns_inode();
    lock(
        &format!("net{netns}-server-{}", lock_escape(name)),
        &format!("server {name} (network namespace {netns})"),
    )
}

/// The inode of this process's network namespace: names locks per namespace.
fn netns_inode() -> u64 {
    std::fs::metadata("/proc/self/ns/net").map_or(0, |m| std::os::unix::fs::MetadataExt::ino(&m))
}

/// Where agents keep their locks (one per pin directory).
pub const LOCK_DIR: &str = "/run/egress";

/// The exclusive claim of one agent on a pin directory, held until the agent exits (the kernel
/// releases it even after kill -9).
#[derive(Debug)]
pub struct AgentLock {
    _file: std::fs::File,
    /// The same claim under an earlier version's name for it (see [`lock_pins`]).
    _legacy: Option<std::fs::File>,
    pub path: PathBuf,
}

/// The locks an agent takes before it touches anything: its pin directory (the maps; `pins`
/// when already taken — fleet mode takes it before it connects to etcd), and its uplink in
/// this network namespace (the programs; another pin directory does not make a second agent
/// on the same interface harmless). A second agent exits at once, naming the holder.
pub fn lock_all(
    pins: Option<AgentLock>,
    pin_dir: &Path,
    uplink: &str,
) -> Result<[AgentLock; 2], LoadError> {
    let pins = match pins {
        Some(l) => l,
        None => lock_pins(pin_dir)?,
    };
    let netns = netns_inode();
    let link = lock(
        &format!("net{netns}-{uplink}"),
        &format!("interface {uplink} (network namespace {netns})"),
    )?;
    Ok([pins, link])
}

/// Takes lock `name` without waiting; `what` names what it guards in the error.
fn lock(name: &str, what: &str) -> Result<AgentLock, LoadError> {
    use std::io::{Read as _, Seek as _, Write as _};
    let path = Path::new(LOCK_DIR).join(format!("{name}.lock"));
    let fail = |source| LoadError::Lock {
        lock: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(LOCK_DIR).map_err(fail)?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(fail)?;
    // SAFETY: flock on an fd this function owns.
    let rc = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    if rc != 0 {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        return Err(LoadError::Locked {
            what: what.to_string(),
            holder: match holder.trim() {
                "" => "pid unknown".to_string(),
                pid => format!("pid {pid}"),
            },
            lock: path.display().to_string(),
        });
    }
    file.set_len(0).map_err(fail)?;
    file.rewind().map_err(fail)?;
    write!(file, "{}", std::process::id()).map_err(fail)?;
    Ok(AgentLock {
        _file: file,
        _legacy: None,
        path,
    })
}

/// Pin directory for a server: `--pin-dir` if given, else `/sys/fs/bpf/egress/<server>`.
pub fn pin_dir(explicit: Option<&Path>, server: &str) -> PathBuf {
    explicit.map_or_else(
        || Path::new(DEFAULT_PIN_ROOT).join(server),
        Path::to_path_buf,
    )
}

/// Checks what loading needs before touching the kernel, so each failure gets its own message.
pub fn preflight(
    iface: &str,
    fabric: std::net::Ipv4Addr,
    server: &str,
    pin_dir: &Path,
) -> Result<(), LoadError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(LoadError::NotRoot);
    }
    if ifindex(iface).is_none() {
        return Err(LoadError::NoInterface {
            iface: iface.to_string(),
            server: server.to_string(),
        });
    }
    // The nearest existing ancestor of the pin directory must be on bpffs.
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if !is_bpffs(existing) {
        return Err(LoadError::NoBpffs {
            dir: existing.display().to_string(),
        });
    }
    // Binding to an address works only where it is assigned: the prober needs it later, and
    // finding out then would leave maps pinned for a server this host is not.
    if std::net::UdpSocket::bind((fabric, 0)).is_err() {
        return Err(LoadError::NotLocal {
            addr: fabric,
            server: server.to_string(),
        });
    }
    Ok(())
}

fn ifindex(iface: &str) -> Option<u32> {
    let name = CString::new(iface).ok()?;
    // SAFETY: name is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// True when `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct; c is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Loads the object. Maps already pinned under `pin_dir` are adopted (their contents and
/// counters continue); missing ones are created and pinned there. `trace_every`: one decision
/// in this many is logged (0: none; the logging step is then dead code to the verifier).
pub fn load(pin_dir: &Path, flow_capacity: u32, trace_every: u32) -> Result<Ebpf, LoadError> {
    std::fs::create_dir_all(pin_dir).map_err(|source| LoadError::PinDir {
        dir: pin_dir.display().to_string(),
        source,
    })?;
    let key = sent_key();
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(map_names::FLOWS, flow_capacity);
    loader.override_global(prog_names::TRACE_EVERY, &trace_every, true);
    loader.override_global(prog_names::SENT_KEY, &key, true);
    for name in map_names::ALL {
        loader.map_pin_path(name, pin_dir.join(name));
    }
    Ok(loader.load(EBPF_OBJECT)?)
}

/// The plan maps as the kernel holds them.
pub type KernelPlanTables = PlanTables<
    HashMap<MapData, ActionKey, Action>,
    LpmTrie<MapData, PolicyKeyV4, PolicyValue>,
    LpmTrie<MapData, PolicyKeyV6, PolicyValue>,
    HashMap<MapData, AddrKey, Peer>,
    HashMap<MapData, AddrKey, Owners>,
    LpmTrie<MapData, PeerPolicyKey, PolicyValue>,
    Array<MapData, u32>,
    crate::filter::PassFilter,
>;

/// The maps the agent writes and reads, taken out of the loaded object.
pub struct Maps {
    pub plan: KernelPlanTables,
    pub flows: HashMap<MapData, FlowKey, FlowValue>,
    /// Entries `flows` can hold (as the kernel made it, also when adopted).
    pub flow_capacity: u32,
    pub local: Array<MapData, Local>,
    /// Connections translated here per peer (fabric address, network order).
    pub peer_load: HashMap<MapData, [u8; 4], u64>,
}

impl Maps {
    /// Narrows the pass filter to the plan in force and the flow table's entries now, as a
    /// collection pass does (tests and tools that write no plan meanwhile). Returns the words
    /// written.
    pub fn refine_filter(&mut self) -> anyhow::Result<u32> {
        let mut maybe = crate::filter::Buckets::of_plan(&self.plan.in_force()?);
        for (k, _) in crate::flows::dump(&self.flows)? {
            maybe.add_addr(k.family, &k.dst);
        }
        Ok(self.plan.filter.refine(&maybe)?)
    }

    /// Writes this server's fabric settings (what the programs need to encapsulate).
    pub fn set_local(&mut self, local: &Local) -> Result<(), LoadError> {
        self.local
            .set(0, local, 0)
            .map_err(|source| LoadError::Map {
                name: map_names::LOCAL,
                source,
            })
    }

    /// Sets or clears `LOCAL`'s fence flag (the rest as written by [`Self::set_local`]).
    pub fn set_fenced(&mut self, fenced: bool) -> Result<(), LoadError> {
        let map = |source| LoadError::Map {
            name: map_names::LOCAL,
            source,
        };
        let mut local = self.local.get(&0, 0).map_err(map)?;
        local.fenced = u8::from(fenced);
        self.local.set(0, local, 0).map_err(map)
    }

    /// The map `name` if it is one of these (for re-pinning).
    pub fn data(&self, name: &str) -> Option<&MapData> {
        use aya::maps::IterableMap as _;
        Some(match name {
            map_names::ACTIONS => self.plan.actions.map(),
            map_names::POLICY_V4 => self.plan.policies_v4.map(),
            map_names::POLICY_V6 => self.plan.policies_v6.map(),
            map_names::PEERS => self.plan.peers.map(),
            map_names::OWNERS => self.plan.owners.map(),
            map_names::PEER_POLICY => self.plan.peer_policies.map(),
            map_names::GENERATION => self.plan.generation.map(),
            map_names::PASS_FILTER => self.plan.filter.map(),
            map_names::FLOWS => self.flows.map(),
            map_names::LOCAL => self.local.map(),
            map_names::PEER_LOAD => self.peer_load.map(),
            _ => return None,
        })
    }
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, LoadError> {
    ebpf.take_map(name).ok_or(LoadError::MissingMap { name })
}

/// Takes the plan and flow maps out of `ebpf`.
pub fn take_maps(ebpf: &mut Ebpf) -> Result<Maps, LoadError> {
    let bad = |name| move |source| LoadError::Map { name, source };
    let flows = take(ebpf, map_names::FLOWS)?;
    let flow_capacity = match &flows {
        aya::maps::Map::HashMap(d) => d.info().map_err(bad(map_names::FLOWS))?.max_entries(),
        // check_pins refuses another layout before anything is loaded.
        _ => {
            return Err(LoadError::ObjectShape(format!(
                "{} is not a hash map",
                map_names::FLOWS
            )));
        }
    };
    Ok(Maps {
        plan: PlanTables {
            actions: HashMap::try_from(take(ebpf, map_names::ACTIONS)?)
                .map_err(bad(map_names::ACTIONS))?,
            policies_v4: LpmTrie::try_from(take(ebpf, map_names::POLICY_V4)?)
                .map_err(bad(map_names::POLICY_V4))?,
            policies_v6: LpmTrie::try_from(take(ebpf, map_names::POLICY_V6)?)
                .map_err(bad(map_names::POLICY_V6))?,
            peers: HashMap::try_from(take(ebpf, map_names::PEERS)?)
                .map_err(bad(map_names::PEERS))?,
            owners: HashMap::try_from(take(ebpf, map_names::OWNERS)?)
                .map_err(bad(map_names::OWNERS))?,
            peer_policies: LpmTrie::try_from(take(ebpf, map_names::PEER_POLICY)?)
                .map_err(bad(map_names::PEER_POLICY))?,
            generation: Array::try_from(take(ebpf, map_names::GENERATION)?)
                .map_err(bad(map_names::GENERATION))?,
            filter: crate::filter::PassFilter::new(
                Array::try_from(take(ebpf, map_names::PASS_FILTER)?)
                    .map_err(bad(map_names::PASS_FILTER))?,
            ),
        },
        flows: HashMap::try_from(flows).map_err(bad(map_names::FLOWS))?,
        flow_capacity,
        local: Array::try_from(take(ebpf, map_names::LOCAL)?).map_err(bad(map_names::LOCAL))?,
        peer_load: HashMap::try_from(take(ebpf, map_names::PEER_LOAD)?)
            .map_err(bad(map_names::PEER_LOAD))?,
    })
}

/// How a program was attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// New tcx links, pinned.
    Tcx,
    /// Pinned tcx links of an earlier agent, programs replaced.
    TcxAdopted,
    /// clsact filters (kernels before 6.6).
    Clsact,
}

/// A new key for the sent hint's tag (`egress_common::fabric::sent_tag`): random, from the
/// operating system's generator (std's hasher seeds are drawn from it).
pub fn sent_key() -> u32 {
    crate::random_u64() as u32
}

/// Loads the object without pinning anything (packet tests, benchmarks).
/// `reference_capacity`: entries of the benchmark's reference claim table (1 when unused).
/// `sent_key`: the key of the sent hint's tag (see [`sent_key`]).
pub fn load_unpinned(
    flow_capacity: u32,
    reference_capacity: u32,
    trace_every: u32,
    sent_key: u32,
) -> Result<Ebpf, LoadError> {
    Ok(EbpfLoader::new()
        .map_max_entries(map_names::FLOWS, flow_capacity)
        .override_global(prog_names::TRACE_EVERY, &trace_every, true)
        .override_global(prog_names::SENT_KEY, &sent_key, true)
        .map_max_entries(map_names::REF_FLOWS, reference_capacity.max(1))
        .load(EBPF_OBJECT)?)
}

/// The TC programs and where each attaches.
pub const PROGRAMS: [(&str, TcAttachType); 2] = [
    (prog_names::TC_EGRESS, TcAttachType::Egress),
    (prog_names::TC_INGRESS, TcAttachType::Ingress),
];

/// Program `name`, loaded into the kernel (verified) if it was not yet.
pub fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoadError> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })?;
    if prog.fd().is_err() {
        prog.load()
            .map_err(|source| LoadError::Program { name, source })?;
    }
    Ok(prog)
}

/// XDP program `name`, loaded into the kernel (verified) if it was not yet.
pub fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, LoadError> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })?;
    if prog.fd().is_err() {
        prog.load()
            .map_err(|source| LoadError::Program { name, source })?;
    }
    Ok(prog)
}

/// Attaches `xdp_ingress` to `iface` in native (driver) mode through a link pinned in
/// `pin_dir`, like the TC programs: a link pinned by an earlier agent gets the new program
/// atomically. Returns whether it was adopted. Fails where the driver has no native XDP, or
/// the device's MTU is beyond what a single-buffer program takes; the TC programs alone then
/// do all the work.
pub fn attach_xdp(ebpf: &mut Ebpf, iface: &str, pin_dir: &Path) -> Result<bool, LoadError> {
    let name = prog_names::XDP_INGRESS;
    let path = link_pin(pin_dir, name);
    let link_err = |e: String| LoadError::Link {
        path: path.display().to_string(),
        source: e.into(),
    };
    let prog = xdp_program(ebpf, name)?;
    let attach_err = |source| LoadError::Attach {
        name,
        iface: iface.to_string(),
        source,
    };
    if let Ok(pinned) = PinnedLink::from_pin(&path) {
        let adopted = XdpLink::try_from(FdLink::from(pinned))
            .map_err(|e| e.to_string())
            .and_then(|link| prog.attach_to_link(link).map_err(|e| e.to_string()));
        if adopted.is_ok() {
            return Ok(true);
        }
        // A defunct link (its device gone and made again): attached anew below.
        std::fs::remove_file(&path).map_err(|e| link_err(e.to_string()))?;
    }
    let id = prog.attach(iface, XdpMode::Driver).map_err(attach_err)?;
    let link = prog.take_link(id).map_err(attach_err)?;
    let fd = FdLink::try_from(link).map_err(|e| link_err(e.to_string()))?;
    fd.pin(&path).map_err(|e| link_err(e.to_string()))?;
    Ok(false)
}

/// Detaches `xdp_ingress` (an agent started without `--xdp` after one with it): removes its
/// pinned link. Returns whether there was one.
pub fn detach_xdp(pin_dir: &Path) -> std::io::Result<bool> {
    match std::fs::remove_file(link_pin(pin_dir, prog_names::XDP_INGRESS)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Where the link of program `name` is pinned.
pub fn link_pin(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join(format!("link_{name}"))
}

/// Loads the tail-called programs and points the `JUMP` slots at them (an adopted table is
/// updated in place: each slot switches atomically to the new program, so slot numbers must
/// never be reassigned between releases: old root programs may tail-call new ones).
pub fn fill_jump_table(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    for (slot, name) in prog_names::JUMP_TARGETS {
        set_jump(ebpf, map_names::JUMP, slot, name)?;
    }
    Ok(())
}

/// A decision log line as `tc_trace` writes it (`<counter index> <TC code>: …`) with the
/// counter and the verdict named: `snat_new pass: proto 6 192.0.2.10 -> 203.0.113.1`.
pub fn trace_line(raw: &str) -> String {
    let named = raw.split_once(": ").and_then(|(head, rest)| {
        let (stat, code) = head.split_once(' ')?;
        let stat = egress_common::stats::Stat::from_index(stat.parse().ok()?)?;
        let verdict = match code.parse::<i32>().ok()? {
            0 => "pass",
            2 => "drop",
            7 => "redirect",
            _ => "other",
        };
        Some(format!("{} {verdict}: {rest}", stat.name()))
    });
    named.unwrap_or_else(|| raw.to_string())
}

/// Loads `tc_trace` and puts it in its table: `--trace` only (off, it is never verified).
pub fn enable_trace(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    set_jump(ebpf, map_names::TRACE_PROG, 0, prog_names::TC_TRACE)
}

/// Slot `slot` of program table `table` holds program `name` (loaded if it was not yet).
fn set_jump(
    ebpf: &mut Ebpf,
    table: &'static str,
    slot: u32,
    name: &'static str,
) -> Result<(), LoadError> {
    let fd = program(ebpf, name)?
        .fd()
        .and_then(|fd| fd.try_clone().map_err(Into::into))
        .map_err(|source| LoadError::Program { name, source })?;
    let map = ebpf
        .map_mut(table)
        .ok_or(LoadError::MissingMap { name: table })?;
    let bad = |source| LoadError::Map {
        name: table,
        source,
    };
    ProgramArray::try_from(map)
        .map_err(bad)?
        .set(slot, &fd, 0)
        .map_err(bad)
}

/// Attaches both TC programs to `iface` and keeps them attached beyond this process. The
/// tail-call table is filled first.
///
/// With tcx (kernel 6.6+) each link is pinned in `pin_dir`: a link pinned by an earlier agent is
/// adopted and its program replaced atomically (no packet sees a detached uplink); a new link is
/// pinned. Without tcx, clsact filters are used (they also outlive the process).
pub fn attach(ebpf: &mut Ebpf, iface: &str, pin_dir: &Path) -> Result<AttachMode, LoadError> {
    let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    if !tcx {
        // Already present is fine; any other failure shows up at attach.
        let _ = tc::qdisc_add_clsact(iface);
    }
    // Every program is loaded (verified) before the shared table points at any of them, so a
    // program the kernel refuses leaves the running ones and their table as they were.
    for (name, _) in PROGRAMS {
        program(ebpf, name)?;
    }
    fill_jump_table(ebpf)?;
    let mut adopted = false;
    for (name, kind) in PROGRAMS {
        let attach_err = |source| LoadError::Attach {
            name,
            iface: iface.to_string(),
            source,
        };
        let prog = program(ebpf, name)?;
        if !tcx {
            prog.attach(iface, kind).map_err(attach_err)?;
            continue;
        }
        let path = link_pin(pin_dir, name);
        let id = match PinnedLink::from_pin(&path) {
            Ok(pinned) => {
                let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| {
                    LoadError::Link {
                        path: path.display().to_string(),
                        source: e.into(),
                    }
                })?;
                adopted = true;
                prog.attach_to_link(link).map_err(attach_err)?
            }
            Err(_) => prog
                .attach_with_options(iface, kind, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .map_err(attach_err)?,
        };
        let link = prog.take_link(id).map_err(attach_err)?;
        let fd = FdLink::try_from(link).map_err(|e| LoadError::Link {
            path: path.display().to_string(),
            source: e.into(),
        })?;
        if !path.exists() {
            fd.pin(&path).map_err(|e| LoadError::Link {
                path: path.display().to_string(),
                source: e.into(),
            })?;
        }
        // Dropping our fd leaves the pinned link (and the program) in place.
    }
    Ok(match (tcx, adopted) {
        (false, _) => AttachMode::Clsact,
        (true, false) => AttachMode::Tcx,
        (true, true) => AttachMode::TcxAdopted,
    })
}

/// The names an agent pins in its directory: its links, its maps, and a migration's
/// set-aside maps. Nothing else there is ours.
pub fn pinned_names() -> Vec<String> {
    let mut names: Vec<String> = PROGRAMS.iter().map(|(p, _)| format!("link_{p}")).collect();
    names.push(format!("link_{}", prog_names::XDP_INGRESS));
    for m in map_names::ALL {
        names.push(m.to_string());
        names.push(format!("{m}_pre_migrate"));
    }
    names
}

/// Removes what an agent leaves behind in `pin_dir`: the pinned links (so the programs detach)
/// and the pinned maps — only those names ([`pinned_names`]): pointed at the bpffs root or at
/// another program's directory it removes nothing of theirs. The directory goes too once
/// empty. Returns the paths removed.
pub fn detach(pin_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !pin_dir.exists() {
        return Ok(removed);
    }
    for name in pinned_names() {
        let path = pin_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    // Left in place when it holds anything else.
    let _ = std::fs::remove_dir(pin_dir);
    Ok(removed)
}

/// This server's fabric settings for the `LOCAL` map: its fabric address, the uplink's index,
/// and the MSS that fits a forwarded IPv4 segment into the uplink's MTU.
pub fn local_settings(
    fabric: std::net::Ipv4Addr,
    uplink: &str,
    peer_budget: u32,
) -> Result<Local, LoadError> {
    let ifindex = ifindex(uplink).ok_or_else(|| LoadError::NoInterface {
        iface: uplink.to_string(),
        server: String::new(),
    })?;
    let mtu = mtu(uplink).map_err(|source| LoadError::Mtu {
        iface: uplink.to_string(),
        source,
    })?;
    Ok(Local {
        fabric: fabric.octets(),
        ifindex,
        mss_v4: egress_common::wire::tunnel_mss(mtu),
        fenced: 0,
        _pad: 0,
        peer_budget,
    })
}

/// The MTU of `iface` in this network namespace (SIOCGIFMTU; /sys would show the namespace the
/// mounts belong to, not necessarily ours).
fn mtu(iface: &str) -> std::io::Result<u32> {
    // SAFETY: plain socket/ioctl/close calls on a zeroed ifreq holding a NUL-terminated name.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req
            .ifr_name
            .iter_mut()
            .zip(iface.bytes().take(libc::IFNAMSIZ - 1))
        {
            *d = s as libc::c_char;
        }
        let rc = libc::ioctl(fd, libc::SIOCGIFMTU, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
        Ok(req.ifr_ifru.ifru_mtu as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::pins_lock_name;
    use std::path::Path;

    /// One pin directory, one lock, however it is spelt; two directories, two locks.
    #[test]
    fn every_spelling_of_a_pin_directory_names_one_lock() {
        /// Removes the test's directory however the test ends.
        struct Cleanup(std::path::PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let root = std::env::temp_dir().join(format!("egress-lock-test-{}", std::process::id()));
        let _cleanup = Cleanup(root.clone());
        let dir = root.join("pins");
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink(&dir, root.join("link")).unwrap();
        let name = pins_lock_name(&dir);
        let same = [
            root.join("link"),
            root.join("pins/../pins"),
            root.join("./pins/"),
            root.join("link/../pins"),
        ];
        let differ = [
            (root.join("a_b"), root.join("a/b")),
            (root.join("a_b"), root.join("a/5fb")),
            (root.join("a_b"), root.join("a%5fb")),
            (root.join("a%b"), root.join("a%25b")),
            (root.join("missing/x"), root.join("missing/y")),
        ];
        let same_missing = [(root.join("missing/../gone/x"), root.join("gone/x"))];
        let names = |p: &Path| pins_lock_name(p);
        for s in &same {
            assert_eq!(names(s), name, "{}", s.display());
        }
        for (a, b) in &differ {
            assert_ne!(names(a), names(b), "{} vs {}", a.display(), b.display());
        }
        for (a, b) in &same_missing {
            assert_eq!(names(a), names(b), "{} vs {}", a.display(), b.display());
        }
        // A directory whose name earlier versions spelt otherwise is held under both names:
        // an earlier version's agent (its name) and this version's (the canonical one) both
        // find it taken.
        let odd = root.join("link/x_y");
        std::fs::create_dir_all(&odd).unwrap();
        let held = super::lock_pins(&odd).unwrap();
        let legacy = odd.to_string_lossy().trim_matches('/').replace('/', "_");
        assert_ne!(legacy, pins_lock_name(&odd));
        assert!(super::lock(&legacy, "test").is_err(), "earlier name held");
        assert!(
            super::lock_pins(&root.join("pins/x_y")).is_err(),
            "canonical held"
        );
        drop(held);
        assert!(super::lock_pins(&odd).is_ok(), "released with the agent");
        for name in [legacy, pins_lock_name(&odd)] {
            let _ = std::fs::remove_file(Path::new(super::LOCK_DIR).join(format!("{name}.lock")));
        }
        // Earlier versions' name of the usual path (no `_` in it): unchanged.
        assert_eq!(
            pins_lock_name(Path::new("/sys/fs/bpf/egress/fra-a-1")),
            "sys_fs_bpf_egress_fra-a-1"
        );
    }
}
