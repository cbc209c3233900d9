//! gRPC services: messages in, validated domain types to the [`Node`], and
//! back. Prost types stop here.
//!
//! [`Node`]: crate::node::Node

pub mod access;
pub mod admin;
pub mod checkpoint;
pub mod convert;
pub mod peer;

use crate::error::Error;
use crate::metrics::Metrics;

/// Largest message the client API sends or accepts: a streamed data
/// message plus headroom.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// Converts a node error into a status, counting it by method and code.
pub(crate) fn to_status(metrics: &Metrics, method: &'static str, err: Error) -> tonic::Status {
    let status = tonic::Status::from(err);
    metrics
        .rpc_errors
        .with_label_values(&[method, &format!("{:?}", status.code())])
        .inc();
    tracing::warn!(method, code = ?status.code(), message = status.message(), "request failed");
    status
}
