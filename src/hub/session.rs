//! One client's session: replay from its cursor, then the live feed, with no gap and no
//! duplicate at the seam.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tracing::warn;

use super::feed::{Receiver, RecvError};
use super::replay::{GapNotice, ReplayPage};
use super::{Delivery, Inner, Item, NoticeDelivery, TopicHandle};
use crate::event::StreamId;
use crate::metrics::ReasonLabel;
use crate::sse;
use crate::store::{GapReason, StoreError};

/// A session's place in its topic's feed (see [`TopicHandle::place`]).
#[derive(Clone, Copy)]
pub(super) struct Place {
    pub(super) horizon: Option<StreamId>,
    pub(super) read_number: u64,
}

/// A client's hold on a topic; releases it when dropped (the client went away).
pub(super) struct Membership {
    pub(super) topic: Arc<TopicHandle>,
    pub(super) hub: Arc<Inner>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.leave(&self.topic);
    }
}

/// One client's stream: replay from the cursor, then the live feed.
pub struct Session {
    /// Whether the jittered `retry:` was sent on shutdown.
    said_goodbye: bool,
    /// Id of the last event sent to the client (or its starting cursor).
    cursor: StreamId,
    /// Reading from the store rather than the feed.
    replaying: bool,
    feed: Receiver<Item>,
    /// Where the session joined the feed, or last fell behind it.
    place: Place,
    /// Set when a replay page ended before the horizon: the next read must have started after
    /// this read number.
    reread: Option<u64>,
    /// The topic's count of [`Item::Ended`] when the session joined its feed.
    ends: u32,
    /// Held for the session's life: dropping it releases the topic.
    membership: Membership,
}

/// What a session produces next. Events come as the topic's shared pieces: a single-topic
/// stream writes their ready-made frames; a multi-topic stream re-encodes their events.
pub enum Output {
    /// A live event, shared by every client of the topic on this node.
    Live(Arc<Delivery>),
    /// Replayed history (a gap notice first, if any), shared by sessions resuming alike.
    Replayed(Arc<ReplayPage>),
    /// A notice for the topic's live readers (presence's join and leave), not an event.
    Notice(Arc<NoticeDelivery>),
    /// On shutdown: the `retry:` frame to send before the end.
    Farewell(Bytes),
    /// Nothing happened within the wait: send a heartbeat if due.
    Idle,
    /// The session is over (shutdown, or the store failed; the client reconnects).
    End,
}

impl Session {
    pub(super) fn new(
        cursor: StreamId,
        replaying: bool,
        feed: Receiver<Item>,
        place: Place,
        membership: Membership,
    ) -> Session {
        // After joining the feed: an end sent since is on the feed, or already counted here.
        let ends = membership.topic.ends.load(Ordering::Acquire);
        Session {
            ends,
            said_goodbye: false,
            cursor,
            replaying,
            feed,
            place,
            reread: None,
            membership,
        }
    }

