//! The job state machine of DESIGN.md as compare-and-set statements on PostgreSQL.
//!
//! Each transition is **one statement**: the compare-and-set on `jobs`, the leader fence (the
//! epoch check of [`crate::leader::fenced`]) and the insert of the history row all sit in one
//! `WITH … UPDATE … INSERT` statement. So a transition costs one round trip and one commit, is
//! atomic without an explicit transaction, and a deposed leader's statement simply matches no
//! row. Reports are fenced by the offer number (claims) or the attempt (everything after), so a
//! report from a superseded attempt is refused instead of applied.

use std::sync::Arc;
use std::time::Duration;

use fleet_schemas::api::{ApiError, FleetSummary, JobStatus, JobView, RobotStatus, RobotView};
use fleet_schemas::robot::{RobotRunState, RunOutcome};
use fleet_schemas::workflow::WorkflowFormat;
use fleet_schemas::{JobId, RequestId, RobotId, SessionId, TenantId};
use serde_json::{Value, json};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{FromRow, PgPool, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::leader::{Leadership, fenced};

mod batch;

/// A CTE `l` that locks the jobs whose ids are in parameter `$param` (a `uuid[]`) in job id
/// order and returns what compare-and-set conditions test. Every statement that changes several
/// jobs takes its locks this way, so two of them never wait for each other in opposite orders (a
/// deadlock, which PostgreSQL breaks only after `deadlock_timeout`).
///
/// The statement then updates `FROM l WHERE jobs.job_id = l.job_id` and tests its conditions on
/// `l` (the locked, newest version of each row), never on `jobs.status`: a status test on
/// `jobs` lets the planner pick a partial index on that status (`jobs_pending_order`,
/// `jobs_queued_offered`), which it believes small and then walks whole (fleet-bench: a thousand
/// index entries read per job), where the primary key finds each row directly.
fn lock_in_order(param: usize) -> String {
    format!(
        "l AS MATERIALIZED (SELECT job_id, tenant, status, offer_no, attempt, robot_id FROM jobs \
         WHERE job_id = ANY(${param}::uuid[]) ORDER BY job_id FOR UPDATE)"
    )
}

/// Store failures, decided once: the database is unreachable (retry), or we are not the leader
/// (retry elsewhere), or a bug.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("this orchestrator is not the active leader")]
    NotLeader,
    #[error("database error: {0}")]
    Other(#[source] sqlx::Error),
    #[error("the request's deadline passed before it could be committed")]
    PastDeadline,
}

impl StoreError {
    /// The same failure for another request of a batch that failed as a whole.
    pub fn share(&self) -> StoreError {
        match self {
            StoreError::Unavailable(e) => StoreError::Unavailable(sqlx::Error::Protocol(e.to_string())),
            StoreError::NotLeader => StoreError::NotLeader,
            StoreError::Other(e) => StoreError::Other(sqlx::Error::Protocol(e.to_string())),
            StoreError::PastDeadline => StoreError::PastDeadline,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_) => StoreError::Unavailable(e),
            sqlx::Error::Database(db) => {
                // Class 08 (connection), 57P (shutdown / cannot connect now), 53 (resources),
                // 40 (deadlock or serialization failure: the statement may simply run again).
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                if ["08", "57P", "53", "40"].iter().any(|class| code.starts_with(class)) {
                    StoreError::Unavailable(e)
                } else {
                    StoreError::Other(e)
                }
            }
            _ => StoreError::Other(e),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => {
                ApiError::Unavailable { message: "the database is unavailable".into(), retry_after_s: 2 }
            }
            StoreError::NotLeader => ApiError::Unavailable {
                message: "this orchestrator is not the active leader".into(),
                retry_after_s: 1,
            },
            StoreError::Other(e) => {
                tracing::error!(error = %e, "database error");
                ApiError::Internal { message: "unexpected database error".into() }
            }
            StoreError::PastDeadline => crate::api::deadline_error(),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Where a new job goes: straight to an offer, or pending with a reason.
#[derive(Debug, Clone)]
pub enum Placement {
    Offer { subject: String, target: String },
    Pending { reason: String },
}

impl Placement {
    /// The columns a new job gets from its placement: status, offer subject, waiting reason.
    fn columns(&self) -> (&'static str, Option<&str>, Option<&str>) {
        match self {
            Placement::Offer { subject, .. } => ("queued", Some(subject.as_str()), None),
            Placement::Pending { reason } => ("pending", None, Some(reason.as_str())),
        }
    }
}

/// A validated submission, ready to insert.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub job_id: JobId,
    pub tenant: TenantId,
    pub workflow_id: String,
    pub workflow_name: String,
    pub format: WorkflowFormat,
    pub workflow: Value,
    pub variables: serde_json::Map<String, Value>,
    pub metadata: serde_json::Map<String, Value>,
    pub requires: Vec<String>,
    pub priority: i16,
    pub trigger_type: String,
    pub execution_mode: String,
    pub target_robot_id: Option<RobotId>,
    pub timeout_s: Option<u64>,
    pub max_attempts: i32,
    pub request_id: RequestId,
    pub idempotency_key: Option<String>,
    /// Not committed after this (Unix milliseconds): the gateway has stopped waiting.
    pub deadline_unix_ms: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct Inserted {
    pub job_id: JobId,
    pub status: JobStatus,
    pub offer_no: i32,
    pub waiting_reason: Option<String>,
    pub created_at: OffsetDateTime,
    /// Where the offer goes (when queued).
    pub offer_subject: Option<String>,
    /// True when an earlier submission with the same idempotency key was returned.
    pub existing: bool,
}

/// What a claim hands to the robot.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub attempt: i32,
    /// Where the claimed offer was (its place in the bookkeeping is freed).
    pub offer_subject: Option<String>,
    pub format: String,
    pub workflow: Value,
    pub variables: serde_json::Map<String, Value>,
    pub timeout_s: Option<i64>,
    pub workflow_name: String,
}

/// An answer to a robot report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<T> {
    Accepted(T),
    Refused(String),
}

/// What giving a job back did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GivenBack {
    /// The job failed (too many rejections) instead of going back to pending.
    pub failed: bool,
    /// The subject of the offer it had, when it was given back before a claim.
    pub offered_on: Option<String>,
}

