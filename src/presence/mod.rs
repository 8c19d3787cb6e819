//! Presence: who is subscribed where, across every node, and join and leave events.
//!
//! Every open subscription is an *entry* in a cluster-wide [`Registry`] (Redis, or memory for
//! one node), filed under each topic it reads: its id (`<node>.<n>`), the token's `sub`, its
//! `ssegate.info` claim, its node and when it connected. An adapter may file an entry under any
//! key it likes (the Mercure hub files its subscriptions under its log with their selectors);
//! the registry only keeps JSON text under topic names.
//!
//! Writes are batched per node: a connect or a disconnect only marks the entry, and the node's
//! flusher writes what changed every `presence.flush_interval` (a connect and a disconnect in the
//! same window cancel out and write nothing). An idle node writes nothing but its heartbeat.
//!
//! A node that stops cleanly removes its entries. One that dies cannot: each node renews a
//! heartbeat every third of `presence.node_ttl`, and the heartbeat's answer names the nodes
//! whose time ran out; one live node claims each of them, removes its entries, and sends their
//! leave events. A dead node's entries are gone within `node_ttl` plus a heartbeat interval
//! (plus the time to remove them). A node that the registry forgot (Redis restarted without its
//! data, or the node stalled longer than its time and was reaped) writes all its entries again.
//!
//! Join and leave events (`ssegate.join`, `ssegate.leave`) go to the readers of topics matching
//! `presence.events`, on every node, as store notices: no id, not stored, not replayed, so the
//! topic's own events and their exactness are untouched.
//!
//! # Layout
//!
//! - this module: the node's [`Presence`] (entries, flusher, heartbeat and reaper) and the
//!   [`Registry`] trait;
//! - `memory`: the registry of a single node.
//!
//! The Redis registry is in the Redis store's module, beside the connections it shares.

mod memory;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

pub use self::memory::MemoryRegistry;
use crate::auth::pattern;
use crate::config::Presence as PresenceSettings;
use crate::shutdown::Shutdown;
use crate::store::{Notice, Store, StoreError};

/// The SSE event type of a join.
pub const JOIN_EVENT: &str = "ssegate.join";
/// The SSE event type of a leave.
pub const LEAVE_EVENT: &str = "ssegate.leave";

/// One change of a node's entries under one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub topic: String,
    /// The entry's id, `<node>.<n>`.
    pub id: String,
    /// The entry's JSON; `None` removes it.
    pub entry: Option<Arc<str>>,
}

/// What a heartbeat learnt.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// The registry did not know the node: its entries may be gone and must be written again.
    pub forgotten: bool,
    /// Nodes whose heartbeat ran out.
    pub expired: Vec<String>,
}

/// Where entries are kept for every node to read: one small trait, with a memory and a Redis
/// implementation run through one conformance suite (`tests/api/presence.rs`).
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Writes one batch of `node`'s changes. `topics_added` and `topics_dropped` keep the node's
    /// index of the topics it has entries under, which is what reaping it reads.
    async fn write(
        &self,
        node: &str,
        changes: &[Change],
        topics_added: &[String],
        topics_dropped: &[String],
    ) -> Result<(), StoreError>;

    /// Marks `node` alive for `ttl` (by the registry's clock, not the node's).
    async fn heartbeat(&self, node: &str, ttl: Duration) -> Result<Heartbeat, StoreError>;

    /// Removes an expired node's entries and forgets it, unless another node holds the claim
    /// (then `None`). The claim lasts `lease`, so a reaper that dies is relieved. Answers the
    /// entries removed, by topic.
    async fn reap(
        &self,
        node: &str,
        lease: Duration,
    ) -> Result<Option<Vec<(String, Vec<String>)>>, StoreError>;

    /// Every entry under `topic` of the nodes the registry lists, as JSON text, in id order.
    /// Entries of a node it does not list are left out: a node that died while the registry
    /// lost its list (a failover that lost the key) can never be reaped, and must not show.
    async fn entries(&self, topic: &str) -> Result<Vec<String>, StoreError>;

    /// Every topic a node the registry lists has entries under, each once, in no order.
    async fn topics(&self) -> Result<Vec<String>, StoreError>;

    /// Forgets `node` (it stopped, and removed its entries first).
    async fn forget(&self, node: &str) -> Result<(), StoreError>;
}

