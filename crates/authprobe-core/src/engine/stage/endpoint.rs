//! The Endpoint stage: a workload's token sent through the real path to a URL it calls
//! (google-wif.md §12). Here live the rules, with no IO: which hosts a token may go to
//! (`--endpoint-allow`), which redirects are followed, and what the answers mean.
//!
//! The security model: a spec can name any URL, but a token is only ever sent to a host the
//! operator was started with (`--endpoint-allow HOST[:PORT]`), over https, or over plain http to a
//! loopback host or to one allowed as `http://HOST[:PORT]`. A spec naming another host is
//! `InvalidSpec` before anything is sent, every request (each redirect hop, the origin) is checked
//! again, and a redirect is followed only on the same host: a redirect elsewhere ends the attempt.

use std::{net::IpAddr, str::FromStr};

use url::Url;

use crate::{
    api::{Access, Endpoint, Reason, Stage, TokenType},
    engine::{Finding, Verdict, annotation::quote},
    redact,
};

/// At most this many requests follow one another in an attempt (redirects on the same host).
pub const MAX_HOPS: usize = 5;

/// An endpoint of the spec, checked.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EndpointPlan {
    /// The URL the workload calls.
    pub url: Url,
    /// The token it sends.
    pub token_type: TokenType,
    /// The audience an ID token for it is minted for: the spec's (IDToken only), or the URL's
    /// origin. An AccessToken endpoint is sent one only to learn whether it expects that type.
    pub audience: String,
    /// The service behind the proxy, called directly to tell a stripped header from a refusal.
    pub origin: Option<Url>,
}

impl EndpointPlan {
    /// Checks an endpoint of the spec; the error is the `InvalidSpec` message.
    pub fn parse(endpoint: &Endpoint, access: Access) -> Result<Self, String> {
        if let Some(a) = endpoint.audience.as_deref().filter(|a| !is_audience(a)) {
            return Err(format!("endpoint audience {}: {AUDIENCE_SHAPE}", quote(a)));
        }
        let url = parse_url("url", &endpoint.url)?;
        let origin = endpoint.origin.as_deref().map(|o| parse_url("origin", o)).transpose()?;
        match (endpoint.token_type, &endpoint.audience) {
            (TokenType::AccessToken, Some(_)) => {
                return Err(format!(
                    "endpoint {}: audience applies to IDToken endpoints only: an access token has no audience",
                    quote(&endpoint.url)
                ));
            }
            (TokenType::IdToken, _) if access == Access::Direct => {
                return Err(format!(
                    "endpoint {}: a federated principal cannot get an ID token (access: Direct); use access: Impersonation or tokenType: AccessToken",
                    quote(&endpoint.url)
                ));
            }
            _ => {}
        }
        let audience = endpoint.audience.clone().unwrap_or_else(|| url.origin().ascii_serialization());
        Ok(Self { url, token_type: endpoint.token_type, audience, origin })
    }

    /// `endpoint URL (IDToken)`, as messages name it.
    pub fn name(&self) -> String {
        format!("endpoint {} ({})", self.url, self.token_type.as_str())
    }
}

/// What an audience must be, for [`is_audience`].
pub const AUDIENCE_SHAPE: &str =
    "an audience is 1 to 1024 characters, none of them a space or control character";

/// Whether `audience` can be minted for and shown in a command: admission's bounds, judged again
/// for `authprobe check -f`.
pub fn is_audience(audience: &str) -> bool {
    (1..=1024).contains(&audience.len()) && !audience.chars().any(|c| c.is_control() || c.is_whitespace())
}

fn parse_url(field: &str, text: &str) -> Result<Url, String> {
    if text.len() > 2048 {
        return Err(format!("endpoint {field} is longer than 2048 characters"));
    }
    let url = Url::parse(text).map_err(|e| format!("endpoint {field} {}: {e}", quote(text)))?;
    if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
        return Err(format!("endpoint {field} {} is not an http(s) URL with a host", quote(text)));
    }
    if !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
        return Err(format!("endpoint {field} {} must not carry credentials or a fragment", quote(text)));
    }
    Ok(url)
}

