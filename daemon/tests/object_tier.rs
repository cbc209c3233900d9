//! The object-store tier against a real local directory (`file://`): shards
//! copied in from the disk tier with the shared copy loop, incrementally,
//! filled back out byte-identical, and every stored byte re-verified;
//! compression, multipart uploads, step markers, retention and garbage
//! collection. The same tier against real S3, Azure and GCS servers is in
//! `object_servers.rs`.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use cairn_core::restore_plan::{SourceClass, SourceProfile};
use cairn_core::{
    ChunkId, ChunkRef, ChunkSize, FileEntry, FileName, JobName, MANIFEST_VERSION, Manifest, Rank,
    ShardKey, Step, TenantName,
};
use cairn_daemon::error::Error;
use cairn_daemon::metrics::Metrics;
use cairn_daemon::tier::disk::DiskTier;
use cairn_daemon::tier::object::{ObjectTier, ObjectTierSettings};
use cairn_daemon::tier::transfer::{CopyReport, FillRun, PlannedSource, copy_shard, fill_planned};
use cairn_daemon::tier::{ChunkLocation, ChunkRead, ChunkSink, ShardSource, TierKind};
use tokio_util::sync::CancellationToken;

const CHUNK: u64 = 64 * 1024;
const NO_OPTIONS: [(&str, &str); 0] = [];

/// Deterministic bytes that differ per `seed`, so chunks of different seeds
/// never collide.
fn data(seed: u8, len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(seed);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn key(job: &str, step: u64) -> ShardKey {
    ShardKey {
        tenant: TenantName::parse("tenant", "acme".into()).expect("tenant"),
        job: JobName::parse("job", job.into()).expect("job"),
        step: Step(step),
        rank: Rank(0),
    }
}

/// A manifest for one file named `w` holding `bytes`, and its chunks.
fn shard(key: ShardKey, bytes: &[u8]) -> (Manifest, Vec<(ChunkId, Bytes)>) {
    let pieces: Vec<(ChunkId, Bytes)> = bytes
        .chunks(CHUNK as usize)
        .map(|c| (ChunkId::of(c), Bytes::copy_from_slice(c)))
        .collect();
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        shard: key,
        world_size: None,
        chunk_size: ChunkSize::new(CHUNK).expect("chunk size"),
        files: vec![FileEntry {
            name: FileName::parse("file", "w".into()).expect("file name"),
            size: bytes.len() as u64,
            chunks: pieces
                .iter()
                .map(|(id, b)| ChunkRef {
                    id: *id,
                    len: b.len() as u64,
                })
                .collect(),
            metadata: BTreeMap::new(),
        }],
        metadata: BTreeMap::new(),
        committed_unix_ms: 1,
        attempt: None,
    };
    manifest.validate().expect("valid manifest");
    (manifest, pieces)
}

/// Puts a shard's chunks and then its manifest into a sink.
async fn put_shard(sink: &dyn ChunkSink, manifest: &Manifest, chunks: Vec<(ChunkId, Bytes)>) {
    let manifest = Arc::new(manifest.clone());
    let locations = ChunkLocation::all(&manifest);
    for (location, (id, bytes)) in locations.iter().zip(chunks) {
        assert_eq!(location.chunk.id, id);
        sink.put_chunk(location, bytes).await.expect("put chunk");
    }
    sink.put_manifest(&manifest).await.expect("put manifest");
}

async fn put_on_disk(disk: &DiskTier, manifest: &Manifest, chunks: Vec<(ChunkId, Bytes)>) {
    put_shard(disk, manifest, chunks).await;
}

fn open_with(dir: &Path, settings: ObjectTierSettings) -> ObjectTier {
    ObjectTier::open(
        &format!("file://{}", dir.display()),
        NO_OPTIONS,
        settings,
        Arc::new(Metrics::new()),
    )
    .expect("open file:// tier")
}

fn open_bucket(dir: &Path) -> ObjectTier {
    open_with(dir, ObjectTierSettings::default())
}

async fn copy(m: &Arc<Manifest>, from: &dyn ShardSource, to: &dyn ChunkSink) -> CopyReport {
    copy_shard(
        m,
        &[from],
        to,
        4,
        None,
        &Metrics::new(),
        &CancellationToken::new(),
    )
    .await
    .expect("copy shard")
}

