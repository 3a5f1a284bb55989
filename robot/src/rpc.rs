//! Requests to the orchestrator: `fleet.robot.<tenant>.<robot>.<verb>`, MessagePack both ways.
//!
//! Every failure to get an answer (NATS down, timeout, no responders, a reply we cannot read)
//! becomes [`RobotReply::Unavailable`], the same as the orchestrator saying "not now": the robot
//! cannot tell them apart and must not act differently. Only `Refused` is final, and so is a
//! request larger than the server's max payload (answered `Refused` without being sent: no retry
//! can make it fit; the budgets of [`crate::bound`] keep reports from getting there). Every request is
//! idempotent on the orchestrator's side, so retrying one whose reply was lost is safe.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use fleet_schemas::codec;
use fleet_schemas::robot::RobotReply;
use fleet_schemas::subjects::{self, RobotVerb};
use fleet_schemas::{RobotId, TenantId};

/// Time to wait for one reply. Long enough for a busy orchestrator batching its writes, short
/// enough that a retry soon follows a lost request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest pause between retries: a recovering orchestrator is found within seconds.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The final answer to a retried request.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer<T> {
    Accepted(T),
    Refused(String),
}

/// Retrying stopped before an answer came (deadline passed or told to stop).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("gave up after {attempts} attempts; last: {last}")]
pub struct GaveUp {
    pub attempts: u32,
    pub last: String,
}

/// A backoff: exponential from 100 ms, capped at [`MAX_BACKOFF`], with jitter, endless.
pub fn backoff() -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(MAX_BACKOFF)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Sleep for the next backoff delay unless `stop` fires first; false when stopped.
pub async fn pause(delays: &mut (impl Iterator<Item = Duration> + Send), stop: &CancellationToken) -> bool {
    let d = delays.next().unwrap_or(MAX_BACKOFF);
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.cancelled() => false,
    }
}

/// The robot's side of the robot protocol.
#[derive(Clone, Debug)]
pub struct Orchestrator {
    client: async_nats::Client,
    tenant: TenantId,
    robot: RobotId,
}

impl Orchestrator {
    pub fn new(client: async_nats::Client, tenant: TenantId, robot: RobotId) -> Self {
        Self { client, tenant, robot }
    }

    pub fn subject(&self, verb: RobotVerb) -> String {
        subjects::robot_request(&self.tenant, &self.robot, verb)
    }

    /// One request, one answer.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        verb: RobotVerb,
        req: &Req,
    ) -> RobotReply<Resp> {
        let payload = codec::encode(req);
        if let Some(reason) = self.too_large(payload.len()) {
            // No retry can help a message the server will never take: final, like a refusal.
            return RobotReply::Refused { reason: format!("{} request: {reason}", verb.as_str()) };
        }
        let request =
            async_nats::client::Request::new().payload(payload.into()).timeout(Some(REQUEST_TIMEOUT));
        match self.client.send_request(self.subject(verb), request).await {
            Ok(msg) => match codec::decode::<RobotReply<Resp>>(verb.as_str(), &msg.payload) {
                Ok(reply) => reply,
                Err(e) => {
                    tracing::warn!(verb = verb.as_str(), error = %e, "unreadable reply from the orchestrator");
                    RobotReply::Unavailable { reason: e.to_string() }
                }
            },
            Err(e) => RobotReply::Unavailable { reason: format!("{} request: {e}", verb.as_str()) },
        }
    }

    /// Retry while `Unavailable`, until answered, until `deadline` passes or `stop` fires.
    pub async fn call_retrying<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        verb: RobotVerb,
        req: &Req,
        deadline: Option<tokio::time::Instant>,
        stop: &CancellationToken,
    ) -> Result<Answer<Resp>, GaveUp> {
        let mut delays = backoff();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let last = match self.call(verb, req).await {
                RobotReply::Accepted(v) => return Ok(Answer::Accepted(v)),
                RobotReply::Refused { reason } => return Ok(Answer::Refused(reason)),
                RobotReply::Unavailable { reason } => reason,
            };
            if attempts == 1 || attempts % 10 == 0 {
                tracing::info!(verb = verb.as_str(), attempts, reason = %last, "orchestrator unavailable; retrying");
            }
            let gave_up = GaveUp { attempts, last };
            let Some(mut delay) = delays.next() else { return Err(gave_up) };
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    return Err(gave_up);
                }
                delay = delay.min(left);
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return Err(gave_up),
            }
        }
    }

    /// Why a message of `len` bytes cannot be sent, if it cannot.
    fn too_large(&self, len: usize) -> Option<String> {
        let max = self.client.server_info().max_payload;
        (max > 0 && len > max)
            .then(|| format!("{len} bytes is more than the server's max payload of {max} bytes"))
    }

    /// Fire and forget (progress).
    pub async fn publish<Req: Serialize>(&self, verb: RobotVerb, req: &Req) {
        let payload = codec::encode(req);
        if let Some(reason) = self.too_large(payload.len()) {
            tracing::warn!(verb = verb.as_str(), %reason, "not sent");
            return;
        }
        if let Err(e) = self.client.publish(self.subject(verb), payload.into()).await {
            tracing::debug!(verb = verb.as_str(), error = %e, "could not publish");
        }
    }
}
