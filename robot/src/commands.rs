//! Commands: the robot obeys the desired state the orchestrator keeps for it.
//!
//! A command (pause, resume, maintenance, drain, stop, restart) is not a message the robot must
//! not miss but a **desired state** ([`DesiredState`]) that the orchestrator keeps in PostgreSQL and
//! mirrors into the `fleet_commands` KV bucket under the robot's key `<tenant>.<robot_id>`
//! (DESIGN.md, "Commands"). The robot watches that key, so a robot that was disconnected when a
//! command was given, or that was restarted, obeys the latest value when it comes back. Applying
//! a value is idempotent: reading the same one twice changes nothing.
//!
//! What a desired state does:
//! - `mode: online` → state `online`: pull and take work.
//! - `mode: paused` → state `paused`: running jobs finish, nothing is pulled, the robot stays
//!   registered and heartbeats `paused`. A paused robot rejects nothing; it simply does not pull
//!   (an offer already on its way when the command arrived is handed back with a NAK, not a
//!   reject, so the job is not marked as refused by this robot).
//! - `mode: maintenance` → state `maintenance`: the same as paused, shown as `maintenance`.
//! - `stop` naming **this** session: drain. Stop pulling, heartbeat `stopping`, let running jobs
//!   finish within `--shutdown-grace`, release what is left, and return from
//!   [`crate::run_until_exit`] with [`Exit::Stopped`], or [`Exit::Restart`] when the order says
//!   `restart` (the binary then re-executes itself: same arguments, environment and state
//!   directory, so the same robot id with a new session). With `force`, running jobs are stopped
//!   and released at once instead. A later order may escalate a drain to `force`; a stop cannot
//!   be taken back.
//! - `stop` naming **another** session is ignored: it was meant for an earlier run of this robot
//!   (the orchestrator keeps the order until it is replaced).
//! - No bucket, no key, or a deleted key: online, no stop.
//!
//! How it is read: robots have no rights on the bucket (a robot may read nothing of JetStream
//! but its own offers), so the robot asks the orchestrator (`fleet.robot.<tenant>.<id>.desired`)
//! at start, after every reconnection to NATS and every [`REFRESH`], and the orchestrator pushes
//! each new value on `fleet.cmd.<tenant>.<robot_id>` ([`RobotPush::Desired`]). The value read at
//! start is applied before the robot pulls anything, so a robot started while paused never
//! claims an offer. Pushed values not newer (by revision) than the one applied are skipped, so
//! an old value never flickers back; a read is applied as it is (it is the current truth); a
//! push that cannot be read (an empty nudge included) makes the robot ask again.
//!
//! A message on that subject that reads as a [`RobotPush`] is acted on at once instead: a pushed
//! cancel stops the named attempt of a running job as no longer ours (the record already says
//! `cancelled`), so its process group is killed and its slot frees without waiting for the next
//! lease renewal, which stays the fallback.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use fleet_schemas::codec;
use fleet_schemas::robot::{
    DesiredReply, DesiredRequest, DesiredState, ROBOT_PROTOCOL_VERSION, RobotMode, RobotPush, RobotRunState,
};
use fleet_schemas::subjects::{self, RobotVerb};

use crate::agent::Agent;
use crate::rpc::{self, Answer};

/// How often the robot reads its desired state even when nothing was pushed (a missed push
/// costs at most this long).
pub const REFRESH: Duration = Duration::from_secs(30);

/// How a robot's run ended, for `main` to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Stopped: by the caller's shutdown (signal), or by a stop order.
    Stopped,
    /// Stopped by a stop order with `restart`: start the same robot again.
    Restart,
}

/// The run state a mode puts the robot in.
pub fn state_for(mode: RobotMode) -> RobotRunState {
    match mode {
        RobotMode::Online => RobotRunState::Online,
        RobotMode::Paused => RobotRunState::Paused,
        RobotMode::Maintenance => RobotRunState::Maintenance,
    }
}

/// Remembers what was applied, so each new desired state is logged once.
#[derive(Default)]
struct Applier {
    last: Option<Option<DesiredState>>,
}

