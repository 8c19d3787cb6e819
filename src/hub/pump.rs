//! A topic's pump: turns the store's announcements into a gap-free, ordered feed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tracing::{debug, warn};

use super::feed::Feed;
use super::{Delivery, Inner, Item};
use crate::event::{Event, StreamId, Topic};
use crate::sse;
use crate::store::{GapReason, StoreError};

/// Pause before a pump retries a failed store read.
const PUMP_RETRY: Duration = Duration::from_millis(250);

pub(super) enum PumpMessage {
    /// Entry `id` exists: read up to it unless the feed is there already.
    ReadTo(StreamId),
    /// An event appended after `prev`, or (`None`) after what was announced before it.
    Announced {
        prev: Option<StreamId>,
        event: Event,
    },
    Read,
    /// The topic was deleted; its ids up to this one are gone (see [`Item::Removed`]).
    Removed(StreamId),
}

/// A pump's inbox: a queue that grows with what is waiting and is empty (allocating nothing)
/// while the topic is quiet. Past its limit, messages are dropped and the pump told to read the
/// stream instead, which covers whatever they said.
pub(super) struct Inbox {
    queue: Mutex<VecDeque<PumpMessage>>,
    limit: usize,
    /// A message was dropped: the pump must read.
    overflow: AtomicBool,
    /// The topic was released: the pump ends.
    closed: AtomicBool,
    /// Wakes the pump.
    ready: Notify,
}

impl Inbox {
    pub(super) fn new(limit: usize) -> Arc<Inbox> {
        Arc::new(Inbox {
            queue: Mutex::new(VecDeque::new()),
            limit,
            overflow: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            ready: Notify::new(),
        })
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<PumpMessage>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn send(&self, message: PumpMessage) {
        let mut queue = self.queue();
        if queue.len() >= self.limit {
            self.overflow.store(true, Ordering::Release);
        } else {
            queue.push_back(message);
        }
        drop(queue);
        self.ready.notify_one();
    }

    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    /// The next message; `None` once the topic is released.
    async fn recv(&self) -> Option<PumpMessage> {
        loop {
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            {
                let mut queue = self.queue();
                if let Some(message) = queue.pop_front() {
                    if queue.is_empty() {
                        // A quiet topic's inbox holds no memory.
                        *queue = VecDeque::new();
                    }
                    return Some(message);
                }
            }
            if self.overflow.load(Ordering::Acquire) {
                return Some(PumpMessage::Read);
            }
            // One consumer: a notification sent meanwhile is kept as a permit.
            self.ready.notified().await;
        }
    }

    /// Whether messages were dropped since the last call.
    fn take_overflow(&self) -> bool {
        self.overflow.swap(false, Ordering::AcqRel)
    }
}

/// Keeps one topic's live feed in step with its stream.
pub(super) struct Pump {
    hub: Arc<Inner>,
    topic: Topic,
    feed: Arc<Feed<Item>>,
    inbox: Arc<Inbox>,
    /// Id of the last event put on the feed (or where the feed started).
    last: StreamId,
}

impl Pump {
    pub(super) fn new(
        hub: Arc<Inner>,
        topic: Topic,
        feed: Arc<Feed<Item>>,
        inbox: Arc<Inbox>,
    ) -> Pump {
        Pump {
            hub,
            topic,
            feed,
            inbox,
            last: StreamId::ZERO,
        }
    }

    pub(super) async fn run(mut self, watching: oneshot::Receiver<()>) {
        let shutdown = self.hub.shutdown.clone();
        tokio::select! {
            _ = self.start(watching) => {}
            _ = shutdown.wait() => {}
        }
        // Sessions still reading get what is left, then end (and their clients reconnect).
        self.feed.close();
        self.hub.pumps.fetch_sub(1, Ordering::AcqRel);
        debug!(topic = %self.topic, "pump stopped");
    }

