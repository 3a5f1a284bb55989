//! The job list, a page at a time (`Endpoint::ListJobs`).
//!
//! Keyset pagination on the list's own order, newest first (`created_at DESC, job_id DESC`):
//! a page continues strictly after the (`created_at`, `job_id`) of the previous page's last
//! job, so pages never repeat or skip a job however many jobs are submitted meanwhile (new ones
//! sort before the first page), and every page costs one index range scan on
//! `jobs_tenant_created`, however deep it is, unlike `OFFSET`.
//!
//! With `peek_next` the answer holds one job more than `limit` when there is one, so the
//! caller learns that another page exists without a second query.

use fleet_schemas::RobotId;
use fleet_schemas::api::{ApiError, ApiRequest, ApiResult, JobStatus, JobView, ListJobs};

use crate::Core;
use crate::store::{JOB_SELECT, StoreError, job_view};

/// Bounds of a page.
pub const LIMIT_RANGE: std::ops::RangeInclusive<u32> = 1..=500;

pub async fn list(core: &Core, req: ApiRequest<ListJobs>) -> ApiResult<Vec<JobView>> {
    let q = &req.body;
    if !LIMIT_RANGE.contains(&q.limit) {
        return Err(ApiError::Invalid { field: "limit".into(), message: "must be from 1 to 500".into() });
    }
    let after = match &q.cursor {
        None => None,
        // No job was created before 1970; PostgreSQL cannot even hold times before 4713 BC.
        Some(c) => Some((
            c.created_at().filter(|t| t.unix_timestamp() >= 0).ok_or_else(|| ApiError::Invalid {
                field: "cursor".into(),
                message: "not a cursor of this list".into(),
            })?,
            c.job_id.0,
        )),
    };
    let fetch = i64::from(q.limit) + i64::from(q.peek_next);
    let rows = sqlx::query(&format!(
        "{JOB_SELECT}
         WHERE j.tenant = $1
           AND ($2::text IS NULL OR j.status = $2)
           AND ($3::text IS NULL OR j.workflow_id = $3)
           AND ($4::text IS NULL OR j.robot_id = $4)
           AND ($5::timestamptz IS NULL OR (j.created_at, j.job_id) < ($5, $6::uuid))
         ORDER BY j.created_at DESC, j.job_id DESC LIMIT $7"
    ))
    .bind(req.tenant.as_str())
    .bind(q.status.map(JobStatus::as_str))
    .bind(q.workflow_id.as_deref())
    .bind(q.robot_id.as_ref().map(RobotId::as_str))
    .bind(after.map(|a| a.0))
    .bind(after.map(|a| a.1))
    .bind(fetch)
    .fetch_all(&core.store.pool)
    .await
    .map_err(StoreError::from)?;
    Ok(rows.iter().map(job_view).collect())
}
