//! `routing`: robots in five classes (capability sets), jobs requiring various subsets, submitted
//! open-loop over the orchestrator's NATS API. Offers per second, submit-to-start latency per
//! requirement set, and two routing checks: every job ran on a robot that has what it requires
//! (a failure), and on the best-fitting class (a share: admission is bounded by free slots, so a
//! job spills over to a larger eligible class when its best fit is full; the share says how
//! often).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Serialize;

use super::{Common, meter};
use crate::check::{Completions, job_times, jobs_completed_once, us_between, wait_completed};
use crate::load::open_loop;
use crate::report::{Recorder, Report};
use crate::stack::{Stack, noop_job, submit_nats};

/// The five classes (declared capabilities; every robot also has `shell`).
pub const CLASSES: [&[&str]; 5] = [
    &[],
    &["browser"],
    &["browser", "gpu"],
    &["desktop", "secure"],
    &["browser", "desktop", "gpu", "secure"],
];

/// Requirement sets the jobs cycle through.
pub const REQUIREMENTS: [&[&str]; 8] = [
    &[],
    &["browser"],
    &["gpu"],
    &["browser", "gpu"],
    &["desktop"],
    &["secure"],
    &["desktop", "secure"],
    &["browser", "desktop"],
];

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct RoutingParams {
    /// Robots, spread evenly over the five classes.
    #[arg(long, default_value_t = 50)]
    pub robots: usize,
    /// Arrivals per second.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// How long arrivals go on.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "super::as_secs")]
    pub duration: Duration,
    /// Submits in flight at most.
    #[arg(long, default_value_t = 4096)]
    pub max_in_flight: usize,
    #[command(flatten)]
    pub common: Common,
}

impl Default for RoutingParams {
    fn default() -> Self {
        Self {
            robots: 50,
            rate: 500.0,
            duration: Duration::from_secs(20),
            max_in_flight: 4096,
            common: Common::default(),
        }
    }
}

/// The class (sorted capabilities with `shell`) a job requiring `requires` should go to: the
/// eligible class with the fewest extra capabilities (all classes have equal free slots here).
fn best_fit(requires: &[&str]) -> Option<String> {
    CLASSES
        .iter()
        .map(|c| class_name(c))
        .filter(|c| requires.iter().all(|r| c.split('+').any(|x| x == *r)))
        .min_by_key(|c| (c.split('+').count(), c.clone()))
}

fn class_name(declared: &[&str]) -> String {
    let mut caps: Vec<&str> = declared.to_vec();
    caps.push("shell");
    caps.sort_unstable();
    caps.dedup();
    caps.join("+")
}

