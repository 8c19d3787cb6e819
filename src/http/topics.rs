//! The server API over topics: history without a stream, a topic's state, the topics with
//! subscribers, and deleting a topic.
//!
//! | route | who |
//! |---|---|
//! | `GET /v1/topics/{topic}/events` | a token that may subscribe to the topic, or administer it |
//! | `GET /v1/topics/{topic}` | `ssegate.admin` covering the topic |
//! | `GET /v1/topics` | `ssegate.admin`; lists only the topics its patterns cover |
//! | `DELETE /v1/topics/{topic}` | `ssegate.admin` covering the topic |
//!
//! History is read through the same store calls and the same gap rule as a stream's replay, so
//! a page equals what a stream resuming from the same cursor sends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::events::{refused, take_access};
use super::{ApiError, AppState};
use crate::auth::{pattern, Access};
use crate::event::{Event, StreamId, Topic};
use crate::metrics::CallLabel;

/// Events a history page holds unless `limit` says otherwise.
const DEFAULT_LIMIT: usize = 100;
/// The most a history page or a topic list holds.
const MAX_LIMIT: usize = 1000;

/// A history page's event: the stream entry as SSE would carry it.
#[derive(Serialize)]
struct EventJson<'a> {
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a str>,
    data: &'a str,
}

fn events_json(events: &[Event]) -> Vec<EventJson<'_>> {
    events
        .iter()
        .map(|e| EventJson {
            id: e.id.to_string(),
            event: e.event.as_deref(),
            data: &e.data,
        })
        .collect()
}

/// The query's name → value pairs, the last of each name winning.
fn query(request: &Request) -> BTreeMap<String, String> {
    form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn limit(query: &BTreeMap<String, String>) -> Result<usize, ApiError> {
    match query.get("limit") {
        None => Ok(DEFAULT_LIMIT),
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_limit",
                    format!("`limit` must be a whole number from 1 to {MAX_LIMIT}"),
                )
            }),
    }
}

fn cursor(name: &str, text: &str) -> Result<StreamId, ApiError> {
    text.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_cursor",
            format!("`{name}` must be an event id (`<ms>-<seq>`) or `0`"),
        )
    })
}

fn topic(text: &str) -> Result<Topic, ApiError> {
    Topic::parse(text).map_err(|e| ApiError::bad_request("invalid_topic", e.to_string()))
}

/// Counts one call of the server API.
fn count(state: &AppState, call: &'static str) {
    state
        .metrics
        .api_calls
        .get_or_create(&CallLabel { call })
        .inc();
}

/// `GET /v1/topics/{topic}/events?after=<id>&limit=<n>`: up to `limit` events after `after`
/// (default `0`: from the oldest retained), oldest first, with the stream's gap rule:
///
/// ```json
/// {"topic": "t", "events": [{"id", "event"?, "data"}], "gap": null, "next": "<id>", "more": false}
/// ```
///
/// `gap` is the `ssegate.gap` notice a stream resuming from `after` would get first; `next` is
/// the `after` of the next page. With `?before=<id>` (empty: from the newest), the events
/// before it, newest first: `next` is then the `before` of the next page (`null` at the
/// start), and `gap` (`{"reason": "trimmed"}`) says that the oldest retained event was reached
/// and older ones were trimmed.
pub async fn history(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let access = take_access(request.extensions_mut());
    let topic = topic(&name)?;
    if let Err(e) = state.auth.may_subscribe(&access, &topic) {
        state
            .auth
            .may_administer(&access, topic.as_str())
            .map_err(|_| refused(&state, e))?;
    }
    count(&state, "history");
    let query = query(&request);
    let limit = limit(&query)?;
    let store = state.hub.store();
    if let Some(before) = query.get("before") {
        if query.contains_key("after") {
            return Err(ApiError::bad_request(
                "invalid_query",
                "give `after` (oldest first) or `before` (newest first), not both",
            ));
        }
        let before = match before.as_str() {
            "" => None,
            text => Some(cursor("before", text)?),
        };
        let mut events = store
            .read_back(&topic, before, limit + 1)
            .await
            .map_err(|e| ApiError::from_store(e, None))?;
        let more = events.len() > limit;
        events.truncate(limit);
        let gap = if more {
            None
        } else {
            let stat = store
                .stat(&topic)
                .await
                .map_err(|e| ApiError::from_store(e, None))?;
            stat.removed_any.then(|| json!({"reason": "trimmed"}))
        };
        let next = if more {
            events.last().map(|e| e.id.to_string())
        } else {
            None
        };
        let body = json!({
            "topic": topic.as_str(),
            "events": events_json(&events),
            "gap": gap,
            "next": next,
            "more": more,
        });
        return Ok(Json(body).into_response());
    }
    let after = match query.get("after") {
        Some(text) => cursor("after", text)?,
        None => StreamId::ZERO,
    };
    let mut page = store
        .read(&topic, after, limit + 1)
        .await
        .map_err(|e| ApiError::from_store(e, None))?;
    let more = page.events.len() > limit;
    page.events.truncate(limit);
    let gap = page.gap.map(|reason| {
        json!({
            "cursor": after.to_string(),
            "reason": reason.as_str(),
            "resume_from": page.events.first().map(|e| e.id.to_string()),
        })
    });
    // As a stream's replay moves its cursor: past the last event, or, after a gap with nothing
    // retained, to where the stream ended.
    let next = match (page.events.last(), page.resume_after) {
        (Some(last), _) => last.id,
        (None, Some(end)) => end,
        (None, None) => after,
    };
    let body = json!({
        "topic": topic.as_str(),
        "events": events_json(&page.events),
        "gap": gap,
        "next": next.to_string(),
        "more": more,
    });
    Ok(Json(body).into_response())
}

