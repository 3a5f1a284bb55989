//! Every NATS subject, stream, consumer and KV name Fleet uses, built in one place.
//!
//! Tenant and robot tokens always sit at the same positions (`fleet.<area>.<tenant>.…`) so that
//! the per-role subject permissions of the security work stay simple prefix rules.

use crate::ids::{Class, JobId, RobotId, TenantId};

/// Work-queue stream of job offers.
pub const JOBS_STREAM: &str = "FLEET_JOBS";
/// Subjects captured by [`JOBS_STREAM`].
pub const JOBS_SUBJECTS: &str = "fleet.jobs.>";
/// Limits stream of events (JSON).
pub const EVENTS_STREAM: &str = "FLEET_EVENTS";
/// Subjects captured by [`EVENTS_STREAM`].
pub const EVENTS_SUBJECTS: &str = "fleet.events.>";
/// Limits stream of job log lines.
pub const LOGS_STREAM: &str = "FLEET_LOGS";
/// Subjects captured by [`LOGS_STREAM`].
pub const LOGS_SUBJECTS: &str = "fleet.logs.>";
/// KV bucket of robot heartbeats.
pub const ROBOTS_BUCKET: &str = "fleet_robots";
/// KV bucket of robots' desired state (commands), written by the orchestrator, watched by each
/// robot for its own key. A robot that was disconnected when a command was given reads the latest
/// value when it comes back.
pub const COMMANDS_BUCKET: &str = "fleet_commands";
/// Priority group every robot pulls in (consumers use the `prioritized` policy).
pub const PULL_GROUP: &str = "robots";
/// Queue group the orchestrators serve API and robot requests in.
pub const ORCHESTRATOR_QUEUE: &str = "fleet-orchestrator";

/// Offers for a class of a tenant.
pub fn class_offers(tenant: &TenantId, class: &Class) -> String {
    format!("fleet.jobs.{tenant}.{}", class.name())
}

/// Offers aimed at one robot.
pub fn robot_offers(tenant: &TenantId, robot: &RobotId) -> String {
    format!("fleet.jobs.{tenant}.robot.{robot}")
}

/// Durable pull consumer shared by the robots of one class. Unambiguous since tenant ids have
/// no `_`.
pub fn class_consumer(tenant: &TenantId, class: &Class) -> String {
    format!("{tenant}_{}", consumer_token(&class.name()))
}

/// Durable pull consumer of one robot's targeted offers. The upper-case infix never occurs in a
/// class token (lower case plus `P` between capabilities), so it cannot collide with a class
/// consumer, not even one of a capability called `robot_x`.
pub fn robot_consumer(tenant: &TenantId, robot: &RobotId) -> String {
    format!("{tenant}_ROBOT_{robot}")
}

/// Consumer names may hold only `[A-Za-z0-9_-]`. A class name is capabilities (`[a-z0-9_-]`)
/// joined with `+`; upper-case `P` never occurs in a capability, so `+` → `P` is injective and
/// still readable (`browserPgpu`).
fn consumer_token(class_name: &str) -> String {
    class_name.replace('+', "P")
}

/// Events of one entity of a tenant: `fleet.events.<tenant>.<entity>.<event>`.
pub fn event(tenant: &TenantId, entity: &str, event: &str) -> String {
    format!("fleet.events.{tenant}.{entity}.{event}")
}

/// All stored events of a tenant.
pub fn tenant_events(tenant: &TenantId) -> String {
    format!("fleet.events.{tenant}.>")
}

/// Live-only events (not stored): `fleet.live.<tenant>.<entity>.<event>`.
pub fn live(tenant: &TenantId, entity: &str, event: &str) -> String {
    format!("fleet.live.{tenant}.{entity}.{event}")
}

/// Log lines of one job.
pub fn job_logs(tenant: &TenantId, job: &JobId) -> String {
    format!("fleet.logs.{tenant}.{job}")
}

/// Nudge to a robot that its desired state changed.
pub fn robot_command(tenant: &TenantId, robot: &RobotId) -> String {
    format!("fleet.cmd.{tenant}.{robot}")
}

/// Key of a robot in [`ROBOTS_BUCKET`].
pub fn heartbeat_key(tenant: &TenantId, robot: &RobotId) -> String {
    format!("{tenant}.{robot}")
}

/// Subject a heartbeat is published to (the KV bucket's subject for the key).
pub fn heartbeat_subject(tenant: &TenantId, robot: &RobotId) -> String {
    format!("$KV.{ROBOTS_BUCKET}.{tenant}.{robot}")
}

/// Key of a robot in [`COMMANDS_BUCKET`] (same shape as its heartbeat key).
pub fn command_key(tenant: &TenantId, robot: &RobotId) -> String {
    heartbeat_key(tenant, robot)
}