/// A job that must be offered (again).
#[derive(Debug, Clone)]
pub struct ToOffer {
    pub job_id: JobId,
    pub offer_no: i32,
    pub subject: String,
}

/// A pending job waiting for admission.
#[derive(Debug, Clone, FromRow)]
pub struct PendingJob {
    pub job_id: Uuid,
    pub tenant: String,
    pub requires: Vec<String>,
    pub target_robot_id: Option<String>,
    pub waiting_reason: Option<String>,
    pub priority: i16,
    pub created_at: OffsetDateTime,
    /// `[{"robot_id", "reason", "at"}]` of the robots that rejected it.
    pub rejections: Json<Vec<Rejection>>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct Rejection {
    pub robot_id: String,
    pub reason: String,
}

#[derive(Clone)]
pub struct Store {
    pub pool: PgPool,
    /// The batch writers' own connections (plans cached; see `crate::writer_pool`).
    writer: PgPool,
    leadership: Arc<Leadership>,
    /// The batch writers of the hot path (absent only inside the writers' own copies).
    batches: Option<Arc<batch::Batches>>,
}

fn uuid(id: JobId) -> Uuid {
    id.0
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Store {
    /// A store with its batch writers (spawned on the current runtime).
    pub fn new(pool: PgPool, writer: PgPool, leadership: Arc<Leadership>) -> Self {
        let base = Self { pool, writer, leadership, batches: None };
        let batches = Arc::new(batch::Batches::spawn(&base));
        Self { batches: Some(batches), ..base }
    }

    /// The batch writers' connections, for other key-only statements of the hot path (the
    /// event relay).
    pub fn writer(&self) -> &PgPool {
        &self.writer
    }

    /// Close both pools (at shutdown).
    pub async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }

    fn batches(&self) -> StoreResult<&batch::Batches> {
        // Only the writers' own copies lack them, and those never call the batched methods.
        self.batches.as_deref().ok_or(StoreError::NotLeader)
    }

    fn epoch(&self) -> StoreResult<i64> {
        let e = self.leadership.epoch();
        if e == 0 { Err(StoreError::NotLeader) } else { Ok(e) }
    }

    /// Is the fence still ours? Used to tell "not the leader" from "no such row".
    async fn check_fence(&self, epoch: i64) -> StoreResult<()> {
        let ok: bool =
            sqlx::query_scalar(&format!("SELECT {}", fenced(1))).bind(epoch).fetch_one(&self.pool).await?;
        if ok { Ok(()) } else { Err(StoreError::NotLeader) }
    }

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
    async fn insert_job_one(&self, job: &NewJob, placement: &Placement) -> StoreResult<Inserted> {
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
        let offered: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT tenant, offer_subject, count(*) FROM jobs
             WHERE status = 'queued' AND offer_subject IS NOT NULL GROUP BY tenant, offer_subject",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(crate::fleet::Snapshot {
            running: running.into_iter().map(|(t, r, j)| (t, r, JobId(j))).collect(),
            offered,
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
        let rows = sqlx::query(
            "SELECT job_id, offer_no, offer_subject FROM jobs
             WHERE status = 'queued' AND offer_seq IS NULL ORDER BY offered_at LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| ToOffer {
                job_id: JobId(r.get("job_id")),
                offer_no: r.get("offer_no"),
                subject: r.get("offer_subject"),
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

    // ----- robot reports ------------------------------------------------------------------

    /// `queued` (offer `$o`) → `running`, attempt + 1, lease. Idempotent for the same robot and
    /// session. Concurrent claims share one statement.
    pub async fn claim(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
        session: SessionId,
        job_id: JobId,
        offer_no: i32,
        lease: Duration,
    ) -> StoreResult<Verdict<Claimed>> {
        let request = batch::ClaimRequest {
            tenant: tenant.clone(),
            robot: robot.clone(),
            session,
            job_id,
            offer_no,
            lease,
        };
        self.batches()?.claim.call(request).await.map_err(|_| StoreError::NotLeader)?
    }

    /// A claim the batch statement did not apply: a repeat of our own claim, or refused.
    async fn claim_settle(&self, req: &batch::ClaimRequest) -> StoreResult<Verdict<Claimed>> {
        let epoch = self.epoch()?;
        let batch::ClaimRequest { tenant, robot, session, job_id, offer_no, lease } = req;
        let (session, job_id, offer_no, lease) = (*session, *job_id, *offer_no, *lease);
        // Not claimed: a repeat of our own claim, or refused. Read the job to tell.
        let row = sqlx::query(
            "SELECT status, offer_no, robot_id, session_id, attempt, format, workflow, variables, timeout_s,
                    workflow_name, NULL::text AS offer_subject
             FROM jobs WHERE job_id = $1 AND tenant = $2",
        )
        .bind(uuid(job_id))
        .bind(tenant.as_str())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(Verdict::Refused("no such job".into())) };
        let status: String = row.get("status");
        let same_offer = row.get::<i32, _>("offer_no") == offer_no;
        let ours = row.get::<Option<String>, _>("robot_id").as_deref() == Some(robot.as_str())
            && row.get::<Option<Uuid>, _>("session_id") == Some(session.0);
        if status == "running" && same_offer && ours {
            // Re-extend the lease: the robot is (again) about to run it.
            self.renew(tenant, session, job_id, row.get("attempt"), lease).await?;
            return Ok(Verdict::Accepted(claimed(&row)));
        }
        self.check_fence(epoch).await?;
        let reason = match status.as_str() {
            "queued" | "pending" if !same_offer => "offer superseded by a newer one".to_owned(),
            "running" => "already claimed".to_owned(),
            s => format!("job is {s}"),
        };
        Ok(Verdict::Refused(reason))
    }

    /// Extend the lease of a running attempt; the answer says whether a cancel was requested.
    pub async fn renew(
        &self,
        tenant: &TenantId,
        session: SessionId,
        job_id: JobId,
        attempt: i32,
        lease: Duration,
    ) -> StoreResult<Verdict<bool>> {
        let epoch = self.epoch()?;
        let sql = format!(
            "UPDATE jobs SET lease_until = now() + make_interval(secs => $5)
             WHERE job_id = $1 AND tenant = $2 AND status = 'running' AND attempt = $3 AND session_id = $4 AND {}
             RETURNING cancel_requested",
            fenced(6)
        );
        let row: Option<(bool,)> = sqlx::query_as(&sql)
            .bind(uuid(job_id))
            .bind(tenant.as_str())
            .bind(attempt)
            .bind(session.0)
            .bind(secs(lease))
            .bind(epoch)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some((cancel,)) => Ok(Verdict::Accepted(cancel)),
            None => {
                self.check_fence(epoch).await?;
                Ok(Verdict::Refused("this attempt no longer owns the job".into()))
            }
        }
    }

    /// `running` (attempt `$a`) → a terminal status. Idempotent for the same attempt.
    /// Concurrent completions share one statement.
    #[allow(clippy::too_many_arguments)]
    pub async fn complete(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
        job_id: JobId,
        attempt: i32,
        outcome: RunOutcome,
        output: &Value,
        error: Option<&str>,
        failed_step: Option<&str>,
    ) -> StoreResult<Verdict<()>> {
        let request = batch::CompleteRequest {
            tenant: tenant.clone(),
            robot: robot.clone(),
            job_id,
            attempt,
            outcome,
            output: output.to_string(),
            error: error.map(str::to_owned),
            failed_step: failed_step.map(str::to_owned),
        };
        self.batches()?.complete.call(request).await.map_err(|_| StoreError::NotLeader)?
    }

    /// A completion the batch statement did not apply: a repeat of one applied, or refused.
    async fn complete_settle(&self, req: &batch::CompleteRequest) -> StoreResult<Verdict<()>> {
        let epoch = self.epoch()?;
        let batch::CompleteRequest { tenant, robot, job_id, attempt, outcome, .. } = req;
        let (job_id, attempt) = (*job_id, *attempt);
        let (status, _, _) = batch::outcome_columns(*outcome);
        let row: Option<(String, i32, Option<String>)> =
            sqlx::query_as("SELECT status, attempt, robot_id FROM jobs WHERE job_id = $1 AND tenant = $2")
                .bind(uuid(job_id))
                .bind(tenant.as_str())
                .fetch_optional(&self.pool)
                .await?;
        match row {
            None => Ok(Verdict::Refused("no such job".into())),
            Some((s, a, r)) if s == status && a == attempt && r.as_deref() == Some(robot.as_str()) => {
                Ok(Verdict::Accepted(()))
            }
            Some((s, a, _)) => {
                self.check_fence(epoch).await?;
                Ok(Verdict::Refused(format!("attempt {attempt} is superseded (job is {s}, attempt {a})")))
            }
        }
    }

    /// A running attempt hands its job back (`running` → `pending`), or a robot rejects an
    /// offer (`queued` → `pending`). Returns whether the job moved. `max_rejections` reached
    /// fails the job with the list of rejections.
    #[allow(clippy::too_many_arguments)]
    pub async fn give_back(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
        job_id: JobId,
        offer_no: Option<i32>,
        attempt: Option<i32>,
        reason: &str,
        rejection: bool,
        max_rejections: i32,
    ) -> StoreResult<Verdict<GivenBack>> {
        let epoch = self.epoch()?;
        let rejection_entry = json!([{ "robot_id": robot, "reason": reason, "at": OffsetDateTime::now_utc().unix_timestamp() }]);
        let sql = format!(
            "WITH prev AS (
                SELECT job_id, status AS prev_status, offer_subject AS prev_subject FROM jobs
                WHERE job_id = $1 AND tenant = $2 FOR UPDATE
            ), j AS (
                UPDATE jobs SET
                    rejections = CASE WHEN $7 THEN rejections || $8 ELSE rejections END,
                    status = CASE WHEN $7 AND jsonb_array_length(rejections) + 1 >= $9 THEN 'failed' ELSE 'pending' END,
                    error_message = CASE WHEN $7 AND jsonb_array_length(rejections) + 1 >= $9
                        THEN 'rejected by every robot it was offered to: ' ||
                             (SELECT string_agg(e->>'robot_id' || ' (' || (e->>'reason') || ')', ', ')
                              FROM jsonb_array_elements(rejections || $8) e)
                        ELSE error_message END,
                    error_type = CASE WHEN $7 AND jsonb_array_length(rejections) + 1 >= $9 THEN 'rejected' ELSE error_type END,
                    completed_at = CASE WHEN $7 AND jsonb_array_length(rejections) + 1 >= $9 THEN now() ELSE completed_at END,
                    robot_id = NULL, session_id = NULL, lease_until = NULL, offer_subject = NULL, offer_seq = NULL,
                    history_seq = history_seq + 1
                WHERE job_id = $1 AND tenant = $2 AND ($3::int IS NULL OR offer_no = $3)
                  AND ((status = 'queued' AND $4::int IS NULL) OR (status = 'running' AND attempt = $4 AND robot_id = $5))
                  AND {}
                RETURNING *
            ), h AS (
                INSERT INTO job_history (tenant, job_id, robot_id, seq, kind, attempt, data)
                SELECT tenant, job_id, $5, history_seq,
                       CASE WHEN status = 'failed' THEN 'job.failed' WHEN $7 THEN 'job.requeued' ELSE 'job.released' END,
                       attempt,
                       jsonb_build_object('previous_robot_id', $5::text, 'reason', $10::text,
                           'rejected_by_count', jsonb_array_length(rejections), 'error', error_message)
                FROM j
            )
            SELECT j.status, prev.prev_status, prev.prev_subject FROM j, prev",
            fenced(6)
        );
        let row: Option<(String, String, Option<String>)> = sqlx::query_as(&sql)
            .bind(uuid(job_id))
            .bind(tenant.as_str())
            .bind(offer_no)
            .bind(attempt)
            .bind(robot.as_str())
            .bind(epoch)
            .bind(rejection)
            .bind(Json(rejection_entry))
            .bind(max_rejections)
            .bind(reason)
            .fetch_optional(&self.pool)
            .await?;
        if let Some((status, prev_status, prev_subject)) = row {
            Ok(Verdict::Accepted(GivenBack {
                failed: status == "failed",
                offered_on: if prev_status == "queued" { prev_subject } else { None },
            }))
        } else {
            self.check_fence(epoch).await?;
            Ok(Verdict::Refused("the job is no longer held by this offer or attempt".into()))
        }
    }

    /// Record progress of a running attempt (not a state change), without waiting: reports
    /// queued together are written in one statement, the latest of each attempt.
    pub fn record_progress(
        &self,
        tenant: &TenantId,
        job_id: JobId,
        attempt: i32,
        progress: i16,
        node: Option<&str>,
    ) {
        if let Ok(b) = self.batches() {
            let record = batch::ProgressRecord {
                tenant: tenant.clone(),
                job_id,
                attempt,
                progress,
                node: node.map(str::to_owned),
            };
            let _ = b.progress.send(record);
        }
    }

    // ----- sweeps -------------------------------------------------------------------------

    /// Running attempts whose lease lapsed go back to `pending`, or to `failed` once their
    /// attempts are used up. With `robot`, only that robot's jobs of sessions other than
    /// `keep_session` (a robot restarted: its old session's jobs expire at once).
    pub async fn expire(&self, robot: Option<(&TenantId, &RobotId, SessionId)>) -> StoreResult<u64> {
        let epoch = self.epoch()?;
        let (cond, reason) = match robot {
            None => ("lease_until < now()", "lease expired"),
            Some(_) => ("tenant = $2 AND robot_id = $3 AND session_id <> $4", "robot restarted"),
        };
        let sql = format!(
            "WITH j AS (
                UPDATE jobs SET
                    status = CASE WHEN attempt >= max_attempts THEN 'failed' ELSE 'pending' END,
                    error_message = CASE WHEN attempt >= max_attempts
                        THEN 'gave up after ' || attempt || ' attempts: the robot running it stopped responding ('
                             || '{reason}' || ')'
                        ELSE error_message END,
                    error_type = CASE WHEN attempt >= max_attempts THEN 'robot_lost' ELSE error_type END,
                    completed_at = CASE WHEN attempt >= max_attempts THEN now() ELSE completed_at END,
                    robot_id = NULL, session_id = NULL, lease_until = NULL, history_seq = history_seq + 1
                WHERE job_id IN (SELECT job_id FROM jobs WHERE status = 'running' AND {cond}
                                 ORDER BY job_id FOR UPDATE SKIP LOCKED LIMIT 1000)
                  AND status = 'running' AND {}
                RETURNING tenant, job_id, history_seq, attempt, status, error_message
            ), h AS (
                INSERT INTO job_history (tenant, job_id, seq, kind, attempt, data)
                SELECT tenant, job_id, history_seq,
                       CASE WHEN status = 'failed' THEN 'job.failed' ELSE 'job.requeued' END, attempt,
                       jsonb_build_object('reason', '{reason}', 'error', error_message)
                FROM j
            )
            SELECT count(*) FROM j",
            fenced(1)
        );
        let mut q = sqlx::query_as::<_, (i64,)>(&sql).bind(epoch);
        if let Some((tenant, robot, session)) = robot {
            q = q.bind(tenant.as_str()).bind(robot.as_str()).bind(session.0);
        }
        let (n,) = q.fetch_one(&self.pool).await?;
        Ok(n as u64)
    }

