//! The replication pipeline: every shard this node holds goes to R peers.
//!
//! A shard is queued when it is committed (or refilled by a restore), when
//! the daemon starts, and again whenever the membership changes in a way
//! that may have cost it a copy. The queue is a [`Pipeline`] that
//! replicates a few shards at once ([`CONCURRENT_REPLICATIONS`]); each copy
//! to a peer moves at most `peers.concurrency` chunks at a time, so a slow
//! peer holds the sender to that much memory and no more. A shard that does
//! not reach R copies is tried again (`[pipelines.replication]`: 1 s doubling
//! to 60 s, then it needs attention and is tried once a minute) until it
//! does, the shard leaves this node, or the daemon stops. Unlike write-back
//! and upload, the pipeline keeps following a durable shard: its holders are
//! checked (`node::holder_check`) and may be lost later.
//!
//! Replicas this node keeps for an owner that has left the membership are
//! re-replicated from here to wherever placement now puts them, so a step
//! keeps R copies when its owner and then one of its holders are lost.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use cairn_core::{NodeId, ShardKey};

use super::pipeline::{Attempt, Pipeline};
use super::{CopyState, Node, lock, now_ms};
use crate::tier::ShardSource;

/// Shards replicated at once.
const CONCURRENT_REPLICATIONS: usize = 2;

/// Where one of this node's shards stands in the peer tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicationView {
    /// Peers that confirmed a complete replica at the last attempt.
    pub holders: Vec<NodeId>,
    /// Pending, durable (R holders) or failed with why.
    pub state: CopyState,
}

/// Who holds this node's shards; the pipeline keeps where each stands.
#[derive(Default)]
pub(super) struct Replicas {
    holders: HashMap<ShardKey, Vec<NodeId>>,
    /// Holders that stopped counting and may still hold a copy (one that was
    /// unreachable and comes back): once the shard is durable without them,
    /// they are asked to drop it (see `node::holder_check`).
    surplus: HashMap<ShardKey, HashSet<NodeId>>,
}

impl Replicas {
    /// The shards with recorded holders that no replication is about to
    /// re-check anyway (neither queued nor running), with their holders.
    pub(super) fn holders_to_check(&self, pipeline: &Pipeline) -> Vec<(ShardKey, Vec<NodeId>)> {
        self.holders
            .iter()
            .filter(|(key, holders)| !holders.is_empty() && pipeline.is_idle(key))
            .map(|(key, holders)| (key.clone(), holders.clone()))
            .collect()
    }

    /// Stops counting `gone` as holders of `key`; returns how many holders
    /// are left, or `None` when the shard is not replicated here.
    pub(super) fn drop_holders(&mut self, key: &ShardKey, gone: &[&NodeId]) -> Option<usize> {
        let holders = self.holders.get_mut(key)?;
        holders.retain(|h| !gone.contains(&h));
        self.surplus
            .entry(key.clone())
            .or_default()
            .extend(gone.iter().map(|h| (*h).clone()));
        Some(holders.len())
    }

    /// Shards durable without some former holders, with those holders: the
    /// copies to drop.
    pub(super) fn surplus_to_drop(&self, pipeline: &Pipeline) -> Vec<(ShardKey, Vec<NodeId>)> {
        self.surplus
            .iter()
            .filter(|(key, _)| pipeline.state(key) == Some(CopyState::Durable))
            .map(|(key, nodes)| (key.clone(), nodes.iter().cloned().collect()))
            .collect()
    }

    /// Forgets `node` as a possible surplus holder of `key` (it dropped its
    /// copy, held none, or counts again).
    pub(super) fn forget_surplus(&mut self, key: &ShardKey, node: &NodeId) {
        if let Some(nodes) = self.surplus.get_mut(key) {
            nodes.remove(node);
            if nodes.is_empty() {
                self.surplus.remove(key);
            }
        }
    }
}

impl Node {
    /// Queues a shard for replication; a no-op without a peer tier.
    pub(super) fn queue_replication(&self, key: ShardKey) {
        if let Some(replication) = &self.replication {
            replication.enqueue(key);
        }
    }

    /// A shard's state in the peer tier, if this node replicates it.
    pub fn replication_state(&self, key: &ShardKey) -> Option<ReplicationView> {
        let state = self.replication.as_ref()?.state(key)?;
        let holders = lock(&self.replicas)
            .holders
            .get(key)
            .cloned()
            .unwrap_or_default();
        Some(ReplicationView { holders, state })
    }

    /// Runs the replication pipeline until shutdown.
    pub(super) async fn replication_loop(self: Arc<Self>) {
        let Some(replication) = &self.replication else {
            return;
        };
        let node = &self;
        replication
            .run(
                CONCURRENT_REPLICATIONS,
                &self.cancel,
                |key| async move { node.replicate(&key).await },
                |_| async move { node.notify() },
            )
            .await;
    }

