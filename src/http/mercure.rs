//! `/.well-known/mercure`: the Mercure hub's subscribe (`GET`) and publish (form `POST`), over the
//! same hub, store and layers as `/v1/events` (see [`crate::mercure`] for the protocol's side).
//!
//! What differs from `/v1` is the protocol's surface: topic selectors instead of topic names,
//! ids that are the publisher's (or `urn:uuid:`s), a form body answered with the id as text, and
//! the `mercure` claim. Authentication (in the Mercure order of token sources), CORS, the
//! connection limit, metrics, the write deadline and shutdown are the gateway's, as for `/v1`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures_util::StreamExt;

use super::events::{count_publish, event_stream, refused, take_access, Frames};
use super::{ApiError, AppState, StreamOnSocket};
use crate::auth::{Access, AuthError, MercureGrants, Verified};
use crate::event::{validate_event_type, BadEventType, NewEvent, StreamId, Topic};
use crate::hub::{Delivery, ReplayPage};
use crate::mercure::router::Registration;
use crate::mercure::selector::Selector;
use crate::mercure::subscriptions::registry_topic;
use crate::mercure::update::{generated_id, Stored};
use crate::mercure::{self, gap_frame, log_topic, Resume, Subscriber, EARLIEST};
use crate::presence::{Holder, Present};
use crate::sse;
use crate::store::{GapReason, Store};

/// Longest topic or selector accepted, in bytes: topics are IRIs, which can be long.
pub const MAX_TOPIC_BYTES: usize = 4096;
/// Longest publisher-given id, in bytes.
pub const MAX_ID_BYTES: usize = 1024;

/// Opens a Mercure event stream: a `:` comment at once (clients wait for `open`), then the log
/// from the resume point, then live updates, each kept or left out by the subscription's
/// selectors and token. It ends at the token's `exp`.
pub async fn subscribe(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (mut parts, _) = request.into_parts();
    let access = take_access(&mut parts.extensions);
    let settings = &state.settings;
    let private = match &access {
        Access::Invalid(e) => return Err(refused(&state, e.clone())),
        Access::Anonymous if !settings.mercure.anonymous => {
            return Err(refused(&state, AuthError::Missing))
        }
        // Without a configured key there is no token that could prove a right to private
        // updates, so none are sent.
        Access::Anonymous | Access::Open => None,
        Access::Token(v) => Some(claim_selectors(v, |m| &m.subscribe)),
    };
    let query = SubscribeQuery::parse(parts.uri.query(), settings.max_topics_per_connection)?;
    let cursor = match parts.headers.get("last-event-id") {
        Some(value) => Some(
            std::str::from_utf8(value.as_bytes())
                .map_err(|_| {
                    ApiError::bad_request("invalid_cursor", "Last-Event-ID must be UTF-8 text")
                })?
                .trim()
                .to_owned(),
        ),
        None => None,
    }
    .filter(|c| !c.is_empty())
    .or(query.last_event_id);

    let store = state.hub.store();
    let log = log_topic();
    let resume = match &cursor {
        Some(id) => Some(mercure::resolve(store.as_ref(), id).await?),
        None => None,
    };
    let start = match resume {
        None => None,
        Some(Resume::Earliest | Resume::Unknown) => Some(StreamId::ZERO),
        Some(Resume::After(at)) => Some(at),
    };
    // The response names the id before the first update sent, or `earliest` when there is
    // none (everything retained follows, the id is unknown, or history after it was trimmed).
    let header = match (resume, &cursor) {
        (Some(Resume::After(at)), Some(id)) => {
            let covered = store.read(&log, at, 1).await?.gap.is_none();
            Some(if covered { id.as_str() } else { EARLIEST })
        }
        (Some(_), _) => Some(EARLIEST),
        (None, _) => None,
    }
    // An id is UTF-8, which a header value carries as its bytes.
    .map(|value| {
        HeaderValue::from_bytes(value.as_bytes()).unwrap_or(HeaderValue::from_static(EARLIEST))
    });

    // With active subscriptions on, the stream is filed in the presence registry (its
    // subscription updates are published when the entry is written and when it goes).
    let present = match &state.presence {
        Some(presence) if settings.mercure.subscriptions => {
            let selectors: Vec<String> = query
                .selectors
                .iter()
                .map(|s| s.as_str().to_owned())
                .collect();
            // As a `/v1` entry, with `mercure.payload` for its info.
            let holder = match &access {
                Access::Token(v) => Holder {
                    sub: v.sub.clone(),
                    info: v.mercure.as_ref().and_then(|m| m.payload.clone()),
                },
                _ => Holder::default(),
            };
            Some(presence.join(vec![registry_topic()], &holder, Some(&selectors)))
        }
        _ => None,
    };
    // Ends the stream at the token's `exp` or when a disconnect by `sub` or `jti` selects it
    // (a topic's ends the subscriptions with that selector).
    let end = state.control.ending(&access);
    let subscriber = Subscriber::new(query.selectors, private);
    let (session, registration) = state.mercure.subscribe(subscriber, start).await?;
    let mut first = BytesMut::from(&b":\n\n"[..]);
    first.extend_from_slice(&sse::retry_frame(settings.retry.as_millis() as u64));
    if let (Some(Resume::Unknown), Some(id)) = (resume, &cursor) {
        first.extend_from_slice(&unknown_id_frame(id));
    }
    let frames = MercureFrames {
        registration,
        _present: present,
        cursor: cursor.zip(start),
        from_start: matches!(resume, Some(Resume::Earliest | Resume::Unknown)),
    };
    let body = event_stream(
        session,
        settings,
        end,
        state.metrics.clone(),
        first.freeze(),
        frames,
    );
    let mut response = (
        StatusCode::OK,
        Body::from_stream(body.map(Ok::<_, std::convert::Infallible>)),
    )
        .into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    // `private`: the request may carry its token in the query (the protocol asks for it then).
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Some(value) = header {
        h.insert("last-event-id", value);
    }
    response.extensions_mut().insert(StreamOnSocket);
    Ok(response)
}

