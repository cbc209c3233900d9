//! A real `cairnd` process for a test or a benchmark: its Unix socket, disk
//! tier and log in a directory of its own, its memory tier on the real tmpfs
//! (`/dev/shm`). [`DaemonOptions`] says how it runs; [`Daemon`] starts,
//! stops, kills and restarts it on the same directories, and talks to it.
//!
//! Which `cairnd`: the caller names the binaries ([`DaemonOptions::binaries`];
//! the daemon's own tests pass Cargo's `CARGO_BIN_EXE_*`, which only exist
//! inside that package), or [`cairnd_binary`] finds it: `CAIRND_BIN`, else
//! the `cairnd` Cargo built into the target directory the running test or
//! benchmark lives in. `cairn`, the CLI, is taken from beside it.
//!
//! When a test fails, dropping its daemons keeps each one's log and prints
//! its last lines (see `logs`): the test's temp dir, and the log in it, are
//! removed as it unwinds.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cairn_daemon::client::Clients;
use cairn_proto::v1 as pb;

use crate::logs;
use crate::metrics::metric;
use crate::wait::{poll_until_blocking, wait_until};

/// Small chunks keep test shards small while still spanning many chunks.
pub const TEST_CHUNK: u64 = 64 * 1024;

/// How long a spawned daemon has to answer Status.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a daemon may take to exit on SIGTERM (it drains for up to 20 s
/// itself) before the harness kills it and fails the test.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long ingest may take for the walks [`Daemon::wait_ingest_walks`]
/// waits for.
const INGEST_WALKS_TIMEOUT: Duration = Duration::from_secs(60);

/// `CAIRND_BIN`, else the `cairnd` in the target directory of the running
/// executable: beside a benchmark (`target/<profile>/cairn-bench`), one
/// directory up from a test (`target/<profile>/deps/<test>-<hash>`). Cargo
/// builds it for the daemon's own tests; `cargo test --workspace` and
/// `cargo build` build it for the others.
pub fn cairnd_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("CAIRND_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe().context("the running executable's path")?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("cairnd"))
        .collect();
    candidates
        .iter()
        .find(|c| c.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "no cairnd at {candidates:?}: build it with `cargo build -p cairn-daemon` \
                 (or set CAIRND_BIN)"
            )
        })
}

