//! One background copy pipeline: the shape write-back, upload and
//! replication share.
//!
//! A pipeline keeps, for each shard it was handed, where the copy stands
//! ([`CopyState`]), how many attempts in a row failed, and whether it is
//! queued, running or waiting for a retry. Its rules are the same for all
//! three:
//!
//! * a shard is queued at most once: queueing it again while it waits does
//!   nothing, and while it runs it is run once more afterwards. So the queue
//!   holds at most one entry per shard this node holds, which bounds it by
//!   the tiers' own capacity, and a commit never blocks on it;
//! * a failed attempt is retried after the pipeline's [`PipelinePolicy`]
//!   wait (doubling to a cap), from the pipeline's own timer rather than a
//!   spawned sleep, so other shards go on meanwhile;
//! * after `attempts` failures in a row, or at once for a permanent error,
//!   the shard **needs attention**: it is logged at error level once, counted
//!   in `cairn_pipeline_needs_attention_shards{pipeline}`, shown as `FAILED`
//!   with a "needs attention" message in `ListSteps`, `cairn list` and
//!   `cairn status`, and then tried only every `recheck` (if any), so a
//!   bucket or peer that comes back heals it without a restart;
//! * with a [`Journal`], the shard is recorded before it counts as queued
//!   and forgotten only when it is done, so a restart resumes it;
//! * [`Pipeline::state`] is what `wait_durable`, listings and status ask.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::future::Future;
use std::sync::Mutex;

use cairn_core::ShardKey;
use futures::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{CopyState, lock};
use crate::error::Result;
use crate::metrics::Metrics;
use crate::retry::PipelinePolicy;

/// Where shards queued in a pipeline are recorded so that a restart resumes
/// them.
pub(super) trait Journal: Send + Sync {
    /// Records `key`, durably, before it counts as queued.
    fn add(&self, key: &ShardKey) -> Result<()>;
    /// Forgets `key`: its copy is done or will never be.
    fn remove(&self, key: &ShardKey);
    /// Every shard recorded and not yet forgotten.
    fn pending(&self) -> Vec<ShardKey>;
}

/// How one attempt at a shard ended.
#[derive(Debug)]
pub(super) enum Attempt {
    /// The copy is complete and the pipeline forgets the shard (write-back,
    /// upload: the tier itself now says it holds it).
    Done,
    /// The copy is complete and the pipeline keeps the shard as `Durable`
    /// (replication: holders are checked and may be lost later).
    Durable,
    /// Nothing to do any more: the shard left this node.
    Dropped,
    /// The attempt failed; `permanent` when trying again cannot help.
    Failed {
        /// What went wrong, for status and logs.
        error: String,
        /// Whether the error is permanent (see `Error::is_permanent`).
        permanent: bool,
    },
    /// Shutdown stopped the attempt; the journal or the requeue at start
    /// resumes it.
    Interrupted,
}

impl Attempt {
    /// A failed attempt from an error.
    pub(super) fn failed(error: &crate::error::Error) -> Self {
        Self::Failed {
            error: error.to_string(),
            permanent: error.is_permanent(),
        }
    }
}

/// Shards in each state, for status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipelineCounts {
    /// Queued or running with no failure yet.
    pub pending: usize,
    /// Failed at least once and waiting for their next attempt.
    pub retrying: usize,
    /// Past their attempts, or failed for good.
    pub needs_attention: usize,
    /// Complete and still followed (replication).
    pub durable: usize,
    /// Queued or running now, whatever their state.
    pub active: usize,
}

impl PipelineCounts {
    /// Shards not durable through this pipeline yet.
    pub fn outstanding(&self) -> usize {
        self.pending
            .saturating_add(self.retrying)
            .saturating_add(self.needs_attention)
    }
}

