//! Ingest of step directories that frameworks write into Cairn's CSI
//! volumes: the pure decisions, and the small documents the CSI plugin and
//! the daemon share.
//!
//! A pod writes checkpoints into `<volumes-dir>/<volume_id>/data/` (its
//! bind mount, on the memory tier's tmpfs): Orbax's `CheckpointManager`
//! writes `<step>.orbax-checkpoint-tmp-<n>/` and renames it to `<step>/`;
//! PyTorch DCP's `FileSystemWriter` writes into `step_<n>/` and renames
//! `.metadata` into it last. The daemon takes a *finished* step directory
//! into the memory tier as that pod's shard by hard-linking its files. This
//! module decides, without any I/O:
//!
//! - which directory names are temporary ([`is_temporary`]: never
//!   ingested) and which step a final name carries ([`classify_dir_name`]:
//!   the trailing integer, so `100`, `step_100` and `checkpoint-100` are all
//!   step 100);
//! - when a directory counts as finished ([`decide`]): it arrived by rename
//!   under a final name, or its commit marker ([`CommitPolicy`]) is there;
//!   a rescan after a restart (when the rename event is long gone) trusts
//!   only the marker, or, with no marker configured, any final name;
//! - what each file is called in the shard ([`stored_file_name`]):
//!   [`FileName`] refuses segments starting with `.` or `-` (DCP writes
//!   `.metadata`), so such segments are escaped reversibly and prefill
//!   turns them back ([`original_file_name`]);
//! - the name prefill gives a restored step's directory
//!   ([`StepDirFormat`], e.g. `{step}` for Orbax, `step_{step}`);
//! - the per-volume record of what was ingested or prefilled
//!   ([`IngestedSteps`], `<volumes-dir>/<volume_id>/ingested.json`), so a
//!   step is never taken twice, across daemon restarts too.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::names::{FileName, JobName, Rank, Step, TenantName};
use crate::tenancy::{TenantMap, VolumeTenantError, volume_tenant};

/// The file in a volume's directory that lists the steps already ingested
/// from it or prefilled into it.
pub const INGESTED_FILE: &str = "ingested.json";
/// The version of [`IngestedSteps`] written into every `ingested.json`.
pub const INGESTED_FORMAT: u32 = 1;
/// The file in a volume's directory that describes the volume (written by
/// the CSI plugin; [`VolumeInfo`] is what ingest reads of it).
pub const VOLUME_FILE: &str = "volume.json";
/// The memory tier's directory of committed shards (`<memory>/shards/`):
/// the only place prefill takes restored files from.
pub const MEMORY_SHARDS_DIR: &str = "shards";
/// The version of `volume.json` this module understands.
pub const VOLUME_FORMAT: u32 = 1;
/// The directory in a volume's directory that the pod sees.
pub const VOLUME_DATA_DIR: &str = "data";
/// The commit marker Orbax writes into every finished step directory, so
/// the default: it makes Orbax steps ingestible after a daemon restart too.
pub const DEFAULT_COMMIT_MARKER: &str = "commit_success.txt";
/// The [`CommitPolicy`] value meaning "no marker: the rename is the commit".
pub const NO_MARKER: &str = "none";
/// The placeholder in a [`StepDirFormat`].
pub const STEP_PLACEHOLDER: &str = "{step}";
/// The default [`StepDirFormat`]: Orbax names step directories by the bare
/// step number.
pub const DEFAULT_STEP_DIR_FORMAT: &str = "{step}";
/// Longest commit marker or step directory prefix accepted.
pub const MAX_MARKER_LEN: usize = 255;
/// Most decimal digits a step number may have in a directory name (u64).
const MAX_STEP_DIGITS: usize = 20;
/// Escape character of [`stored_file_name`].
const ESCAPE: u8 = b'_';

/// What a directory name inside a volume's `data/` says about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirName {
    /// Work in progress (or hidden): never ingested, whatever is inside.
    Temporary,
    /// A final name carrying this step.
    Step(Step),
    /// A final name without a step number: ignored (with one warning).
    NoStep,
}

/// Classifies a directory name: temporary, a step, or no step.
pub fn classify_dir_name(name: &str) -> DirName {
    if is_temporary(name) {
        return DirName::Temporary;
    }
    match trailing_step(name) {
        Some(step) => DirName::Step(step),
        None => DirName::NoStep,
    }
}

