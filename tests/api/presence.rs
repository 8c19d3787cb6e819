//! Presence across nodes: the registry read from any node, counts, join and leave events on
//! every node, a killed node's entries reaped with their leave events, and the admin token.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::browser::{Chromium, Page};
use crate::helpers::{
    on_both, settings, spawn_app, Nodes, RedisCluster, RedisServer, Sse, TestApp, PATIENCE,
};
use crate::mercure::{
    self, observer, query, stream, subscription_events, subscriptions_api, SUBSCRIPTIONS,
};
use crate::ops::sample;
use crate::process::Binary;
use crate::security::{hs, SECRET};

fn exp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300
}

/// A subscriber's token: `sub`, an `ssegate.info`, every topic.
fn member(sub: &str) -> String {
    hs(&json!({
        "sub": sub,
        "ssegate": {"subscribe": ["*"], "publish": ["*"], "info": {"name": sub.to_uppercase()}},
        "exp": exp(),
    }))
}

/// A token for the server API of topics matching `patterns`.
fn admin(patterns: &[&str]) -> String {
    hs(&json!({"ssegate": {"admin": patterns}, "exp": exp()}))
}

/// Opens `/v1/events<query>` with a bearer token.
async fn subscribe(app: &TestApp, query: &str, token: &str) -> Sse {
    let response = app
        .http
        .get(app.url(&format!("/v1/events{query}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "subscribe refused");
    Sse::from_response(response)
}

/// `GET /v1/topics/{topic}/presence[?count=1]`: the status and the JSON body.
async fn presence(app: &TestApp, topic: &str, query: &str, token: Option<&str>) -> (u16, Value) {
    let topic: String = form_urlencoded::byte_serialize(topic.as_bytes()).collect();
    let mut request = app
        .http
        .get(app.url(&format!("/v1/topics/{topic}/presence{query}")));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The entries of a topic, as any admin reads them.
async fn entries(app: &TestApp, topic: &str) -> Vec<Value> {
    let (status, body) = presence(app, topic, "", Some(&admin(&["*"]))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["topic"], topic);
    body["connections"].as_array().expect("a list").clone()
}

fn subs(entries: &[Value]) -> Vec<String> {
    let mut subs: Vec<String> = entries
        .iter()
        .map(|e| e["sub"].as_str().unwrap_or("").to_owned())
        .collect();
    subs.sort();
    subs
}

/// Waits until the topic's entries, read on `app`, are those of `expected` subs.
async fn until_subs(app: &TestApp, topic: &str, expected: &[&str]) -> Vec<Value> {
    let mut last = Vec::new();
    app.eventually(&format!("{topic} has {expected:?}"), async || {
        last = entries(app, topic).await;
        subs(&last) == expected
    })
    .await;
    last
}

/// Reads until a join or leave of `sub` (events of other subs' presence are skipped; any other
/// event is a failure).
async fn presence_event(stream: &mut Sse, kind: &str, sub: &str) -> Value {
    loop {
        let e = stream.expect().await;
        assert!(
            e.event == "ssegate.join" || e.event == "ssegate.leave",
            "only presence events expected, got {e:?}"
        );
        let data: Value = serde_json::from_str(&e.data).expect("JSON data");
        if e.event == kind && data["sub"] == sub {
            return data;
        }
    }
}

on_both! {
    presence_lists_every_nodes_subscribers(|_| {});
    join_and_leave_reach_subscribers_on_both_nodes(|s| s.presence.events = vec!["room.*".into()]);
}

/// Subscribers on both nodes are listed from either, with their `sub`, info, node and
/// connection time; counts; a closed stream leaves the list.
async fn presence_lists_every_nodes_subscribers(nodes: Nodes) {
    let Nodes { a, b, _backend, .. } = nodes;
    let _ada = subscribe(&a, "?topic=doc.1", &member("ada")).await;
    let bob = subscribe(&b, "?topic=doc.1", &member("bob")).await;
    let _ada_again = subscribe(&b, "?topic=doc.1&topic=doc.2", &member("ada")).await;
    let listed = until_subs(&a, "doc.1", &["ada", "ada", "bob"]).await;
    let nodes: std::collections::HashSet<&str> =
        listed.iter().map(|e| e["node"].as_str().unwrap()).collect();
    assert_eq!(nodes.len(), 2, "entries of both nodes: {listed:?}");
    let ids: std::collections::HashSet<&str> =
        listed.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 3, "one entry per connection");
    for entry in &listed {
        let sub = entry["sub"].as_str().unwrap();
        assert_eq!(entry["info"], json!({"name": sub.to_uppercase()}));
        let at = entry["connected_at"].as_str().unwrap();
        let at = humantime::parse_rfc3339(at).expect("RFC 3339");
        let age = std::time::SystemTime::now()
            .duration_since(at)
            .unwrap_or_default();
        assert!(age < PATIENCE, "connected moments ago");
    }
    assert_eq!(until_subs(&b, "doc.2", &["ada"]).await.len(), 1);
    for (app, open) in [(&a, 1.0), (&b, 2.0)] {
        let text = app.http.get(app.url("/metrics")).send().await.unwrap();
        let text = text.text().await.unwrap();
        assert_eq!(sample(&text, "ssegate_presence_entries"), open, "{text}");
    }
    for app in [&a, &b] {
        let (status, count) = presence(app, "doc.1", "?count=1", Some(&admin(&["doc.*"]))).await;
        assert_eq!(status, 200);
        assert_eq!(
            count,
            json!({"topic": "doc.1", "connections": 3, "subs": 2})
        );
    }
    drop(bob);
    until_subs(&a, "doc.1", &["ada", "ada"]).await;
    until_subs(&b, "doc.1", &["ada", "ada"]).await;
    assert!(entries(&a, "doc.3").await.is_empty(), "nobody there");
}

/// Joins and leaves reach the topic's subscribers on both nodes, without ids: the topic's own
/// events keep their ids and a resume replays no presence event. Topics outside
/// `presence.events` get none.
async fn join_and_leave_reach_subscribers_on_both_nodes(nodes: Nodes) {
    let Nodes { a, b, _backend, .. } = nodes;
    let mut on_a = subscribe(&a, "?topic=room.1", &member("wa")).await;
    presence_event(&mut on_a, "ssegate.join", "wa").await;
    let mut on_b = subscribe(&b, "?topic=room.1", &member("wb")).await;
    presence_event(&mut on_a, "ssegate.join", "wb").await;
    presence_event(&mut on_b, "ssegate.join", "wb").await;
    let mut quiet = subscribe(&a, "?topic=quiet.1", &member("wq")).await;

    let before = publish(&a, "room.1", "before").await;
    for stream in [&mut on_a, &mut on_b] {
        let e = stream.expect().await;
        assert_eq!(
            (e.id.as_str(), e.data.as_str()),
            (before.as_str(), "before")
        );
    }
    // One connection in a topic with events and one without.
    let carol = subscribe(&b, "?topic=room.1&topic=quiet.1", &member("carol")).await;
    for stream in [&mut on_a, &mut on_b] {
        let join = presence_event(stream, "ssegate.join", "carol").await;
        assert_eq!(join["info"], json!({"name": "CAROL"}));
        assert!(join["node"].is_string() && join["id"].is_string());
    }
    drop(carol);
    for stream in [&mut on_a, &mut on_b] {
        presence_event(stream, "ssegate.leave", "carol").await;
    }
    let after = publish(&a, "room.1", "after").await;
    for stream in [&mut on_a, &mut on_b] {
        let e = stream.expect().await;
        assert_eq!((e.id.as_str(), e.data.as_str()), (after.as_str(), "after"));
    }
    // Presence events are not history: resuming after `before` gives `after` alone.
    let mut resumed = subscribe_after(&b, "room.1", &before).await;
    let e = resumed.expect().await;
    assert_eq!((e.id.as_str(), e.data.as_str()), (after.as_str(), "after"));
    // quiet.1 is outside presence.events: its subscriber got carol's join and leave, if any,
    // before this event; it must get this event first.
    let marker = publish(&a, "quiet.1", "marker").await;
    let e = quiet.expect().await;
    assert_eq!(
        (e.event.as_str(), e.id.as_str()),
        ("message", marker.as_str())
    );
}

/// Publishes with a member's token; the id.
async fn publish(app: &TestApp, topic: &str, data: &str) -> String {
    let response = app
        .http
        .post(app.url(&format!("/v1/events?topic={topic}")))
        .bearer_auth(member("publisher"))
        .body(data.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().to_owned()
}

async fn subscribe_after(app: &TestApp, topic: &str, after: &str) -> Sse {
    let response = app
        .http
        .get(app.url(&format!("/v1/events?topic={topic}")))
        .bearer_auth(member("resumer"))
        .header("last-event-id", after)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    Sse::from_response(response)
}

/// The presence API needs a token whose `ssegate.admin` patterns cover the topic: none is
/// `401`, another `403`; a bad topic is `400`; without a key configured it is open.
#[tokio::test]
async fn presence_needs_an_admin_token() {
    let redis = RedisServer::start().await;
    let mut s = settings(Some(&redis));
    s.auth.jwt_key = Some(SECRET.into());
    let app = spawn_app(s).await;
    let (status, body) = presence(&app, "doc.1", "", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    let response = app
        .http
        .get(app.url("/v1/topics/doc.1/presence"))
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("www-authenticate"));
    let (status, body) = presence(&app, "doc.1", "", Some(&member("ada"))).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    let (status, _) = presence(&app, "doc.1", "", Some(&admin(&["other.*"]))).await;
    assert_eq!(status, 403);
    let (status, _) = presence(&app, "doc.1", "", Some("not-a-token")).await;
    assert_eq!(status, 401);
    let (status, body) = presence(&app, "doc.1", "", Some(&admin(&["doc.*"]))).await;
    assert_eq!(
        (status, &body),
        (200, &json!({"topic": "doc.1", "connections": []}))
    );
    let (status, body) = presence(&app, "bad{topic}", "", Some(&admin(&["*"]))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_topic"))
    );

    let open = spawn_app(settings(Some(&redis))).await;
    let _anonymous = open.subscribe("doc.1", None).await;
    let listed = until_subs(&open, "doc.1", &[""]).await;
    assert_eq!(listed[0]["sub"], Value::Null, "no token, no sub");

    let mut off = settings(Some(&redis));
    off.presence.enabled = false;
    let off = spawn_app(off).await;
    let (status, _) = presence(&off, "doc.1", "", None).await;
    assert_eq!(status, 404, "presence off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_or_killed_nodes_entries_go_with_leave_events() {
    let redis = RedisServer::start().await;
    stopped_or_killed(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_or_killed_nodes_entries_go_with_leave_events_on_a_cluster() {
    let cluster = RedisCluster::start(3, 0).await;
    stopped_or_killed(&cluster.url()).await;
}

/// A node that stops cleanly takes its entries with it at once (with leave events); one that is
/// SIGKILLed has them removed by another node within `node_ttl` plus a heartbeat interval.
async fn stopped_or_killed(url: &str) {
    let ttl = Duration::from_secs(1);
    let mut s = settings(None);
    s.redis_url = Some(url.to_owned());
    s.auth.jwt_key = Some(SECRET.into());
    s.presence.events = vec!["room.*".into()];
    s.presence.node_ttl = ttl;
    s.mercure.subscriptions = true;
    let watcher_node = spawn_app(s.clone()).await;
    let mut watcher = subscribe(&watcher_node, "?topic=room.k", &member("w")).await;
    presence_event(&mut watcher, "ssegate.join", "w").await;

    // A clean stop (node_ttl is long here, so only the node's goodbye can be this quick).
    let mut polite = s.clone();
    polite.presence.node_ttl = Duration::from_secs(120);
    let polite = spawn_app(polite).await;
    let _dana = subscribe(&polite, "?topic=room.k", &member("dana")).await;
    presence_event(&mut watcher, "ssegate.join", "dana").await;
    polite.shutdown.trigger();
    presence_event(&mut watcher, "ssegate.leave", "dana").await;

    let mut crashing = Binary::start_on(
        url,
        &[
            ("SSEGATE_AUTH__JWT_KEY", SECRET),
            ("SSEGATE_PRESENCE__EVENTS", "room.*"),
            ("SSEGATE_PRESENCE__NODE_TTL", "1s"),
            ("SSEGATE_MERCURE__SUBSCRIPTIONS", "true"),
        ],
    );
    // A Mercure subscription on it too, watched from the other node.
    let mut mercure_events = stream(
        &watcher_node,
        &query(&[SUBSCRIPTIONS], &[]),
        Some(&observer()),
        None,
    )
    .await;
    let response = watcher_node
        .http
        .get(format!(
            "{}{}",
            crashing.base,
            query(&["https://example.com/k"], &[])
        ))
        .bearer_auth(mercure::subscriber(&[]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let _mercure_reader = Sse::from_response(response);
    let opened = subscription_events(&mut mercure_events, None, true, 1).await;
    let who = opened[0]["subscriber"].as_str().unwrap().to_owned();
    let response = watcher_node
        .http
        .get(format!("{}/v1/events?topic=room.k", crashing.base))
        .bearer_auth(member("carol"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let _carol = Sse::from_response(response);
    presence_event(&mut watcher, "ssegate.join", "carol").await;
    until_subs(&watcher_node, "room.k", &["carol", "w"]).await;
    let killed = Instant::now();
    crashing.kill();
    let leave = presence_event(&mut watcher, "ssegate.leave", "carol").await;
    let took = killed.elapsed();
    println!("a killed node's entries went after {took:?} (node_ttl {ttl:?})");
    assert_eq!(leave["info"], json!({"name": "CAROL"}));
    // The stated bound: node_ttl + node_ttl/3, plus the time to notice and remove (generous:
    // the machine may be busy).
    assert!(
        took < ttl + ttl / 3 + Duration::from_secs(2),
        "reaped within the bound, took {took:?}"
    );
    assert_eq!(subs(&entries(&watcher_node, "room.k").await), ["w"]);
    // Its Mercure subscription went inactive, announced by the node that reaped it.
    let closed = subscription_events(&mut mercure_events, Some(&who), false, 1).await;
    assert_eq!(closed[0]["topic"], "https://example.com/k");
    let path = "/.well-known/mercure/subscriptions";
    let (status, _, all) = subscriptions_api(&watcher_node, path, Some(&observer()), None).await;
    assert_eq!(status, 200);
    assert!(
        !all["subscriptions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["subscriber"] == who.as_str()),
        "{all}"
    );
}

/// In Chromium: an `EventSource` receives joins and leaves with `addEventListener`, and they
/// leave its `lastEventId` as the topic's events set it (a reconnect resumes from a real id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_gets_joins_and_leaves_and_keeps_its_last_event_id() {
    let redis = RedisServer::start().await;
    let mut s = settings(Some(&redis));
    s.presence.events = vec!["room.*".into()];
    s.cors.allowed_origins = vec!["*".into()];
    let app = spawn_app(s).await;
    let html = format!(
        r#"<!doctype html><html><body><script>
let reports = Promise.resolve();
const report = (what) => {{
  reports = reports.then(() => fetch('/report', {{method: 'POST', body: JSON.stringify(what)}}));
}};
const source = new EventSource('http://{}/v1/events?topic=room.b');
source.onmessage = (e) => report({{kind: 'message', id: e.lastEventId, data: e.data}});
for (const kind of ['ssegate.join', 'ssegate.leave']) {{
  source.addEventListener(kind, (e) => report({{kind, id: e.lastEventId, data: JSON.parse(e.data)}}));
}}
</script></body></html>"#,
        app.addr
    );
    let mut page = Page::serve_html(html).await;
    let _browser = Chromium::open(&format!("{}/page.html", page.origin()));
    let own = page.next_report().await;
    assert_eq!(
        (own["kind"].as_str(), own["id"].as_str()),
        (Some("ssegate.join"), Some(""))
    );
    let first = app.publish("room.b", "first").await;
    let message = page.next_report().await;
    assert_eq!(message["id"], first.as_str());
    let other = app.subscribe("room.b", None).await;
    let join = page.next_report().await;
    assert_eq!(join["kind"], "ssegate.join");
    assert_ne!(join["data"]["id"], own["data"]["id"], "another connection");
    assert_eq!(
        join["id"],
        first.as_str(),
        "lastEventId stays the last event's"
    );
    drop(other);
    let leave = page.next_report().await;
    assert_eq!(leave["kind"], "ssegate.leave");
    assert_eq!(leave["data"]["id"], join["data"]["id"]);
    assert_eq!(leave["id"], first.as_str());
    let second = app.publish("room.b", "second").await;
    let message = page.next_report().await;
    assert_eq!(
        (message["id"].as_str(), message["data"].as_str()),
        (Some(second.as_str()), Some("second"))
    );
}
