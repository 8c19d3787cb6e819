//! The subscription side of the Redis store: which topics are subscribed, keeping them subscribed
//! across reconnects, failovers and slot moves, and turning pushes into hub signals.
//!
//! Three tasks share the work. [`own_subscriptions`] alone subscribes and unsubscribes, in the
//! order asked. [`check_health`] pings the subscription connection and, in a cluster, watches the
//! slot assignment; after an outage or a topology change it has every watched topic subscribed
//! again and the hub catch every topic up from its stream. [`translate_pushes`] reads what Redis
//! pushes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Subscribes and unsubscribes in the order asked, counting watches per topic, so a topic
/// released and re-acquired at once ends up subscribed.
pub(super) async fn own_subscriptions(
    mut commands: mpsc::UnboundedReceiver<WatchCommand>,
    mut pubsub: Commands,
    keys: Keys,
    signals: mpsc::UnboundedSender<Signal>,
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
                    // Nodes that joined need keyspace notifications too.
                    enable_keyspace_notifications(&mut pubsub).await;
                }
                topology = Some(now);
            }
            Ok(None) => {}
            Err(e) => debug!(error = %e, "cannot read the cluster topology"),
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
/// The script's XADD makes Redis send an `xadd` keyspace notification right before the script's
/// own announcement, in the same reply. An `xadd` notification not followed by the announcement
/// of the same topic was someone else's `XADD`: the topic is poked so the hub reads it.
pub(super) async fn translate_pushes(
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    keys: Keys,
    signals: mpsc::UnboundedSender<Signal>,
    watch_tx: mpsc::UnboundedSender<WatchCommand>,
    healthy: Arc<AtomicBool>,
) {
    let mut unmatched_xadd: Option<String> = None;
    loop {
        let push = if unmatched_xadd.is_some() {
            match tokio::time::timeout(DIRECT_XADD_SETTLE, pushes.recv()).await {
                Ok(p) => p,
                Err(_) => {
                    if let Some(topic) = unmatched_xadd.take() {
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
                if let Some(topic) = unmatched_xadd.take() {
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
                        b"xadd" if unmatched_xadd.as_deref() == Some(topic) => {}
                        b"xadd" => {
                            if let Some(previous) = unmatched_xadd.replace(topic.to_owned()) {
                                let _ = signals.send(Signal::Poke { topic: previous });
                            }
                        }
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
                        if unmatched_xadd.as_deref() == Some(topic) {
                            unmatched_xadd = None;
                        } else if let Some(previous) = unmatched_xadd.take() {
                            let _ = signals.send(Signal::Poke { topic: previous });
                        }
                        let readable = read_announcement(payload, |entry| {
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
                            debug!(topic, "unreadable announcement; reading the stream");
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
    /// The event, and the entry before it.
    Event(StreamId, Event),
    /// An entry to read from the stream (announced without its payload).
    Id(StreamId),
}

/// Reads an announcement (formats in `append.lua`) and gives its entries to `each`, in order:
/// `<prev>\n<id>\n<type>\n<data>` or `<prev>\n<id>` for a run of one event;
/// `*\n<prev>\n<count>\n<id>\n…<id>\n` then `<type>\n<bytes>\n<data>` per event, or nothing
/// (every entry to be read from the stream), for a run of several. False if some of it cannot be
/// read; the entries before that part were given.
fn read_announcement(payload: &[u8], mut each: impl FnMut(Announced)) -> bool {
    read_entries(payload, &mut each).is_some()
}

/// [`read_announcement`]'s work; `None` where the payload stops making sense.
fn read_entries(payload: &[u8], each: &mut impl FnMut(Announced)) -> Option<()> {
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
    fn event(id: StreamId, ty: &[u8], data: &[u8]) -> Event {
        let event = (!ty.is_empty()).then(|| String::from_utf8_lossy(ty).into_owned());
        let data = String::from_utf8_lossy(data).into_owned();
        Event { id, event, data }
    }
    let (first, rest) = line(payload)?;
    if first != b"*" {
        let prev = id(first)?;
        let Some((entry, rest)) = line(rest) else {
            each(Announced::Id(id(rest)?));
            return Some(());
        };
        let entry = id(entry)?;
        let (ty, data) = line(rest)?;
        each(Announced::Event(prev, event(entry, ty, data)));
        return Some(());
    }
    let (prev, rest) = line(rest)?;
    let (count, mut ids) = line(rest)?;
    let (mut prev, count) = (id(prev)?, number(count)?);
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
        prev = entry;
    }
    events.is_empty().then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entries an announcement gives, and whether all of it was readable.
    fn read(payload: &[u8]) -> (Vec<Announced>, bool) {
        let mut entries = Vec::new();
        let readable = read_announcement(payload, |e| entries.push(e));
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
        assert_eq!(*prev, StreamId::new(1, 0));
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
        assert_eq!((*p1, e1.id), (StreamId::new(1, 0), StreamId::new(2, 0)));
        assert_eq!((e1.event.as_deref(), e1.data.as_str()), (None, "a\nb\nc"));
        assert_eq!((*p2, e2.id), (StreamId::new(2, 0), StreamId::new(3, 0)));
        assert_eq!((e2.event.as_deref(), e2.data.as_str()), (Some("upd"), ""));
        assert_eq!((*p3, e3.id), (StreamId::new(3, 0), StreamId::new(4, 0)));
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
}
