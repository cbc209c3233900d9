//! The node's background tasks, tracked so that shutdown can wait for them.
//!
//! Every long-running loop (write-back, upload, replication, holder checks,
//! scrubbing, ingest, session reaping, bucket GC) and every delayed requeue
//! is spawned here under a name. They all watch the node's cancellation
//! token; at shutdown [`Background::drain`] waits for them up to a deadline
//! and names those still running, so an operator sees what a stop cut short
//! (the upload journal and the replication queue at start pick it up again).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::lock;

/// Spawns and tracks the node's background tasks.
#[derive(Debug, Default)]
pub(super) struct Background {
    tracker: TaskTracker,
    /// Tasks running now, by name.
    running: Arc<Mutex<BTreeMap<&'static str, usize>>>,
}

/// Counts a task as running until it ends, however it ends.
struct Running {
    name: &'static str,
    running: Arc<Mutex<BTreeMap<&'static str, usize>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut running = lock(&self.running);
        if let Some(n) = running.get_mut(self.name) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                running.remove(self.name);
            }
        }
    }
}

impl Background {
    /// Runs `task` in the background under `name`.
    pub(super) fn spawn(
        &self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        {
            let mut running = lock(&self.running);
            let n = running.entry(name).or_insert(0);
            *n = n.saturating_add(1);
        }
        let guard = Running {
            name,
            running: Arc::clone(&self.running),
        };
        self.tracker.spawn(async move {
            let _guard = guard;
            task.await;
        });
    }

    /// Waits up to `deadline` for every task to end (they are told to by
    /// the node's cancellation token, not here) and returns those still
    /// running then, by name, with how many of each. New tasks may still be
    /// spawned meanwhile (a requeue racing the stop); they are waited for
    /// too.
    pub(super) async fn drain(&self, deadline: Duration) -> BTreeMap<&'static str, usize> {
        self.tracker.close();
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
        {
            return BTreeMap::new();
        }
        lock(&self.running).clone()
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::*;

    #[tokio::test]
    async fn drain_waits_for_cancelled_tasks_and_names_those_that_do_not_stop() {
        let background = Background::default();
        let cancel = CancellationToken::new();
        for _ in 0..3 {
            let cancel = cancel.clone();
            background.spawn("obedient", async move { cancel.cancelled().await });
        }
        background.spawn("stubborn", async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        assert_eq!(lock(&background.running).get("obedient"), Some(&3));
        cancel.cancel();
        let left = background.drain(Duration::from_millis(300)).await;
        assert_eq!(left, BTreeMap::from([("stubborn", 1)]));

        let background = Background::default();
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        background.spawn("obedient", async move { stop.cancelled().await });
        cancel.cancel();
        assert!(background.drain(Duration::from_secs(10)).await.is_empty());
    }
}
