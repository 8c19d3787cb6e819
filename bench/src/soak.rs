//! `soak`: churn for a long time, with idle checkpoints, to find what grows with uptime rather
//! than with load.
//!
//! Between checkpoints, `connections` clients come and go on the nodes (each lives 1–15 s on
//! one to three topics, a third resuming from the last id they saw, a third of them reading
//! several topics on one stream), and publishers write `rate` events/s through every node:
//! single events, arrays over several topics, one event to many topics, and direct `XADD`s into
//! Redis. Topics come in generations: every `generation` seconds a new set of `topics` names is
//! used and the old one is abandoned to `retention.idle_ttl`.
//!
//! At a checkpoint everything stops, and after `quiet` seconds (set it past twice the idle TTL,
//! so abandoned topics have gone with their tombstones) each node's RSS, open fds, threads,
//! streams, topics and connections are read, with Redis's `used_memory`, clients, pub/sub
//! channels and keys. Each checkpoint is printed as a JSON line; the last line compares the
//! last checkpoint with the first. `scripts/soak.sh` decides from it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

/// What to run.
#[derive(clap::Args)]
pub struct Plan {
    /// The nodes' base URLs, comma-separated; clients and publishers spread over them.
    #[arg(long, value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// The nodes' process ids, in the same order.
    #[arg(long, value_delimiter = ',')]
    pub pids: Vec<u32>,
    #[arg(long)]
    pub redis_url: String,
    #[arg(long, default_value = "ssegate")]
    pub key_prefix: String,
    #[arg(long, default_value_t = 900.0)]
    pub seconds: f64,
    #[arg(long, default_value_t = 1500)]
    pub connections: usize,
    /// Topic names per generation.
    #[arg(long, default_value_t = 3000)]
    pub topics: usize,
    /// Published events per second, over all nodes.
    #[arg(long, default_value_t = 300.0)]
    pub rate: f64,
    /// Seconds of load between checkpoints.
    #[arg(long, default_value_t = 300.0)]
    pub checkpoint_every: f64,
    /// Seconds of quiet before a checkpoint is read.
    #[arg(long, default_value_t = 25.0)]
    pub quiet: f64,
    /// Seconds each generation of topic names is used before it is abandoned.
    #[arg(long, default_value_t = 60.0)]
    pub generation: f64,
    /// Seed of the run's choices (random when not given; printed).
    #[arg(long)]
    pub seed: Option<u64>,
}

/// A small seeded generator (xorshift64*): the run's choices replay from its seed. Not a crate:
/// the bench needs a few numbers, not a distribution library.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// In `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Counts over the run, for the summary: the load did happen.
#[derive(Default)]
struct Counts {
    streams: AtomicU64,
    refused: AtomicU64,
    events: AtomicU64,
    gaps: AtomicU64,
    published: AtomicU64,
    publish_errors: AtomicU64,
}

fn topic_name(generation: u64, n: u64) -> String {
    format!("soak.{generation}.{n}")
}

/// The current generation of topic names.
fn generation(started: Instant, every: f64) -> u64 {
    (started.elapsed().as_secs_f64() / every) as u64
}

pub async fn run(mut plan: Plan) -> Value {
    let seed = *plan
        .seed
        .get_or_insert_with(|| crate::now_micros() ^ u64::from(std::process::id()));
    eprintln!("soak: seed {seed}");
    let plan = Arc::new(plan);
    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let mut checkpoints = Vec::new();
    let mut rng = Rng(seed | 1);
    let mut round = 0u64;
    // The first checkpoint comes after one round of load, as every later one does.
    while started.elapsed().as_secs_f64() < plan.seconds || checkpoints.is_empty() {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..plan.connections {
            let seed = rng.next() | 1;
            let (plan, counts, stop) = (plan.clone(), counts.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                client(plan, counts, stop, Rng(seed), started).await
            }));
        }
        let seed = rng.next() | 1;
        let (p, k, s) = (plan.clone(), counts.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            publisher(p, k, s, Rng(seed), started).await
        }));
        let left = (plan.seconds - started.elapsed().as_secs_f64()).max(0.0);
        let load = plan.checkpoint_every.min(left).max(1.0);
        tokio::time::sleep(Duration::from_secs_f64(load)).await;
        stop.store(true, Ordering::Release);
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
        tokio::time::sleep(Duration::from_secs_f64(plan.quiet)).await;
        round += 1;
        let point = checkpoint(&plan, round, started).await;
        println!("{point}");
        checkpoints.push(point);
    }
    let (first, last) = (&checkpoints[0], &checkpoints[checkpoints.len() - 1]);
    let failures = grown(first, last);
    json!({
        "ok": failures.is_empty(), "failures": failures,
        "scenario": "soak", "seed": seed, "seconds": started.elapsed().as_secs_f64(),
        "checkpoints": checkpoints.len(),
        "streams_opened": counts.streams.load(Ordering::Relaxed),
        "streams_refused": counts.refused.load(Ordering::Relaxed),
        "events_received": counts.events.load(Ordering::Relaxed),
        "gaps_received": counts.gaps.load(Ordering::Relaxed),
        "events_published": counts.published.load(Ordering::Relaxed),
        "publish_errors": counts.publish_errors.load(Ordering::Relaxed),
        "first": first, "last": last,
    })
}

