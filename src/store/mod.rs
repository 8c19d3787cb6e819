//! Event storage: one small trait, [`Store`], with a memory and a Redis implementation.
//!
//! Both follow the same semantics, checked by one conformance suite (`tests/api/store.rs`):
//! ids are `<ms>-<seq>` and strictly increasing per topic, retention trims the oldest events, and
//! whether a cursor is still covered is decided by one rule, [`classify`].
//!
//! Besides reads and writes, a store announces appends to the [`hub`](crate::hub) through
//! [`Signal`]s, for the topics the hub [`watch`](Store::watch)es.

pub mod memory;
pub mod redis;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use crate::event::{Event, NewEvent, StreamId, Topic};

pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backing service cannot be reached or did not answer in time; retrying later may work.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered something the gateway does not understand.
    #[error("store error: {0}")]
    Internal(String),
}

/// Why the events right after a cursor cannot all be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapReason {
    /// Events after the cursor were trimmed away by retention.
    Trimmed,
    /// The cursor never existed in this stream (data lost, stream recreated, foreign or future id).
    UnknownCursor,
    /// The topic was deleted (`DELETE /v1/topics/{topic}`): its history is gone on purpose.
    Deleted,
}

impl GapReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            GapReason::Trimmed => "trimmed",
            GapReason::UnknownCursor => "unknown_cursor",
            GapReason::Deleted => "deleted",
        }
    }
}

/// One page of a read after a cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Set when the cursor is not covered; `events` then start at the oldest retained event.
    pub gap: Option<GapReason>,
    /// Events in id order, at most the requested count.
    pub events: Vec<Event>,
    /// Set with `gap`: the last id the stream had generated when it was read (`0-0` if it never
    /// existed). A reader left with no events goes on after it; reading the tail separately
    /// could skip an event appended in between.
    pub resume_after: Option<StreamId>,
}

/// What a stream says about itself, for deciding whether a cursor is covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamFacts {
    /// Oldest entry still retained; `None` when the stream is empty.
    pub first_retained: Option<StreamId>,
    /// Highest id ever added.
    pub last_generated: StreamId,
    /// Highest id removed by `XDEL` (`0-0` if none). Redis does not move it when trimming.
    pub max_deleted: StreamId,
    /// Whether any entry was ever removed, by trimming or deletion.
    pub removed_any: bool,
}

/// The one rule deciding whether the events right after `cursor` are all still retained.
///
/// `cursor_exists` says whether an entry with exactly that id is present; `facts` is `None` when
/// the stream does not exist at all.
///
/// Redis records where trimming *reached* (the oldest retained entry) but not the last id it
/// removed, so a cursor older than the oldest retained entry of a trimmed stream always gets a
/// gap, even in the rare case where it was the very last entry trimmed: a notice too many, never
/// a loss untold.
pub fn classify(
    cursor: StreamId,
    cursor_exists: bool,
    facts: Option<StreamFacts>,
) -> Option<GapReason> {
    if cursor_exists {
        return None;
    }
    let Some(facts) = facts else {
        // Nothing was ever written here: only "everything" is covered.
        return (!cursor.is_zero()).then_some(GapReason::UnknownCursor);
    };
    if cursor > facts.last_generated {
        return Some(GapReason::UnknownCursor);
    }
    if cursor == facts.last_generated {
        // Nothing was ever added after it.
        return None;
    }
    if cursor.is_zero() {
        return facts.removed_any.then_some(GapReason::Trimmed);
    }
    if facts.removed_any && facts.first_retained.is_none_or(|first| cursor < first) {
        return Some(GapReason::Trimmed);
    }
    if cursor == facts.max_deleted {
        return None;
    }
    if cursor < facts.max_deleted {
        return Some(GapReason::Trimmed);
    }
    Some(GapReason::UnknownCursor)
}

/// What a topic's stream holds now, for the topic's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TopicStat {
    /// Whether the stream exists (a topic never written, deleted, or removed by `idle_ttl` has
    /// none).
    pub exists: bool,
    /// Retained events.
    pub length: u64,
    /// The oldest and the newest retained event.
    pub first: Option<StreamId>,
    pub last: Option<StreamId>,
    /// The highest id the topic ever had (kept by a tombstone after `idle_ttl` removed the
    /// stream); `0-0` if none.
    pub last_generated: StreamId,
    /// Whether any event was ever removed (trimmed), so history before `first` is gone.
    pub removed_any: bool,
}

/// Topics checked per store command by [`Store::advanced`].
pub const ADVANCED_BATCH: usize = 1000;

