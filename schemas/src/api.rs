//! The orchestrator's API over NATS (`fleet.api.<area>.<verb>`, MessagePack request/reply).
//!
//! The gateway translates each HTTP call into one of these. Every request carries the tenant
//! (taken from the caller's key, never from the request body), a request id and a deadline: the
//! orchestrator does not commit after the deadline, so a late answer is always "nothing done".

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::ids::{Capability, JobId, RequestId, RobotId, TenantId};

/// Schema version of the messages in this module.
pub const API_VERSION: u32 = 1;

/// An API area and verb, naming the subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    SubmitJob,
    GetJob,
    ListJobs,
    CancelJob,
    ListRobots,
    GetRobot,
    FleetSummary,
    ListQueues,
    RobotCommand,
    VerifyKey,
    CreateKey,
    ListKeys,
    RevokeKey,
    RotateKey,
    DeleteKey,
    Ping,
    RetryJob,
    RegisterRobot,
    UpdateRobot,
    DeleteRobot,
    Analytics,
    Activity,
    AgentHeartbeat,
    AgentClaim,
    AgentReport,
    PutSecret,
    ListSecrets,
    DeleteSecret,
}

impl Endpoint {
    pub const ALL: [Endpoint; 28] = [
        Endpoint::SubmitJob,
        Endpoint::GetJob,
        Endpoint::ListJobs,
        Endpoint::CancelJob,
        Endpoint::ListRobots,
        Endpoint::GetRobot,
        Endpoint::FleetSummary,
        Endpoint::ListQueues,
        Endpoint::RobotCommand,
        Endpoint::VerifyKey,
        Endpoint::CreateKey,
        Endpoint::ListKeys,
        Endpoint::RevokeKey,
        Endpoint::RotateKey,
        Endpoint::DeleteKey,
        Endpoint::Ping,
        Endpoint::RetryJob,
        Endpoint::RegisterRobot,
        Endpoint::UpdateRobot,
        Endpoint::DeleteRobot,
        Endpoint::Analytics,
        Endpoint::Activity,
        Endpoint::AgentHeartbeat,
        Endpoint::AgentClaim,
        Endpoint::AgentReport,
        Endpoint::PutSecret,
        Endpoint::ListSecrets,
        Endpoint::DeleteSecret,
    ];

    pub fn area_verb(self) -> (&'static str, &'static str) {
        match self {
            Endpoint::SubmitJob => ("jobs", "submit"),
            Endpoint::GetJob => ("jobs", "get"),
            Endpoint::ListJobs => ("jobs", "list"),
            Endpoint::CancelJob => ("jobs", "cancel"),
            Endpoint::ListRobots => ("robots", "list"),
            Endpoint::GetRobot => ("robots", "get"),
            Endpoint::FleetSummary => ("fleet", "summary"),
            Endpoint::ListQueues => ("queues", "list"),
            Endpoint::RobotCommand => ("robots", "command"),
            Endpoint::VerifyKey => ("keys", "verify"),
            Endpoint::CreateKey => ("keys", "create"),
            Endpoint::ListKeys => ("keys", "list"),
            Endpoint::RevokeKey => ("keys", "revoke"),
            Endpoint::RotateKey => ("keys", "rotate"),
            Endpoint::DeleteKey => ("keys", "delete"),
            Endpoint::Ping => ("system", "ping"),
            Endpoint::RetryJob => ("jobs", "retry"),
            Endpoint::RegisterRobot => ("robots", "register"),
            Endpoint::UpdateRobot => ("robots", "update"),
            Endpoint::DeleteRobot => ("robots", "delete"),
            Endpoint::Analytics => ("fleet", "analytics"),
            Endpoint::Activity => ("fleet", "activity"),
            Endpoint::AgentHeartbeat => ("agent", "heartbeat"),
            Endpoint::AgentClaim => ("agent", "claim"),
            Endpoint::AgentReport => ("agent", "report"),
            Endpoint::PutSecret => ("secrets", "put"),
            Endpoint::ListSecrets => ("secrets", "list"),
            Endpoint::DeleteSecret => ("secrets", "delete"),
        }
    }

