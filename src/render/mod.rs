//! Rendering: one CRM event in, one vendor-shaped request body out (DESIGN section 4).
//!
//! A subscription names a *dialect*, which fixes the body shape, the wire name of the event,
//! the dialect's own headers and what counts as a successful response. [`Dialects`] holds
//! the built-in dialects (`antcrm`, `beeiq`, `teamcrop`, `doopage`, `standard`, plus
//! `timelines`, whose bodies are chat bundles built elsewhere) and the custom ones from the
//! config file's `[dialect.<name>]` tables, with their templates compiled once at start-up.
//!
//! - `builtin.rs`: the built-in body shapes; the seeds' sample payloads are their golden tests.
//! - `custom.rs`: [`DialectConfig`] and its minijinja templates; `context.rs`: their context.
//! - `xml.rs`: JSON value to XML document (teamcrop), and a well-formedness check.
//! - `names.rs` + `event_names.toml`: producer type to wire name, per built-in dialect.
//!
//! Guarantees: rendering is pure and deterministic (same event and dialect, same bytes), so
//! the body is rendered once and retries resend it; no [`RenderError`] is worth retrying.
//! JSON bodies keep the key order of the event's `data` (serde_json `preserve_order`).
//! This stage owns no offsets: the caller records a failure as a dead letter with the reason.

mod builtin;
mod context;
mod custom;
mod names;
pub mod timelines;
mod xml;

#[cfg(test)]
mod golden;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ingest::event::CrmEvent;
use crate::route::subscription::{Format, Subscription};

use builtin::Builtin;
use custom::CustomDialect;
pub use custom::DialectConfig;
use names::EventNames;

/// One rendered request, ready to be put in a delivery record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// Wire name of the event (`CONTACT_CREATE`, `order.add`, ...), for logs and delivery records.
    pub event_name: String,
    /// `Content-Type` of the request.
    pub content_type: String,
    /// Exact body bytes; retries send these again unchanged.
    pub body: Vec<u8>,
    /// The dialect's own headers (`Tc-Webhook-Event`, custom ones); the subscription's headers
    /// and the Standard Webhooks signature headers are added by the sender.
    pub headers: Vec<(String, String)>,
}

/// Which HTTP statuses count as a delivered webhook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SuccessRule {
    /// Any 2xx status (written `"2xx"` in config).
    #[default]
    #[serde(rename = "2xx")]
    Any2xx,
    /// Only 200, as Teamcrop requires (written `"200"` in config).
    #[serde(rename = "200")]
    Exactly200,
}

impl std::fmt::Display for SuccessRule {
    /// As written in config: `"2xx"`, `"200"`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Any2xx => "\"2xx\"",
            Self::Exactly200 => "\"200\"",
        })
    }
}

impl SuccessRule {
    pub fn is_success(self, status: u16) -> bool {
        match self {
            Self::Any2xx => (200..300).contains(&status),
            Self::Exactly200 => status == 200,
        }
    }
}

/// Whether a DooPage body carries `timestamp`: a subscription's `body_timestamp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyTimestamp {
    /// In every body (the default): receivers can always order events.
    #[default]
    Always,
    /// As the seed's samples: left out of `tag_set`, `tag_unset`, `note_changed` and
    /// `customer_pipeline_updated`, in every other body.
    AsSamples,
    /// In no body.
    Never,
}

