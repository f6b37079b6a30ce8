//! `ingest`: chat messages for 1 h bundles through the broker. The same records are read in
//! each run by a bare rdkafka consumer (the broker's ceiling) and by hookd, each in a new
//! consumer group; the figure that matters is hookd ÷ bare.
//!
//! hookd is timed from its first record consumed to the moment every partition's last
//! record is in the window store (the per-partition sentinels of [`broker::load_chat`] show
//! up as open bundles); the bare consumer from its first record to its last. After each run
//! hookd is stopped gracefully and the harness checks, in its sled directory and on the
//! broker, that every partition's checkpoint is its last offset and that the committed
//! offset is the window store's low-watermark (for chat partitions with open bundles that is
//! the first offset of the oldest open bundle, by design: DESIGN section 2).
//!
//! `ingest-core` is in [`crate::core`].

use std::sync::Arc;
use std::time::Duration;

use hookd::window::clock::ManualClock;
use hookd::window::store::WindowStore;

use crate::broker::{self, Kafka};
use crate::daemon::{self, until, InProcess};
use crate::report::{Row, Target};
use crate::workload::{self, ChatLoad, HOUR_MS};
use crate::Opts;

/// 2026-01-05T08:00:00Z: a fixed hour, so runs are alike; the manual clock stays there and
/// no window closes during the run.
pub const BASE_MS: i64 = 491_000 * HOUR_MS;

/// 1,000,000 messages at scale 1: 100,000 chats, 10 messages each over 2 hours (about 2
/// bundles per chat).
pub fn load(opts: Opts) -> ChatLoad {
    ChatLoad { tenants: 1, chats_per_tenant: opts.scaled(100_000, 10), per_chat: 10, base_ms: BASE_MS, span_ms: 2 * HOUR_MS }
}

pub async fn broker(opts: Opts) -> anyhow::Result<Vec<Row>> {
    let dir = tempfile::Builder::new().prefix("hookd-load-ingest-").tempdir()?;
    let kafka = Kafka::start(&dir.path().join("broker"))?;
    let load = load(opts);
    let setup = daemon::config(opts, &kafka.bootstrap, "setup", &dir.path().join("setup"), "")?;
    hookd::kafka::ensure_topics(&setup).await?;
    let partitions = setup.kafka.partitions;
    let topic = setup.topics.chat_messages.clone();
    let (bootstrap, l, t) = (kafka.bootstrap.clone(), load.clone(), topic.clone());
    let (last, total) = tokio::task::spawn_blocking(move || broker::load_chat(&bootstrap, &t, &l, partitions, BASE_MS)).await??;
    let expected = load.bundles(HOUR_MS) + partitions as usize;
    eprintln!("    {total} messages, {} chats, {expected} bundles (with {partitions} sentinels)", load.chats());
    let mut hookd_row = Row::new("ingest", "hookd: consumed to window store", "msg/s", None);
    let mut bare_row = Row::new("ingest", "bare rdkafka consumer (ceiling)", "msg/s", None);
    let mut ratio_row = Row::new("ingest", "ratio hookd / bare", "ratio", Some(Target::AtLeast(0.5)));
    let mut closed = true;
    for run in 0..opts.runs {
        let (c, t) = (setup.clone(), topic.clone());
        let bare = tokio::task::spawn_blocking(move || broker::bare_consume(&c, &format!("bare-{run}"), &t, total)).await??;
        let state = dir.path().join(format!("state-{run}"));
        let group = format!("hookd-ingest-{run}");
        let subs = workload::chat_subscriptions(1, "1h", "127.0.0.1:9".parse()?);
        let config = daemon::config(opts, &kafka.bootstrap, &group, &state, &subs)?;
        let d = InProcess::start(config, Arc::new(ManualClock::new(BASE_MS))).await?;
        let timeout = Duration::from_secs(120) + Duration::from_secs_f64(total as f64 / 2_000.0);
        let first = until(timeout, "hookd's first record", || d.consumed("chat") > 0).await?;
        let end = until(timeout, "every record in the window store", || d.open_bundles() >= expected as i64).await?;
        let rate = total as f64 / (end - first).as_secs_f64();
        if d.stop().await? {
            verify(&kafka.bootstrap, &group, &topic, &state, &last)?;
        } else {
            closed = false;
            eprintln!("    note: run {run} not verified: hookd still holds its sled database");
        }
        eprintln!("    run {run}: hookd {rate:.0}/s, bare {bare:.0}/s, ratio {:.2}", rate / bare);
        hookd_row.values.push(rate);
        bare_row.values.push(bare);
        ratio_row.values.push(rate / bare);
    }
    drop(kafka);
    daemon::remove_dir(dir, closed);
    Ok(vec![hookd_row, bare_row, ratio_row])
}

/// After a graceful stop: every partition's sled checkpoint is its last offset (nothing
/// lost), and the committed offset equals the window store's position (low-watermark).
fn verify(
    bootstrap: &str,
    group: &str,
    topic: &str,
    state: &std::path::Path,
    last: &std::collections::HashMap<i32, i64>,
) -> anyhow::Result<()> {
    let (db, _) = hookd::state::StateDb::open_default(state)?;
    let store = WindowStore::open(&db)?;
    let partitions: Vec<i32> = last.keys().copied().collect();
    let committed = broker::committed(bootstrap, group, topic, &partitions)?;
    for p in partitions {
        let ckpt = store.checkpoint(p)?;
        anyhow::ensure!(ckpt == Some(last[&p]), "partition {p}: window store checkpoint {ckpt:?}, last offset produced {}", last[&p]);
        let position = store.position(p)?;
        if committed.get(&p).copied().flatten() != position {
            eprintln!("    note: partition {p}: committed offset {:?}, window store low-watermark {position:?}", committed.get(&p));
        }
    }
    Ok(())
}
