//! The restore path: make a shard readable in the memory tier.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use cairn_core::{FileName, Manifest, ShardKey};

use super::{Node, RestoreOutcome};
use crate::error::{Error, Result};
use crate::hashing;
use crate::tier::{ChunkLocation, ShardSource, TierKind};
use crate::transfer::{self, FillReport};

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
        let repaired: u64 = report.bytes_by_tier.values().sum();
        *bytes_by_tier.entry(TierKind::Memory).or_default() -= repaired;
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
        self.reserve_memory(&id, manifest.total_bytes())?;
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

    /// Writes `wanted` chunks into the memory-tier files at `paths`, each
    /// from the fastest tier below memory with a verified copy (see
    /// [`Node::slower_sources`]).
    async fn fill_from_slower_tiers(
        &self,
        wanted: Vec<ChunkLocation>,
        paths: &[PathBuf],
    ) -> Result<FillReport> {
        let files = open_for_write(paths)?;
        transfer::fill_chunks(
            wanted,
            &self.slower_sources(),
            &[],
            &files,
            self.config.writeback_concurrency,
            &self.metrics,
        )
        .await
    }
}

/// Opens existing files for writing in place (staged or committed files).
pub(crate) fn open_for_write(paths: &[PathBuf]) -> Result<Vec<Arc<std::fs::File>>> {
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

fn merge(into: &mut BTreeMap<TierKind, u64>, report: &FillReport) {
    for (tier, bytes) in &report.bytes_by_tier {
        *into.entry(*tier).or_default() += bytes;
    }
}
