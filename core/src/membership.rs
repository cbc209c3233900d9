//! Membership: which daemons take part in the peer tier, as one validated,
//! comparable view.
//!
//! The daemon learns about its peers from one of three sources (a static
//! list, the A records of a headless Service, or the Kubernetes API); the
//! I/O lives in `cairn-daemon`'s `membership` module. Everything those
//! sources report is turned into a [`MembershipView`] here, by pure
//! functions, so the rules are the same whatever the source and can be
//! tested without a cluster:
//!
//! - [`view_from_pods`]: the DaemonSet's pods and their nodes' labels. A pod
//!   counts only while it is ready, not being deleted, and has an IP and a
//!   node; one member per node (the daemon is a DaemonSet, so two pods on a
//!   node only happen during a rolling update); the node's zone comes from
//!   `topology.kubernetes.io/zone` and its rack from a configurable label.
//! - [`view_from_static`]: a list from the configuration.
//! - [`view_from_addresses`]: the addresses a DNS name resolves to. A records
//!   carry no node names and no labels, so each address is its own member,
//!   named after the address, with no zone or rack (placement then treats
//!   every member as its own failure domain).
//!
//! A view is sorted by node id and never names a node twice, so two daemons
//! that see the same pods build equal views and place replicas identically
//! (see `placement`). [`MembershipDiff`] says what changed between two
//! views; the peer tier uses it to re-replicate what a leaving member held.
//!
//! # Invariants
//!
//! - `view_from_pods` depends only on the *sets* of pods and nodes, never on
//!   their order (property-tested).
//! - `old.diff(&new).apply(&old) == new` for any two views (property-tested).
//! - When a member leaves, only the replicas it held move (property-tested
//!   against [`Membership::place`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::placement::{MAX_WEIGHT, Member, Membership, NodeId};

/// The well-known Kubernetes label for a node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The default label for a node's rack. Kubernetes has no well-known rack
/// label; clusters that label racks under another key configure it.
pub const DEFAULT_RACK_LABEL: &str = "topology.cairn.dev/rack";

/// Longest label key accepted: a 253-character DNS prefix, `/`, and a
/// 63-character name, as Kubernetes allows.
pub const MAX_LABEL_KEY_LEN: usize = 253 + 1 + 63;

fn invalid_value(field: impl Into<String>, reason: impl Into<String>) -> CoreError {
    CoreError::InvalidValue {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Which node labels name a node's failure domains.
///
/// Configurable because only the zone label is standard; a cluster that
/// labels racks under its own key says so here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologyLabels {
    zone: String,
    rack: String,
}

impl Default for TopologyLabels {
    fn default() -> Self {
        Self {
            zone: ZONE_LABEL.to_owned(),
            rack: DEFAULT_RACK_LABEL.to_owned(),
        }
    }
}

impl TopologyLabels {
    /// Validates both keys as Kubernetes label keys (`[prefix/]name`); the
    /// error names `zone_field` or `rack_field`.
    pub fn new(
        zone_field: &str,
        zone: String,
        rack_field: &str,
        rack: String,
    ) -> Result<Self, CoreError> {
        check_label_key(zone_field, &zone)?;
        check_label_key(rack_field, &rack)?;
        if zone == rack {
            return Err(invalid_value(
                rack_field,
                format!("{rack:?} is also the zone label; zone and rack must differ"),
            ));
        }
        Ok(Self { zone, rack })
    }

    /// The label holding the zone.
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// The label holding the rack.
    pub fn rack(&self) -> &str {
        &self.rack
    }
}

/// Checks a Kubernetes label key: an optional DNS-subdomain prefix and `/`,
/// then a name of 1 to 63 letters, digits, `-`, `_` and `.`, starting and
/// ending with a letter or digit. A typo here silently drops every node's
/// domains, so it is caught at start instead.
pub fn check_label_key(field: &str, key: &str) -> Result<(), CoreError> {
    let fail = |reason: &str| invalid_value(field, format!("{key:?} {reason}"));
    if key.len() > MAX_LABEL_KEY_LEN {
        return Err(fail("is too long for a label key"));
    }
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        NodeId::parse(field, prefix.to_owned())
            .map_err(|_| fail("has a prefix that is not a DNS subdomain"))?;
    }
    if name.is_empty() || !is_label_value(name) {
        return Err(fail(
            "is not a label key: [prefix/]name, the name 1 to 63 letters, digits, \
             '-', '_' and '.', starting and ending with a letter or digit",
        ));
    }
    Ok(())
}

/// Checks a Kubernetes label value: empty, or 1 to 63 letters, digits, `-`,
/// `_` and `.`, starting and ending with a letter or digit. Used for label
/// selectors, whose values a typo would turn into "matches nothing".
pub fn check_label_value(field: &str, value: &str) -> Result<(), CoreError> {
    if is_label_value(value) {
        return Ok(());
    }
    Err(invalid_value(
        field,
        format!(
            "{value:?} is not a label value: at most 63 letters, digits, '-', '_' and '.', \
             starting and ending with a letter or digit"
        ),
    ))
}

fn is_label_value(value: &str) -> bool {
    let ends_ok = |b: Option<&u8>| b.is_some_and(u8::is_ascii_alphanumeric);
    value.is_empty()
        || (value.len() <= 63
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && ends_ok(value.as_bytes().first())
            && ends_ok(value.as_bytes().last()))
}

