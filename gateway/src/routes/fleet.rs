//! `GET /api/v1/metrics/fleet` (the orchestrator's `FleetSummary`) and `GET /api/v1/queues`
//! (one object per robot class: waiting, offered and running jobs, capacity, online robots).

use axum::Extension;
use axum::Json;
use axum::extract::State;
use fleet_schemas::RequestId;
use fleet_schemas::api::{Empty, Endpoint, FleetSummary, QueueView};

use super::call;
use crate::AppState;
use crate::auth::Caller;
use crate::error::{CallKind, HttpError};

#[utoipa::path(
    get,
    path = "/api/v1/metrics/fleet",
    tag = "fleet",
    responses((status = 200, description = "Fleet-wide figures of the caller's tenant", body = crate::openapi::FleetSummary)),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn summary(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
) -> Result<Json<FleetSummary>, HttpError> {
    call(&state, Endpoint::FleetSummary, request_id, &caller, Empty {}, CallKind::Retryable).await.map(Json)
}

#[utoipa::path(
    get,
    path = "/api/v1/queues",
    tag = "fleet",
    responses((status = 200, description = "One entry per robot class", body = Vec<crate::openapi::Queue>)),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn queues(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
) -> Result<Json<Vec<QueueView>>, HttpError> {
    call(&state, Endpoint::ListQueues, request_id, &caller, Empty {}, CallKind::Retryable).await.map(Json)
}
