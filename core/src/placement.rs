//! Replica placement: which peer nodes hold the copies of a shard.
//!
//! Placement is a pure function of the shard's placement key (tenant, job,
//! rank), its owner and the membership. Every node that sees the same
//! membership computes the same answer, so a replacement node finds where a
//! lost node's shards live without asking any central index. The step is
//! deliberately not part of the key: every step of a rank goes to the same
//! peers, so the peer already holds most of the next step's chunks and
//! deduplication saves the transfer.
//!
//! # Algorithm
//!
//! Rendezvous (highest-random-weight) hashing. Each member gets a score for
//! the key; members are ranked by score, highest first, ties broken by node
//! id. A member of weight `w` is scored as its best of `w` virtual nodes, so
//! it wins a key `w` times as often as a member of weight 1. Scores use only
//! BLAKE3 and integer arithmetic: no floating point, so every platform and
//! every build agrees bit for bit.
//!
//! Replicas are then chosen greedily along that ranking in three passes, each
//! taking members in ranking order:
//!
//! 1. members in a zone that neither the owner nor an earlier pick occupies;
//! 2. members in a rack that neither the owner nor an earlier pick occupies;
//! 3. any member not yet picked.
//!
//! Each pass stops once `replicas` members are picked. The owner is never a
//! candidate. Because every pass walks one fixed ranking, a membership change
//! only moves what it must: a joining node takes replicas only where it now
//! wins, and a leaving node's replicas go to the next members in line while
//! every other replica stays where it was (both are property-tested below).
//! The pick order does not depend on `replicas`, so `place(.., r + 1)` extends
//! `place(.., r)` by one node: the "next candidate" to try when a chosen peer
//! is full.
//!
//! # Failure domains
//!
//! Domains nest: a rack lies inside a zone, and rack names are scoped to their
//! zone (rack `r1` of zone `a` and rack `r1` of zone `b` are two racks). A
//! member without a zone label is alone in its own zone, unless it has a rack
//! label: members of one rack share a zone even when nobody labelled it, so
//! zone-less members of one rack count as one (unnamed) zone. A member without
//! a rack label is alone in its own rack. Labels of the owner are given by the
//! caller (see [`Membership::place`]).
//!
//! The spread rule, exactly: let `Zf` be the number of distinct zones among
//! the eligible members (every member but the owner) other than the owner's
//! zone, and `Rf` the same count for racks. Then the first `min(R, Zf)`
//! replicas lie in pairwise distinct zones, none of them the owner's, and the
//! first `min(R, Rf)` replicas lie in pairwise distinct racks, none of them
//! the owner's. Beyond that, replicas share domains, preferring not to share
//! a rack.
//!
//! # Load balance
//!
//! Rendezvous hashing spreads keys exactly as if each were thrown at random
//! (weighted): the load of a node is binomial around its mean. Max/mean load
//! therefore depends on how many replicas each node holds, not on the hash;
//! `benches/src/bin/placement_sim.rs` measures it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::names::{JobName, Rank, ShardKey, TenantName};

/// Version of the placement rules. Changing the hash inputs, the score or the
/// domain rules moves replicas, so nodes that compute placement differently
/// must never share a membership; they can compare this number to find out.
pub const PLACEMENT_VERSION: u32 = 1;

/// Longest node id accepted (a DNS-1123 subdomain, like a Kubernetes node).
pub const MAX_NODE_ID_LEN: usize = 253;

/// Longest zone or rack label accepted (a Kubernetes label value).
pub const MAX_DOMAIN_LABEL_LEN: usize = 63;

/// Largest member weight accepted. Scoring costs one hash mix per unit of
/// weight, so weights are small relative capacities, not byte counts.
pub const MAX_WEIGHT: u32 = 64;

/// Domain separation for the key hash, so no other BLAKE3 use in Cairn can
/// collide with placement by accident.
const KEY_CONTEXT: &str = "cairn placement v1 2025 shard key";
/// Domain separation for the node hash.
const NODE_CONTEXT: &str = "cairn placement v1 2025 node";

fn invalid_value(field: String, reason: impl Into<String>) -> CoreError {
    CoreError::InvalidValue {
        field,
        reason: reason.into(),
    }
}

/// The name of a node taking part in the peer tier.
///
/// A DNS-1123 subdomain, as Kubernetes node names are: 1 to 253 characters,
/// dot-separated labels of 1 to 63 lower-case letters, digits and `-`, each
/// starting and ending with a letter or digit. Placement hashes the exact
/// bytes, so the rules are strict: two spellings of one host would otherwise
/// place differently.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl NodeId {
    /// Validates `value` as the node id in `field`.
    pub fn parse(field: &str, value: String) -> Result<Self, CoreError> {
        let fail = |reason: &'static str| CoreError::InvalidName {
            field: field.to_owned(),
            value: value.chars().take(80).collect(),
            reason,
        };
        if value.is_empty() || value.len() > MAX_NODE_ID_LEN {
            return Err(fail("must be 1 to 253 characters"));
        }
        for label in value.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(fail("each dot-separated label must be 1 to 63 characters"));
            }
            let ok_chars = label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !ok_chars || label.starts_with('-') || label.ends_with('-') {
                return Err(fail(
                    "must be a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', \
                     each label starting and ending with a letter or digit",
                ));
            }
        }
        Ok(Self(value))
    }

    /// The validated id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl TryFrom<String> for NodeId {
    type Error = CoreError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse("node", value)
    }
}

