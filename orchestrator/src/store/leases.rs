//! Ownership of a running job: claim, renewal, completion, giving a job back, progress, and the
//! transitions that end or take back an attempt without its robot (expiry, timeout, cancel).
//! Every one is fenced on the offer number (claims) or the attempt.

use std::time::Duration;

use fleet_schemas::api::JobStatus;
use fleet_schemas::robot::RunOutcome;
use fleet_schemas::{JobId, RobotId, SessionId, TenantId};
use serde_json::{Value, json};
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Claimed, GivenBack, Store, StoreError, StoreResult, ToOffer, Verdict, batch, secs, uuid};
use crate::leader::fenced;

impl Store {
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
    pub(super) async fn claim_settle(&self, req: &batch::ClaimRequest) -> StoreResult<Verdict<Claimed>> {
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

    /// `running` (attempt `$a`) → a terminal status, reported by the robot session holding the
    /// attempt (any other session is refused). Idempotent for the same attempt. Concurrent
    /// completions share one statement.
    #[allow(clippy::too_many_arguments)]
    pub async fn complete(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
        session: SessionId,
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
            session,
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
    pub(super) async fn complete_settle(&self, req: &batch::CompleteRequest) -> StoreResult<Verdict<()>> {
        let epoch = self.epoch()?;
        let batch::CompleteRequest { tenant, robot, session, job_id, attempt, outcome, .. } = req;
        let (job_id, attempt) = (*job_id, *attempt);
        let (status, _, _) = batch::outcome_columns(*outcome);
        let row: Option<(String, i32, Option<String>, Option<Uuid>)> = sqlx::query_as(
            "SELECT status, attempt, robot_id, session_id FROM jobs WHERE job_id = $1 AND tenant = $2",
        )
        .bind(uuid(job_id))
        .bind(tenant.as_str())
        .fetch_optional(&self.pool)
        .await?;
        let holder = |r: &Option<String>, s: &Option<Uuid>| {
            r.as_deref() == Some(robot.as_str()) && *s == Some(session.0)
        };
        match row {
            None => Ok(Verdict::Refused("no such job".into())),
            Some((s, a, r, h)) if s == status && a == attempt && holder(&r, &h) => Ok(Verdict::Accepted(())),
            Some((s, a, r, h)) if s == "running" && a == attempt && !holder(&r, &h) => {
                self.check_fence(epoch).await?;
                Ok(Verdict::Refused(format!(
                    "attempt {attempt} is held by another robot session, not session {}",
                    session.0
                )))
            }
            Some((s, a, _, _)) => {
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
        session: SessionId,
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
                -- Read from `prev`, so `prev` runs (and locks) first: scanned after this update, its
                -- FOR UPDATE skips the row this statement already changed, and a give-back that
                -- committed was answered as refused (seen with the planner scanning `j` first).
                FROM prev
                WHERE jobs.job_id = prev.job_id AND tenant = $2 AND ($3::int IS NULL OR offer_no = $3)
                  AND ((status = 'queued' AND $4::int IS NULL)
                       OR (status = 'running' AND attempt = $4 AND robot_id = $5 AND session_id = $11))
                  AND {}
                RETURNING jobs.*
            ), h AS (
                INSERT INTO job_history (tenant, job_id, robot_id, seq, kind, attempt, data, actor)
                SELECT tenant, job_id, $5, history_seq,
                       CASE WHEN status = 'failed' THEN 'job.failed' WHEN $7 THEN 'job.requeued' ELSE 'job.released' END,
                       attempt,
                       jsonb_build_object('previous_robot_id', $5::text, 'reason', $10::text,
                           'rejected_by_count', jsonb_array_length(rejections), 'error', error_message),
                       coalesce($5::text, 'system')
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
            .bind(session.0)
            .fetch_optional(&self.pool)
            .await?;
        if let Some((status, prev_status, prev_subject)) = row {
            Ok(Verdict::Accepted(GivenBack {
                failed: status == "failed",
                offered_on: if prev_status == "queued" { prev_subject } else { None },
            }))
        } else {
            self.check_fence(epoch).await?;
            Ok(Verdict::Refused(
                "the job is no longer held by this offer or by this session's attempt".into(),
            ))
        }
    }

    /// Record progress of a running attempt (not a state change), without waiting: reports
    /// queued together are written in one statement, the latest of each attempt. Only the
    /// robot session holding the attempt records anything.
    #[allow(clippy::too_many_arguments)]
    pub fn record_progress(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
        session: SessionId,
        job_id: JobId,
        attempt: i32,
        progress: i16,
        node: Option<&str>,
    ) {
        if let Ok(b) = self.batches() {
            let record = batch::ProgressRecord {
                tenant: tenant.clone(),
                robot: robot.clone(),
                session,
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
        match robot {
            None => self.expire_where(Expiry::Lapsed).await,
            Some((tenant, robot, keep)) => self.expire_where(Expiry::Restarted(tenant, robot, keep)).await,
        }
    }

    /// The running attempts of a robot declared offline, at once rather than after their lease:
    /// only while the robot is still recorded offline, and only its recorded session's (a robot
    /// that came back or re-registered meanwhile keeps its jobs). Attempts count as for a lapsed
    /// lease.
    pub async fn expire_offline(&self, tenant: &TenantId, robot: &RobotId) -> StoreResult<u64> {
        self.expire_where(Expiry::Offline(tenant, robot)).await
    }

    async fn expire_where(&self, which: Expiry<'_>) -> StoreResult<u64> {
        let epoch = self.epoch()?;
        let (cond, reason) = match which {
            Expiry::Lapsed => ("lease_until < now()", "lease expired"),
            Expiry::Restarted(..) => {
                ("tenant = $2 AND robot_id = $3 AND session_id <> $4", "robot restarted")
            }
            Expiry::Offline(..) => (
                "tenant = $2 AND robot_id = $3 AND session_id = (SELECT r.session_id FROM robots r
                     WHERE r.tenant = $2 AND r.robot_id = $3 AND NOT r.online)",
                "robot offline",
            ),
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
        match which {
            Expiry::Lapsed => {}
            Expiry::Restarted(tenant, robot, keep) => {
                q = q.bind(tenant.as_str()).bind(robot.as_str()).bind(keep.0);
            }
            Expiry::Offline(tenant, robot) => q = q.bind(tenant.as_str()).bind(robot.as_str()),
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

    /// Cancel a job: waiting and running ones end `cancelled` at once, in one compare-and-set on
    /// the status the job had (and, for a running job, its current attempt), with one history
    /// row. A waiting job's offer is returned for the caller to recall; a running job's robot and
    /// attempt are returned so the caller frees the slot and tells the robot to stop. A report
    /// of the cancelled attempt arriving later is refused: every report is fenced on `running`.
    pub async fn cancel(
        &self,
        tenant: &TenantId,
        job_id: JobId,
        actor: &str,
    ) -> StoreResult<Option<CancelOutcome>> {
        let epoch = self.epoch()?;
        let sql = format!(
            "WITH prev AS (
                SELECT job_id, status, offer_no, offer_subject, robot_id, attempt FROM jobs
                WHERE job_id = $1 AND tenant = $2 FOR UPDATE
            ), j AS (
                UPDATE jobs SET status = 'cancelled', completed_at = now(), lease_until = NULL,
                    error_message = CASE WHEN prev.status = 'running' THEN 'cancelled' ELSE jobs.error_message END,
                    history_seq = history_seq + 1
                FROM prev
                WHERE jobs.job_id = prev.job_id AND jobs.status = prev.status AND jobs.attempt = prev.attempt
                  AND prev.status IN ('pending', 'queued', 'running') AND {}
                RETURNING jobs.tenant, jobs.job_id, jobs.history_seq, jobs.attempt, jobs.robot_id,
                          prev.status AS prev_status, jobs.error_message
            ), h AS (
                INSERT INTO job_history (tenant, job_id, robot_id, seq, kind, attempt, data, actor)
                SELECT tenant, job_id, robot_id, history_seq, 'job.cancelled', attempt,
                       jsonb_build_object('status', 'cancelled', 'previous_status', prev_status,
                                          'error', error_message), $4
                FROM j
            )
            SELECT prev.status, prev.offer_no, prev.offer_subject, prev.robot_id, prev.attempt,
                   (SELECT count(*) FROM j) AS changed FROM prev",
            fenced(3)
        );
        let row = sqlx::query(&sql)
            .bind(uuid(job_id))
            .bind(tenant.as_str())
            .bind(epoch)
            .bind(actor)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let previous =
            JobStatus::parse(row.get::<String, _>("status").as_str()).unwrap_or(JobStatus::Pending);
        let changed = row.get::<i64, _>("changed") > 0;
        if !changed && !previous.is_terminal() {
            // Not terminal, yet not changed: the fence refused it (this instance is no leader).
            self.check_fence(epoch).await?;
        }
        let recalled = (previous == JobStatus::Queued && changed).then(|| ToOffer {
            job_id,
            offer_no: row.get("offer_no"),
            subject: row.get::<Option<String>, _>("offer_subject").unwrap_or_default(),
        });
        let stopped = (previous == JobStatus::Running && changed)
            .then(|| row.get::<Option<String>, _>("robot_id"))
            .flatten()
            .and_then(|r| RobotId::new(r).ok())
            .map(|robot_id| StoppedAttempt { robot_id, attempt: row.get("attempt") });
        Ok(Some(CancelOutcome { previous, changed, recalled, stopped }))
    }
}

/// Which running attempts an expiry takes back.
#[derive(Clone, Copy)]
enum Expiry<'a> {
    /// Every attempt whose lease lapsed.
    Lapsed,
    /// A robot's attempts of sessions other than this one (it registered again).
    Restarted(&'a TenantId, &'a RobotId, SessionId),
    /// A robot's attempts while it is recorded offline.
    Offline(&'a TenantId, &'a RobotId),
}

/// What a cancel did.
#[derive(Debug, Clone)]
pub struct CancelOutcome {
    /// The status the job had.
    pub previous: JobStatus,
    /// The job went to `cancelled` now (false: it had ended already).
    pub changed: bool,
    /// A waiting job's offer, to recall.
    pub recalled: Option<ToOffer>,
    /// A running job's attempt, whose robot must stop it.
    pub stopped: Option<StoppedAttempt>,
}

/// The attempt a cancel took away from a robot.
#[derive(Debug, Clone)]
pub struct StoppedAttempt {
    pub robot_id: RobotId,
    pub attempt: i32,
}

pub(super) fn claimed(row: &PgRow) -> Claimed {
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