/// What the Kubernetes source reports about one pod of the DaemonSet, reduced
/// to what membership needs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodInfo {
    /// The pod's name (unique within its namespace); breaks ties between two
    /// pods on one node.
    pub name: String,
    /// The node the pod is scheduled on (`spec.nodeName`), once scheduled.
    pub node_name: Option<String>,
    /// The pod's IP (`status.podIP`), once it has one.
    pub pod_ip: Option<IpAddr>,
    /// Whether the pod's `Ready` condition is true: a daemon that is not
    /// ready cannot take replicas.
    pub ready: bool,
    /// Whether the pod is being deleted (`metadata.deletionTimestamp`): it
    /// may still answer for its grace period, but must not be given new
    /// replicas.
    pub deleting: bool,
    /// Whether the pod is Cairn's node agent: controlled by the Cairn
    /// DaemonSet (its controller owner reference), not merely carrying its
    /// labels. A stray pod with the same labels (a debug pod, another
    /// workload) must never become a node's member.
    pub daemon_pod: bool,
}

/// What the Kubernetes source reports about one node: its name and labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeInfo {
    /// The node's name.
    pub name: String,
    /// The node's labels; only the two [`TopologyLabels`] are read.
    pub labels: BTreeMap<String, String>,
}

/// One entry of a static membership list, as written in the configuration.
///
/// `address` is an IP literal, with or without a port (`10.0.0.7`,
/// `10.0.0.7:7070`, `[fd00::7]:7070`); without one the peer port of the
/// cluster applies. Host names are refused: a static list is for places
/// without DNS, and a name that resolved differently on two nodes would
/// split the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StaticPeer {
    /// The node's id (a DNS-1123 subdomain, as placement requires).
    pub id: String,
    /// Where its daemon listens.
    pub address: String,
    /// Its zone, if known.
    #[serde(default)]
    pub zone: Option<String>,
    /// Its rack, if known.
    #[serde(default)]
    pub rack: Option<String>,
    /// Its relative capacity (1 when left out).
    #[serde(default)]
    pub weight: Option<u32>,
}

/// A member of the peer tier and where to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The node, with the failure domains placement uses.
    pub member: Member,
    /// The daemon's IP address.
    pub ip: IpAddr,
    /// The daemon's peer port, where the source knows it (a static list may
    /// say; pods and DNS records do not). `None`: the cluster's peer port.
    pub port: Option<u16>,
}

impl Peer {
    /// The node's id.
    pub fn id(&self) -> &NodeId {
        &self.member.id
    }

    /// The socket address to dial, with `default_port` where the source gave
    /// none.
    pub fn socket_addr(&self, default_port: u16) -> SocketAddr {
        SocketAddr::new(self.ip, self.port.unwrap_or(default_port))
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.member.id, self.ip)?;
        if let Some(port) = self.port {
            write!(f, " port {port}")?;
        }
        Ok(())
    }
}

/// Members that dropped out of the source's view, kept in the published
/// view for a grace period: a member that blinks (a pod NotReady for a few
/// seconds, a daemon restarting, a rolling update) must not make every node
/// re-copy what it holds, and then leave extra copies when it returns.
///
/// Pure: the caller passes the clock (any monotonic count, in milliseconds).
#[derive(Clone, Debug, Default)]
pub struct DepartureGrace {
    /// Each departed member as last seen, and when it left the source's view.
    departed: BTreeMap<NodeId, (Peer, u64)>,
}

impl DepartureGrace {
    /// The view to publish: `current` (what the source sees now) plus the
    /// members of `previous` that left it less than `grace_ms` ago; and
    /// when (in the caller's clock) the next of those runs out, if any. A
    /// member back in `current` is forgotten as departed.
    pub fn apply(
        &mut self,
        previous: &MembershipView,
        current: MembershipView,
        now_ms: u64,
        grace_ms: u64,
    ) -> (MembershipView, Option<u64>) {
        for peer in previous.peers() {
            if current.get(peer.id()).is_none() {
                self.departed
                    .entry(peer.id().clone())
                    .or_insert_with(|| (peer.clone(), now_ms));
            }
        }
        self.departed.retain(|id, (_, since)| {
            current.get(id).is_none() && now_ms.saturating_sub(*since) < grace_ms
        });
        if self.departed.is_empty() {
            return (current, None);
        }
        let next_expiry = self
            .departed
            .values()
            .map(|(_, since)| since.saturating_add(grace_ms))
            .min();
        let mut peers = current.peers().to_vec();
        peers.extend(self.departed.values().map(|(peer, _)| peer.clone()));
        match MembershipView::new("membership", peers) {
            Ok(view) => (view, next_expiry),
            // Cannot happen (the departed are not in `current`, and every
            // peer was valid in its own view); publish what the source sees.
            Err(_) => (current, None),
        }
    }
}

/// The peers a node knows of at one moment, validated and indexed for
/// placement.
///
/// Sorted by node id, one entry per node. Two views are equal when they list
/// the same peers with the same labels and addresses.
#[derive(Clone, Debug)]
pub struct MembershipView {
    peers: Vec<Peer>,
    membership: Membership,
}

impl PartialEq for MembershipView {
    fn eq(&self, other: &Self) -> bool {
        self.peers == other.peers
    }
}

impl Eq for MembershipView {}

impl Default for MembershipView {
    fn default() -> Self {
        Self::empty()
    }
}

impl MembershipView {
    /// A view with no members.
    pub fn empty() -> Self {
        Self {
            peers: Vec::new(),
            membership: Membership::new(Vec::new()).unwrap_or_else(|_| unreachable_empty()),
        }
    }

