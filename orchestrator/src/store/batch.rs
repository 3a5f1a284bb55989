//! The hot path's writes, batched: submits, claims and completions of many jobs in one
//! statement each (one round trip, one commit, one WAL flush), and heartbeat and progress
//! records coalesced. Each statement is the same compare-and-set as the single-job transition
//! it replaces, over `unnest` arrays; a request it did not match (a repeat, a superseded offer,
//! a lost race) is settled on its own afterwards, exactly as before.
//!
//! See [`crate::batch`] for how requests are grouped.

use std::collections::HashMap;
use std::time::Duration;

use fleet_schemas::robot::{Heartbeat, RunOutcome};
use fleet_schemas::{JobId, RobotId, SessionId, TenantId};
use serde_json::{Value, json};
use sqlx::Row;
use time::OffsetDateTime;
use uuid::Uuid;

use fleet_schemas::api::JobStatus;

use super::{
    Claimed, Inserted, NewJob, Placement, Store, StoreError, StoreResult, Verdict, claimed, lock_in_order,
    run_state_str,
};
use crate::batch::{Batcher, Settings};
use crate::leader::fenced;

/// Most requests in one statement. Large enough that a busy fabric commits rarely, small enough
/// that one statement stays short (its rows are locked until it commits).
const MAX_BATCH: usize = 256;

/// Submits, claims and completions: flushed at once, one statement of a kind at a time (see
/// [`Settings::concurrency`]).
const HOT: Settings = Settings::eager(MAX_BATCH, 1);

/// How long heartbeat records wait for others to share their statement. They are figures for
/// people (last seen, CPU, state), not transitions: a 10,000-robot fleet beats a thousand times
/// a second, one statement each without this.
const HEARTBEAT_LINGER: Duration = Duration::from_millis(200);

pub(super) type Answer<T> = StoreResult<T>;

/// A claim of an offer by a robot session.
#[derive(Debug, Clone)]
pub(super) struct ClaimRequest {
    pub tenant: TenantId,
    pub robot: RobotId,
    pub session: SessionId,
    pub job_id: JobId,
    pub offer_no: i32,
    pub lease: Duration,
}

/// The end of an attempt as a robot reports it.
#[derive(Debug, Clone)]
pub(super) struct CompleteRequest {
    pub tenant: TenantId,
    pub robot: RobotId,
    /// The session reporting: only the one that holds the attempt may end it.
    pub session: SessionId,
    pub job_id: JobId,
    pub attempt: i32,
    pub outcome: RunOutcome,
    pub output: String,
    pub error: Option<String>,
    pub failed_step: Option<String>,
}

/// Progress of a running attempt.
#[derive(Debug, Clone)]
pub(super) struct ProgressRecord {
    pub tenant: TenantId,
    pub robot: RobotId,
    /// Only the session holding the attempt records its progress.
    pub session: SessionId,
    pub job_id: JobId,
    pub attempt: i32,
    pub progress: i16,
    pub node: Option<String>,
}

/// The batch writers of one store.
pub(super) struct Batches {
    pub insert: Batcher<(NewJob, Placement), Answer<Inserted>>,
    pub claim: Batcher<ClaimRequest, Answer<Verdict<Claimed>>>,
    pub complete: Batcher<CompleteRequest, Answer<Verdict<()>>>,
    pub heartbeat: Batcher<Heartbeat, ()>,
    pub progress: Batcher<ProgressRecord, ()>,
}

