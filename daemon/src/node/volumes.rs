//! Which tenant and job a CSI volume acts for.
//!
//! The CSI plugin writes `<volumes_dir>/<volume_id>/volume.json` (the pod
//! cannot: only `data/` is mounted into it). The tenant comes from the pod's
//! namespace as the kubelet reported it, through the operator's
//! `[tenants] namespaces` map (`cairn_core::tenancy`); the `tenant`
//! attribute the pod may have written is only checked against it. Ingest
//! and the volume's own socket (`crate::server::volumes`) both bind a
//! volume through [`Node::volume_binding`], so they cannot disagree.

use std::path::PathBuf;

use cairn_core::ingest::{VOLUME_DATA_DIR, VOLUME_FILE, VolumeInfo};
use cairn_core::{JobName, Rank, TenantName};

use super::Node;
use crate::error::{Error, IoContext, Result};

/// The directory in a volume's `data/` that holds its socket; hidden, so
/// ingest never takes it for a step.
pub const SOCKET_DIR: &str = ".cairn";
/// The volume's socket, in [`SOCKET_DIR`].
pub const SOCKET_NAME: &str = "cairn.sock";

/// Longest volume id accepted (kubelet's inline ids are `csi-` and a
/// 64-digit hash).
const MAX_VOLUME_ID_LEN: usize = 128;

/// What a volume is allowed to act for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeBinding {
    /// The CSI volume id.
    pub volume_id: String,
    /// Its tenant, decided by the cluster (namespace) and the operator.
    pub tenant: TenantName,
    /// Its job.
    pub job: JobName,
    /// The pod's rank (a volume still reads other ranks of its job, which
    /// resharding needs, and writes any: a DCP coordinator saves the
    /// metadata shard besides its own).
    pub rank: Rank,
    /// The pod's namespace.
    pub namespace: TenantName,
    /// The pod's UID, when the kubelet sent it.
    pub pod_uid: Option<String>,
    /// The volume's `data/`, as cairnd sees it.
    pub data_dir: PathBuf,
}

impl VolumeBinding {
    /// The volume's socket, as cairnd sees it (the pod sees it at
    /// `<its mount>/.cairn/cairn.sock`).
    pub fn socket_path(&self) -> PathBuf {
        self.data_dir.join(SOCKET_DIR).join(SOCKET_NAME)
    }
}

/// Checks a volume id from outside: one path component, nothing hidden.
pub fn check_volume_id(volume_id: &str) -> Result<()> {
    let ok = !volume_id.is_empty()
        && volume_id.len() <= MAX_VOLUME_ID_LEN
        && !volume_id.starts_with('.')
        && volume_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "volume_id {:?} is not a CSI volume id (1 to {MAX_VOLUME_ID_LEN} letters, digits, \
             '-', '_' or '.', not starting with '.')",
            volume_id
                .chars()
                .take(MAX_VOLUME_ID_LEN)
                .collect::<String>()
        )))
    }
}

impl Node {
    /// The tenant `info`'s volume acts for; PERMISSION_DENIED when its pod
    /// asked for another or the kubelet did not name its namespace.
    pub fn volume_tenant(&self, info: &VolumeInfo) -> Result<TenantName> {
        info.tenant(&self.config.tenants)
            .map_err(|e| Error::PermissionDenied(format!("volume {}: {e}", info.volume_id)))
    }

    /// Reads and checks the volume `volume_id` the CSI plugin published.
    pub fn volume_binding(&self, volume_id: &str) -> Result<VolumeBinding> {
        check_volume_id(volume_id)?;
        let dir = self.config.ingest.volumes_dir.join(volume_id);
        let path = dir.join(VOLUME_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!(
                    "volume {volume_id} is not published on this node (no {})",
                    path.display()
                )));
            }
            Err(e) => return Err(e).io_context(|| format!("reading {}", path.display())),
        };
        let info = VolumeInfo::decode(&bytes)?;
        if info.volume_id != volume_id {
            return Err(Error::FailedPrecondition(format!(
                "{} names volume {:?}, not {volume_id:?}",
                path.display(),
                info.volume_id
            )));
        }
        let tenant = self.volume_tenant(&info)?;
        let namespace =
            info.pod.namespace.clone().ok_or_else(|| {
                Error::PermissionDenied(format!("volume {volume_id}: no namespace"))
            })?;
        Ok(VolumeBinding {
            volume_id: info.volume_id,
            tenant,
            job: info.job,
            rank: info.rank,
            namespace,
            pod_uid: info.pod.uid,
            data_dir: dir.join(VOLUME_DATA_DIR),
        })
    }

    /// The ids of the volumes published on this node (directories of the
    /// volumes directory with a `volume.json`), for re-binding at start.
    pub fn published_volumes(&self) -> Vec<String> {
        let Ok(listing) = std::fs::read_dir(&self.config.ingest.volumes_dir) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = listing
            .flatten()
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|id| check_volume_id(id).is_ok())
            .filter(|id| {
                self.config
                    .ingest
                    .volumes_dir
                    .join(id)
                    .join(VOLUME_FILE)
                    .is_file()
            })
            .collect();
        ids.sort();
        ids
    }
}
