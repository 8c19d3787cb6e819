//! `ssegate-bench`: a load generator for ssegate and for peer SSE hubs (nchan), so both are
//! measured by the same client in the same run. Each scenario prints one JSON line of results;
//! `scripts/bench.sh` runs them and writes `BENCHMARKS.md`.
//!
//! Scenarios:
//! - `publish`: single-event POSTs at a concurrency, or JSON-array batches (ssegate).
//! - `fanout`: subscribers on one or several topics fed at a fixed rate; deliveries/s and
//!   publish→receive latency, from a timestamp in each payload.
//! - `idle`: open connections in steps and read the hub's resident memory from /proc.
//! - `storm`: clients all resuming the same range at once; time until all caught up, and the
//!   Redis commands that cost.
//! - `resume`: Mercure subscribers resuming from an id far back in the log versus near.
//! - `soak`: churn with idle checkpoints, for what grows with uptime (see [`soak`]).
//!
//! `--target mercure` runs them against ssegate's Mercure hub (form publishes, topic selectors);
//! `--token` sends a bearer token with every request. An `https://` URL is spoken to over TLS,
//! trusting `--ca`; ALPN then picks HTTP/2 unless `--http1`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use clap::{Parser, Subcommand, ValueEnum};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod soak;

#[derive(Parser)]
#[command(
    name = "ssegate-bench",
    about = "Load generator for ssegate and peer SSE hubs"
)]
struct Args {
    /// The hub's base URL, e.g. http://127.0.0.1:8080
    #[arg(long, global = true, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Which API the hub speaks.
    #[arg(long, global = true, value_enum, default_value = "ssegate")]
    target: Target,
    /// A bearer token sent with every request (subscriptions and publishes).
    #[arg(long, global = true)]
    token: Option<String>,
    /// Mercure: publish updates as private.
    #[arg(long, global = true)]
    private: bool,
    /// A CA certificate (PEM) to trust for an `https://` URL.
    #[arg(long, global = true)]
    ca: Option<std::path::PathBuf>,
    /// Over TLS, offer HTTP/1.1 only (otherwise ALPN picks HTTP/2).
    #[arg(long, global = true)]
    http1: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    /// `POST /v1/events?topic=T`, `GET /v1/events?topic=T`
    Ssegate,
    /// `POST /pub/T`, `GET /sub/T` (nchan's publisher and EventSource subscriber locations)
    Nchan,
    /// ssegate's Mercure hub: form `POST /.well-known/mercure` of topic
    /// `https://example.com/t/T`, `GET /.well-known/mercure?topic=…`
    Mercure,
}

/// How a publish request's events are spread over topics.
#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Shape {
    OneTopic,
    PerTopic,
    ToMany,
}

