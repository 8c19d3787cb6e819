//! The Redis store: a stream per topic, live announcements through pub/sub.
//!
//! Key layout (the `{topic}` hash tag keeps each topic's keys in one Redis Cluster slot):
//!
//! | what | name |
//! |---|---|
//! | stream | `<prefix>:{<topic>}` |
//! | live channel | `<prefix>:{<topic>}:live` |
//! | idempotency key | `<prefix>:{<topic>}:idem:<key>` |
//!
//! Appends run as one Lua script (`append.lua`): XADD with trimming, then PUBLISH of the whole
//! event together with the id of the entry before it. A node that sees an announcement whose
//! previous id is not the last one it delivered knows it missed something and reads the stream.
//!
//! Programs may also `XADD` straight into a stream. Those appends are seen through keyspace
//! notifications (`notify-keyspace-events` with `K` and `t`, enabled at start where `CONFIG SET`
//! is allowed) and, whatever happens to notifications, by the hub's periodic catch-up.
//!
//! Two connections are used: one for commands and one, RESP3 with automatic resubscription, that
//! only carries subscriptions. A health task pings the latter; after an outage it resubscribes
//! every watched topic and asks the hub to catch every topic up from its stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, RedisError, Script, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use redis::streams::StreamReadReply;

use super::{classify, Page, Signal, Store, StoreError, StreamFacts, ADVANCED_BATCH};
use crate::config::{RedisTiming, Settings};
use crate::event::{Event, NewEvent, StreamId, Topic};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// How long an unmatched `xadd` notification waits for the gateway's own announcement that
/// usually follows it in the same reply, before it is treated as a direct `XADD`.
const DIRECT_XADD_SETTLE: Duration = Duration::from_millis(5);

/// Oldest Redis with `max-deleted-entry-id` in `XINFO STREAM`, which the gap rule needs.
const MIN_REDIS_MAJOR: u32 = 7;

/// Events in Redis Streams, announced through Redis pub/sub.
pub struct RedisStore {
    /// The connections, once Redis first answered. The gateway starts without Redis and
    /// reports not-ready until then.
    link: watch::Receiver<Option<Link>>,
    /// Why the last attempt to connect failed, for error messages and readiness.
    connect_error: Arc<Mutex<Option<String>>>,
    /// Names of keys and channels.
    keys: Keys,
    /// Compiled scripts, sent by SHA after the first use.
    scripts: Scripts,
    /// MAXLEN for every append (0 = no trimming).
    max_events: u64,
    /// `~` or `=`.
    trim_mode: &'static str,
    /// Idempotency window in milliseconds.
    idempotency_window_ms: u64,
    /// `retention.max_age` in milliseconds (0 = none).
    max_age_ms: u64,
    /// `retention.idle_ttl` in milliseconds (0 = topics live forever).
    idle_ttl_ms: u64,
    /// Per-command deadline; the driver's own covers a single reply only.
    response_timeout: Duration,
    /// Requests to the task that owns the subscriptions.
    watch_tx: mpsc::UnboundedSender<WatchCommand>,
    /// Whether the subscription connection answered its last health check.
    pubsub_healthy: Arc<AtomicBool>,
    /// Handed out once, by `take_signals`.
    signal_rx: Mutex<Option<mpsc::UnboundedReceiver<Signal>>>,
    /// Whether the last command on the command connection got an answer.
    command_healthy: AtomicBool,
    /// Command latency and errors, when the gateway keeps metrics.
    metrics: Option<Arc<Metrics>>,
}

/// The two connections to Redis.
#[derive(Clone)]
struct Link {
    /// Command connection: multiplexed, reconnects by itself.
    conn: ConnectionManager,
    /// Subscription connection (RESP3, resubscribes by itself after a reconnect).
    pubsub: ConnectionManager,
}

struct Scripts {
    append: Script,
    read: Script,
    tail: Script,
}

/// Key and channel names for one deployment.
#[derive(Clone)]
struct Keys {
    prefix: String,
    /// `__keyspace@<db>__:<prefix>:{`: how keyspace notification channels for our streams start.
    keyspace_head: String,
}

