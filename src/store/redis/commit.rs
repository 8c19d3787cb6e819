//! Group commit: publish requests waiting for the same Redis call share one round trip and one
//! script call, as a database's log writer or a Kafka producer amortise their commits.
//!
//! One task, the committer, owns every append. Requests are grouped where one script may touch
//! all their keys: on one Redis every topic is in one place, so all requests form one group; in
//! a cluster each hash slot is a group. A request whose group has no call in flight goes out at
//! once, so an idle gateway adds no latency; the runs of one publish (a batch over many topics)
//! come as one submission and go out together, one call per group, the groups' calls at once. Requests arriving while their group's call
//! is in flight wait, in arrival order, and go out together in the group's next call; only when
//! they add up to a batch's worth of events do they go as a second call beside the first.
//!
//! Runs of topics no node listens to skip the script (see `audience` and `split_runs`): they go
//! as plain `XADD`s, one per event, in a pipeline sent beside the call's script.
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
use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use redis::cluster_routing::Slot;
use redis::Value;
use tokio::sync::{mpsc, oneshot};

use super::audience::Audience;
use super::connection::Commands;
use super::keys::{Keys, IDEMPOTENCY, LABEL, LIVE, TOMBSTONE};
use super::reply::{as_array, as_bytes, bad_reply, classify_error};
use super::scripts::{Call, Lua};
use super::Runner;
use crate::event::{runs_by_name, NewEvent, StreamId, Topic};
use crate::store::StoreError;

/// Calls a group may have in flight at once. More keep Redis busy while the gateway answers
/// one call and builds the next: with one, batched publishes went 5–10 % slower than with every
/// request its own call, with two 25 % faster; with three, arrays over 100 topics another 4–8 %
/// (single publishes and one-topic batches the same), with four no more. Calls go out in order
/// on one connection, so Redis applies them in arrival order.
const CALLS_IN_FLIGHT: usize = 3;
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
    /// Whether Redis notifies every append (see `Link::notified`), so the call's announcements
    /// need not name each run's previous entry; the first request's decides.
    pub(super) notified: bool,
    /// Whether every append reaches its topic's subscribers as a keyspace notification (see
    /// `Link::keyspace`), so that a topic nobody listens to may go unannounced; the first
    /// request's decides.
    pub(super) keyspace: bool,
    /// The topic: requests of a call are told apart by it, and its key names are written
    /// straight into the call.
    pub(super) topic: Topic,
    /// The events, moved in from the publish request: their payloads are copied once, into the
    /// call.
    pub(super) events: Vec<NewEvent>,
    /// Where the ids, or the error, go.
    pub(super) reply: oneshot::Sender<AppendOutcome>,
}

/// A request's ids, one per event, or why it failed.
pub(super) type AppendOutcome = Result<Vec<StreamId>, StoreError>;

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
                    + e.labels
                        .iter()
                        .map(|l| l.len() + self.topic.as_str().len() + 32)
                        .sum::<usize>()
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
    script: Lua,
    settings: AppendSettings,
    keys: Keys,
    runner: Runner,
) -> mpsc::UnboundedSender<Vec<AppendRequest>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let call = CallParts {
        script,
        settings,
        keys,
        audience: Arc::default(),
    };
    tokio::spawn(commit(rx, call, runner));
    tx
}

/// What every call is made of, besides its requests.
struct CallParts {
    script: Lua,
    settings: AppendSettings,
    /// Key and channel names, written into the call per topic.
    keys: Keys,
    /// Which topics have listeners: a topic without needs no announcement.
    audience: Arc<Audience>,
}

