//! The gateway's configuration: one typed struct, read once by `main.rs` (or built by a test) and
//! passed down, never read from the environment anywhere else.
//!
//! The defaults work for a local run and for tests. The body limit is the one that needs a
//! reason: a submitted workflow travels *inside* the NATS submit request, and nats-server refuses
//! payloads over 1 MiB by default, so the HTTP body is capped below that (900 KiB) to leave room
//! for the envelope and to answer an oversized workflow with a clear 413 at the edge instead of
//! a NATS error after the fact.

use std::path::PathBuf;
use std::time::Duration;

use fleet_schemas::keys::Rate;

/// Default NATS URL, the conventional local server.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// Default deadline the orchestrator is given for one request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on a request body: under NATS's 1 MiB payload limit with room for the envelope.
pub const DEFAULT_BODY_LIMIT_BYTES: usize = 900 * 1024;
/// Default rate limit per API key (or per peer IP without a valid key): 100 requests per minute,
/// and the whole minute's allowance may be used at once (a Canvas loading its dashboard fires a
/// handful of calls together).
pub const DEFAULT_RATE_LIMIT: RateLimit =
    RateLimit { requests: 100, per: Duration::from_secs(60), burst: 100 };

/// `requests` per `per`, of which up to `burst` may come at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub per: Duration,
    pub burst: u32,
}

impl RateLimit {
    /// Parse `100/min`, `5/s`, `1000/h` (also `sec`, `second`, `minute`, `hour`); `0` or `off`
    /// turn limiting off (`None`). The burst defaults to `requests`.
    pub fn parse(s: &str) -> Result<Option<RateLimit>, String> {
        let s = s.trim();
        if s == "0" || s.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let rate = Rate::parse_allowing_zero(s)
            .map_err(|_| format!("{s:?} is not a rate: expected e.g. 100/min, 5/s, 1000/h, or off"))?;
        Ok((rate.requests > 0).then(|| RateLimit::from(rate)))
    }
}

/// A key's own rate: the whole period's allowance may come at once.
impl From<Rate> for RateLimit {
    fn from(rate: Rate) -> Self {
        RateLimit { requests: rate.requests, per: rate.period(), burst: rate.requests }
    }
}

/// How the gateway runs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where the orchestrator is reached (`NATS_URL`).
    pub nats_url: String,
    /// How the gateway proves who it is to NATS (`FLEET_NATS_CREDS`: the `gateway.nk` that
    /// `fleet-orchestrator nats-setup` wrote).
    pub nats_credentials: fleet_nats_auth::Credentials,
    /// TLS of the NATS connection (`--nats-ca`, `--nats-cert`, `--nats-key`, `--nats-tls`).
    pub nats_tls: fleet_connect::NatsTls,
    /// Serve HTTPS with this certificate and key (`--tls-cert`, `--tls-key`); `None`: plain HTTP.
    pub https: Option<HttpsFiles>,
    /// `FLEET_DEV_MODE=true`: every request acts as tenant `default`, with or without a key.
    /// Only for local use; the gateway logs a loud warning at start.
    pub dev_mode: bool,
    /// Deadline given to the orchestrator for each request. The gateway waits two seconds more
    /// than this for the answer, so that an orchestrator that honours the deadline always gets
    /// its "not done" answer back before the gateway gives up.
    pub request_timeout: Duration,
    /// Largest request body accepted; larger ones get 413.
    pub body_limit_bytes: usize,
    /// Requests allowed per API key (per peer IP without a key); `None` turns limiting off
    /// (benchmarks). `/health` is never limited.
    pub rate_limit: Option<RateLimit>,
}

