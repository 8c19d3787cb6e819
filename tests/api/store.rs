//! The store conformance suite: every case runs against the memory store, one Redis and a Redis
//! Cluster of three masters.

use std::sync::Arc;
use std::time::Duration;

use ssegate::config::Settings;
use ssegate::event::{NewEvent, StreamId, Topic};
use ssegate::presence::{Change, MemoryRegistry, Registry};
use ssegate::shutdown::Shutdown;
use ssegate::store::{GapReason, MemoryStore, Notice, RedisStore, Signal, Store, TopicStat};

use crate::helpers::{RedisCluster, RedisServer};

/// A store under test, with whatever keeps it alive.
struct Subject {
    store: Arc<dyn Store>,
    /// The presence registry kept beside the store.
    registry: Arc<dyn Registry>,
    _redis: Option<RedisServer>,
    _cluster: Option<RedisCluster>,
    _shutdown: ShutdownOnDrop,
}

struct ShutdownOnDrop(Shutdown);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        self.0.trigger();
    }
}

fn base_settings(max_events: u64) -> Settings {
    let mut s = Settings::default();
    s.retention.max_events = max_events;
    s.retention.approximate = false;
    s
}

async fn memory(max_events: u64) -> Subject {
    memory_with(base_settings(max_events)).await
}

async fn redis(max_events: u64) -> Subject {
    redis_with(base_settings(max_events)).await
}

async fn cluster(max_events: u64) -> Subject {
    cluster_with(base_settings(max_events)).await
}

/// Runs each case once per store.
macro_rules! conformance {
    ($($case:ident($max_events:expr);)*) => {
        mod memory_store {
            $(#[tokio::test]
            async fn $case() {
                super::$case(super::memory($max_events).await).await
            })*
        }
        mod redis_store {
            $(#[tokio::test]
            async fn $case() {
                super::$case(super::redis($max_events).await).await
            })*
        }
        mod cluster_store {
            $(#[tokio::test]
            async fn $case() {
                super::$case(super::cluster($max_events).await).await
            })*
        }
    };
}

conformance! {
    appends_in_order_and_reads_in_pages(0);
    idempotency_keys_return_the_first_id(0);
    gap_rule_for_trimmed_history(5);
    gap_rule_for_unknown_cursors(0);
    tail_is_where_new_readers_start(3);
    appends_are_announced_with_their_predecessor(0);
    advanced_names_only_topics_with_newer_entries(0);
    labels_file_events_for_their_readers(5);
    notices_reach_watchers_and_store_nothing(0);
    presence_entries_are_filed_listed_and_removed(0);
    a_dead_nodes_entries_are_reaped_once(0);
    reads_back_newest_first_and_states_the_stream(3);
    delete_removes_the_topic_and_tells_its_readers(0);
    shared_lists_keep_entries_until_their_time(0);
    a_fence_puts_new_ids_past_it(0);
}

fn topic(name: &str) -> Topic {
    Topic::parse(name).unwrap()
}

fn event(data: &str) -> NewEvent {
    NewEvent {
        event: None,
        data: data.to_owned(),
        idempotency_key: None,
        labels: Vec::new(),
    }
}

async fn append_n(store: &dyn Store, t: &Topic, n: usize) -> Vec<StreamId> {
    let events: Vec<NewEvent> = (0..n).map(|i| event(&format!("e{i}"))).collect();
    store.append(t, events).await.unwrap()
}