impl Batches {
    pub fn spawn(store: &Store) -> Self {
        let s = store.clone();
        let insert = Batcher::spawn_with(HOT, move |reqs| {
            let s = s.clone();
            async move { s.insert_many(reqs).await }
        });
        let s = store.clone();
        let claim = Batcher::spawn_with(HOT, move |reqs| {
            let s = s.clone();
            async move { s.claim_many(reqs).await }
        });
        let s = store.clone();
        let complete = Batcher::spawn_with(HOT, move |reqs| {
            let s = s.clone();
            async move { s.complete_many(reqs).await }
        });
        let s = store.clone();
        // One flush at a time: the latest record of a robot must be written last.
        let settings = Settings { max: MAX_BATCH * 4, linger: HEARTBEAT_LINGER, concurrency: 1 };
        let heartbeat = Batcher::spawn_with(settings, move |beats| {
            let s = s.clone();
            async move {
                let n = beats.len();
                if let Err(e) = s.heartbeats_many(beats).await {
                    tracing::debug!(error = %e, "heartbeats not recorded");
                }
                vec![(); n]
            }
        });
        let s = store.clone();
        let progress = Batcher::spawn(MAX_BATCH, move |records| {
            let s = s.clone();
            async move {
                let n = records.len();
                if let Err(e) = s.progress_many(records).await {
                    tracing::debug!(error = %e, "progress not recorded");
                }
                vec![(); n]
            }
        });
        Self { insert, claim, complete, heartbeat, progress }
    }
}

/// One answer per request: the statement's error, shared by all.
fn all_failed<T>(e: &StoreError, n: usize) -> Vec<Answer<T>> {
    (0..n).map(|_| Err(e.share())).collect()
}

/// A batch statement failed in a way that one request may have caused (a value the database
/// refuses), rather than the database or the leadership being gone: each request must then be
/// tried alone, so that one bad request never fails the others that shared its statement.
fn one_may_be_bad(e: &StoreError, n: usize) -> bool {
    matches!(e, StoreError::Other(_)) && n > 1
}

/// Run each request as a batch of its own, in order.
async fn each_alone<Q, A, F, Fut>(reqs: Vec<Q>, alone: F) -> Vec<A>
where
    F: Fn(Q) -> Fut,
    Fut: std::future::Future<Output = Vec<A>>,
{
    let mut out = Vec::with_capacity(reqs.len());
    for req in reqs {
        out.extend(alone(req).await);
    }
    out
}

fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

impl Store {
    // ----- submits ------------------------------------------------------------------------

    async fn insert_many(&self, reqs: Vec<(NewJob, Placement)>) -> Vec<Answer<Inserted>> {
        // A request whose deadline passed while it queued is not committed (the gateway has
        // answered, or will answer, that it is not done).
        let now = now_ms();
        let live: Vec<usize> =
            (0..reqs.len()).filter(|&i| reqs[i].0.deadline_unix_ms.is_none_or(|d| d >= now)).collect();
        let mut answers: Vec<Option<Answer<Inserted>>> =
            (0..reqs.len()).map(|_| Some(Err(StoreError::PastDeadline))).collect();
        for &i in &live {
            answers[i] = None;
        }
        let batch: Vec<&(NewJob, Placement)> = live.iter().map(|&i| &reqs[i]).collect();
        match self.insert_statement(&batch).await {
            Ok(rows) => {
                for (k, &i) in live.iter().enumerate() {
                    if let Some(created_at) = rows.get(&batch[k].0.job_id) {
                        answers[i] = Some(Ok(inserted(&reqs[i].0, &reqs[i].1, *created_at)));
                    }
                }
            }
            Err(e) if one_may_be_bad(&e, batch.len()) => {
                for &i in &live {
                    let alone = Box::pin(self.insert_many(vec![reqs[i].clone()])).await;
                    answers[i] = Some(alone.into_iter().next().unwrap_or_else(|| Err(e.share())));
                }
            }
            Err(e) => {
                for &i in &live {
                    answers[i] = Some(Err(e.share()));
                }
            }
        }
        // Not inserted: an idempotency key already used (or a lost fence); settle each alone.
        let mut out = Vec::with_capacity(reqs.len());
        for (i, answer) in answers.into_iter().enumerate() {
            out.push(match answer {
                Some(a) => a,
                None => self.insert_job_one(&reqs[i].0, &reqs[i].1).await,
            });
        }
        out
    }

