//! Writing a router's response straight onto the socket, for a connection's first request.
//!
//! An event stream lives for hours and, once its request is read, only ever writes. Hyper keeps
//! a read buffer (16 KiB after the first request) and a write buffer (8 KiB) for the life of
//! every connection, which for an idle stream would be most of what it costs. A response marked
//! [`StreamOnSocket`] is therefore written here: its head, then its body's frames in chunked
//! framing straight from the topic's shared buffers. Other responses to a first request are
//! written here whole, and the connection then goes on with hyper.
//!
//! Either way the response (status, every header, the body) is the router's, so the layers in
//! front of it apply exactly as they do to requests hyper serves.

use std::collections::VecDeque;
use std::io;
use std::time::SystemTime;

use axum::body::Body;
use axum::http::{header, HeaderMap, Response, StatusCode};
use bytes::{Buf, Bytes};
use futures_util::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::metrics::Metrics;

/// Marks a response whose body is a long-lived stream the listener may write on the socket
/// itself rather than through hyper.
#[derive(Clone, Copy, Debug)]
pub struct StreamOnSocket;

/// Largest body written whole; the router's bodies for plain `GET`s are small JSON documents.
const MAX_WHOLE_BODY: usize = 16 * 1024 * 1024;

/// Writes the response's status line and headers, then `framing` and `date` as hyper adds them.
fn head(status: StatusCode, headers: &HeaderMap, framing: &str, close: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(framing.as_bytes());
    out.extend_from_slice(b"\r\n");
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Writes a whole response with its length. An error means the connection is unusable.
pub async fn write_whole(
    io: &mut (impl AsyncWrite + Unpin),
    response: Response<Body>,
    close: bool,
) -> io::Result<()> {
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, MAX_WHOLE_BODY)
        .await
        .map_err(io::Error::other)?;
    let framing = format!("content-length: {}", body.len());
    let mut out = head(parts.status, &parts.headers, &framing, close);
    out.extend_from_slice(&body);
    io.write_all(&out).await?;
    // Over TLS, records the socket did not take yet wait in the session until flushed.
    io.flush().await
}

