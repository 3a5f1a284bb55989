//! Robots as the record keeps them: registration, commands (desired state), heartbeats and
//! liveness, and the robot and fleet views the API reads.

use fleet_schemas::api::{FleetSummary, RobotStatus, RobotView};
use fleet_schemas::robot::RobotRunState;
use fleet_schemas::{RobotId, SessionId, TenantId};
use serde_json::Value;
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Store, StoreError, StoreResult};
use crate::leader::fenced;

impl Store {
    // ----- robots -------------------------------------------------------------------------

    /// Upsert a robot at registration.
    #[allow(clippy::too_many_arguments)]
    pub async fn upsert_robot(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
        req: &fleet_schemas::robot::RegisterRequest,
        capabilities: &[String],
    ) -> StoreResult<bool> {
        let epoch = self.epoch()?;
        let sql = format!(
            "WITH prev AS (SELECT session_id FROM robots WHERE tenant = $1 AND robot_id = $2),
             up AS (
                INSERT INTO robots (tenant, robot_id, name, hostname, environment, capabilities, tags, max_jobs,
                                    session_id, state_dir_id, run_state, online, version, last_heartbeat, updated_at)
                SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'online', true, $11, now(), now() WHERE {}
                ON CONFLICT (tenant, robot_id) DO UPDATE SET name = EXCLUDED.name, hostname = EXCLUDED.hostname,
                    environment = EXCLUDED.environment, capabilities = EXCLUDED.capabilities, tags = EXCLUDED.tags,
                    max_jobs = EXCLUDED.max_jobs, session_id = EXCLUDED.session_id,
                    state_dir_id = EXCLUDED.state_dir_id, run_state = 'online', online = true,
                    version = EXCLUDED.version, last_heartbeat = now(), updated_at = now()
                RETURNING robot_id
             ), h AS (
                INSERT INTO job_history (tenant, robot_id, kind, data, actor)
                SELECT $1, $2, 'robot.registered',
                       jsonb_build_object('name', $3::text, 'capabilities', $6::text[], 'max_jobs', $8::int,
                           'session_id', $9::uuid, 'version', $11::text), $2
                FROM up WHERE NOT EXISTS (SELECT 1 FROM prev WHERE prev.session_id = $9)
             )
             SELECT count(*) FROM up",
            fenced(12)
        );
        let (n,): (i64,) = sqlx::query_as(&sql)
            .bind(tenant.as_str())
            .bind(robot.as_str())
            .bind(&req.name)
            .bind(&req.hostname)
            .bind(&req.environment)
            .bind(capabilities)
            .bind(&req.tags)
            .bind(req.max_jobs as i32)
            .bind(req.session_id.0)
            .bind(&req.state_dir_id)
            .bind(&req.version)
            .bind(epoch)
            .fetch_one(&self.pool)
            .await?;
        if n == 0 {
            return Err(StoreError::NotLeader);
        }
        Ok(true)
    }

