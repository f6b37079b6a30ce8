//! hookd: a company's change stream on Kafka, turned into outbound webhooks for its customers.
//!
//! Layout, in pipeline order (DESIGN section 1):
//! - [`config`]: the TOML file, defaults and validation.
//! - [`ingest`]: consumes `crm.events` and `chat.messages`, validates (bad input to
//!   `hookd.dlq`), routes and renders, produces delivery records; owns the input offsets.
//! - [`window`]: per (subscription, chat, window) bundles of chat messages in sled, closed by
//!   a clock and emitted as one delivery each.
//! - [`route`]: the subscription registry, from the config file and the compacted
//!   `hookd.subscriptions` topic; tenant and event-filter matching.
//! - [`render`]: dialects (antcrm, beeiq, teamcrop JSON/XML, doopage, standard, custom
//!   templates) that shape each vendor's body, event names and headers.
//! - [`deliver`]: the sender: signs, sends, retries through `hookd.retry` and the sled retry
//!   store, dead-letters exhausted deliveries; owns the delivery topics' offsets.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz` on `admin.listen`.
//! - [`notify`]: the `endpoint.disabled` notice, and its e-mail to the owner (`[notify.smtp]`),
//!   queued off the delivery path.
//! - [`telemetry`]: the Prometheus metrics.
//! - [`shutdown`]: bounded stop steps.
//! - [`state`]: the sled database and the per-partition protocol of the stores in it.
//! - [`kafka`]: client settings, topic creation, size limits, acknowledged produce (with
//!   permanent refusals told from transient failures), dead letters.
//! - [`portal`]: the customer portal, each tenant's page of its webhooks under `/portal/`.
//! - [`demo`]: `hookd demo`, the whole job on an embedded broker.
//!
//! [`run`] takes the shutdown signal as a parameter, so tests supply their own.

pub mod admin;
pub mod config;
pub mod deliver;
pub mod demo;
pub mod endpoint;
pub mod ingest;
pub mod kafka;
pub mod notify;
pub mod portal;
pub mod render;
pub mod route;
pub mod shutdown;
pub mod state;
pub mod telemetry;
pub mod window;

/// Turns transparent huge pages off for this process (and its children), before anything
/// is allocated. mimalloc returns freed memory to the kernel and takes it again; with THP on,
/// every such fault zeroes a 2 MiB page: 35-40 % of the in-process ingest profile, and
/// ingest-core ran 1.7 times faster without it (docs/PERFORMANCE.md). Returns whether the
/// kernel accepted it (always false off Linux).
pub fn disable_transparent_huge_pages() -> bool {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and changes no memory.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0
    }
    #[cfg(not(target_os = "linux"))]
    false
}

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rdkafka::producer::{FutureProducer, Producer};
use tokio_util::sync::CancellationToken;

use config::Config;
use deliver::park::ParkStore;
use render::Dialects;
use route::Registry;
use state::StateDb;
use telemetry::Metrics;

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("state store: {0}")]
    State(#[from] sled::Error),
    #[error("admin server on {addr}: {source}")]
    Admin { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("http client: {0}")]
    Http(String),
    #[error("stage `{0}` stopped unexpectedly")]
    Stage(&'static str),
}

/// Readiness of the stages, for `/readyz`.
#[derive(Debug, Default)]
pub struct Ready {
    pub subscriptions: AtomicBool,
    pub ingest: AtomicBool,
    pub sender: AtomicBool,
}

impl Ready {
    pub fn all(&self) -> bool {
        self.subscriptions.load(Ordering::Relaxed) && self.ingest.load(Ordering::Relaxed) && self.sender.load(Ordering::Relaxed)
    }
}

/// What every stage shares.
pub struct Shared {
    pub config: Config,
    pub dialects: Dialects,
    pub registry: Registry,
    pub metrics: Metrics,
    /// One idempotent producer for deliveries, retries and dead letters.
    pub producer: FutureProducer,
    /// The admin API's producer, bounded by `admin.produce_timeout_ms` ([`deliver::publish`]).
    pub admin_producer: FutureProducer,
    /// Admin work that writes to Kafka, run apart from the request that started it so a client
    /// that goes away cannot cut it short; waited for when the admin server stops.
    pub admin_tasks: tokio_util::task::TaskTracker,
    pub ready: Ready,
    /// Wall clock of window closing; tests supply a manual one.
    pub clock: Arc<dyn window::clock::Clock>,
    /// Per-subscription failure counts, activity and request logs, verification state.
    pub endpoints: endpoint::EndpointStore,
    /// Mails `endpoint.disabled` notices to owners when `[notify.smtp]` is set.
    pub mailer: Option<notify::Mailer>,
}

/// A started daemon.
pub struct Running {
    /// Where `/metrics`, `/healthz`, `/readyz` are served (the bound address of `admin.listen`).
    pub admin: std::net::SocketAddr,
    pub shared: Arc<Shared>,
    handle: tokio::task::JoinHandle<Result<(), Error>>,
}

impl Running {
    /// Waits until the daemon has stopped (after its shutdown token fired, or a stage failed).
    pub async fn wait(self) -> Result<(), Error> {
        self.handle.await.unwrap_or(Err(Error::Stage("supervisor")))
    }
}

/// Runs the daemon until `shutdown` fires, then stops gracefully (DESIGN section 2).
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    start(config, shutdown).await?.wait().await
}

/// Starts the daemon: validates, creates topics, opens the state store, binds the admin
/// server, then runs the stages in the background until `shutdown`.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Running, Error> {
    start_with_clock(config, shutdown, Arc::new(window::clock::SystemClock)).await
}

