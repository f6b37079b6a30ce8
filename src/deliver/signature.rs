//! Standard Webhooks request signing (`webhook-signature` header).
//!
//! What it does: computes `v1,<base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))>` for
//! every secret of a subscription, space-separated, exactly as the Standard Webhooks spec and
//! its reference libraries (e.g. the `standardwebhooks` crate) verify it.
//!
//! Guarantees:
//! - Pure and infallible at send time: [`sign`] never fails and never panics. Secrets are
//!   validated once, at config load, with [`decode_secret`]; a secret that slips through
//!   invalid is skipped when signing rather than failing the delivery.
//! - Secret format is the spec's: base64 (standard alphabet, padded), with an optional
//!   `whsec_` prefix. This is what every Standard Webhooks library decodes, so a customer who
//!   pastes the same string into their verifier gets the same key. A string that is not
//!   base64 is rejected, not used as raw bytes: guessing would produce signatures that no
//!   receiver library can verify, and the mistake would only show up at the customer's end.
//! - Secret rotation: a subscription's `secret` may hold several whitespace-separated secrets;
//!   the header then carries one `v1,` signature per secret, in the same order, and a
//!   receiver holding any one of them verifies the request.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Prefix of Standard Webhooks secrets; optional on input, never part of the key.
pub const SECRET_PREFIX: &str = "whsec_";

/// Version tag of the only signature scheme hookd emits (symmetric HMAC-SHA256).
pub const SIGNATURE_VERSION: &str = "v1";

/// Why a configured webhook secret cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The secret (after the optional `whsec_` prefix) is not standard, padded base64.
    #[error("webhook secret is not valid base64 after the optional `whsec_` prefix ({reason}); expected e.g. `whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw`")]
    NotBase64 {
        /// The base64 decoder's own description of the problem (position, bad byte).
        reason: String,
    },
    /// The secret decodes to zero bytes, which would make every signature forgeable.
    #[error("webhook secret is empty; expected `whsec_` followed by base64 of 24 to 64 random bytes")]
    Empty,
}

/// Decodes one Standard Webhooks secret into its HMAC key bytes.
///
/// Accepts `whsec_<base64>` or bare `<base64>` (standard alphabet, padding required), the
/// same inputs the reference libraries accept. Surrounding whitespace is ignored. Errors name
/// the problem but never echo the secret itself, so they are safe to log.
pub fn decode_secret(s: &str) -> Result<Vec<u8>, SignatureError> {
    let s = s.trim();
    let encoded = s.strip_prefix(SECRET_PREFIX).unwrap_or(s);
    let key = STANDARD.decode(encoded).map_err(|e| SignatureError::NotBase64 { reason: e.to_string() })?;
    if key.is_empty() {
        return Err(SignatureError::Empty);
    }
    Ok(key)
}

/// Validates a whitespace-separated list of secrets (a rotation set) as [`sign`] will use it.
///
/// Meant for config validation: returns the first bad secret's error, prefixed by its
/// 1-based position in the list (never the secret itself), or the number of usable keys.
pub fn validate_secrets(secrets: &str) -> Result<usize, String> {
    let mut count = 0;
    for (i, secret) in secrets.split_whitespace().enumerate() {
        decode_secret(secret).map_err(|e| format!("secret #{}: {e}", i + 1))?;
        count += 1;
    }
    Ok(count)
}

/// Returns the `webhook-signature` header value for one request.
///
/// `secrets` is the subscription's secret field: one or more whitespace-separated
/// `whsec_` secrets. The result is `v1,<sig>` per usable secret, joined by single spaces.
///
/// When there is no usable key (`None`, an empty string, or every secret failing
/// [`decode_secret`]) the signature is computed with an empty HMAC key. The header is then
/// still present and well-formed (same wire shape for every subscription), but it proves
/// nothing: any receiver can compute it. Configure a secret to get authenticity.
pub fn sign(secrets: Option<&str>, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let keys: Vec<Vec<u8>> = secrets.unwrap_or("").split_whitespace().filter_map(|s| decode_secret(s).ok()).collect();
    if keys.is_empty() {
        return sign_one(&[], msg_id, timestamp, body);
    }
    keys.iter().map(|key| sign_one(key, msg_id, timestamp, body)).collect::<Vec<_>>().join(" ")
}

