//! Connections to one Redis or to a Redis Cluster, behind one interface.
//!
//! A cluster is found by asking the first seed that answers (`INFO cluster`) unless
//! `redis.cluster` says. Commands then go through redis-rs's cluster client, which routes each by
//! its key's slot and follows `MOVED`/`ASK` and failovers; subscriptions go through a second
//! cluster client (RESP3) whose subscriptions it moves to a slot's new owner.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{
    AsyncConnectionConfig, Cmd, IntoConnectionInfo, Pipeline, ProtocolVersion, PushInfo,
    RedisFuture, Value,
};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::reply::{as_array, as_bytes, classify_error, unavailable};
use crate::config::RedisSettings;
use crate::shutdown::Shutdown;
use crate::store::StoreError;

/// Oldest Redis with `max-deleted-entry-id` in `XINFO STREAM`, which the gap rule needs.
const MIN_REDIS_MAJOR: u32 = 7;

/// Where commands go: one Redis, or a cluster whose client routes each command by its slot.
#[derive(Clone)]
pub(super) enum Commands {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Commands {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Commands::Single(c) => c.req_packed_command(cmd),
            Commands::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Commands::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Commands::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Commands::Single(c) => c.get_db(),
            Commands::Cluster(c) => c.get_db(),
        }
    }
}

impl Commands {
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Commands::Cluster(_))
    }

    /// Subscribes to (`on`) or leaves topics' channels: their live channels (sharded in a
    /// cluster, so only the shard owning a topic carries its announcements) and their keyspace
    /// notifications (which Redis sends on the node holding the key; the cluster client routes
    /// the subscription there by the channel's hash tag, the topic).
    pub(super) async fn set_subscribed(
        &mut self,
        on: bool,
        live: &[String],
        keyspace: &[String],
    ) -> Result<(), StoreError> {
        let result = match self {
            Commands::Single(c) => {
                let all: Vec<&String> = live.iter().chain(keyspace).collect();
                if on {
                    c.subscribe(&all).await
                } else {
                    c.unsubscribe(&all).await
                }
            }
            Commands::Cluster(c) if on => match c.ssubscribe(live).await {
                Ok(()) => c.subscribe(keyspace).await,
                Err(e) => Err(e),
            },
            Commands::Cluster(c) => match c.sunsubscribe(live).await {
                Ok(()) => c.unsubscribe(keyspace).await,
                Err(e) => Err(e),
            },
        };
        result.map_err(classify_error)
    }

    /// How the cluster's slots are assigned to masters, as one comparable string; `None` for one
    /// Redis. A change means a failover or a reshard: subscriptions must follow.
    pub(super) async fn topology(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<String>, StoreError> {
        if !self.is_cluster() {
            return Ok(None);
        }
        let slots: Value = query(self, redis::cmd("CLUSTER").arg("SLOTS"), timeout).await?;
        let mut ranges = Vec::new();
        for range in as_array(&slots)? {
            let parts = as_array(range)?;
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(master)) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                continue;
            };
            let master = as_array(master)?;
            let host = master
                .first()
                .and_then(|h| as_bytes(h).ok())
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let port = match master.get(1) {
                Some(Value::Int(p)) => *p,
                _ => 0,
            };
            ranges.push(format!("{start}-{end}@{host}:{port}"));
        }
        ranges.sort();
        Ok(Some(ranges.join(",")))
    }
}

/// One command with a deadline: a half-dead connection fails here instead of hanging.
pub(super) async fn query<T: redis::FromRedisValue>(
    conn: &mut Commands,
    cmd: &Cmd,
    timeout: Duration,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, cmd.query_async::<T>(conn)).await {
        Ok(result) => result.map_err(classify_error),
        Err(_) => Err(StoreError::Unavailable(
            "redis did not answer in time".into(),
        )),
    }
}

