//! Rate limits: so many requests per API key, or per peer IP for requests without a valid key.
//!
//! GCRA limiters (`governor`), applied by a middleware to every route but `/health` (load
//! balancers poll it, and it reveals nothing). An over-limit request answers 429 with
//! `Retry-After` in the one JSON error shape; the Canvas retries 429 by itself.
//!
//! **Whose bucket.** A request whose key checks out is charged to the key's *id*: every
//! presentation of the key shares one bucket, and so does the key after rotation (a new secret on
//! the same key). The bucket has the key's own rate when it has one (set when the key is made,
//! stored with it: [`fleet_schemas::keys::Rate`]), else the gateway's default. Every other
//! request (no key, a malformed one, one that fails the check, or one that cannot be checked just
//! now) is charged to its peer IP, so a flood of wrong keys from one place is limited like any
//! other. IPv6 peers are counted by their /64, the block one subscriber usually holds, so that
//! walking through addresses does not give a fresh bucket each time.
//!
//! **Order.** The key is checked first, since its id decides the bucket; the outcome is left in
//! the request for the handler ([`crate::auth::Verified`]), so a key is still checked once per
//! request. A key seen in the last few seconds comes from the cache of [`crate::auth`]; any other
//! costs one request to the orchestrator, which is *not* made for a peer already over its limit:
//! such a request is refused at once, so wrong keys cannot become a flood of lookups either.
//!
//! **The default** (`--rate-limit`, [`crate::GatewayConfig::rate_limit`]) is the rate of keys
//! without one of their own and of peers. Turned off, keys with a rate of their own are still
//! limited; everything else is not.
//!
//! **Memory stays bounded.** Key buckets exist only for keys that checked out, so their number
//! is bounded by the keys in the database; a bucket is dropped once it would be full again (then
//! it is no different from a new one), at most every [`CLEANUP_EVERY`]. Peers likewise; once
//! [`MAX_TRACKED`] peers are tracked (someone is sending from very many addresses), the others
//! share one bucket until the next cleanup.
//!
//! Without `ConnectInfo` (the router driven in a test without a socket) all peers are one.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

use crate::AppState;
use crate::auth::{self, Caller, Verified};
use crate::config::RateLimit;
use crate::error::HttpError;

/// How often idle buckets are dropped.
pub const CLEANUP_EVERY: Duration = Duration::from_secs(30);
/// Most keys, and most peers, tracked at once (about 100 bytes each, so a few MiB at most).
pub const MAX_TRACKED: usize = 50_000;

/// The peer a keyless request is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    V4(Ipv4Addr),
    /// The upper 64 bits of an IPv6 address.
    V6Net(u64),
    /// No known peer (router driven without a socket), or too many peers tracked.
    Unknown,
}

impl Peer {
    pub fn of(ip: Option<IpAddr>) -> Peer {
        match ip.map(|ip| ip.to_canonical()) {
            Some(IpAddr::V4(v4)) => Peer::V4(v4),
            Some(IpAddr::V6(v6)) => Peer::V6Net((v6.to_bits() >> 64) as u64),
            None => Peer::Unknown,
        }
    }
}

/// One key's bucket.
struct KeyBucket {
    rate: RateLimit,
    limiter: DefaultDirectRateLimiter,
    /// How long after a request the bucket is full again.
    refill: Duration,
    /// When the bucket is full again if nothing more comes; from then on it can be dropped.
    full_at: Instant,
}

/// The gateway's limiter.
pub struct Limiter {
    /// The rate of keys without one of their own, and of peers; `None`: not limited.
    default: Option<RateLimit>,
    /// By key id.
    keys: Mutex<HashMap<u128, KeyBucket>>,
    peers: Option<DefaultKeyedRateLimiter<Peer>>,
    /// Peers over their limit, and until when: their keys are not sent to the orchestrator.
    refused: Mutex<HashMap<Peer, Instant>>,
    last_cleanup: Mutex<Instant>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("default", &self.default)
            .field("keys", &self.tracked_keys())
            .field("peers", &self.tracked_peers())
            .finish()
    }
}

/// A GCRA quota: one request every `per / requests`, up to `burst` at once.
fn quota(rate: RateLimit) -> Quota {
    let per_request = (rate.per / rate.requests.max(1)).max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(rate.burst).unwrap_or(NonZeroU32::MIN);
    let quota = Quota::with_period(per_request).unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN));
    quota.allow_burst(burst)
}

/// How long after its last request a bucket of `quota` is full again.
fn refill_time(quota: Quota) -> Duration {
    quota.replenish_interval().saturating_mul(quota.burst_size().get())
}

/// The maps hold nothing a panic elsewhere could leave half-changed, so a poisoned lock is used
/// as it is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn not_until(not_until: governor::NotUntil<<DefaultClock as Clock>::Instant>) -> Duration {
    not_until.wait_time_from(DefaultClock::default().now())
}

