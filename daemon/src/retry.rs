//! The one shape of retry in the daemon: a [`RetryPolicy`] (first delay,
//! doubling to a cap, optional jitter, optional bound on tries), on `backon`.
//!
//! Three uses, one policy type:
//! - a loop that retries in place: [`retry`] (a bucket request, a write-back,
//!   the abort of a failed multipart upload);
//! - a queue that puts a failed item back later: [`RetryPolicy::delay_after`]
//!   through a [`PipelinePolicy`] (write-back, uploads, replication, see
//!   `node::pipeline`);
//! - a long-running watcher that backs off while its source fails and starts
//!   over once it works: [`Backoff`] (membership sources).
//!
//! Every policy is a named constant beside the code that uses it, or for the
//! pipelines a `[pipelines.*]` section of the config file; their bounds are
//! in `docs/configuration.md`.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder, Retryable};

/// How to space the tries of one operation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Wait after the first failure.
    pub first_delay: Duration,
    /// Longest wait between two tries; each wait doubles up to it.
    pub max_delay: Duration,
    /// Most tries in all, the first included (`None`: no bound).
    pub max_tries: Option<u32>,
    /// Whether each wait is stretched by a random 0 to 100 %, so that
    /// nodes that failed together do not retry in step.
    pub jitter: bool,
}

impl RetryPolicy {
    /// Unbounded tries, `first_delay` doubling to `max_delay`, no jitter.
    pub const fn new(first_delay: Duration, max_delay: Duration) -> Self {
        Self {
            first_delay,
            max_delay,
            max_tries: None,
            jitter: false,
        }
    }

    /// The same policy with at most `tries` tries (at least one).
    pub const fn tries(self, tries: u32) -> Self {
        Self {
            max_tries: Some(if tries == 0 { 1 } else { tries }),
            ..self
        }
    }

    /// The same policy with jittered waits.
    pub const fn jittered(self) -> Self {
        Self {
            jitter: true,
            ..self
        }
    }

    fn builder(&self) -> ExponentialBuilder {
        let builder = ExponentialBuilder::new()
            .with_min_delay(self.first_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0);
        let builder = match self.max_tries {
            // backon counts retries, after the first try.
            Some(tries) => builder
                .with_max_times(usize::try_from(tries.saturating_sub(1)).unwrap_or(usize::MAX)),
            None => builder.without_max_times(),
        };
        if self.jitter {
            builder.with_jitter()
        } else {
            builder
        }
    }

    /// The waits between tries, in order; it ends when no try is left.
    pub fn delays(&self) -> impl Iterator<Item = Duration> + use<> {
        self.builder().build()
    }

    /// For a queue that puts a failed item back: the wait after its
    /// `failures`-th consecutive failure (1 for the first), or `None` when
    /// the policy allows no further try.
    pub fn delay_after(&self, failures: u32) -> Option<Duration> {
        // The waits stop growing at the cap within a few dozen doublings;
        // skipping further than that changes nothing but the time spent.
        let skip = failures.saturating_sub(1).min(64);
        if self.max_tries.is_some_and(|tries| failures >= tries) {
            return None;
        }
        let mut delays = self.builder().without_max_times().build();
        delays.nth(usize::try_from(skip).unwrap_or(usize::MAX))
    }
}

/// How a background pipeline (write-back, upload, replication) retries a
/// shard whose copy failed: `retry` spaces the attempts, and once its tries
/// are spent the shard needs attention and is tried only every `recheck`
/// (`None`: not again until the daemon restarts).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PipelinePolicy {
    /// Waits between attempts; `max_tries` is the number of attempts before
    /// the shard needs attention.
    pub retry: RetryPolicy,
    /// How often a shard that needs attention is tried again.
    pub recheck: Option<Duration>,
}

/// Runs `operation` until it succeeds, fails with an error `retryable`
/// refuses, or `policy` has no try left; `before_retry` sees each error
/// that is retried and the wait before the next try (for logs and metrics).
/// Returns the last error.
pub async fn retry<T, E, Op, Fut>(
    policy: &RetryPolicy,
    operation: Op,
    retryable: impl FnMut(&E) -> bool,
    before_retry: impl FnMut(&E, Duration),
) -> Result<T, E>
where
    Op: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    operation
        .retry(policy.builder())
        .sleep(tokio::time::sleep)
        .when(retryable)
        .notify(before_retry)
        .await
}

