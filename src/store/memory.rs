//! The embedded store: a single node's events in memory, with Redis Stream semantics.
//!
//! Used when no Redis URL is configured, so `cargo run` works with nothing else installed.
//! Nothing survives a restart.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use super::{classify, Notice, Page, Signal, Store, StoreError, StreamFacts, TopicStat};
use crate::config::Settings;
use crate::event::{unix_ms, Event, NewEvent, StreamId, Topic};

/// Events per topic, in memory.
pub struct MemoryStore {
    logs: Mutex<Logs>,
    /// Events kept per topic (0 = all).
    max_events: u64,
    /// Events older than this are trimmed on the topic's next append.
    max_age: Option<Duration>,
    /// Topics with no append for this long are removed, leaving a tombstone as long again.
    idle_ttl: Option<Duration>,
    /// How long an idempotency key maps to its first id.
    idempotency_window: Duration,
    /// Where appends are announced; the hub holds the receiving end.
    signal_tx: mpsc::UnboundedSender<Signal>,
    /// Handed out once, by `take_signals`.
    signal_rx: Mutex<Option<mpsc::UnboundedReceiver<Signal>>>,
}

/// The topics, and what is left of removed ones.
struct Logs {
    /// Every topic written, by name. A topic stays (like a Redis stream trimmed to nothing, so
    /// the gap rule can still tell a trimmed cursor from a foreign one) unless `idle_ttl` removes
    /// it.
    topics: HashMap<String, TopicLog>,
    /// Removed topics: their last id, and until when it is kept (Redis's `:last` key).
    tombstones: HashMap<String, (StreamId, Instant)>,
    /// Shared lists ([`Store::file_until`]): entry → until when (unix ms).
    lists: HashMap<String, HashMap<String, u64>>,
    /// When idle topics were last looked for.
    swept: Instant,
}

/// One topic's stream.
struct TopicLog {
    /// Retained events, oldest first; ids strictly increasing.
    entries: VecDeque<Event>,
    /// Highest id ever added: the next id must be greater, even if the clock goes back.
    last_generated: StreamId,
    /// Whether retention ever removed an entry, for the gap rule.
    trimmed_any: bool,
    /// The last id of the topic this one replaced after it was removed (Redis's
    /// max-deleted-entry-id after `XSETID`), for the gap rule.
    max_deleted: StreamId,
    /// When the topic was last appended to, for `idle_ttl`.
    appended: Instant,
    /// Idempotency key → id it produced and when.
    idempotency: HashMap<String, (StreamId, Instant)>,
    /// Keys in the order they were stored, so expired ones are dropped without a scan.
    idempotency_order: VecDeque<(Instant, String)>,
    /// Label → the ids of the retained events filed under it, oldest first.
    labels: HashMap<String, VecDeque<StreamId>>,
}

impl MemoryStore {
    pub fn new(settings: &Settings) -> Self {
        let (signal_tx, signal_rx) = mpsc::unbounded_channel();
        MemoryStore {
            logs: Mutex::new(Logs {
                topics: HashMap::new(),
                tombstones: HashMap::new(),
                lists: HashMap::new(),
                swept: Instant::now(),
            }),
            max_events: settings.retention.max_events,
            max_age: settings.retention.max_age,
            idle_ttl: settings.retention.idle_ttl,
            idempotency_window: settings.idempotency_window,
            signal_tx,
            signal_rx: Mutex::new(Some(signal_rx)),
        }
    }

    /// The logs, with topics idle for `idle_ttl` turned into tombstones first.
    fn lock(&self) -> std::sync::MutexGuard<'_, Logs> {
        // A panic while holding the lock cannot leave a log half-updated in a way that matters
        // more than stopping to serve, so keep going with the data as it is.
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ttl) = self.idle_ttl {
            logs.expire(ttl, Instant::now());
        }
        logs
    }
}

impl Logs {
    /// Removes topics idle for `ttl` (keeping their last id for as long again) and tombstones
    /// past their time. Looks at most every quarter of `ttl`.
    fn expire(&mut self, ttl: Duration, now: Instant) {
        if now.duration_since(self.swept) < ttl / 4 {
            return;
        }
        self.swept = now;
        let idle: Vec<String> = self
            .topics
            .iter()
            .filter(|(_, log)| now.duration_since(log.appended) >= ttl)
            .map(|(name, _)| name.clone())
            .collect();
        for name in idle {
            if let Some(log) = self.topics.remove(&name) {
                self.tombstones
                    .insert(name, (log.last_generated, log.appended + ttl * 2));
            }
        }
        self.tombstones.retain(|_, (_, until)| *until > now);
        self.topics.shrink_to_fit();
        self.tombstones.shrink_to_fit();
    }

