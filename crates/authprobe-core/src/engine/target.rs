//! Target resources the live chain can test with `testIamPermissions`.

/// A target resource, by the API that answers `testIamPermissions` for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetKind {
    /// `//cloudresourcemanager.googleapis.com/projects/P`.
    Project { project: String },
    /// `//iam.googleapis.com/projects/P/serviceAccounts/EMAIL`.
    ServiceAccount { project: String, email: String },
    /// `//storage.googleapis.com/projects/_/buckets/B`.
    Bucket { bucket: String },
    /// `//secretmanager.googleapis.com/projects/P/secrets/S`.
    Secret { project: String, secret: String },
    /// `//pubsub.googleapis.com/projects/P/topics/T`.
    Topic { project: String, topic: String },
    /// `//pubsub.googleapis.com/projects/P/subscriptions/S`.
    Subscription { project: String, subscription: String },
}

impl TargetKind {
    /// The Google service (endpoint host prefix) that answers for this kind.
    pub fn service(&self) -> &'static str {
        match self {
            TargetKind::Project { .. } => "cloudresourcemanager",
            TargetKind::ServiceAccount { .. } => "iam",
            TargetKind::Bucket { .. } => "storage",
            TargetKind::Secret { .. } => "secretmanager",
            TargetKind::Topic { .. } | TargetKind::Subscription { .. } => "pubsub",
        }
    }

    /// The path of this resource's testIamPermissions on [`TargetKind::service`]. Cloud Storage
    /// takes the permissions in the query of a GET; the others in the JSON body of a POST.
    pub fn test_permissions_path(&self) -> String {
        match self {
            TargetKind::Bucket { bucket } => format!("/storage/v1/b/{bucket}/iam/testPermissions"),
            TargetKind::Project { project } => format!("/v1/projects/{project}:testIamPermissions"),
            TargetKind::ServiceAccount { project, email } => {
                format!("/v1/projects/{project}/serviceAccounts/{email}:testIamPermissions")
            }
            TargetKind::Secret { project, secret } => {
                format!("/v1/projects/{project}/secrets/{secret}:testIamPermissions")
            }
            TargetKind::Topic { project, topic } => {
                format!("/v1/projects/{project}/topics/{topic}:testIamPermissions")
            }
            TargetKind::Subscription { project, subscription } => {
                format!("/v1/projects/{project}/subscriptions/{subscription}:testIamPermissions")
            }
        }
    }
}

