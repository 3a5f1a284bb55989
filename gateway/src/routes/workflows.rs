//! `POST /api/v1/workflows`: submit a workflow as a job.
//!
//! The body is the Canvas's (`workflow_name`, `workflow_json`, `priority`, `trigger_type`,
//! `execution_mode`, `schedule_cron`, `metadata`) plus Fleet's own optional fields (`variables`,
//! `required_capabilities`, `target_robot_id`, `timeout_s`). Unknown top-level fields are
//! accepted because the Canvas sends more than Fleet reads.
//!
//! Everything is checked here, before anything is sent, so that bad input is a 422 naming the
//! field and never a half-done job: the workflow itself with `fleet_schemas::workflow::parse`
//! (paths like `workflow_json.steps[0].argv`), every capability and robot id by the same rules
//! the subjects use. The Canvas's `metadata.robot_id` and `metadata.variables` mean the same as
//! `target_robot_id` and `variables`; the explicit top-level field wins.
//!
//! A submit is the one call whose lost answer is dangerous: the orchestrator may have committed
//! the job. So a timeout is answered 500 `outcome_unknown` (not a status the Canvas retries),
//! and the request id in the answer lets the client find the job (see `crate::error`).

use axum::Extension;
use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use fleet_schemas::api::{Endpoint, JobStatus, SubmitJob, Submitted};
use fleet_schemas::ids::{Class, RobotId};
use fleet_schemas::workflow;
use fleet_schemas::{Capability, RequestId};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::call;
use crate::AppState;
use crate::auth::Caller;
use crate::error::{CallKind, HttpError};
use crate::extract::JsonBody;

/// Longest accepted `workflow_name`, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Priorities run from 0 to 20, the Canvas's range.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i64> = 0..=20;
pub const DEFAULT_PRIORITY: i16 = 10;
/// A generous ceiling on `timeout_s` (30 days), so the value always fits the orchestrator's
/// arithmetic on timestamps.
pub const MAX_TIMEOUT_S: u64 = 30 * 24 * 3600;
/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The submission body as sent.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct SubmitBody {
    /// Not blank; at most 200 characters once trimmed.
    #[schema(pattern = r"\S")]
    pub workflow_name: String,
    /// An object, or a string holding one (the Canvas sends either).
    #[schema(value_type = Object)]
    pub workflow_json: Value,
    /// 0 to 20, higher first; default 10.
    #[schema(minimum = 0, maximum = 20)]
    pub priority: Option<i64>,
    /// Default `manual`.
    #[schema(value_type = Option<crate::openapi::TriggerType>)]
    pub trigger_type: Option<String>,
    /// Default `lan`.
    #[schema(value_type = Option<crate::openapi::ExecutionMode>)]
    pub execution_mode: Option<String>,
    /// Only meaningful with schedules, which are refused for now, so it is ignored.
    pub schedule_cron: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
    #[schema(value_type = Option<Object>)]
    pub variables: Option<Map<String, Value>>,
    #[schema(value_type = Option<Vec<crate::openapi::Capability>>)]
    pub required_capabilities: Option<Vec<String>>,
    #[schema(value_type = Option<crate::openapi::RobotId>)]
    pub target_robot_id: Option<String>,
    /// 1 s to 30 days.
    #[schema(minimum = 1, maximum = 2_592_000)]
    pub timeout_s: Option<u64>,
}

/// The answer the Canvas reads.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SubmitResponse {
    pub workflow_id: String,
    pub job_id: String,
    /// Always null until schedules exist.
    pub schedule_id: Option<String>,
    #[schema(value_type = String)]
    pub status: &'static str,
    pub message: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    pub waiting_reason: Option<String>,
}

