//! Who a request acts for, decided by the socket it came in on.
//!
//! The host socket (mode 0600, root) and the loopback TCP listener are the
//! operator's: any tenant, any job, every Admin call. A CSI volume's socket
//! (`<data>/.cairn/cairn.sock`, inside one pod's volume) is bound to that
//! volume's tenant and job: a request there that leaves the tenant empty
//! gets the volume's, one that names another tenant or job is
//! PERMISSION_DENIED naming what it asked for and what the volume allows,
//! and Admin calls (whole-node views and operations) are refused. Nothing
//! in a request can widen what the socket allows.

use std::sync::Arc;

use cairn_core::{JobName, TenantName};

use crate::error::{Error, Result};
use crate::node::Node;
use crate::node::volumes::VolumeBinding;

/// What the connection's socket allows.
#[derive(Clone, Debug)]
pub enum Access {
    /// The host socket or loopback TCP: everything.
    Operator,
    /// A CSI volume's socket: its tenant and job only.
    Volume(Arc<VolumeBinding>),
}

impl Access {
    /// The volume whose socket this is, if any.
    pub fn volume(&self) -> Option<Arc<VolumeBinding>> {
        match self {
            Self::Operator => None,
            Self::Volume(v) => Some(Arc::clone(v)),
        }
    }

    /// The tenant a request naming `requested` (empty: none) acts for.
    pub fn tenant(&self, node: &Node, requested: &str) -> Result<TenantName> {
        match self {
            Self::Operator => node.tenant(requested),
            Self::Volume(v) if requested.is_empty() || requested == v.tenant.as_str() => {
                Ok(v.tenant.clone())
            }
            Self::Volume(v) => Err(Error::PermissionDenied(format!(
                "tenant {:?}: this socket belongs to volume {} of tenant {:?}, job {:?}, and acts \
                 for that tenant only",
                requested.chars().take(64).collect::<String>(),
                v.volume_id,
                v.tenant.as_str(),
                v.job.as_str()
            ))),
        }
    }

    /// Refuses a job the socket may not act on.
    pub fn check_job(&self, job: &JobName) -> Result<()> {
        match self {
            Self::Volume(v) if *job != v.job => Err(Error::PermissionDenied(format!(
                "job {:?}: this socket belongs to volume {} of tenant {:?}, job {:?}, and acts \
                 for that job only",
                job.as_str(),
                v.volume_id,
                v.tenant.as_str(),
                v.job.as_str()
            ))),
            _ => Ok(()),
        }
    }

    /// The job a listing covers: the volume's when the request names none.
    pub fn listed_job(&self, requested: Option<JobName>) -> Result<Option<JobName>> {
        match (self, requested) {
            (Self::Volume(v), None) => Ok(Some(v.job.clone())),
            (_, Some(job)) => {
                self.check_job(&job)?;
                Ok(Some(job))
            }
            (Self::Operator, None) => Ok(None),
        }
    }

    /// Refuses an operator-only call (`method`) on a volume's socket.
    pub fn operator_only(&self, method: &str) -> Result<()> {
        match self {
            Self::Operator => Ok(()),
            Self::Volume(v) => Err(Error::PermissionDenied(format!(
                "{method} is for operators (the host socket); this socket belongs to volume {} \
                 of tenant {:?}, job {:?}",
                v.volume_id,
                v.tenant.as_str(),
                v.job.as_str()
            ))),
        }
    }

    /// Refuses a session (commit, abort) the socket may not act on. An
    /// unknown session is left for the node to report.
    pub fn check_session(&self, node: &Node, session_id: &str) -> Result<()> {
        if let Self::Volume(_) = self
            && let Some(key) = node.session_shard(session_id)
        {
            self.tenant(node, key.tenant.as_str())?;
            self.check_job(&key.job)?;
        }
        Ok(())
    }
}

/// Serves and stops serving volumes' sockets; implemented by the server,
/// called by `Admin.BindVolume` and `Admin.UnbindVolume`.
#[tonic::async_trait]
pub trait VolumeSockets: Send + Sync {
    /// Serves `volume_id`'s socket (again, if it was); its binding.
    async fn bind(&self, volume_id: &str) -> Result<Arc<VolumeBinding>>;
    /// Stops serving `volume_id`'s socket; whether it was served.
    async fn unbind(&self, volume_id: &str) -> Result<bool>;
}
