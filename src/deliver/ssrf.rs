//! SSRF guard: which IP addresses a webhook may be sent to.
//!
//! What it does: classifies addresses as globally routable or not ([`classify`]), lets the
//! operator exempt CIDRs (`delivery.allow_private_targets`) through [`TargetPolicy`], and
//! plugs the policy into reqwest's DNS step with [`GuardedResolver`].
//!
//! Guarantees:
//! - A name that resolves to a mix of public and non-public addresses is connected only to
//!   the public ones; one that resolves only to non-public addresses fails with a clear
//!   [`ResolveError::Blocked`].
//! - The addresses checked are the addresses connected to: reqwest hands the resolver's
//!   answer straight to its connector, so a DNS answer cannot change between the check and
//!   the connection (no rebinding window).
//! - IPv4-mapped IPv6 (`::ffff:a.b.c.d`) and NAT64 (`64:ff9b::a.b.c.d`) addresses are judged
//!   by the IPv4 address they carry, for both the block list and the allowlist.
//! - Not covered here: reqwest skips the resolver for IP-literal URLs, so the HTTP client
//!   (`super::http`) checks those with [`TargetPolicy::permits`] itself.

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Config key that exempts CIDRs from the guard; named in every refusal so operators know
/// where to look.
pub const ALLOW_KEY: &str = "delivery.allow_private_targets";

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)
}

const fn v6(segments: [u16; 8], len: u8) -> Ipv6Net {
    let [a, b, c, d, e, f, g, h] = segments;
    Ipv6Net::new_assert(Ipv6Addr::new(a, b, c, d, e, f, g, h), len)
}

/// IPv4 ranges that are not globally routable (IANA special-purpose registry), with the
/// reason shown to operators. Order matters only for the reason: the first match wins.
const BLOCKED_V4: &[(Ipv4Net, &str)] = &[
    (v4(0, 0, 0, 0, 32), "unspecified"),
    (v4(0, 0, 0, 0, 8), "this-network"),
    (v4(10, 0, 0, 0, 8), "private"),
    (v4(100, 64, 0, 0, 10), "carrier-grade NAT"),
    (v4(127, 0, 0, 0, 8), "loopback"),
    (v4(169, 254, 169, 254, 32), "cloud metadata"),
    (v4(169, 254, 0, 0, 16), "link-local"),
    (v4(172, 16, 0, 0, 12), "private"),
    (v4(192, 0, 0, 0, 24), "IETF protocol assignments"),
    (v4(192, 0, 2, 0, 24), "documentation"),
    (v4(192, 88, 99, 0, 24), "6to4 relay anycast"),
    (v4(192, 168, 0, 0, 16), "private"),
    (v4(198, 18, 0, 0, 15), "benchmarking"),
    (v4(198, 51, 100, 0, 24), "documentation"),
    (v4(203, 0, 113, 0, 24), "documentation"),
    (v4(224, 0, 0, 0, 4), "multicast"),
    (v4(255, 255, 255, 255, 32), "broadcast"),
    (v4(240, 0, 0, 0, 4), "reserved"),
];

/// IPv6 ranges that are not globally routable. `::ffff:0:0/96` and `64:ff9b::/96` are not
/// here: [`classify`] judges them by their embedded IPv4 address.
const BLOCKED_V6: &[(Ipv6Net, &str)] = &[
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "unspecified"),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback"),
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 96), "IPv4-compatible (deprecated)"),
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), "local-use NAT64"),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), "discard-only"),
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32), "Teredo"),
    (v6([0x2001, 2, 0, 0, 0, 0, 0, 0], 48), "benchmarking"),
    (v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), "documentation"),
    (v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16), "6to4"),
    (v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), "documentation"),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), "unique-local"),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
    (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), "site-local (deprecated)"),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast"),
];

/// NAT64 well-known prefix (RFC 6052): the last 32 bits are an IPv4 address.
const NAT64: Ipv6Net = v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96);

/// Maps IPv4-mapped and NAT64 IPv6 addresses to the IPv4 address they reach; others as is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(mapped) = v6.to_ipv4_mapped() {
                return IpAddr::V4(mapped);
            }
            if NAT64.contains(&v6) {
                let [.., a, b, c, d] = v6.octets();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            ip
        }
        IpAddr::V4(_) => ip,
    }
}

/// Returns why `ip` is not a global unicast address (e.g. `"loopback"`), or `None` when it
/// is one. Ignores any allowlist; see [`TargetPolicy::permits`] for the decision.
pub fn classify(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => BLOCKED_V4.iter().find(|(net, _)| net.contains(&v4)).map(|(_, why)| *why),
        IpAddr::V6(v6) => BLOCKED_V6.iter().find(|(net, _)| net.contains(&v6)).map(|(_, why)| *why),
    }
}

/// The operator's decision on which addresses webhooks may reach.
#[derive(Debug, Clone, Default)]
pub struct TargetPolicy {
    /// CIDRs exempt from the guard (`delivery.allow_private_targets`), e.g. `127.0.0.0/8`
    /// for tests or an intranet range for on-premise receivers. Empty means global only.
    allow: Vec<IpNet>,
}

