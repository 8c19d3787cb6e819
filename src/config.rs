//! Settings, layered defaults < config file < environment (`SSEGATE_*`) < command-line flags.
//!
//! Environment variables use `__` between levels: `SSEGATE_RETENTION__MAX_EVENTS=5000`.
//! Variables that start `SSEGATE_` but name no setting are ignored with one warning: Kubernetes
//! injects `SSEGATE_PORT`, `SSEGATE_SERVICE_HOST`… into every pod when a Service is named
//! `ssegate`. Unknown keys in a config file stay errors, so typos are caught.
//! Durations are written like `15s`, `500ms`, `5m`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Everything the gateway can be configured with.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address the HTTP server binds.
    pub listen: SocketAddr,
    /// Serve the built-in page at `/` (subscribe, publish, watch ids and gaps).
    pub ui: bool,
    /// `text` for people, `json` (one object a line) for log collectors.
    pub log_format: LogFormat,
    /// Where `/metrics` is served instead of on `listen`, to keep it off the public port.
    pub metrics_listen: Option<SocketAddr>,
    /// Redis to use; absent runs the embedded in-memory store (single node). A Redis Cluster is
    /// named by any of its nodes, or by a comma-separated list of seed nodes.
    pub redis_url: Option<String>,
    /// First part of every Redis key and channel, so several deployments can share one Redis.
    pub key_prefix: String,
    /// How much history each topic keeps for resuming clients.
    pub retention: Retention,
    /// Interval of the comment lines that keep idle connections open through proxies.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Sent as `retry:` on connect: how long a browser waits before reconnecting.
    #[serde(with = "humantime_serde")]
    pub retry: Duration,
    /// Largest accepted event payload (`data`), in bytes.
    pub max_event_bytes: usize,
    /// Most topics one stream (`?topic=a&topic=b…`) carries.
    pub max_topics_per_connection: usize,
    /// Most events accepted in one batch publish.
    pub max_batch_events: usize,
    /// Events read from the store per page when replaying history; bounds memory per client.
    pub replay_page_size: usize,
    /// How long a replay page read from the store also serves the node's other clients resuming
    /// from the same cursor, so a reconnect storm costs a few reads instead of one per client.
    /// `0s` shares nothing.
    #[serde(with = "humantime_serde")]
    pub replay_sharing: Duration,
    /// How long an idempotency key keeps mapping to the id it first produced.
    #[serde(with = "humantime_serde")]
    pub idempotency_window: Duration,
    /// How often every active topic is checked against its stream, so that a missed pub/sub
    /// message or keyspace notification costs latency, never an event.
    #[serde(with = "humantime_serde")]
    pub catchup_interval: Duration,
    /// Events buffered in memory per topic for live fan-out; a client falling further behind
    /// catches up from the store instead.
    pub fanout_buffer: usize,
    /// A client whose connection accepts no data for this long is disconnected (it resumes
    /// from its `Last-Event-ID` when it comes back).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// On shutdown, clients are told to reconnect after `retry` plus a random part of this, so
    /// their reconnects spread over the remaining nodes instead of arriving at once.
    #[serde(with = "humantime_serde")]
    pub shutdown_retry_spread: Duration,
    /// How long shutdown waits for connections to close after the streams were ended.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Redis connection timing.
    pub redis: RedisSettings,
    /// Who may publish and subscribe. Without a key, everyone may.
    pub auth: Auth,
    /// Which browser origins may use the API from their pages.
    pub cors: Cors,
    /// Bounds on what one node accepts from clients.
    pub limits: Limits,
    /// The Mercure hub at `/.well-known/mercure`.
    pub mercure: Mercure,
    /// Who is connected where, across nodes; join and leave events.
    pub presence: Presence,
    /// HTTPS (and HTTP/2 by ALPN) on `listen`; absent: cleartext HTTP/1.1 and h2c.
    pub tls: Tls,
}

/// The listener's certificate. Both paths set: `listen` serves HTTPS only.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// PEM file with the certificate chain, the node's certificate first.
    pub cert: Option<PathBuf>,
    /// PEM file with the private key (PKCS#8, RSA or EC).
    pub key: Option<PathBuf>,
    /// How often the two files are checked for a change (replaced by cert-manager or certbot);
    /// `SIGHUP` reloads them at once. New connections get the new certificate; open ones keep
    /// theirs.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            cert: None,
            key: None,
            reload_interval: Duration::from_secs(10),
        }
    }
}

