//! `throughput`: N no-op jobs submitted as fast as the system accepts them (`concurrency`
//! requests in flight), first through the orchestrator's API over NATS, then through the HTTP
//! gateway, each on a fresh stack, run by in-process robots. Jobs per second from the first
//! submit to the last completion (`max(completed_at)` in the database), printed next to a
//! `raw-jetstream` run made by the same command, as a ratio.

use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use time::OffsetDateTime;
use tokio::time::Instant;

use super::{Common, meter};
use crate::check::{Completions, job_times, jobs_completed_once, us_between, wait_completed};
use crate::load::closed_loop;
use crate::report::{Recorder, Report};
use crate::scenario::raw_jetstream::{self, RawParams};
use crate::stack::{Stack, noop_job, submit_http, submit_nats};

/// Capability every bench robot declares and every bench job requires, so that simulated robots
/// (class `sim`) never receive a job.
pub const BENCH_CAP: &str = "bench";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// The orchestrator's API over NATS (`fleet.api.jobs.submit`), as the gateway calls it.
    Nats,
    /// The HTTP gateway (`POST /api/v1/workflows`).
    Http,
}

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct ThroughputParams {
    /// Jobs per phase (the figure is 100,000).
    #[arg(long, default_value_t = 20_000)]
    pub jobs: u64,
    /// Submit requests in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// In-process robots.
    #[arg(long, default_value_t = 50)]
    pub robots: usize,
    /// Job slots per robot.
    #[arg(long, default_value_t = 1)]
    pub max_jobs: u32,
    /// Phases to run, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Via::Nats, Via::Http])]
    pub via: Vec<Via>,
    /// Messages of the raw-jetstream reference run (0 skips it).
    #[arg(long, default_value_t = 50_000)]
    pub raw_messages: u64,
    /// Give up waiting for completions after this long.
    #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "super::as_secs")]
    pub timeout: Duration,
    #[command(flatten)]
    pub common: Common,
}

impl Default for ThroughputParams {
    fn default() -> Self {
        Self {
            jobs: 20_000,
            concurrency: 64,
            robots: 50,
            max_jobs: 1,
            via: vec![Via::Nats, Via::Http],
            raw_messages: 50_000,
            timeout: Duration::from_secs(600),
            common: Common::default(),
        }
    }
}

pub async fn run(p: &ThroughputParams) -> anyhow::Result<Vec<Report>> {
    let mut reports = Vec::new();
    let mut raw_rate = None;
    if p.raw_messages > 0 {
        let raw = raw_jetstream::run(&RawParams {
            messages: p.raw_messages,
            consumers: p.robots,
            worker_threads: p.common.worker_threads,
            ..Default::default()
        })
        .await
        .context("raw-jetstream reference run")?;
        raw_rate = raw.rates.iter().find(|r| r.name.contains("end to end")).map(|r| r.per_second);
        reports.push(raw);
    }
    for via in &p.via {
        let mut report = phase(p, *via).await?;
        if let (Some(raw), Some(fleet)) =
            (raw_rate, report.rates.iter().find(|r| r.name.starts_with("first submit")).map(|r| r.per_second))
        {
            report.figure(
                "Fleet jobs/s ÷ raw JetStream msgs/s (same run)",
                fleet / raw,
                "ratio",
                &format!("raw-jetstream {raw:.0} msgs/s with {} pullers, batch 1", p.robots),
            );
        }
        report.note(
            "anchors: target ≥ 10,000 jobs/s on this 2-core machine; graphile-worker ~15,600 jobs/s \
             (24-core desktop, unbatched); River ~46,000 jobs/s (8-core laptop)",
        );
        reports.push(report);
    }
    Ok(reports)
}

async fn phase(p: &ThroughputParams, via: Via) -> anyhow::Result<Report> {
    let name = match via {
        Via::Nats => "throughput (submit over NATS API)",
        Via::Http => "throughput (submit over HTTP gateway)",
    };
    let mut report = Report::new(name, p);
    let mut options = p.common.stack_options();
    options.gateway = via == Via::Http;
    let mut stack = Stack::start(options).await?;
    stack.start_robots("robot", p.robots, &[BENCH_CAP], p.max_jobs).await?;
    let job = noop_job("bench-throughput", &[BENCH_CAP]);

    let completions = Completions::watch(&stack.client).await?;
    let meter = meter(&stack, &p.common).await?;
    let started_wall = OffsetDateTime::now_utc();
    let started = Instant::now();
    let load = match via {
        Via::Nats => {
            let (client, tenant, job) = (&stack.client, &stack.tenant, &job);
            closed_loop(p.jobs, p.concurrency, |_| submit_nats(client, tenant, job)).await
        }
        Via::Http => {
            let (http, base) = (&stack.http, stack.base.clone().context("gateway not started")?);
            let base = &base;
            closed_loop(p.jobs, p.concurrency, |_| submit_http(http, base, "bench-throughput", &[BENCH_CAP]))
                .await
        }
    };
    let submitted = started.elapsed();
    let ids = load.ids();
    let finished = wait_completed(&stack.bench_db, &completions, &ids, p.timeout, p.common.stall).await;
    meter.finish(&mut report, "job", ids.len() as u64).await;

    report.rate(&format!("submits accepted ({} in flight)", p.concurrency), ids.len() as u64, submitted);
    match &finished {
        Ok(last) => {
            let elapsed = Duration::from_micros(us_between(started_wall, *last).max(1) as u64);
            report.rate("first submit → last completion", ids.len() as u64, elapsed);
        }
        Err(e) => report.correctness.fail(format!("{e:#}")),
    }
    report.latencies.push(load.latency.summary("submit round trip (closed loop)"));
    let times = job_times(&stack.bench_db, &ids).await?;
    let (to_start, to_done) = (Recorder::default(), Recorder::default());
    for t in &times {
        if let Some(s) = t.started_at {
            to_start.record_signed_us(us_between(t.created_at, s));
        }
        if let Some(c) = t.completed_at {
            to_done.record_signed_us(us_between(t.created_at, c));
        }
    }
    report.latencies.push(to_start.summary("commit → claimed (queueing under saturation)"));
    report.latencies.push(to_done.summary("commit → completed (queueing under saturation)"));

    let mut correctness = jobs_completed_once(&stack.bench_db, &ids, true).await?;
    if load.errors > 0 {
        correctness.fail(format!("{} submits failed, e.g. {:?}", load.errors, load.error_samples));
    }
    report.set_correctness(correctness);
    stack.stop().await?;
    Ok(report)
}
