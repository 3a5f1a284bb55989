//! The one mapping from everything that can go wrong to an HTTP status and a JSON body.
//!
//! Every error the gateway answers has the same shape,
//! `{"error": {"code", "message", "field"}, "request_id"}`, whether it comes from the
//! orchestrator ([`ApiError`]), from the NATS round trip, from our own validation, or from axum
//! itself (unknown route, wrong method, body too large). Clients (the Canvas among them) can
//! then handle errors in one place, and never see axum's plain-text bodies.
//!
//! An [`HttpError`] does not know the request id when it is created (handlers and extractors
//! fail before or without it), so it renders in two steps: `into_response` sets the status and
//! headers and stores the error in the response's extensions, and the per-request middleware
//! ([`crate::request`]) writes the final body with the request id. The same middleware turns
//! any other error response (one axum produced) into this shape.
//!
//! What the client sees is kept apart from what the log records: an internal failure answers
//! "internal error" and the details go to the request's log line only ([`HttpError::log_detail`]).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleet_schemas::RequestId;
use fleet_schemas::api::ApiError;
use serde::Serialize;

use crate::orchestrator::CallError;

/// An error answer: status, stable machine code, human message and the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub status: StatusCode,
    /// Stable, snake_case: `not_found`, `invalid`, `malformed_json`, `unavailable`, …
    pub code: &'static str,
    /// Safe to show to the client.
    pub message: String,
    /// The request field at fault (`workflow_json.steps[0].argv`, `priority`, …).
    pub field: Option<String>,
    /// Sent as `Retry-After` (seconds) with 503.
    pub retry_after_s: Option<u32>,
    /// Logged with the request, never sent to the client.
    pub log_detail: Option<String>,
}

impl HttpError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), field: None, retry_after_s: None, log_detail: None }
    }

    /// 422 naming the field at fault.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: Some(field.into()), ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message) }
    }

    /// Not found (404), used alike for ids that do not exist, ids of other tenants and ids that
    /// are not even well-formed, so an answer never tells them apart.
    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found"))
    }

    /// 400 for a body that is not JSON at all.
    pub fn malformed_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_json", message)
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than the limit of {limit} bytes"),
        )
    }

    /// 503: nothing was done, the client may retry after `retry_after_s` seconds.
    pub fn unavailable(message: impl Into<String>, retry_after_s: u32) -> Self {
        Self {
            retry_after_s: Some(retry_after_s.max(1)),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }

    /// 500 with details for the log only.
    pub fn internal(log_detail: impl Into<String>) -> Self {
        Self {
            log_detail: Some(log_detail.into()),
            ..Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn with_log_detail(mut self, detail: impl Into<String>) -> Self {
        self.log_detail = Some(detail.into());
        self
    }

    /// A generic error for a status axum (or a layer) produced on its own.
    pub fn from_status(status: StatusCode) -> Self {
        let code = match status {
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::CONFLICT => "conflict",
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::UNPROCESSABLE_ENTITY => "invalid",
            StatusCode::TOO_MANY_REQUESTS => "rate_limited",
            StatusCode::BAD_GATEWAY => "bad_gateway",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            StatusCode::GATEWAY_TIMEOUT => "gateway_timeout",
            s if s.is_server_error() => "internal",
            _ => "error",
        };
        let message = status.canonical_reason().unwrap_or("error").to_ascii_lowercase();
        Self::new(status, code, message)
    }

    /// The JSON body, with the request id the middleware knows.
    pub fn body(&self, request_id: Option<RequestId>) -> serde_json::Value {
        serde_json::to_value(ErrorBody {
            error: ErrorDetail { code: self.code, message: self.message.clone(), field: self.field.clone() },
            request_id: request_id.map(|r| r.to_string()),
        })
        .unwrap_or(serde_json::Value::Null)
    }
}

/// Every error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
    /// The request id (also in the `x-request-id` header).
    pub request_id: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, snake_case: `not_found`, `invalid`, `unauthorized`, `rate_limited`, `unavailable`, `outcome_unknown`, …
    pub code: &'static str,
    pub message: String,
    /// The request field at fault (`workflow_json.steps[0].argv`, `priority`, …).
    pub field: Option<String>,
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)?;
        if let Some(field) = &self.field {
            write!(f, " (field {field})")?;
        }
        Ok(())
    }
}

impl std::error::Error for HttpError {}

/// The single mapping from the orchestrator's error kinds to HTTP.
impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::NotFound { what } => HttpError::not_found(&what),
            ApiError::Invalid { field, message } => HttpError::invalid(field, message),
            ApiError::Conflict { message } => HttpError::new(StatusCode::CONFLICT, "conflict", message),
            ApiError::Unavailable { message, retry_after_s } => {
                HttpError::unavailable(message, retry_after_s)
            }
            ApiError::Internal { message } => {
                HttpError::internal(format!("orchestrator internal error: {message}"))
            }
        }
    }
}

