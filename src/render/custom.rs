//! Custom dialects: a `[dialect.<name>]` table of the config file describes a receiver's
//! wire format (event names, body template, headers, success rule) without a rebuild.
//!
//! Templates are minijinja, compiled once in [`Dialects::new`](super::Dialects::new). Undefined
//! values are errors (`UndefinedBehavior::Strict`, and a `tojson` that refuses them) so a typo
//! fails loudly instead of sending an empty string or `null`: test keys an event may lack with
//! `is defined` or `default(...)`; optional event fields are none when absent (`is none`).
//! A sample event is rendered at start-up to catch unknown filters, tests and functions.
//!
//! JSON bodies are not auto-escaped (write values with `tojson`); the text must parse as JSON
//! and is re-emitted compactly. XML bodies are auto-escaped with minijinja's HTML escaping,
//! whose entities are valid XML too (`|safe` opts out), and must be a well-formed document.
//! Header templates are never escaped; a value with a line break is an error.
//! The template context is described in `context.rs`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value as TValue};
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::context::template_context;
use super::{json_bytes, xml, RenderError, Rendered, SuccessRule};
use crate::ingest::event::CrmEvent;
use crate::route::subscription::Format;

/// A receiver's wire format, from a `[dialect.<name>]` table of the config file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DialectConfig {
    /// Producer type -> wire name (`"contact.created" = "contact_new"`). The key `"*"` names
    /// every type not listed. Types without a mapping pass through unchanged.
    /// Default: empty, every producer name is sent as is.
    #[serde(default)]
    pub events: BTreeMap<String, String>,
    /// minijinja template of the body; context: `event`, `event_name`, `entity` (see
    /// `render/context.rs`). Required.
    pub body: String,
    /// `"json"` (default): the body must render valid JSON, sent compacted. `"xml"`: the body
    /// must render a well-formed XML document. Subscriptions using this dialect must ask for
    /// the same format.
    #[serde(default)]
    pub format: Format,
    /// `Content-Type` of the request. Default: `application/json` for json,
    /// `application/xml; charset=utf-8` for xml.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Extra request headers: name -> template rendered with the body's context
    /// (`"X-Event" = "{{ event_name }}"`). Default: none.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `"2xx"` (default): any 2xx status is success. `"200"`: only 200 is.
    #[serde(default)]
    pub success: SuccessRule,
}

/// Headers hookd sets itself; a dialect may not template them.
const RESERVED_HEADERS: [&str; 6] = ["content-type", "content-length", "host", "webhook-id", "webhook-timestamp", "webhook-signature"];

/// Name of the body template in a dialect's environment.
const BODY: &str = "body";

/// A custom dialect with its templates compiled.
#[derive(Debug)]
pub(super) struct CustomDialect {
    /// Dialect name, for error messages.
    name: String,
    /// The settings as configured; `events`, `format`, `success` are read per render.
    config: DialectConfig,
    /// Holds the body template and one template per header.
    env: Environment<'static>,
}