/// A store's announcement to the hub.
#[derive(Debug, Clone)]
pub enum Signal {
    /// An event was appended right after `prev` (the stream's newest entry before it); with
    /// `None`, right after whatever the store signalled before for the topic: the store saw every
    /// append to it and signalled each (as this, or by asking for a read).
    Appended {
        topic: String,
        prev: Option<StreamId>,
        event: Event,
    },
    /// An entry `id` was appended and announced without its payload (a large one): read the
    /// stream up to it, unless already there.
    AppendedId { topic: String, id: StreamId },
    /// Something was appended to the topic that the store cannot describe (e.g. a direct
    /// `XADD`): read the stream.
    Poke { topic: String },
    /// The store may have missed announcements (e.g. its Redis connection came back): read every
    /// watched topic's stream.
    CatchUpAll,
    /// A notice for the topic's readers (see [`Store::notify`]).
    Notice(Notice),
    /// The topic was deleted ([`Store::delete`]); every id up to `upto` is gone for good, and
    /// what is appended from now on starts a new stream (whose ids may even be lower).
    Removed { topic: String, upto: StreamId },
}

/// Something for a topic's current readers on every node that is not an event of the topic: it
/// has no id, is not stored and is not replayed (presence's join and leave events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub topic: String,
    /// The SSE event type.
    pub event: String,
    pub data: String,
}

