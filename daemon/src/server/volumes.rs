//! Each published CSI volume's own socket, `<data>/.cairn/cairn.sock`.
//!
//! A pod reaches cairnd through its volume alone: no hostPath, nothing of
//! the host's `/run/cairn`. The socket is bound to the volume
//! ([`VolumeBinding`]: tenant from the pod's namespace, job), so what a
//! client of it can do is decided by which socket it connected to, never by
//! what it sends (`service::access`).
//!
//! The socket's directory is in a directory the pod writes, so it is made
//! without following anything the pod could have put there: `data/` and
//! `.cairn/` are opened with `O_NOFOLLOW`, a `.cairn` that is not a plain
//! directory is removed first, the socket is bound through the directory's
//! descriptor (`/proc/self/fd/N/cairn.sock`) and its mode is set through an
//! `O_PATH | O_NOFOLLOW` descriptor of what was bound, checked to be a
//! socket. A pod that replaces the socket afterwards only cuts itself off.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use rustix::fs::FileType;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, IoContext, Result};
use crate::node::Node;
use crate::node::volumes::{SOCKET_DIR, SOCKET_NAME, VolumeBinding};
use crate::pod_fs;
use crate::service::access::{Access, VolumeSockets};

/// Mode of `.cairn/`: anyone in the pod may look in, only cairnd changes it.
const SOCKET_DIR_MODE: u32 = 0o755;
/// Mode of the socket: any user of the pod may connect. Only the pod (and
/// root on the host) can reach the directory it is in.
const SOCKET_MODE: u32 = 0o666;

struct Served {
    binding: Arc<VolumeBinding>,
    stop: CancellationToken,
}

/// The volumes whose sockets this daemon serves.
pub struct VolumeServer {
    node: Arc<Node>,
    served: Mutex<HashMap<String, Served>>,
    cancel: CancellationToken,
    /// Itself, for the Admin service each socket serves.
    me: Weak<VolumeServer>,
}

impl VolumeServer {
    /// A server whose sockets stop when `cancel` fires.
    pub fn new(node: Arc<Node>, cancel: CancellationToken) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            node,
            served: Mutex::new(HashMap::new()),
            cancel,
            me: me.clone(),
        })
    }

    /// Binds every volume still published (after a restart): a volume that
    /// fails is logged and left to its next publish.
    pub async fn bind_published(&self) {
        for volume_id in self.node.published_volumes() {
            match self.bind(&volume_id).await {
                Ok(binding) => tracing::info!(
                    volume_id,
                    tenant = %binding.tenant,
                    job = %binding.job,
                    "serving a published volume's socket again"
                ),
                Err(e) => tracing::warn!(
                    volume_id,
                    error = %e,
                    "not serving a published volume's socket"
                ),
            }
        }
    }

    fn served(&self) -> std::sync::MutexGuard<'_, HashMap<String, Served>> {
        self.served.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many volume sockets are served.
    pub fn len(&self) -> usize {
        self.served().len()
    }

    /// Whether no volume socket is served.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[tonic::async_trait]
