//! `GET /v1/topics/{topic}/presence`: who is subscribed to a topic, on every node.
//!
//! ```json
//! {"topic": "doc.7", "connections": [{"id": "…", "sub": "ada", "info": {…}, "node": "…", "connected_at": "…"}]}
//! ```
//!
//! With `?count=1`, only the numbers: `{"topic": "doc.7", "connections": 3, "subs": 2}` (`subs`:
//! distinct token subjects; connections without a token `sub` count as connections only). The
//! token's `ssegate.admin` patterns must cover the topic.

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::events::{refused, take_access};
use super::{ApiError, AppState};
use crate::auth::Access;
use crate::event::Topic;
use crate::presence::Holder;

/// Who a request's token says it is, for its presence entry.
pub(super) fn holder(access: &Access) -> Holder {
    match access {
        Access::Token(v) => Holder {
            sub: v.sub.clone(),
            info: v.grants.info.clone(),
        },
        _ => Holder::default(),
    }
}

/// Only what `count` needs of an entry.
#[derive(Deserialize)]
struct Subject<'a> {
    #[serde(borrow)]
    sub: Option<std::borrow::Cow<'a, str>>,
}

pub async fn presence(
    State(state): State<Arc<AppState>>,
    Path(topic): Path<String>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let access = take_access(request.extensions_mut());
    let topic =
        Topic::parse(&topic).map_err(|e| ApiError::bad_request("invalid_topic", e.to_string()))?;
    state
        .auth
        .may_administer(&access, topic.as_str())
        .map_err(|e| refused(&state, e))?;
    // Off (`presence.enabled`): as if there were no such route.
    let Some(presence) = &state.presence else {
        return Err(ApiError::NotFound);
    };
    let count = form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
        .any(|(name, value)| name == "count" && (value == "1" || value == "true"));
    let entries = presence.entries(topic.as_str()).await?;
    if count {
        let subs: HashSet<String> = entries
            .iter()
            .filter_map(|e| serde_json::from_str::<Subject>(e).ok()?.sub)
            .map(|s| s.into_owned())
            .collect();
        let body = serde_json::json!({
            "topic": topic.as_str(),
            "connections": entries.len(),
            "subs": subs.len(),
        });
        return Ok(Json(body).into_response());
    }
    // The entries are the registry's JSON, passed on as they are.
    let connections: Vec<Box<RawValue>> = entries
        .into_iter()
        .filter_map(|e| RawValue::from_string(e).ok())
        .collect();
    let body = serde_json::json!({ "topic": topic.as_str(), "connections": connections });
    Ok(Json(body).into_response())
}
