//! `clonekvd`'s HTTP side: the JSON gateway and the Prometheus metrics.
//!
//! The gateway is a CHP client of the pair (a [`Client`] that follows the whole map),
//! so it adds no protocol logic: reads are served from its replica, writes go through
//! the protocol to the active and are answered once their commit is confirmed, and the
//! failover is the client's. Watches are [`Client::watch`]es turned into Server-Sent
//! Events. The metrics are the daemon's own [`ServerStats`], which the protocol loop
//! copies out at its timers, plus the gateway's own counts.
//!
//! Everything here runs on one thread of its own with a small tokio runtime. Reads,
//! writes and their commits are awaited (the client's agent answers them on oneshot
//! channels); the calls that copy pages or a snapshot out of the replica run on the
//! runtime's blocking pool. The protocol loop stays on mio and never waits for this
//! side.
//!
//! # Invariants
//!
//! - Every error answer is JSON `{"error": CODE, "message": TEXT}`, `CODE` one word.
//! - A watch never buffers more than its queue: a watcher that falls that far behind
//!   is sent an `error` event (if its connection takes it) and disconnected; a
//!   connection whose writes make no progress for the write timeout is closed.
//! - A listing reads the replica a page at a time, so its memory does not grow with
//!   the number of keys listed.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use clonekv_core::beacon::Kind;
use clonekv_core::client::Error as RejectedError;
use clonekv_core::kvmsg::{BstarState, Limits};
use futures_util::stream::{self, Stream, StreamExt};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use serde_json::{json, Map, Value};
use tokio_io_timeout::TimeoutStream;

use crate::client::{
    Client, ClientError, Entry, ServerAddress, SnapshotReason, Watch, WatchEnd, WatchStart,
};
use crate::curve::{KeyPair, PublicKey};
use crate::discovery::DiscoveryOptions;
use crate::duration::HumanDuration;
use crate::server::ServerStats;
use crate::watch::Change;

/// Settings of the HTTP side.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Where the gateway (API, `/metrics`, `/healthz`) listens; `None`: no gateway.
    pub api: Option<SocketAddr>,
    /// Where a listener serving only `/metrics` listens; `None`: none.
    pub metrics: Option<SocketAddr>,
    /// The pair, own server first, as the gateway's client connects to them.
    pub servers: Vec<ServerAddress>,
    /// Find the pair by discovery instead (the daemon finds its peer that way); then
    /// `servers` is not used.
    pub discovery: Option<DiscoveryOptions>,
    /// With CURVE: the daemon's own key pair (its server admits it), and the public key
    /// of each server, by kind.
    pub curve: Option<GatewayCurve>,
    /// Key and value limits (the servers').
    pub limits: Limits,
    /// How long a write waits for its commit before the answer is 504.
    pub commit_timeout: Duration,
    /// Changes kept for watches that resume, and their bytes at most.
    pub watch_history: usize,
    /// Bytes of keys and values the watch history keeps at most.
    pub watch_history_bytes: usize,
    /// Changes one watcher may leave unread before it is disconnected.
    pub watch_queue: usize,
    /// A connection whose writes make no progress this long is closed.
    pub write_timeout: Duration,
}

/// The CURVE keys of the gateway's client: the server's own pair (a process holding the
/// server's secret key is that server), and each server's public key.
#[derive(Clone, Debug)]
pub struct GatewayCurve {
    /// The daemon's key pair.
    pub own: KeyPair,
    /// Each server's kind and public key: the daemon's own server first, then its peer
    /// (the order of [`HttpOptions::servers`]).
    pub servers: [(Kind, PublicKey); 2],
}