/// Whether `name` is a temporary (or hidden) name: it starts with `.`, or
/// one of its `.`/`-`/`_`-separated words is `temp` or starts with `tmp`
/// (any case). That covers Orbax's `<step>.orbax-checkpoint-tmp-<n>`,
/// `step_100.tmp`, Python's `tempfile.mkdtemp` names (`tmpk2x9...`) and
/// Cairn's own prefill directories (`.cairn-prefill-...`).
pub fn is_temporary(name: &str) -> bool {
    name.starts_with('.')
        || name.split(['.', '-', '_']).any(|word| {
            word.eq_ignore_ascii_case("temp")
                || word
                    .get(..3)
                    .is_some_and(|head| head.eq_ignore_ascii_case("tmp"))
        })
}

/// The step a name ends with: its trailing decimal digits (leading zeros
/// allowed, so `checkpoint_000100` is step 100), or `None` when it ends
/// with no digit or the number does not fit in a `u64`.
pub fn trailing_step(name: &str) -> Option<Step> {
    let head = name.trim_end_matches(|c: char| c.is_ascii_digit());
    let digits = &name[head.len()..];
    if digits.is_empty() || digits.len() > MAX_STEP_DIGITS {
        return None;
    }
    digits.parse::<u64>().ok().map(Step)
}

/// When a step directory counts as finished.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum CommitPolicy {
    /// No marker: a directory that arrives by rename under a final name is
    /// finished, and a rescan takes every final-named directory (so the
    /// writer must write under a temporary name and rename).
    Rename,
    /// A directory is finished when it holds this file at its top level
    /// (or when it arrives by rename under a final name).
    Marker(String),
}

impl Default for CommitPolicy {
    fn default() -> Self {
        CommitPolicy::Marker(DEFAULT_COMMIT_MARKER.to_owned())
    }
}

impl CommitPolicy {
    /// Parses the marker file name in `field`: empty or `none` for
    /// [`CommitPolicy::Rename`], else one file name of `[A-Za-z0-9._-]`
    /// (leading dots allowed: DCP's marker is `.metadata`), not `.` or `..`.
    pub fn parse(field: &str, value: &str) -> Result<Self, CoreError> {
        if value.is_empty() || value == NO_MARKER {
            return Ok(CommitPolicy::Rename);
        }
        let invalid = |reason| CoreError::InvalidName {
            field: field.to_owned(),
            value: value.chars().take(80).collect(),
            reason,
        };
        if value.len() > MAX_MARKER_LEN {
            return Err(invalid("too long"));
        }
        if value == "." || value == ".." {
            return Err(invalid("`.` and `..` are not allowed"));
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(invalid(
                "must be one file name of ASCII letters, digits, '.', '_' and '-' (or `none`)",
            ));
        }
        Ok(CommitPolicy::Marker(value.to_owned()))
    }

    /// The marker file name, if any.
    pub fn marker(&self) -> Option<&str> {
        match self {
            CommitPolicy::Rename => None,
            CommitPolicy::Marker(marker) => Some(marker),
        }
    }
}

impl fmt::Display for CommitPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.marker().unwrap_or(NO_MARKER))
    }
}

impl TryFrom<String> for CommitPolicy {
    type Error = CoreError;
    fn try_from(value: String) -> Result<Self, CoreError> {
        Self::parse("commit_marker", &value)
    }
}

impl From<CommitPolicy> for String {
    fn from(value: CommitPolicy) -> Self {
        value.to_string()
    }
}

/// Why a directory is being looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// It just arrived in `data/` by rename (inotify `IN_MOVED_TO`): the
    /// writer published a finished directory.
    Renamed,
    /// Something else happened (created in place, a file written into it):
    /// only its contents say whether it is finished.
    Observed,
    /// A periodic or start-up scan: no event to go by, as after a daemon
    /// restart.
    Rescan,
}

/// What to do with one directory of a volume's `data/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Ingest it as this step.
    Ingest(Step),
    /// A final name, but not finished yet: wait for the marker.
    NotFinished(Step),
    /// A temporary name: never ingested.
    Temporary,
    /// A final name without a step number: ignored.
    NoStep,
    /// This step was ingested from (or prefilled into) the volume already.
    AlreadyIngested(Step),
}

