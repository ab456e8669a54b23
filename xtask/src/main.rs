//! `cargo xtask`: set up the toolchain, build, run, drive the lab, test, demo, bench.
//!
//! Every command that needs the toolchain runs `setup` first, so a fresh machine needs nothing
//! done beforehand.

mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent; fast when all is there).
    Setup,
    /// Build the BPF programs and the `egress` binary.
    Build,
    /// The main job: without arguments, the demo over the built-in lab (as `demo`); with them,
    /// the agent on this host: `cargo xtask run -- --config FILE --server NAME`.
    Run {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build, inspect or remove the namespace lab.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
    /// Run every test (unit, BPF_PROG_TEST_RUN, end to end in namespaces).
    Test {
        /// Passed to `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Formatting and clippy (-D warnings) for the host crates and the BPF crate.
    Lint,
    /// Build the built-in lab, run real connections through it, print what the origin saw.
    Demo,
    /// Benchmarks against bare routing and nftables; a full run updates the README's
    /// Performance section. Report in target/bench/.
    Bench {
        /// A few seconds' smoke run.
        #[arg(long)]
        quick: bool,
    },
}

#[derive(Debug, Subcommand)]
enum LabAction {
    /// Build the default lab and leave it up (`--agents` also starts one agent per server).
    Up {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Remove every lab namespace, process and pin, including those of crashed runs.
    Down,
    /// Show what lab state exists.
    Status,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let root = workspace_root();
    match cli.command {
        Cmd::Setup => {
            setup::run(&root)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Build => {
            let env = setup::run(&root)?;
            build(&root, &env)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run { args } => {
            let bin = setup_and_build(&root)?;
            if args.is_empty() {
                egress(&bin, ["demo"], &[])
            } else {
                egress(&bin, ["agent"], &args)
            }
        }
        Cmd::Lab { action } => {
            let bin = setup_and_build(&root)?;
            match action {
                LabAction::Up { args } => egress(&bin, ["lab", "up"], &args),
                LabAction::Down => egress(&bin, ["lab", "down"], &[]),
                LabAction::Status => egress(&bin, ["lab", "status"], &[]),
            }
        }
        Cmd::Test { args } => {
            let env = setup::run(&root)?;
            let mut cmd = cargo(&root, &env);
            cmd.args(["test", "--features", DEV]).args(&args);
            let code = status(cmd)?;
            if code != ExitCode::SUCCESS || !args.is_empty() {
                return Ok(code);
            }
            // The benchmarks' smoke run, so they never rot (a few seconds, debug build). Its
            // report goes to a file: the test results stay the last thing printed.
            let out = root.join("target/bench-quick");
            std::fs::create_dir_all(&out)?;
            let mut cmd = Command::new(root.join("target/debug/egress"));
            cmd.args(["bench", "--quick", "--out"])
                .arg(&out)
                .stdout(std::fs::File::create(out.join("stdout.md"))?);
            let code = status(cmd)?;
            println!(
                "[test] bench smoke run (cargo xtask bench --quick): {}; report in {}",
                if code == ExitCode::SUCCESS {
                    "ok"
                } else {
                    "FAILED"
                },
                out.join("report.md").display()
            );
            Ok(code)
        }
        Cmd::Lint => {
            let env = setup::run(&root)?;
            lint(&root, &env)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo => {
            let bin = setup_and_build(&root)?;
            egress(&bin, ["demo"], &[])
        }
        Cmd::Bench { quick } => {
            let env = setup::run(&root)?;
            println!("[build] release build for the benchmarks");
            let mut cmd = cargo(&root, &env);
            cmd.args([
                "build",
                "--release",
                "--package",
                "egress-userspace",
                "--bins",
                "--features",
                DEV,
            ]);
            if !cmd
                .status()
                .context("running cargo build --release")?
                .success()
            {
                bail!("release build failed");
            }
            let out = root.join(if quick {
                "target/bench-quick"
            } else {
                "target/bench"
            });
            let mut args = vec!["--out".to_string(), out.display().to_string()];
            if quick {
                args.push("--quick".into());
            }
            let code = egress(&root.join("target/release/egress"), ["bench"], &args)?;
            if code == ExitCode::SUCCESS && !quick {
                update_readme(&root, &out.join("performance.md"))?;
            }
            Ok(code)
        }
    }
}

/// The developer tooling's feature (lab, demo, benchmarks, packet harness): every build
/// xtask makes has it; the server build (`cargo build --release -p egress-userspace`) never.
const DEV: &str = "egress-userspace/dev";

/// Replaces the README's generated "Performance" section with the report of a full run.
fn update_readme(root: &Path, section: &Path) -> anyhow::Result<()> {
    const START: &str = "<!-- performance:start -->";
    const END: &str = "<!-- performance:end -->";
    let readme = root.join("README.md");
    let text = std::fs::read_to_string(&readme)?;
    let new = std::fs::read_to_string(section)?;
    let (Some(a), Some(b)) = (text.find(START), text.find(END)) else {
        bail!("README.md has no {START} … {END} markers");
    };
    let updated = format!("{}{START}\n{new}{}", &text[..a], &text[b..]);
    std::fs::write(&readme, updated)?;
    println!(
        "[bench] README.md Performance section updated from {}",
        section.display()
    );
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

/// A cargo command in the workspace with the tools on PATH.
fn cargo(root: &Path, env: &setup::Env) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root).env("PATH", &env.path);
    cmd
}

fn build(root: &Path, env: &setup::Env) -> anyhow::Result<PathBuf> {
    println!("[build] egress-ebpf (bpf target) and egress-userspace");
    let mut cmd = cargo(root, env);
    cmd.args([
        "build",
        "--package",
        "egress-userspace",
        "--bins",
        "--features",
        DEV,
    ]);
    if !cmd.status().context("running cargo build")?.success() {
        bail!("build failed");
    }
    Ok(root.join("target/debug/egress"))
}

fn lint(root: &Path, env: &setup::Env) -> anyhow::Result<()> {
    let steps: [(&str, Vec<&str>); 4] = [
        ("fmt", vec!["fmt", "--all", "--", "--check"]),
        (
            "clippy (host crates, with the developer tooling)",
            vec![
                "clippy",
                "--all-targets",
                "--features",
                DEV,
                "--",
                "-D",
                "warnings",
            ],
        ),
        (
            "clippy (the server build: operator commands only)",
            vec![
                "clippy",
                "--package",
                "egress-userspace",
                "--",
                "-D",
                "warnings",
            ],
        ),
        (
            "clippy (BPF crate)",
            vec![
                "+nightly",
                "clippy",
                "--package",
                "egress-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--target-dir",
                "target/ebpf-clippy",
                "--",
                "-D",
                "warnings",
            ],
        ),
    ];
    for (name, args) in steps {
        println!("[lint] {name}");
        // `cargo +nightly` needs the rustup proxy, not the cargo binary running xtask.
        let mut cmd = if args[0].starts_with('+') {
            Command::new("cargo")
        } else {
            cargo(root, env)
        };
        cmd.current_dir(root).env("PATH", &env.path).args(&args);
        if !cmd
            .status()
            .with_context(|| format!("running cargo {name}"))?
            .success()
        {
            bail!("{name} failed");
        }
    }
    Ok(())
}

fn setup_and_build(root: &Path) -> anyhow::Result<PathBuf> {
    let env = setup::run(root)?;
    build(root, &env)
}

fn egress<const N: usize>(bin: &Path, sub: [&str; N], args: &[String]) -> anyhow::Result<ExitCode> {
    let mut cmd = Command::new(bin);
    cmd.args(sub).args(args);
    status(cmd)
}

/// Runs `cmd` and passes its exit code on.
fn status(mut cmd: Command) -> anyhow::Result<ExitCode> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    Ok(match st.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}
