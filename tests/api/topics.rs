//! One topic per user: what idle topics cost Redis.

use std::time::Duration;

use crate::helpers::{settings, spawn_app, RedisServer, Sse, TestApp};

/// Commands Redis runs for the test itself or for connection health, not for topics.
const OVERHEAD: [&str; 4] = ["info", "config", "ping", "client"];

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
        assert_eq!(app.hub.active_topics(), total);
        let calls = commands_over_ticks(&redis, &app, ticks).await;
        // Only the batched check ran: one XREAD per interval for up to 1000 topics. (Before, every
        // interval read every topic: `total` EVALSHAs each.)
        let xread = calls.iter().find(|(n, _)| n == "xread").map_or(0, |c| c.1);
        assert!(
            (ticks..=ticks + 1).contains(&xread),
            "{total} topics: {calls:?}"
        );
        assert_eq!(calls.len(), 1, "{total} topics: {calls:?}");
    }
    // And the streams still work: an event on one idle topic arrives.
    let id = app.publish("user.7", "later").await;
    assert_eq!(streams[7].expect().await.id, id);
}
