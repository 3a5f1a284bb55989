//! The robot-facing endpoints of the Canvas contract, for HTTP robot agents holding a robot key:
//! `POST /api/v1/robots/{robot_id}/heartbeat`, `POST /api/v1/jobs/claim` and
//! `POST /api/v1/jobs/{job_id}/extend-lease|complete|fail|release`.
//!
//! The robot is always the key's (`Caller::robot_id`, from the verified key), never the body's:
//! a user key gets 403, another robot's id 404 (as an id that does not exist). Ownership is the
//! orchestrator's (`orchestrator/src/http_robots.rs`): the same claim, lease and fencing as NATS
//! robots, so a stale owner gets 409.
//!
//! Bodies are read leniently where the seed's agent may send more than the contract lists
//! (unknown fields are ignored, `null` counts as absent), and strictly where it matters: a lease
//! out of range or an empty error message is a 422 naming the field.

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State, rejection::PathRejection};
use axum::http::StatusCode;
use fleet_schemas::api::{
    AgentBeat, AgentClaim, AgentHeartbeat, AgentJob, AgentJobReport, AgentReport, AgentReported, Endpoint,
};
use fleet_schemas::{JobId, RequestId, RobotId};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::call;
use crate::AppState;
use crate::auth::Caller;
use crate::error::{CallKind, HttpError};
use crate::extract::optional_json;

// ----- the answers, each the type the handler serializes and the document describes ---------

