//! The object-store tier in real `cairnd` processes, with a local-directory
//! bucket (`file://`): upload after write-back, incremental steps, restore on
//! a brand-new node from the bucket alone, resume after `kill -9`, retries of
//! injected faults, retention and GC, and the disk tier keeping what the
//! bucket lacks. The same flows against S3, Azure and GCS servers are in
//! `object_servers.rs`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use cairn_proto::v1 as pb;
use common::*;

/// A config file naming a `file://` bucket, plus extra `[object_store]` keys.
fn bucket_config(dir: &Path, bucket: &Path, extra: &str) -> PathBuf {
    let path = dir.join(format!("cairnd-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(
        &path,
        format!(
            "[object_store]\nurl = \"file://{}\"\nrequest_timeout_secs = 10\n{extra}\n",
            bucket.display()
        ),
    )
    .expect("write config");
    path
}

async fn start_with_bucket(
    work: &Path,
    bucket: &Path,
    extra: &str,
    env: &[(&str, &str)],
) -> Daemon {
    let config = bucket_config(work, bucket, extra);
    start_daemon_with_env(&["--config", config.to_str().expect("utf-8")], env).await
}

async fn wait_object_store(
    c: &mut cairn_daemon::client::Clients,
    job: &str,
    step: u64,
    timeout_ms: u64,
) -> Result<(), tonic::Status> {
    wait_durable(c, job, step, pb::Tier::ObjectStore, timeout_ms).await
}

fn object_state(step: &pb::StepStatus, rank: u32) -> pb::ShardState {
    let shard = step
        .shards
        .iter()
        .find(|s| s.rank == rank)
        .expect("rank listed");
    let state = shard
        .tiers
        .iter()
        .find(|t| t.tier == pb::Tier::ObjectStore as i32)
        .expect("object-store state")
        .state;
    pb::ShardState::try_from(state).expect("state")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_restores_from_the_bucket_alone_and_refills_its_disk() {
    let work = tempfile::tempdir().expect("tempdir");
    let bucket = work.path().join("bucket");
    let weights = bytes(1, 40 * TEST_CHUNK as usize + 17);
    let optimizer = bytes(2, 3 * TEST_CHUNK as usize);
    let files: [(&str, &[u8]); 2] = [("weights", &weights), ("optim/state", &optimizer)];
    {
        let old = start_with_bucket(work.path(), &bucket, "", &[]).await;
        let mut c = old.clients().await;
        save(&mut c, shard("llm", 100, 0), &files)
            .await
            .expect("save");
        wait_object_store(&mut c, "llm", 100, 30_000)
            .await
            .expect("uploaded");
        let steps = job_steps(&mut c, "llm").await;
        assert_eq!(object_state(&steps[0], 0), pb::ShardState::Durable);
        assert!(steps[0].object_store_complete, "marker written");
        let m = old.metrics().await;
        assert_eq!(
            metric(&m, "cairn_saved_bytes_total{tier=\"object-store\"}") as usize,
            weights.len() + optimizer.len()
        );
    }
    // The old node is gone with its tmpfs and disk. A new one, empty, points
    // at the same bucket.
    let new = start_with_bucket(work.path(), &bucket, "", &[]).await;
    let mut c = new.clients().await;
    let steps = job_steps(&mut c, "llm").await;
    assert_eq!(steps.len(), 1);
    assert!(steps[0].restorable && steps[0].object_store_complete);
    let (resp, restored) = restore(&mut c, "llm", None, 0)
        .await
        .expect("restore latest");
    let restored_step = resp
        .manifest
        .as_ref()
        .and_then(|m| m.shard.as_ref())
        .map(|s| s.step);
    assert_eq!(restored_step, Some(100));
    assert_eq!(restored["weights"], weights);
    assert_eq!(restored["optim/state"], optimizer);
    assert_eq!(
        source_bytes(&resp, pb::Tier::ObjectStore) as usize,
        weights.len() + optimizer.len()
    );
    // On the way, the shard went back to the new node's disk.
    wait_disk(&mut c, "llm", 100).await;
    let steps = job_steps(&mut c, "llm").await;
    let disk = steps[0].shards[0]
        .tiers
        .iter()
        .find(|t| t.tier == pb::Tier::Disk as i32)
        .expect("disk state");
    assert_eq!(disk.state, pb::ShardState::Durable as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_step_uploads_only_what_changed() {
    let work = tempfile::tempdir().expect("tempdir");
    let bucket = work.path().join("bucket");
    let d = start_with_bucket(work.path(), &bucket, "", &[]).await;
    let mut c = d.clients().await;
    let mut data = bytes(3, 20 * TEST_CHUNK as usize);
    save(&mut c, shard("inc", 1, 0), &[("w", &data)])
        .await
        .expect("step 1");
    wait_object_store(&mut c, "inc", 1, 30_000)
        .await
        .expect("step 1 up");
    // Two of twenty chunks change.
    for chunk in [3usize, 11] {
        let at = chunk * TEST_CHUNK as usize;
        data[at..at + 100].copy_from_slice(&bytes(4 + chunk as u64, 100));
    }
    save(&mut c, shard("inc", 2, 0), &[("w", &data)])
        .await
        .expect("step 2");
    wait_object_store(&mut c, "inc", 2, 30_000)
        .await
        .expect("step 2 up");
    let m = d.metrics().await;
    let uploaded = metric(&m, "cairn_saved_bytes_total{tier=\"object-store\"}") as u64;
    let skipped = metric(&m, "cairn_dedup_skipped_bytes_total{tier=\"object-store\"}") as u64;
    assert_eq!(
        uploaded,
        22 * TEST_CHUNK,
        "20 chunks, then the 2 that changed"
    );
    assert_eq!(skipped, 18 * TEST_CHUNK);
    let chunks = std::fs::read_dir(bucket.join("tenants/default/chunks"))
        .expect("ls")
        .count();
    assert_eq!(chunks, 22);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemon_resumes_its_upload_without_resending() {
    let work = tempfile::tempdir().expect("tempdir");
    let bucket = work.path().join("bucket");
    let data = bytes(5, 60 * TEST_CHUNK as usize);
    // Upload one chunk at a time and die (SIGKILL) after the 20th.
    let extra = "concurrency = 1";
    let mut d = start_with_bucket(
        work.path(),
        &bucket,
        extra,
        &[("FAILPOINTS", "upload.after_chunk=20*off->return")],
    )
    .await;
    let mut c = d.clients().await;
    save(&mut c, shard("resume", 7, 0), &[("w", &data)])
        .await
        .expect("save");
    assert!(
        d.wait_exit(std::time::Duration::from_secs(30)),
        "failpoint killed cairnd"
    );
    let sent_before = std::fs::read_dir(bucket.join("tenants/default/chunks"))
        .expect("ls")
        .count();
    assert!(
        (20..60).contains(&sent_before),
        "{sent_before} chunks before the kill"
    );
    assert!(
        !bucket
            .join("tenants/default/manifests/resume/7/0.manifest")
            .exists()
    );

    // Restarted (same directories, the journal on its disk), it finishes.
    d.restart().await;
    let mut c = d.clients().await;
    wait_object_store(&mut c, "resume", 7, 30_000)
        .await
        .expect("resumed");
    let m = d.metrics().await;
    let uploaded = metric(&m, "cairn_saved_bytes_total{tier=\"object-store\"}") as u64;
    assert_eq!(
        uploaded,
        (60 - sent_before as u64) * TEST_CHUNK,
        "only the rest was sent"
    );
    assert!(d.log_text().contains("resuming upload"));

    let fresh = start_with_bucket(work.path(), &bucket, "", &[]).await;
    let mut c = fresh.clients().await;
    let (_, restored) = restore(&mut c, "resume", Some(7), 0)
        .await
        .expect("restore");
    assert_eq!(restored["w"], data);
}

/// SIGTERM (a rolling update, a node drain) in the middle of a long upload:
/// cairnd stops its background work and exits well within its drain
/// deadline (20 s; the DaemonSet's grace period is 60 s), saying that every
/// background task stopped, and after restart the journal finishes the
/// upload without sending again what the bucket already has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_upload_drains_in_time_and_the_upload_resumes() {
    let work = tempfile::tempdir().expect("tempdir");
    let bucket = work.path().join("bucket");
    let chunks_dir = bucket.join("tenants/default/chunks");
    let data = bytes(6, 80 * TEST_CHUNK as usize);
    // One chunk at a time, each held 100 ms after it is stored: 8 s or more.
    let mut d = start_with_bucket(
        work.path(),
        &bucket,
        "concurrency = 1",
        &[("FAILPOINTS", "upload.after_chunk=sleep(100)")],
    )
    .await;
    let mut c = d.clients().await;
    save(&mut c, shard("drain", 3, 0), &[("w", &data)])
        .await
        .expect("save");
    let started = std::time::Instant::now();
    while std::fs::read_dir(&chunks_dir).map_or(0, |d| d.count()) < 10 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "upload never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let stopping = std::time::Instant::now();
    d.stop().await;
    let stopped_in = stopping.elapsed();
    let log = d.log_text();
    assert!(
        stopped_in < std::time::Duration::from_secs(20),
        "cairnd took {stopped_in:?} to stop; its log:\n{log}"
    );
    assert!(
        log.contains("background tasks stopped")
            && !log.contains("still running at the shutdown deadline"),
        "every background task should have stopped before the deadline; the log:\n{log}"
    );
    let sent_before = std::fs::read_dir(&chunks_dir).expect("ls").count();
    assert!(
        sent_before < 80,
        "the upload was cut short ({sent_before} chunks sent)"
    );
    assert!(
        !bucket
            .join("tenants/default/manifests/drain/3/0.manifest")
            .exists()
    );

    d.restart().await;
    let mut c = d.clients().await;
    wait_object_store(&mut c, "drain", 3, 60_000)
        .await
        .expect("the journal resumed the upload");
    let m = d.metrics().await;
    let uploaded = metric(&m, "cairn_saved_bytes_total{tier=\"object-store\"}") as u64;
    assert_eq!(
        uploaded,
        (80 - sent_before as u64) * TEST_CHUNK,
        "only the rest was sent"
    );
    let fresh = start_with_bucket(work.path(), &bucket, "", &[]).await;
    let mut c = fresh.clients().await;
    let (_, restored) = restore(&mut c, "drain", Some(3), 0).await.expect("restore");
    assert_eq!(restored["w"], data);
}

/// An S3 endpoint that answers every request `503 Service Unavailable`: a
/// stand-in, because a real server cannot be made to answer 503 on cue.
async fn always_unavailable_s3() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&requests);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                let mut buf = vec![0_u8; 64 * 1024];
                let mut pending = Vec::new();
                loop {
                    let n = match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&buf[..n]);
                    // One answer per request head (listings and reads have
                    // no body).
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        counted.fetch_add(1, Ordering::Relaxed);
                        let answer =
                            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
                        if socket.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, requests)
}

/// A bucket that answers every request 503: a listing that waits for every
/// tier gives up after the bounded retries Cairn sets for the backend (two),
/// so the bucket sees three requests. With `object_store`'s default (10
/// retries within 180 s) it saw eleven, and a slower bucket could hold the
/// listing for minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_answering_503_is_given_up_on_after_the_bounded_retries() {
    let work = tempfile::tempdir().expect("tempdir");
    let (endpoint, requests) = always_unavailable_s3().await;
    let config = work.path().join("cairnd.toml");
    std::fs::write(
        &config,
        format!(
            "[object_store]\nurl = \"s3://nobody/ckpt\"\nrequest_timeout_secs = 60\nattempts = 2\n\
             [object_store.options]\nendpoint = \"http://{endpoint}\"\nallow_http = \"true\"\n\
             region = \"us-east-1\"\naccess_key_id = \"k\"\nsecret_access_key = \"s\"\n"
        ),
    )
    .expect("write config");
    let d = start_daemon(&["--config", config.to_str().expect("utf-8")]).await;
    let mut c = d.clients().await;
    let started = std::time::Instant::now();
    let answer = c
        .checkpoint
        .list_steps(pb::ListStepsRequest {
            tenant: String::new(),
            job: "llm".into(),
            wait_for_all_tiers: true,
        })
        .await;
    let took = started.elapsed();
    // Either way the bucket's absence is said, never hidden.
    match answer {
        Ok(resp) => {
            let resp = resp.into_inner();
            assert!(
                !resp.left_out.is_empty(),
                "the bucket must be named as left out: {resp:?}"
            );
        }
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
    }
    assert!(
        took < std::time::Duration::from_secs(20),
        "the listing waited {took:?} on a bucket that answers 503; log:\n{}",
        d.log_text()
    );
    // One listing request and the backend's own bounded retries of it (a
    // second listing at most): with object_store's default retries it was
    // 11 requests.
    let requests = requests.load(Ordering::Relaxed);
    let bound = 2 * (1 + cairn_daemon::tier::object::BACKEND_RETRIES);
    assert!(
        (1..=bound).contains(&requests),
        "{requests} requests reached the bucket for one listing (at most {bound})"
    );
}

