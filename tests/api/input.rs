//! What clients send and what they get back: framing, headers, cursors and bad input.

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::helpers::{settings, spawn_app, RedisServer, Sse};

fn new_connection_per_request() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// A subscription on a new connection is streamed by the listener itself, one on a kept-alive
/// connection by the router: clients must not see a difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_the_same_served_directly_or_by_the_router() {
    let redis = RedisServer::start().await;
    let app = spawn_app(settings(Some(&redis))).await;
    let first = app.publish("paths", "one\nline two").await;
    let second = app.publish("paths", "two").await;

    let fresh = new_connection_per_request();
    let kept = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    // `kept` now holds an idle connection, which its subscription reuses.
    let health = kept.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    health.bytes().await.unwrap();

    let mut streams = Vec::new();
    for (client, direct) in [(&fresh, 1), (&kept, 0)] {
        let before = app.server.direct_streams();
        let response = client
            .get(app.url("/v1/events?topic=paths"))
            .header("Last-Event-ID", "0")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        for (name, value) in [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
            ("x-accel-buffering", "no"),
        ] {
            assert_eq!(response.headers()[name], value, "{name}");
        }
        assert_eq!(app.server.direct_streams() - before, direct);
        streams.push(Sse::from_response(response));
    }
    let live = app.publish("paths", "three").await;
    for sse in &mut streams {
        let got = sse.take(3).await;
        let ids: Vec<_> = got.iter().map(|e| e.id.clone()).collect();
        assert_eq!(ids, [first.clone(), second.clone(), live.clone()]);
        assert_eq!(got[0].data, "one\nline two");
        assert_eq!(got[2].data, "three");
    }
}

