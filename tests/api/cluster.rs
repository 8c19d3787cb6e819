//! On a Redis Cluster: sharded pub/sub, fan-out and resume across nodes and slots, acknowledged
//! means replicated, failover, ids after a lost write, and a reshard under load.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use ssegate::config::Settings;

use crate::helpers::{settings, spawn_app, RedisCluster, ResumingClient, TestApp, PATIENCE};

/// Settings for a gateway on `cluster`, reached through `url`, noticing trouble quickly.
fn on_cluster(url: String) -> Settings {
    let mut s = settings(None);
    s.redis_url = Some(url);
    s.redis.connect_timeout = Duration::from_millis(500);
    s.redis.response_timeout = Duration::from_secs(1);
    s.redis.ping_interval = Duration::from_millis(200);
    s
}

/// Topics whose slots are spread over every master: `n` per master.
async fn topics_on_every_master(cluster: &RedisCluster, masters: usize, n: usize) -> Vec<String> {
    let mut per_master = vec![Vec::new(); cluster.nodes.len()];
    for i in 0.. {
        let topic = format!("t.{i}");
        let node = cluster.master_of(&format!("ssegate:{{{topic}}}")).await;
        if per_master[node].len() < n {
            per_master[node].push(topic);
        }
        let full = per_master.iter().filter(|t| t.len() == n).count();
        if full == masters {
            break;
        }
    }
    per_master.into_iter().flatten().collect()
}

