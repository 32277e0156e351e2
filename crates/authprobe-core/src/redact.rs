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
    fn upstream_text_is_bounded_and_flat() {
        let long = "é".repeat(4096);
        let out = upstream(&long);
        assert!(out.len() <= MAX_UPSTREAM_BYTES && out.ends_with('…'));
        assert_eq!(upstream("a\nb\r\tc"), "a b  c");
    }
}
