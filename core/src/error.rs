//! The one error type of the core crate.

use thiserror::Error;

/// Why a value from outside, or a stored manifest, was rejected.
///
/// Every variant names the field or object at fault so that the daemon can
/// hand the message to the user unchanged (as an `INVALID_ARGUMENT` status or
/// a CLI error line).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// A name (job, tenant, file, ...) broke the naming rules.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidName {
        /// Which field carried the name, e.g. `job` or `files[2].name`.
        field: String,
        /// The offending value, truncated to keep messages short.
        value: String,
        /// The rule that was broken.
        reason: &'static str,
    },
    /// A number was outside its allowed range.
    #[error("invalid {field}: {reason}")]
    InvalidValue {
        /// Which field carried the value.
        field: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A chunk id was not 64 hexadecimal digits.
    #[error("invalid chunk id {0:?}: expected 64 hex digits")]
    InvalidChunkId(String),
    /// A manifest could not be decoded or failed its own consistency checks.
    #[error("corrupt manifest: {0}")]
    CorruptManifest(String),
    /// A stored chunk's header or body could not be decoded.
    #[error("corrupt stored chunk: {0}")]
    CorruptChunk(String),
}
