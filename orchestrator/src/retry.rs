//! Retrying a job that ended badly: `failed`, `cancelled` or `timed_out` → `pending`.
//!
//! A retry is the job's next attempt under the **same job id** (DESIGN.md: "Retries of a failed
//! job are its next attempt"), not a copy: its history, logs and events stay in one place, and
//! the attempt number keeps fencing reports of the earlier attempts out. Like every transition
//! it is one fenced compare-and-set statement that also writes its history row (`job.retried`),
//! after which the admission pass offers the job as it would a new one.
//!
//! The retried job gets a fresh budget of attempts (`max_attempts = attempt + config`), so a job
//! that used up its attempts on a lost robot can run again, and a fresh rejection list, since
//! the robots that refused it then may accept it now.

use fleet_schemas::JobId;
use fleet_schemas::api::{ApiError, ApiRequest, ApiResult, GetById, JobStatus, Retried};
use sqlx::Row;

use crate::Core;
use crate::leader::fenced;
use crate::store::StoreError;

/// The statuses a job can be retried from.
pub const RETRYABLE: [JobStatus; 3] = [JobStatus::Failed, JobStatus::Cancelled, JobStatus::TimedOut];

pub async fn retry(core: &Core, req: ApiRequest<GetById<JobId>>) -> ApiResult<Retried> {
    if crate::api::past_deadline(&req) {
        return Err(crate::api::deadline_error());
    }
    let epoch = core.leadership.epoch();
    if epoch == 0 {
        return Err(StoreError::NotLeader.into());
    }
    let job_id = req.body.id;
    // `prev` locks the row and remembers the status it had, so the answer can tell "no such
    // job" (no row) from "not retryable" (a row, no change) in the same round trip.
    let sql = format!(
        "WITH prev AS (
            SELECT job_id, status FROM jobs WHERE job_id = $1 AND tenant = $2 FOR UPDATE
        ), j AS (
            UPDATE jobs SET status = 'pending', robot_id = NULL, session_id = NULL, lease_until = NULL,
                completed_at = NULL, error_message = NULL, error_type = NULL, output = NULL,
                cancel_requested = false, rejections = '[]', waiting_reason = NULL,
                offer_subject = NULL, offer_seq = NULL, progress = 0, current_node = NULL,
                max_attempts = jobs.attempt + $3, history_seq = history_seq + 1
            FROM prev
            WHERE jobs.job_id = prev.job_id AND prev.status IN ('failed', 'cancelled', 'timed_out') AND {}
            RETURNING jobs.tenant, jobs.job_id, jobs.history_seq, jobs.attempt
        ), h AS (
            INSERT INTO job_history (tenant, job_id, seq, kind, attempt, data, actor)
            SELECT j.tenant, j.job_id, j.history_seq, 'job.retried', j.attempt,
                   jsonb_build_object('previous_status', prev.status, 'next_attempt', j.attempt + 1), $5
            FROM j, prev
        )
        SELECT prev.status, (SELECT attempt FROM j) AS attempt FROM prev",
        fenced(4)
    );
    let row = sqlx::query(&sql)
        .bind(job_id.0)
        .bind(req.tenant.as_str())
        .bind(core.config.max_attempts)
        .bind(epoch)
        .bind(crate::audit::actor_of(&req))
        .fetch_optional(&core.store.pool)
        .await
        .map_err(StoreError::from)?;
    let Some(row) = row else { return Err(ApiError::NotFound { what: "job".into() }) };
    let previous = JobStatus::parse(row.get::<String, _>("status").as_str()).unwrap_or(JobStatus::Pending);
    let attempt: Option<i32> = row.get("attempt");
    let Some(attempt) = attempt else {
        if RETRYABLE.contains(&previous) {
            // Retryable but unchanged: only a lost fence does that.
            return Err(StoreError::NotLeader.into());
        }
        return Err(ApiError::Conflict {
            message: format!(
                "job is {}; only failed, cancelled or timed-out jobs can be retried",
                previous.as_str()
            ),
        });
    };
    core.admission.reset();
    core.wake_admission.notify_one();
    core.wake_relay.notify_one();
    tracing::info!(%job_id, tenant = %req.tenant, from = previous.as_str(), next_attempt = attempt + 1, "job retried");
    Ok(Retried {
        job_id,
        new_job_id: job_id,
        original_job_id: job_id,
        previous_status: previous,
        status: JobStatus::Pending,
        next_attempt: attempt + 1,
        message: format!(
            "job {job_id} will run again as attempt {} (it was {})",
            attempt + 1,
            previous.as_str()
        ),
    })
}
