//! Simulated robots: registered like real ones, heartbeating into the `fleet_robots` bucket as
//! `robot/src/heartbeat.rs` does (a MessagePack `Heartbeat` published to the key's subject with a
//! per-message TTL), but many per NATS connection and without pulling offers, so thousands fit
//! in one process. Their capabilities (`sim`) keep jobs that require `bench` away from them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream::{self, message::PublishMessage};
use fleet_schemas::codec::{decode, encode};
use fleet_schemas::robot::{
    Heartbeat, ROBOT_PROTOCOL_VERSION, RegisterGrant, RegisterRequest, RobotReply, RobotRunState,
};
use fleet_schemas::subjects::{self, RobotVerb};
use fleet_schemas::{RobotId, SessionId, TenantId};
use futures::StreamExt;
use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::report::Recorder;

/// Capabilities of every simulated robot.
pub const SIM_CAPABILITIES: [&str; 1] = ["sim"];

#[derive(Clone)]
pub struct SimRobot {
    pub id: RobotId,
    pub session: SessionId,
}

/// Shared state of the heartbeat drivers.
struct Shared {
    tenant: TenantId,
    robots: Vec<SimRobot>,
    stopped: Vec<AtomicBool>,
    /// When each robot last sent a beat (for the watch lag).
    sent: Mutex<HashMap<String, Instant>>,
    beats: AtomicU64,
    failures: AtomicU64,
}

pub struct SimFleet {
    shared: Arc<Shared>,
    token: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    clients: Vec<async_nats::Client>,
}

fn heartbeat(tenant: &TenantId, robot: &SimRobot) -> Heartbeat {
    Heartbeat {
        v: ROBOT_PROTOCOL_VERSION,
        tenant: tenant.clone(),
        robot_id: robot.id.clone(),
        session_id: robot.session,
        name: robot.id.to_string(),
        hostname: "bench".into(),
        state: RobotRunState::Online,
        capabilities: SIM_CAPABILITIES.iter().map(|s| (*s).to_owned()).collect(),
        max_jobs: 1,
        running: Vec::new(),
        cpu_percent: Some(0.5),
        memory_mb: Some(12.0),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        metrics: BTreeMap::from([("free_slots".to_owned(), 1.0)]),
        sent_at: OffsetDateTime::now_utc(),
    }
}

/// Register one robot with the `register` robot request.
async fn register_one(
    client: &async_nats::Client,
    tenant: &TenantId,
    robot: &SimRobot,
) -> anyhow::Result<()> {
    let req = RegisterRequest {
        v: ROBOT_PROTOCOL_VERSION,
        session_id: robot.session,
        name: robot.id.to_string(),
        hostname: "bench".into(),
        capabilities: SIM_CAPABILITIES.iter().map(|s| (*s).to_owned()).collect(),
        max_jobs: 1,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        environment: "bench".into(),
        tags: Vec::new(),
        state_dir_id: robot.session.to_string(),
    };
    let subject = subjects::robot_request(tenant, &robot.id, RobotVerb::Register);
    let request = async_nats::client::Request::new()
        .payload(encode(&req).into())
        .timeout(Some(crate::stack::REQUEST_TIMEOUT));
    let reply = client.send_request(subject, request).await.context("register request")?;
    match decode::<RobotReply<RegisterGrant>>("register reply", &reply.payload)? {
        RobotReply::Accepted(_) => Ok(()),
        RobotReply::Refused { reason } => bail!("registration of {} refused: {reason}", robot.id),
        RobotReply::Unavailable { reason } => bail!("registration of {} unavailable: {reason}", robot.id),
    }
}

