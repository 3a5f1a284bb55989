//! Jobs from submission to offer: the insert of a submission, admission to a class and the
//! offers' bookkeeping (stream sequences, the watchdog's checks, recalls), and reads of jobs.

use std::time::Duration;

use fleet_schemas::api::{JobStatus, JobView};
use fleet_schemas::{JobId, TenantId};
use serde_json::Value;
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    Inserted, NewJob, PendingJob, Placement, QueuedOffer, Store, StoreError, StoreResult, ToOffer, batch,
    lock_in_order, secs, uuid,
};
use crate::leader::fenced;

impl Store {
    // ----- submit -------------------------------------------------------------------------

    /// Insert a job, `queued` with offer 1 or `pending` with a reason, with its history rows.
    /// With an idempotency key already used in this tenant, the earlier job is returned.
    /// Concurrent submissions share one statement.
    pub async fn insert_job(&self, job: &NewJob, placement: &Placement) -> StoreResult<Inserted> {
        let request = (job.clone(), placement.clone());
        self.batches()?.insert.call(request).await.map_err(|_| StoreError::NotLeader)?
    }

    /// [`Store::insert_job`] alone: for a submission the batch did not insert (its idempotency
    /// key was taken), which finds the earlier job.
    pub(super) async fn insert_job_one(&self, job: &NewJob, placement: &Placement) -> StoreResult<Inserted> {
        let epoch = self.epoch()?;
        let request = (job.clone(), placement.clone());
        if let Some(created_at) = self.insert_statement(&[&request]).await?.get(&job.job_id) {
            return Ok(batch::inserted(job, placement, *created_at));
        }
        if let Some(key) = &job.idempotency_key {
            let row = sqlx::query(
                "SELECT job_id, status, offer_no, waiting_reason, created_at, offer_subject,
                        created_at < now() - interval '24 hours' AS stale
                 FROM jobs WHERE tenant = $1 AND idempotency_key = $2",
            )
            .bind(job.tenant.as_str())
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
            if let Some(row) = row.as_ref().filter(|r| r.get::<bool, _>("stale")) {
                // A key is honoured for 24 hours: an older job lets go of it and this
                // submission becomes a new job (once; a concurrent reuse finds the new one).
                let old: Uuid = row.get("job_id");
                let sql =
                    format!("UPDATE jobs SET idempotency_key = NULL WHERE job_id = $1 AND {}", fenced(2));
                sqlx::query(&sql).bind(old).bind(epoch).execute(&self.pool).await?;
                return Box::pin(self.insert_job_one(job, placement)).await;
            }
            if let Some(row) = row {
                let status: String = row.get("status");
                return Ok(Inserted {
                    job_id: JobId(row.get("job_id")),
                    status: JobStatus::parse(&status).unwrap_or(JobStatus::Pending),
                    offer_no: row.get("offer_no"),
                    waiting_reason: row.get("waiting_reason"),
                    created_at: row.get("created_at"),
                    offer_subject: None,
                    existing: true,
                });
            }
        }
        Err(StoreError::NotLeader)
    }

    /// Remember the stream sequence of an offer, for the watchdog.
    pub async fn record_offer_seqs(&self, seqs: &[(JobId, i32, u64)]) -> StoreResult<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = seqs.iter().map(|s| s.0.0).collect();
        let offers: Vec<i32> = seqs.iter().map(|s| s.1).collect();
        let nums: Vec<i64> = seqs.iter().map(|s| s.2 as i64).collect();
        sqlx::query(&format!(
            "WITH {}
                UPDATE jobs SET offer_seq = u.seq
                FROM unnest($1::uuid[], $2::int[], $3::bigint[]) AS u(job_id, offer_no, seq), l
                WHERE l.job_id = u.job_id AND jobs.job_id = l.job_id AND l.offer_no = u.offer_no",
            lock_in_order(1)
        ))
        .bind(ids)
        .bind(offers)
        .bind(nums)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    // ----- admission ----------------------------------------------------------------------

