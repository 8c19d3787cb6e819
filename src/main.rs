//! The `ssegate` binary: flags → settings → run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ssegate::config::{Overrides, Settings};
use ssegate::shutdown::{self, Shutdown};
use ssegate::startup::Application;

/// Redis-backed, horizontally scalable Server-Sent Events gateway.
///
/// Every setting can also come from the config file or from `SSEGATE_*` environment variables
/// (`SSEGATE_RETENTION__MAX_EVENTS=5000`); flags win over both.
#[derive(Parser)]
#[command(name = "ssegate", version)]
struct Flags {
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Redis URL, e.g. redis://127.0.0.1:6379/0. Without it, one node runs on an in-memory store.
    #[arg(long)]
    redis_url: Option<String>,
    /// TOML config file.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    ssegate::telemetry::init();
    let settings = match Settings::load(Overrides {
        config_file: flags.config,
        listen: flags.listen,
        redis_url: flags.redis_url,
    }) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ssegate: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