    /// Produces the next frames, waiting at most until `idle` completes when live.
    pub async fn next(&mut self, idle: impl std::future::Future<Output = ()>) -> Output {
        tokio::pin!(idle);
        loop {
            if self.membership.hub.shutdown.is_triggered() {
                return self.farewell();
            }
            // Ended since it joined: the feed's item wakes it, and this finds it even when
            // that item was missed (replaying, or pushed out of the feed while behind).
            if self.membership.topic.ends.load(Ordering::Acquire) != self.ends {
                return Output::End;
            }
            if self.replaying {
                // Boxed: a session waits on its feed nearly all its life, and its future would
                // otherwise keep room for a replay's state all that time.
                match Box::pin(self.replay_page()).await {
                    Ok(Some(page)) => return Output::Replayed(page),
                    Ok(None) => continue,
                    Err(e) => {
                        warn!(topic = %self.membership.topic.name, error = %e, "replay failed; ending the stream");
                        return Output::End;
                    }
                }
            }
            // Shutdown is not waited for here: the pump closes the feed on shutdown, and the
            // session then says goodbye. Waiting on the shutdown token as well cost every
            // session two turns of the token's lock per event, contended by all of them.
            let item = tokio::select! {
                // In order, not at random (no random number per event): an idle wait only
                // matters when nothing came.
                biased;
                item = self.feed.recv() => item,
                _ = &mut idle => return Output::Idle,
            };
            match item {
                Ok(Item::Event(d)) if d.id > self.cursor => {
                    self.cursor = d.id;
                    return Output::Live(d);
                }
                Ok(Item::Event(_)) => {} // sent during the replay
                Ok(Item::Resync) => self.replay_again(),
                Ok(Item::Notice(notice)) => return Output::Notice(notice),
                // Back to the top, which ends the session unless it joined after this end.
                Ok(Item::Ended) => {}
                Ok(Item::Removed(upto)) => {
                    // A session past it (it began on the new stream, or a read found the old
                    // one gone and said so) has nothing to be told.
                    if !self.cursor.is_zero() && self.cursor <= upto {
                        let gap = GapNotice {
                            cursor: self.cursor,
                            reason: GapReason::Deleted,
                            resume_from: None,
                        };
                        self.count_gap(gap.reason);
                        // The store starts the new stream past `upto`: its first event follows.
                        self.cursor = upto.next();
                        let page = ReplayPage::notice_only(gap, self.cursor);
                        return Output::Replayed(Arc::new(page));
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    self.membership.hub.metrics.catch_ups.inc();
                    self.replay_again();
                }
                // The pump stopped (shutdown, mostly): end as on shutdown, with a spread retry.
                Err(RecvError::Closed) => return self.farewell(),
            }
        }
    }

    /// On shutdown: first a `retry:` with a random extra delay, so clients of this node come back
    /// spread out over the others; then the end.
    fn farewell(&mut self) -> Output {
        if self.said_goodbye {
            return Output::End;
        }
        self.said_goodbye = true;
        let hub = &self.membership.hub;
        let spread = hub.retry_spread.as_millis() as u64;
        let extra = if spread == 0 {
            0
        } else {
            rand::random_range(0..=spread)
        };
        Output::Farewell(sse::retry_frame(hub.retry.as_millis() as u64 + extra))
    }

    /// Back to the store, from a new place in the feed.
    fn replay_again(&mut self) {
        let topic = &self.membership.topic;
        self.place = topic.place(topic.feed.horizon());
        self.reread = None;
        self.replaying = true;
    }

    fn count_gap(&self, reason: GapReason) {
        let reason = reason.as_str();
        self.membership
            .hub
            .metrics
            .gaps
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// The id of the last event the session sent, or where it started.
    pub fn position(&self) -> StreamId {
        self.cursor
    }

    /// Reads one page after the cursor. `None` when there was nothing to send.
    async fn replay_page(&mut self) -> Result<Option<Arc<ReplayPage>>, StoreError> {
        let topic = &self.membership.topic;
        let read = topic.replay(&self.membership.hub, self.cursor, self.reread);
        let page = read.page.await?;
        if let Some(gap) = &page.gap {
            self.count_gap(gap.reason);
        }
        self.cursor = page.next;
        if !page.full {
            // The store has nothing more; the feed carries what comes after the horizon.
            let horizon = match self.place.horizon {
                Some(h) => h,
                None => match self.await_pump().await? {
                    Some(h) => h,
                    None => return Ok(None), // shutting down
                },
            };
            if self.cursor >= horizon || read.number > self.place.read_number {
                // The page reached the horizon, or was read after the session joined (then the
                // store had every event the feed will not carry).
                self.replaying = false;
                self.reread = None;
            } else {
                // A shared page from before the session joined: read on from where it ended.
                self.reread = Some(self.place.read_number);
            }
        }
        Ok((!page.frames.is_empty()).then_some(page))
    }

    /// Waits until the pump knows where the feed starts, and takes the session's place anew.
    /// `None` on shutdown.
    async fn await_pump(&mut self) -> Result<Option<StreamId>, StoreError> {
        let topic = &self.membership.topic;
        let horizon = tokio::select! {
            started = topic.feed.started() => match started {
                Some(horizon) => horizon,
                // The pump ended without starting (the store went away).
                None => return Err(StoreError::Unavailable("the topic's live feed stopped".into())),
            },
            _ = self.membership.hub.shutdown.wait() => return Ok(None),
        };
        // Events before the pump started are not on the feed: a read must start after this.
        self.place = topic.place(Some(horizon));
        Ok(self.place.horizon)
    }
}
