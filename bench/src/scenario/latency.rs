//! `latency`: open-loop arrivals through the HTTP gateway (default 1,000 jobs/s for 30 s).
//!
//! A ticker fires each submit at its scheduled time whether or not earlier ones were answered,
//! and every latency is measured from the scheduled time (no coordinated omission). Submit is
//! the HTTP round trip (the job is committed when it answers 200). Submit-to-start and
//! submit-to-complete use the database's `started_at` (set by the claim) and `completed_at`,
//! against the scheduled time (same machine, same clock); commit-to-start uses `created_at`, so
//! it leaves the HTTP and submit path out.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use super::{Common, meter};
use crate::check::{Completions, job_times, jobs_completed_once, us_between, wait_completed};
use crate::load::open_loop;
use crate::report::{Recorder, Report};
use crate::scenario::throughput::BENCH_CAP;
use crate::stack::{Stack, submit_http};

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct LatencyParams {
    /// Arrivals per second.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// How long arrivals go on.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "super::as_secs")]
    pub duration: Duration,
    /// In-process robots.
    #[arg(long, default_value_t = 50)]
    pub robots: usize,
    /// Job slots per robot.
    #[arg(long, default_value_t = 1)]
    pub max_jobs: u32,
    /// Submits in flight at most; past it a submit waits for a slot (and the wait counts in its
    /// latency).
    #[arg(long, default_value_t = 4096)]
    pub max_in_flight: usize,
    #[command(flatten)]
    pub common: Common,
}

impl Default for LatencyParams {
    fn default() -> Self {
        Self {
            rate: 1000.0,
            duration: Duration::from_secs(30),
            robots: 50,
            max_jobs: 1,
            max_in_flight: 4096,
            common: Common::default(),
        }
    }
}

pub async fn run(p: &LatencyParams) -> anyhow::Result<Report> {
    let mut report = Report::new("latency (open loop over HTTP)", p);
    let mut stack = Stack::start(p.common.stack_options()).await?;
    stack.start_robots("robot", p.robots, &[BENCH_CAP], p.max_jobs).await?;
    let base = stack.base.clone().context("gateway not started")?;

    let completions = Completions::watch(&stack.client).await?;
    let meter = meter(&stack, &p.common).await?;
    let http = stack.http.clone();
    let load = open_loop(p.rate, p.duration, p.max_in_flight, |_| {
        let (http, base) = (http.clone(), base.clone());
        async move { submit_http(&http, &base, "bench-latency", &[BENCH_CAP]).await }
    })
    .await;
    let ids = load.ids();
    let finished =
        wait_completed(&stack.bench_db, &completions, &ids, p.duration * 10 + p.common.stall, p.common.stall)
            .await;
    meter.finish(&mut report, "job", ids.len() as u64).await;
    if let Err(e) = &finished {
        report.correctness.fail(format!("{e:#}"));
    }

    if let (Some(first), Some(last)) = (load.first_sent, load.last_answer) {
        report.rate("submits answered (offered rate)", ids.len() as u64, last.duration_since(first));
    }
    if let Ok(last) = finished
        && let Some((_, first)) = load.accepted.iter().min_by_key(|(_, at)| *at)
    {
        let elapsed = Duration::from_micros(us_between(*first, last).max(1) as u64);
        report.rate("first scheduled submit → last completion", ids.len() as u64, elapsed);
    }
    report.figure("ticker's worst lag behind schedule", load.max_lag.as_secs_f64() * 1000.0, "ms", "");

    let scheduled: HashMap<uuid::Uuid, time::OffsetDateTime> = load.accepted.iter().copied().collect();
    let times = job_times(&stack.bench_db, &ids).await?;
    let (commit_to_start, to_start, to_done, run) =
        (Recorder::default(), Recorder::default(), Recorder::default(), Recorder::default());
    for t in &times {
        let Some(at) = scheduled.get(&t.job_id).copied() else { continue };
        if let Some(s) = t.started_at {
            commit_to_start.record_signed_us(us_between(t.created_at, s));
            to_start.record_signed_us(us_between(at, s));
        }
        if let Some(c) = t.completed_at {
            to_done.record_signed_us(us_between(at, c));
            if let Some(s) = t.started_at {
                run.record_signed_us(us_between(s, c));
            }
        }
    }
    report.latencies.push(
        load.latency
            .summary("submit (HTTP round trip, committed)")
            .with_anchor("target p50 ≤ 1.5, p99 ≤ 5; seed ~500"),
    );
    report.latencies.push(
        to_start
            .summary("submit → start (scheduled → claimed)")
            .with_anchor("target p50 ≤ 2; Hatchet \"sub-25 ms dispatch\"; seed assignment <100"),
    );
    report.latencies.push(commit_to_start.summary("commit → start (created_at → started_at)"));
    report.latencies.push(run.summary("start → completed (no-op run + complete report)"));
    report.latencies.push(
        to_done
            .summary("submit → complete (scheduled → completed_at)")
            .with_anchor("Windmill ~60 ms per task"),
    );

    let mut correctness = jobs_completed_once(&stack.bench_db, &ids, true).await?;
    if load.errors > 0 {
        correctness.fail(format!("{} submits failed, e.g. {:?}", load.errors, load.error_samples));
    }
    report.set_correctness(correctness);
    stack.stop().await?;
    Ok(report)
}
