//! A real S3 server: SeaweedFS (`weed mini`, installed in `.venv` by
//! `./scripts/install-test-servers`) on free loopback ports with one bucket,
//! `cairn`, and the AWS CLI next to it (a test's check of what the bucket
//! holds, a benchmark's baseline client).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::servers::{Server, free_ports, installed, repo_root};
use crate::wait::poll_until_blocking;

/// The server's access key.
pub const ACCESS_KEY: &str = "cairn-test";
/// The server's secret key.
pub const SECRET_KEY: &str = "cairn-test-secret";
/// The one bucket.
pub const BUCKET: &str = "cairn";

/// How long the filer behind the S3 port may take to accept the bucket.
const BUCKET_TIMEOUT: Duration = Duration::from_secs(60);

fn weed() -> PathBuf {
    repo_root().join(".venv/bin/weed")
}

/// SeaweedFS with the bucket `cairn`, its data and log in a temp dir;
/// killed on drop.
pub struct SeaweedFs {
    server: Server,
    s3_port: u16,
    _dir: tempfile::TempDir,
}

impl SeaweedFs {
    /// For a test: starts it, or returns `None` (after saying the test is
    /// skipped) when it is not installed and `CAIRN_REQUIRE_SERVERS=1` is
    /// not set. Panics when it does not start.
    pub fn start_or_skip() -> Option<Self> {
        installed(weed(), "SeaweedFS")?;
        Some(Self::start().unwrap_or_else(|e| panic!("SeaweedFS: {e:#}")))
    }

    /// Starts it and makes the bucket.
    pub fn start() -> Result<Self> {
        let weed = weed();
        if !weed.exists() {
            bail!(
                "SeaweedFS not found at {} (run ./scripts/install-test-servers)",
                weed.display()
            );
        }
        let dir = tempfile::tempdir().context("a temp dir for SeaweedFS")?;
        let base = free_ports(5);
        let s3_port = base + 3;
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).context("SeaweedFS's data dir")?;
        let command = vec![
            weed.display().to_string(),
            "mini".into(),
            format!("-dir={}", data.display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-master.port={base}"),
            format!("-volume.port={}", base + 1),
            format!("-filer.port={}", base + 2),
            format!("-s3.port={s3_port}"),
            format!("-admin.port={}", base + 4),
            "-webdav=false".into(),
            "-s3.port.lance=0".into(),
            "-s3.port.iceberg=0".into(),
            "-admin.ui=false".into(),
            "-master.telemetry=false".into(),
        ];
        let envs = vec![
            ("AWS_ACCESS_KEY_ID".to_owned(), ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY".to_owned(), SECRET_KEY.to_owned()),
        ];
        let server = Server::start(command, envs, s3_port, dir.path().join("weed.log"))?;
        let s3 = Self {
            server,
            s3_port,
            _dir: dir,
        };
        // The S3 port opens before the filer behind it is ready.
        let made = poll_until_blocking(BUCKET_TIMEOUT, || {
            s3.aws(&["s3", "mb", &format!("s3://{BUCKET}")])
                .is_ok_and(|o| o.status.success())
        });
        if !made {
            bail!(
                "cannot create the bucket; SeaweedFS's log:\n{}",
                s3.server.log_text()
            );
        }
        Ok(s3)
    }

    /// The S3 port's address (for a proxy in front of it).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.s3_port))
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// An `[object_store]` section for cairnd that uses this server's
    /// bucket under `prefix`, with `extra` keys in the section (say,
    /// `upload_after = "commit"`).
    pub fn object_store_config(&self, prefix: &str, extra: &str) -> String {
        format!(
            "[object_store]\nurl = \"s3://{BUCKET}/{prefix}\"\n{extra}\n\
             [object_store.options]\nendpoint = \"{}\"\nallow_http = \"true\"\nregion = \"us-east-1\"\n\
             access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n",
            self.endpoint()
        )
    }

    /// Runs the AWS CLI against the server itself (not through a proxy).
    pub fn aws(&self, args: &[&str]) -> Result<Output> {
        Command::new(repo_root().join(".venv/bin/aws"))
            .arg("--endpoint-url")
            .arg(self.endpoint())
            .args(args)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .output()
            .context("running the AWS CLI (run ./scripts/install-test-servers)")
    }

    /// Times one AWS CLI command, which must succeed.
    pub fn timed_aws(&self, args: &[&str]) -> Result<f64> {
        let t = Instant::now();
        let out = self.aws(args)?;
        if !out.status.success() {
            bail!("aws {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(t.elapsed().as_secs_f64())
    }

    /// The multipart uploads still open under `prefix`, as
    /// `ListMultipartUploads` reports them: (key, upload id).
    pub fn open_multipart_uploads(&self, prefix: &str) -> Vec<(String, String)> {
        let out = self
            .aws(&[
                "s3api",
                "list-multipart-uploads",
                "--bucket",
                BUCKET,
                "--prefix",
                prefix,
                "--output",
                "json",
            ])
            .expect("run aws");
        assert!(
            out.status.success(),
            "list-multipart-uploads: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Vec::new();
        }
        let listing: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("list-multipart-uploads JSON");
        listing["Uploads"]
            .as_array()
            .map(|uploads| {
                uploads
                    .iter()
                    .map(|u| {
                        (
                            u["Key"].as_str().unwrap_or_default().to_owned(),
                            u["UploadId"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// SIGKILL: an outage.
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Starts it again after [`kill`](Self::kill), on the same port and
    /// data.
    pub fn restart(&mut self) -> Result<()> {
        self.server.restart()
    }
}
