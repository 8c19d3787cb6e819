//! Ending streams on every node, and revoking tokens: `POST /v1/disconnect`.
//!
//! A disconnect names a `sub`, a `jti` or a topic; the node that takes it announces it to every
//! node as a store notice on an internal topic that each node's hub follows (like any topic's
//! live channel: through reconnects and cluster failovers), and each node ends its matching
//! streams at once:
//! - a topic's streams through the topic's feed in the hub, one item for all of them (and, for
//!   Mercure streams, through the feeds of the subscriptions with that selector): nothing is
//!   kept per stream for this;
//! - a `sub`'s or a `jti`'s streams through the filing here: each stream opened with a token
//!   that has a `sub` or a `jti` is filed, while it is open, with those claims and its `iat`.
//!   Streams without them (anonymous, open access) are not filed.
//!
//! A revoking disconnect first files the revocation in the store's list ([`REVOCATIONS`]),
//! kept until the longest a revoked token can still live, then announces it; every node adds
//! it to its copy of the list ([`Revocations`]), which every token is checked against in
//! memory. Each node also reads the whole list now and then (every `catchup_interval`) and at
//! start: a node that missed an announcement (its subscription was down) catches up, and ends
//! the streams of any revocation it had not heard of.
//!
//! A disconnect without `revoke` only ends streams: their clients reconnect, with the same
//! token, as after any drop.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::auth::revocations::{Revocation, Revocations};
use crate::auth::Access;
use crate::event::{unix_ms, Topic};
use crate::hub::{Hub, Output};
use crate::mercure::router::Router;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::store::{Notice, StoreError};

/// The store's list of revocations.
pub const REVOCATIONS: &str = "revocations";
/// The internal topic disconnects are announced on: it has a space, so no client can name it.
pub const CONTROL_TOPIC: &str = "ssegate control";
/// The notice type of a disconnect.
const DISCONNECT: &str = "disconnect";
/// Pause before following the control topic again after its session ended.
const FOLLOW_RETRY: Duration = Duration::from_millis(250);

/// Which streams a disconnect ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Selector {
    /// Every stream opened with a token of this `sub`.
    Sub(String),
    /// Every stream opened with the token of this `jti`.
    Jti(String),
    /// Every stream reading this topic.
    Topic(String),
}

/// A disconnect as announced to every node.
#[derive(Debug, Serialize, Deserialize)]
struct Announcement {
    #[serde(flatten)]
    selector: Selector,
    /// The revocation's entry in the store's list, and until when it holds (unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revocation: Option<(String, u64)>,
}

/// What a disconnect did.
#[derive(Debug)]
pub struct Outcome {
    /// Until when (unix ms) the revocation holds, when one was filed.
    pub revoked_until: Option<u64>,
    /// Streams ended on this node (the others end theirs as the announcement reaches them).
    pub ended_here: usize,
}

/// The node's open streams and its copy of the revocation list.
#[derive(Clone)]
pub struct Control {
    inner: Arc<Inner>,
}

struct Inner {
    hub: Hub,
    /// Mercure streams read the subscriptions routed here: a topic's disconnect ends those
    /// with that selector.
    mercure: Arc<Router>,
    /// The node's copy of the list, shared with the authenticator that checks every token.
    revocations: Arc<Revocations>,
    /// Open streams, by filing number.
    streams: Mutex<Streams>,
    /// How long a revocation is kept: the longest a token lives, plus the leeway.
    revocation_ttl: Duration,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Streams {
    next: u64,
    open: HashMap<u64, Filed>,
}

/// One open stream of a token with a `sub` or a `jti`, as a disconnect matches it.
struct Filed {
    sub: Option<Box<str>>,
    jti: Option<Box<str>>,
    /// For a revocation by `sub`, which covers the tokens issued until then.
    iat: Option<u64>,
    /// Ends the stream.
    end: oneshot::Sender<()>,
}

impl Filed {
    fn matches(&self, selector: &Selector, revocation: Option<&Revocation>) -> bool {
        if let Some(revocation) = revocation {
            return revocation.covers(self.jti.as_deref(), self.sub.as_deref(), self.iat);
        }
        match selector {
            Selector::Sub(sub) => self.sub.as_deref() == Some(sub.as_str()),
            Selector::Jti(jti) => self.jti.as_deref() == Some(jti.as_str()),
            // Ended through the topic's feed.
            Selector::Topic(_) => false,
        }
    }
}

/// Takes a stream out of the filing when it ends.
struct Unfile {
    inner: Weak<Inner>,
    number: u64,
}

impl Drop for Unfile {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.streams().open.remove(&self.number);
        }
    }
}