impl From<NodeId> for String {
    fn from(value: NodeId) -> Self {
        value.0
    }
}

impl std::str::FromStr for NodeId {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse("node", s.to_owned())
    }
}

fn default_weight() -> u32 {
    1
}

/// One node of the peer tier, with the failure domains it belongs to.
///
/// Labels come from node labels (`topology.kubernetes.io/zone` and a rack
/// label) or from the static configuration. They are checked when a
/// [`Membership`] is built, not here, so that the error can name the entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node's name.
    pub id: NodeId,
    /// The zone (failure domain of a data centre or power feed), if known.
    #[serde(default)]
    pub zone: Option<String>,
    /// The rack within the zone, if known.
    #[serde(default)]
    pub rack: Option<String>,
    /// Relative capacity, 1 to [`MAX_WEIGHT`]: a member of weight 2 holds
    /// about twice the replicas of a member of weight 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

impl Member {
    /// A member of weight 1 with no domain labels: it is alone in its zone
    /// and rack.
    pub fn new(id: NodeId) -> Self {
        Self {
            id,
            zone: None,
            rack: None,
            weight: 1,
        }
    }

    /// Sets the zone label.
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// Sets the rack label.
    pub fn with_rack(mut self, rack: impl Into<String>) -> Self {
        self.rack = Some(rack.into());
        self
    }

    /// Sets the weight.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// The zone as placement sees it (see the module doc): the labelled zone,
    /// else the unnamed zone of the labelled rack, else none shared with
    /// anyone.
    fn zone_key(&self) -> Option<ZoneKey> {
        match (&self.zone, &self.rack) {
            (Some(zone), _) => Some(ZoneKey::Named(zone.clone())),
            (None, Some(rack)) => Some(ZoneKey::OfRack(rack.clone())),
            (None, None) => None,
        }
    }

    /// The rack as placement sees it: scoped to the zone label.
    fn rack_key(&self) -> Option<RackKey> {
        self.rack
            .as_ref()
            .map(|rack| (self.zone.clone(), rack.clone()))
    }
}

/// A zone shared by several members.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum ZoneKey {
    /// A labelled zone.
    Named(String),
    /// The unlabelled zone of a labelled rack.
    OfRack(String),
}

/// A rack shared by several members: (zone label, rack label).
type RackKey = (Option<String>, String);

/// Checks a zone or rack label: a Kubernetes label value that is not empty.
fn check_domain_label(field: String, value: &str) -> Result<(), CoreError> {
    if value.is_empty() || value.len() > MAX_DOMAIN_LABEL_LEN {
        return Err(invalid_value(
            field,
            format!("{value:?} must be 1 to 63 characters (leave it out when unknown)"),
        ));
    }
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    let ends_ok = |b: Option<&u8>| b.is_some_and(u8::is_ascii_alphanumeric);
    if !ok_chars || !ends_ok(value.as_bytes().first()) || !ends_ok(value.as_bytes().last()) {
        return Err(invalid_value(
            field,
            format!(
                "{value:?} must be a label value: letters, digits, '-', '_' and '.', \
                 starting and ending with a letter or digit"
            ),
        ));
    }
    Ok(())
}

/// What identifies a replica set: everything in a [`ShardKey`] but the step.
///
/// Leaving the step out is what keeps every step of a rank on the same peers,
/// so that chunks unchanged since the previous step are already there.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PlacementKey {
    /// Who owns the job. Part of the key so that equally named jobs of two
    /// tenants spread independently.
    pub tenant: TenantName,
    /// Which training run.
    pub job: JobName,
    /// Which rank's state.
    pub rank: Rank,
}

impl From<&ShardKey> for PlacementKey {
    fn from(key: &ShardKey) -> Self {
        Self {
            tenant: key.tenant.clone(),
            job: key.job.clone(),
            rank: key.rank,
        }
    }
}

impl PlacementKey {
    /// The 64-bit seed every member's score is derived from. Length prefixes
    /// keep (`ab`, `c`) and (`a`, `bc`) apart.
    fn hash(&self) -> u64 {
        let mut hasher = blake3::Hasher::new_derive_key(KEY_CONTEXT);
        for part in [self.tenant.as_str(), self.job.as_str()] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        hasher.update(&self.rank.0.to_le_bytes());
        first_u64(hasher.finalize())
    }
}

fn first_u64(hash: blake3::Hash) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(bytes)
}

/// The hash of one virtual node of a member, fixed for the member's lifetime
/// so that its scores do not change when others join or leave.
fn virtual_node_hash(id: &NodeId, index: u32) -> u64 {
    let mut hasher = blake3::Hasher::new_derive_key(NODE_CONTEXT);
    hasher.update(&(id.as_str().len() as u64).to_le_bytes());
    hasher.update(id.as_str().as_bytes());
    hasher.update(&index.to_le_bytes());
    first_u64(hasher.finalize())
}

