//! The routes, one module per area, and the pieces they share.
//!
//! Every handler follows the same shape: take the [`Caller`] first (so an unauthenticated
//! request is refused before its body is read), check the input at the edge, make one call to
//! the orchestrator through [`call`], and shape the answer for the Canvas. Adding an endpoint is
//! a handler and a line in [`router`].
//!
//! Ids in paths that are not even well-formed answer 404, exactly like ids that do not exist or
//! belong to another tenant, so a response never tells them apart.

pub mod agent;
pub mod analytics;
pub mod commands;
pub mod events;
pub mod fleet;
pub mod health;
pub mod jobs;
pub mod keys;
pub mod live;
pub mod logs;
pub mod meta;
pub mod registry;
pub mod robots;
pub mod secrets;
pub mod workflows;

use std::collections::HashMap;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::{Path, Query, rejection::PathRejection};
use axum::http::{StatusCode, Uri};
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post, put};
use fleet_schemas::api::Endpoint;
use fleet_schemas::api::{GetById, JobView, RobotView};
use fleet_schemas::{JobId, RequestId, RobotId};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::auth::Caller;
use crate::error::{CallKind, HttpError};

/// Every route the router serves, as (method, path template). Kept next to [`router`]: a test
/// checks that each is served and that the OpenAPI document lists exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/api/v1/openapi.json"),
    ("POST", "/api/v1/workflows"),
    ("GET", "/api/v1/metrics/jobs"),
    ("GET", "/api/v1/metrics/jobs/{job_id}"),
    ("POST", "/api/v1/jobs/{job_id}/cancel"),
    ("GET", "/api/v1/jobs/{job_id}/logs"),
    ("GET", "/api/v1/metrics/robots"),
    ("GET", "/api/v1/metrics/robots/{robot_id}"),
    ("POST", "/api/v1/robots/commands"),
    ("PUT", "/api/v1/robots/{robot_id}/status"),
    ("POST", "/api/v1/robots/{robot_id}/{action}"),
    ("GET", "/api/v1/robots/{robot_id}/logs"),
    ("GET", "/api/v1/robots/{robot_id}/metrics"),
    ("GET", "/api/v1/metrics/fleet"),
    ("GET", "/api/v1/queues"),
    ("GET", "/api/v1/events"),
    ("POST", "/api/v1/api-keys"),
    ("GET", "/api/v1/api-keys"),
    ("DELETE", "/api/v1/api-keys/{key_id}"),
    ("POST", "/api/v1/api-keys/{key_id}/{action}"),
    ("POST", "/api/v1/robot-api-keys"),
    ("GET", "/api/v1/robot-api-keys"),
    ("POST", "/api/v1/robot-api-keys/{key_id}/{action}"),
    ("GET", "/ws/monitoring/live-jobs"),
    ("POST", "/api/v1/jobs/{job_id}/retry"),
    ("POST", "/api/v1/robots/register"),
    ("PUT", "/api/v1/robots/{robot_id}"),
    ("DELETE", "/api/v1/robots/{robot_id}"),
    ("GET", "/api/v1/metrics/analytics"),
    ("GET", "/api/v1/metrics/activity"),
    ("POST", "/api/v1/robots/{robot_id}/heartbeat"),
    ("POST", "/api/v1/jobs/claim"),
    ("POST", "/api/v1/jobs/{job_id}/extend-lease"),
    ("POST", "/api/v1/jobs/{job_id}/complete"),
    ("POST", "/api/v1/jobs/{job_id}/fail"),
    ("POST", "/api/v1/jobs/{job_id}/release"),
    ("GET", "/api/v1/secrets"),
    ("PUT", "/api/v1/secrets/{name}"),
    ("DELETE", "/api/v1/secrets/{name}"),
];

