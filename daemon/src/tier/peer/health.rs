//! What the peer tier knows about the health of its members and of the
//! replicas it holds, checked rather than remembered.
//!
//! * *Holder checks* ([`PeerTier::check_holder`]): an owner asks a node it
//!   recorded as a holder whether it still has the exact manifest and a file
//!   for every chunk the manifest names. Two small requests and no chunk
//!   bytes: the chunk question is answered from presence alone
//!   (`presence_only`), since re-hashing is scrubbing's job. The node's
//!   pipeline (`node::holder_check`) runs the checks on a timer and stops
//!   counting holders that fail them.
//! * *Contact* ([`MemberHealth`]): when each member last answered, and since
//!   when it has not, so that an unreachable holder keeps counting for a
//!   grace period (a restart or a rolling update should not cost a copy of
//!   everything it holds) and `cairn status` can say who is unreachable.
//! * *Scrubbing* ([`PeerTier::scrub_loop`]): the replicas this node holds
//!   for others are re-hashed in the background at a bounded rate; a bad
//!   chunk is removed at once, so the owner's next check finds it absent and
//!   sends it again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cairn_core::{ChunkId, Manifest, NodeId};
use tokio_util::sync::CancellationToken;

use super::{PeerTier, lock};
use crate::tier::disk::Scrubbed;

/// Pause between two scrubbing passes (a store with nothing to scrub is
/// looked at again after this).
const SCRUB_PASS_PAUSE: Duration = Duration::from_secs(10);

/// What a holder check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HolderCheck {
    /// The holder has the same manifest and a file for every chunk.
    Holds,
    /// The holder answered, and lacks the replica or part of it.
    Lost(String),
    /// The holder did not answer (or could not be asked).
    NoAnswer(String),
}

/// What this node knows of one member's reachability.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemberHealth {
    /// When it last answered a request of this node.
    pub last_contact: Option<SystemTime>,
    /// Since when its requests have failed, if the last one did.
    pub failing_since: Option<Instant>,
}

impl MemberHealth {
    /// Whether its last request failed.
    pub fn unreachable(&self) -> bool {
        self.failing_since.is_some()
    }
}

/// Where scrubbing of the replica store stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScrubStatus {
    /// Passes over every held chunk completed since the daemon started.
    pub passes: u64,
    /// Chunks re-hashed in the current pass, and how many it has.
    pub checked_in_pass: u64,
    /// See `checked_in_pass`.
    pub chunks_in_pass: u64,
    /// Bad chunks found (and removed) since the daemon started.
    pub bad_chunks: u64,
    /// Bytes per second the scrubber may read (0: off).
    pub bytes_per_sec: u64,
}

/// Member health and scrubbing state, behind one lock in [`PeerTier`].
#[derive(Default)]
pub(super) struct HealthBook {
    members: HashMap<NodeId, MemberHealth>,
    scrub: ScrubStatus,
}

impl PeerTier {
    /// Records the outcome of a request to `node`.
    pub(super) fn record_contact(&self, node: &NodeId, answered: bool) {
        let mut book = lock(&self.health);
        let health = book.members.entry(node.clone()).or_default();
        if answered {
            health.last_contact = Some(SystemTime::now());
            health.failing_since = None;
        } else if health.failing_since.is_none() {
            health.failing_since = Some(Instant::now());
        }
    }

    /// What this node knows of `node`'s reachability.
    pub fn member_health(&self, node: &NodeId) -> MemberHealth {
        lock(&self.health)
            .members
            .get(node)
            .copied()
            .unwrap_or_default()
    }

    /// Where scrubbing stands.
    pub fn scrub_status(&self) -> ScrubStatus {
        lock(&self.health).scrub
    }

    /// How long a holder may fail its checks before its copies stop
    /// counting.
    pub fn holder_grace(&self) -> Duration {
        self.settings.holder_grace
    }

    /// Interval between two checks of every holder.
    pub fn check_interval(&self) -> Duration {
        self.settings.check_interval
    }

    /// Most holder checks per second.
    pub fn checks_per_sec(&self) -> u32 {
        self.settings.checks_per_sec
    }

