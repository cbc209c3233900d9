//! Membership sources: who the peers are, as a stream of validated views.
//!
//! Three sources, chosen by `source` in the `[membership]` configuration:
//!
//! | source | what it reads | zone and rack |
//! |---|---|---|
//! | `static` ([`static_list`]) | a list in the configuration | from the list |
//! | `dns` ([`dns`]) | the A/AAAA records of a name (the headless `cairn-peers` Service), re-resolved every `interval_secs` | none: each member is its own domain |
//! | `kubernetes` ([`kube`]) | the DaemonSet's pods (label selector, daemon's namespace), watched; their nodes' labels, fetched once per node | node labels |
//!
//! Each source only gathers facts; the rules that turn them into a
//! [`MembershipView`] (who counts, how nodes are named, validation) are pure
//! functions in `cairn_core::membership`, tested there. A source publishes
//! each new view on a [`watch`] channel; a consumer (the peer tier's replication pipeline)
//! compares it with the view it last acted on through
//! [`MembershipView::diff`] and re-replicates what a leaving member held.
//! Every join, leave and change is logged at `info` here, once, whatever
//! the consumers do.
//!
//! # Semantics
//!
//! - [`start`] returns once the source has its first view, so the receiver
//!   never holds a placeholder: static at once, DNS after the first
//!   successful lookup, Kubernetes after the first complete list of pods and
//!   their nodes. Until then it retries with backoff (1 s doubling to 60 s)
//!   and only returns an error for cancellation or a Kubernetes client that
//!   cannot be configured at all. A caller that must not wait spawns it.
//! - A failure after that (a lookup that fails, an API server that is away)
//!   keeps the last view and retries: an outage must not look like every
//!   peer leaving at once, which would start re-replicating everything.
//! - The channel only carries views that differ from the previous one.
//!
//! The peer tier ([`crate::tier::peer::PeerTier`]) starts the configured source
//! and the replication pipeline reacts to its views.

pub mod dns;
pub mod kube;
pub mod static_list;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cairn_core::membership::{
    TopologyLabels, check_label_key, check_label_value, view_from_static,
};
use cairn_core::{CoreError, MembershipView, NodeId, StaticPeer};
use serde::Deserialize;
use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::retry::{Backoff, RetryPolicy};

/// Default interval between two DNS lookups.
pub const DEFAULT_DNS_INTERVAL_SECS: u64 = 10;
/// Longest DNS interval accepted: a longer one would hide a lost node from
/// re-replication for too long.
pub const MAX_DNS_INTERVAL_SECS: u64 = 3600;
/// First delay before retrying a failed lookup or API call.
pub const RETRY_FIRST_DELAY: Duration = Duration::from_secs(1);
/// Longest delay between two retries.
pub const RETRY_MAX_DELAY: Duration = Duration::from_secs(60);

/// Default seconds a Kubernetes member that left the pods' view stays a
/// member: a blink (NotReady for a moment, a restart, a rolling update)
/// must not move replicas around.
pub const DEFAULT_LEAVE_GRACE_SECS: u64 = 60;
/// Longest `membership.leave_grace_secs` accepted: an hour.
pub const MAX_LEAVE_GRACE_SECS: u64 = 3600;

/// Why membership could not be configured or started.
#[derive(Debug, Error)]
pub enum MembershipError {
    /// A configuration value broke the rules; the message names the field.
    #[error(transparent)]
    Config(#[from] CoreError),
    /// The Kubernetes client could not be configured (neither in-cluster
    /// service account nor kubeconfig).
    #[error("{context}: {source}")]
    Kubernetes {
        /// What the daemon was doing, as a verb phrase.
        context: String,
        /// The client's error.
        #[source]
        source: ::kube::Error,
    },
    /// The daemon is shutting down before the first view arrived.
    #[error("membership: cancelled before the first view")]
    Cancelled,
}

/// The `[membership]` section of the configuration file, as written.
///
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "source", rename_all = "lowercase", deny_unknown_fields)]
pub enum MembershipConfig {
    /// A fixed list of peers (places without DNS or Kubernetes, tests).
    Static {
        /// The peers, this node included.
        peers: Vec<StaticPeer>,
    },
    /// The addresses a DNS name resolves to, e.g. the headless Service
    /// `cairn-peers.cairn-system.svc.cluster.local`.
    Dns {
        /// The name to resolve.
        name: String,
        /// Seconds between lookups (default [`DEFAULT_DNS_INTERVAL_SECS`]).
        #[serde(default)]
        interval_secs: Option<u64>,
    },
    /// The DaemonSet's pods, from the Kubernetes API.
    Kubernetes {
        /// Namespace of the pods (default: the service account's namespace,
        /// or the kubeconfig context's).
        #[serde(default)]
        namespace: Option<String>,
        /// Labels that select the daemon's pods, all of which must match
        /// (a Kubernetes `matchLabels`).
        match_labels: BTreeMap<String, String>,
        /// Node label holding the zone (default `topology.kubernetes.io/zone`).
        #[serde(default)]
        zone_label: Option<String>,
        /// Node label holding the rack (default `topology.cairn.dev/rack`).
        #[serde(default)]
        rack_label: Option<String>,
        /// The name of the DaemonSet whose pods are the members. A pod
        /// counts only when a DaemonSet controls it (its controller owner
        /// reference), this one when set, so that a stray pod carrying the
        /// labels never becomes a member.
        #[serde(default)]
        daemonset: Option<String>,
        /// Seconds a member that left the pods' view (NotReady, deleted)
        /// stays a member (default [`DEFAULT_LEAVE_GRACE_SECS`]).
        #[serde(default)]
        leave_grace_secs: Option<u64>,
    },
}

