//! Secrets of the caller's tenant: `PUT /api/v1/secrets/{name}` (`{"value"}`), `GET
//! /api/v1/secrets` (names and times) and `DELETE /api/v1/secrets/{name}`; operator role or
//! above.
//!
//! Write-only by design: no route answers a value, so a leaked operator key can replace or
//! delete a secret but never read one. Jobs get them by naming them (`{{ secrets.NAME }}`); see
//! the orchestrator's `secrets` module.

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State, rejection::PathRejection};
use fleet_schemas::RequestId;
use fleet_schemas::api::{Empty, Endpoint};
use fleet_schemas::keys::Role;
use fleet_schemas::secrets::{self, PutSecret, SecretList, SecretName, SecretView};
use serde::{Deserialize, Serialize};

use super::call;
use crate::AppState;
use crate::auth::Caller;
use crate::error::{CallKind, HttpError};
use crate::extract::JsonBody;

/// Body of `PUT /api/v1/secrets/{name}`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretBody {
    /// The value, at most 16 KiB; stored encrypted and never answered back.
    #[schema(max_length = 16384)]
    value: String,
}

/// Answer of `DELETE /api/v1/secrets/{name}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SecretDeleted {
    pub deleted: bool,
    pub name: String,
}

/// Operator or above, and not a robot key: a robot gets the secrets of its jobs in their claim
/// replies and has no business writing or listing the tenant's.
fn require_person(caller: &Caller) -> Result<(), HttpError> {
    caller.require(Role::Operator)?;
    if caller.robot_id.is_some() {
        return Err(HttpError::new(
            axum::http::StatusCode::FORBIDDEN,
            "forbidden",
            "a robot key may not manage secrets; use a user key with the operator role",
        ));
    }
    Ok(())
}

fn name_path(path: Result<Path<String>, PathRejection>) -> Result<String, HttpError> {
    let Ok(Path(name)) = path else { return Err(HttpError::not_found("secret")) };
    if secrets::valid_name(&name) { Ok(name) } else { Err(HttpError::invalid("name", secrets::NAME_RULE)) }
}

#[utoipa::path(put, path = "/api/v1/secrets/{name}", tag = "secrets", request_body = SecretBody,
    params(("name" = String, Path, pattern = "^[A-Z0-9_]{1,64}$")),
    responses(
        (status = 200, description = "Stored (created or replaced): its name and times, never the value", body = crate::openapi::SecretView),
        (status = 403, description = "The key's role is below operator, or it is a robot key", body = crate::openapi::ErrorBody),
        (status = 422, description = "`name` or `value` is wrong; `error.field` names it", body = crate::openapi::ErrorBody),
        (status = 503, description = "Secrets are not configured (`secrets_key_file`), or the orchestrator is unreachable", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn put(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<SecretBody>,
) -> Result<Json<SecretView>, HttpError> {
    require_person(&caller)?;
    let name = name_path(path)?;
    if body.value.len() > secrets::MAX_VALUE {
        return Err(HttpError::invalid("value", format!("must be at most {} bytes", secrets::MAX_VALUE)));
    }
    let req = PutSecret { name, value: body.value };
    // Writing the same value again is harmless, so a lost answer may be retried.
    call(&state, Endpoint::PutSecret, request_id, &caller, req, CallKind::Retryable).await.map(Json)
}

#[utoipa::path(get, path = "/api/v1/secrets", tag = "secrets",
    responses(
        (status = 200, description = "The tenant's secrets by name, never their values", body = crate::openapi::SecretList),
        (status = 403, description = "The key's role is below operator, or it is a robot key", body = crate::openapi::ErrorBody),
        (status = 503, description = "Secrets are not configured (`secrets_key_file`)", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
) -> Result<Json<SecretList>, HttpError> {
    require_person(&caller)?;
    call(&state, Endpoint::ListSecrets, request_id, &caller, Empty {}, CallKind::Retryable).await.map(Json)
}

#[utoipa::path(delete, path = "/api/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, pattern = "^[A-Z0-9_]{1,64}$")),
    responses(
        (status = 200, description = "`{deleted, name}`", body = crate::openapi::SecretDeleted),
        (status = 403, description = "The key's role is below operator, or it is a robot key", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such secret in the caller's tenant", body = crate::openapi::ErrorBody),
        (status = 503, description = "Secrets are not configured (`secrets_key_file`)", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn delete(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<SecretDeleted>, HttpError> {
    require_person(&caller)?;
    let Ok(name) = name_path(path) else { return Err(HttpError::not_found("secret")) };
    let _: SecretView = call(
        &state,
        Endpoint::DeleteSecret,
        request_id,
        &caller,
        SecretName { name: name.clone() },
        CallKind::Retryable,
    )
    .await?;
    Ok(Json(SecretDeleted { deleted: true, name }))
}
