//! Where Google's APIs are reached: `https://SERVICE.googleapis.com` unless overridden with
//! `--google-endpoint SERVICE=URL` / `AUTHPROBE_GOOGLE_ENDPOINTS`. These are the only hosts a
//! token is ever sent to; nothing in an AuthProbe can add one.

use std::{collections::BTreeMap, str::FromStr};

use reqwest::Url;

use crate::engine::stage::endpoint::is_loopback;

/// The services authprobe talks to, by host prefix.
pub const SERVICES: [&str; 9] = [
    "sts",
    "securetoken",
    "iam",
    "iamcredentials",
    "cloudresourcemanager",
    "storage",
    "secretmanager",
    "pubsub",
    "run",
];

/// A `SERVICE=URL` override.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Override {
    service: &'static str,
    base: Url,
}

impl FromStr for Override {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (service, url) = s.split_once('=').ok_or_else(|| format!("{s:?} is not SERVICE=URL"))?;
        let service = SERVICES
            .iter()
            .find(|known| **known == service.trim())
            .ok_or_else(|| format!("unknown Google service {service:?}; known: {}", SERVICES.join(", ")))?;
        let base = Url::parse(url.trim()).map_err(|e| format!("{service}: {url:?} is not a URL: {e}"))?;
        match base.scheme() {
            "https" => {}
            "http" if is_loopback(&base) => {}
            "http" => {
                return Err(format!("{service}: plain http is allowed only for loopback hosts, not {url:?}"));
            }
            other => return Err(format!("{service}: scheme {other:?} is not http(s)")),
        }
        if base.query().is_some() || base.fragment().is_some() || !base.username().is_empty() {
            return Err(format!("{service}: {url:?} must not carry a query, fragment or credentials"));
        }
        Ok(Override { service, base })
    }
}

/// The base URL of every service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    bases: BTreeMap<&'static str, Url>,
}

impl Endpoints {
    /// Google's defaults with `overrides` applied (later ones win).
    pub fn new(overrides: &[Override]) -> Self {
        let mut bases = BTreeMap::new();
        for service in SERVICES {
            if let Ok(url) = Url::parse(&format!("https://{service}.googleapis.com")) {
                bases.insert(service, url);
            }
        }
        for o in overrides {
            bases.insert(o.service, o.base.clone());
        }
        Self { bases }
    }

    /// Parses the comma-separated `AUTHPROBE_GOOGLE_ENDPOINTS` form.
    pub fn parse_list(list: &str) -> Result<Vec<Override>, String> {
        list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::parse).collect()
    }

    /// `base + path`, keeping any path the base has (`sts=http://127.0.0.1:9000/sts` →
    /// `http://127.0.0.1:9000/sts/v1/token`). `path` starts with `/` and is built by authprobe.
    pub fn url(&self, service: &str, path: &str) -> Result<Url, String> {
        let base = self.bases.get(service).ok_or_else(|| format!("unknown Google service {service:?}"))?;
        let joined = format!("{}{path}", base.as_str().trim_end_matches('/'));
        let url = Url::parse(&joined).map_err(|e| format!("{joined:?}: {e}"))?;
        // Resource names come from specs and annotations: they must not change the host.
        if url.host() != base.host()
            || url.port_or_known_default() != base.port_or_known_default()
            || url.scheme() != base.scheme()
        {
            return Err(format!("{joined:?} leaves {service}'s endpoint"));
        }
        Ok(url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let e = Endpoints::new(&["sts=http://127.0.0.1:9000/sts".parse().unwrap()]);
        assert_eq!(e.url("sts", "/v1/token").unwrap().as_str(), "http://127.0.0.1:9000/sts/v1/token");
        assert_eq!(
            e.url("iam", "/v1/projects/p/serviceAccounts/a@p.iam.gserviceaccount.com").unwrap().as_str(),
            "https://iam.googleapis.com/v1/projects/p/serviceAccounts/a@p.iam.gserviceaccount.com"
        );
        let list = Endpoints::parse_list("iam=http://localhost:1/, iamcredentials=https://creds.example.com")
            .unwrap();
        assert_eq!(list.len(), 2);
    }

    #[test]
    fn plain_http_only_for_loopback() {
        for ok in [
            "iam=http://127.0.0.1:8080",
            "iam=http://[::1]:80",
            "iam=http://localhost:1",
            "iam=https://iam.example.com",
        ] {
            assert!(ok.parse::<Override>().is_ok(), "{ok}");
        }
        for bad in [
            "iam=http://10.0.0.1:8080",
            "iam=http://iam.example.com",
            "iam=ftp://127.0.0.1",
            "nosuch=https://x.example.com",
            "iam",
            "iam=https://x.example.com/?q=1",
            "iam=https://user:pw@x.example.com",
        ] {
            assert!(bad.parse::<Override>().is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_cannot_leave_the_endpoint() {
        let e = Endpoints::new(&[]);
        for path in ["@evil.example.com/x", "/../../x", ".evil.example.com/x"] {
            if let Ok(url) = e.url("storage", path) {
                assert_eq!(url.host_str(), Some("storage.googleapis.com"), "{path} -> {url}");
            }
        }
        assert!(e.url("storage", "@evil.example.com/x").is_err());
        assert!(e.url("nosuch", "/x").is_err());
    }
}
