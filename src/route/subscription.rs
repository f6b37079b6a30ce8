//! The subscription record (DESIGN section 3): one customer URL and what it wants.
//!
//! The same shape comes from `[[subscription]]` tables in the config file and from JSON
//! values on the compacted `hookd.subscriptions` topic. Omitted fields take the defaults
//! documented here and in `config/hookd.toml`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::deliver::backoff::{retry_delay, RetryAfterBounds};
use crate::render::{BodyTimestamp, SuccessRule};

/// Which input stream a subscription listens to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `crm.events`.
    #[default]
    Crm,
    /// `chat.messages`.
    Chat,
}

/// Body encoding; only the teamcrop dialect offers XML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Json,
    Xml,
}

/// Pass every record through at once, or bundle a chat's messages per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aggregation {
    #[default]
    None,
    /// Window length (`1h`, `6h`, `12h`, `24h`, or any duration such as `10s`).
    Every(Duration),
}

impl Aggregation {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("none") {
            return Ok(Self::None);
        }
        match humantime::parse_duration(s) {
            Ok(d) if d >= Duration::from_secs(1) => Ok(Self::Every(d)),
            Ok(_) => Err(format!("aggregation `{s}` is shorter than one second")),
            Err(e) => Err(format!("aggregation `{s}` is neither `none` nor a duration: {e}")),
        }
    }
}

impl<'de> Deserialize<'de> for Aggregation {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Aggregation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::None => s.serialize_str("none"),
            Self::Every(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        }
    }
}

/// The IANA time zone of a chat subscription's windows and summary (`Asia/Ho_Chi_Minh`),
/// checked against chrono-tz's copy of the IANA database when the subscription is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeZone(pub chrono_tz::Tz);

impl TimeZone {
    pub fn parse(name: &str) -> Result<Self, String> {
        name.parse::<chrono_tz::Tz>()
            .map(Self)
            .map_err(|_| format!("unknown time zone `{name}`: expected an IANA name such as `Asia/Ho_Chi_Minh`, `Europe/Berlin` or `UTC`"))
    }
}

impl<'de> Deserialize<'de> for TimeZone {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for TimeZone {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.name())
    }
}

/// DooPage-style endpoint verification (GET challenge) settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verification {
    /// Sent as `validation_key`; the endpoint checks it matches what the customer configured.
    pub validation_key: String,
}

/// When to send again after a failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Waits before the 2nd, 3rd ... send; doubles from the last entry when shorter than needed.
    /// Default `[60]`: 1, 2, 4, 8 ... minutes, Teamcrop's schedule.
    pub delays_secs: Vec<u64>,
    /// Total sends, the first included. Default 12.
    pub max_attempts: u32,
    /// How far each wait may randomly deviate from the schedule, in percent either way
    /// (0..=100). Default 20: a wait of 60 s is one of 48-72 s, so endpoints that failed
    /// together are not all retried at once. 0: the schedule exactly (Teamcrop's 1, 2, 4, 8 ...
    /// minutes to the second).
    #[serde(skip_serializing_if = "is_default_jitter")]
    pub jitter_percent: u32,
}

/// Default of [`RetryPolicy::jitter_percent`].
pub const DEFAULT_JITTER_PERCENT: u32 = 20;

fn is_default_jitter(percent: &u32) -> bool {
    *percent == DEFAULT_JITTER_PERCENT
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { delays_secs: vec![60], max_attempts: 12, jitter_percent: DEFAULT_JITTER_PERCENT }
    }
}

impl RetryPolicy {
    /// The wait before send number `next_attempt`: [`Self::base_delay`] with this policy's
    /// jitter (`jitter` a uniform sample in `[0, 1)`), or the endpoint's `Retry-After` within
    /// `bounds` when longer (see `deliver::backoff`).
    pub fn delay(&self, next_attempt: u32, retry_after: Option<Duration>, jitter: f64, bounds: RetryAfterBounds) -> Duration {
        let spread = f64::from(self.jitter_percent.min(100)) / 100.0;
        retry_delay(self.base_delay(next_attempt), retry_after, jitter, spread, bounds)
    }