/// The node of an entry id (`<node>.<n>`).
pub fn node_of(id: &str) -> &str {
    id.split_once('.').map_or(id, |(node, _)| node)
}

/// An entry's JSON, as the presence API shows it and join and leave events carry it.
#[derive(Serialize)]
struct EntryJson<'a> {
    id: &'a str,
    sub: Option<&'a str>,
    info: Option<&'a serde_json::Value>,
    node: &'a str,
    connected_at: String,
    /// Only for entries that read several topics by selectors (Mercure).
    #[serde(skip_serializing_if = "Option::is_none")]
    topics: Option<&'a [String]>,
}

/// Who a connection is, for its entry.
#[derive(Debug, Default, Clone)]
pub struct Holder {
    /// The token's `sub`.
    pub sub: Option<String>,
    /// The token's `ssegate.info` (at the Mercure hub, `mercure.payload`).
    pub info: Option<serde_json::Value>,
}

/// A node's presence: its entries, and the tasks that write them and reap dead nodes.
#[derive(Clone)]
pub struct Presence {
    shared: Arc<Shared>,
}

struct Shared {
    /// This node's id in the registry: random per process, so a restarted node is a new one
    /// and its predecessor's entries are reaped.
    node: String,
    registry: Arc<dyn Registry>,
    /// Carries join and leave events to every node.
    store: Arc<dyn Store>,
    /// Topics whose readers get join and leave events.
    events: Vec<String>,
    node_ttl: Duration,
    flush_interval: Duration,
    /// Numbers this node's entries.
    next: AtomicU64,
    state: Mutex<State>,
    /// Woken when there is something to write.
    changed: Notify,
    /// Set once the node removed its entries on shutdown.
    gone: watch::Sender<bool>,
    /// Set by the first heartbeat the registry answered: entries are written only after it,
    /// so a node that dies is always one the registry can find and reap.
    listed: std::sync::atomic::AtomicBool,
    /// Who is told of the joins and leaves under a topic (an adapter that publishes them in
    /// its own form), by topic.
    observers: Mutex<HashMap<String, Observer>>,
}

/// Told of joins (`true`) and leaves (`false`) under one topic, with the entries' JSON, once
/// they are written (or reaped); the write waits for it.
pub type Observer = Arc<dyn Fn(Vec<(bool, Arc<str>)>) -> BoxFuture<'static, ()> + Send + Sync>;

/// What the node has to write.
#[derive(Default)]
struct State {
    /// Every open entry of this node, written or due to be: rewritten whole when the registry
    /// forgot the node.
    open: HashMap<u64, Local>,
    /// Entries opened or closed since the last write.
    pending: HashMap<u64, Pending>,
    /// Open entries per topic: a topic leaves the node's index when its count drops to 0.
    per_topic: HashMap<String, usize>,
    /// Write every open entry again (the registry forgot the node).
    rewrite: bool,
}

/// An open entry: the topics it is filed under and its JSON.
#[derive(Clone)]
struct Local {
    topics: Box<[String]>,
    entry: Arc<str>,
}

enum Pending {
    Open,
    /// Closed after it was written (or while being written): removed at the next write.
    Closed(Local),
}

/// An entry's hold: the entry is removed when it drops (the connection closed).
pub struct Present {
    shared: Arc<Shared>,
    number: u64,
}

impl Drop for Present {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        let Some(local) = state.open.remove(&self.number) else {
            return;
        };
        for topic in local.topics.iter() {
            if let Some(count) = state.per_topic.get_mut(topic) {
                *count -= 1;
                if *count == 0 {
                    state.per_topic.remove(topic);
                }
            }
        }
        match state.pending.remove(&self.number) {
            // Never written: nothing to undo, no event to send.
            Some(Pending::Open) => {}
            _ => {
                state.pending.insert(self.number, Pending::Closed(local));
                drop(state);
                self.shared.changed.notify_one();
            }
        }
    }
}

