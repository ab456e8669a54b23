//! `egress fleet …`: the topology shared through etcd — publish it, show it, see whether the
//! fleet agrees, and set up the fleet's certificates and etcd roles.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::{
    config::{Config, ConfigError},
    fleet::{self, EtcdArgs, pki},
    plan,
};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    Publish(PublishArgs),
    Show(ShowArgs),
    Status(StatusArgs),
    Init(InitArgs),
}

pub fn run(c: Command) -> anyhow::Result<ExitCode> {
    match c {
        Command::Publish(a) => publish(a),
        Command::Show(a) => show(a),
        Command::Status(a) => status(a),
        Command::Init(a) => init(a),
    }
}

/// Validate a topology and publish it to the fleet (one transaction, refused if someone else
/// published since it was read).
#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// The topology (TOML) to publish.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Publish only if the published topology is still at this revision (what `fleet show`
    /// said); default: the revision read just before writing.
    #[arg(long, value_name = "REVISION")]
    expect_revision: Option<i64>,
}

fn publish(a: PublishArgs) -> anyhow::Result<ExitCode> {
    let text = crate::config::read_text(&a.config)?;
    let origin = a.config.display().to_string();
    let invalid = match Config::parse(&text, &origin) {
        Err(e @ ConfigError::Read { .. }) => return Err(e.into()),
        Err(e) => Some(format!("invalid config: {e}")),
        Ok(c) => crate::validate::validate(&c)
            .err()
            .map(|e| format!("{origin}: {e}")),
    };
    if let Some(msg) = invalid {
        eprintln!("{}", msg.trim_end());
        eprintln!("nothing published");
        return Ok(ExitCode::from(super::validate::EXIT_INVALID));
    }
    let ep = a.etcd.endpoint()?;
    let p = fleet::block_on(async {
        let mut client = ep.connect().await?;
        fleet::publish(&mut client, &ep, &text, a.expect_revision).await
    })??;
    println!(
        "published {} as revision {} (serial {}, sha256 {}), replacing revision {}",
        a.config.display(),
        p.revision,
        p.meta.serial,
        &p.meta.sha256[..16],
        p.previous
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ShowFormat {
    /// Revision, when, by whom, hash.
    Summary,
    /// The topology as published.
    Toml,
    /// The topology as JSON.
    Json,
}

/// What is published: revision, when, by whom, a hash, or the topology itself.
#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    #[arg(long, value_enum, default_value = "summary")]
    format: ShowFormat,
}

fn nothing_published(ep: &fleet::Endpoint) -> anyhow::Error {
    anyhow::anyhow!(
        "nothing is published under {} (a wrong --prefix? `egress fleet publish` writes one)",
        ep.keys.prefix()
    )
}

fn show(a: ShowArgs) -> anyhow::Result<ExitCode> {
    let ep = a.etcd.endpoint()?;
    let (published, _) = fleet::block_on(async {
        let mut client = ep.connect().await?;
        fleet::read_published(&mut client, &ep).await
    })??;
    let p = published.ok_or_else(|| nothing_published(&ep))?;
    match a.format {
        ShowFormat::Toml => print!("{}", p.text),
        ShowFormat::Json => {
            let c = Config::parse(&p.text, &ep.keys.config())?;
            println!("{}", serde_json::to_string_pretty(&c)?);
        }
        ShowFormat::Summary => {
            println!("revision   {}", p.revision);
            match &p.meta {
                Some(m) => {
                    println!("serial     {}", m.serial);
                    println!("published  {}", fleet::rfc3339(m.published_at));
                    println!(
                        "by         {}@{}{}",
                        m.user,
                        m.host,
                        m.identity
                            .as_ref()
                            .map(|i| format!(" (etcd user {i})"))
                            .unwrap_or_default()
                    );
                    println!("sha256     {}", m.sha256);
                }
                None => println!("meta       missing or unreadable (not written by egress?)"),
            }
            let verdict = match Config::parse(&p.text, &ep.keys.config())
                .map_err(anyhow::Error::from)
                .and_then(|c| Ok(crate::validate::validate(&c)?))
            {
                Ok(t) => format!(
                    "valid ({} servers, {} pools, {} policy rules)",
                    t.config().servers.len(),
                    t.pools().len(),
                    t.rules().len()
                ),
                Err(e) => format!("INVALID: {}", super::error_text(&e).replace('\n', "; ")),
            };
            println!("topology   {verdict}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One row per server: is its agent alive, which revision does it run, does its plan match the
/// published topology's.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    #[arg(long, value_enum, default_value = "table")]
    format: super::Format,
    /// Exit 3 when the fleet does not agree (for scripts and alerts).
    #[arg(long)]
    check: bool,
}

/// `fleet status --check`'s exit code when the fleet does not agree.
pub const EXIT_DISAGREE: u8 = 3;

/// A server as `fleet status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub server: String,
    /// Its status key exists (its agent's lease is alive).
    pub alive: bool,
    pub applied_revision: i64,
    /// Publishes it is behind (None: unknown).
    pub lag: Option<u64>,
    pub plan_hash: Option<String>,
    /// Its plan is the one the published topology gives it.
    pub agrees: bool,
    pub drops: u64,
    pub in_topology: bool,
    /// Peers this server's agent sees down.
    pub sees_down: Vec<String>,
    pub note: String,
}

/// The fleet's view: published revision and one row per server.
#[derive(Debug, Clone, Serialize)]
pub struct FleetView {
    pub revision: i64,
    pub serial: u64,
    pub servers: Vec<Row>,
    /// Every server of the topology alive, on the published revision, with the expected plan.
    pub agree: bool,
}

/// Builds the view from what is published and the status keys (pure: tested below). A
/// server is named by its status key (what etcd's roles let only that server's agent write),
/// never by what the value says.
pub fn view(published: Option<&fleet::Published>, statuses: &[fleet::StatusEntry]) -> FleetView {
    let (revision, serial) = published.map_or((0, None), |p| {
        (p.revision, p.meta.as_ref().map(|m| m.serial))
    });
    let parsed = published.map(|p| {
        Config::parse(&p.text, "published")
            .map_err(anyhow::Error::from)
            .and_then(|c| Ok(crate::validate::validate(&c)?))
    });
    let topology = parsed.as_ref().and_then(|r| r.as_ref().ok());
    let invalid = matches!(parsed, Some(Err(_)));
    let by_name: BTreeMap<&str, &fleet::StatusEntry> =
        statuses.iter().map(|s| (s.server.as_str(), s)).collect();
    // What each server should run: the published topology, around the peers it reports down.
    let mut expected: BTreeMap<String, String> = BTreeMap::new();
    if let Some(t) = topology {
        for s in &t.config().servers {
            let down = by_name
                .get(s.name.as_str())
                .and_then(|e| e.status.as_ref().ok())
                .map(|st| st.peers_down.clone())
                .unwrap_or_default();
            expected.insert(
                s.name.clone(),
                plan::plan_hash(t, &plan::plan_with(t, &s.name, &down)),
            );
        }
    }
    let mut names: Vec<String> = expected.keys().cloned().collect();
    names.extend(
        by_name
            .keys()
            .filter(|n| !expected.contains_key(**n))
            .map(|n| n.to_string()),
    );
    let servers: Vec<Row> = names
        .into_iter()
        .map(|name| {
            let entry = by_name.get(name.as_str());
            let s = entry.and_then(|e| e.status.as_ref().ok());
            let want = expected.get(&name);
            let mut note = Vec::new();
            match entry.map(|e| &e.status) {
                None => note.push("no agent (lease gone)".to_string()),
                Some(Err(e)) => note.push(format!("status unreadable: {e}")),
                Some(Ok(s)) => {
                    if s.server != name {
                        note.push(format!("status claims server {:?}", s.server));
                    }
                    if let Some(r) = &s.rejected {
                        note.push(format!("rejected: {r}"));
                    }
                    if !s.peers_down.is_empty() {
                        let d: Vec<&str> = s.peers_down.keys().map(String::as_str).collect();
                        note.push(format!("sees down: {}", d.join(", ")));
                    }
                    if !s.dataplane {
                        note.push("no dataplane".into());
                    }
                    if want.is_some_and(|w| s.applied_revision == revision && &s.plan_hash != w) {
                        note.push("plan differs from the published topology's".into());
                    }
                }
            }
            if invalid {
                note.push("the published topology is invalid".into());
            } else if want.is_none() {
                note.push("not in the published topology".into());
            }
            let agrees = match (s, want) {
                (Some(s), Some(w)) => {
                    s.server == name && s.applied_revision == revision && &s.plan_hash == w
                }
                _ => false,
            };
            Row {
                alive: entry.is_some(),
                applied_revision: s.map_or(0, |s| s.applied_revision),
                lag: s.and_then(|s| Some(serial?.saturating_sub(s.applied_serial))),
                plan_hash: s.map(|s| s.plan_hash.clone()),
                agrees,
                drops: s.map_or(0, |s| s.drops),
                in_topology: want.is_some(),
                sees_down: s
                    .map(|s| s.peers_down.keys().cloned().collect())
                    .unwrap_or_default(),
                note: note.join("; "),
                server: name,
            }
        })
        .collect();
    FleetView {
        revision,
        serial: serial.unwrap_or(0),
        agree: topology.is_some() && servers.iter().all(|r| r.agrees),
        servers,
    }
}

fn status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let ep = a.etcd.endpoint()?;
    let (published, statuses) = fleet::block_on(async {
        let mut client = ep.connect().await?;
        let (p, _) = fleet::read_published(&mut client, &ep).await?;
        let s = fleet::read_statuses(&mut client, &ep).await?;
        anyhow::Ok((p, s))
    })??;
    if published.is_none() && statuses.is_empty() {
        return Err(nothing_published(&ep));
    }
    let v = view(published.as_ref(), &statuses);
    match a.format {
        super::Format::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        super::Format::Table => {
            println!(
                "published revision {} (serial {}); fleet {}",
                v.revision,
                v.serial,
                if v.agree { "agrees" } else { "DOES NOT AGREE" }
            );
            println!(
                "{:<16} {:<5} {:>9} {:>4} {:<16} {:<6} {:>10}  NOTE",
                "SERVER", "ALIVE", "REVISION", "LAG", "PLAN", "AGREES", "DROPS"
            );
            for r in &v.servers {
                println!(
                    "{:<16} {:<5} {:>9} {:>4} {:<16} {:<6} {:>10}  {}",
                    r.server,
                    if r.alive { "yes" } else { "NO" },
                    r.applied_revision,
                    r.lag.map_or("-".into(), |l| l.to_string()),
                    r.plan_hash.as_deref().unwrap_or("-"),
                    if r.agrees { "yes" } else { "NO" },
                    r.drops,
                    r.note
                );
            }
        }
    }
    if a.check && !v.agree {
        return Ok(ExitCode::from(EXIT_DISAGREE));
    }
    Ok(ExitCode::SUCCESS)
}

/// Create the fleet's CA and certificates, then its etcd users and roles, and enable etcd
/// authentication. Idempotent: what exists is kept (a CA only replaced with --new-ca).
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// etcd endpoints (https). Their addresses go into the members' certificate.
    #[arg(long = "etcd", value_name = "URLS", value_delimiter = ',')]
    urls: Vec<String>,
    /// Key prefix of the fleet (what the roles grant).
    #[arg(long, default_value = fleet::DEFAULT_PREFIX)]
    prefix: String,
    /// Where the CA and every identity's directory go.
    #[arg(long, value_name = "DIR")]
    ca_dir: PathBuf,
    /// The topology (TOML) whose servers get an agent identity each.
    #[arg(long, value_name = "FILE")]
    servers: PathBuf,
    /// Make the certificates only (before the members first start with them).
    #[arg(long)]
    certs_only: bool,
    /// Replace an existing CA (and reissue every certificate).
    #[arg(long)]
    new_ca: bool,
    /// Issue this identity's certificate again (e.g. egress-agent-s1); repeatable.
    #[arg(long, value_name = "USER")]
    reissue: Vec<String>,
    /// Validity of the certificates issued now, in days.
    #[arg(long, default_value_t = 365)]
    days: u32,
}

/// The host of an etcd URL (an IP address: members are named by address).
fn url_host(url: &str) -> anyhow::Result<IpAddr> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or(rest);
    let host = host
        .rsplit_once(':')
        .map_or(host, |(h, _)| h)
        .trim_matches(['[', ']']);
    host.parse()
        .with_context(|| format!("--etcd {url}: the host must be an IP address"))
}

