//! Robots: `GET /api/v1/metrics/robots[?status=&capability=]` and `GET /api/v1/metrics/robots/{robot_id}`.
//!
//! Answers are the orchestrator's `RobotView`s plus the aliases the Canvas reads
//! (`current_job_id`, `current_jobs`), and for one robot the per-robot statistics the Canvas
//! shows (`jobs_completed_today`, …) as zero or null until the orchestrator provides them.

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State, rejection::PathRejection};
use axum::http::Uri;
use fleet_schemas::api::{Endpoint, ListRobots, RobotStatus, RobotView};
use fleet_schemas::{Capability, RequestId};
use serde::Serialize;

use super::{QueryParams, call};
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
) -> Result<Json<Vec<Robot>>, HttpError> {
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
    Ok(Json(robots.into_iter().map(Robot::from).collect()))
}

#[utoipa::path(
    get,
    path = "/api/v1/metrics/robots/{robot_id}",
    tag = "robots",
    params(("robot_id" = String, Path, pattern = "^[a-z0-9-]{1,64}$", description = "Robot id")),
    responses(
        (status = 200, description = "The robot, with its statistics", body = crate::openapi::RobotDetail),
        (status = 404, description = "No such robot in the caller's tenant", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn get(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<RobotDetail>, HttpError> {
    let id = super::robot_path(path)?;
    let robot: RobotView = super::get_robot(&state, request_id, &caller, id).await?;
    // Placeholders until the orchestrator keeps per-robot statistics.
    Ok(Json(RobotDetail {
        robot: robot.into(),
        jobs_completed_today: 0,
        jobs_failed_today: 0,
        average_job_duration_seconds: None,
        memory_percent: None,
    }))
}

/// A robot as the Canvas reads it: the orchestrator's `RobotView` with two aliases.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Robot {
    #[serde(flatten)]
    pub robot: RobotView,
    /// The first of `current_job_ids`.
    pub current_job_id: Option<String>,
    /// How many jobs run (the length of `current_job_ids`).
    pub current_jobs: u32,
}

impl From<RobotView> for Robot {
    fn from(robot: RobotView) -> Robot {
        let current_job_id = robot.current_job_ids.first().cloned();
        let current_jobs = u32::try_from(robot.current_job_ids.len()).unwrap_or(u32::MAX);
        Robot { robot, current_job_id, current_jobs }
    }
}

/// One robot with the per-robot statistics the Canvas shows, zero or null until the
/// orchestrator keeps them.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RobotDetail {
    #[serde(flatten)]
    pub robot: Robot,
    pub jobs_completed_today: u32,
    pub jobs_failed_today: u32,
    pub average_job_duration_seconds: Option<f64>,
    pub memory_percent: Option<f64>,
}
