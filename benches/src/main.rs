//! `cairn-bench`: Cairn's figures, each as a ratio against a baseline
//! measured in the same run on the same bytes.
//!
//! | figure | Cairn | baseline |
//! |---|---|---|
//! | save stall | BeginShard + one `pwrite` per tensor into the staged files | `write()` of the same bytes into a new tmpfs file |
//! | commit hashing | CommitShard (mmap + BLAKE3 on all cores) | single-thread BLAKE3 over the same buffer |
//! | restore from memory | RestoreShard (verifying every chunk) + `read()` of the files | `read()` of the same files |
//! | restore from disk | RestoreShard refilling memory from disk (verified) + `read()` | `read()` of a file of the same size on the same disk |
//!
//! Usage: `cairn-bench [--quick] [--size-mib N]`; run it through
//! `./scripts/bench`, which builds cairnd first.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cairn_daemon::client::Clients;
use cairn_proto::v1 as pb;
use clap::Parser;

#[derive(Parser)]
#[command(about = "Cairn benchmarks against same-run baselines")]
struct Args {
    /// Small sizes, few repetitions: a smoke run that finishes in seconds.
    #[arg(long)]
    quick: bool,
    /// Checkpoint size in MiB (default 2048, or 128 with --quick).
    #[arg(long)]
    size_mib: Option<u64>,
    /// Repetitions per figure; the median is reported.
    #[arg(long)]
    repeat: Option<usize>,
}

/// Tensors per shard: a checkpoint is many files, not one.
const TENSORS: usize = 8;

struct Daemon {
    child: Child,
    socket: PathBuf,
    memory_dir: PathBuf,
    disk_dir: PathBuf,
}

