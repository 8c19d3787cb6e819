//! The registry of a node without Redis: in memory, with the same rules as the Redis one (a
//! single node never has another to reap, but the conformance suite runs both alike).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{node_of, Change, Heartbeat, Registry};
use crate::store::StoreError;

/// Entries in memory.
#[derive(Default)]
pub struct MemoryRegistry {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Entries by topic, then id (ordered, as listings are).
    topics: HashMap<String, BTreeMap<String, String>>,
    /// When each node's heartbeat runs out.
    nodes: HashMap<String, Instant>,
    /// The topics each node has entries under.
    node_topics: HashMap<String, HashSet<String>>,
    /// Reaping claims, until when.
    claims: HashMap<String, Instant>,
}

impl MemoryRegistry {
    pub fn new() -> MemoryRegistry {
        MemoryRegistry::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether an entry id belongs to `node` (`<node>.<n>`).
fn of_node(id: &str, node: &str) -> bool {
    id.strip_prefix(node)
        .is_some_and(|rest| rest.starts_with('.'))
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn write(
        &self,
        node: &str,
        changes: &[Change],
        topics_added: &[String],
        topics_dropped: &[String],
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        for change in changes {
            match &change.entry {
                Some(entry) => {
                    state
                        .topics
                        .entry(change.topic.clone())
                        .or_default()
                        .insert(change.id.clone(), entry.to_string());
                }
                None => {
                    if let Some(entries) = state.topics.get_mut(&change.topic) {
                        entries.remove(&change.id);
                        if entries.is_empty() {
                            state.topics.remove(&change.topic);
                        }
                    }
                }
            }
        }
        let index = state.node_topics.entry(node.to_owned()).or_default();
        index.extend(topics_added.iter().cloned());
        for topic in topics_dropped {
            index.remove(topic);
        }
        Ok(())
    }

    async fn heartbeat(&self, node: &str, ttl: Duration) -> Result<Heartbeat, StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        let forgotten = state.nodes.insert(node.to_owned(), now + ttl).is_none();
        let expired = state
            .nodes
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(node, _)| node.clone())
            .collect();
        Ok(Heartbeat { forgotten, expired })
    }

    async fn reap(
        &self,
        node: &str,
        lease: Duration,
    ) -> Result<Option<Vec<(String, Vec<String>)>>, StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        if state.claims.get(node).is_some_and(|until| *until > now) {
            return Ok(None);
        }
        state.claims.insert(node.to_owned(), now + lease);
        let topics = state.node_topics.remove(node).unwrap_or_default();
        let mut removed = Vec::new();
        for topic in topics {
            let Some(entries) = state.topics.get_mut(&topic) else {
                continue;
            };
            let ids: Vec<String> = entries
                .keys()
                .filter(|id| of_node(id, node))
                .cloned()
                .collect();
            let gone: Vec<String> = ids.iter().filter_map(|id| entries.remove(id)).collect();
            if entries.is_empty() {
                state.topics.remove(&topic);
            }
            if !gone.is_empty() {
                removed.push((topic, gone));
            }
        }
        state.nodes.remove(node);
        Ok(Some(removed))
    }

    async fn entries(&self, topic: &str) -> Result<Vec<String>, StoreError> {
        let state = self.lock();
        Ok(state
            .topics
            .get(topic)
            .map(|entries| {
                entries
                    .iter()
                    .filter(|(id, _)| state.nodes.contains_key(node_of(id)))
                    .map(|(_, entry)| entry.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn topics(&self) -> Result<Vec<String>, StoreError> {
        let state = self.lock();
        let topics: HashSet<&String> = state
            .node_topics
            .iter()
            .filter(|(node, _)| state.nodes.contains_key(*node))
            .flat_map(|(_, topics)| topics)
            .collect();
        Ok(topics.into_iter().cloned().collect())
    }

    async fn forget(&self, node: &str) -> Result<(), StoreError> {
        let mut state = self.lock();
        state.nodes.remove(node);
        state.node_topics.remove(node);
        Ok(())
    }
}
