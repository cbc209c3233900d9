//! Flipped bytes are found, reported, served around and repaired.

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use cairn_proto::v1 as pb;
use common::*;

fn flip_byte(path: &std::path::Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read");
    b[0] ^= 0x01;
    f.write_all_at(&b, offset).expect("write");
}

fn chunk_hex(resp: &pb::RestoreShardResponse, index: usize) -> String {
    let m = resp.manifest.as_ref().expect("manifest");
    m.files[0].chunks[index]
        .id
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_are_reported_served_around_and_repaired() {
    let d = start_daemon(&[]).await;
    let mut c = d.clients().await;
    let data = bytes(9, 8 * TEST_CHUNK as usize);
    save(&mut c, shard("bits", 1, 0), &[("w", &data)])
        .await
        .expect("save");
    wait_disk(&mut c, "bits", 1).await;
    let (resp, _) = restore(&mut c, "bits", Some(1), 0).await.expect("restore");

    // Flip a byte of chunk 2 on disk and of chunk 5 in memory.
    let disk_chunk = chunk_hex(&resp, 2);
    let disk_path = d
        .disk_dir
        .join("tenants/default/chunks")
        .join(&disk_chunk[..2])
        .join(&disk_chunk);
    flip_byte(&disk_path, 1000);
    let memory_path = std::path::PathBuf::from(&resp.files[0].path);
    flip_byte(&memory_path, 5 * TEST_CHUNK + 7);

    // verify finds the disk corruption and names the chunk; exit code 5.
    let out = d.cli(&["verify", "--job", "bits", "--step", "1", "--tier", "disk"]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&disk_chunk) && stdout.contains("corrupt"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("offset {}", 2 * TEST_CHUNK)),
        "{stdout}"
    );

    // Restore still hands back the right bytes: chunk 5 comes from disk
    // (its disk copy is good), and the memory copy is repaired in place.
    let (resp, got) = restore(&mut c, "bits", Some(1), 0)
        .await
        .expect("restore around corruption");
    assert!(got["w"] == data, "restore must be byte-identical");
    assert_eq!(source_bytes(&resp, pb::Tier::Disk), TEST_CHUNK);
    assert_eq!(
        std::fs::read(&memory_path).expect("read"),
        data,
        "memory copy repaired"
    );

    // Repair the disk chunk from memory, then both tiers verify clean.
    let out = d.cli(&[
        "--json", "verify", "--job", "bits", "--step", "1", "--tier", "disk", "--repair",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["bad_chunks"][0]["repaired"], true, "{report}");
    for tier in ["disk", "memory"] {
        let out = d.cli(&["verify", "--job", "bits", "--step", "1", "--tier", tier]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{tier}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // Operators see it in metrics and logs.
    let metrics = d.metrics().await;
    for needle in [
        "cairn_chunk_verify_failures_total{tier=\"memory\"} 1",
        "cairn_chunk_verify_failures_total{tier=\"disk\"}",
        "cairn_chunks_repaired_total{tier=\"disk\"} 1",
        "cairn_chunks_repaired_total{tier=\"memory\"} 1",
    ] {
        assert!(metrics.contains(needle), "missing {needle:?} in\n{metrics}");
    }
    let log = d.log_text();
    assert!(log.contains("failed verification"), "{log}");
    assert!(log.contains("chunk repaired"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_in_every_tier_is_data_loss_not_wrong_bytes() {
    let d = start_daemon(&[]).await;
    let mut c = d.clients().await;
    let data = bytes(11, 3 * TEST_CHUNK as usize);
    save(&mut c, shard("lost", 1, 0), &[("w", &data)])
        .await
        .expect("save");
    wait_disk(&mut c, "lost", 1).await;
    let (resp, _) = restore(&mut c, "lost", Some(1), 0).await.expect("restore");
    let hex = chunk_hex(&resp, 1);
    flip_byte(
        &d.disk_dir
            .join("tenants/default/chunks")
            .join(&hex[..2])
            .join(&hex),
        3,
    );
    flip_byte(std::path::Path::new(&resp.files[0].path), TEST_CHUNK + 3);
    let err = restore(&mut c, "lost", Some(1), 0)
        .await
        .expect_err("no good copy anywhere");
    assert_eq!(err.code(), tonic::Code::DataLoss, "{err:?}");
    assert!(
        err.message().contains(&hex) && err.message().contains("offset 65536"),
        "{}",
        err.message()
    );
}

/// Writes a config file with `[disk] reverify_after_secs`.
fn reverify_config(dir: &std::path::Path, secs: u64) -> std::path::PathBuf {
    let path = dir.join("cairnd-reverify.toml");
    std::fs::write(&path, format!("[disk]\nreverify_after_secs = {secs}\n")).expect("config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_disk_chunk_is_rewritten_when_a_new_step_reuses_it() {
    // Regression: step 2 reused step 1's corrupted disk chunk (deduplicated
    // by id), was reported durable on disk, and restoring it without the
    // memory tier gave DATA_LOSS.
    let work = tempfile::tempdir().expect("temp dir");
    let config = reverify_config(work.path(), 0);
    let mut d = start_daemon(&["--config", config.to_str().expect("utf-8")]).await;
    let mut c = d.clients().await;
    let data = bytes(11, 4 * TEST_CHUNK as usize);
    save(&mut c, shard("reuse", 1, 0), &[("w", &data)])
        .await
        .expect("save 1");
    wait_disk(&mut c, "reuse", 1).await;
    let (resp, _) = restore(&mut c, "reuse", Some(1), 0).await.expect("restore");
    let hex = chunk_hex(&resp, 2);
    let bad = d
        .disk_dir
        .join("tenants/default/chunks")
        .join(&hex[..2])
        .join(&hex);
    flip_byte(&bad, 17);

    save(&mut c, shard("reuse", 2, 0), &[("w", &data)])
        .await
        .expect("save 2");
    wait_disk(&mut c, "reuse", 2).await;
    assert!(
        d.log_text().contains("a stored chunk failed verification"),
        "{}",
        d.log_text()
    );

    d.kill();
    std::fs::remove_dir_all(&d.memory_dir).expect("wipe memory");
    d.restart().await;
    let mut c = d.clients().await;
    for step in [2, 1] {
        let (_, got) = restore(&mut c, "reuse", Some(step), 0)
            .await
            .unwrap_or_else(|e| panic!("step {step} restores from disk: {e}"));
        assert_eq!(got["w"], data, "step {step}");
    }
}

/// Issue 16: the disk tier's own chunks were re-hashed only when a new step
/// reused them or `cairn verify` ran, so a chunk that rotted on disk stayed
/// "durable" until a restore needed it. Now scrubbing finds it in the
/// background and rewrites it from another tier; with no good copy
/// anywhere, the shard leaves the disk tier instead of being listed as
/// durable there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrubbing_rewrites_a_bad_disk_chunk_or_stops_claiming_its_shard() {
    let d = start_daemon(&[
        "--disk-scrub-bytes-per-sec",
        "1073741824",
        "--memory-keep-last",
        "1",
    ])
    .await;
    let mut c = d.clients().await;
    let first = bytes(21, 4 * TEST_CHUNK as usize);
    let second = bytes(22, 4 * TEST_CHUNK as usize);
    save(&mut c, shard("rot", 1, 0), &[("w", &first)])
        .await
        .expect("save 1");
    wait_disk(&mut c, "rot", 1).await;
    let (resp1, _) = restore(&mut c, "rot", Some(1), 0).await.expect("restore 1");
    save(&mut c, shard("rot", 2, 0), &[("w", &second)])
        .await
        .expect("save 2");
    wait_disk(&mut c, "rot", 2).await;
    let (resp2, _) = restore(&mut c, "rot", Some(2), 0).await.expect("restore 2");
    let disk_chunk = |hex: &str| {
        d.disk_dir
            .join("tenants/default/chunks")
            .join(&hex[..2])
            .join(hex)
    };
    let good = |path: &std::path::Path, hex: &str| {
        std::fs::read(path).is_ok_and(|b| blake3::hash(&b).to_hex().as_str() == hex)
    };

    // Step 2 is still in memory: its bad disk chunk is rewritten from there.
    let hex2 = chunk_hex(&resp2, 1);
    flip_byte(&disk_chunk(&hex2), 3);
    wait_until(
        Duration::from_secs(30),
        "the bad disk chunk of step 2 is rewritten",
        async || good(&disk_chunk(&hex2), &hex2),
    )
    .await;
    assert!(
        d.log_text()
            .contains("scrubbing rewrote a bad disk chunk from another tier"),
        "{}",
        d.log_text()
    );

    // Step 1 left memory (keep_last 1) and no other tier exists: the disk
    // tier stops claiming it rather than list it as durable.
    let hex1 = chunk_hex(&resp1, 2);
    flip_byte(&disk_chunk(&hex1), 3);
    wait_until(
        Duration::from_secs(30),
        "only step 2 of rot is listed",
        async || {
            job_steps(&mut c, "rot")
                .await
                .iter()
                .map(|s| s.step)
                .eq([2])
        },
    )
    .await;
    assert!(
        d.log_text().contains("the shard leaves the disk tier"),
        "{}",
        d.log_text()
    );
    let (_, got) = restore(&mut c, "rot", Some(2), 0)
        .await
        .expect("step 2 restores");
    assert_eq!(got["w"], second);
}
