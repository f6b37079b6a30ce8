//! Golden tests: the built-in dialects reproduce the sample payloads of `shared/seeds/`.
//!
//! `testdata/` holds the samples as the seeds print them: `teamcrop_order.json` (seed 002),
//! `doopage_samples.json` (seed 003, every payload sample in its order), `beeiq_samples.json`
//! (seed 001's field samples, keyed by field), `antcrm_samples.txt` (seed 000's field samples
//! line for line, in the seed's own notation: bare keys, no commas). `beeiq_*.json` are full
//! BeeIQ bodies put together from those field samples in the order of DESIGN section 4; the
//! AntCRM bodies are checked against seed 000's samples and parameter table directly. Bodies
//! are compared as values and, where the seeds fix key order, as serialized text too.

use std::collections::BTreeMap;

use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::Event;
use quick_xml::Reader;
use serde_json::{json, Map, Value};

use super::{Dialects, Rendered};
use crate::ingest::event::CrmEvent;
use crate::route::subscription::{Format, Subscription};

const TEAMCROP_ORDER: &str = include_str!("testdata/teamcrop_order.json");
const DOOPAGE_SAMPLES: &str = include_str!("testdata/doopage_samples.json");
const BEEIQ_SAMPLES: &str = include_str!("testdata/beeiq_samples.json");
const BEEIQ_CONTACT_CREATED: &str = include_str!("testdata/beeiq_contact_created.json");
const BEEIQ_DEAL_STAGE_CHANGED: &str = include_str!("testdata/beeiq_deal_stage_changed.json");
const ANTCRM_SAMPLES: &str = include_str!("testdata/antcrm_samples.txt");

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

fn dialects() -> Dialects {
    Dialects::new(&BTreeMap::new()).unwrap()
}

/// An event of the `crm.events` shape, built as a producer would send it.
fn event(tenant: &str, event_type: &str, data: Value, extra: Value) -> CrmEvent {
    let mut record = json!({"id": "evt_1", "tenant": tenant, "type": event_type, "occurred_at": 1618118040123_i64, "data": data});
    let fields = record.as_object_mut().unwrap();
    fields.extend(extra.as_object().cloned().unwrap_or_default());
    CrmEvent::from_value(fields.clone()).unwrap()
}

fn body_value(r: &Rendered) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

/// Same value and, because serde_json keeps insertion order here, same key order.
fn assert_same_json(r: &Rendered, want: &Value) {
    assert_eq!(&body_value(r), want);
    assert_eq!(String::from_utf8(r.body.clone()).unwrap(), serde_json::to_string(want).unwrap());
}

fn beeiq_sample(field: &str) -> Value {
    parse(BEEIQ_SAMPLES)[field].clone()
}

#[test]
fn beeiq_and_antcrm_contact_created() {
    let want = parse(BEEIQ_CONTACT_CREATED);
    let extra = json!({"actor": beeiq_sample("createdBy"), "content": want["content"], "link": beeiq_sample("link")});
    let ev = event("1260", "contact.created", json!({"contact": beeiq_sample("contact")}), extra);
    for dialect in ["beeiq", "antcrm"] {
        let r = dialects().render_crm(dialect, Format::Json, &ev).unwrap();
        assert_same_json(&r, &want);
        assert_eq!((r.event_name.as_str(), r.content_type.as_str()), ("CONTACT_CREATE", "application/json"));
        assert!(r.headers.is_empty());
    }
}

#[test]
fn beeiq_deal_stage_change_carries_event_content() {
    let want = parse(BEEIQ_DEAL_STAGE_CHANGED);
    let content = beeiq_sample("eventContent");
    let changes = json!({"old": content["oldValue"], "new": content["newValue"]});
    let extra = json!({"actor": beeiq_sample("createdBy"), "changes": changes, "content": want["content"], "link": want["link"]});
    let ev = event("1260", "deal.updated", json!({"deal": beeiq_sample("deal")}), extra);
    assert_same_json(&dialects().render_crm("beeiq", Format::Json, &ev).unwrap(), &want);
}

