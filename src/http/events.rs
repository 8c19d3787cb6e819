//! `GET /v1/events` (subscribe) and `POST /v1/events` (publish).

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Extensions, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::future::try_join_all;
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use super::{multi, ApiError, AppState, StreamOnSocket};
use crate::auth::{Access, AuthError};
use crate::config::Settings;
use crate::cursor;
use crate::event::{runs_by_name, validate_event_type, BadEventType, NewEvent, StreamId, Topic};
use crate::hub::{Delivery, NoticeDelivery, Output, ReplayPage, Session};
use crate::metrics::{Metrics, PublishResult, ReasonLabel, ResultLabel};
use crate::sse;
use crate::store::{Store, StoreError};

/// Longest accepted idempotency key, in bytes.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;

fn query_params(raw: Option<&str>) -> Result<HashMap<String, String>, ApiError> {
    serde_urlencoded::from_str(raw.unwrap_or("")).map_err(|_| {
        ApiError::bad_request(
            "invalid_query",
            "the query string is not valid URL encoding",
        )
    })
}

/// The subscription's topics (every `topic` parameter), validated, sorted and without repeats.
fn parse_topics(raw_query: Option<&str>, max: usize) -> Result<Vec<Topic>, ApiError> {
    let mut topics = form_urlencoded::parse(raw_query.unwrap_or("").as_bytes())
        .filter(|(name, _)| name == "topic")
        .map(|(_, value)| {
            Topic::parse(&value).map_err(|e| ApiError::bad_request("invalid_topic", e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if topics.is_empty() {
        return Err(ApiError::bad_request(
            "missing_topic",
            "give the topic as ?topic=NAME (repeat it for several topics)",
        ));
    }
    topics.sort();
    topics.dedup();
    if topics.len() > max {
        return Err(ApiError::bad_request(
            "too_many_topics",
            format!("a stream carries at most {max} topics (max_topics_per_connection)"),
        ));
    }
    Ok(topics)
}

/// The raw resume cursor: the `Last-Event-ID` header wins over `?lastEventId=`, because a
/// browser keeps the original URL on every reconnect and adds the header with the newest id.
fn raw_cursor<'a>(
    last_event_id: Option<&'a [u8]>,
    query: &'a HashMap<String, String>,
) -> Result<Option<&'a str>, ApiError> {
    let header = match last_event_id {
        Some(v) => Some(
            std::str::from_utf8(v)
                .ok()
                .filter(|v| v.is_ascii())
                .ok_or_else(invalid_cursor)?
                .trim(),
        ),
        None => None,
    };
    Ok(header.filter(|h| !h.is_empty()).or_else(|| {
        query
            .get("lastEventId")
            .map(String::as_str)
            .filter(|q| !q.is_empty())
    }))
}

/// Where each topic resumes: a stream id for one topic; for several, the composite cursor of
/// their stream, or `0` for everything retained in each.
fn parse_cursors(topics: &[Topic], raw: Option<&str>) -> Result<Vec<Option<StreamId>>, ApiError> {
    let Some(raw) = raw else {
        return Ok(vec![None; topics.len()]);
    };
    if topics.len() == 1 {
        return Ok(vec![Some(raw.parse().map_err(|_| invalid_cursor())?)]);
    }
    if raw == "0" {
        return Ok(vec![Some(StreamId::ZERO); topics.len()]);
    }
    let positions = cursor::decode(raw, topics).map_err(|e| {
        ApiError::bad_request(
            "invalid_cursor",
            format!("{e}: a stream of several topics resumes from the `id` of its last event, or `0` for everything retained"),
        )
    })?;
    Ok(positions.into_iter().map(Some).collect())
}

fn invalid_cursor() -> ApiError {
    ApiError::bad_request(
        "invalid_cursor",
        "Last-Event-ID / lastEventId must be an event id (`<ms>-<seq>`) or `0` for everything retained",
    )
}

/// Headers of every event stream, besides the framing.
const STREAM_HEADERS: [(&str, &str); 3] = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    // nginx and others buffer responses unless told not to.
    ("x-accel-buffering", "no"),
];

/// What a subscribe asks for, from its query string and `Last-Event-ID` header: the topic and
/// the cursor to resume after.
fn subscription(
    raw_query: Option<&str>,
    last_event_id: Option<&[u8]>,
    max_topics: usize,
) -> Result<(Vec<Topic>, Vec<Option<StreamId>>), ApiError> {
    let query = query_params(raw_query)?;
    let topics = parse_topics(raw_query, max_topics)?;
    let cursors = parse_cursors(&topics, raw_cursor(last_event_id, &query)?)?;
    Ok((topics, cursors))
}

/// How a stream writes what its session produces. A `/v1` stream of one topic sends the shared,
/// ready-made frames; a protocol adapter writes its own, and may leave events out.
pub(super) trait Frames: Send + 'static {
    /// A live event's frame, or `None` when this stream does not send it.
    fn live(&mut self, delivery: &Delivery) -> Option<Bytes>;
    /// A replay page's frames and the number of events in them, or `None` when nothing is sent.
    fn replayed(&mut self, page: &ReplayPage) -> Option<(Bytes, usize)>;
    /// A notice's frame (join and leave), or `None` when this stream does not send them.
    fn notice(&mut self, notice: &NoticeDelivery) -> Option<Bytes> {
        Some(notice.frame.clone())
    }
}

