//! Group commit on a real Redis: concurrent appends share script calls, yet each request keeps
//! its own events together, its own ids and idempotency decision, and its own error; a call that
//! fails or times out fails exactly its own requests, and a timed-out one stays retryable with
//! its idempotency keys.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::streams::StreamRangeReply;
use ssegate::config::Settings;
use ssegate::event::{NewEvent, StreamId, Topic};
use ssegate::metrics::Metrics;
use ssegate::shutdown::Shutdown;
use ssegate::store::{RedisStore, Store, StoreError};
use tokio::task::JoinHandle;

use crate::helpers::{eventually, RedisCluster, RedisServer};

fn topic(name: &str) -> Topic {
    Topic::parse(name).unwrap()
}

fn keyed(data: &str, key: Option<&str>) -> NewEvent {
    NewEvent {
        event: None,
        data: data.to_owned(),
        idempotency_key: key.map(str::to_owned),
        labels: Vec::new(),
    }
}

/// A store on `url` that keeps metrics (to see appends wait for a call), and its shutdown.
async fn store_on(
    url: String,
    response_timeout: Duration,
) -> (Arc<RedisStore>, Arc<Metrics>, Shutdown) {
    let mut settings = Settings {
        redis_url: Some(url),
        ..Settings::default()
    };
    settings.redis.response_timeout = response_timeout;
    let shutdown = Shutdown::new();
    let metrics = Arc::new(Metrics::new());
    let store = RedisStore::connect(&settings, shutdown.clone())
        .unwrap()
        .with_metrics(metrics.clone());
    store.connected().await;
    (Arc::new(store), metrics, shutdown)
}

/// A connection to `redis`, where topic `bad`'s key holds a string, not a stream.
async fn with_bad_topic(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("SET")
        .arg(format!("{}:{{bad}}", Settings::default().key_prefix))
        .arg("not a stream")
        .query_async(&mut conn)
        .await
        .unwrap();
    conn
}

/// `(id, data)` of every entry of a topic's stream, from `XRANGE`.
async fn entries(conn: &mut impl redis::aio::ConnectionLike, topic: &str) -> Vec<(String, String)> {
    let reply: StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("{}:{{{topic}}}", Settings::default().key_prefix))
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    reply
        .ids
        .into_iter()
        .map(|e| {
            let data: String = e.get("data").unwrap();
            (e.id, data)
        })
        .collect()
}

fn spawn_append(
    store: &Arc<RedisStore>,
    t: &str,
    events: Vec<NewEvent>,
) -> JoinHandle<Result<Vec<StreamId>, StoreError>> {
    let (store, t) = (store.clone(), topic(t));
    tokio::spawn(async move { store.append(&t, events).await })
}

/// Waits until `n` appends wait for the call in flight.
async fn until_waiting(metrics: &Metrics, n: i64) {
    eventually(&format!("{n} appends wait for a call"), &mut async || {
        metrics.redis_appends_waiting.get() == n
    })
    .await;
}

/// 300 requests of 3 events each over 5 topics, all at once, some retried concurrently with
/// the same idempotency keys: far fewer script calls than requests, and in every stream each
/// request's events sit together, in order, exactly once, with the ids the request was given.
async fn concurrent_appends_share_calls(
    store: Arc<RedisStore>,
    metrics: &Metrics,
    conn: &mut impl redis::aio::ConnectionLike,
) {
    let calls_before = metrics.redis_append_calls.get();
    let requests = 300;
    let handles: Vec<_> = (0..requests)
        .map(|r| {
            // Every tenth request is sent twice (a retry racing its original).
            let key = |i: usize| (r % 10 == 0).then(|| format!("r{r}-{i}"));
            let events: Vec<NewEvent> = (0..3)
                .map(|i| keyed(&format!("r{r}-e{i}"), key(i).as_deref()))
                .collect();
            let t = format!("commit{}", r % 5);
            let twice = (r % 10 == 0).then(|| spawn_append(&store, &t, events.clone()));
            (r, t.clone(), spawn_append(&store, &t, events), twice)
        })
        .collect();
    let mut given: HashMap<String, StreamId> = HashMap::new();
    for (r, _, handle, twice) in handles {
        let ids = handle.await.unwrap().unwrap();
        assert_eq!(ids.len(), 3);
        if let Some(twice) = twice {
            assert_eq!(
                twice.await.unwrap().unwrap(),
                ids,
                "request {r}: a retry gets the first ids"
            );
        }
        for (i, id) in ids.into_iter().enumerate() {
            given.insert(format!("r{r}-e{i}"), id);
        }
    }
    let mut seen = 0;
    for t in 0..5 {
        let stored = entries(conn, &format!("commit{t}")).await;
        seen += stored.len();
        for (id, data) in &stored {
            assert_eq!(
                &given[data].to_string(),
                id,
                "{data} has the id its request got"
            );
        }
        // Each request's three events are consecutive and in order.
        for chunk in stored.chunks(3) {
            let request = chunk[0].1.split('-').next().unwrap();
            let datas: Vec<&str> = chunk.iter().map(|(_, d)| d.as_str()).collect();
            assert_eq!(
                datas,
                vec![
                    format!("{request}-e0"),
                    format!("{request}-e1"),
                    format!("{request}-e2")
                ],
                "a request's events stay together"
            );
        }
    }
    assert_eq!(seen, requests * 3, "every event exactly once");
    let calls = metrics.redis_append_calls.get() - calls_before;
    assert!(
        calls < requests as u64,
        "{calls} script calls for {requests} requests: concurrent appends share calls"
    );
}

