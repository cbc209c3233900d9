//! Ingest and prefill end to end: a real `cairnd` whose memory tier holds
//! the real `cairn-csi`'s volumes, real bind mounts, and real Orbax and
//! PyTorch DCP code writing and reading checkpoints through them.
//!
//! Needs root (mounts) and the repository's `.venv` with torch, jax and
//! orbax-checkpoint (`CAIRN_PYTHON_SETUP_ONLY=1 ./scripts/test-python`).
//! Set `CAIRN_SKIP_FRAMEWORK_TESTS=1` to skip it where that cannot exist.
//! `cairnd` is `target/debug/cairnd` beside this test (`cargo test
//! --workspace` builds it), or `CAIRND_BIN`. Where the test waits for ingest
//! to have looked (and taken nothing more), it waits for ingest's walks of
//! the volumes (`cairn_ingest_scans_total`), not for a fixed time.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cairn_csi::mountinfo;
use common::daemon::{steps, wait_durable_on_disk, wait_for_steps};
use common::{Plugin, assert_code, can_mount, mounts_at, publish_request, unpublish_request};
use testkit::servers::repo_root;

const ORBAX_JOB: &str = "llama";
const DCP_JOB: &str = "llama-dcp";

/// The virtualenv's python, or `None` (after saying why) when the test
/// must skip; panics when it is missing and skipping was not asked for.
fn python(test: &str) -> Option<PathBuf> {
    if std::env::var("CAIRN_SKIP_FRAMEWORK_TESTS").as_deref() == Ok("1") {
        eprintln!("{test}: skipped (CAIRN_SKIP_FRAMEWORK_TESTS=1)");
        return None;
    }
    let python = repo_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{test}: {} is missing: run `CAIRN_PYTHON_SETUP_ONLY=1 ./scripts/test-python` to \
         install torch, jax and orbax-checkpoint (or set CAIRN_SKIP_FRAMEWORK_TESTS=1 to skip)",
        python.display()
    );
    Some(python)
}

