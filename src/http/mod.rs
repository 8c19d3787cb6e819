//! The HTTP layer: the router and the layers every request passes, the handlers, the error →
//! response mapping, and the server that feeds connections to the router.
//!
//! Every request, whichever way the server reads it, goes through [`app`]: the routes behind the
//! same layers (CORS, authentication, body limit).

mod error;
mod events;
mod health;
mod multi;
mod server;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

pub use self::error::{ApiError, ErrorCode};
pub use self::server::{Server, ServerStats, StreamOnSocket};
use crate::auth::Authenticator;
use crate::config::{Cors, Settings};
use crate::hub::Hub;
use crate::metrics::{ConnectionLabel, Metrics};

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    /// This node's topics; also holds the store.
    pub hub: Hub,
    /// Limits and stream settings.
    pub settings: Arc<Settings>,
    /// Token verification and the publish/subscribe rules.
    pub auth: Arc<Authenticator>,
    /// What `/metrics` shows.
    pub metrics: Arc<Metrics>,
}

/// The routes of the public API behind every layer: the one door all requests pass.
pub fn app(state: AppState) -> Router {
    let cors = cors(&state.settings.cors);
    let mut routes = Router::new()
        .route("/v1/events", get(events::subscribe).post(events::publish))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz));
    if state.settings.metrics_listen.is_none() {
        routes = routes.route("/metrics", get(metrics));
    }
    if state.settings.ui {
        routes = routes.route("/", get(ui));
    }
    let mut router = routes
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(
            state.auth.clone(),
            authenticate,
        ));
    if let Some(cors) = cors {
        router = router.layer(cors).layer(middleware::from_fn(cors_fixups));
    }
    router
        .layer(middleware::from_fn(log_rejections))
        .with_state(state)
}

/// `/metrics` in the Prometheus (OpenMetrics) text format. Values other parts keep (connected
/// Redis connections, active topics) are read now.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let m = &state.metrics;
    m.active_topics.set(state.hub.active_topics() as i64);
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

/// One log line per rejected request (`debug`, target `ssegate::rejected`): status, error code,
/// method, path and topic. Never the query or the headers, which may carry a token.
async fn log_rejections(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let uri = request.uri().clone();
    let response = next.run(request).await;
    let status = response.status();
    if (status.is_client_error() || status.is_server_error())
        && tracing::enabled!(target: "ssegate::rejected", tracing::Level::DEBUG)
    {
        let code = response.extensions().get::<ErrorCode>().map_or("", |c| c.0);
        let topic = form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .find(|(name, _)| name == "topic")
            .map(|(_, value)| value.into_owned())
            .unwrap_or_default();
        tracing::debug!(
            target: "ssegate::rejected",
            status = status.as_u16(),
            code,
            %method,
            path = uri.path(),
            topic,
            "request rejected"
        );
    }
    response
}

/// The largest request body read: a full batch of maximum-size events, plus room for the JSON
/// around them.
fn body_limit(settings: &Settings) -> usize {
    settings
        .max_event_bytes
        .saturating_mul(settings.max_batch_events)
        .saturating_add(1024 * 1024)
}

/// Puts the request's [`Access`](crate::auth::Access) in its extensions for the handlers, which
/// decide per topic. The token itself goes no further than this.
async fn authenticate(
    State(auth): State<Arc<Authenticator>>,
    mut request: Request,
    next: Next,
) -> Response {
    let access = auth
        .authenticate(request.headers(), request.uri().query())
        .await;
    if let crate::auth::Access::Invalid(reason) = &access {
        // The reason only: never the token, the query or the headers that carry it.
        tracing::debug!(%reason, path = request.uri().path(), "credentials refused");
    }
    request.extensions_mut().insert(access);
    next.run(request).await
}

/// CORS for the configured origins. Listed origins get themselves back with credentials, so
/// `new EventSource(url, {withCredentials: true})` sends the cookie; `*` allows every origin
/// without credentials (browsers refuse the two together).
fn cors(settings: &Cors) -> Option<CorsLayer> {
    if settings.allowed_origins.is_empty() {
        return None;
    }
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST])
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

/// Two corrections to tower-http's answers: a preflight has no content, so `204` rather than
/// `200`; and an origin that is not allowed gets no CORS headers at all, where tower-http still
/// sends `Access-Control-Allow-Credentials`.
async fn cors_fixups(request: Request, next: Next) -> Response {
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = next.run(request).await;
    if preflight && response.status() == StatusCode::OK {
        *response.status_mut() = StatusCode::NO_CONTENT;
    }
    let headers = response.headers_mut();
    if !headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN) {
        headers.remove(header::ACCESS_CONTROL_ALLOW_CREDENTIALS);
    }
    response
}
