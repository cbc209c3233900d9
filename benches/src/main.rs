//! `cairn-bench`: Cairn's figures, each as a ratio against a baseline
//! measured in the same run on the same bytes.
//!
//! | figure | Cairn | baseline |
//! |---|---|---|
//! | save stall | BeginShard + one `pwrite` per tensor into the staged files | `write()` of the same bytes into a new tmpfs file |
//! | commit hashing | CommitShard (mmap + BLAKE3 on all cores) | single-thread BLAKE3 over the same buffer |
//! | write-back to disk | from CommitShard's return to `WaitDurable(Disk)` | `write()` of the same bytes into a new file on the same disk + one `fsync` |
//! | restore from memory | RestoreShard (verifying every chunk) + `read()` of the files | `read()` of the same files |
//! | restore from disk | RestoreShard refilling memory from disk (verified) + `read()` | `read()` of a file of the same size on the same disk |
//!
//! Each figure also states its CPU cost, CPU seconds per GiB (user +
//! system, from `/proc/PID/stat`): of `cairnd` and this process together
//! for Cairn (this process does a save's `pwrite`s and a restore's
//! `read()`s), of this process for the baselines. Unlike the throughput it
//! stays meaningful on a noisy shared machine.
//!
//! Usage: `cairn-bench [--quick] [--size-mib N]`; run it through
//! `./scripts/bench`, which builds cairnd first.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::Result;
use cairn_bench::{
    CpuMeter, Row, TENSORS, gbps, make_tensors, median, per_gib, report, restore, stage,
    start_daemon, tempdir,
};
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

/// Drops the page cache so disk reads hit the disk; needs root. Returns
/// whether it worked.
fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Seconds and CPU seconds of each run of one figure.
#[derive(Default)]
struct Samples {
    secs: Vec<f64>,
    cpu: Vec<f64>,
}

impl Samples {
    fn push(&mut self, secs: f64, cpu: f64) {
        self.secs.push(secs);
        self.cpu.push(cpu);
    }

    /// The median seconds.
    fn secs(&self) -> f64 {
        median(self.secs.clone())
    }

