//! Log lines and robot figures:
//!
//! - `GET /api/v1/jobs/{job_id}/logs[?limit=&since=]` → `{"job_id", "logs": [LogLine…],
//!   "next_since"}`: the job's lines from `FLEET_LOGS` (`fleet.logs.<tenant>.<job_id>`), oldest
//!   first, at most `limit` (default 1000, at most 10000). `since` is a stream sequence
//!   (exclusive; `next_since` of the previous answer pages on) or a time (RFC 3339, or naive ISO
//!   taken as UTC).
//! - `GET /api/v1/robots/{robot_id}/logs[?limit=&since=]` → `{"robot_id", "logs": [...]}`: the
//!   newest `limit` lines the robot wrote for any job, found by scanning the tenant's last
//!   [`ROBOT_SCAN`] log messages (a bounded scan: lines older than that window are not found;
//!   the job endpoint has them all).
//! - `GET /api/v1/robots/{robot_id}/metrics`: the robot's latest heartbeat figures.
//!
//! The job or robot is looked up in the orchestrator first, so an unknown id (or one of
//! another tenant) is 404 before any log is read. Logs are read with an ephemeral in-memory
//! consumer without acks, deleted when done (and by the server after [`CONSUMER_IDLE`] if the
//! gateway dies meanwhile).

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use axum::Extension;
use axum::Json;
use axum::extract::{Path, State, rejection::PathRejection};
use axum::http::Uri;
use fleet_schemas::api::{RobotStatus, RobotView};
use fleet_schemas::robot::LogLine;
use fleet_schemas::{JobId, RequestId, RobotId, TenantId, subjects};
use futures::StreamExt;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::QueryParams;
use crate::AppState;
use crate::auth::Caller;
use crate::error::HttpError;

pub const DEFAULT_LIMIT: usize = 1000;
pub const MAX_LIMIT: usize = 10_000;
/// How many of the tenant's newest log messages a robot's log search looks at.
pub const ROBOT_SCAN: u64 = 20_000;
/// Longest a log read may take.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);
/// Messages asked for per pull.
const FETCH_BATCH: usize = 1000;
/// The server deletes a read's consumer after this long unused.
pub const CONSUMER_IDLE: Duration = Duration::from_secs(30);

/// Where a read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Since {
    Start,
    /// After this stream sequence.
    Seq(u64),
    Time(OffsetDateTime),
}

