//! Emission: a closed bundle rendered as the bodies that carry it, in parts when it is large.
//!
//! A busy group chat can gather thousands of messages in a 24 h window, more than one Kafka
//! record holds. At emission the bundle's messages (in time order) are cut into consecutive
//! parts of at most `chat.max_bundle_bytes` of body and `chat.max_bundle_messages` messages;
//! each part is a whole TimelinesAI bundle of its own messages (first and last timestamps
//! and summary of those), and none is dropped. The cut is greedy from the first message: a
//! part takes as many messages as fit, found with a few trial renders. A message that does not fit in a part even alone is
//! not delivered but dead-lettered ([`EmitError::MessageTooLarge`]); the parts around it go on.
//!
//! The cut depends only on the stored bundle (messages, header), the summary template and
//! the limits, so the same bundle always gives the same parts. The window store keeps the
//! bundle until every part is acknowledged; a crash between two parts emits all of them
//! again, under the same ids.
//!
//! **Ids** ([`part_id`]): `webhook-id` of a part is derived from what it holds: the
//! subscription, the chat, the part number and the bytes of each of its messages. A replay of
//! the same bundle (state wiped, records read again) gets the same ids; a bundle rebuilt with
//! other content (a late message joining an already delivered window after the state was
//! lost) gets new ones, so receivers that drop duplicates by id do not drop it.

use std::ops::Range;

use chrono_tz::Tz;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::store::Bundle;
use crate::config::ChatConfig;
use crate::deliver::record::webhook_id;
use crate::render::timelines::{self, BundleHeader, Summary};
use crate::render::RenderError;

/// The size limits of one part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest body, in bytes.
    pub max_bytes: usize,
    /// Most messages; `usize::MAX` for no limit.
    pub max_messages: usize,
}

impl Limits {
    pub fn new(chat: &ChatConfig) -> Self {
        let max_messages = if chat.max_bundle_messages == 0 { usize::MAX } else { chat.max_bundle_messages };
        Self { max_bytes: chat.max_bundle_bytes, max_messages }
    }
}

/// Why a bundle, or one message of it, is dead-lettered instead of delivered.
#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    #[error("bundle render failed: bundle header: {0}")]
    Header(serde_json::Error),
    #[error("bundle render failed: bundle message {index}: {source}")]
    Message { index: usize, source: serde_json::Error },
    #[error("bundle render failed: {0}")]
    Render(#[from] RenderError),
    #[error("too_large: this message alone renders to a {size}-byte bundle, over chat.max_bundle_bytes ({limit})")]
    MessageTooLarge { size: usize, limit: usize },
}

/// One piece of an emitted bundle; pieces come in time order.
#[derive(Debug)]
pub enum Piece {
    /// A part to deliver.
    Part {
        /// Counts from 1 over the parts of the bundle.
        number: usize,
        /// Its `webhook-id` ([`part_id`]).
        id: String,
        body: Vec<u8>,
        /// Which of the bundle's messages it holds.
        messages: Range<usize>,
    },
    /// Message `index` of the bundle, which does not fit in a part of its own.
    Oversized { index: usize, error: EmitError },
}

/// Renders `bundle` as its parts (see the module docs), the summaries' times on the clock of
/// `zone`. An error means the bundle as a whole cannot be rendered (unreadable header or
/// message, a template failing on the data).
pub fn render(summary: &Summary, bundle: &Bundle, zone: Tz, limits: Limits) -> Result<Vec<Piece>, EmitError> {
    let header: BundleHeader = serde_json::from_slice(&bundle.header).map_err(EmitError::Header)?;
    let messages = bundle
        .messages
        .iter()
        .enumerate()
        .map(|(index, m)| serde_json::from_slice(m).map_err(|source| EmitError::Message { index, source }))
        .collect::<Result<Vec<Value>, _>>()?;
    let body = |r: Range<usize>| -> Result<Vec<u8>, EmitError> {
        let text = summary.render(&messages[r.clone()], &header, zone)?;
        Ok(timelines::bundle_payload(&header, &messages[r], &text))
    };
    let mut number = 0;
    let pieces = cut(messages.len(), limits, body)?.into_iter().map(|c| match c {
        Cut::Fits(range, body) => {
            number += 1;
            let id = part_id(&bundle.key.sub_id, &bundle.key.chat_id, number, &bundle.messages[range.clone()]);
            Piece::Part { number, id, body, messages: range }
        }
        Cut::Over(index, size) => Piece::Oversized { index, error: EmitError::MessageTooLarge { size, limit: limits.max_bytes } },
    });
    Ok(pieces.collect())
}