    pub fn subject(self) -> String {
        let (area, verb) = self.area_verb();
        crate::subjects::api(area, verb)
    }

    pub fn from_subject(subject: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.subject() == subject)
    }
}

/// Envelope of every API request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiRequest<T> {
    pub v: u32,
    pub request_id: RequestId,
    pub tenant: TenantId,
    /// Unix milliseconds after which the orchestrator must not commit.
    pub deadline_unix_ms: i64,
    pub body: T,
    /// Who asks: the caller's key id, set by the gateway from the verified key (`None` for a
    /// dev-mode caller or an internal request). Recorded as the `actor` of the history rows the
    /// request writes (see the orchestrator's `audit` module).
    #[serde(default)]
    pub actor: Option<String>,
}

/// Why an API request did not succeed. The gateway maps each kind to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ApiError {
    /// No such object in this tenant (also for objects of other tenants).
    #[error("{what} not found")]
    NotFound { what: String },
    /// A field is wrong; `field` names it.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The request conflicts with the object's state.
    #[error("{message}")]
    Conflict { message: String },
    /// Nothing was committed; safe to retry (database down, not the leader, deadline passed).
    #[error("unavailable: {message}")]
    Unavailable { message: String, retry_after_s: u32 },
    /// A bug or an unexpected failure; nothing is known to have been committed.
    #[error("internal error: {message}")]
    Internal { message: String },
}

/// Reply to every API request.
pub type ApiResult<T> = Result<T, ApiError>;

/// Submit a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitJob {
    pub workflow_name: String,
    /// The workflow, already parsed from a string if it came as one.
    pub workflow: Value,
    pub priority: i16,
    pub trigger_type: String,
    pub execution_mode: String,
    pub variables: Map<String, Value>,
    pub required_capabilities: Vec<String>,
    pub target_robot_id: Option<RobotId>,
    pub timeout_s: Option<u64>,
    /// Submission metadata kept with the job (the Canvas's `metadata` object).
    pub metadata: Map<String, Value>,
    pub idempotency_key: Option<String>,
}

/// What a submit committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submitted {
    pub job_id: JobId,
    pub workflow_id: String,
    pub status: JobStatus,
    pub waiting_reason: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetById<T> {
    pub id: T,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListJobs {
    pub status: Option<JobStatus>,
    pub workflow_id: Option<String>,
    pub robot_id: Option<RobotId>,
    pub limit: u32,
    /// Continue after this job (keyset pagination, newest first); `None` starts at the newest.
    #[serde(default)]
    pub cursor: Option<JobCursor>,
    /// Answer up to `limit + 1` jobs, the extra one only telling the caller that another page
    /// exists (the gateway drops it and answers a cursor instead).
    #[serde(default)]
    pub peek_next: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRobots {
    pub status: Option<RobotStatus>,
    /// Only robots that have this capability (declared or implicit).
    #[serde(default)]
    pub capability: Option<crate::Capability>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Cancelled {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub job_id: JobId,
    pub cancelled: bool,
    pub previous_status: JobStatus,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// Is this orchestrator the active leader?
    pub leader: bool,
    pub version: String,
}

/// The state of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Pending,
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
    TimedOut,
}

impl JobStatus {
    pub const ALL: [JobStatus; 7] = [
        JobStatus::Pending,
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
        JobStatus::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::TimedOut => "timed_out",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled | JobStatus::TimedOut)
    }
}

/// The state of a robot as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RobotStatus {
    Online,
    Busy,
    Offline,
    Maintenance,
    Error,
}

