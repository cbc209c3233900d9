//! Starting and stopping the daemon: listeners, services, metrics endpoint.

pub mod volumes;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use axum::routing::get;
use cairn_proto::v1::FILE_DESCRIPTOR_SET;
use cairn_proto::v1::admin_server::AdminServer;
use cairn_proto::v1::checkpoint_server::CheckpointServer;
use cairn_proto::v1::peer_server::PeerServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::config::Config;
use crate::error::{Error, IoContext, Result};
use crate::metrics::Metrics;
use crate::node::Node;
use crate::service;
use crate::service::access::{Access, VolumeSockets};
use crate::service::admin::AdminService;
use crate::service::checkpoint::CheckpointService;
use crate::service::peer::{PeerService, PrefetchTarget, ReplicaPlacement};
use crate::tier::peer::{self, PeerTier};

/// HTTP/2 windows large enough for streamed shards to approach raw TCP speed.
const STREAM_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
const CONNECTION_WINDOW_BYTES: u32 = 32 * 1024 * 1024;

/// Runs the daemon until `cancel` fires, then drains and returns.
pub async fn run(mut config: Config, cancel: CancellationToken) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let metrics_listener = match config.metrics_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .io_context(|| format!("binding the metrics address {addr}"))?;
            config.metrics_addr = Some(
                listener
                    .local_addr()
                    .io_context(|| "reading the metrics address".into())?,
            );
            Some(listener)
        }
        None => None,
    };
    let node = Node::start(config.clone(), Arc::clone(&metrics), cancel.child_token())?;
    let peer_listener = match (&config.peers, &node.peers) {
        (Some(settings), Some(peers)) => {
            if peers.insecure() {
                tracing::warn!(
                    listen = %settings.listen,
                    "peer traffic runs WITHOUT TLS (--insecure-peers): anyone who reaches this port can read and write replicas"
                );
            }
            Some(
                tokio::net::TcpListener::bind(settings.listen)
                    .await
                    .io_context(|| format!("binding the peer address {}", settings.listen))?,
            )
        }
        _ => None,
    };
    let unix = bind_socket(&config.socket, config.socket_group.as_deref())?;
    let tcp = match config.tcp_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .io_context(|| format!("binding the client TCP address {addr}"))?,
        ),
        None => None,
    };
    tracing::info!(
        node = %config.node_name,
        socket = %config.socket.display(),
        tcp = ?tcp.as_ref().and_then(|l| l.local_addr().ok()),
        metrics = ?config.metrics_addr,
        memory = %config.memory_dir.display(),
        memory_capacity = config.memory_capacity,
        disk = %config.disk_dir.display(),
        peers = ?peer_listener.as_ref().and_then(|l| l.local_addr().ok()),
        "cairnd ready"
    );

    let volumes = volumes::VolumeServer::new(Arc::clone(&node), cancel.clone());
    volumes.bind_published().await;
    let volumes = volumes as Arc<dyn VolumeSockets>;

    let mut tasks = tokio::task::JoinSet::new();
    if let Some(listener) = metrics_listener {
        let metrics = Arc::clone(&metrics);
        let node = Arc::clone(&node);
        let app = axum::Router::new().route(
            "/metrics",
            get(move || {
                let metrics = Arc::clone(&metrics);
                let node = Arc::clone(&node);
                async move {
                    node.update_usage_metrics();
                    metrics.render()
                }
            }),
        );
        let stop = cancel.clone();
        tasks.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
                .io_context(|| "serving metrics".into())
        });
    }
    let bound = socket_identity(&config.socket)?;
    tasks.spawn(serve(
        Arc::clone(&node),
        Access::Operator,
        Arc::clone(&volumes),
        UnixListenerStream::new(unix),
        cancel.clone(),
    ));
    tokio::spawn(guard_socket(
        config.clone(),
        bound,
        Arc::clone(&node),
        Arc::clone(&volumes),
        cancel.clone(),
    ));
    if let Some(listener) = tcp {
        tasks.spawn(serve(
            Arc::clone(&node),
            Access::Operator,
            Arc::clone(&volumes),
            TcpListenerStream::new(listener),
            cancel.clone(),
        ));
    }
    if let (Some(listener), Some(peers)) = (peer_listener, &node.peers) {
        tasks.spawn(serve_peers(
            Arc::clone(peers),
            Arc::clone(&node) as Arc<dyn PrefetchTarget>,
            listener,
            Arc::clone(&metrics),
            cancel.clone(),
        ));
    }
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.map_err(Error::from).and_then(|r| r);
        if let Err(e) = outcome {
            tracing::error!(error = %e, "a listener failed; shutting down");
            cancel.cancel();
            result = Err(e);
        }
    }
    node.drain(SHUTDOWN_DRAIN_DEADLINE).await;
    let _ = std::fs::remove_file(&config.socket);
    tracing::info!("cairnd stopped");
    result
}

/// How long a stopping cairnd waits for its background tasks (write-back,
/// uploads, replication, ...) after the listeners closed: well inside the
/// DaemonSet's 60 s termination grace period, so the kubelet's SIGKILL never
/// comes first. Work cut short resumes after restart (the upload journal,
/// the write-back and replication queues rebuilt at start).
const SHUTDOWN_DRAIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

/// How often the host socket's file is checked (`guard_socket`).
const SOCKET_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// The device and inode of the socket file at `path`.
fn socket_identity(path: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta =
        std::fs::symlink_metadata(path).io_context(|| format!("inspecting {}", path.display()))?;
    Ok((meta.dev(), meta.ino()))
}

