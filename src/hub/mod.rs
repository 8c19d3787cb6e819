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
//!
//! A [`View`] is a topic seen through a filter: the events of a source topic that a predicate
//! keeps. It has no stream or pump of its own: its owner feeds it the source's events in order
//! (a protocol adapter that reads one stream for many subscriptions routes each event to the
//! views it concerns), and its sessions replay from the source's stream, filtered, with the same
//! seam as any topic's.
//!
//! # Layout
//!
//! - this module: the registry of active topics ([`Hub`]), views, and the dispatcher routing
//!   the store's announcements to them;
//! - `feed`: a topic's in-memory broadcast, which costs nothing while empty;
//! - `pump`: keeps a topic's feed in step with its stream;
//! - `replay`: replay pages, shared by sessions resuming from the same cursor;
//! - `session`: one client's replay → live state machine.

mod feed;
mod pump;
mod replay;
mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::debug;

use self::feed::Feed;
use self::pump::{Inbox, Pump, PumpMessage};
use self::replay::Replays;
pub use self::replay::{GapNotice, ReplayPage};
use self::session::{Membership, Place};
pub use self::session::{Output, Session};
use crate::config::Settings;
use crate::event::{Event, StreamId, Topic};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::sse;
use crate::store::{Signal, Store, StoreError, ADVANCED_BATCH};

/// Messages queued per pump before the dispatcher stops queueing and flags a read instead.
const PUMP_QUEUE: usize = 1024;

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
    /// Most events a topic's feed holds; a client further behind replays from the store.
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
    /// Catch-ups, replay reads and gap notices are counted here.
    metrics: Arc<Metrics>,
    /// Ends pumps and sessions.
    shutdown: Shutdown,
}

struct Slot {
    topic: Arc<TopicHandle>,
    /// Clients of this node reading the topic; the slot goes when it drops to zero.
    members: usize,
}

/// Which events of its stream a view keeps.
pub type Keep = Arc<dyn Fn(&Event) -> bool + Send + Sync>;

/// What sessions and the dispatcher hold of an active topic (or a view).
struct TopicHandle {
    /// The topic, or a view's source: replays read its stream.
    name: Topic,
    /// A view's filter; `None` for a topic. A view is not in the registry: it lives as long as
    /// its owner and its sessions hold it.
    keep: Option<Keep>,
    /// A view's labels: when some are given, its replays read only the events filed under them
    /// (see [`NewEvent::labels`](crate::event::NewEvent::labels)), not the whole stream.
    labels: Vec<String>,
    /// The live feed; sessions subscribe to it.
    feed: Arc<Feed<Item>>,
    /// The pump's inbox. Dropping the last handle closes it and ends the pump.
    inbox: Arc<Inbox>,
    /// Replay pages being read or read lately, by cursor, shared by the topic's sessions.
    replays: Mutex<Replays>,
    /// Counts [`Item::Ended`]s sent: a session that fell behind the feed (and so may have
    /// missed one) compares it with the count it joined under.
    ends: AtomicU32,
}

/// An item of a topic's live feed.
#[derive(Clone, Debug)]
pub enum Item {
    /// The next event, already encoded.
    Event(Arc<Delivery>),
    /// The feed could not follow the stream (history trimmed under it, or the stream reset):
    /// every session re-reads from its own cursor.
    Resync,
    /// Something for the topic's readers that is not one of its events (see
    /// [`Store::notify`]): no id, so it moves no cursor and cannot break the seam.
    Notice(Arc<NoticeDelivery>),
    /// The topic was deleted: every id up to this one is gone, and the items after this one
    /// are of a new stream, starting from nothing. A session still at or before it tells its
    /// client (`ssegate.gap`, reason `deleted`) and goes on from nothing.
    Removed(StreamId),
    /// Every session of the topic on this node ends now (a disconnect named it); their clients
    /// reconnect as after any drop. Sessions that join later are not affected.
    Ended,
}

/// A notice as fanned out: its frame, encoded once, and its parts for streams that encode it
/// otherwise (multi-topic).
#[derive(Debug)]
pub struct NoticeDelivery {
    pub event: String,
    pub data: String,
    /// `event:` and `data:` lines, no `id:`.
    pub frame: Bytes,
}

