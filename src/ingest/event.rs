//! The `crm.events` record: decoding and validation.
//!
//! A record is accepted only when it is a JSON object with the required fields of DESIGN
//! section 3 (`id`, `tenant`, `type`, `occurred_at`, `data`) of the right types. Anything
//! else is an [`InputError`] whose message names the field, so the dead-letter record tells
//! the operator exactly what to fix.

use std::borrow::Cow;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Map, Number, Value};

use super::json::Json;

/// Why an input record was refused. The text goes to `hookd.dlq` as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("record is {size} bytes, over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("record has no value")]
    Empty,
    #[error("malformed JSON: {0}")]
    Malformed(String),
    #[error("record is not a JSON object")]
    NotAnObject,
    #[error("missing required field `{0}`")]
    Missing(&'static str),
    #[error("field `{field}` must be {expected}")]
    WrongType { field: &'static str, expected: &'static str },
}

/// One change event of the producer's CRM, as published on `crm.events`.
#[derive(Debug, Clone, PartialEq)]
pub struct CrmEvent {
    /// Producer's event id; with the subscription id it makes the stable `webhook-id`.
    pub id: String,
    /// Account the event belongs to; subscriptions match on it.
    pub tenant: String,
    /// Producer's own event name (`contact.created`); dialects map it to wire names.
    pub event_type: String,
    /// When it happened, from epoch milliseconds or RFC 3339.
    pub occurred_at: DateTime<Utc>,
    /// Entity objects keyed by entity name (`{"contact": {...}}`).
    pub data: Map<String, Value>,
    /// Who did it (`createdBy` in AntCRM/BeeIQ).
    pub actor: Option<Value>,
    /// Old and new values (`eventContent` in BeeIQ).
    pub changes: Option<Value>,
    /// Human-readable line shown by CRMs.
    pub content: Option<String>,
    /// Link to the entity in the producer's UI.
    pub link: Option<String>,
}

impl CrmEvent {
    /// Decodes and validates one record value.
    pub fn decode(bytes: &[u8], max_bytes: usize) -> Result<Self, InputError> {
        let value = decode_object(bytes, max_bytes)?;
        Self::from_value(value)
    }

    /// Validates an already parsed JSON object.
    pub fn from_value(value: Map<String, Value>) -> Result<Self, InputError> {
        let mut v = value;
        Ok(Self {
            id: take_id(&mut v, "id")?,
            tenant: take_id(&mut v, "tenant")?,
            event_type: take_string(&mut v, "type")?,
            occurred_at: time_of(&v.remove("occurred_at").into(), "occurred_at")?,
            data: match v.remove("data") {
                Some(Value::Object(m)) => m,
                Some(_) => return Err(InputError::WrongType { field: "data", expected: "an object" }),
                None => return Err(InputError::Missing("data")),
            },
            actor: optional(&mut v, "actor"),
            changes: optional(&mut v, "changes"),
            content: optional_string(&mut v, "content")?,
            link: optional_string(&mut v, "link")?,
        })
    }

    /// The entity named by the event type's prefix (`order` for `order.created`).
    pub fn entity(&self) -> &str {
        self.event_type.split('.').next().unwrap_or(&self.event_type)
    }
}

/// Size check, then JSON parse into an object.
pub fn decode_object(bytes: &[u8], max_bytes: usize) -> Result<Map<String, Value>, InputError> {
    check_size(bytes, max_bytes)?;
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(InputError::NotAnObject),
        Err(e) => Err(InputError::Malformed(e.to_string())),
    }
}

/// A record must have a value of at most `max_bytes`.
pub fn check_size(bytes: &[u8], max_bytes: usize) -> Result<(), InputError> {
    if bytes.is_empty() {
        return Err(InputError::Empty);
    }
    if bytes.len() > max_bytes {
        return Err(InputError::TooLarge { size: bytes.len(), limit: max_bytes });
    }
    Ok(())
}

/// A field as the rules below see it, whichever tree it was read into: `Value` (CRM events)
/// or the borrowed [`Json`] (chat messages). Absent and `null` are the same.
pub enum Scalar<'a> {
    Null,
    Str(Cow<'a, str>),
    Num(Number),
    Other,
}

impl From<Option<Value>> for Scalar<'static> {
    fn from(v: Option<Value>) -> Self {
        match v {
            None | Some(Value::Null) => Scalar::Null,
            Some(Value::String(s)) => Scalar::Str(Cow::Owned(s)),
            Some(Value::Number(n)) => Scalar::Num(n),
            Some(_) => Scalar::Other,
        }
    }
}

impl<'a> From<Option<Json<'a>>> for Scalar<'a> {
    fn from(v: Option<Json<'a>>) -> Self {
        match v {
            None | Some(Json::Null) => Scalar::Null,
            Some(Json::String(s)) => Scalar::Str(s),
            Some(Json::Number(n)) => Scalar::Num(n),
            Some(_) => Scalar::Other,
        }
    }
}

