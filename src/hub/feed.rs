//! A topic's live feed: a broadcast queue that costs nothing while empty.
//!
//! `tokio::sync::broadcast` allocates its whole ring (`fanout_buffer` slots, ~48 KiB at 1024)
//! when a channel is made, so every active topic paid for it, which with one topic per user
//! was most of what a connection cost. This queue holds only items some receiver has yet to
//! read: each item counts the receivers that were there when it was sent, and leaves the queue
//! once they all read it (or left). An idle topic whose clients are up to date holds nothing,
//! and the queue's buffer shrinks back after a burst.
//!
//! At most `capacity` items are kept; a receiver further behind gets [`RecvError::Lagged`] and
//! goes on from the oldest item kept (the session then reads the store instead).
//!
//! Each receiver has a slot in the queue's state, under the lock it reads items with: its place
//! in the queue, and its waker while it waits. A send takes the wakers and wakes them outside the
//! lock. The slot list shrinks back as receivers leave: a new receiver takes the lowest free
//! slot, free slots at the end go, and while more than half the list is free a receiver that
//! reads (or waits again) moves down into the lowest free slot, so that the end frees up. A
//! topic whose clients all left but one holds one slot, wherever that one was. A receiver of a topic with
//! many clients then takes one lock per item it reads, where a `Notify` cost it two turns of
//! the notifier's lock besides (enabling and dropping its waiter), all contended by the topic's
//! other receivers.
//!
//! The feed also holds its *horizon*: the id of the last event the pump put on it, or where it
//! started; `None` until the pump knows. It moves under the same lock as the items, so a
//! receiver subscribing sees exactly the horizon of what it will not receive.

use std::collections::{BTreeSet, VecDeque};
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;

use crate::event::StreamId;

/// Why [`Receiver::recv`] returned no item.
#[derive(Debug, PartialEq, Eq)]
pub enum RecvError {
    /// This many items were dropped before the receiver read them.
    Lagged(u64),
    /// The feed was closed and everything in it was read.
    Closed,
}

pub struct Feed<T> {
    state: Mutex<State<T>>,
    /// Woken when the horizon is set and on close, for [`Feed::started`].
    changed: Notify,
}

struct State<T> {
    /// Items not yet read by every receiver that was there when they were sent, with the count
    /// of those still to read each.
    items: VecDeque<(T, usize)>,
    /// Sequence number of `items[0]`.
    first: u64,
    /// Most items kept.
    capacity: usize,
    /// Id of the last item sent, or where the feed starts; `None` until known.
    horizon: Option<StreamId>,
    closed: bool,
    /// One per receiver (see [`Receiver::slot`]).
    slots: Vec<Slot>,
    /// Slots of receivers gone, for the next ones, lowest first: clients that come and go do
    /// not grow `slots`, and the list's end empties so that it can shrink.
    free_slots: BTreeSet<usize>,
    /// Receivers moved down so far, for the tests.
    #[cfg(test)]
    moves: usize,
}

/// A receiver's state, kept in the feed rather than in the receiver: a receiver is part of every
/// stream's state, and a few bytes more there moved each idle stream to a larger allocation.
struct Slot {
    /// Sequence number of the next item to read.
    next: u64,
    /// The receiver's waker while it waits for an item; the next send or the close takes it.
    waker: Option<Waker>,
}

/// Most wakers a send takes out of the lock at a time (as `tokio::sync::Notify` does), so that
/// waking a topic's receivers needs no memory of its own.
const WAKE_BATCH: usize = 32;