    async fn start(&mut self, watching: oneshot::Receiver<()>) {
        // Announcements flow from here on, so reading the tail now misses nothing.
        if watching.await.is_err() {
            return;
        }
        loop {
            match self.hub.store.tail(&self.topic).await {
                Ok(tail) => {
                    self.set_last(tail);
                    break;
                }
                Err(e) => {
                    warn!(topic = %self.topic, error = %e, "pump cannot read the stream tail");
                    if !Box::pin(self.pause_unless_released()).await {
                        return;
                    }
                }
            }
        }
        let mut must_read = false;
        loop {
            let message = if must_read {
                // Boxed, as the rare states below: a pump's future keeps room for its largest
                // state for the topic's whole life, and a retry's timer is most of it.
                let inbox = &self.inbox;
                Box::pin(async move {
                    tokio::select! {
                        m = inbox.recv() => m,
                        _ = tokio::time::sleep(PUMP_RETRY) => Some(PumpMessage::Read),
                    }
                })
                .await
            } else {
                self.inbox.recv().await
            };
            let Some(message) = message else { return };
            must_read = match message {
                PumpMessage::Announced { prev, event } => {
                    if event.id <= self.last {
                        must_read // already on the feed
                    } else if !must_read && prev.is_none_or(|prev| prev == self.last) {
                        self.put(&event);
                        false
                    } else {
                        true
                    }
                }
                PumpMessage::ReadTo(id) => must_read || id > self.last,
                PumpMessage::Read => true,
                PumpMessage::Removed(upto) => {
                    // The feed says so first; what the new stream has follows it. A pump that
                    // already read past the delete (a read found the old stream gone) has
                    // nothing to start again.
                    self.feed.send(Item::Removed(upto), None);
                    if self.last <= upto {
                        self.set_last(StreamId::ZERO);
                    }
                    true
                }
            };
            if self.inbox.take_overflow() {
                must_read = true;
            }
            if must_read {
                // Boxed: the pump waits on its inbox nearly all its life (see the session's
                // replay).
                match Box::pin(self.catch_up()).await {
                    Ok(()) => must_read = false,
                    Err(e) => warn!(topic = %self.topic, error = %e, "pump cannot read the stream"),
                }
            }
        }
    }

    /// Waits before a retry; false if the topic was released meanwhile.
    async fn pause_unless_released(&mut self) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(PUMP_RETRY) => true,
            m = self.inbox.recv() => m.is_some(),
        }
    }

    fn set_last(&mut self, id: StreamId) {
        self.last = id;
        self.feed.set_horizon(id);
    }

    /// Puts an event on the feed, moving the horizon with it.
    fn put(&mut self, event: &Event) {
        self.last = event.id;
        let delivery = Delivery {
            id: event.id,
            frame: sse::event_frame(event),
            event: event.clone(),
        };
        self.feed
            .send(Item::Event(Arc::new(delivery)), Some(event.id));
    }

    /// Reads the stream after the last delivered event and feeds what it finds.
    async fn catch_up(&mut self) -> Result<(), StoreError> {
        let page_size = self.hub.page_size;
        loop {
            let page = self
                .hub
                .store
                .read(&self.topic, self.last, page_size)
                .await?;
            if let Some(reason) = page.gap {
                // The feed cannot continue where it was; sessions re-read from their cursors.
                warn!(topic = %self.topic, reason = reason.as_str(), after = %self.last, "live feed lost its place");
                if reason == GapReason::UnknownCursor {
                    // The stream lost what this node delivered (a failover to a replica without
                    // it): new events must come after it, whatever the new master's clock says.
                    if self.hub.store.fence(&self.topic, self.last).await? {
                        warn!(topic = %self.topic, above = %self.last, "stream fenced past the ids it lost");
                    }
                }
                let tail = self.hub.store.tail(&self.topic).await?;
                self.last = tail;
                self.feed.send(Item::Resync, Some(tail));
                return Ok(());
            }
            let full = page.events.len() >= page_size;
            for event in &page.events {
                self.put(event);
            }
            if !full {
                return Ok(());
            }
        }
    }
}
