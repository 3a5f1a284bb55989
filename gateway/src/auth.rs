//! Who is calling: the [`Caller`] extractor and the tenant it acts as.
//!
//! The tenant of a request always comes from the caller's credentials, never from the request
//! body, so a handler that takes a [`Caller`] cannot be talked into another tenant's data.
//!
//! Real API keys arrive in a later issue. Until then there are two modes:
//! - development mode (`FLEET_DEV_MODE=true`): every request acts as tenant `default`, whatever
//!   key it carries (the gateway warns loudly at start);
//! - otherwise every request that needs a caller is refused with 401 and a hint.
//!
//! The credential is already read the way keys will be (the Canvas sends the same key both as
//! `Authorization: Bearer` and as `X-Api-Key`), so keys only need an [`authenticate`] that looks
//! them up. A key is held in an [`ApiKey`] whose `Debug` never prints it, so it cannot reach a
//! log by accident.

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;
use fleet_schemas::TenantId;

use crate::AppState;
use crate::error::HttpError;

/// The message a request gets while no keys are configured.
pub const NO_KEYS_MESSAGE: &str =
    "API keys are not configured yet: start the gateway with FLEET_DEV_MODE=true for local use";

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

/// Decide who the caller is.
pub fn authenticate(state: &AppState, _key: Option<ApiKey>) -> Result<Caller, HttpError> {
    if state.config().dev_mode {
        // Keys are ignored in development mode; everyone is the default tenant.
        return Ok(Caller { tenant: TenantId::default_tenant() });
    }
    // Key lookup comes here with the API-keys issue; until then no key can be valid.
    Err(HttpError::unauthorized(NO_KEYS_MESSAGE))
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let caller = if state.config().dev_mode {
            // A malformed header must not lock a developer out either.
            authenticate(state, None)?
        } else {
            let key = credential(&parts.headers)?;
            authenticate(state, key)?
        };
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
