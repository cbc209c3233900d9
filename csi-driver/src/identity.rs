//! The CSI Identity service: who the plugin is, what it can do, whether it
//! is ready.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::config::Config;
use crate::csi::v1 as pb;
use crate::publish::Volumes;

/// Identity, answered from the configuration and the volumes' state.
#[derive(Debug)]
pub struct IdentityService {
    config: Arc<Config>,
    volumes: Arc<Volumes>,
}

impl IdentityService {
    /// A service reporting `config` and probing `volumes`.
    pub fn new(config: Arc<Config>, volumes: Arc<Volumes>) -> Self {
        Self { config, volumes }
    }
}

/// The plugin-wide capabilities: never CONTROLLER_SERVICE (ephemeral inline
/// volumes need no controller), and VOLUME_ACCESSIBILITY_CONSTRAINTS when a
/// zone is configured, because NodeGetInfo then reports topology.
pub fn plugin_capabilities(config: &Config) -> Vec<pb::PluginCapability> {
    use pb::plugin_capability::{Service, Type, service};
    config
        .zone
        .iter()
        .map(|_| pb::PluginCapability {
            r#type: Some(Type::Service(Service {
                r#type: service::Type::VolumeAccessibilityConstraints as i32,
            })),
        })
        .collect()
}

#[tonic::async_trait]
impl pb::identity_server::Identity for IdentityService {
    #[instrument(skip_all)]
    async fn get_plugin_info(
        &self,
        _request: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: self.config.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: Default::default(),
        }))
    }

    #[instrument(skip_all)]
    async fn get_plugin_capabilities(
        &self,
        _request: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(pb::GetPluginCapabilitiesResponse {
            capabilities: plugin_capabilities(&self.config),
        }))
    }

    #[instrument(skip_all)]
    async fn probe(
        &self,
        _request: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        let volumes = Arc::clone(&self.volumes);
        let ready = tokio::task::spawn_blocking(move || volumes.is_ready())
            .await
            .map_err(|e| Status::internal(format!("probing: {e}")))?;
        if !ready {
            tracing::warn!("probe: the volumes or state directory is not usable");
        }
        Ok(Response::new(pb::ProbeResponse { ready: Some(ready) }))
    }
}