/// `webhook-id` of part `number` of a bundle of `chat` for `sub_id` holding `messages` (the
/// stored message bytes): a hash of all of them, lengths included, so no two contents meet.
pub fn part_id(sub_id: &str, chat_id: &str, number: usize, messages: &[Vec<u8>]) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(chat_id.as_bytes());
    field(&(number as u64).to_be_bytes());
    for m in messages {
        field(m);
    }
    webhook_id(sub_id, &format!("bundle:{}", hex::encode(h.finalize())))
}

/// A cut of the bundle's messages: a part and its body, or one message too large alone.
#[derive(Debug, PartialEq, Eq)]
enum Cut {
    Fits(Range<usize>, Vec<u8>),
    Over(usize, usize),
}

/// Cuts `n` messages into consecutive parts within `limits`, rendering candidates with
/// `body`: each part is the longest run from its first message that fits ([`longest_part`]).
/// No messages at all still make one (empty) part.
fn cut<F>(n: usize, limits: Limits, mut body: F) -> Result<Vec<Cut>, EmitError>
where
    F: FnMut(Range<usize>) -> Result<Vec<u8>, EmitError>,
{
    if n == 0 {
        return Ok(vec![Cut::Fits(0..0, body(0..0)?)]);
    }
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let cut = longest_part(start, (n - start).min(limits.max_messages.max(1)), limits.max_bytes, &mut body)?;
        start += match &cut {
            Cut::Fits(range, _) => range.len(),
            Cut::Over(..) => 1,
        };
        out.push(cut);
    }
    Ok(out)
}

