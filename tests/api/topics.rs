//! One topic per user: what idle topics cost Redis.

use std::time::Duration;

use ssegate::event::Topic;

use crate::helpers::{
    envelope, settings, spawn_app, RedisServer, ResumingClient, Sse, TestApp, NODE_TOPICS,
};

/// Commands Redis runs for the test itself or for connection health, not for topics.
const OVERHEAD: [&str; 4] = ["info", "config", "ping", "client"];

/// The presence heartbeat's script and what it runs.
const PRESENCE_HEARTBEAT: [&str; 4] = ["evalsha", "time", "zadd", "zrange"];

/// Runs `ticks` safety-net intervals and returns the commands Redis ran meanwhile, other than
/// [`OVERHEAD`], by name.
async fn commands_over_ticks(redis: &RedisServer, app: &TestApp, ticks: u64) -> Vec<(String, u64)> {
    // One whole interval first, so that whatever opening the streams started is over.
    redis.reset_stats().await;
    app.eventually("a safety-net check ran", async || {
        redis.calls("xread").await >= 2
    })
    .await;
    redis.reset_stats().await;
    app.eventually("the safety net ran its intervals", async || {
        redis.calls("xread").await >= ticks
    })
    .await;
    let mut calls: Vec<(String, u64)> = redis
        .all_calls()
        .await
        .into_iter()
        .filter(|(name, _)| !OVERHEAD.contains(&name.split('|').next().unwrap_or(name)))
        .collect();
    calls.sort();
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_topics_cost_redis_one_command_per_interval_however_many() {
    let redis = RedisServer::start().await;
    let mut s = settings(Some(&redis));
    s.catchup_interval = Duration::from_millis(100);
    s.heartbeat_interval = Duration::from_secs(60);
    let app = spawn_app(s).await;
    let mut streams: Vec<Sse> = Vec::new();
    for (total, ticks) in [(20, 5), (600, 5)] {
        while streams.len() < total {
            let topic = format!("user.{}", streams.len());
            app.publish(&topic, "hello").await;
            streams.push(app.subscribe(&topic, None).await);
        }
        assert_eq!(app.hub.active_topics(), total + NODE_TOPICS);
        let calls = commands_over_ticks(&redis, &app, ticks).await;
        // Only the batched check ran: one XREAD per interval for up to 1000 topics. (Before, every
        // interval read every topic: `total` EVALSHAs each.)
        let xread = calls.iter().find(|(n, _)| n == "xread").map_or(0, |c| c.1);
        assert!(
            (ticks..=ticks + 1).contains(&xread),
            "{total} topics: {calls:?}"
        );
        // Besides it, at most the node's presence heartbeat (a script: TIME, ZADD, ZRANGE), due
        // every `presence.node_ttl / 3` whatever the number of present clients: idle clients
        // write nothing.
        let others: Vec<_> = calls
            .iter()
            .filter(|(n, _)| n != "xread" && !PRESENCE_HEARTBEAT.contains(&n.as_str()))
            .collect();
        assert!(others.is_empty(), "{total} topics: {calls:?}");
        let heartbeats = calls
            .iter()
            .find(|(n, _)| n == "evalsha")
            .map_or(0, |c| c.1);
        assert!(heartbeats <= 1, "{total} topics: {calls:?}");
    }
    // And the streams still work: an event on one idle topic arrives.
    let id = app.publish("user.7", "later").await;
    assert_eq!(streams[7].expect().await.id, id);
}

/// Reads `n` events of a multi-topic stream: (topic, stream id, data, type, composite id).
async fn take_enveloped(sse: &mut Sse, n: usize) -> Vec<(String, String, String, String, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let e = sse.expect().await;
        if e.event == "ssegate.gap" {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&e.data).unwrap();
        out.push((
            v["topic"].as_str().unwrap().to_owned(),
            v["id"].as_str().unwrap().to_owned(),
            v["data"].as_str().unwrap().to_owned(),
            e.event.clone(),
            e.id.clone(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_carries_several_topics_and_resumes_them_all() {
    let redis = RedisServer::start().await;
    let app = spawn_app(settings(Some(&redis))).await;
    let a1 = app.publish("a", "a one").await;
    let (status, reply) = app
        .post_json(&serde_json::json!({"topic": "b", "data": "b one", "event": "update"}))
        .await;
    assert_eq!(status, 201);
    let b1 = reply["id"].as_str().unwrap().to_owned();

    // Everything retained, from both topics, each in an envelope naming its topic.
    let mut sse = app.subscribe_with("?topic=b&topic=a", Some("0")).await;
    let mut got = take_enveloped(&mut sse, 2).await;
    got.sort();
    assert_eq!(
        (&got[0].0, &got[0].1, &got[0].2, &got[0].3),
        (
            &"a".to_string(),
            &a1,
            &"a one".to_string(),
            &"message".to_string()
        )
    );
    assert_eq!(
        (&got[1].0, &got[1].1, &got[1].2, &got[1].3),
        (
            &"b".to_string(),
            &b1,
            &"b one".to_string(),
            &"update".to_string()
        )
    );
    assert!(got.iter().all(|e| e.4.starts_with('m')), "composite ids");

    // Live, then a resume elsewhere from the last composite id: exactly what was missed.
    let a2 = app.publish("a", "a two").await;
    let live = take_enveloped(&mut sse, 1).await;
    assert_eq!(live[0].1, a2);
    let cursor = live[0].4.clone();
    drop(sse);
    let b2 = app.publish("b", "b two").await;
    let a3 = app.publish("a", "a three").await;
    let mut resumed = app.subscribe_with("?topic=a&topic=b", Some(&cursor)).await;
    let mut got: Vec<_> = take_enveloped(&mut resumed, 2).await;
    got.sort();
    assert_eq!((got[0].1.clone(), got[1].1.clone()), (a3, b2));
    // The composite id is compact: two topics, a few dozen characters.
    assert!(cursor.len() < 40, "{cursor}");

    // Cursors that do not fit are refused, not guessed at.
    let refused = |query: &str, cursor: &str| {
        let req = app
            .http
            .get(app.url(&format!("/v1/events?{query}")))
            .header("Last-Event-ID", cursor);
        async move {
            let r = req.send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    for (query, bad) in [
        ("topic=a&topic=b", a1.as_str()),
        ("topic=a&topic=c", cursor.as_str()),
        ("topic=a&topic=b", "mAAAA"),
        ("topic=a&topic=b&topic=c", cursor.as_str()),
    ] {
        let (status, body) = refused(query, bad).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_cursor")),
            "{query} {bad}"
        );
    }
    let many: String = (0..65).map(|i| format!("topic=t{i}&")).collect();
    let (status, body) = refused(&many, "0").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("too_many_topics"))
    );
    // Repeats count once: `a` twice is a single-topic stream with plain ids.
    let mut single = app.subscribe_with("?topic=a&topic=a", Some(&a2)).await;
    assert_eq!(single.expect().await.id, newest(&app, "a").await);
}

/// The newest id of a topic's stream.
async fn newest(app: &TestApp, topic: &str) -> String {
    app.hub
        .store()
        .tail(&ssegate::event::Topic::parse(topic).unwrap())
        .await
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_one_topic_leaves_the_others_alone() {
    let redis = RedisServer::start().await;
    let mut s = settings(Some(&redis));
    s.retention.max_events = 3;
    s.retention.approximate = false;
    let app = spawn_app(s).await;
    let mut g = Vec::new();
    for i in 0..6 {
        g.push(app.publish("g", &format!("g{i}")).await);
    }
    let h1 = app.publish("h", "h1").await;
    // g's cursor is trimmed away; h's is its newest event.
    let topics: Vec<Topic> = ["g", "h"]
        .iter()
        .map(|t| Topic::parse(t).unwrap())
        .collect();
    let positions = [g[0].parse().unwrap(), h1.parse().unwrap()];
    let cursor = ssegate::cursor::encode(&topics, &positions);
    let mut sse = app.subscribe_with("?topic=g&topic=h", Some(&cursor)).await;
    let notice = sse.expect().await;
    assert_eq!(notice.event, "ssegate.gap");
    assert!(notice.id.is_empty(), "a notice carries no id");
    let data: serde_json::Value = serde_json::from_str(&notice.data).unwrap();
    assert_eq!(data["topic"], "g");
    assert_eq!(data["reason"], "trimmed");
    assert_eq!(data["cursor"], g[0].as_str());
    assert_eq!(data["resume_from"], g[3].as_str());
    let got = take_enveloped(&mut sse, 3).await;
    let ids: Vec<&str> = got.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(ids, [g[3].as_str(), g[4].as_str(), g[5].as_str()]);
    assert!(got.iter().all(|e| e.0 == "g"));
    // h goes on untouched: its next event, once.
    let h2 = app.publish("h", "h2").await;
    let got = take_enveloped(&mut sse, 1).await;
    assert_eq!((got[0].0.as_str(), got[0].1.as_str()), ("h", h2.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_topic_of_a_stream_needs_the_token() {
    let app = spawn_app(crate::security::secured(None)).await;
    let token = crate::security::hs(&crate::security::grants(&[], &["a", "public.x"], 60));
    let get = |query: &'static str| {
        app.http
            .get(app.url(&format!("/v1/events?{query}")))
            .bearer_auth(&token)
            .send()
    };
    let r = get("topic=a&topic=b").await.unwrap();
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("`b`"), "{body}");
    assert_eq!(get("topic=a&topic=public.x").await.unwrap().status(), 200);
    // An anonymous topic beside a private one still needs the token for the private one.
    let r = app
        .http
        .get(app.url("/v1/events?topic=a&topic=public.news"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seam_is_exact_per_topic_across_nodes_and_reconnects() {
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;
    use std::sync::Arc;

    let seed: u64 = std::env::var("SEAM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("SEAM_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let redis = RedisServer::start().await;
    let mut s = settings(Some(&redis));
    s.retention.max_events = 0;
    // Small pages and a small fan-out buffer exercise paging and the fall-behind path too.
    s.replay_page_size = 7;
    s.fanout_buffer = 16;
    let a = Arc::new(spawn_app(s.clone()).await);
    let b = Arc::new(spawn_app(s).await);
    let nodes = vec![a.url(""), b.url("")];
    const TOPICS: usize = 5;
    const EVENTS: usize = 1000;
    const CLIENTS: usize = 20;
    let names: Vec<String> = (0..TOPICS).map(|i| format!("seam.{i}")).collect();

    // History first: 10 events per topic, so that cursors can point into it.
    let mut history: HashMap<String, Vec<String>> = HashMap::new();
    for name in &names {
        for i in 0..10 {
            let id = a.publish(name, &format!("h{i}")).await;
            history.entry(name.clone()).or_default().push(id);
        }
    }

    // Clients on 2–5 topics each: from now, from everything, or from a composite cursor into the
    // history; some drop their connection every few events and resume on the other node.
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let k = rng.random_range(2..=5);
        let mut mine: Vec<String> = names.clone();
        while mine.len() > k {
            let i = rng.random_range(0..mine.len());
            mine.remove(i);
        }
        mine.sort();
        let query = mine
            .iter()
            .map(|t| format!("topic={t}"))
            .collect::<Vec<_>>()
            .join("&");
        // Per topic, the id after which the client must get everything.
        let (cursor, starts): (Option<String>, Vec<String>) = match c % 3 {
            0 => (None, mine.iter().map(|t| history[t][9].clone()).collect()),
            1 => (Some("0".into()), mine.iter().map(|_| "0".into()).collect()),
            _ => {
                let starts: Vec<String> = mine
                    .iter()
                    .map(|t| history[t][rng.random_range(0..10)].clone())
                    .collect();
                let topics: Vec<Topic> = mine.iter().map(|t| Topic::parse(t).unwrap()).collect();
                let positions: Vec<_> = starts.iter().map(|s| s.parse().unwrap()).collect();
                (Some(ssegate::cursor::encode(&topics, &positions)), starts)
            }
        };
        let drop_every = (c % 2 == 0).then(|| rng.random_range(5..60));
        let mut order = nodes.clone();
        if c % 4 >= 2 {
            order.reverse();
        }
        let mut client = ResumingClient::start_query(order, &query, cursor, drop_every);
        client.wait_connected().await;
        clients.push((mine, starts, client));
    }

    // 1,000 events over the topics, concurrently through both nodes.
    let mut publishers = Vec::new();
    for p in 0..10 {
        let node = if p % 2 == 0 { a.clone() } else { b.clone() };
        let names = names.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (p as u64 + 1));
        publishers.push(tokio::spawn(async move {
            for i in 0..EVENTS / 10 {
                let topic = &names[rng.random_range(0..names.len())];
                node.publish(topic, &format!("p{p}-{i}")).await;
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    let mut truth: HashMap<String, Vec<String>> = HashMap::new();
    for name in &names {
        truth.insert(name.clone(), redis.stream_ids(name).await);
    }

    for (c, (mine, starts, mut client)) in clients.into_iter().enumerate() {
        let expected: Vec<Vec<String>> = mine
            .iter()
            .zip(&starts)
            .map(|(t, start)| {
                let all = &truth[t];
                let from = all.iter().position(|id| id == start).map_or(0, |i| i + 1);
                all[from..].to_vec()
            })
            .collect();
        let lasts: Vec<(String, String)> = mine
            .iter()
            .zip(&expected)
            .filter_map(|(t, e)| Some((t.clone(), e.last()?.clone())))
            .collect();
        let events = client
            .events_when(|all| {
                lasts.iter().all(|(t, last)| {
                    all.iter()
                        .filter(|e| e.event != "ssegate.gap")
                        .any(|e| envelope(e) == (t.clone(), last.clone()))
                })
            })
            .await;
        assert!(
            events.iter().all(|e| e.event != "ssegate.gap"),
            "client {c}: no gap was expected (seed {seed})"
        );
        for (t, want) in mine.iter().zip(&expected) {
            let got: Vec<String> = events
                .iter()
                .map(envelope)
                .filter(|(topic, _)| topic == t)
                .map(|(_, id)| id)
                .collect();
            assert_eq!(&got, want, "client {c}, topic {t} (seed {seed})");
        }
    }
}