/// The whole HTTP API. Tests drive it without a socket; [`crate::run`] serves it.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config().body_limit_bytes;
    Router::new()
        .route("/health", get(health::health))
        .route("/metrics", get(meta::metrics))
        .route("/api/v1/openapi.json", get(meta::openapi_json))
        .route("/api/v1/workflows", post(workflows::submit))
        .route("/api/v1/metrics/jobs", get(jobs::list))
        .route("/api/v1/metrics/jobs/{job_id}", get(jobs::get))
        .route("/api/v1/jobs/{job_id}/cancel", post(jobs::cancel))
        .route("/api/v1/jobs/{job_id}/logs", get(logs::job_logs))
        .route("/api/v1/metrics/robots", get(robots::list))
        .route("/api/v1/metrics/robots/{robot_id}", get(robots::get))
        .route("/api/v1/api-keys", post(keys::create).get(keys::list))
        .route("/api/v1/api-keys/{key_id}", axum::routing::delete(keys::delete))
        .route("/api/v1/api-keys/{key_id}/{action}", post(keys::key_action))
        .route("/api/v1/robot-api-keys", post(keys::create_robot_key).get(keys::list_robot_keys))
        .route("/api/v1/robot-api-keys/{key_id}/{action}", post(keys::robot_key_action))
        .route("/api/v1/robots/commands", post(commands::bulk))
        .route("/api/v1/robots/{robot_id}/status", put(commands::set_status))
        .route("/api/v1/robots/{robot_id}/{action}", post(commands::robot_action))
        .route("/api/v1/robots/{robot_id}/logs", get(logs::robot_logs))
        .route("/api/v1/robots/{robot_id}/metrics", get(logs::robot_metrics))
        .route("/api/v1/metrics/fleet", get(fleet::summary))
        .route("/api/v1/queues", get(fleet::queues))
        .route("/api/v1/events", get(events::events))
        .route(live::PATH, get(live::live_jobs))
        .route("/api/v1/jobs/{job_id}/retry", post(jobs::retry))
        .route("/api/v1/robots/register", post(registry::register))
        .route("/api/v1/robots/{robot_id}", put(registry::update).delete(registry::delete))
        .route("/api/v1/metrics/analytics", get(analytics::analytics))
        .route("/api/v1/metrics/activity", get(analytics::activity))
        .route("/api/v1/robots/{robot_id}/heartbeat", post(agent::heartbeat))
        .route("/api/v1/jobs/claim", post(agent::claim))
        .route("/api/v1/jobs/{job_id}/extend-lease", post(agent::extend_lease))
        .route("/api/v1/jobs/{job_id}/complete", post(agent::complete))
        .route("/api/v1/jobs/{job_id}/fail", post(agent::fail))
        .route("/api/v1/jobs/{job_id}/release", post(agent::release))
        .route("/api/v1/secrets", get(secrets::list))
        .route("/api/v1/secrets/{name}", put(secrets::put).delete(secrets::delete))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(crate::request::panic_response))
        .layer(from_fn_with_state(state.clone(), crate::request::deadline))
        .layer(from_fn_with_state(state.clone(), crate::rate_limit::limit))
        // Outermost, so it also sees the fallbacks', the limits' and the body limit's answers.
        .layer(from_fn_with_state(state.clone(), crate::request::track))
        .with_state(state)
}

