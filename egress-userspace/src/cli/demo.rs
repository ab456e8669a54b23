//! `egress demo`: the built-in lab with real connections; exits non-zero if any row is wrong.

use std::process::ExitCode;

/// Build the built-in lab, connect from every server, show what the origin saw, tear down.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_: Args) -> anyhow::Result<ExitCode> {
    let rows = crate::demo::run(&std::env::current_exe()?)?;
    let bad = rows.iter().filter(|r| !r.ok).count();
    println!("{} rows, {} wrong", rows.len(), bad);
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
