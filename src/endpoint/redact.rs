//! Redaction of secrets in what hookd shows about requests: headers, URLs and error texts
//! (DESIGN section 6). Everything stored in the request log passes through here, so the
//! admin API and the downloadable log never hold a credential.
//!
//! The rules lean towards hiding: a header or query parameter whose name merely looks
//! secret is hidden. Not hidden:
//! - `webhook-id`, `webhook-timestamp` and `webhook-signature`: a signature is not a secret
//!   (it is sent to the receiver with every request and proves nothing without the body and
//!   the `whsec_` key), and receivers need all three to debug their verification;
//! - `content-type`;
//! - request and response bodies: they are the owner's payload, needed to debug and replay.

use std::borrow::Cow;

use super::RequestLog;

/// What a hidden value is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Headers never hidden, whatever the rules below say.
const KEEP_HEADERS: &[&str] = &["webhook-id", "webhook-timestamp", "webhook-signature", "content-type"];

/// Headers hidden by exact (lowercase) name.
const SECRET_HEADERS: &[&str] = &["authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key", "x-auth-token"];

/// A header whose lowercase name contains one of these is hidden.
const SECRET_HEADER_PARTS: &[&str] = &["secret", "token", "password", "passwd", "key", "auth", "credential", "session"];

/// A query parameter whose lowercase name contains one of these is hidden.
const SECRET_PARAM_PARTS: &[&str] = &["token", "key", "secret", "passw", "signature", "auth", "credential"];

/// Query parameters hidden by exact (lowercase) name.
const SECRET_PARAMS: &[&str] = &["sig", "pwd", "pass"];

/// Values hidden whatever the header is called: credentials with an auth scheme.
const SECRET_VALUE_PREFIXES: &[&str] = &["bearer ", "basic ", "token ", "digest "];

/// Whether a header's value is hidden, by its name (any case).
pub fn is_secret_header(name: &str) -> bool {
    let n = name.trim().to_ascii_lowercase();
    if KEEP_HEADERS.contains(&n.as_str()) {
        return false;
    }
    SECRET_HEADERS.contains(&n.as_str()) || SECRET_HEADER_PARTS.iter().any(|p| n.contains(p))
}

/// The headers with the values of secret-looking ones (by name, or by an auth scheme in
/// the value) replaced with `[redacted]`. Names and order are kept.
pub fn redact_headers(headers: &[(String, String)]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let lower = value.trim_start().to_ascii_lowercase();
            let keep = KEEP_HEADERS.contains(&name.trim().to_ascii_lowercase().as_str());
            let secret = is_secret_header(name) || (!keep && SECRET_VALUE_PREFIXES.iter().any(|p| lower.starts_with(p)));
            (name.clone(), if secret { REDACTED.to_string() } else { value.clone() })
        })
        .collect()
}

/// The URL without credentials (`user:password@`) and with the values of secret-looking
/// query (and fragment) parameters replaced with `[redacted]`. A URL that does not parse is
/// redacted as text the same way.
pub fn redact_url(url: &str) -> String {
    let Ok(mut u) = url::Url::parse(url) else { return redact_unparsed(url) };
    if !u.username().is_empty() || u.password().is_some() {
        let _ = u.set_password(None);
        let _ = u.set_username("");
    }
    if let Some(q) = u.query().map(redact_pairs) {
        u.set_query(Some(&q));
    }
    if let Some(f) = u.fragment().filter(|f| f.contains('=')).map(redact_pairs) {
        u.set_fragment(Some(&f));
    }
    u.to_string()
}

/// Text (an error message) with every `http://` or `https://` URL in it redacted.
pub fn redact_text(text: &str) -> Cow<'_, str> {
    let lower = text.to_ascii_lowercase();
    if !lower.contains("http://") && !lower.contains("https://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = 0;
    while let Some(start) = next_url(&lower, rest) {
        let len = text[start..].find(|c: char| c.is_whitespace() || "\"'<>()[]{}`".contains(c)).unwrap_or(text.len() - start);
        let url = text[start..start + len].trim_end_matches(['.', ',', ';', ':']);
        out.push_str(&text[rest..start]);
        out.push_str(&redact_url(url));
        rest = start + url.len();
    }
    out.push_str(&text[rest..]);
    Cow::Owned(out)
}

