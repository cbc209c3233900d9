//! A real `cairnd` beside the plugin (testkit's harness): it serves each
//! published volume's socket (publish binds the volume through it) and
//! restores what prefill asks for. Its memory tier is the plugin's tmpfs
//! directory, so the plugin's volumes (`<memory_dir>/volumes`) are inside
//! it. `cairnd` is `target/<profile>/cairnd` beside these tests (`cargo test
//! --workspace` builds it), or `CAIRND_BIN`.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use cairn_proto::v1 as cpb;
use testkit::{Daemon, DaemonOptions, tenant_job_steps, wait_until};

/// How often the daemon's ingest rescans volumes.
pub const RESCAN_SECS: u64 = 1;
/// The tenant of the volumes the tests publish (their pods' namespace).
pub const TENANT: &str = "ml";

/// Starts cairnd on `memory_dir` (whose `volumes/` is the plugin's, left in
/// place when the daemon goes), with its socket, disk tier, log and config
/// in `work`.
pub async fn start(memory_dir: &Path, work: &Path) -> Daemon {
    std::fs::create_dir_all(work).expect("daemon dir");
    let config = work.join("cairnd.toml");
    std::fs::write(&config, format!("[ingest]\nrescan_secs = {RESCAN_SECS}\n"))
        .expect("daemon config");
    DaemonOptions::new()
        .work_dir(work)
        .memory_dir(memory_dir)
        .keep_memory_dir()
        // cairnd's default background scrub, as a node runs it.
        .scrub_disk(true)
        .args(["--config", config.to_str().expect("utf-8")])
        .start()
        .await
        .unwrap_or_else(|e| panic!("start cairnd: {e:#}"))
}

/// The steps the daemon lists for `job`.
pub async fn steps(daemon: &Daemon, job: &str) -> BTreeSet<u64> {
    let mut c = daemon.clients().await;
    tenant_job_steps(&mut c, TENANT, job)
        .await
        .iter()
        .map(|s| s.step)
        .collect()
}

/// Polls ListSteps until `job` lists at least `want`.
pub async fn wait_for_steps(daemon: &Daemon, job: &str, want: &[u64]) {
    let want: BTreeSet<u64> = want.iter().copied().collect();
    wait_until(
        Duration::from_secs(60),
        &format!("{job} lists steps {want:?}"),
        async || want.is_subset(&steps(daemon, job).await),
    )
    .await;
}

/// Waits until `job`'s `step` is durable on the daemon's disk.
pub async fn wait_durable_on_disk(daemon: &Daemon, job: &str, step: u64) {
    daemon
        .clients()
        .await
        .checkpoint
        .wait_durable(cpb::WaitDurableRequest {
            tenant: TENANT.into(),
            job: job.into(),
            step,
            rank: None,
            tier: cpb::Tier::Disk as i32,
            timeout_ms: 60_000,
        })
        .await
        .unwrap_or_else(|e| panic!("{job} step {step} durable on disk: {e}"));
}
