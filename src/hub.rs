//! The per-node topic hub.
//!
//! A topic is *active* on a node while at least one of the node's clients reads it. An active
//! topic has exactly one store subscription ([`Store::watch`]) and one *pump* task, whatever the
//! number of clients. The pump turns store announcements into a gap-free, ordered feed: it
//! delivers an announced event only if the event's predecessor is the last one it delivered,
//! and otherwise reads the stream from there. The feed goes to the node's clients through a
//! bounded in-memory broadcast.
//!
//! Each client runs a [`Session`]: it joins the topic's broadcast *first*, noting the topic's
//! *horizon* (the last id the pump had fed when the session joined), then replays history from
//! its cursor in pages, then reads the broadcast, skipping what it already sent. Everything after
//! the horizon reaches the session through the broadcast, so the replay only has to reach the
//! horizon; ids tell which broadcast events were already sent: the seam has no gap and no
//! duplicate. A client that falls behind the broadcast replays from the store again.
//!
//! Replay pages are shared: sessions of one node resuming a topic from the same cursor within
//! `replay_sharing` get one store read, encoded once (a reconnect storm costs a handful of
//! reads, not one per client). A shared page may be older than a session's horizon; the session
//! then reads again, from where the page ended, with a read started after it joined. A client
//! whose cursor already is the horizon, or that gives no cursor, reads nothing at all.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::future::{BoxFuture, FutureExt, Shared};
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
    /// How long a replay read serves other sessions resuming from the same cursor. A shared
    /// page holds at most `page_size` events, so little memory lingers.
    replay_sharing: Duration,
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
    /// The id of the last event the pump put on the feed (first: where the feed starts);
    /// `None` until the pump knows. A session's replay must reach the value it saw on joining.
    fed: watch::Receiver<Option<StreamId>>,
    /// Replay pages being read or read lately, by cursor, shared by the topic's sessions.
    replays: Mutex<Replays>,
}

/// Recent replay reads of one topic.
#[derive(Default)]
struct Replays {
    by_cursor: HashMap<StreamId, SharedReplay>,
    /// Cursors in the order their reads started, to drop expired reads cheaply.
    started: VecDeque<(u64, StreamId)>,
    /// Numbers reads in the order they started; a session compares it with the number it saw
    /// when it joined to tell whether a read began after that.
    last_number: u64,
}

/// A replay read any number of sessions can await.
#[derive(Clone)]
struct SharedReplay {
    /// Orders the read against sessions joining (see [`Replays::last_number`]).
    number: u64,
    started: Instant,
    page: Shared<BoxFuture<'static, Result<Arc<ReplayPage>, StoreError>>>,
}

