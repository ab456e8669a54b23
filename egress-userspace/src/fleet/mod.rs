//! Fleet mode: one topology shared through etcd (v3). The publisher writes the topology's TOML
//! text and who published it under a prefix, in one transaction that compares the previous
//! revision; every agent watches it and applies each revision as a reload would; each agent
//! keeps a lease-bound status key that `egress fleet status` reads.
//!
//! Keys under the prefix (default `/egress/v1/`):
//! - `topology/config`: the TOML text, exactly as published;
//! - `topology/meta`: [`Meta`] (JSON): serial, when, by whom, sha256 of the text;
//! - `status/<server>`: [`Status`] (JSON), bound to the agent's lease.
//! - `alive/<server>`: written once per session on the same lease; what peers watch.

pub mod alive;
pub mod pki;
pub mod roles;
pub mod tls;
pub mod watch;

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, anyhow, bail};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

pub use tls::Credentials;

pub const DEFAULT_PREFIX: &str = "/egress/v1/";
/// How long one request may take (a member that does not answer is one timeout).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How to reach etcd: shared by every command that talks to it.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (https://10.0.0.1:2379,https://10.0.0.2:2379).
    #[arg(long = "etcd", value_name = "URLS", value_delimiter = ',')]
    pub urls: Vec<String>,
    /// Key prefix of this fleet's topology and status keys.
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub prefix: String,
    /// Directory holding this identity's ca.crt, client.crt and client.key (as written by
    /// `egress fleet init`).
    #[arg(long, value_name = "DIR")]
    pub etcd_tls: Option<PathBuf>,
    /// The fleet's CA certificate (overrides <etcd-tls>/ca.crt).
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// This client's certificate; its common name is the etcd user (overrides
    /// <etcd-tls>/client.crt).
    #[arg(long, value_name = "FILE")]
    pub etcd_cert: Option<PathBuf>,
    /// This client's private key (overrides <etcd-tls>/client.key).
    #[arg(long, value_name = "FILE")]
    pub etcd_key: Option<PathBuf>,
    /// Talk to etcd in plain text, unauthenticated: only for a demo on one machine.
    #[arg(long)]
    pub etcd_plaintext: bool,
}

/// How a client connects: checked credentials, or plain text when asked for.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub urls: Vec<String>,
    pub keys: Keys,
    pub credentials: Option<Credentials>,
    /// The members in the order this client tries them (places in `urls`): as given, or an
    /// agent's own order ([`Endpoint::spread_by`]).
    order: Vec<usize>,
    /// Which member is in use and which one the last session ended on.
    members: std::sync::Arc<std::sync::Mutex<Members>>,
}

/// An endpoint's members in use (places in its URLs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Members {
    /// The member the latest connection was made to.
    in_use: Option<usize>,
    /// The member that answered last: connected to, or refused.
    answered: Option<usize>,
    /// The member the last session ended on, or that refused it: tried last next time.
    ended: Option<usize>,
}

impl Members {
    /// Member `i` answered a connection: took it (`connected`), or refused it.
    fn answered(&mut self, i: usize, connected: bool) {
        self.answered = Some(i);
        if connected {
            self.in_use = Some(i);
        }
    }

    /// The session ended, or the connection was refused: the member that answered last is
    /// tried last next time (one that refuses, or accepts but fails sessions, does not hold
    /// the client while another would serve it).
    fn session_ended(&mut self) {
        self.ended = self.answered;
    }
}

impl EtcdArgs {
    pub fn given(&self) -> bool {
        !self.urls.is_empty()
    }

