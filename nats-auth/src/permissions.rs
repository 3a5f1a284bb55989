//! What each role may publish and subscribe to on Fleet's NATS: the one place that says it.
//!
//! The server enforces these lists, not our programs: the static service users (orchestrator,
//! gateway) get them in the generated `nats.conf` ([`crate::setup`]), robots and observers in the
//! short-lived user JWT the orchestrator's auth callout issues at connect time. Every list is an
//! allow list; anything not named is refused by the server with a permissions violation.
//!
//! The rules lean on the layout of `fleet_schemas::subjects`: tenant and robot tokens sit at
//! fixed positions, so "this robot's own subjects" is a prefix.
//!
//! A robot's JetStream rights are exactly what one pull needs: stream and consumer info for its
//! two consumers, `MSG.NEXT` on them, and acks of messages delivered by them. It gets no
//! `$JS.API.>` wildcard, so it can never purge, delete or reconfigure anything, nor create
//! consumers that would read other tenants' offers. Replies reach a robot only under its own
//! inbox prefix ([`robot_inbox_prefix`]), never `_INBOX.>`, so it cannot read replies meant for
//! anyone else, and it answers no requests.

use fleet_schemas::ids::{Class, RobotId, TenantId};
use fleet_schemas::subjects;
use serde::Serialize;

/// Publish and subscribe allow lists of one connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// Whether the connection may reply to requests it receives (the server then lets it
    /// publish once to each reply subject it was sent). Only services answer requests.
    pub allow_responses: bool,
}

/// The user name of the connection a robot makes before it knows its tenant, to ask who its key
/// says it is ([`enrol`]).
pub const ENROL_USER: &str = "_enrol";

/// Inbox prefix of the gateway: it reads replies only there.
pub const GATEWAY_INBOX: &str = "_INBOX_gateway";

/// Subject a robot (or its enrolment connection) asks who its key makes it.
pub fn whoami(key_id: &str) -> String {
    format!("fleet.whoami.{key_id}")
}

/// Subject the orchestrators serve [`whoami`] on.
pub const WHOAMI_REQUESTS: &str = "fleet.whoami.*";

/// Where a robot's replies arrive: unique to its key and robot id.
pub fn robot_inbox_prefix(key_id: &str, robot: &str) -> String {
    format!("_INBOX_{key_id}.{robot}")
}

/// The orchestrator: everything in the FLEET account (it owns the streams, buckets and
/// consumers and answers every request).
pub fn orchestrator() -> Permissions {
    Permissions { publish: vec![">".into()], subscribe: vec![">".into()], allow_responses: true }
}

/// The orchestrator's connection in the system account: only what disconnecting a revoked
/// robot needs (find its connections, kick them).
pub fn orchestrator_sys() -> Permissions {
    Permissions {
        publish: vec!["$SYS.REQ.SERVER.PING.CONNZ".into(), "$SYS.REQ.SERVER.*.KICK".into()],
        subscribe: vec!["_INBOX.>".into()],
        allow_responses: false,
    }
}

/// The gateway: API requests to the orchestrator, and reading the events and logs it streams to
/// HTTP clients (ordered consumers on FLEET_EVENTS and FLEET_LOGS, and live subjects).
pub fn gateway() -> Permissions {
    let mut publish = vec![subjects::API_REQUESTS.to_owned()];
    for stream in [subjects::EVENTS_STREAM, subjects::LOGS_STREAM] {
        publish.push(format!("$JS.API.STREAM.INFO.{stream}"));
        publish.push(format!("$JS.API.CONSUMER.CREATE.{stream}"));
        publish.push(format!("$JS.API.CONSUMER.CREATE.{stream}.>"));
        publish.push(format!("$JS.API.CONSUMER.INFO.{stream}.*"));
        publish.push(format!("$JS.API.CONSUMER.DELETE.{stream}.*"));
        publish.push(format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.*"));
        publish.push(format!("$JS.API.STREAM.MSG.GET.{stream}"));
        publish.push(format!("$JS.FC.{stream}.>"));
        publish.push(format!("$JS.ACK.{stream}.>"));
    }
    publish.push("$JS.API.INFO".into());
    Permissions {
        publish,
        subscribe: vec![format!("{GATEWAY_INBOX}.>"), "fleet.live.>".into()],
        allow_responses: false,
    }
}

/// Who a robot connection is: its tenant, id, key, and the class its attested capabilities
/// make it (which decides the one class consumer it may pull from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RobotScope {
    pub tenant: TenantId,
    pub robot: RobotId,
    pub key_id: String,
    pub class: Class,
}