/// The selectors of a verified token's `mercure` claim (none without one): `which` picks
/// `publish` or `subscribe`.
pub(super) fn claim_selectors(
    token: &Verified,
    which: fn(&MercureGrants) -> &Vec<String>,
) -> Vec<Selector> {
    token
        .mercure
        .iter()
        .flat_map(|m| which(m).iter())
        .map(|s| Selector::lenient(s))
        .collect()
}

/// The notice for an id the hub cannot find: what follows is everything retained.
fn unknown_id_frame(id: &str) -> Bytes {
    let notice = serde_json::json!({
        "cursor": id,
        "reason": GapReason::UnknownCursor.as_str(),
        "resume_from": EARLIEST,
    });
    sse::frame(None, Some(sse::GAP_EVENT), &notice.to_string())
}

/// What a subscription's query asks for.
struct SubscribeQuery {
    selectors: Vec<Selector>,
    /// `lastEventID`, which the header overrides.
    last_event_id: Option<String>,
}

impl SubscribeQuery {
    fn parse(raw: Option<&str>, max_selectors: usize) -> Result<SubscribeQuery, ApiError> {
        let mut selectors = Vec::new();
        let mut last_event_id = None;
        for (name, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            match name.as_ref() {
                "topic" => {
                    if selectors.len() == max_selectors {
                        return Err(ApiError::bad_request(
                            "too_many_topics",
                            format!("a subscription has at most {max_selectors} topic selectors (max_topics_per_connection)"),
                        ));
                    }
                    check_topic(&value)?;
                    let selector = Selector::parse(&value)
                        .map_err(|e| ApiError::bad_request("invalid_selector", e.to_string()))?;
                    selectors.push(selector);
                }
                "lastEventID" if last_event_id.is_none() && !value.is_empty() => {
                    last_event_id = Some(value.into_owned());
                }
                _ => {}
            }
        }
        if selectors.is_empty() {
            return Err(ApiError::bad_request(
                "missing_topic",
                "give at least one topic selector as ?topic= (`*`, a topic, or a URI template)",
            ));
        }
        Ok(SubscribeQuery {
            selectors,
            last_event_id,
        })
    }
}

