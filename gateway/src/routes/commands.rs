//! Robot commands: `POST /api/v1/robots/{robot_id}/{start|stop|pause|resume|restart}`,
//! `PUT /api/v1/robots/{robot_id}/status` and `POST /api/v1/robots/commands` (bulk).
//!
//! A command changes the robot's desired state in the orchestrator, which the robot obeys (also
//! when it comes back after being disconnected). The Canvas posts the per-robot commands with
//! no body and tests the answer for truth, so every answer is a non-empty object; `stop` takes
//! an optional `{"force": true}`.

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State, rejection::PathRejection};
use fleet_schemas::api::{
    CommandResult, CommandTarget, Endpoint, RobotCommand, RobotCommandRequest, RobotStatus, RobotView,
};
use fleet_schemas::{RequestId, RobotId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::call;
use crate::AppState;
use crate::auth::Caller;
use crate::error::{CallKind, HttpError};
use crate::extract::{JsonBody, optional_json};

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StopBody {
    /// Hand back running jobs and stop now, instead of finishing them first.
    #[serde(default)]
    force: bool,
}

/// The per-robot commands, the `{action}` of `POST /api/v1/robots/{robot_id}/{action}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RobotAction {
    /// Take work again (the same as `resume`).
    Start,
    /// Finish running jobs (or, with `{"force": true}`, hand them back) and exit.
    Stop,
    /// Finish running jobs, take no new ones.
    Pause,
    Resume,
    /// Drain and restart.
    Restart,
}