impl Limiter {
    /// A limiter with `default` as the rate of keys without their own and of peers (`None`: off).
    pub fn new(default: Option<RateLimit>) -> Self {
        Self {
            default,
            keys: Mutex::new(HashMap::new()),
            peers: default.map(|rate| DefaultKeyedRateLimiter::keyed(quota(rate))),
            refused: Mutex::new(HashMap::new()),
            last_cleanup: Mutex::new(Instant::now()),
        }
    }

    /// Take one request from the bucket of the key `key_id`, whose own rate is `own` (`None`:
    /// the default), or say how long until one is free.
    pub fn check_key(&self, key_id: &str, own: Option<RateLimit>, peer: Peer) -> Result<(), Duration> {
        let Some(rate) = own.or(self.default) else { return Ok(()) };
        self.cleanup();
        // Key ids are 32 hex digits (`fleet_schemas::keys::parse_key` checked them): as a number
        // they make a small map key that needs no allocation per request.
        let Ok(id) = u128::from_str_radix(key_id, 16) else { return self.check_peer(peer) };
        let now = Instant::now();
        let mut keys = lock(&self.keys);
        if !keys.contains_key(&id) && keys.len() >= MAX_TRACKED {
            keys.retain(|_, b| b.full_at > now);
            if keys.len() >= MAX_TRACKED {
                // Cannot happen with fewer keys in the database; stay bounded if it ever does.
                drop(keys);
                return self.check_peer(peer);
            }
        }
        let fresh = || {
            let quota = quota(rate);
            let refill = refill_time(quota);
            KeyBucket { rate, limiter: DefaultDirectRateLimiter::direct(quota), refill, full_at: now }
        };
        let bucket = keys.entry(id).or_insert_with(fresh);
        if bucket.rate != rate {
            // The key's rate changed: it starts afresh at its new rate.
            *bucket = fresh();
        }
        let result = bucket.limiter.check().map_err(not_until);
        bucket.full_at = now + bucket.refill;
        result
    }

    /// Take one request from `peer`'s bucket, or say how long until one is free.
    pub fn check_peer(&self, peer: Peer) -> Result<(), Duration> {
        let Some(peers) = &self.peers else { return Ok(()) };
        self.cleanup();
        let bucket = if peers.len() >= MAX_TRACKED { Peer::Unknown } else { peer };
        peers.check_key(&bucket).map_err(not_until).inspect_err(|wait| {
            let mut refused = lock(&self.refused);
            if refused.len() < MAX_TRACKED || refused.contains_key(&peer) {
                refused.insert(peer, Instant::now() + *wait);
            }
        })
    }

    /// How much longer `peer` is over its limit, if it is: a key it presents that is not in the
    /// cache is then not sent to the orchestrator.
    pub fn peer_refused(&self, peer: Peer) -> Option<Duration> {
        let until = *lock(&self.refused).get(&peer)?;
        until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
    }

    /// Drop what is idle, at most every [`CLEANUP_EVERY`].
    fn cleanup(&self) {
        let Ok(mut last) = self.last_cleanup.try_lock() else { return };
        if last.elapsed() < CLEANUP_EVERY {
            return;
        }
        *last = Instant::now();
        drop(last);
        self.sweep(Instant::now());
    }

    /// Drop the key buckets full again by `now`, refusals over by then, and full peer buckets.
    fn sweep(&self, now: Instant) {
        lock(&self.keys).retain(|_, b| b.full_at > now);
        lock(&self.refused).retain(|_, until| *until > now);
        if let Some(peers) = &self.peers {
            peers.retain_recent();
            peers.shrink_to_fit();
        }
    }

    pub fn tracked_keys(&self) -> usize {
        lock(&self.keys).len()
    }

    pub fn tracked_peers(&self) -> usize {
        self.peers.as_ref().map_or(0, |p| p.len())
    }
}

/// The 429 answer.
fn too_many(wait: Duration) -> HttpError {
    let secs = u32::try_from(wait.as_secs_f64().ceil() as u64).unwrap_or(u32::MAX).max(1);
    let mut e = HttpError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("too many requests; try again in {secs} s"),
    );
    e.retry_after_s = Some(secs);
    e
}