    /// Checks the arguments and reads the credentials (each file checked; errors name it).
    pub fn endpoint(&self) -> anyhow::Result<Endpoint> {
        if self.urls.is_empty() || self.urls.iter().any(|u| u.trim().is_empty()) {
            bail!("--etcd: give the etcd endpoints, comma-separated (https://host:2379,...)");
        }
        let keys = Keys::new(&self.prefix)?;
        let file = |flag: &Option<PathBuf>, name: &str, what: &str| -> anyhow::Result<PathBuf> {
            match (flag, &self.etcd_tls) {
                (Some(p), _) => Ok(p.clone()),
                (None, Some(dir)) => Ok(dir.join(name)),
                (None, None) => bail!(
                    "etcd TLS: no {what}: give --etcd-tls DIR (from `egress fleet init`) or --etcd-ca, --etcd-cert and --etcd-key; --etcd-plaintext only for a demo on one machine"
                ),
            }
        };
        let tls_given = self.etcd_tls.is_some()
            || self.etcd_ca.is_some()
            || self.etcd_cert.is_some()
            || self.etcd_key.is_some();
        if self.etcd_plaintext {
            if tls_given {
                bail!("--etcd-plaintext and TLS options together: choose one");
            }
            if let Some(u) = self.urls.iter().find(|u| u.starts_with("https://")) {
                bail!("--etcd-plaintext with an https URL ({u}): use http:// or TLS options");
            }
            return Ok(Endpoint {
                urls: self.urls.iter().map(|u| u.trim().to_string()).collect(),
                keys,
                credentials: None,
                order: (0..self.urls.len()).collect(),
                members: Default::default(),
            });
        }
        if let Some(u) = self.urls.iter().find(|u| u.starts_with("http://")) {
            bail!(
                "--etcd {u}: plain http; the fleet's etcd speaks TLS (https://), or pass --etcd-plaintext for a demo"
            );
        }
        let ca = file(&self.etcd_ca, tls::CA_FILE, "CA certificate")?;
        let cert = file(&self.etcd_cert, tls::CERT_FILE, "client certificate")?;
        let key = file(&self.etcd_key, tls::KEY_FILE, "client key")?;
        Ok(Endpoint {
            urls: self.urls.iter().map(|u| u.trim().to_string()).collect(),
            keys,
            credentials: Some(Credentials::load(&ca, &cert, &key)?),
            order: (0..self.urls.len()).collect(),
            members: Default::default(),
        })
    }
}

impl Endpoint {
    /// A client of one member: the first in this client's order that answers a read of the
    /// topology key, the member the last session ended on last. (The client's own balancing
    /// fails a request when any one endpoint is down, so members are tried in turn here; one
    /// connection at a time, as etcd's own clients keep.)
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let ended = self.lock().ended;
        let mut failures = Vec::new();
        for i in try_order(&self.order, ended) {
            match self.try_member(i).await {
                Ok(client) => {
                    self.lock().answered(i, true);
                    return Ok(client);
                }
                Err(Tried::Refused(e)) => {
                    self.lock().answered(i, false);
                    return Err(e);
                }
                Err(Tried::Unreachable(e)) => failures.push(e),
            }
        }
        let why: Vec<String> = failures.iter().map(crate::cli::error_text).collect();
        bail!("no etcd member answered: {}", why.join("; "))
    }

    /// Gives this client (an agent) an order of the members of its own, by the name of its
    /// server ([`rendezvous`]), instead of the URLs' order: a fleet's agents spread over the
    /// members; the agents of a member that fails spread over the others; and a member added
    /// or removed moves only the agents it takes or had.
    pub fn spread_by(&mut self, name: &str) {
        self.order = rendezvous(name, &self.urls);
    }

    /// The URL of the member the latest connection was made to.
    pub fn member_url(&self) -> Option<&str> {
        self.lock().in_use.map(|i| self.urls[i].as_str())
    }

    /// After a session ended (failed, or refused): see [`Members::session_ended`].
    pub fn session_ended(&self) {
        self.lock().session_ended();
    }

    /// The members this client ranks above the one in use, best first (none when on its
    /// first).
    pub fn better_members(&self) -> Vec<usize> {
        let in_use = self.lock().in_use;
        self.order
            .iter()
            .copied()
            .take_while(|&i| Some(i) != in_use)
            .collect()
    }

    /// A connection to member `i` if it answers now (a read).
    pub async fn answers(&self, i: usize) -> Option<Client> {
        self.try_member(i).await.ok()
    }

    /// A connection to member `i` (from [`Endpoint::answers`]) is the one in use.
    pub fn connected_to(&self, i: usize) {
        self.lock().answered(i, true);
    }

    /// The URL of member `i`.
    pub fn url(&self, i: usize) -> &str {
        &self.urls[i]
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn try_member(&self, i: usize) -> Result<Client, Tried> {
        let url = &self.urls[i];
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            // A member cut off from the cluster's leader refuses at once instead of serving a
            // watch that never fires.
            .with_require_leader(true);
        let url = match &self.credentials {
            None => url.clone(),
            Some(c) => {
                opts = opts.with_tls(
                    etcd_client::TlsOptions::new()
                        .ca_certificate(etcd_client::Certificate::from_pem(&c.ca_pem))
                        .identity(etcd_client::Identity::from_pem(&c.cert_pem, &c.key_pem)),
                );
                if url.contains("://") {
                    url.clone()
                } else {
                    format!("https://{url}")
                }
            }
        };
        let mut client = Client::connect([url.as_str()], Some(opts))
            .await
            .map_err(|e| Tried::Refused(describe(e, &url, None)))?;
        let key = self.keys.config();
        match client
            .get(key.as_str(), Some(GetOptions::new().with_count_only()))
            .await
        {
            Ok(_) => Ok(client),
            Err(e) if unreachable(&e) => Err(Tried::Unreachable(describe(e, &url, None))),
            Err(e) => Err(Tried::Refused(describe(e, &url, Some(&key)))),
        }
    }

    /// The etcd user this client authenticates as (its certificate's common name).
    pub fn user(&self) -> Option<&str> {
        self.credentials.as_ref().map(|c| c.user.as_str())
    }
}