    /// Running attempts past the job's `timeout_s` end `timed_out`, whether or not the robot
    /// is alive (its next renewal is refused, so it stops).
    pub async fn time_out(&self) -> StoreResult<u64> {
        let epoch = self.epoch()?;
        let sql = format!(
            "WITH j AS (
                UPDATE jobs SET status = 'timed_out', completed_at = now(), lease_until = NULL,
                    error_message = 'timed out after ' || timeout_s || ' s', error_type = 'timeout',
                    history_seq = history_seq + 1
                WHERE job_id IN (SELECT job_id FROM jobs WHERE status = 'running' AND timeout_s IS NOT NULL
                        AND started_at + make_interval(secs => timeout_s) < now()
                        ORDER BY job_id FOR UPDATE SKIP LOCKED)
                  AND status = 'running' AND {}
                RETURNING tenant, job_id, robot_id, history_seq, attempt, error_message
            ), h AS (
                INSERT INTO job_history (tenant, job_id, robot_id, seq, kind, attempt, data)
                SELECT tenant, job_id, robot_id, history_seq, 'job.timed_out', attempt,
                       jsonb_build_object('error', error_message) FROM j
            )
            SELECT count(*) FROM j",
            fenced(1)
        );
        let (n,): (i64,) = sqlx::query_as(&sql).bind(epoch).fetch_one(&self.pool).await?;
        Ok(n as u64)
    }

    /// Cancel a job: waiting ones end at once (their offer is recalled by the caller), running
    /// ones get a flag their robot reads in the next renewal reply.
    pub async fn cancel(
        &self,
        tenant: &TenantId,
        job_id: JobId,
    ) -> StoreResult<Option<(JobStatus, Option<ToOffer>)>> {
        let epoch = self.epoch()?;
        let sql = format!(
            "WITH prev AS (
                SELECT job_id, status, offer_no, offer_subject, offer_seq FROM jobs
                WHERE job_id = $1 AND tenant = $2 FOR UPDATE
            ), j AS (
                UPDATE jobs SET
                    status = CASE WHEN jobs.status IN ('pending', 'queued') THEN 'cancelled' ELSE jobs.status END,
                    cancel_requested = CASE WHEN jobs.status = 'running' THEN true ELSE jobs.cancel_requested END,
                    completed_at = CASE WHEN jobs.status IN ('pending', 'queued') THEN now() ELSE jobs.completed_at END,
                    history_seq = history_seq + 1
                FROM prev
                WHERE jobs.job_id = prev.job_id AND prev.status IN ('pending', 'queued', 'running')
                  AND NOT jobs.cancel_requested AND {}
                RETURNING jobs.tenant, jobs.job_id, jobs.history_seq, jobs.attempt, jobs.status
            ), h AS (
                INSERT INTO job_history (tenant, job_id, seq, kind, attempt, data)
                SELECT tenant, job_id, history_seq,
                       CASE WHEN status = 'cancelled' THEN 'job.cancelled' ELSE 'job.cancel_requested' END,
                       attempt, '{{}}'::jsonb FROM j
            )
            SELECT prev.status, prev.offer_no, prev.offer_subject, (SELECT count(*) FROM j) AS changed FROM prev",
            fenced(3)
        );
        let row = sqlx::query(&sql)
            .bind(uuid(job_id))
            .bind(tenant.as_str())
            .bind(epoch)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let prev = JobStatus::parse(row.get::<String, _>("status").as_str()).unwrap_or(JobStatus::Pending);
        let changed: i64 = row.get("changed");
        if changed == 0 && !prev.is_terminal() && prev != JobStatus::Running {
            self.check_fence(epoch).await?;
        }
        let recalled = (prev == JobStatus::Queued && changed > 0).then(|| ToOffer {
            job_id,
            offer_no: row.get("offer_no"),
            subject: row.get::<Option<String>, _>("offer_subject").unwrap_or_default(),
        });
        Ok(Some((prev, recalled)))
    }

    // ----- robots -------------------------------------------------------------------------

    /// Upsert a robot at registration.
    #[allow(clippy::too_many_arguments)]
    pub async fn upsert_robot(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
        req: &fleet_schemas::robot::RegisterRequest,
        capabilities: &[String],
    ) -> StoreResult<bool> {
        let epoch = self.epoch()?;
        let sql = format!(
            "WITH prev AS (SELECT session_id FROM robots WHERE tenant = $1 AND robot_id = $2),
             up AS (
                INSERT INTO robots (tenant, robot_id, name, hostname, environment, capabilities, tags, max_jobs,
                                    session_id, state_dir_id, run_state, online, version, last_heartbeat, updated_at)
                SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'online', true, $11, now(), now() WHERE {}
                ON CONFLICT (tenant, robot_id) DO UPDATE SET name = EXCLUDED.name, hostname = EXCLUDED.hostname,
                    environment = EXCLUDED.environment, capabilities = EXCLUDED.capabilities, tags = EXCLUDED.tags,
                    max_jobs = EXCLUDED.max_jobs, session_id = EXCLUDED.session_id,
                    state_dir_id = EXCLUDED.state_dir_id, run_state = 'online', online = true,
                    version = EXCLUDED.version, last_heartbeat = now(), updated_at = now()
                RETURNING robot_id
             ), h AS (
                INSERT INTO job_history (tenant, robot_id, kind, data)
                SELECT $1, $2, 'robot.registered',
                       jsonb_build_object('name', $3::text, 'capabilities', $6::text[], 'max_jobs', $8::int,
                           'session_id', $9::uuid, 'version', $11::text)
                FROM up WHERE NOT EXISTS (SELECT 1 FROM prev WHERE prev.session_id = $9)
             )
             SELECT count(*) FROM up",
            fenced(12)
        );
        let (n,): (i64,) = sqlx::query_as(&sql)
            .bind(tenant.as_str())
            .bind(robot.as_str())
            .bind(&req.name)
            .bind(&req.hostname)
            .bind(&req.environment)
            .bind(capabilities)
            .bind(&req.tags)
            .bind(req.max_jobs as i32)
            .bind(req.session_id.0)
            .bind(&req.state_dir_id)
            .bind(&req.version)
            .bind(epoch)
            .fetch_one(&self.pool)
            .await?;
        if n == 0 {
            return Err(StoreError::NotLeader);
        }
        Ok(true)
    }

    /// Apply a command to a robot's desired state; returns the new state, or `None` when the
    /// command stops a session and the robot has none.
    pub async fn apply_command(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
        command: fleet_schemas::api::RobotCommand,
    ) -> StoreResult<Option<fleet_schemas::robot::DesiredState>> {
        let epoch = self.epoch()?;
        let (mode, stop) = crate::commands::effect(command);
        let sql = format!(
            "WITH up AS (
                UPDATE robots SET
                    desired_mode = coalesce($3, desired_mode),
                    desired_stop = CASE WHEN $4 THEN jsonb_build_object('session_id', session_id, 'force', $5::bool,
                                                                     'restart', $6::bool)
                                        ELSE desired_stop END,
                    command_revision = command_revision + 1, updated_at = now()
                WHERE tenant = $1 AND robot_id = $2 AND (NOT $4 OR session_id IS NOT NULL) AND {}
                RETURNING tenant, robot_id, desired_mode, desired_stop, command_revision
             ), h AS (
                INSERT INTO job_history (tenant, robot_id, kind, data)
                SELECT tenant, robot_id, 'robot.command', jsonb_build_object('command', $8::jsonb,
                    'desired_mode', desired_mode, 'stop', desired_stop) FROM up
             )
             SELECT desired_mode, desired_stop, command_revision FROM up",
            fenced(7)
        );
        let row: Option<(String, Option<Json<Value>>, i64)> = sqlx::query_as(&sql)
            .bind(tenant.as_str())
            .bind(robot.as_str())
            .bind(mode)
            .bind(stop.is_some())
            .bind(stop.is_some_and(|s| s.0))
            .bind(stop.is_some_and(|s| s.1))
            .bind(epoch)
            .bind(Json(serde_json::to_value(command).unwrap_or_default()))
            .fetch_optional(&self.pool)
            .await?;
        if row.is_none() {
            self.check_fence(epoch).await?;
        }
        Ok(row.map(desired_state))
    }

    /// A robot's desired state as recorded.
    pub async fn desired_state(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
    ) -> StoreResult<Option<fleet_schemas::robot::DesiredState>> {
        let row: Option<(String, Option<Json<Value>>, i64)> = sqlx::query_as(
            "SELECT desired_mode, desired_stop, command_revision FROM robots WHERE tenant = $1 AND robot_id = $2",
        )
        .bind(tenant.as_str())
        .bind(robot.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(desired_state))
    }

    /// Record a robot event (status change) as a history row, published as an event.
    pub async fn robot_event(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
        kind: &str,
        data: Value,
    ) -> StoreResult<()> {
        let epoch = self.epoch()?;
        let sql = format!(
            "INSERT INTO job_history (tenant, robot_id, kind, data) SELECT $1, $2, $3, $4 WHERE {}",
            fenced(5)
        );
        sqlx::query(&sql)
            .bind(tenant.as_str())
            .bind(robot.as_str())
            .bind(kind)
            .bind(Json(data))
            .bind(epoch)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Record a heartbeat's figures (not a state change: no history row), without waiting:
    /// heartbeats queued together are written in one statement, the latest of each robot.
    pub fn record_heartbeat(&self, hb: fleet_schemas::robot::Heartbeat) {
        if let Ok(b) = self.batches() {
            let _ = b.heartbeat.send(hb);
        }
    }

    /// A robot went offline: record it, with an event naming its orphaned jobs.
    pub async fn robot_offline(&self, tenant: &TenantId, robot: &RobotId, reason: &str) -> StoreResult<bool> {
        let epoch = self.epoch()?;
        let sql = format!(
            "WITH up AS (
                UPDATE robots SET online = false, updated_at = now()
                WHERE tenant = $1 AND robot_id = $2 AND online AND {}
                RETURNING tenant, robot_id
             ), h AS (
                INSERT INTO job_history (tenant, robot_id, kind, data)
                SELECT tenant, robot_id, 'robot.disconnected', jsonb_build_object('reason', $4::text,
                    'orphaned_job_ids', coalesce((SELECT jsonb_agg(job_id) FROM jobs
                        WHERE jobs.tenant = up.tenant AND jobs.robot_id = up.robot_id AND status = 'running'), '[]'))
                FROM up
             )
             SELECT count(*) FROM up",
            fenced(3)
        );
        let (n,): (i64,) = sqlx::query_as(&sql)
            .bind(tenant.as_str())
            .bind(robot.as_str())
            .bind(epoch)
            .bind(reason)
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    /// Robots the database believes online (to reconcile against the bucket at start).
    pub async fn online_robots(&self) -> StoreResult<Vec<(String, String)>> {
        Ok(sqlx::query_as("SELECT tenant, robot_id FROM robots WHERE online").fetch_all(&self.pool).await?)
    }

    /// A robot's registration facts (for the duplicate-identity check).
    pub async fn robot_identity(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
    ) -> StoreResult<Option<(String, Option<Uuid>)>> {
        Ok(sqlx::query_as("SELECT state_dir_id, session_id FROM robots WHERE tenant = $1 AND robot_id = $2")
            .bind(tenant.as_str())
            .bind(robot.as_str())
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn robot_exists(&self, tenant: &TenantId, robot: &RobotId) -> StoreResult<bool> {
        Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM robots WHERE tenant = $1 AND robot_id = $2)")
            .bind(tenant.as_str())
            .bind(robot.as_str())
            .fetch_one(&self.pool)
            .await?)
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

    pub async fn list_robots(
        &self,
        tenant: &TenantId,
        robot: Option<&RobotId>,
    ) -> StoreResult<Vec<RobotView>> {
        let rows = sqlx::query(
            "SELECT r.*, coalesce((SELECT array_agg(j.job_id::text ORDER BY j.started_at) FROM jobs j
                 WHERE j.tenant = r.tenant AND j.robot_id = r.robot_id AND j.status = 'running'), '{}') AS running
             FROM robots r WHERE r.tenant = $1 AND ($2::text IS NULL OR r.robot_id = $2)
             ORDER BY r.robot_id",
        )
        .bind(tenant.as_str())
        .bind(robot.map(RobotId::as_str))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(robot_view).collect())
    }

    pub async fn fleet_summary(&self, tenant: &TenantId) -> StoreResult<FleetSummary> {
        let robots = self.list_robots(tenant, None).await?;
        let count = |s: RobotStatus| robots.iter().filter(|r| r.status == s).count() as u32;
        let by_status: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM jobs WHERE tenant = $1 GROUP BY status")
                .bind(tenant.as_str())
                .fetch_all(&self.pool)
                .await?;
        let (today, avg): (i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*),
                    avg(extract(epoch FROM completed_at - started_at)::float8) FILTER (WHERE status = 'completed')
             FROM jobs WHERE tenant = $1 AND created_at >= date_trunc('day', now())",
        )
        .bind(tenant.as_str())
        .fetch_one(&self.pool)
        .await?;
        let jobs_by_status: std::collections::BTreeMap<String, u32> =
            by_status.into_iter().map(|(s, n)| (s, n as u32)).collect();
        let get = |s: &str| jobs_by_status.get(s).copied().unwrap_or(0);
        Ok(FleetSummary {
            total_robots: robots.len() as u32,
            active_robots: count(RobotStatus::Online) + count(RobotStatus::Busy),
            idle_robots: count(RobotStatus::Online),
            busy_robots: count(RobotStatus::Busy),
            offline_robots: count(RobotStatus::Offline),
            maintenance_robots: count(RobotStatus::Maintenance),
            active_jobs: get("running"),
            queue_depth: get("pending") + get("queued"),
            total_jobs_today: today as u32,
            average_job_duration_seconds: avg.unwrap_or(0.0),
            jobs_by_status,
        })
    }
}

