//! The OpenAPI document (`GET /api/v1/openapi.json`), generated from the `#[utoipa::path]`
//! annotation on each handler, next to the code it describes.
//!
//! The answer types of the orchestrator (`JobView`, `RobotView`, …) live in `fleet-schemas`,
//! which stays free of HTTP concerns, so they are described here by documentation-only mirrors
//! (never built; a test checks each mirror has exactly the keys the real type serializes, so
//! they cannot drift apart). A test also checks the document lists exactly the routes of
//! [`crate::routes::ROUTES`], the list kept next to the router.

#![allow(dead_code)] // the mirrors are descriptions, never built

use serde_json::Value;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::request_body::RequestBody;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Required, Response};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::routes;

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
    ),
    // Named by no `body =` (a path word's enum, the answer of a shared `IntoResponses`), so
    // not collected on their own: listed here.
    components(schemas(routes::commands::RobotAction, routes::keys::KeyVerb, KeyActionAnswer)),
    modifiers(&Security, &EdgeResponses),
    tags(
        (name = "jobs", description = "Submit, list, cancel and follow jobs"),
        (name = "robots", description = "The fleet's robots and commands to them"),
        (name = "fleet", description = "Fleet-wide figures"),
        (name = "events", description = "Live streams"),
        (name = "meta", description = "Health, metrics and this document"),
        (name = "keys", description = "API keys of the tenant (admin role)"),
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
    /// A job's status (`fleet_schemas::api::JobStatus`).
    JobStatus = fleet_schemas::api::JobStatus::ALL.map(fleet_schemas::api::JobStatus::as_str)
}

listed_enum! {
    /// A robot's status (`fleet_schemas::api::RobotStatus`).
    RobotStatus = fleet_schemas::api::RobotStatus::ALL.map(fleet_schemas::api::RobotStatus::as_str)
}

listed_enum! {
    /// An API key's role (`fleet_schemas::keys::Role`); each includes those listed before it.
    Role = fleet_schemas::keys::Role::ALL.map(fleet_schemas::keys::Role::as_str)
}

/// An API key's status.
#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    Active,
    Revoked,
    Expired,
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

/// Every error answer.
#[derive(ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
    /// The request id (also in the `x-request-id` header).
    pub request_id: Option<String>,
}

#[derive(ToSchema)]
pub struct ErrorDetail {
    /// Stable, snake_case: `not_found`, `invalid`, `unauthorized`, `rate_limited`, `unavailable`, `outcome_unknown`, …
    pub code: String,
    pub message: String,
    /// The request field at fault (`workflow_json.steps[0].argv`, `priority`, …).
    pub field: Option<String>,
}

/// A job (`fleet_schemas::api::JobView`); every key is always present, `null` when unknown.
#[derive(ToSchema)]
pub struct Job {
    pub job_id: String,
    pub workflow_id: String,
    pub workflow_name: String,
    pub status: JobStatus,
    pub robot_id: Option<String>,
    pub robot_name: Option<String>,
    pub attempt: i32,
    pub priority: i16,
    pub required_capabilities: Vec<String>,
    pub progress: i16,
    pub current_node: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub claimed_at: Option<String>,
    #[schema(format = DateTime)]
    pub started_at: Option<String>,
    #[schema(format = DateTime)]
    pub completed_at: Option<String>,
    pub duration_ms: Option<i64>,
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    pub error_message: Option<String>,
    pub error_type: Option<String>,
    /// Why a pending job waits ("no online robot of tenant acme has gpu").
    pub waiting_reason: Option<String>,
    pub retry_count: i32,
    pub target_robot_id: Option<String>,
    pub trigger_type: String,
    pub execution_mode: String,
    /// The request id of the submission.
    pub request_id: Option<String>,
}