impl RobotStatus {
    pub const ALL: [RobotStatus; 5] = [
        RobotStatus::Online,
        RobotStatus::Busy,
        RobotStatus::Offline,
        RobotStatus::Maintenance,
        RobotStatus::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RobotStatus::Online => "online",
            RobotStatus::Busy => "busy",
            RobotStatus::Offline => "offline",
            RobotStatus::Maintenance => "maintenance",
            RobotStatus::Error => "error",
        }
    }

    /// Parse a status filter; `idle` is a synonym of `online`.
    pub fn parse(s: &str) -> Option<Self> {
        if s == "idle" {
            return Some(RobotStatus::Online);
        }
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// A job as the API shows it. Every field is always present (`null` when unknown).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = Job))]
pub struct JobView {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub job_id: JobId,
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
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub claimed_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub completed_at: Option<OffsetDateTime>,
    pub duration_ms: Option<i64>,
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
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

/// A robot as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RobotView {
    pub robot_id: String,
    pub name: String,
    pub hostname: String,
    pub status: RobotStatus,
    /// What the robot reports it is doing: `online`, `paused`, `maintenance`, `draining`,
    /// `stopping`.
    pub state: String,
    /// What it was told to do: `online`, `paused` or `maintenance`.
    pub desired_state: String,
    pub environment: String,
    /// The effective capabilities, the only ones routing uses: what the robot offers that its
    /// key grants (what it offers, for a robot not bound to a key).
    pub capabilities: Vec<String>,
    /// What the robot says it can do.
    #[serde(default)]
    pub offered_capabilities: Vec<String>,
    /// What its key grants (`None`: not bound to a key, or the key does not restrict).
    #[serde(default)]
    pub granted_capabilities: Option<Vec<String>>,
    pub tags: Vec<String>,
    pub max_concurrent_jobs: u32,
    pub current_job_ids: Vec<String>,
    pub current_job: Option<String>,
    pub cpu_percent: Option<f32>,
    pub memory_mb: Option<f64>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_heartbeat: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub version: Option<String>,
}

/// `GET /api/v1/metrics/fleet`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    pub jobs_by_status: std::collections::BTreeMap<String, u32>,
}

/// A command to one robot or to every robot matching a filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RobotCommandRequest {
    pub target: CommandTarget,
    pub command: RobotCommand,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CommandTarget {
    /// One robot (404 when it is not in the tenant).
    Robot { robot_id: RobotId },
    /// Every robot of the tenant with this status (if given) that has all these capabilities.
    Filter { status: Option<RobotStatus>, capabilities: Vec<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RobotCommand {
    /// Finish running jobs, take no new ones, stay online.
    Pause,
    /// Take work again (ends pause and maintenance).
    Resume,
    /// Maintenance on (like pause, status `maintenance`) or off.
    Maintenance { on: bool },
    /// Finish running jobs, then exit.
    Drain,
    /// Exit: like drain; with `force`, release running jobs at once.
    Stop { force: bool },
    /// Drain, then start again.
    Restart,
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    /// Robots told (their desired state changed).
    pub robots: Vec<String>,
    pub command: RobotCommand,
}

/// Check a presented key (`Endpoint::VerifyKey`). The envelope's tenant is ignored: the key
/// says which tenant it belongs to.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyKey {
    pub key_id: String,
    /// Hex SHA-256 of the secret ([`crate::keys::secret_hash`]); the secret itself never travels.
    pub secret_sha256: String,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifyKey({})", self.key_id)
    }
}

/// Who a valid key is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyIdentity {
    pub key_id: String,
    pub tenant: TenantId,
    pub role: crate::keys::Role,
    /// The key's own rate limit; `None`: the gateway's default.
    #[serde(default)]
    pub rate_limit: Option<crate::keys::Rate>,
    /// The robot a robot key belongs to (`None` for a user key): the only robot an HTTP robot
    /// agent holding this key may act as.
    #[serde(default)]
    pub robot_id: Option<RobotId>,
    /// What a robot key grants (`None`: not restricted by the key).
    #[serde(default)]
    pub capabilities: Option<Vec<Capability>>,
}

