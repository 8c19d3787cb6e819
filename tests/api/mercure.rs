//! The Mercure hub at `/.well-known/mercure`, through the public API, across two nodes on one
//! Redis: the cases of Mercure's conformance suite, private updates, token sources, cookie
//! publishing, resuming from publishers' and generated ids, and bad input.

use std::time::Duration;

use serde_json::{json, Value};
use ssegate::config::Settings;

use crate::helpers::{on_both, settings, spawn_app, Nodes, RedisServer, Sse, TestApp};
use crate::security::{hs, SECRET};

pub const HUB: &str = "/.well-known/mercure";

/// Claims with a `mercure` claim of these selectors, valid for a minute.
pub fn mercure_claims(publish: &[&str], subscribe: &[&str]) -> Value {
    json!({
        "mercure": { "publish": publish, "subscribe": subscribe, "payload": {"user": 1} },
        "exp": exp_in(60),
    })
}

fn exp_in(secs: u64) -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + secs
}

/// A publisher's token for every topic.
pub fn publisher() -> String {
    hs(&mercure_claims(&["*"], &[]))
}

/// A subscriber's token for these private selectors.
pub fn subscriber(private: &[&str]) -> String {
    hs(&mercure_claims(&[], private))
}

pub fn keyed(redis: &RedisServer) -> Settings {
    let mut s = settings(Some(redis));
    s.auth.jwt_key = Some(SECRET.into());
    s
}

/// An `application/x-www-form-urlencoded` body.
pub fn form(fields: &[(&str, &str)]) -> String {
    let mut body = form_urlencoded::Serializer::new(String::new());
    for (name, value) in fields {
        body.append_pair(name, value);
    }
    body.finish()
}

/// Publishes a form with a bearer token; the status and the body as text.
pub async fn publish(app: &TestApp, token: Option<&str>, fields: &[(&str, &str)]) -> (u16, String) {
    let mut request = app
        .http
        .post(app.url(HUB))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(fields));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// Publishes and returns the id, which must be answered `200 text/plain`.
pub async fn published(app: &TestApp, fields: &[(&str, &str)]) -> String {
    let (status, id) = publish(app, Some(&publisher()), fields).await;
    assert_eq!(status, 200, "publish refused: {id}");
    id
}

/// The query of a subscription to these selectors, with more parameters.
pub fn query(selectors: &[&str], more: &[(&str, &str)]) -> String {
    let mut fields: Vec<(&str, &str)> = selectors.iter().map(|s| ("topic", *s)).collect();
    fields.extend_from_slice(more);
    format!("{HUB}?{}", form(&fields))
}

/// Opens a subscription; the response (headers read) for the caller to check and stream.
async fn open(
    app: &TestApp,
    path: &str,
    token: Option<&str>,
    last_event_id: Option<&str>,
) -> reqwest::Response {
    let mut request = app.http.get(app.url(path));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    if let Some(id) = last_event_id {
        // As a browser sends it: the id's UTF-8 bytes.
        let value = reqwest::header::HeaderValue::from_bytes(id.as_bytes()).unwrap();
        request = request.header("last-event-id", value);
    }
    request.send().await.unwrap()
}

/// A subscription that must be answered `200` with an event stream.
pub async fn stream(app: &TestApp, path: &str, token: Option<&str>, last: Option<&str>) -> Sse {
    let response = open(app, path, token, last).await;
    assert_eq!(response.status(), 200, "subscribe refused");
    assert_eq!(
        response.headers()["content-type"],
        "text/event-stream",
        "an event stream"
    );
    Sse::from_response(response)
}

on_both! {
    conformance_cases_across_nodes(|_| {});
    every_topic_with_the_star_in_one_order(|_| {});
    private_updates_live_and_in_replay(|s| s.mercure.anonymous = true);
    resuming_from_ids_on_the_other_node(|_| {});
    an_unknown_id_is_told(|_| {});
    trimmed_history_is_told(|s| {
        s.retention.max_events = 3;
        s.retention.approximate = false;
    });
    a_repeated_id_is_stored_once(|_| {});
    iris_of_every_shape(|_| {});
    active_subscriptions_across_nodes(|s| s.mercure.subscriptions = true);
}

