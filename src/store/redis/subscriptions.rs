//! The subscription side of the Redis store: which topics are subscribed, keeping them subscribed
//! across reconnects, failovers and slot moves, and turning pushes into hub signals.
//!
//! Three tasks share the work. [`own_subscriptions`] alone subscribes and unsubscribes, in the
//! order asked. [`check_health`] pings the subscription connection and, in a cluster, watches the
//! slot assignment; after an outage or a topology change it has every watched topic subscribed
//! again and the hub catch every topic up from its stream. [`translate_pushes`] reads what Redis
//! pushes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use redis::{PushInfo, PushKind};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::connection::{enable_keyspace_notifications, ping, Commands};
use super::keys::{Channel, Keys};
use super::reply::as_bytes;
use crate::event::{Event, StreamId};
use crate::shutdown::Shutdown;
use crate::store::{Notice, Signal, StoreError};

/// How long an unmatched `xadd` notification waits for the gateway's own announcement that
/// usually follows it in the same reply, before it is treated as a direct `XADD`.
const DIRECT_XADD_SETTLE: Duration = Duration::from_millis(5);

/// Channels per subscribe command on one Redis.
const SUBSCRIBE_CHUNK: usize = 500;

/// Topics subscribed at once in a cluster, where each topic is its own command (its channels
/// live in its slot, possibly on any node).
const CLUSTER_SUBSCRIBE_CONCURRENCY: usize = 64;

pub(super) enum WatchCommand {
    Watch(String, oneshot::Sender<()>),
    Unwatch(String),
    /// The subscription connection came back or the cluster's topology changed: subscribe again
    /// to everything watched, then ask the hub to catch up. Answers whether every subscription
    /// was made.
    Restore(oneshot::Sender<bool>),
    /// Redis dropped the subscription to a topic's live channel (its slot moved to another
    /// node): subscribe again, where it lives now, and read the topic.
    Lost(String),
}

/// Whether the pushes since the subscription connection last dropped have a hole that the hub
/// has not yet been told to read past.
///
/// An announcement that counts on notifications (`+`) says only that nothing was appended
/// between it and what the connection carried before; across a drop, what came before is
/// unknown. So from a drop until a restore has subscribed again and asked the hub to read every
/// topic (whose reads then come before any later announcement), no such announcement is taken.
#[derive(Default)]
pub(super) struct Holes {
    /// Drops seen by [`translate_pushes`], and failed pings seen by [`check_health`].
    seen: AtomicU64,
    /// Of those, the drops a completed restore covers.
    covered: AtomicU64,
}

impl Holes {
    fn opened(&self) {
        self.seen.fetch_add(1, Ordering::AcqRel);
    }

    /// Before a restore subscribes: what it will cover once the hub was asked to read.
    fn restoring(&self) -> u64 {
        self.seen.load(Ordering::Acquire)
    }

    /// After the restore asked the hub to read every topic.
    fn covered(&self, upto: u64) {
        self.covered.fetch_max(upto, Ordering::AcqRel);
    }

    fn none_open(&self) -> bool {
        self.covered.load(Ordering::Acquire) == self.seen.load(Ordering::Acquire)
    }
}