    pub(super) async fn insert_statement(
        &self,
        batch: &[&(NewJob, Placement)],
    ) -> StoreResult<HashMap<JobId, OffsetDateTime>> {
        if batch.is_empty() {
            return Ok(HashMap::new());
        }
        let epoch = self.epoch()?;
        let mut c = InsertColumns::default();
        for (job, placement) in batch {
            c.push(job, placement);
        }
        let sql = format!(
            "WITH u AS (
                SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                    $7::text[], $8::text[], $9::text[], $10::int2[], $11::text[], $12::text[], $13::text[],
                    $14::int8[], $15::text[], $16::text[], $17::text[], $18::int4[], $19::uuid[], $20::text[],
                    $21::text[], $22::text[], $24::text[])
                WITH ORDINALITY AS u(job_id, tenant, workflow_id, workflow_name, format, workflow, variables,
                    metadata, requires, priority, trigger_type, execution_mode, target_robot_id, timeout_s,
                    status, waiting_reason, offer_subject, max_attempts, request_id, idempotency_key,
                    submitted, assigned, actor, ord)
            ), ins AS (
                INSERT INTO jobs (job_id, tenant, workflow_id, workflow_name, format, workflow, variables,
                    metadata, requires, priority, trigger_type, execution_mode, target_robot_id, timeout_s,
                    status, waiting_reason, offer_no, offer_subject, offered_at, max_attempts, request_id,
                    idempotency_key, history_seq, created_at)
                SELECT job_id, tenant, workflow_id, workflow_name, format, workflow::json, variables::jsonb,
                    metadata::jsonb, ARRAY(SELECT json_array_elements_text(requires::json)), priority,
                    trigger_type, execution_mode, target_robot_id, timeout_s, status, waiting_reason,
                    CASE WHEN status = 'queued' THEN 1 ELSE 0 END, offer_subject,
                    CASE WHEN status = 'queued' THEN now() END, max_attempts, request_id, idempotency_key,
                    CASE WHEN status = 'queued' THEN 2 ELSE 1 END,
                    -- Distinct and in submission order, for first-in first-out within a priority.
                    clock_timestamp()
                FROM u WHERE {}
                ORDER BY ord
                ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
                RETURNING job_id, tenant, status, created_at
            ), h AS (
                INSERT INTO job_history (tenant, job_id, seq, kind, attempt, data, occurred_at, actor)
                SELECT ins.tenant, ins.job_id, v.seq, v.kind, 0, v.data::jsonb, ins.created_at,
                    CASE WHEN v.seq = 1 THEN u.actor ELSE 'system' END
                FROM ins JOIN u ON u.job_id = ins.job_id
                CROSS JOIN LATERAL (VALUES (1, 'job.submitted', u.submitted), (2, 'job.assigned', u.assigned))
                    AS v(seq, kind, data)
                WHERE v.seq = 1 OR ins.status = 'queued'
                ORDER BY u.ord, v.seq
            )
            SELECT job_id, created_at FROM ins",
            fenced(23)
        );
        let rows: Vec<(Uuid, OffsetDateTime)> = sqlx::query_as(&sql)
            .bind(c.job_id)
            .bind(c.tenant)
            .bind(c.workflow_id)
            .bind(c.workflow_name)
            .bind(c.format)
            .bind(c.workflow)
            .bind(c.variables)
            .bind(c.metadata)
            .bind(c.requires)
            .bind(c.priority)
            .bind(c.trigger_type)
            .bind(c.execution_mode)
            .bind(c.target_robot_id)
            .bind(c.timeout_s)
            .bind(c.status)
            .bind(c.waiting_reason)
            .bind(c.offer_subject)
            .bind(c.max_attempts)
            .bind(c.request_id)
            .bind(c.idempotency_key)
            .bind(c.submitted)
            .bind(c.assigned)
            .bind(epoch)
            .bind(c.actor)
            .fetch_all(&self.writer)
            .await?;
        Ok(rows.into_iter().map(|(id, at)| (JobId(id), at)).collect())
    }

    // ----- claims -------------------------------------------------------------------------

    async fn claim_many(&self, reqs: Vec<ClaimRequest>) -> Vec<Answer<Verdict<Claimed>>> {
        let rows = match self.claim_statement(&reqs).await {
            Ok(rows) => rows,
            Err(e) if one_may_be_bad(&e, reqs.len()) => {
                return each_alone(reqs, |req| Box::pin(self.claim_many(vec![req]))).await;
            }
            Err(e) => return all_failed(&e, reqs.len()),
        };
        let mut out = Vec::with_capacity(reqs.len());
        for req in &reqs {
            let won = rows.get(&req.job_id).filter(|(robot, session, offer_no, _)| {
                robot == req.robot.as_str() && *session == req.session.0 && *offer_no == req.offer_no
            });
            out.push(match won {
                Some((_, _, _, claimed)) => Ok(Verdict::Accepted(claimed.clone())),
                None => self.claim_settle(req).await,
            });
        }
        out
    }

    async fn claim_statement(
        &self,
        reqs: &[ClaimRequest],
    ) -> StoreResult<HashMap<JobId, (String, Uuid, i32, Claimed)>> {
        let epoch = self.epoch()?;
        let sql = format!(
            "WITH u AS (
                SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::int[], $6::float8[])
                    AS u(job_id, tenant, robot_id, session_id, offer_no, lease_s)
            ), {}, j AS (
                UPDATE jobs SET status = 'running', attempt = jobs.attempt + 1, robot_id = u.robot_id,
                    session_id = u.session_id, lease_until = now() + make_interval(secs => u.lease_s),
                    claimed_at = now(), started_at = now(), progress = 0, current_node = NULL,
                    history_seq = jobs.history_seq + 1
                FROM u, l
                WHERE l.job_id = u.job_id AND jobs.job_id = l.job_id AND l.tenant = u.tenant
                  AND l.status = 'queued' AND l.offer_no = u.offer_no AND {}
                RETURNING jobs.*
            ), h AS (
                INSERT INTO job_history (tenant, job_id, robot_id, seq, kind, attempt, data, actor)
                SELECT tenant, job_id, robot_id, history_seq, 'job.started', attempt,
                       jsonb_build_object('robot_id', robot_id, 'offer_no', offer_no), robot_id FROM j
            )
            SELECT job_id, robot_id, session_id, offer_no, attempt, format, workflow, variables, timeout_s,
                   workflow_name, offer_subject FROM j",
            lock_in_order(1),
            fenced(7)
        );
        let rows = sqlx::query(&sql)
            .bind(reqs.iter().map(|r| r.job_id.0).collect::<Vec<_>>())
            .bind(reqs.iter().map(|r| r.tenant.as_str()).collect::<Vec<_>>())
            .bind(reqs.iter().map(|r| r.robot.as_str()).collect::<Vec<_>>())
            .bind(reqs.iter().map(|r| r.session.0).collect::<Vec<_>>())
            .bind(reqs.iter().map(|r| r.offer_no).collect::<Vec<_>>())
            .bind(reqs.iter().map(|r| r.lease.as_secs_f64()).collect::<Vec<_>>())
            .bind(epoch)
            .fetch_all(&self.writer)
            .await?;
        Ok(rows
            .iter()
            .map(|row| {
                (
                    JobId(row.get("job_id")),
                    (row.get("robot_id"), row.get("session_id"), row.get("offer_no"), claimed(row)),
                )
            })
            .collect())
    }

    // ----- completions --------------------------------------------------------------------

    async fn complete_many(&self, reqs: Vec<CompleteRequest>) -> Vec<Answer<Verdict<()>>> {
        let done = match self.complete_statement(&reqs).await {
            Ok(done) => done,
            Err(e) if one_may_be_bad(&e, reqs.len()) => {
                return each_alone(reqs, |req| Box::pin(self.complete_many(vec![req]))).await;
            }
            Err(e) => return all_failed(&e, reqs.len()),
        };
        let mut out = Vec::with_capacity(reqs.len());
        for req in &reqs {
            let ours = done.get(&req.job_id).is_some_and(|(attempt, robot)| {
                *attempt == req.attempt && robot.as_deref() == Some(req.robot.as_str())
            });
            out.push(if ours { Ok(Verdict::Accepted(())) } else { self.complete_settle(req).await });
        }
        out
    }

    async fn complete_statement(
        &self,
        reqs: &[CompleteRequest],
    ) -> StoreResult<HashMap<JobId, (i32, Option<String>)>> {
        let epoch = self.epoch()?;
        let mut status = Vec::with_capacity(reqs.len());
        let mut kind = Vec::with_capacity(reqs.len());
        let mut error_type = Vec::with_capacity(reqs.len());
        for r in reqs {
            let (s, k, t) = outcome_columns(r.outcome);
            status.push(s);
            kind.push(k);
            error_type.push(t);
        }
        let sql = format!(
            "WITH u AS (
                SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[], $6::text[],
                    $7::text[], $8::text[], $9::text[], $10::text[], $12::uuid[])
                    AS u(job_id, tenant, attempt, status, output, error, error_type, robot_id, kind, failed_step,
                         session_id)
            ), {}, j AS (
                UPDATE jobs SET status = u.status, output = u.output::jsonb, error_message = u.error,
                    error_type = u.error_type, completed_at = now(), lease_until = NULL,
                    progress = CASE WHEN u.status = 'completed' THEN 100 ELSE jobs.progress END,
                    history_seq = jobs.history_seq + 1
                FROM u, l
                WHERE l.job_id = u.job_id AND jobs.job_id = l.job_id AND l.tenant = u.tenant
                  AND l.status = 'running' AND l.attempt = u.attempt AND l.robot_id = u.robot_id
                  AND l.session_id = u.session_id AND {}
                RETURNING jobs.*, u.kind AS h_kind, u.failed_step AS h_failed_step
            ), h AS (
                INSERT INTO job_history (tenant, job_id, robot_id, seq, kind, attempt, data, actor)
                SELECT tenant, job_id, robot_id, history_seq, h_kind, attempt,
                       jsonb_build_object('status', status, 'error', error_message, 'failed_step', h_failed_step,
                           'duration_ms', (extract(epoch FROM completed_at - started_at) * 1000)::bigint),
                       robot_id
                FROM j
            )
            SELECT job_id, attempt, robot_id FROM j",
            lock_in_order(1),
            fenced(11)
        );
        let rows: Vec<(Uuid, i32, Option<String>)> = sqlx::query_as(&sql)
            .bind(reqs.iter().map(|r| r.job_id.0).collect::<Vec<_>>())
            .bind(reqs.iter().map(|r| r.tenant.as_str()).collect::<Vec<_>>())
            .bind(reqs.iter().map(|r| r.attempt).collect::<Vec<_>>())
            .bind(status)
            .bind(reqs.iter().map(|r| r.output.as_str()).collect::<Vec<_>>())
            .bind(reqs.iter().map(|r| r.error.as_deref()).collect::<Vec<_>>())
            .bind(error_type)
            .bind(reqs.iter().map(|r| r.robot.as_str()).collect::<Vec<_>>())
            .bind(kind)
            .bind(reqs.iter().map(|r| r.failed_step.as_deref()).collect::<Vec<_>>())
            .bind(epoch)
            .bind(reqs.iter().map(|r| r.session.0).collect::<Vec<_>>())
            .fetch_all(&self.writer)
            .await?;
        Ok(rows.into_iter().map(|(id, attempt, robot)| (JobId(id), (attempt, robot))).collect())
    }

    // ----- records that are not transitions -----------------------------------------------

    /// The latest heartbeat of each robot in the batch, in one statement. A `stopping` beat does
    /// not set the robot online: the robot deletes its heartbeat right after it, and a batch still
    /// lingering then would bring the robot back after the watcher marked it offline.
    async fn heartbeats_many(&self, beats: Vec<Heartbeat>) -> StoreResult<()> {
        let mut latest: HashMap<(TenantId, RobotId), Heartbeat> = HashMap::with_capacity(beats.len());
        for hb in beats {
            latest.insert((hb.tenant.clone(), hb.robot_id.clone()), hb);
        }
        let beats: Vec<Heartbeat> = latest.into_values().collect();
        sqlx::query(
            "UPDATE robots SET run_state = u.run_state,
                 online = CASE WHEN u.run_state = 'stopping' THEN robots.online ELSE true END, cpu_percent = u.cpu_percent,
                 memory_mb = u.memory_mb, last_heartbeat = u.sent_at, max_jobs = u.max_jobs,
                 capabilities = ARRAY(SELECT json_array_elements_text(u.capabilities::json)), updated_at = now()
             FROM unnest($1::text[], $2::text[], $3::text[], $4::real[], $5::float8[], $6::timestamptz[],
                 $7::int[], $8::text[])
                 AS u(tenant, robot_id, run_state, cpu_percent, memory_mb, sent_at, max_jobs, capabilities)
             WHERE robots.tenant = u.tenant AND robots.robot_id = u.robot_id
               -- A beat queued before its robot's key was revoked must not bring it back online.
               AND NOT EXISTS (SELECT 1 FROM robot_bindings b WHERE b.tenant = u.tenant
                                 AND b.robot_id = u.robot_id AND b.revoked_at IS NOT NULL)",
        )
        .bind(beats.iter().map(|b| b.tenant.as_str()).collect::<Vec<_>>())
        .bind(beats.iter().map(|b| b.robot_id.as_str()).collect::<Vec<_>>())
        .bind(beats.iter().map(|b| run_state_str(b.state)).collect::<Vec<_>>())
        .bind(beats.iter().map(|b| b.cpu_percent).collect::<Vec<_>>())
        .bind(beats.iter().map(|b| b.memory_mb).collect::<Vec<_>>())
        .bind(beats.iter().map(|b| b.sent_at).collect::<Vec<_>>())
        .bind(beats.iter().map(|b| b.max_jobs as i32).collect::<Vec<_>>())
        .bind(beats.iter().map(|b| json!(b.capabilities).to_string()).collect::<Vec<_>>())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// The latest progress of each attempt in the batch, in one statement.
    ///
    /// A robot reports its last node just before its completion, but progress is recorded
    /// without waiting (coalesced, lingering) while the completion is awaited, so the completion
    /// may commit first. The node of an attempt that has just ended is still recorded (its
    /// progress figure is not: the completion set it), so a finished job shows the node it ended
    /// on. A cancelled, timed-out (its robot may still be running) or superseded attempt records
    /// nothing.
    async fn progress_many(&self, records: Vec<ProgressRecord>) -> StoreResult<()> {
        let mut latest: HashMap<(JobId, i32, Uuid), ProgressRecord> = HashMap::with_capacity(records.len());
        for r in records {
            latest.insert((r.job_id, r.attempt, r.session.0), r);
        }
        let records: Vec<ProgressRecord> = latest.into_values().collect();
        let sql = format!(
            "WITH {}
            UPDATE jobs SET progress = CASE WHEN l.status = 'running' THEN u.progress ELSE jobs.progress END,
                current_node = u.node
            FROM unnest($1::uuid[], $2::text[], $3::int[], $4::int2[], $5::text[], $6::text[], $7::uuid[])
                AS u(job_id, tenant, attempt, progress, node, robot_id, session_id), l
            WHERE l.job_id = u.job_id AND jobs.job_id = l.job_id AND l.tenant = u.tenant
              AND l.attempt = u.attempt AND l.status IN ('running', 'completed', 'failed')
              AND l.robot_id = u.robot_id AND l.session_id = u.session_id",
            lock_in_order(1)
        );
        sqlx::query(&sql)
            .bind(records.iter().map(|r| r.job_id.0).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.tenant.as_str()).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.attempt).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.progress.clamp(0, 100)).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.node.as_deref()).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.robot.as_str()).collect::<Vec<_>>())
            .bind(records.iter().map(|r| r.session.0).collect::<Vec<_>>())
            .execute(&self.writer)
            .await?;
        Ok(())
    }
}