#[derive(Subcommand)]
enum Scenario {
    /// Publish as fast as `concurrency` connections allow.
    Publish {
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Events per request as a JSON array (ssegate only); 1 = single-event plain POSTs.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Payload bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Topics published to, round robin.
        #[arg(long, default_value_t = 16)]
        topics: usize,
        /// What a request of `batch` events holds: all on one topic, one on each of `batch`
        /// topics, or one event to `batch` topics (`{"topics": [...]}`).
        #[arg(long, value_enum, default_value_t = Shape::OneTopic)]
        shape: Shape,
    },
    /// Subscribers spread over topics, fed at a fixed total rate.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 1)]
        topics: usize,
        /// Events per second, over all topics.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Publish through this URL instead (e.g. another node).
        #[arg(long)]
        publish_url: Option<String>,
        /// Topics each connection reads (ssegate: `?topic=a&topic=b…`; nchan: a multiplexed
        /// channel). Subscriber s reads topics s·K … s·K+K−1, modulo `topics`.
        #[arg(long, default_value_t = 1)]
        per_connection: usize,
        /// Mercure: subscriber s's selector instead of its topic, `%s` standing for s (e.g. a
        /// template of its own, `https://example.com/t/{id}{?u%s}`).
        #[arg(long)]
        selector: Option<String>,
        /// Mercure: this many more subscribers that receive nothing, each with the selector
        /// `bystander_selector` (`%s` standing for its number): what matching costs them.
        #[arg(long, default_value_t = 0)]
        bystanders: usize,
        #[arg(long, default_value = "https://example.com/bystander/%s/{id}")]
        bystander_selector: String,
        /// The hub's process id: its CPU time per published event is reported.
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Idle connections in steps; the hub's RSS read from /proc/<pid>/status.
    Idle {
        /// Cumulative connection counts to measure at, e.g. 1000,5000,10000.
        #[arg(long, value_delimiter = ',', default_value = "1000,2000,4000")]
        steps: Vec<usize>,
        /// The hub's process id.
        #[arg(long)]
        pid: u32,
        /// Topics the connections spread over; as many as connections = one topic per user.
        #[arg(long, default_value_t = 1)]
        topics: usize,
        /// The Redis behind the hub: with it, the commands it runs while everything sits idle
        /// for `hold` seconds after the last step are counted (INFO commandstats).
        #[arg(long)]
        redis_url: Option<String>,
        #[arg(long, default_value_t = 10.0)]
        hold: f64,
        /// Over HTTP/2: this many streams share each connection (1 = a connection each). 0:
        /// one pool for all, which over HTTP/1.1 is a connection each.
        #[arg(long, default_value_t = 0)]
        streams_per_connection: usize,
    },
    /// Mercure: resuming from an id `behind` updates back in the log versus from one a few
    /// back, the same `replay` updates replayed either way (the rest are on other topics).
    Resume {
        #[arg(long, default_value_t = 1_000_000)]
        behind: usize,
        #[arg(long, default_value_t = 10)]
        replay: usize,
        /// Resumes of each kind, alternating; the medians are reported.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// The hub's Redis, where the updates in between are written straight into the log.
        #[arg(long)]
        redis_url: String,
        /// The hub's key prefix.
        #[arg(long, default_value = "ssegate")]
        key_prefix: String,
    },
    /// Churn on every node of `--nodes`, with idle checkpoints (see `scripts/soak.sh`).
    Soak(soak::Plan),
    /// Clients resuming the same range at the same moment.
    Storm {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Events each client is behind.
        #[arg(long, default_value_t = 100)]
        behind: usize,
        /// The Redis behind the hub, for INFO commandstats before and after.
        #[arg(long)]
        redis_url: Option<String>,
    },
}

struct Hub {
    target: Target,
    base: String,
    token: Option<String>,
    private: bool,
}

/// A Mercure topic: an IRI.
fn iri(topic: &str) -> String {
    format!("https://example.com/t/{topic}")
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (name, value) in pairs {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(name);
        out.push('=');
        out.push_str(&percent(value));
    }
    out
}

