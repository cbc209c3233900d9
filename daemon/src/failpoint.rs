//! Named crash points for the crash tests.
//!
//! Built on the `fail` crate: `FAILPOINTS="commit.after_hash=return"` in
//! cairnd's environment makes the process kill itself with SIGKILL when it
//! reaches that point, exactly as `kill -9` would; `sleep(MS)` instead
//! delays it there (blocking the thread, as a slow disk would). With no
//! `FAILPOINTS` set a crash point costs one lookup in an empty registry.
//!
//! The names are listed in `docs/semantics.md` together with what a crash at
//! each point leaves behind.

/// Kills the process with SIGKILL if the failpoint `name` is enabled.
pub fn crash_point(name: &'static str) {
    if fail::eval(name, |_| ()).is_some() {
        tracing::error!(failpoint = name, "failpoint hit, killing the process");
        kill_self();
    }
}

#[allow(unsafe_code)]
fn kill_self() {
    // SAFETY: kill(2) on our own pid has no memory-safety preconditions; the
    // process dies before the call returns.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}