impl Keys {
    fn stream(&self, topic: &str) -> String {
        format!("{}:{{{}}}", self.prefix, topic)
    }

    fn live_channel(&self, topic: &str) -> String {
        format!("{}:{{{}}}:live", self.prefix, topic)
    }

    fn keyspace_channel(&self, topic: &str) -> String {
        format!("{}{}}}", self.keyspace_head, topic)
    }

    /// An expired stream's last id, kept as long again, for the gap rule.
    fn tombstone(&self, topic: &str) -> String {
        format!("{}:{{{}}}:last", self.prefix, topic)
    }

    fn idempotency(&self, topic: &str, key: &str) -> String {
        format!("{}:{{{}}}:idem:{}", self.prefix, topic, key)
    }

    /// Both channels a watched topic is subscribed to.
    fn channels(&self, topic: &str) -> [String; 2] {
        [self.live_channel(topic), self.keyspace_channel(topic)]
    }

    /// Which message a channel carries, and for which topic.
    fn parse_channel<'a>(&self, channel: &'a str) -> Option<Channel<'a>> {
        if let Some(rest) = channel.strip_prefix(self.keyspace_head.as_str()) {
            return rest.strip_suffix('}').map(Channel::Keyspace);
        }
        let rest = channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(":{")?;
        rest.strip_suffix("}:live").map(Channel::Live)
    }
}

