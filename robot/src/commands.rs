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
//! How the key is read: the watcher is opened first (`watch_with_history`: the current value,
//! then every change), then the current value is read directly and applied before the robot pulls
//! anything, so a robot started while paused never claims an offer. Values the watcher delivers
//! that are not newer (by KV revision) than what was read are skipped, so an old value never
//! flickers back. The watch is opened again, with backoff, when it fails or ends, after every
//! reconnection to NATS, and on a nudge on `fleet.cmd.<tenant>.<robot_id>` (an optional hint from
//! the orchestrator that the key changed); a missing bucket is looked for again with backoff.
//!
//! A message on that subject that reads as a [`RobotPush`] is acted on at once instead: a pushed
//! cancel stops the named attempt of a running job as no longer ours (the record already says
//! `cancelled`), so its process group is killed and its slot frees without waiting for the next
//! lease renewal, which stays the fallback.

use std::sync::Arc;

use async_nats::jetstream::context::{GetStreamError, GetStreamErrorKind, KeyValueError, KeyValueErrorKind};
use async_nats::jetstream::kv::{self, Operation};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use fleet_schemas::codec;
use fleet_schemas::robot::{DesiredState, RobotMode, RobotPush, RobotRunState};
use fleet_schemas::subjects;

use crate::agent::Agent;
use crate::rpc;

/// How a robot's run ended, for `main` to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Stopped: by the caller's shutdown (signal), or by a stop order.
    Stopped,
    /// Stopped by a stop order with `restart`: start the same robot again.
    Restart,
}

/// The run state a mode asks for.
pub fn state_for(mode: RobotMode) -> RobotRunState {
    match mode {
        RobotMode::Online => RobotRunState::Online,
        RobotMode::Paused => RobotRunState::Paused,
        RobotMode::Maintenance => RobotRunState::Maintenance,
    }
}

/// The key as it was opened: the watcher, and the value read right after opening it.
enum Opened {
    /// The bucket does not exist (yet): online, no stop.
    NoBucket,
    Watching {
        // Boxed: a watcher is large (an ordered consumer and its state) and moves around.
        watch: Box<kv::Watch>,
        current: Option<kv::Entry>,
    },
}

/// What woke the watch loop.
enum Event {
    Entry(Option<Result<kv::Entry, kv::WatcherError>>),
    /// Time to look again (no watcher open).
    Retry,
    /// The connection count changed (`false`: its sender is gone).
    Reconnected(bool),
    /// A message on the command subject: a push, or a nudge (`None`: the subscription ended).
    Nudged(Option<bytes::Bytes>),
}

/// Why the watcher is opened again.
enum Reopen {
    /// Reconnected or nudged: at once.
    Now,
    /// Failed or ended: after a backoff pause.
    Later,
}

fn bucket_missing(e: &KeyValueError) -> bool {
    e.kind() == KeyValueErrorKind::GetBucket
        && std::error::Error::source(e).and_then(|s| s.downcast_ref::<GetStreamError>()).is_some_and(|s| {
            matches!(s.kind(), GetStreamErrorKind::JetStream(err)
                    if err.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND)
        })
}

async fn open(js: &async_nats::jetstream::Context, key: &str) -> Result<Opened, String> {
    let store = match js.get_key_value(subjects::COMMANDS_BUCKET).await {
        Ok(s) => s,
        Err(e) if bucket_missing(&e) => return Ok(Opened::NoBucket),
        Err(e) => return Err(format!("bucket {}: {e}", subjects::COMMANDS_BUCKET)),
    };
    // Watch first, read second: a change between the two is delivered by the watcher.
    let watch = store.watch_with_history(key).await.map_err(|e| format!("watching {key}: {e}"))?;
    let current = store.entry(key).await.map_err(|e| format!("reading {key}: {e}"))?;
    Ok(Opened::Watching { watch: Box::new(watch), current })
}

/// The desired state an entry stands for; `Err` when its value cannot be read (then the current
/// one is kept: a robot must not resume work because of a garbled command).
fn desired_of(entry: Option<&kv::Entry>) -> Result<Option<DesiredState>, String> {
    match entry {
        None => Ok(None),
        Some(e) if e.operation != Operation::Put => Ok(None),
        Some(e) => {
            codec::decode::<DesiredState>("desired state", &e.value).map(Some).map_err(|e| e.to_string())
        }
    }
}

/// Remembers what was applied, so each new desired state is logged once.
#[derive(Default)]
struct Applier {
    last: Option<Option<DesiredState>>,
}

