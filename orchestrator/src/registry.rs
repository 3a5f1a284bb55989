//! The robot registry as the API edits it: register (upsert), update, delete.
//!
//! A robot's record has two owners. Its description (name, hostname, environment,
//! capabilities, tags, slots) may be written by an admin ahead of time; its session and online
//! state belong to the robot process alone, so these statements never touch them. When the
//! robot binary registers with the same id it simply takes the record over (its own
//! registration upsert wins for the fields it reports).
//!
//! Deleting a robot first tells it to stop (a normal stop command: it finishes its running
//! jobs, then exits), then removes the record. Jobs keep the robot id they ran on as text, and a
//! robot that later registers with that id creates the record anew.
//!
//! Each write is one fenced statement with its history row (`robot.created`, `robot.updated`,
//! `robot.deleted`), like every other change the leader records.

use fleet_schemas::api::{
    ApiError, ApiRequest, ApiResult, CommandTarget, GetById, RegisterRobot, RobotCommand,
    RobotCommandRequest, RobotDeleted, RobotSaved, UpdateRobot,
};
use fleet_schemas::{Capability, Class, RobotId};
use serde_json::json;
use sqlx::types::Json;

use crate::Core;
use crate::leader::fenced;
use crate::store::StoreError;

/// Longest robot name and hostname.
pub const MAX_NAME: usize = 200;
pub const MAX_HOSTNAME: usize = 255;
pub const MAX_ENVIRONMENT: usize = 64;
/// Tags per robot, and characters per tag.
pub const MAX_TAGS: usize = 32;
pub const MAX_TAG: usize = 64;
/// Most slots a robot may be given (the robot itself enforces what it reports).
pub const MAX_SLOTS: u32 = 1000;

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::Invalid { field: field.into(), message: message.into() }
}

fn text(field: &str, value: &str, max: usize, required: bool) -> ApiResult<String> {
    let v = value.trim();
    if required && v.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if v.chars().count() > max {
        return Err(invalid(field, format!("must be at most {max} characters")));
    }
    Ok(v.to_owned())
}

/// Capabilities in canonical form (sorted, unique), each checked by the subjects' rules.
pub fn capabilities(caps: &[String]) -> ApiResult<Vec<String>> {
    for (i, cap) in caps.iter().enumerate() {
        fleet_schemas::Capability::new(cap.trim())
            .map_err(|e| invalid(format!("capabilities[{i}]"), e.to_string()))?;
    }
    let class =
        Class::parse(caps.iter().map(|c| c.trim())).map_err(|e| invalid("capabilities", e.to_string()))?;
    if class.name().len() > fleet_schemas::ids::MAX_CLASS_LEN {
        return Err(invalid("capabilities", "too many capabilities"));
    }
    Ok(class.to_strings())
}

pub fn tags(tags: &[String]) -> ApiResult<Vec<String>> {
    if tags.len() > MAX_TAGS {
        return Err(invalid("tags", format!("at most {MAX_TAGS} tags")));
    }
    tags.iter().enumerate().map(|(i, t)| text(&format!("tags[{i}]"), t, MAX_TAG, true)).collect()
}

pub fn slots(n: u32) -> ApiResult<i32> {
    if !(1..=MAX_SLOTS).contains(&n) {
        return Err(invalid("max_concurrent_jobs", format!("must be from 1 to {MAX_SLOTS}")));
    }
    Ok(n as i32)
}

fn epoch(core: &Core) -> ApiResult<i64> {
    match core.leadership.epoch() {
        0 => Err(StoreError::NotLeader.into()),
        e => Ok(e),
    }
}

