//! Group commit: concurrent writes of one kind share one statement and one commit.
//!
//! A [`Batcher`] owns a task that takes every request waiting in its queue (up to a maximum),
//! hands them to one flush (one SQL statement over `unnest` arrays), and answers each caller.
//! While a flush runs, new requests queue; the next flush takes them all. So batches grow exactly
//! as fast as the database is slow, and an idle system pays no added delay: a lone request is
//! flushed at once (DESIGN.md, "Cost budget per job": "flushed when the previous commit
//! returns").
//!
//! The flush must answer every request, in order. A caller that stopped waiting (its future was
//! dropped) does not stop its request: every write here is idempotent or fenced, and the requester
//! retries.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

struct Item<Q, A> {
    request: Q,
    answer: Option<oneshot::Sender<A>>,
}

/// A queue of requests of one kind with the task that flushes it.
pub struct Batcher<Q, A> {
    tx: mpsc::UnboundedSender<Item<Q, A>>,
}

/// The flush task is gone (the runtime is shutting down).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the batch writer stopped")]
pub struct Stopped;

/// How a [`Batcher`] groups requests.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Most requests in one flush.
    pub max: usize,
    /// How long a flush waits after its first request for more to arrive: zero for the hot
    /// path; some for records whose delay matters less than their number (heartbeats), so that
    /// requests arriving one by one still share a statement.
    pub linger: Duration,
    /// Flushes at once. One keeps the records of a kind in order, and measured best on the
    /// 2-core machine for the hot path too (fleet-bench latency at 400 jobs/s: submit p50 12 ms
    /// with one, 18 ms with two: the second statement mostly waits for the first's row locks
    /// and WAL flush).
    pub concurrency: usize,
}

impl Settings {
    /// The hot path's settings: up to `max` requests, no linger, `concurrency` flushes at once.
    pub const fn eager(max: usize, concurrency: usize) -> Self {
        Self { max, linger: Duration::ZERO, concurrency }
    }
}

impl<Q: Send + 'static, A: Send + 'static> Batcher<Q, A> {
    /// Start the flush task, one flush at a time. `flush` gets up to `max` requests and returns
    /// one answer per request, in the same order.
    pub fn spawn<F, Fut>(max: usize, flush: F) -> Self
    where
        F: Fn(Vec<Q>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<A>> + Send + 'static,
    {
        Self::spawn_with(Settings::eager(max, 1), flush)
    }

    /// Start the flush task with the given [`Settings`].
    pub fn spawn_with<F, Fut>(settings: Settings, flush: F) -> Self
    where
        F: Fn(Vec<Q>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<A>> + Send + 'static,
    {
        let Settings { max, linger, concurrency } = settings;
        let (tx, mut rx) = mpsc::unbounded_channel::<Item<Q, A>>();
        let flush = Arc::new(flush);
        let slots = Arc::new(Semaphore::new(concurrency.max(1)));
        tokio::spawn(async move {
            loop {
                // Requests gather while every flush is busy.
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let mut items = Vec::with_capacity(max);
                if rx.recv_many(&mut items, max).await == 0 {
                    return;
                }
                if !linger.is_zero() {
                    let until = tokio::time::Instant::now() + linger;
                    while items.len() < max {
                        let room = max - items.len();
                        match tokio::time::timeout_at(until, rx.recv_many(&mut items, room)).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                }
                let (requests, answers): (Vec<Q>, Vec<_>) =
                    items.into_iter().map(|i| (i.request, i.answer)).unzip();
                let n = requests.len();
                let pending = flush(requests);
                tokio::spawn(async move {
                    let results = pending.await;
                    drop(slot);
                    debug_assert_eq!(results.len(), n, "a flush answers every request");
                    for (answer, result) in answers.into_iter().zip(results) {
                        if let Some(answer) = answer {
                            let _ = answer.send(result);
                        }
                    }
                });
            }
        });
        Self { tx }
    }

    /// Queue a request and wait for its answer.
    pub async fn call(&self, request: Q) -> Result<A, Stopped> {
        let (answer, rx) = oneshot::channel();
        self.tx.send(Item { request, answer: Some(answer) }).map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// Queue a request whose answer nobody waits for (best-effort records such as heartbeats).
    pub fn send(&self, request: Q) -> Result<(), Stopped> {
        self.tx.send(Item { request, answer: None }).map_err(|_| Stopped)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn answers_each_request_in_order_and_batches_while_busy() {
        let flushes = Arc::new(AtomicUsize::new(0));
        let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
        let counted = flushes.clone();
        let batcher = Arc::new(Batcher::spawn(64, move |qs: Vec<u32>| {
            let counted = counted.clone();
            let mut gate = gate_rx.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                // Hold the first flush until every other request is queued behind it.
                let _ = gate.wait_for(|open| *open).await;
                qs.into_iter().map(|q| q * 10).collect()
            }
        }));
        let first = tokio::spawn({
            let b = batcher.clone();
            async move { b.call(1).await }
        });
        // Wait (bounded) until the first flush has started.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while flushes.load(Ordering::SeqCst) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "first flush never started");
            tokio::task::yield_now().await;
        }
        let rest: Vec<_> = (2..=50)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.call(i).await })
            })
            .collect();
        // Let the spawned callers queue their requests.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        gate_tx.send(true).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), 10);
        for (i, h) in rest.into_iter().enumerate() {
            assert_eq!(h.await.unwrap().unwrap(), (i as u32 + 2) * 10);
        }
        // One flush for the first request, and far fewer than 49 for the others.
        let n = flushes.load(Ordering::SeqCst);
        assert!(n <= 3, "{n} flushes for 50 requests");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lingering_batcher_gathers_requests_that_arrive_one_by_one() {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = sizes.clone();
        let settings = Settings { max: 100, linger: Duration::from_millis(100), concurrency: 1 };
        let batcher = Batcher::spawn_with(settings, move |qs: Vec<u32>| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push(qs.len());
                qs
            }
        });
        for i in 0..10 {
            batcher.send(i).unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(batcher.call(99).await.unwrap(), 99);
        assert_eq!(*sizes.lock().unwrap(), vec![11], "one statement for requests 5 ms apart");
    }

    #[tokio::test]
    async fn send_does_not_wait() {
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        let batcher = Batcher::spawn(8, move |qs: Vec<usize>| {
            let s = s.clone();
            async move {
                s.fetch_add(qs.len(), Ordering::SeqCst);
                qs
            }
        });
        for i in 0..20 {
            batcher.send(i).unwrap();
        }
        assert_eq!(batcher.call(99).await.unwrap(), 99);
        assert_eq!(seen.load(Ordering::SeqCst), 21);
    }
}