impl HttpOptions {
    /// The defaults, with neither listener.
    pub fn new(servers: Vec<ServerAddress>, limits: Limits) -> HttpOptions {
        HttpOptions {
            api: None,
            metrics: None,
            servers,
            discovery: None,
            curve: None,
            limits,
            commit_timeout: Duration::from_secs(5),
            watch_history: 10_000,
            watch_history_bytes: 64 << 20,
            watch_queue: 4_096,
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// Why the HTTP side could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// A listener could not bind.
    #[error("cannot listen for HTTP on {address}: {error}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The reason.
        error: io::Error,
    },
    /// The gateway's client could not start.
    #[error("cannot start the gateway's client: {0}")]
    Client(#[from] ClientError),
    /// The runtime or its thread could not start.
    #[error("cannot start the HTTP thread: {0}")]
    Runtime(io::Error),
}

/// The running HTTP side; dropping it leaves the thread running until the process ends.
#[derive(Debug)]
pub struct HttpHandle {
    /// Where the gateway listens, if it does.
    pub api: Option<SocketAddr>,
    /// Where the metrics-only listener listens, if it does.
    pub metrics: Option<SocketAddr>,
}

/// Binds the listeners (so that a taken port fails here, at once), starts the gateway's
/// client and the HTTP thread.
pub fn start(
    options: HttpOptions,
    stats: Arc<Mutex<ServerStats>>,
) -> Result<HttpHandle, HttpError> {
    let bind = |address: SocketAddr| {
        let listener = std::net::TcpListener::bind(address)
            .map_err(|error| HttpError::Bind { address, error })?;
        listener
            .set_nonblocking(true)
            .map_err(|error| HttpError::Bind { address, error })?;
        let local = listener
            .local_addr()
            .map_err(|error| HttpError::Bind { address, error })?;
        Ok::<_, HttpError>((listener, local))
    };
    let api = options.api.map(bind).transpose()?;
    let metrics_listener = options.metrics.map(bind).transpose()?;
    let metrics = Arc::new(Metrics::new(stats));
    let gateway = match &api {
        Some(_) => {
            let mut builder = Client::builder()
                .limits(options.limits)
                .apply_own_updates(false)
                .history(options.watch_history, options.watch_history_bytes);
            if let Some(curve) = &options.curve {
                builder = builder.curve_key_pair(curve.own.clone());
            }
            match &options.discovery {
                Some(discovery) => {
                    builder = builder.discover(discovery.clone());
                    for (kind, key) in options.curve.iter().flat_map(|curve| curve.servers) {
                        builder = builder.discovered_server_key(kind, key);
                    }
                }
                None => {
                    for (index, server) in options.servers.iter().enumerate() {
                        let key = options
                            .curve
                            .as_ref()
                            .and_then(|curve| curve.servers.get(index))
                            .map(|(_, key)| *key);
                        builder = match key {
                            Some(key) => builder.server_address_with_key(server.clone(), key),
                            None => builder.server_address(server.clone()),
                        };
                    }
                }
            }
            Some(Arc::new(Gateway {
                client: builder.connect()?,
                limits: options.limits,
                commit_timeout: options.commit_timeout,
                watch_queue: options.watch_queue,
                metrics: Arc::clone(&metrics),
            }))
        }
        None => None,
    };
    let handle = HttpHandle {
        api: api.as_ref().map(|(_, local)| *local),
        metrics: metrics_listener.as_ref().map(|(_, local)| *local),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("clonekvd-http")
        .enable_io()
        .enable_time()
        .build()
        .map_err(HttpError::Runtime)?;
    let write_timeout = options.write_timeout;
    std::thread::Builder::new()
        .name("clonekvd-http".to_string())
        .spawn(move || {
            runtime.block_on(async move {
                let mut servers = Vec::new();
                if let (Some((listener, _)), Some(gateway)) = (api, gateway) {
                    servers.push(tokio::spawn(serve(
                        listener,
                        write_timeout,
                        api_router(gateway, Arc::clone(&metrics)),
                    )));
                }
                if let Some((listener, _)) = metrics_listener {
                    servers.push(tokio::spawn(serve(
                        listener,
                        write_timeout,
                        metrics_router(Arc::clone(&metrics)),
                    )));
                }
                for server in servers {
                    let _ = server.await;
                }
            });
        })
        .map_err(HttpError::Runtime)?;
    Ok(handle)
}

async fn serve(listener: std::net::TcpListener, write_timeout: Duration, router: Router) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "HTTP listener failed");
            return;
        }
    };
    let listener = TimeoutListener {
        inner: listener,
        write_timeout,
    };
    if let Err(error) = axum::serve(listener, router).await {
        tracing::error!(%error, "HTTP server stopped");
    }
}

/// A TCP listener whose connections fail a write that makes no progress for
/// `write_timeout`, so that a client that stops reading cannot hold a connection (and
/// its watch) open.
struct TimeoutListener {
    inner: tokio::net::TcpListener,
    write_timeout: Duration,
}