/// Runs commands, each named with a key that places it (its slot in a cluster), as few
/// pipelines as the deployment allows: one on one Redis; one per slot, a few at a time, in a
/// cluster, whose client sends a pipeline whole to the node of its first key. The replies come
/// in the order of `commands`; the first failure fails the whole.
pub(super) async fn run_placed(
    conn: &Commands,
    commands: Vec<(String, Cmd)>,
    timeout: Duration,
) -> Result<Vec<Value>, StoreError> {
    /// Pipelines in flight at once in a cluster.
    const CONCURRENCY: usize = 32;
    async fn pipelined(
        mut conn: Commands,
        cmds: Vec<Cmd>,
        timeout: Duration,
    ) -> Result<Vec<Value>, StoreError> {
        let mut pipe = redis::pipe();
        for cmd in cmds {
            pipe.add_command(cmd);
        }
        match tokio::time::timeout(timeout, pipe.query_async::<Vec<Value>>(&mut conn)).await {
            Ok(result) => result.map_err(classify_error),
            Err(_) => Err(StoreError::Unavailable(
                "redis did not answer in time".into(),
            )),
        }
    }
    if commands.is_empty() {
        return Ok(Vec::new());
    }
    if !conn.is_cluster() {
        let cmds = commands.into_iter().map(|(_, cmd)| cmd).collect();
        return pipelined(conn.clone(), cmds, timeout).await;
    }
    let mut groups: HashMap<Slot, (Vec<usize>, Vec<Cmd>)> = HashMap::new();
    for (i, (key, cmd)) in commands.into_iter().enumerate() {
        let slot = Slot::for_key(key.as_bytes());
        let group = groups.entry(slot).or_default();
        group.0.push(i);
        group.1.push(cmd);
    }
    let total = groups.values().map(|g| g.0.len()).sum();
    let mut places = Vec::with_capacity(groups.len());
    let mut runs = Vec::with_capacity(groups.len());
    for (_, (indices, cmds)) in groups {
        places.push(indices);
        runs.push(pipelined(conn.clone(), cmds, timeout));
    }
    let results: Vec<Result<Vec<Value>, StoreError>> = futures_util::stream::iter(runs)
        .buffered(CONCURRENCY)
        .collect()
        .await;
    let mut replies = vec![Value::Nil; total];
    for (indices, result) in places.into_iter().zip(results) {
        for (i, value) in indices.into_iter().zip(result?) {
            replies[i] = value;
        }
    }
    Ok(replies)
}

/// PING with a deadline; in a cluster every master answers.
pub(super) async fn ping(conn: &mut Commands, timeout: Duration) -> Result<(), StoreError> {
    query::<()>(conn, &redis::cmd("PING"), timeout).await
}

/// The two connections to Redis.
#[derive(Clone)]
pub(super) struct Link {
    /// Command connection: multiplexed, reconnects (and in a cluster follows the topology) by
    /// itself.
    pub(super) conn: Commands,
    /// Subscription connection (RESP3); resubscribes by itself after a reconnect.
    pub(super) pubsub: Commands,
    /// In a cluster, what opened `conn`: a command connection that stops answering while the
    /// cluster answers is replaced by a fresh one from it (see `replace_wedged_commands`).
    pub(super) commands_client: Option<ClusterClient>,
    /// Whether every append reaches `pubsub` as an `xadd` keyspace notification, in order with
    /// the announcements: true on one Redis once `notify-keyspace-events` has `K` and `t`. The
    /// append script then skips looking up each stream's previous entry (see `append.lua`).
    /// Never in a cluster: a topic's notifications and announcements may come over different
    /// connections while its slot moves. Set again after the subscription connection comes back
    /// (a restarted Redis may have lost the setting).
    pub(super) notified: Arc<AtomicBool>,
    /// Whether every append reaches the nodes subscribed to its topic's keyspace channel, on
    /// every master in a cluster (`notify-keyspace-events` has `K` and `t`), whatever its order
    /// with the announcements: a topic nobody listens to may then go unannounced (see
    /// `audience`). Set again when the subscription connection comes back or the cluster's
    /// topology changes (a restarted or new node may lack the setting).
    pub(super) keyspace: Arc<AtomicBool>,
}

