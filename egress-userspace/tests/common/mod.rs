//! Shared helpers of the privileged tests.
#![allow(dead_code, reason = "each test file uses a different subset")]

pub mod packet;

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

/// The origin's answer: the source address and port it saw.
pub fn seen(body: &str) -> (String, u16) {
    let v: serde_json::Value =
        serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("origin answer {body:?}: {e}"));
    (
        v["src"].as_str().expect("src").to_string(),
        v["port"].as_u64().expect("port") as u16,
    )
}

/// A lab of the embedded default config with the agent running on `servers`.
pub fn lab_with_agents(servers: &[&str]) -> Lab {
    let mut lab = lab(Config::embedded());
    for s in servers {
        lab.start_agent(s).expect("agent starts");
    }
    lab
}
