//! Attempts: a step that never became complete (a rank crashed mid-save) is
//! saved again by the restarted job without `overwrite`, in every tier; a
//! complete step stays immutable; a late shard of the crashed run (a zombie)
//! never joins the new save.

mod common;

use std::collections::HashMap;
use std::path::Path;

use cairn_proto::v1 as pb;
use common::*;

async fn begin(
    c: &mut cairn_daemon::client::Clients,
    shard: pb::ShardRef,
    files: &[(&str, &[u8])],
    attempt: &str,
) -> Result<pb::BeginShardResponse, tonic::Status> {
    let mut request = begin_request(shard, files);
    request.world_size = Some(2);
    request.attempt = attempt.into();
    c.checkpoint
        .begin_shard(request)
        .await
        .map(tonic::Response::into_inner)
}

async fn commit(
    c: &mut cairn_daemon::client::Clients,
    begun: &pb::BeginShardResponse,
) -> Result<pb::ShardInfo, tonic::Status> {
    c.checkpoint
        .commit_shard(pb::CommitShardRequest {
            session_id: begun.session_id.clone(),
        })
        .await
        .map(|r| r.into_inner().shard.expect("shard info"))
}

/// One rank's save of step `step` of job "run" (world size 2) by `attempt`.
async fn save_rank(
    c: &mut cairn_daemon::client::Clients,
    step: u64,
    rank: u32,
    data: &[u8],
    attempt: &str,
) -> Result<pb::ShardInfo, tonic::Status> {
    let files: [(&str, &[u8]); 1] = [("w", data)];
    let begun = begin(c, shard("run", step, rank), &files, attempt).await?;
    write_staged(&begun, &files);
    commit(c, &begun).await
}

/// The newest restorable step, as listing reports it (no restore, so the
/// tiers stay as they are).
async fn latest(c: &mut cairn_daemon::client::Clients) -> Option<u64> {
    job_steps(c, "run")
        .await
        .iter()
        .filter(|s| s.restorable)
        .map(|s| s.step)
        .max()
}

fn expect_code(result: Result<impl std::fmt::Debug, tonic::Status>, code: tonic::Code, says: &str) {
    let err = result.expect_err("must be refused");
    assert_eq!(err.code(), code, "{}", err.message());
    assert!(err.message().contains(says), "{}", err.message());
}

