//! One offer, from the pulled message to the report: the steppable part of the robot.
//!
//! Order matters, and each step has a reason:
//! 1. **Claim before ack.** JetStream accepts an ack from a stale delivery (nats-server issue
//!    4786), so ownership lives in PostgreSQL: the robot first claims (compare-and-set on the
//!    offer number) and acks the message only when the claim is accepted. A refused claim
//!    terminates the message (the offer is stale: claimed, cancelled or recalled); an orchestrator
//!    that stays unavailable gets the message NAKed with a delay, so it is offered again.
//! 2. **Run holding the slot.** The permit taken before pulling is held until the report is
//!    answered, so the robot never runs more than `max_jobs` at once (invariant 4).
//! 3. **Renew every third of the lease**; stop only when told (see [`crate::lease`]).
//! 4. **Report until answered**: complete (or reject, when the executor refused at run time, or
//!    release, when shutdown ran past its grace), cut to the budgets of [`crate::bound`] so it
//!    always fits in one message. A job stopped because its renewal was refused or its cancel was
//!    pushed is not reported at all, and a report still being retried stops when that happens.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use serde_json::Value;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use fleet_schemas::codec;
use fleet_schemas::robot::{
    Ack, ClaimGrant, ClaimRequest, CompleteRequest, Offer, ROBOT_PROTOCOL_VERSION, RejectRequest,
    ReleaseRequest, RobotRunState, RunOutcome,
};
use fleet_schemas::subjects::RobotVerb;

use crate::agent::{Agent, RunningEntry};
use crate::bound;
use crate::executor::{self, Execution, JobContext, JobSink, RunReport};
use crate::lease::{self, Stop, StopReason};
use crate::redact::Redactor;
use crate::report::{self, JobAddress};
use crate::rpc::{Answer, GaveUp};

/// How long a claim is retried while the orchestrator is unavailable before the offer is NAKed.
pub const CLAIM_PATIENCE: Duration = Duration::from_secs(20);
/// Delay of a NAK, so the offer is not bounced straight back to a robot that just failed it.
pub const NAK_DELAY: Duration = Duration::from_secs(5);
/// How long a release is retried at shutdown.
pub const RELEASE_PATIENCE: Duration = Duration::from_secs(10);
/// How long the last log lines and progress may take to go out before the end is reported.
const FLUSH_PATIENCE: Duration = Duration::from_secs(2);

/// What became of an offer.
#[derive(Debug, Clone, PartialEq)]
pub enum OfferOutcome {
    /// Not an offer: terminated.
    Malformed(String),
    /// Rejected without claiming (the robot is shutting down); the reply settled the message.
    Declined,
    /// NAKed without claiming (the robot is paused or in maintenance): offered again at once.
    HandedBack,
    /// The claim was refused: the offer was stale; terminated.
    ClaimRefused(String),
    /// The orchestrator stayed unavailable: NAKed with a delay.
    ClaimUnavailable,
    /// Claimed and run.
    Ran(JobEnd),
}

/// How a claimed job ended, from the robot's side.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEnd {
    /// The end was reported and the orchestrator answered (accepted or refused).
    Reported { outcome: RunOutcome, accepted: bool },
    /// The executor refused to run it; a reject was sent.
    Rejected { reason: String, accepted: bool },
    /// Handed back at shutdown.
    Released { accepted: bool },
    /// The job is no longer ours (renewal refused, or a cancel pushed): stopped, nothing
    /// reported.
    Fenced(String),
    /// The report could not be delivered before the robot gave up (late in shutdown).
    Unreported(String),
}

