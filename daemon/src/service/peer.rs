//! The `cairn.v1.Peer` service: what other daemons call to keep replicas
//! here and read them back.
//!
//! Every request is authenticated first ([`crate::tier::peer::tls::authenticate`]) and
//! must come from a member of the current membership view; the replicas are
//! any tenant's, since daemons act for all the node's jobs. Peers are
//! trusted to store and serve bytes, not to speak for other nodes: a replica
//! is accepted only from its owner (or, for an owner that left the view,
//! from a holder re-placing it), and only where placement puts it
//! ([`may_store_replica`]).

use std::sync::Arc;

use cairn_core::{
    Manifest, Member, MembershipView, NodeId, PlacementKey, Rank, ShardKey, Step, TenantName,
};
use cairn_proto::v1 as pb;
use futures::StreamExt;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::convert;
use crate::error::Error;
use crate::failpoint::crash_point;
use crate::metrics::Metrics;
use crate::tier::peer::store::ReplicaStore;
use crate::tier::peer::tls::{NODE_HEADER, authenticate};
use crate::wire::{PrefetchEvents, chunk_id};

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
    placement: ReplicaPlacement,
    tls: bool,
    metrics: Arc<Metrics>,
}

/// Where this node sits in replica placement: its id, and how many of a
/// shard's placement candidates a sender tries (the replicas plus the
/// fallbacks for full or unreachable ones).
#[derive(Clone, Debug)]
pub struct ReplicaPlacement {
    /// This node.
    pub me: NodeId,
    /// Candidates a sender may use for one shard.
    pub candidates: usize,
}

