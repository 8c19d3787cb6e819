//! The embedded store: a single node's events in memory, with Redis Stream semantics.
//!
//! Used when no Redis URL is configured, so `cargo run` works with nothing else installed.
//! Nothing survives a restart.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use super::{classify, Page, Signal, Store, StoreError, StreamFacts};
use crate::config::Settings;
use crate::event::{Event, NewEvent, StreamId, Topic};

/// Events per topic, in memory.
pub struct MemoryStore {
    /// Every topic ever written, by name. A topic stays once created, like a Redis stream that
    /// was trimmed to nothing, so the gap rule can still tell a trimmed cursor from a foreign one.
    topics: Mutex<HashMap<String, TopicLog>>,
    /// Events kept per topic (0 = all).
    max_events: u64,
    /// How long an idempotency key maps to its first id.
    idempotency_window: Duration,
    /// Where appends are announced; the hub holds the receiving end.
    signal_tx: mpsc::UnboundedSender<Signal>,
    /// Handed out once, by `take_signals`.
    signal_rx: Mutex<Option<mpsc::UnboundedReceiver<Signal>>>,
}

/// One topic's stream.
#[derive(Default)]
struct TopicLog {
    /// Retained events, oldest first; ids strictly increasing.
    entries: VecDeque<Event>,
    /// Highest id ever added: the next id must be greater, even if the clock goes back.
    last_generated: StreamId,
    /// Whether retention ever removed an entry, for the gap rule.
    trimmed_any: bool,
    /// Idempotency key → id it produced and when.
    idempotency: HashMap<String, (StreamId, Instant)>,
    /// Keys in the order they were stored, so expired ones are dropped without a scan.
    idempotency_order: VecDeque<(Instant, String)>,
}

impl MemoryStore {
    pub fn new(settings: &Settings) -> Self {
        let (signal_tx, signal_rx) = mpsc::unbounded_channel();
        MemoryStore {
            topics: Mutex::new(HashMap::new()),
            max_events: settings.retention.max_events,
            idempotency_window: settings.idempotency_window,
            signal_tx,
            signal_rx: Mutex::new(Some(signal_rx)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TopicLog>> {
        // A panic while holding the lock cannot leave a log half-updated in a way that matters
        // more than stopping to serve, so keep going with the data as it is.
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl TopicLog {
    fn next_id(&self) -> StreamId {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let last = self.last_generated;
        if now_ms > last.ms {
            StreamId::new(now_ms, 0)
        } else if last.seq < u64::MAX {
            StreamId::new(last.ms, last.seq + 1)
        } else {
            StreamId::new(last.ms + 1, 0)
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

    fn trim(&mut self, max_events: u64) {
        if max_events == 0 {
            return;
        }
        while self.entries.len() as u64 > max_events {
            self.entries.pop_front();
            self.trimmed_any = true;
        }
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
        events: &[NewEvent],
    ) -> Result<Vec<StreamId>, StoreError> {
        let mut topics = self.lock();
        let log = topics.entry(topic.as_str().to_owned()).or_default();
        let now = Instant::now();
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
                event: new.event.clone(),
                data: new.data.clone(),
            };
            log.entries.push_back(event.clone());
            log.last_generated = id;
            if let Some(key) = &new.idempotency_key {
                log.idempotency.insert(key.clone(), (id, now));
                log.idempotency_order.push_back((now, key.clone()));
            }
            log.trim(self.max_events);
            // The hub may be gone during shutdown; the event is stored either way.
            let _ = self.signal_tx.send(Signal::Appended {
                topic: topic.as_str().to_owned(),
                prev,
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
        let topics = self.lock();
        let Some(log) = topics.get(topic.as_str()) else {
            let gap = classify(cursor, false, None);
            return Ok(Page {
                gap,
                events: Vec::new(),
                resume_after: gap.map(|_| StreamId::ZERO),
            });
        };
        let (exists, after) = log.position_after(cursor);
        let facts = StreamFacts {
            first_retained: log.entries.front().map(|e| e.id),
            last_generated: log.last_generated,
            // Events are never deleted one by one here, only trimmed.
            max_deleted: StreamId::ZERO,
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

    async fn tail(&self, topic: &Topic) -> Result<StreamId, StoreError> {
        let topics = self.lock();
        Ok(topics.get(topic.as_str()).map_or(StreamId::ZERO, |log| {
            log.entries.back().map_or(log.last_generated, |e| e.id)
        }))
    }

    async fn advanced(&self, positions: &[(Topic, StreamId)]) -> Result<Vec<Topic>, StoreError> {
        let topics = self.lock();
        Ok(positions
            .iter()
            .filter(|(topic, after)| {
                topics
                    .get(topic.as_str())
                    .and_then(|log| log.entries.back())
                    .is_some_and(|newest| newest.id > *after)
            })
            .map(|(topic, _)| topic.clone())
            .collect())
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
