//! Nothing acknowledged is lost when things break: Redis down at start, restarted, hung; clients
//! that read slowly or not at all; nodes draining.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use ssegate::config::Settings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::helpers::{
    assert_spread_retries, open_bodies, settings, spawn_app, RedisServer, ResumingClient, TestApp,
    NODE_TOPICS, PATIENCE,
};

/// Settings that notice Redis trouble quickly, with room for a loaded two-core machine.
fn fast(redis: &RedisServer) -> Settings {
    let mut s = settings(Some(redis));
    s.redis.connect_timeout = Duration::from_millis(500);
    s.redis.response_timeout = Duration::from_secs(1);
    s.redis.ping_interval = Duration::from_millis(200);
    s
}

async fn status(app: &TestApp, path: &str) -> u16 {
    app.http
        .get(app.url(path))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn wait_ready(app: &TestApp, ready: bool) {
    let want = if ready { 200 } else { 503 };
    app.eventually(&format!("/readyz answers {want}"), async || {
        status(app, "/readyz").await == want
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_without_redis_and_becomes_ready_when_it_appears() {
    let mut redis = RedisServer::unstarted();
    let app = spawn_app(fast(&redis)).await;
    assert_eq!(status(&app, "/healthz").await, 200);
    assert_eq!(status(&app, "/readyz").await, 503);
    let (code, reply) = app.post_json(&json!({"topic": "late", "data": "x"})).await;
    assert_eq!(
        (code, reply["error"].as_str()),
        (503, Some("store_unavailable")),
        "{reply}"
    );

    assert!(redis.launch().await);
    wait_ready(&app, true).await;
    let mut sse = app.subscribe("late", None).await;
    let id = app.publish("late", "now").await;
    assert_eq!(sse.expect().await.id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_loses_nothing_acknowledged() {
    let mut redis = RedisServer::start_durable().await;
    let a = Arc::new(spawn_app(fast(&redis)).await);
    let b = Arc::new(spawn_app(fast(&redis)).await);
    let nodes = vec![a.url(""), b.url("")];
    let topic = "durable";
    let first = a.publish(topic, "first").await;
    let mut clients = [
        ResumingClient::start(nodes.clone(), topic, Some("0".into())),
        ResumingClient::start(
            nodes.iter().rev().cloned().collect(),
            topic,
            Some("0".into()),
        ),
        ResumingClient::start(nodes.clone(), topic, Some(first.clone())),
    ];

    // Publish steadily through both nodes; retry what is refused, as a publisher would.
    const TOTAL: usize = 200;
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let refused = Arc::new(Mutex::new(0usize));
    let (progress_tx, mut progress) = watch::channel(0usize);
    let publisher = {
        let (a, b, acked, refused) = (a.clone(), b.clone(), acked.clone(), refused.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while acked.lock().unwrap().len() < TOTAL {
                let node = if i % 2 == 0 { &a } else { &b };
                i += 1;
                let started = Instant::now();
                let (code, reply) = node
                    .post_json(&json!({"topic": topic, "data": format!("e{i}")}))
                    .await;
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "a publish hung for {:?}",
                    started.elapsed()
                );
                match code {
                    201 => {
                        let mut all = acked.lock().unwrap();
                        all.push(reply["id"].as_str().unwrap().to_owned());
                        progress_tx.send_replace(all.len());
                    }
                    503 => {
                        assert_eq!(reply["error"], "store_unavailable");
                        *refused.lock().unwrap() += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => panic!("unexpected {other}: {reply}"),
                }
            }
        })
    };

    progress.wait_for(|n| *n >= TOTAL / 2).await.unwrap();
    redis.kill();
    wait_ready(&a, false).await;
    wait_ready(&b, false).await;
    let r = a
        .http
        .post(a.url("/v1/events?topic=durable"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "refused while Redis is down");
    assert_eq!(r.headers()["retry-after"], "1");
    assert!(
        redis.launch().await,
        "redis comes back on the same port with its AOF"
    );
    wait_ready(&a, true).await;
    wait_ready(&b, true).await;
    publisher.await.unwrap();
    assert!(*refused.lock().unwrap() > 0, "the publisher saw the outage");

    let stream = redis.stream_ids(topic).await;
    let acked = acked.lock().unwrap().clone();
    for id in &acked {
        assert!(
            stream.contains(id),
            "acknowledged {id} survived the restart"
        );
    }
    let last = stream.last().unwrap().clone();
    let after_first = stream.iter().position(|id| *id == first).unwrap() + 1;
    let expected = [
        stream.clone(),
        stream.clone(),
        stream[after_first..].to_vec(),
    ];
    for (i, client) in clients.iter_mut().enumerate() {
        let got = client.ids_until(&last).await;
        assert_eq!(got, expected[i], "client {i}: every event once, in order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_is_noticed_not_waited_on() {
    let redis = RedisServer::start().await;
    let app = spawn_app(fast(&redis)).await;
    let mut sse = app.subscribe("hung", None).await;
    let before = app.publish("hung", "before").await;
    assert_eq!(sse.expect().await.id, before);

    redis.pause();
    let paused = Instant::now();
    wait_ready(&app, false).await;
    assert!(
        paused.elapsed() < Duration::from_secs(5),
        "noticed after {:?}",
        paused.elapsed()
    );
    let started = Instant::now();
    let (code, reply) = app
        .post_json(&json!({"topic": "hung", "data": "during"}))
        .await;
    assert_eq!(code, 503, "{reply}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "refused after {:?}",
        started.elapsed()
    );

    redis.resume();
    wait_ready(&app, true).await;
    let after = app.publish("hung", "after").await;
    // The refused publish may still have run once Redis woke up (it was not acknowledged, so
    // either outcome is allowed); whatever the stream holds arrives once, in order.
    let stream = redis.stream_ids("hung").await;
    assert_eq!(stream.last(), Some(&after));
    let rest = &stream[stream.iter().position(|id| *id == before).unwrap() + 1..];
    let got = sse.take_ids(rest.len()).await;
    assert_eq!(got, rest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_catches_up_from_the_stream() {
    let redis = RedisServer::start().await;
    let mut s = settings(Some(&redis));
    s.fanout_buffer = 16;
    s.replay_page_size = 50;
    s.max_event_bytes = 128 * 1024;
    let app = spawn_app(s).await;
    // Subscribed, but not read until everything is published: the socket buffers fill and the
    // client falls far behind the in-memory feed.
    let mut slow = app.subscribe("firehose", None).await;
    let payload = "x".repeat(64 * 1024);
    let mut ids = Vec::new();
    for _ in 0..200 {
        ids.push(app.publish("firehose", &payload).await);
    }
    let got = slow.take_ids(ids.len()).await;
    assert_eq!(got, ids, "everything, once, in order");
    assert!(
        app.hub.catch_ups() > 0,
        "the client fell behind and caught up from the stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_is_disconnected_and_resumes() {
    let redis = RedisServer::start().await;
    let mut s = settings(Some(&redis));
    s.write_timeout = Duration::from_millis(500);
    s.max_event_bytes = 128 * 1024;
    let app = spawn_app(s).await;

    // A raw client with a small receive buffer that reads one event, then stops reading.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(app.addr).await.unwrap();
    conn.write_all(b"GET /v1/events?topic=stall HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let mut read = async |seen: &mut String| {
        let n = tokio::time::timeout(PATIENCE, conn.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    };
    while !seen.contains("retry:") {
        read(&mut seen).await;
    }
    let first = app.publish("stall", "first").await;
    while !seen.contains(&format!("id: {first}")) {
        read(&mut seen).await;
    }

    let payload = "y".repeat(64 * 1024);
    let hub = app.hub.clone();
    let mut ids = Vec::new();
    while hub.active_topics() > NODE_TOPICS {
        assert!(
            ids.len() < 2000,
            "the stalled client was never disconnected"
        );
        ids.push(app.publish("stall", &payload).await);
    }
    // Disconnected, and counted: it resumes where it was.
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        crate::ops::sample(&metrics, "ssegate_slow_client_disconnects_total"),
        1.0
    );
    let mut resumed = app.subscribe("stall", Some(&first)).await;
    let got = resumed.take_ids(ids.len()).await;
    assert_eq!(got, ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_spreads_reconnects_with_a_jittered_retry() {
    let mut s = settings(None);
    s.retry = Duration::from_secs(1);
    s.shutdown_retry_spread = Duration::from_secs(3);
    let app = spawn_app(s).await;
    let bodies = open_bodies(&app, "drain", 5, reqwest::Version::HTTP_11, 1000).await;
    app.shutdown.trigger();
    assert_spread_retries(bodies, 1000..=4000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moves_to_another_node_when_its_node_stops() {
    let redis = RedisServer::start().await;
    let a = spawn_app(fast(&redis)).await;
    let b = spawn_app(fast(&redis)).await;
    let mut client =
        ResumingClient::start(vec![a.url(""), b.url("")], "failover", Some("0".into()));
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(b.publish("failover", &format!("{i}")).await);
    }
    assert_eq!(client.ids_until(&ids[19]).await, ids);
    // Node A goes away (its streams end at once); the client moves to B.
    a.shutdown.trigger();
    for i in 20..40 {
        ids.push(b.publish("failover", &format!("{i}")).await);
    }
    assert_eq!(client.ids_until(&ids[39]).await, ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_subscription_connection_makes_the_node_unready_then_catches_up() {
    let redis = RedisServer::start().await;
    let mut s = fast(&redis);
    // Only the restore after the reconnect can find what was missed, not the periodic check.
    s.catchup_interval = Duration::from_secs(600);
    let app = spawn_app(s).await;
    let mut sse = app.subscribe("resub", None).await;
    let first = app.publish("resub", "first").await;
    assert_eq!(sse.expect().await.id, first);

    // Kill only the node's subscription connection and keep it from coming back (Redis refuses
    // new connections at `maxclients`) while events are published: their announcements reach
    // nobody, and no later announcement reveals them.
    let mut conn = redis.conn().await;
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .unwrap();
    let subscriber = clients
        .lines()
        .find(|l| !l.contains(" sub=0 "))
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .expect("the node's subscription connection")
        .to_owned();
    let set_maxclients = |n: u32| {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxclients")
            .arg(n)
            .clone()
    };
    let _: () = set_maxclients(1).query_async(&mut conn).await.unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&subscriber)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(killed, 1);
    // The command connection still works, yet the node is not ready: it would miss live events.
    wait_ready(&app, false).await;
    let mut missed = Vec::new();
    for i in 0..5 {
        missed.push(app.publish("resub", &format!("{i}")).await);
    }
    let _: () = set_maxclients(10_000).query_async(&mut conn).await.unwrap();
    wait_ready(&app, true).await;
    let got = sse.take_ids(missed.len()).await;
    assert_eq!(got, missed);
    app.eventually("the topic is subscribed again", async || {
        redis.channels().await.len() == 2
    })
    .await;
}
