//! A real `cairnd` beside the plugin: it serves each published volume's
//! socket (publish binds the volume through it) and restores what prefill
//! asks for.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_proto::v1 as cpb;
use cairn_proto::v1::admin_client::AdminClient;
use cairn_proto::v1::checkpoint_client::CheckpointClient;
use tonic::transport::Channel;

/// How often the daemon's ingest rescans volumes.
pub const RESCAN_SECS: u64 = 1;
/// The tenant of the volumes the tests publish (their pods' namespace).
pub const TENANT: &str = "ml";

/// `CAIRND_BIN`, else `cairnd` in the target directory holding this test.
pub fn cairnd_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("CAIRND_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/ingest-<hash> -> target/<profile>/cairnd
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .join("cairnd");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p cairn-daemon` (or set CAIRND_BIN)",
        bin.display()
    );
    bin
}

/// A `cairnd` whose memory tier is the plugin's tmpfs directory, so the
/// plugin's volumes (`<memory_dir>/volumes`) are inside it.
pub struct Daemon {
    pub memory_dir: PathBuf,
    pub disk_dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Starts cairnd on `memory_dir` (whose `volumes/` is the plugin's),
    /// with its socket and disk tier in `work`.
    pub async fn start(memory_dir: &Path, work: &Path) -> Daemon {
        let config = work.join("cairnd.toml");
        std::fs::write(&config, format!("[ingest]\nrescan_secs = {RESCAN_SECS}\n"))
            .expect("daemon config");
        let mut daemon = Daemon {
            memory_dir: memory_dir.to_path_buf(),
            disk_dir: work.join("disk"),
            socket: work.join("cairn.sock"),
            config,
            log: work.join("cairnd.log"),
            child: None,
        };
        daemon.spawn().await;
        daemon
    }

    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(cairnd_binary())
            .arg("--config")
            .arg(&self.config)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--memory-dir")
            .arg(&self.memory_dir)
            .arg("--disk-dir")
            .arg(&self.disk_dir)
            .arg("--metrics-addr")
            .arg("off")
            .arg("--chunk-size")
            .arg("65536")
            .env("CAIRN_LOG", "info")
            .env_remove("FAILPOINTS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn cairnd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "cairnd exited during start ({status}); log:\n{}",
                    self.log_text()
                );
            }
            if let Ok(channel) = cairn_csi::client::connect(&self.socket).await
                && AdminClient::new(channel)
                    .status(cpb::StatusRequest {})
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cairnd did not start; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, and wait for the exit. Async, so this test's client
    /// connections keep being driven (they answer the daemon's graceful
    /// GOAWAY) while it drains.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("cairnd did not stop on SIGTERM; log:\n{}", self.log_text());
    }

    pub async fn checkpoint(&self) -> CheckpointClient<Channel> {
        CheckpointClient::new(
            cairn_csi::client::connect(&self.socket)
                .await
                .expect("connect to cairnd"),
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn count_in_log(&self, needle: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The steps the daemon lists for `job`.
    pub async fn steps(&self, job: &str) -> BTreeSet<u64> {
        let response = self
            .checkpoint()
            .await
            .list_steps(cpb::ListStepsRequest {
                tenant: TENANT.into(),
                job: job.into(),
                wait_for_all_tiers: true,
            })
            .await
            .expect("ListSteps")
            .into_inner();
        response
            .jobs
            .iter()
            .flat_map(|j| j.steps.iter().map(|s| s.step))
            .collect()
    }

    /// Polls ListSteps until `job` lists at least `want`.
    pub async fn wait_for_steps(&self, job: &str, want: &[u64]) {
        let want: BTreeSet<u64> = want.iter().copied().collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let have = self.steps(job).await;
            if want.is_subset(&have) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{job}: waited for steps {want:?}, have {have:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_durable_on_disk(&self, job: &str, step: u64) {
        self.checkpoint()
            .await
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
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
