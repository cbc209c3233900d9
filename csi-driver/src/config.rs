//! Flags and environment, into a validated [`Config`].
//!
//! Kubernetes passes the socket as `CSI_ENDPOINT` and the node name through
//! the downward API (`NODE_NAME`), so those flags read the environment too.
//! Every path is checked once here (absolute, normalised) so the rest of the
//! plugin can join validated names onto them without re-checking.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::error::{Error, Result};
use crate::volume::check_normalised_absolute;

/// Default socket kubelet's node-driver-registrar expects in the plugin's
/// pod.
pub const DEFAULT_ENDPOINT: &str = "/csi/csi.sock";
/// Default volumes directory: inside the daemon's memory tier (T0), so the
/// daemon can later take ingested files by rename instead of copying.
pub const DEFAULT_VOLUMES_DIR: &str = "/dev/shm/cairn/volumes";
/// Default state directory (on the host, so records outlive the pod).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cairn/csi";
/// Default kubelet root directory; every target path must be under it.
pub const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet";
/// Default socket of the node's cairnd.
pub const DEFAULT_DAEMON_SOCKET: &str = "/run/cairn/cairn.sock";
/// Default time a publish waits for cairnd to restore the checkpoint it
/// pre-fills (kubelet retries a publish that takes longer).
pub const DEFAULT_PREFILL_TIMEOUT: &str = "10m";
/// Default CSI driver name (the CSIDriver object's name).
pub const DEFAULT_DRIVER_NAME: &str = "csi.cairn.dev";
/// The topology key NodeGetInfo reports the zone under.
pub const ZONE_TOPOLOGY_KEY: &str = "topology.cairn.dev/zone";
/// Longest node id the CSI spec allows.
pub const MAX_NODE_ID_LEN: usize = 256;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `cairn-csi`: Cairn's CSI node plugin (Identity and Node services) for
/// ephemeral inline volumes in the node's memory tier.
#[derive(Clone, Debug, Parser)]
#[command(name = "cairn-csi", version)]
pub struct Args {
    /// The CSI socket: `unix:///path` or a plain path.
    #[arg(long, env = "CSI_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// This node's id (the Kubernetes node name).
    #[arg(long, env = "NODE_NAME")]
    pub node_id: String,
    /// The node's zone; when set, NodeGetInfo reports it as topology.
    #[arg(long, env = "CAIRN_ZONE")]
    pub zone: Option<String>,
    /// Where volume directories live (inside the daemon's memory tier).
    #[arg(long, default_value = DEFAULT_VOLUMES_DIR)]
    pub volumes_dir: PathBuf,
    /// Where the plugin records published volumes across restarts.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Kubelet's root directory; target paths must be under it.
    #[arg(long, default_value = DEFAULT_KUBELET_DIR)]
    pub kubelet_dir: PathBuf,
    /// The node daemon's socket: publish asks it for the checkpoint to
    /// pre-fill the volume with (`restore` attribute).
    #[arg(long, default_value = DEFAULT_DAEMON_SOCKET)]
    pub daemon_socket: PathBuf,
    /// How long a publish waits for the daemon to restore that checkpoint
    /// (e.g. `90s`, `10m`).
    #[arg(long, default_value = DEFAULT_PREFILL_TIMEOUT, value_parser = humantime::parse_duration)]
    pub prefill_timeout: Duration,
    /// The CSI driver name reported by GetPluginInfo.
    #[arg(long, default_value = DEFAULT_DRIVER_NAME)]
    pub driver_name: String,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// The validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The Unix socket to serve on.
    pub socket: PathBuf,
    /// This node's id.
    pub node_id: String,
    /// The node's zone, if known.
    pub zone: Option<String>,
    /// Where volume directories live.
    pub volumes_dir: PathBuf,
    /// Where records of published volumes live.
    pub state_dir: PathBuf,
    /// Kubelet's root directory.
    pub kubelet_dir: PathBuf,
    /// The node daemon's socket.
    pub daemon_socket: PathBuf,
    /// How long a publish waits for a restore.
    pub prefill_timeout: Duration,
    /// The driver name.
    pub driver_name: String,
}

