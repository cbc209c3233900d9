//! T2, the peer tier: replicas of each shard on R other nodes.
//!
//! * [`service`] serves `cairn.v1.Peer` on its own TCP port, over mutual TLS
//!   ([`tls`]): other daemons ask which chunks this node lacks, send those,
//!   then the manifest; and read replicas back when they restore.
//! * [`store`] keeps the replicas this node holds for others, apart from its
//!   own shards.
//! * [`client`] is one connection to one peer.
//! * [`PeerTier`] (here) ties them to the membership: it works out where a
//!   shard's replicas belong ([`cairn_core::placement`]), copies a shard to
//!   them through the same loop as every other tier
//!   ([`crate::tier::transfer::copy_shard`]), and is the tier restore reads from:
//!   it finds the nodes holding a shard and spreads chunk reads across them,
//!   verifying each chunk and moving to another holder on a bad copy.
//!
//! The node's replication pipeline (queueing, retries, state, reaction to
//! membership changes) lives in `node::replicate`.

pub mod client;
mod config;
mod health;
pub mod store;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cairn_core::{
    ChunkId, JobName, Manifest, Member, MembershipView, NodeId, PlacementKey, ShardKey, TenantName,
};
use futures::{StreamExt, stream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::membership;
use crate::metrics::Metrics;
use crate::tier::transfer::copy_shard;
use crate::tier::{ChunkLocation, ChunkRead, ShardSource, TierKind};
use client::{PeerClient, ReplicaSink};
pub use config::PeerConfig;
pub use health::{HolderCheck, MemberHealth, ScrubStatus};
use store::ReplicaStore;
use tls::PeerTls;

/// HTTP/2 windows for peer traffic: large, so one connection carries bulk
/// chunks near the speed of raw TCP (see the design brief's figures).
pub const STREAM_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// See [`STREAM_WINDOW_BYTES`].
pub const CONNECTION_WINDOW_BYTES: u32 = 64 * 1024 * 1024;
/// Largest HTTP/2 frame each side accepts on peer connections. HTTP/2's
/// default, 16 KiB, cuts a 4 MiB chunk into 256 DATA frames, each with its
/// own flow-control bookkeeping and copy into the gRPC decoder; 1 MiB frames
/// cut that 64-fold (measured in `benches/results/peer-bench-2026-12-06.md`).
pub const FRAME_BYTES: u32 = 1024 * 1024;
/// Largest peer message: one chunk of the largest chunk size, plus framing.
pub const MAX_PEER_MESSAGE_BYTES: usize = cairn_core::chunk::MAX_CHUNK_SIZE as usize + 64 * 1024;
/// Candidates beyond R asked for a shard before asking every member: the
/// replicas of a node that left sit near the top of the same ranking.
const SEARCH_EXTRA: usize = 3;
/// Candidates beyond R that replication tries when chosen peers are full or
/// unreachable.
const FALLBACK_CANDIDATES: usize = 3;
/// Peers asked at once when searching or listing.
const FAN_OUT: usize = 16;
/// How long a search or listing waits for one peer.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a prefetch on another node may take: a whole shard's restore.
const PREFETCH_TIMEOUT: Duration = Duration::from_secs(3600);
/// Interval between passes that remove replica chunks no manifest names.
const REPLICA_GC_INTERVAL: Duration = Duration::from_secs(300);
/// Unnamed replica chunks younger than this are left alone: they may belong
/// to a copy still in flight (a copy that stalls longer fails its manifest
/// and is sent again).
const REPLICA_GC_MIN_AGE: Duration = Duration::from_secs(600);

/// What one replication of a shard achieved.
#[derive(Clone, Debug, Default)]
pub struct ReplicationOutcome {
    /// Peers that hold a complete replica now, in placement order.
    pub holders: Vec<NodeId>,
    /// Why other candidates did not take it, one line each.
    pub problems: Vec<String>,
    /// Chunk bytes sent.
    pub bytes_sent: u64,
}

/// The peer tier of this node.
pub struct PeerTier {
    me: NodeId,
    /// The peer port of members whose source gives none (every node
    /// listens on the same port, as a DaemonSet does).
    port: u16,
    replicas: usize,
    concurrency: usize,
    request_timeout: Duration,
    tls: Option<PeerTls>,
    membership: watch::Receiver<Arc<MembershipView>>,
    source: &'static str,
    clients: Mutex<HashMap<NodeId, Arc<PeerClient>>>,
    /// Holders of shards found by searches, with the hash of the manifest
    /// they hold, for the chunk reads that follow.
    holders: Mutex<HoldersCache>,
    /// The replicas this node keeps for others.
    pub store: Arc<ReplicaStore>,
    metrics: Arc<Metrics>,
    settings: HealthSettings,
    health: Mutex<health::HealthBook>,
    /// Why the peer tier has no membership (not started yet, or its source
    /// failed to start); `None` once a view arrived.
    membership_problem: Arc<Mutex<Option<String>>>,
}

/// How holders are checked and replicas scrubbed (from `[peers]`).
#[derive(Clone, Copy, Debug)]
struct HealthSettings {
    check_interval: Duration,
    holder_grace: Duration,
    checks_per_sec: u32,
    scrub_bytes_per_sec: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PeerTier {
    /// Opens the replica store, loads the TLS files and starts the
    /// membership source in the background (the tier works with an empty
    /// membership until the first view arrives: local saves never wait).
    pub fn start(
        config: &PeerConfig,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>> {
        // Both of rustls's providers are linked in (through other crates),
        // so it cannot pick one itself; a second install is a harmless no-op.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let tls = config.tls.as_ref().map(PeerTls::load).transpose()?;
        let store = Arc::new(ReplicaStore::open(
            &config.replica_dir,
            config.replica_capacity,
            config.replica_keep_last,
        )?);
        let (publish, membership) = watch::channel(Arc::new(MembershipView::empty()));
        let settings = config.membership.clone();
        let source = membership::source_name(&settings);
        let stop = cancel.clone();
        // A static list is its own first view; the other sources have none
        // until they deliver one.
        let membership_problem = Arc::new(Mutex::new(
            (!matches!(settings, membership::MembershipSettings::Static(_)))
                .then(|| format!("no membership view yet from the {source} source")),
        ));
        let problem = Arc::clone(&membership_problem);
        tokio::spawn(async move {
            // A source that cannot start (no kubeconfig, no service account)
            // is retried: the peer tier is down meanwhile, and says so.
            let mut backoff = membership::source_backoff();
            let mut source = loop {
                match membership::start(settings.clone(), stop.clone()).await {
                    Ok(source) => break source,
                    Err(membership::MembershipError::Cancelled) => return,
                    Err(e) => {
                        let delay = backoff.next_delay();
                        tracing::error!(error = %e, retry_in_s = delay.as_secs(), "membership did not start; the peer tier is down until it does");
                        *lock(&problem) = Some(format!(
                            "membership did not start: {e} (retrying every {} s at most)",
                            delay.as_secs()
                        ));
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            };
            *lock(&problem) = None;
            loop {
                let view = Arc::clone(&source.borrow_and_update());
                publish.send_replace(view);
                tokio::select! {
                    changed = source.changed() => if changed.is_err() { return },
                    () = stop.cancelled() => return,
                }
            }
        });
        let tier = Arc::new(Self {
            me: config.node_id.clone(),
            port: config.listen.port(),
            replicas: config.replicas,
            concurrency: config.concurrency,
            request_timeout: config.request_timeout,
            tls,
            membership,
            source,
            clients: Mutex::new(HashMap::new()),
            holders: Mutex::new(HoldersCache::default()),
            store,
            metrics,
            membership_problem,
            settings: HealthSettings {
                check_interval: config.check_interval,
                holder_grace: config.holder_grace,
                checks_per_sec: config.checks_per_sec,
                scrub_bytes_per_sec: config.scrub_bytes_per_sec,
            },
            health: Mutex::new(health::HealthBook::default()),
        });
        tokio::spawn(Arc::clone(&tier).scrub_loop(cancel.clone()));
        tokio::spawn(Arc::clone(&tier).collect_garbage_loop(cancel));
        Ok(tier)
    }

    async fn collect_garbage_loop(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(REPLICA_GC_INTERVAL) => {}
                () = cancel.cancelled() => return,
            }
            match self.store.collect_garbage(REPLICA_GC_MIN_AGE).await {
                Ok(report) if report.chunks > 0 => {
                    tracing::info!(
                        chunks = report.chunks,
                        bytes = report.bytes,
                        "removed replica chunks no manifest names"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "collecting replica chunks failed"),
            }
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.me
    }

    /// The peer port of members that do not name one.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many placement candidates a shard's replicas are tried on (the
    /// replicas, then fallbacks for full or unreachable ones): receivers
    /// refuse replicas placement does not put on them.
    pub fn placement_candidates(&self) -> usize {
        self.replicas.saturating_add(FALLBACK_CANDIDATES)
    }

    /// Replicas wanted of each shard.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Whether peer traffic is authenticated.
    pub fn insecure(&self) -> bool {
        self.tls.is_none()
    }

    /// Where membership comes from.
    pub fn membership_source(&self) -> &'static str {
        self.source
    }

    /// The TLS material, for the server.
    pub fn tls(&self) -> Option<&PeerTls> {
        self.tls.as_ref()
    }

    /// A receiver of membership views, for the server and the pipeline.
    pub fn membership(&self) -> watch::Receiver<Arc<MembershipView>> {
        self.membership.clone()
    }

    /// Why the tier has no membership yet (its source has not delivered a
    /// view, or could not start); `None` when it works.
    pub fn membership_problem(&self) -> Option<String> {
        lock(&self.membership_problem).clone()
    }

    /// The current membership view.
    pub fn view(&self) -> Arc<MembershipView> {
        Arc::clone(&self.membership.borrow())
    }

    /// This node as a member, with the failure domains the membership gives
    /// it (none while it is not listed yet).
    pub fn me(&self) -> Member {
        self.view()
            .get(&self.me)
            .map(|p| p.member.clone())
            .unwrap_or_else(|| Member::new(self.me.clone()))
    }

    /// A client for a member (`None` when it is not in the view). Clients
    /// are kept per node and replaced when the node's address changes.
    fn client(&self, view: &MembershipView, node: &NodeId) -> Result<Option<Arc<PeerClient>>> {
        let Some(peer) = view.get(node) else {
            return Ok(None);
        };
        let addr = peer.socket_addr(self.port);
        let mut clients = lock(&self.clients);
        if let Some(client) = clients.get(node)
            && client.addr() == addr
        {
            return Ok(Some(Arc::clone(client)));
        }
        let client = Arc::new(PeerClient::new(
            &self.me,
            node.clone(),
            addr,
            self.tls.as_ref(),
            self.request_timeout,
            Arc::clone(&self.metrics),
        )?);
        clients.insert(node.clone(), Arc::clone(&client));
        Ok(Some(client))
    }

    /// Has member `node` restore a shard into its memory tier (an
    /// operator's prefetch onto a replacement node). Uses a channel of its
    /// own: a restore may run far longer than one chunk request may.
    pub async fn prefetch_on(
        &self,
        node: &NodeId,
        shard: cairn_proto::v1::ShardSelector,
    ) -> Result<crate::wire::PrefetchEvents<tonic::Status>> {
        let view = self.view();
        let Some(peer) = view.get(node) else {
            return Err(Error::NotFound(format!(
                "node {node} is not a member of this node's membership view"
            )));
        };
        let client = PeerClient::new(
            &self.me,
            node.clone(),
            peer.socket_addr(self.port),
            self.tls.as_ref(),
            PREFETCH_TIMEOUT,
            Arc::clone(&self.metrics),
        )?;
        client.prefetch(shard).await
    }

    /// Copies `manifest`'s shard, whose owner is `owner`, to the first `R`
    /// placement candidates that take it, reading chunks from `sources`.
    /// A full or unreachable candidate is skipped for the next one in
    /// placement order. This node counts as a holder when it is a candidate
    /// and its replica store has the shard (re-replication for an owner that
    /// left). Cancel-safe: dropping the future abandons the copy, and the
    /// receiver never stores a manifest before its chunks.
    pub async fn replicate(
        &self,
        manifest: &Arc<Manifest>,
        owner: &Member,
        sources: &[&dyn ShardSource],
        cancel: &CancellationToken,
    ) -> ReplicationOutcome {
        let view = self.view();
        let key = PlacementKey::from(&manifest.shard);
        let candidates = view
            .membership()
            .place(&key, owner, self.placement_candidates());
        let mut outcome = ReplicationOutcome::default();
        for node in candidates {
            if outcome.holders.len() == self.replicas {
                break;
            }
            if node == self.me {
                if matches!(self.store.manifest(&manifest.shard).await, Ok(Some(m)) if m.hash() == manifest.hash())
                {
                    outcome.holders.push(node);
                }
                continue;
            }
            let client = match self.client(&view, &node) {
                Ok(Some(client)) => client,
                Ok(None) => continue,
                Err(e) => {
                    outcome.problems.push(e.to_string());
                    continue;
                }
            };
            let sink = ReplicaSink {
                peer: &client,
                owner,
            };
            match copy_shard(
                manifest,
                sources,
                &sink,
                self.concurrency,
                None,
                &self.metrics,
                cancel,
            )
            .await
            {
                Ok(report) => {
                    self.record_contact(&node, true);
                    outcome.bytes_sent = outcome.bytes_sent.saturating_add(report.bytes_written);
                    outcome.holders.push(node);
                }
                Err(e) => {
                    let reason = match &e {
                        Error::Peer { status, .. } => match status.code() {
                            tonic::Code::ResourceExhausted => "full",
                            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                                "unreachable"
                            }
                            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                                "refused"
                            }
                            _ => "error",
                        },
                        e if e.is_out_of_space() => "full",
                        Error::DeadlineExceeded(_)
                        | Error::TierUnavailable(_)
                        | Error::Cancelled => "unreachable",
                        Error::Unauthenticated(_) | Error::PermissionDenied(_) => "refused",
                        _ => "error",
                    };
                    self.record_contact(&node, reason != "unreachable");
                    self.metrics
                        .replication_failures
                        .with_label_values(&[reason])
                        .inc();
                    tracing::warn!(shard = %manifest.shard, peer = %node, reason, error = %e, "replica copy failed; trying the next candidate");
                    outcome.problems.push(e.to_string());
                }
            }
        }
        // The owner, when a member, is one of `len()`: never saturates.
        let eligible = view
            .len()
            .saturating_sub(usize::from(view.get(&owner.id).is_some()));
        if outcome.holders.len() < self.replicas && eligible < self.replicas {
            outcome.problems.push(format!(
                "the membership has {eligible} node(s) besides the owner, fewer than the {} replicas wanted",
                self.replicas
            ));
        }
        outcome
    }

    /// Asks `nodes` for their replica of `key`; returns who answered with
    /// which manifest.
    async fn search(
        &self,
        view: &MembershipView,
        key: &ShardKey,
        nodes: &[NodeId],
    ) -> Vec<(NodeId, Manifest)> {
        stream::iter(nodes.iter().cloned())
            .map(|node| async move {
                if node == self.me {
                    let found = self.store.manifest(key).await.ok().flatten();
                    return found.map(|m| (node, Manifest::clone(&m)));
                }
                let client = self.client(view, &node).ok().flatten()?;
                match tokio::time::timeout(LOOKUP_TIMEOUT, client.replica(key)).await {
                    Ok(Ok(found)) => found.map(|m| (node, m)),
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %node, shard = %key, error = %e, "peer did not answer a search");
                        None
                    }
                    Err(_) => None,
                }
            })
            .buffer_unordered(FAN_OUT)
            .filter_map(|found| async move { found })
            .collect()
            .await
    }

    /// Remembers the holders of the most common manifest among `found` and
    /// returns it.
    fn settle(&self, key: &ShardKey, found: Vec<(NodeId, Manifest)>) -> Option<Arc<Manifest>> {
        let mut by_hash: BTreeMap<ChunkId, (Manifest, Vec<NodeId>)> = BTreeMap::new();
        for (node, manifest) in found {
            by_hash
                .entry(manifest.hash())
                .or_insert_with(|| (manifest, Vec::new()))
                .1
                .push(node);
        }
        if by_hash.len() > 1 {
            tracing::warn!(shard = %key, versions = by_hash.len(), "peers hold different manifests for one shard; using the most common");
        }
        let (manifest, mut holders) = by_hash.into_values().max_by_key(|(_, h)| h.len())?;
        holders.sort();
        lock(&self.holders).insert(key.clone(), manifest.hash(), holders);
        Some(Arc::new(manifest))
    }

    /// The holders of a shard found by the last search or listing.
    pub fn known_holders(&self, key: &ShardKey) -> Vec<NodeId> {
        lock(&self.holders)
            .get(key)
            .map(|(_, holders)| holders.to_vec())
            .unwrap_or_default()
    }

    /// The nodes holding a replica identical to `manifest` (searched for if
    /// no search found them yet), for a restore that reads from each.
    pub async fn holders_of(&self, manifest: &Manifest) -> Vec<NodeId> {
        let key = &manifest.shard;
        if lock(&self.holders).get(key).is_none()
            && let Err(e) = self.manifest(key).await
        {
            tracing::warn!(shard = %key, error = %e, "searching the peers failed");
        }
        match lock(&self.holders).get(key) {
            Some((hash, holders)) if hash == manifest.hash() => holders.to_vec(),
            _ => Vec::new(),
        }
    }

    /// Asks `node` to drop its replica of `key`, a shard of this node's
    /// that it no longer counts; whether it held one.
    pub async fn drop_surplus(&self, node: &NodeId, key: &ShardKey) -> Result<bool> {
        let client = self.client(&self.view(), node)?.ok_or_else(|| {
            Error::FailedPrecondition(format!("{node} is not a member of the peer tier"))
        })?;
        let dropped = client.drop_replica(key).await;
        self.record_contact(node, dropped.is_ok());
        dropped
    }

    /// Sends one chunk to `node` (which re-hashes it before storing it,
    /// replacing a bad copy): what `cairn verify --tier peers --repair`
    /// does for each bad chunk of a holder.
    pub async fn put_chunk_on(
        &self,
        node: &NodeId,
        tenant: &TenantName,
        id: &ChunkId,
        data: bytes::Bytes,
    ) -> Result<()> {
        let client = self.client(&self.view(), node)?.ok_or_else(|| {
            Error::FailedPrecondition(format!("{node} is not a member of the peer tier"))
        })?;
        client.put_chunk(tenant, id, data).await
    }

    /// One holder as a source of its own, so that a restore can plan which
    /// chunks to read from which holder.
    pub fn holder(&self, node: NodeId) -> PeerHolder<'_> {
        PeerHolder { tier: self, node }
    }

    /// Reads one chunk from one holder and verifies it.
    async fn read_from(
        &self,
        view: &MembershipView,
        holder: &NodeId,
        location: &ChunkLocation,
    ) -> Result<ChunkRead> {
        let tenant = &location.shard().tenant;
        let id = location.chunk.id;
        let bytes = if holder == &self.me {
            self.store.chunk(tenant, &id).await?
        } else {
            let Some(client) = self.client(view, holder)? else {
                return Ok(ChunkRead::Missing);
            };
            client.chunk(tenant, &id).await?
        };
        let Some(bytes) = bytes else {
            return Ok(ChunkRead::Missing);
        };
        let expected_len = location.chunk.len;
        tokio::task::spawn_blocking(move || {
            if bytes.len() as u64 == expected_len && ChunkId::of(&bytes) == id {
                ChunkRead::Verified(bytes)
            } else {
                ChunkRead::Corrupt
            }
        })
        .await
        .map_err(Error::from)
    }
}

