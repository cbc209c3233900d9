//! Moving shards between tiers: the two loops every tier shares.
//!
//! [`copy_shard`] copies a committed shard from a source tier into a
//! content-addressed sink (memory → disk today; → peers and → object store
//! with the same code): only the chunks the sink lacks, each verified on the
//! way, the manifest last. [`fill_chunks`] writes chunks into files in the
//! memory tier (restore and repair), taking each chunk from the fastest
//! source that has a verified copy and falling back tier by tier.
//!
//! Both run a bounded number of chunks at once, so memory stays at
//! `concurrency × chunk size` whatever the shard's size.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_core::{ChunkId, Manifest};
use futures::{StreamExt, TryStreamExt, stream};

use crate::error::{Error, IoContext, Result};
use crate::failpoint::crash_point;
use crate::metrics::Metrics;
use crate::tier::{ChunkLocation, ChunkRead, ChunkSink, ShardSource, TierKind};

/// What a copy did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Chunks written to the sink.
    pub chunks_written: u64,
    /// Their bytes.
    pub bytes_written: u64,
    /// Bytes the sink already held.
    pub bytes_skipped: u64,
}

/// Copies the shard `manifest` describes into `to`, reading each chunk from
/// the first of `from` with a verified copy: missing chunks first, then the
/// manifest. With a `manifest_deadline`, the manifest is written only if
/// that little time has passed since the sink said which chunks it holds
/// (see [`cairn_core::bucket`]); otherwise the copy fails with `Aborted`
/// and the caller retries, which checks again.
#[tracing::instrument(skip_all, fields(shard = %manifest.shard, to = %to.kind()))]
pub async fn copy_shard(
    manifest: &Arc<Manifest>,
    from: &[&dyn ShardSource],
    to: &dyn ChunkSink,
    concurrency: usize,
    manifest_deadline: Option<Duration>,
    metrics: &Metrics,
) -> Result<CopyReport> {
    let tenant = &manifest.shard.tenant;
    let mut first_location: BTreeMap<ChunkId, ChunkLocation> = BTreeMap::new();
    for location in ChunkLocation::all(manifest) {
        first_location.entry(location.chunk.id).or_insert(location);
    }
    let ids: Vec<ChunkId> = first_location.keys().copied().collect();
    let checked = Instant::now();
    let missing = to.missing_chunks(tenant, &ids).await?;
    let total: u64 = first_location.values().map(|l| l.chunk.len).sum();
    let report = stream::iter(missing)
        .map(|id| {
            let location = &first_location[&id];
            async move {
                let (_, bytes, _) = read_first_verified(location, from, metrics).await?;
                let len = bytes.len() as u64;
                to.put_chunk(location, bytes).await?;
                Ok::<_, Error>(len)
            }
        })
        .buffer_unordered(concurrency)
        .try_fold(CopyReport::default(), |mut report, len| async move {
            report.chunks_written += 1;
            report.bytes_written += len;
            Ok(report)
        })
        .await?;
    crash_point("writeback.before_manifest");
    if let Some(deadline) = manifest_deadline
        && checked.elapsed() >= deadline
    {
        return Err(Error::Aborted(format!(
            "copying shard {} took {} s, longer than the {} s a check of the {} tier stays valid; checking again",
            manifest.shard,
            checked.elapsed().as_secs(),
            deadline.as_secs(),
            to.kind()
        )));
    }
    to.put_manifest(manifest).await?;
    Ok(CopyReport {
        bytes_skipped: total - report.bytes_written,
        ..report
    })
}

/// What a fill did.
#[derive(Clone, Debug, Default)]
pub struct FillReport {
    /// Bytes written, by the tier they came from.
    pub bytes_by_tier: BTreeMap<TierKind, u64>,
    /// Chunks that failed verification, by tier, as (file, offset, id).
    pub corrupt: Vec<(TierKind, String, u64, ChunkId)>,
}

