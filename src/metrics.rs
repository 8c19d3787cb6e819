//! Prometheus metrics, served at `/metrics` (or on `metrics_listen`).
//!
//! Each gateway has its own [`Metrics`], made at start and passed down to what counts (the hub,
//! the server, the store, the handlers), like the shutdown signal: no global recorder, so several
//! gateways in one process (the tests) keep their figures apart. Values that other parts already
//! keep (active topics, Redis connection state) are read when scraped rather than counted twice;
//! the server keeps its open-connection count here only, and checks its limit against it.

use std::fmt::Write;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// How a publish request ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum PublishResult {
    /// `201`: every event stored.
    acknowledged,
    /// `4xx`: bad input, or not allowed.
    refused,
    /// `5xx`: the store failed or was unavailable.
    failed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: PublishResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabel {
    pub call: &'static str,
}

/// The `call` values of `ssegate_api_calls_total`.
pub const API_CALLS: [&str; 5] = ["history", "topic", "topics", "delete", "disconnect"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabel {
    pub connection: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// The `reason` values of `ssegate_auth_failures_total` (see [`crate::auth::AuthError::code`]).
pub const AUTH_FAILURE_REASONS: [&str; 13] = [
    "missing",
    "malformed",
    "signature",
    "algorithm",
    "expired",
    "not_yet_valid",
    "audience",
    "issuer",
    "unknown_key",
    "keys_unavailable",
    "revoked",
    "forbidden",
    "uncovered",
];

/// Every metric of one gateway.
pub struct Metrics {
    registry: Registry,
    /// Event streams open now.
    pub open_streams: Gauge,
    /// Topics with a client on this node (set when scraped).
    pub active_topics: Gauge,
    /// Distinct Mercure subscriptions routed on this node (set when scraped).
    pub mercure_subscriptions: Gauge,
    /// This node's entries in the presence registry (set when scraped).
    pub presence_entries: Gauge,
    /// Connections open now; the server's connection limit is checked against it.
    pub open_connections: Gauge,
    /// Connections refused for `limits.max_connections`.
    pub rejected_connections: Counter<u64, AtomicU64>,
    /// Publish requests, by how they ended.
    pub publishes: Family<ResultLabel, Counter>,
    /// Events stored by publish requests.
    pub events_published: Counter,
    /// Time from a publish request's arrival to its answer.
    pub publish_duration: Histogram,
    /// Events written to clients (a replayed page counts its events).
    pub deliveries: Counter,
    /// Replay pages served, by whether a store read was shared or made.
    pub replay_reads: Family<SourceLabel, Counter>,
    /// Clients that fell behind the in-memory feed and caught up from the store.
    pub catch_ups: Counter,
    /// Gap notices sent, by reason.
    pub gaps: Family<ReasonLabel, Counter>,
    /// Clients disconnected because a write made no progress within `write_timeout`.
    pub slow_client_disconnects: Counter,
    /// Requests whose credentials were refused, by reason.
    pub auth_failures: Family<ReasonLabel, Counter>,
    /// Time Redis took to answer a command (scripts included).
    pub redis_command_duration: Histogram,
    /// Redis commands that failed or timed out.
    pub redis_errors: Counter,
    /// Publish appends waiting for the Redis call in flight for their slot (group commit).
    pub redis_appends_waiting: Gauge,
    /// Append script calls; with `events_published`, how many events a call carries.
    pub redis_append_calls: Counter,
    /// Whether each Redis connection works: 1 or 0 (set when scraped).
    pub redis_connected: Family<ConnectionLabel, Gauge>,
    /// Server API calls that passed authorization, by call.
    pub api_calls: Family<CallLabel, Counter>,
    /// Revocations filed through this node.
    pub revocations: Counter,
    /// Streams this node ended because a disconnect or a revocation selected them.
    pub streams_ended: Counter,
    /// Entries in the revocation list, as last read from the store.
    pub revocation_entries: Gauge,
    /// Heap bytes in use (set when scraped), in the `heap-stats` build only.
    pub heap_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ssegate");
        let m = Metrics {
            open_streams: Gauge::default(),
            active_topics: Gauge::default(),
            mercure_subscriptions: Gauge::default(),
            presence_entries: Gauge::default(),
            open_connections: Gauge::default(),
            rejected_connections: Counter::default(),
            publishes: Family::default(),
            events_published: Counter::default(),
            // 100 µs .. ~1.6 s
            publish_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            deliveries: Counter::default(),
            replay_reads: Family::default(),
            catch_ups: Counter::default(),
            gaps: Family::default(),
            slow_client_disconnects: Counter::default(),
            auth_failures: Family::default(),
            redis_command_duration: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            redis_errors: Counter::default(),
            redis_appends_waiting: Gauge::default(),
            redis_append_calls: Counter::default(),
            redis_connected: Family::default(),
            api_calls: Family::default(),
            revocations: Counter::default(),
            streams_ended: Counter::default(),
            revocation_entries: Gauge::default(),
            heap_bytes: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "open_streams",
            "Event streams open now",
            m.open_streams.clone(),
        );
        r.register(
            "active_topics",
            "Topics with a client on this node",
            m.active_topics.clone(),
        );
        r.register(
            "mercure_subscriptions",
            "Distinct Mercure subscriptions (selectors and token) routed on this node",
            m.mercure_subscriptions.clone(),
        );
        r.register(
            "presence_entries",
            "Open streams of this node in the presence registry",
            m.presence_entries.clone(),
        );
        r.register(
            "open_connections",
            "Client connections open now",
            m.open_connections.clone(),
        );
        r.register(
            "rejected_connections",
            "Connections refused for limits.max_connections",
            m.rejected_connections.clone(),
        );
        r.register(
            "publish_requests",
            "Publish requests, by result",
            m.publishes.clone(),
        );
        r.register(
            "events_published",
            "Events stored by publish requests",
            m.events_published.clone(),
        );
        r.register_with_unit(
            "publish_duration",
            "Time from a publish request's arrival to its answer",
            Unit::Seconds,
            m.publish_duration.clone(),
        );
        r.register(
            "deliveries",
            "Events written to clients",
            m.deliveries.clone(),
        );
        r.register(
            "replay_reads",
            "Replay pages served, by source: shared (a read another client started) or store",
            m.replay_reads.clone(),
        );
        r.register(
            "catch_ups",
            "Clients that fell behind the in-memory feed and caught up from the store",
            m.catch_ups.clone(),
        );
        r.register("gaps", "Gap notices sent, by reason", m.gaps.clone());
        r.register(
            "slow_client_disconnects",
            "Clients disconnected after write_timeout without progress",
            m.slow_client_disconnects.clone(),
        );
        r.register(
            "auth_failures",
            "Requests whose credentials were refused, by reason",
            m.auth_failures.clone(),
        );
        r.register_with_unit(
            "redis_command_duration",
            "Time Redis took to answer a command",
            Unit::Seconds,
            m.redis_command_duration.clone(),
        );
        r.register(
            "redis_errors",
            "Redis commands that failed or timed out",
            m.redis_errors.clone(),
        );
        r.register(
            "redis_appends_waiting",
            "Publish appends waiting for the Redis call in flight for their slot",
            m.redis_appends_waiting.clone(),
        );
        r.register(
            "redis_append_calls",
            "Append calls to Redis, each one round trip (concurrent publishes share one)",
            m.redis_append_calls.clone(),
        );
        r.register(
            "redis_connected",
            "Whether each Redis connection (command, subscription) works",
            m.redis_connected.clone(),
        );
        r.register(
            "api_calls",
            "Server API calls (history, topic state, topic list, delete, disconnect)",
            m.api_calls.clone(),
        );
        r.register(
            "revocations",
            "Token revocations filed through this node",
            m.revocations.clone(),
        );
        r.register(
            "streams_ended",
            "Streams ended because a disconnect or a revocation selected them",
            m.streams_ended.clone(),
        );
        r.register(
            "revocation_entries",
            "Entries in the revocation list, as last read from the store",
            m.revocation_entries.clone(),
        );
        if cfg!(feature = "heap-stats") {
            r.register(
                "heap_bytes",
                "Heap bytes allocated and not freed (the heap-stats build)",
                m.heap_bytes.clone(),
            );
        }
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        r.register("build_info", "The running build", build);
        // Every known series starts at zero, so that rates work from the first scrape.
        for result in [
            PublishResult::acknowledged,
            PublishResult::refused,
            PublishResult::failed,
        ] {
            let _ = m.publishes.get_or_create(&ResultLabel { result });
        }
        for source in ["shared", "store"] {
            let _ = m.replay_reads.get_or_create(&SourceLabel { source });
        }
        for call in API_CALLS {
            let _ = m.api_calls.get_or_create(&CallLabel { call });
        }
        for reason in ["trimmed", "unknown_cursor", "deleted"] {
            let _ = m.gaps.get_or_create(&ReasonLabel { reason });
        }
        for reason in AUTH_FAILURE_REASONS {
            let _ = m.auth_failures.get_or_create(&ReasonLabel { reason });
        }
        for connection in ["command", "subscription"] {
            let _ = m
                .redis_connected
                .get_or_create(&ConnectionLabel { connection });
        }
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            // Writing into a String cannot fail; keep the scrape well-formed regardless.
            out.clear();
            let _ = writeln!(out, "# EOF");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new();
        m.publishes
            .get_or_create(&ResultLabel {
                result: PublishResult::acknowledged,
            })
            .inc();
        m.publish_duration.observe(0.002);
        let text = m.render();
        for name in [
            "ssegate_open_streams ",
            "ssegate_publish_requests_total{result=\"acknowledged\"} 1",
            "ssegate_publish_duration_seconds_bucket",
            "ssegate_deliveries_total 0",
            "ssegate_build_info{version=",
        ] {
            assert!(text.contains(name), "{name} missing in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