/// What `state` needs of a presence entry.
#[derive(Deserialize)]
struct EntryNode {
    #[serde(default)]
    node: Option<String>,
}

/// `GET /v1/topics/{topic}`: the topic's stream, its subscribers on every node now, and the
/// retention in force.
///
/// ```json
/// {"topic": "t", "exists": true, "length": 3, "first_id": "…", "last_id": "…",
///  "last_generated_id": "…", "last_publish": "2026-12-06T10:00:00.000Z",
///  "subscribers": 2, "nodes": {"<node>": 2}, "retention": {"max_events": 10000, …}}
/// ```
///
/// `subscribers` and `nodes` come from the presence registry: `null` with `presence.enabled`
/// off. `last_publish` is the time in the newest id the topic generated.
pub async fn state(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let access = take_access(request.extensions_mut());
    let topic = topic(&name)?;
    state
        .auth
        .may_administer(&access, topic.as_str())
        .map_err(|e| refused(&state, e))?;
    count(&state, "topic");
    let stat = state
        .hub
        .store()
        .stat(&topic)
        .await
        .map_err(|e| ApiError::from_store(e, None))?;
    let (subscribers, nodes) = match &state.presence {
        Some(presence) => {
            let entries = presence.entries(topic.as_str()).await?;
            let mut nodes: BTreeMap<String, usize> = BTreeMap::new();
            for entry in &entries {
                if let Ok(EntryNode { node: Some(node) }) = serde_json::from_str(entry) {
                    *nodes.entry(node).or_default() += 1;
                }
            }
            (Some(entries.len()), Some(nodes))
        }
        None => (None, None),
    };
    let last_publish = (!stat.last_generated.is_zero()).then(|| {
        let at = UNIX_EPOCH + Duration::from_millis(stat.last_generated.ms);
        humantime::format_rfc3339_millis(at).to_string()
    });
    let id = |id: Option<StreamId>| id.map(|id| id.to_string());
    let body = json!({
        "topic": topic.as_str(),
        "exists": stat.exists,
        "length": stat.length,
        "first_id": id(stat.first),
        "last_id": id(stat.last),
        "last_generated_id": id((!stat.last_generated.is_zero()).then_some(stat.last_generated)),
        "last_publish": last_publish,
        "trimmed": stat.removed_any,
        "subscribers": subscribers,
        "nodes": nodes,
        "retention": &state.settings.retention,
    });
    Ok(Json(body).into_response())
}

/// `GET /v1/topics?prefix=<p>&after=<topic>&limit=<n>`: the topics with subscribers now, on
/// any node, in name order, that the token's `ssegate.admin` patterns cover:
/// `{"topics": ["…"], "next": "<after of the next page>" | null}`. Read from the presence
/// registry (`404` with `presence.enabled` off).
pub async fn list(
    State(state): State<Arc<AppState>>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let access = take_access(request.extensions_mut());
    let covers: Box<dyn Fn(&str) -> bool + Send> = match access {
        Access::Open => Box::new(|_| true),
        Access::Token(v) if !v.grants.admin.is_empty() => {
            let patterns = v.grants.admin;
            Box::new(move |t| pattern::any_matches(&patterns, t))
        }
        other => {
            // No admin patterns at all: refused as for any one topic.
            let e = state.auth.may_administer(&other, "*").err();
            return Err(refused(
                &state,
                e.unwrap_or(crate::auth::AuthError::Missing),
            ));
        }
    };
    let Some(presence) = &state.presence else {
        return Err(ApiError::NotFound);
    };
    count(&state, "topics");
    let query = query(&request);
    let limit = limit(&query)?;
    let prefix = query.get("prefix").map_or("", String::as_str);
    let after = query.get("after").map(String::as_str);
    let topics = presence.topics().await?;
    let mut page: Vec<&String> = topics
        .iter()
        .filter(|t| t.starts_with(prefix))
        .filter(|t| after.is_none_or(|after| t.as_str() > after))
        .filter(|t| covers(t))
        .take(limit + 1)
        .collect();
    let more = page.len() > limit;
    page.truncate(limit);
    let next = if more { page.last().copied() } else { None };
    Ok(Json(json!({ "topics": page, "next": next })).into_response())
}

/// `DELETE /v1/topics/{topic}`: removes the topic's stream, idempotency keys and tombstone,
/// after telling its subscribers on every node (`ssegate.gap`, reason `deleted`; they go on
/// from nothing). `200 {"topic", "deleted": <whether there was anything>, "last_id"}`.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let access = take_access(request.extensions_mut());
    let topic = topic(&name)?;
    state
        .auth
        .may_administer(&access, topic.as_str())
        .map_err(|e| refused(&state, e))?;
    count(&state, "delete");
    let upto = state
        .hub
        .store()
        .delete(&topic)
        .await
        .map_err(|e| ApiError::from_store(e, None))?;
    tracing::info!(topic = %topic, last_id = ?upto.map(|id| id.to_string()), "topic deleted");
    let body = json!({
        "topic": topic.as_str(),
        "deleted": upto.is_some(),
        "last_id": upto.map(|id| id.to_string()),
    });
    Ok(Json(body).into_response())
}
