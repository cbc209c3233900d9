//! Background work after a commit: write-back to disk and retention.
//!
//! Write-back is a [`Pipeline`](super::pipeline::Pipeline) of its own
//! (`[pipelines.write_back]`): an attempt that fails, a full disk included,
//! is tried again after 1 s and 2 s, then the shard needs attention and is
//! tried every 10 s, so space freed by retention, uploads or an operator is
//! used soon. The shard stays in memory meanwhile.

use crate::config::UploadAfter;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use cairn_core::{ChunkId, JobName, Manifest, ShardKey, Step, StepResidency, TenantName};

use super::Node;
use super::pipeline::Attempt;
use crate::error::{Error, Result};
use crate::failpoint::crash_point;
use crate::tier::ShardSource;
use crate::tier::disk::DiskReservation;
use crate::tier::transfer;

impl Node {
    /// Queues a shard for write-back to disk, once. With an object store
    /// the shard's upload is journaled here too, before anything can crash
    /// between the disk and the bucket, so a restart always resumes it.
    pub(super) fn queue_writeback(&self, key: ShardKey) {
        self.journal_upload(&key);
        self.writeback.enqueue(key);
    }

    /// Runs the write-back pipeline, one shard at a time (each moves
    /// `disk.writeback_concurrency` chunks at once), until shutdown.
    pub(super) async fn writeback_loop(self: Arc<Self>) {
        let node = &self;
        self.writeback
            .run(
                1,
                &self.cancel,
                |key| async move { node.write_back(&key).await },
                |key| async move {
                    node.notify();
                    node.apply_retention(&key.tenant, &key.job).await;
                },
            )
            .await;
    }

