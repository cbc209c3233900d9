//! The `cairn.v1.Peer` service: what other daemons call to keep replicas
//! here and read them back.
//!
//! Every request is authenticated first ([`super::tls::authenticate`]) and
//! must come from a member of the current membership view; the replicas are
//! any tenant's, since daemons act for all the node's jobs.

use std::pin::Pin;
use std::sync::Arc;

use cairn_core::{Manifest, Member, MembershipView, NodeId, Rank, ShardKey, Step, TenantName};
use cairn_proto::v1 as pb;
use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::client::chunk_id;
use super::store::ReplicaStore;
use super::tls::{NODE_HEADER, authenticate};
use crate::error::Error;
use crate::failpoint::crash_point;
use crate::metrics::Metrics;
use crate::service::convert;

/// A prefetch's progress messages, then its result.
pub type PrefetchEvents<E> = Pin<Box<dyn Stream<Item = Result<pb::PrefetchProgress, E>> + Send>>;

/// What the peer service asks of its own node: a restore into the memory
/// tier, for a prefetch another node forwards.
pub trait PrefetchTarget: Send + Sync {
    /// Restores the selected shard into this node's memory tier, streaming
    /// its progress and then its result.
    fn prefetch(self: Arc<Self>, selector: pb::ShardSelector) -> PrefetchEvents<Error>;
}

/// The peer service.
pub struct PeerService {
    store: Arc<ReplicaStore>,
    target: Arc<dyn PrefetchTarget>,
    membership: watch::Receiver<Arc<MembershipView>>,
    tls: bool,
    metrics: Arc<Metrics>,
}

impl PeerService {
    /// Serves `store` to the members of `membership`; `tls` says whether
    /// callers present certificates to check.
    pub fn new(
        store: Arc<ReplicaStore>,
        target: Arc<dyn PrefetchTarget>,
        membership: watch::Receiver<Arc<MembershipView>>,
        tls: bool,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            target,
            membership,
            tls,
            metrics,
        }
    }

    /// The calling node, authenticated and a member.
    fn caller<T>(&self, request: &Request<T>, method: &str) -> Result<NodeId, Status> {
        let header = request
            .metadata()
            .get(NODE_HEADER)
            .and_then(|v| v.to_str().ok());
        let certs = request.peer_certs();
        let result = authenticate(header, certs.as_deref().map(|c| c.as_slice()), self.tls)
            .and_then(|node| {
                if self.membership.borrow().get(&node).is_some() {
                    Ok(node)
                } else {
                    Err(Error::PermissionDenied(format!(
                        "node {node} is not a member of this node's membership view"
                    )))
                }
            });
        result.map_err(|e| self.refuse(method, e))
    }

    fn refuse(&self, method: &str, e: Error) -> Status {
        let status = Status::from(e);
        self.metrics
            .rpc_errors
            .with_label_values(&[method, &format!("{:?}", status.code())])
            .inc();
        if matches!(
            status.code(),
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
        ) {
            tracing::warn!(method, error = status.message(), "peer request refused");
        }
        status
    }

    fn tenant(&self, method: &str, tenant: &str) -> Result<TenantName, Status> {
        TenantName::parse("tenant", tenant.to_owned()).map_err(|e| self.refuse(method, e.into()))
    }
}

