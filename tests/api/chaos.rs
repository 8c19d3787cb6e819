//! The chaos run: the multi-node test bed (`scripts/testbed.sh`: Redis with AOF, three nodes,
//! HAProxy) under a steady publish load, while nodes are SIGKILLed or drained and Redis is
//! killed and restarted at random. Subscribers and publishers go through the load balancer only.
//! At the end every subscriber's ids are checked against the stream read from Redis; Mercure
//! subscribers (`*`, a template, an exact topic) against the hub's log.
//!
//! `CHAOS_SECONDS` sets the length (60 by default; `scripts/chaos.sh --seconds N` for longer).

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{json, Value};

use crate::helpers::{envelope, stream_ids, ResumingClient};

const TOPIC: &str = "chaos";
/// A second topic, read together with the first by the multi-topic subscribers.
const SIDE: &str = "chaos.side";

/// The bed, stopped on drop.
struct TestBed {
    dir: tempfile::TempDir,
    port: u16,
    /// The nodes' `redis.min_replicas_ack`.
    min_replicas_ack: u32,
    /// The nodes serve TLS, passed through by HAProxy.
    tls: bool,
}

impl TestBed {
    fn start() -> TestBed {
        Self::start_with(false, 0, false)
    }

    fn start_with(cluster: bool, min_replicas_ack: u32, tls: bool) -> TestBed {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port_run(if cluster { 11 } else { 5 });
        let bed = TestBed {
            dir,
            port,
            min_replicas_ack,
            tls,
        };
        let mut start = vec!["start"];
        if cluster {
            start.push("--cluster");
        }
        if tls {
            start.push("--tls");
        }
        let out = bed.script(&start);
        assert!(
            out.status.success(),
            "testbed start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if tls {
            let ca = std::fs::read_to_string(bed.dir.path().join("tls/ca.pem")).unwrap();
            crate::helpers::trust(&ca);
        }
        bed
    }