    /// The topic's log, created if needed; a removed topic comes back carrying its old last id
    /// as deleted, as Redis does.
    fn log_for(&mut self, topic: &str, now: Instant) -> &mut TopicLog {
        let tombstone = self.tombstones.remove(topic).map(|(last, _)| last);
        self.topics.entry(topic.to_owned()).or_insert_with(|| {
            let last = tombstone.unwrap_or(StreamId::ZERO);
            TopicLog {
                entries: VecDeque::new(),
                last_generated: last,
                trimmed_any: false,
                max_deleted: last,
                appended: now,
                idempotency: HashMap::new(),
                idempotency_order: VecDeque::new(),
                labels: HashMap::new(),
            }
        })
    }
}

impl TopicLog {
    fn next_id(&self) -> StreamId {
        let now_ms = unix_ms();
        let last = self.last_generated;
        if now_ms > last.ms {
            StreamId::new(now_ms, 0)
        } else {
            last.next()
        }
    }

    fn expire_keys(&mut self, window: Duration, now: Instant) {
        while let Some((at, _)) = self.idempotency_order.front() {
            if now.duration_since(*at) < window {
                break;
            }
            if let Some((_, key)) = self.idempotency_order.pop_front() {
                if self
                    .idempotency
                    .get(&key)
                    .is_some_and(|(_, t)| now.duration_since(*t) >= window)
                {
                    self.idempotency.remove(&key);
                }
            }
        }
    }

    fn trim(&mut self, max_events: u64, max_age: Option<Duration>) {
        if max_events > 0 {
            while self.entries.len() as u64 > max_events {
                self.entries.pop_front();
                self.trimmed_any = true;
            }
        }
        if let (Some(age), Some(newest)) = (max_age, self.entries.back()) {
            // As `XTRIM MINID`: by the newest id's time, not the clock.
            let oldest_kept = newest.id.ms.saturating_sub(age.as_millis() as u64);
            while self.entries.front().is_some_and(|e| e.id.ms < oldest_kept) {
                self.entries.pop_front();
                self.trimmed_any = true;
            }
        }
        // Labels keep only retained events.
        let first = self.entries.front().map_or(self.last_generated, |e| e.id);
        self.labels.retain(|_, ids| {
            while ids.front().is_some_and(|id| *id < first) {
                ids.pop_front();
            }
            !ids.is_empty()
        });
    }

    /// Up to `count` retained events filed under any of `labels`, after `after`, in order.
    fn labelled_after(&self, labels: &[String], after: StreamId, count: usize) -> Vec<Event> {
        let mut ids: Vec<StreamId> = labels
            .iter()
            .filter_map(|l| self.labels.get(l))
            .flat_map(|ids| {
                let start = ids.partition_point(|id| *id <= after);
                ids.iter().skip(start).take(count).copied()
            })
            .collect();
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .filter_map(|id| {
                let at = self.entries.binary_search_by(|e| e.id.cmp(&id)).ok()?;
                self.entries.get(at).cloned()
            })
            .take(count)
            .collect()
    }

