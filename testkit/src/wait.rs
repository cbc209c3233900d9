//! Waiting on a condition instead of sleeping a fixed time: a fixed sleep is
//! either too short on a loaded machine (a flaky test) or longer than needed
//! everywhere else (a slow one). Each wait polls its condition and fails the
//! test, naming what it waited for, once its deadline passes.

use std::time::{Duration, Instant};

/// How often a condition is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `condition` until it holds; panics after `timeout`, saying the
/// test timed out waiting until `what`.
pub async fn wait_until(timeout: Duration, what: &str, condition: impl AsyncFnMut() -> bool) {
    assert!(
        poll_until(timeout, condition).await,
        "timed out after {timeout:?} waiting until {what}"
    );
}

/// Polls `condition` until it holds or `timeout` passes; returns whether
/// it held.
pub async fn poll_until(timeout: Duration, mut condition: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// [`poll_until`] for code outside an async runtime.
pub fn poll_until_blocking(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}