#[async_trait]
impl ShardSource for PeerTier {
    fn kind(&self) -> TierKind {
        TierKind::Peers
    }

    /// Asks the nodes placement names first (from this node's view, which
    /// for a shard this node owns is exactly where its replicas are), then
    /// every other member.
    async fn manifest(&self, key: &ShardKey) -> Result<Option<Arc<Manifest>>> {
        let view = self.view();
        let mut first = view.membership().place(
            &PlacementKey::from(key),
            &self.me(),
            self.replicas + SEARCH_EXTRA,
        );
        first.push(self.me.clone());
        let mut found = self.search(&view, key, &first).await;
        if found.is_empty() {
            let rest: Vec<NodeId> = view
                .peers()
                .iter()
                .map(|p| p.id().clone())
                .filter(|id| !first.contains(id))
                .collect();
            found = self.search(&view, key, &rest).await;
        }
        Ok(self.settle(key, found))
    }

    /// Every member's replicas of the tenant (unreachable members are
    /// logged and left out).
    async fn list(&self, tenant: &TenantName, job: Option<&JobName>) -> Result<Vec<Arc<Manifest>>> {
        let view = self.view();
        let nodes: Vec<NodeId> = view.peers().iter().map(|p| p.id().clone()).collect();
        let answers: Vec<(NodeId, Vec<Manifest>)> = stream::iter(nodes)
            .map(|node| {
                let view = &view;
                async move {
                    if node == self.me {
                        let held = self.store.list(tenant, job).await.unwrap_or_default();
                        return Some((node, held.iter().map(|m| Manifest::clone(m)).collect()));
                    }
                    let client = self.client(view, &node).ok().flatten()?;
                    match tokio::time::timeout(LOOKUP_TIMEOUT, client.replicas(tenant, job)).await {
                        Ok(Ok(held)) => Some((node, held)),
                        Ok(Err(e)) => {
                            tracing::warn!(peer = %node, error = %e, "cannot list a peer's replicas");
                            None
                        }
                        Err(_) => {
                            tracing::warn!(peer = %node, "a peer did not list its replicas in time");
                            None
                        }
                    }
                }
            })
            .buffer_unordered(FAN_OUT)
            .filter_map(|answer| async move { answer })
            .collect()
            .await;
        let mut found: BTreeMap<ShardKey, Vec<(NodeId, Manifest)>> = BTreeMap::new();
        for (node, manifests) in answers {
            for manifest in manifests {
                found
                    .entry(manifest.shard.clone())
                    .or_default()
                    .push((node.clone(), manifest));
            }
        }
        Ok(found
            .into_iter()
            .filter_map(|(key, found)| self.settle(&key, found))
            .collect())
    }