enum Channel<'a> {
    Live(&'a str),
    Keyspace(&'a str),
}

enum WatchCommand {
    Watch(String, oneshot::Sender<()>),
    Unwatch(String),
    /// The subscription connection came back: subscribe again to everything watched, then ask
    /// the hub to catch up.
    Restore,
}

impl RedisStore {
    /// Prepares the store and starts connecting in the background: the gateway serves (and
    /// reports not-ready) while Redis is unreachable. Only a malformed URL fails here.
    pub fn connect(settings: &Settings, shutdown: Shutdown) -> Result<RedisStore, StoreError> {
        let url = settings
            .redis_url
            .as_deref()
            .ok_or_else(|| StoreError::Internal("no redis_url configured".into()))?;
        let info = url
            .into_connection_info()
            .map_err(|e| StoreError::Internal(format!("redis_url: {e}")))?;
        let db = info.redis_settings().db();
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(resp3))
            .map_err(|e| StoreError::Internal(format!("redis_url: {e}")))?;

        let keys = Keys {
            prefix: settings.key_prefix.clone(),
            keyspace_head: format!("__keyspace@{db}__:{}:{{", settings.key_prefix),
        };
        let (signal_tx, signal_rx) = mpsc::unbounded_channel();
        let (watch_tx, watch_rx) = mpsc::unbounded_channel();
        let (link_tx, link) = watch::channel(None);
        let pubsub_healthy = Arc::new(AtomicBool::new(true));
        let connect_error = Arc::new(Mutex::new(None));
        let timing = settings.redis.clone();

        let tasks = Tasks {
            keys: keys.clone(),
            signals: signal_tx,
            watch_tx: watch_tx.clone(),
            healthy: pubsub_healthy.clone(),
            timing: timing.clone(),
            shutdown,
        };
        tokio::spawn(establish(
            client,
            link_tx,
            watch_rx,
            connect_error.clone(),
            tasks,
        ));

        Ok(RedisStore {
            link,
            connect_error,
            keys,
            scripts: Scripts {
                append: Script::new(include_str!("append.lua")),
                read: Script::new(include_str!("read.lua")),
                tail: Script::new(include_str!("tail.lua")),
            },
            max_events: settings.retention.max_events,
            trim_mode: if settings.retention.approximate {
                "~"
            } else {
                "="
            },
            idempotency_window_ms: settings.idempotency_window.as_millis() as u64,
            max_age_ms: settings
                .retention
                .max_age
                .map_or(0, |a| a.as_millis() as u64),
            idle_ttl_ms: settings
                .retention
                .idle_ttl
                .map_or(0, |t| t.as_millis() as u64),
            response_timeout: timing.response_timeout,
            watch_tx,
            pubsub_healthy,
            signal_rx: Mutex::new(Some(signal_rx)),
            command_healthy: AtomicBool::new(true),
            metrics: None,
        })
    }

    /// Counts command latency and errors in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Records one command's latency and outcome.
    fn observe<T>(&self, started: Instant, result: &Result<T, StoreError>) {
        let answered = !matches!(result, Err(StoreError::Unavailable(_)));
        self.command_healthy.store(answered, Ordering::Release);
        if let Some(m) = &self.metrics {
            m.redis_command_duration
                .observe(started.elapsed().as_secs_f64());
            if result.is_err() {
                m.redis_errors.inc();
            }
        }
    }

    /// Completes once Redis has answered for the first time.
    pub async fn connected(&self) {
        let mut link = self.link.clone();
        let _ = link.wait_for(Option::is_some).await;
    }

    fn link(&self) -> Result<Link, StoreError> {
        self.link.borrow().clone().ok_or_else(|| {
            let why = self
                .connect_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_else(|| "connecting".into());
            StoreError::Unavailable(format!("not connected to redis yet ({why})"))
        })
    }

    /// Runs one script with an overall deadline.
    async fn run(&self, invocation: redis::ScriptInvocation<'_>) -> Result<Value, StoreError> {
        let mut conn = self.link()?.conn;
        let started = Instant::now();
        // Twice the per-reply timeout: EVALSHA may be retried as EVAL once.
        let result = match tokio::time::timeout(
            self.response_timeout * 2,
            invocation.invoke_async(&mut conn),
        )
        .await
        {
            Ok(result) => result.map_err(classify_error),
            Err(_) => Err(StoreError::Unavailable(
                "redis did not answer in time".into(),
            )),
        };
        self.observe(started, &result);
        result
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn append(
        &self,
        topic: &Topic,
        events: &[NewEvent],
    ) -> Result<Vec<StreamId>, StoreError> {
        let stream = self.keys.stream(topic.as_str());
        let mut invocation = self.scripts.append.prepare_invoke();
        invocation
            .key(&stream)
            .key(self.keys.tombstone(topic.as_str()));
        for new in events {
            match &new.idempotency_key {
                Some(key) => invocation.key(self.keys.idempotency(topic.as_str(), key)),
                None => invocation.key(&stream),
            };
        }
        invocation
            .arg(self.keys.live_channel(topic.as_str()))
            .arg(self.max_events)
            .arg(self.trim_mode)
            .arg(self.idempotency_window_ms)
            .arg(self.max_age_ms)
            .arg(self.idle_ttl_ms)
            .arg(ANNOUNCE_INLINE_MAX)
            .arg(ANNOUNCE_CALL_BUDGET);
        for new in events {
            invocation
                .arg(new.event.as_deref().unwrap_or(""))
                .arg(&new.data)
                .arg(if new.idempotency_key.is_some() {
                    "1"
                } else {
                    "0"
                });
        }
        let reply = self.run(invocation).await?;
        let ids = as_array(&reply)?
            .iter()
            .map(parse_id)
            .collect::<Result<Vec<_>, _>>()?;
        if ids.len() != events.len() {
            return Err(StoreError::Internal(
                "append returned a wrong number of ids".into(),
            ));
        }
        Ok(ids)
    }

    async fn read(
        &self,
        topic: &Topic,
        cursor: StreamId,
        count: usize,
    ) -> Result<Page, StoreError> {
        let mut invocation = self.scripts.read.prepare_invoke();
        invocation
            .key(self.keys.stream(topic.as_str()))
            .key(self.keys.tombstone(topic.as_str()))
            .arg(cursor.to_string())
            .arg(count);
        let reply = self.run(invocation).await?;
        let parts = as_array(&reply)?;
        let hit = matches!(parts.first(), Some(Value::Int(1)));
        let page = parse_entries(parts.get(1))?;
        if hit {
            let events = page.into_iter().skip(1).take(count).collect();
            return Ok(Page {
                gap: None,
                events,
                resume_after: None,
            });
        }
        let facts = parse_facts(parts.get(2..7))?;
        let gap = classify(cursor, false, facts);
        let resume_after = gap.map(|_| facts.map_or(StreamId::ZERO, |f| f.last_generated));
        let events = if gap.is_some() {
            parse_entries(parts.get(7))?
        } else {
            page
        };
        Ok(Page {
            gap,
            events: events.into_iter().take(count).collect(),
            resume_after,
        })
    }

    async fn tail(&self, topic: &Topic) -> Result<StreamId, StoreError> {
        let mut invocation = self.scripts.tail.prepare_invoke();
        invocation
            .key(self.keys.stream(topic.as_str()))
            .key(self.keys.tombstone(topic.as_str()));
        let reply = self.run(invocation).await?;
        parse_id(&reply)
    }

    /// One non-blocking `XREAD COUNT 1 STREAMS k1 … kN id1 … idN` per [`ADVANCED_BATCH`]
    /// topics: it answers only for the streams that have an entry after their id.
    async fn advanced(&self, positions: &[(Topic, StreamId)]) -> Result<Vec<Topic>, StoreError> {
        let mut moved = Vec::new();
        for batch in positions.chunks(ADVANCED_BATCH) {
            let keys: Vec<String> = batch
                .iter()
                .map(|(topic, _)| self.keys.stream(topic.as_str()))
                .collect();
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT").arg(1).arg("STREAMS").arg(&keys);
            for (_, after) in batch {
                cmd.arg(after.to_string());
            }
            let mut conn = self.link()?.conn;
            let started = Instant::now();
            let reply: Result<Option<StreamReadReply>, StoreError> =
                tokio::time::timeout(self.response_timeout, cmd.query_async(&mut conn))
                    .await
                    .map_err(|_| StoreError::Unavailable("redis did not answer in time".into()))
                    .and_then(|r| r.map_err(classify_error));
            self.observe(started, &reply);
            let reply = reply?;
            let Some(reply) = reply else { continue };
            let index: HashMap<&str, &Topic> = keys
                .iter()
                .map(String::as_str)
                .zip(batch.iter().map(|(topic, _)| topic))
                .collect();
            for stream in reply.keys.iter().filter(|s| !s.ids.is_empty()) {
                if let Some(topic) = index.get(stream.key.as_str()) {
                    moved.push((*topic).clone());
                }
            }
        }
        Ok(moved)
    }

    fn watch(&self, topic: &Topic) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        // If the owner task is gone (shutdown), dropping `tx` tells the caller.
        let _ = self
            .watch_tx
            .send(WatchCommand::Watch(topic.as_str().to_owned(), tx));
        rx
    }

    fn unwatch(&self, topic: &Topic) {
        let _ = self
            .watch_tx
            .send(WatchCommand::Unwatch(topic.as_str().to_owned()));
    }

    fn take_signals(&self) -> Option<mpsc::UnboundedReceiver<Signal>> {
        self.signal_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn connections(&self) -> Vec<(&'static str, bool)> {
        let command = self.link.borrow().is_some() && self.command_healthy.load(Ordering::Acquire);
        vec![
            ("command", command),
            ("subscription", self.pubsub_healthy.load(Ordering::Acquire)),
        ]
    }

    async fn ready(&self) -> Result<(), StoreError> {
        ping(&mut self.link()?.conn, self.response_timeout).await?;
        if !self.pubsub_healthy.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable(
                "the redis subscription connection is down".into(),
            ));
        }
        Ok(())
    }
}

