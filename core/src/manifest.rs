//! The manifest: what a shard is made of.
//!
//! A manifest lists a shard's files, each as the ordered list of its chunks
//! (id and length), with the client's per-file metadata (dtype, shape, ...).
//! A shard is complete in a tier exactly when its manifest is there, and every
//! tier writes a manifest only after every chunk it names is durable there.
//!
//! Encoded form: one header line `cairn-manifest v1 <blake3 of body>` and a
//! JSON body. The header hash lets every reader detect a torn or corrupted
//! manifest before trusting anything in it; JSON keeps manifests readable by
//! operators with nothing but `cat`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkId, ChunkSize, chunk_ranges};
use crate::error::CoreError;
use crate::names::{Attempt, FileName, ShardKey};

/// The manifest format version this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;

const HEADER_PREFIX: &str = "cairn-manifest v";

/// One chunk of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// BLAKE3 of the chunk's bytes.
    pub id: ChunkId,
    /// Its length in bytes (the chunk size, except for a file's last chunk).
    pub len: u64,
}

/// One file of a shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative path inside the shard.
    pub name: FileName,
    /// Total size in bytes; equals the sum of the chunk lengths.
    pub size: u64,
    /// The chunks in file order.
    pub chunks: Vec<ChunkRef>,
    /// Client metadata (dtype, shape, ...), opaque to Cairn.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

impl FileEntry {
    /// Each chunk with the byte offset where it starts in the file.
    pub fn chunks_with_offsets(&self) -> impl Iterator<Item = (u64, &ChunkRef)> {
        self.chunks.iter().scan(0u64, |offset, chunk| {
            let start = *offset;
            // The lengths come from outside; a validated manifest's sum to
            // the file size, so this saturates only for an invalid one.
            *offset = offset.saturating_add(chunk.len);
            Some((start, chunk))
        })
    }
}

/// The description of one committed shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version; see [`MANIFEST_VERSION`].
    pub version: u32,
    /// Which shard this is.
    pub shard: ShardKey,
    /// How many ranks the job had when it saved this step, if the client said;
    /// lets any node tell whether a step is complete across ranks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<u32>,
    /// The chunk size every file was cut with.
    pub chunk_size: ChunkSize,
    /// The files, in the order the client declared them.
    pub files: Vec<FileEntry>,
    /// Shard-wide client metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// When the shard was committed, milliseconds since the Unix epoch.
    pub committed_unix_ms: u64,
    /// The save of the step this shard belongs to (see [`Attempt`]); absent
    /// for shards saved without one (ingested directories, older clients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<Attempt>,
}

