//! Prefill on publish: the checkpoint a volume's `restore` attribute asks
//! for (`latest` by default, or a step) is placed into its `data/` before
//! NodePublishVolume returns, so before the pod's containers start.
//!
//! The plugin asks the node's cairnd (`RestoreShard` over its Unix socket)
//! to make the job's shard for the volume's rank readable in the memory
//! tier; cairnd answers with the files' paths there. The memory tier and
//! the volumes directory share a tmpfs, so the files are hard-linked into
//! the volume, without a copy; only a link that fails with `EXDEV` (a
//! memory tier on another filesystem, or seen through another mount) falls
//! back to a copy, logged. The plugin must see the memory tier at the same
//! path as cairnd does.
//!
//! The step is assembled in a hidden directory (`.cairn-prefill-<step>`, a
//! name ingest never takes), listed in the volume's `ingested.json` (so the
//! daemon, seeing it appear, does not take it back as a new shard), and
//! then renamed to its final name, `stepDirFormat` (default `{step}`, what
//! Orbax expects). A retried publish finds `ingested.json` and does not
//! prefill twice.
//!
//! `latest` with nothing restorable (NOT_FOUND) publishes an empty volume:
//! a first start. An unreachable daemon (UNAVAILABLE) or a named step that
//! cannot be restored (FAILED_PRECONDITION) fails the publish, and kubelet
//! retries: starting a pod empty when it asked for its checkpoint would
//! silently throw its training away.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_core::ingest::{
    INGESTED_FILE, IngestSource, IngestedSteps, MEMORY_SHARDS_DIR, original_file_name,
};
use cairn_core::names::Step;
use cairn_core::{FileName, TenantName};
use cairn_proto::v1 as pb;
use cairn_proto::v1::admin_client::AdminClient;
use cairn_proto::v1::checkpoint_client::CheckpointClient;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use tokio::runtime::Handle;

use crate::client;
use crate::error::{Error, IoContext, Result};
use crate::store::write_atomically;
use crate::volume::{DATA_DIR, Restore, VolumeId, VolumeSpec};

/// How long connecting to cairnd's socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer accepted from cairnd: a restore's manifest lists every
/// chunk of the shard (tens of bytes each).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Where cairnd puts the volume's socket in `data/` (it binds the volume
/// before prefill runs).
pub const VOLUME_SOCKET_DIR: &str = ".cairn";
/// Prefix of the hidden directory a step is assembled in.
const TEMP_PREFIX: &str = ".cairn-prefill-";
/// Mode of `ingested.json`, like `volume.json`.
const INGESTED_FILE_MODE: u32 = 0o640;

/// The node's cairnd, as far as prefill needs it.
#[derive(Debug)]
pub struct DaemonClient {
    socket: PathBuf,
    timeout: Duration,
    runtime: Handle,
    /// The memory tier's `shards/`: restored files are taken from below it
    /// only, whatever the answer on the socket says.
    shards_dir: PathBuf,
}

/// A shard cairnd made readable in its memory tier.
#[derive(Debug)]
pub struct RestoredShard {
    /// The step restored (the newest restorable one, for `latest`).
    pub step: Step,
    /// Its files.
    pub files: Vec<RestoredFile>,
}

/// One restored file.
#[derive(Debug)]
pub struct RestoredFile {
    /// Its path inside the step directory, as the framework wrote it.
    pub relative: String,
    /// Where cairnd holds it (in the memory tier).
    pub source: PathBuf,
    /// Its size.
    pub size: u64,
}

impl DaemonClient {
    /// A client for the daemon at `socket`, whose restores may take up to
    /// `timeout`. Must be created inside the plugin's runtime: publishes
    /// run on blocking threads and use its handle to make the call.
    pub fn new(socket: PathBuf, timeout: Duration, memory_dir: &Path) -> Result<Self> {
        let runtime = Handle::try_current()
            .map_err(|e| Error::Config(format!("prefill needs the async runtime: {e}")))?;
        Ok(Self {
            socket,
            timeout,
            runtime,
            shards_dir: memory_dir.join(MEMORY_SHARDS_DIR),
        })
    }

