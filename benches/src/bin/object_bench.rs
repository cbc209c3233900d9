//! `object-bench`: the object-store tier against a real S3 server (SeaweedFS
//! `weed mini`, started here on loopback), with the AWS CLI on the same
//! server and the same bytes as the baseline:
//!
//! | figure | Cairn | baseline |
//! |---|---|---|
//! | upload | commit → durable in the bucket (chunks, manifest, marker) | `aws s3 cp --recursive` of the same files from tmpfs |
//! | incremental step | the next step with 90% of its chunks unchanged | the full step's upload |
//! | restore from the bucket | RestoreShard on an empty node (verified, into tmpfs) | `aws s3 cp --recursive` download into tmpfs |
//!
//! Each figure also states its CPU cost, CPU seconds per GiB (user +
//! system): of `cairnd` and this process together for Cairn, of the AWS CLI
//! (and this process, waiting for it) for the baselines. The S3 server's
//! own CPU is in neither.
//!
//! plus the codec's compression ratio and speed on bf16- and fp32-like
//! weights. Usage: `object-bench [--quick] [--size-mib N]`, through
//! `./scripts/bench` (which installs the servers with
//! `./scripts/install-test-servers`).

use std::time::Instant;

use anyhow::{Context, Result, bail};
use cairn_bench::{
    CpuMeter, Process, Row, TENSORS, gbps, make_tensors, median, per_gib, report, restore, save,
    start_daemon, tempdir, wait_durable,
};
use cairn_core::codec::{self, CompressionPolicy};
use cairn_proto::v1 as pb;
use clap::Parser;
use testkit::s3::SeaweedFs;

#[derive(Parser)]
#[command(about = "Object-store tier against SeaweedFS and the AWS CLI")]
struct Args {
    /// Small sizes, one repetition: a smoke run.
    #[arg(long)]
    quick: bool,
    /// Checkpoint size in MiB (default 1024, or 32 with --quick).
    #[arg(long)]
    size_mib: Option<u64>,
    /// Repetitions per figure; the median is reported.
    #[arg(long)]
    repeat: Option<usize>,
}

/// Weights as training leaves them: small values around zero, as bf16
/// (2 bytes) or fp32 (4 bytes), little endian.
fn weights(elements: usize, fp32: bool) -> Vec<u8> {
    let mut state = 0x853c_49e6_748f_ea9bu64;
    let mut out = Vec::with_capacity(elements * 4);
    for _ in 0..elements {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        // Sum of uniforms: roughly normal, sd about 0.02.
        let u = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            + ((state >> 16 & 0xff_ffff) as f32 / (1u64 << 24) as f32 - 0.5);
        let value = u * 0.035;
        if fp32 {
            out.extend_from_slice(&value.to_le_bytes());
        } else {
            out.extend_from_slice(&((value.to_bits() >> 16) as u16).to_le_bytes());
        }
    }
    out
}

