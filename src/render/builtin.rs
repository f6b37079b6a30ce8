//! The built-in dialects: body shapes of the vendors in `shared/seeds/`.
//!
//! Golden tests in `golden.rs` check each against the seeds' sample payloads.

use chrono::SecondsFormat;
use serde_json::{Map, Value};

use super::{json_bytes, own_entity_key, xml, BodyTimestamp, RenderError, Rendered, SuccessRule};
use crate::ingest::event::CrmEvent;
use crate::route::subscription::Format;

const JSON: &str = "application/json";
const XML: &str = "application/xml; charset=utf-8";

/// One built-in dialect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Builtin {
    AntCrm,
    BeeIq,
    Teamcrop,
    DooPage,
    Standard,
    /// TimelinesAI chat bundles; rendered from chat messages by the window stage, never
    /// from CRM events. Listed so that subscriptions naming it validate and no custom
    /// dialect takes its name.
    Timelines,
}

impl Builtin {
    pub(super) const ALL: [Builtin; 6] = [Self::AntCrm, Self::BeeIq, Self::Teamcrop, Self::DooPage, Self::Standard, Self::Timelines];

    pub(super) fn name(self) -> &'static str {
        match self {
            Self::AntCrm => "antcrm",
            Self::BeeIq => "beeiq",
            Self::Teamcrop => "teamcrop",
            Self::DooPage => "doopage",
            Self::Standard => "standard",
            Self::Timelines => "timelines",
        }
    }

    pub(super) fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }

    /// Table of `event_names.toml` holding this dialect's wire names; None: names pass through.
    pub(super) fn table(self) -> Option<&'static str> {
        match self {
            Self::AntCrm | Self::BeeIq => Some("antcrm"),
            Self::Teamcrop => Some("teamcrop"),
            Self::DooPage => Some("doopage"),
            Self::Standard | Self::Timelines => None,
        }
    }

    pub(super) fn supports(self, format: Format) -> bool {
        format == Format::Json || self == Self::Teamcrop
    }

    pub(super) fn success_rule(self) -> SuccessRule {
        match self {
            Self::Teamcrop => SuccessRule::Exactly200,
            _ => SuccessRule::Any2xx,
        }
    }

    /// Renders `ev`; `format` has already been checked with [`Builtin::supports`]. `stamp`
    /// concerns the doopage body only.
    pub(super) fn render(self, format: Format, ev: &CrmEvent, event_name: String, stamp: BodyTimestamp) -> Result<Rendered, RenderError> {
        let body = match self {
            Self::AntCrm | Self::BeeIq => antcrm_body(ev, &event_name),
            Self::DooPage => doopage_body(ev, &event_name, stamp),
            Self::Standard => standard_body(ev),
            Self::Teamcrop => return teamcrop(format, ev, event_name),
            Self::Timelines => return Err(RenderError::NotForCrm(self.name().to_string())),
        };
        Ok(Rendered { event_name, content_type: JSON.to_string(), body: json_bytes(&body), headers: Vec::new() })
    }
}

/// AntCRM/BeeIQ: `{eventCode, createdBy, <data keys...>, eventContent, content, link}`.
/// Optional fields are left out when the event has none. Where the event has an envelope
/// field, a key of `data` with the same name is dropped so the envelope field stays unique.
fn antcrm_body(ev: &CrmEvent, event_code: &str) -> Value {
    let event_content = ev.changes.as_ref().map(event_content);
    let tail =
        [("eventContent", event_content), ("content", ev.content.clone().map(Value::String)), ("link", ev.link.clone().map(Value::String))];
    let mut body = Map::new();
    body.insert("eventCode".into(), Value::String(event_code.to_string()));
    if let Some(actor) = &ev.actor {
        body.insert("createdBy".into(), actor.clone());
    }
    let taken = |key: &str| body_key_taken(key, ev.actor.is_some()) || tail.iter().any(|(name, v)| *name == key && v.is_some());
    for (key, value) in &ev.data {
        if !taken(key) {
            body.insert(key.clone(), value.clone());
        }
    }
    for (name, value) in tail {
        if let Some(value) = value {
            body.insert(name.to_string(), value);
        }
    }
    Value::Object(body)
}

fn body_key_taken(key: &str, has_actor: bool) -> bool {
    key == "eventCode" || (key == "createdBy" && has_actor)
}