    /// Runs one call to cairnd's Admin service over its socket; the error
    /// says what `doing` was, and UNAVAILABLE when cairnd is not there.
    fn admin<T>(
        &self,
        doing: &str,
        call: impl AsyncFnOnce(
            AdminClient<tonic::transport::Channel>,
        ) -> std::result::Result<tonic::Response<T>, tonic::Status>,
    ) -> Result<T> {
        let socket = self.socket.clone();
        let unavailable = |detail: String| {
            Error::Unavailable(format!(
                "cairnd is not reachable at {} ({detail}) for {doing}: every volume is served \
                 by the node's cairnd; start it, and the kubelet retries",
                socket.display()
            ))
        };
        let answer = self.runtime.block_on(async {
            let channel = connect_daemon(&socket, unavailable).await?;
            match tokio::time::timeout(CONNECT_TIMEOUT * 6, call(AdminClient::new(channel))).await {
                Ok(answer) => Ok(answer),
                Err(_) => Err(unavailable("no answer within 30 s".into())),
            }
        })?;
        match answer {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(match status.code() {
                tonic::Code::PermissionDenied => Error::PermissionDenied(status.message().into()),
                tonic::Code::Unavailable => unavailable(status.message().into()),
                tonic::Code::InvalidArgument => Error::InvalidArgument(status.message().into()),
                code => Error::Internal(format!(
                    "cairnd refused {doing}: {code:?}: {}",
                    status.message()
                )),
            }),
        }
    }

    /// Asks cairnd to serve the volume's own socket; the tenant cairnd
    /// decided the volume acts for (its pod's namespace, or what the
    /// operator maps it to). PERMISSION_DENIED: the volume's `tenant`
    /// attribute names another.
    pub fn bind_volume(&self, volume_id: &VolumeId) -> Result<TenantName> {
        let request = pb::BindVolumeRequest {
            volume_id: volume_id.as_str().to_owned(),
        };
        let doing = format!("binding volume {volume_id}");
        let answer = self.admin(&doing, async |mut admin| admin.bind_volume(request).await)?;
        TenantName::parse("BindVolume.tenant", answer.tenant)
            .map_err(|e| Error::Internal(format!("cairnd's answer to {doing} is unusable: {e}")))
    }

    /// Asks cairnd to stop serving the volume's socket.
    pub fn unbind_volume(&self, volume_id: &VolumeId) -> Result<()> {
        let request = pb::UnbindVolumeRequest {
            volume_id: volume_id.as_str().to_owned(),
        };
        self.admin(
            &format!("unbinding volume {volume_id}"),
            async |mut admin| admin.unbind_volume(request).await,
        )
        .map(drop)
    }

    /// Asks cairnd to restore what `spec` asks for. `Ok(None)`: `latest`
    /// and nothing restorable yet. Blocks: call it from a blocking thread.
    pub fn restore(&self, spec: &VolumeSpec) -> Result<Option<RestoredShard>> {
        let step = match spec.restore {
            Restore::None => return Ok(None),
            Restore::Latest => None,
            Restore::Step(step) => Some(step.0),
        };
        let wanted = format!(
            "{} of job {} rank {} (tenant {})",
            match step {
                Some(step) => format!("step {step}"),
                None => "the newest restorable step".into(),
            },
            spec.job,
            spec.rank,
            spec.tenant
        );
        let socket = self.socket.clone();
        let timeout = self.timeout;
        let request = pb::RestoreShardRequest {
            shard: Some(pb::ShardSelector {
                tenant: spec.tenant.to_string(),
                job: spec.job.to_string(),
                step,
                rank: spec.rank.0,
            }),
            skip_verify: false,
        };
        let unavailable = |detail: String| {
            Error::Unavailable(format!(
                "cairnd is not reachable at {} ({detail}); the volume asks for restore: {} \
                 and the checkpoint comes from cairnd: start cairnd, or set restore: none \
                 to start empty",
                socket.display(),
                spec.restore
            ))
        };
        let answer = self.runtime.block_on(async {
            let channel = connect_daemon(&socket, unavailable).await?;
            let mut client = CheckpointClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            let mut request = tonic::Request::new(request);
            request.set_timeout(timeout);
            Ok::<_, Error>(client.restore_shard(request).await)
        })?;
        let response = match answer {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound && step.is_none() => {
                return Ok(None);
            }
            Err(status) if status.code() == tonic::Code::NotFound => {
                return Err(Error::FailedPrecondition(format!(
                    "cannot pre-fill the volume: cairnd has no {wanted}: {}",
                    status.message()
                )));
            }
            Err(status) if status.code() == tonic::Code::Unavailable => {
                return Err(unavailable(status.message().to_owned()));
            }
            Err(status) => {
                return Err(Error::Internal(format!(
                    "cairnd could not restore {wanted}: {:?}: {}",
                    status.code(),
                    status.message()
                )));
            }
        };
        convert(response, spec).map(Some)
    }
}