impl TargetPolicy {
    /// Parses the allowlist. Each entry is a CIDR (`10.0.0.0/8`, `fd00::/8`) or a single
    /// address (taken as `/32` or `/128`). The error names the bad entry and the config key.
    pub fn new(allow: &[String]) -> Result<Self, String> {
        let allow = allow.iter().map(|entry| parse_cidr(entry)).collect::<Result<_, _>>()?;
        Ok(Self { allow })
    }

    /// The allowlisted networks, normalised (host bits cleared).
    pub fn allowed(&self) -> &[IpNet] {
        &self.allow
    }

    /// True when a webhook may connect to `ip`: it is global unicast, or it lies in an
    /// allowlisted CIDR (mapped/NAT64 IPv6 are checked as their IPv4 address too).
    pub fn permits(&self, ip: IpAddr) -> bool {
        self.refusal(ip).is_none()
    }

    /// Why `ip` is refused (as [`classify`]), or `None` when [`permits`](Self::permits).
    pub fn refusal(&self, ip: IpAddr) -> Option<&'static str> {
        let why = classify(ip)?;
        let canon = canonical(ip);
        let allowed = self.allow.iter().any(|net| net.contains(&ip) || net.contains(&canon));
        (!allowed).then_some(why)
    }
}

fn parse_cidr(entry: &str) -> Result<IpNet, String> {
    let s = entry.trim();
    let parsed = s.parse::<IpNet>().or_else(|e| s.parse::<IpAddr>().map(IpNet::from).map_err(|_| e));
    parsed
        .map(|net| net.trunc())
        .map_err(|e| format!("{ALLOW_KEY}: {entry:?} is not a CIDR or IP address ({e}); expected e.g. \"127.0.0.0/8\""))
}

/// Why the guarded resolver produced no address. Found by `super::http` in the source chain
/// of reqwest's connect error, to report `Blocked` and `Dns` distinctly.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    /// Every address the name resolved to is refused by the policy.
    #[error("target {host} resolves only to non-public addresses ({addrs}); allow them with {ALLOW_KEY}")]
    Blocked {
        /// The host name from the URL.
        host: String,
        /// The refused addresses with their reason, e.g. `127.0.0.1 loopback`.
        addrs: String,
    },
    /// The lookup itself failed or returned nothing.
    #[error("DNS lookup of {host} failed: {reason}")]
    Lookup {
        /// The host name from the URL.
        host: String,
        /// The system resolver's message.
        reason: String,
    },
}

/// Finds a [`ResolveError`] in an error's source chain (reqwest wraps resolver errors).
pub fn find_resolve_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a ResolveError> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<ResolveError>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

/// A reqwest DNS resolver that resolves with the system resolver (tokio's `lookup_host`)
/// and keeps only the addresses the [`TargetPolicy`] permits.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    /// Shared with the HTTP client, which checks IP-literal URLs against the same policy.
    policy: Arc<TargetPolicy>,
}

impl GuardedResolver {
    /// A resolver enforcing `policy`.
    pub fn new(policy: Arc<TargetPolicy>) -> Self {
        Self { policy }
    }

    /// Resolves `host` and filters by the policy; the port of the results is 0 (reqwest
    /// sets the URL's port).
    pub async fn lookup(&self, host: &str) -> Result<Vec<SocketAddr>, ResolveError> {
        let lookup_err = |reason: String| ResolveError::Lookup { host: host.to_owned(), reason };
        let found: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await.map_err(|e| lookup_err(e.to_string()))?.collect();
        if found.is_empty() {
            return Err(lookup_err("no addresses".to_owned()));
        }
        self.filter(host, found)
    }

