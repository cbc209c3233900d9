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
/// scrub, a metrics endpoint on a free loopback port, retention loose enough to keep every step a
/// benchmark makes, and `extra_args`; waits until it answers. It logs to
/// this process's stderr at `warn` (`CAIRN_BENCH_LOG=info` shows the
/// daemon's own timings). Dropping it kills it.
pub async fn start_daemon(work: &Path, memory_dir: &Path, extra_args: &[&str]) -> Result<Daemon> {
    DaemonOptions::new()
        .work_dir(work)
        .memory_dir(memory_dir)
        .chunk_size(None)
        .scrub_disk(true)
        .metrics_addr("127.0.0.1:0")
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

/// A fresh directory `<parent>/<prefix>-<random>`, removed with everything
/// in it when the returned guard is dropped.
pub fn tempdir(parent: &str, prefix: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("{prefix}-"))
        .tempdir_in(parent)
        .with_context(|| format!("creating a directory in {parent}"))
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
    /// CPU seconds per GiB moved that Cairn's processes used (the daemons
    /// and, where it does part of the work, this process), when measured.
    pub cairn_cpu: Option<f64>,
    /// CPU seconds per GiB the baseline used, when it is a process this
    /// benchmark runs (itself, a child such as the AWS CLI, or Cairn again).
    pub baseline_cpu: Option<f64>,
}

/// Prints `rows` (each measured on `bytes` bytes) as a markdown table and,
/// when `CAIRN_BENCH_RECORD` names a file, appends them to it as JSON lines
/// for `benches/report.py` (`./scripts/bench --report`).
pub fn report(bench: &str, bytes: u64, rows: &[Row]) -> Result<()> {
    print!("{}", table(rows));
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
            "cairn_cpu_s_per_gib": r.cairn_cpu,
            "baseline_cpu_s_per_gib": r.baseline_cpu,
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

/// `rows` as a markdown table (with a blank line before it), as
/// [`report`] prints it.
pub fn table(rows: &[Row]) -> String {
    let cpu = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
    let mut out = String::from(
        "\n| figure | cairn GB/s | baseline GB/s | baseline | ratio | goal \
         | cairn CPU s/GiB | baseline CPU s/GiB |\n\
         |---|---:|---:|---|---:|---|---:|---:|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {:.2} | {:.2} | {} | {:.2} | {} | {} | {} |\n",
            r.figure,
            r.cairn,
            r.baseline,
            r.baseline_name,
            r.ratio,
            r.goal,
            cpu(r.cairn_cpu),
            cpu(r.baseline_cpu)
        ));
    }
    out
}

// ----- CPU cost ------------------------------------------------------------

/// Bytes in a GiB, the unit CPU cost is stated per.
pub const GIB: f64 = (1u64 << 30) as f64;

/// CPU seconds per GiB: `cpu_seconds` spent on `bytes` bytes.
pub fn per_gib(cpu_seconds: f64, bytes: u64) -> f64 {
    cpu_seconds / (bytes as f64 / GIB)
}

/// A process whose CPU time a [`CpuMeter`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Process {
    /// This benchmark process (all its threads).
    This,
    /// The children of this process that have exited and been waited for
    /// (`cutime` + `cstime`): a command such as the AWS CLI, run to
    /// completion between [`CpuMeter::start`] and [`CpuMeter::stop`].
    Children,
    /// Another process, by id: a `cairnd` ([`Daemon::pid`]).
    Pid(u32),
}

impl Process {
    /// `daemon`'s process, or an error when it does not run.
    pub fn daemon(daemon: &Daemon) -> Result<Self> {
        daemon
            .pid()
            .map(Self::Pid)
            .context("the daemon is not running")
    }
}

/// User plus system CPU seconds `process` has used so far, all threads
/// together (`/proc/PID/stat`).
pub fn cpu_seconds(process: Process) -> Result<f64> {
    let path = match process {
        Process::This | Process::Children => "/proc/self/stat".to_owned(),
        Process::Pid(pid) => format!("/proc/{pid}/stat"),
    };
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .with_context(|| format!("the command name in {path}"))?
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i)
            .with_context(|| format!("CPU times in {path}"))?
            .parse::<f64>()?)
    };
    // utime, stime, cutime and cstime are fields 14 to 17; the slice starts
    // at field 3.
    let ticks = match process {
        Process::Children => ticks(13)? + ticks(14)?,
        _ => ticks(11)? + ticks(12)?,
    };
    Ok(ticks / clock_ticks())
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`), 100 if unknown.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds of the processes a timing covers, read before and after
/// (at the kernel's clock tick, 10 ms, per process).
pub struct CpuMeter {
    processes: Vec<Process>,
    start: Vec<f64>,
}

impl CpuMeter {
    /// Reads the CPU time of `processes` now.
    pub fn start(processes: Vec<Process>) -> Result<Self> {
        // Read once first so the clock-tick lookup (a `getconf` child) does
        // not land inside a measurement.
        clock_ticks();
        let start = processes
            .iter()
            .map(|p| cpu_seconds(*p))
            .collect::<Result<_>>()?;
        Ok(Self { processes, start })
    }

    /// `daemon` and this process: a save, where this process writes the
    /// staged files, or a restore, where it reads them.
    pub fn daemon_and_this(daemon: &Daemon) -> Result<Self> {
        Self::start(vec![Process::daemon(daemon)?, Process::This])
    }

    /// This process alone: a baseline it runs itself.
    pub fn this() -> Result<Self> {
        Self::start(vec![Process::This])
    }

    /// CPU seconds each process used since [`start`](Self::start), in the
    /// order given.
    pub fn stop(self) -> Result<Vec<f64>> {
        self.processes
            .iter()
            .zip(self.start)
            .map(|(p, s)| Ok(cpu_seconds(*p)? - s))
            .collect()
    }

    /// CPU seconds all the processes used together since
    /// [`start`](Self::start).
    pub fn stop_total(self) -> Result<f64> {
        Ok(self.stop()?.iter().sum())
    }
}

/// The peak resident set of a process so far, in MiB (`VmHWM` in
/// `/proc/PID/status`).
pub fn peak_rss_mib(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .with_context(|| format!("no VmHWM in {path}"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib / 1024.0)
}