/// The stream that holds a KV bucket (JetStream names it `KV_<bucket>`): the fabric's
/// reconciler looks the stream up to tell a deleted bucket from a live one.
pub fn bucket_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// Split a heartbeat key back into tenant and robot.
pub fn parse_heartbeat_key(key: &str) -> Option<(TenantId, RobotId)> {
    let (t, r) = key.split_once('.')?;
    Some((TenantId::new(t).ok()?, RobotId::new(r).ok()?))
}

/// What a robot asks of the orchestrator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RobotVerb {
    Register,
    Claim,
    Renew,
    Complete,
    Reject,
    Release,
    Progress,
    /// Read the robot's desired state (commands).
    Desired,
}

impl RobotVerb {
    pub const ALL: [RobotVerb; 8] = [
        RobotVerb::Register,
        RobotVerb::Claim,
        RobotVerb::Renew,
        RobotVerb::Complete,
        RobotVerb::Reject,
        RobotVerb::Release,
        RobotVerb::Progress,
        RobotVerb::Desired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RobotVerb::Register => "register",
            RobotVerb::Claim => "claim",
            RobotVerb::Renew => "renew",
            RobotVerb::Complete => "complete",
            RobotVerb::Reject => "reject",
            RobotVerb::Release => "release",
            RobotVerb::Progress => "progress",
            RobotVerb::Desired => "desired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// `fleet.robot.<tenant>.<robot>.<verb>`.
pub fn robot_request(tenant: &TenantId, robot: &RobotId, verb: RobotVerb) -> String {
    format!("fleet.robot.{tenant}.{robot}.{}", verb.as_str())
}

/// Wildcard the orchestrator serves robot requests on.
pub const ROBOT_REQUESTS: &str = "fleet.robot.*.*.*";

/// Split a robot request subject into tenant, robot and verb.
pub fn parse_robot_request(subject: &str) -> Option<(TenantId, RobotId, RobotVerb)> {
    let mut parts = subject.split('.');
    if parts.next()? != "fleet" || parts.next()? != "robot" {
        return None;
    }
    let tenant = TenantId::new(parts.next()?).ok()?;
    let robot = RobotId::new(parts.next()?).ok()?;
    let verb = RobotVerb::parse(parts.next()?)?;
    if parts.next().is_some() {
        return None;
    }
    Some((tenant, robot, verb))
}

/// API request subject: `fleet.api.<area>.<verb>`.
pub fn api(area: &str, verb: &str) -> String {
    format!("fleet.api.{area}.{verb}")
}

/// Wildcard the orchestrator serves API requests on.
pub const API_REQUESTS: &str = "fleet.api.>";

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> TenantId {
        TenantId::new("acme").unwrap()
    }

    #[test]
    fn names() {
        let class = Class::parse(["shell", "browser"]).unwrap();
        assert_eq!(class_offers(&t(), &class), "fleet.jobs.acme.browser+shell");
        assert_eq!(class_consumer(&t(), &class), "acme_browserPshell");
        assert_eq!(class_consumer(&t(), &Class::default()), "acme_any");
        let r = RobotId::new("r7").unwrap();
        assert_eq!(robot_offers(&t(), &r), "fleet.jobs.acme.robot.r7");
        assert_eq!(robot_consumer(&t(), &r), "acme_ROBOT_r7");
        assert_eq!(heartbeat_subject(&t(), &r), "$KV.fleet_robots.acme.r7");
        assert_eq!(event(&t(), "job", "completed"), "fleet.events.acme.job.completed");
    }

    #[test]
    fn robot_request_roundtrip() {
        let r = RobotId::new("r-1").unwrap();
        for verb in RobotVerb::ALL {
            let s = robot_request(&t(), &r, verb);
            assert_eq!(parse_robot_request(&s), Some((t(), r.clone(), verb)));
        }
        assert_eq!(parse_robot_request("fleet.robot.acme.r1.explode"), None);
        assert_eq!(parse_robot_request("fleet.robot.ACME.r1.claim"), None);
        assert_eq!(parse_robot_request("fleet.robot.acme.r1.claim.x"), None);
    }

    #[test]
    fn heartbeat_key_roundtrip() {
        let r = RobotId::new("r-1").unwrap();
        assert_eq!(parse_heartbeat_key(&heartbeat_key(&t(), &r)), Some((t(), r)));
        assert_eq!(parse_heartbeat_key("nodot"), None);
    }

    #[test]
    fn class_consumer_never_collides_with_robot_consumer() {
        let class = Class::parse(["robot_x"]).unwrap();
        let r = RobotId::new("x").unwrap();
        assert_ne!(class_consumer(&t(), &class), robot_consumer(&t(), &r));
    }
}