/// Create a key in the caller's tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateKey {
    pub name: String,
    pub role: crate::keys::Role,
    pub description: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// A key for one robot (the Canvas's robot keys).
    pub robot_id: Option<RobotId>,
    /// The key's own rate limit; `None`: the gateway's default.
    #[serde(default)]
    pub rate_limit: Option<crate::keys::Rate>,
    /// For a robot key: the capabilities its robot may claim (`None`: whatever it offers).
    #[serde(default)]
    pub capabilities: Option<Vec<Capability>>,
}

/// A key as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = Key))]
pub struct KeyView {
    /// The key id, the part between `crpa_` and the secret.
    pub id: String,
    pub name: String,
    /// The same as `name` (the Canvas reads `key_name`).
    pub key_name: String,
    pub description: Option<String>,
    pub role: crate::keys::Role,
    /// `active`, `revoked` or `expired`.
    #[cfg_attr(feature = "openapi", schema(schema_with = KeyView::status_schema))]
    pub status: String,
    pub robot_id: Option<String>,
    pub robot_name: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
    pub last_used_ip: Option<String>,
    /// The key's own rate limit (`1000/min`); `None`: the gateway's default.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "1000/min"))]
    #[serde(default)]
    pub rate_limit: Option<crate::keys::Rate>,
    /// A robot key's grant: the capabilities its robot may claim (`None`: not restricted).
    #[serde(default)]
    pub capabilities: Option<Vec<String>>,
}

impl KeyView {
    /// Every value of `status`.
    pub const STATUSES: [&'static str; 3] = ["active", "revoked", "expired"];

    /// `status` is a `String` on the wire; the document lists its values.
    #[cfg(feature = "openapi")]
    fn status_schema() -> utoipa::openapi::Object {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .enum_values(Some(Self::STATUSES))
            .description(Some("`active`, `revoked` or `expired`."))
            .build()
    }
}

/// A new key: shown once.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatedKey {
    /// The key itself, `crpa_<key id>_<secret>`: shown this once, Fleet keeps only its hash.
    pub api_key: String,
    pub key: KeyView,
}

impl std::fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CreatedKey({:?})", self.key)
    }
}

/// List keys of the caller's tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListKeys {
    pub robot_id: Option<String>,
    pub status: Option<String>,
    pub limit: u32,
    pub offset: u32,
    /// Only keys bound to a robot (before paging, so `total` and `offset` count those).
    #[serde(default)]
    pub robot_keys: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyList {
    pub keys: Vec<KeyView>,
    /// Keys matching the filters, not only those returned.
    pub total: u32,
}

/// Revoke, rotate or delete one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAction {
    pub id: String,
    pub reason: Option<String>,
}

/// One robot class of a tenant, for `GET /api/v1/queues`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = Queue))]
pub struct QueueView {
    /// The class name (`browser+shell`, or `any`).
    pub class: String,
    pub capabilities: Vec<String>,
    /// Pending jobs this class could run (they may also fit other classes).
    pub waiting: u32,
    /// Offers handed to the class and not claimed yet.
    pub offered: u32,
    /// Jobs running on the class's robots.
    pub running: u32,
    /// Slots of the class's online robots.
    pub capacity: u32,
    pub online_robots: u32,
    pub robots: u32,
}

/// Where a page of the job list ends: the sort key (`created_at`, `job_id`) of its last job.
/// Clients see it only as an opaque token ([`JobCursor::token`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCursor {
    /// `created_at` in Unix microseconds (PostgreSQL's precision, so the key is exact).
    pub created_at_us: i64,
    pub job_id: JobId,
}

impl JobCursor {
    /// The cursor after `job`.
    pub fn after(job: &JobView) -> Self {
        let us = job.created_at.unix_timestamp_nanos() / 1_000;
        Self { created_at_us: i64::try_from(us).unwrap_or(i64::MAX), job_id: job.job_id }
    }