/// A required non-empty string; numbers are accepted for ids (`"tenant": 1260`).
pub fn id_of<'a>(v: Scalar<'a>, field: &'static str) -> Result<Cow<'a, str>, InputError> {
    match v {
        Scalar::Str(s) if !s.is_empty() => Ok(s),
        Scalar::Num(n) => Ok(Cow::Owned(n.to_string())),
        Scalar::Str(_) => Err(InputError::WrongType { field, expected: "a non-empty string" }),
        Scalar::Null => Err(InputError::Missing(field)),
        Scalar::Other => Err(InputError::WrongType { field, expected: "a string" }),
    }
}

/// A required non-empty string.
pub fn string_of<'a>(v: Scalar<'a>, field: &'static str) -> Result<Cow<'a, str>, InputError> {
    match v {
        Scalar::Str(s) if !s.is_empty() => Ok(s),
        Scalar::Null => Err(InputError::Missing(field)),
        _ => Err(InputError::WrongType { field, expected: "a non-empty string" }),
    }
}

/// [`id_of`] on an object's field, which it takes.
pub fn take_id(v: &mut Map<String, Value>, field: &'static str) -> Result<String, InputError> {
    id_of(v.remove(field).into(), field).map(Cow::into_owned)
}

/// [`string_of`] on an object's field, which it takes.
pub fn take_string(v: &mut Map<String, Value>, field: &'static str) -> Result<String, InputError> {
    string_of(v.remove(field).into(), field).map(Cow::into_owned)
}

fn optional(v: &mut Map<String, Value>, field: &str) -> Option<Value> {
    v.remove(field).filter(|x| !x.is_null())
}

fn optional_string(v: &mut Map<String, Value>, field: &'static str) -> Result<Option<String>, InputError> {
    match v.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(InputError::WrongType { field, expected: "a string" }),
    }
}

/// Epoch milliseconds (integer) or an RFC 3339 string; also the `+0000` offset form of the
/// TimelinesAI samples (`2021-02-24T16:25:29+0000`).
pub fn time_of(value: &Scalar<'_>, field: &'static str) -> Result<DateTime<Utc>, InputError> {
    let wrong = InputError::WrongType { field, expected: "epoch milliseconds or an RFC 3339 time" };
    match value {
        Scalar::Null => Err(InputError::Missing(field)),
        Scalar::Num(n) => n.as_i64().and_then(|ms| Utc.timestamp_millis_opt(ms).single()).ok_or(wrong),
        Scalar::Str(s) => fast_time(s)
            .map(Ok)
            .unwrap_or_else(|| DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc)))
            .or_else(|_| DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z").map(|t| t.with_timezone(&Utc)))
            .map_err(|_| wrong),
        Scalar::Other => Err(wrong),
    }
}