/// A robot (`fleet_schemas::api::RobotView`), with the Canvas's aliases `current_job_id` and
/// `current_jobs` added by the gateway.
#[derive(ToSchema)]
pub struct Robot {
    pub robot_id: String,
    pub name: String,
    pub hostname: String,
    pub status: RobotStatus,
    /// What the robot reports: online, paused, maintenance, draining, stopping
    pub state: String,
    /// What it was told: online, paused, maintenance
    pub desired_state: String,
    pub environment: String,
    pub capabilities: Vec<String>,
    pub tags: Vec<String>,
    pub max_concurrent_jobs: u32,
    pub current_job_ids: Vec<String>,
    pub current_job: Option<String>,
    pub cpu_percent: Option<f32>,
    pub memory_mb: Option<f64>,
    #[schema(format = DateTime)]
    pub last_heartbeat: Option<String>,
    #[schema(format = DateTime)]
    pub last_seen: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    pub version: Option<String>,
}

/// `GET /api/v1/metrics/fleet` (`fleet_schemas::api::FleetSummary`).
#[derive(ToSchema)]
pub struct FleetSummary {
    pub total_robots: u32,
    pub active_robots: u32,
    pub idle_robots: u32,
    pub busy_robots: u32,
    pub offline_robots: u32,
    pub maintenance_robots: u32,
    pub active_jobs: u32,
    pub queue_depth: u32,
    pub total_jobs_today: u32,
    pub average_job_duration_seconds: f64,
    #[schema(value_type = Object)]
    pub jobs_by_status: Value,
}

/// One robot class (`fleet_schemas::api::QueueView`).
#[derive(ToSchema)]
pub struct Queue {
    pub class: String,
    pub capabilities: Vec<String>,
    pub waiting: u32,
    pub offered: u32,
    pub running: u32,
    pub capacity: u32,
    pub online_robots: u32,
    pub robots: u32,
}

/// `POST /api/v1/jobs/{job_id}/cancel` (`fleet_schemas::api::Cancelled`).
#[derive(ToSchema)]
pub struct Cancelled {
    pub job_id: String,
    pub cancelled: bool,
    pub previous_status: JobStatus,
    pub message: String,
}

/// One log line of a job (`fleet_schemas::robot::LogLine`).
#[derive(ToSchema)]
pub struct LogLine {
    pub job_id: String,
    pub attempt: i32,
    pub robot_id: String,
    /// stdout, stderr or fleet
    pub stream: String,
    pub step: Option<String>,
    pub line: String,
    #[schema(format = DateTime)]
    pub at: String,
}

#[derive(ToSchema)]
pub struct JobLogs {
    pub job_id: String,
    pub logs: Vec<LogLine>,
    /// Pass as `since` to get the lines after these.
    pub next_since: Option<u64>,
}

#[derive(ToSchema)]
pub struct RobotLogs {
    pub robot_id: String,
    pub logs: Vec<LogLine>,
}

/// `GET /api/v1/robots/{robot_id}/metrics`.
#[derive(ToSchema)]
pub struct RobotMetrics {
    pub robot_id: String,
    pub status: RobotStatus,
    pub state: String,
    pub cpu_percent: Option<f32>,
    pub memory_mb: Option<f64>,
    #[schema(format = DateTime)]
    pub last_heartbeat: Option<String>,
    #[schema(format = DateTime)]
    pub last_seen: Option<String>,
    pub current_jobs: u32,
    pub current_job_ids: Vec<String>,
    pub max_concurrent_jobs: u32,
    pub version: Option<String>,
}

/// Answer of the per-robot commands (`start`, `stop`, `pause`, `resume`, `restart`).
#[derive(ToSchema)]
pub struct CommandAnswer {
    pub robot_id: String,
    pub action: String,
    pub accepted: bool,
    pub message: String,
}

/// Answer of the bulk command.
#[derive(ToSchema)]
pub struct BulkAnswer {
    pub command: String,
    /// How many robots were told.
    pub count: u32,
    pub robots: Vec<String>,
    pub message: String,
}

