//! `GET /.well-known/mercure/subscriptions[/{topic}[/{subscriber}]]`: the Mercure hub's active
//! subscriptions on every node (see [`crate::mercure::subscriptions`]), as `application/ld+json`
//! with `lastEventID`, the id to resume subscription events from without missing a change.
//!
//! The token's `mercure.subscribe` selectors must match the URL as requested (a valid token that
//! does not is `401`, as the protocol has it). The `ETag` is the `lastEventID`: every change of
//! the subscriptions publishes an update, so an unchanged id means an unchanged answer, and
//! `If-None-Match` with it is answered `304`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::events::{refused, take_access};
use super::mercure::claim_selectors;
use super::{ApiError, AppState};
use crate::auth::{Access, AuthError};
use crate::mercure::selector::any_match;
use crate::mercure::subscriptions::{registry_topic, unescape, Active, CONTEXT, PATH};
use crate::mercure::update::{generated_id, Stored};
use crate::mercure::{log_topic, EARLIEST};
use crate::store::Store;

/// What a request asks for: every subscription, those of one selector, or one.
enum Asked {
    All,
    Selector(String),
    One {
        selector: String,
        subscriber: String,
    },
}

impl Asked {
    /// From the path after [`PATH`], its parts escaped as subscription ids are.
    fn parse(rest: &str) -> Option<Asked> {
        let parts: Vec<&str> = match rest.strip_prefix('/') {
            None if rest.is_empty() => return Some(Asked::All),
            None => return None,
            Some("") => return Some(Asked::All),
            Some(rest) => rest.split('/').collect(),
        };
        match parts[..] {
            [selector] => Some(Asked::Selector(unescape(selector)?)),
            [selector, subscriber] => Some(Asked::One {
                selector: unescape(selector)?,
                subscriber: unescape(subscriber)?,
            }),
            _ => None,
        }
    }
}

pub async fn subscriptions(
    State(state): State<Arc<AppState>>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let access = take_access(request.extensions_mut());
    let uri = request.uri().path_and_query().map_or_else(
        || request.uri().path().to_owned(),
        |p| p.as_str().to_owned(),
    );
    match &access {
        Access::Open => {}
        Access::Invalid(e) => return Err(refused(&state, e.clone())),
        Access::Anonymous => return Err(refused(&state, AuthError::Missing)),
        Access::Token(v) => {
            if !any_match(&claim_selectors(v, |m| &m.subscribe), [uri.as_str()]) {
                return Err(refused(
                    &state,
                    AuthError::Uncovered(
                        "the token's mercure.subscribe selectors do not match this URL",
                    ),
                ));
            }
        }
    }
    let path = request.uri().path();
    let asked = path
        .strip_prefix(PATH)
        .and_then(Asked::parse)
        .ok_or(ApiError::NotFound)?;
    let Some(presence) = &state.presence else {
        return Err(ApiError::NotFound);
    };
    // The id first, then the list: a change the list misses is published after the id, so a
    // client resuming from the id gets it.
    let last_event_id = last_event_id(state.hub.store().as_ref()).await?;
    let unchanged = request
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tag| tag.trim().trim_matches('"') == last_event_id);
    let etag = HeaderValue::from_str(&last_event_id).unwrap_or(HeaderValue::from_static(EARLIEST));
    if unchanged {
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        response.headers_mut().insert(header::ETAG, etag);
        return Ok(response);
    }
    let entries = presence.entries(&registry_topic()).await?;
    let active = entries.iter().filter_map(|e| Active::read(e));
    let body = match asked {
        Asked::One {
            selector,
            subscriber,
        } => {
            let found = active
                .filter(|a| a.subscriber() == subscriber)
                .find_map(|a| a.documents(Some(&selector), true).into_iter().next());
            let Some(mut doc) = found else {
                return Err(ApiError::NotFound);
            };
            doc["lastEventID"] = json!(last_event_id);
            doc
        }
        Asked::All | Asked::Selector(_) => {
            let selector = match &asked {
                Asked::Selector(s) => Some(s.as_str()),
                _ => None,
            };
            let subscriptions: Vec<Value> =
                active.flat_map(|a| a.documents(selector, false)).collect();
            json!({
                "@context": CONTEXT,
                "id": uri,
                "type": "Subscriptions",
                "lastEventID": last_event_id,
                "subscriptions": subscriptions,
            })
        }
    };
    let mut response = (StatusCode::OK, body.to_string()).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/ld+json"),
    );
    h.insert(header::ETAG, etag);
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("must-revalidate"),
    );
    Ok(response)
}

/// The id of the last update in the log, as subscribers know it; `earliest` for none.
async fn last_event_id(store: &dyn Store) -> Result<String, ApiError> {
    let log = log_topic();
    let tail = store.tail(&log).await?;
    if tail.is_zero() {
        return Ok(EARLIEST.to_owned());
    }
    let id = store.event_at(&log, tail).await?.and_then(|event| {
        Stored::read(&event.data).map(|stored| stored.wire_id(tail).into_owned())
    });
    Ok(id.unwrap_or_else(|| generated_id(tail)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_what_is_asked() {
        assert!(matches!(Asked::parse(""), Some(Asked::All)));
        assert!(matches!(Asked::parse("/"), Some(Asked::All)));
        assert!(Asked::parse("x").is_none());
        assert!(
            matches!(Asked::parse("/https%3A%2F%2Fa%2F%7Bx%7D"), Some(Asked::Selector(s)) if s == "https://a/{x}")
        );
        assert!(matches!(
            Asked::parse("/a+b/urn%3Auuid%3A1"),
            Some(Asked::One { selector, subscriber }) if selector == "a b" && subscriber == "urn:uuid:1"
        ));
        assert!(Asked::parse("/a/b/c").is_none());
        assert!(Asked::parse("/%FF").is_none());
    }
}