/// Unknown paths are 404 for authenticated callers (others learn nothing about the routes).
async fn no_route(_caller: Caller) -> HttpError {
    HttpError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn method_not_allowed(_caller: Caller) -> HttpError {
    HttpError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}

/// One call to the orchestrator, its failures mapped to HTTP.
pub(crate) async fn call<B: Serialize, R: DeserializeOwned>(
    state: &AppState,
    endpoint: Endpoint,
    request_id: RequestId,
    caller: &Caller,
    body: B,
    kind: CallKind,
) -> Result<R, HttpError> {
    state
        .orchestrator()
        .call_as(endpoint, request_id, &caller.tenant, caller.key_id.as_deref(), body)
        .await
        .map_err(|e| HttpError::from_call(e, kind, request_id))
}

/// An id from the path, parsed with `parse`; anything that does not parse is 404.
pub(crate) fn path_id<T>(
    path: Result<Path<String>, PathRejection>,
    what: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<T, HttpError> {
    path.ok().and_then(|Path(raw)| parse(&raw)).ok_or_else(|| HttpError::not_found(what))
}

/// The robot id of a path (404 when it is not one).
pub(crate) fn robot_path(path: Result<Path<String>, PathRejection>) -> Result<RobotId, HttpError> {
    path_id(path, "robot", |s| RobotId::new(s).ok())
}

/// The job id of a path (404 when it is not one).
pub(crate) fn job_path(path: Result<Path<String>, PathRejection>) -> Result<JobId, HttpError> {
    path_id(path, "job", |s| s.parse::<JobId>().ok())
}

/// A robot of the caller's tenant (404 for one it does not have, exactly as for none).
pub(crate) async fn get_robot(
    state: &AppState,
    request_id: RequestId,
    caller: &Caller,
    id: RobotId,
) -> Result<RobotView, HttpError> {
    call(state, Endpoint::GetRobot, request_id, caller, GetById { id }, CallKind::Retryable).await
}

/// A job of the caller's tenant (404 for one it does not have, exactly as for none).
pub(crate) async fn get_job(
    state: &AppState,
    request_id: RequestId,
    caller: &Caller,
    id: JobId,
) -> Result<JobView, HttpError> {
    call(state, Endpoint::GetJob, request_id, caller, GetById { id }, CallKind::Retryable).await
}

/// A fixed word of the path (the `{action}` of `…/{robot_id}/{action}`), as the enum listing the
/// words (which is also what the OpenAPI document lists); `None` for any other word.
pub(crate) fn path_enum<T: DeserializeOwned>(word: &str) -> Option<T> {
    T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(word)).ok()
}

/// Query parameters; empty values count as absent (`?status=` means no filter).
///
/// A parameter given twice is refused (422 naming it) rather than one of its values silently
/// winning, and so is a value holding U+0000, which PostgreSQL cannot store or compare (it
/// used to reach the database and come back as a 500).
pub(crate) struct QueryParams(HashMap<String, String>);

impl QueryParams {
    pub(crate) fn from_uri(uri: &Uri) -> Result<Self, HttpError> {
        // The rejection's text is not logged: a query string may carry a key.
        let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(uri)
            .map_err(|_| HttpError::new(StatusCode::BAD_REQUEST, "bad_request", "malformed query string"))?;
        let mut params = HashMap::with_capacity(pairs.len());
        for (name, value) in pairs {
            if name.contains('\0') || value.contains('\0') {
                return Err(HttpError::invalid(name.replace('\0', "\\0"), crate::extract::NUL_MESSAGE));
            }
            if params.contains_key(&name) {
                return Err(HttpError::invalid(name, "is given more than once"));
            }
            params.insert(name, value);
        }
        Ok(Self(params))
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(s: &str) -> Result<QueryParams, HttpError> {
        QueryParams::from_uri(&format!("/x?{s}").parse().unwrap())
    }

    #[test]
    fn query_values() {
        // (QueryParams has no Debug on purpose: a query may carry a key.)
        let Ok(q) = query("a=1&b=&c=%20x%20") else { panic!("refused") };
        assert_eq!((q.get("a"), q.get("b"), q.get("c"), q.get("d")), (Some("1"), None, Some("x"), None));
    }

    /// Regression (schemathesis, `GET /api/v1/robot-api-keys?offset=false&offset=`): the last of
    /// two values silently won, so `offset=false` was accepted. Now a repeated parameter is 422.
    #[test]
    fn a_repeated_parameter_is_refused() {
        let e = query("offset=false&offset=").err().expect("refused");
        assert_eq!((e.status.as_u16(), e.field.as_deref()), (422, Some("offset")), "{e}");
        assert!(query("offset=1&limit=1").is_ok());
    }

    /// Regression (schemathesis): a NUL character in a filter (`?workflow_id=%00`) reached
    /// PostgreSQL, which refused it, and the API answered 500.
    #[test]
    fn a_nul_character_is_refused() {
        let e = query("workflow_id=a%00b").err().expect("refused");
        assert_eq!((e.status.as_u16(), e.field.as_deref()), (422, Some("workflow_id")), "{e}");
        assert_eq!(query("x%00=1").err().expect("refused").status.as_u16(), 422);
    }

    #[test]
    fn path_words() {
        use commands::RobotAction;
        assert_eq!(path_enum::<RobotAction>("stop"), Some(RobotAction::Stop));
        for other in ["Stop", "stop ", "", "status"] {
            assert_eq!(path_enum::<RobotAction>(other), None, "{other:?}");
        }
    }
}
