//! Bad input gets a precise status naming what was wrong, never a panic and
//! never a file outside Cairn's directories; nothing partial is listed.

mod common;

use std::collections::HashMap;

use cairn_proto::v1 as pb;
use common::*;

fn assert_status(err: &tonic::Status, code: tonic::Code, mentions: &str) {
    assert_eq!(err.code(), code, "unexpected status: {err:?}");
    assert!(
        err.message().contains(mentions),
        "message {:?} should mention {mentions:?}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_names_are_rejected_with_the_field_named() {
    let d = start_daemon(&[]).await;
    let mut c = d.clients().await;
    let cases: Vec<(pb::BeginShardRequest, &str)> = vec![
        (
            begin_request(shard("../etc", 1, 0), &[("a", b"x")]),
            "shard.job",
        ),
        (begin_request(shard("", 1, 0), &[("a", b"x")]), "shard.job"),
        (
            begin_request(shard("ok", 1, 0), &[("/etc/passwd", b"x")]),
            "files[0].name",
        ),
        (
            begin_request(shard("ok", 1, 0), &[("a", b"x"), ("../../escape", b"x")]),
            "files[1].name",
        ),
        (
            begin_request(shard("ok", 1, 0), &[("a/./b", b"x")]),
            "files[0].name",
        ),
        (
            begin_request(shard("ok", 1, 0), &[("nul\0byte", b"x")]),
            "files[0].name",
        ),
        (
            begin_request(shard("ok", 1, 0), &[("a", b"x"), ("a", b"y")]),
            "listed twice",
        ),
        (
            begin_request(shard("ok", 1, 0), &[("a", b"x"), ("a/b", b"y")]),
            "both a file and the directory",
        ),
        (
            begin_request(
                pb::ShardRef {
                    tenant: "Bad Tenant".into(),
                    ..shard("ok", 1, 0)
                },
                &[("a", b"x")],
            ),
            "tenant",
        ),
    ];
    for (req, mentions) in cases {
        let err = c
            .checkpoint
            .begin_shard(req)
            .await
            .expect_err("must be rejected");
        assert_status(&err, tonic::Code::InvalidArgument, mentions);
    }
    let mut req = begin_request(shard("ok", 1, 3), &[("a", b"x")]);
    req.world_size = Some(2);
    let err = c
        .checkpoint
        .begin_shard(req)
        .await
        .expect_err("rank beyond world size");
    assert_status(&err, tonic::Code::InvalidArgument, "world_size");
    let err = c
        .checkpoint
        .begin_shard(pb::BeginShardRequest {
            shard: None,
            ..Default::default()
        })
        .await
        .expect_err("no shard");
    assert_status(&err, tonic::Code::InvalidArgument, "shard is required");

    // Nothing was created anywhere, inside or outside Cairn's directories.
    assert!(!d.work.join("escape").exists());
    assert!(!std::path::Path::new("/etc/passwd.cairn").exists());
    let staged = files_under(&d.memory_dir.join("staging"));
    assert!(
        staged.is_empty(),
        "rejected requests left files: {staged:?}"
    );
    assert!(d.log_text().lines().all(|l| !l.contains("panicked")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_misuse_gets_the_right_codes() {
    let d = start_daemon(&[]).await;
    let mut c = d.clients().await;
    let data = bytes(1, 1000);
    let files: Vec<(&str, &[u8])> = vec![("a.bin", &data)];

    // Commit of an unknown session.
    let err = c
        .checkpoint
        .commit_shard(pb::CommitShardRequest {
            session_id: "no-such-session".into(),
        })
        .await
        .expect_err("unknown session");
    assert_status(&err, tonic::Code::FailedPrecondition, "no-such-session");

    // A second writer for the same shard while the first is open.
    let first = c
        .checkpoint
        .begin_shard(begin_request(shard("job", 1, 0), &files))
        .await
        .expect("begin")
        .into_inner();
    let err = c
        .checkpoint
        .begin_shard(begin_request(shard("job", 1, 0), &files))
        .await
        .expect_err("second writer");
    assert_status(&err, tonic::Code::Aborted, "another session");

    // Commit after abort.
    c.checkpoint
        .abort_shard(pb::AbortShardRequest {
            session_id: first.session_id.clone(),
        })
        .await
        .expect("abort");
    assert!(
        !std::path::Path::new(&first.files[0].path).exists(),
        "abort removes the staged files"
    );
    let err = c
        .checkpoint
        .commit_shard(pb::CommitShardRequest {
            session_id: first.session_id.clone(),
        })
        .await
        .expect_err("commit after abort");
    assert_status(&err, tonic::Code::FailedPrecondition, "not open");
    // Aborting twice is fine.
    c.checkpoint
        .abort_shard(pb::AbortShardRequest {
            session_id: first.session_id,
        })
        .await
        .expect("idempotent abort");

    // Sizes that do not match what was written: the client grew the file.
    let begin = c
        .checkpoint
        .begin_shard(begin_request(shard("job", 1, 0), &files))
        .await
        .expect("begin")
        .into_inner();
    std::fs::write(&begin.files[0].path, bytes(2, 1500)).expect("overwrite with more bytes");
    let err = c
        .checkpoint
        .commit_shard(pb::CommitShardRequest {
            session_id: begin.session_id.clone(),
        })
        .await
        .expect_err("size mismatch");
    assert_status(&err, tonic::Code::InvalidArgument, "a.bin");
    // The session stays open so the client can fix it; fixing it commits.
    std::fs::write(&begin.files[0].path, &data).expect("rewrite");
    c.checkpoint
        .commit_shard(pb::CommitShardRequest {
            session_id: begin.session_id,
        })
        .await
        .expect("commit after fixing");

    // A committed shard cannot be written again.
    let err = save(&mut c, shard("job", 1, 0), &files)
        .await
        .expect_err("already committed");
    assert_status(&err, tonic::Code::AlreadyExists, "already committed");

    // Restore of something that does not exist.
    let err = restore(&mut c, "job", Some(99), 0)
        .await
        .expect_err("no such step");
    assert_status(&err, tonic::Code::NotFound, "step 99");
    let err = restore(&mut c, "nojob", None, 0)
        .await
        .expect_err("no such job");
    assert_status(&err, tonic::Code::NotFound, "nojob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_lie_about_sizes_are_rejected_and_leave_nothing() {
    let d = start_daemon(&[]).await;
    let mut c = d.clients().await;
    let header = |size: u64| pb::WriteShardRequest {
        msg: Some(pb::write_shard_request::Msg::Header(
            pb::BeginShardRequest {
                shard: Some(shard("stream", 1, 0)),
                files: vec![pb::FileSpec {
                    name: "f".into(),
                    size,
                    metadata: HashMap::new(),
                }],
                world_size: None,
                metadata: HashMap::new(),
                attempt: String::new(),
            },
        )),
    };
    let data = |offset: u64, len: usize| pb::WriteShardRequest {
        msg: Some(pb::write_shard_request::Msg::Data(pb::FileData {
            file_index: 0,
            offset,
            data: vec![7; len],
        })),
    };
    let cases = vec![
        (vec![header(10), data(0, 20)], "exceed its declared size"),
        (
            vec![header(10), data(0, 5)],
            "declared 10 bytes but the stream carried 5",
        ),
        (vec![header(10), data(5, 5)], "must arrive in order"),
        (vec![data(0, 5)], "first message"),
        (
            vec![
                header(10),
                pb::WriteShardRequest {
                    msg: Some(pb::write_shard_request::Msg::Data(pb::FileData {
                        file_index: 3,
                        offset: 0,
                        data: vec![1],
                    })),
                },
            ],
            "file_index 3",
        ),
    ];
    for (messages, mentions) in cases {
        let err = c
            .checkpoint
            .write_shard(tokio_stream::iter(messages))
            .await
            .expect_err("rejected");
        assert_status(&err, tonic::Code::InvalidArgument, mentions);
    }
    let listed = c
        .checkpoint
        .list_steps(pb::ListStepsRequest {
            tenant: String::new(),
            job: "stream".into(),
            wait_for_all_tiers: true,
        })
        .await
        .expect("list")
        .into_inner();
    assert!(listed.jobs.is_empty(), "no partial shard is listed");
    assert!(files_under(&d.memory_dir.join("staging")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_memory_tier_refuses_with_what_uses_it() {
    // 1 MiB of memory tier; the disk tier never gets the first shard in time
    // to free it because the save is bigger than what remains.
    let d = start_daemon(&["--memory-capacity", "1048576"]).await;
    let mut c = d.clients().await;
    let big = bytes(1, 700_000);
    save(&mut c, shard("fill", 1, 0), &[("a", &big)])
        .await
        .expect("first save fits");
    // Hold the first shard in memory by keeping a session open instead of
    // relying on timing: a second session reserves the rest.
    let open = c
        .checkpoint
        .begin_shard(begin_request(
            shard("fill", 2, 0),
            &[("a", &bytes(2, 300_000))],
        ))
        .await
        .expect("fits in what remains")
        .into_inner();
    wait_disk(&mut c, "fill", 1).await;
    // Step 1 is on disk, so it can be evicted to make room for step 3 ...
    save(&mut c, shard("fill", 3, 0), &[("a", &big)])
        .await
        .expect("eviction made room");
    // ... but nothing is evictable now (step 3 may not be on disk yet and the
    // open session holds its reservation), so a save larger than the tier fails.
    let err = c
        .checkpoint
        .begin_shard(begin_request(
            shard("fill", 4, 0),
            &[("a", &bytes(3, 2_000_000))],
        ))
        .await
        .expect_err("cannot fit");
    assert_status(&err, tonic::Code::ResourceExhausted, "memory tier is full");
    assert!(err.message().contains("open sessions"), "{}", err.message());
    c.checkpoint
        .abort_shard(pb::AbortShardRequest {
            session_id: open.session_id,
        })
        .await
        .expect("abort");
    // Once step 3 is on disk it can make room for step 1 coming back from disk.
    wait_disk(&mut c, "fill", 3).await;
    let (_, got) = restore(&mut c, "fill", Some(1), 0)
        .await
        .expect("step 1 still restores from disk");
    assert_eq!(got["a"], big);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_sizes_that_wrap_around_reserve_nothing_and_are_refused() {
    // Regression: four files of 2^62 bytes summed to 0 in release builds, so
    // a client could stage more than the memory tier holds.
    let d = start_daemon(&["--memory-capacity", "134217728"]).await;
    let mut c = d.clients().await;
    let mut req = begin_request(shard("wrap", 1, 0), &[]);
    req.files = (0..4)
        .map(|n| pb::FileSpec {
            name: format!("f{n}"),
            size: 1 << 62,
            metadata: HashMap::new(),
        })
        .collect();
    let err = c
        .checkpoint
        .begin_shard(req)
        .await
        .expect_err("must be refused");
    assert_status(&err, tonic::Code::InvalidArgument, "declared sizes");
    // One file bigger than the tier, next to a reservation: refused as full,
    // never wrapped into a fit.
    let _open = c
        .checkpoint
        .begin_shard(begin_request(
            shard("wrap", 2, 0),
            &[("a", &bytes(1, 1000))],
        ))
        .await
        .expect("small save fits");
    let mut req = begin_request(shard("wrap", 3, 0), &[]);
    req.files = vec![pb::FileSpec {
        name: "huge".into(),
        size: u64::MAX,
        metadata: HashMap::new(),
    }];
    let err = c
        .checkpoint
        .begin_shard(req)
        .await
        .expect_err("must be refused");
    assert_status(&err, tonic::Code::ResourceExhausted, "memory tier is full");
    let status = testkit::status(&mut c).await;
    let memory = status
        .tiers
        .iter()
        .find(|t| t.tier == pb::Tier::Memory as i32)
        .expect("memory tier");
    assert!(memory.used_bytes < 1 << 20, "{memory:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_node_name_in_prefetch_is_an_invalid_argument_not_echoed() {
    // Regression: the 10 KB name came back whole in the message, so the
    // client saw RESOURCE_EXHAUSTED (metadata too large) instead.
    let d = start_daemon(&[]).await;
    let mut c = d.clients().await;
    let err = match c
        .admin
        .prefetch(pb::PrefetchRequest {
            shard: Some(selector("job", Some(1), 0)),
            node: "n".repeat(10_000),
        })
        .await
    {
        Ok(_) => panic!("must be refused"),
        Err(e) => e,
    };
    assert_status(&err, tonic::Code::InvalidArgument, "node");
    assert!(err.message().len() < 1000, "{} bytes", err.message().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_whose_reply_cannot_be_sent_creates_nothing() {
    // Regression: 100,000 staged paths made the reply exceed the message
    // limit after the session and its files existed; the client got
    // OUT_OF_RANGE without the session id and the shard stayed locked.
    let d = start_daemon(&[]).await;
    let mut c = d.clients().await;
    let mut req = begin_request(shard("many", 1, 0), &[]);
    req.files = (0..40_000)
        .map(|n| pb::FileSpec {
            name: format!("{n:0>100}"),
            size: 0,
            metadata: HashMap::new(),
        })
        .collect();
    let err = c
        .checkpoint
        .begin_shard(req)
        .await
        .expect_err("must be refused");
    assert_status(&err, tonic::Code::InvalidArgument, "message limit");
    // Nothing was created and nothing is locked: the same shard saves at once.
    assert!(files_under(&d.memory_dir.join("staging")).is_empty());
    save(&mut c, shard("many", 1, 0), &[("a", b"x")])
        .await
        .expect("the shard is not locked");
}

/// `n` files of `size` bytes each, named `f0`, `f1`, ...
fn many_files(n: usize, size: u64) -> Vec<pb::FileSpec> {
    (0..n)
        .map(|i| pb::FileSpec {
            name: format!("f{i}"),
            size,
            metadata: HashMap::new(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_declaring_many_files_holds_no_descriptor_per_file() {
    // Regression: WriteShard opened every declared file up front and kept
    // the descriptors for the whole stream; a held stream of about 20,000
    // files made another client's save fail "Too many open files" (the
    // daemon's limit here is the machine's, 20,000 on the CI machines).
    let d = start_daemon(&[]).await;
    let mut c = d.clients().await;
    let mut header = begin_request(shard("held", 1, 0), &[]);
    header.files = many_files(19_990, 1);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::WriteShardRequest {
        msg: Some(pb::write_shard_request::Msg::Header(header)),
    })
    .await
    .expect("header queued");
    tx.send(pb::WriteShardRequest {
        msg: Some(pb::write_shard_request::Msg::Data(pb::FileData {
            file_index: 0,
            offset: 0,
            data: vec![1],
        })),
    })
    .await
    .expect("data queued");
    let mut streaming = d.clients().await;
    let held = tokio::spawn(async move {
        streaming
            .checkpoint
            .write_shard(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    // Wait until the daemon has staged the held stream's files.
    let staging = d.memory_dir.join("staging");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while files_under(&staging).len() < 19_990 {
        assert!(std::time::Instant::now() < deadline, "stream never staged");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    save(&mut c, shard("other", 1, 0), &[("a", b"x"), ("b", b"y")])
        .await
        .expect("another client's save while the stream is held");
    drop(tx); // the stream ends short: refused, and nothing is left
    let err = held.await.expect("join").expect_err("short stream");
    assert_status(&err, tonic::Code::InvalidArgument, "declared 1 bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_of_more_files_than_descriptors_commits_and_restores() {
    // Regression: commit opened and mapped every file at once, so 20,100
    // one-byte files failed with INTERNAL (and ingest retried it forever).
    let d = start_daemon(&[]).await;
    let mut c = d.clients().await;
    let mut request = begin_request(shard("wide", 1, 0), &[]);
    request.files = many_files(20_100, 1);
    let begun = c
        .checkpoint
        .begin_shard(request)
        .await
        .expect("begin")
        .into_inner();
    for (i, staged) in begun.files.iter().enumerate() {
        std::fs::write(&staged.path, [(i % 251) as u8]).expect("write staged");
    }
    let info = c
        .checkpoint
        .commit_shard(pb::CommitShardRequest {
            session_id: begun.session_id,
        })
        .await
        .expect("commit of 20,100 files")
        .into_inner()
        .shard
        .expect("info");
    assert_eq!(info.file_count, 20_100);
    let (_, got) = restore(&mut c, "wide", Some(1), 0).await.expect("restore");
    assert_eq!(got.len(), 20_100);
    assert!(
        (0..20_100).all(|i| got[&format!("f{i}")] == [(i % 251) as u8]),
        "restored bytes differ"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_limited_per_client_and_idle_reservations_age_out() {
    // Regression: 2,000 sessions opened with no limit, and one client that
    // reserved the whole memory tier blocked every other save until its
    // session timed out (600 s).
    let work = tempfile::tempdir().expect("temp dir");
    let config = work.path().join("cairnd.toml");
    std::fs::write(&config, "session_idle_timeout_secs = 2\n").expect("config");
    let d = start_daemon(&[
        "--config",
        config.to_str().expect("utf-8"),
        "--memory-capacity",
        "1048576",
    ])
    .await;
    let mut c = d.clients().await;
    for step in 0..64 {
        c.checkpoint
            .begin_shard(begin_request(shard("many", step, 0), &[("a", b"x")]))
            .await
            .expect("within the limit");
    }
    let err = c
        .checkpoint
        .begin_shard(begin_request(shard("many", 64, 0), &[("a", b"x")]))
        .await
        .expect_err("over the limit");
    assert_status(&err, tonic::Code::ResourceExhausted, "(64)");

    // The 64 sessions write nothing and go after the idle timeout; so does
    // a reservation of most of the tier.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let hog = loop {
        match c
            .checkpoint
            .begin_shard(begin_request(
                shard("hog", 1, 0),
                &[("a", &bytes(1, 900_000))],
            ))
            .await
        {
            Ok(begun) => break begun.into_inner(),
            Err(e) => {
                assert_status(&e, tonic::Code::ResourceExhausted, "open save sessions");
                assert!(
                    std::time::Instant::now() < deadline,
                    "idle sessions never aged out"
                );
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        }
    };
    let blocked = save(&mut c, shard("next", 1, 0), &[("a", &bytes(2, 500_000))]).await;
    assert_status(
        &blocked.expect_err("no room yet"),
        tonic::Code::ResourceExhausted,
        "memory tier is full",
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match save(&mut c, shard("next", 1, 0), &[("a", &bytes(2, 500_000))]).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
                assert!(
                    std::time::Instant::now() < deadline,
                    "the idle reservation never aged out"
                );
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        }
    }
    let late = c
        .checkpoint
        .commit_shard(pb::CommitShardRequest {
            session_id: hog.session_id,
        })
        .await
        .expect_err("the idle session was aborted");
    assert_status(&late, tonic::Code::FailedPrecondition, "not open");
    assert!(d.log_text().contains("nothing was written to its files"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_session_id_is_not_echoed_whole() {
    // Found by reading the code for the fuzz targets: the id came back whole
    // in the FAILED_PRECONDITION message, so a megabyte-long one broke the
    // reply instead of naming the problem.
    let d = start_daemon(&[]).await;
    let mut c = d.clients().await;
    let err = c
        .checkpoint
        .commit_shard(pb::CommitShardRequest {
            session_id: "s".repeat(1 << 20),
        })
        .await
        .expect_err("unknown session");
    assert_status(&err, tonic::Code::FailedPrecondition, "is not open");
    assert!(err.message().len() < 1000, "{} bytes", err.message().len());
}
