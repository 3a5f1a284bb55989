//! Watching the `fleet_robots` bucket: heartbeats keep robots online, expiry markers take them
//! offline.
//!
//! Each heartbeat is written with a per-message TTL equal to the heartbeat timeout; when it
//! lapses the server writes a delete marker that this watcher sees, so a robot that dies
//! silently is noticed without it saying goodbye. A staleness check in the sweeper backs this up.
//! A robot that exits gracefully deletes its key, which the watcher sees at once.
//!
//! A robot declared offline has its running attempts taken back and its jobs offered again at
//! once, rather than after their leases: nothing of it is left to renew them. Not right after an
//! outage of the leader's own, though: while the leader could not see NATS (or PostgreSQL),
//! robots could not beat either, and every heartbeat may expire together when it comes back.
//! So, as the sweeper does for leases, offline robots' jobs are only taken back once the leader
//! has been healthy for a whole heartbeat timeout (robots have beaten again by then); before
//! that, their leases decide.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::Operation;
use fleet_schemas::codec::decode;
use fleet_schemas::robot::Heartbeat;
use fleet_schemas::subjects;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::Core;

pub async fn run(core: Arc<Core>, token: CancellationToken) {
    // Robots the database believes online but that send no heartbeat within the timeout died
    // while no orchestrator was watching: reconcile them once the timeout has passed.
    let _reconcile = {
        let core = core.clone();
        let token = token.clone();
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            let suspects = match core.store.online_robots().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list robots to reconcile");
                    return;
                }
            };
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(core.config.heartbeat_timeout) => {}
            }
            for (tenant, robot) in suspects {
                let (Ok(t), Ok(r)) =
                    (fleet_schemas::TenantId::new(tenant), fleet_schemas::RobotId::new(robot))
                else {
                    continue;
                };
                if !core.fleet.is_online(&t, &r) {
                    mark_offline(&core, &t, &r, "no heartbeat since the orchestrator started").await;
                }
            }
        }))
    };
    let mut backoff = Duration::from_millis(200);
    // A recreated bucket is a new stream: the old watch may neither end nor fail, so watch anew.
    let mut recreated = core.fabric.robots_bucket_recreated();
    loop {
        recreated.mark_unchanged();
        match core.fabric.robots_kv.watch_with_history(">").await {
            Ok(mut watch) => {
                backoff = Duration::from_millis(200);
                loop {
                    let entry = tokio::select! {
                        _ = token.cancelled() => return,
                        _ = recreated.changed() => {
                            tracing::info!("watching the recreated heartbeat bucket");
                            break;
                        }
                        e = watch.next() => e,
                    };
                    match entry {
                        Some(Ok(entry)) => on_entry(&core, entry).await,
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "heartbeat watch error; re-watching");
                            break;
                        }
                        None => break,
                    }
                }
            }
            Err(e) => {
                // The bucket may be gone: ask the fabric reconciler to look.
                core.fabric.wake.notify_one();
                tracing::warn!(error = %e, "cannot watch the heartbeat bucket; retrying");
            }
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = recreated.changed() => continue,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn on_entry(core: &Core, entry: async_nats::jetstream::kv::Entry) {
    let Some((tenant, robot)) = subjects::parse_heartbeat_key(&entry.key) else {
        tracing::debug!(key = %entry.key, "ignoring heartbeat bucket key of unknown shape");
        return;
    };
    match entry.operation {
        Operation::Put => {
            let mut hb: Heartbeat = match decode("heartbeat", &entry.value) {
                Ok(hb) => hb,
                Err(e) => {
                    tracing::warn!(key = %entry.key, error = %e, "ignoring malformed heartbeat");
                    return;
                }
            };
            if hb.tenant != tenant || hb.robot_id != robot {
                tracing::warn!(key = %entry.key, "ignoring heartbeat whose body names another robot");
                return;
            }
            if !core.fleet.attest_heartbeat(&mut hb) {
                tracing::debug!(%tenant, %robot, "ignoring the heartbeat of a robot whose key was revoked");
                return;
            }
            let change = core.fleet.heartbeat(&hb);
            if change.admission {
                core.wake_admission.notify_one();
            }
            if let Some((from, to)) = change.status {
                let data = serde_json::json!({"from": from, "to": to});
                match core.store.robot_event(&tenant, &robot, "robot.status_changed", data).await {
                    Ok(()) => core.wake_relay.notify_one(),
                    Err(e) => tracing::debug!(error = %e, "status change not recorded"),
                }
            }
            let live = serde_json::json!({
                "type": "robot.heartbeat",
                "tenant": tenant,
                "robot_id": robot,
                "state": hb.state,
                "running": hb.running.len(),
                "max_jobs": hb.max_jobs,
                "cpu_percent": hb.cpu_percent,
                "memory_mb": hb.memory_mb,
            });
            let _ = core
                .client
                .publish(subjects::live(&tenant, "robot", "heartbeat"), live.to_string().into())
                .await;
            core.store.record_heartbeat(hb);
        }
        // A robot deletes its key when it exits gracefully; the server purges it on expiry.
        Operation::Delete => mark_offline(core, &tenant, &robot, "robot stopped").await,
        Operation::Purge => mark_offline(core, &tenant, &robot, "heartbeat expired").await,
    }
}

pub(crate) async fn mark_offline(
    core: &Core,
    tenant: &fleet_schemas::TenantId,
    robot: &fleet_schemas::RobotId,
    reason: &str,
) {
    take_offline(core, tenant, robot, reason, false).await
}

/// Declare a robot offline and take back its running attempts. With `now`, at once whatever the
/// leader's own health (its key was revoked: it is not coming back); otherwise as for a lapsed
/// heartbeat ([`reoffer_orphans`]).
pub(crate) async fn take_offline(
    core: &Core,
    tenant: &fleet_schemas::TenantId,
    robot: &fleet_schemas::RobotId,
    reason: &str,
    now: bool,
) {
    core.fleet.offline(tenant, robot);
    match core.store.robot_offline(tenant, robot, reason).await {
        Ok(offline) if offline || now => {
            tracing::info!(%tenant, %robot, reason, "robot offline");
            if now {
                match core.store.expire_offline(tenant, robot).await {
                    Ok(n) => {
                        tracing::info!(%robot, jobs = n, "re-offering the jobs of a robot whose key was revoked");
                        core.admission.reset();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, %robot, "could not take back the jobs of a revoked robot")
                    }
                }
            } else {
                reoffer_orphans(core, tenant, robot).await;
            }
            core.wake_relay.notify_one();
            core.wake_admission.notify_one();
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, %robot, "could not record robot offline"),
    }
}

/// Take back the running attempts of a robot just recorded offline, unless the leader has not
/// been healthy for a heartbeat timeout (see the module docs); then their leases decide.
async fn reoffer_orphans(core: &Core, tenant: &fleet_schemas::TenantId, robot: &fleet_schemas::RobotId) {
    if !core.health.healthy_for(core.config.heartbeat_timeout) {
        tracing::info!(%robot, "leader healthy for less than a heartbeat timeout: the robot's jobs wait for their leases");
        return;
    }
    match core.store.expire_offline(tenant, robot).await {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(%robot, jobs = n, "re-offering the jobs of a robot gone offline");
            // They went back to pending, ahead of jobs submitted after them.
            core.admission.reset();
        }
        Err(e) => tracing::warn!(error = %e, %robot, "could not take back the jobs of an offline robot"),
    }
}