impl axum::serve::Listener for TimeoutListener {
    type Io = Pin<Box<TimeoutStream<tokio::net::TcpStream>>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, address)) => {
                    let _ = stream.set_nodelay(true);
                    let mut stream = TimeoutStream::new(stream);
                    stream.set_write_timeout(Some(self.write_timeout));
                    return (Box::pin(stream), address);
                }
                Err(error) => {
                    // Out of descriptors, most likely: wait rather than spin.
                    tracing::warn!(%error, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The gateway's state, shared by its handlers.
struct Gateway {
    client: Client,
    limits: Limits,
    commit_timeout: Duration,
    watch_queue: usize,
    metrics: Arc<Metrics>,
}

fn api_router(gateway: Arc<Gateway>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/v1/kv", get(list))
        .route(
            "/v1/kv/{*key}",
            get(get_key).put(put_key).delete(delete_key),
        )
        .route("/v1/watch", get(watch))
        .route("/v1/status", get(status))
        .route("/healthz", get(healthz))
        .with_state(gateway)
        .merge(metrics_router(Arc::clone(&metrics)))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(metrics, count_requests))
}

fn metrics_router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics)
}

// --- Errors --------------------------------------------------------------------------

/// An error answer: status, one-word code, message.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn not_synced() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_active_server",
            "no active server answers the gateway (the pair is down, failing over, or this \
             gateway has not taken its snapshot yet); try again",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.code, "message": self.message});
        json_response(self.status, &body)
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut text = body.to_string();
    text.push('\n');
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        text,
    )
        .into_response()
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no such route: {} (see /v1/kv/KEY, /v1/kv?prefix=, /v1/watch?prefix=, /v1/status, /healthz, /metrics)",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not served on {}", uri.path()),
    )
}

/// The answer to a client call that failed.
fn client_failure(error: ClientError) -> ApiError {
    match error {
        ClientError::Rejected(reason) => rejected(reason),
        ClientError::CommitTimeout { waited } => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "commit_timeout",
            format!(
                "the write was sent but its commit was not confirmed within {}; it may \
                 still be applied (read the key to see)",
                HumanDuration(waited)
            ),
        ),
        ClientError::Lost(_) | ClientError::NotSynced { .. } | ClientError::Stopped => {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_active_server",
                format!("{error}; try again"),
            )
        }
        other => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            other.to_string(),
        ),
    }
}

fn rejected(reason: RejectedError) -> ApiError {
    match reason {
        RejectedError::KeyTooLong { .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "key_too_long",
            reason.to_string(),
        ),
        RejectedError::ValueTooLarge { .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "value_too_large",
            reason.to_string(),
        ),
        RejectedError::EmptyValue => ApiError::new(
            StatusCode::BAD_REQUEST,
            "empty_value",
            "the value is empty (an empty value deletes in CHP: use DELETE)",
        ),
        RejectedError::TtlTooShort => {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_ttl", reason.to_string())
        }
        _ => ApiError::new(StatusCode::BAD_REQUEST, "bad_key", reason.to_string()),
    }
}

/// Runs a blocking client call on the runtime's blocking pool.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(call)
        .await
        .unwrap_or_else(|error| {
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the request's task failed: {error}"),
            ))
        })
}

/// Fails with 503 unless the gateway's replica follows an active server.
async fn ensure_synced(client: &Client) -> Result<(), ApiError> {
    match client.status_async().await {
        Ok(status) if status.is_synced() => Ok(()),
        Ok(_) => Err(ApiError::not_synced()),
        Err(error) => Err(client_failure(error)),
    }
}

// --- Requests ------------------------------------------------------------------------

/// The query's parameters, percent-decoded, in order (`?meta` has an empty value).
fn query_params(raw: Option<&str>) -> Vec<(String, Vec<u8>)> {
    raw.unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (
                percent_encoding::percent_decode_str(name)
                    .decode_utf8_lossy()
                    .into_owned(),
                percent_encoding::percent_decode_str(value).collect(),
            )
        })
        .collect()
}

fn param<'a>(params: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    params
        .iter()
        .find(|(found, _)| found == name)
        .map(|(_, value)| value.as_slice())
}

