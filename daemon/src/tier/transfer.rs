//! Moving shards between tiers: the two loops every tier shares.
//!
//! [`copy_shard`] copies a committed shard from a source tier into a
//! content-addressed sink (memory → disk today; → peers and → object store
//! with the same code): only the chunks the sink lacks, each verified on the
//! way, the manifest last. [`fill_planned`] writes chunks into files in the
//! memory tier (restore and repair), each from the source the restore
//! planner chose, falling back along the plan's order.
//!
//! Both run a bounded number of chunks at once, so memory stays at
//! `concurrency × chunk size` whatever the shard's size.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_core::restore_plan::{self, ChunkNeed, SourceProfile};
use cairn_core::{ChunkId, Manifest};
use futures::{StreamExt, TryStreamExt, stream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, IoContext, Result};
use crate::failpoint::{crash_point, fault_point};
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
    cancel: &CancellationToken,
) -> Result<CopyReport> {
    let tenant = &manifest.shard.tenant;
    let mut first_location: BTreeMap<ChunkId, ChunkLocation> = BTreeMap::new();
    for location in ChunkLocation::all(manifest) {
        first_location.entry(location.chunk.id).or_insert(location);
    }
    let ids: Vec<ChunkId> = first_location.keys().copied().collect();
    let checked = Instant::now();
    let missing = to.missing_chunks(tenant, &ids).await?;
    // Lengths from the manifest: the total saturates rather than wraps.
    let total = first_location
        .values()
        .map(|l| l.chunk.len)
        .fold(0, u64::saturating_add);
    let report = stream::iter(missing)
        .map(|id| {
            let location = &first_location[&id];
            async move {
                // Between chunks, not within one: a chunk is one bounded
                // request, and the sink never sees half of it.
                if cancel.is_cancelled() {
                    return Err(Error::Cancelled);
                }
                let len = location.chunk.len;
                if to.verifies_chunks()
                    && let Some(bytes) = read_first_unchecked(location, from).await
                {
                    match to.put_chunk(location, bytes).await {
                        // The sink re-hashed the bytes and refused them: a
                        // source changed under its manifest. A checked read
                        // finds a good copy, in this tier or a slower one.
                        Err(Error::DataLoss(why)) => {
                            metrics
                                .chunk_verify_failures
                                .with_label_values(&[to.kind().as_str()])
                                .inc();
                            tracing::warn!(chunk = %location.chunk.id, file = location.file_name(), %why, "the receiver refused a chunk read without a check; sending a checked copy");
                        }
                        other => return other.map(|()| len),
                    }
                }
                let (_, bytes, _) = read_first_verified(location, from, metrics).await?;
                to.put_chunk(location, bytes).await?;
                Ok::<_, Error>(len)
            }
        })
        .buffer_unordered(concurrency)
        .try_fold(CopyReport::default(), |mut report, len| async move {
            report.chunks_written = report.chunks_written.saturating_add(1);
            report.bytes_written = report.bytes_written.saturating_add(len);
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
    if cancel.is_cancelled() {
        return Err(Error::Cancelled);
    }
    to.put_manifest(manifest).await?;
    Ok(CopyReport {
        bytes_skipped: total.saturating_sub(report.bytes_written),
        ..report
    })
}

/// The chunk's bytes from the first of `sources` that has them, unchecked
/// (see [`ShardSource::read_chunk_unchecked`]); `None` when none has, or a
/// read failed.
/// With the `transfer.corrupt_unchecked_read` failpoint, one byte of what
/// was read is flipped: a source whose bytes changed after its manifest.
async fn read_first_unchecked(
    location: &ChunkLocation,
    sources: &[&dyn ShardSource],
) -> Option<Bytes> {
    for source in sources {
        match source.read_chunk_unchecked(location).await {
            Ok(Some(bytes)) if fault_point("transfer.corrupt_unchecked_read") => {
                let mut flipped = bytes.to_vec();
                if let Some(first) = flipped.first_mut() {
                    *first ^= 0xff;
                }
                return Some(Bytes::from(flipped));
            }
            Ok(Some(bytes)) => return Some(bytes),
            Ok(None) => {}
            // The checked reads that follow report the failure.
            Err(_) => return None,
        }
    }
    None
}

/// What a fill did.
#[derive(Clone, Debug, Default)]
pub struct FillReport {
    /// Bytes written, by the tier they came from.
    pub bytes_by_tier: BTreeMap<TierKind, u64>,
    /// Bytes written, by source (a tier, or one peer), for the log.
    pub bytes_by_source: BTreeMap<String, u64>,
    /// Chunks that failed verification, by tier, as (file, offset, id).
    pub corrupt: Vec<(TierKind, String, u64, ChunkId)>,
}

/// One place a planned fill may read chunks from.
pub struct PlannedSource<'a> {
    /// The tier (or one peer) to read from.
    pub source: &'a dyn ShardSource,
    /// Its name in logs and reports: `disk`, `peer:node-2`, `object-store`.
    pub label: String,
    /// What the planner assumes of it.
    pub profile: SourceProfile,
}

/// Longest a single chunk read may take, beyond what the source's profile
/// predicts, before the chunk moves on to its next source.
const STALL_SLACK: Duration = Duration::from_secs(5);

/// How one [`fill_planned`] runs: its bounds, what it reports to, and what
/// stops it.
pub struct FillRun<'a> {
    /// Most chunks in flight.
    pub concurrency: usize,
    /// Where verification failures are counted.
    pub metrics: &'a Metrics,
    /// Told of each chunk written, with how long its read took.
    pub observe: &'a (dyn Fn(&PlannedSource<'_>, u64, Duration) + Send + Sync),
    /// Stops the fill between chunks (shutdown).
    pub cancel: &'a CancellationToken,
}

