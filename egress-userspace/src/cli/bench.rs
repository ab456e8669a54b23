//! `egress bench`: the benchmarks (see `egress::bench`); `cargo xtask bench` runs this.

use std::{path::PathBuf, process::ExitCode};

/// Measure every path and the end-to-end rates against bare routing and nftables.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A few seconds' smoke run (small sizes, one round).
    #[arg(long)]
    quick: bool,
    /// Where report.json, report.md, performance.md and ratios.png go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    crate::bench::run(&crate::bench::Options {
        quick: args.quick,
        out_dir: args.out,
        egress_bin: std::env::current_exe()?,
    })?;
    Ok(ExitCode::SUCCESS)
}
