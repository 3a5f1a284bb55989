//! The API served over NATS (`fleet.api.<area>.<verb>`), which the gateway calls.
//!
//! Every request names its tenant (taken from the caller's key by the gateway) and a deadline.
//! A write is not started after the deadline, so an answer that arrives too late for the
//! gateway never hides a commit the client was told did not happen.

use std::sync::Arc;

use fleet_schemas::api::{
    API_VERSION, ApiError, ApiRequest, ApiResult, Cancelled, Empty, Endpoint, GetById, JobStatus, ListJobs,
    ListRobots, Pong, QueueView, RobotCommandRequest, SubmitJob, Submitted,
};
use fleet_schemas::codec::{decode, encode};
use fleet_schemas::workflow::{self, ParsedWorkflow};
use fleet_schemas::{Capability, Class, JobId, RobotId};
use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use crate::fleet::{Decision, Placing};
use crate::store::{NewJob, Placement};
use crate::{Core, reply};

/// Longest workflow name accepted.
const MAX_NAME: usize = 200;

pub async fn handle(core: Arc<Core>, msg: async_nats::Message) {
    let payload = match Endpoint::from_subject(&msg.subject) {
        Some(Endpoint::SubmitJob) => call(&msg.payload, |r: ApiRequest<SubmitJob>| submit(&core, r)).await,
        Some(Endpoint::GetJob) => call(&msg.payload, |r: ApiRequest<GetById<JobId>>| get_job(&core, r)).await,
        Some(Endpoint::ListJobs) => {
            call(&msg.payload, |r: ApiRequest<ListJobs>| crate::job_pages::list(&core, r)).await
        }
        Some(Endpoint::CancelJob) => {
            call(&msg.payload, |r: ApiRequest<GetById<JobId>>| cancel(&core, r)).await
        }
        Some(Endpoint::ListRobots) => {
            call(&msg.payload, |r: ApiRequest<ListRobots>| list_robots(&core, r)).await
        }
        Some(Endpoint::GetRobot) => {
            call(&msg.payload, |r: ApiRequest<GetById<RobotId>>| get_robot(&core, r)).await
        }
        Some(Endpoint::FleetSummary) => {
            let core = &core;
            call(&msg.payload, |r: ApiRequest<Empty>| async move {
                Ok(core.store.fleet_summary(&r.tenant).await?)
            })
            .await
        }
        Some(Endpoint::RobotCommand) => {
            call(&msg.payload, |r: ApiRequest<RobotCommandRequest>| crate::commands::command(&core, r)).await
        }
        Some(Endpoint::VerifyKey) => call(&msg.payload, |r| crate::keys::verify(&core, r)).await,
        Some(Endpoint::CreateKey) => call(&msg.payload, |r| crate::keys::create_api(&core, r)).await,
        Some(Endpoint::ListKeys) => call(&msg.payload, |r| crate::keys::list(&core, r)).await,
        Some(Endpoint::RevokeKey) => call(&msg.payload, |r| crate::keys::revoke(&core, r)).await,
        Some(Endpoint::RotateKey) => call(&msg.payload, |r| crate::keys::rotate(&core, r)).await,
        Some(Endpoint::DeleteKey) => call(&msg.payload, |r| crate::keys::delete(&core, r)).await,
        Some(Endpoint::ListQueues) => call(&msg.payload, |r: ApiRequest<Empty>| list_queues(&core, r)).await,
        Some(Endpoint::RetryJob) => call(&msg.payload, |r| crate::retry::retry(&core, r)).await,
        Some(Endpoint::RegisterRobot) => call(&msg.payload, |r| crate::registry::register(&core, r)).await,
        Some(Endpoint::UpdateRobot) => call(&msg.payload, |r| crate::registry::update(&core, r)).await,
        Some(Endpoint::DeleteRobot) => call(&msg.payload, |r| crate::registry::delete(&core, r)).await,
        Some(Endpoint::Analytics) => call(&msg.payload, |r| crate::analytics::analytics(&core, r)).await,
        Some(Endpoint::Activity) => call(&msg.payload, |r| crate::analytics::activity(&core, r)).await,
        Some(Endpoint::AgentHeartbeat) => {
            call(&msg.payload, |r| crate::http_robots::heartbeat(&core, r)).await
        }
        Some(Endpoint::AgentClaim) => call(&msg.payload, |r| crate::http_robots::claim(&core, r)).await,
        Some(Endpoint::AgentReport) => call(&msg.payload, |r| crate::http_robots::report(&core, r)).await,
        Some(Endpoint::PutSecret) => call(&msg.payload, |r| crate::secrets::put(&core, r)).await,
        Some(Endpoint::ListSecrets) => call(&msg.payload, |r| crate::secrets::list(&core, r)).await,
        Some(Endpoint::DeleteSecret) => call(&msg.payload, |r| crate::secrets::delete(&core, r)).await,
        Some(Endpoint::Ping) => {
            call(&msg.payload, |_: ApiRequest<Empty>| async {
                Ok(Pong {
                    leader: core.leadership.is_leader(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                })
            })
            .await
        }
        None => {
            encode(&ApiResult::<Empty>::Err(ApiError::NotFound { what: format!("endpoint {}", msg.subject) }))
        }
    };
    reply(&core, &msg, payload).await;
}

/// Decode the request, run the handler, encode the answer.
async fn call<T, R, F, Fut>(payload: &[u8], handler: F) -> Vec<u8>
where
    T: DeserializeOwned,
    R: Serialize,
    F: FnOnce(ApiRequest<T>) -> Fut,
    Fut: std::future::Future<Output = ApiResult<R>>,
{
    let result = match decode::<ApiRequest<T>>("API request", payload) {
        Ok(req) if req.v > API_VERSION => Err(ApiError::Invalid {
            field: "v".into(),
            message: format!("API version {} is newer than this orchestrator's {API_VERSION}", req.v),
        }),
        Ok(req) => handler(req).await,
        Err(e) => Err(ApiError::Invalid { field: "payload".into(), message: e.to_string() }),
    };
    encode(&result)
}

pub(crate) fn past_deadline<T>(req: &ApiRequest<T>) -> bool {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64 > req.deadline_unix_ms
}

pub(crate) fn deadline_error() -> ApiError {
    ApiError::Unavailable {
        message: "request deadline passed before it could be committed".into(),
        retry_after_s: 1,
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::Invalid { field: field.into(), message: message.into() }
}

/// Validate a submission and work out what the job requires.
fn validate(body: &SubmitJob) -> ApiResult<(ParsedWorkflow, Class)> {
    // Requests over NATS do not pass the gateway's check.
    if let Some(field) = serde_json::to_value(body).ok().as_ref().and_then(fleet_schemas::text::nul_at) {
        return Err(invalid(field, fleet_schemas::text::NUL_MESSAGE));
    }
    let name = body.workflow_name.trim();
    if name.is_empty() {
        return Err(invalid("workflow_name", "must not be empty"));
    }
    if name.chars().count() > MAX_NAME {
        return Err(invalid("workflow_name", format!("must be at most {MAX_NAME} characters")));
    }
    if !(0..=20).contains(&body.priority) {
        return Err(invalid("priority", "must be an integer from 0 to 20"));
    }
    if body.timeout_s == Some(0) {
        return Err(invalid("timeout_s", "must be at least 1 second"));
    }
    let parsed = workflow::parse(&body.workflow).map_err(|e| invalid(e.field, e.message))?;
    let mut requires = parsed.requires.clone();
    for (i, cap) in body.required_capabilities.iter().enumerate() {
        let cap = Capability::new(cap.trim())
            .map_err(|e| invalid(format!("required_capabilities[{i}]"), e.to_string()))?;
        requires.insert(cap);
    }
    // A job for the internet runs only on robots the server saw present a verified client
    // certificate (the callout attests `tls`).
    if body.execution_mode == "internet" {
        requires.insert(
            Capability::new(fleet_schemas::ids::TLS_CAPABILITY)
                .map_err(|e| invalid("execution_mode", e.to_string()))?,
        );
    }
    if requires.name().len() > fleet_schemas::ids::MAX_CLASS_LEN {
        return Err(invalid("required_capabilities", "too many capabilities"));
    }
    Ok((parsed, requires))
}

async fn submit(core: &Arc<Core>, req: ApiRequest<SubmitJob>) -> ApiResult<Submitted> {
    let body = &req.body;
    let (parsed, requires) = validate(body)?;
    crate::secrets::check_references(core, &req.tenant, &body.workflow).await?;
    if let Some(key) = &body.idempotency_key
        && (key.is_empty() || key.len() > 255)
    {
        return Err(invalid("Idempotency-Key", "must be 1 to 255 characters"));
    }
    let target = body.target_robot_id.as_ref();
    if let Some(target) = target
        && !core.store.robot_exists(&req.tenant, target).await?
    {
        return Err(invalid("target_robot_id", format!("no robot {target} in this tenant")));
    }
    let position = core.fleet.waiting_ahead(&req.tenant, &requires) + 1;
    let placing = Placing { tenant: &req.tenant, requires: &requires, target, rejected: &[] };
    let mut reserved: Option<String> = None;
    let placement = match core.fleet.reserve(&placing, position, true) {
        Decision::Offer { subject, target: to, class, robot } => {
            core.fleet.offered_priority(&req.tenant, &subject, body.priority);
            reserved = Some(subject.clone());
            match ensure_consumer(core, &req.tenant, class.as_ref(), robot.as_ref()).await {
                Ok(()) => Placement::Offer { subject, target: to },
                Err(e) => {
                    tracing::warn!(error = %e, "consumer not ready; job waits");
                    Placement::Pending { reason: "waiting for the job queue to be ready".into() }
                }
            }
        }
        Decision::Wait { reason } | Decision::Fail { reason } => Placement::Pending { reason },
    };
    // Give the reservation back unless this submission really puts an offer on its subject.
    if matches!(placement, Placement::Pending { .. })
        && let Some(subject) = reserved.take()
    {
        core.fleet.unoffered(&req.tenant, &subject);
    }
    let release = |core: &Core| {
        if let Some(subject) = &reserved {
            core.fleet.unoffered(&req.tenant, subject);
        }
    };
    let mut variables = parsed.variables.clone();
    variables.extend(body.variables.clone());
    let job = NewJob {
        job_id: JobId::new(),
        tenant: req.tenant.clone(),
        workflow_id: workflow::workflow_id(parsed.id.as_deref(), &body.workflow_name),
        workflow_name: body.workflow_name.trim().to_owned(),
        format: parsed.format,
        workflow: body.workflow.clone(),
        variables,
        metadata: body.metadata.clone(),
        requires: requires.to_strings(),
        priority: body.priority,
        trigger_type: body.trigger_type.clone(),
        execution_mode: body.execution_mode.clone(),
        target_robot_id: body.target_robot_id.clone(),
        timeout_s: body.timeout_s.or(parsed.timeout_s),
        max_attempts: core.config.max_attempts,
        request_id: req.request_id,
        idempotency_key: body.idempotency_key.clone(),
        deadline_unix_ms: Some(req.deadline_unix_ms),
        actor: crate::audit::actor_of(&req),
    };
    if past_deadline(&req) {
        release(core);
        return Err(deadline_error());
    }
    let inserted = match core.store.insert_job(&job, &placement).await {
        Ok(i) => i,
        Err(e) => {
            release(core);
            return Err(e.into());
        }
    };
    if inserted.existing {
        release(core);
    }
    if inserted.status == JobStatus::Pending {
        core.admission.pending_added(crate::sweeper::PendingKey {
            priority: job.priority,
            created_at: inserted.created_at,
            job_id: inserted.job_id.0,
        });
        // Offers of a lower priority wait where it could run: a pass recalls them.
        if target.is_none() && !core.fleet.outranked(&req.tenant, &requires, job.priority).is_empty() {
            core.admission.reset();
        }
        core.wake_admission.notify_one();
    }
    core.wake_relay.notify_one();
    if !inserted.existing
        && let Some(subject) = &inserted.offer_subject
    {
        let offer = crate::store::ToOffer {
            job_id: inserted.job_id,
            offer_no: inserted.offer_no,
            subject: subject.clone(),
        };
        // The answer does not wait for the offer's publish: the job is committed, and an offer
        // not published (this process stops first) is published by the watchdog.
        let core = core.clone();
        tokio::spawn(async move { core.offers.publish_or_log(&offer).await });
    }
    tracing::info!(job_id = %inserted.job_id, tenant = %req.tenant, status = inserted.status.as_str(), "job submitted");
    Ok(Submitted {
        job_id: inserted.job_id,
        workflow_id: job.workflow_id,
        status: inserted.status,
        waiting_reason: inserted.waiting_reason,
        created_at: inserted.created_at,
    })
}

/// Make sure the consumer an offer will be published to exists.
pub(crate) async fn ensure_consumer(
    core: &Core,
    tenant: &fleet_schemas::TenantId,
    class: Option<&Class>,
    robot: Option<&RobotId>,
) -> Result<(), crate::fabric::FabricError> {
    match (class, robot) {
        (Some(class), _) => core.fabric.ensure_class_consumer(tenant, class).await.map(|_| ()),
        (None, Some(robot)) => core.fabric.ensure_robot_consumer(tenant, robot).await.map(|_| ()),
        (None, None) => Ok(()),
    }
}

async fn get_job(core: &Core, req: ApiRequest<GetById<JobId>>) -> ApiResult<fleet_schemas::api::JobView> {
    core.store
        .get_job(&req.tenant, req.body.id)
        .await?
        .ok_or_else(|| ApiError::NotFound { what: "job".into() })
}

async fn list_robots(
    core: &Core,
    req: ApiRequest<ListRobots>,
) -> ApiResult<Vec<fleet_schemas::api::RobotView>> {
    let robots = core.store.list_robots(&req.tenant, None).await?;
    let ListRobots { status, capability } = &req.body;
    Ok(robots
        .into_iter()
        .filter(|r| status.is_none_or(|s| r.status == s))
        .filter(|r| capability.as_ref().is_none_or(|c| r.capabilities.iter().any(|have| have == c.as_str())))
        .collect())
}

async fn get_robot(
    core: &Core,
    req: ApiRequest<GetById<RobotId>>,
) -> ApiResult<fleet_schemas::api::RobotView> {
    core.store
        .list_robots(&req.tenant, Some(&req.body.id))
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::NotFound { what: "robot".into() })
}

async fn list_queues(core: &Core, req: ApiRequest<Empty>) -> ApiResult<Vec<QueueView>> {
    let waiting = core.store.pending_requirements(&req.tenant).await?;
    Ok(core
        .fleet
        .classes(&req.tenant)
        .into_iter()
        .map(|load| QueueView {
            class: load.class.name(),
            capabilities: load.class.to_strings(),
            waiting: waiting
                .iter()
                .filter(|(requires, _)| Class::parse(requires).is_ok_and(|r| load.class.is_superset(&r)))
                .map(|(_, n)| *n as u32)
                .sum(),
            offered: load.offered,
            running: load.running,
            capacity: load.capacity,
            online_robots: load.online_robots,
            robots: load.robots,
        })
        .collect())
}

async fn cancel(core: &Core, req: ApiRequest<GetById<JobId>>) -> ApiResult<Cancelled> {
    if past_deadline(&req) {
        return Err(deadline_error());
    }
    let job_id = req.body.id;
    let tenant = &req.tenant;
    let Some(done) = core.store.cancel(tenant, job_id, &crate::audit::actor_of(&req)).await? else {
        return Err(ApiError::NotFound { what: "job".into() });
    };
    // Everything below follows a committed cancel: bookkeeping and nudges, none of which can
    // undo it or needs to succeed for it to hold.
    core.wake_relay.notify_one();
    if let Some(offer) = &done.recalled {
        core.fleet.unoffered(tenant, &offer.subject);
        // The job is cancelled in the record; the robot that gets the offer is refused its
        // claim. Deleting the message just saves it the trip.
        if let Ok(Some(seq)) = core.store.offer_seq(job_id, offer.offer_no).await {
            core.offers.delete(&core.fabric.jobs, seq).await;
        }
    }
    if let Some(stopped) = &done.stopped {
        // The slot is free for admission now, not when the robot gets round to stopping: the
        // record says the attempt is over, and every report of it is refused.
        core.fleet.ended(tenant, &stopped.robot_id, job_id);
        core.wake_admission.notify_one();
        crate::commands::push_cancel(core, tenant, &stopped.robot_id, job_id, stopped.attempt).await;
    }
    let (cancelled, message) = match done.previous {
        _ if !done.changed => (false, format!("job already ended ({})", done.previous.as_str())),
        JobStatus::Pending | JobStatus::Queued => (true, "job cancelled before it started".to_owned()),
        _ => (true, "job cancelled; its robot was told to stop it now".to_owned()),
    };
    Ok(Cancelled { job_id, cancelled, previous_status: done.previous, message })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(workflow: serde_json::Value) -> SubmitJob {
        SubmitJob {
            workflow_name: "Invoice sync".into(),
            workflow,
            priority: 10,
            trigger_type: "manual".into(),
            execution_mode: "lan".into(),
            variables: Default::default(),
            required_capabilities: vec![],
            target_robot_id: None,
            timeout_s: None,
            metadata: Default::default(),
            idempotency_key: None,
        }
    }

    #[test]
    fn validation_names_fields() {
        let wf = json!({"steps": [{"id": "a", "kind": "shell", "argv": ["true"]}]});
        let (_, req) = validate(&body(wf.clone())).unwrap();
        assert_eq!(req.name(), "shell");
        let mut b = body(wf.clone());
        b.priority = 21;
        assert!(matches!(validate(&b), Err(ApiError::Invalid { field, .. }) if field == "priority"));
        let mut b = body(wf.clone());
        b.required_capabilities = vec!["gpu".into(), "Bad!".into()];
        assert!(
            matches!(validate(&b), Err(ApiError::Invalid { field, .. }) if field == "required_capabilities[1]")
        );
        let mut b = body(wf);
        b.workflow_name = " ".into();
        assert!(matches!(validate(&b), Err(ApiError::Invalid { field, .. }) if field == "workflow_name"));
        let b = body(json!({"steps": [{"id": "a", "kind": "nope"}]}));
        assert!(
            matches!(validate(&b), Err(ApiError::Invalid { field, .. }) if field == "workflow_json.steps[0].kind")
        );
    }
}
