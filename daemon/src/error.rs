//! The daemon's error type. Its one mapping to gRPC statuses is in
//! `service` (`service::grpc_code`), the only layer that speaks gRPC to
//! clients.

use std::time::Duration;

use cairn_core::CoreError;
use thiserror::Error;

/// Everything that can go wrong inside the daemon, classified by what the
/// caller should do about it. Each variant maps to exactly one gRPC code in
/// `service::grpc_code`; messages name the field, shard, file or path
/// concerned.
#[derive(Debug, Error)]
pub enum Error {
    /// A name or value from outside broke the rules (or a stored manifest is corrupt).
    #[error(transparent)]
    Core(#[from] CoreError),
    /// A request was malformed in a way the core types cannot express.
    #[error("{0}")]
    InvalidArgument(String),
    /// The shard, step, session or job does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The shard was already committed.
    #[error("{0}")]
    AlreadyExists(String),
    /// Another operation holds what this one needs (a second writer for a shard).
    #[error("{0}")]
    Aborted(String),
    /// The operation is not valid in the current state (commit of an aborted session).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A tier is full and nothing can be evicted.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Bytes were lost or corrupted in every tier that had them.
    #[error("{0}")]
    DataLoss(String),
    /// A wait ran out of time.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A tier the answer depends on could not be asked (the bucket did not
    /// answer a listing): UNAVAILABLE, so that "nothing found" is never
    /// mistaken for "nothing there".
    #[error("{0}")]
    TierUnavailable(String),
    /// A local filesystem operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the daemon was doing, as a verb phrase with the path.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An object-store request failed (network, credentials, throttling or
    /// the service itself). Reported as UNAVAILABLE: the bucket may answer
    /// on a later try, and the shard's other tiers are unaffected.
    #[error("{context}: {source}")]
    ObjectStore {
        /// What the daemon was doing, as a verb phrase with the object key.
        context: String,
        /// The store's error, a timeout, or a cancellation.
        #[source]
        source: ObjectError,
    },
    /// A peer daemon could not be reached or refused a request. Reported as
    /// UNAVAILABLE (the next candidate or a later try may succeed), except a
    /// full peer, which stays RESOURCE_EXHAUSTED so placement moves on.
    #[error("peer {node}: {context}: {}", status.message())]
    Peer {
        /// The peer's node id.
        node: String,
        /// What the daemon was doing, as a verb phrase.
        context: String,
        /// The peer's answer, or the transport's error.
        status: Box<tonic::Status>,
    },
    /// A caller of the peer service did not prove who it is (no or a wrong
    /// certificate for the node it names).
    #[error("{0}")]
    Unauthenticated(String),
    /// A caller is known but not allowed (a node outside the membership).
    #[error("{0}")]
    PermissionDenied(String),
    /// The operation was abandoned because cairnd is shutting down (its
    /// cancellation token fired).
    #[error("cancelled: cairnd is shutting down")]
    Cancelled,
}

impl Error {
    /// Whether trying the same operation again cannot help: the request or
    /// the stored data is wrong, the caller is not allowed, or the target
    /// already holds something else. Pipelines stop retrying such a failure
    /// at once and mark the shard as needing attention; everything else
    /// (I/O, a full tier, an unreachable peer or bucket, a timeout, a
    /// shutdown) is worth another try.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Core(_)
            | Self::InvalidArgument(_)
            | Self::NotFound(_)
            | Self::AlreadyExists(_)
            | Self::FailedPrecondition(_)
            | Self::DataLoss(_)
            | Self::Unauthenticated(_)
            | Self::PermissionDenied(_) => true,
            Self::ObjectStore { source, .. } => source.is_permanent(),
            Self::Peer { status, .. } => matches!(
                status.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::Unauthenticated
                    | tonic::Code::PermissionDenied
                    | tonic::Code::AlreadyExists
            ),
            Self::Aborted(_)
            | Self::ResourceExhausted(_)
            | Self::DeadlineExceeded(_)
            | Self::TierUnavailable(_)
            | Self::Io { .. }
            | Self::Cancelled => false,
        }
    }

    /// Whether the error says a filesystem or tier ran out of space
    /// (`RESOURCE_EXHAUSTED`, or `ENOSPC`/`EDQUOT` from the OS): worth trying
    /// again once space comes back, unlike most local errors.
    pub fn is_out_of_space(&self) -> bool {
        match self {
            Self::ResourceExhausted(_) => true,
            Self::Io { source, .. } => {
                matches!(
                    source.raw_os_error(),
                    Some(libc::ENOSPC) | Some(libc::EDQUOT)
                ) || matches!(
                    source.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                )
            }
            _ => false,
        }
    }
}

/// How one object-store request ended when it did not succeed: the store's own
/// error, no answer in time, or the daemon shutting down. `is_permanent`
/// decides whether it is retried (by the object tier's request loop, and by
/// the upload pipeline).
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The store answered with an error, or the connection failed.
    #[error(transparent)]
    Store(#[from] object_store::Error),
    /// No answer within the bound of one request.
    #[error("no answer within {} s", .0.as_secs_f64())]
    Timeout(Duration),
    /// cairnd is shutting down; the request was abandoned.
    #[error("cancelled: cairnd is shutting down")]
    Cancelled,
}

impl ObjectError {
    /// Whether trying again cannot help: an answer about the object (absent,
    /// already there, precondition) or about the caller (credentials,
    /// permissions, an invalid key), as opposed to a failure on the way.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Store(e) => is_permanent_store_error(e),
            Self::Timeout(_) | Self::Cancelled => false,
        }
    }

    /// Whether the object is absent.
    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, Self::Store(object_store::Error::NotFound { .. }))
    }
}

fn is_permanent_store_error(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::NotFound { .. }
            | object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. }
            | object_store::Error::NotModified { .. }
            | object_store::Error::NotImplemented { .. }
            | object_store::Error::NotSupported { .. }
            | object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }
            | object_store::Error::InvalidPath { .. }
            | object_store::Error::UnknownConfigurationKey { .. }
    )
}

/// The daemon's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a verb-phrase context to I/O errors.
pub trait IoContext<T> {
    /// Wraps the error with `context()`, evaluated only on failure.
    fn io_context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io_context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(err: tokio::task::JoinError) -> Self {
        Error::Io {
            context: "running a blocking task".into(),
            source: std::io::Error::other(err.to_string()),
        }
    }
}
