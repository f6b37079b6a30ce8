//! Custom dialect templates: the input up to the first NUL byte is the body template, the
//! rest a CRM event. Building the dialect may fail (a clear error); rendering a valid event
//! with any template gives a body or an error, never a panic or a hang.
#![no_main]

use std::collections::BTreeMap;

use hookd::ingest::event::CrmEvent;
use hookd::render::{DialectConfig, Dialects};
use hookd::route::subscription::Format;
use libfuzzer_sys::fuzz_target;

const EVENT: &[u8] = br#"{"id":"evt_1","tenant":"1260","type":"contact.created","occurred_at":1618118040123,"data":{"contact":{"name":"Tran","phones":["+84901234567"]}}}"#;

fuzz_target!(|data: &[u8]| {
    let (template, event) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, EVENT),
    };
    let Ok(template) = std::str::from_utf8(template) else { return };
    let event = CrmEvent::decode(event, 1 << 20).or_else(|_| CrmEvent::decode(EVENT, 1 << 20)).expect("the sample decodes");
    for format in [Format::Json, Format::Xml] {
        let config = DialectConfig {
            events: BTreeMap::new(),
            body: template.to_string(),
            format,
            content_type: None,
            headers: BTreeMap::from([("X-Event".to_string(), template.to_string())]),
            success: Default::default(),
        };
        let Ok(dialects) = Dialects::new(&BTreeMap::from([("fuzz".to_string(), config)])) else { continue };
        let _ = dialects.render_crm("fuzz", format, &event);
    }
});