/// Connects to cairnd at `socket` within [`CONNECT_TIMEOUT`]; `unavailable`
/// turns why it could not into the caller's error.
async fn connect_daemon(
    socket: &Path,
    unavailable: impl Fn(String) -> Error,
) -> Result<tonic::transport::Channel> {
    match tokio::time::timeout(CONNECT_TIMEOUT, client::connect(socket)).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(unavailable(error_chain(&e))),
        Err(_) => Err(unavailable("connecting timed out".into())),
    }
}

/// The full error chain, for a connection failure's message.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

/// Checks cairnd's answer and turns stored names back into the names the
/// framework wrote.
fn convert(response: pb::RestoreShardResponse, spec: &VolumeSpec) -> Result<RestoredShard> {
    let bad =
        |what: String| Error::Internal(format!("cairnd's restore answer is unusable: {what}"));
    let shard = response
        .manifest
        .and_then(|m| m.shard)
        .ok_or_else(|| bad("no manifest".into()))?;
    if shard.job != spec.job.as_str() || shard.rank != spec.rank.0 {
        return Err(bad(format!(
            "it is job {} rank {}, not job {} rank {}",
            shard.job, shard.rank, spec.job, spec.rank
        )));
    }
    let mut files = Vec::with_capacity(response.files.len());
    for (i, file) in response.files.into_iter().enumerate() {
        let stored = FileName::parse(&format!("files[{i}].name"), file.name)
            .map_err(|e| bad(e.to_string()))?;
        let relative = original_file_name(&stored).map_err(|e| bad(e.to_string()))?;
        let source = PathBuf::from(file.path);
        if !source.is_absolute() {
            return Err(bad(format!("files[{i}].path is not absolute")));
        }
        files.push(RestoredFile {
            relative,
            source,
            size: file.size,
        });
    }
    Ok(RestoredShard {
        step: Step(shard.step),
        files,
    })
}

/// Reads a volume's `ingested.json` (an empty list when there is none).
pub fn read_ingested(volume_dir: &Path) -> Result<IngestedSteps> {
    let path = volume_dir.join(INGESTED_FILE);
    match fs::read(&path) {
        Ok(bytes) => Ok(IngestedSteps::decode(&bytes)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(IngestedSteps::default()),
        Err(e) => Err(e).io_context(|| format!("reading {}", path.display())),
    }
}

/// How a prefill went, for the log.
#[derive(Debug, Default)]
struct Placed {
    linked: usize,
    copied: usize,
    bytes: u64,
}

/// Pre-fills the volume in `volume_dir` as `spec` asks. Only an empty
/// `data/` is filled: a volume remounted after the pod wrote into it (or
/// after an earlier prefill) keeps what it has. Leftovers of an attempt
/// that crashed half-way are removed first. The caller holds the volume's
/// in-flight guard and has not mounted the volume yet.
pub fn prefill(volume_dir: &Path, spec: &VolumeSpec, daemon: &DaemonClient) -> Result<()> {
    if spec.restore == Restore::None {
        return Ok(());
    }
    let data = volume_dir.join(DATA_DIR);
    let mut holds_data = false;
    for entry in fs::read_dir(&data).io_context(|| format!("listing {}", data.display()))? {
        let entry = entry.io_context(|| format!("listing {}", data.display()))?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(TEMP_PREFIX) {
            remove_tree(&entry.path())?;
        } else if name != VOLUME_SOCKET_DIR {
            // The volume's socket (cairnd's, made at bind) is not the pod's data.
            holds_data = true;
        }
    }
    let mut ingested = read_ingested(volume_dir)?;
    if holds_data || ingested.has_prefilled() {
        tracing::info!("the volume already holds data; not pre-filling it");
        return Ok(());
    }
    let started = Instant::now();
    let Some(shard) = daemon.restore(spec)? else {
        tracing::info!(restore = %spec.restore, "no checkpoint to restore yet; the volume starts empty");
        return Ok(());
    };
    let name = spec.step_dir_format.dir_name(shard.step);
    let target = data.join(&name);
    let temp = data.join(format!("{TEMP_PREFIX}{}", shard.step));
    let placed = place(&temp, &shard.files, &daemon.shards_dir);
    let placed = match placed {
        Ok(placed) => placed,
        Err(e) => {
            let _ = remove_tree(&temp);
            return Err(e);
        }
    };
    // Listed before it appears under its final name, so the daemon never
    // sees it as a new step.
    ingested.record(shard.step, &name, IngestSource::Prefilled);
    write_atomically(
        &volume_dir.join(INGESTED_FILE),
        &ingested.encode(),
        INGESTED_FILE_MODE,
    )?;
    fs::rename(&temp, &target)
        .io_context(|| format!("renaming {} to {}", temp.display(), target.display()))?;
    tracing::info!(
        step = %shard.step,
        dir = %name,
        files = shard.files.len(),
        bytes = placed.bytes,
        linked = placed.linked,
        copied = placed.copied,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "volume pre-filled"
    );
    Ok(())
}

/// Opens one of cairnd's restored files for prefill: only below the memory
/// tier's `shards/` (its own directory, which no pod reaches), resolved
/// with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` so no link and no `..`
/// leads out, and only a regular file of the announced size. Whatever
/// answers on cairnd's socket, prefill reads nothing else.
fn open_restored(shards: &OwnedFd, shards_dir: &Path, file: &RestoredFile) -> Result<OwnedFd> {
    let refuse = |why: &str| {
        Error::Internal(format!(
            "cairnd's restored file {} {why}; refusing to pre-fill from it",
            file.source.display()
        ))
    };
    let relative = file.source.strip_prefix(shards_dir).map_err(|_| {
        refuse(&format!(
            "is not in the memory tier's {}",
            shards_dir.display()
        ))
    })?;
    if relative
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(refuse("is not a plain path below the shards directory"));
    }
    let fd = rustix::fs::openat2(
        shards,
        relative,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|errno| match errno {
        Errno::XDEV | Errno::LOOP | Errno::NOTDIR => {
            refuse("leads out of the memory tier or through a link")
        }
        errno => Error::Io {
            context: format!("opening the restored file {}", file.source.display()),
            source: errno.into(),
        },
    })?;
    let stat = rustix::fs::fstat(&fd)
        .io_context(|| format!("inspecting the restored file {}", file.source.display()))?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile
        || u64::try_from(stat.st_size).ok() != Some(file.size)
    {
        return Err(refuse(&format!(
            "is not a regular file of {} bytes",
            file.size
        )));
    }
    Ok(fd)
}