/// The middleware (`axum::middleware::from_fn_with_state(state, limit)`): checks the key, charges
/// the request to the key or its peer, and leaves the key's check for the handler.
pub async fn limit(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let limiter = state.limiter();
    let peer = Peer::of(req.extensions().get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(a)| a.ip()));
    let verified = match auth::presented(req.uri(), req.headers()) {
        Ok(key) => {
            let gate = || limiter.peer_refused(peer).map_or(Ok(()), |wait| Err(too_many(wait)));
            auth::verify(&state, key, gate).await
        }
        Err(e) => Err(e),
    };
    // Refused by the gate: the peer is over its limit already; charge nothing more.
    if let Err(e) = &verified
        && e.status == StatusCode::TOO_MANY_REQUESTS
    {
        return e.clone().into_response();
    }
    let charged = match &verified {
        Ok(Caller { key_id: Some(id), rate_limit, .. }) => {
            limiter.check_key(id, rate_limit.map(RateLimit::from), peer)
        }
        _ => limiter.check_peer(peer),
    };
    if let Err(wait) = charged {
        return too_many(wait).into_response();
    }
    req.extensions_mut().insert(Verified(verified));
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "0123456789abcdef0123456789abcdef";
    const K2: &str = "1123456789abcdef0123456789abcdef";
    const K3: &str = "2123456789abcdef0123456789abcdef";
    const FAST: RateLimit = RateLimit { requests: 2, per: Duration::from_millis(200), burst: 2 };

    #[test]
    fn a_key_has_its_own_bucket_at_its_own_rate() {
        let l = Limiter::new(Some(FAST));
        let own = RateLimit { requests: 3, per: Duration::from_secs(60), burst: 3 };
        for _ in 0..3 {
            assert!(l.check_key(K1, Some(own), Peer::Unknown).is_ok());
        }
        let wait = l.check_key(K1, Some(own), Peer::Unknown).unwrap_err();
        assert!(wait > Duration::from_secs(15) && wait <= Duration::from_secs(20), "{wait:?}");
        // Another key, on the default, is not affected; it has two.
        assert!(l.check_key(K2, None, Peer::Unknown).is_ok());
        assert!(l.check_key(K2, None, Peer::Unknown).is_ok());
        assert!(l.check_key(K2, None, Peer::Unknown).unwrap_err() <= Duration::from_millis(100));
        // Neither touched the peer's bucket.
        assert!(l.check_peer(Peer::Unknown).is_ok());
        assert_eq!(l.tracked_keys(), 2);
    }

    #[test]
    fn recovers_after_the_wait() {
        let l = Limiter::new(Some(FAST));
        assert!(l.check_key(K1, None, Peer::Unknown).is_ok());
        assert!(l.check_key(K1, None, Peer::Unknown).is_ok());
        let wait = l.check_key(K1, None, Peer::Unknown).unwrap_err();
        std::thread::sleep(wait + Duration::from_millis(5));
        assert!(l.check_key(K1, None, Peer::Unknown).is_ok(), "one request is free again after the wait");
    }

    #[test]
    fn default_off_limits_only_keys_with_their_own_rate() {
        let l = Limiter::new(None);
        for _ in 0..1000 {
            assert!(l.check_key(K1, None, Peer::Unknown).is_ok());
            assert!(l.check_peer(Peer::Unknown).is_ok());
        }
        assert_eq!((l.tracked_keys(), l.tracked_peers()), (0, 0), "nothing is tracked for unlimited callers");
        let own = RateLimit { requests: 1, per: Duration::from_secs(60), burst: 1 };
        assert!(l.check_key(K3, Some(own), Peer::Unknown).is_ok());
        assert!(l.check_key(K3, Some(own), Peer::Unknown).is_err());
    }

    #[test]
    fn a_refused_peer_is_remembered_until_it_may_send_again() {
        let l = Limiter::new(Some(RateLimit { requests: 2, per: Duration::from_secs(60), burst: 2 }));
        let peer = Peer::of(Some(IpAddr::from([10, 0, 0, 1])));
        let other = Peer::of(Some(IpAddr::from([10, 0, 0, 2])));
        assert_eq!(l.peer_refused(peer), None);
        assert!(l.check_peer(peer).is_ok());
        assert!(l.check_peer(peer).is_ok());
        let wait = l.check_peer(peer).unwrap_err();
        let refused = l.peer_refused(peer).expect("remembered");
        assert!(refused <= wait && refused > wait - Duration::from_secs(1), "{refused:?} vs {wait:?}");
        assert_eq!(l.peer_refused(other), None);
        assert!(l.check_peer(other).is_ok());
        // Refusals and buckets past their time are swept.
        l.sweep(Instant::now() + Duration::from_secs(61));
        assert_eq!(l.peer_refused(peer), None);
        assert_eq!(lock(&l.refused).len(), 0);
    }

    #[test]
    fn idle_key_buckets_are_dropped_once_full_again() {
        let l = Limiter::new(Some(RateLimit { requests: 10, per: Duration::from_secs(60), burst: 10 }));
        assert!(l.check_key(K1, None, Peer::Unknown).is_ok());
        l.sweep(Instant::now() + Duration::from_secs(30));
        assert_eq!(l.tracked_keys(), 1, "not full yet: 60 s to refill its 10 requests");
        l.sweep(Instant::now() + Duration::from_secs(61));
        assert_eq!(l.tracked_keys(), 0);
    }

    #[test]
    fn peers_are_addresses_and_ipv6_blocks() {
        let v6 = |s: &str| Peer::of(Some(s.parse().unwrap()));
        assert_eq!(v6("2001:db8:1:2::1"), v6("2001:db8:1:2:ffff::9"), "one /64, one bucket");
        assert_ne!(v6("2001:db8:1:2::1"), v6("2001:db8:1:3::1"));
        assert_eq!(v6("::ffff:10.0.0.1"), Peer::V4(Ipv4Addr::new(10, 0, 0, 1)), "v4-mapped is v4");
        assert_eq!(Peer::of(None), Peer::Unknown);
    }
}