/// Whether a URL's host is this machine: `localhost` or a loopback address.
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => {
            d == "localhost" || d.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        None => false,
    }
}

/// One `--endpoint-allow` entry: `HOST`, `HOST:PORT`, or `http://HOST[:PORT]` to allow plain http.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedHost {
    host: String,
    port: Option<u16>,
    plain_http: bool,
}

impl FromStr for AllowedHost {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let (plain_http, rest) = match text.strip_prefix("http://") {
            Some(rest) => (true, rest),
            None => (false, text.strip_prefix("https://").unwrap_or(text)),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let bad = || format!("--endpoint-allow {}: expected HOST, HOST:PORT or http://HOST[:PORT]", quote(s));
        if rest.is_empty() || rest.contains(['/', '@', '?', '#', '*']) {
            return Err(bad());
        }
        let url = Url::parse(&format!("{}://{rest}", if plain_http { "http" } else { "https" }))
            .map_err(|_| bad())?;
        let host = url.host_str().ok_or_else(bad)?.to_string();
        // `Url::port` hides a port equal to the scheme's default; an explicit one is still meant.
        let explicit = rest
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        let port = if explicit { url.port_or_known_default() } else { None };
        Ok(Self { host, port, plain_http })
    }
}

/// The hosts endpoint probes may send tokens to (`--endpoint-allow`); empty allows none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointAllow {
    hosts: Vec<AllowedHost>,
}

impl EndpointAllow {
    /// The allow list of these entries.
    pub fn new(hosts: Vec<AllowedHost>) -> Self {
        Self { hosts }
    }

    /// Whether a token may be sent to `url`; the error is the `InvalidSpec` message, naming the flag.
    pub fn admits(&self, url: &Url) -> Result<(), String> {
        let host = url.host_str().unwrap_or_default();
        let port = url.port_or_known_default();
        let Some(allowed) =
            self.hosts.iter().find(|a| a.host == host && a.port.is_none_or(|p| Some(p) == port))
        else {
            let at = port.map(|p| format!("{host}:{p}")).unwrap_or_else(|| host.to_string());
            return Err(format!(
                "endpoint host {at} is not in the operator's --endpoint-allow list (chart value endpoints.allow); authprobe sends tokens only to hosts the cluster admin allowed. Fix: start the operator with --endpoint-allow={host}, or remove the endpoint"
            ));
        };
        match url.scheme() {
            "https" => Ok(()),
            "http" if allowed.plain_http || is_loopback(url) => Ok(()),
            "http" => Err(format!(
                "endpoint {url} uses plain http, which would send the token in clear text; use https, or allow it explicitly with --endpoint-allow=http://{host}"
            )),
            other => Err(format!("endpoint {url}: scheme {other:?} is not http(s)")),
        }
    }
}

/// What to do after an answer of the endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Not a redirect: the attempt ends with this answer.
    Done,
    /// A redirect on the same host: follow it with the token, as clients do.
    Follow(Url),
    /// A redirect to another host (or from https down to http): clients drop `Authorization`
    /// there, and authprobe sends nothing.
    Leave(Url),
    /// A redirect that cannot be followed (no or a malformed `Location`).
    Broken(String),
}

/// Where an answer with `status` and `location` leads from `current`.
pub fn next_hop(current: &Url, status: u16, location: Option<&str>) -> Next {
    if !matches!(status, 301 | 302 | 303 | 307 | 308) {
        return Next::Done;
    }
    let Some(location) = location else {
        return Next::Broken(format!("{current} answered {status} without a Location"));
    };
    let Ok(target) = current.join(location) else {
        return Next::Broken(format!("{current} answered {status} with a malformed Location"));
    };
    // Clients keep the header on the same host, an upgrade to https included, never down to http.
    let keeps_tls = current.scheme() == "http" || target.scheme() == "https";
    if target.host_str() == current.host_str() && keeps_tls && matches!(target.scheme(), "http" | "https") {
        Next::Follow(target)
    } else {
        Next::Leave(target)
    }
}

