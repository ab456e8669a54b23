//! The agent's side of fleet mode: one task that reads the published topology, watches it, and
//! keeps the agent's status key alive under a lease. It reconnects with backoff; the agent's
//! loop only receives [`Event`]s and sends [`super::Status`] updates.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::bail;
use etcd_client::{PutOptions, WatchOptions};
use tokio::sync::{mpsc, watch};

use super::{Endpoint, Published, Status, describe, read_published};

/// Lease of the status key: the key vanishes this long after the agent (or its link to etcd)
/// dies, and its peers take it as down.
pub const STATUS_TTL: i64 = 2;
/// How often the lease is kept alive: three times a TTL.
const KEEP_ALIVE: Duration = Duration::from_millis(600);
pub const BACKOFF_FIRST: Duration = Duration::from_millis(250);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub enum Event {
    /// What is published (after connecting, then on every change).
    Published(Published),
    /// Nothing is published under the prefix (yet).
    Nothing,
    /// The connection to etcd failed: why. The agent keeps its plan; the task reconnects.
    Lost(String),
    /// etcd refuses this agent's status key (its identity may not write it): why. The topology
    /// is still read and watched; no status is written in this session.
    StatusRefused(String),
    /// Of the peers asked about (the agent's next hops), those whose agent's status key (its
    /// lease) exists now.
    Leases(BTreeSet<String>),
}

/// A session that lasted this long was healthy: the next failure starts the backoff over.
const HEALTHY: Duration = Duration::from_secs(10);

/// Runs until `events` is closed.
pub async fn run(
    ep: Endpoint,
    server: String,
    events: mpsc::UnboundedSender<Event>,
    mut status: watch::Receiver<Status>,
    mut interest: watch::Receiver<BTreeSet<String>>,
) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        let started = Instant::now();
        let why = match session(&ep, &server, &events, &mut status, &mut interest).await {
            Ok(()) => return, // the agent is gone
            Err(e) => crate::cli::error_text(&e),
        };
        // Only a session that ran well for a while resets the backoff: one that fails right
        // after connecting (a refusal, a member that answers reads and nothing else) must not
        // turn into a tight reconnect loop.
        if started.elapsed() >= HEALTHY {
            backoff = BACKOFF_FIRST;
        }
        ep.rotate();
        if events.send(Event::Lost(why)).is_err() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn denied(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated))
}

