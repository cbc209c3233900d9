//! Identity, node info, the socket and shutdown, against the real binary.
//! None of this mounts anything, so these tests run without root too.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};

use cairn_csi::csi::v1 as pb;
use common::{NODE_ID, Plugin, assert_code};

#[tokio::test]
async fn identity_and_node_info_describe_a_node_only_plugin() {
    let plugin = Plugin::start().await;
    let mut identity = plugin.identity().await;
    let info = identity
        .get_plugin_info(pb::GetPluginInfoRequest {})
        .await
        .expect("plugin info")
        .into_inner();
    assert_eq!(info.name, "csi.cairn.dev");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

    let caps = identity
        .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
        .await
        .expect("capabilities")
        .into_inner();
    assert!(caps.capabilities.is_empty(), "{caps:?}");

    let probe = identity
        .probe(pb::ProbeRequest {})
        .await
        .expect("probe")
        .into_inner();
    assert_eq!(probe.ready, Some(true));

    let mut node = plugin.node().await;
    let caps = node
        .node_get_capabilities(pb::NodeGetCapabilitiesRequest {})
        .await
        .expect("node capabilities")
        .into_inner();
    let types: Vec<_> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            let pb::node_service_capability::Type::Rpc(rpc) = c.r#type.as_ref()?;
            Some(rpc.r#type())
        })
        .collect();
    assert_eq!(
        types,
        vec![pb::node_service_capability::rpc::Type::GetVolumeStats]
    );

    let info = node
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .expect("node info")
        .into_inner();
    assert_eq!(info.node_id, NODE_ID);
    assert_eq!(info.max_volumes_per_node, 0);
    assert_eq!(info.accessible_topology, None);

    assert_code(
        node.node_stage_volume(pb::NodeStageVolumeRequest::default())
            .await,
        tonic::Code::Unimplemented,
        "NodeStageVolume",
    );
    assert_code(
        node.node_unstage_volume(pb::NodeUnstageVolumeRequest::default())
            .await,
        tonic::Code::Unimplemented,
        "NodeUnstageVolume",
    );
    assert_code(
        node.node_expand_volume(pb::NodeExpandVolumeRequest::default())
            .await,
        tonic::Code::Unimplemented,
        "NodeExpandVolume",
    );
}

#[tokio::test]
async fn a_zone_becomes_topology_and_an_accessibility_capability() {
    let plugin = Plugin::start_with(&[], &[("CAIRN_ZONE", "zone-b")]).await;
    let caps = plugin
        .identity()
        .await
        .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
        .await
        .expect("capabilities")
        .into_inner();
    let services: Vec<_> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(pb::plugin_capability::Type::Service(s)) => Some(s.r#type()),
            _ => None,
        })
        .collect();
    assert_eq!(
        services,
        vec![pb::plugin_capability::service::Type::VolumeAccessibilityConstraints]
    );
    let info = plugin
        .node()
        .await
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .expect("node info")
        .into_inner();
    let topology = info.accessible_topology.expect("topology");
    assert_eq!(
        topology
            .segments
            .get("topology.cairn.dev/zone")
            .map(String::as_str),
        Some("zone-b")
    );
}

#[tokio::test]
async fn the_socket_is_private_stale_ones_are_replaced_live_ones_refused() {
    let mut plugin = Plugin::new(&[], &[]);
    // A crashed plugin leaves its socket file behind with nobody listening.
    std::fs::create_dir_all(plugin.socket.parent().expect("parent")).expect("socket dir");
    drop(std::os::unix::net::UnixListener::bind(&plugin.socket).expect("stale socket"));
    assert!(
        std::fs::symlink_metadata(&plugin.socket)
            .expect("stale file")
            .file_type()
            .is_socket()
    );
    plugin.spawn();
    plugin.wait_ready().await;
    let mode = std::fs::metadata(&plugin.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    // A second plugin on the same socket must not steal it.
    let second = plugin.command().output().expect("run a second plugin");
    assert!(!second.status.success());
    let log = plugin.log_text();
    assert!(log.contains("another process is serving"), "{log}");
    // The first one still answers.
    plugin
        .identity()
        .await
        .probe(pb::ProbeRequest {})
        .await
        .expect("first plugin still serves");

    // SIGTERM: a clean exit that removes the socket.
    assert!(plugin.stop().await, "log:\n{}", plugin.log_text());
    assert!(!plugin.socket.exists());
}

#[tokio::test]
async fn a_file_in_the_socket_path_is_never_removed() {
    let plugin = Plugin::new(&[], &[]);
    std::fs::create_dir_all(plugin.socket.parent().expect("parent")).expect("socket dir");
    std::fs::write(&plugin.socket, b"not a socket").expect("file");
    let out = plugin.command().output().expect("run");
    assert!(!out.status.success());
    assert_eq!(
        std::fs::read(&plugin.socket).expect("still there"),
        b"not a socket"
    );
    assert!(plugin.log_text().contains("is not a socket"));
}

#[tokio::test]
async fn bad_flags_exit_with_a_clear_error() {
    let plugin = Plugin::new(&["--kubelet-dir", "relative/kubelet"], &[]);
    let out = plugin.command().output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        plugin.log_text().contains("--kubelet-dir"),
        "{}",
        plugin.log_text()
    );
}
