//! Robots that speak HTTP (`fleet.api.agent.*`): the Canvas's robot-facing endpoints, served on
//! the same claim, lease and fencing as NATS robots, so a team can move its existing robots onto
//! Fleet one by one.
//!
//! The orchestrator acts as the robot on its behalf, so nothing about ownership is new:
//! - **Liveness.** A heartbeat is written into the `fleet_robots` bucket exactly as a NATS
//!   robot's (per-message TTL = heartbeat timeout), and the watcher in [`crate::heartbeats`]
//!   does the rest: online, slots, expiry → offline. The robot's description (capabilities,
//!   slots) is its registration (`POST /api/v1/robots/register`), never the heartbeat's body.
//! - **Session.** An HTTP robot has no process of ours to carry a session id, so the
//!   orchestrator keeps one for it: the session recorded on the robot's row, kept while the
//!   robot's heartbeat entry is alive. A heartbeat or claim that finds no live entry starts a new
//!   session through the ordinary registration ([`crate::robots::register`]), which also expires
//!   the jobs of the previous one, exactly as a restarted NATS robot's.
//! - **Claim.** One no-wait pull from the robot's own consumer (targeted jobs first), then from
//!   its class consumer, with the pull priority a NATS robot would use; the offer is claimed with
//!   the ordinary compare-and-set and acked only once the claim is accepted (a refused claim
//!   terminates the stale offer, an unavailable store NAKs it with a delay), as
//!   `robot/src/pull.rs` does. So priority, capabilities, best fit and tenant isolation are
//!   admission's, unchanged.
//! - **Reports** (extend the lease, complete, fail, release) carry no attempt on HTTP, so each is
//!   fenced on what the record says the robot holds: the job is `running` on this robot in its
//!   current session, and the attempt is the one read; the store's statements then fence on that
//!   attempt (and the session, for renewals) as for any robot. Anything else is a conflict (409).
//!
//! A failure reported with `fail` ends the job `failed`, like a NATS robot's failed run: retries
//! (attempts) are for robots lost under a job, not for workflows that fail, which would run an
//! RPA workflow's side effects again unasked; `POST /api/v1/jobs/{id}/retry` retries on purpose.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use fleet_schemas::api::{
    AgentBeat, AgentClaim, AgentHeartbeat, AgentJob, AgentJobReport, AgentReport, AgentReported, ApiError,
    ApiRequest, ApiResult, JobStatus,
};
use fleet_schemas::codec::{decode, encode};
use fleet_schemas::robot::{
    Heartbeat, Offer, RegisterRequest, RobotMode, RobotReply, RobotRunState, RunOutcome, RunningJob,
};
use fleet_schemas::{Class, JobId, RobotId, SessionId, TenantId, subjects};
use futures::StreamExt;
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::Core;
use crate::store::{StoreError, Verdict};

/// The lease an HTTP robot may ask for, in seconds. Below 5 s a lease lapses between two
/// renewals of a robot on a loaded machine; above an hour a lost robot's job waits too long
/// before it is offered again (a longer job extends its lease).
pub const LEASE_RANGE_S: std::ops::RangeInclusive<u32> = 5..=3600;

/// Offers looked at in one claim: a stale one (claimed, cancelled) is terminated and the next
/// looked at, but one HTTP call must stay short.
const OFFERS_PER_CLAIM: usize = 4;

/// Delay of a NAK when the claim could not be recorded, as a NATS robot's.
const NAK_DELAY: Duration = Duration::from_secs(1);

/// How long the heartbeat's publish may wait for the stream's ack.
const BEAT_ACK: Duration = Duration::from_secs(3);

/// What the robot's registration says about it.
struct Registered {
    name: String,
    hostname: String,
    environment: String,
    /// The effective capabilities (what routing uses).
    capabilities: Vec<String>,
    /// What the robot offers: its binding's record when it is bound to a key (the registration
    /// then holds only the effective part), else its registration.
    offered: Vec<String>,
    tags: Vec<String>,
    max_jobs: u32,
    session: Option<Uuid>,
}

/// A binding refused, as the API answers it.
pub(crate) fn bind_error(e: crate::store::BindError) -> ApiError {
    match e {
        crate::store::BindError::Store(e) => e.into(),
        // `Conflict` is what the gateway answers 409 with the message: the key cannot act here.
        other => conflict(format!("robot key: {other}")),
    }
}

fn robot_not_found() -> ApiError {
    ApiError::NotFound { what: "robot".into() }
}

