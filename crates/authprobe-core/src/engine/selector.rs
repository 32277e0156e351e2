//! Label selector matching, with Kubernetes' semantics, and validation of what admission cannot check.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::Expression;

/// Labels as Kubernetes objects carry them.
pub type Labels = BTreeMap<String, String>;

/// No labels at all, for objects that carry none.
pub static NO_LABELS: Labels = BTreeMap::new();

/// An object's labels, read one key at a time: the operator's compact index lends interned
/// labels through this without building a map per object.
pub trait LabelLookup: std::fmt::Debug {
    /// The value of label `key`.
    fn label(&self, key: &str) -> Option<&str>;
}

impl LabelLookup for Labels {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// A selector that was checked once and can be matched many times. Parsing into expressions is
/// kube's; what is authprobe's own is the validation of keys, values and operators that admission
/// cannot do, and matching through [`LabelLookup`] (kube's matching needs a whole map).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector(Vec<Expression>);

impl Selector {
    /// Parses a LabelSelector; `{}` selects everything.
    pub fn parse(selector: &LabelSelector) -> Result<Self, String> {
        for (key, value) in selector.match_labels.iter().flatten() {
            check_key(key)?;
            check_value(value)?;
        }
        for expr in selector.match_expressions.iter().flatten() {
            check_key(&expr.key)?;
            let values = expr.values.as_deref().unwrap_or_default();
            for value in values {
                check_value(value)?;
            }
            let well_formed = match expr.operator.as_str() {
                "In" | "NotIn" => !values.is_empty(),
                "Exists" | "DoesNotExist" => values.is_empty(),
                _ => false,
            };
            if !well_formed {
                return Err(format!(
                    "selector expression on {:?} with operator {:?} is malformed",
                    expr.key, expr.operator
                ));
            }
        }
        kube::core::Selector::try_from(selector.clone())
            .map(|s| Self(s.into_iter().collect()))
            .map_err(|e| format!("selector: {e}"))
    }

    /// Whether an object with these labels is selected: every expression holds, as in kube.
    pub fn matches(&self, labels: &dyn LabelLookup) -> bool {
        self.0.iter().all(|expression| match expression {
            Expression::In(key, values) => labels.label(key).is_some_and(|v| values.contains(v)),
            Expression::NotIn(key, values) => labels.label(key).is_none_or(|v| !values.contains(v)),
            Expression::Exists(key) => labels.label(key).is_some(),
            Expression::DoesNotExist(key) => labels.label(key).is_none(),
            Expression::Equal(key, value) => labels.label(key) == Some(value),
            Expression::NotEqual(key, value) => labels.label(key) != Some(value),
        })
    }
}

/// `[prefix/]name`: a DNS subdomain prefix and a name of at most 63 characters.
fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = key.rsplit_once('/').map_or((None, key), |(p, n)| (Some(p), n));
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            })
    });
    if prefix_ok && !name.is_empty() && is_label_value(name) {
        Ok(())
    } else {
        Err(format!("selector label key {key:?} is not a valid label key"))
    }
}

fn check_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_label_value(value) {
        Ok(())
    } else {
        Err(format!("selector label value {value:?} is not a valid label value"))
    }
}

fn is_label_value(s: &str) -> bool {
    let bytes = s.as_bytes();
    s.len() <= 63
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| (*v).into()).collect()),
        }
    }

    #[test]
    fn empty_selects_everything() {
        let s = Selector::parse(&LabelSelector::default()).unwrap();
        assert!(s.matches(&NO_LABELS));
        assert!(s.matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_and_expressions_all_hold() {
        let s = Selector::parse(&LabelSelector {
            match_labels: Some(labels(&[("team", "payments")])),
            match_expressions: Some(vec![
                expr("env", "In", &["prod", "staging"]),
                expr("legacy", "DoesNotExist", &[]),
                expr("tier", "NotIn", &["batch"]),
                expr("owner", "Exists", &[]),
            ]),
        })
        .unwrap();
        assert!(s.matches(&labels(&[("team", "payments"), ("env", "prod"), ("owner", "x")])));
        assert!(!s.matches(&labels(&[("team", "payments"), ("env", "dev"), ("owner", "x")])));
        assert!(!s.matches(&labels(&[("team", "payments"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[
            ("team", "payments"),
            ("env", "prod"),
            ("owner", "x"),
            ("legacy", "")
        ])));
        assert!(!s.matches(&labels(&[
            ("team", "payments"),
            ("env", "prod"),
            ("owner", "x"),
            ("tier", "batch")
        ])));
        assert!(!s.matches(&NO_LABELS));
    }

    #[test]
    fn matching_agrees_with_kube_on_every_operator() {
        let selectors = [
            LabelSelector { match_labels: Some(labels(&[("team", "payments")])), ..Default::default() },
            LabelSelector { match_labels: Some(labels(&[("team", "")])), ..Default::default() },
            LabelSelector {
                match_expressions: Some(vec![expr("team", "In", &["payments", ""])]),
                ..Default::default()
            },
            LabelSelector {
                match_expressions: Some(vec![expr("team", "NotIn", &["payments"])]),
                ..Default::default()
            },
            LabelSelector {
                match_expressions: Some(vec![expr("team", "Exists", &[])]),
                ..Default::default()
            },
            LabelSelector {
                match_expressions: Some(vec![expr("team", "DoesNotExist", &[])]),
                ..Default::default()
            },
        ];
        let objects = [
            labels(&[]),
            labels(&[("team", "payments")]),
            labels(&[("team", "")]),
            labels(&[("team", "search"), ("env", "prod")]),
            labels(&[("env", "prod")]),
        ];
        for selector in &selectors {
            let ours = Selector::parse(selector).unwrap();
            let kubes = kube::core::Selector::try_from(selector.clone()).unwrap();
            for object in &objects {
                let expected = kube::core::SelectorExt::matches(&kubes, object);
                assert_eq!(ours.matches(object), expected, "{selector:?} on {object:?}");
            }
        }
    }

    #[test]
    fn malformed_selectors_are_refused() {
        for bad in [
            LabelSelector { match_labels: Some(labels(&[("team payments", "x")])), ..Default::default() },
            LabelSelector { match_labels: Some(labels(&[("team", "a b")])), ..Default::default() },
            LabelSelector { match_labels: Some(labels(&[("Bad_Prefix/team", "x")])), ..Default::default() },
            LabelSelector { match_expressions: Some(vec![expr("team", "In", &[])]), ..Default::default() },
            LabelSelector {
                match_expressions: Some(vec![expr("team", "Exists", &["x"])]),
                ..Default::default()
            },
            LabelSelector { match_expressions: Some(vec![expr("team", "Gt", &["1"])]), ..Default::default() },
        ] {
            assert!(Selector::parse(&bad).is_err(), "{bad:?}");
        }
        let ok =
            LabelSelector { match_labels: Some(labels(&[("example.com/team", "")])), ..Default::default() };
        assert!(Selector::parse(&ok).is_ok());
    }
}