impl Applier {
    fn apply_entry(&mut self, agent: &Agent, entry: Option<&kv::Entry>) {
        match desired_of(entry) {
            Ok(desired) => self.apply(agent, desired),
            Err(error) => tracing::warn!(%error, "unreadable desired state; keeping the current one"),
        }
    }

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

/// Watch the robot's key and apply what it says until `stop` fires. Sets
/// [`Agent::desired_known`] once the current value (or its absence) has been applied: the pull
/// loop waits for that.
pub async fn command_loop(agent: Arc<Agent>, stop: CancellationToken) {
    let key = subjects::command_key(&agent.config.tenant, &agent.robot_id);
    let mut connections = Some(agent.connections());
    let mut seen_connections = connections.as_mut().map_or(0, |c| *c.borrow_and_update());
    let nudge_subject = subjects::robot_command(&agent.config.tenant, &agent.robot_id);
    let mut nudges = match agent.client.subscribe(nudge_subject).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for command nudges; relying on the watch alone");
            None
        }
    };
    let mut applier = Applier::default();
    let mut delays = rpc::backoff();
    let mut told_no_bucket = false;
    loop {
        let opened = tokio::select! {
            o = open(&agent.js, &key) => o,
            _ = stop.cancelled() => return,
        };
        let mut watching = match opened {
            Err(error) => {
                tracing::warn!(%error, "cannot watch the desired state; retrying");
                None
            }
            Ok(Opened::NoBucket) => {
                if !told_no_bucket {
                    tracing::info!(bucket = subjects::COMMANDS_BUCKET, "no commands bucket (yet): online");
                    told_no_bucket = true;
                }
                applier.apply(&agent, None);
                agent.desired_known.send_replace(true);
                None
            }
            Ok(Opened::Watching { watch, current }) => {
                told_no_bucket = false;
                delays = rpc::backoff();
                applier.apply_entry(&agent, current.as_ref());
                agent.desired_known.send_replace(true);
                Some((watch, current.map_or(0, |e| e.revision)))
            }
        };
        let reopen = loop {
            let idle = watching.is_none();
            let event = {
                let next = async {
                    match watching.as_mut() {
                        Some((watch, _)) => watch.next().await,
                        None => std::future::pending().await,
                    }
                };
                let nudged = async {
                    match nudges.as_mut() {
                        Some(n) => n.next().await.map(|m| m.payload),
                        None => std::future::pending().await,
                    }
                };
                let reconnected = async {
                    match connections.as_mut() {
                        Some(c) => c.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                let backoff = async {
                    if idle {
                        tokio::time::sleep(delays.next().unwrap_or(rpc::MAX_BACKOFF)).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    entry = next => Event::Entry(entry),
                    _ = backoff => Event::Retry,
                    alive = reconnected => Event::Reconnected(alive),
                    alive = nudged => Event::Nudged(alive),
                    _ = stop.cancelled() => return,
                }
            };
            match event {
                Event::Entry(Some(Ok(entry))) => {
                    if let Some((_, seen)) = watching.as_mut()
                        && entry.revision > *seen
                    {
                        *seen = entry.revision;
                        applier.apply_entry(&agent, Some(&entry));
                    }
                }
                Event::Entry(Some(Err(error))) => {
                    tracing::warn!(%error, "the desired state watch failed; watching again");
                    break Reopen::Later;
                }
                Event::Entry(None) => {
                    tracing::warn!("the desired state watch ended; watching again");
                    break Reopen::Later;
                }
                Event::Retry => break Reopen::Now,
                Event::Reconnected(false) => connections = None,
                Event::Reconnected(true) => {
                    let now = connections.as_mut().map_or(0, |c| *c.borrow_and_update());
                    if now > seen_connections {
                        seen_connections = now;
                        tracing::debug!("reconnected: reading the desired state again");
                        break Reopen::Now;
                    }
                }
                Event::Nudged(None) => nudges = None,
                Event::Nudged(Some(payload)) => match codec::decode::<RobotPush>("push", &payload) {
                    Ok(push) => obey_push(&agent, push),
                    Err(_) => {
                        tracing::debug!("nudged: reading the desired state again");
                        break Reopen::Now;
                    }
                },
            }
        };
        if matches!(reopen, Reopen::Later) && !rpc::pause(&mut delays, &stop).await {
            return;
        }
    }
}

/// Act on a push at once (it is not a desired state: nothing to remember).
fn obey_push(agent: &Agent, push: RobotPush) {
    match push {
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
