//! Per-request bookkeeping, done once in one middleware for every route and fallback:
//!
//! - a [`RequestId`] per request: an incoming `x-request-id` is honoured when it is a UUID (so a
//!   client can correlate its own logs), otherwise a fresh time-ordered one is made. It is put in
//!   the request's extensions for handlers (it travels to the orchestrator, which records it with
//!   what it commits) and returned in the `x-request-id` header of every response;
//! - one tracing span per request with method, path, request id, tenant, status and latency,
//!   and one log line when the request ends, carrying the error detail if there was one. The
//!   query string and headers are never logged: keys may travel there;
//! - every error response gets the one JSON error shape with the request id
//!   ([`crate::error`]): [`HttpError`]s are rendered with it, and any other error response
//!   (axum's own plain-text rejections) is replaced by the generic error for its status;
//! - the request figures of `/metrics` (by route template, never by concrete path).
//!
//! [`deadline`] bounds every handler: a safety net behind the per-call deadlines, so it is longer
//! than any handler's own calls ([`crate::GatewayConfig::handler_timeout`]). When it fires, a read
//! answers 504 (safe to retry) and anything else 500 `outcome_unknown`, since a write may have
//! taken effect.

use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use fleet_schemas::RequestId;
use tracing::Instrument;
use tracing::field::Empty;

use crate::AppState;
use crate::error::HttpError;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The middleware (`axum::middleware::from_fn_with_state(state, track)`).
pub async fn track(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let _in_flight = state.metrics().start();
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let method = req.method().clone();
    let request_id = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<RequestId>().ok())
        .unwrap_or_default();
    req.extensions_mut().insert(request_id);
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        request_id = %request_id,
        tenant = Empty,
        status = Empty,
        latency_ms = Empty,
    );
    let response = next.run(req).instrument(span.clone()).await;
    let (response, error) = render_error(response, request_id);
    let mut response = response;
    if let Ok(v) = HeaderValue::from_str(&request_id.to_string()) {
        response.headers_mut().insert(X_REQUEST_ID.clone(), v);
    }
    let status = response.status();
    let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    span.record("status", status.as_u16());
    span.record("latency_ms", latency_ms);
    state.metrics().record(&route, method.as_str(), status.as_u16(), started.elapsed());
    span.in_scope(|| match &error {
        Some(e) if status.is_server_error() => {
            tracing::error!(code = e.code, detail = e.log_detail.as_deref(), "request failed")
        }
        Some(e) => tracing::info!(code = e.code, field = e.field.as_deref(), "request refused"),
        None => tracing::info!("request finished"),
    });
    response
}

/// The middleware bounding every handler (`from_fn_with_state(state, deadline)`).
pub async fn deadline(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = state.config().handler_timeout();
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) if read => {
            HttpError::new(StatusCode::GATEWAY_TIMEOUT, "gateway_timeout", "the gateway gave up waiting")
                .into_response()
        }
        Err(_) => HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "outcome_unknown",
            "the gateway gave up waiting; the request may or may not have taken effect",
        )
        .with_log_detail(format!("handler timeout of {limit:?}"))
        .into_response(),
    }
}

/// What a panicking handler answers (`CatchPanicLayer`): the JSON error shape, no details.
pub fn panic_response(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    HttpError::internal("a handler panicked").into_response()
}

/// Give an error response the JSON shape with the request id; returns the error it carries.
fn render_error(mut response: Response, request_id: RequestId) -> (Response, Option<HttpError>) {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return (response, None);
    }
    let error = match response.extensions_mut().remove::<HttpError>() {
        Some(e) => e,
        // A handler's own JSON answer with an error status (`/health`'s 503): keep it.
        None if is_json(&response) => return (response, None),
        // Not ours: axum's own rejection or fallback. Keep its status and headers (`Allow` of a
        // 405, for one), replace its body.
        None => HttpError::from_status(status),
    };
    let body = serde_json::to_vec(&error.body(Some(request_id))).unwrap_or_default();
    let headers = response.headers_mut();
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    *response.body_mut() = Body::from(body);
    (response, Some(error))
}

fn is_json(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"))
}
