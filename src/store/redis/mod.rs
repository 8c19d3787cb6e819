//! The Redis store: a stream per topic, live announcements through pub/sub; on one Redis or on
//! a Redis Cluster.
//!
//! Key layout (the `{topic}` hash tag keeps each topic's keys and channels in one cluster slot):
//!
//! | what | name |
//! |---|---|
//! | stream | `<prefix>:{<topic>}` |
//! | live channel | `<prefix>:{<topic>}:live` |
//! | idempotency key | `<prefix>:{<topic>}:idem:<key>` (one per keyed event, for the window) |
//! | label stream | `<prefix>:{<topic>}:label:<label>` (the ids of the events filed under a label) |
//! | tombstone | `<prefix>:{<topic>}:last` (only with `retention.idle_ttl`) |
//! | presence | `<prefix>:{<topic>}:presence` and `<prefix>:presence:…` (see `presence`) |
//!
//! Appends run as one Lua script (`append.lua`): XADD, then PUBLISH (in a cluster SPUBLISH,
//! which only the shard owning the topic carries) of the whole event together with the id of the
//! entry before it (a run of several events, a topic's requests in one call: one PUBLISH after
//! its last, carrying them all), and trimming. Publish requests that arrive while a call is in
//! flight share the next one (`commit`). A node that sees an announcement whose previous id is not the last
//! one it delivered knows it missed something and reads the stream. On one Redis that notifies
//! every XADD, the previous id is not looked up: nodes count each topic's `xadd` notifications
//! against the announcement after them instead (`subscriptions`). Wherever every XADD is
//! notified (on one Redis or every master of a cluster: `Link::keyspace`), a topic no node
//! listens to (`audience`) is appended with plain XADDs and not announced, since a node that
//! listens after all is told by those notifications. With `redis.min_replicas_ack`, `WAIT`
//! follows the script (or, on one Redis, the XADDs) in the same pipeline, on the same master.
//!
//! Programs may also `XADD` straight into a stream. Those appends are seen through keyspace
//! notifications (`notify-keyspace-events` with `K` and `t`, enabled at start where `CONFIG SET`
//! is allowed; in a cluster subscribed on the node owning each topic) and, whatever happens to
//! notifications, by the hub's periodic catch-up.
//!
//! Two connections are used: one for commands and one, RESP3, that only carries subscriptions.
//! A health task pings the latter and, in a cluster, watches the slot assignment; after an
//! outage, a failover or a reshard it resubscribes every watched topic and asks the hub to catch
//! every topic up from its stream.
//!
//! # Layout
//!
//! - `audience`: which topics a node listens to, so that the others are not announced.
//! - `commit`: group commit: appends waiting for the same call share it.
//! - `connection`: one Redis or a cluster behind one interface; detection, version check.
//! - `keys`: key and channel names.
//! - `scripts`: the Lua scripts and how they are called (with `WAIT` when asked).
//! - `subscriptions`: subscribing, following the topology, pushes into hub signals.
//! - `presence`: the presence registry (`heartbeat.lua`).
//! - `reply`: reply parsing and error classification.

mod audience;
mod commit;
mod connection;
mod keys;
mod presence;
mod reply;
mod scripts;
mod subscriptions;

