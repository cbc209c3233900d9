//! A CSI volume's own socket, against a real `cairnd`: the tenant comes from
//! the pod's namespace (never from what the pod asks for), and a client of
//! one volume's socket can neither read nor change another tenant's or
//! another job's checkpoints through any RPC. Volumes are laid out by hand
//! as cairn-csi lays them out (`csi-driver/tests/` runs the plugin itself).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cairn_daemon::client::Clients;
use cairn_proto::v1 as pb;
use common::{Daemon, begin_request, in_memory, save, selector, start_daemon};
use prost::Message;
use tonic::Code;

/// Lays out `<volumes>/<id>/{volume.json,data/}` as cairn-csi does, for a
/// pod in `namespace` that may have set a `tenant` attribute.
fn volume(
    daemon: &Daemon,
    id: &str,
    namespace: &str,
    job: &str,
    attribute: Option<&str>,
) -> PathBuf {
    let dir = daemon.memory_dir.join("volumes").join(id);
    std::fs::create_dir_all(dir.join("data")).expect("volume dir");
    let mut spec = serde_json::json!({
        "format": 1,
        "volume_id": id,
        "target_path": "/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/ckpt/mount",
        "tenant": attribute.unwrap_or(namespace),
        "job": job,
        "rank": 0,
        "restore": "none",
        "pod": {"namespace": namespace, "name": "train-0", "uid": "0c1d"},
    });
    if let Some(attribute) = attribute {
        spec["tenant_attribute"] = attribute.into();
    }
    std::fs::write(dir.join("volume.json"), spec.to_string()).expect("volume.json");
    dir.join("data")
}

fn socket_of(data: &Path) -> PathBuf {
    data.join(".cairn").join("cairn.sock")
}

/// A restore through a volume's socket: the files are linked into the
/// volume and named relative to it.
async fn restore_in(
    data: &Path,
    c: &mut Clients,
    job: &str,
    step: Option<u64>,
) -> Result<std::collections::HashMap<String, Vec<u8>>, tonic::Status> {
    let resp = c
        .checkpoint
        .restore_shard(pb::RestoreShardRequest {
            shard: Some(selector(job, step, 0)),
            skip_verify: false,
        })
        .await?
        .into_inner();
    Ok(resp
        .files
        .iter()
        .map(|f| {
            assert!(f.path.starts_with(".cairn/restored/"), "{}", f.path);
            let bytes = std::fs::read(data.join(&f.path)).expect("read the restored file");
            (f.name.clone(), bytes)
        })
        .collect())
}