/// The PEM certificate chain and private key the gateway serves HTTPS with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl HttpsFiles {
    /// From the two flags, which go together: both (HTTPS), neither (HTTP), or an error naming
    /// the one that is missing.
    pub fn from_flags(cert: Option<PathBuf>, key: Option<PathBuf>) -> Result<Option<Self>, String> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(HttpsFiles { cert, key })),
            (None, None) => Ok(None),
            (Some(_), None) => Err("--tls-cert (FLEET_GATEWAY_TLS_CERT) is given without --tls-key \
                                    (FLEET_GATEWAY_TLS_KEY): HTTPS needs both"
                .to_owned()),
            (None, Some(_)) => Err("--tls-key (FLEET_GATEWAY_TLS_KEY) is given without --tls-cert \
                                    (FLEET_GATEWAY_TLS_CERT): HTTPS needs both"
                .to_owned()),
        }
    }

    /// The rustls server configuration; the error names the file that cannot be used.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, fleet_connect::TlsFileError> {
        fleet_connect::pem::server_config(&self.cert, &self.key)
    }
}

impl GatewayConfig {
    /// Where and how to connect to NATS.
    pub fn nats_client(&self) -> fleet_connect::NatsClient {
        fleet_connect::NatsClient::new(self.nats_url.clone(), self.nats_tls.clone())
    }

    /// The longest a handler may take before the gateway answers on its own. A handler makes at
    /// most two orchestrator calls in a row (a command, then a read of the robot), each bounded by
    /// the request timeout plus the reply grace, so this is longer than both together plus a
    /// margin: a submit whose answer is lost is therefore always answered by the submit handler
    /// itself (500 `outcome_unknown`), never by this safety net.
    pub fn handler_timeout(&self) -> Duration {
        (self.request_timeout + crate::orchestrator::REPLY_GRACE) * 2 + Duration::from_secs(5)
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            nats_url: DEFAULT_NATS_URL.to_owned(),
            nats_credentials: fleet_nats_auth::Credentials::None,
            nats_tls: fleet_connect::NatsTls::default(),
            https: None,
            dev_mode: false,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            body_limit_bytes: DEFAULT_BODY_LIMIT_BYTES,
            rate_limit: Some(DEFAULT_RATE_LIMIT),
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
        assert_eq!(c.rate_limit, Some(RateLimit { requests: 100, per: Duration::from_secs(60), burst: 100 }));
        assert!(c.handler_timeout() > c.request_timeout + crate::orchestrator::REPLY_GRACE);
        assert_eq!(c.https, None, "plain HTTP unless a certificate is given");
    }

    #[test]
    fn https_flags_go_together() {
        assert_eq!(HttpsFiles::from_flags(None, None), Ok(None));
        let both = HttpsFiles::from_flags(Some("c.pem".into()), Some("k.pem".into())).unwrap();
        assert_eq!(both, Some(HttpsFiles { cert: "c.pem".into(), key: "k.pem".into() }));
        let e = HttpsFiles::from_flags(Some("c.pem".into()), None).unwrap_err();
        assert!(e.contains("--tls-cert") && e.contains("without --tls-key"), "{e}");
        let e = HttpsFiles::from_flags(None, Some("k.pem".into())).unwrap_err();
        assert!(e.contains("--tls-key") && e.contains("without --tls-cert"), "{e}");
    }

    #[test]
    fn rates() {
        let r = RateLimit::parse("100/min").unwrap().unwrap();
        assert_eq!((r.requests, r.per, r.burst), (100, Duration::from_secs(60), 100));
        assert_eq!(RateLimit::parse(" 5/s ").unwrap().unwrap().per, Duration::from_secs(1));
        assert_eq!(RateLimit::parse("1000/hour").unwrap().unwrap().per, Duration::from_secs(3600));
        assert_eq!(RateLimit::parse("off").unwrap(), None);
        assert_eq!(RateLimit::parse("0").unwrap(), None);
        assert_eq!(RateLimit::parse("0/min").unwrap(), None);
        for bad in ["100", "x/min", "10/week", "-1/s", ""] {
            assert!(RateLimit::parse(bad).is_err(), "{bad}");
        }
    }
}
