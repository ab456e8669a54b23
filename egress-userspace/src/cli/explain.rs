//! `egress explain`: why a destination leaves the way it does from one server.

use std::{net::IpAddr, process::ExitCode};

use super::{ConfigArg, Format};
use crate::explain;

/// Say which policy, pool, tier and next hops apply to a destination, and why.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArg,
    /// The server the connection starts on (default: the config's `server`).
    #[arg(long)]
    server: Option<String>,
    /// The destination address.
    #[arg(long)]
    dst: IpAddr,
    /// The socket's mark (tenant id, SO_MARK).
    #[arg(long, default_value_t = 0)]
    mark: u32,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let t = args.config.topology()?;
    let server = t.config.select_server(args.server.as_deref())?.name.clone();
    let e = explain::explain(&t, &server, args.dst, args.mark);
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&e)?),
        Format::Table => {
            println!("{} → {} (mark {})", e.server, e.destination, e.mark);
            if let Some(m) = &e.matched {
                println!(
                    "policy:  policies[{}] mark {} {} → pool {}{}",
                    m.policy,
                    m.mark,
                    m.destination,
                    m.pool,
                    if m.fell_back_to_mark_0 {
                        " (no rule for this mark: mark 0's)"
                    } else {
                        ""
                    }
                );
            }
            if let Some(en) = &e.entry {
                println!("tier:    {} ({:?})", en.tier.as_str(), en.action);
                for h in &en.next_hops {
                    println!("next hop {} {}", h.server, h.fabric);
                }
            }
            println!("why:     {}", e.why);
        }
    }
    Ok(ExitCode::SUCCESS)
}