pub use self::presence::RedisRegistry;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::stream::{self, StreamExt};
use redis::cluster_routing::Slot;
use redis::streams::StreamReadReply;
use redis::{PushInfo, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use self::commit::{AppendOutcome, AppendRequest, AppendSettings};
use self::connection::{open_link, ping, query, replace_wedged_commands, run_placed, Link, Target};
use self::keys::{Keys, IDEMPOTENCY, LABEL, PRESENCE};
use self::reply::{as_array, as_text, bad_reply, parse_entries, parse_facts, parse_id, parse_stat};
use self::scripts::{Call, Replication, Scripts};
use self::subscriptions::{
    check_health, own_subscriptions, translate_pushes, Health, Holes, WatchCommand,
    ANNOUNCE_CALL_BUDGET, ANNOUNCE_INLINE_MAX,
};
use super::{classify, Notice, Page, Signal, Store, StoreError, TopicStat, ADVANCED_BATCH};
use crate::config::{RedisSettings, Settings};
use crate::event::{Event, NewEvent, StreamId, Topic};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Streams checked at once by [`Store::advanced`] in a cluster, where each slot is its own
/// command.
const CLUSTER_ADVANCED_CONCURRENCY: usize = 32;

/// Keys one step of a topic's delete visits (`SCAN … COUNT`).
const DELETE_SCAN_COUNT: usize = 10_000;

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
    /// The append script's fixed arguments, for the committer.
    append_settings: AppendSettings,
    /// Runs commands with deadlines, replication checks and metrics.
    runner: Runner,
    /// The committer's inbox, started by the first append (after metrics were attached).
    committer: OnceLock<mpsc::UnboundedSender<Vec<AppendRequest>>>,
    /// Requests to the task that owns the subscriptions.
    watch_tx: mpsc::UnboundedSender<WatchCommand>,
    /// Whether the subscription connection answered its last health check.
    pubsub_healthy: Arc<AtomicBool>,
    /// Handed out once, by `take_signals`.
    signal_rx: Mutex<Option<mpsc::UnboundedReceiver<Signal>>>,
}

/// Runs store commands: an overall deadline, the replica check, health and metrics. Shared by
/// the store and the committer.
#[derive(Clone)]
pub(super) struct Runner {
    /// Per-command deadline; the driver's own covers a single reply only.
    response_timeout: Duration,
    /// `redis.min_replicas_ack` and its timeout; `None` when publishes do not wait for replicas.
    replication: Option<Replication>,
    /// Whether the last command on the command connection got an answer.
    command_healthy: Arc<AtomicBool>,
    /// Command latency and errors, when the gateway keeps metrics.
    metrics: Option<Arc<Metrics>>,
}

impl RedisStore {
    /// Prepares the store and starts connecting in the background: the gateway serves (and
    /// reports not-ready) while Redis is unreachable. Only a malformed URL fails here.
    pub fn connect(settings: &Settings, shutdown: Shutdown) -> Result<RedisStore, StoreError> {
        let urls = settings
            .redis_url
            .as_deref()
            .ok_or_else(|| StoreError::Internal("no redis_url configured".into()))?;
        let target = Target::parse(urls)?;
        let keys = Keys::new(&settings.key_prefix, target.db);
        let (signal_tx, signal_rx) = mpsc::unbounded_channel();
        let (watch_tx, watch_rx) = mpsc::unbounded_channel();
        let (link_tx, link) = watch::channel(None);
        let pubsub_healthy = Arc::new(AtomicBool::new(true));
        let connect_error = Arc::new(Mutex::new(None));
        let redis = settings.redis.clone();

        let tasks = Tasks {
            keys: keys.clone(),
            signals: signal_tx,
            watch_tx: watch_tx.clone(),
            healthy: pubsub_healthy.clone(),
            redis: redis.clone(),
            shutdown,
        };
        tokio::spawn(establish(
            target,
            link_tx,
            watch_rx,
            connect_error.clone(),
            tasks,
        ));

        Ok(RedisStore {
            link,
            connect_error,
            keys,
            scripts: Scripts::new(),
            append_settings: AppendSettings {
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
                announce_inline_max: ANNOUNCE_INLINE_MAX,
                announce_call_budget: ANNOUNCE_CALL_BUDGET,
            },
            runner: Runner {
                response_timeout: redis.response_timeout,
                replication: (redis.min_replicas_ack > 0).then_some(Replication {
                    replicas: redis.min_replicas_ack,
                    timeout: redis.replica_ack_timeout,
                }),
                command_healthy: Arc::new(AtomicBool::new(true)),
                metrics: None,
            },
            committer: OnceLock::new(),
            watch_tx,
            pubsub_healthy,
            signal_rx: Mutex::new(Some(signal_rx)),
        })
    }