/// What the background tasks share once connected.
struct Tasks {
    keys: Keys,
    signals: mpsc::UnboundedSender<Signal>,
    watch_tx: mpsc::UnboundedSender<WatchCommand>,
    healthy: Arc<AtomicBool>,
    timing: RedisTiming,
    shutdown: Shutdown,
}

/// Connects (retrying with backoff until Redis answers), then starts the tasks that own the
/// subscriptions.
async fn establish(
    client: redis::Client,
    link_tx: watch::Sender<Option<Link>>,
    watch_rx: mpsc::UnboundedReceiver<WatchCommand>,
    connect_error: Arc<Mutex<Option<String>>>,
    tasks: Tasks,
) {
    let (push_tx, push_rx) = mpsc::unbounded_channel();
    let mut delay = Duration::from_millis(100);
    let mut attempts = 0u32;
    let link = loop {
        match open_link(&client, &tasks.timing, push_tx.clone()).await {
            Ok(link) => break link,
            Err(e) => {
                if attempts.is_multiple_of(10) {
                    warn!(error = %e, "cannot connect to redis; retrying");
                }
                attempts += 1;
                *connect_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = tasks.shutdown.wait() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    };
    info!("connected to redis");
    *connect_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    tokio::spawn(translate_pushes(
        push_rx,
        tasks.keys.clone(),
        tasks.signals.clone(),
        tasks.healthy.clone(),
    ));
    tokio::spawn(own_subscriptions(
        watch_rx,
        link.pubsub.clone(),
        tasks.keys,
        tasks.signals,
        tasks.shutdown.clone(),
    ));
    tokio::spawn(check_subscription_health(
        link.pubsub.clone(),
        tasks.timing.ping_interval,
        tasks.timing.response_timeout,
        tasks.healthy,
        tasks.watch_tx,
        tasks.shutdown,
    ));
    let _ = link_tx.send(Some(link));
}

/// Opens both connections and prepares Redis: version check, keyspace notifications.
async fn open_link(
    client: &redis::Client,
    timing: &RedisTiming,
    push_tx: mpsc::UnboundedSender<PushInfo>,
) -> Result<Link, StoreError> {
    let base = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timing.connect_timeout))
        .set_response_timeout(Some(timing.response_timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    let mut conn = ConnectionManager::new_with_config(client.clone(), base.clone())
        .await
        .map_err(unavailable)?;
    check_version(&mut conn).await?;
    enable_keyspace_notifications(&mut conn).await;
    let pubsub = ConnectionManager::new_with_config(
        client.clone(),
        base.set_push_sender(push_tx).set_automatic_resubscription(),
    )
    .await
    .map_err(unavailable)?;
    Ok(Link { conn, pubsub })
}

/// Subscribes and unsubscribes in the order asked, counting watches per topic, so a topic
/// released and re-acquired at once ends up subscribed.
async fn own_subscriptions(
    mut commands: mpsc::UnboundedReceiver<WatchCommand>,
    mut pubsub: ConnectionManager,
    keys: Keys,
    signals: mpsc::UnboundedSender<Signal>,
    shutdown: Shutdown,
) {
    let mut watched: HashMap<String, usize> = HashMap::new();
    loop {
        let command = tokio::select! {
            c = commands.recv() => match c { Some(c) => c, None => return },
            _ = shutdown.wait() => return,
        };
        match command {
            WatchCommand::Watch(topic, ack) => {
                let count = watched.entry(topic.clone()).or_insert(0);
                *count += 1;
                if *count == 1 {
                    if let Err(e) = pubsub.subscribe(&keys.channels(&topic)).await {
                        // Restore subscribes again once the connection is back.
                        warn!(topic, error = %e, "subscribing failed");
                    }
                }
                let _ = ack.send(());
            }
            WatchCommand::Unwatch(topic) => {
                if let Some(count) = watched.get_mut(&topic) {
                    *count -= 1;
                    if *count == 0 {
                        watched.remove(&topic);
                        if let Err(e) = pubsub.unsubscribe(&keys.channels(&topic)).await {
                            warn!(topic, error = %e, "unsubscribing failed");
                        }
                    }
                }
            }
            WatchCommand::Restore => {
                let channels: Vec<String> = watched.keys().flat_map(|t| keys.channels(t)).collect();
                for chunk in channels.chunks(1000) {
                    if let Err(e) = pubsub.subscribe(chunk).await {
                        warn!(error = %e, "resubscribing failed");
                    }
                }
                info!(
                    topics = watched.len(),
                    "redis subscriptions restored; catching up"
                );
                let _ = signals.send(Signal::CatchUpAll);
            }
        }
    }
}

/// Pings the subscription connection. A failure marks it unhealthy (and makes the driver
/// reconnect); the first success after that restores subscriptions and triggers a catch-up.
async fn check_subscription_health(
    mut pubsub: ConnectionManager,
    interval: Duration,
    timeout: Duration,
    healthy: Arc<AtomicBool>,
    watch_tx: mpsc::UnboundedSender<WatchCommand>,
    shutdown: Shutdown,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait() => return,
        }
        let ok = ping(&mut pubsub, timeout).await.is_ok();
        let was = healthy.swap(ok, Ordering::AcqRel);
        if ok && !was {
            let _ = watch_tx.send(WatchCommand::Restore);
        } else if !ok && was {
            warn!("redis subscription connection is unhealthy");
        }
    }
}

