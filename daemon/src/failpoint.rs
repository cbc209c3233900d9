//! Named failpoints for the crash tests and `./scripts/torture`.
//!
//! Built on the `fail` crate, and only into builds with the `failpoints`
//! cargo feature of `cairn-daemon` (the tests turn it on; release builds
//! leave it off). With the feature, `FAILPOINTS="commit.after_hash=return"`
//! in cairnd's environment makes the process kill itself with SIGKILL when it
//! reaches that point, exactly as `kill -9` would; `sleep(MS)` instead delays
//! it there (blocking the thread, as a slow disk would), and `N*off->return`
//! lets it pass N times first. With no `FAILPOINTS` set a crash point costs
//! one lookup in an empty registry.
//!
//! Without the feature every function here compiles to nothing: a crash
//! point is an empty inline function, a fault point is always off, and
//! [`setup`] never reads `FAILPOINTS`, so a stray variable in a production
//! pod can neither kill cairnd nor fail its bucket requests.
//!
//! The names are listed in `docs/semantics.md` together with what a crash at
//! each point leaves behind; `./scripts/torture` kills cairnd at every one
//! of them (`docs/reliability.md`).

/// Whether this build honours `FAILPOINTS` (the `failpoints` feature).
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// Kills the process with SIGKILL if the failpoint `name` is enabled.
#[cfg(feature = "failpoints")]
pub fn crash_point(name: &'static str) {
    if fail::eval(name, |_| ()).is_some() {
        tracing::error!(failpoint = name, "failpoint hit, killing the process");
        kill_self();
    }
}

/// Without the `failpoints` feature: nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn crash_point(_name: &'static str) {}

/// Whether the fault-injecting failpoint `name` fires now (for faults that
/// are not crashes, such as a failed bucket request). A `sleep(MS)` action
/// delays the caller and returns `false`. Always `false` without the
/// `failpoints` feature.
#[cfg(feature = "failpoints")]
pub fn fault_point(name: &'static str) -> bool {
    fail::eval(name, |_| ()).is_some()
}

/// Without the `failpoints` feature: never fires.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn fault_point(_name: &'static str) -> bool {
    false
}

/// The failpoints configured from `FAILPOINTS`, active while it lives.
#[must_use = "the failpoints are cleared when the scenario is dropped"]
pub struct Scenario {
    #[cfg(feature = "failpoints")]
    _scenario: fail::FailScenario<'static>,
}

/// Reads `FAILPOINTS` from the environment (panics on a malformed value, as
/// the `fail` crate does). Without the `failpoints` feature the variable is
/// never read, and nothing is logged.
pub fn setup() -> Scenario {
    Scenario {
        #[cfg(feature = "failpoints")]
        _scenario: fail::FailScenario::setup(),
    }
}

#[cfg(feature = "failpoints")]
#[allow(unsafe_code)]
fn kill_self() {
    // SAFETY: kill(2) on our own pid has no memory-safety preconditions; the
    // process dies before the call returns.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fault point follows the registry with the feature, and would
    /// ignore it without. (`cargo test` always builds with the feature,
    /// through the package's dev-dependency on itself; `./scripts/test`
    /// checks a real cairnd built without it.)
    #[test]
    fn fault_points_fire_only_with_the_feature() {
        let name = "failpoint.unit_test";
        fail::cfg(name, "return").expect("configure the failpoint");
        assert_eq!(fault_point(name), ENABLED);
        fail::remove(name);
        assert!(!fault_point(name));
    }

    /// A crash point that is configured to `sleep` delays and returns with
    /// the feature, and costs nothing without it; either way the process is
    /// still here.
    #[test]
    fn a_sleeping_crash_point_returns() {
        let name = "failpoint.unit_test_sleep";
        fail::cfg(name, "sleep(1)").expect("configure the failpoint");
        crash_point(name);
        fail::remove(name);
    }
}