/// Writes each of `wanted` into `files[location.file_index]` at its offset,
/// reading it from the first of `sources` that has a verified copy. A chunk
/// that is corrupt in a tier listed in `repair` is rewritten there with the
/// good bytes. Fails with `DataLoss` naming the chunk when no source has it.
pub async fn fill_chunks(
    wanted: Vec<ChunkLocation>,
    sources: &[&dyn ShardSource],
    repair: &[&dyn ChunkSink],
    files: &[Arc<File>],
    concurrency: usize,
    metrics: &Metrics,
) -> Result<FillReport> {
    stream::iter(wanted)
        .map(|location| async move {
            let (tier, bytes, corrupt) = read_first_verified(&location, sources, metrics).await?;
            for sink in repair.iter().filter(|s| corrupt.contains(&s.kind())) {
                sink.put_chunk(&location, bytes.clone()).await?;
                metrics.chunks_repaired.with_label_values(&[sink.kind().as_str()]).inc();
                tracing::info!(tier = %sink.kind(), chunk = %location.chunk.id, "repaired corrupt chunk");
            }
            let file = Arc::clone(&files[location.file_index]);
            let offset = location.offset;
            let len = bytes.len() as u64;
            tokio::task::spawn_blocking(move || {
                file.write_all_at(&bytes, offset)
                    .io_context(|| format!("writing restored chunk at offset {offset}"))
            })
            .await??;
            let corrupt: Vec<_> = corrupt
                .into_iter()
                .map(|t| (t, location.file_name().to_owned(), location.offset, location.chunk.id))
                .collect();
            Ok::<_, Error>((tier, len, corrupt))
        })
        .buffer_unordered(concurrency)
        .try_fold(FillReport::default(), |mut report, (tier, len, corrupt)| async move {
            *report.bytes_by_tier.entry(tier).or_default() += len;
            report.corrupt.extend(corrupt);
            Ok(report)
        })
        .await
}

/// Reads a chunk from the first source with a verified copy. Returns the
/// tier it came from, the bytes, and the tiers where it was corrupt.
pub async fn read_first_verified(
    location: &ChunkLocation,
    sources: &[&dyn ShardSource],
    metrics: &Metrics,
) -> Result<(TierKind, Bytes, Vec<TierKind>)> {
    let mut corrupt = Vec::new();
    let mut tried = Vec::new();
    let mut failed = false;
    for source in sources {
        let tier = source.kind();
        match source.read_chunk(location).await {
            Ok(ChunkRead::Verified(bytes)) => {
                // A faster tier merely lacking the chunk is the normal case
                // of a refill; only a corrupt copy or a failed read is news.
                if !corrupt.is_empty() || failed {
                    tracing::warn!(
                        chunk = %location.chunk.id,
                        file = location.file_name(),
                        source = %tier,
                        skipped = ?tried,
                        "chunk served by a slower tier after the faster ones failed"
                    );
                }
                return Ok((tier, bytes, corrupt));
            }
            Ok(ChunkRead::Missing) => tried.push(format!("{tier}: missing")),
            Ok(ChunkRead::Corrupt) => {
                metrics
                    .chunk_verify_failures
                    .with_label_values(&[tier.as_str()])
                    .inc();
                tracing::warn!(
                    tier = %tier,
                    chunk = %location.chunk.id,
                    file = location.file_name(),
                    offset = location.offset,
                    "chunk failed verification, falling back to the next tier"
                );
                corrupt.push(tier);
                tried.push(format!("{tier}: corrupt"));
            }
            Err(e) => {
                tracing::warn!(tier = %tier, chunk = %location.chunk.id, error = %e, "reading chunk failed");
                tried.push(format!("{tier}: {e}"));
                failed = true;
            }
        }
    }
    Err(Error::DataLoss(format!(
        "chunk {} of file {} (offset {}) of shard {} has no good copy in any tier ({})",
        location.chunk.id,
        location.file_name(),
        location.offset,
        location.shard(),
        if tried.is_empty() {
            "no tier holds the shard".to_owned()
        } else {
            tried.join(", ")
        }
    )))
}