type RpcResult<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    async fn missing_chunks(
        &self,
        request: Request<pb::PeerMissingChunksRequest>,
    ) -> RpcResult<pb::PeerMissingChunksResponse> {
        const METHOD: &str = "Peer/MissingChunks";
        self.caller(&request, METHOD)?;
        let request = request.into_inner();
        let tenant = self.tenant(METHOD, &request.tenant)?;
        let ids = request
            .ids
            .iter()
            .map(|id| chunk_id(id))
            .collect::<Result<Vec<_>, _>>()?;
        let missing = self
            .store
            .missing(&tenant, &ids)
            .await
            .map_err(|e| self.refuse(METHOD, e))?;
        Ok(Response::new(pb::PeerMissingChunksResponse {
            ids: missing.iter().map(|id| id.as_bytes().to_vec()).collect(),
        }))
    }

    async fn put_chunk(
        &self,
        request: Request<pb::PeerPutChunkRequest>,
    ) -> RpcResult<pb::PeerPutChunkResponse> {
        const METHOD: &str = "Peer/PutChunk";
        let caller = self.caller(&request, METHOD)?;
        crash_point("peer.receive_chunk");
        let request = request.into_inner();
        let tenant = self.tenant(METHOD, &request.tenant)?;
        let id = chunk_id(&request.id)?;
        let len = request.data.len() as u64;
        self.store
            .put_chunk(&tenant, id, request.data)
            .await
            .map_err(|e| self.refuse(METHOD, e))?;
        self.metrics
            .peer_received_bytes
            .with_label_values(&[caller.as_str()])
            .inc_by(len);
        Ok(Response::new(pb::PeerPutChunkResponse {}))
    }

    async fn put_manifest(
        &self,
        request: Request<pb::PeerPutManifestRequest>,
    ) -> RpcResult<pb::PeerPutManifestResponse> {
        const METHOD: &str = "Peer/PutManifest";
        let caller = self.caller(&request, METHOD)?;
        let request = request.into_inner();
        let manifest = Manifest::decode(&request.manifest)
            .map_err(|e| self.refuse(METHOD, Error::InvalidArgument(format!("manifest: {e}"))))?;
        let owner = owner_member(&request).map_err(|e| self.refuse(METHOD, e))?;
        let shard = manifest.shard.clone();
        self.store
            .put_manifest(manifest, owner)
            .await
            .map_err(|e| self.refuse(METHOD, e))?;
        tracing::info!(%shard, from = %caller, owner = %request.owner, "replica stored");
        Ok(Response::new(pb::PeerPutManifestResponse {}))
    }

    async fn get_replica(
        &self,
        request: Request<pb::PeerGetReplicaRequest>,
    ) -> RpcResult<pb::PeerGetReplicaResponse> {
        const METHOD: &str = "Peer/GetReplica";
        self.caller(&request, METHOD)?;
        let shard = request
            .into_inner()
            .shard
            .ok_or_else(|| Status::invalid_argument("shard: required"))?;
        let key = ShardKey {
            tenant: self.tenant(METHOD, &shard.tenant)?,
            job: convert::job("shard.job", &shard.job).map_err(|e| self.refuse(METHOD, e))?,
            step: Step(shard.step),
            rank: Rank(shard.rank),
        };
        match self.store.manifest(&key).await {
            Ok(Some(manifest)) => Ok(Response::new(pb::PeerGetReplicaResponse {
                manifest: manifest.encode(),
            })),
            Ok(None) => Err(Status::not_found(format!("no replica of shard {key} here"))),
            Err(e) => Err(self.refuse(METHOD, e)),
        }
    }

    async fn list_replicas(
        &self,
        request: Request<pb::PeerListReplicasRequest>,
    ) -> RpcResult<pb::PeerListReplicasResponse> {
        const METHOD: &str = "Peer/ListReplicas";
        self.caller(&request, METHOD)?;
        let request = request.into_inner();
        let tenant = self.tenant(METHOD, &request.tenant)?;
        let job = match request.job.as_str() {
            "" => None,
            job => Some(convert::job("job", job).map_err(|e| self.refuse(METHOD, e))?),
        };
        let manifests = self
            .store
            .list(&tenant, job.as_ref())
            .await
            .map_err(|e| self.refuse(METHOD, e))?;
        Ok(Response::new(pb::PeerListReplicasResponse {
            manifests: manifests.iter().map(|m| m.encode()).collect(),
        }))
    }

    async fn get_chunk(
        &self,
        request: Request<pb::PeerGetChunkRequest>,
    ) -> RpcResult<pb::PeerGetChunkResponse> {
        const METHOD: &str = "Peer/GetChunk";
        let caller = self.caller(&request, METHOD)?;
        crash_point("peer.serve_chunk");
        let request = request.into_inner();
        let tenant = self.tenant(METHOD, &request.tenant)?;
        let id = chunk_id(&request.id)?;
        match self.store.chunk(&tenant, &id).await {
            Ok(Some(data)) => {
                self.metrics
                    .peer_sent_bytes
                    .with_label_values(&[caller.as_str()])
                    .inc_by(data.len() as u64);
                Ok(Response::new(pb::PeerGetChunkResponse { data }))
            }
            Ok(None) => Err(Status::not_found(format!("chunk {id} is not stored here"))),
            Err(e) => Err(self.refuse(METHOD, e)),
        }
    }

    type PrefetchStream = PrefetchEvents<Status>;

    async fn prefetch(
        &self,
        request: Request<pb::PeerPrefetchRequest>,
    ) -> RpcResult<Self::PrefetchStream> {
        const METHOD: &str = "Peer/Prefetch";
        let caller = self.caller(&request, METHOD)?;
        let selector = request
            .into_inner()
            .shard
            .ok_or_else(|| Status::invalid_argument("shard: required"))?;
        tracing::info!(from = %caller, job = %selector.job, rank = selector.rank, "prefetch asked by a peer");
        let metrics = Arc::clone(&self.metrics);
        let events = Arc::clone(&self.target)
            .prefetch(selector)
            .map(move |event| event.map_err(|e| crate::service::to_status(&metrics, METHOD, e)));
        Ok(Response::new(Box::pin(events)))
    }
}

/// The owner named in a PutManifest, validated.
fn owner_member(request: &pb::PeerPutManifestRequest) -> Result<Member, Error> {
    let id = NodeId::parse("owner", request.owner.clone())?;
    let mut member = Member::new(id);
    if !request.owner_zone.is_empty() {
        member = member.with_zone(request.owner_zone.clone());
    }
    if !request.owner_rack.is_empty() {
        member = member.with_rack(request.owner_rack.clone());
    }
    Ok(member)
}
