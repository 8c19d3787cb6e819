//! Group commit: publish requests waiting for the same Redis call share one round trip and one
//! script call, as a database's log writer or a Kafka producer amortise their commits.
//!
//! One task, the committer, owns every append. Requests are grouped where one script may touch
//! all their keys: on one Redis every topic is in one place, so all requests form one group; in
//! a cluster each hash slot is a group. A request whose group has no call in flight goes out at
//! once, alone, so an idle gateway adds no latency. Requests arriving while their group's call
//! is in flight wait, in arrival order, and go out together in the group's next call; only when
//! they add up to a batch's worth of events do they go as a second call beside the first.
//!
//! Inside a call the script applies the requests one after another, each on its own: a
//! request's events are consecutive in its stream, each gets its own ids and idempotency
//! decision, and a request the script refuses fails alone. A call that fails as a whole (Redis
//! unreachable, no answer in time, too few replicas confirmed) fails exactly its own requests;
//! those waiting for the next call are not touched. A timed-out call may still have been
//! applied: its requests are answered `503`, and a retry with the same idempotency keys gets the
//! ids they were given.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;

use futures_util::stream::{FuturesUnordered, StreamExt};
use redis::cluster_routing::Slot;
use redis::{Script, Value};
use tokio::sync::{mpsc, oneshot};

use super::connection::Commands;
use super::keys::{Keys, IDEMPOTENCY, LIVE, TOMBSTONE};
use super::reply::{as_array, as_bytes, bad_reply};
use super::scripts::Call;
use super::Runner;
use crate::event::{NewEvent, StreamId, Topic};
use crate::store::StoreError;

/// Calls a group may have in flight at once. A second keeps Redis busy while the gateway answers
/// one call and builds the next: with one, batched publishes went 5–10 % slower than with every
/// request its own call, with two 25 % faster. Calls go out in order on one connection, so Redis
/// applies them in arrival order.
const CALLS_IN_FLIGHT: usize = 2;
/// Waiting events that justify a second call in flight. Fewer wait for the call in flight and
/// share the next: single events sent as a second call each lost 6 % of throughput.
const SECOND_CALL_EVENTS: usize = 64;
/// Most events one call carries (a single request larger than this still goes, alone): Redis
/// runs a script to its end, so a call's size bounds how long others wait on that shard.
const MAX_CALL_EVENTS: usize = 1000;
/// Most argument bytes one call carries (likewise).
const MAX_CALL_BYTES: usize = 1 << 20;

/// One publish request's append: one topic, its events in order.
pub(super) struct AppendRequest {
    /// Requests of one group may share a call: the topic's slot in a cluster, `None` on one
    /// Redis (every topic in one place).
    pub(super) group: Option<Slot>,
    /// The command connection the request found; calls go out on the first request's.
    pub(super) conn: Commands,
    /// The topic: requests of a call are told apart by it, and its key names are written
    /// straight into the call.
    pub(super) topic: Topic,
    /// The events, moved in from the publish request: their payloads are copied once, into the
    /// call.
    pub(super) events: Vec<NewEvent>,
    /// Where the ids, or the error, go.
    pub(super) reply: oneshot::Sender<Result<Vec<StreamId>, StoreError>>,
}

impl AppendRequest {
    /// About what the request adds to a call's arguments (for the call's size bound): payloads,
    /// types and idempotency keys, each key with its topic and ~32 bytes of prefix around it.
    fn bytes(&self) -> usize {
        self.events
            .iter()
            .map(|e| {
                e.data.len()
                    + e.event.as_ref().map_or(0, String::len)
                    + e.idempotency_key
                        .as_ref()
                        .map_or(0, |k| k.len() + self.topic.as_str().len() + 32)
            })
            .sum()
    }
}

/// The script's arguments that are the same for every call.
#[derive(Clone)]
pub(super) struct AppendSettings {
    /// MAXLEN (0 = keep everything).
    pub(super) max_events: u64,
    /// `~` or `=`.
    pub(super) trim_mode: &'static str,
    pub(super) idempotency_window_ms: u64,
    pub(super) max_age_ms: u64,
    pub(super) idle_ttl_ms: u64,
    /// Largest payload announced with its event.
    pub(super) announce_inline_max: usize,
    /// Most payload bytes one call announces.
    pub(super) announce_call_budget: usize,
}