/// The status, history kind and error type an outcome records.
pub(super) fn outcome_columns(outcome: RunOutcome) -> (&'static str, &'static str, Option<&'static str>) {
    match outcome {
        RunOutcome::Completed => ("completed", "job.completed", None),
        RunOutcome::Failed => ("failed", "job.failed", Some("workflow_error")),
        RunOutcome::Cancelled => ("cancelled", "job.cancelled", None),
        RunOutcome::TimedOut => ("timed_out", "job.timed_out", Some("timeout")),
    }
}

/// What an inserted job looks like to the submitter.
pub(super) fn inserted(job: &NewJob, placement: &Placement, created_at: OffsetDateTime) -> Inserted {
    let (status, subject, reason) = placement.columns();
    let queued = status == "queued";
    Inserted {
        job_id: job.job_id,
        status: if queued { JobStatus::Queued } else { JobStatus::Pending },
        offer_no: if queued { 1 } else { 0 },
        waiting_reason: reason.map(str::to_owned),
        created_at,
        offer_subject: subject.map(str::to_owned),
        existing: false,
    }
}

/// The history data of a submission: what was asked for and where it went.
fn submitted_data(job: &NewJob, placement: &Placement) -> (Value, Value) {
    let (status, _, reason) = placement.columns();
    let target = match placement {
        Placement::Offer { target, .. } => Some(target.as_str()),
        Placement::Pending { .. } => None,
    };
    let submitted = json!({
        "workflow_id": job.workflow_id,
        "workflow_name": job.workflow_name,
        "priority": job.priority,
        "requires": job.requires,
        "target_robot_id": job.target_robot_id,
        "status": status,
        "waiting_reason": reason,
    });
    (submitted, json!({ "offer_no": 1, "target": target }))
}