    /// Counts command latency and errors in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.runner.metrics = Some(metrics);
        self
    }

    /// The presence registry, on the store's connections.
    pub fn registry(&self) -> RedisRegistry {
        RedisRegistry {
            link: self.link.clone(),
            keys: self.keys.clone(),
            runner: self.runner.clone(),
            heartbeat: scripts::Lua::new(include_str!("heartbeat.lua")),
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

    /// The topics of one batch (one slot in a cluster) whose stream has an entry after the id.
    async fn advanced_batch(
        &self,
        mut conn: connection::Commands,
        batch: &[&(Topic, StreamId)],
    ) -> Result<Vec<Topic>, StoreError> {
        let keys: Vec<String> = batch
            .iter()
            .map(|(topic, _)| self.keys.stream(topic.as_str()))
            .collect();
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(1).arg("STREAMS").arg(&keys);
        for (_, after) in batch {
            cmd.arg(after.to_string());
        }
        let started = Instant::now();
        let reply: Result<Option<StreamReadReply>, StoreError> =
            query(&mut conn, &cmd, self.runner.response_timeout).await;
        self.runner.observe(started, &reply);
        let Some(reply) = reply? else {
            return Ok(Vec::new());
        };
        let index: HashMap<&str, &Topic> = keys
            .iter()
            .map(String::as_str)
            .zip(batch.iter().map(|(topic, _)| topic))
            .collect();
        Ok(reply
            .keys
            .iter()
            .filter(|s| !s.ids.is_empty())
            .filter_map(|s| index.get(s.key.as_str()).map(|t| (*t).clone()))
            .collect())
    }
}

impl RedisStore {
    /// A page after `cursor` (`read.lua`), or of the events under `labels` (`read_labels.lua`).
    async fn read_page(
        &self,
        topic: &Topic,
        labels: &[String],
        cursor: StreamId,
        count: usize,
    ) -> Result<Page, StoreError> {
        let script = if labels.is_empty() {
            &self.scripts.read
        } else {
            &self.scripts.read_labels
        };
        let mut invocation = Call::new(script, 2 + labels.len());
        invocation
            .key(self.keys.stream(topic.as_str()))
            .key(self.keys.tombstone(topic.as_str()));
        let mut name = String::new();
        for label in labels {
            self.keys.write_name(&mut name, topic.as_str(), LABEL);
            name.push_str(label);
            invocation.key(name.as_str());
        }
        invocation.arg(cursor.to_string()).arg(count);
        let reply = self
            .runner
            .run(&mut self.link()?.conn, &invocation, None)
            .await?;
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
}

#[async_trait]
impl Store for RedisStore {
    async fn append(
        &self,
        topic: &Topic,
        events: Vec<NewEvent>,
    ) -> Result<Vec<StreamId>, StoreError> {
        let (request, answer) = self.append_request(&self.link()?, topic.clone(), events);
        self.commit(vec![request])?;
        answered(answer).await
    }

    /// The runs go to the committer as one submission, so that it puts each group's runs in
    /// one call (as many as a call carries) and sends the groups' calls at once: a batch over
    /// 100 topics costs one round trip on one Redis, not 100 in a row.
    async fn append_runs(
        &self,
        runs: Vec<(Topic, Vec<NewEvent>)>,
    ) -> Vec<Result<Vec<StreamId>, StoreError>> {
        let link = match self.link() {
            Ok(link) => link,
            Err(e) => return runs.iter().map(|_| Err(e.clone())).collect(),
        };
        let (requests, answers): (Vec<_>, Vec<_>) = runs
            .into_iter()
            .map(|(topic, events)| self.append_request(&link, topic, events))
            .unzip();
        if let Err(e) = self.commit(requests) {
            return answers.iter().map(|_| Err(e.clone())).collect();
        }
        // All are answered at about the same time, so one after another takes no longer than
        // all at once; `join_all` over a batch's 100 answers cost 7 % of the gateway's time.
        let mut outcomes = Vec::with_capacity(answers.len());
        for answer in answers {
            outcomes.push(answered(answer).await);
        }
        outcomes
    }

    async fn read(
        &self,
        topic: &Topic,
        cursor: StreamId,
        count: usize,
    ) -> Result<Page, StoreError> {
        self.read_page(topic, &[], cursor, count).await
    }

    async fn read_labelled(
        &self,
        topic: &Topic,
        labels: &[String],
        cursor: StreamId,
        count: usize,
    ) -> Result<Page, StoreError> {
        self.read_page(topic, labels, cursor, count).await
    }

    async fn read_back(
        &self,
        topic: &Topic,
        before: Option<StreamId>,
        count: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(self.keys.stream(topic.as_str()));
        match before {
            Some(before) => cmd.arg(format!("({before}")),
            None => cmd.arg("+"),
        };
        cmd.arg("-").arg("COUNT").arg(count);
        let started = Instant::now();
        let reply: Result<Value, StoreError> =
            query(&mut self.link()?.conn, &cmd, self.runner.response_timeout).await;
        self.runner.observe(started, &reply);
        parse_entries(Some(&reply?))
    }

    async fn stat(&self, topic: &Topic) -> Result<TopicStat, StoreError> {
        let mut invocation = Call::new(&self.scripts.stat, 2);
        invocation
            .key(self.keys.stream(topic.as_str()))
            .key(self.keys.tombstone(topic.as_str()));
        let reply = self
            .runner
            .run(&mut self.link()?.conn, &invocation, None)
            .await?;
        parse_stat(&reply)
    }

    /// `delete.lua` step by step: the first call tells the nodes and removes the stream, each
    /// one removes a `SCAN` step's worth of the topic's other keys. `SCAN` walks the whole
    /// keyspace of the node holding the topic (a pattern does not narrow what it visits), so a
    /// delete costs about one call per [`DELETE_SCAN_COUNT`] keys there: rare, and never one
    /// long call holding Redis.
    async fn delete(&self, topic: &Topic) -> Result<Option<StreamId>, StoreError> {
        let mut conn = self.link()?.conn;
        let publish = if conn.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let pattern = self.keys.others_pattern(topic.as_str());
        let mut name = String::new();
        self.keys.write_name(&mut name, topic.as_str(), PRESENCE);
        let presence = name.clone();
        let channel = self.keys.live_channel(topic.as_str());
        let mut cursor = "0".to_owned();
        let mut first = true;
        let mut upto = None;
        loop {
            let mut invocation = Call::new(&self.scripts.delete, 2);
            invocation
                .key(self.keys.stream(topic.as_str()))
                .key(self.keys.tombstone(topic.as_str()))
                .arg(if first { "1" } else { "0" })
                .arg(cursor.as_str())
                .arg(pattern.as_str())
                .arg(presence.as_str())
                .arg(channel.as_str())
                .arg(publish)
                .arg(DELETE_SCAN_COUNT)
                .arg(self.append_settings.idle_ttl_ms);
            let reply = self.runner.run(&mut conn, &invocation, None).await?;
            let parts = as_array(&reply)?;
            cursor = as_text(parts.first())?;
            if first {
                let id = as_text(parts.get(1))?;
                if !id.is_empty() {
                    upto = Some(id.parse().map_err(|_| bad_reply("highest id"))?);
                }
            }
            first = false;
            if cursor == "0" {
                return Ok(upto);
            }
        }
    }

    async fn fence(&self, topic: &Topic, above: StreamId) -> Result<bool, StoreError> {
        let mut invocation = Call::new(&self.scripts.fence, 1);
        invocation
            .key(self.keys.stream(topic.as_str()))
            .arg(above.to_string())
            .arg(self.append_settings.idle_ttl_ms);
        let reply = self
            .runner
            .run(&mut self.link()?.conn, &invocation, None)
            .await?;
        Ok(matches!(reply, redis::Value::Int(1)))
    }

    async fn file_until(&self, list: &str, entry: &str, until_ms: u64) -> Result<(), StoreError> {
        let now = crate::event::unix_ms();
        let mut invocation = Call::new(&self.scripts.file_until, 1);
        invocation
            .key(self.keys.list(list))
            .arg(entry)
            .arg(until_ms)
            .arg(now);
        self.runner
            .run(&mut self.link()?.conn, &invocation, None)
            .await
            .map(|_| ())
    }

    async fn filed(&self, list: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let now = crate::event::unix_ms();
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(self.keys.list(list))
            .arg(format!("({now}"))
            .arg("+inf")
            .arg("BYSCORE")
            .arg("WITHSCORES");
        let started = Instant::now();
        let reply: Result<Vec<(String, f64)>, StoreError> =
            query(&mut self.link()?.conn, &cmd, self.runner.response_timeout).await;
        self.runner.observe(started, &reply);
        Ok(reply?
            .into_iter()
            .map(|(entry, until)| (entry, until as u64))
            .collect())
    }

    async fn keyed(&self, topic: &Topic, key: &str) -> Result<Option<StreamId>, StoreError> {
        let mut name = String::new();
        self.keys.write_name(&mut name, topic.as_str(), IDEMPOTENCY);
        name.push_str(key);
        let mut cmd = redis::cmd("GET");
        cmd.arg(name);
        let started = Instant::now();
        let reply: Result<Option<String>, StoreError> =
            query(&mut self.link()?.conn, &cmd, self.runner.response_timeout).await;
        self.runner.observe(started, &reply);
        match reply? {
            None => Ok(None),
            Some(id) => id
                .parse()
                .map(Some)
                .map_err(|_| StoreError::Internal(format!("idempotency key holds `{id}`"))),
        }
    }

    async fn event_at(&self, topic: &Topic, id: StreamId) -> Result<Option<Event>, StoreError> {
        let id = id.to_string();
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(self.keys.stream(topic.as_str())).arg(&id).arg(&id);
        let started = Instant::now();
        let reply: Result<Value, StoreError> =
            query(&mut self.link()?.conn, &cmd, self.runner.response_timeout).await;
        self.runner.observe(started, &reply);
        Ok(parse_entries(Some(&reply?))?.into_iter().next())
    }

    async fn tail(&self, topic: &Topic) -> Result<StreamId, StoreError> {
        let mut invocation = Call::new(&self.scripts.tail, 2);
        invocation
            .key(self.keys.stream(topic.as_str()))
            .key(self.keys.tombstone(topic.as_str()));
        let reply = self
            .runner
            .run(&mut self.link()?.conn, &invocation, None)
            .await?;
        parse_id(&reply)
    }

    /// One non-blocking `XREAD COUNT 1 STREAMS k1 … kN id1 … idN` per [`ADVANCED_BATCH`]
    /// topics: it answers only for the streams that have an entry after their id. A cluster
    /// refuses keys of several slots in one command, so there the topics are grouped by slot and
    /// the groups read a few at a time.
    async fn advanced(&self, positions: &[(Topic, StreamId)]) -> Result<Vec<Topic>, StoreError> {
        let conn = self.link()?.conn;
        let batches: Vec<Vec<&(Topic, StreamId)>> = if conn.is_cluster() {
            let mut by_slot: HashMap<Slot, Vec<&(Topic, StreamId)>> = HashMap::new();
            for position in positions {
                let slot = Slot::for_key(self.keys.stream(position.0.as_str()));
                by_slot.entry(slot).or_default().push(position);
            }
            by_slot
                .into_values()
                .flat_map(|group| {
                    group
                        .chunks(ADVANCED_BATCH)
                        .map(<[_]>::to_vec)
                        .collect::<Vec<_>>()
                })
                .collect()
        } else {
            positions
                .chunks(ADVANCED_BATCH)
                .map(|c| c.iter().collect())
                .collect()
        };
        // The futures are made first: a closure in the stream trips the compiler's lifetime
        // inference for `Send` futures.
        let reads: Vec<_> = batches
            .iter()
            .map(|batch| self.advanced_batch(conn.clone(), batch))
            .collect();
        let results: Vec<Result<Vec<Topic>, StoreError>> = stream::iter(reads)
            .buffered(CLUSTER_ADVANCED_CONCURRENCY)
            .collect()
            .await;
        let mut moved = std::collections::HashSet::new();
        for result in results {
            moved.extend(result?);
        }
        // In the order asked, whichever order the slots were read in.
        Ok(positions
            .iter()
            .filter(|(topic, _)| moved.contains(topic))
            .map(|(topic, _)| topic.clone())
            .collect())
    }

    /// A `PUBLISH` (in a cluster `SPUBLISH`) of `!\n<type>\n<data>` on each topic's live
    /// channel: nodes tell it from an announcement by its first line, which is not an id (a
    /// node of an older version reads the stream instead, and finds nothing new).
    async fn notify(&self, notices: Vec<Notice>) -> Result<(), StoreError> {
        let conn = self.link()?.conn;
        let publish = if conn.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let commands = notices
            .iter()
            .map(|notice| {
                let channel = self.keys.live_channel(&notice.topic);
                let mut cmd = redis::cmd(publish);
                let mut payload = String::with_capacity(notice.event.len() + notice.data.len() + 3);
                payload.push_str("!\n");
                payload.push_str(&notice.event);
                payload.push('\n');
                payload.push_str(&notice.data);
                cmd.arg(&channel).arg(payload);
                (channel, cmd)
            })
            .collect();
        let started = Instant::now();
        let result = run_placed(&conn, commands, self.runner.response_timeout)
            .await
            .map(|_| ());
        self.runner.observe(started, &result);
        result
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
        let command =
            self.link.borrow().is_some() && self.runner.command_healthy.load(Ordering::Acquire);
        vec![
            ("command", command),
            ("subscription", self.pubsub_healthy.load(Ordering::Acquire)),
        ]
    }

    async fn ready(&self) -> Result<(), StoreError> {
        ping(&mut self.link()?.conn, self.runner.response_timeout).await?;
        if !self.pubsub_healthy.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable(
                "the redis subscription connection is down".into(),
            ));
        }
        Ok(())
    }
}

