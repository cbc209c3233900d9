//! The CSI spec's error table and idempotency rules where csi-sanity (the
//! CSI project's conformance suite) found cairn-csi wrong, against the real
//! binary with real bind mounts:
//!
//! - NodeGetVolumeStats for a path the volume is not published at is
//!   NOT_FOUND, whatever the path looks like (csi-sanity sends `some/path`);
//!   only a missing `volume_id` or `volume_path` is INVALID_ARGUMENT.
//! - NodeUnpublishVolume for a volume that is not published at the target
//!   is OK and touches nothing there, even when another volume is.
//! - NodePublishVolume with a capability the plugin does not support is
//!   FAILED_PRECONDITION ("Exceeds capabilities" in the spec's table).

mod common;

use cairn_csi::csi::v1 as pb;
use common::{
    Plugin, assert_code, can_mount, mount_capability, mounts_at, publish_request, stats_request,
    unpublish_request,
};
use pb::volume_capability::access_mode::Mode;

#[tokio::test]
async fn stats_for_a_path_the_volume_is_not_published_at_is_not_found() {
    if !can_mount("stats_for_a_path_the_volume_is_not_published_at_is_not_found") {
        return;
    }
    let plugin = Plugin::start().await;
    let mut node = plugin.node().await;
    let id = "csi-stats-a";
    let target = plugin.target("pod-stats", "ckpt");
    node.node_publish_volume(publish_request(id, &target, 0))
        .await
        .expect("publish");

    let outside = plugin.dir.path().join("outside/mount");
    let kubelet = plugin.kubelet_dir.to_str().expect("utf-8").to_owned();
    let long = format!("/{}", "x".repeat(10 * 1024));
    let paths = [
        // What csi-sanity sends: a relative path.
        "some/path".to_owned(),
        outside.to_str().expect("utf-8").to_owned(),
        format!("{kubelet}/pods/../../outside"),
        format!("{kubelet}/pods/pod-other/volumes/kubernetes.io~csi/ckpt/mount"),
        kubelet.clone(),
        long.clone(),
    ];
    for path in &paths {
        for volume in [id, "csi-never-published"] {
            let req = pb::NodeGetVolumeStatsRequest {
                volume_id: volume.into(),
                volume_path: path.clone(),
                staging_target_path: String::new(),
            };
            let result = node.node_get_volume_stats(req).await;
            match &result {
                Err(status) if status.code() == tonic::Code::NotFound => {
                    assert!(
                        status.message().len() < 1024,
                        "a long path is echoed in full: {} bytes",
                        status.message().len()
                    );
                }
                other => panic!("{volume} at {path:.80}: expected NOT_FOUND, got {other:?}"),
            }
        }
    }

    // Missing fields stay INVALID_ARGUMENT (csi-sanity's first two specs).
    assert_code(
        node.node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: String::new(),
            volume_path: "some/path".into(),
            staging_target_path: String::new(),
        })
        .await,
        tonic::Code::InvalidArgument,
        "volume_id",
    );
    assert_code(
        node.node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: String::new(),
            staging_target_path: String::new(),
        })
        .await,
        tonic::Code::InvalidArgument,
        "volume_path",
    );

    // The right path still answers.
    node.node_get_volume_stats(stats_request(id, &target))
        .await
        .expect("stats at the published path");
    node.node_unpublish_volume(unpublish_request(id, &target))
        .await
        .expect("unpublish");
}