/// `POST /api/v1/jobs/{job_id}/retry` (`fleet_schemas::api::Retried`): the job runs again as its
/// next attempt under the same id, so all three ids are that job's.
#[derive(ToSchema)]
pub struct Retried {
    pub job_id: String,
    pub new_job_id: String,
    pub original_job_id: String,
    /// failed, cancelled or timed_out
    pub previous_status: JobStatus,
    /// pending
    pub status: JobStatus,
    pub next_attempt: i32,
    pub message: String,
}

/// `DELETE /api/v1/robots/{robot_id}`.
#[derive(ToSchema)]
pub struct RobotDeletedAnswer {
    pub deleted: bool,
    pub robot_id: String,
    /// True when a running robot process was told to stop.
    pub stopped: bool,
}

/// `GET /api/v1/metrics/analytics` (`fleet_schemas::api::Analytics`). Durations are those of
/// completed jobs; "failed" counts failed and timed-out jobs; rates are percentages (0 to 100)
/// of the jobs that ended.
#[derive(ToSchema)]
pub struct Analytics {
    pub days: u32,
    pub total_jobs: u64,
    pub jobs_completed: u64,
    pub jobs_failed: u64,
    pub success_rate: f64,
    pub failure_rate: f64,
    pub average_duration_ms: f64,
    pub avg_duration_ms: f64,
    pub p50_duration_ms: f64,
    pub p90_duration_ms: f64,
    pub p99_duration_ms: f64,
    /// `{status: count}`
    #[schema(value_type = Object)]
    pub job_status_distribution: Value,
    pub slowest_workflows: Vec<WorkflowDuration>,
    pub error_distribution: Vec<ErrorCount>,
    pub throughput_per_workflow: Vec<WorkflowThroughput>,
    pub throughput_per_hour: Vec<HourThroughput>,
    /// Always 0: Fleet does not heal selectors.
    pub self_healing_success_rate: f64,
}

#[derive(ToSchema)]
pub struct WorkflowDuration {
    pub workflow_id: String,
    pub workflow_name: String,
    pub average_duration_ms: f64,
    pub runs: u64,
}

#[derive(ToSchema)]
pub struct ErrorCount {
    pub error_type: String,
    pub count: u64,
}

#[derive(ToSchema)]
pub struct WorkflowThroughput {
    pub workflow_id: String,
    pub workflow_name: String,
    pub jobs: u64,
}

#[derive(ToSchema)]
pub struct HourThroughput {
    #[schema(format = DateTime)]
    pub hour: String,
    pub jobs: u64,
}

/// `GET /api/v1/metrics/activity` (`fleet_schemas::api::Activity`).
#[derive(ToSchema)]
pub struct Activity {
    pub events: Vec<ActivityEvent>,
    /// Events matching the filters, not only those returned.
    pub total: u64,
}

#[derive(ToSchema)]
pub struct ActivityEvent {
    pub id: String,
    /// job_started, job_completed, job_failed, robot_online, robot_offline, or the event's name
    /// with `_` for `.`
    #[schema(rename = "type")]
    pub kind: String,
    #[schema(format = DateTime)]
    pub timestamp: String,
    pub title: String,
    #[schema(value_type = Object)]
    pub details: Value,
    pub robot_id: Option<String>,
    pub job_id: Option<String>,
}

/// An API key as listed (`fleet_schemas::api::KeyView`): never its secret.
#[derive(ToSchema)]
pub struct Key {
    /// The key id, the part between `crpa_` and the secret.
    pub id: String,
    pub name: String,
    /// The same as `name` (the Canvas reads `key_name`).
    pub key_name: String,
    pub description: Option<String>,
    pub role: Role,
    pub status: KeyStatus,
    pub robot_id: Option<String>,
    pub robot_name: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
    #[schema(format = DateTime)]
    pub last_used_at: Option<String>,
    pub last_used_ip: Option<String>,
    /// The key's own rate limit at the gateway, `<requests>/<s|min|h>`; `null`: the gateway's
    /// default.
    #[schema(example = "1000/min")]
    pub rate_limit: Option<String>,
}