/// Metrics of a heartbeat; other keys are accepted and ignored, and nulls are fine.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[allow(dead_code)] // read as a map; this is its description
pub struct HeartbeatMetrics {
    cpu_percent: Option<f64>,
    memory_mb: Option<f64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HeartbeatAnswer {
    ok: bool,
    /// RFC 3339
    timestamp: String,
}

/// A job claimed by an HTTP robot.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ClaimedJob {
    #[schema(value_type = String)]
    job_id: JobId,
    workflow_id: String,
    workflow_name: String,
    /// The workflow as submitted, as a JSON string (what the seed's agent parses).
    workflow_json: String,
    priority: i16,
    /// The robot's environment.
    environment: String,
    variables: serde_json::Map<String, Value>,
    /// RFC 3339
    created_at: String,
    /// RFC 3339
    claimed_at: String,
    /// Attempts before this one.
    retry_count: i32,
    /// Attempts the job may still get when its robot is lost.
    max_retries: i32,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LeaseExtended {
    #[schema(value_type = String)]
    job_id: JobId,
    extended: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobCompleted {
    #[schema(value_type = String)]
    job_id: JobId,
    completed: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FailAnswer {
    #[schema(value_type = String)]
    job_id: JobId,
    /// `failed`
    #[schema(value_type = crate::openapi::JobStatus)]
    status: fleet_schemas::api::JobStatus,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobReleased {
    #[schema(value_type = String)]
    job_id: JobId,
    released: bool,
}

/// The lease when the robot does not ask for one (the contract's default).
const DEFAULT_LEASE_S: u32 = 30;
/// Longest error message `fail` takes (the contract's bound).
const MAX_ERROR: usize = 5000;

/// The key's robot; 403 for a user key.
pub(crate) fn robot_of(caller: &Caller) -> Result<RobotId, HttpError> {
    caller.robot_id.clone().ok_or_else(|| {
        HttpError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only a robot key may do this (create one with POST /api/v1/robot-api-keys)",
        )
    })
}

/// Mark the key's robot online (a heartbeat) or, with `offline`, take it offline now.
pub(crate) async fn beat(
    state: &AppState,
    request_id: RequestId,
    caller: &Caller,
    robot_id: RobotId,
    metrics: &Value,
    offline: bool,
) -> Result<AgentBeat, HttpError> {
    let key_robot = robot_of(caller)?;
    let number = |name: &str| metrics.get(name).and_then(Value::as_f64);
    let req = AgentHeartbeat {
        key_robot,
        key_id: caller.key_id.clone(),
        robot_id,
        cpu_percent: number("cpu_percent").map(|v| v as f32),
        memory_mb: number("memory_mb"),
        offline,
    };
    call(state, Endpoint::AgentHeartbeat, request_id, caller, req, CallKind::Retryable).await
}

/// `POST /api/v1/robots/{robot_id}/heartbeat` with the robot's metrics (any object; `{}` and
/// `null` values are fine; `cpu_percent` and `memory_mb` are shown on the robot).
#[utoipa::path(
    post,
    path = "/api/v1/robots/{robot_id}/heartbeat",
    tag = "agent",
    params(("robot_id" = String, Path, pattern = "^[a-z0-9-]{1,64}$", description = "The key's robot")),
    request_body(content = Option<HeartbeatMetrics>, description = "Metrics; may be `{}` or hold nulls"),
    responses(
        (status = 200, description = "`{ok, timestamp}`: the robot is online until its heartbeat lapses", body = HeartbeatAnswer),
        (status = 403, description = "Not a robot key", body = crate::openapi::ErrorBody),
        (status = 404, description = "Not the key's robot, or the robot is not registered", body = crate::openapi::ErrorBody),
        (status = 422, description = "The body is not a JSON object", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn heartbeat(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<Json<HeartbeatAnswer>, HttpError> {
    robot_of(&caller)?;
    let robot_id = super::robot_path(path)?;
    let metrics: serde_json::Map<String, Value> = optional_json(&body)?;
    let beat = beat(&state, request_id, &caller, robot_id, &Value::Object(metrics), false).await?;
    Ok(Json(HeartbeatAnswer { ok: true, timestamp: rfc3339(beat.timestamp) }))
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Body of `POST /api/v1/jobs/claim`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct ClaimBody {
    /// Informational: jobs are routed by the robot's registered capabilities.
    #[serde(default)]
    environment: Option<String>,
    /// At least 1; at most one job is handed out per call.
    #[serde(default)]
    #[schema(minimum = 1)]
    limit: Option<u32>,
    /// The lease, 5 to 3600 s (default 30): renew it with `extend-lease` before it lapses.
    #[serde(default)]
    #[schema(minimum = 5, maximum = 3600)]
    visibility_timeout_seconds: Option<u32>,
}

/// `POST /api/v1/jobs/claim`: the next job for the key's robot, or JSON `null`.
#[utoipa::path(
    post,
    path = "/api/v1/jobs/claim",
    tag = "agent",
    request_body(content = Option<ClaimBody>),
    responses(
        (status = 200, description = "The claimed job, or `null` when there is none", body = Option<ClaimedJob>),
        (status = 403, description = "Not a robot key", body = crate::openapi::ErrorBody),
        (status = 404, description = "The key's robot is not registered", body = crate::openapi::ErrorBody),
        (status = 422, description = "A field is wrong; `error.field` names it", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn claim(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    body: Bytes,
) -> Result<Json<Option<ClaimedJob>>, HttpError> {
    let key_robot = robot_of(&caller)?;
    let body: ClaimBody = optional_json(&body)?;
    if body.limit == Some(0) {
        return Err(HttpError::invalid("limit", "must be at least 1"));
    }
    // Routing is by the robot's registered capabilities; the environment is only shown.
    let _ = body.environment;
    let lease_s = body.visibility_timeout_seconds.unwrap_or(DEFAULT_LEASE_S);
    let req = AgentClaim { key_robot, key_id: caller.key_id.clone(), lease_s };
    let job: Option<AgentJob> =
        call(&state, Endpoint::AgentClaim, request_id, &caller, req, CallKind::Retryable).await?;
    Ok(Json(job.map(|job| ClaimedJob {
        job_id: job.job_id,
        workflow_id: job.workflow_id,
        workflow_name: job.workflow_name,
        workflow_json: job.workflow.to_string(),
        priority: job.priority,
        environment: job.environment,
        variables: job.variables,
        created_at: rfc3339(job.created_at),
        claimed_at: rfc3339(job.claimed_at),
        retry_count: job.retry_count,
        max_retries: job.max_retries,
    })))
}

/// Body of `POST /api/v1/jobs/{job_id}/extend-lease`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct ExtendBody {
    /// The new lease from now, 5 to 3600 s (default 30).
    #[serde(default)]
    #[schema(minimum = 5, maximum = 3600)]
    extension_seconds: Option<u32>,
}

/// Body of `POST /api/v1/jobs/{job_id}/complete`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct CompleteBody {
    /// The run's result (`executed_nodes`, `duration_ms`, `recovered`, …): the job's output.
    #[serde(default)]
    result: Option<Value>,
}

/// Body of `POST /api/v1/jobs/{job_id}/fail`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct FailBody {
    /// 1 to 5000 characters.
    #[schema(min_length = 1, max_length = 5000)]
    error_message: String,
}

/// The four reports on a held job, told apart by the route.
async fn report(
    caller: &Caller,
    state: &AppState,
    request_id: RequestId,
    path: Result<Path<String>, PathRejection>,
    report: AgentReport,
) -> Result<AgentReported, HttpError> {
    let key_robot = robot_of(caller)?;
    let job_id = super::job_path(path)?;
    let req = AgentJobReport { key_robot, job_id, report };
    call(state, Endpoint::AgentReport, request_id, caller, req, CallKind::Retryable).await
}

#[utoipa::path(
    post,
    path = "/api/v1/jobs/{job_id}/extend-lease",
    tag = "agent",
    params(("job_id" = String, Path, description = "Job id (a UUID)")),
    request_body(content = Option<ExtendBody>),
    responses(
        (status = 200, description = "The lease runs `extension_seconds` from now", body = LeaseExtended),
        (status = 403, description = "Not a robot key", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such job in the caller's tenant", body = crate::openapi::ErrorBody),
        (status = 409, description = "The robot does not hold the job (any more), or it was cancelled", body = crate::openapi::ErrorBody),
        (status = 422, description = "`extension_seconds` out of range", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn extend_lease(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<Json<LeaseExtended>, HttpError> {
    robot_of(&caller)?;
    let body: ExtendBody = optional_json(&body)?;
    let lease_s = body.extension_seconds.unwrap_or(DEFAULT_LEASE_S);
    let done = report(&caller, &state, request_id, path, AgentReport::ExtendLease { lease_s }).await?;
    Ok(Json(LeaseExtended { job_id: done.job_id, extended: true }))
}

#[utoipa::path(
    post,
    path = "/api/v1/jobs/{job_id}/complete",
    tag = "agent",
    params(("job_id" = String, Path, description = "Job id (a UUID)")),
    request_body(content = Option<CompleteBody>),
    responses(
        (status = 200, description = "The job is completed with `result` as its output", body = JobCompleted),
        (status = 403, description = "Not a robot key", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such job in the caller's tenant", body = crate::openapi::ErrorBody),
        (status = 409, description = "The robot does not hold the job (any more)", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn complete(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<Json<JobCompleted>, HttpError> {
    robot_of(&caller)?;
    let body: CompleteBody = optional_json(&body)?;
    let result = body.result.unwrap_or_else(|| json!({}));
    let done = report(&caller, &state, request_id, path, AgentReport::Complete { result }).await?;
    Ok(Json(JobCompleted { job_id: done.job_id, completed: true }))
}

#[utoipa::path(
    post,
    path = "/api/v1/jobs/{job_id}/fail",
    tag = "agent",
    params(("job_id" = String, Path, description = "Job id (a UUID)")),
    request_body = FailBody,
    responses(
        (status = 200, description = "`{job_id, status}`: `failed` (a failed run is not retried by itself; `POST /api/v1/jobs/{id}/retry` retries it)", body = FailAnswer),
        (status = 403, description = "Not a robot key", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such job in the caller's tenant", body = crate::openapi::ErrorBody),
        (status = 409, description = "The robot does not hold the job (any more)", body = crate::openapi::ErrorBody),
        (status = 422, description = "`error_message` missing, empty or longer than 5000 characters", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn fail(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<Json<FailAnswer>, HttpError> {
    robot_of(&caller)?;
    let body: FailBody = crate::extract::parse_json(&body)?;
    let error_message = body.error_message.trim().to_owned();
    if error_message.is_empty() || error_message.chars().count() > MAX_ERROR {
        return Err(HttpError::invalid("error_message", format!("must be 1 to {MAX_ERROR} characters")));
    }
    let done = report(&caller, &state, request_id, path, AgentReport::Fail { error_message }).await?;
    Ok(Json(FailAnswer { job_id: done.job_id, status: done.status }))
}

#[utoipa::path(
    post,
    path = "/api/v1/jobs/{job_id}/release",
    tag = "agent",
    params(("job_id" = String, Path, description = "Job id (a UUID)")),
    responses(
        (status = 200, description = "The job is pending and offered again at once", body = JobReleased),
        (status = 403, description = "Not a robot key", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such job in the caller's tenant", body = crate::openapi::ErrorBody),
        (status = 409, description = "The robot does not hold the job (any more)", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn release(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<JobReleased>, HttpError> {
    let done = report(&caller, &state, request_id, path, AgentReport::Release).await?;
    Ok(Json(JobReleased { job_id: done.job_id, released: true }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    /// The document describes the robot-facing routes with the types the handlers answer, and
    /// every reference in it resolves.
    #[test]
    fn the_document_describes_what_the_handlers_answer() {
        let doc = serde_json::to_value(crate::openapi::document()).unwrap();
        let mut found = Vec::new();
        refs(&doc, &mut found);
        for r in found {
            let path = r.trim_start_matches("#/").split('/').fold(&doc, |v, k| &v[k]);
            assert!(path.is_object(), "dangling {r}");
        }
        let schemas = &doc["components"]["schemas"];
        let t = time::OffsetDateTime::UNIX_EPOCH;
        let job = ClaimedJob {
            job_id: JobId::new(),
            workflow_id: String::new(),
            workflow_name: String::new(),
            workflow_json: "{}".into(),
            priority: 10,
            environment: String::new(),
            variables: Default::default(),
            created_at: rfc3339(t),
            claimed_at: rfc3339(t),
            retry_count: 0,
            max_retries: 2,
        };
        let keys = |v: &Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        let served = serde_json::to_value(job).unwrap();
        assert_eq!(keys(&schemas["ClaimedJob"]["properties"]), keys(&served));
        let required = schemas["ClaimedJob"]["required"].as_array().unwrap().len();
        assert_eq!(required, keys(&served).len(), "every field is always present");
    }
}