impl Presence {
    /// Starts the node's flusher and heartbeat.
    pub fn start(
        registry: Arc<dyn Registry>,
        store: Arc<dyn Store>,
        settings: &PresenceSettings,
        shutdown: Shutdown,
    ) -> Presence {
        let node = format!("{:016x}", rand::random::<u64>());
        let (gone, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            node,
            registry,
            store,
            events: settings.events.clone(),
            node_ttl: settings.node_ttl,
            flush_interval: settings.flush_interval,
            next: AtomicU64::new(1),
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            gone,
            observers: Mutex::new(HashMap::new()),
            listed: std::sync::atomic::AtomicBool::new(false),
        });
        info!(node = %shared.node, "presence registry node");
        tokio::spawn(flush(shared.clone(), shutdown.clone()));
        tokio::spawn(heartbeat(shared.clone(), shutdown));
        Presence { shared }
    }

    /// This node's id in the registry.
    pub fn node(&self) -> &str {
        &self.shared.node
    }

    /// Files an entry for `holder` under `topics`; it stays while the hold lives. `selectors`,
    /// when given, are shown in the entry (an adapter's entry filed under one key).
    pub fn join(
        &self,
        topics: Vec<String>,
        holder: &Holder,
        selectors: Option<&[String]>,
    ) -> Present {
        let number = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}.{}", self.shared.node, number);
        let entry = EntryJson {
            id: &id,
            sub: holder.sub.as_deref(),
            info: holder.info.as_ref(),
            node: &self.shared.node,
            connected_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            topics: selectors,
        };
        let entry: Arc<str> = serde_json::to_string(&entry)
            .unwrap_or_else(|_| "{}".into())
            .into();
        let mut state = self.shared.lock();
        for topic in &topics {
            *state.per_topic.entry(topic.clone()).or_insert(0) += 1;
        }
        state.open.insert(
            number,
            Local {
                topics: topics.into_boxed_slice(),
                entry,
            },
        );
        state.pending.insert(number, Pending::Open);
        drop(state);
        self.shared.changed.notify_one();
        Present {
            shared: self.shared.clone(),
            number,
        }
    }

    /// Has `observer` told of every join and leave under `topic` from now on, on this node's
    /// writes and on its reaping of dead nodes.
    pub fn observe(&self, topic: &str, observer: Observer) {
        self.shared
            .observers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(topic.to_owned(), observer);
    }

    /// Every entry under `topic`, on every node.
    pub async fn entries(&self, topic: &str) -> Result<Vec<String>, StoreError> {
        self.shared.registry.entries(topic).await
    }

    /// Every topic with an entry on some node, sorted.
    pub async fn topics(&self) -> Result<Vec<String>, StoreError> {
        let mut topics = self.shared.registry.topics().await?;
        topics.sort_unstable();
        Ok(topics)
    }

    /// Completes once the node removed its entries on shutdown (or could not).
    pub async fn gone(&self) {
        let mut gone = self.shared.gone.subscribe();
        let _ = gone.wait_for(|g| *g).await;
    }

    /// Entries open on this node.
    pub fn open_entries(&self) -> usize {
        self.shared.lock().open.len()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `topic`'s readers get join and leave events.
    fn announces(&self, topic: &str) -> bool {
        pattern::any_matches(&self.events, topic)
    }

    /// The join or leave events of these changes, for topics that have them.
    fn notices<'c>(
        &self,
        changes: impl Iterator<Item = &'c Change>,
        removed: &HashMap<String, Arc<str>>,
    ) -> Vec<Notice> {
        changes
            .filter(|c| self.announces(&c.topic))
            .filter_map(|c| {
                let (event, data) = match &c.entry {
                    Some(entry) => (JOIN_EVENT, entry.clone()),
                    None => (LEAVE_EVENT, removed.get(&c.id)?.clone()),
                };
                Some(Notice {
                    topic: c.topic.clone(),
                    event: event.to_owned(),
                    data: data.to_string(),
                })
            })
            .collect()
    }
}