/// Hard-links (or, across filesystems, copies) every file into `dir`,
/// each through the descriptor [`open_restored`] checked.
fn place(dir: &Path, files: &[RestoredFile], shards_dir: &Path) -> Result<Placed> {
    let shards = rustix::fs::open(
        shards_dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .io_context(|| format!("opening the memory tier's {}", shards_dir.display()))?;
    let mut placed = Placed::default();
    fs::create_dir_all(dir).io_context(|| format!("creating {}", dir.display()))?;
    for file in files {
        let mut target = dir.to_path_buf();
        target.extend(file.relative.split('/'));
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).io_context(|| format!("creating {}", parent.display()))?;
        }
        let source = open_restored(&shards, shards_dir, file)?;
        // The inode itself, through its descriptor: nothing is resolved again.
        let through = format!("/proc/self/fd/{}", source.as_raw_fd());
        match rustix::fs::linkat(
            rustix::fs::CWD,
            through.as_str(),
            rustix::fs::CWD,
            &target,
            AtFlags::SYMLINK_FOLLOW,
        ) {
            Ok(()) => placed.linked += 1,
            Err(Errno::XDEV) => {
                if placed.copied == 0 {
                    tracing::warn!(
                        source = %file.source.display(),
                        "the memory tier is on another filesystem (or mount) than the volume; \
                         copying instead of linking"
                    );
                }
                fs::copy(&through, &target).io_context(|| {
                    format!("copying {} to {}", file.source.display(), target.display())
                })?;
                placed.copied += 1;
            }
            Err(errno) => {
                return Err(Error::Io {
                    context: format!(
                        "hard-linking {} to {}",
                        file.source.display(),
                        target.display()
                    ),
                    source: errno.into(),
                });
            }
        }
        placed.bytes += file.size;
    }
    Ok(placed)
}

