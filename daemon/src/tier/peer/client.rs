//! One connection to one peer daemon, and the sink that writes a replica to
//! it through the shared copy loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use cairn_core::{ChunkId, JobName, Manifest, Member, NodeId, ShardKey, TenantName};
use cairn_proto::v1 as pb;
use cairn_proto::v1::peer_client::PeerClient as RpcClient;
use futures::StreamExt;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::tls::{NODE_HEADER, PeerTls};
use super::{CONNECTION_WINDOW_BYTES, FRAME_BYTES, MAX_PEER_MESSAGE_BYTES, STREAM_WINDOW_BYTES};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::tier::{ChunkLocation, ChunkSink, TierKind};
use crate::wire::{PrefetchEvents, chunk_id, shard_ref};

/// How long dialing a peer may take before the peer counts as unreachable:
/// short, so a dead peer costs replication and restore little time.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Names this node on every request (see [`super::tls::authenticate`]).
#[derive(Clone)]
pub struct NodeHeader(AsciiMetadataValue);

impl Interceptor for NodeHeader {
    fn call(&mut self, mut request: tonic::Request<()>) -> tonic::Result<tonic::Request<()>> {
        request.metadata_mut().insert(NODE_HEADER, self.0.clone());
        Ok(request)
    }
}

/// A client for one peer's `cairn.v1.Peer` service.
pub struct PeerClient {
    node: NodeId,
    addr: SocketAddr,
    rpc: RpcClient<InterceptedService<Channel, NodeHeader>>,
    metrics: Arc<Metrics>,
}