#[tokio::test]
async fn concurrent_appends_share_calls_on_one_redis() {
    let redis = RedisServer::start().await;
    let (store, metrics, _shutdown) = store_on(redis.url(), Duration::from_secs(3)).await;
    concurrent_appends_share_calls(store, &metrics, &mut redis.conn().await).await;
}

#[tokio::test]
async fn concurrent_appends_share_calls_per_slot_on_a_cluster() {
    let cluster = RedisCluster::start(3, 0).await;
    let (store, metrics, _shutdown) = store_on(cluster.url(), Duration::from_secs(3)).await;
    concurrent_appends_share_calls(store, &metrics, &mut cluster.conn().await).await;
}

/// Three requests wait behind a call that Redis holds (`CLIENT PAUSE WRITE`); they go together
/// in the next call, where the one whose topic key holds a string fails alone.
#[tokio::test]
async fn a_refused_request_fails_alone_in_a_shared_call() {
    let redis = RedisServer::start().await;
    let (store, metrics, _shutdown) = store_on(redis.url(), Duration::from_secs(10)).await;
    let mut conn = with_bad_topic(&redis).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(10_000)
        .arg("WRITE")
        .query_async(&mut conn)
        .await
        .unwrap();
    let first = spawn_append(&store, "good1", vec![keyed("first", None)]);
    eventually("the first call is in flight", &mut async || {
        metrics.redis_append_calls.get() == 1
    })
    .await;
    let bad = spawn_append(&store, "bad", vec![keyed("refused", None)]);
    until_waiting(&metrics, 1).await;
    let second = spawn_append(&store, "good2", vec![keyed("second", None)]);
    until_waiting(&metrics, 2).await;
    let third = spawn_append(
        &store,
        "good1",
        vec![keyed("third", None), keyed("fourth", None)],
    );
    until_waiting(&metrics, 3).await;
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut conn)
        .await
        .unwrap();

    let first = first.await.unwrap().unwrap();
    let refused = bad.await.unwrap();
    let second = second.await.unwrap().unwrap();
    let third = third.await.unwrap().unwrap();
    assert!(
        matches!(&refused, Err(StoreError::Internal(m)) if m.contains("WRONGTYPE")),
        "{refused:?}"
    );
    assert_eq!(
        metrics.redis_append_calls.get(),
        2,
        "the three waiting requests shared one call"
    );
    assert_eq!(metrics.redis_appends_waiting.get(), 0);
    let good1: Vec<(String, String)> = entries(&mut conn, "good1").await;
    let expected: Vec<(String, String)> = [first[0], third[0], third[1]]
        .iter()
        .zip(["first", "third", "fourth"])
        .map(|(id, d)| (id.to_string(), d.to_owned()))
        .collect();
    assert_eq!(good1, expected);
    assert_eq!(
        entries(&mut conn, "good2").await,
        vec![(second[0].to_string(), "second".to_owned())]
    );
}

