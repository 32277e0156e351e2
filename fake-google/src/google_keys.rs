//! Google's own signing key and the ID tokens it signs (google-wif.md §11): `generateIdToken` and
//! the metadata server's `identity` endpoint mint RS256 JWTs with it, `/www/oauth2/v3/certs`
//! publishes it, and [`verify_id_token`] checks a token the way an origin server does.

use std::{fmt, sync::Arc};

use aws_lc_rs::{
    rand::SystemRandom,
    rsa::{KeyPair, KeySize},
    signature::{KeyPair as _, RSA_PKCS1_SHA256},
};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind, jwk::JwkSet};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// `iss` of every Google ID token.
pub const GOOGLE_ISSUER: &str = "https://accounts.google.com";
/// Google's client libraries also accept this spelling of the issuer.
const GOOGLE_ISSUER_SHORT: &str = "accounts.google.com";
/// Seconds an ID token lives: Google's tokens expire one hour after `iat`.
pub const ID_TOKEN_LIFETIME: i64 = 3600;
/// Clock difference a verifier tolerates on `exp`.
const LEEWAY: u64 = 60;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An RSA-2048 key that signs RS256 JWTs and publishes itself as a JWKS. The fake uses one as
/// Google's key; tests can make their own, e.g. as a cluster issuer whose JWKS a provider
/// uploads (`jwksJson`).
pub struct Signer {
    key: KeyPair,
    kid: String,
    jwk: Value,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl Signer {
    /// A fresh key. Its `kid` is 40 hex digits derived from the modulus, as Google's look.
    pub fn generate() -> anyhow::Result<Self> {
        let key =
            KeyPair::generate(KeySize::Rsa2048).map_err(|e| anyhow::anyhow!("RSA key generation: {e}"))?;
        let public = key.public_key();
        let n = public.modulus().big_endian_without_leading_zero().to_vec();
        let e = public.exponent().big_endian_without_leading_zero().to_vec();
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &n);
        let kid: String = digest.as_ref().iter().take(20).map(|b| format!("{b:02x}")).collect();
        let jwk = json!({"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid, "n": b64(&n), "e": b64(&e)});
        Ok(Self { key, kid, jwk })
    }

    /// The key ID in every token's header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// `{"keys": [this key]}`.
    pub fn jwks(&self) -> JwkSet {
        serde_json::from_value(self.jwks_value()).unwrap_or(JwkSet { keys: vec![] })
    }

    /// The JWKS as JSON text (what a provider's `jwksJson` holds).
    pub fn jwks_json(&self) -> String {
        self.jwks_value().to_string()
    }

    fn jwks_value(&self) -> Value {
        json!({"keys": [self.jwk]})
    }

    /// `claims` as an RS256 JWT with this key's `kid`.
    pub fn sign(&self, claims: &Value) -> anyhow::Result<String> {
        let header = json!({"alg": "RS256", "kid": self.kid, "typ": "JWT"});
        let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let mut signature = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), input.as_bytes(), &mut signature)
            .map_err(|e| anyhow::anyhow!("RS256 signing: {e}"))?;
        Ok(format!("{input}.{}", b64(&signature)))
    }
}

/// The claims of a Google-signed ID token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdTokenClaims {
    /// `https://accounts.google.com`.
    pub iss: String,
    /// The audience it was minted for.
    pub aud: String,
    /// The service account's unique ID.
    #[serde(default)]
    pub azp: String,
    /// The service account's unique ID.
    pub sub: String,
    /// The service account's email, only when minted with `includeEmail`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// `true`, only with `email`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_verified: Option<bool>,
    /// Issued at (Google's clock, so moved by the scenario's skew).
    pub iat: i64,
    /// `iat` + 3600.
    pub exp: i64,
}

/// The claims Google puts in an ID token for `email` (unique ID `unique_id`).
pub(crate) fn id_token_claims(
    email: &str,
    unique_id: &str,
    audience: &str,
    include_email: bool,
    now: i64,
) -> Value {
    let mut claims = json!({
        "aud": audience,
        "azp": unique_id,
        "exp": now + ID_TOKEN_LIFETIME,
        "iat": now,
        "iss": GOOGLE_ISSUER,
        "sub": unique_id,
    });
    if include_email {
        claims["email"] = json!(email);
        claims["email_verified"] = json!(true);
    }
    claims
}

/// Where Google's public keys come from: the in-process fake, or a JWKS (e.g. fetched from
/// `http://FAKE/www/oauth2/v3/certs`).
pub trait GoogleKeys {
    /// The keys, if any.
    fn google_jwks(&self) -> Option<JwkSet>;
}

