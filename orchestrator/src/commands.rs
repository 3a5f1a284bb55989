//! Robot commands: pause, resume, maintenance, drain, stop, restart — for one robot or for every
//! robot matching a filter.
//!
//! A command changes the robot's **desired state**, kept in PostgreSQL (the record, with one
//! `robot.command` history row per robot told) and mirrored into the `fleet_commands` bucket,
//! where each robot watches its own key. So a robot that is disconnected when the command is
//! given obeys it when it comes back, and a robot restarted while paused starts paused. Stop
//! orders name the robot's current session, so a robot started again later is not stopped anew.
//!
//! Cancelling a running job is not a desired state but a one-off push on the robot's command
//! subject ([`push_cancel`]), sent after the job is already `cancelled` in the record.

use fleet_schemas::api::{
    ApiError, ApiRequest, ApiResult, CommandResult, CommandTarget, RobotCommand, RobotCommandRequest,
};
use fleet_schemas::codec::encode;
use fleet_schemas::robot::{DesiredState, ROBOT_PROTOCOL_VERSION, RobotPush};
use fleet_schemas::{Class, JobId, RobotId, TenantId, subjects};

use crate::Core;

pub async fn command(core: &Core, req: ApiRequest<RobotCommandRequest>) -> ApiResult<CommandResult> {
    let tenant = &req.tenant;
    let robots = match &req.body.target {
        CommandTarget::Robot { robot_id } => {
            let found = core.store.list_robots(tenant, Some(robot_id)).await?;
            if found.is_empty() {
                return Err(ApiError::NotFound { what: "robot".into() });
            }
            found
        }
        CommandTarget::Filter { status, capabilities } => {
            let wanted = Class::parse(capabilities)
                .map_err(|e| ApiError::Invalid { field: "capabilities".into(), message: e.to_string() })?;
            core.store
                .list_robots(tenant, None)
                .await?
                .into_iter()
                .filter(|r| status.is_none_or(|s| r.status == s))
                .filter(|r| Class::parse(&r.capabilities).is_ok_and(|c| c.is_superset(&wanted)))
                .collect()
        }
    };
    if crate::api::past_deadline(&req) {
        return Err(crate::api::deadline_error());
    }
    let actor = crate::audit::actor_of(&req);
    let mut told = Vec::new();
    for robot in robots {
        let Ok(robot_id) = RobotId::new(robot.robot_id.as_str()) else { continue };
        match core.store.apply_command(tenant, &robot_id, req.body.command, &actor).await? {
            Some(desired) => {
                publish_desired(core, tenant, &robot_id, &desired).await;
                told.push(robot.robot_id);
            }
            None => tracing::debug!(robot = %robot_id, "command not applicable (no session to stop)"),
        }
    }
    core.wake_relay.notify_one();
    tracing::info!(%tenant, command = ?req.body.command, robots = told.len(), "robot command");
    Ok(CommandResult { robots: told, command: req.body.command })
}

/// Mirror a robot's desired state into its key of the commands bucket. A failure is logged: the
/// record in PostgreSQL stands, and the key is written again when the robot registers.
pub async fn publish_desired(core: &Core, tenant: &TenantId, robot: &RobotId, desired: &DesiredState) {
    let key = subjects::command_key(tenant, robot);
    if let Err(e) = core.fabric.commands_kv.put(key, encode(desired).into()).await {
        tracing::warn!(%robot, error = %e, "could not publish the robot's desired state; it is re-sent at registration");
    }
    // Pushed too, so the robot obeys at once (it also reads the state at start, on reconnect
    // and every few seconds, so a missed push only delays).
    let push = RobotPush::Desired { v: ROBOT_PROTOCOL_VERSION, desired: desired.clone() };
    if let Err(e) = core.client.publish(subjects::robot_command(tenant, robot), encode(&push).into()).await {
        tracing::debug!(%robot, error = %e, "could not push the desired state; the robot reads it later");
    }
}

/// Tell a robot at once that an attempt of one of its jobs was cancelled, on its command subject
/// (`fleet.cmd.<tenant>.<robot_id>`). Fire and forget: the record is already final, and a robot
/// that misses the push is refused at its next renewal and stops then.
pub async fn push_cancel(core: &Core, tenant: &TenantId, robot: &RobotId, job_id: JobId, attempt: i32) {
    let push = RobotPush::Cancel { v: ROBOT_PROTOCOL_VERSION, job_id, attempt };
    let subject = subjects::robot_command(tenant, robot);
    if let Err(e) = core.client.publish(subject, encode(&push).into()).await {
        tracing::warn!(%robot, %job_id, error = %e, "could not push the cancel; the robot stops at its next renewal");
    }
}

/// What a command sets: the new mode (when it changes it) and whether it stops the session.
pub fn effect(command: RobotCommand) -> (Option<&'static str>, Option<(bool, bool)>) {
    match command {
        RobotCommand::Pause => (Some("paused"), None),
        RobotCommand::Resume => (Some("online"), None),
        RobotCommand::Maintenance { on: true } => (Some("maintenance"), None),
        RobotCommand::Maintenance { on: false } => (Some("online"), None),
        RobotCommand::Drain => (None, Some((false, false))),
        RobotCommand::Stop { force } => (None, Some((force, false))),
        RobotCommand::Restart => (None, Some((false, true))),
    }
}