/// `POST /api/v1/robots/{robot_id}/{action}`.
#[utoipa::path(
    post,
    path = "/api/v1/robots/{robot_id}/{action}",
    tag = "robots",
    params(
        ("robot_id" = String, Path, pattern = "^[a-z0-9-]{1,64}$", description = "Robot id"),
        ("action" = RobotAction, Path),
    ),
    request_body(content = Option<StopBody>, description = "Optional; only `stop` acts on it (`{\"force\": true}`), but any action refuses a body that is not this shape"),
    responses(
        (status = 200, description = "The robot was told", body = crate::openapi::CommandAnswer),
        (status = 403, description = "The key's role is below operator", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such robot or action", body = crate::openapi::ErrorBody),
        (status = 422, description = "Bad body", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn robot_action(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Bytes,
) -> Result<Json<CommandAnswer>, HttpError> {
    caller.require(fleet_schemas::keys::Role::Operator)?;
    let Ok(Path((robot_id, action))) = path else { return Err(HttpError::not_found("robot")) };
    let robot_id = RobotId::new(robot_id).map_err(|_| HttpError::not_found("robot"))?;
    let verb = super::path_enum::<RobotAction>(&action).ok_or_else(|| HttpError::not_found("endpoint"))?;
    // The body is optional for every action; when present it must be `{"force": bool}`, which
    // only `stop` acts on (a body the action would ignore is still checked, not dropped unread).
    let options: StopBody = optional_json(&body)?;
    let command = match verb {
        RobotAction::Start | RobotAction::Resume => RobotCommand::Resume,
        RobotAction::Pause => RobotCommand::Pause,
        RobotAction::Restart => RobotCommand::Restart,
        RobotAction::Stop => RobotCommand::Stop { force: options.force },
    };
    let result =
        send(&state, request_id, &caller, CommandTarget::Robot { robot_id: robot_id.clone() }, command)
            .await?;
    Ok(Json(CommandAnswer {
        robot_id,
        action,
        accepted: !result.robots.is_empty(),
        message: message(command, result.robots.len()),
    }))
}

/// Answer of the per-robot commands (`start`, `stop`, `pause`, `resume`, `restart`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CommandAnswer {
    #[schema(value_type = String)]
    pub robot_id: RobotId,
    pub action: String,
    pub accepted: bool,
    pub message: String,
}

/// Answer of the bulk command.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BulkAnswer {
    pub command: String,
    /// How many robots were told.
    pub count: usize,
    pub robots: Vec<String>,
    pub message: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusBody {
    #[schema(value_type = crate::openapi::SettableStatus)]
    status: String,
}

/// `PUT /api/v1/robots/{robot_id}/status` with `{"status": …}`; answers the robot object.
/// `maintenance`, `online`/`idle` and `paused` are commands; `busy` and `error` are accepted and
/// change nothing (Fleet derives them); `offline` from the robot's own key takes it offline now,
/// from another key tells it to stop.
#[utoipa::path(
    put,
    path = "/api/v1/robots/{robot_id}/status",
    tag = "robots",
    params(("robot_id" = String, Path, pattern = "^[a-z0-9-]{1,64}$", description = "Robot id")),
    request_body = StatusBody,
    responses(
        (status = 200, description = "The robot after the change", body = crate::openapi::RobotView),
        (status = 403, description = "The key's role is below operator", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such robot in the caller's tenant", body = crate::openapi::ErrorBody),
        (status = 422, description = "Bad status (or an unknown field)", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn set_status(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<StatusBody>,
) -> Result<Json<Value>, HttpError> {
    // A robot key reports its own robot's status (the seed's agent does); the rest is an
    // operator's.
    if caller.role != fleet_schemas::keys::Role::Robot {
        caller.require(fleet_schemas::keys::Role::Operator)?;
    }
    let robot_id = super::robot_path(path)?;
    // A robot key acts on its own robot only (another id is one that does not exist to it).
    if caller.robot_id.as_ref().is_some_and(|own| *own != robot_id) {
        return Err(HttpError::not_found("robot"));
    }
    let command = match body.status.as_str() {
        "maintenance" => Some(RobotCommand::Maintenance { on: true }),
        "online" | "idle" => Some(RobotCommand::Maintenance { on: false }),
        "paused" => Some(RobotCommand::Pause),
        // What an HTTP robot reports of itself: Fleet derives busy from the jobs it hands out,
        // and a robot in trouble fails its jobs or stops heartbeating, so neither changes anything.
        "busy" | "error" => None,
        // The robot's goodbye: offline now, as if its heartbeat had lapsed.
        "offline" if caller.robot_id.is_some() => {
            super::agent::beat(&state, request_id, &caller, robot_id.clone(), &Value::Null, true).await?;
            None
        }
        // From an operator: take it offline the way a robot goes, finishing its running jobs.
        "offline" => Some(RobotCommand::Stop { force: false }),
        _ => {
            return Err(HttpError::invalid(
                "status",
                "must be one of idle, online, busy, offline, error, maintenance, paused",
            ));
        }
    };
    if let Some(command) = command {
        send(&state, request_id, &caller, CommandTarget::Robot { robot_id: robot_id.clone() }, command)
            .await?;
    }
    let robot: RobotView = super::get_robot(&state, request_id, &caller, robot_id).await?;
    Ok(Json(serde_json::to_value(robot).map_err(|e| HttpError::internal(e.to_string()))?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkBody {
    #[schema(value_type = crate::openapi::BulkCommand)]
    command: String,
    /// For `stop`: hand back running jobs and stop now.
    #[serde(default)]
    force: bool,
    /// Only robots with this status (idle = online).
    #[serde(default)]
    #[schema(value_type = Option<crate::openapi::RobotStatusFilter>)]
    status: Option<String>,
    /// Only robots with all these capabilities.
    #[serde(default)]
    #[schema(value_type = Vec<crate::openapi::Capability>)]
    capabilities: Vec<String>,
}

/// `POST /api/v1/robots/commands`: one command for every robot of the tenant matching the filter.
#[utoipa::path(
    post,
    path = "/api/v1/robots/commands",
    tag = "robots",
    request_body = BulkBody,
    responses(
        (status = 200, description = "How many robots were told", body = crate::openapi::BulkAnswer),
        (status = 403, description = "The key's role is below operator", body = crate::openapi::ErrorBody),
        (status = 422, description = "Bad command or filter (or an unknown field)", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn bulk(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    JsonBody(body): JsonBody<BulkBody>,
) -> Result<Json<BulkAnswer>, HttpError> {
    caller.require(fleet_schemas::keys::Role::Operator)?;
    let command = match body.command.as_str() {
        "pause" => RobotCommand::Pause,
        "resume" | "start" => RobotCommand::Resume,
        "maintenance" => RobotCommand::Maintenance { on: true },
        "online" => RobotCommand::Maintenance { on: false },
        "drain" => RobotCommand::Drain,
        "stop" => RobotCommand::Stop { force: body.force },
        "restart" => RobotCommand::Restart,
        _ => {
            return Err(HttpError::invalid(
                "command",
                "must be one of pause, resume, maintenance, online, drain, stop, restart",
            ));
        }
    };
    let status = body
        .status
        .as_deref()
        .map(|s| {
            RobotStatus::parse(s).ok_or_else(|| {
                HttpError::invalid("status", "must be one of idle, online, busy, offline, maintenance, error")
            })
        })
        .transpose()?;
    for (i, cap) in body.capabilities.iter().enumerate() {
        fleet_schemas::Capability::new(cap.as_str())
            .map_err(|e| HttpError::invalid(format!("capabilities[{i}]"), e.to_string()))?;
    }
    let target = CommandTarget::Filter { status, capabilities: body.capabilities };
    let result = send(&state, request_id, &caller, target, command).await?;
    Ok(Json(BulkAnswer {
        command: body.command,
        count: result.robots.len(),
        message: message(command, result.robots.len()),
        robots: result.robots,
    }))
}

async fn send(
    state: &AppState,
    request_id: RequestId,
    caller: &Caller,
    target: CommandTarget,
    command: RobotCommand,
) -> Result<CommandResult, HttpError> {
    // Commands set a desired state: repeating one is harmless, so a lost answer is retryable.
    let req = RobotCommandRequest { target, command };
    call(state, Endpoint::RobotCommand, request_id, caller, req, CallKind::Retryable).await
}

fn message(command: RobotCommand, n: usize) -> String {
    let what = match command {
        RobotCommand::Pause => "pause (finish running jobs, take no new ones)",
        RobotCommand::Resume => "resume taking work",
        RobotCommand::Maintenance { on: true } => "enter maintenance",
        RobotCommand::Maintenance { on: false } => "leave maintenance",
        RobotCommand::Drain => "drain and exit",
        RobotCommand::Stop { force: false } => "finish running jobs and stop",
        RobotCommand::Stop { force: true } => "hand back running jobs and stop now",
        RobotCommand::Restart => "drain and restart",
    };
    format!("{n} robot{} told to {what}", if n == 1 { "" } else { "s" })
}