/// Starts the committer; it ends once every sender is gone and every request answered.
pub(super) fn spawn(
    script: Script,
    settings: AppendSettings,
    keys: Keys,
    runner: Runner,
) -> mpsc::UnboundedSender<AppendRequest> {
    let (tx, rx) = mpsc::unbounded_channel();
    let call = CallParts {
        script,
        settings,
        keys,
    };
    tokio::spawn(commit(rx, call, runner));
    tx
}

/// What every call is made of, besides its requests.
struct CallParts {
    script: Script,
    settings: AppendSettings,
    /// Key and channel names, written into the call per topic.
    keys: Keys,
}

async fn commit(
    mut requests: mpsc::UnboundedReceiver<AppendRequest>,
    parts: CallParts,
    runner: Runner,
) {
    // Groups with a call in flight: how many calls, and the requests waiting for the next.
    let mut groups: HashMap<Option<Slot>, Group> = HashMap::new();
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        let key = tokio::select! {
            request = requests.recv(), if open => match request {
                Some(request) => {
                    let key = request.group;
                    let group = groups.entry(key).or_default();
                    group.events += request.events.len();
                    group.waiting.push_back(request);
                    runner.appends_waiting(1);
                    key
                }
                None => {
                    open = false;
                    continue;
                }
            },
            Some(key) = in_flight.next() => {
                if let Some(group) = groups.get_mut(&key) {
                    group.calls -= 1;
                }
                key
            }
        };
        let Some(group) = groups.get_mut(&key) else {
            continue;
        };
        if group.may_send() {
            let batch = group.next_batch();
            group.calls += 1;
            runner.appends_waiting(-(batch.len() as i64));
            in_flight.push(run_call(batch, &parts, &runner));
        } else if group.calls == 0 {
            groups.remove(&key);
        }
    }
}

/// A group's calls in flight and the requests waiting for one.
#[derive(Default)]
struct Group {
    calls: usize,
    waiting: VecDeque<AppendRequest>,
    /// Events in `waiting`.
    events: usize,
}

impl Group {
    /// Whether the waiting requests go out now: at once when no call is in flight, and beside
    /// the one in flight when they are many events (a batch), so that Redis works on the next
    /// call while the gateway answers the last. Single events keep waiting for the one call in
    /// flight, where they share the next call more.
    fn may_send(&self) -> bool {
        !self.waiting.is_empty()
            && (self.calls == 0
                || (self.calls < CALLS_IN_FLIGHT && self.events >= SECOND_CALL_EVENTS))
    }

    /// The waiting requests that go in the next call, in arrival order: at least one, then as
    /// many as fit the call's limits.
    fn next_batch(&mut self) -> Vec<AppendRequest> {
        let mut batch = Vec::new();
        let (mut events, mut bytes) = (0, 0);
        while let Some(next) = self.waiting.front() {
            let (e, b) = (next.events.len(), next.bytes());
            if !batch.is_empty() && (events + e > MAX_CALL_EVENTS || bytes + b > MAX_CALL_BYTES) {
                break;
            }
            events += e;
            bytes += b;
            batch.extend(self.waiting.pop_front());
        }
        self.events -= events;
        batch
    }
}

