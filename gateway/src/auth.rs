//! Who is calling: the [`Caller`] extractor and the tenant it acts as.
//!
//! The tenant of a request always comes from the caller's credentials, never from the request
//! body, so a handler that takes a [`Caller`] cannot be talked into another tenant's data.
//!
//! A key (`crpa_<key id>_<secret>`) is checked by the orchestrator, which holds only the SHA-256
//! of each secret; the gateway sends the key id and the hash, never the secret. A verified key
//! is cached for [`KEY_CACHE_TTL`], which bounds how late a revocation takes effect (the issue
//! asks for 5 s) while sparing the database a lookup per request.
//!
//! Development mode (`FLEET_DEV_MODE=true`) keeps local use simple: a request without a valid key
//! acts as tenant `default` with the admin role (the gateway warns loudly at start), whatever the
//! Canvas has configured; a request that carries a valid key acts as that key, so keys can be
//! tried out locally.
//!
//! A key is checked once per request, by the rate-limit middleware ([`crate::rate_limit`]),
//! which needs the key's id and its own rate limit before anything else happens; it leaves the
//! outcome in the request ([`Verified`]) for the [`Caller`] extractor.
//!
//! A key is held in an [`ApiKey`] whose `Debug` never prints it, so it cannot reach a log by
//! accident. Roles nest: admin ⊃ operator ⊃ viewer; a handler asks for the role it needs with
//! [`Caller::require`], which answers 403 otherwise.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, Uri};
use fleet_schemas::api::{ApiError, Endpoint, KeyIdentity, VerifyKey};
use fleet_schemas::keys::{self, Rate, Role};
use fleet_schemas::{RequestId, RobotId, TenantId};

use crate::AppState;
use crate::error::HttpError;
use crate::orchestrator::CallError;

/// How long a verified key is trusted without asking again: the longest a revoked key still works.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(4);
/// Verified keys remembered at once; past it the cache is cleared (a flood of distinct keys must
/// not grow memory).
const KEY_CACHE_MAX: usize = 10_000;

/// The only routes a robot key may call, as (method, path template): a robot key does only what
/// a robot does. Everything else (submit, cancel, job and robot lists, robot commands, keys) is
/// 403 for it, whatever the handler would check.
pub const ROBOT_ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/v1/robots/register"),
    ("POST", "/api/v1/robots/{robot_id}/heartbeat"),
    // Its own status, as the seed's agent reports it (another robot's is 404 to it).
    ("PUT", "/api/v1/robots/{robot_id}/status"),
    ("POST", "/api/v1/jobs/claim"),
    ("POST", "/api/v1/jobs/{job_id}/extend-lease"),
    ("POST", "/api/v1/jobs/{job_id}/complete"),
    ("POST", "/api/v1/jobs/{job_id}/fail"),
    ("POST", "/api/v1/jobs/{job_id}/release"),
];

/// 403 for a robot key on a route outside [`ROBOT_ROUTES`]. A path no route matches is left to
/// the fallback (404).
fn robot_gate(caller: &Caller, parts: &Parts) -> Result<(), HttpError> {
    if caller.role != Role::Robot {
        return Ok(());
    }
    let Some(path) = parts.extensions.get::<axum::extract::MatchedPath>() else { return Ok(()) };
    let method = parts.method.as_str();
    if ROBOT_ROUTES.iter().any(|(m, p)| *m == method && *p == path.as_str()) {
        return Ok(());
    }
    Err(HttpError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "a robot key may only do what a robot does (register itself, heartbeat, claim and report its \
             jobs), not {method} {}",
            path.as_str()
        ),
    ))
}

/// The message a request without a key gets.
pub const NO_KEY_MESSAGE: &str =
    "an API key is required: send it as `Authorization: Bearer <key>` or `X-Api-Key: <key>`";

/// Keys verified recently, by key id and secret hash.
#[derive(Debug, Default)]
pub struct KeyCache {
    entries: Mutex<HashMap<(String, String), (KeyIdentity, Instant)>>,
}