impl RedisStore {
    /// A run's request for the committer, grouped by the slot its keys are in (in a cluster),
    /// and where its answer comes.
    fn append_request(
        &self,
        link: &Link,
        topic: Topic,
        events: Vec<NewEvent>,
    ) -> (AppendRequest, oneshot::Receiver<AppendOutcome>) {
        let conn = link.conn.clone();
        let group = conn
            .is_cluster()
            .then(|| Slot::for_key(self.keys.stream(topic.as_str())));
        let (reply, answer) = oneshot::channel();
        let request = AppendRequest {
            group,
            conn,
            notified: link.notified.load(Ordering::Acquire),
            keyspace: link.keyspace.load(Ordering::Acquire),
            topic,
            events,
            reply,
        };
        (request, answer)
    }

    /// Hands requests to the committer (started by the first append, after metrics were
    /// attached) as one submission.
    fn commit(&self, requests: Vec<AppendRequest>) -> Result<(), StoreError> {
        let committer = self.committer.get_or_init(|| {
            commit::spawn(
                self.scripts.append.clone(),
                self.append_settings.clone(),
                self.keys.clone(),
                self.runner.clone(),
            )
        });
        committer
            .send(requests)
            .map_err(|_| StoreError::Unavailable("the gateway is shutting down".into()))
    }
}