impl Daemon {
    fn start(work: &Path, memory_dir: &Path) -> Result<Self> {
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
            .env("CAIRN_LOG", "warn")
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

    async fn connect(&self) -> Result<Clients> {
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

    fn kill(&mut self) {
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
fn make_tensors(total: u64, seed: u64) -> Vec<Vec<u8>> {
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// Drops the page cache so disk reads hit the disk; needs root. Returns
/// whether it worked.
fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn read_files(paths: &[PathBuf], buf: &mut [u8]) -> Result<u64> {
    let mut total = 0;
    for p in paths {
        let mut f = std::fs::File::open(p)?;
        loop {
            let n = f.read(buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    Ok(total)
}

struct Row {
    figure: &'static str,
    cairn: f64,
    baseline: f64,
    baseline_name: &'static str,
    ratio: f64,
    goal: &'static str,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let size_mib = args.size_mib.unwrap_or(if args.quick { 128 } else { 2048 });
    let repeat = args.repeat.unwrap_or(if args.quick { 2 } else { 5 });
    let total = size_mib << 20;
    let work = tempdir("/tmp", "cairn-bench")?;
    let shm = tempdir("/dev/shm", "cairn-bench")?;
    let memory_dir = shm.join("t0");
    let mut daemon = Daemon::start(&work, &memory_dir)?;
    let mut c = daemon.connect().await?;
    let tensors = make_tensors(total, 1);
    println!(
        "cairn-bench: {} MiB checkpoint in {TENSORS} tensors, median of {repeat} runs, {} cores",
        size_mib,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    let mut rows = Vec::new();
    // ----- save stall and commit -------------------------------------------
    let (mut stall, mut commit, mut plain_write) = (vec![], vec![], vec![]);
    for i in 0..repeat {
        // Baseline: write() into a new tmpfs file.
        let path = shm.join(format!("baseline-{i}"));
        let t = Instant::now();
        let mut f = std::fs::File::create(&path)?;
        for tensor in &tensors {
            f.write_all(tensor)?;
        }
        drop(f);
        plain_write.push(t.elapsed().as_secs_f64());
        std::fs::remove_file(&path)?;

        // Cairn: begin, one pwrite per tensor into the staged files, commit.
        let t = Instant::now();
        let begin = c
            .checkpoint
            .begin_shard(pb::BeginShardRequest {
                shard: Some(pb::ShardRef {
                    tenant: String::new(),
                    job: "bench".into(),
                    step: i as u64,
                    rank: 0,
                }),
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
            })
            .await?
            .into_inner();
        for (staged, tensor) in begin.files.iter().zip(&tensors) {
            let f = std::fs::OpenOptions::new().write(true).open(&staged.path)?;
            f.write_all_at(tensor, 0)?;
        }
        stall.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        c.checkpoint
            .commit_shard(pb::CommitShardRequest {
                session_id: begin.session_id,
            })
            .await?;
        commit.push(t.elapsed().as_secs_f64());
        // Let write-back finish so it does not steal the next run's cores.
        c.checkpoint
            .wait_durable(pb::WaitDurableRequest {
                tenant: String::new(),
                job: "bench".into(),
                step: i as u64,
                rank: None,
                tier: pb::Tier::Disk as i32,
                timeout_ms: 600_000,
            })
            .await?;
        // Keep memory use flat across runs: only the last step stays (the
        // restore figures use it).
        if i + 1 < repeat {
            c.checkpoint
                .delete_step(pb::DeleteStepRequest {
                    tenant: String::new(),
                    job: "bench".into(),
                    step: i as u64,
                })
                .await?;
        }
    }
    let last_step = repeat as u64 - 1;
    let (stall, plain_write) = (median(stall), median(plain_write));
    rows.push(Row {
        figure: "save stall (begin + pwrite)",
        cairn: gbps(total, stall),
        baseline: gbps(total, plain_write),
        baseline_name: "write() to new tmpfs file",
        ratio: stall / plain_write,
        goal: "time ratio <= 1.2",
    });

    let blake_single = {
        let mut times = vec![];
        for _ in 0..repeat {
            let t = Instant::now();
            for tensor in &tensors {
                for chunk in tensor.chunks(4 << 20) {
                    std::hint::black_box(blake3::hash(chunk));
                }
            }
            times.push(t.elapsed().as_secs_f64());
        }
        median(times)
    };
    let commit = median(commit);
    rows.push(Row {
        figure: "commit hashing",
        cairn: gbps(total, commit),
        baseline: gbps(total, blake_single),
        baseline_name: "BLAKE3, one thread",
        ratio: blake_single / commit,
        goal: "throughput ratio >= 0.9",
    });

    // ----- restore from memory ---------------------------------------------
    let mut buf = vec![0u8; 8 << 20];
    let (mut restore_t0, mut read_t0) = (vec![], vec![]);
    for _ in 0..repeat {
        let t = Instant::now();
        let resp = restore(&mut c, last_step).await?;
        let paths: Vec<PathBuf> = resp.files.iter().map(|f| PathBuf::from(&f.path)).collect();
        read_files(&paths, &mut buf)?;
        restore_t0.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        read_files(&paths, &mut buf)?;
        read_t0.push(t.elapsed().as_secs_f64());
    }
    let (restore_t0, read_t0) = (median(restore_t0), median(read_t0));
    rows.push(Row {
        figure: "restore from memory (verified)",
        cairn: gbps(total, restore_t0),
        baseline: gbps(total, read_t0),
        baseline_name: "read() of the same files",
        ratio: restore_t0 / read_t0,
        goal: "time ratio (report)",
    });

    // ----- restore from disk -----------------------------------------------
    let baseline_file = daemon.disk_dir.join("baseline.bin");
    {
        let mut f = std::fs::File::create(&baseline_file)?;
        for tensor in &tensors {
            f.write_all(tensor)?;
        }
        f.sync_all()?;
    }
    let (mut restore_t1, mut read_t1) = (vec![], vec![]);
    let mut cold = true;
    for _ in 0..repeat {
        // Lose the memory tier, as after a node reboot.
        daemon.kill();
        std::fs::remove_dir_all(&memory_dir)?;
        daemon = Daemon::start(&work, &memory_dir)?;
        c = daemon.connect().await?;
        cold &= drop_caches();
        let t = Instant::now();
        let resp = restore(&mut c, last_step).await?;
        let paths: Vec<PathBuf> = resp.files.iter().map(|f| PathBuf::from(&f.path)).collect();
        read_files(&paths, &mut buf)?;
        restore_t1.push(t.elapsed().as_secs_f64());
        cold &= drop_caches();
        let t = Instant::now();
        read_files(std::slice::from_ref(&baseline_file), &mut buf)?;
        read_t1.push(t.elapsed().as_secs_f64());
    }
    let (restore_t1, read_t1) = (median(restore_t1), median(read_t1));
    rows.push(Row {
        figure: "restore from disk (verified)",
        cairn: gbps(total, restore_t1),
        baseline: gbps(total, read_t1),
        baseline_name: if cold {
            "read() of a disk file, cold cache"
        } else {
            "read() of a disk file, warm cache"
        },
        ratio: restore_t1 / read_t1,
        goal: "time ratio (report)",
    });

    println!();
    println!("| figure | cairn GB/s | baseline GB/s | baseline | ratio | goal |");
    println!("|---|---:|---:|---|---:|---|");
    for r in &rows {
        println!(
            "| {} | {:.2} | {:.2} | {} | {:.2} | {} |",
            r.figure, r.cairn, r.baseline, r.baseline_name, r.ratio, r.goal
        );
    }
    println!();
    println!(
        "commit latency {:.0} ms for {} MiB; save stall {:.0} ms vs plain write {:.0} ms",
        commit * 1e3,
        size_mib,
        stall * 1e3,
        plain_write * 1e3
    );
    drop(daemon);
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&shm);
    Ok(())
}

async fn restore(c: &mut Clients, step: u64) -> Result<pb::RestoreShardResponse> {
    Ok(c.checkpoint
        .restore_shard(pb::RestoreShardRequest {
            shard: Some(pb::ShardSelector {
                tenant: String::new(),
                job: "bench".into(),
                step: Some(step),
                rank: 0,
            }),
            skip_verify: false,
        })
        .await?
        .into_inner())
}

fn tempdir(parent: &str, prefix: &str) -> Result<PathBuf> {
    let path = PathBuf::from(parent).join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(path)
}