    fn position_after(&self, cursor: StreamId) -> (bool, usize) {
        match self.entries.binary_search_by(|e| e.id.cmp(&cursor)) {
            Ok(i) => (true, i + 1),
            Err(i) => (false, i),
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn append(
        &self,
        topic: &Topic,
        events: Vec<NewEvent>,
    ) -> Result<Vec<StreamId>, StoreError> {
        let now = Instant::now();
        let mut logs = self.lock();
        let log = logs.log_for(topic.as_str(), now);
        log.appended = now;
        log.expire_keys(self.idempotency_window, now);
        let mut ids = Vec::with_capacity(events.len());
        for new in events {
            if let Some(key) = &new.idempotency_key {
                if let Some((id, _)) = log.idempotency.get(key) {
                    ids.push(*id);
                    continue;
                }
            }
            let id = log.next_id();
            let prev = log.entries.back().map_or(StreamId::ZERO, |e| e.id);
            let event = Event {
                id,
                event: new.event,
                data: new.data,
            };
            log.entries.push_back(event.clone());
            log.last_generated = id;
            if let Some(key) = new.idempotency_key {
                log.idempotency.insert(key.clone(), (id, now));
                log.idempotency_order.push_back((now, key));
            }
            for label in new.labels {
                log.labels.entry(label).or_default().push_back(id);
            }
            log.trim(self.max_events, self.max_age);
            // The hub may be gone during shutdown; the event is stored either way.
            let _ = self.signal_tx.send(Signal::Appended {
                topic: topic.as_str().to_owned(),
                prev: Some(prev),
                event,
            });
            ids.push(id);
        }
        Ok(ids)
    }

    async fn read(
        &self,
        topic: &Topic,
        cursor: StreamId,
        count: usize,
    ) -> Result<Page, StoreError> {
        let logs = self.lock();
        let Some(log) = logs.topics.get(topic.as_str()) else {
            // Gone: what its tombstone says (an emptied stream), or nothing at all.
            let last = logs.tombstones.get(topic.as_str()).map(|(last, _)| *last);
            let facts = last.map(|last| StreamFacts {
                first_retained: None,
                last_generated: last,
                max_deleted: last,
                removed_any: true,
            });
            let gap = classify(cursor, false, facts);
            return Ok(Page {
                gap,
                events: Vec::new(),
                resume_after: gap.map(|_| last.unwrap_or(StreamId::ZERO)),
            });
        };
        let (exists, after) = log.position_after(cursor);
        let facts = StreamFacts {
            first_retained: log.entries.front().map(|e| e.id),
            last_generated: log.last_generated,
            // Events are never deleted one by one here, only trimmed; a topic recreated after
            // it was removed counts the old history as deleted.
            max_deleted: log.max_deleted,
            removed_any: log.trimmed_any,
        };
        let gap = classify(cursor, exists, Some(facts));
        let start = if gap.is_some() { 0 } else { after };
        let events = log
            .entries
            .iter()
            .skip(start)
            .take(count)
            .cloned()
            .collect();
        Ok(Page {
            gap,
            events,
            resume_after: gap.map(|_| log.last_generated),
        })
    }

    async fn read_labelled(
        &self,
        topic: &Topic,
        labels: &[String],
        cursor: StreamId,
        count: usize,
    ) -> Result<Page, StoreError> {
        let mut page = self.read(topic, cursor, 0).await?;
        let logs = self.lock();
        if let Some(log) = logs.topics.get(topic.as_str()) {
            // After a gap, from the oldest retained event.
            let after = if page.gap.is_some() {
                StreamId::ZERO
            } else {
                cursor
            };
            page.events = log.labelled_after(labels, after, count);
        }
        Ok(page)
    }

    async fn read_back(
        &self,
        topic: &Topic,
        before: Option<StreamId>,
        count: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let logs = self.lock();
        let Some(log) = logs.topics.get(topic.as_str()) else {
            return Ok(Vec::new());
        };
        let end = match before {
            Some(before) => log.entries.partition_point(|e| e.id < before),
            None => log.entries.len(),
        };
        Ok(log
            .entries
            .range(..end)
            .rev()
            .take(count)
            .cloned()
            .collect())
    }

    async fn stat(&self, topic: &Topic) -> Result<TopicStat, StoreError> {
        let logs = self.lock();
        let Some(log) = logs.topics.get(topic.as_str()) else {
            let last = logs.tombstones.get(topic.as_str()).map(|(last, _)| *last);
            return Ok(TopicStat {
                last_generated: last.unwrap_or(StreamId::ZERO),
                removed_any: last.is_some(),
                ..TopicStat::default()
            });
        };
        Ok(TopicStat {
            exists: true,
            length: log.entries.len() as u64,
            first: log.entries.front().map(|e| e.id),
            last: log.entries.back().map(|e| e.id),
            last_generated: log.last_generated,
            removed_any: log.trimmed_any || !log.max_deleted.is_zero(),
        })
    }

    async fn delete(&self, topic: &Topic) -> Result<Option<StreamId>, StoreError> {
        let mut logs = self.lock();
        // An emptied log holds no events: nothing to delete (as Redis, whose delete leaves one).
        let removed = logs
            .topics
            .remove(topic.as_str())
            .filter(|log| !log.entries.is_empty())
            .map(|log| log.last_generated);
        let tombstone = logs.tombstones.remove(topic.as_str()).map(|(last, _)| last);
        let upto = removed.or(tombstone);
        if let Some(upto) = upto {
            // The log comes back empty, past the deleted one's last id: no new event gets an id a
            // client may hold, and an old cursor is told of the gap.
            let fence = upto.next();
            let now = Instant::now();
            let log = logs.log_for(topic.as_str(), now);
            log.last_generated = fence;
            log.max_deleted = fence;
            // Under the lock: no append of the new stream can be announced before it.
            let _ = self.signal_tx.send(Signal::Removed {
                topic: topic.as_str().to_owned(),
                upto,
            });
        }
        Ok(upto)
    }

    async fn fence(&self, topic: &Topic, above: StreamId) -> Result<bool, StoreError> {
        // This store loses no history; the fence is kept for the trait's sake, as Redis does it.
        let mut logs = self.lock();
        let existed = logs.topics.contains_key(topic.as_str());
        let log = logs.log_for(topic.as_str(), Instant::now());
        if log.last_generated >= above {
            return Ok(false);
        }
        log.last_generated = above;
        if !existed {
            log.max_deleted = above;
        }
        Ok(true)
    }

    async fn file_until(&self, list: &str, entry: &str, until_ms: u64) -> Result<(), StoreError> {
        let now = unix_ms();
        let mut logs = self.lock();
        let entries = logs.lists.entry(list.to_owned()).or_default();
        let until = entries.entry(entry.to_owned()).or_default();
        *until = (*until).max(until_ms);
        entries.retain(|_, until| *until > now);
        if entries.is_empty() {
            logs.lists.remove(list);
        }
        Ok(())
    }

    async fn filed(&self, list: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let now = unix_ms();
        let logs = self.lock();
        Ok(logs.lists.get(list).map_or_else(Vec::new, |entries| {
            entries
                .iter()
                .filter(|(_, until)| **until > now)
                .map(|(entry, until)| (entry.clone(), *until))
                .collect()
        }))
    }

    async fn keyed(&self, topic: &Topic, key: &str) -> Result<Option<StreamId>, StoreError> {
        let logs = self.lock();
        let now = Instant::now();
        Ok(logs
            .topics
            .get(topic.as_str())
            .and_then(|log| log.idempotency.get(key))
            .filter(|(_, at)| now.duration_since(*at) < self.idempotency_window)
            .map(|(id, _)| *id))
    }

    async fn event_at(&self, topic: &Topic, id: StreamId) -> Result<Option<Event>, StoreError> {
        let logs = self.lock();
        Ok(logs.topics.get(topic.as_str()).and_then(|log| {
            let at = log.entries.partition_point(|e| e.id < id);
            log.entries.get(at).filter(|e| e.id == id).cloned()
        }))
    }

    async fn tail(&self, topic: &Topic) -> Result<StreamId, StoreError> {
        let logs = self.lock();
        Ok(match logs.topics.get(topic.as_str()) {
            Some(log) => log.entries.back().map_or(log.last_generated, |e| e.id),
            None => logs
                .tombstones
                .get(topic.as_str())
                .map_or(StreamId::ZERO, |(last, _)| *last),
        })
    }

    async fn advanced(&self, positions: &[(Topic, StreamId)]) -> Result<Vec<Topic>, StoreError> {
        let logs = self.lock();
        Ok(positions
            .iter()
            .filter(|(topic, after)| {
                logs.topics
                    .get(topic.as_str())
                    .and_then(|log| log.entries.back())
                    .is_some_and(|newest| newest.id > *after)
            })
            .map(|(topic, _)| topic.clone())
            .collect())
    }

    async fn notify(&self, notices: Vec<Notice>) -> Result<(), StoreError> {
        for notice in notices {
            let _ = self.signal_tx.send(Signal::Notice(notice));
        }
        Ok(())
    }

    fn watch(&self, _topic: &Topic) -> oneshot::Receiver<()> {
        // Every append is announced already; nothing to set up.
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(());
        rx
    }

    fn unwatch(&self, _topic: &Topic) {}

    fn take_signals(&self) -> Option<mpsc::UnboundedReceiver<Signal>> {
        self.signal_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    async fn ready(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn abandoned_topics_give_their_memory_back() {
        let mut settings = Settings::default();
        settings.retention.idle_ttl = Some(Duration::from_millis(40));
        let store = MemoryStore::new(&settings);
        let event = NewEvent {
            event: None,
            data: "x".into(),
            idempotency_key: Some("k".into()),
            labels: Vec::new(),
        };
        for i in 0..100 {
            let t = Topic::parse(&format!("random.{i}")).unwrap();
            store.append(&t, vec![event.clone()]).await.unwrap();
        }
        assert_eq!(store.lock().topics.len(), 100);
        // Idle past the TTL: the topics go, their tombstones stay; later those go too.
        let removed = Instant::now() + Duration::from_millis(45);
        while Instant::now() < removed {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let counts = |store: &MemoryStore| {
            let logs = store.lock();
            (
                logs.topics.len(),
                logs.tombstones.len(),
                logs.topics.capacity(),
            )
        };
        assert_eq!(counts(&store).0, 0);
        assert_eq!(counts(&store).1, 100);
        let forgotten = Instant::now() + Duration::from_millis(45);
        while Instant::now() < forgotten {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (topics, tombstones, capacity) = counts(&store);
        assert_eq!((topics, tombstones), (0, 0));
        assert!(capacity < 100, "the table shrank");
    }
}
