//! Publishing across many topics: a batch over many topics and one event to many topics
//! (`{"topics": [...]}`) go to Redis together (one call on one Redis, one per slot and in
//! parallel on a cluster), are stored once and in order per topic, and are delivered live once;
//! a master killed mid-batch is answered event by event, and a retry with the same keys stores
//! only the rest.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{
    on_both, settings, spawn_app, Backend, Nodes, RedisCluster, RedisServer, Sse, TestApp,
};
use crate::security::hs;

/// Topics of a many-topic publish: one per user.
const USERS: usize = 100;

fn users() -> Vec<String> {
    (0..USERS).map(|i| format!("user.{i}")).collect()
}

fn exp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300
}

/// A token that may publish to and read `patterns`.
fn token(patterns: &[&str]) -> String {
    hs(&json!({"ssegate": {"publish": patterns, "subscribe": patterns}, "exp": exp()}))
}

/// `POST /v1/events` with a JSON body and an optional token and `Idempotency-Key`.
async fn post(
    app: &TestApp,
    body: &Value,
    token: Option<&str>,
    idempotency_key: Option<&str>,
) -> (u16, Value) {
    let mut request = app.http.post(app.url("/v1/events")).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(key) = idempotency_key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn ids_of(reply: &Value) -> Vec<String> {
    serde_json::from_value(reply["ids"].clone()).unwrap_or_else(|_| panic!("ids: {reply}"))
}

/// `(id, data)` of every entry of a topic's stream on `conn`.
async fn entries(conn: &mut impl redis::aio::ConnectionLike, topic: &str) -> Vec<(String, String)> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("ssegate:{{{topic}}}"))
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

impl Backend {
    async fn entries(&self, topic: &str) -> Vec<(String, String)> {
        match self {
            Backend::Redis(redis) => entries(&mut redis.conn().await, topic).await,
            Backend::Cluster(cluster) => entries(&mut cluster.conn().await, topic).await,
        }
    }
}

