//! SSE frame encoding.
//!
//! Frames are written by hand rather than through `axum::response::sse::Event`, which panics on
//! line breaks in `event`/`id` and turns `\r\n` in data into two line breaks. Every line break in a
//! payload (`\r\n`, `\r` or `\n`) becomes one `data:` line boundary, so a parser following the SSE
//! spec reads the payload back with its line breaks as `\n` (SSE cannot carry a bare `\r`).

use bytes::{BufMut, Bytes, BytesMut};

use crate::event::{is_frameable_event_type, Event};

/// Event type of the gap notice.
pub const GAP_EVENT: &str = "ssegate.gap";

/// Encodes one event: `id:`, `event:` (omitted for the default `message`), `data:` lines.
pub fn event_frame(event: &Event) -> Bytes {
    frame(
        Some(&event.id.to_string()),
        event.event.as_deref(),
        &event.data,
    )
}

/// Encodes a frame; `id` is omitted when `None` (so a browser keeps its last event id). The
/// caller makes sure `id` has no line break (stream ids and composite cursors have none).
pub fn frame(id: Option<&str>, event: Option<&str>, data: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + id.map_or(0, str::len) + 64);
    write_frame(&mut out, id, event, None, data);
    out.freeze()
}

/// Appends a frame to `out`, with a `retry:` line when given (an event's own reconnection
/// time, as Mercure publishers may set). `id` as for [`frame`]; one with a CR, LF or NUL is
/// left out rather than break the framing.
pub fn write_frame(
    out: &mut BytesMut,
    id: Option<&str>,
    event: Option<&str>,
    retry: Option<u64>,
    data: &str,
) {
    out.reserve(data.len() + id.map_or(0, str::len) + 64);
    if let Some(id) = id.filter(|id| !id.contains(['\r', '\n', '\0'])) {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_u8(b'\n');
    }
    // A type that cannot be framed (possible only from a direct XADD) falls back to `message`
    // rather than corrupting the stream.
    if let Some(ty) = event.filter(|t| *t != "message" && is_frameable_event_type(t)) {
        out.put_slice(b"event: ");
        out.put_slice(ty.as_bytes());
        out.put_u8(b'\n');
    }
    if let Some(retry) = retry {
        out.put_slice(b"retry: ");
        out.put_slice(retry.to_string().as_bytes());
        out.put_u8(b'\n');
    }
    for line in lines(data) {
        out.put_slice(b"data: ");
        out.put_slice(line.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
}

/// The `retry:` field, telling the browser how long to wait before reconnecting.
pub fn retry_frame(millis: u64) -> Bytes {
    Bytes::from(format!("retry: {millis}\n\n"))
}

/// A comment line: keeps proxies and load balancers from timing the connection out.
pub fn heartbeat_frame() -> Bytes {
    Bytes::from_static(b":\n\n")
}

/// Splits on `\r\n`, `\r` and `\n`, as an SSE parser will. Empty data is one empty line.
fn lines(data: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let s = rest?;
        match s.find(['\r', '\n']) {
            None => {
                rest = None;
                Some(s)
            }
            Some(i) => {
                let skip = if s[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = Some(&s[i + skip..]);
                Some(&s[..i])
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::StreamId;

    #[test]
    fn splits_every_kind_of_line_break_once() {
        let got: Vec<&str> = lines("a\r\nb\rc\nd").collect();
        assert_eq!(got, ["a", "b", "c", "d"]);
        assert_eq!(lines("").collect::<Vec<_>>(), [""]);
        assert_eq!(lines("x\n").collect::<Vec<_>>(), ["x", ""]);
    }

    #[test]
    fn omits_default_and_unframeable_types() {
        let f = frame(Some("1-2"), Some("message"), "hi");
        assert_eq!(&f[..], b"id: 1-2\ndata: hi\n\n");
        let f = frame(None, Some("bad\ntype"), "x");
        assert_eq!(&f[..], b"data: x\n\n");
    }

    /// Reads frames back with an independent SSE parser.
    fn parse(frames: &[u8]) -> Vec<eventsource_stream::Event> {
        use eventsource_stream::Eventsource;
        use futures_util::StreamExt;
        let chunks = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
            Bytes::copy_from_slice(frames),
        )]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(chunks.eventsource().map(|e| e.unwrap()).collect())
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::proptest_config("hostile_payloads_round_trip"))]
        /// Any payload and any type a publisher (or a direct XADD) can store: the parser reads
        /// back the payload with its line breaks as `\n`, and the type, or `message` for a type
        /// that cannot be framed.
        #[test]
        fn hostile_payloads_round_trip(
            data in "\\PC{0,80}|[\\r\\n\\x00ab: ]{0,40}",
            event in proptest::option::of("\\PC{0,20}|[\\r\\nab: ]{0,8}"),
            ms in proptest::num::u64::ANY,
            seq in proptest::num::u64::ANY,
        ) {
            let id = StreamId::new(ms, seq);
            let frames = [
                frame(Some(&id.to_string()), event.as_deref(), &data),
                frame(None, Some("second"), "x"),
            ]
            .concat();
            let got = parse(&frames);
            proptest::prop_assert_eq!(got.len(), 2);
            let expected_data = data.replace("\r\n", "\n").replace('\r', "\n");
            let expected_type = event
                .filter(|t| is_frameable_event_type(t) && *t != "message")
                .unwrap_or_else(|| "message".to_owned());
            proptest::prop_assert_eq!(&got[0].data, &expected_data);
            proptest::prop_assert_eq!(&got[0].event, &expected_type);
            proptest::prop_assert_eq!(&got[0].id, &id.to_string());
            proptest::prop_assert_eq!(&got[1].data, "x");
        }
    }
}
