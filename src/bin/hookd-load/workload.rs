//! The generated input: chat messages shaped like the `chat.messages` sample of DESIGN
//! section 3 (itself the TimelinesAI seed's), CRM events shaped like the `crm.events` sample,
//! and the subscriptions that receive them.

use std::fmt::Write as _;

pub const HOUR_MS: i64 = 3_600_000;

/// Message texts: plain, Unicode and emoji, and HTML the summary must escape.
const TEXTS: [&str; 4] = [
    "lorem ipsum dolor sit amet, consectetur adipiscing elit",
    "Chào bạn! Đơn hàng của bạn đã được giao 👋🏽",
    "Can we move the call to 3pm? <b>urgent</b> & thanks",
    "שלום, מה שלומך? 你好",
];

/// Chat messages of `chats` chats per tenant, `per_chat` messages each, timestamps spread
/// over `span_ms` from `base_ms`, produced round by round (every chat's 1st message, then
/// every chat's 2nd, ...) as a busy chat product would interleave them.
#[derive(Clone, Debug)]
pub struct ChatLoad {
    pub tenants: usize,
    pub chats_per_tenant: usize,
    pub per_chat: usize,
    pub base_ms: i64,
    pub span_ms: i64,
}

impl ChatLoad {
    pub fn total(&self) -> usize {
        self.tenants * self.chats_per_tenant * self.per_chat
    }

    pub fn chats(&self) -> usize {
        self.tenants * self.chats_per_tenant
    }

    pub fn tenant(t: usize) -> String {
        format!("ws-{}", 10_010 + t)
    }

    /// Timestamp of message `k` of chat `c`: round `k` in its slice of the span, each chat at
    /// its own spot in the slice.
    fn ts_ms(&self, c: usize, k: usize) -> i64 {
        let step = (self.span_ms / self.per_chat.max(1) as i64).max(1);
        self.base_ms + k as i64 * step + (c as i64 * 7_919) % step
    }

    /// Distinct (chat, 1 h window) pairs: the bundles these messages open per subscription.
    pub fn bundles(&self, size_ms: i64) -> usize {
        (0..self.chats())
            .map(|c| {
                let mut w: Vec<i64> = (0..self.per_chat).map(|k| self.ts_ms(c, k).div_euclid(size_ms)).collect();
                w.dedup();
                w.len()
            })
            .sum()
    }

    /// Every message in production order: (key = chat id, value).
    pub fn records(&self) -> impl Iterator<Item = (String, Vec<u8>)> + '_ {
        (0..self.per_chat).flat_map(move |k| (0..self.chats()).map(move |c| self.message(c, k)))
    }

    /// Message `k` of chat `c`.
    pub fn message(&self, c: usize, k: usize) -> (String, Vec<u8>) {
        let chat = format!("{}", 10_000_000 + c);
        let tenant = Self::tenant(c / self.chats_per_tenant.max(1));
        let value = chat_message(&format!("m{c}-{k}"), &tenant, &chat, self.ts_ms(c, k), k, TEXTS[(c + k) % TEXTS.len()]);
        (chat, value)
    }
}

/// One `chat.messages` value.
pub fn chat_message(id: &str, tenant: &str, chat: &str, ts_ms: i64, k: usize, text: &str) -> Vec<u8> {
    let ts = chrono::DateTime::from_timestamp_millis(ts_ms).expect("timestamp in range").format("%Y-%m-%dT%H:%M:%S+0000");
    let direction = if k % 2 == 0 { "sent" } else { "received" };
    let (from, to) = if k % 2 == 0 { ("Amnon Haha", "John Doe") } else { ("John Doe", "Amnon Haha") };
    format!(
        r#"{{"id":"{id}","tenant":"{tenant}","direction":"{direction}","timestamp":"{ts}","account":{{"full_name":"Amnon Haha","email":"amnon@example.com","phone":"+972500000000"}},"chat":{{"id":"{chat}","full_name":"John Doe {chat}","responsible_name":"Amnon","responsible_email":"amnon@example.com","url":"https://app.example.com/chat/{chat}/messages/","is_new_chat":{new},"is_group":false,"phone":"+9725{chat}"}},"sender":{{"full_name":"{from}","phone":"+972540000000"}},"recipient":{{"full_name":"{to}","phone":"+972550000000"}},"text":"{text}","attachments":[],"permalink":"https://app.example.com/permalink/{id}"}}"#,
        new = k == 0
    )
    .into_bytes()
}

