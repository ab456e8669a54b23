//! Builds the BPF programs (egress-ebpf) with the nightly toolchain and bpf-linker, and puts the
//! object in OUT_DIR for `include_bytes!`. Run through `cargo xtask`, which puts the linker on
//! PATH; `AYA_BUILD_SKIP=1` skips it (the agent then refuses to start).
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&manifest).parent().expect("workspace root");
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