    /// Pending jobs in admission order (highest priority first, then oldest), from `from` on.
    pub async fn pending_jobs(
        &self,
        from: Option<&crate::sweeper::PendingKey>,
        limit: i64,
    ) -> StoreResult<Vec<PendingJob>> {
        const COLUMNS: &str =
            "job_id, tenant, requires, target_robot_id, waiting_reason, priority, created_at, rejections";
        let Some(from) = from else {
            return Ok(sqlx::query_as(&format!(
                "SELECT {COLUMNS} FROM jobs
                 WHERE status = 'pending' ORDER BY priority DESC, created_at, job_id LIMIT $1"
            ))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?);
        };
        // The rest of the cursor's priority, then the lower priorities: two index ranges, so
        // the entries before the cursor are never read.
        Ok(sqlx::query_as(&format!(
            "(SELECT {COLUMNS} FROM jobs
              WHERE status = 'pending' AND priority = $2 AND created_at >= $3
                AND (created_at, job_id) >= ($3, $4)
              ORDER BY created_at, job_id LIMIT $1)
             UNION ALL
             (SELECT {COLUMNS} FROM jobs
              WHERE status = 'pending' AND priority < $2 ORDER BY priority DESC, created_at, job_id LIMIT $1)
             LIMIT $1"
        ))
        .bind(limit)
        .bind(from.priority)
        .bind(from.created_at)
        .bind(from.job_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Pending jobs of a tenant grouped by what they require.
    pub async fn pending_requirements(&self, tenant: &TenantId) -> StoreResult<Vec<(Vec<String>, i64)>> {
        Ok(sqlx::query_as(
            "SELECT requires, count(*) FROM jobs WHERE tenant = $1 AND status = 'pending' GROUP BY requires",
        )
        .bind(tenant.as_str())
        .fetch_all(&self.pool)
        .await?)
    }

    /// `pending` → `queued` with the next offer number, for many jobs in one statement:
    /// `(job, subject, target)` each. Returns the offers of the jobs that moved (a job no longer
    /// pending is left alone).
    pub async fn admit(&self, admits: &[(JobId, String, String)]) -> StoreResult<Vec<ToOffer>> {
        if admits.is_empty() {
            return Ok(Vec::new());
        }
        let epoch = self.epoch()?;
        let sql = format!(
            "WITH u AS (
                SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[]) AS u(job_id, subject, target)
            ), {}, j AS (
                UPDATE jobs SET status = 'queued', offer_no = jobs.offer_no + 1, offer_subject = u.subject,
                    offered_at = now(), offer_seq = NULL, waiting_reason = NULL,
                    history_seq = jobs.history_seq + 1
                FROM u, l
                WHERE l.job_id = u.job_id AND jobs.job_id = l.job_id AND l.status = 'pending' AND {}
                RETURNING jobs.job_id, jobs.tenant, jobs.offer_no, jobs.history_seq, jobs.attempt, u.target
            ), h AS (
                INSERT INTO job_history (tenant, job_id, seq, kind, attempt, data)
                SELECT tenant, job_id, history_seq, 'job.assigned', attempt,
                       jsonb_build_object('offer_no', offer_no, 'target', target) FROM j
            )
            SELECT job_id, offer_no FROM j",
            lock_in_order(1),
            fenced(4)
        );
        let rows: Vec<(Uuid, i32)> = sqlx::query_as(&sql)
            .bind(admits.iter().map(|a| a.0.0).collect::<Vec<_>>())
            .bind(admits.iter().map(|a| a.1.as_str()).collect::<Vec<_>>())
            .bind(admits.iter().map(|a| a.2.as_str()).collect::<Vec<_>>())
            .bind(epoch)
            .fetch_all(&self.pool)
            .await?;
        let offer_nos: std::collections::HashMap<Uuid, i32> = rows.into_iter().collect();
        Ok(admits
            .iter()
            .filter_map(|(job_id, subject, _)| {
                let offer_no = *offer_nos.get(&job_id.0)?;
                Some(ToOffer { job_id: *job_id, offer_no, subject: subject.clone() })
            })
            .collect())
    }

