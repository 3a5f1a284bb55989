//! Requests from robots (`fleet.robot.<tenant>.<robot>.<verb>`).
//!
//! The tenant and robot come from the subject, never from the payload, so that subject
//! permissions (one robot may only publish on its own subjects) are all the isolation needed.
//! Every answer is `Accepted`, `Refused` (stop retrying) or `Unavailable` (retry): a store
//! failure is never reported as a refusal, since a robot stops a job only when refused.
//!
//! Subject permissions do not tell two sessions of one robot id apart, so every report of a
//! running attempt (complete, release, reject after a claim, progress; renewals already were) is
//! fenced on the session holding it, and a registration must carry its state directory id, without
//! which the duplicate-identity guard could not refuse a second process taking over the id. A
//! robot bound to a key registers with, and claims within, its attested capabilities.

use std::sync::Arc;

use fleet_schemas::codec::{decode, encode};
use fleet_schemas::robot::{
    Ack, ClaimGrant, ClaimRequest, CompleteRequest, DesiredReply, DesiredRequest, DesiredState,
    ProgressReport, ROBOT_PROTOCOL_VERSION, RegisterGrant, RegisterRequest, RejectRequest, ReleaseRequest,
    RenewGrant, RenewRequest, RobotReply, RunOutcome,
};
use fleet_schemas::subjects::{self, RobotVerb};
use fleet_schemas::workflow::WorkflowFormat;
use fleet_schemas::{Capability, Class, RobotId, TenantId};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::store::{Attested, GivenBack, StoreError, Verdict};
use crate::{Core, reply};

pub async fn handle(core: Arc<Core>, msg: async_nats::Message) {
    let Some((tenant, robot, verb)) = subjects::parse_robot_request(&msg.subject) else {
        tracing::debug!(subject = %msg.subject, "ignoring request on a malformed robot subject");
        return;
    };
    let c = &core;
    let (t, r) = (&tenant, &robot);
    let payload = match verb {
        RobotVerb::Register => call(&msg.payload, "register", |q| register(c, t, r, q)).await,
        RobotVerb::Claim => call(&msg.payload, "claim", |q| claim(c, t, r, q)).await,
        RobotVerb::Renew => call(&msg.payload, "renew", |q| renew(c, t, q)).await,
        RobotVerb::Complete => call(&msg.payload, "complete", |q| complete(c, t, r, q)).await,
        RobotVerb::Reject => call(&msg.payload, "reject", |q| reject(c, t, r, q)).await,
        RobotVerb::Release => call(&msg.payload, "release", |q| release(c, t, r, q)).await,
        RobotVerb::Progress => {
            progress(c, t, r, &msg.payload).await;
            return;
        }
        RobotVerb::Desired => call(&msg.payload, "desired", |_: DesiredRequest| desired(c, t, r)).await,
    };
    reply(&core, &msg, payload).await;
}

/// The robot's desired state, from the commands bucket the orchestrator keeps (robots have no
/// JetStream rights on it: they ask).
async fn desired(core: &Core, tenant: &TenantId, robot: &RobotId) -> RobotReply<DesiredReply> {
    let key = subjects::command_key(tenant, robot);
    match core.fabric.commands_kv.get(&key).await {
        Ok(None) => RobotReply::Accepted(DesiredReply { v: ROBOT_PROTOCOL_VERSION, desired: None }),
        Ok(Some(value)) => match decode::<DesiredState>("desired state", &value) {
            Ok(d) => RobotReply::Accepted(DesiredReply { v: ROBOT_PROTOCOL_VERSION, desired: Some(d) }),
            Err(e) => RobotReply::Unavailable { reason: format!("stored desired state unreadable: {e}") },
        },
        Err(e) => RobotReply::Unavailable { reason: format!("reading the desired state: {e}") },
    }
}