    /// The opaque token: 16 hex digits of the time, then the 32 of the id.
    pub fn token(&self) -> String {
        format!("{:016x}{}", self.created_at_us as u64, self.job_id.0.simple())
    }

    /// Read a token made by [`JobCursor::token`]; `None` for anything else, including a time no
    /// job can have: before 1970 (a token whose time reads as negative once in PostgreSQL went
    /// below its range, 4713 BC, and the list answered 500) or past what a timestamp holds.
    pub fn parse(token: &str) -> Option<Self> {
        if token.len() != 48 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let created_at_us = i64::try_from(u64::from_str_radix(&token[..16], 16).ok()?).ok()?;
        let job_id = JobId(uuid::Uuid::parse_str(&token[16..]).ok()?);
        let cursor = Self { created_at_us, job_id };
        cursor.created_at().map(|_| cursor)
    }

    /// The time part as a timestamp.
    pub fn created_at(&self) -> Option<OffsetDateTime> {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.created_at_us) * 1_000).ok()
    }
}

/// What a retry did (`Endpoint::RetryJob`, body [`GetById<JobId>`]). A retry is the job's next
/// attempt under the same id, so all three ids are that job's (the Canvas reads `job_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Retried {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub job_id: JobId,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub new_job_id: JobId,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub original_job_id: JobId,
    /// The status it was retried from: `failed`, `cancelled` or `timed_out`.
    pub previous_status: JobStatus,
    /// `pending`: the job waits for its next attempt.
    pub status: JobStatus,
    /// The attempt the retry will run as.
    pub next_attempt: i32,
    pub message: String,
}

/// Register (upsert) a robot's record from the API (`Endpoint::RegisterRobot`). Its session and
/// online state are the robot process's and are left alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRobot {
    pub robot_id: RobotId,
    pub name: String,
    pub hostname: String,
    pub capabilities: Vec<String>,
    pub environment: String,
    pub max_concurrent_jobs: u32,
    pub tags: Vec<String>,
    /// The robot key registering its own robot (`None`: a user registering it): the robot is
    /// bound to that key and gets the capabilities it offers that the key grants.
    #[serde(default)]
    pub key_id: Option<String>,
}

/// Change some fields of a robot's record (`Endpoint::UpdateRobot`); `None` keeps a field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRobot {
    pub robot_id: RobotId,
    pub name: Option<String>,
    pub hostname: Option<String>,
    pub capabilities: Option<Vec<String>>,
    pub environment: Option<String>,
    pub max_concurrent_jobs: Option<u32>,
    pub tags: Option<Vec<String>>,
}

/// What registering or updating a robot did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RobotSaved {
    pub robot_id: RobotId,
    /// True when the record did not exist before.
    pub created: bool,
}

/// What deleting a robot did (`Endpoint::DeleteRobot`, body [`GetById<RobotId>`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = RobotDeletedAnswer))]
pub struct RobotDeleted {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub robot_id: RobotId,
    pub deleted: bool,
    /// True when a running robot process was told to stop.
    pub stopped: bool,
}

/// `GET /api/v1/metrics/analytics` (`Endpoint::Analytics`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnalyticsQuery {
    /// The window: jobs created in the last `days` days (1 to 90).
    pub days: u32,
}

