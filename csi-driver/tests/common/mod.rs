//! Test harness: the real `cairn-csi` binary on a Unix socket in a temp
//! dir, with its kubelet and state directories in that temp dir and its
//! volumes directory on the real tmpfs (`/dev/shm`), as in production.
//!
//! The tests mount for real, so they need root; without it each test prints
//! "skipped: needs root for mount(2)" and returns. Every mount a test makes
//! lies under its own directories, and [`Plugin`]'s `Drop` detaches them
//! (lazily, `MNT_DETACH`) even when the test fails.

#![allow(dead_code, missing_docs)]

pub mod daemon;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_csi::csi::v1 as pb;
use cairn_csi::csi::v1::identity_client::IdentityClient;
use cairn_csi::csi::v1::node_client::NodeClient;
use cairn_csi::mountinfo;
use tonic::transport::Channel;

pub const CAIRN_CSI: &str = env!("CARGO_BIN_EXE_cairn-csi");
pub const NODE_ID: &str = "node-a";

/// True when the tests can mount; otherwise prints why they skip.
pub fn can_mount(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    eprintln!("{test}: skipped: needs root for mount(2)");
    false
}

/// A plugin process with its own directories.
pub struct Plugin {
    pub dir: tempfile::TempDir,
    pub shm_dir: PathBuf,
    pub kubelet_dir: PathBuf,
    pub volumes_dir: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The node's cairnd, which every publish binds its volume through.
    pub daemon: Option<testkit::Daemon>,
    child: Option<Child>,
}

impl Plugin {
    pub async fn start() -> Plugin {
        Self::start_with(&[], &[]).await
    }

    /// Starts a cairnd on the plugin's tmpfs directory, then the plugin
    /// talking to it.
    pub async fn start_with(extra_args: &[&str], env: &[(&str, &str)]) -> Plugin {
        let mut plugin = Self::new(extra_args, env);
        plugin.start_daemon().await;
        plugin.spawn();
        plugin.wait_ready().await;
        plugin
    }

    /// The directories, without a process.
    pub fn new(extra_args: &[&str], env: &[(&str, &str)]) -> Plugin {
        let dir = tempfile::tempdir().expect("temp dir");
        let shm_dir = PathBuf::from(format!("/dev/shm/cairn-csi-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&shm_dir).expect("shm dir");
        let kubelet_dir = dir.path().join("kubelet");
        std::fs::create_dir(&kubelet_dir).expect("kubelet dir");
        Plugin {
            volumes_dir: shm_dir.join("volumes"),
            state_dir: dir.path().join("state"),
            socket: dir.path().join("csi").join("csi.sock"),
            log: dir.path().join("cairn-csi.log"),
            kubelet_dir,
            shm_dir,
            dir,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            daemon: None,
            child: None,
        }
    }

    /// Starts the node's cairnd (memory tier: the plugin's tmpfs directory)
    /// and points the plugin at its socket.
    pub async fn start_daemon(&mut self) -> &mut testkit::Daemon {
        let work = self.dir.path().join("cairnd");
        let started = daemon::start(&self.shm_dir, &work).await;
        self.extra_args.extend([
            "--daemon-socket".into(),
            started.socket.display().to_string(),
        ]);
        self.daemon.insert(started)
    }

    pub fn command(&self) -> Command {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Command::new(CAIRN_CSI);
        cmd.arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--kubelet-dir")
            .arg(&self.kubelet_dir)
            .arg("--volumes-dir")
            .arg(&self.volumes_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(&self.extra_args)
            .env("NODE_NAME", NODE_ID)
            .env("CAIRN_LOG", "info")
            .env_remove("FAILPOINTS")
            .env_remove("CSI_ENDPOINT")
            .env_remove("CAIRN_ZONE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    pub fn spawn(&mut self) {
        self.child = Some(self.command().spawn().expect("spawn cairn-csi"));
    }

    /// Waits until Probe says ready (or the process dies).
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "cairn-csi exited during start ({status}); log:\n{}",
                    self.log_text()
                );
            }
            if let Ok(channel) = cairn_csi::client::connect(&self.socket).await
                && let Ok(resp) = IdentityClient::new(channel)
                    .probe(pb::ProbeRequest {})
                    .await
                && resp.into_inner().ready == Some(true)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cairn-csi did not start; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }

    pub async fn channel(&self) -> Channel {
        cairn_csi::client::connect(&self.socket)
            .await
            .expect("connect to cairn-csi")
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel().await)
    }

    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM; returns whether the process exited successfully in time.
    /// Async, so this test's client connections keep being driven (they
    /// answer the server's graceful GOAWAY) while the plugin shuts down.
    pub async fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Kills the process and starts a new one on the same directories.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready().await;
    }

    /// A kubelet-style target path for `pod`'s volume `name`; like kubelet,
    /// creates its parent but not the target itself.
    pub fn target(&self, pod: &str, name: &str) -> PathBuf {
        let parent = self
            .kubelet_dir
            .join("pods")
            .join(pod)
            .join("volumes/kubernetes.io~csi")
            .join(name);
        std::fs::create_dir_all(&parent).expect("target parent");
        parent.join("mount")
    }

    pub fn volume_dir(&self, id: &str) -> PathBuf {
        self.volumes_dir.join(id)
    }

    pub fn record_path(&self, id: &str) -> PathBuf {
        self.state_dir.join("volumes").join(format!("{id}.json"))
    }

    /// Every path under the test's directories (temp dir and tmpfs dir),
    /// the log excluded: to show a request created nothing.
    pub fn listing(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for root in [self.dir.path(), self.shm_dir.as_path()] {
            walk(root, &mut out);
        }
        out.retain(|p| p != &self.log);
        out.sort();
        out
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        out.push(path.clone());
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&path, out);
        }
    }
}

