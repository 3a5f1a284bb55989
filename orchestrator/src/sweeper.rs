//! The leader's reconcilers: admission of pending jobs, expiry of lapsed leases, timeouts, the
//! offer watchdog and stale robots. Each pass looks at the record and moves it one step toward
//! what it should be; every step is a compare-and-set, so running a pass twice is harmless.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_schemas::{Class, JobId, RobotId, TenantId};
use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Core;
use crate::fleet::{Decision, Placing};
use crate::store::ToOffer;

/// Pending jobs read per admission round; a round whose jobs were all offered is followed by
/// another. Small, because under load a round runs once per freed slot.
const ADMIT_BATCH: i64 = 64;
/// How often the bookkeeping is rebuilt from the database when nothing else triggers it.
const RELOAD_EVERY: Duration = Duration::from_secs(5);
/// Longest time waiting reasons go unrefreshed while no robot has room.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

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

    pub fn healthy_for(&self, d: Duration) -> bool {
        self.since.lock().expect("not poisoned").is_some_and(|s| s.elapsed() >= d)
    }
}

/// A pending job's place in admission order: priority (highest first), then submission time,
/// then id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingKey {
    pub priority: i16,
    pub created_at: OffsetDateTime,
    pub job_id: Uuid,
}

impl PendingKey {
    fn order(&self) -> (std::cmp::Reverse<i16>, OffsetDateTime, Uuid) {
        (std::cmp::Reverse(self.priority), self.created_at, self.job_id)
    }
}

/// Where the next admission round starts reading pending jobs.
///
/// Under a backlog, admission runs once per freed slot, and the front of the pending index is
/// full of entries of jobs already admitted (dead until vacuum), which every round read again
/// (fleet-bench: over a thousand index entries per job). The cursor skips them: everything
/// before it was admitted. Any job that may become pending *before* it (released, rejected,
/// expired, retried, recalled, or submitted with a higher priority) resets it; so does the
/// periodic reload, as a backstop.
#[derive(Debug, Default)]
pub struct AdmissionCursor {
    state: Mutex<(u64, Option<PendingKey>)>,
    /// The generation and time of the last full pass.
    last_pass: Mutex<Option<(u64, Instant)>>,
    /// When queue positions in waiting reasons were last written.
    positions_at: Mutex<Option<Instant>>,
}

impl AdmissionCursor {
    /// Read from the front again.
    pub fn reset(&self) {
        let mut state = self.state.lock().expect("not poisoned");
        state.0 += 1;
        state.1 = None;
    }

    /// A submission went pending: reset if it sorts before the cursor.
    pub fn pending_added(&self, key: PendingKey) {
        let before = self.state.lock().expect("not poisoned").1.is_some_and(|c| key.order() < c.order());
        if before {
            self.reset();
        }
    }

    /// Nothing went pending ahead of the queue since a pass less than `REFRESH_EVERY` ago, so
    /// a pass may be skipped when no robot has room.
    fn recently_passed(&self) -> bool {
        let generation = self.state.lock().expect("not poisoned").0;
        self.last_pass
            .lock()
            .expect("not poisoned")
            .is_some_and(|(g, at)| g == generation && at.elapsed() < REFRESH_EVERY)
    }

    fn positions_due(&self) -> bool {
        self.positions_at.lock().expect("not poisoned").is_none_or(|at| at.elapsed() >= REFRESH_EVERY)
    }

    fn positions_written(&self) {
        *self.positions_at.lock().expect("not poisoned") = Some(Instant::now());
    }

    fn passed(&self, generation: u64) {
        *self.last_pass.lock().expect("not poisoned") = Some((generation, Instant::now()));
    }

    fn begin(&self) -> (u64, Option<PendingKey>) {
        *self.state.lock().expect("not poisoned")
    }

    /// Move the cursor, unless it was reset since the round began (the round may have read
    /// past a job that went pending meanwhile).
    fn advance(&self, generation: u64, key: Option<PendingKey>) {
        let mut state = self.state.lock().expect("not poisoned");
        if state.0 == generation {
            state.1 = key;
        }
    }
}

