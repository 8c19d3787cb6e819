//! The Lua scripts and how they are called.
//!
//! redis-rs's `ScriptInvocation` sends `EVALSHA` and falls back to loading the script (on a
//! cluster, on every master), but cannot put another command in the same pipeline. An append that must be replicated needs `WAIT`
//! right behind its script on the same connection (in a cluster: on the master the script ran
//! on, which the cluster client picks by the script's first key for the whole pipeline), so the
//! call is built here.

use std::time::Duration;

use redis::{Arg, Cmd, ErrorKind, RedisResult, Script, ServerErrorKind, ToRedisArgs, Value};

use super::connection::Commands;

pub(super) struct Scripts {
    pub(super) append: Lua,
    pub(super) read: Lua,
    pub(super) read_labels: Lua,
    pub(super) tail: Lua,
    pub(super) stat: Lua,
    pub(super) delete: Lua,
    pub(super) file_until: Lua,
    pub(super) fence: Lua,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            append: Lua::new(include_str!("append.lua")),
            read: Lua::new(include_str!("read.lua")),
            read_labels: Lua::new(include_str!("read_labels.lua")),
            tail: Lua::new(include_str!("tail.lua")),
            stat: Lua::new(include_str!("stat.lua")),
            delete: Lua::new(include_str!("delete.lua")),
            file_until: Lua::new(include_str!("file_until.lua")),
            fence: Lua::new(include_str!("fence.lua")),
        }
    }
}

/// A script, called by its SHA, and its source for a node that does not know it yet.
///
/// Such a node (restarted, or a replica just promoted) is sent the call again as `EVAL` with the
/// source, which runs it and caches it there. redis-rs would send `SCRIPT LOAD`, which its
/// cluster client routes to every master: one hung master then held up every slot's first call.
#[derive(Clone)]
pub(super) struct Lua {
    script: Script,
    source: &'static str,
}

impl Lua {
    pub(super) fn new(source: &'static str) -> Lua {
        Lua {
            script: Script::new(source),
            source,
        }
    }
}

/// One script call, as the `EVALSHA` command it sends. Keys and arguments are written straight
/// into the command's one buffer: a publish call carries several per event, and a `Vec` per
/// argument was a good part of the publish path's allocations.
pub(super) struct Call<'a> {
    script: &'a Lua,
    cmd: Cmd,
    /// Keys still to come: `EVALSHA` gives their count before them, so they are written first.
    keys_due: usize,
}

/// How many replicas must confirm a write, and how long to wait for them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Replication {
    pub(super) replicas: u32,
    pub(super) timeout: Duration,
}

impl<'a> Call<'a> {
    /// A call with `keys` keys, which the first `key` calls give (all in one topic's slot).
    pub(super) fn new(script: &'a Lua, keys: usize) -> Call<'a> {
        Call::with_capacity(script, keys, keys + 8, 256)
    }

    /// Likewise, with room for `args` keys and arguments of `bytes` bytes in all.
    pub(super) fn with_capacity(
        script: &'a Lua,
        keys: usize,
        args: usize,
        bytes: usize,
    ) -> Call<'a> {
        let mut cmd = Cmd::with_capacity(args + 3, bytes + 64);
        cmd.arg("EVALSHA").arg(script.script.get_hash()).arg(keys);
        Call {
            script,
            cmd,
            keys_due: keys,
        }
    }

    pub(super) fn key(&mut self, key: impl ToRedisArgs) -> &mut Self {
        debug_assert!(self.keys_due > 0, "more keys than the call was made for");
        self.keys_due = self.keys_due.saturating_sub(1);
        self.cmd.arg(key);
        self
    }

    pub(super) fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        debug_assert_eq!(self.keys_due, 0, "an argument before every key was given");
        self.cmd.arg(arg);
        self
    }

    /// Runs the script; with `replication`, also waits until that many replicas have its writes
    /// and returns how many did. Loads the script once if Redis does not know it (a restarted
    /// or newly promoted node).
    pub(super) async fn invoke(
        &self,
        conn: &mut Commands,
        replication: Option<Replication>,
    ) -> RedisResult<(Value, Option<u32>)> {
        debug_assert_eq!(self.keys_due, 0, "a call sent without all its keys");
        match send(&self.cmd, conn, replication).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                send(&self.with_source(), conn, replication).await
            }
            other => other,
        }
    }

    /// The call as `EVAL` with the script's source instead of its SHA (calls have no cursor
    /// arguments).
    fn with_source(&self) -> Cmd {
        let mut eval = Cmd::with_capacity(self.cmd.args_iter().len(), self.script.source.len());
        eval.arg("EVAL").arg(self.script.source);
        for arg in self.cmd.args_iter().skip(2) {
            if let Arg::Simple(bytes) = arg {
                eval.arg(bytes);
            }
        }
        eval
    }
}

/// Sends one script command; with `replication`, `WAIT` right behind it on the same connection.
async fn send(
    cmd: &Cmd,
    conn: &mut Commands,
    replication: Option<Replication>,
) -> RedisResult<(Value, Option<u32>)> {
    match replication {
        None => cmd.query_async::<Value>(conn).await.map(|v| (v, None)),
        Some(r) => {
            let mut pipe = redis::pipe();
            pipe.add_command(cmd.clone())
                .cmd("WAIT")
                .arg(r.replicas)
                .arg(r.timeout.as_millis() as u64);
            pipe.query_async::<(Value, u32)>(conn)
                .await
                .map(|(v, acked)| (v, Some(acked)))
        }
    }
}