    /// Builds a view from peers in any order.
    ///
    /// Rejects a node listed twice, a weight outside 1 to [`MAX_WEIGHT`] and
    /// a zone or rack that is not a label value; errors name the node as
    /// `{field}[node]`.
    pub fn new(field: &str, mut peers: Vec<Peer>) -> Result<Self, CoreError> {
        peers.sort_by(|a, b| a.member.id.cmp(&b.member.id));
        if let Some(pair) = peers.windows(2).find(|p| p[0].member.id == p[1].member.id) {
            return Err(invalid_value(
                field,
                format!("node {} is listed more than once", pair[0].member.id),
            ));
        }
        for peer in &peers {
            check_member(&format!("{field}[{}]", peer.member.id), &peer.member)?;
        }
        let membership = Membership::new(peers.iter().map(|p| p.member.clone()).collect())?;
        Ok(Self { peers, membership })
    }

    /// The peers, sorted by node id.
    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    /// The same members, indexed for [`Membership::place`].
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The peer named `id`.
    pub fn get(&self, id: &NodeId) -> Option<&Peer> {
        self.peers
            .binary_search_by(|p| p.member.id.cmp(id))
            .ok()
            .map(|i| &self.peers[i])
    }

    /// How many members there are.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// What changed from `self` to `newer`: who joined, who left, and whose
    /// labels, weight or address changed. Each list is sorted by node id.
    pub fn diff(&self, newer: &Self) -> MembershipDiff {
        let mut diff = MembershipDiff::default();
        let (mut old, mut new) = (self.peers.iter().peekable(), newer.peers.iter().peekable());
        loop {
            match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(o), None) => {
                    diff.left.push((*o).clone());
                    old.next();
                }
                (None, Some(n)) => {
                    diff.joined.push((*n).clone());
                    new.next();
                }
                (Some(o), Some(n)) => match o.member.id.cmp(&n.member.id) {
                    std::cmp::Ordering::Less => {
                        diff.left.push((*o).clone());
                        old.next();
                    }
                    std::cmp::Ordering::Greater => {
                        diff.joined.push((*n).clone());
                        new.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if o != n {
                            diff.changed.push(PeerChange {
                                before: (*o).clone(),
                                after: (*n).clone(),
                            });
                        }
                        old.next();
                        new.next();
                    }
                },
            }
        }
        diff
    }
}

/// `Membership::new(vec![])` cannot fail: there is nothing to reject.
#[cold]
fn unreachable_empty() -> Membership {
    unreachable!("an empty membership is always valid")
}

/// Checks one member's weight and labels with placement's own rules, naming
/// the entry as `field`.
fn check_member(field: &str, member: &Member) -> Result<(), CoreError> {
    if !(1..=MAX_WEIGHT).contains(&member.weight) {
        return Err(invalid_value(
            format!("{field}.weight"),
            format!("{} must be 1 to {MAX_WEIGHT}", member.weight),
        ));
    }
    // Placement validates labels when it builds a membership and names the
    // entry `members[i]`; one member alone is entry 0.
    Membership::new(vec![member.clone()])
        .map(|_| ())
        .map_err(|err| match err {
            CoreError::InvalidValue { field: f, reason } => CoreError::InvalidValue {
                field: f.replacen("members[0]", field, 1),
                reason,
            },
            other => other,
        })
}

/// A member whose labels, weight or address changed between two views.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerChange {
    /// How the older view had it.
    pub before: Peer,
    /// How the newer view has it.
    pub after: Peer,
}

/// The difference between two views ([`MembershipView::diff`]).
///
/// A member whose zone or rack changed counts as changed, not as a leave and
/// a join: it still holds its data, but placement may now put some replicas
/// elsewhere.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MembershipDiff {
    /// Members of the newer view only.
    pub joined: Vec<Peer>,
    /// Members of the older view only: their replicas must be made again
    /// elsewhere.
    pub left: Vec<Peer>,
    /// Members of both whose labels, weight or address differ.
    pub changed: Vec<PeerChange>,
}

impl MembershipDiff {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.joined.is_empty() && self.left.is_empty() && self.changed.is_empty()
    }

    /// Applies the difference to `old`, giving the newer view back.
    ///
    /// Fails when the difference does not fit `old` (it names a member that
    /// is not there, or adds one that already is), so a consumer that keeps
    /// its own copy of the view detects having missed an update.
    pub fn apply(&self, old: &MembershipView) -> Result<MembershipView, CoreError> {
        let mut peers: BTreeMap<NodeId, Peer> = old
            .peers
            .iter()
            .map(|p| (p.member.id.clone(), p.clone()))
            .collect();
        let missing = |id: &NodeId| {
            invalid_value(
                "membership diff",
                format!("node {id} is not in the view it is applied to"),
            )
        };
        for peer in &self.left {
            peers
                .remove(&peer.member.id)
                .ok_or_else(|| missing(&peer.member.id))?;
        }
        for change in &self.changed {
            let slot = peers
                .get_mut(&change.before.member.id)
                .ok_or_else(|| missing(&change.before.member.id))?;
            *slot = change.after.clone();
        }
        for peer in &self.joined {
            if peers.insert(peer.member.id.clone(), peer.clone()).is_some() {
                return Err(invalid_value(
                    "membership diff",
                    format!("node {} joins a view it is already in", peer.member.id),
                ));
            }
        }
        MembershipView::new("members", peers.into_values().collect())
    }
}

impl fmt::Display for MembershipDiff {
    /// One short line for logs: `+a +b -c ~d`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut item = |f: &mut fmt::Formatter<'_>, sign: char, id: &NodeId| {
            let sep = if first { "" } else { " " };
            first = false;
            write!(f, "{sep}{sign}{id}")
        };
        for p in &self.joined {
            item(f, '+', &p.member.id)?;
        }
        for p in &self.left {
            item(f, '-', &p.member.id)?;
        }
        for c in &self.changed {
            item(f, '~', &c.after.member.id)?;
        }
        Ok(())
    }
}

