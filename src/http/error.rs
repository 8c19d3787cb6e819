//! API errors and their JSON responses: `{"error": "<code>", "message": "<what to fix>"}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::auth::AuthError;
use crate::event::StreamId;
use crate::store::StoreError;

/// Seconds a client is asked to wait before retrying when the store is unavailable.
const RETRY_AFTER_SECS: &str = "1";

/// The error code of a response, for the log line of a rejected request.
#[derive(Clone, Copy, Debug)]
pub struct ErrorCode(pub &'static str);

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is wrong; `code` says how, `message` what to fix.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// The request conflicts with what is stored (`409`).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// An event, batch or body is larger than allowed.
    #[error("{message}")]
    TooLarge { code: &'static str, message: String },
    /// No usable token (`401`), a token that does not cover the topic (`403`), or keys that
    /// cannot be fetched (`503`).
    #[error("{0}")]
    Auth(#[from] AuthError),
    #[error("no such route")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The store cannot be reached. For a batch, `stored` holds per event its id if it was
    /// stored, `None` if it was not acknowledged.
    #[error("{message}")]
    Unavailable {
        message: String,
        stored: Option<Vec<Option<StreamId>>>,
    },
    /// The store failed in a way retrying will not fix. `stored` as for `Unavailable`.
    #[error("the event store failed: {message}")]
    Internal {
        message: String,
        stored: Option<Vec<Option<StreamId>>>,
    },
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Conflict {
            code,
            message: message.into(),
        }
    }

    pub fn too_large(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::TooLarge {
            code,
            message: message.into(),
        }
    }

    /// A store failure; for a batch, with what was `stored` of it (per event, its id or `None`).
    pub fn from_store(e: StoreError, stored: Option<Vec<Option<StreamId>>>) -> Self {
        match e {
            StoreError::Unavailable(m) => ApiError::Unavailable {
                message: format!("the event store is unavailable ({m}); retry later"),
                stored,
            },
            StoreError::Internal(message) => ApiError::Internal { message, stored },
        }
    }
}

impl ApiError {
    /// Whether the gateway or its store failed (`5xx`), rather than the request (`4xx`).
    pub fn is_server_error(&self) -> bool {
        matches!(
            self,
            ApiError::Unavailable { .. }
                | ApiError::Internal { .. }
                | ApiError::Auth(AuthError::KeysUnavailable)
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::from_store(e, None)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let mut challenge = None;
        let (status, code, extra) = match self {
            ApiError::Auth(AuthError::KeysUnavailable) => {
                (StatusCode::SERVICE_UNAVAILABLE, "auth_unavailable", None)
            }
            ApiError::Auth(e) if e.is_forbidden() => (StatusCode::FORBIDDEN, "forbidden", None),
            ApiError::Auth(AuthError::Revoked) => {
                challenge = Some("Bearer realm=\"ssegate\", error=\"invalid_token\"");
                (StatusCode::UNAUTHORIZED, "token_revoked", None)
            }
            ApiError::Auth(e) => {
                // RFC 6750: a request without credentials gets the bare challenge.
                challenge = Some(match e {
                    AuthError::Missing => "Bearer realm=\"ssegate\"",
                    _ => "Bearer realm=\"ssegate\", error=\"invalid_token\"",
                });
                (StatusCode::UNAUTHORIZED, "unauthorized", None)
            }
            ApiError::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code, None),
            ApiError::TooLarge { code, .. } => (StatusCode::PAYLOAD_TOO_LARGE, code, None),
            ApiError::Conflict { code, .. } => (StatusCode::CONFLICT, code, None),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found", None),
            ApiError::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", None)
            }
            ApiError::Unavailable { stored, .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", stored)
            }
            ApiError::Internal { message, stored } => {
                tracing::error!(error = %message, "store error");
                (StatusCode::INTERNAL_SERVER_ERROR, "store_error", stored)
            }
        };
        let mut body = json!({ "error": code, "message": message });
        if let Some(stored) = extra {
            // `ids`: every event's id, or null where it was not acknowledged. `persisted`: the
            // leading stored ones, as answered before batches went to the store together.
            let persisted: Vec<String> = stored
                .iter()
                .map_while(|id| id.map(|id| id.to_string()))
                .collect();
            let ids: Vec<Option<String>> = stored
                .iter()
                .map(|id| id.map(|id| id.to_string()))
                .collect();
            body["ids"] = json!(ids);
            body["persisted"] = json!(persisted);
        }
        let mut response = (status, Json(body)).into_response();
        response.extensions_mut().insert(ErrorCode(code));
        if let Some(challenge) = challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        response
    }
}