/// One connection: read, then watch and keep the lease until something fails.
async fn session(
    ep: &Endpoint,
    server: &str,
    events: &mpsc::UnboundedSender<Event>,
    status: &mut watch::Receiver<Status>,
    interest: &mut watch::Receiver<BTreeSet<String>>,
) -> anyhow::Result<()> {
    let urls = ep.urls.join(",");
    let mut client = ep.connect().await?;
    let (published, at) = read_published(&mut client, ep).await?;
    let sent = events.send(published.map_or(Event::Nothing, Event::Published));
    if sent.is_err() {
        return Ok(());
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
    let lease = client
        .lease_grant(STATUS_TTL, None)
        .await
        .map_err(|e| describe(e, &urls, None))?
        .id();
    let (mut keeper, mut acks) = client
        .lease_keep_alive(lease)
        .await
        .map_err(|e| describe(e, &urls, None))?;
    let key = ep.keys.status(server);
    // Writes the status; a refusal is reported once and ends status writes for the session.
    let mut refused = false;
    let mut put = async |client: &mut etcd_client::Client, s: Status| -> anyhow::Result<()> {
        if refused {
            return Ok(());
        }
        let value = serde_json::to_vec(&s)?;
        match client
            .put(
                key.as_str(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if denied(&e) => {
                refused = true;
                let _ = events.send(Event::StatusRefused(crate::cli::error_text(&describe(
                    e,
                    &urls,
                    Some(&key),
                ))));
                Ok(())
            }
            Err(e) => Err(describe(e, &urls, Some(&key))),
        }
    };
    let current = status.borrow_and_update().clone();
    put(&mut client, current).await?;
    // The leases of the peers the agent asks about, watched key by key (not the whole
    // status prefix: an agent hears about its next hops, not about the fleet).
    let mut names = interest.borrow_and_update().clone();
    let (mut leases, mut present) = lease_view(&mut client, ep, &names).await?;
    if events.send(Event::Leases(present.clone())).is_err() {
        return Ok(());
    }
    let mut tick = tokio::time::interval(KEEP_ALIVE);
    let mut answered = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if answered.elapsed() > Duration::from_secs(STATUS_TTL as u64) + KEEP_ALIVE {
                    bail!("no answer from etcd for {:?}", answered.elapsed());
                }
                keeper.keep_alive().await.map_err(|e| describe(e, &urls, None))?;
            }
            ack = acks.message() => match ack.map_err(|e| describe(e, &urls, None))? {
                Some(a) if a.ttl() > 0 => answered = Instant::now(),
                Some(_) => bail!("the status key's lease expired"),
                None => bail!("etcd closed the lease stream"),
            },
            msg = stream.message() => {
                let Some(resp) = msg.map_err(|e| describe(e, &urls, Some(&ep.keys.topology())))? else {
                    bail!("etcd closed the watch");
                };
                if resp.canceled() {
                    bail!("etcd cancelled the watch: {}", resp.cancel_reason());
                }
                let event = match from_events(ep, resp.events()) {
                    Seen::Nothing => None,
                    Seen::Event(e) => Some(e),
                    // Only one of the two keys: read both, from one revision.
                    Seen::Partial => {
                        let (published, _) = read_published(&mut client, ep).await?;
                        Some(published.map_or(Event::Nothing, Event::Published))
                    }
                };
                if let Some(e) = event && events.send(e).is_err() {
                    return Ok(());
                }
            }
            changed = interest.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                names = interest.borrow_and_update().clone();
                (leases, present) = lease_view(&mut client, ep, &names).await?;
                if events.send(Event::Leases(present.clone())).is_err() {
                    return Ok(());
                }
            }
            msg = async {
                match leases.as_mut() {
                    Some(w) => w.message().await,
                    None => std::future::pending().await,
                }
            } => {
                let Some(resp) = msg.map_err(|e| describe(e, &urls, Some(&ep.keys.statuses())))? else {
                    bail!("etcd closed the lease watch");
                };
                if resp.canceled() {
                    bail!("etcd cancelled the lease watch: {}", resp.cancel_reason());
                }
                let before = present.clone();
                for e in resp.events() {
                    let Some(name) = e
                        .kv()
                        .and_then(|kv| kv.key_str().ok())
                        .and_then(|k| k.strip_prefix(&ep.keys.statuses()))
                    else {
                        continue;
                    };
                    if !names.contains(name) {
                        continue;
                    }
                    if e.event_type() == etcd_client::EventType::Put {
                        present.insert(name.to_string());
                    } else {
                        present.remove(name);
                    }
                }
                if present != before && events.send(Event::Leases(present.clone())).is_err() {
                    return Ok(());
                }
            }
            changed = status.changed() => {
                if changed.is_err() {
                    // The agent is exiting: take the status key with it.
                    let _ = client.lease_revoke(lease).await;
                    return Ok(());
                }
                let current = status.borrow_and_update().clone();
                put(&mut client, current).await?;
            }
        }
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

/// Which of `names` have a status key now (one transaction), and a watch on each key from
/// that revision on (None: nobody to watch).
async fn lease_view(
    client: &mut etcd_client::Client,
    ep: &Endpoint,
    names: &BTreeSet<String>,
) -> anyhow::Result<(Option<etcd_client::WatchStream>, BTreeSet<String>)> {
    let urls = ep.urls.join(",");
    if names.is_empty() {
        return Ok((None, BTreeSet::new()));
    }
    let ops: Vec<etcd_client::TxnOp> = names
        .iter()
        .map(|n| {
            etcd_client::TxnOp::get(
                ep.keys.status(n),
                Some(etcd_client::GetOptions::new().with_keys_only()),
            )
        })
        .collect();
    let resp = client
        .txn(etcd_client::Txn::new().and_then(ops))
        .await
        .map_err(|e| describe(e, &urls, Some(&ep.keys.statuses())))?;
    let at = resp.header().map_or(0, |h| h.revision());
    let present = names
        .iter()
        .zip(resp.op_responses())
        .filter(|(_, r)| matches!(r, etcd_client::TxnOpResponse::Get(g) if !g.kvs().is_empty()))
        .map(|(n, _)| n.clone())
        .collect();
    let from = || Some(WatchOptions::new().with_start_revision(at + 1));
    let mut keys = names.iter().map(|n| ep.keys.status(n));
    let first = keys.next().expect("names is not empty");
    let mut stream = client
        .watch(first, from())
        .await
        .map_err(|e| describe(e, &urls, Some(&ep.keys.statuses())))?;
    for k in keys {
        stream
            .watch(k, from())
            .await
            .map_err(|e| describe(e, &urls, Some(&ep.keys.statuses())))?;
    }
    Ok((Some(stream), present))
}
