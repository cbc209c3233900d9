//! When a chunk in a shared bucket may be reused, and when it may be
//! collected.
//!
//! Many daemons write into one bucket and one of them may be collecting
//! garbage at any time, so "the chunk is there" is only true for a while.
//! The protocol needs no locks and no coordinator, only one number, the GC
//! grace period `G`:
//!
//! * an uploader reuses a chunk already in the bucket only if it was written
//!   less than `G / 2` ago ([`reusable`]); an older one is uploaded again,
//!   which refreshes its age. It then writes the manifest that references the
//!   chunk within `G / 2` of that check ([`upload_deadline`]);
//! * the collector deletes a chunk only if no manifest references it and it
//!   was written at least `G` ago ([`collectable`]), and it lists the
//!   manifests *after* listing the chunks.
//!
//! So a chunk the collector deletes was written before `now - G`, an uploader
//! that reused it checked it before `now - G / 2`, and that uploader's
//! manifest was in the bucket before `now`, hence before the collector
//! listed the manifests: it is seen, and the chunk is kept. The property test
//! below checks exactly this.

use std::time::Duration;

/// Whether a chunk written `age` ago may be referenced by a new manifest
/// instead of being uploaded again.
pub fn reusable(age: Duration, grace: Duration) -> bool {
    age < upload_deadline(grace)
}

/// How long after checking which chunks the bucket holds an uploader may
/// still write the manifest that reuses them; past this it must check again.
#[expect(
    clippy::arithmetic_side_effects,
    reason = "halving a Duration can neither overflow nor divide by zero"
)]
pub fn upload_deadline(grace: Duration) -> Duration {
    grace / 2
}

/// Whether the collector may delete a chunk written `age` ago.
pub fn collectable(referenced: bool, age: Duration, grace: Duration) -> bool {
    !referenced && age >= grace
}

#[cfg(test)]
#[allow(
    clippy::arithmetic_side_effects,
    reason = "tests compute expected values from small, known inputs"
)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Timeline in seconds: the chunk is written at `written`, an
        /// uploader checks it at `checked` and writes its manifest at
        /// `manifest`; the collector lists chunks at `gc_chunks` and
        /// manifests at `gc_manifests` (later). If the uploader followed the
        /// rules, the collector never deletes the chunk while the manifest
        /// needs it.
        #[test]
        fn a_reused_chunk_is_never_collected_under_a_new_manifest(
            grace in 2u64..10_000,
            written in 0u64..50_000,
            check_permille in 0u64..1000,
            write_permille in 0u64..1000,
            gc_after_written in 0u64..50_000,
            gc_gap in 0u64..1_000,
        ) {
            let g = Duration::from_secs(grace);
            // Within the rules: checked less than G/2 after the write, and
            // the manifest less than G/2 after the check.
            let checked = written + grace * check_permille / 2000;
            let manifest = checked + grace * write_permille / 2000;
            prop_assert!(reusable(Duration::from_secs(checked - written), g));
            prop_assert!(Duration::from_secs(manifest - checked) < upload_deadline(g));
            let gc_chunks = written + gc_after_written;
            let gc_manifests = gc_chunks + gc_gap;
            let referenced = manifest <= gc_manifests;
            let deleted = collectable(referenced, Duration::from_secs(gc_after_written), g);
            prop_assert!(!deleted, "chunk deleted under a manifest written at {}", manifest);
        }
    }

    #[test]
    fn fresh_chunks_are_reused_and_old_unreferenced_ones_collected() {
        let g = Duration::from_secs(3600);
        assert!(reusable(Duration::from_secs(60), g));
        assert!(!reusable(Duration::from_secs(1800), g));
        assert!(collectable(false, g, g));
        assert!(!collectable(true, g * 10, g));
        assert!(!collectable(false, g / 2, g));
    }
}