/// A topic or selector: not empty, at most [`MAX_TOPIC_BYTES`].
fn check_topic(topic: &str) -> Result<(), ApiError> {
    if topic.is_empty() {
        return Err(ApiError::bad_request("invalid_topic", "a topic is empty"));
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(ApiError::too_large(
            "topic_too_long",
            format!("a topic or selector is at most {MAX_TOPIC_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// The frames of a Mercure stream: the updates the router sends its subscription, encoded once
/// for every client; replayed updates encoded here; gap notices with the ids the client knows.
struct MercureFrames {
    /// The subscription, kept routed for as long as the stream lives.
    registration: Registration,
    /// Its entry among the active subscriptions, for as long as the stream lives.
    _present: Option<Present>,
    /// The id the client resumed from, and the log position it stands for.
    cursor: Option<(String, StreamId)>,
    /// The stream started from the log's beginning (`earliest`, or an unknown id, whose
    /// notice went out first): a trimmed beginning is not news to it.
    from_start: bool,
}

impl Frames for MercureFrames {
    fn live(&mut self, delivery: &Delivery) -> Option<Bytes> {
        Some(delivery.frame.clone())
    }

    fn replayed(&mut self, page: &ReplayPage) -> Option<(Bytes, usize)> {
        let mut out = BytesMut::new();
        if let Some(gap) = &page.gap {
            if !(self.from_start && gap.cursor.is_zero()) {
                let cursor = match &self.cursor {
                    Some((id, at)) if *at == gap.cursor => id.clone(),
                    _ => generated_id(gap.cursor),
                };
                out.extend_from_slice(&gap_frame(&cursor, gap.reason, page.events.first()));
            }
        }
        let sent = page
            .events
            .iter()
            .filter(|e| self.registration.subscriber().write(e, &mut out))
            .count();
        (!out.is_empty()).then(|| (out.freeze(), sent))
    }
}

/// Stores one update and answers `200` with its id as text once the store has it.
pub async fn publish(
    State(state): State<Arc<AppState>>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let access = take_access(request.extensions_mut());
    let result = store_update(&state, &access, request).await;
    count_publish(&state.metrics, started, result.as_ref().map(|_| 1));
    result
}

async fn store_update(
    state: &AppState,
    access: &Access,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let settings = &state.settings;
    // Who may publish what; `None`: everything (no key configured).
    let allowed: Option<Vec<Selector>> = match access {
        Access::Invalid(e) => return Err(refused(state, e.clone())),
        Access::Anonymous => return Err(refused(state, AuthError::Missing)),
        Access::Open => None,
        Access::Token(v) => {
            if v.from_cookie && !origin_allowed(&parts.headers, &settings.mercure.publish_origins) {
                return Err(refused(
                    state,
                    AuthError::Refused(
                        "a token in a cookie publishes only from an origin listed in mercure.publish_origins (send Origin or Referer), or send it as `Authorization: Bearer`".into(),
                    ),
                ));
            }
            Some(claim_selectors(v, |m| &m.publish))
        }
    };
    let form_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !form_type {
        return Err(ApiError::bad_request(
            "invalid_form",
            "publish with Content-Type: application/x-www-form-urlencoded",
        ));
    }
    // Percent-encoding can triple the data; topics and the rest fit in the extra megabyte.
    let limit = settings
        .max_event_bytes
        .saturating_mul(3)
        .saturating_add(1024 * 1024);
    let body = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::too_large(
            "body_too_large",
            format!("the form is larger than {limit} bytes"),
        )
    })?;
    let form = PublishForm::parse(&body, settings.max_topics_per_connection)?;
    if form.data.len() > settings.max_event_bytes {
        return Err(ApiError::too_large(
            "event_too_large",
            format!(
                "the update's data is {} bytes; the limit is {} (max_event_bytes)",
                form.data.len(),
                settings.max_event_bytes
            ),
        ));
    }
    if let Some(allowed) = &allowed {
        if let Some(topic) = form
            .topics
            .iter()
            .find(|t| !allowed.iter().any(|s| s.matches(t)))
        {
            return Err(refused(
                state,
                AuthError::Forbidden {
                    action: "publishing",
                    topic: topic.chars().take(200).collect(),
                },
            ));
        }
    }
    if form.private && allowed.is_none() {
        return Err(ApiError::bad_request(
            "private_without_auth",
            "no key is configured, so no subscriber could ever be allowed to receive a private update; configure auth.jwt_key (or mercure.subscriber_jwt_key) first",
        ));
    }
    let id = form.id.clone();
    let stored = Stored {
        topics: form.topics.into_iter().map(Into::into).collect(),
        private: form.private,
        id: form.id.map(Into::into),
        retry: form.retry,
        data: form.data.into(),
    };
    let event = stored.into_event(form.event_type);
    let store = state.hub.store();
    let log = log_topic();
    if let Some(id) = &id {
        refuse_reused_id(store.as_ref(), &log, id, &event).await?;
    }
    let ids = store.append(&log, vec![event]).await?;
    let id = match (id, ids.first()) {
        (Some(id), _) => id,
        (None, Some(stream_id)) => generated_id(*stream_id),
        (None, None) => {
            return Err(ApiError::Internal {
                message: "the store returned no id".into(),
                stored: None,
            })
        }
    };
    let mut response = (StatusCode::OK, id).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(response)
}

/// An id already given to an update is accepted again only for the same update (a publisher's
/// retry, which is then not stored twice); another update under it is refused, rather than
/// acknowledged and dropped. Two different updates racing with one new id are not caught: the
/// second is answered with the id and not stored.
async fn refuse_reused_id(
    store: &dyn Store,
    log: &Topic,
    id: &str,
    event: &NewEvent,
) -> Result<(), ApiError> {
    let Some(first) = store.keyed(log, id).await? else {
        return Ok(());
    };
    let same = store
        .event_at(log, first)
        .await?
        .is_some_and(|e| e.data == event.data && e.event == event.event);
    if same {
        return Ok(());
    }
    Err(ApiError::conflict(
        "duplicate_id",
        format!("another update was published with id `{}` within idempotency_window; give each update its own id", id.chars().take(200).collect::<String>()),
    ))
}

/// Whether a cookie-authenticated publish comes from an allowed origin: its `Origin`, else the
/// origin of its `Referer`.
fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            let referer = headers.get(header::REFERER)?.to_str().ok()?;
            let (scheme, rest) = referer.split_once("://")?;
            let host = rest.split(['/', '?', '#']).next()?;
            Some(format!("{scheme}://{host}"))
        });
    origin.is_some_and(|o| {
        allowed
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(&o))
    })
}

