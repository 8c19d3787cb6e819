//! The IO hyper serves a connection through: the bytes the listener already read come first, the
//! close lingers, and hyper's empty answers to heads it cannot read become JSON ones.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection for hyper: the bytes already read come first.
///
/// Its close lingers (RFC 9112, 9.6, as nginx's `lingering_close`): hyper closes a connection
/// after answering an error decided while the request was still arriving (`431`, `400`, `413`),
/// and a socket closed with input unread is reset, which can destroy the answer before the
/// client reads it. So the write side is shut first (the answer, then FIN), and what the client
/// still sends is read and dropped until it closes too, or for at most [`LINGER`].
pub(super) struct Rewind<I> {
    prefix: Bytes,
    io: I,
    /// Whether the close lingers: HTTP/1.1 only. HTTP/2 says why it closes in `GOAWAY`, and a
    /// connection closed for flooding must stop being read.
    lingers: bool,
    /// Set once the write side is shut: the end of the lingering.
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The JSON answer written in place of hyper's empty one to a head it cannot read
    /// ([`json_answer`]), while some of it is still to be written.
    answer: Option<Bytes>,
}

/// The longest a closing connection reads what its client still sends.
const LINGER: Duration = Duration::from_secs(2);

impl<I> Rewind<I> {
    /// For HTTP/1.1: the close lingers.
    pub(super) fn new(prefix: Bytes, io: I) -> Rewind<I> {
        Rewind {
            prefix,
            io,
            lingers: true,
            linger: None,
            answer: None,
        }
    }

    /// For HTTP/2: the close does not linger.
    pub(super) fn h2(prefix: Bytes, io: I) -> Rewind<I> {
        Rewind {
            lingers: false,
            ..Rewind::new(prefix, io)
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
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
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> Rewind<I> {
    /// Takes `written` as hyper's next write; true if it was hyper's answer to an unreadable
    /// head, replaced (HTTP/1.1 only).
    fn replaces(&mut self, written: &[u8]) -> bool {
        if !self.lingers || self.answer.is_some() {
            return false;
        }
        self.answer = json_answer(written);
        self.answer.is_some()
    }

    /// Writes what is left of the replacing answer.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(answer) = &mut self.answer {
            let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, answer))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            answer.advance(n);
            if answer.is_empty() {
                self.answer = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.replaces(buf) {
            return Poll::Ready(Ok(buf.len()));
        }
        std::task::ready!(self.poll_answer(cx))?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // hyper's answer to an unreadable head is its head alone: one slice.
        let mut filled = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (filled.next(), filled.next()) {
            if self.replaces(only) {
                return Poll::Ready(Ok(only.len()));
            }
        }
        std::task::ready!(self.poll_answer(cx))?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_answer(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_answer(cx))?;
        if !this.lingers {
            return Pin::new(&mut this.io).poll_shutdown(cx);
        }
        let linger = match &mut this.linger {
            Some(linger) => linger,
            None => {
                std::task::ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
                this.linger.insert(Box::pin(tokio::time::sleep(LINGER)))
            }
        };
        let mut scratch = [0u8; 4096];
        loop {
            if linger.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => continue,
                // The client closed too, or the connection failed: nothing left to protect.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The JSON answer that replaces `written` when it is hyper's own answer to a request head it
/// could not read: its status line, `connection: close`, `content-length: 0` and a date, with no
/// body (hyper has no hook for these). Every answer of the router's carries a body, so none
/// matches. `None` for anything else.
fn json_answer(written: &[u8]) -> Option<Bytes> {
    let text = std::str::from_utf8(written).ok()?;
    let (status, error, message) = if text.starts_with("HTTP/1.1 400 Bad Request\r\n") {
        (
            "400 Bad Request",
            "invalid_request",
            "the request head is not valid HTTP/1.1",
        )
    } else if text.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n") {
        (
            "431 Request Header Fields Too Large",
            "headers_too_large",
            "the request head is over 16 KiB or 100 header lines",
        )
    } else if text.starts_with("HTTP/1.1 414 URI Too Long\r\n") {
        (
            "414 URI Too Long",
            "uri_too_long",
            "the request target is too long",
        )
    } else {
        return None;
    };
    let head = text.strip_suffix("\r\n\r\n")?;
    let mut date = None;
    let (mut closes, mut empty) = (false, false);
    for line in head.split("\r\n").skip(1) {
        match line.split_once(": ") {
            Some(("connection", "close")) => closes = true,
            Some(("content-length", "0")) => empty = true,
            Some(("date", value)) => date = Some(value),
            _ => return None,
        }
    }
    if !(closes && empty) {
        return None;
    }
    let body = serde_json::json!({"error": error, "message": message}).to_string();
    let date = date.map(|d| format!("date: {d}\r\n")).unwrap_or_default();
    Some(Bytes::from(format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n\
         content-length: {}\r\n{date}\r\n{body}",
        body.len()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_answers_to_unreadable_heads_become_json() {
        let hyper = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\
                      content-length: 0\r\ndate: Mon, 07 Dec 2026 13:00:10 GMT\r\n\r\n";
        let answer = json_answer(hyper).unwrap();
        let text = std::str::from_utf8(&answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())));
        assert!(head.contains("\r\ndate: Mon, 07 Dec 2026 13:00:10 GMT"));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "headers_too_large");
    }

    #[test]
    fn other_answers_pass_unchanged() {
        for written in [
            // The router's own 400s carry a body.
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 20\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 7\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n",
            b"data: HTTP/1.1 400 Bad Request\r\n",
        ] {
            assert!(json_answer(written).is_none(), "{:?}", String::from_utf8_lossy(written));
        }
    }
}