/// One request of an attempt and its status (`None`: no answer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    /// The URL requested.
    pub url: String,
    /// The status answered.
    pub status: Option<u16>,
}

/// How an attempt (one token sent to a URL, same-host redirects followed) ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// A final answer.
    Answered {
        /// Its status.
        status: u16,
        /// Its `WWW-Authenticate`, redacted.
        challenge: Option<String>,
    },
    /// A redirect that leaves the host (or one the allow list refuses): nothing was sent there.
    Redirected {
        /// Where to.
        to: String,
    },
    /// No answer: connection refused or reset, a timeout, a broken or endless redirect.
    Unreachable {
        /// What happened, redacted.
        detail: String,
    },
}

/// One token sent to one URL, every hop recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// Every request, in order.
    pub hops: Vec<Hop>,
    /// How it ended.
    pub end: End,
}

impl Attempt {
    /// A final 2xx: the token was accepted.
    pub fn accepted(&self) -> bool {
        matches!(self.end, End::Answered { status: 200..=299, .. })
    }

    /// A final answer that is neither a success nor the endpoint's own trouble (5xx, 429): the
    /// token was refused, and only then are the origin and the other token type worth asking.
    pub fn refused(&self) -> bool {
        matches!(self.end, End::Answered { status, .. } if !(200..=299).contains(&status) && status != 429 && status < 500)
    }

    /// `https://a/x 307 → https://a/y 401`.
    fn path(&self) -> String {
        let hops: Vec<String> = self
            .hops
            .iter()
            .map(|h| match h.status {
                Some(s) => format!("{} {s}", h.url),
                None => format!("{} (no answer)", h.url),
            })
            .collect();
        redact::upstream(&hops.join(" → "))
    }

    /// `401 (WWW-Authenticate: …)`.
    fn answer(&self) -> String {
        match &self.end {
            End::Answered { status, challenge: Some(c) } => format!("{status} (WWW-Authenticate: {c})"),
            End::Answered { status, challenge: None } => status.to_string(),
            End::Redirected { to } => format!("a redirect to {}", redact::upstream(to)),
            End::Unreachable { detail } => redact::upstream(detail),
        }
    }
}

fn kind(t: TokenType) -> &'static str {
    match t {
        TokenType::IdToken => "ID token",
        TokenType::AccessToken => "access token",
    }
}

