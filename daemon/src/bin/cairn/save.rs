//! `cairn save`: a directory saved as one shard.

use super::*;

/// Regular files under `dir`, as (relative name, path, size), sorted by name.
pub(crate) fn collect_files(dir: &Path) -> Result<Vec<(String, PathBuf, u64)>, Failure> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries =
            std::fs::read_dir(&d).map_err(|e| fail(2, format!("reading {}: {e}", d.display())))?;
        for entry in entries {
            let entry = entry?;
            let meta = entry.metadata()?;
            let path = entry.path();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let rel = path
                    .strip_prefix(dir)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, path, meta.len()));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn save(
    clients: &mut Clients,
    tenant: &str,
    job: String,
    step: u64,
    rank: u32,
    world_size: Option<u32>,
    dir: &Path,
    json: bool,
) -> Result<(), Failure> {
    let files = collect_files(dir)?;
    let total: u64 = files.iter().map(|f| f.2).sum();
    let started = Instant::now();
    let begin = clients
        .checkpoint
        .begin_shard(pb::BeginShardRequest {
            shard: Some(pb::ShardRef {
                tenant: tenant.to_owned(),
                job: job.clone(),
                step,
                rank,
            }),
            files: files
                .iter()
                .map(|(name, _, size)| pb::FileSpec {
                    name: name.clone(),
                    size: *size,
                    metadata: HashMap::new(),
                })
                .collect(),
            world_size,
            metadata: HashMap::new(),
            attempt: String::new(),
        })
        .await?
        .into_inner();
    let bar = progress_bar(total, "save");
    let copied = copy_into_staged(&files, &begin.files, &bar);
    bar.finish_and_clear();
    let written = Instant::now();
    if let Err(e) = copied {
        let _ = clients
            .checkpoint
            .abort_shard(pb::AbortShardRequest {
                session_id: begin.session_id,
            })
            .await;
        return Err(e);
    }
    let commit = clients
        .checkpoint
        .commit_shard(pb::CommitShardRequest {
            session_id: begin.session_id,
        })
        .await?
        .into_inner();
    let info = commit.shard.unwrap_or_default();
    let (write_s, total_s) = (
        (written - started).as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );
    if json {
        println!(
            "{}",
            json!({"job": job, "step": step, "rank": rank, "bytes": info.total_bytes, "files": info.file_count,
                   "chunks": info.chunk_count, "write_seconds": write_s, "total_seconds": total_s})
        );
    } else {
        println!(
            "saved {job} step {step} rank {rank}: {} in {} files, {} chunks; wrote in {write_s:.2}s, committed after {total_s:.2}s",
            human_bytes(info.total_bytes),
            info.file_count,
            info.chunk_count
        );
    }
    Ok(())
}

/// Copies each source file into its staged file with `pwrite`, reusing one
/// buffer.
pub(crate) fn copy_into_staged(
    files: &[(String, PathBuf, u64)],
    staged: &[pb::StagedFile],
    bar: &ProgressBar,
) -> Result<(), Failure> {
    let mut buf = vec![0u8; 8 * 1024 * 1024];
    for ((name, src, _), dst) in files.iter().zip(staged) {
        let mut input = std::fs::File::open(src)
            .map_err(|e| fail(1, format!("opening {}: {e}", src.display())))?;
        let output = std::fs::OpenOptions::new()
            .write(true)
            .open(&dst.path)
            .map_err(|e| {
                fail(
                    1,
                    format!("opening staged file for {name} at {}: {e}", dst.path),
                )
            })?;
        let mut offset = 0u64;
        loop {
            let n = input.read(&mut buf)?;
            if n == 0 {
                break;
            }
            output.write_all_at(&buf[..n], offset)?;
            offset += n as u64;
            bar.inc(n as u64);
        }
    }
    Ok(())
}