async fn shard_subscribers(cluster: &RedisCluster, topic: &str) -> u64 {
    let channel = format!("ssegate:{{{topic}}}:live");
    let master = cluster.master_of(&channel).await;
    let reply: (String, u64) = redis::cmd("PUBSUB")
        .arg("SHARDNUMSUB")
        .arg(&channel)
        .query_async(&mut cluster.nodes[master].conn().await)
        .await
        .unwrap();
    reply.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_fan_out_and_resume_across_all_masters_with_sharded_pubsub() {
    let cluster = RedisCluster::start(3, 0).await;
    // One node is given a single cluster node, the other the seed list.
    let a = spawn_app(on_cluster(cluster.url())).await;
    let b = spawn_app(on_cluster(cluster.seeds())).await;
    let topics = topics_on_every_master(&cluster, 3, 4).await;

    let mut streams = Vec::new();
    for topic in &topics {
        streams.push(a.subscribe(topic, None).await);
    }
    for topic in &topics {
        assert_eq!(shard_subscribers(&cluster, topic).await, 1, "{topic}");
    }
    let mut first_ids = Vec::new();
    for topic in &topics {
        first_ids.push(b.publish(topic, "live").await);
    }
    for (sse, id) in streams.iter_mut().zip(&first_ids) {
        let e = sse.expect().await;
        assert_eq!((e.id.as_str(), e.data.as_str()), (id.as_str(), "live"));
    }

    // Resumed on the other node, from the first event: exactly what came after, in order.
    for (topic, first) in topics.iter().zip(&first_ids) {
        let later = vec![a.publish(topic, "1").await, a.publish(topic, "2").await];
        let mut resumed = b.subscribe(topic, Some(first)).await;
        assert_eq!(resumed.take_ids(2).await, later, "{topic}");
    }

    // Announcements went only to the shard owning each topic.
    assert_eq!(cluster.calls("publish").await, 0, "no classic PUBLISH");
    assert!(cluster.calls("spublish").await >= 3 * topics.len() as u64);

    // A topic nobody watches any more is unsubscribed.
    drop(streams);
    let topic = topics[0].clone();
    a.eventually("the shard subscription to be dropped", async || {
        shard_subscribers(&cluster, &topic).await == 0
    })
    .await;
}

/// A refused publish: its status and `Retry-After` (0 when no answer came).
type Refusal = (u16, Option<String>);

/// Publishes to `topics` in turn, with idempotency keys, retrying refused publishes until each is
/// acknowledged; records the acknowledged ids per topic and every non-201 answer.
struct Publisher {
    acknowledged: Arc<Mutex<Vec<(String, String)>>>,
    refusals: Arc<Mutex<Vec<Refusal>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    fn start(app_urls: Vec<String>, topics: Vec<String>) -> Publisher {
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let refusals = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (acknowledged, refusals, stop) =
                (acknowledged.clone(), refusals.clone(), stop.clone());
            async move {
                let http = reqwest::Client::new();
                let mut n = 0usize;
                while !stop.load(Ordering::Acquire) {
                    let topic = &topics[n % topics.len()];
                    let body = json!({"topic": topic, "data": format!("{n}"), "idempotency_key": format!("k{n}")});
                    loop {
                        let url = &app_urls[n % app_urls.len()];
                        let sent = http
                            .post(format!("{url}/v1/events"))
                            .timeout(Duration::from_secs(10))
                            .json(&body)
                            .send()
                            .await;
                        let Ok(r) = sent else {
                            refusals.lock().unwrap().push((0, None));
                            continue;
                        };
                        let status = r.status().as_u16();
                        let retry_after = r
                            .headers()
                            .get("retry-after")
                            .map(|v| v.to_str().unwrap().to_owned());
                        let reply: serde_json::Value = r.json().await.unwrap_or_default();
                        if status == 201 {
                            let id = reply["id"].as_str().unwrap().to_owned();
                            acknowledged.lock().unwrap().push((topic.clone(), id));
                            break;
                        }
                        eprintln!("publish refused: {status} {reply}");
                        refusals.lock().unwrap().push((status, retry_after));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
        Publisher {
            acknowledged,
            refusals,
            stop,
            task,
        }
    }

    fn count(&self) -> usize {
        self.acknowledged.lock().unwrap().len()
    }

    async fn wait_for(&self, more: usize) {
        let target = self.count() + more;
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.count() < target {
            if tokio::time::Instant::now() > deadline {
                let refusals = self.refusals.lock().unwrap();
                let last: Vec<_> = refusals.iter().rev().take(5).collect();
                panic!(
                    "timed out waiting for publishes: {} acknowledged, {} refusals, the last: {last:?}",
                    self.count(),
                    refusals.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(self) -> (Vec<(String, String)>, Vec<Refusal>) {
        self.stop.store(true, Ordering::Release);
        self.task.await.unwrap();
        let acked = self.acknowledged.lock().unwrap().clone();
        let refused = self.refusals.lock().unwrap().clone();
        (acked, refused)
    }
}

/// Checks every subscriber against the streams: every acknowledged event is in its topic's
/// stream, and every subscriber got exactly the stream's events, in order, with no gap notice.
async fn check_delivery(
    cluster: &RedisCluster,
    acked: &[(String, String)],
    clients: &mut [(String, ResumingClient)],
) {
    for (topic, client) in clients.iter_mut() {
        let stream = cluster.stream_ids("ssegate", topic).await;
        let mine: Vec<&String> = acked
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, id)| id)
            .collect();
        let stored: HashSet<&String> = stream.iter().collect();
        let lost: Vec<&&String> = mine.iter().filter(|id| !stored.contains(**id)).collect();
        assert!(lost.is_empty(), "{topic}: acknowledged but lost: {lost:?}");
        let Some(last) = stream.last() else { continue };
        let got = client.ids_until(last).await;
        assert_eq!(
            got, stream,
            "{topic}: delivered exactly the stream, in order"
        );
    }
}

/// In a cluster too, a topic no node listens to goes unannounced (the nodes' `SHARDNUMSUB`
/// answers added up say so), and a newcomer gets its events from the keyspace notifications of
/// the master owning it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_nobody_listens_to_is_not_announced_in_a_cluster_either() {
    let cluster = RedisCluster::start(3, 0).await;
    // No catch-up net: what the newcomer gets comes from notifications and announcements.
    let quiet = || {
        let mut s = on_cluster(cluster.seeds());
        s.catchup_interval = Duration::from_secs(3600);
        s
    };
    let publisher = spawn_app(quiet()).await;
    let node = spawn_app(quiet()).await;
    // A topic on the last master: not the one the first seed is.
    let topics = topics_on_every_master(&cluster, 3, 1).await;
    let topic = topics.last().expect("a topic per master");
    crate::delivery::a_newcomer_to_an_unheard_topic_misses_nothing(
        &publisher,
        &node,
        topic,
        async || cluster.calls("spublish").await,
    )
    .await;
}

/// A topic nobody listens to whose slot moves to another master, keys and all: the gateway's
/// transaction of `XADD`s goes where the slot was and is refused whole (`MOVED`), and the same
/// events go again through the script, which the client sends where the slot is. Answered
/// 201, stored once; a batch of several events after that is stored once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_to_an_unheard_topic_whose_slot_moved_is_stored_once() {
    let cluster = RedisCluster::start(3, 0).await;
    let app = spawn_app(on_cluster(cluster.seeds())).await;
    let calls = async || {
        let text = crate::ops::scrape(&app.url("/metrics")).await;
        crate::ops::sample(&text, "ssegate_redis_append_calls_total")
    };
    let topic = "moving";
    let mut published = vec![app.publish(topic, "e0").await];
    for i in 1.. {
        assert!(i < 1000, "every publish was announced: never found unheard");
        let announced = cluster.calls("spublish").await;
        published.push(app.publish(topic, &format!("e{i}")).await);
        if cluster.calls("spublish").await == announced {
            break;
        }
    }

    let key = format!("ssegate:{{{topic}}}");
    let from = cluster.master_of(&key).await;
    let to = (0..3).find(|&n| n != from).unwrap();
    let slot = cluster.slot_of(&key).await;
    let (from_id, to_id) = (node_id(&cluster, from).await, node_id(&cluster, to).await);
    let (mut source, mut target) = (
        cluster.nodes[from].conn().await,
        cluster.nodes[to].conn().await,
    );
    let setslot = |state: &str, id: &str| {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
        cmd
    };
    let () = setslot("IMPORTING", &from_id)
        .query_async(&mut target)
        .await
        .unwrap();
    let () = setslot("MIGRATING", &to_id)
        .query_async(&mut source)
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("CLUSTER")
        .arg("GETKEYSINSLOT")
        .arg(slot)
        .arg(1000)
        .query_async(&mut source)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "the topic's stream is in its slot");
    let () = redis::cmd("MIGRATE")
        .arg("127.0.0.1")
        .arg(cluster.nodes[to].port)
        .arg("")
        .arg(0)
        .arg(5000)
        .arg("KEYS")
        .arg(&keys)
        .query_async(&mut source)
        .await
        .unwrap();
    for conn in [&mut target, &mut source] {
        let () = setslot("NODE", &to_id).query_async(conn).await.unwrap();
    }
    assert_eq!(cluster.master_of(&key).await, to, "the slot moved");

    let moved = async || {
        let info: String = redis::cmd("INFO")
            .arg("errorstats")
            .query_async(&mut cluster.nodes[from].conn().await)
            .await
            .unwrap();
        info.contains("errorstat_MOVED")
    };
    assert!(!moved().await);
    let before = calls().await;
    published.push(app.publish(topic, "after the move").await);
    assert!(moved().await, "sent where the slot was");
    assert_eq!(
        calls().await - before,
        2.0,
        "refused where the slot was, then the script where it is"
    );

    let (status, reply) = app
        .post_json(&json!([
            {"topic": topic, "data": "one"},
            {"topic": topic, "data": "two"},
        ]))
        .await;
    assert_eq!(status, 201, "{reply}");
    for id in reply["ids"].as_array().expect("ids") {
        published.push(id.as_str().expect("an id").to_owned());
    }
    assert_eq!(cluster.stream_ids("ssegate", topic).await, published);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_with_min_replicas_ack_loses_nothing_acknowledged() {
    let cluster = RedisCluster::start(3, 1).await;
    let mut s = on_cluster(cluster.url());
    s.redis.min_replicas_ack = 1;
    let a = spawn_app(s.clone()).await;
    s.redis_url = Some(cluster.seeds());
    let b = spawn_app(s).await;
    let topics = topics_on_every_master(&cluster, 3, 2).await;
    let mut clients: Vec<(String, ResumingClient)> = Vec::new();
    for topic in &topics {
        for app in [&a, &b] {
            let mut c = ResumingClient::start(vec![app.url("")], topic, None);
            c.wait_connected().await;
            clients.push((topic.clone(), c));
        }
    }
    let publisher = Publisher::start(vec![a.url(""), b.url("")], topics.clone());
    publisher.wait_for(30).await;

    let victim = cluster
        .master_of(&format!("ssegate:{{{}}}", topics[0]))
        .await;
    let heir = cluster.replica_of(victim).await;
    let mut cluster = cluster;
    cluster.nodes[victim].kill();
    a.eventually("/readyz to report the lost master", async || {
        status(&a, "/readyz").await == 503
    })
    .await;
    cluster.wait_stable().await;
    assert_eq!(
        cluster
            .master_of(&format!("ssegate:{{{}}}", topics[0]))
            .await,
        heir,
        "the replica took over"
    );
    // With min_replicas_ack = 1 the new master's slots take no publish until it has a replica
    // again: the old master comes back as one.
    assert!(cluster.nodes[victim].launch().await);
    cluster.wait_stable().await;
    a.eventually("/readyz to recover", async || {
        status(&a, "/readyz").await == 200
    })
    .await;
    publisher.wait_for(30).await;
    let (acked, refused) = publisher.finish().await;

    for (status, retry_after) in &refused {
        assert_eq!(*status, 503, "refusals during the election are 503");
        assert!(retry_after.is_some(), "with Retry-After");
    }
    check_delivery(&cluster, &acked, &mut clients).await;
    println!(
        "failover: {} acknowledged, {} refused during the election, 0 lost",
        acked.len(),
        refused.len()
    );
}

async fn status(app: &TestApp, path: &str) -> u16 {
    app.http
        .get(app.url(path))
        .timeout(PATIENCE)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// What a stream id says, for comparing ids.
fn id_of(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').expect("a stream id");
    (ms.parse().unwrap(), seq.parse().unwrap())
}

async fn replica_has(cluster: &RedisCluster, replica: usize, topic: &str, id: &str) -> bool {
    let mut conn = cluster.nodes[replica].conn().await;
    let _: () = redis::cmd("READONLY").query_async(&mut conn).await.unwrap();
    let ids: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("ssegate:{{{topic}}}"))
        .arg(id)
        .arg(id)
        .query_async(&mut conn)
        .await
        .unwrap();
    !ids.ids.is_empty()
}

/// With `min_replicas_ack = 0` a failover can lose acknowledged events. A cursor from the lost
/// history is told, and new events never get a lost event's id: the node that delivered them
/// fences the stream past them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_loses_events_is_told_and_reuses_no_id() {
    lossy_failover(None).await
}

/// The same with the promoted replica's clock a minute behind the lost events' ids: without the
/// fence, Redis would give the next event an id just above the last one the replica has, below
/// the lost ones. (libfaketime cannot run Debian's redis-server, so the lost events are the ones
/// a minute ahead: written by a direct `XADD` with such ids, which the node delivers as any.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_replica_with_its_clock_behind_reuses_no_id() {
    lossy_failover(Some(60)).await
}

async fn lossy_failover(replica_clock_behind: Option<u64>) {
    let mut cluster = RedisCluster::start(3, 1).await;
    let app = spawn_app(on_cluster(cluster.seeds())).await;
    let topic = "lossy";
    let master = cluster.master_of("ssegate:{lossy}").await;
    let replica = cluster.replica_of(master).await;
    let mut live = app.subscribe(topic, None).await;
    let kept = app.publish(topic, "kept").await;
    app.eventually("the replica to have the first event", async || {
        replica_has(&cluster, replica, topic, &kept).await
    })
    .await;
    assert_eq!(live.expect().await.id, kept);

    // The replica stops and its link is cut: what the master takes now never reaches it.
    cluster.nodes[replica].pause();
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("replica")
        .query_async(&mut cluster.nodes[master].conn().await)
        .await
        .unwrap();
    let lost = match replica_clock_behind {
        None => vec![
            app.publish(topic, "lost 1").await,
            app.publish(topic, "lost 2").await,
        ],
        Some(seconds) => {
            let (ms, _) = id_of(&kept);
            let ahead = ms + seconds * 1000;
            let mut conn = cluster.nodes[master].conn().await;
            let mut ids = Vec::new();
            for (seq, data) in ["lost 1", "lost 2"].iter().enumerate() {
                let id: String = redis::cmd("XADD")
                    .arg(format!("ssegate:{{{topic}}}"))
                    .arg(format!("{ahead}-{seq}"))
                    .arg("data")
                    .arg(data)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                ids.push(id);
            }
            ids
        }
    };
    assert_eq!(live.take_ids(2).await, lost, "acknowledged and delivered");
    cluster.nodes[master].kill();
    cluster.nodes[replica].resume();
    let _: () = redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .arg("TAKEOVER")
        .query_async(&mut cluster.nodes[replica].conn().await)
        .await
        .unwrap();
    cluster.wait_stable().await;
    assert_eq!(cluster.master_of("ssegate:{lossy}").await, replica);

    // The node notices the lost history and fences the stream past the last id it delivered.
    app.eventually("the stream fenced past the lost events", async || {
        last_generated(&cluster, replica, topic).await >= id_of(&lost[1])
    })
    .await;

    // New events get ids above every lost one, so no id a client saw names another event. The
    // client that saw the lost events has missed nothing: it goes on with them.
    let after = app.publish(topic, "after").await;
    assert!(id_of(&after) > id_of(&lost[1]), "{after} after {lost:?}");
    let e = live.expect().await;
    assert_eq!((e.id.as_str(), e.data.as_str()), (after.as_str(), "after"));
    assert_eq!(
        cluster.stream_ids("ssegate", topic).await,
        [kept.clone(), after.clone()]
    );

    // A cursor from the lost history is told too, then gets what exists after it.
    let mut resumed = app.subscribe(topic, Some(&lost[0])).await;
    let notice = resumed.expect().await;
    assert_eq!(notice.event, "ssegate.gap");
    let data: serde_json::Value = serde_json::from_str(&notice.data).unwrap();
    assert_eq!(data["reason"], "unknown_cursor");
    assert_eq!(resumed.take_ids(2).await, [kept, after]);
}

/// The stream's last generated id on `node`, `(0, 0)` without a stream.
async fn last_generated(cluster: &RedisCluster, node: usize, topic: &str) -> (u64, u64) {
    let info: redis::RedisResult<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(format!("ssegate:{{{topic}}}"))
        .query_async(&mut cluster.nodes[node].conn().await)
        .await;
    match info.ok().and_then(|i| i.get("last-generated-id").cloned()) {
        Some(redis::Value::BulkString(id)) => id_of(std::str::from_utf8(&id).unwrap()),
        _ => (0, 0),
    }
}

/// Node ids, for `redis-cli --cluster reshard`.
async fn node_id(cluster: &RedisCluster, node: usize) -> String {
    redis::cmd("CLUSTER")
        .arg("MYID")
        .query_async(&mut cluster.nodes[node].conn().await)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reshard_under_load_loses_and_repeats_nothing() {
    let cluster = RedisCluster::start(3, 0).await;
    let a = spawn_app(on_cluster(cluster.url())).await;
    let b = spawn_app(on_cluster(cluster.seeds())).await;
    let topics = topics_on_every_master(&cluster, 3, 3).await;
    let mut clients: Vec<(String, ResumingClient)> = Vec::new();
    for topic in &topics {
        for app in [&a, &b] {
            let mut c = ResumingClient::start(vec![app.url("")], topic, None);
            c.wait_connected().await;
            clients.push((topic.clone(), c));
        }
    }
    let publisher = Publisher::start(vec![a.url(""), b.url("")], topics.clone());
    publisher.wait_for(30).await;

    // Every slot of the first master moves to the second, keys and all, while publishing.
    let from = cluster
        .master_of(&format!("ssegate:{{{}}}", topics[0]))
        .await;
    let to = (0..3).find(|&n| n != from).unwrap();
    let moved: Vec<&String> = {
        let mut m = Vec::new();
        for t in &topics {
            if cluster.master_of(&format!("ssegate:{{{t}}}")).await == from {
                m.push(t);
            }
        }
        m
    };
    let resharded = tokio::process::Command::new("redis-cli")
        .args([
            "--cluster",
            "reshard",
            &format!("127.0.0.1:{}", cluster.nodes[from].port),
        ])
        .args(["--cluster-from", &node_id(&cluster, from).await])
        .args(["--cluster-to", &node_id(&cluster, to).await])
        .args(["--cluster-slots", &cluster.slots_of(from).await.to_string()])
        .arg("--cluster-yes")
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(resharded.success());
    cluster.wait_stable().await;
    for t in &moved {
        assert_eq!(
            cluster.master_of(&format!("ssegate:{{{t}}}")).await,
            to,
            "{t} moved"
        );
    }
    publisher.wait_for(30).await;
    let (acked, refused) = publisher.finish().await;
    for (status, _) in &refused {
        assert_eq!(*status, 503, "refusals during the move are 503");
    }
    check_delivery(&cluster, &acked, &mut clients).await;
    println!(
        "reshard: {} topics moved, {} acknowledged, {} refused during the move, 0 lost",
        moved.len(),
        acked.len(),
        refused.len()
    );
}