async fn bind(c: &mut Clients, id: &str) -> Result<pb::BindVolumeResponse, tonic::Status> {
    c.admin
        .bind_volume(pb::BindVolumeRequest {
            volume_id: id.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn connect(socket: &Path) -> Clients {
    Clients::connect(socket.to_str().expect("utf-8"))
        .await
        .expect("connect to the volume's socket")
}

fn shard(tenant: &str, job: &str, step: u64, rank: u32) -> pb::ShardRef {
    pb::ShardRef {
        tenant: tenant.into(),
        job: job.into(),
        step,
        rank,
    }
}

/// Everything the host's view shows of every tenant: (tenant, job, step,
/// rank, manifest hash).
async fn everything(
    host: &mut Clients,
    tenants: &[&str],
) -> BTreeSet<(String, String, u64, u32, Vec<u8>)> {
    let mut all = BTreeSet::new();
    for tenant in tenants {
        let listed = host
            .checkpoint
            .list_steps(pb::ListStepsRequest {
                tenant: (*tenant).into(),
                job: String::new(),
                wait_for_all_tiers: true,
            })
            .await
            .expect("ListSteps")
            .into_inner();
        for job in listed.jobs {
            for step in job.steps {
                for s in step.shards {
                    let manifest = host
                        .checkpoint
                        .get_manifest(pb::GetManifestRequest {
                            shard: Some(pb::ShardSelector {
                                tenant: (*tenant).into(),
                                job: job.job.clone(),
                                step: Some(step.step),
                                rank: s.rank,
                            }),
                        })
                        .await
                        .expect("GetManifest")
                        .into_inner()
                        .manifest
                        .expect("manifest");
                    all.insert((
                        (*tenant).to_owned(),
                        job.job.clone(),
                        step.step,
                        s.rank,
                        manifest.manifest_hash,
                    ));
                }
            }
        }
    }
    all
}

/// Every method of `cairn.v1.Checkpoint` and `cairn.v1.Admin`, from the
/// compiled descriptors: a method added later without a case below fails
/// the table test.
fn client_api_methods() -> BTreeSet<String> {
    let set = prost_types::FileDescriptorSet::decode(cairn_proto::v1::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    set.file
        .iter()
        .filter(|f| f.package() == "cairn.v1")
        .flat_map(|f| &f.service)
        .filter(|s| matches!(s.name(), "Checkpoint" | "Admin"))
        .flat_map(|s| {
            s.method
                .iter()
                .map(move |m| format!("{}/{}", s.name(), m.name()))
        })
        .collect()
}

fn denied<T: std::fmt::Debug>(method: &str, result: Result<T, tonic::Status>) -> String {
    let status = result.expect_err(&format!(
        "{method} through another tenant's volume succeeded"
    ));
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "{method}: {}",
        status.message()
    );
    status.message().to_owned()
}

#[tokio::test]
async fn the_namespace_decides_the_tenant_and_the_operator_may_map_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("cairnd.toml");
    std::fs::write(&config, "[tenants]\nnamespaces = { ml-dev = \"ml\" }\n").expect("config");
    let daemon = start_daemon(&["--config", config.to_str().expect("utf-8")]).await;
    let mut host = daemon.clients().await;

    let plain = volume(&daemon, "csi-plain", "team-a", "job-a", None);
    let bound = bind(&mut host, "csi-plain").await.expect("bind");
    assert_eq!(
        (bound.tenant.as_str(), bound.job.as_str()),
        ("team-a", "job-a")
    );
    let socket = socket_of(&plain);
    assert_eq!(bound.socket_path, socket.to_str().expect("utf-8"));
    let meta = std::fs::symlink_metadata(&socket).expect("the volume's socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o666);

    volume(&daemon, "csi-mapped", "ml-dev", "job-m", Some("ml"));
    assert_eq!(
        bind(&mut host, "csi-mapped").await.expect("bind").tenant,
        "ml"
    );

    // A pod in team-a naming team-b is refused, and gets no socket.
    let attacker = volume(&daemon, "csi-liar", "team-a", "job-a", Some("team-b"));
    let status = bind(&mut host, "csi-liar")
        .await
        .expect_err("a pod chose its tenant");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("team-b") && status.message().contains("team-a"),
        "{}",
        status.message()
    );
    assert!(!socket_of(&attacker).exists());

    // A volume the kubelet did not name a namespace for has no tenant.
    let data = volume(&daemon, "csi-anon", "x", "job-a", None);
    let spec_path = data.parent().expect("volume dir").join("volume.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&spec_path).expect("read")).expect("json");
    spec.as_object_mut().expect("object").remove("pod");
    std::fs::write(&spec_path, spec.to_string()).expect("write");
    assert_eq!(
        bind(&mut host, "csi-anon")
            .await
            .expect_err("no namespace")
            .code(),
        Code::PermissionDenied
    );
    // Nor can a volume id reach outside the volumes directory.
    assert_eq!(
        bind(&mut host, "../../etc")
            .await
            .expect_err("a path")
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        bind(&mut host, "csi-missing")
            .await
            .expect_err("absent")
            .code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn a_volume_socket_acts_for_its_own_tenant_and_job_only() {
    let mut daemon = start_daemon(&[]).await;
    let mut host = daemon.clients().await;
    let a_data = volume(&daemon, "csi-a", "team-a", "job-a", None);
    let b_data = volume(&daemon, "csi-b", "team-b", "job-b", None);
    bind(&mut host, "csi-a").await.expect("bind a");
    bind(&mut host, "csi-b").await.expect("bind b");
    let mut a = connect(&socket_of(&a_data)).await;

    // team-b's checkpoint, and a save of team-b's in progress.
    let secret: &[u8] = b"team-b's weights";
    save(&mut host, shard("team-b", "job-b", 1, 0), &[("w", secret)])
        .await
        .expect("team-b saves");
    let open = host
        .checkpoint
        .begin_shard(begin_request(
            shard("team-b", "job-b", 2, 0),
            &[("w", secret)],
        ))
        .await
        .expect("team-b begins step 2")
        .into_inner();
    // And team-a's own job under team-b's name: same job name, other tenant.
    save(&mut host, shard("team-b", "job-a", 1, 0), &[("w", secret)])
        .await
        .expect("team-b's job-a");

    // team-a's pod saves through its socket without naming its tenant.
    let own: &[u8] = b"team-a's weights";
    let info = common::save_in_volume(
        &mut a,
        shard("", "job-a", 1, 0),
        &[("w", own)],
        Some(a_data.as_path()),
    )
    .await
    .expect("team-a saves through its volume");
    assert_eq!(info.shard.expect("shard").tenant, "team-a");
    let listed = a
        .checkpoint
        .list_steps(pb::ListStepsRequest::default())
        .await
        .expect("ListSteps")
        .into_inner();
    assert_eq!(
        listed
            .jobs
            .iter()
            .map(|j| j.job.as_str())
            .collect::<Vec<_>>(),
        ["job-a"],
        "a volume lists its own job only"
    );
    let files = restore_in(&a_data, &mut a, "job-a", None)
        .await
        .expect("restore own");
    assert_eq!(
        files["w"], own,
        "team-a restores its own bytes, not team-b's job-a"
    );

    let before = everything(&mut host, &["team-a", "team-b"]).await;
    let b_sel = |job: &str| pb::ShardSelector {
        tenant: "team-b".into(),
        job: job.into(),
        step: Some(1),
        rank: 0,
    };
    let mut cases: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut case =
        |method: &'static str, message: String| cases.entry(method).or_default().push(message);

    case(
        "Checkpoint/BeginShard",
        denied(
            "BeginShard",
            a.checkpoint
                .begin_shard(begin_request(shard("team-b", "job-b", 3, 0), &[("w", own)]))
                .await,
        ),
    );
    case(
        "Checkpoint/BeginShard",
        denied(
            "BeginShard (other job)",
            a.checkpoint
                .begin_shard(begin_request(shard("", "job-b", 3, 0), &[("w", own)]))
                .await,
        ),
    );
    case(
        "Checkpoint/CommitShard",
        denied(
            "CommitShard",
            a.checkpoint
                .commit_shard(pb::CommitShardRequest {
                    session_id: open.session_id.clone(),
                })
                .await,
        ),
    );
    case(
        "Checkpoint/AbortShard",
        denied(
            "AbortShard",
            a.checkpoint
                .abort_shard(pb::AbortShardRequest {
                    session_id: open.session_id.clone(),
                })
                .await,
        ),
    );
    let header = pb::WriteShardRequest {
        msg: Some(pb::write_shard_request::Msg::Header(begin_request(
            shard("team-b", "job-b", 4, 0),
            &[("w", own)],
        ))),
    };
    case(
        "Checkpoint/WriteShard",
        denied(
            "WriteShard",
            a.checkpoint.write_shard(tokio_stream::iter([header])).await,
        ),
    );
    case(
        "Checkpoint/ReadShard",
        denied(
            "ReadShard",
            a.checkpoint
                .read_shard(pb::ReadShardRequest {
                    shard: Some(b_sel("job-b")),
                })
                .await
                .map(drop),
        ),
    );
    case(
        "Checkpoint/ReadShard",
        denied(
            "ReadShard (other job)",
            a.checkpoint
                .read_shard(pb::ReadShardRequest {
                    shard: Some(selector("job-b", Some(1), 0)),
                })
                .await
                .map(drop),
        ),
    );
    case(
        "Checkpoint/ListSteps",
        denied(
            "ListSteps",
            a.checkpoint
                .list_steps(pb::ListStepsRequest {
                    tenant: "team-b".into(),
                    job: String::new(),
                    wait_for_all_tiers: true,
                })
                .await,
        ),
    );
    case(
        "Checkpoint/ListSteps",
        denied(
            "ListSteps (other job)",
            a.checkpoint
                .list_steps(pb::ListStepsRequest {
                    tenant: String::new(),
                    job: "job-b".into(),
                    wait_for_all_tiers: true,
                })
                .await,
        ),
    );
    case(
        "Checkpoint/GetManifest",
        denied(
            "GetManifest",
            a.checkpoint
                .get_manifest(pb::GetManifestRequest {
                    shard: Some(b_sel("job-b")),
                })
                .await,
        ),
    );
    case(
        "Checkpoint/RestoreShard",
        denied(
            "RestoreShard",
            a.checkpoint
                .restore_shard(pb::RestoreShardRequest {
                    shard: Some(b_sel("job-a")),
                    skip_verify: false,
                })
                .await,
        ),
    );
    case(
        "Checkpoint/DeleteStep",
        denied(
            "DeleteStep",
            a.checkpoint
                .delete_step(pb::DeleteStepRequest {
                    tenant: "team-b".into(),
                    job: "job-b".into(),
                    step: 1,
                })
                .await,
        ),
    );
    case(
        "Checkpoint/DeleteStep",
        denied(
            "DeleteStep (other job)",
            a.checkpoint
                .delete_step(pb::DeleteStepRequest {
                    tenant: String::new(),
                    job: "job-b".into(),
                    step: 1,
                })
                .await,
        ),
    );
    case(
        "Checkpoint/WaitDurable",
        denied(
            "WaitDurable",
            a.checkpoint
                .wait_durable(pb::WaitDurableRequest {
                    tenant: "team-b".into(),
                    job: "job-b".into(),
                    step: 1,
                    rank: None,
                    tier: pb::Tier::Disk as i32,
                    timeout_ms: 1000,
                })
                .await,
        ),
    );
    case(
        "Admin/Status",
        denied("Status", a.admin.status(pb::StatusRequest {}).await),
    );
    case(
        "Admin/Verify",
        denied(
            "Verify",
            a.admin
                .verify(pb::VerifyRequest {
                    tenant: "team-b".into(),
                    job: "job-b".into(),
                    step: 1,
                    tier: pb::Tier::Memory as i32,
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
    );
    case(
        "Admin/Gc",
        denied("Gc", a.admin.gc(pb::GcRequest { dry_run: false }).await),
    );
    case(
        "Admin/Prefetch",
        denied(
            "Prefetch",
            a.admin
                .prefetch(pb::PrefetchRequest {
                    shard: Some(b_sel("job-b")),
                    node: String::new(),
                })
                .await
                .map(drop),
        ),
    );
    case(
        "Admin/BindVolume",
        denied(
            "BindVolume",
            a.admin
                .bind_volume(pb::BindVolumeRequest {
                    volume_id: "csi-b".into(),
                })
                .await,
        ),
    );
    case(
        "Admin/UnbindVolume",
        denied(
            "UnbindVolume",
            a.admin
                .unbind_volume(pb::UnbindVolumeRequest {
                    volume_id: "csi-b".into(),
                })
                .await,
        ),
    );

    assert_eq!(
        cases.keys().map(|k| k.to_string()).collect::<BTreeSet<_>>(),
        client_api_methods(),
        "every client API method needs a case here"
    );
    for message in cases.values().flatten() {
        assert!(
            message.contains("csi-a"),
            "the error names the volume: {message}"
        );
    }
    assert!(
        cases["Checkpoint/ListSteps"][0].contains("\"team-b\"")
            && cases["Checkpoint/ListSteps"][0].contains("\"team-a\""),
        "the error names what was asked and what is allowed: {}",
        cases["Checkpoint/ListSteps"][0]
    );

    // Nothing changed: team-b's steps and manifests, its open session, its bytes.
    assert_eq!(everything(&mut host, &["team-a", "team-b"]).await, before);
    common::write_staged(&open, &[("w", secret)]);
    host.checkpoint
        .commit_shard(pb::CommitShardRequest {
            session_id: open.session_id,
        })
        .await
        .expect("team-b's own save still commits");
    let b_files = host
        .checkpoint
        .restore_shard(pb::RestoreShardRequest {
            shard: Some(b_sel("job-b")),
            skip_verify: false,
        })
        .await
        .expect("restore")
        .into_inner()
        .files;
    assert_eq!(std::fs::read(&b_files[0].path).expect("read"), secret);
    // The volume socket answered for the socket's volume all along, and the
    // host socket still does everything.
    assert!(host.admin.status(pb::StatusRequest {}).await.is_ok());

    // A restarted cairnd serves both volumes again.
    daemon.restart().await;
    let mut a = connect(&socket_of(&a_data)).await;
    let mut b = connect(&socket_of(&b_data)).await;
    let files = restore_in(&a_data, &mut a, "job-a", Some(1))
        .await
        .expect("a after restart");
    assert_eq!(files["w"], own);
    let files = restore_in(&b_data, &mut b, "job-b", Some(1))
        .await
        .expect("b after restart");
    assert_eq!(files["w"], secret);

    // Unbinding stops the socket and removes it; idempotently.
    let mut host = daemon.clients().await;
    let unbound = host
        .admin
        .unbind_volume(pb::UnbindVolumeRequest {
            volume_id: "csi-a".into(),
        })
        .await
        .expect("unbind")
        .into_inner();
    assert!(unbound.was_bound);
    assert!(!socket_of(&a_data).exists());
    let again = host
        .admin
        .unbind_volume(pb::UnbindVolumeRequest {
            volume_id: "csi-a".into(),
        })
        .await
        .expect("unbind again")
        .into_inner();
    assert!(!again.was_bound);
}

#[tokio::test]
async fn a_link_the_pod_planted_where_the_socket_goes_is_never_followed() {
    let daemon = start_daemon(&[]).await;
    let mut host = daemon.clients().await;
    let outside = tempfile::tempdir().expect("outside");
    let data = volume(&daemon, "csi-l", "team-a", "job-a", None);
    // The pod makes `.cairn` a link to a directory outside its volume.
    std::os::unix::fs::symlink(outside.path(), data.join(".cairn")).expect("symlink");
    bind(&mut host, "csi-l").await.expect("bind");
    assert!(
        std::fs::read_dir(outside.path())
            .expect("outside")
            .next()
            .is_none(),
        "cairnd created something through the pod's link"
    );
    let meta = std::fs::symlink_metadata(data.join(".cairn")).expect(".cairn");
    assert!(
        meta.is_dir(),
        "the link was replaced by cairnd's own directory"
    );
    assert!(socket_of(&data).exists());

    // The pod replaces the socket with a link to a host file: binding again
    // replaces the link, and the file's mode is untouched.
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"x").expect("victim");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::remove_file(socket_of(&data)).expect("remove socket");
    std::os::unix::fs::symlink(&victim, socket_of(&data)).expect("symlink socket");
    bind(&mut host, "csi-l").await.expect("bind again");
    assert_eq!(
        std::fs::metadata(&victim)
            .expect("victim")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(
        std::fs::symlink_metadata(socket_of(&data))
            .expect("socket")
            .file_type()
            .is_socket()
    );
    let mut a = connect(&socket_of(&data)).await;
    a.checkpoint
        .list_steps(pb::ListStepsRequest::default())
        .await
        .expect("the new socket serves");
}

/// A process that can write the host socket's directory unlinks the socket
/// and serves an impostor at its path: cairnd notices, says so loudly, and
/// takes the path back.
#[tokio::test]
async fn a_replaced_host_socket_is_taken_back() {
    use std::os::unix::fs::MetadataExt;

    let daemon = start_daemon(&[]).await;
    std::fs::remove_file(&daemon.socket).expect("unlink the socket");
    let impostor = std::os::unix::net::UnixListener::bind(&daemon.socket).expect("impostor");
    let impostor_inode = std::fs::metadata(&daemon.socket).expect("stat").ino();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let taken_back = std::fs::symlink_metadata(&daemon.socket)
            .is_ok_and(|m| m.file_type().is_socket() && m.ino() != impostor_inode);
        if taken_back && daemon.log_text().contains("impersonating") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cairnd did not take its socket back; log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut host = daemon.clients().await;
    host.admin
        .status(pb::StatusRequest {})
        .await
        .expect("cairnd answers on its path again");
    drop(impostor);
}

/// With memory quotas, a tenant makes room from its own steps only: team-a
/// saving past its quota evicts its own oldest step the disk holds, never
/// team-b's, and a save that can never fit the quota is refused naming the
/// tenant and the quota.
#[tokio::test]
async fn one_tenant_cannot_push_anothers_steps_out_of_memory() {
    const MIB: usize = 1 << 20;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("cairnd.toml");
    std::fs::write(
        &config,
        format!("[tenants]\nmemory_quota_bytes = {}\n", 3 * MIB),
    )
    .expect("config");
    let daemon = start_daemon(&[
        "--config",
        config.to_str().expect("utf-8"),
        "--memory-capacity",
        &(4 * MIB).to_string(),
        "--memory-keep-last",
        "10",
    ])
    .await;
    let mut host = daemon.clients().await;
    let a_data = volume(&daemon, "csi-qa", "team-a", "job", None);
    let b_data = volume(&daemon, "csi-qb", "team-b", "job", None);
    bind(&mut host, "csi-qa").await.expect("bind a");
    bind(&mut host, "csi-qb").await.expect("bind b");
    let mut a = connect(&socket_of(&a_data)).await;
    let mut b = connect(&socket_of(&b_data)).await;
    let two_mib = vec![7u8; 2 * MIB];

    common::save_in_volume(
        &mut b,
        shard("", "job", 1, 0),
        &[("w", &two_mib)],
        Some(b_data.as_path()),
    )
    .await
    .expect("team-b saves");
    for step in 1..=3 {
        common::save_in_volume(
            &mut a,
            shard("", "job", step, 0),
            &[("w", &two_mib)],
            Some(a_data.as_path()),
        )
        .await
        .unwrap_or_else(|e| panic!("team-a saves step {step}: {e}"));
        common::wait_durable(&mut a, "job", step, pb::Tier::Disk, 30_000)
            .await
            .expect("on disk");
        assert!(
            in_memory(&mut b, "job", 1).await,
            "team-a pushed team-b's step out of memory"
        );
    }
    assert!(in_memory(&mut a, "job", 3).await);
    assert!(
        !in_memory(&mut a, "job", 1).await,
        "team-a's oldest step made room"
    );

    let four_mib = vec![1u8; 4 * MIB];
    let refused = common::save_in_volume(
        &mut a,
        shard("", "job", 4, 0),
        &[("w", &four_mib)],
        Some(a_data.as_path()),
    )
    .await
    .expect_err("over the quota by itself");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("tenant team-a") && refused.message().contains("quota"),
        "{}",
        refused.message()
    );
    assert!(in_memory(&mut b, "job", 1).await);
}
