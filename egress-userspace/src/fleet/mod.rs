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
    /// The member to try first (the one that answered last).
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
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
                urls: self.urls.clone(),
                keys,
                credentials: None,
                next: Default::default(),
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
            urls: self.urls.clone(),
            keys,
            credentials: Some(Credentials::load(&ca, &cert, &key)?),
            next: Default::default(),
        })
    }
}

impl Endpoint {
    /// A client of one member: the first of the URLs, from the one last used, that answers a
    /// read of the topology key. (The client's own balancing fails a request when any one
    /// endpoint is down, so members are tried in turn here; one connection at a time, as
    /// etcd's own clients keep.)
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let n = self.urls.len();
        let first = self.next.load(std::sync::atomic::Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        for i in (0..n).map(|k| (first + k) % n) {
            match self.try_member(i).await {
                Ok(client) => {
                    self.next.store(i, std::sync::atomic::Ordering::Relaxed);
                    return Ok(client);
                }
                Err(Tried::Refused(e)) => return Err(e),
                Err(Tried::Unreachable(e)) => failures.push(e),
            }
        }
        let why: Vec<String> = failures.iter().map(crate::cli::error_text).collect();
        bail!("no etcd member answered: {}", why.join("; "))
    }

    /// Starts this client at the member `name` (its server) hashes to instead of the first
    /// URL: a fleet's agents spread over the members, so that one member carries a share of
    /// the watches and leases, and its loss moves only that share (all at once onto the next
    /// member otherwise). The same name always starts at the same member.
    pub fn spread_by(&self, name: &str) {
        self.next.store(
            spread(name, self.urls.len()),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The member in use (its place in the URLs, from 0), or the next to try while none is.
    pub fn member(&self) -> usize {
        self.next.load(std::sync::atomic::Ordering::Relaxed) % self.urls.len()
    }

    /// After a connection failed: start with the next member.
    pub fn rotate(&self) {
        self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

/// The member (of `n`) that clients named `name` start at: a stable hash (SHA-256: the same
/// on every build), so that an operator can tell from the name where an agent connects.
pub fn spread(name: &str, n: usize) -> usize {
    let h = sha2::Sha256::digest(name.as_bytes());
    let x = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
    (x % n.max(1) as u64) as usize
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
    use super::{Meta, Published, may_have_landed, spread, unanswered};

    /// Agents start at the member their name hashes to: the same one on every build (the
    /// values are pinned), within the members, and a fleet's names spread over all of them.
    #[test]
    fn agents_spread_over_the_members_by_name() {
        for (name, n, member) in [
            ("fra-a-1", 3, 1),
            ("fra-a-2", 3, 0),
            ("ams-a-1", 3, 2),
            ("fra-a-1", 1, 0),
            ("fra-a-1", 0, 0),
        ] {
            assert_eq!(spread(name, n), member, "{name} of {n}");
        }
        for n in [2, 3, 5] {
            let mut per = vec![0; n];
            for i in 0..300 {
                per[spread(&format!("srv-{i}"), n)] += 1;
            }
            let fair = 300 / n;
            assert!(
                per.iter().all(|&c| c > fair * 3 / 4 && c < fair * 5 / 4),
                "{n} members: {per:?}"
            );
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