/// How a [`Daemon`] runs. The defaults are the integration tests': a new
/// temp dir, a new memory tier under `/dev/shm`, [`TEST_CHUNK`]-sized
/// chunks, no background disk scrub, metrics on a free loopback port, and
/// an `info` log in the daemon's directory.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    cairnd: Option<PathBuf>,
    cairn: Option<PathBuf>,
    work_dir: Option<PathBuf>,
    memory_dir: Option<PathBuf>,
    keep_memory_dir: bool,
    args: Vec<String>,
    env: Vec<(String, String)>,
    launcher: Vec<OsString>,
    chunk_size: Option<u64>,
    scrub_disk: bool,
    metrics_addr: String,
    log_to_file: bool,
    log_filter: String,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl DaemonOptions {
    /// The integration tests' defaults (see [`DaemonOptions`]).
    pub fn new() -> Self {
        Self {
            cairnd: None,
            cairn: None,
            work_dir: None,
            memory_dir: None,
            keep_memory_dir: false,
            args: Vec::new(),
            env: Vec::new(),
            launcher: Vec::new(),
            chunk_size: Some(TEST_CHUNK),
            scrub_disk: false,
            metrics_addr: "127.0.0.1:0".into(),
            log_to_file: true,
            log_filter: "info".into(),
        }
    }

    /// The `cairnd` and `cairn` to run, instead of [`cairnd_binary`] and the
    /// `cairn` beside it.
    pub fn binaries(mut self, cairnd: impl Into<PathBuf>, cairn: impl Into<PathBuf>) -> Self {
        self.cairnd = Some(cairnd.into());
        self.cairn = Some(cairn.into());
        self
    }

    /// Puts the socket (`cairn.sock`), the disk tier (`disk/`) and the log
    /// (`cairnd.log`) in `dir`, made if missing, which the caller owns: it
    /// outlives the daemon. By default they go in a new temp dir, removed
    /// when the daemon is dropped.
    pub fn work_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.work_dir = Some(dir.into());
        self
    }

    /// The memory tier's directory (by default a new
    /// `/dev/shm/cairn-test-<uuid>`); removed when the daemon is dropped,
    /// unless [`keep_memory_dir`](Self::keep_memory_dir).
    pub fn memory_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.memory_dir = Some(dir.into());
        self
    }

    /// Leaves the memory tier's directory in place when the daemon is
    /// dropped: it belongs to someone else (the CSI plugin's volumes live
    /// in it).
    pub fn keep_memory_dir(mut self) -> Self {
        self.keep_memory_dir = true;
        self
    }

    /// More arguments for `cairnd`, after the harness's own.
    pub fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// More environment variables for `cairnd` (`FAILPOINTS`, say; the
    /// harness removes any it inherits).
    pub fn env(mut self, env: &[(&str, &str)]) -> Self {
        self.env
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// Runs `cairnd` through this command line (a program and its
    /// arguments), e.g. `ip netns exec NS` to put it in a network
    /// namespace. The Unix socket is reachable from here either way.
    pub fn launcher(mut self, prefix: Vec<OsString>) -> Self {
        self.launcher = prefix;
        self
    }

    /// `--chunk-size`, unless the arguments give one; `None` leaves cairnd's
    /// default. [`TEST_CHUNK`] by default.
    pub fn chunk_size(mut self, bytes: Option<u64>) -> Self {
        self.chunk_size = bytes;
        self
    }

    /// Whether the disk tier's background scrub runs (at cairnd's default
    /// rate). Off by default (`--disk-scrub-bytes-per-sec 0`, unless the
    /// arguments give a rate): tests that damage disk chunks on purpose want
    /// the restore or the verify they run, not a scrub, to find them.
    pub fn scrub_disk(mut self, on: bool) -> Self {
        self.scrub_disk = on;
        self
    }

    /// `--metrics-addr` (`off`, or an address; `127.0.0.1:0` by default).
    pub fn metrics_addr(mut self, addr: &str) -> Self {
        self.metrics_addr = addr.into();
        self
    }

    /// Lets `cairnd` log to this process's stderr instead of its own
    /// `cairnd.log` (a benchmark's output).
    pub fn log_to_stderr(mut self) -> Self {
        self.log_to_file = false;
        self
    }

    /// `CAIRN_LOG` for `cairnd` (`info` by default).
    pub fn log_filter(mut self, filter: &str) -> Self {
        self.log_filter = filter.into();
        self
    }

    /// Starts the daemon and waits until it answers Status.
    pub async fn start(self) -> Result<Daemon> {
        let cairnd = match self.cairnd {
            Some(bin) => bin,
            None => cairnd_binary()?,
        };
        let cairn = self.cairn.unwrap_or_else(|| cairnd.with_file_name("cairn"));
        let (temp, work) = match self.work_dir {
            Some(dir) => {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                (None, dir)
            }
            None => {
                let temp = tempfile::tempdir().context("creating a temp dir")?;
                let dir = temp.path().to_path_buf();
                (Some(temp), dir)
            }
        };
        let memory_dir = self.memory_dir.unwrap_or_else(|| {
            PathBuf::from(format!("/dev/shm/cairn-test-{}", uuid::Uuid::new_v4()))
        });
        let mut daemon = Daemon {
            disk_dir: work.join("disk"),
            socket: work.join("cairn.sock"),
            log: self.log_to_file.then(|| work.join("cairnd.log")),
            work,
            memory_dir,
            extra_args: self.args,
            env: self.env,
            launcher: self.launcher,
            cairnd,
            cairn,
            chunk_size: self.chunk_size,
            scrub_disk: self.scrub_disk,
            metrics_addr: self.metrics_addr,
            log_filter: self.log_filter,
            keep_memory_dir: self.keep_memory_dir,
            _temp: temp,
            child: None,
        };
        daemon.spawn()?;
        daemon.ready().await?;
        Ok(daemon)
    }
}

/// A running (or stopped) `cairnd` with its own directories; killed on
/// drop, its memory tier removed (unless kept) and, when a test is failing,
/// its log kept.
pub struct Daemon {
    /// Holds the socket, the disk tier and the log.
    pub work: PathBuf,
    /// The memory tier.
    pub memory_dir: PathBuf,
    /// The disk tier.
    pub disk_dir: PathBuf,
    /// The client socket.
    pub socket: PathBuf,
    /// The daemon's log; `None` when it logs to this process's stderr.
    pub log: Option<PathBuf>,
    /// Arguments after the harness's own; a restart uses them as they are
    /// then.
    pub extra_args: Vec<String>,
    /// Environment variables (a restart replaces them).
    pub env: Vec<(String, String)>,
    /// The command line `cairnd` runs through (empty: none).
    pub launcher: Vec<OsString>,
    cairnd: PathBuf,
    cairn: PathBuf,
    chunk_size: Option<u64>,
    scrub_disk: bool,
    metrics_addr: String,
    log_filter: String,
    keep_memory_dir: bool,
    /// The default work dir, removed on drop.
    _temp: Option<tempfile::TempDir>,
    child: Option<Child>,
}

