//! `GET /health`: is this gateway useful right now?
//!
//! Healthy means both that NATS is connected and that an orchestrator answers a ping, because a
//! gateway with no orchestrator behind it can answer nothing but 503. The answer is exactly 200
//! when healthy (the Canvas tests for 200) and 503 otherwise, with the same body saying which
//! part is down. No key is needed: load balancers and the Canvas call it without one.
//!
//! The ping has its own short deadline so a health check never hangs for the full request
//! timeout.

use std::time::Duration;

use axum::Extension;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fleet_schemas::api::{Empty, Endpoint, Pong};
use fleet_schemas::{RequestId, TenantId};
use serde::Serialize;
use time::OffsetDateTime;

use crate::AppState;
use crate::orchestrator::CallError;

/// How long a health check waits for the orchestrator's pong.
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `healthy` or `unhealthy`.
    pub status: &'static str,
    pub service: &'static str,
    pub version: &'static str,
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    /// `connected` or `disconnected`.
    pub nats: &'static str,
    /// `reachable`, `unreachable`, or `unknown` while NATS is down.
    pub orchestrator: &'static str,
    /// Whether the orchestrator that answered is the active leader.
    pub leader: bool,
    /// What is wrong, when something is.
    pub detail: Option<String>,
}

#[utoipa::path(
    get,
    path = "/health",
    tag = "meta",
    responses(
        (status = 200, description = "Healthy: NATS connected and an orchestrator answers", body = crate::openapi::Health),
        (status = 503, description = "Unhealthy; `detail` says why", body = crate::openapi::Health),
    )
)]
pub async fn health(State(state): State<AppState>, Extension(request_id): Extension<RequestId>) -> Response {
    let orchestrator = state.orchestrator();
    let mut health = Health {
        status: "unhealthy",
        service: "fleet-gateway",
        version: env!("CARGO_PKG_VERSION"),
        timestamp: OffsetDateTime::now_utc(),
        nats: "disconnected",
        orchestrator: "unknown",
        leader: false,
        detail: None,
    };
    if !orchestrator.is_connected() {
        health.detail = Some("the gateway is not connected to NATS".to_owned());
        return (StatusCode::SERVICE_UNAVAILABLE, Json(health)).into_response();
    }
    health.nats = "connected";
    // A ping is not tenant data; the envelope needs a tenant, so it carries the default one.
    let tenant = TenantId::default_tenant();
    let pong: Result<Pong, CallError> = orchestrator
        .call_with_deadline(Endpoint::Ping, request_id, &tenant, Empty {}, PING_TIMEOUT, Duration::ZERO)
        .await;
    match pong {
        Ok(pong) => {
            health.status = "healthy";
            health.orchestrator = "reachable";
            health.leader = pong.leader;
            (StatusCode::OK, Json(health)).into_response()
        }
        Err(e) => {
            health.orchestrator = "unreachable";
            health.detail = Some(match e {
                CallError::NoResponders { .. } => "no orchestrator is running".to_owned(),
                other => format!("the orchestrator did not answer a ping: {other}"),
            });
            (StatusCode::SERVICE_UNAVAILABLE, Json(health)).into_response()
        }
    }
}
