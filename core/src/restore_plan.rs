//! Restore planning: which source each chunk of a shard is read from.
//!
//! A restore may find a shard's chunks in several places at once: the local
//! memory and disk tiers, any number of peers holding replicas, and the
//! bucket. Reading every chunk from the first tier that has it leaves the
//! other sources idle and makes the slowest one the bottleneck. The planner
//! instead assigns each chunk to one source so that the whole restore
//! finishes soonest, given what each source has recently delivered, and
//! orders the other holders of the chunk as fallbacks (for a verification
//! failure or a source that stalls).
//!
//! # Model
//!
//! A source serves `parallelism` requests at once; serving `n` chunks of `b`
//! bytes in total takes about `b / bytes_per_sec + ceil(n / parallelism) ×
//! latency`. The estimate is only used to compare choices, so its errors
//! cancel out as long as the daemon measures every source the same way.
//!
//! # Algorithm
//!
//! Greedy earliest finish, most constrained chunks first: chunks with fewer
//! holders go first (a chunk only one source has must go there, and the
//! others should then balance around it), larger before smaller among equals
//! (longest processing time first, which keeps the greedy makespan within
//! twice the optimum when every source holds every chunk), then by position.
//! Each chunk goes to the holder whose estimated finish time after taking it
//! is lowest; ties prefer the faster class (local, then peer, then bucket),
//! then the lower index. The bucket is a first choice only for chunks no
//! other source holds: it is the slowest and the only one that costs money
//! per request, so it serves what nobody else has and is otherwise a
//! fallback. Everything is integer arithmetic, so the plan is deterministic.

use std::cmp::Reverse;

/// What kind of place a source is. The order is the preference between
/// sources that are equally fast by the estimate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SourceClass {
    /// This node's memory or disk tier.
    Local,
    /// Another node holding a replica.
    Peer,
    /// The object store.
    Bucket,
}

/// What the daemon knows of one source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceProfile {
    /// Its kind.
    pub class: SourceClass,
    /// Bytes per second it delivered recently (or the class's default);
    /// at least 1.
    pub bytes_per_sec: u64,
    /// Time from request to first byte, in microseconds.
    pub latency_us: u64,
    /// Requests it serves at once; at least 1.
    pub parallelism: u32,
}

/// One chunk to fetch: its length and the indices (into the source list) of
/// the sources that hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkNeed {
    /// Bytes.
    pub len: u64,
    /// Sources holding a copy, by index into the planner's source list.
    pub holders: Vec<usize>,
}

/// Which source each chunk is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestorePlan {
    /// For each chunk, in input order: the sources to try, first choice
    /// first, then the fallbacks. Empty when no source holds the chunk.
    pub order: Vec<Vec<usize>>,
    /// Bytes each source serves as first choice.
    pub bytes: Vec<u64>,
    /// Chunks each source serves as first choice.
    pub chunks: Vec<u64>,
    /// Estimated time until the last source is done, in microseconds.
    pub estimated_us: u64,
}

/// Estimated microseconds for `source` to serve `chunks` chunks of `bytes`
/// bytes in total (the model of the module doc); the daemon also uses it to
/// tell a stalled read from a slow one.
pub fn estimate_us(source: &SourceProfile, bytes: u64, chunks: u64) -> u64 {
    let rate = source.bytes_per_sec.max(1);
    // Products of two u64s in a u128 never saturate; the sum is capped.
    let transfer = u128::from(bytes)
        .saturating_mul(1_000_000)
        .div_ceil(u128::from(rate));
    let rounds = chunks.div_ceil(u64::from(source.parallelism.max(1)));
    let waiting = u128::from(rounds).saturating_mul(u128::from(source.latency_us));
    u64::try_from(transfer.saturating_add(waiting)).unwrap_or(u64::MAX)
}