/// The key of a `/v1/kv/...` path: the rest of the path from its `/`, percent-decoded
/// (any bytes). A `%` not followed by two hex digits makes it a bad key.
fn key_of(uri: &Uri) -> Result<Vec<u8>, ApiError> {
    let rest = uri.path().strip_prefix("/v1/kv").unwrap_or_default();
    let bytes = rest.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(at, byte)| {
        *byte != b'%'
            || (bytes.get(at + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(at + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_key",
            format!(
                "the key {rest:?} has a % not followed by two hex digits (percent-encode % as %25)"
            ),
        ));
    }
    Ok(percent_encoding::percent_decode_str(rest).collect())
}

fn check_key(key: &[u8], limits: &Limits) -> Result<(), ApiError> {
    if key.len() > limits.max_key_len {
        return Err(rejected(RejectedError::KeyTooLong {
            len: key.len(),
            max: limits.max_key_len,
        }));
    }
    Ok(())
}

fn parse_ttl(raw: &[u8]) -> Result<Duration, ApiError> {
    let bad = |why: &str| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_ttl",
            format!(
                "ttl {:?} {why}: give a duration with a unit, such as 30s, 1500ms or 2m",
                String::from_utf8_lossy(raw)
            ),
        )
    };
    let text = std::str::from_utf8(raw).map_err(|_| bad("is not text"))?;
    let ttl = text
        .parse::<HumanDuration>()
        .map_err(|_| bad("does not parse"))?
        .get();
    if ttl < Duration::from_millis(1) {
        return Err(bad(
            "is under 1 ms (leave ttl out for a key that never expires)",
        ));
    }
    Ok(ttl)
}

/// `value` (UTF-8) or `value_base64` (anything else) into `object`.
fn put_bytes(object: &mut Map<String, Value>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => {
            object.insert(name.to_string(), Value::from(text));
        }
        Err(_) => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
            object.insert(format!("{name}_base64"), Value::from(encoded));
        }
    }
}

fn entry_json(key: &[u8], entry: &Entry) -> Value {
    let mut object = Map::new();
    put_bytes(&mut object, "key", key);
    put_bytes(&mut object, "value", &entry.value);
    object.insert("sequence".into(), Value::from(entry.sequence));
    let ttl = crate::client::remaining_ttl(entry).map(|ttl| ttl.as_secs_f64());
    object.insert("ttl".into(), ttl.map_or(Value::Null, Value::from));
    Value::Object(object)
}

fn change_json(change: &Change) -> Value {
    let mut object = Map::new();
    put_bytes(&mut object, "key", &change.key);
    match &change.value {
        Some(value) => put_bytes(&mut object, "value", value),
        None => {
            object.insert("deleted".into(), Value::Bool(true));
        }
    }
    object.insert("sequence".into(), Value::from(change.sequence));
    Value::Object(object)
}

async fn get_key(
    State(gateway): State<Arc<Gateway>>,
    uri: Uri,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let key = key_of(&uri)?;
    check_key(&key, &gateway.limits)?;
    let meta = param(&query_params(query.as_deref()), "meta").is_some();
    let entry = gateway
        .client
        .entry_async(&key)
        .await
        .map_err(client_failure)?;
    if entry.is_none() {
        ensure_synced(&gateway.client).await?;
    }
    let Some(entry) = entry else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no key {}", String::from_utf8_lossy(&key)),
        ));
    };
    if meta {
        return Ok(json_response(StatusCode::OK, &entry_json(&key, &entry)));
    }
    Ok((
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::HeaderName::from_static("x-clonekv-sequence"),
                HeaderValue::from(entry.sequence),
            ),
        ],
        entry.value,
    )
        .into_response())
}

async fn put_key(
    State(gateway): State<Arc<Gateway>>,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = key_of(&uri)?;
    check_key(&key, &gateway.limits)?;
    let params = query_params(query.as_deref());
    let ttl = param(&params, "ttl").map(parse_ttl).transpose()?;
    let max = gateway.limits.max_body_len;
    let too_large = |len: Option<usize>| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "value_too_large",
            match len {
                Some(len) => format!("the value is {len} bytes, over the limit of {max}"),
                None => format!("the value is over the limit of {max} bytes"),
            },
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    // Read (up to the limit) even when the declared length is over it: a client that
    // is still sending when the answer comes would see a broken pipe, not the 413.
    let value = axum::body::to_bytes(body, max)
        .await
        .map_err(|_| too_large(declared.filter(|len| *len > max)))?;
    // A 503 means the write was not sent: safe to send again.
    ensure_synced(&gateway.client).await?;
    let committed = gateway
        .client
        .set_confirmed_async(&key, &value, ttl, gateway.commit_timeout)
        .await;
    let sequence = confirmed(committed)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "sequence": sequence }),
    ))
}