/// The label value of `key` on `node`, or `None` where it is missing or
/// empty (Kubernetes allows empty values; an empty domain means "unknown").
fn domain_label(node: &NodeInfo, key: &str) -> Option<String> {
    node.labels
        .get(key)
        .filter(|value| !value.is_empty())
        .cloned()
}

/// The membership the DaemonSet's pods describe.
///
/// For each pod that is ready, not being deleted, and has an IP and a node
/// that appears in `nodes`: one member, named after the node, with the
/// node's zone and rack labels (see [`TopologyLabels`]) and weight 1, at the
/// pod's IP. A node without the zone label is its own zone; without the rack
/// label it is its own rack (placement's rule for a member with no rack: the
/// node itself is the rack, with no risk of colliding with a real rack's
/// name). A pod whose node is not in `nodes` is left out until the node's
/// labels are known, so that every daemon places it by the same domains from
/// the moment it joins. When several pods qualify on one node (a rolling
/// update), the one whose name sorts first stands for it.
///
/// The result depends only on the sets of pods and nodes, not their order.
/// Fails when a node name is not a valid [`NodeId`] or a domain label is not
/// a valid label value (Kubernetes enforces both, so in practice never); the
/// error names the pod or node.
pub fn view_from_pods(
    pods: &[PodInfo],
    nodes: &[NodeInfo],
    labels: &TopologyLabels,
) -> Result<MembershipView, CoreError> {
    // If a node is reported twice, the lowest entry wins: any fixed choice
    // keeps the result independent of the order.
    let mut node_by_name: HashMap<&str, &NodeInfo> = HashMap::with_capacity(nodes.len());
    for node in nodes {
        node_by_name
            .entry(node.name.as_str())
            .and_modify(|seen| {
                if (&node.labels, &node.name) < (&seen.labels, &seen.name) {
                    *seen = node;
                }
            })
            .or_insert(node);
    }
    let mut chosen: BTreeMap<&str, (&PodInfo, IpAddr, &NodeInfo)> = BTreeMap::new();
    for pod in pods {
        if !pod.ready || pod.deleting || !pod.daemon_pod {
            continue;
        }
        let (Some(node_name), Some(ip)) = (pod.node_name.as_deref(), pod.pod_ip) else {
            continue;
        };
        let Some(node) = node_by_name.get(node_name) else {
            continue;
        };
        chosen
            .entry(node_name)
            .and_modify(|(best, best_ip, _)| {
                if (&pod.name, ip) < (&best.name, *best_ip) {
                    *best = pod;
                    *best_ip = ip;
                }
            })
            .or_insert((pod, ip, node));
    }
    let mut peers = Vec::with_capacity(chosen.len());
    for (node_name, (pod, ip, node)) in chosen {
        let id = NodeId::parse(
            &format!("pods[{}].spec.nodeName", pod.name),
            node_name.into(),
        )?;
        let member = Member {
            id,
            zone: domain_label(node, labels.zone()),
            rack: domain_label(node, labels.rack()),
            weight: 1,
        };
        peers.push(Peer {
            member,
            ip: ip.to_canonical(),
            port: None,
        });
    }
    MembershipView::new("nodes", peers)
}

/// The membership of a static list, validated entry by entry; errors name
/// the entry as `{field}[i]`.
pub fn view_from_static(field: &str, list: &[StaticPeer]) -> Result<MembershipView, CoreError> {
    let mut peers = Vec::with_capacity(list.len());
    let mut addresses: HashMap<(IpAddr, Option<u16>), &str> = HashMap::new();
    for (i, entry) in list.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let id = NodeId::parse(&format!("{at}.id"), entry.id.clone())?;
        let (ip, port) = parse_address(&format!("{at}.address"), &entry.address)?;
        if let Some(other) = addresses.insert((ip, port), &entry.id) {
            return Err(invalid_value(
                format!("{at}.address"),
                format!("{:?} is also the address of {other}", entry.address),
            ));
        }
        let member = Member {
            id,
            zone: entry.zone.clone(),
            rack: entry.rack.clone(),
            weight: entry.weight.unwrap_or(1),
        };
        check_member(&at, &member)?;
        peers.push(Peer { member, ip, port });
    }
    MembershipView::new(field, peers)
}

/// Parses `10.0.0.7`, `10.0.0.7:7070`, `fd00::7` or `[fd00::7]:7070`.
fn parse_address(field: &str, value: &str) -> Result<(IpAddr, Option<u16>), CoreError> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(invalid_value(field, format!("{value:?} has port 0")));
        }
        return Ok((addr.ip().to_canonical(), Some(addr.port())));
    }
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Ok((ip.to_canonical(), None));
    }
    Err(invalid_value(
        field,
        format!(
            "{value:?} is not an IP address, optionally with a port \
             (10.0.0.7, 10.0.0.7:7070, [fd00::7]:7070); host names are not accepted"
        ),
    ))
}

/// The node id that stands for a bare address: the dotted quad for IPv4
/// (`10.0.0.7`), the eight full groups joined by `-` for IPv6
/// (`fd00-0000-0000-0000-0000-0000-0000-0007`), since `:` is not allowed in
/// a node id. Fixed width keeps one address to one id.
pub fn node_id_for_ip(ip: IpAddr) -> NodeId {
    let text = match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => v6
            .segments()
            .iter()
            .map(|s| format!("{s:04x}"))
            .collect::<Vec<_>>()
            .join("-"),
    };
    NodeId::parse("address", text).unwrap_or_else(|err| unreachable_id(ip, err))
}

/// Both forms of [`node_id_for_ip`] are DNS-1123 subdomains by construction.
#[cold]
fn unreachable_id(ip: IpAddr, err: CoreError) -> NodeId {
    unreachable!("the node id of {ip} is always valid: {err}")
}

