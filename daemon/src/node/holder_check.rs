//! Holder checks (anti-entropy): a replica counts only while its holder
//! confirms it.
//!
//! Replication records which peers confirmed a complete copy. Without more,
//! that record outlives the copy: a holder wiped and restarted with the same
//! id, or a replica chunk found bad and removed by the holder's scrubbing,
//! would still count, and the tier would report more durability than it has.
//! So every `peers.check_interval` this node asks each recorded holder of
//! each of its shards whether it still has the same manifest and a file for
//! every chunk ([`crate::tier::peer::PeerTier::check_holder`]: two small requests,
//! no chunk bytes), at most `peers.checks_per_sec` checks a second.
//!
//! A holder that answers without the replica (or part of it) stops counting
//! at once; one that does not answer keeps counting for
//! `peers.holder_grace` from its first failed request, then stops. Either
//! way the shard is under-replicated from that moment (listings,
//! `WaitDurable(PEERS)`, `cairn_under_replicated_shards`) and queued for
//! replication, which copies to the same node if it answers again (only the
//! chunks it lacks) or else to the next placement candidate.

use std::sync::Arc;
use std::time::Duration;

use cairn_core::{NodeId, ShardKey};

use super::{CopyState, Node, lock};
use crate::tier::peer::{HolderCheck, PeerTier};

/// Why a holder stopped counting, for logs and the metric's label.
struct Dropped {
    holder: NodeId,
    reason: &'static str,
    detail: String,
}

impl Node {
    /// Checks every recorded holder of every local shard, round after round.
    pub(super) async fn holder_check_loop(self: Arc<Self>) {
        let (Some(peers), Some(replication)) = (self.peers.clone(), &self.replication) else {
            return;
        };
        let pause = Duration::from_secs_f64(1.0 / f64::from(peers.checks_per_sec().max(1)));
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = tokio::time::sleep(peers.check_interval()) => {}
            }
            let shards = lock(&self.replicas).holders_to_check(replication);
            for (key, holders) in shards {
                let Some(manifest) = self.local_manifest(&key).await else {
                    continue;
                };
                let mut dropped = Vec::new();
                for holder in holders {
                    if &holder == peers.node_id() {
                        continue;
                    }
                    tokio::select! {
                        () = self.cancel.cancelled() => return,
                        () = tokio::time::sleep(pause) => {}
                    }
                    match peers.check_holder(&holder, &manifest).await {
                        HolderCheck::Holds => {}
                        HolderCheck::Lost(detail) => dropped.push(Dropped {
                            holder,
                            reason: "lost",
                            detail,
                        }),
                        HolderCheck::NoAnswer(detail) => {
                            let failing = peers.member_health(&holder).failing_since;
                            if let Some(since) = failing
                                && since.elapsed() >= peers.holder_grace()
                            {
                                dropped.push(Dropped {
                                    holder,
                                    reason: "unreachable",
                                    detail: format!(
                                        "unreachable for {} s: {detail}",
                                        since.elapsed().as_secs()
                                    ),
                                });
                            }
                        }
                    }
                }
                if !dropped.is_empty() {
                    self.drop_holders(&key, &dropped);
                }
            }
            let surplus = lock(&self.replicas).surplus_to_drop(replication);
            for (key, nodes) in surplus {
                for node in nodes {
                    tokio::select! {
                        () = self.cancel.cancelled() => return,
                        () = tokio::time::sleep(pause) => {}
                    }
                    self.drop_surplus_copy(&peers, &key, &node).await;
                }
            }
        }
    }

    /// Asks a former holder of a shard that is durable without it to drop
    /// its copy, so that a holder coming back after its copy was made
    /// elsewhere does not leave R + 1 copies behind; kept for the next
    /// round while it does not answer.
    async fn drop_surplus_copy(&self, peers: &PeerTier, key: &ShardKey, node: &NodeId) {
        match peers.drop_surplus(node, key).await {
            Ok(dropped) => {
                if dropped {
                    self.metrics.surplus_replicas_dropped.inc();
                    tracing::info!(shard = %key, holder = %node, "asked a former holder to drop its surplus copy");
                }
                lock(&self.replicas).forget_surplus(key, node);
            }
            Err(e) => {
                tracing::debug!(shard = %key, holder = %node, error = %e, "a former holder did not drop its copy yet; asking again next round");
            }
        }
    }

    /// Stops counting `dropped` as holders of `key` and queues the shard
    /// for replication.
    fn drop_holders(&self, key: &ShardKey, dropped: &[Dropped]) {
        let wanted = self.peers.as_ref().map_or(0, |p| p.replicas());
        let gone: Vec<&NodeId> = dropped.iter().map(|d| &d.holder).collect();
        let why = dropped
            .iter()
            .map(|d| format!("{} no longer counts ({})", d.holder, d.detail))
            .collect::<Vec<_>>()
            .join("; ");
        let Some(left) = lock(&self.replicas).drop_holders(key, &gone) else {
            return;
        };
        if let Some(replication) = &self.replication {
            replication.set_state(
                key,
                CopyState::Failed(format!("{left} of {wanted} replicas: {why}")),
            );
        }
        for d in dropped {
            self.metrics
                .holders_dropped
                .with_label_values(&[d.reason])
                .inc();
            tracing::warn!(shard = %key, holder = %d.holder, reason = d.reason, detail = %d.detail, "a holder no longer counts; replicating the shard again");
        }
        self.notify();
        self.queue_replication(key.clone());
    }
}
