//! The HTTP server: accepts connections and serves every request through one door, the router
//! with its layers, whether the listener or hyper reads the request.
//!
//! **Connections.** A node takes at most `limits.max_connections`; past it, a new connection is
//! answered `503 too_many_connections` at once, before its request is read, and closed. That
//! costs a few hundred bytes and leaves open streams alone.
//!
//! **First request.** The listener reads a new connection's request head itself, within
//! `limits.header_timeout`. A plain `GET` (see [`head::plain_get`]) is handed to the router as a
//! tower service right here. If the response is marked [`StreamOnSocket`] (an event stream), it
//! is written on the socket by [`direct`], without hyper's per-connection buffers: an idle
//! stream then costs a few KiB. Any other response is written whole and the connection goes on
//! with hyper. Anything that is not a plain `GET` goes to hyper with the bytes already read put
//! back in front, so hyper parses it exactly as it would have.
//!
//! **Hyper** serves everything else (bodies, kept-alive connections), with the same router, the
//! same head limits ([`head::MAX_HEAD`], [`head::MAX_HEADERS`]: `431` past them, in JSON like
//! every error answer: [`rewind`]), and `header_timeout` both for each request head and for the
//! idle time between requests.
//!
//! **TLS and HTTP/2.** With `tls.cert` and `tls.key` the listener speaks TLS only, offering
//! `h2` and `http/1.1` by ALPN; the handshake has `header_timeout` to finish. An `h2` connection
//! goes to hyper's HTTP/2 server; an `http/1.1` one is served as a cleartext one is, first
//! request and event streams included. On cleartext, a connection that opens with the HTTP/2
//! preface (h2c with prior knowledge, as proxies such as Envoy speak upstream) goes to the HTTP/2
//! server too. Over HTTP/2 a connection may have `limits.max_streams_per_connection` requests
//! open; request heads are capped at [`head::MAX_HEAD`] as over HTTP/1.1; streams that clients
//! open and reset at once (rapid reset), and streams the server had to reset, are bounded per
//! connection, and a connection that stops answering pings is closed.
//!
//! **Write deadline.** An SSE response never ends, so a client that stops reading would hold its
//! connection (and its topic subscription) forever once the socket buffers fill. A write that
//! cannot make progress for `write_timeout` fails instead; the connection closes, and the client,
//! when it comes back, resumes from its `Last-Event-ID`. Idle streams have no pending write.
//! Over HTTP/2 the socket keeps moving for the other streams, so a stream whose window stays
//! full for `write_timeout` is reset on its own ([`stall`]).

mod direct;
mod head;
mod rewind;
mod stall;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Response, StatusCode};
use axum::Router;
use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_io_timeout::TimeoutStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

pub use self::direct::StreamOnSocket;
use self::rewind::Rewind;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// A connection with a write deadline.
pub type Connection = Pin<Box<TimeoutStream<TcpStream>>>;

/// What a connection is read and written through: the socket, or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// The first bytes of every HTTP/2 connection (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/2 streams a client may open and reset before the server has accepted them, per
/// connection; past it the connection is closed (the rapid-reset attack, CVE-2023-44487).
const MAX_PENDING_RESETS: usize = 20;
/// Streams the server may reset for a client's protocol errors, per connection, before the
/// connection is closed.
const MAX_LOCAL_RESETS: usize = 256;
/// How often an HTTP/2 connection is pinged, and how long its answer may take before the
/// connection is closed as dead.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a refused connection is kept to let the client read its `503` before the close.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// The body of the answer to a connection over `limits.max_connections`.
fn too_many_connections_body() -> String {
    serde_json::json!({
        "error": "too_many_connections",
        "message": "this node is at limits.max_connections; retry later",
    })
    .to_string()
}

/// The answer to an HTTP/1.1 connection over `limits.max_connections`, made once.
fn too_many_connections() -> Bytes {
    let body = too_many_connections_body();
    Bytes::from(format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ))
}

/// Accepts connections and serves them until shutdown.
pub struct Server {
    listener: TcpListener,
    /// TLS on the listener, when configured: every connection then starts with a handshake.
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
}

/// What every connection's task needs.
struct Shared {
    /// The one door: routes and every layer.
    app: Router,
    write_timeout: Duration,
    header_timeout: Duration,
    max_connections: usize,
    /// `limits.max_streams_per_connection`, for HTTP/2 connections.
    max_streams: u32,
    /// The answer to connections over `max_connections`.
    refusal: Bytes,
    /// Streams written on the socket rather than through hyper.
    direct_streams: AtomicU64,
    /// Every connection's task, so shutdown can wait for them.
    tasks: TaskTracker,
    /// Open and refused connections (the limit is checked against the open count kept there),
    /// slow clients.
    metrics: Arc<Metrics>,
    /// Stops accepting, ends waits for request heads and drains hyper connections.
    shutdown: Shutdown,
}