    /// Base wait (before jitter) before send number `next_attempt` (2 = first retry).
    pub fn base_delay(&self, next_attempt: u32) -> Duration {
        let idx = next_attempt.saturating_sub(2) as usize;
        let secs = match self.delays_secs.get(idx) {
            Some(s) => *s,
            None => {
                let last = self.delays_secs.last().copied().unwrap_or(60);
                let extra = (idx + 1 - self.delays_secs.len()).min(40) as u32;
                last.saturating_mul(2u64.saturating_pow(extra))
            }
        };
        Duration::from_secs(secs.min(7 * 24 * 3600))
    }
}

/// One webhook endpoint of one customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    /// Unique id; the key on `hookd.subscriptions`, `hookd.deliveries` and `hookd.retry`.
    pub id: String,
    /// Account whose events this endpoint receives.
    pub tenant: String,
    /// Target URL (http or https).
    pub url: String,
    #[serde(default)]
    pub source: Source,
    /// Event-type filters: exact names and `*` globs. Default: every event.
    #[serde(default = "all_events")]
    pub events: Vec<String>,
    /// Body shape: a built-in dialect or one defined under `[dialect.<name>]`.
    #[serde(default = "default_dialect")]
    pub dialect: String,
    #[serde(default)]
    pub format: Format,
    #[serde(default)]
    pub aggregation: Aggregation,
    /// Chat only: the time zone whose midnight the `aggregation` windows align to and whose
    /// wall clock the summary shows. Default: UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<TimeZone>,
    /// Extra request headers, sent as given.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `whsec_` signing secret(s), space-separated during rotation. None: a `v1,` signature
    /// is still sent, keyed with an empty secret, so receivers see a consistent header set.
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub verification: Option<Verification>,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub owner_email: Option<String>,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Auto-disable after more than this many consecutive failed requests.
    #[serde(default = "default_disable_after")]
    pub disable_after_failures: u32,
    /// Which HTTP statuses count as delivered, overriding the dialect's rule: `"200"` (only
    /// 200, as TimelinesAI and Teamcrop have it) or `"2xx"`. Default: the dialect's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success: Option<SuccessRule>,
    /// doopage only: whether bodies carry `timestamp`: `"always"` (default), `"as_samples"`
    /// (not in `tag_set`, `tag_unset`, `note_changed`, `customer_pipeline_updated`, as the
    /// seed's samples) or `"never"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_timestamp: Option<BodyTimestamp>,
    /// Requests per second to this endpoint; default `delivery.per_subscription_rate_per_sec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_sec: Option<u32>,
    /// Requests in flight to this endpoint; default `delivery.per_subscription_concurrency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Why it is disabled, when hookd or an operator disabled it (set with `enabled = false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
}

fn all_events() -> Vec<String> {
    vec!["*".to_string()]
}
fn default_dialect() -> String {
    "standard".to_string()
}
fn yes() -> bool {
    true
}
fn default_disable_after() -> u32 {
    10
}

