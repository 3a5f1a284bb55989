//! External runners: a program that runs one workflow format (the Canvas graph format runs this
//! way).
//!
//! Contract with the runner program:
//! - its working directory is the job directory, which holds `workflow.json` and
//!   `variables.json`; `{workflow}`, `{variables}` and `{job_dir}` in the command are replaced by
//!   their absolute paths (see [`crate::config::RunnerSpec`] for how the command is split);
//! - environment: `FLEET_JOB_ID`, `FLEET_ATTEMPT`, `FLEET_JOB_DIR`, `FLEET_RESULT` (the path of
//!   `result.json`);
//! - stdout and stderr lines become the job's log lines, except a stdout line
//!   `FLEET_PROGRESS <0-100> [<current node>]`, which reports progress, and a stdout line
//!   `FLEET_METRIC <name> <number>`, which sets a robot metric (see [`crate::metrics`]; a
//!   malformed one stays a log line and is warned about);
//! - `result.json` in the job directory, when written, is the job's output (else the output is
//!   `{"stdout": <tail of stdout>}`);
//! - exit 0 is success; any other status fails the job with `runner exited with status N` and
//!   the last stderr line.
//!
//! A runner program that cannot be started (not found, not executable) is a refusal at run time:
//! the job is rejected, not failed, so another robot can run it.

use std::path::Path;

use futures::future::BoxFuture;
use serde_json::{Value, json};

use fleet_schemas::robot::ClaimGrant;
use fleet_schemas::workflow::WorkflowFormat;

use super::process::{self, Ended, Spawn};
use super::{Execution, Executor, JobContext, LogStream, RunReport};
use crate::config::{RunnerSpec, RunnerSpecError};
use crate::metrics::{self, MetricError};

/// Largest `result.json` read (the output travels in one NATS message, well under 1 MiB).
const RESULT_LIMIT: u64 = 512 * 1024;

/// An external runner for one format.
pub struct Runner {
    format: WorkflowFormat,
    argv: Vec<String>,
    /// Variables of the robot's environment passed to the runner (`--step-env`).
    pass_env: Vec<String>,
}

impl Runner {
    pub fn new(spec: &RunnerSpec) -> Result<Self, RunnerSpecError> {
        Ok(Self { format: spec.format, argv: spec.argv()?, pass_env: Vec::new() })
    }

    /// Pass these variables of the robot's environment to the runner.
    pub fn passing_env(mut self, names: Vec<String>) -> Self {
        self.pass_env = names;
        self
    }

    async fn run(&self, grant: &ClaimGrant, ctx: &JobContext) -> Execution {
        let dir = match std::path::absolute(&ctx.dir) {
            Ok(d) => d,
            Err(e) => return Execution::Rejected(format!("job directory {}: {e}", ctx.dir.display())),
        };
        let workflow = dir.join("workflow.json");
        let variables = dir.join("variables.json");
        let result = dir.join("result.json");
        let written = write_json(&workflow, &grant.workflow)
            .and_then(|_| write_json(&variables, &Value::Object(grant.variables.clone())));
        if let Err(e) = written {
            return Execution::Rejected(format!("could not write the job files in {}: {e}", dir.display()));
        }
        let path = |p: &Path| p.display().to_string();
        let substituted: Vec<String> = self
            .argv
            .iter()
            .map(|w| {
                w.replace("{workflow}", &path(&workflow))
                    .replace("{variables}", &path(&variables))
                    .replace("{job_dir}", &path(&dir))
            })
            .collect();
        let mut words = substituted.into_iter();
        let program = words.next().unwrap_or_default();
        let spawn = Spawn {
            program,
            args: words.collect(),
            cwd: dir.clone(),
            env: process::base_env(&self.pass_env)
                .into_iter()
                .chain([
                    ("FLEET_JOB_ID".to_owned(), ctx.job_id.to_string()),
                    ("FLEET_ATTEMPT".to_owned(), ctx.attempt.to_string()),
                    ("FLEET_JOB_DIR".to_owned(), path(&dir)),
                    ("FLEET_RESULT".to_owned(), path(&result)),
                ])
                .collect(),
        };
        let sink = &ctx.sink;
        let on_line = |stream: LogStream, line: &str| {
            if stream == LogStream::Stdout
                && let Some((percent, node)) = parse_progress(line)
            {
                sink.progress(percent, node);
                return;
            }
            if stream == LogStream::Stdout
                && let Some(metric) = metrics::parse_runner_line(line)
            {
                match metric.and_then(|(name, value)| sink.metric(&name, value)) {
                    Ok(()) => return,
                    // The limit is warned about once by the metrics themselves.
                    Err(MetricError::TooMany) => return,
                    Err(e) => tracing::warn!(error = %e, line, "malformed metric line from the runner"),
                }
            }
            sink.log(stream, None, line);
        };
        let finished = match process::run(&spawn, &ctx.cancel, None, on_line).await {
            Ok(f) => f,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ) =>
            {
                return Execution::Rejected(format!(
                    "the {} runner program {:?} cannot be started: {e}",
                    self.format.as_str(),
                    spawn.program
                ));
            }
            Err(e) => {
                return Execution::Rejected(format!(
                    "could not start the {} runner: {e}",
                    self.format.as_str()
                ));
            }
        };
        let output = match read_result(&result) {
            Ok(Some(v)) => v,
            Ok(None) => json!({ "stdout": finished.stdout }),
            Err(e) if finished.ended == Ended::Exited(0) => {
                return Execution::Finished(RunReport::failed(json!({ "stdout": finished.stdout }), e, None));
            }
            Err(_) => json!({ "stdout": finished.stdout }),
        };
        let last = finished.last_stderr_line.map(|l| format!(": {l}")).unwrap_or_default();
        Execution::Finished(match finished.ended {
            Ended::Exited(0) => RunReport::completed(output),
            Ended::Exited(n) => {
                RunReport::failed(output, format!("runner exited with status {n}{last}"), None)
            }
            Ended::Signalled(s) => {
                RunReport::failed(output, format!("runner killed by signal {s}{last}"), None)
            }
            Ended::Cancelled | Ended::TimedOut => RunReport::cancelled(output, None),
        })
    }
}