async fn appends_in_order_and_reads_in_pages(s: Subject) {
    let t = topic("orders");
    let mut ids = append_n(&*s.store, &t, 7).await;
    ids.extend(append_n(&*s.store, &t, 5).await);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");

    let mut cursor = StreamId::ZERO;
    let mut read = Vec::new();
    loop {
        let page = s.store.read(&t, cursor, 5).await.unwrap();
        assert_eq!(page.gap, None);
        assert!(page.events.len() <= 5);
        if page.events.is_empty() {
            break;
        }
        cursor = page.events.last().unwrap().id;
        read.extend(page.events);
    }
    assert_eq!(read.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
    assert_eq!(read[8].data, "e1", "second batch's second event");

    // One entry by its id.
    let third = s
        .store
        .event_at(&t, ids[2])
        .await
        .unwrap()
        .expect("entry 2");
    assert_eq!((third.id, third.data.as_str()), (ids[2], "e2"));
    let between = StreamId::new(ids[2].ms, ids[2].seq + 1);
    if !ids.contains(&between) {
        assert_eq!(s.store.event_at(&t, between).await.unwrap(), None);
    }
    assert_eq!(
        s.store.event_at(&topic("none"), ids[2]).await.unwrap(),
        None
    );

    let after = s.store.read(&t, ids[9], 100).await.unwrap();
    assert_eq!(
        after.events.iter().map(|e| e.id).collect::<Vec<_>>(),
        ids[10..]
    );

    let typed = NewEvent {
        event: Some("update".into()),
        data: "a\nb".into(),
        idempotency_key: None,
        labels: Vec::new(),
    };
    let id = s.store.append(&t, vec![typed]).await.unwrap()[0];
    let page = s.store.read(&t, ids[11], 10).await.unwrap();
    assert_eq!(page.events.len(), 1);
    assert_eq!(page.events[0].id, id);
    assert_eq!(page.events[0].event.as_deref(), Some("update"));
    assert_eq!(page.events[0].data, "a\nb");
}

async fn idempotency_keys_return_the_first_id(s: Subject) {
    let t = topic("pay");
    let keyed = |data: &str, key: &str| NewEvent {
        event: None,
        data: data.into(),
        idempotency_key: Some(key.into()),
        labels: Vec::new(),
    };
    let first = s.store.append(&t, vec![keyed("a", "k1")]).await.unwrap();
    let again = s
        .store
        .append(
            &t,
            vec![keyed("changed", "k1"), keyed("b", "k2"), keyed("b2", "k2")],
        )
        .await
        .unwrap();
    assert_eq!(again[0], first[0], "repeated key gives the first id");
    assert_eq!(again[1], again[2], "repeat within one batch too");
    assert!(again[1] > first[0]);
    let all = s.store.read(&t, StreamId::ZERO, 10).await.unwrap();
    let data: Vec<&str> = all.events.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(data, ["a", "b"], "nothing appended twice");

    let other = s
        .store
        .append(&topic("other"), vec![keyed("x", "k1")])
        .await
        .unwrap();
    let page = s
        .store
        .read(&topic("other"), StreamId::ZERO, 10)
        .await
        .unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.id).collect::<Vec<_>>(),
        other,
        "keys are per topic"
    );

    // A key is looked up to the id it got, per topic, while its window holds.
    assert_eq!(s.store.keyed(&t, "k1").await.unwrap(), Some(first[0]));
    assert_eq!(s.store.keyed(&t, "k2").await.unwrap(), Some(again[1]));
    assert_eq!(
        s.store.keyed(&topic("other"), "k1").await.unwrap(),
        Some(other[0])
    );
    assert_eq!(s.store.keyed(&t, "k3").await.unwrap(), None);
    assert_eq!(s.store.keyed(&topic("never"), "k1").await.unwrap(), None);
}

/// Events filed under labels are read by label, after a cursor in the topic's stream, with the
/// topic's gap rule; labels keep only what the topic retains.
async fn labels_file_events_for_their_readers(s: Subject) {
    let t = topic("labelled");
    let labelled = |data: &str, labels: &[&str]| NewEvent {
        event: None,
        data: data.into(),
        idempotency_key: None,
        labels: labels.iter().map(|l| (*l).to_owned()).collect(),
    };
    let ids = s
        .store
        .append(
            &t,
            vec![
                labelled("e1", &["a", "quiet"]),
                labelled("e2", &["https://example.com/b {x}"]),
                labelled("e3", &["a", "https://example.com/b {x}"]),
                labelled("e4", &[]),
                labelled("e5", &["a", "quiet"]),
            ],
        )
        .await
        .unwrap();
    let read = |labels: &[&str], cursor: StreamId, count: usize| {
        let labels: Vec<String> = labels.iter().map(|l| (*l).to_owned()).collect();
        let store = s.store.clone();
        let t = t.clone();
        async move {
            store
                .read_labelled(&t, &labels, cursor, count)
                .await
                .unwrap()
        }
    };
    let data = |page: &ssegate::store::Page| -> Vec<String> {
        page.events.iter().map(|e| e.data.clone()).collect()
    };
    let page = read(&["a"], StreamId::ZERO, 10).await;
    assert_eq!(
        (page.gap, data(&page)),
        (None, vec!["e1".into(), "e3".into(), "e5".into()])
    );
    let both = ["a", "https://example.com/b {x}"];
    let page = read(&both, ids[0], 10).await;
    assert_eq!(data(&page), ["e2", "e3", "e5"], "merged, each once");
    assert_eq!(
        data(&read(&both, ids[0], 2).await),
        ["e2", "e3"],
        "a page at most"
    );
    assert_eq!(
        data(&read(&["a"], ids[3], 10).await),
        ["e5"],
        "after an unlabelled entry"
    );
    assert!(read(&["none"], StreamId::ZERO, 10).await.events.is_empty());
    let unknown = read(&["a"], StreamId::new(ids[4].ms + 1000, 0), 10).await;
    assert_eq!(unknown.gap, Some(GapReason::UnknownCursor));

    // Retention trims labels with the topic: five events are kept.
    let more = s
        .store
        .append(
            &t,
            vec![
                labelled("e6", &["https://example.com/b {x}"]),
                labelled("e7", &["a"]),
                labelled("e8", &[]),
            ],
        )
        .await
        .unwrap();
    let page = read(&["a"], ids[0], 10).await;
    assert_eq!(page.gap, Some(GapReason::Trimmed));
    assert_eq!(data(&page), ["e5", "e7"], "from the oldest retained");
    let page = read(&both, ids[4], 10).await;
    assert_eq!(
        (page.gap, data(&page)),
        (None, vec!["e6".into(), "e7".into()])
    );
    assert!(read(&both, more[2], 10).await.events.is_empty());
    // A label unused since its first event was trimmed still finds its retained one, even a
    // page of one at a time.
    let page = read(&["quiet"], ids[0], 1).await;
    assert_eq!(
        (page.gap, data(&page)),
        (Some(GapReason::Trimmed), vec!["e5".into()])
    );
}