/// The verdict on an endpoint for one identity: `declared` is the declared token sent to the URL;
/// when it was refused, `origin` the same token sent to the origin and `other` the other token
/// type sent to the URL (`None`: not asked). Messages name the endpoint and the identity, not the
/// KSA (the result is shared by every KSA of the identity; see [`for_ksa`]).
pub fn classify(
    endpoint: &EndpointPlan,
    identity: &str,
    declared: &Attempt,
    origin: Option<&Attempt>,
    other: Option<&Attempt>,
) -> Option<Finding> {
    let stage = Stage::Endpoint;
    let name = endpoint.name();
    let sent = kind(endpoint.token_type);
    match &declared.end {
        _ if declared.accepted() => return None,
        End::Redirected { to } => {
            return Some(Finding::fail(
                stage,
                Reason::CrossHostRedirect,
                format!(
                    "{name} redirects to another host ({}); Go, python-requests and curl drop Authorization on such a redirect, so the workload's call arrives there without its token, and authprobe sent nothing there. Fix: call the final URL directly, or have the proxy forward the request instead of redirecting",
                    redact::upstream(to)
                ),
            ));
        }
        _ if !declared.refused() => {
            return Some(Finding::unknown(
                stage,
                Reason::EndpointUnavailable,
                format!(
                    "{name} could not be checked for {identity}: {} ({}); nothing in the namespace is known to be at fault",
                    declared.answer(),
                    declared.path()
                ),
            ));
        }
        _ => {}
    }
    let expected = match endpoint.token_type {
        TokenType::IdToken => TokenType::AccessToken,
        TokenType::AccessToken => TokenType::IdToken,
    };
    if let (Some(origin_attempt), Some(origin_url)) = (origin, &endpoint.origin)
        && origin_attempt.accepted()
    {
        return Some(Finding::fail(
            stage,
            Reason::AuthorizationStripped,
            format!(
                "{name} refused {identity}'s {sent}: {} ({}), while its origin {origin_url}, called directly with the same token, accepted it: a proxy on the path drops or rewrites the Authorization header. Fix: make the proxy forward Authorization (nginx: no proxy_set_header Authorization; Envoy jwt_authn: forward: true; Istio RequestAuthentication: forwardOriginalToken: true)",
                declared.answer(),
                declared.path()
            ),
        ));
    }
    if let Some(other_attempt) = other
        && other_attempt.accepted()
    {
        let fix = match expected {
            TokenType::AccessToken => {
                "send an OAuth access token (google.auth.default() credentials, the metadata server's /token), and set tokenType: AccessToken".to_string()
            }
            TokenType::IdToken => format!(
                "send an ID token for audience {} (google.oauth2.id_token.fetch_id_token, the metadata server's /identity?audience=), and set tokenType: IDToken",
                quote(&endpoint.audience)
            ),
        };
        return Some(Finding::fail(
            stage,
            Reason::TokenTypeMismatch,
            format!(
                "{name} refused {identity}'s {sent}: {}, and accepted its {}: the endpoint expects an {}. Fix: {fix}",
                declared.answer(),
                kind(expected),
                kind(expected)
            ),
        ));
    }
    let other_said = match other {
        Some(o) => format!("its {}: {}", kind(expected), o.answer()),
        None => format!("its {} could not be tried", kind(expected)),
    };
    let audience = match endpoint.token_type {
        TokenType::IdToken => format!(" (audience {})", quote(&endpoint.audience)),
        TokenType::AccessToken => String::new(),
    };
    Some(Finding::fail(
        stage,
        Reason::EndpointRejected,
        format!(
            "{name} refused {identity}'s {sent}{audience}: {} ({}), and {other_said}. Fix: grant {identity} access at the endpoint, or check which audience and issuer it expects",
            declared.answer(),
            declared.path()
        ),
    ))
}

/// An endpoint's finding as the KSA whose chain reached it reports it.
pub fn for_ksa(who: &str, finding: &Finding) -> Finding {
    Finding { message: format!("{who}: {}", finding.message), ..finding.clone() }
}

