//! The object-store tier against a real local directory (`file://`): shards
//! copied in from the disk tier with the shared copy loop, incrementally,
//! filled back out byte-identical, and every stored byte re-verified.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use cairn_core::{
    ChunkId, ChunkRef, ChunkSize, FileEntry, FileName, JobName, MANIFEST_VERSION, Manifest, Rank,
    ShardKey, Step, TenantName,
};
use cairn_daemon::error::Error;
use cairn_daemon::metrics::Metrics;
use cairn_daemon::tier::disk::DiskTier;
use cairn_daemon::tier::object::ObjectTier;
use cairn_daemon::tier::{ChunkLocation, ChunkRead, ChunkSink, ShardSource, TierKind};
use cairn_daemon::transfer::{copy_shard, fill_chunks};

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
    };
    manifest.validate().expect("valid manifest");
    (manifest, pieces)
}

/// Puts a shard into the disk tier through its sink, chunks first.
async fn put_on_disk(disk: &DiskTier, manifest: &Manifest, chunks: Vec<(ChunkId, Bytes)>) {
    for (id, bytes) in chunks {
        disk.put_chunk(&manifest.shard.tenant, id, bytes)
            .await
            .expect("put chunk on disk");
    }
    disk.put_manifest(manifest)
        .await
        .expect("put manifest on disk");
}

fn open_bucket(dir: &Path) -> ObjectTier {
    ObjectTier::open(&format!("file://{}", dir.display()), NO_OPTIONS).expect("open file:// tier")
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

    let report = copy_shard(&m1, &f.disk, &f.bucket, 4)
        .await
        .expect("copy step 1");
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
    let report = copy_shard(&m2, &f.disk, &f.bucket, 4)
        .await
        .expect("copy step 2");
    assert_eq!(report.chunks_written, 3);
    assert_eq!(report.bytes_written, 3 * CHUNK);
    assert_eq!(report.bytes_skipped, 8 * CHUNK);

    // Copying again is a no-op that succeeds (the manifest is the same).
    let report = copy_shard(&m2, &f.disk, &f.bucket, 4)
        .await
        .expect("copy step 2 again");
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
    let sources: [&dyn ShardSource; 1] = [&reopened];
    let fill = fill_chunks(
        ChunkLocation::all(&stored),
        &sources,
        &[],
        &files,
        4,
        &Metrics::new(),
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
    copy_shard(&m, &f.disk, &f.bucket, 4).await.expect("copy");

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
    let missing = f
        .bucket
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
    for (id, bytes) in chunks {
        f.bucket
            .put_chunk(&m.shard.tenant, id, bytes)
            .await
            .expect("put chunk");
    }
    f.bucket.put_manifest(&m).await.expect("first put");
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
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
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
        let err = ObjectTier::open(url, NO_OPTIONS).expect_err(url);
        assert!(matches!(err, Error::InvalidArgument(_)), "{url}: {err}");
        assert!(err.to_string().contains(url), "{url}: {err}");
    }
}
