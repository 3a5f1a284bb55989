//! Load generators: closed loop (as fast as the system accepts, `concurrency` requests in flight)
//! and open loop (requests fired at scheduled times whatever the answers do).
//!
//! Open loop avoids coordinated omission: the ticker never waits for an answer, and each
//! request's latency is measured from the time it was *scheduled*, so a stall shows up in the
//! figures as the time requests spent waiting, instead of silently thinning the load.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;
use uuid::Uuid;

use crate::report::Recorder;

/// What a load run produced.
#[derive(Default)]
pub struct LoadResult {
    /// Ids of accepted submissions, with the time each was scheduled (open loop) or sent.
    pub accepted: Vec<(Uuid, time::OffsetDateTime)>,
    pub errors: u64,
    /// First few error messages.
    pub error_samples: Vec<String>,
    /// Request latency (from scheduled time in open loop).
    pub latency: Recorder,
    pub first_sent: Option<Instant>,
    pub last_answer: Option<Instant>,
    /// How far behind schedule the ticker fell at worst (open loop).
    pub max_lag: Duration,
}

impl LoadResult {
    pub fn ids(&self) -> Vec<Uuid> {
        self.accepted.iter().map(|(id, _)| *id).collect()
    }
}

const ERROR_SAMPLES: usize = 5;

/// `n` calls of `submit`, `concurrency` at a time.
pub async fn closed_loop<F, Fut>(n: u64, concurrency: usize, submit: F) -> LoadResult
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = anyhow::Result<Uuid>>,
{
    let latency = Recorder::default();
    let started = Instant::now();
    let results: Vec<_> = futures::stream::iter(0..n)
        .map(|i| {
            let latency = latency.clone();
            let call = submit(i);
            async move {
                let sent = Instant::now();
                let wall = time::OffsetDateTime::now_utc();
                let r = call.await;
                latency.record(sent.elapsed());
                (r, wall)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut out = LoadResult {
        latency,
        first_sent: Some(started),
        last_answer: Some(Instant::now()),
        ..Default::default()
    };
    for (r, wall) in results {
        match r {
            Ok(id) => out.accepted.push((id, wall)),
            Err(e) => {
                out.errors += 1;
                if out.error_samples.len() < ERROR_SAMPLES {
                    out.error_samples.push(format!("{e:#}"));
                }
            }
        }
    }
    out
}

/// Fire `submit` at `rate` per second for `duration`, each call on its own task, at most
/// `max_in_flight` running at once (beyond that a call waits for a slot, and its waiting counts
/// in its latency).
pub async fn open_loop<F, Fut>(rate: f64, duration: Duration, max_in_flight: usize, submit: F) -> LoadResult
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = anyhow::Result<Uuid>> + Send + 'static,
{
    let total = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
    let rate = rate.max(0.001);
    let latency = Recorder::default();
    let slots = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let collected = Arc::new(Mutex::new(LoadResult::default()));
    let wall_start = time::OffsetDateTime::now_utc() + Duration::from_millis(20);
    let start = Instant::now() + Duration::from_millis(20);
    let mut tasks = tokio::task::JoinSet::new();
    let mut max_lag = Duration::ZERO;
    let mut i = 0;
    while i < total {
        let offset = Duration::from_secs_f64(i as f64 / rate);
        let at = start + offset;
        let now = Instant::now();
        if at > now {
            tokio::time::sleep_until(at).await;
            continue;
        }
        max_lag = max_lag.max(now - at);
        let call = submit(i);
        let (latency, slots, collected) = (latency.clone(), slots.clone(), collected.clone());
        let wall = wall_start + offset;
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await;
            let r = call.await;
            let done = Instant::now();
            latency.record(done.duration_since(at));
            let mut c = collected.lock().await;
            c.last_answer = Some(c.last_answer.map_or(done, |l| l.max(done)));
            match r {
                Ok(id) => c.accepted.push((id, wall)),
                Err(e) => {
                    c.errors += 1;
                    if c.error_samples.len() < ERROR_SAMPLES {
                        c.error_samples.push(format!("{e:#}"));
                    }
                }
            }
        });
        // Reap finished tasks as we go so the set does not grow with the whole run.
        while tasks.try_join_next().is_some() {}
        i += 1;
    }
    while tasks.join_next().await.is_some() {}
    let mut out = std::mem::take(&mut *collected.lock().await);
    out.latency = latency;
    out.first_sent = Some(start);
    out.max_lag = max_lag;
    out
}