/// Figures over the jobs a tenant created in a window. Durations are those of completed jobs
/// (`completed_at - started_at` of their last attempt); "failed" counts `failed` and
/// `timed_out`; rates are percentages of the jobs that ended (completed, failed, timed out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Analytics {
    pub days: u32,
    pub total_jobs: u64,
    pub jobs_completed: u64,
    pub jobs_failed: u64,
    pub success_rate: f64,
    pub failure_rate: f64,
    pub average_duration_ms: f64,
    /// The same as `average_duration_ms` (the Canvas reads both names).
    pub avg_duration_ms: f64,
    pub p50_duration_ms: f64,
    pub p90_duration_ms: f64,
    pub p99_duration_ms: f64,
    pub job_status_distribution: std::collections::BTreeMap<String, u64>,
    pub slowest_workflows: Vec<WorkflowDuration>,
    pub error_distribution: Vec<ErrorCount>,
    pub throughput_per_workflow: Vec<WorkflowThroughput>,
    pub throughput_per_hour: Vec<HourThroughput>,
    /// Fleet does not heal selectors; always 0.
    pub self_healing_success_rate: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkflowDuration {
    pub workflow_id: String,
    pub workflow_name: String,
    pub average_duration_ms: f64,
    /// Completed runs the average is over.
    pub runs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorCount {
    pub error_type: String,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkflowThroughput {
    pub workflow_id: String,
    pub workflow_name: String,
    pub jobs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HourThroughput {
    /// The start of the hour.
    #[serde(with = "time::serde::rfc3339")]
    pub hour: OffsetDateTime,
    pub jobs: u64,
}

/// `GET /api/v1/metrics/activity` (`Endpoint::Activity`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityQuery {
    /// 1 to 200.
    pub limit: u32,
    /// Only events after this time.
    #[serde(with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
    /// Only events of this (Canvas) type: `job_started`, `robot_online`, …
    pub event_type: Option<String>,
}

/// Recent events of a tenant, newest first, in the Canvas's vocabulary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Activity {
    pub events: Vec<ActivityEvent>,
    /// Events matching the filters (not only those in `events`).
    pub total: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ActivityEvent {
    /// The history row's id (the event's id in the event stream).
    pub id: String,
    /// `job_started`, `job_completed`, `job_failed`, `robot_online`, `robot_offline`, or the
    /// event's own name with `.` turned into `_` (`job_retried`, `robot_command`, …).
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    pub title: String,
    /// The event's data.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub details: Value,
    pub robot_id: Option<String>,
    pub job_id: Option<String>,
}

// ----- the HTTP robot agent (`fleet.api.agent.*`) ------------------------------------------------
//
// A robot that speaks HTTP (the Canvas's robot-facing endpoints) instead of NATS. In every request
// `key_robot` is the robot of the caller's verified key, set by the gateway, never read from the
// HTTP body: the orchestrator acts only as that robot.

/// A heartbeat of an HTTP robot (`Endpoint::AgentHeartbeat`), or its goodbye (`offline`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentHeartbeat {
    pub key_robot: RobotId,
    /// The robot key's id: a new session binds the robot to it (attested capabilities).
    #[serde(default)]
    pub key_id: Option<String>,
    /// The robot of the path; anything but `key_robot` is answered 404.
    pub robot_id: RobotId,
    pub cpu_percent: Option<f32>,
    pub memory_mb: Option<f64>,
    /// The robot says it is going offline (`PUT …/status` with `offline`).
    pub offline: bool,
}

/// What a heartbeat recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentBeat {
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
}

/// Claim the next job an HTTP robot may run (`Endpoint::AgentClaim`); the answer is
/// `Option<AgentJob>` (`None`: nothing to do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentClaim {
    pub key_robot: RobotId,
    /// The robot key's id: a new session binds the robot to it (attested capabilities).
    #[serde(default)]
    pub key_id: Option<String>,
    /// The lease the claim gets, in seconds.
    pub lease_s: u32,
}

/// A job claimed by an HTTP robot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentJob {
    pub job_id: JobId,
    pub workflow_id: String,
    pub workflow_name: String,
    /// The workflow as submitted.
    pub workflow: Value,
    pub priority: i16,
    /// The robot's environment.
    pub environment: String,
    pub variables: Map<String, Value>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub claimed_at: OffsetDateTime,
    /// Attempts before this one.
    pub retry_count: i32,
    /// Attempts after the first the job may still get when its robot is lost.
    pub max_retries: i32,
}

