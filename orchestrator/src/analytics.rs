//! Read-only figures for the Canvas's dashboards: `GET /api/v1/metrics/analytics` (aggregates
//! over a tenant's recent jobs) and `GET /api/v1/metrics/activity` (its recent events).
//!
//! Both read the record directly: the job table for analytics (duration percentiles are
//! PostgreSQL's `percentile_cont`, exact over the window rather than estimated), and
//! `job_history` — the outbox every state change writes — for activity, so the activity feed
//! shows exactly the events the event stream carries, renamed to the Canvas's vocabulary.
//! Reads run on any instance; nothing here is fenced.

use std::collections::BTreeMap;

use fleet_schemas::api::{
    Activity, ActivityEvent, ActivityQuery, Analytics, AnalyticsQuery, ApiError, ApiRequest, ApiResult,
    ErrorCount, HourThroughput, WorkflowDuration, WorkflowThroughput,
};
use serde_json::Value;
use sqlx::Row;
use sqlx::types::Json;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::Core;
use crate::store::StoreError;

/// The analytics window, in days, and its default.
pub const DAYS_RANGE: std::ops::RangeInclusive<u32> = 1..=90;
pub const DEFAULT_DAYS: u32 = 7;
/// Events per activity page, and the default.
pub const ACTIVITY_LIMIT: std::ops::RangeInclusive<u32> = 1..=200;
pub const DEFAULT_ACTIVITY_LIMIT: u32 = 50;
/// Rows in the per-workflow lists: a dashboard shows a handful, and the answer stays small.
const SLOWEST: i64 = 10;
const PER_WORKFLOW: i64 = 100;

/// The jobs of the window, with the duration of the completed ones in milliseconds.
const WINDOW: &str = "WITH w AS (
    SELECT status, workflow_id, workflow_name, error_type, created_at,
           CASE WHEN status = 'completed' AND started_at IS NOT NULL AND completed_at IS NOT NULL
                THEN extract(epoch FROM completed_at - started_at)::float8 * 1000 END AS d
    FROM jobs WHERE tenant = $1 AND created_at >= now() - make_interval(days => $2)
)";

fn rate(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 * 100.0 / whole as f64 }
}

