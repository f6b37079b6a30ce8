//! The subscription decoder (`hookd.subscriptions` records): the first byte splits key from
//! value (0: no key; else the key is the next that many bytes), the rest is the value.
#![no_main]

use std::sync::OnceLock;

use hookd::render::Dialects;
use hookd::route::reader::decode;
use libfuzzer_sys::fuzz_target;

fn dialects() -> &'static Dialects {
    static D: OnceLock<Dialects> = OnceLock::new();
    D.get_or_init(|| Dialects::new(&Default::default()).expect("built-in dialects"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else { return };
    let n = (n as usize).min(rest.len());
    let (key, value) = rest.split_at(n);
    let key = (n > 0).then_some(key);
    let _ = decode(key, Some(value), dialects());
    let _ = decode(key, None, dialects());
});
