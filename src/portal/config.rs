//! `[portal]`: the key that signs portal links, how long a link lasts, where customers reach it.

use serde::{Deserialize, Serialize};

/// Shortest `portal.secret` accepted, in bytes: the HMAC-SHA256 key of every link.
pub const MIN_SECRET_BYTES: usize = 32;
/// Longest `portal.link_expiry_secs` accepted: 30 days. A link is a bearer credential; a
/// customer who needs the page later gets a new link from the operator's product.
pub const MAX_EXPIRY_SECS: u64 = 30 * 24 * 3600;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PortalConfig {
    /// HMAC-SHA256 key of the portal links (at least 32 bytes). Empty: the portal is off,
    /// `/portal/` is not served and `portal-link` answers 404. Changing it voids every link.
    pub secret: String,
    /// How long a link from `POST /api/tenants/{tenant}/portal-link` stays valid.
    pub link_expiry_secs: u64,
    /// The base URL customers reach hookd's `/portal/` under (the reverse proxy's), e.g.
    /// `https://hooks.example.com`. Links are built on it, and a form post must come from its
    /// origin. Empty: links on `http://` and the `Host` of the link call; posts accepted from
    /// the `Host` of the post (http or https).
    pub public_url: String,
}

impl Default for PortalConfig {
    fn default() -> Self {
        Self { secret: String::new(), link_expiry_secs: 3600, public_url: String::new() }
    }
}

impl PortalConfig {
    /// Whether the portal is served (a secret is set).
    pub fn enabled(&self) -> bool {
        !self.secret.is_empty()
    }

    /// The public URL's origin (`scheme://host[:port]`), if one is set.
    pub fn public_origin(&self) -> Option<String> {
        let url = url::Url::parse(&self.public_url).ok()?;
        Some(url.origin().ascii_serialization())
    }

    /// The checks serde cannot do; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.enabled() && self.secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "portal.secret must be at least {MIN_SECRET_BYTES} bytes (it signs the portal links), or empty to turn the portal off"
            ));
        }
        if self.link_expiry_secs == 0 || self.link_expiry_secs > MAX_EXPIRY_SECS {
            return Err(format!("portal.link_expiry_secs must be between 1 and {MAX_EXPIRY_SECS} (30 days)"));
        }
        if !self.public_url.is_empty() {
            let url = url::Url::parse(&self.public_url).map_err(|e| format!("portal.public_url `{}`: {e}", self.public_url))?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() || url.query().is_some() || url.fragment().is_some() {
                return Err(format!("portal.public_url `{}` must be an http(s) URL without query or fragment", self.public_url));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_off_with_one_hour_links() {
        let c = PortalConfig::default();
        assert!(!c.enabled());
        assert_eq!(c.link_expiry_secs, 3600);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn bad_values_name_the_key() {
        let short = PortalConfig { secret: "short".into(), ..Default::default() };
        assert!(short.validate().unwrap_err().contains("portal.secret"));
        let never = PortalConfig { link_expiry_secs: 0, ..Default::default() };
        assert!(never.validate().unwrap_err().contains("portal.link_expiry_secs"));
        let long = PortalConfig { link_expiry_secs: MAX_EXPIRY_SECS + 1, ..Default::default() };
        assert!(long.validate().unwrap_err().contains("portal.link_expiry_secs"));
        for bad in ["hooks.example.com", "ftp://hooks.example.com", "https://h.example/?a=1"] {
            let c = PortalConfig { public_url: bad.into(), ..Default::default() };
            assert!(c.validate().unwrap_err().contains("portal.public_url"), "{bad}");
        }
        let ok = PortalConfig { secret: "k".repeat(32), public_url: "https://hooks.example.com/base/".into(), ..Default::default() };
        assert!(ok.validate().is_ok());
        assert_eq!(ok.public_origin().as_deref(), Some("https://hooks.example.com"));
    }
}
