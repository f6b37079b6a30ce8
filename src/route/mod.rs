//! Route: which subscriptions want a record.
//!
//! The [`Registry`] holds every known subscription: the static ones from the config file and
//! the ones materialised from the compacted `hookd.subscriptions` topic (read by
//! [`reader`]; a topic entry with the same id overrides the config one, a null value removes
//! the topic entry). Lookups go through an immutable [`Index`] snapshot keyed by tenant, swapped
//! whole on every change, so the hot path takes no lock beyond cloning an `Arc`.
//!
//! Enable and disable are changes this instance publishes on the topic itself
//! ([`Registry::change_local`]): they show at once, as a local layer over the topic entries,
//! and the layer goes when the reader reads the same value back. Until then an older record
//! of the topic read in between cannot make a disabled subscription look enabled again.

pub mod filter;
pub mod reader;
pub mod subscription;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use filter::EventFilter;
use subscription::{Source, Subscription};

/// A read-only snapshot of the subscriptions.
#[derive(Debug, Default)]
pub struct Index {
    /// Per tenant, its subscriptions with their compiled `events`.
    by_tenant: HashMap<String, Vec<(Arc<Subscription>, EventFilter)>>,
    by_id: HashMap<String, Arc<Subscription>>,
}

impl Index {
    fn build(subs: impl Iterator<Item = Arc<Subscription>>) -> Self {
        let mut index = Index::default();
        for s in subs {
            index.by_tenant.entry(s.tenant.clone()).or_default().push((s.clone(), EventFilter::new(&s.events)));
            index.by_id.insert(s.id.clone(), s);
        }
        index
    }