/// Plans a restore of `chunks` from `sources` (see the module doc). Holder
/// indices out of range are ignored, so a stale entry cannot panic.
pub fn plan(sources: &[SourceProfile], chunks: &[ChunkNeed]) -> RestorePlan {
    let valid = |holders: &[usize]| -> Vec<usize> {
        let mut h: Vec<usize> = holders
            .iter()
            .copied()
            .filter(|&i| i < sources.len())
            .collect();
        h.sort_unstable();
        h.dedup();
        h
    };
    let holders: Vec<Vec<usize>> = chunks.iter().map(|c| valid(&c.holders)).collect();
    let mut visit: Vec<usize> = (0..chunks.len()).collect();
    visit.sort_by_key(|&i| (holders[i].len(), Reverse(chunks[i].len), i));

    let mut bytes = vec![0u64; sources.len()];
    let mut counts = vec![0u64; sources.len()];
    let mut first = vec![None; chunks.len()];
    for &i in &visit {
        let eligible: Vec<usize> = if holders[i]
            .iter()
            .any(|&s| sources[s].class != SourceClass::Bucket)
        {
            holders[i]
                .iter()
                .copied()
                .filter(|&s| sources[s].class != SourceClass::Bucket)
                .collect()
        } else {
            holders[i].clone()
        };
        let best = eligible.into_iter().min_by_key(|&s| {
            (
                estimate_us(
                    &sources[s],
                    bytes[s].saturating_add(chunks[i].len),
                    counts[s].saturating_add(1),
                ),
                sources[s].class,
                s,
            )
        });
        if let Some(s) = best {
            // Chunk lengths come from manifests: the totals saturate.
            bytes[s] = bytes[s].saturating_add(chunks[i].len);
            counts[s] = counts[s].saturating_add(1);
            first[i] = Some(s);
        }
    }
    let finish: Vec<u64> = sources
        .iter()
        .enumerate()
        .map(|(s, source)| estimate_us(source, bytes[s], counts[s]))
        .collect();
    let order = holders
        .iter()
        .zip(&first)
        .map(|(holders, first)| {
            let Some(first) = *first else {
                return Vec::new();
            };
            let mut rest: Vec<usize> = holders.iter().copied().filter(|&s| s != first).collect();
            rest.sort_by_key(|&s| (sources[s].class, finish[s], s));
            std::iter::once(first).chain(rest).collect()
        })
        .collect();
    RestorePlan {
        order,
        estimated_us: finish.iter().copied().max().unwrap_or(0),
        bytes,
        chunks: counts,
    }
}

