//! A real S3 server for the benchmarks: SeaweedFS (`weed mini`, installed in
//! `.venv` by `./scripts/install-test-servers`) on free loopback ports, with
//! the AWS CLI next to it as the baseline client.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const ACCESS_KEY: &str = "bench";
const SECRET_KEY: &str = "bench-secret";

/// SeaweedFS on free loopback ports, killed on drop.
pub struct SeaweedFs {
    child: Child,
    /// Its S3 endpoint, `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

impl SeaweedFs {
    /// Starts it with its data under `data` and makes the bucket `cairn`;
    /// `repo` is the repository root (for `.venv/bin/weed` and `aws`).
    pub fn start(repo: &Path, data: &Path) -> Result<Self> {
        let base = (0..100)
            .map(|i| 16_000 + i * 50)
            .find(|b| (0..5).all(|i| TcpListener::bind(("127.0.0.1", b + i)).is_ok()))
            .context("no free ports")?;
        std::fs::create_dir_all(data)?;
        let child = Command::new(repo.join(".venv/bin/weed"))
            .arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false"])
            .arg(format!("-master.port={base}"))
            .arg(format!("-volume.port={}", base + 1))
            .arg(format!("-filer.port={}", base + 2))
            .arg(format!("-s3.port={}", base + 3))
            .arg(format!("-admin.port={}", base + 4))
            .args([
                "-s3.port.lance=0",
                "-s3.port.iceberg=0",
                "-admin.ui=false",
                "-master.telemetry=false",
            ])
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting weed (run ./scripts/install-test-servers)")?;
        let s3 = Self {
            child,
            endpoint: format!("http://127.0.0.1:{}", base + 3),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !s3
            .aws(repo, &["s3", "mb", "s3://cairn"])
            .map(|o| o.status.success())
            .unwrap_or(false)
        {
            if Instant::now() > deadline {
                bail!("SeaweedFS did not start");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(s3)
    }

    /// Runs the AWS CLI against the server.
    pub fn aws(&self, repo: &Path, args: &[&str]) -> Result<std::process::Output> {
        Command::new(repo.join(".venv/bin/aws"))
            .arg("--endpoint-url")
            .arg(&self.endpoint)
            .args(args)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .output()
            .context("running the AWS CLI")
    }

    /// Times one AWS CLI command, which must succeed.
    pub fn timed_aws(&self, repo: &Path, args: &[&str]) -> Result<f64> {
        let t = Instant::now();
        let out = self.aws(repo, args)?;
        if !out.status.success() {
            bail!("aws {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(t.elapsed().as_secs_f64())
    }
}

impl SeaweedFs {
    /// The `[object_store]` section of a cairnd configuration that uploads
    /// to this server's bucket (under the prefix `cairn`), queued for upload
    /// at `upload_after` (`"commit"` or `"disk"`).
    pub fn object_store_toml(&self, upload_after: &str) -> String {
        format!(
            "[object_store]\nurl = \"s3://cairn/cairn\"\nupload_after = \"{upload_after}\"\n\
             [object_store.options]\nendpoint = \"{}\"\nallow_http = \"true\"\nregion = \"us-east-1\"\n\
             access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n",
            self.endpoint
        )
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