pub async fn run(p: &RoutingParams) -> anyhow::Result<Report> {
    let mut report = Report::new("routing", p);
    let mut options = p.common.stack_options();
    options.gateway = false;
    let mut stack = Stack::start(options).await?;
    let per_class = p.robots.div_ceil(CLASSES.len()).max(1);
    let mut robot_class: HashMap<String, String> = HashMap::new();
    for (i, caps) in CLASSES.iter().enumerate() {
        for name in stack.start_robots(&format!("class{i}"), per_class, caps, 1).await? {
            robot_class.insert(name, class_name(caps));
        }
    }

    let completions = Completions::watch(&stack.client).await?;
    let meter = meter(&stack, &p.common).await?;
    let jobs: Vec<_> = REQUIREMENTS.iter().map(|r| noop_job("bench-routing", r)).collect();
    let (client, tenant) = (stack.client.clone(), stack.tenant.clone());
    let started = tokio::time::Instant::now();
    let load = open_loop(p.rate, p.duration, p.max_in_flight, |i| {
        let (client, tenant) = (client.clone(), tenant.clone());
        let job = jobs[i as usize % jobs.len()].clone();
        async move { submit_nats(&client, &tenant, &job).await }
    })
    .await;
    let ids = load.ids();
    let finished =
        wait_completed(&stack.bench_db, &completions, &ids, p.duration * 10 + p.common.stall, p.common.stall)
            .await;
    let elapsed = started.elapsed();
    meter.finish(&mut report, "job", ids.len() as u64).await;
    if let Err(e) = &finished {
        report.correctness.fail(format!("{e:#}"));
    }
    let offers = report
        .cost
        .iter()
        .find(|c| c.name == "messages stored in FLEET_JOBS")
        .map(|c| c.total as u64)
        .unwrap_or(0);
    report.rate("offers published (FLEET_JOBS)", offers, elapsed);
    if let (Some(first), Some(last)) = (load.first_sent, load.last_answer) {
        report.rate("submits answered", ids.len() as u64, last.duration_since(first));
    }
    report.latencies.push(load.latency.summary("submit (NATS API round trip)"));

    let scheduled: HashMap<uuid::Uuid, time::OffsetDateTime> = load.accepted.iter().copied().collect();
    let times = job_times(&stack.bench_db, &ids).await?;
    let all = Recorder::default();
    let mut by_requirement: BTreeMap<String, (Recorder, u64, u64)> = BTreeMap::new();
    let mut misrouted = 0u64;
    for t in &times {
        let key = if t.requires.is_empty() { "(none)".to_owned() } else { t.requires.join("+") };
        let entry = by_requirement.entry(key).or_default();
        if let (Some(at), Some(s)) = (scheduled.get(&t.job_id), t.started_at) {
            all.record_signed_us(us_between(*at, s));
            entry.0.record_signed_us(us_between(*at, s));
        }
        let Some(class) = t.robot_id.as_ref().and_then(|r| robot_class.get(r)) else { continue };
        let caps: Vec<&str> = class.split('+').collect();
        if !t.requires.iter().all(|r| caps.contains(&r.as_str())) {
            misrouted += 1;
        }
        let requires: Vec<&str> = t.requires.iter().map(String::as_str).collect();
        entry.1 += 1;
        if best_fit(&requires).as_deref() == Some(class.as_str()) {
            entry.2 += 1;
        }
    }
    report
        .latencies
        .push(all.summary("submit → start, all jobs").with_anchor("Hatchet \"sub-25 ms dispatch\""));
    let mut best = 0;
    for (requires, (latency, n, fit)) in &by_requirement {
        best += fit;
        report.latencies.push(latency.summary(&format!("  submit → start, requires {requires}")));
        report.figure(
            &format!("  best-fit share, requires {requires}"),
            if *n > 0 { *fit as f64 * 100.0 / *n as f64 } else { 0.0 },
            "%",
            &format!(
                "best fit: class {}",
                best_fit(&requires.split('+').filter(|r| *r != "(none)").collect::<Vec<_>>())
                    .unwrap_or_default()
            ),
        );
    }
    report.figure("best-fit share, all jobs", best as f64 * 100.0 / times.len().max(1) as f64, "%", "");

    let mut correctness = jobs_completed_once(&stack.bench_db, &ids, true).await?;
    if misrouted > 0 {
        correctness.fail(format!("{misrouted} jobs ran on a robot lacking a required capability"));
    }
    if load.errors > 0 {
        correctness.fail(format!("{} submits failed, e.g. {:?}", load.errors, load.error_samples));
    }
    report.set_correctness(correctness);
    stack.stop().await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_fit_classes() {
        assert_eq!(best_fit(&[]).as_deref(), Some("shell"));
        assert_eq!(best_fit(&["browser"]).as_deref(), Some("browser+shell"));
        assert_eq!(best_fit(&["gpu"]).as_deref(), Some("browser+gpu+shell"));
        assert_eq!(best_fit(&["desktop"]).as_deref(), Some("desktop+secure+shell"));
        assert_eq!(best_fit(&["browser", "desktop"]).as_deref(), Some("browser+desktop+gpu+secure+shell"));
    }
}