/// Decides what to do with directory `name` of a volume, given why it is
/// looked at, whether its top level holds the policy's marker, and what the
/// volume's `ingested.json` says.
///
/// A directory is finished when it arrived by rename under a final name,
/// when it holds the marker, or (with [`CommitPolicy::Rename`] only) when a
/// rescan finds it under a final name. A directory created in place under
/// its final name is never taken on an event alone: it may be half written.
pub fn decide(
    policy: &CommitPolicy,
    name: &str,
    trigger: Trigger,
    has_marker: bool,
    ingested: &IngestedSteps,
) -> Verdict {
    let step = match classify_dir_name(name) {
        DirName::Temporary => return Verdict::Temporary,
        DirName::NoStep => return Verdict::NoStep,
        DirName::Step(step) => step,
    };
    if ingested.contains(step) {
        return Verdict::AlreadyIngested(step);
    }
    let finished = match (policy, trigger) {
        (_, Trigger::Renamed) => true,
        (CommitPolicy::Marker(_), _) => has_marker,
        (CommitPolicy::Rename, Trigger::Rescan) => true,
        (CommitPolicy::Rename, Trigger::Observed) => false,
    };
    if finished {
        Verdict::Ingest(step)
    } else {
        Verdict::NotFinished(step)
    }
}

/// Whether a path segment is stored with the escape prefix: it starts with
/// `.` or `-` (which [`FileName`] refuses), or with the escape character
/// followed by one of `.`, `-`, `_` (so that the escape is reversible).
fn needs_escape(segment: &[u8]) -> bool {
    matches!(
        segment,
        [b'.' | b'-', ..] | [ESCAPE, b'.' | b'-' | b'_', ..]
    )
}

/// The name under which the file at `relative` (a `/`-separated path inside
/// a step directory) is stored in a shard.
///
/// Segments that [`FileName`] would refuse only for their first character
/// (`.metadata`) are prefixed with `_`, as are segments that already start
/// with `_` followed by `.`, `-` or `_` (`__0_0.distcp` becomes
/// `___0_0.distcp`), so every stored name maps back to exactly one original
/// ([`original_file_name`]). Everything else ([`FileName`]'s character set,
/// lengths, depth) is checked as for any client's file.
pub fn stored_file_name(relative: &str) -> Result<FileName, CoreError> {
    let escaped: Vec<String> = relative
        .split('/')
        .map(|segment| {
            // `.` and `..` stay as they are, for FileName to refuse.
            if segment != "." && segment != ".." && needs_escape(segment.as_bytes()) {
                format!("{}{segment}", ESCAPE as char)
            } else {
                segment.to_owned()
            }
        })
        .collect();
    FileName::parse("file", escaped.join("/")).map_err(|e| match e {
        CoreError::InvalidName { reason, .. } => CoreError::InvalidName {
            field: "file".into(),
            value: relative.chars().take(80).collect(),
            reason,
        },
        other => other,
    })
}

/// The original relative path of a stored file name: the inverse of
/// [`stored_file_name`]. Refuses a name whose segments would come back as
/// `.` or `..` (no stored name made by [`stored_file_name`] does), so the
/// result can be joined onto a directory safely.
pub fn original_file_name(stored: &FileName) -> Result<String, CoreError> {
    let mut out = Vec::new();
    for segment in stored.segments() {
        let original = match segment.as_bytes() {
            [ESCAPE, rest @ ..] if needs_escape(rest) => &segment[1..],
            _ => segment,
        };
        if original == "." || original == ".." {
            return Err(CoreError::InvalidName {
                field: "file".into(),
                value: stored.as_str().chars().take(80).collect(),
                reason: "its original name would be `.` or `..`",
            });
        }
        out.push(original);
    }
    Ok(out.join("/"))
}

/// How prefill names a restored step's directory: a prefix followed by the
/// step number (`{step}`, `step_{step}`, `checkpoint-{step}`).
///
/// The number must end the name, and the prefix must neither end with a
/// digit nor look temporary, so that ingest reads the very same step back
/// from the name ([`classify_dir_name`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StepDirFormat {
    prefix: String,
}

