//! The node's router of Mercure subscriptions: it reads the log once, and hands each update to
//! the subscriptions it concerns, found through an index of their selectors instead of asking
//! every subscription.
//!
//! Each distinct subscription (its selectors and the selectors its token allows for private
//! updates) is a hub [`View`] of the log, shared by every client with the same subscription: the
//! view's sessions replay the log filtered and then take what the router sends, with the hub's
//! seam. The index finds a topic's subscriptions by exact topic (a hash lookup), by template (each
//! distinct template is matched once per topic, and only templates whose text before the first
//! `{` starts the topic are tried), and `*`. An update costs the node the lookups for its topics
//! and the views it reaches, however many subscriptions concern other topics.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::BytesMut;
use tokio::task::AbortHandle;

use super::selector::Selector;
use super::update::Stored;
use super::{log_topic, Subscriber};
use crate::event::{Event, StreamId, Topic};
use crate::hub::{Delivery, Hub, Output, Session, View};
use crate::store::StoreError;

/// Routes the log's updates to the node's Mercure subscriptions.
pub struct Router {
    hub: Hub,
    log: Topic,
    state: Arc<Mutex<State>>,
    /// Only one subscription at a time starts the reader.
    starting: tokio::sync::Mutex<()>,
}

/// What the router knows, under one lock: the reader sends while holding it, so a view made
/// under it starts exactly where the reader stands.
#[derive(Default)]
struct State {
    /// The last log entry the reader dispatched; `None` while no reader runs.
    position: Option<StreamId>,
    /// The reader task, while one runs (there are subscriptions).
    reader: Option<AbortHandle>,
    /// Subscriptions by their place in `entries`.
    by_key: HashMap<Arc<Key>, usize>,
    /// Subscriptions; `None` where one was removed (reused by the next).
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
    index: Index,
    /// Numbers each dispatch, so a subscription matched through several selectors or topics
    /// of one update gets it once.
    dispatches: u64,
}

/// One distinct subscription.
struct Entry {
    key: Arc<Key>,
    view: View,
    subscriber: Arc<Subscriber>,
    /// Clients on it; it goes when the last leaves.
    members: usize,
    /// The last dispatch that reached it.
    reached: u64,
}

/// What makes two subscriptions the same: their selectors and their private selectors, as text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    selectors: Vec<String>,
    private: Option<Vec<String>>,
}

impl Key {
    fn of(subscriber: &Subscriber) -> Key {
        let text = |selectors: &[Selector]| -> Vec<String> {
            let mut text: Vec<String> = selectors.iter().map(|s| s.as_str().to_owned()).collect();
            text.sort();
            text.dedup();
            text
        };
        Key {
            selectors: text(&subscriber.selectors),
            private: subscriber.private.as_deref().map(text),
        }
    }
}

/// Subscriptions by selector.
#[derive(Default)]
struct Index {
    any: Vec<usize>,
    exact: HashMap<String, Vec<usize>>,
    templates: HashMap<String, Template>,
    /// Template texts by their literal beginning (up to the first `{`)…
    by_prefix: HashMap<String, Vec<String>>,
    /// …and how many beginnings have each length: a topic is looked up at these lengths only.
    prefix_lengths: BTreeMap<usize, usize>,
}

struct Template {
    selector: Selector,
    entries: Vec<usize>,
}

impl Index {
    fn add(&mut self, selector: &Selector, entry: usize) {
        match selector {
            Selector::Any => self.any.push(entry),
            Selector::Exact(topic) => self.exact.entry(topic.clone()).or_default().push(entry),
            Selector::Template { text, .. } => {
                let template = self.templates.entry(text.clone()).or_insert_with(|| {
                    let prefix = literal_prefix(text).to_owned();
                    *self.prefix_lengths.entry(prefix.len()).or_default() += 1;
                    self.by_prefix.entry(prefix).or_default().push(text.clone());
                    Template {
                        selector: selector.clone(),
                        entries: Vec::new(),
                    }
                });
                template.entries.push(entry);
            }
        }
    }