/// Keeps the host socket cairnd's own: anyone who can write its directory
/// could unlink it and serve an impostor at the path (clients and the CSI
/// plugin would then talk to that), while cairnd kept listening on the
/// orphan. Checked every [`SOCKET_CHECK_INTERVAL`]: a socket file that is
/// gone or is another inode is logged as an error and replaced by a new
/// one served by cairnd.
async fn guard_socket(
    config: Config,
    mut bound: (u64, u64),
    node: Arc<Node>,
    volumes: Arc<dyn VolumeSockets>,
    cancel: CancellationToken,
) {
    let path = config.socket.clone();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(SOCKET_CHECK_INTERVAL) => {}
        }
        let now = socket_identity(&path).ok();
        if now == Some(bound) {
            continue;
        }
        tracing::error!(
            socket = %path.display(),
            found = if now.is_some() { "another file" } else { "nothing" },
            "the host socket was replaced or removed behind cairnd's back; something may be \
             impersonating cairnd: re-creating the socket"
        );
        if now.is_some()
            && let Err(e) = std::fs::remove_file(&path)
        {
            tracing::error!(socket = %path.display(), error = %e, "cannot remove what replaced the socket");
            continue;
        }
        let listener = match bind_socket(&path, config.socket_group.as_deref())
            .and_then(|listener| Ok((socket_identity(&path)?, listener)))
        {
            Ok((identity, listener)) => {
                bound = identity;
                listener
            }
            Err(e) => {
                tracing::error!(socket = %path.display(), error = %e, "cannot re-create the socket");
                continue;
            }
        };
        let served = serve(
            Arc::clone(&node),
            Access::Operator,
            Arc::clone(&volumes),
            UnixListenerStream::new(listener),
            cancel.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = served.await {
                tracing::error!(error = %e, "serving the re-created socket failed");
            }
        });
    }
}

/// Serves the client API on `incoming`, allowing what `access` allows.
async fn serve<S, IO, E>(
    node: Arc<Node>,
    access: Access,
    volumes: Arc<dyn VolumeSockets>,
    incoming: S,
    cancel: CancellationToken,
) -> Result<()>
where
    S: futures::Stream<Item = std::result::Result<IO, E>> + Send + 'static,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CheckpointServer<CheckpointService>>()
        .await;
    health_reporter
        .set_serving::<AdminServer<AdminService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::InvalidArgument(format!("building gRPC reflection: {e}")))?;
    Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            CheckpointServer::new(CheckpointService::new(Arc::clone(&node), access.clone()))
                .max_decoding_message_size(service::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(service::MAX_MESSAGE_BYTES),
        )
        .add_service(AdminServer::new(AdminService::new(node, access, volumes)))
        .serve_with_incoming_shutdown(incoming, async move { cancel.cancelled().await })
        .await
        .map_err(|e| Error::Io {
            context: "serving gRPC".into(),
            source: std::io::Error::other(e),
        })
}

/// Serves `cairn.v1.Peer` to other daemons, over mutual TLS unless the
/// tier runs insecure.
async fn serve_peers(
    peers: Arc<PeerTier>,
    target: Arc<dyn PrefetchTarget>,
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Result<()> {
    let mut builder = Server::builder()
        .initial_stream_window_size(peer::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(peer::CONNECTION_WINDOW_BYTES)
        .max_frame_size(peer::FRAME_BYTES)
        .tcp_nodelay(true);
    if let Some(tls) = peers.tls() {
        builder = builder.tls_config(tls.server()).map_err(|e| {
            Error::InvalidArgument(format!(
                "peers.tls: the certificate or key is not usable: {e}"
            ))
        })?;
    }
    let service = PeerService::new(
        Arc::clone(&peers.store),
        target,
        peers.membership(),
        ReplicaPlacement {
            me: peers.me().id,
            candidates: peers.placement_candidates(),
        },
        !peers.insecure(),
        metrics,
    );
    builder
        .add_service(
            PeerServer::new(service)
                .max_decoding_message_size(peer::MAX_PEER_MESSAGE_BYTES)
                .max_encoding_message_size(peer::MAX_PEER_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            cancel.cancelled().await
        })
        .await
        .map_err(|e| Error::Io {
            context: "serving the peer service".into(),
            source: std::io::Error::other(e),
        })
}

/// Binds the client socket: creates its directory (mode 0700) if needed,
/// replaces a stale socket, refuses to steal a live one, and restricts the
/// socket to its owner (or its owner and `group`).
fn bind_socket(path: &Path, group: Option<&str>) -> Result<UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).io_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .io_context(|| format!("restricting {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::FailedPrecondition(format!(
                "another process is serving {}; is cairnd already running?",
                path.display()
            )));
        }
        std::fs::remove_file(path)
            .io_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).io_context(|| format!("binding {}", path.display()))?;
    let mode = match group {
        Some(group) => {
            let gid = resolve_group(group)?;
            std::os::unix::fs::chown(path, None, Some(gid))
                .io_context(|| format!("giving {} to group {group}", path.display()))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .io_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

/// A group name or number to a gid, via `/etc/group`.
fn resolve_group(group: &str) -> Result<u32> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let groups =
        std::fs::read_to_string("/etc/group").io_context(|| "reading /etc/group".into())?;
    groups
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid = fields.nth(1)?.parse().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .ok_or_else(|| {
            Error::InvalidArgument(format!("socket_group {group:?} is not a known group"))
        })
}