impl StepDirFormat {
    /// Parses a format in `field`: `<prefix>{step}`, the prefix of
    /// `[A-Za-z0-9._-]`, not starting with `.` or `-`, not ending with a
    /// digit, not temporary-looking.
    pub fn parse(field: &str, value: &str) -> Result<Self, CoreError> {
        let invalid = |reason: &str| CoreError::InvalidValue {
            field: field.to_owned(),
            reason: format!("{:?} {reason}", value.chars().take(80).collect::<String>()),
        };
        let Some(prefix) = value.strip_suffix(STEP_PLACEHOLDER) else {
            return Err(invalid(
                "must end with {step}: the step number must end the directory name",
            ));
        };
        if prefix.len() > MAX_MARKER_LEN - MAX_STEP_DIGITS {
            return Err(invalid("is too long"));
        }
        if !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(invalid(
                "may contain only ASCII letters, digits, '.', '_' and '-' before {step}",
            ));
        }
        if prefix.starts_with(['.', '-']) {
            return Err(invalid("must not start with '.' or '-'"));
        }
        if prefix.ends_with(|c: char| c.is_ascii_digit()) {
            return Err(invalid(
                "must not have a digit right before {step} (the step would be misread)",
            ));
        }
        let format = Self {
            prefix: prefix.to_owned(),
        };
        if is_temporary(&format.dir_name(Step(0))) {
            return Err(invalid(
                "looks like a temporary name (a `tmp` or `temp` word), which ingest skips",
            ));
        }
        Ok(format)
    }

    /// The directory name for `step`.
    pub fn dir_name(&self, step: Step) -> String {
        format!("{}{}", self.prefix, step.0)
    }
}

impl fmt::Display for StepDirFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{STEP_PLACEHOLDER}", self.prefix)
    }
}

impl TryFrom<String> for StepDirFormat {
    type Error = CoreError;
    fn try_from(value: String) -> Result<Self, CoreError> {
        Self::parse("step_dir_format", &value)
    }
}

impl From<StepDirFormat> for String {
    fn from(value: StepDirFormat) -> Self {
        value.to_string()
    }
}

/// How a step came to be listed in `ingested.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IngestSource {
    /// The daemon took it from the volume.
    Ingested,
    /// The CSI plugin restored it into the volume at publish.
    Prefilled,
}

/// One step listed in `ingested.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestedStep {
    /// The step.
    pub step: Step,
    /// The directory name in `data/` it was taken from or placed at.
    pub dir: String,
    /// Ingested or prefilled.
    pub source: IngestSource,
}

/// `<volumes-dir>/<volume_id>/ingested.json`: the steps of a volume that
/// must not be ingested (again). Written atomically by whoever adds a step:
/// the daemon after an ingest, the CSI plugin before it places a prefilled
/// step (so the daemon, seeing the directory appear, already knows it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestedSteps {
    /// [`INGESTED_FORMAT`].
    pub format: u32,
    /// The steps, in the order they were added.
    #[serde(default)]
    pub steps: Vec<IngestedStep>,
}

impl Default for IngestedSteps {
    fn default() -> Self {
        Self {
            format: INGESTED_FORMAT,
            steps: Vec::new(),
        }
    }
}

impl IngestedSteps {
    /// Whether `step` is listed.
    pub fn contains(&self, step: Step) -> bool {
        self.steps.iter().any(|s| s.step == step)
    }

    /// Whether any step was prefilled.
    pub fn has_prefilled(&self) -> bool {
        self.steps
            .iter()
            .any(|s| s.source == IngestSource::Prefilled)
    }

    /// Lists `step`; returns false (and changes nothing) if it already is.
    pub fn record(&mut self, step: Step, dir: &str, source: IngestSource) -> bool {
        if self.contains(step) {
            return false;
        }
        self.steps.push(IngestedStep {
            step,
            dir: dir.to_owned(),
            source,
        });
        true
    }

    /// Decodes `ingested.json`, refusing another format version.
    pub fn decode(bytes: &[u8]) -> Result<Self, CoreError> {
        let record: Self = serde_json::from_slice(bytes).map_err(|e| CoreError::InvalidValue {
            field: INGESTED_FILE.into(),
            reason: e.to_string(),
        })?;
        if record.format != INGESTED_FORMAT {
            return Err(CoreError::InvalidValue {
                field: INGESTED_FILE.into(),
                reason: format!(
                    "format {} is not the supported {INGESTED_FORMAT}",
                    record.format
                ),
            });
        }
        Ok(record)
    }

    /// Encodes as pretty JSON with a trailing newline.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }
}