async fn gap_rule_for_trimmed_history(s: Subject) {
    let t = topic("trimmed");
    let ids = append_n(&*s.store, &t, 12).await;
    // Retention keeps the last 5: ids[7..].
    let page = s.store.read(&t, ids[2], 100).await.unwrap();
    assert_eq!(page.gap, Some(GapReason::Trimmed));
    assert_eq!(
        page.events.iter().map(|e| e.id).collect::<Vec<_>>(),
        ids[7..],
        "resumes at the oldest retained"
    );

    // Redis does not record where trimming stopped: even the newest trimmed id gets a notice.
    let page = s.store.read(&t, ids[6], 100).await.unwrap();
    assert_eq!(page.gap, Some(GapReason::Trimmed), "the newest trimmed id");
    assert_eq!(
        page.events.iter().map(|e| e.id).collect::<Vec<_>>(),
        ids[7..]
    );

    let page = s.store.read(&t, ids[7], 100).await.unwrap();
    assert_eq!(page.gap, None, "the oldest retained is covered");
    assert_eq!(
        page.events.iter().map(|e| e.id).collect::<Vec<_>>(),
        ids[8..]
    );

    let page = s.store.read(&t, StreamId::ZERO, 2).await.unwrap();
    assert_eq!(page.gap, Some(GapReason::Trimmed), "`0` after trimming");
    assert_eq!(
        page.events.iter().map(|e| e.id).collect::<Vec<_>>(),
        ids[7..9]
    );

    let page = s.store.read(&t, ids[8], 100).await.unwrap();
    assert_eq!(page.gap, None);
    assert_eq!(page.events.len(), 3);
}

async fn gap_rule_for_unknown_cursors(s: Subject) {
    let t = topic("known");
    let ids = append_n(&*s.store, &t, 4).await;
    // Before the first entry, never deleted, never added: not this stream's id.
    let never = StreamId::new(ids[0].ms - 1, 7);
    let page = s.store.read(&t, never, 100).await.unwrap();
    assert_eq!(
        page.gap,
        Some(GapReason::UnknownCursor),
        "an id that never existed"
    );
    assert_eq!(
        page.events.iter().map(|e| e.id).collect::<Vec<_>>(),
        ids,
        "then everything retained"
    );

    let future = StreamId::new(ids[3].ms + 1_000_000, 0);
    let page = s.store.read(&t, future, 100).await.unwrap();
    assert_eq!(page.gap, Some(GapReason::UnknownCursor), "a future id");
    assert_eq!(page.events.iter().map(|e| e.id).collect::<Vec<_>>(), ids);

    let page = s
        .store
        .read(&topic("nothing-here"), StreamId::new(5, 0), 10)
        .await
        .unwrap();
    assert_eq!(
        page.gap,
        Some(GapReason::UnknownCursor),
        "a cursor on a topic never written"
    );
    assert!(page.events.is_empty());

    let page = s
        .store
        .read(&topic("nothing-here"), StreamId::ZERO, 10)
        .await
        .unwrap();
    assert_eq!(page.gap, None, "`0` on a topic never written is covered");

    let page = s.store.read(&t, StreamId::ZERO, 10).await.unwrap();
    assert_eq!(page.gap, None, "`0` on an untrimmed topic is covered");
    assert_eq!(page.events.len(), 4);
}

async fn tail_is_where_new_readers_start(s: Subject) {
    let t = topic("tail");
    assert_eq!(s.store.tail(&t).await.unwrap(), StreamId::ZERO);
    let ids = append_n(&*s.store, &t, 4).await;
    let tail = s.store.tail(&t).await.unwrap();
    assert_eq!(tail, ids[3]);
    let page = s.store.read(&t, tail, 10).await.unwrap();
    assert_eq!(page.gap, None);
    assert!(page.events.is_empty());
    let next = append_n(&*s.store, &t, 1).await;
    let page = s.store.read(&t, tail, 10).await.unwrap();
    assert_eq!(page.events.iter().map(|e| e.id).collect::<Vec<_>>(), next);
}

