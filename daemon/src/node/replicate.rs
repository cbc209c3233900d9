//! The replication pipeline: every shard this node holds goes to R peers.
//!
//! A shard is queued when it is committed (or refilled by a restore), when
//! the daemon starts, and again whenever the membership changes in a way
//! that may have cost it a copy. A worker replicates a few shards at once
//! ([`CONCURRENT_REPLICATIONS`]); each copy to a peer moves at most
//! `peers.concurrency` chunks at a time, so a slow peer holds the sender to
//! that much memory and no more. A shard that does not reach R copies is
//! queued again after a backoff (1 s doubling to 60 s) until it does, the
//! shard leaves this node, or the daemon stops.
//!
//! Replicas this node keeps for an owner that has left the membership are
//! re-replicated from here to wherever placement now puts them, so a step
//! keeps R copies when its owner and then one of its holders are lost.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use cairn_core::{NodeId, ShardKey};
use tokio::sync::{Semaphore, mpsc};

use super::{CopyState, Node, lock, now_ms};
use crate::retry::RetryPolicy;
use crate::tier::ShardSource;

/// Shards replicated at once.
const CONCURRENT_REPLICATIONS: usize = 2;
/// How a shard short of replicas is queued again: 1 s doubling to 60 s,
/// until it has them.
const REPLICATION_RETRY: RetryPolicy =
    RetryPolicy::new(Duration::from_secs(1), Duration::from_secs(60));

/// Where one of this node's shards stands in the peer tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicationView {
    /// Peers that confirmed a complete replica at the last attempt.
    pub holders: Vec<NodeId>,
    /// Pending, durable (R holders) or failed with why.
    pub state: CopyState,
}

/// The pipeline's bookkeeping.
#[derive(Default)]
pub(super) struct Replication {
    states: HashMap<ShardKey, ReplicationView>,
    /// Queued and not yet picked up.
    queued: HashSet<ShardKey>,
    /// Being replicated now.
    running: HashSet<ShardKey>,
    /// Queued again while running: replicate once more when done.
    again: HashSet<ShardKey>,
    attempts: HashMap<ShardKey, u32>,
    /// Holders that stopped counting and may still hold a copy (one that was
    /// unreachable and comes back): once the shard is durable without them,
    /// they are asked to drop it (see `node::holder_check`).
    surplus: HashMap<ShardKey, HashSet<NodeId>>,
}

impl Replication {
    /// The shards with recorded holders that no replication is about to
    /// re-check anyway (neither queued nor running), with their holders.
    pub(super) fn holders_to_check(&self) -> Vec<(ShardKey, Vec<NodeId>)> {
        self.states
            .iter()
            .filter(|(key, view)| {
                !view.holders.is_empty()
                    && !self.queued.contains(*key)
                    && !self.running.contains(*key)
            })
            .map(|(key, view)| (key.clone(), view.holders.clone()))
            .collect()
    }

    /// Stops counting `gone` as holders of `key`; the shard is short of
    /// replicas for `why`. False when the shard is not replicated here.
    pub(super) fn drop_holders(
        &mut self,
        key: &ShardKey,
        gone: &[&NodeId],
        wanted: usize,
        why: &str,
    ) -> bool {
        let Some(view) = self.states.get_mut(key) else {
            return false;
        };
        view.holders.retain(|h| !gone.contains(&h));
        view.state = CopyState::Failed(format!(
            "{} of {wanted} replicas: {why}",
            view.holders.len()
        ));
        self.surplus
            .entry(key.clone())
            .or_default()
            .extend(gone.iter().map(|h| (*h).clone()));
        true
    }

    /// Shards durable without some former holders, with those holders: the
    /// copies to drop.
    pub(super) fn surplus_to_drop(&self) -> Vec<(ShardKey, Vec<NodeId>)> {
        self.surplus
            .iter()
            .filter(|(key, _)| {
                self.states
                    .get(*key)
                    .is_some_and(|v| v.state == CopyState::Durable)
            })
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
        let Some(tx) = &self.replicate_tx else {
            return;
        };
        let mut replication = lock(&self.replication);
        let state = replication
            .states
            .entry(key.clone())
            .or_insert_with(|| ReplicationView {
                holders: Vec::new(),
                state: CopyState::Pending,
            });
        if state.state == CopyState::Absent {
            state.state = CopyState::Pending;
        }
        if replication.running.contains(&key) {
            replication.again.insert(key);
        } else if replication.queued.insert(key.clone()) {
            let _ = tx.send(key);
        }
        drop(replication);
        self.update_replication_gauges();
    }

    /// A shard's state in the peer tier, if this node replicates it.
    pub fn replication_state(&self, key: &ShardKey) -> Option<ReplicationView> {
        lock(&self.replication).states.get(key).cloned()
    }