/// What ingest needs from a volume's `volume.json` (the CSI plugin writes
/// more; unknown fields are ignored, so the plugin can add some).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct VolumeInfo {
    /// [`VOLUME_FORMAT`].
    pub format: u32,
    /// The CSI volume id (the directory's own name).
    pub volume_id: String,
    /// The pod's `tenant` attribute, if it set one: the pod's word, only
    /// ever checked against [`VolumeInfo::tenant`], never used as the
    /// tenant. (The record's `tenant` field is ignored for the same reason.)
    #[serde(default)]
    pub tenant_attribute: Option<TenantName>,
    /// The pod, as the kubelet described it.
    #[serde(default)]
    pub pod: VolumePod,
    /// The job.
    pub job: JobName,
    /// The pod's rank.
    pub rank: Rank,
    /// The volume's own commit policy; `None`: the daemon's default.
    #[serde(default)]
    pub commit_marker: Option<CommitPolicy>,
}

/// What the kubelet said about a volume's pod (CSIDriver `podInfoOnMount`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct VolumePod {
    /// The pod's namespace: decides the tenant (`crate::tenancy`).
    #[serde(default)]
    pub namespace: Option<TenantName>,
    /// The pod's name.
    #[serde(default)]
    pub name: Option<String>,
    /// The pod's UID.
    #[serde(default)]
    pub uid: Option<String>,
}

impl VolumeInfo {
    /// The tenant the volume acts for: its pod's namespace through the
    /// operator's `map` (see [`crate::tenancy`]).
    pub fn tenant(&self, map: &TenantMap) -> Result<TenantName, VolumeTenantError> {
        volume_tenant(
            map,
            self.pod.namespace.as_ref(),
            self.tenant_attribute.as_ref(),
        )
    }

