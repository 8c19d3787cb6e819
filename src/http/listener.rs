//! The TCP listener. Every accepted connection gets a write deadline; a connection whose first
//! request is a valid subscription is streamed right here, on the socket; every other connection
//! goes on to hyper and the router, with the bytes already read put back in front.
//!
//! **Write deadline.** An SSE response never ends, so a client that stops reading would otherwise
//! hold its connection (and its topic subscription) forever once the socket buffers fill. A write
//! that cannot make progress for `write_timeout` fails instead; the connection closes, and the
//! client, when it comes back, resumes from its `Last-Event-ID`. Idle streams have no pending
//! write and are not affected.
//!
//! **Direct streams.** An event stream lives for hours and, once its request is read, only ever
//! writes. Hyper keeps a read buffer (16 KiB after the first request) and a write buffer (8 KiB)
//! for the life of every connection, which for an idle stream is most of what it costs. Here the
//! request head is read into a small buffer that is dropped once parsed, and frames go from the
//! topic's shared buffers straight to the socket. Anything unusual (another route, a request
//! body, pipelined bytes, HTTP/1.0, an invalid subscription, a store error) goes to hyper, so the
//! router answers it exactly as it answers everything else; a subscription on a kept-alive
//! connection is served by the router too.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_io_timeout::TimeoutStream;
use tokio_util::task::TaskTracker;

use super::events;
use super::AppState;
use crate::event::{StreamId, Topic};
use crate::shutdown::Shutdown;

/// A connection with a write deadline.
pub type Connection = Pin<Box<TimeoutStream<TcpStream>>>;

/// Longest request head read here; a longer one goes to hyper, which refuses it.
const MAX_HEAD: usize = 16 * 1024;
/// Headers parsed here; a request with more goes to hyper.
const MAX_HEADERS: usize = 64;
/// Time a new connection gets to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

pub struct GatewayListener {
    inner: TcpListener,
    /// Connections for hyper, from the tasks that read their first request head.
    for_hyper: mpsc::Receiver<(Rewind, SocketAddr)>,
    shared: Arc<Shared>,
}

/// What the per-connection tasks need.
struct Shared {
    write_timeout: Duration,
    state: AppState,
    for_hyper: mpsc::Sender<(Rewind, SocketAddr)>,
    /// The per-connection tasks, so that shutdown can wait for direct streams to end.
    tasks: TaskTracker,
    /// Streams served here rather than by the router.
    direct_streams: Arc<AtomicU64>,
    /// Stops waiting for request heads and for hyper to take connections.
    shutdown: Shutdown,
}

impl GatewayListener {
    pub fn new(
        inner: TcpListener,
        state: AppState,
        tasks: TaskTracker,
        shutdown: Shutdown,
    ) -> Self {
        let (tx, for_hyper) = mpsc::channel(1024);
        GatewayListener {
            inner,
            for_hyper,
            shared: Arc::new(Shared {
                write_timeout: state.settings.write_timeout,
                state,
                for_hyper: tx,
                tasks,
                direct_streams: Arc::new(AtomicU64::new(0)),
                shutdown,
            }),
        }
    }

    /// Counts the streams served directly (the rest went through the router).
    pub fn direct_streams(&self) -> Arc<AtomicU64> {
        self.shared.direct_streams.clone()
    }
}

impl axum::serve::Listener for GatewayListener {
    type Io = Rewind;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                Some(handed) = self.for_hyper.recv() => return handed,
                accepted = self.inner.accept() => match accepted {
                    Ok((stream, addr)) => {
                        // Small frames go out at once rather than waiting for more.
                        let _ = stream.set_nodelay(true);
                        let mut stream = TimeoutStream::new(stream);
                        stream.set_write_timeout(Some(self.shared.write_timeout));
                        let shared = self.shared.clone();
                        self.shared
                            .tasks
                            .spawn(first_request(Box::pin(stream), addr, shared));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Reads a connection's first request head, then streams it or hands the connection to hyper.
async fn first_request(mut io: Connection, addr: SocketAddr, shared: Arc<Shared>) {
    let head = tokio::select! {
        head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut io)) => match head {
            Ok(Some(head)) => head,
            _ => return, // gone, or too slow to say anything
        },
        _ = shared.shutdown.wait() => return,
    };
    if let Some((topic, cursor)) = direct_subscription(&head) {
        if let Ok(session) = shared.state.hub.subscribe(topic, cursor).await {
            drop(head);
            shared.direct_streams.fetch_add(1, Ordering::Relaxed);
            stream(io, events::event_stream(session, &shared.state.settings)).await;
            return;
        }
        // The router subscribes again and answers the store's error.
    }
    let rewound = Rewind {
        prefix: head.freeze(),
        io,
    };
    tokio::select! {
        _ = shared.for_hyper.send((rewound, addr)) => {}
        _ = shared.shutdown.wait() => {}
    }
}

/// Reads until the request head is complete, unparseable or too long. `None`: the client went
/// away first.
async fn read_head(io: &mut (impl AsyncRead + Unpin)) -> Option<BytesMut> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(buf.len());
        }
        match io.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match httparse::Request::new(&mut headers).parse(&buf) {
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            _ => return Some(buf),
        }
    }
}

