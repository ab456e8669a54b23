//! `egress plan`: what a server does with each pool and family (a dry run of the agent).

use std::process::ExitCode;

use super::{ConfigArg, Format};
use crate::plan;

/// Print a server's plan: tier, action, SNAT targets and next hops per pool and family.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArg,
    /// The server to plan for (default: the config's `server`).
    #[arg(long)]
    server: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let t = args.config.topology()?;
    let server = t
        .config()
        .select_server(args.server.as_deref())?
        .name
        .clone();
    let p = plan::plan(&t, &server);
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&p)?),
        Format::Table => {
            println!("plan for {server}");
            println!(
                "{:<12} {:<6} {:<17} {:<8} snat / next hops",
                "pool", "family", "tier", "action"
            );
            for e in &p.entries {
                let detail: Vec<String> = if e.snat.is_empty() {
                    e.next_hops
                        .iter()
                        .map(|h| format!("{} ({})", h.server, h.fabric))
                        .collect()
                } else {
                    e.snat
                        .iter()
                        .map(|s| format!("{} {}-{}", s.address, s.ports[0], s.ports[1]))
                        .collect()
                };
                println!(
                    "{:<12} {:<6} {:<17} {:<8} {}",
                    e.pool,
                    format!("{:?}", e.family).to_lowercase(),
                    e.tier.as_str(),
                    format!("{:?}", e.action).to_lowercase(),
                    detail.join(", ")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