/// On topics no node listens to, a batch's events go as plain `XADD`s instead of the script:
/// an event Redis refuses (its topic's key holds no stream) fails its own request alone, and
/// every other event is stored once, in order, with the id it was answered.
#[tokio::test]
async fn an_unannounced_refused_request_fails_alone() {
    let redis = RedisServer::start().await;
    let (store, _metrics, _shutdown) = store_on(redis.url(), Duration::from_secs(10)).await;
    let mut conn = with_bad_topic(&redis).await;
    let batch = |i: usize| {
        ["good1", "bad", "good2"]
            .into_iter()
            .map(|t| (topic(t), vec![keyed(&format!("{t}-{i}"), None)]))
            .collect::<Vec<_>>()
    };
    let mut stored: HashMap<&str, Vec<(String, String)>> = HashMap::new();
    for i in 0.. {
        assert!(i < 1000, "the batch never went without the script");
        let scripts = redis.calls("evalsha").await;
        let outcomes = store.append_runs(batch(i)).await;
        let unannounced = redis.calls("evalsha").await == scripts;
        for (t, outcome) in ["good1", "bad", "good2"].into_iter().zip(&outcomes) {
            match (t, outcome) {
                ("bad", Err(StoreError::Internal(m))) if m.contains("WRONGTYPE") => {}
                ("bad", other) => panic!("the bad topic's event: {other:?}"),
                (_, Ok(ids)) => {
                    assert_eq!(ids.len(), 1);
                    stored
                        .entry(t)
                        .or_default()
                        .push((ids[0].to_string(), format!("{t}-{i}")));
                }
                (_, Err(e)) => panic!("{t}: {e:?}"),
            }
        }
        if unannounced {
            break;
        }
    }
    for t in ["good1", "good2"] {
        assert_eq!(entries(&mut conn, t).await, stored[t], "{t}");
    }
}

/// In a cluster, a call's unannounced events go as one transaction; an event Redis refuses
/// there (its topic's key holds no stream) still fails its own request alone, and the other
/// topic's events, in the same slot and the same transaction, are stored once with their ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unannounced_refused_request_fails_alone_in_a_cluster_transaction() {
    let cluster = RedisCluster::start(3, 0).await;
    let (store, _metrics, _shutdown) = store_on(cluster.seeds(), Duration::from_secs(10)).await;
    let prefix = Settings::default().key_prefix;
    // Two topics whose keys share a slot, so that one call carries both.
    let mut by_slot: HashMap<u16, String> = HashMap::new();
    let (good, bad) = loop {
        let name = format!("c{}", by_slot.len());
        let slot = cluster.slot_of(&format!("{prefix}:{{{name}}}")).await;
        if let Some(other) = by_slot.insert(slot, name.clone()) {
            break (other, name);
        }
    };
    let bad_key = format!("{prefix}:{{{bad}}}");
    let mut master = cluster.nodes[cluster.master_of(&bad_key).await]
        .conn()
        .await;
    let _: () = redis::cmd("SET")
        .arg(&bad_key)
        .arg("not a stream")
        .query_async(&mut master)
        .await
        .unwrap();
    let mut stored = Vec::new();
    for i in 0.. {
        assert!(i < 1000, "the batch was always announced");
        let announced = cluster.calls("spublish").await;
        let batch = vec![
            (topic(&good), vec![keyed(&format!("good-{i}"), None)]),
            (topic(&bad), vec![keyed(&format!("bad-{i}"), None)]),
        ];
        let outcomes = store.append_runs(batch).await;
        match &outcomes[1] {
            Err(StoreError::Internal(m)) if m.contains("WRONGTYPE") => {}
            other => panic!("the bad topic's event: {other:?}"),
        }
        let ids = outcomes[0].as_ref().expect("the good topic's event");
        stored.push((ids[0].to_string(), format!("good-{i}")));
        if cluster.calls("spublish").await == announced {
            break;
        }
    }
    assert!(cluster.calls("multi").await > 0, "sent as a transaction");
    assert_eq!(entries(&mut master, &good).await, stored);
}