impl Manifest {
    /// Total bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        // Saturating: the sizes come from outside (peers, the bucket).
        self.files
            .iter()
            .map(|f| f.size)
            .fold(0, u64::saturating_add)
    }

    /// Whether this manifest may replace `stored` for the same shard in a
    /// tier that already holds it: only a later save from another attempt
    /// does (a new run re-saving a step that never became complete). The
    /// same attempt never replaces itself, and a late shard of an older
    /// attempt never replaces a newer one.
    pub fn supersedes(&self, stored: &Manifest) -> bool {
        self.shard == stored.shard
            && self.attempt.is_some()
            && self.attempt != stored.attempt
            && self.committed_unix_ms >= stored.committed_unix_ms
    }

    /// Number of chunk references (duplicates counted).
    pub fn chunk_count(&self) -> usize {
        self.files.iter().map(|f| f.chunks.len()).sum()
    }

    /// The distinct chunks this shard needs, with their lengths.
    pub fn unique_chunks(&self) -> BTreeMap<ChunkId, u64> {
        self.files
            .iter()
            .flat_map(|f| f.chunks.iter().map(|c| (c.id, c.len)))
            .collect()
    }

    /// Checks the invariants every reader relies on: a known version, unique
    /// file names, chunk lengths that tile each file exactly at the chunk
    /// size.
    pub fn validate(&self) -> Result<(), CoreError> {
        if self.version != MANIFEST_VERSION {
            return Err(CoreError::CorruptManifest(format!(
                "unsupported version {} (this build reads {MANIFEST_VERSION})",
                self.version
            )));
        }
        if let Some(0) = self.world_size {
            return Err(CoreError::CorruptManifest("world_size is 0".into()));
        }
        if let Some(ws) = self.world_size
            && self.shard.rank.0 >= ws
        {
            return Err(CoreError::CorruptManifest(format!(
                "rank {} is not below world_size {ws}",
                self.shard.rank
            )));
        }
        let mut names = BTreeSet::new();
        for file in &self.files {
            if !names.insert(file.name.as_str()) {
                return Err(CoreError::CorruptManifest(format!(
                    "file {} listed twice",
                    file.name
                )));
            }
            // Compared lazily and by count first: `size` comes from outside
            // (a peer, the bucket), and nothing may be allocated by it.
            let expected_count = file.size.div_ceil(self.chunk_size.get());
            let tiles = u64::try_from(file.chunks.len()).is_ok_and(|n| n == expected_count)
                && chunk_ranges(file.size, self.chunk_size)
                    .zip(&file.chunks)
                    .all(|(range, chunk)| range.start.checked_add(chunk.len) == Some(range.end));
            if !tiles {
                return Err(CoreError::CorruptManifest(format!(
                    "chunks of file {} do not tile its {} bytes at chunk size {}",
                    file.name,
                    file.size,
                    self.chunk_size.get()
                )));
            }
        }
        Ok(())
    }

    /// Encodes the manifest: a header line with the body's hash, then JSON.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain data structs with string keys cannot fail.
        let body = serde_json::to_vec(self).unwrap_or_default();
        let hash = blake3::hash(&body);
        let mut out = format!("{HEADER_PREFIX}{} {}\n", self.version, hash.to_hex()).into_bytes();
        out.extend_from_slice(&body);
        out
    }

    /// The manifest's own hash (of its encoded body): two manifests are the
    /// same exactly when their hashes are.
    pub fn hash(&self) -> ChunkId {
        let body = serde_json::to_vec(self).unwrap_or_default();
        ChunkId::of(&body)
    }

    /// Decodes and checks a manifest: the header hash must match the body and
    /// the body must pass [`Manifest::validate`].
    pub fn decode(bytes: &[u8]) -> Result<Self, CoreError> {
        let corrupt = |why: &str| CoreError::CorruptManifest(why.to_owned());
        let newline = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| corrupt("no header line"))?;
        let (header, body) = bytes.split_at(newline);
        let body = &body[1..]; // past the newline
        let header = std::str::from_utf8(header).map_err(|_| corrupt("header is not UTF-8"))?;
        let rest = header
            .strip_prefix(HEADER_PREFIX)
            .ok_or_else(|| corrupt("header does not start with the manifest magic"))?;
        let (version, hash_hex) = rest
            .split_once(' ')
            .ok_or_else(|| corrupt("header has no hash"))?;
        let version: u32 = version
            .parse()
            .map_err(|_| corrupt("header version is not a number"))?;
        // Compare the canonical lower-case text, so that no byte of the header
        // can change without detection.
        if ChunkId::of(body).to_hex() != hash_hex {
            return Err(corrupt("body does not match its hash"));
        }
        let manifest: Manifest = serde_json::from_slice(body)
            .map_err(|e| CoreError::CorruptManifest(format!("body: {e}")))?;
        if manifest.version != version {
            return Err(corrupt("header and body disagree on the version"));
        }
        manifest.validate()?;
        Ok(manifest)
    }
}