impl KeyCache {
    fn get(&self, id: &(String, String)) -> Option<KeyIdentity> {
        let entries = self.entries.lock().expect("not poisoned");
        entries.get(id).filter(|(_, at)| at.elapsed() < KEY_CACHE_TTL).map(|(k, _)| k.clone())
    }

    fn put(&self, id: (String, String), key: KeyIdentity) {
        let mut entries = self.entries.lock().expect("not poisoned");
        if entries.len() >= KEY_CACHE_MAX {
            entries.retain(|_, (_, at)| at.elapsed() < KEY_CACHE_TTL);
            if entries.len() >= KEY_CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(id, (key, Instant::now()));
    }
}

/// An API key as presented by a client. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant: TenantId,
    pub role: Role,
    /// The key's id (`None` for a keyless development-mode request).
    pub key_id: Option<String>,
    /// The key's own rate limit (`None`: the gateway's default).
    pub rate_limit: Option<Rate>,
    /// The robot of a robot key (`None` for a user key): the robot-facing routes act as it.
    pub robot_id: Option<RobotId>,
}

/// The outcome of checking a request's key, before development mode is applied: left in the
/// request's extensions by the rate-limit middleware for the [`Caller`] extractor, so a key is
/// checked (and, on a cache miss, sent to the orchestrator) once per request.
#[derive(Debug, Clone)]
pub struct Verified(pub Result<Caller, HttpError>);

impl Caller {
    fn of(key: KeyIdentity) -> Caller {
        Caller {
            tenant: key.tenant,
            role: key.role,
            key_id: Some(key.key_id),
            rate_limit: key.rate_limit,
            robot_id: key.robot_id,
        }
    }

    /// 403 unless the caller's role includes `needed`.
    pub fn require(&self, needed: Role) -> Result<(), HttpError> {
        if self.role.allows(needed) {
            Ok(())
        } else {
            Err(HttpError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this key's role ({}) may not do this; it needs the {needed} role", self.role),
            ))
        }
    }
}

/// Read the key from `Authorization: Bearer <key>` or `X-Api-Key: <key>`. Both may be present
/// (the Canvas sends both) but must then agree.
pub fn credential(headers: &HeaderMap) -> Result<Option<ApiKey>, HttpError> {
    let bearer = match headers.get(axum::http::header::AUTHORIZATION) {
        None => None,
        Some(v) => {
            let v = v.to_str().map_err(|_| HttpError::unauthorized("malformed Authorization header"))?;
            let (scheme, key) = v.trim().split_once(' ').unwrap_or((v, ""));
            if !scheme.eq_ignore_ascii_case("bearer") || key.trim().is_empty() {
                return Err(HttpError::unauthorized("the Authorization header must be `Bearer <api key>`"));
            }
            Some(key.trim().to_owned())
        }
    };
    let x_api_key = match headers.get("x-api-key") {
        None => None,
        Some(v) => {
            let v = v.to_str().map_err(|_| HttpError::unauthorized("malformed X-Api-Key header"))?;
            Some(v.trim().to_owned()).filter(|k| !k.is_empty())
        }
    };
    match (bearer, x_api_key) {
        (Some(a), Some(b)) if a != b => {
            Err(HttpError::unauthorized("Authorization and X-Api-Key carry different keys"))
        }
        (Some(k), _) | (None, Some(k)) => Ok(Some(ApiKey(k))),
        (None, None) => Ok(None),
    }
}

/// The key a request presents: the `token` query parameter on the Canvas's live view (a
/// WebSocket cannot carry headers; [`crate::routes::live`]), the key headers everywhere else.
pub fn presented(uri: &Uri, headers: &HeaderMap) -> Result<Option<ApiKey>, HttpError> {
    if uri.path() == crate::routes::live::PATH {
        let query = crate::routes::QueryParams::from_uri(uri).ok();
        return Ok(query.and_then(|q| q.get("token").map(|t| ApiKey(t.to_owned()))));
    }
    credential(headers)
}

