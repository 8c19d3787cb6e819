//! Builds the store, the hub and the router; serves until shutdown.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Settings;
use crate::http::{self, AppState, GatewayListener};
use crate::hub::Hub;
use crate::shutdown::Shutdown;
use crate::store::{MemoryStore, RedisStore, Store, StoreError};

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
}

/// A bound, ready-to-serve gateway.
pub struct Application {
    listener: GatewayListener,
    /// The listener's per-connection tasks (direct streams among them), waited for on shutdown.
    connections: TaskTracker,
    addr: SocketAddr,
    hub: Hub,
    router: axum::Router,
    shutdown: Shutdown,
    shutdown_timeout: Duration,
}

impl Application {
    /// Binds the listen address and connects the store. `shutdown` stops everything.
    pub async fn build(
        settings: Settings,
        shutdown: Shutdown,
    ) -> Result<Application, StartupError> {
        let store: Arc<dyn Store> = match &settings.redis_url {
            Some(_) => {
                let store = RedisStore::connect(&settings, shutdown.clone())?;
                // A normal start is ready at once; without Redis, serve and report not-ready.
                let first =
                    tokio::time::timeout(settings.redis.connect_timeout * 2, store.connected());
                if first.await.is_err() {
                    warn!("redis is not reachable yet; serving, not ready until it answers");
                }
                Arc::new(store)
            }
            None => {
                info!("no redis_url: using the embedded in-memory store (single node, nothing survives a restart)");
                Arc::new(MemoryStore::new(&settings))
            }
        };
        let hub = Hub::start(store, &settings, shutdown.clone());
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
        let state = AppState {
            hub: hub.clone(),
            settings: Arc::new(settings),
        };
        let connections = TaskTracker::new();
        let listener = GatewayListener::new(
            listener,
            state.clone(),
            connections.clone(),
            shutdown.clone(),
        );
        let router = http::router(state);
        Ok(Application {
            listener,
            connections,
            addr,
            hub,
            router,
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

    /// Counts the event streams the listener served itself rather than through the router.
    pub fn direct_streams(&self) -> Arc<AtomicU64> {
        self.listener.direct_streams()
    }

    /// Serves until shutdown. Open streams end at once when shutdown starts, so clients reconnect
    /// elsewhere; connections still open after `shutdown_timeout` are abandoned.
    pub async fn run(self) -> std::io::Result<()> {
        info!(addr = %self.addr, "ssegate listening");
        let signal = self.shutdown.clone();
        let connections = self.connections;
        let served = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move { signal.wait().await })
            .into_future();
        let serve = async move {
            let result = served.await;
            // Direct streams end with the hub on shutdown, like the router's.
            connections.close();
            connections.wait().await;
            result
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