/// A member's score for a key: a full-avalanche bijective mix (the SplitMix64
/// finaliser) of the key hash and a virtual node hash. Both inputs are
/// uniform BLAKE3 output, and the mix makes the ranking of members for one
/// key unrelated to their ranking for any other.
fn score(key_hash: u64, node_hash: u64) -> u64 {
    let mut z = key_hash ^ node_hash;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The members placement chooses from, with their failure domains indexed.
///
/// Members are kept sorted by id, so everything computed from a membership is
/// independent of the order the members were listed in.
#[derive(Clone, Debug)]
pub struct Membership {
    /// Sorted by id, no duplicates.
    members: Vec<Member>,
    /// Hashes of every member's virtual nodes, member after member.
    virtual_nodes: Vec<u64>,
    /// `virtual_nodes[ends[i - 1]..ends[i]]` belong to member `i`.
    ends: Vec<usize>,
    /// Zone index of each member; members without a shared zone get one of
    /// their own.
    zone_of: Vec<u32>,
    /// Rack index of each member, likewise.
    rack_of: Vec<u32>,
    /// Members per zone index.
    zone_sizes: Vec<u32>,
    /// Members per rack index.
    rack_sizes: Vec<u32>,
    /// Index of each shared zone.
    zone_index: HashMap<ZoneKey, u32>,
    /// Index of each shared rack.
    rack_index: HashMap<RackKey, u32>,
    /// Whether every member has weight 1 (one virtual node each), which
    /// allows a tighter scoring loop.
    uniform: bool,
}

/// Assigns `key`'s domain index: shared keys get one index each, a member
/// without a key gets a fresh index of its own.
fn domain_index<K: std::hash::Hash + Eq>(
    key: Option<K>,
    index: &mut HashMap<K, u32>,
    sizes: &mut Vec<u32>,
) -> u32 {
    let next = sizes.len() as u32;
    let id = match key {
        Some(key) => *index.entry(key).or_insert(next),
        None => next,
    };
    if id == next {
        sizes.push(0);
    }
    sizes[id as usize] = sizes[id as usize].saturating_add(1);
    id
}

impl Membership {
    /// Builds a membership from a list of members in any order.
    ///
    /// Rejects a node listed twice (naming it), a weight outside 1 to
    /// [`MAX_WEIGHT`] and a zone or rack label that is empty or not a
    /// Kubernetes label value; the error names the list entry as
    /// `members[i]`.
    pub fn new(members: Vec<Member>) -> Result<Self, CoreError> {
        for (i, member) in members.iter().enumerate() {
            if !(1..=MAX_WEIGHT).contains(&member.weight) {
                return Err(invalid_value(
                    format!("members[{i}].weight"),
                    format!(
                        "node {} has weight {}, must be 1 to {MAX_WEIGHT}",
                        member.id, member.weight
                    ),
                ));
            }
            if let Some(zone) = &member.zone {
                check_domain_label(format!("members[{i}].zone"), zone)?;
            }
            if let Some(rack) = &member.rack {
                check_domain_label(format!("members[{i}].rack"), rack)?;
            }
        }
        let mut members = members;
        members.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(pair) = members.windows(2).find(|pair| pair[0].id == pair[1].id) {
            return Err(invalid_value(
                "members".to_owned(),
                format!("node {} is listed more than once", pair[0].id),
            ));
        }

        let mut virtual_nodes = Vec::with_capacity(members.len());
        let mut ends = Vec::with_capacity(members.len());
        let mut zone_of = Vec::with_capacity(members.len());
        let mut rack_of = Vec::with_capacity(members.len());
        let mut zone_sizes = Vec::new();
        let mut rack_sizes = Vec::new();
        let mut zone_index = HashMap::new();
        let mut rack_index = HashMap::new();
        for member in &members {
            virtual_nodes.extend((0..member.weight).map(|v| virtual_node_hash(&member.id, v)));
            ends.push(virtual_nodes.len());
            zone_of.push(domain_index(
                member.zone_key(),
                &mut zone_index,
                &mut zone_sizes,
            ));
            rack_of.push(domain_index(
                member.rack_key(),
                &mut rack_index,
                &mut rack_sizes,
            ));
        }
        Ok(Self {
            uniform: virtual_nodes.len() == members.len(),
            members,
            virtual_nodes,
            ends,
            zone_of,
            rack_of,
            zone_sizes,
            rack_sizes,
            zone_index,
            rack_index,
        })
    }

    /// The members, sorted by id.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// How many members there are.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The member named `id`, e.g. to pass as the owner of [`Self::place`].
    pub fn get(&self, id: &NodeId) -> Option<&Member> {
        self.position(id).map(|i| &self.members[i])
    }

    fn position(&self, id: &NodeId) -> Option<usize> {
        self.members.binary_search_by(|m| m.id.cmp(id)).ok()
    }

    /// The nodes that hold the replicas of `key`, whose primary copy lives on
    /// `owner`, in preference order.
    ///
    /// Returns `min(replicas, eligible)` distinct nodes, where the eligible
    /// members are all members except the owner: fewer than asked for when
    /// the membership is too small, and none for an empty membership. The
    /// owner is never returned. Placement follows the zone and rack spread
    /// rule of the module doc, counting the owner's zone and rack as taken.
    ///
    /// The owner's labels are taken from `owner`, not looked up, and it need
    /// not be a member: to find the replicas of a node that has left, pass
    /// the labels it had (keep them with the shard's replication state). The
    /// owner's membership therefore never changes the answer.
    ///
    /// Costs one BLAKE3 hash plus one integer mix per unit of weight in the
    /// membership, and allocates only for the few best-ranked members in the
    /// usual case (a few members per failure domain asked for).
    pub fn place(&self, key: &PlacementKey, owner: &Member, replicas: usize) -> Vec<NodeId> {
        self.place_indices(key, owner, replicas)
            .into_iter()
            .map(|i| self.members[i].id.clone())
            .collect()
    }

    /// [`Self::place`], as indices into [`Self::members`].
    fn place_indices(&self, key: &PlacementKey, owner: &Member, replicas: usize) -> Vec<usize> {
        let owner_index = self.position(&owner.id);
        // The owner, when a member, is one of `len()`: never saturates.
        let eligible = self
            .len()
            .saturating_sub(usize::from(owner_index.is_some()));
        let replicas = replicas.min(eligible);
        if replicas == 0 {
            return Vec::new();
        }
        let owner_zone = owner
            .zone_key()
            .and_then(|k| self.zone_index.get(&k).copied());
        let owner_rack = owner
            .rack_key()
            .and_then(|k| self.rack_index.get(&k).copied());
        let free_zones = free_domains(
            &self.zone_sizes,
            owner_index.map(|i| self.zone_of[i]),
            owner_zone,
        );
        let free_racks = free_domains(
            &self.rack_sizes,
            owner_index.map(|i| self.rack_of[i]),
            owner_rack,
        );

        let mut ranking = Ranking::new(self, key.hash(), owner_index, replicas);
        let mut picks: Vec<usize> = Vec::with_capacity(replicas);
        let mut used_zones: Vec<u32> = owner_zone.into_iter().collect();
        let mut used_racks: Vec<u32> = owner_rack.into_iter().collect();
        // Each pass stops as soon as no further pick is possible, so that the
        // usual case never looks past the first few ranked members.
        for (pass, limit) in [
            (Pass::NewZone, free_zones),
            (Pass::NewRack, free_racks),
            (Pass::Any, eligible),
        ] {
            let limit = limit.min(replicas);
            let mut position = 0;
            while picks.len() < limit {
                let Some(candidate) = ranking.get(position) else {
                    break;
                };
                position = position.saturating_add(1);
                let (zone, rack) = (self.zone_of[candidate], self.rack_of[candidate]);
                let allowed = match pass {
                    Pass::NewZone => !used_zones.contains(&zone),
                    Pass::NewRack => !used_racks.contains(&rack),
                    Pass::Any => !picks.contains(&candidate),
                };
                if allowed {
                    picks.push(candidate);
                    used_zones.push(zone);
                    used_racks.push(rack);
                }
            }
        }
        debug_assert_eq!(picks.len(), replicas, "every eligible member is reachable");
        picks
    }
}

/// The greedy passes of [`Membership::place`].
#[derive(Clone, Copy)]
enum Pass {
    NewZone,
    NewRack,
    Any,
}

/// How many domains hold at least one eligible member and are not the
/// owner's: all domains, less the owner's own when it is its only member,
/// less the domain of the owner's labels.
fn free_domains(
    sizes: &[u32],
    owner_member_domain: Option<u32>,
    owner_domain: Option<u32>,
) -> usize {
    let emptied = owner_member_domain.filter(|&d| sizes[d as usize] == 1);
    // Neither saturates: `emptied` and `owner_domain` are distinct domains
    // among `sizes`.
    let mut free = sizes.len().saturating_sub(usize::from(emptied.is_some()));
    if owner_domain.is_some() && owner_domain != emptied {
        free = free.saturating_sub(1);
    }
    free
}

/// Eligible members in ranking order (highest score first, then lowest id),
/// materialised lazily: only the best few at first, more when a pass needs
/// to look further.
struct Ranking<'a> {
    membership: &'a Membership,
    key_hash: u64,
    owner: Option<usize>,
    /// The best `ranked.len()` eligible members, best first.
    ranked: Vec<RankEntry>,
    /// Whether `ranked` holds every eligible member.
    complete: bool,
}

