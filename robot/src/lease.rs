//! Keeping a running job's lease, and the reasons a job is stopped.
//!
//! A robot stops a job only when the orchestrator says so: `Accepted{cancel: true}` (the job was
//! cancelled; report `cancelled`), `Refused` (the lease is no longer ours: another attempt or
//! session owns the job, or it was cancelled and already ended in the record; stop and report
//! nothing, since the report would be refused anyway and the job may be running elsewhere), or a
//! cancel pushed on the robot's command subject (the same as a refusal, only sooner). `Unavailable` never stops a job: during an outage of the
//! orchestrator, PostgreSQL or NATS the work goes on, and the orchestrator's sweeper only expires
//! leases after it has itself been healthy for a whole lease period (DESIGN.md, "Lease").

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use fleet_schemas::JobId;
use fleet_schemas::robot::{ROBOT_PROTOCOL_VERSION, RenewGrant, RenewRequest, RobotReply};
use fleet_schemas::subjects::RobotVerb;

use crate::rpc::Orchestrator;

/// Why a running job was told to stop. The first reason wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The orchestrator asked (renewal reply `cancel`): report `cancelled`.
    Cancelled,
    /// The job's time limit passed: report `timed_out`.
    TimedOut(u64),
    /// The robot is shutting down past its grace period: release the job.
    Shutdown,
    /// The renewal was refused, or a cancel was pushed: the job is no longer ours; report
    /// nothing.
    Fenced(String),
}

/// A handle to stop a job with a reason.
#[derive(Clone, Debug, Default)]
pub struct Stop {
    token: CancellationToken,
    reason: Arc<OnceLock<StopReason>>,
    /// Set by the first [`StopReason::Fenced`], even after another reason: once the job is no
    /// longer ours, nothing about it is worth retrying (a report of it would be refused).
    fenced: Arc<OnceLock<String>>,
    fenced_token: CancellationToken,
}

impl Stop {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stop(&self, reason: StopReason) {
        if let StopReason::Fenced(why) = &reason {
            let _ = self.fenced.set(why.clone());
            self.fenced_token.cancel();
        }
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// Why the job stopped being ours, if it did (whatever stopped it first).
    pub fn fenced(&self) -> Option<String> {
        self.fenced.get().cloned()
    }

    /// Cancelled once the job is no longer ours: retried reports give up on it.
    pub fn fenced_token(&self) -> &CancellationToken {
        &self.fenced_token
    }

    pub fn reason(&self) -> Option<StopReason> {
        self.reason.get().cloned()
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

/// Renew every third of the lease until `done` fires; stops the job on cancel or refusal.
pub async fn renew_loop(
    orch: Orchestrator,
    req: RenewRequest,
    mut lease_ms: u64,
    stop: Stop,
    done: CancellationToken,
) {
    debug_assert_eq!(req.v, ROBOT_PROTOCOL_VERSION);
    loop {
        let every = Duration::from_millis((lease_ms / 3).max(100));
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = done.cancelled() => return,
        }
        match orch.call::<_, RenewGrant>(RobotVerb::Renew, &req).await {
            RobotReply::Accepted(grant) => {
                if grant.lease_ms > 0 {
                    lease_ms = grant.lease_ms;
                }
                if grant.cancel {
                    tracing::info!("the job was cancelled; stopping it");
                    stop.stop(StopReason::Cancelled);
                }
            }
            RobotReply::Refused { reason } => {
                tracing::warn!(%reason, "lease renewal refused: the job is no longer ours; stopping it without a report");
                stop.stop(StopReason::Fenced(reason));
                return;
            }
            RobotReply::Unavailable { reason } => {
                // Keep running: never stop a job only because the orchestrator is unreachable.
                tracing::info!(%reason, "lease renewal unavailable; the job keeps running");
            }
        }
    }
}

/// The renewal request of a job.
pub fn renew_request(session_id: fleet_schemas::SessionId, job_id: JobId, attempt: i32) -> RenewRequest {
    RenewRequest { v: ROBOT_PROTOCOL_VERSION, session_id, job_id, attempt }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = Stop::new();
        assert_eq!(s.reason(), None);
        s.stop(StopReason::Cancelled);
        s.stop(StopReason::Shutdown);
        assert_eq!(s.reason(), Some(StopReason::Cancelled));
        assert!(s.token().is_cancelled());
        assert_eq!(s.fenced(), None);
        s.stop(StopReason::Fenced("cancelled".into()));
        assert_eq!(s.reason(), Some(StopReason::Cancelled), "still the first reason");
        assert_eq!(s.fenced().as_deref(), Some("cancelled"), "but fencing is always known");
        assert!(s.fenced_token().is_cancelled());
    }
}
