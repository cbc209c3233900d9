//! Scrubbing of the disk tier (T1): its chunks re-hashed in the background,
//! pass after pass, at `disk.scrub_bytes_per_sec`, so that bytes that rot
//! on the disk after they were written are found before a restore needs
//! them, not only when a new step happens to reuse them.
//!
//! A bad chunk is removed at once ([`crate::tier::disk::DiskTier::scrub_chunk`])
//! and rewritten from a good copy in another tier (memory, the peers, the
//! bucket; re-hashed on the way). When no tier has one, the shards that name
//! it leave T1, which no longer claims them (`cairn list` shows them not
//! durable on disk), and go back to write-back if the memory tier still
//! holds them. The replicas a node holds for others are scrubbed by the peer
//! tier (`peer::health`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_core::{ChunkId, ShardKey, TenantName};

use super::Node;
use crate::tier::disk::Scrubbed;
use crate::tier::transfer;
use crate::tier::{ChunkLocation, ShardSource, TierKind};

/// Pause between two passes.
const PASS_PAUSE: Duration = Duration::from_secs(10);

impl Node {
    /// Re-hashes every chunk the disk tier's manifests name, at no more
    /// than `disk.scrub_bytes_per_sec`; off when that is 0.
    pub(super) async fn disk_scrub_loop(self: Arc<Self>) {
        let rate = self.config.disk_scrub_bytes_per_sec;
        if rate == 0 {
            return;
        }
        loop {
            let started = Instant::now();
            let mut bytes: u64 = 0;
            for (tenant, id) in self.disk.referenced_chunks() {
                let disk = Arc::clone(&self.disk);
                let (scrub_tenant, scrub_id) = (tenant.clone(), id);
                let scrubbed = tokio::select! {
                    () = self.cancel.cancelled() => return,
                    done = tokio::task::spawn_blocking(move || disk.scrub_chunk(&scrub_tenant, &scrub_id)) => done,
                };
                let read = match scrubbed {
                    Ok(Scrubbed::Good(read)) => read,
                    Ok(Scrubbed::Bad(read)) => {
                        self.metrics
                            .scrub_bad_chunks
                            .with_label_values(&["disk"])
                            .inc();
                        self.repair_disk_chunk(&tenant, id).await;
                        read
                    }
                    Ok(Scrubbed::Absent) => 0,
                    Err(e) => {
                        tracing::warn!(error = %e, "scrubbing a disk chunk failed");
                        0
                    }
                };
                self.metrics
                    .scrub_bytes
                    .with_label_values(&["disk"])
                    .inc_by(read);
                bytes = bytes.saturating_add(read);
                let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    tokio::select! {
                        () = self.cancel.cancelled() => return,
                        () = tokio::time::sleep(ahead) => {}
                    }
                }
            }
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = tokio::time::sleep(PASS_PAUSE) => {}
            }
        }
    }

    /// Rewrites a bad disk chunk from another tier, or, with no good copy
    /// anywhere, takes the shards that name it out of the disk tier.
    async fn repair_disk_chunk(&self, tenant: &TenantName, id: ChunkId) {
        let naming: Vec<ShardKey> = self
            .disk
            .shards()
            .iter()
            .filter(|m| &m.shard.tenant == tenant)
            .filter(|m| m.files.iter().any(|f| f.chunks.iter().any(|c| c.id == id)))
            .map(|m| m.shard.clone())
            .collect();
        let location = self.disk.shards().iter().find_map(|m| {
            (&m.shard.tenant == tenant)
                .then(|| ChunkLocation::all(m).into_iter().find(|l| l.chunk.id == id))
                .flatten()
        });
        let Some(location) = location else {
            return; // no manifest names it any more
        };
        let others: Vec<&dyn ShardSource> = self
            .sources()
            .into_iter()
            .filter(|s| s.kind() != TierKind::Disk)
            .collect();
        let repaired = match transfer::read_first_verified(&location, &others, &self.metrics).await
        {
            Ok((source, bytes, _)) => match self.disk.store_chunk(tenant, &id, bytes, true).await {
                Ok(()) => {
                    self.metrics
                        .chunks_repaired
                        .with_label_values(&[TierKind::Disk.as_str()])
                        .inc();
                    tracing::warn!(%tenant, chunk = %id, %source, "scrubbing rewrote a bad disk chunk from another tier");
                    true
                }
                Err(e) => {
                    tracing::error!(%tenant, chunk = %id, error = %e, "rewriting a bad disk chunk failed");
                    false
                }
            },
            Err(e) => {
                tracing::error!(%tenant, chunk = %id, error = %e, "no other tier has a good copy of a bad disk chunk");
                false
            }
        };
        if repaired {
            return;
        }
        match self.disk.remove_shards(&naming) {
            Ok(removed) => {
                for key in removed {
                    tracing::error!(shard = %key, chunk = %id, "the shard leaves the disk tier: one of its chunks is bad and no tier has a good copy");
                    if self.memory.contains(&key) {
                        self.queue_writeback(key);
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "removing shards with a bad chunk from the disk tier failed")
            }
        }
        self.update_usage_metrics();
        self.notify();
    }
}