#[tokio::test]
async fn unpublish_of_another_volume_leaves_the_target_alone() {
    if !can_mount("unpublish_of_another_volume_leaves_the_target_alone") {
        return;
    }
    let plugin = Plugin::start().await;
    let mut node = plugin.node().await;
    let a = "csi-owner-a";
    let b = "csi-other-b";
    let target = plugin.target("pod-a", "ckpt");
    node.node_publish_volume(publish_request(a, &target, 0))
        .await
        .expect("publish A");
    std::fs::write(target.join("model.bin"), b"step 1").expect("write through A's mount");

    // B was never published: OK, and A's mount, data and record are intact.
    node.node_unpublish_volume(unpublish_request(b, &target))
        .await
        .expect("unpublish of a never-published volume is OK");
    node.node_unpublish_volume(unpublish_request(b, &target))
        .await
        .expect("and stays OK");
    assert_eq!(mounts_at(&target), 1, "A's mount was removed");
    assert_eq!(
        std::fs::read(target.join("model.bin")).expect("A's data"),
        b"step 1"
    );
    assert!(plugin.record_path(a).exists());
    assert!(plugin.volume_dir(a).join("data/model.bin").exists());
    assert!(!plugin.volume_dir(b).exists());
    node.node_get_volume_stats(stats_request(a, &target))
        .await
        .expect("A is still published");

    // B published elsewhere: unpublishing it from A's target is OK and
    // touches neither target.
    let b_target = plugin.target("pod-b", "ckpt");
    node.node_publish_volume(publish_request(b, &b_target, 1))
        .await
        .expect("publish B");
    node.node_unpublish_volume(unpublish_request(b, &target))
        .await
        .expect("unpublish of B at A's target");
    assert_eq!(mounts_at(&target), 1);
    assert_eq!(mounts_at(&b_target), 1);
    assert!(plugin.record_path(b).exists());

    // A target the plugin never mounted (the CO's own directory) stays too.
    let bare = plugin.target("pod-bare", "ckpt");
    std::fs::create_dir(&bare).expect("bare target");
    node.node_unpublish_volume(unpublish_request("csi-never-seen", &bare))
        .await
        .expect("unpublish at a bare directory");
    assert!(bare.is_dir());

    // Each volume's own unpublish still cleans up, and is idempotent.
    for (id, target) in [(a, &target), (b, &b_target)] {
        for _ in 0..2 {
            node.node_unpublish_volume(unpublish_request(id, target))
                .await
                .expect("unpublish");
        }
        assert_eq!(mounts_at(target), 0);
        assert!(!target.exists());
        assert!(!plugin.volume_dir(id).exists());
        assert!(!plugin.record_path(id).exists());
    }
}

#[tokio::test]
async fn a_stale_record_at_the_target_does_not_unmount_its_new_owner() {
    if !can_mount("a_stale_record_at_the_target_does_not_unmount_its_new_owner") {
        return;
    }
    // B is recorded at T, but its mount went away behind the plugin's back
    // and A was published at T since: unpublishing B must take off only
    // B's mounts (none), not A's.
    let plugin = Plugin::start().await;
    let mut node = plugin.node().await;
    let (a, b) = ("csi-new-owner", "csi-stale");
    let target = plugin.target("pod-t", "ckpt");
    node.node_publish_volume(publish_request(b, &target, 0))
        .await
        .expect("publish B");
    rustix::mount::unmount(&target, rustix::mount::UnmountFlags::empty()).expect("unmount B");
    node.node_publish_volume(publish_request(a, &target, 1))
        .await
        .expect("publish A at the same path");
    std::fs::write(target.join("model.bin"), b"A's step").expect("write through A's mount");

    node.node_unpublish_volume(unpublish_request(b, &target))
        .await
        .expect("unpublish B");
    assert_eq!(mounts_at(&target), 1, "A's mount was removed");
    assert_eq!(
        std::fs::read(target.join("model.bin")).expect("A's data"),
        b"A's step"
    );
    assert!(!plugin.record_path(b).exists());
    assert!(!plugin.volume_dir(b).exists());

    node.node_unpublish_volume(unpublish_request(a, &target))
        .await
        .expect("unpublish A");
    assert_eq!(mounts_at(&target), 0);
    assert!(!target.exists());
    assert!(!plugin.volume_dir(a).exists());
}

