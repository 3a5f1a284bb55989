//! API keys of the caller's tenant (admin role): `POST/GET /api/v1/api-keys`,
//! `DELETE /api/v1/api-keys/{key_id}`, `POST /api/v1/api-keys/{key_id}/revoke|rotate`, and the
//! Canvas's robot keys under `/api/v1/robot-api-keys` (the same keys, each tied to a robot).
//!
//! A new or rotated key is answered once as `api_key`; Fleet keeps only its hash.

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::Uri;
use fleet_schemas::api::{CreateKey, CreatedKey, Endpoint, KeyAction, KeyList, KeyView, ListKeys};
use fleet_schemas::keys::{Rate, Role};
use fleet_schemas::{RequestId, RobotId};
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::{QueryParams, call};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{CallKind, HttpError};
use crate::extract::{JsonBody, parse_json};

/// Body of `POST /api/v1/api-keys`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// A name to recognise the key by.
    name: String,
    /// `admin`, `operator` (default) or `viewer`.
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    description: Option<String>,
    /// When the key stops working (ISO 8601; a time without offset is UTC).
    #[serde(default)]
    expires_at: Option<String>,
    /// The key's own rate limit at the gateway: `<requests>/<s|min|h>`, e.g. `1000/min`, all of
    /// which may come at once. Absent or `null`: the gateway's default (`--rate-limit`, 100/min
    /// unless configured). A key's own limit applies even when the default is off.
    #[serde(default)]
    #[schema(example = "1000/min")]
    rate_limit: Option<String>,
}

/// Body of `POST /api/v1/robot-api-keys` (the Canvas's robot keys).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct NewRobotKey {
    robot_id: String,
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    expires_at: Option<String>,
}

fn parse_time(field: &str, text: Option<&str>) -> Result<Option<OffsetDateTime>, HttpError> {
    let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) else { return Ok(None) };
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(Some(t));
    }
    // The Canvas sends naive ISO times: take them as UTC.
    let naive = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    let without_fraction = text.split('.').next().unwrap_or(text);
    time::PrimitiveDateTime::parse(without_fraction, &naive)
        .map(|t| Some(t.assume_utc()))
        .map_err(|_| HttpError::invalid(field, "must be an ISO 8601 date and time"))
}

fn rate_limit(field: &str, text: Option<&str>) -> Result<Option<Rate>, HttpError> {
    text.map(|t| Rate::parse(t).map_err(|e| HttpError::invalid(field, e))).transpose()
}

fn role(field: &str, text: Option<&str>) -> Result<Role, HttpError> {
    match text {
        None => Ok(Role::Operator),
        Some(r) => {
            Role::parse(r).ok_or_else(|| HttpError::invalid(field, "must be admin, operator or viewer"))
        }
    }
}

#[utoipa::path(post, path = "/api/v1/api-keys", tag = "keys", request_body = NewKey,
    responses(
        (status = 200, description = "The new key, shown once as `api_key`", body = crate::openapi::CreatedApiKey),
        (status = 403, description = "The key's role is not admin", body = crate::openapi::ErrorBody),
        (status = 422, description = "A field is wrong (`role`, `rate_limit`, …); `error.field` names it", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn create(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    JsonBody(body): JsonBody<NewKey>,
) -> Result<Json<CreatedKey>, HttpError> {
    caller.require(Role::Admin)?;
    let req = CreateKey {
        name: body.name,
        role: role("role", body.role.as_deref())?,
        description: body.description,
        expires_at: parse_time("expires_at", body.expires_at.as_deref())?,
        robot_id: None,
        rate_limit: rate_limit("rate_limit", body.rate_limit.as_deref())?,
    };
    call(&state, Endpoint::CreateKey, request_id, &caller, req, CallKind::Submit).await.map(Json)
}

#[utoipa::path(post, path = "/api/v1/robot-api-keys", tag = "keys", request_body = NewRobotKey,
    responses((status = 200, description = "The new robot key, shown once as `api_key`", body = crate::openapi::CreatedApiKey)),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn create_robot_key(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    JsonBody(body): JsonBody<NewRobotKey>,
) -> Result<Json<CreatedKey>, HttpError> {
    caller.require(Role::Admin)?;
    let robot = RobotId::new(body.robot_id).map_err(|e| HttpError::invalid("robot_id", e.to_string()))?;
    let req = CreateKey {
        name: body.name,
        role: Role::Operator,
        description: body.description,
        expires_at: parse_time("expires_at", body.expires_at.as_deref())?,
        robot_id: Some(robot),
        rate_limit: None,
    };
    call(&state, Endpoint::CreateKey, request_id, &caller, req, CallKind::Submit).await.map(Json)
}

async fn list_keys(
    caller: &Caller,
    state: &AppState,
    request_id: RequestId,
    uri: &Uri,
) -> Result<KeyList, HttpError> {
    caller.require(Role::Admin)?;
    let q = QueryParams::from_uri(uri)?;
    let number = |name: &str, default: u32, max: u32| -> Result<u32, HttpError> {
        match q.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse::<u32>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| HttpError::invalid(name, format!("must be a whole number up to {max}"))),
        }
    };
    let status = q.get("status").map(str::to_owned);
    if let Some(s) = &status
        && !["active", "revoked", "expired"].contains(&s.as_str())
    {
        return Err(HttpError::invalid("status", "must be active, revoked or expired"));
    }
    let body = ListKeys {
        robot_id: q.get("robot_id").map(str::to_owned),
        status,
        limit: number("limit", 100, 1000)?.max(1),
        offset: number("offset", 0, u32::MAX)?,
    };
    call(state, Endpoint::ListKeys, request_id, caller, body, CallKind::Retryable).await
}