/// The frames of a `/v1` stream of one topic, encoded once per event for every client.
struct SharedFrames;

impl Frames for SharedFrames {
    fn live(&mut self, delivery: &Delivery) -> Option<Bytes> {
        Some(delivery.frame.clone())
    }

    fn replayed(&mut self, page: &ReplayPage) -> Option<(Bytes, usize)> {
        Some((page.frames.clone(), page.events.len()))
    }
}

/// A subscription's body: `first` (the `retry:`), then the replay after the cursor, then live
/// events, with heartbeat comments while idle. It ends when `end` completes (the token's `exp`,
/// or a disconnect, see [`Control::ending`](crate::control::Control::ending)): the client
/// comes back with a fresh token and resumes from its `Last-Event-ID`.
pub(super) fn event_stream(
    session: Session,
    settings: &Settings,
    end: impl std::future::Future<Output = ()> + Send + 'static,
    metrics: Arc<Metrics>,
    first: Bytes,
    frames: impl Frames,
) -> impl Stream<Item = Bytes> + Send + 'static {
    let heartbeat = settings.heartbeat_interval;
    let first = futures_util::stream::once(async move { first });
    let open = OpenStream::new(metrics);
    // One timer for the stream's life, moved only when it fires: a heartbeat is due `heartbeat`
    // after the last frame, which is noted per frame (a clock read) instead of re-arming a
    // timer per delivery.
    let idle = Box::pin(tokio::time::sleep(heartbeat));
    let last_frame = tokio::time::Instant::now();
    let state = (session, frames, open, idle, last_frame);
    let rest = futures_util::stream::unfold(
        state,
        move |(mut session, mut frames, open, mut idle, mut last_frame)| async move {
            let out = loop {
                match session.next(idle.as_mut()).await {
                    Output::Live(delivery) => {
                        if let Some(frame) = frames.live(&delivery) {
                            open.delivered(1);
                            break frame;
                        }
                    }
                    Output::Replayed(page) => {
                        if let Some((out, events)) = frames.replayed(&page) {
                            open.delivered(events);
                            break out;
                        }
                    }
                    Output::Notice(notice) => {
                        if let Some(frame) = frames.notice(&notice) {
                            break frame;
                        }
                    }
                    Output::Farewell(retry) => break retry,
                    Output::Idle => {
                        let due = last_frame + heartbeat;
                        if tokio::time::Instant::now() >= due {
                            break sse::heartbeat_frame();
                        }
                        idle.as_mut().reset(due);
                    }
                    Output::End => return None,
                }
            };
            last_frame = tokio::time::Instant::now();
            if idle.is_elapsed() {
                idle.as_mut().reset(last_frame + heartbeat);
            }
            Some((out, (session, frames, open, idle, last_frame)))
        },
    );
    first.chain(rest).take_until(end)
}