    fn script(&self, args: &[&str]) -> std::process::Output {
        Command::new(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/testbed.sh"))
            .args(args)
            .env("TESTBED_DIR", self.dir.path())
            .env("TESTBED_PORT", self.port.to_string())
            .env("TESTBED_BIN", env!("CARGO_BIN_EXE_ssegate"))
            // Keep everything: the check compares against the whole stream.
            .env("SSEGATE_RETENTION__MAX_EVENTS", "0")
            .env("SSEGATE_SHUTDOWN_TIMEOUT", "3s")
            .env("SSEGATE_SHUTDOWN_RETRY_SPREAD", "1s")
            .env("SSEGATE_RETRY", "100ms")
            .env("SSEGATE_REDIS__RESPONSE_TIMEOUT", "1s")
            .env("SSEGATE_REDIS__PING_INTERVAL", "200ms")
            .env(
                "SSEGATE_REDIS__MIN_REPLICAS_ACK",
                self.min_replicas_ack.to_string(),
            )
            .output()
            .unwrap()
    }

    fn run(&self, args: &[&str]) {
        let out = self.script(args);
        assert!(
            out.status.success(),
            "testbed {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port + 1)
    }

    /// The cluster's nodes (test bed ports 5-10).
    fn cluster_urls(&self) -> Vec<String> {
        (5..=10)
            .map(|i| format!("redis://127.0.0.1:{}/0", self.port + i))
            .collect()
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        let _ = self.script(&["stop"]);
    }
}

/// The first of `n` consecutive free loopback ports, outside the ephemeral range. Each Redis Cluster node also listens on its
/// port + 10000 (the cluster bus), so those must be free too: ports 5 and up of the run are
/// cluster nodes when there are more than five.
fn free_port_run(n: u16) -> u16 {
    let mut rng = rand::rng();
    loop {
        // Below the kernel's ephemeral range (32768 and up by default), bus ports included:
        // the bed takes seconds to start, and meanwhile any outgoing connection of the other
        // tests could be given one of its ports.
        let base: u16 = rng.random_range(10_000..22_000);
        let ports = (0..n).chain((5..n).map(|i| i + 10_000));
        let held: Vec<_> = ports
            .clone()
            .map_while(|i| TcpListener::bind(("127.0.0.1", base + i)).ok())
            .collect();
        if held.len() == ports.count() {
            return base;
        }
    }
}

/// Publishes through the load balancer until told to stop, each event with its own
/// idempotency key, retrying refused or failed attempts with the same key.
async fn publish_until(
    lb: String,
    publisher: usize,
    topic: &'static str,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(&'static str, String)>>>,
) -> usize {
    let http = crate::helpers::http_client_builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut retries = 0;
    for i in 0.. {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let body = json!({"topic": topic, "data": format!("p{publisher}-{i}"), "idempotency_key": format!("p{publisher}-{i}")});
        loop {
            let reply = http
                .post(format!("{lb}/v1/events"))
                .json(&body)
                .send()
                .await;
            if let Ok(r) = reply {
                if r.status() == 201 {
                    let v: Value = r.json().await.unwrap();
                    acked
                        .lock()
                        .unwrap()
                        .push((topic, v["id"].as_str().unwrap().to_owned()));
                    break;
                }
            }
            retries += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    retries
}

/// Topics of the Mercure publisher: `https://example.com/chaos/<n>`.
const MERCURE_TOPICS: usize = 3;
/// Selectors of the Mercure subscribers: every topic, a template matching every chaos topic, one
/// topic exactly.
const MERCURE_SELECTORS: [&str; 3] = [
    "*",
    "https://example.com/chaos/{n}",
    "https://example.com/chaos/1",
];

/// Publishes Mercure updates through the load balancer until told to stop, each with its own
/// id, retrying refused or failed attempts with the same id (which makes the retry safe).
async fn publish_mercure_until(
    lb: String,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
) -> usize {
    let http = crate::helpers::http_client_builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut retries = 0;
    for i in 0.. {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let id = format!("urn:chaos:{i}");
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair(
                "topic",
                &format!("https://example.com/chaos/{}", i % MERCURE_TOPICS),
            )
            .append_pair("id", &id)
            .append_pair("data", &format!("update {i}"))
            .finish();
        loop {
            let reply = http
                .post(format!("{lb}/.well-known/mercure"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body.clone())
                .send()
                .await;
            if let Ok(r) = reply {
                if r.status() == 200 {
                    assert_eq!(r.text().await.unwrap(), id);
                    acked.lock().unwrap().push(id);
                    break;
                }
            }
            retries += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    retries
}

/// The Mercure log as Redis holds it: each update's id and canonical topic, in order.
async fn mercure_log(redis_url: &str) -> Vec<(String, String)> {
    let client = redis::Client::open(redis_url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    mercure_updates(read_mercure_log(&mut conn).await)
}

/// The same through a Redis Cluster, whichever nodes are up.
async fn cluster_mercure_log(seeds: Vec<String>) -> Vec<(String, String)> {
    let mut conn = redis::cluster::ClusterClient::new(seeds)
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    mercure_updates(read_mercure_log(&mut conn).await)
}

async fn read_mercure_log(
    conn: &mut impl redis::aio::ConnectionLike,
) -> redis::streams::StreamRangeReply {
    redis::cmd("XRANGE")
        .arg("ssegate:{mercure updates}")
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap()
}

fn mercure_updates(reply: redis::streams::StreamRangeReply) -> Vec<(String, String)> {
    reply
        .ids
        .iter()
        .map(|entry| {
            let data: String = entry.get("data").expect("an update's data");
            let update: Value = serde_json::from_str(&data).unwrap();
            (
                update["i"].as_str().expect("a publisher's id").to_owned(),
                update["t"][0].as_str().expect("a topic").to_owned(),
            )
        })
        .collect()
}

/// Mercure subscribers with `*`, template and exact selectors, through the load balancer, from
/// the beginning of the log.
fn mercure_subscribers(lb: &str) -> Vec<(&'static str, ResumingClient)> {
    MERCURE_SELECTORS
        .iter()
        .map(|selector| {
            let path = format!(
                "/.well-known/mercure?{}",
                form_urlencoded::Serializer::new(String::new())
                    .append_pair("topic", selector)
                    .finish()
            );
            let client = ResumingClient::start_path(
                vec![lb.to_owned()],
                &path,
                Some("earliest".into()),
                None,
            );
            (*selector, client)
        })
        .collect()
}

/// Checks every Mercure subscriber against the log: exactly the updates its selector matches,
/// in order. Adds to `total`; returns how many acknowledged updates the log does not have.
async fn check_mercure(
    log: &[(String, String)],
    acked: &[String],
    subscribers: &mut [(&str, ResumingClient)],
    total: &mut Tally,
) -> usize {
    let position: HashMap<&str, usize> = log
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (id.as_str(), i))
        .collect();
    assert_eq!(position.len(), log.len(), "each update stored once");
    let lost = acked
        .iter()
        .filter(|id| !position.contains_key(id.as_str()))
        .count();
    for (selector, client) in subscribers.iter_mut() {
        let exact = selector.starts_with("https://") && !selector.contains('{');
        let expected: Vec<String> = log
            .iter()
            .filter(|(_, topic)| !exact || topic == selector)
            .map(|(id, _)| id.clone())
            .collect();
        let last = expected.last().expect("updates were published").clone();
        let (got, complete) = client.ids_within(&last, Duration::from_secs(30)).await;
        let t = tally(&got, &expected, &position);
        println!(
            "mercure subscriber {selector}: {} received, complete: {complete}, {t:?}",
            got.len()
        );
        total.add(&t);
    }
    println!(
        "chaos: mercure: {} updates acknowledged, {} in the log, acknowledged but missing {lost}",
        acked.len(),
        log.len()
    );
    lost
}

#[derive(Default, Debug)]
struct Tally {
    lost: usize,
    duplicated: usize,
    reordered: usize,
    gaps: usize,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.gaps += other.gaps;
    }
}

/// Compares what a subscriber received with what it should have: `expected`, in stream order.
fn tally(received: &[String], expected: &[String], position: &HashMap<&str, usize>) -> Tally {
    let mut t = Tally::default();
    let mut seen = HashSet::new();
    let mut last = None;
    for id in received {
        if id == "ssegate.gap" {
            t.gaps += 1;
            continue;
        }
        if !seen.insert(id.as_str()) {
            t.duplicated += 1;
        }
        let pos = position.get(id.as_str()).copied();
        if let (Some(p), Some(l)) = (pos, last) {
            if p < l {
                t.reordered += 1;
            }
        }
        last = pos.or(last);
    }
    t.lost = expected
        .iter()
        .filter(|id| !seen.contains(id.as_str()))
        .count();
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_loses_duplicates_and_reorders_nothing() {
    let seconds: u64 = seconds_from("CHAOS_SECONDS", 60);
    run_chaos(Arc::new(TestBed::start()), seconds).await;
}

/// The same run with the nodes serving TLS themselves and HAProxy passing TLS through (`mode
/// tcp`, deploy/haproxy-tls.cfg): every client speaks HTTP/2 to a node, through node kills,
/// drains and Redis restarts. `CHAOS_TLS_SECONDS` sets the length (30 by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_through_tls_loses_duplicates_and_reorders_nothing() {
    let seconds: u64 = seconds_from("CHAOS_TLS_SECONDS", 30);
    run_chaos(Arc::new(TestBed::start_with(false, 0, true)), seconds).await;
}

/// A run's length: the variable `name` if set, else `default` seconds.
fn seconds_from(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Publishes and subscribes through the bed's load balancer while nodes and Redis are killed,
/// drained and restarted at random for `seconds`, then checks every subscriber against the
/// streams in Redis: nothing lost, duplicated or reordered, no gap notice.
async fn run_chaos(bed: Arc<TestBed>, seconds: u64) {
    let lb = bed.url();

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    // Two publishers on the main topic, one on a side topic.
    let publishers: Vec<_> = [TOPIC, TOPIC, SIDE]
        .into_iter()
        .enumerate()
        .map(|(p, topic)| {
            tokio::spawn(publish_until(
                lb.clone(),
                p,
                topic,
                stop.clone(),
                acked.clone(),
            ))
        })
        .collect();
    // And two subscribers reading both topics on one connection, with one composite cursor.
    let both = format!("topic={TOPIC}&topic={SIDE}");
    let mut multi: Vec<ResumingClient> = (0..2)
        .map(|_| ResumingClient::start_query(vec![lb.clone()], &both, Some("0".into()), None))
        .collect();
    // A Mercure publisher, and Mercure subscribers with `*`, template and exact selectors.
    let mercure_acked = Arc::new(Mutex::new(Vec::new()));
    let mercure_publisher = tokio::spawn(publish_mercure_until(
        lb.clone(),
        stop.clone(),
        mercure_acked.clone(),
    ));
    let mut mercure = mercure_subscribers(&lb);
    let mut subscribers: Vec<(Option<String>, ResumingClient)> = (0..6)
        .map(|_| {
            (
                Some("0".to_string()),
                ResumingClient::start(vec![lb.clone()], TOPIC, Some("0".into())),
            )
        })
        .collect();

    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut actions: HashMap<&str, usize> = HashMap::new();
    let mut late_joined = false;
    while Instant::now() < deadline {
        let pause = Duration::from_millis(rand::rng().random_range(1500..3500));
        tokio::time::sleep(pause).await;
        if !late_joined && Instant::now() > started + Duration::from_secs(seconds / 2) {
            // Late joiners, resuming from an id acknowledged mid-run.
            let cursor = acked
                .lock()
                .unwrap()
                .iter()
                .rev()
                .find(|(topic, _)| *topic == TOPIC)
                .map(|(_, id)| id.clone());
            for _ in 0..2 {
                subscribers.push((
                    cursor.clone(),
                    ResumingClient::start(vec![lb.clone()], TOPIC, cursor.clone()),
                ));
            }
            late_joined = true;
        }
        let node = rand::rng().random_range(1..=3).to_string();
        let bed = bed.clone();
        // Every kind once first, so even a short run proves each; then at random.
        let done: usize = actions.values().sum();
        let choice = if done < 3 {
            done
        } else {
            rand::rng().random_range(0..3)
        };
        let name = tokio::task::spawn_blocking(move || match choice {
            0 => {
                bed.run(&["kill-node", &node]);
                std::thread::sleep(Duration::from_millis(500));
                bed.run(&["start-node", &node]);
                "node SIGKILL"
            }
            1 => {
                let drain = Instant::now();
                bed.run(&["term-node", &node]);
                assert!(
                    drain.elapsed() < Duration::from_secs(8),
                    "drain took {:?}",
                    drain.elapsed()
                );
                bed.run(&["start-node", &node]);
                "node SIGTERM"
            }
            _ => {
                bed.run(&["kill-redis"]);
                std::thread::sleep(Duration::from_millis(1000));
                bed.run(&["start-redis"]);
                "redis SIGKILL + restart"
            }
        })
        .await
        .unwrap();
        *actions.entry(name).or_default() += 1;
    }
    stop.store(true, Ordering::Release);
    let mut retries = 0;
    for p in publishers {
        retries += p.await.unwrap();
    }
    retries += mercure_publisher.await.unwrap();

    // Ground truth: the streams as Redis holds them.
    let stream = stream_ids(&bed.redis_url(), TOPIC).await;
    let side = stream_ids(&bed.redis_url(), SIDE).await;
    let acked = acked.lock().unwrap().clone();
    let position: HashMap<&str, usize> = stream
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let side_position: HashMap<&str, usize> = side
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let acked_lost = acked
        .iter()
        .filter(|(topic, id)| {
            let stored = if *topic == TOPIC {
                &position
            } else {
                &side_position
            };
            !stored.contains_key(id.as_str())
        })
        .count();
    let acked_unique: HashSet<&(&str, String)> = acked.iter().collect();
    let last = stream.last().expect("events were published").clone();

    let mut total = Tally::default();
    for (i, (cursor, client)) in subscribers.iter_mut().enumerate() {
        let (got, complete) = client.ids_within(&last, Duration::from_secs(30)).await;
        let from = match cursor.as_deref() {
            Some("0") | None => 0,
            Some(c) => position[c] + 1,
        };
        let t = tally(&got, &stream[from..], &position);
        println!(
            "subscriber {i}: {} received, complete: {complete}, {t:?}",
            got.len()
        );
        total.add(&t);
    }
    for (i, client) in multi.iter_mut().enumerate() {
        let lasts = [
            (TOPIC.to_owned(), last.clone()),
            (SIDE.to_owned(), side.last().expect("side events").clone()),
        ];
        let events = client
            .events_when(|all| {
                lasts.iter().all(|l| {
                    all.iter()
                        .filter(|e| e.event != "ssegate.gap")
                        .any(|e| envelope(e) == *l)
                })
            })
            .await;
        let gaps = events.iter().filter(|e| e.event == "ssegate.gap").count();
        for (topic, truth, pos) in [(TOPIC, &stream, &position), (SIDE, &side, &side_position)] {
            let got: Vec<String> = events
                .iter()
                .filter(|e| e.event != "ssegate.gap")
                .map(envelope)
                .filter(|(t, _)| t == topic)
                .map(|(_, id)| id)
                .collect();
            let t = tally(&got, truth, pos);
            println!(
                "multi-topic subscriber {i}, {topic}: {} received, {t:?}",
                got.len()
            );
            total.lost += t.lost;
            total.duplicated += t.duplicated;
            total.reordered += t.reordered;
        }
        total.gaps += gaps;
    }
    // Mercure: every subscriber gets exactly the log's updates its selector matches, in order.
    let log = mercure_log(&bed.redis_url()).await;
    let mercure_acked = mercure_acked.lock().unwrap().clone();
    let mercure_lost = check_mercure(&log, &mercure_acked, &mut mercure, &mut total).await;
    assert!(!mercure_acked.is_empty(), "mercure updates were published");
    assert_eq!(mercure_lost, 0, "acknowledged updates are all in Redis");

    let kills: usize = actions.values().sum();
    println!(
        "chaos: {}s, {kills} disruptions {actions:?}, {} events acknowledged ({} publish retries), \
         {} subscribers (and {} on both topics): lost {} / duplicated {} / reordered {} (gap notices {}, acknowledged but missing from Redis {})",
        started.elapsed().as_secs(),
        acked.len(),
        retries,
        subscribers.len(),
        multi.len(),
        total.lost,
        total.duplicated,
        total.reordered,
        total.gaps,
        acked_lost,
    );
    assert!(kills >= 1 && !acked.is_empty(), "the run did something");
    assert_eq!(
        acked_unique.len(),
        acked.len(),
        "each publish acknowledged once, with its own id"
    );
    assert_eq!(acked_lost, 0, "acknowledged events are all in Redis");
    assert_eq!(
        (total.lost, total.duplicated, total.reordered, total.gaps),
        (0, 0, 0, 0)
    );
}

/// Topics for the cluster run: enough that their slots fall on every master.
const CLUSTER_TOPICS: [&str; 9] = [
    "c.0", "c.1", "c.2", "c.3", "c.4", "c.5", "c.6", "c.7", "c.8",
];

/// A stream's ids read through the cluster, whichever nodes are up.
async fn cluster_stream_ids(seeds: Vec<String>, topic: &str) -> Vec<String> {
    let mut conn = redis::cluster::ClusterClient::new(seeds)
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    let page: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("ssegate:{{{topic}}}"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    page.ids.into_iter().map(|e| e.id).collect()
}

/// The chaos run on a Redis Cluster with `min_replicas_ack = 1`: masters are killed (their
/// replicas take over) and come back as replicas, gateway nodes are killed, and one master's
/// slots all move to another while topics over every master are published to and read.
/// `CHAOS_CLUSTER_SECONDS` sets the length (30 by default).
///
/// `CHAOS_CLUSTER_MIN_REPLICAS_ACK=0` runs it without waiting for replicas: an acknowledged
/// event may then be lost in a failover. The run reports how many were, and checks that no loss
/// is silent: a subscriber that received an event the stream no longer has is sent a gap notice
/// after it, and misses nothing the stream has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_a_cluster_loses_duplicates_and_reorders_nothing() {
    let seconds: u64 = seconds_from("CHAOS_CLUSTER_SECONDS", 30);
    let min_replicas_ack: u32 = std::env::var("CHAOS_CLUSTER_MIN_REPLICAS_ACK")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let bed = Arc::new(TestBed::start_with(true, min_replicas_ack, false));
    let lb = bed.url();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let publishers: Vec<_> = CLUSTER_TOPICS
        .into_iter()
        .enumerate()
        .map(|(p, topic)| {
            tokio::spawn(publish_until(
                lb.clone(),
                p,
                topic,
                stop.clone(),
                acked.clone(),
            ))
        })
        .collect();
    let mercure_acked = Arc::new(Mutex::new(Vec::new()));
    let mercure_publisher = tokio::spawn(publish_mercure_until(
        lb.clone(),
        stop.clone(),
        mercure_acked.clone(),
    ));
    let mut mercure = mercure_subscribers(&lb);
    let mut subscribers: Vec<(&str, ResumingClient)> = CLUSTER_TOPICS
        .iter()
        .map(|&t| {
            (
                t,
                ResumingClient::start(vec![lb.clone()], t, Some("0".into())),
            )
        })
        .collect();

    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut actions: HashMap<&str, usize> = HashMap::new();
    while Instant::now() < deadline || actions.len() < 3 {
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(1000..2500))).await;
        // Each kind once first (the reshard only once), then masters and nodes at random.
        let choice = match actions.len() {
            n @ 0..=2 if !actions.contains_key(["master", "node", "reshard"][n]) => n,
            _ => rand::rng().random_range(0..2),
        };
        let node = rand::rng().random_range(1..=3).to_string();
        let bed = bed.clone();
        let name = tokio::task::spawn_blocking(move || match choice {
            0 => {
                bed.run(&["kill-master"]);
                bed.run(&["start-redis-nodes"]);
                "master"
            }
            1 => {
                bed.run(&["kill-node", &node]);
                std::thread::sleep(Duration::from_millis(300));
                bed.run(&["start-node", &node]);
                "node"
            }
            _ => {
                bed.run(&["reshard"]);
                "reshard"
            }
        })
        .await
        .unwrap();
        *actions.entry(name).or_default() += 1;
    }
    stop.store(true, Ordering::Release);
    let mut retries = 0;
    for p in publishers {
        retries += p.await.unwrap();
    }
    retries += mercure_publisher.await.unwrap();

    let acked = acked.lock().unwrap().clone();
    let mut total = Tally::default();
    let mut acked_lost = 0;
    let log = cluster_mercure_log(bed.cluster_urls()).await;
    let mercure_acked = mercure_acked.lock().unwrap().clone();
    acked_lost += check_mercure(&log, &mercure_acked, &mut mercure, &mut total).await;
    // Received events the stream no longer has (lost in a failover), and those of them that no
    // gap notice followed.
    let (mut seen_lost, mut untold) = (0, 0);
    for (topic, client) in subscribers.iter_mut() {
        let stream = cluster_stream_ids(bed.cluster_urls(), topic).await;
        let position: HashMap<&str, usize> = stream
            .iter()
            .enumerate()
            .map(|(i, id)| (id.as_str(), i))
            .collect();
        acked_lost += acked
            .iter()
            .filter(|(t, id)| t == topic && !position.contains_key(id.as_str()))
            .count();
        let last = stream.last().expect("events were published").clone();
        let (got, complete) = client.ids_within(&last, Duration::from_secs(30)).await;
        let t = tally(&got, &stream, &position);
        for (i, id) in got.iter().enumerate() {
            if id != "ssegate.gap" && !position.contains_key(id.as_str()) {
                seen_lost += 1;
                if !got[i..].iter().any(|g| g == "ssegate.gap") {
                    untold += 1;
                }
            }
        }
        println!(
            "{topic}: {} received, complete: {complete}, {t:?}",
            got.len()
        );
        total.add(&t);
    }
    println!(
        "chaos on a cluster (min_replicas_ack {min_replicas_ack}): {}s, {actions:?}, {} events acknowledged \
         ({} publish retries) on {} topics: lost {} / duplicated {} / reordered {} (gap notices {}, \
         acknowledged but missing from Redis {acked_lost}, received by a subscriber and then lost \
         {seen_lost}, of which followed by no gap notice {untold})",
        started.elapsed().as_secs(),
        acked.len(),
        retries,
        CLUSTER_TOPICS.len(),
        total.lost,
        total.duplicated,
        total.reordered,
        total.gaps,
    );
    if min_replicas_ack == 0 {
        // Losses may happen, but none untold, and nothing the stream kept is missed.
        assert_eq!(
            untold, 0,
            "every lost event a subscriber saw is followed by a gap notice"
        );
        assert_eq!((total.lost, total.duplicated, total.reordered), (0, 0, 0));
        return;
    }
    assert_eq!(acked_lost, 0, "acknowledged events are all in Redis");
    assert_eq!(
        (total.lost, total.duplicated, total.reordered, total.gaps),
        (0, 0, 0, 0)
    );
}