/// The topic and cursor of a plain, valid subscription: a complete `GET /v1/events` HTTP/1.1
/// head with no body and nothing after it. `None` for anything else.
fn direct_subscription(head: &[u8]) -> Option<(Topic, Option<StreamId>)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(len)) = request.parse(head) else {
        return None;
    };
    if len != head.len() || request.method != Some("GET") || request.version != Some(1) {
        return None;
    }
    let target = request.path?;
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    if path != "/v1/events" {
        return None;
    }
    let mut last_event_id = None;
    for header in request.headers.iter() {
        let name = header.name;
        let has_body = (name.eq_ignore_ascii_case("content-length") && header.value != b"0")
            || name.eq_ignore_ascii_case("transfer-encoding");
        if has_body || name.eq_ignore_ascii_case("upgrade") || name.eq_ignore_ascii_case("expect") {
            return None;
        }
        if name.eq_ignore_ascii_case("last-event-id") && last_event_id.is_none() {
            last_event_id = Some(header.value);
        }
    }
    events::subscription(query, last_event_id).ok()
}

/// Writes a `200` event stream in chunked framing until it ends or the client goes away: its
/// side of the connection ends or fails, or a write misses its deadline.
async fn stream(mut io: Connection, frames: impl Stream<Item = Bytes>) {
    let mut head = String::from("HTTP/1.1 200 OK\r\n");
    for (name, value) in events::STREAM_HEADERS {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("transfer-encoding: chunked\r\n\r\n");
    if io.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let mut frames = std::pin::pin!(frames);
    // The client sends nothing more that matters; reading only tells when it is gone.
    let mut discard = [0u8; 64];
    loop {
        tokio::select! {
            frame = frames.next() => {
                let Some(frame) = frame else { break };
                // Frames already waiting (a busy topic) go out in the same write.
                let mut chunk = Chunk::default();
                chunk.push(frame);
                let mut ended = false;
                while chunk.parts.len() < MAX_FRAMES_PER_WRITE {
                    match frames.next().now_or_never() {
                        Some(Some(frame)) => chunk.push(frame),
                        Some(None) => {
                            ended = true;
                            break;
                        }
                        None => break,
                    }
                }
                if chunk.len > 0 && io.write_all_buf(&mut chunk.framed()).await.is_err() {
                    return;
                }
                if ended {
                    break;
                }
            }
            read = io.read(&mut discard) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
    let _ = io.write_all(b"0\r\n\r\n").await;
    let _ = io.shutdown().await;
}

/// Most frames gathered into one write; with the chunk's size line and end, they fit the 64
/// slices a vectored write takes at once.
const MAX_FRAMES_PER_WRITE: usize = 60;

/// Frames gathered for one HTTP chunk.
#[derive(Default)]
struct Chunk {
    parts: VecDeque<Bytes>,
    len: usize,
}

impl Chunk {
    fn push(&mut self, frame: Bytes) {
        // An empty part would be harmless, but an empty chunk ends the response.
        if !frame.is_empty() {
            self.len += frame.len();
            self.parts.push_back(frame);
        }
    }

    /// The frames with the chunk's size line before and its line end after.
    fn framed(mut self) -> Self {
        let size = Bytes::from(format!("{:x}\r\n", self.len));
        self.len += size.len() + 2;
        self.parts.push_front(size);
        self.parts.push_back(Bytes::from_static(b"\r\n"));
        self
    }
}

/// Written with one vectored write where the socket takes it all.
impl Buf for Chunk {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |p| &p[..])
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [io::IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, part) in dst.iter_mut().zip(&self.parts) {
            *slot = io::IoSlice::new(part);
            n += 1;
        }
        n
    }

    fn advance(&mut self, mut cnt: usize) {
        self.len -= cnt;
        while cnt > 0 {
            let Some(front) = self.parts.front_mut() else {
                return;
            };
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.parts.pop_front();
        }
    }
}

/// A connection for hyper: the bytes already read come first.
pub struct Rewind {
    prefix: Bytes,
    io: Connection,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Let the head's buffer go.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        self.io.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io.as_mut().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io.as_mut().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// Gives its chunks one read at a time, as a slow client's packets arrive.
    struct Trickle(VecDeque<Vec<u8>>);

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(mut chunk) = self.0.pop_front() {
                let rest = chunk.split_off(chunk.len().min(buf.remaining()));
                buf.put_slice(&chunk);
                if !rest.is_empty() {
                    self.0.push_front(rest);
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    fn trickle(chunks: &[&[u8]]) -> Trickle {
        Trickle(chunks.iter().map(|c| c.to_vec()).collect())
    }

    #[tokio::test]
    async fn a_head_is_read_across_packets() {
        let parts: [&[u8]; 3] = [
            b"GET /v1/events?topic=a HT",
            b"TP/1.1\r\nHost: x\r\n",
            b"\r\n",
        ];
        let head = read_head(&mut trickle(&parts)).await.expect("a head");
        assert_eq!(&head[..], parts.concat());
        assert!(direct_subscription(&head).is_some());
    }

    #[tokio::test]
    async fn a_client_gone_before_its_head_ends_gets_nothing() {
        assert!(read_head(&mut trickle(&[b"GET /v1/ev"])).await.is_none());
    }

    #[tokio::test]
    async fn an_overlong_head_goes_to_hyper_whole() {
        let big = format!(
            "GET /v1/events?topic=a HTTP/1.1\r\nX: {}\r\n",
            "y".repeat(MAX_HEAD)
        );
        let head = read_head(&mut trickle(&[big.as_bytes(), b"\r\n"]))
            .await
            .expect("bytes");
        assert!(head.len() >= MAX_HEAD, "stops reading at the limit");
        assert!(direct_subscription(&head).is_none());
    }

    #[test]
    fn gathered_frames_make_one_chunk_however_the_socket_takes_them() {
        let mut chunk = Chunk::default();
        for frame in ["data: a\n\n", "", "data: bc\n\n"] {
            chunk.push(Bytes::from(frame));
        }
        let mut framed = chunk.framed();
        let mut written = Vec::new();
        // A socket taking 4 bytes at a time splits parts anywhere.
        while framed.has_remaining() {
            let mut slices = [io::IoSlice::new(&[]); 64];
            let n = framed.chunks_vectored(&mut slices);
            let flat: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
            let take = flat.len().min(4);
            written.extend_from_slice(&flat[..take]);
            framed.advance(take);
        }
        assert_eq!(written, b"13\r\ndata: a\n\ndata: bc\n\n\r\n");
    }

    #[test]
    fn only_plain_valid_subscriptions_are_streamed_directly() {
        let direct = |head: &str| direct_subscription(head.as_bytes());
        let (topic, cursor) =
            direct("GET /v1/events?topic=news HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!((topic.as_str(), cursor), ("news", None));
        let (_, cursor) =
            direct("GET /v1/events?topic=news HTTP/1.1\r\nlast-event-id: 5-1\r\n\r\n").unwrap();
        assert_eq!(cursor, Some(StreamId::new(5, 1)));
        let (_, cursor) =
            direct("GET /v1/events?topic=n&lastEventId=7-0 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(cursor, Some(StreamId::new(7, 0)));

        for other in [
            "POST /v1/events?topic=news HTTP/1.1\r\n\r\n",
            "GET /v1/events?topic=news HTTP/1.0\r\n\r\n",
            "GET /healthz HTTP/1.1\r\n\r\n",
            "GET /v1/events/x?topic=news HTTP/1.1\r\n\r\n",
            "GET /v1/events HTTP/1.1\r\n\r\n",
            "GET /v1/events?topic=bad%20topic! HTTP/1.1\r\n\r\n",
            "GET /v1/events?topic=news HTTP/1.1\r\nLast-Event-ID: nope\r\n\r\n",
            "GET /v1/events?topic=news HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "GET /v1/events?topic=news HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /v1/events?topic=news HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET /v1/events?topic=news HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n",
            "GET /v1/events?topic=news HTTP/1.1\r\n",
        ] {
            assert!(direct(other).is_none(), "{other:?}");
        }
    }
}
