//! `ingest-core`: the messages of `ingest` fed to hookd's chat pipeline in this process,
//! without a broker, so the daemon's own cost per message is visible.
//!
//! `hookd::ingest::bundles::process` takes an rdkafka `BorrowedMessage`, which only a consumer
//! can make, so this module repeats its steps for aggregating subscriptions with the same
//! public pieces, in the same order: `ChatMessage::decode`, the attachment check, the
//! registry lookup (`Registry::index` + `Index::matching` per message), the window store's
//! checkpoint read per message, the bundle parts (`stage::Parts`, the daemon's own), then
//! `stage::apply_parts` per `chat.max_batch` messages and the gauge read after it, and, every
//! `chat.close_interval_ms`, the due-index scan and a sled flush (the close tick). Input
//! generation is outside the timed part. Keep it in step with `ingest/bundles.rs`.

use std::time::{Duration, Instant};

use hookd::ingest::bundles::{apply_parts, Parts, Pending};
use hookd::ingest::chat::ChatMessage;
use hookd::route::subscription::Source;
use hookd::route::Registry;
use hookd::state::StateDb;
use hookd::window::calendar::Windows;
use hookd::window::store::WindowStore;

use crate::report::{Row, Target};
use crate::{daemon, ingest, workload, Opts};

/// Where the time went, summed over a run.
#[derive(Default)]
struct Phases {
    route: Duration,
    apply: Duration,
    tick: Duration,
    messages: u64,
}

const PARTITIONS: u64 = 6;
const CHUNK: usize = 20_000;

pub fn run(opts: Opts) -> anyhow::Result<Vec<Row>> {
    let load = ingest::load(opts);
    let subs = workload::chat_subscriptions(1, "1h", "127.0.0.1:9".parse()?);
    let config = daemon::config(opts, "127.0.0.1:9", "core", std::path::Path::new("unused"), &subs)?;
    let mut rate = Row::new("ingest-core", "decode, route, window, sled batch", "msg/s", Some(Target::AtLeast(300_000.0)));
    let mut per_msg = Row::new("ingest-core", "per message, all steps", "us", None);
    let mut route = Row::new("ingest-core", "  of which decode, route, serialise", "us", None);
    let mut apply = Row::new("ingest-core", "  of which sled batch apply", "us", None);
    let mut tick = Row::new("ingest-core", "  of which close tick (due scan, flush)", "us", None);
    for run in 0..opts.runs {
        let dir = tempfile::Builder::new().prefix("hookd-load-core-").tempdir()?;
        let p = one_run(&load, &config, dir.path())?;
        let total = p.route + p.apply + p.tick;
        let us = |d: Duration| d.as_secs_f64() * 1e6 / p.messages as f64;
        eprintln!(
            "    run {run}: {:.0} msg/s ({:.2} us/msg: route {:.2}, apply {:.2}, tick {:.2})",
            p.messages as f64 / total.as_secs_f64(),
            us(total),
            us(p.route),
            us(p.apply),
            us(p.tick)
        );
        rate.values.push(p.messages as f64 / total.as_secs_f64());
        per_msg.values.push(us(total));
        route.values.push(us(p.route));
        apply.values.push(us(p.apply));
        tick.values.push(us(p.tick));
    }
    Ok(vec![rate, per_msg, route, apply, tick])
}

fn one_run(load: &workload::ChatLoad, config: &hookd::config::Config, dir: &std::path::Path) -> anyhow::Result<Phases> {
    let (db, _) = StateDb::open(dir, config.state.cache_mb << 20)?;
    let store = WindowStore::open(&db)?;
    let registry = Registry::new(&config.subscription);
    let (max_bytes, max_batch) = (config.ingest.max_record_bytes, config.chat.max_batch);
    let close_every = Duration::from_millis(config.chat.close_interval_ms);
    let grace_ms = config.chat.grace_ms as i64;
    let mut offsets = [0i64; PARTITIONS as usize];
    let mut pending: Vec<Pending> = Vec::with_capacity(max_batch);
    let mut phases = Phases::default();
    let mut since_tick = Duration::ZERO;
    let mut records = load.records();
    loop {
        let chunk: Vec<(String, Vec<u8>)> = records.by_ref().take(CHUNK).collect();
        if chunk.is_empty() {
            break;
        }
        for (key, value) in &chunk {
            let partition = (fnv(key.as_bytes()) % PARTITIONS) as i32;
            let offset = offsets[partition as usize];
            offsets[partition as usize] += 1;
            let t = Instant::now();
            route_one(&registry, &store, value, max_bytes, partition, offset, &mut pending)?;
            let routed = t.elapsed();
            phases.route += routed;
            since_tick += routed;
            phases.messages += 1;
            if pending.len() >= max_batch {
                let t = Instant::now();
                apply(&store, &pending, grace_ms)?;
                pending.clear();
                phases.apply += t.elapsed();
                since_tick += t.elapsed();
            }
            if since_tick >= close_every {
                let t = Instant::now();
                store.due(ingest::BASE_MS, 256)?;
                db.flush_blocking()?;
                phases.tick += t.elapsed();
                since_tick = Duration::ZERO;
            }
        }
    }
    let t = Instant::now();
    apply(&store, &pending, grace_ms)?;
    phases.apply += t.elapsed();
    let t = Instant::now();
    db.flush_blocking()?;
    phases.tick += t.elapsed();
    anyhow::ensure!(
        store.open_bundles() == load.bundles(workload::HOUR_MS),
        "ingest-core: {} bundles, expected {}",
        store.open_bundles(),
        load.bundles(workload::HOUR_MS)
    );
    Ok(phases)
}

/// What `ingest::bundles::process` does for one record, for aggregating subscriptions.
fn route_one(
    registry: &Registry,
    store: &WindowStore,
    value: &[u8],
    max_bytes: usize,
    partition: i32,
    offset: i64,
    pending: &mut Vec<Pending>,
) -> anyhow::Result<()> {
    let m = ChatMessage::decode(value, max_bytes)?;
    if m.has_attachments() {
        return Ok(());
    }
    let event_type = format!("message.{}", m.direction);
    let index = registry.index();
    let applied = store.checkpoint(partition)?;
    let mut parts = Parts::new(&m, partition, offset);
    for sub in index.matching(&m.tenant, Source::Chat, &event_type) {
        if let Some(windows) = Windows::of(sub) {
            if applied.is_none_or(|c| offset > c) {
                parts.push(&sub.id, windows);
            }
        }
    }
    pending.append(&mut parts.parts);
    Ok(())
}

/// `ChatStage::apply_batch`: one sled batch, then the open-bundles gauge read.
fn apply(store: &WindowStore, pending: &[Pending], grace_ms: i64) -> anyhow::Result<()> {
    let placed = apply_parts(store, pending, grace_ms)?;
    std::hint::black_box((placed.iter().filter(|(_, late)| *late).count(), store.open_bundles()));
    Ok(())
}

/// FNV-1a: spreads chats over partitions as a key hash does.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}