/// Subscribes and unsubscribes in the order asked, counting watches per topic, so a topic
/// released and re-acquired at once ends up subscribed.
pub(super) async fn own_subscriptions(
    mut commands: mpsc::UnboundedReceiver<WatchCommand>,
    mut pubsub: Commands,
    keys: Keys,
    signals: mpsc::UnboundedSender<Signal>,
    holes: Arc<Holes>,
    shutdown: Shutdown,
) {
    let mut watched: HashMap<String, usize> = HashMap::new();
    loop {
        let command = tokio::select! {
            c = commands.recv() => match c { Some(c) => c, None => return },
            _ = shutdown.wait() => return,
        };
        match command {
            WatchCommand::Watch(topic, ack) => {
                let count = watched.entry(topic.clone()).or_insert(0);
                *count += 1;
                if *count == 1 {
                    if let Err(e) = subscribe(&mut pubsub, &keys, &[topic.as_str()]).await {
                        // Restore subscribes again once the connection is back.
                        warn!(topic, error = %e, "subscribing failed");
                    }
                }
                let _ = ack.send(());
            }
            WatchCommand::Unwatch(topic) => {
                if let Some(count) = watched.get_mut(&topic) {
                    *count -= 1;
                    if *count == 0 {
                        watched.remove(&topic);
                        let live = [keys.live_channel(&topic)];
                        let keyspace = [keys.keyspace_channel(&topic)];
                        if let Err(e) = pubsub.set_subscribed(false, &live, &keyspace).await {
                            warn!(topic, error = %e, "unsubscribing failed");
                        }
                    }
                }
            }
            WatchCommand::Restore(done) => {
                let covering = holes.restoring();
                let topics: Vec<&str> = watched.keys().map(String::as_str).collect();
                let result = subscribe(&mut pubsub, &keys, &topics).await;
                if let Err(e) = &result {
                    warn!(error = %e, "resubscribing failed; trying again");
                }
                info!(
                    topics = watched.len(),
                    "redis subscriptions restored; catching up"
                );
                let _ = signals.send(Signal::CatchUpAll);
                if result.is_ok() {
                    holes.covered(covering);
                }
                let _ = done.send(result.is_ok());
            }
            WatchCommand::Lost(topic) => {
                if watched.contains_key(&topic) {
                    debug!(topic, "live subscription moved with its slot");
                    if let Err(e) = subscribe(&mut pubsub, &keys, &[topic.as_str()]).await {
                        warn!(topic, error = %e, "subscribing again failed");
                    }
                    let _ = signals.send(Signal::Poke { topic });
                }
            }
        }
    }
}

/// Subscribes to these topics' channels: in batches on one Redis, topic by topic (a few at a
/// time) in a cluster.
async fn subscribe(pubsub: &mut Commands, keys: &Keys, topics: &[&str]) -> Result<(), StoreError> {
    if !pubsub.is_cluster() {
        for chunk in topics.chunks(SUBSCRIBE_CHUNK) {
            let live: Vec<String> = chunk.iter().map(|t| keys.live_channel(t)).collect();
            let keyspace: Vec<String> = chunk.iter().map(|t| keys.keyspace_channel(t)).collect();
            pubsub.set_subscribed(true, &live, &keyspace).await?;
        }
        return Ok(());
    }
    // The futures are made first: a closure in the stream trips the compiler's lifetime
    // inference for `Send` futures.
    let subscriptions: Vec<_> = topics
        .iter()
        .map(|topic| subscribe_one(pubsub.clone(), keys, topic))
        .collect();
    let results: Vec<Result<(), StoreError>> = stream::iter(subscriptions)
        .buffer_unordered(CLUSTER_SUBSCRIBE_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().find(Result::is_err).unwrap_or(Ok(()))
}

async fn subscribe_one(mut pubsub: Commands, keys: &Keys, topic: &str) -> Result<(), StoreError> {
    let live = [keys.live_channel(topic)];
    let keyspace = [keys.keyspace_channel(topic)];
    pubsub.set_subscribed(true, &live, &keyspace).await
}

/// What [`check_health`] needs.
pub(super) struct Health {
    pub(super) pubsub: Commands,
    pub(super) interval: Duration,
    pub(super) timeout: Duration,
    pub(super) healthy: Arc<AtomicBool>,
    pub(super) watch_tx: mpsc::UnboundedSender<WatchCommand>,
    /// The link's `notified`: checked again whenever the connection comes back.
    pub(super) notified: Arc<AtomicBool>,
    /// The link's `keyspace`: checked again whenever the connection comes back or the
    /// cluster's topology changes.
    pub(super) keyspace: Arc<AtomicBool>,
    /// A failed ping may mean pushes were lost, as a drop does.
    pub(super) holes: Arc<Holes>,
    pub(super) shutdown: Shutdown,
}

/// Pings the subscription connection and, in a cluster, compares the slot assignment. A failed
/// ping marks the connection unhealthy (and makes the driver reconnect). The first success
/// after that, or a changed assignment (failover, reshard), restores subscriptions and triggers
/// a catch-up; a restore that did not fully succeed is tried again on the next tick.
pub(super) async fn check_health(h: Health) {
    let Health {
        mut pubsub,
        interval,
        timeout,
        healthy,
        watch_tx,
        notified,
        keyspace,
        holes,
        shutdown,
    } = h;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut topology: Option<String> = None;
    let mut restore_pending = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait() => return,
        }
        let ok = ping(&mut pubsub, timeout).await.is_ok();
        let was = healthy.swap(ok, Ordering::AcqRel);
        if !ok {
            holes.opened();
            if was {
                warn!("redis subscription connection is unhealthy");
            }
            continue;
        }
        let mut changed = false;
        match pubsub.topology(timeout).await {
            Ok(Some(now)) => {
                if topology.as_ref().is_some_and(|before| *before != now) {
                    info!("redis cluster topology changed; following it");
                    changed = true;
                }
                topology = Some(now);
            }
            Ok(None) => {}
            Err(e) => debug!(error = %e, "cannot read the cluster topology"),
        }
        if !was || changed {
            // A Redis that restarted may have lost the setting, and nodes that joined a cluster
            // lack it; until it is back, announcements that count on notifications are read
            // from the stream instead (see `translate_pushes`), and every append is announced.
            let on = enable_keyspace_notifications(&mut pubsub).await;
            notified.store(on && !pubsub.is_cluster(), Ordering::Release);
            keyspace.store(on, Ordering::Release);
        }
        if !was || changed || restore_pending {
            let (done_tx, done_rx) = oneshot::channel();
            if watch_tx.send(WatchCommand::Restore(done_tx)).is_err() {
                return;
            }
            restore_pending = !done_rx.await.unwrap_or(false);
        }
    }
}

