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
    /// Only the fleet convergence section, printed (no report written): for working on it.
    #[arg(long, hide = true)]
    fleet_only: bool,
    /// Only the failover section, printed (no report written): for working on it.
    #[arg(long, hide = true)]
    failover_only: bool,
    /// Only the per-packet section, printed (no report written): for working on it.
    #[arg(long, hide = true)]
    per_packet_only: bool,
    /// Only the end-to-end section for these setups (numbers into `Setup::ALL`, comma
    /// separated; their baselines are added), every load, printed: for working on it.
    #[arg(long, hide = true, value_delimiter = ',')]
    e2e_only: Vec<usize>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.per_packet_only {
        let rows = crate::bench::perpacket::measure(if args.quick { 200 } else { 20_000 })?;
        println!("{}", crate::bench::report::per_packet_markdown(&rows));
        return Ok(ExitCode::SUCCESS);
    }
    if !args.e2e_only.is_empty() {
        use crate::bench::e2e::{self, Setup};
        let mut setups: Vec<Setup> = Vec::new();
        for i in &args.e2e_only {
            let s = *Setup::ALL
                .get(*i)
                .ok_or_else(|| anyhow::anyhow!("--e2e-only: no setup {i}"))?;
            for s in [s.baseline().baseline(), s.baseline(), s] {
                if !setups.contains(&s) {
                    setups.push(s);
                }
            }
        }
        let plan = e2e::Plan {
            rounds: if args.quick { 1 } else { 3 },
            udp_seconds: 2.0,
            tcp_seconds: 3.0,
            setups,
            loads: e2e::LOADS.to_vec(),
        };
        let (rows, in_situ) = e2e::measure(&std::env::current_exe()?, &plan)?;
        for r in rows {
            println!(
                "{:<28} {:<26} {:>12.0} {} ×{:.2}",
                r.setup_name, r.load, r.median, r.unit, r.ratio_to_bare
            );
        }
        for i in in_situ {
            println!(
                "in situ {:<22} {:<26} {:<12} {:>6.0} ns ({} runs)",
                i.setup.name(),
                i.load,
                i.program,
                i.ns_per_run,
                i.runs
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.failover_only {
        let f = crate::bench::failover::measure(
            &std::env::current_exe()?,
            if args.quick { 1 } else { 5 },
        )?;
        println!("{}", crate::bench::failover::markdown(&f));
        return Ok(ExitCode::SUCCESS);
    }
    if args.fleet_only {
        let (sims, rounds) = if args.quick { (10, 2) } else { (200, 10) };
        let f = crate::bench::fleet::measure(&std::env::current_exe()?, sims, rounds)?;
        println!("{}", crate::bench::fleet::markdown(&f));
        return Ok(ExitCode::SUCCESS);
    }
    crate::bench::run(&crate::bench::Options {
        quick: args.quick,
        out_dir: args.out,
        egress_bin: std::env::current_exe()?,
    })?;
    Ok(ExitCode::SUCCESS)
}