impl GoogleKeys for JwkSet {
    fn google_jwks(&self) -> Option<JwkSet> {
        Some(self.clone())
    }
}

impl GoogleKeys for crate::Fake {
    fn google_jwks(&self) -> Option<JwkSet> {
        crate::Fake::google_jwks(self)
    }
}

impl<T: GoogleKeys + ?Sized> GoogleKeys for Arc<T> {
    fn google_jwks(&self) -> Option<JwkSet> {
        (**self).google_jwks()
    }
}

/// Verifies a Google ID token as a relying party does: RS256 signature by a key of `keys` (by
/// `kid`), `iss` Google's, `aud` exactly `expected_audience`, not expired (60 s leeway). The error
/// says which check failed, never the token.
pub fn verify_id_token(
    keys: &impl GoogleKeys,
    token: &str,
    expected_audience: &str,
) -> Result<IdTokenClaims, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
    if header.alg != Algorithm::RS256 {
        return Err(format!("algorithm {:?} is not RS256", header.alg));
    }
    let kid = header.kid.ok_or("the token has no kid")?;
    let jwks = keys.google_jwks().ok_or("no Google signing keys")?;
    let jwk = jwks.find(&kid).ok_or_else(|| format!("kid {kid} is not among Google's keys"))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key {kid}: {e}"))?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[expected_audience]);
    validation.set_issuer(&[GOOGLE_ISSUER, GOOGLE_ISSUER_SHORT]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
    validation.leeway = LEEWAY;
    match jsonwebtoken::decode::<IdTokenClaims>(token, &key, &validation) {
        Ok(data) => Ok(data.claims),
        Err(e) => Err(match e.kind() {
            ErrorKind::InvalidSignature => "the signature does not verify".to_string(),
            ErrorKind::ExpiredSignature => "the token has expired".to_string(),
            ErrorKind::InvalidIssuer => "the issuer is not https://accounts.google.com".to_string(),
            ErrorKind::InvalidAudience => {
                let aud = crate::verify::peek(token)
                    .map(|(_, _, claims)| claims["aud"].to_string())
                    .unwrap_or_default();
                format!("the audience {aud} is not {expected_audience:?}")
            }
            ErrorKind::MissingRequiredClaim(c) => format!("the token has no {c} claim"),
            _ => format!("invalid token: {e}"),
        }),
    }
}

/// `GET /www/oauth2/v3/certs`: Google's signing keys, cached like Google's answer.
pub(crate) async fn certs(
    axum::extract::State(fake): axum::extract::State<crate::Shared>,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    if let Err(r) = fake.begin("www.certs").await {
        return r;
    }
    match fake.signer() {
        Some(signer) => (
            [(axum::http::header::CACHE_CONTROL, "public, max-age=21600, must-revalidate, no-transform")],
            axum::Json(signer.jwks_value()),
        )
            .into_response(),
        None => crate::errors::unavailable(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_tokens_verify_and_tampered_ones_do_not() -> anyhow::Result<()> {
        let signer = Signer::generate()?;
        assert_eq!(signer.kid().len(), 40);
        let now = jiff::Timestamp::now().as_second();
        let claims = id_token_claims("a@p.iam.gserviceaccount.com", "1234", "https://svc", true, now);
        let token = signer.sign(&claims)?;
        let got = verify_id_token(&signer.jwks(), &token, "https://svc").map_err(anyhow::Error::msg)?;
        assert_eq!(got.email.as_deref(), Some("a@p.iam.gserviceaccount.com"));
        assert_eq!(got.exp - got.iat, 3600);
        assert!(
            verify_id_token(&signer.jwks(), &token, "https://other").is_err_and(|e| e.contains("audience"))
        );
        // Another claim set under the same header and signature.
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = b64(id_token_claims("b@p.iam.gserviceaccount.com", "1", "https://svc", true, now)
            .to_string()
            .as_bytes());
        parts[1] = &forged;
        let forged = parts.join(".");
        assert!(
            verify_id_token(&signer.jwks(), &forged, "https://svc").is_err_and(|e| e.contains("signature"))
        );
        // Another key's JWKS does not vouch for it.
        let other = Signer::generate()?;
        assert!(verify_id_token(&other.jwks(), &token, "https://svc").is_err());
        let expired = signer.sign(&id_token_claims("a@p", "1", "https://svc", true, now - 7200))?;
        assert!(
            verify_id_token(&signer.jwks(), &expired, "https://svc").is_err_and(|e| e.contains("expired"))
        );
        Ok(())
    }
}
