//! Admin: the HTTP side of operations on `admin.listen`.
//!
//! `/metrics` (Prometheus text), `/healthz` (the process answers) and `/readyz` (the
//! subscriptions are loaded and both consumers run) are open; the admin API that later
//! routes add requires the bearer `admin.token`.

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
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(shared)
}

/// Binds `admin.listen` and serves until `shutdown`. Returns the bound address.
pub async fn serve(shared: Arc<Shared>, shutdown: CancellationToken) -> Result<SocketAddr, Error> {
    let addr = shared.config.admin.listen;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| Error::Admin { addr, source })?;
    let bound = listener.local_addr().map_err(|source| Error::Admin { addr, source })?;
    let app = router(shared);
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(error) = served {
            tracing::error!(%error, "Admin server failed.");
        }
    });
    Ok(bound)
}
