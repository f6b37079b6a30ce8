//! The webhook receiver of the harness: HTTP/1.1 with keep-alive on 127.0.0.1:0, answers
//! `200 ok` at once, and counts. It runs on its own thread and single-threaded runtime so
//! that a receipt is timed when the request arrives, not when hookd's runtime gets to it.
//!
//! It counts requests, distinct `webhook-id`s (duplicates are allowed by the at-least-once
//! contract; throughput counts distinct deliveries), the first and last arrival, and, for
//! bodies carrying `"load_t_us":<micros>` (stamped by the producer on [`now_us`]'s clock),
//! the produce-to-receipt latency.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Router;

/// Microseconds since the harness started: the clock shared by producers and the receiver.
pub fn now_us() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_micros() as u64
}

#[derive(Default)]
struct Counts {
    requests: u64,
    ids: HashSet<String>,
    first: Option<Instant>,
    last: Option<Instant>,
    /// Produce-to-receipt latencies in microseconds, first receipt of each id only.
    latencies_us: Vec<u64>,
}

/// Called with each request's `webhook-id` and body (the `chaos` scenario's bookkeeping).
pub type Inspector = Arc<dyn Fn(&str, &[u8]) + Send + Sync>;

/// What the receiver has seen; cheap to clone.
#[derive(Clone, Default)]
pub struct Receiver {
    counts: Arc<Mutex<Counts>>,
    inspect: Option<Inspector>,
}

/// A copy of the counts at one moment.
pub struct Snapshot {
    pub requests: u64,
    pub distinct: u64,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
}

impl Receiver {
    /// Starts the receiver; returns it and its address. It runs until the process exits.
    pub fn start() -> anyhow::Result<(Self, SocketAddr)> {
        Self::start_inspecting(None)
    }

    /// [`Self::start`], handing every request to `inspect` as well.
    pub fn start_inspecting(inspect: Option<Inspector>) -> anyhow::Result<(Self, SocketAddr)> {
        let receiver = Receiver { inspect, ..Receiver::default() };
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let app = Router::new().fallback(receive).with_state(receiver.clone());
        std::thread::Builder::new().name("load-receiver".into()).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("receiver runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("receiver listener");
                axum::serve(listener, app).await.expect("receiver serves");
            });
        })?;
        Ok((receiver, addr))
    }

    pub fn snapshot(&self) -> Snapshot {
        let c = self.counts.lock().expect("receiver poisoned");
        Snapshot { requests: c.requests, distinct: c.ids.len() as u64, first: c.first, last: c.last }
    }

    /// Forgets everything seen so far (after a warm-up).
    pub fn reset(&self) {
        *self.counts.lock().expect("receiver poisoned") = Counts::default();
    }

    /// Latencies seen so far, in microseconds.
    pub fn latencies_us(&self) -> Vec<u64> {
        self.counts.lock().expect("receiver poisoned").latencies_us.clone()
    }

    /// Waits until `n` distinct deliveries arrived; fails after `timeout` or when nothing
    /// new arrived for `stall`.
    pub async fn wait_distinct(&self, n: u64, timeout: Duration, stall: Duration) -> anyhow::Result<Snapshot> {
        let start = Instant::now();
        let (mut seen, mut moved) = (0, Instant::now());
        loop {
            let s = self.snapshot();
            if s.distinct >= n {
                return Ok(s);
            }
            if s.distinct > seen {
                (seen, moved) = (s.distinct, Instant::now());
            }
            anyhow::ensure!(start.elapsed() < timeout, "receiver got {} of {n} deliveries within {timeout:?}", s.distinct);
            anyhow::ensure!(moved.elapsed() < stall, "receiver got {} of {n} deliveries, none new for {stall:?}", s.distinct);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> &'static str {
    let at = Instant::now();
    let sent = stamp(&body);
    let received_us = now_us();
    let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    if let Some(inspect) = &r.inspect {
        inspect(&id, &body);
    }
    let mut c = r.counts.lock().expect("receiver poisoned");
    c.requests += 1;
    c.first.get_or_insert(at);
    c.last = Some(at);
    if c.ids.insert(id) {
        if let Some(sent) = sent {
            c.latencies_us.push(received_us.saturating_sub(sent));
        }
    }
    "ok"
}

/// The producer's `"load_t_us":<micros>` stamp in a body or record, if any.
pub fn stamp(bytes: &[u8]) -> Option<u64> {
    find_u64(bytes, b"\"load_t_us\":")
}

/// The unsigned number right after `needle` in `hay`, if any.
fn find_u64(hay: &[u8], needle: &[u8]) -> Option<u64> {
    let at = hay.windows(needle.len()).position(|w| w == needle)? + needle.len();
    let digits: &[u8] = &hay[at..hay[at..].iter().position(|b| !b.is_ascii_digit()).map_or(hay.len(), |e| at + e)];
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_stamp() {
        assert_eq!(super::find_u64(br#"{"a":{"load_t_us":12345,"b":1}}"#, b"\"load_t_us\":"), Some(12345));
        assert_eq!(super::find_u64(br#"{"a":1}"#, b"\"load_t_us\":"), None);
    }
}