/// Parses a full resource name; the error names the kinds that are supported.
pub fn parse_target(resource: &str) -> Result<TargetKind, String> {
    // Google's resource IDs use letters, digits and `-_.~+`; a service account is an email (one `@`).
    // Nothing that could change a URL's host, path, query or fragment gets through.
    let id_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~' | '+');
    let segment_ok =
        |s: &str| !s.is_empty() && s.len() <= 255 && s != "." && s != ".." && s.chars().all(id_char);
    let email_ok = |s: &str| s.split_once('@').is_some_and(|(a, d)| segment_ok(a) && segment_ok(d));
    let parts: Vec<&str> = resource.strip_prefix("//").unwrap_or("").split('/').collect();
    let kind = match parts.as_slice() {
        ["cloudresourcemanager.googleapis.com", "projects", p] => {
            TargetKind::Project { project: (*p).into() }
        }
        ["iam.googleapis.com", "projects", p, "serviceAccounts", e] => {
            TargetKind::ServiceAccount { project: (*p).into(), email: (*e).into() }
        }
        ["storage.googleapis.com", "projects", "_", "buckets", b] => {
            TargetKind::Bucket { bucket: (*b).into() }
        }
        ["secretmanager.googleapis.com", "projects", p, "secrets", s] => {
            TargetKind::Secret { project: (*p).into(), secret: (*s).into() }
        }
        ["pubsub.googleapis.com", "projects", p, "topics", t] => {
            TargetKind::Topic { project: (*p).into(), topic: (*t).into() }
        }
        ["pubsub.googleapis.com", "projects", p, "subscriptions", s] => {
            TargetKind::Subscription { project: (*p).into(), subscription: (*s).into() }
        }
        _ => {
            return Err(format!(
                "target {:?} is not a resource the live chain can test: use a project, service account, \
                 Cloud Storage bucket, Secret Manager secret, or Pub/Sub topic or subscription",
                super::annotation::truncate(resource, 200)
            ));
        }
    };
    let segments_ok = match &kind {
        TargetKind::Project { project } => segment_ok(project),
        TargetKind::ServiceAccount { project, email } => segment_ok(project) && email_ok(email),
        TargetKind::Bucket { bucket } => segment_ok(bucket),
        TargetKind::Secret { project, secret } => segment_ok(project) && segment_ok(secret),
        TargetKind::Topic { project, topic } => segment_ok(project) && segment_ok(topic),
        TargetKind::Subscription { project, subscription } => segment_ok(project) && segment_ok(subscription),
    };
    if segments_ok {
        Ok(kind)
    } else {
        Err(format!(
            "target {:?} has an empty or malformed segment",
            super::annotation::truncate(resource, 200)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_kinds_parse() {
        assert_eq!(
            parse_target("//storage.googleapis.com/projects/_/buckets/payments-data"),
            Ok(TargetKind::Bucket { bucket: "payments-data".into() })
        );
        assert_eq!(
            parse_target("//cloudresourcemanager.googleapis.com/projects/acme-prod"),
            Ok(TargetKind::Project { project: "acme-prod".into() })
        );
        assert!(matches!(
            parse_target(
                "//iam.googleapis.com/projects/acme-prod/serviceAccounts/x@acme-prod.iam.gserviceaccount.com"
            ),
            Ok(TargetKind::ServiceAccount { .. })
        ));
        assert!(matches!(
            parse_target("//secretmanager.googleapis.com/projects/acme-prod/secrets/db"),
            Ok(TargetKind::Secret { .. })
        ));
        assert!(matches!(
            parse_target("//pubsub.googleapis.com/projects/acme-prod/topics/orders"),
            Ok(TargetKind::Topic { .. })
        ));
        assert!(matches!(
            parse_target("//pubsub.googleapis.com/projects/acme-prod/subscriptions/orders-sub"),
            Ok(TargetKind::Subscription { .. })
        ));
    }

    #[test]
    fn each_kind_has_its_test_permissions_path() {
        let path = |r: &str| parse_target(r).unwrap().test_permissions_path();
        assert_eq!(
            path("//storage.googleapis.com/projects/_/buckets/b"),
            "/storage/v1/b/b/iam/testPermissions"
        );
        assert_eq!(
            path("//cloudresourcemanager.googleapis.com/projects/p"),
            "/v1/projects/p:testIamPermissions"
        );
        assert_eq!(
            path("//iam.googleapis.com/projects/p/serviceAccounts/x@p.iam.gserviceaccount.com"),
            "/v1/projects/p/serviceAccounts/x@p.iam.gserviceaccount.com:testIamPermissions"
        );
        assert_eq!(
            path("//secretmanager.googleapis.com/projects/p/secrets/s"),
            "/v1/projects/p/secrets/s:testIamPermissions"
        );
        assert_eq!(
            path("//pubsub.googleapis.com/projects/p/topics/t"),
            "/v1/projects/p/topics/t:testIamPermissions"
        );
        assert_eq!(
            path("//pubsub.googleapis.com/projects/p/subscriptions/s"),
            "/v1/projects/p/subscriptions/s:testIamPermissions"
        );
    }

    #[test]
    fn other_resources_are_refused() {
        for bad in [
            "//bigquery.googleapis.com/projects/acme/datasets/d",
            "//storage.googleapis.com/projects/acme/buckets/b",
            "//storage.googleapis.com/projects/_/buckets/",
            "//storage.googleapis.com/projects/_/buckets/b/objects/o",
            "//storage.googleapis.com/projects/_/buckets/b%2F..",
            "//storage.googleapis.com/projects/_/buckets/b@127.0.0.1:8080",
            "//storage.googleapis.com/projects/_/buckets/..",
            "//storage.googleapis.com/projects/_/buckets/b?x=1",
            "//iam.googleapis.com/projects/p/serviceAccounts/x@127.0.0.1:1#",
            "//iam.googleapis.com/projects/p/serviceAccounts/no-at-sign",
            "storage.googleapis.com/projects/_/buckets/b",
            "//evil.example.com/projects/_/buckets/b",
            "",
        ] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }
}
