//! Ingest of step directories from CSI volumes, against a real `cairnd`:
//! the volumes are laid out by hand here, as the CSI plugin lays them out
//! (`csi-driver/tests/ingest.rs` runs the plugin, real mounts and real
//! frameworks), so this test needs neither root nor Python.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_daemon::client::Clients;
use common::{
    Daemon, bytes, in_memory, job_steps, restore, save, shard, start_daemon, start_daemon_with_env,
    wait_disk, wait_until,
};

/// Lays out `<volumes>/<id>/{volume.json,data/}` as cairn-csi does.
fn volume(daemon: &Daemon, id: &str, job: &str, commit_marker: Option<&str>) -> PathBuf {
    let dir = daemon.memory_dir.join("volumes").join(id);
    std::fs::create_dir_all(dir.join("data")).expect("volume dir");
    let mut spec = serde_json::json!({
        "format": 1,
        "volume_id": id,
        "target_path": "/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/ckpt/mount",
        "tenant": "default",
        "job": job,
        "rank": 0,
        "restore": "none",
        "pod": {"namespace": "default"},
    });
    if let Some(marker) = commit_marker {
        spec["commit_marker"] = marker.into();
    }
    std::fs::write(dir.join("volume.json"), spec.to_string()).expect("volume.json");
    dir.join("data")
}

async fn steps(c: &mut Clients, job: &str) -> BTreeSet<u64> {
    job_steps(c, job).await.iter().map(|s| s.step).collect()
}

async fn wait_for_step(c: &mut Clients, job: &str, step: u64) {
    wait_until(
        Duration::from_secs(30),
        &format!("{job} step {step} is ingested"),
        async || steps(c, job).await.contains(&step),
    )
    .await;
}

fn write_step(dir: &Path, files: &[(&str, &[u8])]) {
    for (name, data) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, data).expect("write");
    }
}

#[tokio::test]
async fn finished_step_directories_are_ingested_once_and_never_recycled() {
    let config = tempfile::tempdir().expect("config dir");
    let config_file = config.path().join("cairnd.toml");
    std::fs::write(&config_file, "[ingest]\nrescan_secs = 1\n").expect("config");
    let mut daemon = start_daemon(&[
        "--config",
        config_file.to_str().expect("utf-8"),
        "--memory-keep-last",
        "1",
    ])
    .await;
    let mut c = daemon.clients().await;
    // The volumes directory appears after cairnd started (the plugin
    // creates it): ingest picks it up at the next rescan.
    let data = volume(&daemon, "vol-a", "job-a", None);
    let rename_data = volume(&daemon, "vol-r", "job-r", Some("none"));

    // Written under a temporary name, then renamed into place: ingested.
    let model = bytes(1, 300_000);
    let optimizer = bytes(2, 100_000);
    let temp = data.join("step_10.tmp");
    write_step(
        &temp,
        &[
            ("model.bin", &model),
            ("sub/.optimizer", &optimizer),
            ("commit_success.txt", b"ok"),
        ],
    );
    // Ingest walks past it under its temporary name first.
    daemon.wait_ingest_walks(2).await;
    std::fs::rename(&temp, data.join("step_10")).expect("rename");
    wait_for_step(&mut c, "job-a", 10).await;

    // Its files come back with the names the framework wrote.
    let (response, files) = restore(&mut c, "job-a", Some(10), 0)
        .await
        .expect("restore step 10");
    assert_eq!(files["model.bin"], model);
    assert_eq!(files["sub/_.optimizer"], optimizer);
    let metadata = &response.manifest.expect("manifest").metadata;
    assert_eq!(metadata["cairn.ingest.dir"], "step_10");
    assert_eq!(metadata["cairn.ingest.volume_id"], "vol-a");
    wait_disk(&mut c, "job-a", 10).await;

    // A restart forgets which files a reader was given; the link count
    // still keeps the pod's files out of the page pool.
    daemon.restart().await;
    let mut c = daemon.clients().await;

    // Created in place under its final name: taken only once the marker is
    // written.
    let step_20 = data.join("step_20");
    write_step(&step_20, &[("model.bin", &bytes(3, 300_000))]);
    daemon.wait_ingest_walks(2).await;
    assert!(!steps(&mut c, "job-a").await.contains(&20));
    write_step(&step_20, &[("commit_success.txt", b"ok")]);
    wait_for_step(&mut c, "job-a", 20).await;

    // Memory keeps one step: step 10 leaves the memory tier once step 20
    // is on disk. A save of the same size then reuses pooled files; the
    // pod's copy of step 10 must be untouched.
    wait_disk(&mut c, "job-a", 20).await;
    wait_until(Duration::from_secs(30), "step 10 left memory", async || {
        !in_memory(&mut c, "job-a", 10).await
    })
    .await;
    let other = bytes(4, 300_000);
    save(&mut c, shard("other", 1, 0), &[("model.bin", &other)])
        .await
        .expect("save");
    assert_eq!(
        std::fs::read(data.join("step_10/model.bin")).expect("read"),
        model,
        "the pod's ingested file was recycled"
    );

    // No marker configured for this volume: the rename is the commit; a
    // temporary name is never taken.
    let temp = rename_data.join("30.partial.tmp");
    write_step(&temp, &[("state.pt", &bytes(5, 5000))]);
    write_step(&rename_data.join("tmp_40"), &[("state.pt", b"x")]);
    std::fs::rename(&temp, rename_data.join("30")).expect("rename");
    wait_for_step(&mut c, "job-r", 30).await;

    // Nothing twice: a few rescans, and a restart that rescans everything.
    daemon.wait_ingest_walks(2).await;
    daemon.restart().await;
    let mut c = daemon.clients().await;
    daemon.wait_ingest_walks(2).await;
    assert_eq!(steps(&mut c, "job-r").await, BTreeSet::from([30]));
    assert_eq!(
        daemon.count_in_log("step ingested"),
        3,
        "{}",
        daemon.log_text()
    );
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(data.parent().expect("volume dir").join("ingested.json"))
            .expect("ingested.json"),
    )
    .expect("json");
    let listed: Vec<u64> = record["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(listed, vec![10, 20]);
    // This process ingested nothing (a counter per process).
    let metrics = daemon.metrics().await;
    assert!(
        metrics.contains("cairn_ingested_shards_total 0"),
        "{metrics}"
    );

    // A step the pod finishes while cairnd is down (a rolling update, an
    // OOM kill) is ingested once it is back; the pod needs no restart.
    daemon.kill();
    let temp = rename_data.join("60.partial.tmp");
    write_step(&temp, &[("state.pt", &bytes(6, 5000))]);
    std::fs::rename(&temp, rename_data.join("60")).expect("rename");
    daemon.restart().await;
    let mut c = daemon.clients().await;
    wait_for_step(&mut c, "job-r", 60).await;
}

