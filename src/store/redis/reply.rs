//! Reading Redis replies: script results, stream entries and errors, turned into store types.

use redis::{ErrorKind, RedisError, ServerErrorKind, Value};

use crate::event::{Event, StreamId};
use crate::store::{StoreError, StreamFacts, TopicStat};

pub(super) fn unavailable(e: RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Whether retrying later may work (`Unavailable`): lost connections, timeouts, and a cluster in
/// transition (a failover's election, a slot in migration, a demoted master, a loading replica).
pub(super) fn classify_error(e: RedisError) -> StoreError {
    let transient = matches!(
        e.kind(),
        ErrorKind::ClusterConnectionNotFound
            | ErrorKind::Server(
                ServerErrorKind::ClusterDown
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
                    | ServerErrorKind::BusyLoading
                    | ServerErrorKind::Moved
                    | ServerErrorKind::Ask
            )
    );
    if transient
        || e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
    {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Internal(e.to_string())
    }
}

pub(super) fn bad_reply(what: &str) -> StoreError {
    StoreError::Internal(format!("unexpected reply from redis ({what})"))
}

pub(super) fn as_array(v: &Value) -> Result<&[Value], StoreError> {
    match v {
        Value::Array(items) | Value::Set(items) => Ok(items),
        other => Err(bad_reply(&format!("expected an array, got {other:?}"))),
    }
}

pub(super) fn as_bytes(v: &Value) -> Result<&[u8], StoreError> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.as_bytes()),
        Value::VerbatimString { text, .. } => Ok(text.as_bytes()),
        _ => Err(bad_reply("expected a string")),
    }
}

pub(super) fn as_text(v: Option<&Value>) -> Result<String, StoreError> {
    match v.ok_or_else(|| bad_reply("missing field"))? {
        Value::Int(n) => Ok(n.to_string()),
        other => Ok(String::from_utf8_lossy(as_bytes(other)?).into_owned()),
    }
}

pub(super) fn parse_id(v: &Value) -> Result<StreamId, StoreError> {
    let parsed = match v {
        Value::Int(_) => as_text(Some(v))?.parse().ok(),
        // Read in place: every publish parses its ids here.
        other => StreamId::parse_ascii(as_bytes(other)?).ok(),
    };
    parsed.ok_or_else(|| bad_reply("stream id"))
}

/// Parses the stream facts returned by `read.lua`: last generated id, max deleted id, entries
/// added, length, first retained id (all '' when the stream does not exist).
pub(super) fn parse_facts(fields: Option<&[Value]>) -> Result<Option<StreamFacts>, StoreError> {
    let fields = fields.ok_or_else(|| bad_reply("stream facts"))?;
    let text = |i: usize| as_text(fields.get(i));
    let last_generated = text(0)?;
    if last_generated.is_empty() {
        return Ok(None);
    }
    let id = |s: String, what| s.parse::<StreamId>().map_err(|_| bad_reply(what));
    let number = |s: String, what| s.parse::<u64>().map_err(|_| bad_reply(what));
    let added = number(text(2)?, "entries-added")?;
    let length = number(text(3)?, "length")?;
    Ok(Some(StreamFacts {
        first_retained: if length > 0 {
            Some(id(text(4)?, "recorded-first-entry-id")?)
        } else {
            None
        },
        last_generated: id(last_generated, "last-generated-id")?,
        max_deleted: id(text(1)?, "max-deleted-entry-id")?,
        removed_any: added > length,
    }))
}

/// Parses XRANGE output: `[[id, [field, value, ...]], ...]`. The payload is the `data` field and
/// the type the `event` field, as direct publishers are told to write them.
pub(super) fn parse_entries(v: Option<&Value>) -> Result<Vec<Event>, StoreError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    as_array(v)?
        .iter()
        .map(|entry| {
            let parts = as_array(entry)?;
            let id = parse_id(parts.first().ok_or_else(|| bad_reply("entry id"))?)?;
            let mut event = Event {
                id,
                event: None,
                data: String::new(),
            };
            if let Some(fields) = parts.get(1) {
                for pair in as_array(fields)?.chunks(2) {
                    let [name, value] = pair else { continue };
                    let value = String::from_utf8_lossy(as_bytes(value)?).into_owned();
                    match as_bytes(name)? {
                        b"data" => event.data = value,
                        b"event" if !value.is_empty() => event.event = Some(value),
                        _ => {}
                    }
                }
            }
            Ok(event)
        })
        .collect()
}

/// Parses `stat.lua`'s answer.
pub(super) fn parse_stat(v: &Value) -> Result<TopicStat, StoreError> {
    let parts = as_array(v)?;
    let flag = |i: usize| matches!(parts.get(i), Some(Value::Int(1)));
    let id = |i: usize| -> Result<Option<StreamId>, StoreError> {
        let text = as_text(parts.get(i))?;
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| bad_reply("stream id"))
    };
    let length = match parts.get(1) {
        Some(Value::Int(n)) => u64::try_from(*n).map_err(|_| bad_reply("length"))?,
        _ => return Err(bad_reply("length")),
    };
    Ok(TopicStat {
        exists: flag(0),
        length,
        first: id(2)?,
        last: id(3)?,
        last_generated: id(4)?.unwrap_or(StreamId::ZERO),
        removed_any: flag(5),
    })
}
