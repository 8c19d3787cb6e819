//! A stream of several topics on one connection (`?topic=a&topic=b…`): one session per topic,
//! merged, each event re-encoded with the composite cursor as its `id` and an envelope naming its
//! topic.
//!
//! Frames of a multi-topic stream:
//!
//! ```text
//! id: m<composite cursor>
//! event: <type>                      (omitted for `message`, as in single-topic streams)
//! data: {"topic": "<topic>", "id": "<stream id>", "data": "<payload>"}
//! ```
//!
//! A notice (`ssegate.join`, `ssegate.leave`) has no `id:` and its data is
//! `{"topic": "<topic>", "data": <the notice's JSON>}`.
//!
//! A gap notice says which topic it concerns (`"topic"` in its data) and leaves the other topics
//! alone. The seam guarantees hold per topic, since each topic has its own session.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, BoxStream, SelectAll};
use futures_util::{Stream, StreamExt};

use super::events::OpenStream;
use crate::cursor;
use crate::event::{Event, StreamId, Topic};
use crate::hub::{NoticeDelivery, Output, ReplayPage, Session};
use crate::sse;

/// The merged stream's state.
struct Merged {
    topics: Vec<Topic>,
    /// Per topic (same order): the id of the last event sent, or where the topic started.
    positions: Vec<StreamId>,
    /// Every session's outputs, tagged with its topic's index.
    outputs: SelectAll<BoxStream<'static, (usize, Output)>>,
    heartbeat: Duration,
    /// Whether the shutdown `retry:` went out (each session offers one).
    said_goodbye: bool,
    /// Counts the stream while it lives, and its deliveries.
    open: OpenStream,
}

/// The body of a multi-topic stream: `retry:`, then every topic's replay and live events as
/// they come, with heartbeats while all are idle. `topics` are sorted and match `sessions`.
pub fn stream(
    topics: Vec<Topic>,
    sessions: Vec<Session>,
    retry: Bytes,
    heartbeat: Duration,
    open: OpenStream,
) -> impl Stream<Item = Bytes> + Send + 'static {
    let positions = sessions.iter().map(Session::position).collect();
    let outputs = stream::select_all(sessions.into_iter().enumerate().map(|(i, session)| {
        // Sessions never idle here: the merged stream sends the heartbeats. A session's end
        // ends the whole stream (the client resumes every topic from the composite cursor).
        stream::unfold(Some(session), move |session| async move {
            let mut session = session?;
            match session.next(std::future::pending()).await {
                Output::End => Some(((i, Output::End), None)),
                other => Some(((i, other), Some(session))),
            }
        })
        .boxed()
    }));
    let merged = Merged {
        topics,
        positions,
        outputs,
        heartbeat,
        said_goodbye: false,
        open,
    };
    stream::once(async move { retry }).chain(stream::unfold(merged, |mut m| async move {
        loop {
            let next = tokio::select! {
                next = m.outputs.next() => next,
                _ = tokio::time::sleep(m.heartbeat) => return Some((sse::heartbeat_frame(), m)),
            };
            let frames = match next {
                None | Some((_, Output::End)) => return None,
                Some((_, Output::Idle)) => continue,
                Some((_, Output::Farewell(retry))) if !m.said_goodbye => {
                    m.said_goodbye = true;
                    retry
                }
                Some((_, Output::Farewell(_))) => continue,
                Some((i, Output::Live(delivery))) => m.event(i, &delivery.event),
                Some((i, Output::Replayed(page))) => m.page(i, &page),
                Some((i, Output::Notice(notice))) => m.notice(i, &notice),
            };
            return Some((frames, m));
        }
    }))
}

impl Merged {
    /// One event of topic `i`: its position moves, and the composite cursor says so.
    fn event(&mut self, i: usize, event: &Event) -> Bytes {
        self.open.delivered(1);
        self.positions[i] = event.id;
        let id = cursor::encode(&self.topics, &self.positions);
        let envelope = serde_json::json!({
            "topic": self.topics[i].as_str(),
            "id": event.id.to_string(),
            "data": event.data,
        });
        sse::frame(Some(&id), event.event.as_deref(), &envelope.to_string())
    }

    /// A notice of topic `i` (join, leave): no id, its data in an envelope naming the topic.
    fn notice(&self, i: usize, notice: &NoticeDelivery) -> Bytes {
        let data = serde_json::value::RawValue::from_string(notice.data.clone())
            .map(|raw| serde_json::json!({"topic": self.topics[i].as_str(), "data": raw}))
            .unwrap_or_else(
                |_| serde_json::json!({"topic": self.topics[i].as_str(), "data": notice.data}),
            );
        sse::frame(None, Some(&notice.event), &data.to_string())
    }

    /// A replay page of topic `i`: its gap notice (naming the topic), then its events.
    fn page(&mut self, i: usize, page: &ReplayPage) -> Bytes {
        let mut out = BytesMut::new();
        if let Some(gap) = &page.gap {
            let notice = gap.json(Some(&self.topics[i]));
            out.extend_from_slice(&sse::frame(None, Some(sse::GAP_EVENT), &notice));
        }
        for event in &page.events {
            out.extend_from_slice(&self.event(i, event));
        }
        // After a gap with nothing retained, the topic goes on from where its stream ended.
        self.positions[i] = page.next;
        out.freeze()
    }
}