/// Where Redis is: the seed URLs from `redis_url`.
pub(super) struct Target {
    seeds: Vec<redis::ConnectionInfo>,
    /// The database of the first seed (always 0 in a cluster).
    pub(super) db: i64,
}

impl Target {
    /// Parses `redis_url`: one URL, or a comma-separated list of cluster seeds.
    pub(super) fn parse(urls: &str) -> Result<Target, StoreError> {
        let seeds = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                u.into_connection_info()
                    .map_err(|e| StoreError::Internal(format!("redis_url: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let db = seeds
            .first()
            .ok_or_else(|| StoreError::Internal("redis_url: no URL".into()))?
            .redis_settings()
            .db();
        Ok(Target { seeds, db })
    }
}

/// Opens both connections and prepares Redis: version check, cluster detection, keyspace
/// notifications.
pub(super) async fn open_link(
    target: &Target,
    settings: &RedisSettings,
    push_tx: mpsc::UnboundedSender<PushInfo>,
) -> Result<Link, StoreError> {
    let Probe {
        seed,
        cluster,
        members,
    } = probe(target, settings).await?;
    // A publish's `WAIT` holds its reply for up to `replica_ack_timeout`.
    let response_timeout = settings.response_timeout
        + if settings.min_replicas_ack > 0 {
            settings.replica_ack_timeout
        } else {
            Duration::ZERO
        };
    let link = if cluster {
        let mut seeds = target.seeds.clone();
        for member in members {
            if !seeds.iter().any(|s| s.addr() == member.addr()) {
                seeds.push(member);
            }
        }
        let builder = |resp3: bool| {
            let mut b = ClusterClientBuilder::new(seeds.clone())
                .connection_timeout(settings.connect_timeout)
                .response_timeout(response_timeout)
                // Few, short retries: during a failover's election a publish fails fast with
                // 503 and the publisher retries, rather than hanging on a dead master.
                .retries(3)
                .min_retry_wait(50)
                .max_retry_wait(500);
            if resp3 {
                b = b.use_protocol(ProtocolVersion::RESP3);
            }
            b
        };
        let commands_client = builder(false).build().map_err(unavailable)?;
        let conn = commands_client
            .get_async_connection()
            .await
            .map_err(unavailable)?;
        let pubsub = builder(true)
            .push_sender(push_tx)
            .build()
            .map_err(unavailable)?
            .get_async_connection()
            .await
            .map_err(unavailable)?;
        info!(nodes = seeds.len(), "connected to a redis cluster");
        Link {
            conn: Commands::Cluster(conn),
            pubsub: Commands::Cluster(pubsub),
            commands_client: Some(commands_client),
            notified: Arc::new(AtomicBool::new(false)),
            keyspace: Arc::new(AtomicBool::new(false)),
        }
    } else {
        if target.seeds.len() > 1 {
            warn!("redis_url lists several nodes but they are not a cluster; using the first that answered");
        }
        let client = seed_client(&seed, true)?;
        let base = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_with_config(client.clone(), base.clone())
            .await
            .map_err(unavailable)?;
        let pubsub = ConnectionManager::new_with_config(
            client,
            base.set_push_sender(push_tx).set_automatic_resubscription(),
        )
        .await
        .map_err(unavailable)?;
        Link {
            conn: Commands::Single(conn),
            pubsub: Commands::Single(pubsub),
            commands_client: None,
            notified: Arc::new(AtomicBool::new(false)),
            keyspace: Arc::new(AtomicBool::new(false)),
        }
    };
    let mut conn = link.conn.clone();
    let on = enable_keyspace_notifications(&mut conn).await;
    link.notified
        .store(on && !conn.is_cluster(), Ordering::Release);
    link.keyspace.store(on, Ordering::Release);
    Ok(link)
}

fn seed_client(seed: &redis::ConnectionInfo, resp3: bool) -> Result<redis::Client, StoreError> {
    let mut info = seed.clone();
    if resp3 {
        let redis = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        info = info.set_redis_settings(redis);
    }
    redis::Client::open(info).map_err(|e| StoreError::Internal(format!("redis_url: {e}")))
}

/// What the first seed that answered said.
struct Probe {
    seed: redis::ConnectionInfo,
    cluster: bool,
    /// In a cluster, every node it knows: all of them become the cluster client's seeds, so the
    /// client can find the cluster again whichever nodes fail (it falls back to its seeds when it
    /// has lost its view).
    members: Vec<redis::ConnectionInfo>,
}

/// Every node of `CLUSTER NODES` but failed ones, as connection settings like `seed`'s.
fn cluster_members(seed: &redis::ConnectionInfo, nodes: &str) -> Vec<redis::ConnectionInfo> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let address = fields.nth(1)?;
            let flags = fields.next()?;
            if flags.contains("fail") || flags.contains("noaddr") || flags.contains("handshake") {
                return None;
            }
            // `host:port@cport[,hostname]`
            let host_port = address.split(['@', ',']).next()?;
            let (host, port) = host_port.rsplit_once(':')?;
            let port: u16 = port.parse().ok()?;
            let host = if host.is_empty() {
                // A node that does not know its own address yet: the seed is it.
                return Some(seed.clone());
            } else {
                host.to_owned()
            };
            let addr = match seed.addr() {
                redis::ConnectionAddr::TcpTls {
                    insecure,
                    tls_params,
                    ..
                } => redis::ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: *insecure,
                    tls_params: tls_params.clone(),
                },
                _ => redis::ConnectionAddr::Tcp(host, port),
            };
            Some(seed.clone().set_addr(addr))
        })
        .collect()
}

