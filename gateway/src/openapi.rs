//! The OpenAPI document (`GET /api/v1/openapi.json`), generated from the `#[utoipa::path]`
//! annotation on each handler, next to the code it describes.
//!
//! Each shape is written once: the answer types of the orchestrator (`JobView`, `RobotView`, …)
//! are `fleet-schemas`' own, which derive `utoipa::ToSchema` behind its `openapi` feature (so
//! that crate stays free of HTTP concerns without it), and where the gateway answers something
//! else (the Canvas's aliases, `stream_seq`) its own type is serialised and described. What is
//! left here describes what no Rust type carries: path words, query filters, the error body,
//! answers built as JSON in a handler. A test checks the document lists exactly the routes of
//! [`crate::routes::ROUTES`], the list kept next to the router.

#![allow(dead_code)] // the gateway-only descriptions are never built

use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::request_body::RequestBody;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Required, Response};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::routes;

// The answer types, by the names the operations' `body =` use. Those of the orchestrator are
// `fleet-schemas`' own types, which derive their schemas with its `openapi` feature; where the
// gateway's answer differs from them (the Canvas's aliases), the gateway's type is the one that
// is both serialised and described.
pub use crate::error::ErrorBody;
pub use crate::routes::commands::{BulkAnswer, CommandAnswer};
pub use crate::routes::health::Health;
pub use crate::routes::keys::{KeyActionAnswer, KeyDeleted, KeyRevoked};
pub use crate::routes::logs::{JobLogs, RobotLogs, RobotMetrics};
pub use crate::routes::robots::{Robot, RobotDetail};
pub use crate::routes::secrets::SecretDeleted;
pub use fleet_schemas::api::{
    Activity, Analytics, Cancelled, CreatedKey, FleetSummary, JobStatus, JobView as Job, KeyList, KeyView,
    QueueView as Queue, Retried, RobotDeleted as RobotDeletedAnswer, RobotStatus, RobotView,
};
pub use fleet_schemas::event::Event;
pub use fleet_schemas::robot::LogLine;
pub use fleet_schemas::secrets::{SecretList, SecretView};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Fleet gateway",
        description = "Fleet's HTTP API: submit workflows, watch jobs and robots, command robots, follow events live. \
            Send the API key as `Authorization: Bearer <key>` or `X-Api-Key: <key>`. Every error has the shape \
            `{\"error\": {\"code\", \"message\", \"field\"}, \"request_id\"}`."
    ),
    paths(
        routes::health::health,
        routes::workflows::submit,
        routes::jobs::list,
        routes::jobs::get,
        routes::jobs::cancel,
        routes::logs::job_logs,
        routes::robots::list,
        routes::robots::get,
        routes::commands::bulk,
        routes::commands::set_status,
        routes::commands::robot_action,
        routes::logs::robot_logs,
        routes::logs::robot_metrics,
        routes::fleet::summary,
        routes::fleet::queues,
        routes::events::events,
        routes::live::live_jobs,
        routes::meta::openapi_json,
        routes::meta::metrics,
        routes::keys::create,
        routes::keys::list,
        routes::keys::delete,
        routes::keys::key_action,
        routes::keys::create_robot_key,
        routes::keys::list_robot_keys,
        routes::keys::robot_key_action,
        routes::jobs::retry,
        routes::registry::register,
        routes::registry::update,
        routes::registry::delete,
        routes::analytics::analytics,
        routes::analytics::activity,
        routes::agent::heartbeat,
        routes::agent::claim,
        routes::agent::extend_lease,
        routes::agent::complete,
        routes::agent::fail,
        routes::agent::release,
        routes::secrets::put,
        routes::secrets::list,
        routes::secrets::delete,
    ),
    // Named by no `body =` (a path word's enum, a query filter's, the answer of a shared
    // `IntoResponses`), so not collected on their own: listed here.
    components(schemas(routes::commands::RobotAction, routes::keys::KeyVerb, KeyActionAnswer, KeyStatus)),
    modifiers(&Security, &EdgeResponses),
    tags(
        (name = "jobs", description = "Submit, list, cancel and follow jobs"),
        (name = "robots", description = "The fleet's robots and commands to them"),
        (name = "fleet", description = "Fleet-wide figures"),
        (name = "events", description = "Live streams"),
        (name = "meta", description = "Health, metrics and this document"),
        (name = "keys", description = "API keys of the tenant (admin role)"),
        (name = "secrets", description = "Secrets for jobs (write-only: listed by name, never read back)"),
        (name = "agent", description = "Robots that speak HTTP, with a robot key: heartbeat, claim, lease, report"),
    )
)]
pub struct ApiDoc;

