//! The robot registry (admin role): `POST /api/v1/robots/register` (upsert),
//! `PUT /api/v1/robots/{robot_id}` (partial update) and `DELETE /api/v1/robots/{robot_id}`.
//!
//! Register and update answer the robot object exactly as `GET /api/v1/metrics/robots/{id}`
//! does (they read it back through that handler), since the Canvas shows what it gets. Delete
//! tells a running robot to stop before forgetting it and answers `{"deleted": true,
//! "robot_id"}`. Ids and capabilities are checked here, by the rules the subjects use, so bad
//! input is a 422 naming the field before anything is sent.

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State, rejection::PathRejection};
use fleet_schemas::api::{Endpoint, GetById, RegisterRobot, RobotDeleted, RobotSaved, UpdateRobot};
use fleet_schemas::keys::Role;
use fleet_schemas::{Capability, RequestId, RobotId};
use serde::Deserialize;

use super::call;
use super::robots::RobotDetail;
use crate::AppState;
use crate::auth::Caller;
use crate::error::{CallKind, HttpError};
use crate::extract::JsonBody;

/// Slots a robot registered without `max_concurrent_jobs` gets (what a robot binary defaults to).
pub const DEFAULT_SLOTS: u32 = 1;

/// Body of `POST /api/v1/robots/register`. Texts are trimmed; the orchestrator caps `name` at
/// 200 characters, `hostname` at 255, `environment` at 64, and tags at 32 of 64 characters each.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    /// `[a-z0-9-]{1,64}` (surrounding blanks are trimmed)
    #[schema(pattern = r"^\s*[a-z0-9-]{1,64}\s*$")]
    robot_id: String,
    #[schema(pattern = r"\S")]
    name: String,
    #[schema(pattern = r"\S")]
    hostname: String,
    /// Capability names, `[a-z0-9_-]{1,32}` each.
    #[serde(default)]
    #[schema(value_type = Vec<crate::openapi::TrimmedCapability>)]
    capabilities: Vec<String>,
    #[serde(default)]
    environment: Option<String>,
    /// 1 to 1000, default 1.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000)]
    max_concurrent_jobs: Option<u32>,
    #[serde(default)]
    #[schema(max_items = 32, value_type = Vec<crate::openapi::Tag>)]
    tags: Vec<String>,
}

/// Body of `PUT /api/v1/robots/{robot_id}`: only the fields given change (the same rules as for
/// registering).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    #[serde(default)]
    #[schema(pattern = r"\S")]
    name: Option<String>,
    #[serde(default)]
    #[schema(pattern = r"\S")]
    hostname: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<Vec<crate::openapi::TrimmedCapability>>)]
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    environment: Option<String>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000)]
    max_concurrent_jobs: Option<u32>,
    #[serde(default)]
    #[schema(max_items = 32, value_type = Option<Vec<crate::openapi::Tag>>)]
    tags: Option<Vec<String>>,
}

fn check_capabilities(caps: &[String]) -> Result<(), HttpError> {
    for (i, cap) in caps.iter().enumerate() {
        Capability::new(cap.trim())
            .map_err(|e| HttpError::invalid(format!("capabilities[{i}]"), e.to_string()))?;
    }
    Ok(())
}

fn check_text(field: &str, value: &str) -> Result<(), HttpError> {
    if value.trim().is_empty() { Err(HttpError::invalid(field, "must not be empty")) } else { Ok(()) }
}

/// The robot as `GET /api/v1/metrics/robots/{robot_id}` answers it.
async fn robot_object(
    caller: Caller,
    state: AppState,
    request_id: RequestId,
    robot_id: &RobotId,
) -> Result<Json<RobotDetail>, HttpError> {
    super::robots::get(caller, State(state), Extension(request_id), Ok(Path(robot_id.to_string()))).await
}