/// Percent-encodes everything but unreserved characters (for forms and queries).
fn percent(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Hub {
    /// A request publishing `body` to `topic`.
    fn publish(
        &self,
        http: &reqwest::Client,
        topic: &str,
        body: String,
    ) -> reqwest::RequestBuilder {
        let request = match self.target {
            Target::Ssegate => http
                .post(format!("{}/v1/events?topic={topic}", self.base))
                .body(body),
            Target::Nchan => http.post(format!("{}/pub/{topic}", self.base)).body(body),
            Target::Mercure => {
                let topic = iri(topic);
                let mut fields = vec![("topic", topic.as_str()), ("data", body.as_str())];
                if self.private {
                    fields.push(("private", "on"));
                }
                http.post(format!("{}/.well-known/mercure", self.base))
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(form(&fields))
            }
        };
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// One connection reading several topics.
    fn subscribe_many_url(&self, topics: &[String]) -> String {
        if topics.len() == 1 {
            return self.subscribe_url(&topics[0]);
        }
        match self.target {
            Target::Ssegate => {
                let query: Vec<String> = topics.iter().map(|t| format!("topic={t}")).collect();
                format!("{}/v1/events?{}", self.base, query.join("&"))
            }
            Target::Nchan => format!("{}/sub/multi/{}", self.base, topics.join(",")),
            Target::Mercure => {
                let query: Vec<String> = topics
                    .iter()
                    .map(|t| format!("topic={}", percent(&iri(t))))
                    .collect();
                format!("{}/.well-known/mercure?{}", self.base, query.join("&"))
            }
        }
    }

    fn subscribe_url(&self, topic: &str) -> String {
        match self.target {
            Target::Ssegate => format!("{}/v1/events?topic={topic}", self.base),
            Target::Nchan => format!("{}/sub/{topic}", self.base),
            Target::Mercure => self.selector_url(&iri(topic)),
        }
    }

    /// A Mercure subscription to one selector.
    fn selector_url(&self, selector: &str) -> String {
        format!(
            "{}/.well-known/mercure?topic={}",
            self.base,
            percent(selector)
        )
    }
}

/// The hub process's CPU time so far (user + system), in µs.
fn cpu_micros(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    (ticks(11) + ticks(12)) * 1_000_000 / 100
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds")
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// TLS options from the command line, for every client made.
struct Tls {
    /// Trusted for `https://` URLs, besides nothing else.
    ca: Option<reqwest::Certificate>,
    /// HTTP/1.1 only over TLS.
    http1: bool,
}

static TLS: OnceLock<Tls> = OnceLock::new();

fn client(connections: usize) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true);
    if let Some(tls) = TLS.get() {
        if let Some(ca) = &tls.ca {
            builder = builder.add_root_certificate(ca.clone());
        }
        if tls.http1 {
            builder = builder.http1_only();
        }
    }
    builder.build().expect("http client")
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let ca = args.ca.as_ref().map(|path| {
        let pem = std::fs::read(path).expect("the --ca file");
        reqwest::Certificate::from_pem(&pem).expect("a PEM certificate in --ca")
    });
    let _ = TLS.set(Tls {
        ca,
        http1: args.http1,
    });
    let hub = Arc::new(Hub {
        target: args.target,
        base: args.url.trim_end_matches('/').to_owned(),
        token: args.token,
        private: args.private,
    });
    let result = match args.scenario {
        Scenario::Publish {
            concurrency,
            seconds,
            batch,
            size,
            topics,
            shape,
        } => publish(hub, concurrency, seconds, batch, size, topics, shape).await,
        Scenario::Fanout {
            subscribers,
            topics,
            rate,
            seconds,
            publish_url,
            per_connection,
            selector,
            bystanders,
            bystander_selector,
            pid,
        } => {
            let readers = Readers {
                per_connection,
                selector,
                bystanders,
                bystander_selector,
            };
            fanout(
                hub,
                subscribers,
                topics,
                rate,
                seconds,
                publish_url,
                readers,
                pid,
            )
            .await
        }
        Scenario::Resume {
            behind,
            replay,
            rounds,
            redis_url,
            key_prefix,
        } => resume(hub, behind, replay, rounds, &redis_url, &key_prefix).await,
        Scenario::Idle {
            steps,
            pid,
            topics,
            redis_url,
            hold,
            streams_per_connection,
        } => {
            let spread = Spread(streams_per_connection);
            idle(hub, steps, pid, topics, redis_url, hold, spread).await
        }
        Scenario::Storm {
            clients,
            behind,
            redis_url,
        } => storm(hub, clients, behind, redis_url).await,
        Scenario::Soak(plan) => soak::run(plan).await,
    };
    println!("{result}");
    // A soak that saw something grow fails the command, for scripts/soak.sh.
    if result["ok"] == Value::Bool(false) {
        std::process::exit(1);
    }
}

async fn publish(
    hub: Arc<Hub>,
    concurrency: usize,
    seconds: f64,
    batch: usize,
    size: usize,
    topics: usize,
    shape: Shape,
) -> Value {
    assert!(
        batch == 1 || hub.target == Target::Ssegate,
        "batches are ssegate's API"
    );
    let http = client(concurrency);
    let payload = "x".repeat(size);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let events = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(histogram()));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let (http, hub, payload) = (http.clone(), hub.clone(), payload.clone());
            let (events, errors, latencies) = (events.clone(), errors.clone(), latencies.clone());
            tokio::spawn(async move {
                let mut local = histogram();
                let mut i = w;
                while Instant::now() < deadline {
                    let topic = format!("bench{}", i % topics);
                    // Request i's k-th topic, for the shapes with a topic per event.
                    let nth = |k: usize| format!("bench{}", (i * batch + k) % topics);
                    let sent = Instant::now();
                    let ok = {
                        let request = match (batch, shape) {
                            (1, _) => hub.publish(&http, &topic, payload.clone()),
                            (_, Shape::OneTopic) => {
                                let items: Vec<Value> = (0..batch)
                                    .map(|_| json!({"topic": topic, "data": payload}))
                                    .collect();
                                http.post(format!("{}/v1/events", hub.base)).json(&items)
                            }
                            (_, Shape::PerTopic) => {
                                let items: Vec<Value> = (0..batch)
                                    .map(|k| json!({"topic": nth(k), "data": payload}))
                                    .collect();
                                http.post(format!("{}/v1/events", hub.base)).json(&items)
                            }
                            (_, Shape::ToMany) => {
                                let topics: Vec<String> = (0..batch).map(nth).collect();
                                http.post(format!("{}/v1/events", hub.base))
                                    .json(&json!({"topics": topics, "data": payload}))
                            }
                        };
                        match request.send().await {
                            Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                            _ => false,
                        }
                    };
                    i += concurrency;
                    if ok {
                        events.fetch_add(batch as u64, Ordering::Relaxed);
                        let _ = local.record(sent.elapsed().as_micros().max(1) as u64);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                latencies
                    .lock()
                    .expect("histogram lock")
                    .add(&local)
                    .expect("same bounds");
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let h = latencies.lock().expect("histogram lock");
    let events = events.load(Ordering::Relaxed);
    json!({
        "scenario": "publish", "concurrency": concurrency, "batch": batch, "size": size,
        "topics": topics, "shape": match shape {
            Shape::OneTopic => "one-topic", Shape::PerTopic => "per-topic", Shape::ToMany => "to-many",
        },
        "events": events, "events_per_sec": events as f64 / elapsed,
        "requests_per_sec": events as f64 / batch as f64 / elapsed,
        "errors": errors.load(Ordering::Relaxed),
        "request_p50_ms": ms(&h, 0.5), "request_p99_ms": ms(&h, 0.99),
    })
}

/// Opens one SSE subscription; returns once its response headers arrived.
async fn open_stream(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    last_event_id: Option<&str>,
) -> Option<impl futures_util::Stream<Item = Result<eventsource_stream::Event, String>>> {
    let mut request = http.get(url).header("Accept", "text/event-stream");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id);
    }
    let response = request.send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    Some(
        response
            .bytes_stream()
            .eventsource()
            .map(|r| r.map_err(|e| e.to_string())),
    )
}

/// Opens one SSE subscription on a TCP connection of its own and reads the response itself;
/// returns once the response head arrived. For the fan-out's readers, which are most of its
/// load and share the two cores with the hubs: through reqwest every delivery also went from
/// hyper's connection task to the task reading the body. httparse reads the head and the chunk
/// size lines, [`Framing`] keeps the few states around them, and the events are still parsed by
/// eventsource-stream.
async fn open_raw_stream(
    url: &str,
    token: Option<&str>,
) -> Option<impl futures_util::Stream<Item = Result<eventsource_stream::Event, String>>> {
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_at(rest.find('/')?);
    let mut socket = tokio::net::TcpStream::connect(host).await.ok()?;
    socket.set_nodelay(true).ok()?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n{auth}\r\n");
    socket.write_all(request.as_bytes()).await.ok()?;
    let mut buf = BytesMut::with_capacity(4096);
    let body = loop {
        if socket.read_buf(&mut buf).await.ok()? == 0 {
            return None;
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut head = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(len) = head.parse(&buf).ok()? {
            if head.code != Some(200) {
                return None;
            }
            let chunked = head.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("transfer-encoding")
                    && h.value.eq_ignore_ascii_case(b"chunked")
            });
            buf.advance(len);
            break if chunked {
                Framing::Size
            } else {
                Framing::Whole
            };
        }
    };
    let bytes = futures_util::stream::unfold(
        (socket, buf, body),
        |(mut socket, mut buf, mut body)| async move {
            loop {
                match body.decode(&mut buf) {
                    Ok(Some(data)) => return Some((Ok::<_, String>(data), (socket, buf, body))),
                    Ok(None) => {}
                    Err(e) => return Some((Err(e), (socket, buf, Framing::Ended))),
                }
                if matches!(body, Framing::Ended) {
                    return None;
                }
                match socket.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        },
    );
    Some(Box::pin(
        bytes.eventsource().map(|r| r.map_err(|e| e.to_string())),
    ))
}

/// Where a response body's reader is.
enum Framing {
    /// No framing: the body runs to the connection's end.
    Whole,
    /// Chunked, at a size line.
    Size,
    /// Chunked, inside a chunk with this much data left.
    Data(usize),
    /// Chunked, at the line end after a chunk's data.
    DataEnd,
    /// The last chunk was read, or the framing was broken.
    Ended,
}

impl Framing {
    /// The next piece of body data in `buf`; `None` until more is read.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, String> {
        loop {
            match self {
                Framing::Whole => return Ok((!buf.is_empty()).then(|| buf.split().freeze())),
                Framing::Size => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((len, size))) => {
                        buf.advance(len);
                        *self = match size {
                            0 => Framing::Ended,
                            n => Framing::Data(n as usize),
                        };
                    }
                    Ok(httparse::Status::Partial) => return Ok(None),
                    Err(_) => return Err("bad chunk size line".into()),
                },
                Framing::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let data = buf.split_to((*left).min(buf.len())).freeze();
                    *left -= data.len();
                    if *left == 0 {
                        *self = Framing::DataEnd;
                    }
                    return Ok(Some(data));
                }
                Framing::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    buf.advance(2);
                    *self = Framing::Size;
                }
                Framing::Ended => return Ok(None),
            }
        }
    }
}

