//! The operator's own Google credentials: Application Default Credentials, or a bearer token read
//! from a file (re-read when the file changes).

use std::{path::PathBuf, sync::Mutex, time::SystemTime};

use google_cloud_auth::credentials::{AccessTokenCredentials, Builder};
use secrecy::{ExposeSecret, SecretString};

/// Where the operator's bearer token comes from.
#[derive(Debug)]
pub enum OperatorCredentials {
    /// Application Default Credentials (GKE metadata server, `GOOGLE_APPLICATION_CREDENTIALS`, ...).
    Adc(AccessTokenCredentials),
    /// `--google-access-token-file`.
    File(TokenFile),
}

/// A token file and the last token read from it.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    cached: Mutex<Option<(SystemTime, SecretString)>>,
}

/// Why no token could be had: the operator's own credentials are at fault.
#[derive(Debug, thiserror::Error)]
#[error("cannot obtain the operator's Google token: {0}")]
pub struct CredentialsError(pub String);

impl OperatorCredentials {
    /// Application Default Credentials with the cloud-platform scope.
    pub fn adc() -> Result<Self, CredentialsError> {
        Builder::default()
            .with_scopes(["https://www.googleapis.com/auth/cloud-platform"])
            .build_access_token_credentials()
            .map(Self::Adc)
            .map_err(|e| CredentialsError(e.to_string()))
    }

    /// A bearer token read from `path`.
    pub fn file(path: PathBuf) -> Self {
        Self::File(TokenFile { path, cached: Mutex::new(None) })
    }

    /// A current bearer token.
    pub async fn token(&self) -> Result<SecretString, CredentialsError> {
        match self {
            Self::Adc(creds) => creds
                .access_token()
                .await
                .map(|t| SecretString::from(t.token))
                .map_err(|e| CredentialsError(crate::redact::upstream(&e.to_string()))),
            Self::File(file) => file.token().await,
        }
    }
}

impl TokenFile {
    async fn token(&self) -> Result<SecretString, CredentialsError> {
        let unreadable = |e: std::io::Error| CredentialsError(format!("{}: {e}", self.path.display()));
        let modified =
            tokio::fs::metadata(&self.path).await.and_then(|m| m.modified()).map_err(unreadable)?;
        if let Ok(cached) = self.cached.lock()
            && let Some((at, token)) = cached.as_ref()
            && *at == modified
        {
            return Ok(token.clone());
        }
        let text = tokio::fs::read_to_string(&self.path).await.map_err(unreadable)?;
        let token = text.trim();
        if token.is_empty() {
            return Err(CredentialsError(format!("{} is empty", self.path.display())));
        }
        let token = SecretString::from(token.to_string());
        if let Ok(mut cached) = self.cached.lock() {
            *cached = Some((modified, token.clone()));
        }
        Ok(token)
    }
}

/// `Bearer <token>` for an Authorization header, marked sensitive so it never shows in debug output.
pub fn bearer(token: &SecretString) -> Result<reqwest::header::HeaderValue, CredentialsError> {
    let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
        .map_err(|_| CredentialsError("the token holds characters not allowed in a header".into()))?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn the_token_file_is_reread_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("authprobe-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "first\n").unwrap();
        let creds = OperatorCredentials::file(path.clone());
        assert_eq!(creds.token().await.unwrap().expose_secret(), "first");
        std::fs::write(&path, "second").unwrap();
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(later).unwrap();
        assert_eq!(creds.token().await.unwrap().expose_secret(), "second");
        std::fs::write(&path, "  ").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later + Duration::from_secs(5))
            .unwrap();
        assert!(creds.token().await.is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bearer_headers_are_sensitive() {
        let h = bearer(&SecretString::from("ya29.secret".to_string())).unwrap();
        assert!(h.is_sensitive());
        assert!(!format!("{h:?}").contains("secret"));
    }
}
