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

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::Result;
use cairn_bench::{
    Row, TENSORS, gbps, make_tensors, median, report, restore, stage, start_daemon, tempdir,
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
    let work = tempdir("/tmp", "cairn-bench")?;
    let shm = tempdir("/dev/shm", "cairn-bench")?;
    let memory_dir = shm.join("t0");
    let mut daemon = start_daemon(&work, &memory_dir, &[]).await?;
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
        let session_id = stage(&mut c, "bench", i as u64, &tensors).await?;
        stall.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        c.checkpoint
            .commit_shard(pb::CommitShardRequest { session_id })
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
        let resp = restore(&mut c, "bench", last_step).await?;
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
        daemon = start_daemon(&work, &memory_dir, &[]).await?;
        c = daemon.connect().await?;
        cold &= drop_caches();
        let t = Instant::now();
        let resp = restore(&mut c, "bench", last_step).await?;
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

    report("cairn-bench", total, &rows)?;
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
