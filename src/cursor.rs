//! The composite cursor of a multi-topic stream: one SSE `id` that says, for every topic of the
//! stream, the id of the last event the client received (or where it started).
//!
//! A browser sends the newest `id` back as `Last-Event-ID` on every reconnect, so this one value
//! must let any node resume every topic exactly. It is `m` followed by base64url (no padding) of:
//!
//! - a 16-bit hash of the stream's topics (sorted), so a cursor cannot silently be applied to
//!   another set of topics;
//! - the largest millisecond part among the positions, as a varint;
//! - per topic, in sorted order: that largest value minus the topic's millisecond part, then its
//!   sequence number, both varints.
//!
//! Positions of one stream are usually close in time, so a topic typically takes 3 to 6 bytes:
//! 64 topics fit in about 300 to 520 characters. The hard bound is 27 characters a topic.
//!
//! The varints and the hash are written here rather than taken from crates: both are a few lines,
//! and the format must stay byte-for-byte stable across versions and nodes.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::event::{StreamId, Topic};

/// First character of a composite cursor (a stream id never starts with it).
const MARK: char = 'm';

/// Why a composite cursor cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadCursor {
    #[error("the cursor is not a composite cursor of this gateway")]
    Malformed,
    #[error("the cursor belongs to another set of topics")]
    OtherTopics,
}

/// Whether `s` looks like a composite cursor (rather than a stream id).
pub fn is_composite(s: &str) -> bool {
    s.starts_with(MARK)
}

/// The cursor for `positions`, one per topic of `topics` (sorted, as the stream holds them).
pub fn encode(topics: &[Topic], positions: &[StreamId]) -> String {
    debug_assert_eq!(topics.len(), positions.len());
    let newest = positions.iter().map(|p| p.ms).max().unwrap_or(0);
    let mut bytes = Vec::with_capacity(8 + positions.len() * 6);
    bytes.extend_from_slice(&topics_hash(topics).to_be_bytes());
    put_varint(&mut bytes, newest);
    for p in positions {
        put_varint(&mut bytes, newest - p.ms);
        put_varint(&mut bytes, p.seq);
    }
    let mut out = String::with_capacity(1 + bytes.len() * 4 / 3 + 4);
    out.push(MARK);
    URL_SAFE_NO_PAD.encode_string(&bytes, &mut out);
    out
}

/// The positions in `cursor`, one per topic of `topics` (sorted).
pub fn decode(cursor: &str, topics: &[Topic]) -> Result<Vec<StreamId>, BadCursor> {
    let body = cursor.strip_prefix(MARK).ok_or(BadCursor::Malformed)?;
    let bytes = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| BadCursor::Malformed)?;
    let (hash, mut rest) = bytes.split_at_checked(2).ok_or(BadCursor::Malformed)?;
    if u16::from_be_bytes([hash[0], hash[1]]) != topics_hash(topics) {
        return Err(BadCursor::OtherTopics);
    }
    let newest = take_varint(&mut rest)?;
    let mut positions = Vec::with_capacity(topics.len());
    for _ in topics {
        let back = take_varint(&mut rest)?;
        let seq = take_varint(&mut rest)?;
        let ms = newest.checked_sub(back).ok_or(BadCursor::Malformed)?;
        positions.push(StreamId::new(ms, seq));
    }
    if !rest.is_empty() {
        return Err(BadCursor::Malformed);
    }
    Ok(positions)
}

/// FNV-1a over the topics, each followed by a newline, folded to 16 bits.
fn topics_hash(topics: &[Topic]) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for t in topics {
        for &b in t.as_str().as_bytes().iter().chain(b"\n") {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    (h ^ (h >> 16)) as u16
}

/// LEB128: seven bits a byte, low first, the high bit set on all but the last.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn take_varint(input: &mut &[u8]) -> Result<u64, BadCursor> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = input.split_first().ok_or(BadCursor::Malformed)?;
        *input = rest;
        let part = u64::from(b & 0x7f);
        if shift == 63 && part > 1 {
            return Err(BadCursor::Malformed); // more than 64 bits
        }
        v |= part << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(BadCursor::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(n: usize) -> Vec<Topic> {
        let mut t: Vec<Topic> = (0..n)
            .map(|i| Topic::parse(&format!("user.{i}.feed")).unwrap())
            .collect();
        t.sort();
        t
    }

    #[test]
    fn round_trips_and_stays_compact() {
        let t = topics(64);
        let now = 1_795_000_000_000u64;
        // Positions spread over a day, a few with sequence numbers, a few at `0`.
        let positions: Vec<StreamId> = (0..64u64)
            .map(|i| match i % 8 {
                0 => StreamId::ZERO,
                1 => StreamId::new(now - i * 1_350_000, 3),
                _ => StreamId::new(now - i * 1_350_000, 0),
            })
            .collect();
        let c = encode(&t, &positions);
        assert!(is_composite(&c));
        assert_eq!(decode(&c, &t).unwrap(), positions);
        assert!(c.len() <= 560, "{} characters", c.len());
        let recent: Vec<StreamId> = (0..64).map(|i| StreamId::new(now - i * 40, 0)).collect();
        let c = encode(&t, &recent);
        assert!(c.len() <= 300, "{} characters", c.len());
    }

    #[test]
    fn refuses_other_topics_and_garbage() {
        let t = topics(3);
        let c = encode(&t, &[StreamId::new(5, 0); 3]);
        assert_eq!(decode(&c, &topics(4)), Err(BadCursor::OtherTopics));
        let mut other = t.clone();
        other[0] = Topic::parse("elsewhere").unwrap();
        other.sort();
        assert_eq!(decode(&c, &other), Err(BadCursor::OtherTopics));
        for bad in ["", "m", "m!!", "5-1", "mAAAA", &format!("{c}AA")] {
            assert!(decode(bad, &t).is_err(), "{bad:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::proptest_config("composite_cursors_round_trip"))]
        #[test]
        fn composite_cursors_round_trip(
            ids in proptest::collection::vec((proptest::num::u64::ANY, proptest::num::u64::ANY), 1..70),
        ) {
            let t = topics(ids.len());
            let positions: Vec<StreamId> = ids.iter().map(|&(ms, seq)| StreamId::new(ms, seq)).collect();
            let c = encode(&t, &positions);
            proptest::prop_assert!(c.len() <= 1 + (2 + 10 + positions.len() * 20).div_ceil(3) * 4);
            proptest::prop_assert_eq!(decode(&c, &t).unwrap(), positions);
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::proptest_config("hostile_composite_cursors_never_panic"))]
        #[test]
        fn hostile_composite_cursors_never_panic(s in "m[A-Za-z0-9_-]{0,120}|\\PC{0,60}", n in 1usize..8) {
            let _ = decode(&s, &topics(n));
        }
    }
}
