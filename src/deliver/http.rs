//! The sender's HTTP client: one guarded request, reported as an [`Attempt`].
//!
//! What it does: sends a webhook (`POST`) or a verification probe (`GET`) with a shared
//! keep-alive connection pool, and reports status, headers, a bounded body excerpt, the
//! parsed `Retry-After` and the duration. Deciding success (a dialect's `200` or `2xx`),
//! retrying and logging belong to the caller.
//!
//! Guarantees:
//! - SSRF: host names resolve through [`GuardedResolver`] (the checked addresses are the ones
//!   connected to) and IP-literal URLs, which reqwest never resolves, are checked against the
//!   same [`TargetPolicy`] before anything is sent. Redirects are never followed (a `3xx` is
//!   reported as is), and environment proxies (`HTTP(S)_PROXY`) are ignored: through a proxy
//!   the guard would check the proxy's address instead of the target's.
//! - Bounded: every request has a total deadline (`request_timeout`, covering DNS, connect,
//!   sending and reading the body); at most `max_response_bytes` of a response body are kept,
//!   read chunk by chunk, and reading stops at the first chunk past the limit.
//! - [`HttpSender::post`] never panics and never returns an error: failures are data, in
//!   [`Attempt::error`]. Error messages never contain the URL (it may carry credentials).

use std::error::Error as StdError;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{Method, Response};
use url::{Host, Url};

use super::backoff::parse_retry_after;
use super::ssrf::{find_resolve_error, GuardedResolver, ResolveError, TargetPolicy, ALLOW_KEY};

/// Tuning of the HTTP client; one per process, shared by all endpoints.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Total deadline of one request, from DNS to the last body byte read. Default 30 s.
    pub request_timeout: Duration,
    /// Deadline for DNS plus TCP (and TLS) connect, so a dead host fails fast. Default 10 s.
    pub connect_timeout: Duration,
    /// Response body bytes kept for the request log; the rest is not read. Default 4096.
    pub max_response_bytes: usize,
    /// `User-Agent` header, unless the request's own headers set one. Default `hookd/<ver>`.
    pub user_agent: String,
    /// Idle keep-alive connections kept per host, so steady traffic to one endpoint reuses
    /// connections instead of paying a handshake per webhook. Default 8.
    pub pool_max_idle_per_host: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_response_bytes: 4096,
            user_agent: concat!("hookd/", env!("CARGO_PKG_VERSION")).to_owned(),
            pool_max_idle_per_host: 8,
        }
    }
}

/// Why a request produced no usable answer (or, as [`DeliverError::Status`], a rejected one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliverError {
    /// The URL does not parse, is not `http`/`https`, or has no host. Not retriable.
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
    /// A configured header name or value is not valid HTTP (the value is not echoed, it may
    /// be a credential). Not retriable: every attempt would send the same header.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Refused by the SSRF guard; the message names the address and the config key that
    /// allows it. Not retriable until the operator changes the config.
    #[error("{0}")]
    Blocked(String),
    /// The host name did not resolve.
    #[error("{0}")]
    Dns(String),
    /// TCP or TLS connection failed (refused, reset, certificate rejected, ...).
    #[error("connection failed: {0}")]
    Connect(String),
    /// `request_timeout` or `connect_timeout` passed before the response headers arrived.
    #[error("request timed out")]
    Timeout,
    /// The endpoint answered with a status its dialect does not accept. Never produced by
    /// [`HttpSender`] itself; see [`Attempt::failure`].
    #[error("endpoint answered HTTP {0}")]
    Status(u16),
    /// Any other transport failure (connection closed mid-request, protocol error, ...).
    #[error("I/O error: {0}")]
    Io(String),
    /// The HTTP client could not be built (bad `user_agent`, TLS setup). Startup only.
    #[error("HTTP client setup failed: {0}")]
    Client(String),
}

impl DeliverError {
    /// Whether a later attempt may succeed. False for `InvalidUrl`, `InvalidRequest`,
    /// `Blocked` and `Client` (only a config change helps); true for all others, including
    /// every `Status`: the seeds treat any non-success answer as a failure to retry, and a
    /// dialect that wants to give up on some 4xx decides so itself.
    pub fn is_retriable(&self) -> bool {
        !matches!(self, Self::InvalidUrl(_) | Self::InvalidRequest(_) | Self::Blocked(_) | Self::Client(_))
    }

    /// Every [`DeliverError::kind`], for the metric's series initialised at start.
    pub const KINDS: [&'static str; 9] =
        ["invalid_url", "invalid_request", "blocked", "dns", "connect", "timeout", "status", "io", "client"];

    /// Short stable name for metric labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidUrl(_) => "invalid_url",
            Self::InvalidRequest(_) => "invalid_request",
            Self::Blocked(_) => "blocked",
            Self::Dns(_) => "dns",
            Self::Connect(_) => "connect",
            Self::Timeout => "timeout",
            Self::Status(_) => "status",
            Self::Io(_) => "io",
            Self::Client(_) => "client",
        }
    }
}