fn next_url(lower: &str, from: usize) -> Option<usize> {
    let at = |p: &str| lower[from..].find(p).map(|i| from + i);
    match (at("http://"), at("https://")) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A request log entry with its headers (both ways), URL and error redacted.
pub fn redact_request(mut r: RequestLog) -> RequestLog {
    r.url = redact_url(&r.url);
    r.request_headers = redact_headers(&r.request_headers);
    r.response_headers = redact_headers(&r.response_headers);
    r.error = r.error.map(|e| redact_text(&e).into_owned());
    r
}

fn is_secret_param(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    SECRET_PARAMS.contains(&n.as_str()) || SECRET_PARAM_PARTS.iter().any(|p| n.contains(p))
}

/// `a=1&token=x` → `a=1&token=[redacted]`, other pairs kept byte for byte.
fn redact_pairs(query: &str) -> String {
    let pairs = query.split('&').map(|pair| match pair.split_once('=') {
        Some((name, _)) if is_secret_param(&decoded(name)) => format!("{name}={REDACTED}"),
        _ => pair.to_string(),
    });
    pairs.collect::<Vec<_>>().join("&")
}

fn decoded(name: &str) -> String {
    url::form_urlencoded::parse(name.as_bytes()).next().map(|(k, _)| k.into_owned()).unwrap_or_default()
}

/// [`redact_url`] for text the URL parser refuses: drops `userinfo@` after `://`, redacts
/// query and fragment pairs.
fn redact_unparsed(url: &str) -> String {
    let (base, tail) = url.split_at(url.find(['?', '#']).unwrap_or(url.len()));
    let base = match base.find("://") {
        Some(s) => {
            let authority = &base[s + 3..];
            let end = authority.find('/').unwrap_or(authority.len());
            match authority[..end].rfind('@') {
                Some(at) => format!("{}{}", &base[..s + 3], &authority[at + 1..]),
                None => base.to_string(),
            }
        }
        None => base.to_string(),
    };
    let (query, fragment) = match tail.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (tail, None),
    };
    let mut out = base;
    if let Some(q) = query.strip_prefix('?') {
        out.push('?');
        out.push_str(&redact_pairs(q));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(&redact_pairs(f));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn redaction_table() {
        let input = h(&[
            ("Authorization", "Bearer abc"),
            ("X-Api-Key", "sekrit"),
            ("Cookie", "sid=1"),
            ("set-cookie", "sid=2"),
            ("Proxy-Authorization", "Basic eA=="),
            ("api-key", "k"),
            ("X-Auth-Token", "t"),
            ("X-Shop-Token", "shop"),
            ("X-Webhook-Secret", "s"),
            ("x-db-password", "p"),
            ("Idempotency-Key", "i"),
            ("X-Custom", "Bearer hidden-by-scheme"),
            ("webhook-id", "msg_1"),
            ("Webhook-Timestamp", "1700000000"),
            ("webhook-signature", "v1,abc= v1,def="),
            ("Content-Type", "application/json"),
            ("X-Request-Id", "r1"),
            ("Keep-Alive", "timeout=5"),
            ("User-Agent", "hookd/0.1"),
        ]);
        let out = redact_headers(&input);
        let kept: Vec<(&str, &str)> = out.iter().filter(|(_, v)| v != REDACTED).map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            kept,
            [
                ("webhook-id", "msg_1"),
                ("Webhook-Timestamp", "1700000000"),
                ("webhook-signature", "v1,abc= v1,def="),
                ("Content-Type", "application/json"),
                ("X-Request-Id", "r1"),
                ("Keep-Alive", "timeout=5"),
                ("User-Agent", "hookd/0.1"),
            ]
        );
        assert_eq!(out.len(), input.len(), "names and order kept");
        assert_eq!(out[0], ("Authorization".to_string(), REDACTED.to_string()));
        assert_eq!(redact_headers(&out), out, "idempotent");
    }

    #[test]
    fn url_redaction() {
        let cases = [
            (
                "https://user:pw@hooks.example.com/in?token=abc&x=1&Signature=zz#frag",
                "https://hooks.example.com/in?token=[redacted]&x=1&Signature=[redacted]#frag",
            ),
            (
                "https://h.example/cb?validation_key=v&challenge_key=c&sig=s&page=2",
                "https://h.example/cb?validation_key=[redacted]&challenge_key=[redacted]&sig=[redacted]&page=2",
            ),
            (
                "https://h.example/p?api_key=1&apiKey=2&client_secret=3&password=4&access_token=5",
                "https://h.example/p?api_key=[redacted]&apiKey=[redacted]&client_secret=[redacted]&password=[redacted]&access_token=[redacted]",
            ),
            ("https://h.example/p?q=a%20b&flag", "https://h.example/p?q=a%20b&flag"),
            ("https://h.example/p#access_token=x&state=1", "https://h.example/p#access_token=[redacted]&state=1"),
            ("http://only-user@h.example:8080/", "http://h.example:8080/"),
            ("https://h.example/p?to%6Ben=x", "https://h.example/p?to%6Ben=[redacted]"),
            ("not a url://u:p@h/x?key=1&a=b", "not a url://h/x?key=[redacted]&a=b"),
        ];
        for (input, want) in cases {
            assert_eq!(redact_url(input), want, "{input}");
            assert_eq!(redact_url(want), want, "idempotent: {want}");
        }
    }

    #[test]
    fn urls_in_error_text() {
        let e = "error sending request for url (https://h.example/cb?validation_key=v&x=1): connection refused";
        assert_eq!(
            redact_text(e),
            "error sending request for url (https://h.example/cb?validation_key=[redacted]&x=1): connection refused"
        );
        assert_eq!(
            redact_text("see HTTPS://u:p@h.example/a. And http://h.example/?token=t, too"),
            "see https://h.example/a. And http://h.example/?token=[redacted], too"
        );
        assert!(matches!(redact_text("HTTP 500 from receiver"), Cow::Borrowed(_)));
    }

    #[test]
    fn request_entry_redacted_everywhere() {
        let r = RequestLog {
            at_ms: 1,
            delivery_id: "d".into(),
            attempt: 1,
            method: "POST".into(),
            url: "https://u:p@h.example/?token=t".into(),
            request_headers: h(&[("Authorization", "x"), ("webhook-signature", "v1,s")]),
            request_body: r#"{"password":"in the payload stays"}"#.into(),
            status: None,
            response_headers: h(&[("Set-Cookie", "sid=9")]),
            response_body_excerpt: String::new(),
            truncated: false,
            duration_ms: 3,
            error: Some("timeout for url (https://h.example/?token=t)".into()),
        };
        let out = redact_request(r.clone());
        assert_eq!(out.url, "https://h.example/?token=[redacted]");
        assert_eq!(out.request_headers, h(&[("Authorization", REDACTED), ("webhook-signature", "v1,s")]));
        assert_eq!(out.response_headers, h(&[("Set-Cookie", REDACTED)]));
        assert_eq!(out.error.as_deref(), Some("timeout for url (https://h.example/?token=[redacted])"));
        assert_eq!(out.request_body, r.request_body);
    }
}
