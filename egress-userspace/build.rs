//! Builds the BPF programs (egress-ebpf) with the nightly toolchain and bpf-linker, and puts the
//! object in OUT_DIR for `include_bytes!`. The linker is taken from PATH, else from where
//! `cargo xtask setup` builds it (`target/tools/bpf-linker/bin`), so a plain `cargo build`
//! works after setup; `AYA_BUILD_SKIP=1` skips it (the agent then refuses to start).
use std::path::{Path, PathBuf};

/// Whether `bpf-linker` is on `path` (a PATH value).
fn on_path(path: &std::ffi::OsStr) -> bool {
    std::env::split_paths(path).any(|d| d.join("bpf-linker").is_file())
}

fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&manifest).parent().expect("workspace root");
    println!("cargo:rerun-if-env-changed=PATH");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let skip = std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v != "0" && v != "false");
    if !skip && !on_path(&path) {
        let tools = root.join("target/tools/bpf-linker/bin");
        if !tools.join("bpf-linker").is_file() {
            anyhow::bail!(
                "bpf-linker not found (on PATH or in {}): run `cargo xtask setup` once",
                tools.display()
            );
        }
        let mut dirs: Vec<PathBuf> = vec![tools];
        dirs.extend(std::env::split_paths(&path));
        // SAFETY: the build script is single-threaded here; the variable is read by the cargo
        // process aya-build spawns for the BPF crate.
        unsafe { std::env::set_var("PATH", std::env::join_paths(dirs)?) };
    }
    let ebpf_dir = root.join("egress-ebpf");
    // aya-build watches the eBPF crate; the shared types change the object too.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("egress-common/src").display()
    );
    let ebpf_dir = ebpf_dir.to_str().expect("utf-8 path");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "egress-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
