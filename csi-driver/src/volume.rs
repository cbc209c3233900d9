//! Validation of NodePublishVolume / NodeUnpublishVolume arguments: a
//! [`PublishRequest`] in, a [`VolumeSpec`] out, and nothing else.
//!
//! This module is pure (no I/O, no async) so that every rule can be tested on
//! its own, and so that the one question that matters for safety — can a
//! request make the plugin touch a path outside its roots? — can be checked
//! by a property test over arbitrary requests.
//!
//! The invariants an accepted request guarantees:
//!
//! - the volume id is one path segment of `[A-Za-z0-9._-]`, never `.` or
//!   `..`, so `<volumes-dir>/<volume_id>` is a direct child of the volumes
//!   directory;
//! - the target path is absolute, normalised (no empty, `.` or `..`
//!   components, no NUL) and strictly under the kubelet directory;
//! - the volume is an ephemeral inline volume with a mount (not block)
//!   capability and a single-node access mode;
//! - the job, rank, tenant and restore request are valid Cairn values, the
//!   step directory format makes names that ingest reads back as the same
//!   step, and every attribute key is one the plugin knows.
//!
//! A missing or malformed argument is INVALID_ARGUMENT. A well-formed
//! capability the plugin cannot serve (block, a multi-node mode, an fs_type,
//! mount flags, a mount group) is FAILED_PRECONDITION, the spec's "Exceeds
//! capabilities" condition of NodePublishVolume; it is judged last, once
//! everything else in the request is valid.
//!
//! Symbolic links are the I/O layer's business: `publish.rs` re-checks the
//! resolved target against the resolved kubelet directory before mounting.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use cairn_core::ingest::{CommitPolicy, StepDirFormat};
use cairn_core::names::{JobName, Rank, Step, TenantName};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Longest volume id accepted (the CSI spec's general string limit).
pub const MAX_VOLUME_ID_LEN: usize = 128;
/// Longest path accepted (Linux's `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest volume attribute key accepted.
pub const MAX_ATTRIBUTE_KEY_LEN: usize = 256;
/// Longest volume attribute value accepted. Generous for kubelet's own
/// values (pod names, service-account token JSON), and still far below what
/// would let one request pin much memory.
pub const MAX_ATTRIBUTE_VALUE_LEN: usize = 4096;
/// Most volume attributes accepted in one request.
pub const MAX_ATTRIBUTES: usize = 32;
/// Longest Kubernetes object name (a DNS subdomain).
pub const MAX_POD_NAME_LEN: usize = 253;
/// Longest pod UID accepted (kubelet sends a 36-character UUID).
pub const MAX_POD_UID_LEN: usize = 64;
/// Longest value echoed back in an error message.
const MAX_SHOWN: usize = 120;

/// The directory, inside a volume's directory, that is bind-mounted onto the
/// target path: what the pod sees.
pub const DATA_DIR: &str = "data";
/// The file, inside a volume's directory, holding its [`VolumeSpec`] as JSON
/// for the daemon's ingest.
pub const SPEC_FILE: &str = "volume.json";

/// Volume attribute keys: the ones a pod spec sets, and the ones kubelet adds.
pub mod attr {
    /// The Cairn job the volume belongs to (required).
    pub const JOB: &str = "job";
    /// The rank, as a decimal `u32` (this or [`RANK_FROM`] is required).
    pub const RANK: &str = "rank";
    /// Where to take the rank from: `jobCompletionIndex` or `podNameOrdinal`.
    pub const RANK_FROM: &str = "rankFrom";
    /// Which step to pre-fill: `latest` (the default), `none` or a step.
    pub const RESTORE: &str = "restore";
    /// The name prefill gives the restored step's directory: a prefix and
    /// `{step}` (default `{step}`, what Orbax expects).
    pub const STEP_DIR_FORMAT: &str = "stepDirFormat";
    /// The file whose arrival in a step directory tells the daemon the step
    /// is finished (`.metadata` for DCP), or `none` (the rename of the
    /// directory is the commit); default: the daemon's `ingest.commit_marker`.
    pub const COMMIT_MARKER: &str = "commitMarker";
    /// The Cairn tenant the pod expects. Never decides it: the tenant is
    /// the pod's namespace (or what cairnd's `[tenants]` maps it to), and a
    /// publish whose attribute names another is refused by cairnd.
    pub const TENANT: &str = "tenant";

    /// Prefix of every attribute kubelet adds on its own.
    pub const KUBELET_PREFIX: &str = "csi.storage.k8s.io/";
    /// `"true"` for an ephemeral inline volume.
    pub const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
    /// The pod's name (CSIDriver `podInfoOnMount: true`).
    pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
    /// The pod's namespace (CSIDriver `podInfoOnMount: true`).
    pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
    /// The pod's UID (CSIDriver `podInfoOnMount: true`).
    pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
    /// Service-account tokens (CSIDriver `tokenRequests`): a secret, never
    /// logged, never echoed.
    pub const SERVICE_ACCOUNT_TOKENS: &str = "csi.storage.k8s.io/serviceAccount.tokens";
}

/// Values of [`attr::RANK_FROM`].
pub mod rank_from {
    /// An Indexed Job pod, named `<job>-<index>-<suffix>`.
    pub const JOB_COMPLETION_INDEX: &str = "jobCompletionIndex";
    /// A StatefulSet pod, named `<name>-<ordinal>`.
    pub const POD_NAME_ORDINAL: &str = "podNameOrdinal";
}

/// A validated CSI volume id: safe to use as one directory or file name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeId(String);

impl VolumeId {
    /// Validates `value` as the volume id in `field`: non-empty, at most
    /// [`MAX_VOLUME_ID_LEN`] bytes of `[A-Za-z0-9._-]`, not `.` or `..`.
    pub fn parse(field: &str, value: &str) -> Result<Self> {
        check_string(field, value, MAX_VOLUME_ID_LEN)?;
        if value.is_empty() {
            return Err(invalid(format!("{field} is required")));
        }
        if value == "." || value == ".." {
            return Err(invalid(format!("{field} must not be `.` or `..`")));
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(invalid(format!(
                "{field} {} may contain only ASCII letters, digits, '.', '_' and '-'",
                shown(value)
            )));
        }
        Ok(Self(value.to_owned()))
    }

    /// The validated id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl TryFrom<String> for VolumeId {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        Self::parse("volume_id", &value)
    }
}

