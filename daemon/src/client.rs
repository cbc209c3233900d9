//! Connecting to a daemon: used by the `cairn` CLI, the benchmarks and the
//! integration tests.

use std::path::PathBuf;

use cairn_proto::v1::admin_client::AdminClient;
use cairn_proto::v1::checkpoint_client::CheckpointClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::error::{Error, Result};

/// Largest message a client accepts (matches the server).
const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// Connects to the daemon's Unix socket (or `http://host:port` for TCP).
pub async fn connect(target: &str) -> Result<Channel> {
    let unavailable = |e: tonic::transport::Error| Error::Io {
        context: format!("connecting to cairnd at {target}"),
        source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e),
    };
    if target.starts_with("http://") {
        return Endpoint::from_shared(target.to_owned())
            .map_err(unavailable)?
            .initial_stream_window_size(16 * 1024 * 1024)
            .initial_connection_window_size(32 * 1024 * 1024)
            .connect()
            .await
            .map_err(unavailable);
    }
    let path = PathBuf::from(target);
    // The URI is required by the API but ignored by the connector.
    Endpoint::try_from("http://cairnd.local")
        .map_err(unavailable)?
        .initial_stream_window_size(16 * 1024 * 1024)
        .initial_connection_window_size(32 * 1024 * 1024)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(unavailable)
}

/// Both clients over one channel.
pub struct Clients {
    /// The client API.
    pub checkpoint: CheckpointClient<Channel>,
    /// The operator API.
    pub admin: AdminClient<Channel>,
}

impl Clients {
    /// Connects to `target` (a socket path or `http://host:port`).
    pub async fn connect(target: &str) -> Result<Self> {
        let channel = connect(target).await?;
        Ok(Self {
            checkpoint: CheckpointClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            admin: AdminClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        })
    }
}
