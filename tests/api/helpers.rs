//! Test fixtures: a real `redis-server` per test, the gateway spawned on port 0, and an SSE
//! client built on an independent parser (`eventsource-stream`).

use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use eventsource_stream::{Event, Eventsource};
use futures_util::{Stream, StreamExt};
use serde_json::Value;
use ssegate::config::Settings;
use ssegate::http::ServerStats;
use ssegate::hub::Hub;
use ssegate::shutdown::Shutdown;
use ssegate::startup::Application;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::security::SECRET;

/// How long a test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// A `redis-server` on a free loopback port in a temporary directory, killed on drop. It can be
/// killed and restarted on the same port and data directory, paused and resumed.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    /// Append-only file with `appendfsync always`: acknowledged writes survive a restart.
    aof: bool,
    /// More `redis-server` arguments (cluster mode).
    extra: Vec<String>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        Self::start_with(false).await
    }

    /// With AOF on, as production should run.
    pub async fn start_durable() -> RedisServer {
        Self::start_with(true).await
    }

    async fn start_with(aof: bool) -> RedisServer {
        for _ in 0..5 {
            let mut server = Self::unstarted_with(aof);
            if server.launch().await {
                return server;
            }
        }
        panic!("could not start redis-server");
    }

    /// A port and directory for a server that is not running yet.
    pub fn unstarted() -> RedisServer {
        Self::unstarted_with(false)
    }

    fn unstarted_with(aof: bool) -> RedisServer {
        RedisServer {
            child: None,
            port: free_port(),
            aof,
            extra: Vec::new(),
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// Starts the server; false if it could not (e.g. the port was taken).
    pub async fn launch(&mut self) -> bool {
        let (aof, fsync) = if self.aof {
            ("yes", "always")
        } else {
            ("no", "everysec")
        };
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", aof, "--appendfsync", fsync])
            .args(&self.extra)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (the test command installs it)");
        self.child = Some(child);
        self.wait_until_up().await
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the process stays, its connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(status.success());
    }

    /// True once it answers PING; false if it exited (e.g. the port was taken).
    async fn wait_until_up(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while tokio::time::Instant::now() < deadline {
            match self.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(None)) => {}
                _ => return false,
            }
            if let Ok(client) = redis::Client::open(self.url()) {
                if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                    if redis::cmd("PING")
                        .query_async::<String>(&mut c)
                        .await
                        .is_ok()
                    {
                        return true;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Appends to a topic's stream the way a direct publisher would; returns the id.
    pub async fn xadd(&self, topic: &str, data: &str, event: Option<&str>) -> String {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(format!("ssegate:{{{topic}}}"))
            .arg("*")
            .arg("data")
            .arg(data);
        if let Some(e) = event {
            cmd.arg("event").arg(e);
        }
        cmd.query_async(&mut self.conn().await).await.unwrap()
    }

    /// Pub/sub channels with at least one subscriber, but the nodes' own control topic's (every
    /// node follows it, for disconnects).
    pub async fn channels(&self) -> Vec<String> {
        let channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg("*")
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        channels
            .into_iter()
            .filter(|c| !c.contains(CONTROL_TOPIC))
            .collect()
    }

    /// How many times Redis ran `command` (scripts' calls included), from INFO commandstats.
    pub async fn calls(&self, command: &str) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
    }

    /// Calls of every command Redis ran (scripts' calls included), from INFO commandstats.
    pub async fn all_calls(&self) -> std::collections::HashMap<String, u64> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        info.lines()
            .filter_map(|l| l.strip_prefix("cmdstat_"))
            .filter_map(|l| {
                let (name, rest) = l.split_once(":calls=")?;
                Some((name.to_owned(), rest.split(',').next()?.parse().ok()?))
            })
            .collect()
    }

    /// Zeroes INFO commandstats.
    pub async fn reset_stats(&self) {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
    }

    /// All ids of a topic's stream, in order.
    pub async fn stream_ids(&self, topic: &str) -> Vec<String> {
        stream_ids(&self.url(), topic).await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A paused server cannot die until it runs again.
            let _ = Command::new("kill")
                .args([
                    "-CONT",
                    &self.child.as_ref().map(|c| c.id()).unwrap_or(0).to_string(),
                ])
                .status();
        }
        self.kill();
    }
}