    /// Decodes `volume.json`, refusing another format version.
    pub fn decode(bytes: &[u8]) -> Result<Self, CoreError> {
        let info: Self = serde_json::from_slice(bytes).map_err(|e| CoreError::InvalidValue {
            field: VOLUME_FILE.into(),
            reason: e.to_string(),
        })?;
        if info.format != VOLUME_FORMAT {
            return Err(CoreError::InvalidValue {
                field: VOLUME_FILE.into(),
                reason: format!(
                    "format {} is not the supported {VOLUME_FORMAT}",
                    info.format
                ),
            });
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn marker() -> CommitPolicy {
        CommitPolicy::default()
    }

    #[test]
    fn step_numbers_come_from_the_end_of_final_names() {
        for (name, want) in [
            ("100", DirName::Step(Step(100))),
            ("step_100", DirName::Step(Step(100))),
            ("checkpoint-100", DirName::Step(Step(100))),
            ("checkpoint_000100", DirName::Step(Step(100))),
            ("0", DirName::Step(Step(0))),
            ("epoch5", DirName::Step(Step(5))),
            ("18446744073709551615", DirName::Step(Step(u64::MAX))),
            ("18446744073709551616", DirName::NoStep),
            ("000000000000000000001", DirName::NoStep),
            ("notes", DirName::NoStep),
            ("100.final", DirName::NoStep),
            ("", DirName::NoStep),
            ("100.orbax-checkpoint-tmp-1700000000", DirName::Temporary),
            ("step_100.tmp", DirName::Temporary),
            ("tmp_100", DirName::Temporary),
            ("tmpk2x9ab3", DirName::Temporary),
            ("TMP-4", DirName::Temporary),
            ("step.temp.7", DirName::Temporary),
            (".cairn-prefill-7", DirName::Temporary),
            (".100", DirName::Temporary),
            ("temperature_100", DirName::Step(Step(100))),
        ] {
            assert_eq!(classify_dir_name(name), want, "{name:?}");
        }
    }

    #[test]
    fn commit_policies_parse_and_print() {
        assert_eq!(
            CommitPolicy::parse("m", "").expect("empty"),
            CommitPolicy::Rename
        );
        assert_eq!(
            CommitPolicy::parse("m", "none").expect("none"),
            CommitPolicy::Rename
        );
        assert_eq!(
            CommitPolicy::parse("m", ".metadata").expect("dcp"),
            CommitPolicy::Marker(".metadata".into())
        );
        assert_eq!(CommitPolicy::default().marker(), Some("commit_success.txt"));
        for bad in [".", "..", "a/b", "a b", "x\0", &"m".repeat(300)] {
            let err = CommitPolicy::parse("ingest.commit_marker", bad).expect_err(bad);
            assert!(err.to_string().contains("ingest.commit_marker"), "{err}");
        }
        for policy in [CommitPolicy::Rename, CommitPolicy::default()] {
            let json = serde_json::to_string(&policy).expect("encode");
            assert_eq!(
                serde_json::from_str::<CommitPolicy>(&json).expect("decode"),
                policy
            );
        }
    }

    #[test]
    fn finished_means_renamed_or_marked() {
        let none = IngestedSteps::default();
        let rename = CommitPolicy::Rename;
        use Trigger::*;
        use Verdict::*;
        let cases = [
            (&marker(), "5", Renamed, false, Ingest(Step(5))),
            (&marker(), "5", Observed, false, NotFinished(Step(5))),
            (&marker(), "5", Observed, true, Ingest(Step(5))),
            (&marker(), "5", Rescan, false, NotFinished(Step(5))),
            (&marker(), "5", Rescan, true, Ingest(Step(5))),
            (&rename, "5", Renamed, false, Ingest(Step(5))),
            (&rename, "5", Observed, false, NotFinished(Step(5))),
            (&rename, "5", Rescan, false, Ingest(Step(5))),
            (
                &marker(),
                "5.orbax-checkpoint-tmp-9",
                Renamed,
                true,
                Temporary,
            ),
            (&rename, "step_5.tmp", Rescan, true, Temporary),
            (&marker(), "latest", Renamed, true, NoStep),
        ];
        for (policy, name, trigger, has_marker, want) in cases {
            assert_eq!(
                decide(policy, name, trigger, has_marker, &none),
                want,
                "{policy} {name} {trigger:?} {has_marker}"
            );
        }
        let mut done = IngestedSteps::default();
        assert!(done.record(Step(5), "5", IngestSource::Ingested));
        assert!(!done.record(Step(5), "step_5", IngestSource::Prefilled));
        assert_eq!(
            decide(&marker(), "step_5", Renamed, true, &done),
            AlreadyIngested(Step(5))
        );
    }

    #[test]
    fn framework_file_names_are_stored_reversibly() {
        for (original, stored) in [
            ("commit_success.txt", "commit_success.txt"),
            ("_CHECKPOINT_METADATA", "_CHECKPOINT_METADATA"),
            (".metadata", "_.metadata"),
            ("__0_0.distcp", "___0_0.distcp"),
            (
                "default/ocdbt.process_0/d/4840b6c8",
                "default/ocdbt.process_0/d/4840b6c8",
            ),
            ("a/.hidden/-x", "a/_.hidden/_-x"),
            ("_", "_"),
            ("_.x", "__.x"),
        ] {
            let name = stored_file_name(original).expect(original);
            assert_eq!(name.as_str(), stored);
            assert_eq!(original_file_name(&name).expect("back"), original);
        }
        for bad in [
            "a b",
            "/abs",
            "a//b",
            "a/../b",
            "..",
            "x/.",
            &"y/".repeat(20),
        ] {
            let err = stored_file_name(bad).expect_err(bad);
            assert!(err.to_string().contains("file"), "{err}");
        }
        let sneaky = FileName::parse("file", "a/_../b".into()).expect("valid stored name");
        assert!(original_file_name(&sneaky).is_err());
    }

    #[test]
    fn step_dir_formats_round_trip_through_ingest() {
        for (format, step, dir) in [
            ("{step}", 7, "7"),
            ("step_{step}", 100, "step_100"),
            ("checkpoint-{step}", 3, "checkpoint-3"),
        ] {
            let f = StepDirFormat::parse("stepDirFormat", format).expect(format);
            assert_eq!(f.dir_name(Step(step)), dir);
            assert_eq!(f.to_string(), format);
            assert_eq!(classify_dir_name(dir), DirName::Step(Step(step)));
        }
        assert_eq!(
            StepDirFormat::default().to_string(),
            DEFAULT_STEP_DIR_FORMAT
        );
        for bad in [
            "",
            "step",
            "{step}_final",
            "{step}{step}",
            "v2{step}",
            ".{step}",
            "-{step}",
            "tmp_{step}",
            "a/{step}",
            "a b{step}",
        ] {
            let err = StepDirFormat::parse("stepDirFormat", bad).expect_err(bad);
            assert!(err.to_string().contains("stepDirFormat"), "{err}");
        }
    }

    #[test]
    fn ingested_steps_round_trip_and_check_their_format() {
        let mut steps = IngestedSteps::default();
        steps.record(Step(2), "2", IngestSource::Prefilled);
        assert!(steps.has_prefilled());
        let back = IngestedSteps::decode(&steps.encode()).expect("decode");
        assert_eq!(back, steps);
        assert!(IngestedSteps::decode(b"{\"format\": 2, \"steps\": []}").is_err());
        assert!(IngestedSteps::decode(b"not json").is_err());
    }

    #[test]
    fn volume_info_reads_what_the_plugin_writes() {
        let json = br#"{"format": 1, "volume_id": "csi-1", "target_path": "/x",
            "tenant": "ml", "job": "llama", "rank": 3, "restore": "latest",
            "commit_marker": ".metadata", "pod": {}}"#;
        let info = VolumeInfo::decode(json).expect("decode");
        assert_eq!(info.rank, Rank(3));
        assert_eq!(
            info.commit_marker,
            Some(CommitPolicy::Marker(".metadata".into()))
        );
        // No namespace: no tenant, whatever the record's `tenant` says.
        assert_eq!(
            info.tenant(&TenantMap::default()),
            Err(VolumeTenantError::NoNamespace)
        );
        let json = br#"{"format": 1, "volume_id": "csi-1", "tenant": "team-b",
            "tenant_attribute": "team-b", "job": "llama", "rank": 3,
            "pod": {"namespace": "team-a", "name": "p-0", "uid": "u"}}"#;
        let info = VolumeInfo::decode(json).expect("decode");
        assert!(matches!(
            info.tenant(&TenantMap::default()),
            Err(VolumeTenantError::Mismatch { .. })
        ));
        assert!(
            VolumeInfo::decode(
                br#"{"format": 1, "volume_id": "v", "tenant": "ml", "job": "../x", "rank": 0}"#
            )
            .is_err()
        );
        assert!(
            VolumeInfo::decode(
                br#"{"format": 9, "volume_id": "v", "tenant": "ml", "job": "j", "rank": 0}"#
            )
            .is_err()
        );
    }