impl From<VolumeId> for String {
    fn from(value: VolumeId) -> Self {
        value.0
    }
}

/// `<volumes_dir>/<volume_id>`: the volume's own directory. Always a direct
/// child of `volumes_dir`, because a [`VolumeId`] is one safe segment.
pub fn volume_dir(volumes_dir: &Path, id: &VolumeId) -> PathBuf {
    volumes_dir.join(id.as_str())
}

/// The access type a request asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessType {
    /// A raw block device: not supported.
    Block,
    /// A mounted file system.
    Mount {
        /// `MountVolume.fs_type`; must be empty.
        fs_type: String,
        /// `MountVolume.mount_flags`; must be empty. Never shown in errors
        /// (the spec says they may be sensitive).
        mount_flags: Vec<String>,
        /// `MountVolume.volume_mount_group`; must be empty.
        volume_mount_group: String,
    },
}

/// `VolumeCapability.AccessMode.Mode`, as the plugin sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AccessMode {
    /// Read-write on one node (the mode kubelet uses for inline volumes).
    SingleNodeWriter,
    /// Read-only on one node: published read-only.
    SingleNodeReaderOnly,
    /// Read-write by one workload on one node.
    SingleNodeSingleWriter,
    /// Read-write by several workloads on one node.
    SingleNodeMultiWriter,
    /// Not supported: the volume lives in one node's memory.
    MultiNodeReaderOnly,
    /// Not supported: the volume lives in one node's memory.
    MultiNodeSingleWriter,
    /// Not supported: the volume lives in one node's memory.
    MultiNodeMultiWriter,
    /// `UNKNOWN` or a value this plugin does not know.
    #[serde(skip)]
    Unknown(i32),
}

impl AccessMode {
    /// INVALID_ARGUMENT for `UNKNOWN` (the field left unset) or a value this
    /// plugin does not know.
    fn check_known(self) -> Result<Self> {
        match self {
            AccessMode::Unknown(_) => Err(invalid(format!(
                "volume_capability.access_mode {self} is not a valid mode; use \
                 SINGLE_NODE_WRITER"
            ))),
            _ => Ok(self),
        }
    }

    /// FAILED_PRECONDITION (the spec's "Exceeds capabilities") for the
    /// multi-node modes: a Cairn volume lives in one node's memory tier.
    fn check_supported(self) -> Result<Self> {
        match self {
            AccessMode::MultiNodeReaderOnly
            | AccessMode::MultiNodeSingleWriter
            | AccessMode::MultiNodeMultiWriter => Err(unsupported(format!(
                "volume_capability.access_mode {self} is not supported: a Cairn volume lives \
                 in one node's memory tier, so only SINGLE_NODE_* modes are"
            ))),
            _ => Ok(self),
        }
    }
}

impl fmt::Display for AccessMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessMode::SingleNodeWriter => f.write_str("SINGLE_NODE_WRITER"),
            AccessMode::SingleNodeReaderOnly => f.write_str("SINGLE_NODE_READER_ONLY"),
            AccessMode::SingleNodeSingleWriter => f.write_str("SINGLE_NODE_SINGLE_WRITER"),
            AccessMode::SingleNodeMultiWriter => f.write_str("SINGLE_NODE_MULTI_WRITER"),
            AccessMode::MultiNodeReaderOnly => f.write_str("MULTI_NODE_READER_ONLY"),
            AccessMode::MultiNodeSingleWriter => f.write_str("MULTI_NODE_SINGLE_WRITER"),
            AccessMode::MultiNodeMultiWriter => f.write_str("MULTI_NODE_MULTI_WRITER"),
            AccessMode::Unknown(0) => f.write_str("UNKNOWN"),
            AccessMode::Unknown(n) => write!(f, "{n}"),
        }
    }
}

/// `VolumeCapability`: both halves optional, as on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capability {
    /// `access_type`; `None` when the oneof is unset.
    pub access_type: Option<AccessType>,
    /// `access_mode.mode`; `None` when `access_mode` is unset.
    pub access_mode: Option<AccessMode>,
}

/// The arguments of a NodePublishVolume call, converted from the wire type
/// without judging them. `secrets` are deliberately absent: the plugin uses
/// none, and leaving them out here means no later code can log them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishRequest {
    /// `volume_id`.
    pub volume_id: String,
    /// `target_path`.
    pub target_path: String,
    /// `staging_target_path`; must be empty (no STAGE_UNSTAGE_VOLUME).
    pub staging_target_path: String,
    /// How many `publish_context` entries came; must be zero (no controller).
    pub publish_context_len: usize,
    /// `volume_capability`; required.
    pub capability: Option<Capability>,
    /// `readonly`.
    pub readonly: bool,
    /// `volume_context`.
    pub volume_context: BTreeMap<String, String>,
}

/// Where the rank came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RankSource {
    /// The `rank` attribute.
    Attribute,
    /// The index in an Indexed Job pod's name.
    JobCompletionIndex,
    /// The ordinal in a StatefulSet pod's name.
    PodNameOrdinal,
}

/// Which checkpoint to pre-fill the volume with, at publish, before the
/// pod's containers start (see `prefill.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Restore {
    /// The newest restorable step, if any. The default: a restarted pod
    /// should find its newest checkpoint without extra configuration.
    Latest,
    /// Start empty.
    None,
    /// This step.
    Step(Step),
}

impl Restore {
    /// Parses `latest`, `none` or a decimal step number.
    pub fn parse(field: &str, value: &str) -> Result<Self> {
        match value {
            "latest" => Ok(Restore::Latest),
            "none" => Ok(Restore::None),
            _ => parse_decimal::<u64>(value)
                .map(|n| Restore::Step(Step(n)))
                .ok_or_else(|| {
                    invalid(format!(
                        "{field} {} must be `latest`, `none` or a step number",
                        shown(value)
                    ))
                }),
        }
    }
}