#[cfg(test)]
#[allow(
    clippy::arithmetic_side_effects,
    reason = "tests compute expected values from small, known inputs"
)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn source(class: SourceClass, mb_per_sec: u64) -> SourceProfile {
        SourceProfile {
            class,
            bytes_per_sec: mb_per_sec * 1_000_000,
            latency_us: 0,
            parallelism: 4,
        }
    }

    fn everywhere(n_sources: usize, lens: &[u64]) -> Vec<ChunkNeed> {
        lens.iter()
            .map(|&len| ChunkNeed {
                len,
                holders: (0..n_sources).collect(),
            })
            .collect()
    }

    #[test]
    fn huge_chunk_lengths_saturate_the_estimates_instead_of_wrapping() {
        let sources = vec![SourceProfile {
            latency_us: u64::MAX,
            ..source(SourceClass::Peer, 1)
        }];
        let plan = plan(&sources, &everywhere(1, &[u64::MAX, u64::MAX, 1]));
        assert_eq!(plan.bytes, vec![u64::MAX]);
        assert_eq!(plan.chunks, vec![3]);
        assert_eq!(plan.estimated_us, u64::MAX);
    }

    #[test]
    fn equal_peers_share_the_work_and_the_bucket_only_serves_what_nobody_else_has() {
        let sources = vec![
            source(SourceClass::Peer, 1000),
            source(SourceClass::Peer, 1000),
            source(SourceClass::Peer, 1000),
            source(SourceClass::Bucket, 5000),
        ];
        let mut chunks = everywhere(4, &[4 << 20; 30]);
        chunks.push(ChunkNeed {
            len: 4 << 20,
            holders: vec![3],
        });
        let plan = plan(&sources, &chunks);
        assert_eq!(&plan.chunks[..3], &[10, 10, 10]);
        assert_eq!(plan.chunks[3], 1, "only the chunk no peer has");
        assert_eq!(plan.order[30], vec![3]);
        // The bucket is every other chunk's last resort.
        assert!(plan.order[..30].iter().all(|o| o.len() == 4 && o[3] == 3));
    }

    #[test]
    fn a_fast_local_tier_takes_most_and_peers_help() {
        let sources = vec![
            source(SourceClass::Local, 4000),
            source(SourceClass::Peer, 1000),
            source(SourceClass::Peer, 1000),
        ];
        let plan = plan(&sources, &everywhere(3, &[1 << 20; 60]));
        assert_eq!(plan.chunks, vec![40, 10, 10]);
    }

    #[test]
    fn latency_bound_sources_get_fewer_small_chunks() {
        let slow_start = SourceProfile {
            latency_us: 50_000,
            ..source(SourceClass::Peer, 1000)
        };
        let sources = vec![source(SourceClass::Peer, 1000), slow_start];
        let plan = plan(&sources, &everywhere(2, &[64 << 10; 40]));
        assert!(plan.chunks[0] > plan.chunks[1], "{:?}", plan.chunks);
    }

    #[test]
    fn unknown_holders_are_ignored_and_unheld_chunks_have_no_source() {
        let sources = vec![source(SourceClass::Local, 1000)];
        let chunks = vec![
            ChunkNeed {
                len: 10,
                holders: vec![0, 7, 0],
            },
            ChunkNeed {
                len: 10,
                holders: vec![],
            },
        ];
        let plan = plan(&sources, &chunks);
        assert_eq!(plan.order, vec![vec![0], vec![]]);
    }

    fn arb_sources() -> impl Strategy<Value = Vec<SourceProfile>> {
        proptest::collection::vec(
            (0u8..3, 1u64..10_000, 0u64..20_000, 1u32..16).prop_map(|(c, mb, lat, par)| {
                SourceProfile {
                    class: match c {
                        0 => SourceClass::Local,
                        1 => SourceClass::Peer,
                        _ => SourceClass::Bucket,
                    },
                    bytes_per_sec: mb * 100_000,
                    latency_us: lat,
                    parallelism: par,
                }
            }),
            1..8,
        )
    }

    proptest! {
        #[test]
        fn every_chunk_goes_to_a_holder_with_every_other_holder_as_fallback(
            sources in arb_sources(),
            chunks in proptest::collection::vec(
                (1u64..(8 << 20), proptest::collection::vec(0usize..8, 0..6)),
                0..80,
            ),
        ) {
            let chunks: Vec<ChunkNeed> = chunks
                .into_iter()
                .map(|(len, holders)| ChunkNeed { len, holders })
                .collect();
            let plan = plan(&sources, &chunks);
            prop_assert_eq!(plan.order.len(), chunks.len());
            let mut bytes = vec![0u64; sources.len()];
            for (chunk, order) in chunks.iter().zip(&plan.order) {
                let mut valid: Vec<usize> = chunk.holders.iter().copied().filter(|&h| h < sources.len()).collect();
                valid.sort_unstable();
                valid.dedup();
                let mut got = order.clone();
                got.sort_unstable();
                prop_assert_eq!(&got, &valid, "the order lists each holder once");
                if let Some(&first) = order.first() {
                    bytes[first] += chunk.len;
                    let someone_else = valid.iter().any(|&h| sources[h].class != SourceClass::Bucket);
                    prop_assert!(
                        sources[first].class != SourceClass::Bucket || !someone_else,
                        "the bucket is first only for chunks nobody else holds"
                    );
                }
            }
            prop_assert_eq!(bytes, plan.bytes);
        }

        #[test]
        fn with_every_source_holding_everything_the_plan_is_within_twice_the_optimum(
            rates in proptest::collection::vec(1u64..5_000, 1..6),
            lens in proptest::collection::vec(1u64..(8 << 20), 1..100),
        ) {
            let sources: Vec<SourceProfile> = rates
                .iter()
                .map(|&mb| SourceProfile { latency_us: 0, parallelism: 1, ..source(SourceClass::Peer, mb) })
                .collect();
            let plan = plan(&sources, &everywhere(sources.len(), &lens));
            // No schedule beats moving every byte at the sum of all rates,
            // nor the largest chunk at the fastest rate.
            let total: u64 = lens.iter().sum();
            let all: u64 = sources.iter().map(|s| s.bytes_per_sec).sum();
            let fastest = sources.iter().map(|s| s.bytes_per_sec).max().unwrap_or(1);
            let largest = lens.iter().copied().max().unwrap_or(0);
            let bound = (u128::from(total) * 1_000_000 / u128::from(all))
                .max(u128::from(largest) * 1_000_000 / u128::from(fastest));
            prop_assert!(
                u128::from(plan.estimated_us) <= 2 * bound + 2,
                "estimated {} us, lower bound {} us", plan.estimated_us, bound
            );
        }

        #[test]
        fn planning_is_deterministic(
            sources in arb_sources(),
            lens in proptest::collection::vec(1u64..(1 << 20), 0..50),
        ) {
            let chunks = everywhere(sources.len(), &lens);
            prop_assert_eq!(plan(&sources, &chunks), plan(&sources, &chunks));
        }
    }
}