/// Removes a directory tree if it exists (never following a link).
fn remove_tree(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            fs::remove_dir_all(path).io_context(|| format!("removing {}", path.display()))
        }
        Ok(_) => fs::remove_file(path).io_context(|| format!("removing {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).io_context(|| format!("inspecting {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_empty_volume_is_prefilled() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join(DATA_DIR);
        fs::create_dir_all(data.join(".cairn-prefill-3/x")).expect("leftover");
        fs::create_dir_all(data.join("3")).expect("the pod's step");
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        // The socket does not exist: a call to cairnd would fail, so
        // success means it was not called.
        let daemon = runtime.block_on(async {
            DaemonClient::new(
                dir.path().join("no.sock"),
                Duration::from_secs(1),
                dir.path(),
            )
        });
        let daemon = daemon.expect("client");
        let req = crate::volume::PublishRequest {
            volume_id: "v".into(),
            target_path: "/var/lib/kubelet/pods/p/mount".into(),
            capability: Some(crate::volume::Capability {
                access_type: Some(crate::volume::AccessType::Mount {
                    fs_type: String::new(),
                    mount_flags: vec![],
                    volume_mount_group: String::new(),
                }),
                access_mode: Some(crate::volume::AccessMode::SingleNodeWriter),
            }),
            volume_context: [
                ("csi.storage.k8s.io/ephemeral", "true"),
                ("job", "j"),
                ("rank", "0"),
                ("tenant", "t"),
                ("csi.storage.k8s.io/pod.namespace", "t"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            ..Default::default()
        };
        let spec = VolumeSpec::from_request(&req, Path::new("/var/lib/kubelet")).expect("spec");
        prefill(dir.path(), &spec, &daemon).expect("nothing to do");
        assert!(!data.join(".cairn-prefill-3").exists(), "leftover removed");
        fs::remove_dir(data.join("3")).expect("empty the volume");
        let err = prefill(dir.path(), &spec, &daemon).expect_err("cairnd is needed now");
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.to_string().contains("no.sock"), "{err}");
    }

    #[test]
    fn files_are_linked_with_their_original_names() {
        let dir = tempfile::tempdir().expect("temp dir");
        let source = dir.path().join("shard");
        fs::create_dir_all(&source).expect("mkdir");
        let a = source.join("a");
        fs::write(&a, b"hello").expect("write");
        let files = vec![
            RestoredFile {
                relative: ".metadata".into(),
                source: a.clone(),
                size: 5,
            },
            RestoredFile {
                relative: "default/d/x".into(),
                source: a.clone(),
                size: 5,
            },
        ];
        let target = dir.path().join("out");
        let placed = place(&target, &files, dir.path()).expect("place");
        assert_eq!((placed.linked, placed.copied, placed.bytes), (2, 0, 10));
        assert_eq!(fs::read(target.join(".metadata")).expect("read"), b"hello");
        assert_eq!(
            fs::read(target.join("default/d/x")).expect("read"),
            b"hello"
        );
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(&a).expect("stat").nlink(), 3);

        let wrong = vec![RestoredFile {
            relative: "b".into(),
            source: a,
            size: 6,
        }];
        let err = place(&dir.path().join("out2"), &wrong, dir.path()).expect_err("size mismatch");
        assert_eq!(err.code(), tonic::Code::Internal);
    }

    /// Prefill takes files from the memory tier's `shards/` only, never
    /// through a link or `..`: an impostor answering on cairnd's socket
    /// cannot make the privileged plugin copy another pod's secret.
    #[test]
    fn restored_files_are_taken_from_the_memory_tiers_shards_only() {
        use std::os::unix::fs::MetadataExt;

        let dir = tempfile::tempdir().expect("temp dir");
        let shards = dir.path().join("memory").join(MEMORY_SHARDS_DIR);
        let shard = shards.join("t/j/1/0");
        fs::create_dir_all(&shard).expect("shard dir");
        fs::write(shard.join("w"), b"good").expect("w");
        let secret = dir.path().join("secret");
        fs::write(&secret, b"xxxx").expect("secret");
        std::os::unix::fs::symlink(&secret, shard.join("link")).expect("link");
        std::os::unix::fs::symlink(dir.path(), shards.join("t/up")).expect("dir link");
        let file = |source: PathBuf, size: u64| RestoredFile {
            relative: "w".into(),
            source,
            size,
        };

        let out = dir.path().join("out");
        place(&out, &[file(shard.join("w"), 4)], &shards).expect("a file of the tier");
        assert_eq!(fs::read(out.join("w")).expect("read"), b"good");
        assert_eq!(
            fs::metadata(shard.join("w")).expect("stat").nlink(),
            2,
            "linked"
        );

        for (n, bad) in [
            file(secret.clone(), 4),
            file(shards.join("t/j/1/0/../../../../../secret"), 4),
            file(shard.join("link"), 4),
            file(shards.join("t/up/secret"), 4),
            file(shard.join("w"), 5),
        ]
        .into_iter()
        .enumerate()
        {
            let target = dir.path().join(format!("bad{n}"));
            let err = place(&target, &[bad], &shards).expect_err("outside the tier");
            assert!(err.to_string().contains("refusing"), "{err}");
            assert!(!target.join("w").exists());
        }
    }
}
