//! The `aggregation` summary of a bundle: a minijinja template (built-in or configured),
//! HTML-escaped as the parent module says, with times on the subscription's clock.

use chrono::DateTime;
use chrono_tz::Tz;
use minijinja::{context, AutoEscape, Environment, ErrorKind, HtmlEscape, Output, State, UndefinedBehavior};
use serde_json::Value;

use super::{message_object, BundleHeader, TIMESTAMP_FORMAT};
use crate::ingest::chat::ChatMessage;
use crate::render::RenderError;

/// The summary's per-message time, `2021-02-24 16:25` on the subscription's clock, given to
/// templates as `time`.
const SUMMARY_TIME_FORMAT: &str = "%Y-%m-%d %H:%M";

/// The message a template is tried on at start-up.
const PROBE_MESSAGE: &str = r#"{"id":"sample","tenant":"sample","direction":"sent","timestamp":0,"account":{},"chat":{"id":"sample"},
"sender":{"full_name":"Sample","phone":""},"recipient":{"full_name":"Sample","phone":""},"text":"sample","permalink":"https://example.com/"}"#;

/// The built-in summary: `from <name> on <time>: <text>` per message, joined by `<br/>`, then
/// the link. The seed's sample closes the link with `</h>`, a typo: this emits `</a>`.
pub const DEFAULT_SUMMARY_TEMPLATE: &str = concat!(
    "{% for m in messages %}{% if not loop.first %}<br/>{% endif %}",
    "from {{ m.sender_name }} on {{ m.time }}: {{ m.text }}{% endfor %}",
    "{% if link %}<br/>Click <a href='{{ link }}'>here</a> to open the conversation in TimelinesAI{% endif %}",
);

/// Name of the summary template in its environment (appears in error messages).
const TEMPLATE: &str = "summary";

/// The compiled summary template; built once, shared between threads.
///
/// Context: `messages` (the message objects, each with `time` = `YYYY-MM-DD HH:MM` on the
/// subscription's clock and `sender_name` = `sender.full_name`, else `sender.phone`, else
/// empty, added), `chat`, `account`, `permalink` (none if absent), `link` (see
/// [`BundleHeader::link`]) and `timezone` (the IANA name of that clock, `UTC` by default).
/// Undefined names are errors (`is defined` tests for optional keys), as in custom dialects.
#[derive(Debug)]
pub struct Summary {
    /// Holds the one template [`TEMPLATE`], with HTML auto-escaping and [`html_formatter`].
    env: Environment<'static>,
}

impl Summary {
    /// Compiles `template`, or the built-in one for `None`. Syntax errors and unknown
    /// filters, tests or functions are reported here, not at the first bundle.
    pub fn new(template: Option<&str>) -> Result<Self, RenderError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::Html);
        env.set_formatter(html_formatter);
        let source = template.unwrap_or(DEFAULT_SUMMARY_TEMPLATE).to_string();
        env.add_template_owned(TEMPLATE, source).map_err(|e| template_error(&e))?;
        let summary = Self { env };
        summary.probe()?;
        Ok(summary)
    }

    /// The `aggregation` text of `messages` (message objects, in time order), with times on
    /// the wall clock of `zone`.
    pub fn render(&self, messages: &[Value], header: &BundleHeader, zone: Tz) -> Result<String, RenderError> {
        let ctx = template_context(messages, header, zone)?;
        self.env.get_template(TEMPLATE).and_then(|t| t.render(ctx)).map_err(|e| template_error(&e))
    }

    /// Renders a sample bundle so that a name no data can fix (unknown filter, test or
    /// function) fails at start-up; errors that depend on the data wait for real bundles.
    fn probe(&self) -> Result<(), RenderError> {
        let sample = ChatMessage::decode(PROBE_MESSAGE.as_bytes(), PROBE_MESSAGE.len()).expect("the probe message is valid");
        let ctx = template_context(&[message_object(&sample)], &BundleHeader::from_message(&sample), Tz::UTC)?;
        match self.env.get_template(TEMPLATE).and_then(|t| t.render(ctx)) {
            Err(e) if matches!(e.kind(), ErrorKind::UnknownFilter | ErrorKind::UnknownTest | ErrorKind::UnknownFunction) => {
                Err(template_error(&e))
            }
            _ => Ok(()),
        }
    }
}

/// One line with minijinja's message and its causes.
fn template_error(e: &minijinja::Error) -> RenderError {
    let mut msg = format!("timelines summary template: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        msg.push_str(": ");
        msg.push_str(&cause.to_string());
        source = cause.source();
    }
    RenderError::Template(msg)
}

/// The template context of a bundle (see [`Summary`]).
fn template_context(messages: &[Value], header: &BundleHeader, zone: Tz) -> Result<minijinja::Value, RenderError> {
    let messages = messages.iter().enumerate().map(|m| message_context(m, zone)).collect::<Result<Vec<_>, _>>()?;
    Ok(context! {
        messages => messages,
        chat => minijinja::Value::from_serialize(&header.chat),
        account => minijinja::Value::from_serialize(&header.account),
        permalink => header.permalink,
        link => header.link(),
        timezone => zone.name(),
    })
}

/// A message object with `time` (on the clock of `zone`) and `sender_name` added, as the
/// template sees it.
fn message_context((index, message): (usize, &Value), zone: Tz) -> Result<minijinja::Value, RenderError> {
    let bad = || RenderError::Template(format!("timelines summary: message {index} is not a message object"));
    let mut m = message.as_object().cloned().ok_or_else(bad)?;
    let time =
        m.get("timestamp").and_then(Value::as_str).and_then(|t| DateTime::parse_from_str(t, TIMESTAMP_FORMAT).ok()).ok_or_else(bad)?;
    let sender = m.get("sender");
    let name =
        ["full_name", "phone"].into_iter().find_map(|k| sender.and_then(|s| s.get(k)).and_then(Value::as_str).filter(|s| !s.is_empty()));
    let name = name.unwrap_or_default().to_string();
    m.insert("time".into(), Value::String(time.with_timezone(&zone).format(SUMMARY_TIME_FORMAT).to_string()));
    m.insert("sender_name".into(), Value::String(name));
    Ok(minijinja::Value::from_serialize(&m))
}

/// minijinja's formatter, except that HTML-escaped strings keep their `/` (see the module
/// docs): every `&` of the input becomes `&amp;`, so `&#x2f;` in the escaper's output can
/// only stand for a `/`. Safe strings, non-strings and other modes go to the default.
fn html_formatter(out: &mut Output, state: &State, value: &minijinja::Value) -> Result<(), minijinja::Error> {
    match value.as_str() {
        Some(s) if state.auto_escape() == AutoEscape::Html && !value.is_safe() => {
            let escaped = HtmlEscape(s).to_string();
            out.write_str(&escaped.replace("&#x2f;", "/")).map_err(minijinja::Error::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}
