//! `POST /v1/disconnect`: ends streams on every node, and with `"revoke": true` refuses their
//! tokens from then on.
//!
//! ```json
//! {"sub": "42"} | {"jti": "…", "exp"?: 1767225600} | {"topic": "…"}, "revoke"?: true
//! ```
//!
//! A topic needs a token whose `ssegate.admin` patterns cover it; a `sub` or a `jti` (which
//! reach every topic) need `"*"`. Revoking works by `sub` (every token of it issued until now,
//! by `iat`) or by `jti` (that token; `exp`, when given, bounds how long it is kept), not by
//! topic. Answers `200 {"revoked": <bool>, "revoked_until": <RFC 3339> | null,
//! "ended_here": <streams ended on this node>}` once the revocation is stored and the
//! disconnect announced; other nodes end theirs as the announcement reaches them.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::events::{refused, take_access};
use super::{ApiError, AppState};
use crate::control::Selector;
use crate::metrics::CallLabel;

/// The body, as sent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    /// Any JSON value, kept as text, as a token's `sub` is.
    #[serde(default)]
    sub: Option<serde_json::Value>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    revoke: bool,
    /// The revoked token's `exp` (unix seconds): it need not be remembered longer.
    #[serde(default)]
    exp: Option<u64>,
}

/// Bodies are small; anything larger is refused before it is parsed.
const MAX_BODY: usize = 16 * 1024;

pub async fn disconnect(
    State(state): State<Arc<AppState>>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let access = take_access(request.extensions_mut());
    // No token, or a bad one, is refused before the body is read.
    state
        .auth
        .may_try_publishing(&access)
        .map_err(|e| refused(&state, e))?;
    let bytes: Bytes = axum::body::to_bytes(request.into_body(), MAX_BODY)
        .await
        .map_err(|_| ApiError::too_large("body_too_large", "the body is over 16 KiB"))?;
    let body: Body = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))?;
    let sub = body.sub.map(crate::auth::sub_text);
    let selector = match (sub, body.jti, body.topic) {
        (Some(sub), None, None) if !sub.is_empty() => Selector::Sub(sub),
        (None, Some(jti), None) if !jti.is_empty() => Selector::Jti(jti),
        (None, None, Some(topic)) => {
            let topic = crate::event::Topic::parse(&topic)
                .map_err(|e| ApiError::bad_request("invalid_topic", e.to_string()))?;
            Selector::Topic(topic.as_str().to_owned())
        }
        _ => {
            return Err(ApiError::bad_request(
                "invalid_disconnect",
                "name exactly one of `sub`, `jti` or `topic` (not empty)",
            ))
        }
    };
    if body.revoke && matches!(selector, Selector::Topic(_)) {
        return Err(ApiError::bad_request(
            "invalid_disconnect",
            "`revoke` needs a `sub` or a `jti`: a topic names no token",
        ));
    }
    let covered = match &selector {
        Selector::Topic(topic) => topic.as_str(),
        // A user's or a token's streams may read any topic.
        Selector::Sub(_) | Selector::Jti(_) => "*",
    };
    state
        .auth
        .may_administer(&access, covered)
        .map_err(|e| refused(&state, e))?;
    state
        .metrics
        .api_calls
        .get_or_create(&CallLabel { call: "disconnect" })
        .inc();
    let outcome = state
        .control
        .disconnect(selector, body.revoke, body.exp)
        .await?;
    let until = outcome.revoked_until.map(|ms| {
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
    });
    Ok(Json(json!({
        "revoked": until.is_some(),
        "revoked_until": until,
        "ended_here": outcome.ended_here,
    }))
    .into_response())
}
