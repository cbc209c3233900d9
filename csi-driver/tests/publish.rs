//! NodePublishVolume, NodeUnpublishVolume and NodeGetVolumeStats against the
//! real binary, with real bind mounts.

mod common;

use std::time::Duration;

use cairn_csi::csi::v1 as pb;
use cairn_csi::mountinfo;
use common::{
    Plugin, assert_code, can_mount, mount_capability, mounts_at, publish_request, stats_request,
    unpublish_request,
};
use pb::volume_capability::access_mode::Mode;
use rustix::mount::MountFlags;

#[tokio::test]
async fn publish_bind_mounts_the_volume_and_unpublish_removes_everything() {
    if !can_mount("publish_bind_mounts_the_volume_and_unpublish_removes_everything") {
        return;
    }
    let plugin = Plugin::start().await;
    let mut node = plugin.node().await;
    let id = "csi-4f1e9a";
    let target = plugin.target("pod-1", "ckpt");

    node.node_publish_volume(publish_request(id, &target, 3))
        .await
        .expect("publish");
    assert_eq!(mounts_at(&target), 1);

    // What the pod writes lands in the volume's data directory in T0.
    std::fs::create_dir(target.join("step-100")).expect("mkdir through the mount");
    std::fs::write(target.join("step-100/shard.bin"), vec![5u8; 300_000]).expect("write");
    let data = plugin.volume_dir(id).join("data");
    assert_eq!(
        std::fs::read(data.join("step-100/shard.bin")).expect("read from T0"),
        vec![5u8; 300_000]
    );

    // volume.json and the state record say whose volume it is.
    for path in [
        plugin.volume_dir(id).join("volume.json"),
        plugin.record_path(id),
    ] {
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("record")).expect("json");
        assert_eq!(record["volume_id"], id, "{path:?}");
        assert_eq!(record["job"], "llama");
        assert_eq!(record["rank"], 3);
        assert_eq!(record["tenant"], "ml");
        assert_eq!(record["restore"], "none");
        assert_eq!(record["pod"]["name"], "train-3-abcde");
    }
    let log = plugin.log_text();
    assert!(log.contains("volume published"), "{log}");

    // Same arguments again: OK, and still one mount.
    node.node_publish_volume(publish_request(id, &target, 3))
        .await
        .expect("idempotent publish");
    assert_eq!(mounts_at(&target), 1);

    // Same volume and target, other arguments: ALREADY_EXISTS.
    let mut other = publish_request(id, &target, 3);
    other
        .volume_context
        .insert("restore".into(), "latest".into());
    assert_code(
        node.node_publish_volume(other).await,
        tonic::Code::AlreadyExists,
        "restore: none -> latest",
    );
    let mut read_only = publish_request(id, &target, 3);
    read_only.readonly = true;
    assert_code(
        node.node_publish_volume(read_only).await,
        tonic::Code::AlreadyExists,
        "read_only",
    );
    // Same volume at another target: FAILED_PRECONDITION.
    let elsewhere = plugin.target("pod-2", "ckpt");
    assert_code(
        node.node_publish_volume(publish_request(id, &elsewhere, 3))
            .await,
        tonic::Code::FailedPrecondition,
        "already published",
    );
    assert!(!elsewhere.exists());

    let stats = node
        .node_get_volume_stats(stats_request(id, &target))
        .await
        .expect("stats")
        .into_inner();
    let bytes = stats
        .usage
        .iter()
        .find(|u| u.unit() == pb::volume_usage::Unit::Bytes)
        .expect("bytes usage");
    assert!(bytes.used >= 300_000, "{stats:?}");
    assert!(bytes.available > 0 && bytes.total >= bytes.used + bytes.available);
    let inodes = stats
        .usage
        .iter()
        .find(|u| u.unit() == pb::volume_usage::Unit::Inodes)
        .expect("inode usage");
    assert_eq!(
        inodes.used, 5,
        "data/, .cairn/ and its socket, step-100/, shard.bin"
    );
    assert_code(
        node.node_get_volume_stats(stats_request("csi-unknown", &target))
            .await,
        tonic::Code::NotFound,
        "not published",
    );
    assert_code(
        node.node_get_volume_stats(stats_request(id, &elsewhere))
            .await,
        tonic::Code::NotFound,
        "not at",
    );

    node.node_unpublish_volume(unpublish_request(id, &target))
        .await
        .expect("unpublish");
    assert_eq!(mounts_at(&target), 0);
    assert!(!target.exists());
    assert!(
        target.parent().expect("parent").exists(),
        "kubelet's dir stays"
    );
    assert!(!plugin.volume_dir(id).exists());
    assert!(!plugin.record_path(id).exists());
    assert!(plugin.volumes_dir.exists());

    // Idempotent.
    node.node_unpublish_volume(unpublish_request(id, &target))
        .await
        .expect("unpublish twice");
    node.node_unpublish_volume(unpublish_request("csi-never-seen", &target))
        .await
        .expect("unpublish of an unknown volume");
    assert_code(
        node.node_get_volume_stats(stats_request(id, &target)).await,
        tonic::Code::NotFound,
        "not published",
    );
}