    /// One attempt at getting R replicas of a shard; the pipeline retries a
    /// shard left short.
    #[tracing::instrument(skip_all, fields(shard = %key))]
    async fn replicate(&self, key: &ShardKey) -> Attempt {
        let (Some(peers), Some(replication)) = (&self.peers, &self.replication) else {
            return Attempt::Dropped;
        };
        let Some(manifest) = self.local_manifest(key).await else {
            tracing::debug!("shard left this node; dropping its replication");
            let mut replicas = lock(&self.replicas);
            replicas.holders.remove(key);
            replicas.surplus.remove(key);
            return Attempt::Dropped;
        };
        let sources: [&dyn ShardSource; 2] = [&*self.memory, &*self.disk];
        let outcome = peers
            .replicate(&manifest, &peers.me(), &sources, &self.cancel)
            .await;
        if self.cancel.is_cancelled() {
            return Attempt::Interrupted;
        }
        let wanted = peers.replicas();
        let durable = outcome.holders.len() >= wanted;
        let was_durable = replication.state(key) == Some(CopyState::Durable);
        {
            let mut replicas = lock(&self.replicas);
            if let Some(surplus) = replicas.surplus.get_mut(key) {
                surplus.retain(|n| !outcome.holders.contains(n));
            }
            replicas
                .holders
                .insert(key.clone(), outcome.holders.clone());
        }
        if !durable {
            tracing::warn!(
                holders = outcome.holders.len(),
                wanted,
                problems = ?outcome.problems,
                "shard short of peer replicas"
            );
            return Attempt::Failed {
                error: format!(
                    "{} of {wanted} replicas: {}",
                    outcome.holders.len(),
                    if outcome.problems.is_empty() {
                        "no candidate took it".to_owned()
                    } else {
                        outcome.problems.join("; ")
                    }
                ),
                permanent: false,
            };
        }
        if !was_durable {
            let lag = now_ms().saturating_sub(manifest.committed_unix_ms) as f64 / 1000.0;
            self.metrics.replication_lag_seconds.observe(lag);
            tracing::info!(
                holders = ?outcome.holders.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
                sent = outcome.bytes_sent,
                lag_s = lag,
                "shard durable on peers"
            );
        }
        Attempt::Durable
    }

    /// How many local shards each peer holds a confirmed replica of.
    pub fn shards_held_by(&self) -> HashMap<NodeId, u32> {
        let mut held: HashMap<NodeId, u32> = HashMap::new();
        for holders in lock(&self.replicas).holders.values() {
            for holder in holders {
                let n = held.entry(holder.clone()).or_default();
                *n = n.saturating_add(1);
            }
        }
        held
    }

    /// Local shards queued or being replicated, and those short of
    /// replicas, for status.
    pub fn replication_counts(&self) -> (u32, u32) {
        let counts = self
            .replication
            .as_ref()
            .map(|r| r.counts())
            .unwrap_or_default();
        (counts.active as u32, counts.outstanding() as u32)
    }

    /// Reacts to membership changes: queues every local shard that is short
    /// of replicas or lost a holder, and re-replicates the replicas kept
    /// here for owners no longer in the membership. Also queues every local
    /// shard once at start (the state of a previous run is not kept).
    pub(super) async fn membership_loop(self: Arc<Self>) {
        let Some(peers) = self.peers.clone() else {
            return;
        };
        let mut views = peers.membership();
        let mut last = Arc::clone(&views.borrow_and_update());
        // The first view may have arrived before this loop: count it too.
        self.metrics.peer_members.set(last.len() as i64);
        for manifest in self.memory.shards().into_iter().chain(self.disk.shards()) {
            self.queue_replication(manifest.shard.clone());
        }
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return,
                changed = views.changed() => if changed.is_err() { return },
            }
            let view = Arc::clone(&views.borrow_and_update());
            let diff = last.diff(&view);
            last = Arc::clone(&view);
            self.metrics.peer_members.set(view.len() as i64);
            if diff.is_empty() {
                continue;
            }
            let left: HashSet<&NodeId> = diff.left.iter().map(|p| p.id()).collect();
            let requeue: Vec<ShardKey> = {
                let replicas = lock(&self.replicas);
                self.replication
                    .as_ref()
                    .map(|r| r.states())
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(key, state)| {
                        *state != CopyState::Durable
                            || replicas
                                .holders
                                .get(key)
                                .is_some_and(|h| h.iter().any(|h| left.contains(h)))
                    })
                    .map(|(key, _)| key)
                    .collect()
            };
            for key in requeue {
                self.queue_replication(key);
            }
            for (manifest, owner) in peers.store.replicas() {
                let Some(owner) = owner else { continue };
                if view.get(&owner.id).is_some() {
                    continue;
                }
                let sources = [peers.store.source()];
                let outcome = tokio::select! {
                    () = self.cancel.cancelled() => return,
                    outcome = peers.replicate(&manifest, &owner, &sources, &self.cancel) => outcome,
                };
                if outcome.bytes_sent > 0 || outcome.holders.len() < peers.replicas() {
                    tracing::info!(
                        shard = %manifest.shard,
                        owner = %owner.id,
                        holders = outcome.holders.len(),
                        sent = outcome.bytes_sent,
                        problems = ?outcome.problems,
                        "re-replicated a replica whose owner left"
                    );
                }
            }
        }
    }
}
