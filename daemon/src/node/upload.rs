//! Background upload to the object store (T3), and the journal that lets a
//! restarted daemon resume it.
//!
//! A shard is queued for upload once the disk tier holds it (or right after
//! commit, by configuration). The queue is journaled on disk, one small file
//! per shard, written before the shard counts as queued and removed only
//! once the shard's manifest (and, when it was the last rank, the step's
//! marker) is in the bucket, so a crash or restart at any point resumes the
//! work; the chunks already sent are not sent again (the bucket's local
//! index knows them). Uploads never give up: an unreachable bucket is
//! retried with backoff, shown as `FAILED` (retrying) in status, and counted
//! in metrics, while the disk tier keeps every step the bucket lacks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cairn_core::{Manifest, ShardKey};
use tokio::sync::mpsc;

use super::{CopyState, Node, lock, now_ms};
use crate::error::{Error, IoContext, Result};
use crate::failpoint::crash_point;
use crate::fsutil;
use crate::retry::RetryPolicy;
use crate::tier::ShardSource;
use crate::tier::object::ObjectTier;
use crate::tier::transfer::{self, CopyReport};

/// How a failed upload is queued again: 1 s doubling to 60 s, until it
/// succeeds (each of its bucket requests has its own bounded retries).
const UPLOAD_RETRY: RetryPolicy = RetryPolicy::new(Duration::from_secs(1), Duration::from_secs(60));

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
        if self.upload_journal.is_some() {
            self.journal_upload(&key);
            self.enqueue_upload(key);
        }
    }

    /// Records in the journal that a shard must reach the bucket (without
    /// queueing it yet).
    pub(super) fn journal_upload(&self, key: &ShardKey) {
        if let Some(journal) = &self.upload_journal
            && let Err(e) = journal.add(key)
        {
            tracing::warn!(shard = %key, error = %e, "cannot journal the upload; it will not resume after a restart");
        }
    }

    /// Puts a shard on the upload queue (its journal entry already written).
    pub(super) fn enqueue_upload(&self, key: ShardKey) {
        if self.upload_journal.is_none() {
            return;
        }
        let previous = lock(&self.uploads).insert(key.clone(), CopyState::Pending);
        if previous.is_none() {
            self.metrics.upload_pending.inc();
        }
        if previous != Some(CopyState::Pending) {
            let _ = self.upload_tx.send(key);
        }
    }

    /// Queues every shard the journal holds: the uploads a previous run did
    /// not finish.
    pub(super) fn resume_uploads(&self) {
        if let Some(journal) = &self.upload_journal {
            for key in journal.pending() {
                tracing::info!(shard = %key, "resuming upload");
                self.enqueue_upload(key);
            }
        }
    }

    /// Whether a shard still waits for the object store (so the disk tier
    /// must keep it).
    pub(super) fn upload_outstanding(&self, key: &ShardKey) -> bool {
        lock(&self.uploads).contains_key(key)
    }

    /// The upload state of a shard this node queued, if it has not finished.
    pub(super) fn upload_state(&self, key: &ShardKey) -> Option<CopyState> {
        lock(&self.uploads).get(key).cloned()
    }

    pub(super) async fn upload_loop(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<ShardKey>) {
        loop {
            let key = tokio::select! {
                () = self.cancel.cancelled() => return,
                key = rx.recv() => match key { Some(k) => k, None => return },
            };
            self.upload(&key).await;
        }
    }

    /// Uploads one shard. A failed attempt is queued again after a backoff,
    /// so that one shard the bucket refuses does not hold up the others,
    /// until it succeeds or the daemon shuts down (the journal then keeps it
    /// for the next run).
    #[tracing::instrument(skip_all, fields(shard = %key))]
    async fn upload(self: &Arc<Self>, key: &ShardKey) {
        let (Some(object), Some(settings)) = (&self.object, &self.config.object_store) else {
            return;
        };
        let Some(manifest) = self.local_manifest(key).await else {
            tracing::warn!("shard is no longer in any local tier; dropping its upload");
            self.finish_upload(key);
            return;
        };
        let report = match self
            .upload_once(object, &manifest, settings.concurrency)
            .await
        {
            Ok(report) => report,
            Err(e) if self.cancel.is_cancelled() => {
                tracing::info!(error = %e, "upload interrupted by shutdown; it resumes after restart");
                return;
            }
            Err(e @ Error::AlreadyExists(_)) => {
                // Not transient: the bucket holds another manifest for this
                // shard, and Cairn never overwrites one.
                tracing::error!(error = %e, "upload refused; the shard stays local only");
                self.metrics
                    .writeback_failures
                    .with_label_values(&["object-store"])
                    .inc();
                self.finish_upload(key);
                lock(&self.uploads).insert(key.clone(), CopyState::Failed(e.to_string()));
                self.notify();
                return;
            }
            Err(e) => {
                self.retry_upload_later(key, &e);
                return;
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
        self.finish_upload(key);
        self.notify();
        // The disk tier may now drop steps it kept for the bucket.
        self.apply_retention(&key.tenant, &key.job).await;
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

    /// Records a failed attempt and queues the shard again after a backoff
    /// that doubles with each failure.
    fn retry_upload_later(self: &Arc<Self>, key: &ShardKey, error: &Error) {
        let attempt = {
            let mut attempts = lock(&self.upload_attempts);
            let n = attempts.entry(key.clone()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        let delay = UPLOAD_RETRY
            .delay_after(attempt)
            .unwrap_or(UPLOAD_RETRY.max_delay);
        tracing::warn!(%error, attempt, retry_in_s = delay.as_secs(), "upload to the object store failed, retrying");
        self.metrics
            .writeback_failures
            .with_label_values(&["object-store"])
            .inc();
        lock(&self.uploads).insert(
            key.clone(),
            CopyState::Failed(format!("attempt {attempt} failed, retrying: {error}")),
        );
        self.notify();
        let node = Arc::clone(self);
        let key = key.clone();
        self.background.spawn("upload retry", async move {
            tokio::select! {
                () = node.cancel.cancelled() => {}
                () = tokio::time::sleep(delay) => { let _ = node.upload_tx.send(key); }
            }
        });
    }

    fn finish_upload(&self, key: &ShardKey) {
        if let Some(journal) = &self.upload_journal {
            journal.remove(key);
        }
        lock(&self.upload_attempts).remove(key);
        if lock(&self.uploads).remove(key).is_some() {
            self.metrics.upload_pending.dec();
        }
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
