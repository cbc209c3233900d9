//! The plugin's error type and its one mapping to gRPC statuses.
//!
//! Every failure is classified by what the CO should do about it; the CSI
//! spec gives each NodePublishVolume / NodeUnpublishVolume condition its own
//! code (ALREADY_EXISTS for an incompatible republish, ABORTED for a call
//! racing another on the same volume, ...), so the classes follow the spec.

use cairn_core::CoreError;
use thiserror::Error;

/// Everything that can go wrong in the plugin. Each variant maps to exactly
/// one gRPC code in [`Error::code`]; messages name the field, volume or path
/// concerned and never contain secrets.
#[derive(Debug, Error)]
pub enum Error {
    /// A Cairn name (job, tenant) from the volume attributes broke the rules.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// A request field was missing or malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume capability asks for what a Cairn volume cannot be (block
    /// access, a multi-node mode, an fs_type, mount flags, a mount group):
    /// the spec's "Exceeds capabilities" condition of NodePublishVolume.
    #[error("{0}")]
    ExceedsCapabilities(String),
    /// The volume is not published here, or not at the path asked about
    /// (NodeGetVolumeStats).
    #[error("{0}")]
    NotFound(String),
    /// The volume is already published at the target with other arguments.
    #[error("{0}")]
    AlreadyExists(String),
    /// Another call on the same volume is in progress.
    #[error("{0}")]
    Aborted(String),
    /// The call does not fit the volume's state (published elsewhere, or a
    /// target that is not a directory the plugin may use).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The volume asks for what its pod may not have (a tenant its
    /// namespace is not), as cairnd decided when binding it.
    #[error("{0}")]
    PermissionDenied(String),
    /// The node's cairnd, needed to pre-fill the volume, did not answer:
    /// the CO retries, and the daemon is usually back by then.
    #[error("{0}")]
    Unavailable(String),
    /// The node's cairnd failed to restore the checkpoint to pre-fill.
    #[error("{0}")]
    Internal(String),
    /// The RPC is one the plugin does not advertise.
    #[error("{0} is not supported by cairn-csi")]
    Unimplemented(&'static str),
    /// The configuration given at start is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A filesystem or mount operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the plugin was doing, as a verb phrase with the path.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The plugin's result type.
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

impl<T> IoContext<T> for rustix::io::Result<T> {
    fn io_context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|errno| Error::Io {
            context: context(),
            source: errno.into(),
        })
    }
}

impl Error {
    /// The gRPC code this error is reported with.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::Core(_) | Error::InvalidArgument(_) | Error::Config(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::Aborted(_) => Code::Aborted,
            Error::FailedPrecondition(_) | Error::ExceedsCapabilities(_) => {
                Code::FailedPrecondition
            }
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Unavailable(_) => Code::Unavailable,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Internal(_) => Code::Internal,
            Error::Io { source, .. } if is_out_of_space(source) => Code::ResourceExhausted,
            Error::Io { .. } => Code::Internal,
        }
    }
}

fn is_out_of_space(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        tonic::Status::new(err.code(), err.to_string())
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
