//! `api`: the seed's own table, measured under a steady background load (default 500 jobs/s
//! over HTTP, open loop) with 1,000 simulated robots known and heartbeating:
//!
//! | what | how it is measured |
//! |---|---|
//! | list robots | `GET /api/v1/metrics/robots`, every `probe_interval` |
//! | submit | the background load's HTTP round trips (from scheduled time) |
//! | robot assignment | offer made → claim accepted: `started_at − offered_at` of every job |
//! | heartbeat → fleet view | a simulated robot's beat published → the orchestrator's live heartbeat event (sent after it recorded the beat) |
//! | event → subscriber | a job event's `occurred_at` (its history row) → received on a core `fleet.events.>` subscription |

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use serde::Serialize;
use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Common, meter};
use crate::check::{Completions, job_times, jobs_completed_once, us_between, wait_completed};
use crate::load::open_loop;
use crate::report::{Recorder, Report};
use crate::scenario::throughput::BENCH_CAP;
use crate::sim::SimFleet;
use crate::stack::{Stack, submit_http};

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct ApiParams {
    /// Simulated robots known to the orchestrator (and heartbeating). With the real robots, 990
    /// robots are known: the most FLEET_JOBS allows, one consumer per robot under nats-server
    /// 2.15's default limit of 1,000 consumers per stream.
    #[arg(long, default_value_t = 940)]
    pub sim_robots: usize,
    /// In-process robots running the background jobs.
    #[arg(long, default_value_t = 50)]
    pub robots: usize,
    /// Background load, jobs per second.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// How long the background load and the probes run.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "super::as_secs")]
    pub duration: Duration,
    /// Pause between two list-robots probes.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "super::as_secs")]
    pub probe_interval: Duration,
    /// Heartbeat interval of the simulated robots.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "super::as_secs")]
    pub interval: Duration,
    /// NATS connections the simulated robots share.
    #[arg(long, default_value_t = 2)]
    pub connections: usize,
    #[command(flatten)]
    pub common: Common,
}

impl Default for ApiParams {
    fn default() -> Self {
        Self {
            sim_robots: 940,
            robots: 50,
            rate: 500.0,
            duration: Duration::from_secs(30),
            probe_interval: Duration::from_millis(250),
            interval: Duration::from_secs(10),
            connections: 2,
            common: Common::default(),
        }
    }
}