async fn delete_key(State(gateway): State<Arc<Gateway>>, uri: Uri) -> Result<Response, ApiError> {
    let key = key_of(&uri)?;
    check_key(&key, &gateway.limits)?;
    let present = gateway
        .client
        .entry_async(&key)
        .await
        .map_err(client_failure)?
        .is_some();
    ensure_synced(&gateway.client).await?;
    if !present {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no key {}", String::from_utf8_lossy(&key)),
        ));
    }
    let committed = gateway
        .client
        .delete_confirmed_async(&key, gateway.commit_timeout)
        .await;
    let sequence = confirmed(committed)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "sequence": sequence }),
    ))
}

/// The answer to a write that was sent: its sequence, or 504 when its commit was not
/// confirmed (in time, or at all: the gateway failed over before the echo), since the
/// write may still be applied.
fn confirmed(committed: Result<i64, ClientError>) -> Result<i64, ApiError> {
    match committed {
        Ok(sequence) => Ok(sequence),
        Err(ClientError::Lost(reason)) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "commit_timeout",
            format!(
                "the write was sent but {}; it may still be applied (read the key to see)",
                ClientError::Lost(reason)
            ),
        )),
        Err(error) => Err(client_failure(error)),
    }
}

/// Entries read from the replica per step of a listing.
const LIST_PAGE: usize = 1_000;

async fn list(
    State(gateway): State<Arc<Gateway>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let prefix = param(&query_params(query.as_deref()), "prefix")
        .unwrap_or_default()
        .to_vec();
    ensure_synced(&gateway.client).await?;
    // One page per step, each line an entry: the whole listing is never in memory.
    let pages = stream::unfold(
        (gateway, prefix, None::<Vec<u8>>, false),
        |(gateway, prefix, after, done)| async move {
            if done {
                return None;
            }
            let reader = Arc::clone(&gateway);
            let page_prefix = prefix.clone();
            let page_after = after.clone();
            let page = tokio::task::spawn_blocking(move || {
                reader
                    .client
                    .range(&page_prefix, page_after.as_deref(), LIST_PAGE)
            })
            .await;
            let page = match page {
                Ok(Ok(page)) => page,
                Ok(Err(error)) => {
                    return Some((Err(io::Error::other(error)), (gateway, prefix, after, true)));
                }
                Err(error) => {
                    return Some((Err(io::Error::other(error)), (gateway, prefix, after, true)));
                }
            };
            let last = page.len() < LIST_PAGE;
            if page.is_empty() {
                return None;
            }
            let mut chunk = String::new();
            for (key, entry) in &page {
                chunk.push_str(&entry_json(key, entry).to_string());
                chunk.push('\n');
            }
            let next = page.last().map(|(key, _)| key.clone());
            Some((Ok(Bytes::from(chunk)), (gateway, prefix, next, last)))
        },
    );
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        Body::from_stream(pages),
    )
        .into_response())
}

/// How long a watch resuming at a sequence above this gateway's latest waits for the
/// gateway to catch up before it starts from a snapshot instead.
const RESUME_PATIENCE: Duration = Duration::from_secs(2);

async fn watch(
    State(gateway): State<Arc<Gateway>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let params = query_params(query.as_deref());
    let prefix = param(&params, "prefix").unwrap_or_default().to_vec();
    let resume_text = headers
        .get("last-event-id")
        .map(|value| value.as_bytes().to_vec())
        .or_else(|| param(&params, "after").map(<[u8]>::to_vec));
    let after = match resume_text {
        Some(text) => Some(
            std::str::from_utf8(&text)
                .ok()
                .and_then(|text| text.trim().parse::<i64>().ok())
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "bad_event_id",
                        "Last-Event-ID (or after=) must be a sequence number",
                    )
                })?,
        ),
        None => None,
    };
    let watcher = Arc::clone(&gateway);
    let started = Instant::now();
    let watch = loop {
        let client = Arc::clone(&watcher);
        let watch_prefix = prefix.clone();
        ensure_synced(&client.client).await?;
        let watch = blocking(move || {
            client
                .client
                .watch(&watch_prefix, after, client.watch_queue)
                .map_err(client_failure)
        })
        .await?;
        let ahead = matches!(
            watch.start,
            WatchStart::Snapshot {
                reason: SnapshotReason::Ahead,
                ..
            }
        );
        if ahead && started.elapsed() < RESUME_PATIENCE {
            drop(watch);
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        break watch;
    };
    let metrics = Arc::clone(&gateway.metrics);
    let mut response = Sse::new(watch_events(watch, metrics))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    // When the stream ends (a watcher cut off), so does the connection.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    Ok(response)
}