/// A batch taken from the state to write.
struct Batch {
    changes: Vec<Change>,
    /// Per change: whether it is announced (a rewrite's entries were announced before).
    announce: Vec<bool>,
    added: Vec<String>,
    dropped: Vec<String>,
    /// The JSON of entries being removed, by id, for their leave events.
    removed: HashMap<String, Arc<str>>,
    /// What was taken, to put back if the write fails.
    taken: HashMap<u64, Pending>,
    rewrite: bool,
}

impl Batch {
    /// Files an open entry under each of its topics (`announce`: with join events).
    fn file(&mut self, id: String, local: &Local, announce: bool) {
        for topic in local.topics.iter() {
            let entry = Some(local.entry.clone());
            let change = Change {
                topic: topic.clone(),
                id: id.clone(),
                entry,
            };
            self.changes.push(change);
            self.announce.push(announce);
            self.added.push(topic.clone());
        }
    }

    /// Removes an entry from each of its topics, with leave events; a topic where `last` says
    /// the node has no entry left leaves the node's index.
    fn unfile(&mut self, id: String, local: &Local, last: impl Fn(&str) -> bool) {
        for topic in local.topics.iter() {
            let change = Change {
                topic: topic.clone(),
                id: id.clone(),
                entry: None,
            };
            self.changes.push(change);
            self.announce.push(true);
            if last(topic) {
                self.dropped.push(topic.clone());
            }
        }
        self.removed.insert(id, local.entry.clone());
    }
}

impl Shared {
    fn id(&self, number: u64) -> String {
        format!("{}.{}", self.node, number)
    }

    /// Takes what is due; with `leaving`, the removal of every entry of the node.
    fn take(&self, leaving: bool) -> Batch {
        let mut state = self.lock();
        let rewrite = std::mem::take(&mut state.rewrite) && !leaving;
        let taken = std::mem::take(&mut state.pending);
        let mut batch = Batch {
            changes: Vec::new(),
            announce: Vec::new(),
            added: Vec::new(),
            dropped: Vec::new(),
            removed: HashMap::new(),
            taken: HashMap::new(),
            rewrite,
        };
        for (&number, pending) in &taken {
            match pending {
                // Leaving: every open entry is removed below.
                Pending::Open if leaving => {}
                Pending::Open => {
                    if let Some(local) = state.open.get(&number) {
                        batch.file(self.id(number), local, true);
                    }
                }
                Pending::Closed(local) => {
                    let last = |topic: &str| leaving || !state.per_topic.contains_key(topic);
                    batch.unfile(self.id(number), local, last);
                }
            }
        }
        if rewrite || leaving {
            for (&number, local) in &state.open {
                if leaving {
                    batch.unfile(self.id(number), local, |_| true);
                } else if !matches!(taken.get(&number), Some(Pending::Open)) {
                    // Written again, not announced again (the new ones were filed above).
                    batch.file(self.id(number), local, false);
                }
            }
        }
        for topics in [&mut batch.added, &mut batch.dropped] {
            topics.sort();
            topics.dedup();
        }
        batch.taken = taken;
        batch
    }

    /// Puts back what a failed write took, under whatever happened since.
    fn put_back(&self, batch: Batch) {
        let mut state = self.lock();
        state.rewrite |= batch.rewrite;
        for (number, pending) in batch.taken {
            match pending {
                // Still open and nothing new about it: due again. (Closed meanwhile: the close
                // is pending, and removes whatever was written.)
                Pending::Open => {
                    if state.open.contains_key(&number) && !state.pending.contains_key(&number) {
                        state.pending.insert(number, Pending::Open);
                    }
                }
                Pending::Closed(local) => {
                    state.pending.insert(number, Pending::Closed(local));
                }
            }
        }
    }
}