/// Runs one call for `batch` and answers each request; returns the group.
async fn run_call(batch: Vec<AppendRequest>, parts: &CallParts, runner: &Runner) -> Option<Slot> {
    let group = batch[0].group;
    let mut conn = batch[0].conn.clone();
    let (call, shapes, replies) = build(batch, parts, conn.is_cluster());
    runner.append_call();
    let result = runner
        .run(&mut conn, &call, runner.replication)
        .await
        .and_then(|reply| split_reply(&reply, &shapes));
    match result {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                // The publisher may have gone; its events are stored all the same.
                let _ = reply.send(outcome);
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
    group
}

/// One script call for the batch; each request's event count, and where its answer goes.
///
/// Keys: each topic's stream and tombstone, in order of first appearance, then the idempotency
/// keys of every request in order. Arguments: the settings, the publish command, the topics'
/// channels, then per request its topic's index (1-based, as in Lua), its event count and per
/// event its type, data and whether it has an idempotency key.
#[allow(clippy::type_complexity)]
fn build<'a>(
    batch: Vec<AppendRequest>,
    parts: &'a CallParts,
    cluster: bool,
) -> (
    Call<'a>,
    Vec<usize>,
    Vec<oneshot::Sender<Result<Vec<StreamId>, StoreError>>>,
) {
    // Topics in order of first appearance; a lone request (the usual case on an idle gateway)
    // needs no map.
    let mut topics: Vec<&str> = Vec::new();
    let mut topic_index: HashMap<&str, usize> = HashMap::new();
    let mut indices = Vec::with_capacity(batch.len());
    let (mut keyed, mut events, mut bytes) = (0, 0, 0);
    for request in &batch {
        let topic = request.topic.as_str();
        let index = if batch.len() == 1 {
            topics.push(topic);
            1
        } else {
            *topic_index.entry(topic).or_insert_with(|| {
                topics.push(topic);
                topics.len()
            })
        };
        indices.push(index);
        keyed += request
            .events
            .iter()
            .filter(|e| e.idempotency_key.is_some())
            .count();
        events += request.events.len();
        bytes += request.bytes();
    }
    let names = 3 * topics.len() + keyed;
    let mut call = Call::with_capacity(
        &parts.script,
        2 * topics.len() + keyed,
        names + 10 + 4 * batch.len() + 2 * events,
        // Requests of several events send their payloads twice: as events, and as announced.
        2 * bytes + names * (parts.keys.prefix.len() + 16) + 16 * batch.len(),
    );
    // One buffer for every name in the call.
    let mut name = String::new();
    for topic in &topics {
        parts.keys.write_name(&mut name, topic, "");
        call.key(name.as_str());
        parts.keys.write_name(&mut name, topic, TOMBSTONE);
        call.key(name.as_str());
    }
    for request in &batch {
        for key in request
            .events
            .iter()
            .filter_map(|e| e.idempotency_key.as_deref())
        {
            parts
                .keys
                .write_name(&mut name, request.topic.as_str(), IDEMPOTENCY);
            name.push_str(key);
            call.key(name.as_str());
        }
    }
    let settings = &parts.settings;
    call.arg(settings.max_events)
        .arg(settings.trim_mode)
        .arg(settings.idempotency_window_ms)
        .arg(settings.max_age_ms)
        .arg(settings.idle_ttl_ms)
        .arg(settings.announce_inline_max)
        .arg(settings.announce_call_budget)
        .arg(if cluster { "SPUBLISH" } else { "PUBLISH" })
        .arg(topics.len());
    for topic in &topics {
        parts.keys.write_name(&mut name, topic, LIVE);
        call.arg(name.as_str());
    }
    // One buffer for each request's idempotency flags and for its events as announced.
    let mut buffer = String::new();
    for (request, index) in batch.iter().zip(indices) {
        call.arg(index).arg(request.events.len());
        // Events without a type or a key (most) are sent as their data alone: every argument is
        // a string Redis makes twice, once as it reads the command and once for the script.
        let plain = request
            .events
            .iter()
            .all(|e| e.event.is_none() && e.idempotency_key.is_none());
        buffer.clear();
        if !plain {
            buffer.extend(request.events.iter().map(|e| {
                if e.idempotency_key.is_some() {
                    '1'
                } else {
                    '0'
                }
            }));
        }
        call.arg(buffer.as_str());
        if request.events.len() > 1 {
            write_announced_events(&mut buffer, &request.events, settings.announce_inline_max);
            call.arg(buffer.as_str());
        }
        for event in &request.events {
            if !plain {
                call.arg(event.event.as_deref().unwrap_or(""));
            }
            call.arg(event.data.as_str());
        }
    }
    let mut shapes = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    for request in batch {
        shapes.push(request.events.len());
        replies.push(request.reply);
    }
    (call, shapes, replies)
}