/// Turns pushes from the subscription connection into hub signals.
///
/// The script's XADDs make Redis send an `xadd` keyspace notification each right before the
/// script's own announcement, in the same reply. An `xadd` notification not followed by the
/// announcement of the same topic was someone else's `XADD`: the topic is poked so the hub reads
/// it. An announcement that does not name its previous entry (`+`, see `append.lua`) is taken as
/// following what came before only when exactly as many notifications came right before it as
/// it announces entries; otherwise the topic is read.
pub(super) async fn translate_pushes(
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    keys: Keys,
    signals: mpsc::UnboundedSender<Signal>,
    watch_tx: mpsc::UnboundedSender<WatchCommand>,
    healthy: Arc<AtomicBool>,
    holes: Arc<Holes>,
) {
    // The topic whose `xadd` notifications came last, and how many came in a row.
    let mut pending: Option<(String, usize)> = None;
    loop {
        let push = if pending.is_some() {
            match tokio::time::timeout(DIRECT_XADD_SETTLE, pushes.recv()).await {
                Ok(p) => p,
                Err(_) => {
                    if let Some((topic, _)) = pending.take() {
                        let _ = signals.send(Signal::Poke { topic });
                    }
                    continue;
                }
            }
        } else {
            pushes.recv().await
        };
        let Some(push) = push else { return };
        match push.kind {
            PushKind::Disconnection => {
                // Anything announced from now until the connection is back is lost; the health
                // check restores subscriptions and triggers the catch-up.
                healthy.store(false, Ordering::Release);
                holes.opened();
                if let Some((topic, _)) = pending.take() {
                    let _ = signals.send(Signal::Poke { topic });
                }
                warn!("redis subscription connection dropped");
            }
            PushKind::SUnsubscribe => {
                // Redis drops sharded subscriptions of a slot that moved away; ours (unwatch)
                // arrive here too and are told apart by whether the topic is still watched.
                let channel = push.data.first().and_then(|c| as_bytes(c).ok());
                if let Some(channel) = channel {
                    let channel = String::from_utf8_lossy(channel);
                    if let Some(Channel::Live(topic)) = keys.parse_channel(&channel) {
                        let _ = watch_tx.send(WatchCommand::Lost(topic.to_owned()));
                    }
                }
            }
            PushKind::Message | PushKind::SMessage => {
                let (Some(channel), Some(payload)) = (push.data.first(), push.data.get(1)) else {
                    continue;
                };
                let (Ok(channel), Ok(payload)) = (as_bytes(channel), as_bytes(payload)) else {
                    continue;
                };
                let channel = String::from_utf8_lossy(channel);
                match keys.parse_channel(&channel) {
                    Some(Channel::Keyspace(topic)) => match payload {
                        // A run of several events brings one per event, then its one
                        // announcement.
                        b"xadd" => match &mut pending {
                            Some((last, count)) if last == topic => *count += 1,
                            _ => {
                                if let Some((previous, _)) = pending.replace((topic.to_owned(), 1))
                                {
                                    let _ = signals.send(Signal::Poke { topic: previous });
                                }
                            }
                        },
                        // Trimming needs no action: readers find out through the gap rule.
                        b"xtrim" => {}
                        // Deleted, renamed, expired, XSETID…: let the hub read what is there.
                        _ => {
                            let _ = signals.send(Signal::Poke {
                                topic: topic.to_owned(),
                            });
                        }
                    },
                    Some(Channel::Live(topic)) if payload.starts_with(REMOVED) => {
                        match StreamId::parse_ascii(&payload[REMOVED.len()..]) {
                            Ok(upto) => {
                                let _ = signals.send(Signal::Removed {
                                    topic: topic.to_owned(),
                                    upto,
                                });
                            }
                            Err(_) => {
                                let _ = signals.send(Signal::Poke {
                                    topic: topic.to_owned(),
                                });
                            }
                        }
                    }
                    Some(Channel::Live(topic)) if payload.starts_with(b"!\n") => {
                        if let Some(notice) = read_notice(topic, &payload[2..]) {
                            let _ = signals.send(Signal::Notice(notice));
                        }
                    }
                    Some(Channel::Live(topic)) => {
                        let notified = match pending.take() {
                            Some((last, count)) if last == topic => count,
                            Some((previous, _)) => {
                                let _ = signals.send(Signal::Poke { topic: previous });
                                0
                            }
                            None => 0,
                        };
                        // No announcement has 0 entries: while a hole is open, none that counts
                        // on notifications is taken.
                        let notified = if holes.none_open() { notified } else { 0 };
                        let readable = read_announcement(payload, notified, |entry| {
                            let _ = signals.send(match entry {
                                Announced::Event(prev, event) => Signal::Appended {
                                    topic: topic.to_owned(),
                                    prev,
                                    event,
                                },
                                Announced::Id(id) => Signal::AppendedId {
                                    topic: topic.to_owned(),
                                    id,
                                },
                            });
                        });
                        if !readable {
                            debug!(
                                topic,
                                notified,
                                "unreadable or unconfirmed announcement; reading the stream"
                            );
                            let _ = signals.send(Signal::Poke {
                                topic: topic.to_owned(),
                            });
                        }
                    }
                    None => {}
                }
            }
            _ => {}
        }
    }
}