impl Tls {
    /// Both files, when TLS is on.
    pub fn files(&self) -> Option<(&PathBuf, &PathBuf)> {
        self.cert.as_ref().zip(self.key.as_ref())
    }
}

/// The cluster-wide registry of open subscriptions (see [`crate::presence`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Presence {
    /// Record every open subscription in the registry. Off: presence reads answer `404`, no
    /// join or leave events are sent, and Mercure's subscription events need it.
    pub enabled: bool,
    /// Topic patterns (`*` matches any run) whose subscribers get `ssegate.join` and
    /// `ssegate.leave` events when someone subscribes to or leaves the topic.
    pub events: Vec<String>,
    /// How long a node's entries outlive its last heartbeat. A node that dies without saying
    /// goodbye has its entries removed (and their leave events sent) by another node within
    /// `node_ttl` plus a third of it (the heartbeat interval).
    #[serde(with = "humantime_serde")]
    pub node_ttl: Duration,
    /// How long a change waits to be written with the others of the same moment: connects
    /// and disconnects are written per node in batches, not one round trip each.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
}

impl Default for Presence {
    fn default() -> Self {
        Presence {
            enabled: true,
            events: Vec::new(),
            node_ttl: Duration::from_secs(15),
            flush_interval: Duration::from_millis(100),
        }
    }
}

/// The Mercure protocol (0.x, the draft of dunglas/mercure v0.24.2) at `/.well-known/mercure`,
/// beside `/v1/events`, through the same layers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mercure {
    /// Serve the hub.
    pub enabled: bool,
    /// Subscribers without a token receive public updates (with one, a token is still checked).
    pub anonymous: bool,
    /// Subscription events and the subscriptions API (`/.well-known/mercure/subscriptions`),
    /// across nodes, from the presence registry.
    pub subscriptions: bool,
    /// Origins (`https://app.example.com`, or `*`) from which a browser may publish with the
    /// cookie: a cookie rides along with any request, so the origin is what proves intent.
    pub publish_origins: Vec<String>,
    /// Cookie holding a Mercure token.
    pub cookie_name: String,
    /// HMAC secret for publishers' tokens; absent: the `auth` key.
    pub publisher_jwt_key: Option<String>,
    /// HMAC secret for subscribers' tokens; absent: the `auth` key.
    pub subscriber_jwt_key: Option<String>,
}

/// JWT authorization. Any of the three key settings switches it on.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// HMAC secret (HS256/384/512).
    pub jwt_key: Option<String>,
    /// Path of a PEM public key (RSA, EC or Ed25519): RS*, PS*, ES*, EdDSA.
    pub jwt_public_key: Option<PathBuf>,
    /// A JWKS document's URL; keys are cached and refetched when a token names an unknown `kid`.
    pub jwks_url: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// Cookie holding the token, for browsers (`EventSource` cannot set headers).
    pub cookie_name: String,
    /// Topic patterns anyone may subscribe to without a token.
    pub anonymous_subscribe: Vec<String>,
    /// The longest a token lives (`exp` − `iat`): a revocation is kept this long (plus the
    /// leeway), after which every token it refused has expired anyway.
    #[serde(with = "humantime_serde")]
    pub max_token_lifetime: Duration,
}

/// Cross-origin access for browser pages.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cors {
    /// Exact origins (`https://app.example.com`) that get CORS headers with credentials, or `*`
    /// for every origin without credentials. Empty: no CORS headers at all.
    pub allowed_origins: Vec<String>,
}

