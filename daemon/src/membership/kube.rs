//! The Kubernetes source: the DaemonSet's pods, watched, and their nodes'
//! topology labels.
//!
//! Deliberately thin. [`kube::runtime::watcher`] lists and watches the pods
//! that match the configured labels in the daemon's namespace (it re-lists
//! after a dropped watch, with kube's default backoff); each event updates a
//! [`PodSet`]. The labels of the nodes those pods run on are fetched with
//! one `get` per node when a node first appears, and kept while any of its
//! pods serves: zone and rack labels are set when a node is provisioned, so
//! re-reading them on every change would cost the API server much and tell
//! nothing. (A node relabelled in place is read again once its daemon pod
//! leaves and rejoins the view, e.g. on restart.) Both go through the pure
//! `cairn_core::membership::view_from_pods`, which decides who counts.
//!
//! Only pods a DaemonSet controls (the configured one, when named) count as
//! agents: a stray pod carrying the labels never becomes a member. The watch
//! retries within seconds after API server errors ([`WatchBackoff`]).
//!
//! The daemon needs `list` and `watch` on pods in its namespace and `get` on
//! nodes (`deploy/base/rbac.yaml`).
//!
//! No API server can run where the tests run, so the tests here cover what
//! needs none: the conversion of pod and node objects, the watcher's
//! configuration, and the handling of watcher events. The rules themselves
//! are tested in `cairn-core`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::pin;
use std::time::Duration;

use cairn_core::membership::view_from_pods;
use cairn_core::{DepartureGrace, MembershipView, NodeInfo, PodInfo, TopologyLabels};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{MembershipError, Publisher, source_backoff};
use crate::retry::{Backoff, RetryPolicy};

/// Node labels fetched at once when many nodes appear together (the first
/// list of a large cluster).
pub const NODE_FETCH_CONCURRENCY: usize = 8;

/// Backoff of the pod watch: 125 ms doubling to 2 s, each wait stretched by
/// a random 0 to 100 % (so 125–250 ms first, never over 4 s, and nodes that
/// lost the server together do not come back in step), and back to the
/// start after any event that arrives (the watch works again).
///
/// kube's default backoff caps at 30 s and forgets past failures only after
/// 120 s without one; after an API server outage each of the errors a
/// recovering server gives (410 Gone for the stale resource version, a brief
/// 403) cost another capped step, and changes were seen 28 to 106 s after the
/// server was back. With this one they are seen within about 5 s.
const WATCH_RETRY: RetryPolicy =
    RetryPolicy::new(Duration::from_millis(125), Duration::from_secs(2)).jittered();

/// [`WATCH_RETRY`] as the watcher takes it.
#[derive(Debug)]
struct WatchBackoff(Backoff);

impl Default for WatchBackoff {
    fn default() -> Self {
        Self(Backoff::new(WATCH_RETRY))
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.0.next_delay())
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.0.reset();
    }
}

/// A validated Kubernetes source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesSettings {
    /// Namespace of the daemon's pods; `None`: the client's default (the
    /// service account's namespace in a pod).
    pub namespace: Option<String>,
    /// Labels every daemon pod carries, validated.
    pub match_labels: BTreeMap<String, String>,
    /// Which node labels hold zone and rack.
    pub labels: TopologyLabels,
    /// The DaemonSet that must control a pod for it to count (any
    /// DaemonSet when `None`).
    pub daemonset: Option<String>,
    /// How long a member that left the pods' view stays one.
    pub leave_grace: Duration,
}

impl KubernetesSettings {
    /// The label selector for the pod watch, `key=value` pairs joined by
    /// commas in key order (keys and values are validated, so nothing needs
    /// escaping).
    pub fn label_selector(&self) -> String {
        self.match_labels
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The watcher's configuration: the label selector, with kube's defaults
    /// otherwise (paged list then watch, bookmarks on).
    pub fn watcher_config(&self) -> watcher::Config {
        watcher::Config::default().labels(&self.label_selector())
    }
}

/// What membership needs of a pod; `None` for a pod without a name (never
/// sent by an API server). `daemonset`: the DaemonSet that must control the
/// pod for it to be Cairn's agent (any DaemonSet when `None`).
pub fn pod_info(pod: &Pod, daemonset: Option<&str>) -> Option<PodInfo> {
    let name = pod.metadata.name.clone()?;
    let daemon_pod = pod.metadata.owner_references.iter().flatten().any(|owner| {
        owner.controller == Some(true)
            && owner.kind == "DaemonSet"
            && owner.api_version == "apps/v1"
            && daemonset.is_none_or(|wanted| owner.name == wanted)
    });
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
    Some(PodInfo {
        name,
        node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        // An address that does not parse counts as none: the pod is left
        // out rather than the whole view failing.
        pod_ip: status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok()),
        ready,
        deleting: pod.metadata.deletion_timestamp.is_some(),
        daemon_pod,
    })
}