/// Writes each of `wanted` into `files[location.file_index]` at its offset,
/// reading it from the source the restore planner ([`restore_plan::plan`])
/// chose among those `holders[i]` lists for chunk `i`, and on a missing or
/// corrupt copy, an error or a stall, from the next source in the plan's
/// order. At most `run.concurrency` chunks are in flight (and at most each
/// source's `parallelism` from one source), so memory stays at
/// `concurrency × chunk size`. `run.observe` learns of each chunk once it
/// is written, with how long its read took: progress, and the measurements
/// the next plan is based on.
/// Fails with `DataLoss` naming the chunk when no source has a good copy,
/// and with `Cancelled` once `run.cancel` fires (between chunks).
pub async fn fill_planned(
    wanted: Vec<ChunkLocation>,
    holders: Vec<Vec<usize>>,
    sources: &[PlannedSource<'_>],
    files: &[Arc<File>],
    run: FillRun<'_>,
) -> Result<FillReport> {
    let FillRun {
        concurrency,
        metrics,
        observe,
        cancel,
    } = run;
    let profiles: Vec<SourceProfile> = sources.iter().map(|s| s.profile.clone()).collect();
    let needs: Vec<ChunkNeed> = wanted
        .iter()
        .zip(holders)
        .map(|(location, holders)| ChunkNeed {
            len: location.chunk.len,
            holders,
        })
        .collect();
    let plan = restore_plan::plan(&profiles, &needs);
    tracing::debug!(
        sources = ?sources.iter().map(|s| s.label.as_str()).zip(plan.bytes.iter()).collect::<Vec<_>>(),
        estimated_ms = plan.estimated_us / 1000,
        "restore plan"
    );
    let permits: Vec<Semaphore> = profiles
        .iter()
        .map(|p| Semaphore::new(p.parallelism.max(1) as usize))
        .collect();
    let permits = &permits;
    stream::iter(wanted.into_iter().zip(plan.order))
        .map(|(location, order)| async move {
            // Between chunks: a stopping daemon does not wait for a long
            // restore (its listeners wait for every request in flight).
            if cancel.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let mut tried = Vec::new();
            let mut corrupt = Vec::new();
            for index in order {
                let planned = &sources[index];
                let tier = planned.source.kind();
                let _permit = permits[index].acquire().await.map_err(|_| Error::Cancelled)?;
                let expected = Duration::from_micros(restore_plan::estimate_us(
                    &planned.profile,
                    location.chunk.len,
                    1,
                ));
                let started = Instant::now();
                let read = tokio::time::timeout(
                    expected.saturating_mul(4).saturating_add(STALL_SLACK),
                    planned.source.read_chunk(&location),
                )
                .await;
                match read {
                    Ok(Ok(ChunkRead::Verified(bytes))) => {
                        let read_time = started.elapsed();
                        let file = Arc::clone(&files[location.file_index]);
                        let (offset, len) = (location.offset, bytes.len() as u64);
                        tokio::task::spawn_blocking(move || {
                            file.write_all_at(&bytes, offset)
                                .io_context(|| format!("writing restored chunk at offset {offset}"))
                        })
                        .await??;
                        observe(planned, len, read_time);
                        if !tried.is_empty() {
                            tracing::warn!(chunk = %location.chunk.id, file = location.file_name(), source = %planned.label, skipped = ?tried, "chunk read from a later source after the planned ones failed");
                        }
                        let corrupt: Vec<_> = corrupt
                            .into_iter()
                            .map(|t| (t, location.file_name().to_owned(), location.offset, location.chunk.id))
                            .collect();
                        return Ok::<_, Error>((tier, planned.label.clone(), len, corrupt));
                    }
                    Ok(Ok(ChunkRead::Missing)) => tried.push(format!("{}: missing", planned.label)),
                    Ok(Ok(ChunkRead::Corrupt)) => {
                        metrics.chunk_verify_failures.with_label_values(&[tier.as_str()]).inc();
                        tracing::warn!(source = %planned.label, chunk = %location.chunk.id, file = location.file_name(), offset = location.offset, "chunk failed verification, trying its next source");
                        corrupt.push(tier);
                        tried.push(format!("{}: corrupt", planned.label));
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(source = %planned.label, chunk = %location.chunk.id, error = %e, "reading chunk failed, trying its next source");
                        tried.push(format!("{}: {e}", planned.label));
                    }
                    Err(_) => {
                        tracing::warn!(source = %planned.label, chunk = %location.chunk.id, "chunk read stalled, trying its next source");
                        tried.push(format!("{}: stalled", planned.label));
                    }
                }
            }
            Err(no_good_copy(&location, &tried))
        })
        .buffer_unordered(concurrency.max(1))
        .try_fold(FillReport::default(), |mut report, (tier, label, len, corrupt)| async move {
            let by_tier = report.bytes_by_tier.entry(tier).or_default();
            *by_tier = by_tier.saturating_add(len);
            let by_source = report.bytes_by_source.entry(label).or_default();
            *by_source = by_source.saturating_add(len);
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
    Err(no_good_copy(location, &tried))
}

/// The error of a chunk no source had a good copy of, with what each said.
fn no_good_copy(location: &ChunkLocation, tried: &[String]) -> Error {
    Error::DataLoss(format!(
        "chunk {} of file {} (offset {}) of shard {} has no good copy in any tier ({})",
        location.chunk.id,
        location.file_name(),
        location.offset,
        location.shard(),
        if tried.is_empty() {
            "no tier holds it".to_owned()
        } else {
            tried.join(", ")
        }
    ))
}