fn init(a: InitArgs) -> anyhow::Result<ExitCode> {
    if a.urls.is_empty() {
        bail!("--etcd: give the members' URLs (their addresses go into their certificate)");
    }
    let config = Config::load(&a.servers)?;
    crate::validate::validate(&config)
        .with_context(|| format!("{}: not a valid topology", a.servers.display()))?;
    let servers: Vec<String> = config.servers.iter().map(|s| s.name.clone()).collect();
    let hosts = a
        .urls
        .iter()
        .map(|u| url_host(u))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if a.ca_dir.join(crate::fleet::tls::CA_FILE).exists() && a.new_ca {
        eprintln!(
            "replacing the CA in {} (--new-ca): every certificate is issued again",
            a.ca_dir.display()
        );
    }
    let identities = pki::users(&servers);
    if let Some(unknown) = a.reissue.iter().find(|u| !identities.contains(u)) {
        bail!(
            "--reissue {unknown}: no such identity (one of: {})",
            identities.join(", ")
        );
    }
    let ca = pki::ca(&a.ca_dir, a.new_ca)?;
    let mut made = Vec::new();
    if ca.created {
        made.push(format!("CA {}", a.ca_dir.join("ca.crt").display()));
    }
    let member = a.ca_dir.join(pki::MEMBER_DIR).join(pki::MEMBER_CERT);
    if ca.created || !member.exists() {
        ca.issue_member(&a.ca_dir, &hosts, a.days)?;
        made.push(format!("member certificate {}", member.display()));
    }
    for user in pki::users(&servers) {
        let dir = pki::identity_dir(&a.ca_dir, &user);
        let present = dir.join(crate::fleet::tls::CERT_FILE).exists();
        if ca.created || !present || a.reissue.contains(&user) {
            ca.issue_client(&a.ca_dir, &user, 0, a.days)?;
            made.push(format!("{user} in {}", dir.display()));
        }
    }
    if !a.certs_only {
        let ep = EtcdArgs {
            urls: a.urls.clone(),
            prefix: a.prefix.clone(),
            etcd_tls: Some(pki::identity_dir(&a.ca_dir, pki::ROOT_USER)),
            ..Default::default()
        }
        .endpoint()?;
        let roles = fleet::block_on(async {
            let mut client = ep.connect().await?;
            crate::fleet::roles::ensure(&mut client, &ep, &servers).await
        })??;
        made.extend(roles);
    }
    if made.is_empty() {
        println!("nothing to do: {} is complete", a.ca_dir.display());
    } else {
        for m in &made {
            println!("created {m}");
        }
    }
    if !a.certs_only {
        println!(
            "etcd authentication is on; identities in {}",
            a.ca_dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Status;

    fn published(text: &str, revision: i64, serial: u64) -> fleet::Published {
        fleet::Published {
            text: text.to_string(),
            meta: Some(fleet::Meta {
                serial,
                published_at: 0,
                host: "h".into(),
                user: "u".into(),
                identity: None,
                sha256: fleet::sha256_hex(text.as_bytes()),
            }),
            revision,
        }
    }

    fn status_of(server: &str, text: &str, revision: i64, serial: u64) -> fleet::StatusEntry {
        let t = crate::validate::validate(&Config::parse(text, "t").unwrap()).unwrap();
        fleet::StatusEntry {
            server: server.into(),
            status: Ok(Status {
                server: server.into(),
                applied_revision: revision,
                applied_serial: serial,
                plan_hash: plan::plan_hash(&t, &plan::plan(&t, server)),
                dataplane: true,
                ..Default::default()
            }),
        }
    }

    fn st(e: &mut fleet::StatusEntry) -> &mut Status {
        e.status.as_mut().unwrap()
    }

    #[test]
    fn the_view_says_who_is_behind_missing_or_different() {
        let text = crate::config::DEFAULT_CONFIG;
        let c = Config::embedded();
        let names: Vec<String> = c.servers.iter().map(|s| s.name.clone()).collect();
        let p = published(text, 40, 3);
        let all: Vec<fleet::StatusEntry> =
            names.iter().map(|n| status_of(n, text, 40, 3)).collect();
        let v = view(Some(&p), &all);
        assert!(v.agree, "{v:?}");
        assert!(v.servers.iter().all(|r| r.lag == Some(0) && r.agrees));

        // One behind by a publish, one gone, one with another server's plan.
        let mut some = all.clone();
        st(&mut some[0]).applied_revision = 30;
        st(&mut some[0]).applied_serial = 2;
        some.remove(1);
        let other = st(&mut some[2]).plan_hash.clone();
        st(&mut some[1]).plan_hash = other;
        let v = view(Some(&p), &some);
        assert!(!v.agree);
        let row = |n: &str| v.servers.iter().find(|r| r.server == n).unwrap();
        assert_eq!(row(&names[0]).lag, Some(1));
        assert!(!row(&names[0]).agrees);
        assert!(!row(&names[1]).alive);
        assert_eq!(row(&names[1]).note, "no agent (lease gone)");
        assert!(
            row(&names[2]).note.contains("plan differs"),
            "{:?}",
            row(&names[2])
        );
        assert!(row(&names[3]).agrees);

        // A status from a server the topology does not have.
        let mut extra = all.clone();
        extra.push(fleet::StatusEntry {
            server: "ghost".into(),
            status: Ok(Status::default()),
        });
        let v = view(Some(&p), &extra);
        assert!(!v.agree);
        assert!(!v.servers.last().unwrap().in_topology);

        // An agent writing, under its own key, a value that claims another server (a dead
        // one, with the right revision and hash): the row is named by the key, and the dead
        // server stays dead.
        let mut liar = all.clone();
        let dead = liar.remove(1);
        let claimed = dead.status.clone().unwrap();
        liar[0].status = Ok(claimed);
        let v = view(Some(&p), &liar);
        assert!(!v.agree);
        let row = |n: &str| v.servers.iter().find(|r| r.server == n).unwrap().clone();
        assert!(!row(&names[1]).alive, "{:?}", row(&names[1]));
        assert!(!row(&names[0]).agrees);
        assert!(
            row(&names[0]).note.contains("status claims server"),
            "{:?}",
            row(&names[0])
        );

        // An unreadable status is shown, not dropped.
        let mut garbled = all.clone();
        garbled[2].status = Err("expected value at line 1 column 1".into());
        let v = view(Some(&p), &garbled);
        assert!(row_of(&v, &names[2]).alive);
        assert!(row_of(&v, &names[2]).note.contains("status unreadable"));
        assert!(!v.agree);

        // An invalid published topology says so on every row.
        let bad = published("servers = [", 41, 4);
        let v = view(Some(&bad), &all);
        assert!(!v.agree);
        assert!(
            v.servers
                .iter()
                .all(|r| r.note.contains("published topology is invalid"))
        );
    }

    fn row_of(v: &FleetView, n: &str) -> Row {
        v.servers.iter().find(|r| r.server == n).unwrap().clone()
    }

    #[test]
    fn member_hosts_come_from_the_urls() {
        assert_eq!(
            url_host("https://10.9.0.1:2379").unwrap(),
            "10.9.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            url_host("https://[fd00::1]:2379").unwrap(),
            "fd00::1".parse::<IpAddr>().unwrap()
        );
        assert!(url_host("https://etcd.example:2379").is_err());
    }
}