/// Whether a lost answer leaves the outcome of a call unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// Reads, and writes that are safe to repeat (cancel): a lost answer is a retryable 503.
    Retryable,
    /// A submit may have committed when its answer is lost: never a status clients retry.
    Submit,
}

impl HttpError {
    /// The mapping of a failed orchestrator call.
    pub fn from_call(e: CallError, kind: CallKind, request_id: RequestId) -> Self {
        let detail = e.to_string();
        if kind == CallKind::Submit && e.outcome_unknown() {
            return HttpError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "outcome_unknown",
                format!(
                    "the orchestrator did not confirm the submission in time, so the job may or may not \
                     have been created; look it up by request id {request_id} before submitting again \
                     (or resubmit with the same Idempotency-Key)"
                ),
            )
            .with_log_detail(detail);
        }
        match e {
            CallError::Api(api) => api.into(),
            CallError::NotConnected => {
                HttpError::unavailable("the gateway is not connected to NATS; try again shortly", 1)
            }
            CallError::NoResponders { .. } => HttpError::unavailable("no orchestrator is running", 1),
            CallError::TooLarge { .. } => HttpError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request is larger than the message size NATS accepts",
            ),
            CallError::TimedOut { .. } | CallError::Transport(_) => {
                HttpError::unavailable("the orchestrator did not answer in time", 1).with_log_detail(detail)
            }
            CallError::BadReply(_) => HttpError::new(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                "the orchestrator gave an answer the gateway does not understand",
            )
            .with_log_detail(detail),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        // The body written here lacks the request id; `request::track` rewrites it. Writing a
        // complete body anyway keeps the response valid JSON if this is ever used without it.
        let mut response = (self.status, axum::Json(self.body(None))).into_response();
        if let Some(secs) = self.retry_after_s {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response.extensions_mut().insert(self);
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_map_to_statuses() {
        let cases = [
            (ApiError::NotFound { what: "job".into() }, 404, "not_found"),
            (ApiError::Invalid { field: "priority".into(), message: "0 to 20".into() }, 422, "invalid"),
            (ApiError::Conflict { message: "running".into() }, 409, "conflict"),
            (ApiError::Unavailable { message: "db down".into(), retry_after_s: 0 }, 503, "unavailable"),
            (ApiError::Internal { message: "secret detail".into() }, 500, "internal"),
        ];
        for (api, status, code) in cases {
            let e = HttpError::from(api);
            assert_eq!(e.status.as_u16(), status);
            assert_eq!(e.code, code);
        }
        let e = HttpError::from(ApiError::Internal { message: "secret detail".into() });
        assert!(!e.message.contains("secret"), "internals must not reach the client");
        assert!(e.log_detail.unwrap().contains("secret"));
        let e = HttpError::from(ApiError::Unavailable { message: "x".into(), retry_after_s: 0 });
        assert_eq!(e.retry_after_s, Some(1), "Retry-After is at least one second");
    }

    #[test]
    fn submit_with_unknown_outcome_is_never_retryable() {
        let id = RequestId::new();
        let t = || CallError::TimedOut { waited: std::time::Duration::from_secs(1) };
        let e = HttpError::from_call(t(), CallKind::Submit, id);
        assert_eq!((e.status.as_u16(), e.code), (500, "outcome_unknown"));
        assert!(e.message.contains(&id.to_string()));
        let e = HttpError::from_call(CallError::BadReply("x".into()), CallKind::Submit, id);
        assert_eq!(e.code, "outcome_unknown");
        let e = HttpError::from_call(t(), CallKind::Retryable, id);
        assert_eq!((e.status.as_u16(), e.retry_after_s), (503, Some(1)));
        let e = HttpError::from_call(CallError::BadReply("x".into()), CallKind::Retryable, id);
        assert_eq!((e.status.as_u16(), e.code), (502, "bad_gateway"));
        // Nothing was sent or nobody listened: safe to retry, even a submit.
        for e in [CallError::NotConnected, CallError::NoResponders { subject: "s".into() }] {
            let e = HttpError::from_call(e, CallKind::Submit, id);
            assert_eq!((e.status.as_u16(), e.retry_after_s), (503, Some(1)));
        }
    }

    #[test]
    fn body_shape() {
        let id = RequestId::new();
        let b = HttpError::invalid("priority", "must be 0 to 20").body(Some(id));
        assert_eq!(b["error"]["code"], "invalid");
        assert_eq!(b["error"]["field"], "priority");
        assert_eq!(b["request_id"], id.to_string());
        let b = HttpError::not_found("job").body(None);
        assert!(b["error"]["field"].is_null());
        assert!(b.get("request_id").is_some());
    }
}
