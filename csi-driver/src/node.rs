//! The CSI Node service: converts each request into validated types on
//! arrival (`volume.rs`), claims the volume, does the work on a blocking
//! thread (`publish.rs`), and maps errors to statuses in one place
//! (`error.rs`).
//!
//! Supported: NodePublishVolume / NodeUnpublishVolume for ephemeral inline
//! volumes, NodeGetVolumeStats, NodeGetCapabilities, NodeGetInfo. Staging
//! and expansion are UNIMPLEMENTED and not advertised.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing::{Span, instrument};

use crate::config::{Config, ZONE_TOPOLOGY_KEY};
use crate::csi::v1 as pb;
use crate::error::{Error, Result};
use crate::publish::Volumes;
use crate::redact;
use crate::volume::{
    AccessMode, AccessType, Capability, PublishRequest, VolumeId, VolumeSpec, parse_target_path,
};

/// Node, backed by the node's [`Volumes`].
#[derive(Debug)]
pub struct NodeService {
    config: Arc<Config>,
    volumes: Arc<Volumes>,
}

impl NodeService {
    /// A service publishing into `volumes` under `config`'s directories.
    pub fn new(config: Arc<Config>, volumes: Arc<Volumes>) -> Self {
        Self { config, volumes }
    }
}

/// Logs a failed call (the message never holds secrets) and converts it.
fn reject(err: Error) -> Status {
    if err.code() == tonic::Code::Internal {
        tracing::error!(error = %err, code = ?err.code(), "request failed");
    } else {
        tracing::warn!(error = %err, code = ?err.code(), "request refused");
    }
    err.into()
}

/// The wire request as plain, unjudged values (secrets left behind).
pub fn publish_request(req: pb::NodePublishVolumeRequest) -> PublishRequest {
    PublishRequest {
        volume_id: req.volume_id,
        target_path: req.target_path,
        staging_target_path: req.staging_target_path,
        publish_context_len: req.publish_context.len(),
        capability: req.volume_capability.map(capability),
        readonly: req.readonly,
        volume_context: req.volume_context.into_iter().collect(),
    }
}

fn capability(cap: pb::VolumeCapability) -> Capability {
    use pb::volume_capability::AccessType as Wire;
    use pb::volume_capability::access_mode::Mode;
    Capability {
        access_type: cap.access_type.map(|t| match t {
            Wire::Block(_) => AccessType::Block,
            Wire::Mount(m) => AccessType::Mount {
                fs_type: m.fs_type,
                mount_flags: m.mount_flags,
                volume_mount_group: m.volume_mount_group,
            },
        }),
        access_mode: cap.access_mode.map(|m| match Mode::try_from(m.mode) {
            Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
            Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
            Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
            Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
            Ok(Mode::MultiNodeReaderOnly) => AccessMode::MultiNodeReaderOnly,
            Ok(Mode::MultiNodeSingleWriter) => AccessMode::MultiNodeSingleWriter,
            Ok(Mode::MultiNodeMultiWriter) => AccessMode::MultiNodeMultiWriter,
            Ok(Mode::Unknown) | Err(_) => AccessMode::Unknown(m.mode),
        }),
    }
}

impl NodeService {
    async fn publish(&self, req: pb::NodePublishVolumeRequest) -> Result<()> {
        tracing::info!(request = ?redact::PublishRequest(&req), "publish requested");
        let spec = VolumeSpec::from_request(&publish_request(req), &self.config.kubelet_dir)?;
        let span = Span::current();
        span.record("volume_id", spec.volume_id.as_str());
        span.record("job", spec.job.as_str());
        span.record("rank", spec.rank.0);
        let guard = self.volumes.begin(&spec.volume_id)?;
        let volumes = Arc::clone(&self.volumes);
        tokio::task::spawn_blocking(move || {
            let _span = span.entered();
            let _guard = guard;
            volumes.publish(spec)
        })
        .await?
    }

