//! What a node holds: steps, their states, the newest complete step.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use cairn_core::{
    JobName, Manifest, Rank, ShardKey, ShardPresence, Step, TenantName, latest_complete_step,
};

use super::{CopyState, Node, ReplicationView, ShardView, StepView};
use crate::error::{Error, Result};
use crate::tier::transfer;
use crate::tier::{ChunkLocation, ShardSource, TierKind};

/// How long a listing for people (`ListSteps`: `cairn list`, `cairn
/// status --job`) waits for a remote tier before showing the rest without
/// it, saying so. Lookups that decide what to restore wait as long as the
/// tier's own timeouts allow instead.
const LISTING_REMOTE_DEADLINE: Duration = Duration::from_secs(1);

/// What the tiers listed.
#[derive(Default)]
struct TierListing {
    /// Every shard, the fastest tier's manifest for each.
    shards: BTreeMap<ShardKey, Arc<Manifest>>,
    /// Which shards each tier listed.
    by_tier: BTreeMap<TierKind, BTreeSet<ShardKey>>,
    /// Remote tiers or members left out, and why.
    left_out: Vec<String>,
}

/// Steps by job, and what could not be asked.
pub struct StepsView {
    /// Steps of each job.
    pub jobs: BTreeMap<JobName, Vec<StepView>>,
    /// Remote tiers or peers that were left out, each with why: the view is
    /// partial (a step may be listed as not restorable, or missing, only
    /// because of them).
    pub left_out: Vec<String>,
}

/// A tier as the subject of a sentence.
fn tier_noun(tier: TierKind) -> &'static str {
    match tier {
        TierKind::Memory => "the memory tier",
        TierKind::Disk => "the disk tier",
        TierKind::Peers => "the peer tier",
        TierKind::ObjectStore => "the object store",
    }
}

impl Node {
    pub(super) async fn all_shards(
        &self,
        tenant: &TenantName,
        job: Option<&JobName>,
    ) -> Result<BTreeMap<ShardKey, Arc<Manifest>>> {
        Ok(self.shards_by_tier(tenant, job, None).await?.shards)
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
    /// and which shards each tier holds. A remote tier that fails, or does
    /// not answer within `remote_deadline`, is left out and named in
    /// `left_out` (and logged), so local work never waits on a bucket.
    async fn shards_by_tier(
        &self,
        tenant: &TenantName,
        job: Option<&JobName>,
        remote_deadline: Option<Duration>,
    ) -> Result<TierListing> {
        let mut listing = TierListing::default();
        for source in self.sources().into_iter().rev() {
            let remote = matches!(source.kind(), TierKind::ObjectStore | TierKind::Peers);
            let listed = match remote_deadline.filter(|_| remote) {
                Some(deadline) => tokio::time::timeout(deadline, source.list(tenant, job))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::DeadlineExceeded(format!(
                            "no answer within {:.1} s",
                            deadline.as_secs_f64()
                        )))
                    }),
                None => source.list(tenant, job).await,
            };
            let listed = match listed {
                Ok(listed) => listed,
                Err(e) if remote => {
                    tracing::warn!(tier = %source.kind(), error = %e, "cannot list a remote tier; showing the others only");
                    listing
                        .left_out
                        .push(format!("{}: {e}", tier_noun(source.kind())));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let keys = listing.by_tier.entry(source.kind()).or_default();
            for m in listed {
                keys.insert(m.shard.clone());
                listing.shards.insert(m.shard.clone(), m);
            }
        }
        if let Some(peers) = &self.peers {
            // Members that did not answer the listing (or a check) just now.
            for peer in peers.view().peers() {
                if peer.id() != peers.node_id() && peers.member_health(peer.id()).unreachable() {
                    listing
                        .left_out
                        .push(format!("peer {}: unreachable", peer.id()));
                }
            }
        }
        Ok(listing)
    }

    /// Steps of one job (or every job of the tenant), with each shard's
    /// state. With `wait_for_all_tiers`, remote tiers get as long as their
    /// own timeouts allow; otherwise [`LISTING_REMOTE_DEADLINE`].
    pub async fn list_steps(
        &self,
        tenant: &TenantName,
        job: Option<&JobName>,
        wait_for_all_tiers: bool,
    ) -> Result<StepsView> {
        let deadline = (!wait_for_all_tiers).then_some(LISTING_REMOTE_DEADLINE);
        let TierListing {
            shards: all,
            by_tier,
            mut left_out,
        } = self.shards_by_tier(tenant, job, deadline).await?;
        let in_tier = |tier: TierKind, key: &ShardKey| {
            by_tier.get(&tier).is_some_and(|keys| keys.contains(key))
        };
        let bucket_answered = !left_out
            .iter()
            .any(|l| l.starts_with(tier_noun(TierKind::ObjectStore)));
        let marked = if bucket_answered {
            self.complete_steps_in_bucket(tenant, &all, deadline, &mut left_out)
                .await
        } else {
            BTreeSet::new()
        };
        let mut jobs: BTreeMap<JobName, BTreeMap<Step, Vec<ShardView>>> = BTreeMap::new();
        for (key, m) in &all {
            let disk = if self.disk.contains(key) {
                CopyState::Durable
            } else {
                self.writeback.state(key).unwrap_or(CopyState::Absent)
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
        let jobs = jobs
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
            .collect();
        Ok(StepsView { jobs, left_out })
    }

    /// The steps whose completion marker is in the bucket, among the jobs of
    /// `shards` (one listing per job; empty without an object store).
    async fn complete_steps_in_bucket(
        &self,
        tenant: &TenantName,
        shards: &BTreeMap<ShardKey, Arc<Manifest>>,
        deadline: Option<Duration>,
        left_out: &mut Vec<String>,
    ) -> BTreeSet<(JobName, Step)> {
        let mut marked = BTreeSet::new();
        let Some(object) = &self.object else {
            return marked;
        };
        let jobs: BTreeSet<&JobName> = shards.keys().map(|k| &k.job).collect();
        for job in jobs {
            let listed = match deadline {
                Some(deadline) => tokio::time::timeout(deadline, object.steps(tenant, job))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::DeadlineExceeded(format!(
                            "no answer within {:.1} s",
                            deadline.as_secs_f64()
                        )))
                    }),
                None => object.steps(tenant, job).await,
            };
            match listed {
                Ok(steps) => marked.extend(
                    steps
                        .into_iter()
                        .filter(|(_, s)| s.complete)
                        .map(|(step, _)| (job.clone(), step)),
                ),
                Err(e) => {
                    tracing::warn!(%job, error = %e, "cannot list the object store's steps");
                    left_out.push(format!("the object store's step markers of {job}: {e}"));
                    break;
                }
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
        let listing = self.shards_by_tier(tenant, Some(job), None).await?;
        let latest = latest_complete_step(
            listing.shards.values().map(|m| ShardPresence::from(&**m)),
            rank,
        );
        // "No step" must mean none: a trainer would start over from scratch.
        // Without the bucket's answer this node cannot tell.
        let bucket = tier_noun(TierKind::ObjectStore);
        if latest.is_none()
            && let Some(why) = listing.left_out.iter().find(|l| l.starts_with(bucket))
        {
            return Err(Error::TierUnavailable(format!(
                "cannot tell whether job {job} of tenant {tenant} has a complete step: no tier \
                 that answered holds one, and {why}"
            )));
        }
        Ok(latest)
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
