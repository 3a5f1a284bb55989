//! Pulling offers: one job slot, one pull.
//!
//! The loop takes a job slot (a permit of the `max_jobs` semaphore) before it asks for an offer,
//! so it never holds an offer it has no room for, and asks with pull priority
//! `9 - min(free slots, 9)`: under the consumers' `prioritized` policy the least busy waiting robot
//! is served first. Each pull is `fetch().max_messages(1).expires(5s)`, not `stream()` (which
//! stalls with one message per batch, see DESIGN.md).
//!
//! With the slot in hand the loop pulls from the class consumer and the robot's own consumer at
//! the same time and takes whichever offer comes first. Two loops sharing one slot would leave
//! one consumer unserved for up to a whole pull (5 s) while the other waits; one pull per
//! consumer under one slot keeps both served. When one pull yields, the other is not dropped:
//! the server may already have handed it an offer (dropping it would leave that offer unacked
//! until the consumer's `ack_wait`, 30 s by default, a latency outlier seen after a consumer was
//! recreated under load). It is left to finish in the background, bounded by its expiry, and an
//! offer it still gets is NAKed at once, which hands it straight to the next waiting pull. When
//! pausing or shutting down, an in-flight pull is simply dropped (the rare offer in flight then
//! waits for `ack_wait`).
//!
//! Nothing is pulled before the robot's desired state has been read (see [`crate::commands`]): a
//! robot started while paused must not claim its first offer before it learns it is paused.
//!
//! A pull that fails (connection down, consumer deleted) makes the loop back off and look the
//! consumers up again; a consumer or stream that is gone asks for a re-registration, and the
//! orchestrator recreates it.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::context::{ConsumerInfoError, ConsumerInfoErrorKind};
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tokio_util::task::TaskTracker;

use fleet_schemas::robot::{RegisterGrant, RobotRunState};
use fleet_schemas::subjects;

use crate::agent::Agent;
use crate::job;
use crate::rpc;

/// How long one pull waits for an offer.
pub const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// The two consumers a robot pulls from.
pub struct Consumers {
    pub class: PullConsumer,
    pub robot: PullConsumer,
}

/// Looking the consumers up failed; `missing` when the stream or a consumer does not exist.
#[derive(Debug)]
pub struct LookupError {
    pub missing: bool,
    pub message: String,
}

/// Find the consumers named in the registration grant.
pub async fn consumers(js: &jetstream::Context, grant: &RegisterGrant) -> Result<Consumers, LookupError> {
    let stream = js.get_stream(subjects::JOBS_STREAM).await.map_err(|e| LookupError {
        missing: matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(err)
            if err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND),
        message: format!("stream {}: {e}", subjects::JOBS_STREAM),
    })?;
    let get = |name: String| {
        let stream = stream.clone();
        async move {
            stream.get_consumer::<consumer::pull::Config>(&name).await.map_err(|e| {
                let missing = e.downcast_ref::<ConsumerInfoError>().is_some_and(|e| {
                    matches!(
                        e.kind(),
                        ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound
                    )
                });
                LookupError { missing, message: format!("consumer {name}: {e}") }
            })
        }
    };
    let class = get(grant.class_consumer.clone()).await?;
    let robot = get(grant.robot_consumer.clone()).await?;
    Ok(Consumers { class, robot })
}

/// Pull priority for a robot with `free` slots (lower is served first).
pub fn priority(free: usize) -> usize {
    9 - free.min(9)
}

/// One pull: at most one message.
async fn fetch_one(consumer: PullConsumer, priority: usize) -> Result<Option<jetstream::Message>, String> {
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(PULL_EXPIRES)
        .group(subjects::PULL_GROUP)
        .priority(priority)
        .messages()
        .await
        .map_err(|e| e.to_string())?;
    match batch.next().await {
        None => Ok(None),
        Some(Ok(m)) => Ok(Some(m)),
        Some(Err(e)) => Err(e.to_string()),
    }
}

enum Round {
    Offer(Box<jetstream::Message>),
    Empty,
    Failed(String),
}

