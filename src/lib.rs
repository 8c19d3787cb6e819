//! ssegate: a Redis-backed, horizontally scalable Server-Sent Events gateway.
//!
//! Every published event is appended to a Redis Stream per topic; the stream entry ID is the SSE
//! `id`, so any node can resume any client after its `Last-Event-ID`. Events reach every node live
//! through Redis pub/sub (and keyspace notifications for programs that `XADD` directly), and each
//! node fans them out to its own connections in memory. Without Redis, one node runs on an embedded
//! in-memory store with the same semantics.
//!
//! # Layout
//!
//! - [`config`]: settings, layered defaults < file < environment < flags, and their validation.
//! - [`startup`]: builds the store, the hub and the router; serves until shutdown.
//! - [`http`]: the router and the layers every request passes (authentication, CORS), the handlers
//!   (`/v1/events`, health), the error → response mapping, and the server: connection limit,
//!   header timeout, write deadline, and event streams written on the socket (an idle stream
//!   then costs a few KiB instead of hyper's per-connection buffers), always as the router
//!   answered them.
//! - [`tls`]: the listener's certificate from PEM files, ALPN (`h2`, `http/1.1`), reloading on
//!   `SIGHUP` and on file changes.
//! - [`auth`]: JWT verification (HMAC, PEM, JWKS), topic patterns, where tokens come from, and
//!   the publish/subscribe rules, and the node's copy of the revocation list.
//! - [`control`]: disconnects (announced to every node) ending streams by topic through the hub,
//!   and by `sub` or `jti` through a filing of the streams of such tokens; revocations filed in
//!   the store and followed live by every node.
//! - [`mercure`]: the Mercure protocol as an adapter over the hub and the store: topic
//!   selectors, the hub-wide log of updates, resuming from an update's id.
//! - [`presence`]: who is subscribed where across nodes (a registry in Redis, batched writes,
//!   heartbeats and reaping of dead nodes), join and leave events.
//! - [`hub`]: the per-node topic hub: one store subscription per active topic, in-memory fan-out,
//!   and the per-client replay → live state machine that keeps the seam exact.
//! - [`store`]: the small [`store::Store`] trait and its two implementations, memory and Redis.
//! - [`sse`]: SSE frame encoding.
//! - [`event`]: the domain types shared by all of the above (stream ids, topics, events).
//! - [`shutdown`]: the shutdown signal passed down to every long-lived task and stream.
//! - [`telemetry`]: tracing set-up.
//! - [`heap`]: the heap's bytes in use, counted by an allocator wrapper in the soak's diagnostic
//!   build (`heap-stats`).

pub mod auth;
pub mod config;
pub mod control;
pub mod cursor;
pub mod event;
pub mod heap;
pub mod http;
pub mod hub;
pub mod mercure;
pub mod metrics;
pub mod presence;
pub mod shutdown;
pub mod sse;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tls;

/// What the unit tests share.
#[cfg(test)]
pub(crate) mod testing {
    use proptest::test_runner::{Config, RngSeed};

    /// Property-test settings: `PROPTEST_CASES` cases (1000 by default; `scripts/fuzz.sh` runs a
    /// million), from `PROPTEST_SEED` or a random seed, printed so a failure can be replayed.
    pub fn proptest_config(target: &str) -> Config {
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(1000);
        let seed = std::env::var("PROPTEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random::<u64>);
        println!("{target}: {cases} cases, PROPTEST_SEED={seed}");
        Config {
            cases,
            rng_seed: RngSeed::Fixed(seed),
            failure_persistence: None,
            ..Config::default()
        }
    }
}