/// Why a dialect could not be set up or could not render an event.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// A subscription names a dialect that is neither built in nor configured.
    #[error("unknown dialect `{0}`: not built in and no [dialect.{0}] in the config")]
    UnknownDialect(String),
    /// XML asked of a JSON-only dialect, or a format other than a custom dialect's own.
    #[error("dialect `{dialect}` cannot render {} bodies", format_name(*.format))]
    FormatNotSupported { dialect: String, format: Format },
    /// A `[dialect.<name>]` table would shadow a built-in dialect.
    #[error("custom dialect `{0}` has the name of a built-in dialect; pick another name")]
    NameTaken(String),
    /// A custom dialect's settings are unusable (header name, content type, ...).
    #[error("custom dialect `{dialect}`: {reason}")]
    InvalidDialect { dialect: String, reason: String },
    /// A template failed to compile or render; the text names dialect, template and cause.
    #[error("template error: {0}")]
    Template(String),
    /// A `format = "json"` body template rendered text that is not JSON.
    #[error("template did not render valid JSON: {0}")]
    TemplateNotJson(String),
    /// A `format = "xml"` body template rendered text that is not one XML document.
    #[error("template did not render well-formed XML: {0}")]
    TemplateNotXml(String),
    /// The entity-object dialect (teamcrop) cannot tell which object of `data` to send.
    #[error("dialect `{dialect}` needs the `{entity}` object in `data` of a `{event_type}` event, found keys [{}]", .keys.join(", "))]
    NoEntity { dialect: String, event_type: String, entity: String, keys: Vec<String> },
    /// `timelines` asked to render a CRM event.
    #[error("dialect `{0}` renders chat messages, not CRM events")]
    NotForCrm(String),
    /// `event_names.toml` does not parse (a build defect; its tests catch it).
    #[error("built-in event name table is invalid: {0}")]
    EventNames(String),
}

impl RenderError {
    /// Always false: rendering is deterministic, the same input fails the same way again.
    pub fn is_retriable(&self) -> bool {
        false
    }
}

/// Lower-case name of a format, as written in config.
pub fn format_name(format: Format) -> &'static str {
    match format {
        Format::Json => "json",
        Format::Xml => "xml",
    }
}

/// Every dialect hookd can render with: the built-in ones and the config's custom ones.
/// Built once at start-up (templates compiled, name tables parsed), then shared behind `Arc`.
#[derive(Debug)]
pub struct Dialects {
    /// Built-in dialects' event-name tables, from `event_names.toml`.
    names: EventNames,
    /// Custom dialects by name, with compiled templates.
    custom: BTreeMap<String, CustomDialect>,
}

impl Dialects {
    /// Parses the built-in name tables and compiles every custom dialect's templates.
    /// A custom name equal to a built-in one (ignoring ASCII case) is refused.
    pub fn new(custom: &BTreeMap<String, DialectConfig>) -> Result<Self, RenderError> {
        let names = EventNames::builtin()?;
        let mut compiled = BTreeMap::new();
        for (name, config) in custom {
            if Builtin::ALL.iter().any(|b| b.name().eq_ignore_ascii_case(name)) {
                return Err(RenderError::NameTaken(name.clone()));
            }
            compiled.insert(name.clone(), CustomDialect::compile(name, config)?);
        }
        Ok(Self { names, custom: compiled })
    }

    /// Whether `dialect` is built in or defined in the config.
    pub fn knows(&self, dialect: &str) -> bool {
        Builtin::from_name(dialect).is_some() || self.custom.contains_key(dialect)
    }

    /// Config validation: the dialect exists and can render `format`.
    pub fn check(&self, dialect: &str, format: Format) -> Result<(), RenderError> {
        let supported = match (Builtin::from_name(dialect), self.custom.get(dialect)) {
            (Some(builtin), _) => builtin.supports(format),
            (None, Some(custom)) => custom.format() == format,
            (None, None) => return Err(RenderError::UnknownDialect(dialect.to_string())),
        };
        if supported {
            Ok(())
        } else {
            Err(RenderError::FormatNotSupported { dialect: dialect.to_string(), format })
        }
    }

    /// Renders one CRM event in `dialect` and `format`, with the dialect's defaults.
    pub fn render_crm(&self, dialect: &str, format: Format, ev: &CrmEvent) -> Result<Rendered, RenderError> {
        self.render(dialect, format, BodyTimestamp::Always, ev)
    }

    /// Renders one CRM event for `sub`: its dialect and format, and its `body_timestamp`.
    pub fn render_for(&self, sub: &Subscription, ev: &CrmEvent) -> Result<Rendered, RenderError> {
        self.render(&sub.dialect, sub.format, sub.body_timestamp.unwrap_or_default(), ev)
    }