impl CustomDialect {
    /// Validates `config` and compiles its templates.
    pub(super) fn compile(name: &str, config: &DialectConfig) -> Result<Self, RenderError> {
        let invalid = |reason: String| RenderError::InvalidDialect { dialect: name.to_string(), reason };
        if name.is_empty() {
            return Err(invalid("the dialect name is empty".into()));
        }
        if let Some(ct) = config.content_type.as_deref().filter(|ct| ct.is_empty() || !is_header_value(ct)) {
            return Err(invalid(format!("`content_type` {ct:?} is not a valid header value")));
        }
        if let Some(h) = config.headers.keys().find(|h| !is_token(h)) {
            return Err(invalid(format!("header name {h:?} is not a valid HTTP header name")));
        }
        if let Some(h) = config.headers.keys().find(|h| RESERVED_HEADERS.iter().any(|r| r.eq_ignore_ascii_case(h))) {
            return Err(invalid(format!("header {h:?} is set by hookd itself (use `content_type` for Content-Type)")));
        }
        if let Some((from, _)) = config.events.iter().find(|(_, to)| to.is_empty()) {
            return Err(invalid(format!("`events` maps {from:?} to an empty name")));
        }
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.add_filter("tojson", strict_tojson);
        let xml_body = config.format == Format::Xml;
        env.set_auto_escape_callback(move |t| if xml_body && t == BODY { AutoEscape::Html } else { AutoEscape::None });
        let compile_error = |what: &str, e: minijinja::Error| RenderError::Template(describe(name, what, &e));
        env.add_template_owned(BODY, config.body.clone()).map_err(|e| compile_error("body", e))?;
        for (header, source) in &config.headers {
            env.add_template_owned(header_template(header), source.clone()).map_err(|e| compile_error(&format!("header `{header}`"), e))?;
        }
        let dialect = Self { name: name.to_string(), config: config.clone(), env };
        dialect.probe()?;
        Ok(dialect)
    }

    pub(super) fn format(&self) -> Format {
        self.config.format
    }

    pub(super) fn success_rule(&self) -> SuccessRule {
        self.config.success
    }

    /// The configured wire name of `producer_type`, or the `"*"` one, if any.
    pub(super) fn event_name(&self, producer_type: &str) -> Option<&str> {
        let events = &self.config.events;
        events.get(producer_type).or_else(|| events.get("*")).map(String::as_str)
    }

    pub(super) fn render(&self, ev: &CrmEvent, event_name: String) -> Result<Rendered, RenderError> {
        let ctx = template_context(ev, &event_name);
        let text = self.render_template(BODY, "body", &ctx)?;
        let body = match self.config.format {
            Format::Json => {
                let value: Value =
                    serde_json::from_str(&text).map_err(|e| RenderError::TemplateNotJson(format!("dialect `{}`: {e}", self.name)))?;
                json_bytes(&value)
            }
            Format::Xml => {
                xml::check_well_formed(&text).map_err(|e| RenderError::TemplateNotXml(format!("dialect `{}`: {e}", self.name)))?;
                text.into_bytes()
            }
        };
        let mut headers = Vec::with_capacity(self.config.headers.len());
        for header in self.config.headers.keys() {
            let what = format!("header `{header}`");
            let value = self.render_template(&header_template(header), &what, &ctx)?;
            if !is_header_value(&value) {
                let why = "renders a line break or control character";
                return Err(RenderError::Template(format!("dialect `{}`, {what}: {why}", self.name)));
            }
            headers.push((header.clone(), value));
        }
        let content_type = self.config.content_type.clone().unwrap_or_else(|| default_content_type(self.config.format));
        Ok(Rendered { event_name, content_type, body, headers })
    }

    fn render_template(&self, template: &str, what: &str, ctx: &TValue) -> Result<String, RenderError> {
        self.env.get_template(template).and_then(|t| t.render(ctx)).map_err(|e| RenderError::Template(describe(&self.name, what, &e)))
    }

    /// Renders the templates once with a sample event so that names no data can fix
    /// (an unknown filter, test or function) fail at start-up. Best effort: a template
    /// stops at its first error, and errors that depend on the data are ignored here.
    fn probe(&self) -> Result<(), RenderError> {
        let sample = CrmEvent {
            id: "evt_sample".into(),
            tenant: "1".into(),
            event_type: "sample.created".into(),
            occurred_at: chrono::DateTime::UNIX_EPOCH,
            data: Map::from_iter([("sample".to_string(), Value::Object(Map::new()))]),
            actor: None,
            changes: None,
            content: None,
            link: None,
        };
        let ctx = template_context(&sample, "sample.created");
        let headers = self.config.headers.keys().map(|h| (header_template(h), format!("header `{h}`")));
        for (template, what) in std::iter::once((BODY.to_string(), "body".to_string())).chain(headers) {
            let Err(e) = self.env.get_template(&template).and_then(|t| t.render(&ctx)) else { continue };
            if matches!(
                e.kind(),
                ErrorKind::UnknownFilter | ErrorKind::UnknownTest | ErrorKind::UnknownFunction | ErrorKind::TemplateNotFound
            ) {
                return Err(RenderError::Template(describe(&self.name, &what, &e)));
            }
        }
        Ok(())
    }
}

