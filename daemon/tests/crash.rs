//! Crashes at each named point of the commit and write-back paths (the
//! `fail` crate's failpoints make cairnd SIGKILL itself there), plus real
//! `kill -9`s in the middle of a commit. After a restart every acknowledged
//! shard restores byte-identical and no partial shard is listed.

mod common;

use std::time::Duration;

use cairn_proto::v1 as pb;
use common::*;

async fn listed_steps(c: &mut cairn_daemon::client::Clients, job: &str) -> Vec<u64> {
    job_steps(c, job).await.iter().map(|s| s.step).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_commit_point_loses_nothing_acknowledged() {
    let acknowledged = bytes(1, 300_000);
    let in_flight = bytes(2, 500_000);
    for (failpoint, visible_after) in [
        ("commit.before_hash", false),
        ("commit.after_hash", false),
        ("commit.after_manifest", false),
        ("commit.before_ack", true), // renamed into place: complete, just not acknowledged
    ] {
        let mut d = start_daemon(&[]).await;
        let mut c = d.clients().await;
        save(&mut c, shard("crash", 1, 0), &[("w", &acknowledged)])
            .await
            .expect("save step 1");

        d.restart_with_env(&[("FAILPOINTS", &format!("{failpoint}=return"))])
            .await;
        let mut c = d.clients().await;
        let err = save(&mut c, shard("crash", 2, 0), &[("w", &in_flight)])
            .await
            .expect_err(failpoint);
        assert!(
            matches!(
                err.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Internal
                    | tonic::Code::Cancelled
            ),
            "{failpoint}: {err:?}"
        );
        assert!(
            d.wait_exit(Duration::from_secs(10)),
            "{failpoint}: cairnd should have died"
        );

        d.restart().await;
        let mut c = d.clients().await;
        let (_, got) = restore(&mut c, "crash", Some(1), 0)
            .await
            .expect("acknowledged step restores");
        assert_eq!(got["w"], acknowledged, "{failpoint}");
        let steps = listed_steps(&mut c, "crash").await;
        if visible_after {
            assert_eq!(steps, vec![1, 2], "{failpoint}");
            let (_, got) = restore(&mut c, "crash", Some(2), 0)
                .await
                .expect("complete step restores");
            assert_eq!(got["w"], in_flight, "{failpoint}");
        } else {
            assert_eq!(steps, vec![1], "{failpoint}: no partial shard is listed");
            // The client retries and succeeds.
            save(&mut c, shard("crash", 2, 0), &[("w", &in_flight)])
                .await
                .expect("retry");
        }
        assert!(
            files_under(&d.memory_dir.join("staging")).is_empty(),
            "{failpoint}: staging cleaned"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_write_back_resumes_after_restart() {
    for failpoint in ["writeback.before_manifest", "writeback.after_manifest"] {
        let mut d =
            start_daemon_with_env(&[], &[("FAILPOINTS", &format!("{failpoint}=return"))]).await;
        let mut c = d.clients().await;
        let data = bytes(3, 40 * TEST_CHUNK as usize + 17);
        save(&mut c, shard("wb", 1, 0), &[("w", &data)])
            .await
            .expect("acknowledged");
        assert!(
            d.wait_exit(Duration::from_secs(10)),
            "{failpoint}: cairnd should have died in write-back"
        );

        d.restart().await;
        let mut c = d.clients().await;
        wait_disk(&mut c, "wb", 1).await;
        // Prove the disk copy is complete on its own: lose the memory tier.
        d.kill();
        std::fs::remove_dir_all(&d.memory_dir).expect("wipe memory");
        d.restart().await;
        let mut c = d.clients().await;
        let (resp, got) = restore(&mut c, "wb", Some(1), 0)
            .await
            .expect("restore from disk");
        assert_eq!(got["w"], data, "{failpoint}");
        assert_eq!(source_bytes(&resp, pb::Tier::Disk), data.len() as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_a_commit() {
    let mut d = start_daemon(&[]).await;
    let mut c = d.clients().await;
    let first = bytes(5, 1_000_000);
    save(&mut c, shard("kill", 1, 0), &[("w", &first)])
        .await
        .expect("save step 1");
    let big = bytes(6, 96 << 20); // 1,536 chunks: the commit takes a while
    for (attempt, delay_ms) in [0u64, 5, 20, 60].into_iter().enumerate() {
        let step = 10 + attempt as u64;
        let mut c = d.clients().await;
        let begin = c
            .checkpoint
            .begin_shard(begin_request(shard("kill", step, 0), &[("w", &big)]))
            .await
            .expect("begin")
            .into_inner();
        write_staged(&begin, &[("w", &big)]);
        let commit = tokio::spawn(async move {
            c.checkpoint
                .commit_shard(pb::CommitShardRequest {
                    session_id: begin.session_id,
                })
                .await
        });
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        d.kill();
        let acked = matches!(commit.await, Ok(Ok(_)));
        d.restart().await;
        let mut c = d.clients().await;
        let steps = listed_steps(&mut c, "kill").await;
        if acked {
            assert!(steps.contains(&step), "an acknowledged commit must survive");
        }
        if steps.contains(&step) {
            let (_, got) = restore(&mut c, "kill", Some(step), 0)
                .await
                .expect("listed step restores");
            assert!(got["w"] == big, "a listed step must restore byte-identical");
        }
        let (_, got) = restore(&mut c, "kill", Some(1), 0)
            .await
            .expect("step 1 restores");
        assert_eq!(got["w"], first);
        assert!(
            files_under(&d.memory_dir.join("staging")).is_empty(),
            "staging cleaned at start"
        );
    }
}