    fn remove(&mut self, selector: &Selector, entry: usize) {
        fn without(list: &mut Vec<usize>, entry: usize) -> bool {
            if let Some(i) = list.iter().position(|e| *e == entry) {
                list.swap_remove(i);
            }
            list.is_empty()
        }
        match selector {
            Selector::Any => {
                without(&mut self.any, entry);
            }
            Selector::Exact(topic) => {
                if self.exact.get_mut(topic).is_some_and(|l| without(l, entry)) {
                    self.exact.remove(topic);
                }
            }
            Selector::Template { text, .. } => {
                let empty = self
                    .templates
                    .get_mut(text)
                    .is_some_and(|t| without(&mut t.entries, entry));
                if !empty {
                    return;
                }
                self.templates.remove(text);
                let prefix = literal_prefix(text);
                if let Some(texts) = self.by_prefix.get_mut(prefix) {
                    texts.retain(|t| t != text);
                    if texts.is_empty() {
                        self.by_prefix.remove(prefix);
                    }
                }
                if let Some(n) = self.prefix_lengths.get_mut(&prefix.len()) {
                    *n -= 1;
                    if *n == 0 {
                        self.prefix_lengths.remove(&prefix.len());
                    }
                }
            }
        }
    }

    /// Calls `reach` for every subscription with a selector matching `topic`.
    fn matching(&self, topic: &str, mut reach: impl FnMut(usize)) {
        self.any.iter().for_each(|&e| reach(e));
        if let Some(entries) = self.exact.get(topic) {
            entries.iter().for_each(|&e| reach(e));
        }
        for &len in self.prefix_lengths.keys() {
            if len > topic.len() {
                break;
            }
            let Some(texts) = topic.get(..len).and_then(|p| self.by_prefix.get(p)) else {
                continue;
            };
            for text in texts {
                let template = &self.templates[text];
                if template.selector.matches(topic) {
                    template.entries.iter().for_each(|&e| reach(e));
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.any.is_empty() && self.exact.is_empty() && self.templates.is_empty()
    }
}

/// A template's text before its first expression: every topic it matches starts with it.
fn literal_prefix(template: &str) -> &str {
    &template[..template.find('{').unwrap_or(template.len())]
}

/// A client's hold on its subscription's view; releases it when dropped.
pub struct Registration {
    state: Arc<Mutex<State>>,
    entry: usize,
    /// The subscription, shared by its clients.
    subscriber: Arc<Subscriber>,
}

impl Registration {
    pub fn subscriber(&self) -> &Subscriber {
        &self.subscriber
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        let Some(entry) = state.entries.get_mut(self.entry).and_then(Option::as_mut) else {
            return;
        };
        entry.members -= 1;
        if entry.members > 0 {
            return;
        }
        let Some(entry) = state.entries[self.entry].take() else {
            return;
        };
        state.free.push(self.entry);
        state.by_key.remove(&entry.key);
        for selector in &entry.subscriber.selectors {
            state.index.remove(selector, self.entry);
        }
        if state.by_key.is_empty() {
            // Nobody on this node reads Mercure updates: stop following the log.
            debug_assert!(state.index.is_empty());
            if let Some(reader) = state.reader.take() {
                reader.abort();
            }
            state.position = None;
            state.entries.clear();
            state.free.clear();
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Router {
    pub fn new(hub: Hub) -> Router {
        Router {
            hub,
            log: log_topic(),
            state: Arc::new(Mutex::new(State::default())),
            starting: tokio::sync::Mutex::new(()),
        }
    }

    /// Opens a session for `subscriber`, resuming after `cursor` in the log (`None`: only new
    /// updates). The registration keeps the subscription routed; drop it with the session.
    pub async fn subscribe(
        &self,
        subscriber: Subscriber,
        cursor: Option<StreamId>,
    ) -> Result<(Session, Registration), StoreError> {
        self.start_reader().await?;
        let registration = self.register(subscriber)?;
        let view = {
            let state = lock(&self.state);
            match state
                .entries
                .get(registration.entry)
                .and_then(Option::as_ref)
            {
                Some(entry) => entry.view.clone(),
                None => return Err(StoreError::Unavailable("the log's reader stopped".into())),
            }
        };
        let session = self.hub.subscribe_view(&view, cursor).await?;
        Ok((session, registration))
    }

    /// Starts following the log, unless the node already does.
    async fn start_reader(&self) -> Result<(), StoreError> {
        let _one = self.starting.lock().await;
        if lock(&self.state).reader.is_some() {
            return Ok(());
        }
        let session = self.hub.subscribe(self.log.clone(), None).await?;
        let mut state = lock(&self.state);
        state.position = Some(session.position());
        let task = tokio::spawn(read(Arc::downgrade(&self.state), session));
        state.reader = Some(task.abort_handle());
        Ok(())
    }

    /// Joins the subscription's view, making it (and indexing it) if it is the first.
    fn register(&self, subscriber: Subscriber) -> Result<Registration, StoreError> {
        let key = Arc::new(Key::of(&subscriber));
        let mut state = lock(&self.state);
        let Some(position) = state.position else {
            return Err(StoreError::Unavailable("the log's reader stopped".into()));
        };
        if let Some(&entry) = state.by_key.get(&key) {
            if let Some(e) = state.entries[entry].as_mut() {
                e.members += 1;
                return Ok(Registration {
                    state: self.state.clone(),
                    entry,
                    subscriber: e.subscriber.clone(),
                });
            }
        }
        let subscriber = Arc::new(subscriber);
        let keeps = subscriber.clone();
        // Exact selectors only: every update the subscription receives is filed under one of
        // them (updates are labelled with their topics), so replays read only those.
        let labels = if subscriber
            .selectors
            .iter()
            .all(|s| matches!(s, Selector::Exact(_)))
        {
            key.selectors.clone()
        } else {
            Vec::new()
        };
        let view = self.hub.view(
            self.log.clone(),
            position,
            Arc::new(move |e: &Event| Stored::read(&e.data).is_some_and(|u| keeps.wants(&u))),
            labels,
        );
        let entry = state.free.pop().unwrap_or(state.entries.len());
        for selector in &subscriber.selectors {
            state.index.add(selector, entry);
        }
        let new = Entry {
            key: key.clone(),
            view,
            subscriber: subscriber.clone(),
            members: 1,
            reached: 0,
        };
        if entry == state.entries.len() {
            state.entries.push(Some(new));
        } else {
            state.entries[entry] = Some(new);
        }
        state.by_key.insert(key, entry);
        Ok(Registration {
            state: self.state.clone(),
            entry,
            subscriber,
        })
    }

    /// Ends the node's streams whose subscription has `selector` (as written) among its
    /// selectors; how many there were.
    pub fn end_subscriptions(&self, selector: &str) -> usize {
        let state = lock(&self.state);
        state
            .entries
            .iter()
            .flatten()
            .filter(|e| e.key.selectors.iter().any(|s| s == selector))
            .map(|e| {
                e.view.end_sessions();
                e.members
            })
            .sum()
    }

    /// Distinct subscriptions routed on this node.
    pub fn subscriptions(&self) -> usize {
        lock(&self.state).by_key.len()
    }
}

/// The reader: follows the log through a hub session and dispatches every update.
async fn read(state: std::sync::Weak<Mutex<State>>, mut session: Session) {
    loop {
        let output = session.next(std::future::pending()).await;
        let Some(state) = state.upgrade() else { return };
        let mut state = lock(&state);
        match output {
            Output::Live(delivery) => state.dispatch(&delivery.event),
            Output::Replayed(page) => {
                if page.gap.is_some() {
                    // Updates were trimmed under the reader: each subscription reads again from
                    // its own place and is told of its own gap.
                    state.views().for_each(View::resync);
                }
                for event in &page.events {
                    state.dispatch(event);
                }
                state.position = Some(page.next);
            }
            // The log's notices are not updates of any Mercure topic.
            Output::Notice(_) | Output::Farewell(_) | Output::Idle => {}
            Output::End => {
                // Shutdown, or the store failed: every stream ends and its client comes back.
                state.views().for_each(View::close);
                state.reader = None;
                state.position = None;
                return;
            }
        }
    }
}

impl State {
    fn views(&self) -> impl Iterator<Item = &View> {
        self.entries.iter().flatten().map(|e| &e.view)
    }

    /// Sends one log entry to the subscriptions it concerns.
    fn dispatch(&mut self, event: &Event) {
        self.position = Some(event.id);
        let Some(update) = Stored::read(&event.data) else {
            return;
        };
        self.dispatches += 1;
        let dispatch = self.dispatches;
        let State { index, entries, .. } = self;
        let mut delivery: Option<Arc<Delivery>> = None;
        for topic in update.topics() {
            index.matching(topic, |i| {
                let Some(entry) = entries[i].as_mut() else {
                    return;
                };
                if entry.reached == dispatch || !entry.subscriber.wants(&update) {
                    return;
                }
                entry.reached = dispatch;
                let delivery = delivery.get_or_insert_with(|| {
                    let mut frame = BytesMut::new();
                    super::write_update(&mut frame, event, &update);
                    Arc::new(Delivery {
                        id: event.id,
                        frame: frame.freeze(),
                        event: event.clone(),
                    })
                });
                entry.view.send(delivery.clone());
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index_of(selectors: &[&str]) -> Index {
        let mut index = Index::default();
        for (i, s) in selectors.iter().enumerate() {
            index.add(&Selector::parse(s).unwrap(), i);
        }
        index
    }

    fn reached(index: &Index, topic: &str) -> Vec<usize> {
        let mut got = Vec::new();
        index.matching(topic, |e| got.push(e));
        got.sort();
        got
    }

    #[test]
    fn the_index_finds_exact_template_and_any_selectors() {
        let index = index_of(&[
            "https://example.com/books/1",
            "https://example.com/books/{id}",
            "*",
            "https://example.com/authors/{id}",
            "https://example.com/{+path}",
            "{+all}",
        ]);
        assert_eq!(
            reached(&index, "https://example.com/books/1"),
            [0, 1, 2, 4, 5]
        );
        assert_eq!(
            reached(&index, "https://example.com/authors/7"),
            [2, 3, 4, 5]
        );
        assert_eq!(reached(&index, "urn:x"), [2, 5]);
    }

    #[test]
    fn removing_leaves_nothing_behind() {
        let selectors = [
            "a",
            "https://x/{id}",
            "*",
            "https://x/{id}",
            "https://y/{id}",
        ];
        let mut index = index_of(&selectors);
        for (i, s) in selectors.iter().enumerate() {
            index.remove(&Selector::parse(s).unwrap(), i);
        }
        assert!(index.is_empty());
        assert!(index.by_prefix.is_empty() && index.prefix_lengths.is_empty());
    }

    #[test]
    fn templates_of_other_beginnings_are_not_tried() {
        // Thousands of templates that cannot match: a topic is looked up at one length.
        let mut index = Index::default();
        for i in 0..5000 {
            let s = format!("https://example.com/other/{i}/{{id}}");
            index.add(&Selector::parse(&s).unwrap(), i);
        }
        index.add(
            &Selector::parse("https://example.com/books/{id}").unwrap(),
            9999,
        );
        assert_eq!(index.prefix_lengths.len(), 5, "five lengths of beginnings");
        assert_eq!(reached(&index, "https://example.com/books/3"), [9999]);
    }
}