    /// Update why pending jobs wait (not a state change: no history row).
    pub async fn set_waiting_reasons(&self, reasons: &[(Uuid, String)]) -> StoreResult<()> {
        if reasons.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = reasons.iter().map(|r| r.0).collect();
        let texts: Vec<String> = reasons.iter().map(|r| r.1.clone()).collect();
        sqlx::query(&format!(
            "WITH {}
                UPDATE jobs SET waiting_reason = u.reason
                FROM unnest($1::uuid[], $2::text[]) AS u(job_id, reason), l
                WHERE l.job_id = u.job_id AND jobs.job_id = l.job_id AND l.status = 'pending'",
            lock_in_order(1)
        ))
        .bind(ids)
        .bind(texts)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// What is in flight, to rebuild the leader's bookkeeping ([`crate::fleet::Snapshot`]).
    pub async fn snapshot(&self) -> StoreResult<crate::fleet::Snapshot> {
        let running: Vec<(String, String, Uuid)> = sqlx::query_as(
            "SELECT tenant, robot_id, job_id FROM jobs WHERE status = 'running' AND robot_id IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        let offered: Vec<(String, String, i64, i16)> = sqlx::query_as(
            "SELECT tenant, offer_subject, count(*), min(priority) FROM jobs
             WHERE status = 'queued' AND offer_subject IS NOT NULL GROUP BY tenant, offer_subject",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(crate::fleet::Snapshot {
            running: running.into_iter().map(|(t, r, j)| (t, r, JobId(j))).collect(),
            lowest: offered.iter().map(|(t, s, _, p)| (t.clone(), s.clone(), *p)).collect(),
            offered: offered.into_iter().map(|(t, s, n, _)| (t, s, n)).collect(),
        })
    }

    /// `pending` → `failed` (every eligible robot rejected it).
    pub async fn fail_pending(&self, job_id: JobId, message: &str, error_type: &str) -> StoreResult<bool> {
        let epoch = self.epoch()?;
        let sql = format!(
            "WITH j AS (
                UPDATE jobs SET status = 'failed', error_message = $2, error_type = $3, completed_at = now(),
                    waiting_reason = NULL, history_seq = history_seq + 1
                WHERE job_id = $1 AND status = 'pending' AND {}
                RETURNING tenant, job_id, history_seq, attempt
            ), h AS (
                INSERT INTO job_history (tenant, job_id, seq, kind, attempt, data)
                SELECT tenant, job_id, history_seq, 'job.failed', attempt, jsonb_build_object('error', $2::text) FROM j
            )
            SELECT count(*) FROM j",
            fenced(4)
        );
        let (n,): (i64,) = sqlx::query_as(&sql)
            .bind(uuid(job_id))
            .bind(message)
            .bind(error_type)
            .bind(epoch)
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    /// Queued jobs whose offer may be missing: never recorded in the stream (the orchestrator
    /// stopped between commit and publish) or queued for longer than `older_than`.
    pub async fn stale_offers(
        &self,
        older_than: Duration,
        limit: i64,
    ) -> StoreResult<Vec<(JobId, i32, String, Option<i64>)>> {
        let rows = sqlx::query(
            "SELECT job_id, offer_no, offer_subject, offer_seq FROM jobs
             WHERE status = 'queued' AND offered_at < now() - make_interval(secs => $1)
             ORDER BY offered_at LIMIT $2",
        )
        .bind(secs(older_than))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (JobId(r.get("job_id")), r.get("offer_no"), r.get("offer_subject"), r.get("offer_seq")))
            .collect())
    }

    /// The stream sequence of an offer, if recorded.
    pub async fn offer_seq(&self, job_id: JobId, offer_no: i32) -> StoreResult<Option<u64>> {
        let seq: Option<Option<i64>> =
            sqlx::query_scalar("SELECT offer_seq FROM jobs WHERE job_id = $1 AND offer_no = $2")
                .bind(uuid(job_id))
                .bind(offer_no)
                .fetch_optional(&self.pool)
                .await?;
        Ok(seq.flatten().map(|s| s as u64))
    }

    /// Queued jobs whose offer sequence is unknown (publish may not have happened).
    pub async fn unrecorded_offers(&self, limit: i64) -> StoreResult<Vec<ToOffer>> {
        self.queued_where(
            "SELECT job_id, offer_no, offer_subject FROM jobs
             WHERE status = 'queued' AND offer_seq IS NULL ORDER BY offered_at LIMIT $1",
            limit,
        )
        .await
    }

    /// Every queued job's current offer, recorded or not: after `FLEET_JOBS` was recreated none
    /// of them is in the stream any more, and their recorded sequences name other messages.
    pub async fn all_queued_offers(&self, limit: i64) -> StoreResult<Vec<ToOffer>> {
        self.queued_where(
            "SELECT job_id, offer_no, offer_subject FROM jobs
             WHERE status = 'queued' ORDER BY offered_at LIMIT $1",
            limit,
        )
        .await
    }

    async fn queued_where(&self, sql: &'static str, limit: i64) -> StoreResult<Vec<ToOffer>> {
        let rows = sqlx::query(sql).bind(limit).fetch_all(&self.pool).await?;
        Ok(rows
            .into_iter()
            .map(|r| ToOffer {
                job_id: JobId(r.get("job_id")),
                offer_no: r.get("offer_no"),
                subject: r.get("offer_subject"),
            })
            .collect())
    }

    /// Unclaimed offers of a tenant on `subjects`, with their priorities (to find the ones a
    /// waiting job outranks). Only queued jobs are read, a few per class.
    pub async fn queued_offers_on(
        &self,
        tenant: &TenantId,
        subjects: &[String],
    ) -> StoreResult<Vec<QueuedOffer>> {
        let rows = sqlx::query(
            "SELECT job_id, offer_no, offer_subject, offer_seq, priority FROM jobs
             WHERE status = 'queued' AND tenant = $1 AND offer_subject = ANY($2)",
        )
        .bind(tenant.as_str())
        .bind(subjects)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| QueuedOffer {
                offer: ToOffer {
                    job_id: JobId(r.get("job_id")),
                    offer_no: r.get("offer_no"),
                    subject: r.get("offer_subject"),
                },
                seq: r.get::<Option<i64>, _>("offer_seq").map(|s| s as u64),
                priority: r.get("priority"),
            })
            .collect())
    }

    /// `queued` (offer `$o`) → `pending`: the offer is gone or no longer wanted.
    pub async fn recall(&self, job_id: JobId, offer_no: i32, reason: &str) -> StoreResult<bool> {
        let epoch = self.epoch()?;
        let sql = format!(
            "WITH j AS (
                UPDATE jobs SET status = 'pending', offer_subject = NULL, offer_seq = NULL,
                    history_seq = history_seq + 1
                WHERE job_id = $1 AND status = 'queued' AND offer_no = $2 AND {}
                RETURNING job_id, tenant, history_seq, attempt
            ), h AS (
                INSERT INTO job_history (tenant, job_id, seq, kind, attempt, data)
                SELECT tenant, job_id, history_seq, 'job.recalled', attempt, jsonb_build_object('reason', $4::text) FROM j
            )
            SELECT count(*) FROM j",
            fenced(3)
        );
        let (n,): (i64,) = sqlx::query_as(&sql)
            .bind(uuid(job_id))
            .bind(offer_no)
            .bind(epoch)
            .bind(reason)
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    // ----- reads --------------------------------------------------------------------------

    pub async fn get_job(&self, tenant: &TenantId, job_id: JobId) -> StoreResult<Option<JobView>> {
        let row = sqlx::query(&format!("{JOB_SELECT} WHERE j.tenant = $1 AND j.job_id = $2"))
            .bind(tenant.as_str())
            .bind(uuid(job_id))
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(job_view))
    }
}