#[test]
fn beeiq_ticket_and_task_objects_are_spread_at_top_level() {
    for (event_type, entity, code) in [("ticket.created", "ticket", "TICKET_CREATE"), ("task.updated", "task", "TASK_CHANGE")] {
        let ev = event("1260", event_type, json!({ entity: beeiq_sample(entity) }), json!({}));
        let r = dialects().render_crm("beeiq", Format::Json, &ev).unwrap();
        assert_same_json(&r, &json!({"eventCode": code, entity: beeiq_sample(entity)}));
    }
}

/// Seed 000's field samples (`testdata/antcrm_samples.txt`) as JSON values, keys in the
/// seed's order: `createdBy`, `contact`, `ticket`, `task` objects and the `link` string.
fn antcrm_samples() -> Map<String, Value> {
    let mut fields = Map::new();
    for section in ANTCRM_SAMPLES.split("\n== ").skip(1) {
        let (name, text) = section.split_once('\n').unwrap();
        fields.insert(name.to_string(), seed_value(text.trim()));
    }
    fields
}

/// One sample in the seed's notation: a URL, or an object with one `key:value` per line
/// (keys bare or quoted, values JSON, a trailing comma or none, outer braces optional).
fn seed_value(text: &str) -> Value {
    if text.starts_with("https://") {
        return Value::String(text.to_string());
    }
    let inner = text.strip_prefix('{').and_then(|t| t.strip_suffix('}')).unwrap_or(text);
    let mut object = Map::new();
    for line in inner.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (key, value) = line.split_once(':').unwrap_or_else(|| panic!("not `key:value`: {line}"));
        object.insert(key.trim().trim_matches('"').to_string(), parse(value.trim().trim_end_matches(',')));
    }
    Value::Object(object)
}