    /// Apply a command to a robot's desired state; returns the new state, or `None` when the
    /// command stops a session and the robot has none.
    pub async fn apply_command(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
        command: fleet_schemas::api::RobotCommand,
        actor: &str,
    ) -> StoreResult<Option<fleet_schemas::robot::DesiredState>> {
        let epoch = self.epoch()?;
        let (mode, stop) = crate::commands::effect(command);
        let sql = format!(
            "WITH up AS (
                UPDATE robots SET
                    desired_mode = coalesce($3, desired_mode),
                    desired_stop = CASE WHEN $4 THEN jsonb_build_object('session_id', session_id, 'force', $5::bool,
                                                                     'restart', $6::bool)
                                        ELSE desired_stop END,
                    command_revision = command_revision + 1, updated_at = now()
                WHERE tenant = $1 AND robot_id = $2 AND (NOT $4 OR session_id IS NOT NULL) AND {}
                RETURNING tenant, robot_id, desired_mode, desired_stop, command_revision
             ), h AS (
                INSERT INTO job_history (tenant, robot_id, kind, data, actor)
                SELECT tenant, robot_id, 'robot.command', jsonb_build_object('command', $8::jsonb,
                    'desired_mode', desired_mode, 'stop', desired_stop), $9 FROM up
             )
             SELECT desired_mode, desired_stop, command_revision FROM up",
            fenced(7)
        );
        let row: Option<(String, Option<Json<Value>>, i64)> = sqlx::query_as(&sql)
            .bind(tenant.as_str())
            .bind(robot.as_str())
            .bind(mode)
            .bind(stop.is_some())
            .bind(stop.is_some_and(|s| s.0))
            .bind(stop.is_some_and(|s| s.1))
            .bind(epoch)
            .bind(Json(serde_json::to_value(command).unwrap_or_default()))
            .bind(actor)
            .fetch_optional(&self.pool)
            .await?;
        if row.is_none() {
            self.check_fence(epoch).await?;
        }
        Ok(row.map(desired_state))
    }

    /// A robot's desired state as recorded.
    pub async fn desired_state(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
    ) -> StoreResult<Option<fleet_schemas::robot::DesiredState>> {
        let row: Option<(String, Option<Json<Value>>, i64)> = sqlx::query_as(
            "SELECT desired_mode, desired_stop, command_revision FROM robots WHERE tenant = $1 AND robot_id = $2",
        )
        .bind(tenant.as_str())
        .bind(robot.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(desired_state))
    }

    /// Record a robot event (status change) as a history row, published as an event.
    pub async fn robot_event(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
        kind: &str,
        data: Value,
    ) -> StoreResult<()> {
        let epoch = self.epoch()?;
        let sql = format!(
            "INSERT INTO job_history (tenant, robot_id, kind, data, actor) SELECT $1, $2, $3, $4, $2 WHERE {}",
            fenced(5)
        );
        sqlx::query(&sql)
            .bind(tenant.as_str())
            .bind(robot.as_str())
            .bind(kind)
            .bind(Json(data))
            .bind(epoch)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Record a heartbeat's figures (not a state change: no history row), without waiting:
    /// heartbeats queued together are written in one statement, the latest of each robot.
    pub fn record_heartbeat(&self, hb: fleet_schemas::robot::Heartbeat) {
        if let Ok(b) = self.batches() {
            let _ = b.heartbeat.send(hb);
        }
    }

    /// A robot went offline: record it, with an event naming its orphaned jobs.
    pub async fn robot_offline(&self, tenant: &TenantId, robot: &RobotId, reason: &str) -> StoreResult<bool> {
        let epoch = self.epoch()?;
        let sql = format!(
            "WITH up AS (
                UPDATE robots SET online = false, updated_at = now()
                WHERE tenant = $1 AND robot_id = $2 AND online AND {}
                RETURNING tenant, robot_id
             ), h AS (
                INSERT INTO job_history (tenant, robot_id, kind, data)
                SELECT tenant, robot_id, 'robot.disconnected', jsonb_build_object('reason', $4::text,
                    'orphaned_job_ids', coalesce((SELECT jsonb_agg(job_id) FROM jobs
                        WHERE jobs.tenant = up.tenant AND jobs.robot_id = up.robot_id AND status = 'running'), '[]'))
                FROM up
             )
             SELECT count(*) FROM up",
            fenced(3)
        );
        let (n,): (i64,) = sqlx::query_as(&sql)
            .bind(tenant.as_str())
            .bind(robot.as_str())
            .bind(epoch)
            .bind(reason)
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    /// Robots the database believes online (to reconcile against the bucket at start).
    pub async fn online_robots(&self) -> StoreResult<Vec<(String, String)>> {
        Ok(sqlx::query_as("SELECT tenant, robot_id FROM robots WHERE online").fetch_all(&self.pool).await?)
    }

    /// A robot's registration facts (for the duplicate-identity check).
    pub async fn robot_identity(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
    ) -> StoreResult<Option<(String, Option<Uuid>)>> {
        Ok(sqlx::query_as("SELECT state_dir_id, session_id FROM robots WHERE tenant = $1 AND robot_id = $2")
            .bind(tenant.as_str())
            .bind(robot.as_str())
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn robot_exists(&self, tenant: &TenantId, robot: &RobotId) -> StoreResult<bool> {
        Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM robots WHERE tenant = $1 AND robot_id = $2)")
            .bind(tenant.as_str())
            .bind(robot.as_str())
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn list_robots(
        &self,
        tenant: &TenantId,
        robot: Option<&RobotId>,
    ) -> StoreResult<Vec<RobotView>> {
        let rows = sqlx::query(
            "SELECT r.*, coalesce((SELECT array_agg(j.job_id::text ORDER BY j.started_at) FROM jobs j
                 WHERE j.tenant = r.tenant AND j.robot_id = r.robot_id AND j.status = 'running'), '{}') AS running,
                    b.offered AS offered_capabilities, b.granted AS granted_capabilities
             FROM robots r LEFT JOIN robot_bindings b ON b.tenant = r.tenant AND b.robot_id = r.robot_id
             WHERE r.tenant = $1 AND ($2::text IS NULL OR r.robot_id = $2)
             ORDER BY r.robot_id",
        )
        .bind(tenant.as_str())
        .bind(robot.map(RobotId::as_str))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(robot_view).collect())
    }

    pub async fn fleet_summary(&self, tenant: &TenantId) -> StoreResult<FleetSummary> {
        let robots = self.list_robots(tenant, None).await?;
        let count = |s: RobotStatus| robots.iter().filter(|r| r.status == s).count() as u32;
        let by_status: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM jobs WHERE tenant = $1 GROUP BY status")
                .bind(tenant.as_str())
                .fetch_all(&self.pool)
                .await?;
        let (today, avg): (i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*),
                    avg(extract(epoch FROM completed_at - started_at)::float8) FILTER (WHERE status = 'completed')
             FROM jobs WHERE tenant = $1 AND created_at >= date_trunc('day', now())",
        )
        .bind(tenant.as_str())
        .fetch_one(&self.pool)
        .await?;
        let jobs_by_status: std::collections::BTreeMap<String, u32> =
            by_status.into_iter().map(|(s, n)| (s, n as u32)).collect();
        let get = |s: &str| jobs_by_status.get(s).copied().unwrap_or(0);
        Ok(FleetSummary {
            total_robots: robots.len() as u32,
            active_robots: count(RobotStatus::Online) + count(RobotStatus::Busy),
            idle_robots: count(RobotStatus::Online),
            busy_robots: count(RobotStatus::Busy),
            offline_robots: count(RobotStatus::Offline),
            maintenance_robots: count(RobotStatus::Maintenance),
            active_jobs: get("running"),
            queue_depth: get("pending") + get("queued"),
            total_jobs_today: today as u32,
            average_job_duration_seconds: avg.unwrap_or(0.0),
            jobs_by_status,
        })
    }
}

