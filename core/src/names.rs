//! Validated names for everything that arrives from outside.
//!
//! Job, tenant and file names become directory and object-key components, so
//! each is checked once, on arrival, against a strict whitelist: the rest of
//! the system can then join them into paths without re-checking. The rules
//! are deliberately narrow (ASCII letters, digits, `.`, `_`, `-`) so that a
//! name means the same thing on every filesystem and in every object store.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;

/// Longest job name accepted.
pub const MAX_JOB_LEN: usize = 128;
/// Longest tenant name accepted (a Kubernetes namespace is a DNS label).
pub const MAX_TENANT_LEN: usize = 63;
/// Longest path segment of a file name.
pub const MAX_SEGMENT_LEN: usize = 255;
/// Longest whole file name, segments and slashes included.
pub const MAX_FILE_NAME_LEN: usize = 1024;
/// Deepest nesting of a file name.
pub const MAX_FILE_DEPTH: usize = 16;
/// Longest attempt id accepted (a UUID's 32 hex digits fit twice).
pub const MAX_ATTEMPT_LEN: usize = 64;

fn invalid(field: &str, value: &str, reason: &'static str) -> CoreError {
    CoreError::InvalidName {
        field: field.to_owned(),
        value: value.chars().take(80).collect(),
        reason,
    }
}

/// Checks one path segment: non-empty, not `.` or `..`, only
/// `[A-Za-z0-9._-]`, starting with a letter, digit or underscore.
fn check_segment(field: &str, whole: &str, segment: &str, max: usize) -> Result<(), CoreError> {
    if segment.is_empty() {
        return Err(invalid(field, whole, "empty name or path segment"));
    }
    if segment.len() > max {
        return Err(invalid(field, whole, "too long"));
    }
    if segment == "." || segment == ".." {
        return Err(invalid(field, whole, "`.` and `..` are not allowed"));
    }
    if !segment
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(
            field,
            whole,
            "only ASCII letters, digits, '.', '_' and '-' are allowed",
        ));
    }
    if segment.starts_with(['.', '-']) {
        return Err(invalid(field, whole, "must not start with '.' or '-'"));
    }
    Ok(())
}

macro_rules! string_name {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The validated name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl TryFrom<String> for $name {
            type Error = CoreError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::parse(stringify!($name), value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> Self {
                value.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = CoreError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(stringify!($name), s.to_owned())
            }
        }
    };
}

string_name!(
    /// A training run's name, unique within its tenant: one directory level.
    JobName
);
string_name!(
    /// The isolation unit for chunks and checkpoints (a Kubernetes namespace,
    /// or a configured name outside Kubernetes). Chunks are deduplicated
    /// within a tenant and never across tenants, so one tenant cannot learn
    /// whether another holds some bytes.
    TenantName
);
string_name!(
    /// A file of a shard: a relative path of one or more segments joined by
    /// `/`, never absolute, never containing `.` or `..` segments.
    FileName
);

string_name!(
    /// One save of a step by one run of a job, chosen by the client and
    /// shared by every rank of that save. A step is complete only when every
    /// rank's shard carries the same attempt, so shards of an abandoned save
    /// (a crashed run) are never combined with those of the save that
    /// replaced it.
    Attempt
);

impl Attempt {
    /// Validates `value` as the attempt id in `field`: one segment of
    /// `[A-Za-z0-9._-]`, at most [`MAX_ATTEMPT_LEN`] characters.
    pub fn parse(field: &str, value: String) -> Result<Self, CoreError> {
        check_segment(field, &value, &value, MAX_ATTEMPT_LEN)?;
        Ok(Self(value))
    }
}

impl JobName {
    /// Validates `value` as the job name in `field`.
    pub fn parse(field: &str, value: String) -> Result<Self, CoreError> {
        check_segment(field, &value, &value, MAX_JOB_LEN)?;
        Ok(Self(value))
    }
}

impl TenantName {
    /// Validates `value` as a tenant name in `field`: a DNS label
    /// (lower-case letters, digits and `-`, starting and ending with a letter
    /// or digit), like a Kubernetes namespace.
    pub fn parse(field: &str, value: String) -> Result<Self, CoreError> {
        if value.is_empty() || value.len() > MAX_TENANT_LEN {
            return Err(invalid(field, &value, "must be 1 to 63 characters"));
        }
        let ok_chars = value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok_chars || value.starts_with('-') || value.ends_with('-') {
            return Err(invalid(
                field,
                &value,
                "must be a DNS label: lower-case letters, digits and '-', not at either end",
            ));
        }
        Ok(Self(value))
    }
}

