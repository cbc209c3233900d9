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
    let d = Daemon::start(&[]).await;
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
    assert!(!d.dir.path().join("escape").exists());
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
    let d = Daemon::start(&[]).await;
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
    let d = Daemon::start(&[]).await;
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
    let d = Daemon::start(&["--memory-capacity", "1048576"]).await;
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