/// Writes a request's events as `append.lua` announces a request of several:
/// `<type>\n<bytes>\n<data>` each, or nothing when one is larger than `inline_max` (the request is
/// then announced by id). Written here, where the events already are: built in Lua, event by
/// event, it cost Redis what a `PUBLISH` per event did.
fn write_announced_events(out: &mut String, events: &[NewEvent], inline_max: usize) {
    out.clear();
    if events.iter().any(|e| e.data.len() > inline_max) {
        return;
    }
    for event in events {
        out.push_str(event.event.as_deref().unwrap_or(""));
        out.push('\n');
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{}", event.data.len());
        out.push_str(&event.data);
    }
}

/// Splits the script's reply into one outcome per request: `{'ok', "<id>\\n<id>…"}` or
/// `{'err', message}`.
fn split_reply(
    reply: &Value,
    shapes: &[usize],
) -> Result<Vec<Result<Vec<StreamId>, StoreError>>, StoreError> {
    let parts = as_array(reply)?;
    if parts.len() != shapes.len() {
        return Err(bad_reply("append answered for a wrong number of requests"));
    }
    parts
        .iter()
        .zip(shapes)
        .map(|(part, &count)| {
            let items = as_array(part)?;
            let (status, rest) = items
                .split_first()
                .ok_or_else(|| bad_reply("an empty append answer"))?;
            match as_bytes(status)? {
                b"ok" => {
                    let joined = rest.first().ok_or_else(|| bad_reply("no ids"))?;
                    let ids = as_bytes(joined)?
                        .split(|&b| b == b'\n')
                        .map(|id| StreamId::parse_ascii(id).map_err(|_| bad_reply("stream id")))
                        .collect::<Result<Vec<_>, _>>()?;
                    if ids.len() != count {
                        return Err(bad_reply("append returned a wrong number of ids"));
                    }
                    Ok(Ok(ids))
                }
                b"err" => {
                    let message = rest
                        .first()
                        .and_then(|m| as_bytes(m).ok())
                        .map(|m| String::from_utf8_lossy(m).into_owned())
                        .unwrap_or_default();
                    Ok(Err(StoreError::Internal(format!(
                        "redis refused the append: {message}"
                    ))))
                }
                _ => Err(bad_reply("an append answer that is neither ok nor err")),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn each_request_gets_its_own_outcome() {
        let reply = Value::Array(vec![
            Value::Array(vec![bulk("ok"), bulk("1-0\n1-1")]),
            Value::Array(vec![bulk("err"), bulk("WRONGTYPE no stream")]),
            Value::Array(vec![bulk("ok"), bulk("2-0")]),
        ]);
        let outcomes = split_reply(&reply, &[2, 1, 1]).expect("well-formed");
        assert_eq!(
            outcomes[0].as_ref().expect("ok"),
            &vec![StreamId::new(1, 0), StreamId::new(1, 1)]
        );
        assert!(
            matches!(&outcomes[1], Err(StoreError::Internal(m)) if m.contains("WRONGTYPE")),
            "{:?}",
            outcomes[1]
        );
        assert_eq!(
            outcomes[2].as_ref().expect("ok"),
            &vec![StreamId::new(2, 0)]
        );
    }

    #[test]
    fn a_malformed_answer_fails_the_call() {
        let short = Value::Array(vec![Value::Array(vec![bulk("ok"), bulk("1-0")])]);
        assert!(split_reply(&short, &[2]).is_err(), "too few ids");
        assert!(split_reply(&short, &[1, 1]).is_err(), "too few requests");
        let odd = Value::Array(vec![Value::Array(vec![bulk("maybe")])]);
        assert!(split_reply(&odd, &[1]).is_err());
        for ids in ["1-0\n", "1-0\n\n1-1", "1-0 1-1", ""] {
            let bad = Value::Array(vec![Value::Array(vec![bulk("ok"), bulk(ids)])]);
            assert!(split_reply(&bad, &[2]).is_err(), "{ids:?}");
        }
        let none = Value::Array(vec![Value::Array(vec![bulk("ok")])]);
        assert!(split_reply(&none, &[1]).is_err(), "no ids");
    }
}