    async fn unpublish(&self, req: pb::NodeUnpublishVolumeRequest) -> Result<()> {
        let id = VolumeId::parse("volume_id", &req.volume_id)?;
        let target = parse_target_path("target_path", &req.target_path, &self.config.kubelet_dir)?;
        let span = Span::current();
        span.record("volume_id", id.as_str());
        tracing::info!(target = %target.display(), "unpublish requested");
        let guard = self.volumes.begin(&id)?;
        let volumes = Arc::clone(&self.volumes);
        tokio::task::spawn_blocking(move || {
            let _span = span.entered();
            let _guard = guard;
            volumes.unpublish(&id, &target)
        })
        .await?
    }

    async fn stats(
        &self,
        req: pb::NodeGetVolumeStatsRequest,
    ) -> Result<pb::NodeGetVolumeStatsResponse> {
        use pb::volume_usage::Unit;
        let id = VolumeId::parse("volume_id", &req.volume_id)?;
        // Only a missing path is a bad argument: any other is compared with
        // where the volume is published, and a path it is not published at
        // is NOT_FOUND whatever its form (the spec's error table; csi-sanity
        // asks about `some/path`). The path is never opened.
        if req.volume_path.is_empty() {
            return Err(Error::InvalidArgument("volume_path is required".into()));
        }
        Span::current().record("volume_id", id.as_str());
        let volumes = Arc::clone(&self.volumes);
        let path = req.volume_path;
        let usage = tokio::task::spawn_blocking(move || volumes.stats(&id, &path)).await??;
        let signed = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let entry = |used: u64, available: u64, unit: Unit| pb::VolumeUsage {
            available: signed(available),
            total: signed(used.saturating_add(available)),
            used: signed(used),
            unit: unit as i32,
        };
        Ok(pb::NodeGetVolumeStatsResponse {
            usage: vec![
                entry(usage.bytes_used, usage.bytes_available, Unit::Bytes),
                entry(usage.inodes_used, usage.inodes_available, Unit::Inodes),
            ],
            volume_condition: None,
        })
    }
}

#[tonic::async_trait]
impl pb::node_server::Node for NodeService {
    #[instrument(skip_all)]
    async fn node_stage_volume(
        &self,
        _request: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        Err(reject(Error::Unimplemented("NodeStageVolume")))
    }

    #[instrument(skip_all)]
    async fn node_unstage_volume(
        &self,
        _request: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        Err(reject(Error::Unimplemented("NodeUnstageVolume")))
    }

    #[instrument(skip_all, fields(volume_id = Empty, job = Empty, rank = Empty))]
    async fn node_publish_volume(
        &self,
        request: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        self.publish(request.into_inner()).await.map_err(reject)?;
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    #[instrument(skip_all, fields(volume_id = Empty))]
    async fn node_unpublish_volume(
        &self,
        request: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        self.unpublish(request.into_inner()).await.map_err(reject)?;
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    #[instrument(skip_all, fields(volume_id = Empty))]
    async fn node_get_volume_stats(
        &self,
        request: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        let response = self.stats(request.into_inner()).await.map_err(reject)?;
        Ok(Response::new(response))
    }

    #[instrument(skip_all)]
    async fn node_expand_volume(
        &self,
        _request: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        Err(reject(Error::Unimplemented("NodeExpandVolume")))
    }

    #[instrument(skip_all)]
    async fn node_get_capabilities(
        &self,
        _request: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use pb::node_service_capability::{Rpc, Type, rpc};
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities: vec![pb::NodeServiceCapability {
                r#type: Some(Type::Rpc(Rpc {
                    r#type: rpc::Type::GetVolumeStats as i32,
                })),
            }],
        }))
    }

    #[instrument(skip_all)]
    async fn node_get_info(
        &self,
        _request: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: self.config.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: self.config.zone.as_ref().map(|zone| pb::Topology {
                segments: HashMap::from([(ZONE_TOPOLOGY_KEY.to_owned(), zone.clone())]),
            }),
        }))
    }
}
