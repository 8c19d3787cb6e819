//! The HTTP layer: routes, handlers and the error → response mapping.

mod error;
mod events;
mod health;
mod listener;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;

pub use self::error::ApiError;
pub use self::listener::GatewayListener;
use crate::config::Settings;
use crate::hub::Hub;

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    /// This node's topics; also holds the store.
    pub hub: Hub,
    /// Limits and stream settings.
    pub settings: Arc<Settings>,
}

/// All routes of the public API.
pub fn router(state: AppState) -> Router {
    // A full batch of maximum-size events, plus room for the JSON around them.
    let body_limit = state
        .settings
        .max_event_bytes
        .saturating_mul(state.settings.max_batch_events)
        .saturating_add(1024 * 1024);
    Router::new()
        .route("/v1/events", get(events::subscribe).post(events::publish))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}