/// One client, again and again until told to stop: a stream of 1–15 s on one to three topics of
/// the current generation, on a node at random, a third of the time resuming from its last id.
async fn client(
    plan: Arc<Plan>,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    mut rng: Rng,
    started: Instant,
) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .expect("http client");
    // The last id seen, and the query it belongs to (a composite id fits only its topics).
    let mut last: Option<(String, String)> = None;
    // Start spread over the first second.
    tokio::time::sleep(Duration::from_millis(rng.below(1000))).await;
    while !stop.load(Ordering::Acquire) {
        let node = &plan.nodes[rng.below(plan.nodes.len() as u64) as usize];
        let (query, last_event_id) = match last.take() {
            Some((query, id)) if rng.below(3) == 0 => (query, Some(id)),
            _ => {
                let g = generation(started, plan.generation);
                let k = if rng.below(3) == 0 {
                    2 + rng.below(2)
                } else {
                    1
                };
                let topics: Vec<String> = (0..k)
                    .map(|_| format!("topic={}", topic_name(g, rng.below(plan.topics as u64))))
                    .collect();
                (topics.join("&"), None)
            }
        };
        let url = format!("{node}/v1/events?{query}");
        let lifetime = Duration::from_millis(1000 + rng.below(14_000));
        match crate::open_stream(&http, &url, None, last_event_id.as_deref()).await {
            Some(stream) => {
                counts.streams.fetch_add(1, Ordering::Relaxed);
                let mut stream = Box::pin(stream);
                let _ = tokio::time::timeout(lifetime, async {
                    while let Some(Ok(event)) = stream.next().await {
                        if event.event == "ssegate.gap" {
                            counts.gaps.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        counts.events.fetch_add(1, Ordering::Relaxed);
                        if !event.id.is_empty() {
                            last = Some((query.clone(), event.id));
                        }
                    }
                })
                .await;
            }
            None => {
                counts.refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Publishes `rate` events/s over the current generation's topics through every node: six in
/// ten single events, two arrays of five over five topics, one event to ten topics, one a
/// direct `XADD` (to a topic the gateway wrote this generation, so it expires with the rest).
async fn publisher(
    plan: Arc<Plan>,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    mut rng: Rng,
    started: Instant,
) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(16)
        .build()
        .expect("http client");
    let redis = match redis::Client::open(plan.redis_url.as_str()) {
        Ok(client) => client.get_multiplexed_async_connection().await.ok(),
        Err(_) => None,
    };
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / plan.rate.max(0.1)));
    let mut n = 0u64;
    let mut in_flight = Vec::new();
    while !stop.load(Ordering::Acquire) {
        tick.tick().await;
        let g = generation(started, plan.generation);
        let topic = |rng: &mut Rng| topic_name(g, rng.below(plan.topics as u64));
        let node = plan.nodes[rng.below(plan.nodes.len() as u64) as usize].clone();
        n += 1;
        let data = format!("{{\"n\":{n}}}");
        let (request, events) = match rng.below(10) {
            0..=5 => (
                http.post(format!("{node}/v1/events?topic={}", topic(&mut rng)))
                    .body(data),
                1,
            ),
            6 | 7 => {
                let batch: Vec<Value> = (0..5)
                    .map(|_| json!({"topic": topic(&mut rng), "data": data}))
                    .collect();
                (http.post(format!("{node}/v1/events")).json(&batch), 5)
            }
            8 => {
                let topics: Vec<String> = (0..10).map(|_| topic(&mut rng)).collect();
                let body = json!({"topics": topics, "data": data});
                (http.post(format!("{node}/v1/events")).json(&body), 10)
            }
            _ => {
                // Written by the gateway first, so that the topic has its idle TTL.
                let name = topic(&mut rng);
                let first = http
                    .post(format!("{node}/v1/events?topic={name}"))
                    .body(data.clone())
                    .send()
                    .await;
                if let (Ok(r), Some(conn)) = (first, redis.as_ref()) {
                    if r.status().is_success() {
                        let mut conn = conn.clone();
                        let stream = format!("{}:{{{name}}}", plan.key_prefix);
                        let added: redis::RedisResult<String> = redis::cmd("XADD")
                            .arg(stream)
                            .arg("*")
                            .arg("data")
                            .arg(&data)
                            .query_async(&mut conn)
                            .await;
                        let counter = if added.is_ok() {
                            &counts.published
                        } else {
                            &counts.publish_errors
                        };
                        counter.fetch_add(2, Ordering::Relaxed);
                    }
                }
                continue;
            }
        };
        let counts = counts.clone();
        in_flight.retain(|t: &tokio::task::JoinHandle<()>| !t.is_finished());
        in_flight.push(tokio::spawn(async move {
            let ok = matches!(request.send().await, Ok(r) if r.status().is_success());
            let counter = if ok {
                &counts.published
            } else {
                &counts.publish_errors
            };
            counter.fetch_add(events, Ordering::Relaxed);
        }));
    }
}

/// A sample of `/metrics`: the value of the line starting with `name ` or 0.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.split(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

fn proc_count(pid: u32, what: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/{what}")).map_or(0, |d| d.count())
}

/// The process's memory in transparent huge pages (`AnonHugePages` in smaps_rollup): the node
/// turns them off, and this shows it held (a collapsed 2 MiB page counts whole in RSS).
fn huge_page_bytes(pid: u32) -> u64 {
    crate::proc_kb_field(pid, "smaps_rollup", "AnonHugePages:")
}

async fn checkpoint(plan: &Plan, round: u64, started: Instant) -> Value {
    let http = reqwest::Client::new();
    let mut nodes = Vec::new();
    for (url, pid) in plan.nodes.iter().zip(&plan.pids) {
        let metrics = match http.get(format!("{url}/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        nodes.push(json!({
            "rss_bytes": crate::rss_bytes(*pid),
            "huge_page_bytes": huge_page_bytes(*pid),
            "fds": proc_count(*pid, "fd"),
            "threads": proc_count(*pid, "task"),
            "open_streams": sample(&metrics, "ssegate_open_streams"),
            "open_connections": sample(&metrics, "ssegate_open_connections"),
            "active_topics": sample(&metrics, "ssegate_active_topics"),
            "presence_entries": sample(&metrics, "ssegate_presence_entries"),
            // 0 unless the node is the diagnostic build (`scripts/soak.sh --heap-stats`).
            "heap_bytes": sample(&metrics, "ssegate_heap_bytes"),
        }));
    }
    let redis = redis_state(&plan.redis_url).await.unwrap_or(Value::Null);
    json!({
        "checkpoint": round, "at_seconds": started.elapsed().as_secs_f64().round(),
        "nodes": nodes, "redis": redis,
    })
}

