//! The `cairn.v1` messages both sides of the daemon speak: conversions
//! between wire and domain types that the gRPC services and the peer tier's
//! client share. Only `cairn-core`, the generated messages and the error
//! type below it, so any layer may use it without a cycle (requests that
//! need a node to resolve, such as a tenant, are converted in
//! `service::convert`).

use std::pin::Pin;

use cairn_core::{Attempt, ChunkId, JobName, Manifest, ShardKey};
use cairn_proto::v1 as pb;
use futures::Stream;

use crate::error::{Error, Result};

/// A prefetch's progress messages, then its result: what the `Admin` and
/// `Peer` services stream and what the peer client reads back.
pub type PrefetchEvents<E> =
    Pin<Box<dyn Stream<Item = std::result::Result<pb::PrefetchProgress, E>> + Send>>;

/// A required sub-message.
pub fn required<'a, T>(field: &str, value: &'a Option<T>) -> Result<&'a T> {
    value
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument(format!("{field} is required")))
}

/// The job name in `field`.
pub fn job(field: &str, value: &str) -> Result<JobName> {
    Ok(JobName::parse(field, value.to_owned())?)
}

/// The wire form of a shard key.
pub fn shard_ref(key: &ShardKey) -> pb::ShardRef {
    pb::ShardRef {
        tenant: key.tenant.to_string(),
        job: key.job.to_string(),
        step: key.step.0,
        rank: key.rank.0,
    }
}

/// The wire form of a manifest.
pub fn manifest_to_pb(m: &Manifest) -> pb::ShardManifest {
    pb::ShardManifest {
        shard: Some(shard_ref(&m.shard)),
        world_size: m.world_size,
        chunk_size: m.chunk_size.get(),
        files: m
            .files
            .iter()
            .map(|f| pb::FileManifest {
                name: f.name.to_string(),
                size: f.size,
                chunks: f
                    .chunks
                    .iter()
                    .map(|c| pb::ChunkRef {
                        id: c.id.as_bytes().to_vec(),
                        len: c.len,
                    })
                    .collect(),
                metadata: f
                    .metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            })
            .collect(),
        metadata: m
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        manifest_hash: m.hash().as_bytes().to_vec(),
        committed_unix_ms: m.committed_unix_ms,
        attempt: attempt_to_pb(m.attempt.as_ref()),
    }
}

/// The wire form of an optional attempt (empty: none).
pub fn attempt_to_pb(attempt: Option<&Attempt>) -> String {
    attempt.map(|a| a.as_str().to_owned()).unwrap_or_default()
}

/// The summary returned by commits.
pub fn shard_info(m: &Manifest) -> pb::ShardInfo {
    pb::ShardInfo {
        shard: Some(shard_ref(&m.shard)),
        total_bytes: m.total_bytes(),
        file_count: m.files.len() as u32,
        chunk_count: m.chunk_count() as u32,
        manifest_hash: m.hash().as_bytes().to_vec(),
        committed_unix_ms: m.committed_unix_ms,
        attempt: attempt_to_pb(m.attempt.as_ref()),
    }
}

/// A 32-byte chunk id off the wire.
pub fn chunk_id(bytes: &[u8]) -> std::result::Result<ChunkId, tonic::Status> {
    let array: [u8; 32] = bytes.try_into().map_err(|_| {
        tonic::Status::invalid_argument(format!(
            "a chunk id is 32 bytes of BLAKE3, not {} bytes",
            bytes.len()
        ))
    })?;
    Ok(ChunkId::from_bytes(array))
}