/// The ingest race of issue 14: after ingest lists a step directory, the
/// pod swaps one of its directories for a symbolic link to somewhere else
/// (another tenant's shard, a secret). The failpoint holds ingest right
/// after each listing so the swap lands in that window every time. Ingest
/// must refuse the step, never take a file from outside the volume.
#[tokio::test]
async fn a_directory_swapped_for_a_link_after_listing_never_brings_in_a_file_from_outside() {
    let config = tempfile::tempdir().expect("config dir");
    let config_file = config.path().join("cairnd.toml");
    std::fs::write(&config_file, "[ingest]\nrescan_secs = 1\n").expect("config");
    let daemon = start_daemon_with_env(
        &["--config", config_file.to_str().expect("utf-8")],
        &[("FAILPOINTS", "ingest.after_listing=sleep(1500)")],
    )
    .await;
    let mut c = daemon.clients().await;
    let data = volume(&daemon, "vol-race", "job-race", None);
    // Let ingest find (and watch) the volume; its data is still empty.
    daemon.wait_ingest_walks(2).await;

    // Somewhere outside the volume, laid out like the pod's own directory.
    let outside = tempfile::tempdir().expect("outside");
    let secret = b"another tenant's weights".to_vec();
    std::fs::create_dir_all(outside.path().join("sub")).expect("outside dir");
    std::fs::write(outside.path().join("sub/w.bin"), &secret).expect("secret");

    let step = data.join("7");
    write_step(&step, &[("sub/w.bin", b"the pod's own bytes")]);
    std::fs::write(step.join("commit_success.txt"), b"ok").expect("marker");
    // Ingest lists the step and sleeps; the pod swaps `sub` meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::rename(step.join("sub"), data.join("sub-moved")).expect("move sub away");
    std::os::unix::fs::symlink(outside.path().join("sub"), step.join("sub")).expect("swap");

    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon.log_text().contains("step directory refused") {
        assert!(
            !steps(&mut c, "job-race").await.contains(&7),
            "step 7 was ingested through a swapped link; log:\n{}",
            daemon.log_text()
        );
        assert!(
            Instant::now() < deadline,
            "ingest neither refused nor took step 7; log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        daemon.log_text().contains("sub is a symbolic link"),
        "{}",
        daemon.log_text()
    );
    assert!(!steps(&mut c, "job-race").await.contains(&7));
    // Nothing in the memory tier holds the secret.
    let mut stack = vec![daemon.memory_dir.join("shards")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                assert_ne!(std::fs::read(&path).unwrap_or_default(), secret, "{path:?}");
            }
        }
    }
}
