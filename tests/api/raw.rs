//! A raw HTTP/1.1 client over one TCP connection: tests decide exactly which connection a request
//! travels on (new or kept-alive) and may send bytes no HTTP library would.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::PATIENCE;

/// A response as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    pub status: u16,
    /// Names lowercased, in the order sent.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked; for a stream, what was read of it.
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub struct Raw {
    stream: TcpStream,
    /// Bytes read but not yet consumed.
    buf: Vec<u8>,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// A connection that has served one request (`GET /healthz`) already: the next request on
    /// it is read by hyper, not by the listener.
    pub async fn kept_alive(addr: SocketAddr) -> Raw {
        let mut raw = Raw::connect(addr).await;
        let r = raw
            .request("GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n", None)
            .await;
        assert_eq!(r.status, 200);
        raw
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Sends `request` and reads the response. A chunked body is read until `until` is found
    /// in it (or it ends); others by their length.
    pub async fn request(&mut self, request: &str, until: Option<&str>) -> RawResponse {
        self.send(request.as_bytes()).await.unwrap();
        self.response(until).await
    }

    pub async fn response(&mut self, until: Option<&str>) -> RawResponse {
        tokio::time::timeout(PATIENCE, self.read_response(until))
            .await
            .expect("a response in time")
    }

    async fn read_response(&mut self, until: Option<&str>) -> RawResponse {
        let (status, headers) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 100];
            let mut parsed = httparse::Response::new(&mut slots);
            if let httparse::Status::Complete(len) = parsed.parse(&self.buf).unwrap() {
                let status = parsed.code.unwrap();
                let headers = parsed
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect::<Vec<_>>();
                self.buf.drain(..len);
                break (status, headers);
            }
            assert!(
                self.fill().await,
                "connection closed before a response head"
            );
        };
        let find = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let body = if find("transfer-encoding").as_deref() == Some("chunked") {
            self.chunked(until).await
        } else {
            let len: usize = find("content-length").map_or(0, |l| l.parse().unwrap());
            while self.buf.len() < len {
                assert!(self.fill().await, "connection closed inside a body");
            }
            self.buf.drain(..len).collect()
        };
        RawResponse {
            status,
            headers,
            body,
        }
    }

    /// De-chunks until `until` appears in the body, or the last chunk.
    async fn chunked(&mut self, until: Option<&str>) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            if until.is_some_and(|u| contains(&body, u.as_bytes())) {
                return body;
            }
            let Some(line_end) = find(&self.buf, b"\r\n") else {
                if !self.fill().await {
                    return body;
                }
                continue;
            };
            let size_line = std::str::from_utf8(&self.buf[..line_end]).unwrap();
            let size = usize::from_str_radix(size_line.trim(), 16).unwrap();
            if self.buf.len() < line_end + 2 + size + 2 {
                if !self.fill().await {
                    return body;
                }
                continue;
            }
            body.extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
            self.buf.drain(..line_end + 2 + size + 2);
            if size == 0 {
                return body;
            }
        }
    }

    /// Reads on in a chunked body already under way until `until` appears; the text read.
    pub async fn response_continues(&mut self, until: &str) -> String {
        let body = tokio::time::timeout(PATIENCE, self.chunked(Some(until)))
            .await
            .expect("more of the stream in time");
        String::from_utf8_lossy(&body).into_owned()
    }

    /// Reads more; false when the connection ended.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Waits until the server closes the connection (reading and discarding); false if it is
    /// still open after `patience`.
    pub async fn closed_within(&mut self, patience: Duration) -> bool {
        tokio::time::timeout(patience, async { while self.fill().await {} })
            .await
            .is_ok()
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}
