//! The Canvas's dashboards: `GET /api/v1/metrics/analytics[?days=]` (figures over the tenant's
//! jobs of the last days) and `GET /api/v1/metrics/activity[?limit=&since=&event_type=]` (its
//! recent events, newest first, in the Canvas's vocabulary: `job_started`, `robot_online`, …).

use axum::Extension;
use axum::Json;
use axum::extract::State;
use axum::http::Uri;
use fleet_schemas::RequestId;
use fleet_schemas::api::{Activity, ActivityQuery, Analytics, AnalyticsQuery, Endpoint};
use time::OffsetDateTime;

use super::{QueryParams, call};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{CallKind, HttpError};

/// The analytics window in days, and its default (the Canvas's).
pub const DAYS_RANGE: std::ops::RangeInclusive<u32> = 1..=90;
pub const DEFAULT_DAYS: u32 = 7;
/// Events per activity answer, and the default.
pub const ACTIVITY_LIMIT: std::ops::RangeInclusive<u32> = 1..=200;
pub const DEFAULT_ACTIVITY_LIMIT: u32 = 50;

fn number(
    q: &QueryParams,
    name: &str,
    range: std::ops::RangeInclusive<u32>,
    default: u32,
) -> Result<u32, HttpError> {
    match q.get(name) {
        None => Ok(default),
        Some(v) => v.parse::<u32>().ok().filter(|n| range.contains(n)).ok_or_else(|| {
            HttpError::invalid(name, format!("must be an integer from {} to {}", range.start(), range.end()))
        }),
    }
}

/// An ISO 8601 time; one without an offset (as the Canvas sends) is taken as UTC.
fn iso_time(field: &str, text: &str) -> Result<OffsetDateTime, HttpError> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(t);
    }
    let naive = time::macros::format_description!(
        version = 2,
        "[year]-[month]-[day]T[hour]:[minute]:[second][optional [.[subsecond]]]"
    );
    time::PrimitiveDateTime::parse(text, &naive)
        .map(|t| t.assume_utc())
        .map_err(|_| HttpError::invalid(field, "must be an ISO 8601 date and time"))
}

#[utoipa::path(
    get,
    path = "/api/v1/metrics/analytics",
    tag = "fleet",
    params(("days" = Option<u32>, Query, minimum = 1, maximum = 90, description = "The window: jobs created in the last 1 to 90 days (default 7)")),
    responses(
        (status = 200, description = "Figures over the window", body = crate::openapi::Analytics),
        (status = 422, description = "Bad `days`", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn analytics(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    uri: Uri,
) -> Result<Json<Analytics>, HttpError> {
    let q = QueryParams::from_uri(&uri)?;
    let days = number(&q, "days", DAYS_RANGE, DEFAULT_DAYS)?;
    call(&state, Endpoint::Analytics, request_id, &caller, AnalyticsQuery { days }, CallKind::Retryable)
        .await
        .map(Json)
}

#[utoipa::path(
    get,
    path = "/api/v1/metrics/activity",
    tag = "fleet",
    params(
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 200, description = "1 to 200, default 50"),
        ("since" = Option<String>, Query, description = "Only events after this ISO 8601 time"),
        ("event_type" = Option<String>, Query, description = "job_started, job_completed, job_failed, robot_online, robot_offline, or another event's name with `_` for `.` (job_retried, robot_command, …)"),
    ),
    responses(
        (status = 200, description = "`{events, total}`, newest first", body = crate::openapi::Activity),
        (status = 422, description = "A filter is wrong", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn activity(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    uri: Uri,
) -> Result<Json<Activity>, HttpError> {
    let q = QueryParams::from_uri(&uri)?;
    let limit = number(&q, "limit", ACTIVITY_LIMIT, DEFAULT_ACTIVITY_LIMIT)?;
    let since = q.get("since").map(|s| iso_time("since", s)).transpose()?;
    let event_type = q.get("event_type").map(str::to_owned);
    if let Some(t) = &event_type
        && (t.len() > 64 || !t.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
    {
        return Err(HttpError::invalid(
            "event_type",
            "must be an event type such as job_completed or robot_online",
        ));
    }
    let query = ActivityQuery { limit, since, event_type };
    call(&state, Endpoint::Activity, request_id, &caller, query, CallKind::Retryable).await.map(Json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> QueryParams {
        QueryParams::from_uri(&format!("/x?{s}").parse().unwrap()).unwrap()
    }

    #[test]
    fn query_checks_name_the_field() {
        assert_eq!(number(&q(""), "days", DAYS_RANGE, DEFAULT_DAYS).unwrap(), 7);
        assert_eq!(number(&q("days=90"), "days", DAYS_RANGE, DEFAULT_DAYS).unwrap(), 90);
        for bad in ["days=0", "days=91", "days=x"] {
            let e = number(&q(bad), "days", DAYS_RANGE, DEFAULT_DAYS).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("days"), "{bad}");
        }
        assert_eq!(iso_time("since", "2026-01-14T10:00:00Z").unwrap().unix_timestamp(), 1_768_384_800);
        assert_eq!(iso_time("since", "2026-01-14T10:00:00.250").unwrap().unix_timestamp(), 1_768_384_800);
        assert_eq!(iso_time("since", "yesterday").unwrap_err().field.as_deref(), Some("since"));
    }
}