pub async fn analytics(core: &Core, req: ApiRequest<AnalyticsQuery>) -> ApiResult<Analytics> {
    let days = req.body.days;
    if !DAYS_RANGE.contains(&days) {
        return Err(ApiError::Invalid { field: "days".into(), message: "must be from 1 to 90".into() });
    }
    let pool = &core.store.pool;
    let tenant = req.tenant.as_str();
    let days_i = days as i32;
    let totals = sqlx::query(&format!(
        "{WINDOW} SELECT count(*) AS total,
            count(*) FILTER (WHERE status = 'completed') AS completed,
            count(*) FILTER (WHERE status IN ('failed', 'timed_out')) AS failed,
            avg(d) AS avg,
            percentile_cont(0.5) WITHIN GROUP (ORDER BY d) AS p50,
            percentile_cont(0.9) WITHIN GROUP (ORDER BY d) AS p90,
            percentile_cont(0.99) WITHIN GROUP (ORDER BY d) AS p99
         FROM w"
    ))
    .bind(tenant)
    .bind(days_i)
    .fetch_one(pool)
    .await
    .map_err(StoreError::from)?;
    let count = |name: &str| totals.get::<i64, _>(name).max(0) as u64;
    let ms = |name: &str| totals.get::<Option<f64>, _>(name).unwrap_or(0.0);
    let (total, completed, failed) = (count("total"), count("completed"), count("failed"));
    let ended = completed + failed;

    let by_status: Vec<(String, i64)> =
        sqlx::query_as(&format!("{WINDOW} SELECT status, count(*) FROM w GROUP BY status"))
            .bind(tenant)
            .bind(days_i)
            .fetch_all(pool)
            .await
            .map_err(StoreError::from)?;
    let slowest: Vec<(String, String, f64, i64)> = sqlx::query_as(&format!(
        "{WINDOW} SELECT workflow_id, max(workflow_name), avg(d), count(d) FROM w WHERE d IS NOT NULL
         GROUP BY workflow_id ORDER BY avg(d) DESC, workflow_id LIMIT {SLOWEST}"
    ))
    .bind(tenant)
    .bind(days_i)
    .fetch_all(pool)
    .await
    .map_err(StoreError::from)?;
    let errors: Vec<(String, i64)> = sqlx::query_as(&format!(
        "{WINDOW} SELECT coalesce(error_type, 'unknown'), count(*) FROM w WHERE status IN ('failed', 'timed_out')
         GROUP BY 1 ORDER BY 2 DESC, 1"
    ))
    .bind(tenant)
    .bind(days_i)
    .fetch_all(pool)
    .await
    .map_err(StoreError::from)?;
    let per_workflow: Vec<(String, String, i64)> = sqlx::query_as(&format!(
        "{WINDOW} SELECT workflow_id, max(workflow_name), count(*) FROM w
         GROUP BY workflow_id ORDER BY 3 DESC, 1 LIMIT {PER_WORKFLOW}"
    ))
    .bind(tenant)
    .bind(days_i)
    .fetch_all(pool)
    .await
    .map_err(StoreError::from)?;
    let per_hour: Vec<(OffsetDateTime, i64)> = sqlx::query_as(&format!(
        "{WINDOW} SELECT date_trunc('hour', created_at, 'UTC'), count(*) FROM w GROUP BY 1 ORDER BY 1"
    ))
    .bind(tenant)
    .bind(days_i)
    .fetch_all(pool)
    .await
    .map_err(StoreError::from)?;

    let n = |v: i64| v.max(0) as u64;
    let average = ms("avg");
    Ok(Analytics {
        days,
        total_jobs: total,
        jobs_completed: completed,
        jobs_failed: failed,
        success_rate: rate(completed, ended),
        failure_rate: rate(failed, ended),
        average_duration_ms: average,
        avg_duration_ms: average,
        p50_duration_ms: ms("p50"),
        p90_duration_ms: ms("p90"),
        p99_duration_ms: ms("p99"),
        job_status_distribution: by_status.into_iter().map(|(s, c)| (s, n(c))).collect::<BTreeMap<_, _>>(),
        slowest_workflows: slowest
            .into_iter()
            .map(|(workflow_id, workflow_name, average_duration_ms, runs)| WorkflowDuration {
                workflow_id,
                workflow_name,
                average_duration_ms,
                runs: n(runs),
            })
            .collect(),
        error_distribution: errors
            .into_iter()
            .map(|(error_type, c)| ErrorCount { error_type, count: n(c) })
            .collect(),
        throughput_per_workflow: per_workflow
            .into_iter()
            .map(|(workflow_id, workflow_name, c)| WorkflowThroughput {
                workflow_id,
                workflow_name,
                jobs: n(c),
            })
            .collect(),
        throughput_per_hour: per_hour
            .into_iter()
            .map(|(hour, c)| HourThroughput { hour, jobs: n(c) })
            .collect(),
        self_healing_success_rate: 0.0,
    })
}

/// The Canvas's name for a history row's kind (`job.started` → `job_started`, a robot coming
/// back to `online` → `robot_online`, …), as SQL so the type filter runs in the database.
const CANVAS_TYPE: &str = "CASE
    WHEN h.kind = 'robot.registered' THEN 'robot_online'
    WHEN h.kind = 'robot.status_changed' AND h.data->>'to' = 'online' THEN 'robot_online'
    WHEN h.kind = 'robot.disconnected' THEN 'robot_offline'
    ELSE replace(h.kind, '.', '_') END";