/// BeeIQ's `eventContent`: `{"oldValue", "newValue"}` from the event's `changes.old/new`.
/// Changes in any other shape (a string, say) are sent as they are.
fn event_content(changes: &Value) -> Value {
    let Some(obj) = changes.as_object().filter(|o| o.contains_key("old") || o.contains_key("new")) else {
        return changes.clone();
    };
    let field = |k: &str| obj.get(k).cloned().unwrap_or(Value::Null);
    let mut out = Map::new();
    out.insert("oldValue".into(), field("old"));
    out.insert("newValue".into(), field("new"));
    Value::Object(out)
}

/// DooPage event types whose samples in the seed carry no `timestamp`.
pub(super) const DOOPAGE_UNTIMED: [&str; 4] = ["tag_set", "tag_unset", "note_changed", "customer_pipeline_updated"];

/// DooPage: `{company_id, event_type, timestamp (epoch ms), data}`; `timestamp` as `stamp`
/// says.
fn doopage_body(ev: &CrmEvent, event_type: &str, stamp: BodyTimestamp) -> Value {
    let mut body = Map::new();
    body.insert("company_id".into(), company_id(&ev.tenant));
    body.insert("event_type".into(), Value::String(event_type.to_string()));
    let timed = match stamp {
        BodyTimestamp::Always => true,
        BodyTimestamp::AsSamples => !DOOPAGE_UNTIMED.contains(&event_type),
        BodyTimestamp::Never => false,
    };
    if timed {
        body.insert("timestamp".into(), Value::from(ev.occurred_at.timestamp_millis()));
    }
    body.insert("data".into(), Value::Object(ev.data.clone()));
    Value::Object(body)
}

/// The tenant as a JSON number when it is a plain decimal that fits i64 (no sign, no
/// leading zero, so the number reads back as the same tenant), else as a string.
fn company_id(tenant: &str) -> Value {
    let plain = !tenant.is_empty() && tenant.bytes().all(|b| b.is_ascii_digit()) && (tenant == "0" || !tenant.starts_with('0'));
    match tenant.parse::<i64>() {
        Ok(n) if plain => Value::from(n),
        _ => Value::String(tenant.to_string()),
    }
}

/// Standard Webhooks: `{type, timestamp (RFC 3339, UTC, millis), data}`.
fn standard_body(ev: &CrmEvent) -> Value {
    let mut body = Map::new();
    body.insert("type".into(), Value::String(ev.event_type.clone()));
    let ts = ev.occurred_at.to_rfc3339_opts(SecondsFormat::Millis, true);
    body.insert("timestamp".into(), Value::String(ts));
    body.insert("data".into(), Value::Object(ev.data.clone()));
    Value::Object(body)
}

