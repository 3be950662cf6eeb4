//! nanokit: race-free shared package repositories, a service reconciliation
//! engine, and small shared state with named locks.
//!
//! Everything here is plain Rust; the Node-API glue lives in `node/` behind
//! the `node` feature. Modules are listed by layer, top down; each imports
//! only the layers below it (docs/architecture.md).

// Front ends: parse, convert, print; the local dashboard.
pub mod cli;
#[cfg(feature = "hub")]
pub mod hub;
#[cfg(feature = "node")]
// napi-derive registers exports only outside `cfg(test)`, so the unit-test
// build sees them as unused.
#[cfg_attr(test, allow(dead_code))]
mod node;

// The reconciliation engine: lock → observe → plan → apply.
pub mod engine;
// Runtimes that run a service's instances.
pub mod provider;
// state.json (local or PostgreSQL) and its deploy lock; the package repository.
pub mod repo;
pub mod state;
// Primitives: the lease lock, the key/value store, nanokit.yml, the dependency graph.
pub mod config;
pub mod graph;
pub mod kv;
pub mod lock;
// PostgreSQL connections (URL, TLS, errors), for kv/ and state/.
pub mod pg;
// Spans, trace files, the timeline and the secret masker.
pub mod trace;
// The OS layer and the error codes.
pub mod error;
pub mod sys;