impl Config {
    /// Validates `args`.
    pub fn from_args(args: &Args) -> Result<Self> {
        let socket = parse_endpoint(&args.endpoint)?;
        if args.node_id.is_empty()
            || args.node_id.len() > MAX_NODE_ID_LEN
            || args.node_id.contains('\0')
        {
            return Err(Error::Config(format!(
                "--node-id must be 1 to {MAX_NODE_ID_LEN} bytes without NUL"
            )));
        }
        let zone = match args.zone.as_deref() {
            None | Some("") => None,
            Some(zone) if is_topology_value(zone) => Some(zone.to_owned()),
            Some(zone) => {
                return Err(Error::Config(format!(
                    "--zone {zone:?} must be at most 63 characters of letters, digits, '-', '_' \
                     and '.', starting and ending with a letter or digit"
                )));
            }
        };
        if !is_driver_name(&args.driver_name) {
            return Err(Error::Config(format!(
                "--driver-name {:?} must be a domain name of at most 63 characters",
                args.driver_name
            )));
        }
        let dir = |flag: &str, path: &PathBuf| -> Result<PathBuf> {
            let text = path
                .to_str()
                .ok_or_else(|| Error::Config(format!("{flag} must be UTF-8")))?;
            check_normalised_absolute(flag, text).map_err(|e| Error::Config(e.to_string()))?;
            Ok(path.clone())
        };
        let volumes_dir = dir("--volumes-dir", &args.volumes_dir)?;
        let state_dir = dir("--state-dir", &args.state_dir)?;
        let kubelet_dir = dir("--kubelet-dir", &args.kubelet_dir)?;
        let daemon_socket = dir("--daemon-socket", &args.daemon_socket)?;
        for (flag, path) in [("--volumes-dir", &volumes_dir), ("--state-dir", &state_dir)] {
            if path.starts_with(&kubelet_dir) || kubelet_dir.starts_with(path) {
                return Err(Error::Config(format!(
                    "{flag} {} must not overlap --kubelet-dir {}",
                    path.display(),
                    kubelet_dir.display()
                )));
            }
        }
        if args.prefill_timeout.is_zero() {
            return Err(Error::Config("--prefill-timeout must be above 0".into()));
        }
        if volumes_dir.starts_with(&state_dir) || state_dir.starts_with(&volumes_dir) {
            return Err(Error::Config(
                "--volumes-dir and --state-dir must not overlap".into(),
            ));
        }
        Ok(Config {
            socket,
            node_id: args.node_id.clone(),
            zone,
            volumes_dir,
            state_dir,
            kubelet_dir,
            daemon_socket,
            prefill_timeout: args.prefill_timeout,
            driver_name: args.driver_name.clone(),
        })
    }
}

/// `unix:///path` or a plain path, to the socket path. Other schemes are
/// refused: the CSI spec allows only Unix sockets.
pub fn parse_endpoint(endpoint: &str) -> Result<PathBuf> {
    let path = match endpoint.split_once("://") {
        Some(("unix", path)) => path,
        Some((scheme, _)) => {
            return Err(Error::Config(format!(
                "--endpoint {endpoint:?}: only unix:// endpoints are supported, not {scheme}://"
            )));
        }
        None => endpoint,
    };
    if path.is_empty() || path.contains('\0') {
        return Err(Error::Config(format!(
            "--endpoint {endpoint:?} names no socket path"
        )));
    }
    if endpoint.contains("://") && !path.starts_with('/') {
        return Err(Error::Config(format!(
            "--endpoint {endpoint:?} must be unix:///absolute/path"
        )));
    }
    Ok(PathBuf::from(path))
}

/// A CSI topology segment value: at most 63 characters, alphanumeric at
/// both ends, `-`, `_`, `.` or alphanumerics between.
fn is_topology_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A CSI driver name: at most 63 characters, alphanumeric at both ends,
/// `-`, `.` or alphanumerics between.
fn is_driver_name(value: &str) -> bool {
    is_topology_value(value) && !value.contains('_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["cairn-csi", "--node-id", "node-1"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).expect("parse")
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = Config::from_args(&args(&[])).expect("valid");
        assert_eq!(config.socket, PathBuf::from(DEFAULT_ENDPOINT));
        assert_eq!(config.volumes_dir, PathBuf::from(DEFAULT_VOLUMES_DIR));
        assert_eq!(config.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(config.kubelet_dir, PathBuf::from(DEFAULT_KUBELET_DIR));
        assert_eq!(config.driver_name, DEFAULT_DRIVER_NAME);
        assert_eq!(config.zone, None);
        assert_eq!(config.prefill_timeout, Duration::from_secs(600));
    }

    #[test]
    fn endpoints_are_unix_sockets() {
        assert_eq!(
            parse_endpoint("unix:///csi/csi.sock").expect("url"),
            PathBuf::from("/csi/csi.sock")
        );
        assert_eq!(
            parse_endpoint("/tmp/x.sock").expect("path"),
            PathBuf::from("/tmp/x.sock")
        );
        for bad in ["tcp://127.0.0.1:10000", "unix://", "unix://relative", ""] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_flags_are_refused() {
        for extra in [
            &["--zone=-bad"][..],
            &["--driver-name", "Bad_Name"],
            &["--kubelet-dir", "relative"],
            &["--kubelet-dir", "/var/lib/kubelet/../x"],
            &["--volumes-dir", "/var/lib/kubelet/cairn"],
            &["--state-dir", "/dev/shm/cairn/volumes/state"],
            &["--prefill-timeout", "0s"],
        ] {
            assert!(Config::from_args(&args(extra)).is_err(), "{extra:?}");
        }
        let config = Config::from_args(&args(&["--zone", "eu-west-1a"])).expect("zone");
        assert_eq!(config.zone.as_deref(), Some("eu-west-1a"));
    }
}