/// A request's answer from the committer.
async fn answered(answer: oneshot::Receiver<AppendOutcome>) -> AppendOutcome {
    answer
        .await
        .map_err(|_| StoreError::Unavailable("the gateway is shutting down".into()))?
}

impl Runner {
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

    /// Runs one script with an overall deadline; with `replication`, waits for the replicas too
    /// and fails (retryably) if too few confirmed.
    async fn run(
        &self,
        conn: &mut connection::Commands,
        call: &Call<'_>,
        replication: Option<Replication>,
    ) -> Result<Value, StoreError> {
        let started = Instant::now();
        // Twice the per-reply timeout: the script may have to be loaded once; plus the wait.
        let deadline =
            self.response_timeout * 2 + replication.map_or(Duration::ZERO, |r| r.timeout);
        let result = match tokio::time::timeout(deadline, call.invoke(conn, replication)).await {
            Ok(result) => result.map_err(reply::classify_error),
            Err(_) => Err(StoreError::Unavailable(
                "redis did not answer in time".into(),
            )),
        };
        let result = result.and_then(|(value, acked)| match (replication, acked) {
            (Some(wanted), Some(acked)) if acked < wanted.replicas => {
                Err(too_few_replicas(i64::from(acked), wanted))
            }
            _ => Ok(value),
        });
        self.observe(started, &result);
        result
    }