#[tokio::test]
async fn a_read_only_publish_refuses_writes() {
    if !can_mount("a_read_only_publish_refuses_writes") {
        return;
    }
    // The volumes directory on a tmpfs of its own mounted nosuid, nodev,
    // noexec (like /dev/shm on most nodes): the read-only remount must keep
    // those flags, not just add `ro`.
    let mut plugin = Plugin::new(&[], &[]);
    std::fs::create_dir_all(&plugin.volumes_dir).expect("volumes dir");
    rustix::mount::mount(
        "tmpfs",
        &plugin.volumes_dir,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        c"size=16m",
    )
    .expect("mount a tmpfs for the volumes");
    plugin.start_daemon().await;
    plugin.spawn();
    plugin.wait_ready().await;
    let mut node = plugin.node().await;
    let id = "csi-ro";
    let target = plugin.target("pod-ro", "ckpt");
    let mut req = publish_request(id, &target, 0);
    req.readonly = true;
    node.node_publish_volume(req.clone())
        .await
        .expect("publish");
    assert_eq!(mounts_at(&target), 1);

    // The pod can read what is in the volume, but not write.
    std::fs::write(plugin.volume_dir(id).join("data/restored.bin"), b"step 7")
        .expect("write into T0");
    assert_eq!(
        std::fs::read(target.join("restored.bin")).expect("read through the mount"),
        b"step 7"
    );
    let err = std::fs::write(target.join("new.bin"), b"x").expect_err("read-only");
    assert_eq!(err.raw_os_error(), Some(30), "EROFS expected, got {err:?}");
    let entries = mountinfo::read().expect("mountinfo");
    let mount = mountinfo::mounts_at(&entries, &target)
        .pop()
        .expect("target mount");
    let options: Vec<&str> = mount.options.split(',').collect();
    for flag in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(options.contains(&flag), "{flag} missing from {options:?}");
    }
    // The volume's own directory stays writable for the daemon.
    assert!(
        !mountinfo::mounts_at(&entries, &plugin.volumes_dir)
            .pop()
            .expect("volumes tmpfs")
            .is_read_only()
    );

    // SINGLE_NODE_READER_ONLY is read-only too, and is a different argument.
    req.volume_capability = Some(mount_capability(Mode::SingleNodeReaderOnly));
    assert_code(
        node.node_publish_volume(req).await,
        tonic::Code::AlreadyExists,
        "access_mode",
    );

    node.node_unpublish_volume(unpublish_request(id, &target))
        .await
        .expect("unpublish");
    assert_eq!(mounts_at(&target), 0);
    assert!(!plugin.volume_dir(id).exists());
}