/// The document as served.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-Api-Key"))),
        );
        // The Canvas's live view: a WebSocket cannot carry headers, so the key comes as `?token=`.
        components
            .add_security_scheme("token", SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::new("token"))));
    }
}

/// The answers of the edge, shared by the operations they apply to (as `$ref`s to
/// `components.responses`, so each is described once):
///
/// - every operation that needs a key: 401 (no key, or an unknown, revoked or expired one; both
///   headers carrying different keys), 429 (the rate limit, with `Retry-After`) and 503 (NATS or
///   the orchestrator out of reach, also while checking the key, with `Retry-After`);
/// - every operation with a request body: 400 (not JSON, or empty when one is needed) and 413
///   (over the body limit); a *required* body is read by `crate::extract::JsonBody`, which also
///   answers 415 to a content type that is not JSON (optional bodies, which the Canvas posts
///   with no content type at all, are read whatever the content type).
///
/// An operation's own description of one of these statuses, when it has one, is kept.
///
/// Every query parameter also gets `allowEmptyValue: true`: the gateway reads an empty value
/// (`?status=`, `?limit=`) as no value at all (`crate::routes::QueryParams`), which is what the
/// keyword says. utoipa has no field for it (it is deprecated in OpenAPI 3.x, though still
/// defined), so it goes in through the parameter's extension map, which is written out flat.
struct EdgeResponses;

impl EdgeResponses {
    fn shared() -> [(&'static str, &'static str, Response); 6] {
        let error = |description: &str| {
            ResponseBuilder::new().description(description).content(
                "application/json",
                ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
            )
        };
        let retry_after = || {
            HeaderBuilder::new()
                .schema(Some(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(1))))
                .description(Some("Seconds to wait before trying again"))
                .build()
        };
        [
            ("401", "Unauthorized", error("No API key, or an unknown, revoked or expired one (`unauthorized`)").build()),
            (
                "429",
                "RateLimited",
                error("Too many requests for this key (`rate_limited`); retry after `Retry-After` seconds")
                    .header("Retry-After", retry_after())
                    .build(),
            ),
            (
                "503",
                "Unavailable",
                error("Nothing was done: NATS or the orchestrator is out of reach (`unavailable`); retry after `Retry-After` seconds")
                    .header("Retry-After", retry_after())
                    .build(),
            ),
            ("400", "MalformedBody", error("The body is not JSON, or is empty where one is needed (`malformed_json`)").build()),
            ("413", "PayloadTooLarge", error("The body is larger than the gateway's limit (`payload_too_large`)").build()),
            (
                "415",
                "UnsupportedMediaType",
                error("The body's `Content-Type` is not JSON (`unsupported_media_type`); without one, JSON is assumed").build(),
            ),
        ]
    }

    fn apply(op: &mut Operation) {
        for parameter in op.parameters.iter_mut().flatten() {
            if let RefOr::T(p) = parameter
                && p.parameter_in == ParameterIn::Query
            {
                p.extensions
                    .get_or_insert_with(Default::default)
                    .insert("allowEmptyValue".to_owned(), true.into());
            }
        }
        let mut statuses = Vec::new();
        if op.security.is_some() {
            statuses.extend(["401", "429", "503"]);
        }
        match &op.request_body {
            Some(RefOr::T(RequestBody { required: Some(Required::True), .. })) => {
                statuses.extend(["400", "413", "415"])
            }
            Some(_) => statuses.extend(["400", "413"]),
            None => {}
        }
        for status in statuses {
            let name = Self::shared().into_iter().find_map(|(s, name, _)| (s == status).then_some(name));
            if let Some(name) = name {
                op.responses
                    .responses
                    .entry(status.to_owned())
                    .or_insert_with(|| RefOr::Ref(Ref::from_response_name(name)));
            }
        }
    }
}

