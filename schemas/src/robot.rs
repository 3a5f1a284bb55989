//! Messages between a robot and the orchestrator (MessagePack).
//!
//! Every request is idempotent and carries what fences it: a claim names the offer number, every
//! later report names the attempt (and the session), so a report from a superseded attempt is
//! refused rather than applied. See DESIGN.md, "Ownership".

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ids::{Capability, JobId, RobotId, SessionId, TenantId};
use crate::secrets::SecretValues;
use crate::workflow::WorkflowFormat;

/// Schema version of the messages in this module.
pub const ROBOT_PROTOCOL_VERSION: u32 = 1;

/// An offer on `FLEET_JOBS`: ids only, never the workflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub v: u32,
    pub job_id: JobId,
    pub offer_no: i32,
}

impl Offer {
    /// `Nats-Msg-Id` of this offer, so a re-published offer is deduplicated by the stream.
    pub fn msg_id(&self) -> String {
        format!("{}:{}", self.job_id, self.offer_no)
    }
}

/// Reply to every robot request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum RobotReply<T> {
    /// Done; the body says what follows.
    Accepted(T),
    /// Will never be accepted (already claimed, superseded attempt, cancelled…): stop retrying.
    Refused { reason: String },
    /// Not now (database down, not the leader, deadline): retry with backoff.
    Unavailable { reason: String },
}

/// Body of an accepted request that has nothing more to say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {}

/// A robot process announcing itself (at start and after reconnecting).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub v: u32,
    pub session_id: SessionId,
    pub name: String,
    pub hostname: String,
    /// Declared and implicit capabilities together.
    pub capabilities: Vec<String>,
    pub max_jobs: u32,
    pub version: String,
    #[serde(default)]
    pub environment: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Fingerprint of the robot's state directory; a second process with the same robot id and
    /// another state directory is refused while the first is alive.
    #[serde(default)]
    pub state_dir_id: String,
}

/// A robot's effective capabilities: what it offers that its key grants (sorted, deduplicated).
/// Built-in capabilities (`shell`, the runner formats) are grantable like any other, so a key
/// without `shell` keeps shell jobs off the robot whatever it says of itself.
pub fn attest(offered: &[Capability], granted: &[Capability]) -> Vec<Capability> {
    let granted: std::collections::BTreeSet<&Capability> = granted.iter().collect();
    let effective: std::collections::BTreeSet<&Capability> =
        offered.iter().filter(|c| granted.contains(c)).collect();
    effective.into_iter().cloned().collect()
}

/// What the fabric tells a robot at registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterGrant {
    /// How often to write the heartbeat.
    pub heartbeat_interval_ms: u64,
    /// The per-message TTL of each heartbeat: past it, the robot is offline.
    pub heartbeat_ttl_ms: u64,
    /// Lease granted on claim and renewal; renew every third of it.
    pub lease_ms: u64,
    /// Durable consumer of the robot's class.
    pub class_consumer: String,
    /// Durable consumer of offers aimed at this robot.
    pub robot_consumer: String,
}

/// Claim an offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRequest {
    pub v: u32,
    pub session_id: SessionId,
    pub job_id: JobId,
    pub offer_no: i32,
}

/// Everything a robot needs to run a claimed job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimGrant {
    pub job_id: JobId,
    pub attempt: i32,
    pub lease_ms: u64,
    pub format: WorkflowFormat,
    /// The workflow as submitted (JSON).
    pub workflow: serde_json::Value,
    /// Workflow variables merged with the submission's.
    pub variables: serde_json::Map<String, serde_json::Value>,
    pub timeout_s: Option<u64>,
    pub workflow_name: String,
    /// The values of the tenant's secrets this workflow refers to (`{{ secrets.NAME }}`), and no
    /// others; absent from orchestrators before secrets existed.
    #[serde(default, skip_serializing_if = "SecretValues::is_empty")]
    pub secrets: SecretValues,
}