/// What membership needs of a node; `None` for a node without a name.
pub fn node_info(node: &Node) -> Option<NodeInfo> {
    Some(NodeInfo {
        name: node.metadata.name.clone()?,
        labels: node.metadata.labels.clone().unwrap_or_default(),
    })
}

/// The pods the watcher has reported, by name, kept complete across
/// re-lists: a re-list is buffered and replaces the set only once it is
/// whole, so a view never shows half a list.
#[derive(Debug, Default)]
pub struct PodSet {
    pods: BTreeMap<String, PodInfo>,
    relisting: Option<BTreeMap<String, PodInfo>>,
    synced: bool,
    daemonset: Option<String>,
}

impl PodSet {
    /// An empty set whose pods count as agents when `daemonset` controls
    /// them (see [`pod_info`]).
    pub fn new(daemonset: Option<String>) -> Self {
        Self {
            daemonset,
            ..Self::default()
        }
    }

    /// Applies one watcher event; returns whether the set of pods changed in
    /// a way worth recomputing the view for (only once the first list is
    /// complete).
    pub fn apply(&mut self, event: Event<Pod>) -> bool {
        match event {
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            Event::InitApply(pod) => {
                if let (Some(buffer), Some(info)) = (
                    self.relisting.as_mut(),
                    pod_info(&pod, self.daemonset.as_deref()),
                ) {
                    buffer.insert(info.name.clone(), info);
                }
                false
            }
            Event::InitDone => {
                if let Some(buffer) = self.relisting.take() {
                    self.pods = buffer;
                }
                self.synced = true;
                true
            }
            Event::Apply(pod) => match pod_info(&pod, self.daemonset.as_deref()) {
                Some(info) => {
                    let changed = self.pods.get(&info.name) != Some(&info);
                    self.pods.insert(info.name.clone(), info);
                    changed && self.synced
                }
                None => false,
            },
            Event::Delete(pod) => {
                let removed = pod
                    .metadata
                    .name
                    .as_ref()
                    .and_then(|name| self.pods.remove(name))
                    .is_some();
                removed && self.synced
            }
        }
    }

    /// Whether the first complete list has arrived.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The pods, by name.
    pub fn pods(&self) -> Vec<PodInfo> {
        self.pods.values().cloned().collect()
    }

    /// The nodes of pods that could serve (ready, live, with an address):
    /// the only nodes whose labels are needed.
    pub fn serving_nodes(&self) -> BTreeSet<String> {
        self.pods
            .values()
            .filter(|p| p.ready && !p.deleting && p.pod_ip.is_some())
            .filter_map(|p| p.node_name.clone())
            .collect()
    }
}

/// Builds the client (in-cluster service account, else kubeconfig) and
/// spawns the watch loop.
pub(super) async fn start(
    settings: KubernetesSettings,
    publisher: Publisher,
    cancel: CancellationToken,
) -> Result<(), MembershipError> {
    let client = Client::try_default()
        .await
        .map_err(|source| MembershipError::Kubernetes {
            context: "configuring the kubernetes client (in-cluster or kubeconfig)".into(),
            source,
        })?;
    let namespace = settings
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let nodes: Api<Node> = Api::all(client);
    debug!(
        %namespace,
        selector = %settings.label_selector(),
        "membership: watching daemon pods"
    );
    tokio::spawn(run(settings, pods, nodes, publisher, cancel));
    Ok(())
}

