//! The restore path: make a shard readable in the memory tier.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_core::restore_plan::{SourceClass, SourceProfile};
use cairn_core::{ChunkId, FileName, Manifest, ShardKey};

use super::progress::RestoreGuard;
use super::{Node, RestoreOutcome, lock};
use crate::error::{Error, Result};
use crate::hashing;
use crate::tier::peer::PeerHolder;
use crate::tier::transfer::{self, FillReport, PlannedSource};
use crate::tier::{ChunkLocation, ShardSource, TierKind};

/// Most chunks a restore has in flight across all its sources (memory use
/// is this times the chunk size).
const MAX_RESTORE_CONCURRENCY: usize = 32;
/// Weight of the newest read in a source's throughput average.
const RATE_SMOOTHING: f64 = 0.2;
/// How often a running restore logs its progress.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(5);

impl Node {
    /// Makes a shard readable in the memory tier and returns its paths.
    ///
    /// If the memory tier has the shard, its chunks are re-hashed (unless
    /// `verify` is off) and any bad chunk is rewritten in place from the disk
    /// tier. Otherwise the shard is assembled in a staging area from the disk
    /// tier, every chunk verified, and committed into the memory tier.
    #[tracing::instrument(skip_all, fields(shard = %key))]
    pub async fn restore(&self, key: &ShardKey, verify: bool) -> Result<RestoreOutcome> {
        let started = Instant::now();
        let _gc = self.gc_lock.read().await;
        let outcome = match self.memory.manifest(key).await? {
            Some(manifest) => self.restore_in_memory(manifest, verify).await?,
            None => self.refill_memory(key).await?,
        };
        // The caller may map these files from now on: never recycle them.
        self.memory.mark_exported(key);
        for (tier, bytes) in &outcome.bytes_by_tier {
            self.metrics
                .restored_bytes
                .with_label_values(&[tier.as_str()])
                .inc_by(*bytes);
        }
        self.metrics
            .restore_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(
            bytes = outcome.manifest.total_bytes(),
            sources = ?outcome.bytes_by_tier,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "shard restored"
        );
        Ok(outcome)
    }

    async fn restore_in_memory(
        &self,
        manifest: Arc<Manifest>,
        verify: bool,
    ) -> Result<RestoreOutcome> {
        let paths = self.memory.file_paths(&manifest);
        let mut bytes_by_tier = BTreeMap::from([(TierKind::Memory, manifest.total_bytes())]);
        if !verify {
            return Ok(RestoreOutcome {
                manifest,
                paths,
                bytes_by_tier,
            });
        }
        let (m, p) = (Arc::clone(&manifest), paths.clone());
        let bad = tokio::task::spawn_blocking(move || hashing::find_bad_chunks(&m, &p, &|_| ()))
            .await??;
        if bad.is_empty() {
            return Ok(RestoreOutcome {
                manifest,
                paths,
                bytes_by_tier,
            });
        }
        self.metrics
            .chunk_verify_failures
            .with_label_values(&["memory"])
            .inc_by(bad.len() as u64);
        tracing::warn!(
            bad_chunks = bad.len(),
            "memory tier copy failed verification, repairing from disk"
        );
        let wanted: Vec<ChunkLocation> = bad
            .iter()
            .map(|b| ChunkLocation {
                manifest: Arc::clone(&manifest),
                file_index: b.file_index,
                offset: b.offset,
                chunk: b.chunk,
            })
            .collect();
        let report = self.fill_from_slower_tiers(wanted, &paths).await?;
        self.metrics
            .chunks_repaired
            .with_label_values(&["memory"])
            .inc_by(bad.len() as u64);
        let repaired = report
            .bytes_by_tier
            .values()
            .fold(0u64, |a, b| a.saturating_add(*b));
        let from_memory = bytes_by_tier.entry(TierKind::Memory).or_default();
        *from_memory = from_memory.saturating_sub(repaired);
        merge(&mut bytes_by_tier, &report);
        Ok(RestoreOutcome {
            manifest,
            paths,
            bytes_by_tier,
        })
    }