#[utoipa::path(get, path = "/api/v1/api-keys", tag = "keys",
    responses((status = 200, description = "`{keys, total}`", body = crate::openapi::ApiKeyList)),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    uri: Uri,
) -> Result<Json<KeyList>, HttpError> {
    list_keys(&caller, &state, request_id, &uri).await.map(Json)
}

#[utoipa::path(get, path = "/api/v1/robot-api-keys", tag = "keys",
    responses((status = 200, description = "`{keys, total}` of robot keys", body = crate::openapi::ApiKeyList)),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn list_robot_keys(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    uri: Uri,
) -> Result<Json<KeyList>, HttpError> {
    let mut all = list_keys(&caller, &state, request_id, &uri).await?;
    all.keys.retain(|k| k.robot_id.is_some());
    all.total = all.keys.len() as u32;
    Ok(Json(all))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    #[serde(default)]
    reason: Option<String>,
}

/// `POST …/{key_id}/revoke` (optional `{"reason"}`) and `…/{key_id}/rotate`.
#[utoipa::path(post, path = "/api/v1/api-keys/{key_id}/{action}", tag = "keys",
    params(("key_id" = String, Path), ("action" = String, Path, description = "revoke or rotate")),
    responses((status = 200, description = "revoke: `{revoked, key_id}`; rotate: the new `api_key` and the key", body = Object)),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn key_action(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    Path((key_id, action)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, HttpError> {
    caller.require(Role::Admin)?;
    match action.as_str() {
        "revoke" => {
            let body: RevokeBody = if body.iter().all(u8::is_ascii_whitespace) {
                RevokeBody::default()
            } else {
                parse_json(&body)?
            };
            let req = KeyAction { id: key_id.clone(), reason: body.reason };
            let key: KeyView =
                call(&state, Endpoint::RevokeKey, request_id, &caller, req, CallKind::Retryable).await?;
            Ok(Json(json!({"revoked": true, "key_id": key_id, "key": key})))
        }
        "rotate" => {
            let req = KeyAction { id: key_id, reason: None };
            let created: CreatedKey =
                call(&state, Endpoint::RotateKey, request_id, &caller, req, CallKind::Submit).await?;
            Ok(Json(serde_json::to_value(created).map_err(|e| HttpError::internal(e.to_string()))?))
        }
        _ => Err(HttpError::not_found("endpoint")),
    }
}

#[utoipa::path(delete, path = "/api/v1/api-keys/{key_id}", tag = "keys",
    params(("key_id" = String, Path)),
    responses((status = 200, description = "`{deleted, key_id}`", body = Object)),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn delete(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    Path(key_id): Path<String>,
) -> Result<Json<Value>, HttpError> {
    caller.require(Role::Admin)?;
    let req = KeyAction { id: key_id.clone(), reason: None };
    let _: KeyView = call(&state, Endpoint::DeleteKey, request_id, &caller, req, CallKind::Retryable).await?;
    Ok(Json(json!({"deleted": true, "key_id": key_id})))
}

/// `POST /api/v1/robot-api-keys/{key_id}/revoke|rotate`: the same as for any key.
#[utoipa::path(post, path = "/api/v1/robot-api-keys/{key_id}/{action}", tag = "keys",
    params(("key_id" = String, Path), ("action" = String, Path, description = "revoke or rotate")),
    responses((status = 200, description = "revoke: `{revoked, key_id}`; rotate: the new `api_key` and the key", body = Object)),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn robot_key_action(
    caller: Caller,
    state: State<AppState>,
    request_id: Extension<RequestId>,
    path: Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, HttpError> {
    key_action(caller, state, request_id, path, body).await
}
