//! The server API across two nodes, on one Redis and on a cluster: history pages equal to what a
//! stream replays, a topic's state counting subscribers on both nodes, the topic list, a
//! delete reaching every node's subscribers, disconnects and revocations ending streams on both
//! nodes and refusing revoked tokens everywhere; admin tokens required where they must be.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{on_both, spawn_app, Nodes, Sse, TestApp};
use crate::mercure::{self, HUB};
use crate::ops::{sample, scrape};
use crate::security::hs;

/// Unix seconds now.
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn exp() -> u64 {
    now() + 300
}

fn token(claims: Value) -> String {
    let mut claims = claims;
    claims["exp"] = json!(exp());
    hs(&claims)
}

/// Everything: publish, subscribe and administer every topic.
fn root() -> String {
    token(json!({"sub": "root", "ssegate": {"publish": ["*"], "subscribe": ["*"], "admin": ["*"]}}))
}

fn reader(sub: &str, patterns: &[&str]) -> String {
    token(json!({"sub": sub, "ssegate": {"subscribe": patterns}}))
}

fn admin(patterns: &[&str]) -> String {
    token(json!({"ssegate": {"admin": patterns}}))
}

/// A request to the API: its status and JSON body (`null` if none).
async fn call(app: &TestApp, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = app.http.request(method, app.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn publish(app: &TestApp, topic: &str, data: &str) -> String {
    let response = app
        .http
        .post(app.url("/v1/events"))
        .bearer_auth(root())
        .json(&json!({"topic": topic, "data": data, "event": "note"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().to_owned()
}

async fn subscribe(app: &TestApp, topic: &str, last_event_id: Option<&str>, token: &str) -> Sse {
    let mut request = app
        .http
        .get(app.url(&format!("/v1/events?topic={topic}")))
        .bearer_auth(token);
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    Sse::from_response(response)
}

/// What a stream or a history page says, alike: `gap:<reason>` for a gap notice, else
/// `<id> <data>`.
fn seen_in_stream(e: &eventsource_stream::Event) -> String {
    if e.event == "ssegate.gap" {
        let data: Value = serde_json::from_str(&e.data).unwrap();
        return format!("gap:{}", data["reason"].as_str().unwrap());
    }
    format!("{} {}", e.id, e.data)
}

/// A page forwards: its gap notice, then its events.
fn seen_in_page(page: &Value) -> Vec<String> {
    let mut seen: Vec<String> = page["gap"]["reason"]
        .as_str()
        .map(|reason| format!("gap:{reason}"))
        .into_iter()
        .collect();
    seen.extend(events_of(page));
    seen
}

fn events_of(page: &Value) -> Vec<String> {
    let events = page["events"].as_array().unwrap().iter().map(|e| {
        assert_eq!(e["event"], "note");
        format!(
            "{} {}",
            e["id"].as_str().unwrap(),
            e["data"].as_str().unwrap()
        )
    });
    events.collect()
}

on_both! {
    history_pages_equal_the_stream(|s| {
        s.retention.max_events = 5;
        s.retention.approximate = false;
    });
    topic_state_and_list_count_subscribers_on_both_nodes(|_| {});
    delete_reaches_every_nodes_subscribers(|_| {});
    disconnect_ends_streams_on_both_nodes(|_| {});
    revoke_refuses_the_token_on_every_node_and_path(|_| {});
}

/// Pages of 2 through node B, after `0` and after an id, equal what a stream resuming from the
/// same cursor on node A sends, the gap notice of trimmed history included; pages newest first
/// are the same events reversed and end with the trimmed notice. A subscriber's token reads
/// history; a token for other topics is refused.
async fn history_pages_equal_the_stream(nodes: Nodes) {
    let (a, b) = (&nodes.a, &nodes.b);
    let topic = "history.log";
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(publish(if i % 2 == 0 { a } else { b }, topic, &format!("e{i}")).await);
    }
    let read = reader("ada", &["history.*"]);
    for cursor in ["0", ids[1].as_str(), ids[4].as_str()] {
        let mut pages = Vec::new();
        let mut after = cursor.to_owned();
        loop {
            let path = format!("/v1/topics/{topic}/events?after={after}&limit=2");
            let (status, page) = call(b, "GET", &path, Some(&read)).await;
            assert_eq!(status, 200, "{page}");
            assert_eq!(page["topic"], topic);
            pages.extend(seen_in_page(&page));
            after = page["next"].as_str().unwrap().to_owned();
            if !page["more"].as_bool().unwrap() {
                break;
            }
        }
        assert_eq!(after, ids[7], "the last page ends at the newest");
        let mut stream = subscribe(a, topic, Some(cursor), &read).await;
        let mut streamed = Vec::new();
        while streamed
            .last()
            .is_none_or(|s: &String| !s.starts_with(&ids[7]))
        {
            streamed.push(seen_in_stream(&stream.expect().await));
        }
        assert_eq!(pages, streamed, "after {cursor}");
        if cursor != ids[4] {
            assert_eq!(pages[0], "gap:trimmed");
        }
    }
    // Newest first: the retained five, reversed, then the notice that older ones are gone.
    let mut back = Vec::new();
    let mut before = String::new();
    loop {
        let path = format!("/v1/topics/{topic}/events?before={before}&limit=2");
        let (status, page) = call(a, "GET", &path, Some(&read)).await;
        assert_eq!(status, 200, "{page}");
        // Newest first: the events, then whether older ones are gone.
        back.extend(events_of(&page));
        if let Some(reason) = page["gap"]["reason"].as_str() {
            back.push(format!("gap:{reason}"));
        }
        match page["next"].as_str() {
            Some(next) => before = next.to_owned(),
            None => break,
        }
    }
    let mut expected: Vec<String> = (3..8).rev().map(|i| format!("{} e{i}", ids[i])).collect();
    expected.push("gap:trimmed".into());
    assert_eq!(back, expected);

    let path = format!("/v1/topics/{topic}/events");
    assert_eq!(call(a, "GET", &path, None).await.0, 401);
    let other = reader("bob", &["other.*"]);
    let (status, body) = call(a, "GET", &path, Some(&other)).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    assert_eq!(
        call(a, "GET", &path, Some(&admin(&["history.*"]))).await.0,
        200
    );
    for bad in ["?after=nope", "?limit=0", "?limit=1001", "?after=0&before="] {
        let (status, body) = call(a, "GET", &format!("{path}{bad}"), Some(&read)).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].is_string());
    }
    // An unknown cursor is said, as a stream says it.
    let (_, page) = call(a, "GET", &format!("{path}?after=1-1"), Some(&read)).await;
    assert_eq!(page["gap"]["reason"], "trimmed");
    let (_, page) = call(
        a,
        "GET",
        &format!("{path}?after=99999999999999-0"),
        Some(&read),
    )
    .await;
    assert_eq!(page["gap"]["reason"], "unknown_cursor");
    assert_eq!(page["next"], ids[7].as_str());
}

/// Subscribers on both nodes are counted by the topic's state from either node, with the
/// retention in force; the list names the topics with subscribers that the admin token covers.
async fn topic_state_and_list_count_subscribers_on_both_nodes(nodes: Nodes) {
    let (a, b) = (&nodes.a, &nodes.b);
    let topic = "room.1";
    let first = publish(a, topic, "hello").await;
    let last = publish(b, topic, "again").await;
    let read = reader("ada", &["room.*", "lobby"]);
    let _s1 = subscribe(a, topic, None, &read).await;
    let _s2 = subscribe(a, topic, None, &read).await;
    let _s3 = subscribe(b, topic, None, &read).await;
    let _s4 = subscribe(b, "lobby", None, &read).await;
    let all = admin(&["*"]);
    let path = format!("/v1/topics/{topic}");
    let mut state = Value::Null;
    for app in [a, b] {
        app.eventually("three subscribers counted", async || {
            let (status, body) = call(app, "GET", &path, Some(&all)).await;
            assert_eq!(status, 200, "{body}");
            state = body;
            state["subscribers"] == 3
        })
        .await;
    }
    assert_eq!(state["topic"], topic);
    assert_eq!(state["exists"], true);
    assert_eq!(state["length"], 2);
    assert_eq!(state["first_id"], first.as_str());
    assert_eq!(state["last_id"], last.as_str());
    assert_eq!(state["last_generated_id"], last.as_str());
    assert!(state["last_publish"].as_str().unwrap().ends_with('Z'));
    let mut per_node: Vec<u64> = state["nodes"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .collect();
    per_node.sort();
    assert_eq!(per_node, [1, 2], "two on one node, one on the other");
    assert_eq!(state["retention"]["max_events"], 10000);

    let (status, unknown) = call(a, "GET", "/v1/topics/never.written", Some(&all)).await;
    assert_eq!(status, 200);
    assert_eq!(
        (unknown["exists"].clone(), unknown["length"].clone()),
        (json!(false), json!(0))
    );
    assert_eq!(unknown["subscribers"], 0);

    let (status, list) = call(b, "GET", "/v1/topics?prefix=", Some(&all)).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["topics"], json!(["lobby", "room.1"]));
    let (_, list) = call(b, "GET", "/v1/topics?prefix=room.", Some(&all)).await;
    assert_eq!(list["topics"], json!(["room.1"]));
    let (_, list) = call(b, "GET", "/v1/topics?limit=1", Some(&all)).await;
    assert_eq!(
        (list["topics"].clone(), list["next"].clone()),
        (json!(["lobby"]), json!("lobby"))
    );
    let (_, list) = call(b, "GET", "/v1/topics?limit=1&after=lobby", Some(&all)).await;
    assert_eq!(
        (list["topics"].clone(), list["next"].clone()),
        (json!(["room.1"]), Value::Null)
    );
    let (_, list) = call(a, "GET", "/v1/topics", Some(&admin(&["lobby"]))).await;
    assert_eq!(
        list["topics"],
        json!(["lobby"]),
        "only what the token covers"
    );

    for path in ["/v1/topics", "/v1/topics/room.1"] {
        assert_eq!(call(a, "GET", path, None).await.0, 401, "{path}");
        let (status, body) = call(a, "GET", path, Some(&read)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (403, Some("forbidden")),
            "{path}"
        );
    }
    let (status, _) = call(a, "GET", "/v1/topics/room.1", Some(&admin(&["lobby"]))).await;
    assert_eq!(status, 403);
}

/// A delete through node A reaches the subscribers on both nodes: an `ssegate.gap` (reason
/// `deleted`, their cursor), then the new stream's events from nothing. A resume with an old id
/// afterwards gets a gap notice and never an old event; history says the same. Only an admin
/// covering the topic may delete.
async fn delete_reaches_every_nodes_subscribers(nodes: Nodes) {
    let (a, b) = (&nodes.a, &nodes.b);
    let topic = "account.42";
    let read = reader("ada", &["account.*"]);
    let mut on_a = subscribe(a, topic, None, &read).await;
    let mut on_b = subscribe(b, topic, None, &read).await;
    // Both streams follow the topic before anything is published or deleted.
    let warm = publish(a, topic, "warm-up").await;
    for s in [&mut on_a, &mut on_b] {
        assert_eq!(s.expect().await.id, warm);
    }
    let old = publish(b, topic, "secret").await;
    for s in [&mut on_a, &mut on_b] {
        assert_eq!(s.expect().await.id, old);
    }
    let path = format!("/v1/topics/{topic}");
    assert_eq!(call(a, "DELETE", &path, None).await.0, 401);
    assert_eq!(call(a, "DELETE", &path, Some(&read)).await.0, 403);
    assert_eq!(
        call(a, "DELETE", &path, Some(&admin(&["other.*"]))).await.0,
        403
    );
    let (status, body) = call(a, "DELETE", &path, Some(&admin(&["account.*"]))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"topic": topic, "deleted": true, "last_id": old})
    );
    for s in [&mut on_a, &mut on_b] {
        let gap = s.expect().await;
        assert_eq!(gap.event, "ssegate.gap");
        let data: Value = serde_json::from_str(&gap.data).unwrap();
        assert_eq!(
            data,
            json!({"cursor": old, "reason": "deleted", "resume_from": null})
        );
    }
    let fresh = publish(b, topic, "after").await;
    for s in [&mut on_a, &mut on_b] {
        let e = s.expect().await;
        assert_eq!((e.id.as_str(), e.data.as_str()), (fresh.as_str(), "after"));
    }
    let mut resumed = subscribe(a, topic, Some(&old), &read).await;
    let gap = resumed.expect().await;
    assert_eq!(gap.event, "ssegate.gap");
    let e = resumed.expect().await;
    assert_eq!(
        (e.id.as_str(), e.data.as_str()),
        (fresh.as_str(), "after"),
        "no old event"
    );
    let history = format!("/v1/topics/{topic}/events?after={old}");
    let (_, page) = call(b, "GET", &history, Some(&read)).await;
    assert!(page["gap"]["reason"].is_string(), "{page}");
    assert_eq!(seen_in_page(&page)[1..], [format!("{fresh} after")]);
    let (_, state) = call(b, "GET", &path, Some(&root())).await;
    assert_eq!(
        (state["length"].clone(), state["first_id"].clone()),
        (json!(1), json!(fresh))
    );
    // Deleting again removes the new stream; deleting nothing says so.
    let (_, body) = call(b, "DELETE", &path, Some(&root())).await;
    assert_eq!(body["last_id"], fresh.as_str());
    let (status, body) = call(b, "DELETE", &path, Some(&root())).await;
    assert_eq!((status, body["deleted"].clone()), (200, json!(false)));
    tokio::time::timeout(Duration::from_secs(1), async {
        // The second delete reached the live streams too.
        for s in [&mut on_a, &mut on_b] {
            assert_eq!(s.expect().await.event, "ssegate.gap");
        }
    })
    .await
    .expect("told within a second");
}

