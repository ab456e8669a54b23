//! `egress agent`: load and attach the programs for one server, keep them until signalled.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use log::info;

use super::ConfigArg;
use crate::loader;

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
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = args.config.load()?;
    let server = config.select_server(args.server.as_deref())?;
    let pin_dir = loader::pin_dir(args.pin_dir.as_deref(), &server.name);
    loader::preflight(&server.uplink, &server.name, &pin_dir)?;

    let mut ebpf = loader::load(&pin_dir)?;
    let mode = loader::attach(&mut ebpf, &server.uplink)?;
    info!(
        "ready: server {} programs attached to {} ({mode:?}), maps pinned in {}",
        server.name,
        server.uplink,
        pin_dir.display()
    );

    wait_for_signal().context("waiting for signals")?;
    // Dropping `ebpf` closes the links: the programs detach. The maps stay pinned on purpose so
    // counters survive and the next agent adopts them.
    drop(ebpf);
    info!(
        "detached from {}; maps remain pinned in {}",
        server.uplink,
        pin_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
        Ok(())
    })
}