    /// Reads the chunk from the holders in turn, starting at one chosen by
    /// the chunk id so that the chunks of a shard spread over all holders.
    /// A corrupt copy is reported and the next holder asked.
    async fn read_chunk(&self, location: &ChunkLocation) -> Result<ChunkRead> {
        let key = location.shard();
        let mut holders = self.known_holders(key);
        if holders.is_empty() {
            self.manifest(key).await?;
            holders = self.known_holders(key);
        }
        if holders.is_empty() {
            return Ok(ChunkRead::Missing);
        }
        let view = self.view();
        let start = usize::from(location.chunk.id.as_bytes()[0])
            .checked_rem(holders.len())
            .unwrap_or(0);
        holders.rotate_left(start);
        let mut corrupt = false;
        let mut last_error = None;
        for holder in &holders {
            match self.read_from(&view, holder, location).await {
                Ok(ChunkRead::Verified(bytes)) => return Ok(ChunkRead::Verified(bytes)),
                Ok(ChunkRead::Missing) => {}
                Ok(ChunkRead::Corrupt) => {
                    corrupt = true;
                    self.metrics
                        .chunk_verify_failures
                        .with_label_values(&[TierKind::Peers.as_str()])
                        .inc();
                    tracing::warn!(peer = %holder, chunk = %location.chunk.id, shard = %key, "a peer served a corrupt copy of a chunk; trying another holder");
                }
                Err(e) => {
                    tracing::warn!(peer = %holder, chunk = %location.chunk.id, error = %e, "reading a chunk from a peer failed; trying another holder");
                    last_error = Some(e);
                }
            }
        }
        match (corrupt, last_error) {
            (true, _) => Ok(ChunkRead::Corrupt),
            (false, Some(e)) => Err(e),
            (false, None) => Ok(ChunkRead::Missing),
        }
    }
}