/// minijinja's `tojson`, except that an undefined value is an error rather than `null`:
/// `{{ event.dta | tojson }}` must not quietly send `null` (strict mode lets filters take
/// undefined values). Optional fields are none, not undefined, and still give `null`.
fn strict_tojson(value: &TValue, indent: Option<TValue>, args: Kwargs) -> Result<TValue, minijinja::Error> {
    if value.is_undefined() {
        let why = "tojson of an undefined value (misspelt name, or a key this event lacks? see `is defined`, `default`)";
        return Err(minijinja::Error::new(ErrorKind::UndefinedError, why));
    }
    minijinja::filters::tojson(value, indent, args)
}

fn header_template(header: &str) -> String {
    format!("header:{header}")
}

fn default_content_type(format: Format) -> String {
    match format {
        Format::Json => "application/json".into(),
        Format::Xml => "application/xml; charset=utf-8".into(),
    }
}

/// One line naming the dialect, the template and minijinja's message with its causes.
fn describe(dialect: &str, what: &str, e: &minijinja::Error) -> String {
    let mut msg = format!("dialect `{dialect}`, {what}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let _ = write!(msg, ": {cause}"); // writing to a String cannot fail
        source = cause.source();
    }
    msg
}

/// RFC 9110 token, the syntax of a header name.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// No line breaks or other control characters (tab allowed).
fn is_header_value(s: &str) -> bool {
    !s.chars().any(|c| c.is_control() && c != '\t')
}

#[cfg(test)]
mod tests {
    use super::super::Dialects;
    use super::*;

    /// The `[dialect.*]` part of a hookd config file.
    #[derive(Debug, Deserialize)]
    struct Config {
        dialect: BTreeMap<String, DialectConfig>,
    }

    fn dialects(toml_text: &str) -> Result<Dialects, RenderError> {
        Dialects::new(&toml::from_str::<Config>(toml_text).unwrap().dialect)
    }

    fn event(json: &str) -> CrmEvent {
        CrmEvent::decode(json.as_bytes(), 1 << 20).unwrap()
    }

    const CONTACT: &str = r#"{"id": "evt_8f1c", "tenant": "1260", "type": "contact.created", "occurred_at": 1618118040123,
        "actor": {"id": "57f2", "firstname": "Tran"}, "data": {"contact": {"name": "Tran", "lastname": "Thuan", "contactId": "PID-66"}},
        "content": "Tran Le created contact Tran Thuan"}"#;

    const ACME: &str = r#"