impl fmt::Display for Restore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Restore::Latest => f.write_str("latest"),
            Restore::None => f.write_str("none"),
            Restore::Step(step) => write!(f, "{step}"),
        }
    }
}

impl TryFrom<String> for Restore {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        Self::parse("restore", &value)
    }
}

impl From<Restore> for String {
    fn from(value: Restore) -> Self {
        value.to_string()
    }
}

/// What kubelet told us about the pod (all optional: it is sent only when
/// the CSIDriver object sets `podInfoOnMount: true`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    /// The pod's name.
    pub name: Option<String>,
    /// The pod's namespace.
    pub namespace: Option<String>,
    /// The pod's UID.
    pub uid: Option<String>,
}

/// A validated NodePublishVolume: everything the plugin acts on, and what it
/// records (in the state directory and as the volume's `volume.json`). Two
/// publishes of the same volume are "the same arguments" exactly when their
/// specs are equal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    /// The CSI volume id (kubelet's, for an inline volume).
    pub volume_id: VolumeId,
    /// Where the volume is mounted; strictly under the kubelet directory.
    pub target_path: PathBuf,
    /// The Cairn tenant: the pod's namespace until cairnd, binding the
    /// volume at publish, says which tenant that namespace is.
    pub tenant: TenantName,
    /// The pod's `tenant` attribute, if any: checked by cairnd against the
    /// namespace's tenant, never used as the tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_attribute: Option<TenantName>,
    /// The Cairn job.
    pub job: JobName,
    /// This pod's rank in the job.
    pub rank: Rank,
    /// Where [`VolumeSpec::rank`] came from.
    pub rank_source: RankSource,
    /// Which checkpoint to pre-fill.
    pub restore: Restore,
    /// The name of the prefilled step's directory. Absent from records
    /// written before the attribute existed: the default then.
    #[serde(default)]
    pub step_dir_format: StepDirFormat,
    /// The volume's own commit policy for ingest; `None`: the daemon's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_marker: Option<CommitPolicy>,
    /// Whether the mount is read-only.
    pub read_only: bool,
    /// The requested access mode.
    pub access_mode: AccessMode,
    /// The pod, as kubelet described it.
    pub pod: PodInfo,
}

impl VolumeSpec {
    /// Validates every argument of `req` before anything is done with it.
    /// `kubelet_dir` must itself be absolute and normalised (the config
    /// checks it at start).
    pub fn from_request(req: &PublishRequest, kubelet_dir: &Path) -> Result<Self> {
        let volume_id = VolumeId::parse("volume_id", &req.volume_id)?;
        let target_path = parse_target_path("target_path", &req.target_path, kubelet_dir)?;
        if !req.staging_target_path.is_empty() {
            return Err(invalid(
                "staging_target_path must be empty: cairn-csi does not advertise \
                 STAGE_UNSTAGE_VOLUME"
                    .into(),
            ));
        }
        if req.publish_context_len > 0 {
            return Err(invalid(
                "publish_context must be empty: cairn-csi has no controller service".into(),
            ));
        }
        let (capability, access_mode) = check_capability(req.capability.as_ref())?;
        let ctx = Attributes::check(&req.volume_context)?;

        match ctx.get(attr::EPHEMERAL) {
            Some("true") => {}
            _ => {
                return Err(invalid(format!(
                    "only ephemeral inline volumes are supported: volume_context must contain \
                     {}: \"true\" (a CSI volume in the pod spec, not a PersistentVolume)",
                    attr::EPHEMERAL
                )));
            }
        }
        let pod = ctx.pod_info()?;
        let job = match ctx.get(attr::JOB) {
            Some(job) => JobName::parse("volume_context.job", job.to_owned())?,
            None => return Err(invalid("volume_context.job is required".into())),
        };
        let (rank, rank_source) = ctx.rank(&pod)?;
        let restore = match ctx.get(attr::RESTORE) {
            Some(value) => Restore::parse("volume_context.restore", value)?,
            None => Restore::Latest,
        };
        let step_dir_format = match ctx.get(attr::STEP_DIR_FORMAT) {
            Some(value) => StepDirFormat::parse("volume_context.stepDirFormat", value)?,
            None => StepDirFormat::default(),
        };
        let commit_marker = match ctx.get(attr::COMMIT_MARKER) {
            Some(value) => Some(CommitPolicy::parse("volume_context.commitMarker", value)?),
            None => None,
        };
        let tenant_attribute = match ctx.get(attr::TENANT) {
            Some(tenant) => Some(TenantName::parse(
                "volume_context.tenant",
                tenant.to_owned(),
            )?),
            None => None,
        };
        let tenant = match &pod.namespace {
            Some(namespace) => TenantName::parse(
                "volume_context.csi.storage.k8s.io/pod.namespace",
                namespace.clone(),
            )?,
            None => {
                return Err(invalid(format!(
                    "{} is missing: the tenant is the pod's namespace, so the CSIDriver \
                     must set podInfoOnMount: true",
                    attr::POD_NAMESPACE
                )));
            }
        };
        check_capability_supported(capability, access_mode)?;
        Ok(VolumeSpec {
            volume_id,
            target_path,
            tenant,
            tenant_attribute,
            job,
            rank,
            rank_source,
            restore,
            step_dir_format,
            commit_marker,
            read_only: req.readonly || access_mode == AccessMode::SingleNodeReaderOnly,
            access_mode,
            pod,
        })
    }
}

/// Validates a target (or volume) path: absolute, normalised, at most
/// [`MAX_PATH_LEN`] bytes, no NUL, strictly under `kubelet_dir`.
pub fn parse_target_path(field: &str, value: &str, kubelet_dir: &Path) -> Result<PathBuf> {
    check_string(field, value, MAX_PATH_LEN)?;
    if value.is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    check_normalised_absolute(field, value)?;
    let path = PathBuf::from(value);
    if path == kubelet_dir || !path.starts_with(kubelet_dir) {
        return Err(invalid(format!(
            "{field} {} must be strictly under the kubelet directory {}",
            shown(value),
            kubelet_dir.display()
        )));
    }
    Ok(path)
}

