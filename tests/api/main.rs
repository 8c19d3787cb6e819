//! The integration test binary: one binary, so it links once.
//!
//! Tests that involve Redis start their own `redis-server` (see `helpers::RedisServer`).

mod browser;
mod browser_tls;
mod chaos;
mod cluster;
mod commit;
mod delivery;
mod failure;
mod h2_floods;
mod helpers;
mod input;
mod many_topics;
mod mercure;
mod mercure_clients;
mod ops;
mod presence;
mod process;
mod raw;
mod security;
mod server_api;
mod store;
mod tls;
mod topics;
mod ui;
