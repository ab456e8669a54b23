//! `egress agent`: run the agent of one server until SIGINT/SIGTERM; SIGHUP or a changed config
//! file reloads; metrics over HTTP.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use log::{info, warn};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use crate::agent::{Agent, Options};

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
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let opts = Options {
        config_path: args.config.clone(),
        server: args.server.clone(),
        pin_dir: args.pin_dir.clone(),
        flow_capacity: args.flow_capacity,
        peer_budget: args.peer_budget,
        metrics_addr: (!args.no_metrics).then_some(args.metrics_addr),
        migrate: args.migrate,
    };
    let (mut agent, mode, listener) = Agent::start(&opts)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The address actually bound (`--metrics-addr 127.0.0.1:0` picks a port).
    let metrics_at = listener.as_ref().and_then(|l| l.local_addr().ok());
    let metrics = {
        let _guard = rt.enter();
        listener.map(TcpListener::from_std).transpose()?
    };
    agent.housekeeping();
    info!(
        "ready: server {} attached ({mode:?}), maps pinned in {}, metrics {}",
        agent.server,
        agent.pin_dir.display(),
        match metrics_at {
            None => "off".to_string(),
            Some(a) => format!("http://{a}/metrics"),
        }
    );
    // spawn_local: the metrics tasks share the loop's thread (the agent is not Send).
    let local = tokio::task::LocalSet::new();
    local
        .block_on(
            &rt,
            serve(
                &mut agent,
                metrics,
                Duration::from_secs(args.gc_interval.max(1)),
            ),
        )
        .context("agent loop")?;
    agent.shutdown(args.detach_on_exit)?;
    Ok(ExitCode::SUCCESS)
}

/// Largest flow table (entries; about 100 bytes each, preallocated: 1.6 GiB).
const MAX_FLOW_CAPACITY: i64 = 16 << 20;

/// Requests from the metrics server to the agent's loop: a channel to send the rendered text on.
type Render = tokio::sync::oneshot::Sender<Result<String, String>>;

/// Scrapes served at once; more wait in the kernel's accept queue.
const METRICS_CONNECTIONS: usize = 8;
/// What a scraper gets to send its request, and to take the answer.
const METRICS_IO: Duration = Duration::from_secs(2);

async fn serve(
    agent: &mut Agent,
    metrics: Option<TcpListener>,
    every: Duration,
) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut watch = tokio::time::interval(Duration::from_secs(1));
    // The collector runs on a thread of its own and reports each pass; the loop only takes the
    // results in.
    let (pass_tx, mut passes) = tokio::sync::mpsc::unbounded_channel();
    let mut keeper = agent.housekeeper().map_err(std::io::Error::other)?;
    std::thread::Builder::new()
        .name("collector".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                // A pass that panics is reported and the next one runs: the table never evicts,
                // so a collector that stopped would end in refused connections.
                let pass = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| keeper.run()))
                    .unwrap_or_else(|_| Err("the collector's pass panicked".into()));
                if pass_tx.send(pass).is_err() {
                    return;
                }
            }
        })?;
    // Metrics are served on tasks of their own; the loop only renders the text on request, so
    // a slow or idle scraper never delays a reload or a collection.
    let (render_tx, mut render_rx) = tokio::sync::mpsc::channel::<Render>(METRICS_CONNECTIONS);
    if let Some(listener) = metrics {
        tokio::task::spawn_local(accept_scrapes(listener, render_tx));
    }
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => agent.reload("SIGHUP"),
            _ = watch.tick() => {
                agent.repair();
                if agent.config_changed() {
                    agent.reload("config file changed")
                } else if agent.retry_due() {
                    agent.reload("retrying the plan that failed to be written")
                }
            }
            Some(pass) = passes.recv() => agent.apply_pass(pass),
            Some(reply) = render_rx.recv() => {
                let _ = reply.send(agent.render_metrics().map_err(|e| format!("{e:#}")));
            }
        }
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