/// Rounds of probes before a fan-out's timed run, and how long each waits for the readers.
const PROBE_ROUNDS: usize = 10;
const PROBE_WAIT: Duration = Duration::from_millis(300);

/// An event's payload: a multi-topic ssegate stream wraps it in an envelope.
fn payload(data: String) -> String {
    if data.starts_with('{') {
        serde_json::from_str::<Value>(&data)
            .ok()
            .and_then(|v| v["data"].as_str().map(str::to_owned))
            .unwrap_or_default()
    } else {
        data
    }
}

/// Who reads in a fan-out besides how many: topics per connection, Mercure selectors and
/// bystanders.
struct Readers {
    per_connection: usize,
    selector: Option<String>,
    bystanders: usize,
    bystander_selector: String,
}

#[allow(clippy::too_many_arguments)]
async fn fanout(
    hub: Arc<Hub>,
    subscribers: usize,
    topics: usize,
    rate: f64,
    seconds: f64,
    publish_url: Option<String>,
    readers_are: Readers,
    pid: Option<u32>,
) -> Value {
    let per_connection = readers_are.per_connection;
    let token = hub.token.clone();
    let http = client(64);
    let delivered = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(histogram()));
    // When publishing ends, told once before it starts. Each reader then arms one timer for it:
    // waiting on a shared channel beside every read took a lock all readers contend for, and
    // readers cost the two cores the hubs also run on (it shows in both hubs' latency).
    let (publishing_ends, ends) = tokio::sync::watch::channel(None::<tokio::time::Instant>);
    // Readers that saw a probe on each of their topics.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut readers = Vec::with_capacity(subscribers);
    let mut failed = 0;
    for s in 0..subscribers {
        let mine: Vec<String> = (0..per_connection)
            .map(|j| format!("fan{}", (s * per_connection + j) % topics))
            .collect();
        let url = match &readers_are.selector {
            Some(format) => hub.selector_url(&format.replace("%s", &s.to_string())),
            None => hub.subscribe_many_url(&mine),
        };
        let Some(mut stream) = open_raw_stream(&url, token.as_deref()).await else {
            failed += 1;
            continue;
        };
        let (delivered, latencies, mut ends, ready) = (
            delivered.clone(),
            latencies.clone(),
            ends.clone(),
            ready_tx.clone(),
        );
        readers.push(tokio::spawn(async move {
            // Latencies in µs, into the shared histogram at the end: a histogram per reader is
            // ~200 KB, and a thousand of them made every delivery a cache miss.
            let mut local: Vec<u64> = Vec::new();
            // First the probes, until one came on each topic (or the timed run began anyway).
            let mut unprobed: std::collections::HashSet<String> = mine.into_iter().collect();
            while !unprobed.is_empty() {
                tokio::select! {
                    next = stream.next() => match next {
                        Some(Ok(event)) => {
                            if let Some(topic) = payload(event.data).strip_prefix("probe ") {
                                unprobed.remove(topic);
                            }
                        }
                        _ => return,
                    },
                    _ = ends.wait_for(Option::is_some) => break,
                }
            }
            if unprobed.is_empty() {
                let _ = ready.send(());
            }
            // Nothing timed is published before the end is known.
            let Ok(Some(end)) = ends.wait_for(Option::is_some).await.map(|end| *end) else {
                return;
            };
            let publishing = tokio::time::sleep_until(end);
            tokio::pin!(publishing);
            let mut draining = false;
            // Read until publishing has ended and then 500 ms pass without an event.
            loop {
                let next = if draining {
                    tokio::time::timeout(Duration::from_millis(500), stream.next())
                        .await
                        .ok()
                } else {
                    tokio::select! {
                        biased;
                        next = stream.next() => Some(next),
                        _ = &mut publishing => {
                            draining = true;
                            continue;
                        }
                    }
                };
                match next {
                    Some(Some(Ok(event))) => {
                        let data = payload(event.data);
                        let sent = data.split(' ').next().and_then(|t| t.parse::<u64>().ok());
                        if let Some(sent) = sent {
                            local.push(now_micros().saturating_sub(sent).max(1));
                        }
                    }
                    _ => break,
                }
            }
            delivered.fetch_add(local.len() as u64, Ordering::Relaxed);
            let mut all = latencies.lock().expect("histogram lock");
            for micros in local {
                all.saturating_record(micros);
            }
        }));
    }
    drop(ready_tx);
    // Bystanders: connections whose selectors match no published topic. They are opened and
    // kept, never read from (nothing comes but heartbeats).
    let mut bystanders = Vec::with_capacity(readers_are.bystanders);
    for b in 0..readers_are.bystanders {
        let url = hub.selector_url(&readers_are.bystander_selector.replace("%s", &b.to_string()));
        if let Some(stream) = open_raw_stream(&url, token.as_deref()).await {
            bystanders.push(Box::pin(stream));
        }
    }
    let publisher = Hub {
        target: hub.target,
        base: publish_url.unwrap_or_else(|| hub.base.clone()),
        token: hub.token.clone(),
        private: hub.private,
    };
    // A probe on every topic until every reader saw one on each of its topics: a hub may answer
    // a subscription before it is subscribed upstream (nchan subscribes to Redis after it
    // answers), and the timed events must not race that. At most PROBE_ROUNDS rounds.
    let reading = readers.len();
    let mut ready = 0;
    'probing: for _ in 0..PROBE_ROUNDS {
        let probes = futures_util::stream::iter(0..topics).map(|t| {
            let topic = format!("fan{t}");
            publisher
                .publish(&http, &topic, format!("probe {topic}"))
                .send()
        });
        let _: Vec<_> = probes.buffer_unordered(64).collect().await;
        let round = tokio::time::sleep(PROBE_WAIT);
        tokio::pin!(round);
        while ready < reading {
            tokio::select! {
                got = ready_rx.recv() => match got {
                    Some(()) => ready += 1,
                    None => break 'probing,
                },
                _ = &mut round => continue 'probing,
            }
        }
        break;
    }
    let started = Instant::now();
    let cpu_before = pid.map(cpu_micros);
    let deadline = started + Duration::from_secs_f64(seconds);
    let _ = publishing_ends.send(Some(deadline.into()));
    let mut published = 0u64;
    let mut publish_errors = 0u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut next = Instant::now();
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    while Instant::now() < deadline {
        next += interval;
        let topic = format!("fan{}", published as usize % topics);
        let body = format!("{} {}", now_micros(), "p".repeat(32));
        // Spawned, so it is sent now whatever the other requests do.
        let request = publisher.publish(&http, &topic, body).send();
        in_flight.push(tokio::spawn(request));
        published += 1;
        // Keep the rate without letting slow answers pile up unboundedly.
        while in_flight.len() > 256 {
            if !matches!(in_flight.next().await, Some(Ok(Ok(r))) if r.status().is_success()) {
                publish_errors += 1;
            }
        }
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
    while let Some(r) = in_flight.next().await {
        if !matches!(r, Ok(Ok(r)) if r.status().is_success()) {
            publish_errors += 1;
        }
    }
    let publish_secs = started.elapsed().as_secs_f64();
    // Readers stop after 500 ms of silence past the end.
    for r in readers {
        let _ = r.await;
    }
    // The hub's CPU over the run, deliveries included, per published event.
    let cpu_per_event = match (pid, cpu_before) {
        (Some(pid), Some(before)) => {
            json!(cpu_micros(pid).saturating_sub(before) as f64 / published.max(1) as f64)
        }
        _ => Value::Null,
    };
    let bystanders_open = bystanders.len();
    drop(bystanders);
    let h = latencies.lock().expect("histogram lock");
    let delivered = delivered.load(Ordering::Relaxed);
    let connected = (subscribers - failed) as u64;
    let expected = (published - publish_errors) * connected * per_connection.min(topics) as u64
        / topics as u64;
    json!({
        "scenario": "fanout", "subscribers": subscribers, "topics": topics, "rate": rate,
        "topics_per_connection": per_connection,
        "connect_failures": failed, "unprobed_readers": reading - ready,
        "published": published, "publish_errors": publish_errors,
        "delivered": delivered, "expected_deliveries": expected,
        "deliveries_per_sec": delivered as f64 / publish_secs,
        "latency_p50_ms": ms(&h, 0.5), "latency_p99_ms": ms(&h, 0.99), "latency_p999_ms": ms(&h, 0.999),
        "latency_max_ms": h.max() as f64 / 1000.0,
        "bystanders": bystanders_open, "hub_cpu_us_per_event": cpu_per_event,
    })
}