pub async fn register(core: &Core, req: ApiRequest<RegisterRobot>) -> ApiResult<RobotSaved> {
    let b = &req.body;
    let name = text("name", &b.name, MAX_NAME, true)?;
    let hostname = text("hostname", &b.hostname, MAX_HOSTNAME, true)?;
    let environment = text("environment", &b.environment, MAX_ENVIRONMENT, false)?;
    let mut caps = capabilities(&b.capabilities)?;
    let tags = tags(&b.tags)?;
    let slots = slots(b.max_concurrent_jobs)?;
    if crate::api::past_deadline(&req) {
        return Err(crate::api::deadline_error());
    }
    let epoch = epoch(core)?;
    // A robot key registering its own robot binds it: it is recorded with what it offers that
    // the key grants.
    if let Some(key_id) = &b.key_id {
        let offered: Vec<Capability> = caps.iter().filter_map(|c| Capability::new(c.as_str()).ok()).collect();
        let attested = core
            .store
            .bind_robot_key(&req.tenant, &b.robot_id, key_id, &offered)
            .await
            .map_err(crate::http_robots::bind_error)?;
        caps = attested.effective_strings();
        core.fleet.set_grant(&req.tenant, &b.robot_id, crate::fleet::Grant::of(attested.granted.as_deref()));
    }
    // `xmax = 0` tells an inserted row from an updated one.
    let sql = format!(
        "WITH up AS (
            INSERT INTO robots (tenant, robot_id, name, hostname, environment, capabilities, tags, max_jobs, updated_at)
            SELECT $1, $2, $3, $4, $5, $6, $7, $8, now() WHERE {}
            ON CONFLICT (tenant, robot_id) DO UPDATE SET name = EXCLUDED.name, hostname = EXCLUDED.hostname,
                environment = EXCLUDED.environment, capabilities = EXCLUDED.capabilities, tags = EXCLUDED.tags,
                max_jobs = EXCLUDED.max_jobs, updated_at = now()
            RETURNING tenant, robot_id, (xmax = 0) AS created
        ), h AS (
            INSERT INTO job_history (tenant, robot_id, kind, data, actor)
            SELECT tenant, robot_id, CASE WHEN created THEN 'robot.created' ELSE 'robot.updated' END, $10, $11 FROM up
        )
        SELECT created FROM up",
        fenced(9)
    );
    let data = json!({
        "name": name, "hostname": hostname, "environment": environment, "capabilities": caps,
        "tags": tags, "max_jobs": slots, "source": "api",
    });
    let created: Option<bool> = sqlx::query_scalar(&sql)
        .bind(req.tenant.as_str())
        .bind(b.robot_id.as_str())
        .bind(&name)
        .bind(&hostname)
        .bind(&environment)
        .bind(&caps)
        .bind(&tags)
        .bind(slots)
        .bind(epoch)
        .bind(Json(data))
        .bind(crate::audit::actor_of(&req))
        .fetch_optional(&core.store.pool)
        .await
        .map_err(StoreError::from)?;
    let Some(created) = created else { return Err(StoreError::NotLeader.into()) };
    core.wake_relay.notify_one();
    tracing::info!(tenant = %req.tenant, robot = %b.robot_id, created, "robot registered through the API");
    Ok(RobotSaved { robot_id: b.robot_id.clone(), created })
}

