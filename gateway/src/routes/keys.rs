//! API keys of the caller's tenant (admin role): `POST/GET /api/v1/api-keys`,
//! `DELETE /api/v1/api-keys/{key_id}`, `POST /api/v1/api-keys/{key_id}/revoke|rotate`, and the
//! Canvas's robot keys under `/api/v1/robot-api-keys` (the same keys, each tied to a robot).
//!
//! A new or rotated key is answered once as `api_key`; Fleet keeps only its hash.

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State, rejection::PathRejection};
use axum::http::Uri;
use fleet_schemas::api::{CreateKey, CreatedKey, Endpoint, KeyAction, KeyList, KeyView, ListKeys};
use fleet_schemas::keys::{self, Rate, Role};
use fleet_schemas::{Capability, RequestId, RobotId};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{QueryParams, call};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{CallKind, HttpError};
use crate::extract::{JsonBody, optional_json};

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
    /// The only robot the key may act as; without it, the robot it first enrols.
    #[serde(default)]
    #[schema(value_type = Option<crate::openapi::RobotId>)]
    robot_id: Option<String>,
    /// The capabilities its robot may claim (`shell` and the runner formats too): the robot gets
    /// what it offers of these. Without it, the key does not restrict what the robot offers.
    #[serde(default)]
    #[schema(value_type = Option<Vec<crate::openapi::Capability>>)]
    capabilities: Option<Vec<String>>,
    /// Not blank; at most 200 characters once trimmed.
    #[schema(pattern = r"\S")]
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

/// A key id from the path: one that is not even shaped like one (32 lowercase hex digits) is 404,
/// like any id that does not exist, and never reaches the database (a NUL character in it used
/// to come back from PostgreSQL as a 500).
fn known_shape(key_id: String) -> Result<String, HttpError> {
    if keys::is_key_id(&key_id) { Ok(key_id) } else { Err(HttpError::not_found("key")) }
}

fn role(field: &str, text: Option<&str>) -> Result<Role, HttpError> {
    match text {
        None => Ok(Role::Operator),
        Some("robot") => {
            Err(HttpError::invalid(field, "robot keys are made with POST /api/v1/robot-api-keys"))
        }
        Some(r) => {
            Role::parse(r).ok_or_else(|| HttpError::invalid(field, "must be admin, operator or viewer"))
        }
    }
}

#[utoipa::path(post, path = "/api/v1/api-keys", tag = "keys", request_body = NewKey,
    responses(
        (status = 200, description = "The new key, shown once as `api_key`", body = crate::openapi::CreatedKey),
        (status = 403, description = "The key's role is not admin", body = crate::openapi::ErrorBody),
        (status = 422, description = "A field is wrong (`role`, `rate_limit`, …) or unknown; `error.field` names it", body = crate::openapi::ErrorBody),
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
        capabilities: None,
    };
    call(&state, Endpoint::CreateKey, request_id, &caller, req, CallKind::Submit).await.map(Json)
}