/// The order in which a client named `name` tries the members `urls` (places in it):
/// rendezvous hashing — by SHA-256 of the name and each member ([`member_of`]), highest
/// first. The same on every host and build whatever the URLs' order; a URL added or removed
/// changes no other URL's place relative to the rest.
pub fn rendezvous(name: &str, urls: &[String]) -> Vec<usize> {
    let weight = |url: &str| {
        let mut h = sha2::Sha256::new();
        h.update(name.as_bytes());
        h.update([0]);
        h.update(member_of(url).as_bytes());
        let d = h.finalize();
        u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
    };
    let mut order: Vec<usize> = (0..urls.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(weight(&urls[i])), i));
    order
}

/// What names the member in `url` for [`rendezvous`]: host and port, lowercase, without the
/// scheme or a trailing `/` (`10.0.0.1:2379` and `https://10.0.0.1:2379/` are one member; a
/// host name and its address are not).
fn member_of(url: &str) -> String {
    let url = url.trim();
    let url = url.split_once("://").map_or(url, |(_, rest)| rest);
    url.trim_end_matches('/').to_ascii_lowercase()
}

/// `order` with `ended` (the member the last session ended on) moved to the end.
fn try_order(order: &[usize], ended: Option<usize>) -> Vec<usize> {
    let (last, mut first): (Vec<usize>, Vec<usize>) =
        order.iter().partition(|&&i| Some(i) == ended);
    first.extend(last);
    first
}

/// How trying one member failed: it did not answer (try the next), or it answered no.
enum Tried {
    Unreachable(anyhow::Error),
    Refused(anyhow::Error),
}

fn unreachable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// An etcd error in an operator's words: who refused what, naming the key when it is one.
pub fn describe(e: etcd_client::Error, urls: &str, key: Option<&str>) -> anyhow::Error {
    use etcd_client::Error as E;
    let on = key.map(|k| format!(" on key {k}")).unwrap_or_default();
    match &e {
        E::GRpcStatus(s) => match s.code() {
            tonic::Code::PermissionDenied => anyhow!(
                "permission denied by etcd{on}: {} (this identity's role does not cover it: the wrong identity, or a wrong --prefix?)",
                s.message()
            ),
            tonic::Code::Unauthenticated => anyhow!(
                "etcd refused the client's identity{on}: {} (is the certificate's user created by `egress fleet init`?)",
                s.message()
            ),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
                let detail = flatten(s);
                let hint = if detail.contains("invalid peer certificate") {
                    " (the members' certificate is not from this client's CA file: another fleet's CA?)"
                } else if detail.contains("broken pipe") || detail.contains("connection reset") {
                    " (the member closed the connection: a TLS-only etcd reached in plain text, or this client's certificate refused?)"
                } else {
                    ""
                };
                anyhow!("etcd at {urls} unreachable{on}: {detail}{hint}")
            }
            _ => anyhow!("etcd{on}: {:?}: {}", s.code(), flatten(s)),
        },
        _ => anyhow!("etcd at {urls}{on}: {e}"),
    }
}