/// Check a key: from the cache when it was verified recently, else by asking the orchestrator,
/// but only if `before_asking` allows it (the rate limiter refuses to ask for a peer that is
/// over its limit, so a flood of made-up keys does not become a flood of lookups).
pub async fn verify(
    state: &AppState,
    key: Option<ApiKey>,
    before_asking: impl FnOnce() -> Result<(), HttpError>,
) -> Result<Caller, HttpError> {
    let Some(key) = key else { return Err(HttpError::unauthorized(NO_KEY_MESSAGE)) };
    let parsed = keys::parse_key(key.expose())
        .ok_or_else(|| HttpError::unauthorized("not a Fleet API key (expected crpa_<key id>_<secret>)"))?;
    let id = (parsed.key_id.clone(), keys::secret_hash(&parsed.secret));
    if let Some(known) = state.key_cache().get(&id) {
        return Ok(Caller::of(known));
    }
    before_asking()?;
    let verify = VerifyKey { key_id: id.0.clone(), secret_sha256: id.1.clone() };
    // The envelope's tenant is ignored for verification: the key says whose it is.
    let answer: Result<KeyIdentity, CallError> = state
        .orchestrator()
        .call(Endpoint::VerifyKey, RequestId::new(), &TenantId::default_tenant(), verify)
        .await;
    match answer {
        Ok(known) => {
            state.key_cache().put(id, known.clone());
            Ok(Caller::of(known))
        }
        Err(CallError::Api(ApiError::NotFound { .. })) => {
            Err(HttpError::unauthorized("unknown, revoked or expired API key"))
        }
        Err(e) => Err(HttpError::from_call(e, crate::error::CallKind::Retryable, RequestId::new())),
    }
}

/// Development mode: a request without a valid key acts as tenant `default`, admin.
fn with_dev_mode(state: &AppState, verified: Result<Caller, HttpError>) -> Result<Caller, HttpError> {
    match verified {
        Err(e) if state.config().dev_mode && e.status == StatusCode::UNAUTHORIZED => Ok(Caller {
            tenant: TenantId::default_tenant(),
            role: Role::Admin,
            key_id: None,
            rate_limit: None,
            robot_id: None,
        }),
        other => other,
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let verified = match parts.extensions.get::<Verified>() {
            Some(Verified(v)) => v.clone(),
            // Not through the rate-limit middleware: check the key here.
            None => match presented(&parts.uri, &parts.headers) {
                Ok(key) => verify(state, key, || Ok(())).await,
                Err(e) => Err(e),
            },
        };
        // A malformed header is a 401 too, so it does not lock a developer out in development mode.
        let caller = with_dev_mode(state, verified)?;
        robot_gate(&caller, parts)?;
        tracing::Span::current().record("tenant", caller.tenant.as_str());
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn reads_either_header() {
        let k = credential(&headers(&[("authorization", "Bearer abc")])).unwrap().unwrap();
        assert_eq!(k.expose(), "abc");
        let k = credential(&headers(&[("x-api-key", "abc")])).unwrap().unwrap();
        assert_eq!(k.expose(), "abc");
        let k = credential(&headers(&[("authorization", "bearer abc"), ("x-api-key", "abc")])).unwrap();
        assert_eq!(k.unwrap().expose(), "abc");
        assert!(credential(&headers(&[])).unwrap().is_none());
    }

    #[test]
    fn refuses_odd_headers() {
        assert!(credential(&headers(&[("authorization", "Basic dXNlcg==")])).is_err());
        assert!(credential(&headers(&[("authorization", "Bearer")])).is_err());
        assert!(credential(&headers(&[("authorization", "Bearer a"), ("x-api-key", "b")])).is_err());
    }

    #[test]
    fn key_never_prints() {
        let k = credential(&headers(&[("x-api-key", "s3cret")])).unwrap().unwrap();
        assert!(!format!("{k:?}").contains("s3cret"));
    }
}