/// Counters the server keeps, for tests and metrics.
#[derive(Clone)]
pub struct ServerStats {
    shared: Arc<Shared>,
}

impl ServerStats {
    /// Streams written on the socket rather than through hyper.
    pub fn direct_streams(&self) -> u64 {
        self.shared.direct_streams.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        usize::try_from(self.shared.metrics.open_connections.get()).unwrap_or(0)
    }

    /// Connections refused for being over the limit.
    pub fn refused_connections(&self) -> u64 {
        self.shared.metrics.rejected_connections.get()
    }
}

impl Server {
    pub fn new(
        listener: TcpListener,
        app: Router,
        settings: &Settings,
        max_connections: usize,
        tasks: TaskTracker,
        shutdown: Shutdown,
        metrics: Arc<Metrics>,
    ) -> Server {
        Server {
            listener,
            tls: None,
            shared: Arc::new(Shared {
                app,
                write_timeout: settings.write_timeout,
                header_timeout: settings.limits.header_timeout,
                max_connections,
                max_streams: settings.limits.max_streams_per_connection,
                refusal: too_many_connections(),
                direct_streams: AtomicU64::new(0),
                tasks,
                shutdown,
                metrics,
            }),
        }
    }

    /// Serves TLS only, with this acceptor's certificate and ALPN.
    pub fn with_tls(mut self, tls: TlsAcceptor) -> Server {
        self.tls = Some(tls);
        self
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn stats(&self) -> ServerStats {
        ServerStats {
            shared: self.shared.clone(),
        }
    }

    /// Accepts until shutdown; the connections' tasks go on in the task tracker.
    pub async fn run(self) {
        let shared = self.shared;
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = shared.shutdown.wait() => return,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let open = usize::try_from(shared.metrics.open_connections.get()).unwrap_or(0);
            if open >= shared.max_connections {
                shared.metrics.rejected_connections.inc();
                match self.tls.clone() {
                    Some(tls) => shared.tasks.spawn(refuse_tls(stream, tls)),
                    None => shared.tasks.spawn(refuse(stream, shared.refusal.clone())),
                };
                continue;
            }
            shared.metrics.open_connections.inc();
            // Small frames go out at once rather than waiting for more.
            let _ = stream.set_nodelay(true);
            let mut stream = TimeoutStream::new(stream);
            stream.set_write_timeout(Some(shared.write_timeout));
            let stream: Connection = Box::pin(stream);
            let open = Open(shared.clone());
            match self.tls.clone() {
                Some(tls) => shared.tasks.spawn(serve_tls(stream, tls, open)),
                None => shared.tasks.spawn(async move {
                    serve(stream, &open.0).await;
                    drop(open);
                }),
            };
        }
    }
}

/// A connection being counted against the limit, for as long as its task holds it.
struct Open(Arc<Shared>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.metrics.open_connections.dec();
    }
}

/// Answers a connection over the limit, then closes it once the client has read the answer (or
/// after [`REFUSAL_LINGER`]): closing with its request unread would reset the connection and
/// could destroy the answer.
async fn refuse(mut stream: impl Io, refusal: Bytes) {
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        stream.write_all(&refusal).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 512];
        while stream.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    })
    .await;
}

/// [`refuse`] over TLS: the answer can only be read after a handshake, and an `h2` client
/// reads it as the answer to its first request.
async fn refuse_tls(stream: TcpStream, tls: TlsAcceptor) {
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        let Ok(stream) = tls.accept(stream).await else {
            return;
        };
        if stream.get_ref().1.alpn_protocol() != Some(crate::tls::ALPN_H2) {
            return refuse(stream, too_many_connections()).await;
        }
        let service = hyper::service::service_fn(|_request| async {
            let mut response = Response::new(Body::from(too_many_connections_body()));
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            Ok::<_, std::convert::Infallible>(response)
        });
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new()).max_concurrent_streams(1);
        let _ = builder
            .serve_connection(TokioIo::new(stream), service)
            .await;
    })
    .await;
}

/// Serves one TLS connection after its handshake: HTTP/2 if the client chose `h2`, otherwise as
/// a cleartext connection is served.
async fn serve_tls(io: Connection, tls: TlsAcceptor, open: Open) {
    let shared = &open.0;
    let handshake = tokio::time::timeout(shared.header_timeout, tls.accept(io));
    let io = tokio::select! {
        io = handshake => match io {
            Ok(Ok(io)) => io,
            _ => return, // not TLS, a certificate the client refused, or too slow
        },
        _ = shared.shutdown.wait() => return,
    };
    if io.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2) {
        return Box::pin(with_h2(shared, io)).await;
    }
    serve(io, shared).await
}