/// All ids of a topic's stream in the Redis at `url`, read in pages with XRANGE: the ground truth
/// deliveries are checked against.
pub async fn stream_ids(url: &str, topic: &str) -> Vec<String> {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("ssegate:{{{topic}}}");
    let mut ids = Vec::new();
    let mut start = "-".to_string();
    loop {
        let page: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        let n = page.ids.len();
        ids.extend(page.ids.into_iter().map(|e| e.id));
        match ids.last() {
            Some(last) if n == 1000 => start = format!("({last}"),
            _ => return ids,
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Settings for a test gateway: port 0, the given Redis (or memory), fast heartbeats.
pub fn settings(redis: Option<&RedisServer>) -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        redis_url: redis.map(|r| r.url()),
        heartbeat_interval: Duration::from_millis(200),
        catchup_interval: Duration::from_millis(500),
        shutdown_timeout: Duration::from_secs(5),
        ..Settings::default()
    }
}

/// A gateway running in this process.
pub struct TestApp {
    pub addr: SocketAddr,
    pub hub: Hub,
    pub shutdown: Shutdown,
    pub task: Option<JoinHandle<std::io::Result<()>>>,
    pub http: reqwest::Client,
    /// The server's counters: streams written on the socket, open and refused connections.
    pub server: ServerStats,
    /// `https` with `tls` set (then `http` must be given a client that trusts the test CA).
    pub scheme: &'static str,
    /// The listener's certificate, with TLS on.
    pub certificates: Option<std::sync::Arc<ssegate::tls::Certificates>>,
}

pub async fn spawn_app(settings: Settings) -> TestApp {
    ssegate::telemetry::init(ssegate::config::LogFormat::Text);
    let shutdown = Shutdown::new();
    let app = Application::build(settings, shutdown.clone())
        .await
        .expect("gateway starts");
    let addr = app.local_addr();
    let hub = app.hub();
    let server = app.server_stats();
    let certificates = app.certificates();
    let scheme = if certificates.is_some() {
        "https"
    } else {
        "http"
    };
    let task = tokio::spawn(app.run());
    TestApp {
        addr,
        hub,
        shutdown,
        task: Some(task),
        http: reqwest::Client::new(),
        server,
        scheme,
        certificates,
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{}", self.scheme, self.addr, path)
    }

    /// Publishes one JSON event and returns its id; panics unless the answer is 201.
    pub async fn publish(&self, topic: &str, data: &str) -> String {
        let (status, body) = self
            .post_json(&serde_json::json!({ "topic": topic, "data": data }))
            .await;
        assert_eq!(status, 201, "publish failed: {body}");
        body["id"].as_str().expect("id").to_owned()
    }

    pub async fn post_json(&self, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.url("/v1/events"))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_raw(&self, query: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(&format!("/v1/events{query}")))
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Opens `GET /v1/events?topic=...` with an optional `Last-Event-ID`; panics unless 200.
    pub async fn subscribe(&self, topic: &str, last_event_id: Option<&str>) -> Sse {
        self.subscribe_with(&format!("?topic={topic}"), last_event_id)
            .await
    }

    pub async fn subscribe_with(&self, query: &str, last_event_id: Option<&str>) -> Sse {
        let mut req = self.http.get(self.url(&format!("/v1/events{query}")));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let response = req.send().await.unwrap();
        assert_eq!(response.status(), 200, "subscribe failed");
        Sse::from_response(response)
    }

    /// Waits until `check` holds, polling; panics after [`PATIENCE`].
    pub async fn eventually(&self, what: &str, mut check: impl AsyncFnMut() -> bool) {
        eventually(what, &mut check).await
    }
}

pub async fn eventually(what: &str, check: &mut impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens `n` streams of `topic` with the app's client, each checked to be `version` and to
/// start with the app's `retry:` (`retry` ms), and returns their bodies.
pub async fn open_bodies(
    app: &TestApp,
    topic: &str,
    n: usize,
    version: reqwest::Version,
    retry: u64,
) -> Vec<impl Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin> {
    let mut bodies = Vec::new();
    for _ in 0..n {
        let r = app
            .http
            .get(app.url(&format!("/v1/events?topic={topic}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), version);
        let mut body = r.bytes_stream();
        let start = body.next().await.unwrap().unwrap();
        assert_eq!(start, format!("retry: {retry}\n\n").as_bytes());
        bodies.push(body);
    }
    bodies
}

/// Reads each stream body to its end and checks the last `retry:` each carried (what a shutdown
/// tells its clients): every one within `range` (ms), and not all the same, so reconnects spread
/// out. Panics if a body does not end within [`PATIENCE`] or ends without a `retry:`.
pub async fn assert_spread_retries(
    bodies: Vec<impl Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin>,
    range: std::ops::RangeInclusive<u64>,
) {
    let mut retries = Vec::new();
    for body in bodies {
        let rest: Vec<u8> =
            tokio::time::timeout(PATIENCE, body.map(|c| c.unwrap().to_vec()).concat())
                .await
                .expect("the stream ends");
        let text = String::from_utf8(rest).unwrap();
        let ms: u64 = text
            .lines()
            .filter_map(|l| l.strip_prefix("retry: "))
            .next_back()
            .expect("a retry before the end")
            .parse()
            .unwrap();
        assert!(range.contains(&ms), "{ms}");
        retries.push(ms);
    }
    retries.dedup();
    assert!(retries.len() > 1, "reconnects are spread out: {retries:?}");
}

type EventStream = Pin<Box<dyn Stream<Item = Result<Event, String>> + Send>>;

/// An open SSE stream, parsed by `eventsource-stream`.
pub struct Sse {
    events: EventStream,
}

impl Sse {
    pub fn from_response(response: reqwest::Response) -> Sse {
        let events = response
            .bytes_stream()
            .eventsource()
            .map(|r| r.map_err(|e| e.to_string()))
            .boxed();
        Sse { events }
    }

    /// The next event; `None` when the stream ended. Panics after [`PATIENCE`].
    pub async fn next(&mut self) -> Option<Event> {
        match tokio::time::timeout(PATIENCE, self.events.next()).await {
            Ok(Some(Ok(e))) => Some(e),
            Ok(Some(Err(e))) => panic!("stream error: {e}"),
            Ok(None) => None,
            Err(_) => panic!("no event within {PATIENCE:?}"),
        }
    }

    pub async fn expect(&mut self) -> Event {
        self.next().await.expect("stream ended early")
    }

    /// Reads events until one has id `last`; returns all ids read (gap notices included as
    /// `ssegate.gap`).
    pub async fn ids_until(&mut self, last: &str) -> Vec<String> {
        let mut ids = Vec::new();
        loop {
            let e = self.expect().await;
            if e.event == "ssegate.gap" {
                ids.push(e.event);
                continue;
            }
            let done = e.id == last;
            ids.push(e.id);
            if done {
                return ids;
            }
        }
    }

    /// The ids of the next `n` events.
    pub async fn take_ids(&mut self, n: usize) -> Vec<String> {
        self.take(n).await.into_iter().map(|e| e.id).collect()
    }

    pub async fn take(&mut self, n: usize) -> Vec<Event> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.expect().await);
        }
        out
    }
}

/// The npm `eventsource` client (tests/ui/mercure-eventsource.mjs) subscribed to `url` with a
/// bearer `token`, trusting `extra_ca` as well when given; its reports come line by line.
pub fn npm_eventsource(
    url: &str,
    token: &str,
    extra_ca: Option<&std::path::Path>,
) -> (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) {
    use tokio::io::AsyncBufReadExt;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/mercure-eventsource.mjs");
    let mut command = tokio::process::Command::new("node");
    command.arg(script).arg(url).arg(token);
    if let Some(ca) = extra_ca {
        command.env("NODE_EXTRA_CA_CERTS", ca);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node must be installed (scripts/test.sh installs it and the eventsource package)");
    let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

/// The next line a client program printed, as JSON (the npm `eventsource` client's reports).
/// Panics if none comes within [`PATIENCE`] or the program ended.
pub async fn next_json_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> Value {
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("the client reports in time")
        .unwrap()
        .expect("the client runs");
    serde_json::from_str(&line).unwrap()
}

/// Test CAs the clients of [`http_client_builder`] trust besides the public roots: a TLS test
/// bed registers its own.
static TRUSTED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Makes every client from [`http_client_builder`] trust this PEM CA from now on.
pub fn trust(ca_pem: &str) {
    TRUSTED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(ca_pem.to_owned());
}

/// A client builder that trusts the CAs given to [`trust`].
pub fn http_client_builder() -> reqwest::ClientBuilder {
    let mut builder = reqwest::Client::builder();
    for pem in TRUSTED.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        builder =
            builder.add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap());
    }
    builder
}

/// A subscriber that behaves like a browser's `EventSource`: when its stream ends or fails, it
/// reconnects (to the next of its nodes) with `Last-Event-ID` set to the last id it received.
pub struct ResumingClient {
    received: watch::Receiver<Vec<Event>>,
    /// Connections that were answered `200`.
    connected: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl ResumingClient {
    pub fn start(nodes: Vec<String>, topic: &str, cursor: Option<String>) -> ResumingClient {
        Self::start_query(nodes, &format!("topic={topic}"), cursor, None)
    }

    /// Subscribes with `query` (e.g. `topic=a&topic=b`). With `drop_every`, the client also drops
    /// its connection after that many events and resumes on the next node.
    pub fn start_query(
        nodes: Vec<String>,
        query: &str,
        cursor: Option<String>,
        drop_every: Option<usize>,
    ) -> ResumingClient {
        Self::start_path(nodes, &format!("/v1/events?{query}"), cursor, drop_every)
    }

    /// The same on any path and query (`/.well-known/mercure?topic=*`).
    pub fn start_path(
        nodes: Vec<String>,
        path: &str,
        cursor: Option<String>,
        drop_every: Option<usize>,
    ) -> ResumingClient {
        let (tx, received) = watch::channel(Vec::new());
        let (connected_tx, connected) = watch::channel(0);
        let path = path.to_owned();
        let task = tokio::spawn(async move {
            let http = http_client_builder().build().unwrap();
            let mut last_id = cursor;
            for attempt in 0usize.. {
                let url = format!("{}{path}", nodes[attempt % nodes.len()]);
                let mut req = http.get(&url);
                if let Some(id) = &last_id {
                    req = req.header("Last-Event-ID", id);
                }
                if let Ok(response) = req.send().await {
                    if response.status() == 200 {
                        connected_tx.send_modify(|n| *n += 1);
                        let mut events = response.bytes_stream().eventsource();
                        let mut on_this_connection = 0;
                        while let Some(Ok(event)) = events.next().await {
                            if !event.id.is_empty() && event.event != "ssegate.gap" {
                                last_id = Some(event.id.clone());
                                on_this_connection += 1;
                            }
                            tx.send_modify(|all| all.push(event));
                            if drop_every.is_some_and(|n| on_this_connection >= n) {
                                break;
                            }
                        }
                    }
                }
                // The browser's reconnection delay.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        ResumingClient {
            received,
            connected,
            task,
        }
    }

    /// Waits until a connection was answered `200`.
    pub async fn wait_connected(&mut self) {
        tokio::time::timeout(PATIENCE, self.connected.wait_for(|n| *n > 0))
            .await
            .expect("the client connects")
            .expect("the client runs");
    }

    /// Waits until `done` holds for what arrived; then every event, in order.
    pub async fn events_when(&mut self, mut done: impl FnMut(&[Event]) -> bool) -> Vec<Event> {
        let arrived = tokio::time::timeout(PATIENCE * 4, self.received.wait_for(|all| done(all)))
            .await
            .is_ok_and(|r| r.is_ok());
        let all = self.received.borrow().clone();
        assert!(arrived, "not everything arrived: {} events", all.len());
        all
    }

    /// Waits until an event with id `last` arrived; returns every id received, in order (a gap
    /// notice as `ssegate.gap`).
    pub async fn ids_until(&mut self, last: &str) -> Vec<String> {
        let (ids, arrived) = self.ids_within(last, PATIENCE * 2).await;
        assert!(arrived, "event {last} never arrived");
        ids
    }

    /// Like `ids_until`, but returns what arrived after `patience` instead of failing, and
    /// whether `last` was among it.
    pub async fn ids_within(&mut self, last: &str, patience: Duration) -> (Vec<String>, bool) {
        let arrived = tokio::time::timeout(
            patience,
            self.received
                .wait_for(|all| all.iter().any(|e| e.id == last)),
        )
        .await
        .is_ok();
        let ids = self
            .received
            .borrow()
            .iter()
            .map(|e| {
                if e.event == "ssegate.gap" {
                    e.event.clone()
                } else {
                    e.id.clone()
                }
            })
            .collect();
        (ids, arrived)
    }
}

impl Drop for ResumingClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A multi-topic stream's event, unwrapped: its topic and stream id from the envelope.
pub fn envelope(e: &Event) -> (String, String) {
    let v: Value = serde_json::from_str(&e.data).expect("an envelope");
    (
        v["topic"].as_str().expect("topic").to_owned(),
        v["id"].as_str().expect("id").to_owned(),
    )
}

/// A Redis Cluster on loopback: `masters` masters with `replicas` replicas each, all slots
/// assigned, every replica in sync. Nodes are killed on drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

/// How long a node may be unreachable before the cluster fails it over: short, so failover
/// tests take seconds.
pub const CLUSTER_NODE_TIMEOUT_MS: u64 = 1000;

impl RedisCluster {
    pub async fn start(masters: usize, replicas: usize) -> RedisCluster {
        for _ in 0..3 {
            if let Some(cluster) = Self::try_start(masters, replicas).await {
                return cluster;
            }
        }
        panic!("could not start a redis cluster");
    }

    async fn try_start(masters: usize, replicas: usize) -> Option<RedisCluster> {
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            let mut node = RedisServer::unstarted();
            node.extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                &CLUSTER_NODE_TIMEOUT_MS.to_string(),
                // A replica cut off for a while may still be promoted: the tests decide what it
                // has missed.
                "--cluster-replica-validity-factor",
                "0",
            ]
            .map(String::from)
            .to_vec();
            if !node.launch().await {
                return None;
            }
            nodes.push(node);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = tokio::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .expect("redis-cli must be installed");
        if !created.success() {
            return None;
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_stable().await;
        Some(cluster)
    }

    /// Waits until every running node sees the cluster as ok with all slots assigned, knows every
    /// other running node, and every replica's link to its master is up.
    pub async fn wait_stable(&self) {
        let running = self.nodes.iter().filter(|n| n.child.is_some()).count();
        eventually("the cluster to be stable", &mut async || {
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                let (Ok(mut info), Ok(cluster)) =
                    (node.info("").await, node.info("cluster!").await)
                else {
                    return false;
                };
                info.push_str(&cluster);
                let ok = info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_assigned:16384")
                    && info.contains("cluster_slots_ok:16384");
                let known = field(&info, "cluster_known_nodes")
                    .and_then(|v| v.parse::<usize>().ok())
                    .is_some_and(|n| n >= running);
                let synced = !info.contains("role:slave") || info.contains("master_link_status:up");
                if !(ok && known && synced) {
                    return false;
                }
            }
            true
        })
        .await;
    }

    /// The first node's URL: ssegate finds the rest.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// Every node as a comma-separated seed list.
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A connection that follows the cluster, for checks.
    pub async fn conn(&self) -> redis::cluster_async::ClusterConnection {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(RedisServer::url)
            .collect();
        redis::cluster::ClusterClient::new(seeds)
            .unwrap()
            .get_async_connection()
            .await
            .unwrap()
    }

    /// The slot ranges as the cluster assigns them now: first, last, master's port.
    async fn slot_ranges(&self) -> Vec<(u16, u16, u16)> {
        let raw: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut self.live_node().conn().await)
            .await
            .unwrap();
        raw.into_iter()
            .map(|r| {
                let redis::Value::Array(parts) = r else {
                    panic!("slot range")
                };
                let start: u16 = redis::from_redis_value(parts[0].clone()).unwrap();
                let end: u16 = redis::from_redis_value(parts[1].clone()).unwrap();
                let redis::Value::Array(master) = &parts[2] else {
                    panic!("master")
                };
                let port: u16 = redis::from_redis_value(master[1].clone()).unwrap();
                (start, end, port)
            })
            .collect()
    }

    /// `key`'s hash slot.
    pub async fn slot_of(&self, key: &str) -> u16 {
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut self.live_node().conn().await)
            .await
            .unwrap()
    }

    /// Index of the node that is master of `key`'s slot now.
    pub async fn master_of(&self, key: &str) -> usize {
        let slot = self.slot_of(key).await;
        let (_, _, port) = self
            .slot_ranges()
            .await
            .into_iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .expect("slot assigned");
        self.nodes
            .iter()
            .position(|n| n.port == port)
            .expect("a node of ours")
    }

    /// How many slots the node at `node` is master of.
    pub async fn slots_of(&self, node: usize) -> usize {
        self.slot_ranges()
            .await
            .into_iter()
            .filter(|(_, _, port)| *port == self.nodes[node].port)
            .map(|(start, end, _)| (end - start) as usize + 1)
            .sum()
    }

    /// Index of a replica of the master at `master`.
    pub async fn replica_of(&self, master: usize) -> usize {
        let info = self.nodes[master].info("replication").await.unwrap();
        let port: u16 = info
            .lines()
            .find_map(|l| {
                l.strip_prefix("slave0:")?
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("port="))?
                    .parse()
                    .ok()
            })
            .expect("the master has a replica");
        self.nodes.iter().position(|n| n.port == port).unwrap()
    }

    fn live_node(&self) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.child.is_some())
            .expect("a running node")
    }

    /// All ids of a topic's stream (under `prefix`), read through the cluster.
    pub async fn stream_ids(&self, prefix: &str, topic: &str) -> Vec<String> {
        let page: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(format!("{prefix}:{{{topic}}}"))
            .arg("-")
            .arg("+")
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        page.ids.into_iter().map(|e| e.id).collect()
    }

    /// Sum of a command's calls over every running node.
    pub async fn calls(&self, command: &str) -> u64 {
        let mut total = 0;
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            total += node.calls(command).await;
        }
        total
    }
}

