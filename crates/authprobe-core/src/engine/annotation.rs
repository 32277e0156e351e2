//! The `iam.gke.io/gcp-service-account` annotation: which Google service account a KSA impersonates.

/// A Google service account email from a KSA annotation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GsaEmail {
    email: String,
    project: Option<String>,
}

impl GsaEmail {
    /// The email.
    pub fn as_str(&self) -> &str {
        &self.email
    }

    /// The project ID, when the email names one (`NAME@PROJECT.iam.gserviceaccount.com`); Google's
    /// built-in accounts (`…@developer.gserviceaccount.com`, `…@appspot.gserviceaccount.com`) do not.
    pub fn project(&self) -> Option<&str> {
        self.project.as_deref()
    }

    /// The project segment for IAM URLs: the project ID, or `-` when the email does not name one.
    pub fn url_project(&self) -> &str {
        self.project.as_deref().unwrap_or("-")
    }
}

impl std::fmt::Display for GsaEmail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.email)
    }
}

/// Parses an annotation value; the error says what is wrong, quoting the value safely.
pub fn parse_gsa(value: &str) -> Result<GsaEmail, String> {
    let shown = quote(value);
    if value.is_empty() {
        return Err("is empty".into());
    }
    if value.len() > 254 {
        return Err(format!("is {} bytes long, longer than any email ({shown})", value.len()));
    }
    if value.trim() != value {
        return Err(format!("{shown} has surrounding whitespace"));
    }
    let Some((account, domain)) = value.split_once('@') else {
        return Err(format!("{shown} is not an email: expected NAME@PROJECT.iam.gserviceaccount.com"));
    };
    if !is_account_id(account) {
        return Err(format!(
            "{shown}: the name before '@' is not a service account ID (lowercase letters, digits and hyphens)"
        ));
    }
    let project = if let Some(project) = domain.strip_suffix(".iam.gserviceaccount.com") {
        if !is_project_id(project) {
            return Err(format!("{shown}: the domain does not start with a valid project ID"));
        }
        Some(project.to_string())
    } else if domain == "developer.gserviceaccount.com" || domain == "appspot.gserviceaccount.com" {
        None
    } else {
        return Err(format!(
            "{shown} is not a Google service account: the domain must be PROJECT.iam.gserviceaccount.com"
        ));
    };
    Ok(GsaEmail { email: value.to_string(), project })
}

fn is_account_id(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// `[a-z][-a-z0-9]{4,28}[a-z0-9]`.
pub fn is_project_id(s: &str) -> bool {
    (6..=30).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// How much of an untrusted value a message quotes, in bytes after escaping.
const QUOTED_BYTES: usize = 256;

/// Quotes untrusted text for a message: escaped (no raw newlines or control characters), and
/// bounded after escaping, since one control character escapes to up to ten.
pub fn quote(value: &str) -> String {
    let mut quoted = String::from('"');
    for c in value.chars() {
        let escaped: String = if c == '\'' { c.into() } else { c.escape_debug().collect() };
        if quoted.len() + escaped.len() > QUOTED_BYTES {
            quoted.push('…');
            break;
        }
        quoted.push_str(&escaped);
    }
    quoted.push('"');
    quoted
}

/// The first `max` characters of `s`, with `…` when cut.
pub fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_emails_parse_with_their_project() {
        let gsa = parse_gsa("payments@acme-prod.iam.gserviceaccount.com").unwrap();
        assert_eq!(gsa.project(), Some("acme-prod"));
        assert_eq!(gsa.url_project(), "acme-prod");
        let compute = parse_gsa("123456789012-compute@developer.gserviceaccount.com").unwrap();
        assert_eq!(compute.project(), None);
        assert_eq!(compute.url_project(), "-");
        assert!(parse_gsa("acme-prod@appspot.gserviceaccount.com").is_ok());
    }

    #[test]
    fn hostile_and_mistyped_values_are_refused_with_a_reason() {
        let long = "a".repeat(10 * 1024);
        let cases = [
            ("", "is empty"),
            (" payments@acme-prod.iam.gserviceaccount.com", "surrounding whitespace"),
            ("payments@acme-prod.iam.gserviceaccount.com\n", "surrounding whitespace"),
            ("payments", "is not an email"),
            ("payments@acme-prod.iam.gserviceaccount.com.evil.example", "is not a Google service account"),
            ("payments@acme-prod.iam.gserviceacount.com", "is not a Google service account"),
            ("payments@acme-prod.iam.gserviceaccount.com@x", "is not a Google service account"),
            ("payments@acme_prod.iam.gserviceaccount.com", "not start with a valid project ID"),
            ("pаyments@acme-prod.iam.gserviceaccount.com", "is not a service account ID"), // Cyrillic а
            ("Payments@acme-prod.iam.gserviceaccount.com", "is not a service account ID"),
            ("x\"; rm -rf /@acme-prod.iam.gserviceaccount.com", "is not a service account ID"),
            (long.as_str(), "bytes long"),
        ];
        for (value, expected) in cases {
            let err = parse_gsa(value).unwrap_err();
            assert!(err.contains(expected), "{value:?}: {err}");
            assert!(!err.contains('\n'), "messages never carry raw newlines: {err:?}");
            assert!(err.len() < 400, "messages stay short: {} bytes", err.len());
        }
    }

    #[test]
    fn quote_escapes_and_truncates() {
        assert_eq!(quote("a\nb"), "\"a\\nb\"");
        assert_eq!(truncate("héllo", 2), "hé…");
        assert_eq!(quote(&"x".repeat(300)), format!("\"{}…\"", "x".repeat(255)));
        assert_eq!(quote("it's \"x\""), r#""it's \"x\"""#);
        let hostile = quote(&"\u{14}".repeat(1000));
        assert!(hostile.len() <= 256 + 4 && !hostile.contains('\u{14}'), "{hostile}");
    }
}
