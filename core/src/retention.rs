//! Retention and "which step is newest and complete" decisions.
//!
//! Tiers keep a bounded number of steps per job. The rule that protects users
//! is that a step leaves a faster tier only once a slower tier holds it (the
//! operator can override this explicitly); these functions decide, the daemon
//! acts.

use std::collections::{BTreeMap, BTreeSet};

use crate::manifest::Manifest;
use crate::names::{Attempt, Rank, Step};

/// How many steps of each job a tier keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Keep at least this many of the newest steps of every job.
    pub keep_last: usize,
    /// Also keep every step that is a multiple of this (long-term snapshots
    /// in the bucket); `None` keeps only the newest.
    pub keep_every: Option<u64>,
}

/// Where one step of one job stands, as far as retention cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepResidency {
    /// The step.
    pub step: Step,
    /// Whether a slower tier holds every shard of this step in this tier (or
    /// there is no slower tier), so that dropping it here loses nothing.
    pub safe_to_drop: bool,
}

impl RetentionPolicy {
    /// Keeps the newest `keep_last` steps.
    pub fn keep_last(keep_last: usize) -> Self {
        Self {
            keep_last,
            keep_every: None,
        }
    }

    fn is_long_term(&self, step: Step) -> bool {
        self.keep_every
            .is_some_and(|every| every > 0 && step.0.is_multiple_of(every))
    }

    /// Steps to evict from a tier holding `steps` of one job: everything older
    /// than the newest `keep_last`, except steps no slower tier holds yet and
    /// every `keep_every`-th step.
    pub fn steps_to_evict(&self, steps: &[StepResidency]) -> Vec<Step> {
        let mut sorted: Vec<StepResidency> = steps.to_vec();
        sorted.sort_by_key(|s| std::cmp::Reverse(s.step));
        sorted.dedup_by_key(|s| s.step);
        let mut evict: Vec<Step> = sorted
            .iter()
            .skip(self.keep_last)
            .filter(|s| s.safe_to_drop && !self.is_long_term(s.step))
            .map(|s| s.step)
            .collect();
        evict.sort();
        evict
    }

    /// Steps to evict from the slowest tier (the bucket), given each step
    /// and whether it is complete there. Only complete steps count towards
    /// `keep_last`, so a step still uploading never pushes out the last good
    /// one; an incomplete step is dropped once it is older than every step
    /// kept by `keep_last` (a newer complete step superseded it).
    pub fn bucket_steps_to_evict(&self, steps: &[(Step, bool)]) -> Vec<Step> {
        let mut complete: Vec<Step> = steps.iter().filter(|(_, c)| *c).map(|(s, _)| *s).collect();
        complete.sort_by_key(|s| std::cmp::Reverse(*s));
        complete.dedup();
        let Some(&oldest_kept) = complete.get(..self.keep_last).and_then(<[Step]>::last) else {
            return Vec::new(); // fewer complete steps than keep_last: keep all
        };
        let mut evict: Vec<Step> = steps
            .iter()
            .filter(|(step, _)| *step < oldest_kept && !self.is_long_term(*step))
            .map(|(step, _)| *step)
            .collect();
        evict.sort();
        evict.dedup();
        evict
    }
}

/// Something that could be evicted to make room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvictionCandidate<K> {
    /// What to evict (the daemon's key for a step of a job).
    pub key: K,
    /// Commit order: smaller is older and goes first.
    pub age_order: u64,
    /// Bytes freed by evicting it.
    pub bytes: u64,
    /// Whether a slower tier holds it.
    pub safe_to_drop: bool,
}

/// Picks the oldest safe candidates until at least `needed` bytes are freed.
/// Returns `Err(freeable)` with the most that could be freed when that is not
/// enough, so the caller can refuse the save with a precise message.
pub fn choose_pressure_victims<K: Clone>(
    candidates: &[EvictionCandidate<K>],
    needed: u64,
) -> Result<Vec<K>, u64> {
    let mut safe: Vec<&EvictionCandidate<K>> =
        candidates.iter().filter(|c| c.safe_to_drop).collect();
    safe.sort_by_key(|c| c.age_order);
    let mut freed = 0u64;
    let mut chosen = Vec::new();
    for candidate in safe {
        if freed >= needed {
            break;
        }
        freed = freed.saturating_add(candidate.bytes);
        chosen.push(candidate.key.clone());
    }
    if freed >= needed {
        Ok(chosen)
    } else {
        Err(freed)
    }
}