/// Per-node bounds on connections and request heads.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Open connections the node accepts; over it, new ones get a `503`. `None`: derived from
    /// the process's open-file limit at start.
    pub max_connections: Option<usize>,
    /// Time a request head has to arrive, on new and kept-alive connections alike; also how long
    /// an idle kept-alive connection stays open.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Requests (streams included) one HTTP/2 connection may have open at once; the client is
    /// told in its `SETTINGS`. Connections count toward `max_connections`, streams here.
    pub max_streams_per_connection: u32,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Per-topic history retention.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// Events kept per topic; 0 keeps everything.
    pub max_events: u64,
    /// Trim with `MAXLEN ~` (much cheaper; keeps at least `max_events`) instead of exactly.
    pub approximate: bool,
    /// Events older than this are trimmed when the topic is next published to (`MINID`).
    #[serde(with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// A topic with no publish for this long is removed (its stream and idempotency keys); its
    /// last id is kept for as long again, so a client resuming it is told of the gap.
    #[serde(with = "humantime_serde")]
    pub idle_ttl: Option<Duration>,
}

/// How to talk to Redis: timeouts (the driver's defaults are too short for large replays),
/// cluster mode, and how many replicas must have an event before it is acknowledged.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// Whether `redis_url` names a Redis Cluster. Absent: asked of the first node that answers
    /// (`INFO cluster`), so pointing `redis_url` at any cluster node is enough.
    pub cluster: Option<bool>,
    /// Replicas that must confirm an event (`WAIT`) before its publish is acknowledged. With 0 a
    /// failover can lose acknowledged events (readers are told with a gap); with 1 or more it
    /// cannot, at the price of one replication round trip per publish.
    pub min_replicas_ack: u32,
    /// How long a publish waits for `min_replicas_ack` replicas; then it is answered `503` and
    /// the publisher retries with its idempotency key.
    #[serde(with = "humantime_serde")]
    pub replica_ack_timeout: Duration,
    /// Time allowed to open a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed for one command's answer; also how fast a hung connection is noticed.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Interval of the health check on the pub/sub connection.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            log_format: LogFormat::Text,
            ui: true,
            metrics_listen: None,
            redis_url: None,
            key_prefix: "ssegate".into(),
            retention: Retention::default(),
            heartbeat_interval: Duration::from_secs(15),
            retry: Duration::from_secs(2),
            max_event_bytes: 64 * 1024,
            max_batch_events: 1000,
            max_topics_per_connection: 64,
            replay_page_size: 500,
            replay_sharing: Duration::from_secs(1),
            idempotency_window: Duration::from_secs(300),
            catchup_interval: Duration::from_secs(5),
            fanout_buffer: 1024,
            shutdown_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            shutdown_retry_spread: Duration::from_secs(5),
            redis: RedisSettings::default(),
            auth: Auth::default(),
            cors: Cors::default(),
            limits: Limits::default(),
            mercure: Mercure::default(),
            presence: Presence::default(),
            tls: Tls::default(),
        }
    }
}

impl Default for Mercure {
    fn default() -> Self {
        Mercure {
            enabled: true,
            anonymous: false,
            subscriptions: false,
            publish_origins: Vec::new(),
            cookie_name: "mercureAuthorization".into(),
            publisher_jwt_key: None,
            subscriber_jwt_key: None,
        }
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            jwt_key: None,
            jwt_public_key: None,
            jwks_url: None,
            audience: None,
            issuer: None,
            leeway: Duration::from_secs(5),
            max_token_lifetime: Duration::from_secs(24 * 3600),
            cookie_name: "ssegate_token".into(),
            anonymous_subscribe: Vec::new(),
        }
    }
}

impl Auth {
    /// Whether any key is configured, i.e. whether tokens are required.
    pub fn enabled(&self) -> bool {
        self.jwt_key.is_some() || self.jwt_public_key.is_some() || self.jwks_url.is_some()
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: None,
            header_timeout: Duration::from_secs(10),
            max_streams_per_connection: 100,
        }
    }
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_events: 10_000,
            approximate: true,
            max_age: None,
            idle_ttl: None,
        }
    }
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            cluster: None,
            min_replicas_ack: 0,
            replica_ack_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(3),
            ping_interval: Duration::from_secs(1),
        }
    }
}

/// One warning line naming the `SSEGATE_*` variables that name no setting.
pub fn warn_ignored(ignored: &[String]) {
    if !ignored.is_empty() {
        tracing::warn!(
            variables = %ignored.join(", "),
            "ignoring environment variables that start with SSEGATE_ but name no setting"
        );
    }
}