/// Finds a seed that answers, checks its version and whether it is a cluster node.
async fn probe(target: &Target, settings: &RedisSettings) -> Result<Probe, StoreError> {
    let mut last_error = StoreError::Unavailable("no seed answered".into());
    for seed in &target.seeds {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(settings.response_timeout));
        let conn = seed_client(seed, false)?
            .get_multiplexed_async_connection_with_config(&config)
            .await;
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                last_error = unavailable(e);
                continue;
            }
        };
        let info: String = redis::cmd("INFO")
            .arg("server")
            .arg("cluster")
            .query_async(&mut conn)
            .await
            .map_err(classify_error)?;
        check_version(&info)?;
        let detected = field(&info, "cluster_enabled") == Some("1");
        let cluster = settings.cluster.unwrap_or(detected);
        if cluster && !detected {
            return Err(StoreError::Internal(
                "redis.cluster is true but the node at redis_url is not in cluster mode".into(),
            ));
        }
        let mut members = Vec::new();
        if cluster {
            let nodes: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut conn)
                .await
                .map_err(classify_error)?;
            members = cluster_members(seed, &nodes);
        }
        return Ok(Probe {
            seed: seed.clone(),
            cluster,
            members,
        });
    }
    Err(last_error)
}

fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

fn check_version(info: &str) -> Result<(), StoreError> {
    let version = field(info, "redis_version").unwrap_or("0");
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < MIN_REDIS_MAJOR {
        return Err(StoreError::Internal(format!(
            "redis {version} is too old: ssegate needs Redis 7.0 or newer"
        )));
    }
    Ok(())
}

