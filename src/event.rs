//! Domain types: stream ids, topic names, event types and events.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest accepted topic name, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;
/// Longest accepted event type, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 256;
/// Event types starting with this are the gateway's own (e.g. `ssegate.gap`).
pub const RESERVED_EVENT_PREFIX: &str = "ssegate.";

/// Now, in unix milliseconds: the clock stream ids and the store's expiry times are read in.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A Redis stream entry id, `<ms>-<seq>`. It is also the SSE `id` of the event.
///
/// Ordering is Redis's: by milliseconds, then sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    /// `0-0`: before every entry. As a cursor it asks for everything still retained.
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };

    pub fn new(ms: u64, seq: u64) -> Self {
        StreamId { ms, seq }
    }

    /// The least id above this one.
    pub fn next(&self) -> StreamId {
        match self.seq.checked_add(1) {
            Some(seq) => StreamId::new(self.ms, seq),
            None => StreamId::new(self.ms + 1, 0),
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == Self::ZERO
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// As its text (`<ms>-<seq>`), written straight into the output.
impl serde::Serialize for StreamId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Why a string is not a stream id.
#[derive(Debug, thiserror::Error)]
#[error("a stream id is `0` or `<ms>-<seq>` with both parts decimal integers")]
pub struct BadStreamId;

impl StreamId {
    /// Reads `0` or `<ms>-<seq>` from ASCII bytes; nothing else (no signs, spaces or missing
    /// parts). One pass: every publish reads its ids back from Redis, and every announcement
    /// carries some.
    pub fn parse_ascii(text: &[u8]) -> Result<StreamId, BadStreamId> {
        fn decimal(digits: &[u8]) -> Option<u64> {
            if digits.is_empty() {
                return None;
            }
            digits.iter().try_fold(0u64, |n, &b| {
                let digit = b.wrapping_sub(b'0');
                (digit < 10).then_some(())?;
                n.checked_mul(10)?.checked_add(u64::from(digit))
            })
        }
        if text == b"0" {
            return Ok(StreamId::ZERO);
        }
        let dash = text.iter().position(|&b| b == b'-').ok_or(BadStreamId)?;
        match (decimal(&text[..dash]), decimal(&text[dash + 1..])) {
            (Some(ms), Some(seq)) => Ok(StreamId { ms, seq }),
            _ => Err(BadStreamId),
        }
    }
}

impl FromStr for StreamId {
    type Err = BadStreamId;

    /// See [`StreamId::parse_ascii`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StreamId::parse_ascii(s.as_bytes())
    }
}

/// A validated topic name: 1–256 bytes of printable ASCII, no whitespace, no `{` or `}` (they
/// would break the Redis Cluster hash tag in the key names).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(String);

/// Why a string is not a topic name.
#[derive(Debug, thiserror::Error)]
#[error("a topic is 1-256 bytes of printable ASCII without whitespace, `{{` or `}}`")]
pub struct BadTopic;

impl Topic {
    pub fn parse(s: &str) -> Result<Self, BadTopic> {
        let ok = !s.is_empty()
            && s.len() <= MAX_TOPIC_LEN
            && s.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}');
        if ok {
            Ok(Topic(s.to_owned()))
        } else {
            Err(BadTopic)
        }
    }

    /// A topic of the gateway's own, such as a protocol adapter's stream: its name has a space,
    /// which no client-given topic can have, so no client can read or write it through `/v1`.
    pub fn internal(name: &str) -> Topic {
        debug_assert!(name.contains(' ') && !name.contains(['{', '}']));
        Topic(name.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an event type is refused.
#[derive(Debug, thiserror::Error)]
pub enum BadEventType {
    #[error("the event type must be 1-256 bytes without CR, LF or NUL")]
    Malformed,
    #[error("event types starting with `ssegate.` are reserved for the gateway")]
    Reserved,
}

/// Groups names into runs numbered in order of first appearance: per name, its run; and how
/// many runs. A publish groups its events by topic with it, and the committer a call's requests.
pub fn runs_by_name<'a>(names: impl IntoIterator<Item = &'a str>) -> (Vec<usize>, usize) {
    let names = names.into_iter();
    let mut run_of_name = Vec::with_capacity(names.size_hint().0);
    // foldhash: seeded per process like std's, and several times faster on short names.
    let mut run_of: foldhash::HashMap<&str, usize> = foldhash::HashMap::default();
    let mut last: Option<(&str, usize)> = None;
    for name in names {
        // Consecutive names alike (a batch on a hot topic) need no lookup.
        let run = match last {
            Some((previous, run)) if previous == name => run,
            _ => {
                let count = run_of.len();
                *run_of.entry(name).or_insert(count)
            }
        };
        last = Some((name, run));
        run_of_name.push(run);
    }
    (run_of_name, run_of.len())
}

/// Checks an event type given by a publisher. `message` is the SSE default and is accepted.
pub fn validate_event_type(s: &str) -> Result<(), BadEventType> {
    if !is_frameable_event_type(s) {
        return Err(BadEventType::Malformed);
    }
    if s.starts_with(RESERVED_EVENT_PREFIX) {
        return Err(BadEventType::Reserved);
    }
    Ok(())
}

/// Whether a type can be written on an SSE `event:` line without breaking the framing.
pub fn is_frameable_event_type(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_EVENT_TYPE_LEN && !s.contains(['\r', '\n', '\0'])
}

/// An event to append, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// SSE event type; `None` is the default `message`.
    pub event: Option<String>,
    /// The payload, sent as `data:` lines.
    pub data: String,
    /// A publisher's key: the same key within the idempotency window yields the same id and
    /// appends nothing.
    pub idempotency_key: Option<String>,
    /// Labels the event is also filed under, in its topic: a reader asking for some labels
    /// ([`Store::read_labelled`](crate::store::Store::read_labelled)) finds their events without
    /// reading the rest of the stream. A protocol that keeps many topics in one stream (Mercure's
    /// log) labels each event with its topics.
    pub labels: Vec<String>,
}

/// An event as stored: what a subscriber receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: StreamId,
    /// SSE event type; `None` is the default `message`.
    pub event: Option<String>,
    pub data: String,
}

