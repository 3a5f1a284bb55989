//! Jobs: `GET /api/v1/metrics/jobs`, `GET /api/v1/metrics/jobs/{job_id}`,
//! `POST /api/v1/jobs/{job_id}/cancel` and `POST /api/v1/jobs/{job_id}/retry`.
//!
//! The list is paged by keyset: when more jobs follow, the answer carries the next page's
//! opaque cursor in an `X-Next-Cursor` header (the body stays the bare array the Canvas reads),
//! and `?cursor=` continues from there, newest first, with no job repeated or skipped.
//!
//! Answers are the orchestrator's `JobView`s, whose fields are all always present (`null` when
//! unknown), because the Canvas reads keys without checking for them. Lists are bare JSON arrays,
//! as the Canvas expects. Cancel takes no body: the Canvas posts it with no body and no
//! `Content-Type`, and a repeated cancel is harmless, so a lost answer is a retryable 503.

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State, rejection::PathRejection};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Uri};
use fleet_schemas::api::{Cancelled, Endpoint, GetById, JobCursor, JobStatus, JobView, ListJobs, Retried};
use fleet_schemas::{RequestId, RobotId};
use serde_json::Value;

use super::{QueryParams, call};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{CallKind, HttpError};

/// Bounds of `limit` on the job list, and its default.
pub const LIMIT_RANGE: std::ops::RangeInclusive<u32> = 1..=500;
pub const DEFAULT_LIMIT: u32 = 100;
/// The header that carries the next page's cursor.
pub const NEXT_CURSOR: HeaderName = HeaderName::from_static("x-next-cursor");

#[utoipa::path(
    get,
    path = "/api/v1/metrics/jobs/{job_id}",
    tag = "jobs",
    params(("job_id" = String, Path, pattern = "^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$", description = "Job id (a UUID)")),
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
    let id = super::job_path(path)?;
    let job: JobView = super::get_job(&state, request_id, &caller, id).await?;
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
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "1 to 500, default 100"),
        ("status" = Option<crate::openapi::JobStatus>, Query),
        ("workflow_id" = Option<String>, Query),
        ("robot_id" = Option<String>, Query, pattern = "^[a-z0-9-]{1,64}$"),
        ("cursor" = Option<String>, Query, pattern = "^[0-7][0-9a-fA-F]{47}$", description = "The `X-Next-Cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "Newest first, a bare array", body = Vec<crate::openapi::Job>,
            headers(("X-Next-Cursor" = String, description = "Present when more jobs follow: pass it as `cursor` for the next page"))),
        (status = 422, description = "A filter is wrong", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    uri: Uri,
) -> Result<(HeaderMap, Json<Vec<JobView>>), HttpError> {
    let query = list_query(&QueryParams::from_uri(&uri)?)?;
    let limit = query.limit as usize;
    let mut jobs: Vec<JobView> =
        call(&state, Endpoint::ListJobs, request_id, &caller, query, CallKind::Retryable).await?;
    let mut headers = HeaderMap::new();
    // The orchestrator answers one job more than asked when there is one: that job only says
    // another page exists, and the page ends at the job before it.
    if jobs.len() > limit {
        jobs.truncate(limit);
        if let Some(last) = jobs.last()
            && let Ok(value) = HeaderValue::from_str(&JobCursor::after(last).token())
        {
            headers.insert(NEXT_CURSOR, value);
        }
    }
    Ok((headers, Json(jobs)))
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
    let cursor = q
        .get("cursor")
        .map(|c| {
            JobCursor::parse(c).ok_or_else(|| {
                HttpError::invalid("cursor", "not a cursor of this list (use the X-Next-Cursor header)")
            })
        })
        .transpose()?;
    Ok(ListJobs {
        status,
        workflow_id: q.get("workflow_id").map(str::to_owned),
        robot_id,
        limit,
        cursor,
        peek_next: true,
    })
}

#[utoipa::path(
    post,
    path = "/api/v1/jobs/{job_id}/cancel",
    tag = "jobs",
    params(("job_id" = String, Path, pattern = "^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$", description = "Job id (a UUID)")),
    responses(
        (status = 200, description = "Cancelled (a running job ends at once and its robot is told to kill it), or already ended", body = crate::openapi::Cancelled),
        (status = 403, description = "The key's role is below operator", body = crate::openapi::ErrorBody),
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
    let id = super::job_path(path)?;
    let cancelled =
        call(&state, Endpoint::CancelJob, request_id, &caller, GetById { id }, CallKind::Retryable).await?;
    Ok(Json(cancelled))
}

#[utoipa::path(
    post,
    path = "/api/v1/jobs/{job_id}/retry",
    tag = "jobs",
    params(("job_id" = String, Path, pattern = "^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$", description = "Job id (a UUID)")),
    responses(
        (status = 200, description = "The job runs again as its next attempt, under the same id", body = crate::openapi::Retried),
        (status = 403, description = "The key's role is below operator", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such job in the caller's tenant", body = crate::openapi::ErrorBody),
        (status = 409, description = "The job is not failed, cancelled or timed out", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn retry(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Retried>, HttpError> {
    caller.require(fleet_schemas::keys::Role::Operator)?;
    let id = super::job_path(path)?;
    // Repeating a retry whose answer was lost is harmless: the job is then pending, and the
    // second one answers 409 without changing anything.
    let retried =
        call(&state, Endpoint::RetryJob, request_id, &caller, GetById { id }, CallKind::Retryable).await?;
    Ok(Json(retried))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Result<ListJobs, HttpError> {
        list_query(&QueryParams::from_uri(&format!("/x?{s}").parse().unwrap())?)
    }

    #[test]
    fn list_filters() {
        let l = q("").unwrap();
        assert_eq!((l.limit, l.status, l.robot_id), (100, None, None));
        let l = q("status=&limit=500&robot_id=r1&workflow_id=w").unwrap();
        assert_eq!(l.status, None, "an empty value is no filter");
        assert_eq!(q("status=failed&status=").unwrap_err().field.as_deref(), Some("status"), "given twice");
        let l = q("status=timed_out&limit=500&robot_id=r1&workflow_id=w").unwrap();
        assert_eq!(l.status, Some(JobStatus::TimedOut));
        assert_eq!((l.limit, l.workflow_id.as_deref()), (500, Some("w")));
        assert!(l.peek_next && l.cursor.is_none());
        let c = JobCursor { created_at_us: 1_767_225_600_000_001, job_id: fleet_schemas::JobId::new() };
        assert_eq!(q(&format!("cursor={}", c.token())).unwrap().cursor, Some(c));
        for (query, field) in [
            ("limit=0", "limit"),
            ("limit=501", "limit"),
            ("limit=ten", "limit"),
            ("status=sleeping", "status"),
            ("robot_id=R_1", "robot_id"),
            ("cursor=nope", "cursor"),
            ("cursor=0000000000000000zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", "cursor"),
            ("cursor=FbC1a6E1eE98de1DC6D8a9ACd0F7A0B0b80f0F69BDeb88aF", "cursor"),
        ] {
            assert_eq!(q(query).unwrap_err().field.as_deref(), Some(field), "{query}");
        }
    }
}