/// Checks that `value` is an absolute path whose components are all plain
/// names: no empty (`//`, trailing `/`), `.` or `..` components. Used for
/// target paths and for the plugin's own directories.
pub fn check_normalised_absolute(field: &str, value: &str) -> Result<()> {
    let Some(rest) = value.strip_prefix('/') else {
        return Err(invalid(format!(
            "{field} {} must be an absolute path",
            shown(value)
        )));
    };
    if rest.is_empty() {
        return Err(invalid(format!("{field} must not be `/`")));
    }
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(invalid(format!(
            "{field} {} must be normalised: no empty, `.` or `..` components",
            shown(value)
        )));
    }
    Ok(())
}

/// Checks that the capability is there and well formed: a missing part or
/// a malformed value is INVALID_ARGUMENT. Returns it with its access mode.
fn check_capability(cap: Option<&Capability>) -> Result<(&Capability, AccessMode)> {
    let Some(cap) = cap else {
        return Err(invalid("volume_capability is required".into()));
    };
    match &cap.access_type {
        None => {
            return Err(invalid(
                "volume_capability.access_type is required (mount)".into(),
            ));
        }
        Some(AccessType::Block) => {}
        Some(AccessType::Mount { fs_type, .. }) => check_string(
            "volume_capability.mount.fs_type",
            fs_type,
            MAX_VOLUME_ID_LEN,
        )?,
    }
    match cap.access_mode {
        None => Err(invalid("volume_capability.access_mode is required".into())),
        Some(mode) => Ok((cap, mode.check_known()?)),
    }
}

/// Checks that a well-formed capability asks only for what a Cairn volume
/// is (a bind-mounted directory on one node, no fs_type, no mount options):
/// anything more is FAILED_PRECONDITION, the spec's "Exceeds capabilities"
/// condition of NodePublishVolume. Run after every INVALID_ARGUMENT check,
/// so that a request is judged on its capability only once it is valid.
fn check_capability_supported(cap: &Capability, mode: AccessMode) -> Result<()> {
    match &cap.access_type {
        None => {}
        Some(AccessType::Block) => {
            return Err(unsupported(
                "volume_capability.block is not supported: a Cairn volume is a directory; \
                 use a mount (filesystem) volume"
                    .into(),
            ));
        }
        Some(AccessType::Mount {
            fs_type,
            mount_flags,
            volume_mount_group,
        }) => {
            if !fs_type.is_empty() {
                return Err(unsupported(format!(
                    "volume_capability.mount.fs_type {} is not supported: the volume is a \
                     bind-mounted directory of the memory tier; leave fsType unset",
                    shown(fs_type)
                )));
            }
            if !mount_flags.is_empty() {
                // Not echoed: the spec says mount flags may be sensitive.
                return Err(unsupported(format!(
                    "volume_capability.mount.mount_flags are not supported ({} given)",
                    mount_flags.len()
                )));
            }
            if !volume_mount_group.is_empty() {
                return Err(unsupported(
                    "volume_capability.mount.volume_mount_group is not supported: cairn-csi \
                     does not advertise VOLUME_MOUNT_GROUP"
                        .into(),
                ));
            }
        }
    }
    mode.check_supported().map(|_| ())
}

/// The volume context after the generic checks: every key known, every key
/// and value short and free of NUL bytes.
struct Attributes<'a>(&'a BTreeMap<String, String>);

impl<'a> Attributes<'a> {
    fn check(ctx: &'a BTreeMap<String, String>) -> Result<Self> {
        if ctx.len() > MAX_ATTRIBUTES {
            return Err(invalid(format!(
                "volume_context has {} entries; at most {MAX_ATTRIBUTES} are allowed",
                ctx.len()
            )));
        }
        for (key, value) in ctx {
            check_string("a volume_context key", key, MAX_ATTRIBUTE_KEY_LEN)?;
            let known = matches!(
                key.as_str(),
                attr::JOB
                    | attr::RANK
                    | attr::RANK_FROM
                    | attr::RESTORE
                    | attr::TENANT
                    | attr::STEP_DIR_FORMAT
                    | attr::COMMIT_MARKER
            ) || key.starts_with(attr::KUBELET_PREFIX);
            if !known {
                return Err(invalid(format!(
                    "volume_context has an unknown attribute {}; known: {}, {}, {}, {}, {}, {}, \
                     {} (and the {}* ones kubelet adds)",
                    shown(key),
                    attr::JOB,
                    attr::RANK,
                    attr::RANK_FROM,
                    attr::RESTORE,
                    attr::TENANT,
                    attr::STEP_DIR_FORMAT,
                    attr::COMMIT_MARKER,
                    attr::KUBELET_PREFIX
                )));
            }
            // The field name carries the key, never the value: kubelet's
            // values include service-account tokens.
            check_string(
                &format!("volume_context[{}]", shown(key)),
                value,
                MAX_ATTRIBUTE_VALUE_LEN,
            )?;
        }
        Ok(Self(ctx))
    }