/// A robot: its own request subjects, its own heartbeat key, its tenant's job logs, its two
/// consumers, its own inbox and command nudges.
pub fn robot(scope: &RobotScope) -> Permissions {
    let RobotScope { tenant, robot, key_id, class } = scope;
    let class_consumer = subjects::class_consumer(tenant, class);
    let robot_consumer = subjects::robot_consumer(tenant, robot);
    let kv_stream = subjects::bucket_stream(subjects::ROBOTS_BUCKET);
    let mut publish = vec![
        format!("fleet.robot.{tenant}.{robot}.*"),
        whoami(key_id),
        format!("fleet.logs.{tenant}.>"),
        subjects::heartbeat_subject(tenant, robot),
        format!("$JS.API.STREAM.INFO.{kv_stream}"),
        format!("$JS.API.STREAM.INFO.{}", subjects::JOBS_STREAM),
    ];
    for consumer in [&class_consumer, &robot_consumer] {
        publish.push(format!("$JS.API.CONSUMER.INFO.{}.{consumer}", subjects::JOBS_STREAM));
        publish.push(format!("$JS.API.CONSUMER.MSG.NEXT.{}.{consumer}", subjects::JOBS_STREAM));
        publish.push(format!("$JS.ACK.{}.{consumer}.>", subjects::JOBS_STREAM));
    }
    Permissions {
        publish,
        subscribe: vec![
            format!("{}.>", robot_inbox_prefix(key_id, robot.as_str())),
            subjects::robot_command(tenant, robot),
        ],
        allow_responses: false,
    }
}

/// A read-only observer of one tenant: its events and live events, nothing else.
pub fn observer(tenant: &TenantId) -> Permissions {
    Permissions {
        publish: Vec::new(),
        subscribe: vec![format!("fleet.events.{tenant}.>"), format!("fleet.live.{tenant}.>")],
        allow_responses: false,
    }
}

/// The enrolment connection of a robot key: only "who am I" for that key, answered in its own
/// inbox.
pub fn enrol(key_id: &str) -> Permissions {
    Permissions {
        publish: vec![whoami(key_id)],
        subscribe: vec![format!("{}.>", robot_inbox_prefix(key_id, ENROL_USER))],
        allow_responses: false,
    }
}

/// The connection name a robot presents: `fleet-robot <robot id> <cap,cap,…>`. The auth callout
/// reads the capabilities the robot offers from it (before any message is exchanged, since
/// the permissions it issues depend on the class).
pub fn robot_connection_name(robot: &RobotId, offered: &[String]) -> String {
    format!("fleet-robot {robot} {}", offered.join(","))
}

/// The robot id and offered capabilities of a [`robot_connection_name`], or `None` when the
/// name is not one.
pub fn parse_robot_connection_name(name: &str) -> Option<(String, Vec<String>)> {
    let rest = name.strip_prefix("fleet-robot ")?;
    let (robot, caps) = rest.split_once(' ').unwrap_or((rest, ""));
    let caps = caps.split(',').filter(|c| !c.is_empty()).map(str::to_owned).collect();
    Some((robot.to_owned(), caps))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> RobotScope {
        RobotScope {
            tenant: TenantId::new("acme").unwrap(),
            robot: RobotId::new("r1").unwrap(),
            key_id: "k1".into(),
            class: Class::parse(["browser", "shell"]).unwrap(),
        }
    }

    #[test]
    fn a_robot_gets_no_wildcards_outside_its_own_subjects() {
        let p = robot(&scope());
        for s in p.publish.iter().chain(&p.subscribe) {
            assert!(!s.starts_with('>') && !s.starts_with("$JS.API.>") && !s.starts_with("_INBOX."), "{s}");
            assert!(
                s.contains("acme") || s.contains("k1") || s.starts_with("$JS.API.STREAM.INFO."),
                "{s} is not scoped to the robot"
            );
        }
        assert!(p.publish.contains(&"$JS.API.CONSUMER.MSG.NEXT.FLEET_JOBS.acme_browserPshell".to_owned()));
        assert!(p.publish.contains(&"$JS.ACK.FLEET_JOBS.acme_ROBOT_r1.>".to_owned()));
        assert!(!p.allow_responses);
    }

    #[test]
    fn connection_names_round_trip() {
        let r = RobotId::new("r-7").unwrap();
        let name = robot_connection_name(&r, &["gpu".into(), "shell".into()]);
        assert_eq!(
            parse_robot_connection_name(&name),
            Some(("r-7".into(), vec!["gpu".into(), "shell".into()]))
        );
        assert_eq!(
            parse_robot_connection_name(&robot_connection_name(&r, &[])),
            Some(("r-7".into(), vec![]))
        );
        assert_eq!(parse_robot_connection_name("nats-cli"), None);
    }

    #[test]
    fn an_observer_publishes_nothing() {
        let p = observer(&TenantId::new("a").unwrap());
        assert!(p.publish.is_empty());
        assert_eq!(p.subscribe, ["fleet.events.a.>", "fleet.live.a.>"]);
    }
}
