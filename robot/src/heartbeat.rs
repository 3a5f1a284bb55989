//! Heartbeats: the robot's entry in the `fleet_robots` KV bucket.
//!
//! Each heartbeat is a JetStream publish to the key's subject with a per-message TTL (`Nats-TTL`,
//! whole seconds, at least 1): when the robot stops beating, the entry expires and the
//! orchestrator's watcher sees it vanish (DESIGN.md, "KV expiry visible to watchers"). A beat goes
//! out every `heartbeat_interval_ms` and at once when the state changes (a command, shutdown), so
//! the orchestrator's view of paused robots follows the robot closely (free slots it tracks itself
//! from claims and completions). Capabilities and `max_jobs` are fixed for the life of the process; a change means a
//! restart, which registers and beats anew). A failed beat is logged, never fatal: the next one
//! will do.
//!
//! A robot that exits gracefully deletes its entry ([`goodbye`]) instead of letting it expire, so
//! it shows `offline` at once rather than a heartbeat timeout after it is gone.
//!
//! `metrics` holds the robot's custom metrics (see [`crate::metrics`]) plus `free_slots`, which the
//! robot computes for every beat.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use fleet_schemas::codec;
use fleet_schemas::robot::{Heartbeat, ROBOT_PROTOCOL_VERSION, RobotRunState};
use fleet_schemas::subjects;

use crate::agent::Agent;

/// Beat interval until the registration grant says otherwise.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// How long the first beat waits for the desired state to be read, so a robot started while
/// paused does not announce itself `online` first; past it the robot beats anyway (it is alive,
/// and the watcher keeps trying).
const FIRST_BEAT_WAIT: Duration = Duration::from_secs(2);
/// Time to wait for the stream's ack of one beat.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The TTL header value: whole seconds, rounded up, at least 1.
pub fn ttl(heartbeat_ttl_ms: u64) -> Duration {
    Duration::from_secs(heartbeat_ttl_ms.div_ceil(1000).max(1))
}

/// CPU use of this process between two samples, from `/proc/self/stat` (Linux only).
#[derive(Debug, Default)]
pub struct CpuSampler {
    last: Option<(Instant, u64)>,
}

/// Clock ticks per second of `/proc/self/stat` (USER_HZ, 100 on every Linux we run on).
const TICKS_PER_SECOND: f64 = 100.0;

impl CpuSampler {
    pub fn sample(&mut self) -> Option<f32> {
        let ticks = read_cpu_ticks()?;
        let now = Instant::now();
        let previous = self.last.replace((now, ticks));
        let (then, old) = previous?;
        let secs = now.duration_since(then).as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        Some((((ticks.saturating_sub(old)) as f64 / TICKS_PER_SECOND) / secs * 100.0) as f32)
    }
}

fn read_cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Resident memory of this process in MiB, from `/proc/self/status` (Linux only).
pub fn memory_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The heartbeat of the robot as it is now.
pub fn build(agent: &Agent, state: RobotRunState, cpu_percent: Option<f32>) -> Heartbeat {
    let running = agent.running_jobs();
    let free = agent.slots.available_permits();
    let mut metrics = agent.metrics.snapshot();
    metrics.insert("free_slots".to_owned(), free as f64);
    Heartbeat {
        v: ROBOT_PROTOCOL_VERSION,
        tenant: agent.config.tenant.clone(),
        robot_id: agent.robot_id.clone(),
        session_id: agent.session_id,
        name: agent.name.clone(),
        hostname: agent.hostname.clone(),
        state,
        capabilities: agent.capabilities.clone(),
        max_jobs: agent.config.max_jobs,
        running,
        cpu_percent,
        memory_mb: memory_mb(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        metrics,
        sent_at: OffsetDateTime::now_utc(),
    }
}

/// Publish one beat and wait for the stream's ack; failures are logged at warn.
pub async fn beat(agent: &Agent, state: RobotRunState, cpu: &mut CpuSampler) {
    let ttl_ms = agent.grant().map(|g| g.heartbeat_ttl_ms).unwrap_or(15_000);
    let hb = build(agent, state, cpu.sample());
    let subject = subjects::heartbeat_subject(&agent.config.tenant, &agent.robot_id);
    let publish = PublishMessage::build().ttl(ttl(ttl_ms)).payload(codec::encode(&hb).into());
    let sent = async {
        let ack = agent.js.send_publish(subject, publish).await.map_err(|e| e.to_string())?;
        ack.await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(ACK_TIMEOUT, sent).await {
        Ok(Ok(_)) => tracing::trace!("heartbeat sent"),
        Ok(Err(e)) => tracing::warn!(error = %e, "heartbeat failed"),
        Err(_) => tracing::warn!("heartbeat not acknowledged in time"),
    }
}

/// Delete the robot's entry as it exits; the orchestrator's watcher sees the delete and marks it
/// offline. A failure is logged: the entry then expires as if the robot had died.
pub async fn goodbye(agent: &Agent) {
    let key = subjects::heartbeat_key(&agent.config.tenant, &agent.robot_id);
    let deleted = async {
        let kv = agent.js.get_key_value(subjects::ROBOTS_BUCKET).await.map_err(|e| e.to_string())?;
        kv.delete(&key).await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(ACK_TIMEOUT, deleted).await {
        Ok(Ok(())) => tracing::debug!("heartbeat deleted"),
        Ok(Err(e)) => tracing::warn!(error = %e, "could not delete the heartbeat; it will expire"),
        Err(_) => tracing::warn!("heartbeat delete not acknowledged in time; it will expire"),
    }
}

/// Beat until `stop` fires: on the interval, and at once when nudged.
pub async fn heartbeat_loop(agent: Arc<Agent>, stop: CancellationToken) {
    let mut cpu = CpuSampler::default();
    let mut state = agent.state.subscribe();
    let mut known = agent.desired_known.subscribe();
    tokio::select! {
        _ = tokio::time::timeout(FIRST_BEAT_WAIT, known.wait_for(|k| *k)) => {}
        _ = stop.cancelled() => return,
    }
    loop {
        let interval = agent.grant().map(|g| Duration::from_millis(g.heartbeat_interval_ms.max(100)));
        let interval = interval.unwrap_or(DEFAULT_INTERVAL);
        let current = *state.borrow_and_update();
        beat(&agent, current, &mut cpu).await;
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = agent.heartbeat_now.notified() => {}
            _ = state.changed() => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(ttl(0), Duration::from_secs(1));
        assert_eq!(ttl(1), Duration::from_secs(1));
        assert_eq!(ttl(15_000), Duration::from_secs(15));
        assert_eq!(ttl(15_001), Duration::from_secs(16));
    }

    #[test]
    fn process_stats_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(memory_mb().is_some_and(|m| m > 0.0));
            let mut s = CpuSampler::default();
            assert_eq!(s.sample(), None, "the first sample has nothing to compare with");
            assert!(s.sample().is_some_and(|c| c >= 0.0));
        }
    }
}