pub async fn run(p: &ApiParams) -> anyhow::Result<Report> {
    let mut report = Report::new("api (the seed's table, measured)", p);
    let mut options = p.common.stack_options();
    options.heartbeat_interval = p.interval;
    options.heartbeat_timeout = p.interval * 3;
    let mut stack = Stack::start(options).await?;
    let base = stack.base.clone().context("gateway not started")?;
    // Real robots first: they need consumers too, and FLEET_JOBS holds at most 1,000 (the
    // nats-server 2.15 default per stream), so simulated robots past that are refused.
    stack.start_robots("robot", p.robots, &[BENCH_CAP], 1).await?;
    let (mut fleet, _, refused) =
        SimFleet::register(&stack.client, &stack.tenant, "sim", p.sim_robots, 64).await?;
    if !refused.is_empty() {
        report.correctness.fail(format!(
            "{} of {} simulated robots refused, e.g. {}",
            refused.len(),
            p.sim_robots,
            refused[0]
        ));
    }
    fleet.start_heartbeats(&stack.nats, p.connections, p.interval, p.interval * 3).await?;

    let heartbeat = Recorder::default();
    let measuring = Arc::new(AtomicBool::new(true));
    let watcher = fleet.watch_lag(&stack.client, heartbeat.clone(), measuring.clone()).await?;
    let events = Recorder::default();
    let stop = CancellationToken::new();
    let events_task = {
        let mut sub = stack.client.subscribe("fleet.events.>").await?;
        stack.client.flush().await?;
        let (events, stop) = (events.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = sub.next() => match m { Some(m) => m, None => return },
                };
                let now = OffsetDateTime::now_utc();
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&msg.payload) else { continue };
                if !v["type"].as_str().is_some_and(|t| t.starts_with("job.")) {
                    continue;
                }
                if let Some(at) = v["occurred_at"].as_str().and_then(|s| {
                    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
                }) {
                    events.record_signed_us(us_between(at, now));
                }
            }
        })
    };
    let list = Recorder::default();
    let mut listed = 0usize;
    let probe_task = {
        let (http, url, list, stop) =
            (stack.http.clone(), format!("{base}/api/v1/metrics/robots"), list.clone(), stop.clone());
        let pause = p.probe_interval;
        tokio::spawn(async move {
            let mut seen = 0;
            while !stop.is_cancelled() {
                let started = Instant::now();
                if let Ok(r) = http.get(&url).send().await
                    && r.status() == 200
                    && let Ok(v) = r.json::<serde_json::Value>().await
                {
                    list.record(started.elapsed());
                    seen = v.as_array().map_or(seen, Vec::len);
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            seen
        })
    };

    let completions = Completions::watch(&stack.client).await?;
    let meter = meter(&stack, &p.common).await?;
    let http = stack.http.clone();
    let load = open_loop(p.rate, p.duration, 4096, |_| {
        let (http, base) = (http.clone(), base.clone());
        async move { submit_http(&http, &base, "bench-api", &[BENCH_CAP]).await }
    })
    .await;
    stop.cancel();
    measuring.store(false, Ordering::Relaxed);
    if let Ok(n) = probe_task.await {
        listed = n;
    }
    let _ = events_task.await;
    let ids = load.ids();
    let finished =
        wait_completed(&stack.bench_db, &completions, &ids, p.duration * 10 + p.common.stall, p.common.stall)
            .await;
    meter.finish(&mut report, "job", ids.len() as u64).await;
    if let Err(e) = &finished {
        report.correctness.fail(format!("{e:#}"));
    }
    if let (Some(first), Some(last)) = (load.first_sent, load.last_answer) {
        report.rate("background submits answered", ids.len() as u64, last.duration_since(first));
    }

    let assignment = Recorder::default();
    for t in job_times(&stack.bench_db, &ids).await? {
        if let (Some(o), Some(s)) = (t.offered_at, t.started_at) {
            assignment.record_signed_us(us_between(o, s));
        }
    }
    report.latencies.push(
        list.summary(&format!("list robots (GET /metrics/robots, {listed} robots)"))
            .with_anchor("seed ~100 ms"),
    );
    report
        .latencies
        .push(load.latency.summary("submit (HTTP, from scheduled time)").with_anchor("seed ~500 ms"));
    report.latencies.push(
        assignment.summary("robot assignment (offer made → claim accepted)").with_anchor("seed <100 ms"),
    );
    report
        .latencies
        .push(heartbeat.summary("heartbeat → fleet view updated (live event)").with_anchor("seed <50 ms"));
    report
        .latencies
        .push(events.summary("event → subscriber (occurred_at → received)").with_anchor("seed ~50 ms"));
    report.note(
        "assignment's offered_at is set in the submit's transaction, so it also covers that commit and \
         the offer publish; events are received on a core NATS subscription (the gateway has no \
         WebSocket route yet)",
    );
    if listed < fleet.len() + p.robots {
        report
            .correctness
            .fail(format!("list robots returned {listed} robots, {} known", fleet.len() + p.robots));
    }

    let mut correctness = jobs_completed_once(&stack.bench_db, &ids, true).await?;
    if load.errors > 0 {
        correctness.fail(format!("{} submits failed, e.g. {:?}", load.errors, load.error_samples));
    }
    if fleet.failures() > 0 {
        correctness.fail(format!("{} heartbeats were not stored", fleet.failures()));
    }
    report.set_correctness(correctness);
    watcher.abort();
    fleet.stop().await;
    stack.stop().await?;
    Ok(report)
}
