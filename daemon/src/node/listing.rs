//! What a node holds: steps, their states, the newest complete step.

use std::collections::BTreeMap;
use std::sync::Arc;

use cairn_core::{JobName, Manifest, Rank, ShardKey, Step, TenantName, latest_complete_step};

use super::{DiskState, Node, ShardView, StepView, lock};
use crate::error::{Error, Result};
use crate::tier::{ChunkLocation, ShardSource};
use crate::transfer;

impl Node {
    pub(super) async fn all_shards(
        &self,
        tenant: &TenantName,
        job: Option<&JobName>,
    ) -> Result<BTreeMap<ShardKey, Arc<Manifest>>> {
        let mut all = BTreeMap::new();
        for source in self.sources().into_iter().rev() {
            for m in source.list(tenant, job).await? {
                all.insert(m.shard.clone(), m);
            }
        }
        Ok(all)
    }

    /// Steps of one job (or every job of the tenant), with each shard's state.
    pub async fn list_steps(
        &self,
        tenant: &TenantName,
        job: Option<&JobName>,
    ) -> Result<BTreeMap<JobName, Vec<StepView>>> {
        let all = self.all_shards(tenant, job).await?;
        let memory_keys: std::collections::BTreeSet<ShardKey> = self
            .memory
            .list(tenant, job)
            .await?
            .iter()
            .map(|m| m.shard.clone())
            .collect();
        let writeback = lock(&self.writeback).clone();
        let mut jobs: BTreeMap<JobName, BTreeMap<Step, Vec<ShardView>>> = BTreeMap::new();
        for (key, m) in &all {
            let disk = if self.disk.contains(key) {
                DiskState::Durable
            } else {
                writeback.get(key).cloned().unwrap_or(DiskState::Absent)
            };
            jobs.entry(key.job.clone())
                .or_default()
                .entry(key.step)
                .or_default()
                .push(ShardView {
                    rank: key.rank,
                    total_bytes: m.total_bytes(),
                    world_size: m.world_size,
                    in_memory: memory_keys.contains(key),
                    disk,
                });
        }
        Ok(jobs
            .into_iter()
            .map(|(job, steps)| {
                let views = steps
                    .into_iter()
                    .map(|(step, shards)| {
                        let present = shards.iter().map(|s| (step, s.rank, s.world_size));
                        let restorable = latest_complete_step(present, None) == Some(step);
                        StepView {
                            step,
                            restorable,
                            shards,
                        }
                    })
                    .collect();
                (job, views)
            })
            .collect())
    }

    /// The newest step of a job complete in some local tier (for `rank`, or
    /// for every rank when the shards declare a world size).
    pub async fn latest_step(
        &self,
        tenant: &TenantName,
        job: &JobName,
        rank: Option<Rank>,
    ) -> Result<Option<Step>> {
        let all = self.all_shards(tenant, Some(job)).await?;
        Ok(latest_complete_step(
            all.values()
                .map(|m| (m.shard.step, m.shard.rank, m.world_size)),
            rank,
        ))
    }

    /// Resolves "this step, or the newest complete one".
    pub async fn resolve_step(
        &self,
        tenant: &TenantName,
        job: &JobName,
        step: Option<Step>,
        rank: Rank,
    ) -> Result<Step> {
        match step {
            Some(step) => Ok(step),
            None => self.latest_step(tenant, job, Some(rank)).await?.ok_or_else(|| {
                Error::NotFound(format!("job {job} of tenant {tenant} has no complete step for rank {rank} on this node"))
            }),
        }
    }

    /// Reads one chunk from the fastest tier with a verified copy.
    pub async fn read_chunk(&self, location: &ChunkLocation) -> Result<bytes::Bytes> {
        let (_, bytes, _) =
            transfer::read_first_verified(location, &self.sources(), &self.metrics).await?;
        Ok(bytes)
    }

    /// A committed shard's manifest, from whichever tier has it.
    pub async fn manifest(&self, key: &ShardKey) -> Result<Arc<Manifest>> {
        for source in self.sources() {
            if let Some(m) = source.manifest(key).await? {
                return Ok(m);
            }
        }
        Err(Error::NotFound(format!(
            "shard {key} is in no tier of this node"
        )))
    }
}