async fn redis_state(url: &str) -> Option<Value> {
    let client = redis::Client::open(url).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let info = |section: &'static str| redis::cmd("INFO").arg(section).clone();
    let memory: String = info("memory").query_async(&mut conn).await.ok()?;
    let clients: String = info("clients").query_async(&mut conn).await.ok()?;
    let field = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .query_async(&mut conn)
        .await
        .ok()?;
    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.ok()?;
    Some(json!({
        "used_memory": field(&memory, "used_memory"),
        "connected_clients": field(&clients, "connected_clients"),
        "pubsub_channels": channels.len(),
        "keys": keys,
    }))
}

/// What grew from the first idle checkpoint to the last, as sentences; empty when nothing did.
/// RSS may move within max(8 MiB, 10 %) of the first; Redis's memory within 10 %; counts of
/// things (fds, streams, connections, topics, presence entries, channels, clients, keys) must
/// be back where they were.
pub fn grown(first: &Value, last: &Value) -> Vec<String> {
    let mut failures = Vec::new();
    let number = |v: &Value, path: &[&str]| -> f64 {
        path.iter()
            .fold(v, |v, p| match p.parse::<usize>() {
                Ok(i) => &v[i],
                Err(_) => &v[*p],
            })
            .as_f64()
            .unwrap_or(0.0)
    };
    let nodes = first["nodes"].as_array().map_or(0, Vec::len);
    for n in 0..nodes {
        let i = n.to_string();
        let (before, after) = (
            number(first, &["nodes", &i, "rss_bytes"]),
            number(last, &["nodes", &i, "rss_bytes"]),
        );
        let allowed = (8.0 * 1_048_576.0f64).max(before * 0.10);
        if after > before + allowed {
            failures.push(format!(
                "node {n}: idle RSS {:.1} MiB, first {:.1} MiB (allowed {:.1} MiB more)",
                after / 1_048_576.0,
                before / 1_048_576.0,
                allowed / 1_048_576.0
            ));
        }
        for what in [
            "fds",
            "open_streams",
            "open_connections",
            "active_topics",
            "presence_entries",
        ] {
            let (before, after) = (
                number(first, &["nodes", &i, what]),
                number(last, &["nodes", &i, what]),
            );
            if after > before {
                failures.push(format!("node {n}: {what} {after}, first {before}"));
            }
        }
    }
    let (before, after) = (
        number(first, &["redis", "used_memory"]),
        number(last, &["redis", "used_memory"]),
    );
    if after > before * 1.10 {
        failures.push(format!("redis: used_memory {after}, first {before}"));
    }
    for what in ["connected_clients", "pubsub_channels", "keys"] {
        let (before, after) = (
            number(first, &["redis", what]),
            number(last, &["redis", what]),
        );
        if after > before {
            failures.push(format!("redis: {what} {after}, first {before}"));
        }
    }
    failures
}