/// Counts an open stream for as long as it lives, and what it delivers.
pub(super) struct OpenStream(Arc<Metrics>);

impl OpenStream {
    pub(super) fn new(metrics: Arc<Metrics>) -> OpenStream {
        metrics.open_streams.inc();
        OpenStream(metrics)
    }

    pub(super) fn delivered(&self, events: usize) {
        self.0.deliveries.inc_by(events as u64);
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open_streams.dec();
    }
}

/// The request's [`Access`], taken rather than cloned (a token's grants are a list of patterns).
/// The authentication layer puts one in every request; were it ever missing, the request would
/// be refused.
pub(super) fn take_access(extensions: &mut Extensions) -> Access {
    extensions.remove::<Access>().unwrap_or(Access::Anonymous)
}

/// Opens an SSE stream (see [`event_stream`]). The response is marked [`StreamOnSocket`]: on a
/// new connection the server writes it on the socket itself.
///
/// The request is taken whole, as in [`publish`]: its access is moved out, its query and headers
/// read in place rather than copied by extractors (a reconnect storm is thousands of these).
pub async fn subscribe(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (mut parts, _) = request.into_parts();
    let access = take_access(&mut parts.extensions);
    state
        .auth
        .may_try_subscribing(&access)
        .map_err(|e| refused(&state, e))?;
    let last_event_id = parts.headers.get("last-event-id").map(|v| v.as_bytes());
    let settings = &state.settings;
    let (topics, cursors) = subscription(
        parts.uri.query(),
        last_event_id,
        settings.max_topics_per_connection,
    )?;
    for topic in &topics {
        state
            .auth
            .may_subscribe(&access, topic)
            .map_err(|e| refused(&state, e))?;
    }
    let sessions = try_join_all(
        topics
            .iter()
            .zip(cursors)
            .map(|(topic, cursor)| state.hub.subscribe(topic.clone(), cursor)),
    )
    .await?;
    // Ends the stream at the token's `exp` or when a disconnect by `sub` or `jti` selects it.
    let end = state.control.ending(&access);
    // The stream's presence entry, held by the body: it goes when the stream does.
    let present = state.presence.as_ref().map(|presence| {
        let names = topics.iter().map(|t| t.as_str().to_owned()).collect();
        presence.join(names, &super::presence::holder(&access), None)
    });
    let body = if topics.len() == 1 {
        let session = sessions.into_iter().next().ok_or(ApiError::NotFound)?;
        let retry = sse::retry_frame(settings.retry.as_millis() as u64);
        let metrics = state.metrics.clone();
        let frames = event_stream(session, settings, end, metrics, retry, SharedFrames);
        Body::from_stream(frames.map(move |frame| {
            let _held = &present;
            Ok::<_, Infallible>(frame)
        }))
    } else {
        let retry = sse::retry_frame(settings.retry.as_millis() as u64);
        let open = OpenStream::new(state.metrics.clone());
        let frames = multi::stream(topics, sessions, retry, settings.heartbeat_interval, open);
        Body::from_stream(frames.take_until(end).map(move |frame| {
            let _held = &present;
            Ok::<_, Infallible>(frame)
        }))
    };

    let mut response = (StatusCode::OK, body).into_response();
    let h = response.headers_mut();
    for (name, value) in STREAM_HEADERS {
        h.insert(name, HeaderValue::from_static(value));
    }
    response.extensions_mut().insert(StreamOnSocket);
    Ok(response)
}

/// One event as published in JSON: to one `topic`, or (alone in the body) to each of `topics`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishItem<'a> {
    #[serde(borrow, default)]
    topic: Option<Name<'a>>,
    #[serde(borrow, default)]
    topics: Option<Vec<Name<'a>>>,
    /// A string is sent as is; any other JSON value is sent as its JSON text.
    data: Value,
    event: Option<String>,
    idempotency_key: Option<String>,
}

/// A topic name as written in the body, borrowed unless escaped (serde borrows a `Cow` only
/// when it is a field's whole type, hence the wrapper).
#[derive(Deserialize)]
struct Name<'a>(#[serde(borrow)] Cow<'a, str>);