impl Modify for EdgeResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (_, name, response) in Self::shared() {
            components.responses.insert(name.to_owned(), RefOr::T(response));
        }
        for item in openapi.paths.paths.values_mut() {
            let ops = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
            for op in ops.into_iter().flatten() {
                Self::apply(op);
            }
        }
    }
}

/// A capability name as a request gives it: `[a-z0-9_-]{1,32}` (`fleet_schemas::Capability::RULE`).
#[derive(ToSchema)]
#[schema(pattern = "^[a-z0-9_-]{1,32}$")]
pub struct Capability(String);

/// A capability name in the robot registry, where surrounding blanks are trimmed first.
#[derive(ToSchema)]
#[schema(pattern = r"^\s*[a-z0-9_-]{1,32}\s*$")]
pub struct TrimmedCapability(String);

/// A robot id: `[a-z0-9-]{1,64}` (`fleet_schemas::RobotId::RULE`).
#[derive(ToSchema)]
#[schema(pattern = "^[a-z0-9-]{1,64}$")]
pub struct RobotId(String);

/// A robot's tag: not blank (`\S`: some character that is not white space), at most 64
/// characters once trimmed.
#[derive(ToSchema)]
#[schema(pattern = r"\S")]
pub struct Tag(String);

/// How a job was triggered (`scheduled` is refused until schedules exist).
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TriggerType {
    Manual,
    Webhook,
}

#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionMode {
    Lan,
    Internet,
}

/// What `PUT /api/v1/robots/{robot_id}/status` takes.
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SettableStatus {
    Maintenance,
    /// Leave maintenance (the same as `idle`).
    Online,
    Idle,
    Paused,
    /// Accepted and changes nothing: Fleet derives busy from the jobs it hands out.
    Busy,
    /// Accepted and changes nothing: a robot in trouble stops heartbeating or fails its jobs.
    Error,
    /// From the robot's own key: it goes offline now (as if its heartbeat lapsed). From another
    /// key: the robot is told to stop (finish its running jobs, then exit).
    Offline,
}

/// The commands of `POST /api/v1/robots/commands`.
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BulkCommand {
    Pause,
    Resume,
    /// The same as `resume`.
    Start,
    Maintenance,
    /// Leave maintenance.
    Online,
    Drain,
    Stop,
    Restart,
}

/// String enums listed from the real types' own lists, so the document cannot drift from them.
macro_rules! listed_enum {
    ($(#[doc = $doc:literal])* $name:ident = $values:expr) => {
        $(#[doc = $doc])*
        pub struct $name;

        impl utoipa::PartialSchema for $name {
            fn schema() -> RefOr<utoipa::openapi::schema::Schema> {
                let doc: &[&str] = &[$($doc),*];
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some($values))
                    .description(Some(doc.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" ")))
                    .into()
            }
        }

        impl ToSchema for $name {}
    };
}

listed_enum! {
    /// An API key's status (`fleet_schemas::api::KeyView::STATUSES`).
    KeyStatus = fleet_schemas::api::KeyView::STATUSES
}

/// A robot status as a filter (`idle` is the same as `online`).
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RobotStatusFilter {
    Idle,
    Online,
    Busy,
    Offline,
    Maintenance,
    Error,
}

/// One Server-Sent Event of `GET /api/v1/events`, as OpenAPI 3.1 describes an event stream: one
/// schema per event, with the fields `id` and `data` (JSON holding a [`StreamedEvent`]).
pub struct SseEvent;

/// One event as the live streams send it: the stored `fleet_schemas::event::Event` with the
/// gateway's `stream_seq` (`crate::routes::events::stream_event` adds it to the stored JSON, so
/// fields of a newer event version pass through).
#[derive(ToSchema)]
pub struct StreamedEvent {
    #[serde(flatten)]
    pub event: Event,
    /// The stream sequence: resume after it with `Last-Event-ID` or `?since=`.
    pub stream_seq: u64,
}

