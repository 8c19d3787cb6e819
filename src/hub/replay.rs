//! Replay pages: history after a cursor, read once and shared by the sessions of a node that
//! resume a topic from the same cursor within `replay_sharing`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::future::{BoxFuture, FutureExt, Shared};

use super::{Inner, Keep, TopicHandle};
use crate::event::{Event, StreamId, Topic};
use crate::metrics::SourceLabel;
use crate::sse;
use crate::store::{GapReason, Store, StoreError};

/// Recent replay reads of one topic.
#[derive(Default)]
pub(super) struct Replays {
    by_cursor: HashMap<StreamId, SharedReplay>,
    /// Cursors in the order their reads started, to drop expired reads cheaply.
    started: VecDeque<(u64, StreamId)>,
    /// Numbers reads in the order they started; a session compares it with the number it saw
    /// when it joined to tell whether a read began after that.
    pub(super) last_number: u64,
}

/// A replay read any number of sessions can await.
#[derive(Clone)]
pub(super) struct SharedReplay {
    /// Orders the read against sessions joining (see [`Replays::last_number`]).
    pub(super) number: u64,
    started: Instant,
    pub(super) page: Shared<BoxFuture<'static, Result<Arc<ReplayPage>, StoreError>>>,
}

/// One page of history after a cursor, as sent to every session that resumes from it.
#[derive(Debug)]
pub struct ReplayPage {
    /// The gap notice, if any, then the events, encoded for a single-topic stream.
    pub frames: Bytes,
    /// The gap notice, if the events right after the cursor are not all retained.
    pub gap: Option<GapNotice>,
    /// The events, for streams that encode them otherwise (multi-topic).
    pub events: Vec<Event>,
    /// The cursor after this page.
    pub next: StreamId,
    /// The page holds as many events as asked for: more may follow at once.
    pub(super) full: bool,
}

impl ReplayPage {
    /// A page holding only a gap notice, after which the session goes on from `next`.
    pub(super) fn notice_only(gap: GapNotice, next: StreamId) -> ReplayPage {
        ReplayPage {
            frames: sse::frame(None, Some(sse::GAP_EVENT), &gap.json(None)),
            gap: Some(gap),
            events: Vec::new(),
            next,
            full: false,
        }
    }
}

/// What an `ssegate.gap` notice says.
#[derive(Debug, Clone, Copy)]
pub struct GapNotice {
    /// The cursor that could not be honoured.
    pub cursor: StreamId,
    pub reason: GapReason,
    /// The id delivery resumes from; `None`: nothing retained, delivery resumes with the next
    /// new event.
    pub resume_from: Option<StreamId>,
}

impl GapNotice {
    /// The notice's JSON: `cursor`, `reason`, `resume_from`, and `topic` when given (in
    /// multi-topic streams, where it says which topic the gap concerns).
    pub fn json(&self, topic: Option<&Topic>) -> String {
        let mut data = serde_json::json!({
            "cursor": self.cursor.to_string(),
            "reason": self.reason.as_str(),
            "resume_from": self.resume_from.map(|id| id.to_string()),
        });
        if let Some(t) = topic {
            data["topic"] = serde_json::json!(t.as_str());
        }
        data.to_string()
    }
}

impl Replays {
    /// Drops the reads older than `sharing`, and the memory they held.
    pub(super) fn forget_expired(&mut self, now: Instant, sharing: Duration) {
        while let Some(&(number, oldest)) = self.started.front() {
            match self.by_cursor.get(&oldest) {
                Some(r) if r.number == number && now - r.started < sharing => break,
                Some(r) if r.number == number => {
                    self.by_cursor.remove(&oldest);
                }
                _ => {}
            }
            self.started.pop_front();
        }
        if self.started.is_empty() {
            // Give the tables' memory back: an idle topic keeps nothing here.
            self.by_cursor = HashMap::new();
            self.started = VecDeque::new();
        }
    }
}

impl Replays {
    /// Drops every read (the topic was deleted); the numbering goes on.
    pub(super) fn forget_all(&mut self) {
        self.by_cursor = HashMap::new();
        self.started = VecDeque::new();
    }
}

impl TopicHandle {
    /// The page after `cursor`: a read shared with other sessions, or a new one. With
    /// `started_after`, only a read started after that read number will do.
    pub(super) fn replay(
        &self,
        hub: &Inner,
        cursor: StreamId,
        started_after: Option<u64>,
    ) -> SharedReplay {
        let now = Instant::now();
        let mut replays = self.replays();
        replays.forget_expired(now, hub.replay_sharing);
        if let Some(r) = replays.by_cursor.get(&cursor) {
            let usable = started_after.is_none_or(|n| r.number > n)
                && !matches!(r.page.peek(), Some(Err(_)));
            if usable {
                let source = SourceLabel { source: "shared" };
                hub.metrics.replay_reads.get_or_create(&source).inc();
                return r.clone();
            }
        }
        let source = SourceLabel { source: "store" };
        hub.metrics.replay_reads.get_or_create(&source).inc();
        replays.last_number += 1;
        let number = replays.last_number;
        let read = read_replay(
            hub.store.clone(),
            self.name.clone(),
            self.keep.clone(),
            self.labels.clone(),
            cursor,
            hub.page_size,
        );
        let shared = SharedReplay {
            number,
            started: now,
            page: read.boxed().shared(),
        };
        replays.by_cursor.insert(cursor, shared.clone());
        replays.started.push_back((number, cursor));
        shared
    }
}

/// Reads and encodes one replay page; for a view, only the events it keeps (the page still
/// moves the cursor past the others), read by label when the view has labels.
async fn read_replay(
    store: Arc<dyn Store>,
    topic: Topic,
    keep: Option<Keep>,
    labels: Vec<String>,
    cursor: StreamId,
    page_size: usize,
) -> Result<Arc<ReplayPage>, StoreError> {
    let mut page = if labels.is_empty() {
        store.read(&topic, cursor, page_size).await?
    } else {
        store
            .read_labelled(&topic, &labels, cursor, page_size)
            .await?
    };
    let full = page.events.len() >= page_size;
    let last_read = page.events.last().map(|e| e.id);
    let mut frames = BytesMut::new();
    let mut next = cursor;
    let gap = page.gap.map(|reason| GapNotice {
        cursor,
        reason,
        resume_from: page.events.first().map(|e| e.id),
    });
    if let Some(gap) = &gap {
        // No `id:`, so the browser's last id stays the real one.
        frames.extend_from_slice(&sse::frame(None, Some(sse::GAP_EVENT), &gap.json(None)));
        if let (None, Some(end)) = (gap.resume_from, page.resume_after) {
            // Nothing retained: carry on after wherever the stream ended.
            next = end;
        }
    }
    if let Some(keep) = &keep {
        page.events.retain(|e| keep(e));
    }
    for event in &page.events {
        frames.extend_from_slice(&sse::event_frame(event));
    }
    if let Some(last) = last_read {
        next = last;
    }
    Ok(Arc::new(ReplayPage {
        frames: frames.freeze(),
        gap,
        full,
        events: page.events,
        next,
    }))
}
