//! `hookd-load`: the load harness. Starts the broker a scenario needs (an Apache Kafka process, `scripts/kafka`), runs
//! hookd against a fast local receiver, and prints the median of several runs per figure.
//!
//! ```sh
//! cargo run --release --bin hookd-load -- all
//! cargo run --release --bin hookd-load -- ingest ingest-core --runs 5
//! cargo run --bin hookd-load -- passthrough --scale 0.01 --runs 1   # a smoke run, seconds
//! cargo run --release --bin hookd-load -- passthrough --instances 3  # three instances, one join
//! ```
//!
//! It is a tool, not a test: it fails on errors (a broker that does not start, records lost),
//! never on timings. Figures and how they are bounded: `docs/PERFORMANCE.md`.
//!
//! Layout:
//! - [`broker`]: the Apache Kafka process, topic creation, bulk and paced producers, the bare consumer.
//! - [`receiver`]: the webhook receiver (keep-alive, answers 200 at once, counts and times).
//! - [`daemon`]: hookd in this process or as a child process (`hookd-load serve`), config,
//!   metrics, resident memory.
//! - [`workload`]: the generated chat messages and CRM events.
//! - [`ingest`]: `ingest`, through the broker, against a bare consumer.
//! - [`ingest_core`]: `ingest-core`, the chat pipeline in process without a broker.
//! - [`delivery`]: `passthrough`, `latency` and `flush`.
//! - [`instances`]: `passthrough --instances N`, N instances in one group: shares, one join's cost.
//! - [`bundles`]: `memory` and `recovery` (a child process holding 1,000,000 open bundles).
//! - [`chaos`]: `chaos`, faults and malformed input under mixed load (docs/RELIABILITY.md).
//! - [`report`]: the machine, the table, medians.

/// mimalloc instead of glibc's malloc: sled and the JSON path allocate per message, and
/// glibc's allocator was about a third of the ingest profile (docs/PERFORMANCE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod broker;
mod bundles;
mod chaos;
mod daemon;
mod delivery;
mod ingest;
mod ingest_core;
mod instances;
mod receiver;
mod report;
mod workload;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "hookd-load", about = "Load harness of hookd: throughput, latency, memory, recovery")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Scenarios to run, in this order.
    #[arg(value_enum)]
    scenarios: Vec<Scenario>,
    /// Runs per scenario; the table shows the median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Scales every scenario's size (records, bundles, seconds); 0.01 makes a smoke run.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// A librdkafka property for hookd's clients (and the bare consumer), as
    /// `KEY=VALUE` under `[kafka.librdkafka]`; repeatable. Default: none (hookd's defaults).
    #[arg(long = "rdkafka", value_name = "KEY=VALUE")]
    rdkafka: Vec<String>,
    /// A hookd config setting for every run, as a dotted key and a TOML value, e.g.
    /// `delivery.per_subscription_queue=4096`; repeatable; applied over the harness's own.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// hookd instances in one consumer group (`passthrough` only): each one's share of the
    /// work, and the cost of one more joining mid-run.
    #[arg(long, default_value_t = 1)]
    instances: usize,
}

#[derive(Subcommand)]
enum Command {
    /// Runs hookd from a config file until SIGTERM (the child process of `memory`/`recovery`).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Chat messages into 1 h windows through the broker, against a bare consumer.
    Ingest,
    /// The same messages through decode, route, window and sled in process, no broker.
    IngestCore,
    /// 200,000 CRM events to 100 subscriptions: deliveries received per second.
    Passthrough,
    /// 1,000 events/s for 60 s: produce-to-receipt latency.
    Latency,
    /// 100,000 bundles closing at once: bundles delivered per second.
    Flush,
    /// 1,000,000 open bundles of 3 messages: peak RSS and sled size.
    Memory,
    /// Restart with those bundles open: seconds until ready and consuming.
    Recovery,
    /// Mixed load with SIGKILLs, broker restarts and malformed records: nothing lost.
    Chaos,
    /// Every scenario above but `chaos` (a reliability run, not a figure of speed).
    All,
}

/// What every scenario is given.
#[derive(Clone, Copy, Debug)]
pub struct Opts {
    pub runs: usize,
    pub scale: f64,
    /// `--rdkafka` properties as TOML lines for `[kafka.librdkafka]`.
    pub rdkafka: &'static str,
    /// `--set` settings, one `dotted.key=value` a line.
    pub settings: &'static str,
    /// `--instances`: 1, or the instances of `passthrough`'s group.
    pub instances: usize,
}