fn conflict(message: impl Into<String>) -> ApiError {
    ApiError::Conflict { message: message.into() }
}

fn lease(lease_s: u32, field: &str) -> ApiResult<Duration> {
    if LEASE_RANGE_S.contains(&lease_s) {
        Ok(Duration::from_secs(u64::from(lease_s)))
    } else {
        Err(ApiError::Invalid {
            field: field.into(),
            message: format!("must be {} to {} seconds", LEASE_RANGE_S.start(), LEASE_RANGE_S.end()),
        })
    }
}

/// The robot's registration; 404 when it is not registered in the tenant.
async fn registered(core: &Core, tenant: &TenantId, robot: &RobotId) -> ApiResult<Registered> {
    type Row = (String, String, String, Vec<String>, Vec<String>, Vec<String>, i32, Option<Uuid>);
    let row: Option<Row> = sqlx::query_as(
        "SELECT r.name, r.hostname, r.environment, r.capabilities, coalesce(b.offered, r.capabilities),
                r.tags, r.max_jobs, r.session_id
         FROM robots r LEFT JOIN robot_bindings b ON b.tenant = r.tenant AND b.robot_id = r.robot_id
         WHERE r.tenant = $1 AND r.robot_id = $2",
    )
    .bind(tenant.as_str())
    .bind(robot.as_str())
    .fetch_optional(&core.store.pool)
    .await
    .map_err(StoreError::from)?;
    let (name, hostname, environment, capabilities, offered, tags, max_jobs, session) =
        row.ok_or_else(robot_not_found)?;
    let max_jobs = u32::try_from(max_jobs).unwrap_or(1).max(1);
    Ok(Registered { name, hostname, environment, capabilities, offered, tags, max_jobs, session })
}

/// The jobs running on the robot in `session`.
async fn running(
    core: &Core,
    tenant: &TenantId,
    robot: &RobotId,
    session: SessionId,
) -> ApiResult<Vec<RunningJob>> {
    let rows: Vec<(Uuid, i32)> = sqlx::query_as(
        "SELECT job_id, attempt FROM jobs
         WHERE tenant = $1 AND robot_id = $2 AND session_id = $3 AND status = 'running'",
    )
    .bind(tenant.as_str())
    .bind(robot.as_str())
    .bind(session.0)
    .fetch_all(&core.store.pool)
    .await
    .map_err(StoreError::from)?;
    Ok(rows.into_iter().map(|(job, attempt)| RunningJob { job_id: JobId(job), attempt }).collect())
}

/// The session of the robot's live heartbeat entry, if it has one.
async fn live_session(core: &Core, tenant: &TenantId, robot: &RobotId) -> ApiResult<Option<SessionId>> {
    let key = subjects::heartbeat_key(tenant, robot);
    let entry = core.fabric.robots_kv.entry(key).await.map_err(|e| ApiError::Unavailable {
        message: format!("cannot read the heartbeat bucket: {e}"),
        retry_after_s: 1,
    })?;
    Ok(entry
        .filter(|e| e.operation == jetstream::kv::Operation::Put)
        .and_then(|e| decode::<Heartbeat>("heartbeat", &e.value).ok())
        .map(|hb| hb.session_id))
}

/// Per HTTP robot, a lock around choosing its session and writing its heartbeat, and around each
/// claim. Without it, a heartbeat and a claim arriving together (the seed's agent runs both on
/// their own timers) each started a session, and the loser's job was expired by the winner's
/// registration; and two claims at once could each take the robot's last slot.
/// One entry per HTTP robot that ever called, so bounded by the registered robots.
#[derive(Default)]
pub struct SessionLocks(std::sync::Mutex<HashMap<(TenantId, RobotId), SessionLock>>);

type SessionLock = Arc<tokio::sync::Mutex<()>>;

impl SessionLocks {
    fn of(&self, tenant: &TenantId, robot: &RobotId) -> SessionLock {
        let mut locks = self.0.lock().expect("not poisoned");
        locks.entry((tenant.clone(), robot.clone())).or_default().clone()
    }
}

