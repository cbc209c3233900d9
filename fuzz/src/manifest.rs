//! Manifests as they arrive from peers (PutManifest, list answers), the
//! bucket and the disk tier.

use std::sync::Arc;

use cairn_core::{ChunkId, MANIFEST_VERSION, Manifest};
use cairn_daemon::service::convert;
use cairn_daemon::tier::ChunkLocation;

/// `Manifest::decode` of raw bytes: most inputs stop at the header.
pub fn manifest_decode(data: &[u8]) {
    if let Ok(manifest) = Manifest::decode(data) {
        check_accepted(&manifest);
    }
}

/// The bytes as a manifest body behind a correct header (version 1 and the
/// body's BLAKE3), so that every input reaches the JSON parser and
/// `Manifest::validate`.
pub fn manifest_body(data: &[u8]) {
    if let Ok(manifest) = Manifest::decode(&with_header(data)) {
        check_accepted(&manifest);
    }
}

/// `body` behind the header `decode` expects.
pub fn with_header(body: &[u8]) -> Vec<u8> {
    let hash = ChunkId::of(body);
    let mut encoded = format!("cairn-manifest v{MANIFEST_VERSION} {hash}\n").into_bytes();
    encoded.extend_from_slice(body);
    encoded
}

/// What must hold of every manifest `decode` accepts, and everything the
/// daemon computes from one it received.
pub(crate) fn check_accepted(manifest: &Manifest) {
    manifest
        .validate()
        .expect("decode accepted a manifest that does not validate");
    let again = Manifest::decode(&manifest.encode()).expect("an accepted manifest re-encodes");
    assert_eq!(
        &again, manifest,
        "the manifest changed through encode/decode"
    );
    assert_eq!(again.hash(), manifest.hash());
    assert!(
        !manifest.supersedes(manifest),
        "a manifest supersedes itself"
    );

    let chunk_size = manifest.chunk_size.get();
    let mut chunks = 0;
    for file in &manifest.files {
        let mut end = 0;
        for (offset, chunk) in file.chunks_with_offsets() {
            assert_eq!(offset, end, "chunks of {} leave a gap", file.name);
            assert!(
                (1..=chunk_size).contains(&chunk.len),
                "chunk of {} bytes in {} at chunk size {chunk_size}",
                chunk.len,
                file.name
            );
            end = offset + chunk.len;
            chunks += 1;
        }
        assert_eq!(end, file.size, "chunks of {} do not tile it", file.name);
    }
    assert_eq!(chunks, manifest.chunk_count());
    assert!(manifest.unique_chunks().len() <= chunks);
    assert_eq!(
        manifest.total_bytes(),
        manifest.files.iter().map(|f| f.size).sum::<u64>()
    );

    let shared = Arc::new(manifest.clone());
    let locations = ChunkLocation::all(&shared);
    assert_eq!(locations.len(), chunks);
    for location in &locations {
        let _ = location.file_name();
    }
    let wire = convert::manifest_to_pb(manifest);
    assert_eq!(wire.files.len(), manifest.files.len());
    let info = convert::shard_info(manifest);
    assert_eq!(info.total_bytes, manifest.total_bytes());
}
