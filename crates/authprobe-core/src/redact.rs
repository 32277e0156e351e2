//! Token hygiene for text that leaves the process: anything shaped like a JWT (`eyJ…`) or a Google
//! access token (`ya29.…`) is replaced before it reaches a condition, event, log or metric, and
//! upstream text is cut to 1 KiB.

/// Upstream text kept in a message is at most this many bytes.
pub const MAX_UPSTREAM_BYTES: usize = 1024;

const REDACTED: &str = "[REDACTED]";

/// Replaces token-like runs in `text` and truncates the result to [`MAX_UPSTREAM_BYTES`].
pub fn upstream(text: &str) -> String {
    let redacted = tokens(text);
    let flat: String = redacted.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    cut(&flat, MAX_UPSTREAM_BYTES)
}

/// Replaces token-like runs: `eyJ` followed by base64url text (a JWT, with or without its dots)
/// and `ya29.` followed by token characters.
pub fn tokens(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = next_token(rest) {
        out.push_str(&rest[..start]);
        let run = rest[start..].find(|c: char| !is_token_char(c)).map_or(rest.len(), |end| start + end);
        out.push_str(REDACTED);
        rest = &rest[run..];
    }
    out.push_str(rest);
    out
}

fn next_token(text: &str) -> Option<usize> {
    [text.find("eyJ"), text.find("ya29.")].into_iter().flatten().min()
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=' | '+' | '/')
}

/// A message as it may leave the process in status or an Event: token-like text redacted and
/// at most `max` bytes. When it must be shortened, the middle goes and the fix at the end (from
/// its last " Fix: ") stays whole, since the fix is what the reader acts on.
pub fn message(text: &str, max: usize) -> String {
    let text = tokens(text);
    if text.len() <= max {
        return text;
    }
    let ellipsis = '…'.len_utf8();
    match text.rfind(" Fix: ") {
        Some(at) if text.len() - at + ellipsis < max / 4 * 3 => {
            let (head, fix) = text.split_at(at);
            let mut end = max - fix.len() - ellipsis;
            while !head.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}…{fix}", &head[..end])
        }
        _ => cut(&text, max),
    }
}

/// The longest prefix of `s` of at most `max` bytes on a character boundary, with `…` when cut.
pub fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwts_and_access_tokens_are_redacted() {
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
        let text = format!("bad token {jwt}, and ya29.a0AfH6SMBx-y_z=, done");
        let out = upstream(&text);
        assert_eq!(out, "bad token [REDACTED], and [REDACTED], done");
        assert!(!out.contains("eyJ") && !out.contains("ya29."));
        assert_eq!(tokens("no secrets here"), "no secrets here");
        assert_eq!(tokens("eyJ"), "[REDACTED]");
    }

    #[test]
    fn messages_keep_their_fix_whole_and_lose_the_middle() {
        let fix = " Fix: gcloud iam service-accounts add-iam-policy-binding payments@acme-prod.iam.gserviceaccount.com --project=acme-prod --role=roles/iam.workloadIdentityUser --member=\"principal://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/acme-prod.svc.id.goog/subject/ns/checkout/sa/app\"";
        let long =
            format!("ServiceAccount checkout/app is not granted it; {}.{fix}", "near miss, ".repeat(200));
        let m = message(&long, 1024);
        assert!(m.len() <= 1024, "{}", m.len());
        assert!(m.ends_with(fix), "the fix is whole: {m}");
        assert!(m.starts_with("ServiceAccount checkout/app") && m.contains('…'));
        // Short messages pass, redacted.
        assert_eq!(message("token eyJabc.def in it", 1024), "token [REDACTED] in it");
        // A fix longer than the room falls back to a plain cut.
        let m = message(&format!("x Fix: {}", "y".repeat(2000)), 1024);
        assert!(m.len() <= 1024 && m.ends_with('…'));
        // Multi-byte text is cut on character boundaries.
        let m = message(&format!("{}{fix}", "é".repeat(2000)), 1024);
        assert!(m.len() <= 1024 && m.ends_with(fix));
    }

    #[test]
    fn upstream_text_is_bounded_and_flat() {
        let long = "é".repeat(4096);
        let out = upstream(&long);
        assert!(out.len() <= MAX_UPSTREAM_BYTES && out.ends_with('…'));
        assert_eq!(upstream("a\nb\r\tc"), "a b  c");
    }
}
