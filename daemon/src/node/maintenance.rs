//! Operator work: delete, wait for durability, verify and repair, GC, status.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cairn_core::{JobName, Manifest, NodeId, ShardKey, Step, TenantName};
use futures::{StreamExt, stream};

use super::{CopyState, Node, PipelineCounts, StepSelection, TierStatus, VerifyFinding, lock};
use crate::error::{Error, Result};
use crate::tier::disk::GcReport;
use crate::tier::object::steps::BucketGcReport;
use crate::tier::peer::{PeerHolder, PeerTier};
use crate::tier::transfer;
use crate::tier::{ChunkLocation, ChunkRead, ChunkSink, ShardSource, TierKind};

/// What a garbage collection removed, per tier.
#[derive(Clone, Debug)]
pub struct GcOutcome {
    /// The disk tier.
    pub disk: GcReport,
    /// The object store, when configured.
    pub object_store: Option<BucketGcReport>,
}

impl Node {
    /// Deletes every shard of a step from every tier, the object store
    /// included (its chunks go with the next garbage collection).
    pub async fn delete_step(&self, tenant: &TenantName, job: &JobName, step: Step) -> Result<u32> {
        let _gc = self.gc_lock.write().await;
        let shards: Vec<ShardKey> = self
            .all_shards(tenant, Some(job))
            .await?
            .into_keys()
            .filter(|k| k.step == step)
            .collect();
        if shards.is_empty() {
            return Err(Error::NotFound(format!(
                "job {job} of tenant {tenant} has no step {step} on this node"
            )));
        }
        for key in &shards {
            if self.memory.evict(key)? {
                self.metrics
                    .shards_evicted
                    .with_label_values(&["memory", "delete"])
                    .inc();
            }
            if self.disk.remove_shard(key)? {
                self.metrics
                    .shards_evicted
                    .with_label_values(&["disk", "delete"])
                    .inc();
            }
            self.writeback.forget(key);
        }
        if let Some(object) = &self.object {
            object.delete_step(tenant, job, step).await?;
        }
        let disk = Arc::clone(&self.disk);
        tokio::task::spawn_blocking(move || disk.collect_garbage(false)).await??;
        tracing::info!(%tenant, %job, %step, shards = shards.len(), "step deleted");
        self.update_usage_metrics();
        self.notify();
        Ok(shards.len() as u32)
    }