impl VolumeSockets for VolumeServer {
    async fn bind(&self, volume_id: &str) -> Result<Arc<VolumeBinding>> {
        let binding = Arc::new(self.node.volume_binding(volume_id)?);
        let socket = binding.socket_path();
        {
            let served = self.served();
            if let Some(current) = served.get(volume_id)
                && current.binding == binding
                && !current.stop.is_cancelled()
                && socket_is_ours(&socket)
            {
                return Ok(Arc::clone(&current.binding));
            }
        }
        let listener = {
            let data_dir = binding.data_dir.clone();
            tokio::task::spawn_blocking(move || bind_socket(&data_dir))
                .await
                .map_err(Error::from)??
        };
        let Some(me) = self.me.upgrade() else {
            return Err(Error::Cancelled);
        };
        let stop = self.cancel.child_token();
        let previous = self.served().insert(
            volume_id.to_owned(),
            Served {
                binding: Arc::clone(&binding),
                stop: stop.clone(),
            },
        );
        match previous {
            Some(previous) => previous.stop.cancel(),
            // First served by this cairnd: save sessions of an earlier one
            // are gone, and so are their files in the volume.
            None => {
                let binding = Arc::clone(&binding);
                let cleared = tokio::task::spawn_blocking(move || binding.clear_sessions()).await;
                if let Ok(Err(e)) = cleared {
                    tracing::warn!(volume_id, error = %e, "could not clear old save sessions from the volume");
                }
            }
        }
        let node = Arc::clone(&self.node);
        let access = Access::Volume(Arc::clone(&binding));
        let volume = volume_id.to_owned();
        tokio::spawn(async move {
            let served = super::serve(
                node,
                access,
                me as Arc<dyn VolumeSockets>,
                UnixListenerStream::new(listener),
                stop,
            )
            .await;
            if let Err(e) = served {
                tracing::warn!(volume_id = volume, error = %e, "a volume's socket stopped");
            }
        });
        tracing::info!(
            volume_id,
            tenant = %binding.tenant,
            job = %binding.job,
            namespace = %binding.namespace,
            socket = %socket.display(),
            "serving the volume's socket"
        );
        Ok(binding)
    }

    async fn unbind(&self, volume_id: &str) -> Result<bool> {
        crate::node::volumes::check_volume_id(volume_id)?;
        let Some(served) = self.served().remove(volume_id) else {
            return Ok(false);
        };
        served.stop.cancel();
        let socket = served.binding.socket_path();
        let data_dir = served.binding.data_dir.clone();
        // The volume's directory may already be gone: nothing to remove.
        let _ = tokio::task::spawn_blocking(move || remove_socket(&data_dir)).await;
        tracing::info!(volume_id, socket = %socket.display(), "stopped serving the volume's socket");
        Ok(true)
    }
}

/// Whether the socket file is still there (a pod may have removed it).
fn socket_is_ours(socket: &Path) -> bool {
    std::fs::symlink_metadata(socket).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    })
}

/// Creates the volume's socket in `data_dir` (see the module docs).
fn bind_socket(data_dir: &Path) -> Result<UnixListener> {
    let shown_dir = data_dir.join(SOCKET_DIR);
    let shown = shown_dir.join(SOCKET_NAME);
    let data = pod_fs::open_dir(data_dir)?;
    let dir = pod_fs::own_dir_at(data.as_fd(), SOCKET_DIR, SOCKET_DIR_MODE, &shown_dir)?;
    pod_fs::remove_tree_at(dir.as_fd(), SOCKET_NAME)?;
    // bind(2) creates the name and never follows one that is there.
    let through_fd = format!(
        "{}/{SOCKET_NAME}",
        pod_fs::fd_path(dir.as_fd()).to_string_lossy()
    );
    let listener = std::os::unix::net::UnixListener::bind(&through_fd)
        .io_context(|| format!("binding {}", shown.display()))?;
    let replaced = || {
        Error::FailedPrecondition(format!(
            "{} was replaced while it was being created; not serving the volume",
            shown.display()
        ))
    };
    let (bound, kind, _) = pod_fs::entry_at(dir.as_fd(), SOCKET_NAME).map_err(|_| replaced())?;
    if kind != FileType::Socket {
        return Err(replaced());
    }
    pod_fs::chmod_fd(bound.as_fd(), SOCKET_MODE, &shown)?;
    listener
        .set_nonblocking(true)
        .io_context(|| format!("configuring {}", shown.display()))?;
    UnixListener::from_std(listener).io_context(|| format!("serving {}", shown.display()))
}

/// Removes the volume's socket, again never through a link.
fn remove_socket(data_dir: &Path) -> Result<()> {
    let data = pod_fs::open_dir(data_dir)?;
    let dir = pod_fs::dir_at(data.as_fd(), SOCKET_DIR, &data_dir.join(SOCKET_DIR))?;
    pod_fs::remove_tree_at(dir.as_fd(), SOCKET_NAME)
}
