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
//! consumer under one slot keeps both served. When one pull yields, the other is dropped: the
//! client unsubscribes its inbox and the server discards a pull request whose inbox has no
//! interest, so an offer is not sent into the void (in the tiny window where it already was, it is
//! redelivered after the consumer's short `ack_wait`). The same holds when pausing or shutting
//! down: an in-flight pull is simply dropped.
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
async fn fetch_one(consumer: &PullConsumer, priority: usize) -> Result<Option<jetstream::Message>, String> {
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

/// Pull from both consumers at once; the first offer wins.
async fn fetch_round(c: &Consumers, priority: usize) -> Round {
    let class = fetch_one(&c.class, priority);
    let robot = fetch_one(&c.robot, priority);
    tokio::pin!(class, robot);
    let (mut class_done, mut robot_done) = (false, false);
    let mut failure = None;
    while !(class_done && robot_done) {
        let result = tokio::select! {
            r = &mut class, if !class_done => { class_done = true; r }
            r = &mut robot, if !robot_done => { robot_done = true; r }
        };
        match result {
            Ok(Some(m)) => return Round::Offer(Box::new(m)),
            Ok(None) => {}
            Err(e) => failure = Some(e),
        }
    }
    match failure {
        Some(e) => Round::Failed(e),
        None => Round::Empty,
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