    fn get(&self, key: &str) -> Option<&'a str> {
        self.0.get(key).map(String::as_str)
    }

    fn pod_info(&self) -> Result<PodInfo> {
        let name = match self.get(attr::POD_NAME) {
            Some(name) => {
                let ok = !name.is_empty()
                    && name.len() <= MAX_POD_NAME_LEN
                    && name.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.')
                    });
                if !ok {
                    return Err(invalid(format!(
                        "volume_context.{} {} is not a Kubernetes pod name",
                        attr::POD_NAME,
                        shown(name)
                    )));
                }
                Some(name.to_owned())
            }
            None => None,
        };
        let namespace = match self.get(attr::POD_NAMESPACE) {
            Some(ns) => Some(
                TenantName::parse(
                    &format!("volume_context.{}", attr::POD_NAMESPACE),
                    ns.to_owned(),
                )?
                .into(),
            ),
            None => None,
        };
        let uid = match self.get(attr::POD_UID) {
            Some(uid) => {
                let ok = !uid.is_empty()
                    && uid.len() <= MAX_POD_UID_LEN
                    && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
                if !ok {
                    return Err(invalid(format!(
                        "volume_context.{} {} is not a pod UID",
                        attr::POD_UID,
                        shown(uid)
                    )));
                }
                Some(uid.to_owned())
            }
            None => None,
        };
        Ok(PodInfo {
            name,
            namespace,
            uid,
        })
    }

    fn rank(&self, pod: &PodInfo) -> Result<(Rank, RankSource)> {
        match (self.get(attr::RANK), self.get(attr::RANK_FROM)) {
            (Some(_), Some(_)) => Err(invalid(format!(
                "volume_context sets both {} and {}; set one",
                attr::RANK,
                attr::RANK_FROM
            ))),
            (None, None) => Err(invalid(format!(
                "volume_context needs {} (a number) or {} ({} or {})",
                attr::RANK,
                attr::RANK_FROM,
                rank_from::JOB_COMPLETION_INDEX,
                rank_from::POD_NAME_ORDINAL
            ))),
            (Some(rank), None) => parse_decimal::<u32>(rank)
                .map(|r| (Rank(r), RankSource::Attribute))
                .ok_or_else(|| {
                    invalid(format!(
                        "volume_context.rank {} must be a decimal number from 0 to {} without \
                         leading zeros",
                        shown(rank),
                        u32::MAX
                    ))
                }),
            (None, Some(from)) => {
                let source = match from {
                    rank_from::JOB_COMPLETION_INDEX => RankSource::JobCompletionIndex,
                    rank_from::POD_NAME_ORDINAL => RankSource::PodNameOrdinal,
                    other => {
                        return Err(invalid(format!(
                            "volume_context.rankFrom {} must be {} or {}",
                            shown(other),
                            rank_from::JOB_COMPLETION_INDEX,
                            rank_from::POD_NAME_ORDINAL
                        )));
                    }
                };
                let Some(name) = pod.name.as_deref() else {
                    return Err(invalid(format!(
                        "volume_context.rankFrom {from} needs {}: set podInfoOnMount: true on \
                         the CSIDriver",
                        attr::POD_NAME
                    )));
                };
                rank_from_pod_name(name, source).map(|r| (r, source))
            }
        }
    }
}

/// Takes the rank out of a pod's name: the index of an Indexed Job pod
/// (`<job>-<index>-<suffix>`) or the ordinal of a StatefulSet pod
/// (`<name>-<ordinal>`).
pub fn rank_from_pod_name(name: &str, source: RankSource) -> Result<Rank> {
    let (shape, number) = match source {
        RankSource::JobCompletionIndex => {
            let mut parts = name.rsplitn(3, '-');
            let suffix = parts.next().unwrap_or("");
            let index = parts.next();
            let job = parts.next().unwrap_or("");
            (
                "an Indexed Job pod `<job>-<index>-<suffix>`",
                index.filter(|_| !suffix.is_empty() && !job.is_empty()),
            )
        }
        RankSource::PodNameOrdinal => (
            "a StatefulSet pod `<name>-<ordinal>`",
            name.rsplit_once('-')
                .filter(|(set, _)| !set.is_empty())
                .map(|(_, ordinal)| ordinal),
        ),
        RankSource::Attribute => {
            return Err(invalid("the rank attribute is not a pod name".into()));
        }
    };
    number
        .and_then(parse_decimal::<u32>)
        .map(Rank)
        .ok_or_else(|| {
            invalid(format!(
                "pod name {} does not look like {shape}, so the rank cannot be taken from it",
                shown(name)
            ))
        })
}

/// Parses a canonical decimal number: digits only, no sign, no leading
/// zeros (so each number has one spelling, and `rank: "01"` is not silently
/// the same volume as `rank: "1"`).
fn parse_decimal<T: std::str::FromStr>(value: &str) -> Option<T> {
    let canonical = !value.is_empty()
        && value.bytes().all(|b| b.is_ascii_digit())
        && (value == "0" || !value.starts_with('0'));
    if canonical { value.parse().ok() } else { None }
}

/// Rejects NUL bytes and strings longer than `max` bytes.
fn check_string(field: &str, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(invalid(format!(
            "{field} is {} bytes long; at most {max} are allowed",
            value.len()
        )));
    }
    if value.contains('\0') {
        return Err(invalid(format!("{field} contains a NUL byte")));
    }
    Ok(())
}

/// A value as it appears in an error message: quoted, escaped, truncated.
pub(crate) fn shown(value: &str) -> String {
    if value.len() <= MAX_SHOWN {
        return format!("{value:?}");
    }
    let mut end = MAX_SHOWN;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}...", &value[..end])
}

fn invalid(message: String) -> Error {
    Error::InvalidArgument(message)
}

