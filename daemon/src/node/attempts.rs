//! Which attempt of a step is current on this node.
//!
//! Every save of a step by one run of a job carries an attempt id, the same
//! for every rank. When a run crashes mid-save and the job restarts, the new
//! run saves the step again under a new attempt; ranks of the crashed run may
//! still be alive (zombies) and try to begin or commit their shards late.
//! This register remembers, per recently saved step, the attempt seen last
//! and the ones it superseded, so that a zombie's begin or commit is refused
//! instead of replacing the new run's shard or being combined with it.
//!
//! The register is in memory and bounded ([`MAX_STEPS`] steps, oldest first
//! out). After a daemon restart it starts empty: the saves in flight died
//! with the daemon, and completeness (every rank of one attempt, see
//! `cairn_core::latest_complete_step`) still keeps mixed attempts from ever
//! counting as a complete step.

use std::collections::{HashMap, VecDeque};

use cairn_core::{Attempt, JobName, ShardKey, Step, TenantName};

/// Steps remembered at most; the oldest recorded is forgotten first.
const MAX_STEPS: usize = 4096;
/// Superseded attempts remembered per step at most.
const MAX_SUPERSEDED: usize = 16;

type StepId = (TenantName, JobName, Step);

#[derive(Debug)]
struct StepRecord {
    current: Attempt,
    superseded: VecDeque<Attempt>,
}

/// What [`StepAttempts::admit`] decided for a begin.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Admission {
    /// The attempt is the step's current one.
    Current,
    /// The attempt is new and now current; it replaced this one, if any.
    NewlyCurrent { replaced: Option<Attempt> },
    /// A newer attempt has begun on this step: refuse.
    Superseded { by: Attempt },
}

/// The attempts of recently saved steps.
#[derive(Debug, Default)]
pub(super) struct StepAttempts {
    steps: HashMap<StepId, StepRecord>,
    /// Insertion order, for the bound.
    order: VecDeque<StepId>,
}

fn step_id(key: &ShardKey) -> StepId {
    (key.tenant.clone(), key.job.clone(), key.step)
}

impl StepAttempts {
    /// Records a begin of `key` by `attempt`: a new attempt becomes the
    /// step's current one, an attempt it superseded is refused.
    pub(super) fn admit(&mut self, key: &ShardKey, attempt: &Attempt) -> Admission {
        let id = step_id(key);
        let Some(record) = self.steps.get_mut(&id) else {
            self.insert(
                id,
                StepRecord {
                    current: attempt.clone(),
                    superseded: VecDeque::new(),
                },
            );
            return Admission::NewlyCurrent { replaced: None };
        };
        if &record.current == attempt {
            return Admission::Current;
        }
        if record.superseded.contains(attempt) {
            return Admission::Superseded {
                by: record.current.clone(),
            };
        }
        let replaced = std::mem::replace(&mut record.current, attempt.clone());
        if record.superseded.len() == MAX_SUPERSEDED {
            record.superseded.pop_front();
        }
        record.superseded.push_back(replaced.clone());
        Admission::NewlyCurrent {
            replaced: Some(replaced),
        }
    }

    /// The attempt that superseded `attempt` on `key`'s step, if one did:
    /// what a commit checks before it makes a shard visible.
    pub(super) fn superseded_by(&self, key: &ShardKey, attempt: &Attempt) -> Option<Attempt> {
        let record = self.steps.get(&step_id(key))?;
        (&record.current != attempt && record.superseded.contains(attempt))
            .then(|| record.current.clone())
    }

    fn insert(&mut self, id: StepId, record: StepRecord) {
        if self.order.len() == MAX_STEPS
            && let Some(oldest) = self.order.pop_front()
        {
            self.steps.remove(&oldest);
        }
        self.order.push_back(id.clone());
        self.steps.insert(id, record);
    }
}

#[cfg(test)]
mod tests {
    use cairn_core::Rank;

    use super::*;

    fn key(step: u64, rank: u32) -> ShardKey {
        ShardKey {
            tenant: "t".parse().expect("valid"),
            job: "j".parse().expect("valid"),
            step: Step(step),
            rank: Rank(rank),
        }
    }

    fn attempt(s: &str) -> Attempt {
        s.parse().expect("valid")
    }

    #[test]
    fn a_newer_attempt_supersedes_and_the_old_one_is_refused_on_every_rank() {
        let mut attempts = StepAttempts::default();
        let (a, b) = (attempt("a"), attempt("b"));
        assert_eq!(
            attempts.admit(&key(5, 0), &a),
            Admission::NewlyCurrent { replaced: None }
        );
        assert_eq!(attempts.admit(&key(5, 1), &a), Admission::Current);
        assert_eq!(
            attempts.admit(&key(5, 1), &b),
            Admission::NewlyCurrent {
                replaced: Some(a.clone())
            }
        );
        assert_eq!(
            attempts.admit(&key(5, 0), &a),
            Admission::Superseded { by: b.clone() }
        );
        assert_eq!(attempts.superseded_by(&key(5, 0), &a), Some(b.clone()));
        assert_eq!(attempts.superseded_by(&key(5, 0), &b), None);
        // Other steps are independent.
        assert_eq!(attempts.superseded_by(&key(6, 0), &a), None);
        assert_eq!(
            attempts.admit(&key(6, 0), &a),
            Admission::NewlyCurrent { replaced: None }
        );
    }

    #[test]
    fn the_register_is_bounded() {
        let mut attempts = StepAttempts::default();
        for step in 0..(MAX_STEPS as u64 + 10) {
            attempts.admit(&key(step, 0), &attempt("a"));
        }
        assert_eq!(attempts.steps.len(), MAX_STEPS);
        assert_eq!(attempts.order.len(), MAX_STEPS);
        // The oldest were forgotten, the newest kept.
        assert!(!attempts.steps.contains_key(&step_id(&key(0, 0))));
        assert!(
            attempts
                .steps
                .contains_key(&step_id(&key(MAX_STEPS as u64 + 9, 0)))
        );
    }
}