/// Payloads that stress SSE framing, and what a spec-following parser must read back.
fn framing_cases() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "line one\nline two\nline three",
            "line one\nline two\nline three",
        ),
        ("windows\r\nline\r\nbreaks", "windows\nline\nbreaks"),
        ("old mac\rbreak", "old mac\nbreak"),
        ("", ""),
        ("trailing newline\n", "trailing newline\n"),
        ("\n\nleading blank lines", "\n\nleading blank lines"),
        (
            "data: looks like a field\nid: 5-5\nevent: x",
            "data: looks like a field\nid: 5-5\nevent: x",
        ),
        ("héllo wörld ✓ 日本語 🚀", "héllo wörld ✓ 日本語 🚀"),
        (": not a comment", ": not a comment"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_round_trips_through_an_independent_parser() {
    let redis = RedisServer::start().await;
    let app = spawn_app(settings(Some(&redis))).await;
    let mut live = app.subscribe("frames", None).await;
    let mut ids = Vec::new();
    for (i, (payload, _)) in framing_cases().into_iter().enumerate() {
        let event = if i % 2 == 0 {
            Some("custom.type")
        } else {
            None
        };
        let mut body = json!({ "topic": "frames", "data": payload });
        if let Some(e) = event {
            body["event"] = json!(e);
        }
        let (status, reply) = app.post_json(&body).await;
        assert_eq!(status, 201, "{reply}");
        ids.push(reply["id"].as_str().unwrap().to_owned());
    }
    // Once live (announced through Redis pub/sub), once replayed (read from the stream).
    let mut replayed = app.subscribe("frames", Some("0")).await;
    for sse in [&mut live, &mut replayed] {
        for (i, (_, expected)) in framing_cases().into_iter().enumerate() {
            let e = sse.expect().await;
            assert_eq!(e.id, ids[i]);
            assert_eq!(e.data, expected, "case {i}");
            assert_eq!(e.event, if i % 2 == 0 { "custom.type" } else { "message" });
        }
    }
    // A plain-body publish keeps the body as is, too.
    let (status, reply) = app.post_raw("?topic=frames&event=plain", "a\r\nb").await;
    assert_eq!(status, 201, "{reply}");
    let e = live.expect().await;
    assert_eq!((e.event.as_str(), e.data.as_str()), ("plain", "a\nb"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_starts_with_retry_and_sends_heartbeats_and_headers() {
    let app = spawn_app(settings(None)).await;
    let response = app
        .http
        .get(app.url("/v1/events?topic=hb"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let h = response.headers();
    assert_eq!(h["content-type"], "text/event-stream");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-accel-buffering"], "no");
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("\n:\n") {
        let chunk = tokio::time::timeout(crate::helpers::PATIENCE, body.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(seen.starts_with("retry: 2000\n\n"), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_header_wins_over_query() {
    let app = spawn_app(settings(None)).await;
    let ids = [
        app.publish("cur", "1").await,
        app.publish("cur", "2").await,
        app.publish("cur", "3").await,
    ];
    // A browser reconnecting keeps its URL (with lastEventId) and adds the header.
    let mut sse = app
        .subscribe_with(&format!("?topic=cur&lastEventId={}", ids[0]), Some(&ids[1]))
        .await;
    assert_eq!(sse.expect().await.id, ids[2]);
    let mut by_query = app
        .subscribe_with(&format!("?topic=cur&lastEventId={}", ids[0]), None)
        .await;
    assert_eq!(by_query.expect().await.id, ids[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_json_errors_and_the_server_keeps_serving() {
    let redis = RedisServer::start().await;
    let mut s = settings(Some(&redis));
    s.max_event_bytes = 1024;
    s.max_batch_events = 3;
    let app = spawn_app(s).await;
    let big = "x".repeat(1025);
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "topic with space",
            json!({"topic": "a b", "data": "x"}),
            400,
            "invalid_topic",
        ),
        (
            "topic with brace",
            json!({"topic": "a{b}", "data": "x"}),
            400,
            "invalid_topic",
        ),
        (
            "empty topic",
            json!({"topic": "", "data": "x"}),
            400,
            "invalid_topic",
        ),
        (
            "oversized event",
            json!({"topic": "t", "data": big}),
            413,
            "event_too_large",
        ),
        (
            "reserved type",
            json!({"topic": "t", "data": "x", "event": "ssegate.gap"}),
            400,
            "reserved_event_type",
        ),
        (
            "newline in type",
            json!({"topic": "t", "data": "x", "event": "a\nb"}),
            400,
            "invalid_event_type",
        ),
        (
            "CR in type",
            json!({"topic": "t", "data": "x", "event": "a\rdata: injected"}),
            400,
            "invalid_event_type",
        ),
        ("missing data", json!({"topic": "t"}), 400, "invalid_event"),
        (
            "unknown field",
            json!({"topic": "t", "data": "x", "colour": 1}),
            400,
            "invalid_event",
        ),
        ("not an object", json!(42), 400, "invalid_event"),
        ("empty batch", json!([]), 400, "empty_batch"),
        (
            "batch too large",
            json!([{"topic":"t","data":"1"},{"topic":"t","data":"2"},{"topic":"t","data":"3"},{"topic":"t","data":"4"}]),
            413,
            "batch_too_large",
        ),
        (
            "bad item in batch",
            json!([{"topic":"t","data":"1"},{"topic":"t","data":"2","event":"ssegate.x"}]),
            400,
            "reserved_event_type",
        ),
        (
            "empty idempotency key",
            json!({"topic": "t", "data": "x", "idempotency_key": ""}),
            400,
            "invalid_idempotency_key",
        ),
    ];
    for (what, body, status, code) in cases {
        let (got, reply) = app.post_json(&body).await;
        assert_eq!(got, status, "{what}: {reply}");
        assert_eq!(reply["error"], code, "{what}: {reply}");
        assert!(
            reply["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: a message"
        );
    }
    assert!(
        redis.stream_ids("t").await.is_empty(),
        "a refused batch stores nothing"
    );

    let raw: Vec<(&str, &str, String, u16, &str)> = vec![
        (
            "malformed JSON",
            "",
            "{\"topic\": ".into(),
            400,
            "invalid_json",
        ),
        (
            "plain body, bad topic",
            "?topic=%20",
            "x".into(),
            400,
            "invalid_topic",
        ),
        (
            "plain body, reserved type",
            "?topic=t&event=ssegate.gap",
            "x".into(),
            400,
            "reserved_event_type",
        ),
        (
            "plain body, newline type",
            "?topic=t&event=a%0Ab",
            "x".into(),
            400,
            "invalid_event_type",
        ),
        (
            "plain body, too large",
            "?topic=t",
            "y".repeat(1025),
            413,
            "event_too_large",
        ),
    ];
    for (what, query, body, status, code) in raw {
        let (got, reply) = app.post_raw(query, body).await;
        assert_eq!(got, status, "{what}: {reply}");
        assert_eq!(reply["error"], code, "{what}: {reply}");
    }
    let (got, reply) = app.post_raw("?topic=t", vec![0xff, 0xfe]).await;
    assert_eq!(
        (got, reply["error"].as_str()),
        (400, Some("invalid_data")),
        "non-UTF-8 body"
    );

    let subs: Vec<(&str, Option<&str>, &str)> = vec![
        ("?topic=", None, "invalid_topic"),
        ("", None, "missing_topic"),
        ("?topic=a%7Bb", None, "invalid_topic"),
        ("?topic=t&lastEventId=abc", None, "invalid_cursor"),
        ("?topic=t&lastEventId=1-2-3", None, "invalid_cursor"),
        ("?topic=t", Some("-1"), "invalid_cursor"),
        (
            "?topic=t",
            Some("99999999999999999999999-0"),
            "invalid_cursor",
        ),
    ];
    // On a kept-alive connection the router reads the request; on a new one the listener reads
    // it first and passes it on. The answer must be the same.
    let fresh = new_connection_per_request();
    for (query, header, code) in subs {
        for client in [&app.http, &fresh] {
            let mut req = client.get(app.url(&format!("/v1/events{query}")));
            if let Some(h) = header {
                req = req.header("Last-Event-ID", h);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 400, "{query} {header:?}");
            let reply: Value = r.json().await.unwrap();
            assert_eq!(reply["error"], code, "{query} {header:?}");
        }
    }
    assert_eq!(app.server.direct_streams(), 0);
    let r = app.http.delete(app.url("/v1/events")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let r = app.http.get(app.url("/nowhere")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "not_found");

    // Still serving.
    let mut sse = app.subscribe("t", None).await;
    let id = app.publish("t", "fine").await;
    assert_eq!(sse.expect().await.id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_answer_ids_in_order_and_dedupe_keys() {
    let redis = RedisServer::start().await;
    let app = spawn_app(settings(Some(&redis))).await;
    let (status, reply) = app
        .post_json(&json!([
            {"topic": "b1", "data": "1", "idempotency_key": "k"},
            {"topic": "b2", "data": "2"},
            {"topic": "b1", "data": "3"},
            {"topic": "b1", "data": "1 again", "idempotency_key": "k"},
        ]))
        .await;
    assert_eq!(status, 201, "{reply}");
    let ids: Vec<String> = serde_json::from_value(reply["ids"].clone()).unwrap();
    assert_eq!(ids.len(), 4);
    assert_eq!(ids[3], ids[0], "repeated key, same id");
    assert_eq!(
        redis.stream_ids("b1").await,
        [ids[0].clone(), ids[2].clone()]
    );
    assert_eq!(redis.stream_ids("b2").await, [ids[1].clone()]);

    let (status, reply) = app.post_raw("?topic=b1", "plain").await;
    assert_eq!(status, 201);
    assert!(reply["id"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_without_redis_fails_fast_with_503() {
    let redis = RedisServer::start().await;
    let app = spawn_app(settings(Some(&redis))).await;
    app.publish("down", "before").await;
    drop(redis);
    let started = std::time::Instant::now();
    let r = app
        .http
        .post(app.url("/v1/events"))
        .json(&json!({"topic": "down", "data": "lost?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let reply: Value = r.json().await.unwrap();
    assert_eq!(reply["error"], "store_unavailable");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "bounded: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_failing_for_one_topic_says_which_events_were_stored() {
    let redis = RedisServer::start().await;
    let app = spawn_app(settings(Some(&redis))).await;
    // Make the second topic's stream key unusable, as a misconfigured Redis would.
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("SET")
        .arg("ssegate:{broken}")
        .arg("not a stream")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (status, reply) = app
        .post_json(&json!([
            {"topic": "fine", "data": "1"},
            {"topic": "fine", "data": "2"},
            {"topic": "broken", "data": "3"},
            {"topic": "fine", "data": "4"},
        ]))
        .await;
    assert_eq!(status, 500, "{reply}");
    assert_eq!(reply["error"], "store_error");
    let ids: Vec<Option<String>> = serde_json::from_value(reply["ids"].clone()).unwrap();
    assert_eq!(ids.len(), 4, "{reply}");
    assert!(
        ids[2].is_none(),
        "the broken topic's event was not stored: {reply}"
    );
    let stored: Vec<String> = ids.iter().flatten().cloned().collect();
    assert_eq!(
        stored,
        redis.stream_ids("fine").await,
        "exactly the other topic's events were stored, each with its id"
    );
    assert_eq!(stored.len(), 3);
    // `persisted`: the leading stored events, as before topics were stored together.
    let persisted: Vec<String> = serde_json::from_value(reply["persisted"].clone()).unwrap();
    assert_eq!(persisted, stored[..2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idempotency_key_header_dedupes_json_publishes_too() {
    let redis = RedisServer::start().await;
    let app = spawn_app(settings(Some(&redis))).await;
    let send = |body: Value, key: &'static str| {
        let req = app
            .http
            .post(app.url("/v1/events"))
            .header("Idempotency-Key", key)
            .json(&body);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let one = json!({"topic": "idem.json", "data": "once"});
    let (s1, first) = send(one.clone(), "order-17").await;
    let (s2, again) = send(one, "order-17").await;
    assert_eq!((s1, s2), (201, 201));
    assert_eq!(first["id"], again["id"]);
    // A batch: each event keyed by the header and its place, so a retry appends nothing.
    let batch = json!([
        {"topic": "idem.json", "data": "a"},
        {"topic": "idem.json", "data": "b", "idempotency_key": "own"},
    ]);
    let (_, first) = send(batch.clone(), "batch-9").await;
    let (_, again) = send(batch, "batch-9").await;
    assert_eq!(first["ids"], again["ids"]);
    assert_eq!(redis.stream_ids("idem.json").await.len(), 3);
}