fn unsupported(message: String) -> Error {
    Error::ExceedsCapabilities(message)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const KUBELET: &str = "/var/lib/kubelet";
    const TARGET: &str = "/var/lib/kubelet/pods/0f1e2d3c/volumes/kubernetes.io~csi/ckpt/mount";

    fn request() -> PublishRequest {
        let ctx = [
            (attr::EPHEMERAL, "true"),
            (attr::POD_NAME, "train-3-x7k2p"),
            (attr::POD_NAMESPACE, "ml-team"),
            (attr::POD_UID, "0f1e2d3c-aaaa-bbbb-cccc-0123456789ab"),
            (attr::JOB, "llama-70b"),
            (attr::RANK_FROM, rank_from::JOB_COMPLETION_INDEX),
        ];
        PublishRequest {
            volume_id: "csi-0123abcd".into(),
            target_path: TARGET.into(),
            staging_target_path: String::new(),
            publish_context_len: 0,
            capability: Some(Capability {
                access_type: Some(AccessType::Mount {
                    fs_type: String::new(),
                    mount_flags: vec![],
                    volume_mount_group: String::new(),
                }),
                access_mode: Some(AccessMode::SingleNodeWriter),
            }),
            readonly: false,
            volume_context: ctx
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn validate(req: &PublishRequest) -> Result<VolumeSpec> {
        VolumeSpec::from_request(req, Path::new(KUBELET))
    }

    fn rejected(req: &PublishRequest, mentions: &str) {
        match validate(req) {
            Ok(spec) => panic!("accepted {req:?} as {spec:?}"),
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
                assert!(
                    e.to_string().contains(mentions),
                    "{e:?} does not mention {mentions:?}"
                );
            }
        }
    }

    fn with_attr(key: &str, value: Option<&str>) -> PublishRequest {
        let mut req = request();
        match value {
            Some(v) => req.volume_context.insert(key.into(), v.into()),
            None => req.volume_context.remove(key),
        };
        req
    }

    #[test]
    fn a_kubelet_inline_volume_is_accepted() {
        let spec = validate(&request()).expect("valid");
        assert_eq!(spec.volume_id.as_str(), "csi-0123abcd");
        assert_eq!(spec.target_path, Path::new(TARGET));
        assert_eq!(spec.job.as_str(), "llama-70b");
        assert_eq!(spec.rank, Rank(3));
        assert_eq!(spec.rank_source, RankSource::JobCompletionIndex);
        assert_eq!(spec.tenant.as_str(), "ml-team");
        assert_eq!(spec.restore, Restore::Latest);
        assert!(!spec.read_only);
        assert_eq!(spec.pod.name.as_deref(), Some("train-3-x7k2p"));
    }

    #[test]
    fn the_spec_round_trips_through_json() {
        let mut req = with_attr(attr::RESTORE, Some("1200"));
        req.readonly = true;
        let spec = validate(&req).expect("valid");
        let json = serde_json::to_string(&spec).expect("encode");
        assert!(json.contains("\"restore\":\"1200\""), "{json}");
        assert!(
            json.contains("\"access_mode\":\"SINGLE_NODE_WRITER\""),
            "{json}"
        );
        let back: VolumeSpec = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, spec);
    }

    #[test]
    fn volume_ids_are_one_safe_segment() {
        for (bad, mentions) in [
            ("", "required"),
            (".", "`.` or `..`"),
            ("..", "`.` or `..`"),
            ("../etc", "only ASCII"),
            ("/abs", "only ASCII"),
            ("a/b", "only ASCII"),
            ("a\0b", "NUL"),
            ("é", "only ASCII"),
        ] {
            let mut req = request();
            req.volume_id = bad.into();
            rejected(&req, mentions);
        }
        let mut req = request();
        req.volume_id = "x".repeat(MAX_VOLUME_ID_LEN + 1);
        rejected(&req, "at most 128");
        req.volume_id = "x".repeat(MAX_VOLUME_ID_LEN);
        validate(&req).expect("128 bytes is allowed");
    }

    #[test]
    fn target_paths_must_be_normalised_and_under_the_kubelet_dir() {
        for (bad, mentions) in [
            ("", "required"),
            ("relative/mount", "absolute"),
            ("/var/lib/kubelet", "strictly under"),
            ("/var/lib/kubeletx/pods/a", "strictly under"),
            ("/tmp/mount", "strictly under"),
            ("/var/lib/kubelet/../../etc", "normalised"),
            ("/var/lib/kubelet/pods/./a", "normalised"),
            ("/var/lib/kubelet//pods", "normalised"),
            ("/var/lib/kubelet/pods/", "normalised"),
            ("/var/lib/kubelet/pods/a\0b", "NUL"),
        ] {
            let mut req = request();
            req.target_path = bad.into();
            rejected(&req, mentions);
        }
        let mut req = request();
        req.target_path = format!("{KUBELET}/{}", "a/".repeat(3000));
        rejected(&req, "at most 4096");
    }

    fn unsupported(req: &PublishRequest, mentions: &str) {
        match validate(req) {
            Ok(spec) => panic!("accepted {req:?} as {spec:?}"),
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
                assert!(
                    e.to_string().contains(mentions),
                    "{e:?} does not mention {mentions:?}"
                );
            }
        }
    }

    fn with_mount(edit: impl FnOnce(&mut String, &mut Vec<String>, &mut String)) -> PublishRequest {
        let mut req = request();
        if let Some(Capability {
            access_type:
                Some(AccessType::Mount {
                    fs_type,
                    mount_flags,
                    volume_mount_group,
                }),
            ..
        }) = req.capability.as_mut()
        {
            edit(fs_type, mount_flags, volume_mount_group);
        }
        req
    }

    #[test]
    fn only_single_node_mount_volumes_are_supported() {
        let mut req = request();
        req.capability = None;
        rejected(&req, "volume_capability is required");
        let mut req = request();
        if let Some(cap) = req.capability.as_mut() {
            cap.access_type = None;
        }
        rejected(&req, "access_type is required");
        let mut req = request();
        if let Some(cap) = req.capability.as_mut() {
            cap.access_mode = None;
        }
        rejected(&req, "access_mode is required");

        // Exceeds capabilities: FAILED_PRECONDITION.
        let mut req = request();
        if let Some(cap) = req.capability.as_mut() {
            cap.access_type = Some(AccessType::Block);
        }
        unsupported(&req, "block is not supported");
        unsupported(
            &with_mount(|fs, _, _| *fs = "ext4".into()),
            "fs_type \"ext4\"",
        );
        unsupported(
            &with_mount(|_, _, group| *group = "1000".into()),
            "volume_mount_group",
        );
        // A malformed fs_type is still a bad argument.
        rejected(&with_mount(|fs, _, _| *fs = "x".repeat(200)), "fs_type");
        rejected(&with_mount(|fs, _, _| *fs = "ext\0".into()), "NUL");

        for (mode, expected) in [
            (AccessMode::SingleNodeWriter, None),
            (AccessMode::SingleNodeReaderOnly, None),
            (AccessMode::SingleNodeSingleWriter, None),
            (AccessMode::SingleNodeMultiWriter, None),
            (
                AccessMode::MultiNodeReaderOnly,
                Some(tonic::Code::FailedPrecondition),
            ),
            (
                AccessMode::MultiNodeSingleWriter,
                Some(tonic::Code::FailedPrecondition),
            ),
            (
                AccessMode::MultiNodeMultiWriter,
                Some(tonic::Code::FailedPrecondition),
            ),
            (AccessMode::Unknown(0), Some(tonic::Code::InvalidArgument)),
            (AccessMode::Unknown(42), Some(tonic::Code::InvalidArgument)),
        ] {
            let mut req = request();
            if let Some(cap) = req.capability.as_mut() {
                cap.access_mode = Some(mode);
            }
            match (validate(&req), expected) {
                (Ok(spec), None) => {
                    assert_eq!(spec.read_only, mode == AccessMode::SingleNodeReaderOnly);
                }
                (Ok(_), Some(code)) => panic!("{mode} accepted, expected {code:?}"),
                (Err(e), None) => panic!("{mode} rejected: {e}"),
                (Err(e), Some(code)) => {
                    assert_eq!(e.code(), code, "{mode}: {e}");
                    assert!(e.to_string().contains(&mode.to_string()), "{e}");
                }
            }
        }

        let req = with_mount(|_, flags, _| flags.push("password=hunter2".into()));
        let err = validate(&req).expect_err("mount flags");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn bad_arguments_are_reported_before_unsupported_capabilities() {
        let mut req = with_attr(attr::JOB, Some("../job"));
        if let Some(cap) = req.capability.as_mut() {
            cap.access_type = Some(AccessType::Block);
        }
        rejected(&req, "job");
    }

    #[test]
    fn staging_and_publish_context_are_refused() {
        let mut req = request();
        req.staging_target_path = "/var/lib/kubelet/plugins/x".into();
        rejected(&req, "staging_target_path");
        let mut req = request();
        req.publish_context_len = 1;
        rejected(&req, "publish_context");
    }

    #[test]
    fn only_ephemeral_volumes_are_supported() {
        rejected(
            &with_attr(attr::EPHEMERAL, None),
            "only ephemeral inline volumes",
        );
        rejected(
            &with_attr(attr::EPHEMERAL, Some("false")),
            "only ephemeral inline volumes",
        );
    }

    #[test]
    fn job_is_required_and_validated() {
        rejected(
            &with_attr(attr::JOB, None),
            "volume_context.job is required",
        );
        rejected(&with_attr(attr::JOB, Some("../x")), "volume_context.job");
        rejected(&with_attr(attr::JOB, Some("")), "volume_context.job");
    }

    #[test]
    fn ranks_come_from_the_attribute_or_the_pod_name() {
        let req = with_attr(attr::RANK_FROM, None);
        rejected(&req, "needs rank");
        for good in ["0", "7", "4294967295"] {
            let mut req = with_attr(attr::RANK_FROM, None);
            req.volume_context.insert(attr::RANK.into(), good.into());
            let spec = validate(&req).expect(good);
            assert_eq!(spec.rank.0.to_string(), good);
            assert_eq!(spec.rank_source, RankSource::Attribute);
        }
        for bad in ["", "-1", "+1", "01", "1.0", "4294967296", "one", " 1"] {
            let mut req = with_attr(attr::RANK_FROM, None);
            req.volume_context.insert(attr::RANK.into(), bad.into());
            rejected(&req, "volume_context.rank");
        }
        rejected(&with_attr(attr::RANK, Some("1")), "both rank and rankFrom");
        rejected(&with_attr(attr::RANK_FROM, Some("hostname")), "rankFrom");
        rejected(&with_attr(attr::POD_NAME, None), "podInfoOnMount");

        let mut req = with_attr(attr::RANK_FROM, Some(rank_from::POD_NAME_ORDINAL));
        req.volume_context
            .insert(attr::POD_NAME.into(), "trainer-12".into());
        assert_eq!(validate(&req).expect("ordinal").rank, Rank(12));
    }

    #[test]
    fn pod_names_yield_ranks_only_in_the_right_shape() {
        use RankSource::{JobCompletionIndex as Job, PodNameOrdinal as Set};
        for (name, source, rank) in [
            ("train-0-abcde", Job, Some(0)),
            ("my-long-job-41-q2w3e", Job, Some(41)),
            ("train-abcde", Job, None),
            ("train-x-abcde", Job, None),
            ("0-abcde", Job, None),
            ("train-1-", Job, None),
            ("web-0", Set, Some(0)),
            ("my-set-17", Set, Some(17)),
            ("web", Set, None),
            ("-3", Set, None),
            ("web-03", Set, None),
            ("web-99999999999", Set, None),
        ] {
            let got = rank_from_pod_name(name, source).ok().map(|r| r.0);
            assert_eq!(got, rank, "{name} {source:?}");
        }
    }

    #[test]
    fn restore_tenant_and_pod_info_are_validated() {
        for (value, want) in [
            ("latest", Restore::Latest),
            ("none", Restore::None),
            ("0", Restore::Step(Step(0))),
            ("18446744073709551615", Restore::Step(Step(u64::MAX))),
        ] {
            let spec = validate(&with_attr(attr::RESTORE, Some(value))).expect(value);
            assert_eq!(spec.restore, want);
        }
        for bad in ["", "Latest", "-1", "18446744073709551616", "007"] {
            rejected(
                &with_attr(attr::RESTORE, Some(bad)),
                "volume_context.restore",
            );
        }

        // The attribute is recorded for cairnd to check; the namespace is
        // the tenant until cairnd says what it maps to.
        let spec = validate(&with_attr(attr::TENANT, Some("team-b"))).expect("tenant");
        assert_eq!(spec.tenant.as_str(), "ml-team");
        assert_eq!(
            spec.tenant_attribute.as_ref().map(|t| t.as_str()),
            Some("team-b")
        );
        rejected(
            &with_attr(attr::TENANT, Some("Team_B")),
            "volume_context.tenant",
        );
        // Without the kubelet's namespace there is no tenant, whatever the
        // pod says.
        let mut req = with_attr(attr::POD_NAMESPACE, None);
        rejected(&req, "pod.namespace is missing");
        req.volume_context
            .insert(attr::TENANT.into(), "team-c".into());
        rejected(&req, "pod.namespace is missing");

        rejected(&with_attr(attr::POD_NAME, Some("Bad_Name")), "pod name");
        rejected(&with_attr(attr::POD_UID, Some("x/y")), "pod UID");
        rejected(
            &with_attr(attr::POD_NAMESPACE, Some("a.b")),
            "pod.namespace",
        );
    }

    #[test]
    fn step_dir_format_and_commit_marker_are_validated() {
        let spec = validate(&request()).expect("defaults");
        assert_eq!(spec.step_dir_format.to_string(), "{step}");
        assert_eq!(spec.commit_marker, None);
        let mut req = with_attr(attr::STEP_DIR_FORMAT, Some("step_{step}"));
        req.volume_context
            .insert(attr::COMMIT_MARKER.into(), ".metadata".into());
        let spec = validate(&req).expect("custom");
        assert_eq!(spec.step_dir_format.dir_name(Step(5)), "step_5");
        assert_eq!(
            spec.commit_marker,
            Some(CommitPolicy::Marker(".metadata".into()))
        );
        let json = serde_json::to_string(&spec).expect("encode");
        assert!(
            json.contains("\"step_dir_format\":\"step_{step}\""),
            "{json}"
        );
        assert!(json.contains("\"commit_marker\":\".metadata\""), "{json}");
        assert_eq!(
            serde_json::from_str::<VolumeSpec>(&json).expect("decode"),
            spec
        );
        let spec = validate(&with_attr(attr::COMMIT_MARKER, Some("none"))).expect("none");
        assert_eq!(spec.commit_marker, Some(CommitPolicy::Rename));
        for bad in ["{step}.ckpt", "v1{step}", "tmp-{step}", "../{step}", "step"] {
            rejected(
                &with_attr(attr::STEP_DIR_FORMAT, Some(bad)),
                "volume_context.stepDirFormat",
            );
        }
        for bad in ["a/b", "..", "x y"] {
            rejected(
                &with_attr(attr::COMMIT_MARKER, Some(bad)),
                "volume_context.commitMarker",
            );
        }
    }

    #[test]
    fn records_without_the_newer_fields_still_load() {
        let spec = validate(&request()).expect("valid");
        let mut json: serde_json::Value = serde_json::to_value(&spec).expect("encode");
        let object = json.as_object_mut().expect("object");
        object.remove("step_dir_format");
        object.remove("commit_marker");
        let back: VolumeSpec = serde_json::from_value(json).expect("decode an older record");
        assert_eq!(back, spec);
    }

    #[test]
    fn unknown_attributes_are_named_and_kubelet_ones_pass() {
        rejected(&with_attr("jobb", Some("x")), "unknown attribute \"jobb\"");
        rejected(&with_attr("Job", Some("x")), "unknown attribute \"Job\"");
        validate(&with_attr(
            "csi.storage.k8s.io/serviceAccount.name",
            Some("default"),
        ))
        .expect("kubelet attributes pass");
    }

    #[test]
    fn long_values_and_nul_bytes_are_refused_without_echoing_secrets() {
        let secret = format!("{{\"aud\":{{\"token\":\"{}\"}}}}", "s".repeat(10_000));
        let err = validate(&with_attr(attr::SERVICE_ACCOUNT_TOKENS, Some(&secret)))
            .expect_err("too long");
        assert!(!err.to_string().contains("sss"), "{err}");
        assert!(err.to_string().contains("at most 4096"), "{err}");

        let err = validate(&with_attr(
            attr::SERVICE_ACCOUNT_TOKENS,
            Some("tok\0en-secret"),
        ))
        .expect_err("NUL");
        assert!(!err.to_string().contains("secret"), "{err}");

        rejected(&with_attr(attr::JOB, Some(&"j".repeat(10_240))), "at most");
        rejected(&with_attr(&"k".repeat(10_240), Some("v")), "at most 256");
        rejected(&with_attr("jo\0b", Some("v")), "NUL");

        let mut req = request();
        for i in 0..MAX_ATTRIBUTES {
            req.volume_context
                .insert(format!("{}x{i}", attr::KUBELET_PREFIX), String::new());
        }
        rejected(&req, "entries");
    }

    #[test]
    fn long_values_are_truncated_in_messages() {
        let long = "é".repeat(200);
        let shown = shown(&long);
        assert!(shown.len() < 140, "{shown}");
        assert!(shown.ends_with("..."));
    }

    /// Strings built from the pieces that matter: separators, dots, NULs,
    /// the kubelet prefix, and plain names.
    fn tricky_string() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/".to_string()),
            Just(".".to_string()),
            Just("..".to_string()),
            Just("\0".to_string()),
            Just("/var/lib/kubelet".to_string()),
            Just("/var/lib/kubelet/pods/p/volumes/v/mount".to_string()),
            "[a-z0-9._-]{1,12}",
        ];
        prop::collection::vec(piece, 0..8).prop_map(|pieces| pieces.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Whatever the request, an accepted one names a volume directory
        /// that is a direct child of the volumes directory, and a target
        /// strictly under the kubelet directory with only plain components.
        #[test]
        fn accepted_requests_never_leave_the_roots(
            volume_id in prop_oneof![tricky_string(), "[A-Za-z0-9._-]{1,16}"],
            target in prop_oneof![
                tricky_string(),
                "[a-z0-9./]{0,24}".prop_map(|s| format!("{KUBELET}/{s}")),
            ],
            readonly in any::<bool>(),
            extra_key in prop_oneof![Just(None), tricky_string().prop_map(Some)],
            job in prop_oneof![Just("job-1".to_string()), tricky_string()],
        ) {
            let mut req = request();
            req.volume_id = volume_id;
            req.target_path = target;
            req.readonly = readonly;
            req.volume_context.insert(attr::JOB.into(), job);
            if let Some(key) = extra_key {
                req.volume_context.insert(key, "v".into());
            }
            let volumes = Path::new("/dev/shm/cairn/volumes");
            if let Ok(spec) = validate(&req) {
                let dir = volume_dir(volumes, &spec.volume_id);
                prop_assert_eq!(dir.parent(), Some(volumes));
                prop_assert_eq!(dir.file_name().and_then(|n| n.to_str()), Some(spec.volume_id.as_str()));
                prop_assert!(dir.join(DATA_DIR).starts_with(volumes));
                prop_assert!(spec.target_path.starts_with(KUBELET));
                prop_assert!(spec.target_path != Path::new(KUBELET));
                prop_assert!(spec.target_path.components().all(|c| matches!(
                    c,
                    std::path::Component::RootDir | std::path::Component::Normal(_)
                )));
                prop_assert!(!spec.target_path.as_os_str().as_encoded_bytes().contains(&0));
            }
        }
    }
}
