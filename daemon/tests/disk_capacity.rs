//! The disk tier's byte capacity: a full disk is a clear error found before
//! writing, never a failing write; shards the bucket holds make room; the
//! memory tier keeps what the disk could not take.

mod common;

use std::path::Path;

use cairn_proto::v1 as pb;
use common::*;

fn disk_state(steps: &[pb::StepStatus], step: u64) -> pb::ShardState {
    let shard = &steps
        .iter()
        .find(|s| s.step == step)
        .unwrap_or_else(|| panic!("step {step} listed"))
        .shards[0];
    let state = shard
        .tiers
        .iter()
        .find(|t| t.tier == pb::Tier::Disk as i32)
        .expect("disk state");
    pb::ShardState::try_from(state.state).expect("state")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_tier_refuses_the_write_back_and_keeps_the_shard_in_memory() {
    // Regression: the disk tier had no byte capacity; a full disk was only
    // found by a failing write.
    let d = start_daemon(&["--disk-capacity", "1048576"]).await;
    let mut c = d.clients().await;
    let first = bytes(1, 700_000);
    save(&mut c, shard("full", 1, 0), &[("w", &first)])
        .await
        .expect("save 1");
    wait_disk(&mut c, "full", 1).await;
    let second = bytes(2, 700_000);
    save(&mut c, shard("full", 2, 0), &[("w", &second)])
        .await
        .expect("a save is acknowledged from memory even with the disk full");
    let err = wait_durable(&mut c, "full", 2, pb::Tier::Disk, 30_000)
        .await
        .expect_err("cannot fit on disk");
    assert!(
        err.message().contains("disk tier is full") && err.message().contains("1048576"),
        "{}",
        err.message()
    );
    assert_eq!(
        disk_state(&job_steps(&mut c, "full").await, 2),
        pb::ShardState::Failed
    );
    // Nothing half-written counts, and the shard is still restorable.
    let (resp, got) = restore(&mut c, "full", Some(2), 0).await.expect("restore");
    assert_eq!(got["w"], second);
    assert_eq!(source_bytes(&resp, pb::Tier::Memory), second.len() as u64);
    let status = testkit::status(&mut c).await;
    let disk = status
        .tiers
        .iter()
        .find(|t| t.tier == pb::Tier::Disk as i32)
        .expect("disk usage");
    assert_eq!(disk.capacity_bytes, 1_048_576);
    assert!(disk.used_bytes <= disk.capacity_bytes, "{disk:?}");
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
async fn shards_the_bucket_holds_make_room_on_a_full_disk() {
    let work = tempfile::tempdir().expect("temp dir");
    let bucket = work.path().join("bucket");
    std::fs::create_dir_all(&bucket).expect("bucket");
    let config = bucket_config(work.path(), &bucket);
    let d = start_daemon(&[
        "--config",
        config.to_str().expect("utf-8"),
        "--disk-capacity",
        "1048576",
        "--memory-keep-last",
        "1",
    ])
    .await;
    let mut c = d.clients().await;
    let one = bytes(1, 700_000);
    save(&mut c, shard("room", 1, 0), &[("w", &one)])
        .await
        .expect("save 1");
    wait_durable(&mut c, "room", 1, pb::Tier::ObjectStore, 30_000)
        .await
        .expect("step 1 in the bucket");
    // Step 2 is small and fits; memory retention (keep 1) then drops step 1
    // from memory, since the disk holds it.
    let two = bytes(2, 200_000);
    save(&mut c, shard("room", 2, 0), &[("w", &two)])
        .await
        .expect("save 2");
    wait_durable(&mut c, "room", 2, pb::Tier::ObjectStore, 30_000)
        .await
        .expect("step 2 in the bucket");
    // Step 3 does not fit next to both: step 1 (in the bucket, no longer in
    // memory) leaves the disk to make room.
    let three = bytes(3, 700_000);
    save(&mut c, shard("room", 3, 0), &[("w", &three)])
        .await
        .expect("save 3");
    wait_disk(&mut c, "room", 3).await;
    assert!(
        d.log_text()
            .contains("evicted from disk tier to make room (the object store holds it)"),
        "{}",
        d.log_text()
    );
    // Every step still restores, step 1 from the bucket. With memory
    // retention at 1, an older step restored into memory may be evicted
    // again (the disk holds it) between the reply and the read of its file;
    // a client then restores again, as the Python client does.
    for (step, data) in [(3, &three), (2, &two), (1, &one)] {
        let mut got = None;
        for _ in 0..3 {
            let resp = c
                .checkpoint
                .restore_shard(pb::RestoreShardRequest {
                    shard: Some(common::selector("room", Some(step), 0)),
                    skip_verify: false,
                })
                .await
                .unwrap_or_else(|e| panic!("step {step}: {e}"))
                .into_inner();
            if let Ok(bytes) = std::fs::read(&resp.files[0].path) {
                got = Some(bytes);
                break;
            }
        }
        assert_eq!(got.as_ref(), Some(data), "step {step}");
    }
}