/// Seed 000's own samples: every AntCRM event it lists (create, update, stage change, add
/// note, assign) for its contact, task and ticket samples gives the body of its parameter
/// table, `{eventCode, createdBy, <entity>, link}` in that order, each field the seed's sample
/// with its keys in the seed's order. The seed has no code for "assign": an assignment is a
/// change (`TASK_CHANGE`, `TICKET_CHANGE`).
#[test]
fn antcrm_bodies_carry_seed_000_samples_exactly() {
    let samples = antcrm_samples();
    let keys: Vec<&str> = samples.keys().map(String::as_str).collect();
    assert_eq!(keys, ["createdBy", "contact", "ticket", "task", "link"]);
    assert_eq!(samples["ticket"]["TicketId"], 434);
    assert_eq!(samples["contact"]["name"], "huyen@grandpasgarđến.org");
    let rows = [
        ("contact.created", "contact", "CONTACT_CREATE"),
        ("contact.updated", "contact", "CONTACT_CHANGE"),
        ("contact.stage_changed", "contact", "CONTACT_CHANGE_STAGE"),
        ("note.created", "contact", "NOTE_CREATE"),
        ("task.created", "task", "TASK_CREATE"),
        ("task.updated", "task", "TASK_CHANGE"),
        ("task.assigned", "task", "TASK_CHANGE"),
        ("note.created", "task", "NOTE_CREATE"),
        ("ticket.created", "ticket", "TICKET_CREATE"),
        ("ticket.updated", "ticket", "TICKET_CHANGE"),
        ("ticket.assigned", "ticket", "TICKET_CHANGE"),
        ("note.created", "ticket", "NOTE_CREATE"),
    ];
    let (created_by, link) = (&samples["createdBy"], &samples["link"]);
    for (producer_type, entity, code) in rows {
        let ev = event("1260", producer_type, json!({ entity: samples[entity] }), json!({"actor": created_by, "link": link}));
        let r = dialects().render_crm("antcrm", Format::Json, &ev).unwrap();
        assert_same_json(&r, &json!({"eventCode": code, "createdBy": created_by, entity: samples[entity], "link": link}));
        assert_eq!((r.event_name.as_str(), r.content_type.as_str()), (code, "application/json"), "{producer_type}");
        assert!(r.headers.is_empty());
    }
    // The task sample is JSON in the seed already: its bytes, line breaks taken out, are in the body.
    let task_text = ANTCRM_SAMPLES.split("\n== task\n").nth(1).unwrap().split("\n== ").next().unwrap().replace('\n', "");
    let ev = event("1260", "task.assigned", json!({"task": samples["task"]}), json!({}));
    let body = String::from_utf8(dialects().render_crm("antcrm", Format::Json, &ev).unwrap().body).unwrap();
    assert_eq!(body, format!(r#"{{"eventCode":"TASK_CHANGE","task":{task_text}}}"#));
}

#[test]
fn antcrm_event_code_table() {
    let rows = [
        ("contact.created", "CONTACT_CREATE"),
        ("contact.updated", "CONTACT_CHANGE"),
        ("contact.stage_changed", "CONTACT_CHANGE_STAGE"),
        ("task.created", "TASK_CREATE"),
        ("task.updated", "TASK_CHANGE"),
        ("ticket.created", "TICKET_CREATE"),
        ("ticket.updated", "TICKET_CHANGE"),
        ("deal.created", "DEAL_CREATE"),
        ("deal.updated", "DEAL_CHANGE"),
        ("order.created", "DEAL_CREATE"),
        ("order.updated", "DEAL_CHANGE"),
        ("note.created", "NOTE_CREATE"),
        ("task.assigned", "TASK_CHANGE"),
        ("ticket.assigned", "TICKET_CHANGE"),
        ("invoice.paid", "invoice.paid"),
    ];
    let d = dialects();
    for dialect in ["antcrm", "beeiq"] {
        for (producer_type, code) in rows {
            let ev = event("1260", producer_type, json!({}), json!({}));
            let r = d.render_crm(dialect, Format::Json, &ev).unwrap();
            assert_eq!(body_value(&r)["eventCode"], code, "{dialect} {producer_type}");
            assert_eq!(r.event_name, code);
        }
    }
}

fn teamcrop_order_event() -> CrmEvent {
    let extra = json!({"actor": {"id": 14169}, "content": "new order"});
    event("1260", "order.created", json!({"order": parse(TEAMCROP_ORDER), "customer": {"id": 1117715}}), extra)
}

#[test]
fn teamcrop_order_json_is_the_sample() {
    let r = dialects().render_crm("teamcrop", Format::Json, &teamcrop_order_event()).unwrap();
    assert_same_json(&r, &parse(TEAMCROP_ORDER));
    assert_eq!(r.headers, vec![("Tc-Webhook-Event".to_string(), "order.add".to_string())]);
    assert_eq!((r.event_name.as_str(), r.content_type.as_str()), ("order.add", "application/json"));
}

#[test]
fn teamcrop_order_xml() {
    let r = dialects().render_crm("teamcrop", Format::Xml, &teamcrop_order_event()).unwrap();
    assert_eq!(r.content_type, "application/xml; charset=utf-8");
    assert_eq!(r.headers, vec![("Tc-Webhook-Event".to_string(), "order.add".to_string())]);
    let text = String::from_utf8(r.body.clone()).unwrap();
    assert!(text.starts_with(r#"<?xml version="1.0" encoding="UTF-8"?><order><company_id>1260</company_id>"#), "{text}");
    let root = parse_xml(&r.body);
    assert_eq!(root.name, "order");
    let sample = parse(TEAMCROP_ORDER);
    let names: Vec<&str> = root.children.iter().map(|c| c.name.as_str()).collect();
    let keys: Vec<&str> = sample.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(names, keys, "one element per field, in order");
    assert_eq!(root.path("invoice_id").text, "SPIRAL-170623-1017-DC92");
    assert_eq!(root.path("price_final").text, "936200");
    assert_eq!(root.path("promotion_detail/coupon_code").text, "");
    assert_eq!(root.path("promotion_detail/promotion_type_parent").text, "0");
    assert_eq!(root.path("billing_full_name").text, "Nguyễn Thúy Linh");
    assert_eq!(root.path("shipping_address").text, "23/44 Nguyễn KIm, P3");
    let error = root.path("error");
    assert!(error.children.is_empty() && error.text.is_empty());
}

#[test]
fn teamcrop_xml_escapes_text() {
    let nasty = "Tom & Jerry <b>\"quoted\"</b> 'single' ]]> &amp;";
    let data = json!({"customer": {"full_name": nasty, "tags": ["a<b", "c&d"], "note": null}});
    let r = dialects().render_crm("teamcrop", Format::Xml, &event("1", "contact.created", data, json!({}))).unwrap();
    let root = parse_xml(&r.body);
    assert_eq!(root.name, "customer");
    assert_eq!(root.path("full_name").text, nasty);
    let tags: Vec<&str> = root.path("tags").children.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(tags, ["a<b", "c&d"]);
    assert!(root.path("note").children.is_empty() && root.path("note").text.is_empty());
    assert_eq!(r.headers[0].1, "customer.add");
}

/// The DooPage samples that carry a timestamp, with the producer type each comes from.
const DOOPAGE_TIMED: [(&str, &str); 7] = [
    ("customer_created", "contact.created"),
    ("customer_updated", "contact.updated"),
    ("customer_took", "contact.taken"),
    ("customer_transferred", "contact.transferred"),
    ("customer_closed", "contact.closed"),
    ("order_created", "order.created"),
    ("order_updated", "order.updated"),
];

/// The samples without a timestamp; hookd always sends one.
const DOOPAGE_UNTIMED: [(&str, &str); 4] = [
    ("tag_set", "tag.set"),
    ("tag_unset", "tag.unset"),
    ("note_changed", "note.created"),
    ("customer_pipeline_updated", "contact.stage_changed"),
];

fn doopage_sample(event_type: &str) -> Value {
    let samples = parse(DOOPAGE_SAMPLES);
    let found = samples.as_array().unwrap().iter().find(|s| s["event_type"] == event_type);
    found.cloned().unwrap_or_else(|| panic!("no DooPage sample {event_type}"))
}

#[test]
fn doopage_samples_with_timestamp() {
    let d = dialects();
    for (wire, producer_type) in DOOPAGE_TIMED {
        let want = doopage_sample(wire);
        let ev = event("1", producer_type, want["data"].clone(), json!({"actor": {"id": 1}}));
        let r = d.render_crm("doopage", Format::Json, &ev).unwrap();
        assert_same_json(&r, &want);
        assert_eq!(r.event_name, wire);
        assert_eq!(d.success_rule("doopage"), super::SuccessRule::Any2xx);
    }
}

#[test]
fn doopage_samples_without_timestamp_match_but_for_it() {
    for (wire, producer_type) in DOOPAGE_UNTIMED {
        let want = doopage_sample(wire);
        let ev = event("1", producer_type, want["data"].clone(), json!({}));
        let mut got = body_value(&dialects().render_crm("doopage", Format::Json, &ev).unwrap());
        assert_eq!(got["timestamp"], 1618118040123_i64);
        got.as_object_mut().unwrap().shift_remove("timestamp");
        assert_eq!(serde_json::to_string(&got).unwrap(), serde_json::to_string(&want).unwrap(), "{wire}");
    }
    assert_eq!(parse(DOOPAGE_SAMPLES).as_array().unwrap().len(), DOOPAGE_TIMED.len() + DOOPAGE_UNTIMED.len());
}

/// `body_timestamp = "as_samples"`: every one of seed 003's samples, to the byte, from the
/// built-in dialect; `"never"` leaves `timestamp` out of all of them.
#[test]
fn doopage_as_samples_reproduces_every_sample_exactly() {
    let sub = |stamp: &str| -> Subscription {
        let json = format!(r#"{{"id":"dp","tenant":"1","url":"https://x.example/","dialect":"doopage","body_timestamp":"{stamp}"}}"#);
        let sub: Subscription = serde_json::from_str(&json).unwrap();
        sub.validate().unwrap();
        sub
    };
    let (as_samples, never, d) = (sub("as_samples"), sub("never"), dialects());
    for (wire, producer_type) in DOOPAGE_TIMED.iter().chain(DOOPAGE_UNTIMED.iter()) {
        let want = doopage_sample(wire);
        let ev = event("1", producer_type, want["data"].clone(), json!({}));
        assert_same_json(&d.render_for(&as_samples, &ev).unwrap(), &want);
        let mut untimed = want.clone();
        untimed.as_object_mut().unwrap().shift_remove("timestamp");
        assert_same_json(&d.render_for(&never, &ev).unwrap(), &untimed);
    }
    let samples = parse(DOOPAGE_SAMPLES);
    let without: Vec<&str> =
        samples.as_array().unwrap().iter().filter(|s| s.get("timestamp").is_none()).map(|s| s["event_type"].as_str().unwrap()).collect();
    assert_eq!(without, super::builtin::DOOPAGE_UNTIMED, "the built-in list is the samples without a timestamp");
    let mut wrong = as_samples.clone();
    wrong.dialect = "antcrm".into();
    assert!(wrong.validate().unwrap_err().contains("`body_timestamp` applies to `dialect = \"doopage\"` only"));
}

#[test]
fn standard_webhooks_payload() {
    let data = json!({"contact": {"name": "Tran", "contactId": "PID-66"}});
    let ev = event("1260", "contact.created", data.clone(), json!({"actor": {"id": "a"}}));
    let r = dialects().render_crm("standard", Format::Json, &ev).unwrap();
    let want = json!({"type": "contact.created", "timestamp": "2021-04-11T05:14:00.123Z", "data": data});
    assert_same_json(&r, &want);
}

/// A parsed XML element: name, unescaped text, child elements.
#[derive(Debug, Default)]
struct Node {
    name: String,
    text: String,
    children: Vec<Node>,
}

impl Node {
    /// The first descendant along `a/b/c`.
    fn path(&self, path: &str) -> &Node {
        path.split('/').fold(self, |node, name| {
            node.children.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no <{name}> in <{}>", node.name))
        })
    }
}

/// Parses a whole document with quick-xml (end names checked), returning its root element.
fn parse_xml(bytes: &[u8]) -> Node {
    let mut reader = Reader::from_reader(bytes);
    let mut stack = vec![Node::default()];
    let mut buf = Vec::new();
    let name = |raw: &[u8]| String::from_utf8(raw.to_vec()).unwrap();
    loop {
        match reader.read_event_into(&mut buf).expect("well-formed XML") {
            Event::Start(e) => stack.push(Node { name: name(e.name().as_ref()), ..Node::default() }),
            Event::Empty(e) => stack.last_mut().unwrap().children.push(Node { name: name(e.name().as_ref()), ..Node::default() }),
            Event::End(_) => {
                let done = stack.pop().unwrap();
                stack.last_mut().expect("balanced").children.push(done);
            }
            Event::Text(t) => stack.last_mut().unwrap().text.push_str(&t.decode().unwrap()),
            Event::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref().unwrap() {
                    Some(c) => c.to_string(),
                    None => resolve_predefined_entity(&r.decode().unwrap()).expect("predefined entity").to_string(),
                };
                stack.last_mut().unwrap().text.push_str(&resolved);
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    let mut document = stack.pop().unwrap();
    assert!(stack.is_empty(), "unclosed elements");
    assert_eq!(document.children.len(), 1, "one root element");
    assert!(document.text.trim().is_empty(), "no text outside the root");
    document.children.pop().unwrap()
}

#[test]
fn teamcrop_rejects_events_without_own_entity() {
    let ev = event("1", "order.created", Value::Object(Map::new()), json!({}));
    let err = dialects().render_crm("teamcrop", Format::Json, &ev).unwrap_err();
    assert!(matches!(err, super::RenderError::NoEntity { .. }), "{err}");
}
