//! The Mercure protocol (0.x: the Internet-Draft as of dunglas/mercure v0.24.2), as an adapter
//! over the same hub and store as `/v1`.
//!
//! Mercure subscribers select topics with `*` and URI templates, so no node can list in advance
//! the topics a subscription reads; and a client resumes from one id, its last update's, across
//! every topic it selects. Both need one order over all updates, so the hub keeps them in one
//! log: an internal topic ([`log_topic`], a stream like any other) that every node's hub follows
//! like a topic with clients. Cluster-wide fan-out, exact resume on any node, gap notices,
//! retention and the chaos guarantees are the log's, as they are any topic's. Each subscription
//! reads the log and keeps what its selectors (and, for private updates, its token) match.
//!
//! The store and the hub learn nothing of Mercure: an update is an entry whose data is a small
//! JSON object ([`update`]); a publisher's id is the entry's idempotency key, which is how a
//! resuming client's id is found again ([`resolve`]).
//!
//! # Layout
//!
//! - this module: the log, resuming from an id, and what a subscriber receives;
//! - `router`: reads the log once per node and hands each update to the subscriptions it
//!   concerns, through an index of their selectors;
//! - `selector`: topic selectors (`*`, exact, URI templates) and their matching;
//! - `update`: the log's entries and the ids subscribers see.
//!
//! The HTTP side (form publishing, the event stream, authorization) is `http::mercure`.

pub mod router;
pub mod selector;
pub mod subscriptions;
pub mod update;

use bytes::{Bytes, BytesMut};

use self::selector::{any_match, Selector};
use self::update::Stored;
use crate::event::{Event, StreamId, Topic};
use crate::sse;
use crate::store::{GapReason, Store, StoreError};

/// Where the hub is served.
pub const PATH: &str = "/.well-known/mercure";
/// The `Last-Event-ID` that asks for everything retained.
pub const EARLIEST: &str = "earliest";
/// The log's topic name: it has a space, so no `/v1` client can name it.
const LOG_TOPIC: &str = "mercure updates";

/// Whether a request path is the hub's (its subscriptions API included).
pub fn is_hub_path(path: &str) -> bool {
    path.strip_prefix(PATH)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The internal topic holding every update, in the order subscribers receive them.
pub fn log_topic() -> Topic {
    Topic::internal(LOG_TOPIC)
}

/// Where a subscription that gave a `Last-Event-ID` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// `earliest`: everything retained.
    Earliest,
    /// Right after this entry of the log.
    After(StreamId),
    /// The id is not one the hub can find (never published, or its publisher's id was forgotten
    /// with the idempotency window): everything retained, after a gap notice.
    Unknown,
}

/// Finds where `id` stands in the log: a publisher's id through its idempotency key, a
/// generated one by reading it back. One store lookup, whatever the log's length.
pub async fn resolve(store: &dyn Store, id: &str) -> Result<Resume, StoreError> {
    if id == EARLIEST {
        return Ok(Resume::Earliest);
    }
    if let Some(found) = store.keyed(&log_topic(), id).await? {
        return Ok(Resume::After(found));
    }
    Ok(update::stream_id_of(id).map_or(Resume::Unknown, Resume::After))
}

/// What one subscription receives: updates with a topic its selectors match; private ones only
/// when a topic also matches a selector of its token's `mercure.subscribe`.
pub struct Subscriber {
    selectors: Vec<Selector>,
    /// `None`: no private updates (no token, or none is configured).
    private: Option<Vec<Selector>>,
}

impl Subscriber {
    pub fn new(selectors: Vec<Selector>, private: Option<Vec<Selector>>) -> Subscriber {
        Subscriber { selectors, private }
    }

    pub fn wants(&self, update: &Stored) -> bool {
        any_match(&self.selectors, update.topics())
            && (!update.private
                || self
                    .private
                    .as_ref()
                    .is_some_and(|allowed| any_match(allowed, update.topics())))
    }

