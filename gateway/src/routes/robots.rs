//! Robots: `GET /api/v1/metrics/robots[?status=&capability=]` and `GET /api/v1/metrics/robots/{robot_id}`.
//!
//! Answers are the orchestrator's `RobotView`s plus the aliases the Canvas reads
//! (`current_job_id`, `current_jobs`), and for one robot the per-robot statistics the Canvas
//! shows (`jobs_completed_today`, …) as zero or null until the orchestrator provides them.

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State, rejection::PathRejection};
use axum::http::Uri;
use fleet_schemas::api::{Endpoint, GetById, ListRobots, RobotStatus, RobotView};
use fleet_schemas::{Capability, RequestId, RobotId};
use serde_json::{Value, json};

use super::{QueryParams, call, path_id};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{CallKind, HttpError};

#[utoipa::path(
    get,
    path = "/api/v1/metrics/robots",
    tag = "robots",
    params(
        ("status" = Option<crate::openapi::RobotStatusFilter>, Query),
        ("capability" = Option<crate::openapi::Capability>, Query, description = "Only robots that have this capability (declared, or implicit such as `shell`)"),
    ),
    responses(
        (status = 200, description = "A bare array", body = Vec<crate::openapi::Robot>),
        (status = 422, description = "A filter is wrong", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    uri: Uri,
) -> Result<Json<Vec<Value>>, HttpError> {
    let q = QueryParams::from_uri(&uri)?;
    let status = q
        .get("status")
        .map(|s| {
            RobotStatus::parse(s).ok_or_else(|| {
                HttpError::invalid("status", "must be one of idle, online, busy, offline, maintenance, error")
            })
        })
        .transpose()?;
    let capability = q
        .get("capability")
        .map(|c| Capability::new(c).map_err(|e| HttpError::invalid("capability", e.to_string())))
        .transpose()?;
    let query = ListRobots { status, capability };
    let robots: Vec<RobotView> =
        call(&state, Endpoint::ListRobots, request_id, &caller, query, CallKind::Retryable).await?;
    robots.into_iter().map(canvas_view).collect::<Result<_, _>>().map(Json)
}

#[utoipa::path(
    get,
    path = "/api/v1/metrics/robots/{robot_id}",
    tag = "robots",
    params(("robot_id" = String, Path, pattern = "^[a-z0-9-]{1,64}$", description = "Robot id")),
    responses(
        (status = 200, description = "The robot, with its statistics", body = crate::openapi::Robot),
        (status = 404, description = "No such robot in the caller's tenant", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn get(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, HttpError> {
    let id = path_id(path, "robot", |s| RobotId::new(s).ok())?;
    let robot: RobotView =
        call(&state, Endpoint::GetRobot, request_id, &caller, GetById { id }, CallKind::Retryable).await?;
    let mut json = canvas_view(robot)?;
    if let Value::Object(m) = &mut json {
        // Placeholders until the orchestrator keeps per-robot statistics.
        for (key, placeholder) in [
            ("jobs_completed_today", json!(0)),
            ("jobs_failed_today", json!(0)),
            ("average_job_duration_seconds", Value::Null),
            ("memory_percent", Value::Null),
        ] {
            m.entry(key).or_insert(placeholder);
        }
    }
    Ok(Json(json))
}

/// A `RobotView` with the Canvas's aliases added.
fn canvas_view(robot: RobotView) -> Result<Value, HttpError> {
    let first_job = robot.current_job_ids.first().cloned();
    let running = robot.current_job_ids.len();
    let mut json = serde_json::to_value(robot).map_err(|e| HttpError::internal(e.to_string()))?;
    if let Value::Object(m) = &mut json {
        m.entry("current_job_id").or_insert_with(|| json!(first_job));
        m.entry("current_jobs").or_insert_with(|| json!(running));
    }
    Ok(json)
}