pub async fn update(core: &Core, req: ApiRequest<UpdateRobot>) -> ApiResult<RobotSaved> {
    let b = &req.body;
    let name = b.name.as_deref().map(|v| text("name", v, MAX_NAME, true)).transpose()?;
    let hostname = b.hostname.as_deref().map(|v| text("hostname", v, MAX_HOSTNAME, true)).transpose()?;
    let environment =
        b.environment.as_deref().map(|v| text("environment", v, MAX_ENVIRONMENT, false)).transpose()?;
    let caps = b.capabilities.as_deref().map(capabilities).transpose()?;
    let tags = b.tags.as_deref().map(tags).transpose()?;
    let slots = b.max_concurrent_jobs.map(slots).transpose()?;
    if crate::api::past_deadline(&req) {
        return Err(crate::api::deadline_error());
    }
    let epoch = epoch(core)?;
    let sql = format!(
        "WITH up AS (
            UPDATE robots SET name = coalesce($3, name), hostname = coalesce($4, hostname),
                environment = coalesce($5, environment), capabilities = coalesce($6, capabilities),
                tags = coalesce($7, tags), max_jobs = coalesce($8, max_jobs), updated_at = now()
            WHERE tenant = $1 AND robot_id = $2 AND {}
            RETURNING tenant, robot_id
        ), h AS (
            INSERT INTO job_history (tenant, robot_id, kind, data, actor)
            SELECT tenant, robot_id, 'robot.updated', $10, $11 FROM up
        )
        SELECT count(*) FROM up",
        fenced(9)
    );
    let mut changed = serde_json::Map::new();
    for (key, value) in [
        ("name", json!(name)),
        ("hostname", json!(hostname)),
        ("environment", json!(environment)),
        ("capabilities", json!(caps)),
        ("tags", json!(tags)),
        ("max_jobs", json!(slots)),
    ] {
        if !value.is_null() {
            changed.insert(key.to_owned(), value);
        }
    }
    changed.insert("source".into(), json!("api"));
    let n: i64 = sqlx::query_scalar(&sql)
        .bind(req.tenant.as_str())
        .bind(b.robot_id.as_str())
        .bind(name.as_deref())
        .bind(hostname.as_deref())
        .bind(environment.as_deref())
        .bind(caps.as_deref())
        .bind(tags.as_deref())
        .bind(slots)
        .bind(epoch)
        .bind(Json(serde_json::Value::Object(changed)))
        .bind(crate::audit::actor_of(&req))
        .fetch_one(&core.store.pool)
        .await
        .map_err(StoreError::from)?;
    if n == 0 {
        // No such robot, or the fence is gone: only the first is the caller's business.
        if core.store.robot_exists(&req.tenant, &b.robot_id).await? {
            return Err(StoreError::NotLeader.into());
        }
        return Err(ApiError::NotFound { what: "robot".into() });
    }
    core.wake_relay.notify_one();
    Ok(RobotSaved { robot_id: b.robot_id.clone(), created: false })
}

pub async fn delete(core: &Core, req: ApiRequest<GetById<RobotId>>) -> ApiResult<RobotDeleted> {
    let robot = req.body.id.clone();
    // Tell the robot to stop first (through the command path, so it is recorded and mirrored
    // into its key of the commands bucket like any stop). An unknown robot is 404 here.
    let stop = ApiRequest {
        v: req.v,
        request_id: req.request_id,
        tenant: req.tenant.clone(),
        deadline_unix_ms: req.deadline_unix_ms,
        actor: req.actor.clone(),
        body: RobotCommandRequest {
            target: CommandTarget::Robot { robot_id: robot.clone() },
            command: RobotCommand::Stop { force: false },
        },
    };
    let told = crate::commands::command(core, stop).await?;
    let stopped = !told.robots.is_empty();
    if crate::api::past_deadline(&req) {
        return Err(crate::api::deadline_error());
    }
    let epoch = epoch(core)?;
    let sql = format!(
        "WITH gone AS (
            DELETE FROM robots WHERE tenant = $1 AND robot_id = $2 AND {}
            RETURNING tenant, robot_id, name
        ), h AS (
            INSERT INTO job_history (tenant, robot_id, kind, data, actor)
            SELECT tenant, robot_id, 'robot.deleted', jsonb_build_object('name', name, 'stopped', $4::bool), $5
            FROM gone
        )
        SELECT count(*) FROM gone",
        fenced(3)
    );
    let n: i64 = sqlx::query_scalar(&sql)
        .bind(req.tenant.as_str())
        .bind(robot.as_str())
        .bind(epoch)
        .bind(stopped)
        .bind(crate::audit::actor_of(&req))
        .fetch_one(&core.store.pool)
        .await
        .map_err(StoreError::from)?;
    // Nothing deleted while the record is still there: only a lost fence does that. (Nothing
    // deleted and no record: a concurrent delete won the race, and the outcome stands.)
    if n == 0 && core.store.robot_exists(&req.tenant, &robot).await? {
        return Err(StoreError::NotLeader.into());
    }
    core.wake_relay.notify_one();
    tracing::info!(tenant = %req.tenant, %robot, stopped, "robot deleted");
    Ok(RobotDeleted { robot_id: robot, deleted: true, stopped })
}
