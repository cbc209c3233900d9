//! Step-level state in the bucket: completion markers, retention, deletion
//! and garbage collection.
//!
//! A shard is complete in the bucket once its manifest is there; a *step* is
//! complete once every rank's manifest is there, and the daemon that uploads
//! the last one writes the step's marker (`.../<step>/complete`). Status and
//! bucket retention trust the marker, so a step that is still uploading never
//! looks complete (restore reads the manifests themselves). Deleting a step
//! removes the marker first, so a half-deleted step never looks complete
//! either.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use bytes::Bytes;
use cairn_core::{ChunkId, JobName, Manifest, Rank, RetentionPolicy, Step, TenantName};
use futures::{StreamExt, TryStreamExt, stream};
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::Serialize;

use super::{
    CHUNKS, DEFAULT_REQUEST_CONCURRENCY, MANIFEST_EXT, MANIFESTS, ObjectTier, TENANTS, store_error,
    unix_now,
};
use crate::error::Result;
use crate::tier::ShardSource;

const MARKER: &str = "complete";

/// The content of a step marker: enough for an operator reading the bucket
/// to see what the step holds. Deterministic, so daemons racing to write
/// the same marker write the same bytes.
#[derive(Serialize)]
struct StepMarker<'a> {
    job: &'a str,
    step: u64,
    world_size: Option<u32>,
    ranks: Vec<u32>,
}

/// One step of a job as the bucket holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BucketStep {
    /// Ranks whose manifest is in the bucket.
    pub ranks: BTreeSet<Rank>,
    /// Whether the step's completion marker is in the bucket.
    pub marked: bool,
    /// Marked and holding manifests: every rank's shard is in the bucket.
    pub complete: bool,
}

/// What a bucket garbage collection removed (or would remove).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BucketGcReport {
    /// Chunks removed.
    pub chunks: u64,
    /// Their stored bytes.
    pub bytes: u64,
    /// Tenants skipped because a manifest could not be read: collecting
    /// without knowing every reference could delete a needed chunk.
    pub skipped_tenants: Vec<String>,
}

impl ObjectTier {
    fn job_prefix(&self, tenant: &TenantName, job: &JobName) -> Path {
        self.tenant_path(tenant).join(MANIFESTS).join(job.as_str())
    }

    fn step_prefix(&self, tenant: &TenantName, job: &JobName, step: Step) -> Path {
        self.job_prefix(tenant, job).join(step.0.to_string())
    }

    /// The object key of a step's completion marker.
    pub fn marker_path(&self, tenant: &TenantName, job: &JobName, step: Step) -> Path {
        self.step_prefix(tenant, job, step).join(MARKER)
    }

    async fn list_paths(&self, prefix: &Path) -> Result<Vec<object_store::ObjectMeta>> {
        self.list_bounded(prefix).await
    }

    /// Every step of a job in the bucket, from one listing (no manifest is
    /// read).
    pub async fn steps(
        &self,
        tenant: &TenantName,
        job: &JobName,
    ) -> Result<BTreeMap<Step, BucketStep>> {
        let prefix = self.job_prefix(tenant, job);
        let mut steps: BTreeMap<Step, BucketStep> = BTreeMap::new();
        for meta in self.list_paths(&prefix).await? {
            let Some(parts) = meta.location.prefix_match(&prefix) else {
                continue;
            };
            let parts: Vec<String> = parts.map(|p| p.as_ref().to_owned()).collect();
            let [step, name] = parts.as_slice() else {
                continue;
            };
            let Ok(step) = step.parse::<u64>().map(Step) else {
                continue;
            };
            if name == MARKER {
                steps.entry(step).or_default().marked = true;
            } else if let Some(rank) = name
                .strip_suffix(&format!(".{MANIFEST_EXT}"))
                .and_then(|r| r.parse::<u32>().ok())
            {
                steps.entry(step).or_default().ranks.insert(Rank(rank));
            }
        }
        for step in steps.values_mut() {
            // A marker without manifests is what a delete racing an upload
            // can leave: not a complete step.
            step.complete = step.marked && !step.ranks.is_empty();
        }
        Ok(steps)
    }

