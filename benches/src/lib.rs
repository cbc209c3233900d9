//! Pieces every Cairn benchmark shares: a real `cairnd` to measure, the
//! test data, medians and the results table. Each figure is a ratio against
//! a baseline measured in the same run on the same bytes.

pub mod s3;

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cairn_daemon::client::Clients;
use cairn_proto::v1 as pb;

/// Tensors per shard: a checkpoint is many files, not one.
pub const TENSORS: usize = 8;

/// A `cairnd` started for a benchmark, killed (and its memory tier removed)
/// on drop.
pub struct Daemon {
    child: Child,
    socket: PathBuf,
    memory_dir: PathBuf,
    /// Its disk tier.
    pub disk_dir: PathBuf,
}

impl Daemon {
    /// Starts `cairnd` (next to this binary, or `CAIRND_BIN`) with its socket
    /// and disk tier under `work`, the memory tier at `memory_dir`, retention
    /// loose enough to keep every step a benchmark makes, and `extra_args`.
    pub fn start(work: &Path, memory_dir: &Path, extra_args: &[&str]) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let cairnd = std::env::var_os("CAIRND_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| exe.with_file_name("cairnd"));
        let socket = work.join("cairn.sock");
        let disk_dir = work.join("disk");
        let child = Command::new(&cairnd)
            .arg("--socket")
            .arg(&socket)
            .arg("--memory-dir")
            .arg(memory_dir)
            .arg("--disk-dir")
            .arg(&disk_dir)
            .args([
                "--metrics-addr",
                "off",
                "--memory-keep-last",
                "100",
                "--disk-keep-last",
                "100",
            ])
            .args(extra_args)
            // CAIRN_BENCH_LOG=info shows the daemon's own timings.
            .env(
                "CAIRN_LOG",
                std::env::var("CAIRN_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", cairnd.display()))?;
        Ok(Self {
            child,
            socket,
            memory_dir: memory_dir.to_path_buf(),
            disk_dir,
        })
    }

    /// Connects once the daemon answers.
    pub async fn connect(&self) -> Result<Clients> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = Clients::connect(self.socket.to_str().context("socket path")?).await
                && c.admin.status(pb::StatusRequest {}).await.is_ok()
            {
                return Ok(c);
            }
            if Instant::now() > deadline {
                bail!("cairnd did not start");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, as a node failure would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.memory_dir);
    }
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
    c.checkpoint
        .wait_durable(pb::WaitDurableRequest {
            tenant: String::new(),
            job: job.into(),
            step,
            rank: None,
            tier: tier as i32,
            timeout_ms: 600_000,
        })
        .await?;
    Ok(())
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