/// Splits the environment into the `SSEGATE_*` variables that name a setting (`__` between
/// levels) and the names of those that do not.
fn setting_variables(
    vars: impl Iterator<Item = (String, String)>,
) -> (HashMap<String, String>, Vec<String>) {
    let known = serde_json::to_value(Settings::default()).unwrap_or_default();
    let mut settings = HashMap::new();
    let mut ignored = Vec::new();
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix("SSEGATE_") else {
            continue;
        };
        let lower = rest.to_ascii_lowercase();
        let mut node = Some(&known);
        for part in lower.split("__") {
            node = node.and_then(|n| n.get(part));
        }
        if node.is_some() {
            settings.insert(name, value);
        } else {
            ignored.push(name);
        }
    }
    ignored.sort();
    (settings, ignored)
}

/// The layers above the defaults that only the command line can give.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub redis_url: Option<String>,
}

/// A setting that cannot be used, named so the operator can fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: `{setting}` {problem}")]
    Invalid {
        setting: &'static str,
        problem: String,
    },
}

impl Settings {
    /// Loads defaults < file < `SSEGATE_*` environment < flags, then validates.
    pub fn load(overrides: Overrides) -> Result<Settings, ConfigError> {
        let (settings, ignored) = Self::load_noting_ignored(overrides)?;
        warn_ignored(&ignored);
        Ok(settings)
    }