/// An event as fanned out: its id and its encoded frame, shared by every client.
#[derive(Debug)]
pub struct Delivery {
    pub id: StreamId,
    /// The event's single-topic frame, encoded once.
    pub frame: Bytes,
    /// The event itself, for streams that encode it otherwise (multi-topic).
    pub event: Event,
}

impl Hub {
    /// Starts the dispatcher, which routes store signals to pumps and periodically makes every
    /// pump check its stream.
    pub fn start(
        store: Arc<dyn Store>,
        settings: &Settings,
        shutdown: Shutdown,
        metrics: Arc<Metrics>,
    ) -> Hub {
        let inner = Arc::new(Inner {
            store,
            topics: Mutex::new(HashMap::new()),
            fanout_buffer: settings.fanout_buffer,
            page_size: settings.replay_page_size,
            replay_sharing: settings.replay_sharing,
            retry: settings.retry,
            retry_spread: settings.shutdown_retry_spread,
            pumps: AtomicUsize::new(0),
            metrics,
            shutdown,
        });
        if let Some(signals) = inner.store.take_signals() {
            tokio::spawn(dispatch(Arc::downgrade(&inner), signals));
        }
        tokio::spawn(safety_net(
            Arc::downgrade(&inner),
            settings.catchup_interval,
        ));
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
        self.inner.metrics.catch_ups.get()
    }

    /// Opens a session on `topic`, resuming after `cursor` (`None`: only new events).
    pub async fn subscribe(
        &self,
        topic: Topic,
        cursor: Option<StreamId>,
    ) -> Result<Session, StoreError> {
        let membership = self.join(&topic);
        self.open(membership, cursor).await
    }

    /// Opens a session on a view, resuming after `cursor` (`None`: only new events).
    pub async fn subscribe_view(
        &self,
        view: &View,
        cursor: Option<StreamId>,
    ) -> Result<Session, StoreError> {
        let membership = Membership {
            topic: view.handle.clone(),
            hub: self.inner.clone(),
        };
        self.open(membership, cursor).await
    }

    /// A view of `source` keeping what `keep` keeps; its feed starts after `horizon`, the last
    /// event of the source its owner has fed on (or past) when it makes the view. With
    /// `labels`, every event it keeps is filed under one of them, and replays read only those.
    pub fn view(&self, source: Topic, horizon: StreamId, keep: Keep, labels: Vec<String>) -> View {
        let handle = Arc::new(TopicHandle {
            name: source,
            keep: Some(keep),
            labels,
            feed: Feed::new(self.inner.fanout_buffer),
            inbox: Inbox::new(0),
            replays: Mutex::new(Replays::default()),
            ends: AtomicU32::new(0),
        });
        handle.feed.set_horizon(horizon);
        View { handle }
    }

    async fn open(
        &self,
        membership: Membership,
        cursor: Option<StreamId>,
    ) -> Result<Session, StoreError> {
        let topic = membership.topic.name.clone();
        let (feed, horizon) = membership.topic.feed.subscribe();
        let place = membership.topic.place(horizon);
        let cursor = match (cursor, place.horizon) {
            (Some(c), _) => c,
            // Only new events: everything after the horizon comes through the feed.
            (None, Some(horizon)) => horizon,
            (None, None) => self.inner.store.tail(&topic).await?,
        };
        // Up to date with the feed already: nothing to read.
        let replaying = place.horizon != Some(cursor);
        Ok(Session::new(cursor, replaying, feed, place, membership))
    }

