//! Active subscriptions, the protocol's optional part: subscription events and the
//! subscriptions API, across every node, read from the presence registry.
//!
//! Each Mercure stream is filed in the registry under the log's name, with its selectors and the
//! token's `mercure.payload` (see [`crate::presence`]). When entries come and go (opened, closed,
//! or reaped after their node died) the node that wrote or reaped them publishes one private
//! update per selector into the log, as any publisher would:
//!
//! ```json
//! {"@context": "https://mercure.rocks/", "id": "/.well-known/mercure/subscriptions/<topic>/<subscriber>",
//!  "type": "Subscription", "topic": "<selector>", "subscriber": "urn:uuid:…", "active": true, "payload": …}
//! ```
//!
//! whose topic is its `id`. `<topic>` and `<subscriber>` are percent-encoded but for RFC 3986's
//! unreserved characters, as RFC 6570 expands them (see [`escape`]).
//!
//! A subscriber's IRI is a `urn:uuid:` made from its registry entry's id (node and number), so
//! any node can name any subscription without storing more.

use std::sync::Arc;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::warn;

use super::log_topic;
use super::update::Stored;
use crate::event::NewEvent;
use crate::presence::Observer;
use crate::store::Store;

/// Where the subscriptions API lives.
pub const PATH: &str = "/.well-known/mercure/subscriptions";
/// The JSON-LD context of the documents.
pub const CONTEXT: &str = "https://mercure.rocks/";
/// Most subscription updates appended in one store call.
const APPEND_CHUNK: usize = 500;

/// What is left alone: letters, digits and `-_.~` (RFC 3986's unreserved characters), as the
/// reference hub's `url.QueryEscape` does, and as RFC 6570 expands a `{/var}`.
const QUERY_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The registry topic Mercure subscriptions are filed under.
pub fn registry_topic() -> String {
    log_topic().as_str().to_owned()
}

/// A selector or subscriber as it appears in a subscription's id. A space is `%20`, where the
/// reference hub writes `+`: RFC 6570 expands it so, and a subscriber to
/// `/.well-known/mercure/subscriptions{/topic}{/subscriber}` would miss an id with a `+`.
pub fn escape(text: &str) -> String {
    utf8_percent_encode(text, QUERY_ESCAPE).to_string()
}

/// The reverse of [`escape`], reading `+` as a space too (Go's `url.QueryUnescape`, for URLs a
/// client escaped so); `None` if it is not UTF-8.
pub fn unescape(text: &str) -> Option<String> {
    percent_decode_str(&text.replace('+', " "))
        .decode_utf8()
        .ok()
        .map(|t| t.into_owned())
}

/// A subscriber's IRI, from its registry entry's id (`<16 hex digits of node>.<number>`): the
/// node's 64 bits and the number's, as a UUID of version 8 (custom).
pub fn subscriber_iri(entry_id: &str) -> String {
    let parsed = entry_id.split_once('.').and_then(|(node, number)| {
        Some((
            u64::from_str_radix(node, 16).ok()?,
            number.parse::<u64>().ok()?,
        ))
    });
    let Some((node, number)) = parsed else {
        return format!("urn:ssegate:{entry_id}");
    };
    let mut value = (u128::from(node) << 64) | u128::from(number);
    value = (value & !(0xF << 76)) | (0x8 << 76);
    value = (value & !(0b11 << 62)) | (0b10 << 62);
    format!("urn:uuid:{}", uuid::Uuid::from_u128(value).hyphenated())
}

/// A subscription's id, also the topic of its updates.
pub fn subscription_id(selector: &str, subscriber: &str) -> String {
    format!("{PATH}/{}/{}", escape(selector), escape(subscriber))
}

/// A Mercure stream as its registry entry records it.
#[derive(Debug, Deserialize)]
pub struct Active {
    /// The entry's id.
    pub id: String,
    /// The token's `mercure.payload`.
    #[serde(default)]
    pub info: Option<Value>,
    /// The stream's selectors.
    #[serde(default)]
    pub topics: Vec<String>,
}

impl Active {
    /// Reads an entry; `None` for one that is not a Mercure stream's.
    pub fn read(entry: &str) -> Option<Active> {
        serde_json::from_str(entry).ok()
    }

    pub fn subscriber(&self) -> String {
        subscriber_iri(&self.id)
    }

    /// Its subscription to `selector`, as a document (with `@context` when `context`).
    pub fn document(&self, selector: &str, active: bool, context: bool) -> Value {
        let subscriber = self.subscriber();
        let mut doc = json!({
            "id": subscription_id(selector, &subscriber),
            "type": "Subscription",
            "topic": selector,
            "subscriber": subscriber,
            "active": active,
        });
        if context {
            doc["@context"] = json!(CONTEXT);
        }
        if let Some(payload) = &self.info {
            doc["payload"] = payload.clone();
        }
        doc
    }

