//! How a chunk is stored in the object store: raw, or compressed with zstd,
//! optionally after a byte-plane shuffle.
//!
//! A bucket is billed by the byte and read over the slowest link a restore
//! has, so chunks are compressed there when it pays. Tensor data compresses
//! poorly byte by byte, but the high (sign and exponent) bytes of bf16, fp16
//! and fp32 values repeat a lot: grouping the i-th byte of every element
//! together (a byte-plane shuffle) before zstd raises the ratio noticeably.
//! Whether it pays is decided per chunk from a sample, so random or already
//! compressed data costs a small trial and is stored raw.
//!
//! Every stored chunk starts with a fixed [`ChunkHeader`] naming what was
//! done, so a reader never guesses, and the chunk id remains the BLAKE3 of
//! the *raw* bytes: a restore decodes and then verifies the hash as it would
//! for any tier.

use crate::chunk::MAX_CHUNK_SIZE;
use crate::error::CoreError;

/// Bytes of the header in front of every stored chunk.
pub const HEADER_LEN: usize = 16;
const MAGIC: [u8; 4] = *b"CRNC";
const FORMAT_VERSION: u8 = 1;
const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;
/// A trial compression of this many leading bytes decides whether the whole
/// chunk is worth compressing.
const SAMPLE_LEN: usize = 256 * 1024;

/// What was done to a chunk's bytes before storing them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// Stored as is.
    Raw,
    /// Compressed with zstd, after a byte-plane shuffle when `shuffle` (the
    /// element size in bytes) is above 1.
    Zstd {
        /// Element size the bytes were shuffled by; 1 means not shuffled.
        shuffle: u8,
    },
}

/// The fixed-size header of a stored chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// How the body is encoded.
    pub encoding: Encoding,
    /// Length of the chunk once decoded.
    pub raw_len: u64,
}

impl ChunkHeader {
    /// The header's bytes: magic, format version, codec, shuffle, a reserved
    /// byte, then the raw length (little endian).
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let (codec, shuffle) = match self.encoding {
            Encoding::Raw => (CODEC_RAW, 1),
            Encoding::Zstd { shuffle } => (CODEC_ZSTD, shuffle),
        };
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = FORMAT_VERSION;
        out[5] = codec;
        out[6] = shuffle;
        out[8..].copy_from_slice(&self.raw_len.to_le_bytes());
        out
    }

    /// Parses the header at the start of `stored`. Anything this build did
    /// not write is `CorruptChunk`, never a panic or a huge allocation.
    pub fn parse(stored: &[u8]) -> Result<Self, CoreError> {
        let corrupt = |why: &str| CoreError::CorruptChunk(why.to_owned());
        let header = stored
            .get(..HEADER_LEN)
            .ok_or_else(|| corrupt("shorter than its header"))?;
        if header[..4] != MAGIC {
            return Err(corrupt("bad magic"));
        }
        if header[4] != FORMAT_VERSION {
            return Err(corrupt("unknown format version"));
        }
        if header[7] != 0 {
            return Err(corrupt("reserved byte set"));
        }
        let shuffle = header[6];
        let encoding = match (header[5], shuffle) {
            (CODEC_RAW, 1) => Encoding::Raw,
            (CODEC_ZSTD, 1 | 2 | 4 | 8) => Encoding::Zstd { shuffle },
            _ => return Err(corrupt("unknown codec or shuffle")),
        };
        let mut len = [0u8; 8];
        len.copy_from_slice(&header[8..]);
        let raw_len = u64::from_le_bytes(len);
        if raw_len > MAX_CHUNK_SIZE {
            return Err(corrupt("raw length above the largest chunk size"));
        }
        let body_len = stored.len().saturating_sub(HEADER_LEN);
        if encoding == Encoding::Raw && body_len as u64 != raw_len {
            return Err(corrupt("raw body length differs from the header"));
        }
        Ok(Self { encoding, raw_len })
    }
}

/// When compression is attempted and when it is kept.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CompressionPolicy {
    /// Off: every chunk is stored raw.
    pub enabled: bool,
    /// zstd level (1 is fast and usually enough for tensors).
    pub level: i32,
    /// Keep the compressed form only when raw/compressed is at least this.
    pub min_ratio: f64,
}