/// A member's place in the ranking: ordered best first.
type RankEntry = (Reverse<u64>, usize);

/// The best `top` eligible members seen so far, worst on top of the heap.
struct Best {
    heap: BinaryHeap<RankEntry>,
    top: usize,
    owner: Option<usize>,
}

impl Best {
    /// Considers `member` with `score`; returns the lowest score that can
    /// still get in.
    fn offer(&mut self, score: u64, member: usize) -> u64 {
        let entry = (Reverse(score), member);
        if Some(member) != self.owner {
            if self.heap.len() < self.top {
                self.heap.push(entry);
            } else if let Some(mut worst) = self.heap.peek_mut()
                && entry < *worst
            {
                *worst = entry;
            }
        }
        match self.heap.peek() {
            Some(&(Reverse(lowest), _)) if self.heap.len() == self.top => lowest,
            _ => 0,
        }
    }
}

impl<'a> Ranking<'a> {
    fn new(
        membership: &'a Membership,
        key_hash: u64,
        owner: Option<usize>,
        replicas: usize,
    ) -> Self {
        let mut ranking = Self {
            membership,
            key_hash,
            owner,
            ranked: Vec::new(),
            complete: false,
        };
        // Enough that the passes over a handful of zones almost never need
        // more: with four equal zones and the owner in one, the chance that
        // the best 28 miss one of the other three is about 0.1%.
        ranking.collect(replicas.saturating_mul(4).saturating_add(16));
        ranking
    }

