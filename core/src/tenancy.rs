//! Which tenant a pod's CSI volume acts for.
//!
//! A pod must never choose its tenant: anything in its spec (a volume
//! attribute) is the pod's word, while the namespace is the kubelet's
//! (`csi.storage.k8s.io/pod.namespace`, sent because the CSIDriver sets
//! `podInfoOnMount`, and overriding any attribute of that name the pod
//! wrote). So the tenant is the namespace, or what the operator's
//! [`TenantMap`] maps it to (several namespaces of one team sharing
//! checkpoints). A `tenant` attribute is accepted only when it names that
//! same tenant, so existing specs that spell it out keep working and a spec
//! naming another team's tenant is refused rather than silently corrected.

use std::collections::BTreeMap;
use std::fmt;

use crate::names::TenantName;

/// The operator's namespace → tenant map (`[tenants] namespaces` in
/// `cairnd.toml`). A namespace not in it is its own tenant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantMap {
    by_namespace: BTreeMap<TenantName, TenantName>,
}

impl TenantMap {
    /// The map from validated `(namespace, tenant)` pairs.
    pub fn new(entries: impl IntoIterator<Item = (TenantName, TenantName)>) -> Self {
        Self {
            by_namespace: entries.into_iter().collect(),
        }
    }

    /// The tenant of `namespace`.
    pub fn tenant_of(&self, namespace: &TenantName) -> TenantName {
        self.by_namespace
            .get(namespace)
            .unwrap_or(namespace)
            .clone()
    }

    /// How many namespaces are mapped.
    pub fn len(&self) -> usize {
        self.by_namespace.len()
    }

    /// Whether no namespace is mapped.
    pub fn is_empty(&self) -> bool {
        self.by_namespace.is_empty()
    }
}

/// Per-tenant limits on the bytes a tenant holds in a node's memory tier
/// (`[tenants] memory_quota_bytes` and `[tenants.memory_quotas]`), so one
/// team's saves cannot push another team's steps out of memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryQuotas {
    default: Option<u64>,
    by_tenant: BTreeMap<TenantName, u64>,
}

/// A reservation a tenant's quota does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverQuota {
    /// The tenant's quota.
    pub quota: u64,
    /// What it would hold with the reservation.
    pub would_hold: u64,
    /// By how much that is over the quota.
    pub excess: u64,
}

impl MemoryQuotas {
    /// Quotas: `default` for every tenant not in `by_tenant` (None: no
    /// limit for them).
    pub fn new(
        default: Option<u64>,
        by_tenant: impl IntoIterator<Item = (TenantName, u64)>,
    ) -> Self {
        Self {
            default,
            by_tenant: by_tenant.into_iter().collect(),
        }
    }

    /// Whether any tenant has a quota.
    pub fn is_enabled(&self) -> bool {
        self.default.is_some() || !self.by_tenant.is_empty()
    }

    /// `tenant`'s quota, if it has one.
    pub fn of(&self, tenant: &TenantName) -> Option<u64> {
        self.by_tenant.get(tenant).copied().or(self.default)
    }

    /// Whether `tenant`, holding `held` bytes, may reserve `requested`
    /// more; the overrun when not. Sums saturate: a request too large to
    /// add up is over any quota.
    pub fn check(&self, tenant: &TenantName, held: u64, requested: u64) -> Result<(), OverQuota> {
        let Some(quota) = self.of(tenant) else {
            return Ok(());
        };
        let would_hold = held.saturating_add(requested);
        if would_hold <= quota {
            Ok(())
        } else {
            Err(OverQuota {
                quota,
                would_hold,
                excess: would_hold.saturating_sub(quota),
            })
        }
    }
}

/// Why a volume has no tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeTenantError {
    /// The kubelet did not say which namespace the pod is in.
    NoNamespace,
    /// The pod's `tenant` attribute names a tenant its namespace is not.
    Mismatch {
        /// What the pod asked for.
        requested: TenantName,
        /// The pod's namespace.
        namespace: TenantName,
        /// The tenant that namespace is.
        tenant: TenantName,
    },
}

impl fmt::Display for VolumeTenantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoNamespace => f.write_str(
                "the volume does not say which namespace its pod is in \
                 (csi.storage.k8s.io/pod.namespace; the CSIDriver needs podInfoOnMount: true), \
                 and a pod cannot choose its tenant",
            ),
            Self::Mismatch {
                requested,
                namespace,
                tenant,
            } => write!(
                f,
                "the volume asks for tenant {requested:?} but its pod is in namespace \
                 {namespace:?}, which is tenant {tenant:?}; drop the tenant attribute, or map \
                 the namespace in cairnd.toml [tenants] namespaces"
            ),
        }
    }
}

impl std::error::Error for VolumeTenantError {}