/// Writes the node's changes, a batch every `flush_interval` while there are some; on shutdown,
/// removes all of the node's entries and forgets the node.
async fn flush(shared: Arc<Shared>, shutdown: Shutdown) {
    let mut delay = shared.flush_interval;
    loop {
        tokio::select! {
            _ = shared.changed.notified() => {}
            _ = shutdown.wait() => break,
        }
        // Gather the moment's changes into one write.
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait() => break,
        }
        if !shared.listed.load(Ordering::Acquire) {
            // Not yet known to the registry: wait for the heartbeat.
            shared.changed.notify_one();
            delay = (delay * 2).min(Duration::from_secs(2));
            continue;
        }
        let batch = shared.take(false);
        if batch.changes.is_empty() {
            continue;
        }
        match write(&shared, &batch).await {
            Ok(()) => delay = shared.flush_interval,
            Err(e) => {
                warn!(error = %e, "presence: cannot write the node's entries; retrying");
                shared.put_back(batch);
                shared.changed.notify_one();
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
    // Leaving: every entry of the node goes, with its leave event.
    let batch = shared.take(true);
    if let Err(e) = write(&shared, &batch).await {
        debug!(error = %e, "presence: cannot remove the node's entries; other nodes will");
    } else if let Err(e) = shared.registry.forget(&shared.node).await {
        debug!(error = %e, "presence: cannot remove the node; other nodes will");
    }
    // `send_replace`: `send` keeps the old value when nobody subscribed yet, and a node whose
    // farewell ended before `gone` was awaited would wait out its shutdown timeout.
    shared.gone.send_replace(true);
}

/// Writes a batch, then sends its join and leave events.
async fn write(shared: &Shared, batch: &Batch) -> Result<(), StoreError> {
    shared
        .registry
        .write(&shared.node, &batch.changes, &batch.added, &batch.dropped)
        .await?;
    let announced = batch
        .changes
        .iter()
        .zip(&batch.announce)
        .filter(|(_, announce)| **announce)
        .map(|(change, _)| change);
    let announced: Vec<&Change> = announced.collect();
    let notices = shared.notices(announced.iter().copied(), &batch.removed);
    if !notices.is_empty() {
        if let Err(e) = shared.store.notify(notices).await {
            debug!(error = %e, "presence: join and leave events were not sent");
        }
    }
    let mut observed: HashMap<&str, Vec<(bool, Arc<str>)>> = HashMap::new();
    for change in announced {
        let entry = match &change.entry {
            Some(entry) => (true, entry.clone()),
            None => match batch.removed.get(&change.id) {
                Some(entry) => (false, entry.clone()),
                None => continue,
            },
        };
        observed.entry(&change.topic).or_default().push(entry);
    }
    shared.tell(observed).await;
    Ok(())
}

impl Shared {
    /// Tells the observers of these topics what changed under them.
    async fn tell(&self, changed: HashMap<&str, Vec<(bool, Arc<str>)>>) {
        let calls: Vec<_> = {
            let observers = self.observers.lock().unwrap_or_else(|e| e.into_inner());
            changed
                .into_iter()
                .filter_map(|(topic, entries)| Some(observers.get(topic)?(entries)))
                .collect()
        };
        futures_util::future::join_all(calls).await;
    }
}

/// Renews the node's heartbeat every third of `node_ttl`, has the node rewritten when the
/// registry forgot it, and reaps the nodes whose time ran out.
async fn heartbeat(shared: Arc<Shared>, shutdown: Shutdown) {
    // A third: one command (four, counting the script's own) every 5 s by default.
    let interval = shared.node_ttl / 3;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        let beat = match shared
            .registry
            .heartbeat(&shared.node, shared.node_ttl)
            .await
        {
            Ok(beat) => beat,
            Err(e) => {
                debug!(error = %e, "presence: heartbeat failed");
                continue;
            }
        };
        shared.listed.store(true, Ordering::Release);
        if beat.forgotten && !first {
            info!("presence: the registry forgot this node; writing its entries again");
            shared.lock().rewrite = true;
            shared.changed.notify_one();
        }
        first = false;
        for node in beat.expired {
            if node == shared.node {
                continue;
            }
            reap(&shared, &node).await;
        }
    }
}

/// Removes a dead node's entries and sends their leave events.
async fn reap(shared: &Shared, node: &str) {
    match shared.registry.reap(node, shared.node_ttl).await {
        Ok(Some(by_topic)) => {
            let entries: usize = by_topic.iter().map(|(_, e)| e.len()).sum();
            info!(
                node,
                entries, "presence: removed the entries of a node that stopped answering"
            );
            let observed = by_topic
                .iter()
                .map(|(topic, entries)| {
                    let left = entries
                        .iter()
                        .map(|e| (false, Arc::from(e.as_str())))
                        .collect();
                    (topic.as_str(), left)
                })
                .collect();
            shared.tell(observed).await;
            let notices: Vec<Notice> = by_topic
                .into_iter()
                .filter(|(topic, _)| shared.announces(topic))
                .flat_map(|(topic, entries)| {
                    entries.into_iter().map(move |data| Notice {
                        topic: topic.clone(),
                        event: LEAVE_EVENT.to_owned(),
                        data,
                    })
                })
                .collect();
            if !notices.is_empty() {
                if let Err(e) = shared.store.notify(notices).await {
                    debug!(error = %e, "presence: leave events of a dead node were not sent");
                }
            }
        }
        Ok(None) => {}
        Err(e) => debug!(node, error = %e, "presence: reaping failed; next heartbeat"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::config::Settings;
    use crate::store::{MemoryStore, Signal};

    /// The memory registry, counting writes and failing the ones it is told to.
    #[derive(Default)]
    struct Flaky {
        inner: MemoryRegistry,
        writes: AtomicUsize,
        changes: AtomicUsize,
        fail_next: AtomicUsize,
    }

    #[async_trait]
    impl Registry for Flaky {
        async fn write(
            &self,
            node: &str,
            changes: &[Change],
            added: &[String],
            dropped: &[String],
        ) -> Result<(), StoreError> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            let failing = self.fail_next.load(Ordering::SeqCst);
            if failing > 0 {
                self.fail_next.store(failing - 1, Ordering::SeqCst);
                return Err(StoreError::Unavailable("down".into()));
            }
            self.changes.fetch_add(changes.len(), Ordering::SeqCst);
            self.inner.write(node, changes, added, dropped).await
        }
        async fn heartbeat(&self, node: &str, ttl: Duration) -> Result<Heartbeat, StoreError> {
            self.inner.heartbeat(node, ttl).await
        }
        async fn reap(
            &self,
            node: &str,
            lease: Duration,
        ) -> Result<Option<Vec<(String, Vec<String>)>>, StoreError> {
            self.inner.reap(node, lease).await
        }
        async fn entries(&self, topic: &str) -> Result<Vec<String>, StoreError> {
            self.inner.entries(topic).await
        }
        async fn topics(&self) -> Result<Vec<String>, StoreError> {
            self.inner.topics().await
        }
        async fn forget(&self, node: &str) -> Result<(), StoreError> {
            self.inner.forget(node).await
        }
    }

    struct Bed {
        presence: Presence,
        registry: Arc<Flaky>,
        signals: tokio::sync::mpsc::UnboundedReceiver<Signal>,
        shutdown: Shutdown,
    }

    fn bed(events: &[&str]) -> Bed {
        let settings = Settings::default();
        let store = Arc::new(MemoryStore::new(&settings));
        let signals = store.take_signals().expect("signals");
        let registry = Arc::new(Flaky::default());
        let mut presence_settings = settings.presence.clone();
        presence_settings.events = events.iter().map(|e| (*e).to_owned()).collect();
        let shutdown = Shutdown::new();
        let presence = Presence::start(
            registry.clone(),
            store,
            &presence_settings,
            shutdown.clone(),
        );
        Bed {
            presence,
            registry,
            signals,
            shutdown,
        }
    }

    fn holder(sub: &str) -> Holder {
        Holder {
            sub: Some(sub.into()),
            info: None,
        }
    }

    /// Several flush intervals: the flusher gets its turn (time is paused, and advances when
    /// every task waits).
    async fn settle() {
        tokio::time::sleep(Settings::default().presence.flush_interval * 5).await;
    }

    /// The join and leave events sent so far, as (type, sub).
    fn notices(
        signals: &mut tokio::sync::mpsc::UnboundedReceiver<Signal>,
    ) -> Vec<(String, String)> {
        let mut out = Vec::new();
        while let Ok(signal) = signals.try_recv() {
            if let Signal::Notice(n) = signal {
                let data: serde_json::Value = serde_json::from_str(&n.data).unwrap();
                out.push((n.event, data["sub"].as_str().unwrap_or("").to_owned()));
            }
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_moments_joins_are_one_write_and_a_join_undone_at_once_writes_nothing() {
        let mut bed = bed(&["room"]);
        let held: Vec<Present> = (0..100)
            .map(|i| {
                bed.presence
                    .join(vec!["room".into()], &holder(&format!("u{i}")), None)
            })
            .collect();
        drop(
            bed.presence
                .join(vec!["room".into()], &holder("blip"), None),
        );
        settle().await;
        assert_eq!(bed.registry.writes.load(Ordering::SeqCst), 1, "one batch");
        assert_eq!(bed.presence.entries("room").await.unwrap().len(), 100);
        let sent = notices(&mut bed.signals);
        assert_eq!(sent.len(), 100, "a join each, none for the blip");
        assert!(sent
            .iter()
            .all(|(event, sub)| event == JOIN_EVENT && sub != "blip"));
        drop(held);
        settle().await;
        assert_eq!(bed.registry.writes.load(Ordering::SeqCst), 2);
        assert!(bed.presence.entries("room").await.unwrap().is_empty());
        assert_eq!(notices(&mut bed.signals).len(), 100, "a leave each");
        // Idle: nothing more is written.
        settle().await;
        assert_eq!(bed.registry.writes.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_write_is_tried_again_with_what_changed_meanwhile() {
        let bed = bed(&[]);
        bed.registry.fail_next.store(2, Ordering::SeqCst);
        let ada = bed.presence.join(vec!["room".into()], &holder("ada"), None);
        let bob = bed.presence.join(vec!["room".into()], &holder("bob"), None);
        settle().await;
        drop(bob);
        // Backing off: up to two seconds between tries.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let entries = bed.presence.entries("room").await.unwrap();
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert!(entries[0].contains("\"ada\""));
        assert!(bed.registry.writes.load(Ordering::SeqCst) >= 3);
        drop(ada);
    }

    #[tokio::test(start_paused = true)]
    async fn a_forgotten_node_writes_its_entries_again_without_announcing_them() {
        let mut bed = bed(&["room"]);
        let _ada = bed.presence.join(vec!["room".into()], &holder("ada"), None);
        settle().await;
        assert_eq!(notices(&mut bed.signals).len(), 1);
        // Redis lost everything (or another node reaped this one).
        let node = bed.presence.node().to_owned();
        bed.registry
            .inner
            .reap(&node, Duration::from_millis(1))
            .await
            .unwrap();
        assert!(bed.presence.entries("room").await.unwrap().is_empty());
        // The next heartbeat finds the node forgotten.
        tokio::time::sleep(Settings::default().presence.node_ttl).await;
        settle().await;
        assert_eq!(bed.presence.entries("room").await.unwrap().len(), 1);
        assert!(notices(&mut bed.signals).is_empty(), "not a new join");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopping_node_removes_its_entries_with_their_leaves() {
        let mut bed = bed(&["room"]);
        let _ada = bed
            .presence
            .join(vec!["room".into(), "hall".into()], &holder("ada"), None);
        settle().await;
        notices(&mut bed.signals);
        bed.shutdown.trigger();
        // The node is done before anyone waits for it: waiting then still ends.
        settle().await;
        tokio::time::timeout(Duration::from_secs(1), bed.presence.gone())
            .await
            .expect("gone, however late it is awaited");
        assert!(bed.presence.entries("room").await.unwrap().is_empty());
        assert!(bed.presence.entries("hall").await.unwrap().is_empty());
        assert_eq!(
            notices(&mut bed.signals),
            [(LEAVE_EVENT.to_owned(), "ada".to_owned())]
        );
    }
}
