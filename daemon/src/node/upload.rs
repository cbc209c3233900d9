//! Background upload to the object store (T3), and the journal that lets a
//! restarted daemon resume it.
//!
//! A shard is queued for upload once the disk tier holds it (or right after
//! commit, by configuration). The queue is journaled on disk, one small file
//! per shard, written before the shard counts as queued and removed only
//! once the shard's manifest (and, when it was the last rank, the step's
//! marker) is in the bucket, so a crash or restart at any point resumes the
//! work; the chunks already sent are not sent again (the bucket's local
//! index knows them). The queue is a [`Pipeline`]: an unreachable bucket is
//! retried with backoff (`[pipelines.upload]`), shown as `FAILED` in status
//! and counted in metrics, and a shard past its attempts needs attention and
//! is tried once a minute, while the disk tier keeps every step the bucket
//! lacks.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_core::{Manifest, ShardKey};

use super::pipeline::{Attempt, Journal};
use super::{CopyState, Node, now_ms};
use crate::error::{IoContext, Result};
use crate::failpoint::crash_point;
use crate::fsutil;
use crate::tier::ShardSource;
use crate::tier::object::ObjectTier;
use crate::tier::transfer::{self, CopyReport};

/// Shards queued for upload, one file per shard, so that the queue survives
/// a restart.
pub(super) struct UploadJournal {
    dir: PathBuf,
}

impl UploadJournal {
    /// Opens (creating) the journal directory.
    pub(super) fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).io_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn entry_path(&self, key: &ShardKey) -> PathBuf {
        let name = blake3::hash(key.to_string().as_bytes()).to_hex();
        self.dir.join(format!("{}.json", &name[..32]))
    }
}

impl Journal for UploadJournal {
    /// Records that `key` must be uploaded, durably.
    fn add(&self, key: &ShardKey) -> Result<()> {
        let data = serde_json::to_vec(key).unwrap_or_default();
        let tmp = self.dir.join(format!(".{}.tmp", uuid::Uuid::new_v4()));
        fsutil::write_atomic(&self.entry_path(key), &tmp, &data, true)
    }

    /// Records that `key` is uploaded.
    fn remove(&self, key: &ShardKey) {
        let path = self.entry_path(key);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove upload journal entry; the upload will be checked again after a restart");
        }
    }

    /// Every queued shard; unreadable entries (and temporary files left by
    /// a crash) are removed with a warning.
    fn pending(&self) -> Vec<ShardKey> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut keys = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let parsed = std::fs::read(&path)
                .ok()
                .filter(|_| path.extension().is_some_and(|e| e == "json"))
                .and_then(|bytes| serde_json::from_slice::<ShardKey>(&bytes).ok());
            match parsed {
                Some(key) => keys.push(key),
                None => {
                    tracing::warn!(path = %path.display(), "removing unreadable upload journal entry");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        keys.sort();
        keys
    }
}

impl Node {
    /// Queues a shard for upload, journaled first. A no-op without an
    /// object store.
    pub(super) fn queue_upload(&self, key: ShardKey) {
        if let Some(upload) = &self.upload {
            upload.queue(key);
        }
    }

    /// Records in the journal that a shard must reach the bucket (without
    /// queueing it yet).
    pub(super) fn journal_upload(&self, key: &ShardKey) {
        if let Some(upload) = &self.upload {
            upload.journal(key);
        }
    }

    /// Puts a shard on the upload queue (its journal entry already written).
    pub(super) fn enqueue_upload(&self, key: ShardKey) {
        if let Some(upload) = &self.upload {
            upload.enqueue(key);
        }
    }

    /// Whether a shard still waits for the object store (so the disk tier
    /// must keep it).
    pub(super) fn upload_outstanding(&self, key: &ShardKey) -> bool {
        self.upload_state(key).is_some()
    }

    /// The upload state of a shard this node queued, if it has not finished.
    pub(super) fn upload_state(&self, key: &ShardKey) -> Option<CopyState> {
        self.upload.as_ref().and_then(|upload| upload.state(key))
    }

    /// Runs the upload pipeline, one shard at a time (each moves
    /// `object_store.concurrency` chunks at once), until shutdown.
    pub(super) async fn upload_loop(self: Arc<Self>) {
        let Some(upload) = &self.upload else {
            return;
        };
        let node = &self;
        upload
            .run(
                1,
                &self.cancel,
                |key| async move { node.upload(&key).await },
                |key| async move {
                    node.notify();
                    // The disk tier may now drop steps it kept for the bucket.
                    node.apply_retention(&key.tenant, &key.job).await;
                },
            )
            .await;
    }