    /// Runs one pipeline with an overall deadline, each command's answer its own (an error
    /// answer among them is a `Value::ServerError`); with `replication`, `WAIT`s behind it and
    /// fails (retryably) if too few replicas confirmed. `None`: the pipeline was a transaction
    /// (`atomic`) that Redis refused whole (`EXECABORT`), applying none of it.
    async fn run_pipeline(
        &self,
        conn: &mut connection::Commands,
        mut pipe: redis::Pipeline,
        replication: Option<Replication>,
    ) -> Result<Option<Vec<Value>>, StoreError> {
        let started = Instant::now();
        pipe.ignore_errors();
        if let Some(r) = replication {
            pipe.cmd("WAIT")
                .arg(r.replicas)
                .arg(r.timeout.as_millis() as u64);
        }
        let deadline = self.response_timeout + replication.map_or(Duration::ZERO, |r| r.timeout);
        let result =
            match tokio::time::timeout(deadline, pipe.query_async::<Vec<Value>>(conn)).await {
                Ok(Err(e))
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ExecAbort) =>
                {
                    Ok(None)
                }
                Ok(result) => result.map(Some).map_err(reply::classify_error),
                Err(_) => Err(StoreError::Unavailable(
                    "redis did not answer in time".into(),
                )),
            };
        let result = result.and_then(|answers| match (replication, answers) {
            (Some(wanted), Some(mut answers)) => match answers.pop() {
                Some(Value::Int(acked)) if acked >= i64::from(wanted.replicas) => Ok(Some(answers)),
                Some(Value::Int(acked)) => Err(too_few_replicas(acked, wanted)),
                _ => Err(bad_reply("WAIT")),
            },
            (_, answers) => Ok(answers),
        });
        self.observe(started, &result);
        result
    }

    /// Counts appends that wait for their group's next call (negative: taken into a call).
    fn appends_waiting(&self, change: i64) {
        if let Some(m) = &self.metrics {
            m.redis_appends_waiting.inc_by(change);
        }
    }

    /// Counts one append call.
    fn append_call(&self) {
        if let Some(m) = &self.metrics {
            m.redis_append_calls.inc();
        }
    }
}