/// A gRPC status's message with the transport error under it (a refused handshake says why
/// only there).
fn flatten(s: &tonic::Status) -> String {
    let mut text = s.message().to_string();
    let mut source = std::error::Error::source(s);
    while let Some(cause) = source {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        source = cause.source();
    }
    text
}

/// The keys of one fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// A prefix is an absolute key path ending in '/'.
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        if !prefix.starts_with('/') || !prefix.ends_with('/') || prefix.contains("//") {
            bail!("--prefix {prefix:?}: must start and end with '/' (e.g. {DEFAULT_PREFIX})");
        }
        Ok(Self {
            prefix: prefix.to_string(),
        })
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// Both published keys: read together, they come from one revision.
    pub fn topology(&self) -> String {
        format!("{}topology/", self.prefix)
    }
    pub fn config(&self) -> String {
        format!("{}topology/config", self.prefix)
    }
    pub fn meta(&self) -> String {
        format!("{}topology/meta", self.prefix)
    }
    pub fn statuses(&self) -> String {
        format!("{}status/", self.prefix)
    }
    pub fn status(&self, server: &str) -> String {
        format!("{}status/{server}", self.prefix)
    }
    pub fn alives(&self) -> String {
        format!("{}alive/", self.prefix)
    }
    pub fn alive(&self, server: &str) -> String {
        format!("{}alive/{server}", self.prefix)
    }
}

/// Who published the topology, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Publishes so far under this prefix (1 = the first).
    pub serial: u64,
    /// Seconds since the Unix epoch.
    pub published_at: u64,
    pub host: String,
    pub user: String,
    /// The etcd user (the certificate's common name); None in plain text.
    pub identity: Option<String>,
    /// sha256 of the TOML text, hex.
    pub sha256: String,
}

/// What is published: the text, its metadata, and the etcd revision that wrote it.
#[derive(Debug, Clone)]
pub struct Published {
    pub text: String,
    pub meta: Option<Meta>,
    /// The config key's mod revision: what agents report having applied.
    pub revision: i64,
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&sha2::Sha256::digest(data))
}

/// A Unix time as RFC 3339 (UTC, seconds).
pub fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads what is published (None: nothing under the prefix), both keys from one revision.
/// Also returns the store's revision at the time of reading (to watch from).
pub async fn read_published(
    client: &mut Client,
    ep: &Endpoint,
) -> anyhow::Result<(Option<Published>, i64)> {
    let prefix = ep.keys.topology();
    let resp = client
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| describe(e, &ep.urls.join(","), Some(&prefix)))?;
    let at = resp.header().map_or(0, |h| h.revision());
    let mut text = None;
    let mut meta = None;
    for kv in resp.kvs() {
        let key = kv.key_str().unwrap_or_default();
        if key == ep.keys.config() {
            // Not UTF-8 text: handed on as-is for the parser to reject with its message.
            text = Some((
                String::from_utf8_lossy(kv.value()).into_owned(),
                kv.mod_revision(),
            ));
        } else if key == ep.keys.meta() {
            meta = serde_json::from_slice::<Meta>(kv.value()).ok();
        }
    }
    Ok((
        text.map(|(text, revision)| Published {
            text,
            meta,
            revision,
        }),
        at,
    ))
}

/// The outcome of a publish.
#[derive(Debug, Clone)]
pub struct Publication {
    pub revision: i64,
    pub meta: Meta,
    /// The revision that was replaced (0: the first publish).
    pub previous: i64,
}

