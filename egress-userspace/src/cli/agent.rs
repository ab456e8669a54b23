//! `egress agent`: load the programs for one server, write its plan, attach, collect expired
//! flows until signalled.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use log::{info, warn};

use super::ConfigArg;
use crate::{flows, loader, plan};

/// Load the programs onto this server's uplink and run until SIGINT/SIGTERM.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArg,
    /// Which server of the config this is (default: the config's `server`).
    #[arg(long)]
    server: Option<String>,
    /// Where to pin the maps (default: /sys/fs/bpf/egress/<server>).
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    /// Flow table size (entries, LRU). Takes effect when the map is created, not when adopted.
    #[arg(long, default_value_t = egress_common::flow::FLOWS_CAPACITY)]
    flow_capacity: u32,
    /// How often expired flows are collected, in seconds.
    #[arg(long, default_value_t = 5)]
    gc_interval: u64,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let topology = args.config.topology()?;
    let server = topology
        .config
        .select_server(args.server.as_deref())?
        .clone();
    let pin_dir = loader::pin_dir(args.pin_dir.as_deref(), &server.name);
    loader::preflight(&server.uplink, &server.name, &pin_dir)?;

    let mut ebpf = loader::load(&pin_dir, args.flow_capacity)?;
    let mut maps = loader::take_maps(&mut ebpf)?;
    let local = loader::local_settings(server.fabric, &server.uplink)?;
    maps.set_local(&local)?;
    // The plan is in the maps before the programs see a packet.
    let plan = plan::plan(&topology, &server.name);
    let diff = maps
        .plan
        .apply(&plan::map_contents(&topology, &plan))
        .context("writing the plan")?;
    for e in plan
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
    info!(
        "plan for {}: {} entries; maps: {} added, {} updated, {} removed",
        server.name,
        plan.entries.len(),
        diff.added,
        diff.updated,
        diff.removed
    );
    let mode = loader::attach(&mut ebpf, &server.uplink)?;
    info!(
        "ready: server {} programs attached to {} ({mode:?}), maps pinned in {}",
        server.name,
        server.uplink,
        pin_dir.display()
    );

    run_until_signal(
        Duration::from_secs(args.gc_interval.max(1)),
        || match flows::collect(&mut maps.flows, flows::monotonic_ns()) {
            Ok(0) => {}
            Ok(n) => info!("collected {n} expired connections"),
            Err(e) => warn!("collecting expired flows: {e}"),
        },
    )
    .context("waiting for signals")?;
    // Dropping `ebpf` closes the links: the programs detach. The maps stay pinned on purpose so
    // counters and flows survive and the next agent adopts them.
    drop(ebpf);
    info!(
        "detached from {}; maps remain pinned in {}",
        server.uplink,
        pin_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Calls `tick` every `every` until SIGINT or SIGTERM.
fn run_until_signal(every: Duration, mut tick: impl FnMut()) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut timer = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
                _ = int.recv() => { info!("SIGINT: shutting down"); break; }
                _ = timer.tick() => tick(),
            }
        }
        Ok(())
    })
}