#[tokio::test]
async fn bad_requests_are_invalid_arguments_and_create_nothing() {
    if !can_mount("bad_requests_are_invalid_arguments_and_create_nothing") {
        return;
    }
    let plugin = Plugin::start().await;
    let mut node = plugin.node().await;
    let target = plugin.target("pod-bad", "ckpt");
    let outside = plugin.dir.path().join("outside/mount");
    let huge = "x".repeat(10 * 1024);
    let before = plugin.listing();

    type Edit = Box<dyn Fn(&mut pb::NodePublishVolumeRequest)>;
    let attr = |key: &'static str, value: Option<String>| -> Edit {
        Box::new(move |r: &mut pb::NodePublishVolumeRequest| match &value {
            Some(v) => {
                r.volume_context.insert(key.into(), v.clone());
            }
            None => {
                r.volume_context.remove(key);
            }
        })
    };
    let target_text = target.to_str().expect("utf-8").to_owned();
    let kubelet_text = plugin.kubelet_dir.to_str().expect("utf-8").to_owned();
    let outside_text = outside.to_str().expect("utf-8").to_owned();
    let huge2 = huge.clone();
    let huge3 = huge.clone();
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "dot-dot id",
            Box::new(|r| r.volume_id = "..".into()),
            "volume_id",
        ),
        (
            "escaping id",
            Box::new(|r| r.volume_id = "../../escape".into()),
            "volume_id",
        ),
        (
            "absolute id",
            Box::new(|r| r.volume_id = "/tmp/escape".into()),
            "volume_id",
        ),
        (
            "empty id",
            Box::new(|r| r.volume_id.clear()),
            "volume_id is required",
        ),
        (
            "10 KB id",
            Box::new(move |r| r.volume_id = huge.clone()),
            "volume_id",
        ),
        (
            "NUL in id",
            Box::new(|r| r.volume_id = "csi-a\0b".into()),
            "NUL",
        ),
        (
            "target outside the kubelet dir",
            Box::new(move |r| r.target_path = outside_text.clone()),
            "strictly under",
        ),
        (
            "target with ..",
            Box::new(move |r| r.target_path = format!("{kubelet_text}/pods/../../outside/mount")),
            "normalised",
        ),
        (
            "NUL in target",
            Box::new(move |r| r.target_path = format!("{target_text}\0x")),
            "NUL",
        ),
        (
            "10 KB target",
            Box::new(move |r| r.target_path = format!("/{huge2}")),
            "target_path",
        ),
        ("missing job", attr("job", None), "job is required"),
        ("bad job", attr("job", Some("../job".into())), "job"),
        (
            "bad rank",
            attr("rankFrom", Some("hostname".into())),
            "rankFrom",
        ),
        (
            "negative rank",
            Box::new(|r| {
                r.volume_context.remove("rankFrom");
                r.volume_context.insert("rank".into(), "-1".into());
            }),
            "rank",
        ),
        (
            "non-ephemeral",
            attr("csi.storage.k8s.io/ephemeral", None),
            "only ephemeral inline volumes",
        ),
        (
            "unknown attribute",
            attr("jobName", Some("llama".into())),
            "unknown attribute \"jobName\"",
        ),
        (
            "10 KB attribute",
            Box::new(move |r| {
                r.volume_context.insert("job".into(), huge3.clone());
            }),
            "at most 4096",
        ),
        (
            "NUL in an attribute",
            attr("tenant", Some("te\0am".into())),
            "NUL",
        ),
        (
            "bad restore",
            attr("restore", Some("newest".into())),
            "restore",
        ),
        (
            "no capability",
            Box::new(|r| r.volume_capability = None),
            "volume_capability is required",
        ),
        (
            "staging path",
            Box::new(|r| r.staging_target_path = "/var/lib/kubelet/plugins/x".into()),
            "staging_target_path",
        ),
    ];
    for (name, edit, mentions) in cases {
        let mut req = publish_request("csi-bad", &target, 1);
        edit(&mut req);
        let result = node.node_publish_volume(req).await;
        match &result {
            Err(status) if status.code() == tonic::Code::InvalidArgument => {}
            other => panic!("{name}: expected INVALID_ARGUMENT, got {other:?}"),
        }
        assert_code(result, tonic::Code::InvalidArgument, mentions);
        assert_eq!(plugin.listing(), before, "{name} created something");
    }

    // Unpublish validates the same way. Stats refuses a bad volume id; a
    // path the volume is not published at is NOT_FOUND whatever its form
    // (tests/conformance.rs).
    for (id, path) in [
        ("..", target.clone()),
        ("csi-bad", outside.clone()),
        ("csi-bad", plugin.kubelet_dir.join("pods/../../outside")),
    ] {
        assert_code(
            node.node_unpublish_volume(unpublish_request(id, &path))
                .await,
            tonic::Code::InvalidArgument,
            "",
        );
    }
    assert_code(
        node.node_get_volume_stats(stats_request("..", &target))
            .await,
        tonic::Code::InvalidArgument,
        "volume_id",
    );
    assert_eq!(plugin.listing(), before);
    let log = plugin.log_text();
    assert!(log.contains("request refused"), "{log}");
    assert!(
        !log.contains(&"x".repeat(1000)),
        "10 KB value logged in full"
    );
}