impl Applier {
    /// Apply a desired state (`None`: online, no stop). Idempotent.
    fn apply(&mut self, agent: &Agent, desired: Option<DesiredState>) {
        let new = self.last.as_ref() != Some(&desired);
        let mode = desired.as_ref().map_or(RobotMode::Online, |d| d.mode);
        let revision = desired.as_ref().map(|d| d.revision);
        // Logged when it changes what the robot does, or when a new command arrives (not for
        // the absence of one at start).
        if agent.set_mode(mode) || (new && desired.is_some()) {
            tracing::info!(?mode, ?revision, "command: mode {}", format!("{mode:?}").to_lowercase());
        }
        if let Some(order) = desired.as_ref().and_then(|d| d.stop.clone()) {
            if order.session_id == agent.session_id {
                if agent.order_stop(order.clone()) {
                    let what = match (order.force, order.restart) {
                        (true, true) => "release running jobs at once, then restart",
                        (true, false) => "release running jobs at once, then exit",
                        (false, true) => "drain, then restart",
                        (false, false) => "drain, then exit",
                    };
                    tracing::info!(
                        ?revision,
                        force = order.force,
                        restart = order.restart,
                        "command: stop: {what}"
                    );
                }
            } else if new {
                tracing::info!(?revision, session = %order.session_id,
                    "ignoring a stop order for an earlier session of this robot");
            }
        }
        self.last = Some(desired);
    }
}

/// Read the desired state (asking until answered or `stop`).
async fn read(agent: &Agent, stop: &CancellationToken) -> Option<Option<DesiredState>> {
    let req = DesiredRequest { v: ROBOT_PROTOCOL_VERSION };
    loop {
        match agent.orch.call_retrying::<_, DesiredReply>(RobotVerb::Desired, &req, None, stop).await {
            Ok(Answer::Accepted(reply)) => return Some(reply.desired),
            Ok(Answer::Refused(reason)) => {
                tracing::warn!(%reason, "the orchestrator refused to tell the desired state; asking again");
                if !rpc::pause(&mut rpc::backoff(), stop).await {
                    return None;
                }
            }
            Err(_) => return None,
        }
    }
}

/// Obey the robot's desired state until `stop` fires. Sets [`Agent::desired_known`] once the
/// current value (or its absence) has been applied: the pull loop waits for that.
pub async fn command_loop(agent: Arc<Agent>, stop: CancellationToken) {
    let mut connections = Some(agent.connections());
    let mut seen_connections = connections.as_mut().map_or(0, |c| *c.borrow_and_update());
    let push_subject = subjects::robot_command(&agent.config.tenant, &agent.robot_id);
    // Subscribed before the first read, so a change between the two arrives as a push.
    let mut pushes = match agent.client.subscribe(push_subject).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for pushed commands; reading every {REFRESH:?}");
            None
        }
    };
    let mut applier = Applier::default();
    let mut seen: i64;
    loop {
        // A read is the current truth (pushes older than it were handled before it was asked,
        // newer ones arrive after it): applied whatever its revision, even "none".
        let Some(desired) = read(&agent, &stop).await else { return };
        seen = desired.as_ref().map_or(0, |d| d.revision);
        applier.apply(&agent, desired);
        agent.desired_known.send_replace(true);
        let refresh = tokio::time::sleep(REFRESH);
        tokio::pin!(refresh);
        loop {
            let pushed = async {
                match pushes.as_mut() {
                    Some(p) => p.next().await.map(|m| m.payload),
                    None => std::future::pending().await,
                }
            };
            let reconnected = async {
                match connections.as_mut() {
                    Some(c) => c.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = &mut refresh => break,
                alive = reconnected => {
                    if !alive {
                        connections = None;
                        continue;
                    }
                    let now = connections.as_mut().map_or(0, |c| *c.borrow_and_update());
                    if now > seen_connections {
                        seen_connections = now;
                        tracing::debug!("reconnected: reading the desired state again");
                        break;
                    }
                }
                payload = pushed => match payload {
                    None => pushes = None,
                    Some(payload) => match codec::decode::<RobotPush>("push", &payload) {
                        Ok(RobotPush::Desired { desired, .. }) => {
                            if desired.revision > seen {
                                seen = desired.revision;
                                applier.apply(&agent, Some(desired));
                            }
                        }
                        Ok(push) => obey_push(&agent, push),
                        Err(_) => {
                            tracing::debug!("unreadable push: reading the desired state again");
                            break;
                        }
                    },
                },
            }
        }
    }
}

/// Act on a push at once (it is not a desired state: nothing to remember).
fn obey_push(agent: &Agent, push: RobotPush) {
    match push {
        RobotPush::Desired { .. } => {}
        RobotPush::Cancel { job_id, attempt, .. } => {
            if agent.withdraw(job_id, attempt) {
                tracing::info!(%job_id, attempt, "cancel pushed: stopping the job");
            } else {
                tracing::debug!(%job_id, attempt, "cancel pushed for an attempt not running here (yet)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_map_to_states() {
        assert_eq!(state_for(RobotMode::Online), RobotRunState::Online);
        assert_eq!(state_for(RobotMode::Paused), RobotRunState::Paused);
        assert_eq!(state_for(RobotMode::Maintenance), RobotRunState::Maintenance);
    }
}