    /// Its documents, one per selector (only those equal to `selector`, when given).
    pub fn documents(&self, selector: Option<&str>, context: bool) -> Vec<Value> {
        self.topics
            .iter()
            .filter(|t| selector.is_none_or(|s| s == t.as_str()))
            .map(|t| self.document(t, true, context))
            .collect()
    }
}

/// The private updates announcing these opened (`true`) and closed subscriptions, in chunks of
/// one store call each.
pub fn updates(changes: &[(bool, Arc<str>)]) -> Vec<Vec<NewEvent>> {
    let events: Vec<NewEvent> = changes
        .iter()
        .filter_map(|(active, entry)| Some((*active, Active::read(entry)?)))
        .flat_map(|(active, sub)| {
            sub.topics
                .iter()
                .map(|selector| {
                    let doc = sub.document(selector, active, true);
                    let id = doc["id"].as_str().unwrap_or_default().to_owned();
                    Stored {
                        topics: vec![id.into()],
                        private: true,
                        id: None,
                        retry: None,
                        data: doc.to_string().into(),
                    }
                    .into_event(None)
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let mut chunks = Vec::new();
    let mut events = events.into_iter().peekable();
    while events.peek().is_some() {
        chunks.push(events.by_ref().take(APPEND_CHUNK).collect());
    }
    chunks
}

/// The presence observer that publishes subscription updates into the log.
pub fn publisher(store: Arc<dyn Store>) -> Observer {
    Arc::new(move |changes| {
        let store = store.clone();
        Box::pin(async move {
            let log = log_topic();
            for chunk in updates(&changes) {
                if let Err(e) = store.append(&log, chunk).await {
                    warn!(error = %e, "Mercure subscription updates were not published");
                }
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_is_gos_query_escape() {
        let selector = "https://example.com/{selector}";
        assert_eq!(
            escape(selector),
            "https%3A%2F%2Fexample.com%2F%7Bselector%7D"
        );
        assert_eq!(escape("a b~c*+"), "a%20b~c%2A%2B");
        assert_eq!(unescape("a+b").as_deref(), Some("a b"));
        assert_eq!(escape("é"), "%C3%A9");
        for text in [selector, "a b+c", "é/ü", "urn:uuid:1-2"] {
            assert_eq!(unescape(&escape(text)).as_deref(), Some(text));
        }
        assert_eq!(unescape("%FF"), None);
    }

    #[test]
    fn subscriber_iris_are_uuids_made_from_entry_ids() {
        let iri = subscriber_iri("00112233445566ff.7");
        let uuid = iri.strip_prefix("urn:uuid:").expect("a urn:uuid");
        let parsed = uuid::Uuid::parse_str(uuid).expect("a UUID");
        assert_eq!(parsed.get_version_num(), 8);
        assert_ne!(iri, subscriber_iri("00112233445566ff.8"));
        assert_ne!(iri, subscriber_iri("00112233445566fe.7"));
        assert_eq!(subscriber_iri("odd"), "urn:ssegate:odd");
    }

    #[test]
    fn documents_and_updates_follow_the_spec() {
        let entry = r#"{"id":"00112233445566ff.7","sub":"a","info":{"foo":"bar"},"node":"00112233445566ff","connected_at":"x","topics":["https://example.com/{selector}","b"]}"#;
        let sub = Active::read(entry).unwrap();
        let doc = sub.document("https://example.com/{selector}", true, true);
        let subscriber = sub.subscriber();
        assert_eq!(
            doc,
            json!({
                "@context": "https://mercure.rocks/",
                "id": format!("/.well-known/mercure/subscriptions/https%3A%2F%2Fexample.com%2F%7Bselector%7D/{}", escape(&subscriber)),
                "type": "Subscription",
                "topic": "https://example.com/{selector}",
                "subscriber": subscriber,
                "active": true,
                "payload": {"foo": "bar"},
            })
        );
        assert_eq!(sub.documents(Some("b"), false).len(), 1);
        let chunks = updates(&[(false, entry.into())]);
        let [events] = &chunks[..] else {
            panic!("one chunk")
        };
        assert_eq!(events.len(), 2, "one update per selector");
        let stored = Stored::read(&events[1].data).unwrap();
        assert!(stored.private);
        let data: Value = serde_json::from_str(&stored.data).unwrap();
        assert_eq!(data["active"], false);
        assert_eq!(stored.topics[0], data["id"].as_str().unwrap());
        assert_eq!(events[1].labels, [data["id"].as_str().unwrap()]);
    }
}