#[tokio::test]
async fn a_symlink_under_the_kubelet_dir_cannot_redirect_the_mount() {
    if !can_mount("a_symlink_under_the_kubelet_dir_cannot_redirect_the_mount") {
        return;
    }
    let plugin = Plugin::start().await;
    let mut node = plugin.node().await;
    let elsewhere = plugin.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("elsewhere");
    let pod = plugin.kubelet_dir.join("pods/pod-link");
    std::fs::create_dir_all(pod.parent().expect("pods")).expect("pods");
    std::os::unix::fs::symlink(&elsewhere, &pod).expect("symlink");
    let target = pod.join("volumes/kubernetes.io~csi/ckpt/mount");
    assert_code(
        node.node_publish_volume(publish_request("csi-link", &target, 0))
            .await,
        tonic::Code::FailedPrecondition,
        "symbolic link",
    );
    assert!(
        std::fs::read_dir(&elsewhere)
            .expect("list")
            .next()
            .is_none()
    );
    assert!(!plugin.volume_dir("csi-link").exists());
    assert_code(
        node.node_unpublish_volume(unpublish_request("csi-link", &target))
            .await,
        tonic::Code::FailedPrecondition,
        "symbolic link",
    );
}

#[tokio::test]
async fn published_volumes_survive_a_plugin_restart() {
    if !can_mount("published_volumes_survive_a_plugin_restart") {
        return;
    }
    let mut plugin = Plugin::start().await;
    let id = "csi-restart";
    let target = plugin.target("pod-r", "ckpt");
    plugin
        .node()
        .await
        .node_publish_volume(publish_request(id, &target, 5))
        .await
        .expect("publish");
    std::fs::write(target.join("model.bin"), vec![1u8; 100_000]).expect("write");

    plugin.restart().await;
    assert!(
        plugin.log_text().contains("recovered a published volume"),
        "{}",
        plugin.log_text()
    );
    let mut node = plugin.node().await;
    let stats = node
        .node_get_volume_stats(stats_request(id, &target))
        .await
        .expect("stats after restart")
        .into_inner();
    assert!(stats.usage[0].used >= 100_000, "{stats:?}");
    node.node_publish_volume(publish_request(id, &target, 5))
        .await
        .expect("republish after restart");
    assert_eq!(mounts_at(&target), 1);

    // A target unmounted behind the plugin's back is reported and kept.
    rustix::mount::unmount(&target, rustix::mount::UnmountFlags::empty()).expect("unmount");
    plugin.restart().await;
    assert!(
        plugin.log_text().contains("target is not a mount point"),
        "{}",
        plugin.log_text()
    );
    let mut node = plugin.node().await;
    node.node_get_volume_stats(stats_request(id, &target))
        .await
        .expect("stats for a kept record");
    // Publishing again mounts it again, with the data still there.
    node.node_publish_volume(publish_request(id, &target, 5))
        .await
        .expect("republish remounts");
    assert_eq!(mounts_at(&target), 1);
    assert_eq!(
        std::fs::read(target.join("model.bin"))
            .expect("data kept")
            .len(),
        100_000
    );

    node.node_unpublish_volume(unpublish_request(id, &target))
        .await
        .expect("unpublish after restart");
    assert_eq!(mounts_at(&target), 0);
    assert!(!target.exists());
    assert!(!plugin.volume_dir(id).exists());
    assert!(!plugin.record_path(id).exists());
}