fn rss_bytes(pid: u32) -> u64 {
    proc_kb_field(pid, "status", "VmRSS:")
}

/// A `<field> <n> kB` line of `/proc/<pid>/<file>`, in bytes; 0 when missing.
fn proc_kb_field(pid: u32, file: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// How an idle scenario's streams share connections.
#[derive(Clone, Copy)]
struct Spread(usize);

async fn idle(
    hub: Arc<Hub>,
    steps: Vec<usize>,
    pid: u32,
    topics: usize,
    redis_url: Option<String>,
    hold: f64,
    spread: Spread,
) -> Value {
    let mut http = client(16);
    let mut open = Vec::new();
    let base_rss = rss_bytes(pid);
    let mut points = vec![(0usize, base_rss)];
    for &target in &steps {
        while open.len() < target {
            if spread.0 > 0 && open.len() % spread.0 == 0 {
                // A client of its own is a connection of its own.
                http = client(1);
            }
            let url = hub.subscribe_url(&format!("idle{}", open.len() % topics));
            match open_stream(&http, &url, hub.token.as_deref(), None).await {
                Some(stream) => open.push(Box::pin(stream)),
                None => break,
            }
        }
        // Let the hub settle (allocator, buffers) before reading its memory.
        tokio::time::sleep(Duration::from_secs(1)).await;
        points.push((open.len(), rss_bytes(pid)));
    }
    // Least-squares slope of RSS over connections.
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + *x as f64, b + *y as f64));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        let dx = *x as f64 - mx;
        (a + dx * (*y as f64 - my), b + dx * dx)
    });
    let slope = if den > 0.0 { num / den } else { 0.0 };
    // Redis commands while everything is idle, the measuring INFO itself left out.
    let idle_commands = match &redis_url {
        Some(url) => {
            let before = commandstats(url).await;
            tokio::time::sleep(Duration::from_secs_f64(hold)).await;
            let after = commandstats(url).await;
            match (before, after) {
                (Some((b, _)), Some((a, _))) => {
                    json!((a.saturating_sub(b).saturating_sub(1)) as f64 / hold)
                }
                _ => Value::Null,
            }
        }
        None => Value::Null,
    };
    json!({
        "scenario": "idle", "topics": topics, "streams_per_connection": spread.0, "points": points.iter().map(|(k, r)| json!({"connections": k, "rss_bytes": r})).collect::<Vec<_>>(),
        "bytes_per_connection": slope, "projected_100k_mib": slope * 100_000.0 / 1_048_576.0 + base_rss as f64 / 1_048_576.0,
        "idle_redis_commands_per_second": idle_commands,
    })
}

