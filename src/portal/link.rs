//! Signed portal links and the CSRF token derived from them.
//!
//! A link's token is `v1.<tenant, base64url>.<expiry, unix seconds>.<HMAC-SHA256, base64url>`,
//! the MAC keyed with `portal.secret` over a domain-separated message holding the first three
//! parts exactly as written, so changing any character of the token (tenant, expiry, MAC)
//! makes it invalid. The signature is checked before the expiry (an expiry written by hand is
//! a tampered link), in constant time ([`hmac::Mac::verify_slice`]).
//!
//! The CSRF token of a page is the HMAC of the link's token under another domain tag: only
//! hookd can compute it, it is the same for every page of one link and differs between links.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const VERSION: &str = "v1";
const LINK_TAG: &[u8] = b"hookd-portal-link-v1\0";
const CSRF_TAG: &[u8] = b"hookd-portal-csrf-v1\0";

/// What a valid link grants: one tenant's page, until a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub tenant: String,
    /// Unix seconds; the link is refused from this second on.
    pub expires_at: i64,
}

/// Why a link is refused (the portal answers 401 for each).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("the link is malformed")]
    Malformed,
    #[error("the link's signature does not match (changed, or signed with another portal.secret)")]
    BadSignature,
    #[error("the link expired at {0}")]
    Expired(String),
}

fn mac(secret: &[u8], tag: &[u8], message: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    m.update(tag);
    m.update(message);
    m
}

/// The token of a link to `tenant`'s page, valid until `expires_at` (unix seconds).
pub fn sign(secret: &[u8], tenant: &str, expires_at: i64) -> String {
    let signed = format!("{VERSION}.{}.{expires_at}", URL_SAFE_NO_PAD.encode(tenant));
    let tag = mac(secret, LINK_TAG, signed.as_bytes()).finalize().into_bytes();
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag))
}

/// Checks a token at `now` (unix seconds): the tenant and expiry it grants, or why not.
pub fn verify(secret: &[u8], token: &str, now: i64) -> Result<Claims, LinkError> {
    let (signed, tag) = token.rsplit_once('.').ok_or(LinkError::Malformed)?;
    let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| LinkError::Malformed)?;
    mac(secret, LINK_TAG, signed.as_bytes()).verify_slice(&tag).map_err(|_| LinkError::BadSignature)?;
    let mut parts = signed.split('.');
    let (Some(VERSION), Some(tenant), Some(expiry), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(LinkError::Malformed);
    };
    let tenant = URL_SAFE_NO_PAD.decode(tenant).ok().and_then(|t| String::from_utf8(t).ok()).ok_or(LinkError::Malformed)?;
    let expires_at: i64 = expiry.parse().map_err(|_| LinkError::Malformed)?;
    if now >= expires_at {
        return Err(LinkError::Expired(rfc3339(expires_at)));
    }
    Ok(Claims { tenant, expires_at })
}

/// The CSRF token of the pages of the link `token`.
pub fn csrf_token(secret: &[u8], token: &str) -> String {
    URL_SAFE_NO_PAD.encode(mac(secret, CSRF_TAG, token.as_bytes()).finalize().into_bytes())
}

/// Whether `presented` is the CSRF token of `token` (constant time).
pub fn csrf_matches(secret: &[u8], token: &str, presented: &str) -> bool {
    let Ok(tag) = URL_SAFE_NO_PAD.decode(presented) else { return false };
    mac(secret, CSRF_TAG, token.as_bytes()).verify_slice(&tag).is_ok()
}

/// RFC 3339 UTC of unix seconds (empty when out of range).
pub fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: i64 = 1_800_000_000;

    #[test]
    fn a_signed_link_grants_its_tenant_until_it_expires() {
        let token = sign(KEY, "ws-10010", NOW + 3600);
        assert!(token.starts_with("v1.") && !token.contains(['/', '+', '=', '?', '#']), "path-safe: {token}");
        assert_eq!(verify(KEY, &token, NOW), Ok(Claims { tenant: "ws-10010".into(), expires_at: NOW + 3600 }));
        assert_eq!(verify(KEY, &token, NOW + 3599).unwrap().tenant, "ws-10010");
        let odd = "tenant/with.dots and ü";
        assert_eq!(verify(KEY, &sign(KEY, odd, NOW + 1), NOW).unwrap().tenant, odd);
    }

    #[test]
    fn expired_at_the_second_it_says() {
        let token = sign(KEY, "t", NOW);
        assert_eq!(verify(KEY, &token, NOW), Err(LinkError::Expired("2027-01-15T08:00:00Z".into())));
        assert!(matches!(verify(KEY, &token, NOW + 86_400), Err(LinkError::Expired(_))));
        assert!(verify(KEY, &token, NOW - 1).is_ok());
    }

    #[test]
    fn any_changed_character_is_refused() {
        let token = sign(KEY, "t1", NOW + 60);
        for i in 0..token.len() {
            let mut bytes = token.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let changed = String::from_utf8(bytes).unwrap();
            assert!(verify(KEY, &changed, NOW).is_err(), "changed at {i}: {changed}");
        }
        let (head, tag) = token.rsplit_once('.').unwrap();
        let other_tenant = head.replace(&URL_SAFE_NO_PAD.encode("t1"), &URL_SAFE_NO_PAD.encode("t2"));
        assert_eq!(verify(KEY, &format!("{other_tenant}.{tag}"), NOW), Err(LinkError::BadSignature));
        let later = head.replace(&(NOW + 60).to_string(), &(NOW + 999_999).to_string());
        assert_eq!(verify(KEY, &format!("{later}.{tag}"), NOW), Err(LinkError::BadSignature));
        assert_eq!(verify(b"another secret, just as long....", &token, NOW), Err(LinkError::BadSignature));
        for bad in ["", ".", "v1", "v1.dA.1", "v1.dA.1.", "v1.dA.1.!!!", &token[..token.len() - 2]] {
            assert!(verify(KEY, bad, NOW).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_well_signed_token_of_another_shape_is_malformed() {
        for signed in ["v2.dA.1900000000", "v1.dA.1900000000.x", "v1.!.1900000000", "v1.dA.soon"] {
            let tag = URL_SAFE_NO_PAD.encode(mac(KEY, LINK_TAG, signed.as_bytes()).finalize().into_bytes());
            assert_eq!(verify(KEY, &format!("{signed}.{tag}"), NOW), Err(LinkError::Malformed), "{signed}");
        }
    }

    #[test]
    fn the_csrf_token_belongs_to_one_link_and_is_not_its_signature() {
        let (a, b) = (sign(KEY, "a", NOW + 60), sign(KEY, "b", NOW + 60));
        let csrf = csrf_token(KEY, &a);
        assert!(csrf_matches(KEY, &a, &csrf));
        assert!(!csrf_matches(KEY, &b, &csrf), "another link's token");
        assert!(!csrf_matches(KEY, &a, &csrf_token(KEY, &b)));
        assert!(!csrf_matches(b"another secret, just as long....", &a, &csrf));
        assert!(!a.ends_with(&csrf), "not the link's own MAC");
        for bad in ["", "x", "%%%", &csrf[..csrf.len() - 1]] {
            assert!(!csrf_matches(KEY, &a, bad), "{bad}");
        }
    }
}