/// The waits of a long-running watcher: [`Backoff::next_delay`] after each
/// failure, [`Backoff::reset`] once its source works again.
#[derive(Debug)]
pub struct Backoff {
    policy: RetryPolicy,
    delays: ExponentialBackoff,
}

impl Backoff {
    /// A backoff following `policy`, never running out of tries.
    pub fn new(policy: RetryPolicy) -> Self {
        let policy = RetryPolicy {
            max_tries: None,
            ..policy
        };
        Self {
            delays: policy.builder().build(),
            policy,
        }
    }

    /// The wait before the next try, after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.policy.max_delay)
    }

    /// Forgets past failures: the next wait is the first again.
    pub fn reset(&mut self) {
        self.delays = self.policy.builder().build();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// Waits in whole milliseconds: backon doubles in `f32`, so 400 ms may
    /// come out as 400.000006 ms.
    fn millis(waits: impl IntoIterator<Item = Duration>) -> Vec<u64> {
        waits
            .into_iter()
            .map(|d| (d.as_secs_f64() * 1000.0).round() as u64)
            .collect()
    }

    #[test]
    fn delays_double_to_the_cap_and_stop_with_the_tries() {
        let policy = RetryPolicy::new(MS(100), MS(500)).tries(6);
        // Six tries: five waits.
        assert_eq!(millis(policy.delays()), [100, 200, 400, 500, 500]);
        assert_eq!(millis(policy.delay_after(1)), [100]);
        assert_eq!(millis(policy.delay_after(3)), [400]);
        assert_eq!(millis(policy.delay_after(5)), [500]);
        assert_eq!(
            policy.delay_after(6),
            None,
            "the sixth failure was the last try"
        );
        let endless = RetryPolicy::new(MS(100), MS(500));
        assert_eq!(millis(endless.delay_after(u32::MAX)), [500]);
        assert_eq!(RetryPolicy::new(MS(1), MS(1)).tries(0).delays().count(), 0);
    }

    #[test]
    fn jitter_stays_between_the_wait_and_twice_it() {
        let policy = RetryPolicy::new(MS(100), MS(400)).jittered();
        for (i, delay) in policy.delays().take(50).enumerate() {
            let base = 100 << i.min(2);
            let waited = millis([delay])[0];
            assert!(waited >= base && waited <= base * 2, "wait {i}: {delay:?}");
        }
    }

    #[test]
    fn backoff_starts_over_after_a_reset() {
        let mut backoff = Backoff::new(RetryPolicy::new(MS(10), MS(40)).tries(2));
        let waits = millis((0..5).map(|_| backoff.next_delay()));
        assert_eq!(waits, [10, 20, 40, 40, 40], "a watcher never runs out");
        backoff.reset();
        assert_eq!(backoff.next_delay(), MS(10));
    }

    #[tokio::test]
    async fn retry_stops_at_the_bound_or_at_an_error_it_may_not_retry() {
        let policy = RetryPolicy::new(MS(10), MS(20)).tries(4);
        let tries = AtomicU32::new(0);
        let mut waits = Vec::new();
        let result: Result<(), &str> = retry(
            &policy,
            || async {
                tries.fetch_add(1, Ordering::Relaxed);
                Err("transient")
            },
            |_| true,
            |_, wait| waits.push(wait),
        )
        .await;
        assert_eq!(result, Err("transient"));
        assert_eq!(tries.load(Ordering::Relaxed), 4);
        assert_eq!(millis(waits), [10, 20, 20]);

        let tries = AtomicU32::new(0);
        let result: Result<(), &str> = retry(
            &policy,
            || async {
                let n = tries.fetch_add(1, Ordering::Relaxed);
                Err(if n == 0 { "transient" } else { "permanent" })
            },
            |e| *e == "transient",
            |_, _| {},
        )
        .await;
        assert_eq!(result, Err("permanent"));
        assert_eq!(
            tries.load(Ordering::Relaxed),
            2,
            "a permanent error is not retried"
        );

        let tries = AtomicU32::new(0);
        let result = retry(
            &policy,
            || async {
                let n = tries.fetch_add(1, Ordering::Relaxed);
                if n < 2 { Err("transient") } else { Ok(n) }
            },
            |_| true,
            |_, _| {},
        )
        .await;
        assert_eq!(result, Ok(2));
    }
}