/// Runs `tests/frameworks.py` in the virtualenv; panics with its output on
/// failure.
fn run_frameworks(python: &Path, mode: &str, orbax_dir: &Path, dcp_dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/frameworks.py");
    let output = Command::new(python)
        .arg(&script)
        .arg(mode)
        .arg(orbax_dir)
        .arg(dcp_dir)
        .env("JAX_PLATFORMS", "cpu")
        .env("TF_CPP_MIN_LOG_LEVEL", "3")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "frameworks.py {mode} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A publish of `id` for `job`'s rank 0 with extra attributes.
fn publish(
    id: &str,
    target: &Path,
    job: &str,
    attrs: &[(&str, &str)],
) -> cairn_csi::csi::v1::NodePublishVolumeRequest {
    let mut request = publish_request(id, target, 0);
    request.volume_context.insert("job".into(), job.into());
    for (key, value) in attrs {
        request
            .volume_context
            .insert((*key).into(), (*value).into());
    }
    request
}

fn ingested_steps(volume_dir: &Path) -> Vec<(u64, String, String)> {
    let bytes = std::fs::read(volume_dir.join("ingested.json")).expect("ingested.json");
    let json: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    json["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                s["step"].as_u64().expect("step"),
                s["dir"].as_str().expect("dir").to_owned(),
                s["source"].as_str().expect("source").to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn framework_checkpoints_are_ingested_and_prefilled_after_losing_the_memory_tier() {
    let test = "framework_checkpoints_are_ingested_and_prefilled_after_losing_the_memory_tier";
    if !can_mount(test) {
        return;
    }
    let Some(python) = python(test) else {
        return;
    };
    let mut plugin = Plugin::new(&[], &[]);
    let work = plugin.dir.path().join("cairnd");
    let mut daemon = common::daemon::start(&plugin.shm_dir, &work).await;
    plugin.extra_args.extend([
        "--daemon-socket".into(),
        daemon.socket.display().to_string(),
    ]);
    plugin.spawn();
    plugin.wait_ready().await;
    let mut node = plugin.node().await;

    // Nothing saved yet: `restore: latest` publishes an empty volume.
    let orbax_target = plugin.target("pod-orbax", "ckpt");
    let dcp_target = plugin.target("pod-dcp", "ckpt");
    node.node_publish_volume(publish(
        "vol-orbax",
        &orbax_target,
        ORBAX_JOB,
        &[("restore", "latest")],
    ))
    .await
    .expect("publish the Orbax volume");
    node.node_publish_volume(publish(
        "vol-dcp",
        &dcp_target,
        DCP_JOB,
        &[("restore", "latest"), ("commitMarker", ".metadata")],
    ))
    .await
    .expect("publish the DCP volume");
    let listed: Vec<_> = std::fs::read_dir(&orbax_target)
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        listed,
        [".cairn"],
        "nothing to restore yet, only the volume's socket"
    );
    assert!(
        orbax_target.join(".cairn/cairn.sock").exists(),
        "the volume's socket is there before the pod starts"
    );

    // Real frameworks save through the mounts.
    run_frameworks(&python, "save", &orbax_target, &dcp_target);
    // What must never be ingested: a step left under its temporary name
    // (even with Orbax's marker in it), a name without a step number, and
    // a step holding a symbolic link. Made after the save: Orbax would
    // take a directory named 9 for a newer step of its own and skip 1, 2.
    let temp = orbax_target.join("7.orbax-checkpoint-tmp-1700000000");
    std::fs::create_dir(&temp).expect("temp step");
    std::fs::write(temp.join("state.bin"), vec![7u8; 1000]).expect("write");
    std::fs::write(temp.join("commit_success.txt"), b"ok").expect("marker");
    let notes = orbax_target.join("notes");
    std::fs::create_dir(&notes).expect("notes");
    std::fs::write(notes.join("commit_success.txt"), b"ok").expect("marker");
    let linked = orbax_target.join("9.orbax-checkpoint-tmp-1");
    std::fs::create_dir(&linked).expect("step 9");
    std::os::unix::fs::symlink("/etc/hostname", linked.join("hostname")).expect("symlink");
    std::fs::write(linked.join("commit_success.txt"), b"ok").expect("marker");
    std::fs::rename(&linked, orbax_target.join("9")).expect("finish step 9");

    wait_for_steps(&daemon, ORBAX_JOB, &[1, 2]).await;
    wait_for_steps(&daemon, DCP_JOB, &[5]).await;
    // Two more walks of the volumes later, still nothing else.
    daemon.wait_ingest_walks(2).await;
    assert_eq!(steps(&daemon, ORBAX_JOB).await, BTreeSet::from([1, 2]));
    assert_eq!(steps(&daemon, DCP_JOB).await, BTreeSet::from([5]));
    assert_eq!(
        daemon.count_in_log("step ingested"),
        3,
        "{}",
        daemon.log_text()
    );
    assert_eq!(
        daemon.count_in_log("has no step number"),
        1,
        "{}",
        daemon.log_text()
    );
    let refused: Vec<String> = daemon
        .log_text()
        .lines()
        .filter(|l| l.contains("step directory refused"))
        .map(str::to_owned)
        .collect();
    assert_eq!(refused.len(), 1, "{}", daemon.log_text());
    assert!(refused[0].contains("symbolic link"), "{}", refused[0]);

    // Ingest copied nothing: the pod's files are hard links into the tier.
    let orbax_volume = plugin.volume_dir("vol-orbax");
    let dcp_volume = plugin.volume_dir("vol-dcp");
    for file in [
        orbax_volume.join("data/2/_CHECKPOINT_METADATA"),
        dcp_volume.join("data/step_5/.metadata"),
        dcp_volume.join("data/step_5/__0_0.distcp"),
    ] {
        assert_eq!(
            std::fs::metadata(&file).expect("stat").nlink(),
            2,
            "{}",
            file.display()
        );
    }
    assert_eq!(
        ingested_steps(&orbax_volume),
        vec![
            (1, "1".into(), "ingested".into()),
            (2, "2".into(), "ingested".into())
        ]
    );
    assert_eq!(
        ingested_steps(&dcp_volume),
        vec![(5, "step_5".into(), "ingested".into())]
    );

    // Lose the memory tier, as a node reboot would, once the disk holds
    // every step; keep the plugin's volumes (still mounted).
    for step in [1, 2] {
        wait_durable_on_disk(&daemon, ORBAX_JOB, step).await;
    }
    wait_durable_on_disk(&daemon, DCP_JOB, 5).await;
    daemon.stop().await;
    for entry in std::fs::read_dir(&plugin.shm_dir)
        .expect("memory dir")
        .flatten()
    {
        if entry.file_name() != "volumes" {
            let path = entry.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path).expect("wipe");
            } else {
                std::fs::remove_file(&path).expect("wipe");
            }
        }
    }
    daemon.restart().await;
    // The restarted daemon rescans the volumes and takes nothing twice.
    daemon.wait_ingest_walks(2).await;
    assert_eq!(
        daemon.count_in_log("step ingested"),
        3,
        "{}",
        daemon.log_text()
    );
    assert_eq!(steps(&daemon, ORBAX_JOB).await, BTreeSet::from([1, 2]));

    for (id, target) in [("vol-orbax", &orbax_target), ("vol-dcp", &dcp_target)] {
        node.node_unpublish_volume(unpublish_request(id, target))
            .await
            .expect("unpublish");
        assert_eq!(mounts_at(target), 0);
        assert!(!plugin.volume_dir(id).exists());
    }

    // New pods: their volumes are pre-filled with the newest steps, from
    // the disk tier, before publish returns.
    let orbax_target = plugin.target("pod-orbax-2", "ckpt");
    let dcp_target = plugin.target("pod-dcp-2", "ckpt");
    node.node_publish_volume(publish(
        "vol-orbax-2",
        &orbax_target,
        ORBAX_JOB,
        &[("restore", "latest")],
    ))
    .await
    .expect("publish with restore: latest");
    node.node_publish_volume(publish(
        "vol-dcp-2",
        &dcp_target,
        DCP_JOB,
        &[
            ("restore", "latest"),
            ("commitMarker", ".metadata"),
            ("stepDirFormat", "step_{step}"),
        ],
    ))
    .await
    .expect("publish with restore: latest and stepDirFormat");
    let names = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&orbax_target), vec![".cairn", "2"]);
    assert_eq!(names(&dcp_target), vec![".cairn", "step_5"]);
    let orbax_volume = plugin.volume_dir("vol-orbax-2");
    assert_eq!(
        ingested_steps(&orbax_volume),
        vec![(2, "2".into(), "prefilled".into())]
    );
    // Linked from the memory tier, not copied.
    assert!(
        std::fs::metadata(orbax_volume.join("data/2/_CHECKPOINT_METADATA"))
            .expect("stat")
            .nlink()
            >= 2
    );

    run_frameworks(&python, "restore", &orbax_target, &dcp_target);
    daemon.wait_ingest_walks(2).await;
    assert_eq!(
        daemon.count_in_log("step ingested"),
        3,
        "a prefilled step was taken back: {}",
        daemon.log_text()
    );

    for (id, target) in [("vol-orbax-2", &orbax_target), ("vol-dcp-2", &dcp_target)] {
        node.node_unpublish_volume(unpublish_request(id, target))
            .await
            .expect("unpublish");
        assert_eq!(mounts_at(target), 0);
    }

    // Without the daemon, a publish that asks for a checkpoint fails
    // UNAVAILABLE (kubelet retries) and leaves nothing behind.
    daemon.stop().await;
    let target = plugin.target("pod-3", "ckpt");
    assert_code(
        node.node_publish_volume(publish(
            "vol-3",
            &target,
            ORBAX_JOB,
            &[("restore", "latest")],
        ))
        .await,
        tonic::Code::Unavailable,
        "cairnd is not reachable",
    );
    assert_eq!(mounts_at(&target), 0);
    assert!(!plugin.volume_dir("vol-3").exists());

    let entries = mountinfo::read().expect("mountinfo");
    assert!(
        mountinfo::mounts_under(&entries, plugin.dir.path()).is_empty(),
        "mounts left behind"
    );
}