/// Extend the lease of a running job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewRequest {
    pub v: u32,
    pub session_id: SessionId,
    pub job_id: JobId,
    pub attempt: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewGrant {
    pub lease_ms: u64,
    /// The job was cancelled: stop it and report `cancelled`. (Orchestrators since issue 11 end
    /// a cancelled running job at once, so its renewal is refused instead; the flag stays for
    /// jobs whose cancel was requested before.)
    pub cancel: bool,
}

/// A message pushed to a robot on `fleet.cmd.<tenant>.<robot_id>` for something that must happen
/// now rather than at the next renewal. An empty (or unreadable) message on that subject is only a
/// nudge to read the desired state again. The record in PostgreSQL is already final when a push is
/// sent; the push only saves time, and the renewal reply stays the fallback for a robot that
/// missed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "push", rename_all = "snake_case")]
pub enum RobotPush {
    /// This attempt of the job was cancelled (already `cancelled` in the record): kill it, free
    /// its slot, and report nothing (any report of it is refused).
    Cancel { v: u32, job_id: JobId, attempt: i32 },
    /// The robot's desired state changed: apply it if it is newer than what was applied.
    Desired { v: u32, desired: DesiredState },
}

/// Ask for the robot's desired state (`fleet.robot.<tenant>.<robot>.desired`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredRequest {
    pub v: u32,
}

/// The robot's desired state; `None`: no command was ever given (online, no stop).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredReply {
    pub v: u32,
    pub desired: Option<DesiredState>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    Completed,
    Failed,
    Cancelled,
    TimedOut,
}

/// Report the end of an attempt. Retried until answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompleteRequest {
    pub v: u32,
    pub session_id: SessionId,
    pub job_id: JobId,
    pub attempt: i32,
    pub outcome: RunOutcome,
    pub output: serde_json::Value,
    pub error: Option<String>,
    /// Which step failed, if one did.
    pub failed_step: Option<String>,
}

/// Give an offer back before or right after claiming it, with a reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectRequest {
    pub v: u32,
    pub session_id: SessionId,
    pub job_id: JobId,
    pub offer_no: i32,
    /// Set when the job was already claimed (attempt of the claim).
    pub attempt: Option<i32>,
    pub reason: String,
}

/// Hand a running job back (shutdown past its grace period).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRequest {
    pub v: u32,
    pub session_id: SessionId,
    pub job_id: JobId,
    pub attempt: i32,
    pub reason: String,
}

/// Progress of a running job (fire and forget; the next one supersedes it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressReport {
    pub v: u32,
    pub session_id: SessionId,
    pub job_id: JobId,
    pub attempt: i32,
    pub progress: u8,
    pub current_node: Option<String>,
}

/// Robot status as the robot reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RobotRunState {
    /// Taking work (online, or busy when all slots are used; the orchestrator derives busy).
    Online,
    /// Finishing running jobs, taking none.
    Paused,
    Maintenance,
    Draining,
    Stopping,
}

/// What a robot should be doing, as the orchestrator keeps it (PostgreSQL and the
/// `fleet_commands` bucket). `mode` persists across restarts of the robot; `stop` applies only to
/// the session it names, so a robot started again after a stop does not stop at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    pub v: u32,
    pub mode: RobotMode,
    pub stop: Option<StopOrder>,
    /// Increases with every command, so a robot can tell a new one from one it already obeyed.
    pub revision: i64,
}

/// Whether a robot takes new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RobotMode {
    /// Take work.
    Online,
    /// Finish running jobs, take no new ones, stay online.
    Paused,
    /// Like paused, shown as `maintenance`.
    Maintenance,
}

/// Stop one session of a robot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopOrder {
    pub session_id: SessionId,
    /// Release running jobs at once instead of letting them finish (within the grace period).
    pub force: bool,
    /// Start again after stopping (the binary re-executes itself).
    pub restart: bool,
}

/// A running job in a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningJob {
    pub job_id: JobId,
    pub attempt: i32,
}

/// Written into the `fleet_robots` KV bucket every heartbeat interval with a per-message TTL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub v: u32,
    pub tenant: TenantId,
    pub robot_id: RobotId,
    pub session_id: SessionId,
    pub name: String,
    pub hostname: String,
    pub state: RobotRunState,
    pub capabilities: Vec<String>,
    pub max_jobs: u32,
    pub running: Vec<RunningJob>,
    pub cpu_percent: Option<f32>,
    pub memory_mb: Option<f64>,
    pub version: String,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    #[serde(with = "time::serde::rfc3339")]
    pub sent_at: OffsetDateTime,
}

