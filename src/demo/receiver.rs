//! The demo's webhook receiver: prints every request it gets and answers 200.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::http::{HeaderMap, Uri};
use axum::Router;

async fn receive(uri: Uri, headers: HeaderMap, body: Bytes) -> &'static str {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
    let text = String::from_utf8_lossy(&body);
    let summary = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("aggregation").and_then(|a| a.as_str()).map(|a| format!("\n   aggregation (HTML summary): {a}")))
        .unwrap_or_default();
    let shown: String = text.chars().take(600).collect();
    let more = if text.chars().count() > 600 { " …" } else { "" };
    let extra = match h("tc-webhook-event").as_str() {
        "-" => String::new(),
        e => format!(" tc-webhook-event={e}"),
    };
    println!(
        "\n<- POST {}  webhook-id={} content-type={}{}\n   webhook-signature={}\n   {}{}{}",
        uri.path(),
        h("webhook-id"),
        h("content-type"),
        extra,
        h("webhook-signature"),
        shown,
        more,
        summary
    );
    "ok"
}

/// Starts the receiver on an ephemeral loopback port.
pub async fn start() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = Router::new().fallback(receive);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}
