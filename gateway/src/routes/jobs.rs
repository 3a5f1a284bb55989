//! Jobs: `GET /api/v1/metrics/jobs`, `GET /api/v1/metrics/jobs/{job_id}` and
//! `POST /api/v1/jobs/{job_id}/cancel`.
//!
//! Answers are the orchestrator's `JobView`s, whose fields are all always present (`null` when
//! unknown), because the Canvas reads keys without checking for them. Lists are bare JSON arrays,
//! as the Canvas expects. Cancel takes no body: the Canvas posts it with no body and no
//! `Content-Type`, and a repeated cancel is harmless, so a lost answer is a retryable 503.

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State, rejection::PathRejection};
use axum::http::Uri;
use fleet_schemas::api::{Cancelled, Endpoint, GetById, JobStatus, JobView, ListJobs};
use fleet_schemas::{JobId, RequestId, RobotId};
use serde_json::Value;

use super::{QueryParams, call, path_id};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{CallKind, HttpError};

/// Bounds of `limit` on the job list, and its default.
pub const LIMIT_RANGE: std::ops::RangeInclusive<u32> = 1..=500;
pub const DEFAULT_LIMIT: u32 = 100;

#[utoipa::path(
    get,
    path = "/api/v1/metrics/jobs/{job_id}",
    tag = "jobs",
    params(("job_id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job, with `node_executions`", body = crate::openapi::Job),
        (status = 404, description = "No such job in the caller's tenant", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn get(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, HttpError> {
    let id = path_id(path, "job", |s| s.parse::<JobId>().ok())?;
    let job: JobView =
        call(&state, Endpoint::GetJob, request_id, &caller, GetById { id }, CallKind::Retryable).await?;
    let mut json = serde_json::to_value(job).map_err(|e| HttpError::internal(e.to_string()))?;
    if let Value::Object(m) = &mut json {
        // The Canvas reads per-node results here; Fleet does not record them (yet).
        m.entry("node_executions").or_insert_with(|| Value::Array(Vec::new()));
    }
    Ok(Json(json))
}

#[utoipa::path(
    get,
    path = "/api/v1/metrics/jobs",
    tag = "jobs",
    params(
        ("limit" = Option<u32>, Query, description = "1 to 500, default 100"),
        ("status" = Option<String>, Query, description = "pending, queued, running, completed, failed, cancelled, timed_out"),
        ("workflow_id" = Option<String>, Query),
        ("robot_id" = Option<String>, Query),
    ),
    responses(
        (status = 200, description = "Newest first, a bare array", body = Vec<crate::openapi::Job>),
        (status = 422, description = "A filter is wrong", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    uri: Uri,
) -> Result<Json<Vec<JobView>>, HttpError> {
    let query = list_query(&QueryParams::from_uri(&uri)?)?;
    let jobs = call(&state, Endpoint::ListJobs, request_id, &caller, query, CallKind::Retryable).await?;
    Ok(Json(jobs))
}

fn list_query(q: &QueryParams) -> Result<ListJobs, HttpError> {
    let status = q
        .get("status")
        .map(|s| {
            JobStatus::parse(s).ok_or_else(|| {
                let all: Vec<_> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
                HttpError::invalid("status", format!("must be one of {}", all.join(", ")))
            })
        })
        .transpose()?;
    let robot_id = q
        .get("robot_id")
        .map(|s| RobotId::new(s).map_err(|_| HttpError::invalid("robot_id", RobotId::RULE)))
        .transpose()?;
    let limit = match q.get("limit") {
        None => DEFAULT_LIMIT,
        Some(s) => s
            .parse::<u32>()
            .ok()
            .filter(|n| LIMIT_RANGE.contains(n))
            .ok_or_else(|| HttpError::invalid("limit", "must be an integer from 1 to 500"))?,
    };
    Ok(ListJobs { status, workflow_id: q.get("workflow_id").map(str::to_owned), robot_id, limit })
}

#[utoipa::path(
    post,
    path = "/api/v1/jobs/{job_id}/cancel",
    tag = "jobs",
    params(("job_id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Cancelled, or asked to stop (running)", body = crate::openapi::Cancelled),
        (status = 404, description = "No such job in the caller's tenant", body = crate::openapi::ErrorBody),
        (status = 409, description = "The job already ended", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn cancel(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Cancelled>, HttpError> {
    caller.require(fleet_schemas::keys::Role::Operator)?;
    let id = path_id(path, "job", |s| s.parse::<JobId>().ok())?;
    let cancelled =
        call(&state, Endpoint::CancelJob, request_id, &caller, GetById { id }, CallKind::Retryable).await?;
    Ok(Json(cancelled))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Result<ListJobs, HttpError> {
        list_query(&QueryParams::from_uri(&format!("/x?{s}").parse().unwrap()).unwrap())
    }

    #[test]
    fn list_filters() {
        let l = q("").unwrap();
        assert_eq!((l.limit, l.status, l.robot_id), (100, None, None));
        let l = q("status=timed_out&limit=500&robot_id=r1&workflow_id=w&status=").unwrap();
        assert_eq!(l.status, None, "an empty value is no filter");
        let l = q("status=timed_out&limit=500&robot_id=r1&workflow_id=w").unwrap();
        assert_eq!(l.status, Some(JobStatus::TimedOut));
        assert_eq!((l.limit, l.workflow_id.as_deref()), (500, Some("w")));
        for (query, field) in [
            ("limit=0", "limit"),
            ("limit=501", "limit"),
            ("limit=ten", "limit"),
            ("status=sleeping", "status"),
            ("robot_id=R_1", "robot_id"),
        ] {
            assert_eq!(q(query).unwrap_err().field.as_deref(), Some(field), "{query}");
        }
    }
}