    proptest! {
        /// Every file name a framework can write with Cairn's characters is
        /// stored as a valid FileName and comes back unchanged.
        #[test]
        fn stored_names_map_back_to_the_original(
            segments in prop::collection::vec("[A-Za-z0-9._-]{1,12}", 1..5),
        ) {
            prop_assume!(segments.iter().all(|s| s != "." && s != ".."));
            let original = segments.join("/");
            let stored = stored_file_name(&original).expect("storable");
            prop_assert_eq!(original_file_name(&stored).expect("reversible"), original);
        }

        /// Two different originals never share a stored name.
        #[test]
        fn stored_names_are_distinct(a in "[._a-z-]{1,6}", b in "[._a-z-]{1,6}") {
            prop_assume!(a != b);
            if let (Ok(x), Ok(y)) = (stored_file_name(&a), stored_file_name(&b)) {
                prop_assert_ne!(x, y);
            }
        }

        /// A temporary name is never ingested, whatever the trigger, marker
        /// or policy.
        #[test]
        fn temporary_names_are_never_ingested(
            step in any::<u64>(),
            noise in "[a-z0-9]{0,6}",
            rename in any::<bool>(),
            has_marker in any::<bool>(),
        ) {
            let policy = if rename { CommitPolicy::Rename } else { CommitPolicy::default() };
            for name in [
                format!("{step}.orbax-checkpoint-tmp-{noise}"),
                format!("step_{step}.tmp"),
                format!(".{noise}{step}"),
            ] {
                for trigger in [Trigger::Renamed, Trigger::Observed, Trigger::Rescan] {
                    prop_assert_eq!(
                        decide(&policy, &name, trigger, has_marker, &IngestedSteps::default()),
                        Verdict::Temporary
                    );
                }
            }
        }

        /// Whatever prefill names a step directory, ingest reads the same step back.
        #[test]
        fn step_dir_names_read_back(prefix in "[a-z_-]{0,10}", step in any::<u64>()) {
            let format = format!("{prefix}{STEP_PLACEHOLDER}");
            if let Ok(f) = StepDirFormat::parse("f", &format) {
                prop_assert_eq!(classify_dir_name(&f.dir_name(Step(step))), DirName::Step(Step(step)));
            }
        }
    }
}