impl Subscription {
    /// Cross-field checks that serde cannot express.
    pub fn validate(&self) -> Result<(), String> {
        let ctx = |m: String| format!("subscription `{}`: {m}", self.id);
        if self.id.is_empty() {
            return Err("subscription: `id` must not be empty".into());
        }
        if self.tenant.is_empty() {
            return Err(ctx("`tenant` must not be empty".into()));
        }
        let url = url::Url::parse(&self.url).map_err(|e| ctx(format!("`url` is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ctx(format!("`url` scheme must be http or https, not `{}`", url.scheme())));
        }
        if self.events.is_empty() {
            return Err(ctx("`events` must list at least one name or glob".into()));
        }
        if self.rate_limit_per_sec == Some(0) || self.max_concurrency == Some(0) {
            return Err(ctx("`rate_limit_per_sec` and `max_concurrency` must be at least 1".into()));
        }
        if self.retry.max_attempts == 0 {
            return Err(ctx("`retry.max_attempts` must be at least 1".into()));
        }
        if self.body_timestamp.is_some() && self.dialect != "doopage" {
            return Err(ctx(format!("`body_timestamp` applies to `dialect = \"doopage\"` only, not `{}`", self.dialect)));
        }
        if self.retry.jitter_percent > 100 {
            return Err(ctx(format!("`retry.jitter_percent` must be 0..=100, not {}", self.retry.jitter_percent)));
        }
        if self.source == Source::Crm && self.aggregation != Aggregation::None {
            return Err(ctx("`aggregation` applies to `source = \"chat\"` only".into()));
        }
        if self.source == Source::Crm && self.timezone.is_some() {
            return Err(ctx("`timezone` applies to `source = \"chat\"` only (it aligns aggregation windows)".into()));
        }
        if self.source == Source::Chat && !matches!(self.dialect.as_str(), "timelines" | "standard") {
            return Err(ctx(format!(
                "chat subscriptions send TimelinesAI payloads: set `dialect = \"timelines\"` or leave it out, not `{}`",
                self.dialect
            )));
        }
        for (name, value) in &self.headers {
            reqwest::header::HeaderName::from_bytes(name.as_bytes()).map_err(|_| ctx(format!("header name `{name}` is not valid")))?;
            reqwest::header::HeaderValue::from_str(value).map_err(|_| ctx(format!("header `{name}` has a value that is not valid")))?;
        }
        if let Some(secret) = &self.secret {
            for s in secret.split_whitespace() {
                crate::deliver::signature::decode_secret(s).map_err(|e| ctx(format!("`secret`: {e}")))?;
            }
        }
        Ok(())
    }

    /// The zone of this subscription's windows and summary: its `timezone`, else UTC.
    pub fn zone(&self) -> chrono_tz::Tz {
        self.timezone.map_or(chrono_tz::Tz::UTC, |z| z.0)
    }

    /// Whether `event_type` passes this subscription's filters.
    pub fn wants(&self, event_type: &str) -> bool {
        super::filter::EventFilter::new(&self.events).accepts(event_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(json: &str) -> Subscription {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn design_sample_parses_and_defaults_apply() {
        let s = sub(r#"{"id": "sub_1", "tenant": "1260", "url": "https://hooks.example.com/crm", "source": "crm",
 "events": ["contact.*", "order.created"], "dialect": "antcrm", "format": "json",
 "aggregation": "none", "headers": {"X-Api-Key": "k"},
 "verification": {"validation_key": "my-key"}, "enabled": true, "owner_email": "ops@example.com",
 "retry": {"delays_secs": [60, 120, 240], "max_attempts": 12}, "disable_after_failures": 10}"#);
        assert!(s.validate().is_ok());
        assert!(s.wants("contact.created") && s.wants("contact.stage_changed"));
        assert!(s.wants("order.created") && !s.wants("order.updated") && !s.wants("contactx"));
        let d = sub(r#"{"id":"s","tenant":"t","url":"http://x/"}"#);
        assert_eq!(d.events, vec!["*"]);
        assert!(d.enabled && d.wants("anything.at_all"));
        assert_eq!(d.retry, RetryPolicy { delays_secs: vec![60], max_attempts: 12, jitter_percent: 20 });
        assert_eq!(d.success, None, "the dialect decides");
        assert_eq!(d.disable_after_failures, 10);
        assert_eq!(d.dialect, "standard");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        assert!(serde_json::from_str::<Subscription>(r#"{"id":"s","tenant":"t","url":"http://x/","colour":1}"#).is_err());
        assert!(serde_json::from_str::<Subscription>(r#"{"id":"s","tenant":"t","url":"http://x/","aggregation":"often"}"#).is_err());
        let bad_url = sub(r#"{"id":"s","tenant":"t","url":"ftp://x/"}"#);
        assert!(bad_url.validate().unwrap_err().contains("scheme"));
        let agg_crm = sub(r#"{"id":"s","tenant":"t","url":"http://x/","aggregation":"1h"}"#);
        assert!(agg_crm.validate().unwrap_err().contains("aggregation"));
    }

    #[test]
    fn timezone_is_an_iana_name_for_chat_subscriptions() {
        let chat =
            |tz: &str| format!(r#"{{"id":"s","tenant":"t","url":"http://x/","source":"chat","aggregation":"24h","timezone":"{tz}"}}"#);
        let s = sub(&chat("Asia/Ho_Chi_Minh"));
        assert!(s.validate().is_ok());
        assert_eq!(s.zone(), chrono_tz::Tz::Asia__Ho_Chi_Minh);
        assert_eq!(serde_json::to_value(&s).unwrap()["timezone"], "Asia/Ho_Chi_Minh", "written back by name");
        assert_eq!(sub(r#"{"id":"s","tenant":"t","url":"http://x/"}"#).zone(), chrono_tz::Tz::UTC, "default UTC");
        let err = serde_json::from_str::<Subscription>(&chat("Asia/Hanoi")).unwrap_err().to_string();
        assert!(err.starts_with("unknown time zone `Asia/Hanoi`: expected an IANA name"), "{err}");
        let err = toml::from_str::<Subscription>("id = \"s\"\ntenant = \"t\"\nurl = \"http://x/\"\ntimezone = \"GMT+7\"\n").unwrap_err();
        assert!(err.to_string().contains("unknown time zone `GMT+7`"), "{err}");
        let crm = sub(r#"{"id":"s","tenant":"t","url":"http://x/","timezone":"Europe/Berlin"}"#);
        assert!(crm.validate().unwrap_err().contains("`timezone` applies to `source = \"chat\"` only"));
    }

    #[test]
    fn aggregation_parses_product_choices() {
        assert_eq!(Aggregation::parse("none").unwrap(), Aggregation::None);
        assert_eq!(Aggregation::parse("6h").unwrap(), Aggregation::Every(Duration::from_secs(6 * 3600)));
        assert_eq!(Aggregation::parse("10s").unwrap(), Aggregation::Every(Duration::from_secs(10)));
        assert!(Aggregation::parse("0s").is_err());
    }

    #[test]
    fn retry_delays_double_from_last_entry() {
        let teamcrop = RetryPolicy::default();
        let secs: Vec<u64> = (2..=6).map(|a| teamcrop.base_delay(a).as_secs()).collect();
        assert_eq!(secs, vec![60, 120, 240, 480, 960]);
        let listed = RetryPolicy { delays_secs: vec![5, 7], max_attempts: 5, jitter_percent: 20 };
        let secs: Vec<u64> = (2..=5).map(|a| listed.base_delay(a).as_secs()).collect();
        assert_eq!(secs, vec![5, 7, 14, 28]);
        assert_eq!(teamcrop.base_delay(200).as_secs(), 7 * 24 * 3600, "capped at a week");
    }

    /// Teamcrop: "1, 2, 4, 8 ... minutes", 12 sends. With `jitter_percent = 0` the waits are
    /// exactly that, whatever the random sample; by default each is within 20 % of it.
    #[test]
    fn zero_jitter_gives_teamcrop_schedule_exactly() {
        let bounds = RetryAfterBounds::default();
        let exact: RetryPolicy = serde_json::from_str(r#"{"jitter_percent": 0}"#).unwrap();
        let minutes: Vec<u64> = (1..=11).map(|k| 1 << (k - 1)).collect();
        assert_eq!(minutes, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]);
        for sample in [0.0, 0.25, 0.5, 0.999_999] {
            let waits: Vec<Duration> = (2..=exact.max_attempts).map(|next| exact.delay(next, None, sample, bounds)).collect();
            assert_eq!(waits, minutes.iter().map(|m| Duration::from_secs(m * 60)).collect::<Vec<_>>(), "sample {sample}");
        }
        let jittered = RetryPolicy::default();
        assert_eq!(jittered.delay(2, None, 0.0, bounds), Duration::from_secs(48));
        assert_eq!(jittered.delay(3, None, 0.5, bounds), Duration::from_secs(120));
        assert_eq!(exact.delay(2, Some(Duration::from_secs(300)), 0.9, bounds), Duration::from_secs(300), "Retry-After still honoured");
        let wide = RetryPolicy { jitter_percent: 100, ..RetryPolicy::default() };
        assert_eq!(wide.delay(2, None, 0.75, bounds), Duration::from_secs(90));
        assert!(serde_json::to_value(&jittered).unwrap().get("jitter_percent").is_none(), "the default is not written out");
        assert_eq!(serde_json::to_value(&exact).unwrap()["jitter_percent"], 0);
        let over = sub(r#"{"id":"s","tenant":"t","url":"http://x/","retry":{"jitter_percent":101}}"#);
        assert!(over.validate().unwrap_err().contains("`retry.jitter_percent` must be 0..=100"));
    }

    #[test]
    fn success_rule_can_be_set_per_subscription() {
        let strict = sub(r#"{"id":"s","tenant":"t","url":"http://x/","source":"chat","success":"200"}"#);
        assert_eq!(strict.success, Some(SuccessRule::Exactly200));
        assert_eq!(serde_json::to_value(&strict).unwrap()["success"], "200");
        assert_eq!(sub(r#"{"id":"s","tenant":"t","url":"http://x/","success":"2xx"}"#).success, Some(SuccessRule::Any2xx));
        assert!(serde_json::from_str::<Subscription>(r#"{"id":"s","tenant":"t","url":"http://x/","success":"201"}"#).is_err());
    }
}