/// Takes submissions (the runs of one publish, each a request), files each request with its
/// group, and sends every group it touched whose turn it is: the groups' calls go out together,
/// in parallel across a cluster's masters.
async fn commit(
    mut submissions: mpsc::UnboundedReceiver<Vec<AppendRequest>>,
    parts: CallParts,
    runner: Runner,
) {
    // Groups with a call in flight: how many calls, and the requests waiting for the next.
    let mut groups: HashMap<Option<Slot>, Group> = HashMap::new();
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    // The groups the last submission or finished call touched, in order.
    let mut touched: Vec<Option<Slot>> = Vec::new();
    while open || !in_flight.is_empty() {
        touched.clear();
        tokio::select! {
            submission = submissions.recv(), if open => match submission {
                Some(requests) => {
                    runner.appends_waiting(requests.len() as i64);
                    for request in requests {
                        let key = request.group;
                        let group = groups.entry(key).or_default();
                        group.events += request.events.len();
                        group.waiting.push_back(request);
                        if !touched.contains(&key) {
                            touched.push(key);
                        }
                    }
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
                touched.push(key);
            }
        };
        for key in &touched {
            let Some(group) = groups.get_mut(key) else {
                continue;
            };
            if group.may_send() {
                let batch = group.next_batch();
                group.calls += 1;
                runner.appends_waiting(-(batch.len() as i64));
                in_flight.push(run_call(batch, &parts, &runner));
            } else if group.calls == 0 {
                groups.remove(key);
            }
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
///
/// Runs of topics no node listens to (see `audience`) go as plain `XADD`s in one pipeline,
/// announced by nothing but their keyspace notifications; the rest as one script call. Both
/// go out at once on the same connection, and a topic's runs are all on one side.
async fn run_call(batch: Vec<AppendRequest>, parts: &CallParts, runner: &Runner) -> Option<Slot> {
    let group = batch[0].group;
    let conn = batch[0].conn.clone();
    let (plain, scripted) = split_runs(&batch, parts, &conn, runner.replication.is_some());
    // One call, though maybe in two parts: they go out together.
    runner.append_call();
    let plain_answers = async {
        if plain.is_empty() {
            return Vec::new();
        }
        let events: Vec<usize> = plain
            .iter()
            .flatten()
            .map(|&i| batch[i].events.len())
            .collect();
        let xadds = build_plain(&batch, &plain, parts);
        match run_plain(xadds, &conn, runner).await {
            Ok(Some(answers)) => answer_runs(&plain, split_answers(answers, &events)),
            Err(e) => answer_runs(&plain, Err(e)),
            Ok(None) => {
                // Nothing applied: a cluster's slot moved or is moving. The script follows.
                runner.append_call();
                run_script(&batch, &plain, parts, &conn, runner).await
            }
        }
    };
    let scripted_answers = run_script(&batch, &scripted, parts, &conn, runner);
    let (plain_answers, scripted_answers) = futures_util::join!(plain_answers, scripted_answers);
    let mut outcomes: Vec<Option<AppendOutcome>> = batch.iter().map(|_| None).collect();
    for (i, outcome) in plain_answers.into_iter().chain(scripted_answers) {
        outcomes[i] = Some(outcome);
    }
    for (request, outcome) in batch.into_iter().zip(outcomes) {
        // The publisher may have gone; its events are stored all the same.
        let outcome = outcome.unwrap_or_else(|| Err(bad_reply("a request left unanswered")));
        let _ = request.reply.send(outcome);
    }
    group
}

/// Appends `runs` of `batch` as one script call; each request's outcome.
async fn run_script(
    batch: &[AppendRequest],
    runs: &[Vec<usize>],
    parts: &CallParts,
    conn: &Commands,
    runner: &Runner,
) -> Vec<(usize, AppendOutcome)> {
    if runs.is_empty() {
        return Vec::new();
    }
    let (call, shapes) = build(batch, runs, parts, conn.is_cluster());
    let result = runner
        .run(&mut conn.clone(), &call, runner.replication)
        .await
        .and_then(|reply| split_reply(&reply, &shapes));
    answer_runs(runs, result)
}

/// Runs longer than this go to the script even where no one listens: one `XADD` each costs
/// Redis more than a long run's share of the script (a one-topic batch of 100 is one run).
const PLAIN_RUN_MAX: usize = 16;

/// The batch's runs, each its topic's requests (indices into `batch`) in arrival order: those
/// appended without announcing, and those the script appends.
///
/// A run goes without its announcement only where Redis notifies every `XADD` (so a node that
/// does listen after all is told), with no retention that needs the script (`max_age`,
/// `idle_ttl`), when it is short and has neither idempotency keys nor labels, and when no node
/// listened to its topic lately. In a cluster, only without `min_replicas_ack` (see
/// `run_plain`).
fn split_runs(
    batch: &[AppendRequest],
    parts: &CallParts,
    conn: &Commands,
    replicated: bool,
) -> (Vec<Vec<usize>>, Vec<Vec<usize>>) {
    let runs = runs_of(batch);
    let settings = &parts.settings;
    let may = batch[0].keyspace
        && settings.max_age_ms == 0
        && settings.idle_ttl_ms == 0
        && !(conn.is_cluster() && replicated);
    if !may {
        return (Vec::new(), runs);
    }
    let (mut plain, mut scripted) = (Vec::new(), Vec::new());
    let due = {
        let mut audience = parts.audience.lookup();
        for run in runs {
            let events: usize = run.iter().map(|&i| batch[i].events.len()).sum();
            let simple =
                run_events(batch, &run).all(|e| e.idempotency_key.is_none() && e.labels.is_empty());
            if events <= PLAIN_RUN_MAX && simple && audience.unheard(batch[run[0]].topic.as_str()) {
                plain.push(run);
            } else {
                scripted.push(run);
            }
        }
        audience.any_due()
    };
    if due {
        parts.audience.check(conn, &parts.keys);
    }
    (plain, scripted)
}

/// Each run's requests (indices into `batch`), in order of their topic's first appearance; a
/// lone request (the usual case on an idle gateway) needs no map.
fn runs_of(batch: &[AppendRequest]) -> Vec<Vec<usize>> {
    if batch.len() == 1 {
        return vec![vec![0]];
    }
    let (run_of_request, count) = runs_by_name(batch.iter().map(|r| r.topic.as_str()));
    let mut runs: Vec<Vec<usize>> = vec![Vec::new(); count];
    for (i, run) in run_of_request.into_iter().enumerate() {
        runs[run].push(i);
    }
    runs
}

/// Pairs the runs' requests, in run order, with their outcomes (or all with the call's error).
fn answer_runs(
    runs: &[Vec<usize>],
    outcomes: Result<Vec<AppendOutcome>, StoreError>,
) -> Vec<(usize, AppendOutcome)> {
    let requests = runs.iter().flatten().copied();
    match outcomes {
        Ok(outcomes) => requests.zip(outcomes).collect(),
        Err(e) => requests.map(|i| (i, Err(e.clone()))).collect(),
    }
}

/// The `XADD`s for the runs, one per event in run order; a plain run is trimmed as the script
/// trims it, by `MAXLEN` on its `XADD`s.
fn build_plain(batch: &[AppendRequest], runs: &[Vec<usize>], parts: &CallParts) -> Vec<redis::Cmd> {
    let settings = &parts.settings;
    let maxlen = settings.max_events.to_string();
    let mut xadds = Vec::with_capacity(runs.len());
    let mut name = String::new();
    for run in runs {
        parts
            .keys
            .write_name(&mut name, batch[run[0]].topic.as_str(), "");
        for event in run_events(batch, run) {
            // Made to size: growing a command's buffers was most of its cost.
            let bytes = name.len() + event.data.len() + event.event.as_ref().map_or(0, String::len);
            let mut xadd = redis::Cmd::with_capacity(10, bytes + 32);
            xadd.arg("XADD").arg(name.as_str());
            if settings.max_events > 0 {
                xadd.arg("MAXLEN")
                    .arg(settings.trim_mode)
                    .arg(maxlen.as_str());
            }
            // The fields in the script's order, so that readers see one shape.
            xadd.arg("*").arg("data").arg(event.data.as_str());
            if let Some(event) = event.event.as_deref() {
                xadd.arg("event").arg(event);
            }
            xadds.push(xadd);
        }
    }
    xadds
}

/// Sends the `XADD`s and gives each one's answer, in order; `None` when a cluster refused them
/// all unapplied, for a slot that moved or is moving.
///
/// On one Redis they go as one pipeline (with `WAIT` behind it when asked). In a cluster they
/// go as one transaction (`MULTI` … `EXEC`): the cluster client sends a plain pipeline again
/// when one of its answers is a redirect, and an `XADD` applied before that one would be
/// appended twice. A transaction is applied whole or, redirected, not at all, and the caller
/// then sends the same runs through the script, which the client redirects. (`WAIT` cannot
/// wait inside a transaction: a cluster with `min_replicas_ack` sends every append through the
/// script.)
async fn run_plain(
    xadds: Vec<redis::Cmd>,
    conn: &Commands,
    runner: &Runner,
) -> Result<Option<Vec<Result<StreamId, StoreError>>>, StoreError> {
    let mut pipe = redis::Pipeline::with_capacity(xadds.len() + 1);
    for xadd in xadds {
        pipe.add_command(xadd);
    }
    let replication = if conn.is_cluster() {
        pipe.atomic();
        None
    } else {
        runner.replication
    };
    let answers = runner
        .run_pipeline(&mut conn.clone(), pipe, replication)
        .await?;
    Ok(answers.map(|answers| answers.iter().map(xadd_answer).collect()))
}

/// One `XADD`'s answer: the id it was given, or why Redis refused it. A cluster in transition
/// (a slot that moved, a failover) is worth a retry, as when the script is refused so;
/// anything else is not.
fn xadd_answer(answer: &Value) -> Result<StreamId, StoreError> {
    match answer {
        Value::ServerError(e) => Err(match classify_error(e.clone().into()) {
            StoreError::Internal(e) => {
                StoreError::Internal(format!("redis refused the append: {e}"))
            }
            transient => transient,
        }),
        id => StreamId::parse_ascii(as_bytes(id)?).map_err(|_| bad_reply("stream id")),
    }
}

/// The `XADD`s' answers (one per event, in run order) as one outcome per request: its ids, or
/// the first refusal among its events. Each `XADD` stands alone, so a refused event does not
/// stop the ones after it; as with the script, a request with a refused event fails. `events`
/// holds each request's event count, in run order.
fn split_answers(
    answers: Vec<Result<StreamId, StoreError>>,
    events: &[usize],
) -> Result<Vec<AppendOutcome>, StoreError> {
    if answers.len() != events.iter().sum::<usize>() {
        return Err(bad_reply("a wrong number of XADD answers"));
    }
    let mut answers = answers.into_iter();
    Ok(events
        .iter()
        .map(|&count| answers.by_ref().take(count).collect())
        .collect())
}

/// One script call for the runs of `batch` (each its requests' indices), and per run its
/// requests' event counts.
///
/// A call's requests are applied topic by topic, each topic's in arrival order, as one run of
/// events: consecutive events of one topic cost the script one pass and one announcement, not
/// one per request, which matters when many publishers share a hot topic. Order across topics
/// does not matter (each has its own stream).
///
/// Keys: each run's stream and tombstone, then the idempotency keys of every run in order.
/// Arguments: the settings, the publish command, how announcements show continuity (`prev` or
/// `notified`), the runs' channels, then per run its index
/// (1-based, as in Lua), its event count, its flags (see `append.lua`), its events as announced
/// when there are several, and per event its type (unless the flags are empty) and data.
fn build<'a>(
    batch: &[AppendRequest],
    runs: &[Vec<usize>],
    parts: &'a CallParts,
    cluster: bool,
) -> (Call<'a>, Vec<Vec<usize>>) {
    let (mut keyed, mut events, mut bytes) = (0, 0, 0);
    for &i in runs.iter().flatten() {
        let request = &batch[i];
        keyed += request
            .events
            .iter()
            .map(|e| usize::from(e.idempotency_key.is_some()) + e.labels.len())
            .sum::<usize>();
        events += request.events.len();
        bytes += request.bytes();
    }
    let continuity = if batch[0].notified {
        "notified"
    } else {
        "prev"
    };
    let topic = |run: &[usize]| batch[run[0]].topic.as_str();
    let events_of = |run| run_events(batch, run);
    let names = 3 * runs.len() + keyed;
    let mut call = Call::with_capacity(
        &parts.script,
        2 * runs.len() + keyed,
        names + 11 + 5 * runs.len() + 2 * events,
        // Runs of several events send their payloads twice: as events, and as announced.
        2 * bytes + names * (parts.keys.prefix.len() + 16) + 16 * runs.len(),
    );
    // One buffer for every name in the call.
    let mut name = String::new();
    for run in runs {
        parts.keys.write_name(&mut name, topic(run), "");
        call.key(name.as_str());
        parts.keys.write_name(&mut name, topic(run), TOMBSTONE);
        call.key(name.as_str());
    }
    for run in runs {
        for event in events_of(run) {
            if let Some(key) = event.idempotency_key.as_deref() {
                parts.keys.write_name(&mut name, topic(run), IDEMPOTENCY);
                name.push_str(key);
                call.key(name.as_str());
            }
            for label in &event.labels {
                parts.keys.write_name(&mut name, topic(run), LABEL);
                name.push_str(label);
                call.key(name.as_str());
            }
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
        .arg(continuity)
        .arg(runs.len());
    for run in runs {
        parts.keys.write_name(&mut name, topic(run), LIVE);
        call.arg(name.as_str());
    }
    let shapes: Vec<Vec<usize>> = runs
        .iter()
        .map(|run| run.iter().map(|&i| batch[i].events.len()).collect())
        .collect();
    // One buffer for each run's idempotency flags and for its events as announced.
    let mut buffer = String::new();
    for (index, (run, counts)) in runs.iter().zip(&shapes).enumerate() {
        let count: usize = counts.iter().sum();
        call.arg(index + 1).arg(count);
        // Events without a type or a key (most) are sent as their data alone: every argument is
        // a string Redis makes twice, once as it reads the command and once for the script.
        let plain = events_of(run)
            .all(|e| e.event.is_none() && e.idempotency_key.is_none() && e.labels.is_empty());
        buffer.clear();
        if !plain {
            buffer.extend(events_of(run).map(|e| {
                let flags =
                    u8::from(e.idempotency_key.is_some()) + 2 * u8::from(!e.labels.is_empty());
                char::from(b'0' + flags)
            }));
        }
        call.arg(buffer.as_str());
        if events_of(run).any(|e| !e.labels.is_empty()) {
            // How many labels each labelled event has.
            buffer.clear();
            for event in events_of(run).filter(|e| !e.labels.is_empty()) {
                if !buffer.is_empty() {
                    buffer.push(',');
                }
                let _ = write!(buffer, "{}", event.labels.len());
            }
            call.arg(buffer.as_str());
        }
        if count > 1 {
            write_announced_events(&mut buffer, events_of(run), settings.announce_inline_max);
            call.arg(buffer.as_str());
        }
        for event in events_of(run) {
            if !plain {
                call.arg(event.event.as_deref().unwrap_or(""));
            }
            call.arg(event.data.as_str());
        }
    }
    (call, shapes)
}

/// A run's events, in order.
fn run_events<'b>(
    batch: &'b [AppendRequest],
    run: &'b [usize],
) -> impl Iterator<Item = &'b NewEvent> + Clone + 'b {
    run.iter().flat_map(move |&i| &batch[i].events)
}

/// Writes a run's events as `append.lua` announces a run of several: `<type>\n<bytes>\n<data>`
/// each, or nothing when one is larger than `inline_max` (the run is then announced by id).
/// Written here, where the events already are: built in Lua, event by event, it cost Redis what
/// a `PUBLISH` per event did.
fn write_announced_events<'e>(
    out: &mut String,
    events: impl Iterator<Item = &'e NewEvent> + Clone,
    inline_max: usize,
) {
    out.clear();
    if events.clone().any(|e| e.data.len() > inline_max) {
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

/// Splits the script's reply into one outcome per request, in run order. Per run the script
/// answers `{'ok', "<id>\n<id>…"}` or, when an append failed, `{'err', "<id>…", message}` with the
/// ids of the events before it: requests wholly among those succeeded, the rest of the run fails.
fn split_reply(reply: &Value, shapes: &[Vec<usize>]) -> Result<Vec<AppendOutcome>, StoreError> {
    let parts = as_array(reply)?;
    if parts.len() != shapes.len() {
        return Err(bad_reply("append answered for a wrong number of runs"));
    }
    let mut outcomes = Vec::with_capacity(shapes.iter().map(Vec::len).sum());
    for (part, counts) in parts.iter().zip(shapes) {
        // `<id>\n<id>…`, or `!<message>\n<id>…` (maybe no ids) when an append failed.
        let part = as_bytes(part)?;
        let (joined, message) = match part.strip_prefix(b"!") {
            Some(failed) => {
                let end = failed
                    .iter()
                    .position(|&b| b == b'\n')
                    .ok_or_else(|| bad_reply("an append answer of a wrong shape"))?;
                (&failed[end + 1..], Some(&failed[..end]))
            }
            None => (part, None),
        };
        let ids = if joined.is_empty() {
            Vec::new()
        } else {
            joined
                .split(|&b| b == b'\n')
                .map(|id| StreamId::parse_ascii(id).map_err(|_| bad_reply("stream id")))
                .collect::<Result<Vec<_>, _>>()?
        };
        let total: usize = counts.iter().sum();
        let error = match message {
            None if ids.len() == total => None,
            Some(message) if ids.len() < total => {
                let message = String::from_utf8_lossy(message).into_owned();
                Some(StoreError::Internal(format!(
                    "redis refused the append: {message}"
                )))
            }
            _ => return Err(bad_reply("an append answer that does not add up")),
        };
        let mut ids = ids.into_iter();
        // Once the ids fall short of a request (only with an error), it and the rest of the run
        // failed.
        let mut failed = false;
        for &count in counts {
            failed = failed || ids.len() < count;
            outcomes.push(if failed {
                Err(error.clone().unwrap_or_else(|| bad_reply("ids")))
            } else {
                Ok(ids.by_ref().take(count).collect())
            });
        }
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn each_unannounced_request_gets_its_own_outcome() {
        let answers = || {
            [
                "$3\r\n1-0\r\n",
                "$3\r\n1-1\r\n",
                "-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
                "-MOVED 3999 127.0.0.1:6381\r\n",
                "$3\r\n2-0\r\n",
            ]
            .iter()
            .map(|resp| xadd_answer(&redis::parse_redis_value(resp.as_bytes()).expect("RESP")))
            .collect::<Vec<_>>()
        };
        let outcomes = split_answers(answers(), &[2, 1, 1, 1]).expect("one answer per event");
        assert_eq!(
            outcomes[0].as_ref().expect("stored"),
            &vec![StreamId::new(1, 0), StreamId::new(1, 1)]
        );
        assert!(
            matches!(&outcomes[1], Err(StoreError::Internal(m)) if m.contains("WRONGTYPE")),
            "refused for good: {:?}",
            outcomes[1]
        );
        assert!(
            matches!(&outcomes[2], Err(StoreError::Unavailable(_))),
            "a slot that moved is worth a retry: {:?}",
            outcomes[2]
        );
        assert_eq!(
            outcomes[3].as_ref().expect("stored"),
            &vec![StreamId::new(2, 0)]
        );
        assert!(
            split_answers(answers(), &[2, 1]).is_err(),
            "answers left over"
        );
    }

    #[test]
    fn each_request_gets_its_own_outcome() {
        let reply = Value::Array(vec![
            bulk("1-0\n1-1\n1-2"),
            bulk("!WRONGTYPE no stream\n"),
            bulk("2-0"),
            // Failed at its third event: the request before it stands, the rest fail.
            bulk("!boom\n3-0\n3-1"),
        ]);
        let shapes = [vec![2, 1], vec![1], vec![1], vec![1, 2, 1]];
        let outcomes = split_reply(&reply, &shapes).expect("well-formed");
        let ids = |i: usize| outcomes[i].as_ref().expect("ok").clone();
        assert_eq!(ids(0), vec![StreamId::new(1, 0), StreamId::new(1, 1)]);
        assert_eq!(ids(1), vec![StreamId::new(1, 2)]);
        assert!(
            matches!(&outcomes[2], Err(StoreError::Internal(m)) if m.contains("WRONGTYPE")),
            "{:?}",
            outcomes[2]
        );
        assert_eq!(ids(3), vec![StreamId::new(2, 0)]);
        assert_eq!(ids(4), vec![StreamId::new(3, 0)]);
        for failed in &outcomes[5..] {
            assert!(
                matches!(failed, Err(StoreError::Internal(m)) if m.contains("boom")),
                "{failed:?}"
            );
        }
        assert_eq!(outcomes.len(), 7);
    }

    #[test]
    fn a_malformed_answer_fails_the_call() {
        let short = Value::Array(vec![bulk("1-0")]);
        assert!(split_reply(&short, &[vec![2]]).is_err(), "too few ids");
        assert!(
            split_reply(&short, &[vec![1], vec![1]]).is_err(),
            "too few runs"
        );
        for odd in ["!no line end", "maybe"] {
            let odd = Value::Array(vec![bulk(odd)]);
            assert!(split_reply(&odd, &[vec![1]]).is_err());
        }
        let nested = Value::Array(vec![Value::Array(vec![bulk("1-0")])]);
        assert!(split_reply(&nested, &[vec![1]]).is_err(), "the old shape");
        for ids in ["1-0\n", "1-0\n\n1-1", "1-0 1-1", ""] {
            let bad = Value::Array(vec![bulk(ids)]);
            assert!(split_reply(&bad, &[vec![2]]).is_err(), "{ids:?}");
        }
        let all = Value::Array(vec![bulk("!x\n1-0")]);
        assert!(
            split_reply(&all, &[vec![1]]).is_err(),
            "an error after every id"
        );
    }
}