/// Handle one pulled message, holding `permit` (a job slot) until the job is reported.
pub async fn handle_offer(
    agent: Arc<Agent>,
    msg: jetstream::Message,
    permit: OwnedSemaphorePermit,
) -> OfferOutcome {
    let offer: Offer = match codec::decode("offer", &msg.payload) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(subject = %msg.subject, error = %e, "malformed offer; terminating it");
            settle(&msg, AckKind::Term, "malformed offer").await;
            return OfferOutcome::Malformed(e.to_string());
        }
    };
    let span = tracing::info_span!("offer", tenant = %agent.config.tenant, robot = %agent.robot_id,
        job_id = %offer.job_id, offer_no = offer.offer_no);
    async move {
        let state = agent.run_state();
        if agent.shutdown.is_cancelled() || matches!(state, RobotRunState::Draining | RobotRunState::Stopping)
        {
            return decline(&agent, &msg, &offer, state).await;
        }
        if state != RobotRunState::Online {
            // Paused or in maintenance: the pull raced the command. The robot does not refuse
            // the job (a reject would keep it away from this robot once resumed); it hands the
            // offer straight back to the consumer for another robot, or for itself later.
            tracing::info!(state = ?state, "offer arrived while not taking work; handing it back");
            settle(&msg, AckKind::Nak(None), "not taking work").await;
            return OfferOutcome::HandedBack;
        }
        let req = ClaimRequest {
            v: ROBOT_PROTOCOL_VERSION,
            session_id: agent.session_id,
            job_id: offer.job_id,
            offer_no: offer.offer_no,
        };
        let deadline = tokio::time::Instant::now() + CLAIM_PATIENCE;
        let never = CancellationToken::new();
        match agent.orch.call_retrying::<_, ClaimGrant>(RobotVerb::Claim, &req, Some(deadline), &never).await
        {
            Ok(Answer::Accepted(grant)) => {
                // The claim is what counts; an ack that fails only means the message may be
                // delivered again, and that delivery's claim will be refused.
                if let Err(e) = msg.double_ack().await {
                    tracing::warn!(error = %e, "could not ack the claimed offer; running it anyway");
                }
                let end = run_job(agent.clone(), grant, offer.offer_no).await;
                drop(permit);
                OfferOutcome::Ran(end)
            }
            Ok(Answer::Refused(reason)) => {
                tracing::info!(%reason, "claim refused; terminating the offer");
                settle(&msg, AckKind::Term, "claim refused").await;
                OfferOutcome::ClaimRefused(reason)
            }
            Err(GaveUp { last, .. }) => {
                tracing::warn!(reason = %last, "orchestrator unavailable for the claim; NAKing the offer");
                settle(&msg, AckKind::Nak(Some(NAK_DELAY)), "claim unavailable").await;
                OfferOutcome::ClaimUnavailable
            }
        }
    }
    .instrument(span)
    .await
}

/// The robot is not taking work: reject without claiming, then settle the message per the reply.
async fn decline(
    agent: &Agent,
    msg: &jetstream::Message,
    offer: &Offer,
    state: RobotRunState,
) -> OfferOutcome {
    let reason = match state {
        RobotRunState::Stopping => "robot shutting down".to_owned(),
        _ if agent.shutdown.is_cancelled() => "robot shutting down".to_owned(),
        other => format!("robot is {}", format!("{other:?}").to_lowercase()),
    };
    let req = RejectRequest {
        v: ROBOT_PROTOCOL_VERSION,
        session_id: agent.session_id,
        job_id: offer.job_id,
        offer_no: offer.offer_no,
        attempt: None,
        reason: reason.clone(),
    };
    let deadline = tokio::time::Instant::now() + CLAIM_PATIENCE;
    match agent.orch.call_retrying::<_, Ack>(RobotVerb::Reject, &req, Some(deadline), &agent.abandon).await {
        // Accepted: the orchestrator recalls and re-offers under a new offer number, so this
        // message is done. Refused: the offer is stale anyway.
        Ok(_) => settle(msg, AckKind::Term, "declined").await,
        Err(_) => settle(msg, AckKind::Nak(Some(NAK_DELAY)), "decline unavailable").await,
    }
    tracing::info!(%reason, "offer declined");
    OfferOutcome::Declined
}