#[utoipa::path(
    post,
    path = "/api/v1/robots/register",
    tag = "robots",
    request_body = RegisterBody,
    responses(
        (status = 200, description = "The robot (created or updated)", body = crate::openapi::RobotDetail),
        (status = 403, description = "The key's role is not admin", body = crate::openapi::ErrorBody),
        (status = 422, description = "A field is wrong; `error.field` names it", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn register(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    JsonBody(body): JsonBody<RegisterBody>,
) -> Result<Json<RobotDetail>, HttpError> {
    let robot_id =
        RobotId::new(body.robot_id.trim()).map_err(|_| HttpError::invalid("robot_id", RobotId::RULE))?;
    // An admin registers any robot; a robot key only its own, which it is then bound to.
    let key_id = if caller.role == Role::Robot {
        let own = super::agent::robot_of(&caller)?;
        if own != robot_id {
            return Err(HttpError::new(
                axum::http::StatusCode::FORBIDDEN,
                "forbidden",
                format!("this robot key is bound to robot {own}, not {robot_id}"),
            ));
        }
        caller.key_id.clone()
    } else {
        caller.require(Role::Admin)?;
        None
    };
    check_text("name", &body.name)?;
    check_text("hostname", &body.hostname)?;
    check_capabilities(&body.capabilities)?;
    let req = RegisterRobot {
        robot_id: robot_id.clone(),
        name: body.name,
        hostname: body.hostname,
        capabilities: body.capabilities,
        environment: body.environment.unwrap_or_default(),
        max_concurrent_jobs: body.max_concurrent_jobs.unwrap_or(DEFAULT_SLOTS),
        tags: body.tags,
        key_id,
    };
    // An upsert of a description: repeating it is harmless, so a lost answer is retryable.
    let _: RobotSaved =
        call(&state, Endpoint::RegisterRobot, request_id, &caller, req, CallKind::Retryable).await?;
    robot_object(caller, state, request_id, &robot_id).await
}

#[utoipa::path(
    put,
    path = "/api/v1/robots/{robot_id}",
    tag = "robots",
    params(("robot_id" = String, Path, pattern = "^[a-z0-9-]{1,64}$", description = "Robot id")),
    request_body = UpdateBody,
    responses(
        (status = 200, description = "The robot after the change", body = crate::openapi::RobotDetail),
        (status = 403, description = "The key's role is not admin", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such robot in the caller's tenant", body = crate::openapi::ErrorBody),
        (status = 422, description = "A field is wrong; `error.field` names it", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn update(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<UpdateBody>,
) -> Result<Json<RobotDetail>, HttpError> {
    caller.require(Role::Admin)?;
    let robot_id = super::robot_path(path)?;
    if let Some(name) = &body.name {
        check_text("name", name)?;
    }
    if let Some(hostname) = &body.hostname {
        check_text("hostname", hostname)?;
    }
    if let Some(caps) = &body.capabilities {
        check_capabilities(caps)?;
    }
    let req = UpdateRobot {
        robot_id: robot_id.clone(),
        name: body.name,
        hostname: body.hostname,
        capabilities: body.capabilities,
        environment: body.environment,
        max_concurrent_jobs: body.max_concurrent_jobs,
        tags: body.tags,
    };
    let _: RobotSaved =
        call(&state, Endpoint::UpdateRobot, request_id, &caller, req, CallKind::Retryable).await?;
    robot_object(caller, state, request_id, &robot_id).await
}

#[utoipa::path(
    delete,
    path = "/api/v1/robots/{robot_id}",
    tag = "robots",
    params(("robot_id" = String, Path, pattern = "^[a-z0-9-]{1,64}$", description = "Robot id")),
    responses(
        (status = 200, description = "`{\"deleted\": true, \"robot_id\"}`: told to stop and forgotten", body = crate::openapi::RobotDeletedAnswer),
        (status = 403, description = "The key's role is not admin", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such robot in the caller's tenant", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn delete(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<RobotDeleted>, HttpError> {
    caller.require(Role::Admin)?;
    let id = super::robot_path(path)?;
    // A repeated delete finds nothing and answers 404, which the Canvas takes as success.
    let deleted: RobotDeleted =
        call(&state, Endpoint::DeleteRobot, request_id, &caller, GetById { id }, CallKind::Retryable).await?;
    Ok(Json(deleted))
}