/// A watch being streamed, counted while it lives.
struct ActiveWatch {
    watch: Watch,
    metrics: Arc<Metrics>,
    /// How it ended, once the stream has said so.
    ended: Option<&'static str>,
}

impl Drop for ActiveWatch {
    fn drop(&mut self) {
        let reason = match self.ended {
            Some(reason) => reason,
            // Cut off, though the connection ended before the stream could say so.
            None if self.watch.is_too_slow() => "too_slow",
            None => "closed",
        };
        self.metrics.watchers.dec();
        self.metrics
            .watchers_ended
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .inc();
    }
}

fn watch_events(
    watch: Watch,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    let first = match &watch.start {
        WatchStart::Snapshot {
            sequence, entries, ..
        } => {
            let entries: Vec<Value> = entries
                .iter()
                .map(|(key, entry)| entry_json(key, entry))
                .collect();
            let data = json!({"sequence": sequence, "entries": entries});
            SseEvent::default()
                .event("snapshot")
                .id(sequence.to_string())
                .data(data.to_string())
        }
        WatchStart::Resumed { after } => {
            SseEvent::default().comment(format!("resumed after {after}"))
        }
    };
    metrics.watchers.inc();
    let active = ActiveWatch {
        watch,
        metrics,
        ended: None,
    };
    let changes = stream::unfold(active, |mut active| async move {
        if active.ended.is_some() {
            return None;
        }
        match active.watch.next().await {
            Ok((id, change)) => {
                let kind = if change.value.is_some() {
                    "set"
                } else {
                    "delete"
                };
                let event = SseEvent::default()
                    .event(kind)
                    .id(id.to_string())
                    .data(change_json(&change).to_string());
                Some((Ok(event), active))
            }
            Err(end) => {
                let (code, message) = match end {
                    WatchEnd::TooSlow => (
                        "too_slow",
                        "this watcher left too many changes unread and is disconnected; \
                         reconnect with Last-Event-ID to resume",
                    ),
                    WatchEnd::Stopped => ("stopped", "the gateway is stopping"),
                };
                active.ended = Some(code);
                let event = SseEvent::default()
                    .event("error")
                    .data(json!({"error": code, "message": message}).to_string());
                Some((Ok(event), active))
            }
        }
    });
    stream::once(async move { Ok(first) }).chain(changes)
}

async fn status(State(gateway): State<Arc<Gateway>>) -> Result<Response, ApiError> {
    let metrics = Arc::clone(&gateway.metrics);
    let client_status = gateway
        .client
        .status_async()
        .await
        .map_err(client_failure)?;
    let own = metrics.stats();
    let servers: Vec<Value> = client_status
        .servers
        .iter()
        .map(|server| {
            json!({
                "endpoint": server.endpoint,
                "followed": server.current,
                "connected": server.connected,
                "state": server.announced.map(state_name),
                "sequence": server.sequence,
                "keys": server.keys,
                "last_heard_seconds": server.last_heard.map(|age| age.as_secs_f64()),
            })
        })
        .collect();
    let body = json!({
        "server": {
            "role": own.role.to_string(),
            "state": state_name(own.state),
            "peer_state": own.peer_state.map(state_name),
            "peer_alive": own.peer_alive,
            "sequence": own.sequence,
            "keys": own.keys,
            "bytes": own.bytes,
        },
        "gateway": {
            "synced": client_status.is_synced(),
            "following": client_status.endpoint,
            "sequence": client_status.sequence,
            "keys": client_status.keys,
        },
        "servers": servers,
    });
    Ok(json_response(StatusCode::OK, &body))
}

async fn healthz(State(gateway): State<Arc<Gateway>>) -> Result<Response, ApiError> {
    ensure_synced(&gateway.client).await?;
    Ok(json_response(StatusCode::OK, &json!({"status": "ready"})))
}

