//! The agent's side of fleet mode: one task that reads the published topology, watches it, and
//! keeps the agent's status key alive under a lease. It reconnects with backoff; the agent's
//! loop only receives [`Event`]s and sends [`super::Status`] updates.

use std::time::{Duration, Instant};

use anyhow::bail;
use etcd_client::{PutOptions, WatchOptions};
use tokio::sync::{mpsc, watch};

use super::{Endpoint, Published, Status, describe, read_published};

/// Lease of the status key: the key vanishes this long after the agent (or its link to etcd)
/// dies.
pub const STATUS_TTL: i64 = 6;
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
}

/// Runs until `events` is closed.
pub async fn run(
    ep: Endpoint,
    server: String,
    events: mpsc::UnboundedSender<Event>,
    mut status: watch::Receiver<Status>,
) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        let why = match session(&ep, &server, &events, &mut status, &mut backoff).await {
            Ok(()) => return, // the agent is gone
            Err(e) => crate::cli::error_text(&e),
        };
        ep.rotate();
        if events.send(Event::Lost(why)).is_err() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection: read, then watch and keep the lease until something fails.
async fn session(
    ep: &Endpoint,
    server: &str,
    events: &mpsc::UnboundedSender<Event>,
    status: &mut watch::Receiver<Status>,
    backoff: &mut Duration,
) -> anyhow::Result<()> {
    let urls = ep.urls.join(",");
    let mut client = ep.connect().await?;
    let (published, at) = read_published(&mut client, ep).await?;
    *backoff = BACKOFF_FIRST;
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
    let put = |client: &mut etcd_client::Client, s: Status| {
        let key = key.clone();
        let mut client = client.clone();
        let urls = urls.clone();
        async move {
            client
                .put(
                    key.as_str(),
                    serde_json::to_vec(&s)?,
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await
                .map_err(|e| describe(e, &urls, Some(&key)))?;
            anyhow::Ok(())
        }
    };
    let current = status.borrow_and_update().clone();
    put(&mut client, current).await?;
    let mut tick = tokio::time::interval(Duration::from_secs(STATUS_TTL as u64) / 3);
    let mut answered = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if answered.elapsed() > Duration::from_secs(STATUS_TTL as u64) {
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
                if !resp.events().is_empty() {
                    // Both keys, from one revision (an event carries one key at a time).
                    let (published, _) = read_published(&mut client, ep).await?;
                    if events.send(published.map_or(Event::Nothing, Event::Published)).is_err() {
                        return Ok(());
                    }
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