#[utoipa::path(
    get,
    path = "/api/v1/jobs/{job_id}/logs",
    tag = "jobs",
    params(
        ("job_id" = String, Path, pattern = "^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$", description = "Job id (a UUID)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 10000, description = "At most this many lines (1 to 10000, default 1000)"),
        ("since" = Option<String>, Query, description = "After this stream sequence (exclusive), or from this time (RFC 3339)"),
    ),
    responses(
        (status = 200, description = "`{job_id, logs: [LogLine], next_since}`, oldest first", body = crate::openapi::JobLogs),
        (status = 404, description = "No such job in the caller's tenant", body = crate::openapi::ErrorBody),
        (status = 422, description = "Bad `limit` or `since`", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn job_logs(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Json<JobLogs>, HttpError> {
    let id = super::job_path(path)?;
    let q = QueryParams::from_uri(&uri)?;
    let (limit, since) = (limit(&q)?, since(&q)?);
    super::get_job(&state, request_id, &caller, id).await?;
    let subject = subjects::job_logs(&caller.tenant, &id);
    let mut lines = Vec::new();
    read(&state, subject, since, limit as u64, |seq, line| {
        lines.push((seq, line));
        lines.len() < limit
    })
    .await?;
    let next_since = lines.last().map(|(seq, _)| *seq);
    let logs: Vec<LogLine> = lines.into_iter().map(|(_, l)| l).collect();
    Ok(Json(JobLogs { job_id: id, logs, next_since }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobLogs {
    #[schema(value_type = String)]
    pub job_id: JobId,
    pub logs: Vec<LogLine>,
    /// Pass as `since` to get the lines after these.
    pub next_since: Option<u64>,
}

#[utoipa::path(
    get,
    path = "/api/v1/robots/{robot_id}/logs",
    tag = "robots",
    params(
        ("robot_id" = String, Path, pattern = "^[a-z0-9-]{1,64}$", description = "Robot id"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 10000, description = "At most this many lines, the newest (1 to 10000, default 1000)"),
        ("since" = Option<String>, Query, description = "After this stream sequence (exclusive), or from this time (RFC 3339)"),
    ),
    responses(
        (status = 200, description = "`{robot_id, logs: [LogLine]}`, oldest first", body = crate::openapi::RobotLogs),
        (status = 404, description = "No such robot in the caller's tenant", body = crate::openapi::ErrorBody),
        (status = 422, description = "Bad `limit` or `since`", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn robot_logs(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Json<RobotLogs>, HttpError> {
    let id = super::robot_path(path)?;
    let q = QueryParams::from_uri(&uri)?;
    let (limit, since) = (limit(&q)?, since(&q)?);
    super::get_robot(&state, request_id, &caller, id.clone()).await?;
    let since = match since {
        Since::Start => Since::Seq(last_sequence(&state).await?.saturating_sub(ROBOT_SCAN)),
        other => other,
    };
    let mut newest = VecDeque::with_capacity(limit.min(1024));
    read(&state, tenant_logs(&caller.tenant), since, ROBOT_SCAN, |_, line| {
        if line.robot_id == id {
            if newest.len() == limit {
                newest.pop_front();
            }
            newest.push_back(line);
        }
        true
    })
    .await?;
    Ok(Json(RobotLogs { robot_id: id, logs: newest.into() }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RobotLogs {
    #[schema(value_type = String)]
    pub robot_id: RobotId,
    pub logs: Vec<LogLine>,
}

#[utoipa::path(
    get,
    path = "/api/v1/robots/{robot_id}/metrics",
    tag = "robots",
    params(("robot_id" = String, Path, pattern = "^[a-z0-9-]{1,64}$", description = "Robot id")),
    responses(
        (status = 200, description = "The robot's latest heartbeat figures", body = crate::openapi::RobotMetrics),
        (status = 404, description = "No such robot in the caller's tenant", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn robot_metrics(
    caller: Caller,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<RobotMetrics>, HttpError> {
    let id = super::robot_path(path)?;
    let r: RobotView = super::get_robot(&state, request_id, &caller, id).await?;
    Ok(Json(RobotMetrics {
        robot_id: r.robot_id,
        status: r.status,
        state: r.state,
        cpu_percent: r.cpu_percent,
        memory_mb: r.memory_mb,
        last_heartbeat: r.last_heartbeat,
        last_seen: r.last_seen,
        current_jobs: r.current_job_ids.len(),
        current_job_ids: r.current_job_ids,
        max_concurrent_jobs: r.max_concurrent_jobs,
        version: r.version,
    }))
}

/// `GET /api/v1/robots/{robot_id}/metrics`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RobotMetrics {
    pub robot_id: String,
    pub status: RobotStatus,
    pub state: String,
    pub cpu_percent: Option<f32>,
    pub memory_mb: Option<f64>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_heartbeat: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen: Option<OffsetDateTime>,
    pub current_jobs: usize,
    pub current_job_ids: Vec<String>,
    pub max_concurrent_jobs: u32,
    pub version: Option<String>,
}

/// All log subjects of a tenant. (`fleet_schemas::subjects` has only the per-job subject yet.)
fn tenant_logs(tenant: &TenantId) -> String {
    format!("fleet.logs.{tenant}.>")
}

fn limit(q: &QueryParams) -> Result<usize, HttpError> {
    match q.get("limit") {
        None => Ok(DEFAULT_LIMIT),
        Some(s) => {
            s.parse::<usize>().ok().filter(|n| (1..=MAX_LIMIT).contains(n)).ok_or_else(|| {
                HttpError::invalid("limit", format!("must be an integer from 1 to {MAX_LIMIT}"))
            })
        }
    }
}

fn since(q: &QueryParams) -> Result<Since, HttpError> {
    let Some(s) = q.get("since") else { return Ok(Since::Start) };
    if let Ok(seq) = s.parse::<u64>() {
        return Ok(Since::Seq(seq));
    }
    parse_time(s).map(Since::Time).ok_or_else(|| {
        HttpError::invalid("since", "must be a stream sequence number or a time (2026-01-14T09:30:00Z)")
    })
}

/// RFC 3339, or a naive ISO time (what the Canvas sends) taken as UTC.
fn parse_time(s: &str) -> Option<OffsetDateTime> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Some(t);
    }
    let naive = time::macros::format_description!(
        version = 2,
        "[year]-[month]-[day][first [T] [ ]][hour]:[minute]:[second][optional [.[subsecond]]]"
    );
    time::PrimitiveDateTime::parse(s, &naive).ok().map(time::PrimitiveDateTime::assume_utc)
}

fn unavailable(what: &str, e: &dyn std::fmt::Display) -> HttpError {
    HttpError::unavailable("the log stream is not available; try again shortly", 2)
        .with_log_detail(format!("{what}: {e}"))
}

async fn last_sequence(state: &AppState) -> Result<u64, HttpError> {
    let stream = state
        .jetstream()
        .get_stream(subjects::LOGS_STREAM)
        .await
        .map_err(|e| unavailable("get stream", &e))?;
    Ok(stream.cached_info().state.last_sequence)
}

/// Read at most `scan` messages on `filter` from `since`, oldest first, handing each log line
/// to `take` until it returns false. Lines that do not parse are skipped.
async fn read(
    state: &AppState,
    filter: String,
    since: Since,
    scan: u64,
    mut take: impl FnMut(u64, LogLine) -> bool,
) -> Result<(), HttpError> {
    if !state.orchestrator().is_connected() {
        return Err(HttpError::unavailable("the gateway is not connected to NATS; try again shortly", 1));
    }
    let stream = state
        .jetstream()
        .get_stream(subjects::LOGS_STREAM)
        .await
        .map_err(|e| unavailable("get stream", &e))?;
    let deliver_policy = match since {
        Since::Start => DeliverPolicy::All,
        Since::Seq(seq) => DeliverPolicy::ByStartSequence { start_sequence: seq.saturating_add(1) },
        Since::Time(start_time) => DeliverPolicy::ByStartTime { start_time },
    };
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: filter,
            deliver_policy,
            ack_policy: AckPolicy::None,
            memory_storage: true,
            inactive_threshold: CONSUMER_IDLE,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable("create consumer", &e))?;
    let name = consumer.cached_info().name.clone();
    let result = tokio::time::timeout(READ_DEADLINE, async {
        let mut scanned = 0u64;
        loop {
            let want = usize::try_from((scan - scanned).min(FETCH_BATCH as u64)).unwrap_or(FETCH_BATCH);
            if want == 0 {
                return Ok(());
            }
            let mut batch =
                consumer.fetch().max_messages(want).messages().await.map_err(|e| unavailable("fetch", &e))?;
            let mut got = 0;
            while let Some(msg) = batch.next().await {
                let msg = msg.map_err(|e| unavailable("fetch", &e))?;
                got += 1;
                scanned += 1;
                let Ok(info) = msg.info() else { continue };
                // A start time after the subject's last message delivered all of it (seen with
                // the pinned nats-server), so the time is checked here as well.
                if let Since::Time(t) = since
                    && info.published < t
                {
                    continue;
                }
                let seq = info.stream_sequence;
                let Ok(line) = serde_json::from_slice::<LogLine>(&msg.payload) else { continue };
                if !take(seq, line) {
                    return Ok(());
                }
            }
            if got < want {
                return Ok(()); // nothing more stored
            }
        }
    })
    .await;
    // Not awaited by the request: the server also drops it once idle.
    tokio::spawn(async move {
        let _ = stream.delete_consumer(&name).await;
    });
    match result {
        Ok(r) => r,
        Err(_) => Err(HttpError::unavailable("reading the logs took too long; try a smaller limit", 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> QueryParams {
        QueryParams::from_uri(&format!("/x?{s}").parse().unwrap()).unwrap()
    }

    #[test]
    fn query() {
        assert_eq!(limit(&q("")).unwrap(), 1000);
        assert_eq!(limit(&q("limit=10000")).unwrap(), 10_000);
        for bad in ["limit=0", "limit=10001", "limit=x"] {
            assert_eq!(limit(&q(bad)).unwrap_err().field.as_deref(), Some("limit"));
        }
        assert_eq!(since(&q("")).unwrap(), Since::Start);
        assert_eq!(since(&q("since=41")).unwrap(), Since::Seq(41));
        let t = |s: &str| match since(&q(&format!("since={s}"))).unwrap() {
            Since::Time(t) => t.unix_timestamp(),
            other => panic!("{other:?}"),
        };
        assert_eq!(t("1970-01-01T00:01:00Z"), 60);
        assert_eq!(t("1970-01-01T00:01:00"), 60, "naive ISO is UTC");
        assert_eq!(t("1970-01-01T00:01:00.250"), 60);
        assert_eq!(since(&q("since=yesterday")).unwrap_err().field.as_deref(), Some("since"));
    }
}