#[utoipa::path(post, path = "/api/v1/robot-api-keys", tag = "keys", request_body = NewRobotKey,
    responses(
        (status = 200, description = "The new robot key, shown once as `api_key`", body = crate::openapi::CreatedKey),
        (status = 403, description = "The key's role is not admin", body = crate::openapi::ErrorBody),
        (status = 422, description = "A field is wrong; `error.field` names it", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn create_robot_key(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    JsonBody(body): JsonBody<NewRobotKey>,
) -> Result<Json<CreatedKey>, HttpError> {
    caller.require(Role::Admin)?;
    let robot = body
        .robot_id
        .map(|r| RobotId::new(r).map_err(|e| HttpError::invalid("robot_id", e.to_string())))
        .transpose()?;
    let capabilities = body
        .capabilities
        .map(|caps| {
            caps.iter()
                .enumerate()
                .map(|(i, c)| {
                    Capability::new(c.trim())
                        .map_err(|e| HttpError::invalid(format!("capabilities[{i}]"), e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let req = CreateKey {
        name: body.name,
        role: Role::Robot,
        description: body.description,
        expires_at: parse_time("expires_at", body.expires_at.as_deref())?,
        robot_id: robot,
        rate_limit: None,
        capabilities,
    };
    call(&state, Endpoint::CreateKey, request_id, &caller, req, CallKind::Submit).await.map(Json)
}

/// The query of both key lists, as the document describes it (it is read with `QueryParams`).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // a description, never built
struct KeyListQuery {
    /// 0 to 1000, default 100 (0 counts as 1).
    #[param(minimum = 0, maximum = 1000)]
    limit: Option<u32>,
    /// Keys to skip, default 0.
    #[param(minimum = 0, maximum = 4_294_967_295_i64)]
    offset: Option<i64>,
    /// Only this robot's keys.
    robot_id: Option<String>,
    status: Option<crate::openapi::KeyStatus>,
}

async fn list_keys(
    caller: &Caller,
    state: &AppState,
    request_id: RequestId,
    uri: &Uri,
    robot_keys: bool,
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
        robot_keys,
    };
    call(state, Endpoint::ListKeys, request_id, caller, body, CallKind::Retryable).await
}

#[utoipa::path(get, path = "/api/v1/api-keys", tag = "keys",
    params(KeyListQuery),
    responses(
        (status = 200, description = "The tenant's keys, never their secrets", body = crate::openapi::KeyList),
        (status = 403, description = "The key's role is not admin", body = crate::openapi::ErrorBody),
        (status = 422, description = "A filter is wrong", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn list(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    uri: Uri,
) -> Result<Json<KeyList>, HttpError> {
    list_keys(&caller, &state, request_id, &uri, false).await.map(Json)
}

#[utoipa::path(get, path = "/api/v1/robot-api-keys", tag = "keys",
    params(KeyListQuery),
    responses(
        (status = 200, description = "The tenant's robot keys", body = crate::openapi::KeyList),
        (status = 403, description = "The key's role is not admin", body = crate::openapi::ErrorBody),
        (status = 422, description = "A filter is wrong", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn list_robot_keys(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    uri: Uri,
) -> Result<Json<KeyList>, HttpError> {
    list_keys(&caller, &state, request_id, &uri, true).await.map(Json)
}

/// Optional body of `POST …/{key_id}/revoke`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeBody {
    /// Why, for the record.
    #[serde(default)]
    reason: Option<String>,
}

/// What can be done to a key, the `{action}` of its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum KeyVerb {
    /// It stops working (within 5 s); it stays listed as `revoked`.
    Revoke,
    /// A new secret, answered once as `api_key`; the old one stops working.
    Rotate,
}

/// The path of `POST …/{key_id}/{action}`, for both key routes (a description, never built).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct KeyActionPath {
    #[param(pattern = "^[0-9a-f]{32}$")]
    key_id: String,
    action: KeyVerb,
}

/// The answers of `POST …/{key_id}/{action}`, for both key routes (a description, never built).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code, clippy::large_enum_variant)] // never built: variant sizes do not matter
enum KeyActionResponses {
    /// revoke: `{revoked, key_id, key}`; rotate: the new `api_key` and the key
    #[response(status = 200)]
    Done(KeyActionAnswer),
    /// The key's role is not admin
    #[response(status = 403)]
    Forbidden(crate::openapi::ErrorBody),
    /// No such key in the caller's tenant, or no such action
    #[response(status = 404)]
    NotFound(crate::openapi::ErrorBody),
    /// Bad body (or an unknown field)
    #[response(status = 422)]
    Invalid(crate::openapi::ErrorBody),
}

/// `POST …/{key_id}/revoke` (optional `{"reason"}`) and `…/{key_id}/rotate`.
#[utoipa::path(post, path = "/api/v1/api-keys/{key_id}/{action}", tag = "keys",
    params(KeyActionPath),
    request_body(content = Option<RevokeBody>, description = "Optional; only `revoke` records the `reason`, but either action refuses a body that is not this shape"),
    responses(KeyActionResponses),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn key_action(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Bytes,
) -> Result<Json<KeyActionAnswer>, HttpError> {
    caller.require(Role::Admin)?;
    let Ok(Path((key_id, verb))) = path else { return Err(HttpError::not_found("key")) };
    let verb = super::path_enum::<KeyVerb>(&verb).ok_or_else(|| HttpError::not_found("endpoint"))?;
    let key_id = known_shape(key_id)?;
    // Optional for both; checked for both, so a body is never dropped unread.
    let body: RevokeBody = optional_json(&body)?;
    match verb {
        KeyVerb::Revoke => {
            let req = KeyAction { id: key_id.clone(), reason: body.reason };
            let key: KeyView =
                call(&state, Endpoint::RevokeKey, request_id, &caller, req, CallKind::Retryable).await?;
            Ok(Json(KeyActionAnswer::Revoked(KeyRevoked { revoked: true, key_id, key })))
        }
        KeyVerb::Rotate => {
            let req = KeyAction { id: key_id, reason: None };
            let created: CreatedKey =
                call(&state, Endpoint::RotateKey, request_id, &caller, req, CallKind::Submit).await?;
            Ok(Json(KeyActionAnswer::Rotated(created)))
        }
    }
}

/// Answer of `POST …/{key_id}/revoke`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyRevoked {
    pub revoked: bool,
    pub key_id: String,
    pub key: KeyView,
}

/// Answer of `POST …/{key_id}/{action}`: revoked, or rotated (a new `api_key`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum KeyActionAnswer {
    Revoked(KeyRevoked),
    Rotated(CreatedKey),
}

/// Answer of `DELETE /api/v1/api-keys/{key_id}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyDeleted {
    pub deleted: bool,
    pub key_id: String,
}

#[utoipa::path(delete, path = "/api/v1/api-keys/{key_id}", tag = "keys",
    params(("key_id" = String, Path, pattern = "^[0-9a-f]{32}$")),
    responses(
        (status = 200, description = "`{deleted, key_id}`", body = crate::openapi::KeyDeleted),
        (status = 403, description = "The key's role is not admin", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such key in the caller's tenant", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn delete(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<KeyDeleted>, HttpError> {
    caller.require(Role::Admin)?;
    let key_id = super::path_id(path, "key", |s| Some(s.to_owned())).and_then(known_shape)?;
    let req = KeyAction { id: key_id.clone(), reason: None };
    let _: KeyView = call(&state, Endpoint::DeleteKey, request_id, &caller, req, CallKind::Retryable).await?;
    Ok(Json(KeyDeleted { deleted: true, key_id }))
}

/// `POST /api/v1/robot-api-keys/{key_id}/revoke|rotate`: the same as for any key.
#[utoipa::path(post, path = "/api/v1/robot-api-keys/{key_id}/{action}", tag = "keys",
    params(KeyActionPath),
    request_body(content = Option<RevokeBody>, description = "Optional; only `revoke` records the `reason`, but either action refuses a body that is not this shape"),
    responses(KeyActionResponses),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn robot_key_action(
    caller: Caller,
    state: State<AppState>,
    request_id: Extension<RequestId>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Bytes,
) -> Result<Json<KeyActionAnswer>, HttpError> {
    key_action(caller, state, request_id, path, body).await
}