    /// The median CPU seconds.
    fn cpu(&self) -> f64 {
        median(self.cpu.clone())
    }
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let size_mib = args.size_mib.unwrap_or(if args.quick { 128 } else { 2048 });
    let repeat = args.repeat.unwrap_or(if args.quick { 2 } else { 5 });
    let total = size_mib << 20;
    // Removed when they go out of scope, early errors included.
    let work_dir = tempdir("/tmp", "cairn-bench")?;
    let shm_dir = tempdir("/dev/shm", "cairn-bench")?;
    let (work, shm) = (work_dir.path(), shm_dir.path());
    let memory_dir = shm.join("t0");
    let mut daemon = start_daemon(work, &memory_dir, &[]).await?;
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
    // Seconds, and CPU seconds (cairnd + this process for Cairn, this
    // process for the baselines), per run.
    let (mut stall, mut commit, mut plain_write) = <(Samples, Samples, Samples)>::default();
    let (mut writeback, mut disk_write) = <(Samples, Samples)>::default();
    for i in 0..repeat {
        // Baseline: write() into a new tmpfs file.
        let path = shm.join(format!("baseline-{i}"));
        let cpu = CpuMeter::this()?;
        let t = Instant::now();
        let mut f = std::fs::File::create(&path)?;
        for tensor in &tensors {
            f.write_all(tensor)?;
        }
        drop(f);
        plain_write.push(t.elapsed().as_secs_f64(), cpu.stop_total()?);
        std::fs::remove_file(&path)?;

        // Baseline of the write-back: write() into a new file beside the
        // disk tier (the same file system), then one fsync.
        let path = work.join(format!("baseline-writeback-{i}"));
        let cpu = CpuMeter::this()?;
        let t = Instant::now();
        let mut f = std::fs::File::create(&path)?;
        for tensor in &tensors {
            f.write_all(tensor)?;
        }
        f.sync_all()?;
        drop(f);
        disk_write.push(t.elapsed().as_secs_f64(), cpu.stop_total()?);
        std::fs::remove_file(&path)?;

        // Cairn: begin, one pwrite per tensor into the staged files, commit.
        let cpu = CpuMeter::daemon_and_this(&daemon)?;
        let t = Instant::now();
        let session_id = stage(&mut c, "bench", i as u64, &tensors).await?;
        stall.push(t.elapsed().as_secs_f64(), cpu.stop_total()?);
        let cpu = CpuMeter::daemon_and_this(&daemon)?;
        let t = Instant::now();
        c.checkpoint
            .commit_shard(pb::CommitShardRequest { session_id })
            .await?;
        commit.push(t.elapsed().as_secs_f64(), cpu.stop_total()?);
        // Write-back: from the commit's return until the step is durable on
        // disk. Waiting for it also keeps it from stealing the next run's
        // cores.
        let cpu = CpuMeter::daemon_and_this(&daemon)?;
        let t = Instant::now();
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
        writeback.push(t.elapsed().as_secs_f64(), cpu.stop_total()?);
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
    let cpu_per_gib = |samples: &Samples| Some(per_gib(samples.cpu(), total));
    rows.push(Row {
        figure: "save stall (begin + pwrite)",
        cairn: gbps(total, stall.secs()),
        baseline: gbps(total, plain_write.secs()),
        baseline_name: "write() to new tmpfs file",
        ratio: stall.secs() / plain_write.secs(),
        goal: "time ratio <= 1.2",
        cairn_cpu: cpu_per_gib(&stall),
        baseline_cpu: cpu_per_gib(&plain_write),
    });

    let mut blake_single = Samples::default();
    for _ in 0..repeat {
        let cpu = CpuMeter::this()?;
        let t = Instant::now();
        for tensor in &tensors {
            for chunk in tensor.chunks(4 << 20) {
                std::hint::black_box(blake3::hash(chunk));
            }
        }
        blake_single.push(t.elapsed().as_secs_f64(), cpu.stop_total()?);
    }
    rows.push(Row {
        figure: "commit hashing",
        cairn: gbps(total, commit.secs()),
        baseline: gbps(total, blake_single.secs()),
        baseline_name: "BLAKE3, one thread",
        ratio: blake_single.secs() / commit.secs(),
        goal: "throughput ratio >= 0.9",
        cairn_cpu: cpu_per_gib(&commit),
        baseline_cpu: cpu_per_gib(&blake_single),
    });
    rows.push(Row {
        figure: "write-back to disk (commit to durable on disk)",
        cairn: gbps(total, writeback.secs()),
        baseline: gbps(total, disk_write.secs()),
        baseline_name: "write() to a new file on the same disk + fsync",
        ratio: writeback.secs() / disk_write.secs(),
        goal: "time ratio (report)",
        cairn_cpu: cpu_per_gib(&writeback),
        baseline_cpu: cpu_per_gib(&disk_write),
    });

    // ----- restore from memory ---------------------------------------------
    let mut buf = vec![0u8; 8 << 20];
    let (mut restore_t0, mut read_t0) = (Samples::default(), Samples::default());
    for _ in 0..repeat {
        let cpu = CpuMeter::daemon_and_this(&daemon)?;
        let t = Instant::now();
        let resp = restore(&mut c, "bench", last_step).await?;
        let paths: Vec<PathBuf> = resp.files.iter().map(|f| PathBuf::from(&f.path)).collect();
        read_files(&paths, &mut buf)?;
        restore_t0.push(t.elapsed().as_secs_f64(), cpu.stop_total()?);
        let cpu = CpuMeter::this()?;
        let t = Instant::now();
        read_files(&paths, &mut buf)?;
        read_t0.push(t.elapsed().as_secs_f64(), cpu.stop_total()?);
    }
    rows.push(Row {
        figure: "restore from memory (verified)",
        cairn: gbps(total, restore_t0.secs()),
        baseline: gbps(total, read_t0.secs()),
        baseline_name: "read() of the same files",
        ratio: restore_t0.secs() / read_t0.secs(),
        goal: "time ratio (report)",
        cairn_cpu: cpu_per_gib(&restore_t0),
        baseline_cpu: cpu_per_gib(&read_t0),
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
    let (mut restore_t1, mut read_t1) = (Samples::default(), Samples::default());
    let mut cold = true;
    for _ in 0..repeat {
        // Lose the memory tier, as after a node reboot.
        daemon.kill();
        std::fs::remove_dir_all(&memory_dir)?;
        daemon = start_daemon(work, &memory_dir, &[]).await?;
        c = daemon.connect().await?;
        cold &= drop_caches();
        let cpu = CpuMeter::daemon_and_this(&daemon)?;
        let t = Instant::now();
        let resp = restore(&mut c, "bench", last_step).await?;
        let paths: Vec<PathBuf> = resp.files.iter().map(|f| PathBuf::from(&f.path)).collect();
        read_files(&paths, &mut buf)?;
        restore_t1.push(t.elapsed().as_secs_f64(), cpu.stop_total()?);
        cold &= drop_caches();
        let cpu = CpuMeter::this()?;
        let t = Instant::now();
        read_files(std::slice::from_ref(&baseline_file), &mut buf)?;
        read_t1.push(t.elapsed().as_secs_f64(), cpu.stop_total()?);
    }
    rows.push(Row {
        figure: "restore from disk (verified)",
        cairn: gbps(total, restore_t1.secs()),
        baseline: gbps(total, read_t1.secs()),
        baseline_name: if cold {
            "read() of a disk file, cold cache"
        } else {
            "read() of a disk file, warm cache"
        },
        ratio: restore_t1.secs() / read_t1.secs(),
        goal: "time ratio (report)",
        cairn_cpu: cpu_per_gib(&restore_t1),
        baseline_cpu: cpu_per_gib(&read_t1),
    });

    report("cairn-bench", total, &rows)?;
    println!();
    println!(
        "commit latency {:.0} ms for {} MiB; save stall {:.0} ms vs plain write {:.0} ms; \
         write-back {:.0} ms vs write + fsync {:.0} ms",
        commit.secs() * 1e3,
        size_mib,
        stall.secs() * 1e3,
        plain_write.secs() * 1e3,
        writeback.secs() * 1e3,
        disk_write.secs() * 1e3
    );
    println!(
        "CPU s/GiB: cairnd + this process for Cairn, this process for the baselines \
         (user + system, median of the runs)"
    );
    drop(daemon);
    Ok(())
}