/// The robot's session: the recorded one while its heartbeat is alive, else a new one, registered
/// as a NATS robot's would be. A new session's heartbeat is written at once (a claim is a sign of
/// life too: a robot that claims before its first heartbeat is online from then on), and with
/// `metrics` (a heartbeat) it is written in any case. The caller holds the robot's lock.
async fn session(
    core: &Core,
    tenant: &TenantId,
    robot: &RobotId,
    key_id: Option<&str>,
    reg: &Registered,
    metrics: Option<(Option<f32>, Option<f64>)>,
) -> ApiResult<SessionId> {
    let live = live_session(core, tenant, robot).await?;
    // Read again under the lock: another call may have started a session since `reg` was read.
    let recorded = registered(core, tenant, robot).await?.session;
    let session = match (live, recorded) {
        (Some(live), Some(recorded)) if live.0 == recorded => live,
        _ => register(core, tenant, robot, key_id, reg).await?,
    };
    if metrics.is_some() || live != Some(session) {
        beat(core, tenant, robot, reg, session, metrics.unwrap_or_default()).await?;
    }
    Ok(session)
}

/// The state directory an HTTP robot registers with: it has none of ours, and one that is not
/// empty keeps the duplicate-identity guard on (a NATS robot process cannot take its id).
const HTTP_STATE_DIR: &str = "http-agent";

async fn register(
    core: &Core,
    tenant: &TenantId,
    robot: &RobotId,
    key_id: Option<&str>,
    reg: &Registered,
) -> ApiResult<SessionId> {
    // The robot key calling is the robot's binding: it gets what it offers that the key grants.
    if let Some(key_id) = key_id {
        let offered: Vec<fleet_schemas::Capability> =
            reg.offered.iter().filter_map(|c| fleet_schemas::Capability::new(c.as_str()).ok()).collect();
        core.store.bind_robot_key(tenant, robot, key_id, &offered).await.map_err(bind_error)?;
    }
    let session = SessionId::new();
    let req = RegisterRequest {
        v: fleet_schemas::robot::ROBOT_PROTOCOL_VERSION,
        session_id: session,
        name: reg.name.clone(),
        hostname: reg.hostname.clone(),
        capabilities: reg.offered.clone(),
        max_jobs: reg.max_jobs,
        version: AGENT_VERSION.into(),
        environment: reg.environment.clone(),
        tags: reg.tags.clone(),
        state_dir_id: HTTP_STATE_DIR.into(),
    };
    match crate::robots::register(core, tenant, robot, req).await {
        RobotReply::Accepted(_) => Ok(session),
        RobotReply::Refused { reason } => Err(conflict(reason)),
        RobotReply::Unavailable { reason } => {
            Err(ApiError::Unavailable { message: reason, retry_after_s: 1 })
        }
    }
}

/// What the robot's heartbeats say it runs: HTTP robots are not a Fleet robot binary.
const AGENT_VERSION: &str = "http-agent";

/// Write the robot's heartbeat into the bucket, as a NATS robot does (the watcher takes it from
/// there). Its state follows the robot's desired state, so a paused HTTP robot is not counted
/// as capacity.
async fn beat(
    core: &Core,
    tenant: &TenantId,
    robot: &RobotId,
    reg: &Registered,
    session: SessionId,
    (cpu_percent, memory_mb): (Option<f32>, Option<f64>),
) -> ApiResult<()> {
    let state = match desired_mode(core, tenant, robot).await? {
        RobotMode::Online => RobotRunState::Online,
        RobotMode::Paused => RobotRunState::Paused,
        RobotMode::Maintenance => RobotRunState::Maintenance,
    };
    let hb = Heartbeat {
        v: fleet_schemas::robot::ROBOT_PROTOCOL_VERSION,
        tenant: tenant.clone(),
        robot_id: robot.clone(),
        session_id: session,
        name: reg.name.clone(),
        hostname: reg.hostname.clone(),
        state,
        capabilities: reg.capabilities.clone(),
        max_jobs: reg.max_jobs,
        running: running(core, tenant, robot, session).await?,
        cpu_percent,
        memory_mb,
        version: AGENT_VERSION.into(),
        metrics: Default::default(),
        sent_at: OffsetDateTime::now_utc(),
    };
    let publish = PublishMessage::build().ttl(core.config.heartbeat_ttl()).payload(encode(&hb).into());
    let subject = subjects::heartbeat_subject(tenant, robot);
    let sent = async {
        let ack = core.fabric.js.send_publish(subject, publish).await.map_err(|e| e.to_string())?;
        ack.await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(BEAT_ACK, sent).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            Err(ApiError::Unavailable { message: format!("heartbeat not stored: {e}"), retry_after_s: 1 })
        }
        Err(_) => {
            Err(ApiError::Unavailable { message: "heartbeat not stored in time".into(), retry_after_s: 1 })
        }
    }
}

