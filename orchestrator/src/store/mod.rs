//! The job state machine of DESIGN.md as compare-and-set statements on PostgreSQL.
//!
//! Each transition is **one statement**: the compare-and-set on `jobs`, the leader fence (the
//! epoch check of [`crate::leader::fenced`]) and the insert of the history row all sit in one
//! `WITH … UPDATE … INSERT` statement. So a transition costs one round trip and one commit, is
//! atomic without an explicit transaction, and a deposed leader's statement simply matches no
//! row. Reports are fenced by the offer number (claims) or the attempt (everything after), so a
//! report from a superseded attempt is refused instead of applied.
//!
//! The statements live with their aggregate: `jobs` (submission, admission, offers, reads of
//! jobs), `leases` (claim, renewal, completion and every other end or take-back of an attempt),
//! `robots` (registration, commands, liveness, robot and fleet views) and `batch` (the hot
//! path's batched forms of submit, claim and complete). This module holds what they share: the
//! error type, the request and answer types, and the [`Store`] handle.

use std::sync::Arc;
use std::time::Duration;

use fleet_schemas::api::{ApiError, JobStatus};
use fleet_schemas::workflow::WorkflowFormat;
use fleet_schemas::{JobId, RequestId, RobotId, TenantId};
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{FromRow, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::leader::{Leadership, fenced};

mod batch;
mod bindings;
mod jobs;
mod leases;
mod robots;

pub use bindings::{Attested, BindError, Binding};
pub(crate) use jobs::{JOB_SELECT, job_view};
use leases::claimed;
pub use leases::{CancelOutcome, StoppedAttempt};
pub use robots::run_state_str;

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
        "l AS MATERIALIZED (SELECT job_id, tenant, status, offer_no, attempt, robot_id, session_id FROM jobs \
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
    /// Who submitted it (the key id; `system` when unknown), the history rows' `actor`.
    pub actor: String,
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

/// An unclaimed offer, with its stream sequence when recorded.
#[derive(Debug, Clone)]
pub struct QueuedOffer {
    pub offer: ToOffer,
    pub seq: Option<u64>,
    pub priority: i16,
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
}
