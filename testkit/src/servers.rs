//! Test servers (SeaweedFS, Azurite, fake-gcs-server) as real processes on
//! free loopback ports. `./scripts/install-test-servers` installs them under
//! the repository (`.venv`, `.cache`); a test skips with a message when one
//! is missing, unless `CAIRN_REQUIRE_SERVERS=1` (what `./scripts/test` sets)
//! makes that a failure.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::logs;

/// How long a server has to open its port.
const PORT_TIMEOUT: Duration = Duration::from_secs(30);

/// The repository root (where `.venv` and `.cache` are).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository root")
        .to_path_buf()
}

/// `path`, when the server binary there is installed; `None` (after saying
/// the test is skipped) when it is missing and missing servers are allowed.
/// Panics when it is missing and `CAIRN_REQUIRE_SERVERS=1`.
pub fn installed(path: PathBuf, what: &str) -> Option<PathBuf> {
    if path.exists() {
        return Some(path);
    }
    let message = format!(
        "{what} not found at {} (run ./scripts/install-test-servers)",
        path.display()
    );
    assert!(
        std::env::var("CAIRN_REQUIRE_SERVERS").as_deref() != Ok("1"),
        "{message}"
    );
    eprintln!("skipped: {message}");
    None
}

/// A base port with `count` free ports after it (and the same again 10000
/// higher, where SeaweedFS puts its gRPC ports).
pub fn free_ports(count: u16) -> u16 {
    for _ in 0..200 {
        let base = 15_000 + (uuid::Uuid::new_v4().as_bytes()[0] as u16) * 40;
        let all_free = (0..count)
            .flat_map(|i| [base + i, base + i + 10_000])
            .all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no free ports");
}

/// A server process listening on a loopback port, its stderr in a log
/// file; killed on drop (its log kept when a test is failing). It can be
/// killed and started again on the same port and data.
pub struct Server {
    child: Option<Child>,
    command: Vec<String>,
    envs: Vec<(String, String)>,
    port: u16,
    log: PathBuf,
}

impl Server {
    /// Runs `command` (program and arguments) with `envs`, appending its
    /// stderr to `log`, and waits until it accepts connections on `port`.
    pub fn start(
        command: Vec<String>,
        envs: Vec<(String, String)>,
        port: u16,
        log: PathBuf,
    ) -> Result<Self> {
        let mut server = Self {
            child: None,
            command,
            envs,
            port,
            log,
        };
        server.restart()?;
        Ok(server)
    }

    /// Starts the process again (after [`kill`](Self::kill)) and waits for
    /// its port.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let (program, args) = self.command.split_first().context("an empty command")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut child = Command::new(program)
            .args(args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let deadline = Instant::now() + PORT_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("{program} exited ({status}): {}", self.log_text());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{program} did not open port {}", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let name = self
            .command
            .first()
            .and_then(|p| Path::new(p).file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "server".into());
        logs::keep_if_failing(&name, &self.log);
    }
}
