//! The `cairn.v1.Admin` service: what operators and the CLI call.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cairn_core::{NodeId, Rank, ShardKey, Step};
use cairn_proto::v1 as pb;
use cairn_proto::v1::admin_server::Admin;
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::access::{Access, VolumeSockets};
use super::convert;
use super::to_status;
use crate::error::Error;
use crate::node::{Node, StepSelection};
use crate::service::peer::PrefetchTarget;
use crate::wire::PrefetchEvents;

/// The service; cheap to clone.
#[derive(Clone)]
pub struct AdminService {
    node: Arc<Node>,
    access: Access,
    volumes: Arc<dyn VolumeSockets>,
}

impl AdminService {
    /// Serves `node` to clients of a socket that allows `access`; binds
    /// volumes' sockets through `volumes`.
    pub fn new(node: Arc<Node>, access: Access, volumes: Arc<dyn VolumeSockets>) -> Self {
        Self {
            node,
            access,
            volumes,
        }
    }

    /// Refuses `method` unless this is the operator's socket.
    fn operator_only(&self, method: &'static str) -> Result<(), Status> {
        self.access
            .operator_only(method)
            .map_err(|e| to_status(&self.node.metrics, method, e))
    }
}

type VerifyStream = Pin<Box<dyn Stream<Item = Result<pb::VerifyProgress, Status>> + Send>>;

/// Least bytes between two verify progress messages.
const PROGRESS_EVERY_BYTES: u64 = 64 * 1024 * 1024;

