//! The HTTP layer: the router and the layers every request passes, the handlers, the error →
//! response mapping, and the server that feeds connections to the router.
//!
//! Every request, whichever way the server reads it, goes through [`app`]: the routes behind the
//! same layers (CORS, authentication, body limit). `/v1/events` and the Mercure hub
//! (`/.well-known/mercure`) are two faces of the same hub and store behind those layers.

mod disconnect;
mod error;
mod events;
mod health;
mod layers;
mod mercure;
mod mercure_subscriptions;
mod multi;
mod presence;
mod server;
mod topics;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

pub use self::error::{ApiError, ErrorCode};
use self::layers::{AroundLayer, AuthenticateLayer, CorsFixups, LogRejections};
pub use self::server::{Server, ServerStats, StreamOnSocket};
use crate::auth::Authenticator;
use crate::config::{Cors, Settings};
use crate::hub::Hub;
use crate::metrics::{ConnectionLabel, Metrics};

/// What every handler gets, behind one `Arc`: each request clones one pointer rather than one
/// per part, and those clones are contended between worker threads.
pub struct AppState {
    /// This node's topics; also holds the store.
    pub hub: Hub,
    /// Limits and stream settings.
    pub settings: Arc<Settings>,
    /// Token verification and the publish/subscribe rules.
    pub auth: Arc<Authenticator>,
    /// What `/metrics` shows.
    pub metrics: Arc<Metrics>,
    /// Routes the Mercure log's updates to this node's Mercure subscriptions.
    pub mercure: Arc<crate::mercure::router::Router>,
    /// Who is subscribed where; `None` with `presence.enabled` off.
    pub presence: Option<crate::presence::Presence>,
    /// The node's open streams, for disconnects, and its copy of the revocation list.
    pub control: crate::control::Control,
}

/// The routes of the public API behind every layer: the one door all requests pass.
pub fn app(state: Arc<AppState>) -> Router {
    let cors = cors(&state.settings.cors);
    let mut routes = Router::new()
        .route("/v1/events", get(events::subscribe).post(events::publish))
        .route(
            "/v1/disconnect",
            axum::routing::post(disconnect::disconnect),
        )
        .route("/v1/topics", get(topics::list))
        .route(
            "/v1/topics/{topic}",
            get(topics::state).delete(topics::delete),
        )
        .route("/v1/topics/{topic}/events", get(topics::history))
        .route("/v1/topics/{topic}/presence", get(presence::presence))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz));
    if state.settings.mercure.enabled {
        routes = routes.route(
            crate::mercure::PATH,
            get(mercure::subscribe).post(mercure::publish),
        );
        if state.settings.mercure.subscriptions {
            let path = crate::mercure::subscriptions::PATH;
            routes = routes
                .route(path, get(mercure_subscriptions::subscriptions))
                .route(
                    &format!("{path}/{{*rest}}"),
                    get(mercure_subscriptions::subscriptions),
                );
        }
    }
    if state.settings.metrics_listen.is_none() {
        routes = routes.route("/metrics", get(metrics));
    }
    if state.settings.ui {
        routes = routes.route("/", get(ui));
    }
    let mut router = routes
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(AuthenticateLayer::new(state.auth.clone()));
    if let Some(cors) = cors {
        router = router.layer(cors).layer(AroundLayer(CorsFixups));
    }
    router.layer(AroundLayer(LogRejections)).with_state(state)
}

/// `/metrics` in the Prometheus (OpenMetrics) text format. Values other parts keep (connected
/// Redis connections, active topics) are read now.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let m = &state.metrics;
    m.active_topics.set(state.hub.active_topics() as i64);
    m.heap_bytes.set(crate::heap::in_use() as i64);
    m.mercure_subscriptions
        .set(state.mercure.subscriptions() as i64);
    if let Some(presence) = &state.presence {
        m.presence_entries.set(presence.open_entries() as i64);
    }
    for (connection, up) in state.hub.store().connections() {
        m.redis_connected
            .get_or_create(&ConnectionLabel { connection })
            .set(i64::from(up));
    }
    let mut response = m.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// The built-in page, compiled into the binary.
async fn ui() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("ui.html"))
}

/// The largest request body read: a full batch of maximum-size events, plus room for the JSON
/// around them.
fn body_limit(settings: &Settings) -> usize {
    settings
        .max_event_bytes
        .saturating_mul(settings.max_batch_events)
        .saturating_add(1024 * 1024)
}

/// CORS for the configured origins. Listed origins get themselves back with credentials, so
/// `new EventSource(url, {withCredentials: true})` sends the cookie; `*` allows every origin
/// without credentials (browsers refuse the two together).
fn cors(settings: &Cors) -> Option<CorsLayer> {
    if settings.allowed_origins.is_empty() {
        return None;
    }
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("last-event-id"),
            HeaderName::from_static("idempotency-key"),
        ])
        .expose_headers([header::RETRY_AFTER])
        .max_age(Duration::from_secs(3600));
    if settings.allowed_origins.iter().any(|o| o == "*") {
        return Some(layer.allow_origin(Any));
    }
    let origins = settings
        .allowed_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok());
    Some(
        layer
            .allow_origin(AllowOrigin::list(origins))
            .allow_credentials(true),
    )
}
