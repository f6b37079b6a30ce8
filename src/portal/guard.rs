//! Cross-site request forgery protection of the portal's forms.
//!
//! A state-changing request (enable, disable, replay: always a POST) is taken only when
//! - its form carries the page's CSRF token ([`super::link::csrf_token`]), which only hookd
//!   can compute from the link, and
//! - the browser says it comes from the portal itself: `Sec-Fetch-Site`, when sent, is
//!   `same-origin` (or `none`, typed by the user), and `Origin`, when sent, is the portal's
//!   (`portal.public_url`'s origin, else the request's `Host` over http or https: a proxy
//!   that ends TLS and keeps the `Host` needs no setting).
//!
//! The portal sets no cookie, so a forged request from another site carries nothing the
//! browser adds on its own; the link's token in the path is the only credential.

use axum::http::{header, HeaderMap};

use super::link;

/// Why a state-changing request was refused (the portal answers 403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Forgery {
    #[error("the form carries no CSRF token")]
    MissingToken,
    #[error("the form's CSRF token is not this page's")]
    WrongToken,
    #[error("the request comes from another site (Sec-Fetch-Site: {0})")]
    CrossSite(String),
    #[error("the request comes from another origin (Origin: {0})")]
    CrossOrigin(String),
}

/// The fields of a portal form: the CSRF token and, for replay, the time.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Form {
    pub csrf: Option<String>,
    pub since: Option<String>,
}

impl Form {
    /// Parses an `application/x-www-form-urlencoded` body; unknown fields are ignored.
    pub fn parse(body: &[u8]) -> Self {
        let mut form = Self::default();
        for (k, v) in url::form_urlencoded::parse(body) {
            match &*k {
                "csrf" => form.csrf = Some(v.into_owned()),
                "since" => form.since = Some(v.into_owned()),
                _ => {}
            }
        }
        form
    }
}

/// Checks a POST to the pages of the link `token`: the browser's own word on where it comes
/// from first, then the form's CSRF token.
pub fn check(secret: &[u8], token: &str, public_origin: Option<&str>, headers: &HeaderMap, form: &Form) -> Result<(), Forgery> {
    same_origin(headers, public_origin)?;
    let presented = form.csrf.as_deref().filter(|c| !c.is_empty()).ok_or(Forgery::MissingToken)?;
    if !link::csrf_matches(secret, token, presented) {
        return Err(Forgery::WrongToken);
    }
    Ok(())
}

fn same_origin(headers: &HeaderMap, public_origin: Option<&str>) -> Result<(), Forgery> {
    let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("?").to_string());
    if let Some(site) = text("sec-fetch-site") {
        if !site.eq_ignore_ascii_case("same-origin") && !site.eq_ignore_ascii_case("none") {
            return Err(Forgery::CrossSite(site));
        }
    }
    let Some(origin) = text(header::ORIGIN.as_str()) else { return Ok(()) };
    let ours = match public_origin {
        Some(o) => o.eq_ignore_ascii_case(&origin),
        None => {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
            let authority = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
            host.is_some_and(|h| authority.is_some_and(|a| a.eq_ignore_ascii_case(h)))
        }
    };
    if ours {
        Ok(())
    } else {
        Err(Forgery::CrossOrigin(origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn form(csrf: &str) -> Form {
        Form { csrf: Some(csrf.into()), since: None }
    }

    #[test]
    fn a_form_of_the_page_passes() {
        let token = link::sign(KEY, "t", i64::MAX);
        let ok = form(&link::csrf_token(KEY, &token));
        let same = headers(&[("host", "127.0.0.1:9464"), ("origin", "http://127.0.0.1:9464"), ("sec-fetch-site", "same-origin")]);
        assert_eq!(check(KEY, &token, None, &same, &ok), Ok(()));
        assert_eq!(check(KEY, &token, None, &HeaderMap::new(), &ok), Ok(()), "a client that sends neither header");
        let tls_proxy = headers(&[("host", "hooks.example.com"), ("origin", "https://hooks.example.com")]);
        assert_eq!(check(KEY, &token, None, &tls_proxy, &ok), Ok(()));
        let proxied = headers(&[("host", "10.0.0.5:9464"), ("origin", "https://Hooks.Example.com")]);
        assert_eq!(check(KEY, &token, Some("https://hooks.example.com"), &proxied, &ok), Ok(()));
    }

    #[test]
    fn forged_requests_are_refused() {
        let token = link::sign(KEY, "t", i64::MAX);
        let other = link::sign(KEY, "u", i64::MAX);
        let none = HeaderMap::new();
        assert_eq!(check(KEY, &token, None, &none, &Form::default()), Err(Forgery::MissingToken));
        assert_eq!(check(KEY, &token, None, &none, &form("")), Err(Forgery::MissingToken));
        assert_eq!(check(KEY, &token, None, &none, &form("bm9wZQ")), Err(Forgery::WrongToken));
        assert_eq!(check(KEY, &token, None, &none, &form(&link::csrf_token(KEY, &other))), Err(Forgery::WrongToken));
        let ok = form(&link::csrf_token(KEY, &token));
        let cross = headers(&[("sec-fetch-site", "cross-site")]);
        assert_eq!(check(KEY, &token, None, &cross, &ok), Err(Forgery::CrossSite("cross-site".into())));
        let sibling = headers(&[("sec-fetch-site", "same-site")]);
        assert!(matches!(check(KEY, &token, None, &sibling, &ok), Err(Forgery::CrossSite(_))));
        let port = headers(&[("host", "127.0.0.1:9464"), ("origin", "http://127.0.0.1:8080")]);
        assert!(matches!(check(KEY, &token, None, &port, &ok), Err(Forgery::CrossOrigin(_))), "another port is another origin");
        let evil = headers(&[("host", "127.0.0.1:9464"), ("origin", "http://evil.example")]);
        assert_eq!(check(KEY, &token, None, &evil, &ok), Err(Forgery::CrossOrigin("http://evil.example".into())));
        let null = headers(&[("host", "127.0.0.1:9464"), ("origin", "null")]);
        assert!(matches!(check(KEY, &token, None, &null, &ok), Err(Forgery::CrossOrigin(_))));
        let no_host = headers(&[("origin", "http://127.0.0.1:9464")]);
        assert!(matches!(check(KEY, &token, None, &no_host, &ok), Err(Forgery::CrossOrigin(_))));
        let not_public = headers(&[("host", "hooks.example.com"), ("origin", "http://hooks.example.com")]);
        assert!(matches!(check(KEY, &token, Some("https://hooks.example.com"), &not_public, &ok), Err(Forgery::CrossOrigin(_))));
    }

    #[test]
    fn form_fields_are_decoded() {
        let f = Form::parse(b"csrf=a%2Bb&since=2026-01-01T00%3A00&other=x");
        assert_eq!(f, Form { csrf: Some("a+b".into()), since: Some("2026-01-01T00:00".into()) });
        assert_eq!(Form::parse(b""), Form::default());
    }
}