/// What a publish's body was, which shapes its answer.
#[derive(Debug, PartialEq)]
enum Shape {
    /// One event: `{"id"}`.
    One,
    /// An array: `{"ids"}`, one per event, in order.
    Batch,
    /// One event to many topics: `{"ids"}`, one per listed topic, in the order listed; entry
    /// `i` is the event stored for the `i`-th listed topic (a repeated topic is stored once).
    Topics(Vec<usize>),
}

/// Stores events and answers `201` once the store has them.
///
/// A batch (a JSON array, or one event to many topics) is validated whole before anything is
/// stored; then each topic's events are stored atomically together, in order, and the topics
/// go to the store together. If the store fails for some topics, the answer is `503` or `500`
/// with `ids`: per event its id when it was stored, `null` when it was not acknowledged (send
/// those again; with idempotency keys that is always safe).
pub async fn publish(
    State(state): State<Arc<AppState>>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let access = take_access(request.extensions_mut());
    let result = store_events(&state, &access, request).await;
    count_publish(
        &state.metrics,
        started,
        result.as_ref().map(|(_, stored)| *stored),
    );
    result.map(|(response, _)| response)
}

/// Counts a publish by its outcome (with the events it stored) and its time, whichever API it
/// came through.
pub(super) fn count_publish(metrics: &Metrics, started: Instant, result: Result<usize, &ApiError>) {
    let outcome = match result {
        Ok(stored) => {
            metrics.events_published.inc_by(stored as u64);
            PublishResult::acknowledged
        }
        Err(e) if e.is_server_error() => PublishResult::failed,
        Err(_) => PublishResult::refused,
    };
    metrics
        .publishes
        .get_or_create(&ResultLabel { result: outcome })
        .inc();
    metrics
        .publish_duration
        .observe(started.elapsed().as_secs_f64());
}

/// Validates, authorizes and stores a publish: the answer, and the number of events stored.
///
/// The request is taken whole and split here, rather than through extractors that copy the
/// headers and the query: this runs for every publish.
async fn store_events(
    state: &AppState,
    access: &Access,
    request: Request,
) -> Result<(Response, usize), ApiError> {
    let (parts, body) = request.into_parts();
    let headers = &parts.headers;
    // Without a usable token, the body is not even read.
    state
        .auth
        .may_try_publishing(access)
        .map_err(|e| refused(state, e))?;
    let body = axum::body::to_bytes(body, super::body_limit(&state.settings))
        .await
        .map_err(|_| {
            ApiError::too_large(
                "body_too_large",
                format!(
                    "the request body is larger than max_event_bytes x max_batch_events ({} x {})",
                    state.settings.max_event_bytes, state.settings.max_batch_events
                ),
            )
        })?;
    let query = PublishQuery::parse(parts.uri.query());
    let limits = Limits {
        max_event_bytes: state.settings.max_event_bytes,
        max_batch_events: state.settings.max_batch_events,
    };

    let header_key = match headers.get("idempotency-key") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    ApiError::bad_request(
                        "invalid_idempotency_key",
                        "Idempotency-Key must be ASCII",
                    )
                })?
                .to_owned(),
        ),
        None => None,
    };
    let (events, shape) = if let Some(topic) = &query.topic {
        let data = String::from_utf8(Vec::from(body)).map_err(|_| {
            ApiError::bad_request("invalid_data", "the event body must be UTF-8 text")
        })?;
        let event = query.event.map(Cow::into_owned);
        let item = limits.check(topic, data, event, header_key, None)?;
        (vec![item], Shape::One)
    } else {
        parse_json_body(&body, &limits, header_key.as_deref())?
    };

    state
        .auth
        .may_publish(access, events.iter().map(|(topic, _)| topic))
        .map_err(|e| refused(state, e))?;

    let outcome = store_by_topic(state.hub.store().as_ref(), events).await;
    let ids = match (outcome, &shape) {
        (Ok(ids), _) => ids,
        (Err((e, _)), Shape::One) => return Err(ApiError::from_store(e, None)),
        (Err((e, stored)), Shape::Batch) => return Err(ApiError::from_store(e, Some(stored))),
        (Err((e, stored)), Shape::Topics(listed)) => {
            let stored = listed.iter().map(|&i| stored[i]).collect();
            return Err(ApiError::from_store(e, Some(stored)));
        }
    };
    let stored = ids.len();
    let body = match &shape {
        Shape::One => Published::One { id: ids.first() },
        Shape::Batch => Published::Batch { ids: &ids },
        Shape::Topics(listed) => {
            let ids: Vec<StreamId> = listed.iter().map(|&i| ids[i]).collect();
            return Ok((
                (StatusCode::CREATED, Json(Published::Batch { ids: &ids })).into_response(),
                stored,
            ));
        }
    };
    Ok(((StatusCode::CREATED, Json(body)).into_response(), stored))
}