/// How `delete.lua` starts its message on a topic's live channel, before the highest id the
/// topic had. Not an id, so a node of an older version reads the stream instead.
const REMOVED: &[u8] = b"#removed\n";

/// A notice's `<type>\n<data>` (after its leading `!\n`); `None` without a type.
fn read_notice(topic: &str, rest: &[u8]) -> Option<Notice> {
    let end = rest.iter().position(|&b| b == b'\n')?;
    let event = std::str::from_utf8(&rest[..end]).ok()?;
    (!event.is_empty()).then(|| Notice {
        topic: topic.to_owned(),
        event: event.to_owned(),
        data: String::from_utf8_lossy(&rest[end + 1..]).into_owned(),
    })
}

/// Largest payload announced with its event; larger ones are announced by id.
pub(super) const ANNOUNCE_INLINE_MAX: usize = 16 * 1024;
/// Most payload bytes one append announces with their events; past it, by id. A batch of a
/// thousand 60 KB events then announces ~300 KB instead of 60 MB to every node.
pub(super) const ANNOUNCE_CALL_BUDGET: usize = 256 * 1024;

/// One entry of an announcement.
enum Announced {
    /// The event, and the entry before it (`None`: whatever came before, as the notifications
    /// showed).
    Event(Option<StreamId>, Event),
    /// An entry to read from the stream (announced without its payload).
    Id(StreamId),
}

/// Reads an announcement (formats in `append.lua`) and gives its entries to `each`, in order:
/// `<prev>\n<id>\n<type>\n<data>` or `<prev>\n<id>` for a run of one event;
/// `*\n<prev>\n<count>\n<id>\n…<id>\n` then `<type>\n<bytes>\n<data>` per event, or nothing
/// (every entry to be read from the stream), for a run of several. `<prev>` is `+` when the
/// announcement counts on keyspace notifications: it is taken only if `notified` (the `xadd`
/// notifications of its topic that came right before it) equals its entries. False if some of
/// it cannot be read or taken; the entries before that part were given.
fn read_announcement(payload: &[u8], notified: usize, mut each: impl FnMut(Announced)) -> bool {
    read_entries(payload, notified, &mut each).is_some()
}