/// Pull from both consumers at once; the first offer wins, and the other pull is handed to
/// [`give_back_late_offer`].
async fn fetch_round(c: &Consumers, priority: usize) -> Round {
    let mut class = Box::pin(fetch_one(c.class.clone(), priority));
    let mut robot = Box::pin(fetch_one(c.robot.clone(), priority));
    let (mut class_done, mut robot_done) = (false, false);
    let mut failure = None;
    while !(class_done && robot_done) {
        let (result, other_done) = tokio::select! {
            r = &mut class, if !class_done => { class_done = true; (r, robot_done) }
            r = &mut robot, if !robot_done => { robot_done = true; (r, class_done) }
        };
        match result {
            Ok(Some(m)) => {
                if !other_done {
                    if class_done {
                        tokio::spawn(give_back_late_offer(robot));
                    } else {
                        tokio::spawn(give_back_late_offer(class));
                    }
                }
                return Round::Offer(Box::new(m));
            }
            Ok(None) => {}
            Err(e) => failure = Some(e),
        }
    }
    match failure {
        Some(e) => Round::Failed(e),
        None => Round::Empty,
    }
}

/// Let the losing pull of a round finish (it ends by its expiry at the latest) and NAK an offer
/// it still receives, without delay, so the offer goes at once to the next waiting pull instead of
/// waiting out `ack_wait` unacked on this robot, which has no slot for it.
async fn give_back_late_offer(
    pull: std::pin::Pin<Box<impl std::future::Future<Output = Result<Option<jetstream::Message>, String>>>>,
) {
    let late = tokio::time::timeout(PULL_EXPIRES + Duration::from_secs(1), pull).await;
    if let Ok(Ok(Some(msg))) = late
        && let Err(e) = msg.ack_with(jetstream::AckKind::Nak(None)).await
    {
        tracing::debug!(error = %e, "could not hand back an offer a losing pull received");
    }
}

/// Pull offers until shutdown; each offer is handled in its own task on `tracker`.
pub async fn pull_loop(agent: Arc<Agent>, tracker: TaskTracker) {
    let mut state = agent.state.subscribe();
    let mut grants = agent.grant_watch();
    let mut known = agent.desired_known.subscribe();
    tokio::select! {
        r = known.wait_for(|k| *k) => if r.is_err() { return },
        _ = agent.shutdown.cancelled() => return,
    }
    let mut found: Option<Consumers> = None;
    let mut delays = rpc::backoff();
    loop {
        if agent.shutdown.is_cancelled() {
            return;
        }
        // Take work only while online.
        if *state.borrow_and_update() != RobotRunState::Online {
            tokio::select! {
                _ = state.changed() => continue,
                _ = agent.shutdown.cancelled() => return,
            }
        }
        let permit = tokio::select! {
            p = agent.slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = agent.shutdown.cancelled() => return,
            _ = state.changed() => continue,
        };
        if grants.has_changed().unwrap_or(false) {
            found = None;
        }
        let Some(grant) = grants.borrow_and_update().clone() else {
            // Not registered (yet): wait for a grant.
            drop(permit);
            tokio::select! {
                _ = grants.changed() => continue,
                _ = agent.shutdown.cancelled() => return,
            }
        };
        if found.is_none() {
            match consumers(&agent.js, &grant).await {
                Ok(c) => found = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e.message, missing = e.missing, "cannot look up the offer consumers");
                    if e.missing {
                        agent.reregister.notify_one();
                    }
                    drop(permit);
                    if !rpc::pause(&mut delays, &agent.shutdown).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let Some(c) = found.as_ref() else { continue };
        let free = agent.slots.available_permits() + 1;
        let round = tokio::select! {
            r = fetch_round(c, priority(free)) => r,
            _ = agent.shutdown.cancelled() => return,
            _ = state.changed() => continue,
        };
        match round {
            Round::Offer(msg) => {
                delays = rpc::backoff();
                tracker.spawn(job::handle_offer(agent.clone(), *msg, permit));
            }
            Round::Empty => delays = rpc::backoff(),
            Round::Failed(e) => {
                tracing::warn!(error = %e, "pulling offers failed; backing off");
                found = None;
                drop(permit);
                if !rpc::pause(&mut delays, &agent.shutdown).await {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_busy_pulls_first() {
        assert_eq!(priority(0), 9);
        assert_eq!(priority(1), 8);
        assert_eq!(priority(9), 0);
        assert_eq!(priority(100), 0);
    }
}
