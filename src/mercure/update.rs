//! Updates as the hub's log stores them, and the ids subscribers see.
//!
//! An update is one entry of the log: its SSE type is the entry's event type, and the rest is a
//! small JSON object in the entry's data:
//!
//! ```json
//! {"t": ["https://example.com/books/1", "<alternate>"], "p": true, "i": "<publisher's id>", "r": 5000, "d": "<data>"}
//! ```
//!
//! `p`, `i` and `r` are left out when unset. An update without a publisher's id is sent with an
//! id made from its stream id ([`generated_id`]), so no index is needed to resume from it: any
//! node turns the id back into the stream id.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::event::{NewEvent, StreamId};

/// An update as the log stores it, borrowed from the entry's data where it can be.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stored<'a> {
    /// The canonical topic, then the alternates.
    #[serde(borrow, rename = "t")]
    pub topics: Vec<Cow<'a, str>>,
    /// Only subscribers whose token covers a topic receive it.
    #[serde(rename = "p", default, skip_serializing_if = "std::ops::Not::not")]
    pub private: bool,
    /// The publisher's id, sent as the SSE `id`.
    #[serde(borrow, rename = "i", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Cow<'a, str>>,
    /// The SSE `retry` sent with the update.
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<u64>,
    #[serde(borrow, rename = "d")]
    pub data: Cow<'a, str>,
}

impl<'a> Stored<'a> {
    /// Reads an entry's data; `None` for anything else (say, a program's direct `XADD`).
    pub fn read(data: &'a str) -> Option<Stored<'a>> {
        serde_json::from_str(data)
            .ok()
            .filter(|s: &Stored| !s.topics.is_empty())
    }

    /// The entry to append: the publisher's id is its idempotency key, so it can be found again
    /// and a repeated id is not stored twice.
    pub fn into_event(self, event_type: Option<String>) -> NewEvent {
        let key = self.id.as_deref().map(str::to_owned);
        let labels = self.topics.iter().map(|t| t.to_string()).collect();
        NewEvent {
            event: event_type,
            data: serde_json::to_string(&self).unwrap_or_default(),
            idempotency_key: key,
            labels,
        }
    }

    pub fn topics(&self) -> impl Iterator<Item = &str> + Clone {
        self.topics.iter().map(|t| t.as_ref())
    }

    /// The id subscribers see: the publisher's, else one made from the stream id.
    pub fn wire_id(&self, stream_id: StreamId) -> Cow<'_, str> {
        match &self.id {
            Some(id) => Cow::Borrowed(id.as_ref()),
            None => Cow::Owned(generated_id(stream_id)),
        }
    }
}

/// What a generated id starts with.
const URN_UUID: &str = "urn:uuid:";
/// Bits of a UUIDv7's millisecond timestamp.
const MS_BITS: u32 = 48;

/// The id of an update its publisher gave none: `urn:uuid:<UUIDv7>`, whose timestamp is the
/// stream id's milliseconds and whose counter bits (12 + 62, RFC 9562's method 1) hold its
/// sequence, so ids order as the log does and [`stream_id_of`] reads the stream id back. A
/// stream id past the UUID's 48-bit timestamp (only a direct `XADD` with an explicit id can make
/// one) becomes `#<ms>-<seq>`, a relative IRI as the protocol allows.
pub fn generated_id(id: StreamId) -> String {
    if id.ms >> MS_BITS != 0 {
        return format!("#{id}");
    }
    let value = (u128::from(id.ms) << 80)
        | (0x7 << 76)
        | (u128::from(id.seq >> 62) << 64)
        | (0b10 << 62)
        | u128::from(id.seq & ((1 << 62) - 1));
    format!("{URN_UUID}{}", uuid::Uuid::from_u128(value).hyphenated())
}

/// The stream id a [`generated_id`] was made from; `None` for any other string (a UUIDv7 made
/// elsewhere mostly reads as one whose stream id never existed, which the gap rule tells).
pub fn stream_id_of(id: &str) -> Option<StreamId> {
    if let Some(plain) = id.strip_prefix('#') {
        return plain
            .parse()
            .ok()
            .filter(|s: &StreamId| s.ms >> MS_BITS != 0);
    }
    let uuid = uuid::Uuid::try_parse(id.strip_prefix(URN_UUID)?).ok()?;
    let value = uuid.as_u128();
    let version = (value >> 76) & 0xf;
    let variant = (value >> 62) & 0b11;
    let high = (value >> 64) & 0xfff;
    if version != 7 || variant != 0b10 || high > 0b11 {
        return None;
    }
    let ms = (value >> 80) as u64;
    let seq = ((high as u64) << 62) | (value as u64 & ((1 << 62) - 1));
    Some(StreamId::new(ms, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_uuid_v7_and_read_back() {
        let id = StreamId::new(1_764_000_000_123, 4);
        let text = generated_id(id);
        assert!(text.starts_with("urn:uuid:"), "{text}");
        let uuid = uuid::Uuid::parse_str(&text["urn:uuid:".len()..]).unwrap();
        assert_eq!(uuid.get_version_num(), 7);
        assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(stream_id_of(&text), Some(id));
        // Order follows the stream's.
        let later = generated_id(StreamId::new(1_764_000_000_123, 5));
        assert!(later > text);
        for extreme in [
            StreamId::new(0, 0),
            StreamId::new((1 << 48) - 1, u64::MAX),
            StreamId::new(1 << 48, 0),
            StreamId::new(u64::MAX, 7),
        ] {
            assert_eq!(
                stream_id_of(&generated_id(extreme)),
                Some(extreme),
                "{extreme}"
            );
        }
        assert_eq!(
            stream_id_of("urn:uuid:0192f1e4-8a7b-7cde-8f00-123456789abc"),
            None
        );
        assert_eq!(stream_id_of("#5-0"), None, "small ids are always UUIDs");
        assert_eq!(stream_id_of("my-id"), None);
        assert_eq!(stream_id_of("urn:uuid:not-a-uuid"), None);
    }

    #[test]
    fn stored_updates_round_trip() {
        let stored = Stored {
            topics: vec!["https://example.com/a\"b".into(), "urn:alt".into()],
            private: true,
            id: Some("id-1".into()),
            retry: Some(5),
            data: "line 1\nline 2".into(),
        };
        let event = Stored {
            topics: stored.topics.clone(),
            private: stored.private,
            id: stored.id.clone(),
            retry: stored.retry,
            data: stored.data.clone(),
        }
        .into_event(Some("note".into()));
        assert_eq!(event.idempotency_key.as_deref(), Some("id-1"));
        assert_eq!(event.event.as_deref(), Some("note"));
        assert_eq!(Stored::read(&event.data), Some(stored));
        let public = Stored {
            topics: vec!["t".into()],
            private: false,
            id: None,
            retry: None,
            data: "".into(),
        }
        .into_event(None);
        assert_eq!(public.data, r#"{"t":["t"],"d":""}"#);
        assert!(Stored::read("not json").is_none());
        assert!(Stored::read(r#"{"t":[],"d":""}"#).is_none());
    }
}