impl Drop for Plugin {
    /// Kills the plugin and its daemon, detaches the mounts and removes the
    /// tmpfs directory; when the test is failing, their logs are kept first
    /// (the temp dir goes as the test unwinds).
    fn drop(&mut self) {
        self.kill();
        testkit::logs::keep_if_failing("cairn-csi", &self.log);
        // The daemon before the temp dir (the first field) goes: its log is
        // in there.
        drop(self.daemon.take());
        detach_mounts_under(self.dir.path());
        detach_mounts_under(&self.shm_dir);
        let _ = std::fs::remove_dir_all(&self.shm_dir);
    }
}

/// Lazily unmounts everything under `dir`, deepest first.
pub fn detach_mounts_under(dir: &Path) {
    let Ok(entries) = mountinfo::read() else {
        return;
    };
    for mount_point in mountinfo::mounts_under(&entries, dir) {
        // Stacked mounts: detach until nothing is left there.
        while rustix::mount::unmount(&mount_point, rustix::mount::UnmountFlags::DETACH).is_ok() {}
    }
}

/// How many mounts sit at `path` now.
pub fn mounts_at(path: &Path) -> usize {
    mountinfo::mounts_at(&mountinfo::read().expect("mountinfo"), path).len()
}

/// The attributes kubelet sends for an inline volume of an Indexed Job pod
/// `train-<rank>-abcde` in namespace `ml`, plus `job` and `restore: none`
/// (these tests run no cairnd to restore from; `tests/ingest.rs` does).
pub fn inline_attrs(rank: u32) -> HashMap<String, String> {
    HashMap::from([
        ("csi.storage.k8s.io/ephemeral".into(), "true".into()),
        (
            "csi.storage.k8s.io/pod.name".into(),
            format!("train-{rank}-abcde"),
        ),
        ("csi.storage.k8s.io/pod.namespace".into(), "ml".into()),
        (
            "csi.storage.k8s.io/pod.uid".into(),
            "6a1f2c3d-0000-4000-8000-00000000abcd".into(),
        ),
        (
            "csi.storage.k8s.io/serviceAccount.name".into(),
            "default".into(),
        ),
        ("job".into(), "llama".into()),
        ("rankFrom".into(), "jobCompletionIndex".into()),
        ("restore".into(), "none".into()),
    ])
}

pub fn mount_capability(mode: pb::volume_capability::access_mode::Mode) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Mount(
            pb::volume_capability::MountVolume::default(),
        )),
        access_mode: Some(pb::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

/// A valid publish of `id` at `target`.
pub fn publish_request(id: &str, target: &Path, rank: u32) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.to_str().expect("utf-8").into(),
        volume_capability: Some(mount_capability(
            pb::volume_capability::access_mode::Mode::SingleNodeWriter,
        )),
        volume_context: inline_attrs(rank),
        ..Default::default()
    }
}

pub fn unpublish_request(id: &str, target: &Path) -> pb::NodeUnpublishVolumeRequest {
    pb::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.to_str().expect("utf-8").into(),
    }
}

pub fn stats_request(id: &str, target: &Path) -> pb::NodeGetVolumeStatsRequest {
    pb::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: target.to_str().expect("utf-8").into(),
        staging_target_path: String::new(),
    }
}

/// Asserts `result` failed with `code`, with a message mentioning `mentions`.
pub fn assert_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    mentions: &str,
) {
    match result {
        Ok(v) => panic!("expected {code:?} mentioning {mentions:?}, got Ok({v:?})"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(mentions),
                "{:?} does not mention {mentions:?}",
                status.message()
            );
        }
    }
}