async fn desired_mode(core: &Core, tenant: &TenantId, robot: &RobotId) -> ApiResult<RobotMode> {
    Ok(core.store.desired_state(tenant, robot).await?.map_or(RobotMode::Online, |d| d.mode))
}

/// `POST /api/v1/robots/{id}/heartbeat`, and the goodbye of `PUT …/status` with `offline`.
pub async fn heartbeat(core: &Core, req: ApiRequest<AgentHeartbeat>) -> ApiResult<AgentBeat> {
    let (tenant, body) = (&req.tenant, &req.body);
    // Another robot's id is answered as one that does not exist: to this key, it does not.
    if body.robot_id != body.key_robot {
        return Err(robot_not_found());
    }
    let robot = &body.key_robot;
    let reg = registered(core, tenant, robot).await?;
    if crate::api::past_deadline(&req) {
        return Err(crate::api::deadline_error());
    }
    if body.offline {
        // Deleting the entry is what expiry does: the watcher marks the robot offline. Under the
        // robot's lock, so a heartbeat in flight does not write the entry back after it.
        let lock = core.http_sessions.of(tenant, robot);
        let _held = lock.lock().await;
        core.fabric.robots_kv.delete(subjects::heartbeat_key(tenant, robot)).await.map_err(|e| {
            ApiError::Unavailable {
                message: format!("cannot update the heartbeat bucket: {e}"),
                retry_after_s: 1,
            }
        })?;
    } else {
        let lock = core.http_sessions.of(tenant, robot);
        let _held = lock.lock().await;
        let key = body.key_id.as_deref();
        session(core, tenant, robot, key, &reg, Some((body.cpu_percent, body.memory_mb))).await?;
    }
    Ok(AgentBeat { timestamp: OffsetDateTime::now_utc() })
}

/// `POST /api/v1/jobs/claim`: the next offer this robot may run, claimed, or `None`.
pub async fn claim(core: &Core, req: ApiRequest<AgentClaim>) -> ApiResult<Option<AgentJob>> {
    let (tenant, robot) = (&req.tenant, &req.body.key_robot);
    let lease = lease(req.body.lease_s, "visibility_timeout_seconds")?;
    let reg = registered(core, tenant, robot).await?;
    // The whole claim under the robot's lock: two claims of one robot at once would each see a
    // free slot and together overfill it.
    let lock = core.http_sessions.of(tenant, robot);
    let _held = lock.lock().await;
    let session = session(core, tenant, robot, req.body.key_id.as_deref(), &reg, None).await?;
    if desired_mode(core, tenant, robot).await? != RobotMode::Online {
        return Ok(None);
    }
    // The robot's slots are the record's, whatever the robot does with its answers.
    let busy = running(core, tenant, robot, session).await?.len() as u32;
    let Some(free) = reg.max_jobs.checked_sub(busy).filter(|f| *f > 0) else { return Ok(None) };
    let class = Class::parse(&reg.capabilities).map_err(|e| ApiError::Invalid {
        field: "capabilities".into(),
        message: format!("the robot's registration: {e}"),
    })?;
    let consumers = [
        core.fabric.ensure_robot_consumer(tenant, robot).await,
        core.fabric.ensure_class_consumer(tenant, &class).await,
    ];
    let priority = 9 - free.min(9) as usize;
    let mut looked = 0;
    for name in consumers {
        let name = name.map_err(|e| ApiError::Unavailable { message: e.to_string(), retry_after_s: 1 })?;
        let consumer: PullConsumer = core.fabric.jobs.get_consumer(&name).await.map_err(|e| {
            ApiError::Unavailable { message: format!("consumer {name}: {e}"), retry_after_s: 1 }
        })?;
        while looked < OFFERS_PER_CLAIM {
            let Some(msg) = fetch_one(&consumer, priority).await? else { break };
            looked += 1;
            if let Some(job) = take(core, &req, &reg, session, lease, msg).await? {
                return Ok(Some(job));
            }
        }
    }
    Ok(None)
}