/// One request to send. All headers (content type, `webhook-*`, the dialect's and the
/// subscription's) come from the caller; only `User-Agent` has a default.
#[derive(Debug, Clone, Copy)]
pub struct OutboundRequest<'a> {
    /// Target URL, `http` or `https`.
    pub url: &'a str,
    /// Header name/value pairs, sent in order; repeated names are sent repeatedly.
    pub headers: &'a [(String, String)],
    /// The rendered body, sent as is (copied once into the request).
    pub body: &'a [u8],
}

/// What happened to one request, success or not, for the sender's decision and the log.
///
/// The status line is the endpoint's verdict: once it arrived, `error` stays `None` even if
/// reading the body excerpt then failed or timed out (`body_truncated` says so instead).
#[derive(Debug, Clone, Default)]
pub struct Attempt {
    /// HTTP status, if the response headers arrived.
    pub status: Option<u16>,
    /// Response headers in wire order, names lowercase, values lossily decoded.
    pub response_headers: Vec<(String, String)>,
    /// Start of the response body, lossy UTF-8, at most `max_response_bytes` bytes.
    pub body_excerpt: String,
    /// True when the excerpt is not the whole body: the body was longer than the limit, or
    /// reading it failed or timed out.
    pub body_truncated: bool,
    /// From just before DNS to the end of reading the excerpt.
    pub duration: Duration,
    /// Why no status arrived; `None` whenever `status` is `Some`.
    pub error: Option<DeliverError>,
    /// The endpoint's `Retry-After`, parsed (delta-seconds or HTTP-date, relative to now).
    pub retry_after: Option<Duration>,
}

impl Attempt {
    /// The failure to record for this attempt under a dialect's success rule (`accept`,
    /// e.g. `|s| s == 200` or `|s| (200..300).contains(&s)`): the transport error if any,
    /// else `Status(s)` when `accept(s)` is false, else `None` (delivered).
    pub fn failure(&self, accept: impl Fn(u16) -> bool) -> Option<DeliverError> {
        match (&self.error, self.status) {
            (Some(e), _) => Some(e.clone()),
            (None, Some(s)) if accept(s) => None,
            (None, Some(s)) => Some(DeliverError::Status(s)),
            (None, None) => Some(DeliverError::Io("no response".to_owned())),
        }
    }

    fn failed(error: DeliverError, started: Instant) -> Self {
        Self { error: Some(error), duration: started.elapsed(), ..Self::default() }
    }
}

/// The guarded, pooled HTTP client. Cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct HttpSender {
    /// reqwest client with the guarded resolver, no redirects, no proxy, pooled connections.
    client: reqwest::Client,
    /// Checks IP-literal URLs, which bypass the resolver.
    policy: Arc<TargetPolicy>,
    /// Kept for the body limit, applied per response.
    cfg: HttpConfig,
}

impl HttpSender {
    /// Builds the client. Fails only on an invalid `user_agent` or TLS setup failure.
    pub fn new(cfg: HttpConfig, policy: TargetPolicy) -> Result<Self, DeliverError> {
        let policy = Arc::new(policy);
        let user_agent = HeaderValue::from_str(&cfg.user_agent)
            .map_err(|_| DeliverError::Client("user_agent is not a valid header value".to_owned()))?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(cfg.request_timeout)
            .connect_timeout(cfg.connect_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .user_agent(user_agent)
            .dns_resolver(Arc::new(GuardedResolver::new(policy.clone())))
            .build()
            .map_err(|e| DeliverError::Client(error_chain(&e)))?;
        Ok(Self { client, policy, cfg })
    }

    /// POSTs one webhook and reports the outcome; never fails, never panics.
    pub async fn post(&self, req: OutboundRequest<'_>) -> Attempt {
        let started = Instant::now();
        let resp = match self.send(Method::POST, req.url, req.headers, req.body).await {
            Ok(resp) => resp,
            Err(e) => return Attempt::failed(e, started),
        };
        let status = resp.status().as_u16();
        let response_headers = header_pairs(resp.headers());
        let retry_after =
            resp.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| parse_retry_after(v, chrono::Utc::now()));
        let excerpt = read_excerpt(resp, self.cfg.max_response_bytes).await;
        if let Some(e) = &excerpt.error {
            tracing::debug!(error = %e, status, "Reading the response body failed.");
        }
        Attempt {
            status: Some(status),
            response_headers,
            body_excerpt: excerpt.text,
            body_truncated: excerpt.truncated,
            duration: started.elapsed(),
            error: None,
            retry_after,
        }
    }

    /// GETs `url` (for an endpoint verification handshake) and returns the status and the
    /// body, at most `max_response_bytes` of it, lossy UTF-8. Same guard and limits as
    /// [`post`](Self::post); a body that fails mid-read is an error here.
    pub async fn get_text(&self, url: &str) -> Result<(u16, String), DeliverError> {
        let resp = self.send(Method::GET, url, &[], &[]).await?;
        let status = resp.status().as_u16();
        let excerpt = read_excerpt(resp, self.cfg.max_response_bytes).await;
        match excerpt.error {
            Some(e) => Err(e),
            None => Ok((status, excerpt.text)),
        }
    }