fn desired_state(row: (String, Option<Json<Value>>, i64)) -> fleet_schemas::robot::DesiredState {
    use fleet_schemas::robot::{DesiredState, RobotMode, StopOrder};
    let (mode, stop, revision) = row;
    let mode = match mode.as_str() {
        "paused" => RobotMode::Paused,
        "maintenance" => RobotMode::Maintenance,
        _ => RobotMode::Online,
    };
    let stop = stop.and_then(|Json(v)| {
        Some(StopOrder {
            session_id: SessionId(v.get("session_id")?.as_str()?.parse().ok()?),
            force: v.get("force")?.as_bool()?,
            restart: v.get("restart")?.as_bool()?,
        })
    });
    DesiredState { v: 1, mode, stop, revision }
}

pub fn run_state_str(s: RobotRunState) -> &'static str {
    match s {
        RobotRunState::Online => "online",
        RobotRunState::Paused => "paused",
        RobotRunState::Maintenance => "maintenance",
        RobotRunState::Draining => "draining",
        RobotRunState::Stopping => "stopping",
    }
}

fn claimed(row: &PgRow) -> Claimed {
    let variables: Json<serde_json::Map<String, Value>> = row.get("variables");
    let workflow: Json<Value> = row.get("workflow");
    Claimed {
        attempt: row.get("attempt"),
        offer_subject: row.get("offer_subject"),
        format: row.get("format"),
        workflow: workflow.0,
        variables: variables.0,
        timeout_s: row.get("timeout_s"),
        workflow_name: row.get("workflow_name"),
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

fn robot_view(row: &PgRow) -> RobotView {
    let online: bool = row.get("online");
    let run_state: String = row.get("run_state");
    let running: Vec<String> = row.get("running");
    let max_jobs: i32 = row.get("max_jobs");
    let status = if !online {
        RobotStatus::Offline
    } else if run_state == "maintenance" {
        RobotStatus::Maintenance
    } else if running.len() as i32 >= max_jobs {
        RobotStatus::Busy
    } else {
        RobotStatus::Online
    };
    let last: Option<OffsetDateTime> = row.get("last_heartbeat");
    RobotView {
        robot_id: row.get("robot_id"),
        name: row.get("name"),
        hostname: row.get("hostname"),
        status,
        state: run_state,
        desired_state: row.get("desired_mode"),
        environment: row.get("environment"),
        capabilities: row.get("capabilities"),
        tags: row.get("tags"),
        max_concurrent_jobs: max_jobs.max(0) as u32,
        current_job: running.first().cloned(),
        current_job_ids: running,
        cpu_percent: row.get("cpu_percent"),
        memory_mb: row.get("memory_mb"),
        last_heartbeat: last,
        last_seen: last,
        created_at: row.get("created_at"),
        version: row.get("version"),
    }
}