    /// Reserves room in the disk tier for the chunks of `manifest` it lacks,
    /// evicting the oldest shards the object store already holds when the
    /// tier is full (a shard leaves the disk only once a slower tier holds
    /// it, and never while the memory tier relies on it).
    async fn reserve_disk(&self, manifest: &Manifest) -> Result<DiskReservation<'_>> {
        let chunks = manifest.unique_chunks();
        let ids: Vec<ChunkId> = chunks.keys().copied().collect();
        let needed = self
            .disk
            .absent_chunks(&manifest.shard.tenant, &ids)
            .await?
            .iter()
            .filter_map(|id| chunks.get(id))
            .fold(0u64, |total, len| total.saturating_add(*len));
        for _ in 0..3 {
            match self.disk.try_reserve(needed) {
                Ok(reservation) => return Ok(reservation),
                Err(shortfall) => {
                    if !self.evict_from_disk(shortfall).await? {
                        break;
                    }
                }
            }
        }
        Err(Error::ResourceExhausted(self.disk_full_message(needed)))
    }

    /// Drops the oldest disk shards the bucket holds (identical manifest)
    /// until about `shortfall` bytes are freed, then collects the chunks no
    /// manifest names. Returns whether anything was dropped.
    async fn evict_from_disk(&self, shortfall: u64) -> Result<bool> {
        let Some(object) = &self.object else {
            return Ok(false);
        };
        let _gc = self.gc_lock.write().await;
        let mut shards = self.disk.shards();
        shards.sort_by_key(|m| m.committed_unix_ms);
        let mut freed = 0u64;
        let mut dropped = false;
        for m in shards {
            if freed >= shortfall {
                break;
            }
            if self.memory.contains(&m.shard) {
                continue;
            }
            let in_bucket =
                matches!(object.manifest(&m.shard).await, Ok(Some(b)) if b.hash() == m.hash());
            if in_bucket && self.disk.remove_shard(&m.shard)? {
                tracing::info!(shard = %m.shard, "evicted from disk tier to make room (the object store holds it)");
                self.metrics
                    .shards_evicted
                    .with_label_values(&["disk", "pressure"])
                    .inc();
                freed = freed.saturating_add(m.total_bytes());
                dropped = true;
            }
        }
        if dropped {
            let disk = Arc::clone(&self.disk);
            tokio::task::spawn_blocking(move || disk.collect_garbage(false)).await??;
        }
        Ok(dropped)
    }

    fn disk_full_message(&self, needed: u64) -> String {
        let mut by_job: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for m in self.disk.shards() {
            let entry = by_job
                .entry(format!("{}/{}", m.shard.tenant, m.shard.job))
                .or_default();
            entry.0 = entry.0.saturating_add(m.total_bytes());
            if self.upload_state(&m.shard).is_some() || self.object.is_none() {
                entry.1 = entry.1.saturating_add(m.total_bytes());
            }
        }
        let jobs: Vec<String> = by_job
            .iter()
            .map(|(job, (bytes, unsafe_bytes))| {
                format!("{job}: {bytes} bytes ({unsafe_bytes} not yet in the object store)")
            })
            .collect();
        format!(
            "disk tier is full: this write-back needs {needed} bytes but {} of {} bytes are in use \
             ({} reserved by copies in flight; shards: {}); nothing more can be evicted until the object store holds it",
            self.disk.used_bytes(),
            self.disk.capacity(),
            self.disk.reserved_bytes(),
            if jobs.is_empty() {
                "none".into()
            } else {
                jobs.join(", ")
            }
        )
    }

    /// One attempt at copying a shard to the disk tier; the pipeline
    /// retries a failure.
    #[tracing::instrument(skip_all, fields(shard = %key))]
    async fn write_back(&self, key: &ShardKey) -> Attempt {
        let Ok(Some(manifest)) = self.memory.manifest(key).await else {
            return Attempt::Dropped;
        };
        let started = Instant::now();
        let outcome = async {
            let _room = self.reserve_disk(&manifest).await?;
            let _gc = self.gc_lock.read().await;
            transfer::copy_shard(
                &manifest,
                &[&*self.memory],
                &*self.disk,
                self.config.writeback_concurrency,
                None,
                &self.metrics,
                &self.cancel,
            )
            .await
        }
        .await;
        let attempt = match outcome {
            Ok(report) => {
                crash_point("writeback.after_manifest");
                self.metrics
                    .writeback_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.metrics
                    .saved_bytes
                    .with_label_values(&["disk"])
                    .inc_by(report.bytes_written);
                self.metrics
                    .dedup_skipped_bytes
                    .with_label_values(&["disk"])
                    .inc_by(report.bytes_skipped);
                tracing::info!(
                    written = report.bytes_written,
                    deduplicated = report.bytes_skipped,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "shard durable on disk"
                );
                if self.uploads_after(UploadAfter::Disk) {
                    self.enqueue_upload(key.clone());
                }
                Attempt::Done
            }
            Err(Error::Cancelled) => {
                tracing::info!("write-back interrupted by shutdown; it is queued again at start");
                Attempt::Interrupted
            }
            Err(e) => {
                self.metrics
                    .writeback_failures
                    .with_label_values(&["disk"])
                    .inc();
                Attempt::failed(&e)
            }
        };
        self.update_usage_metrics();
        attempt
    }

    /// Whether shards are queued for upload at this point of their life.
    pub(super) fn uploads_after(&self, point: UploadAfter) -> bool {
        self.config
            .object_store
            .as_ref()
            .is_some_and(|o| o.upload_after == point)
    }

    /// Applies both local tiers' retention to one job.
    pub(super) async fn apply_retention(&self, tenant: &TenantName, job: &JobName) {
        let _gc = self.gc_lock.write().await;
        let mut changed = false;
        // Memory: a step may go once the disk tier holds every shard of it.
        let in_memory = self
            .memory
            .list(tenant, Some(job))
            .await
            .unwrap_or_default();
        let residency = group_steps(&in_memory, |m| self.disk.contains(&m.shard));
        for step in self.config.memory_retention.steps_to_evict(&residency) {
            for m in in_memory.iter().filter(|m| m.shard.step == step) {
                match self.memory.evict(&m.shard) {
                    Ok(true) => {
                        changed = true;
                        self.metrics
                            .shards_evicted
                            .with_label_values(&["memory", "retention"])
                            .inc();
                        tracing::info!(shard = %m.shard, "evicted from memory tier by retention");
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(shard = %m.shard, error = %e, "evicting from memory tier failed")
                    }
                }
            }
        }
        // Disk: the slowest local tier; a step still in memory stays, so that
        // memory can always drop it later, and so does a step still waiting
        // for the object store.
        let on_disk = self.disk.list(tenant, Some(job)).await.unwrap_or_default();
        let residency = group_steps(&on_disk, |m| {
            !self.memory.contains(&m.shard) && !self.upload_outstanding(&m.shard)
        });
        let mut removed_from_disk = false;
        for step in self.config.disk_retention.steps_to_evict(&residency) {
            let keys: Vec<ShardKey> = on_disk
                .iter()
                .filter(|m| m.shard.step == step)
                .map(|m| m.shard.clone())
                .collect();
            match self.disk.remove_shards(&keys) {
                Ok(removed) => {
                    removed_from_disk |= !removed.is_empty();
                    for shard in removed {
                        self.metrics
                            .shards_evicted
                            .with_label_values(&["disk", "retention"])
                            .inc();
                        tracing::info!(%shard, "evicted from disk tier by retention");
                    }
                }
                Err(e) => {
                    removed_from_disk = true;
                    tracing::warn!(%job, %step, error = %e, "evicting a step from disk tier failed");
                }
            }
        }
        if removed_from_disk {
            changed = true;
            let disk = Arc::clone(&self.disk);
            match tokio::task::spawn_blocking(move || disk.collect_garbage(false)).await {
                Ok(Ok(report)) => tracing::debug!(
                    chunks = report.chunks,
                    bytes = report.bytes,
                    "removed unreferenced chunks"
                ),
                Ok(Err(e)) => tracing::warn!(error = %e, "collecting unreferenced chunks failed"),
                Err(e) => tracing::warn!(error = %e, "collecting unreferenced chunks panicked"),
            }
        }
        if changed {
            self.update_usage_metrics();
            self.notify();
        }
    }

    /// Refreshes the tier usage gauges.
    pub fn update_usage_metrics(&self) {
        let usage = self.memory.usage();
        let used = &self.metrics.tier_used_bytes;
        used.with_label_values(&["memory"]).set(usage.used as i64);
        self.metrics.memory_pool_bytes.set(usage.pool as i64);
        used.with_label_values(&["disk"])
            .set(self.disk.used_bytes() as i64);
        self.metrics
            .tier_capacity_bytes
            .with_label_values(&["memory"])
            .set(usage.capacity as i64);
        self.metrics
            .tier_capacity_bytes
            .with_label_values(&["disk"])
            .set(0);
    }
}

/// Groups shards by step; a step is safe to drop when `safe` holds for all
/// of its shards.
fn group_steps(
    manifests: &[Arc<Manifest>],
    safe: impl Fn(&Manifest) -> bool,
) -> Vec<StepResidency> {
    let mut steps: BTreeMap<Step, bool> = BTreeMap::new();
    for m in manifests {
        let entry = steps.entry(m.shard.step).or_insert(true);
        *entry &= safe(m);
    }
    steps
        .into_iter()
        .map(|(step, safe_to_drop)| StepResidency { step, safe_to_drop })
        .collect()
}
