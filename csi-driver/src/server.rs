//! Serving Identity and Node on the CSI Unix socket until shutdown.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::config::Config;
use crate::csi::v1::identity_server::IdentityServer;
use crate::csi::v1::node_server::NodeServer;
use crate::error::{Error, IoContext, Result};
use crate::identity::IdentityService;
use crate::node::NodeService;
use crate::publish::Volumes;

/// How long calls in flight may take to finish after shutdown is requested.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Loads the state, binds the socket and serves until `cancel` fires; then
/// lets in-flight calls finish and removes the socket.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<()> {
    let config = Arc::new(config);
    let volumes = {
        let config = Arc::clone(&config);
        tokio::task::spawn_blocking(move || Volumes::open(&config)).await??
    };
    let listener = bind_socket(&config.socket)?;
    tracing::info!(
        driver = %config.driver_name,
        version = env!("CARGO_PKG_VERSION"),
        node_id = %config.node_id,
        zone = ?config.zone,
        socket = %config.socket.display(),
        volumes_dir = %config.volumes_dir.display(),
        state_dir = %config.state_dir.display(),
        kubelet_dir = %config.kubelet_dir.display(),
        daemon_socket = %config.daemon_socket.display(),
        published = volumes.len(),
        "cairn-csi ready"
    );
    let serve = Server::builder()
        .add_service(IdentityServer::new(IdentityService::new(
            Arc::clone(&config),
            Arc::clone(&volumes),
        )))
        .add_service(NodeServer::new(NodeService::new(
            Arc::clone(&config),
            volumes,
        )))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener),
            cancel.clone().cancelled_owned(),
        );
    // After shutdown is requested, calls in flight get DRAIN_DEADLINE to
    // finish; a client that keeps its connection open past that does not
    // keep the plugin alive. (Blocking mount work already started still
    // completes: the runtime waits for it.)
    let deadline = async {
        cancel.cancelled().await;
        tokio::time::sleep(DRAIN_DEADLINE).await;
    };
    let served = tokio::select! {
        served = serve => served.map_err(|e| Error::Io {
            context: format!("serving {}", config.socket.display()),
            source: std::io::Error::other(e),
        }),
        () = deadline => {
            tracing::warn!(
                deadline = ?DRAIN_DEADLINE,
                "connections still open at the drain deadline; stopping anyway"
            );
            Ok(())
        }
    };
    if let Err(e) = std::fs::remove_file(&config.socket) {
        tracing::warn!(error = %e, "could not remove the socket");
    }
    tracing::info!("cairn-csi stopped");
    served
}

/// Binds the CSI socket, mode 0600 (only kubelet, as root, talks to it).
/// Creates its directory (mode 0700) if needed, replaces a stale socket
/// left by a crashed plugin, refuses to steal one that something still
/// answers on, and never removes a file that is not a socket.
pub fn bind_socket(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        crate::store::create_private_dir(dir, 0o700)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::Config(format!(
                    "another process is serving {}; is cairn-csi already running?",
                    path.display()
                )));
            }
            tracing::info!(socket = %path.display(), "replacing a stale socket");
            std::fs::remove_file(path)
                .io_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        Ok(_) => {
            return Err(Error::Config(format!(
                "{} exists and is not a socket; not replacing it",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).io_context(|| format!("inspecting {}", path.display())),
    }
    let listener = UnixListener::bind(path).io_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .io_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}
