//! `ingest-core`: the messages of `ingest` fed to hookd's chat pipeline in this process,
//! without a broker, so the daemon's own cost per message is visible.
//!
//! `hookd::ingest::bundles::process` takes an rdkafka `BorrowedMessage`, which only a consumer
//! can make, so this module repeats its steps for aggregating subscriptions with the same
//! public pieces, in the same order: `ChatMessage::decode`, the attachment check, the
//! registry lookup (`Registry::index` + `Index::matching` per message), the window store's
//! checkpoint read per message, the bundle parts (`bundles::Parts`, the daemon's own), then
//! `bundles::apply_parts` per `chat.max_batch` messages and the gauge read after it, and,
//! every `chat.close_interval_ms`, the due-index scan and a sled flush (the close tick). Input
//! generation is outside the timed part. Keep it in step with `ingest/bundles.rs`.
//!
//! One message in [`SPLIT_EVERY`] is also timed step by step (decode, route, serialise), so
//! the split costs the others no clock reads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hookd::ingest::bundles::{apply_parts, Parts, Pending};
use hookd::ingest::chat::ChatMessage;
use hookd::route::subscription::{Source, Subscription};
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
    split: Split,
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
    let mut decode = Row::new("ingest-core", "    decode (sampled)", "us", None);
    let mut routing = Row::new("ingest-core", "    route (sampled)", "us", None);
    let mut serialise = Row::new("ingest-core", "    serialise (sampled)", "us", None);
    let mut apply = Row::new("ingest-core", "  of which sled batch apply", "us", None);
    let mut tick = Row::new("ingest-core", "  of which close tick (due scan, flush)", "us", None);
    for run in 0..opts.runs {
        let dir = tempfile::Builder::new().prefix("hookd-load-core-").tempdir()?;
        let p = one_run(&load, &config, dir.path())?;
        let total = p.route + p.apply + p.tick;
        let us = |d: Duration| d.as_secs_f64() * 1e6 / p.messages as f64;
        let sampled = |d: Duration| d.as_secs_f64() * 1e6 / p.split.samples.max(1) as f64;
        eprintln!(
            "    run {run}: {:.0} msg/s ({:.2} us/msg: route {:.2} (decode {:.2}, route {:.2}, serialise {:.2}), apply {:.2}, tick {:.2})",
            p.messages as f64 / total.as_secs_f64(),
            us(total),
            us(p.route),
            sampled(p.split.decode),
            sampled(p.split.route),
            sampled(p.split.serialise),
            us(p.apply),
            us(p.tick)
        );
        rate.values.push(p.messages as f64 / total.as_secs_f64());
        per_msg.values.push(us(total));
        route.values.push(us(p.route));
        decode.values.push(sampled(p.split.decode));
        routing.values.push(sampled(p.split.route));
        serialise.values.push(sampled(p.split.serialise));
        apply.values.push(us(p.apply));
        tick.values.push(us(p.tick));
    }
    Ok(vec![rate, per_msg, route, decode, routing, serialise, apply, tick])
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
    let mut matched = Vec::new();
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
            let split = (phases.messages % SPLIT_EVERY == 0).then_some(&mut phases.split);
            let t = Instant::now();
            route_one(&registry, &store, value, max_bytes, (partition, offset), &mut pending, &mut matched, split)?;
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

/// The finer split of `route_one`, timed on one message in [`SPLIT_EVERY`] (a clock read per
/// step costs about as much as a step's tenth).
#[derive(Default)]
struct Split {
    decode: Duration,
    route: Duration,
    serialise: Duration,
    samples: u64,
}

const SPLIT_EVERY: u64 = 8;

/// What `ingest::bundles::process` does for one record, for aggregating subscriptions:
/// decode (and the attachment check), route (registry snapshot, checkpoint read, matching
/// subscriptions and their windows), serialise (the bundle parts: stored message and header,
/// written once and shared). The daemon pushes each part as it matches; this collects the
/// matches first so the two steps can be timed apart.
#[allow(clippy::too_many_arguments)]
fn route_one(
    registry: &Registry,
    store: &WindowStore,
    value: &[u8],
    max_bytes: usize,
    (partition, offset): (i32, i64),
    pending: &mut Vec<Pending>,
    matched: &mut Vec<(Arc<Subscription>, Windows)>,
    split: Option<&mut Split>,
) -> anyhow::Result<()> {
    let t0 = split.is_some().then(Instant::now);
    let m = ChatMessage::decode(value, max_bytes)?;
    if m.has_attachments() {
        return Ok(());
    }
    let t1 = t0.map(|_| Instant::now());
    let index = registry.index();
    let applied = store.checkpoint(partition)?;
    matched.clear();
    for sub in index.matching(&m.tenant, Source::Chat, m.direction.event_type()) {
        if let Some(windows) = Windows::of(sub) {
            if applied.is_none_or(|c| offset > c) {
                matched.push((sub.clone(), windows));
            }
        }
    }
    let t2 = t0.map(|_| Instant::now());
    let mut parts = Parts::new(&m, partition, offset);
    for (sub, windows) in matched.iter() {
        parts.push(sub, *windows);
    }
    pending.append(&mut parts.parts);
    if let (Some(split), Some(t0), Some(t1), Some(t2)) = (split, t0, t1, t2) {
        split.decode += t1 - t0;
        split.route += t2 - t1;
        split.serialise += t2.elapsed();
        split.samples += 1;
    }
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