#[derive(Debug)]
struct Entry {
    state: CopyState,
    /// Failed attempts in a row.
    failures: u32,
    queued: bool,
    running: bool,
    /// Queued again while running: run once more when done.
    again: bool,
    /// When its retry is due, if it waits for one.
    retry_at: Option<Instant>,
}

impl Entry {
    fn new() -> Self {
        Self {
            state: CopyState::Pending,
            failures: 0,
            queued: false,
            running: false,
            again: false,
            retry_at: None,
        }
    }
}

#[derive(Debug, Default)]
struct Entries {
    by_key: HashMap<ShardKey, Entry>,
    ready: VecDeque<ShardKey>,
    /// Retries by due time; an item whose entry no longer waits for that
    /// time is skipped when it comes up.
    delayed: BinaryHeap<Reverse<(Instant, ShardKey)>>,
}

impl Entries {
    /// Puts `key` on the ready queue unless it is there or running.
    fn make_ready(&mut self, key: &ShardKey) -> bool {
        let Some(entry) = self.by_key.get_mut(key) else {
            return false;
        };
        entry.retry_at = None;
        if entry.running {
            entry.again = true;
            false
        } else if entry.queued {
            false
        } else {
            entry.queued = true;
            self.ready.push_back(key.clone());
            true
        }
    }

    /// Moves the retries due by `now` to the ready queue; returns when the
    /// next one is due.
    fn promote_due(&mut self, now: Instant) -> Option<Instant> {
        while let Some(Reverse((due, key))) = self.delayed.peek().cloned() {
            let waiting = self
                .by_key
                .get(&key)
                .is_some_and(|e| e.retry_at == Some(due));
            if !waiting {
                self.delayed.pop();
                continue;
            }
            if due > now {
                return Some(due);
            }
            self.delayed.pop();
            self.make_ready(&key);
        }
        None
    }

    fn counts(&self) -> PipelineCounts {
        let mut counts = PipelineCounts::default();
        for entry in self.by_key.values() {
            match entry.state {
                CopyState::Absent | CopyState::Pending => {
                    counts.pending = counts.pending.saturating_add(1)
                }
                CopyState::Failed(_) => counts.retrying = counts.retrying.saturating_add(1),
                CopyState::NeedsAttention(_) => {
                    counts.needs_attention = counts.needs_attention.saturating_add(1)
                }
                CopyState::Durable => counts.durable = counts.durable.saturating_add(1),
            }
            if entry.queued || entry.running {
                counts.active = counts.active.saturating_add(1);
            }
        }
        counts
    }
}

/// Reports a pipeline's counts into the metrics it owns besides the common
/// ones.
pub(super) type ReportCounts = fn(&Metrics, &PipelineCounts);

/// One background copy pipeline (see the module documentation).
pub(super) struct Pipeline {
    /// Its name in logs, metrics and status: `write-back`, `upload`,
    /// `replication`.
    name: &'static str,
    policy: PipelinePolicy,
    journal: Option<Box<dyn Journal>>,
    entries: Mutex<Entries>,
    wake: Notify,
    metrics: std::sync::Arc<Metrics>,
    report: ReportCounts,
}

impl Pipeline {
    pub(super) fn new(
        name: &'static str,
        policy: PipelinePolicy,
        journal: Option<Box<dyn Journal>>,
        metrics: std::sync::Arc<Metrics>,
        report: ReportCounts,
    ) -> Self {
        Self {
            name,
            policy,
            journal,
            entries: Mutex::new(Entries::default()),
            wake: Notify::new(),
            metrics,
            report,
        }
    }

