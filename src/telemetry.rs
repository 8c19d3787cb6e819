//! Tracing set-up: logs on stderr, as text or one JSON object a line (`log_format`), filtered
//! by `RUST_LOG` (default `info`). Rejected requests are logged at `debug` under the target
//! `ssegate::rejected` (`RUST_LOG=info,ssegate::rejected=debug`). No token and no payload is ever
//! logged.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second call (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