/// The membership a DNS name's addresses describe: one member per distinct
/// address, named by [`node_id_for_ip`], with no zone or rack (A records do
/// not carry them) and weight 1.
pub fn view_from_addresses(addresses: impl IntoIterator<Item = IpAddr>) -> MembershipView {
    let peers: BTreeMap<NodeId, IpAddr> = addresses
        .into_iter()
        .map(|ip| (node_id_for_ip(ip), ip.to_canonical()))
        .collect();
    let peers = peers
        .into_iter()
        .map(|(id, ip)| Peer {
            member: Member::new(id),
            ip,
            port: None,
        })
        .collect();
    MembershipView::new("addresses", peers).unwrap_or_else(unreachable_view)
}

/// Distinct ids, weight 1 and no labels are always a valid view.
#[cold]
fn unreachable_view(err: CoreError) -> MembershipView {
    unreachable!("a view of bare addresses is always valid: {err}")
}

#[cfg(test)]
#[allow(
    clippy::arithmetic_side_effects,
    reason = "tests compute expected values from small, known inputs"
)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;
    use crate::names::Rank;
    use crate::placement::PlacementKey;

    fn node(s: &str) -> NodeId {
        s.parse().expect("valid node id")
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    fn pod(name: &str, node: &str, last: u8) -> PodInfo {
        PodInfo {
            name: name.to_owned(),
            node_name: Some(node.to_owned()),
            pod_ip: Some(ip(last)),
            ready: true,
            deleting: false,
            daemon_pod: true,
        }
    }

    fn labelled(name: &str, zone: Option<&str>, rack: Option<&str>) -> NodeInfo {
        let mut labels = BTreeMap::new();
        labels.insert("kubernetes.io/hostname".to_owned(), name.to_owned());
        if let Some(zone) = zone {
            labels.insert(ZONE_LABEL.to_owned(), zone.to_owned());
        }
        if let Some(rack) = rack {
            labels.insert(DEFAULT_RACK_LABEL.to_owned(), rack.to_owned());
        }
        NodeInfo {
            name: name.to_owned(),
            labels,
        }
    }

    fn peer(id: &str, last: u8) -> Peer {
        Peer {
            member: Member::new(node(id)),
            ip: ip(last),
            port: None,
        }
    }

    #[test]
    fn pods_map_to_members_with_their_nodes_domains() {
        let pods = [
            pod("cairn-a", "gpu-1", 1),
            pod("cairn-b", "gpu-2", 2),
            pod("cairn-c", "gpu-3", 3),
        ];
        let nodes = [
            labelled("gpu-1", Some("eu-1a"), Some("r7")),
            labelled("gpu-2", Some("eu-1b"), None),
            labelled("gpu-3", None, Some("")),
        ];
        let view = view_from_pods(&pods, &nodes, &TopologyLabels::default()).expect("valid");
        let members: Vec<&Member> = view.peers().iter().map(|p| &p.member).collect();
        assert_eq!(
            members,
            [
                &Member::new(node("gpu-1"))
                    .with_zone("eu-1a")
                    .with_rack("r7"),
                &Member::new(node("gpu-2")).with_zone("eu-1b"),
                // An empty label counts as missing.
                &Member::new(node("gpu-3")),
            ]
        );
        assert_eq!(view.get(&node("gpu-2")).expect("member").ip, ip(2));
        assert_eq!(view.membership().len(), 3);
    }

    #[test]
    fn the_rack_label_is_configurable() {
        let labels = TopologyLabels::new(
            "zone_label",
            ZONE_LABEL.to_owned(),
            "rack_label",
            "example.com/rack".to_owned(),
        )
        .expect("valid");
        let mut n = labelled("gpu-1", Some("z"), Some("ignored"));
        n.labels.insert("example.com/rack".into(), "r2".into());
        let view = view_from_pods(&[pod("p", "gpu-1", 1)], &[n], &labels).expect("valid");
        assert_eq!(view.peers()[0].member.rack.as_deref(), Some("r2"));
    }

    #[test]
    fn pods_that_cannot_serve_are_left_out() {
        let nodes = [labelled("gpu-1", None, None), labelled("gpu-2", None, None)];
        let not_ready = PodInfo {
            ready: false,
            ..pod("a", "gpu-1", 1)
        };
        let deleting = PodInfo {
            deleting: true,
            ..pod("b", "gpu-1", 2)
        };
        let no_ip = PodInfo {
            pod_ip: None,
            ..pod("c", "gpu-1", 3)
        };
        let unscheduled = PodInfo {
            node_name: None,
            ..pod("d", "gpu-1", 4)
        };
        let unknown_node = pod("e", "gpu-9", 5);
        let pods = [not_ready, deleting, no_ip, unscheduled, unknown_node];
        let view = view_from_pods(&pods, &nodes, &TopologyLabels::default()).expect("valid");
        assert!(view.is_empty(), "{view:?}");
    }

    #[test]
    fn a_member_that_blinks_stays_for_the_grace_period() {
        let nodes = [labelled("gpu-1", None, None), labelled("gpu-2", None, None)];
        let both = view_from_pods(
            &[pod("a", "gpu-1", 1), pod("b", "gpu-2", 2)],
            &nodes,
            &TopologyLabels::default(),
        )
        .expect("valid");
        let one = view_from_pods(&[pod("a", "gpu-1", 1)], &nodes, &TopologyLabels::default())
            .expect("valid");
        let mut grace = DepartureGrace::default();
        // gpu-2 goes NotReady at t=1000: still a member until t=61000.
        let (view, expiry) = grace.apply(&both, one.clone(), 1_000, 60_000);
        assert_eq!(view, both);
        assert_eq!(expiry, Some(61_000));
        let (view, _) = grace.apply(&view, one.clone(), 30_000, 60_000);
        assert_eq!(view, both, "still within the grace period");
        // Back at t=40000: nothing changed for anyone.
        let (view, expiry) = grace.apply(&view, both.clone(), 40_000, 60_000);
        assert_eq!((view.clone(), expiry), (both.clone(), None));
        // Gone for good from t=50000: leaves at t=110000.
        let (view, _) = grace.apply(&view, one.clone(), 50_000, 60_000);
        assert_eq!(view, both);
        let (view, expiry) = grace.apply(&view, one.clone(), 110_000, 60_000);
        assert_eq!((view, expiry), (one, None));
    }

    #[test]
    fn a_stray_pod_with_the_agents_labels_never_takes_a_nodes_entry() {
        // Regression: a Ready pod "aaa-debug" carrying app.kubernetes.io/name=cairn
        // on gpu-1 sorted before the agent and became gpu-1's member for every
        // daemon, so replication to gpu-1 went to a pod that does not serve.
        let nodes = [labelled("gpu-1", None, None)];
        let stray = PodInfo {
            daemon_pod: false,
            ..pod("aaa-debug", "gpu-1", 9)
        };
        let pods = [stray.clone(), pod("cairn-x1", "gpu-1", 1)];
        let view = view_from_pods(&pods, &nodes, &TopologyLabels::default()).expect("valid");
        assert_eq!(view.len(), 1);
        assert_eq!(view.peers()[0].ip, ip(1), "the agent, not the stray pod");
        let view = view_from_pods(&[stray], &nodes, &TopologyLabels::default()).expect("valid");
        assert!(
            view.is_empty(),
            "a stray pod alone makes no member: {view:?}"
        );
    }

    #[test]
    fn one_member_per_node_during_a_rolling_update() {
        let nodes = [labelled("gpu-1", None, None)];
        let pods = [pod("cairn-zz", "gpu-1", 2), pod("cairn-aa", "gpu-1", 1)];
        let view = view_from_pods(&pods, &nodes, &TopologyLabels::default()).expect("valid");
        assert_eq!(view.len(), 1);
        assert_eq!(view.peers()[0].ip, ip(1), "the first pod by name stands");
    }

    #[test]
    fn bad_node_names_and_labels_name_the_culprit() {
        let err = view_from_pods(
            &[pod("cairn-x", "Bad_Node", 1)],
            &[labelled("Bad_Node", None, None)],
            &TopologyLabels::default(),
        )
        .expect_err("invalid");
        assert!(
            err.to_string()
                .starts_with("invalid pods[cairn-x].spec.nodeName \"Bad_Node\""),
            "{err}"
        );
        let err = view_from_pods(
            &[pod("cairn-x", "gpu-1", 1)],
            &[labelled("gpu-1", Some("-zone"), None)],
            &TopologyLabels::default(),
        )
        .expect_err("invalid");
        assert!(
            err.to_string().starts_with("invalid nodes[gpu-1].zone:"),
            "{err}"
        );
    }

    #[test]
    fn label_keys_are_checked() {
        for good in [ZONE_LABEL, "rack", "a.b/c_d-e.f", "example.com/r1"] {
            assert!(check_label_key("k", good).is_ok(), "{good}");
        }
        for bad in ["", "/rack", "Ex_ample/rack", "a/", "a/-b", "a b", "a/b/c"] {
            assert!(check_label_key("k", bad).is_err(), "{bad:?}");
        }
        for good in ["", "cairn", "a.b_c-d", &"x".repeat(63)] {
            assert!(check_label_value("v", good).is_ok(), "{good:?}");
        }
        for bad in ["-a", "a-", "a b", "a/b", &"x".repeat(64)] {
            assert!(check_label_value("v", bad).is_err(), "{bad:?}");
        }
        let err = TopologyLabels::new("zone_label", "z".into(), "rack_label", "z".into())
            .expect_err("same label");
        assert!(err.to_string().starts_with("invalid rack_label:"), "{err}");
    }

    #[test]
    fn static_lists_are_validated_entry_by_entry() {
        let entry = |id: &str, address: &str| StaticPeer {
            id: id.into(),
            address: address.into(),
            zone: None,
            rack: None,
            weight: None,
        };
        let view = view_from_static(
            "peers",
            &[
                entry("b", "127.0.0.2:7070"),
                StaticPeer {
                    zone: Some("z1".into()),
                    rack: Some("r1".into()),
                    weight: Some(2),
                    ..entry("a", "[::1]:7071")
                },
                entry("c", "fd00::7"),
            ],
        )
        .expect("valid");
        let ids: Vec<&str> = view.peers().iter().map(|p| p.id().as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        let a = &view.peers()[0];
        assert_eq!(a.member.weight, 2);
        assert_eq!(a.socket_addr(1), "[::1]:7071".parse().expect("addr"));
        assert_eq!(view.peers()[2].socket_addr(7070).port(), 7070);

        let cases = [
            (vec![entry("A", "127.0.0.1")], "invalid peers[0].id"),
            (vec![entry("a", "localhost")], "invalid peers[0].address"),
            (vec![entry("a", "127.0.0.1:0")], "invalid peers[0].address"),
            (
                vec![entry("a", "127.0.0.1"), entry("b", "127.0.0.1")],
                "invalid peers[1].address",
            ),
            (
                vec![entry("a", "127.0.0.1"), entry("a", "127.0.0.2")],
                "invalid peers: node a is listed more than once",
            ),
            (
                vec![StaticPeer {
                    weight: Some(0),
                    ..entry("a", "127.0.0.1")
                }],
                "invalid peers[0].weight",
            ),
            (
                vec![StaticPeer {
                    rack: Some("rack 1".into()),
                    ..entry("a", "127.0.0.1")
                }],
                "invalid peers[0].rack",
            ),
        ];
        for (list, prefix) in cases {
            let err = view_from_static("peers", &list).expect_err("invalid");
            assert!(err.to_string().starts_with(prefix), "{err} vs {prefix}");
        }
    }

    #[test]
    fn addresses_become_members_named_after_them() {
        let v6: IpAddr = "fd00::7".parse().expect("ip");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        let view = view_from_addresses([ip(1), v6, mapped, ip(1)]);
        let ids: Vec<&str> = view.peers().iter().map(|p| p.id().as_str()).collect();
        assert_eq!(ids, ["10.0.0.1", "fd00-0000-0000-0000-0000-0000-0000-0007"]);
        assert_eq!(view.peers()[0].ip, ip(1));
        assert_eq!(
            node_id_for_ip(IpAddr::V6(Ipv6Addr::LOCALHOST)).as_str(),
            "0000-0000-0000-0000-0000-0000-0000-0001"
        );
    }

    #[test]
    fn diffs_name_joins_leaves_and_changes() {
        let old = MembershipView::new("m", vec![peer("a", 1), peer("b", 2), peer("c", 3)])
            .expect("valid");
        let mut moved = peer("b", 2);
        moved.member.zone = Some("z9".into());
        let new = MembershipView::new("m", vec![peer("d", 4), moved.clone(), peer("a", 1)])
            .expect("valid");
        let diff = old.diff(&new);
        assert_eq!(diff.joined, [peer("d", 4)]);
        assert_eq!(diff.left, [peer("c", 3)]);
        assert_eq!(
            diff.changed,
            [PeerChange {
                before: peer("b", 2),
                after: moved,
            }]
        );
        assert_eq!(diff.to_string(), "+d -c ~b");
        assert!(old.diff(&old).is_empty());
        assert_eq!(diff.apply(&old).expect("fits"), new);
        // A diff that does not fit its base is refused, not half applied.
        assert!(diff.apply(&new).is_err());
    }

    /// Up to 12 nodes, each with up to three pods in various states, and
    /// labels for most nodes.
    fn cluster() -> impl Strategy<Value = (Vec<PodInfo>, Vec<NodeInfo>)> {
        let pod_state = (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            0u8..4,
            1u8..250,
        );
        proptest::collection::btree_map(
            0u8..12,
            (
                proptest::collection::vec(pod_state, 0..3),
                proptest::option::weighted(
                    0.9,
                    (proptest::option::of(0u8..3), proptest::option::of(0u8..3)),
                ),
            ),
            0..12,
        )
        .prop_map(|entries| {
            let mut pods = Vec::new();
            let mut nodes = Vec::new();
            for (n, (node_pods, domains)) in entries {
                let name = format!("node-{n}");
                for (i, (ready, deleting, has_ip, suffix, last)) in
                    node_pods.into_iter().enumerate()
                {
                    pods.push(PodInfo {
                        name: format!("cairn-{n}-{i}-{suffix}"),
                        node_name: Some(name.clone()),
                        pod_ip: has_ip.then(|| IpAddr::V4(Ipv4Addr::new(10, n, 0, last))),
                        ready: ready || i == 0,
                        deleting: deleting && i != 0,
                        // Some stray pods beside the agents.
                        daemon_pod: i == 0 || last % 4 != 0,
                    });
                }
                if let Some((zone, rack)) = domains {
                    nodes.push(labelled(
                        &name,
                        zone.map(|z| format!("zone-{z}")).as_deref(),
                        rack.map(|r| format!("rack-{r}")).as_deref(),
                    ));
                }
            }
            (pods, nodes)
        })
    }

    /// A view over some of `node-0` .. `node-15`, with random labels, ports
    /// and weights.
    fn view_strategy() -> impl Strategy<Value = MembershipView> {
        proptest::collection::btree_map(
            0u8..16,
            (
                proptest::option::of(0u8..3),
                proptest::option::of(0u8..3),
                1u32..3,
                proptest::option::of(7070u16..7072),
                1u8..4,
            ),
            0..16,
        )
        .prop_map(|entries| {
            let peers = entries
                .into_iter()
                .map(|(n, (zone, rack, weight, port, last))| Peer {
                    member: Member {
                        id: node(&format!("node-{n}")),
                        zone: zone.map(|z| format!("zone-{z}")),
                        rack: rack.map(|r| format!("rack-{r}")),
                        weight,
                    },
                    ip: IpAddr::V4(Ipv4Addr::new(10, n, 0, last)),
                    port,
                })
                .collect();
            MembershipView::new("m", peers).expect("valid")
        })
    }

    fn shuffled<T: Clone>(items: &[T], seed: u64) -> Vec<T> {
        let mut keyed: Vec<(u64, T)> = items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let h = blake3::hash(&[seed.to_le_bytes(), (i as u64).to_le_bytes()].concat());
                let mut b = [0u8; 8];
                b.copy_from_slice(&h.as_bytes()[..8]);
                (u64::from_le_bytes(b), item.clone())
            })
            .collect();
        keyed.sort_by_key(|(k, _)| *k);
        keyed.into_iter().map(|(_, item)| item).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The order the API server lists pods and nodes in never matters.
        #[test]
        fn the_mapping_is_order_independent((pods, nodes) in cluster(), seed in any::<u64>()) {
            let labels = TopologyLabels::default();
            let a = view_from_pods(&pods, &nodes, &labels).expect("valid");
            let b = view_from_pods(&shuffled(&pods, seed), &shuffled(&nodes, !seed), &labels)
                .expect("valid");
            prop_assert_eq!(a, b);
        }

        /// Only the agent's ready, live pods with an IP on a known node make
        /// members, and every such node makes exactly one.
        #[test]
        fn only_serving_pods_become_members((pods, nodes) in cluster()) {
            let view = view_from_pods(&pods, &nodes, &TopologyLabels::default()).expect("valid");
            let known: BTreeSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
            let serving: Vec<&PodInfo> = pods
                .iter()
                .filter(|p| p.ready && !p.deleting && p.daemon_pod && p.pod_ip.is_some())
                .filter(|p| p.node_name.as_deref().is_some_and(|n| known.contains(n)))
                .collect();
            let expected: BTreeSet<&str> =
                serving.iter().filter_map(|p| p.node_name.as_deref()).collect();
            let got: BTreeSet<&str> = view.peers().iter().map(|p| p.id().as_str()).collect();
            prop_assert_eq!(got, expected);
            for peer in view.peers() {
                prop_assert!(
                    serving.iter().any(|p| p.pod_ip == Some(peer.ip)
                        && p.node_name.as_deref() == Some(peer.id().as_str())),
                    "{} is not the address of a serving pod", peer
                );
            }
        }

        /// The grace never hides a member the source sees, keeps every
        /// departed one for exactly the grace period, and then publishes
        /// the source's view as it is.
        #[test]
        fn the_grace_period_keeps_departures_only_for_its_length(
            old in view_strategy(),
            new in view_strategy(),
            elapsed in 0u64..120_000,
        ) {
            let mut grace = DepartureGrace::default();
            let (first, _) = grace.apply(&old, new.clone(), 0, 60_000);
            for peer in new.peers() {
                prop_assert_eq!(first.get(peer.id()), Some(peer));
            }
            for peer in old.peers() {
                prop_assert!(first.get(peer.id()).is_some(), "{} left at once", peer);
            }
            let (later, expiry) = grace.apply(&first, new.clone(), elapsed, 60_000);
            if elapsed >= 60_000 {
                prop_assert_eq!(later, new);
                prop_assert_eq!(expiry, None);
            } else {
                prop_assert_eq!(later, first);
            }
        }

        /// Applying the difference of two views to the older gives the newer.
        #[test]
        fn a_diff_applied_to_the_old_view_gives_the_new(old in view_strategy(), new in view_strategy()) {
            let diff = old.diff(&new);
            prop_assert_eq!(diff.apply(&old).expect("fits"), new.clone());
            prop_assert_eq!(diff.is_empty(), old == new);
            let ids = |peers: &[Peer]| peers.iter().map(|p| p.id().clone()).collect::<Vec<_>>();
            for list in [ids(&diff.joined), ids(&diff.left)] {
                prop_assert!(list.windows(2).all(|w| w[0] < w[1]), "sorted");
            }
        }

        /// A pod going away (unready, deleted) is exactly a leave in the diff,
        /// and only the replicas its node held move: every replica on another
        /// node stays where it was, and each moved one lands on a member of
        /// the new view. A small simulation over many keys and owners.
        #[test]
        fn when_a_member_leaves_only_its_replicas_move(
            (pods, nodes) in cluster(),
            pick in any::<prop::sample::Index>(),
            replicas in 1usize..4,
        ) {
            let labels = TopologyLabels::default();
            let before = view_from_pods(&pods, &nodes, &labels).expect("valid");
            prop_assume!(!before.is_empty());
            let leaver = before.peers()[pick.index(before.len())].clone();
            // Every pod of the leaver's node stops being ready.
            let gone: Vec<PodInfo> = pods
                .iter()
                .cloned()
                .map(|mut p| {
                    if p.node_name.as_deref() == Some(leaver.id().as_str()) {
                        p.ready = false;
                    }
                    p
                })
                .collect();
            let after = view_from_pods(&gone, &nodes, &labels).expect("valid");
            let diff = before.diff(&after);
            prop_assert_eq!(&diff.left, &vec![leaver.clone()]);
            prop_assert!(diff.joined.is_empty() && diff.changed.is_empty());

            let mut moved = 0usize;
            let mut total = 0usize;
            for owner in before.peers().iter().filter(|p| p.id() != leaver.id()) {
                for rank in 0..16 {
                    let key = PlacementKey {
                        tenant: "team-a".parse().expect("valid"),
                        job: "sim".parse().expect("valid"),
                        rank: Rank(rank),
                    };
                    let old = before.membership().place(&key, &owner.member, replicas);
                    let new = after.membership().place(&key, &owner.member, replicas);
                    let old_set: BTreeSet<&NodeId> = old.iter().collect();
                    let new_set: BTreeSet<&NodeId> = new.iter().collect();
                    for id in &old {
                        if id != leaver.id() {
                            prop_assert!(new_set.contains(id), "replica on {} moved", id);
                        }
                    }
                    for id in new_set.difference(&old_set) {
                        prop_assert!(after.get(id).is_some());
                    }
                    if !old_set.contains(leaver.id()) {
                        prop_assert_eq!(&old_set, &new_set);
                    }
                    total += old.len();
                    moved += new_set.difference(&old_set).count();
                }
            }
            // Only the leaver's share moves.
            let held = before
                .peers()
                .iter()
                .filter(|o| o.id() != leaver.id())
                .flat_map(|o| (0..16).map(move |rank| (o, rank)))
                .filter(|(o, rank)| {
                    let key = PlacementKey {
                        tenant: "team-a".parse().expect("valid"),
                        job: "sim".parse().expect("valid"),
                        rank: Rank(*rank),
                    };
                    before.membership().place(&key, &o.member, replicas).contains(leaver.id())
                })
                .count();
            prop_assert!(moved <= held, "{moved} moved, {held} held by the leaver, of {total}");
        }
    }
}