/// One log line of a job, published to `fleet.logs.<tenant>.<job_id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogLine {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub job_id: JobId,
    pub attempt: i32,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub robot_id: RobotId,
    /// `stdout`, `stderr`, `fleet` (the step engine's own lines) or `output` (the full output of
    /// a job whose recorded output was truncated, as consecutive chunks of its JSON text).
    pub stream: String,
    pub step: Option<String>,
    pub line: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};

    #[test]
    fn attest_is_the_sorted_intersection() {
        let caps = |names: &[&str]| names.iter().map(|n| Capability::new(*n).unwrap()).collect::<Vec<_>>();
        let offered = caps(&["shell", "gpu", "browser", "gpu"]);
        assert_eq!(attest(&offered, &caps(&["browser", "shell", "secure"])), caps(&["browser", "shell"]));
        assert_eq!(
            attest(&offered, &caps(&["browser"])),
            caps(&["browser"]),
            "shell is grantable like any other"
        );
        assert!(attest(&offered, &[]).is_empty());
        assert!(attest(&[], &caps(&["gpu"])).is_empty());
    }

    #[test]
    fn reply_roundtrip() {
        let r: RobotReply<RenewGrant> = RobotReply::Accepted(RenewGrant { lease_ms: 30_000, cancel: true });
        let back: RobotReply<RenewGrant> = decode("renew reply", &encode(&r)).unwrap();
        assert_eq!(back, r);
        let r: RobotReply<Ack> = RobotReply::Refused { reason: "superseded".into() };
        let back: RobotReply<Ack> = decode("reply", &encode(&r)).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn push_roundtrip() {
        let p = RobotPush::Cancel { v: ROBOT_PROTOCOL_VERSION, job_id: JobId::new(), attempt: 2 };
        assert_eq!(decode::<RobotPush>("push", &encode(&p)).unwrap(), p);
        assert!(decode::<RobotPush>("push", b"").is_err(), "an empty nudge is not a push");
    }

    #[test]
    fn desired_state_roundtrip() {
        let d = DesiredState {
            v: 1,
            mode: RobotMode::Maintenance,
            stop: Some(StopOrder { session_id: SessionId::new(), force: true, restart: false }),
            revision: 7,
        };
        let back: DesiredState = decode("desired state", &encode(&d)).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn offer_msg_id() {
        let o = Offer { v: 1, job_id: JobId::new(), offer_no: 3 };
        assert!(o.msg_id().ends_with(":3"));
        let back: Offer = decode("offer", &encode(&o)).unwrap();
        assert_eq!(back, o);
    }

    #[test]
    fn heartbeat_roundtrip() {
        let hb = Heartbeat {
            v: 1,
            tenant: TenantId::new("acme").unwrap(),
            robot_id: RobotId::new("r1").unwrap(),
            session_id: SessionId::new(),
            name: "r1".into(),
            hostname: "h".into(),
            state: RobotRunState::Online,
            capabilities: vec!["shell".into()],
            max_jobs: 2,
            running: vec![RunningJob { job_id: JobId::new(), attempt: 1 }],
            cpu_percent: Some(1.5),
            memory_mb: None,
            version: "0.1.0".into(),
            metrics: BTreeMap::new(),
            sent_at: OffsetDateTime::UNIX_EPOCH,
        };
        let back: Heartbeat = decode("heartbeat", &encode(&hb)).unwrap();
        assert_eq!(back, hb);
    }
}

/// What a robot key says about the robot that holds it (`fleet.whoami.<key id>`): a robot
/// started with only its key learns its tenant, its bound id and its grants from this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAmI {
    pub v: u32,
    pub tenant: TenantId,
    /// The robot id the key is bound to, if any.
    pub robot_id: Option<RobotId>,
    /// The capabilities the key grants; `None`: whatever the robot offers.
    pub capabilities: Option<Vec<String>>,
}
