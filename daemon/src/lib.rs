//! `cairnd`, Cairn's node daemon, and the pieces the `cairn` CLI shares.
//!
//! Layers, outermost first (see `ARCHITECTURE.md`):
//! [`server`] (listeners, lifecycle) → [`service`] (gRPC ↔ domain, the
//! peer service included) → [`node`] (sessions, commit, write-back,
//! retention, restore) → [`tier`] (memory, disk, peers, object store, and
//! the copy and fill loops of `tier::transfer`) → [`wire`], [`membership`]
//! and the helpers → `cairn-core` (pure logic). `scripts/check-module-cycles`
//! keeps the top-level modules free of cycles.

// Sizes, counts and offsets arrive from outside (requests, manifests, peers,
// listings, files on disk): they must use checked or saturating arithmetic.
#![warn(clippy::arithmetic_side_effects)]

pub mod client;
pub mod config;
pub mod error;
pub mod failpoint;
pub mod fsutil;
pub mod hashing;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod pod_fs;
pub mod retry;
pub mod server;
pub mod service;
pub mod tier;
pub mod wire;