/// One shard that a tier holds, as far as step completeness is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardPresence<'a> {
    /// The shard's step.
    pub step: Step,
    /// The shard's rank.
    pub rank: Rank,
    /// The world size its manifest declares, if any.
    pub world_size: Option<u32>,
    /// The attempt that saved it, if any.
    pub attempt: Option<&'a Attempt>,
}

impl<'a> From<&'a Manifest> for ShardPresence<'a> {
    fn from(m: &'a Manifest) -> Self {
        Self {
            step: m.shard.step,
            rank: m.shard.rank,
            world_size: m.world_size,
            attempt: m.attempt.as_ref(),
        }
    }
}

/// The newest step that is complete, given the shards present (at most one
/// per step and rank: the one a restore would read).
///
/// A step whose shards declare a world size is complete when every rank below
/// it is present and they agree on the size and on the attempt (shards of an
/// abandoned save are never combined with a newer save's). A step with no
/// declared world size is complete for `rank` when that rank's shard is
/// present; with no rank given, when any shard is. Steps compare numerically.
pub fn latest_complete_step<'a>(
    shards: impl IntoIterator<Item = ShardPresence<'a>>,
    rank: Option<Rank>,
) -> Option<Step> {
    type Seen<'a> = (
        BTreeSet<Rank>,
        BTreeSet<Option<u32>>,
        BTreeSet<Option<&'a Attempt>>,
    );
    let mut by_step: BTreeMap<Step, Seen<'a>> = BTreeMap::new();
    for shard in shards {
        let entry = by_step.entry(shard.step).or_default();
        entry.0.insert(shard.rank);
        entry.1.insert(shard.world_size);
        entry.2.insert(shard.attempt);
    }
    by_step
        .into_iter()
        .rev()
        .find_map(|(step, (ranks, worlds, attempts))| {
            let complete = match worlds.into_iter().collect::<Vec<_>>().as_slice() {
                [Some(ws)] => {
                    attempts.len() == 1
                        && (0..*ws).all(|r| ranks.contains(&Rank(r)))
                        && rank.is_none_or(|r| r.0 < *ws)
                }
                [None] => rank.is_none_or(|r| ranks.contains(&r)),
                _ => false, // ranks disagree on the world size: not a consistent step
            };
            complete.then_some(step)
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
    fn freed_bytes_saturate_instead_of_wrapping() {
        // Sizes read from disk: the second would wrap the sum.
        let candidate = |key, age_order| EvictionCandidate {
            key,
            age_order,
            bytes: u64::MAX - 1,
            safe_to_drop: true,
        };
        let candidates = [candidate("a", 0), candidate("b", 1)];
        assert_eq!(
            choose_pressure_victims(&candidates, u64::MAX),
            Ok(vec!["a", "b"])
        );
    }

    proptest! {
        #[test]
        fn retention_keeps_newest_and_unsafe_steps(
            steps in proptest::collection::btree_map(0u64..1000, any::<bool>(), 0..30),
            keep in 0usize..5,
        ) {
            let residency: Vec<StepResidency> = steps.iter()
                .map(|(s, safe)| StepResidency { step: Step(*s), safe_to_drop: *safe })
                .collect();
            let evict = RetentionPolicy::keep_last(keep).steps_to_evict(&residency);
            let newest: Vec<u64> = steps.keys().rev().take(keep).copied().collect();
            for s in &evict {
                prop_assert!(!newest.contains(&s.0), "evicted one of the newest");
                prop_assert!(steps[&s.0], "evicted a step no slower tier holds");
            }
            // Everything else that is safe and old does go.
            let expected = steps.iter().rev().skip(keep).filter(|(_, safe)| **safe).count();
            prop_assert_eq!(evict.len(), expected);
        }

        #[test]
        fn bucket_keeps_complete_steps_long_term_ones_and_newer_uploads(
            steps in proptest::collection::btree_map(0u64..200, any::<bool>(), 0..40),
            keep in 0usize..5,
            every in prop_oneof![Just(None), (1u64..20).prop_map(Some)],
        ) {
            let policy = RetentionPolicy { keep_last: keep, keep_every: every };
            let listed: Vec<(Step, bool)> = steps.iter().map(|(s, c)| (Step(*s), *c)).collect();
            let evict = policy.bucket_steps_to_evict(&listed);
            let newest_complete: Vec<u64> =
                steps.iter().rev().filter(|(_, c)| **c).map(|(s, _)| *s).take(keep).collect();
            for s in &evict {
                prop_assert!(!newest_complete.contains(&s.0), "evicted one of the newest complete");
                prop_assert!(every.is_none_or(|k| s.0 % k != 0), "evicted a long-term step");
                prop_assert!(s.0 < *newest_complete.iter().min().expect("something kept"));
            }
            // With fewer complete steps than keep_last nothing goes.
            if newest_complete.len() < keep || keep == 0 {
                prop_assert!(evict.is_empty());
            }
        }

        #[test]
        fn pressure_eviction_frees_enough_or_says_how_much_it_could(
            cands in proptest::collection::vec((0u64..100, 1u64..1000, any::<bool>()), 0..20),
            needed in 0u64..5000,
        ) {
            let candidates: Vec<EvictionCandidate<usize>> = cands.iter().enumerate()
                .map(|(i, (age, bytes, safe))| EvictionCandidate { key: i, age_order: *age, bytes: *bytes, safe_to_drop: *safe })
                .collect();
            let safe_total: u64 = candidates.iter().filter(|c| c.safe_to_drop).map(|c| c.bytes).sum();
            match choose_pressure_victims(&candidates, needed) {
                Ok(victims) => {
                    let freed: u64 = victims.iter().map(|&i| candidates[i].bytes).sum();
                    prop_assert!(freed >= needed);
                    prop_assert!(victims.iter().all(|&i| candidates[i].safe_to_drop));
                }
                Err(freeable) => {
                    prop_assert!(safe_total < needed);
                    prop_assert_eq!(freeable, safe_total);
                }
            }
        }

        #[test]
        fn latest_is_the_highest_fully_complete_step(
            steps in proptest::collection::btree_map(0u64..50, (1u32..4, proptest::collection::vec(any::<bool>(), 4)), 0..12),
        ) {
            let mut shards = Vec::new();
            let mut complete = Vec::new();
            for (step, (ws, present)) in &steps {
                let mut all = true;
                for r in 0..*ws {
                    if present[r as usize] {
                        shards.push(presence(*step, r, Some(*ws), None));
                    } else {
                        all = false;
                    }
                }
                if all { complete.push(*step); }
            }
            let expected = complete.iter().max().map(|s| Step(*s));
            prop_assert_eq!(latest_complete_step(shards, None), expected);
        }
    }

    fn presence(
        step: u64,
        rank: u32,
        world_size: Option<u32>,
        attempt: Option<&Attempt>,
    ) -> ShardPresence<'_> {
        ShardPresence {
            step: Step(step),
            rank: Rank(rank),
            world_size,
            attempt,
        }
    }

    #[test]
    fn a_step_with_shards_of_two_attempts_is_not_complete() {
        let a: Attempt = "a".parse().expect("valid");
        let b: Attempt = "b".parse().expect("valid");
        let mixed = vec![
            presence(4, 0, Some(2), Some(&a)),
            presence(4, 1, Some(2), Some(&a)),
            presence(5, 0, Some(2), Some(&a)),
            presence(5, 1, Some(2), Some(&b)),
        ];
        assert_eq!(latest_complete_step(mixed.clone(), None), Some(Step(4)));
        let mut replaced = mixed;
        replaced[2] = presence(5, 0, Some(2), Some(&b));
        assert_eq!(latest_complete_step(replaced, None), Some(Step(5)));
        // A shard saved with an attempt and one saved without never combine.
        let legacy = vec![
            presence(6, 0, Some(2), None),
            presence(6, 1, Some(2), Some(&b)),
        ];
        assert_eq!(latest_complete_step(legacy, None), None);
    }

    #[test]
    fn latest_compares_numerically_and_needs_the_rank() {
        let shards = vec![presence(9, 0, None, None), presence(10, 1, None, None)];
        assert_eq!(latest_complete_step(shards.clone(), None), Some(Step(10)));
        assert_eq!(
            latest_complete_step(shards.clone(), Some(Rank(0))),
            Some(Step(9))
        );
        assert_eq!(latest_complete_step(shards, Some(Rank(2))), None);
    }
}