async fn settle(msg: &jetstream::Message, kind: AckKind, what: &str) {
    if let Err(e) = msg.ack_with(kind).await {
        tracing::warn!(error = %e, what, "could not settle the offer message");
    }
}

/// Run a claimed job to its reported end: renewals, execution, time limit, report.
pub async fn run_job(agent: Arc<Agent>, grant: ClaimGrant, offer_no: i32) -> JobEnd {
    let span = tracing::info_span!("job", tenant = %agent.config.tenant, robot = %agent.robot_id,
        job_id = %grant.job_id, attempt = grant.attempt);
    run_job_inner(agent, grant, offer_no).instrument(span).await
}

async fn run_job_inner(agent: Arc<Agent>, grant: ClaimGrant, offer_no: i32) -> JobEnd {
    let job_id = grant.job_id;
    let attempt = grant.attempt;
    tracing::info!(workflow = %grant.workflow_name, format = grant.format.as_str(), "job claimed");
    let stop = Stop::new();
    agent.add_running(job_id, RunningEntry { attempt, stop: stop.clone() });

    let done = CancellationToken::new();
    // The lease is renewed until the end is *settled* (the report answered), not merely until
    // the work is done: a completion retried through an outage must not find its lease expired
    // by a leader that came back in the meantime (it would be refused and the job run again).
    let settled = CancellationToken::new();
    let _stop_renewing = settled.clone().drop_guard();
    let renew = lease::renew_request(agent.session_id, job_id, attempt);
    tokio::spawn(lease::renew_loop(agent.orch.clone(), renew, grant.lease_ms, stop.clone(), settled.clone()));

    let timeout_s = grant.timeout_s.or_else(|| grant.workflow.get("timeout_s").and_then(Value::as_u64));
    if let Some(secs) = timeout_s.filter(|s| *s > 0) {
        let (stop, done) = (stop.clone(), done.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(secs)) => stop.stop(StopReason::TimedOut(secs)),
                _ = done.cancelled() => {}
            }
        });
    }

    let redact = Arc::new(Redactor::new(&grant.secrets));
    let (sink, events) = JobSink::with_metrics(executor::LOG_BUFFER, agent.metrics.clone());
    let sink = sink.redacting(redact.clone());
    let addr = JobAddress {
        tenant: agent.config.tenant.clone(),
        robot_id: agent.robot_id.clone(),
        session_id: agent.session_id,
        job_id,
        attempt,
    };
    let forwarder = tokio::spawn(report::forward(
        agent.client.clone(),
        agent.orch.clone(),
        addr.clone(),
        agent.budgets(),
        events,
    ));

    let dir = executor::job_dir(&agent.jobs_dir, job_id, attempt);
    let execution = match prepare_dir(&dir) {
        Err(e) => Execution::Rejected(format!("could not make the job directory {}: {e}", dir.display())),
        Ok(()) => match agent.executors.get(grant.format) {
            None => Execution::Rejected(format!(
                "this robot has no executor for format {}",
                grant.format.as_str()
            )),
            Some(exec) => {
                let ctx =
                    JobContext { job_id, attempt, dir: dir.clone(), cancel: stop.token().clone(), sink };
                exec.execute(&grant, &ctx).await
            }
        },
    };
    // Whatever the executor says goes out masked: output, error, reject reason.
    let execution = redacted(&redact, execution);
    done.cancel();
    // The executor's sink is dropped with its context: let the last lines and progress go out
    // before the end is reported, but do not wait on a slow NATS for long.
    let dropped =
        tokio::time::timeout(FLUSH_PATIENCE, forwarder).await.ok().and_then(Result::ok).unwrap_or(0);

    let end = settle_job(&agent, &grant, offer_no, &stop, execution, &Reporting { addr, dropped }).await;
    settled.cancel();
    if matches!(end, JobEnd::Reported { outcome: RunOutcome::Completed, .. }) {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::debug!(error = %e, dir = %dir.display(), "could not remove the job directory");
        }
    } else if dir.exists() {
        tracing::info!(dir = %dir.display(), "job directory kept for inspection");
    }
    agent.remove_running(job_id);
    tracing::info!(end = ?end, "job done");
    end
}