/// The common forms `2021-02-24T16:25:29Z`, `...+07:00` and `...+0000`, with optional
/// fractional seconds of 1 to 9 digits, read without chrono's format parser (the hot path of
/// every chat message). `None` for anything else, which then takes chrono's parsers: this
/// accepts only strings those accept too, with the same result.
fn fast_time(s: &str) -> Option<DateTime<Utc>> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<u32> {
        let digits = b.get(from..from + len)?;
        digits.iter().try_fold(0u32, |n, d| d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0')))
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (mut at, mut nanos) = (19, 0u32);
    if b[at] == b'.' {
        let digits = b[at + 1..].iter().take_while(|d| d.is_ascii_digit()).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        nanos = num(at + 1, digits)? * 10u32.pow(9 - digits as u32);
        at += 1 + digits;
    }
    let offset_secs = match (b.get(at)?, &b[at + 1..]) {
        (b'Z', []) => 0,
        (sign @ (b'+' | b'-'), rest) if rest.len() == 4 || (rest.len() == 5 && rest[2] == b':') => {
            let minutes = num(at + rest.len() - 1, 2)?;
            let secs = (num(at + 1, 2)? * 60 + minutes) as i32 * 60;
            if minutes > 59 || secs >= 86_400 {
                return None;
            }
            if *sign == b'-' {
                -secs
            } else {
                secs
            }
        }
        _ => return None,
    };
    let date = chrono::NaiveDate::from_ymd_opt(num(0, 4)? as i32, num(5, 2)?, num(8, 2)?)?;
    let (h, m, sec) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if sec > 59 {
        return None; // leap seconds: chrono's parsers decide
    }
    let local = date.and_hms_nano_opt(h, m, sec, nanos)?;
    Some(DateTime::from_naive_utc_and_offset(local - chrono::Duration::seconds(i64::from(offset_secs)), Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"id": "evt_8f1c", "tenant": "1260", "type": "contact.created", "occurred_at": 1618118040123,
 "actor": {"id": "57f2399cd7351a3e75f8aa1a", "email": "tran.le@example.com", "firstname": "Tran", "lastname": "Le"},
 "data": {"contact": {"name": "Tran", "lastname": "Thuan", "contactId": "PID-66"}},
 "changes": {"old": {"name": "Lead"}, "new": {"name": "Contacted"}},
 "content": "Tran Le created contact Tran Thuan", "link": "https://crm.example.com/contacts/PID-66"}"#;

    /// The fast path agrees with chrono's parsers wherever it answers, and leaves the rest
    /// to them.
    #[test]
    fn fast_time_agrees_with_chrono() {
        let chrono_parse = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .or_else(|_| DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z"))
                .map(|t| t.with_timezone(&Utc))
                .ok()
        };
        let answered = [
            "2021-02-24T16:25:29+0000",
            "2021-02-24T16:25:29Z",
            "2021-02-24T16:25:29.123Z",
            "2021-02-24T16:25:29.123456789+07:00",
            "2021-02-24T16:25:29.5-0330",
            "1969-12-31T23:59:59.999+00:00",
            "2024-02-29T00:00:00+2359",
        ];
        for s in answered {
            assert!(fast_time(s).is_some(), "{s}");
            assert_eq!(fast_time(s), chrono_parse(s), "{s}");
        }
        let declined = [
            "2021-02-24 16:25:29Z",
            "2021-02-24t16:25:29Z",
            "2021-02-24T16:25:60Z",
            "2021-02-30T16:25:29Z",
            "2021-02-24T24:00:00Z",
            "2021-02-24T16:25:29+2400",
            "2021-02-24T16:25:29+0060",
            "2021-02-24T16:25:29.Z",
            "2021-02-24T16:25:29.1234567890Z",
            "2021-02-24T16:25:29",
            "2021-02-24T16:25:29Zjunk",
            "2021-02-24T16:25:29+00",
            "+2021-02-24T16:25:29Z",
            "2021-02-24T16:25:29+0ü00",
        ];
        for s in declined {
            assert_eq!(fast_time(s), None, "{s}");
        }
        for s in declined.iter().chain(&answered) {
            let via = time_of(&Scalar::Str(Cow::Borrowed(s)), "t").ok();
            assert_eq!(via, chrono_parse(s), "{s}");
        }
    }

    #[test]
    fn decodes_design_sample() {
        let e = CrmEvent::decode(SAMPLE.as_bytes(), 1 << 20).unwrap();
        assert_eq!(e.id, "evt_8f1c");
        assert_eq!(e.tenant, "1260");
        assert_eq!(e.entity(), "contact");
        assert_eq!(e.occurred_at.timestamp_millis(), 1618118040123);
        assert_eq!(e.data["contact"]["contactId"], "PID-66");
        assert_eq!(e.content.as_deref(), Some("Tran Le created contact Tran Thuan"));
    }

    #[test]
    fn numeric_tenant_and_rfc3339_time() {
        let e = CrmEvent::decode(
            br#"{"id":"e","tenant":1260,"type":"order.created","occurred_at":"2021-02-24T16:25:29+0000","data":{}}"#,
            1024,
        )
        .unwrap();
        assert_eq!(e.tenant, "1260");
        assert_eq!(e.occurred_at.to_rfc3339(), "2021-02-24T16:25:29+00:00");
    }

    #[test]
    fn refuses_bad_input_with_named_field() {
        let cases: &[(&[u8], InputError)] = &[
            (b"", InputError::Empty),
            (b"[1]", InputError::NotAnObject),
            (br#"{"tenant":"t","type":"a","occurred_at":1,"data":{}}"#, InputError::Missing("id")),
            (br#"{"id":"e","tenant":"t","type":"a","occurred_at":1}"#, InputError::Missing("data")),
            (
                br#"{"id":"e","tenant":"t","type":5,"occurred_at":1,"data":{}}"#,
                InputError::WrongType { field: "type", expected: "a non-empty string" },
            ),
            (
                br#"{"id":"e","tenant":"t","type":"a","occurred_at":"yesterday","data":{}}"#,
                InputError::WrongType { field: "occurred_at", expected: "epoch milliseconds or an RFC 3339 time" },
            ),
            (
                br#"{"id":"e","tenant":"t","type":"a","occurred_at":1,"data":[]}"#,
                InputError::WrongType { field: "data", expected: "an object" },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(&CrmEvent::decode(input, 1024).unwrap_err(), want, "{}", String::from_utf8_lossy(input));
        }
        assert!(matches!(CrmEvent::decode(b"{not json", 1024), Err(InputError::Malformed(_))));
        assert_eq!(CrmEvent::decode(SAMPLE.as_bytes(), 10).unwrap_err(), InputError::TooLarge { size: SAMPLE.len(), limit: 10 });
    }
}