/// What a failed store leaves: the first failure, and per event its id if it was stored.
type PartlyStored = (StoreError, Vec<Option<StreamId>>);

/// Stores events, each topic's as one run (atomically, in order), the runs together: one id per
/// event in the events' order, or the first failure (in event order) with what was stored.
async fn store_by_topic(
    store: &dyn Store,
    mut events: Vec<(Topic, NewEvent)>,
) -> Result<Vec<StreamId>, PartlyStored> {
    if events.len() == 1 {
        // The usual publish: no grouping to do.
        let (topic, event) = events
            .pop()
            .ok_or_else(|| (StoreError::Internal("no event".into()), Vec::new()))?;
        return store
            .append(&topic, vec![event])
            .await
            .map_err(|e| (e, vec![None]));
    }
    let (runs, places) = runs_by_topic(events);
    let outcomes = store.append_runs(runs).await;
    let mut ids = Vec::with_capacity(places.len());
    let mut first_error = None;
    for (run, at) in places {
        match &outcomes[run] {
            Ok(run_ids) => ids.push(run_ids.get(at).copied()),
            Err(e) => {
                first_error.get_or_insert_with(|| e.clone());
                ids.push(None);
            }
        }
    }
    match first_error {
        None => ids
            .iter()
            .copied()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                (
                    StoreError::Internal("the store answered too few ids".into()),
                    ids,
                )
            }),
        Some(e) => Err((e, ids)),
    }
}

/// The answer to a publish: `{"id": …}` for one event, `{"ids": […]}` for an array.
#[derive(Serialize)]
#[serde(untagged)]
enum Published<'a> {
    One { id: Option<&'a StreamId> },
    Batch { ids: &'a [StreamId] },
}

/// What a publish reads from the query: `?topic=` (and `?event=`) make the body one event's
/// data. Borrowed from the query unless percent-encoded; the last of repeated names wins.
#[derive(Default)]
struct PublishQuery<'a> {
    topic: Option<Cow<'a, str>>,
    event: Option<Cow<'a, str>>,
}