/// SIGTERM while a client restores a large shard from a slow bucket: the
/// daemon does not wait for the restore to finish (its listeners wait for
/// every request in flight, and the kubelet's SIGKILL comes after 60 s); the
/// restore stops between chunks and the client is told the daemon is
/// stopping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_restore_stops_the_restore() {
    let work = tempfile::tempdir().expect("tempdir");
    let bucket = work.path().join("bucket");
    let data = bytes(7, 400 * TEST_CHUNK as usize);
    {
        let old = start_with_bucket(work.path(), &bucket, "", &[]).await;
        let mut c = old.clients().await;
        save(&mut c, shard("slow", 1, 0), &[("w", &data)])
            .await
            .expect("save");
        wait_object_store(&mut c, "slow", 1, 60_000)
            .await
            .expect("uploaded");
    }
    // An empty node whose every bucket request takes 100 ms: restoring the
    // 400 chunks takes 20 s or more on two threads.
    let mut new = start_with_bucket(
        work.path(),
        &bucket,
        "",
        &[("FAILPOINTS", "object_store.request=sleep(100)")],
    )
    .await;
    let mut c = new.clients().await;
    let restoring = tokio::spawn(async move { restore(&mut c, "slow", Some(1), 0).await });
    let started = std::time::Instant::now();
    loop {
        let m = new.metrics().await;
        if metric(&m, "cairn_restores_active") >= 1.0 {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the restore never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let stopping = std::time::Instant::now();
    new.stop().await;
    let stopped_in = stopping.elapsed();
    assert!(
        stopped_in < std::time::Duration::from_secs(8),
        "cairnd took {stopped_in:?} to stop during a restore; its log:\n{}",
        new.log_text()
    );
    let outcome = restoring.await.expect("restore task");
    assert!(outcome.is_err(), "the restore cannot have finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_bucket_errors_are_retried() {
    let work = tempfile::tempdir().expect("tempdir");
    let bucket = work.path().join("bucket");
    // A fault the local directory cannot produce on cue: the first four
    // requests to the bucket fail as a throttled or reset request would.
    let d = start_with_bucket(
        work.path(),
        &bucket,
        "",
        &[("FAILPOINTS", "object_store.request=4*return")],
    )
    .await;
    let mut c = d.clients().await;
    let data = bytes(6, 5 * TEST_CHUNK as usize);
    save(&mut c, shard("flaky", 1, 0), &[("w", &data)])
        .await
        .expect("save");
    wait_object_store(&mut c, "flaky", 1, 30_000)
        .await
        .expect("uploaded despite faults");
    let m = d.metrics().await;
    let retries: f64 = m
        .lines()
        .filter(|l| l.starts_with("cairn_object_store_retries_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(retries, 4.0, "{m}");
    assert!(
        d.log_text()
            .contains("object-store request failed, retrying")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_keeps_every_step_the_bucket_lacks() {
    let work = tempfile::tempdir().expect("tempdir");
    let bucket = work.path().join("bucket");
    // Each tier keeps one step, and the bucket fails every request.
    let config = bucket_config(work.path(), &bucket, "attempts = 1");
    let args = [
        "--config",
        config.to_str().expect("utf-8"),
        "--memory-keep-last",
        "1",
        "--disk-keep-last",
        "1",
    ];
    let d = start_daemon_with_env(&args, &[("FAILPOINTS", "object_store.request=return")]).await;
    let mut c = d.clients().await;
    let mut saved = HashMap::new();
    for step in 1..=3u64 {
        let data = bytes(10 + step, 2 * TEST_CHUNK as usize);
        save(&mut c, shard("keep", step, 0), &[("w", &data)])
            .await
            .expect("save");
        wait_disk(&mut c, "keep", step).await;
        saved.insert(step, data);
    }
    let err = wait_object_store(&mut c, "keep", 3, 1_500)
        .await
        .expect_err("bucket is down");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains("fault injected"),
        "names the last error: {}",
        err.message()
    );
    let steps = job_steps(&mut c, "keep").await;
    assert_eq!(
        steps.len(),
        3,
        "keep_last = 1, but nothing is in the bucket yet"
    );
    for s in &steps {
        assert!(matches!(
            object_state(s, 0),
            pb::ShardState::Pending | pb::ShardState::Failed
        ));
    }
    let status = testkit::status(&mut c).await;
    assert_eq!(status.pending_uploads, 3);
    for (step, data) in &saved {
        let (_, restored) = restore(&mut c, "keep", Some(*step), 0)
            .await
            .expect("restore");
        assert_eq!(&restored["w"], data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bucket_retention_and_gc_from_the_cli() {
    let work = tempfile::tempdir().expect("tempdir");
    let bucket = work.path().join("bucket");
    let d = start_with_bucket(
        work.path(),
        &bucket,
        "keep_last = 2\ngc_grace_secs = 1\ngc_interval_secs = 0",
        &[],
    )
    .await;
    let mut c = d.clients().await;
    for step in 1..=4u64 {
        let data = bytes(20 + step, 3 * TEST_CHUNK as usize);
        save(&mut c, shard("ret", step, 0), &[("w", &data)])
            .await
            .expect("save");
        wait_object_store(&mut c, "ret", step, 30_000)
            .await
            .expect("uploaded");
    }
    let manifests = bucket.join("tenants/default/manifests/ret");
    let mut steps: Vec<String> = files_under(&manifests)
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "manifest"))
        .map(|p| {
            p.parent()
                .and_then(Path::file_name)
                .expect("step dir")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    steps.sort();
    assert_eq!(steps, ["3", "4"]);
    // Steps 1 and 2 left 6 chunks behind; after the grace period GC sees them.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let out = d.cli(&["--json", "gc", "--dry-run"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["object_store"]["chunks"], 6, "{report}");
    let chunks = || {
        std::fs::read_dir(bucket.join("tenants/default/chunks"))
            .expect("ls")
            .count()
    };
    assert_eq!(chunks(), 12, "a dry run removes nothing");
    let out = d.cli(&["gc"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("object store: removed 6 unreferenced chunks")
    );
    assert_eq!(chunks(), 6);
    // What is left restores, from the bucket alone.
    let fresh = start_with_bucket(work.path(), &bucket, "", &[]).await;
    let mut c = fresh.clients().await;
    let (_, restored) = restore(&mut c, "ret", Some(3), 0).await.expect("restore");
    assert_eq!(restored["w"], bytes(23, 3 * TEST_CHUNK as usize));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_disk_and_bucket_still_uploads_after_restart() {
    let work = tempfile::tempdir().expect("tempdir");
    let bucket = work.path().join("bucket");
    // Dies right after the disk tier has the shard, before anything else.
    let mut d = start_with_bucket(
        work.path(),
        &bucket,
        "",
        &[("FAILPOINTS", "writeback.after_manifest=return")],
    )
    .await;
    let mut c = d.clients().await;
    let data = bytes(40, 6 * TEST_CHUNK as usize);
    save(&mut c, shard("gap", 1, 0), &[("w", &data)])
        .await
        .expect("save");
    assert!(
        d.wait_exit(std::time::Duration::from_secs(30)),
        "failpoint killed cairnd"
    );
    assert!(
        !bucket
            .join("tenants/default/manifests/gap/1/0.manifest")
            .exists()
    );
    d.restart().await;
    let mut c = d.clients().await;
    wait_object_store(&mut c, "gap", 1, 30_000)
        .await
        .expect("uploaded after the restart");
}