    /// Appends the update's frame to `out` if the subscriber receives it. Entries that are not
    /// updates (a program's direct `XADD` into the log) are passed over.
    pub fn write(&self, event: &Event, out: &mut BytesMut) -> bool {
        let Some(update) = Stored::read(&event.data) else {
            tracing::debug!(id = %event.id, "an entry of the Mercure log is not an update; skipped");
            return false;
        };
        if !self.wants(&update) {
            return false;
        }
        write_update(out, event, &update);
        true
    }
}

/// Appends an update's frame: `event:`, `retry:`, `id:`, `data:` lines, as the reference hub
/// writes them. The same for every subscriber.
fn write_update(out: &mut BytesMut, event: &Event, update: &Stored) {
    let id = update.wire_id(event.id);
    sse::write_frame(
        out,
        Some(&id),
        event.event.as_deref(),
        update.retry,
        &update.data,
    );
}

/// The gap notice of a Mercure stream: `ssegate.gap` without an `id:` (a browser keeps its last
/// id), with JSON naming the id that could not be honoured, why, and the id delivery resumes
/// from in the log (`null`: with the next new update). An `EventSource` ignores it unless the
/// page listens for `ssegate.gap`.
pub fn gap_frame(cursor: &str, reason: GapReason, resume_from: Option<&Event>) -> Bytes {
    let resume_from = resume_from.map(|e| {
        Stored::read(&e.data)
            .map(|u| u.wire_id(e.id).into_owned())
            .unwrap_or_else(|| update::generated_id(e.id))
    });
    let notice = serde_json::json!({
        "cursor": cursor,
        "reason": reason.as_str(),
        "resume_from": resume_from,
    });
    sse::frame(None, Some(sse::GAP_EVENT), &notice.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hub_path_and_below() {
        assert!(is_hub_path("/.well-known/mercure"));
        assert!(is_hub_path("/.well-known/mercure/subscriptions"));
        assert!(!is_hub_path("/.well-known/mercurex"));
        assert!(!is_hub_path("/v1/events"));
    }

    fn stored(topics: &[&str], private: bool) -> Event {
        let new = Stored {
            topics: topics.iter().map(|t| (*t).into()).collect(),
            private,
            id: None,
            retry: None,
            data: "x".into(),
        }
        .into_event(None);
        Event {
            id: StreamId::new(1, 0),
            event: None,
            data: new.data,
        }
    }

    #[test]
    fn private_updates_need_a_token_selector_matching_any_topic() {
        let books = || vec![Selector::parse("https://example.com/books/{id}").unwrap()];
        let alternate =
            "https://example.com/users/foo/?topic=https%3A%2F%2Fexample.com%2Fbooks%2F1";
        let update = stored(&["https://example.com/books/1", alternate], true);
        let mut out = BytesMut::new();

        let anonymous = Subscriber::new(books(), None);
        assert!(!anonymous.write(&update, &mut out), "private, no token");
        let other_user = Subscriber::new(
            books(),
            Some(vec![Selector::lenient(
                "https://example.com/users/bar/{?topic}",
            )]),
        );
        assert!(!other_user.write(&update, &mut out));
        let foo = Subscriber::new(
            books(),
            Some(vec![Selector::lenient(
                "https://example.com/users/foo/{?topic}",
            )]),
        );
        assert!(
            foo.write(&update, &mut out),
            "matched through the alternate"
        );
        assert!(out.starts_with(b"id: urn:uuid:"));

        let public = stored(&["https://example.com/books/2"], false);
        assert!(anonymous.write(&public, &mut out));
        let elsewhere = stored(&["https://example.com/authors/2"], false);
        assert!(!foo.write(&elsewhere, &mut out), "no selector matches");
        let direct = Event {
            id: StreamId::new(2, 0),
            event: None,
            data: "plain".into(),
        };
        assert!(!foo.write(&direct, &mut out));
    }
}