impl Default for CompressionPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            level: 1,
            min_ratio: 1.1,
        }
    }
}

/// The element size worth shuffling by for a dtype name as the clients write
/// it in file metadata (`bfloat16`, `float32`, ...); `None` for dtypes that
/// are not floating point, where a shuffle rarely helps.
pub fn shuffle_width_for_dtype(dtype: &str) -> Option<u8> {
    match dtype {
        "bfloat16" | "float16" => Some(2),
        "float32" => Some(4),
        "float64" => Some(8),
        _ => None,
    }
}

/// Compresses `raw` when that clears the policy's ratio: the encoding and the
/// compressed body, or `None` to store the chunk raw.
pub fn compress(
    raw: &[u8],
    shuffle_width: Option<u8>,
    policy: &CompressionPolicy,
) -> Option<(Encoding, Vec<u8>)> {
    if !policy.enabled || raw.is_empty() {
        return None;
    }
    let width = shuffle_width
        .filter(|w| matches!(w, 2 | 4 | 8))
        .unwrap_or(1);
    let pays = |input: &[u8], output: &[u8]| {
        (input.len() as f64) >= policy.min_ratio * (output.len() as f64)
    };
    if raw.len() > 2 * SAMPLE_LEN {
        let sample = &raw[..SAMPLE_LEN];
        let trial = zstd::bulk::compress(&shuffle(sample, width), policy.level).ok()?;
        if !pays(sample, &trial) {
            return None;
        }
    }
    let body = zstd::bulk::compress(&shuffle(raw, width), policy.level).ok()?;
    pays(raw, &body).then_some((Encoding::Zstd { shuffle: width }, body))
}

/// Decodes a compressed body back into the raw chunk. The result has exactly
/// `header.raw_len` bytes or this is `CorruptChunk`.
pub fn decompress(header: &ChunkHeader, body: &[u8]) -> Result<Vec<u8>, CoreError> {
    let Encoding::Zstd { shuffle: width } = header.encoding else {
        return Ok(body.to_vec());
    };
    let capacity = header.raw_len as usize;
    let shuffled = zstd::bulk::decompress(body, capacity)
        .map_err(|e| CoreError::CorruptChunk(format!("zstd: {e}")))?;
    if shuffled.len() != capacity {
        return Err(CoreError::CorruptChunk(format!(
            "decompressed to {} bytes, header says {capacity}",
            shuffled.len()
        )));
    }
    Ok(unshuffle(&shuffled, width))
}

/// Byte-plane shuffle: byte `b` of element `i` moves to `b * n + i`, where
/// `n` is the number of whole elements; a tail shorter than one element is
/// kept at the end as is.
fn shuffle(data: &[u8], width: u8) -> Vec<u8> {
    let width = usize::from(width);
    if width <= 1 {
        return data.to_vec();
    }
    let mut out = Vec::with_capacity(data.len());
    for plane in 0..width {
        out.extend(data.chunks_exact(width).map(|element| element[plane]));
    }
    out.extend_from_slice(data.chunks_exact(width).remainder());
    out
}