fn redacted(redact: &Redactor, execution: Execution) -> Execution {
    if redact.is_empty() {
        return execution;
    }
    match execution {
        Execution::Rejected(reason) => Execution::Rejected(redact.string(reason)),
        Execution::Finished(r) => Execution::Finished(RunReport {
            outcome: r.outcome,
            output: redact.value(r.output),
            error: r.error.map(|e| redact.string(e)),
            failed_step: r.failed_step,
        }),
    }
}

fn prepare_dir(dir: &std::path::Path) -> std::io::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)
}

/// Decide what to tell the orchestrator and tell it.
async fn settle_job(
    agent: &Agent,
    grant: &ClaimGrant,
    offer_no: i32,
    stop: &Stop,
    execution: Execution,
    reporting: &Reporting,
) -> JobEnd {
    // Checked before anything else: a job that is no longer ours (renewal refused, cancel
    // pushed) is reported in no way, whatever else stopped it first.
    if let Some(reason) = stop.fenced() {
        tracing::warn!(%reason, "job stopped as no longer ours; not reporting it");
        return JobEnd::Fenced(reason);
    }
    let budgets = agent.budgets();
    let report = match execution {
        Execution::Rejected(reason) => {
            let reason = bound::bound_text(&reason, budgets.error);
            tracing::warn!(%reason, "executor refused the job; rejecting it");
            let req = RejectRequest {
                v: ROBOT_PROTOCOL_VERSION,
                session_id: agent.session_id,
                job_id: grant.job_id,
                offer_no,
                attempt: Some(grant.attempt),
                reason: reason.clone(),
            };
            return match send_report(agent, stop, RobotVerb::Reject, &req).await {
                Ok(a) => JobEnd::Rejected { reason, accepted: matches!(a, Answer::Accepted(_)) },
                Err(end) => end,
            };
        }
        Execution::Finished(report) => report,
    };
    let report = match (report.outcome, stop.reason()) {
        (RunOutcome::Cancelled, Some(StopReason::Shutdown)) => return release(agent, grant).await,
        (RunOutcome::Cancelled, Some(StopReason::TimedOut(secs))) => RunReport {
            outcome: RunOutcome::TimedOut,
            error: Some(format!("timed out after {secs}s")),
            ..report
        },
        (RunOutcome::Cancelled, _) => {
            RunReport { error: report.error.or_else(|| Some("cancelled".to_owned())), ..report }
        }
        _ => report,
    };
    complete(agent, grant, stop, report, reporting).await
}

/// Where a job's log went, and what of it was lost, for its report.
struct Reporting {
    addr: JobAddress,
    /// Log lines dropped because the buffer to NATS was full.
    dropped: u64,
}

/// Send a report until it is answered, the robot abandons its reports (late in shutdown), or
/// the job stops being ours (a report of it would be refused, so retrying it only holds the
/// slot).
async fn send_report<Req: serde::Serialize>(
    agent: &Agent,
    stop: &Stop,
    verb: RobotVerb,
    req: &Req,
) -> Result<Answer<Ack>, JobEnd> {
    tokio::select! {
        answer = agent.orch.call_retrying::<_, Ack>(verb, req, None, &agent.abandon) => {
            answer.map_err(|e| {
                tracing::error!(error = %e, verb = verb.as_str(), "gave up reporting the job; its lease will expire");
                JobEnd::Unreported(e.to_string())
            })
        }
        _ = stop.fenced_token().cancelled() => {
            let reason = stop.fenced().unwrap_or_default();
            tracing::warn!(%reason, verb = verb.as_str(), "the job is no longer ours; no longer reporting it");
            Err(JobEnd::Fenced(reason))
        }
    }
}

