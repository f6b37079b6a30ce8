//! Admin: the HTTP side of operations on `admin.listen`.
//!
//! `/metrics` (Prometheus text), `/healthz` (the process answers), `/readyz` (the
//! subscriptions are loaded and both consumers run) and `/openapi.json` are open; the admin
//! API under `/api/` ([`api`]) requires the bearer `admin.token`. The customer portal
//! ([`crate::portal`]) is served under `/portal/` when `portal.secret` is set.

pub mod api;
pub(crate) mod replay;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::{Error, Shared};

async fn metrics(State(s): State<Arc<Shared>>) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render())
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Arc<Shared>>) -> (StatusCode, &'static str) {
    if s.ready.all() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

/// The router, separate from the listener so tests can drive it.
pub fn router(shared: Arc<Shared>) -> Router {
    api::routes(shared.clone())
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(crate::portal::routes(shared.clone()))
        .with_state(shared)
}

/// Binds `admin.listen` and serves until `shutdown`. Returns the bound address and the
/// server task (open connections get 2 s to finish after `shutdown`; admin work they started
/// that writes to Kafka is waited for, each bounded by `admin.produce_timeout_ms`).
pub async fn serve(shared: Arc<Shared>, shutdown: CancellationToken) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), Error> {
    let addr = shared.config.admin.listen;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| Error::Admin { addr, source })?;
    let bound = listener.local_addr().map_err(|source| Error::Admin { addr, source })?;
    let tasks = shared.admin_tasks.clone();
    let app = router(shared);
    let handle = tokio::spawn(async move {
        let stopped = shutdown.clone();
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
        tokio::select! {
            r = served => if let Err(error) = r { tracing::error!(%error, "Admin server failed."); },
            _ = async { stopped.cancelled().await; tokio::time::sleep(std::time::Duration::from_secs(2)).await } => {}
        }
        tasks.close();
        tasks.wait().await;
    });
    Ok((bound, handle))
}