/// Turns pushes from the subscription connection into hub signals.
///
/// The script's XADD makes Redis send an `xadd` keyspace notification right before the script's
/// own announcement, in the same reply. An `xadd` notification not followed by the announcement
/// of the same topic was someone else's `XADD`: the topic is poked so the hub reads it.
async fn translate_pushes(
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    keys: Keys,
    signals: mpsc::UnboundedSender<Signal>,
    healthy: Arc<AtomicBool>,
) {
    let mut unmatched_xadd: Option<String> = None;
    loop {
        let push = if unmatched_xadd.is_some() {
            match tokio::time::timeout(DIRECT_XADD_SETTLE, pushes.recv()).await {
                Ok(p) => p,
                Err(_) => {
                    if let Some(topic) = unmatched_xadd.take() {
                        let _ = signals.send(Signal::Poke { topic });
                    }
                    continue;
                }
            }
        } else {
            pushes.recv().await
        };
        let Some(push) = push else { return };
        match push.kind {
            PushKind::Disconnection => {
                // Anything announced from now until the connection is back is lost; the health
                // check restores subscriptions and triggers the catch-up.
                healthy.store(false, Ordering::Release);
                if let Some(topic) = unmatched_xadd.take() {
                    let _ = signals.send(Signal::Poke { topic });
                }
                warn!("redis subscription connection dropped");
            }
            PushKind::Message => {
                let (Some(channel), Some(payload)) = (push.data.first(), push.data.get(1)) else {
                    continue;
                };
                let (Ok(channel), Ok(payload)) = (as_bytes(channel), as_bytes(payload)) else {
                    continue;
                };
                let channel = String::from_utf8_lossy(channel);
                match keys.parse_channel(&channel) {
                    Some(Channel::Keyspace(topic)) => match payload {
                        b"xadd" => {
                            if let Some(previous) = unmatched_xadd.replace(topic.to_owned()) {
                                let _ = signals.send(Signal::Poke { topic: previous });
                            }
                        }
                        // Trimming needs no action: readers find out through the gap rule.
                        b"xtrim" => {}
                        // Deleted, renamed, expired, XSETID…: let the hub read what is there.
                        _ => {
                            let _ = signals.send(Signal::Poke {
                                topic: topic.to_owned(),
                            });
                        }
                    },
                    Some(Channel::Live(topic)) => {
                        if unmatched_xadd.as_deref() == Some(topic) {
                            unmatched_xadd = None;
                        } else if let Some(previous) = unmatched_xadd.take() {
                            let _ = signals.send(Signal::Poke { topic: previous });
                        }
                        match parse_announcement(payload) {
                            Some(Announcement::Event(prev, event)) => {
                                let _ = signals.send(Signal::Appended {
                                    topic: topic.to_owned(),
                                    prev,
                                    event,
                                });
                            }
                            Some(Announcement::Id(id)) => {
                                let _ = signals.send(Signal::AppendedId {
                                    topic: topic.to_owned(),
                                    id,
                                });
                            }
                            None => {
                                debug!(topic, "unreadable announcement; reading the stream");
                                let _ = signals.send(Signal::Poke {
                                    topic: topic.to_owned(),
                                });
                            }
                        }
                    }
                    None => {}
                }
            }
            _ => {}
        }
    }
}

