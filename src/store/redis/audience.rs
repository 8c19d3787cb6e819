//! Which topics someone listens to: whether any node is subscribed to a topic's live channel.
//!
//! An announcement is for the nodes that serve the topic. Where none does, it is work for no
//! one: on one Redis, announcing an event from the append script cost Redis more than appending
//! it. So the committer appends the events of topics that nobody is known to listen to with
//! plain `XADD`s and announces nothing (see `commit`).
//!
//! What is known here is a few seconds old, and that is safe either way. A node that
//! subscribed since is told of each such `XADD` by its keyspace notification, as of anyone's
//! direct `XADD`, and reads the stream: it loses nothing, it only reads what an announcement
//! would have brought. A topic whose last listener left since is announced to no one a little
//! longer. Only where Redis notifies every `XADD` (on every master in a cluster:
//! `Link::keyspace`) is a topic ever appended without its announcement; a topic not known yet
//! is announced, and asked about. In a cluster, while a topic's slot moves to another master, a
//! listener's keyspace subscription stays on the old one until the node follows the move; the
//! catch-up that follows it (see `check_health`) reads what came meanwhile, as for a direct
//! `XADD`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tracing::debug;

use super::connection::Commands;
use super::keys::{Keys, LIVE};
use super::reply::{as_array, as_bytes};

/// How long what a check found is taken as it is; after that the topic is asked about again,
/// and what was found still holds until `2 * FRESH` while the answer comes.
const FRESH: Duration = Duration::from_secs(2);
/// Most topics remembered. Past it, what has gone stale is forgotten; topics that still do not
/// fit are treated as listened to (announced), as before they were ever asked about.
const MAX_KNOWN: usize = 65_536;
/// Most channels one `PUBSUB NUMSUB` asks about: Redis answers it in one go, holding others.
const MAX_ASKED: usize = 1000;

/// What the committer knows of each topic's listeners, and which topics to ask about.
#[derive(Default)]
pub(super) struct Audience {
    state: Mutex<State>,
    /// Whether a check is running: one at a time, since one asks about every due topic.
    checking: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Per topic: when it was found to have listeners or none, and which. foldhash: seeded per
    /// process like std's, and faster on short names, looked up once per run published.
    known: foldhash::HashMap<String, Known>,
    /// Topics to ask about, each once.
    due: Vec<String>,
}

struct Known {
    /// When a check last answered; `None` until one has.
    checked: Option<Instant>,
    listened: bool,
    /// Whether it is in `due` already.
    due: bool,
}

/// The audience, locked for one call's look-ups.
pub(super) struct Lookup<'a> {
    state: MutexGuard<'a, State>,
    now: Instant,
}

impl Lookup<'_> {
    /// Whether some topic waits to be asked about.
    pub(super) fn any_due(&self) -> bool {
        !self.state.due.is_empty()
    }

    /// Whether no node listened to `topic` when last asked, lately; a topic not known or not
    /// known lately counts as listened to, and is asked about.
    pub(super) fn unheard(&mut self, topic: &str) -> bool {
        let now = self.now;
        let state = &mut *self.state;
        match state.known.get_mut(topic) {
            Some(known) => {
                let age = known.checked.map(|c| now.saturating_duration_since(c));
                // Not answered yet (a check failed), or answered a while ago: asked (again).
                if age.is_none_or(|age| age >= FRESH) && !known.due {
                    known.due = true;
                    state.due.push(topic.to_owned());
                }
                !known.listened && age.is_some_and(|age| age < 2 * FRESH)
            }
            None => {
                if state.known.len() >= MAX_KNOWN {
                    state.known.retain(|_, k| {
                        k.checked
                            .is_some_and(|c| now.saturating_duration_since(c) < 2 * FRESH)
                    });
                }
                if state.known.len() < MAX_KNOWN && state.due.len() < MAX_KNOWN {
                    // Until it is answered, the topic is one whose listeners are not known.
                    state.known.insert(
                        topic.to_owned(),
                        Known {
                            checked: None,
                            listened: true,
                            due: true,
                        },
                    );
                    state.due.push(topic.to_owned());
                }
                false
            }
        }
    }
}

impl Audience {
    pub(super) fn lookup(&self) -> Lookup<'_> {
        Lookup {
            // A panic while holding the lock leaves nothing half-done worth refusing over.
            state: self.state.lock().unwrap_or_else(|e| e.into_inner()),
            now: Instant::now(),
        }
    }

    /// Asks Redis about the due topics, in the background, unless a check is running already.
    pub(super) fn check(self: &Arc<Self>, conn: &Commands, keys: &Keys) {
        if self.checking.swap(true, Ordering::AcqRel) {
            return;
        }
        let (audience, conn, keys) = (self.clone(), conn.clone(), keys.clone());
        tokio::spawn(async move {
            audience.ask(conn, &keys).await;
            audience.checking.store(false, Ordering::Release);
        });
    }

    /// Asks about due topics, up to `MAX_ASKED` a command, until none is due or Redis fails.
    async fn ask(&self, mut conn: Commands, keys: &Keys) {
        loop {
            let topics: Vec<String> = {
                let mut lookup = self.lookup();
                let n = lookup.state.due.len().min(MAX_ASKED);
                lookup.state.due.drain(..n).collect()
            };
            if topics.is_empty() {
                return;
            }
            // In a cluster live channels are sharded: the client asks every node and adds up
            // their answers (only the shard owning a channel has its subscribers).
            let mut cmd = redis::cmd("PUBSUB");
            cmd.arg(if conn.is_cluster() {
                "SHARDNUMSUB"
            } else {
                "NUMSUB"
            });
            let channels: Vec<String> = topics
                .iter()
                .map(|topic| {
                    let mut name = String::new();
                    keys.write_name(&mut name, topic, LIVE);
                    name
                })
                .collect();
            cmd.arg(&channels);
            let counts = match cmd.query_async::<redis::Value>(&mut conn).await {
                Ok(reply) => listener_counts(&reply, &channels),
                Err(e) => {
                    debug!(error = %e, "cannot ask which topics have listeners");
                    None
                }
            };
            let mut lookup = self.lookup();
            let now = lookup.now;
            for (i, topic) in topics.iter().enumerate() {
                if let Some(known) = lookup.state.known.get_mut(topic.as_str()) {
                    known.due = false;
                    if let Some(counts) = &counts {
                        known.checked = Some(now);
                        known.listened = counts[i] > 0;
                    }
                }
            }
            if counts.is_none() {
                return;
            }
        }
    }
}