/// A KSA's live chain with its endpoints' findings: a definite failure before an undecided one,
/// otherwise the chain's finding before the endpoints' (in spec order).
pub fn merge(chain: Result<(), Finding>, endpoints: Vec<Finding>) -> Result<(), Finding> {
    let all: Vec<Finding> = chain.err().into_iter().chain(endpoints).collect();
    let first = all.iter().position(|f| f.verdict == Verdict::Fail).unwrap_or(0);
    all.into_iter().nth(first).map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    fn allow(entries: &[&str]) -> EndpointAllow {
        EndpointAllow::new(entries.iter().map(|e| e.parse().unwrap()).collect())
    }

    fn endpoint(u: &str, token_type: TokenType, origin: Option<&str>) -> EndpointPlan {
        let spec = Endpoint { url: u.into(), token_type, audience: None, origin: origin.map(str::to_string) };
        EndpointPlan::parse(&spec, Access::Impersonation).unwrap()
    }

    fn spec_of(e: &EndpointPlan) -> Endpoint {
        Endpoint { url: e.url.to_string(), token_type: e.token_type, audience: None, origin: None }
    }

    fn answered(status: u16) -> Attempt {
        Attempt {
            hops: vec![Hop { url: "https://api.example/x".into(), status: Some(status) }],
            end: End::Answered { status, challenge: (status == 401).then(|| "Bearer realm=\"api\"".into()) },
        }
    }

    #[test]
    fn the_allow_list_admits_only_its_hosts_and_plain_http_only_when_safe() {
        let list = allow(&["api.example.com", "127.0.0.1", "mesh.svc:8080", "http://legacy.svc", "[::1]:9"]);
        for ok in [
            "https://api.example.com/x",
            "https://API.example.com:8443/x",
            "http://127.0.0.1:8080/x",
            "https://mesh.svc:8080/",
            "http://legacy.svc/x",
            "http://[::1]:9/",
        ] {
            assert_eq!(list.admits(&url(ok)), Ok(()), "{ok}");
        }
        for (bad, says) in [
            ("https://evil.example.com/", "--endpoint-allow"),
            ("https://api.example.com.evil.example/", "--endpoint-allow"),
            ("https://127.0.0.2/", "--endpoint-allow"),
            ("https://mesh.svc:8081/", "--endpoint-allow"),
            ("http://api.example.com/", "clear text"),
            ("http://[::1]:10/", "--endpoint-allow"),
        ] {
            let e = list.admits(&url(bad)).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(
            EndpointAllow::default().admits(&url("https://api.example.com/")).is_err(),
            "empty allows none"
        );
        assert!(
            allow(&["h:443"]).admits(&url("https://h:8443/")).is_err(),
            "an explicit default port is kept"
        );
        for bad in ["", "*.example.com", "h/path", "user@h", "https://h/x", "h?q"] {
            assert!(bad.parse::<AllowedHost>().is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoints_are_checked_and_audiences_default_to_the_origin() {
        let e = endpoint("https://api.example.com:8443/v1/x?y=1", TokenType::IdToken, None);
        assert_eq!(e.audience, "https://api.example.com:8443");
        let named = Endpoint { audience: Some("https://aud.example".into()), ..spec_of(&e) };
        assert_eq!(
            EndpointPlan::parse(&named, Access::Impersonation).unwrap().audience,
            "https://aud.example"
        );
        let parse = |spec: Endpoint, access| EndpointPlan::parse(&spec, access);
        let base = Endpoint {
            url: "https://a.example/".into(),
            token_type: TokenType::IdToken,
            audience: None,
            origin: None,
        };
        assert!(parse(base.clone(), Access::Direct).unwrap_err().contains("access: Direct"));
        let with_aud =
            Endpoint { token_type: TokenType::AccessToken, audience: Some("x".into()), ..base.clone() };
        assert!(parse(with_aud, Access::Impersonation).unwrap_err().contains("IDToken endpoints only"));
        let spaced = Endpoint { audience: Some("a b".into()), ..base.clone() };
        assert!(parse(spaced, Access::Impersonation).unwrap_err().contains("space"));
        for bad in
            ["ftp://a.example/", "https://u:p@a.example/", "https://a.example/#f", "not a url", "https://"]
        {
            let spec = Endpoint { url: bad.into(), ..base.clone() };
            assert!(parse(spec, Access::Impersonation).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_same_host_redirects_are_followed() {
        let at = url("https://api.example.com/a/b");
        assert_eq!(next_hop(&at, 200, None), Next::Done);
        assert_eq!(next_hop(&at, 304, Some("/x")), Next::Done);
        assert_eq!(next_hop(&at, 307, Some("c")), Next::Follow(url("https://api.example.com/a/c")));
        assert_eq!(
            next_hop(&at, 301, Some("https://api.example.com:8443/")),
            Next::Follow(url("https://api.example.com:8443/"))
        );
        assert_eq!(
            next_hop(&at, 302, Some("https://other.example.com/")),
            Next::Leave(url("https://other.example.com/"))
        );
        assert_eq!(
            next_hop(&at, 308, Some("http://api.example.com/")),
            Next::Leave(url("http://api.example.com/"))
        );
        assert_eq!(
            next_hop(&url("http://api.example.com/"), 301, Some("https://api.example.com/")),
            Next::Follow(url("https://api.example.com/"))
        );
        assert!(matches!(next_hop(&at, 307, None), Next::Broken(_)));
    }

    #[test]
    fn each_answer_has_its_reason() {
        let id = endpoint("https://api.example/x", TokenType::IdToken, Some("http://10.0.0.7:8080/x"));
        let who = "serviceAccount:app@p.iam.gserviceaccount.com";
        assert_eq!(classify(&id, who, &answered(200), None, None), None);
        let reason = |declared: &Attempt, origin: Option<&Attempt>, other: Option<&Attempt>| {
            let f = classify(&id, who, declared, origin, other).unwrap();
            assert!(f.message.contains("endpoint https://api.example/x (IDToken)"), "{}", f.message);
            assert_eq!(f.stage, Stage::Endpoint);
            (f.reason, f.verdict)
        };
        let redirected = Attempt {
            hops: vec![Hop { url: "https://api.example/x".into(), status: Some(307) }],
            end: End::Redirected { to: "https://other.example/x".into() },
        };
        assert_eq!(reason(&redirected, None, None), (Reason::CrossHostRedirect, Verdict::Fail));
        assert_eq!(
            reason(&answered(401), Some(&answered(200)), None),
            (Reason::AuthorizationStripped, Verdict::Fail)
        );
        assert_eq!(
            reason(&answered(401), Some(&answered(401)), Some(&answered(200))),
            (Reason::TokenTypeMismatch, Verdict::Fail)
        );
        assert_eq!(
            reason(&answered(403), None, Some(&answered(403))),
            (Reason::EndpointRejected, Verdict::Fail)
        );
        assert_eq!(reason(&answered(404), None, None), (Reason::EndpointRejected, Verdict::Fail));
        for unavailable in [
            answered(503),
            answered(429),
            Attempt { hops: vec![], end: End::Unreachable { detail: "connection refused".into() } },
        ] {
            assert_eq!(reason(&unavailable, None, None), (Reason::EndpointUnavailable, Verdict::Unknown));
        }
        let mismatch = classify(&id, who, &answered(401), None, Some(&answered(200))).unwrap();
        assert!(mismatch.message.contains("expects an access token"), "{}", mismatch.message);
        let rejected = classify(&id, who, &answered(401), None, Some(&answered(401))).unwrap();
        assert!(rejected.message.contains("WWW-Authenticate: Bearer realm=\"api\""), "{}", rejected.message);
        assert!(rejected.message.contains("audience \"https://api.example\""), "{}", rejected.message);
    }

    #[test]
    fn tokens_in_answers_are_redacted() {
        let id = endpoint("https://api.example/x", TokenType::IdToken, None);
        let echoed = Attempt {
            hops: vec![Hop {
                url: "https://api.example/x?t=eyJhbGciOi.eyJzdWIi.c2ln".into(),
                status: Some(401),
            }],
            end: End::Answered { status: 401, challenge: Some("Bearer error=\"invalid_token\"".into()) },
        };
        let f = classify(&id, "s", &echoed, None, None).unwrap();
        assert!(!f.message.contains("eyJ"), "{}", f.message);
    }

    #[test]
    fn a_definite_failure_comes_before_an_undecided_one() {
        let unknown = Finding::unknown(Stage::Target, Reason::GoogleUnavailable, "503");
        let redirect = Finding::fail(Stage::Endpoint, Reason::CrossHostRedirect, "r");
        let unavailable = Finding::unknown(Stage::Endpoint, Reason::EndpointUnavailable, "u");
        let missing = Finding::fail(Stage::Target, Reason::PermissionMissing, "m");
        assert_eq!(merge(Ok(()), vec![]), Ok(()));
        assert_eq!(merge(Err(unknown.clone()), vec![redirect.clone()]), Err(redirect.clone()));
        assert_eq!(merge(Err(missing.clone()), vec![redirect.clone()]), Err(missing));
        assert_eq!(merge(Ok(()), vec![unavailable.clone(), redirect.clone()]), Err(redirect));
        assert_eq!(merge(Err(unknown.clone()), vec![unavailable]), Err(unknown));
        let ksa =
            for_ksa("ServiceAccount a/app", &Finding::fail(Stage::Endpoint, Reason::EndpointRejected, "x"));
        assert_eq!(ksa.message, "ServiceAccount a/app: x");
    }
}
