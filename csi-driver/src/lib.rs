//! `cairn-csi`: Cairn's CSI node plugin.
//!
//! A pod asks for a Cairn volume with an ephemeral inline CSI volume; the
//! plugin validates the request, creates `<volumes-dir>/<volume_id>/data/`
//! inside the node's memory tier, writes `volume.json` beside it (job, rank,
//! tenant, restore request), pre-fills it with the checkpoint the volume
//! asks for, and bind-mounts `data/` into the pod. Whatever the pod writes
//! there is already in T0, so the daemon ingests finished steps without a
//! copy.
//!
//! Modules, outermost first:
//!
//! - [`server`], [`identity`], [`node`]: the gRPC edge. Requests are
//!   converted into validated types on arrival; prost types go no further.
//! - [`volume`]: the pure validation of publish arguments (no I/O).
//! - [`publish`]: the filesystem and mount work, per-volume exclusion,
//!   idempotency, crash recovery; [`prefill`]: placing the checkpoint the
//!   volume asks for (restored by the node's cairnd) before the mount.
//! - [`store`], [`mountinfo`], [`mount`], [`usage`]: records on disk, the
//!   kernel's mount table, mount(2)/umount(2), and disk usage.
//! - [`redact`]: log-safe views of requests (no secrets, no tokens).

pub mod client;
pub mod config;
pub mod error;
pub mod identity;
pub mod mount;
pub mod mountinfo;
pub mod node;
pub mod prefill;
pub mod publish;
pub mod redact;
pub mod server;
pub mod store;
pub mod usage;
pub mod volume;

/// The CSI protocol, as generated tonic/prost code.
#[allow(missing_docs, clippy::all)]
pub mod csi {
    /// `csi.v1` at spec v1.9.0: the Identity and Node services.
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}