/// The inverse of [`shuffle`].
fn unshuffle(data: &[u8], width: u8) -> Vec<u8> {
    let width = usize::from(width);
    if width <= 1 {
        return data.to_vec();
    }
    let whole = data.chunks_exact(width);
    let elements = whole.len();
    let tail = whole.remainder();
    let mut out = vec![0u8; data.len()];
    // Plane `b` is the run of `elements` bytes holding byte `b` of every
    // element; with no whole element there is no plane to scatter.
    for (plane, bytes) in data.chunks_exact(elements.max(1)).take(width).enumerate() {
        for (element, byte) in out.chunks_exact_mut(width).zip(bytes) {
            element[plane] = *byte;
        }
    }
    out.chunks_exact_mut(width)
        .into_remainder()
        .copy_from_slice(tail);
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// bf16-like data: small-magnitude values whose high bytes repeat.
    fn bf16_like(n: usize) -> Vec<u8> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        (0..n)
            .flat_map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let value = ((state % 2000) as f32 - 1000.0) / 40_000.0;
                let bits = (value.to_bits() >> 16) as u16;
                bits.to_le_bytes()
            })
            .collect()
    }

    fn stored(raw: &[u8], width: Option<u8>, policy: &CompressionPolicy) -> Vec<u8> {
        let (encoding, body) = match compress(raw, width, policy) {
            Some((encoding, body)) => (encoding, body),
            None => (Encoding::Raw, raw.to_vec()),
        };
        let header = ChunkHeader {
            encoding,
            raw_len: raw.len() as u64,
        };
        [header.to_bytes().as_slice(), &body].concat()
    }

    fn load(stored: &[u8]) -> Result<Vec<u8>, CoreError> {
        let header = ChunkHeader::parse(stored)?;
        decompress(&header, &stored[HEADER_LEN..])
    }

    #[test]
    fn shuffled_bf16_compresses_better_than_plain() {
        let raw = bf16_like(512 * 1024);
        let policy = CompressionPolicy::default();
        let (_, plain) = compress(&raw, None, &policy).expect("plain pays");
        let (encoding, shuffled) = compress(&raw, Some(2), &policy).expect("shuffle pays");
        assert_eq!(encoding, Encoding::Zstd { shuffle: 2 });
        assert!(
            shuffled.len() < plain.len(),
            "{} vs {}",
            shuffled.len(),
            plain.len()
        );
        assert_eq!(load(&stored(&raw, Some(2), &policy)).expect("decodes"), raw);
    }

    #[test]
    fn random_bytes_are_stored_raw() {
        let mut bytes = vec![0u8; 1_000_000];
        blake3::Hasher::new()
            .update(b"incompressible")
            .finalize_xof()
            .fill(&mut bytes);
        assert!(compress(&bytes, Some(4), &CompressionPolicy::default()).is_none());
    }

    #[test]
    fn disabled_policy_never_compresses() {
        let policy = CompressionPolicy {
            enabled: false,
            ..CompressionPolicy::default()
        };
        assert!(compress(&[0u8; 100_000], None, &policy).is_none());
    }

    proptest! {
        #[test]
        fn every_chunk_round_trips(
            raw in proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..20_000),
            width in prop_oneof![Just(None), Just(Some(2u8)), Just(Some(4u8)), Just(Some(8u8)), Just(Some(3u8))],
        ) {
            let policy = CompressionPolicy { min_ratio: 1.0, ..CompressionPolicy::default() };
            prop_assert_eq!(load(&stored(&raw, width, &policy)).expect("decodes"), raw);
        }

        #[test]
        fn shuffle_is_a_bijection(raw in proptest::collection::vec(any::<u8>(), 0..5000), width in 1u8..9) {
            prop_assert_eq!(unshuffle(&shuffle(&raw, width), width), raw);
        }

        /// A damaged stored chunk never panics, and a damaged header is
        /// always caught (a damaged body is caught by the caller's BLAKE3
        /// check of the decoded bytes).
        #[test]
        fn damage_never_panics(
            raw in proptest::collection::vec(prop_oneof![Just(7u8), any::<u8>()], 1..5000),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let policy = CompressionPolicy { min_ratio: 1.0, ..CompressionPolicy::default() };
            let mut bytes = stored(&raw, Some(2), &policy);
            let i = at.index(bytes.len());
            bytes[i] ^= flip;
            if load(&bytes).is_ok() {
                prop_assert!(i >= HEADER_LEN, "a header flip at {} was accepted", i);
            }
        }
    }

    #[test]
    fn headers_reject_what_this_build_did_not_write() {
        let good = ChunkHeader {
            encoding: Encoding::Zstd { shuffle: 4 },
            raw_len: 10,
        }
        .to_bytes();
        assert!(ChunkHeader::parse(&good).is_ok());
        for (at, value) in [(0, b'X'), (4, 9), (5, 7), (6, 3), (7, 1), (15, 0xff)] {
            let mut bad = good;
            bad[at] = value;
            assert!(ChunkHeader::parse(&bad).is_err(), "byte {at} = {value}");
        }
        assert!(ChunkHeader::parse(&good[..8]).is_err());
        let raw = ChunkHeader {
            encoding: Encoding::Raw,
            raw_len: 3,
        }
        .to_bytes();
        assert!(ChunkHeader::parse(&[raw.as_slice(), b"ab"].concat()).is_err());
        assert!(ChunkHeader::parse(&[raw.as_slice(), b"abc"].concat()).is_ok());
    }
}
