//! `cairn restore`: a shard back into a directory, here or (`--node`) into another node's memory tier.

use super::*;

/// `cairn restore --node`: has another node restore the shard into its
/// memory tier, and says where the bytes came from.
pub(crate) async fn prefetch(
    clients: &mut Clients,
    tenant: &str,
    job: String,
    step: Option<u64>,
    rank: u32,
    node: String,
    json: bool,
) -> Result<(), Failure> {
    let started = Instant::now();
    let bar = progress_bar(0, &format!("restoring on {node}"));
    if json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut events = clients
        .admin
        .prefetch(pb::PrefetchRequest {
            node,
            shard: Some(pb::ShardSelector {
                tenant: tenant.to_owned(),
                job: job.clone(),
                step,
                rank,
            }),
        })
        .await?
        .into_inner();
    let mut done = None;
    while let Some(event) = events.message().await? {
        match event.event {
            Some(pb::prefetch_progress::Event::Progress(p)) => show_restore_progress(&bar, &p),
            Some(pb::prefetch_progress::Event::Done(d)) => done = Some(d),
            None => {}
        }
    }
    bar.finish_and_clear();
    let resp = done.ok_or_else(|| fail(1, "the daemon ended the prefetch without a result"))?;
    let sources = tier_sources(&resp.sources);
    if json {
        println!(
            "{}",
            json!({"node": resp.node, "job": job, "step": resp.step, "rank": rank,
                   "bytes": resp.bytes, "sources": sources_json(&sources),
                   "seconds": started.elapsed().as_secs_f64()})
        );
    } else {
        println!(
            "{} holds step {} of {job} rank {rank} in its memory tier ({}; {:.1} s)",
            resp.node,
            resp.step,
            bytes_from(&sources),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn restore(
    clients: &mut Clients,
    tenant: &str,
    job: String,
    step: Option<u64>,
    rank: u32,
    to: Option<PathBuf>,
    no_verify: bool,
    json: bool,
) -> Result<(), Failure> {
    let started = Instant::now();
    let selector = pb::ShardSelector {
        tenant: tenant.to_owned(),
        job: job.clone(),
        step,
        rank,
    };
    let mut checkpoint = clients.checkpoint.clone();
    let call = checkpoint.restore_shard(pb::RestoreShardRequest {
        shard: Some(selector.clone()),
        skip_verify: no_verify,
    });
    let resp = with_restore_progress(call, &mut clients.admin, &selector, json)
        .await?
        .into_inner();
    let manifest = resp.manifest.clone().unwrap_or_default();
    let restored_step = manifest.shard.as_ref().map(|s| s.step).unwrap_or_default();
    let total: u64 = manifest.files.iter().map(|f| f.size).sum();
    let restore_s = started.elapsed().as_secs_f64();
    if let Some(dir) = &to {
        let bar = progress_bar(total, "copy");
        let local = resp.files.iter().all(|f| Path::new(&f.path).exists());
        if local {
            copy_out(&resp.files, dir, &bar)?;
        } else {
            stream_out(clients, selector, &manifest, dir, &bar).await?;
        }
        bar.finish_and_clear();
    }
    let sources = tier_sources(&resp.sources);
    if json {
        let files: Vec<_> = resp
            .files
            .iter()
            .map(|f| json!({"name": f.name, "path": f.path, "size": f.size}))
            .collect();
        println!(
            "{}",
            json!({"job": job, "step": restored_step, "rank": rank, "bytes": total, "files": files,
                   "sources": sources_json(&sources),
                   "restore_seconds": restore_s, "total_seconds": started.elapsed().as_secs_f64(),
                   "copied_to": to.map(|p| p.display().to_string())})
        );
    } else {
        println!(
            "restored {job} step {restored_step} rank {rank}: {} in {} files ({}) in {restore_s:.2}s",
            human_bytes(total),
            resp.files.len(),
            bytes_from(&sources)
        );
        match &to {
            Some(dir) => println!(
                "copied to {} in {:.2}s",
                dir.display(),
                started.elapsed().as_secs_f64()
            ),
            None => {
                for f in &resp.files {
                    println!("  {}  {}", f.path, human_bytes(f.size));
                }
            }
        }
    }
    Ok(())
}

pub(crate) fn target_path(dir: &Path, name: &str) -> Result<PathBuf, Failure> {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| fail(1, format!("creating {}: {e}", parent.display())))?;
    }
    Ok(path)
}

pub(crate) fn copy_out(
    files: &[pb::RestoredFile],
    dir: &Path,
    bar: &ProgressBar,
) -> Result<(), Failure> {
    let mut buf = vec![0u8; 8 * 1024 * 1024];
    for f in files {
        let mut input = std::fs::File::open(&f.path)
            .map_err(|e| fail(1, format!("opening {}: {e}", f.path)))?;
        let path = target_path(dir, &f.name)?;
        let mut output = std::fs::File::create(&path)
            .map_err(|e| fail(1, format!("creating {}: {e}", path.display())))?;
        loop {
            let n = input.read(&mut buf)?;
            if n == 0 {
                break;
            }
            output.write_all(&buf[..n])?;
            bar.inc(n as u64);
        }
    }
    Ok(())
}

pub(crate) async fn stream_out(
    clients: &mut Clients,
    selector: pb::ShardSelector,
    manifest: &pb::ShardManifest,
    dir: &Path,
    bar: &ProgressBar,
) -> Result<(), Failure> {
    let mut selector = selector;
    selector.step = manifest.shard.as_ref().map(|s| s.step);
    let mut stream = clients
        .checkpoint
        .read_shard(pb::ReadShardRequest {
            shard: Some(selector),
        })
        .await?
        .into_inner();
    let mut outputs = Vec::new();
    for f in &manifest.files {
        let path = target_path(dir, &f.name)?;
        let file = std::fs::File::create(&path)
            .map_err(|e| fail(1, format!("creating {}: {e}", path.display())))?;
        file.set_len(f.size)?;
        outputs.push(file);
    }
    while let Some(msg) = stream.message().await? {
        if let Some(pb::read_shard_response::Msg::Data(d)) = msg.msg {
            let out = outputs.get(d.file_index as usize).ok_or_else(|| {
                fail(
                    1,
                    format!("cairnd sent data for unknown file {}", d.file_index),
                )
            })?;
            out.write_all_at(&d.data, d.offset)?;
            bar.inc(d.data.len() as u64);
        }
    }
    Ok(())
}