async fn appends_are_announced_with_their_predecessor(s: Subject) {
    let t = topic("announced");
    let mut signals = s.store.take_signals().expect("signals");
    assert!(s.store.take_signals().is_none(), "handed out once");
    tokio::time::timeout(Duration::from_secs(10), s.store.watch(&t))
        .await
        .unwrap()
        .unwrap();
    let ids = append_n(&*s.store, &t, 3).await;
    let mut prev = StreamId::ZERO;
    for id in &ids {
        loop {
            let signal = tokio::time::timeout(Duration::from_secs(10), signals.recv())
                .await
                .expect("announced")
                .expect("open");
            if let Signal::Appended {
                topic,
                prev: p,
                event,
            } = signal
            {
                assert_eq!(topic, "announced");
                // Named, or vouched for by a store that saw every append (`None`).
                assert!(p.is_none_or(|p| p == prev), "predecessor of {id}: {p:?}");
                assert_eq!(event.id, *id);
                prev = *id;
                break;
            }
        }
    }
}

async fn advanced_names_only_topics_with_newer_entries(s: Subject) {
    let store = &*s.store;
    let (a, b, quiet, absent) = (topic("a"), topic("b"), topic("quiet"), topic("absent"));
    let a_ids = append_n(store, &a, 2).await;
    let b_ids = append_n(store, &b, 1).await;
    append_n(store, &quiet, 1).await;
    let quiet_tail = store.tail(&quiet).await.unwrap();
    let positions = vec![
        (a.clone(), a_ids[0]),
        (b.clone(), b_ids[0]),
        (quiet.clone(), quiet_tail),
        (absent.clone(), StreamId::ZERO),
    ];
    assert_eq!(store.advanced(&positions).await.unwrap(), vec![a.clone()]);
    append_n(store, &b, 1).await;
    let mut moved = store.advanced(&positions).await.unwrap();
    moved.sort();
    assert_eq!(moved, vec![a, b]);

    // More topics than one command checks: the ones that moved are found in every batch.
    let many: Vec<Topic> = (0..2500).map(|i| topic(&format!("many.{i}"))).collect();
    let mut positions = Vec::new();
    for (i, t) in many.iter().enumerate() {
        let at = if i % 1000 == 999 {
            append_n(store, t, 2).await[0]
        } else {
            StreamId::ZERO
        };
        positions.push((t.clone(), at));
    }
    let moved = store.advanced(&positions).await.unwrap();
    let expected: Vec<Topic> = [999, 1999].iter().map(|&i| many[i].clone()).collect();
    assert_eq!(moved, expected);
}

/// Settings for the retention cases: no count limit, exact trimming, short windows.
fn retention_settings(max_age: Option<Duration>, idle_ttl: Option<Duration>) -> Settings {
    let mut s = base_settings(0);
    s.retention.max_age = max_age;
    s.retention.idle_ttl = idle_ttl;
    s.idempotency_window = Duration::from_millis(300);
    s
}

async fn memory_with(settings: Settings) -> Subject {
    Subject {
        store: Arc::new(MemoryStore::new(&settings)),
        registry: Arc::new(MemoryRegistry::new()),
        _redis: None,
        _cluster: None,
        _shutdown: ShutdownOnDrop(Shutdown::new()),
    }
}

async fn redis_with(mut settings: Settings) -> Subject {
    let server = RedisServer::start().await;
    settings.redis_url = Some(server.url());
    let shutdown = Shutdown::new();
    let store = RedisStore::connect(&settings, shutdown.clone()).unwrap();
    store.connected().await;
    Subject {
        registry: Arc::new(store.registry()),
        store: Arc::new(store),
        _redis: Some(server),
        _cluster: None,
        _shutdown: ShutdownOnDrop(shutdown),
    }
}

