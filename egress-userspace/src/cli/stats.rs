//! `egress stats`: the datapath's counters, read from the pinned maps.

use std::process::ExitCode;

use super::{ConfigArg, Format};
use crate::stats;

/// Print the datapath counters of a running (or stopped) agent.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArg,
    #[command(flatten)]
    pins: super::PinArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let pin_dir = args.pins.dir(&args.config)?;
    let values = stats::read(&pin_dir)?;
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&values)?),
        Format::Table => {
            println!("{:<24} {:>14} {:>16}", "counter", "packets", "bytes");
            for v in &values {
                println!("{:<24} {:>14} {:>16}", v.name, v.packets, v.bytes);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