pub async fn run(core: Arc<Core>, token: CancellationToken) {
    // Offers a previous leader may have committed but not published.
    republish_unrecorded(&core).await;
    reload(&core).await;
    let mut last_watchdog = Instant::now();
    let mut last_reload = Instant::now();
    let mut last_sweep: Option<Instant> = None;
    let mut healthy = false;
    loop {
        // Sweeps run on the timer; admission runs on every wake (a slot freed, a robot came,
        // a job went pending), which under load is once per completion, so it must stay cheap.
        if last_sweep.is_none_or(|at| at.elapsed() >= core.config.sweep_interval) {
            last_sweep = Some(Instant::now());
            let db_ok = sqlx::query("SELECT 1").execute(&core.store.pool).await.is_ok();
            let nats_ok = core.client.connection_state() == async_nats::connection::State::Connected;
            healthy = db_ok && nats_ok;
            core.health.observe(healthy);
            if healthy {
                sweep(&core).await;
                if last_reload.elapsed() >= RELOAD_EVERY {
                    last_reload = Instant::now();
                    reload(&core).await;
                }
                if last_watchdog.elapsed() >= watchdog_interval(&core) {
                    last_watchdog = Instant::now();
                    watchdog(&core).await;
                }
            }
        }
        if healthy {
            admit_pending(&core).await;
        }
        let until_sweep =
            core.config.sweep_interval.saturating_sub(last_sweep.map_or(Duration::ZERO, |at| at.elapsed()));
        tokio::select! {
            _ = token.cancelled() => return,
            _ = core.wake_admission.notified() => {}
            _ = tokio::time::sleep(until_sweep) => {}
        }
    }
}

fn watchdog_interval(core: &Core) -> Duration {
    (core.config.offer_check_after / 2).max(Duration::from_millis(200))
}

/// Expire lapsed leases, time jobs out, and mark silent robots offline.
async fn sweep(core: &Core) {
    if core.health.healthy_for(core.config.job_lease) {
        match core.store.expire(None).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(jobs = n, "expired lapsed leases");
                reload(core).await;
                core.wake_relay.notify_one();
            }
            Err(e) => tracing::warn!(error = %e, "lease sweep failed"),
        }
    }
    match core.store.time_out().await {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(jobs = n, "jobs timed out");
            reload(core).await;
            core.wake_relay.notify_one();
        }
        Err(e) => tracing::warn!(error = %e, "timeout sweep failed"),
    }
    // Backstop for a missed expiry marker: a robot silent for the timeout plus two intervals.
    let grace = core.config.heartbeat_timeout + core.config.heartbeat_interval * 2;
    for (tenant, robot) in core.fleet.stale(grace) {
        crate::heartbeats::mark_offline(core, &tenant, &robot, "no heartbeat within the timeout").await;
    }
    // Robot keys that expired (or were revoked through another instance) since the last sweep.
    crate::keys::revoke_lapsed(core).await;
}

/// Offer pending jobs, highest priority first, where a robot can take them; record why the
/// others wait; fail those every eligible robot rejected.
async fn admit_pending(core: &Core) {
    // Under a backlog most wakes (a claim, a heartbeat) free nothing: skip reading the queue
    // then, but still refresh waiting reasons now and then.
    if core.admission.recently_passed() && !core.fleet.has_room() {
        return;
    }
    let generation = core.admission.begin().0;
    // Bounded: a full batch that was all offered means more may fit; stop at the first batch
    // in which something had to wait (the rest wait behind it).
    for _ in 0..64 {
        if !admit_round(core).await {
            break;
        }
    }
    core.admission.passed(generation);
}

/// A waiting reason without its queue position.
fn reason_kind(reason: &str) -> &str {
    reason.split(" (position ").next().unwrap_or(reason)
}