fn write_json(path: &Path, value: &Value) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    std::fs::write(path, bytes)
}

fn read_result(path: &Path) -> Result<Option<Value>, String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("result.json: {e}")),
    };
    if meta.len() > RESULT_LIMIT {
        return Err(format!("result.json is {} bytes, more than the limit of {RESULT_LIMIT}", meta.len()));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("result.json: {e}"))?;
    serde_json::from_slice(&bytes).map(Some).map_err(|e| format!("result.json is not valid JSON: {e}"))
}

/// `FLEET_PROGRESS <0-100> [<current node>]`.
pub fn parse_progress(line: &str) -> Option<(u8, Option<&str>)> {
    let rest = line.strip_prefix("FLEET_PROGRESS ")?.trim();
    let (pct, node) = match rest.split_once(char::is_whitespace) {
        Some((p, n)) => (p, Some(n.trim()).filter(|n| !n.is_empty())),
        None => (rest, None),
    };
    let pct: f64 = pct.parse().ok()?;
    if !(0.0..=100.0).contains(&pct) {
        return None;
    }
    Some((pct.round() as u8, node))
}

impl Executor for Runner {
    fn execute<'a>(&'a self, grant: &'a ClaimGrant, ctx: &'a JobContext) -> BoxFuture<'a, Execution> {
        Box::pin(self.run(grant, ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::{JobEvents, Progress};
    use fleet_schemas::JobId;
    use fleet_schemas::robot::RunOutcome;
    use std::time::Duration;

    fn grant() -> ClaimGrant {
        ClaimGrant {
            job_id: JobId::new(),
            attempt: 2,
            lease_ms: 30_000,
            format: WorkflowFormat::Casare,
            workflow: json!({"nodes": {"n1": {}}, "connections": []}),
            variables: json!({"customer": "ACME"}).as_object().cloned().unwrap_or_default(),
            timeout_s: None,
            workflow_name: "canvas".into(),
            secrets: Default::default(),
        }
    }

    /// A runner whose program is a shell script written into a temp dir.
    fn runner(script_dir: &Path, script: &str) -> Runner {
        let path = script_dir.join("runner.sh");
        std::fs::write(&path, script).unwrap();
        let spec = RunnerSpec {
            format: WorkflowFormat::Casare,
            command: format!("sh '{}' {{workflow}} {{variables}}", path.display()),
        };
        Runner::new(&spec).unwrap()
    }

    async fn execute(r: &Runner, job_dir: &Path) -> (Execution, JobEvents) {
        let (ctx, events) = JobContext::detached(job_dir.to_owned());
        let exec = tokio::time::timeout(Duration::from_secs(20), r.execute(&grant(), &ctx)).await.unwrap();
        (exec, events)
    }

    fn report(e: Execution) -> RunReport {
        match e {
            Execution::Finished(r) => r,
            Execution::Rejected(r) => panic!("rejected: {r}"),
        }
    }

    #[test]
    fn progress_lines() {
        assert_eq!(parse_progress("FLEET_PROGRESS 40 node-7"), Some((40, Some("node-7"))));
        assert_eq!(parse_progress("FLEET_PROGRESS 12.6"), Some((13, None)));
        assert_eq!(parse_progress("FLEET_PROGRESS 101"), None);
        assert_eq!(parse_progress("FLEET_PROGRESS x"), None);
        assert_eq!(parse_progress("progress 40"), None);
    }

    #[tokio::test]
    async fn runner_result_progress_and_logs() {
        let scripts = tempfile::tempdir().unwrap();
        let job = tempfile::tempdir().unwrap();
        let r = runner(
            scripts.path(),
            r#"set -e
cat "$1" > /dev/null
echo "working on $(cat "$2")"
echo FLEET_PROGRESS 50 n1
echo FLEET_METRIC rows_done 41
echo FLEET_METRIC rows_done 42
echo FLEET_METRIC Bad-Name 1
echo warn >&2
printf '{"ok": true, "job": "%s"}' "$FLEET_JOB_ID" > "$FLEET_RESULT"
"#,
        );
        let (ctx, mut events) = JobContext::detached(job.path().to_owned());
        let exec = tokio::time::timeout(Duration::from_secs(20), r.execute(&grant(), &ctx)).await.unwrap();
        let rep = report(exec);
        assert_eq!(rep.outcome, RunOutcome::Completed, "{rep:?}");
        assert_eq!(
            ctx.sink.metrics().snapshot(),
            std::collections::BTreeMap::from([("rows_done".to_owned(), 42.0)]),
            "the last value of a metric wins"
        );
        assert_eq!(rep.output["ok"], json!(true));
        assert!(job.path().join("workflow.json").exists());
        let mut lines = Vec::new();
        while let Ok(e) = events.logs.try_recv() {
            lines.push(e.line);
        }
        assert!(lines.iter().any(|l| l.contains("\"customer\"")), "{lines:?}");
        assert!(lines.contains(&"warn".to_owned()));
        assert!(!lines.iter().any(|l| l.starts_with("FLEET_PROGRESS")), "progress lines are not log lines");
        assert!(!lines.iter().any(|l| l.contains("rows_done")), "metric lines are not log lines");
        assert!(lines.contains(&"FLEET_METRIC Bad-Name 1".to_owned()), "a malformed metric line is logged");
        assert_eq!(*events.progress.borrow(), Some(Progress { percent: 50, node: Some("n1".into()) }));
    }

    #[tokio::test]
    async fn runner_without_result_and_failing() {
        let scripts = tempfile::tempdir().unwrap();
        let job = tempfile::tempdir().unwrap();
        let r = runner(scripts.path(), "echo some output; echo broken node >&2; exit 7\n");
        let rep = report(execute(&r, job.path()).await.0);
        assert_eq!(rep.outcome, RunOutcome::Failed);
        assert_eq!(rep.error.as_deref(), Some("runner exited with status 7: broken node"));
        assert_eq!(rep.output, json!({"stdout": "some output\n"}));
    }

    #[tokio::test]
    async fn bad_result_json_fails_a_successful_run() {
        let scripts = tempfile::tempdir().unwrap();
        let job = tempfile::tempdir().unwrap();
        let r = runner(scripts.path(), "echo '{nope' > result.json\n");
        let rep = report(execute(&r, job.path()).await.0);
        assert_eq!(rep.outcome, RunOutcome::Failed);
        assert!(rep.error.as_deref().unwrap_or_default().contains("result.json is not valid JSON"));
    }

    #[tokio::test]
    async fn missing_runner_program_is_a_rejection() {
        let job = tempfile::tempdir().unwrap();
        let spec = RunnerSpec {
            format: WorkflowFormat::Casare,
            command: "/nonexistent/casare-run {workflow}".into(),
        };
        let (exec, _) = execute(&Runner::new(&spec).unwrap(), job.path()).await;
        assert!(matches!(&exec, Execution::Rejected(r) if r.contains("cannot be started")), "{exec:?}");
    }

    #[tokio::test]
    async fn cancel_kills_the_process_group() {
        let scripts = tempfile::tempdir().unwrap();
        let job = tempfile::tempdir().unwrap();
        let r = runner(scripts.path(), "sleep 30 & echo $! > bg.pid\necho started\nwait\n");
        let (ctx, mut events) = JobContext::detached(job.path().to_owned());
        let g = grant();
        let run = r.execute(&g, &ctx);
        let cancel = ctx.cancel.clone();
        let watch = async {
            // Cancel once the runner says it started, so the background sleep surely exists.
            while let Some(e) = events.logs.recv().await {
                if e.line == "started" {
                    cancel.cancel();
                    return;
                }
            }
        };
        let (exec, ()) = tokio::time::timeout(Duration::from_secs(10), futures::future::join(run, watch))
            .await
            .expect("runner did not stop on cancel");
        assert_eq!(report(exec).outcome, RunOutcome::Cancelled);
        let pid: u32 = std::fs::read_to_string(job.path().join("bg.pid")).unwrap().trim().parse().unwrap();
        crate::executor::process::tests::wait_gone(pid).await;
    }
}