impl RedisServer {
    /// `INFO <section>` (the default sections with "", `CLUSTER INFO` with "cluster!"), or an
    /// error if the node does not answer.
    pub async fn info(&self, section: &str) -> redis::RedisResult<String> {
        let client = redis::Client::open(self.url())?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let mut cmd = redis::cmd("INFO");
        if section == "cluster!" {
            cmd = redis::cmd("CLUSTER");
            cmd.arg("INFO");
        } else if !section.is_empty() {
            cmd.arg(section);
        }
        cmd.query_async(&mut conn).await
    }
}

fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// Where the nodes keep their events.
pub enum Backend {
    Redis(RedisServer),
    /// Three masters: the log's slot is on one of them.
    Cluster(RedisCluster),
}

/// Two nodes on one backend (one Redis, or a cluster of three masters), with an HMAC key ([`SECRET`]) and whatever `adjust` sets.
/// The topic every node reads itself, from start to shutdown: disconnects are announced on it.
pub use ssegate::control::CONTROL_TOPIC;
/// Topics a node holds with no client: its control topic.
pub const NODE_TOPICS: usize = 1;

pub struct Nodes {
    pub a: TestApp,
    pub b: TestApp,
    /// What both nodes were started with: a third node joins with the same.
    pub settings: Settings,
    pub _backend: Backend,
}

