//! Restores in flight: how far each is and where its bytes come from, for
//! `Status`, the metrics, the periodic log line and the CLI's progress bars.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_core::ShardKey;

use super::lock;
use crate::metrics::Metrics;

/// One restore's progress. Updated per chunk as it lands in the memory tier.
#[derive(Debug)]
pub struct RestoreProgress {
    /// The shard being restored.
    pub shard: ShardKey,
    /// Bytes this restore fetches.
    pub total_bytes: u64,
    done_bytes: AtomicU64,
    by_source: Mutex<BTreeMap<String, u64>>,
    started: Instant,
}

/// A copy of a restore's progress at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgressSnapshot {
    /// The shard being restored.
    pub shard: ShardKey,
    /// Bytes this restore fetches.
    pub total_bytes: u64,
    /// Bytes fetched so far.
    pub done_bytes: u64,
    /// Bytes so far by source label (`disk`, `peer:<node>`, `object-store`).
    pub by_source: BTreeMap<String, u64>,
    /// Since the restore started.
    pub elapsed: Duration,
}

impl RestoreProgress {
    /// Counts `bytes` that `source` delivered.
    pub fn add(&self, source: &str, bytes: u64) {
        self.done_bytes.fetch_add(bytes, Ordering::Relaxed);
        let mut by_source = lock(&self.by_source);
        let counted = by_source.entry(source.to_owned()).or_default();
        *counted = counted.saturating_add(bytes);
    }

    /// Where the restore stands now.
    pub fn snapshot(&self) -> ProgressSnapshot {
        ProgressSnapshot {
            shard: self.shard.clone(),
            total_bytes: self.total_bytes,
            done_bytes: self.done_bytes.load(Ordering::Relaxed),
            by_source: lock(&self.by_source).clone(),
            elapsed: self.started.elapsed(),
        }
    }
}

/// The restores running on this node.
#[derive(Debug, Default)]
pub struct ActiveRestores {
    running: Mutex<Vec<Arc<RestoreProgress>>>,
}

impl ActiveRestores {
    /// Registers a restore of `total_bytes` for `shard`; it counts as
    /// running (in `Status` and the metrics) until the guard is dropped.
    pub fn start(
        &self,
        shard: ShardKey,
        total_bytes: u64,
        metrics: &Arc<Metrics>,
    ) -> RestoreGuard<'_> {
        let progress = Arc::new(RestoreProgress {
            shard,
            total_bytes,
            done_bytes: AtomicU64::new(0),
            by_source: Mutex::new(BTreeMap::new()),
            started: Instant::now(),
        });
        lock(&self.running).push(Arc::clone(&progress));
        metrics.restores_active.inc();
        metrics
            .restore_remaining_bytes
            .add(gauge_value(total_bytes));
        RestoreGuard {
            registry: self,
            progress,
            metrics: Arc::clone(metrics),
        }
    }

    /// Every restore running now, oldest first.
    pub fn snapshots(&self) -> Vec<ProgressSnapshot> {
        lock(&self.running).iter().map(|p| p.snapshot()).collect()
    }

    /// The oldest running restore of `shard`, if any.
    pub fn of(&self, shard: &ShardKey) -> Option<ProgressSnapshot> {
        lock(&self.running)
            .iter()
            .find(|p| &p.shard == shard)
            .map(|p| p.snapshot())
    }
}

/// Keeps a restore registered; dropping it (done, failed or cancelled)
/// takes the restore out of [`ActiveRestores`] and its remaining bytes out
/// of the gauge.
pub struct RestoreGuard<'a> {
    registry: &'a ActiveRestores,
    progress: Arc<RestoreProgress>,
    metrics: Arc<Metrics>,
}

impl RestoreGuard<'_> {
    /// Counts `bytes` that `source` delivered, in the progress and the metrics.
    pub fn add(&self, source: &str, bytes: u64) {
        self.progress.add(source, bytes);
        self.metrics
            .restore_source_bytes
            .with_label_values(&[source])
            .inc_by(bytes);
        self.metrics.restore_remaining_bytes.sub(gauge_value(bytes));
    }

    /// Where the restore stands now.
    pub fn snapshot(&self) -> ProgressSnapshot {
        self.progress.snapshot()
    }
}

impl Drop for RestoreGuard<'_> {
    fn drop(&mut self) {
        lock(&self.registry.running).retain(|p| !Arc::ptr_eq(p, &self.progress));
        let done = self.progress.done_bytes.load(Ordering::Relaxed);
        let remaining = self.progress.total_bytes.saturating_sub(done);
        self.metrics.restores_active.dec();
        self.metrics
            .restore_remaining_bytes
            .sub(gauge_value(remaining));
    }
}

fn gauge_value(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use cairn_core::{JobName, Rank, Step, TenantName};

    use super::*;

    fn key(rank: u32) -> ShardKey {
        ShardKey {
            tenant: TenantName::parse("tenant", "t".into()).expect("valid tenant"),
            job: JobName::parse("job", "job".into()).expect("valid job"),
            step: Step(3),
            rank: Rank(rank),
        }
    }

    #[test]
    fn a_restore_counts_while_its_guard_lives() {
        let metrics = Arc::new(Metrics::new());
        let active = ActiveRestores::default();
        {
            let guard = active.start(key(0), 100, &metrics);
            let _other = active.start(key(1), 50, &metrics);
            guard.add("disk", 30);
            guard.add("peer:node-2", 20);
            guard.add("disk", 10);
            let now = active.of(&key(0)).expect("running");
            assert_eq!(now.done_bytes, 60);
            assert_eq!(
                now.by_source,
                BTreeMap::from([("disk".into(), 40), ("peer:node-2".into(), 20)])
            );
            assert_eq!(active.snapshots().len(), 2);
            assert_eq!(metrics.restores_active.get(), 2);
            assert_eq!(metrics.restore_remaining_bytes.get(), 90);
        }
        assert!(active.snapshots().is_empty());
        assert_eq!(metrics.restores_active.get(), 0);
        assert_eq!(metrics.restore_remaining_bytes.get(), 0);
        assert_eq!(
            metrics
                .restore_source_bytes
                .with_label_values(&["disk"])
                .get(),
            40
        );
    }
}