/// A report of an HTTP robot on a job it runs (`Endpoint::AgentReport`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentJobReport {
    pub key_robot: RobotId,
    pub job_id: JobId,
    pub report: AgentReport,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentReport {
    /// Extend the lease to `lease_s` seconds from now.
    ExtendLease { lease_s: u32 },
    /// The run completed; `result` becomes the job's output.
    Complete { result: Value },
    /// The run failed.
    Fail { error_message: String },
    /// Give the job back (pending, offered again at once).
    Release,
}

/// What a report did: the job's status after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReported {
    pub job_id: JobId,
    pub status: JobStatus,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};

    #[test]
    fn endpoints_have_distinct_subjects() {
        let subjects: std::collections::BTreeSet<_> = Endpoint::ALL.iter().map(|e| e.subject()).collect();
        assert_eq!(subjects.len(), Endpoint::ALL.len());
        for e in Endpoint::ALL {
            assert_eq!(Endpoint::from_subject(&e.subject()), Some(e));
        }
        assert_eq!(Endpoint::SubmitJob.subject(), "fleet.api.jobs.submit");
    }

    #[test]
    fn api_result_roundtrip() {
        let r: ApiResult<Empty> =
            Err(ApiError::Invalid { field: "priority".into(), message: "0 to 20".into() });
        let back: ApiResult<Empty> = decode("reply", &encode(&r)).unwrap();
        assert_eq!(back, r);
        let r: ApiResult<Pong> = Ok(Pong { leader: true, version: "x".into() });
        let back: ApiResult<Pong> = decode("reply", &encode(&r)).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn statuses() {
        assert_eq!(RobotStatus::parse("idle"), Some(RobotStatus::Online));
        assert_eq!(JobStatus::parse("timed_out"), Some(JobStatus::TimedOut));
        assert_eq!(serde_json::to_string(&JobStatus::TimedOut).unwrap(), "\"timed_out\"");
        assert!(JobStatus::Cancelled.is_terminal());
        assert!(!JobStatus::Queued.is_terminal());
    }

    #[test]
    fn job_cursor_tokens_roundtrip_and_refuse_junk() {
        let c = JobCursor { created_at_us: 1_767_225_600_123_456, job_id: JobId::new() };
        let token = c.token();
        assert_eq!(token.len(), 48);
        assert_eq!(JobCursor::parse(&token), Some(c));
        assert_eq!(c.created_at().unwrap().unix_timestamp_nanos(), 1_767_225_600_123_456_000);
        for junk in
            ["", "abc", &token[1..], &format!("{token}0"), &token.replace(|c: char| c.is_ascii_digit(), "g")]
        {
            assert_eq!(JobCursor::parse(junk), None, "{junk}");
        }
        // Regression (schemathesis): a well-formed token whose time is before 1970 (here about
        // 7700 BC) reached PostgreSQL as a timestamp out of its range, and the list answered 500.
        assert_eq!(JobCursor::parse("FbC1a6E1eE98de1DC6D8a9ACd0F7A0B0b80f0F69BDeb88aF"), None);
        assert_eq!(JobCursor::parse(&format!("7fffffffffffffff{}", &token[16..])), None, "past year 9999");
        let epoch = JobCursor { created_at_us: 0, ..c };
        assert_eq!(JobCursor::parse(&epoch.token()), Some(epoch));
        // Old requests without the new fields still decode.
        #[derive(Serialize)]
        struct OldListJobs {
            status: Option<JobStatus>,
            workflow_id: Option<String>,
            robot_id: Option<RobotId>,
            limit: u32,
        }
        let old = encode(&OldListJobs { status: None, workflow_id: None, robot_id: None, limit: 5 });
        let new: ListJobs = decode("list", &old).unwrap();
        assert_eq!((new.cursor, new.peek_next, new.limit), (None, false, 5));
    }
}