/// A validated membership configuration, ready for [`start`].
#[derive(Clone, Debug)]
pub enum MembershipSettings {
    /// A fixed view.
    Static(MembershipView),
    /// A name to resolve periodically.
    Dns(dns::DnsSettings),
    /// The Kubernetes API.
    Kubernetes(kube::KubernetesSettings),
}

impl MembershipConfig {
    /// Checks every value and builds the settings; errors name the field as
    /// `membership.…`.
    pub fn validate(&self) -> Result<MembershipSettings, MembershipError> {
        match self {
            Self::Static { peers } => Ok(MembershipSettings::Static(view_from_static(
                "membership.peers",
                peers,
            )?)),
            Self::Dns {
                name,
                interval_secs,
            } => {
                check_dns_name("membership.name", name)?;
                let secs = interval_secs.unwrap_or(DEFAULT_DNS_INTERVAL_SECS);
                if !(1..=MAX_DNS_INTERVAL_SECS).contains(&secs) {
                    return Err(invalid(
                        "membership.interval_secs",
                        format!("{secs} must be 1 to {MAX_DNS_INTERVAL_SECS}"),
                    ));
                }
                Ok(MembershipSettings::Dns(dns::DnsSettings {
                    name: name.clone(),
                    interval: Duration::from_secs(secs),
                }))
            }
            Self::Kubernetes {
                namespace,
                match_labels,
                zone_label,
                rack_label,
                daemonset,
                leave_grace_secs,
            } => {
                let grace = leave_grace_secs.unwrap_or(DEFAULT_LEAVE_GRACE_SECS);
                if grace > MAX_LEAVE_GRACE_SECS {
                    return Err(invalid(
                        "membership.leave_grace_secs",
                        format!("{grace} must be at most {MAX_LEAVE_GRACE_SECS}"),
                    ));
                }
                if let Some(namespace) = namespace {
                    check_namespace("membership.namespace", namespace)?;
                }
                if let Some(name) = daemonset {
                    check_dns_name("membership.daemonset", name)?;
                }
                if match_labels.is_empty() {
                    return Err(invalid(
                        "membership.match_labels",
                        "must name at least one label: an empty selector would take \
                         every pod of the namespace for a peer",
                    ));
                }
                for (key, value) in match_labels {
                    let field = format!("membership.match_labels.{key:?}");
                    check_label_key(&field, key)?;
                    check_label_value(&field, value)?;
                }
                let defaults = TopologyLabels::default();
                let labels = TopologyLabels::new(
                    "membership.zone_label",
                    zone_label.clone().unwrap_or_else(|| defaults.zone().into()),
                    "membership.rack_label",
                    rack_label.clone().unwrap_or_else(|| defaults.rack().into()),
                )?;
                Ok(MembershipSettings::Kubernetes(kube::KubernetesSettings {
                    namespace: namespace.clone(),
                    match_labels: match_labels.clone(),
                    labels,
                    daemonset: daemonset.clone(),
                    leave_grace: Duration::from_secs(grace),
                }))
            }
        }
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> MembershipError {
    MembershipError::Config(CoreError::InvalidValue {
        field: field.to_owned(),
        reason: reason.into(),
    })
}

/// A host name: 1 to 253 characters, dot-separated labels of letters,
/// digits and `-` (not at either end), an optional final dot.
fn check_dns_name(field: &str, name: &str) -> Result<(), MembershipError> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if bare.is_empty() || bare.len() > 253 || !bare.split('.').all(label_ok) {
        return Err(invalid(
            field,
            format!("{name:?} is not a DNS name: dot-separated labels of letters, digits and '-'"),
        ));
    }
    Ok(())
}

/// A namespace: a DNS-1123 label (lower case, at most 63 characters).
fn check_namespace(field: &str, namespace: &str) -> Result<(), MembershipError> {
    let valid = namespace.len() <= 63
        && !namespace.contains('.')
        && NodeId::parse(field, namespace.to_owned()).is_ok();
    if !valid {
        return Err(invalid(
            field,
            format!("{namespace:?} is not a namespace name (a DNS-1123 label)"),
        ));
    }
    Ok(())
}

/// Starts the configured source; returns once it has its first view (see
/// the module doc), with a receiver whose current value is that view.
///
/// The source runs on a spawned task until `cancel` fires or every receiver
/// is dropped.
pub async fn start(
    settings: MembershipSettings,
    cancel: CancellationToken,
) -> Result<watch::Receiver<Arc<MembershipView>>, MembershipError> {
    let (publisher, mut receiver) = Publisher::new(source_name(&settings));
    match settings {
        MembershipSettings::Static(view) => static_list::start(view, publisher, cancel.clone()),
        MembershipSettings::Dns(dns) => dns::start(dns, publisher, cancel.clone()),
        MembershipSettings::Kubernetes(k8s) => {
            kube::start(k8s, publisher, cancel.clone()).await?;
        }
    }
    tokio::select! {
        changed = receiver.changed() => match changed {
            Ok(()) => {
                receiver.borrow_and_update();
                Ok(receiver)
            }
            Err(_) => Err(MembershipError::Cancelled),
        },
        () = cancel.cancelled() => Err(MembershipError::Cancelled),
    }
}

/// The source's name, for status and logs.
pub fn source_name(settings: &MembershipSettings) -> &'static str {
    match settings {
        MembershipSettings::Static(_) => "static",
        MembershipSettings::Dns(_) => "dns",
        MembershipSettings::Kubernetes(_) => "kubernetes",
    }
}