/// One `v1,<base64 mac>` signature over `{id}.{timestamp}.{body}` with `key`.
fn sign_one(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length, including empty: `new_from_slice` cannot fail here.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!("{SIGNATURE_VERSION},{}", STANDARD.encode(digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Secret and expected signature from the Standard Webhooks reference test vectors
    /// (the `standardwebhooks` crate's own `test_sign`).
    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const MSG_ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const TIMESTAMP: i64 = 1649367553;
    const BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
    const EXPECTED: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    #[test]
    fn matches_reference_vector() {
        assert_eq!(sign(Some(SECRET), MSG_ID, TIMESTAMP, BODY), EXPECTED);
    }

    #[test]
    fn prefix_is_optional() {
        let bare = SECRET.strip_prefix("whsec_").unwrap();
        assert_eq!(decode_secret(bare).unwrap(), decode_secret(SECRET).unwrap());
        assert_eq!(sign(Some(bare), MSG_ID, TIMESTAMP, BODY), EXPECTED);
    }

    #[test]
    fn each_input_changes_the_signature() {
        let base = sign(Some(SECRET), MSG_ID, TIMESTAMP, BODY);
        assert_ne!(sign(Some(SECRET), "msg_other", TIMESTAMP, BODY), base);
        assert_ne!(sign(Some(SECRET), MSG_ID, TIMESTAMP + 1, BODY), base);
        assert_ne!(sign(Some(SECRET), MSG_ID, TIMESTAMP, b"{}"), base);
        assert_ne!(sign(Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), MSG_ID, TIMESTAMP, BODY), base);
    }

    #[test]
    fn rotation_emits_one_signature_per_secret_in_order() {
        let other = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let both = format!("{SECRET}\n  {other}");
        let header = sign(Some(&both), MSG_ID, TIMESTAMP, BODY);
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2, "{header}");
        assert_eq!(parts[0], EXPECTED);
        assert_eq!(parts[1], sign(Some(other), MSG_ID, TIMESTAMP, BODY));
    }

    #[test]
    fn invalid_secret_is_skipped_at_sign_time() {
        let mixed = format!("not-base64!! {SECRET}");
        assert_eq!(sign(Some(&mixed), MSG_ID, TIMESTAMP, BODY), EXPECTED);
    }

    #[test]
    fn no_usable_secret_signs_with_empty_key() {
        let empty_key = sign_one(&[], MSG_ID, TIMESTAMP, BODY);
        assert!(empty_key.starts_with("v1,"));
        assert_ne!(empty_key, EXPECTED);
        assert_eq!(sign(None, MSG_ID, TIMESTAMP, BODY), empty_key);
        assert_eq!(sign(Some("  "), MSG_ID, TIMESTAMP, BODY), empty_key);
        assert_eq!(sign(Some("%%%"), MSG_ID, TIMESTAMP, BODY), empty_key);
    }

    #[test]
    fn decode_errors_are_clear_and_do_not_leak_the_secret() {
        let err = decode_secret("whsec_sup3r$ecret").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, SignatureError::NotBase64 { .. }), "{err:?}");
        assert!(msg.contains("not valid base64"), "{msg}");
        assert!(!msg.contains("sup3r"), "{msg}");
        assert_eq!(decode_secret("whsec_").unwrap_err(), SignatureError::Empty);
        assert_eq!(decode_secret("").unwrap_err(), SignatureError::Empty);
    }

    #[test]
    fn validate_secrets_reports_position() {
        assert_eq!(validate_secrets(SECRET), Ok(1));
        assert_eq!(validate_secrets(&format!("{SECRET} {SECRET}")), Ok(2));
        let err = validate_secrets(&format!("{SECRET} whsec_!!")).unwrap_err();
        assert!(err.starts_with("secret #2: "), "{err}");
    }
}
