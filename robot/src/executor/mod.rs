//! Running a claimed job: the built-in step engine for Fleet v1 and external runners.
//!
//! An [`Executor`] turns a [`ClaimGrant`] into an [`Execution`]. It knows nothing about NATS or
//! the orchestrator: it writes log lines and progress into a [`JobSink`] (the job driver forwards
//! them), watches the [`JobContext::cancel`] token, and returns what ran. Why the job stopped
//! (cancel request, timeout, shutdown, lost lease) is the driver's business, not the
//! executor's: an interrupted executor simply returns [`RunOutcome::Cancelled`] with the output
//! gathered so far, and the driver decides what to report. That keeps the executors small and
//! lets tests plug in a fake one through [`Executors::insert`].

pub mod process;
pub mod runner;
pub mod steps;
pub mod template;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::future::BoxFuture;
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use fleet_schemas::JobId;
use fleet_schemas::robot::{ClaimGrant, RunOutcome};
use fleet_schemas::workflow::WorkflowFormat;

use crate::config::{RobotConfig, RunnerSpecError};
use crate::metrics::{MetricError, Metrics};
use crate::redact::Redactor;

/// Log lines buffered per job between the executor and the forwarder. A job never waits for log
/// delivery: when this fills (NATS slow or down) further lines are dropped and counted, while the
/// captured output that goes into the job's result is unaffected.
pub const LOG_BUFFER: usize = 1024;

/// How a job ran, as the executor saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Execution {
    /// It ran (completed, failed, or was interrupted).
    Finished(RunReport),
    /// The executor refused to run it at all (runner program missing, shell disabled…); the job is
    /// handed back with a reject so that another robot can take it.
    Rejected(String),
}

/// The end of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunReport {
    pub outcome: RunOutcome,
    pub output: Value,
    pub error: Option<String>,
    pub failed_step: Option<String>,
}

impl RunReport {
    pub fn completed(output: Value) -> Self {
        Self { outcome: RunOutcome::Completed, output, error: None, failed_step: None }
    }

    pub fn failed(output: Value, error: impl Into<String>, failed_step: Option<String>) -> Self {
        Self { outcome: RunOutcome::Failed, output, error: Some(error.into()), failed_step }
    }

    pub fn cancelled(output: Value, step: Option<String>) -> Self {
        Self { outcome: RunOutcome::Cancelled, output, error: None, failed_step: step }
    }
}

/// Runs one format of workflow.
pub trait Executor: Send + Sync {
    fn execute<'a>(&'a self, grant: &'a ClaimGrant, ctx: &'a JobContext) -> BoxFuture<'a, Execution>;
}

/// The executors a robot has, by format.
#[derive(Clone, Default)]
pub struct Executors {
    by_format: HashMap<WorkflowFormat, Arc<dyn Executor>>,
}

impl Executors {
    /// The built-in step engine for Fleet v1 plus one runner per configured runner (a runner for a
    /// format replaces nothing built in: only external formats take runners).
    pub fn from_config(config: &RobotConfig) -> Result<Self, RunnerSpecError> {
        let mut executors = Self::default();
        let engine = steps::StepEngine::new(!config.no_shell).passing_env(config.step_env.clone());
        executors.insert(WorkflowFormat::Fleet, Arc::new(engine));
        for spec in &config.runners {
            executors.insert(
                spec.format,
                Arc::new(runner::Runner::new(spec)?.passing_env(config.step_env.clone())),
            );
        }
        Ok(executors)
    }

    pub fn insert(&mut self, format: WorkflowFormat, executor: Arc<dyn Executor>) {
        self.by_format.insert(format, executor);
    }

    pub fn get(&self, format: WorkflowFormat) -> Option<Arc<dyn Executor>> {
        self.by_format.get(&format).cloned()
    }
}

