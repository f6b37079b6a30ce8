//! The window store on a real sled database in a temporary directory:
//! - `apply_500_messages_10k_chats_1h`: one poll batch of 500 chat messages spread over
//!   10,000 chats into 1h windows (one atomic sled batch each);
//! - `emit_1000_bundles_of_3`: the close timer's work for 1,000 closed bundles of 3 messages
//!   each: `due`, `begin_emit`, `remove` (filling the store is not measured).
//!
//! `cargo bench --bench window_store`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use hookd::window::calendar::Windows;
use hookd::window::store::{Incoming, WindowStore};

const HOUR_MS: i64 = 3_600_000;
const CHATS: usize = 10_000;
const HEADER: &[u8] = br#"{"chat":{"id":"10010001","full_name":"John Doe","url":"https://app.example.com/chat/10010001/messages/"}}"#;

fn message(i: usize) -> Vec<u8> {
    format!(
        r#"{{"id":"msg-{i}","direction":"sent","timestamp":"2021-02-24T16:25:29+0000","sender":{{"full_name":"John Doe","phone":"+972540000000"}},"text":"Message {i}: chào bạn, how are you? 👋","permalink":"https://app.example.com/permalink/77a28d55"}}"#
    )
    .into_bytes()
}

fn open() -> (tempfile::TempDir, WindowStore) {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = hookd::state::StateDb::open_default(dir.path()).unwrap();
    let store = WindowStore::open(&db).unwrap();
    (dir, store)
}

fn apply_batches(c: &mut Criterion) {
    let (_dir, store) = open();
    let chats: Vec<String> = (0..CHATS).map(|i| format!("chat-{i:05}")).collect();
    let bodies: Vec<Vec<u8>> = (0..500).map(message).collect();
    let mut next = 0usize;
    let mut group = c.benchmark_group("window_store");
    group.throughput(Throughput::Elements(500));
    group.bench_function("apply_500_messages_10k_chats_1h", |b| {
        b.iter(|| {
            let batch: Vec<Incoming<'_>> = (next..next + 500)
                .map(|i| Incoming {
                    sub_id: "sub_timelines",
                    chat_id: &chats[i * 7_919 % CHATS],
                    partition: (i % 8) as i32,
                    offset: (i / 8) as i64,
                    ts_ms: 1_614_124_800_000 + i as i64 * 100,
                    windows: Windows::utc(HOUR_MS),
                    grace_ms: 60_000,
                    message: &bodies[i % 500],
                    header: HEADER,
                })
                .collect();
            next += 500;
            store.apply(&batch).unwrap()
        })
    });
    group.finish();
}

fn emit_bundles(c: &mut Criterion) {
    let (_dir, store) = open();
    let chats: Vec<String> = (0..1_000).map(|i| format!("chat-{i:04}")).collect();
    let bodies: Vec<Vec<u8>> = (0..3).map(message).collect();
    let mut round = 0i64;
    let mut group = c.benchmark_group("window_store");
    group.throughput(Throughput::Elements(1_000));
    group.bench_function("emit_1000_bundles_of_3", |b| {
        b.iter_batched(
            || {
                round += 1;
                let batch: Vec<Incoming<'_>> = (0..3_000)
                    .map(|i| Incoming {
                        sub_id: "sub_timelines",
                        chat_id: &chats[i % 1_000],
                        partition: 0,
                        offset: round * 3_000 + i as i64,
                        ts_ms: round * HOUR_MS + (i / 1_000) as i64 * 1_000,
                        windows: Windows::utc(HOUR_MS),
                        grace_ms: 60_000,
                        message: &bodies[i / 1_000],
                        header: HEADER,
                    })
                    .collect();
                store.apply(&batch).unwrap();
            },
            |()| {
                let mut emitted = 0;
                loop {
                    let keys = store.due(i64::MAX, 256).unwrap();
                    if keys.is_empty() {
                        break emitted;
                    }
                    for key in keys {
                        let bundle = store.begin_emit(&key).unwrap().unwrap();
                        emitted += bundle.messages.len();
                        store.remove(&key).unwrap();
                    }
                }
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = apply_batches, emit_bundles
}
criterion_main!(benches);
