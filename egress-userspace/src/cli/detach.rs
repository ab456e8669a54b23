//! `egress detach`: remove what an agent left attached and pinned for a server.

use std::process::ExitCode;

use super::ConfigArg;
use crate::loader;

/// Detach the programs (remove their pinned links) and remove the pinned maps.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArg,
    #[command(flatten)]
    pins: super::PinArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let dir = args.pins.dir(&args.config)?;
    loader::ensure_no_agent(&dir)?;
    let removed = loader::detach(&dir)?;
    if removed.is_empty() {
        println!("nothing pinned in {}", dir.display());
    }
    for p in removed {
        println!("removed {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}