/// A publish form's fields, validated.
#[derive(Debug, PartialEq, Eq)]
struct PublishForm {
    /// The canonical topic first.
    topics: Vec<String>,
    data: String,
    private: bool,
    id: Option<String>,
    event_type: Option<String>,
    retry: Option<u64>,
}

impl PublishForm {
    /// Reads an `application/x-www-form-urlencoded` body. Of a field other than `topic` given
    /// twice, the first counts (as the reference hub reads it).
    fn parse(body: &[u8], max_topics: usize) -> Result<PublishForm, ApiError> {
        let mut form = PublishForm {
            topics: Vec::new(),
            data: String::new(),
            private: false,
            id: None,
            event_type: None,
            retry: None,
        };
        let (mut data, mut retry) = (None, None);
        for pair in body.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
            let (name, value) = match pair.iter().position(|&b| b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &b""[..]),
            };
            let name = decode(name)?;
            match name.as_str() {
                "topic" => {
                    if form.topics.len() == max_topics {
                        return Err(ApiError::bad_request(
                            "too_many_topics",
                            format!("an update has at most {max_topics} topics (max_topics_per_connection)"),
                        ));
                    }
                    let topic = decode(value)?;
                    check_topic(&topic)?;
                    form.topics.push(topic);
                }
                "data" if data.is_none() => data = Some(decode(value)?),
                "private" => form.private = true,
                "id" if form.id.is_none() => form.id = Some(decode(value)?),
                "type" if form.event_type.is_none() => form.event_type = Some(decode(value)?),
                "retry" if retry.is_none() => retry = Some(decode(value)?),
                _ => {}
            }
        }
        if form.topics.is_empty() {
            return Err(ApiError::bad_request(
                "missing_topic",
                "give the update's topic as a `topic` field (repeat it for alternate topics)",
            ));
        }
        form.data = data.unwrap_or_default();
        form.id = form.id.filter(|id| !id.is_empty());
        if let Some(id) = &form.id {
            if id.contains(['\r', '\n', '\0']) || id.len() > MAX_ID_BYTES || id == EARLIEST {
                return Err(ApiError::bad_request(
                    "invalid_id",
                    format!("an id is at most {MAX_ID_BYTES} bytes without CR, LF or NUL, and not `earliest`"),
                ));
            }
        }
        form.event_type = form.event_type.filter(|t| !t.is_empty());
        if let Some(ty) = &form.event_type {
            validate_event_type(ty).map_err(|e| {
                let code = match e {
                    BadEventType::Malformed => "invalid_event_type",
                    BadEventType::Reserved => "reserved_event_type",
                };
                ApiError::bad_request(code, format!("type: {e}"))
            })?;
        }
        form.retry = match retry.filter(|r| !r.is_empty()) {
            None => None,
            Some(r) => Some(r.parse().map_err(|_| {
                ApiError::bad_request("invalid_retry", "retry is a whole number of milliseconds")
            })?),
        };
        Ok(form)
    }
}

