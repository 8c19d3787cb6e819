//! The Lua scripts and how they are called.
//!
//! redis-rs's `ScriptInvocation` sends `EVALSHA` and falls back to loading the script, but cannot
//! put another command in the same pipeline. An append that must be replicated needs `WAIT`
//! right behind its script on the same connection (in a cluster: on the master the script ran
//! on, which the cluster client picks by the script's first key for the whole pipeline), so the
//! call is built here.

use std::time::Duration;

use redis::{Cmd, ErrorKind, RedisResult, Script, ServerErrorKind, ToRedisArgs, Value};

use super::connection::Commands;

pub(super) struct Scripts {
    pub(super) append: Script,
    pub(super) read: Script,
    pub(super) tail: Script,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            append: Script::new(include_str!("append.lua")),
            read: Script::new(include_str!("read.lua")),
            tail: Script::new(include_str!("tail.lua")),
        }
    }
}

/// One script call: its keys (all in one topic's slot) and arguments.
pub(super) struct Call<'a> {
    script: &'a Script,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

/// How many replicas must confirm a write, and how long to wait for them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Replication {
    pub(super) replicas: u32,
    pub(super) timeout: Duration,
}

impl<'a> Call<'a> {
    pub(super) fn new(script: &'a Script) -> Call<'a> {
        Call {
            script,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    pub(super) fn key(&mut self, key: impl ToRedisArgs) -> &mut Self {
        self.keys.extend(key.to_redis_args());
        self
    }

    pub(super) fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        self.args.extend(arg.to_redis_args());
        self
    }

    /// A key already in bytes, moved in.
    pub(super) fn key_bytes(&mut self, key: Vec<u8>) -> &mut Self {
        self.keys.push(key);
        self
    }

    /// An argument already in bytes, moved in (event payloads are not copied again).
    pub(super) fn arg_bytes(&mut self, arg: Vec<u8>) -> &mut Self {
        self.args.push(arg);
        self
    }

    fn evalsha(&self) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash())
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        cmd
    }

    /// Runs the script; with `replication`, also waits until that many replicas have its writes
    /// and returns how many did. Loads the script once if Redis does not know it (a restarted
    /// or newly promoted node).
    pub(super) async fn invoke(
        &self,
        conn: &mut Commands,
        replication: Option<Replication>,
    ) -> RedisResult<(Value, Option<u32>)> {
        let mut loaded = false;
        loop {
            let result = match replication {
                None => self
                    .evalsha()
                    .query_async::<Value>(conn)
                    .await
                    .map(|v| (v, None)),
                Some(r) => {
                    let mut pipe = redis::pipe();
                    pipe.add_command(self.evalsha())
                        .cmd("WAIT")
                        .arg(r.replicas)
                        .arg(r.timeout.as_millis() as u64);
                    pipe.query_async::<(Value, u32)>(conn)
                        .await
                        .map(|(v, acked)| (v, Some(acked)))
                }
            };
            match result {
                Err(e) if !loaded && e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    self.script.prepare_invoke().load_async(conn).await?;
                    loaded = true;
                }
                other => return other,
            }
        }
    }
}