#[utoipa::path(
    post,
    path = "/api/v1/workflows",
    tag = "jobs",
    request_body = SubmitBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "The same key within 24 h returns the first job")),
    responses(
        (status = 200, description = "The job was committed", body = SubmitResponse),
        (status = 400, description = "Not JSON", body = crate::openapi::ErrorBody),
        (status = 403, description = "The key's role is below operator", body = crate::openapi::ErrorBody),
        (status = 413, description = "Body too large", body = crate::openapi::ErrorBody),
        (status = 422, description = "A field is wrong; `error.field` names it", body = crate::openapi::ErrorBody),
        (status = 500, description = "`outcome_unknown`: no confirmation in time; look the job up by request id", body = crate::openapi::ErrorBody),
        (status = 503, description = "Nothing was done; retry", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn submit(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<SubmitBody>,
) -> Result<Json<SubmitResponse>, HttpError> {
    caller.require(fleet_schemas::keys::Role::Operator)?;
    let idempotency_key = idempotency_key(&headers)?;
    let job = translate(body, idempotency_key)?;
    let submitted: Submitted =
        call(&state, Endpoint::SubmitJob, request_id, &caller, job, CallKind::Submit).await?;
    tracing::info!(job_id = %submitted.job_id, status = submitted.status.as_str(), "job submitted");
    Ok(Json(respond(submitted)))
}

fn respond(s: Submitted) -> SubmitResponse {
    let message = match (s.status, &s.waiting_reason) {
        (JobStatus::Pending, Some(reason)) => format!("Job pending: {reason}"),
        (JobStatus::Queued, _) => "Job queued".to_owned(),
        (status, _) => format!("Job {}", status.as_str()),
    };
    SubmitResponse {
        workflow_id: s.workflow_id,
        job_id: s.job_id.to_string(),
        schedule_id: None,
        status: s.status.as_str(),
        message,
        created_at: s.created_at,
        waiting_reason: s.waiting_reason,
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, HttpError> {
    const FIELD: &str = "Idempotency-Key";
    let Some(v) = headers.get(FIELD) else { return Ok(None) };
    let v = v.to_str().map_err(|_| HttpError::invalid(FIELD, "must be visible ASCII"))?.trim();
    if v.is_empty() {
        return Ok(None);
    }
    if v.len() > MAX_IDEMPOTENCY_KEY {
        return Err(HttpError::invalid(FIELD, format!("must be at most {MAX_IDEMPOTENCY_KEY} characters")));
    }
    Ok(Some(v.to_owned()))
}

/// Check a submission and turn it into the orchestrator's [`SubmitJob`].
pub fn translate(body: SubmitBody, idempotency_key: Option<String>) -> Result<SubmitJob, HttpError> {
    let workflow_name = body.workflow_name.trim().to_owned();
    if workflow_name.is_empty() {
        return Err(HttpError::invalid("workflow_name", "must not be empty"));
    }
    if workflow_name.chars().count() > MAX_NAME_CHARS {
        return Err(HttpError::invalid(
            "workflow_name",
            format!("must be at most {MAX_NAME_CHARS} characters"),
        ));
    }

    let workflow = match body.workflow_json {
        Value::String(s) => serde_json::from_str::<Value>(&s).map_err(|e| {
            HttpError::invalid("workflow_json", format!("is a string but does not hold valid JSON: {e}"))
        })?,
        other => other,
    };
    let parsed = workflow::parse(&workflow).map_err(|e| HttpError::invalid(e.field, e.message))?;

    let priority = body.priority.unwrap_or(i64::from(DEFAULT_PRIORITY));
    if !PRIORITY_RANGE.contains(&priority) {
        return Err(HttpError::invalid("priority", "must be an integer from 0 to 20"));
    }
    let priority = i16::try_from(priority).unwrap_or(DEFAULT_PRIORITY);

    let trigger_type = body.trigger_type.unwrap_or_else(|| "manual".to_owned());
    match trigger_type.as_str() {
        "manual" | "webhook" => {}
        "scheduled" => return Err(HttpError::invalid("trigger_type", "schedules are not supported yet")),
        _ => return Err(HttpError::invalid("trigger_type", "must be one of manual, scheduled, webhook")),
    }
    let execution_mode = body.execution_mode.unwrap_or_else(|| "lan".to_owned());
    if !matches!(execution_mode.as_str(), "lan" | "internet") {
        return Err(HttpError::invalid("execution_mode", "must be one of lan, internet"));
    }

    let metadata = body.metadata.unwrap_or_default();
    let metadata_robot = match metadata.get("robot_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(robot_id("metadata.robot_id", s)?),
        Some(_) => return Err(HttpError::invalid("metadata.robot_id", "must be a string")),
    };
    let mut variables = match metadata.get("variables") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(HttpError::invalid("metadata.variables", "must be an object")),
    };
    variables.extend(body.variables.unwrap_or_default());

    let target_robot_id = match body.target_robot_id {
        Some(s) => Some(robot_id("target_robot_id", &s)?),
        None => metadata_robot,
    };

    let caps = body.required_capabilities.unwrap_or_default();
    for (i, c) in caps.iter().enumerate() {
        Capability::new(c.as_str())
            .map_err(|_| HttpError::invalid(format!("required_capabilities[{i}]"), Capability::RULE))?;
    }
    let required_capabilities =
        Class::parse(&caps).map_err(|e| HttpError::invalid("required_capabilities", e.rule))?.to_strings();

    if let Some(t) = body.timeout_s {
        if t == 0 {
            return Err(HttpError::invalid("timeout_s", "must be at least 1 second"));
        }
        if t > MAX_TIMEOUT_S {
            return Err(HttpError::invalid("timeout_s", format!("must be at most {MAX_TIMEOUT_S} seconds")));
        }
    }
    tracing::debug!(format = parsed.format.as_str(), requires = %parsed.requires, "workflow checked");

    Ok(SubmitJob {
        workflow_name,
        workflow,
        priority,
        trigger_type,
        execution_mode,
        variables,
        required_capabilities,
        target_robot_id,
        timeout_s: body.timeout_s,
        metadata,
        idempotency_key,
    })
}

fn robot_id(field: &str, s: &str) -> Result<RobotId, HttpError> {
    RobotId::new(s).map_err(|_| HttpError::invalid(field, format!("not a valid robot id: {}", RobotId::RULE)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::parse_json;
    use serde_json::json;

    fn body(v: Value) -> Result<SubmitJob, HttpError> {
        let b: SubmitBody = parse_json(&serde_json::to_vec(&v).unwrap())?;
        translate(b, None)
    }

    fn wf() -> Value {
        json!({"steps": [{"id": "a", "kind": "log", "message": "hi"}]})
    }

    #[test]
    fn defaults_and_aliases() {
        let j = body(json!({
            "workflow_name": " Hello ",
            "workflow_json": wf().to_string(),
            "metadata": {"robot_id": "r7", "variables": {"a": 1, "b": 1}, "canvas_file": "x.json"},
            "variables": {"b": 2},
            "required_capabilities": ["gpu", "browser", "gpu"],
            "something_the_canvas_adds": true
        }))
        .unwrap();
        assert_eq!(j.workflow_name, "Hello");
        assert_eq!(j.workflow, wf(), "a string holding JSON is parsed");
        assert_eq!((j.priority, j.trigger_type.as_str(), j.execution_mode.as_str()), (10, "manual", "lan"));
        assert_eq!(j.target_robot_id.unwrap().as_str(), "r7");
        assert_eq!(Value::Object(j.variables), json!({"a": 1, "b": 2}), "top level wins");
        assert_eq!(j.required_capabilities, ["browser", "gpu"]);
        assert_eq!(j.metadata["canvas_file"], "x.json");
        let j = body(json!({"workflow_name": "x", "workflow_json": wf(), "target_robot_id": "r1",
            "metadata": {"robot_id": "r2"}}))
        .unwrap();
        assert_eq!(j.target_robot_id.unwrap().as_str(), "r1", "explicit field wins");
    }

    #[test]
    fn bad_fields_are_named() {
        let base = || json!({"workflow_name": "x", "workflow_json": wf()});
        let with = |k: &str, v: Value| {
            let mut b = base();
            b[k] = v;
            b
        };
        let cases = [
            (json!({"workflow_json": wf()}), "workflow_name"),
            (json!({"workflow_name": "x"}), "workflow_json"),
            (with("workflow_name", json!("  ")), "workflow_name"),
            (with("workflow_name", json!("n".repeat(201))), "workflow_name"),
            (with("workflow_json", json!("{not json")), "workflow_json"),
            (
                with("workflow_json", json!({"steps": [{"id": "a", "kind": "shell"}]})),
                "workflow_json.steps[0].argv",
            ),
            (with("priority", json!(21)), "priority"),
            (with("priority", json!(-1)), "priority"),
            (with("priority", json!("high")), "priority"),
            (with("trigger_type", json!("scheduled")), "trigger_type"),
            (with("trigger_type", json!("cron")), "trigger_type"),
            (with("execution_mode", json!("wan")), "execution_mode"),
            (with("required_capabilities", json!(["gpu", "GPU"])), "required_capabilities[1]"),
            (with("required_capabilities", json!("gpu")), "required_capabilities"),
            (with("target_robot_id", json!("R 1")), "target_robot_id"),
            (with("metadata", json!({"robot_id": "a.b"})), "metadata.robot_id"),
            (with("metadata", json!({"variables": [1]})), "metadata.variables"),
            (with("variables", json!([1])), "variables"),
            (with("timeout_s", json!(0)), "timeout_s"),
            (with("timeout_s", json!(-5)), "timeout_s"),
        ];
        for (b, field) in cases {
            let e = body(b.clone()).unwrap_err();
            assert_eq!((e.status.as_u16(), e.field.as_deref()), (422, Some(field)), "{b}: {e}");
        }
        let e = with("trigger_type", json!("scheduled"));
        assert!(body(e).unwrap_err().message.contains("not supported yet"));
    }

    #[test]
    fn messages() {
        let s = |status, reason: Option<&str>| Submitted {
            job_id: fleet_schemas::JobId::new(),
            workflow_id: "w".into(),
            status,
            waiting_reason: reason.map(str::to_owned),
            created_at: OffsetDateTime::UNIX_EPOCH,
        };
        assert_eq!(respond(s(JobStatus::Queued, None)).message, "Job queued");
        assert_eq!(
            respond(s(JobStatus::Pending, Some("no online robot"))).message,
            "Job pending: no online robot"
        );
        assert_eq!(respond(s(JobStatus::Pending, None)).message, "Job pending");
    }
}