pub async fn activity(core: &Core, req: ApiRequest<ActivityQuery>) -> ApiResult<Activity> {
    let q = &req.body;
    if !ACTIVITY_LIMIT.contains(&q.limit) {
        return Err(ApiError::Invalid { field: "limit".into(), message: "must be from 1 to 200".into() });
    }
    // The window total is counted before the limit applies (`count(*) OVER ()`); the workflow
    // name for the title is joined only onto the rows of the page.
    let rows = sqlx::query(&format!(
        "WITH e AS (
            SELECT h.id, h.kind, h.occurred_at, h.data, h.robot_id, h.job_id, {CANVAS_TYPE} AS type,
                   count(*) OVER () AS total
            FROM job_history h
            WHERE h.tenant = $1 AND ($2::timestamptz IS NULL OR h.occurred_at > $2)
              AND ($3::text IS NULL OR {CANVAS_TYPE} = $3)
            ORDER BY h.occurred_at DESC, h.id DESC LIMIT $4
        )
        SELECT e.*, j.workflow_name FROM e LEFT JOIN jobs j ON j.job_id = e.job_id AND j.tenant = $1
        ORDER BY e.occurred_at DESC, e.id DESC"
    ))
    .bind(req.tenant.as_str())
    .bind(q.since)
    .bind(q.event_type.as_deref())
    .bind(i64::from(q.limit))
    .fetch_all(&core.store.pool)
    .await
    .map_err(StoreError::from)?;
    let total = rows.first().map(|r| r.get::<i64, _>("total").max(0) as u64).unwrap_or(0);
    let events = rows
        .iter()
        .map(|row| {
            let kind: String = row.get("type");
            let job_id: Option<Uuid> = row.get("job_id");
            let robot_id: Option<String> = row.get("robot_id");
            let Json(details): Json<Value> = row.get("data");
            let workflow: Option<String> = row.get("workflow_name");
            let id: i64 = row.get("id");
            ActivityEvent {
                id: id.to_string(),
                title: title(&kind, job_id, robot_id.as_deref(), workflow.as_deref(), &details),
                kind,
                timestamp: row.get("occurred_at"),
                details,
                robot_id,
                job_id: job_id.map(|j| j.to_string()),
            }
        })
        .collect();
    Ok(Activity { events, total })
}

/// A short sentence for people: "Job 0193e2b1 (Invoice sync) completed on r7".
pub fn title(
    kind: &str,
    job: Option<Uuid>,
    robot: Option<&str>,
    workflow: Option<&str>,
    data: &Value,
) -> String {
    let on = |robot: Option<&str>| robot.map(|r| format!(" on {r}")).unwrap_or_default();
    if let Some(job) = job {
        let short: String = job.simple().to_string().chars().take(8).collect();
        let name = workflow.map(|w| format!(" ({w})")).unwrap_or_default();
        let what = match kind {
            "job_started" => format!("started{}", on(robot)),
            "job_completed" => format!("completed{}", on(robot)),
            "job_failed" => format!("failed{}", on(robot)),
            other => other.strip_prefix("job_").unwrap_or(other).replace('_', " "),
        };
        return format!("Job {short}{name} {what}");
    }
    let robot = robot.unwrap_or("?");
    match kind {
        "robot_online" => format!("Robot {robot} is online"),
        "robot_offline" => format!("Robot {robot} went offline"),
        "robot_status_changed" => match data.get("to").and_then(Value::as_str) {
            Some(to) => format!("Robot {robot} is {to}"),
            None => format!("Robot {robot} changed state"),
        },
        "robot_command" => match data.pointer("/command/kind").and_then(Value::as_str) {
            Some(command) => format!("Robot {robot} was told to {command}"),
            None => format!("Robot {robot} was given a command"),
        },
        other => format!("Robot {robot} {}", other.strip_prefix("robot_").unwrap_or(other).replace('_', " ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn titles_are_short_sentences() {
        let job = Uuid::parse_str("0193e2b1-7a3b-7c4d-8e5f-6a7b8c9d0e1f").unwrap();
        let t = |kind, robot, wf| title(kind, Some(job), robot, wf, &json!({}));
        assert_eq!(
            t("job_completed", Some("r7"), Some("Invoice sync")),
            "Job 0193e2b1 (Invoice sync) completed on r7"
        );
        assert_eq!(t("job_started", Some("r7"), None), "Job 0193e2b1 started on r7");
        assert_eq!(t("job_cancel_requested", None, None), "Job 0193e2b1 cancel requested");
        assert_eq!(title("robot_online", None, Some("r1"), None, &json!({})), "Robot r1 is online");
        assert_eq!(title("robot_deleted", None, Some("r1"), None, &json!({})), "Robot r1 deleted");
        let stop = json!({"command": {"kind": "stop", "force": false}});
        assert_eq!(title("robot_command", None, Some("r1"), None, &stop), "Robot r1 was told to stop");
        assert_eq!(rate(1, 4), 25.0);
        assert_eq!(rate(0, 0), 0.0);
    }
}