/// One no-wait pull: at most one message, none when the consumer holds nothing for us. It is
/// bounded by the gateway's deadline like the rest of the call.
async fn fetch_one(consumer: &PullConsumer, priority: usize) -> ApiResult<Option<jetstream::Message>> {
    let unavailable =
        |e: String| ApiError::Unavailable { message: format!("pulling an offer: {e}"), retry_after_s: 1 };
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        // No `expires`: with one, a no-wait pull on an empty consumer waits it out (measured:
        // 1 s per consumer); without, the server answers "no messages" at once.
        .group(subjects::PULL_GROUP)
        .priority(priority)
        .messages()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    match batch.next().await {
        None => Ok(None),
        Some(Ok(m)) => Ok(Some(m)),
        Some(Err(e)) => Err(unavailable(e.to_string())),
    }
}

async fn settle(msg: &jetstream::Message, kind: AckKind) {
    if let Err(e) = msg.ack_with(kind).await {
        tracing::debug!(error = %e, ?kind, "could not settle an offer");
    }
}

/// Claim one pulled offer for the robot: the job, or `None` when the offer was stale.
async fn take(
    core: &Core,
    req: &ApiRequest<AgentClaim>,
    reg: &Registered,
    session: SessionId,
    lease: Duration,
    msg: jetstream::Message,
) -> ApiResult<Option<AgentJob>> {
    let (tenant, robot) = (&req.tenant, &req.body.key_robot);
    let offer: Offer = match decode("offer", &msg.payload) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(subject = %msg.subject, error = %e, "malformed offer; terminating it");
            settle(&msg, AckKind::Term).await;
            return Ok(None);
        }
    };
    // A claim the caller will never hear of would hold the job for a whole lease.
    if crate::api::past_deadline(req) {
        settle(&msg, AckKind::Nak(Some(NAK_DELAY))).await;
        return Err(crate::api::deadline_error());
    }
    // A robot bound to a key claims only jobs within its effective capabilities.
    if core.fleet.is_bound(tenant, robot)
        && let Some(reason) = core.store.claim_refusal(tenant, robot, offer.job_id).await?
    {
        tracing::info!(job_id = %offer.job_id, %reason, "offer outside the robot's grant; giving it back");
        settle(&msg, AckKind::Nak(Some(NAK_DELAY))).await;
        return Ok(None);
    }
    let claimed = match core.store.claim(tenant, robot, session, offer.job_id, offer.offer_no, lease).await {
        Ok(Verdict::Accepted(c)) => c,
        Ok(Verdict::Refused(reason)) => {
            tracing::debug!(job_id = %offer.job_id, %reason, "stale offer; terminating it");
            settle(&msg, AckKind::Term).await;
            return Ok(None);
        }
        Err(e) => {
            settle(&msg, AckKind::Nak(Some(NAK_DELAY))).await;
            return Err(e.into());
        }
    };
    if let Some(subject) = &claimed.offer_subject {
        core.fleet.unoffered(tenant, subject);
    }
    core.fleet.started(tenant, robot, offer.job_id);
    core.wake_relay.notify_one();
    // The claim is what counts; a failed ack only means the offer may come again, and its
    // claim is then refused (claimed) or answered as ours.
    if let Err(e) = msg.double_ack().await {
        tracing::warn!(error = %e, job_id = %offer.job_id, "could not ack a claimed offer");
    }
    type Row = (String, i16, OffsetDateTime, Option<OffsetDateTime>, i32);
    let (workflow_id, priority, created_at, claimed_at, max_attempts): Row = sqlx::query_as(
        "SELECT workflow_id, priority, created_at, claimed_at, max_attempts FROM jobs WHERE job_id = $1",
    )
    .bind(offer.job_id.0)
    .fetch_one(&core.store.pool)
    .await
    .map_err(StoreError::from)?;
    tracing::info!(%tenant, %robot, job_id = %offer.job_id, attempt = claimed.attempt, "job claimed by an HTTP robot");
    Ok(Some(AgentJob {
        job_id: offer.job_id,
        workflow_id,
        workflow_name: claimed.workflow_name,
        workflow: claimed.workflow,
        priority,
        environment: reg.environment.clone(),
        variables: claimed.variables,
        created_at,
        claimed_at: claimed_at.unwrap_or_else(OffsetDateTime::now_utc),
        retry_count: claimed.attempt - 1,
        max_retries: (max_attempts - 1).max(0),
    }))
}

