//! Test harness: real `cairnd` processes on Unix sockets in temp dirs, with
//! the memory tier on the real tmpfs (`/dev/shm`) and the disk tier in a
//! real directory.

#![allow(dead_code, missing_docs)]

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_daemon::client::Clients;
use cairn_proto::v1 as pb;

pub mod faultproxy;
pub mod netns;
pub mod pki;

pub const CAIRND: &str = env!("CARGO_BIN_EXE_cairnd");
pub const CAIRN: &str = env!("CARGO_BIN_EXE_cairn");

/// Small chunks keep test shards small while still spanning many chunks.
pub const TEST_CHUNK: u64 = 64 * 1024;

/// A running (or stopped) daemon with its own directories.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub memory_dir: PathBuf,
    pub disk_dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The network namespace cairnd runs in (`ip netns exec`); `None` for
    /// the host's. The Unix socket is reachable from the host either way.
    pub netns: Option<String>,
    child: Option<Child>,
}

impl Daemon {
    /// Starts a daemon with the test chunk size and `extra_args`.
    pub async fn start(extra_args: &[&str]) -> Daemon {
        Self::start_with_env(extra_args, &[]).await
    }

    pub async fn start_with_env(extra_args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Self::start_in(None, extra_args, env).await
    }

    /// Starts a daemon inside the network namespace `netns` (see
    /// [`netns::Network::namespace`]), or in the host's when `None`.
    pub async fn start_in(
        netns: Option<&str>,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let memory_dir = PathBuf::from(format!("/dev/shm/cairn-test-{}", uuid::Uuid::new_v4()));
        let mut daemon = Daemon {
            disk_dir: dir.path().join("disk"),
            socket: dir.path().join("cairn.sock"),
            log: dir.path().join("cairnd.log"),
            memory_dir,
            dir,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            netns: netns.map(str::to_string),
            child: None,
        };
        daemon.spawn();
        daemon.wait_ready().await;
        daemon
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = match &self.netns {
            Some(ns) => netns::command_in_namespace(ns, CAIRND),
            None => Command::new(CAIRND),
        };
        if !self.extra_args.iter().any(|a| a == "--chunk-size") {
            cmd.arg("--chunk-size").arg(TEST_CHUNK.to_string());
        }
        // Background scrubbing of the disk tier is off unless a test turns
        // it on: tests that damage disk chunks on purpose want the restore
        // or the verify they run, not a scrub, to find them.
        if !self
            .extra_args
            .iter()
            .any(|a| a == "--disk-scrub-bytes-per-sec")
        {
            cmd.arg("--disk-scrub-bytes-per-sec").arg("0");
        }
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--memory-dir")
            .arg(&self.memory_dir)
            .arg("--disk-dir")
            .arg(&self.disk_dir)
            .arg("--metrics-addr")
            .arg("127.0.0.1:0")
            .args(&self.extra_args)
            .env("CAIRN_LOG", "info")
            .env_remove("FAILPOINTS")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn cairnd"));
    }

    /// Waits until Status answers (or the process dies).
    pub async fn wait_ready(&mut self) {
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
            if let Ok(mut c) = Clients::connect(self.socket.to_str().expect("utf-8")).await
                && c.admin.status(pb::StatusRequest {}).await.is_ok()
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

    pub async fn clients(&self) -> Clients {
        Clients::connect(self.socket.to_str().expect("utf-8"))
            .await
            .expect("connect to cairnd")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, like a node's OOM killer or `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit by itself (e.g. a failpoint killed it).
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY-free: use the kill command to send SIGTERM.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }

    /// Starts the process again on the same directories, with `env`.
    pub async fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        self.kill();
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn();
        self.wait_ready().await;
    }

    pub async fn restart(&mut self) {
        self.restart_with_env(&[]).await;
    }

    /// Starts the process (after kill/stop) without waiting for readiness.
    pub fn spawn_only(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn();
    }

    pub async fn metrics(&self) -> String {
        let mut c = self.clients().await;
        let addr = c
            .admin
            .status(pb::StatusRequest {})
            .await
            .expect("status")
            .into_inner()
            .metrics_addr;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect to metrics");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .expect("send request");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .expect("read metrics");
        assert!(
            response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
            "{response}"
        );
        response
    }

    /// Runs the `cairn` CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(CAIRN)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run cairn")
    }
}

impl Drop for Daemon {
    /// Kills the daemon and removes its directories. When the test is
    /// failing, the daemon's log is kept first (copied next to the temp
    /// dirs, its path and last lines printed with the test's output): a
    /// failure without the log cannot be diagnosed.
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let kept = std::env::temp_dir().join(format!(
                "cairnd-failed-{}-{}.log",
                std::process::id(),
                self.dir
                    .path()
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
            if std::fs::copy(&self.log, &kept).is_ok() {
                let text = self.log_text();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!(
                    "--- cairnd log kept at {} (last {} lines) ---",
                    kept.display(),
                    tail.len()
                );
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.memory_dir);
    }
}

/// Deterministic pseudo-random bytes (xorshift), distinct per seed.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn shard(job: &str, step: u64, rank: u32) -> pb::ShardRef {
    pb::ShardRef {
        tenant: String::new(),
        job: job.into(),
        step,
        rank,
    }
}