/// Adds `K` (keyspace channel) and `t` (stream commands) to `notify-keyspace-events`, keeping
/// whatever else is set; in a cluster on every node (called again when the topology changes, for
/// nodes that joined). Managed Redis services may forbid CONFIG; then direct XADDs still arrive,
/// within `catchup_interval`. Returns whether they are on (on the node asked).
pub(super) async fn enable_keyspace_notifications(conn: &mut Commands) -> bool {
    let current: Result<HashMap<String, String>, _> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .query_async(conn)
        .await;
    let flags = match current {
        Ok(map) => map
            .get("notify-keyspace-events")
            .cloned()
            .unwrap_or_default(),
        Err(e) => {
            warn!(error = %e, "cannot read notify-keyspace-events; direct XADDs arrive within catchup_interval");
            return false;
        }
    };
    let mut wanted = flags.clone();
    if !wanted.contains('K') {
        wanted.push('K');
    }
    if !wanted.contains('t') && !wanted.contains('A') {
        wanted.push('t');
    }
    // In a cluster another node may still lack them although the one asked has them.
    if wanted == flags && !conn.is_cluster() {
        return true;
    }
    let set: Result<(), _> = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg(&wanted)
        .query_async(conn)
        .await;
    match set {
        Ok(()) => {
            info!(
                flags = wanted,
                "enabled keyspace notifications for direct XADDs"
            );
            true
        }
        Err(e) => {
            warn!(
                error = %e,
                "cannot set notify-keyspace-events (set it to include Kt); direct XADDs arrive within catchup_interval"
            );
            false
        }
    }
}

/// Failed checks in a row, each while the subscription connection reached every node, after
/// which the command connection counts as wedged.
const WEDGED_AFTER: u32 = 2;

/// Replaces a cluster command connection that stopped answering while the cluster answers.
///
/// redis-rs's cluster client can wedge for good after a failover: a slot refresh waits for a
/// lock that a request it no longer polls was granted (seen after a master was killed under a
/// batch of calls to 100 slots: every later call, to every master, timed out). A failover in
/// progress makes both connections fail, so only the command connection failing alone counts;
/// requests then go to a fresh connection, and those on the old one time out.
pub(super) async fn replace_wedged_commands(
    link_tx: watch::Sender<Option<Link>>,
    interval: Duration,
    timeout: Duration,
    shutdown: Shutdown,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait() => return,
        }
        let Some(Link {
            mut conn,
            mut pubsub,
            commands_client: Some(client),
            ..
        }) = link_tx.borrow().clone()
        else {
            return;
        };
        if ping(&mut conn, timeout).await.is_ok() || ping(&mut pubsub, timeout).await.is_err() {
            failures = 0;
            continue;
        }
        failures += 1;
        if failures < WEDGED_AFTER {
            continue;
        }
        match tokio::time::timeout(timeout, client.get_async_connection()).await {
            Ok(Ok(fresh)) => {
                warn!("the redis command connection stopped answering while the cluster answers; replaced it");
                link_tx.send_modify(|link| {
                    if let Some(link) = link {
                        link.conn = Commands::Cluster(fresh);
                    }
                });
                failures = 0;
            }
            Ok(Err(e)) => warn!(error = %e, "cannot replace the wedged redis command connection"),
            Err(_) => warn!("cannot replace the wedged redis command connection: timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_fields() {
        let info = "# Server\r\nredis_version:7.0.15\r\n# Cluster\r\ncluster_enabled:1\r\n";
        assert_eq!(field(info, "redis_version"), Some("7.0.15"));
        assert_eq!(field(info, "cluster_enabled"), Some("1"));
        assert!(check_version(info).is_ok());
        assert!(check_version("redis_version:6.2.1\r\n").is_err());
    }

    #[test]
    fn cluster_members_skip_failed_nodes() {
        let seed = "redis://127.0.0.1:7000/0".into_connection_info().unwrap();
        let nodes = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001,node-b master - 0 0 2 connected 5461-10922
c3 127.0.0.1:7002@17002 master,fail - 0 0 3 connected
d4 :0@0 master,noaddr - 0 0 0 disconnected
e5 127.0.0.1:7004@17004 slave a1 0 0 1 connected
";
        let ports: Vec<String> = cluster_members(&seed, nodes)
            .iter()
            .map(|m| m.addr().to_string())
            .collect();
        assert_eq!(
            ports,
            ["127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7004"]
        );
    }

    #[test]
    fn seed_lists_parse() {
        let t = Target::parse("redis://127.0.0.1:7000, redis://127.0.0.1:7001").unwrap();
        assert_eq!(t.seeds.len(), 2);
        assert!(Target::parse("redis://a:1,nonsense").is_err());
    }
}