/// [`read_announcement`]'s work; `None` where the payload stops making sense.
fn read_entries(payload: &[u8], notified: usize, each: &mut impl FnMut(Announced)) -> Option<()> {
    /// The text up to the next LF, and what follows it.
    fn line(rest: &[u8]) -> Option<(&[u8], &[u8])> {
        let end = rest.iter().position(|&b| b == b'\n')?;
        Some((&rest[..end], &rest[end + 1..]))
    }
    fn number(text: &[u8]) -> Option<usize> {
        std::str::from_utf8(text).ok()?.parse().ok()
    }
    fn id(text: &[u8]) -> Option<StreamId> {
        StreamId::parse_ascii(text).ok()
    }
    // The entry before the first announced: named, or (`+`) vouched for by `notified`.
    let prev = |text: &[u8], count: usize| -> Option<Option<StreamId>> {
        if text == b"+" {
            (notified == count).then_some(None)
        } else {
            id(text).map(Some)
        }
    };
    fn event(id: StreamId, ty: &[u8], data: &[u8]) -> Event {
        let event = (!ty.is_empty()).then(|| String::from_utf8_lossy(ty).into_owned());
        let data = String::from_utf8_lossy(data).into_owned();
        Event { id, event, data }
    }
    let (first, rest) = line(payload)?;
    if first != b"*" {
        let prev = prev(first, 1)?;
        let Some((entry, rest)) = line(rest) else {
            each(Announced::Id(id(rest)?));
            return Some(());
        };
        let entry = id(entry)?;
        let (ty, data) = line(rest)?;
        each(Announced::Event(prev, event(entry, ty, data)));
        return Some(());
    }
    let (before, rest) = line(rest)?;
    let (count, mut ids) = line(rest)?;
    let count = number(count)?;
    let mut prev = prev(before, count)?;
    // The events follow the ids: find where they start before giving any entry.
    let mut events = ids;
    for _ in 0..count {
        events = line(events)?.1;
    }
    for _ in 0..count {
        let (entry, rest) = line(ids)?;
        ids = rest;
        let entry = id(entry)?;
        if events.is_empty() {
            each(Announced::Id(entry));
        } else {
            let (ty, rest) = line(events)?;
            let (len, rest) = line(rest)?;
            let data = rest.get(..number(len)?)?;
            events = &rest[data.len()..];
            each(Announced::Event(prev, event(entry, ty, data)));
        }
        prev = Some(entry);
    }
    events.is_empty().then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entries an announcement gives, and whether all of it was readable.
    fn read(payload: &[u8]) -> (Vec<Announced>, bool) {
        read_notified(payload, 0)
    }

    /// The same, after `notified` notifications of its topic.
    fn read_notified(payload: &[u8], notified: usize) -> (Vec<Announced>, bool) {
        let mut entries = Vec::new();
        let readable = read_announcement(payload, notified, |e| entries.push(e));
        (entries, readable)
    }

    #[test]
    fn notices_are_read_with_their_type_and_data() {
        let notice = read_notice("t", b"ssegate.join\n{\"a\":\n1}").expect("a notice");
        assert_eq!(
            (
                notice.topic.as_str(),
                notice.event.as_str(),
                notice.data.as_str()
            ),
            ("t", "ssegate.join", "{\"a\":\n1}")
        );
        assert!(read_notice("t", b"no type line").is_none());
        assert!(read_notice("t", b"\ndata").is_none());
        // A notice is never taken for an announcement.
        assert!(!read(b"!\nssegate.join\n{}").1);
    }

    #[test]
    fn announcements_keep_newlines_in_data() {
        let (entries, true) = read(b"1-0\n2-0\nupd\nline1\nline2") else {
            panic!("readable");
        };
        let [Announced::Event(prev, e)] = &entries[..] else {
            panic!("one event");
        };
        assert_eq!(*prev, Some(StreamId::new(1, 0)));
        assert_eq!(e.id, StreamId::new(2, 0));
        assert_eq!(e.event.as_deref(), Some("upd"));
        assert_eq!(e.data, "line1\nline2");
        let (entries, true) = read(b"0-0\n2-0\n\n") else {
            panic!("readable");
        };
        let [Announced::Event(_, e)] = &entries[..] else {
            panic!("one event");
        };
        assert_eq!(e.event, None);
        assert_eq!(e.data, "");
        let (entries, true) = read(b"1-0\n2-0") else {
            panic!("readable");
        };
        assert!(matches!(&entries[..], [Announced::Id(id)] if *id == StreamId::new(2, 0)));
        assert!(!read(b"garbage").1);
        assert!(!read(b"1-0\n2-0\nupd").1);
    }

    #[test]
    fn a_request_of_several_events_is_read_in_order_with_each_predecessor() {
        let payload = b"*\n1-0\n3\n2-0\n3-0\n4-0\n\n5\na\nb\ncupd\n0\nx\n1\n\n";
        let (entries, true) = read(payload) else {
            panic!("readable");
        };
        let [Announced::Event(p1, e1), Announced::Event(p2, e2), Announced::Event(p3, e3)] =
            &entries[..]
        else {
            panic!("three events");
        };
        assert_eq!(
            (*p1, e1.id),
            (Some(StreamId::new(1, 0)), StreamId::new(2, 0))
        );
        assert_eq!((e1.event.as_deref(), e1.data.as_str()), (None, "a\nb\nc"));
        assert_eq!(
            (*p2, e2.id),
            (Some(StreamId::new(2, 0)), StreamId::new(3, 0))
        );
        assert_eq!((e2.event.as_deref(), e2.data.as_str()), (Some("upd"), ""));
        assert_eq!(
            (*p3, e3.id),
            (Some(StreamId::new(3, 0)), StreamId::new(4, 0))
        );
        assert_eq!((e3.event.as_deref(), e3.data.as_str()), (Some("x"), "\n"));
        // Announced by id only: every entry is read from the stream.
        let (entries, true) = read(b"*\n1-0\n2\n2-0\n5-0\n") else {
            panic!("readable");
        };
        let [Announced::Id(a), Announced::Id(b)] = &entries[..] else {
            panic!("two ids");
        };
        assert_eq!((*a, *b), (StreamId::new(2, 0), StreamId::new(5, 0)));
    }

    #[test]
    fn a_cut_short_request_gives_what_it_can_and_says_the_rest_is_unreadable() {
        // The second event claims more bytes than follow.
        let (entries, readable) = read(b"*\n1-0\n2\n2-0\n3-0\n\n1\na\n9\nab");
        assert!(!readable);
        assert!(matches!(&entries[..], [Announced::Event(_, e)] if e.data == "a"));
        for bad in [
            &b"*\n"[..],
            b"*\nx\n1\n2-0\n",
            b"*\n1-0\n2\n2-0\n",
            b"*\n1-0\n1\nnope\n",
            b"*\n1-0\n1\n2-0\n\nz\nq",
            b"*\n1-0\n1\n2-0\n\n1\nab",
        ] {
            assert!(!read(bad).1, "{:?}", String::from_utf8_lossy(bad));
        }
        // A node that knows only the one-event form: the leading `*` is not an id.
        assert!("*".parse::<StreamId>().is_err());
    }

    #[test]
    fn an_announcement_without_its_previous_entry_is_taken_only_after_as_many_notifications() {
        // One event: taken after exactly one notification, with no previous entry named.
        let (entries, true) = read_notified(b"+\n2-0\nupd\nx", 1) else {
            panic!("taken");
        };
        let [Announced::Event(None, e)] = &entries[..] else {
            panic!("one event following what came before");
        };
        assert_eq!((e.id, e.data.as_str()), (StreamId::new(2, 0), "x"));
        for notified in [0, 2] {
            let (entries, taken) = read_notified(b"+\n2-0\nupd\nx", notified);
            assert!(
                !taken && entries.is_empty(),
                "after {notified} notifications"
            );
        }
        // By id only, likewise.
        assert!(read_notified(b"+\n2-0", 1).1);
        assert!(!read_notified(b"+\n2-0", 0).1);
        // Several: the first follows what came before, each next its predecessor.
        let payload = b"*\n+\n2\n2-0\n3-0\n\n1\na\n1\nb";
        let (entries, true) = read_notified(payload, 2) else {
            panic!("taken");
        };
        let [Announced::Event(None, a), Announced::Event(Some(p), b)] = &entries[..] else {
            panic!("two events");
        };
        assert_eq!(
            (a.id, *p, b.id),
            (StreamId::new(2, 0), a.id, StreamId::new(3, 0))
        );
        for notified in [0, 1, 3] {
            let (entries, taken) = read_notified(payload, notified);
            assert!(
                !taken && entries.is_empty(),
                "after {notified} notifications"
            );
        }
    }

    /// A push: its kind, `keyspace:<topic>` or a topic's live channel, and its payload.
    type Push<'a> = (PushKind, &'a str, &'a [u8]);

    /// The signals `translate_pushes` makes of these pushes, in order.
    async fn signals_of(pushes: Vec<Push<'_>>) -> Vec<Signal> {
        let keys = Keys::new("ssegate:", 0);
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        let (signal_tx, mut signal_rx) = mpsc::unbounded_channel();
        let (watch_tx, _watch_rx) = mpsc::unbounded_channel();
        for (kind, channel, payload) in pushes {
            let channel = match channel.strip_prefix("keyspace:") {
                Some(topic) => keys.keyspace_channel(topic),
                None => keys.live_channel(channel),
            };
            let data = vec![
                redis::Value::BulkString(channel.into_bytes()),
                redis::Value::BulkString(payload.to_vec()),
            ];
            push_tx.send(PushInfo { kind, data }).expect("open");
        }
        let healthy = Arc::new(AtomicBool::new(true));
        let translating = tokio::spawn(translate_pushes(
            push_rx,
            keys,
            signal_tx,
            watch_tx,
            healthy,
            Arc::new(Holes::default()),
        ));
        // Time is paused: past the settling time, exactly, before the pushes end.
        tokio::time::sleep(DIRECT_XADD_SETTLE * 2).await;
        drop(push_tx);
        translating.await.expect("translated");
        let mut signals = Vec::new();
        while let Ok(signal) = signal_rx.try_recv() {
            signals.push(signal);
        }
        signals
    }

    /// A signal as a short text: `a t 2-0 after -` (appended to t, after what came before),
    /// `a t 2-0 after 1-0`, `poke t`.
    fn describe(signal: &Signal) -> String {
        match signal {
            Signal::Appended { topic, prev, event } => format!(
                "a {topic} {} after {}",
                event.id,
                prev.map_or("-".to_owned(), |p| p.to_string())
            ),
            Signal::AppendedId { topic, id } => format!("id {topic} {id}"),
            Signal::Poke { topic } => format!("poke {topic}"),
            other => format!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn notifications_are_counted_per_topic_against_the_announcement_after_them() {
        use PushKind::Message as M;
        let xadd: &[u8] = b"xadd";
        let cases: Vec<(Vec<Push>, Vec<&str>)> = vec![
            // A run of one and a run of two, each right after its own notifications.
            (
                vec![
                    (M, "keyspace:t", xadd),
                    (M, "t", b"+\n1-1\n\nx"),
                    (M, "keyspace:t", xadd),
                    (M, "keyspace:t", xadd),
                    (M, "t", b"*\n+\n2\n1-2\n1-3\n\n1\na\n1\nb"),
                ],
                vec!["a t 1-1 after -", "a t 1-2 after -", "a t 1-3 after 1-2"],
            ),
            // A direct XADD right before a run: one notification too many, so read.
            (
                vec![
                    (M, "keyspace:t", xadd),
                    (M, "keyspace:t", xadd),
                    (M, "t", b"+\n1-2\n\nx"),
                ],
                vec!["poke t"],
            ),
            // No notification (they were switched off), or another topic's in between.
            (vec![(M, "t", b"+\n1-2\n\nx")], vec!["poke t"]),
            (
                vec![
                    (M, "keyspace:t", xadd),
                    (M, "keyspace:u", xadd),
                    (M, "t", b"+\n1-2\n\nx"),
                ],
                vec!["poke t", "poke u", "poke t"],
            ),
            // A named previous entry needs no count, as before.
            (vec![(M, "t", b"1-1\n1-2\n\nx")], vec!["a t 1-2 after 1-1"]),
            // A notification no announcement follows: a direct XADD, read.
            (vec![(M, "keyspace:t", xadd)], vec!["poke t"]),
            // After the connection dropped, what came before is unknown until a restore had
            // every topic read: the stream is read, however many notifications came.
            (
                vec![
                    (PushKind::Disconnection, "t", b""),
                    (M, "keyspace:t", xadd),
                    (M, "t", b"+\n1-2\n\nx"),
                    (M, "t", b"1-2\n1-3\n\ny"),
                ],
                vec!["poke t", "a t 1-3 after 1-2"],
            ),
        ];
        for (pushes, expected) in cases {
            let signals: Vec<String> = signals_of(pushes.clone())
                .await
                .iter()
                .map(describe)
                .collect();
            assert_eq!(
                signals,
                expected,
                "{:?}",
                pushes
                    .iter()
                    .map(|(_, c, p)| (*c, String::from_utf8_lossy(p)))
                    .collect::<Vec<_>>()
            );
        }
    }
}
