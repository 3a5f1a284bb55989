//! `fleet-scale`: many simulated robots heartbeating into `fleet_robots`, multiplexed over a few
//! NATS connections (see [`crate::sim`]).
//!
//! 1. Register every robot with the `register` request (each gets its robot consumer created).
//! 2. Beat every `interval`, spread evenly; after one warm-up interval, measure an idle window:
//!    CPU of the orchestrator (its runtime's threads), nats-server and PostgreSQL per heartbeat
//!    and as a share of a core, and the watch lag (beat published → the orchestrator's live
//!    heartbeat event, which it publishes after recording the beat).
//! 3. Stop `offline` robots: their last beat goes out with a short TTL (`offline_ttl`), and the
//!    run times how long until `GET /api/v1/metrics/fleet` counts them offline, and when each
//!    one's `robot.disconnected` event arrives.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use serde::Serialize;
use tokio::time::Instant;

use super::{Common, meter};
use crate::procfs;
use crate::report::{Recorder, Report};
use crate::sim::SimFleet;
use crate::stack::Stack;

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct FleetScaleParams {
    /// Simulated robots (the figure is 10,000).
    #[arg(long, default_value_t = 2000)]
    pub robots: usize,
    /// NATS connections the simulated robots share.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Heartbeat interval.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "super::as_secs")]
    pub interval: Duration,
    /// Heartbeat TTL of steady robots (the orchestrator's heartbeat timeout).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "super::as_secs")]
    pub ttl: Duration,
    /// Length of the measured idle window.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "super::as_secs")]
    pub idle: Duration,
    /// Robots that go offline at the end.
    #[arg(long, default_value_t = 100)]
    pub offline: usize,
    /// TTL of the last beat of the robots going offline (the short heartbeat timeout; whole
    /// seconds, at least 1).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "super::as_secs")]
    pub offline_ttl: Duration,
    /// Registrations in flight.
    #[arg(long, default_value_t = 64)]
    pub register_concurrency: usize,
    #[command(flatten)]
    pub common: Common,
}

impl Default for FleetScaleParams {
    fn default() -> Self {
        Self {
            robots: 2000,
            connections: 4,
            interval: Duration::from_secs(10),
            ttl: Duration::from_secs(30),
            idle: Duration::from_secs(30),
            offline: 100,
            offline_ttl: Duration::from_secs(2),
            register_concurrency: 64,
            common: Common::default(),
        }
    }
}

/// Bound on the wait for the fleet view to notice the robots that went offline, beyond their TTL.
const OFFLINE_WAIT: Duration = Duration::from_secs(60);