/// A batch of two events for each of 100 users and one event to all of them, published on node
/// A and read live on node B in one stream of the 100 topics: each stored once, in order per
/// topic, with the ids the publishes answered, and delivered once.
async fn batches_and_many_topic_publishes_across_nodes(nodes: Nodes) {
    let users = users();
    let token = token(&["user.*"]);
    if let Backend::Cluster(cluster) = &nodes._backend {
        let mut masters = HashSet::new();
        for user in &users {
            masters.insert(cluster.master_of(&format!("ssegate:{{{user}}}")).await);
        }
        assert_eq!(masters.len(), 3, "the topics are spread over every master");
    }
    let query: String = users.iter().map(|u| format!("&topic={u}")).collect();
    let response = nodes
        .b
        .http
        .get(nodes.b.url(&format!("/v1/events?{}", &query[1..])))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut live = Sse::from_response(response);
    // The stream is open once its first event arrives: a marker published to every topic.
    let (status, marker) = post(
        &nodes.a,
        &json!({"topics": users, "data": "marker"}),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 201, "{marker}");
    let mut seen: HashMap<String, Vec<(String, String)>> = HashMap::new();
    let mut record = async |live: &mut Sse, n: usize| {
        for _ in 0..n {
            let e = live.expect().await;
            let v: Value = serde_json::from_str(&e.data).unwrap();
            let topic = v["topic"].as_str().unwrap().to_owned();
            let id = v["id"].as_str().unwrap().to_owned();
            let data = v["data"].as_str().unwrap().to_owned();
            seen.entry(topic).or_default().push((id, data));
        }
    };
    record(&mut live, USERS).await;

    let batch: Vec<Value> = (0..2)
        .flat_map(|round| {
            users
                .iter()
                .map(move |u| json!({"topic": u, "data": format!("{u} #{round}")}))
        })
        .collect();
    let (status, reply) = post(&nodes.a, &json!(batch), Some(&token), None).await;
    assert_eq!(status, 201, "{reply}");
    let batch_ids = ids_of(&reply);
    assert_eq!(batch_ids.len(), 2 * USERS);

    // Listed with a repeat: stored once there, and answered with the same id in both places.
    let mut listed = users.clone();
    listed.push(users[7].clone());
    let (status, reply) = post(
        &nodes.a,
        &json!({"topics": listed, "data": {"note": "for all"}, "event": "notice"}),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 201, "{reply}");
    let many_ids = ids_of(&reply);
    assert_eq!(many_ids.len(), USERS + 1, "one id per listed topic");
    assert_eq!(
        many_ids[7], many_ids[USERS],
        "a repeated topic is stored once"
    );

    record(&mut live, 3 * USERS).await;
    let marker_ids = ids_of(&marker);
    for (i, user) in users.iter().enumerate() {
        let expected = vec![
            (marker_ids[i].clone(), "marker".to_owned()),
            (batch_ids[i].clone(), format!("{user} #0")),
            (batch_ids[USERS + i].clone(), format!("{user} #1")),
            (many_ids[i].clone(), r#"{"note":"for all"}"#.to_owned()),
        ];
        assert_eq!(
            nodes._backend.entries(user).await,
            expected,
            "{user}: stored once each, in order, with the ids answered"
        );
        assert_eq!(
            seen[user], expected,
            "{user}: delivered once each, in order"
        );
    }
    // Nothing more: the next event is the one published last.
    let (status, last) = post(
        &nodes.a,
        &json!({"topic": users[0], "data": "last"}),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 201, "{last}");
    let e = live.expect().await;
    let v: Value = serde_json::from_str(&e.data).unwrap();
    assert_eq!(v["id"], last["id"], "no duplicate before it");
}

on_both! {
    batches_and_many_topic_publishes_across_nodes(|s| {
        s.max_topics_per_connection = 100;
        // The presence heartbeat would only add script calls to watch.
        s.presence.enabled = false;
    });
}

/// Script calls Redis ran (the append is one script).
async fn script_calls(redis: &RedisServer) -> u64 {
    redis.calls("evalsha").await + redis.calls("eval").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_100_topics_is_one_call_on_one_redis() {
    let redis = RedisServer::start().await;
    let mut s = settings(Some(&redis));
    s.presence.enabled = false;
    let app = spawn_app(s).await;
    // The first append loads the script.
    app.publish("warm", "up").await;
    let users = users();
    redis.reset_stats().await;
    let calls = async || {
        let text = crate::ops::scrape(&app.url("/metrics")).await;
        crate::ops::sample(&text, "ssegate_redis_append_calls_total")
    };
    let before = calls().await;
    let batch: Vec<Value> = users
        .iter()
        .map(|u| json!({"topic": u, "data": "x"}))
        .collect();
    let (status, reply) = app.post_json(&json!(batch)).await;
    assert_eq!(status, 201, "{reply}");
    // Topics not known yet to have no listeners: announced, by the script.
    assert_eq!(script_calls(&redis).await, 1, "one call for 100 topics");
    assert_eq!(calls().await - before, 1.0);
    let (status, reply) = app.post_json(&json!({"topics": users, "data": "y"})).await;
    assert_eq!(status, 201, "{reply}");
    // The script again, or plain XADDs once the gateway knows nobody listens: one round trip.
    assert_eq!(
        calls().await - before,
        2.0,
        "and one for one event to 100 topics"
    );
    assert!(script_calls(&redis).await <= 2);
    assert_eq!(redis.calls("xadd").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_on_a_cluster_is_one_call_per_slot() {
    let cluster = RedisCluster::start(3, 0).await;
    let mut s = settings(None);
    s.redis_url = Some(cluster.url());
    s.presence.enabled = false;
    let app = spawn_app(s).await;
    let users = users();
    let mut slots = HashSet::new();
    for user in &users {
        slots.insert(cluster.slot_of(&format!("ssegate:{{{user}}}")).await);
    }
    let calls = async || {
        let text = crate::ops::scrape(&app.url("/metrics")).await;
        crate::ops::sample(&text, "ssegate_redis_append_calls_total")
    };
    // Topics not known yet are announced, by the script: one call per slot.
    let before = calls().await;
    let (status, reply) = app
        .post_json(&json!({"topics": users, "data": "warm"}))
        .await;
    assert_eq!(status, 201, "{reply}");
    assert_eq!(
        calls().await - before,
        slots.len() as f64,
        "one call per slot ({} slots for {USERS} topics)",
        slots.len()
    );
    // The script again, or plain XADDs once the gateway knows nobody listens: either way one
    // round trip per slot.
    let before = calls().await;
    let (status, reply) = app.post_json(&json!({"topics": users, "data": "x"})).await;
    assert_eq!(status, 201, "{reply}");
    assert_eq!(
        calls().await - before,
        slots.len() as f64,
        "one call per slot"
    );
    assert_eq!(cluster.calls("xadd").await, 2 * USERS as u64);
}

/// Settings for a gateway on a cluster, noticing trouble quickly.
fn on_cluster(cluster: &RedisCluster) -> ssegate::config::Settings {
    let mut s = settings(None);
    s.redis_url = Some(cluster.seeds());
    s.redis.connect_timeout = Duration::from_millis(500);
    s.redis.response_timeout = Duration::from_secs(1);
    s.redis.ping_interval = Duration::from_millis(200);
    s.presence.enabled = false;
    s
}

/// A master is stopped while a batch's calls are in flight, then killed: the answer says per
/// event whether it was stored (exactly what the other masters took), and once the replica took
/// over, the same batch with the same keys stores only the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_batch_is_answered_per_event_and_a_retry_stores_the_rest() {
    let mut cluster = RedisCluster::start(3, 1).await;
    let app = spawn_app(on_cluster(&cluster)).await;
    let users = users();
    let mut master_of = Vec::new();
    for user in &users {
        master_of.push(cluster.master_of(&format!("ssegate:{{{user}}}")).await);
    }
    let victim = master_of[0];
    let heir = cluster.replica_of(victim).await;
    // Two events per topic, each with its own key; then one event to every topic.
    let batch: Vec<Value> = (0..2)
        .flat_map(|round| {
            users.iter().map(move |u| {
                json!({"topic": u, "data": format!("{u} #{round}"), "idempotency_key": format!("{u}-{round}")})
            })
        })
        .collect();
    let batch = json!(batch);
    let many = json!({"topics": users, "data": "to all", "idempotency_key": "all-1"});
    // Each node's own connection: a cluster connection would wait on the stopped master.
    let mut conns = HashMap::new();
    for &m in master_of.iter().collect::<HashSet<_>>() {
        conns.insert(m, cluster.nodes[m].conn().await);
    }

    cluster.nodes[victim].pause();
    let sent: Vec<_> = [batch.clone(), many.clone()]
        .into_iter()
        .map(|body| {
            let (http, url) = (app.http.clone(), app.url("/v1/events"));
            tokio::spawn(async move {
                let r = http.post(&url).json(&body).send().await.unwrap();
                let status = r.status().as_u16();
                (status, r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    // The other masters store their part of both while the victim's calls hang.
    for (i, user) in users.iter().enumerate() {
        if master_of[i] == victim {
            continue;
        }
        let conn = conns.get_mut(&master_of[i]).unwrap();
        crate::helpers::eventually("the other masters to store their events", &mut async || {
            entries(conn, user).await.len() == 3
        })
        .await;
    }
    cluster.nodes[victim].kill();
    let mut replies = Vec::new();
    for task in sent {
        replies.push(task.await.unwrap());
    }

    let mut first_ids: Vec<Vec<Option<String>>> = Vec::new();
    for ((status, reply), per_topic) in replies.iter().zip([2, 1]) {
        assert_eq!(*status, 503, "{reply}");
        assert_eq!(reply["error"], "store_unavailable");
        let ids: Vec<Option<String>> = serde_json::from_value(reply["ids"].clone()).unwrap();
        assert_eq!(ids.len(), per_topic * USERS);
        for (k, id) in ids.iter().enumerate() {
            let on_victim = master_of[k % USERS] == victim;
            assert_eq!(
                id.is_none(),
                on_victim,
                "event {k}: stored unless on the victim"
            );
        }
        first_ids.push(ids);
    }

    cluster.wait_stable().await;
    assert_eq!(
        cluster
            .master_of(&format!("ssegate:{{{}}}", users[0]))
            .await,
        heir
    );
    // The retries are answered 201 once the gateway follows the new master; until then a retry
    // may be refused again, which must be just as safe.
    let mut retried = Vec::new();
    for body in [&batch, &many] {
        let deadline = tokio::time::Instant::now() + crate::helpers::PATIENCE;
        loop {
            let (status, reply) = post(&app, body, None, None).await;
            if status == 201 {
                retried.push(ids_of(&reply));
                break;
            }
            assert_eq!(status, 503, "{reply}");
            assert!(
                tokio::time::Instant::now() < deadline,
                "retry refused: {reply}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for (first, again) in first_ids.iter().zip(&retried) {
        for (k, id) in first.iter().enumerate() {
            if let Some(id) = id {
                assert_eq!(id, &again[k], "event {k}: the retry answers the stored id");
            }
        }
    }
    // The two requests were sent at once, so on a topic either may come first; the batch's own
    // events keep their order. (A write to the victim that was answered null may still have
    // landed, when the cluster client sent it on to the heir: the retry then answers its id.)
    let mut conn = cluster.conn().await;
    for (i, user) in users.iter().enumerate() {
        let stored = entries(&mut conn, user).await;
        let mut expected = vec![
            (retried[0][i].clone(), format!("{user} #0")),
            (retried[0][USERS + i].clone(), format!("{user} #1")),
            (retried[1][i].clone(), "to all".to_owned()),
        ];
        expected.sort_by_key(|(id, _)| {
            let (ms, seq) = id.split_once('-').unwrap();
            (ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap())
        });
        assert_eq!(stored, expected, "{user}: every event once, in id order");
        let position = |data: &str| stored.iter().position(|(_, d)| d == data);
        assert!(
            position(&format!("{user} #0")) < position(&format!("{user} #1")),
            "{user}: the batch's events in order"
        );
    }
}

#[tokio::test]
async fn one_event_to_many_topics_validates_the_whole_request_first() {
    let mut s = settings(None);
    s.max_batch_events = 3;
    let app = spawn_app(s).await;
    let cases = [
        (json!({"topics": [], "data": "x"}), 400, "missing_topic"),
        (json!({"data": "x"}), 400, "missing_topic"),
        (
            json!({"topic": "a", "topics": ["b"], "data": "x"}),
            400,
            "invalid_event",
        ),
        (
            json!([{"topics": ["a", "b"], "data": "x"}]),
            400,
            "invalid_event",
        ),
        (
            json!({"topics": ["a", "has space"], "data": "x"}),
            400,
            "invalid_topic",
        ),
        (
            json!({"topics": ["a", 7], "data": "x"}),
            400,
            "invalid_event",
        ),
        (
            json!({"topics": ["a", "b"], "data": "x", "event": "ssegate.gap"}),
            400,
            "reserved_event_type",
        ),
        (
            json!({"topics": ["a", "b", "c", "d"], "data": "x"}),
            413,
            "batch_too_large",
        ),
    ];
    for (body, status, code) in cases {
        let (got, reply) = app.post_json(&body).await;
        assert_eq!(
            (got, reply["error"].as_str()),
            (status, Some(code)),
            "{body}"
        );
    }
    // Nothing of the refused requests was stored: the first event on `a` is the next one.
    let mut live = app.subscribe("a", Some("0")).await;
    // Repeats count once toward max_batch_events.
    let (status, reply) = app
        .post_json(&json!({"topics": ["a", "b", "a", "c", "b"], "data": "x"}))
        .await;
    assert_eq!(status, 201, "{reply}");
    let ids = ids_of(&reply);
    assert_eq!(ids.len(), 5);
    assert_eq!((&ids[0], &ids[1]), (&ids[2], &ids[4]));
    let first = live.expect().await;
    assert_eq!(
        (first.id.as_str(), first.data.as_str()),
        (ids[0].as_str(), "x")
    );
}

#[tokio::test]
async fn one_event_to_many_topics_is_idempotent_on_each_topic() {
    let redis = RedisServer::start().await;
    let app = spawn_app(settings(Some(&redis))).await;
    let body = json!({"topics": ["k.a", "k.b", "k.c"], "data": "once", "idempotency_key": "n-1"});
    let (s1, first) = app.post_json(&body).await;
    let (s2, again) = app.post_json(&body).await;
    assert_eq!((s1, s2), (201, 201), "{first} {again}");
    assert_eq!(first["ids"], again["ids"]);
    // The header's key applies on each topic too; a topic added later is stored, the rest not.
    let headed = json!({"topics": ["k.a", "k.b"], "data": "headed"});
    let (_, h1) = post(&app, &headed, None, Some("h-1")).await;
    let headed = json!({"topics": ["k.a", "k.b", "k.d"], "data": "headed"});
    let (status, h2) = post(&app, &headed, None, Some("h-1")).await;
    assert_eq!(status, 201, "{h2}");
    assert_eq!(ids_of(&h1)[..], ids_of(&h2)[..2]);
    for (topic, n) in [("k.a", 2), ("k.b", 2), ("k.c", 1), ("k.d", 1)] {
        assert_eq!(redis.stream_ids(topic).await.len(), n, "{topic}");
    }
}

#[tokio::test]
async fn a_token_must_cover_every_topic_or_nothing_is_stored() {
    let redis = RedisServer::start().await;
    let mut s = settings(Some(&redis));
    s.auth.jwt_key = Some(crate::security::SECRET.into());
    let app = spawn_app(s).await;
    let token = token(&["user.*"]);
    let refused = [
        json!({"topics": ["user.1", "user.2", "admin.1"], "data": "x"}),
        json!([
            {"topic": "user.1", "data": "x"},
            {"topic": "user.2", "data": "x"},
            {"topic": "admin.1", "data": "x"},
        ]),
    ];
    for body in &refused {
        let (status, reply) = post(&app, body, Some(&token), None).await;
        assert_eq!((status, reply["error"].as_str()), (403, Some("forbidden")));
        let (status, _) = post(&app, body, None, None).await;
        assert_eq!(status, 401);
    }
    for topic in ["user.1", "user.2", "admin.1"] {
        assert!(
            redis.stream_ids(topic).await.is_empty(),
            "{topic}: nothing stored"
        );
    }
    let allowed = json!({"topics": ["user.1", "user.2"], "data": "x"});
    let (status, reply) = post(&app, &allowed, Some(&token), None).await;
    assert_eq!(status, 201, "{reply}");
}