impl Control {
    /// Starts following disconnects announced by any node, and reading the revocation list
    /// every `reload` (the first read is the caller's: [`Control::load`], before serving).
    pub fn start(
        hub: Hub,
        mercure: Arc<Router>,
        revocations: Arc<Revocations>,
        revocation_ttl: Duration,
        reload: Duration,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Control {
        let inner = Arc::new(Inner {
            hub,
            mercure,
            revocations,
            streams: Mutex::new(Streams::default()),
            revocation_ttl,
            metrics,
        });
        tokio::spawn(follow(Arc::downgrade(&inner), shutdown.clone()));
        tokio::spawn(reload_now_and_then(
            Arc::downgrade(&inner),
            reload,
            shutdown,
        ));
        Control { inner }
    }

    /// Reads the store's revocation list into the node's copy now.
    pub async fn load(&self) -> Result<(), StoreError> {
        self.inner.reload().await
    }

    /// Files a stream opened with `access`, if its token has a `sub` or a `jti`. The future
    /// completes when the stream must end: at the token's `exp` (plus the leeway), or when a
    /// disconnect by `sub` or `jti` selects it (a topic's ends its sessions in the hub).
    /// Dropping it takes the stream out of the filing.
    pub fn ending(&self, access: &Access) -> Ending {
        let (ended, unfile) = match access {
            Access::Token(v) if v.sub.is_some() || v.jti.is_some() => {
                let (end, ended) = oneshot::channel();
                let filed = Filed {
                    sub: v.sub.as_deref().map(Into::into),
                    jti: v.jti.as_deref().map(Into::into),
                    iat: v.iat,
                    end,
                };
                let number = {
                    let mut streams = self.inner.streams();
                    streams.next += 1;
                    let number = streams.next;
                    streams.open.insert(number, filed);
                    number
                };
                let unfile = Unfile {
                    inner: Arc::downgrade(&self.inner),
                    number,
                };
                (Some(ended), Some(unfile))
            }
            _ => (None, None),
        };
        Ending {
            expiry: access.expires().map(|at| {
                let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                Box::pin(tokio::time::sleep(left))
            }),
            ended,
            _unfile: unfile,
        }
    }

    /// Ends the streams `selector` names on every node; with `revoke`, files the revocation
    /// first (a `jti` until `exp` when given, else for the longest a token lives; a `sub`'s
    /// tokens issued until now), so the same tokens are refused from then on everywhere.
    pub async fn disconnect(
        &self,
        selector: Selector,
        revoke: bool,
        exp: Option<u64>,
    ) -> Result<Outcome, StoreError> {
        let inner = &self.inner;
        let now = unix_ms();
        let longest = now + inner.revocation_ttl.as_millis() as u64;
        let revocation = match (&selector, revoke) {
            (_, false) | (Selector::Topic(_), true) => None,
            (Selector::Jti(jti), true) => {
                let until = exp.map_or(longest, |exp| (exp * 1000).min(longest).max(now + 1000));
                Some((Revocation::Token { jti: jti.clone() }, until))
            }
            (Selector::Sub(sub), true) => Some((
                Revocation::Subject {
                    sub: sub.clone(),
                    issued_until: now / 1000,
                },
                longest,
            )),
        };
        if let Some((revocation, until)) = &revocation {
            // Stored before anyone is told: a node reading the list finds it.
            inner
                .hub
                .store()
                .file_until(REVOCATIONS, &revocation.entry(), *until)
                .await?;
            inner.revocations.apply(revocation, *until);
            inner.metrics.revocations.inc();
            info!(entry = %revocation.entry(), until, "token revoked");
        }
        let ended_here = inner.end(&selector, revocation.as_ref().map(|(r, _)| r));
        let announcement = Announcement {
            selector,
            revocation: revocation.as_ref().map(|(r, until)| (r.entry(), *until)),
        };
        let data = serde_json::to_string(&announcement)
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        inner
            .hub
            .store()
            .notify(vec![Notice {
                topic: CONTROL_TOPIC.to_owned(),
                event: DISCONNECT.to_owned(),
                data,
            }])
            .await?;
        Ok(Outcome {
            revoked_until: revocation.map(|(_, until)| until),
            ended_here,
        })
    }

    /// Streams filed now (those of tokens with a `sub` or a `jti`).
    pub fn filed_streams(&self) -> usize {
        self.inner.streams().open.len()
    }
}

impl Inner {
    fn streams(&self) -> std::sync::MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the matching streams of this node; how many.
    fn end(&self, selector: &Selector, revocation: Option<&Revocation>) -> usize {
        if let Selector::Topic(topic) = selector {
            let count = self.hub.end_sessions(topic) + self.mercure.end_subscriptions(topic);
            self.count_ended(selector, count);
            return count;
        }
        let ended: Vec<Filed> = {
            let mut streams = self.streams();
            let numbers: Vec<u64> = streams
                .open
                .iter()
                .filter(|(_, f)| f.matches(selector, revocation))
                .map(|(n, _)| *n)
                .collect();
            numbers
                .iter()
                .filter_map(|n| streams.open.remove(n))
                .collect()
        };
        let count = ended.len();
        for filed in ended {
            let _ = filed.end.send(());
        }
        self.count_ended(selector, count);
        count
    }

