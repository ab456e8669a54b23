//! `egress detach`: remove what an agent left attached and pinned for a server.

use std::{path::PathBuf, process::ExitCode};

use super::ConfigArg;
use crate::loader;

/// Detach the programs (remove their pinned links) and remove the pinned maps.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArg,
    /// Server whose pins to remove (default: the config's `server`).
    #[arg(long, conflicts_with = "pin_dir")]
    server: Option<String>,
    /// Remove the pins in this directory instead.
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let dir = super::pin_dir_of(&args.config, args.server, args.pin_dir)?;
    let removed = loader::detach(&dir)?;
    if removed.is_empty() {
        println!("nothing pinned in {}", dir.display());
    }
    for p in removed {
        println!("removed {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}