[dialect.acme]
success = "200"
body = '''
{
  "kind": {{ event_name | tojson }},
  "id": {{ event.id | tojson }},
  "at": {{ event.occurred_at | tojson }},
  "at_ms": {{ event.occurred_at_ms }},
  "who": {{ entity.name | tojson }},
  "by": {% if event.actor is none %}null{% else %}{{ event.actor.firstname | tojson }}{% endif %},
  "link": {{ event.link | tojson }},
  "data": {{ event.data | tojson }}
}
'''
[dialect.acme.events]
"contact.created" = "acme.contact.new"
"*" = "acme.other"
[dialect.acme.headers]
X-Acme-Event = "{{ event_name }}"
X-Acme-Tenant = "t-{{ event.tenant }}"
"#;

    #[test]
    fn toml_defined_dialect_renders() {
        let d = dialects(ACME).unwrap();
        let r = d.render_crm("acme", Format::Json, &event(CONTACT)).unwrap();
        let want = r#"{"kind":"acme.contact.new","id":"evt_8f1c","at":"2021-04-11T05:14:00.123Z","at_ms":1618118040123,"who":"Tran","by":"Tran","link":null,"data":{"contact":{"name":"Tran","lastname":"Thuan","contactId":"PID-66"}}}"#;
        assert_eq!(String::from_utf8(r.body).unwrap(), want);
        assert_eq!(r.event_name, "acme.contact.new");
        assert_eq!(r.content_type, "application/json");
        let h = |n: &str, v: &str| (n.to_string(), v.to_string());
        assert_eq!(r.headers, vec![h("X-Acme-Event", "acme.contact.new"), h("X-Acme-Tenant", "t-1260")]);
        assert_eq!(d.success_rule("acme"), SuccessRule::Exactly200);
        assert_eq!(d.event_name("acme", "order.created"), "acme.other");
        assert!(d.knows("acme") && d.check("acme", Format::Json).is_ok());
        assert!(matches!(d.check("acme", Format::Xml), Err(RenderError::FormatNotSupported { .. })));
    }

    #[test]
    fn defaults_apply_and_names_pass_through() {
        let d = dialects("[dialect.plain]\nbody = '{{ event.data | tojson }}'\n").unwrap();
        let ev = event(r#"{"id":"e","tenant":"1","type":"x.done","occurred_at":0,"data":{"b":1,"a":[2,{"z":0,"y":1}]}}"#);
        let r = d.render_crm("plain", Format::Json, &ev).unwrap();
        assert_eq!(r.body, br#"{"b":1,"a":[2,{"z":0,"y":1}]}"#, "keys keep the event's order");
        assert_eq!((r.event_name.as_str(), r.content_type.as_str()), ("x.done", "application/json"));
        assert!(r.headers.is_empty());
        assert_eq!(d.success_rule("plain"), SuccessRule::Any2xx);
    }

    #[test]
    fn config_round_trips_and_rejects_unknown_fields() {
        let cfg: Config = toml::from_str(ACME).unwrap();
        let text = toml::to_string(&cfg.dialect["acme"]).unwrap();
        assert_eq!(toml::from_str::<DialectConfig>(&text).unwrap(), cfg.dialect["acme"]);
        let err = toml::from_str::<Config>("[dialect.x]\nbody = '{}'\ncolour = 1\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
        assert!(toml::from_str::<Config>("[dialect.x]\nbody = '{}'\nsuccess = '3xx'\n").is_err());
        assert!(toml::from_str::<Config>("[dialect.x]\nformat = 'json'\n").is_err(), "body is required");
    }

    #[test]
    fn invalid_json_output_is_a_clear_error() {
        let d = dialects("[dialect.x]\nbody = '{\"id\": {{ event.id }}}'\n").unwrap();
        let err = d.render_crm("x", Format::Json, &event(CONTACT)).unwrap_err();
        assert!(matches!(err, RenderError::TemplateNotJson(_)));
        assert_eq!(err.to_string(), "template did not render valid JSON: dialect `x`: expected value at line 1 column 8");
    }

    #[test]
    fn builtin_names_are_taken() {
        for name in ["teamcrop", "TeamCrop", "standard", "timelines"] {
            let err = dialects(&format!("[dialect.{name}]\nbody = '{{}}'\n")).unwrap_err();
            assert!(matches!(&err, RenderError::NameTaken(n) if n == name), "{err}");
        }
    }

    #[test]
    fn template_mistakes_surface() {
        let syntax = dialects("[dialect.x]\nbody = '{{ event.id '\n").unwrap_err();
        assert!(matches!(&syntax, RenderError::Template(m) if m.starts_with("dialect `x`, body: syntax error")), "{syntax}");
        let filter = dialects("[dialect.x]\nbody = '{{ event.data | tojosn }}'\n").unwrap_err();
        assert!(filter.to_string().contains("unknown filter"), "{filter}");
        let header = dialects("[dialect.x]\nbody = '{}'\nheaders = { X-A = '{{ event_name | upcase }}' }\n").unwrap_err();
        assert!(header.to_string().starts_with("template error: dialect `x`, header `X-A`: unknown filter"), "{header}");
        for typo in ["{{ event.nope | tojson }}", "{{ event.dta }}", "{% if event.data.other %}1{% endif %}"] {
            let d = dialects(&format!("[dialect.x]\nbody = '{typo}'\n")).expect("data-dependent errors wait for data");
            let undefined = d.render_crm("x", Format::Json, &event(CONTACT)).unwrap_err();
            assert!(undefined.to_string().contains("undefined value"), "{typo}: {undefined}");
        }
    }

    #[test]
    fn optional_and_missing_values_can_be_tested() {
        let body = r#"[{{ entity | tojson }}, {{ event.content | tojson }}, {{ (event.data.b is defined) | tojson }}, {{ (event.data.z is defined) | tojson }}, {{ event.data.z | default("d") | tojson }}]"#;
        let d = dialects(&format!("[dialect.x]\nbody = '{body}'\n")).unwrap();
        let ev = event(r#"{"id":"e","tenant":"1","type":"contact.created","occurred_at":0,"data":{"a":{},"b":{}}}"#);
        let r = d.render_crm("x", Format::Json, &ev).unwrap();
        assert_eq!(r.body, br#"[null,null,true,false,"d"]"#, "no own entity among two keys: entity is none");
    }

    #[test]
    fn bad_headers_are_refused() {
        let err = dialects("[dialect.x]\nbody = '{}'\nheaders = { 'Bad Name' = 'v' }\n").unwrap_err();
        assert!(matches!(err, RenderError::InvalidDialect { .. }), "{err}");
        let d = dialects("[dialect.x]\nbody = '{}'\nheaders = { 'X-Content' = '{{ event.content }}' }\n").unwrap();
        let ev = event(r#"{"id":"e","tenant":"1","type":"a.b","occurred_at":0,"data":{},"content":"a\r\nInjected: 1"}"#);
        let err = d.render_crm("x", Format::Json, &ev).unwrap_err();
        assert!(err.to_string().contains("line break"), "{err}");
        let err = dialects("[dialect.x]\nbody = '{}'\nheaders = { content-type = 'text/plain' }\n").unwrap_err();
        assert!(err.to_string().contains("set by hookd itself"), "{err}");
        let err = dialects("[dialect.x]\nbody = '{}'\ncontent_type = \"a\\nb\"\n").unwrap_err();
        assert!(err.to_string().contains("content_type"), "{err}");
    }

    #[test]
    fn xml_dialect_escapes_and_checks_its_output() {
        let cfg = r#"
[dialect.crmx]
format = "xml"
body = '<contact id="{{ event.id }}"><name>{{ entity.name }}</name>{{ "<raw/>" | safe }}</contact>'
"#;
        let d = dialects(cfg).unwrap();
        assert!(d.check("crmx", Format::Xml).is_ok());
        assert!(matches!(d.check("crmx", Format::Json), Err(RenderError::FormatNotSupported { .. })));
        let ev = event(r#"{"id":"e\"1","tenant":"1","type":"contact.created","occurred_at":0,"data":{"contact":{"name":"A & <B>"}}}"#);
        let r = d.render_crm("crmx", Format::Xml, &ev).unwrap();
        assert_eq!(String::from_utf8(r.body).unwrap(), r#"<contact id="e&quot;1"><name>A &amp; &lt;B&gt;</name><raw/></contact>"#);
        assert_eq!(r.content_type, "application/xml; charset=utf-8");

        let broken = dialects("[dialect.b]\nformat = 'xml'\nbody = '<a>{{ event.id }}</b>'\n").unwrap();
        let err = broken.render_crm("b", Format::Xml, &ev).unwrap_err();
        assert!(matches!(err, RenderError::TemplateNotXml(_)), "{err}");
    }
}