#[tonic::async_trait]
impl Admin for AdminService {
    #[tracing::instrument(name = "Status", skip_all)]
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.operator_only("Status")?;
        let pipelines = self.node.pipelines();
        let outstanding = |name: &str| {
            pipelines
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0, |(_, c)| c.outstanding() as u32)
        };
        Ok(Response::new(pb::StatusResponse {
            node: self.node.config().node_name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            tiers: self
                .node
                .tier_status()
                .into_iter()
                .map(|t| pb::TierUsage {
                    tier: convert::tier_to_pb(t.tier) as i32,
                    path: t.path.to_string_lossy().into_owned(),
                    used_bytes: t.used,
                    capacity_bytes: t.capacity,
                    shards: t.shards,
                })
                .collect(),
            open_sessions: self.node.open_sessions() as u32,
            pending_writebacks: outstanding("write-back"),
            pending_uploads: outstanding("upload"),
            pipelines: pipelines
                .iter()
                .map(|(name, counts)| pb::PipelineStatus {
                    name: (*name).into(),
                    pending: counts.pending as u32,
                    retrying: counts.retrying as u32,
                    needs_attention: counts.needs_attention as u32,
                    durable: counts.durable as u32,
                })
                .collect(),
            default_tenant: self.node.config().default_tenant.to_string(),
            metrics_addr: self
                .node
                .config()
                .metrics_addr
                .map(|a| a.to_string())
                .unwrap_or_default(),
            restores: self
                .node
                .restores
                .snapshots()
                .iter()
                .map(convert::restore_progress)
                .collect(),
            peers: self.node.peers.as_ref().map(|peers| {
                let (pending, short) = self.node.replication_counts();
                let (replica_shards, replica_bytes) = peers.store.usage();
                let held_by = self.node.shards_held_by();
                let scrub = peers.scrub_status();
                pb::PeerTierStatus {
                    node_id: peers.node_id().to_string(),
                    replicas: peers.replicas() as u32,
                    membership_source: peers.membership_source().into(),
                    members: peers
                        .view()
                        .peers()
                        .iter()
                        .map(|p| {
                            let health = peers.member_health(p.id());
                            pb::PeerMember {
                                node_id: p.id().to_string(),
                                address: p.socket_addr(peers.port()).to_string(),
                                zone: p.member.zone.clone().unwrap_or_default(),
                                rack: p.member.rack.clone().unwrap_or_default(),
                                unreachable: health.unreachable(),
                                last_contact_unix_ms: health
                                    .last_contact
                                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                                    .map_or(0, |d| d.as_millis() as u64),
                                holds_shards: held_by.get(p.id()).copied().unwrap_or(0),
                            }
                        })
                        .collect(),
                    pending_replications: pending,
                    under_replicated_shards: short,
                    replica_shards,
                    replica_bytes,
                    insecure: peers.insecure(),
                    scrub_passes: scrub.passes,
                    scrub_checked_chunks: scrub.checked_in_pass,
                    scrub_pass_chunks: scrub.chunks_in_pass,
                    scrub_bad_chunks: scrub.bad_chunks,
                    scrub_bytes_per_sec: scrub.bytes_per_sec,
                    membership_problem: peers.membership_problem().unwrap_or_default(),
                }
            }),
        }))
    }

    type VerifyStream = VerifyStream;

    #[tracing::instrument(name = "Verify", skip_all, fields(job = %request.get_ref().job, step = request.get_ref().step))]
    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<VerifyStream>, Status> {
        self.operator_only("Verify")?;
        let req = request.into_inner();
        let parsed = (|| {
            Ok::<_, crate::error::Error>((
                self.node.tenant(&req.tenant)?,
                convert::job("job", &req.job)?,
                convert::tier("tier", req.tier)?,
            ))
        })();
        let (tenant, job, tier) = parsed.map_err(|e| to_status(&self.node.metrics, "Verify", e))?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let node = Arc::clone(&self.node);
        tokio::spawn(async move {
            let last_sent = AtomicU64::new(0);
            let progress_tx = tx.clone();
            let progress = move |done: u64, total: u64| {
                let last = last_sent.load(Ordering::Relaxed);
                if done == total || done.saturating_sub(last) >= PROGRESS_EVERY_BYTES {
                    last_sent.store(done, Ordering::Relaxed);
                    let _ = progress_tx.try_send(Ok(pb::VerifyProgress {
                        bytes_done: done,
                        bytes_total: total,
                        bad_chunks: vec![],
                        done: false,
                    }));
                }
            };
            let selection = StepSelection {
                tenant,
                job,
                step: Step(req.step),
                rank: req.rank.map(Rank),
            };
            let result = node.verify(&selection, tier, req.repair, &progress).await;
            let last = match result {
                Ok(findings) => Ok(pb::VerifyProgress {
                    bytes_done: 0,
                    bytes_total: 0,
                    bad_chunks: findings
                        .into_iter()
                        .map(|f| pb::BadChunk {
                            rank: f.rank.0,
                            file: f.file,
                            offset: f.offset,
                            chunk_id: f.chunk.as_bytes().to_vec(),
                            problem: f.problem,
                            repaired: f.repaired,
                            holder: f.holder.map(|h| h.to_string()).unwrap_or_default(),
                        })
                        .collect(),
                    done: true,
                }),
                Err(e) => Err(to_status(&node.metrics, "Verify", e)),
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(name = "Gc", skip_all, fields(dry_run = request.get_ref().dry_run))]
    async fn gc(
        &self,
        request: Request<pb::GcRequest>,
    ) -> Result<Response<pb::GcResponse>, Status> {
        self.operator_only("Gc")?;
        let report = self
            .node
            .gc(request.get_ref().dry_run)
            .await
            .map_err(|e| to_status(&self.node.metrics, "Gc", e))?;
        let object_store_configured = report.object_store.is_some();
        let bucket = report.object_store.unwrap_or_default();
        Ok(Response::new(pb::GcResponse {
            chunks_removed: report.disk.chunks,
            bytes_removed: report.disk.bytes,
            object_store_chunks_removed: bucket.chunks,
            object_store_bytes_removed: bucket.bytes,
            object_store_skipped_tenants: bucket.skipped_tenants,
            object_store_configured,
        }))
    }

    type PrefetchStream = PrefetchEvents<Status>;

    #[tracing::instrument(name = "Prefetch", skip_all, fields(node = %request.get_ref().node))]
    async fn prefetch(
        &self,
        request: Request<pb::PrefetchRequest>,
    ) -> Result<Response<Self::PrefetchStream>, Status> {
        self.operator_only("Prefetch")?;
        let req = request.into_inner();
        let selector = convert::required("shard", &req.shard)
            .cloned()
            .map_err(|e| to_status(&self.node.metrics, "Prefetch", e))?;
        let metrics = Arc::clone(&self.node.metrics);
        if req.node.is_empty() || req.node == self.node.config().node_name {
            let events = prefetch_here(Arc::clone(&self.node), selector)
                .map(move |event| event.map_err(|e| to_status(&metrics, "Prefetch", e)));
            return Ok(Response::new(Box::pin(events)));
        }
        // Validated before anything echoes it: a name of any length from
        // the request must not come back whole in an error message.
        let node = NodeId::parse("node", req.node)
            .map_err(|e| to_status(&metrics, "Prefetch", e.into()))?;
        let Some(peers) = &self.node.peers else {
            return Err(to_status(
                &metrics,
                "Prefetch",
                Error::FailedPrecondition(format!(
                    "this node has no peer tier ([membership]), so it cannot reach node {node}"
                )),
            ));
        };
        let events = peers
            .prefetch_on(&node, selector)
            .await
            .map_err(|e| to_status(&metrics, "Prefetch", e))?;
        Ok(Response::new(events))
    }

    #[tracing::instrument(name = "BindVolume", skip_all, fields(volume_id = %request.get_ref().volume_id))]
    async fn bind_volume(
        &self,
        request: Request<pb::BindVolumeRequest>,
    ) -> Result<Response<pb::BindVolumeResponse>, Status> {
        self.operator_only("BindVolume")?;
        let binding = self
            .volumes
            .bind(&request.get_ref().volume_id)
            .await
            .map_err(|e| to_status(&self.node.metrics, "BindVolume", e))?;
        Ok(Response::new(pb::BindVolumeResponse {
            tenant: binding.tenant.to_string(),
            job: binding.job.to_string(),
            socket_path: binding.socket_path().to_string_lossy().into_owned(),
        }))
    }

    #[tracing::instrument(name = "UnbindVolume", skip_all, fields(volume_id = %request.get_ref().volume_id))]
    async fn unbind_volume(
        &self,
        request: Request<pb::UnbindVolumeRequest>,
    ) -> Result<Response<pb::UnbindVolumeResponse>, Status> {
        self.operator_only("UnbindVolume")?;
        let was_bound = self
            .volumes
            .unbind(&request.get_ref().volume_id)
            .await
            .map_err(|e| to_status(&self.node.metrics, "UnbindVolume", e))?;
        Ok(Response::new(pb::UnbindVolumeResponse { was_bound }))
    }
}

/// How often a prefetch reports its progress.
const PREFETCH_PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// Restores the selected shard (its newest complete step when none is
/// named) into this node's memory tier, reporting progress while it runs:
/// the operator's prefetch, asked here or forwarded by another node. The
/// restore goes on if the caller stops listening; it is the same restore
/// the job would start.
fn prefetch_here(node: Arc<Node>, selector: pb::ShardSelector) -> PrefetchEvents<Error> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let done = prefetch_with_progress(&node, &selector, &tx).await;
        let _ = tx
            .send(done.map(|done| pb::PrefetchProgress {
                event: Some(pb::prefetch_progress::Event::Done(done)),
            }))
            .await;
    });
    Box::pin(ReceiverStream::new(rx))
}