    /// Enabled subscriptions of `tenant` on `source` whose filters accept `event_type`.
    pub fn matching<'a>(&'a self, tenant: &str, source: Source, event_type: &'a str) -> impl Iterator<Item = &'a Arc<Subscription>> + 'a {
        let subs = self.by_tenant.get(tenant).map_or(&[][..], Vec::as_slice);
        subs.iter().filter(move |(s, events)| s.source == source && s.enabled && events.accepts(event_type)).map(|(s, _)| s)
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Subscription>> {
        self.by_id.get(id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Subscription>> {
        self.by_id.values()
    }
}

/// The live set of subscriptions, shared by ingest and sender.
#[derive(Debug, Default)]
pub struct Registry {
    inner: RwLock<RegistryState>,
}

#[derive(Debug, Default)]
struct RegistryState {
    from_config: BTreeMap<String, Arc<Subscription>>,
    from_topic: BTreeMap<String, Arc<Subscription>>,
    /// Changes published by this instance and not read back from the topic yet.
    local: BTreeMap<String, Arc<Subscription>>,
    snapshot: Arc<Index>,
}

impl RegistryState {
    fn rebuild(&mut self) {
        let mut merged = self.from_config.clone();
        merged.extend(self.from_topic.iter().map(|(k, v)| (k.clone(), v.clone())));
        merged.extend(self.local.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.snapshot = Arc::new(Index::build(merged.into_values()));
    }
}

/// One change read from the subscriptions topic.
#[derive(Debug, Clone)]
pub enum Change {
    Upsert(Subscription),
    Delete(String),
}

impl Registry {
    pub fn new(static_subs: &[Subscription]) -> Self {
        let mut state =
            RegistryState { from_config: static_subs.iter().map(|s| (s.id.clone(), Arc::new(s.clone()))).collect(), ..Default::default() };
        state.rebuild();
        Self { inner: RwLock::new(state) }
    }

    /// The current snapshot.
    pub fn index(&self) -> Arc<Index> {
        self.inner.read().expect("registry lock poisoned").snapshot.clone()
    }

    /// Applies a batch of changes read from the topic, in topic order, and swaps the snapshot
    /// once. A local change ends when its own value is read back: records before it on the
    /// topic (same key, same partition) are older and stay under it.
    pub fn apply(&self, changes: impl IntoIterator<Item = Change>) -> usize {
        let mut state = self.inner.write().expect("registry lock poisoned");
        for change in changes {
            match change {
                Change::Upsert(s) => {
                    if state.local.get(&s.id).is_some_and(|l| **l == s) {
                        state.local.remove(&s.id);
                    }
                    state.from_topic.insert(s.id.clone(), Arc::new(s));
                }
                Change::Delete(id) => {
                    state.from_topic.remove(&id);
                }
            }
        }
        state.rebuild();
        state.snapshot.len()
    }

    /// Compare-and-set of one subscription, for a change this instance is about to publish:
    /// `change` sees the subscription as it is now and returns the new version, or None to
    /// leave it. Atomic with every other change, so of concurrent callers one wins; the new
    /// version shows at once. Returns (before, after) when it changed.
    pub fn change_local(
        &self,
        id: &str,
        change: impl FnOnce(&Subscription) -> Option<Subscription>,
    ) -> Option<(Arc<Subscription>, Arc<Subscription>)> {
        let mut state = self.inner.write().expect("registry lock poisoned");
        let before = state.snapshot.get(id)?.clone();
        let after = Arc::new(change(&before)?);
        state.local.insert(id.to_string(), after.clone());
        state.rebuild();
        Some((before, after))
    }

    /// Takes back a local change that did not reach the topic, if it is still the one shown.
    pub fn withdraw_local(&self, change: &Arc<Subscription>) {
        let mut state = self.inner.write().expect("registry lock poisoned");
        if state.local.get(&change.id).is_some_and(|l| Arc::ptr_eq(l, change)) {
            state.local.remove(&change.id);
            state.rebuild();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(id: &str, tenant: &str, events: &[&str]) -> Subscription {
        serde_json::from_value(serde_json::json!({"id": id, "tenant": tenant, "url": "http://x/", "events": events})).unwrap()
    }

    #[test]
    fn matches_tenant_filter_and_enabled() {
        let mut off = sub("c", "t1", &["*"]);
        off.enabled = false;
        let reg = Registry::new(&[sub("a", "t1", &["contact.*"]), sub("b", "t1", &["order.created"]), off, sub("d", "t2", &["*"])]);
        let idx = reg.index();
        let ids = |t: &str, e: &str| {
            let mut v: Vec<String> = idx.matching(t, Source::Crm, e).map(|s| s.id.clone()).collect();
            v.sort();
            v
        };
        assert_eq!(ids("t1", "contact.created"), vec!["a"]);
        assert_eq!(ids("t1", "order.created"), vec!["b"]);
        assert_eq!(ids("t2", "order.created"), vec!["d"]);
        assert!(ids("t3", "order.created").is_empty());
        assert!(idx.matching("t1", Source::Chat, "message").next().is_none());
    }

    #[test]
    fn topic_overrides_config_and_delete_reveals_it() {
        let reg = Registry::new(&[sub("a", "t1", &["x"])]);
        reg.apply([Change::Upsert(sub("a", "t1", &["y"])), Change::Upsert(sub("b", "t9", &["*"]))]);
        assert_eq!(reg.index().get("a").unwrap().events, vec!["y"]);
        assert_eq!(reg.index().len(), 2);
        reg.apply([Change::Delete("a".into()), Change::Delete("b".into())]);
        assert_eq!(reg.index().get("a").unwrap().events, vec!["x"]);
        assert!(reg.index().get("b").is_none());
    }

    #[test]
    fn a_local_change_wins_once_and_holds_over_older_topic_records_until_read_back() {
        let reg = Registry::new(&[sub("a", "t1", &["x"])]);
        let off = |s: &Subscription| s.enabled.then(|| Subscription { enabled: false, ..s.clone() });
        let (before, after) = reg.change_local("a", off).expect("enabled: changes");
        assert!(before.enabled && !after.enabled && !reg.index().get("a").unwrap().enabled);
        assert!(reg.change_local("a", off).is_none(), "a second caller sees it disabled already");
        assert!(reg.change_local("nope", off).is_none());
        // An older record of the topic (enabled, another URL) is read before ours comes back.
        reg.apply([Change::Upsert(Subscription { url: "http://y/".into(), ..sub("a", "t1", &["x"]) })]);
        assert!(!reg.index().get("a").unwrap().enabled, "the older record stays under the local change");
        reg.apply([Change::Upsert((*after).clone())]);
        reg.apply([Change::Upsert(sub("a", "t1", &["x"]))]);
        assert!(reg.index().get("a").unwrap().enabled, "read back: the topic rules again");
        let (_, gone) = reg.change_local("a", off).unwrap();
        reg.withdraw_local(&gone);
        assert!(reg.index().get("a").unwrap().enabled, "withdrawn: as before");
    }
}