async fn call<Q, A, F, Fut>(payload: &[u8], what: &'static str, handler: F) -> Vec<u8>
where
    Q: DeserializeOwned,
    A: Serialize,
    F: FnOnce(Q) -> Fut,
    Fut: std::future::Future<Output = RobotReply<A>>,
{
    let answer = match decode::<Q>(what, payload) {
        Ok(q) => handler(q).await,
        Err(e) => RobotReply::Refused { reason: e.to_string() },
    };
    encode(&answer)
}

fn unavailable<A>(e: StoreError) -> RobotReply<A> {
    if let StoreError::Other(e) = &e {
        tracing::error!(error = %e, "database error answering a robot");
    }
    RobotReply::Unavailable { reason: e.to_string() }
}

fn verdict<T, A>(v: Result<Verdict<T>, StoreError>, accept: impl FnOnce(T) -> A) -> RobotReply<A> {
    match v {
        Ok(Verdict::Accepted(t)) => RobotReply::Accepted(accept(t)),
        Ok(Verdict::Refused(reason)) => RobotReply::Refused { reason },
        Err(e) => unavailable(e),
    }
}

pub(crate) async fn register(
    core: &Core,
    tenant: &TenantId,
    robot: &RobotId,
    req: RegisterRequest,
) -> RobotReply<RegisterGrant> {
    let offered = match Class::parse(&req.capabilities) {
        Ok(c) => c,
        Err(e) => return RobotReply::Refused { reason: format!("capabilities: {e}") },
    };
    if req.max_jobs == 0 {
        return RobotReply::Refused { reason: "max_jobs must be at least 1".into() };
    }
    // Without it the duplicate-identity guard below cannot tell two processes apart, and anyone
    // could take over a live robot's id and expire its running job.
    if req.state_dir_id.trim().is_empty() {
        return RobotReply::Refused {
            reason:
                "state_dir_id must not be empty: it tells this robot process from another with the same id"
                    .into(),
        };
    }
    // A robot bound to a key gets what it offers that the key grants, nothing more.
    let class = match attested_class(core, tenant, robot, offered).await {
        Ok(Ok(class)) => class,
        Ok(Err(reason)) => return RobotReply::Refused { reason },
        Err(e) => return unavailable(e),
    };
    // A second process with the same id but another state directory while the first is alive:
    // refuse it, leaving the live robot undisturbed.
    match core.store.robot_identity(tenant, robot).await {
        Ok(Some((state_dir_id, Some(session))))
            if !state_dir_id.is_empty()
                && state_dir_id != req.state_dir_id
                && session != req.session_id.0
                && core.fleet.is_online(tenant, robot) =>
        {
            return RobotReply::Refused {
                reason: format!(
                    "robot id {robot} is already live in tenant {tenant} with another state directory; \
                     stop it first or start this robot with another --id"
                ),
            };
        }
        Ok(_) => {}
        Err(e) => return unavailable(e),
    }
    // Checked on the server: a robot whose consumer was deleted re-registers to have it back.
    let (class_consumer, robot_consumer) =
        match core.fabric.verify_robot_consumers(tenant, &class, robot).await {
            Ok(names) => names,
            Err(e) => return RobotReply::Unavailable { reason: e.to_string() },
        };
    let caps = class.to_strings();
    // Into the fleet view first: once the robot is visible in the API it is also a candidate
    // for admission (a robot that is alive is a candidate even if recording it fails; it
    // registers again).
    core.fleet.register(tenant, robot, class, req.max_jobs, req.session_id);
    if let Err(e) = core.store.upsert_robot(tenant, robot, &req, &caps).await {
        return unavailable(e);
    }
    // The jobs of an earlier session of this robot are not running any more: re-offer them now
    // rather than after their lease.
    match core.store.expire(Some((tenant, robot, req.session_id))).await {
        Ok(n) if n > 0 => {
            tracing::info!(%robot, jobs = n, "re-offering jobs of the robot's previous session")
        }
        Ok(_) => {}
        Err(e) => return unavailable(e),
    }
    // Re-send the robot's desired state, in case the bucket lost it (or it never got it).
    match core.store.desired_state(tenant, robot).await {
        Ok(Some(desired)) => crate::commands::publish_desired(core, tenant, robot, &desired).await,
        Ok(None) => {}
        Err(e) => return unavailable(e),
    }
    core.wake_relay.notify_one();
    core.admission.reset();
    core.wake_admission.notify_one();
    tracing::info!(%tenant, %robot, capabilities = ?caps, max_jobs = req.max_jobs, "robot registered");
    RobotReply::Accepted(RegisterGrant {
        heartbeat_interval_ms: core.config.heartbeat_interval.as_millis() as u64,
        heartbeat_ttl_ms: core.config.heartbeat_ttl().as_millis() as u64,
        lease_ms: core.config.job_lease.as_millis() as u64,
        class_consumer,
        robot_consumer,
    })
}

/// The class a registering robot gets: what it offers, cut to its key's grant when it is bound
/// to a key (the binding then records the offer). `Ok(Err(reason))`: refused (its key was revoked).
pub(crate) async fn attested_class(
    core: &Core,
    tenant: &TenantId,
    robot: &RobotId,
    offered: Class,
) -> Result<Result<Class, String>, StoreError> {
    let Some(binding) = core.store.binding_of(tenant, robot).await? else {
        core.fleet.set_grant(tenant, robot, crate::fleet::Grant::Unbound);
        core.fleet.set_tls(tenant, robot, false);
        let tls = fleet_schemas::ids::TLS_CAPABILITY;
        return Ok(Ok(Class::new(offered.iter().filter(|c| c.as_str() != tls).cloned()).unwrap_or_default()));
    };
    if binding.revoked {
        core.fleet.set_grant(tenant, robot, crate::fleet::Grant::Revoked);
        return Ok(Err(format!("robot {robot}'s key {} was revoked or has expired", binding.key_id)));
    }
    let granted = binding.granted.map(|g| g.iter().filter_map(|c| Capability::new(c).ok()).collect());
    // `tls` is what the server attested at connect (the callout bound it), never what a robot
    // registers with.
    let tls = fleet_schemas::ids::TLS_CAPABILITY;
    let mut offered: Vec<Capability> = offered.iter().filter(|c| c.as_str() != tls).cloned().collect();
    let tls_attested = binding.effective.iter().any(|c| c == tls);
    core.fleet.set_tls(tenant, robot, tls_attested);
    if tls_attested {
        offered.extend(Capability::new(tls).ok());
    }
    let attested = Attested::new(offered, granted);
    core.store.record_offer(tenant, robot, &attested).await?;
    let class = Class::new(attested.effective.iter().cloned()).unwrap_or_default();
    core.fleet.set_grant(tenant, robot, crate::fleet::Grant::of(attested.granted.as_deref()));
    Ok(Ok(class))
}

async fn claim(core: &Core, tenant: &TenantId, robot: &RobotId, req: ClaimRequest) -> RobotReply<ClaimGrant> {
    let lease = core.config.job_lease;
    // A robot bound to a key claims only jobs within its effective capabilities.
    if core.fleet.is_bound(tenant, robot) {
        match core.store.claim_refusal(tenant, robot, req.job_id).await {
            Ok(Some(reason)) => return RobotReply::Refused { reason },
            Ok(None) => {}
            Err(e) => return unavailable(e),
        }
    }
    let result = core.store.claim(tenant, robot, req.session_id, req.job_id, req.offer_no, lease).await;
    if let Ok(Verdict::Accepted(claimed)) = &result {
        if let Some(subject) = &claimed.offer_subject {
            core.fleet.unoffered(tenant, subject);
        }
        core.fleet.started(tenant, robot, req.job_id);
        core.wake_relay.notify_one();
    }
    // Read after the claim committed: a failure answers `Unavailable`, and the robot's retried
    // claim (same session) is accepted again, so nothing is lost.
    let secrets = match &result {
        Ok(Verdict::Accepted(claimed)) => {
            match crate::secrets::for_claim(core, tenant, &claimed.workflow).await {
                Ok(s) => s,
                Err(e) => return unavailable(e),
            }
        }
        _ => Default::default(),
    };
    verdict(result, |c| ClaimGrant {
        job_id: req.job_id,
        attempt: c.attempt,
        lease_ms: lease.as_millis() as u64,
        format: if c.format == WorkflowFormat::Casare.as_str() {
            WorkflowFormat::Casare
        } else {
            WorkflowFormat::Fleet
        },
        workflow: c.workflow,
        variables: c.variables,
        timeout_s: c.timeout_s.map(|t| t.max(0) as u64),
        workflow_name: c.workflow_name,
        secrets,
    })
}

async fn renew(core: &Core, tenant: &TenantId, req: RenewRequest) -> RobotReply<RenewGrant> {
    let lease = core.config.job_lease;
    let result = core.store.renew(tenant, req.session_id, req.job_id, req.attempt, lease).await;
    verdict(result, |cancel| RenewGrant { lease_ms: lease.as_millis() as u64, cancel })
}

async fn complete(core: &Core, tenant: &TenantId, robot: &RobotId, req: CompleteRequest) -> RobotReply<Ack> {
    // A value the database refuses is the report's fault, not an outage: answering
    // `Unavailable` would have the robot retry it forever with the job held `running`.
    if let Some(field) = unstorable(&req) {
        return RobotReply::Refused { reason: format!("{field} {}", fleet_schemas::text::NUL_MESSAGE) };
    }
    // Name the step in the message people read: "step boom failed: exit status 3: broken".
    let error = match (&req.error, &req.failed_step) {
        (Some(e), Some(step)) if req.outcome == RunOutcome::Failed => {
            Some(format!("step {step} failed: {e}"))
        }
        (e, _) => e.clone(),
    };
    let result = core
        .store
        .complete(
            tenant,
            robot,
            req.session_id,
            req.job_id,
            req.attempt,
            req.outcome,
            &req.output,
            error.as_deref(),
            req.failed_step.as_deref(),
        )
        .await;
    if matches!(result, Ok(Verdict::Accepted(()))) {
        core.fleet.ended(tenant, robot, req.job_id);
        core.wake_relay.notify_one();
        core.wake_admission.notify_one();
    }
    verdict(result, |()| Ack {})
}

/// The first field of a completion that PostgreSQL cannot store.
fn unstorable(req: &CompleteRequest) -> Option<String> {
    if let Some(path) = fleet_schemas::text::nul_at(&req.output) {
        let sep = if path.is_empty() || path.starts_with('[') { "" } else { "." };
        return Some(format!("output{sep}{path}"));
    }
    let has_nul = |s: &Option<String>| s.as_deref().is_some_and(|s| s.contains('\0'));
    if has_nul(&req.error) {
        return Some("error".into());
    }
    has_nul(&req.failed_step).then(|| "failed_step".into())
}

/// Bookkeeping after a job was given back (rejected or released).
pub(crate) fn given_back(
    core: &Core,
    tenant: &TenantId,
    robot: &RobotId,
    job: fleet_schemas::JobId,
    back: &GivenBack,
) {
    if let Some(subject) = &back.offered_on {
        core.fleet.unoffered(tenant, subject);
    } else {
        core.fleet.ended(tenant, robot, job);
    }
    core.wake_relay.notify_one();
    // It went back to pending, ahead of jobs submitted after it.
    core.admission.reset();
    core.wake_admission.notify_one();
}

async fn reject(core: &Core, tenant: &TenantId, robot: &RobotId, req: RejectRequest) -> RobotReply<Ack> {
    let max = core.config.max_rejections;
    let (job, offer, attempt) = (req.job_id, Some(req.offer_no), req.attempt);
    let result = core
        .store
        .give_back(tenant, robot, req.session_id, job, offer, attempt, &req.reason, true, max)
        .await;
    if let Ok(Verdict::Accepted(back)) = &result {
        tracing::info!(%robot, job_id = %job, reason = %req.reason, failed = back.failed, "offer rejected");
        given_back(core, tenant, robot, job, back);
    }
    verdict(result, |_| Ack {})
}

async fn release(core: &Core, tenant: &TenantId, robot: &RobotId, req: ReleaseRequest) -> RobotReply<Ack> {
    let max = core.config.max_rejections;
    let (job, attempt) = (req.job_id, Some(req.attempt));
    let result = core
        .store
        .give_back(tenant, robot, req.session_id, job, None, attempt, &req.reason, false, max)
        .await;
    if let Ok(Verdict::Accepted(back)) = &result {
        given_back(core, tenant, robot, job, back);
    }
    verdict(result, |_| Ack {})
}

async fn progress(core: &Core, tenant: &TenantId, robot: &RobotId, payload: &[u8]) {
    let report: ProgressReport = match decode("progress", payload) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "ignoring malformed progress report");
            return;
        }
    };
    let node = report.current_node.as_deref();
    let (session, job, attempt) = (report.session_id, report.job_id, report.attempt);
    core.store.record_progress(tenant, robot, session, job, attempt, i16::from(report.progress), node);
    let live = serde_json::json!({
        "type": "job.progress",
        "tenant": tenant,
        "job_id": report.job_id,
        "attempt": report.attempt,
        "progress": report.progress,
        "current_node": report.current_node,
    });
    let subject = subjects::live(tenant, "job", "progress");
    let _ = core.client.publish(subject, live.to_string().into()).await;
}