/// Largest payload announced with its event; larger ones are announced by id.
const ANNOUNCE_INLINE_MAX: usize = 16 * 1024;
/// Most payload bytes one append announces with their events; past it, by id. A batch of a
/// thousand 60 KB events then announces ~300 KB instead of 60 MB to every node.
const ANNOUNCE_CALL_BUDGET: usize = 256 * 1024;

/// What an announcement says.
enum Announcement {
    /// `<prev>\n<id>\n<type>\n<data>`: the event, and the entry before it.
    Event(StreamId, Event),
    /// `<prev>\n<id>`: an entry to read from the stream.
    Id(StreamId),
}

fn parse_announcement(payload: &[u8]) -> Option<Announcement> {
    let text = String::from_utf8_lossy(payload);
    let mut parts = text.splitn(4, '\n');
    let prev = parts.next()?.parse().ok()?;
    let id = parts.next()?.parse().ok()?;
    let Some(ty) = parts.next() else {
        return Some(Announcement::Id(id));
    };
    let data = parts.next()?.to_owned();
    let event = (!ty.is_empty()).then(|| ty.to_owned());
    Some(Announcement::Event(prev, Event { id, event, data }))
}

async fn check_version(conn: &mut ConnectionManager) -> Result<(), StoreError> {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .map_err(classify_error)?;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("0")
        .trim()
        .to_owned();
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < MIN_REDIS_MAJOR {
        return Err(StoreError::Internal(format!(
            "redis {version} is too old: ssegate needs Redis 7.0 or newer"
        )));
    }
    Ok(())
}