    /// As [`Settings::load`], returning the names of the `SSEGATE_*` variables it ignored
    /// instead of logging them, for a caller that sets up logging from the settings first.
    pub fn load_noting_ignored(
        overrides: Overrides,
    ) -> Result<(Settings, Vec<String>), ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = &overrides.config_file {
            builder = builder.add_source(config::File::from(path.as_path()).required(true));
        }
        let (variables, ignored) = setting_variables(std::env::vars());
        builder = builder.add_source(
            config::Environment::with_prefix("SSEGATE")
                .source(Some(variables))
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                // Lists come comma-separated: SSEGATE_CORS__ALLOWED_ORIGINS=https://a,https://b
                .list_separator(",")
                .with_list_parse_key("cors.allowed_origins")
                .with_list_parse_key("auth.anonymous_subscribe")
                .with_list_parse_key("mercure.publish_origins")
                .with_list_parse_key("presence.events"),
        );
        if let Some(listen) = overrides.listen {
            builder = builder.set_override("listen", listen.to_string())?;
        }
        if let Some(url) = overrides.redis_url {
            builder = builder.set_override("redis_url", url)?;
        }
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok((settings, ignored))
    }

    /// Rejects values the gateway cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |setting, problem: &str| {
            Err(ConfigError::Invalid {
                setting,
                problem: problem.to_owned(),
            })
        };
        let prefix_ok = !self.key_prefix.is_empty()
            && self.key_prefix.len() <= 64
            && self
                .key_prefix
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"{}*?[]".contains(&b));
        if !prefix_ok {
            return invalid(
                "key_prefix",
                "must be 1-64 printable ASCII characters without whitespace, braces or glob characters",
            );
        }
        if let Some(urls) = &self.redis_url {
            for url in urls.split(',').map(str::trim) {
                if !(url.starts_with("redis://")
                    || url.starts_with("rediss://")
                    || url.starts_with("unix://"))
                {
                    return invalid(
                        "redis_url",
                        "must be one URL, or a comma-separated list of cluster seed nodes, each starting with redis://, rediss:// or unix://",
                    );
                }
            }
        }
        if self.redis.min_replicas_ack > 0 && self.redis.replica_ack_timeout.is_zero() {
            return invalid(
                "redis.replica_ack_timeout",
                "must be more than 0 when redis.min_replicas_ack is set",
            );
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return invalid("tls", "needs both `cert` and `key`, or neither");
        }
        if self.tls.reload_interval < Duration::from_millis(10) {
            return invalid("tls.reload_interval", "must be at least 10ms");
        }
        if !(1..=10_000).contains(&self.limits.max_streams_per_connection) {
            return invalid(
                "limits.max_streams_per_connection",
                "must be between 1 and 10000",
            );
        }
        if self.heartbeat_interval < Duration::from_millis(10) {
            return invalid("heartbeat_interval", "must be at least 10ms");
        }
        if self.retry.is_zero() {
            return invalid("retry", "must be more than 0");
        }
        if !(1..=16 * 1024 * 1024).contains(&self.max_event_bytes) {
            return invalid("max_event_bytes", "must be between 1 and 16777216");
        }
        if !(1..=10_000).contains(&self.max_batch_events) {
            return invalid("max_batch_events", "must be between 1 and 10000");
        }
        if self
            .retention
            .max_age
            .is_some_and(|a| a < Duration::from_secs(1))
        {
            return invalid("retention.max_age", "must be at least 1s");
        }
        if let Some(ttl) = self.retention.idle_ttl {
            if ttl < self.idempotency_window {
                return invalid(
                    "retention.idle_ttl",
                    "must be at least idempotency_window (a removed topic takes its idempotency keys with it)",
                );
            }
        }
        if !(1..=1024).contains(&self.max_topics_per_connection) {
            return invalid("max_topics_per_connection", "must be between 1 and 1024");
        }
        if !(1..=10_000).contains(&self.replay_page_size) {
            return invalid("replay_page_size", "must be between 1 and 10000");
        }
        if self.replay_sharing > Duration::from_secs(60) {
            return invalid("replay_sharing", "must be at most 1m");
        }
        if self.idempotency_window < Duration::from_secs(1) {
            return invalid("idempotency_window", "must be at least 1s");
        }
        if self.catchup_interval < Duration::from_millis(10) {
            return invalid("catchup_interval", "must be at least 10ms");
        }
        if !(16..=1_000_000).contains(&self.fanout_buffer) {
            return invalid("fanout_buffer", "must be between 16 and 1000000");
        }
        if self.write_timeout < Duration::from_millis(100) {
            return invalid("write_timeout", "must be at least 100ms");
        }
        if self.redis.response_timeout < Duration::from_millis(10) {
            return invalid("redis.response_timeout", "must be at least 10ms");
        }
        if self.redis.connect_timeout < Duration::from_millis(10) {
            return invalid("redis.connect_timeout", "must be at least 10ms");
        }
        if self.redis.ping_interval < Duration::from_millis(10) {
            return invalid("redis.ping_interval", "must be at least 10ms");
        }
        let keys = [
            self.auth.jwt_key.is_some(),
            self.auth.jwt_public_key.is_some(),
            self.auth.jwks_url.is_some(),
        ];
        if keys.iter().filter(|k| **k).count() > 1 {
            return invalid(
                "auth",
                "takes one of jwt_key, jwt_public_key and jwks_url, not several",
            );
        }
        if self.auth.jwt_key.as_ref().is_some_and(|k| k.len() < 32) {
            return invalid(
                "auth.jwt_key",
                "must be at least 32 bytes (a short HMAC secret can be guessed offline)",
            );
        }
        if let Some(url) = &self.auth.jwks_url {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return invalid("auth.jwks_url", "must be an http:// or https:// URL");
            }
        }
        if self.auth.max_token_lifetime < Duration::from_secs(1) {
            return invalid("auth.max_token_lifetime", "must be at least 1s");
        }
        if self.auth.leeway > Duration::from_secs(300) {
            return invalid("auth.leeway", "must be at most 5m");
        }
        if !is_cookie_name(&self.auth.cookie_name) {
            return invalid("auth.cookie_name", "must be a valid cookie name");
        }
        if !self.cors.allowed_origins.iter().all(|o| is_origin(o)) {
            return invalid(
                "cors.allowed_origins",
                "takes `*` or origins like https://app.example.com (scheme, host, optional port, no path)",
            );
        }
        if !is_cookie_name(&self.mercure.cookie_name) {
            return invalid("mercure.cookie_name", "must be a valid cookie name");
        }
        if !self.mercure.publish_origins.iter().all(|o| is_origin(o)) {
            return invalid(
                "mercure.publish_origins",
                "takes `*` or origins like https://app.example.com (scheme, host, optional port, no path)",
            );
        }
        for (setting, key) in [
            ("mercure.publisher_jwt_key", &self.mercure.publisher_jwt_key),
            (
                "mercure.subscriber_jwt_key",
                &self.mercure.subscriber_jwt_key,
            ),
        ] {
            if key.as_ref().is_some_and(|k| k.len() < 32) {
                return invalid(
                    setting,
                    "must be at least 32 bytes (a short HMAC secret can be guessed offline)",
                );
            }
        }
        if self.mercure.subscriptions && !self.presence.enabled {
            return invalid(
                "mercure.subscriptions",
                "needs `presence.enabled`: subscription events and the subscriptions API read the presence registry",
            );
        }
        if self.presence.node_ttl < Duration::from_millis(400) {
            return invalid("presence.node_ttl", "must be at least 400ms");
        }
        if self.presence.flush_interval.is_zero()
            || self.presence.flush_interval * 4 > self.presence.node_ttl
        {
            return invalid(
                "presence.flush_interval",
                "must be more than 0 and at most a quarter of presence.node_ttl",
            );
        }
        if self.limits.max_connections == Some(0) {
            return invalid("limits.max_connections", "must be more than 0");
        }
        if self.limits.header_timeout < Duration::from_millis(100) {
            return invalid("limits.header_timeout", "must be at least 100ms");
        }
        Ok(())
    }
}