/// The answer of `PUBSUB NUMSUB` (`[channel, count, …]`, in the order asked) or of the cluster
/// client's `SHARDNUMSUB` (the nodes' counts added up, as a map in no order), as the counts of
/// `channels` in order; `None` if some channel is not answered for.
fn listener_counts(reply: &redis::Value, channels: &[String]) -> Option<Vec<i64>> {
    let count = |v: &redis::Value| match v {
        redis::Value::Int(n) => Some(*n),
        other => std::str::from_utf8(as_bytes(other).ok()?)
            .ok()?
            .parse()
            .ok(),
    };
    if let redis::Value::Map(pairs) = reply {
        let counts: foldhash::HashMap<&[u8], i64> = pairs
            .iter()
            .filter_map(|(channel, n)| Some((as_bytes(channel).ok()?, count(n)?)))
            .collect();
        return channels
            .iter()
            .map(|c| counts.get(c.as_bytes()).copied())
            .collect();
    }
    let items = as_array(reply).ok()?;
    if items.len() != 2 * channels.len() {
        return None;
    }
    items
        .chunks(2)
        .zip(channels)
        .map(|(pair, channel)| {
            (as_bytes(&pair[0]).ok()? == channel.as_bytes())
                .then(|| count(&pair[1]))
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(audience: &Audience, topic: &str, listened: bool) {
        let mut lookup = audience.lookup();
        let now = lookup.now;
        lookup.state.due.retain(|t| t != topic);
        let known = lookup.state.known.get_mut(topic).expect("asked about");
        (known.checked, known.listened, known.due) = (Some(now), listened, false);
    }

    #[tokio::test(start_paused = true)]
    async fn a_topic_is_unheard_only_while_a_recent_check_found_no_listener() {
        let audience = Audience::default();
        assert!(!audience.lookup().unheard("t"), "not known: announced");
        assert_eq!(audience.lookup().state.due, vec!["t".to_owned()]);
        assert!(!audience.lookup().unheard("t"), "still not known");
        assert_eq!(audience.lookup().state.due.len(), 1, "asked about once");

        answered(&audience, "t", false);
        assert!(audience.lookup().unheard("t"));
        assert!(audience.lookup().state.due.is_empty());

        tokio::time::advance(FRESH).await;
        assert!(audience.lookup().unheard("t"), "holds while asked again");
        assert_eq!(audience.lookup().state.due, vec!["t".to_owned()]);
        tokio::time::advance(FRESH).await;
        assert!(!audience.lookup().unheard("t"), "too old to go by");

        answered(&audience, "t", true);
        assert!(!audience.lookup().unheard("t"), "listened to");
    }

    #[tokio::test(start_paused = true)]
    async fn a_topic_whose_check_failed_is_asked_about_again() {
        let audience = Audience::default();
        assert!(!audience.lookup().unheard("t"));
        {
            // What a failed check leaves: the topic no longer due, still not known.
            let mut lookup = audience.lookup();
            lookup.state.due.clear();
            lookup.state.known.get_mut("t").expect("asked about").due = false;
        }
        assert!(!audience.lookup().unheard("t"));
        assert_eq!(audience.lookup().state.due, vec!["t".to_owned()]);
    }

    #[test]
    fn counts_are_read_for_the_channels_asked() {
        use redis::Value::{Array, BulkString, Int, Map};
        let asked = ["a".to_owned(), "b".to_owned()];
        let reply = Array(vec![
            BulkString(b"a".to_vec()),
            Int(0),
            BulkString(b"b".to_vec()),
            Int(2),
        ]);
        assert_eq!(listener_counts(&reply, &asked), Some(vec![0, 2]));
        let three = [asked[0].clone(), asked[1].clone(), "c".to_owned()];
        assert_eq!(listener_counts(&reply, &three), None, "a short answer");
        let swapped = [asked[1].clone(), asked[0].clone()];
        assert_eq!(listener_counts(&reply, &swapped), None, "another channel's");
        assert_eq!(listener_counts(&Int(1), &asked[..1]), None);

        // A cluster's answer: added up over the nodes, in no order.
        let combined = Map(vec![
            (BulkString(b"b".to_vec()), Int(1)),
            (BulkString(b"a".to_vec()), Int(0)),
        ]);
        assert_eq!(listener_counts(&combined, &asked), Some(vec![0, 1]));
        assert_eq!(listener_counts(&combined, &three), None, "c not answered");
    }
}
