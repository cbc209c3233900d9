//! Log-safe views of CSI requests.
//!
//! The CSI spec marks `secrets` (and mount flags) as sensitive, and kubelet
//! puts service-account tokens into `volume_context` under
//! `csi.storage.k8s.io/serviceAccount.tokens` when the CSIDriver asks for
//! them. Requests are therefore never logged with `{:?}` on the prost type:
//! every log line goes through these views, which print secrets as a count
//! and sensitive attribute values as [`REDACTED`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::csi::v1 as pb;
use crate::volume::attr;

/// What a sensitive value is printed as.
pub const REDACTED: &str = "<redacted>";

/// Whether an attribute's value must not be logged: the service-account
/// tokens, and (defensively) any key that names a secret.
pub fn is_sensitive_key(key: &str) -> bool {
    if key == attr::SERVICE_ACCOUNT_TOKENS {
        return true;
    }
    let key = key.to_ascii_lowercase();
    ["token", "secret", "password", "credential", "private"]
        .iter()
        .any(|word| key.contains(word))
}

/// Longest key or value printed; longer ones are cut (a request with a
/// 10 KB attribute is refused, and its log line should stay readable).
pub const MAX_LOGGED_LEN: usize = 256;

/// `map` with every sensitive value replaced by [`REDACTED`], sorted by key,
/// long keys and values cut to [`MAX_LOGGED_LEN`] bytes.
pub fn map(map: &HashMap<String, String>) -> BTreeMap<&str, &str> {
    map.iter()
        .map(|(k, v)| {
            let shown = if is_sensitive_key(k) {
                REDACTED
            } else {
                short(v)
            };
            (short(k), shown)
        })
        .collect()
}

/// `value` cut to at most [`MAX_LOGGED_LEN`] bytes at a character boundary.
pub fn short(value: &str) -> &str {
    let mut end = value.len().min(MAX_LOGGED_LEN);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

/// A NodePublishVolumeRequest as it may be logged.
pub struct PublishRequest<'a>(pub &'a pb::NodePublishVolumeRequest);

impl fmt::Debug for PublishRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        f.debug_struct("NodePublishVolumeRequest")
            .field("volume_id", &short(&r.volume_id))
            .field("target_path", &short(&r.target_path))
            .field("staging_target_path", &short(&r.staging_target_path))
            .field(
                "volume_capability",
                &r.volume_capability.as_ref().map(Capability),
            )
            .field("readonly", &r.readonly)
            .field("publish_context", &map(&r.publish_context))
            .field("volume_context", &map(&r.volume_context))
            .field("secrets", &format_args!("<{} redacted>", r.secrets.len()))
            .finish()
    }
}

/// A VolumeCapability as it may be logged: mount flags as a count.
pub struct Capability<'a>(pub &'a pb::VolumeCapability);

impl fmt::Debug for Capability<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use pb::volume_capability::AccessType;
        let mut s = f.debug_struct("VolumeCapability");
        match &self.0.access_type {
            Some(AccessType::Block(_)) => s.field("access_type", &"block"),
            Some(AccessType::Mount(m)) => s
                .field("access_type", &"mount")
                .field("fs_type", &short(&m.fs_type))
                .field(
                    "mount_flags",
                    &format_args!("<{} redacted>", m.mount_flags.len()),
                )
                .field("volume_mount_group", &short(&m.volume_mount_group)),
            None => s.field("access_type", &"unset"),
        };
        let mode = self.0.access_mode.as_ref().map(|m| {
            pb::volume_capability::access_mode::Mode::try_from(m.mode)
                .map(|mode| mode.as_str_name().to_owned())
                .unwrap_or_else(|_| m.mode.to_string())
        });
        s.field("access_mode", &mode).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_secrets_and_mount_flags_never_reach_the_log() {
        let req = pb::NodePublishVolumeRequest {
            volume_id: "csi-abc".into(),
            target_path: "/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/v/mount".into(),
            volume_capability: Some(pb::VolumeCapability {
                access_type: Some(pb::volume_capability::AccessType::Mount(
                    pb::volume_capability::MountVolume {
                        fs_type: String::new(),
                        mount_flags: vec!["password=mount-flag-secret".into()],
                        volume_mount_group: String::new(),
                    },
                )),
                access_mode: Some(pb::volume_capability::AccessMode { mode: 1 }),
            }),
            secrets: HashMap::from([("key".into(), "secret-map-value".into())]),
            volume_context: HashMap::from([
                (
                    attr::SERVICE_ACCOUNT_TOKENS.into(),
                    r#"{"aud":{"token":"jwt-value"}}"#.into(),
                ),
                ("api-token".into(), "other-token-value".into()),
                (attr::JOB.into(), "llama".into()),
            ]),
            ..Default::default()
        };
        let logged = format!("{:?}", PublishRequest(&req));
        for secret in [
            "jwt-value",
            "other-token-value",
            "secret-map-value",
            "mount-flag-secret",
        ] {
            assert!(!logged.contains(secret), "{secret} leaked: {logged}");
        }
        for shown in [
            "csi-abc",
            "llama",
            REDACTED,
            "SINGLE_NODE_WRITER",
            "<1 redacted>",
        ] {
            assert!(logged.contains(shown), "{shown} missing: {logged}");
        }
    }

    #[test]
    fn long_values_are_cut() {
        let long = HashMap::from([("job".to_string(), "é".repeat(5000))]);
        let shown = map(&long);
        assert!(shown["job"].len() <= MAX_LOGGED_LEN);
    }

    #[test]
    fn only_sensitive_keys_are_redacted() {
        assert!(is_sensitive_key(attr::SERVICE_ACCOUNT_TOKENS));
        assert!(is_sensitive_key("S3_SECRET_KEY"));
        assert!(!is_sensitive_key(attr::POD_NAME));
        assert!(!is_sensitive_key(attr::JOB));
    }
}
