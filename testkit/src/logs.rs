//! The log of a process a failing test started: kept and its tail printed,
//! because a failure without the log cannot be diagnosed, and the process's
//! directory (with the log in it) is removed when the test unwinds.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

/// Lines of a kept log printed with the test's output.
const TAIL_LINES: usize = 40;

/// When this thread is panicking (a failing test unwinding), copies `log`
/// next to the temp dirs as `<what>-failed-<pid>-<n>.log` and prints its
/// path and last lines to stderr. Does nothing otherwise.
pub fn keep_if_failing(what: &str, log: &Path) {
    static KEPT: AtomicU32 = AtomicU32::new(0);
    if !std::thread::panicking() {
        return;
    }
    let kept = std::env::temp_dir().join(format!(
        "{what}-failed-{}-{}.log",
        std::process::id(),
        KEPT.fetch_add(1, Ordering::Relaxed)
    ));
    if std::fs::copy(log, &kept).is_err() {
        return;
    }
    let text = std::fs::read_to_string(&kept).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(TAIL_LINES).collect();
    eprintln!(
        "--- {what} log kept at {} (last {} lines) ---",
        kept.display(),
        tail.len()
    );
    for line in tail.iter().rev() {
        eprintln!("{line}");
    }
}
