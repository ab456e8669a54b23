//! The egress steering agent and CLI as a library, so the integration tests and the demo use
//! the same code as the binary. The developer tooling (lab, demo, benchmarks, packet test
//! harness) is built only with the `dev` feature: the server binary carries none of it.

pub mod agent;
pub mod apply;
#[cfg(feature = "dev")]
pub mod bench;
pub mod cli;
pub mod config;
#[cfg(feature = "dev")]
pub mod demo;
pub mod explain;
pub mod filter;
pub mod fleet;
pub mod flows;
#[cfg(feature = "dev")]
pub mod lab;
pub mod liveness;
pub mod loader;
pub mod plan;
pub mod stats;
#[cfg(feature = "dev")]
pub mod testrun;
pub mod validate;

/// A random number from the operating system's generator (std's hasher seeds are drawn from
/// it, and each `RandomState` moves on): for keys and jitter, nothing cryptographic.
pub fn random_u64() -> u64 {
    use std::hash::BuildHasher as _;
    std::hash::RandomState::new().hash_one(0u8)
}
