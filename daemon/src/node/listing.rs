//! What a node holds: steps, their states, the newest complete step.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use cairn_core::{
    JobName, Manifest, Rank, ShardKey, ShardPresence, Step, TenantName, latest_complete_step,
};

use super::{CopyState, Node, ReplicationView, ShardView, StepView, lock};
use crate::error::{Error, Result};
use crate::tier::{ChunkLocation, ShardSource, TierKind};
use crate::transfer;

impl Node {
    pub(super) async fn all_shards(
        &self,
        tenant: &TenantName,
        job: Option<&JobName>,
    ) -> Result<BTreeMap<ShardKey, Arc<Manifest>>> {
        Ok(self.shards_by_tier(tenant, job).await?.0)
    }

    /// The shards this node's own tiers (memory and disk) hold: what it
    /// saved or restored, without asking the bucket.
    pub(super) async fn local_shards(
        &self,
        tenant: &TenantName,
        job: &JobName,
    ) -> Result<BTreeSet<ShardKey>> {
        let mut keys = BTreeSet::new();
        for source in [&*self.memory as &dyn ShardSource, &*self.disk] {
            keys.extend(
                source
                    .list(tenant, Some(job))
                    .await?
                    .iter()
                    .map(|m| m.shard.clone()),
            );
        }
        Ok(keys)
    }

    /// Every shard any tier holds (the fastest tier's manifest for each),
    /// and which shards each tier holds. An unreachable object store is
    /// logged and left out, so local work never waits on a bucket.
    async fn shards_by_tier(
        &self,
        tenant: &TenantName,
        job: Option<&JobName>,
    ) -> Result<(
        BTreeMap<ShardKey, Arc<Manifest>>,
        BTreeMap<TierKind, BTreeSet<ShardKey>>,
    )> {
        let mut all = BTreeMap::new();
        let mut by_tier: BTreeMap<TierKind, BTreeSet<ShardKey>> = BTreeMap::new();
        for source in self.sources().into_iter().rev() {
            let listed = match source.list(tenant, job).await {
                Ok(listed) => listed,
                Err(e) if matches!(source.kind(), TierKind::ObjectStore | TierKind::Peers) => {
                    tracing::warn!(tier = %source.kind(), error = %e, "cannot list a remote tier; showing the others only");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let keys = by_tier.entry(source.kind()).or_default();
            for m in listed {
                keys.insert(m.shard.clone());
                all.insert(m.shard.clone(), m);
            }
        }
        Ok((all, by_tier))
    }

    /// Steps of one job (or every job of the tenant), with each shard's state.
    pub async fn list_steps(
        &self,
        tenant: &TenantName,
        job: Option<&JobName>,
    ) -> Result<BTreeMap<JobName, Vec<StepView>>> {
        let (all, by_tier) = self.shards_by_tier(tenant, job).await?;
        let in_tier = |tier: TierKind, key: &ShardKey| {
            by_tier.get(&tier).is_some_and(|keys| keys.contains(key))
        };
        let writeback = lock(&self.writeback).clone();
        let marked = self.complete_steps_in_bucket(tenant, &all).await;
        let mut jobs: BTreeMap<JobName, BTreeMap<Step, Vec<ShardView>>> = BTreeMap::new();
        for (key, m) in &all {
            let disk = if self.disk.contains(key) {
                CopyState::Durable
            } else {
                writeback.get(key).cloned().unwrap_or(CopyState::Absent)
            };
            let object_store = if in_tier(TierKind::ObjectStore, key) {
                CopyState::Durable
            } else {
                self.upload_state(key).unwrap_or(CopyState::Absent)
            };
            let peers = self.peers.as_ref().map(|peers| {
                self.replication_state(key).unwrap_or_else(|| {
                    let holders = if in_tier(TierKind::Peers, key) {
                        peers.known_holders(key)
                    } else {
                        Vec::new()
                    };
                    ReplicationView {
                        state: if holders.len() >= peers.replicas() {
                            CopyState::Durable
                        } else if holders.is_empty() {
                            CopyState::Absent
                        } else {
                            CopyState::Failed(format!(
                                "{} of {} replicas found",
                                holders.len(),
                                peers.replicas()
                            ))
                        },
                        holders,
                    }
                })
            });
            jobs.entry(key.job.clone())
                .or_default()
                .entry(key.step)
                .or_default()
                .push(ShardView {
                    rank: key.rank,
                    total_bytes: m.total_bytes(),
                    world_size: m.world_size,
                    attempt: m.attempt.clone(),
                    in_memory: in_tier(TierKind::Memory, key),
                    disk,
                    object_store,
                    peers,
                });
        }
        Ok(jobs
            .into_iter()
            .map(|(job, steps)| {
                let views = steps
                    .into_iter()
                    .map(|(step, shards)| {
                        let present = shards.iter().map(|s| ShardPresence {
                            step,
                            rank: s.rank,
                            world_size: s.world_size,
                            attempt: s.attempt.as_ref(),
                        });
                        let restorable = latest_complete_step(present, None) == Some(step);
                        StepView {
                            step,
                            restorable,
                            object_store_complete: marked.contains(&(job.clone(), step)),
                            shards,
                        }
                    })
                    .collect();
                (job, views)
            })
            .collect())
    }

    /// The steps whose completion marker is in the bucket, among the jobs of
    /// `shards` (one listing per job; empty without an object store).
    async fn complete_steps_in_bucket(
        &self,
        tenant: &TenantName,
        shards: &BTreeMap<ShardKey, Arc<Manifest>>,
    ) -> BTreeSet<(JobName, Step)> {
        let mut marked = BTreeSet::new();
        let Some(object) = &self.object else {
            return marked;
        };
        let jobs: BTreeSet<&JobName> = shards.keys().map(|k| &k.job).collect();
        for job in jobs {
            match object.steps(tenant, job).await {
                Ok(steps) => marked.extend(
                    steps
                        .into_iter()
                        .filter(|(_, s)| s.complete)
                        .map(|(step, _)| (job.clone(), step)),
                ),
                Err(e) => tracing::warn!(%job, error = %e, "cannot list the object store's steps"),
            }
        }
        marked
    }

    /// The newest step of a job complete in some tier (for `rank`, or
    /// for every rank when the shards declare a world size).
    pub async fn latest_step(
        &self,
        tenant: &TenantName,
        job: &JobName,
        rank: Option<Rank>,
    ) -> Result<Option<Step>> {
        let all = self.all_shards(tenant, Some(job)).await?;
        Ok(latest_complete_step(
            all.values().map(|m| ShardPresence::from(&**m)),
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