/// Writes `text` as the fleet's topology if the published config is still at `expect` (its mod
/// revision; 0 = nothing published): both keys in one transaction. A lost race is an error that
/// says which revision won.
pub async fn publish(
    client: &mut Client,
    ep: &Endpoint,
    text: &str,
    expect: Option<i64>,
) -> anyhow::Result<Publication> {
    let urls = ep.urls.join(",");
    let (current, _) = read_published(client, ep).await?;
    let previous = current.as_ref().map_or(0, |p| p.revision);
    let expect = expect.unwrap_or(previous);
    if expect != previous {
        bail!(
            "the published topology is at revision {previous}, not {expect} as expected: someone else published since; nothing written (see `egress fleet show`)"
        );
    }
    let meta = Meta {
        serial: current
            .as_ref()
            .and_then(|p| p.meta.as_ref())
            .map_or(0, |m| m.serial)
            + 1,
        published_at: unix_now(),
        host: hostname(),
        user: login(),
        identity: ep.user().map(str::to_string),
        sha256: sha256_hex(text.as_bytes()),
    };
    let txn = Txn::new()
        .when([Compare::mod_revision(
            ep.keys.config(),
            CompareOp::Equal,
            expect,
        )])
        .and_then([
            TxnOp::put(ep.keys.config(), text, None),
            TxnOp::put(ep.keys.meta(), serde_json::to_vec(&meta)?, None),
        ]);
    let resp = match client.txn(txn).await {
        Ok(resp) => resp,
        Err(e) if may_have_landed(&e) => {
            // Unanswered (a timeout, a connection lost): etcd may have applied it all the same.
            let err = describe(e, &urls, Some(&ep.keys.config()));
            let now = read_published(client, ep).await;
            return unanswered(err, now.map(|(p, _)| p), meta, previous);
        }
        // A refusal (permission, identity, size): nothing was written.
        Err(e) => return Err(describe(e, &urls, Some(&ep.keys.config()))),
    };
    if !resp.succeeded() {
        let (now, _) = read_published(client, ep).await?;
        bail!(
            "lost a race: another publish landed first (the topology is now at revision {}); nothing written — look at it with `egress fleet show` and publish again",
            now.map_or(0, |p| p.revision)
        );
    }
    let revision = resp.header().map_or(0, |h| h.revision());
    Ok(Publication {
        revision,
        meta,
        previous,
    })
}

/// Whether a failed request may still have been applied: no answer came (a timeout, a
/// connection lost), as opposed to a refusal (permission, identity, a request too large).
fn may_have_landed(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
        ),
        _ => true,
    }
}

/// The outcome of a publish whose transaction got no answer (`err`), from the topology read
/// back after it (`now`): this publish's own meta there (its serial, time, host, user and
/// hash) means it landed; the topology still at `previous` means not written (unless the
/// request is still on its way); a later one means another publish is current, and this one
/// may have landed before it; a failed read leaves it unknown. The error says which.
fn unanswered(
    err: anyhow::Error,
    now: anyhow::Result<Option<Published>>,
    meta: Meta,
    previous: i64,
) -> anyhow::Result<Publication> {
    const LOOK: &str = "look with `egress fleet show` before publishing again";
    match now {
        Ok(Some(p)) if p.meta.as_ref() == Some(&meta) => Ok(Publication {
            revision: p.revision,
            meta,
            previous,
        }),
        Ok(now) if previous != 0 && now.as_ref().map_or(0, |p| p.revision) == previous => {
            Err(err.context(format!(
                "publish got no answer, and the topology is still at revision {previous}: not written, unless the request is still on its way to etcd — {LOOK}"
            )))
        }
        Ok(None) if previous == 0 => Err(err.context(format!(
            "publish got no answer, and nothing is published yet: not written, unless the request is still on its way to etcd — {LOOK}"
        ))),
        Ok(now) => Err(err.context(format!(
            "publish got no answer, and another publish is current (revision {}): this one may have landed before it — {LOOK}",
            now.map_or(0, |p| p.revision)
        ))),
        Err(read) => Err(err.context(format!(
            "publish got no answer, and reading the topology back failed too ({read:#}): whether it was written is unknown — {LOOK}"
        ))),
    }
}

/// What an agent reports about itself (the value of its status key).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub server: String,
    pub host: String,
    pub pid: u32,
    /// Unix seconds.
    pub started_at: u64,
    pub updated_at: u64,
    /// The published revision in force (0: none yet).
    pub applied_revision: i64,
    /// Its publish serial.
    pub applied_serial: u64,
    /// Hash of the plan in force ([`crate::plan::plan_hash`]).
    pub plan_hash: String,
    /// Plans applied since start.
    pub generation: u64,
    /// Revisions found invalid (the last good plan stayed).
    pub rejected_revisions: u64,
    /// Plans that failed to be written (the previous one was restored).
    pub failed_writes: u64,
    /// Packets dropped by the datapath (all drop counters).
    pub drops: u64,
    /// Whether programs run (false: `--no-dataplane`).
    pub dataplane: bool,
    /// The last rejected revision and why, while it is the newest published.
    pub rejected: Option<String>,
    /// Peers this agent sees down (name → why bits), skipped as next hops.
    #[serde(default)]
    pub peers_down: std::collections::BTreeMap<String, u32>,
}