impl<T> State<T> {
    /// Receivers now: every slot not left free.
    fn receivers(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    fn end(&self) -> u64 {
        self.first + self.items.len() as u64
    }

    /// Drops the free slots at the end of the list, and gives back its memory once it is mostly
    /// unused.
    fn release_tail(&mut self) {
        while self
            .free_slots
            .last()
            .is_some_and(|&last| last + 1 == self.slots.len())
        {
            self.free_slots.pop_last();
            self.slots.pop();
        }
        if self.slots.len() < self.slots.capacity() / 4 || self.slots.is_empty() {
            self.slots.shrink_to(self.slots.len() * 2);
        }
    }

    /// Where the receiver in `slot` should be: while more than half the list is free, the
    /// lowest free slot below it (moved there, its own freed), else where it is.
    fn settle(&mut self, slot: usize) -> usize {
        if self.free_slots.len() * 2 <= self.slots.len() {
            return slot;
        }
        match self.free_slots.first() {
            Some(&lower) if lower < slot => {
                self.free_slots.pop_first();
                self.slots.swap(lower, slot);
                self.slots[slot].waker = None;
                self.free_slots.insert(slot);
                self.release_tail();
                #[cfg(test)]
                {
                    self.moves += 1;
                }
                lower
            }
            _ => slot,
        }
    }

    /// Drops items every receiver has read, and gives back memory after a burst.
    fn drop_read(&mut self) {
        while self.items.front().is_some_and(|(_, unread)| *unread == 0) {
            self.items.pop_front();
            self.first += 1;
        }
        if self.items.capacity() > 16 && self.items.len() < self.items.capacity() / 4 {
            self.items.shrink_to(self.items.len() * 2);
        }
    }
}

impl<T: Clone> Feed<T> {
    pub fn new(capacity: usize) -> Arc<Feed<T>> {
        Arc::new(Feed {
            state: Mutex::new(State {
                items: VecDeque::new(),
                first: 0,
                capacity: capacity.max(1),
                horizon: None,
                closed: false,
                slots: Vec::new(),
                free_slots: BTreeSet::new(),
                #[cfg(test)]
                moves: 0,
            }),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver of everything sent from now on, and the horizon it starts after.
    pub fn subscribe(self: &Arc<Self>) -> (Receiver<T>, Option<StreamId>) {
        let mut state = self.lock();
        let place = Slot {
            next: state.end(),
            waker: None,
        };
        let slot = match state.free_slots.pop_first() {
            Some(slot) => {
                state.slots[slot] = place;
                slot
            }
            None => {
                // Most topics have one client (a topic per user): room for one, not four.
                if state.slots.capacity() == 0 {
                    state.slots.reserve_exact(1);
                }
                state.slots.push(place);
                state.slots.len() - 1
            }
        };
        let receiver = Receiver {
            feed: self.clone(),
            slot,
        };
        (receiver, state.horizon)
    }

    pub fn horizon(&self) -> Option<StreamId> {
        self.lock().horizon
    }

    /// Moves the horizon without sending anything (where the feed starts, or starts again).
    pub fn set_horizon(&self, id: StreamId) {
        self.lock().horizon = Some(id);
        self.changed.notify_waiters();
    }

    /// The horizon once the pump knows it; `None` if the feed closed first.
    pub async fn started(&self) -> Option<StreamId> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let state = self.lock();
                if state.horizon.is_some() || state.closed {
                    return state.horizon;
                }
            }
            changed.await;
        }
    }

    /// Sends `item` (the event `id`) to every current receiver and moves the horizon to `id`.
    /// With no receiver, the item is dropped at once.
    pub fn send(&self, item: T, id: Option<StreamId>) {
        let mut state = self.lock();
        let started = id.is_some() && state.horizon.is_none();
        if let Some(id) = id {
            state.horizon = Some(id);
        }
        let receivers = state.receivers();
        if receivers > 0 {
            state.items.push_back((item, receivers));
            while state.items.len() > state.capacity {
                state.items.pop_front();
                state.first += 1;
            }
        }
        self.wake(state);
        if started {
            self.changed.notify_waiters();
        }
    }

