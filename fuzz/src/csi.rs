//! The CSI plugin's requests (`csi-driver`): NodePublishVolume's volume
//! attributes and paths, NodeUnpublishVolume and NodeGetVolumeStats, as
//! kubelet sends them. The first input byte picks the form of the input.

use std::path::{Component, Path};

use cairn_core::ingest::VolumeInfo;
use cairn_csi::csi::v1 as pb;
use cairn_csi::node::publish_request;
use cairn_csi::redact;
use cairn_csi::store::{FORMAT_VERSION, VolumeRecord};
use cairn_csi::volume::{
    AccessMode, AccessType, Capability, PublishRequest, RankSource, VolumeId, VolumeSpec,
    parse_target_path, rank_from_pod_name, volume_dir,
};
use prost::Message;

use crate::assert_short_message;

/// Kubelet's directory: every target path must be strictly under it.
const KUBELET_DIR: &str = "/var/lib/kubelet";
/// The plugin's volumes directory.
const VOLUMES_DIR: &str = "/dev/shm/cairn/volumes";
/// Put in place of every secret before a request is judged: it must appear
/// in no log line, error message or record.
const SECRET: &str = "fuzz-secret-7f3a9c";

/// Byte 0 picks: a whole NodePublishVolumeRequest (protobuf), or only its
/// volume attributes (`key=value` lines, on an otherwise valid request), or
/// a NodeUnpublishVolumeRequest, or a NodeGetVolumeStatsRequest.
pub fn csi_request(data: &[u8]) {
    let Some((&form, body)) = data.split_first() else {
        return;
    };
    match form % 4 {
        0 => {
            if let Ok(req) = pb::NodePublishVolumeRequest::decode(body) {
                publish(req);
            }
        }
        1 => {
            if let Ok(text) = std::str::from_utf8(body) {
                publish(with_attributes(text));
            }
        }
        2 => {
            if let Ok(req) = pb::NodeUnpublishVolumeRequest::decode(body) {
                volume_and_path(&req.volume_id, "target_path", &req.target_path);
            }
        }
        _ => {
            if let Ok(req) = pb::NodeGetVolumeStatsRequest::decode(body) {
                volume_and_path(&req.volume_id, "volume_path", &req.volume_path);
            }
        }
    }
}