/// Adds `K` (keyspace channel) and `t` (stream commands) to `notify-keyspace-events`, keeping
/// whatever else is set. Managed Redis services may forbid CONFIG; then direct XADDs still arrive,
/// within `catchup_interval`.
async fn enable_keyspace_notifications(conn: &mut ConnectionManager) {
    let current: Result<HashMap<String, String>, _> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .query_async(conn)
        .await;
    let flags = match current {
        Ok(map) => map
            .get("notify-keyspace-events")
            .cloned()
            .unwrap_or_default(),
        Err(e) => {
            warn!(error = %e, "cannot read notify-keyspace-events; direct XADDs arrive within catchup_interval");
            return;
        }
    };
    let mut wanted = flags.clone();
    if !wanted.contains('K') {
        wanted.push('K');
    }
    if !wanted.contains('t') && !wanted.contains('A') {
        wanted.push('t');
    }
    if wanted == flags {
        return;
    }
    let set: Result<(), _> = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg(&wanted)
        .query_async(conn)
        .await;
    match set {
        Ok(()) => info!(
            flags = wanted,
            "enabled keyspace notifications for direct XADDs"
        ),
        Err(e) => warn!(
            error = %e,
            "cannot set notify-keyspace-events (set it to include Kt); direct XADDs arrive within catchup_interval"
        ),
    }
}

/// PING with a deadline: a half-dead connection fails here instead of hanging.
async fn ping(conn: &mut ConnectionManager, timeout: Duration) -> Result<(), StoreError> {
    let cmd = redis::cmd("PING");
    match tokio::time::timeout(timeout, cmd.query_async::<()>(conn)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(classify_error(e)),
        Err(_) => Err(StoreError::Unavailable(
            "redis did not answer PING in time".into(),
        )),
    }
}

fn unavailable(e: RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn classify_error(e: RedisError) -> StoreError {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Internal(e.to_string())
    }
}

fn bad_reply(what: &str) -> StoreError {
    StoreError::Internal(format!("unexpected reply from redis ({what})"))
}

fn as_array(v: &Value) -> Result<&[Value], StoreError> {
    match v {
        Value::Array(items) | Value::Set(items) => Ok(items),
        other => Err(bad_reply(&format!("expected an array, got {other:?}"))),
    }
}

fn as_bytes(v: &Value) -> Result<&[u8], StoreError> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.as_bytes()),
        Value::VerbatimString { text, .. } => Ok(text.as_bytes()),
        _ => Err(bad_reply("expected a string")),
    }
}

