//! HTTP/2 event streams whose client stopped reading are cut after `write_timeout`, as a stalled
//! HTTP/1.1 connection is.
//!
//! Over HTTP/2 the socket keeps moving for the connection's other streams, so the socket's write
//! deadline never fires for one stream whose flow-control window stays full. hyper stops polling
//! such a stream's body while its last chunk waits for window, and has no call that resets one
//! stream from outside. So:
//! - every stream hyper spawns for the connection runs under a [`Guarded`] future (the
//!   connection's [`Executor`]), which ends, dropping hyper's stream, when told to: h2 then resets
//!   the stream (`RST_STREAM CANCEL`) and the connection's other streams go on;
//! - an event stream's body is [`Watched`]: it notes when it hands hyper a chunk and when hyper
//!   comes back for the next one;
//! - the connection's [`Streams::cut_stalled`] runs every quarter of `write_timeout` and cuts a
//!   stream whose chunk has waited longer than `write_timeout`. Its client resumes from its
//!   `Last-Event-ID`.
//!
//! A stream whose client reads is never cut: its chunks (heartbeats included) are taken on in
//! time, however slowly they trickle. What this costs an event stream: its state (about 48
//! bytes), a box around its body and a pointer in its connection's list; other requests get the
//! state only.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Response};
use futures_util::task::AtomicWaker;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::metrics::Metrics;

tokio::task_local! {
    /// The stream whose task is running: how the body made for it finds its state.
    static CURRENT: Watch;
}

/// One stream's state, shared by its [`Guarded`] task, its [`Watched`] body and its
/// connection's list.
#[derive(Default)]
struct StreamState {
    /// When (ms after the connection's epoch, plus one) the body handed hyper a chunk that hyper
    /// has not come back after; 0 while none waits.
    waiting_since: AtomicU64,
    /// Set by the watchdog: the stream's task ends.
    cut: AtomicBool,
    /// The stream's task, woken to end.
    waker: AtomicWaker,
}

/// A connection's event streams, for its watchdog.
pub(super) struct Streams {
    /// What stream times count from.
    epoch: Instant,
    /// The connection's event streams; gone ones are dropped at each look.
    watched: Mutex<Vec<Weak<StreamState>>>,
}

/// A stream's state and its connection's list, handed to the stream's task.
#[derive(Clone)]
struct Watch {
    state: Arc<StreamState>,
    streams: Arc<Streams>,
}

impl Streams {
    pub(super) fn new() -> Arc<Streams> {
        Arc::new(Streams {
            epoch: Instant::now(),
            watched: Mutex::new(Vec::new()),
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Cuts every stream whose chunk has waited longer than `timeout`, counting each.
    pub(super) fn cut_stalled(&self, timeout: Duration, metrics: &Metrics) {
        let now = self.now();
        let limit = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        watched.retain(|weak| {
            let Some(state) = weak.upgrade() else {
                return false;
            };
            let since = state.waiting_since.load(Ordering::Acquire);
            if since != 0 && now.saturating_sub(since) > limit {
                state.cut.store(true, Ordering::Release);
                state.waker.wake();
                metrics.slow_client_disconnects.inc();
                return false;
            }
            true
        });
    }

    /// How often [`Streams::cut_stalled`] should run for `timeout`.
    pub(super) fn look_every(timeout: Duration) -> Duration {
        (timeout / 4).max(Duration::from_millis(25))
    }
}

/// The executor of an HTTP/2 connection's streams: each runs [`Guarded`].
#[derive(Clone)]
pub(super) struct Executor {
    pub(super) streams: Arc<Streams>,
}

impl<F> hyper::rt::Executor<F> for Executor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        let watch = Watch {
            state: Arc::new(StreamState::default()),
            streams: self.streams.clone(),
        };
        let state = watch.state.clone();
        tokio::spawn(Guarded {
            future: CURRENT.scope(watch, future),
            state,
        });
    }
}

pin_project_lite::pin_project! {
    /// A stream's task: hyper's, until the watchdog cuts it.
    struct Guarded<F> {
        #[pin]
        future: F,
        state: Arc<StreamState>,
    }
}

impl<F: Future<Output = ()>> Future for Guarded<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let me = self.project();
        me.state.waker.register(cx.waker());
        if me.state.cut.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        me.future.poll(cx)
    }
}

/// Watches `response`'s body if it is an event stream served on an HTTP/2 stream of an
/// [`Executor`]; anything else passes unchanged.
pub(super) fn watch(response: Response<Body>) -> Response<Body> {
    let is_stream = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !is_stream {
        return response;
    }
    let Ok(watch) = CURRENT.try_with(Watch::clone) else {
        return response;
    };
    {
        let mut watched = watch
            .streams
            .watched
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        watched.push(Arc::downgrade(&watch.state));
    }
    response.map(|body| {
        Body::new(Watched {
            body,
            state: watch.state,
            streams: watch.streams,
        })
    })
}

pin_project_lite::pin_project! {
    /// An event stream's body, noting when a chunk it handed over waits.
    struct Watched {
        #[pin]
        body: Body,
        state: Arc<StreamState>,
        streams: Arc<Streams>,
    }
}

impl HttpBody for Watched {
    type Data = <Body as HttpBody>::Data;
    type Error = <Body as HttpBody>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let me = self.project();
        // hyper is back: the chunk handed before (if any) went on.
        me.state.waiting_since.store(0, Ordering::Release);
        let frame = me.body.poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &frame {
            if f.is_data() {
                me.state
                    .waiting_since
                    .store(me.streams.now(), Ordering::Release);
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
