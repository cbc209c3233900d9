//! The requests and calls the tests make to a daemon, in the default tenant
//! (the one a client's socket acts for when a request names none) unless a
//! function takes a tenant.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

use cairn_daemon::client::Clients;
use cairn_proto::v1 as pb;

/// `job`'s `rank` at `step`.
pub fn shard(job: &str, step: u64, rank: u32) -> pb::ShardRef {
    pb::ShardRef {
        tenant: String::new(),
        job: job.into(),
        step,
        rank,
    }
}

/// `job`'s `rank` at `step`, or at the newest restorable step when `None`.
pub fn selector(job: &str, step: Option<u64>, rank: u32) -> pb::ShardSelector {
    pb::ShardSelector {
        tenant: String::new(),
        job: job.into(),
        step,
        rank,
    }
}

/// BeginShard for `files` (name, bytes), each with `dtype: uint8`.
pub fn begin_request(shard: pb::ShardRef, files: &[(&str, &[u8])]) -> pb::BeginShardRequest {
    pb::BeginShardRequest {
        shard: Some(shard),
        files: files
            .iter()
            .map(|(name, data)| pb::FileSpec {
                name: name.to_string(),
                size: data.len() as u64,
                metadata: HashMap::from([("dtype".to_string(), "uint8".to_string())]),
            })
            .collect(),
        world_size: None,
        metadata: HashMap::new(),
        attempt: String::new(),
    }
}

/// Writes staged files the way a client does: pwrite into the pre-sized file.
pub fn write_staged(resp: &pb::BeginShardResponse, files: &[(&str, &[u8])]) {
    for (staged, (_, data)) in resp.files.iter().zip(files) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&staged.path)
            .expect("open staged");
        f.write_all_at(data, 0).expect("pwrite");
    }
}

/// The fast path: begin, write, commit.
pub async fn save(
    c: &mut Clients,
    shard: pb::ShardRef,
    files: &[(&str, &[u8])],
) -> Result<pb::ShardInfo, tonic::Status> {
    save_in_volume(c, shard, files, None).await
}

/// The fast path through a CSI volume's socket when `volume` (its `data/`)
/// is given: the staged files are then inside the volume and named relative
/// to it, as a pod sees them.
pub async fn save_in_volume(
    c: &mut Clients,
    shard: pb::ShardRef,
    files: &[(&str, &[u8])],
    volume: Option<&Path>,
) -> Result<pb::ShardInfo, tonic::Status> {
    let mut begin = c
        .checkpoint
        .begin_shard(begin_request(shard, files))
        .await?
        .into_inner();
    if let Some(volume) = volume {
        for staged in &mut begin.files {
            assert!(
                staged.path.starts_with(".cairn/sessions/"),
                "a volume's files are staged inside it: {}",
                staged.path
            );
            staged.path = volume.join(&staged.path).to_string_lossy().into_owned();
        }
    }
    write_staged(&begin, files);
    let commit = c
        .checkpoint
        .commit_shard(pb::CommitShardRequest {
            session_id: begin.session_id,
        })
        .await?
        .into_inner();
    Ok(commit.shard.expect("shard info"))
}

/// Restores and reads every file back, by name.
pub async fn restore(
    c: &mut Clients,
    job: &str,
    step: Option<u64>,
    rank: u32,
) -> Result<(pb::RestoreShardResponse, HashMap<String, Vec<u8>>), tonic::Status> {
    let resp = c
        .checkpoint
        .restore_shard(pb::RestoreShardRequest {
            shard: Some(selector(job, step, rank)),
            skip_verify: false,
        })
        .await?
        .into_inner();
    let files = resp
        .files
        .iter()
        .map(|f| {
            (
                f.name.clone(),
                std::fs::read(&f.path).expect("read restored file"),
            )
        })
        .collect();
    Ok((resp, files))
}

/// The bytes a restore took from `tier`.
pub fn source_bytes(resp: &pb::RestoreShardResponse, tier: pb::Tier) -> u64 {
    resp.sources
        .iter()
        .filter(|s| s.tier == tier as i32)
        .map(|s| s.bytes)
        .sum()
}

/// WaitDurable for every rank of a step on this daemon.
pub async fn wait_durable(
    c: &mut Clients,
    job: &str,
    step: u64,
    tier: pb::Tier,
    timeout_ms: u64,
) -> Result<(), tonic::Status> {
    c.checkpoint
        .wait_durable(pb::WaitDurableRequest {
            tenant: String::new(),
            job: job.into(),
            step,
            rank: None,
            tier: tier as i32,
            timeout_ms,
        })
        .await
        .map(drop)
}

/// Waits (up to 30 s) until `job`'s `step` is durable on disk.
pub async fn wait_disk(c: &mut Clients, job: &str, step: u64) {
    wait_durable(c, job, step, pb::Tier::Disk, 30_000)
        .await
        .expect("durable on disk");
}

/// What `Status` reports of the daemon.
pub async fn status(c: &mut Clients) -> pb::StatusResponse {
    c.admin
        .status(pb::StatusRequest {})
        .await
        .unwrap_or_else(|e| panic!("Status: {e}"))
        .into_inner()
}

/// The steps ListSteps reports for `job` (every tier's answer awaited).
pub async fn job_steps(c: &mut Clients, job: &str) -> Vec<pb::StepStatus> {
    tenant_job_steps(c, "", job).await
}

/// [`job_steps`] of `tenant`'s `job` (the default tenant when empty).
pub async fn tenant_job_steps(c: &mut Clients, tenant: &str, job: &str) -> Vec<pb::StepStatus> {
    c.checkpoint
        .list_steps(pb::ListStepsRequest {
            tenant: tenant.into(),
            job: job.into(),
            wait_for_all_tiers: true,
        })
        .await
        .unwrap_or_else(|e| panic!("ListSteps of {job}: {e}"))
        .into_inner()
        .jobs
        .into_iter()
        .filter(|j| j.job == job)
        .flat_map(|j| j.steps)
        .collect()
}

/// Whether the memory tier holds `job`'s `step`.
pub async fn in_memory(c: &mut Clients, job: &str, step: u64) -> bool {
    job_steps(c, job)
        .await
        .iter()
        .filter(|s| s.step == step)
        .flat_map(|s| &s.shards)
        .flat_map(|shard| &shard.tiers)
        .any(|t| t.tier == pb::Tier::Memory as i32 && t.state == pb::ShardState::Durable as i32)
}
