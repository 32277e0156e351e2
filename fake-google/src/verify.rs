//! Verifying a KSA token as Google does: the signing key comes from the provider's uploaded JWKS or
//! from the issuer's own discovery document (fetched over HTTPS with the cluster's CA).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde_json::Value;

use crate::scenario::Cluster;

/// Google re-reads an issuer's keys after this long.
const JWKS_TTL: Duration = Duration::from_secs(5);

/// Why a token was not accepted, in STS's words.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Unknown kid, unreachable issuer or malformed keys: "Error connecting to the given credential's issuer."
    Issuer,
    /// The kid is known but the signature does not verify.
    Signature,
}

/// Fetched issuer keys, briefly cached.
#[derive(Debug, Default)]
pub struct Keys {
    cache: Mutex<HashMap<String, (Instant, JwkSet)>>,
}

impl Keys {
    /// The keys an issuer publishes (`None`: unreachable or malformed).
    pub async fn of_issuer(&self, issuer: &str, clusters: &[Cluster]) -> Option<JwkSet> {
        if let Some((at, keys)) = self.cache.lock().ok()?.get(issuer)
            && at.elapsed() < JWKS_TTL
        {
            return Some(keys.clone());
        }
        let cluster = clusters.iter().find(|c| c.issuer == issuer)?;
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(5));
        if !cluster.ca_pem.is_empty() {
            builder =
                builder.add_root_certificate(reqwest::Certificate::from_pem(cluster.ca_pem.as_bytes()).ok()?);
        }
        let http = builder.build().ok()?;
        let discovery: Value = http
            .get(format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/')))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let keys: JwkSet = http.get(discovery["jwks_uri"].as_str()?).send().await.ok()?.json().await.ok()?;
        self.cache.lock().ok()?.insert(issuer.to_string(), (Instant::now(), keys.clone()));
        Some(keys)
    }
}

/// The unverified header `kid` and `alg` and the payload of a JWT.
pub fn peek(token: &str) -> Option<(Option<String>, Algorithm, Value)> {
    let header = jsonwebtoken::decode_header(token).ok()?;
    let payload = token.split('.').nth(1)?;
    use base64::Engine as _;
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    Some((header.kid, header.alg, serde_json::from_slice(&bytes).ok()?))
}

/// Checks the signature of `token` against `keys` (by kid). Times, issuer and audience are
/// judged by the caller, each with its own error.
pub fn signature(token: &str, keys: &JwkSet) -> Result<(), Rejection> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| Rejection::Issuer)?;
    if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
        return Err(Rejection::Issuer);
    }
    let kid = header.kid.ok_or(Rejection::Issuer)?;
    let jwk = keys.find(&kid).ok_or(Rejection::Issuer)?;
    let key = DecodingKey::from_jwk(jwk).map_err(|_| Rejection::Issuer)?;
    let mut validation = Validation::new(header.alg);
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.validate_nbf = false;
    validation.required_spec_claims.clear();
    jsonwebtoken::decode::<Value>(token, &key, &validation).map(|_| ()).map_err(|_| Rejection::Signature)
}
