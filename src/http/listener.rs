//! The TCP listener: every accepted connection gets a write deadline.
//!
//! An SSE response never ends, so a client that stops reading would otherwise hold its
//! connection (and its topic subscription) forever once the socket buffers fill. A write that
//! cannot make progress for `write_timeout` fails instead; the connection closes, and the client,
//! when it comes back, resumes from its `Last-Event-ID`. Idle streams have no pending write and
//! are not affected.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_io_timeout::TimeoutStream;

/// A connection with a write deadline.
pub type Connection = Pin<Box<TimeoutStream<TcpStream>>>;

pub struct DeadlineListener {
    inner: TcpListener,
    write_timeout: Duration,
}

impl DeadlineListener {
    pub fn new(inner: TcpListener, write_timeout: Duration) -> Self {
        DeadlineListener {
            inner,
            write_timeout,
        }
    }
}

impl axum::serve::Listener for DeadlineListener {
    type Io = Connection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    // Small frames go out at once rather than waiting for more.
                    let _ = stream.set_nodelay(true);
                    let mut stream = TimeoutStream::new(stream);
                    stream.set_write_timeout(Some(self.write_timeout));
                    return (Box::pin(stream), addr);
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