/// Teamcrop: the event's own entity object as the whole body, JSON or XML, with the
/// `Tc-Webhook-Event` header. The XML root is the entity part of the wire name
/// (`order` for `order.add`, `customer` for `customer.add`).
fn teamcrop(format: Format, ev: &CrmEvent, event_name: String) -> Result<Rendered, RenderError> {
    let entity = own_entity_key(ev).and_then(|k| ev.data.get(k)).ok_or_else(|| RenderError::NoEntity {
        dialect: Builtin::Teamcrop.name().to_string(),
        event_type: ev.event_type.clone(),
        entity: ev.entity().to_string(),
        keys: ev.data.keys().cloned().collect(),
    })?;
    let (content_type, body) = match format {
        Format::Json => (JSON, json_bytes(entity)),
        Format::Xml => {
            let root = event_name.split('.').next().unwrap_or(&event_name);
            (XML, xml::document(root, entity))
        }
    };
    let headers = vec![("Tc-Webhook-Event".to_string(), event_name.clone())];
    Ok(Rendered { event_name, content_type: content_type.to_string(), body, headers })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(json: &str) -> CrmEvent {
        CrmEvent::decode(json.as_bytes(), 1 << 20).unwrap()
    }

    fn body(r: &Rendered) -> String {
        String::from_utf8(r.body.clone()).unwrap()
    }

    #[test]
    fn antcrm_leaves_out_absent_fields() {
        let ev = event(r#"{"id":"e","tenant":"1","type":"task.created","occurred_at":0,"data":{"task":{"taskId":1}}}"#);
        let r = Builtin::AntCrm.render(Format::Json, &ev, "TASK_CREATE".into(), BodyTimestamp::Always).unwrap();
        assert_eq!(body(&r), r#"{"eventCode":"TASK_CREATE","task":{"taskId":1}}"#);
        assert_eq!(r.content_type, "application/json");
        assert!(r.headers.is_empty());
    }

    #[test]
    fn antcrm_envelope_fields_win_over_same_named_data_keys() {
        let ev = event(
            r#"{"id":"e","tenant":"1","type":"note.created","occurred_at":0,"content":"c","actor":{"id":"a"},
               "data":{"eventCode":"X","createdBy":"Y","note":{"n":1},"link":"kept","content":"dropped"}}"#,
        );
        let r = Builtin::BeeIq.render(Format::Json, &ev, "NOTE_CREATE".into(), BodyTimestamp::Always).unwrap();
        assert_eq!(body(&r), r#"{"eventCode":"NOTE_CREATE","createdBy":{"id":"a"},"note":{"n":1},"link":"kept","content":"c"}"#);
    }

    #[test]
    fn event_content_maps_old_new_or_passes_other_shapes() {
        let v: Value = serde_json::from_str(r#"{"new":{"a":1}}"#).unwrap();
        assert_eq!(event_content(&v).to_string(), r#"{"oldValue":null,"newValue":{"a":1}}"#);
        assert_eq!(event_content(&Value::from("moved")), Value::from("moved"));
    }

    #[test]
    fn company_id_is_a_number_only_when_it_reads_back_the_same() {
        assert_eq!(company_id("1260"), Value::from(1260));
        assert_eq!(company_id("0"), Value::from(0));
        for s in ["0123", "-5", "+5", "ws-10010", "", "99999999999999999999", "1 2"] {
            assert_eq!(company_id(s), Value::from(s), "{s:?}");
        }
    }

    #[test]
    fn standard_uses_producer_name_and_rfc3339_millis() {
        let ev =
            event(r#"{"id":"e","tenant":"ws-1","type":"contact.created","occurred_at":1618118040123,"data":{"contact":{"b":1,"a":2}}}"#);
        let r = Builtin::Standard.render(Format::Json, &ev, "contact.created".into(), BodyTimestamp::Always).unwrap();
        assert_eq!(body(&r), r#"{"type":"contact.created","timestamp":"2021-04-11T05:14:00.123Z","data":{"contact":{"b":1,"a":2}}}"#);
    }

    #[test]
    fn doopage_keeps_string_tenant() {
        let ev = event(r#"{"id":"e","tenant":"ws-1","type":"tag.set","occurred_at":5,"data":{}}"#);
        let r = Builtin::DooPage.render(Format::Json, &ev, "tag_set".into(), BodyTimestamp::Always).unwrap();
        assert_eq!(body(&r), r#"{"company_id":"ws-1","event_type":"tag_set","timestamp":5,"data":{}}"#);
    }

    #[test]
    fn teamcrop_takes_own_entity_or_only_key_else_errors() {
        let ev = event(r#"{"id":"e","tenant":"1","type":"contact.created","occurred_at":0,"data":{"customer":{"id":7}}}"#);
        let r = Builtin::Teamcrop.render(Format::Json, &ev, "customer.add".into(), BodyTimestamp::Always).unwrap();
        assert_eq!(body(&r), r#"{"id":7}"#);
        let r = Builtin::Teamcrop.render(Format::Xml, &ev, "customer.add".into(), BodyTimestamp::Always).unwrap();
        assert_eq!(body(&r), r#"<?xml version="1.0" encoding="UTF-8"?><customer><id>7</id></customer>"#);
        assert_eq!(r.content_type, "application/xml; charset=utf-8");
        assert_eq!(r.headers, vec![("Tc-Webhook-Event".to_string(), "customer.add".to_string())]);

        let ev = event(r#"{"id":"e","tenant":"1","type":"order.created","occurred_at":0,"data":{"a":{},"b":{}}}"#);
        let err = Builtin::Teamcrop.render(Format::Json, &ev, "order.add".into(), BodyTimestamp::Always).unwrap_err();
        assert_eq!(err.to_string(), "dialect `teamcrop` needs the `order` object in `data` of a `order.created` event, found keys [a, b]");
    }
}