/// A new or rotated key (`fleet_schemas::api::CreatedKey`).
#[derive(ToSchema)]
pub struct CreatedKey {
    /// The key itself, `crpa_<key id>_<secret>`: shown this once, Fleet keeps only its hash.
    pub api_key: String,
    pub key: Key,
}

/// `GET /api/v1/api-keys` (`fleet_schemas::api::KeyList`).
#[derive(ToSchema)]
pub struct KeyList {
    pub keys: Vec<Key>,
    /// Keys matching the filters, not only those returned.
    pub total: u32,
}

/// Answer of `POST …/{key_id}/revoke`.
#[derive(ToSchema)]
pub struct KeyRevoked {
    pub revoked: bool,
    pub key_id: String,
    pub key: Key,
}

/// Answer of `POST …/{key_id}/{action}`: revoked, or rotated (a new `api_key`).
#[derive(ToSchema)]
#[serde(untagged)]
pub enum KeyActionAnswer {
    Revoked(KeyRevoked),
    Rotated(CreatedKey),
}

/// Answer of `DELETE /api/v1/api-keys/{key_id}`.
#[derive(ToSchema)]
pub struct KeyDeleted {
    pub deleted: bool,
    pub key_id: String,
}

/// One event as the live streams send it (`fleet_schemas::event::Event` with `stream_seq`).
#[derive(ToSchema)]
pub struct StreamedEvent {
    /// Schema version.
    pub v: u32,
    /// Unique, increasing id of the event.
    pub id: i64,
    /// `job.submitted`, `job.started`, `job.completed`, `robot.registered`, …
    #[schema(rename = "type")]
    pub kind: String,
    pub tenant: String,
    #[schema(format = DateTime)]
    pub occurred_at: String,
    pub job_id: Option<String>,
    pub robot_id: Option<String>,
    /// Per-job sequence number (1, 2, 3… for each job); absent for robot events.
    pub seq: Option<i32>,
    pub attempt: Option<i32>,
    /// Event-specific fields (`status`, `error`, `class`, `reason`…).
    pub data: Value,
    /// The stream sequence: resume after it with `Last-Event-ID` or `?since=`.
    pub stream_seq: u64,
}

/// One Server-Sent Event of `GET /api/v1/events`, as OpenAPI 3.1 describes an event stream: one
/// schema per event, with the fields `id` and `data` (JSON holding a [`StreamedEvent`]).
pub struct SseEvent;

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
    }
}

/// `GET /health`.
#[derive(ToSchema)]
pub struct Health {
    /// healthy or unhealthy
    pub status: String,
    pub service: String,
    pub version: String,
    #[schema(format = DateTime)]
    pub timestamp: String,
    pub nats: String,
    pub orchestrator: String,
    pub leader: bool,
    pub detail: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys of a mirror's schema.
    fn keys(name: &str) -> Vec<String> {
        let doc = serde_json::to_value(document()).unwrap();
        let props =
            doc["components"]["schemas"][name]["properties"].as_object().unwrap_or_else(|| panic!("{name}"));
        let mut keys: Vec<String> = props.keys().cloned().collect();
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

    #[test]
    fn mirrors_match_the_real_types() {
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
        assert_eq!(keys("Robot"), keys_of(robot));
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
        assert_eq!(keys("LogLine"), keys_of(line));
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
        };
        assert_eq!(keys("Key"), keys_of(key.clone()));
        let created = api::CreatedKey { api_key: String::new(), key: key.clone() };
        assert_eq!(keys("CreatedKey"), keys_of(created));
        assert_eq!(keys("KeyList"), keys_of(api::KeyList { keys: vec![key], total: 1 }));
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