#[cfg(test)]
#[allow(
    clippy::arithmetic_side_effects,
    reason = "tests compute expected values from small, known inputs"
)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::names::{JobName, Rank, Step, TenantName};

    pub(crate) fn manifest_from(files: &[(String, Vec<u8>)], chunk: ChunkSize) -> Manifest {
        let files = files
            .iter()
            .map(|(name, data)| FileEntry {
                name: FileName::parse("name", name.clone()).expect("valid name"),
                size: data.len() as u64,
                chunks: chunk_ranges(data.len() as u64, chunk)
                    .map(|r| ChunkRef {
                        id: ChunkId::of(&data[r.start as usize..r.end as usize]),
                        len: r.end - r.start,
                    })
                    .collect(),
                metadata: BTreeMap::from([("dtype".into(), "bf16".into())]),
            })
            .collect();
        Manifest {
            version: MANIFEST_VERSION,
            shard: ShardKey {
                tenant: TenantName::parse("tenant", "default".into()).expect("valid"),
                job: JobName::parse("job", "llama".into()).expect("valid"),
                step: Step(7),
                rank: Rank(1),
            },
            world_size: Some(2),
            chunk_size: chunk,
            files,
            metadata: BTreeMap::new(),
            committed_unix_ms: 1,
            attempt: None,
        }
    }

    #[test]
    fn sizes_from_outside_saturate_instead_of_wrapping() {
        // Lengths a peer or the bucket could send: summing them must neither
        // panic nor wrap, and the manifest is refused.
        let mut m = manifest_from(
            &[("a".into(), vec![1; 10]), ("b".into(), vec![2; 10])],
            small_chunks(),
        );
        for file in &mut m.files {
            file.size = u64::MAX;
            let chunk = ChunkRef {
                len: u64::MAX,
                ..file.chunks[0]
            };
            file.chunks = vec![chunk; 3];
        }
        assert_eq!(m.total_bytes(), u64::MAX);
        let offsets: Vec<u64> = m.files[0].chunks_with_offsets().map(|(o, _)| o).collect();
        assert_eq!(offsets, [0, u64::MAX, u64::MAX]);
        let err = Manifest::decode(&m.encode()).expect_err("must be refused");
        assert!(matches!(err, CoreError::CorruptManifest(_)), "{err}");
    }

    #[test]
    fn a_huge_declared_size_is_refused_without_allocating_for_it() {
        // Regression: validate once collected `size / chunk_size` expected
        // lengths first, so this manifest aborted the daemon.
        let mut m = manifest_from(&[("a".into(), vec![1; 10])], small_chunks());
        m.files[0].size = u64::MAX;
        m.files[0].chunks.clear();
        let err = Manifest::decode(&m.encode()).expect_err("must be refused");
        assert!(err.to_string().contains("do not tile"), "{err}");
    }

    #[test]
    fn attempts_round_trip_and_only_a_later_other_attempt_supersedes() {
        let mut old = manifest_from(&[("a".into(), vec![1; 10])], small_chunks());
        assert!(!String::from_utf8_lossy(&old.encode()).contains("attempt"));
        old.attempt = Some("run-1".parse().expect("valid"));
        let decoded = Manifest::decode(&old.encode()).expect("decodes");
        assert_eq!(decoded.attempt, old.attempt);
        let mut new = old.clone();
        new.committed_unix_ms = old.committed_unix_ms + 1;
        assert!(
            !new.supersedes(&old),
            "the same attempt never replaces itself"
        );
        new.attempt = Some("run-2".parse().expect("valid"));
        assert!(new.supersedes(&old));
        assert!(
            !old.supersedes(&new),
            "an older save never replaces a newer one"
        );
        new.attempt = None;
        assert!(
            !new.supersedes(&old),
            "a save without an attempt replaces nothing"
        );
    }

    fn small_chunks() -> ChunkSize {
        ChunkSize::new(64 * 1024).expect("valid")
    }

    #[test]
    fn a_flipped_byte_anywhere_is_detected() {
        let m = manifest_from(&[("a".into(), vec![1; 200_000])], small_chunks());
        let encoded = m.encode();
        for i in 0..encoded.len() {
            let mut bad = encoded.clone();
            bad[i] ^= 0x20;
            assert!(
                Manifest::decode(&bad).is_err(),
                "flip at {i} went unnoticed"
            );
        }
        assert!(Manifest::decode(&encoded[..encoded.len() - 1]).is_err());
    }

    #[test]
    fn inconsistent_chunk_lists_are_rejected() {
        let mut m = manifest_from(&[("a".into(), vec![1; 200_000])], small_chunks());
        m.files[0].size += 1;
        assert!(Manifest::decode(&m.encode()).is_err());
        let mut m = manifest_from(
            &[("a".into(), vec![1; 10]), ("a".into(), vec![2; 10])],
            small_chunks(),
        );
        assert!(m.validate().is_err());
        m.files.pop();
        m.world_size = Some(1);
        assert!(m.validate().is_err(), "rank 1 of world size 1");
    }

    proptest! {
        #[test]
        fn manifests_round_trip(
            files in proptest::collection::btree_map("[a-z]{1,8}(/[a-z0-9_]{1,8}){0,2}", proptest::collection::vec(any::<u8>(), 0..300_000), 0..4)
        ) {
            let files: Vec<(String, Vec<u8>)> = files.into_iter().collect();
            let m = manifest_from(&files, small_chunks());
            let decoded = Manifest::decode(&m.encode()).expect("decodes");
            prop_assert_eq!(&decoded, &m);
            prop_assert_eq!(decoded.hash(), m.hash());
            prop_assert_eq!(m.total_bytes(), files.iter().map(|(_, d)| d.len() as u64).sum::<u64>());
            for (file, (_, data)) in m.files.iter().zip(&files) {
                for (offset, chunk) in file.chunks_with_offsets() {
                    let bytes = &data[offset as usize..(offset + chunk.len) as usize];
                    prop_assert_eq!(ChunkId::of(bytes), chunk.id);
                }
            }
        }
    }
}
