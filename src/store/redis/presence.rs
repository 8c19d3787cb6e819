//! The presence registry in Redis (see [`crate::presence`]), on one Redis or a cluster.
//!
//! | what | name |
//! |---|---|
//! | a topic's entries | `<prefix>:{<topic>}:presence`, a hash: entry id → JSON |
//! | live nodes | `<prefix>:presence:nodes`, a sorted set: node → when its time runs out (ms) |
//! | a node's topics | `<prefix>:presence:node:<node>`, a set |
//! | a reaping claim | `<prefix>:presence:reap:<node>`, with the claim's lease as TTL |
//!
//! A topic's entries live in its slot, like its stream. A node's writes go as one pipeline (in
//! a cluster, one per slot).

use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::Value;
use tokio::sync::watch;

use super::connection::{query, run_placed, Commands, Link};
use super::keys::{Keys, PRESENCE};
use super::reply::{as_array, as_bytes};
use super::scripts::{Call, Lua};
use super::Runner;
use crate::presence::{node_of, Change, Heartbeat, Registry};
use crate::store::StoreError;

/// The registry, sharing the store's connection.
pub struct RedisRegistry {
    /// The store's connections, once Redis answered.
    pub(super) link: watch::Receiver<Option<Link>>,
    pub(super) keys: Keys,
    pub(super) runner: Runner,
    pub(super) heartbeat: Lua,
}

impl RedisRegistry {
    fn conn(&self) -> Result<Commands, StoreError> {
        self.link
            .borrow()
            .as_ref()
            .map(|link| link.conn.clone())
            .ok_or_else(|| StoreError::Unavailable("not connected to redis yet".into()))
    }

    fn topic_key(&self, topic: &str) -> String {
        let mut name = String::new();
        self.keys.write_name(&mut name, topic, PRESENCE);
        name
    }

    fn nodes_key(&self) -> String {
        format!("{}:presence:nodes", self.keys.prefix)
    }

    fn node_key(&self, node: &str) -> String {
        format!("{}:presence:node:{node}", self.keys.prefix)
    }

    fn claim_key(&self, node: &str) -> String {
        format!("{}:presence:reap:{node}", self.keys.prefix)
    }

    /// Runs placed commands with the store's deadline and metrics.
    async fn run(&self, commands: Vec<(String, redis::Cmd)>) -> Result<Vec<Value>, StoreError> {
        let started = Instant::now();
        let result = run_placed(&self.conn()?, commands, self.runner.response_timeout).await;
        self.runner.observe(started, &result);
        result
    }
}

/// A hash reply (RESP2 flat array or RESP3 map) as field/value pairs of text.
fn pairs(value: &Value) -> Result<Vec<(String, String)>, StoreError> {
    let text = |v: &Value| as_bytes(v).map(|b| String::from_utf8_lossy(b).into_owned());
    match value {
        Value::Map(map) => map.iter().map(|(k, v)| Ok((text(k)?, text(v)?))).collect(),
        other => {
            let flat = as_array(other)?;
            flat.chunks(2)
                .map(|pair| match pair {
                    [k, v] => Ok((text(k)?, text(v)?)),
                    _ => Err(StoreError::Internal("a hash reply of odd length".into())),
                })
                .collect()
        }
    }
}

fn texts(value: &Value) -> Result<Vec<String>, StoreError> {
    match value {
        Value::Set(items) => items.as_slice(),
        other => as_array(other)?,
    }
    .iter()
    .map(|v| as_bytes(v).map(|b| String::from_utf8_lossy(b).into_owned()))
    .collect()
}

#[async_trait]
impl Registry for RedisRegistry {
    async fn write(
        &self,
        node: &str,
        changes: &[Change],
        topics_added: &[String],
        topics_dropped: &[String],
    ) -> Result<(), StoreError> {
        // One HSET and one HDEL per topic, whatever the number of entries.
        let mut sets: std::collections::BTreeMap<&str, (redis::Cmd, redis::Cmd, bool, bool)> =
            Default::default();
        for change in changes {
            let (set, del, any_set, any_del) =
                sets.entry(change.topic.as_str()).or_insert_with(|| {
                    let key = self.topic_key(&change.topic);
                    let mut set = redis::cmd("HSET");
                    set.arg(&key);
                    let mut del = redis::cmd("HDEL");
                    del.arg(&key);
                    (set, del, false, false)
                });
            match &change.entry {
                Some(entry) => {
                    set.arg(&change.id).arg(entry.as_ref());
                    *any_set = true;
                }
                None => {
                    del.arg(&change.id);
                    *any_del = true;
                }
            }
        }
        let mut commands = Vec::new();
        if !topics_added.is_empty() {
            let key = self.node_key(node);
            let mut cmd = redis::cmd("SADD");
            cmd.arg(&key).arg(topics_added);
            commands.push((key, cmd));
        }
        for (topic, (set, del, any_set, any_del)) in sets {
            let key = self.topic_key(topic);
            if any_set {
                commands.push((key.clone(), set));
            }
            if any_del {
                commands.push((key, del));
            }
        }
        if !topics_dropped.is_empty() {
            let key = self.node_key(node);
            let mut cmd = redis::cmd("SREM");
            cmd.arg(&key).arg(topics_dropped);
            commands.push((key, cmd));
        }
        self.run(commands).await.map(|_| ())
    }

