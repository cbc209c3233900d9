//! The DNS source: the addresses a name resolves to, looked up periodically.
//!
//! Meant for the headless `cairn-peers` Service, whose name resolves to one
//! A (or AAAA) record per ready daemon pod. Lookups go through the system
//! resolver (`tokio::net::lookup_host`, i.e. `getaddrinfo` on a blocking
//! thread), so `/etc/hosts`, search domains and the pod's DNS policy apply
//! as for any other program.
//!
//! # Limitations
//!
//! - A records carry only addresses: each address is one member, named after
//!   it (`cairn_core::membership::node_id_for_ip`), with no zone or rack, so
//!   placement cannot keep replicas out of a failure domain. Use the
//!   `kubernetes` source for that.
//! - Members are named by address, not node: a daemon whose pod IP changes
//!   (a restarted pod without host networking) is a new member, and placement
//!   moves its replicas. Run the DaemonSet with `hostNetwork` (node IPs are
//!   stable) or use the `kubernetes` source.
//! - Record ports (SRV) are not read: every member listens on the cluster's
//!   peer port.
//! - The system resolver cannot tell "no such name" from "resolver away", so
//!   a failed lookup keeps the previous view; a name with no records left
//!   never empties the view (this daemon is normally one of its records).
//! - The view changes no faster than `interval_secs` plus the records' TTL in
//!   any cache on the way.

use std::net::IpAddr;
use std::time::Duration;

use cairn_core::membership::view_from_addresses;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Publisher, source_backoff};

/// A validated DNS source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsSettings {
    /// The name to resolve.
    pub name: String,
    /// Time between two lookups.
    pub interval: Duration,
}

/// Resolves `name` to its distinct addresses, in no particular order.
pub async fn resolve(name: &str) -> std::io::Result<Vec<IpAddr>> {
    // The port is required by the API and ignored here.
    let addrs = tokio::net::lookup_host((name, 0)).await?;
    Ok(addrs.map(|addr| addr.ip()).collect())
}

/// Spawns the lookup loop: a lookup every `interval`, or sooner (with
/// backoff) while lookups fail.
pub(super) fn start(settings: DnsSettings, mut publisher: Publisher, cancel: CancellationToken) {
    tokio::spawn(async move {
        let mut backoff = source_backoff();
        loop {
            let delay = match resolve(&settings.name).await {
                Ok(addresses) => {
                    backoff.reset();
                    publisher.publish(view_from_addresses(addresses));
                    settings.interval
                }
                Err(error) => {
                    let delay = backoff.next_delay().min(settings.interval);
                    warn!(
                        name = %settings.name,
                        %error,
                        retry_in = ?delay,
                        "membership: dns lookup failed; keeping the last view"
                    );
                    delay
                }
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = publisher.closed() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::super::{MembershipConfig, MembershipError, start as start_source};
    use super::*;

    fn dns(name: &str, interval_secs: u64) -> super::super::MembershipSettings {
        MembershipConfig::Dns {
            name: name.into(),
            interval_secs: Some(interval_secs),
        }
        .validate()
        .expect("valid")
    }

    /// `localhost` resolves on every machine, to 127.0.0.1 and/or ::1: a
    /// real lookup through the system resolver.
    #[tokio::test]
    async fn localhost_resolves_to_loopback_members() {
        let cancel = CancellationToken::new();
        let receiver = start_source(dns("localhost", 1), cancel.clone())
            .await
            .expect("starts");
        let view = receiver.borrow().clone();
        assert!(!view.is_empty());
        for peer in view.peers() {
            assert!(peer.ip.is_loopback(), "{peer}");
            assert!(peer.member.zone.is_none() && peer.member.rack.is_none());
            assert_eq!(peer.port, None);
        }
        let ids: Vec<&str> = view.peers().iter().map(|p| p.id().as_str()).collect();
        assert!(
            ids.iter()
                .all(|id| *id == "127.0.0.1" || *id == "0000-0000-0000-0000-0000-0000-0000-0001"),
            "{ids:?}"
        );
        cancel.cancel();
    }

    /// An IP literal "resolves" to itself, with no DNS server involved; the
    /// loop keeps publishing nothing new while the answer stays the same.
    #[tokio::test]
    async fn an_ip_literal_is_one_member_and_repeats_publish_nothing() {
        assert_eq!(
            resolve("127.0.0.1").await.expect("resolves"),
            [IpAddr::V4(Ipv4Addr::LOCALHOST)]
        );
        assert_eq!(
            resolve("::1").await.expect("resolves"),
            [IpAddr::V6(Ipv6Addr::LOCALHOST)]
        );
        // The validated config only takes names; literals go through the
        // start path directly.
        let (publisher, mut receiver) = Publisher::new("dns");
        let cancel = CancellationToken::new();
        start(
            DnsSettings {
                name: "127.0.0.1".into(),
                interval: Duration::from_millis(20),
            },
            publisher,
            cancel.clone(),
        );
        receiver.changed().await.expect("first view");
        let view = receiver.borrow_and_update().clone();
        assert_eq!(view.len(), 1);
        assert_eq!(view.peers()[0].id().as_str(), "127.0.0.1");
        // Several lookups happen in 200 ms; none changes the view.
        let waited = tokio::time::timeout(Duration::from_millis(200), receiver.changed()).await;
        assert!(waited.is_err(), "an unchanged answer is not republished");
        cancel.cancel();
    }

    /// A name that cannot resolve (the reserved `.invalid` top-level domain,
    /// RFC 2606) never yields a first view; `start` waits, retrying, until
    /// cancelled.
    #[tokio::test]
    async fn an_unresolvable_name_waits_until_cancelled() {
        assert!(resolve("cairn-test.invalid").await.is_err());
        let cancel = CancellationToken::new();
        let canceller = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            canceller.cancel();
        });
        let result = start_source(dns("cairn-test.invalid", 1), cancel).await;
        assert!(
            matches!(result, Err(MembershipError::Cancelled)),
            "{result:?}"
        );
    }
}