/// A call Redis holds past the deadline fails its own requests (`Unavailable`, so `503`), not
/// the ones waiting behind it; those go in the next call. Once Redis runs the held calls,
/// retries with the same idempotency keys get the ids the events were stored under, and every
/// event is stored once.
#[tokio::test]
async fn a_timed_out_call_fails_its_own_requests_and_leaves_them_retryable() {
    let redis = RedisServer::start().await;
    // Calls give up after twice the response timeout.
    let (store, metrics, _shutdown) = store_on(redis.url(), Duration::from_millis(300)).await;
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(30_000)
        .arg("WRITE")
        .query_async(&mut conn)
        .await
        .unwrap();
    let a = vec![keyed("a", Some("key-a"))];
    let b = vec![keyed("b1", Some("key-b1")), keyed("b2", Some("key-b2"))];
    let c = vec![keyed("c", Some("key-c"))];
    let first = spawn_append(&store, "held", a.clone());
    eventually("the first call is in flight", &mut async || {
        metrics.redis_append_calls.get() == 1
    })
    .await;
    let second = spawn_append(&store, "held", b.clone());
    let third = spawn_append(&store, "held", c.clone());
    until_waiting(&metrics, 2).await;

    let failed = first.await.unwrap();
    assert!(
        matches!(failed, Err(StoreError::Unavailable(_))),
        "{failed:?}"
    );
    // The waiting requests were not failed with it: they are in the next call, still held.
    assert!(!second.is_finished() && !third.is_finished());
    eventually("the waiting requests' call is in flight", &mut async || {
        metrics.redis_append_calls.get() == 2
    })
    .await;
    for held in [second.await.unwrap(), third.await.unwrap()] {
        assert!(matches!(held, Err(StoreError::Unavailable(_))), "{held:?}");
    }

    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut conn)
        .await
        .unwrap();
    // The retries go out on the same connection, after the held calls: Redis runs those first.
    let a_ids = store.append(&topic("held"), a).await.unwrap();
    let b_ids = store.append(&topic("held"), b).await.unwrap();
    let c_ids = store.append(&topic("held"), c).await.unwrap();
    let stored = entries(&mut conn, "held").await;
    let expected: Vec<(String, String)> = [a_ids[0], b_ids[0], b_ids[1], c_ids[0]]
        .iter()
        .zip(["a", "b1", "b2", "c"])
        .map(|(id, d)| (id.to_string(), d.to_owned()))
        .collect();
    assert_eq!(
        stored, expected,
        "each event once, under the id its retry was given"
    );
}

/// Requests sharing calls get one announcement per topic per call, carrying all its events:
/// every node sees each event once, in order, with its predecessor, and the script's XADDs are
/// all matched by announcements (none is taken for a direct XADD and read again), while a real
/// direct XADD still is.
#[tokio::test]
async fn shared_calls_announce_every_event_once_in_order() {
    let redis = RedisServer::start().await;
    let (store, _metrics, _shutdown) = store_on(redis.url(), Duration::from_secs(3)).await;
    let mut signals = store.take_signals().expect("signals");
    for t in ["ann.a", "ann.b", "ann.c"] {
        tokio::time::timeout(Duration::from_secs(10), store.watch(&topic(t)))
            .await
            .unwrap()
            .unwrap();
    }
    let handles: Vec<_> = (0..40)
        .map(|r| {
            let t = if r % 2 == 0 { "ann.a" } else { "ann.b" };
            let events = (0..3).map(|i| keyed(&format!("r{r}-{i}"), None)).collect();
            spawn_append(&store, t, events)
        })
        .collect();
    for h in handles {
        h.await.unwrap().unwrap();
    }
    let mut conn = redis.conn().await;
    let marker: String = redis::cmd("XADD")
        .arg(format!("{}:{{ann.c}}", Settings::default().key_prefix))
        .arg("*")
        .arg("data")
        .arg("direct")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut announced: HashMap<String, Vec<(Option<StreamId>, StreamId)>> = HashMap::new();
    let mut pokes = Vec::new();
    // The direct XADD is read again once it has waited its settling time...
    while !pokes.contains(&"ann.c".to_owned()) {
        record(next_signal(&mut signals).await, &mut announced, &mut pokes);
    }
    // ...and anything poked with it is in before the next announcement.
    let last = store
        .append(&topic("ann.a"), vec![keyed("last", None)])
        .await
        .unwrap()[0];
    while announced["ann.a"].last().map(|(_, id)| *id) != Some(last) {
        record(next_signal(&mut signals).await, &mut announced, &mut pokes);
    }
    assert_eq!(
        pokes,
        vec!["ann.c".to_owned()],
        "only the direct XADD ({marker}) is read again"
    );
    for t in ["ann.a", "ann.b"] {
        let stored: Vec<String> = entries(&mut conn, t)
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let got = &announced[t];
        let ids: Vec<String> = got.iter().map(|(_, id)| id.to_string()).collect();
        assert_eq!(ids, stored, "{t}: every event announced once, in order");
        let mut prev = StreamId::ZERO;
        for (p, id) in got {
            // A run's first event follows whatever came before (notifications are on).
            assert!(
                p.is_none_or(|p| p == prev),
                "{t}: {id} names its predecessor, not {p:?}"
            );
            prev = *id;
        }
    }
}

