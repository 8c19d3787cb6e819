//! Builds the store, the hub and the router; serves until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::auth::Authenticator;
use crate::config::Settings;
use crate::http::{self, AppState, Server, ServerStats};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::presence::{MemoryRegistry, Presence, Registry};
use crate::shutdown::Shutdown;
use crate::store::{MemoryStore, RedisStore, Store, StoreError};
use crate::tls::Certificates;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot use the store: {0}")]
    Store(#[from] StoreError),
    #[error("configuration: `auth`: {0}")]
    Auth(String),
    #[error("configuration: `tls`: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// A bound, ready-to-serve gateway.
pub struct Application {
    server: Server,
    /// The server's per-connection tasks, waited for on shutdown.
    connections: TaskTracker,
    addr: SocketAddr,
    hub: Hub,
    /// The node's presence, which removes its entries on shutdown before the process ends.
    presence: Option<Presence>,
    /// `/metrics` on `metrics_listen`, when set.
    metrics_server: Option<(TcpListener, axum::Router)>,
    /// The listener's certificate, reloaded on `SIGHUP` and on file changes; `None` without TLS.
    certificates: Option<Arc<Certificates>>,
    shutdown: Shutdown,
    shutdown_timeout: Duration,
}

impl Application {
    /// Binds the listen address and connects the store. `shutdown` stops everything.
    pub async fn build(
        settings: Settings,
        shutdown: Shutdown,
    ) -> Result<Application, StartupError> {
        let auth =
            Authenticator::new(&settings.auth, &settings.mercure).map_err(StartupError::Auth)?;
        // Before anything connects: a certificate that cannot be used stops start-up.
        let certificates = match settings.tls.files() {
            Some((cert, key)) => Some(Certificates::load(cert, key)?),
            None => None,
        };
        let acceptor = certificates.as_ref().map(|c| c.acceptor()).transpose()?;
        if let Some(certificates) = &certificates {
            // Listening for SIGHUP from now on: the signal's default would end the process.
            certificates
                .clone()
                .watch(settings.tls.reload_interval, shutdown.clone());
        }
        if !auth.enabled() && !settings.listen.ip().is_loopback() {
            warn!(
                listen = %settings.listen,
                "no auth key is configured: anyone who can reach this address may publish and subscribe to every topic"
            );
        }
        let metrics = Arc::new(Metrics::new());
        let (store, registry): (Arc<dyn Store>, Arc<dyn Registry>) = match &settings.redis_url {
            Some(_) => {
                let store =
                    RedisStore::connect(&settings, shutdown.clone())?.with_metrics(metrics.clone());
                // A normal start is ready at once; without Redis, serve and report not-ready.
                let first =
                    tokio::time::timeout(settings.redis.connect_timeout * 2, store.connected());
                if first.await.is_err() {
                    warn!("redis is not reachable yet; serving, not ready until it answers");
                }
                let registry = Arc::new(store.registry());
                (Arc::new(store), registry)
            }
            None => {
                info!("no redis_url: using the embedded in-memory store (single node, nothing survives a restart)");
                (
                    Arc::new(MemoryStore::new(&settings)),
                    Arc::new(MemoryRegistry::new()),
                )
            }
        };
        let presence = settings.presence.enabled.then(|| {
            Presence::start(
                registry,
                store.clone(),
                &settings.presence,
                shutdown.clone(),
            )
        });
        if let Some(presence) = &presence {
            if settings.mercure.enabled && settings.mercure.subscriptions {
                presence.observe(
                    &crate::mercure::subscriptions::registry_topic(),
                    crate::mercure::subscriptions::publisher(store.clone()),
                );
            }
        }
        let hub = Hub::start(store, &settings, shutdown.clone(), metrics.clone());
        let listener = listen(settings.listen).map_err(|source| StartupError::Listen {
            addr: settings.listen,
            source,
        })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartupError::Listen {
                addr: settings.listen,
                source,
            })?;
        let shutdown_timeout = settings.shutdown_timeout;
        let max_connections = settings
            .limits
            .max_connections
            .unwrap_or_else(default_max_connections);
        info!(max_connections, "connection limit");
        let mercure = Arc::new(crate::mercure::router::Router::new(hub.clone()));
        let control = crate::control::Control::start(
            hub.clone(),
            mercure.clone(),
            auth.revocations().clone(),
            settings.auth.max_token_lifetime + settings.auth.leeway,
            settings.catchup_interval,
            metrics.clone(),
            shutdown.clone(),
        );
        // Before serving: a token revoked before this node started is refused from the start.
        let loading = tokio::time::timeout(settings.redis.connect_timeout, control.load());
        if !matches!(loading.await, Ok(Ok(()))) {
            warn!(
                "the revocation list cannot be read yet; it is read again every catchup_interval"
            );
        }
        let settings = Arc::new(settings);
        let state = Arc::new(AppState {
            hub: hub.clone(),
            settings: settings.clone(),
            auth: Arc::new(auth),
            metrics: metrics.clone(),
            mercure,
            presence: presence.clone(),
            control,
        });
        // `/metrics` on its own address, when asked: kept off the public port.
        let metrics_server = match settings.metrics_listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartupError::Listen { addr, source })?;
                let router = axum::Router::new()
                    .route("/metrics", axum::routing::get(http::metrics))
                    .with_state(state.clone());
                Some((listener, router))
            }
            None => None,
        };
        let app = http::app(state);
        let connections = TaskTracker::new();
        let mut server = Server::new(
            listener,
            app,
            &settings,
            max_connections,
            connections.clone(),
            shutdown.clone(),
            metrics,
        );
        if let Some(acceptor) = acceptor {
            server = server.with_tls(acceptor);
        }
        Ok(Application {
            server,
            connections,
            addr,
            hub,
            presence,
            metrics_server,
            certificates,
            shutdown,
            shutdown_timeout,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn hub(&self) -> Hub {
        self.hub.clone()
    }

    /// The listener's certificate, when TLS is on: its reloads, or a reload now.
    pub fn certificates(&self) -> Option<Arc<Certificates>> {
        self.certificates.clone()
    }

    /// The server's counters (streams written on the socket, open and refused connections).
    pub fn server_stats(&self) -> ServerStats {
        self.server.stats()
    }

    /// Serves until shutdown. Open streams end at once when shutdown starts, so clients reconnect
    /// elsewhere; connections still open after `shutdown_timeout` are abandoned.
    pub async fn run(self) -> std::io::Result<()> {
        info!(addr = %self.addr, tls = self.certificates.is_some(), "ssegate listening");
        if let Some((listener, router)) = self.metrics_server {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, "metrics listening");
            }
            let signal = self.shutdown.clone();
            tokio::spawn(async move {
                let served = axum::serve(listener, router)
                    .with_graceful_shutdown(async move { signal.wait().await });
                if let Err(e) = served.await {
                    warn!(error = %e, "the metrics listener stopped");
                }
            });
        }
        let connections = self.connections;
        let server = self.server;
        let presence = self.presence;
        let serve = async move {
            server.run().await;
            // Streams end with the hub on shutdown; hyper connections drain.
            connections.close();
            connections.wait().await;
            // The node's entries go with it, rather than waiting to be reaped.
            if let Some(presence) = presence {
                presence.gone().await;
            }
            Ok(())
        };
        let deadline = async {
            self.shutdown.wait().await;
            tokio::time::sleep(self.shutdown_timeout).await;
        };
        tokio::select! {
            result = serve => {
                info!("ssegate stopped");
                result
            }
            _ = deadline => {
                warn!("connections still open after shutdown_timeout; exiting anyway");
                Ok(())
            }
        }
    }
}

/// Open files kept back from the connection limit for Redis connections, the listener, logs.
const RESERVED_FILES: u64 = 1024;

/// `limits.max_connections` when not set: what the open-file limit leaves after a reserve (a
/// tenth of it, at most [`RESERVED_FILES`]). The soft limit is first raised to the hard limit,
/// as servers commonly do.
fn default_max_connections() -> usize {
    let files = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "cannot read the open-file limit; assuming 1024");
            1024
        }
    };
    let reserve = (files / 10).min(RESERVED_FILES);
    usize::try_from(files.saturating_sub(reserve).max(1)).unwrap_or(usize::MAX)
}

/// Connections the kernel queues for `accept` (it caps this at `net.core.somaxconn`). The usual
/// 128 overflows when thousands of clients reconnect at once; a dropped SYN is retried only
/// after a second, then three, which is what a reconnect storm then waits for.
const LISTEN_BACKLOG: u32 = 65_535;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
