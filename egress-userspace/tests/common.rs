//! Shared helpers of the privileged end-to-end tests.
#![allow(dead_code, reason = "each test file uses a different subset")]

use egress::{
    config::Config,
    lab::{Lab, LabSpec},
};

pub const EGRESS: &str = env!("CARGO_BIN_EXE_egress");

/// These tests load BPF programs and build namespaces: they need root, and say so plainly.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "end-to-end tests need root (run `cargo xtask test` as root)"
    );
}

pub fn lab(config: Config) -> Lab {
    require_root();
    Lab::up(LabSpec::new(config, EGRESS)).expect("lab builds")
}
