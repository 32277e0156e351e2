//! Whether a GSA's allow policy lets a KSA's principal impersonate it.

use super::{
    facts::Policy,
    principal::{KsaIdentity, parse_member},
};

/// Roles that carry `iam.serviceAccounts.getAccessToken` on a service account.
pub const IMPERSONATION_ROLES: [&str; 2] =
    ["roles/iam.workloadIdentityUser", "roles/iam.serviceAccountTokenCreator"];

/// What the policy says about one KSA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// An unconditional binding of an impersonation role covers the KSA.
    Mapped { member: String },
    /// Only bindings under an IAM condition cover it.
    Conditional { member: String, condition: String },
    /// Only `deleted:` members cover it.
    Deleted { member: String },
    /// Nothing covers it; `near_misses` are members that name something close.
    NotMapped { near_misses: Vec<(String, &'static str)> },
}

/// Evaluates `policy` for `identity`. An unconditional live member wins over everything else.
pub fn evaluate(policy: &Policy, identity: &KsaIdentity) -> Mapping {
    let mut conditional = None;
    let mut deleted = None;
    let mut near_misses = Vec::new();
    for binding in policy.bindings.iter().filter(|b| IMPERSONATION_ROLES.contains(&b.role.as_str())) {
        for raw in &binding.members {
            let parsed = parse_member(raw);
            if !identity.covered_by(&parsed.member) {
                if let Some(why) = identity.near_miss(&parsed.member)
                    && !parsed.deleted
                {
                    near_misses.push((raw.clone(), why));
                }
                continue;
            }
            match (&binding.condition, parsed.deleted) {
                (None, false) => return Mapping::Mapped { member: raw.clone() },
                (Some(condition), false) => {
                    let described = if condition.title.is_empty() {
                        condition.expression.clone()
                    } else {
                        format!("{} ({})", condition.title, condition.expression)
                    };
                    conditional.get_or_insert((raw.clone(), described));
                }
                (_, true) => {
                    deleted.get_or_insert(raw.clone());
                }
            }
        }
    }
    match (conditional, deleted) {
        (Some((member, condition)), _) => Mapping::Conditional { member, condition },
        (None, Some(member)) => Mapping::Deleted { member },
        (None, None) => {
            near_misses.truncate(3);
            Mapping::NotMapped { near_misses }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::engine::{
        facts::{Binding, Expr},
        principal::PoolRef,
    };

    fn identity() -> KsaIdentity {
        KsaIdentity {
            pool: PoolRef {
                project_number: Some("123456789012".into()),
                pool_id: "acme-prod.svc.id.goog".into(),
            },
            gke_project_id: Some("acme-prod".into()),
            namespace: "checkout".into(),
            name: "app".into(),
            uid: None,
            subject: "ns/checkout/sa/app".into(),
            attributes: BTreeMap::new(),
            groups: vec![],
            cluster: None,
        }
    }

    fn binding(role: &str, members: &[&str], condition: Option<&str>) -> Binding {
        Binding {
            role: role.into(),
            members: members.iter().map(|m| (*m).into()).collect(),
            condition: condition.map(|e| Expr {
                expression: e.into(),
                title: "business-hours".into(),
                ..Default::default()
            }),
        }
    }

    const ME: &str = "serviceAccount:acme-prod.svc.id.goog[checkout/app]";
    const WIU: &str = "roles/iam.workloadIdentityUser";

    fn eval(bindings: Vec<Binding>) -> Mapping {
        evaluate(&Policy { version: 3, etag: "e".into(), bindings }, &identity())
    }

    #[test]
    fn an_unconditional_binding_maps_the_ksa() {
        assert_eq!(eval(vec![binding(WIU, &[ME], None)]), Mapping::Mapped { member: ME.into() });
        let tc = binding("roles/iam.serviceAccountTokenCreator", &[ME], None);
        assert!(matches!(eval(vec![tc]), Mapping::Mapped { .. }));
    }

    #[test]
    fn the_wrong_role_does_not_map_it() {
        let viewer = binding("roles/iam.serviceAccountUser", &[ME], None);
        assert!(matches!(eval(vec![viewer]), Mapping::NotMapped { .. }));
    }

    #[test]
    fn conditional_and_deleted_bindings_are_told_apart() {
        let cond = binding(WIU, &[ME], Some("request.time.getHours() < 18"));
        assert_eq!(
            eval(vec![cond.clone()]),
            Mapping::Conditional {
                member: ME.into(),
                condition: "business-hours (request.time.getHours() < 18)".into()
            }
        );
        let deleted = format!("deleted:{ME}?uid=42");
        assert_eq!(eval(vec![binding(WIU, &[&deleted], None)]), Mapping::Deleted { member: deleted.clone() });
        // A live unconditional binding anywhere wins.
        let mapped = eval(vec![cond, binding(WIU, &[&deleted], None), binding(WIU, &[ME], None)]);
        assert_eq!(mapped, Mapping::Mapped { member: ME.into() });
    }

    #[test]
    fn a_binding_for_another_namespace_is_named_as_a_near_miss() {
        let other = "serviceAccount:acme-prod.svc.id.goog[billing/app]";
        match eval(vec![binding(WIU, &[other, "user:alice@example.com"], None)]) {
            Mapping::NotMapped { near_misses } => {
                assert_eq!(
                    near_misses,
                    vec![(other.to_string(), "the same ServiceAccount name in another namespace")]
                );
            }
            m => panic!("{m:?}"),
        }
        assert_eq!(eval(vec![]), Mapping::NotMapped { near_misses: vec![] });
    }
}
