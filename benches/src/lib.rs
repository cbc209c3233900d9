//! Pieces every Cairn benchmark shares: a real `cairnd` to measure
//! (testkit's harness, with the benchmarks' settings), the test data,
//! medians and the results table. Each figure is a ratio against a baseline
//! measured in the same run on the same bytes.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cairn_daemon::client::Clients;
use cairn_proto::v1 as pb;
pub use testkit::Daemon;
use testkit::DaemonOptions;

/// Tensors per shard: a checkpoint is many files, not one.
pub const TENSORS: usize = 8;

/// Starts `cairnd` (`CAIRND_BIN`, or the one beside this binary) with its
/// socket and disk tier under `work`, the memory tier at `memory_dir`
/// (removed when the daemon is dropped), cairnd's default chunk size and
/// scrub, no metrics endpoint, retention loose enough to keep every step a
/// benchmark makes, and `extra_args`; waits until it answers. It logs to
/// this process's stderr at `warn` (`CAIRN_BENCH_LOG=info` shows the
/// daemon's own timings). Dropping it kills it.
pub async fn start_daemon(work: &Path, memory_dir: &Path, extra_args: &[&str]) -> Result<Daemon> {
    DaemonOptions::new()
        .work_dir(work)
        .memory_dir(memory_dir)
        .chunk_size(None)
        .scrub_disk(true)
        .metrics_addr("off")
        .log_to_stderr()
        .log_filter(&std::env::var("CAIRN_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
        .args(["--memory-keep-last", "100", "--disk-keep-last", "100"])
        .args(extra_args)
        .start()
        .await
}

/// Fast deterministic bytes, distinct per tensor, so nothing dedups.
pub fn make_tensors(total: u64, seed: u64) -> Vec<Vec<u8>> {
    let per = (total / TENSORS as u64) as usize;
    (0..TENSORS)
        .map(|t| {
            let mut state = (seed + t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut v = vec![0u8; per];
            for word in v.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
            v
        })
        .collect()
}

/// Saves `tensors` as one shard of `job` at `step` the way the Python client
/// does: [`stage`], then CommitShard.
pub async fn save(c: &mut Clients, job: &str, step: u64, tensors: &[Vec<u8>]) -> Result<()> {
    let session_id = stage(c, job, step, tensors).await?;
    c.checkpoint
        .commit_shard(pb::CommitShardRequest { session_id })
        .await?;
    Ok(())
}

/// The part of a save the trainer waits for: BeginShard and one `pwrite`
/// per tensor into the staged files. Returns the session to commit.
pub async fn stage(c: &mut Clients, job: &str, step: u64, tensors: &[Vec<u8>]) -> Result<String> {
    let begin = c
        .checkpoint
        .begin_shard(pb::BeginShardRequest {
            shard: Some(shard(job, step)),
            files: tensors
                .iter()
                .enumerate()
                .map(|(n, t)| pb::FileSpec {
                    name: format!("tensor-{n}"),
                    size: t.len() as u64,
                    metadata: HashMap::new(),
                })
                .collect(),
            world_size: Some(1),
            metadata: HashMap::new(),
            attempt: String::new(),
        })
        .await?
        .into_inner();
    for (staged, tensor) in begin.files.iter().zip(tensors) {
        let f = std::fs::OpenOptions::new().write(true).open(&staged.path)?;
        f.write_all_at(tensor, 0)?;
    }
    Ok(begin.session_id)
}

/// Rank 0 of `job` at `step`, in the default tenant.
pub fn shard(job: &str, step: u64) -> pb::ShardRef {
    pb::ShardRef {
        tenant: String::new(),
        job: job.into(),
        step,
        rank: 0,
    }
}

/// Waits until `job` at `step` is durable in `tier`.
pub async fn wait_durable(c: &mut Clients, job: &str, step: u64, tier: pb::Tier) -> Result<()> {
    Ok(testkit::wait_durable(c, job, step, tier, 600_000).await?)
}

/// Restores rank 0 of `job` at `step`.
pub async fn restore(c: &mut Clients, job: &str, step: u64) -> Result<pb::RestoreShardResponse> {
    Ok(c.checkpoint
        .restore_shard(pb::RestoreShardRequest {
            shard: Some(pb::ShardSelector {
                tenant: String::new(),
                job: job.into(),
                step: Some(step),
                rank: 0,
            }),
            skip_verify: false,
        })
        .await?
        .into_inner())
}

/// The median of some timings.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Throughput in GB/s.
pub fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// A fresh directory `<parent>/<prefix>-<pid>`.
pub fn tempdir(parent: &str, prefix: &str) -> Result<PathBuf> {
    let path = PathBuf::from(parent).join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(path)
}

/// One line of a results table.
pub struct Row {
    /// What was measured.
    pub figure: &'static str,
    /// Cairn's throughput, GB/s.
    pub cairn: f64,
    /// The baseline's throughput, GB/s.
    pub baseline: f64,
    /// What the baseline is.
    pub baseline_name: &'static str,
    /// The ratio the goal is stated in.
    pub ratio: f64,
    /// The goal.
    pub goal: &'static str,
}

/// Prints `rows` (each measured on `bytes` bytes) as a markdown table and,
/// when `CAIRN_BENCH_RECORD` names a file, appends them to it as JSON lines
/// for `benches/report.py` (`./scripts/bench --report`).
pub fn report(bench: &str, bytes: u64, rows: &[Row]) -> Result<()> {
    print_table(rows);
    let Some(path) = std::env::var_os("CAIRN_BENCH_RECORD") else {
        return Ok(());
    };
    let mut lines = String::new();
    for r in rows {
        let seconds = |gbps: f64| bytes as f64 / 1e9 / gbps;
        let line = serde_json::json!({
            "bench": bench,
            "figure": r.figure,
            "bytes": bytes,
            "cairn_gbps": r.cairn,
            "baseline_gbps": r.baseline,
            "cairn_seconds": seconds(r.cairn),
            "baseline_seconds": seconds(r.baseline),
            "baseline": r.baseline_name,
            "ratio": r.ratio,
            "goal": r.goal,
        });
        lines.push_str(&format!("{line}\n"));
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, lines.as_bytes()))
        .with_context(|| format!("appending to {}", PathBuf::from(&path).display()))
}

/// Prints rows as a markdown table.
fn print_table(rows: &[Row]) {
    println!();
    println!("| figure | cairn GB/s | baseline GB/s | baseline | ratio | goal |");
    println!("|---|---:|---:|---|---:|---|");
    for r in rows {
        println!(
            "| {} | {:.2} | {:.2} | {} | {:.2} | {} |",
            r.figure, r.cairn, r.baseline, r.baseline_name, r.ratio, r.goal
        );
    }
}