/// A valid inline-volume publish whose volume attributes are the `key=value`
/// lines of `text`.
fn with_attributes(text: &str) -> pb::NodePublishVolumeRequest {
    use pb::volume_capability::access_mode::Mode;
    pb::NodePublishVolumeRequest {
        volume_id: "csi-4d1b0a3e".into(),
        target_path: format!(
            "{KUBELET_DIR}/pods/8a0e7c1d/volumes/kubernetes.io~csi/checkpoints/mount"
        ),
        volume_capability: Some(pb::VolumeCapability {
            access_type: Some(pb::volume_capability::AccessType::Mount(
                pb::volume_capability::MountVolume::default(),
            )),
            access_mode: Some(pb::volume_capability::AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }),
        volume_context: text
            .lines()
            .map(|line| match line.split_once('=') {
                Some((key, value)) => (key.to_owned(), value.to_owned()),
                None => (line.to_owned(), String::new()),
            })
            .collect(),
        ..Default::default()
    }
}

fn publish(mut req: pb::NodePublishVolumeRequest) {
    // Secrets: the CSI secrets, mount flags and the values of sensitive
    // attributes (service-account tokens) become SECRET, unless the input
    // already holds that text elsewhere.
    let secrets_checked = !format!("{req:?}").contains(SECRET);
    for value in req.secrets.values_mut() {
        *value = SECRET.into();
    }
    for (key, value) in req.volume_context.iter_mut() {
        if redact::is_sensitive_key(key) {
            *value = SECRET.into();
        }
    }
    if let Some(pb::volume_capability::AccessType::Mount(mount)) = req
        .volume_capability
        .as_mut()
        .and_then(|c| c.access_type.as_mut())
    {
        for flag in &mut mount.mount_flags {
            *flag = SECRET.into();
        }
    }
    let logged = format!("{:?}", redact::PublishRequest(&req));
    if secrets_checked {
        assert!(!logged.contains(SECRET), "a secret is logged: {logged}");
    }

    let converted: PublishRequest = publish_request(req);
    check_unjudged(&converted);
    match VolumeSpec::from_request(&converted, Path::new(KUBELET_DIR)) {
        Ok(spec) => check_spec(&spec, secrets_checked),
        Err(e) => {
            let message = tonic::Status::from(e).message().to_owned();
            assert_short_message("NodePublishVolume", &message);
            if secrets_checked {
                assert!(!message.contains(SECRET), "a secret is echoed: {message}");
            }
        }
    }
}

/// The wire request converted without judging: nothing is lost that a rule
/// must see.
fn check_unjudged(req: &PublishRequest) {
    if let Some(Capability {
        access_type: Some(AccessType::Mount { mount_flags, .. }),
        ..
    }) = &req.capability
    {
        assert!(mount_flags.iter().all(|f| f == SECRET));
    }
    if let Some(Capability {
        access_mode: Some(AccessMode::Unknown(mode)),
        ..
    }) = &req.capability
    {
        let known = pb::volume_capability::access_mode::Mode::try_from(*mode);
        assert!(
            matches!(
                known,
                Err(_) | Ok(pb::volume_capability::access_mode::Mode::Unknown)
            ),
            "mode {mode} is known but converted as unknown"
        );
    }
}

/// What an accepted publish guarantees (see the module doc of
/// `csi-driver/src/volume.rs`), and that the record the plugin writes is
/// read back the same, by the plugin and by the daemon's ingest.
fn check_spec(spec: &VolumeSpec, secrets_checked: bool) {
    let volumes = Path::new(VOLUMES_DIR);
    let dir = volume_dir(volumes, &spec.volume_id);
    assert_eq!(dir.parent(), Some(volumes), "volume dir {dir:?}");
    assert_eq!(
        dir.file_name().and_then(|n| n.to_str()),
        Some(spec.volume_id.as_str())
    );
    check_under_kubelet(&spec.target_path);
    assert!(matches!(
        spec.access_mode,
        AccessMode::SingleNodeWriter
            | AccessMode::SingleNodeReaderOnly
            | AccessMode::SingleNodeSingleWriter
            | AccessMode::SingleNodeMultiWriter
    ));

    let record = VolumeRecord::new(spec.clone());
    let json = record.to_json();
    if secrets_checked {
        assert!(
            !String::from_utf8_lossy(&json).contains(SECRET),
            "a secret is recorded in volume.json"
        );
    }
    let back: VolumeRecord = serde_json::from_slice(&json).expect("the plugin reads its record");
    assert_eq!(&back.spec, spec, "the record changed the spec");
    let info = VolumeInfo::decode(&json).expect("ingest reads the plugin's volume.json");
    assert_eq!(info.format, FORMAT_VERSION);
    assert_eq!(info.volume_id, spec.volume_id.as_str());
    assert_eq!(info.tenant_attribute, spec.tenant_attribute);
    assert_eq!(
        info.pod.namespace.as_ref().map(|n| n.as_str()),
        spec.pod.namespace.as_deref()
    );
    assert_eq!(info.job, spec.job);
    assert_eq!(info.rank, spec.rank);
    assert_eq!(info.commit_marker, spec.commit_marker);
    if let Some(name) = &spec.pod.name
        && spec.rank_source != RankSource::Attribute
    {
        assert_eq!(
            rank_from_pod_name(name, spec.rank_source).ok(),
            Some(spec.rank)
        );
    }
}

/// Strictly under the kubelet directory, with plain components only.
fn check_under_kubelet(path: &Path) {
    let kubelet = Path::new(KUBELET_DIR);
    assert!(path.starts_with(kubelet) && path != kubelet, "{path:?}");
    assert!(
        path.components()
            .skip(1)
            .all(|c| matches!(c, Component::Normal(_))),
        "{path:?}"
    );
}

/// NodeUnpublishVolume and NodeGetVolumeStats: the volume id and path.
fn volume_and_path(volume_id: &str, field: &str, path: &str) {
    match VolumeId::parse("volume_id", volume_id) {
        Ok(id) => {
            let dir = volume_dir(Path::new(VOLUMES_DIR), &id);
            assert_eq!(dir.parent(), Some(Path::new(VOLUMES_DIR)));
        }
        Err(e) => assert_short_message("volume_id", &e.to_string()),
    }
    match parse_target_path(field, path, Path::new(KUBELET_DIR)) {
        Ok(parsed) => check_under_kubelet(&parsed),
        Err(e) => assert_short_message(field, &e.to_string()),
    }
    for source in [RankSource::JobCompletionIndex, RankSource::PodNameOrdinal] {
        let _ = rank_from_pod_name(path, source);
    }
}
