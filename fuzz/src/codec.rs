//! The stored-chunk codec (`core::codec`): what the object-store tier reads
//! back from the bucket, and what it writes there.

use cairn_core::chunk::MAX_CHUNK_SIZE;
use cairn_core::codec::{
    ChunkHeader, CompressionPolicy, Encoding, HEADER_LEN, compress, decompress,
};

/// A stored chunk as read from the bucket: the 16-byte header, then the
/// body. Decoding never panics, and a chunk that decodes has exactly the
/// length its header names.
pub fn chunk_decode(data: &[u8]) {
    let Ok(header) = ChunkHeader::parse(data) else {
        return;
    };
    assert!(header.raw_len <= MAX_CHUNK_SIZE);
    assert_eq!(
        header.to_bytes()[..],
        data[..HEADER_LEN],
        "a header that parses is written back byte for byte"
    );
    if let Ok(raw) = decompress(&header, &data[HEADER_LEN..]) {
        assert_eq!(raw.len() as u64, header.raw_len);
    }
}

/// Encode, then decode: the first byte picks the shuffle width, the zstd
/// level and the ratio that must be met; the rest is the chunk. Whatever
/// `compress` chooses, decoding gives the same bytes back.
pub fn chunk_roundtrip(data: &[u8]) {
    let Some((&control, raw)) = data.split_first() else {
        return;
    };
    let width = [None, Some(1), Some(2), Some(4), Some(8), Some(3)][usize::from(control % 6)];
    let policy = CompressionPolicy {
        enabled: control & 0x40 == 0,
        level: 1 + i32::from(control >> 7) * 2,
        min_ratio: if control & 0x20 == 0 { 1.1 } else { 1.0 },
    };
    let mut stored = Vec::with_capacity(HEADER_LEN + raw.len());
    let (encoding, body) = match compress(raw, width, &policy) {
        Some((encoding, body)) => (encoding, body),
        None => (Encoding::Raw, raw.to_vec()),
    };
    let header = ChunkHeader {
        encoding,
        raw_len: raw.len() as u64,
    };
    stored.extend_from_slice(&header.to_bytes());
    stored.extend_from_slice(&body);
    let parsed = ChunkHeader::parse(&stored).expect("an encoded chunk's header parses");
    assert_eq!(parsed, header);
    let back = decompress(&parsed, &stored[HEADER_LEN..]).expect("an encoded chunk decodes");
    assert!(back == raw, "the chunk changed through encode/decode");
}