/// A write that fewer replicas than `wanted` confirmed: stored, but not as safely as asked.
fn too_few_replicas(acked: i64, wanted: Replication) -> StoreError {
    StoreError::Unavailable(format!(
        "stored, but only {acked} of {} replicas confirmed within {:?}; retry with the same idempotency key",
        wanted.replicas, wanted.timeout
    ))
}

/// What the background tasks share once connected.
struct Tasks {
    keys: Keys,
    signals: mpsc::UnboundedSender<Signal>,
    watch_tx: mpsc::UnboundedSender<WatchCommand>,
    healthy: Arc<AtomicBool>,
    redis: RedisSettings,
    shutdown: Shutdown,
}

/// Connects (retrying with backoff until Redis answers), then starts the tasks that own the
/// subscriptions.
async fn establish(
    target: Target,
    link_tx: watch::Sender<Option<Link>>,
    watch_rx: mpsc::UnboundedReceiver<WatchCommand>,
    connect_error: Arc<Mutex<Option<String>>>,
    tasks: Tasks,
) {
    let (push_tx, push_rx) = mpsc::unbounded_channel::<PushInfo>();
    let mut delay = Duration::from_millis(100);
    let mut attempts = 0u32;
    let link = loop {
        match open_link(&target, &tasks.redis, push_tx.clone()).await {
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
    info!(cluster = link.conn.is_cluster(), "connected to redis");
    *connect_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    let holes = Arc::new(Holes::default());
    tokio::spawn(translate_pushes(
        push_rx,
        tasks.keys.clone(),
        tasks.signals.clone(),
        tasks.watch_tx.clone(),
        tasks.healthy.clone(),
        holes.clone(),
    ));
    tokio::spawn(own_subscriptions(
        watch_rx,
        link.pubsub.clone(),
        tasks.keys,
        tasks.signals,
        holes.clone(),
        tasks.shutdown.clone(),
    ));
    tokio::spawn(check_health(Health {
        pubsub: link.pubsub.clone(),
        interval: tasks.redis.ping_interval,
        timeout: tasks.redis.response_timeout,
        healthy: tasks.healthy,
        watch_tx: tasks.watch_tx,
        notified: link.notified.clone(),
        keyspace: link.keyspace.clone(),
        holes,
        shutdown: tasks.shutdown.clone(),
    }));
    let cluster = link.conn.is_cluster();
    let _ = link_tx.send(Some(link));
    if cluster {
        tokio::spawn(replace_wedged_commands(
            link_tx,
            tasks.redis.ping_interval,
            tasks.redis.response_timeout,
            tasks.shutdown,
        ));
    }
}
