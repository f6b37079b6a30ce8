//! The delivery record decoder (`hookd.deliveries` / `hookd.retry` values): never a panic,
//! and a decoded record encodes and decodes back to itself.
#![no_main]

use hookd::deliver::record::DeliveryRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = DeliveryRecord::decode(data) {
        let again = DeliveryRecord::decode(&record.encode()).expect("an encoded record decodes");
        assert_eq!(again.encode(), record.encode(), "encode/decode round trip");
    }
});
