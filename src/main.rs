//! The `ssegate` binary: flags → settings → run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ssegate::auth::{Grants, MercureGrants};
use ssegate::config::{Overrides, Settings};
use ssegate::shutdown::{self, Shutdown};
use ssegate::startup::Application;

/// mimalloc rather than glibc's malloc: a publish allocates a few dozen short-lived blocks, often
/// freed on another worker thread than the one that allocated them, and glibc's arenas made that
/// ~15 % of the node's CPU. With mimalloc: 63k → 58k instructions per single publish (callgrind),
/// 12–17 % more single publishes a second (wrk, c=32), the same memory per idle stream.
#[cfg(all(feature = "mimalloc", not(feature = "heap-stats")))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The soak's diagnostic build: the same allocator, its bytes in use counted (`ssegate::heap`).
#[cfg(all(feature = "mimalloc", feature = "heap-stats"))]
#[global_allocator]
static GLOBAL: ssegate::heap::Counting<mimalloc::MiMalloc> =
    ssegate::heap::Counting(mimalloc::MiMalloc);

/// How often, at most, a worker thread going idle has mimalloc give back what it can.
#[cfg(feature = "mimalloc")]
const GIVE_BACK_EVERY: Duration = Duration::from_secs(1);

/// Runs whenever a worker thread parks (it has nothing to do). mimalloc keeps, per thread, the
/// blocks other threads freed until the owning thread next allocates, and returns freed pages
/// to the OS only from later allocator calls: a node gone quiet after a busy while kept them
/// (the soak, idle: 40 MiB RSS with 1 MiB of heap in use). `mi_collect` does both now. At most
/// once a second per thread, and only when the thread is idle, so a busy node pays nothing.
#[cfg(feature = "mimalloc")]
fn give_back_memory() {
    use std::cell::Cell;
    use std::time::Instant;
    thread_local!(static LAST: Cell<Option<Instant>> = const { Cell::new(None) });
    let now = Instant::now();
    let due = LAST.with(|last| match last.get() {
        Some(at) if now.duration_since(at) < GIVE_BACK_EVERY => false,
        _ => {
            last.set(Some(now));
            true
        }
    });
    if due {
        // SAFETY: mi_collect has no preconditions; it only touches mimalloc's own state.
        unsafe { libmimalloc_sys::mi_collect(false) };
    }
}