pub async fn run(p: &FleetScaleParams) -> anyhow::Result<Report> {
    let mut report = Report::new("fleet-scale", p);
    let offline = p.offline.min(p.robots);
    let mut options = p.common.stack_options();
    options.heartbeat_interval = p.interval;
    options.heartbeat_timeout = p.ttl;
    let stack = Stack::start(options).await?;
    let base = stack.base.clone().context("gateway not started")?;
    let rss_before = procfs::status_kib(std::process::id(), "VmRSS").unwrap_or(0);

    let started = Instant::now();
    let (mut fleet, register_latency, refused) =
        SimFleet::register(&stack.client, &stack.tenant, "sim", p.robots, p.register_concurrency).await?;
    report.rate("registrations (robot consumer created each)", p.robots as u64, started.elapsed());
    report.latencies.push(register_latency.summary("register request"));
    if !refused.is_empty() {
        report.correctness.fail(format!(
            "{} of {} registrations refused, e.g. {}; the run goes on with the {} registered",
            refused.len(),
            p.robots,
            refused[0],
            fleet.len()
        ));
    }
    let registered = fleet.len();
    let offline = offline.min(registered);

    let lag = Recorder::default();
    let measuring = Arc::new(AtomicBool::new(false));
    let watcher = fleet.watch_lag(&stack.client, lag.clone(), measuring.clone()).await?;
    fleet.start_heartbeats(&stack.nats, p.connections, p.interval, p.ttl).await?;
    // Warm-up: one whole interval, so every robot has beaten once and the orchestrator has
    // caught up with the registrations' after-effects before the idle window is measured.
    tokio::time::sleep(p.interval).await;

    let beats_before = fleet.beats();
    measuring.store(true, Ordering::Relaxed);
    let meter = meter(&stack, &p.common).await?;
    tokio::time::sleep(p.idle).await;
    measuring.store(false, Ordering::Relaxed);
    let beats = fleet.beats() - beats_before;
    meter.finish(&mut report, "heartbeat", beats).await;
    report.rate("heartbeats stored (idle window)", beats, p.idle);
    report.latencies.push(
        lag.summary("heartbeat published → recorded by the orchestrator (live event)")
            .with_anchor("seed <50"),
    );
    if let Some(orch) = report.processes.iter().find(|x| x.name.trim() == "orchestrator") {
        let share = orch.cores * 100.0;
        report.figure(
            &format!("orchestrator CPU with {registered} robots idle-heartbeating"),
            share,
            "% core",
            "target: 10,000 robots under 10% of a core",
        );
    }
    let rss_after = procfs::status_kib(std::process::id(), "VmRSS").unwrap_or(0);
    report.figure(
        "bench process RSS growth after registering and beating",
        rss_after.saturating_sub(rss_before) as f64 / 1024.0,
        "MiB",
        "orchestrator's fleet view + the simulators' state; the parts share the process",
    );

    // Robots going offline.
    let mut disconnected = stack.client.subscribe("fleet.events.default.robot.disconnected").await?;
    stack.client.flush().await?;
    let t0 = fleet.stop_robots(registered - offline..registered, p.offline_ttl).await?;
    let events = Recorder::default();
    let events_task = {
        let events = events.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while n < offline {
                match tokio::time::timeout(OFFLINE_WAIT, disconnected.next()).await {
                    Ok(Some(_)) => {
                        events.record(t0.elapsed());
                        n += 1;
                    }
                    _ => return n,
                }
            }
            n
        })
    };
    let mut noticed = None;
    let deadline = t0 + p.offline_ttl + OFFLINE_WAIT;
    let summary_url = format!("{base}/api/v1/metrics/fleet");
    let mut polls = 0u64;
    while Instant::now() < deadline {
        polls += 1;
        if let Ok(r) = stack.http.get(&summary_url).send().await
            && let Ok(v) = r.json::<serde_json::Value>().await
            && v["offline_robots"].as_u64().unwrap_or(0) >= offline as u64
        {
            noticed = Some(t0.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let received = events_task.await.unwrap_or(0);
    match noticed {
        Some(d) => {
            report.figure(
                &format!("fleet view counts {offline} robots offline after their last beat"),
                d.as_secs_f64() * 1000.0,
                "ms",
                &format!("TTL {:?}; {polls} polls of GET /api/v1/metrics/fleet", p.offline_ttl),
            );
            report.figure(
                "… of which beyond the TTL (detection lag)",
                (d.as_secs_f64() - p.offline_ttl.as_secs_f64()) * 1000.0,
                "ms",
                "",
            );
        }
        None => report.correctness.fail(format!("the fleet view did not count {offline} robots offline")),
    }
    report.latencies.push(events.summary("last beat → robot.disconnected event (each robot)"));
    if received < offline {
        report.correctness.fail(format!("{received} of {offline} robot.disconnected events arrived"));
    }

    // Correctness: everyone registered, exactly the stopped ones offline, no beat lost.
    report.unit = "heartbeat".into();
    let (total, online): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE online) FROM robots")
            .fetch_one(stack.bench_db.counted())
            .await?;
    report.correctness.expected = p.robots as u64;
    report.correctness.completed = total as u64;
    if total as usize != registered {
        report.correctness.fail(format!("{total} robots known, {registered} registered"));
    }
    if online as usize != registered - offline {
        report.correctness.fail(format!("{online} robots online, expected {}", registered - offline));
    }
    if fleet.failures() > 0 {
        report.correctness.fail(format!("{} heartbeats were not stored", fleet.failures()));
    }
    watcher.abort();
    fleet.stop().await;
    stack.stop().await?;
    Ok(report)
}