struct Fixture {
    _tmp: tempfile::TempDir,
    bucket_dir: std::path::PathBuf,
    disk: DiskTier,
    bucket: ObjectTier,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let disk = DiskTier::open(&tmp.path().join("disk")).expect("open disk tier");
    // Not created beforehand: `file://` creates its directory.
    let bucket_dir = tmp.path().join("bucket").join("prefix");
    let bucket = open_bucket(&bucket_dir);
    assert!(bucket_dir.is_dir());
    Fixture {
        _tmp: tmp,
        bucket_dir,
        disk,
        bucket,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_incrementally_and_fills_back_identical() {
    let f = fixture();
    let step1 = data(1, 10 * CHUNK as usize + 123);
    let (m1, chunks1) = shard(key("train", 1), &step1);
    put_on_disk(&f.disk, &m1, chunks1).await;
    let m1 = Arc::new(m1);

    let report = copy(&m1, &f.disk, &f.bucket).await;
    assert_eq!(report.chunks_written, 11);
    assert_eq!(report.bytes_written, step1.len() as u64);
    assert_eq!(report.bytes_skipped, 0);
    assert!(
        f.bucket_dir
            .join("tenants/acme/manifests/train/1/0.manifest")
            .is_file()
    );

    // Step 2 keeps the first 8 chunks and changes the rest.
    let mut step2 = step1[..8 * CHUNK as usize].to_vec();
    step2.extend_from_slice(&data(2, 3 * CHUNK as usize));
    let (m2, chunks2) = shard(key("train", 2), &step2);
    put_on_disk(&f.disk, &m2, chunks2).await;
    let m2 = Arc::new(m2);
    let report = copy(&m2, &f.disk, &f.bucket).await;
    assert_eq!(report.chunks_written, 3);
    assert_eq!(report.bytes_written, 3 * CHUNK);
    assert_eq!(report.bytes_skipped, 8 * CHUNK);

    // Copying again is a no-op that succeeds (the manifest is the same).
    let report = copy(&m2, &f.disk, &f.bucket).await;
    assert_eq!(report.chunks_written, 0);
    assert_eq!(report.bytes_skipped, step2.len() as u64);

    // A fresh handle on the same directory sees both shards.
    let reopened = open_bucket(&f.bucket_dir);
    let stored = reopened
        .manifest(&m2.shard)
        .await
        .expect("read manifest")
        .expect("manifest present");
    assert_eq!(*stored, *m2);
    let all = reopened
        .list(&m1.shard.tenant, None)
        .await
        .expect("list tenant");
    assert_eq!(
        all.iter().map(|m| m.shard.clone()).collect::<Vec<_>>(),
        vec![m1.shard.clone(), m2.shard.clone()]
    );
    let other_job = JobName::parse("job", "eval".into()).expect("job");
    assert!(
        reopened
            .list(&m1.shard.tenant, Some(&other_job))
            .await
            .expect("list other job")
            .is_empty()
    );
    assert!(
        reopened
            .manifest(&key("train", 3))
            .await
            .expect("read absent manifest")
            .is_none()
    );

    // Restore step 2 from the bucket alone.
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out_path = out_dir.path().join("w");
    let out = File::create(&out_path).expect("create restore file");
    out.set_len(step2.len() as u64).expect("size restore file");
    let files = [Arc::new(out)];
    let sources = [PlannedSource {
        source: &reopened,
        label: "object-store".into(),
        profile: SourceProfile {
            class: SourceClass::Bucket,
            bytes_per_sec: 100_000_000,
            latency_us: 10_000,
            parallelism: 4,
        },
    }];
    let wanted = ChunkLocation::all(&stored);
    let holders = vec![vec![0]; wanted.len()];
    let fill = fill_planned(
        wanted,
        holders,
        &sources,
        &files,
        FillRun {
            concurrency: 4,
            metrics: &Metrics::new(),
            observe: &|_, _, _| (),
            cancel: &CancellationToken::new(),
        },
    )
    .await
    .expect("fill from bucket");
    assert_eq!(
        fill.bytes_by_tier.get(&TierKind::ObjectStore),
        Some(&(step2.len() as u64))
    );
    assert!(fill.corrupt.is_empty());
    assert_eq!(std::fs::read(&out_path).expect("read restored"), step2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_and_missing_chunks_are_reported() {
    let f = fixture();
    let bytes = data(3, 3 * CHUNK as usize);
    let (m, chunks) = shard(key("bits", 1), &bytes);
    put_on_disk(&f.disk, &m, chunks).await;
    let m = Arc::new(m);
    copy(&m, &f.disk, &f.bucket).await;

    let locations = ChunkLocation::all(&m);
    let chunk_file = |i: usize| {
        f.bucket_dir
            .join("tenants/acme/chunks")
            .join(locations[i].chunk.id.to_hex())
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(chunk_file(1))
        .expect("open stored chunk");
    // Past the 16-byte header: the body of the stored (raw) chunk.
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, 100).expect("read byte");
    b[0] ^= 0x01;
    file.write_all_at(&b, 100).expect("flip byte");
    std::fs::remove_file(chunk_file(2)).expect("remove stored chunk");

    assert!(matches!(
        f.bucket.read_chunk(&locations[0]).await.expect("read 0"),
        ChunkRead::Verified(ref got) if got.as_ref() == &bytes[..CHUNK as usize]
    ));
    assert!(matches!(
        f.bucket.read_chunk(&locations[1]).await.expect("read 1"),
        ChunkRead::Corrupt
    ));
    assert!(matches!(
        f.bucket.read_chunk(&locations[2]).await.expect("read 2"),
        ChunkRead::Missing
    ));
    // A fresh handle has no local index yet, so it asks the bucket (the
    // first handle's index still remembers uploading the removed chunk: an
    // object deleted behind Cairn's back is only noticed on a restore or a
    // verify, see docs/operations.md).
    let missing = open_bucket(&f.bucket_dir)
        .missing_chunks(
            &m.shard.tenant,
            &[locations[0].chunk.id, locations[2].chunk.id],
        )
        .await
        .expect("missing chunks");
    assert_eq!(missing, vec![locations[2].chunk.id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_are_create_only() {
    let f = fixture();
    let (m, chunks) = shard(key("once", 7), &data(4, 2 * CHUNK as usize));
    put_shard(&f.bucket, &m, chunks).await;
    f.bucket
        .put_manifest(&m)
        .await
        .expect("same manifest again");

    let mut different = m.clone();
    different.committed_unix_ms = 2;
    let err = f
        .bucket
        .put_manifest(&different)
        .await
        .expect_err("a different manifest for the same shard");
    assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
    assert!(matches!(err, Error::AlreadyExists(_)), "{err:?}");
    let stored = f
        .bucket
        .manifest(&m.shard)
        .await
        .expect("read manifest")
        .expect("manifest present");
    assert_eq!(*stored, m);

    // A corrupt manifest object reads as an incomplete shard, not an error.
    let path = f
        .bucket_dir
        .join("tenants/acme/manifests/once/7/0.manifest");
    let mut encoded = std::fs::read(&path).expect("read manifest object");
    let last = encoded.len() - 2;
    encoded[last] ^= 0x01;
    std::fs::write(&path, encoded).expect("corrupt manifest object");
    assert!(
        f.bucket
            .manifest(&m.shard)
            .await
            .expect("read corrupt manifest")
            .is_none()
    );
    assert!(
        f.bucket
            .list(&m.shard.tenant, None)
            .await
            .expect("list")
            .is_empty()
    );
}

#[test]
fn bad_urls_are_invalid_arguments() {
    for url in ["not a url", "ftp://host/path", "file://relative-host/dir"] {
        let err = ObjectTier::open(
            url,
            NO_OPTIONS,
            ObjectTierSettings::default(),
            Arc::new(Metrics::new()),
        )
        .expect_err(url);
        assert!(matches!(err, Error::InvalidArgument(_)), "{url}: {err}");
        assert!(err.to_string().contains(url), "{url}: {err}");
    }
}

/// bf16-like bytes: small values whose high bytes repeat, as trained
/// weights' do.
fn bf16_like(len: usize) -> Vec<u8> {
    let noise = data(9, len / 2);
    noise
        .iter()
        .flat_map(|n| {
            let value = (f32::from(*n) - 128.0) / 4096.0;
            ((value.to_bits() >> 16) as u16).to_le_bytes()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensors_are_compressed_when_it_pays_and_restore_identical() {
    let f = fixture();
    let weights = bf16_like(8 * CHUNK as usize);
    let random = data(5, 4 * CHUNK as usize);
    let (mut m, _) = shard(key("zip", 1), &weights);
    m.files[0]
        .metadata
        .insert("dtype".into(), "bfloat16".into());
    let (r, _) = shard(key("zip", 1), &random);
    let mut random_file = r.files[0].clone();
    random_file.name = FileName::parse("file", "opt".into()).expect("name");
    m.files.push(random_file);
    let mut chunks: Vec<(ChunkId, Bytes)> = weights
        .chunks(CHUNK as usize)
        .chain(random.chunks(CHUNK as usize))
        .map(|c| (ChunkId::of(c), Bytes::copy_from_slice(c)))
        .collect();
    chunks.dedup_by_key(|(id, _)| *id);
    put_shard(&f.bucket, &m, chunks).await;

    let stored_size = |bytes: &[u8]| {
        let path = f
            .bucket_dir
            .join("tenants/acme/chunks")
            .join(ChunkId::of(bytes).to_hex());
        std::fs::metadata(path).expect("stored chunk").len()
    };
    let weight_chunk = &weights[..CHUNK as usize];
    let random_chunk = &random[..CHUNK as usize];
    assert!(
        stored_size(weight_chunk) * 10 < CHUNK * 9,
        "bf16 chunk stored in {} bytes",
        stored_size(weight_chunk)
    );
    assert_eq!(
        stored_size(random_chunk),
        CHUNK + 16,
        "random data stays raw"
    );
    let m = Arc::new(m);
    for location in ChunkLocation::all(&m) {
        let ChunkRead::Verified(bytes) = f.bucket.read_chunk(&location).await.expect("read") else {
            panic!(
                "chunk at {} of {} not verified",
                location.offset,
                location.file_name()
            );
        };
        let file = if location.file_index == 0 {
            &weights
        } else {
            &random
        };
        let start = location.offset as usize;
        assert_eq!(&bytes[..], &file[start..start + bytes.len()]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_chunks_go_up_in_parts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("bucket");
    let bucket = open_with(
        &dir,
        ObjectTierSettings {
            multipart_threshold: 100_000,
            part_size: 50_000,
            ..ObjectTierSettings::default()
        },
    );
    let bytes = data(6, 3 * CHUNK as usize + 7);
    let (m, chunks) = shard(key("parts", 1), &bytes);
    put_shard(&bucket, &m, chunks).await;
    let m = Arc::new(m);
    for location in ChunkLocation::all(&m) {
        assert!(matches!(
            bucket.read_chunk(&location).await.expect("read"),
            ChunkRead::Verified(_)
        ));
    }
}

fn ranked(
    job: &str,
    step: u64,
    rank: u32,
    world: u32,
    seed: u8,
) -> (Manifest, Vec<(ChunkId, Bytes)>) {
    let mut k = key(job, step);
    k.rank = Rank(rank);
    let (mut m, chunks) = shard(k, &data(seed, 2 * CHUNK as usize));
    m.world_size = Some(world);
    (m, chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_is_marked_complete_only_when_every_rank_is_in() {
    let f = fixture();
    let tenant = key("marks", 1).tenant;
    let job = JobName::parse("job", "marks".into()).expect("job");
    let (m0, c0) = ranked("marks", 1, 0, 2, 10);
    put_shard(&f.bucket, &m0, c0).await;
    assert!(!f.bucket.complete_step_if_ready(&m0).await.expect("check"));
    assert!(
        !f.bucket
            .step_is_complete(&tenant, &job, Step(1))
            .await
            .expect("head")
    );
    let (m1, c1) = ranked("marks", 1, 1, 2, 11);
    put_shard(&f.bucket, &m1, c1).await;
    assert!(
        f.bucket
            .complete_step_if_ready(&m1)
            .await
            .expect("complete")
    );
    // Racing daemons writing the same marker both succeed.
    assert!(f.bucket.complete_step_if_ready(&m0).await.expect("again"));
    let steps = f.bucket.steps(&tenant, &job).await.expect("steps");
    assert!(steps[&Step(1)].complete);
    assert_eq!(steps[&Step(1)].ranks.len(), 2);
    let marker =
        std::fs::read_to_string(f.bucket_dir.join("tenants/acme/manifests/marks/1/complete"))
            .expect("marker");
    assert!(marker.contains("\"world_size\": 2"), "{marker}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_and_gc_keep_what_manifests_need() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("bucket");
    // No grace: every unreferenced chunk may go at once.
    let bucket = open_with(
        &dir,
        ObjectTierSettings {
            gc_grace: std::time::Duration::ZERO,
            ..ObjectTierSettings::default()
        },
    );
    let tenant = key("keep", 1).tenant;
    let job = JobName::parse("job", "keep".into()).expect("job");
    // Steps 1..=5, all sharing one frozen chunk; step 5 is not complete.
    let frozen = data(20, CHUNK as usize);
    let mut manifests = Vec::new();
    for step in 1..=5u64 {
        let mut bytes = frozen.clone();
        bytes.extend_from_slice(&data(20 + step as u8, CHUNK as usize));
        let (mut m, chunks) = shard(key("keep", step), &bytes);
        m.world_size = Some(if step == 5 { 2 } else { 1 });
        put_shard(&bucket, &m, chunks).await;
        bucket.complete_step_if_ready(&m).await.expect("marker");
        manifests.push(Arc::new(m));
    }
    let policy = cairn_core::RetentionPolicy {
        keep_last: 2,
        keep_every: Some(2),
    };
    let removed = bucket
        .apply_retention(&tenant, &job, &policy)
        .await
        .expect("retention");
    // Newest two complete are 3 and 4; 2 is a long-term step; 5 is newer
    // and still uploading.
    assert_eq!(removed, vec![Step(1)]);

    let dry = bucket.collect_garbage(true).await.expect("dry run");
    assert_eq!(dry.chunks, 1, "step 1's own chunk");
    let chunk_count = || {
        std::fs::read_dir(dir.join("tenants/acme/chunks"))
            .expect("ls")
            .count()
    };
    assert_eq!(chunk_count(), 6, "a dry run deletes nothing");
    let report = bucket.collect_garbage(false).await.expect("gc");
    assert_eq!(report.chunks, 1);
    assert_eq!(chunk_count(), 5);
    // Everything the remaining manifests need reads back verified.
    for m in &manifests[1..] {
        for location in ChunkLocation::all(m) {
            assert!(
                matches!(
                    bucket.read_chunk(&location).await.expect("read"),
                    ChunkRead::Verified(_)
                ),
                "step {} lost a chunk",
                m.shard.step
            );
        }
    }

    // A corrupt manifest stops collection for its tenant.
    let path = dir.join("tenants/acme/manifests/keep/2/0.manifest");
    std::fs::write(&path, b"cairn-manifest v1 garbage").expect("corrupt");
    bucket
        .delete_step(&tenant, &job, Step(3))
        .await
        .expect("delete step 3");
    let report = bucket.collect_garbage(false).await.expect("gc");
    assert_eq!(report.chunks, 0);
    assert_eq!(report.skipped_tenants, vec!["acme".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_too_old_to_reuse_are_uploaded_again() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let disk = DiskTier::open(&tmp.path().join("disk")).expect("disk");
    let bucket = open_with(
        &tmp.path().join("bucket"),
        ObjectTierSettings {
            gc_grace: std::time::Duration::from_secs(2),
            ..ObjectTierSettings::default()
        },
    );
    let bytes = data(30, 2 * CHUNK as usize);
    let (m1, chunks) = shard(key("old", 1), &bytes);
    put_on_disk(&disk, &m1, chunks.clone()).await;
    let (m2, _) = shard(key("old", 2), &bytes);
    put_on_disk(&disk, &m2, chunks).await;
    assert_eq!(copy(&Arc::new(m1), &disk, &bucket).await.chunks_written, 2);
    // Within half the grace period the chunks are reused...
    let m2 = Arc::new(m2);
    assert_eq!(copy(&m2, &disk, &bucket).await.chunks_written, 0);
    // ...after it, a collector may be about to delete them: send them again.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let (m3, chunks) = shard(key("old", 3), &bytes);
    put_on_disk(&disk, &m3, chunks).await;
    assert_eq!(copy(&Arc::new(m3), &disk, &bucket).await.chunks_written, 2);
}