fn bucket_config(dir: &Path, bucket: &Path) -> std::path::PathBuf {
    let path = dir.join("cairnd-bucket.toml");
    std::fs::write(
        &path,
        format!(
            "[object_store]\nurl = \"file://{}\"\nrequest_timeout_secs = 10\n",
            bucket.display()
        ),
    )
    .expect("write config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incomplete_step_is_saved_again_and_replaced_in_every_tier() {
    let work = tempfile::tempdir().expect("temp dir");
    let bucket = work.path().join("bucket");
    std::fs::create_dir_all(&bucket).expect("bucket dir");
    let config = bucket_config(work.path(), &bucket);
    let mut d = start_daemon(&["--config", config.to_str().expect("utf-8")]).await;
    let mut c = d.clients().await;

    // Step 4 completes under attempt "a4". Step 5 under attempt "a5": rank 0
    // commits, rank 1 crashes mid-write (its session is left open, as a
    // killed rank leaves it until the daemon notices).
    let (old0, old1) = (bytes(1, 300_000), bytes(2, 300_000));
    save_rank(&mut c, 4, 0, &old0, "a4").await.expect("4/0");
    save_rank(&mut c, 4, 1, &old1, "a4").await.expect("4/1");
    save_rank(&mut c, 5, 0, &old0, "a5").await.expect("5/0");
    let zombie_files: [(&str, &[u8]); 1] = [("w", &old1)];
    let zombie = begin(&mut c, shard("run", 5, 1), &zombie_files, "a5")
        .await
        .expect("zombie begins");
    // Rank 0's abandoned shard reaches the disk and the bucket first.
    wait_durable(&mut c, "run", 5, pb::Tier::ObjectStore, 30_000)
        .await
        .expect("abandoned shard uploaded");
    assert_eq!(latest(&mut c).await, Some(4), "step 5 is incomplete");

    // The job restarts from step 4 and saves step 5 again under "b5",
    // without overwrite: rank 0's stale shard is replaced, and the new
    // rank 1 takes over from the zombie's session.
    let (new0, new1) = (bytes(3, 300_000), bytes(4, 300_000));
    let info = save_rank(&mut c, 5, 0, &new0, "b5")
        .await
        .expect("re-save of an incomplete step needs no overwrite");
    assert_eq!(info.attempt, "b5");
    save_rank(&mut c, 5, 1, &new1, "b5").await.expect("5/1");

    // The zombie's session went with its staged files; its late commit is
    // refused, and it cannot begin again.
    assert!(!Path::new(&zombie.files[0].path).exists());
    let late = commit(&mut c, &zombie).await;
    assert!(late.is_err(), "a superseded attempt must not commit");
    expect_code(
        begin(&mut c, shard("run", 5, 1), &zombie_files, "a5").await,
        tonic::Code::Aborted,
        "superseded by attempt b5",
    );

    let listed = job_steps(&mut c, "run").await;
    let five = listed.iter().find(|s| s.step == 5).expect("step 5");
    assert!(five.restorable);
    assert!(five.shards.iter().all(|s| s.attempt == "b5"), "{five:?}");
    assert_eq!(latest(&mut c).await, Some(5));
    for (rank, want) in [(0, &new0), (1, &new1)] {
        let (_, got) = restore(&mut c, "run", Some(5), rank)
            .await
            .expect("restore");
        assert_eq!(
            got.get("w"),
            Some(want),
            "rank {rank} must hold the new save"
        );
    }

    // A complete step is immutable; the same attempt cannot save twice; a
    // save without an attempt cannot replace anything.
    expect_code(
        save_rank(&mut c, 5, 0, &old0, "c5").await,
        tonic::Code::AlreadyExists,
        "is complete",
    );
    expect_code(
        save_rank(&mut c, 5, 0, &new0, "b5").await,
        tonic::Code::AlreadyExists,
        "by this attempt",
    );
    let legacy = c
        .checkpoint
        .begin_shard(begin_request(shard("run", 5, 0), &[("w", &new0)]))
        .await;
    expect_code(legacy, tonic::Code::AlreadyExists, "already committed");

    // The disk tier and the bucket hold the new save, not the abandoned one:
    // a brand-new node with nothing but the bucket restores it, and the step
    // is marked complete there.
    wait_durable(&mut c, "run", 5, pb::Tier::ObjectStore, 30_000)
        .await
        .expect("uploaded");
    let marked = job_steps(&mut c, "run").await;
    assert!(
        marked
            .iter()
            .any(|s| s.step == 5 && s.object_store_complete),
        "{marked:?}"
    );
    d.kill();
    std::fs::remove_dir_all(&d.memory_dir).expect("wipe memory");
    d.restart().await;
    let mut c = d.clients().await;
    let (resp, got) = restore(&mut c, "run", Some(5), 0).await.expect("from disk");
    assert_eq!(got.get("w"), Some(&new0));
    assert_eq!(source_bytes(&resp, pb::Tier::Disk), new0.len() as u64);
    d.kill();
    std::fs::remove_dir_all(&d.memory_dir).expect("wipe memory");
    std::fs::remove_dir_all(&d.disk_dir).expect("wipe disk");
    d.restart().await;
    let mut c = d.clients().await;
    assert_eq!(latest(&mut c).await, Some(5));
    let (resp, got) = restore(&mut c, "run", Some(5), 0)
        .await
        .expect("from the bucket");
    assert_eq!(got.get("w"), Some(&new0));
    assert_eq!(
        source_bytes(&resp, pb::Tier::ObjectStore),
        new0.len() as u64
    );
    let (_, got) = restore(&mut c, "run", Some(5), 1).await.expect("rank 1");
    assert_eq!(got.get("w"), Some(&new1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_of_two_attempts_never_make_a_complete_step() {
    let d = start_daemon(&[]).await;
    let mut c = d.clients().await;
    let data = bytes(7, 100_000);
    save_rank(&mut c, 1, 0, &data, "x").await.expect("1/0");
    save_rank(&mut c, 1, 1, &data, "x").await.expect("1/1");
    // Rank 0 of step 2 from one run, rank 1 from another that began later:
    // both shards exist, but they are not one save.
    save_rank(&mut c, 2, 0, &data, "old").await.expect("2/0");
    save_rank(&mut c, 2, 1, &data, "new").await.expect("2/1");
    let listed = job_steps(&mut c, "run").await;
    let two = listed.iter().find(|s| s.step == 2).expect("step 2");
    assert!(!two.restorable, "{two:?}");
    let attempts: HashMap<u32, &str> = two
        .shards
        .iter()
        .map(|s| (s.rank, s.attempt.as_str()))
        .collect();
    assert_eq!(attempts, HashMap::from([(0, "old"), (1, "new")]));
    assert_eq!(latest(&mut c).await, Some(1));
    // The old attempt was superseded on this node: it cannot finish step 2.
    expect_code(
        save_rank(&mut c, 2, 0, &data, "old").await,
        tonic::Code::Aborted,
        "superseded by attempt new",
    );
    // The new one replaces rank 0 and completes the step.
    save_rank(&mut c, 2, 0, &data, "new")
        .await
        .expect("2/0 again");
    assert_eq!(latest(&mut c).await, Some(2));
    // Attempt ids are names: checked like one.
    expect_code(
        save_rank(&mut c, 3, 0, &data, "../x").await,
        tonic::Code::InvalidArgument,
        "attempt",
    );
}