/// A user's token for their own topic, with its `jti` and `iat`.
fn user(sub: &str, jti: &str, iat: u64) -> String {
    let topic = format!("user.{sub}");
    token(json!({
        "sub": sub, "jti": jti, "iat": iat,
        "ssegate": {"subscribe": [topic, "room.*"], "publish": [topic]}
    }))
}

async fn disconnect(app: &TestApp, token: Option<&str>, body: Value) -> (u16, Value) {
    let mut request = app.http.post(app.url("/v1/disconnect")).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Waits for the stream to end (it may still deliver events before it does).
async fn ends_within_a_second(stream: &mut Sse, what: &str) {
    tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(e) = stream.next().await {
            assert_ne!(e.event, "ssegate.gap", "{what}: ended, not told of a gap");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: not ended within a second"));
}

/// A published event reaches each of `streams`: they are still open.
async fn still_open(app: &TestApp, topic: &str, streams: &mut [&mut Sse]) {
    let id = publish(app, topic, "still here").await;
    for s in streams.iter_mut() {
        assert_eq!(s.expect().await.id, id);
    }
}

/// Disconnects by `jti`, by `sub` and by topic, taken by one node, end the matching streams on
/// both within a second and no other; without `revoke`, the same token connects again. Only
/// an admin token covering what is named may disconnect; a body naming nothing, or two
/// things, is refused with a 400.
async fn disconnect_ends_streams_on_both_nodes(nodes: Nodes) {
    let (a, b) = (&nodes.a, &nodes.b);
    let iat = now() - 10;
    let (ada1, ada2, bob) = (
        user("ada", "ada-1", iat),
        user("ada", "ada-2", iat),
        user("bob", "bob-1", iat),
    );
    let mut ada1_a = subscribe(a, "user.ada", None, &ada1).await;
    let mut ada1_b = subscribe(b, "user.ada", None, &ada1).await;
    let mut ada2_b = subscribe(b, "user.ada", None, &ada2).await;
    let mut bob_a = subscribe(a, "user.bob", None, &bob).await;
    let mut room_a = subscribe(a, "room.1", None, &bob).await;
    let mut room_b = subscribe(b, "room.1", None, &ada2).await;
    // Tokens with neither `sub` nor `jti`: a topic's disconnect still ends their streams, a
    // multi-topic one reading it included, and Mercure streams with that selector.
    let rooms = token(json!({
        "ssegate": {"subscribe": ["room.*"]},
        "mercure": {"subscribe": ["*"]}
    }));
    let mut rooms_b = subscribe(b, "room.1&topic=room.2", None, &rooms).await;
    let mut room2_a = subscribe(a, "room.2", None, &rooms).await;
    let response = a
        .http
        .get(a.url(&format!("{HUB}?topic=room.1")))
        .bearer_auth(&rooms)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut mercure_a = Sse::from_response(response);
    still_open(a, "user.ada", &mut [&mut ada1_a, &mut ada1_b, &mut ada2_b]).await;
    still_open(b, "room.1", &mut [&mut room_a, &mut room_b]).await;
    still_open(b, "room.2", &mut [&mut room2_a]).await;
    // A multi-topic stream's events say their topic.
    for topic in ["room.1", "room.2"] {
        let data: Value = serde_json::from_str(&rooms_b.expect().await.data).unwrap();
        assert_eq!(
            (data["topic"].as_str(), data["data"].as_str()),
            (Some(topic), Some("still here"))
        );
    }

    // Refused: no token, a reader's, an admin of some topics naming a user, bad bodies.
    let by_jti = json!({"jti": "ada-1"});
    assert_eq!(disconnect(a, None, by_jti.clone()).await.0, 401);
    assert_eq!(disconnect(a, Some(&ada1), by_jti.clone()).await.0, 403);
    let (status, body) = disconnect(a, Some(&admin(&["user.*"])), by_jti.clone()).await;
    assert_eq!((status, body["error"].clone()), (403, json!("forbidden")));
    for bad in [
        json!({}),
        json!({"sub": "ada", "jti": "ada-1"}),
        json!({"sub": ""}),
        json!({"topic": "room.1", "revoke": true}),
    ] {
        let (status, body) = disconnect(a, Some(&root()), bad.clone()).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(body["error"], "invalid_disconnect", "{bad}");
    }
    let (status, body) = disconnect(a, Some(&root()), json!({"jti": "x", "what": 1})).await;
    assert_eq!(
        (status, body["error"].clone()),
        (400, json!("invalid_json"))
    );
    let (status, body) = disconnect(a, Some(&root()), json!({"topic": "no spaces"})).await;
    assert_eq!(
        (status, body["error"].clone()),
        (400, json!("invalid_topic"))
    );

    // By jti, through node B: that token's streams on both nodes, not the same user's other.
    let (status, body) = disconnect(b, Some(&admin(&["*"])), by_jti).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"revoked": false, "revoked_until": null, "ended_here": 1})
    );
    ends_within_a_second(&mut ada1_a, "ada-1 on A").await;
    ends_within_a_second(&mut ada1_b, "ada-1 on B").await;
    still_open(b, "user.ada", &mut [&mut ada2_b]).await;
    // Not revoked: the same token connects again.
    let mut ada1_again = subscribe(a, "user.ada", None, &ada1).await;
    still_open(a, "user.ada", &mut [&mut ada1_again, &mut ada2_b]).await;

    // By topic, through node A, by an admin of the topic: its streams on both nodes.
    let by_topic = json!({"topic": "room.1"});
    assert_eq!(
        disconnect(a, Some(&admin(&["user.*"])), by_topic.clone())
            .await
            .0,
        403
    );
    let (status, body) = disconnect(a, Some(&admin(&["room.*"])), by_topic).await;
    assert_eq!((status, body["ended_here"].clone()), (200, json!(2)));
    ends_within_a_second(&mut room_a, "room.1 on A").await;
    ends_within_a_second(&mut room_b, "room.1 on B").await;
    ends_within_a_second(&mut rooms_b, "room.1 and room.2 on B").await;
    ends_within_a_second(&mut mercure_a, "Mercure's room.1 on A").await;
    // Only the streams open then: a new one on the topic goes on, and so does the other topic's.
    let mut room_again_b = subscribe(b, "room.1", None, &rooms).await;
    still_open(a, "room.1", &mut [&mut room_again_b]).await;
    still_open(a, "room.2", &mut [&mut room2_a]).await;

    // By sub: every stream of that user, on both nodes; the others go on.
    let (status, _) = disconnect(a, Some(&root()), json!({"sub": "ada"})).await;
    assert_eq!(status, 200);
    ends_within_a_second(&mut ada1_again, "ada again on A").await;
    ends_within_a_second(&mut ada2_b, "ada-2 on B").await;
    still_open(b, "user.bob", &mut [&mut bob_a]).await;

    let text = scrape(&a.url("/metrics")).await;
    assert_eq!(sample(&text, "ssegate_streams_ended_total"), 4.0, "{text}");
    assert_eq!(
        sample(&text, "ssegate_api_calls_total{call=\"disconnect\"}"),
        2.0
    );
}