fn state_name(state: BstarState) -> &'static str {
    match state {
        BstarState::Primary => "primary",
        BstarState::Backup => "backup",
        BstarState::Active => "active",
        BstarState::Passive => "passive",
    }
}

// --- Metrics -------------------------------------------------------------------------

type Labels = Vec<(String, String)>;

/// The registry: the server's stats (read at each scrape) and the gateway's counts.
struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    watchers: Gauge,
    watchers_ended: Family<Labels, Counter>,
    stats: Arc<Mutex<ServerStats>>,
}

impl Metrics {
    fn new(stats: Arc<Mutex<ServerStats>>) -> Metrics {
        let mut registry = Registry::with_prefix("clonekv");
        registry.register_collector(Box::new(ServerCollector {
            stats: Arc::clone(&stats),
        }));
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route, method and status",
            requests.clone(),
        );
        let watchers = Gauge::default();
        registry.register(
            "http_watchers",
            "Watch streams open on the gateway",
            watchers.clone(),
        );
        let watchers_ended = Family::<Labels, Counter>::default();
        registry.register(
            "http_watchers_ended",
            "Watch streams ended, by reason (closed: by the client or the connection; too_slow: disconnected for falling behind)",
            watchers_ended.clone(),
        );
        Metrics {
            registry,
            requests,
            watchers,
            watchers_ended,
            stats,
        }
    }

    fn stats(&self) -> ServerStats {
        self.stats
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

async fn scrape(State(metrics): State<Arc<Metrics>>) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &metrics.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            )],
            text,
        )
            .into_response(),
        Err(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the metrics could not be encoded",
        )
        .into_response(),
    }
}

async fn count_requests(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    // The route's pattern, with the key written `:key` (braces in a label value trip
    // some scrapers' parsers).
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .replace("{*key}", ":key");
    let method = request.method().to_string();
    let response = next.run(request).await;
    metrics
        .requests
        .get_or_create(&vec![
            ("route".to_string(), route),
            ("method".to_string(), method),
            ("status".to_string(), response.status().as_u16().to_string()),
        ])
        .inc();
    response
}

/// Encodes the server's latest [`ServerStats`] at each scrape.
#[derive(Debug)]
struct ServerCollector {
    stats: Arc<Mutex<ServerStats>>,
}

