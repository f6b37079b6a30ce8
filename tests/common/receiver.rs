//! A real HTTP webhook receiver for integration tests (in the spirit of svix's TestReceiver).
//!
//! What it does: serves HTTP/1.1 on `127.0.0.1:0` with axum, records every request in
//! arrival order (method, path, query, lowercase headers, body, peer address, arrival time)
//! and answers according to a [`Mode`] that tests switch at any time, globally or per path
//! prefix.
//!
//! Guarantees: a request is recorded as soon as its body has been read, before the mode
//! decides the answer, so stalled requests are visible too. [`Receiver::wait_for`] wakes on
//! each arrival (no fixed sleeps) and panics with the requests seen so far at its timeout.
//! Dropping the receiver (or [`Receiver::stop`]) stops the server: the listener closes,
//! idle keep-alive connections are closed, and stalled requests are answered 503, so a
//! client's pooled connection cannot keep talking to a stopped receiver.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How the receiver answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Answer this status with the body `ok` (the default is `Status(200)`).
    Status(u16),
    /// Never answer (until the receiver stops): the request is recorded and left hanging.
    Stall,
    /// Answer `status` with the header `Retry-After: <value>`.
    RetryAfter(u16, String),
    /// Answer 200 with the value of the named query parameter as the whole body (the
    /// DooPage-style GET challenge), or 200 `ok` when the parameter is missing (so the
    /// deliveries that follow a verified handshake succeed).
    Echo(String),
    /// Answer `status` (a 3xx) with `Location: <url>`.
    Redirect(u16, String),
    /// Answer `status` with this exact body.
    Body(u16, Vec<u8>),
    /// Answer 200 with a body that never ends (1 KiB chunks of `x`, forever).
    Endless,
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// HTTP method, e.g. `POST`.
    pub method: String,
    /// Path without the query, e.g. `/hooks/a`.
    pub path: String,
    /// Raw query string without `?`, if any.
    pub query: Option<String>,
    /// Headers with lowercase names; repeated headers joined with `, `.
    pub headers: BTreeMap<String, String>,
    /// The full request body.
    pub body: Vec<u8>,
    /// The client's address; the same port on two requests means a reused connection.
    pub peer: SocketAddr,
    /// When the request (with its body) had arrived.
    pub received_at: Instant,
}

impl Recorded {
    /// The header's value, by lowercase name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The body as UTF-8 (panics if it is not, which a test should notice).
    pub fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).expect("request body is not UTF-8")
    }

    /// The headers as an `http::HeaderMap`, e.g. for a signature verifier.
    pub fn header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in &self.headers {
            let name: axum::http::HeaderName = k.parse().expect("recorded header name");
            map.insert(name, HeaderValue::from_str(v).expect("recorded header value"));
        }
        map
    }
}

/// Shared between the server task and the test.
struct Shared {
    /// Every request in arrival order.
    log: Mutex<Vec<Recorded>>,
    /// Global mode, and per-prefix overrides (longest matching prefix wins).
    modes: Mutex<(Mode, Vec<(String, Mode)>)>,
    /// Number of recorded requests, so waiters wake on each arrival.
    count: watch::Sender<usize>,
    /// Set once to stop: ends the server gracefully and releases stalled requests.
    stopping: watch::Sender<bool>,
}