async fn commandstats(redis_url: &str) -> Option<(u64, Value)> {
    let client = redis::Client::open(redis_url).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .ok()?;
    let mut total = 0;
    let mut per = serde_json::Map::new();
    for line in info.lines() {
        let Some((name, rest)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let calls = rest
            .split(',')
            .find_map(|f| f.strip_prefix("calls="))
            .and_then(|c| c.parse::<u64>().ok())
            .unwrap_or(0);
        total += calls;
        per.insert(name.to_owned(), json!(calls));
    }
    Some((total, Value::Object(per)))
}

async fn storm(hub: Arc<Hub>, clients: usize, behind: usize, redis_url: Option<String>) -> Value {
    assert!(
        hub.target != Target::Mercure,
        "the storm resumes by the ids publishes answer (ssegate, nchan)"
    );
    let http = client(64);
    let topic = format!("storm{}", now_micros());
    // A cursor, then `behind` events after it.
    let mut ids = Vec::new();
    for i in 0..=behind {
        let r = hub
            .publish(&http, &topic, format!("{i}"))
            .header("Accept", "application/json")
            .send()
            .await
            .expect("publish");
        let v: Value = r.json().await.expect("publish answer");
        // nchan answers its channel's state, the newest message's id included.
        let id = v["id"].as_str().or(v["last_message_id"].as_str());
        ids.push(id.expect("the event's id").to_owned());
    }
    // Over TLS each client makes its own connection and handshake, as 10,000 browsers do (over
    // HTTP/2 one client would put every stream on one connection).
    let own_connections = hub.base.starts_with("https://");
    let cursor = ids[0].clone();
    let last = ids[behind].clone();
    let before = match &redis_url {
        Some(u) => commandstats(u).await,
        None => None,
    };
    let gate = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let started = Arc::new(Mutex::new(None::<Instant>));
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (http, url, cursor, last, gate) = (
                if own_connections {
                    client(1)
                } else {
                    http.clone()
                },
                hub.subscribe_url(&topic),
                cursor.clone(),
                last.clone(),
                gate.clone(),
            );
            tokio::spawn(async move {
                gate.wait().await;
                let mut stream = Box::pin(open_stream(&http, &url, None, Some(&cursor)).await?);
                let mut got = 0;
                while let Ok(Some(Ok(event))) =
                    tokio::time::timeout(Duration::from_secs(30), stream.next()).await
                {
                    got += 1;
                    if event.id == last {
                        return Some((got, Instant::now()));
                    }
                }
                None
            })
        })
        .collect();
    gate.wait().await;
    *started.lock().expect("lock") = Some(Instant::now());
    let t0 = Instant::now();
    let mut done = 0;
    let mut exact = 0;
    let mut finished = t0;
    for t in tasks {
        if let Ok(Some((got, at))) = t.await {
            done += 1;
            exact += usize::from(got == behind);
            finished = finished.max(at);
        }
    }
    let after = match &redis_url {
        Some(u) => commandstats(u).await,
        None => None,
    };
    let commands = match (before, after) {
        (Some((b, bm)), Some((a, am))) => {
            let per: serde_json::Map<String, Value> = am
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| {
                    let d = v.as_u64()? - bm.get(k).and_then(Value::as_u64).unwrap_or(0);
                    (d > 0).then(|| (k.clone(), json!(d)))
                })
                .collect();
            json!({"total": a - b, "by_command": per})
        }
        _ => Value::Null,
    };
    json!({
        "scenario": "storm", "clients": clients, "behind": behind, "caught_up": done,
        "received_exactly_behind": exact,
        "seconds_until_all_caught_up": finished.duration_since(t0).as_secs_f64(),
        "redis_commands": commands,
    })
}

