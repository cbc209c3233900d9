//! The bodies of Cairn's fuzz targets, as plain functions.
//!
//! Each target feeds arbitrary bytes to a parser or validator that takes
//! input from outside the process (a client, a peer, the bucket, kubelet, a
//! file an operator or a pod wrote) and then checks what must hold of
//! whatever it accepted. No input may make a target panic: a panic is a bug,
//! either in Cairn or in the property the target states. Nothing may
//! allocate in proportion to a number read from the input either.
//!
//! Two runners call the same functions (see [`TARGETS`]):
//!
//! - `fuzz/libfuzzer/fuzz_targets/<name>.rs`, the cargo-fuzz binaries,
//!   which `./scripts/fuzz` runs under libFuzzer;
//! - `tests/replay.rs`, which runs every committed input of
//!   `fuzz/corpus/<name>/` and `fuzz/regressions/<name>/` through its target
//!   in the default test suite, with neither cargo-fuzz nor libFuzzer.
//!
//! Where a conversion needs a running daemon (a `Node`), the target runs its
//! pure part: the `*_with` conversions of `cairn_daemon::service::convert`
//! with the tenant rule of `Node::tenant`, and the validations each handler
//! applies to its fields.

mod codec;
mod config;
mod csi;
mod ingest;
mod manifest;
mod names;
mod requests;

pub use codec::{chunk_decode, chunk_roundtrip};
pub use config::daemon_config;
pub use csi::csi_request;
pub use ingest::ingest_json;
pub use manifest::{manifest_body, manifest_decode};
pub use names::names;
pub use requests::{admin_request, checkpoint_request, peer_request};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target, by the name of its cargo-fuzz binary and corpus folder.
pub const TARGETS: &[(&str, Target)] = &[
    ("manifest_decode", manifest_decode),
    ("manifest_body", manifest_body),
    ("chunk_decode", chunk_decode),
    ("chunk_roundtrip", chunk_roundtrip),
    ("names", names),
    ("checkpoint_request", checkpoint_request),
    ("admin_request", admin_request),
    ("peer_request", peer_request),
    ("csi_request", csi_request),
    ("ingest_json", ingest_json),
    ("daemon_config", daemon_config),
];

/// Longest error message any request may produce, whatever its size: a
/// status message travels in a header, and one that echoed its input whole
/// would turn a precise `INVALID_ARGUMENT` into a transport error.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// Asserts that an error message refusing a request stays short.
pub(crate) fn assert_short_message(what: &str, message: &str) {
    assert!(
        message.len() <= MAX_ERROR_MESSAGE,
        "{what}: a {} byte error message (the limit is {MAX_ERROR_MESSAGE}): {:.200}...",
        message.len(),
        message
    );
}
