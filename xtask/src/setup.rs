//! `cargo xtask setup`: everything a fresh machine needs, each step skipped when already done.
//!
//! 1. rust-src for the nightly toolchain (the BPF target builds `core` from source).
//! 2. bpf-linker, built against the nightly rustc's own libLLVM (same LLVM major), into
//!    `target/tools/`.
//! 3. Debian packages the tests and demo use.
//! 4. bpffs mounted at /sys/fs/bpf.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// What the tests and the demo run: bpftool (map dumps), ping, curl, iperf3, nft, ip,
/// nsenter/setpriv, sysctl, ethtool (the lab's links for XDP), the font of the benchmark
/// chart, and fleet mode's etcd.
const DEBIAN_PACKAGES: &[&str] = &[
    "bpftool",
    "ethtool",
    "iputils-ping",
    "curl",
    "iperf3",
    "nftables",
    "iproute2",
    "util-linux",
    "procps",
    "fonts-dejavu-core",
    // Fleet mode: the lab's etcd members, etcdctl (tests write to etcd as other clients would),
    // and protoc with the well-known types (google/protobuf/*.proto), which the etcd client's
    // build needs: they come in libprotobuf-dev, only a recommendation of protobuf-compiler.
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    "libprotobuf-dev",
];

/// What later steps need from setup.
pub struct Env {
    /// PATH with the tools directory first.
    pub path: OsString,
}

pub fn run(root: &Path) -> anyhow::Result<Env> {
    let started = Instant::now();
    let tools = root.join("target/tools");
    step("rust-src (nightly)", rust_src)?;
    let linker_bin = step("bpf-linker", || bpf_linker(&tools))?;
    step("debian packages", debian_packages)?;
    step("bpffs", bpffs)?;
    println!("[setup] done in {:.1} s", started.elapsed().as_secs_f64());

    let mut path = OsString::from(linker_bin.as_os_str());
    if let Some(old) = std::env::var_os("PATH") {
        path.push(":");
        path.push(old);
    }
    Ok(Env { path })
}

fn step<T>(name: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let t = Instant::now();
    let out = f().with_context(|| format!("setup step {name}"))?;
    println!("[setup] {name}: ok ({:.1} s)", t.elapsed().as_secs_f64());
    Ok(out)
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_status(cmd: &mut Command) -> anyhow::Result<()> {
    if !cmd
        .status()
        .with_context(|| format!("running {cmd:?}"))?
        .success()
    {
        bail!("{cmd:?} failed");
    }
    Ok(())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    println!("[setup] adding rust-src to the nightly toolchain");
    run_status(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

/// The LLVM major version of the nightly rustc, from `rustc +nightly -vV`.
fn nightly_llvm_major() -> anyhow::Result<u32> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    parse_llvm_major(&vv).context("no `LLVM version:` line in `rustc +nightly -vV`")
}

fn parse_llvm_major(vv: &str) -> Option<u32> {
    vv.lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next()?.parse().ok())
}

/// Builds bpf-linker into `tools/bpf-linker` unless the right version for this LLVM is there.
/// Returns the directory holding the binary.
fn bpf_linker(tools: &Path) -> anyhow::Result<PathBuf> {
    let major = nightly_llvm_major()?;
    let root = tools.join("bpf-linker");
    let bin_dir = root.join("bin");
    let stamp = root.join("built-for");
    let want = format!("bpf-linker {BPF_LINKER_VERSION} llvm {major}\n");
    if bin_dir.join("bpf-linker").exists()
        && std::fs::read_to_string(&stamp).ok() == Some(want.clone())
    {
        return Ok(bin_dir);
    }

    // rustc ships LLVM as a shared library exporting the C API with the BPF target; bpf-linker
    // links against it through an LLVM_PREFIX holding two names for that file.
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&lib_dir)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let prefix = tools.join("llvm");
    let prefix_lib = prefix.join("lib");
    let _ = std::fs::remove_dir_all(&prefix);
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", libllvm.as_str()] {
        std::os::unix::fs::symlink(lib_dir.join(&libllvm), prefix_lib.join(name))?;
    }
    println!(
        "[setup] building bpf-linker {BPF_LINKER_VERSION} against {libllvm} (about a minute or two)"
    );
    run_status(
        Command::new("cargo")
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
                "--force",
                "--root",
            ])
            .arg(&root)
            .env("LLVM_PREFIX", &prefix),
    )?;
    std::fs::write(&stamp, want)?;
    Ok(bin_dir)
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| !String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("[setup] installing {}", missing.join(" "));
    run_status(Command::new("apt-get").args(["update", "-qq"]))?;
    run_status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    if mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
            && l.split_whitespace().nth(2) == Some("bpf")
    }) {
        return Ok(());
    }
    println!("[setup] mounting bpffs at /sys/fs/bpf");
    run_status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

#[cfg(test)]
mod tests {
    use super::parse_llvm_major;

    #[test]
    fn llvm_major_is_read_from_rustc_vv() {
        let vv = "rustc 1.97.0-nightly\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(parse_llvm_major(vv), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0\n"), None);
    }
}