/// Serves one connection: its first request here, the rest with hyper.
///
/// The connection's task holds this future for as long as the connection lives, sized for its
/// largest state. So every state but the event stream's (hyper's connections, the router's call,
/// a whole response) is boxed: an idle stream's task was 4.2 KB, most of it room for states it was
/// not in.
async fn serve(mut io: impl Io, shared: &Shared) {
    let read = tokio::time::timeout(shared.header_timeout, head::read_head(&mut io));
    let head = tokio::select! {
        head = read => match head {
            Ok(Some(head)) => head.freeze(),
            _ => return, // gone, or too slow to say anything
        },
        _ = shared.shutdown.wait() => return,
    };
    if is_h2_preface(&head) {
        return Box::pin(with_h2(shared, Rewind::h2(head, io))).await;
    }
    let Some(plain) = head::plain_get(&head) else {
        return Box::pin(with_hyper(shared, Rewind::new(head, io))).await;
    };
    drop(head);
    let response = match Box::pin(shared.app.clone().oneshot(plain.request)).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    if response.extensions().get::<StreamOnSocket>().is_some() {
        shared.direct_streams.fetch_add(1, Ordering::Relaxed);
        return direct::write_stream(io, response, &shared.metrics).await;
    }
    let close = plain.close || shared.shutdown.is_triggered();
    if Box::pin(direct::write_whole(&mut io, response, close))
        .await
        .is_err()
        || close
    {
        let _ = io.shutdown().await;
        return;
    }
    Box::pin(with_hyper(shared, Rewind::new(Bytes::new(), io))).await
}

/// Whether a connection's first bytes are (the start of) the HTTP/2 preface. The head reader
/// stops at the preface's `HTTP/2`, which no HTTP/1 request line has.
fn is_h2_preface(head: &[u8]) -> bool {
    let n = head.len().min(H2_PREFACE.len());
    n >= "PRI * HTTP/2".len() && head[..n] == H2_PREFACE[..n]
}

/// Serves an HTTP/2 connection with hyper, every request through the same router; on shutdown
/// sends `GOAWAY` and lets the streams end (they end by themselves on shutdown).
async fn with_h2(shared: &Shared, io: impl Io) {
    let streams = stall::Streams::new();
    // Each stream's task holds the router's future until the response head is out, then the
    // body, in one allocation sized for the larger: boxed, the router's future takes no room in
    // an open stream's task.
    let app = ServiceExt::<axum::http::Request<hyper::body::Incoming>>::map_future(
        shared.app.clone(),
        |response| Box::pin(async move { response.await.map(stall::watch) }),
    );
    let service = TowerToHyperService::new(app);
    let executor = stall::Executor {
        streams: streams.clone(),
    };
    let mut builder = hyper::server::conn::http2::Builder::new(executor);
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(shared.max_streams)
        // The same cap as an HTTP/1.1 head; CONTINUATION frames count toward it.
        .max_header_list_size(head::MAX_HEAD as u32)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(MAX_LOCAL_RESETS)
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    // A stream whose client stopped reading is cut after write_timeout (`stall`).
    let watchdog = async {
        let mut look = tokio::time::interval(stall::Streams::look_every(shared.write_timeout));
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            look.tick().await;
            streams.cut_stalled(shared.write_timeout, &shared.metrics);
        }
    };
    tokio::select! {
        _ = until_done(connection, &shared.shutdown) => {}
        _ = watchdog => {}
    }
}

/// Drives a hyper connection to its end; on shutdown, starts its graceful end (HTTP/2: `GOAWAY`)
/// and lets the responses in progress finish.
async fn until_done(connection: impl GracefulConnection, shutdown: &Shutdown) {
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = shutdown.wait() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// Serves the rest of a connection with hyper; on shutdown, lets the response in progress end
/// (streams end by themselves on shutdown) and closes.
async fn with_hyper(shared: &Shared, io: Rewind<impl Io>) {
    let service = TowerToHyperService::new(shared.app.clone());
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.header_timeout)
        // Hyper's default header limit is `head::MAX_HEADERS` (tested: `431` past it).
        .max_buf_size(head::MAX_HEAD);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    until_done(connection, &shared.shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_states_its_length_right() {
        let refusal = too_many_connections();
        let text = std::str::from_utf8(&refusal).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "too_many_connections");
    }
}