    async fn refill_memory(&self, key: &ShardKey) -> Result<RestoreOutcome> {
        let mut manifest = None;
        for source in self.slower_sources() {
            if let Some(m) = source.manifest(key).await? {
                manifest = Some(m);
                break;
            }
        }
        let manifest = manifest
            .ok_or_else(|| Error::NotFound(format!("shard {key} is in no tier of this node")))?;
        let id = format!("restore-{}", uuid::Uuid::new_v4());
        self.reserve_memory(&id, &manifest.shard.tenant, manifest.total_bytes())?;
        let result = self.refill_staged(&id, &manifest).await;
        if result.is_err() {
            let _ = self.memory.discard_staged(&id);
        }
        let report = result?;
        // A shard fetched from the bucket goes back to disk as well, so a
        // replacement node holds its checkpoints locally again.
        if !self.disk.contains(key) {
            self.queue_writeback(key.clone());
        }
        // And it is this node's shard now: its replicas follow this node's
        // placement (a check costs one request per holder when they have it).
        self.queue_replication(key.clone());
        let mut bytes_by_tier = BTreeMap::new();
        merge(&mut bytes_by_tier, &report);
        self.update_usage_metrics();
        self.notify();
        Ok(RestoreOutcome {
            paths: self.memory.file_paths(&manifest),
            manifest,
            bytes_by_tier,
        })
    }

    async fn refill_staged(&self, id: &str, manifest: &Arc<Manifest>) -> Result<FillReport> {
        let specs: Vec<(FileName, u64)> = manifest
            .files
            .iter()
            .map(|f| (f.name.clone(), f.size))
            .collect();
        let paths = self.memory.stage(id, &specs)?;
        let report = self
            .fill_from_slower_tiers(ChunkLocation::all(manifest), &paths)
            .await?;
        let memory = Arc::clone(&self.memory);
        let (id, m) = (id.to_owned(), Arc::clone(manifest));
        tokio::task::spawn_blocking(move || memory.commit_staged(&id, m)).await??;
        Ok(report)
    }

    /// Writes `wanted` chunks (all of one manifest) into the memory-tier
    /// files at `paths`: the restore planner spreads them over every source
    /// below memory that has them (the disk tier for the chunks it stores,
    /// each peer holding an identical replica, the bucket when it holds the
    /// shard), each chunk verified, falling back along the plan. When the
    /// disk tier has every chunk (the usual refill after memory retention),
    /// peers and the bucket are not asked unless a disk chunk turns out bad.
    async fn fill_from_slower_tiers(
        &self,
        wanted: Vec<ChunkLocation>,
        paths: &[PathBuf],
    ) -> Result<FillReport> {
        let files = open_for_write(paths)?;
        let Some(manifest) = wanted.first().map(|l| Arc::clone(&l.manifest)) else {
            return Ok(FillReport::default());
        };
        let key = &manifest.shard;
        let ids: Vec<ChunkId> = wanted.iter().map(|l| l.chunk.id).collect();
        let not_on_disk: HashSet<ChunkId> = self
            .disk
            .absent_chunks(&key.tenant, &ids)
            .await?
            .into_iter()
            .collect();
        let disk = PlannedSource {
            source: &*self.disk as &dyn ShardSource,
            label: TierKind::Disk.as_str().to_owned(),
            profile: self.source_profile(TierKind::Disk.as_str(), SourceClass::Local),
        };
        if not_on_disk.is_empty() {
            match self
                .fill_from(
                    wanted.clone(),
                    &not_on_disk,
                    std::slice::from_ref(&disk),
                    &files,
                )
                .await
            {
                Err(Error::DataLoss(e)) => {
                    tracing::warn!(error = %e, "the disk tier lacks a good copy; asking peers and the bucket");
                }
                done => return done,
            }
        }
        let holders = match &self.peers {
            Some(peers) => peers.holders_of(&manifest).await,
            None => Vec::new(),
        };
        let holder_sources: Vec<PeerHolder<'_>> = match &self.peers {
            Some(peers) => holders.into_iter().map(|n| peers.holder(n)).collect(),
            None => Vec::new(),
        };
        let mut sources = vec![disk];
        for holder in &holder_sources {
            let label = format!("peer:{}", holder.node());
            sources.push(PlannedSource {
                profile: self.source_profile(&label, SourceClass::Peer),
                source: holder,
                label,
            });
        }
        if let Some(object) = &self.object {
            match object.manifest(key).await {
                Ok(Some(m)) if m.hash() == manifest.hash() => sources.push(PlannedSource {
                    source: &**object,
                    label: TierKind::ObjectStore.as_str().to_owned(),
                    profile: self
                        .source_profile(TierKind::ObjectStore.as_str(), SourceClass::Bucket),
                }),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the bucket's manifest; restoring without it")
                }
            }
        }
        self.fill_from(wanted, &not_on_disk, &sources, &files).await
    }

    /// One planned fill: `sources[0]` is the disk tier, which holds every
    /// chunk but those in `not_on_disk`; the other sources hold them all.
    async fn fill_from(
        &self,
        wanted: Vec<ChunkLocation>,
        not_on_disk: &HashSet<ChunkId>,
        sources: &[PlannedSource<'_>],
        files: &[Arc<std::fs::File>],
    ) -> Result<FillReport> {
        let holders: Vec<Vec<usize>> = wanted
            .iter()
            .map(|l| {
                let on_disk = (!not_on_disk.contains(&l.chunk.id)).then_some(0);
                on_disk.into_iter().chain(1..sources.len()).collect()
            })
            .collect();
        let concurrency = sources
            .iter()
            .map(|s| s.profile.parallelism as usize)
            .sum::<usize>()
            .clamp(self.config.writeback_concurrency, MAX_RESTORE_CONCURRENCY);
        let Some(key) = wanted.first().map(|l| l.manifest.shard.clone()) else {
            return Ok(FillReport::default());
        };
        let total = wanted
            .iter()
            .map(|l| l.chunk.len)
            .fold(0, u64::saturating_add);
        let progress = self.restores.start(key, total, &self.metrics);
        let observe = |source: &PlannedSource<'_>, bytes, elapsed| {
            progress.add(&source.label, bytes);
            self.observe_source(source, bytes, elapsed);
        };
        let fill = transfer::fill_planned(
            wanted,
            holders,
            sources,
            files,
            transfer::FillRun {
                concurrency,
                metrics: &self.metrics,
                observe: &observe,
                cancel: &self.cancel,
            },
        );
        let report = log_progress(fill, &progress).await?;
        tracing::info!(sources = ?report.bytes_by_source, "chunks restored by source");
        Ok(report)
    }

    /// What the planner assumes of a source: its recent throughput when
    /// one was measured, else its class's default.
    fn source_profile(&self, label: &str, class: SourceClass) -> SourceProfile {
        let (default_rate, latency_us, parallelism) = match class {
            SourceClass::Local => (2_000_000_000, 100, self.config.writeback_concurrency),
            SourceClass::Peer => (
                1_000_000_000,
                1_000,
                self.config.peers.as_ref().map_or(8, |p| p.concurrency),
            ),
            SourceClass::Bucket => (
                100_000_000,
                30_000,
                self.config
                    .object_store
                    .as_ref()
                    .map_or(16, |o| o.concurrency),
            ),
        };
        let measured = lock(&self.source_rates).get(label).copied();
        SourceProfile {
            class,
            bytes_per_sec: measured.map_or(default_rate, |r| r as u64).max(1),
            latency_us,
            parallelism: parallelism.clamp(1, u32::MAX as usize) as u32,
        }
    }

    /// Folds one read into the source's throughput: a moving average of the
    /// per-request rate times the source's parallelism (requests overlap).
    fn observe_source(&self, source: &PlannedSource<'_>, bytes: u64, elapsed: Duration) {
        let parallelism = f64::from(source.profile.parallelism);
        let rate = bytes as f64 / elapsed.as_secs_f64().max(1e-6) * parallelism;
        let mut rates = lock(&self.source_rates);
        let entry = rates.entry(source.label.clone()).or_insert(rate);
        *entry += RATE_SMOOTHING * (rate - *entry);
    }
}