impl utoipa::PartialSchema for SseEvent {
    fn schema() -> RefOr<utoipa::openapi::schema::Schema> {
        let id = ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[0-9]+$"))
            .description(Some("The event's stream sequence (also its `stream_seq`)"));
        let data = ObjectBuilder::new()
            .schema_type(Type::String)
            .content_media_type("application/json")
            .content_schema(Some(Ref::from_schema_name("StreamedEvent")))
            .description(Some("The event, one JSON object"));
        ObjectBuilder::new().property("id", id).required("id").property("data", data).required("data").into()
    }
}

impl ToSchema for SseEvent {
    fn schemas(schemas: &mut Vec<(String, RefOr<utoipa::openapi::schema::Schema>)>) {
        schemas.push(("StreamedEvent".to_owned(), <StreamedEvent as utoipa::PartialSchema>::schema()));
        // And what it refers to (`Event`).
        <StreamedEvent as ToSchema>::schemas(schemas);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    /// The keys a component schema describes, through `allOf` and `$ref` (a `#[serde(flatten)]`
    /// field is described as one part of an `allOf`).
    fn keys(name: &str) -> Vec<String> {
        fn collect(doc: &Value, schema: &Value, keys: &mut Vec<String>) {
            if let Some(target) = schema["$ref"].as_str() {
                let name = target.trim_start_matches("#/components/schemas/");
                return collect(doc, &doc["components"]["schemas"][name], keys);
            }
            keys.extend(schema["properties"].as_object().into_iter().flat_map(|p| p.keys().cloned()));
            for part in schema["allOf"].as_array().into_iter().flatten() {
                collect(doc, part, keys);
            }
        }
        let doc = serde_json::to_value(document()).unwrap();
        let schema = &doc["components"]["schemas"][name];
        assert!(schema.is_object(), "no component {name}");
        let mut keys = Vec::new();
        collect(&doc, schema, &mut keys);
        keys.sort();
        keys
    }

    fn keys_of(v: impl serde::Serialize) -> Vec<String> {
        let v = serde_json::to_value(v).unwrap();
        let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    }

    /// The values a described enum lists.
    fn values(name: &str) -> Vec<String> {
        let doc = serde_json::to_value(document()).unwrap();
        let list = doc["components"]["schemas"][name]["enum"].as_array().unwrap_or_else(|| panic!("{name}"));
        list.iter().map(|v| v.as_str().unwrap().to_owned()).collect()
    }

    #[test]
    fn described_enums_list_what_the_code_accepts_and_answers() {
        use fleet_schemas::api;
        let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(values("JobStatus"), strings(&api::JobStatus::ALL.map(api::JobStatus::as_str)));
        let mut filter = values("RobotStatusFilter");
        filter.retain(|s| s != "idle");
        assert_eq!(filter, values("RobotStatus"), "the filter is the statuses plus idle");
        assert!(values("RobotStatusFilter").iter().all(|s| api::RobotStatus::parse(s).is_some()));
        use crate::routes::{commands::RobotAction, keys::KeyVerb, path_enum};
        assert!(values("RobotAction").iter().all(|a| path_enum::<RobotAction>(a).is_some()));
        assert!(values("KeyVerb").iter().all(|a| path_enum::<KeyVerb>(a).is_some()));
    }

    /// utoipa reads the serde attributes, but not all of them the way serde does (flatten,
    /// skipping, `with`): each described answer has exactly the keys its value serialises.
    #[test]
    fn described_keys_are_the_serialised_keys() {
        use fleet_schemas::api;
        use time::OffsetDateTime;
        let t = OffsetDateTime::UNIX_EPOCH;
        let job = api::JobView {
            job_id: fleet_schemas::JobId::new(),
            workflow_id: String::new(),
            workflow_name: String::new(),
            status: api::JobStatus::Pending,
            robot_id: None,
            robot_name: None,
            attempt: 0,
            priority: 0,
            required_capabilities: vec![],
            progress: 0,
            current_node: None,
            created_at: t,
            claimed_at: None,
            started_at: None,
            completed_at: None,
            duration_ms: None,
            output: None,
            error_message: None,
            error_type: None,
            waiting_reason: None,
            retry_count: 0,
            target_robot_id: None,
            trigger_type: String::new(),
            execution_mode: String::new(),
            request_id: None,
        };
        assert_eq!(keys("Job"), keys_of(job));
        let robot = api::RobotView {
            robot_id: String::new(),
            name: String::new(),
            hostname: String::new(),
            status: api::RobotStatus::Online,
            state: String::new(),
            desired_state: String::new(),
            environment: String::new(),
            capabilities: vec![],
            offered_capabilities: vec![],
            granted_capabilities: None,
            tags: vec![],
            max_concurrent_jobs: 1,
            current_job_ids: vec![],
            current_job: None,
            cpu_percent: None,
            memory_mb: None,
            last_heartbeat: None,
            last_seen: None,
            created_at: t,
            version: None,
        };
        assert_eq!(keys("RobotView"), keys_of(robot.clone()));
        let metrics = RobotMetrics {
            robot_id: String::new(),
            status: api::RobotStatus::Online,
            state: String::new(),
            cpu_percent: None,
            memory_mb: None,
            last_heartbeat: None,
            last_seen: None,
            current_jobs: 0,
            current_job_ids: vec![],
            max_concurrent_jobs: 1,
            version: None,
        };
        assert_eq!(keys("RobotMetrics"), keys_of(metrics));
        assert_eq!(keys("Robot"), keys_of(Robot::from(robot.clone())));
        let detail = RobotDetail {
            robot: Robot::from(robot),
            jobs_completed_today: 0,
            jobs_failed_today: 0,
            average_job_duration_seconds: None,
            memory_percent: None,
        };
        assert_eq!(keys("RobotDetail"), keys_of(detail));
        let summary = api::FleetSummary {
            total_robots: 0,
            active_robots: 0,
            idle_robots: 0,
            busy_robots: 0,
            offline_robots: 0,
            maintenance_robots: 0,
            active_jobs: 0,
            queue_depth: 0,
            total_jobs_today: 0,
            average_job_duration_seconds: 0.0,
            jobs_by_status: Default::default(),
        };
        assert_eq!(keys("FleetSummary"), keys_of(summary));
        let queue = api::QueueView {
            class: String::new(),
            capabilities: vec![],
            waiting: 0,
            offered: 0,
            running: 0,
            capacity: 0,
            online_robots: 0,
            robots: 0,
        };
        assert_eq!(keys("Queue"), keys_of(queue));
        let cancelled = api::Cancelled {
            job_id: fleet_schemas::JobId::new(),
            cancelled: true,
            previous_status: api::JobStatus::Pending,
            message: String::new(),
        };
        assert_eq!(keys("Cancelled"), keys_of(cancelled));
        let line = fleet_schemas::robot::LogLine {
            job_id: fleet_schemas::JobId::new(),
            attempt: 1,
            robot_id: fleet_schemas::RobotId::new("r1").unwrap(),
            stream: String::new(),
            step: None,
            line: String::new(),
            at: t,
        };
        assert_eq!(keys("LogLine"), keys_of(line.clone()));
        let job_logs = JobLogs { job_id: line.job_id, logs: vec![line.clone()], next_since: None };
        assert_eq!(keys("JobLogs"), keys_of(job_logs));
        let robot_logs = RobotLogs { robot_id: line.robot_id.clone(), logs: vec![line] };
        assert_eq!(keys("RobotLogs"), keys_of(robot_logs));
        let error = crate::error::HttpError::invalid("priority", "0 to 20").body(None);
        assert_eq!(keys("ErrorBody"), keys_of(&error));
        assert_eq!(keys("ErrorDetail"), keys_of(&error["error"]));
        let id = fleet_schemas::JobId::new();
        let retried = api::Retried {
            job_id: id,
            new_job_id: id,
            original_job_id: id,
            previous_status: api::JobStatus::Failed,
            status: api::JobStatus::Pending,
            next_attempt: 2,
            message: String::new(),
        };
        assert_eq!(keys("Retried"), keys_of(retried));
        let analytics = api::Analytics {
            days: 7,
            total_jobs: 0,
            jobs_completed: 0,
            jobs_failed: 0,
            success_rate: 0.0,
            failure_rate: 0.0,
            average_duration_ms: 0.0,
            avg_duration_ms: 0.0,
            p50_duration_ms: 0.0,
            p90_duration_ms: 0.0,
            p99_duration_ms: 0.0,
            job_status_distribution: Default::default(),
            slowest_workflows: vec![],
            error_distribution: vec![],
            throughput_per_workflow: vec![],
            throughput_per_hour: vec![],
            self_healing_success_rate: 0.0,
        };
        assert_eq!(keys("Analytics"), keys_of(analytics));
        let slow = api::WorkflowDuration {
            workflow_id: String::new(),
            workflow_name: String::new(),
            average_duration_ms: 0.0,
            runs: 0,
        };
        assert_eq!(keys("WorkflowDuration"), keys_of(slow));
        assert_eq!(keys("ErrorCount"), keys_of(api::ErrorCount { error_type: String::new(), count: 0 }));
        let per_workflow =
            api::WorkflowThroughput { workflow_id: String::new(), workflow_name: String::new(), jobs: 0 };
        assert_eq!(keys("WorkflowThroughput"), keys_of(per_workflow));
        assert_eq!(keys("HourThroughput"), keys_of(api::HourThroughput { hour: t, jobs: 0 }));
        let event = api::ActivityEvent {
            id: String::new(),
            kind: String::new(),
            timestamp: t,
            title: String::new(),
            details: Value::Null,
            robot_id: None,
            job_id: None,
        };
        assert_eq!(keys("ActivityEvent"), keys_of(event.clone()));
        assert_eq!(keys("Activity"), keys_of(api::Activity { events: vec![event], total: 1 }));
        let key = api::KeyView {
            id: String::new(),
            name: String::new(),
            key_name: String::new(),
            description: None,
            role: fleet_schemas::keys::Role::Viewer,
            status: String::new(),
            robot_id: None,
            robot_name: None,
            created_at: t,
            expires_at: None,
            last_used_at: None,
            last_used_ip: None,
            rate_limit: None,
            capabilities: None,
        };
        assert_eq!(keys("Key"), keys_of(key.clone()));
        let created = api::CreatedKey { api_key: String::new(), key: key.clone() };
        assert_eq!(keys("CreatedKey"), keys_of(created));
        let revoked = KeyRevoked { revoked: true, key_id: String::new(), key: key.clone() };
        assert_eq!(keys("KeyRevoked"), keys_of(revoked));
        assert_eq!(keys("KeyDeleted"), keys_of(KeyDeleted { deleted: true, key_id: String::new() }));
        assert_eq!(keys("KeyList"), keys_of(api::KeyList { keys: vec![key], total: 1 }));
        let robot_id = fleet_schemas::RobotId::new("r1").unwrap();
        let answer = CommandAnswer {
            robot_id: robot_id.clone(),
            action: String::new(),
            accepted: true,
            message: String::new(),
        };
        assert_eq!(keys("CommandAnswer"), keys_of(answer));
        let bulk = BulkAnswer { command: String::new(), count: 0, robots: vec![], message: String::new() };
        assert_eq!(keys("BulkAnswer"), keys_of(bulk));
        let deleted = api::RobotDeleted { robot_id, deleted: true, stopped: false };
        assert_eq!(keys("RobotDeletedAnswer"), keys_of(deleted));
        // Every optional field set, since unset ones are left out of an event.
        let event = fleet_schemas::event::Event {
            v: 1,
            id: 1,
            kind: "job.completed".into(),
            tenant: fleet_schemas::TenantId::default_tenant(),
            occurred_at: t,
            job_id: Some(String::new()),
            robot_id: Some(String::new()),
            seq: Some(1),
            attempt: Some(1),
            data: Value::Null,
        };
        let mut streamed = keys_of(event);
        streamed.push("stream_seq".to_owned()); // added by `routes::events::stream_event`
        streamed.sort();
        assert_eq!(keys("StreamedEvent"), streamed);
    }
}