    fn render(&self, dialect: &str, format: Format, stamp: BodyTimestamp, ev: &CrmEvent) -> Result<Rendered, RenderError> {
        self.check(dialect, format)?;
        let event_name = self.event_name(dialect, &ev.event_type);
        match (Builtin::from_name(dialect), self.custom.get(dialect)) {
            (Some(builtin), _) => builtin.render(format, ev, event_name, stamp),
            (None, Some(custom)) => custom.render(ev, event_name),
            (None, None) => Err(RenderError::UnknownDialect(dialect.to_string())),
        }
    }

    /// What counts as success for `dialect`; unknown dialects get the default, any 2xx.
    pub fn success_rule(&self, dialect: &str) -> SuccessRule {
        match (Builtin::from_name(dialect), self.custom.get(dialect)) {
            (Some(builtin), _) => builtin.success_rule(),
            (None, Some(custom)) => custom.success_rule(),
            (None, None) => SuccessRule::default(),
        }
    }

    /// What counts as success for `sub`: its own `success` when set, else its dialect's rule
    /// (so a chat subscription can ask for TimelinesAI's "any non-200 is an error").
    pub fn success_rule_of(&self, sub: &Subscription) -> SuccessRule {
        sub.success.unwrap_or_else(|| self.success_rule(&sub.dialect))
    }

    /// Wire name of `producer_type` in `dialect`; names without a mapping pass through unchanged.
    pub fn event_name(&self, dialect: &str, producer_type: &str) -> String {
        let mapped = match (Builtin::from_name(dialect), self.custom.get(dialect)) {
            (Some(builtin), _) => builtin.table().and_then(|t| self.names.get(t, producer_type)),
            (None, Some(custom)) => custom.event_name(producer_type),
            (None, None) => None,
        };
        mapped.unwrap_or(producer_type).to_string()
    }
}

/// Key in `data` of the event's own entity: the type's prefix (`order` for `order.created`)
/// when present, else the only key when there is exactly one.
pub(crate) fn own_entity_key(ev: &CrmEvent) -> Option<&str> {
    let prefix = ev.entity();
    if let Some((key, _)) = ev.data.get_key_value(prefix) {
        return Some(key.as_str());
    }
    match ev.data.len() {
        1 => ev.data.keys().next().map(String::as_str),
        _ => None,
    }
}