    /// Its name.
    pub(super) fn name(&self) -> &'static str {
        self.name
    }

    /// Records `key` in the journal without queueing it yet (so that a crash
    /// before it is queued still resumes it).
    pub(super) fn journal(&self, key: &ShardKey) {
        if let Some(journal) = &self.journal
            && let Err(e) = journal.add(key)
        {
            tracing::warn!(pipeline = self.name, shard = %key, error = %e, "cannot journal the shard; its copy will not resume after a restart");
        }
    }

    /// Journals and queues `key`.
    pub(super) fn queue(&self, key: ShardKey) {
        self.journal(&key);
        self.enqueue(key);
    }

    /// Queues `key` (journaled already, or without a journal) to run now. A
    /// shard that waits for a retry runs now instead; its state and its
    /// failures are kept until an attempt ends.
    pub(super) fn enqueue(&self, key: ShardKey) {
        let woke = {
            let mut entries = lock(&self.entries);
            entries.by_key.entry(key.clone()).or_insert_with(Entry::new);
            entries.make_ready(&key)
        };
        if woke {
            self.wake.notify_one();
        }
        self.report_counts();
    }

    /// Queues every shard the journal holds: what a previous run left.
    pub(super) fn resume_from_journal(&self) {
        let Some(journal) = &self.journal else {
            return;
        };
        for key in journal.pending() {
            tracing::info!(pipeline = self.name, shard = %key, "resuming {}", self.name);
            self.enqueue(key);
        }
    }

    /// Where `key` stands, if the pipeline follows it.
    pub(super) fn state(&self, key: &ShardKey) -> Option<CopyState> {
        lock(&self.entries).by_key.get(key).map(|e| e.state.clone())
    }

    /// Whether the pipeline follows `key` and it is neither queued nor
    /// running.
    pub(super) fn is_idle(&self, key: &ShardKey) -> bool {
        lock(&self.entries)
            .by_key
            .get(key)
            .is_some_and(|e| !e.queued && !e.running)
    }

    /// Every shard it follows with its state.
    pub(super) fn states(&self) -> Vec<(ShardKey, CopyState)> {
        lock(&self.entries)
            .by_key
            .iter()
            .map(|(k, e)| (k.clone(), e.state.clone()))
            .collect()
    }

    /// Sets the state of a shard it follows from outside an attempt (a
    /// holder check found a replica gone). False when it does not follow it.
    pub(super) fn set_state(&self, key: &ShardKey, state: CopyState) -> bool {
        let found = match lock(&self.entries).by_key.get_mut(key) {
            Some(entry) => {
                entry.state = state;
                true
            }
            None => false,
        };
        self.report_counts();
        found
    }

    /// Stops following `key` (its step was deleted); the journal forgets it.
    pub(super) fn forget(&self, key: &ShardKey) {
        lock(&self.entries).by_key.remove(key);
        if let Some(journal) = &self.journal {
            journal.remove(key);
        }
        self.report_counts();
    }

    /// Shards by state.
    pub(super) fn counts(&self) -> PipelineCounts {
        lock(&self.entries).counts()
    }

    /// Runs the pipeline until `cancel` fires: takes shards as they become
    /// ready, up to `concurrency` at once, runs `work` on each, records how
    /// it ended, then runs `after` (what waiters and retention must see once
    /// the state is recorded). Work in flight at cancellation ends as
    /// [`Attempt::Interrupted`].
    pub(super) async fn run<W, WFut, A, AFut>(
        &self,
        concurrency: usize,
        cancel: &CancellationToken,
        work: W,
        after: A,
    ) where
        W: Fn(ShardKey) -> WFut,
        WFut: Future<Output = Attempt>,
        A: Fn(ShardKey) -> AFut,
        AFut: Future<Output = ()>,
    {
        let keys = futures::stream::unfold((), |()| async move {
            self.next(cancel).await.map(|key| (key, ()))
        });
        keys.for_each_concurrent(concurrency.max(1), |key| async {
            let attempt = tokio::select! {
                () = cancel.cancelled() => Attempt::Interrupted,
                attempt = work(key.clone()) => attempt,
            };
            self.finish(&key, attempt);
            if !cancel.is_cancelled() {
                after(key).await;
            }
        })
        .await;
    }

    /// The next ready shard, marked running; `None` once `cancel` fires.
    async fn next(&self, cancel: &CancellationToken) -> Option<ShardKey> {
        loop {
            let due = {
                let mut entries = lock(&self.entries);
                let due = entries.promote_due(Instant::now());
                if let Some(key) = entries.ready.pop_front() {
                    if let Some(entry) = entries.by_key.get_mut(&key) {
                        entry.queued = false;
                        entry.running = true;
                        return Some(key);
                    }
                    continue;
                }
                due
            };
            let until_due = async {
                match due {
                    Some(due) => tokio::time::sleep_until(due).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = cancel.cancelled() => return None,
                () = self.wake.notified() => {}
                () = until_due => {}
            }
        }
    }

    /// Records how an attempt at `key` ended and schedules what follows.
    fn finish(&self, key: &ShardKey, attempt: Attempt) {
        let forget = matches!(attempt, Attempt::Done | Attempt::Dropped)
            || matches!(
                attempt,
                Attempt::Failed {
                    permanent: true,
                    ..
                }
            );
        if forget && let Some(journal) = &self.journal {
            journal.remove(key);
        }
        let woke = {
            let mut entries = lock(&self.entries);
            let Some(entry) = entries.by_key.get_mut(key) else {
                return;
            };
            entry.running = false;
            let again = std::mem::take(&mut entry.again);
            match attempt {
                Attempt::Done | Attempt::Dropped if !again => {
                    entries.by_key.remove(key);
                }
                Attempt::Done | Attempt::Dropped => entry.state = CopyState::Pending,
                Attempt::Durable => {
                    entry.state = CopyState::Durable;
                    entry.failures = 0;
                }
                Attempt::Failed { error, permanent } => {
                    entry.failures = entry.failures.saturating_add(1);
                    let failures = entry.failures;
                    let retry_in = if permanent {
                        None
                    } else {
                        self.policy.retry.delay_after(failures)
                    };
                    match retry_in {
                        Some(wait) => {
                            tracing::warn!(pipeline = self.name, shard = %key, attempt = failures, retry_in_s = wait.as_secs_f64(), %error, "attempt failed, retrying");
                            entry.state = CopyState::Failed(format!(
                                "attempt {failures} failed, retrying: {error}"
                            ));
                            self.schedule(&mut entries, key, wait);
                        }
                        None => {
                            let first = !matches!(entry.state, CopyState::NeedsAttention(_));
                            let why = if permanent {
                                format!("needs attention: {error}")
                            } else {
                                format!("needs attention after {failures} failed attempts: {error}")
                            };
                            if first {
                                tracing::error!(pipeline = self.name, shard = %key, recheck_s = self.policy.recheck.map(|d| d.as_secs()), "{why}");
                            } else {
                                tracing::warn!(pipeline = self.name, shard = %key, attempt = failures, %error, "recheck failed; the shard still needs attention");
                            }
                            entry.state = CopyState::NeedsAttention(why);
                            if let Some(recheck) = self.policy.recheck.filter(|_| !permanent) {
                                self.schedule(&mut entries, key, recheck);
                            }
                        }
                    }
                    self.metrics
                        .pipeline_failures
                        .with_label_values(&[self.name])
                        .inc();
                }
                Attempt::Interrupted => {}
            }
            again && entries.make_ready(key)
        };
        if woke {
            self.wake.notify_one();
        }
        self.report_counts();
    }

    /// Puts `key` on the timer, `wait` from now.
    fn schedule(&self, entries: &mut Entries, key: &ShardKey, wait: std::time::Duration) {
        // Waits come from the config, bounded to a day; a clock near its end
        // retries at once rather than overflow.
        let now = Instant::now();
        let due = now.checked_add(wait).unwrap_or(now);
        if let Some(entry) = entries.by_key.get_mut(key) {
            entry.retry_at = Some(due);
            entries.delayed.push(Reverse((due, key.clone())));
        }
        // The runner may be asleep until a later retry.
        self.wake.notify_one();
    }

    fn report_counts(&self) {
        let counts = self.counts();
        self.metrics
            .pipeline_needs_attention
            .with_label_values(&[self.name])
            .set(counts.needs_attention as i64);
        (self.report)(&self.metrics, &counts);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;

    use cairn_core::{JobName, Rank, Step, TenantName};

    use super::*;
    use crate::retry::RetryPolicy;

    fn key(rank: u32) -> ShardKey {
        ShardKey {
            tenant: TenantName::parse("tenant", "t".into()).expect("valid tenant"),
            job: JobName::parse("job", "job".into()).expect("valid job"),
            step: Step(1),
            rank: Rank(rank),
        }
    }

    /// 1 s doubling to 4 s, 3 attempts, then every 60 s.
    const POLICY: PipelinePolicy = PipelinePolicy {
        retry: RetryPolicy::new(Duration::from_secs(1), Duration::from_secs(4)).tries(3),
        recheck: Some(Duration::from_secs(60)),
    };

    #[derive(Default)]
    struct MemoryJournal(Mutex<Vec<ShardKey>>);

    impl Journal for Arc<MemoryJournal> {
        fn add(&self, key: &ShardKey) -> Result<()> {
            lock(&self.0).push(key.clone());
            Ok(())
        }
        fn remove(&self, key: &ShardKey) {
            lock(&self.0).retain(|k| k != key);
        }
        fn pending(&self) -> Vec<ShardKey> {
            lock(&self.0).clone()
        }
    }

    fn pipeline(journal: Option<Arc<MemoryJournal>>) -> Arc<Pipeline> {
        Arc::new(Pipeline::new(
            "test",
            POLICY,
            journal.map(|j| Box::new(j) as Box<dyn Journal>),
            Arc::new(Metrics::new()),
            |_, _| {},
        ))
    }

    /// Each attempt's rank and when it started.
    type AttemptLog = Mutex<Vec<(u32, Duration)>>;

    /// Runs `pipeline` in the background with a worker that answers each
    /// attempt from `script` (by rank, in order; `Done` once it runs out)
    /// and records when each attempt started.
    fn start(
        pipeline: &Arc<Pipeline>,
        script: HashMap<u32, Vec<Attempt>>,
    ) -> (CancellationToken, Arc<AttemptLog>) {
        let cancel = CancellationToken::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(script));
        let started = Instant::now();
        let (p, c, l) = (Arc::clone(pipeline), cancel.clone(), Arc::clone(&log));
        tokio::spawn(async move {
            p.run(
                2,
                &c,
                |key| {
                    let (script, log) = (Arc::clone(&script), Arc::clone(&l));
                    async move {
                        lock(&log).push((key.rank.0, started.elapsed()));
                        let next = lock(&script)
                            .get_mut(&key.rank.0)
                            .filter(|answers| !answers.is_empty())
                            .map(|answers| answers.remove(0));
                        next.unwrap_or(Attempt::Done)
                    }
                },
                |_| async {},
            )
            .await;
        });
        (cancel, log)
    }

    fn failure() -> Attempt {
        Attempt::Failed {
            error: "bucket unreachable".into(),
            permanent: false,
        }
    }

    /// Lets the paused clock run `secs` seconds (and the runner catch up).
    async fn settle(secs: u64) {
        tokio::time::sleep(Duration::from_secs(secs).saturating_add(Duration::from_millis(10)))
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_then_need_attention_and_a_recheck_heals_them() {
        let p = pipeline(None);
        let (cancel, log) = start(
            &p,
            HashMap::from([(1, vec![failure(), failure(), failure(), failure()])]),
        );
        p.enqueue(key(1));
        settle(0).await;
        assert!(
            matches!(p.state(&key(1)), Some(CopyState::Failed(e)) if e.contains("attempt 1 failed, retrying: bucket unreachable"))
        );
        // Attempts at 0, 1 and 3 s (waits of 1 then 2 s); the third failure
        // spends the policy's tries.
        settle(10).await;
        let state = p.state(&key(1));
        assert!(
            matches!(&state, Some(CopyState::NeedsAttention(e)) if e == "needs attention after 3 failed attempts: bucket unreachable"),
            "{state:?}"
        );
        assert_eq!(p.counts().needs_attention, 1);
        assert_eq!(
            p.metrics
                .pipeline_needs_attention
                .with_label_values(&["test"])
                .get(),
            1
        );
        // Then one try a recheck later (still failing), and one more that
        // succeeds: the pipeline forgets the shard.
        settle(120).await;
        let times: Vec<u64> = lock(&log).iter().map(|(_, t)| t.as_secs()).collect();
        assert_eq!(times, [0, 1, 3, 63, 123]);
        assert_eq!(p.state(&key(1)), None);
        assert_eq!(p.counts(), PipelineCounts::default());
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_failure_needs_attention_at_once_and_leaves_the_journal() {
        let journal = Arc::new(MemoryJournal::default());
        let p = pipeline(Some(Arc::clone(&journal)));
        let (cancel, log) = start(
            &p,
            HashMap::from([(
                1,
                vec![Attempt::Failed {
                    error: "the bucket holds another manifest".into(),
                    permanent: true,
                }],
            )]),
        );
        p.queue(key(1));
        assert_eq!(journal.pending(), [key(1)]);
        settle(600).await;
        assert_eq!(lock(&log).len(), 1, "a permanent failure is not retried");
        assert!(
            matches!(p.state(&key(1)), Some(CopyState::NeedsAttention(e)) if e == "needs attention: the bucket holds another manifest")
        );
        assert!(journal.pending().is_empty());
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_shard_is_queued_once_and_run_again_when_queued_while_running() {
        let p = pipeline(None);
        // Rank 1 is durable and kept; queueing it again re-runs it.
        let (cancel, log) = start(&p, HashMap::from([(1, vec![Attempt::Durable])]));
        for _ in 0..5 {
            p.enqueue(key(1));
        }
        settle(1).await;
        assert_eq!(
            lock(&log).len(),
            1,
            "queued five times while waiting: one run"
        );
        assert_eq!(p.state(&key(1)), Some(CopyState::Durable));
        assert!(p.is_idle(&key(1)));
        p.enqueue(key(1));
        settle(1).await;
        assert_eq!(lock(&log).len(), 2);
        assert_eq!(p.state(&key(1)), None, "the second run answered Done");
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_shard_waiting_for_its_retry_does_not_hold_up_the_others() {
        let p = pipeline(None);
        let (cancel, log) = start(&p, HashMap::from([(1, vec![failure()])]));
        p.enqueue(key(1));
        settle(0).await;
        p.enqueue(key(2));
        p.enqueue(key(3));
        settle(0).await;
        let order: Vec<u32> = lock(&log).iter().map(|(rank, _)| *rank).collect();
        assert_eq!(order, [1, 2, 3], "ranks 2 and 3 ran while rank 1 waited");
        settle(2).await;
        assert_eq!(lock(&log).len(), 4);
        assert_eq!(p.counts(), PipelineCounts::default());
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn journaled_shards_resume_and_forgotten_ones_leave_the_journal() {
        let journal = Arc::new(MemoryJournal::default());
        journal.add(&key(1)).expect("journaled");
        journal.add(&key(2)).expect("journaled");
        let p = pipeline(Some(Arc::clone(&journal)));
        p.resume_from_journal();
        assert_eq!(p.counts().pending, 2);
        p.forget(&key(2));
        assert_eq!(journal.pending(), [key(1)]);
        let (cancel, log) = start(&p, HashMap::new());
        settle(1).await;
        assert_eq!(lock(&log).len(), 1);
        assert!(journal.pending().is_empty(), "done: the journal forgets it");
        cancel.cancel();
    }
}