/// One status key: the server its key names, and its value (or why it could not be read).
#[derive(Debug, Clone)]
pub struct StatusEntry {
    /// From the key (`status/<server>`): what etcd's permissions vouch for, not the value.
    pub server: String,
    pub status: Result<Status, String>,
}

/// Every status key (servers whose lease lapsed have none).
pub async fn read_statuses(client: &mut Client, ep: &Endpoint) -> anyhow::Result<Vec<StatusEntry>> {
    let prefix = ep.keys.statuses();
    let resp = client
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| describe(e, &ep.urls.join(","), Some(&prefix)))?;
    Ok(resp
        .kvs()
        .iter()
        .map(|kv| StatusEntry {
            server: kv
                .key_str()
                .unwrap_or_default()
                .strip_prefix(prefix.as_str())
                .unwrap_or_default()
                .to_string(),
            status: serde_json::from_slice::<Status>(kv.value()).map_err(|e| e.to_string()),
        })
        .collect())
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The user running this command: the login name, else the uid.
pub fn login() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| {
            // SAFETY: getuid has no preconditions.
            format!("uid {}", unsafe { libc::getuid() })
        })
}

/// Runs a future on a fresh current-thread runtime (the fleet commands are one-shot).
pub fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(rt.block_on(f))
}

#[cfg(test)]
mod tests {
    use super::{Meta, Published, may_have_landed, rendezvous, try_order, unanswered};

    /// An agent's order of the members: pinned values (the same on every build), the same
    /// members whatever the URLs' order, each member first for about a third of 300 names
    /// and a failed member's agents spread over the others, and a member removed moves only
    /// the agents that had it first.
    #[test]
    fn agents_spread_over_the_members_by_name() {
        let urls: Vec<String> = (1..=3)
            .map(|i| format!("https://10.61.0.{i}:2379"))
            .collect();
        let named = |name: &str, urls: &[String]| -> Vec<String> {
            rendezvous(name, urls)
                .into_iter()
                .map(|i| urls[i].clone())
                .collect()
        };
        for (name, order) in [("fra-a-1", [0, 2, 1]), ("fra-a-2", [1, 0, 2])] {
            assert_eq!(rendezvous(name, &urls), order, "{name}");
            let reversed: Vec<String> = urls.iter().rev().cloned().collect();
            assert_eq!(named(name, &reversed), named(name, &urls), "{name}");
            // Another spelling of the same members.
            let bare: Vec<String> = (1..=3).map(|i| format!(" 10.61.0.{i}:2379/")).collect();
            assert_eq!(rendezvous(name, &bare), order, "{name}, {bare:?}");
        }
        let names: Vec<String> = (0..300).map(|i| format!("srv-{i}")).collect();
        let mut first = [0; 3];
        let mut second = [[0; 3]; 3];
        for n in &names {
            let o = rendezvous(n, &urls);
            first[o[0]] += 1;
            second[o[0]][o[1]] += 1;
        }
        assert!(first.iter().all(|&c| (75..=125).contains(&c)), "{first:?}");
        for (m, s) in second.iter().enumerate() {
            let (a, b) = (s[(m + 1) % 3], s[(m + 2) % 3]);
            assert!(a * 2 >= b && b * 2 >= a, "member {m}'s agents next: {s:?}");
        }
        let fewer = &urls[..2];
        for n in &names {
            let before = named(n, &urls)[0].clone();
            if before != urls[2] {
                assert_eq!(named(n, fewer)[0], before, "{n} kept its member");
            }
        }
    }