/// A cookie name as RFC 6265 allows it (an HTTP token).
fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// `*`, or a browser origin: scheme, host and optional port, no path.
fn is_origin(origin: &str) -> bool {
    origin == "*"
        || ((origin.starts_with("http://") || origin.starts_with("https://"))
            && !origin.ends_with('/')
            && axum::http::HeaderValue::from_str(origin).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_naming_no_setting_are_set_aside() {
        let vars = [
            ("SSEGATE_RETENTION__MAX_EVENTS", "5"),
            ("SSEGATE_HEARTBEAT_INTERVAL", "3s"),
            ("SSEGATE_AUTH__JWT_KEY", "k"),
            ("SSEGATE_PORT", "tcp://10.96.0.12:8080"),
            ("SSEGATE_SERVICE_HOST", "10.96.0.12"),
            ("SSEGATE_PORT_8080_TCP_ADDR", "10.96.0.12"),
            ("SSEGATE_RETENTION__MAX_EVENT", "5"),
            ("OTHER", "x"),
        ]
        .map(|(n, v)| (n.to_owned(), v.to_owned()));
        let (settings, ignored) = setting_variables(vars.into_iter());
        let mut kept: Vec<&str> = settings.keys().map(String::as_str).collect();
        kept.sort();
        assert_eq!(
            kept,
            [
                "SSEGATE_AUTH__JWT_KEY",
                "SSEGATE_HEARTBEAT_INTERVAL",
                "SSEGATE_RETENTION__MAX_EVENTS"
            ]
        );
        assert_eq!(
            ignored,
            [
                "SSEGATE_PORT",
                "SSEGATE_PORT_8080_TCP_ADDR",
                "SSEGATE_RETENTION__MAX_EVENT",
                "SSEGATE_SERVICE_HOST"
            ]
        );
    }

    #[test]
    fn defaults_are_valid() {
        Settings::default().validate().unwrap();
    }

    #[test]
    fn bad_values_name_the_setting() {
        let s = Settings {
            replay_page_size: 0,
            ..Settings::default()
        };
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("replay_page_size"), "{err}");
        let s = Settings {
            key_prefix: "a{b".into(),
            ..Settings::default()
        };
        assert!(s.validate().unwrap_err().to_string().contains("key_prefix"));
    }

    #[test]
    fn file_then_flags_layer_over_defaults() {
        let dir = std::env::temp_dir().join(format!("ssegate-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ssegate.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\nheartbeat_interval = \"3s\"\n[retention]\nmax_events = 7\n",
        )
        .unwrap();
        let s = Settings::load(Overrides {
            config_file: Some(file.clone()),
            listen: Some("127.0.0.1:9001".parse().unwrap()),
            redis_url: None,
        })
        .unwrap();
        assert_eq!(s.listen.port(), 9001, "flag wins over file");
        assert_eq!(s.heartbeat_interval, Duration::from_secs(3));
        assert_eq!(s.retention.max_events, 7);
        assert!(s.retention.approximate, "untouched default stays");

        std::fs::write(&file, "heartbeat_interval = \"soon\"\n").unwrap();
        let err = Settings::load(Overrides {
            config_file: Some(file),
            ..Overrides::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("heartbeat_interval"), "{err}");
    }
}