/// The tenant a volume acts for: its pod's namespace through `map`; a
/// `requested` tenant (the pod's `tenant` attribute) must agree.
pub fn volume_tenant(
    map: &TenantMap,
    namespace: Option<&TenantName>,
    requested: Option<&TenantName>,
) -> Result<TenantName, VolumeTenantError> {
    let namespace = namespace.ok_or(VolumeTenantError::NoNamespace)?;
    let tenant = map.tenant_of(namespace);
    match requested {
        Some(requested) if *requested != tenant => Err(VolumeTenantError::Mismatch {
            requested: requested.clone(),
            namespace: namespace.clone(),
            tenant,
        }),
        _ => Ok(tenant),
    }
}

#[cfg(test)]
#[allow(
    clippy::arithmetic_side_effects,
    reason = "tests compute expected values from small, known inputs"
)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn t(name: &str) -> TenantName {
        TenantName::parse("t", name.into()).expect("valid")
    }

    #[test]
    fn the_namespace_decides_and_the_operator_may_map_it() {
        let map = TenantMap::new([(t("ml-dev"), t("ml")), (t("ml-prod"), t("ml"))]);
        assert_eq!(
            volume_tenant(&map, Some(&t("team-a")), None),
            Ok(t("team-a"))
        );
        assert_eq!(volume_tenant(&map, Some(&t("ml-dev")), None), Ok(t("ml")));
        assert_eq!(
            volume_tenant(&map, Some(&t("ml-prod")), Some(&t("ml"))),
            Ok(t("ml"))
        );
        assert_eq!(
            volume_tenant(&map, None, Some(&t("ml"))),
            Err(VolumeTenantError::NoNamespace)
        );
    }

    #[test]
    fn a_pod_naming_another_tenant_is_refused() {
        let map = TenantMap::new([(t("ml-dev"), t("ml"))]);
        let err = volume_tenant(&map, Some(&t("team-a")), Some(&t("team-b")))
            .expect_err("another tenant");
        assert_eq!(
            err,
            VolumeTenantError::Mismatch {
                requested: t("team-b"),
                namespace: t("team-a"),
                tenant: t("team-a")
            }
        );
        let text = err.to_string();
        assert!(text.contains("team-b") && text.contains("team-a"), "{text}");
        // A mapped namespace cannot ask for its own name back either.
        assert!(volume_tenant(&map, Some(&t("ml-dev")), Some(&t("ml-dev"))).is_err());
    }

    #[test]
    fn quotas_apply_per_tenant_with_a_default() {
        let quotas = MemoryQuotas::new(Some(100), [(t("big"), 1000)]);
        assert!(quotas.is_enabled());
        assert_eq!(quotas.check(&t("a"), 60, 40), Ok(()));
        assert_eq!(
            quotas.check(&t("a"), 60, 41),
            Err(OverQuota {
                quota: 100,
                would_hold: 101,
                excess: 1
            })
        );
        assert_eq!(quotas.check(&t("big"), 900, 100), Ok(()));
        assert!(quotas.check(&t("a"), u64::MAX, u64::MAX).is_err());
        let none = MemoryQuotas::default();
        assert!(!none.is_enabled());
        assert_eq!(none.check(&t("a"), u64::MAX, u64::MAX), Ok(()));
    }

    proptest! {
        /// A tenant within its quota is never refused, one over it always
        /// is, and the excess is exactly the overrun.
        #[test]
        fn a_quota_refuses_exactly_what_exceeds_it(
            quota in 0u64..1 << 40, held in 0u64..1 << 40, requested in 0u64..1 << 40,
        ) {
            let quotas = MemoryQuotas::new(Some(quota), []);
            match quotas.check(&t("a"), held, requested) {
                Ok(()) => prop_assert!(held + requested <= quota),
                Err(over) => {
                    prop_assert!(held + requested > quota);
                    prop_assert_eq!(over.excess, held + requested - quota);
                }
            }
        }

        /// Whatever a pod asks for, the result is its namespace's tenant or
        /// an error: never the requested tenant when it differs.
        #[test]
        fn the_result_never_depends_on_what_the_pod_asks(
            ns in "[a-z][a-z0-9]{0,8}",
            requested in proptest::option::of("[a-z][a-z0-9]{0,8}"),
            mapped in proptest::option::of("[a-z][a-z0-9]{0,8}"),
        ) {
            let ns = t(&ns);
            let map = TenantMap::new(mapped.as_deref().map(|m| (ns.clone(), t(m))));
            let expected = map.tenant_of(&ns);
            let requested = requested.as_deref().map(t);
            match volume_tenant(&map, Some(&ns), requested.as_ref()) {
                Ok(tenant) => prop_assert_eq!(tenant, expected),
                Err(VolumeTenantError::Mismatch { tenant, .. }) => {
                    prop_assert_eq!(&tenant, &expected);
                    prop_assert_ne!(requested, Some(expected));
                }
                Err(VolumeTenantError::NoNamespace) => prop_assert!(false),
            }
        }
    }
}
