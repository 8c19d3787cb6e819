//! The per-node topic hub.
//!
//! A topic is *active* on a node while at least one of the node's clients reads it. An active
//! topic has exactly one store subscription ([`Store::watch`]) and one *pump* task, whatever the
//! number of clients. The pump turns store announcements into a gap-free, ordered feed: it
//! delivers an announced event only if the event's predecessor is the last one it delivered,
//! and otherwise reads the stream from there. The feed goes to the node's clients through a
//! bounded in-memory broadcast.
//!
//! Each client runs a [`Session`]: it joins the topic's broadcast *first*, then replays history
//! from its cursor in pages, then reads the broadcast, skipping what it already sent. Because the
//! broadcast was joined before the replay read the store, every event is either replayed or
//! broadcast after joining, and ids tell which were already sent: the seam has no gap and no
//! duplicate. A client that falls behind the broadcast replays from the store again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{debug, warn};

use crate::config::Settings;
use crate::event::{Event, StreamId, Topic};
use crate::shutdown::Shutdown;
use crate::sse;
use crate::store::{GapReason, Signal, Store, StoreError};

/// Messages queued per pump before the dispatcher stops queueing and flags a read instead.
const PUMP_QUEUE: usize = 1024;
/// Pause before a pump retries a failed store read.
const PUMP_RETRY: Duration = Duration::from_millis(250);

/// One node's active topics.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    /// Where events live; also the source of announcements.
    store: Arc<dyn Store>,
    /// Active topics, by name. Joining and leaving happen under this lock, and so do the
    /// store's watch/unwatch calls, which keeps them in order.
    topics: Mutex<HashMap<String, Slot>>,
    /// Capacity of each topic's broadcast; a client further behind replays from the store.
    fanout_buffer: usize,
    /// Events per store read.
    page_size: usize,
    /// The `retry:` sent to clients, and the random extra added on shutdown.
    retry: Duration,
    retry_spread: Duration,
    /// Running pump tasks, to prove that released topics leave nothing behind.
    pumps: AtomicUsize,
    /// Times a client fell behind the in-memory feed and caught up from the store.
    catch_ups: AtomicU64,
    /// Ends pumps and sessions.
    shutdown: Shutdown,
}

struct Slot {
    topic: Arc<TopicHandle>,
    /// Clients of this node reading the topic; the slot goes when it drops to zero.
    members: usize,
}

/// What sessions and the dispatcher hold of an active topic.
struct TopicHandle {
    name: Topic,
    /// The live feed; sessions subscribe to it.
    feed: broadcast::Sender<Item>,
    /// The pump's inbox. Dropping the last handle closes it and ends the pump.
    pump_tx: mpsc::Sender<PumpMessage>,
    /// Set when the pump's inbox was full and a message was dropped: the pump must read.
    overflow: Arc<AtomicBool>,
    /// True once the pump knows where the feed starts; until then a replay cannot hand over.
    pump_ready: watch::Receiver<bool>,
}

/// An item of a topic's live feed.
#[derive(Clone, Debug)]
pub enum Item {
    /// The next event, already encoded.
    Event(Arc<Delivery>),
    /// The feed could not follow the stream (history trimmed under it, or the stream reset):
    /// every session re-reads from its own cursor.
    Resync,
}

/// An event as fanned out: its id and its encoded frame, shared by every client.
#[derive(Debug)]
pub struct Delivery {
    pub id: StreamId,
    pub frame: Bytes,
}

enum PumpMessage {
    Announced { prev: StreamId, event: Event },
    Read,
}