/// One page of history after a cursor, as sent to every session that resumes from it.
#[derive(Debug)]
struct ReplayPage {
    /// The gap notice, if any, then the events, encoded.
    frames: Bytes,
    /// The cursor after this page.
    next: StreamId,
    /// The page holds as many events as asked for: more may follow at once.
    full: bool,
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
            replay_sharing: settings.replay_sharing,
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
        let place = membership.topic.place();
        let cursor = match (cursor, place.horizon) {
            (Some(c), _) => c,
            // Only new events: everything after the horizon comes through the feed.
            (None, Some(horizon)) => horizon,
            (None, None) => self.inner.store.tail(&topic).await?,
        };
        Ok(Session {
            said_goodbye: false,
            cursor,
            // Up to date with the feed already: nothing to read.
            replaying: place.horizon != Some(cursor),
            feed,
            place,
            reread: None,
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
        let (fed_tx, fed) = watch::channel(None);
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
            fed: fed_tx,
        };
        tokio::spawn(pump.run(watching));
        Arc::new(TopicHandle {
            name: topic.clone(),
            feed,
            pump_tx,
            overflow,
            fed,
            replays: Mutex::new(Replays::default()),
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

    fn replays(&self) -> std::sync::MutexGuard<'_, Replays> {
        self.replays.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where a session stands, taken right after it joined (or rejoined) the feed: the horizon
    /// (`None` while the pump does not know where the feed starts) and the number of the last
    /// replay read started so far. Every event the session will not get from the feed is at most
    /// the horizon, and was in the store before any read numbered higher started.
    fn place(&self) -> Place {
        Place {
            read_number: self.replays().last_number,
            horizon: *self.fed.borrow(),
        }
    }

    /// The page after `cursor`: a read shared with other sessions, or a new one. With
    /// `started_after`, only a read started after that read number will do.
    fn replay(&self, hub: &Inner, cursor: StreamId, started_after: Option<u64>) -> SharedReplay {
        let sharing = hub.replay_sharing;
        let now = Instant::now();
        let mut replays = self.replays();
        while let Some(&(number, oldest)) = replays.started.front() {
            match replays.by_cursor.get(&oldest) {
                Some(r) if r.number == number && now - r.started < sharing => break,
                Some(r) if r.number == number => {
                    replays.by_cursor.remove(&oldest);
                }
                _ => {}
            }
            replays.started.pop_front();
        }
        if let Some(r) = replays.by_cursor.get(&cursor) {
            let usable = started_after.is_none_or(|n| r.number > n)
                && !matches!(r.page.peek(), Some(Err(_)));
            if usable {
                return r.clone();
            }
        }
        replays.last_number += 1;
        let number = replays.last_number;
        let read = read_replay(hub.store.clone(), self.name.clone(), cursor, hub.page_size);
        let shared = SharedReplay {
            number,
            started: now,
            page: read.boxed().shared(),
        };
        replays.by_cursor.insert(cursor, shared.clone());
        replays.started.push_back((number, cursor));
        shared
    }
}

/// A session's place in its topic's feed (see [`TopicHandle::place`]).
#[derive(Clone, Copy)]
struct Place {
    horizon: Option<StreamId>,
    read_number: u64,
}

/// Reads and encodes one replay page.
async fn read_replay(
    store: Arc<dyn Store>,
    topic: Topic,
    cursor: StreamId,
    page_size: usize,
) -> Result<Arc<ReplayPage>, StoreError> {
    let page = store.read(&topic, cursor, page_size).await?;
    let mut frames = BytesMut::new();
    let mut next = cursor;
    if let Some(reason) = page.gap {
        let resume_from = page.events.first().map(|e| e.id);
        frames.extend_from_slice(&gap_frame(cursor, reason, resume_from));
        if let (None, Some(end)) = (resume_from, page.resume_after) {
            // Nothing retained: carry on after wherever the stream ended.
            next = end;
        }
    }
    for event in &page.events {
        frames.extend_from_slice(&sse::event_frame(event));
        next = event.id;
    }
    Ok(Arc::new(ReplayPage {
        frames: frames.freeze(),
        next,
        full: page.events.len() >= page_size,
    }))
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
    /// `last`, published to sessions once the pump knows where the feed starts.
    fed: watch::Sender<Option<StreamId>>,
}

impl Pump {
    async fn run(mut self, watching: oneshot::Receiver<()>) {
        let shutdown = self.hub.shutdown.clone();
        tokio::select! {
            _ = self.start(watching) => {}
            _ = shutdown.wait() => {}
        }
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
                    if !self.pause_unless_released().await {
                        return;
                    }
                }
            }
        }
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

    fn set_last(&mut self, id: StreamId) {
        self.last = id;
        self.fed.send_replace(Some(id));
    }

    /// Puts an event on the feed. `fed` moves first, so a session that joins the feed after the
    /// event went out sees a horizon that includes it.
    fn put(&mut self, event: &Event) {
        self.set_last(event.id);
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
                let tail = self.hub.store.tail(&self.topic).await?;
                self.set_last(tail);
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
    /// Whether the jittered `retry:` was sent on shutdown.
    said_goodbye: bool,
    /// Id of the last event sent to the client (or its starting cursor).
    cursor: StreamId,
    /// Reading from the store rather than the feed.
    replaying: bool,
    feed: broadcast::Receiver<Item>,
    /// Where the session joined the feed, or last fell behind it.
    place: Place,
    /// Set when a replay page ended before the horizon: the next read must have started after
    /// this read number.
    reread: Option<u64>,
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
            if self.membership.hub.shutdown.is_triggered() {
                return self.farewell();
            }
            if self.replaying {
                match self.replay_page().await {
                    Ok(Some(frames)) => return Output::Frames(frames),
                    Ok(None) => continue,
                    Err(e) => {
                        warn!(topic = %self.membership.topic.name, error = %e, "replay failed; ending the stream");
                        return Output::End;
                    }
                }
            }
            let item = tokio::select! {
                item = self.feed.recv() => item,
                _ = &mut idle => return Output::Idle,
                _ = self.membership.hub.shutdown.wait() => return self.farewell(),
            };
            match item {
                Ok(Item::Event(d)) if d.id > self.cursor => {
                    self.cursor = d.id;
                    return Output::Frames(d.frame.clone());
                }
                Ok(Item::Event(_)) => {} // sent during the replay
                Ok(Item::Resync) => self.replay_again(),
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.membership
                        .hub
                        .catch_ups
                        .fetch_add(1, Ordering::Relaxed);
                    self.replay_again();
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
        let hub = &self.membership.hub;
        let spread = hub.retry_spread.as_millis() as u64;
        let extra = if spread == 0 {
            0
        } else {
            rand::random_range(0..=spread)
        };
        Output::Frames(sse::retry_frame(hub.retry.as_millis() as u64 + extra))
    }

    /// Back to the store, from a new place in the feed.
    fn replay_again(&mut self) {
        self.place = self.membership.topic.place();
        self.reread = None;
        self.replaying = true;
    }

    /// Sends one page after the cursor. `None` when there was nothing to send.
    async fn replay_page(&mut self) -> Result<Option<Bytes>, StoreError> {
        let topic = &self.membership.topic;
        let read = topic.replay(&self.membership.hub, self.cursor, self.reread);
        let page = read.page.await?;
        self.cursor = page.next;
        if !page.full {
            // The store has nothing more; the feed carries what comes after the horizon.
            let horizon = match self.place.horizon {
                Some(h) => h,
                None => match self.await_pump().await? {
                    Some(h) => h,
                    None => return Ok(None), // shutting down
                },
            };
            if self.cursor >= horizon || read.number > self.place.read_number {
                // The page reached the horizon, or was read after the session joined (then the
                // store had every event the feed will not carry).
                self.replaying = false;
                self.reread = None;
            } else {
                // A shared page from before the session joined: read on from where it ended.
                self.reread = Some(self.place.read_number);
            }
        }
        Ok((!page.frames.is_empty()).then(|| page.frames.clone()))
    }

    /// Waits until the pump knows where the feed starts, and takes the session's place anew.
    /// `None` on shutdown.
    async fn await_pump(&mut self) -> Result<Option<StreamId>, StoreError> {
        let mut fed = self.membership.topic.fed.clone();
        tokio::select! {
            started = fed.wait_for(Option::is_some) => {
                if started.is_err() {
                    // The pump ended without starting (the store went away).
                    return Err(StoreError::Unavailable("the topic's live feed stopped".into()));
                }
            }
            _ = self.membership.hub.shutdown.wait() => return Ok(None),
        }
        // Events before the pump started are not on the feed: a read must start after this.
        self.place = self.membership.topic.place();
        Ok(self.place.horizon)
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
