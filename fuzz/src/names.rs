//! Every name and path rule of the core: the names clients, peers and
//! configuration send (`core::names`, node ids), and the directory and file
//! names ingest reads in CSI volumes (`core::ingest`).

use std::fmt::{Debug, Display};
use std::path::{Component, Path};
use std::str::FromStr;

use cairn_core::ingest::{
    CommitPolicy, DirName, IngestedSteps, StepDirFormat, Trigger, Verdict, classify_dir_name,
    decide, is_temporary, original_file_name, stored_file_name, trailing_step,
};
use cairn_core::{Attempt, ChunkId, CoreError, FileName, JobName, NodeId, Step, TenantName};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The input, as UTF-8 (as every name arrives: protobuf strings, TOML and
/// JSON are UTF-8), through every rule; each name a rule accepts must be
/// one path segment (or, for files, segments) that stays where it is
/// joined, and must survive its text and JSON forms unchanged.
pub fn names(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(job) = JobName::parse("job", text.to_owned()) {
        check_name(&job, text);
        check_segments(text, [job.as_str()]);
    }
    if let Ok(tenant) = TenantName::parse("tenant", text.to_owned()) {
        check_name(&tenant, text);
        check_segments(text, [tenant.as_str()]);
    }
    if let Ok(attempt) = Attempt::parse("attempt", text.to_owned()) {
        check_name(&attempt, text);
        check_segments(text, [attempt.as_str()]);
    }
    if let Ok(node) = NodeId::parse("node", text.to_owned()) {
        check_name(&node, text);
        check_segments(text, [node.as_str()]);
    }
    if let Ok(file) = FileName::parse("file", text.to_owned()) {
        check_name(&file, text);
        check_segments(text, file.segments());
        // What prefill writes a stored file back as: never `.`, `..` or
        // an empty segment.
        if let Ok(original) = original_file_name(&file) {
            assert!(
                original
                    .split('/')
                    .all(|s| !s.is_empty() && s != "." && s != ".."),
                "{text:?} comes back as {original:?}"
            );
        }
    }
    if let Ok(id) = ChunkId::from_str(text) {
        assert!(id.to_hex().eq_ignore_ascii_case(text));
    }
    check_dir_name(text);
    check_stored_file_name(text);
    check_commit_policy(text);
    check_step_dir_format(text);
}

/// A validated name: its text, `Display`, `FromStr` and JSON forms agree.
fn check_name<T>(name: &T, text: &str)
where
    T: Display + Debug + FromStr<Err = CoreError> + Serialize + DeserializeOwned + PartialEq,
{
    assert_eq!(name.to_string(), text);
    assert_eq!(text.parse::<T>().as_ref().ok(), Some(name));
    let json = serde_json::to_string(name).expect("a name serialises");
    let back: T = serde_json::from_str(&json).expect("a serialised name deserialises");
    assert_eq!(&back, name);
}

/// Joining every segment onto a directory stays strictly inside it.
fn check_segments<'a>(text: &str, segments: impl IntoIterator<Item = &'a str>) {
    let base = Path::new("/base");
    let mut joined = base.to_path_buf();
    let mut depth = 0;
    for segment in segments {
        assert!(!segment.contains(['/', '\0']), "{text:?}: {segment:?}");
        joined.push(segment);
        depth += 1;
    }
    assert!(depth > 0);
    let components: Vec<Component<'_>> = joined.components().collect();
    assert_eq!(components.len(), 2 + depth, "{text:?} joins as {joined:?}");
    assert!(
        components[2..]
            .iter()
            .all(|c| matches!(c, Component::Normal(_))),
        "{text:?} joins as {joined:?}"
    );
}

/// Ingest's reading of a directory name in a volume's `data/`, and the
/// decisions taken on it.
fn check_dir_name(text: &str) {
    let class = classify_dir_name(text);
    match class {
        DirName::Temporary => assert!(is_temporary(text)),
        DirName::Step(step) => {
            assert!(!is_temporary(text));
            assert_eq!(trailing_step(text), Some(step));
            let digits = text.len() - text.trim_end_matches(|c: char| c.is_ascii_digit()).len();
            assert_eq!(
                text[text.len() - digits..].parse::<u64>().ok(),
                Some(step.0)
            );
        }
        DirName::NoStep => assert!(!is_temporary(text) && trailing_step(text).is_none()),
    }
    let mut ingested = IngestedSteps::default();
    for policy in [CommitPolicy::Rename, CommitPolicy::default()] {
        for trigger in [Trigger::Renamed, Trigger::Observed, Trigger::Rescan] {
            for has_marker in [false, true] {
                let verdict = decide(&policy, text, trigger, has_marker, &ingested);
                match (class, verdict) {
                    (DirName::Temporary, Verdict::Temporary)
                    | (DirName::NoStep, Verdict::NoStep) => {}
                    (DirName::Step(a), Verdict::Ingest(b) | Verdict::NotFinished(b)) => {
                        assert_eq!(a, b);
                    }
                    other => panic!("{text:?}: {other:?}"),
                }
            }
        }
    }
    if let DirName::Step(step) = class {
        ingested.record(step, text, cairn_core::ingest::IngestSource::Ingested);
        let verdict = decide(
            &CommitPolicy::Rename,
            text,
            Trigger::Renamed,
            true,
            &ingested,
        );
        assert_eq!(verdict, Verdict::AlreadyIngested(step));
    }
}

/// The escaping of file names ingest stores: reversible, and always a valid
/// [`FileName`].
fn check_stored_file_name(text: &str) {
    if let Ok(stored) = stored_file_name(text) {
        assert_eq!(
            original_file_name(&stored).ok().as_deref(),
            Some(text),
            "{text:?} is stored as {stored:?}, which does not map back"
        );
    }
}

/// A commit marker: reads back as itself, and names one file.
fn check_commit_policy(text: &str) {
    if let Ok(policy) = CommitPolicy::parse("commit_marker", text) {
        assert_eq!(
            CommitPolicy::parse("commit_marker", &policy.to_string()).ok(),
            Some(policy.clone())
        );
        if let Some(marker) = policy.marker() {
            assert!(!marker.contains('/') && marker != "." && marker != "..");
        }
    }
}

/// A step directory format: the names it makes are read back by ingest as
/// the very step they were made for.
fn check_step_dir_format(text: &str) {
    let Ok(format) = StepDirFormat::parse("step_dir_format", text) else {
        return;
    };
    assert_eq!(format.to_string(), text);
    for step in [0, 1, 9, 10, 4096, u64::MAX - 1, u64::MAX, text.len() as u64] {
        let name = format.dir_name(Step(step));
        assert_eq!(
            classify_dir_name(&name),
            DirName::Step(Step(step)),
            "{text:?} names step {step} {name:?}"
        );
        check_segments(text, [name.as_str()]);
    }
}
