//! One active orchestrator: a lease row in PostgreSQL with an epoch.
//!
//! The instance that holds the lease is the leader and the only one that writes job state. Every
//! leader-only write carries the epoch in its own statement (`fenced()` below), so a deposed
//! leader — paused by GC, cut off from the database, or simply slow — cannot write after another
//! instance took over: its statements match no row. A standby retries the lease every third of
//! its length and takes over once it lapses.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// SQL condition true only while the lease with epoch `$N` is current. Embedded in each
/// leader-only statement, so fencing costs no extra round trip.
pub fn fenced(param: usize) -> String {
    format!("EXISTS (SELECT 1 FROM leader_lease WHERE id = 1 AND epoch = ${param} AND expires_at > now())")
}

/// This instance's view of the lease.
#[derive(Debug)]
pub struct Leadership {
    pub holder: Uuid,
    epoch: AtomicI64,
    state: watch::Sender<Option<i64>>,
}

impl Leadership {
    pub fn new() -> Arc<Self> {
        let (state, _) = watch::channel(None);
        Arc::new(Self { holder: Uuid::new_v4(), epoch: AtomicI64::new(0), state })
    }

    /// The epoch to fence writes with (0, which matches no lease, when not the leader).
    pub fn epoch(&self) -> i64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn is_leader(&self) -> bool {
        self.epoch() != 0
    }

    /// Changes of leadership: `Some(epoch)` when leading, `None` when not.
    pub fn subscribe(&self) -> watch::Receiver<Option<i64>> {
        self.state.subscribe()
    }

    fn set(&self, epoch: Option<i64>) {
        self.epoch.store(epoch.unwrap_or(0), Ordering::Release);
        self.state.send_if_modified(|cur| {
            if *cur != epoch {
                *cur = epoch;
                true
            } else {
                false
            }
        });
    }

    /// Try to take or keep the lease once. `Ok(Some(epoch))` when leading.
    async fn try_acquire(&self, pool: &PgPool, lease: Duration) -> Result<Option<i64>, sqlx::Error> {
        // Keep the epoch while our own lease is still valid; a new epoch otherwise, so writes
        // fenced with a lapsed epoch of ours fail too.
        let row: Option<(i64,)> = sqlx::query_as(
            "UPDATE leader_lease SET
                 epoch = CASE WHEN holder = $1 AND expires_at > now() THEN epoch ELSE epoch + 1 END,
                 holder = $1,
                 expires_at = now() + make_interval(secs => $2)
             WHERE id = 1 AND (holder = $1 OR holder IS NULL OR expires_at <= now())
             RETURNING epoch",
        )
        .bind(self.holder)
        .bind(lease.as_secs_f64())
        .fetch_optional(pool)
        .await?;
        Ok(row.map(|r| r.0))
    }

    /// Give the lease up (clean shutdown), so a standby takes over at once.
    pub async fn resign(&self, pool: &PgPool) {
        let epoch = self.epoch();
        self.set(None);
        if epoch != 0 {
            let _ = sqlx::query("UPDATE leader_lease SET expires_at = now() WHERE id = 1 AND epoch = $1")
                .bind(epoch)
                .execute(pool)
                .await;
        }
    }
}

/// Keep trying to lead until `shutdown`. Steps down when the lease cannot be renewed before
/// it would lapse (with a margin), since another instance may then take it.
pub async fn run(leadership: Arc<Leadership>, pool: PgPool, lease: Duration, shutdown: CancellationToken) {
    let tick = lease / 3;
    // Stop acting as leader a little before the lease lapses in the database, so two leaders
    // never overlap even with some clock drift between us and PostgreSQL.
    let margin = lease / 5;
    let mut valid_until: Option<Instant> = None;
    loop {
        let started = Instant::now();
        let attempt = tokio::time::timeout(tick, leadership.try_acquire(&pool, lease)).await;
        match attempt.unwrap_or_else(|_| Err(sqlx::Error::PoolTimedOut)) {
            Ok(Some(epoch)) => {
                if leadership.epoch() != epoch {
                    tracing::info!(epoch, holder = %leadership.holder, "leading");
                }
                valid_until = Some(started + lease - margin);
                leadership.set(Some(epoch));
            }
            Ok(None) => {
                if leadership.is_leader() {
                    tracing::warn!("lease taken by another orchestrator; standing by");
                }
                valid_until = None;
                leadership.set(None);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach PostgreSQL to renew the leader lease");
                if valid_until.is_some_and(|v| Instant::now() >= v) {
                    tracing::warn!("leader lease lapsed while PostgreSQL was unreachable; standing by");
                    valid_until = None;
                    leadership.set(None);
                }
            }
        }
        let next = match valid_until {
            Some(v) => (started + tick).min(v),
            None => started + tick,
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(next) => {}
        }
    }
    leadership.resign(&pool).await;
}
