//! The context of custom dialects' templates, built from one CRM event:
//!
//! - `event`: `id`, `tenant`, `type`, `occurred_at` (RFC 3339, UTC, millis, `Z`),
//!   `occurred_at_ms`, `data`, `actor`, `changes`, `content`, `link` (absent ones are none);
//! - `event_name`: the mapped wire name;
//! - `entity`: the event's own entity object (`data.order` for `order.*`, or `data`'s only
//!   value), or none.
//!
//! Objects keep the key order of the event, `{{ event.data | tojson }}` included.

use std::sync::Arc;

use chrono::SecondsFormat;
use minijinja::value::{Enumerator, Object, Value as TValue};
use serde_json::{Map, Value};

use super::own_entity_key;
use crate::ingest::event::CrmEvent;

/// The context of a custom dialect's templates for `ev`.
pub(super) fn template_context(ev: &CrmEvent, event_name: &str) -> TValue {
    let data = json_object(&ev.data);
    let entity = own_entity_key(ev).and_then(|k| data.get_attr(k).ok()).unwrap_or(TValue::from(()));
    let opt = |v: Option<&str>| v.map_or(TValue::from(()), TValue::from);
    let event = ordered_map(vec![
        ("id", TValue::from(ev.id.as_str())),
        ("tenant", TValue::from(ev.tenant.as_str())),
        ("type", TValue::from(ev.event_type.as_str())),
        ("occurred_at", TValue::from(ev.occurred_at.to_rfc3339_opts(SecondsFormat::Millis, true))),
        ("occurred_at_ms", TValue::from(ev.occurred_at.timestamp_millis())),
        ("data", data),
        ("actor", ev.actor.as_ref().map_or(TValue::from(()), json_value)),
        ("changes", ev.changes.as_ref().map_or(TValue::from(()), json_value)),
        ("content", opt(ev.content.as_deref())),
        ("link", opt(ev.link.as_deref())),
    ]);
    minijinja::context! { event => event, event_name => event_name, entity => entity }
}

/// A map that keeps its keys in insertion order: minijinja's own maps sort their keys
/// unless its `preserve_order` feature is on, which hookd does not enable.
#[derive(Debug)]
struct OrderedMap(Vec<(String, TValue)>);

impl Object for OrderedMap {
    fn get_value(self: &Arc<Self>, key: &TValue) -> Option<TValue> {
        let key = key.as_str()?;
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.0.iter().map(|(k, _)| TValue::from(k.as_str())).collect())
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.0.len())
    }
}

fn ordered_map(entries: Vec<(&str, TValue)>) -> TValue {
    TValue::from_object(OrderedMap(entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

fn json_object(map: &Map<String, Value>) -> TValue {
    TValue::from_object(OrderedMap(map.iter().map(|(k, v)| (k.clone(), json_value(v))).collect()))
}

/// A JSON value as a template value, objects in their original key order.
fn json_value(value: &Value) -> TValue {
    match value {
        Value::Object(map) => json_object(map),
        Value::Array(items) => TValue::from(items.iter().map(json_value).collect::<Vec<_>>()),
        Value::String(s) => TValue::from(s.as_str()),
        Value::Bool(b) => TValue::from(*b),
        Value::Null => TValue::from(()),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => TValue::from(i),
            (None, Some(u)) => TValue::from(u),
            _ => TValue::from(n.as_f64().unwrap_or(f64::NAN)),
        },
    }
}