/// The conformance suite's cases (dunglas/mercure `conformance-tests/`, v0.24.2): a publish on
/// one node reaches a subscriber on the other with its id, its type and its data, lines and
/// empty lines included; by raw string, several topics, several selectors, URI and URI template.
async fn conformance_cases_across_nodes(nodes: Nodes) {
    let Nodes { a, b, _backend, .. } = nodes;
    let token = subscriber(&[]);
    let selectors = [
        "https://example.com/raw string",
        "https://example.com/books/{id}",
        "urn:second",
    ];
    let mut sse = stream(&b, &query(&selectors, &[]), Some(&token), None).await;

    let cases: [(&[&str], &str); 5] = [
        (&["https://example.com/raw string"], "raw string"),
        (&["https://example.com/books/1"], "uri template"),
        (
            &["urn:none", "urn:second"],
            "several topics, an alternate matches",
        ),
        (&["urn:second"], "several selectors"),
        (&["https://example.com/books/2"], "second template match"),
    ];
    let mut expected = Vec::new();
    for (i, (topics, what)) in cases.iter().enumerate() {
        let id = format!("https://example.com/updates/{i}");
        let data = format!("{what}\n\nafter an empty line");
        let mut fields: Vec<(&str, &str)> = topics.iter().map(|t| ("topic", *t)).collect();
        fields.extend([("id", id.as_str()), ("data", data.as_str())]);
        if i == 1 {
            fields.extend([("type", "book"), ("retry", "7000")]);
        }
        assert_eq!(
            published(&a, &fields).await,
            id,
            "the publisher's id is the answer"
        );
        expected.push((id, data));
    }
    // Updates nobody selected, then a marker: the stream skips the former.
    published(&a, &[("topic", "https://example.com/books/1/reviews")]).await;
    published(
        &a,
        &[("topic", "https://example.com/other"), ("data", "nope")],
    )
    .await;
    let marker = published(&a, &[("topic", "urn:second"), ("data", "marker")]).await;
    assert!(marker.starts_with("urn:uuid:"), "a generated id: {marker}");

    for (i, (id, data)) in expected.iter().enumerate() {
        let e = sse.expect().await;
        assert_eq!(&e.id, id, "case {i}");
        assert_eq!(&e.data, data, "case {i}");
        if i == 1 {
            assert_eq!(e.event, "book");
            assert_eq!(e.retry, Some(Duration::from_millis(7000)));
        } else {
            assert_eq!(e.event, "message");
        }
    }
    let e = sse.expect().await;
    assert_eq!(
        (e.id.as_str(), e.data.as_str()),
        (marker.as_str(), "marker")
    );
}

/// `*` receives everything; a subscriber sees updates published through either node, in the
/// log's order.
async fn every_topic_with_the_star_in_one_order(nodes: Nodes) {
    let Nodes { a, b, _backend, .. } = nodes;
    let token = subscriber(&[]);
    let mut on_a = stream(&a, &query(&["*"], &[]), Some(&token), None).await;
    let mut on_b = stream(&b, &query(&["*"], &[]), Some(&token), None).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let node = if i % 2 == 0 { &a } else { &b };
        ids.push(published(node, &[("topic", &format!("urn:t:{i}")), ("data", "x")]).await);
    }
    assert_eq!(on_a.take_ids(10).await, ids);
    assert_eq!(on_b.take_ids(10).await, ids);
}

/// Private updates reach only subscribers whose token's `mercure.subscribe` matches one of
/// their topics (alternates included), live and in replay; public ones reach everyone whose
/// selectors match, anonymous subscribers too when allowed.
async fn private_updates_live_and_in_replay(nodes: Nodes) {
    let Nodes { a, b, _backend, .. } = nodes;

    let books = "https://example.com/books/{id}";
    let user_foo = subscriber(&["https://example.com/users/foo/{?topic}"]);
    let bar = subscriber(&["https://example.com/users/bar/{?topic}"]);
    let mut user_foo_live = stream(&b, &query(&[books], &[]), Some(&user_foo), None).await;
    let mut bar_live = stream(&b, &query(&[books], &[]), Some(&bar), None).await;
    let mut anonymous = stream(&a, &query(&[books], &[]), None, None).await;

    let start = published(&a, &[("topic", "urn:start")]).await;
    let alternate = "https://example.com/users/foo/?topic=https%3A%2F%2Fexample.com%2Fbooks%2F1";
    let secret = published(
        &a,
        &[
            ("topic", "https://example.com/books/1"),
            ("topic", alternate),
            ("private", "on"),
            ("data", "for foo"),
        ],
    )
    .await;
    let public = published(
        &a,
        &[("topic", "https://example.com/books/2"), ("data", "all")],
    )
    .await;

    let e = user_foo_live.expect().await;
    assert_eq!(
        (e.id.as_str(), e.data.as_str()),
        (secret.as_str(), "for foo")
    );
    assert_eq!(user_foo_live.expect().await.id, public);
    assert_eq!(bar_live.expect().await.id, public, "bar skips foo's update");
    assert_eq!(anonymous.expect().await.id, public, "anonymous skips it");

    // Replay from before the private update, on the other node.
    for (token, expected) in [
        (Some(&user_foo), vec![secret.clone(), public.clone()]),
        (Some(&bar), vec![public.clone()]),
        (None, vec![public.clone()]),
    ] {
        let mut replay = stream(
            &b,
            &query(&[books], &[]),
            token.map(String::as_str),
            Some(&start),
        )
        .await;
        assert_eq!(replay.take_ids(expected.len()).await, expected);
    }
    // `*` selects every topic, and still no private update without the right token.
    let mut star = stream(&a, &query(&["*"], &[]), Some(&bar), Some(&start)).await;
    assert_eq!(star.expect().await.id, public);
}