/// The columns of a batch of submissions, one array each.
#[derive(Default)]
struct InsertColumns {
    job_id: Vec<Uuid>,
    tenant: Vec<String>,
    workflow_id: Vec<String>,
    workflow_name: Vec<String>,
    format: Vec<&'static str>,
    workflow: Vec<String>,
    variables: Vec<String>,
    metadata: Vec<String>,
    requires: Vec<String>,
    priority: Vec<i16>,
    trigger_type: Vec<String>,
    execution_mode: Vec<String>,
    target_robot_id: Vec<Option<String>>,
    timeout_s: Vec<Option<i64>>,
    status: Vec<&'static str>,
    waiting_reason: Vec<Option<String>>,
    offer_subject: Vec<Option<String>>,
    max_attempts: Vec<i32>,
    request_id: Vec<Uuid>,
    idempotency_key: Vec<Option<String>>,
    submitted: Vec<String>,
    assigned: Vec<String>,
    actor: Vec<String>,
}

impl InsertColumns {
    fn push(&mut self, job: &NewJob, placement: &Placement) {
        let (status, subject, reason) = placement.columns();
        let (submitted, assigned) = submitted_data(job, placement);
        self.job_id.push(job.job_id.0);
        self.tenant.push(job.tenant.as_str().to_owned());
        self.workflow_id.push(job.workflow_id.clone());
        self.workflow_name.push(job.workflow_name.clone());
        self.format.push(job.format.as_str());
        // As text: sqlx sends `Json` as jsonb, which would sort the keys.
        self.workflow.push(job.workflow.to_string());
        self.variables.push(Value::Object(job.variables.clone()).to_string());
        self.metadata.push(Value::Object(job.metadata.clone()).to_string());
        self.requires.push(json!(job.requires).to_string());
        self.priority.push(job.priority);
        self.trigger_type.push(job.trigger_type.clone());
        self.execution_mode.push(job.execution_mode.clone());
        self.target_robot_id.push(job.target_robot_id.as_ref().map(|r| r.as_str().to_owned()));
        self.timeout_s.push(job.timeout_s.map(|t| t as i64));
        self.status.push(status);
        self.waiting_reason.push(reason.map(str::to_owned));
        self.offer_subject.push(subject.map(str::to_owned));
        self.max_attempts.push(job.max_attempts);
        self.request_id.push(job.request_id.0);
        self.idempotency_key.push(job.idempotency_key.clone());
        self.submitted.push(submitted.to_string());
        self.assigned.push(assigned.to_string());
        self.actor.push(job.actor.clone());
    }
}