/// [`start`] with a given clock for window closing.
pub async fn start_with_clock(config: Config, shutdown: CancellationToken, clock: Arc<dyn window::clock::Clock>) -> Result<Running, Error> {
    let dialects = config.validate()?;
    let metrics = Metrics::new();
    if config.kafka.create_topics {
        if let Err(error) = kafka::ensure_topics(&config).await {
            tracing::warn!(%error, "Could not create topics; expecting them to exist.");
        }
    }
    // Opening may wait up to 5 s for the directory's lock and counts the parked retries: off
    // the runtime's workers.
    let (path, cache_bytes) = (config.state.path.clone(), config.state.cache_mb << 20);
    let opened = tokio::task::spawn_blocking(move || -> Result<_, sled::Error> {
        let (state, wiped) = StateDb::open(&path, cache_bytes)?;
        let park = ParkStore::open(&state)?;
        Ok((state, park, wiped))
    });
    let (state, park, wiped) = opened.await.map_err(|_| Error::Stage("state store"))??;
    if wiped {
        metrics.state_wipes.inc();
    }
    let smallest_topic_limit = kafka::limits::check_topics(&config, &metrics).await;
    let producer = kafka::producer(&config, smallest_topic_limit)?;
    let admin_producer = deliver::publish::admin_producer(&config)?;
    let changelog = endpoint::restore::open_changelog(&config, producer.clone(), metrics.clone(), state.db()).await?;
    let endpoints = endpoint::EndpointStore::open_with(state.db(), config.delivery.log_body_max_bytes, changelog)?;
    let registry = Registry::new(&config.subscription);
    let admin_tasks = tokio_util::task::TaskTracker::new();
    let ready = Ready::default();
    let mail = notify::Mailer::start(&config.notify, &metrics, shutdown.clone(), config.shutdown.grace())
        .map_err(|e| config::ConfigError::Invalid(format!("notify.smtp: {e}")))?;
    let (mailer, mail_task) = mail.unzip();
    let shared =
        Arc::new(Shared { config, dialects, registry, metrics, producer, admin_producer, admin_tasks, ready, clock, endpoints, mailer });
    let (admin, server) = admin::serve(shared.clone(), shutdown.clone()).await?;
    tracing::info!(listen = %admin, "Admin server listening.");
    let stages = supervise(shared.clone(), state, park, shutdown);
    // `wait` returns only once nothing holds the state store any more, so a restart in the
    // same process (or a test) can open it again.
    let (metrics, mail_grace) = (shared.metrics.clone(), shared.config.shutdown.grace());
    let handle = tokio::spawn(async move {
        let result = stages.await;
        // Graceful: waits for open admin connections (a client's keep-alive) to finish.
        let _ = shutdown::bounded(&metrics, "admin_server", shutdown::STEP_TIMEOUT, server).await;
        if let Some(mail) = mail_task {
            // Bounded by `shutdown.grace_ms` itself (notify::Mailer); this is the backstop.
            let _ = shutdown::bounded(&metrics, "owner_emails", mail_grace + shutdown::STEP_TIMEOUT, mail).await;
        }
        result
    });
    Ok(Running { admin, shared, handle })
}

/// Starts the stages in order and stops them all when one fails or `stop` fires.
async fn supervise(shared: Arc<Shared>, state: StateDb, park: ParkStore, stop: CancellationToken) -> Result<(), Error> {
    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
    let mut stages = tokio::task::JoinSet::new();
    stages.spawn(tagged("subscriptions", route::reader::run(shared.clone(), loaded_tx, stop.clone())));
    tokio::select! {
        _ = loaded_rx => shared.ready.subscriptions.store(true, Ordering::Relaxed),
        _ = stop.cancelled() => {}
        Some(r) = stages.join_next() => { stop.cancel(); return finish(r); }
    }
    let windows = window::store::WindowStore::open(&state)?;
    stages.spawn(tagged("ingest", ingest::run(shared.clone(), windows, state.clone(), stop.clone())));
    stages.spawn(tagged("sender", deliver::run(shared.clone(), park.clone(), stop.clone())));
    tracing::info!(subscriptions = shared.registry.index().len(), "hookd running.");
    let mut result = Ok(());
    while let Some(r) = stages.join_next().await {
        if !stop.is_cancelled() {
            stop.cancel();
            result = finish(r);
        }
    }
    let producer = shared.producer.clone();
    // Waits up to 5 s for the broker's acknowledgements: on a blocking thread.
    let _ = tokio::task::spawn_blocking(move || producer.flush(std::time::Duration::from_secs(5))).await;
    if let Err(error) = shared.endpoints.flush_logs() {
        tracing::error!(%error, "Writing the endpoint logs at shutdown failed.");
    }
    park.flush().await?;
    tracing::info!("hookd stopped.");
    result
}

async fn tagged<F: std::future::Future<Output = Result<(), Error>>>(name: &'static str, f: F) -> (&'static str, Result<(), Error>) {
    (name, f.await)
}

fn finish(r: Result<(&'static str, Result<(), Error>), tokio::task::JoinError>) -> Result<(), Error> {
    match r {
        Ok((name, Ok(()))) => {
            tracing::error!(stage = name, "Stage stopped before shutdown.");
            Err(Error::Stage(name))
        }
        Ok((name, Err(error))) => {
            tracing::error!(stage = name, %error, "Stage failed.");
            Err(error)
        }
        Err(error) => {
            tracing::error!(%error, "Stage panicked.");
            Err(Error::Stage("unknown"))
        }
    }
}