fn desired_state(row: (String, Option<Json<Value>>, i64)) -> fleet_schemas::robot::DesiredState {
    use fleet_schemas::robot::{DesiredState, RobotMode, StopOrder};
    let (mode, stop, revision) = row;
    let mode = match mode.as_str() {
        "paused" => RobotMode::Paused,
        "maintenance" => RobotMode::Maintenance,
        _ => RobotMode::Online,
    };
    let stop = stop.and_then(|Json(v)| {
        Some(StopOrder {
            session_id: SessionId(v.get("session_id")?.as_str()?.parse().ok()?),
            force: v.get("force")?.as_bool()?,
            restart: v.get("restart")?.as_bool()?,
        })
    });
    DesiredState { v: 1, mode, stop, revision }
}

pub fn run_state_str(s: RobotRunState) -> &'static str {
    match s {
        RobotRunState::Online => "online",
        RobotRunState::Paused => "paused",
        RobotRunState::Maintenance => "maintenance",
        RobotRunState::Draining => "draining",
        RobotRunState::Stopping => "stopping",
    }
}

fn robot_view(row: &PgRow) -> RobotView {
    let online: bool = row.get("online");
    let run_state: String = row.get("run_state");
    let running: Vec<String> = row.get("running");
    let max_jobs: i32 = row.get("max_jobs");
    // A paused robot takes no work, like one in maintenance: say so in `status` (the Canvas reads
    // only that), while `state` stays exact.
    let status = if !online {
        RobotStatus::Offline
    } else if run_state == "maintenance" || run_state == "paused" {
        RobotStatus::Maintenance
    } else if running.len() as i32 >= max_jobs {
        RobotStatus::Busy
    } else {
        RobotStatus::Online
    };
    let last: Option<OffsetDateTime> = row.get("last_heartbeat");
    RobotView {
        robot_id: row.get("robot_id"),
        name: row.get("name"),
        hostname: row.get("hostname"),
        status,
        state: run_state,
        desired_state: row.get("desired_mode"),
        environment: row.get("environment"),
        // An unbound robot offers what it has.
        offered_capabilities: row
            .get::<Option<Vec<String>>, _>("offered_capabilities")
            .unwrap_or_else(|| row.get("capabilities")),
        granted_capabilities: row.get("granted_capabilities"),
        capabilities: row.get("capabilities"),
        tags: row.get("tags"),
        max_concurrent_jobs: max_jobs.max(0) as u32,
        current_job: running.first().cloned(),
        current_job_ids: running,
        cpu_percent: row.get("cpu_percent"),
        memory_mb: row.get("memory_mb"),
        last_heartbeat: last,
        last_seen: last,
        created_at: row.get("created_at"),
        version: row.get("version"),
    }
}
