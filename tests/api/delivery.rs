//! Delivery guarantees through the HTTP API: across nodes, at the replay/live seam, for direct
//! XADDs, with gaps, and without leaks.

use std::sync::Arc;
use std::time::Duration;

use rand::seq::IndexedRandom;
use serde_json::Value;
use tokio::sync::watch;

use crate::helpers::{settings, spawn_app, RedisServer, TestApp, NODE_TOPICS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_live_events_and_resume_each_other() {
    let redis = RedisServer::start().await;
    let a = spawn_app(settings(Some(&redis))).await;
    let b = spawn_app(settings(Some(&redis))).await;

    // Live: published on A, received on B.
    let mut on_b = b.subscribe("room", None).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(a.publish("room", &format!("m{i}")).await);
    }
    let got = on_b.take(10).await;
    assert_eq!(got.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), ids);
    assert_eq!(got[3].data, "m3");

    // A client reads 1..k from A, then reconnects to B with the id of event k.
    let k = 4;
    let mut on_a = a.subscribe("room", Some("0")).await;
    let first = on_a.take(k).await;
    assert_eq!(first.last().unwrap().id, ids[k - 1]);
    drop(on_a);
    let mut resumed = b.subscribe("room", Some(&ids[k - 1])).await;
    assert_eq!(resumed.take_ids(10 - k).await, ids[k..]);

    // Then the live stream, with no duplicate at the seam.
    let live1 = a.publish("room", "live1").await;
    let live2 = b.publish("room", "live2").await;
    let next = resumed.take(2).await;
    assert_eq!([next[0].id.clone(), next[1].id.clone()], [live1, live2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seam_is_exact_for_concurrent_publishing_and_subscribing() {
    let redis = RedisServer::start().await;
    let mut s = settings(Some(&redis));
    s.retention.max_events = 0;
    // Small pages and a small fan-out buffer exercise paging and the fall-behind path too.
    s.replay_page_size = 7;
    s.fanout_buffer = 16;
    let a = Arc::new(spawn_app(s.clone()).await);
    let b = Arc::new(spawn_app(s).await);
    let topic = "seam";
    const EVENTS: usize = 1000;
    const PUBLISHERS: usize = 10;
    const CLIENTS: usize = 20;

    let published = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (progress_tx, progress_rx) = watch::channel(0usize);
    let progress_tx = Arc::new(progress_tx);
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let node = if p % 2 == 0 { a.clone() } else { b.clone() };
        let published = published.clone();
        let progress = progress_tx.clone();
        publishers.push(tokio::spawn(async move {
            for i in 0..EVENTS / PUBLISHERS {
                let id = node.publish(topic, &format!("p{p}-{i}")).await;
                let n = {
                    let mut all = published.lock().unwrap();
                    all.push(id);
                    all.len()
                };
                progress.send_replace(n);
            }
        }));
    }

    // Clients join while publishing goes on, with assorted cursors.
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let mut progress = progress_rx.clone();
        progress
            .wait_for(|n| *n >= c * EVENTS / CLIENTS / 2)
            .await
            .unwrap();
        let cursor = {
            let all = published.lock().unwrap();
            match c % 4 {
                0 => None,
                1 => Some("0".to_string()),
                2 => all.choose(&mut rand::rng()).cloned().or(Some("0".into())),
                _ => all.last().cloned().or(Some("0".into())),
            }
        };
        let node = if c % 3 == 0 { a.clone() } else { b.clone() };
        let sse = node.subscribe(topic, cursor.as_deref()).await;
        clients.push((cursor, sse));
    }
    for p in publishers {
        p.await.unwrap();
    }
    let stream = redis.stream_ids(topic).await;
    assert_eq!(stream.len(), EVENTS);
    let last = stream.last().unwrap().clone();

    for (i, (cursor, mut sse)) in clients.into_iter().enumerate() {
        let got = sse.ids_until(&last).await;
        let expected: Vec<String> = match &cursor {
            Some(c) if c == "0" => stream.clone(),
            Some(c) => {
                let pos = stream.iter().position(|id| id == c).unwrap();
                stream[pos + 1..].to_vec()
            }
            None => {
                // Live only: whatever it got must be the stream's exact suffix from its first.
                let pos = stream
                    .iter()
                    .position(|id| *id == got[0])
                    .expect("a stream id");
                stream[pos..].to_vec()
            }
        };
        assert_eq!(
            got.len(),
            expected.len(),
            "client {i} (cursor {cursor:?}) count"
        );
        assert_eq!(got, expected, "client {i} (cursor {cursor:?})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_xadd_reaches_connected_clients() {
    let redis = RedisServer::start().await;
    let app = spawn_app(settings(Some(&redis))).await;
    let mut sse = app.subscribe("sensors", None).await;
    let id = redis.xadd("sensors", "21.5", Some("temperature")).await;
    let e = sse.expect().await;
    assert_eq!(
        (e.id.as_str(), e.event.as_str(), e.data.as_str()),
        (id.as_str(), "temperature", "21.5")
    );

    // A gateway publish after a direct one keeps the order and both arrive once.
    let id2 = redis.xadd("sensors", "22", None).await;
    let id3 = app.publish("sensors", "via http").await;
    let got = sse.take(2).await;
    assert_eq!([got[0].id.clone(), got[1].id.clone()], [id2, id3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_xadd_arrives_without_keyspace_notifications() {
    let redis = RedisServer::start().await;
    let app = spawn_app(settings(Some(&redis))).await;
    let mut conn = redis.conn().await;
    // As on a managed Redis where the gateway may not enable them.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut sse = app.subscribe("quiet", None).await;
    let id = redis.xadd("quiet", "found by catch-up", None).await;
    let e = sse.expect().await;
    assert_eq!(e.id, id);
    // The next gateway publish names the direct entry as its predecessor: still in order.
    let direct = redis.xadd("quiet", "d", None).await;
    let http = app.publish("quiet", "h").await;
    let got = sse.take(2).await;
    assert_eq!([got[0].id.clone(), got[1].id.clone()], [direct, http]);
}

/// What is appended while the subscription connection is down reaches no node as it happens:
/// an event published after the connection came back, although Redis notified it, is not taken
/// as following what the node had (which would skip the one in between) until the node read
/// the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_missed_while_the_subscription_was_down_is_not_skipped() {
    let redis = RedisServer::start().await;
    let mut s = settings(Some(&redis));
    // No health check restores subscriptions (and has every topic read) within the test.
    s.redis.ping_interval = Duration::from_secs(3600);
    s.catchup_interval = Duration::from_secs(3600);
    let app = spawn_app(s).await;
    let mut sse = app.subscribe("holed", None).await;
    let first = app.publish("holed", "before").await;
    assert_eq!(sse.take_ids(1).await, std::slice::from_ref(&first));

    // Dropped, and an entry appended before the gateway can subscribe again: one pipeline, which
    // Redis runs without serving anyone in between.
    let stream = format!(
        "{}:{{holed}}",
        ssegate::config::Settings::default().key_prefix
    );
    let (killed, missed): (u64, String) = redis::pipe()
        .cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("data")
        .arg("in the hole")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    assert!(killed >= 1, "the subscription connection was dropped");
    app.eventually("subscribed again", async || {
        redis.channels().await.iter().any(|c| c.contains("{holed}"))
    })
    .await;
    let after = app.publish("holed", "after").await;
    assert_eq!(sse.take_ids(2).await, [missed, after]);
}

/// A Redis that sends keyspace notifications but will not let the gateway read its settings
/// (as managed services do): the gateway cannot know every append is notified, so each
/// announcement names its predecessor, and deliveries stay exact, direct XADDs included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_config_access_announcements_name_their_predecessor() {
    let redis = RedisServer::start().await;
    let mut conn = redis.conn().await;
    for (command, args) in [
        ("CONFIG", vec!["SET", "notify-keyspace-events", "Kt"]),
        (
            "ACL",
            vec![
                "SETUSER", "app", "on", ">secret", "~*", "&*", "+@all", "-config",
            ],
        ),
    ] {
        let _: () = redis::cmd(command)
            .arg(&args)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let mut s = settings(Some(&redis));
    s.redis_url = Some(redis.url().replace("redis://", "redis://app:secret@"));
    let app = spawn_app(s).await;
    let mut sse = app.subscribe("named", None).await;
    let tails = redis.calls("xrevrange").await;
    let mut ids = vec![app.publish("named", "a").await];
    ids.push(redis.xadd("named", "direct", None).await);
    ids.push(app.publish("named", "b").await);
    ids.push(app.publish("named", "c").await);
    assert_eq!(sse.take_ids(4).await, ids);
    assert_eq!(
        redis.calls("xrevrange").await - tails,
        3,
        "each publish looks up its predecessor"
    );
}

async fn assert_gap_then(
    app: &TestApp,
    topic: &str,
    cursor: &str,
    reason: &str,
    retained: &[String],
) {
    let mut sse = app.subscribe(topic, Some(cursor)).await;
    let gap = sse.expect().await;
    assert_eq!(
        gap.event, "ssegate.gap",
        "gap notice first for cursor {cursor}"
    );
    let data: Value = serde_json::from_str(&gap.data).unwrap();
    assert_eq!(data["cursor"], cursor);
    assert_eq!(data["reason"], reason);
    assert_eq!(data["resume_from"], retained[0].as_str());
    assert_eq!(sse.take_ids(retained.len()).await, retained);
    let live = app.publish(topic, "after the gap").await;
    assert_eq!(sse.expect().await.id, live, "then live");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_are_announced_before_the_retained_events() {
    let redis = RedisServer::start().await;
    let mut s = settings(Some(&redis));
    s.retention.max_events = 5;
    s.retention.approximate = false;
    let app = spawn_app(s).await;
    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(app.publish("hist", &format!("{i}")).await);
    }
    let retained = redis.stream_ids("hist").await;
    assert_eq!(retained, ids[7..]);
    assert_gap_then(&app, "hist", &ids[1], "trimmed", &retained).await;

    let retained = redis.stream_ids("hist").await;
    let (ms, _) = retained[0].split_once('-').unwrap();
    let future = format!("{}-0", ms.parse::<u64>().unwrap() + 10_000_000);
    assert_gap_then(&app, "hist", &future, "unknown_cursor", &retained).await;

    // A stream that lost its history (e.g. Redis restarted without persistence) and was written
    // again: the client's cursor is unknown to it.
    let other: Vec<String> = vec![app.publish("fresh", "x").await];
    let (ms, _) = other[0].split_once('-').unwrap();
    let before = format!("{}-3", ms.parse::<u64>().unwrap() - 1);
    assert_gap_then(&app, "fresh", &before, "unknown_cursor", &other).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_leave_nothing_behind() {
    let redis = RedisServer::start().await;
    let app = spawn_app(settings(Some(&redis))).await;
    let mut clients = Vec::new();
    for i in 0..100 {
        clients.push(app.subscribe(&format!("t{}", i % 10), None).await);
    }
    assert_eq!(app.hub.active_topics(), 10 + NODE_TOPICS);
    assert_eq!(app.hub.running_pumps(), 10 + NODE_TOPICS);
    // One live and one keyspace channel per topic, not per client. Subscribing completes in
    // the background, so wait for it.
    app.eventually("one subscription per topic", async || {
        redis.channels().await.len() == 20
    })
    .await;

    drop(clients);
    let hub = app.hub.clone();
    app.eventually("every topic is released", async || {
        hub.active_topics() == NODE_TOPICS
            && hub.running_pumps() == NODE_TOPICS
            && redis.channels().await.is_empty()
    })
    .await;

    // And the node still serves.
    let mut sse = app.subscribe("t1", None).await;
    let id = app.publish("t1", "still here").await;
    assert_eq!(sse.expect().await.id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_released_and_rejoined_at_once_misses_nothing() {
    let redis = RedisServer::start().await;
    let app = spawn_app(settings(Some(&redis))).await;
    for round in 0..30 {
        let first = app.subscribe("churn", None).await;
        drop(first);
        let mut second = app.subscribe("churn", None).await;
        let id = app.publish("churn", &format!("r{round}")).await;
        assert_eq!(second.expect().await.id, id, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_delivers_live_and_resumes() {
    let app = spawn_app(settings(None)).await;
    let mut live = app.subscribe("solo", None).await;
    let ids = vec![
        app.publish("solo", "1").await,
        app.publish("solo", "2").await,
    ];
    assert_eq!(live.take_ids(2).await, ids);
    let mut resumed = app.subscribe("solo", Some(&ids[0])).await;
    assert_eq!(resumed.expect().await.id, ids[1]);
    let id3 = app.publish("solo", "3").await;
    assert_eq!(resumed.expect().await.id, id3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams_and_exits() {
    let redis = RedisServer::start().await;
    let mut app = spawn_app(settings(Some(&redis))).await;
    let mut sse = app.subscribe("bye", None).await;
    let id = app.publish("bye", "x").await;
    assert_eq!(sse.expect().await.id, id);
    app.shutdown.trigger();
    assert!(
        sse.next().await.is_none(),
        "the stream ends so the client reconnects elsewhere"
    );
    let task = app.task.take().unwrap();
    let done = tokio::time::timeout(Duration::from_secs(10), task).await;
    assert!(
        matches!(done, Ok(Ok(Ok(())))),
        "server exits in bounded time: {done:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_redis() {
    let redis = RedisServer::start().await;
    let app = spawn_app(settings(Some(&redis))).await;
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let alive = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(alive.status(), 200);
    drop(redis);
    let http = app.http.clone();
    let url = app.url("/readyz");
    app.eventually("readyz reports Redis gone", async || {
        let r = http.get(&url).send().await.unwrap();
        r.status() == 503
    })
    .await;
    let r = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the process is still alive");
}

/// Settings under which a test can count Redis reads: no periodic catch-up reads, and replay
/// pages shared long enough not to depend on timing.
fn counting_reads(redis: &RedisServer) -> ssegate::config::Settings {
    let mut s = settings(Some(redis));
    s.catchup_interval = Duration::from_secs(3600);
    s.replay_sharing = Duration::from_secs(60);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_resuming_from_one_cursor_share_one_read() {
    let redis = RedisServer::start().await;
    let app = Arc::new(spawn_app(counting_reads(&redis)).await);
    let cursor = app.publish("storm", "before").await;
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(app.publish("storm", &format!("e{i}")).await);
    }
    let reads = redis.calls("xrange").await;

    let clients: Vec<_> = (0..200)
        .map(|_| {
            let (app, cursor) = (app.clone(), cursor.clone());
            tokio::spawn(async move {
                let mut sse = app.subscribe("storm", Some(&cursor)).await;
                // Returned, so the client stays connected until all have been checked: a
                // topic no client reads any more is released, and its shared reads with it.
                (sse.take_ids(50).await, sse)
            })
        })
        .collect();
    let mut connected = Vec::new();
    for client in clients {
        let (got, sse) = client.await.unwrap();
        assert_eq!(got, ids);
        connected.push(sse);
    }
    assert_eq!(
        redis.calls("xrange").await - reads,
        1,
        "one read for 200 clients"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_page_older_than_the_live_feed_is_read_on() {
    let redis = RedisServer::start().await;
    let app = spawn_app(counting_reads(&redis)).await;
    let cursor = app.publish("t", "c").await;
    let e1 = app.publish("t", "e1").await;
    let mut first = app.subscribe("t", Some(&cursor)).await;
    assert_eq!(first.take_ids(1).await, std::slice::from_ref(&e1));
    // e2 goes out on the live feed; the page read for `first` (just e1) stays shared.
    let e2 = app.publish("t", "e2").await;
    assert_eq!(first.take_ids(1).await, std::slice::from_ref(&e2));
    let reads = redis.calls("xrange").await;

    // The shared page ends before e2, which the feed sent before `second` joined it.
    let mut second = app.subscribe("t", Some(&cursor)).await;
    assert_eq!(second.take_ids(2).await, [e1, e2]);
    assert_eq!(
        redis.calls("xrange").await - reads,
        1,
        "the shared page, then one read on from its end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_to_date_and_new_clients_read_nothing_from_redis() {
    let redis = RedisServer::start().await;
    let app = spawn_app(counting_reads(&redis)).await;
    let mut watcher = app.subscribe("t", None).await;
    let e1 = app.publish("t", "e1").await;
    assert_eq!(watcher.take_ids(1).await, std::slice::from_ref(&e1));
    let (reads, tails) = (redis.calls("xrange").await, redis.calls("xrevrange").await);

    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(app.subscribe("t", Some(&e1)).await);
        clients.push(app.subscribe("t", None).await);
    }
    let e2 = app.publish("t", "e2").await;
    for client in &mut clients {
        assert_eq!(client.take_ids(1).await, std::slice::from_ref(&e2));
    }
    assert_eq!(redis.calls("xrange").await - reads, 0);
    // Nor does the publish look up its predecessor: keyspace notifications are on, so the
    // announcement is checked against them instead.
    assert_eq!(redis.calls("xrevrange").await - tails, 0);
}

/// A topic no node listens to is appended with plain `XADD`s: no script, no announcement. A
/// listener who comes to another node while the publisher still thinks so gets every event all
/// the same, once and in order (from the keyspace notifications), and once the publisher has
/// asked again the topic is announced again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_nobody_listens_to_is_not_announced_and_a_newcomer_misses_nothing() {
    let redis = RedisServer::start().await;
    // No catch-up net: what the newcomer gets comes from notifications and announcements.
    let publisher = spawn_app(counting_reads(&redis)).await;
    let node = spawn_app(counting_reads(&redis)).await;
    a_newcomer_to_an_unheard_topic_misses_nothing(&publisher, &node, "t", async || {
        redis.calls("publish").await
    })
    .await;
}

/// Publishes to `topic` on `publisher` until its publishes stop being announced (`announced`
/// counts announcements), then subscribes on `node` while they still are not: the newcomer
/// gets each event once, in order, before and after the topic is announced again.
pub(crate) async fn a_newcomer_to_an_unheard_topic_misses_nothing(
    publisher: &TestApp,
    node: &TestApp,
    topic: &str,
    announced: impl AsyncFn() -> u64,
) {
    let mut published = vec![publisher.publish(topic, "e0").await];
    let mut announcements = 0;
    for i in 1.. {
        assert!(
            i < 1000,
            "every publish was announced: {topic} never found unheard"
        );
        announcements = announced().await;
        published.push(publisher.publish(topic, &format!("e{i}")).await);
        if announced().await == announcements {
            break;
        }
    }

    let mut newcomer = node
        .subscribe(topic, published.last().map(String::as_str))
        .await;
    let mut unannounced = Vec::new();
    for i in 0..5 {
        unannounced.push(publisher.publish(topic, &format!("n{i}")).await);
    }
    assert_eq!(
        announced().await,
        announcements,
        "the publisher did not know of the newcomer yet"
    );
    assert_eq!(newcomer.take_ids(5).await, unannounced);

    // Asked again (every 2 s), the publisher announces the topic to its listener.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let id = publisher.publish(topic, "later").await;
        assert_eq!(newcomer.take_ids(1).await, vec![id], "once, in order");
        if announced().await > announcements {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never announced again"
        );
        // Pacing while the publisher's next check is due, not synchronisation.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = publisher.publish(topic, "announced").await;
    assert_eq!(newcomer.take_ids(1).await, vec![last]);
}
