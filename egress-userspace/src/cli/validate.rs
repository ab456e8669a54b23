//! `egress validate`: check a config; exit 0 when valid, 2 when invalid, 1 on any other failure.

use std::{path::PathBuf, process::ExitCode};

use crate::{
    config::{Config, ConfigError},
    validate,
};

/// Check a config file and name every bad field.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The config to check.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

pub const EXIT_INVALID: u8 = 2;

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e @ ConfigError::Read { .. }) => return Err(e.into()),
        Err(e @ ConfigError::Parse { .. }) => {
            say(&mut std::io::stderr(), &format!("invalid config: {e}\n"));
            return Ok(ExitCode::from(EXIT_INVALID));
        }
    };
    match validate::validate(&config) {
        Ok(t) => {
            say(
                &mut std::io::stdout(),
                &format!(
                    "{}: valid ({} servers, {} pools, {} policy rules)\n",
                    args.config.display(),
                    t.config().servers.len(),
                    t.pools().len(),
                    t.rules().len()
                ),
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            say(
                &mut std::io::stderr(),
                &format!("{}: {e}", args.config.display()),
            );
            Ok(ExitCode::from(EXIT_INVALID))
        }
    }
}

/// Writes the verdict; a reader that went away (`| head -1`) does not change the exit code.
fn say(out: &mut dyn std::io::Write, text: &str) {
    let _ = out.write_all(text.as_bytes());
}
