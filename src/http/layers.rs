//! The layers in front of the routes that are ssegate's own: credentials for every request, a
//! log line per rejection, and two corrections to tower-http's CORS answers.
//!
//! They are tower services rather than `axum::middleware::from_fn` functions. A `from_fn` layer
//! clones the routes behind it, boxes a future and boxes the routes again for every request; that
//! was ~1.5 µs of a node's CPU per layer and request, ~5 % of its single publishes a second. These
//! call the routes in place and add nothing to the heap, except for a request whose token names a
//! key the node must first fetch.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::extract::Request;
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::Response;
use futures_util::future::{BoxFuture, Either};
use tower::{Layer, Service};

use super::ErrorCode;
use crate::auth::{Access, Authenticator, Door};

/// Puts each request's [`Access`] in its extensions for the handlers, which decide per topic.
/// The token itself goes no further than this.
#[derive(Clone)]
pub struct AuthenticateLayer {
    auth: Arc<Authenticator>,
}

impl AuthenticateLayer {
    pub fn new(auth: Arc<Authenticator>) -> AuthenticateLayer {
        AuthenticateLayer { auth }
    }
}

impl<S> Layer<S> for AuthenticateLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Authenticate<S> {
        Authenticate {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// See [`AuthenticateLayer`].
#[derive(Clone)]
pub struct Authenticate<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S> Service<Request> for Authenticate<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let door = door(&request);
        if let Some(access) =
            self.auth
                .authenticate_now(door, request.headers(), request.uri().query())
        {
            admit(&mut request, access);
            return Either::Left(self.inner.call(request));
        }
        // The token's key must be fetched first. The service made ready goes with the request;
        // a clone serves the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Either::Right(Box::pin(async move {
            let access = auth
                .authenticate(door, request.headers(), request.uri().query())
                .await;
            admit(&mut request, access);
            inner.call(request).await
        }))
    }
}

/// Which door a request comes through: the Mercure hub's path has its own token rules.
fn door(request: &Request) -> Door {
    if !crate::mercure::is_hub_path(request.uri().path()) {
        Door::Native
    } else if request.method() == Method::POST {
        Door::MercurePublish
    } else {
        Door::MercureSubscribe
    }
}

fn admit(request: &mut Request, access: Access) {
    if let Access::Invalid(reason) = &access {
        // The reason only: never the token, the query or the headers that carry it.
        tracing::debug!(%reason, path = request.uri().path(), "credentials refused");
    }
    request.extensions_mut().insert(access);
}

/// What a layer that looks at a request on its way in and at its response on the way out does:
/// it keeps what it needs of the request (`Seen`) and finishes the response with it.
pub trait Around: Clone + Send + Sync + 'static {
    type Seen: Send + 'static;
    fn before(&self, request: &Request) -> Self::Seen;
    fn after(&self, seen: Self::Seen, response: &mut Response);
}

/// A layer of an [`Around`].
#[derive(Clone)]
pub struct AroundLayer<A>(pub A);

impl<S, A: Around> Layer<S> for AroundLayer<A> {
    type Service = AroundService<S, A>;

    fn layer(&self, inner: S) -> AroundService<S, A> {
        AroundService {
            inner,
            around: self.0.clone(),
        }
    }
}

/// See [`AroundLayer`].
#[derive(Clone)]
pub struct AroundService<S, A> {
    inner: S,
    around: A,
}

impl<S, A> Service<Request> for AroundService<S, A>
where
    S: Service<Request, Response = Response, Error = Infallible>,
    A: Around,
{
    type Response = Response;
    type Error = Infallible;
    type Future = AroundFuture<S::Future, A>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let seen = self.around.before(&request);
        AroundFuture {
            inner: self.inner.call(request),
            finish: Some((self.around.clone(), seen)),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response of an [`AroundService`].
    pub struct AroundFuture<F, A: Around> {
        #[pin]
        inner: F,
        // Taken when the response is finished.
        finish: Option<(A, A::Seen)>,
    }
}

impl<F, A> Future for AroundFuture<F, A>
where
    F: Future<Output = Result<Response, Infallible>>,
    A: Around,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = ready!(this.inner.poll(cx));
        if let Some((around, seen)) = this.finish.take() {
            around.after(seen, &mut response);
        }
        Poll::Ready(Ok(response))
    }
}

/// One log line per rejected request (`debug`, target `ssegate::rejected`): status, error code,
/// method, path and topic. Never the query or the headers, which may carry a token.
#[derive(Clone, Copy)]
pub struct LogRejections;

impl Around for LogRejections {
    /// The request's method and URI, kept only while the log line is enabled.
    type Seen = Option<(Method, Uri)>;

    fn before(&self, request: &Request) -> Self::Seen {
        tracing::enabled!(target: "ssegate::rejected", tracing::Level::DEBUG)
            .then(|| (request.method().clone(), request.uri().clone()))
    }

    fn after(&self, seen: Self::Seen, response: &mut Response) {
        let status = response.status();
        let Some((method, uri)) = seen else {
            return;
        };
        if !(status.is_client_error() || status.is_server_error()) {
            return;
        }
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
}

/// Two corrections to tower-http's CORS answers: a preflight has no content, so `204` rather
/// than `200`; and an origin that is not allowed gets no CORS headers at all, where tower-http
/// still sends `Access-Control-Allow-Credentials`.
#[derive(Clone, Copy)]
pub struct CorsFixups;

impl Around for CorsFixups {
    /// Whether the request is a preflight.
    type Seen = bool;

    fn before(&self, request: &Request) -> bool {
        request.method() == Method::OPTIONS
            && request
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    }

    fn after(&self, preflight: bool, response: &mut Response) {
        if preflight && response.status() == StatusCode::OK {
            *response.status_mut() = StatusCode::NO_CONTENT;
        }
        let headers = response.headers_mut();
        if !headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN) {
            headers.remove(header::ACCESS_CONTROL_ALLOW_CREDENTIALS);
        }
    }
}