async fn prefetch_with_progress(
    node: &Node,
    selector: &pb::ShardSelector,
    tx: &tokio::sync::mpsc::Sender<Result<pb::PrefetchProgress, Error>>,
) -> Result<pb::PrefetchResponse, Error> {
    let (tenant, job, step, rank) = convert::selector(node, "shard", selector)?;
    let step = node.resolve_step(&tenant, &job, step, rank).await?;
    let key = ShardKey {
        tenant,
        job,
        step,
        rank,
    };
    let mut restore = std::pin::pin!(node.restore(&key, true));
    let mut ticks = tokio::time::interval(PREFETCH_PROGRESS_INTERVAL);
    let outcome = loop {
        tokio::select! {
            outcome = &mut restore => break outcome?,
            _ = ticks.tick() => {
                if let Some(now) = node.restores.of(&key) {
                    let event = pb::prefetch_progress::Event::Progress(convert::restore_progress(&now));
                    let _ = tx.try_send(Ok(pb::PrefetchProgress { event: Some(event) }));
                }
            }
        }
    };
    Ok(pb::PrefetchResponse {
        node: node.config().node_name.clone(),
        step: step.0,
        bytes: outcome.manifest.total_bytes(),
        sources: convert::source_bytes(&outcome.bytes_by_tier),
    })
}

impl PrefetchTarget for Node {
    fn prefetch(self: Arc<Self>, selector: pb::ShardSelector) -> PrefetchEvents<Error> {
        prefetch_here(self, selector)
    }
}