/// A request of several events is announced once, after its last event, carrying the events:
/// types and payloads arrive as published (newlines and all), each with its predecessor. A
/// request holding an event too large to announce is announced by ids, and one with repeated
/// idempotency keys names only the events it appended.
#[tokio::test]
async fn a_request_of_several_events_is_announced_once_with_its_events() {
    let redis = RedisServer::start().await;
    let (store, _metrics, _shutdown) = store_on(redis.url(), Duration::from_secs(3)).await;
    let mut signals = store.take_signals().expect("signals");
    let t = topic("many.a");
    tokio::time::timeout(Duration::from_secs(10), store.watch(&t))
        .await
        .unwrap()
        .unwrap();
    let typed = |ty: Option<&str>, data: &str| NewEvent {
        event: ty.map(str::to_owned),
        data: data.to_owned(),
        idempotency_key: None,
        labels: Vec::new(),
    };
    let first = store.append(&t, vec![typed(None, "one")]).await.unwrap()[0];
    let sent = vec![
        typed(Some("upd"), "a\nb\n"),
        typed(None, ""),
        typed(Some("x"), "*\n1-0\n9\nnot an announcement"),
    ];
    redis.reset_stats().await;
    let ids = store.append(&t, sent.clone()).await.unwrap();
    assert_eq!(
        redis.calls("publish").await,
        1,
        "one announcement for the request"
    );
    let mut got = Vec::new();
    while got.len() < 1 + sent.len() {
        match next_signal(&mut signals).await {
            ssegate::store::Signal::Appended { prev, event, .. } => got.push((prev, event)),
            other => panic!("unexpected {other:?}"),
        }
    }
    // Notifications are on: each request's first event follows what came before it, the
    // others name their predecessor.
    let prevs = [None, None, Some(ids[0]), Some(ids[1])];
    for (((p, event), (id, new)), prev) in got
        .iter()
        .zip(
            [first]
                .iter()
                .chain(&ids)
                .zip(std::iter::once(&typed(None, "one")).chain(&sent)),
        )
        .zip(prevs)
    {
        assert_eq!(
            (*p, event.id),
            (prev, *id),
            "each event with its predecessor"
        );
        assert_eq!((&event.event, &event.data), (&new.event, &new.data));
    }

    // Too large to announce with its payload: every event of the request by id.
    let large = "y".repeat(17 * 1024);
    let ids = store
        .append(&t, vec![typed(None, "small"), typed(None, &large)])
        .await
        .unwrap();
    for id in &ids {
        match next_signal(&mut signals).await {
            ssegate::store::Signal::AppendedId { id: got, .. } => assert_eq!(got, *id),
            other => panic!("unexpected {other:?}"),
        }
    }

    // A repeated key appends nothing and is not announced; the rest are, by id.
    let before = store
        .append(&t, vec![keyed("k", Some("k2"))])
        .await
        .unwrap()[0];
    match next_signal(&mut signals).await {
        ssegate::store::Signal::Appended { event, .. } => assert_eq!(event.id, before),
        other => panic!("unexpected {other:?}"),
    }
    let ids = store
        .append(
            &t,
            vec![
                keyed("1", Some("k1")),
                keyed("2", Some("k2")),
                keyed("3", Some("k3")),
            ],
        )
        .await
        .unwrap();
    assert_eq!(ids[1], before, "the repeated key keeps its first id");
    for id in [ids[0], ids[2]] {
        match next_signal(&mut signals).await {
            ssegate::store::Signal::AppendedId { id: got, .. } => assert_eq!(got, id),
            other => panic!("unexpected {other:?}"),
        }
    }
    let last = store.append(&t, vec![typed(None, "last")]).await.unwrap()[0];
    match next_signal(&mut signals).await {
        ssegate::store::Signal::Appended { prev, event, .. } => {
            assert_eq!(
                (prev, event.id),
                (None, last),
                "announced after exactly its own notification"
            )
        }
        other => panic!("unexpected {other:?}"),
    }
}

async fn next_signal(
    signals: &mut tokio::sync::mpsc::UnboundedReceiver<ssegate::store::Signal>,
) -> ssegate::store::Signal {
    tokio::time::timeout(Duration::from_secs(10), signals.recv())
        .await
        .expect("signals keep coming")
        .expect("open")
}

/// Files an announcement under its topic, or a poke.
fn record(
    signal: ssegate::store::Signal,
    announced: &mut HashMap<String, Vec<(Option<StreamId>, StreamId)>>,
    pokes: &mut Vec<String>,
) {
    match signal {
        ssegate::store::Signal::Appended { topic, prev, event } => {
            announced.entry(topic).or_default().push((prev, event.id))
        }
        ssegate::store::Signal::Poke { topic } => pokes.push(topic),
        other => panic!("unexpected {other:?}"),
    }
}