pub fn begin_request(shard: pb::ShardRef, files: &[(&str, &[u8])]) -> pb::BeginShardRequest {
    pb::BeginShardRequest {
        shard: Some(shard),
        files: files
            .iter()
            .map(|(name, data)| pb::FileSpec {
                name: name.to_string(),
                size: data.len() as u64,
                metadata: HashMap::from([("dtype".to_string(), "uint8".to_string())]),
            })
            .collect(),
        world_size: None,
        metadata: HashMap::new(),
        attempt: String::new(),
    }
}

/// Writes staged files the way a client does: pwrite into the pre-sized file.
pub fn write_staged(resp: &pb::BeginShardResponse, files: &[(&str, &[u8])]) {
    for (staged, (_, data)) in resp.files.iter().zip(files) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&staged.path)
            .expect("open staged");
        f.write_all_at(data, 0).expect("pwrite");
    }
}

/// The fast path: begin, write, commit.
pub async fn save(
    c: &mut Clients,
    shard: pb::ShardRef,
    files: &[(&str, &[u8])],
) -> Result<pb::ShardInfo, tonic::Status> {
    save_in_volume(c, shard, files, None).await
}

/// The fast path through a CSI volume's socket when `volume` (its `data/`)
/// is given: the staged files are then inside the volume and named relative
/// to it, as a pod sees them.
pub async fn save_in_volume(
    c: &mut Clients,
    shard: pb::ShardRef,
    files: &[(&str, &[u8])],
    volume: Option<&Path>,
) -> Result<pb::ShardInfo, tonic::Status> {
    let mut begin = c
        .checkpoint
        .begin_shard(begin_request(shard, files))
        .await?
        .into_inner();
    if let Some(volume) = volume {
        for staged in &mut begin.files {
            assert!(
                staged.path.starts_with(".cairn/sessions/"),
                "a volume's files are staged inside it: {}",
                staged.path
            );
            staged.path = volume.join(&staged.path).to_string_lossy().into_owned();
        }
    }
    write_staged(&begin, files);
    let commit = c
        .checkpoint
        .commit_shard(pb::CommitShardRequest {
            session_id: begin.session_id,
        })
        .await?
        .into_inner();
    Ok(commit.shard.expect("shard info"))
}

pub fn selector(job: &str, step: Option<u64>, rank: u32) -> pb::ShardSelector {
    pb::ShardSelector {
        tenant: String::new(),
        job: job.into(),
        step,
        rank,
    }
}

/// Restores and reads every file back, by name.
pub async fn restore(
    c: &mut Clients,
    job: &str,
    step: Option<u64>,
    rank: u32,
) -> Result<(pb::RestoreShardResponse, HashMap<String, Vec<u8>>), tonic::Status> {
    let resp = c
        .checkpoint
        .restore_shard(pb::RestoreShardRequest {
            shard: Some(selector(job, step, rank)),
            skip_verify: false,
        })
        .await?
        .into_inner();
    let files = resp
        .files
        .iter()
        .map(|f| {
            (
                f.name.clone(),
                std::fs::read(&f.path).expect("read restored file"),
            )
        })
        .collect();
    Ok((resp, files))
}

/// WaitDurable for every rank of a step on this daemon.
pub async fn wait_durable(
    c: &mut Clients,
    job: &str,
    step: u64,
    tier: pb::Tier,
    timeout_ms: u64,
) -> Result<(), tonic::Status> {
    c.checkpoint
        .wait_durable(pb::WaitDurableRequest {
            tenant: String::new(),
            job: job.into(),
            step,
            rank: None,
            tier: tier as i32,
            timeout_ms,
        })
        .await
        .map(drop)
}

pub async fn wait_disk(c: &mut Clients, job: &str, step: u64) {
    wait_durable(c, job, step, pb::Tier::Disk, 30_000)
        .await
        .expect("durable on disk");
}

/// The value of the sample `name{labels}` (or a bare `name`) in a
/// Prometheus scrape; 0 when absent.
pub fn metric(scrape: &str, name_and_labels: &str) -> f64 {
    scrape
        .lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub fn source_bytes(resp: &pb::RestoreShardResponse, tier: pb::Tier) -> u64 {
    resp.sources
        .iter()
        .filter(|s| s.tier == tier as i32)
        .map(|s| s.bytes)
        .sum()
}

/// Every regular file under `dir`.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// Whether the memory tier holds `job`'s `step` (the tenant the client's
/// socket acts for when it names none).
pub async fn in_memory(c: &mut Clients, job: &str, step: u64) -> bool {
    c.checkpoint
        .list_steps(pb::ListStepsRequest {
            tenant: String::new(),
            job: job.into(),
            wait_for_all_tiers: true,
        })
        .await
        .expect("ListSteps")
        .into_inner()
        .jobs
        .iter()
        .flat_map(|j| &j.steps)
        .filter(|s| s.step == step)
        .flat_map(|s| &s.shards)
        .flat_map(|shard| &shard.tiers)
        .any(|t| t.tier == pb::Tier::Memory as i32 && t.state == pb::ShardState::Durable as i32)
}