/// The built-in dialects, in turn, so every body shape is rendered and signed.
const DIALECTS: [&str; 5] = ["antcrm", "beeiq", "teamcrop", "doopage", "standard"];
const EVENT_TYPES: [&str; 4] = ["contact.created", "contact.updated", "order.created", "order.updated"];
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// CRM event `i` for tenant `t{tenant}`; `stamp_us` (the producer's clock) goes inside the
/// entity object, which every dialect's body carries.
pub fn crm_event(i: usize, tenant: usize, stamp_us: u64) -> Vec<u8> {
    let kind = EVENT_TYPES[i % EVENT_TYPES.len()];
    let entity = if kind.starts_with("order") {
        format!(
            r#""order":{{"id":"ORD-{i}","code":"SO{i:08}","status":"confirmed","total":1250000,"currency":"VND","customer":{{"name":"Tran Thuan","phone":"+84901234567"}},"items":[{{"sku":"SKU-1","qty":2,"price":500000}},{{"sku":"SKU-2","qty":1,"price":250000}}],"load_t_us":{stamp_us}}}"#
        )
    } else {
        format!(
            r#""contact":{{"name":"Tran","lastname":"Thuan","contactId":"PID-{i}","email":"tran.thuan@example.com","phones":["+84901234567"],"load_t_us":{stamp_us}}}"#
        )
    };
    format!(
        r#"{{"id":"evt-{i}","tenant":"t{tenant}","type":"{kind}","occurred_at":1618118040123,"actor":{{"id":"57f2399cd7351a3e75f8aa1a","email":"tran.le@example.com","firstname":"Tran","lastname":"Le"}},"data":{{{entity}}},"changes":{{"old":{{"name":"Lead"}},"new":{{"name":"Contacted"}}}},"content":"Tran Le changed {kind} {i}","link":"https://crm.example.com/contacts/PID-{i}"}}"#
    )
    .into_bytes()
}

/// `n` CRM subscriptions, one per tenant `t0`..`t{n-1}`, every event, dialects in turn,
/// signed, each to its own path of the receiver.
pub fn crm_subscriptions(n: usize, receiver: std::net::SocketAddr) -> String {
    let mut s = String::new();
    for i in 0..n {
        let _ = write!(
            s,
            "\n[[subscription]]\nid = \"crm-{i:03}\"\ntenant = \"t{i}\"\nurl = \"http://{receiver}/crm/{i}\"\ndialect = \"{}\"\nsecret = \"{SECRET}\"\n",
            DIALECTS[i % DIALECTS.len()]
        );
    }
    s
}

/// One chat subscription per tenant of `load`, bundling into `aggregation` windows.
pub fn chat_subscriptions(tenants: usize, aggregation: &str, receiver: std::net::SocketAddr) -> String {
    let mut s = String::new();
    for t in 0..tenants {
        let _ = write!(
            s,
            "\n[[subscription]]\nid = \"chat-{t:03}\"\ntenant = \"{}\"\nsource = \"chat\"\ndialect = \"timelines\"\naggregation = \"{aggregation}\"\nurl = \"http://{receiver}/chat/{t}\"\nsecret = \"{SECRET}\"\n",
            ChatLoad::tenant(t)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_decode_and_bundles_count() {
        let load = ChatLoad { tenants: 2, chats_per_tenant: 50, per_chat: 4, base_ms: 10 * HOUR_MS, span_ms: 2 * HOUR_MS };
        let all: Vec<_> = load.records().collect();
        assert_eq!(all.len(), load.total());
        for (_, v) in &all {
            hookd::ingest::chat::ChatMessage::decode(v, 1 << 20).unwrap();
        }
        assert_eq!(load.bundles(HOUR_MS), 200, "2 windows per chat");
        for i in 0..8 {
            hookd::ingest::event::CrmEvent::decode(&crm_event(i, 3, 77), 1 << 20).unwrap();
        }
    }
}
