//! Cairn's gRPC API, `cairn.v1`, as generated tonic/prost code.
//!
//! Prost types stop at the daemon's service layer: each service converts
//! messages into validated `cairn-core` types on arrival.

#![allow(missing_docs, clippy::all)]

/// `cairn.v1`: the client (`Checkpoint`), operator (`Admin`) and
/// daemon-to-daemon (`Peer`) services.
pub mod v1 {
    tonic::include_proto!("cairn.v1");

    /// The encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("cairn_v1_descriptor");
}