impl Hub {
    /// Starts the dispatcher, which routes store signals to pumps and periodically makes every
    /// pump check its stream.
    pub fn start(store: Arc<dyn Store>, settings: &Settings, shutdown: Shutdown) -> Hub {
        let inner = Arc::new(Inner {
            store,
            topics: Mutex::new(HashMap::new()),
            fanout_buffer: settings.fanout_buffer,
            page_size: settings.replay_page_size,
            retry: settings.retry,
            retry_spread: settings.shutdown_retry_spread,
            pumps: AtomicUsize::new(0),
            catch_ups: AtomicU64::new(0),
            shutdown,
        });
        if let Some(signals) = inner.store.take_signals() {
            tokio::spawn(dispatch(
                Arc::downgrade(&inner),
                signals,
                settings.catchup_interval,
            ));
        }
        Hub { inner }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// Topics with at least one client on this node.
    pub fn active_topics(&self) -> usize {
        self.inner.lock().len()
    }

    /// Pump tasks still running.
    pub fn running_pumps(&self) -> usize {
        self.inner.pumps.load(Ordering::Acquire)
    }

    /// Times a client fell behind the in-memory feed and caught up from the store.
    pub fn catch_ups(&self) -> u64 {
        self.inner.catch_ups.load(Ordering::Relaxed)
    }

    /// Opens a session on `topic`, resuming after `cursor` (`None`: only new events).
    pub async fn subscribe(
        &self,
        topic: Topic,
        cursor: Option<StreamId>,
    ) -> Result<Session, StoreError> {
        let membership = self.join(&topic);
        let feed = membership.topic.feed.subscribe();
        let pump_ready = membership.topic.pump_ready.clone();
        let cursor = match cursor {
            Some(c) => c,
            None => self.inner.store.tail(&topic).await?,
        };
        Ok(Session {
            store: self.inner.store.clone(),
            page_size: self.inner.page_size,
            shutdown: self.inner.shutdown.clone(),
            retry: self.inner.retry,
            retry_spread: self.inner.retry_spread,
            said_goodbye: false,
            topic,
            cursor,
            replaying: true,
            feed,
            pump_ready,
            membership,
        })
    }

    fn join(&self, topic: &Topic) -> Membership {
        let mut topics = self.inner.lock();
        let slot = topics
            .entry(topic.as_str().to_owned())
            .or_insert_with(|| Slot {
                topic: self.inner.activate(topic),
                members: 0,
            });
        slot.members += 1;
        Membership {
            topic: slot.topic.clone(),
            hub: self.inner.clone(),
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches the topic and starts its pump. Called under the topics lock.
    fn activate(self: &Arc<Self>, topic: &Topic) -> Arc<TopicHandle> {
        let (feed, _) = broadcast::channel(self.fanout_buffer);
        let (pump_tx, pump_rx) = mpsc::channel(PUMP_QUEUE);
        let (ready_tx, pump_ready) = watch::channel(false);
        let overflow = Arc::new(AtomicBool::new(false));
        let watching = self.store.watch(topic);
        self.pumps.fetch_add(1, Ordering::AcqRel);
        let pump = Pump {
            hub: self.clone(),
            topic: topic.clone(),
            feed: feed.clone(),
            inbox: pump_rx,
            overflow: overflow.clone(),
            last: StreamId::ZERO,
        };
        tokio::spawn(pump.run(watching, ready_tx));
        Arc::new(TopicHandle {
            name: topic.clone(),
            feed,
            pump_tx,
            overflow,
            pump_ready,
        })
    }

    fn leave(&self, topic: &TopicHandle) {
        let mut topics = self.lock();
        let Some(slot) = topics.get_mut(topic.name.as_str()) else {
            return;
        };
        slot.members -= 1;
        if slot.members == 0 {
            topics.remove(topic.name.as_str());
            self.store.unwatch(&topic.name);
        }
    }

    fn handles(&self) -> Vec<Arc<TopicHandle>> {
        self.lock().values().map(|s| s.topic.clone()).collect()
    }

    fn handle(&self, topic: &str) -> Option<Arc<TopicHandle>> {
        self.lock().get(topic).map(|s| s.topic.clone())
    }
}

impl TopicHandle {
    fn send(&self, message: PumpMessage) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.pump_tx.try_send(message) {
            self.overflow.store(true, Ordering::Release);
        }
    }
}

/// A client's hold on a topic; releases it when dropped (the client went away).
struct Membership {
    topic: Arc<TopicHandle>,
    hub: Arc<Inner>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.leave(&self.topic);
    }
}

/// Routes store signals to pumps, and pokes every pump each `catchup_interval`.
async fn dispatch(
    hub: std::sync::Weak<Inner>,
    mut signals: mpsc::UnboundedReceiver<Signal>,
    catchup_interval: Duration,
) {
    let shutdown = match hub.upgrade() {
        Some(h) => h.shutdown.clone(),
        None => return,
    };
    let mut catchup = tokio::time::interval(catchup_interval);
    catchup.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let signal = tokio::select! {
            s = signals.recv() => match s { Some(s) => s, None => return },
            _ = catchup.tick() => Signal::CatchUpAll,
            _ = shutdown.wait() => return,
        };
        let Some(hub) = hub.upgrade() else { return };
        match signal {
            Signal::Appended { topic, prev, event } => {
                if let Some(h) = hub.handle(&topic) {
                    h.send(PumpMessage::Announced { prev, event });
                }
            }
            Signal::Poke { topic } => {
                if let Some(h) = hub.handle(&topic) {
                    h.send(PumpMessage::Read);
                }
            }
            Signal::CatchUpAll => {
                for h in hub.handles() {
                    h.send(PumpMessage::Read);
                }
            }
        }
    }
}

