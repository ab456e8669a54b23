//! Command-line interface: one module per subcommand.

mod agent;
#[cfg(feature = "dev")]
mod bench;
#[cfg(feature = "dev")]
mod demo;
mod detach;
mod explain;
mod fleet;
mod flows;
#[cfg(feature = "dev")]
mod lab;
mod plan;
mod stats;
mod validate;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::config::Config;

/// Egress steering dataplane: sends each customer connection from one of its pool addresses.
#[derive(Debug, Parser)]
#[command(name = "egress", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// An error and its causes on one line, each cause once: many messages already include their
/// source's text, which the chain would otherwise repeat.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

/// A map pinned in `dir`, or an error naming it and saying what usually explains its absence.
pub fn open_pinned(dir: &std::path::Path, name: &str) -> anyhow::Result<aya::maps::MapData> {
    let path = dir.join(name);
    aya::maps::MapData::from_pin(&path).map_err(|e| {
        anyhow::Error::new(e).context(format!(
            "cannot open pinned map {} (is an agent running or has one run with this pin directory?)",
            path.display()
        ))
    })
}

#[derive(Debug, Subcommand)]
enum Command {
    Agent(agent::Args),
    Stats(stats::Args),
    #[cfg(feature = "dev")]
    Demo(demo::Args),
    Validate(validate::Args),
    Plan(plan::Args),
    Explain(explain::Args),
    Flows(flows::Args),
    Detach(detach::Args),
    #[cfg(feature = "dev")]
    Bench(bench::Args),
    /// The topology shared through etcd: publish, show, status, init.
    #[command(subcommand)]
    Fleet(fleet::Command),
    #[cfg(feature = "dev")]
    #[command(subcommand)]
    Lab(lab::Command),
}

impl Cli {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        if matches!(
            self.command,
            Command::Stats(_)
                | Command::Plan(_)
                | Command::Explain(_)
                | Command::Flows(_)
                | Command::Detach(_)
                | Command::Fleet(_)
        ) {
            // A one-shot report whose reader went away (`| head -1`) ends quietly, as other
            // command-line tools do, instead of panicking on the closed pipe. The agent and the
            // lab's servers keep SIGPIPE ignored: a closed stream is an error they handle;
            // validate ignores it and keeps its exit code.
            // SAFETY: restoring the default disposition of one signal, before any thread starts.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
        }
        match self.command {
            Command::Agent(a) => agent::run(a),
            Command::Stats(a) => stats::run(a),
            #[cfg(feature = "dev")]
            Command::Demo(a) => demo::run(a),
            Command::Validate(a) => validate::run(a),
            Command::Plan(a) => plan::run(a),
            Command::Explain(a) => explain::run(a),
            Command::Flows(a) => flows::run(a),
            Command::Detach(a) => detach::run(a),
            #[cfg(feature = "dev")]
            Command::Bench(a) => bench::run(a),
            #[cfg(feature = "dev")]
            Command::Lab(c) => lab::run(c),
            Command::Fleet(c) => fleet::run(c),
        }
    }
}

/// Output format of the reporting commands.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Format {
    Table,
    Json,
}

/// `--config FILE`, shared by the subcommands that read a config.
#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// Topology config (TOML). Without it, the embedded default (the built-in lab).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl ConfigArg {
    /// Loads and validates.
    fn topology(&self) -> anyhow::Result<crate::validate::Topology> {
        Ok(crate::validate::validate(&self.load()?)?)
    }

    fn load(&self) -> anyhow::Result<Config> {
        Ok(match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::embedded(),
        })
    }
}

/// `--server NAME | --pin-dir DIR`: whose pinned maps a command uses.
#[derive(Debug, clap::Args)]
struct PinArgs {
    /// Server whose pins to use (default: the config's `server`).
    #[arg(long, conflicts_with = "pin_dir")]
    server: Option<String>,
    /// Use the maps pinned in this directory instead.
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
}

impl PinArgs {
    fn dir(&self, config: &ConfigArg) -> anyhow::Result<PathBuf> {
        pin_dir_of(config, self.server.clone(), self.pin_dir.clone())
    }
}

/// The pin directory named by `--pin-dir`, or that of `--server` (default: the config's).
fn pin_dir_of(
    config: &ConfigArg,
    server: Option<String>,
    pin_dir: Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    Ok(match pin_dir {
        Some(dir) => dir,
        None => {
            let name = match server {
                Some(name) => name,
                None => config.load()?.select_server(None)?.name.clone(),
            };
            crate::loader::pin_dir(None, &name)
        }
    })
}