/// A store on a fresh three-master cluster, given as one node's URL (the store finds the rest
/// and detects cluster mode).
async fn cluster_with(mut settings: Settings) -> Subject {
    let cluster = RedisCluster::start(3, 0).await;
    settings.redis_url = Some(cluster.url());
    let shutdown = Shutdown::new();
    let store = RedisStore::connect(&settings, shutdown.clone()).unwrap();
    store.connected().await;
    Subject {
        registry: Arc::new(store.registry()),
        store: Arc::new(store),
        _redis: None,
        _cluster: Some(cluster),
        _shutdown: ShutdownOnDrop(shutdown),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

const AGE: Duration = Duration::from_millis(20);

#[tokio::test]
async fn memory_store_trims_by_age() {
    trims_by_age(memory_with(retention_settings(Some(AGE), None)).await).await
}

#[tokio::test]
async fn redis_store_trims_by_age() {
    trims_by_age(redis_with(retention_settings(Some(AGE), None)).await).await
}

#[tokio::test]
async fn cluster_store_trims_by_age() {
    trims_by_age(cluster_with(retention_settings(Some(AGE), None)).await).await
}

async fn trims_by_age(s: Subject) {
    let store = &*s.store;
    let t = topic("aged");
    let old = append_n(store, &t, 2).await;
    // Time passing is the point here: the next append is more than AGE younger.
    while now_ms() <= old[1].ms + AGE.as_millis() as u64 + 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let young = append_n(store, &t, 1).await[0];
    let page = store.read(&t, StreamId::ZERO, 10).await.unwrap();
    assert_eq!(page.gap, Some(GapReason::Trimmed));
    assert_eq!(
        page.events.iter().map(|e| e.id).collect::<Vec<_>>(),
        [young]
    );
    let page = store.read(&t, old[0], 10).await.unwrap();
    assert_eq!(
        page.gap,
        Some(GapReason::Trimmed),
        "a cursor in the aged-out part"
    );
    let page = store.read(&t, young, 10).await.unwrap();
    assert_eq!((page.gap, page.events.len()), (None, 0));
}

const IDLE: Duration = Duration::from_millis(300);

#[tokio::test]
async fn memory_store_removes_idle_topics() {
    removes_idle_topics(memory_with(retention_settings(None, Some(IDLE))).await).await
}

#[tokio::test]
async fn redis_store_removes_idle_topics() {
    removes_idle_topics(redis_with(retention_settings(None, Some(IDLE))).await).await
}

#[tokio::test]
async fn cluster_store_removes_idle_topics() {
    removes_idle_topics(cluster_with(retention_settings(None, Some(IDLE))).await).await
}

async fn removes_idle_topics(s: Subject) {
    let store = &*s.store;
    let t = topic("abandoned");
    let keyed = NewEvent {
        idempotency_key: Some("k".into()),
        ..event("first")
    };
    let first = store.append(&t, vec![keyed.clone()]).await.unwrap()[0];
    let last = append_n(store, &t, 1).await[0];
    // Removed once idle: a cursor inside the old history is told of the gap.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = store.read(&t, first, 10).await.unwrap();
        if page.events.is_empty() {
            assert_eq!(page.gap, Some(GapReason::Trimmed));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the idle topic was never removed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The last id is remembered: a client that had everything resumes without a notice, and
    // new readers start after it.
    let page = store.read(&t, last, 10).await.unwrap();
    assert_eq!((page.gap, page.events.len()), (None, 0));
    assert_eq!(
        store.read(&t, StreamId::ZERO, 10).await.unwrap().gap,
        Some(GapReason::Trimmed)
    );
    assert_eq!(store.tail(&t).await.unwrap(), last);
    let future = StreamId::new(last.ms + 60_000, 0);
    assert_eq!(
        store.read(&t, future, 10).await.unwrap().gap,
        Some(GapReason::UnknownCursor)
    );

    // Published to again: a new stream whose ids follow the old ones, the idempotency key gone
    // with the topic, and the same answers for old cursors.
    let again = store.append(&t, vec![keyed]).await.unwrap()[0];
    assert!(again > last, "{again} after {last}");
    let page = store.read(&t, last, 10).await.unwrap();
    assert_eq!(page.gap, None);
    assert_eq!(
        page.events.iter().map(|e| e.id).collect::<Vec<_>>(),
        [again]
    );
    let page = store.read(&t, first, 10).await.unwrap();
    assert_eq!(page.gap, Some(GapReason::Trimmed));
    assert_eq!(
        page.events.iter().map(|e| e.id).collect::<Vec<_>>(),
        [again]
    );
}

/// A notice reaches the watchers of its topic, as sent, and leaves the stream as it was.
async fn notices_reach_watchers_and_store_nothing(s: Subject) {
    let t = topic("noticed");
    let mut signals = s.store.take_signals().expect("signals");
    tokio::time::timeout(Duration::from_secs(10), s.store.watch(&t))
        .await
        .unwrap()
        .unwrap();
    let before = append_n(&*s.store, &t, 1).await[0];
    let notice = Notice {
        topic: "noticed".into(),
        event: "ssegate.join".into(),
        data: "{\"sub\":\"a\nb\"}".into(),
    };
    s.store.notify(vec![notice.clone()]).await.unwrap();
    loop {
        let signal = tokio::time::timeout(Duration::from_secs(10), signals.recv())
            .await
            .expect("noticed")
            .expect("open");
        if let Signal::Notice(got) = signal {
            assert_eq!(got, notice);
            break;
        }
    }
    assert_eq!(s.store.tail(&t).await.unwrap(), before, "nothing stored");
    let page = s.store.read(&t, before, 10).await.unwrap();
    assert!(page.events.is_empty() && page.gap.is_none());
}

fn change(topic: &str, id: &str, entry: Option<&str>) -> Change {
    Change {
        topic: topic.into(),
        id: id.into(),
        entry: entry.map(Into::into),
    }
}

/// Files `node`'s entries (topic, id, JSON), indexing their topics under the node.
async fn file(r: &Arc<dyn Registry>, node: &str, entries: &[(&str, &str, &str)]) {
    let changes: Vec<Change> = entries
        .iter()
        .map(|(topic, id, json)| change(topic, id, Some(json)))
        .collect();
    let mut topics: Vec<String> = entries.iter().map(|(t, _, _)| (*t).to_owned()).collect();
    topics.sort();
    topics.dedup();
    r.write(node, &changes, &topics, &[]).await.unwrap();
}

/// Entries are filed under their topics, listed from any node in id order, and removed.
async fn presence_entries_are_filed_listed_and_removed(s: Subject) {
    let r = &s.registry;
    assert!(r.entries("room").await.unwrap().is_empty());
    for node in ["n1", "n2"] {
        r.heartbeat(node, Duration::from_secs(60)).await.unwrap();
    }
    let a = "{\"a\":1}";
    file(
        r,
        "n1",
        &[
            ("room", "n1.2", "{\"b\":1}"),
            ("room", "n1.1", a),
            ("hall", "n1.1", a),
        ],
    )
    .await;
    file(r, "n2", &[("room", "n2.1", "{\"c\":1}")]).await;
    assert_eq!(
        r.entries("room").await.unwrap(),
        ["{\"a\":1}", "{\"b\":1}", "{\"c\":1}"]
    );
    assert_eq!(r.entries("hall").await.unwrap(), ["{\"a\":1}"]);
    let mut topics = r.topics().await.unwrap();
    topics.sort();
    assert_eq!(topics, ["hall", "room"]);
    // Removing, and adding in the same write.
    r.write(
        "n1",
        &[
            change("room", "n1.1", None),
            change("hall", "n1.1", None),
            change("room", "n1.3", Some("{\"d\":1}")),
        ],
        &[],
        &["hall".into()],
    )
    .await
    .unwrap();
    assert_eq!(
        r.entries("room").await.unwrap(),
        ["{\"b\":1}", "{\"d\":1}", "{\"c\":1}"]
    );
    assert!(r.entries("hall").await.unwrap().is_empty());
    assert_eq!(r.topics().await.unwrap(), ["room"]);
    // A node the registry knows is not told it was forgotten; a forgotten one is, once.
    let beat = async |node: &str| r.heartbeat(node, Duration::from_secs(60)).await.unwrap();
    assert!(!beat("n1").await.forgotten);
    assert!(beat("n3").await.forgotten);
    assert!(!beat("n3").await.forgotten);
    // The entries of a node the registry no longer lists (it lost its list while the node died,
    // so nobody can reap it) are not shown.
    r.forget("n2").await.unwrap();
    assert_eq!(r.entries("room").await.unwrap(), ["{\"b\":1}", "{\"d\":1}"]);
    r.forget("n1").await.unwrap();
    assert!(
        r.topics().await.unwrap().is_empty(),
        "only listed nodes' topics"
    );
    assert!(beat("n1").await.forgotten);
    assert!(beat("n2").await.forgotten);
    assert_eq!(r.entries("room").await.unwrap().len(), 3, "listed again");
}

/// A node whose heartbeat ran out is named by the next heartbeat of another; one reaper gets
/// its entries (and removes them), others find the claim taken; it is then forgotten.
async fn a_dead_nodes_entries_are_reaped_once(s: Subject) {
    let r = &s.registry;
    let ttl = Duration::from_secs(60);
    r.heartbeat("alive", ttl).await.unwrap();
    r.heartbeat("dying", Duration::from_millis(50))
        .await
        .unwrap();
    let x = "{\"x\":1}";
    file(
        r,
        "dying",
        &[("room", "dying.1", x), ("hall", "dying.1", x)],
    )
    .await;
    file(r, "alive", &[("room", "alive.1", "{\"y\":1}")]).await;
    // Not a sleep for its own sake: the registry's clock must pass the dying node's time.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let expired = loop {
        let beat = r.heartbeat("alive", ttl).await.unwrap();
        if !beat.expired.is_empty() {
            break beat.expired;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dying node expires"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(expired, ["dying"], "only the node whose time ran out");
    let mut reaped = r
        .reap("dying", Duration::from_secs(30))
        .await
        .unwrap()
        .expect("the first claim wins");
    reaped.sort();
    assert_eq!(
        reaped,
        [
            ("hall".to_owned(), vec!["{\"x\":1}".to_owned()]),
            ("room".to_owned(), vec!["{\"x\":1}".to_owned()])
        ]
    );
    assert!(
        r.reap("dying", Duration::from_secs(30))
            .await
            .unwrap()
            .is_none(),
        "a second reaper finds the claim taken"
    );
    assert_eq!(r.entries("room").await.unwrap(), ["{\"y\":1}"]);
    assert!(r.entries("hall").await.unwrap().is_empty());
    assert!(r.heartbeat("alive", ttl).await.unwrap().expired.is_empty());
    assert!(
        r.heartbeat("dying", ttl).await.unwrap().forgotten,
        "a reaped node that comes back must write its entries again"
    );
}

/// Reading back pages newest first, before an id or from the newest; and what the stream says
/// about itself, before and after trimming (this subject keeps 3 events).
async fn reads_back_newest_first_and_states_the_stream(s: Subject) {
    let t = topic("backwards");
    assert_eq!(s.store.stat(&t).await.unwrap(), TopicStat::default());
    assert!(s.store.read_back(&t, None, 10).await.unwrap().is_empty());
    let ids = append_n(&*s.store, &t, 3).await;
    let back =
        |events: Vec<ssegate::event::Event>| events.into_iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(
        back(s.store.read_back(&t, None, 2).await.unwrap()),
        [ids[2], ids[1]]
    );
    assert_eq!(
        back(s.store.read_back(&t, Some(ids[1]), 10).await.unwrap()),
        [ids[0]]
    );
    assert!(s
        .store
        .read_back(&t, Some(ids[0]), 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.store.stat(&t).await.unwrap(),
        TopicStat {
            exists: true,
            length: 3,
            first: Some(ids[0]),
            last: Some(ids[2]),
            last_generated: ids[2],
            removed_any: false,
        }
    );
    let more = append_n(&*s.store, &t, 2).await;
    let stat = s.store.stat(&t).await.unwrap();
    assert_eq!(
        (stat.length, stat.first, stat.last),
        (3, Some(ids[2]), Some(more[1]))
    );
    assert!(stat.removed_any, "trimmed");
    assert_eq!(
        back(s.store.read_back(&t, None, 10).await.unwrap()),
        [more[1], more[0], ids[2]]
    );
}

/// A delete tells the topic's watchers first (with the highest id it had), then removes its
/// stream, idempotency keys and labels, and nothing of another topic, even one whose name
/// reads as a pattern matching it; its presence entries stay. The topic then starts anew.
async fn delete_removes_the_topic_and_tells_its_readers(s: Subject) {
    let t = topic("gone.*");
    let neighbour = topic("gone.x");
    let mut signals = s.store.take_signals().expect("signals");
    tokio::time::timeout(Duration::from_secs(10), s.store.watch(&t))
        .await
        .unwrap()
        .unwrap();
    let keyed = |data: &str, key: &str| NewEvent {
        event: Some("note".into()),
        data: data.into(),
        idempotency_key: Some(key.into()),
        labels: vec!["l".into()],
    };
    let ids = s
        .store
        .append(&t, vec![keyed("a", "k1"), keyed("b", "k2")])
        .await
        .unwrap();
    let kept = s
        .store
        .append(&neighbour, vec![keyed("n", "k1")])
        .await
        .unwrap();
    s.registry
        .heartbeat("n1", Duration::from_secs(60))
        .await
        .unwrap();
    file(&s.registry, "n1", &[("gone.*", "n1.1", "{}")]).await;

    assert_eq!(s.store.delete(&t).await.unwrap(), Some(ids[1]));
    loop {
        let signal = tokio::time::timeout(Duration::from_secs(10), signals.recv())
            .await
            .expect("told")
            .expect("open");
        if let Signal::Removed { topic, upto } = signal {
            assert_eq!((topic.as_str(), upto), ("gone.*", ids[1]));
            break;
        }
    }
    // Left empty, past the deleted history: no new id at or below an old one.
    let fence = s.store.tail(&t).await.unwrap();
    assert!(fence > ids[1], "{fence} after {}", ids[1]);
    let stat = s.store.stat(&t).await.unwrap();
    assert_eq!(
        (stat.length, stat.first, stat.last, stat.last_generated),
        (0, None, None, fence)
    );
    assert_eq!(s.store.keyed(&t, "k1").await.unwrap(), None);
    for cursor in [ids[0], ids[1]] {
        let old = s.store.read(&t, cursor, 10).await.unwrap();
        assert_eq!(old.gap, Some(GapReason::Trimmed), "an old cursor is told");
        assert!(old.events.is_empty());
    }
    let labelled = s
        .store
        .read_labelled(&t, &["l".to_owned()], StreamId::ZERO, 10)
        .await
        .unwrap();
    assert!(labelled.events.is_empty() && labelled.gap.is_none());
    assert_eq!(
        s.registry.entries("gone.*").await.unwrap(),
        ["{}"],
        "presence kept"
    );
    // The neighbour is untouched.
    assert_eq!(
        s.store.keyed(&neighbour, "k1").await.unwrap(),
        Some(kept[0])
    );
    assert_eq!(
        s.store
            .read(&neighbour, StreamId::ZERO, 10)
            .await
            .unwrap()
            .events
            .len(),
        1
    );
    // The same key appends again: it belonged to the deleted history.
    let again = s.store.append(&t, vec![keyed("c", "k1")]).await.unwrap();
    assert!(again[0] > fence);
    let page = s.store.read(&t, ids[1], 10).await.unwrap();
    assert_eq!(page.gap, Some(GapReason::Trimmed));
    assert_eq!(page.events.iter().map(|e| e.id).collect::<Vec<_>>(), again);
    assert_eq!(s.store.delete(&t).await.unwrap(), Some(again[0]));
    assert_eq!(
        s.store.delete(&t).await.unwrap(),
        None,
        "nothing left to delete"
    );
}

/// An entry filed in a shared list is listed until its time, with that time; filing it again
/// keeps the later time; entries past their time are listed no more; lists are apart.
async fn shared_lists_keep_entries_until_their_time(s: Subject) {
    let store = &*s.store;
    let now = ssegate::event::unix_ms();
    let (long, short) = (now + 60_000, now + 300);
    assert_eq!(store.filed("revocations").await.unwrap(), vec![]);
    store
        .file_until("revocations", "jti:a", long)
        .await
        .unwrap();
    store
        .file_until("revocations", "jti:b", short)
        .await
        .unwrap();
    // An earlier time for an entry already there changes nothing.
    store
        .file_until("revocations", "jti:a", now + 1_000)
        .await
        .unwrap();
    store.file_until("other", "x", long).await.unwrap();
    let mut listed = store.filed("revocations").await.unwrap();
    listed.sort();
    assert_eq!(
        listed,
        vec![("jti:a".to_owned(), long), ("jti:b".to_owned(), short)]
    );
    // The short entry's time passes (time itself is what is tested here).
    let left = (short + 50).saturating_sub(ssegate::event::unix_ms());
    tokio::time::sleep(Duration::from_millis(left)).await;
    assert_eq!(
        store.filed("revocations").await.unwrap(),
        vec![("jti:a".to_owned(), long)]
    );
    // A later time for an entry wins.
    store
        .file_until("revocations", "jti:a", long + 1)
        .await
        .unwrap();
    assert_eq!(
        store.filed("revocations").await.unwrap(),
        vec![("jti:a".to_owned(), long + 1)]
    );
    assert_eq!(
        store.filed("other").await.unwrap(),
        vec![("x".to_owned(), long)]
    );
}

/// A fence above a stream's last id makes the next event's id come after it, on a stream that
/// exists and on one that is gone; a fence at or below the last id changes nothing. A cursor at
/// the fence is covered until the next event; one between the last event and the fence is told
/// of the gap.
async fn a_fence_puts_new_ids_past_it(s: Subject) {
    let store = &*s.store;
    let t = topic("fenced");
    let ids = append_n(store, &t, 2).await;
    // An hour ahead: no clock gets there during the test.
    let above = StreamId::new(ids[1].ms + 3_600_000, 5);
    assert!(!store.fence(&t, ids[0]).await.unwrap(), "below the last id");
    assert!(!store.fence(&t, ids[1]).await.unwrap(), "at the last id");
    assert!(store.fence(&t, above).await.unwrap());
    assert!(!store.fence(&t, above).await.unwrap(), "once is enough");
    // A reader at the fence has missed nothing; one between the last event and the fence
    // holds an id the stream never had.
    assert_eq!(store.read(&t, above, 10).await.unwrap().gap, None);
    let between = StreamId::new(ids[1].ms + 1, 0);
    assert_eq!(
        store.read(&t, between, 10).await.unwrap().gap,
        Some(GapReason::UnknownCursor)
    );
    let next = append_n(store, &t, 1).await;
    assert!(next[0] > above, "{} after {above}", next[0]);

    // A stream gone altogether (Redis restarted without its data, say).
    let gone = topic("fenced.gone");
    assert!(store.fence(&gone, above).await.unwrap());
    let next = append_n(store, &gone, 1).await;
    assert!(next[0] > above, "{} after {above}", next[0]);
}