/// The longest run of at most `len` messages from `start` whose body is at most `max_bytes`,
/// or [`Cut::Over`] when not even one fits. A body grows with its messages, so the longest run
/// lies between the longest known to fit and the shortest known not to; the next try is the
/// length at which the nearest measured body, growing linearly, would reach the cap (a body
/// is about linear in its messages: two or three renders), then halfway (at most a logarithm).
fn longest_part<F>(start: usize, len: usize, max_bytes: usize, body: &mut F) -> Result<Cut, EmitError>
where
    F: FnMut(Range<usize>) -> Result<Vec<u8>, EmitError>,
{
    let all = body(start..start + len)?;
    if all.len() <= max_bytes {
        return Ok(Cut::Fits(start..start + len, all));
    }
    // `fits` messages fit (in `fits_body`); `over` do not (in `over_size` bytes).
    let (mut fits, mut fits_body, mut over, mut over_size) = (0, Vec::new(), len, all.len());
    for step in 0.. {
        if over - fits <= 1 {
            break;
        }
        let linear = match fits {
            0 => over.saturating_mul(max_bytes) / over_size,
            _ => fits.saturating_mul(max_bytes) / fits_body.len().max(1),
        };
        let next = if step < 3 { linear.clamp(fits + 1, over - 1) } else { fits + (over - fits) / 2 };
        let b = body(start..start + next)?;
        if b.len() <= max_bytes {
            (fits, fits_body) = (next, b);
        } else {
            (over, over_size) = (next, b.len());
        }
    }
    Ok(if fits == 0 { Cut::Over(start, over_size) } else { Cut::Fits(start..start + fits, fits_body) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::chat::ChatMessage;
    use crate::window::store::BundleKey;
    use serde_json::json;

    fn limits(max_bytes: usize, max_messages: usize) -> Limits {
        Limits { max_bytes, max_messages }
    }

    /// A body of 10 bytes plus each message's size, the sizes given.
    fn sized(sizes: &[usize]) -> impl FnMut(Range<usize>) -> Result<Vec<u8>, EmitError> + '_ {
        |r: Range<usize>| Ok(vec![b'x'; 10 + sizes[r].iter().sum::<usize>()])
    }

    fn ranges(cuts: &[Cut]) -> Vec<Result<Range<usize>, usize>> {
        cuts.iter()
            .map(|c| match c {
                Cut::Fits(r, _) => Ok(r.clone()),
                Cut::Over(i, _) => Err(*i),
            })
            .collect()
    }

    #[test]
    fn cut_is_greedy_consecutive_and_within_both_limits() {
        let sizes = [30; 10];
        let cuts = cut(10, limits(100, usize::MAX), sized(&sizes)).unwrap();
        assert_eq!(ranges(&cuts), [Ok(0..3), Ok(3..6), Ok(6..9), Ok(9..10)], "3 x 30 + 10 fits in 100, 4 do not");
        assert!(cuts.iter().all(|c| matches!(c, Cut::Fits(_, b) if b.len() <= 100)));
        let cuts = cut(10, limits(1000, 4), sized(&sizes)).unwrap();
        assert_eq!(ranges(&cuts), [Ok(0..4), Ok(4..8), Ok(8..10)], "the message cap");
        assert_eq!(ranges(&cut(10, limits(1000, usize::MAX), sized(&sizes)).unwrap()), [Ok(0..10)], "small: one part");
        let uneven = [5, 80, 5, 5, 5, 5, 70, 1];
        assert_eq!(ranges(&cut(8, limits(100, usize::MAX), sized(&uneven)).unwrap()), [Ok(0..3), Ok(3..8)], "the longest runs that fit");
        let mut renders = 0;
        let counted = |r: Range<usize>| {
            renders += 1;
            Ok(vec![b'x'; 1_000 + 700 * r.len()])
        };
        let cuts = cut(1_500, limits(512 * 1024, usize::MAX), counted).unwrap();
        assert_eq!(ranges(&cuts)[0], Ok(0..747), "(524,288 - 1,000) / 700 messages");
        assert!(renders <= 4 * cuts.len(), "{renders} renders for {} parts", cuts.len());
    }

    #[test]
    fn a_message_too_large_alone_is_set_apart_and_the_rest_goes_on() {
        let sizes = [20, 20, 500, 20];
        let cuts = cut(4, limits(100, usize::MAX), sized(&sizes)).unwrap();
        assert_eq!(ranges(&cuts), [Ok(0..2), Err(2), Ok(3..4)]);
        assert_eq!(cuts[1], Cut::Over(2, 510));
        assert_eq!(ranges(&cut(0, limits(100, 1), sized(&[])).unwrap()), [Ok(0..0)], "an empty bundle is one empty part");
    }

    fn stored(i: usize, text: &str) -> (ChatMessage<'static>, Vec<u8>) {
        let record = json!({"id": format!("m{i}"), "tenant": "t", "direction": "sent", "timestamp": 1_614_183_929_000_i64 + i as i64 * 1000,
            "account": {"full_name": "A"}, "chat": {"id": "c", "url": "https://app.example.com/c/"},
            "sender": {"full_name": "S <s>"}, "recipient": {"full_name": "R"}, "text": text});
        let m = ChatMessage::decode(&serde_json::to_vec(&record).unwrap(), 1 << 20).unwrap().into_owned();
        let bytes = timelines::message_bytes(&m);
        (m, bytes)
    }

    fn bundle(texts: &[String]) -> Bundle {
        let stored: Vec<_> = texts.iter().enumerate().map(|(i, t)| stored(i, t)).collect();
        Bundle {
            key: BundleKey { sub_id: "s".into(), chat_id: "c".into(), start_ms: 0 },
            end_ms: 0,
            header: timelines::header_bytes(&stored[0].0),
            messages: stored.iter().map(|(_, b)| b.clone()).collect(),
            origins: (0..texts.len()).map(|i| (0, i as i64)).collect(),
            first_ts_ms: 0,
            last_ts_ms: 0,
            late: false,
            partition: 0,
            first_offset: 0,
        }
    }

    /// Parts of a real bundle: each a whole bundle of its own messages, under the cap, in
    /// order, with its own summary; every message in exactly one; distinct, stable ids.
    #[test]
    fn parts_are_whole_bundles_with_their_own_summary() {
        let texts: Vec<String> = (0..300).map(|i| format!("message {i} <b>&</b> {}", "x".repeat(i % 50))).collect();
        let b = bundle(&texts);
        let summary = Summary::new(None).unwrap();
        let pieces = render(&summary, &b, Tz::UTC, limits(16 * 1024, usize::MAX)).unwrap();
        assert!(pieces.len() > 3, "{} parts", pieces.len());
        let mut seen = Vec::new();
        let mut ids = Vec::new();
        for (k, p) in pieces.iter().enumerate() {
            let Piece::Part { number, id, body, messages } = p else { panic!("no message is too large") };
            assert!(body.len() <= 16 * 1024 && *number == k + 1 && !ids.contains(id), "part {k}: under the cap, numbered, own id");
            ids.push(id.clone());
            let v: Value = serde_json::from_slice(body).unwrap();
            let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(keys, ["whatsapp_account", "chat", "messages", "first_message_timestamp", "last_message_timestamp", "aggregation"]);
            let ms = v["messages"].as_array().unwrap();
            assert_eq!(
                (ms.len(), &v["first_message_timestamp"], &v["last_message_timestamp"]),
                (messages.len(), &ms[0]["timestamp"], &ms[ms.len() - 1]["timestamp"])
            );
            let summary = v["aggregation"].as_str().unwrap();
            assert_eq!(summary.matches("from S &lt;s&gt; on ").count(), ms.len(), "one line per message of this part");
            assert!(summary.contains(&format!(": message {} &lt;b&gt;&amp;&lt;/b&gt;", messages.start)), "escaped, its own first message");
            seen.extend(ms.iter().map(|m| m["message_id"].as_str().unwrap().to_string()));
            assert_eq!(seen.len(), messages.end);
        }
        assert_eq!(seen, (0..300).map(|i| format!("m{i}")).collect::<Vec<_>>(), "all, once, in order");
        assert_eq!(part_ids(&render(&summary, &b, Tz::UTC, limits(16 * 1024, usize::MAX)).unwrap()), ids, "the same bundle, the same ids");
    }

    fn part_ids(pieces: &[Piece]) -> Vec<String> {
        pieces.iter().filter_map(|p| if let Piece::Part { id, .. } = p { Some(id.clone()) } else { None }).collect()
    }

    /// The crash story: a process that dies between part k and part k+1 leaves the bundle
    /// stored and marked as emitting; the next start finds it due again and renders the same
    /// parts under the same ids.
    #[test]
    fn a_bundle_emitted_again_after_a_crash_gets_the_same_parts_and_ids() {
        use crate::window::store::{Incoming, WindowStore};
        let dir = tempfile::tempdir().unwrap();
        let summary = Summary::new(None).unwrap();
        let texts: Vec<String> = (0..40).map(|i| format!("text {i} {}", "z".repeat(200))).collect();
        let stored: Vec<_> = texts.iter().enumerate().map(|(i, t)| stored(i, t)).collect();
        let header = timelines::header_bytes(&stored[0].0);
        let first = {
            let (db, _) = crate::state::StateDb::open_default(dir.path()).unwrap();
            let store = WindowStore::open(&db).unwrap();
            let batch: Vec<Incoming<'_>> = stored
                .iter()
                .enumerate()
                .map(|(i, (m, bytes))| Incoming {
                    sub_id: "s",
                    chat_id: "c",
                    partition: 0,
                    offset: i as i64,
                    ts_ms: m.timestamp_ms(),
                    windows: crate::window::calendar::Windows::utc(3_600_000),
                    grace_ms: 0,
                    message: bytes,
                    header: &header,
                })
                .collect();
            store.apply(&batch).unwrap();
            let key = store.due(i64::MAX, 10).unwrap().remove(0);
            let pieces = render(&summary, &store.begin_emit(&key).unwrap().unwrap(), Tz::UTC, limits(4_096, usize::MAX)).unwrap();
            db.flush_blocking().unwrap();
            part_ids(&pieces) // part 1 produced, then the process dies: no `remove`
        };
        assert!(first.len() > 2, "{} parts", first.len());
        let (db, _) = crate::state::StateDb::open_default(dir.path()).unwrap();
        let store = WindowStore::open(&db).unwrap();
        let key = store.due(i64::MAX, 10).unwrap().remove(0);
        let again = render(&summary, &store.begin_emit(&key).unwrap().unwrap(), Tz::UTC, limits(4_096, usize::MAX)).unwrap();
        assert_eq!(part_ids(&again), first);
    }

    #[test]
    fn ids_follow_content_part_and_chat() {
        let b = bundle(&["a".to_string(), "b".to_string()]);
        let id = part_id("s", "c", 1, &b.messages);
        assert_eq!(id, part_id("s", "c", 1, &b.messages.clone()));
        assert!(id.starts_with("msg_"));
        let late = bundle(&["a".to_string(), "b".to_string(), "late".to_string()]);
        for other in [
            part_id("s", "c", 1, &late.messages),
            part_id("s", "c", 2, &b.messages),
            part_id("s", "c2", 1, &b.messages),
            part_id("s2", "c", 1, &b.messages),
            part_id("s", "c", 1, &b.messages[..1]),
            part_id("s", "c", 1, &[[b.messages[0].clone(), b.messages[1].clone()].concat()]),
        ] {
            assert_ne!(id, other);
        }
    }

    #[test]
    fn a_message_over_the_cap_alone_is_dead_lettered_with_the_reason() {
        let texts = vec!["short".to_string(), "y".repeat(8_000), "short too".to_string()];
        let b = bundle(&texts);
        let pieces = render(&Summary::new(None).unwrap(), &b, Tz::UTC, limits(4_096, usize::MAX)).unwrap();
        assert!(matches!(&pieces[0], Piece::Part { number: 1, messages, .. } if *messages == (0..1)));
        let Piece::Oversized { index: 1, error } = &pieces[1] else { panic!("{pieces:?}") };
        assert!(error.to_string().starts_with("too_large: this message alone renders to a "), "{error}");
        assert!(matches!(&pieces[2], Piece::Part { number: 2, messages, .. } if *messages == (2..3)));
    }
}