/// Decodes one form name or value: `+` is a space, `%XX` a byte, and the result must be UTF-8.
/// Written here rather than with `form_urlencoded`, which replaces bad bytes and ignores bad
/// escapes: an update's data must reach subscribers as sent, or be refused.
fn decode(raw: &[u8]) -> Result<String, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "invalid_form",
            "the body is not valid application/x-www-form-urlencoded UTF-8 (a bad %-escape or bytes that are not UTF-8)",
        )
    };
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = raw.get(i + 1..i + 3).ok_or_else(bad)?;
                let digit = |b: u8| (b as char).to_digit(16).ok_or_else(bad);
                out.push((digit(hex[0])? * 16 + digit(hex[1])?) as u8);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(body: &str) -> Result<PublishForm, ApiError> {
        PublishForm::parse(body.as_bytes(), 8)
    }

    #[test]
    fn forms_read_every_field() {
        let f = form("topic=https%3A%2F%2Fexample.com%2Fa&topic=urn:b&data=a+b%0Ac&private=on&id=x1&type=note&retry=50").unwrap();
        assert_eq!(f.topics, ["https://example.com/a", "urn:b"]);
        assert_eq!(f.data, "a b\nc");
        assert!(f.private);
        assert_eq!(f.id.as_deref(), Some("x1"));
        assert_eq!(f.event_type.as_deref(), Some("note"));
        assert_eq!(f.retry, Some(50));
        let f = form("topic=t&private&data=first&data=second&id=").unwrap();
        assert!(f.private, "present without a value");
        assert_eq!(f.data, "first");
        assert_eq!(f.id, None, "an empty id is none");
        let f = form("topic=t&topic=t").unwrap();
        assert_eq!(f.topics.len(), 2);
    }

    #[test]
    fn bad_forms_are_refused() {
        for (body, code) in [
            ("data=x", "missing_topic"),
            ("topic=", "invalid_topic"),
            ("topic=t&retry=soon", "invalid_retry"),
            ("topic=t&retry=-1", "invalid_retry"),
            ("topic=t&id=a%0Ab", "invalid_id"),
            ("topic=t&id=a%00b", "invalid_id"),
            ("topic=t&id=earliest", "invalid_id"),
            ("topic=t&type=a%0Db", "invalid_event_type"),
            ("topic=t&type=ssegate.gap", "reserved_event_type"),
            ("topic=t&data=%zz", "invalid_form"),
            ("topic=t&data=%C3", "invalid_form"),
            ("topic=t&data=%", "invalid_form"),
            ("topic=t&data=%+F", "invalid_form"),
            (
                "topic=1&topic=2&topic=3&topic=4&topic=5&topic=6&topic=7&topic=8&topic=9",
                "too_many_topics",
            ),
        ] {
            match form(body) {
                Err(ApiError::BadRequest { code: c, .. }) => assert_eq!(c, code, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        let long = format!("topic={}", "a".repeat(MAX_TOPIC_BYTES + 1));
        assert!(matches!(form(&long), Err(ApiError::TooLarge { .. })));
    }

    #[test]
    fn cookie_publishes_need_a_listed_origin() {
        let allowed = vec!["https://app.example.com".to_owned()];
        let mut h = HeaderMap::new();
        assert!(!origin_allowed(&h, &allowed), "neither Origin nor Referer");
        h.insert(
            header::REFERER,
            HeaderValue::from_static("https://app.example.com/page?x=1"),
        );
        assert!(origin_allowed(&h, &allowed), "the Referer's origin");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!origin_allowed(&h, &allowed), "Origin wins over Referer");
        assert!(origin_allowed(&h, &["*".to_owned()]));
    }

    #[test]
    fn subscriptions_need_selectors_within_bounds() {
        let q = SubscribeQuery::parse(
            Some("topic=*&topic=https%3A%2F%2Fa%2F%7Bid%7D&lastEventID=x"),
            4,
        )
        .unwrap();
        assert_eq!(q.selectors.len(), 2);
        assert_eq!(q.last_event_id.as_deref(), Some("x"));
        for (query, code) in [
            ("lastEventID=x", "missing_topic"),
            ("topic=https%3A%2F%2Fa%2F%7Bid", "invalid_selector"),
            ("topic=a&topic=b&topic=c&topic=d&topic=e", "too_many_topics"),
        ] {
            match SubscribeQuery::parse(Some(query), 4) {
                Err(ApiError::BadRequest { code: c, .. }) => assert_eq!(c, code, "{query}"),
                Err(e) => panic!("{query}: {e:?}"),
                Ok(_) => panic!("{query}: accepted"),
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::proptest_config("hostile_mercure_input_never_panics"))]
        #[test]
        fn hostile_mercure_input_never_panics(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            text in "[a-z=&%+{}0-9A-F]{0,120}",
        ) {
            let _ = PublishForm::parse(&body, 4);
            let _ = PublishForm::parse(text.as_bytes(), 4);
            let _ = SubscribeQuery::parse(Some(&text), 4);
        }
    }
}