/// Turns transparent huge pages off for this process, unless `MIMALLOC_ALLOW_THP=1` asks to keep
/// them. mimalloc marks its arenas for them (`MADV_HUGEPAGE`), so the kernel backs them with
/// 2 MiB pages, and khugepaged later collapses any 2 MiB region with one page in use into a whole
/// huge page: in the soak, a node's idle RSS stepped up by 10–13 MiB at a random minute and never
/// came back, while 1 MiB of heap was in use. A gateway's heap is many small per-connection
/// blocks, so huge pages buy little here; with them off a fresh node starts at 9.5 MiB RSS instead
/// of 17.2 MiB.
///
/// It has to run before mimalloc's first allocation, which comes before `main`: pages faulted in
/// as huge before the flag is set stay huge (4 MiB of a fresh node's). So it is a load-time
/// constructor ordered before mimalloc's own (priority 101); hand-written because it is these few
/// lines, and the `ctor` crate does not order against a C library's constructor. It must not
/// allocate.
#[cfg(target_os = "linux")]
extern "C" fn refuse_huge_pages() {
    // SAFETY: getenv reads the environment the loader set up; nothing else runs yet.
    let keep = unsafe { libc::getenv(c"MIMALLOC_ALLOW_THP".as_ptr()) };
    // SAFETY: a non-null getenv result is a NUL-terminated string.
    if !keep.is_null() && unsafe { std::ffi::CStr::from_ptr(keep) }.to_bytes() == b"1" {
        return;
    }
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and only sets a flag on this process.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array.00100"]
static REFUSE_HUGE_PAGES: extern "C" fn() = refuse_huge_pages;

/// Redis-backed, horizontally scalable Server-Sent Events gateway.
///
/// Every setting can also come from the config file or from `SSEGATE_*` environment variables
/// (`SSEGATE_RETENTION__MAX_EVENTS=5000`); flags win over both.
#[derive(Parser)]
#[command(name = "ssegate", version)]
struct Flags {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Redis URL, e.g. redis://127.0.0.1:6379/0. Without it, one node runs on an in-memory store.
    #[arg(long)]
    redis_url: Option<String>,
    /// TOML config file.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Prints a token signed with the configured HMAC key (auth.jwt_key), for development and
    /// first steps: `ssegate token --publish 'news.*' --subscribe '*' --ttl 1h`, or for the
    /// Mercure hub `ssegate token --mercure-publish '*'`.
    Token {
        /// Topic pattern the token may publish to (repeatable; `*` matches any run).
        #[arg(long)]
        publish: Vec<String>,
        /// Topic pattern the token may subscribe to (repeatable; `*` matches any run).
        #[arg(long)]
        subscribe: Vec<String>,
        /// Topic pattern whose server API (presence, topic state, delete, disconnect: `*` for
        /// a `sub` or a `jti`) the token may use (repeatable).
        #[arg(long)]
        admin: Vec<String>,
        /// The token's `sub`: who it is for, shown in presence.
        #[arg(long)]
        sub: Option<String>,
        /// JSON shown with the token's subscriptions in presence and join/leave events (the
        /// `ssegate.info` claim), e.g. '{"name":"Ada"}'.
        #[arg(long)]
        info: Option<String>,
        /// Mercure topic selector the token may publish to (repeatable; `*`, a topic or a URI
        /// template), in its `mercure` claim.
        #[arg(long)]
        mercure_publish: Vec<String>,
        /// Mercure topic selector whose private updates the token may receive (repeatable).
        #[arg(long)]
        mercure_subscribe: Vec<String>,
        /// How long the token is valid, e.g. 90s, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    let settings = Settings::load_noting_ignored(Overrides {
        config_file: flags.config,
        listen: flags.listen,
        redis_url: flags.redis_url,
    });
    let settings = match settings {
        Ok((settings, ignored)) => {
            ssegate::telemetry::init(settings.log_format);
            ssegate::config::warn_ignored(&ignored);
            settings
        }
        Err(e) => {
            eprintln!("ssegate: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Token {
        publish,
        subscribe,
        admin,
        sub,
        info,
        mercure_publish,
        mercure_subscribe,
        ttl,
    }) = flags.command
    {
        let info = match info.as_deref().map(serde_json::from_str).transpose() {
            Ok(info) => info,
            Err(e) => {
                eprintln!("ssegate: --info must be JSON: {e}");
                return ExitCode::from(2);
            }
        };
        let grants = Grants {
            publish,
            subscribe,
            admin,
            info,
        };
        let wanted = !mercure_publish.is_empty() || !mercure_subscribe.is_empty();
        let mercure = wanted.then_some(MercureGrants {
            publish: mercure_publish,
            subscribe: mercure_subscribe,
            payload: None,
        });
        return print_token(&settings, sub, grants, mercure, ttl);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    #[cfg(feature = "mimalloc")]
    builder.on_thread_park(give_back_memory);
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ssegate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = Shutdown::new();
        let app = match Application::build(settings, shutdown.clone()).await {
            Ok(app) => app,
            Err(e) => {
                eprintln!("ssegate: {e}");
                return ExitCode::FAILURE;
            }
        };
        tokio::spawn(async move {
            shutdown::signal().await;
            tracing::info!("shutting down");
            shutdown.trigger();
        });
        match app.run().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ssegate: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn print_token(
    settings: &Settings,
    sub: Option<String>,
    grants: Grants,
    mercure: Option<MercureGrants>,
    ttl: Duration,
) -> ExitCode {
    let Some(secret) = &settings.auth.jwt_key else {
        eprintln!(
            "ssegate: `ssegate token` signs with auth.jwt_key: set it (SSEGATE_AUTH__JWT_KEY or the config file)"
        );
        return ExitCode::from(2);
    };
    if grants.publish.is_empty()
        && grants.subscribe.is_empty()
        && grants.admin.is_empty()
        && mercure.is_none()
    {
        eprintln!("ssegate: give at least one --publish, --subscribe, --admin, --mercure-publish or --mercure-subscribe");
        return ExitCode::from(2);
    }
    match ssegate::auth::issue(
        secret,
        sub.map(serde_json::Value::String),
        grants,
        mercure,
        ttl,
    ) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ssegate: cannot sign the token: {e}");
            ExitCode::FAILURE
        }
    }
}