/// The watch loop: pod events in, views out, until cancelled.
async fn run(
    settings: KubernetesSettings,
    pods_api: Api<Pod>,
    nodes_api: Api<Node>,
    mut publisher: Publisher,
    cancel: CancellationToken,
) {
    let mut events = pin!(
        watcher::watcher(pods_api, settings.watcher_config())
            .backoff(WatchBackoff::default())
            .into_stream()
    );
    let mut pods = PodSet::new(settings.daemonset.clone());
    let mut nodes: HashMap<String, NodeInfo> = HashMap::new();
    let mut node_backoff = source_backoff();
    let mut retry_at: Option<Instant> = None;
    // Members that left stay for `leave_grace` (see `DepartureGrace`).
    let mut grace = DepartureGrace::default();
    let mut published = MembershipView::empty();
    let started = Instant::now();
    let grace_ms = settings.leave_grace.as_millis() as u64;
    loop {
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = publisher.closed() => return,
            () = retry => retry_at = None,
            event = events.next() => match event {
                None => {
                    warn!("membership: the pod watch ended; the view stays as it is");
                    return;
                }
                Some(Err(error)) => {
                    warn!(%error, "membership: pod watch failed; retrying with backoff");
                    continue;
                }
                Some(Ok(event)) => {
                    if !pods.apply(event) {
                        continue;
                    }
                }
            },
        }
        if !pods.synced() {
            continue;
        }
        let wanted = pods.serving_nodes();
        nodes.retain(|name, _| wanted.contains(name));
        let missing: Vec<String> = wanted
            .iter()
            .filter(|name| !nodes.contains_key(*name))
            .cloned()
            .collect();
        let complete = tokio::select! {
            () = cancel.cancelled() => return,
            complete = fetch_nodes(&nodes_api, missing, &mut nodes) => complete,
        };
        if complete {
            node_backoff.reset();
        } else {
            // `next_delay` is capped at a few minutes, so this is always `Some`.
            retry_at = Instant::now().checked_add(node_backoff.next_delay());
        }
        let node_list: Vec<NodeInfo> = nodes.values().cloned().collect();
        match view_from_pods(&pods.pods(), &node_list, &settings.labels) {
            Ok(view) => {
                let now_ms = started.elapsed().as_millis() as u64;
                let (view, expiry) = grace.apply(&published, view, now_ms, grace_ms);
                if let Some(at) =
                    expiry.and_then(|ms| started.checked_add(Duration::from_millis(ms)))
                {
                    // Look again when the first departed member's grace ends.
                    retry_at = Some(retry_at.map_or(at, |r| r.min(at)));
                }
                published = view.clone();
                publisher.publish(view);
            }
            Err(error) => warn!(
                %error,
                "membership: the daemon pods make no valid view; keeping the last"
            ),
        }
    }
}

