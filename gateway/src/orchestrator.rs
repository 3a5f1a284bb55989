//! The NATS client wrapper: one request to the orchestrator per HTTP call.
//!
//! Each call wraps its body in the [`ApiRequest`] envelope with the caller's tenant, the request
//! id and a deadline (`now + request_timeout`). The orchestrator promises not to commit after the
//! deadline, and the gateway waits two seconds longer than it, so a late orchestrator's "not
//! done" answer normally arrives before the gateway gives up. If the gateway gives up anyway,
//! the outcome is unknown; [`CallError::outcome_unknown`] says so and the HTTP layer answers
//! accordingly (DESIGN.md, "Submissions and deadlines").
//!
//! The wrapper fails fast with [`CallError::NotConnected`] while NATS is down instead of queueing
//! the request in the client: nothing was sent, so the client can safely retry, and the HTTP
//! request does not hang for the whole timeout.

use std::time::Duration;

use async_nats::client::{RequestError, RequestErrorKind};
use async_nats::connection::State;
use fleet_schemas::api::{API_VERSION, ApiError, ApiRequest, ApiResult, Endpoint};
use fleet_schemas::codec;
use fleet_schemas::{RequestId, TenantId};
use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

/// How much longer than the deadline the gateway waits for an answer.
pub const REPLY_GRACE: Duration = Duration::from_secs(2);

/// Why a call did not produce an answer of the orchestrator.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The orchestrator answered with an error.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The NATS connection is down; nothing was sent.
    #[error("not connected to NATS")]
    NotConnected,
    /// NATS says nobody serves the subject: no orchestrator is running. Nothing happened.
    #[error("no orchestrator is running (no responders on {subject})")]
    NoResponders { subject: String },
    /// No answer in time: the request may or may not have been carried out.
    #[error("no answer from the orchestrator within {waited:?}")]
    TimedOut { waited: Duration },
    /// The request is larger than the server's max payload; nothing was sent.
    #[error("request of {size} bytes is larger than the NATS max payload")]
    TooLarge { size: usize },
    /// The client failed in another way (connection lost while waiting, …).
    #[error("NATS request failed: {0}")]
    Transport(String),
    /// An answer came that does not decode as the expected reply.
    #[error("undecodable reply from the orchestrator: {0}")]
    BadReply(String),
}

impl CallError {
    /// True when the request may have been carried out although no answer says so. Only these
    /// errors make a write's outcome unknown; the others mean nothing was done.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, CallError::TimedOut { .. } | CallError::Transport(_) | CallError::BadReply(_))
    }
}

/// The gateway's handle on the orchestrator. Cheap to clone (the NATS client is shared).
#[derive(Clone, Debug)]
pub struct Orchestrator {
    client: async_nats::Client,
    request_timeout: Duration,
}

impl Orchestrator {
    pub fn new(client: async_nats::Client, request_timeout: Duration) -> Self {
        Self { client, request_timeout }
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Call `endpoint` with the configured deadline.
    pub async fn call<B, R>(
        &self,
        endpoint: Endpoint,
        request_id: RequestId,
        tenant: &TenantId,
        body: B,
    ) -> Result<R, CallError>
    where
        B: Serialize,
        R: DeserializeOwned,
    {
        self.call_with_deadline(endpoint, request_id, tenant, body, self.request_timeout, REPLY_GRACE).await
    }

    /// Call `endpoint` with the configured deadline on behalf of `actor` (the caller's key id),
    /// which the orchestrator records as the actor of the history rows the call writes.
    pub async fn call_as<B, R>(
        &self,
        endpoint: Endpoint,
        request_id: RequestId,
        tenant: &TenantId,
        actor: Option<&str>,
        body: B,
    ) -> Result<R, CallError>
    where
        B: Serialize,
        R: DeserializeOwned,
    {
        let envelope = self.envelope(request_id, tenant, body, self.request_timeout, actor);
        self.send(endpoint, &envelope, self.request_timeout + REPLY_GRACE).await
    }

    /// Call `endpoint`, giving the orchestrator `deadline` and waiting `deadline + grace`.
    pub async fn call_with_deadline<B, R>(
        &self,
        endpoint: Endpoint,
        request_id: RequestId,
        tenant: &TenantId,
        body: B,
        deadline: Duration,
        grace: Duration,
    ) -> Result<R, CallError>
    where
        B: Serialize,
        R: DeserializeOwned,
    {
        let envelope = self.envelope(request_id, tenant, body, deadline, None);
        self.send(endpoint, &envelope, deadline + grace).await
    }

    fn envelope<B>(
        &self,
        request_id: RequestId,
        tenant: &TenantId,
        body: B,
        deadline: Duration,
        actor: Option<&str>,
    ) -> ApiRequest<B> {
        let deadline_unix_ms = unix_ms(OffsetDateTime::now_utc()).saturating_add(millis(deadline));
        let actor = actor.map(str::to_owned);
        ApiRequest { v: API_VERSION, request_id, tenant: tenant.clone(), deadline_unix_ms, body, actor }
    }

    /// Send one request and wait `waited` for its reply.
    async fn send<B, R>(
        &self,
        endpoint: Endpoint,
        envelope: &ApiRequest<B>,
        waited: Duration,
    ) -> Result<R, CallError>
    where
        B: Serialize,
        R: DeserializeOwned,
    {
        if !self.is_connected() {
            return Err(CallError::NotConnected);
        }
        let payload = codec::encode(envelope);
        let size = payload.len();
        let subject = endpoint.subject();
        let request = async_nats::Request::new().payload(payload.into()).timeout(Some(waited));
        let reply = self
            .client
            .send_request(subject.clone(), request)
            .await
            .map_err(|e| classify(e, subject, waited, size))?;
        let result: ApiResult<R> = codec::decode("API reply", &reply.payload)
            .map_err(|e| CallError::BadReply(format!("{} on {}: {e}", reply.payload.len(), reply.subject)))?;
        Ok(result?)
    }

    /// Flush what is buffered and close the connection (the last step of shutdown).
    pub async fn drain(&self) {
        if let Err(e) = self.client.drain().await {
            tracing::debug!(error = %e, "draining the NATS connection failed");
        }
    }
}

fn classify(e: RequestError, subject: String, waited: Duration, size: usize) -> CallError {
    match e.kind() {
        RequestErrorKind::NoResponders => CallError::NoResponders { subject },
        RequestErrorKind::TimedOut => CallError::TimedOut { waited },
        RequestErrorKind::MaxPayloadExceeded => CallError::TooLarge { size },
        RequestErrorKind::InvalidSubject | RequestErrorKind::Other => CallError::Transport(e.to_string()),
    }
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unanswered_sends_are_unknown() {
        assert!(CallError::TimedOut { waited: Duration::from_secs(1) }.outcome_unknown());
        assert!(CallError::BadReply("x".into()).outcome_unknown());
        assert!(CallError::Transport("x".into()).outcome_unknown());
        assert!(!CallError::NotConnected.outcome_unknown());
        assert!(!CallError::NoResponders { subject: "s".into() }.outcome_unknown());
        assert!(!CallError::TooLarge { size: 1 }.outcome_unknown());
        assert!(!CallError::Api(ApiError::Conflict { message: "x".into() }).outcome_unknown());
    }
}