    /// Wakes the waiting receivers, outside the lock, a batch at a time. A receiver that
    /// registers again meanwhile has seen what was sent, so it waits for the next send.
    fn wake<'a>(&'a self, mut state: MutexGuard<'a, State<T>>) {
        let mut from = 0;
        loop {
            let mut batch: [Option<Waker>; WAKE_BATCH] = Default::default();
            let mut taken = 0;
            while from < state.slots.len() && taken < WAKE_BATCH {
                if let Some(waker) = state.slots[from].waker.take() {
                    batch[taken] = Some(waker);
                    taken += 1;
                }
                from += 1;
            }
            let done = from >= state.slots.len();
            drop(state);
            for waker in batch.into_iter().flatten() {
                waker.wake();
            }
            if done {
                return;
            }
            state = self.lock();
        }
    }

    /// Ends the feed: receivers get what is left, then [`RecvError::Closed`].
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        self.wake(state);
        self.changed.notify_waiters();
    }

    /// Items held now.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.lock().items.len()
    }
}

pub struct Receiver<T: Clone> {
    feed: Arc<Feed<T>>,
    /// Its place in the feed's `slots`.
    slot: usize,
}

impl<T: Clone> Receiver<T> {
    /// The next item, waiting for it.
    pub async fn recv(&mut self) -> Result<T, RecvError> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<T, RecvError>> {
        let mut state = self.feed.lock();
        // Under the lock a send holds while it queues: moving does not hide an item from it.
        self.slot = state.settle(self.slot);
        if let Some(result) = take(&mut state, self.slot) {
            return Poll::Ready(result);
        }
        // Left under the lock a send takes, so a send after the look wakes this receiver. A
        // receiver polled again while waiting (after an idle timeout, say) replaces its waker.
        match &mut state.slots[self.slot].waker {
            Some(waker) => waker.clone_from(cx.waker()),
            empty => *empty = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

/// The next item for the receiver in `slot` if it is there (moving it on); `None` when there is
/// nothing yet.
fn take<T: Clone>(state: &mut State<T>, slot: usize) -> Option<Result<T, RecvError>> {
    let next = state.slots[slot].next;
    if next < state.first {
        state.slots[slot].next = state.first;
        return Some(Err(RecvError::Lagged(state.first - next)));
    }
    let index = (next - state.first) as usize;
    if let Some((item, unread)) = state.items.get_mut(index) {
        *unread -= 1;
        let item = item.clone();
        state.slots[slot].next += 1;
        state.drop_read();
        return Some(Ok(item));
    }
    state.closed.then_some(Err(RecvError::Closed))
}

impl<T: Clone> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = self.feed.lock();
        state.slots[self.slot].waker = None;
        let from = state.slots[self.slot].next.saturating_sub(state.first) as usize;
        for (_, unread) in state.items.iter_mut().skip(from) {
            *unread -= 1;
        }
        state.free_slots.insert(self.slot);
        state.release_tail();
        state.drop_read();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn items_reach_every_receiver_and_leave_once_all_read_them() {
        let feed = Feed::new(8);
        feed.send(0, None); // nobody listens: dropped
        assert_eq!(feed.held(), 0);
        let mut a = feed.subscribe().0;
        let mut b = feed.subscribe().0;
        feed.send(1, None);
        feed.send(2, None);
        assert_eq!(feed.held(), 2);
        assert_eq!(a.recv().await, Ok(1));
        assert_eq!(a.recv().await, Ok(2));
        assert_eq!(feed.held(), 2, "b has not read them");
        let mut late = feed.subscribe().0;
        feed.send(3, None);
        assert_eq!(b.recv().await, Ok(1));
        assert_eq!(feed.held(), 2);
        drop(b);
        assert_eq!(feed.held(), 1, "b's unread items no longer wait for it");
        assert_eq!(
            late.recv().await,
            Ok(3),
            "a late receiver starts at the end"
        );
        assert_eq!(a.recv().await, Ok(3));
        assert_eq!(feed.held(), 0);
    }

    #[tokio::test]
    async fn a_receiver_too_far_behind_is_told_how_much_it_missed() {
        let feed = Feed::new(3);
        let mut slow = feed.subscribe().0;
        let mut fast = feed.subscribe().0;
        for i in 0..5 {
            feed.send(i, None);
            assert_eq!(fast.recv().await, Ok(i));
        }
        assert_eq!(slow.recv().await, Err(RecvError::Lagged(2)));
        assert_eq!(slow.recv().await, Ok(2));
        assert_eq!(slow.recv().await, Ok(3));
        assert_eq!(slow.recv().await, Ok(4));
        assert_eq!(feed.held(), 0);
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_on_send_and_on_close() {
        let feed = Feed::new(4);
        let mut r = feed.subscribe().0;
        let waiting = tokio::spawn(async move {
            let first = r.recv().await;
            let second = r.recv().await;
            (first, second)
        });
        tokio::task::yield_now().await;
        feed.send("x", None);
        feed.close();
        let (first, second) = waiting.await.unwrap();
        assert_eq!(first, Ok("x"));
        assert_eq!(second, Err(RecvError::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_receiver_polled_again_while_waiting_is_listed_once() {
        let feed = Feed::new(4);
        let mut r = feed.subscribe().0;
        let _other = feed.subscribe().0;
        for _ in 0..5 {
            let waited = tokio::time::timeout(Duration::from_secs(1), r.recv()).await;
            assert!(waited.is_err(), "nothing was sent");
        }
        assert_eq!(waiting(&feed), 1);
        feed.send(1, None);
        assert_eq!(waiting(&feed), 0, "a send takes the wakers");
        assert_eq!(r.recv().await, Ok(1));
        // Listed anew after the send, once.
        for _ in 0..3 {
            let waited = tokio::time::timeout(Duration::from_secs(1), r.recv()).await;
            assert!(waited.is_err());
        }
        assert_eq!(waiting(&feed), 1);
    }

    fn waiting<T: Clone>(feed: &Feed<T>) -> usize {
        feed.lock()
            .slots
            .iter()
            .filter(|s| s.waker.is_some())
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn receivers_that_come_and_go_without_events_leave_nothing_behind() {
        let feed = Feed::new(4);
        let mut stays = feed.subscribe().0;
        let waited = tokio::time::timeout(Duration::from_secs(1), stays.recv()).await;
        assert!(waited.is_err());
        for _ in 0..10 {
            let mut visitor = feed.subscribe().0;
            let waited = tokio::time::timeout(Duration::from_secs(1), visitor.recv()).await;
            assert!(waited.is_err());
            drop(visitor);
        }
        assert_eq!(
            feed.lock().slots.len(),
            1,
            "the visitors took turns in one slot, and it went with the last"
        );
        assert_eq!(waiting(&feed), 1, "a visitor gone leaves no waker");
        feed.send(7, None);
        assert_eq!(stays.recv().await, Ok(7));
    }

    /// Slots in the list, and its capacity.
    fn slot_list<T: Clone>(feed: &Feed<T>) -> (usize, usize) {
        let state = feed.lock();
        (state.slots.len(), state.slots.capacity())
    }

    #[tokio::test(start_paused = true)]
    async fn the_slot_list_shrinks_back_when_receivers_leave() {
        let feed = Feed::new(4);
        let mut receivers: Vec<_> = (0..20_000).map(|_| feed.subscribe().0).collect();
        assert_eq!(slot_list(&feed).0, 20_000);
        // All leave but the last one to come: it reads on, from a slot near the start.
        let mut last = receivers.pop().unwrap();
        drop(receivers);
        feed.send(1, None);
        assert_eq!(last.recv().await, Ok(1));
        let (len, capacity) = slot_list(&feed);
        assert_eq!(len, 1, "the one left moved down");
        assert!(capacity <= 2, "the list's memory went back: {capacity}");
        // An idle receiver polled again (a heartbeat's timeout) moves down too.
        let mut receivers: Vec<_> = (0..1000).map(|_| feed.subscribe().0).collect();
        let mut idle = receivers.pop().unwrap();
        drop(receivers);
        let waited = tokio::time::timeout(Duration::from_secs(1), idle.recv()).await;
        assert!(waited.is_err());
        assert_eq!(slot_list(&feed).0, 2);
        // Everyone gone: nothing held.
        drop((last, idle));
        assert_eq!(slot_list(&feed), (0, 0));
        let mut again = feed.subscribe().0;
        feed.send(2, None);
        assert_eq!(again.recv().await, Ok(2));
    }

    /// Receivers coming, reading and leaving at random (seeded), with the list moving them
    /// down as it shrinks: every receiver reads every item sent while it was there, in order;
    /// once each has read again, the list holds at most twice the receivers.
    #[tokio::test]
    async fn receivers_moved_down_miss_nothing() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let feed = Feed::new(1 << 20);
        // Each receiver, with the next item it must read.
        let mut receivers: Vec<(Receiver<u64>, u64)> = Vec::new();
        let mut sent = 0u64;
        for step in 0..21_000 {
            // Phases of 1,000 steps, coming then leaving: the list turns sparse, and
            // receivers move down.
            let coming = step / 1000 % 2 == 0;
            let op = rng.random_range(0..10);
            let op = match (coming, op) {
                (true, 0..=3) => 0,
                (true, 4) | (false, 0..=4) => 3,
                (_, op) => op.max(6),
            };
            match op {
                0 => receivers.push((feed.subscribe().0, sent)),
                3 if !receivers.is_empty() => {
                    let i = rng.random_range(0..receivers.len());
                    receivers.swap_remove(i);
                }
                6 => {
                    feed.send(sent, None);
                    sent += 1;
                }
                _ if !receivers.is_empty() => {
                    let i = rng.random_range(0..receivers.len());
                    let (r, next) = &mut receivers[i];
                    while *next < sent {
                        assert_eq!(r.recv().await, Ok(*next), "seed {seed}");
                        *next += 1;
                    }
                }
                _ => {}
            }
        }
        // One more item: every receiver reads at least once, and moves down if it should.
        feed.send(sent, None);
        sent += 1;
        for (r, next) in &mut receivers {
            while *next < sent {
                assert_eq!(r.recv().await, Ok(*next), "seed {seed}");
                *next += 1;
            }
        }
        let (len, _) = slot_list(&feed);
        assert!(len <= 2 * receivers.len(), "seed {seed}: {len} slots");
        let moves = feed.lock().moves;
        assert!(
            moves > 100,
            "seed {seed}: receivers moved down {moves} times"
        );
        println!("{moves} moves, {} receivers left", receivers.len());
        drop(receivers);
        assert_eq!(slot_list(&feed), (0, 0));
        assert_eq!(feed.held(), 0);
    }

    #[tokio::test]
    async fn memory_goes_back_after_a_burst() {
        let feed = Feed::new(10_000);
        let mut r = feed.subscribe().0;
        for i in 0..5000 {
            feed.send(i, None);
        }
        for i in 0..5000 {
            assert_eq!(r.recv().await, Ok(i));
        }
        assert!(feed.lock().items.capacity() <= 16, "shrunk back");
    }
}

#[cfg(test)]
mod horizon_tests {
    use super::*;

    #[tokio::test]
    async fn the_horizon_moves_with_the_items_and_subscribers_see_it() {
        let feed = Feed::new(4);
        let (_r, h) = feed.subscribe();
        assert_eq!(h, None);
        feed.set_horizon(StreamId::new(5, 0));
        assert_eq!(feed.started().await, Some(StreamId::new(5, 0)));
        feed.send("e", Some(StreamId::new(6, 0)));
        let (_late, h) = feed.subscribe();
        assert_eq!(
            h,
            Some(StreamId::new(6, 0)),
            "a late subscriber's horizon covers e"
        );
    }

    #[tokio::test]
    async fn waiting_for_the_start_ends_when_the_feed_closes() {
        let feed: Arc<Feed<u8>> = Feed::new(4);
        let waiting = {
            let feed = feed.clone();
            tokio::spawn(async move { feed.started().await })
        };
        tokio::task::yield_now().await;
        feed.close();
        assert_eq!(waiting.await.unwrap(), None);
    }
}