impl<'a> PublishQuery<'a> {
    fn parse(raw: Option<&'a str>) -> PublishQuery<'a> {
        let mut query = PublishQuery::default();
        for (name, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            match name.as_ref() {
                "topic" => query.topic = Some(value),
                "event" => query.event = Some(value),
                _ => {}
            }
        }
        query
    }
}

/// Counts a refusal by its reason, and turns it into the answer.
pub(super) fn refused(state: &AppState, e: AuthError) -> ApiError {
    let reason = ReasonLabel { reason: e.code() };
    state.metrics.auth_failures.get_or_create(&reason).inc();
    ApiError::Auth(e)
}

/// A topic's events, stored as one run.
type Run = (Topic, Vec<NewEvent>);

/// Groups events by topic, each topic's in order, moving them (no payload copies): each run is
/// stored atomically in one store call. Per event, in order, where it went: its run and its
/// place in the run.
fn runs_by_topic(events: Vec<(Topic, NewEvent)>) -> (Vec<Run>, Vec<(usize, usize)>) {
    // Each event's run, found over borrowed names first: a map keyed by owned topics cost a copy
    // of the name per event.
    let (run_of_event, run_count) = runs_by_name(events.iter().map(|(topic, _)| topic.as_str()));
    let mut runs: Vec<Run> = Vec::with_capacity(run_count);
    let mut places = Vec::with_capacity(events.len());
    for ((topic, event), run) in events.into_iter().zip(run_of_event) {
        if run == runs.len() {
            runs.push((topic, Vec::new()));
        }
        places.push((run, runs[run].1.len()));
        runs[run].1.push(event);
    }
    (runs, places)
}

/// Parses a JSON object or array into validated events, and what shape the body had.
///
/// An `Idempotency-Key` header gives the key of a single event that has none in its body (to
/// many topics: on each of them); in a batch, event `i` without its own key gets `<header>#<i>`,
/// so a retried batch is deduplicated event by event.
fn parse_json_body<'b>(
    body: &'b [u8],
    limits: &Limits,
    header_key: Option<&str>,
) -> Result<(Vec<(Topic, NewEvent)>, Shape), ApiError> {
    let invalid_json = |e: &dyn std::fmt::Display| {
        ApiError::bad_request(
            "invalid_json",
            format!("the body is not valid JSON ({e}); send an event object, an array of them, or a plain body with ?topic="),
        )
    };
    // Read in two passes: the whole body's syntax first (into borrowed slices, one per event),
    // then each event into its fields. A `serde_json::Value` tree instead cost a map and two key
    // strings per event, close to half of a batch's CPU time in the gateway.
    let text = std::str::from_utf8(body).map_err(|e| invalid_json(&e))?;
    let parse_item = |raw: &'b RawValue,
                      index: Option<usize>|
     -> Result<PublishItem<'b>, ApiError> {
        serde_json::from_str(raw.get()).map_err(|e| {
            ApiError::bad_request(
                "invalid_event",
                format!(
                    "{}expected {{\"topic\" or \"topics\", \"data\", \"event\"?, \"idempotency_key\"?}} ({e})",
                    at(index)
                ),
            )
        })
    };
    let key_of = |item: &mut PublishItem, index: Option<usize>| {
        item.idempotency_key.take().or_else(|| {
            header_key.map(|h| match index {
                Some(i) => format!("{h}#{i}"),
                None => h.to_owned(),
            })
        })
    };
    if text.trim_start().starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| invalid_json(&e))?;
        if items.is_empty() {
            return Err(ApiError::bad_request(
                "empty_batch",
                "the batch has no events",
            ));
        }
        limits.check_count(items.len())?;
        let events = items
            .into_iter()
            .enumerate()
            .map(|(i, raw)| {
                let mut item = parse_item(raw, Some(i))?;
                let key = key_of(&mut item, Some(i));
                let topic = match (item.topic, item.topics) {
                    (Some(topic), None) => topic,
                    (_, Some(_)) => return Err(ApiError::bad_request(
                        "invalid_event",
                        format!("{}`topics` is for one event sent alone to many topics; in a batch each event names its `topic`", at(Some(i))),
                    )),
                    (None, None) => return Err(missing_topic(Some(i))),
                };
                limits.check(&topic.0, data_text(item.data), item.event, key, Some(i))
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok((events, Shape::Batch));
    }
    let raw: &RawValue = serde_json::from_str(text).map_err(|e| invalid_json(&e))?;
    if !raw.get().starts_with('{') {
        return Err(ApiError::bad_request(
            "invalid_event",
            "the body must be a JSON object or an array of objects",
        ));
    }
    let mut item = parse_item(raw, None)?;
    let key = key_of(&mut item, None);
    match (item.topic, item.topics) {
        (Some(topic), None) => {
            let event = limits.check(&topic.0, data_text(item.data), item.event, key, None)?;
            Ok((vec![event], Shape::One))
        }
        (None, Some(listed)) => {
            let (topics, listed) = distinct_topics(&listed, limits)?;
            let first = topics
                .first()
                .ok_or_else(|| ApiError::bad_request("missing_topic", "`topics` lists no topic"))?;
            let (_, event) =
                limits.check(first.as_str(), data_text(item.data), item.event, key, None)?;
            let events = topics
                .into_iter()
                .map(|topic| (topic, event.clone()))
                .collect();
            Ok((events, Shape::Topics(listed)))
        }
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "invalid_event",
            "give either `topic` or `topics`, not both",
        )),
        (None, None) => Err(missing_topic(None)),
    }
}

