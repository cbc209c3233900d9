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

/// The gRPC code an error is reported with; also the `code` label of the
/// error metric.
pub fn grpc_code(err: &Error) -> tonic::Code {
    use tonic::Code;
    match err {
        Error::Core(cairn_core::CoreError::CorruptManifest(_)) => Code::DataLoss,
        Error::Core(_) | Error::InvalidArgument(_) => Code::InvalidArgument,
        Error::NotFound(_) => Code::NotFound,
        Error::AlreadyExists(_) => Code::AlreadyExists,
        Error::Aborted(_) => Code::Aborted,
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::ResourceExhausted(_) => Code::ResourceExhausted,
        Error::DataLoss(_) => Code::DataLoss,
        Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
        Error::Io { .. } if err.is_out_of_space() => Code::ResourceExhausted,
        Error::Io { .. } => Code::Internal,
        Error::Peer { status, .. } if status.code() == Code::ResourceExhausted => {
            Code::ResourceExhausted
        }
        Error::Unauthenticated(_) => Code::Unauthenticated,
        Error::PermissionDenied(_) => Code::PermissionDenied,
        Error::ObjectStore { .. }
        | Error::Peer { .. }
        | Error::Cancelled
        | Error::TierUnavailable(_) => Code::Unavailable,
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        tonic::Status::new(grpc_code(&err), err.to_string())
    }
}

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
