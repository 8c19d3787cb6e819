//! What operators meet: large batches against Redis's pub/sub buffer limits.

use serde_json::{json, Value};

use crate::helpers::{settings, spawn_app, RedisServer};

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