/// The distinct topics of a `topics` list in the order they first appear, and for each listed
/// one its place among them. Repeats count once towards `max_batch_events`.
fn distinct_topics(listed: &[Name], limits: &Limits) -> Result<(Vec<Topic>, Vec<usize>), ApiError> {
    let mut topics: Vec<Topic> = Vec::new();
    let mut place_of: HashMap<&str, usize> = HashMap::with_capacity(listed.len());
    let mut places = Vec::with_capacity(listed.len());
    for (i, name) in listed.iter().enumerate() {
        let name = name.0.as_ref();
        let place = match place_of.get(name) {
            Some(&place) => place,
            None => {
                let topic = Topic::parse(name).map_err(|e| {
                    ApiError::bad_request("invalid_topic", format!("topics[{i}]: {e}"))
                })?;
                topics.push(topic);
                limits.check_count(topics.len())?;
                place_of.insert(name, topics.len() - 1);
                topics.len() - 1
            }
        };
        places.push(place);
    }
    Ok((topics, places))
}

fn missing_topic(index: Option<usize>) -> ApiError {
    ApiError::bad_request(
        "missing_topic",
        format!(
            "{}name the event's `topic` (or, for one event to many topics, `topics`)",
            at(index)
        ),
    )
}

/// An event's data as sent: a JSON string as is, any other value as its JSON text.
fn data_text(data: Value) -> String {
    match data {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

fn at(index: Option<usize>) -> String {
    index.map(|i| format!("event {i}: ")).unwrap_or_default()
}

struct Limits {
    max_event_bytes: usize,
    max_batch_events: usize,
}

impl Limits {
    /// Refuses a batch of more than `max_batch_events` events (or topics).
    fn check_count(&self, events: usize) -> Result<(), ApiError> {
        if events > self.max_batch_events {
            return Err(ApiError::too_large(
                "batch_too_large",
                format!(
                    "a batch holds at most {} events, or an event {} topics (max_batch_events)",
                    self.max_batch_events, self.max_batch_events
                ),
            ));
        }
        Ok(())
    }

    /// Validates one event's fields, naming its place in a batch in the message.
    fn check(
        &self,
        topic: &str,
        data: String,
        event: Option<String>,
        idempotency_key: Option<String>,
        index: Option<usize>,
    ) -> Result<(Topic, NewEvent), ApiError> {
        let topic = Topic::parse(topic)
            .map_err(|e| ApiError::bad_request("invalid_topic", format!("{}{e}", at(index))))?;
        if data.len() > self.max_event_bytes {
            return Err(ApiError::too_large(
                "event_too_large",
                format!(
                    "{}the event data is {} bytes; the limit is {} (max_event_bytes)",
                    at(index),
                    data.len(),
                    self.max_event_bytes
                ),
            ));
        }
        if let Some(ty) = &event {
            validate_event_type(ty).map_err(|e| {
                let code = match e {
                    BadEventType::Malformed => "invalid_event_type",
                    BadEventType::Reserved => "reserved_event_type",
                };
                ApiError::bad_request(code, format!("{}{e}", at(index)))
            })?;
        }
        if let Some(key) = &idempotency_key {
            if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
                return Err(ApiError::bad_request(
                    "invalid_idempotency_key",
                    format!(
                        "{}an idempotency key is 1-{MAX_IDEMPOTENCY_KEY_LEN} bytes",
                        at(index)
                    ),
                ));
            }
        }
        Ok((
            topic,
            NewEvent {
                event: event.filter(|t| t != "message"),
                data,
                idempotency_key,
                labels: Vec::new(),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(crate::testing::proptest_config("hostile_subscriptions_never_panic"))]
        /// Query strings and `Last-Event-ID` values of any bytes: a subscription or a 400.
        #[test]
        fn hostile_subscriptions_never_panic(
            query in proptest::option::of("[\\x00-\\x7f%=&]{0,200}"),
            cursor in proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..40)),
        ) {
            let _ = subscription(query.as_deref(), cursor.as_deref(), 64);
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::proptest_config("hostile_publish_bodies_never_panic"))]
        /// JSON bodies of any shape: events or a 4xx.
        #[test]
        fn hostile_publish_bodies_never_panic(
            raw in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            json in "[\\[\\]{}\\\":,a-z0-9 ]{0,200}",
        ) {
            let limits = Limits { max_event_bytes: 64, max_batch_events: 4 };
            let _ = parse_json_body(&raw, &limits, None);
            let _ = parse_json_body(json.as_bytes(), &limits, Some("k"));
        }
    }

    #[test]
    fn a_publish_query_reads_topic_and_event_in_place_unless_encoded() {
        let q = PublishQuery::parse(Some("access_token=x&topic=a.b&event=note"));
        assert!(matches!(q.topic, Some(Cow::Borrowed("a.b"))));
        assert!(matches!(q.event, Some(Cow::Borrowed("note"))));
        // Percent-encoded values are decoded; the last of repeated names wins, as a map would.
        let q = PublishQuery::parse(Some("topic=first&topic=user%2F42&event=a+b"));
        assert_eq!(q.topic.as_deref(), Some("user/42"));
        assert_eq!(q.event.as_deref(), Some("a b"));
        let q = PublishQuery::parse(None);
        assert!(q.topic.is_none() && q.event.is_none());
    }

    #[test]
    fn a_publish_is_answered_with_its_ids_as_text() {
        let ids = ["5-0".parse().unwrap(), "5-1".parse().unwrap()];
        let one = serde_json::to_string(&Published::One { id: ids.first() }).unwrap();
        assert_eq!(one, r#"{"id":"5-0"}"#);
        let batch = serde_json::to_string(&Published::Batch { ids: &ids }).unwrap();
        assert_eq!(batch, r#"{"ids":["5-0","5-1"]}"#);
    }

    /// Heartbeats come `heartbeat_interval` after the last frame, whatever it was: an event
    /// postpones the next one. Paused time: the clock moves only when everything waits.
    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_comes_an_interval_after_the_last_frame() {
        use crate::hub::Hub;
        use crate::shutdown::Shutdown;
        use crate::store::memory::MemoryStore;
        use crate::store::Store;
        use std::time::Duration;
        use tokio::time::Instant;

        let settings = Settings {
            heartbeat_interval: Duration::from_secs(10),
            ..Settings::default()
        };
        let store = Arc::new(MemoryStore::new(&settings));
        let metrics = Arc::new(Metrics::new());
        let hub = Hub::start(store.clone(), &settings, Shutdown::new(), metrics.clone());
        let topic = Topic::parse("hb").unwrap();
        let session = hub.subscribe(topic.clone(), None).await.unwrap();
        let retry = sse::retry_frame(settings.retry.as_millis() as u64);
        let first = retry.clone();
        let mut frames = Box::pin(event_stream(
            session,
            &settings,
            std::future::pending(),
            metrics,
            first,
            SharedFrames,
        ));
        let start = Instant::now();
        assert_eq!(frames.next().await, Some(retry));

        assert_eq!(frames.next().await, Some(sse::heartbeat_frame()));
        assert_eq!(start.elapsed(), Duration::from_secs(10));

        tokio::time::sleep(Duration::from_secs(5)).await;
        let event = NewEvent {
            event: None,
            data: "x".into(),
            idempotency_key: None,
            labels: Vec::new(),
        };
        store.append(&topic, vec![event]).await.unwrap();
        let live = frames.next().await.unwrap();
        assert!(live.starts_with(b"id: "), "{live:?}");
        assert_eq!(start.elapsed(), Duration::from_secs(15));

        // Not at 20 s, when the timer set after the first heartbeat fires: 10 s after the event.
        assert_eq!(frames.next().await, Some(sse::heartbeat_frame()));
        assert_eq!(start.elapsed(), Duration::from_secs(25));
    }
}