    /// Replaces `ranked` with the best `top` eligible members.
    ///
    /// One pass over every virtual node, keeping the best `top` in a bounded
    /// heap whose worst entry is the bar to beat: most members score below it
    /// and cost one mix and one comparison.
    fn collect(&mut self, top: usize) {
        let membership = self.membership;
        let eligible = membership
            .len()
            .saturating_sub(usize::from(self.owner.is_some()));
        let mut best = Best {
            heap: BinaryHeap::with_capacity(top.min(eligible).saturating_add(1)),
            top: top.min(eligible),
            owner: self.owner,
        };
        let mut bar = 0;
        if membership.uniform {
            // One virtual node per member: the hot loop of every placement.
            // Scores are computed a block at a time so the mixing vectorises.
            const BLOCK: usize = 64;
            let mut scores = [0u64; BLOCK];
            let blocks = (0..)
                .step_by(BLOCK)
                .zip(membership.virtual_nodes.chunks(BLOCK));
            for (first, nodes) in blocks {
                for (score_slot, &node) in scores.iter_mut().zip(nodes) {
                    *score_slot = score(self.key_hash, node);
                }
                for (member, &score) in (first..).zip(&scores[..nodes.len()]) {
                    if score >= bar {
                        bar = best.offer(score, member);
                    }
                }
            }
        } else {
            let mut start = 0;
            for (member, &end) in membership.ends.iter().enumerate() {
                let score = membership.virtual_nodes[start..end]
                    .iter()
                    .fold(0, |best, &node| best.max(score(self.key_hash, node)));
                start = end;
                if score >= bar {
                    bar = best.offer(score, member);
                }
            }
        }
        self.ranked = best.heap.into_sorted_vec();
        self.complete = self.ranked.len() == eligible;
    }

    /// The member ranked `position` (0 is best), or `None` past the last.
    fn get(&mut self, position: usize) -> Option<usize> {
        if position >= self.ranked.len() && !self.complete {
            // Rare: widen fourfold, so that even walking the whole ranking
            // costs a few passes over the membership, not one per position.
            self.collect(position.max(self.ranked.len()).saturating_mul(4));
        }
        self.ranked.get(position).map(|&(_, member)| member)
    }
}