pub(crate) const JOB_SELECT: &str = "SELECT j.*, r.name AS robot_name FROM jobs j
    LEFT JOIN robots r ON r.tenant = j.tenant AND r.robot_id = j.robot_id";

pub(crate) fn job_view(row: &PgRow) -> JobView {
    let status: String = row.get("status");
    let status = JobStatus::parse(&status).unwrap_or(JobStatus::Pending);
    let started_at: Option<OffsetDateTime> = row.get("started_at");
    let completed_at: Option<OffsetDateTime> = row.get("completed_at");
    let duration_ms = match (started_at, completed_at) {
        (Some(s), Some(c)) => Some((c - s).whole_milliseconds() as i64),
        _ => None,
    };
    let attempt: i32 = row.get("attempt");
    let output: Option<Json<Value>> = row.get("output");
    let request_id: Option<Uuid> = row.get("request_id");
    JobView {
        job_id: JobId(row.get("job_id")),
        workflow_id: row.get("workflow_id"),
        workflow_name: row.get("workflow_name"),
        status,
        robot_id: row.get("robot_id"),
        robot_name: row.get("robot_name"),
        attempt,
        priority: row.get("priority"),
        required_capabilities: row.get("requires"),
        progress: row.get("progress"),
        current_node: row.get("current_node"),
        created_at: row.get("created_at"),
        claimed_at: row.get("claimed_at"),
        started_at,
        completed_at,
        duration_ms,
        output: output.map(|o| o.0),
        error_message: row.get("error_message"),
        error_type: row.get("error_type"),
        waiting_reason: if matches!(status, JobStatus::Pending) { row.get("waiting_reason") } else { None },
        retry_count: (attempt - 1).max(0),
        target_robot_id: row.get("target_robot_id"),
        trigger_type: row.get("trigger_type"),
        execution_mode: row.get("execution_mode"),
        request_id: request_id.map(|u| u.to_string()),
    }
}