    /// Which member goes last: the one the session ended on, or the one that refused, never
    /// one that did not answer (the next connection tries the others first).
    #[test]
    fn the_member_that_answered_last_goes_last_after_a_failure() {
        use super::Members;
        let order = [1, 2, 0];
        let mut m = Members::default();
        let next = |m: &Members| try_order(&order, m.ended);
        assert_eq!(next(&m), [1, 2, 0], "first connection: own order");
        m.answered(1, true);
        m.session_ended();
        assert_eq!(next(&m), [2, 0, 1], "session on 1 ended: 1 last");
        // 2 refuses (it answered): it goes last, 1 is tried again before it.
        m.answered(2, false);
        m.session_ended();
        assert_eq!(next(&m), [1, 0, 2], "2 refused");
        // Nothing answers: the member that answered last stays last.
        m.session_ended();
        assert_eq!(next(&m), [1, 0, 2], "nobody answered");
        m.answered(0, true);
        assert_eq!(m.in_use, Some(0));
        m.session_ended();
        assert_eq!(next(&m), [1, 2, 0], "session on 0 ended");
    }

    /// The member a session ended on is tried last; the rest keep their order.
    #[test]
    fn the_member_a_session_ended_on_goes_last() {
        for (ended, want) in [
            (None, vec![1, 2, 0]),
            (Some(1), vec![2, 0, 1]),
            (Some(2), vec![1, 0, 2]),
            (Some(7), vec![1, 2, 0]),
        ] {
            assert_eq!(try_order(&[1, 2, 0], ended), want, "{ended:?}");
        }
    }

    /// Only a request without an answer may have landed; a refusal wrote nothing.
    #[test]
    fn refusals_are_not_taken_for_unanswered_publishes() {
        use tonic::Code;
        for (code, maybe) in [
            (Code::Unavailable, true),
            (Code::DeadlineExceeded, true),
            (Code::Cancelled, true),
            (Code::Unknown, true),
            (Code::PermissionDenied, false),
            (Code::Unauthenticated, false),
            (Code::InvalidArgument, false),
            (Code::ResourceExhausted, false),
        ] {
            let e = etcd_client::Error::GRpcStatus(tonic::Status::new(code, "x"));
            assert_eq!(may_have_landed(&e), maybe, "{code:?}");
        }
    }

    fn meta(serial: u64) -> Meta {
        Meta {
            serial,
            published_at: 1_800_000_000,
            host: "ops-1".into(),
            user: "alice".into(),
            identity: None,
            sha256: "ab".repeat(32),
        }
    }

    fn published(revision: i64, m: Option<Meta>) -> Published {
        Published {
            text: String::new(),
            meta: m,
            revision,
        }
    }

    /// A publish without an answer: landed when its own meta is what etcd holds now, not when
    /// another is, unknown when the read fails — and the error says which.
    #[test]
    fn an_unanswered_publish_is_reported_by_what_etcd_holds_after_it() {
        let ours = meta(8);
        type Case = (
            &'static str,
            anyhow::Result<Option<Published>>,
            Result<i64, &'static str>,
        );
        let cases: [Case; 5] = [
            (
                "landed",
                Ok(Some(published(41, Some(ours.clone())))),
                Ok(41),
            ),
            (
                "still the previous publish",
                Ok(Some(published(40, Some(meta(7))))),
                Err("still at revision 40: not written"),
            ),
            (
                "another publisher after it",
                Ok(Some(published(
                    42,
                    Some(Meta {
                        host: "ops-2".into(),
                        ..ours.clone()
                    }),
                ))),
                Err("another publish is current (revision 42): this one may have landed"),
            ),
            (
                "nothing published",
                Ok(None),
                Err("another publish is current (revision 0)"),
            ),
            (
                "read failed",
                Err(anyhow::anyhow!("etcd unreachable")),
                Err("unknown"),
            ),
        ];
        for (what, now, want) in cases {
            let got = unanswered(anyhow::anyhow!("timed out"), now, ours.clone(), 40);
            match (got, want) {
                (Ok(p), Ok(rev)) => {
                    assert_eq!(
                        (p.revision, p.previous, &p.meta),
                        (rev, 40, &ours),
                        "{what}"
                    )
                }
                (Err(e), Err(text)) => {
                    let e = format!("{e:#}");
                    assert!(e.contains(text) && e.contains("timed out"), "{what}: {e}");
                }
                (got, _) => panic!("{what}: {:?}", got.map(|p| p.revision)),
            }
        }
    }
}