#[cfg(test)]
#[allow(
    clippy::arithmetic_side_effects,
    reason = "tests compute expected values from small, known inputs"
)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::names::Step;

    fn node(s: &str) -> NodeId {
        s.parse().expect("valid node id")
    }

    fn key(job: &str, rank: u32) -> PlacementKey {
        PlacementKey {
            tenant: "team-a".parse().expect("valid tenant"),
            job: job.parse().expect("valid job"),
            rank: Rank(rank),
        }
    }

    /// `zones` zones of `racks` racks of `per_rack` nodes, named `z{z}-r{r}-n{n}`.
    fn grid(zones: usize, racks: usize, per_rack: usize) -> Vec<Member> {
        let mut members = Vec::new();
        for z in 0..zones {
            for r in 0..racks {
                for n in 0..per_rack {
                    members.push(
                        Member::new(node(&format!("z{z}-r{r}-n{n}")))
                            .with_zone(format!("zone-{z}"))
                            .with_rack(format!("rack-{r}")),
                    );
                }
            }
        }
        members
    }

    /// The rules of the module doc, written the slow and obvious way: rank
    /// everybody, then walk the whole ranking three times.
    fn reference_place(
        membership: &Membership,
        key: &PlacementKey,
        owner: &Member,
        replicas: usize,
    ) -> Vec<NodeId> {
        let key_hash = key.hash();
        let mut ranked: Vec<(Reverse<u64>, &Member)> = membership
            .members()
            .iter()
            .filter(|m| m.id != owner.id)
            .map(|m| {
                let best = (0..m.weight)
                    .map(|v| score(key_hash, virtual_node_hash(&m.id, v)))
                    .max()
                    .expect("weight is at least 1");
                (Reverse(best), m)
            })
            .collect();
        ranked.sort_by(|a, b| (a.0, &a.1.id).cmp(&(b.0, &b.1.id)));
        let mut picks: Vec<&Member> = Vec::new();
        let mut zones = vec![owner.zone_key()];
        let mut racks = vec![owner.rack_key()];
        for pass in 0..3 {
            for (_, m) in &ranked {
                if picks.len() == replicas {
                    break;
                }
                let fresh = match pass {
                    0 => m.zone_key().is_none() || !zones.contains(&m.zone_key()),
                    1 => m.rack_key().is_none() || !racks.contains(&m.rack_key()),
                    _ => true,
                };
                let allowed = fresh && !picks.iter().any(|p| p.id == m.id);
                if allowed {
                    picks.push(m);
                    zones.push(m.zone_key());
                    racks.push(m.rack_key());
                }
            }
        }
        picks.into_iter().map(|m| m.id.clone()).collect()
    }

    #[test]
    fn node_ids_are_dns_subdomains() {
        for good in ["a", "gpu-01", "node-7.cluster.local", &"a".repeat(63)] {
            assert!(NodeId::parse("node", good.into()).is_ok(), "{good:?}");
        }
        let long = vec!["a".repeat(63); 4].join("."); // 255 characters
        for bad in [
            "",
            "Node1",
            "-a",
            "a-",
            "a..b",
            ".a",
            "a.",
            "a_b",
            "a b",
            "é",
            &"a".repeat(64),
            &long,
        ] {
            assert!(NodeId::parse("node", bad.into()).is_err(), "{bad:?}");
        }
        let err = NodeId::parse("peers[0]", "Bad_Node".into()).expect_err("must fail");
        assert!(
            err.to_string().starts_with("invalid peers[0] \"Bad_Node\""),
            "{err}"
        );
    }

    #[test]
    fn membership_rejects_duplicates_naming_the_node() {
        let members = vec![
            Member::new(node("b")),
            Member::new(node("a")).with_zone("z1"),
            Member::new(node("a")).with_zone("z2"),
        ];
        let err = Membership::new(members).expect_err("duplicate");
        assert_eq!(
            err.to_string(),
            "invalid members: node a is listed more than once"
        );
    }

    #[test]
    fn membership_rejects_bad_weights_and_labels() {
        let cases = [
            (Member::new(node("a")).with_weight(0), "members[1].weight"),
            (Member::new(node("a")).with_weight(65), "members[1].weight"),
            (Member::new(node("a")).with_zone(""), "members[1].zone"),
            (
                Member::new(node("a")).with_rack("rack 1"),
                "members[1].rack",
            ),
            (Member::new(node("a")).with_zone("-a"), "members[1].zone"),
        ];
        for (bad, field) in cases {
            let err = Membership::new(vec![Member::new(node("b")), bad]).expect_err("invalid");
            assert!(
                err.to_string().starts_with(&format!("invalid {field}:")),
                "{err}"
            );
        }
    }

    #[test]
    fn small_memberships_give_what_they_can() {
        let owner = Member::new(node("owner"));
        let empty = Membership::new(Vec::new()).expect("valid");
        assert!(empty.place(&key("j", 0), &owner, 3).is_empty());
        let alone = Membership::new(vec![owner.clone()]).expect("valid");
        assert!(alone.place(&key("j", 0), &owner, 3).is_empty());
        let two = Membership::new(vec![owner.clone(), Member::new(node("peer"))]).expect("valid");
        assert_eq!(two.place(&key("j", 0), &owner, 3), vec![node("peer")]);
        assert!(two.place(&key("j", 0), &owner, 0).is_empty());
    }

    #[test]
    fn every_step_of_a_rank_goes_to_the_same_peers() {
        let shard = |step| ShardKey {
            tenant: "team-a".parse().expect("valid"),
            job: "llama".parse().expect("valid"),
            step: Step(step),
            rank: Rank(3),
        };
        assert_eq!(
            PlacementKey::from(&shard(10)),
            PlacementKey::from(&shard(11))
        );
        assert_eq!(PlacementKey::from(&shard(10)), key("llama", 3));
    }

    #[test]
    fn replicas_avoid_the_owners_zone_and_each_other() {
        let membership = Membership::new(grid(4, 3, 5)).expect("valid");
        let owner = membership.get(&node("z0-r0-n0")).expect("member").clone();
        for rank in 0..200 {
            let placed = membership.place(&key("spread", rank), &owner, 3);
            let zones: BTreeSet<&str> = placed.iter().map(|id| &id.as_str()[..2]).collect();
            assert_eq!(zones.len(), 3, "{placed:?}");
            assert!(!zones.contains("z0"), "{placed:?}");
        }
        // Four replicas from three other zones: the fourth goes to a fresh
        // rack, possibly in the owner's zone but never in the owner's rack.
        for rank in 0..200 {
            let placed = membership.place(&key("spread", rank), &owner, 4);
            let racks: BTreeSet<&str> = placed.iter().map(|id| &id.as_str()[..5]).collect();
            assert_eq!(racks.len(), 4, "{placed:?}");
            assert!(!racks.contains("z0-r0"), "{placed:?}");
        }
    }

    #[test]
    fn a_departed_owner_places_as_it_did_while_a_member() {
        let members = grid(3, 2, 4);
        let owner = members[5].clone();
        let with = Membership::new(members.clone()).expect("valid");
        let without: Vec<Member> = members.into_iter().filter(|m| m.id != owner.id).collect();
        let without = Membership::new(without).expect("valid");
        for rank in 0..100 {
            let k = key("gone", rank);
            assert_eq!(with.place(&k, &owner, 2), without.place(&k, &owner, 2));
        }
    }

    #[test]
    fn weight_scales_the_share_of_replicas() {
        let mut members: Vec<Member> = (0..9)
            .map(|i| Member::new(node(&format!("n{i}"))))
            .collect();
        members.push(Member::new(node("heavy")).with_weight(3));
        let membership = Membership::new(members).expect("valid");
        let owner = Member::new(node("elsewhere"));
        let keys = 24_000;
        let heavy = (0..keys)
            .filter(|&r| membership.place(&key("w", r), &owner, 1)[0] == node("heavy"))
            .count();
        // Expected share 3/12 = 6,000 of 24,000; five standard deviations is
        // about 340.
        assert!((5_660..=6_340).contains(&heavy), "{heavy}");
    }

    /// Placement is part of the protocol between nodes: a change to the hash
    /// inputs, the score or the rules must fail here and bump
    /// `PLACEMENT_VERSION`.
    #[test]
    fn placement_is_stable_across_releases() {
        let membership = Membership::new(grid(3, 2, 2)).expect("valid");
        let owner = membership.get(&node("z0-r0-n0")).expect("member").clone();
        let placed: Vec<Vec<String>> = (0..4)
            .map(|rank| {
                membership
                    .place(&key("golden", rank), &owner, 3)
                    .into_iter()
                    .map(String::from)
                    .collect()
            })
            .collect();
        assert_eq!(PLACEMENT_VERSION, 1);
        assert_eq!(placed, GOLDEN);
    }

    /// Owner in zone 0, rack 0; three replicas from two other zones: one in
    /// each, then a fresh rack of the owner's zone.
    const GOLDEN: [[&str; 3]; 4] = [
        ["z1-r1-n1", "z2-r1-n1", "z0-r1-n0"],
        ["z2-r1-n1", "z1-r0-n0", "z0-r1-n1"],
        ["z1-r0-n0", "z2-r0-n1", "z0-r1-n1"],
        ["z2-r1-n0", "z1-r1-n1", "z0-r1-n1"],
    ];

    /// A membership of up to 24 nodes over a few zones and racks, some
    /// unlabelled, some weighted.
    fn members_strategy() -> impl Strategy<Value = Vec<Member>> {
        proptest::collection::btree_map(
            0u32..64,
            (
                proptest::option::weighted(0.8, 0u8..4),
                proptest::option::weighted(0.8, 0u8..3),
                prop_oneof![4 => Just(1u32), 1 => 2u32..4],
            ),
            0..24,
        )
        .prop_map(|entries| {
            entries
                .into_iter()
                .map(|(id, (zone, rack, weight))| Member {
                    id: node(&format!("node-{id}")),
                    zone: zone.map(|z| format!("zone-{z}")),
                    rack: rack.map(|r| format!("rack-{r}")),
                    weight,
                })
                .collect()
        })
    }

    /// A placement problem: the members, the owner (a member, a member whose
    /// labels have changed since, or a node that is not a member), a key and
    /// a replica count.
    fn problem() -> impl Strategy<Value = (Vec<Member>, Member, PlacementKey, usize)> {
        (
            members_strategy(),
            any::<prop::sample::Index>(),
            0u8..3,
            proptest::option::of(0u8..4),
            proptest::option::of(0u8..3),
            "[a-z]{1,6}",
            0u32..1000,
            0usize..6,
        )
            .prop_map(|(members, pick, kind, zone, rack, job, rank, replicas)| {
                let labelled = |id| Member {
                    id,
                    zone: zone.map(|z| format!("zone-{z}")),
                    rack: rack.map(|r| format!("rack-{r}")),
                    weight: 1,
                };
                let owner = match (kind, members.is_empty()) {
                    (0, false) => members[pick.index(members.len())].clone(),
                    (1, false) => labelled(members[pick.index(members.len())].id.clone()),
                    _ => labelled(node("outsider")),
                };
                (members, owner, key(&job, rank), replicas)
            })
    }

    fn distinct_free<K: Eq + std::hash::Hash>(
        eligible: &[&Member],
        domain: impl Fn(&Member) -> Option<K>,
        owner: &Member,
    ) -> usize {
        let owner_domain = domain(owner);
        let mut shared = std::collections::HashSet::new();
        let mut alone = 0;
        for m in eligible {
            match domain(m) {
                None => alone += 1,
                Some(d) if Some(&d) == owner_domain.as_ref() => {}
                Some(d) => {
                    shared.insert(d);
                }
            }
        }
        shared.len() + alone
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn matches_the_reference_rules((members, owner, key, replicas) in problem()) {
            let membership = Membership::new(members).expect("valid");
            prop_assert_eq!(
                membership.place(&key, &owner, replicas),
                reference_place(&membership, &key, &owner, replicas)
            );
        }

        #[test]
        fn member_order_does_not_matter(
            (members, owner, key, replicas) in problem(),
            seed in any::<u64>(),
        ) {
            let mut shuffled = members.clone();
            // A cheap deterministic shuffle: sort by a keyed hash of the id.
            shuffled.sort_by_key(|m| score(seed, virtual_node_hash(&m.id, 7)));
            let a = Membership::new(members).expect("valid").place(&key, &owner, replicas);
            let b = Membership::new(shuffled).expect("valid").place(&key, &owner, replicas);
            prop_assert_eq!(a, b);
        }

        #[test]
        fn distinct_peers_never_the_owner_as_many_as_possible(
            (members, owner, key, replicas) in problem(),
        ) {
            let membership = Membership::new(members).expect("valid");
            let placed = membership.place(&key, &owner, replicas);
            let eligible = membership.members().iter().filter(|m| m.id != owner.id).count();
            prop_assert_eq!(placed.len(), replicas.min(eligible));
            prop_assert!(!placed.contains(&owner.id));
            let distinct: BTreeSet<&NodeId> = placed.iter().collect();
            prop_assert_eq!(distinct.len(), placed.len());
        }

        /// The spread rule of the module doc: the first `min(R, Zf)` replicas
        /// in distinct zones other than the owner's, the first `min(R, Rf)`
        /// in distinct racks other than the owner's.
        #[test]
        fn replicas_spread_over_zones_then_racks((members, owner, key, replicas) in problem()) {
            let membership = Membership::new(members).expect("valid");
            let placed: Vec<&Member> = membership
                .place(&key, &owner, replicas)
                .iter()
                .map(|id| membership.get(id).expect("placed on a member"))
                .collect();
            let eligible: Vec<&Member> =
                membership.members().iter().filter(|m| m.id != owner.id).collect();
            let free_zones = distinct_free(&eligible, Member::zone_key, &owner);
            let spread = &placed[..free_zones.min(placed.len())];
            for (i, m) in spread.iter().enumerate() {
                if let Some(d) = m.zone_key() {
                    prop_assert!(Some(&d) != owner.zone_key().as_ref(), "{:?} shares the owner's zone", m.id);
                    prop_assert!(spread[..i].iter().all(|p| p.zone_key() != Some(d.clone())), "{:?} shares a zone", m.id);
                }
            }
            let free_racks = distinct_free(&eligible, Member::rack_key, &owner);
            let spread = &placed[..free_racks.min(placed.len())];
            for (i, m) in spread.iter().enumerate() {
                if let Some(d) = m.rack_key() {
                    prop_assert!(Some(&d) != owner.rack_key().as_ref(), "{:?} shares the owner's rack", m.id);
                    prop_assert!(spread[..i].iter().all(|p| p.rack_key() != Some(d.clone())), "{:?} shares a rack", m.id);
                }
            }
        }

        /// Asking for one more replica only appends the next candidate.
        #[test]
        fn more_replicas_extend_the_list((members, owner, key, replicas) in problem()) {
            let membership = Membership::new(members).expect("valid");
            let fewer = membership.place(&key, &owner, replicas);
            let more = membership.place(&key, &owner, replicas + 1);
            prop_assert_eq!(&more[..fewer.len()], &fewer[..]);
        }

        /// A joining node takes replicas only from others; nothing else moves.
        #[test]
        fn a_join_moves_replicas_only_onto_the_new_node(
            (members, owner, key, replicas) in problem(),
            zone in proptest::option::weighted(0.8, 0u8..4),
            rack in proptest::option::weighted(0.8, 0u8..3),
            weight in 1u32..4,
        ) {
            let joiner = Member {
                id: node("joiner"),
                zone: zone.map(|z| format!("zone-{z}")),
                rack: rack.map(|r| format!("rack-{r}")),
                weight,
            };
            let before = Membership::new(members.clone()).expect("valid").place(&key, &owner, replicas);
            let mut grown = members;
            grown.push(joiner.clone());
            let after = Membership::new(grown).expect("valid").place(&key, &owner, replicas);
            let before: BTreeSet<NodeId> = before.into_iter().collect();
            let after: BTreeSet<NodeId> = after.into_iter().collect();
            for id in after.difference(&before) {
                prop_assert_eq!(id, &joiner.id, "a replica moved to a node that was already there");
            }
            if !after.contains(&joiner.id) {
                prop_assert_eq!(after, before);
            }
        }

        /// A leaving node's replicas are re-placed; every other replica stays.
        #[test]
        fn a_leave_moves_only_the_leavers_replicas(
            (members, owner, key, replicas) in problem(),
            zone in proptest::option::weighted(0.8, 0u8..4),
            rack in proptest::option::weighted(0.8, 0u8..3),
            weight in 1u32..4,
        ) {
            let leaver = Member {
                id: node("leaver"),
                zone: zone.map(|z| format!("zone-{z}")),
                rack: rack.map(|r| format!("rack-{r}")),
                weight,
            };
            let after = Membership::new(members.clone()).expect("valid").place(&key, &owner, replicas);
            let mut full = members;
            full.push(leaver.clone());
            let before = Membership::new(full).expect("valid").place(&key, &owner, replicas);
            let leaver = leaver.id;
            let before: BTreeSet<NodeId> = before.into_iter().collect();
            let after: BTreeSet<NodeId> = after.into_iter().collect();
            for id in before.difference(&after) {
                prop_assert_eq!(id, &leaver, "a replica left a node that stayed");
            }
            if !before.contains(&leaver) {
                prop_assert_eq!(after, before);
            }
        }
    }
}
