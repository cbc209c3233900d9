//! What the daemon's integration tests share: the `testkit` harness (real
//! `cairnd` processes on Unix sockets in temp dirs, the requests every test
//! makes, the test CA, SeaweedFS, waits), started with the binaries Cargo
//! built for these tests, with the `failpoints` feature; and the multi-host
//! pieces only these tests use: network namespaces ([`netns`]) and the
//! fault-injecting proxy ([`faultproxy`]).

#![allow(dead_code, missing_docs, unused_imports)]

pub mod faultproxy;
pub mod netns;

pub use testkit::{
    Daemon, DaemonOptions, TEST_CHUNK, begin_request, bytes, files_under, in_memory, job_steps,
    metric, restore, save, save_in_volume, selector, shard, source_bytes, wait_disk, wait_durable,
    wait_until, write_staged,
};

pub const CAIRND: &str = env!("CARGO_BIN_EXE_cairnd");
pub const CAIRN: &str = env!("CARGO_BIN_EXE_cairn");

/// testkit's defaults, with this package's `cairnd` and `cairn`.
pub fn daemon_options() -> DaemonOptions {
    DaemonOptions::new().binaries(CAIRND, CAIRN)
}

/// Starts a daemon with the test chunk size and `extra_args`.
pub async fn start_daemon(extra_args: &[&str]) -> Daemon {
    start_daemon_in(None, extra_args, &[]).await
}

/// [`start_daemon`] with environment variables (`FAILPOINTS`, say).
pub async fn start_daemon_with_env(extra_args: &[&str], env: &[(&str, &str)]) -> Daemon {
    start_daemon_in(None, extra_args, env).await
}

/// Starts a daemon inside the network namespace `netns` (see
/// [`netns::Network::namespace`]), or in the host's when `None`.
pub async fn start_daemon_in(
    netns: Option<&str>,
    extra_args: &[&str],
    env: &[(&str, &str)],
) -> Daemon {
    let mut options = daemon_options().args(extra_args).env(env);
    if let Some(ns) = netns {
        options = options.launcher(netns::exec_prefix(ns));
    }
    options
        .start()
        .await
        .unwrap_or_else(|e| panic!("start cairnd: {e:#}"))
}