impl Daemon {
    fn spawn(&mut self) -> Result<()> {
        let mut cmd = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(&self.cairnd);
                cmd
            }
            None => Command::new(&self.cairnd),
        };
        let has_arg = |name: &str| self.extra_args.iter().any(|a| a == name);
        if let Some(chunk_size) = self.chunk_size
            && !has_arg("--chunk-size")
        {
            cmd.arg("--chunk-size").arg(chunk_size.to_string());
        }
        if !self.scrub_disk && !has_arg("--disk-scrub-bytes-per-sec") {
            cmd.arg("--disk-scrub-bytes-per-sec").arg("0");
        }
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--memory-dir")
            .arg(&self.memory_dir)
            .arg("--disk-dir")
            .arg(&self.disk_dir)
            .arg("--metrics-addr")
            .arg(&self.metrics_addr)
            .args(&self.extra_args)
            .env("CAIRN_LOG", &self.log_filter)
            .env_remove("FAILPOINTS")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        match &self.log {
            Some(log) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .with_context(|| format!("opening {}", log.display()))?;
                cmd.stderr(file);
            }
            None => {
                cmd.stderr(Stdio::inherit());
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.cairnd.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until Status answers; fails when the process exits first or
    /// after [`READY_TIMEOUT`].
    async fn ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "cairnd exited during start ({status}); log:\n{}",
                    self.log_text()
                );
            }
            if let Ok(mut c) = self.connect().await
                && c.admin.status(pb::StatusRequest {}).await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("cairnd did not start; log:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Connects to the client socket.
    pub async fn connect(&self) -> Result<Clients> {
        let socket = self.socket.to_str().context("a UTF-8 socket path")?;
        Clients::connect(socket)
            .await
            .with_context(|| format!("connecting to cairnd at {socket}"))
    }

    /// [`connect`](Self::connect), for a test.
    pub async fn clients(&self) -> Clients {
        self.connect().await.expect("connect to cairnd")
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The log so far (empty when it logs to stderr).
    pub fn log_text(&self) -> String {
        self.log
            .as_deref()
            .and_then(|log| std::fs::read_to_string(log).ok())
            .unwrap_or_default()
    }

    /// How many lines of the log contain `needle`.
    pub fn count_in_log(&self, needle: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// SIGKILL, like a node's OOM killer or `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit by itself (e.g. a failpoint killed it);
    /// returns whether it did within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let exited = poll_until_blocking(timeout, || {
            self.child
                .as_mut()
                .is_some_and(|child| matches!(child.try_wait(), Ok(Some(_))))
        });
        if exited {
            self.child = None;
        }
        exited
    }

    /// SIGTERM, and waits for the exit. Async, so this test's client
    /// connections keep being driven (they answer the daemon's graceful
    /// GOAWAY) while it drains. Panics, after killing it, when it takes
    /// longer than [`STOP_TIMEOUT`].
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "cairnd did not stop within {STOP_TIMEOUT:?} of SIGTERM; log:\n{}",
            self.log_text()
        );
    }

    /// Kills the process (if it runs) and starts it again on the same
    /// directories and arguments, with `env` instead of the environment it
    /// had; waits until it answers.
    pub async fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        self.kill();
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn().expect("spawn cairnd");
        if let Err(e) = self.ready().await {
            panic!("{e:#}");
        }
    }

    /// [`restart_with_env`](Self::restart_with_env) without environment
    /// variables: a failpoint the daemon was started with is off after a
    /// restart.
    pub async fn restart(&mut self) {
        self.restart_with_env(&[]).await;
    }

    /// A Prometheus scrape of the daemon's metrics endpoint.
    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = self.clients().await;
        let addr = crate::status(&mut c).await.metrics_addr;
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

    /// The value of the sample `name{labels}` (or a bare `name`) now; 0
    /// when absent.
    pub async fn metric(&self, name_and_labels: &str) -> f64 {
        metric(&self.metrics().await, name_and_labels)
    }

    /// Waits until ingest has walked every CSI volume `walks` times more
    /// (`cairn_ingest_scans_total`). With two, the second walk began after
    /// this call, so it saw everything written before it: what ingest was
    /// going to take, it has taken.
    pub async fn wait_ingest_walks(&self, walks: u32) {
        let scans = cairn_daemon::metrics::INGEST_SCANS;
        let target = self.metric(scans).await + f64::from(walks);
        wait_until(
            INGEST_WALKS_TIMEOUT,
            &format!("ingest walked the volumes {walks} more times"),
            async || self.metric(scans).await >= target,
        )
        .await;
    }

    /// Runs the `cairn` CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.cairn)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run cairn")
    }
}

impl Drop for Daemon {
    /// Kills the daemon and removes its memory tier (unless kept); its temp
    /// dir goes with it. When the test is failing, the log is kept first.
    fn drop(&mut self) {
        self.kill();
        if let Some(log) = &self.log {
            logs::keep_if_failing("cairnd", log);
        }
        if !self.keep_memory_dir {
            let _ = std::fs::remove_dir_all(&self.memory_dir);
        }
    }
}