    fn count_ended(&self, selector: &Selector, count: usize) {
        if count > 0 {
            self.metrics.streams_ended.inc_by(count as u64);
            debug!(?selector, count, "streams ended by a disconnect");
        }
    }

    /// An announcement from some node (this one included).
    fn announced(&self, data: &str) {
        let Ok(announcement) = serde_json::from_str::<Announcement>(data) else {
            warn!(data, "unreadable disconnect announcement");
            return;
        };
        let revocation = announcement
            .revocation
            .and_then(|(entry, until)| Some((Revocation::parse(&entry)?, until)));
        if let Some((revocation, until)) = &revocation {
            self.revocations.apply(revocation, *until);
        }
        self.end(&announcement.selector, revocation.as_ref().map(|(r, _)| r));
    }

    async fn reload(&self) -> Result<(), StoreError> {
        let entries = self.hub.store().filed(REVOCATIONS).await?;
        self.metrics.revocation_entries.set(entries.len() as i64);
        for revocation in self.revocations.merge(&entries) {
            // Heard of only now: its streams may still be open here.
            let selector = match &revocation {
                Revocation::Token { jti } => Selector::Jti(jti.clone()),
                Revocation::Subject { sub, .. } => Selector::Sub(sub.clone()),
            };
            self.end(&selector, Some(&revocation));
        }
        Ok(())
    }
}

/// Follows the control topic's notices through a session of the hub, as any reader of a topic
/// does; after the session ends (the store went away for a while), follows it again.
async fn follow(inner: Weak<Inner>, shutdown: Shutdown) {
    let topic = Topic::internal(CONTROL_TOPIC);
    loop {
        let Some(hub) = inner.upgrade().map(|i| i.hub.clone()) else {
            return;
        };
        match hub.subscribe(topic.clone(), None).await {
            Ok(mut session) => loop {
                match session.next(std::future::pending()).await {
                    Output::Notice(notice) if notice.event == DISCONNECT => {
                        let Some(inner) = inner.upgrade() else { return };
                        inner.announced(&notice.data);
                    }
                    Output::End | Output::Farewell(_) => break,
                    _ => {}
                }
            },
            Err(e) => debug!(error = %e, "cannot follow disconnects yet"),
        }
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_RETRY) => {}
            _ = shutdown.wait() => return,
        }
        // Announcements made while not following: the list has the revocations among them.
        if let Some(inner) = inner.upgrade() {
            let _ = inner.reload().await;
        }
    }
}

async fn reload_now_and_then(inner: Weak<Inner>, every: Duration, shutdown: Shutdown) {
    // Start-up has just read it (`Control::load`): the first read here is one interval on.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        let Some(inner) = inner.upgrade() else { return };
        if let Err(e) = inner.reload().await {
            debug!(error = %e, "cannot read the revocation list; next time");
        }
    }
}

/// Completes when a stream must end (see [`Control::ending`]). Every open stream holds one,
/// so it is small: a stream of a token without `exp` carries no timer, one without `sub` or
/// `jti` no filing.
pub struct Ending {
    /// The token's `exp` plus the leeway. Boxed: inline, tokio's timer would make every
    /// stream's state some 150 bytes larger, timer or not.
    expiry: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Sent, or dropped with the filing on shutdown, when a disconnect selects the stream: the
    /// stream ends either way.
    ended: Option<oneshot::Receiver<()>>,
    /// Takes the stream out of the filing when the stream ends.
    _unfile: Option<Unfile>,
}

impl Future for Ending {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(expiry) = &mut self.expiry {
            if expiry.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        if let Some(ended) = &mut self.ended {
            if Pin::new(ended).poll(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }
}
