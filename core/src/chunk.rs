//! Content-addressed chunks.
//!
//! Files are cut into fixed-size, aligned chunks. Tensors do not shift inside
//! a checkpoint file from one step to the next, so fixed boundaries find the
//! same duplicates as content-defined chunking while costing nothing to
//! compute. A chunk is named by the BLAKE3 hash of its bytes.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::CoreError;

/// The default chunk size: large enough that per-chunk overhead (one hash
/// task, one file or object per tier) is negligible, small enough that
/// unchanged tensors dedup and that parallel hashing has work for every core.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 * 1024 * 1024;

/// Smallest chunk size accepted; below this per-chunk costs dominate.
pub const MIN_CHUNK_SIZE: u64 = 64 * 1024;
/// Largest chunk size accepted; above this one chunk is a memory hazard.
pub const MAX_CHUNK_SIZE: u64 = 256 * 1024 * 1024;

/// The BLAKE3 hash that names a chunk.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId([u8; 32]);

impl ChunkId {
    /// Hashes `data` and returns its id. Single-threaded; the daemon hashes
    /// many chunks in parallel rather than one chunk on many threads.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// Wraps raw hash bytes, e.g. from a protobuf `bytes` field.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw 32 hash bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, the form used in file names, object keys and logs.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

impl FromStr for ChunkId {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 32];
        if s.len() != 64 || hex::decode_to_slice(s, &mut bytes).is_err() {
            return Err(CoreError::InvalidChunkId(s.chars().take(80).collect()));
        }
        Ok(Self(bytes))
    }
}

impl Serialize for ChunkId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A validated chunk size: a multiple of 4 KiB (page aligned, so chunks can be
/// read and written with aligned I/O) between [`MIN_CHUNK_SIZE`] and
/// [`MAX_CHUNK_SIZE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct ChunkSize(u64);

impl ChunkSize {
    /// Validates a chunk size given in bytes.
    pub fn new(bytes: u64) -> Result<Self, CoreError> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&bytes) || !bytes.is_multiple_of(4096) {
            return Err(CoreError::InvalidValue {
                field: "chunk_size".into(),
                reason: format!(
                    "{bytes} is not a multiple of 4096 between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"
                ),
            });
        }
        Ok(Self(bytes))
    }

    /// The size in bytes.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl Default for ChunkSize {
    fn default() -> Self {
        Self(DEFAULT_CHUNK_SIZE)
    }
}

impl TryFrom<u64> for ChunkSize {
    type Error = CoreError;
    fn try_from(value: u64) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<ChunkSize> for u64 {
    fn from(value: ChunkSize) -> Self {
        value.0
    }
}

/// The byte ranges of the chunks of a file of `file_len` bytes, in order.
///
/// Every chunk but the last is exactly `chunk_size` long; an empty file has no
/// chunks.
pub fn chunk_ranges(file_len: u64, chunk_size: ChunkSize) -> impl Iterator<Item = Range<u64>> {
    let size = chunk_size.get();
    (0..file_len.div_ceil(size)).map(move |i| {
        // Below `file_len` for every `i` the range yields, so never saturates.
        let start = i.saturating_mul(size);
        start..start.saturating_add(size).min(file_len)
    })
}

#[cfg(test)]
#[allow(
    clippy::arithmetic_side_effects,
    reason = "tests compute expected values from small, known inputs"
)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn chunk_id_round_trips_through_hex() {
        let id = ChunkId::of(b"hello");
        assert_eq!(id.to_hex(), blake3::hash(b"hello").to_hex().as_str());
        assert_eq!(id.to_hex().parse::<ChunkId>(), Ok(id));
        assert!("xyz".parse::<ChunkId>().is_err());
        assert!("g".repeat(64).parse::<ChunkId>().is_err());
    }

    #[test]
    fn chunk_size_rejects_unaligned_and_out_of_range() {
        assert!(ChunkSize::new(4096).is_err());
        assert!(ChunkSize::new(MIN_CHUNK_SIZE + 1).is_err());
        assert!(ChunkSize::new(MAX_CHUNK_SIZE * 2).is_err());
        assert_eq!(
            ChunkSize::new(DEFAULT_CHUNK_SIZE).map(ChunkSize::get),
            Ok(DEFAULT_CHUNK_SIZE)
        );
    }

    proptest! {
        #[test]
        fn chunks_tile_the_file_exactly(len in 0u64..(1 << 32), pages in 16u64..1024) {
            let size = ChunkSize::new(pages * 4096).expect("valid size");
            let mut expected_start = 0;
            let mut count = 0u64;
            for range in chunk_ranges(len, size) {
                prop_assert_eq!(range.start, expected_start);
                prop_assert!(range.end > range.start);
                prop_assert!(range.end - range.start <= size.get());
                if range.end != len {
                    prop_assert_eq!(range.end - range.start, size.get());
                }
                expected_start = range.end;
                count += 1;
            }
            prop_assert_eq!(expected_start, len);
            prop_assert_eq!(count, len.div_ceil(size.get()));
        }

        #[test]
        fn identical_bytes_give_identical_ids(data in proptest::collection::vec(any::<u8>(), 0..4096), flip in any::<usize>()) {
            prop_assert_eq!(ChunkId::of(&data), ChunkId::of(&data.clone()));
            if !data.is_empty() {
                let mut other = data.clone();
                let i = flip % other.len();
                other[i] ^= 1;
                prop_assert_ne!(ChunkId::of(&data), ChunkId::of(&other));
            }
        }
    }
}
