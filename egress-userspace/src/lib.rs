//! The egress steering agent and CLI as a library, so the integration tests and the demo use
//! the same code as the binary.

pub mod agent;
pub mod apply;
pub mod bench;
pub mod cli;
pub mod config;
pub mod demo;
pub mod explain;
pub mod fleet;
pub mod flows;
pub mod lab;
pub mod liveness;
pub mod loader;
pub mod plan;
pub mod stats;
pub mod testrun;
pub mod validate;