/// Opens existing files for writing in place (staged or committed files).
fn open_for_write(paths: &[PathBuf]) -> Result<Vec<Arc<std::fs::File>>> {
    use crate::error::IoContext;
    paths
        .iter()
        .map(|p| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .map(Arc::new)
                .io_context(|| format!("opening {}", p.display()))
        })
        .collect()
}

/// Runs a fill, logging its progress every [`PROGRESS_LOG_INTERVAL`] so a
/// long restore shows in the log while it runs, not only when it ends.
async fn log_progress<T>(fill: impl Future<Output = T>, progress: &RestoreGuard<'_>) -> T {
    let mut fill = std::pin::pin!(fill);
    let mut ticks = tokio::time::interval(PROGRESS_LOG_INTERVAL);
    // The first tick one interval from now, not at once.
    ticks.reset();
    loop {
        tokio::select! {
            out = &mut fill => return out,
            _ = ticks.tick() => {
                let now = progress.snapshot();
                tracing::info!(
                    done_bytes = now.done_bytes,
                    total_bytes = now.total_bytes,
                    sources = ?now.by_source,
                    mb_per_s = now.done_bytes as f64 / now.elapsed.as_secs_f64().max(1e-3) / 1e6,
                    "restore progress"
                );
            }
        }
    }
}

fn merge(into: &mut BTreeMap<TierKind, u64>, report: &FillReport) {
    for (tier, bytes) in &report.bytes_by_tier {
        let total = into.entry(*tier).or_default();
        *total = total.saturating_add(*bytes);
    }
}