    fn filter(&self, host: &str, found: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, ResolveError> {
        let mut refused = String::new();
        let mut kept = Vec::with_capacity(found.len());
        for addr in found {
            match self.policy.refusal(addr.ip()) {
                None => kept.push(addr),
                Some(why) => {
                    let sep = if refused.is_empty() { "" } else { ", " };
                    let _ = write!(refused, "{sep}{} {why}", addr.ip());
                }
            }
        }
        if kept.is_empty() {
            return Err(ResolveError::Blocked { host: host.to_owned(), addrs: refused });
        }
        Ok(kept)
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let this = self.clone();
        Box::pin(async move {
            let addrs = this.lookup(name.as_str()).await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const TABLE: &[(&str, Option<&str>)] = &[
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("93.184.216.34", None),
        ("100.63.255.255", None),
        ("100.128.0.0", None),
        ("172.15.255.255", None),
        ("172.32.0.0", None),
        ("192.169.0.1", None),
        ("0.0.0.0", Some("unspecified")),
        ("0.1.2.3", Some("this-network")),
        ("10.0.0.1", Some("private")),
        ("10.255.255.255", Some("private")),
        ("172.16.0.1", Some("private")),
        ("172.31.255.255", Some("private")),
        ("192.168.1.1", Some("private")),
        ("100.64.0.1", Some("carrier-grade NAT")),
        ("100.127.255.255", Some("carrier-grade NAT")),
        ("127.0.0.1", Some("loopback")),
        ("127.255.0.9", Some("loopback")),
        ("169.254.169.254", Some("cloud metadata")),
        ("169.254.1.1", Some("link-local")),
        ("192.0.0.8", Some("IETF protocol assignments")),
        ("192.0.2.10", Some("documentation")),
        ("198.51.100.7", Some("documentation")),
        ("203.0.113.200", Some("documentation")),
        ("198.18.0.1", Some("benchmarking")),
        ("224.0.0.251", Some("multicast")),
        ("239.255.255.250", Some("multicast")),
        ("240.0.0.1", Some("reserved")),
        ("255.255.255.255", Some("broadcast")),
        ("2606:4700:4700::1111", None),
        ("2a00:1450:4001::200e", None),
        ("::", Some("unspecified")),
        ("::1", Some("loopback")),
        ("::127.0.0.1", Some("IPv4-compatible (deprecated)")),
        ("fc00::1", Some("unique-local")),
        ("fd12:3456::1", Some("unique-local")),
        ("fe80::1", Some("link-local")),
        ("febf::1", Some("link-local")),
        ("fec0::1", Some("site-local (deprecated)")),
        ("ff02::1", Some("multicast")),
        ("2001:db8::1", Some("documentation")),
        ("3fff::1", Some("documentation")),
        ("100::1", Some("discard-only")),
        ("2001::1", Some("Teredo")),
        ("2002:a00:1::1", Some("6to4")),
        ("64:ff9b:1::1", Some("local-use NAT64")),
        ("::ffff:8.8.8.8", None),
        ("::ffff:127.0.0.1", Some("loopback")),
        ("::ffff:169.254.169.254", Some("cloud metadata")),
        ("::ffff:10.1.2.3", Some("private")),
        ("64:ff9b::8.8.8.8", None),
        ("64:ff9b::192.168.0.1", Some("private")),
    ];

    #[test]
    fn classification_table() {
        for (addr, want) in TABLE {
            assert_eq!(classify(ip(addr)), *want, "{addr}");
        }
    }

    #[test]
    fn empty_policy_permits_exactly_the_global_addresses() {
        let policy = TargetPolicy::default();
        for (addr, want) in TABLE {
            assert_eq!(policy.permits(ip(addr)), want.is_none(), "{addr}");
        }
    }

    #[test]
    fn allowlist_exempts_only_its_ranges() {
        let allow = ["127.0.0.0/8".to_owned(), "fd00::/8".to_owned(), "10.1.2.3".to_owned()];
        let policy = TargetPolicy::new(&allow).unwrap();
        assert!(policy.permits(ip("127.0.0.1")));
        assert!(policy.permits(ip("127.9.9.9")));
        assert!(policy.permits(ip("::ffff:127.0.0.1")), "mapped v4 follows the v4 allowlist");
        assert!(policy.permits(ip("fd00::5")));
        assert!(policy.permits(ip("10.1.2.3")));
        assert!(!policy.permits(ip("10.1.2.4")), "bare address is a /32");
        assert!(!policy.permits(ip("::1")), "v6 loopback is not in 127.0.0.0/8");
        assert!(!policy.permits(ip("fc00::1")));
        assert!(!policy.permits(ip("169.254.169.254")));
        assert!(policy.permits(ip("8.8.8.8")));
    }

    #[test]
    fn allowlist_entries_are_normalised() {
        let policy = TargetPolicy::new(&[" 10.9.8.7/16 ".to_owned()]).unwrap();
        assert_eq!(policy.allowed(), &["10.9.0.0/16".parse::<IpNet>().unwrap()]);
        assert!(policy.permits(ip("10.9.255.1")));
    }

    #[test]
    fn bad_allowlist_entry_is_named() {
        let err = TargetPolicy::new(&["127.0.0.0/8".to_owned(), "10.0.0.0/33".to_owned()]).unwrap_err();
        assert!(err.contains("\"10.0.0.0/33\""), "{err}");
        assert!(err.contains(ALLOW_KEY), "{err}");
        assert!(TargetPolicy::new(&["localhost".to_owned()]).is_err());
    }

    #[test]
    fn filter_keeps_permitted_and_names_refused() {
        let r = GuardedResolver::new(Arc::new(TargetPolicy::default()));
        let a = |s: &str| SocketAddr::new(ip(s), 0);
        let kept = r.filter("mixed.test", vec![a("10.0.0.1"), a("8.8.8.8")]).unwrap();
        assert_eq!(kept, vec![a("8.8.8.8")]);
        let err = r.filter("internal.test", vec![a("10.0.0.1"), a("::1")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "target internal.test resolves only to non-public addresses \
             (10.0.0.1 private, ::1 loopback); allow them with delivery.allow_private_targets"
        );
    }
}
