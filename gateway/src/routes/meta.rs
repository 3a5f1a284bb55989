//! `GET /api/v1/openapi.json` (the document generated from the handlers, see
//! [`crate::openapi`]) and `GET /metrics` (Prometheus text, see [`crate::metrics`]).
//!
//! Both need a key like everything but `/health`: the document is no secret, but the figures
//! are the whole gateway's, across tenants.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use crate::AppState;
use crate::auth::Caller;

#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "meta",
    responses((status = 200, description = "This document (OpenAPI 3.1)", content_type = "application/json", body = Object)),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn openapi_json(_caller: Caller) -> Json<utoipa::openapi::OpenApi> {
    Json(crate::openapi::document())
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    responses((status = 200, description = "Requests by route and status, latency histogram, requests in flight, NATS connection state", content_type = "text/plain; version=0.0.4", body = String)),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn metrics(_caller: Caller, State(state): State<AppState>) -> Response {
    let text = state.metrics().render(state.orchestrator().is_connected());
    let mut response = text.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    response
}