/// Resuming from an id `behind` updates back in the Mercure log, against resuming from one a
/// few back: the subscription's topic has the same `replay` updates after either id, the
/// updates in between are on another topic. They are written straight into the log (as
/// updates of the log's form), so the run takes seconds, not the minutes of a million POSTs.
async fn resume(
    hub: Arc<Hub>,
    behind: usize,
    replay: usize,
    rounds: usize,
    redis_url: &str,
    key_prefix: &str,
) -> Value {
    assert!(
        hub.target == Target::Mercure,
        "resuming from an update's id is Mercure's"
    );
    let http = client(4);
    let run = now_micros();
    let topic = format!("resume{run}");
    let publish = |topic: String, id: String| {
        let mut request = http
            .post(format!("{}/.well-known/mercure", hub.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form(&[("topic", &iri(&topic)), ("id", &id), ("data", "x")]));
        if let Some(token) = &hub.token {
            request = request.bearer_auth(token);
        }
        async move {
            let r = request.send().await.expect("publish");
            assert!(r.status().is_success(), "publish refused: {}", r.status());
            id
        }
    };
    let far = publish(format!("noise{run}"), format!("far-{run}")).await;
    let client = redis::Client::open(redis_url).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let log = format!("{key_prefix}:{{mercure updates}}");
    let noise = format!(r#"{{"t":["{}"],"d":"x"}}"#, iri(&format!("noise{run}")));
    let seeding = Instant::now();
    let mut written = 0;
    while written < behind {
        let n = (behind - written).min(10_000);
        let mut pipe = redis::pipe();
        for _ in 0..n {
            pipe.cmd("XADD")
                .arg(&log)
                .arg("*")
                .arg("data")
                .arg(&noise)
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.expect("seeding the log");
        written += n;
    }
    let seeded_secs = seeding.elapsed().as_secs_f64();
    let near = publish(format!("noise{run}"), format!("near-{run}")).await;
    let mut last = String::new();
    for i in 0..replay {
        last = publish(topic.clone(), format!("r{run}-{i}")).await;
    }
    let url = hub.subscribe_url(&topic);
    let mut times: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut exact = true;
    for _ in 0..rounds {
        for (kind, cursor) in [("near", &near), ("far", &far)] {
            let started = Instant::now();
            let mut stream = Box::pin(
                open_stream(&http, &url, hub.token.as_deref(), Some(cursor))
                    .await
                    .expect("subscribe"),
            );
            let mut got = 0;
            while let Ok(Some(Ok(event))) =
                tokio::time::timeout(Duration::from_secs(120), stream.next()).await
            {
                got += 1;
                if event.id == last {
                    break;
                }
            }
            exact &= got == replay;
            times
                .entry(kind)
                .or_default()
                .push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let near_ms = median(times.get_mut("near").expect("near runs"));
    let far_ms = median(times.get_mut("far").expect("far runs"));
    json!({
        "scenario": "resume", "behind": behind, "replay": replay, "rounds": rounds,
        "seeded_secs": seeded_secs, "replayed_exactly": exact,
        "near_ms": near_ms, "far_ms": far_ms, "far_over_near": far_ms / near_ms,
    })
}