/// The sending side every source shares: sends a view only when it
/// differs from the last one (the first always goes out, so [`start`] sees
/// it), and logs what changed.
#[derive(Debug)]
pub(crate) struct Publisher {
    sender: watch::Sender<Arc<MembershipView>>,
    source: &'static str,
    published: bool,
}

impl Publisher {
    /// A publisher and the receiver [`start`] hands out.
    fn new(source: &'static str) -> (Self, watch::Receiver<Arc<MembershipView>>) {
        let (sender, receiver) = watch::channel(Arc::new(MembershipView::empty()));
        let publisher = Self {
            sender,
            source,
            published: false,
        };
        (publisher, receiver)
    }

    /// Publishes `view` if it differs from the current one.
    pub(crate) fn publish(&mut self, view: MembershipView) {
        let current = Arc::clone(&self.sender.borrow());
        let diff = current.diff(&view);
        if self.published && diff.is_empty() {
            return;
        }
        for peer in &diff.joined {
            info!(
                source = self.source,
                node = %peer.member.id,
                ip = %peer.ip,
                zone = peer.member.zone.as_deref().unwrap_or(""),
                rack = peer.member.rack.as_deref().unwrap_or(""),
                "member joined"
            );
        }
        for peer in &diff.left {
            info!(source = self.source, node = %peer.member.id, ip = %peer.ip, "member left");
        }
        for change in &diff.changed {
            info!(
                source = self.source,
                node = %change.after.member.id,
                ip = %change.after.ip,
                zone = change.after.member.zone.as_deref().unwrap_or(""),
                rack = change.after.member.rack.as_deref().unwrap_or(""),
                "member changed"
            );
        }
        info!(
            source = self.source,
            members = view.len(),
            first = !self.published,
            "membership view published"
        );
        self.published = true;
        self.sender.send_replace(Arc::new(view));
    }

    /// Resolves when every receiver is gone.
    pub(crate) async fn closed(&self) {
        self.sender.closed().await;
    }
}

