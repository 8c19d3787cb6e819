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
//! longer. Only on one Redis that notifies every `XADD` (`Link::notified`) is a topic ever
//! appended without its announcement; a topic not known yet is announced, and asked about.

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
            let mut cmd = redis::cmd("PUBSUB");
            cmd.arg("NUMSUB");
            let mut name = String::new();
            for topic in &topics {
                keys.write_name(&mut name, topic, LIVE);
                cmd.arg(name.as_str());
            }
            let counts = match cmd.query_async::<redis::Value>(&mut conn).await {
                Ok(reply) => listener_counts(&reply, topics.len()),
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

/// `PUBSUB NUMSUB`'s answer, `[channel, count, …]`, as the counts in order.
fn listener_counts(reply: &redis::Value, asked: usize) -> Option<Vec<i64>> {
    let items = as_array(reply).ok()?;
    if items.len() != 2 * asked {
        return None;
    }
    items
        .chunks(2)
        .map(|pair| match &pair[1] {
            redis::Value::Int(n) => Some(*n),
            other => std::str::from_utf8(as_bytes(other).ok()?)
                .ok()?
                .parse()
                .ok(),
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
    fn counts_are_read_in_the_order_asked() {
        use redis::Value::{Array, BulkString, Int};
        let reply = Array(vec![
            BulkString(b"a".to_vec()),
            Int(0),
            BulkString(b"b".to_vec()),
            Int(2),
        ]);
        assert_eq!(listener_counts(&reply, 2), Some(vec![0, 2]));
        assert_eq!(listener_counts(&reply, 3), None, "a short answer");
        assert_eq!(listener_counts(&Int(1), 1), None);
    }
}