impl Opts {
    /// `n` scaled, at least `min`.
    pub fn scaled(&self, n: usize, min: usize) -> usize {
        ((n as f64 * self.scale).round() as usize).max(min)
    }
}

fn main() -> anyhow::Result<()> {
    hookd::disable_transparent_huge_pages();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if let Some(Command::Serve { config }) = cli.command {
        return runtime.block_on(daemon::serve(&config));
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,librdkafka=error,rdkafka=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    anyhow::ensure!(cli.runs >= 1, "--runs must be at least 1");
    anyhow::ensure!(cli.scale > 0.0, "--scale must be above 0");
    anyhow::ensure!(cli.instances >= 1, "--instances must be at least 1");
    let mut scenarios = cli.scenarios;
    if scenarios.is_empty() {
        anyhow::bail!("name at least one scenario (or `all`); see --help");
    }
    if cli.instances > 1 && scenarios.iter().any(|s| *s != Scenario::Passthrough) {
        anyhow::bail!("--instances applies to `passthrough` only; run other scenarios without it");
    }
    if scenarios.contains(&Scenario::All) {
        scenarios = vec![
            Scenario::IngestCore,
            Scenario::Ingest,
            Scenario::Passthrough,
            Scenario::Latency,
            Scenario::Flush,
            Scenario::Memory,
            Scenario::Recovery,
        ];
    }
    let mut rdkafka = String::new();
    for kv in &cli.rdkafka {
        let (k, v) = kv.split_once('=').ok_or_else(|| anyhow::anyhow!("--rdkafka {kv}: expected KEY=VALUE"))?;
        rdkafka.push_str(&format!("{:?} = {:?}\n", k.trim(), v.trim()));
    }
    let rdkafka: &'static str = Box::leak(rdkafka.into_boxed_str());
    let settings: &'static str = Box::leak(cli.set.iter().map(|s| format!("{s}\n")).collect::<String>().into_boxed_str());
    let opts = Opts { runs: cli.runs, scale: cli.scale, rdkafka, settings, instances: cli.instances };
    daemon::config(opts, "127.0.0.1:9", "check", std::path::Path::new("unused"), "")?; // bad --set fails here
    let machine = report::Machine::probe();
    eprintln!("{machine}");
    let mut table = report::Table::default();
    // On ctrl-c or SIGTERM the running scenario is dropped: its brokers and child daemons
    // are killed with it.
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = run(opts, scenarios, &mut table) => r,
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
            _ = term.recv() => anyhow::bail!("terminated"),
        }
    })?;
    println!("{machine}");
    let rdkafka = if cli.rdkafka.is_empty() { "hookd's defaults".to_string() } else { cli.rdkafka.join(" ") };
    let set = if cli.set.is_empty() { String::new() } else { format!("  hookd config: {}", cli.set.join(" ")) };
    let inst = if opts.instances > 1 { format!("  instances: {}", opts.instances) } else { String::new() };
    println!(
        "runs: {}  scale: {}{inst}  broker: Apache Kafka {}  librdkafka: {rdkafka}{set}\n",
        opts.runs,
        opts.scale,
        broker::kafka_version()
    );
    print!("{table}");
    Ok(())
}

/// Runs the scenarios in order, adding their rows to `table`.
async fn run(opts: Opts, scenarios: Vec<Scenario>, table: &mut report::Table) -> anyhow::Result<()> {
    let mut held = None; // the state `memory` leaves for `recovery`
    for s in scenarios {
        eprintln!("==> {s:?}");
        let rows = match s {
            Scenario::Ingest => ingest::broker(opts).await?,
            Scenario::IngestCore => ingest_core::run(opts)?,
            Scenario::Passthrough if opts.instances > 1 => instances::passthrough(opts).await?,
            Scenario::Passthrough => delivery::passthrough(opts).await?,
            Scenario::Latency => delivery::latency(opts).await?,
            Scenario::Flush => delivery::flush(opts).await?,
            Scenario::Memory => {
                let (rows, state) = bundles::memory(opts).await?;
                held = Some(state);
                rows
            }
            Scenario::Recovery => bundles::recovery(opts, held.take()).await?,
            Scenario::Chaos => chaos::run(opts).await?,
            Scenario::All => unreachable!("expanded above"),
        };
        for row in &rows {
            eprintln!("    {}", row.summary());
        }
        table.extend(rows);
    }
    Ok(())
}