    /// Waits until every shard of the step (or one rank) on this node is
    /// durable in `tier`, or `timeout` passes.
    pub async fn wait_durable(
        &self,
        selection: &StepSelection,
        tier: TierKind,
        timeout: Duration,
    ) -> Result<()> {
        let StepSelection {
            tenant,
            job,
            step,
            rank,
        } = selection;
        let mut changes = self.changes.subscribe();
        // `timeout` comes from the request.
        let deadline = tokio::time::Instant::now()
            .checked_add(timeout)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("timeout of {} ms is too long", timeout.as_millis()))
            })?;
        loop {
            let shards: Vec<ShardKey> = self
                .local_shards(tenant, job)
                .await?
                .into_iter()
                .filter(|k| selection.matches(k))
                .collect();
            if shards.is_empty() {
                return Err(Error::NotFound(format!(
                    "job {job} of tenant {tenant} has no committed shard of step {step}{} on this node",
                    rank.map(|r| format!(" rank {r}")).unwrap_or_default()
                )));
            }
            let mut pending = 0usize;
            let mut last_error = None;
            for key in &shards {
                match tier {
                    TierKind::Memory => {}
                    TierKind::Disk => {
                        if self.disk.contains(key) {
                            continue;
                        }
                        match self.writeback.state(key) {
                            Some(CopyState::NeedsAttention(e)) => {
                                return Err(Error::Aborted(format!(
                                    "shard {key} will not become durable on disk: {e}"
                                )));
                            }
                            Some(CopyState::Failed(e)) => last_error = Some(e),
                            _ => {}
                        }
                        pending = pending.saturating_add(1);
                    }
                    TierKind::Peers => {
                        if self.peers.is_none() {
                            return Err(Error::FailedPrecondition(
                                "no peer tier is configured on this node (no [membership])".into(),
                            ));
                        }
                        // Replication retries until R peers hold the shard,
                        // so a failure is reported at the deadline.
                        match self.replication_state(key).map(|v| v.state) {
                            Some(CopyState::Durable) => {}
                            Some(CopyState::Failed(e) | CopyState::NeedsAttention(e)) => {
                                last_error = Some(e);
                                pending = pending.saturating_add(1);
                            }
                            _ => pending = pending.saturating_add(1),
                        }
                    }
                    TierKind::ObjectStore => {
                        let Some(object) = &self.object else {
                            return Err(Error::FailedPrecondition(
                                "no object store is configured on this node".into(),
                            ));
                        };
                        // Uploads retry until they succeed, so a failure is
                        // reported at the deadline, not at once.
                        match self.upload_state(key) {
                            Some(CopyState::Failed(e) | CopyState::NeedsAttention(e)) => {
                                last_error = Some(e);
                                pending = pending.saturating_add(1);
                            }
                            Some(_) => pending = pending.saturating_add(1),
                            None if object.manifest(key).await?.is_some() => {}
                            None => pending = pending.saturating_add(1),
                        }
                    }
                }
            }
            if pending == 0 {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Err(Error::DeadlineExceeded(format!(
                    "step {step} of job {job}: {pending} of {} shards not yet durable in the {tier} tier after {} ms{}",
                    shards.len(),
                    timeout.as_millis(),
                    last_error
                        .map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default()
                )));
            }
        }
    }

    /// Re-reads every chunk of the step's shards in `tier`, reporting bad
    /// ones (and rewriting them from the other tier when `repair` is set).
    /// `progress(done, total)` is called as bytes are checked.
    pub async fn verify(
        &self,
        selection: &StepSelection,
        tier: TierKind,
        repair: bool,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<Vec<VerifyFinding>> {
        let StepSelection {
            tenant, job, step, ..
        } = selection;
        let _gc = self.gc_lock.read().await;
        if tier == TierKind::Peers
            && let Some(peers) = &self.peers
        {
            return self
                .verify_replicas(peers, selection, repair, progress)
                .await;
        }
        let sources = self.sources();
        let Some(&target) = sources.iter().find(|s| s.kind() == tier) else {
            return Err(Error::FailedPrecondition(format!(
                "the {tier} tier is not configured on this node"
            )));
        };
        let others: Vec<&dyn ShardSource> = sources
            .iter()
            .copied()
            .filter(|s| s.kind() != tier)
            .collect();
        let manifests: Vec<Arc<Manifest>> = target
            .list(tenant, Some(job))
            .await?
            .into_iter()
            .filter(|m| selection.matches(&m.shard))
            .collect();
        if manifests.is_empty() {
            return Err(Error::NotFound(format!(
                "the {tier} tier holds no shard of step {step} of job {job}"
            )));
        }
        let locations: Vec<ChunkLocation> = manifests.iter().flat_map(ChunkLocation::all).collect();
        // Lengths from manifests: the totals saturate rather than wrap.
        let total = locations
            .iter()
            .map(|l| l.chunk.len)
            .fold(0, u64::saturating_add);
        let done = std::sync::atomic::AtomicU64::new(0);
        let checked: Vec<(ChunkLocation, Result<ChunkRead>)> = stream::iter(locations)
            .map(|location| {
                let done = &done;
                async move {
                    let result = target.read_chunk(&location).await;
                    let now = done
                        .fetch_add(location.chunk.len, std::sync::atomic::Ordering::Relaxed)
                        .saturating_add(location.chunk.len);
                    progress(now, total);
                    (location, result)
                }
            })
            .buffer_unordered(self.config.writeback_concurrency)
            .collect()
            .await;
        let mut findings = Vec::new();
        for (location, result) in checked {
            let problem = match result {
                Ok(ChunkRead::Verified(_)) => continue,
                Ok(ChunkRead::Missing) => "missing".to_owned(),
                Ok(ChunkRead::Corrupt) => {
                    self.metrics
                        .chunk_verify_failures
                        .with_label_values(&[tier.as_str()])
                        .inc();
                    "corrupt".to_owned()
                }
                Err(e) => e.to_string(),
            };
            tracing::warn!(tier = %tier, shard = %location.shard(), file = location.file_name(), offset = location.offset, chunk = %location.chunk.id, %problem, "verify found a bad chunk");
            let repaired = repair && self.repair_chunk(tier, &location, &others).await;
            findings.push(VerifyFinding {
                rank: location.shard().rank,
                file: location.file_name().to_owned(),
                offset: location.offset,
                chunk: location.chunk.id,
                problem,
                repaired,
                holder: None,
            });
        }
        Ok(findings)
    }

    /// Verifies every holder's replica of the selected shards on its own:
    /// each chunk read from that holder alone and re-hashed, so a bad copy
    /// is named with its holder even where another holder's copy is good
    /// (a restore would read around it). With `repair`, the holder is sent a
    /// good copy from this node's tiers, the bucket or another holder; it
    /// re-hashes it and replaces its own.
    async fn verify_replicas(
        &self,
        peers: &PeerTier,
        selection: &StepSelection,
        repair: bool,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<Vec<VerifyFinding>> {
        let StepSelection {
            tenant, job, step, ..
        } = selection;
        let manifests: Vec<Arc<Manifest>> = peers
            .list(tenant, Some(job))
            .await?
            .into_iter()
            .filter(|m| selection.matches(&m.shard))
            .collect();
        if manifests.is_empty() {
            return Err(Error::NotFound(format!(
                "no peer holds a shard of step {step} of job {job}"
            )));
        }
        let mut work: Vec<(NodeId, ChunkLocation)> = Vec::new();
        for manifest in &manifests {
            let holders = peers.holders_of(manifest).await;
            for location in ChunkLocation::all(manifest) {
                work.extend(holders.iter().map(|h| (h.clone(), location.clone())));
            }
        }
        let total = work
            .iter()
            .map(|(_, l)| l.chunk.len)
            .fold(0, u64::saturating_add);
        let done = std::sync::atomic::AtomicU64::new(0);
        let checked: Vec<(NodeId, ChunkLocation, Result<ChunkRead>)> = stream::iter(work)
            .map(|(holder, location)| {
                let done = &done;
                async move {
                    let result = peers.holder(holder.clone()).read_chunk(&location).await;
                    let now = done
                        .fetch_add(location.chunk.len, std::sync::atomic::Ordering::Relaxed)
                        .saturating_add(location.chunk.len);
                    progress(now, total);
                    (holder, location, result)
                }
            })
            .buffer_unordered(self.config.writeback_concurrency)
            .collect()
            .await;
        let mut findings = Vec::new();
        for (holder, location, result) in checked {
            let problem = match result {
                Ok(ChunkRead::Verified(_)) => continue,
                Ok(ChunkRead::Missing) => "missing".to_owned(),
                Ok(ChunkRead::Corrupt) => {
                    self.metrics
                        .chunk_verify_failures
                        .with_label_values(&[TierKind::Peers.as_str()])
                        .inc();
                    "corrupt".to_owned()
                }
                Err(e) => e.to_string(),
            };
            tracing::warn!(%holder, shard = %location.shard(), file = location.file_name(), offset = location.offset, chunk = %location.chunk.id, %problem, "verify found a bad replica chunk");
            let repaired = repair && self.repair_replica_chunk(peers, &holder, &location).await;
            findings.push(VerifyFinding {
                rank: location.shard().rank,
                file: location.file_name().to_owned(),
                offset: location.offset,
                chunk: location.chunk.id,
                problem,
                repaired,
                holder: Some(holder),
            });
        }
        Ok(findings)
    }

    /// Sends `holder` a good copy of one chunk: from this node's memory or
    /// disk, the bucket, or another holder.
    async fn repair_replica_chunk(
        &self,
        peers: &PeerTier,
        holder: &NodeId,
        location: &ChunkLocation,
    ) -> bool {
        let others: Vec<PeerHolder<'_>> = peers
            .known_holders(location.shard())
            .into_iter()
            .filter(|h| h != holder)
            .map(|h| peers.holder(h))
            .collect();
        let mut from: Vec<&dyn ShardSource> = vec![&*self.memory, &*self.disk];
        if let Some(object) = &self.object {
            from.push(&**object);
        }
        from.extend(others.iter().map(|h| h as &dyn ShardSource));
        let (source, bytes) = match transfer::read_first_verified(location, &from, &self.metrics)
            .await
        {
            Ok((source, bytes, _)) => (source, bytes),
            Err(e) => {
                tracing::warn!(%holder, chunk = %location.chunk.id, error = %e, "cannot repair a replica chunk: no good copy elsewhere");
                return false;
            }
        };
        match peers
            .put_chunk_on(holder, &location.shard().tenant, &location.chunk.id, bytes)
            .await
        {
            Ok(()) => {
                self.metrics
                    .chunks_repaired
                    .with_label_values(&[TierKind::Peers.as_str()])
                    .inc();
                tracing::info!(%holder, chunk = %location.chunk.id, %source, "replica chunk repaired");
                true
            }
            Err(e) => {
                tracing::warn!(%holder, chunk = %location.chunk.id, error = %e, "repairing a replica chunk failed");
                false
            }
        }
    }

    async fn repair_chunk(
        &self,
        tier: TierKind,
        location: &ChunkLocation,
        from: &[&dyn ShardSource],
    ) -> bool {
        let (source, bytes) = match transfer::read_first_verified(location, from, &self.metrics)
            .await
        {
            Ok((source, bytes, _)) => (source, bytes),
            Err(e) => {
                tracing::warn!(chunk = %location.chunk.id, error = %e, "cannot repair: no good copy elsewhere");
                return false;
            }
        };
        let result = match tier {
            TierKind::Memory => {
                let memory = Arc::clone(&self.memory);
                let location = location.clone();
                tokio::task::spawn_blocking(move || memory.write_chunk_in_place(&location, &bytes))
                    .await
                    .map_err(Error::from)
                    .and_then(|r| r)
            }
            TierKind::Disk => self.disk.put_chunk(location, bytes).await,
            TierKind::Peers => Err(Error::FailedPrecondition(
                "peer replicas are not rewritten from here; re-replication replaces them".into(),
            )),
            TierKind::ObjectStore => match &self.object {
                Some(object) => object.put_chunk(location, bytes).await,
                None => Ok(()),
            },
        };
        match result {
            Ok(()) => {
                self.metrics
                    .chunks_repaired
                    .with_label_values(&[tier.as_str()])
                    .inc();
                tracing::info!(tier = %tier, chunk = %location.chunk.id, %source, "chunk repaired");
                true
            }
            Err(e) => {
                tracing::warn!(tier = %tier, chunk = %location.chunk.id, error = %e, "repair failed");
                false
            }
        }
    }

    /// Removes unreferenced chunks from the disk tier and the object store
    /// (or counts them, on a dry run).
    pub async fn gc(&self, dry_run: bool) -> Result<GcOutcome> {
        let disk = {
            let _gc = self.gc_lock.write().await;
            let disk = Arc::clone(&self.disk);
            tokio::task::spawn_blocking(move || disk.collect_garbage(dry_run)).await??
        };
        tracing::info!(
            dry_run,
            chunks = disk.chunks,
            bytes = disk.bytes,
            "disk garbage collection"
        );
        self.update_usage_metrics();
        let object_store = match &self.object {
            Some(_) => Some(self.collect_bucket_garbage(dry_run).await?),
            None => None,
        };
        Ok(GcOutcome { disk, object_store })
    }

    /// Removes chunks no manifest in the bucket references (see
    /// [`ObjectTier::collect_garbage`]).
    pub(super) async fn collect_bucket_garbage(&self, dry_run: bool) -> Result<BucketGcReport> {
        let Some(object) = &self.object else {
            return Ok(BucketGcReport::default());
        };
        let started = std::time::Instant::now();
        let report = object.collect_garbage(dry_run).await?;
        tracing::info!(
            dry_run,
            chunks = report.chunks,
            bytes = report.bytes,
            skipped_tenants = ?report.skipped_tenants,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "object-store garbage collection"
        );
        Ok(report)
    }

    /// Usage of each tier.
    pub fn tier_status(&self) -> Vec<TierStatus> {
        let usage = self.memory.usage();
        let mut tiers = vec![
            TierStatus {
                tier: TierKind::Memory,
                path: self.memory.root().to_path_buf(),
                used: usage.used,
                capacity: usage.capacity,
                shards: usage.shards as u64,
            },
            TierStatus {
                tier: TierKind::Disk,
                path: self.disk.root().to_path_buf(),
                used: self.disk.used_bytes(),
                capacity: self.disk.capacity(),
                shards: self.disk.shards().len() as u64,
            },
        ];
        if let Some(object) = &self.object {
            // What a bucket holds is not known without listing it; status
            // stays cheap and names the bucket.
            tiers.push(TierStatus {
                tier: TierKind::ObjectStore,
                path: PathBuf::from(object.url()),
                used: 0,
                capacity: 0,
                shards: 0,
            });
        }
        tiers
    }

    /// Open save sessions.
    pub fn open_sessions(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// Each background pipeline this node runs, by name, with its shards by
    /// state.
    pub fn pipelines(&self) -> Vec<(&'static str, PipelineCounts)> {
        [
            Some(&self.writeback),
            self.upload.as_ref(),
            self.replication.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|p| (p.name(), p.counts()))
        .collect()
    }
}