/// Report the end, cut to the budgets (see [`crate::bound`]). A full output that was truncated
/// goes into the job's log first, so the record can point there. A report refused for what it
/// holds (rather than for being stale) is followed by a bare `failed` report saying why, so a
/// job never stays `running` because its report cannot be stored.
async fn complete(
    agent: &Agent,
    grant: &ClaimGrant,
    stop: &Stop,
    report: RunReport,
    reporting: &Reporting,
) -> JobEnd {
    let budgets = agent.budgets();
    let mut bounded = bound::bound_output(report.output, budgets.output);
    // Markers point into the log: say when it is not whole.
    if let (Value::Object(map), n) = (&mut bounded.output, reporting.dropped)
        && n > 0
    {
        map.insert("log_lines_dropped".into(), n.into());
    }
    let addr = &reporting.addr;
    if let Some(full) = &bounded.full {
        tracing::warn!(
            bytes = full.len(),
            budget = budgets.output,
            "output over budget: truncated, the full text goes to the job log"
        );
        report::publish_output(&agent.client, addr, full, budgets.log_line).await;
    }
    let outcome = report.outcome;
    let req = CompleteRequest {
        v: ROBOT_PROTOCOL_VERSION,
        session_id: agent.session_id,
        job_id: grant.job_id,
        attempt: grant.attempt,
        outcome,
        output: bounded.output,
        error: report.error.map(|e| bound::bound_text(&e, budgets.error)),
        failed_step: report.failed_step.map(|s| bound::bound_text(&s, budgets.name)),
    };
    let reason = match send_report(agent, stop, RobotVerb::Complete, &req).await {
        Ok(Answer::Accepted(_)) => return JobEnd::Reported { outcome, accepted: true },
        Ok(Answer::Refused(reason)) => reason,
        Err(end) => return end,
    };
    tracing::warn!(%reason, "completion refused");
    if outcome == RunOutcome::Failed && req.output == Value::Object(Default::default()) {
        return JobEnd::Reported { outcome, accepted: false };
    }
    // Stale attempts are refused again (and harmlessly); a report refused for its content ends
    // the job as failed with the reason, instead of leaving it to run again after its lease.
    let bare = CompleteRequest {
        outcome: RunOutcome::Failed,
        output: Value::Object(Default::default()),
        error: Some(bound::bound_text(&format!("the job's report was refused: {reason}"), budgets.error)),
        failed_step: None,
        ..req
    };
    match send_report(agent, stop, RobotVerb::Complete, &bare).await {
        Ok(Answer::Accepted(_)) => JobEnd::Reported { outcome: RunOutcome::Failed, accepted: true },
        Ok(Answer::Refused(reason)) => {
            tracing::info!(%reason, "the bare failure report was refused too (superseded attempt?)");
            JobEnd::Reported { outcome, accepted: false }
        }
        Err(end) => end,
    }
}

async fn release(agent: &Agent, grant: &ClaimGrant) -> JobEnd {
    let req = ReleaseRequest {
        v: ROBOT_PROTOCOL_VERSION,
        session_id: agent.session_id,
        job_id: grant.job_id,
        attempt: grant.attempt,
        reason: "robot shutting down".into(),
    };
    let deadline = tokio::time::Instant::now() + RELEASE_PATIENCE;
    match agent.orch.call_retrying::<_, Ack>(RobotVerb::Release, &req, Some(deadline), &agent.abandon).await {
        Ok(a) => JobEnd::Released { accepted: matches!(a, Answer::Accepted(_)) },
        Err(e) => {
            tracing::warn!(error = %e, "could not release the job; its lease will expire");
            JobEnd::Unreported(e.to_string())
        }
    }
}
