//! nanokit: race-free shared package repositories, a service reconciliation
//! engine, and small shared state with named locks.
//!
//! Everything here is plain Rust; the Node-API glue lives in `node/` behind the
//! `node` feature.

pub mod cli;
pub mod error;
pub mod kv;
pub mod lock;
pub mod repo;

pub mod config;
pub mod engine;
pub mod graph;
pub mod provider;
pub mod state;
pub mod sys;
pub mod trace;

#[cfg(feature = "node")]
// napi-derive registers exports only outside `cfg(test)`, so the unit-test
// build sees them as unused.
#[cfg_attr(test, allow(dead_code))]
mod node;
