//! A connection's first request head: read into a small buffer, and turned into an
//! [`http::Request`] when it is a plain `GET` that hyper would read the same way. Anything else
//! is left to hyper, which then reads the same bytes and answers as it answers every connection.

use axum::body::Body;
use axum::http::{header, HeaderName, HeaderValue, Method, Request, Uri, Version};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest request head, on both paths (hyper's read buffer is capped to it as well); a longer
/// one is answered `431`.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header lines in a request, on both paths; more are answered `431`. Hyper's own default,
/// which it is left at: given a limit, hyper fills two header arrays of that size for every
/// request instead of using its inline ones (~1k instructions a publish).
pub const MAX_HEADERS: usize = 100;

/// Reads until the request head is complete, unparseable or too long. `None`: the client went
/// away first.
pub async fn read_head(io: &mut (impl AsyncRead + Unpin)) -> Option<BytesMut> {
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

/// A first request the listener can hand to the router itself.
pub struct Plain {
    pub request: Request<Body>,
    /// The client asked to close the connection after the response.
    pub close: bool,
}

/// The request in `head`, if it is a complete HTTP/1.1 `GET` with no body, nothing after it,
/// and a URI and headers that hyper would accept as they are. `None` for anything else.
pub fn plain_get(head: &Bytes) -> Option<Plain> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(len)) = parsed.parse(head) else {
        return None;
    };
    if len != head.len() || parsed.method != Some("GET") || parsed.version != Some(1) {
        return None;
    }
    // The same parse hyper does, so the router sees the same URI (fragments dropped, invalid
    // characters refused) whichever path a request takes.
    let target = parsed.path?;
    let uri = Uri::from_maybe_shared(head.slice_ref(target.as_bytes())).ok()?;
    let mut request = Request::new(Body::empty());
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    let mut close = false;
    let map = request.headers_mut();
    map.reserve(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_maybe_shared(head.slice_ref(h.value)).ok()?;
        let has_body =
            (name == header::CONTENT_LENGTH && value != "0") || name == header::TRANSFER_ENCODING;
        if has_body || name == header::UPGRADE || name == header::EXPECT {
            return None;
        }
        if name == header::CONNECTION {
            close |= value
                .to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
        }
        map.append(name, value);
    }
    Some(Plain { request, close })
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::ReadBuf;

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

    fn plain(head: &str) -> Option<Plain> {
        plain_get(&Bytes::copy_from_slice(head.as_bytes()))
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
        assert!(plain_get(&head.freeze()).is_some());
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
        assert!(plain_get(&head.freeze()).is_none());
    }

    #[test]
    fn plain_gets_become_requests_with_hypers_uri() {
        let p =
            plain("GET /v1/events?topic=news HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 5-1\r\n\r\n")
                .unwrap();
        assert_eq!(p.request.uri().query(), Some("topic=news"));
        assert_eq!(p.request.headers()["last-event-id"], "5-1");
        assert!(!p.close);
        let p = plain("GET /v1/events?topic=a#b HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(p.request.uri().query(), Some("topic=a"), "fragment dropped");
        let p = plain("GET /healthz HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n").unwrap();
        assert!(p.close);
    }

    #[test]
    fn anything_unusual_is_left_to_hyper() {
        for other in [
            "POST /v1/events?topic=news HTTP/1.1\r\n\r\n",
            "HEAD /v1/events?topic=news HTTP/1.1\r\n\r\n",
            "OPTIONS /v1/events HTTP/1.1\r\n\r\n",
            "GET /v1/events?topic=news HTTP/1.0\r\n\r\n",
            "GET /v1/events?topic=a\"b HTTP/1.1\r\n\r\n",
            "GET /v1/events?topic=news HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "GET /v1/events?topic=news HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /v1/events?topic=news HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET /v1/events?topic=news HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n",
            "GET /v1/events?topic=news HTTP/1.1\r\n",
            "GET /v1/events?topic=news HTTP/1.1\r\nbad header\r\n\r\n",
        ] {
            assert!(plain(other).is_none(), "{other:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::proptest_config("hostile_heads_never_panic"))]
        #[test]
        fn hostile_heads_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            let _ = plain_get(&Bytes::from(bytes));
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::proptest_config("hostile_request_lines_never_panic"))]
        /// Well-formed enough to reach the URI and header checks, with anything in them.
        #[test]
        fn hostile_request_lines_never_panic(
            target in "[ -~]{0,300}",
            headers in proptest::collection::vec(("[ -~]{0,24}", "[ -~\\x80-\\xff\\t]{0,64}"), 0..80),
        ) {
            let mut head = format!("GET {target} HTTP/1.1\r\n");
            for (name, value) in &headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str("\r\n");
            if let Some(plain) = plain_get(&Bytes::from(head)) {
                let _ = plain.request.uri().to_string();
            }
        }
    }
}