/// What an executor gets besides the grant.
#[derive(Clone)]
pub struct JobContext {
    pub job_id: JobId,
    pub attempt: i32,
    /// The job's own directory (exists; the working directory of its processes).
    pub dir: PathBuf,
    /// Cancelled when the job must stop, for whatever reason.
    pub cancel: CancellationToken,
    pub sink: JobSink,
}

/// Which stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
    /// The step engine's own lines.
    Fleet,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::Fleet => "fleet",
        }
    }
}

/// One log line before it is addressed and published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub stream: LogStream,
    pub step: Option<String>,
    pub line: String,
    pub at: OffsetDateTime,
}

/// Progress of a job: percent and the node (step) being run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub percent: u8,
    pub node: Option<String>,
}

/// Where an executor writes log lines, progress and robot metrics. Progress is a `watch` (only
/// the latest value matters, so it can never back up); logs a bounded channel (see
/// [`LOG_BUFFER`]); metrics go straight into the robot's bounded map (see [`crate::metrics`]).
#[derive(Clone)]
pub struct JobSink {
    logs: mpsc::Sender<LogEntry>,
    progress: Arc<watch::Sender<Option<Progress>>>,
    dropped: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    /// The job's secret values, masked in every line (see [`crate::redact`]).
    redact: Arc<Redactor>,
}

/// The receiving end of a [`JobSink`].
pub struct JobEvents {
    pub logs: mpsc::Receiver<LogEntry>,
    pub progress: watch::Receiver<Option<Progress>>,
    dropped: Arc<AtomicU64>,
}

impl JobEvents {
    /// Log lines dropped because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl JobSink {
    /// A sink with its own (empty) metrics, for tests and tools.
    pub fn channel(capacity: usize) -> (JobSink, JobEvents) {
        Self::with_metrics(capacity, Arc::new(Metrics::default()))
    }

    /// A sink whose metrics go into `metrics` (the robot's).
    pub fn with_metrics(capacity: usize, metrics: Arc<Metrics>) -> (JobSink, JobEvents) {
        let (logs_tx, logs) = mpsc::channel(capacity);
        let (progress_tx, progress) = watch::channel(None);
        let dropped = Arc::new(AtomicU64::new(0));
        (
            JobSink {
                logs: logs_tx,
                progress: Arc::new(progress_tx),
                dropped: dropped.clone(),
                metrics,
                redact: Arc::default(),
            },
            JobEvents { logs, progress, dropped },
        )
    }

    /// Mask these secret values in every line written from now on.
    pub fn redacting(mut self, redact: Arc<Redactor>) -> Self {
        self.redact = redact;
        self
    }

    /// Set a robot metric (last value wins; see [`Metrics::set`] for the limits).
    pub fn metric(&self, name: &str, value: f64) -> Result<(), MetricError> {
        self.metrics.set(name, value)
    }

    /// The metrics this sink writes into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn log(&self, stream: LogStream, step: Option<&str>, line: impl Into<String>) {
        let entry = LogEntry {
            stream,
            step: step.map(str::to_owned),
            line: self.redact.string(line.into()),
            at: OffsetDateTime::now_utc(),
        };
        if self.logs.try_send(entry).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn progress(&self, percent: u8, node: Option<&str>) {
        let p = Progress { percent: percent.min(100), node: node.map(str::to_owned) };
        self.progress.send_replace(Some(p));
    }
}

impl JobContext {
    /// A context for tests and tools: its own sink and cancel token.
    pub fn detached(dir: PathBuf) -> (JobContext, JobEvents) {
        let (sink, events) = JobSink::channel(LOG_BUFFER);
        let ctx =
            JobContext { job_id: JobId::new(), attempt: 1, dir, cancel: CancellationToken::new(), sink };
        (ctx, events)
    }
}

/// Directory of one attempt of a job: `<jobs_dir>/<job_id>-<attempt>`.
pub fn job_dir(jobs_dir: &std::path::Path, job_id: JobId, attempt: i32) -> PathBuf {
    jobs_dir.join(format!("{job_id}-{attempt}"))
}