impl Collector for ServerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self
            .stats
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let counters = &stats.counters;
        for (name, help, value) in [
            (
                "updates_published",
                "Updates published (client updates, replays, expiry deletes)",
                counters.published,
            ),
            ("keys_expired", "Keys expired", counters.expired),
            (
                "snapshot_streams_opened",
                "Snapshot streams opened for clients",
                counters.snapshots_opened,
            ),
            (
                "snapshot_streams_completed",
                "Snapshot streams that reached their KTHXBAI",
                counters.snapshots_completed,
            ),
            (
                "snapshot_streams_abandoned",
                "Snapshot streams closed early",
                counters.snapshots_abandoned,
            ),
            (
                "syncs_started",
                "Snapshots requested from the peer",
                counters.syncs_started,
            ),
            (
                "syncs_completed",
                "Syncs from the peer completed (full snapshots and resumes)",
                counters.syncs_completed,
            ),
            (
                "syncs_resumed",
                "Syncs from the peer completed by resuming (only the changes after this server's map)",
                counters.syncs_resumed,
            ),
            (
                "resumes_served",
                "Peer resume requests answered with the changes the peer lacked",
                counters.resumes_served,
            ),
            (
                "resumes_refused",
                "Peer resume requests answered with a full snapshot",
                counters.resumes_refused,
            ),
            (
                "subscribers_joined",
                "Subscriptions to the publisher",
                counters.subscribers_joined,
            ),
            (
                "pending_replayed",
                "Pending updates replayed at failover",
                counters.pending_replayed,
            ),
            (
                "pending_evicted",
                "Pending updates evicted by size or age",
                counters.pending_evicted,
            ),
            (
                "split_forwarded",
                "Updates forwarded to the primary after a dual active",
                counters.split_forwarded,
            ),
            (
                "split_lost",
                "Updates of a split that could not be recorded for forwarding",
                counters.split_lost,
            ),
            (
                "role_conflicts",
                "State messages from a peer configured with this server's role",
                counters.role_conflicts,
            ),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        {
            let mut family = encoder.encode_descriptor(
                "inputs_dropped",
                "Inputs dropped, by source socket and reason",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (source, reason, count) in counters.dropped_by_reason() {
                let labels = [("source", source.as_str()), ("reason", reason)];
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
        let gauge = |value: usize| ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
        for (name, help, value) in [
            ("keys", "Keys in the map", gauge(stats.keys)),
            (
                "map_bytes",
                "Bytes the map is charged against --max-bytes (keys, values, properties and a fixed overhead per key)",
                gauge(stats.bytes),
            ),
            (
                "pending_entries",
                "Entries on the pending list",
                gauge(stats.pending),
            ),
            (
                "sync_backlog",
                "Updates a passive holds until its sync completes",
                gauge(stats.sync_backlog),
            ),
            (
                "snapshot_streams_open",
                "Snapshot streams open now",
                gauge(stats.snapshot_streams),
            ),
            (
                "syncing",
                "1 while a passive waits for or receives the peer's snapshot",
                ConstGauge::new(i64::from(stats.syncing)),
            ),
            (
                "peer_alive",
                "1 while the peer is heard within its expiry",
                ConstGauge::new(i64::from(stats.peer_alive)),
            ),
            (
                "sequence",
                "Sequence of the last change published or applied",
                ConstGauge::new(stats.sequence),
            ),
        ] {
            value.encode(encoder.encode_descriptor(name, help, None, value.metric_type())?)?;
        }
        for (name, help, current) in [
            (
                "bstar_state",
                "This server's Binary Star state (1 for the current one)",
                Some(stats.state),
            ),
            (
                "peer_bstar_state",
                "The peer's Binary Star state as last heard (1 for that one)",
                stats.peer_state,
            ),
        ] {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for state in [
                BstarState::Primary,
                BstarState::Backup,
                BstarState::Active,
                BstarState::Passive,
            ] {
                let labels = [("state", state_name(state))];
                ConstGauge::new(i64::from(current == Some(state)))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        let role = stats.role.to_string();
        let mut info = encoder.encode_descriptor(
            "role",
            "This server's configured role (always 1)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        ConstGauge::new(1i64).encode(info.encode_family(&[("role", role.as_str())])?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_percent_decoded_and_flags_have_no_value() {
        let params = query_params(Some("prefix=%2Fa%2F&meta&ttl=30s"));
        assert_eq!(param(&params, "prefix"), Some(&b"/a/"[..]));
        assert_eq!(param(&params, "meta"), Some(&b""[..]));
        assert_eq!(param(&params, "ttl"), Some(&b"30s"[..]));
        assert_eq!(param(&params, "other"), None);
        assert!(query_params(None).is_empty());
    }

    #[test]
    fn the_key_is_the_path_after_v1_kv_with_its_slash_and_any_bytes() {
        let uri: Uri = "/v1/kv/weather/london".parse().unwrap();
        assert_eq!(key_of(&uri).unwrap(), b"/weather/london");
        let uri: Uri = "/v1/kv/bin/%FF%00".parse().unwrap();
        assert_eq!(key_of(&uri).unwrap(), b"/bin/\xff\x00");
        for bad in ["/v1/kv/a%zz", "/v1/kv/a%2", "/v1/kv/a%"] {
            let uri: Uri = bad.parse().unwrap();
            assert_eq!(key_of(&uri).unwrap_err().code, "bad_key", "{bad}");
        }
    }

    #[test]
    fn ttls_need_a_unit_or_are_seconds_and_zero_is_refused() {
        assert_eq!(parse_ttl(b"30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_ttl(b"1500ms").unwrap(), Duration::from_millis(1500));
        for bad in [&b"soon"[..], b"0s", b"\xff", b"-1s"] {
            let error = parse_ttl(bad).unwrap_err();
            assert_eq!(error.status, StatusCode::BAD_REQUEST);
            assert_eq!(error.code, "bad_ttl");
        }
    }

    #[test]
    fn client_failures_map_to_their_status() {
        let status = |error| client_failure(error).status;
        assert_eq!(
            status(ClientError::CommitTimeout {
                waited: Duration::from_secs(1)
            }),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            status(ClientError::Stopped),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status(ClientError::Rejected(RejectedError::ValueTooLarge {
                len: 2,
                max: 1
            })),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            status(ClientError::Rejected(RejectedError::EmptyKey)),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(ClientError::Rejected(RejectedError::ReservedKey)),
            StatusCode::BAD_REQUEST
        );
    }
}