    /// One attempt at uploading a shard; the pipeline retries a failure.
    #[tracing::instrument(skip_all, fields(shard = %key))]
    async fn upload(&self, key: &ShardKey) -> Attempt {
        let (Some(object), Some(settings)) = (&self.object, &self.config.object_store) else {
            return Attempt::Dropped;
        };
        let Some(manifest) = self.local_manifest(key).await else {
            tracing::warn!("shard is no longer in any local tier; dropping its upload");
            return Attempt::Dropped;
        };
        let report = match self
            .upload_once(object, &manifest, settings.concurrency)
            .await
        {
            Ok(report) => report,
            Err(e) if self.cancel.is_cancelled() => {
                tracing::info!(error = %e, "upload interrupted by shutdown; it resumes after restart");
                return Attempt::Interrupted;
            }
            Err(e) => {
                // AlreadyExists is permanent: the bucket holds another
                // manifest for this shard, and Cairn never overwrites one.
                self.metrics
                    .writeback_failures
                    .with_label_values(&["object-store"])
                    .inc();
                return Attempt::failed(&e);
            }
        };
        let lag = now_ms().saturating_sub(manifest.committed_unix_ms) as f64 / 1000.0;
        self.metrics.upload_lag_seconds.observe(lag);
        self.metrics
            .saved_bytes
            .with_label_values(&["object-store"])
            .inc_by(report.bytes_written);
        self.metrics
            .dedup_skipped_bytes
            .with_label_values(&["object-store"])
            .inc_by(report.bytes_skipped);
        tracing::info!(
            uploaded = report.bytes_written,
            deduplicated = report.bytes_skipped,
            lag_s = lag,
            "shard durable in the object store"
        );
        // Bucket retention before the shard counts as done, so that whoever
        // waits for it sees the bucket as this upload leaves it.
        if let Err(e) = object
            .apply_retention(&key.tenant, &key.job, &settings.retention)
            .await
        {
            tracing::warn!(error = %e, "object-store retention failed; it runs again after the next upload");
        }
        Attempt::Done
    }

    /// One attempt: the chunks the bucket lacks, the manifest, then the
    /// step's marker if this was its last shard.
    async fn upload_once(
        &self,
        object: &ObjectTier,
        manifest: &Arc<Manifest>,
        concurrency: usize,
    ) -> Result<CopyReport> {
        // Already there (a shard restored from the bucket, or a journal
        // entry whose upload had finished): nothing to send.
        let report = if object
            .manifest(&manifest.shard)
            .await?
            .is_some_and(|stored| stored.hash() == manifest.hash())
        {
            CopyReport {
                bytes_skipped: manifest.total_bytes(),
                ..CopyReport::default()
            }
        } else {
            // No gc_lock here: the disk tier keeps the shard (and so its
            // chunks) until the upload is done, and holding the lock across
            // a slow bucket would stall retention and restores.
            let sources: [&dyn ShardSource; 2] = [&*self.memory, &*self.disk];
            let deadline = cairn_core::bucket::upload_deadline(object.settings().gc_grace);
            transfer::copy_shard(
                manifest,
                &sources,
                object,
                concurrency,
                Some(deadline),
                &self.metrics,
                &self.cancel,
            )
            .await?
        };
        crash_point("upload.before_marker");
        object.complete_step_if_ready(manifest).await?;
        Ok(report)
    }

    pub(super) async fn local_manifest(&self, key: &ShardKey) -> Option<Arc<Manifest>> {
        for source in [&*self.memory as &dyn ShardSource, &*self.disk] {
            if let Ok(Some(m)) = source.manifest(key).await {
                return Some(m);
            }
        }
        None
    }

    /// Collects the bucket's garbage every configured interval (with some
    /// jitter, so that the nodes of a cluster do not all list the bucket at
    /// once).
    pub(super) async fn bucket_gc_loop(self: Arc<Self>) {
        let Some(interval) = self
            .config
            .object_store
            .as_ref()
            .and_then(|o| o.gc_interval)
        else {
            return;
        };
        loop {
            let jitter = interval.mul_f64(f64::from(uuid::Uuid::new_v4().as_bytes()[0]) / 2560.0);
            tokio::select! {
                () = self.cancel.cancelled() => return,
                // `gc_interval_secs` comes from the config file, up to u64::MAX.
                () = tokio::time::sleep(interval.saturating_add(jitter)) => {}
            }
            if let Err(e) = self.collect_bucket_garbage(false).await {
                tracing::warn!(error = %e, "object-store garbage collection failed");
            }
        }
    }
}
