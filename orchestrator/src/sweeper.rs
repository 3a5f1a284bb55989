//! The leader's reconcilers: admission of pending jobs, expiry of lapsed leases, timeouts, the
//! offer watchdog and stale robots. Each pass looks at the record and moves it one step toward
//! what it should be; every step is a compare-and-set, so running a pass twice is harmless.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_schemas::{Class, JobId, RobotId, TenantId};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Core;
use crate::fleet::Decision;
use crate::store::ToOffer;

/// Pending jobs looked at per admission pass.
const ADMIT_BATCH: i64 = 500;

/// Since when the leader has had both PostgreSQL and NATS. Leases are only expired after a full
/// lease period of health, so an outage (during which robots cannot renew) does not make the
/// whole fleet's work expire the moment it ends.
#[derive(Default)]
pub struct Health {
    since: Mutex<Option<Instant>>,
}

impl Health {
    pub fn reset(&self) {
        *self.since.lock().expect("not poisoned") = None;
    }

    fn observe(&self, healthy: bool) {
        let mut since = self.since.lock().expect("not poisoned");
        match (healthy, *since) {
            (true, None) => *since = Some(Instant::now()),
            (false, _) => *since = None,
            _ => {}
        }
    }

    fn healthy_for(&self, d: Duration) -> bool {
        self.since.lock().expect("not poisoned").is_some_and(|s| s.elapsed() >= d)
    }
}

pub async fn run(core: Arc<Core>, token: CancellationToken) {
    // Offers a previous leader may have committed but not published.
    republish_unrecorded(&core).await;
    let mut last_watchdog = Instant::now();
    loop {
        let db_ok = sqlx::query("SELECT 1").execute(&core.store.pool).await.is_ok();
        let nats_ok = core.client.connection_state() == async_nats::connection::State::Connected;
        core.health.observe(db_ok && nats_ok);
        if db_ok && nats_ok {
            pass(&core).await;
            if last_watchdog.elapsed() >= watchdog_interval(&core) {
                last_watchdog = Instant::now();
                watchdog(&core).await;
            }
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = core.wake_admission.notified() => {}
            _ = tokio::time::sleep(core.config.sweep_interval) => {}
        }
    }
}

fn watchdog_interval(core: &Core) -> Duration {
    (core.config.offer_check_after / 2).max(Duration::from_millis(200))
}

async fn pass(core: &Core) {
    if core.health.healthy_for(core.config.job_lease) {
        match core.store.expire(None).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(jobs = n, "expired lapsed leases");
                core.wake_relay.notify_one();
            }
            Err(e) => tracing::warn!(error = %e, "lease sweep failed"),
        }
    }
    match core.store.time_out().await {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(jobs = n, "jobs timed out");
            core.wake_relay.notify_one();
        }
        Err(e) => tracing::warn!(error = %e, "timeout sweep failed"),
    }
    // Backstop for a missed expiry marker: a robot silent for the timeout plus two intervals.
    let grace = core.config.heartbeat_timeout + core.config.heartbeat_interval * 2;
    for (tenant, robot) in core.fleet.stale(grace) {
        crate::heartbeats::mark_offline(core, &tenant, &robot, "no heartbeat within the timeout").await;
    }
    admit_pending(core).await;
}

/// Offer pending jobs, highest priority first, where a robot can take them; record why the
/// others wait.
async fn admit_pending(core: &Core) {
    let pending = match core.store.pending_jobs(ADMIT_BATCH).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list pending jobs");
            return;
        }
    };
    let mut reasons = Vec::new();
    for job in pending {
        let (Ok(tenant), Ok(requires)) = (TenantId::new(job.tenant.as_str()), Class::parse(&job.requires))
        else {
            tracing::error!(job_id = %job.job_id, "pending job with an invalid tenant or capabilities");
            continue;
        };
        let target = job.target_robot_id.as_deref().and_then(|r| RobotId::new(r).ok());
        match core.fleet.decide(&tenant, &requires, target.as_ref()) {
            Decision::Offer { subject, target: to, class } => {
                let ensured = match (&class, &target) {
                    (Some(class), _) => core.fabric.ensure_class_consumer(&tenant, class).await.map(|_| ()),
                    (None, Some(robot)) => {
                        core.fabric.ensure_robot_consumer(&tenant, robot).await.map(|_| ())
                    }
                    (None, None) => Ok(()),
                };
                if let Err(e) = ensured {
                    tracing::warn!(error = %e, "consumer not ready");
                    continue;
                }
                match core.store.admit(JobId(job.job_id), &subject, &to).await {
                    Ok(Some(offer)) => {
                        core.wake_relay.notify_one();
                        core.offers.publish_or_log(&offer).await;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "admission failed");
                        return;
                    }
                }
            }
            Decision::Wait { reason } => {
                if job.waiting_reason.as_deref() != Some(reason.as_str()) {
                    reasons.push((job.job_id, reason));
                }
            }
        }
    }
    if let Err(e) = core.store.set_waiting_reasons(&reasons).await {
        tracing::warn!(error = %e, "cannot record waiting reasons");
    }
}

/// Check offers queued for long: one whose message vanished (terminated by mistake, lost with
/// a consumer) is recalled and admitted again; one never recorded is published again.
async fn watchdog(core: &Core) {
    let stale = match core.store.stale_offers(core.config.offer_check_after, 200).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "offer watchdog cannot list queued jobs");
            return;
        }
    };
    for (job_id, offer_no, subject, seq) in stale {
        match seq {
            Some(seq) => {
                if core.fabric.jobs.get_raw_message(seq as u64).await.is_err()
                    && let Ok(true) = core.store.recall(job_id, offer_no, "offer message vanished").await
                {
                    tracing::warn!(%job_id, offer_no, "offer vanished from the stream; re-admitting");
                    core.wake_relay.notify_one();
                    core.wake_admission.notify_one();
                }
            }
            None => core.offers.publish_or_log(&ToOffer { job_id, offer_no, subject }).await,
        }
    }
}

async fn republish_unrecorded(core: &Core) {
    match core.store.unrecorded_offers(10_000).await {
        Ok(offers) => {
            if !offers.is_empty() {
                tracing::info!(
                    count = offers.len(),
                    "publishing offers of queued jobs without a recorded offer"
                );
            }
            for offer in offers {
                core.offers.publish_or_log(&offer).await;
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot list unrecorded offers"),
    }
}