/// Storage for events, shared by all of a node's connections.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Appends `events` to `topic`, atomically and in order, and announces them. Returns one id
    /// per event; an event whose idempotency key was seen within the window gets the id it got
    /// then and is not appended again. The events are moved in: their payloads go to the store
    /// without another copy.
    async fn append(
        &self,
        topic: &Topic,
        events: Vec<NewEvent>,
    ) -> Result<Vec<StreamId>, StoreError>;

    /// Appends several runs, each to its topic as [`append`](Store::append) would, together:
    /// a store that can send them in fewer round trips does (one script call per group on
    /// Redis, groups in parallel across a cluster's masters). One outcome per run, in order;
    /// runs fail independently (on a cluster, one master can fail while the others store).
    /// Give each topic one run: runs of one topic are not ordered against each other.
    async fn append_runs(
        &self,
        runs: Vec<(Topic, Vec<NewEvent>)>,
    ) -> Vec<Result<Vec<StreamId>, StoreError>> {
        let mut outcomes = Vec::with_capacity(runs.len());
        for (topic, events) in runs {
            outcomes.push(self.append(&topic, events).await);
        }
        outcomes
    }

    /// Reads up to `count` events after `cursor`, with the gap rule applied.
    async fn read(&self, topic: &Topic, cursor: StreamId, count: usize)
        -> Result<Page, StoreError>;

    /// Like [`read`](Store::read), but only the events filed under one of `labels` (see
    /// [`NewEvent::labels`]): the same gap rule on the cursor, in the topic's stream, and a
    /// cost that follows the labelled events, not the stream's length.
    async fn read_labelled(
        &self,
        topic: &Topic,
        labels: &[String],
        cursor: StreamId,
        count: usize,
    ) -> Result<Page, StoreError>;

    /// The id an event appended to `topic` with idempotency key `key` got, while the key's
    /// window holds; `None` if the key was never used there or is forgotten. A protocol whose
    /// clients resume from ids of their own (Mercure's publisher-chosen ids) finds them with it.
    async fn keyed(&self, topic: &Topic, key: &str) -> Result<Option<StreamId>, StoreError>;

    /// Up to `count` events before `before` (all, from the newest, with `None`), newest first.
    async fn read_back(
        &self,
        topic: &Topic,
        before: Option<StreamId>,
        count: usize,
    ) -> Result<Vec<Event>, StoreError>;

    /// What the topic's stream holds now.
    async fn stat(&self, topic: &Topic) -> Result<TopicStat, StoreError>;

    /// Deletes the topic: its stream, idempotency keys, labels and tombstone. Every node's
    /// readers of it are told first ([`Signal::Removed`]), then the data goes. Answers the
    /// highest id the topic had (`None`: there was nothing to delete).
    async fn delete(&self, topic: &Topic) -> Result<Option<StreamId>, StoreError>;

    /// Makes the topic's next id come after `above`, an id that was delivered but that the
    /// stream no longer has (a Redis Cluster failover promoted a replica without it): no new
    /// event may get an id a client already holds for another one. Whether anything changed
    /// (`false`: the stream was past it already).
    async fn fence(&self, topic: &Topic, above: StreamId) -> Result<bool, StoreError>;

    /// Files `entry` in the shared list `list` until `until_ms` (unix ms; for an entry already
    /// there, the later time wins). Entries past their time are dropped, and the list goes
    /// with its last one: it holds only what is in force.
    async fn file_until(&self, list: &str, entry: &str, until_ms: u64) -> Result<(), StoreError>;

    /// The entries of `list` still in force, with until when (unix ms).
    async fn filed(&self, list: &str) -> Result<Vec<(String, u64)>, StoreError>;

    /// The entry with exactly this id, if the stream still has it.
    async fn event_at(&self, topic: &Topic, id: StreamId) -> Result<Option<Event>, StoreError>;

    /// The position a new reader starts from: the newest entry id, or where the stream ends if it
    /// has no entries (`0-0` if it never existed). Reading after it returns only newer events.
    async fn tail(&self, topic: &Topic) -> Result<StreamId, StoreError>;

    /// Which of these topics have an entry after the given id (the last one a node delivered):
    /// the node-wide check behind missed announcements and direct appends nobody announced. It
    /// costs one store command per [`ADVANCED_BATCH`] topics, however many are idle.
    async fn advanced(&self, positions: &[(Topic, StreamId)]) -> Result<Vec<Topic>, StoreError>;

    /// Hands `notices` to the readers of their topics on every node, live only: at most once,
    /// without an id, never stored (the topic's events and their ids are untouched).
    async fn notify(&self, notices: Vec<Notice>) -> Result<(), StoreError>;

    /// Starts announcing appends to `topic`. Calls are counted: a topic stays watched until every
    /// `watch` has been matched by an `unwatch`. The returned channel completes once
    /// announcements flow, so anything appended after it is announced.
    fn watch(&self, topic: &Topic) -> oneshot::Receiver<()>;

    /// Undoes one [`watch`](Store::watch).
    fn unwatch(&self, topic: &Topic);

    /// The announcements. Only the first call gets the receiver.
    fn take_signals(&self) -> Option<mpsc::UnboundedReceiver<Signal>>;

    /// Each connection the store keeps, and whether it works now (for metrics).
    fn connections(&self) -> Vec<(&'static str, bool)> {
        Vec::new()
    }

    /// Whether the store can serve reads, writes and announcements now.
    async fn ready(&self) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64, seq: u64) -> StreamId {
        StreamId::new(ms, seq)
    }

    #[test]
    fn gap_rule() {
        // Entries 1..=9 were added, 1..=4 trimmed, 7 deleted.
        let facts = Some(StreamFacts {
            first_retained: Some(id(5, 0)),
            last_generated: id(9, 0),
            max_deleted: id(7, 0),
            removed_any: true,
        });
        assert_eq!(classify(id(6, 0), true, facts), None, "entry exists");
        assert_eq!(
            classify(id(3, 0), false, facts),
            Some(GapReason::Trimmed),
            "before the oldest retained"
        );
        assert_eq!(
            classify(id(4, 0), false, facts),
            Some(GapReason::Trimmed),
            "the last trimmed: conservative"
        );
        assert_eq!(classify(id(7, 0), false, facts), None, "the newest deleted");
        assert_eq!(
            classify(id(6, 5), false, facts),
            Some(GapReason::Trimmed),
            "older than a deletion"
        );
        assert_eq!(
            classify(id(8, 5), false, facts),
            Some(GapReason::UnknownCursor),
            "never existed"
        );
        assert_eq!(
            classify(id(9, 0), false, facts),
            None,
            "the newest ever, deleted"
        );
        assert_eq!(
            classify(id(10, 0), false, facts),
            Some(GapReason::UnknownCursor),
            "future"
        );
        assert_eq!(
            classify(StreamId::ZERO, false, facts),
            Some(GapReason::Trimmed)
        );

        let untouched = Some(StreamFacts {
            first_retained: Some(id(1, 0)),
            last_generated: id(9, 0),
            max_deleted: StreamId::ZERO,
            removed_any: false,
        });
        assert_eq!(classify(StreamId::ZERO, false, untouched), None);
        assert_eq!(
            classify(id(0, 5), false, untouched),
            Some(GapReason::UnknownCursor)
        );

        let emptied = Some(StreamFacts {
            first_retained: None,
            last_generated: id(9, 0),
            max_deleted: StreamId::ZERO,
            removed_any: true,
        });
        assert_eq!(
            classify(id(9, 0), false, emptied),
            None,
            "an emptied stream's tail"
        );
        assert_eq!(classify(id(8, 0), false, emptied), Some(GapReason::Trimmed));

        assert_eq!(classify(StreamId::ZERO, false, None), None);
        assert_eq!(
            classify(id(1, 0), false, None),
            Some(GapReason::UnknownCursor)
        );
    }
}