/// `extend-lease`, `complete`, `fail`, `release` of a job the robot holds.
pub async fn report(core: &Core, req: ApiRequest<AgentJobReport>) -> ApiResult<AgentReported> {
    let (tenant, robot, job_id) = (&req.tenant, &req.body.key_robot, req.body.job_id);
    let extend_to = match &req.body.report {
        AgentReport::ExtendLease { lease_s } => Some(lease(*lease_s, "extension_seconds")?),
        _ => None,
    };
    let reg = registered(core, tenant, robot).await?;
    type Row = (String, i32, Option<String>, Option<Uuid>);
    let row: Option<Row> = sqlx::query_as(
        "SELECT status, attempt, robot_id, session_id FROM jobs WHERE job_id = $1 AND tenant = $2",
    )
    .bind(job_id.0)
    .bind(tenant.as_str())
    .fetch_optional(&core.store.pool)
    .await
    .map_err(StoreError::from)?;
    let (status, attempt, holder, held_in) = row.ok_or_else(|| ApiError::NotFound { what: "job".into() })?;
    let ours = holder.as_deref() == Some(robot.as_str());
    let reported = |status| Ok(AgentReported { job_id, status });
    // A repeated final report (its answer was lost) is answered as the first was.
    match (&req.body.report, status.as_str()) {
        (AgentReport::Complete { .. }, "completed") if ours => return reported(JobStatus::Completed),
        (AgentReport::Fail { .. }, "failed") if ours => return reported(JobStatus::Failed),
        _ => {}
    }
    let session = match (reg.session, held_in) {
        (Some(s), Some(h)) if status == "running" && ours && s == h => SessionId(s),
        _ => {
            return Err(conflict(format!(
                "robot {robot} does not hold job {job_id} (it is {status}{})",
                if status == "running" && !ours { " on another robot" } else { "" }
            )));
        }
    };
    if crate::api::past_deadline(&req) {
        return Err(crate::api::deadline_error());
    }
    let superseded =
        |reason: String| conflict(format!("robot {robot} no longer holds job {job_id}: {reason}"));
    match &req.body.report {
        AgentReport::ExtendLease { .. } => {
            let lease = extend_to.unwrap_or(core.config.job_lease);
            match core.store.renew(tenant, session, job_id, attempt, lease).await? {
                Verdict::Accepted(false) => reported(JobStatus::Running),
                Verdict::Accepted(true) => {
                    // The robot learns of a cancel only here: end the job for it, so the slot
                    // frees now rather than when the lease lapses.
                    // Refused only if the attempt ended meanwhile, which also frees the slot.
                    let cancelled = RunOutcome::Cancelled;
                    let _ = end(core, tenant, robot, session, job_id, attempt, cancelled, &Value::Null, None)
                        .await?;
                    Err(conflict(format!("job {job_id} was cancelled; stop running it")))
                }
                Verdict::Refused(reason) => Err(superseded(reason)),
            }
        }
        AgentReport::Complete { result } => {
            end(core, tenant, robot, session, job_id, attempt, RunOutcome::Completed, result, None)
                .await?
                .map_err(superseded)?;
            reported(JobStatus::Completed)
        }
        AgentReport::Fail { error_message } => {
            let error = Some(error_message.as_str());
            end(core, tenant, robot, session, job_id, attempt, RunOutcome::Failed, &Value::Null, error)
                .await?
                .map_err(superseded)?;
            reported(JobStatus::Failed)
        }
        AgentReport::Release => {
            let max = core.config.max_rejections;
            let reason = "released by the robot";
            match core
                .store
                .give_back(tenant, robot, session, job_id, None, Some(attempt), reason, false, max)
                .await?
            {
                Verdict::Accepted(back) => {
                    crate::robots::given_back(core, tenant, robot, job_id, &back);
                    reported(JobStatus::Pending)
                }
                Verdict::Refused(reason) => Err(superseded(reason)),
            }
        }
    }
}

/// Record the end of the robot's attempt, with the bookkeeping of a NATS robot's completion.
#[allow(clippy::too_many_arguments)]
async fn end(
    core: &Core,
    tenant: &TenantId,
    robot: &RobotId,
    session: SessionId,
    job_id: JobId,
    attempt: i32,
    outcome: RunOutcome,
    output: &Value,
    error: Option<&str>,
) -> ApiResult<Result<(), String>> {
    match core.store.complete(tenant, robot, session, job_id, attempt, outcome, output, error, None).await? {
        Verdict::Accepted(()) => {
            core.fleet.ended(tenant, robot, job_id);
            core.wake_relay.notify_one();
            core.wake_admission.notify_one();
            Ok(Ok(()))
        }
        Verdict::Refused(reason) => Ok(Err(reason)),
    }
}