fn as_text(v: Option<&Value>) -> Result<String, StoreError> {
    match v.ok_or_else(|| bad_reply("missing field"))? {
        Value::Int(n) => Ok(n.to_string()),
        other => Ok(String::from_utf8_lossy(as_bytes(other)?).into_owned()),
    }
}

fn parse_id(v: &Value) -> Result<StreamId, StoreError> {
    as_text(Some(v))?
        .parse()
        .map_err(|_| bad_reply("stream id"))
}

/// Parses the stream facts returned by `read.lua`: last generated id, max deleted id, entries
/// added, length, first retained id (all '' when the stream does not exist).
fn parse_facts(fields: Option<&[Value]>) -> Result<Option<StreamFacts>, StoreError> {
    let fields = fields.ok_or_else(|| bad_reply("stream facts"))?;
    let text = |i: usize| as_text(fields.get(i));
    let last_generated = text(0)?;
    if last_generated.is_empty() {
        return Ok(None);
    }
    let id = |s: String, what| s.parse::<StreamId>().map_err(|_| bad_reply(what));
    let number = |s: String, what| s.parse::<u64>().map_err(|_| bad_reply(what));
    let added = number(text(2)?, "entries-added")?;
    let length = number(text(3)?, "length")?;
    Ok(Some(StreamFacts {
        first_retained: if length > 0 {
            Some(id(text(4)?, "recorded-first-entry-id")?)
        } else {
            None
        },
        last_generated: id(last_generated, "last-generated-id")?,
        max_deleted: id(text(1)?, "max-deleted-entry-id")?,
        removed_any: added > length,
    }))
}

/// Parses XRANGE output: `[[id, [field, value, ...]], ...]`. The payload is the `data` field and
/// the type the `event` field, as direct publishers are told to write them.
fn parse_entries(v: Option<&Value>) -> Result<Vec<Event>, StoreError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    as_array(v)?
        .iter()
        .map(|entry| {
            let parts = as_array(entry)?;
            let id = parse_id(parts.first().ok_or_else(|| bad_reply("entry id"))?)?;
            let mut event = Event {
                id,
                event: None,
                data: String::new(),
            };
            if let Some(fields) = parts.get(1) {
                for pair in as_array(fields)?.chunks(2) {
                    let [name, value] = pair else { continue };
                    let value = String::from_utf8_lossy(as_bytes(value)?).into_owned();
                    match as_bytes(name)? {
                        b"data" => event.data = value,
                        b"event" if !value.is_empty() => event.event = Some(value),
                        _ => {}
                    }
                }
            }
            Ok(event)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_parse_back_to_topics() {
        let keys = Keys {
            prefix: "ssegate".into(),
            keyspace_head: "__keyspace@0__:ssegate:{".into(),
        };
        assert_eq!(keys.stream("a.b"), "ssegate:{a.b}");
        assert!(matches!(
            keys.parse_channel(&keys.live_channel("a:live")),
            Some(Channel::Live("a:live"))
        ));
        assert!(matches!(
            keys.parse_channel(&keys.keyspace_channel("x")),
            Some(Channel::Keyspace("x"))
        ));
        assert!(keys.parse_channel("other:{x}:live").is_none());
    }

    #[test]
    fn announcements_keep_newlines_in_data() {
        let Some(Announcement::Event(prev, e)) = parse_announcement(b"1-0\n2-0\nupd\nline1\nline2")
        else {
            panic!("an event");
        };
        assert_eq!(prev, StreamId::new(1, 0));
        assert_eq!(e.id, StreamId::new(2, 0));
        assert_eq!(e.event.as_deref(), Some("upd"));
        assert_eq!(e.data, "line1\nline2");
        let Some(Announcement::Event(_, e)) = parse_announcement(b"0-0\n2-0\n\n") else {
            panic!("an event");
        };
        assert_eq!(e.event, None);
        assert_eq!(e.data, "");
        assert!(matches!(
            parse_announcement(b"1-0\n2-0"),
            Some(Announcement::Id(id)) if id == StreamId::new(2, 0)
        ));
        assert!(parse_announcement(b"garbage").is_none());
    }
}