impl SimFleet {
    /// Register `count` robots named `<prefix>-<i>`, `concurrency` at a time. Returns the fleet
    /// of the robots that registered, each registration's latency, and the refusals (one line
    /// each; the fleet goes on without those robots so a run can still measure the rest).
    pub async fn register(
        client: &async_nats::Client,
        tenant: &TenantId,
        prefix: &str,
        count: usize,
        concurrency: usize,
    ) -> anyhow::Result<(SimFleet, Recorder, Vec<String>)> {
        let robots: Vec<SimRobot> = (0..count)
            .map(|i| Ok(SimRobot { id: RobotId::new(format!("{prefix}-{i}"))?, session: SessionId::new() }))
            .collect::<anyhow::Result<_>>()?;
        let latency = Recorder::default();
        let results: Vec<(SimRobot, anyhow::Result<()>)> = futures::stream::iter(robots)
            .map(|robot| {
                let latency = latency.clone();
                async move {
                    let started = Instant::now();
                    let r = register_one(client, tenant, &robot).await;
                    latency.record(started.elapsed());
                    (robot, r)
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        let mut robots = Vec::new();
        let mut failed = Vec::new();
        for (robot, r) in results {
            match r {
                Ok(()) => robots.push(robot),
                Err(e) => failed.push(format!("{e:#}")),
            }
        }
        if robots.is_empty() && count > 0 {
            bail!("all {count} registrations failed, e.g. {}", failed[0]);
        }
        let shared = Arc::new(Shared {
            tenant: tenant.clone(),
            stopped: robots.iter().map(|_| AtomicBool::new(false)).collect(),
            robots,
            sent: Mutex::new(HashMap::new()),
            beats: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        });
        let fleet =
            SimFleet { shared, token: CancellationToken::new(), tasks: Vec::new(), clients: Vec::new() };
        Ok((fleet, latency, failed))
    }

    pub fn len(&self) -> usize {
        self.shared.robots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shared.robots.is_empty()
    }

    /// Heartbeats acknowledged by the stream so far.
    pub fn beats(&self) -> u64 {
        self.shared.beats.load(Ordering::Relaxed)
    }

    /// Heartbeats the stream did not acknowledge.
    pub fn failures(&self) -> u64 {
        self.shared.failures.load(Ordering::Relaxed)
    }

    /// Beat every `interval` with `ttl`, the robots spread evenly over the interval and over
    /// `connections` NATS connections.
    /// The simulated robots share a few connections, so they connect with the orchestrator's
    /// credentials (one robot identity per connection is what real robots get).
    pub async fn start_heartbeats(
        &mut self,
        nats: &fleet_testkit::NatsServer,
        connections: usize,
        interval: Duration,
        ttl: Duration,
    ) -> anyhow::Result<()> {
        let connections = connections.max(1);
        let start = Instant::now();
        for c in 0..connections {
            let client = nats.client().await?;
            let js = jetstream::new(client.clone());
            self.clients.push(client);
            let mine: Vec<usize> = (c..self.len()).step_by(connections).collect();
            let (shared, token) = (self.shared.clone(), self.token.clone());
            self.tasks.push(tokio::spawn(beat_loop(js, shared, mine, start, interval, ttl, token)));
        }
        Ok(())
    }

    /// Stop the robots `range` (their last beat goes out now with `ttl`, then no more). Returns
    /// when the stream has acknowledged all last beats, with the time they were sent.
    pub async fn stop_robots(&self, range: std::ops::Range<usize>, ttl: Duration) -> anyhow::Result<Instant> {
        let client = self.clients.first().context("heartbeats not started")?;
        let js = jetstream::new(client.clone());
        for i in range.clone() {
            self.shared.stopped[i].store(true, Ordering::Relaxed);
        }
        let t0 = Instant::now();
        let mut acks = Vec::new();
        for i in range {
            let hb = heartbeat(&self.shared.tenant, &self.shared.robots[i]);
            let subject = subjects::heartbeat_subject(&self.shared.tenant, &hb.robot_id);
            let publish = PublishMessage::build().ttl(ttl).payload(encode(&hb).into());
            acks.push(js.send_publish(subject, publish).await?);
        }
        for ack in acks {
            ack.await.context("last heartbeat not stored")?;
        }
        Ok(t0)
    }

    /// Record, in `lag`, the time from each beat to the orchestrator's live heartbeat event for
    /// it (published after it recorded the beat) while `measuring` is set.
    pub async fn watch_lag(
        &self,
        client: &async_nats::Client,
        lag: Recorder,
        measuring: Arc<AtomicBool>,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let mut sub = client.subscribe(subjects::live(&self.shared.tenant, "robot", "heartbeat")).await?;
        client.flush().await?;
        let (shared, token) = (self.shared.clone(), self.token.clone());
        Ok(tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = token.cancelled() => return,
                    m = sub.next() => match m { Some(m) => m, None => return },
                };
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&msg.payload) else { continue };
                let Some(robot) = v["robot_id"].as_str() else { continue };
                let sent = shared.sent.lock().expect("not poisoned").get(robot).copied();
                if let Some(sent) = sent {
                    lag.record(sent.elapsed());
                }
            }
        }))
    }

    pub async fn stop(mut self) {
        self.token.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        for client in self.clients.drain(..) {
            let _ = client.drain().await;
        }
    }
}

async fn beat_loop(
    js: jetstream::Context,
    shared: Arc<Shared>,
    mine: Vec<usize>,
    start: Instant,
    interval: Duration,
    ttl: Duration,
    token: CancellationToken,
) {
    let total = shared.robots.len().max(1) as f64;
    let mut round: u32 = 0;
    loop {
        for &i in &mine {
            let at = start + interval * round + interval.mul_f64(i as f64 / total);
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = token.cancelled() => return,
            }
            if shared.stopped[i].load(Ordering::Relaxed) {
                continue;
            }
            let robot = &shared.robots[i];
            let hb = heartbeat(&shared.tenant, robot);
            let subject = subjects::heartbeat_subject(&shared.tenant, &robot.id);
            let publish = PublishMessage::build().ttl(ttl).payload(encode(&hb).into());
            shared.sent.lock().expect("not poisoned").insert(robot.id.to_string(), Instant::now());
            match js.send_publish(subject, publish).await {
                Ok(ack) => {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        match ack.await {
                            Ok(_) => shared.beats.fetch_add(1, Ordering::Relaxed),
                            Err(_) => shared.failures.fetch_add(1, Ordering::Relaxed),
                        };
                    });
                }
                Err(_) => {
                    shared.failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        round += 1;
    }
}
