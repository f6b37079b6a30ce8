//! The chat message decoder (`chat.messages` values): an error or a message, never a panic.
#![no_main]

use hookd::ingest::chat::ChatMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ChatMessage::decode(data, 1 << 20);
});