/// Compact JSON bytes of a value (keys in insertion order).
fn json_bytes(value: &Value) -> Vec<u8> {
    // A serde_json::Value has string keys only, so serializing it cannot fail.
    serde_json::to_vec(value).expect("serde_json::Value always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn event(json: &str) -> CrmEvent {
        CrmEvent::decode(json.as_bytes(), 1 << 20).unwrap()
    }

    #[test]
    fn dialects_are_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Dialects>();
        let d = Arc::new(Dialects::new(&BTreeMap::new()).unwrap());
        let ev = event(r#"{"id":"e","tenant":"1","type":"x.y","occurred_at":0,"data":{}}"#);
        let handle = std::thread::spawn(move || d.render_crm("standard", Format::Json, &ev).unwrap());
        assert_eq!(handle.join().unwrap().event_name, "x.y");
    }

    #[test]
    fn success_rules() {
        assert!(SuccessRule::Any2xx.is_success(200) && SuccessRule::Any2xx.is_success(204));
        assert!(!SuccessRule::Any2xx.is_success(199) && !SuccessRule::Any2xx.is_success(300));
        assert!(SuccessRule::Exactly200.is_success(200) && !SuccessRule::Exactly200.is_success(201));
        let d = Dialects::new(&BTreeMap::new()).unwrap();
        assert_eq!(d.success_rule("teamcrop"), SuccessRule::Exactly200);
        for name in ["antcrm", "beeiq", "doopage", "standard", "timelines", "nope"] {
            assert_eq!(d.success_rule(name), SuccessRule::Any2xx, "{name}");
        }
        let sub = |json: &str| serde_json::from_str::<Subscription>(json).unwrap();
        let chat = sub(r#"{"id":"c","tenant":"t","url":"http://x/","source":"chat","dialect":"timelines"}"#);
        assert_eq!(d.success_rule_of(&chat), SuccessRule::Any2xx, "the dialect's rule by default");
        let strict = Subscription { success: Some(SuccessRule::Exactly200), ..chat.clone() };
        assert_eq!(d.success_rule_of(&strict), SuccessRule::Exactly200, "TimelinesAI: any non-200 is an error");
        let teamcrop = sub(r#"{"id":"tc","tenant":"t","url":"http://x/","dialect":"teamcrop","success":"2xx"}"#);
        assert_eq!(d.success_rule_of(&teamcrop), SuccessRule::Any2xx, "the subscription's own rule wins");
        assert_eq!((SuccessRule::Exactly200.to_string(), SuccessRule::Any2xx.to_string()), ("\"200\"".into(), "\"2xx\"".into()));
    }

    #[test]
    fn check_knows_builtins_and_refuses_xml_where_unsupported() {
        let d = Dialects::new(&BTreeMap::new()).unwrap();
        for name in ["antcrm", "beeiq", "teamcrop", "doopage", "standard", "timelines"] {
            assert!(d.knows(name), "{name}");
            assert!(d.check(name, Format::Json).is_ok(), "{name}");
        }
        assert!(d.check("teamcrop", Format::Xml).is_ok());
        let err = d.check("doopage", Format::Xml).unwrap_err();
        assert!(matches!(err, RenderError::FormatNotSupported { .. }));
        assert_eq!(err.to_string(), "dialect `doopage` cannot render xml bodies");
        assert!(!d.knows("AntCRM"));
        assert!(matches!(d.check("acme", Format::Json), Err(RenderError::UnknownDialect(n)) if n == "acme"));
        assert!(!RenderError::UnknownDialect("x".into()).is_retriable());
    }

    #[test]
    fn render_refuses_unknown_dialect_and_chat_dialect() {
        let d = Dialects::new(&BTreeMap::new()).unwrap();
        let ev = event(r#"{"id":"e","tenant":"1","type":"contact.created","occurred_at":0,"data":{}}"#);
        assert!(matches!(d.render_crm("acme", Format::Json, &ev), Err(RenderError::UnknownDialect(_))));
        assert!(matches!(d.render_crm("timelines", Format::Json, &ev), Err(RenderError::NotForCrm(_))));
        assert!(matches!(d.render_crm("antcrm", Format::Xml, &ev), Err(RenderError::FormatNotSupported { .. })));
    }

    #[test]
    fn event_names_map_per_dialect_and_pass_unknown_through() {
        let d = Dialects::new(&BTreeMap::new()).unwrap();
        assert_eq!(d.event_name("antcrm", "contact.created"), "CONTACT_CREATE");
        assert_eq!(d.event_name("beeiq", "contact.created"), "CONTACT_CREATE");
        assert_eq!(d.event_name("teamcrop", "contact.created"), "customer.add");
        assert_eq!(d.event_name("doopage", "contact.created"), "customer_created");
        assert_eq!(d.event_name("standard", "contact.created"), "contact.created");
        assert_eq!(d.event_name("antcrm", "invoice.paid"), "invoice.paid");
        assert_eq!(d.event_name("no-such-dialect", "contact.created"), "contact.created");
    }

    #[test]
    fn own_entity_is_prefix_or_only_key() {
        let one = |data: &str| event(&format!(r#"{{"id":"e","tenant":"1","type":"order.created","occurred_at":0,"data":{data}}}"#));
        assert_eq!(own_entity_key(&one(r#"{"customer":{},"order":{}}"#)), Some("order"));
        assert_eq!(own_entity_key(&one(r#"{"deal":{}}"#)), Some("deal"));
        assert_eq!(own_entity_key(&one(r#"{"a":{},"b":{}}"#)), None);
        assert_eq!(own_entity_key(&one("{}")), None);
    }
}