/// Writes a streamed response in chunked framing until it ends or the client goes away: its
/// side of the connection ends or fails, or a write misses its deadline.
pub async fn write_stream(
    mut io: impl AsyncRead + AsyncWrite + Unpin,
    response: Response<Body>,
    metrics: &Metrics,
) {
    let (parts, body) = response.into_parts();
    let head = head(
        parts.status,
        &parts.headers,
        "transfer-encoding: chunked",
        false,
    );
    drop(parts);
    // Every write is flushed: over TLS, records the socket did not take yet wait in the session
    // until then (on a plain socket a flush does nothing).
    if io.write_all(&head).await.is_err() || io.flush().await.is_err() {
        return;
    }
    drop(head);
    let mut frames = body.into_data_stream();
    // The client sends nothing more that matters; reading only tells when it is gone.
    let mut discard = [0u8; 64];
    // One chunk for the stream's life: its buffers are kept from one write to the next.
    let mut chunk = Chunk::default();
    loop {
        tokio::select! {
            // In order, not at random (no random number per frame); the read only ends a
            // stream whose client went away, which the next write also finds.
            biased;
            frame = frames.next() => {
                let Some(Ok(frame)) = frame else { break };
                // Frames already waiting (a busy topic) go out in the same write.
                chunk.push(frame);
                let mut ended = false;
                while chunk.parts.len() < MAX_FRAMES_PER_WRITE {
                    match frames.next().now_or_never() {
                        Some(Some(Ok(frame))) => chunk.push(frame),
                        Some(_) => {
                            ended = true;
                            break;
                        }
                        None => break,
                    }
                }
                if chunk.has_remaining() {
                    chunk.frame();
                    let written = match io.write_all_buf(&mut chunk).await {
                        Ok(()) => io.flush().await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = written {
                        if e.kind() == io::ErrorKind::TimedOut {
                            // The client stopped reading for write_timeout.
                            metrics.slow_client_disconnects.inc();
                        }
                        return;
                    }
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
    let _ = io.flush().await;
    let _ = io.shutdown().await;
}

/// Most frames gathered into one write; with the chunk's size line and end, they fit the 64
/// slices a vectored write takes at once.
const MAX_FRAMES_PER_WRITE: usize = 60;

/// Frames gathered for one HTTP chunk, then written with its size line before them and its
/// line end after. The size line lives in the chunk itself: every delivery writes one, and a
/// formatted `String` for it was an allocation per delivery.
#[derive(Default)]
struct Chunk {
    /// `<size in hex>\r\n`: at most 16 digits and the line end.
    size_line: [u8; 18],
    /// The unwritten part of the size line.
    size_from: usize,
    size_to: usize,
    /// The frames, unwritten.
    parts: VecDeque<Bytes>,
    /// How much of the `\r\n` after the frames is unwritten (0 until framed).
    tail: usize,
    /// Unwritten bytes in all.
    len: usize,
}

const CRLF: &[u8; 2] = b"\r\n";

impl Chunk {
    fn push(&mut self, frame: Bytes) {
        // An empty part would be harmless, but an empty chunk ends the response.
        if !frame.is_empty() {
            self.len += frame.len();
            self.parts.push_back(frame);
        }
    }

    /// Puts the size line before the frames pushed since the last write, and the line end
    /// after them. The hex digits are written by hand: `write!` into the array would run the
    /// formatting machinery once per delivery.
    fn frame(&mut self) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut digits = [0u8; 16];
        let mut first = digits.len();
        let mut size = self.len;
        loop {
            first -= 1;
            digits[first] = HEX[size & 0xf];
            size >>= 4;
            if size == 0 {
                break;
            }
        }
        let n = digits.len() - first;
        self.size_line[..n].copy_from_slice(&digits[first..]);
        self.size_line[n..n + 2].copy_from_slice(CRLF);
        self.size_from = 0;
        self.size_to = n + 2;
        self.tail = CRLF.len();
        self.len += self.size_to + self.tail;
    }

    fn unwritten_tail(&self) -> &[u8] {
        &CRLF[CRLF.len() - self.tail..]
    }
}

/// Written with one vectored write where the socket takes it all.
impl Buf for Chunk {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        if self.size_from < self.size_to {
            &self.size_line[self.size_from..self.size_to]
        } else if let Some(front) = self.parts.front() {
            front
        } else {
            self.unwritten_tail()
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [io::IoSlice<'a>]) -> usize {
        let size_line = &self.size_line[self.size_from..self.size_to];
        let slices = std::iter::once(size_line)
            .chain(self.parts.iter().map(|p| &p[..]))
            .chain(std::iter::once(self.unwritten_tail()))
            .filter(|s| !s.is_empty());
        let mut n = 0;
        for (slot, slice) in dst.iter_mut().zip(slices) {
            *slot = io::IoSlice::new(slice);
            n += 1;
        }
        n
    }

    fn advance(&mut self, mut cnt: usize) {
        self.len -= cnt;
        let from_size_line = cnt.min(self.size_to - self.size_from);
        self.size_from += from_size_line;
        cnt -= from_size_line;
        while cnt > 0 {
            let Some(front) = self.parts.front_mut() else {
                break;
            };
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.parts.pop_front();
        }
        self.tail -= cnt.min(self.tail);
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    /// Writes what the chunk holds as a socket taking `step` bytes at a time would, through
    /// `chunks_vectored` or `chunk` alone.
    fn write_out(chunk: &mut Chunk, step: usize, vectored: bool) -> Vec<u8> {
        let mut written = Vec::new();
        while chunk.has_remaining() {
            let flat: Vec<u8> = if vectored {
                let mut slices = [io::IoSlice::new(&[]); 64];
                let n = chunk.chunks_vectored(&mut slices);
                slices[..n].iter().flat_map(|s| s.iter().copied()).collect()
            } else {
                chunk.chunk().to_vec()
            };
            assert!(!flat.is_empty(), "bytes remain but none are offered");
            let take = flat.len().min(step);
            written.extend_from_slice(&flat[..take]);
            chunk.advance(take);
        }
        written
    }

    #[test]
    fn gathered_frames_make_one_chunk_however_the_socket_takes_them() {
        for step in [1, 3, 4, 7, 1000] {
            for vectored in [true, false] {
                // One chunk serves every write of a stream.
                let mut chunk = Chunk::default();
                for frame in ["data: a\n\n", "", "data: bc\n\n"] {
                    chunk.push(Bytes::from(frame));
                }
                chunk.frame();
                assert_eq!(
                    write_out(&mut chunk, step, vectored),
                    b"13\r\ndata: a\n\ndata: bc\n\n\r\n"
                );
                let big = "x".repeat(0x1f2e);
                chunk.push(Bytes::from(big.clone()));
                chunk.frame();
                let expected = format!("1f2e\r\n{big}\r\n");
                assert_eq!(write_out(&mut chunk, step, vectored), expected.as_bytes());
            }
        }
    }

    #[test]
    fn heads_carry_every_header_and_replace_the_framing() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("content-length", HeaderValue::from_static("999"));
        h.append("vary", HeaderValue::from_static("origin"));
        h.append(
            "vary",
            HeaderValue::from_static("access-control-request-method"),
        );
        let out =
            String::from_utf8(head(StatusCode::NOT_FOUND, &h, "content-length: 2", true)).unwrap();
        assert!(out.starts_with("HTTP/1.1 404 Not Found\r\n"), "{out}");
        assert!(out.contains("content-type: application/json\r\n"));
        assert!(out.contains("vary: origin\r\nvary: access-control-request-method\r\n"));
        assert!(out.contains("content-length: 2\r\n"));
        assert!(!out.contains("999"));
        assert!(out.contains("\r\ndate: "));
        assert!(out.ends_with("connection: close\r\n\r\n"));
    }
}