/// Tokens come from the header, then `?authorization=`, then the cookie; an invalid or expired
/// token is refused even when anonymous subscribers are allowed.
#[tokio::test]
async fn token_sources_and_their_precedence() {
    let redis = RedisServer::start().await;
    let mut s = keyed(&redis);
    s.mercure.anonymous = true;
    let app = spawn_app(s).await;
    let secret_topic = "https://example.com/secret";
    let good = subscriber(&[secret_topic]);
    let expired = hs(&json!({"mercure": {"subscribe": [secret_topic]}, "exp": exp_in(0) - 120}));
    let path = query(&[secret_topic], &[]);

    let status = |r: reqwest::Response| r.status().as_u16();
    let get = |extra: &str, headers: Vec<(&'static str, String)>| {
        let mut request = app.http.get(app.url(&format!("{path}{extra}")));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.send()
    };
    let cookie = |token: &str| ("cookie", format!("mercureAuthorization={token}"));
    let bearer = |token: &str| ("authorization", format!("Bearer {token}"));

    // Invalid tokens get 401 from every source, whatever the others hold.
    assert_eq!(status(get("", vec![bearer("garbage")]).await.unwrap()), 401);
    assert_eq!(status(get("", vec![bearer(&expired)]).await.unwrap()), 401);
    assert_eq!(
        status(
            get(&format!("&authorization={expired}"), vec![])
                .await
                .unwrap()
        ),
        401
    );
    assert_eq!(status(get("", vec![cookie(&expired)]).await.unwrap()), 401);
    // The header wins over the query, the query over the cookie.
    assert_eq!(
        status(
            get("&authorization=garbage", vec![bearer(&good)])
                .await
                .unwrap()
        ),
        200
    );
    assert_eq!(
        status(
            get("&authorization=garbage", vec![cookie(&good)])
                .await
                .unwrap()
        ),
        401
    );
    assert_eq!(
        status(
            get(&format!("&authorization={good}"), vec![cookie("garbage")])
                .await
                .unwrap()
        ),
        200
    );
    // The native door's sources are not Mercure's.
    assert_eq!(
        status(
            get("", vec![("cookie", format!("ssegate_token={expired}"))])
                .await
                .unwrap()
        ),
        200,
        "ignored: an anonymous subscriber"
    );

    // Each source carries the right to private updates.
    let mut subscribers = vec![
        Sse::from_response(get("", vec![bearer(&good)]).await.unwrap()),
        Sse::from_response(
            get(&format!("&authorization={good}"), vec![])
                .await
                .unwrap(),
        ),
        Sse::from_response(get("", vec![cookie(&good)]).await.unwrap()),
    ];
    let mut anonymous = Sse::from_response(get("", vec![]).await.unwrap());
    let private = published(&app, &[("topic", secret_topic), ("private", "1")]).await;
    let public = published(&app, &[("topic", secret_topic)]).await;
    for sse in &mut subscribers {
        assert_eq!(sse.take_ids(2).await, [private.clone(), public.clone()]);
    }
    assert_eq!(anonymous.expect().await.id, public);

    // Without `mercure.anonymous`, no token is no subscription.
    let strict = spawn_app(keyed(&redis)).await;
    let response = open(&strict, &path, None, None).await;
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("www-authenticate"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized");
}

/// A publisher may publish only to topics its `mercure.publish` selectors match, all of an
/// update's topics; otherwise nothing is stored. With no key at all, private updates are
/// refused: no subscriber could ever receive them.
#[tokio::test]
async fn publishers_are_held_to_their_selectors() {
    let redis = RedisServer::start().await;
    let app = spawn_app(keyed(&redis)).await;
    let books = hs(&mercure_claims(&["https://example.com/books/{id}"], &[]));
    let mut watcher = stream(&app, &query(&["*"], &[]), Some(&subscriber(&["*"])), None).await;

    let (status, _) = publish(
        &app,
        Some(&books),
        &[("topic", "https://example.com/books/1")],
    )
    .await;
    assert_eq!(status, 200);
    for fields in [
        vec![("topic", "https://example.com/authors/1")],
        vec![
            ("topic", "https://example.com/books/2"),
            ("topic", "urn:elsewhere"),
        ],
    ] {
        let (status, body) = publish(&app, Some(&books), &fields).await;
        assert_eq!(status, 403, "{body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"], "forbidden");
    }
    let no_claim = hs(&json!({"exp": exp_in(60)}));
    assert_eq!(
        publish(&app, Some(&no_claim), &[("topic", "urn:x")])
            .await
            .0,
        403
    );
    assert_eq!(publish(&app, None, &[("topic", "urn:x")]).await.0, 401);
    assert_eq!(
        publish(&app, Some("garbage"), &[("topic", "urn:x")])
            .await
            .0,
        401
    );
    let subscriber_only = subscriber(&["*"]);
    assert_eq!(
        publish(&app, Some(&subscriber_only), &[("topic", "urn:x")])
            .await
            .0,
        403
    );

    let marker = published(&app, &[("topic", "urn:marker")]).await;
    let ids = watcher.take_ids(2).await;
    assert_eq!(ids[1], marker, "nothing refused was stored: {ids:?}");

    let open_hub = spawn_app(settings(Some(&redis))).await;
    let (status, body) = publish(&open_hub, None, &[("topic", "urn:a"), ("private", "on")]).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("private_without_auth"), "{body}");
    let (status, id) = publish(&open_hub, None, &[("topic", "urn:a")]).await;
    assert_eq!(status, 200, "{id}");
}

