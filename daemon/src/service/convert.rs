//! Conversions between `cairn.v1` messages and domain types. Every field
//! from outside is validated here, and errors name the field.

use std::collections::BTreeMap;

use cairn_core::{Attempt, FileName, JobName, Rank, ShardKey, Step, TenantName};
use cairn_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::node::progress::ProgressSnapshot;
use crate::node::{BeginShard, FileSpec, Node};
use crate::tier::TierKind;
pub use crate::wire::{attempt_to_pb, job, manifest_to_pb, required, shard_info, shard_ref};

/// Longest metadata key or value accepted, and most entries per map.
const MAX_METADATA_LEN: usize = 4096;
const MAX_METADATA_ENTRIES: usize = 256;
/// Most files in one shard.
pub const MAX_FILES: usize = 100_000;

fn metadata(
    field: &str,
    map: &std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    if map.len() > MAX_METADATA_ENTRIES {
        return Err(Error::InvalidArgument(format!(
            "{field}: more than {MAX_METADATA_ENTRIES} entries"
        )));
    }
    for (k, v) in map {
        if k.len() > MAX_METADATA_LEN || v.len() > MAX_METADATA_LEN {
            return Err(Error::InvalidArgument(format!(
                "{field}[{k:.40}]: longer than {MAX_METADATA_LEN} bytes"
            )));
        }
    }
    Ok(map.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// Resolves a request's tenant: as the socket's access allows in the
/// service, as [`Node::tenant`] does for operators, and without a node in
/// the fuzz targets.
pub type TenantOf<'a> = &'a dyn Fn(&str) -> Result<TenantName>;

/// A shard key from a `ShardRef`, the tenant resolved by `tenant`.
pub fn shard_key_with(tenant: TenantOf<'_>, field: &str, r: &pb::ShardRef) -> Result<ShardKey> {
    Ok(ShardKey {
        tenant: tenant(&r.tenant)?,
        job: job(&format!("{field}.job"), &r.job)?,
        step: Step(r.step),
        rank: Rank(r.rank),
    })
}

/// A selector's tenant, job, optional step and rank.
pub fn selector(
    node: &Node,
    field: &str,
    s: &pb::ShardSelector,
) -> Result<(TenantName, JobName, Option<Step>, Rank)> {
    selector_with(&|t| node.tenant(t), field, s)
}

/// [`selector`] with the tenant resolved by `tenant`.
pub fn selector_with(
    tenant: TenantOf<'_>,
    field: &str,
    s: &pb::ShardSelector,
) -> Result<(TenantName, JobName, Option<Step>, Rank)> {
    Ok((
        tenant(&s.tenant)?,
        job(&format!("{field}.job"), &s.job)?,
        s.step.map(Step),
        Rank(s.rank),
    ))
}

/// A validated BeginShard, the tenant resolved by `tenant` (the socket's
/// `service::access::Access`).
pub fn begin_shard_with(tenant: TenantOf<'_>, req: &pb::BeginShardRequest) -> Result<BeginShard> {
    let key = shard_key_with(tenant, "shard", required("shard", &req.shard)?)?;
    if req.files.len() > MAX_FILES {
        return Err(Error::InvalidArgument(format!(
            "files: more than {MAX_FILES} files"
        )));
    }
    let files = req
        .files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            Ok(FileSpec {
                name: FileName::parse(&format!("files[{i}].name"), f.name.clone())?,
                size: f.size,
                metadata: metadata(&format!("files[{i}].metadata"), &f.metadata)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let attempt = if req.attempt.is_empty() {
        None
    } else {
        Some(Attempt::parse("attempt", req.attempt.clone())?)
    };
    Ok(BeginShard {
        key,
        files,
        world_size: req.world_size,
        metadata: metadata("metadata", &req.metadata)?,
        attempt,
    })
}

/// The tier named in `field`.
pub fn tier(field: &str, value: i32) -> Result<TierKind> {
    match pb::Tier::try_from(value) {
        Ok(pb::Tier::Memory) => Ok(TierKind::Memory),
        Ok(pb::Tier::Disk) => Ok(TierKind::Disk),
        Ok(pb::Tier::Peers) => Ok(TierKind::Peers),
        Ok(pb::Tier::ObjectStore) => Ok(TierKind::ObjectStore),
        Ok(pb::Tier::Unspecified) => Err(Error::InvalidArgument(format!(
            "{field}: name a tier (memory, disk, peers or object store)"
        ))),
        Err(_) => Err(Error::InvalidArgument(format!(
            "{field}: unknown tier {value}"
        ))),
    }
}

/// The wire form of a tier.
pub fn tier_to_pb(tier: TierKind) -> pb::Tier {
    match tier {
        TierKind::Memory => pb::Tier::Memory,
        TierKind::Disk => pb::Tier::Disk,
        TierKind::Peers => pb::Tier::Peers,
        TierKind::ObjectStore => pb::Tier::ObjectStore,
    }
}

/// A running restore's progress, for `Status` and prefetch streams.
pub fn restore_progress(now: &ProgressSnapshot) -> pb::RestoreProgress {
    pb::RestoreProgress {
        shard: Some(shard_ref(&now.shard)),
        total_bytes: now.total_bytes,
        done_bytes: now.done_bytes,
        sources: now
            .by_source
            .iter()
            .map(|(source, bytes)| pb::SourceProgress {
                source: source.clone(),
                bytes: *bytes,
            })
            .collect(),
        elapsed_seconds: now.elapsed.as_secs_f64(),
    }
}

/// Bytes by the tier they came from, as restores report them.
pub fn source_bytes(bytes_by_tier: &BTreeMap<TierKind, u64>) -> Vec<pb::SourceBytes> {
    bytes_by_tier
        .iter()
        .map(|(tier, bytes)| pb::SourceBytes {
            tier: tier_to_pb(*tier) as i32,
            bytes: *bytes,
        })
        .collect()
}