/// Fetches the labels of `names` into `cache`, a few at a time; returns
/// whether every fetch succeeded. A pod whose node could not be read stays
/// out of the view until a retry reads it.
async fn fetch_nodes(
    api: &Api<Node>,
    names: Vec<String>,
    cache: &mut HashMap<String, NodeInfo>,
) -> bool {
    let mut complete = true;
    let mut results = futures::stream::iter(names)
        .map(|name| async move {
            let result = api.get_opt(&name).await;
            (name, result)
        })
        .buffer_unordered(NODE_FETCH_CONCURRENCY);
    while let Some((name, result)) = results.next().await {
        match result {
            Ok(Some(node)) => {
                if let Some(info) = node_info(&node) {
                    cache.insert(name, info);
                }
            }
            Ok(None) => {
                complete = false;
                warn!(node = %name, "membership: a daemon pod's node does not exist; retrying");
            }
            Err(error) => {
                complete = false;
                warn!(node = %name, %error, "membership: reading a node's labels failed; retrying");
            }
        }
    }
    complete
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};

    use super::super::MembershipConfig;
    use super::super::MembershipSettings;
    use super::*;

    fn pod(name: &str, node: &str, ip: &str, ready: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                owner_references: Some(vec![owner("DaemonSet", "cairn")]),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some(ip.into()),
                conditions: Some(vec![
                    PodCondition {
                        type_: "PodScheduled".into(),
                        status: "True".into(),
                        ..PodCondition::default()
                    },
                    PodCondition {
                        type_: "Ready".into(),
                        status: ready.into(),
                        ..PodCondition::default()
                    },
                ]),
                ..PodStatus::default()
            }),
        }
    }

    fn owner(kind: &str, name: &str) -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: "0".into(),
            controller: Some(true),
            block_owner_deletion: None,
        }
    }

    fn settings(toml_text: &str) -> KubernetesSettings {
        let config: MembershipConfig = toml::from_str(toml_text).expect("parses");
        match config.validate().expect("valid") {
            MembershipSettings::Kubernetes(settings) => settings,
            other => panic!("kubernetes settings, got {other:?}"),
        }
    }

    /// Without an API server, the watcher's configuration is as far as the
    /// watch itself can be checked.
    #[test]
    fn the_watcher_selects_the_daemon_pods_by_label() {
        let settings = settings(
            r#"
            source = "kubernetes"
            namespace = "cairn-system"
            match_labels = { "app.kubernetes.io/name" = "cairn", "app.kubernetes.io/component" = "node-agent" }
            rack_label = "example.com/rack"
            "#,
        );
        let selector = "app.kubernetes.io/component=node-agent,app.kubernetes.io/name=cairn";
        assert_eq!(settings.label_selector(), selector);
        let config = settings.watcher_config();
        assert_eq!(config.label_selector.as_deref(), Some(selector));
        assert_eq!(config.field_selector, None);
        assert_eq!(settings.namespace.as_deref(), Some("cairn-system"));
        assert_eq!(settings.labels.rack(), "example.com/rack");
        assert_eq!(settings.labels.zone(), "topology.kubernetes.io/zone");
    }

    #[test]
    fn pods_convert_with_readiness_address_and_deletion() {
        let info = pod_info(&pod("cairn-a", "gpu-1", "10.0.0.1", "True"), None).expect("named");
        assert_eq!(
            info,
            PodInfo {
                name: "cairn-a".into(),
                node_name: Some("gpu-1".into()),
                pod_ip: Some("10.0.0.1".parse().expect("ip")),
                ready: true,
                deleting: false,
                daemon_pod: true,
            }
        );
        assert!(
            !pod_info(&pod("b", "gpu-1", "10.0.0.1", "False"), None)
                .expect("named")
                .ready
        );
        let mut no_status = pod("c", "gpu-1", "10.0.0.1", "True");
        no_status.status = None;
        let info = pod_info(&no_status, None).expect("named");
        assert!(!info.ready && info.pod_ip.is_none());
        let garbled = pod_info(&pod("d", "gpu-1", "not-an-ip", "True"), None).expect("named");
        assert_eq!(garbled.pod_ip, None);
        let mut deleting = pod("e", "gpu-1", "fd00::1", "True");
        deleting.metadata.deletion_timestamp = Some(Time(Default::default()));
        let info = pod_info(&deleting, None).expect("named");
        assert!(info.deleting);
        assert_eq!(info.pod_ip, Some("fd00::1".parse().expect("ip")));
        let mut nameless = pod("f", "gpu-1", "10.0.0.1", "True");
        nameless.metadata.name = None;
        assert_eq!(pod_info(&nameless, None), None);
    }

    /// Regression (issue 16): a Ready debug pod carrying the agent's labels
    /// took a node's entry. Only a pod the (named) DaemonSet controls counts.
    #[test]
    fn only_pods_the_daemonset_controls_are_agents() {
        let agent = pod("cairn-x", "gpu-1", "10.0.0.1", "True");
        assert!(pod_info(&agent, Some("cairn")).expect("named").daemon_pod);
        assert!(pod_info(&agent, None).expect("named").daemon_pod);
        let mut stray = agent.clone();
        stray.metadata.owner_references = None;
        assert!(!pod_info(&stray, None).expect("named").daemon_pod);
        stray.metadata.owner_references = Some(vec![owner("ReplicaSet", "debug")]);
        assert!(!pod_info(&stray, None).expect("named").daemon_pod);
        stray.metadata.owner_references = Some(vec![owner("DaemonSet", "other-agent")]);
        assert!(!pod_info(&stray, Some("cairn")).expect("named").daemon_pod);
        let mut not_controller = owner("DaemonSet", "cairn");
        not_controller.controller = None;
        stray.metadata.owner_references = Some(vec![not_controller]);
        assert!(!pod_info(&stray, Some("cairn")).expect("named").daemon_pod);
    }

    #[test]
    fn the_watch_retries_within_seconds_and_starts_over_once_it_works() {
        use kube::runtime::utils::Backoff as _;
        let mut backoff = WatchBackoff::default();
        let delays: Vec<Duration> = (0..20).map(|_| backoff.next().expect("endless")).collect();
        let first = Duration::from_millis(250);
        let most = Duration::from_secs(4);
        assert!(delays[0] <= first && delays[0] >= first / 2, "{delays:?}");
        assert!(delays.iter().all(|d| *d <= most), "{delays:?}");
        assert!(delays[19] >= most / 2, "{delays:?}");
        backoff.reset();
        assert!(backoff.next().expect("endless") <= first);
    }

    #[test]
    fn nodes_convert_with_their_labels() {
        let node = Node {
            metadata: ObjectMeta {
                name: Some("gpu-1".into()),
                labels: Some(BTreeMap::from([(
                    "topology.kubernetes.io/zone".to_owned(),
                    "eu-1a".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        let info = node_info(&node).expect("named");
        assert_eq!(info.name, "gpu-1");
        assert_eq!(info.labels["topology.kubernetes.io/zone"], "eu-1a");
        assert!(
            node_info(&Node::default()).is_none(),
            "a node without a name is skipped"
        );
    }

    /// The watcher's events, in the order it sends them, without a server:
    /// nothing counts before the first complete list, a re-list replaces
    /// the set whole, and repeated updates that change nothing are ignored.
    #[test]
    fn pod_events_build_the_set_list_by_list() {
        let mut set = PodSet::default();
        assert!(!set.apply(Event::Init));
        assert!(!set.apply(Event::InitApply(pod("a", "gpu-1", "10.0.0.1", "True"))));
        assert!(!set.apply(Event::InitApply(pod("b", "gpu-2", "10.0.0.2", "False"))));
        assert!(!set.synced());
        assert!(set.apply(Event::InitDone));
        assert!(set.synced());
        assert_eq!(set.pods().len(), 2);
        assert_eq!(set.serving_nodes(), BTreeSet::from(["gpu-1".to_owned()]));

        // b becomes ready; a repeat of the same object changes nothing.
        assert!(set.apply(Event::Apply(pod("b", "gpu-2", "10.0.0.2", "True"))));
        assert!(!set.apply(Event::Apply(pod("b", "gpu-2", "10.0.0.2", "True"))));
        assert_eq!(set.serving_nodes().len(), 2);
        assert!(set.apply(Event::Delete(pod("a", "gpu-1", "10.0.0.1", "True"))));
        assert!(!set.apply(Event::Delete(pod("a", "gpu-1", "10.0.0.1", "True"))));

        // A re-list (after a dropped watch) replaces everything at once; the
        // old set stays until it is complete.
        assert!(!set.apply(Event::Init));
        assert!(!set.apply(Event::InitApply(pod("c", "gpu-3", "10.0.0.3", "True"))));
        assert_eq!(set.pods()[0].name, "b");
        assert!(set.apply(Event::InitDone));
        let names: Vec<String> = set.pods().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["c"]);
    }

    /// The conversion and the pure mapping together, as the loop runs them.
    #[test]
    fn events_and_nodes_make_a_view() {
        let mut set = PodSet::default();
        set.apply(Event::Init);
        set.apply(Event::InitApply(pod(
            "cairn-a", "gpu-1", "10.0.0.1", "True",
        )));
        set.apply(Event::InitApply(pod(
            "cairn-b", "gpu-2", "10.0.0.2", "True",
        )));
        set.apply(Event::InitDone);
        let node = |name: &str, zone: &str| NodeInfo {
            name: name.into(),
            labels: BTreeMap::from([("topology.kubernetes.io/zone".to_owned(), zone.to_owned())]),
        };
        let view = view_from_pods(
            &set.pods(),
            &[node("gpu-1", "a"), node("gpu-2", "b")],
            &TopologyLabels::default(),
        )
        .expect("valid");
        let zones: Vec<Option<&str>> = view
            .peers()
            .iter()
            .map(|p| p.member.zone.as_deref())
            .collect();
        assert_eq!(zones, [Some("a"), Some("b")]);
    }
}
