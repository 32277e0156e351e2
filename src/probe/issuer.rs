//! What the cluster publishes about its ServiceAccount tokens: the issuer from
//! `/.well-known/openid-configuration` and the keys from `/openid/v1/jwks`.

use std::time::Duration;

use crate::{
    engine::facts::{ClusterIssuer, FailureKind, FetchFailure, JwkSet},
    google::cache::FetchCache,
};

/// Reads the cluster's issuer and keys, at most once per `max_age`.
pub struct ClusterIssuers {
    client: kube::Client,
    cache: FetchCache<(), Result<ClusterIssuer, FetchFailure>>,
}

impl ClusterIssuers {
    /// Reads through `client`.
    pub fn new(client: kube::Client) -> Self {
        Self { client, cache: FetchCache::default() }
    }

    /// The issuer and its keys.
    pub async fn get(&self, max_age: Duration) -> Result<ClusterIssuer, FetchFailure> {
        self.cache.get(&(), max_age, self.fetch()).await.0
    }

    async fn fetch(&self) -> Result<ClusterIssuer, FetchFailure> {
        let discovery: serde_json::Value =
            serde_json::from_str(&self.get_text("/.well-known/openid-configuration").await?)
                .map_err(|e| malformed("openid-configuration", &e))?;
        let issuer = discovery
            .get("issuer")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| {
                FetchFailure::new(
                    FailureKind::Unavailable,
                    "the cluster's openid-configuration names no issuer",
                )
            })?
            .to_string();
        let jwks: JwkSet = serde_json::from_str(&self.get_text("/openid/v1/jwks").await?)
            .map_err(|e| malformed("jwks", &e))?;
        Ok(ClusterIssuer { issuer, keys: jwks.keys })
    }

    async fn get_text(&self, path: &str) -> Result<String, FetchFailure> {
        let request = http::Request::get(path)
            .body(Vec::new())
            .map_err(|e| FetchFailure::new(FailureKind::Unavailable, e.to_string()))?;
        self.client.request_text(request).await.map_err(|e| {
            let kind = match &e {
                kube::Error::Api(s) if s.code == 401 => FailureKind::Unauthenticated,
                kube::Error::Api(s) if s.code == 403 => FailureKind::Forbidden,
                _ => FailureKind::Unavailable,
            };
            FetchFailure::new(
                kind,
                format!("reading the cluster's {path}: {}", crate::redact::upstream(&e.to_string())),
            )
        })
    }
}

fn malformed(what: &str, e: &serde_json::Error) -> FetchFailure {
    FetchFailure::new(FailureKind::Unavailable, format!("the cluster's {what} is malformed ({e})"))
}
