//! The guarded resolver against the machine's real resolver (`localhost`, `.invalid`).

use std::sync::Arc;

use hookd::deliver::ssrf::{GuardedResolver, ResolveError, TargetPolicy};

#[tokio::test]
async fn resolver_blocks_localhost_unless_allowed() {
    let blocked = GuardedResolver::new(Arc::new(TargetPolicy::default()));
    let err = blocked.lookup("localhost").await.unwrap_err();
    assert!(matches!(err, ResolveError::Blocked { .. }), "{err}");
    assert!(err.to_string().contains("loopback"), "{err}");

    let allowed = TargetPolicy::new(&["127.0.0.0/8".to_owned(), "::1/128".to_owned()]).unwrap();
    let addrs = GuardedResolver::new(Arc::new(allowed)).lookup("localhost").await.unwrap();
    assert!(!addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
}

#[tokio::test]
async fn resolver_reports_lookup_failure() {
    let r = GuardedResolver::new(Arc::new(TargetPolicy::default()));
    let err = r.lookup("does-not-exist.invalid").await.unwrap_err();
    assert!(matches!(err, ResolveError::Lookup { .. }), "{err}");
    assert!(err.to_string().contains("does-not-exist.invalid"), "{err}");
}