impl PeerClient {
    /// A lazily connected client for `node` at `addr`; with `tls`, the
    /// peer's certificate must name `node`.
    pub fn new(
        me: &NodeId,
        node: NodeId,
        addr: SocketAddr,
        tls: Option<&PeerTls>,
        request_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let invalid = |e: tonic::transport::Error| Error::Peer {
            node: node.to_string(),
            context: format!("configuring the channel to {addr}"),
            status: Box::new(tonic::Status::unavailable(e.to_string())),
        };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(invalid)?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(request_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .max_frame_size(FRAME_BYTES);
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls.client(&node)).map_err(invalid)?;
        }
        let header: AsciiMetadataValue = MetadataValue::try_from(me.as_str()).map_err(|e| {
            Error::InvalidArgument(format!("node id {me} cannot be sent as a header: {e}"))
        })?;
        let rpc = RpcClient::with_interceptor(endpoint.connect_lazy(), NodeHeader(header))
            .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
        Ok(Self {
            node,
            addr,
            rpc,
            metrics,
        })
    }

    /// The peer's node id.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// Where it is dialed.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn error(&self, context: impl Into<String>, status: tonic::Status) -> Error {
        Error::Peer {
            node: self.node.to_string(),
            context: context.into(),
            status: Box::new(status),
        }
    }

    /// Of `ids`, those the peer lacks for `tenant` (or holds but finds bad
    /// when it re-hashes the ones it has not verified lately).
    pub async fn missing_chunks(
        &self,
        tenant: &TenantName,
        ids: &[ChunkId],
    ) -> Result<Vec<ChunkId>> {
        self.ask_missing(tenant, ids, false).await
    }

    /// Of `ids`, those the peer has no file for, without re-hashing any:
    /// the cheap question of a holder check.
    pub async fn absent_chunks(
        &self,
        tenant: &TenantName,
        ids: &[ChunkId],
    ) -> Result<Vec<ChunkId>> {
        self.ask_missing(tenant, ids, true).await
    }

    async fn ask_missing(
        &self,
        tenant: &TenantName,
        ids: &[ChunkId],
        presence_only: bool,
    ) -> Result<Vec<ChunkId>> {
        let response = self
            .rpc
            .clone()
            .missing_chunks(pb::PeerMissingChunksRequest {
                tenant: tenant.to_string(),
                ids: ids.iter().map(|id| id.as_bytes().to_vec()).collect(),
                presence_only,
            })
            .await
            .map_err(|s| self.error("asking which chunks it lacks", s))?
            .into_inner();
        response
            .ids
            .iter()
            .map(|id| chunk_id(id).map_err(|e| self.error("reading its answer", e)))
            .collect()
    }

    /// Sends one chunk. A peer that found its bytes do not match `id`
    /// refuses it with `DataLoss`, so the sender can send a checked copy.
    pub async fn put_chunk(&self, tenant: &TenantName, id: &ChunkId, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        self.rpc
            .clone()
            .put_chunk(pb::PeerPutChunkRequest {
                tenant: tenant.to_string(),
                id: id.as_bytes().to_vec(),
                data,
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::DataLoss => Error::DataLoss(format!(
                    "peer {} refused chunk {id}: {}",
                    self.node,
                    s.message()
                )),
                _ => self.error(format!("sending chunk {id}"), s),
            })?;
        self.metrics
            .peer_sent_bytes
            .with_label_values(&[self.node.as_str()])
            .inc_by(len);
        Ok(())
    }

    /// Sends a replica's manifest, naming the shard's owner.
    pub async fn put_manifest(&self, manifest: &Manifest, owner: &Member) -> Result<()> {
        self.rpc
            .clone()
            .put_manifest(pb::PeerPutManifestRequest {
                manifest: manifest.encode(),
                owner: owner.id.to_string(),
                owner_zone: owner.zone.clone().unwrap_or_default(),
                owner_rack: owner.rack.clone().unwrap_or_default(),
            })
            .await
            .map_err(|s| self.error(format!("storing the manifest of {}", manifest.shard), s))?;
        Ok(())
    }

    /// The peer's replica of a shard, if it holds one.
    pub async fn replica(&self, key: &ShardKey) -> Result<Option<Manifest>> {
        match self
            .rpc
            .clone()
            .get_replica(pb::PeerGetReplicaRequest {
                shard: Some(shard_ref(key)),
            })
            .await
        {
            Ok(response) => Ok(Some(self.decode(&response.into_inner().manifest)?)),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(self.error(format!("asking for its replica of {key}"), s)),
        }
    }

    /// Asks the peer to drop its replica of a shard this node owns; whether
    /// it held one.
    pub async fn drop_replica(&self, key: &ShardKey) -> Result<bool> {
        let response = self
            .rpc
            .clone()
            .drop_replica(pb::PeerDropReplicaRequest {
                shard: Some(shard_ref(key)),
            })
            .await
            .map_err(|s| self.error(format!("asking it to drop its replica of {key}"), s))?;
        Ok(response.into_inner().dropped)
    }

    /// The replicas the peer holds for a tenant (one job, or all).
    pub async fn replicas(
        &self,
        tenant: &TenantName,
        job: Option<&JobName>,
    ) -> Result<Vec<Manifest>> {
        let response = self
            .rpc
            .clone()
            .list_replicas(pb::PeerListReplicasRequest {
                tenant: tenant.to_string(),
                job: job.map(|j| j.to_string()).unwrap_or_default(),
            })
            .await
            .map_err(|s| self.error("listing its replicas", s))?
            .into_inner();
        response.manifests.iter().map(|m| self.decode(m)).collect()
    }

    /// A chunk's bytes as the peer stores them (unverified), if it has it.
    pub async fn chunk(&self, tenant: &TenantName, id: &ChunkId) -> Result<Option<Bytes>> {
        match self
            .rpc
            .clone()
            .get_chunk(pb::PeerGetChunkRequest {
                tenant: tenant.to_string(),
                id: id.as_bytes().to_vec(),
            })
            .await
        {
            Ok(response) => {
                let data = response.into_inner().data;
                self.metrics
                    .peer_received_bytes
                    .with_label_values(&[self.node.as_str()])
                    .inc_by(data.len() as u64);
                Ok(Some(data))
            }
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(self.error(format!("reading chunk {id}"), s)),
        }
    }

    /// Asks the peer to restore a shard into its own memory tier: its
    /// progress messages, then the result. A failure of the restore keeps
    /// the peer's status code (NOT_FOUND stays NOT_FOUND), its message
    /// prefixed with the peer's name.
    pub async fn prefetch(
        &self,
        shard: pb::ShardSelector,
    ) -> Result<PrefetchEvents<tonic::Status>> {
        let response = self
            .rpc
            .clone()
            .prefetch(pb::PeerPrefetchRequest { shard: Some(shard) })
            .await
            .map_err(|s| self.error("prefetching a shard", s))?;
        let node = self.node.clone();
        Ok(Box::pin(response.into_inner().map(move |event| {
            event.map_err(|status| {
                tonic::Status::new(status.code(), format!("node {node}: {}", status.message()))
            })
        })))
    }

    fn decode(&self, bytes: &[u8]) -> Result<Manifest> {
        Manifest::decode(bytes).map_err(|e| {
            self.error(
                "reading a manifest it sent",
                tonic::Status::data_loss(e.to_string()),
            )
        })
    }
}

/// Writes a replica to one peer through [`crate::tier::transfer::copy_shard`]: the
/// peer's copy of a shard whose owner is `owner`.
pub struct ReplicaSink<'a> {
    /// The peer.
    pub peer: &'a PeerClient,
    /// Whose shard it is.
    pub owner: &'a Member,
}

#[async_trait]
impl ChunkSink for ReplicaSink<'_> {
    fn kind(&self) -> TierKind {
        TierKind::Peers
    }

    /// The receiving daemon re-hashes every chunk before it stores it.
    fn verifies_chunks(&self) -> bool {
        true
    }

    async fn missing_chunks(&self, tenant: &TenantName, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
        self.peer.missing_chunks(tenant, ids).await
    }

    async fn put_chunk(&self, location: &ChunkLocation, data: Bytes) -> Result<()> {
        self.peer
            .put_chunk(&location.shard().tenant, &location.chunk.id, data)
            .await
    }

    async fn put_manifest(&self, manifest: &Manifest) -> Result<()> {
        self.peer.put_manifest(manifest, self.owner).await
    }
}
