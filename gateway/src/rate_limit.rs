//! Rate limits: so many requests per API key, or per peer IP for requests without a key.
//!
//! One keyed GCRA limiter (`governor`) for the whole gateway, applied by a middleware to every
//! route but `/health` (load balancers poll it, and it reveals nothing). The key is never held
//! in memory as such: the limiter is keyed by a hash of it (a collision merely shares a bucket).
//! An over-limit request answers 429 with `Retry-After` in the one JSON error shape; the Canvas
//! retries 429 by itself.
//!
//! The limiter is keyed by the key *presented*, before it is checked, so that a flood of
//! requests with a wrong key is limited like any other. Memory stays bounded: keys not seen for a
//! full period are dropped every [`CLEANUP_EVERY`], and once [`MAX_TRACKED`] keys are tracked
//! (someone is sending many distinct keys), further unknown keys are counted against their peer
//! IP instead.
//!
//! Without `ConnectInfo` (the router driven in a test without a socket) all keyless requests
//! share one bucket.

use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::AppState;
use crate::config::RateLimit;
use crate::error::HttpError;

/// How often idle buckets are dropped.
pub const CLEANUP_EVERY: Duration = Duration::from_secs(30);
/// Most keys tracked at once (about 100 bytes each, so a few MiB at most).
pub const MAX_TRACKED: usize = 50_000;

/// Whose bucket a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// A hash of the API key presented.
    Key(u64),
    Ip(IpAddr),
    /// No key and no known peer (router driven without a socket).
    Unknown,
}

/// The gateway's limiter.
pub struct Limiter {
    limiter: DefaultKeyedRateLimiter<RateKey>,
    hasher: RandomState,
    last_cleanup: Mutex<Instant>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").field("tracked", &self.limiter.len()).finish()
    }
}

impl Limiter {
    pub fn new(rate: RateLimit) -> Self {
        let per_request = (rate.per / rate.requests.max(1)).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(rate.burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(per_request).unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN));
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(quota.allow_burst(burst)),
            hasher: RandomState::new(),
            last_cleanup: Mutex::new(Instant::now()),
        }
    }

    /// The bucket of a request: its key if it presents one, else its peer's IP.
    pub fn key(&self, api_key: Option<&str>, peer: Option<IpAddr>) -> RateKey {
        match (api_key, peer) {
            (Some(k), _) => RateKey::Key(self.hasher.hash_one(k)),
            (None, Some(ip)) => RateKey::Ip(ip),
            (None, None) => RateKey::Unknown,
        }
    }

    /// Take one request from `key`'s bucket, or say how long until one is free.
    pub fn check(&self, key: RateKey, peer: Option<IpAddr>) -> Result<(), Duration> {
        self.cleanup();
        let key = match key {
            // Too many distinct keys: count further ones against their peer instead.
            RateKey::Key(_) if self.limiter.len() >= MAX_TRACKED => {
                peer.map_or(RateKey::Unknown, RateKey::Ip)
            }
            k => k,
        };
        self.limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Drop the buckets of keys that are full again (idle for a period), at most every
    /// [`CLEANUP_EVERY`].
    fn cleanup(&self) {
        let Ok(mut last) = self.last_cleanup.try_lock() else { return };
        if last.elapsed() < CLEANUP_EVERY && self.limiter.len() < MAX_TRACKED {
            return;
        }
        *last = Instant::now();
        drop(last);
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    pub fn tracked(&self) -> usize {
        self.limiter.len()
    }
}

/// The middleware (`axum::middleware::from_fn_with_state(state, limit)`).
pub async fn limit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(limiter) = state.limiter() else { return next.run(req).await };
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(addr)| addr.ip());
    // A malformed credential header is the handler's business (401); here it counts as none.
    let presented = crate::auth::credential(req.headers()).ok().flatten();
    let key = limiter.key(presented.as_ref().map(|k| k.expose()), peer);
    match limiter.check(key, peer) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            let secs = u32::try_from(wait.as_secs_f64().ceil() as u64).unwrap_or(u32::MAX).max(1);
            let mut e = HttpError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many requests; try again in {secs} s"),
            );
            e.retry_after_s = Some(secs);
            e.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refused_then_recovers() {
        let l = Limiter::new(RateLimit { requests: 2, per: Duration::from_millis(200), burst: 2 });
        let k = l.key(Some("crpa_secret"), None);
        assert!(l.check(k, None).is_ok());
        assert!(l.check(k, None).is_ok());
        let wait = l.check(k, None).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // Another key has its own bucket.
        assert!(l.check(l.key(Some("other"), None), None).is_ok());
        std::thread::sleep(Duration::from_millis(120));
        assert!(l.check(k, None).is_ok(), "one request is free again after a period/requests");
    }

    #[test]
    fn keys_are_not_kept_in_clear() {
        let l = Limiter::new(crate::config::DEFAULT_RATE_LIMIT);
        let k = l.key(Some("crpa_secret"), Some(IpAddr::from([10, 0, 0, 1])));
        assert!(!format!("{k:?}").contains("secret"));
        assert_eq!(l.key(None, Some(IpAddr::from([10, 0, 0, 1]))), RateKey::Ip(IpAddr::from([10, 0, 0, 1])));
        assert_eq!(l.key(None, None), RateKey::Unknown);
    }
}
