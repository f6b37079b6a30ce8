//! The `hookd` binary: parses the command line and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: sled and the JSON path allocate per message, and
/// glibc's allocator was about a third of the ingest profile (docs/PERFORMANCE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "hookd", version, about = "Kafka change stream to outbound webhooks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        #[arg(long, short, default_value = "config/hookd.toml")]
        config: PathBuf,
    },
    /// Check a config file: exit 0, or print what is wrong and exit 1.
    CheckConfig { file: PathBuf },
    /// The whole job on an embedded broker with sample traffic and a local receiver.
    Demo {
        /// Admin/metrics address of the demo daemon.
        #[arg(long, default_value = "127.0.0.1:9464")]
        listen: std::net::SocketAddr,
    },
}

/// Cancels the token on SIGTERM or ctrl-c; a second signal exits at once, and so does the
/// process when the stop has not finished within `deadline` of the first signal (a stuck
/// librdkafka close; nothing is lost, restart replays what was not committed).
fn shutdown_on_signals(deadline: Duration) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        for n in 0.. {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if n == 0 {
                tracing::info!(?deadline, "Shutdown signal received; finishing in-flight work (signal again to exit at once).");
                t.cancel();
                // A thread, not a task: it fires even when the runtime's workers are stuck.
                std::thread::spawn(move || {
                    std::thread::sleep(deadline);
                    tracing::error!(?deadline, "Stop not finished within shutdown.deadline_ms; exiting now.");
                    std::process::exit(1);
                });
            } else {
                tracing::warn!("Second signal; exiting now.");
                std::process::exit(130);
            }
        }
    });
    token
}

fn main() -> ExitCode {
    hookd::disable_transparent_huge_pages();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hookd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(cli_main());
    // Dropping a runtime waits for its blocking tasks without a bound; a stopped daemon has
    // none left that matter (its state is flushed), so it waits a little, not for ever.
    runtime.shutdown_timeout(Duration::from_secs(5));
    code
}

async fn cli_main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,librdkafka=warn,rdkafka=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        Command::CheckConfig { file } => match hookd::config::Config::load(&file) {
            Ok(c) => {
                println!("{}: ok ({} static subscriptions, {} custom dialects)", file.display(), c.subscription.len(), c.dialect.len());
                println!("{}", hookd::kafka::limits::summary(&c));
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
        Command::Run { config } => match hookd::config::Config::load(&config) {
            Ok(c) => {
                let deadline = c.shutdown.deadline();
                hookd::run(c, shutdown_on_signals(deadline)).await.map_err(Into::into)
            }
            Err(e) => Err(e.into()),
        },
        Command::Demo { listen } => {
            hookd::demo::run(listen, shutdown_on_signals(hookd::config::ShutdownConfig::default().deadline())).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hookd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