/// A token in the cookie publishes only from an origin listed in `mercure.publish_origins`
/// (`Origin`, else the `Referer`'s origin); a bearer token needs no origin.
#[tokio::test]
async fn cookie_publishing_needs_a_listed_origin() {
    let redis = RedisServer::start().await;
    let mut s = keyed(&redis);
    s.mercure.publish_origins = vec!["https://app.example.com".into()];
    let app = spawn_app(s).await;
    let token = publisher();
    let post = |headers: Vec<(&'static str, String)>| {
        let mut request = app
            .http
            .post(app.url(HUB))
            .header(
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .header("cookie", format!("mercureAuthorization={token}"))
            .body(form(&[("topic", "urn:cookie")]));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(
        post(vec![("origin", "https://app.example.com".into())]).await,
        200
    );
    assert_eq!(
        post(vec![("referer", "https://app.example.com/page?x=1".into())]).await,
        200
    );
    assert_eq!(
        post(vec![("origin", "https://evil.example".into())]).await,
        403
    );
    assert_eq!(
        post(vec![(
            "referer",
            "https://evil.example/app.example.com".into()
        )])
        .await,
        403
    );
    assert_eq!(post(vec![]).await, 403, "no origin at all");
    let (status, _) = publish(&app, Some(&token), &[("topic", "urn:bearer")]).await;
    assert_eq!(status, 200, "a bearer token needs no origin");
}

/// Publishers' ids and generated ones resume exactly on the other node; `earliest` replays all
/// history; the response's `Last-Event-ID` says where the stream starts.
async fn resuming_from_ids_on_the_other_node(nodes: Nodes) {
    let Nodes { a, b, _backend, .. } = nodes;
    let token = subscriber(&[]);
    let topic = "https://example.com/feed";
    let path = query(&[topic], &[]);
    let mut ids = Vec::new();
    for i in 0..6 {
        let custom = format!("https://example.com/feed/rev/{i}");
        let fields: Vec<(&str, &str)> = if i % 2 == 0 {
            vec![("topic", topic), ("id", &custom)]
        } else {
            vec![("topic", topic)]
        };
        ids.push(published(&a, &fields).await);
        // Noise on other topics in between: it is skipped.
        published(&a, &[("topic", "urn:noise")]).await;
    }
    for from in 0..ids.len() - 1 {
        let response = open(&b, &path, Some(&token), Some(&ids[from])).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["last-event-id"], ids[from].as_str());
        let mut sse = Sse::from_response(response);
        let expected = &ids[from + 1..];
        assert_eq!(sse.take_ids(expected.len()).await, expected, "from {from}");
    }
    // The seam: replay, then live, nothing missing or twice.
    let mut sse = stream(&b, &path, Some(&token), Some(&ids[3])).await;
    let live = published(&a, &[("topic", topic), ("id", "live-1")]).await;
    let mut expected = ids[4..].to_vec();
    expected.push(live);
    assert_eq!(sse.take_ids(3).await, expected);
    // `lastEventID` in the query works, and the header wins over it.
    let with_query = query(&[topic], &[("lastEventID", &ids[0])]);
    let mut sse = stream(&b, &with_query, Some(&token), None).await;
    assert_eq!(sse.expect().await.id, ids[1]);
    let mut sse = stream(&b, &with_query, Some(&token), Some(&ids[3])).await;
    assert_eq!(sse.expect().await.id, ids[4]);

    let response = open(&b, &path, Some(&token), Some("earliest")).await;
    assert_eq!(response.headers()["last-event-id"], "earliest");
    let mut sse = Sse::from_response(response);
    assert_eq!(
        sse.take_ids(3).await,
        ids[..3].to_vec(),
        "all history, no gap notice"
    );
}

/// An id the hub cannot find is answered with `Last-Event-ID: earliest` and an `ssegate.gap`
/// event before everything retained: never a silent jump to live.
async fn an_unknown_id_is_told(nodes: Nodes) {
    let Nodes { a, b, _backend, .. } = nodes;
    let token = subscriber(&[]);
    let topic = "urn:told";
    let first = published(&a, &[("topic", topic), ("data", "1")]).await;
    for unknown in [
        "never-published",
        "urn:uuid:0192f1e4-8a7b-7cde-8f00-123456789abc",
        "urn:uuid:019b0000-0000-7000-8000-000000000001",
    ] {
        let response = open(&b, &query(&[topic], &[]), Some(&token), Some(unknown)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["last-event-id"], "earliest", "{unknown}");
        let mut sse = Sse::from_response(response);
        let notice = sse.expect().await;
        assert_eq!(notice.event, "ssegate.gap", "{unknown}");
        assert_eq!(notice.id, "", "a notice has no id of its own");
        let data: Value = serde_json::from_str(&notice.data).unwrap();
        assert_eq!(data["cursor"], unknown);
        assert_eq!(data["reason"], "unknown_cursor");
        assert_eq!(sse.expect().await.id, first, "then everything retained");
    }
}

/// History trimmed past a client's id: the notice names the id, the header says `earliest`.
async fn trimmed_history_is_told(nodes: Nodes) {
    let Nodes { a, b, _backend, .. } = nodes;
    let token = subscriber(&[]);
    let old = published(&a, &[("topic", "urn:t"), ("id", "rev-0")]).await;
    let mut kept = Vec::new();
    for i in 1..=5 {
        kept.push(published(&a, &[("topic", "urn:t"), ("id", &format!("rev-{i}"))]).await);
    }
    let response = open(&b, &query(&["urn:t"], &[]), Some(&token), Some(&old)).await;
    assert_eq!(response.headers()["last-event-id"], "earliest");
    let mut sse = Sse::from_response(response);
    let notice = sse.expect().await;
    assert_eq!(notice.event, "ssegate.gap");
    let data: Value = serde_json::from_str(&notice.data).unwrap();
    assert_eq!(
        (data["cursor"].as_str(), data["reason"].as_str()),
        (Some("rev-0"), Some("trimmed"))
    );
    assert_eq!(data["resume_from"], "rev-3");
    assert_eq!(sse.take_ids(3).await, kept[2..].to_vec());
}

/// A repeated publisher id with the same update is a retry: answered with the id, stored once.
/// Another update under a used id is refused with `409`, not acknowledged and dropped.
async fn a_repeated_id_is_stored_once(nodes: Nodes) {
    let Nodes { a, b, _backend, .. } = nodes;
    let token = subscriber(&[]);
    let mut sse = stream(&b, &query(&["urn:r"], &[]), Some(&token), None).await;
    let fields = [("topic", "urn:r"), ("id", "same"), ("data", "first")];
    assert_eq!(published(&a, &fields).await, "same");
    assert_eq!(
        published(&b, &fields).await,
        "same",
        "a retry on another node"
    );
    let (status, body) = publish(
        &b,
        Some(&publisher()),
        &[("topic", "urn:r"), ("id", "same"), ("data", "other")],
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "duplicate_id");
    let marker = published(&a, &[("topic", "urn:r"), ("data", "marker")]).await;
    let e = sse.expect().await;
    assert_eq!((e.id.as_str(), e.data.as_str()), ("same", "first"));
    assert_eq!(
        sse.expect().await.id,
        marker,
        "stored once, the other refused"
    );
}

/// Malformed forms, broken templates, oversized topics and thousands of selectors get a clear
/// `4xx` with a JSON error, and the node goes on serving.
#[tokio::test]
async fn bad_input_gets_a_clear_4xx() {
    let redis = RedisServer::start().await;
    let app = spawn_app(keyed(&redis)).await;
    let token = publisher();
    let raw = |content_type: &'static str, body: &'static str| {
        app.http
            .post(app.url(HUB))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let form_type = "application/x-www-form-urlencoded";
    for (content_type, body, code) in [
        (form_type, "data=no+topic", "missing_topic"),
        (form_type, "topic=t&data=%zz", "invalid_form"),
        (form_type, "topic=t&data=%FF%FE", "invalid_form"),
        (form_type, "topic=t&retry=later", "invalid_retry"),
        (form_type, "topic=t&id=a%0D%0Ab", "invalid_id"),
        (form_type, "topic=t&type=a%0Ab", "invalid_event_type"),
        ("application/json", r#"{"topic":"t"}"#, "invalid_form"),
    ] {
        let response = raw(content_type, body).await.unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"], code, "{body}");
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let huge_topic = "a".repeat(5000);
    let (status, _) = publish(&app, Some(&token), &[("topic", &huge_topic)]).await;
    assert_eq!(status, 413);

    let sub = subscriber(&[]);
    for (path, status, code) in [
        (
            query(&["https://example.com/{broken"], &[]),
            400,
            "invalid_selector",
        ),
        (query(&[&huge_topic], &[]), 413, "topic_too_long"),
        (HUB.to_owned(), 400, "missing_topic"),
        (
            query(&(0..200).map(|_| "urn:x").collect::<Vec<_>>(), &[]),
            400,
            "too_many_topics",
        ),
    ] {
        let response = open(&app, &path, Some(&sub), None).await;
        assert_eq!(response.status(), status, "{code}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"], code);
    }
    // Thousands of selectors make a request head larger than any node reads.
    let thousands = query(&(0..3000).map(|_| "urn:x").collect::<Vec<_>>(), &[]);
    assert_eq!(open(&app, &thousands, Some(&sub), None).await.status(), 431);
    // Still serving.
    let mut sse = stream(&app, &query(&["urn:ok"], &[]), Some(&sub), None).await;
    let id = published(&app, &[("topic", "urn:ok")]).await;
    assert_eq!(sse.expect().await.id, id);
}

/// The stream ends at the token's `exp`, as `/v1/events` does.
#[tokio::test]
async fn the_stream_ends_at_the_tokens_expiry() {
    let redis = RedisServer::start().await;
    let mut s = keyed(&redis);
    s.auth.leeway = Duration::ZERO;
    let app = spawn_app(s).await;
    let token = hs(&json!({"mercure": {"subscribe": []}, "exp": exp_in(2)}));
    let mut sse = stream(&app, &query(&["*"], &[]), Some(&token), None).await;
    assert!(sse.next().await.is_none(), "ended without an update");
}

/// Topics are IRIs: braces, spaces, non-ASCII and 2 KiB ones are published, delivered and
/// resumed (by label) like any other, on one Redis and on a cluster, where they sit in key names
/// after the log's hash tag.
async fn iris_of_every_shape(nodes: Nodes) {
    let Nodes { a, b, _backend, .. } = nodes;
    let token = subscriber(&[]);
    let long = format!("https://example.com/{}", "a".repeat(2048));
    let topics = [
        "https://example.com/books/{id}".to_owned(),
        "https://example.com/a b/ü/日本".to_owned(),
        "will-not-match}".to_owned(),
        long,
    ];
    let start = published(&a, &[("topic", "urn:start"), ("id", "urn:start:ü")]).await;
    let mut ids = Vec::new();
    for topic in &topics {
        ids.push(published(&a, &[("topic", topic), ("data", topic)]).await);
    }
    // Exact selectors where they can be given (a string with a stray brace is not a selector:
    // `*` receives it), resumed on the other node from before them all.
    let exact: Vec<&str> = [0, 1, 3].iter().map(|&i| topics[i].as_str()).collect();
    let response = open(&b, &query(&exact, &[]), Some(&token), Some(&start)).await;
    assert_eq!(
        response.headers()["last-event-id"].as_bytes(),
        start.as_bytes(),
        "a non-ASCII id in the header"
    );
    let mut sse = Sse::from_response(response);
    for i in [0, 1, 3] {
        let e = sse.expect().await;
        assert_eq!((&e.id, &e.data), (&ids[i], &topics[i]));
    }
    let mut all = stream(&b, &query(&["*"], &[]), Some(&token), Some(&start)).await;
    assert_eq!(all.take_ids(4).await, ids);
}

/// Mercure streams and publishes show in the same metrics as `/v1`'s, and the node's distinct
/// subscriptions in their own gauge; it goes back to zero when the clients leave.
#[tokio::test]
async fn metrics_count_the_mercure_hub() {
    use crate::ops::sample;
    let redis = RedisServer::start().await;
    let app = spawn_app(keyed(&redis)).await;
    let scrape = async || {
        let text = reqwest::get(app.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await;
        text.unwrap()
    };
    let token = subscriber(&[]);
    let path = query(&["urn:m"], &[]);
    // Two clients on one subscription, one on another.
    let mut same = [
        stream(&app, &path, Some(&token), None).await,
        stream(&app, &path, Some(&token), None).await,
    ];
    let mut other = stream(&app, &query(&["*"], &[]), Some(&token), None).await;
    let id = published(&app, &[("topic", "urn:m")]).await;
    let (status, _) = publish(&app, Some(&publisher()), &[("data", "no topic")]).await;
    assert_eq!(status, 400);
    for sse in same.iter_mut().chain([&mut other]) {
        assert_eq!(sse.expect().await.id, id);
    }
    let now = scrape().await;
    assert_eq!(sample(&now, "ssegate_mercure_subscriptions"), 2.0, "{now}");
    assert_eq!(sample(&now, "ssegate_open_streams"), 3.0);
    assert_eq!(sample(&now, "ssegate_deliveries_total"), 3.0);
    let acked = "ssegate_publish_requests_total{result=\"acknowledged\"}";
    let refused = "ssegate_publish_requests_total{result=\"refused\"}";
    assert_eq!((sample(&now, acked), sample(&now, refused)), (1.0, 1.0));
    drop((same, other));
    let mut check = async || {
        let now = scrape().await;
        sample(&now, "ssegate_mercure_subscriptions") == 0.0
            && sample(&now, "ssegate_open_streams") == 0.0
    };
    crate::helpers::eventually("the subscriptions are released", &mut check).await;
}

/// The subscription events' template: every subscription of every topic.
pub const SUBSCRIPTIONS: &str = "/.well-known/mercure/subscriptions{/topic}{/subscriber}";

/// A token that may receive subscription events and read the subscriptions API.
pub fn observer() -> String {
    hs(&mercure_claims(
        &[],
        &[SUBSCRIPTIONS, "/.well-known/mercure/subscriptions"],
    ))
}

/// `GET` on the subscriptions API: status, `ETag`, body.
pub async fn subscriptions_api(
    app: &TestApp,
    path: &str,
    token: Option<&str>,
    if_none_match: Option<&str>,
) -> (u16, Option<String>, Value) {
    let mut request = app.http.get(app.url(path));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    if let Some(tag) = if_none_match {
        request = request.header("if-none-match", tag);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    if status == 200 {
        assert_eq!(response.headers()["content-type"], "application/ld+json");
    }
    let etag = response
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.json().await.unwrap_or(Value::Null);
    (status, etag, body)
}

/// The next subscription event of a stream: its document.
async fn subscription_event(stream: &mut Sse) -> Value {
    let e = stream.expect().await;
    let doc: Value = serde_json::from_str(&e.data).expect("a JSON-LD document");
    assert_eq!(doc["type"], "Subscription", "{doc}");
    assert_eq!(doc["@context"], "https://mercure.rocks/");
    doc
}

/// Reads subscription events until those of `subscriber` with `active` number `n`; their
/// documents, by selector.
pub async fn subscription_events(
    stream: &mut Sse,
    subscriber: Option<&str>,
    active: bool,
    n: usize,
) -> Vec<Value> {
    let mut docs = Vec::new();
    while docs.len() < n {
        let doc = subscription_event(stream).await;
        let theirs = subscriber.is_none_or(|s| doc["subscriber"] == s);
        if theirs && doc["active"] == active && doc["topic"] != SUBSCRIPTIONS {
            docs.push(doc);
        }
    }
    docs.sort_by_key(|d| d["topic"].as_str().unwrap().to_owned());
    docs
}

/// Subscription events reach a subscriber on the other node when a subscription opens and
/// closes; the subscriptions API lists every node's subscriptions, by selector and one by one,
/// with `lastEventID` (from which subscription events resume), an `ETag` and `304`; an unknown
/// subscription is `404`; a token whose selectors miss the URL is `401`.
async fn active_subscriptions_across_nodes(nodes: Nodes) {
    let Nodes { a, b, _backend, .. } = nodes;
    let mut events = stream(&a, &query(&[SUBSCRIPTIONS], &[]), Some(&observer()), None).await;
    // Its own subscription is announced too.
    let own = subscription_event(&mut events).await;
    assert_eq!(
        (own["topic"].as_str(), own["active"].as_bool()),
        (Some(SUBSCRIPTIONS), Some(true))
    );

    let selectors = ["https://example.com/books/{id}", "https://example.com/a b"];
    let reader = stream(&b, &query(&selectors, &[]), Some(&subscriber(&[])), None).await;
    let opened = subscription_events(&mut events, None, true, 2).await;
    let who = opened[0]["subscriber"].as_str().unwrap().to_owned();
    assert!(who.starts_with("urn:uuid:"), "{who}");
    for (doc, selector) in opened
        .iter()
        .zip(["https://example.com/a b", "https://example.com/books/{id}"])
    {
        assert_eq!(doc["topic"], selector);
        assert_eq!(
            doc["subscriber"],
            who.as_str(),
            "one subscriber for its selectors"
        );
        assert_eq!(doc["payload"], json!({"user": 1}), "mercure.payload");
        let id = doc["id"].as_str().unwrap();
        assert!(
            id.starts_with("/.well-known/mercure/subscriptions/https%3A%2F%2Fexample.com%2F"),
            "{id}"
        );
        assert!(
            id.ends_with(&format!("/{}", who.replace(':', "%3A"))),
            "{id}"
        );
    }

    // The API, on the other node than the reader's.
    let path = "/.well-known/mercure/subscriptions";
    let (status, etag, all) = subscriptions_api(&a, path, Some(&observer()), None).await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(
        (all["type"].as_str(), all["id"].as_str()),
        (Some("Subscriptions"), Some(path))
    );
    let last = all["lastEventID"].as_str().unwrap().to_owned();
    assert_eq!(etag.as_deref(), Some(last.as_str()));
    let listed: Vec<&Value> = all["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["subscriber"] == who.as_str())
        .collect();
    assert_eq!(listed.len(), 2, "{all}");
    let (status, _, _) = subscriptions_api(&a, path, Some(&observer()), Some(&last)).await;
    assert_eq!(status, 304, "unchanged since the ETag");
    let one_selector = format!(
        "{path}/{}",
        opened[1]["id"].as_str().unwrap().split('/').nth(4).unwrap()
    );
    let (status, _, by_selector) =
        subscriptions_api(&b, &one_selector, Some(&observer()), None).await;
    assert_eq!(status, 200);
    let docs = by_selector["subscriptions"].as_array().unwrap();
    assert_eq!(docs.len(), 1, "{by_selector}");
    assert_eq!(docs[0]["topic"], "https://example.com/books/{id}");
    let (status, _, single) = subscriptions_api(
        &b,
        opened[0]["id"].as_str().unwrap(),
        Some(&observer()),
        None,
    )
    .await;
    assert_eq!(status, 200, "{single}");
    assert_eq!(single["topic"], "https://example.com/a b");
    assert_eq!(single["@context"], "https://mercure.rocks/");
    assert_eq!(single["lastEventID"], last.as_str());
    let unknown = format!("{one_selector}/urn%3Auuid%3A00000000-0000-8000-8000-000000000000");
    let (status, _, _) = subscriptions_api(&b, &unknown, Some(&observer()), None).await;
    assert_eq!(status, 404);
    let (status, _, _) = subscriptions_api(&b, path, None, None).await;
    assert_eq!(status, 401, "no token");
    let (status, _, _) = subscriptions_api(
        &b,
        path,
        Some(&subscriber(&["https://example.com/{x}"])),
        None,
    )
    .await;
    assert_eq!(status, 401, "selectors that miss the URL");

    // Closing: inactive on both, gone from the list, and a subscriber resuming from the
    // lastEventID read before gets the change.
    drop(reader);
    let closed = subscription_events(&mut events, Some(&who), false, 2).await;
    assert_eq!(closed.len(), 2);
    let mut resumed = stream(
        &b,
        &query(&[SUBSCRIPTIONS], &[]),
        Some(&observer()),
        Some(&last),
    )
    .await;
    let replayed = subscription_events(&mut resumed, Some(&who), false, 2).await;
    assert_eq!(replayed, closed, "resumed from lastEventID");
    a.eventually("the list no longer has it", async || {
        let (_, _, all) = subscriptions_api(&a, path, Some(&observer()), None).await;
        !all["subscriptions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["subscriber"] == who.as_str())
    })
    .await;
}
