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
    /// `//run.googleapis.com/projects/P/locations/L/services/S`: invoked with an ID token.
    CloudRun { project: String, location: String, service: String },
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
            TargetKind::CloudRun { .. } => "run",
        }
    }

    /// The permissions a target of this kind needs when its spec names none.
    pub fn default_permissions(&self) -> Option<Vec<String>> {
        matches!(self, TargetKind::CloudRun { .. }).then(|| vec![super::stage::cloud_run::INVOKE.to_string()])
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
            TargetKind::CloudRun { project, location, service } => {
                format!("/v2/projects/{project}/locations/{location}/services/{service}:testIamPermissions")
            }
        }
    }

    /// A Cloud Run service's name, `projects/P/locations/L/services/S`, which the operator reads
    /// at `GET run.googleapis.com/v2/NAME` for its URLs and audiences.
    pub fn cloud_run_service(&self) -> Option<String> {
        match self {
            TargetKind::CloudRun { project, location, service } => {
                Some(format!("projects/{project}/locations/{location}/services/{service}"))
            }
            _ => None,
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
        ["run.googleapis.com", "projects", p, "locations", l, "services", s] => {
            TargetKind::CloudRun { project: (*p).into(), location: (*l).into(), service: (*s).into() }
        }
        _ => {
            return Err(format!(
                "target {:?} is not a resource the live chain can test: use a project, service account, \
                 Cloud Storage bucket, Secret Manager secret, Pub/Sub topic or subscription, or Cloud Run service",
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
        TargetKind::CloudRun { project, location, service } => {
            segment_ok(project) && segment_ok(location) && segment_ok(service)
        }
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
        assert_eq!(
            parse_target("//run.googleapis.com/projects/acme-prod/locations/us-central1/services/api"),
            Ok(TargetKind::CloudRun {
                project: "acme-prod".into(),
                location: "us-central1".into(),
                service: "api".into()
            })
        );
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
        let run = parse_target("//run.googleapis.com/projects/p/locations/l/services/s").unwrap();
        assert_eq!(run.test_permissions_path(), "/v2/projects/p/locations/l/services/s:testIamPermissions");
        assert_eq!(run.cloud_run_service().as_deref(), Some("projects/p/locations/l/services/s"));
        assert_eq!(run.service(), "run");
        assert_eq!(run.default_permissions(), Some(vec!["run.routes.invoke".to_string()]));
        assert_eq!(
            parse_target("//storage.googleapis.com/projects/_/buckets/b").unwrap().default_permissions(),
            None
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
            "//run.googleapis.com/projects/p/locations/l/services",
            "//run.googleapis.com/projects/p/locations/l/services/s/revisions/r",
            "//run.googleapis.com/projects/p/services/s",
            "//run.googleapis.com/projects/p/locations/../services/s",
            "storage.googleapis.com/projects/_/buckets/b",
            "//evil.example.com/projects/_/buckets/b",
            "",
        ] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }
}