impl FileName {
    /// Validates `value` as a relative file path in `field`.
    pub fn parse(field: &str, value: String) -> Result<Self, CoreError> {
        if value.len() > MAX_FILE_NAME_LEN {
            return Err(invalid(field, &value, "too long"));
        }
        if value.starts_with('/') {
            return Err(invalid(field, &value, "must be a relative path"));
        }
        for segment in value.split('/') {
            check_segment(field, &value, segment, MAX_SEGMENT_LEN)?;
        }
        if value.split('/').count() > MAX_FILE_DEPTH {
            return Err(invalid(field, &value, "nested too deeply"));
        }
        Ok(Self(value))
    }

    /// The path segments, each safe to join onto a directory.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

/// A training step. Steps order numerically (step 10 is newer than step 9),
/// never by file time or by the lexical order of their names.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Step(pub u64);

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One process's index in its job.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Rank(pub u32);

impl fmt::Display for Rank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Names one checkpoint shard: the unit that is saved, committed, made
/// durable, replicated and restored.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShardKey {
    /// Who owns it.
    pub tenant: TenantName,
    /// Which training run.
    pub job: JobName,
    /// Which step of the run.
    pub step: Step,
    /// Which rank's state.
    pub rank: Rank,
}

impl fmt::Display for ShardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/step {}/rank {}",
            self.tenant, self.job, self.step, self.rank
        )
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn file(s: &str) -> Result<FileName, CoreError> {
        FileName::parse("name", s.to_owned())
    }

    #[test]
    fn file_names_reject_escapes_and_oddities() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a/./b",
            "a//b",
            "a/",
            ".hidden",
            "-flag",
            "a\0b",
            "a b",
            "a\\b",
            "é",
            "a/..",
        ] {
            assert!(file(bad).is_err(), "{bad:?} should be rejected");
        }
        for good in ["model.safetensors", "optim/rank_0.bin", "a/b/c-d_e.f", "0"] {
            assert!(file(good).is_ok(), "{good:?} should be accepted");
        }
        assert!(file(&"a".repeat(256)).is_err());
        assert!(file(&["a"; 17].join("/")).is_err());
    }

    #[test]
    fn errors_name_the_field() {
        let err = JobName::parse("job", "../etc".into()).expect_err("must fail");
        assert!(
            err.to_string().starts_with("invalid job \"../etc\""),
            "{err}"
        );
    }

    #[test]
    fn tenant_names_are_dns_labels() {
        assert!(TenantName::parse("t", "team-a".into()).is_ok());
        for bad in ["", "Team", "-a", "a-", "a_b", &"a".repeat(64)] {
            assert!(TenantName::parse("t", bad.into()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn steps_order_numerically() {
        let mut steps = vec![Step(10), Step(9), Step(100)];
        steps.sort();
        assert_eq!(steps, vec![Step(9), Step(10), Step(100)]);
    }

    proptest! {
        /// Whatever a client sends, an accepted file name joined onto a root
        /// stays under that root.
        #[test]
        fn accepted_file_names_stay_inside_the_root(s in "[a-z./_\\-]{0,40}") {
            if let Ok(name) = file(&s) {
                let root = std::path::Path::new("/root/dir");
                let mut path = root.to_path_buf();
                for seg in name.segments() {
                    path.push(seg);
                }
                prop_assert!(path.starts_with(root));
                prop_assert!(path.components().all(|c| matches!(c, std::path::Component::Normal(_) | std::path::Component::RootDir)));
            }
        }

        #[test]
        fn arbitrary_strings_never_panic(s in any::<String>()) {
            let _ = file(&s);
            let _ = JobName::parse("job", s.clone());
            let _ = TenantName::parse("tenant", s);
        }

        #[test]
        fn valid_job_names_are_accepted(s in "[A-Za-z0-9_][A-Za-z0-9._-]{0,60}") {
            prop_assume!(s != "." && s != "..");
            prop_assert!(JobName::parse("job", s).is_ok());
        }
    }
}
