//! The CRM event decoder (`crm.events` values): any bytes give an event or an error, never
//! a panic; a decoded event renders in every built-in dialect without panicking.
#![no_main]

use std::sync::OnceLock;

use hookd::ingest::event::CrmEvent;
use hookd::render::Dialects;
use hookd::route::subscription::Format;
use libfuzzer_sys::fuzz_target;

fn dialects() -> &'static Dialects {
    static D: OnceLock<Dialects> = OnceLock::new();
    D.get_or_init(|| Dialects::new(&Default::default()).expect("built-in dialects"))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = CrmEvent::decode(data, 1 << 20) {
        for dialect in ["antcrm", "beeiq", "teamcrop", "doopage", "standard"] {
            let _ = dialects().render_crm(dialect, Format::Json, &event);
        }
        let _ = dialects().render_crm("teamcrop", Format::Xml, &event);
    }
});