    /// Whether a step's completion marker is in the bucket.
    pub async fn step_is_complete(
        &self,
        tenant: &TenantName,
        job: &JobName,
        step: Step,
    ) -> Result<bool> {
        let path = self.marker_path(tenant, job, step);
        let store = &self.store;
        match self.retrying("head", &path, || store.head(&path)).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(source) => Err(store_error(format!("checking for {path}"), source)),
        }
    }

    /// Writes the step's completion marker if every rank's manifest is now
    /// in the bucket (every rank below the world size the manifest declares;
    /// with none declared, the shard alone). True when the step is complete.
    pub async fn complete_step_if_ready(&self, manifest: &Manifest) -> Result<bool> {
        let key = &manifest.shard;
        let prefix = self.step_prefix(&key.tenant, &key.job, key.step);
        let mut present = BTreeSet::new();
        let mut marked = false;
        for meta in self.list_paths(&prefix).await? {
            match meta.location.filename() {
                Some(MARKER) => marked = true,
                Some(name) => {
                    if let Some(rank) = name
                        .strip_suffix(&format!(".{MANIFEST_EXT}"))
                        .and_then(|r| r.parse::<u32>().ok())
                    {
                        present.insert(rank);
                    }
                }
                None => {}
            }
        }
        if marked {
            return Ok(true);
        }
        let ranks: Vec<u32> = match manifest.world_size {
            Some(world) if (0..world).all(|r| present.contains(&r)) => (0..world).collect(),
            Some(_) => return Ok(false),
            None if present.contains(&key.rank.0) => present.into_iter().collect(),
            None => return Ok(false),
        };
        if manifest.world_size.is_some() && !self.ranks_share_attempt(manifest, &ranks).await? {
            tracing::info!(tenant = %key.tenant, job = %key.job, step = %key.step, "every rank is in the object store, but not all from one save; the step is not complete");
            return Ok(false);
        }
        let marker = StepMarker {
            job: key.job.as_str(),
            step: key.step.0,
            world_size: manifest.world_size,
            ranks,
        };
        let bytes = Bytes::from(serde_json::to_vec_pretty(&marker).unwrap_or_default());
        // Any marker already there means another daemon finished the step.
        let path = self.marker_path(&key.tenant, &key.job, key.step);
        self.put_create_only(&path, bytes, |_| Ok(true)).await?;
        tracing::info!(tenant = %key.tenant, job = %key.job, step = %key.step, "step complete in the object store");
        Ok(true)
    }

    /// Whether the bucket's manifest of every rank in `ranks` comes from
    /// `manifest`'s attempt (a step is complete only when one save wrote
    /// all of it).
    async fn ranks_share_attempt(&self, manifest: &Manifest, ranks: &[u32]) -> Result<bool> {
        let others: Vec<_> = ranks
            .iter()
            .map(|&rank| {
                let mut other = manifest.shard.clone();
                other.rank = Rank(rank);
                other
            })
            .collect();
        for batch in others.chunks(DEFAULT_REQUEST_CONCURRENCY) {
            let stored =
                futures::future::try_join_all(batch.iter().map(|other| self.manifest(other)))
                    .await?;
            if !stored
                .iter()
                .all(|m| m.as_ref().is_some_and(|m| m.attempt == manifest.attempt))
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Deletes a step from the bucket: the marker first, then every rank's
    /// manifest. Its chunks go with the next garbage collection. Returns the
    /// number of shards removed.
    pub async fn delete_step(&self, tenant: &TenantName, job: &JobName, step: Step) -> Result<u32> {
        self.delete(&self.marker_path(tenant, job, step)).await?;
        let prefix = self.step_prefix(tenant, job, step);
        let mut removed = 0u32;
        for meta in self.list_paths(&prefix).await? {
            self.delete(&meta.location).await?;
            if meta.location.extension() == Some(MANIFEST_EXT) {
                removed = removed.saturating_add(1);
            }
        }
        Ok(removed)
    }

    /// Applies `policy` to one job's steps in the bucket (see
    /// [`RetentionPolicy::bucket_steps_to_evict`]) and returns the steps
    /// removed.
    pub async fn apply_retention(
        &self,
        tenant: &TenantName,
        job: &JobName,
        policy: &RetentionPolicy,
    ) -> Result<Vec<Step>> {
        let listed: Vec<(Step, bool)> = self
            .steps(tenant, job)
            .await?
            .into_iter()
            .map(|(step, s)| (step, s.complete))
            .collect();
        let evict = policy.bucket_steps_to_evict(&listed);
        for step in &evict {
            let shards = self.delete_step(tenant, job, *step).await?;
            tracing::info!(%tenant, %job, %step, shards, "step removed from the object store by retention");
        }
        Ok(evict)
    }

    /// Tenants with anything in the bucket.
    async fn tenants(&self) -> Result<Vec<TenantName>> {
        let prefix = self.prefix.clone().join(TENANTS);
        let listing = self.list_dirs_bounded(&prefix).await?;
        Ok(listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename())
            .filter_map(|name| TenantName::parse("tenant", name.to_owned()).ok())
            .collect())
    }

    /// Mark and sweep over the whole bucket: deletes chunks that no manifest
    /// references and that were written at least the grace period ago (see
    /// [`cairn_core::bucket`] for why uploads in flight are safe). Chunks are
    /// listed before manifests, on purpose. With `dry_run` nothing is
    /// deleted and the report says what would be.
    pub async fn collect_garbage(&self, dry_run: bool) -> Result<BucketGcReport> {
        let mut report = BucketGcReport::default();
        let grace = self.settings.gc_grace;
        for tenant in self.tenants().await? {
            let chunks_prefix = self.tenant_path(&tenant).join(CHUNKS);
            let chunks: Vec<(ChunkId, object_store::ObjectMeta)> = self
                .list_paths(&chunks_prefix)
                .await?
                .into_iter()
                .filter_map(|meta| Some((meta.location.filename()?.parse().ok()?, meta)))
                .collect();
            let Some(referenced) = self.referenced_chunks(&tenant).await? else {
                report.skipped_tenants.push(tenant.to_string());
                continue;
            };
            let now = unix_now();
            let victims: Vec<(ChunkId, object_store::ObjectMeta)> = chunks
                .into_iter()
                .filter(|(id, meta)| {
                    let written = u64::try_from(meta.last_modified.timestamp()).unwrap_or(0);
                    let age = Duration::from_secs(now.saturating_sub(written));
                    cairn_core::bucket::collectable(referenced.contains(id), age, grace)
                })
                .collect();
            if dry_run || victims.is_empty() {
                report.chunks = report.chunks.saturating_add(victims.len() as u64);
                report.bytes = victims
                    .iter()
                    .map(|(_, m)| m.size)
                    .fold(report.bytes, u64::saturating_add);
                continue;
            }
            let ids: Vec<ChunkId> = victims.iter().map(|(id, _)| *id).collect();
            // Forget first: a chunk the index still lists after its deletion
            // would be trusted by the next upload.
            self.index.forget(&tenant, &ids);
            // Look at each victim once more right before deleting it: one
            // uploaded again since the listing (an uploader refreshing a chunk
            // too old to reuse) is young now and stays. What remains is the
            // window between this look and the delete itself.
            let deleted: Vec<u64> = stream::iter(victims)
                .map(|(_, meta)| async move {
                    Ok::<_, crate::error::Error>(if self.delete_if_unchanged(&meta).await? {
                        Some(meta.size)
                    } else {
                        None
                    })
                })
                .buffer_unordered(DEFAULT_REQUEST_CONCURRENCY)
                .try_filter_map(|size| async move { Ok(size) })
                .try_collect()
                .await?;
            report.chunks = report.chunks.saturating_add(deleted.len() as u64);
            report.bytes = deleted
                .iter()
                .fold(report.bytes, |a, b| a.saturating_add(*b));
            tracing::info!(%tenant, chunks = ids.len(), "removed unreferenced chunks from the object store");
        }
        Ok(report)
    }

    /// Deletes the object `listed` describes unless it was written again
    /// since it was listed; true when it is gone.
    async fn delete_if_unchanged(&self, listed: &object_store::ObjectMeta) -> Result<bool> {
        let path = &listed.location;
        let store = &self.store;
        match self.retrying("head", path, || store.head(path)).await {
            Ok(now) if now.last_modified != listed.last_modified => {
                tracing::debug!(key = %path, "chunk rewritten since the GC listing; keeping it");
                Ok(false)
            }
            Ok(_) => self.delete(path).await.map(|()| true),
            Err(e) if e.is_not_found() => Ok(true),
            Err(source) => Err(store_error(format!("checking {path}"), source)),
        }
    }

    /// Every chunk a manifest of `tenant` names, or `None` when some
    /// manifest cannot be read or decoded (then nothing may be collected).
    async fn referenced_chunks(&self, tenant: &TenantName) -> Result<Option<HashSet<ChunkId>>> {
        let prefix = self.tenant_path(tenant).join(MANIFESTS);
        let paths: Vec<Path> = self
            .list_paths(&prefix)
            .await?
            .into_iter()
            .map(|m| m.location)
            .filter(|p| p.extension() == Some(MANIFEST_EXT))
            .collect();
        enum Read {
            Found(Manifest),
            /// Deleted since the listing (retention): references nothing.
            Gone,
            Corrupt,
        }
        let reads: Vec<Read> = stream::iter(paths)
            .map(|path| async move {
                let Some(bytes) = self.get_bytes(&path, "manifest").await? else {
                    return Ok::<_, crate::error::Error>(Read::Gone);
                };
                Ok(match Manifest::decode(&bytes) {
                    Ok(m) => Read::Found(m),
                    Err(e) => {
                        tracing::warn!(key = %path, error = %e, "corrupt manifest in the object store; not collecting garbage for its tenant");
                        Read::Corrupt
                    }
                })
            })
            .buffer_unordered(DEFAULT_REQUEST_CONCURRENCY)
            .try_collect()
            .await?;
        let mut referenced = HashSet::new();
        for read in reads {
            match read {
                Read::Found(manifest) => referenced.extend(manifest.unique_chunks().into_keys()),
                Read::Gone => {}
                Read::Corrupt => return Ok(None),
            }
        }
        Ok(Some(referenced))
    }
}
