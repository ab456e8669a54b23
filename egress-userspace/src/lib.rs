//! The egress steering agent and CLI as a library, so the integration tests and the demo use
//! the same code as the binary.

pub mod cli;
pub mod config;
pub mod demo;
pub mod lab;
pub mod loader;
pub mod stats;