    /// Asks `node` whether it still holds `manifest`'s replica whole: the
    /// same manifest, and a file for every chunk it names.
    pub async fn check_holder(&self, node: &NodeId, manifest: &Manifest) -> HolderCheck {
        let view = self.view();
        let client = match self.client(&view, node) {
            Ok(Some(client)) => client,
            Ok(None) => return HolderCheck::Lost(format!("{node} is not a member any more")),
            Err(e) => return HolderCheck::NoAnswer(e.to_string()),
        };
        let asked = async {
            let held = client.replica(&manifest.shard).await?;
            let Some(held) = held else {
                return Ok(HolderCheck::Lost("it holds no replica of the shard".into()));
            };
            if held.hash() != manifest.hash() {
                return Ok(HolderCheck::Lost(
                    "it holds a different manifest for the shard".into(),
                ));
            }
            let ids: Vec<ChunkId> = manifest.unique_chunks().into_keys().collect();
            let absent = client.absent_chunks(&manifest.shard.tenant, &ids).await?;
            Ok::<_, crate::error::Error>(if absent.is_empty() {
                HolderCheck::Holds
            } else {
                HolderCheck::Lost(format!(
                    "it lacks {} of the replica's {} chunks",
                    absent.len(),
                    ids.len()
                ))
            })
        };
        let outcome = tokio::time::timeout(self.request_timeout, asked).await;
        let check = match outcome {
            Ok(Ok(check)) => check,
            Ok(Err(e)) => HolderCheck::NoAnswer(e.to_string()),
            Err(_) => HolderCheck::NoAnswer(format!(
                "no answer within {} s",
                self.request_timeout.as_secs()
            )),
        };
        self.record_contact(node, !matches!(check, HolderCheck::NoAnswer(_)));
        let result = match &check {
            HolderCheck::Holds => "holds",
            HolderCheck::Lost(_) => "lost",
            HolderCheck::NoAnswer(_) => "no_answer",
        };
        self.metrics
            .holder_checks
            .with_label_values(&[result])
            .inc();
        check
    }

    /// Re-hashes every chunk of the replicas held here, pass after pass, at
    /// no more than `scrub_bytes_per_sec`; removes bad chunks (see
    /// [`crate::tier::disk::DiskTier::scrub_chunk`]). Off when the rate is 0.
    pub(super) async fn scrub_loop(self: Arc<Self>, cancel: CancellationToken) {
        let rate = self.settings.scrub_bytes_per_sec;
        lock(&self.health).scrub.bytes_per_sec = rate;
        if rate == 0 {
            return;
        }
        loop {
            let chunks = self.store.referenced_chunks();
            {
                let mut book = lock(&self.health);
                book.scrub.checked_in_pass = 0;
                book.scrub.chunks_in_pass = chunks.len() as u64;
            }
            let started = Instant::now();
            let mut bytes: u64 = 0;
            for (tenant, id) in chunks {
                let store = Arc::clone(&self.store);
                let scrubbed = tokio::select! {
                    () = cancel.cancelled() => return,
                    done = tokio::task::spawn_blocking(move || store.scrub_chunk(&tenant, &id)) => done,
                };
                let read = match scrubbed {
                    Ok(Scrubbed::Good(read)) => read,
                    Ok(Scrubbed::Bad(read)) => {
                        self.metrics
                            .scrub_bad_chunks
                            .with_label_values(&["replicas"])
                            .inc();
                        let mut book = lock(&self.health);
                        book.scrub.bad_chunks = book.scrub.bad_chunks.saturating_add(1);
                        read
                    }
                    Ok(Scrubbed::Absent) => 0,
                    Err(e) => {
                        tracing::warn!(error = %e, "scrubbing a replica chunk failed");
                        0
                    }
                };
                self.metrics
                    .scrub_bytes
                    .with_label_values(&["replicas"])
                    .inc_by(read);
                {
                    let mut book = lock(&self.health);
                    book.scrub.checked_in_pass = book.scrub.checked_in_pass.saturating_add(1);
                }
                bytes = bytes.saturating_add(read);
                // Paced: the pass so far may not have read faster than `rate`.
                let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(ahead) => {}
                    }
                }
            }
            {
                let mut book = lock(&self.health);
                book.scrub.passes = book.scrub.passes.saturating_add(1);
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(SCRUB_PASS_PAUSE) => {}
            }
        }
    }
}