    async fn heartbeat(&self, node: &str, ttl: Duration) -> Result<Heartbeat, StoreError> {
        let mut call = Call::new(&self.heartbeat, 1);
        call.key(self.nodes_key())
            .arg(node)
            .arg(ttl.as_millis() as u64);
        let reply = self.runner.run(&mut self.conn()?, &call, None).await?;
        let parts = as_array(&reply)?;
        let forgotten = matches!(parts.first(), Some(Value::Int(1)));
        let expired = match parts.get(1) {
            Some(list) => texts(list)?,
            None => Vec::new(),
        };
        Ok(Heartbeat { forgotten, expired })
    }

    async fn reap(
        &self,
        node: &str,
        lease: Duration,
    ) -> Result<Option<Vec<(String, Vec<String>)>>, StoreError> {
        let mut conn = self.conn()?;
        let timeout = self.runner.response_timeout;
        let mut claim = redis::cmd("SET");
        claim
            .arg(self.claim_key(node))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(lease.as_millis() as u64);
        let claimed: Option<String> = query(&mut conn, &claim, timeout).await?;
        if claimed.is_none() {
            return Ok(None);
        }
        let index = self.node_key(node);
        let mut members = redis::cmd("SMEMBERS");
        members.arg(&index);
        let topics = texts(&query::<Value>(&mut conn, &members, timeout).await?)?;
        let reads = topics
            .iter()
            .map(|topic| {
                let key = self.topic_key(topic);
                let mut cmd = redis::cmd("HGETALL");
                cmd.arg(&key);
                (key, cmd)
            })
            .collect();
        let hashes = self.run(reads).await?;
        let prefix = format!("{node}.");
        let mut removed = Vec::new();
        let mut deletes = Vec::new();
        for (topic, hash) in topics.into_iter().zip(hashes) {
            let mine: Vec<(String, String)> = pairs(&hash)?
                .into_iter()
                .filter(|(id, _)| id.starts_with(&prefix))
                .collect();
            if mine.is_empty() {
                continue;
            }
            let key = self.topic_key(&topic);
            let mut cmd = redis::cmd("HDEL");
            cmd.arg(&key);
            for (id, _) in &mine {
                cmd.arg(id);
            }
            deletes.push((key, cmd));
            removed.push((topic, mine.into_iter().map(|(_, entry)| entry).collect()));
        }
        let mut forget = redis::cmd("DEL");
        forget.arg(&index);
        deletes.push((index, forget));
        let nodes = self.nodes_key();
        let mut unlist = redis::cmd("ZREM");
        unlist.arg(&nodes).arg(node);
        deletes.push((nodes, unlist));
        self.run(deletes).await?;
        Ok(Some(removed))
    }

    async fn entries(&self, topic: &str) -> Result<Vec<String>, StoreError> {
        let key = self.topic_key(topic);
        let mut hash = redis::cmd("HGETALL");
        hash.arg(&key);
        let nodes_key = self.nodes_key();
        let mut nodes = redis::cmd("ZRANGE");
        nodes.arg(&nodes_key).arg(0).arg(-1);
        let reply = self.run(vec![(key, hash), (nodes_key, nodes)]).await?;
        let mut pairs = match reply.first() {
            Some(hash) => pairs(hash)?,
            None => Vec::new(),
        };
        let listed: std::collections::HashSet<String> = match reply.get(1) {
            Some(nodes) => texts(nodes)?.into_iter().collect(),
            None => Default::default(),
        };
        pairs.retain(|(id, _)| listed.contains(node_of(id)));
        pairs.sort();
        Ok(pairs.into_iter().map(|(_, entry)| entry).collect())
    }

    /// The live nodes, then one `SMEMBERS` of each one's index (pipelined; in a cluster, by
    /// slot).
    async fn topics(&self) -> Result<Vec<String>, StoreError> {
        let nodes_key = self.nodes_key();
        let mut list = redis::cmd("ZRANGE");
        list.arg(&nodes_key).arg(0).arg(-1);
        let reply = self.run(vec![(nodes_key, list)]).await?;
        let nodes = match reply.first() {
            Some(nodes) => texts(nodes)?,
            None => Vec::new(),
        };
        let reads = nodes
            .iter()
            .map(|node| {
                let index = self.node_key(node);
                let mut members = redis::cmd("SMEMBERS");
                members.arg(&index);
                (index, members)
            })
            .collect();
        let mut topics = std::collections::HashSet::new();
        for set in self.run(reads).await? {
            topics.extend(texts(&set)?);
        }
        Ok(topics.into_iter().collect())
    }

    async fn forget(&self, node: &str) -> Result<(), StoreError> {
        let index = self.node_key(node);
        let mut del = redis::cmd("DEL");
        del.arg(&index);
        let nodes = self.nodes_key();
        let mut unlist = redis::cmd("ZREM");
        unlist.arg(&nodes).arg(node);
        self.run(vec![(index, del), (nodes, unlist)])
            .await
            .map(|_| ())
    }
}