pub async fn two_nodes(cluster: bool, adjust: impl Fn(&mut Settings)) -> Nodes {
    let backend = if cluster {
        Backend::Cluster(RedisCluster::start(3, 0).await)
    } else {
        Backend::Redis(RedisServer::start().await)
    };
    let mut s = match &backend {
        Backend::Redis(redis) => {
            let mut s = settings(Some(redis));
            s.auth.jwt_key = Some(SECRET.into());
            s
        }
        Backend::Cluster(cluster) => {
            let mut s = settings(None);
            s.redis_url = Some(cluster.url());
            s.redis.ping_interval = Duration::from_millis(200);
            s.auth.jwt_key = Some(SECRET.into());
            s
        }
    };
    adjust(&mut s);
    let a = spawn_app(s.clone()).await;
    let b = spawn_app(s.clone()).await;
    Nodes {
        a,
        b,
        settings: s,
        _backend: backend,
    }
}

/// Runs each case on two nodes of one Redis, and of a Redis Cluster.
macro_rules! on_both {
    ($($case:ident($adjust:expr);)*) => {
        mod on_redis {
            $(#[tokio::test]
            async fn $case() {
                super::$case(crate::helpers::two_nodes(false, $adjust).await).await
            })*
        }
        mod on_cluster {
            $(#[tokio::test]
            async fn $case() {
                super::$case(crate::helpers::two_nodes(true, $adjust).await).await
            })*
        }
    };
}
pub(crate) use on_both;
