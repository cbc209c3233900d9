//! SeaweedFS (`weed mini`) for the torture suite's bucket rows: one bucket,
//! `cairn`, on free loopback ports, killed on drop. The same server as
//! `daemon/tests/object_servers.rs`, installed by
//! `./scripts/install-test-servers`.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "cairn-test";
pub const SECRET_KEY: &str = "cairn-test-secret";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// A running SeaweedFS with the bucket `cairn`.
pub struct SeaweedFs {
    child: Child,
    s3_port: u16,
    _dir: tempfile::TempDir,
}

impl SeaweedFs {
    /// Starts it, or returns `None` (with a message) when it is not
    /// installed and `CAIRN_REQUIRE_SERVERS=1` is not set.
    pub fn start() -> Option<SeaweedFs> {
        let weed = repo().join(".venv/bin/weed");
        if !weed.exists() {
            let message = format!(
                "SeaweedFS not found at {} (run ./scripts/install-test-servers)",
                weed.display()
            );
            assert!(
                std::env::var("CAIRN_REQUIRE_SERVERS").as_deref() != Ok("1"),
                "{message}"
            );
            eprintln!("skipped: {message}");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let base = free_ports(5);
        let s3_port = base + 3;
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let log = std::fs::File::create(dir.path().join("weed.log")).expect("weed log");
        let mut child = Command::new(&weed)
            .args([
                "mini".to_string(),
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
            ])
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start SeaweedFS");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", s3_port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("SeaweedFS exited ({status})");
            }
            assert!(Instant::now() < deadline, "SeaweedFS did not open its port");
            std::thread::sleep(Duration::from_millis(50));
        }
        let server = SeaweedFs {
            child,
            s3_port,
            _dir: dir,
        };
        // The S3 port opens before the filer behind it is ready.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !server.aws(&["s3", "mb", "s3://cairn"]).status.success() {
            assert!(Instant::now() < deadline, "cannot create the bucket");
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(server)
    }

    /// The S3 port, for a proxy in front of it.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.s3_port))
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Runs the AWS CLI against the server itself (not through a proxy).
    pub fn aws(&self, args: &[&str]) -> std::process::Output {
        Command::new(repo().join(".venv/bin/aws"))
            .arg("--endpoint-url")
            .arg(self.endpoint())
            .args(args)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .output()
            .expect("run aws")
    }

    /// The multipart uploads still open under `prefix`, as
    /// `ListMultipartUploads` reports them: (key, upload id).
    pub fn open_multipart_uploads(&self, prefix: &str) -> Vec<(String, String)> {
        let out = self.aws(&[
            "s3api",
            "list-multipart-uploads",
            "--bucket",
            "cairn",
            "--prefix",
            prefix,
            "--output",
            "json",
        ]);
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
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A base port with `count` free ports after it (and the same again 10000
/// higher, where SeaweedFS puts its gRPC ports).
fn free_ports(count: u16) -> u16 {
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