    pub(super) async fn replication_loop(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<ShardKey>,
    ) {
        let permits = Arc::new(Semaphore::new(CONCURRENT_REPLICATIONS));
        loop {
            let key = tokio::select! {
                () = self.cancel.cancelled() => return,
                key = rx.recv() => match key { Some(k) => k, None => return },
            };
            let permit = tokio::select! {
                () = self.cancel.cancelled() => return,
                permit = Arc::clone(&permits).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            {
                let mut replication = lock(&self.replication);
                replication.queued.remove(&key);
                replication.running.insert(key.clone());
            }
            let node = Arc::clone(&self);
            self.background.spawn("replication", async move {
                tokio::select! {
                    () = node.cancel.cancelled() => {}
                    () = node.replicate(&key) => {}
                }
                drop(permit);
                let again = {
                    let mut replication = lock(&node.replication);
                    replication.running.remove(&key);
                    replication.again.remove(&key)
                };
                if again {
                    node.queue_replication(key);
                }
            });
        }
    }

    /// One attempt at getting R replicas of a shard.
    #[tracing::instrument(skip_all, fields(shard = %key))]
    async fn replicate(self: &Arc<Self>, key: &ShardKey) {
        let Some(peers) = &self.peers else {
            return;
        };
        let Some(manifest) = self.local_manifest(key).await else {
            tracing::debug!("shard left this node; dropping its replication");
            let mut replication = lock(&self.replication);
            replication.states.remove(key);
            replication.attempts.remove(key);
            replication.surplus.remove(key);
            drop(replication);
            self.update_replication_gauges();
            return;
        };
        let sources: [&dyn ShardSource; 2] = [&*self.memory, &*self.disk];
        let outcome = peers
            .replicate(&manifest, &peers.me(), &sources, &self.cancel)
            .await;
        let wanted = peers.replicas();
        let durable = outcome.holders.len() >= wanted;
        let (was_durable, attempt) = {
            let mut replication = lock(&self.replication);
            let view = ReplicationView {
                holders: outcome.holders.clone(),
                state: if durable {
                    CopyState::Durable
                } else {
                    CopyState::Failed(format!(
                        "{} of {wanted} replicas: {}",
                        outcome.holders.len(),
                        if outcome.problems.is_empty() {
                            "no candidate took it".to_owned()
                        } else {
                            outcome.problems.join("; ")
                        }
                    ))
                },
            };
            if let Some(surplus) = replication.surplus.get_mut(key) {
                surplus.retain(|n| !outcome.holders.contains(n));
            }
            let previous = replication.states.insert(key.clone(), view);
            let was_durable = previous.is_some_and(|p| p.state == CopyState::Durable);
            let attempt = if durable {
                replication.attempts.remove(key);
                0
            } else {
                let n = replication.attempts.entry(key.clone()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            };
            (was_durable, attempt)
        };
        self.update_replication_gauges();
        self.notify();
        if durable {
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
            return;
        }
        let delay = REPLICATION_RETRY
            .delay_after(attempt)
            .unwrap_or(REPLICATION_RETRY.max_delay);
        tracing::warn!(
            holders = outcome.holders.len(),
            wanted,
            problems = ?outcome.problems,
            attempt,
            retry_in_s = delay.as_secs(),
            "shard short of peer replicas, retrying"
        );
        let node = Arc::clone(self);
        let key = key.clone();
        self.background.spawn("replication retry", async move {
            tokio::select! {
                () = node.cancel.cancelled() => {}
                () = tokio::time::sleep(delay) => node.queue_replication(key),
            }
        });
    }

    pub(super) fn update_replication_gauges(&self) {
        let replication = lock(&self.replication);
        let pending = replication
            .states
            .values()
            .filter(|v| v.state == CopyState::Pending)
            .count();
        let short = replication
            .states
            .values()
            .filter(|v| v.state != CopyState::Durable)
            .count();
        self.metrics.replication_pending.set(pending as i64);
        self.metrics.under_replicated_shards.set(short as i64);
    }

    /// How many local shards each peer holds a confirmed replica of.
    pub fn shards_held_by(&self) -> HashMap<NodeId, u32> {
        let mut held: HashMap<NodeId, u32> = HashMap::new();
        for view in lock(&self.replication).states.values() {
            for holder in &view.holders {
                let n = held.entry(holder.clone()).or_default();
                *n = n.saturating_add(1);
            }
        }
        held
    }

    /// Local shards queued or being replicated, and those short of
    /// replicas, for status.
    pub fn replication_counts(&self) -> (u32, u32) {
        let replication = lock(&self.replication);
        let pending = replication
            .queued
            .len()
            .saturating_add(replication.running.len());
        let short = replication
            .states
            .values()
            .filter(|v| v.state != CopyState::Durable)
            .count();
        (pending as u32, short as u32)
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
            let requeue: Vec<ShardKey> = lock(&self.replication)
                .states
                .iter()
                .filter(|(_, v)| {
                    v.state != CopyState::Durable || v.holders.iter().any(|h| left.contains(h))
                })
                .map(|(k, _)| k.clone())
                .collect();
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