fn codec_report() {
    println!();
    println!("| data | shuffle | ratio | compress GB/s (1 thread) | decompress GB/s |");
    println!("|---|---|---:|---:|---:|");
    let policy = CompressionPolicy {
        min_ratio: 1.0,
        ..CompressionPolicy::default()
    };
    for (name, data, width) in [
        ("bf16-like", weights(16 << 20, false), 2u8),
        ("fp32-like", weights(8 << 20, true), 4u8),
    ] {
        for shuffle in [None, Some(width)] {
            let mut stored = 0;
            let t = Instant::now();
            let mut compressed = Vec::new();
            for chunk in data.chunks(4 << 20) {
                let (encoding, body) =
                    codec::compress(chunk, shuffle, &policy).expect("compressible");
                stored += body.len();
                compressed.push((encoding, chunk.len() as u64, body));
            }
            let compress_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            for (encoding, raw_len, body) in &compressed {
                let header = codec::ChunkHeader {
                    encoding: *encoding,
                    raw_len: *raw_len,
                };
                std::hint::black_box(codec::decompress(&header, body).expect("decodes"));
            }
            let decompress_s = t.elapsed().as_secs_f64();
            println!(
                "| {name} | {} | {:.2} | {:.2} | {:.2} |",
                shuffle.map_or("none".to_owned(), |w| format!("{w}-byte planes")),
                data.len() as f64 / stored as f64,
                gbps(data.len() as u64, compress_s),
                gbps(data.len() as u64, decompress_s)
            );
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let size_mib = args.size_mib.unwrap_or(if args.quick { 32 } else { 1024 });
    let repeat = args.repeat.unwrap_or(if args.quick { 1 } else { 3 });
    let total = size_mib << 20;
    // Removed when they go out of scope, early errors included.
    let work_dir = tempdir("/tmp", "cairn-object-bench")?;
    let shm_dir = tempdir("/dev/shm", "cairn-object-bench")?;
    let (work, shm) = (work_dir.path(), shm_dir.path());
    let s3 = SeaweedFs::start()?;
    let config = work.join("cairnd-object.toml");
    std::fs::write(
        &config,
        s3.object_store_config("cairn", "upload_after = \"commit\""),
    )?;
    let config_arg = ["--config", config.to_str().context("utf-8")?];
    println!(
        "object-bench: {size_mib} MiB in {TENSORS} tensors to SeaweedFS on loopback, median of {repeat} runs"
    );

    // The baseline's files: the same bytes, in tmpfs, as `aws s3 cp` reads them.
    let baseline_dir = shm.join("baseline-up");
    std::fs::create_dir_all(&baseline_dir)?;
    let download_dir = shm.join("baseline-down");
    let (mut up, mut up_aws, mut inc, mut down, mut down_aws) =
        (vec![], vec![], vec![], vec![], vec![]);
    // CPU seconds per run, in the same order.
    let (mut up_cpu, mut up_aws_cpu, mut inc_cpu, mut down_cpu, mut down_aws_cpu) =
        (vec![], vec![], vec![], vec![], vec![]);
    // The AWS CLI: a child of this process, waited for before the meter
    // stops; no daemon exits while it runs.
    let aws_meter = || CpuMeter::start(vec![Process::Children, Process::This]);
    for run in 0..repeat {
        let tensors = make_tensors(total, 100 + run as u64);
        for (n, t) in tensors.iter().enumerate() {
            std::fs::write(baseline_dir.join(format!("tensor-{n}")), t)?;
        }
        let prefix = format!("s3://cairn/baseline-{run}/");
        let cpu = aws_meter()?;
        up_aws.push(s3.timed_aws(&[
            "s3",
            "cp",
            "--recursive",
            "--quiet",
            baseline_dir.to_str().context("utf-8")?,
            &prefix,
        ])?);
        up_aws_cpu.push(cpu.stop_total()?);
        std::fs::remove_dir_all(&download_dir).ok();
        let cpu = aws_meter()?;
        down_aws.push(s3.timed_aws(&[
            "s3",
            "cp",
            "--recursive",
            "--quiet",
            &prefix,
            download_dir.to_str().context("utf-8")?,
        ])?);
        down_aws_cpu.push(cpu.stop_total()?);

        let node_dir = work.join(format!("node-{run}"));
        std::fs::create_dir_all(&node_dir)?;
        let daemon = start_daemon(&node_dir, &shm.join(format!("t0-{run}")), &config_arg).await?;
        let mut c = daemon.connect().await?;
        let job = format!("bench-{run}");
        save(&mut c, &job, 1, &tensors).await?;
        let cpu = CpuMeter::daemon_and_this(&daemon)?;
        let t = Instant::now();
        wait_durable(&mut c, &job, 1, pb::Tier::ObjectStore).await?;
        up.push(t.elapsed().as_secs_f64());
        up_cpu.push(cpu.stop_total()?);

        // The next step: one chunk in ten changed (counted over the whole
        // shard, at the default 4 MiB chunk size).
        let mut next = tensors;
        for (i, chunk) in next
            .iter_mut()
            .flat_map(|t| t.chunks_mut(4 << 20))
            .enumerate()
        {
            if i % 10 == 0 {
                chunk[0] ^= 0xff;
            }
        }
        save(&mut c, &job, 2, &next).await?;
        let cpu = CpuMeter::daemon_and_this(&daemon)?;
        let t = Instant::now();
        wait_durable(&mut c, &job, 2, pb::Tier::ObjectStore).await?;
        inc.push(t.elapsed().as_secs_f64());
        inc_cpu.push(cpu.stop_total()?);
        drop(daemon);

        // A brand-new node, with nothing but the bucket.
        let fresh_dir = work.join(format!("fresh-{run}"));
        std::fs::create_dir_all(&fresh_dir)?;
        let fresh = start_daemon(
            &fresh_dir,
            &shm.join(format!("t0-fresh-{run}")),
            &config_arg,
        )
        .await?;
        let mut c = fresh.connect().await?;
        let cpu = CpuMeter::daemon_and_this(&fresh)?;
        let t = Instant::now();
        let resp = restore(&mut c, &job, 1).await?;
        down.push(t.elapsed().as_secs_f64());
        down_cpu.push(cpu.stop_total()?);
        let from_bucket: u64 = resp
            .sources
            .iter()
            .filter(|s| s.tier == pb::Tier::ObjectStore as i32)
            .map(|s| s.bytes)
            .sum();
        if from_bucket != total {
            bail!("restore took {from_bucket} of {total} bytes from the bucket");
        }
    }
    let (up, up_aws, inc, down, down_aws) = (
        median(up),
        median(up_aws),
        median(inc),
        median(down),
        median(down_aws),
    );
    let cpu = |samples: Vec<f64>| Some(per_gib(median(samples), total));
    let (up_cpu, up_aws_cpu, inc_cpu, down_cpu, down_aws_cpu) = (
        cpu(up_cpu),
        cpu(up_aws_cpu),
        cpu(inc_cpu),
        cpu(down_cpu),
        cpu(down_aws_cpu),
    );
    let rows = [
        Row {
            figure: "upload to S3 (commit to durable)",
            cairn: gbps(total, up),
            baseline: gbps(total, up_aws),
            baseline_name: "aws s3 cp --recursive, same bytes",
            ratio: up_aws / up,
            goal: "throughput ratio >= 1.0",
            cairn_cpu: up_cpu,
            baseline_cpu: up_aws_cpu,
        },
        Row {
            figure: "incremental step (90% unchanged)",
            cairn: gbps(total, inc),
            baseline: gbps(total, up),
            baseline_name: "Cairn's full step",
            ratio: up / inc,
            goal: "speed-up >= 5",
            cairn_cpu: inc_cpu,
            baseline_cpu: up_cpu,
        },
        Row {
            figure: "restore from S3 on an empty node (verified)",
            cairn: gbps(total, down),
            baseline: gbps(total, down_aws),
            baseline_name: "aws s3 cp --recursive download",
            ratio: down_aws / down,
            goal: "throughput ratio (report)",
            cairn_cpu: down_cpu,
            baseline_cpu: down_aws_cpu,
        },
    ];
    report("object-bench", total, &rows)?;
    println!(
        "\nCPU s/GiB: cairnd + this process for Cairn (the upload's include the write-back to \
         the disk tier running beside it), the AWS CLI for its baselines; per GiB of the shard \
         (the incremental step's too); the S3 server's own CPU in neither"
    );
    codec_report();
    drop(s3);
    Ok(())
}