/// One round; true when a full batch was read and every job in it was offered or failed.
async fn admit_round(core: &Core) -> bool {
    let (generation, from) = core.admission.begin();
    let positions_due = core.admission.positions_due();
    let pending = match core.store.pending_jobs(from.as_ref(), ADMIT_BATCH).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list pending jobs");
            return false;
        }
    };
    let full = pending.len() as i64 == ADMIT_BATCH;
    // The next round starts at the first job this one leaves pending (or at its last job).
    let mut next_from: Option<PendingKey> = None;
    let mut last: Option<PendingKey> = None;
    core.fleet.begin_pass();
    let mut reasons = Vec::new();
    let mut waiting: HashMap<TenantId, u32> = HashMap::new();
    // Offers decided this round, admitted together in one statement below.
    let mut admits: Vec<(JobId, String, String)> = Vec::new();
    let mut admitted_in: Vec<TenantId> = Vec::new();
    // Waiting jobs that outrank offers on a class they could run on: (tenant, priority, subjects).
    let mut outranking: Vec<(TenantId, i16, Vec<String>)> = Vec::new();
    for job in pending {
        let key = PendingKey { priority: job.priority, created_at: job.created_at, job_id: job.job_id };
        last = Some(key);
        let (Ok(tenant), Ok(requires)) = (TenantId::new(job.tenant.as_str()), Class::parse(&job.requires))
        else {
            tracing::error!(job_id = %job.job_id, "pending job with an invalid tenant or capabilities");
            next_from.get_or_insert(key);
            continue;
        };
        let target = job.target_robot_id.as_deref().and_then(|r| RobotId::new(r).ok());
        let rejected: Vec<(String, String)> =
            job.rejections.0.iter().map(|r| (r.robot_id.clone(), r.reason.clone())).collect();
        let position = waiting.get(&tenant).copied().unwrap_or(0) + 1;
        let placing =
            Placing { tenant: &tenant, requires: &requires, target: target.as_ref(), rejected: &rejected };
        // Queue behind jobs of this pass that wait for a class: its offers, prefetch included,
        // stay the head of the priority order (fleet.rs, "Strict priority").
        match core.fleet.reserve(&placing, position, true) {
            Decision::Offer { subject, target: to, class, robot } => {
                core.fleet.offered_priority(&tenant, &subject, job.priority);
                if let Err(e) =
                    crate::api::ensure_consumer(core, &tenant, class.as_ref(), robot.as_ref()).await
                {
                    tracing::warn!(error = %e, "consumer not ready");
                    core.fleet.unoffered(&tenant, &subject);
                    next_from.get_or_insert(key);
                    continue;
                }
                admits.push((JobId(job.job_id), subject, to));
                admitted_in.push(tenant);
            }
            Decision::Wait { reason } => {
                next_from.get_or_insert(key);
                if target.is_none() && rejected.is_empty() {
                    let subjects = core.fleet.outranked(&tenant, &requires, job.priority);
                    if !subjects.is_empty() {
                        outranking.push((tenant.clone(), job.priority, subjects));
                    }
                }
                *waiting.entry(tenant).or_default() += 1;
                // A new kind of reason is recorded at once; a new queue position only on the
                // periodic refresh (it changes for every waiting job whenever one starts).
                let old = job.waiting_reason.as_deref();
                if old.map(reason_kind) != Some(reason_kind(&reason))
                    || (positions_due && old != Some(&reason))
                {
                    reasons.push((job.job_id, reason));
                }
            }
            Decision::Fail { reason } => {
                match core.store.fail_pending(JobId(job.job_id), &reason, "rejected").await {
                    Ok(_) => core.wake_relay.notify_one(),
                    Err(e) => {
                        next_from.get_or_insert(key);
                        tracing::warn!(error = %e, "could not fail a rejected job");
                    }
                }
            }
        }
    }
    let mut ok = true;
    match core.store.admit(&admits).await {
        Ok(offers) => {
            let moved_jobs: HashSet<JobId> = offers.iter().map(|o| o.job_id).collect();
            // A job that was not pending any more (cancelled meanwhile) gives its place back.
            for ((job_id, subject, _), tenant) in admits.iter().zip(&admitted_in) {
                if !moved_jobs.contains(job_id) {
                    core.fleet.unoffered(tenant, subject);
                }
            }
            core.admission.advance(generation, next_from.or(last).or(from));
            if !offers.is_empty() {
                core.wake_relay.notify_one();
                futures::future::join_all(offers.iter().map(|o| core.offers.publish_or_log(o))).await;
            }
        }
        Err(e) => {
            for ((_, subject, _), tenant) in admits.iter().zip(&admitted_in) {
                core.fleet.unoffered(tenant, subject);
            }
            tracing::warn!(error = %e, "admission failed");
            ok = false;
        }
    }
    match core.store.set_waiting_reasons(&reasons).await {
        Ok(()) if positions_due => core.admission.positions_written(),
        Ok(()) => {}
        Err(e) => tracing::warn!(error = %e, "cannot record waiting reasons"),
    }
    if !outranking.is_empty() {
        recall_outranked(core, outranking).await;
    }
    ok && full && waiting.is_empty()
}