/// A revoking disconnect by `sub` through node A ends that user's streams on both nodes
/// within a second; from then on their tokens issued until then are refused on both nodes
/// with `401 token_revoked`, by header, cookie and query, for subscribing and publishing, on
/// `/v1` and on the Mercure face (whose stream of that user ends too), while a token issued
/// later is accepted. A `jti` revoked through node B is refused on both,
/// and on a node started afterwards.
async fn revoke_refuses_the_token_on_every_node_and_path(nodes: Nodes) {
    let (a, b) = (&nodes.a, &nodes.b);
    let iat = now() - 10;
    let (ada1, ada2, bob1, bob2) = (
        user("ada", "ada-1", iat),
        user("ada", "ada-2", iat),
        user("bob", "bob-1", iat),
        user("bob", "bob-2", iat),
    );
    let mut ada_a = subscribe(a, "user.ada", None, &ada1).await;
    let mut ada_b = subscribe(b, "user.ada", None, &ada2).await;
    let mut bob_b = subscribe(b, "user.bob", None, &bob1).await;
    still_open(a, "user.ada", &mut [&mut ada_a, &mut ada_b]).await;
    still_open(a, "user.bob", &mut [&mut bob_b]).await;
    // The same user on the Mercure face: the same revocation covers it.
    let ada_mercure = token(json!({
        "sub": "ada", "jti": "ada-m", "iat": iat,
        "mercure": {"subscribe": ["*"], "publish": ["*"]}
    }));
    let mercure_path = format!("{HUB}?topic=https://example.com/ada");
    let response = b
        .http
        .get(b.url(&mercure_path))
        .bearer_auth(&ada_mercure)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut ada_mercure_b = Sse::from_response(response);
    let (status, _) = mercure::publish(
        a,
        Some(&ada_mercure),
        &[
            ("topic", "https://example.com/ada"),
            ("data", "hi"),
            ("id", "m1"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(ada_mercure_b.expect().await.id, "m1");

    let (status, body) = disconnect(a, Some(&root()), json!({"sub": "ada", "revoke": true})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["revoked"], true);
    assert!(body["revoked_until"].is_string(), "{body}");
    ends_within_a_second(&mut ada_a, "ada on A").await;
    ends_within_a_second(&mut ada_b, "ada on B").await;
    ends_within_a_second(&mut ada_mercure_b, "ada's Mercure stream on B").await;
    for node in [a, b] {
        let response = node
            .http
            .get(node.url(&mercure_path))
            .bearer_auth(&ada_mercure)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "Mercure subscribe");
        let (status, _) = mercure::publish(
            node,
            Some(&ada_mercure),
            &[("topic", "https://example.com/ada"), ("data", "x")],
        )
        .await;
        assert_eq!(status, 401, "Mercure publish");
    }

    // Refused on both nodes, by every path, within a second of the answer.
    let later = user("ada", "ada-3", now() + 1);
    for node in [a, b] {
        assert_revoked(node, &ada1, "user.ada").await;
        assert_revoked(node, &ada2, "user.ada").await;
        // A token issued after the revocation is not covered by it.
        let mut fresh = subscribe(node, "user.ada", None, &later).await;
        still_open(node, "user.ada", &mut [&mut fresh]).await;
        // Nor are the other users' tokens.
        still_open(node, "user.bob", &mut [&mut bob_b]).await;
    }

    // One token by jti, through node B, kept until its exp: bob's other token goes on.
    let by_jti = json!({"jti": "bob-1", "revoke": true, "exp": exp()});
    let (status, body) = disconnect(b, Some(&root()), by_jti).await;
    assert_eq!((status, body["ended_here"].clone()), (200, json!(1)));
    ends_within_a_second(&mut bob_b, "bob-1 on B").await;
    for node in [a, b] {
        assert_revoked(node, &bob1, "user.bob").await;
        let mut other = subscribe(node, "user.bob", None, &bob2).await;
        still_open(node, "user.bob", &mut [&mut other]).await;
    }

    // A node started afterwards has the list from the start.
    let c = spawn_app(nodes.settings.clone()).await;
    assert_revoked(&c, &bob1, "user.bob").await;
    assert_revoked(&c, &ada1, "user.ada").await;
    subscribe(&c, "user.bob", None, &bob2).await;

    let text = scrape(&a.url("/metrics")).await;
    assert_eq!(sample(&text, "ssegate_revocations_total"), 1.0, "{text}");
    assert_eq!(
        sample(&text, "ssegate_auth_failures_total{reason=\"revoked\"}"),
        14.0,
        "{text}"
    );
}

/// `token` is refused with `401 token_revoked` on `node`: as a bearer token, a cookie and a
/// query parameter when subscribing, and when publishing.
async fn assert_revoked(node: &TestApp, token: &str, topic: &str) {
    let path = format!("/v1/events?topic={topic}");
    let requests = [
        ("header", node.http.get(node.url(&path)).bearer_auth(token)),
        (
            "cookie",
            node.http
                .get(node.url(&path))
                .header("cookie", format!("ssegate_token={token}")),
        ),
        (
            "query",
            node.http
                .get(node.url(&format!("{path}&access_token={token}"))),
        ),
        (
            "publish",
            node.http
                .post(node.url("/v1/events"))
                .bearer_auth(token)
                .json(&json!({"topic": topic, "data": "x"})),
        ),
    ];
    for (path, request) in requests {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "token_revoked", "{path}: {body}");
    }
}