    /// Checks the target, builds and sends the request, returns the response head.
    async fn send(&self, method: Method, url: &str, headers: &[(String, String)], body: &[u8]) -> Result<Response, DeliverError> {
        let url = self.check_target(url)?;
        let mut request = self.client.request(method, url).headers(header_map(headers)?);
        if !body.is_empty() {
            request = request.body(body.to_vec());
        }
        request.send().await.map_err(map_reqwest_error)
    }

    /// Parses the URL and applies the policy to IP-literal hosts (reqwest resolves only names).
    fn check_target(&self, url: &str) -> Result<Url, DeliverError> {
        let url = Url::parse(url.trim()).map_err(|e| DeliverError::InvalidUrl(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            let msg = format!("scheme {:?} is not http or https", url.scheme());
            return Err(DeliverError::InvalidUrl(msg));
        }
        let ip = match url.host() {
            None => return Err(DeliverError::InvalidUrl("URL has no host".to_owned())),
            Some(Host::Domain(_)) => return Ok(url),
            Some(Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(Host::Ipv6(ip)) => IpAddr::V6(ip),
        };
        match self.policy.refusal(ip) {
            None => Ok(url),
            Some(why) => Err(DeliverError::Blocked(format!("target {ip} is a non-public address ({why}); allow it with {ALLOW_KEY}"))),
        }
    }
}

/// Builds a header map, refusing invalid names or values without echoing the value.
fn header_map(headers: &[(String, String)]) -> Result<HeaderMap, DeliverError> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let invalid = |what: &str| DeliverError::InvalidRequest(format!("header {name:?} has an invalid {what}"));
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid("name"))?;
        let value = HeaderValue::from_str(value).map_err(|_| invalid("value"))?;
        map.append(name, value);
    }
    Ok(map)
}

fn header_pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    headers.iter().map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned())).collect()
}

/// The kept start of a response body.
struct Excerpt {
    /// Lossy UTF-8, at most the limit in bytes.
    text: String,
    /// The body had more bytes than kept, or reading failed.
    truncated: bool,
    /// Why reading stopped early, if it failed.
    error: Option<DeliverError>,
}

/// Reads at most `max` body bytes chunk by chunk, stopping at the first chunk past the
/// limit, so an endless or huge body costs at most `max` plus one chunk of memory.
async fn read_excerpt(mut resp: Response, max: usize) -> Excerpt {
    let mut kept = Vec::with_capacity(max.min(64 * 1024));
    let (mut truncated, mut error) = (false, None);
    loop {
        match resp.chunk().await {
            Ok(None) => break,
            Ok(Some(chunk)) => {
                let room = max - kept.len();
                kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if chunk.len() > room {
                    truncated = true;
                    break;
                }
            }
            Err(e) => {
                (truncated, error) = (true, Some(map_reqwest_error(e)));
                break;
            }
        }
    }
    Excerpt { text: lossy_prefix(&kept, max), truncated, error }
}

/// Lossy UTF-8 of `bytes`, cut at a char boundary so it is at most `max` bytes long
/// (replacement characters can make the lossy text longer than its input).
fn lossy_prefix(bytes: &[u8], max: usize) -> String {
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// Maps a reqwest error to a [`DeliverError`], finding our resolver's verdict in the chain.
fn map_reqwest_error(err: reqwest::Error) -> DeliverError {
    let err = err.without_url();
    match find_resolve_error(&err) {
        Some(e @ ResolveError::Blocked { .. }) => return DeliverError::Blocked(e.to_string()),
        Some(e @ ResolveError::Lookup { .. }) => return DeliverError::Dns(e.to_string()),
        None => {}
    }
    if err.is_timeout() {
        DeliverError::Timeout
    } else if err.is_builder() {
        DeliverError::InvalidRequest(error_chain(&err))
    } else if err.is_connect() {
        DeliverError::Connect(error_chain(&err))
    } else {
        DeliverError::Io(error_chain(&err))
    }
}

/// `outer: cause: root cause`, skipping repeated messages.
fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(err);
    while let Some(e) = cur {
        let msg = e.to_string();
        if parts.last() != Some(&msg) {
            parts.push(msg);
        }
        cur = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_is_listed_for_the_metric() {
        let s = String::new;
        let all = [
            DeliverError::InvalidUrl(s()),
            DeliverError::InvalidRequest(s()),
            DeliverError::Blocked(s()),
            DeliverError::Dns(s()),
            DeliverError::Connect(s()),
            DeliverError::Timeout,
            DeliverError::Status(500),
            DeliverError::Io(s()),
            DeliverError::Client(s()),
        ];
        assert_eq!(all.map(|e| e.kind()), DeliverError::KINDS);
    }

    #[test]
    fn lossy_prefix_respects_the_byte_limit() {
        assert_eq!(lossy_prefix(b"hello", 10), "hello");
        assert_eq!(lossy_prefix("h\u{e9}llo".as_bytes(), 2), "h", "never splits a char");
        // Three invalid bytes become three 3-byte replacement chars; cut back to <= 4 bytes.
        assert_eq!(lossy_prefix(&[0xff, 0xff, 0xff], 4), "\u{fffd}");
    }
}