/// Recall the unclaimed offers that waiting jobs outrank, so the next round offers those jobs
/// first and the recalled ones behind them (a class consumer delivers in stream order). A
/// robot that already fetched a recalled offer is refused at claim and pulls again.
///
/// Ties stay first come, first served: only a strictly higher priority recalls.
async fn recall_outranked(core: &Core, outranking: Vec<(TenantId, i16, Vec<String>)>) {
    // Per tenant and subject, the highest priority waiting for it.
    let mut wanted: HashMap<TenantId, HashMap<String, i16>> = HashMap::new();
    for (tenant, priority, subjects) in outranking {
        let per_subject = wanted.entry(tenant).or_default();
        for subject in subjects {
            let p = per_subject.entry(subject).or_insert(priority);
            *p = (*p).max(priority);
        }
    }
    let mut recalled = 0usize;
    for (tenant, per_subject) in wanted {
        let subjects: Vec<String> = per_subject.keys().cloned().collect();
        let offers = match core.store.queued_offers_on(&tenant, &subjects).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list offers to recall");
                continue;
            }
        };
        let mut lowest_left: HashMap<&str, i16> = HashMap::new();
        for queued in &offers {
            let subject = queued.offer.subject.as_str();
            let outranked = per_subject.get(subject).is_some_and(|p| queued.priority < *p);
            let gone = outranked
                && match core
                    .store
                    .recall(queued.offer.job_id, queued.offer.offer_no, "outranked by a waiting job")
                    .await
                {
                    Ok(gone) => gone,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot recall an outranked offer");
                        false
                    }
                };
            if gone {
                recalled += 1;
                core.fleet.unoffered(&tenant, subject);
                // Not recorded yet: the robot that gets the message is refused its claim.
                if let Some(seq) = queued.seq {
                    core.offers.delete(&core.fabric.jobs, seq).await;
                }
            } else {
                let p = lowest_left.entry(subject).or_insert(queued.priority);
                *p = (*p).min(queued.priority);
            }
        }
        // What is left is now known: no look at the database again until a lower offer comes.
        for subject in &subjects {
            core.fleet.set_lowest(&tenant, subject, lowest_left.get(subject.as_str()).copied());
        }
    }
    if recalled > 0 {
        tracing::debug!(offers = recalled, "recalled offers outranked by waiting jobs");
        // The recalled jobs are pending again, ahead of the cursor.
        core.admission.reset();
        core.wake_admission.notify_one();
        core.wake_relay.notify_one();
    }
}

/// Rebuild the leader's bookkeeping (running jobs per robot, waiting offers per subject) from
/// the database, correcting any drift.
pub(crate) async fn reload(core: &Core) {
    core.admission.reset();
    match core.store.snapshot().await {
        Ok(snap) => core.fleet.reload(&snap),
        Err(e) => tracing::warn!(error = %e, "cannot reload the fleet bookkeeping"),
    }
    crate::keys::reload_grants(core).await;
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
                if !core.offers.holds(&core.fabric.jobs, seq as u64, job_id, offer_no).await
                    && let Ok(true) = core.store.recall(job_id, offer_no, "offer message vanished").await
                {
                    reload(core).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(priority: i16, at_ms: i64, id: u128) -> PendingKey {
        PendingKey {
            priority,
            created_at: OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000).unwrap(),
            job_id: Uuid::from_u128(id),
        }
    }

    #[test]
    fn the_cursor_resets_for_jobs_ahead_of_it_and_not_for_jobs_behind() {
        let cursor = AdmissionCursor::default();
        let (generation, from) = cursor.begin();
        assert_eq!(from, None);
        cursor.advance(generation, Some(key(10, 1_000, 5)));
        assert_eq!(cursor.begin().1, Some(key(10, 1_000, 5)));
        // Behind it: later, or lower priority, or the same time and a larger id.
        for behind in [key(10, 2_000, 1), key(5, 0, 0), key(10, 1_000, 6)] {
            cursor.pending_added(behind);
            assert_eq!(cursor.begin().1, Some(key(10, 1_000, 5)), "{behind:?}");
        }
        // Ahead of it: a higher priority.
        cursor.pending_added(key(20, 9_000, 9));
        assert_eq!(cursor.begin().1, None);
    }

    #[test]
    fn a_round_that_raced_a_reset_does_not_move_the_cursor() {
        let cursor = AdmissionCursor::default();
        let (generation, _) = cursor.begin();
        // A job went back to pending while the round was reading.
        cursor.reset();
        cursor.advance(generation, Some(key(10, 1_000, 5)));
        assert_eq!(cursor.begin().1, None, "the round may have read past the job");
        assert!(!cursor.recently_passed());
        let (generation, _) = cursor.begin();
        cursor.passed(generation);
        assert!(cursor.recently_passed());
        cursor.reset();
        assert!(!cursor.recently_passed(), "a reset asks for a pass");
    }

    #[test]
    fn reasons_compare_without_their_queue_position() {
        assert_eq!(
            reason_kind("all 2 eligible robots busy (position 4 in queue)"),
            reason_kind("all 2 eligible robots busy (position 17 in queue)")
        );
        assert_ne!(
            reason_kind("all 2 eligible robots busy (position 4 in queue)"),
            reason_kind("no online robot of tenant acme")
        );
    }
}
