//! "latest" over randomized jobs: whatever mix of complete and incomplete
//! steps a job has, in whatever order they were saved and in whichever tier
//! their shards ended up, `RestoreShard(step = latest)` and `ListSteps`'s
//! `restorable` pick the highest step that every rank completed (numerically:
//! 100 beats 99 and 1000, never lexical order or save time).

mod common;

use std::collections::BTreeSet;

use cairn_proto::v1 as pb;
use common::{
    Daemon, begin_request, job_steps, restore, shard, start_daemon, wait_durable, write_staged,
};

const WORLD: u32 = 3;
/// Step numbers whose lexical order differs from their numeric order.
const STEPS: [u64; 10] = [2, 3, 9, 10, 11, 20, 99, 100, 101, 1000];

/// A small deterministic generator (xorshift), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Saves a random subset of (step, rank) in a random order; returns what
/// was saved.
async fn save_random_job(d: &Daemon, job: &str, rng: &mut Rng) -> BTreeSet<(u64, u32)> {
    let mut c = d.clients().await;
    let mut wanted: Vec<(u64, u32)> = STEPS
        .iter()
        .flat_map(|&s| (0..WORLD).map(move |r| (s, r)))
        .filter(|_| rng.next() % 10 < 7)
        .collect();
    for i in (1..wanted.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        wanted.swap(i, j);
    }
    for &(step, rank) in &wanted {
        let data = format!("{job}/{step}/{rank}").into_bytes();
        let mut request = begin_request(shard(job, step, rank), &[("x", &data)]);
        request.world_size = Some(WORLD);
        let begin = c
            .checkpoint
            .begin_shard(request)
            .await
            .expect("begin")
            .into_inner();
        write_staged(&begin, &[("x", &data)]);
        c.checkpoint
            .commit_shard(pb::CommitShardRequest {
                session_id: begin.session_id,
            })
            .await
            .expect("commit");
    }
    wanted.into_iter().collect()
}

fn expected_latest(saved: &BTreeSet<(u64, u32)>) -> Option<u64> {
    STEPS
        .iter()
        .copied()
        .filter(|&s| (0..WORLD).all(|r| saved.contains(&(s, r))))
        .max()
}

async fn check_latest(d: &Daemon, job: &str, saved: &BTreeSet<(u64, u32)>) {
    let expected = expected_latest(saved);
    let mut c = d.clients().await;
    for rank in 0..WORLD {
        match (restore(&mut c, job, None, rank).await, expected) {
            (Ok((response, files)), Some(step)) => {
                let got = response
                    .manifest
                    .and_then(|m| m.shard)
                    .map(|s| s.step)
                    .expect("manifest");
                assert_eq!(got, step, "job {job} rank {rank}; saved {saved:?}");
                assert_eq!(files["x"], format!("{job}/{step}/{rank}").into_bytes());
            }
            (Err(e), None) => assert_eq!(e.code(), tonic::Code::NotFound, "{e}"),
            (got, want) => panic!(
                "job {job} rank {rank}: got {:?}, wanted step {want:?}; saved {saved:?}",
                got.map(|(r, _)| r.manifest.and_then(|m| m.shard))
            ),
        }
    }
    let restorable = job_steps(&mut c, job)
        .await
        .iter()
        .filter(|s| s.restorable)
        .map(|s| s.step)
        .max();
    assert_eq!(restorable, expected, "ListSteps agrees; saved {saved:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_is_the_highest_step_every_rank_completed_in_any_tier() {
    // Memory keeps two steps per job, so most shards are on disk only.
    let d = start_daemon(&["--memory-keep-last", "2", "--disk-keep-last", "100"]).await;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..6 {
        let job = format!("rand-{round}");
        let saved = save_random_job(&d, &job, &mut rng).await;
        check_latest(&d, &job, &saved).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_counts_steps_only_the_bucket_still_holds() {
    let bucket = tempfile::tempdir().expect("bucket dir");
    let config = bucket.path().join("cairnd.toml");
    let url = format!("file://{}", bucket.path().join("b").display());
    std::fs::create_dir_all(bucket.path().join("b")).expect("bucket");
    std::fs::write(
        &config,
        format!("[object_store]\nurl = \"{url}\"\nupload_after = \"commit\"\nkeep_last = 100\n"),
    )
    .expect("config");
    let mut d = start_daemon(&[
        "--config",
        config.to_str().expect("utf-8"),
        "--memory-keep-last",
        "100",
        "--disk-keep-last",
        "100",
    ])
    .await;
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut jobs = Vec::new();
    for round in 0..3 {
        let job = format!("bucket-{round}");
        let saved = save_random_job(&d, &job, &mut rng).await;
        let mut c = d.clients().await;
        for step in saved.iter().map(|(s, _)| *s).collect::<BTreeSet<_>>() {
            wait_durable(&mut c, &job, step, pb::Tier::ObjectStore, 30_000)
                .await
                .expect("uploaded");
        }
        jobs.push((job, saved));
    }
    // A replacement node: empty memory and disk, the same bucket.
    d.kill();
    for dir in [&d.memory_dir, &d.disk_dir] {
        let _ = std::fs::remove_dir_all(dir);
    }
    d.restart().await;
    for (job, saved) in &jobs {
        check_latest(&d, job, saved).await;
    }
}
