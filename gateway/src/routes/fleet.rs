//! `GET /api/v1/metrics/fleet`: the orchestrator's `FleetSummary`, as is.

use axum::Extension;
use axum::Json;
use axum::extract::State;
use fleet_schemas::RequestId;
use fleet_schemas::api::{Empty, Endpoint, FleetSummary};

use super::call;
use crate::AppState;
use crate::auth::Caller;
use crate::error::{CallKind, HttpError};

pub async fn summary(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
) -> Result<Json<FleetSummary>, HttpError> {
    call(&state, Endpoint::FleetSummary, request_id, &caller, Empty {}, CallKind::Retryable).await.map(Json)
}