#[cfg(test)]
mod tests {

    #[test]
    fn names_are_grouped_into_runs_by_first_appearance() {
        let (runs, count) = runs_by_name(["b", "b", "a", "b", "c", "a"]);
        assert_eq!(runs, vec![0, 0, 1, 0, 2, 1]);
        assert_eq!(count, 3);
        assert_eq!(runs_by_name([]), (vec![], 0));
    }

    use super::*;

    #[test]
    fn stream_ids_parse_strictly_and_order_like_redis() {
        assert_eq!("0".parse::<StreamId>().unwrap(), StreamId::ZERO);
        assert_eq!("5-3".parse::<StreamId>().unwrap(), StreamId::new(5, 3));
        let max = "18446744073709551615-18446744073709551615";
        assert_eq!(
            max.parse::<StreamId>().unwrap(),
            StreamId::new(u64::MAX, u64::MAX)
        );
        for bad in [
            "",
            "-",
            "5",
            "5-",
            "-3",
            "a-1",
            "1-b",
            "+1-2",
            "1 -2",
            "1-2-3",
            "99999999999999999999-0",
            "18446744073709551616-0",
            "0-18446744073709551616",
        ] {
            assert!(bad.parse::<StreamId>().is_err(), "{bad:?} parsed");
        }
        assert!(StreamId::new(1, 9) < StreamId::new(2, 0));
        assert!(StreamId::new(2, 1) > StreamId::new(2, 0));
        assert_eq!(StreamId::new(17, 4).to_string(), "17-4");
    }

    #[test]
    fn topics_refuse_whitespace_braces_and_length() {
        assert!(Topic::parse("news.eu-1:x").is_ok());
        assert!(Topic::parse(&"a".repeat(256)).is_ok());
        for bad in ["", "a b", "a{b", "a}b", "tab\t", "é", &"a".repeat(257)] {
            assert!(Topic::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn event_types_refuse_newlines_and_reserved_prefix() {
        assert!(validate_event_type("update").is_ok());
        assert!(validate_event_type("message").is_ok());
        assert!(matches!(
            validate_event_type("a\nb"),
            Err(BadEventType::Malformed)
        ));
        assert!(matches!(
            validate_event_type("a\rb"),
            Err(BadEventType::Malformed)
        ));
        assert!(matches!(
            validate_event_type(""),
            Err(BadEventType::Malformed)
        ));
        assert!(matches!(
            validate_event_type("ssegate.gap"),
            Err(BadEventType::Reserved)
        ));
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::proptest_config("hostile_ids_and_topics_never_panic"))]
        #[test]
        fn hostile_ids_and_topics_never_panic(s in "\\PC{0,40}", t in "[\\x00-\\x7f]{0,300}") {
            let _ = s.parse::<StreamId>();
            let _ = Topic::parse(&s);
            let _ = Topic::parse(&t);
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::proptest_config("ids_round_trip"))]
        #[test]
        fn ids_round_trip(ms in proptest::num::u64::ANY, seq in proptest::num::u64::ANY) {
            let id = StreamId::new(ms, seq);
            proptest::prop_assert_eq!(id.to_string().parse::<StreamId>().unwrap(), id);
        }
    }
}