/// A running receiver; stops when dropped.
pub struct Receiver {
    /// Where it listens (127.0.0.1, an ephemeral port).
    pub addr: SocketAddr,
    /// State shared with the server task.
    shared: Arc<Shared>,
    /// The server task; it ends once `stopping` is set and its connections are closed.
    server: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Starts a receiver answering `200 ok` to everything.
    pub async fn start() -> Self {
        let (count, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            log: Mutex::new(Vec::new()),
            modes: Mutex::new((Mode::Status(200), Vec::new())),
            count,
            stopping: watch::channel(false).0,
        });
        let app = Router::new().fallback(handle).layer(DefaultBodyLimit::disable()).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind receiver");
        let addr = listener.local_addr().expect("receiver address");
        let mut stopping = shared.stopping.subscribe();
        let server = tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopping.wait_for(|stop| *stop).await;
                })
                .await
                .expect("receiver server");
        });
        Self { addr, shared, server: Some(server) }
    }

    /// `http://127.0.0.1:<port><path>`; `path` should start with `/`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sets the answer for every path without a prefix-specific mode.
    pub fn set_mode(&self, mode: Mode) {
        self.shared.modes.lock().unwrap().0 = mode;
    }

    /// Sets the answer for paths starting with `prefix` (replacing an earlier one for it).
    pub fn set_path_mode(&self, prefix: &str, mode: Mode) {
        let mut modes = self.shared.modes.lock().unwrap();
        modes.1.retain(|(p, _)| p != prefix);
        modes.1.push((prefix.to_owned(), mode));
    }

    /// All requests so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests arrived and returns all of them; panics at
    /// `timeout` with what did arrive.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        let mut rx = self.shared.count.subscribe();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|count| *count >= n)).await;
        if reached.is_err() {
            let seen: Vec<String> = self.requests().iter().map(|r| format!("{} {}", r.method, r.path)).collect();
            panic!("receiver: expected at least {n} requests within {timeout:?}, got {}: {seen:?}", seen.len());
        }
        self.requests()
    }
}

impl Receiver {
    /// Stops the server and waits until its listener and all connections are closed.
    pub async fn stop(mut self) {
        self.shared.stopping.send_replace(true);
        if let Some(server) = self.server.take() {
            server.await.expect("receiver server task");
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shared.stopping.send_replace(true);
    }
}

fn mode_for(shared: &Shared, path: &str) -> Mode {
    let modes = shared.modes.lock().unwrap();
    modes
        .1
        .iter()
        .filter(|(prefix, _)| path.starts_with(prefix.as_str()))
        .max_by_key(|(prefix, _)| prefix.len())
        .map_or_else(|| modes.0.clone(), |(_, mode)| mode.clone())
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        map.entry(name.as_str().to_owned()).and_modify(|v| *v = format!("{v}, {value}")).or_insert_with(|| value.into_owned());
    }
    let recorded = Recorded {
        method: method.to_string(),
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        headers: map,
        body: body.to_vec(),
        peer,
        received_at: Instant::now(),
    };
    let mode = mode_for(&shared, uri.path());
    {
        let mut log = shared.log.lock().unwrap();
        log.push(recorded);
        shared.count.send_replace(log.len());
    }
    let stopping = shared.stopping.subscribe();
    respond(mode, uri.query(), stopping).await
}

async fn respond(mode: Mode, query: Option<&str>, mut stopping: watch::Receiver<bool>) -> Response {
    let status = |s: u16| StatusCode::from_u16(s).expect("valid test status");
    match mode {
        Mode::Status(s) => (status(s), "ok").into_response(),
        Mode::Stall => {
            let _ = stopping.wait_for(|stop| *stop).await;
            (StatusCode::SERVICE_UNAVAILABLE, "receiver stopped").into_response()
        }
        Mode::RetryAfter(s, value) => (status(s), [("retry-after", value)], "retry later").into_response(),
        Mode::Echo(param) => {
            let found = url::form_urlencoded::parse(query.unwrap_or("").as_bytes()).find(|(k, _)| *k == param).map(|(_, v)| v.into_owned());
            match found {
                Some(value) => (StatusCode::OK, value).into_response(),
                None => (StatusCode::OK, "ok").into_response(),
            }
        }
        Mode::Redirect(s, location) => (status(s), [("location", location)]).into_response(),
        Mode::Body(s, body) => (status(s), body).into_response(),
        Mode::Endless => {
            let chunk = Bytes::from(vec![b'x'; 1024]);
            let stream = futures::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
            (StatusCode::OK, Body::from_stream(stream)).into_response()
        }
    }
}