/// One node holding a replica, as a source: reads every chunk from that node
/// only (verified), so the restore planner can spread chunks over holders.
pub struct PeerHolder<'a> {
    tier: &'a PeerTier,
    node: NodeId,
}

impl PeerHolder<'_> {
    /// The node.
    pub fn node(&self) -> &NodeId {
        &self.node
    }
}

#[async_trait]
impl ShardSource for PeerHolder<'_> {
    fn kind(&self) -> TierKind {
        TierKind::Peers
    }

    async fn manifest(&self, key: &ShardKey) -> Result<Option<Arc<Manifest>>> {
        let view = self.tier.view();
        let found = self
            .tier
            .search(&view, key, std::slice::from_ref(&self.node))
            .await;
        Ok(found.into_iter().next().map(|(_, m)| Arc::new(m)))
    }

    async fn list(
        &self,
        _tenant: &TenantName,
        _job: Option<&JobName>,
    ) -> Result<Vec<Arc<Manifest>>> {
        // Listing goes through the whole tier; one holder is only read from.
        Ok(Vec::new())
    }

    async fn read_chunk(&self, location: &ChunkLocation) -> Result<ChunkRead> {
        let read = self
            .tier
            .read_from(&self.tier.view(), &self.node, location)
            .await?;
        if matches!(read, ChunkRead::Corrupt) {
            tracing::warn!(peer = %self.node, chunk = %location.chunk.id, shard = %location.shard(), "a peer served a corrupt copy of a chunk");
        }
        Ok(read)
    }
}