/// Keeps one topic's live feed in step with its stream.
struct Pump {
    hub: Arc<Inner>,
    topic: Topic,
    feed: broadcast::Sender<Item>,
    inbox: mpsc::Receiver<PumpMessage>,
    overflow: Arc<AtomicBool>,
    /// Id of the last event put on the feed (or where the feed started).
    last: StreamId,
}

impl Pump {
    async fn run(mut self, watching: oneshot::Receiver<()>, ready: watch::Sender<bool>) {
        let shutdown = self.hub.shutdown.clone();
        tokio::select! {
            _ = self.start(watching, &ready) => {}
            _ = shutdown.wait() => {}
        }
        self.hub.pumps.fetch_sub(1, Ordering::AcqRel);
        debug!(topic = %self.topic, "pump stopped");
    }

    async fn start(&mut self, watching: oneshot::Receiver<()>, ready: &watch::Sender<bool>) {
        // Announcements flow from here on, so reading the tail now misses nothing.
        if watching.await.is_err() {
            return;
        }
        loop {
            match self.hub.store.tail(&self.topic).await {
                Ok(tail) => {
                    self.last = tail;
                    break;
                }
                Err(e) => {
                    warn!(topic = %self.topic, error = %e, "pump cannot read the stream tail");
                    if !self.pause_unless_released().await {
                        return;
                    }
                }
            }
        }
        let _ = ready.send(true);
        let mut must_read = false;
        loop {
            let message = if must_read {
                tokio::select! {
                    m = self.inbox.recv() => m,
                    _ = tokio::time::sleep(PUMP_RETRY) => Some(PumpMessage::Read),
                }
            } else {
                self.inbox.recv().await
            };
            let Some(message) = message else { return };
            must_read = match message {
                PumpMessage::Announced { prev, event } => {
                    if event.id <= self.last {
                        must_read // already on the feed
                    } else if prev == self.last && !must_read {
                        self.put(&event);
                        false
                    } else {
                        true
                    }
                }
                PumpMessage::Read => true,
            };
            if self.overflow.swap(false, Ordering::AcqRel) {
                must_read = true;
            }
            if must_read {
                match self.catch_up().await {
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

    fn put(&mut self, event: &Event) {
        self.last = event.id;
        let delivery = Delivery {
            id: event.id,
            frame: sse::event_frame(event),
        };
        // No receivers is fine: the topic is being released.
        let _ = self.feed.send(Item::Event(Arc::new(delivery)));
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
                self.last = self.hub.store.tail(&self.topic).await?;
                let _ = self.feed.send(Item::Resync);
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

/// One client's stream: replay from the cursor, then the live feed.
pub struct Session {
    store: Arc<dyn Store>,
    page_size: usize,
    shutdown: Shutdown,
    retry: Duration,
    retry_spread: Duration,
    /// Whether the jittered `retry:` was sent on shutdown.
    said_goodbye: bool,
    topic: Topic,
    /// Id of the last event sent to the client (or its starting cursor).
    cursor: StreamId,
    /// Reading from the store rather than the feed.
    replaying: bool,
    feed: broadcast::Receiver<Item>,
    pump_ready: watch::Receiver<bool>,
    /// Held for the session's life: dropping it releases the topic.
    membership: Membership,
}

/// What a session produces next.
pub enum Output {
    /// Frames to send.
    Frames(Bytes),
    /// Nothing happened within the wait: send a heartbeat if due.
    Idle,
    /// The session is over (shutdown, or the store failed; the client reconnects).
    End,
}

impl Session {
    /// Produces the next frames, waiting at most until `idle` completes when live.
    pub async fn next(&mut self, idle: impl std::future::Future<Output = ()>) -> Output {
        tokio::pin!(idle);
        loop {
            if self.shutdown.is_triggered() {
                return self.farewell();
            }
            if self.replaying {
                match self.replay_page().await {
                    Ok(Some(frames)) => return Output::Frames(frames),
                    Ok(None) => continue,
                    Err(e) => {
                        warn!(topic = %self.topic, error = %e, "replay failed; ending the stream");
                        return Output::End;
                    }
                }
            }
            let item = tokio::select! {
                item = self.feed.recv() => item,
                _ = &mut idle => return Output::Idle,
                _ = self.shutdown.wait() => return self.farewell(),
            };
            match item {
                Ok(Item::Event(d)) if d.id > self.cursor => {
                    self.cursor = d.id;
                    return Output::Frames(d.frame.clone());
                }
                Ok(Item::Event(_)) => {} // sent during the replay
                Ok(Item::Resync) => self.replaying = true,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.membership
                        .hub
                        .catch_ups
                        .fetch_add(1, Ordering::Relaxed);
                    self.replaying = true;
                }
                Err(broadcast::error::RecvError::Closed) => return Output::End,
            }
        }
    }

    /// On shutdown: first a `retry:` with a random extra delay, so clients of this node come back
    /// spread out over the others; then the end.
    fn farewell(&mut self) -> Output {
        if self.said_goodbye {
            return Output::End;
        }
        self.said_goodbye = true;
        let spread = self.retry_spread.as_millis() as u64;
        let extra = if spread == 0 {
            0
        } else {
            rand::random_range(0..=spread)
        };
        Output::Frames(sse::retry_frame(self.retry.as_millis() as u64 + extra))
    }

    /// Reads one page after the cursor. `None` when there was nothing to send.
    async fn replay_page(&mut self) -> Result<Option<Bytes>, StoreError> {
        // A read that starts after the pump is ready covers everything the feed will not carry.
        let pump_was_ready = *self.pump_ready.borrow();
        let page = self
            .store
            .read(&self.topic, self.cursor, self.page_size)
            .await?;
        let mut out = BytesMut::new();
        if let Some(reason) = page.gap {
            out.extend_from_slice(&gap_frame(
                self.cursor,
                reason,
                page.events.first().map(|e| e.id),
            ));
            if page.events.is_empty() {
                // Nothing retained: carry on from wherever the stream is now.
                self.cursor = self.store.tail(&self.topic).await?;
            }
        }
        for event in &page.events {
            out.extend_from_slice(&sse::event_frame(event));
            self.cursor = event.id;
        }
        if page.events.len() < self.page_size {
            if pump_was_ready {
                self.replaying = false;
            } else {
                let mut ready = self.pump_ready.clone();
                tokio::select! {
                    started = ready.wait_for(|r| *r) => {
                        if started.is_err() {
                            // The pump ended without starting (the store went away).
                            return Err(StoreError::Unavailable("the topic's live feed stopped".into()));
                        }
                    }
                    _ = self.shutdown.wait() => {}
                }
            }
        }
        Ok((!out.is_empty()).then(|| out.freeze()))
    }
}

/// The `ssegate.gap` notice: which cursor could not be honoured, why, and the id delivery
/// resumes from (`null`: nothing retained, delivery resumes with the next new event).
fn gap_frame(cursor: StreamId, reason: GapReason, resume_from: Option<StreamId>) -> Bytes {
    let data = serde_json::json!({
        "cursor": cursor.to_string(),
        "reason": reason.as_str(),
        "resume_from": resume_from.map(|id| id.to_string()),
    });
    sse::frame(None, Some(sse::GAP_EVENT), &data.to_string())
}
