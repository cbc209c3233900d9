//! The operator CLI against a real daemon: tables, JSON, exit codes.

mod common;

use common::*;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_list_restore_delete_gc_through_the_cli() {
    let d = start_daemon(&[]).await;
    let src = d.work.join("src");
    std::fs::create_dir_all(src.join("optim")).expect("mkdir");
    let weights = bytes(1, 700_000);
    std::fs::write(src.join("weights.bin"), &weights).expect("write");
    std::fs::write(src.join("optim/adam.bin"), bytes(2, 1234)).expect("write");

    let src_arg = src.to_str().expect("utf-8");
    let out = d.cli(&[
        "save", "--job", "cli", "--step", "7", "--rank", "0", src_arg,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout(&out).contains("saved cli step 7 rank 0"),
        "{}",
        stdout(&out)
    );
    let out = d.cli(&["wait", "--job", "cli", "--step", "7", "--tier", "disk"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = d.cli(&["--json", "list", "--job", "cli"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json list");
    let step = &listed["jobs"][0]["steps"][0];
    assert_eq!(step["step"], 7);
    assert_eq!(step["restorable"], true);
    assert_eq!(step["shards"][0]["tiers"]["disk"], "durable");
    let out = d.cli(&["list"]);
    assert!(stdout(&out).contains("durable"), "{}", stdout(&out));

    let to = d.work.join("out");
    let out = d.cli(&[
        "--json",
        "restore",
        "--job",
        "cli",
        "--to",
        to.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json restore");
    assert_eq!(restored["step"], 7);
    assert_eq!(
        std::fs::read(to.join("weights.bin")).expect("read"),
        weights
    );
    assert_eq!(
        std::fs::read(to.join("optim/adam.bin")).expect("read"),
        bytes(2, 1234)
    );

    let out = d.cli(&["--json", "status"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json status");
    assert_eq!(status["tiers"][0]["tier"], "memory");
    assert_eq!(status["tiers"][0]["shards"], 1);

    let out = d.cli(&["delete", "--job", "cli", "--step", "7"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.cli(&["--json", "gc", "--dry-run"]);
    let gc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json gc");
    assert_eq!(
        gc["chunks"], 0,
        "delete already collected the step's chunks"
    );
    assert!(files_under(&d.disk_dir.join("tenants/default/chunks")).is_empty());
    assert!(files_under(&d.memory_dir.join("shards")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_readable_line_with_an_exit_code() {
    let d = start_daemon(&[]).await;
    let out = d.cli(&["restore", "--job", "nothing-here"]);
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("cairn: ")
            && err.contains("nothing-here")
            && err.trim().lines().count() == 1,
        "{err}"
    );

    let out = d.cli(&["restore", "--job", "../x"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = d.cli(&["restore", "--job", "j", "--step", "soon"]);
    assert_eq!(out.status.code(), Some(2));

    let out = std::process::Command::new(CAIRN)
        .args(["--socket", "/nonexistent/cairn.sock", "status"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cairn.sock"));
}

/// Issue 16, finding 5: with the bucket unreachable, a listing waited on it
/// and did not say so ("no step is restorable" read as data missing), and a
/// restore that failed on the bucket exited 3, "daemon unreachable". Now the
/// listing answers without the bucket and labels the view partial, and a
/// command that needed the bucket exits 6 naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_bucket_gives_a_labelled_partial_view_and_its_own_exit_code() {
    // Nothing listens on port 1: every request is refused, as by a bucket
    // endpoint that is down.
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("cairnd.toml");
    std::fs::write(
        &config,
        "[object_store]\nurl = \"s3://cairn/ckpt\"\nrequest_timeout_secs = 3\n\
         [object_store.options]\nendpoint = \"http://127.0.0.1:1\"\nallow_http = \"true\"\n\
         region = \"us-east-1\"\naccess_key_id = \"k\"\nsecret_access_key = \"s\"\n",
    )
    .expect("write config");
    let d = start_daemon(&["--config", config.to_str().expect("utf-8")]).await;
    let mut c = d.clients().await;
    save(&mut c, shard("partial", 1, 0), &[("w.bin", b"weights")])
        .await
        .expect("save: the bucket is not needed to save");

    let started = std::time::Instant::now();
    let out = d.cli(&["list", "--job", "partial"]);
    let took = started.elapsed();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("partial view: the object store: "), "{text}");
    assert!(text.contains("partial"), "the local step is listed: {text}");
    // It does not wait out the bucket's own retries (about a second by design;
    // generous here for a loaded machine).
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");
    let out = d.cli(&["--json", "list", "--job", "partial"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        listed["left_out"][0]
            .as_str()
            .is_some_and(|l| l.starts_with("the object store")),
        "{listed}"
    );

    // Nothing local: whether a step exists cannot be told without the bucket.
    let out = d.cli(&["restore", "--job", "elsewhere"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(
        err.contains("cannot tell") && err.contains("object store"),
        "{err}"
    );
    let out = d.cli(&["status", "--job", "elsewhere"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("left out: the object store"), "{err}");
}

/// Issue 16: with no way to reach the Kubernetes API (no service account,
/// no kubeconfig), cairnd served and reported ready with an empty
/// membership, logged once and never retried. Now it retries, and `cairn
/// status` (the DaemonSet's readiness probe) says the peer tier is down and
/// exits 6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_that_cannot_start_marks_the_peer_tier_down() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("cairnd.toml");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    std::fs::write(
        &config,
        format!("node_name = \"gpu-1\"\n[peers]\nlisten = \"127.0.0.1:{port}\"\ninsecure = true\n\
         [membership]\nsource = \"kubernetes\"\nmatch_labels = {{ \"app.kubernetes.io/name\" = \"cairn\" }}\n"),
    )
    .expect("write config");
    let missing = dir.path().join("no-kubeconfig");
    let d = start_daemon_with_env(
        &["--config", config.to_str().expect("utf-8")],
        &[
            ("KUBECONFIG", missing.to_str().expect("utf-8")),
            ("KUBERNETES_SERVICE_HOST", ""),
            ("HOME", dir.path().to_str().expect("utf-8")),
        ],
    )
    .await;
    let out = d.cli(&["status"]);
    let text = stdout(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{text}{err}");
    assert!(text.contains("DOWN: "), "{text}");
    assert!(err.contains("the peer tier is down"), "{err}");
    assert!(
        d.log_text().contains("membership did not start"),
        "logged, and retried"
    );
}