/// The backoff of a source whose lookups or API calls fail:
/// [`RETRY_FIRST_DELAY`] doubling to [`RETRY_MAX_DELAY`], reset after a
/// success.
pub fn source_backoff() -> Backoff {
    Backoff::new(RetryPolicy::new(RETRY_FIRST_DELAY, RETRY_MAX_DELAY))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<MembershipConfig, toml::de::Error> {
        toml::from_str(toml_text)
    }

    fn error_of(toml_text: &str) -> String {
        match parse(toml_text).expect("parses").validate() {
            Ok(settings) => panic!("expected an error, got {settings:?}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn static_lists_parse_and_validate() {
        let config = parse(
            r#"
            source = "static"
            [[peers]]
            id = "gpu-1"
            address = "127.0.0.1:7070"
            zone = "a"
            [[peers]]
            id = "gpu-2"
            address = "127.0.0.2"
            weight = 2
            "#,
        )
        .expect("parses");
        let MembershipSettings::Static(view) = config.validate().expect("valid") else {
            panic!("static settings");
        };
        assert_eq!(view.len(), 2);
        assert_eq!(view.peers()[1].member.weight, 2);
        assert!(
            error_of(
                r#"
                source = "static"
                [[peers]]
                id = "gpu-1"
                address = "gpu-1.example"
                "#
            )
            .starts_with("invalid membership.peers[0].address:")
        );
        // An empty list is allowed: a single node with no peers.
        assert!(parse("source = \"static\"\npeers = []").is_ok());
    }

    #[test]
    fn dns_defaults_and_limits() {
        let config =
            parse("source = \"dns\"\nname = \"cairn-peers.cairn-system.svc\"").expect("parses");
        let MembershipSettings::Dns(dns) = config.validate().expect("valid") else {
            panic!("dns settings");
        };
        assert_eq!(dns.interval, Duration::from_secs(DEFAULT_DNS_INTERVAL_SECS));
        assert!(
            parse("source = \"dns\"\nname = \"localhost.\"\ninterval_secs = 5")
                .expect("parses")
                .validate()
                .is_ok()
        );
        for (text, field) in [
            (
                "source = \"dns\"\nname = \"a\"\ninterval_secs = 0",
                "membership.interval_secs",
            ),
            (
                "source = \"dns\"\nname = \"a\"\ninterval_secs = 3601",
                "membership.interval_secs",
            ),
            ("source = \"dns\"\nname = \"\"", "membership.name"),
            ("source = \"dns\"\nname = \"a..b\"", "membership.name"),
            ("source = \"dns\"\nname = \"a_b.svc\"", "membership.name"),
        ] {
            let err = error_of(text);
            assert!(err.starts_with(&format!("invalid {field}:")), "{err}");
        }
    }

    #[test]
    fn kubernetes_defaults_and_limits() {
        let config = parse(
            r#"
            source = "kubernetes"
            match_labels = { "app.kubernetes.io/name" = "cairn" }
            "#,
        )
        .expect("parses");
        let MembershipSettings::Kubernetes(k8s) = config.validate().expect("valid") else {
            panic!("kubernetes settings");
        };
        assert_eq!(k8s.namespace, None);
        assert_eq!(k8s.labels, TopologyLabels::default());
        assert_eq!(k8s.label_selector(), "app.kubernetes.io/name=cairn");

        for (text, field) in [
            (
                "source = \"kubernetes\"\nmatch_labels = {}",
                "membership.match_labels",
            ),
            (
                "source = \"kubernetes\"\nmatch_labels = { \"a b\" = \"x\" }",
                "membership.match_labels.\"a b\"",
            ),
            (
                "source = \"kubernetes\"\nmatch_labels = { app = \"-x\" }",
                "membership.match_labels.\"app\"",
            ),
            (
                "source = \"kubernetes\"\nnamespace = \"Cairn\"\nmatch_labels = { app = \"x\" }",
                "membership.namespace",
            ),
            (
                "source = \"kubernetes\"\nmatch_labels = { app = \"x\" }\nrack_label = \"/rack\"",
                "membership.rack_label",
            ),
        ] {
            let err = error_of(text);
            assert!(err.starts_with(&format!("invalid {field}:")), "{err}");
        }
    }

    #[test]
    fn unknown_sources_and_fields_are_refused() {
        for text in [
            "source = \"etcd\"",
            "name = \"x\"",
            "source = \"dns\"\nname = \"x\"\ninterval = 5",
            "source = \"static\"\npeers = []\nname = \"x\"",
            "source = \"static\"\n[[peers]]\nid = \"a\"\naddress = \"127.0.0.1\"\nport = 1",
            "source = \"kubernetes\"\nmatch_labels = { app = \"x\" }\nselector = \"app=x\"",
        ] {
            assert!(parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut backoff = source_backoff();
        let delays: Vec<u64> = (0..8)
            .map(|_| backoff.next_delay().as_secs_f64().round() as u64)
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), RETRY_FIRST_DELAY);
    }
}
