//! The static source: a fixed list of peers from the configuration.
//!
//! For clusters without DNS or Kubernetes, and for tests. The view never
//! changes while the daemon runs; changing the list takes a restart (every
//! daemon's list should change together, or they place replicas
//! differently until they agree).

use tokio_util::sync::CancellationToken;

use cairn_core::MembershipView;

use super::Publisher;

/// Publishes `view` and keeps the channel open until `cancel` fires or
/// every receiver is gone, so receivers never see the source end early.
pub(super) fn start(view: MembershipView, mut publisher: Publisher, cancel: CancellationToken) {
    publisher.publish(view);
    tokio::spawn(async move {
        tokio::select! {
            () = cancel.cancelled() => {}
            () = publisher.closed() => {}
        }
    });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use cairn_core::StaticPeer;
    use cairn_core::membership::view_from_static;

    use super::super::{MembershipConfig, start as start_source};
    use super::*;

    #[tokio::test]
    async fn the_static_list_is_the_first_and_only_view() {
        let config = MembershipConfig::Static {
            peers: vec![
                StaticPeer {
                    id: "node-b".into(),
                    address: "127.0.0.2:7070".into(),
                    zone: Some("z".into()),
                    rack: None,
                    weight: None,
                },
                StaticPeer {
                    id: "node-a".into(),
                    address: "127.0.0.1:7070".into(),
                    zone: None,
                    rack: None,
                    weight: None,
                },
            ],
        };
        let expected = view_from_static(
            "membership.peers",
            match &config {
                MembershipConfig::Static { peers } => peers,
                _ => unreachable!(),
            },
        )
        .expect("valid");
        let cancel = CancellationToken::new();
        let mut receiver = start_source(config.validate().expect("valid"), cancel.clone())
            .await
            .expect("starts");
        assert_eq!(**receiver.borrow(), expected);
        let ids: Vec<&str> = expected.peers().iter().map(|p| p.id().as_str()).collect();
        assert_eq!(ids, ["node-a", "node-b"]);
        // Nothing more comes, and the source stays up until cancelled.
        let waited = tokio::time::timeout(Duration::from_millis(100), receiver.changed()).await;
        assert!(waited.is_err(), "no second view");
        cancel.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(5), receiver.changed()).await;
        assert!(matches!(ended, Ok(Err(_))), "the channel closes on cancel");
    }
}