impl PeerService {
    /// Serves `store` to the members of `membership`; `tls` says whether
    /// callers present certificates to check.
    pub fn new(
        store: Arc<ReplicaStore>,
        target: Arc<dyn PrefetchTarget>,
        membership: watch::Receiver<Arc<MembershipView>>,
        placement: ReplicaPlacement,
        tls: bool,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            target,
            membership,
            placement,
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

    /// The shard a request names (`shard`, required), validated.
    fn shard_key(&self, method: &str, shard: Option<pb::ShardRef>) -> Result<ShardKey, Status> {
        let shard = shard.ok_or_else(|| Status::invalid_argument("shard: required"))?;
        Ok(ShardKey {
            tenant: self.tenant(method, &shard.tenant)?,
            job: convert::job("shard.job", &shard.job).map_err(|e| self.refuse(method, e))?,
            step: Step(shard.step),
            rank: Rank(shard.rank),
        })
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
        let missing = if request.presence_only {
            self.store.absent(&tenant, &ids).await
        } else {
            self.store.missing(&tenant, &ids).await
        }
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
        let view = Arc::clone(&self.membership.borrow());
        may_store_replica(&view, &self.placement, &caller, &owner, &shard)
            .map_err(|e| self.refuse(METHOD, e))?;
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
        let key = self.shard_key(METHOD, request.into_inner().shard)?;
        match self.store.manifest(&key).await {
            Ok(Some(manifest)) => Ok(Response::new(pb::PeerGetReplicaResponse {
                manifest: manifest.encode(),
            })),
            Ok(None) => Err(Status::not_found(format!("no replica of shard {key} here"))),
            Err(e) => Err(self.refuse(METHOD, e)),
        }
    }

    async fn drop_replica(
        &self,
        request: Request<pb::PeerDropReplicaRequest>,
    ) -> RpcResult<pb::PeerDropReplicaResponse> {
        const METHOD: &str = "Peer/DropReplica";
        let caller = self.caller(&request, METHOD)?;
        let key = self.shard_key(METHOD, request.into_inner().shard)?;
        let dropped = self
            .store
            .drop_replica(&key, &caller)
            .map_err(|e| self.refuse(METHOD, e))?;
        if dropped {
            tracing::info!(shard = %key, owner = %caller, "surplus replica dropped at its owner's request");
        }
        Ok(Response::new(pb::PeerDropReplicaResponse { dropped }))
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
            .map(move |event| event.map_err(|e| super::to_status(&metrics, METHOD, e)));
        Ok(Response::new(Box::pin(events)))
    }
}

/// The owner named in a PutManifest, validated.
/// Whether `caller` may store a replica of `shard`, naming `owner`, on this
/// node. The owner sends its own replicas; another member may re-send one
/// only for an owner that is no longer in the view (the holders re-place an
/// orphaned replica). Either way placement, over this node's view, must
/// put the shard's replicas here. Otherwise one compromised or confused
/// member could write any tenant's checkpoints under another node's name.
pub fn may_store_replica(
    view: &MembershipView,
    placement: &ReplicaPlacement,
    caller: &NodeId,
    owner: &Member,
    shard: &ShardKey,
) -> Result<(), Error> {
    if &owner.id != caller && view.get(&owner.id).is_some() {
        return Err(Error::PermissionDenied(format!(
            "node {caller} sent a replica of shard {shard} naming node {} as its owner; \
             only a shard's owner sends its replicas while it is a member",
            owner.id
        )));
    }
    let placed = view
        .membership()
        .place(&PlacementKey::from(shard), owner, placement.candidates);
    if !placed.contains(&placement.me) {
        return Err(Error::PermissionDenied(format!(
            "placement does not put replicas of shard {shard} (owner {}) on node {}; refused from node {caller}",
            owner.id, placement.me
        )));
    }
    Ok(())
}

fn owner_member(request: &pb::PeerPutManifestRequest) -> Result<Member, Error> {
    let id = NodeId::parse("owner", request.owner.clone())?;
    let mut member = Member::new(id);
    if !request.owner_zone.is_empty() {
        member = member.with_zone(request.owner_zone.clone());
    }
    if !request.owner_rack.is_empty() {
        member = member.with_rack(request.owner_rack.clone());
    }
    // The labels are kept in `owners.json`: checked like a view's, so no
    // request can store anything but a short label value there.
    cairn_core::Membership::new(vec![member.clone()])
        .map_err(|e| Error::InvalidArgument(format!("owner_zone/owner_rack: {e}")))?;
    Ok(member)
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use cairn_core::{JobName, Peer};

    use super::*;

    fn node(i: u8) -> NodeId {
        NodeId::parse("node", format!("node-{i}")).expect("valid")
    }

    fn view(members: &[u8]) -> MembershipView {
        let peers = members
            .iter()
            .map(|&i| Peer {
                member: Member::new(node(i)),
                ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)),
                port: None,
            })
            .collect();
        MembershipView::new("peers", peers).expect("valid view")
    }

    fn shard(job: &str) -> ShardKey {
        ShardKey {
            tenant: "team-a".parse().expect("valid"),
            job: JobName::parse("job", job.into()).expect("valid"),
            step: Step(999),
            rank: Rank(0),
        }
    }

    /// A shard of `owner` that placement (one candidate) puts on `on`, and
    /// one it does not.
    fn shards_placed(view: &MembershipView, owner: &Member, on: &NodeId) -> (ShardKey, ShardKey) {
        let placed_on = |s: &ShardKey| {
            view.membership()
                .place(&PlacementKey::from(s), owner, 1)
                .contains(on)
        };
        let all: Vec<ShardKey> = (0..200).map(|i| shard(&format!("job{i}"))).collect();
        let here = all
            .iter()
            .find(|s| placed_on(s))
            .expect("some shard placed here");
        let elsewhere = all
            .iter()
            .find(|s| !placed_on(s))
            .expect("some shard placed elsewhere");
        (here.clone(), elsewhere.clone())
    }

    #[test]
    fn only_the_owner_sends_its_replicas_and_only_where_placement_puts_them() {
        let view = view(&[1, 2, 3, 4]);
        let me = ReplicaPlacement {
            me: node(3),
            candidates: 1,
        };
        let owner = Member::new(node(1));
        let (here, elsewhere) = shards_placed(&view, &owner, &me.me);
        may_store_replica(&view, &me, &node(1), &owner, &here).expect("the owner, placed here");
        // Regression: node 2 stored a replica for team-a naming node 1 as
        // its owner, and every node's "latest" followed it.
        let err = may_store_replica(&view, &me, &node(2), &owner, &here).expect_err("spoofed");
        assert!(
            matches!(&err, Error::PermissionDenied(m) if m.contains("naming node node-1")),
            "{err}"
        );
        let err = may_store_replica(&view, &me, &node(1), &owner, &elsewhere)
            .expect_err("not placed here");
        assert!(
            matches!(&err, Error::PermissionDenied(m) if m.contains("placement does not put")),
            "{err}"
        );
    }

    #[test]
    fn a_holder_re_places_the_replica_of_an_owner_that_left() {
        let view = view(&[2, 3, 4]);
        let me = ReplicaPlacement {
            me: node(3),
            candidates: 1,
        };
        let gone = Member::new(node(1));
        let (here, elsewhere) = shards_placed(&view, &gone, &me.me);
        may_store_replica(&view, &me, &node(2), &gone, &here).expect("orphan re-placed here");
        may_store_replica(&view, &me, &node(2), &gone, &elsewhere)
            .expect_err("still only where placement puts it");
    }
}
