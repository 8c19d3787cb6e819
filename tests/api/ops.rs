//! What operators meet: large batches against Redis's pub/sub buffer limits.

use serde_json::{json, Value};

use crate::helpers::{settings, spawn_app, RedisServer, NODE_TOPICS};

/// The ids of Redis's pub/sub connections: a connection Redis dropped and the gateway opened
/// again has a new id.
async fn pubsub_connections(redis: &RedisServer) -> Vec<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    let mut ids: Vec<String> = list
        .lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_batch_keeps_every_node_subscribed_and_delivers_everything() {
    let redis = RedisServer::start().await;
    let a = spawn_app(settings(Some(&redis))).await;
    let b = spawn_app(settings(Some(&redis))).await;
    let mut on_a = a.subscribe("big", None).await;
    let mut on_b = b.subscribe("big", None).await;
    a.eventually("both nodes listen to the topic", async || {
        let counts: (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("ssegate:{big}:live")
            .query_async(&mut redis.conn().await)
            .await
            .unwrap();
        counts.1 == 2
    })
    .await;
    let before = pubsub_connections(&redis).await;
    assert_eq!(before.len(), 2, "one subscription connection per node");

    // 1,000 events of 60 KB: 60 MB, twice Redis's hard pub/sub limit if announced whole.
    let payload = "x".repeat(60_000);
    let batch: Vec<Value> = (0..1000)
        .map(|i| json!({"topic": "big", "data": format!("{i:04}{payload}")}))
        .collect();
    let (status, reply) = a.post_json(&Value::Array(batch)).await;
    assert_eq!(status, 201, "{reply}");
    let ids: Vec<String> = reply["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    for sse in [&mut on_a, &mut on_b] {
        let got = sse.take(1000).await;
        assert_eq!(got.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), ids);
        assert!(got[999].data.starts_with("0999x"));
        assert_eq!(got[999].data.len(), 60_004);
    }
    // Nobody was dropped for its output buffer, and every node stayed ready.
    assert_eq!(pubsub_connections(&redis).await, before);
    for node in [&a, &b] {
        let r = node.http.get(node.url("/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
}

/// The value of one sample in a `/metrics` text (`name` with its labels, as written), or 0.
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.split(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// A `/metrics` text, checked to be OpenMetrics.
pub async fn scrape(url: &str) -> String {
    let r = reqwest::get(url).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    r.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_the_gateway_is_used() {
    let redis = RedisServer::start().await;
    let app = spawn_app(settings(Some(&redis))).await;
    let url = app.url("/metrics");
    let before = scrape(&url).await;
    assert_eq!(sample(&before, "ssegate_open_streams"), 0.0);
    assert!(before.contains("ssegate_build_info{version=\""));

    app.publish("m", "one").await;
    let (status, _) = app
        .post_json(&json!([{"topic": "m", "data": "two"}, {"topic": "m", "data": "three"}]))
        .await;
    assert_eq!(status, 201);
    let (status, _) = app
        .post_json(&json!({"topic": "bad topic", "data": "x"}))
        .await;
    assert_eq!(status, 400);
    let mut sse = app.subscribe("m", Some("0")).await;
    sse.take(3).await;
    let mut future = app.subscribe("m", Some("99999999999999-0")).await;
    assert_eq!(future.expect().await.event, "ssegate.gap");

    let now = scrape(&url).await;
    let acked = "ssegate_publish_requests_total{result=\"acknowledged\"}";
    let refused = "ssegate_publish_requests_total{result=\"refused\"}";
    assert_eq!(sample(&now, acked), 2.0, "{now}");
    assert_eq!(sample(&now, refused), 1.0);
    assert_eq!(sample(&now, "ssegate_events_published_total"), 3.0);
    assert_eq!(sample(&now, "ssegate_publish_duration_seconds_count"), 3.0);
    assert_eq!(sample(&now, "ssegate_open_streams"), 2.0);
    // The topic read, and the node's control topic.
    assert_eq!(
        sample(&now, "ssegate_active_topics"),
        1.0 + NODE_TOPICS as f64
    );
    assert!(sample(&now, "ssegate_deliveries_total") >= 3.0);
    assert!(sample(&now, "ssegate_replay_reads_total{source=\"store\"}") >= 1.0);
    assert_eq!(
        sample(&now, "ssegate_gaps_total{reason=\"unknown_cursor\"}"),
        1.0
    );
    assert!(sample(&now, "ssegate_redis_command_duration_seconds_count") >= 3.0);
    assert_eq!(
        sample(&now, "ssegate_redis_connected{connection=\"command\"}"),
        1.0
    );
    assert_eq!(
        sample(&now, "ssegate_redis_connected{connection=\"subscription\"}"),
        1.0
    );
    assert!(sample(&now, "ssegate_open_connections") >= 2.0);

    drop((sse, future));
    app.eventually("closed streams are counted out", async || {
        sample(&scrape(&url).await, "ssegate_open_streams") == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_counted_by_reason_and_metrics_can_move_off_the_public_port() {
    let mut s = crate::security::secured(None);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    s.metrics_listen = Some(port);
    let app = spawn_app(s).await;
    // Not on the public port any more.
    let r = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    for token in [None, Some("not-a-jwt")] {
        let mut req = app.http.get(app.url("/v1/events?topic=private"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        assert_eq!(req.send().await.unwrap().status(), 401);
    }
    let text = scrape(&format!("http://{port}/metrics")).await;
    assert_eq!(
        sample(&text, "ssegate_auth_failures_total{reason=\"missing\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "ssegate_auth_failures_total{reason=\"malformed\"}"),
        1.0
    );
}

#[test]
fn every_metric_the_dashboard_shows_exists() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let exposed = ssegate::metrics::Metrics::new().render();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("ssegate_"))
            {
                // Histograms' series and counters' samples are named from their family's.
                let base = name.trim_end_matches("_bucket").trim_end_matches("_total");
                assert!(
                    exposed.contains(&format!("# TYPE {base} ")),
                    "the dashboard queries {name}, which /metrics does not have"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 16, "{checked}");
}