#[tokio::test]
async fn concurrent_calls_on_one_volume_are_aborted_others_proceed() {
    if !can_mount("concurrent_calls_on_one_volume_are_aborted_others_proceed") {
        return;
    }
    // The test hook holds every publish for 3 s once it owns its volume.
    let plugin = Plugin::start_with(&[], &[("FAILPOINTS", "csi.publish.start=sleep(3000)")]).await;
    let id = "csi-busy";
    let target = plugin.target("pod-c", "ckpt");
    let other_target = plugin.target("pod-d", "ckpt");

    let mut first = plugin.node().await;
    let req = publish_request(id, &target, 0);
    let slow = tokio::spawn(async move { first.node_publish_volume(req).await });
    // The plugin claims the volume right after logging the request; wait
    // for that line instead of guessing how long it takes.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !plugin
        .log_text()
        .lines()
        .any(|l| l.contains("publish requested") && l.contains(id))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            plugin.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut node = plugin.node().await;
    assert_code(
        node.node_publish_volume(publish_request(id, &target, 0))
            .await,
        tonic::Code::Aborted,
        "in progress",
    );
    assert_code(
        node.node_unpublish_volume(unpublish_request(id, &target))
            .await,
        tonic::Code::Aborted,
        "in progress",
    );
    assert!(
        !slow.is_finished(),
        "the first publish should still be held"
    );
    // Another volume is not refused (no global lock): the same hook holds
    // it too, but it goes through.
    node.node_publish_volume(publish_request("csi-other", &other_target, 1))
        .await
        .expect("another volume proceeds");

    slow.await
        .expect("join")
        .expect("the first publish succeeds");
    assert_eq!(mounts_at(&target), 1);
    assert_eq!(mounts_at(&other_target), 1);
    for (id, target) in [(id, &target), ("csi-other", &other_target)] {
        node.node_unpublish_volume(unpublish_request(id, target))
            .await
            .expect("unpublish");
        assert_eq!(mounts_at(target), 0);
    }
}

/// A pod cannot choose its tenant: a `tenant` attribute naming another
/// tenant than the pod's namespace is PERMISSION_DENIED at publish, and
/// nothing is left behind; one naming its own is accepted.
#[tokio::test]
async fn a_pod_naming_another_tenant_is_refused_at_publish() {
    if !can_mount("a_pod_naming_another_tenant_is_refused_at_publish") {
        return;
    }
    let plugin = Plugin::start().await;
    let mut node = plugin.node().await;
    let target = plugin.target("pod-liar", "ckpt");
    let before = plugin.listing();
    let mut req = publish_request("csi-liar", &target, 0);
    req.volume_context.insert("tenant".into(), "team-b".into());
    assert_code(
        node.node_publish_volume(req).await,
        tonic::Code::PermissionDenied,
        "\"team-b\"",
    );
    assert_eq!(mounts_at(&target), 0);
    assert!(!plugin.volume_dir("csi-liar").exists());
    assert_eq!(plugin.listing(), before, "a refused publish left something");

    let mut req = publish_request("csi-honest", &target, 0);
    req.volume_context.insert("tenant".into(), "ml".into());
    node.node_publish_volume(req)
        .await
        .expect("a tenant attribute naming the pod's own namespace");
    assert!(
        plugin
            .volume_dir("csi-honest")
            .join("data/.cairn/cairn.sock")
            .exists()
    );
    node.node_unpublish_volume(unpublish_request("csi-honest", &target))
        .await
        .expect("unpublish");
}