/// Most shards whose holders a node remembers; the oldest entry goes first.
/// A restore reads a shard's holders right after searching for them, so a
/// small cache loses nothing, and a long-lived node's memory stays bounded.
const MAX_CACHED_HOLDERS: usize = 4096;

/// The holders of recently searched shards, with the hash of the manifest
/// they hold, bounded to [`MAX_CACHED_HOLDERS`] entries.
#[derive(Debug, Default)]
struct HoldersCache {
    entries: HashMap<ShardKey, (u64, ChunkId, Vec<NodeId>)>,
    inserted: u64,
}

impl HoldersCache {
    fn insert(&mut self, key: ShardKey, manifest: ChunkId, holders: Vec<NodeId>) {
        if self.entries.len() >= MAX_CACHED_HOLDERS
            && !self.entries.contains_key(&key)
            && let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (seq, _, _))| *seq)
                .map(|(k, _)| k.clone())
        {
            self.entries.remove(&oldest);
        }
        self.inserted = self.inserted.saturating_add(1);
        self.entries.insert(key, (self.inserted, manifest, holders));
    }

    fn get(&self, key: &ShardKey) -> Option<(ChunkId, &[NodeId])> {
        self.entries
            .get(key)
            .map(|(_, hash, holders)| (*hash, holders.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use cairn_core::{JobName, Rank, Step, TenantName};

    use super::*;

    fn key(step: u64) -> ShardKey {
        ShardKey {
            tenant: TenantName::parse("tenant", "t".into()).expect("valid tenant"),
            job: JobName::parse("job", "job".into()).expect("valid job"),
            step: Step(step),
            rank: Rank(0),
        }
    }

    #[test]
    fn the_holders_cache_keeps_the_newest_entries_only() {
        let node = NodeId::parse("node", "node-1".into()).expect("valid node");
        let hash = ChunkId::of(b"manifest");
        let mut cache = HoldersCache::default();
        let extra = 10;
        for step in 0..(MAX_CACHED_HOLDERS + extra) as u64 {
            cache.insert(key(step), hash, vec![node.clone()]);
        }
        assert_eq!(cache.entries.len(), MAX_CACHED_HOLDERS);
        assert!(cache.get(&key(0)).is_none(), "the oldest entry went first");
        assert!(cache.get(&key(extra as u64 - 1)).is_none());
        assert!(cache.get(&key(extra as u64)).is_some());
        // Refreshing a key already cached evicts nothing.
        cache.insert(key(extra as u64), hash, Vec::new());
        assert_eq!(cache.entries.len(), MAX_CACHED_HOLDERS);
        assert_eq!(cache.get(&key(extra as u64)), Some((hash, &[][..])));
        let newest = (MAX_CACHED_HOLDERS + extra - 1) as u64;
        assert_eq!(cache.get(&key(newest)), Some((hash, &[node][..])));
    }
}