#[tokio::test]
async fn a_volume_whose_record_was_lost_is_still_unpublished() {
    if !can_mount("a_volume_whose_record_was_lost_is_still_unpublished") {
        return;
    }
    // The guard above must not leak a volume that really is mounted at the
    // target: with its record unreadable (skipped at start), the mount's
    // source still says whose it is.
    let mut plugin = Plugin::start().await;
    let id = "csi-lost-record";
    let target = plugin.target("pod-lost", "ckpt");
    plugin
        .node()
        .await
        .node_publish_volume(publish_request(id, &target, 0))
        .await
        .expect("publish");
    std::fs::write(plugin.record_path(id), b"{not json").expect("corrupt the record");
    plugin.restart().await;

    let mut node = plugin.node().await;
    node.node_unpublish_volume(unpublish_request(id, &target))
        .await
        .expect("unpublish");
    assert_eq!(mounts_at(&target), 0);
    assert!(!target.exists());
    assert!(!plugin.volume_dir(id).exists());
}

#[tokio::test]
async fn unsupported_capabilities_are_failed_precondition_and_create_nothing() {
    if !can_mount("unsupported_capabilities_are_failed_precondition_and_create_nothing") {
        return;
    }
    let plugin = Plugin::start().await;
    let mut node = plugin.node().await;
    let target = plugin.target("pod-caps", "ckpt");
    let before = plugin.listing();

    let mount_with = |edit: fn(&mut pb::volume_capability::MountVolume)| {
        let mut mount = pb::volume_capability::MountVolume::default();
        edit(&mut mount);
        pb::VolumeCapability {
            access_type: Some(pb::volume_capability::AccessType::Mount(mount)),
            access_mode: Some(pb::volume_capability::AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }
    };
    let cases = [
        (
            "block",
            pb::VolumeCapability {
                access_type: Some(pb::volume_capability::AccessType::Block(
                    pb::volume_capability::BlockVolume {},
                )),
                access_mode: Some(pb::volume_capability::AccessMode {
                    mode: Mode::SingleNodeWriter as i32,
                }),
            },
            "block",
        ),
        (
            "multi-node reader",
            mount_capability(Mode::MultiNodeReaderOnly),
            "MULTI_NODE_READER_ONLY",
        ),
        (
            "multi-node single writer",
            mount_capability(Mode::MultiNodeSingleWriter),
            "MULTI_NODE_SINGLE_WRITER",
        ),
        (
            "multi-node multi writer",
            mount_capability(Mode::MultiNodeMultiWriter),
            "MULTI_NODE_MULTI_WRITER",
        ),
        (
            "fs_type",
            mount_with(|m| m.fs_type = "ext4".into()),
            "fs_type",
        ),
        (
            "mount flags",
            mount_with(|m| m.mount_flags = vec!["noatime".into()]),
            "mount_flags",
        ),
        (
            "volume mount group",
            mount_with(|m| m.volume_mount_group = "1000".into()),
            "volume_mount_group",
        ),
    ];
    for (name, capability, mentions) in cases {
        let mut req = publish_request("csi-caps", &target, 0);
        req.volume_capability = Some(capability);
        let result = node.node_publish_volume(req).await;
        match &result {
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {}
            other => panic!("{name}: expected FAILED_PRECONDITION, got {other:?}"),
        }
        assert_code(result, tonic::Code::FailedPrecondition, mentions);
        assert_eq!(plugin.listing(), before, "{name} created something");
    }

    // A missing or unknown capability is a bad request, not an unsupported
    // one.
    for (name, capability) in [
        ("no capability", None),
        (
            "no access type",
            Some(pb::VolumeCapability {
                access_type: None,
                access_mode: Some(pb::volume_capability::AccessMode {
                    mode: Mode::SingleNodeWriter as i32,
                }),
            }),
        ),
        ("UNKNOWN mode", Some(mount_capability(Mode::Unknown))),
    ] {
        let mut req = publish_request("csi-caps", &target, 0);
        req.volume_capability = capability;
        let result = node.node_publish_volume(req).await;
        match &result {
            Err(status) if status.code() == tonic::Code::InvalidArgument => {}
            other => panic!("{name}: expected INVALID_ARGUMENT, got {other:?}"),
        }
    }
    assert_eq!(plugin.listing(), before);
}