    /// Ends every session of `topic` on this node now (see [`Item::Ended`]); how many there were.
    pub fn end_sessions(&self, topic: &str) -> usize {
        let topics = self.inner.lock();
        match topics.get(topic) {
            Some(slot) => {
                slot.topic.end_sessions();
                slot.members
            }
            None => 0,
        }
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

/// A topic seen through a filter (see the module's documentation). Its owner sends it the
/// events it keeps, in the source's order; sessions open on it with [`Hub::subscribe_view`].
#[derive(Clone)]
pub struct View {
    handle: Arc<TopicHandle>,
}

impl View {
    /// The next event of the source that the view keeps.
    pub fn send(&self, delivery: Arc<Delivery>) {
        let id = delivery.id;
        self.handle.feed.send(Item::Event(delivery), Some(id));
    }

    /// The owner lost the source's order (history trimmed under it): every session reads again
    /// from its own place, and tells its client of any gap.
    pub fn resync(&self) {
        self.handle.feed.send(Item::Resync, None);
    }

    /// Ends the view's sessions now (see [`Item::Ended`]).
    pub fn end_sessions(&self) {
        self.handle.end_sessions();
    }

    /// No more events will come (the owner stopped): sessions say goodbye and end.
    pub fn close(&self) {
        self.handle.feed.close();
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches the topic and starts its pump. Called under the topics lock.
    fn activate(self: &Arc<Self>, topic: &Topic) -> Arc<TopicHandle> {
        let feed = Feed::new(self.fanout_buffer);
        let inbox = Inbox::new(PUMP_QUEUE);
        let watching = self.store.watch(topic);
        self.pumps.fetch_add(1, Ordering::AcqRel);
        let pump = Pump::new(self.clone(), topic.clone(), feed.clone(), inbox.clone());
        tokio::spawn(pump.run(watching));
        Arc::new(TopicHandle {
            name: topic.clone(),
            keep: None,
            labels: Vec::new(),
            feed,
            inbox,
            replays: Mutex::new(Replays::default()),
            ends: AtomicU32::new(0),
        })
    }

    fn leave(&self, topic: &TopicHandle) {
        if topic.keep.is_some() {
            return;
        }
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
        self.inbox.send(message);
    }

    /// Counted first: a session joining meanwhile either reads the item or counts it as seen.
    fn end_sessions(&self) {
        self.ends.fetch_add(1, Ordering::AcqRel);
        self.feed.send(Item::Ended, None);
    }

    fn replays(&self) -> std::sync::MutexGuard<'_, Replays> {
        self.replays.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where a session stands, taken right after it joined (or rejoined) the feed: the horizon
    /// (`None` while the pump does not know where the feed starts) and the number of the last
    /// replay read started so far. Every event the session will not get from the feed is at most
    /// the horizon, and was in the store before any read numbered higher started.
    fn place(&self, horizon: Option<StreamId>) -> Place {
        Place {
            read_number: self.replays().last_number,
            horizon,
        }
    }
}

impl Drop for TopicHandle {
    /// The topic was released: its pump ends.
    fn drop(&mut self) {
        self.inbox.close();
    }
}

/// Routes store signals to pumps.
async fn dispatch(hub: std::sync::Weak<Inner>, mut signals: mpsc::UnboundedReceiver<Signal>) {
    let shutdown = match hub.upgrade() {
        Some(h) => h.shutdown.clone(),
        None => return,
    };
    loop {
        let signal = tokio::select! {
            s = signals.recv() => match s { Some(s) => s, None => return },
            _ = shutdown.wait() => return,
        };
        let Some(hub) = hub.upgrade() else { return };
        match signal {
            Signal::Appended { topic, prev, event } => {
                if let Some(h) = hub.handle(&topic) {
                    h.send(PumpMessage::Announced { prev, event });
                }
            }
            Signal::AppendedId { topic, id } => {
                if let Some(h) = hub.handle(&topic) {
                    h.send(PumpMessage::ReadTo(id));
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
            Signal::Removed { topic, upto } => {
                if let Some(h) = hub.handle(&topic) {
                    // Pages read before the delete must serve no one after it.
                    h.replays().forget_all();
                    h.send(PumpMessage::Removed(upto));
                }
            }
            Signal::Notice(notice) => {
                if let Some(h) = hub.handle(&notice.topic) {
                    let frame = sse::frame(None, Some(&notice.event), &notice.data);
                    let delivery = NoticeDelivery {
                        event: notice.event,
                        data: notice.data,
                        frame,
                    };
                    h.feed.send(Item::Notice(Arc::new(delivery)), None);
                }
            }
        }
    }
}

/// Every `catchup_interval`: asks the store, in one command per [`ADVANCED_BATCH`] topics,
/// which active topics have events after what their pump delivered, and has only those read.
///
/// Announcements on a healthy pub/sub connection arrive in order and are not lost, and after a
/// reconnect every topic is read anyway ([`Signal::CatchUpAll`]); this net catches what is left:
/// direct `XADD`s where keyspace notifications are off, and anything unforeseen. Its cost grows
/// with active topics only by one command per thousand. It also lets expired shared replay pages
/// go.
async fn safety_net(hub: std::sync::Weak<Inner>, interval: Duration) {
    let shutdown = match hub.upgrade() {
        Some(h) => h.shutdown.clone(),
        None => return,
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; pumps read when they start anyway
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        let Some(hub) = hub.upgrade() else { return };
        let handles = hub.handles();
        // The batches are spread over the interval: back to back, each holding Redis (and a
        // worker of this node) for a moment, they would delay the announcements behind them.
        let batches = handles.len().div_ceil(ADVANCED_BATCH);
        let pause = interval / (batches as u32 + 1);
        for (i, batch) in handles.chunks(ADVANCED_BATCH).enumerate() {
            if i > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.wait() => return,
                }
            }
            let now = std::time::Instant::now();
            let mut positions = Vec::with_capacity(batch.len());
            for h in batch {
                h.replays().forget_expired(now, hub.replay_sharing);
                if let Some(horizon) = h.feed.horizon() {
                    positions.push((h.name.clone(), horizon));
                }
            }
            match hub.store.advanced(&positions).await {
                Ok(moved) => {
                    for topic in moved {
                        if let Some(h) = hub.handle(topic.as_str()) {
                            h.send(PumpMessage::Read);
                        }
                    }
                }
                Err(e) => {
                    debug!(error = %e, "safety net check failed; next interval");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NewEvent;
    use crate::store::MemoryStore;

    fn event(data: &str) -> NewEvent {
        NewEvent {
            event: None,
            data: data.into(),
            idempotency_key: None,
            labels: Vec::new(),
        }
    }

    /// A hub on a memory store.
    fn hub_on_memory(settings: &Settings) -> (Arc<MemoryStore>, Hub) {
        let store = Arc::new(MemoryStore::new(settings));
        let hub = Hub::start(
            store.clone(),
            settings,
            Shutdown::new(),
            Arc::new(Metrics::new()),
        );
        (store, hub)
    }

    async fn next_events(session: &mut Session) -> Vec<String> {
        match session.next(std::future::pending()).await {
            Output::Live(d) => vec![d.event.data.clone()],
            Output::Replayed(page) => page.events.iter().map(|e| e.data.clone()).collect(),
            _ => panic!("an event was due"),
        }
    }

    /// A view's session replays the source filtered, then takes what its owner sends, with no
    /// gap and no duplicate at the seam; a client without a cursor gets only what is sent.
    #[tokio::test(start_paused = true)]
    async fn a_views_session_replays_filtered_then_goes_live_at_the_seam() {
        let settings = Settings {
            replay_page_size: 2,
            ..Settings::default()
        };
        let (store, hub) = hub_on_memory(&settings);
        let source = Topic::parse("source").unwrap();
        let events: Vec<NewEvent> = ["keep 1", "skip", "skip", "keep 2", "skip"]
            .into_iter()
            .map(event)
            .collect();
        let ids = store.append(&source, events).await.unwrap();
        let keep: Keep = Arc::new(|e: &Event| e.data.starts_with("keep"));
        let view = hub.view(source.clone(), ids[4], keep, Vec::new());

        let mut resumed = hub
            .subscribe_view(&view, Some(StreamId::ZERO))
            .await
            .unwrap();
        let mut fresh = hub.subscribe_view(&view, None).await.unwrap();
        // Appended after the view was made, before its owner sends it: the replay may read it,
        // and the live copy is then not sent again.
        let late = store.append(&source, vec![event("keep 3")]).await.unwrap()[0];
        let mut replayed = Vec::new();
        while replayed.len() < 3 {
            replayed.extend(next_events(&mut resumed).await);
        }
        assert_eq!(replayed, ["keep 1", "keep 2", "keep 3"]);
        let deliver = |id: StreamId, data: &str| {
            let event = Event {
                id,
                event: None,
                data: data.into(),
            };
            view.send(Arc::new(Delivery {
                id,
                frame: sse::event_frame(&event),
                event,
            }));
        };
        deliver(late, "keep 3");
        let next = store.append(&source, vec![event("keep 4")]).await.unwrap()[0];
        deliver(next, "keep 4");
        assert_eq!(next_events(&mut resumed).await, ["keep 4"], "no duplicate");
        assert_eq!(next_events(&mut fresh).await, ["keep 3"]);
        assert_eq!(next_events(&mut fresh).await, ["keep 4"]);
        assert_eq!(hub.active_topics(), 0, "a view is not a registered topic");
        drop((resumed, fresh));
        assert_eq!(hub.active_topics(), 0);
    }

    /// Ending a topic's sessions ends those open then, a session that fell so far behind the
    /// feed that the end itself was pushed out of it included; a session that joins afterwards
    /// goes on.
    #[tokio::test(start_paused = true)]
    async fn ending_a_topics_sessions_ends_those_open_then_even_far_behind() {
        let settings = Settings {
            fanout_buffer: 4,
            ..Settings::default()
        };
        let (store, hub) = hub_on_memory(&settings);
        let topic = Topic::parse("room").unwrap();
        let mut live = hub.subscribe(topic.clone(), None).await.unwrap();
        let mut behind = hub.subscribe(topic.clone(), None).await.unwrap();
        store.append(&topic, vec![event("a")]).await.unwrap();
        assert_eq!(next_events(&mut live).await, ["a"]);
        assert_eq!(hub.end_sessions("room"), 2);
        assert_eq!(hub.end_sessions("elsewhere"), 0);
        assert!(matches!(
            live.next(std::future::pending()).await,
            Output::End
        ));
        let mut later = hub.subscribe(topic.clone(), None).await.unwrap();
        let events: Vec<NewEvent> = (0..10).map(|i| event(&format!("e{i}"))).collect();
        store.append(&topic, events).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 10 {
            got.extend(next_events(&mut later).await);
        }
        assert_eq!(got.len(), 10, "the later session goes on");
        assert!(
            matches!(behind.next(std::future::pending()).await, Output::End),
            "not replayed past the end it missed"
        );
    }

    /// A deleted topic's live sessions are told (`deleted`, with their cursor) and go on with
    /// the new stream from nothing, whatever its ids; a session that began after the delete is
    /// told nothing, and one resuming an old id later hears of a gap from the store.
    #[tokio::test(start_paused = true)]
    async fn a_deleted_topics_sessions_are_told_and_start_again() {
        let settings = Settings::default();
        let (store, hub) = hub_on_memory(&settings);
        let topic = Topic::parse("doomed").unwrap();
        let mut live = hub.subscribe(topic.clone(), None).await.unwrap();
        let old = store
            .append(&topic, vec![event("a"), event("b")])
            .await
            .unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(next_events(&mut live).await);
        }
        assert_eq!(got, ["a", "b"]);

        assert_eq!(store.delete(&topic).await.unwrap(), Some(old[1]));
        match live.next(std::future::pending()).await {
            Output::Replayed(page) => {
                let gap = page.gap.expect("a gap notice");
                assert_eq!(gap.reason, crate::store::GapReason::Deleted);
                assert_eq!(gap.cursor, old[1]);
                assert_eq!(gap.resume_from, None);
                assert!(page.events.is_empty());
                assert_eq!(page.next, old[1].next());
            }
            _ => panic!("the delete was due"),
        }
        let mut fresh = hub.subscribe(topic.clone(), None).await.unwrap();
        let new = store.append(&topic, vec![event("c")]).await.unwrap();
        assert_eq!(
            next_events(&mut live).await,
            ["c"],
            "the new stream, from nothing"
        );
        assert_eq!(live.position(), new[0]);
        assert_eq!(next_events(&mut fresh).await, ["c"], "nothing to be told");
        let mut resumed = hub.subscribe(topic.clone(), Some(old[0])).await.unwrap();
        match resumed.next(std::future::pending()).await {
            Output::Replayed(page) => {
                assert_eq!(
                    page.gap.map(|g| g.reason),
                    Some(crate::store::GapReason::Trimmed),
                    "the deleted history is gone"
                );
                let data: Vec<&str> = page.events.iter().map(|e| e.data.as_str()).collect();
                assert_eq!(data, ["c"], "never an old event");
            }
            _ => panic!("a replay was due"),
        }
    }
}
