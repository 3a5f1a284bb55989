//! The gateway's configuration: one typed struct, read once by `main.rs` (or built by a test) and
//! passed down, never read from the environment anywhere else.
//!
//! The defaults work for a local run and for tests. The body limit is the one that needs a
//! reason: a submitted workflow travels *inside* the NATS submit request, and nats-server refuses
//! payloads over 1 MiB by default, so the HTTP body is capped below that (900 KiB) to leave room
//! for the envelope and to answer an oversized workflow with a clear 413 at the edge instead of
//! a NATS error after the fact.

use std::time::Duration;

/// Default NATS URL, the conventional local server.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// Default deadline the orchestrator is given for one request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on a request body: under NATS's 1 MiB payload limit with room for the envelope.
pub const DEFAULT_BODY_LIMIT_BYTES: usize = 900 * 1024;

/// How the gateway runs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where the orchestrator is reached (`NATS_URL`).
    pub nats_url: String,
    /// `FLEET_DEV_MODE=true`: every request acts as tenant `default`, with or without a key.
    /// Only for local use; the gateway logs a loud warning at start.
    pub dev_mode: bool,
    /// Deadline given to the orchestrator for each request. The gateway waits two seconds more
    /// than this for the answer, so that an orchestrator that honours the deadline always gets
    /// its "not done" answer back before the gateway gives up.
    pub request_timeout: Duration,
    /// Largest request body accepted; larger ones get 413.
    pub body_limit_bytes: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            nats_url: DEFAULT_NATS_URL.to_owned(),
            dev_mode: false,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            body_limit_bytes: DEFAULT_BODY_LIMIT_BYTES,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = GatewayConfig::default();
        assert_eq!(c.nats_url, "nats://127.0.0.1:4222");
        assert!(!c.dev_mode, "dev mode must be opted into");
        assert_eq!(c.request_timeout, Duration::from_secs(10));
        assert_eq!(c.body_limit_bytes, 921_600);
        assert!(c.body_limit_bytes < 1024 * 1024, "must stay under the NATS max payload");
    }
}
