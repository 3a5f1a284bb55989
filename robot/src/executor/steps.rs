//! The built-in step engine for Fleet v1 workflows.
//!
//! Steps run in order against a context of `{...variables, steps: {<id>: result}}` (see
//! [`super::template`]). The job's output is `{"variables": {...final}, "steps": {<id>: result}}`,
//! also when a step fails, so a failed job still shows what ran. A step fails with a message; the
//! first failure ends the job with that message as `error` and the step's id as `failed_step`.
//!
//! Step results:
//! - `log`: `{"message"}`; `sleep`: `{"ms"}`; `set`: the rendered variables;
//! - `shell`: `{"exit_code", "stdout", "stderr"}` (the last 64 KiB of each; when more was printed,
//!   also `"truncated": {"stdout": {"original_bytes", "kept_bytes", "kept": "tail", "in": "log"}}`,
//!   the full text being in the job's log); a non-zero exit fails the step with `exit status N`
//!   and the last stderr line;
//! - `http`: `{"status", "headers", "body"}` (body parsed as JSON when it parses, else text); a
//!   transport error fails the step, a non-2xx status does not (check it in a later step);
//! - `fail`: fails the job with its message.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Map, Value, json};

use fleet_schemas::robot::ClaimGrant;
use fleet_schemas::workflow::{FleetWorkflow, Step, StepKind};

use super::process::{self, Ended, Spawn};
use super::template::{TemplateError, Templates};
use super::{Execution, Executor, JobContext, LogStream, RunReport};

/// Default time limit of an `http` step without `timeout_s`.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Response bodies larger than this are cut (results travel in one NATS message, well under 1 MiB).
const HTTP_BODY_LIMIT: usize = 256 * 1024;

/// Runs Fleet v1 workflows.
pub struct StepEngine {
    allow_shell: bool,
    /// Variables of the robot's environment passed to shell steps (`--step-env`).
    pass_env: Vec<String>,
    templates: Templates,
    http: reqwest::Client,
}

/// How one step ended.
enum StepEnd {
    Done(Value),
    /// Failed with a message; the result, when there is one, still goes into the output.
    Failed(String, Option<Value>),
    Cancelled(Option<Value>),
}

impl From<TemplateError> for StepEnd {
    fn from(e: TemplateError) -> Self {
        StepEnd::Failed(e.to_string(), None)
    }
}

impl StepEngine {
    pub fn new(allow_shell: bool) -> Self {
        Self { allow_shell, pass_env: Vec::new(), templates: Templates::new(), http: reqwest::Client::new() }
    }

    /// Pass these variables of the robot's environment to shell steps.
    pub fn passing_env(mut self, names: Vec<String>) -> Self {
        self.pass_env = names;
        self
    }

    async fn run(&self, grant: &ClaimGrant, ctx: &JobContext) -> Execution {
        let wf: FleetWorkflow = match serde_json::from_value(grant.workflow.clone()) {
            Ok(wf) => wf,
            Err(e) => {
                return Execution::Finished(RunReport::failed(
                    json!({}),
                    format!("not a valid Fleet v1 workflow: {e}"),
                    None,
                ));
            }
        };
        if !self.allow_shell && wf.steps.iter().any(|s| matches!(s.kind, StepKind::Shell { .. })) {
            return Execution::Rejected("shell steps are disabled on this robot (--no-shell)".into());
        }
        let mut variables = grant.variables.clone();
        for (k, v) in wf.variables {
            variables.entry(k).or_insert(v);
        }
        // `{{ secrets.NAME }}`: only the job's own secrets, kept out of `variables` so that they
        // never reach the output.
        let secrets: Map<String, Value> =
            grant.secrets.0.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        let secrets = Value::Object(secrets);
        let mut results = Map::new();
        let total = wf.steps.len().max(1);
        let output = |variables: &Map<String, Value>, results: &Map<String, Value>| json!({"variables": variables, "steps": results});
        for (i, step) in wf.steps.iter().enumerate() {
            let id = step.id.clone();
            if ctx.cancel.is_cancelled() {
                return Execution::Finished(RunReport::cancelled(output(&variables, &results), Some(id)));
            }
            ctx.sink.progress((i * 100 / total) as u8, Some(&id));
            match self.step(step, &mut variables, &results, &secrets, ctx).await {
                StepEnd::Done(result) => {
                    results.insert(id, result);
                }
                StepEnd::Failed(message, result) => {
                    if let Some(result) = result {
                        results.insert(id.clone(), result);
                    }
                    ctx.sink.log(LogStream::Fleet, Some(&id), format!("step failed: {message}"));
                    return Execution::Finished(RunReport::failed(
                        output(&variables, &results),
                        message,
                        Some(id),
                    ));
                }
                StepEnd::Cancelled(result) => {
                    if let Some(result) = result {
                        results.insert(id.clone(), result);
                    }
                    return Execution::Finished(RunReport::cancelled(output(&variables, &results), Some(id)));
                }
            }
        }
        ctx.sink.progress(100, wf.steps.last().map(|s| s.id.as_str()));
        Execution::Finished(RunReport::completed(output(&variables, &results)))
    }

    async fn step(
        &self,
        step: &Step,
        variables: &mut Map<String, Value>,
        results: &Map<String, Value>,
        secrets: &Value,
        ctx: &JobContext,
    ) -> StepEnd {
        let mut scope = variables.clone();
        scope.insert("steps".into(), Value::Object(results.clone()));
        scope.insert("secrets".into(), secrets.clone());
        let scope = Value::Object(scope);
        let t = &self.templates;
        let id = step.id.as_str();
        match &step.kind {
            StepKind::Log { message } => {
                let message = match t.render_str("message", message, &scope) {
                    Ok(m) => m,
                    Err(e) => return e.into(),
                };
                ctx.sink.log(LogStream::Fleet, Some(id), message.clone());
                StepEnd::Done(json!({ "message": message }))
            }
            StepKind::Sleep { ms } => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(*ms)) => StepEnd::Done(json!({ "ms": ms })),
                    _ = ctx.cancel.cancelled() => StepEnd::Cancelled(None),
                }
            }
            StepKind::Set { variables: values } => {
                let rendered = match t.render_value("variables", &Value::Object(values.clone()), &scope) {
                    Ok(Value::Object(m)) => m,
                    Ok(_) => Map::new(),
                    Err(e) => return e.into(),
                };
                for (k, v) in &rendered {
                    variables.insert(k.clone(), v.clone());
                }
                StepEnd::Done(Value::Object(rendered))
            }
            StepKind::Shell { argv, env, cwd, timeout_s } => {
                if !self.allow_shell {
                    return StepEnd::Failed(
                        "shell steps are disabled on this robot (--no-shell)".into(),
                        None,
                    );
                }
                match self.render_shell(argv, env, cwd.as_deref(), &scope, ctx) {
                    Ok(spawn) => self.shell(spawn, timeout_s.map(Duration::from_secs), id, ctx).await,
                    Err(e) => e.into(),
                }
            }
            StepKind::Http { method, url, headers, body, timeout_s } => {
                let render = || -> Result<_, TemplateError> {
                    let method = t.render_str("method", method, &scope)?;
                    let url = t.render_str("url", url, &scope)?;
                    let mut hs = BTreeMap::new();
                    for (k, v) in headers {
                        hs.insert(k.clone(), t.render_str(&format!("headers.{k}"), v, &scope)?);
                    }
                    let body = body.as_ref().map(|b| t.render_value("body", b, &scope)).transpose()?;
                    Ok((method, url, hs, body))
                };
                match render() {
                    Ok((method, url, hs, body)) => {
                        let timeout = timeout_s.map(Duration::from_secs).unwrap_or(HTTP_TIMEOUT);
                        tokio::select! {
                            end = self.http(&method, &url, &hs, body.as_ref(), timeout) => end,
                            _ = ctx.cancel.cancelled() => StepEnd::Cancelled(None),
                        }
                    }
                    Err(e) => e.into(),
                }
            }
            StepKind::Fail { message } => match t.render_str("message", message, &scope) {
                Ok(m) => StepEnd::Failed(m, None),
                Err(e) => e.into(),
            },
        }
    }

    fn render_shell(
        &self,
        argv: &[String],
        env: &BTreeMap<String, String>,
        cwd: Option<&str>,
        scope: &Value,
        ctx: &JobContext,
    ) -> Result<Spawn, TemplateError> {
        let t = &self.templates;
        let mut words = Vec::with_capacity(argv.len());
        for (i, a) in argv.iter().enumerate() {
            words.push(t.render_str(&format!("argv[{i}]"), a, scope)?);
        }
        let mut vars = process::base_env(&self.pass_env);
        vars.extend([
            ("FLEET_JOB_ID".to_owned(), ctx.job_id.to_string()),
            ("FLEET_ATTEMPT".to_owned(), ctx.attempt.to_string()),
            ("FLEET_JOB_DIR".to_owned(), ctx.dir.display().to_string()),
        ]);
        for (k, v) in env {
            vars.insert(k.clone(), t.render_str(&format!("env.{k}"), v, scope)?);
        }
        let dir = match cwd {
            Some(c) => ctx.dir.join(t.render_str("cwd", c, scope)?),
            None => ctx.dir.clone(),
        };
        let mut words = words.into_iter();
        let program = words.next().unwrap_or_default();
        Ok(Spawn { program, args: words.collect(), cwd: dir, env: vars })
    }

    async fn shell(&self, spawn: Spawn, timeout: Option<Duration>, id: &str, ctx: &JobContext) -> StepEnd {
        let sink = &ctx.sink;
        let on_line = |stream: LogStream, line: &str| sink.log(stream, Some(id), line);
        let finished = match process::run(&spawn, &ctx.cancel, timeout, on_line).await {
            Ok(f) => f,
            Err(e) => return StepEnd::Failed(format!("could not start {:?}: {e}", spawn.program), None),
        };
        let exit_code = match finished.ended {
            Ended::Exited(c) => Some(c),
            _ => None,
        };
        let mut result =
            json!({"exit_code": exit_code, "stdout": finished.stdout, "stderr": finished.stderr});
        if let Some(cut) = finished.truncation() {
            result["truncated"] = cut;
        }
        let last = finished.last_stderr_line.map(|l| format!(": {l}")).unwrap_or_default();
        match finished.ended {
            Ended::Exited(0) => StepEnd::Done(result),
            Ended::Exited(n) => StepEnd::Failed(format!("exit status {n}{last}"), Some(result)),
            Ended::Signalled(s) => StepEnd::Failed(format!("killed by signal {s}{last}"), Some(result)),
            Ended::TimedOut => StepEnd::Failed(
                format!("timed out after {}s", timeout.unwrap_or_default().as_secs()),
                Some(result),
            ),
            Ended::Cancelled => StepEnd::Cancelled(Some(result)),
        }
    }

    async fn http(
        &self,
        method: &str,
        url: &str,
        headers: &BTreeMap<String, String>,
        body: Option<&Value>,
        timeout: Duration,
    ) -> StepEnd {
        let method = match reqwest::Method::from_bytes(method.to_ascii_uppercase().as_bytes()) {
            Ok(m) => m,
            Err(_) => return StepEnd::Failed(format!("invalid HTTP method {method:?}"), None),
        };
        if url.starts_with("https://") {
            return StepEnd::Failed(
                "https is not supported by this robot build (reqwest without TLS); use http://".into(),
                None,
            );
        }
        let mut req = self.http.request(method, url).timeout(timeout);
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        req = match body {
            Some(Value::String(s)) => req.body(s.clone()),
            Some(v) => req.json(v),
            None => req,
        };
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                return StepEnd::Failed(format!("HTTP request to {url} failed: {}", error_chain(&e)), None);
            }
        };
        let status = resp.status().as_u16();
        let mut hs = Map::new();
        for (k, v) in resp.headers() {
            hs.insert(
                k.as_str().to_owned(),
                Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
            );
        }
        let mut bytes = Vec::new();
        let mut resp = resp;
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    let room = HTTP_BODY_LIMIT.saturating_sub(bytes.len());
                    bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if room <= chunk.len() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    return StepEnd::Failed(
                        format!("reading the response of {url} failed: {}", error_chain(&e)),
                        None,
                    );
                }
            }
        }
        let body = serde_json::from_slice::<Value>(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        StepEnd::Done(json!({"status": status, "headers": hs, "body": body}))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

impl Executor for StepEngine {
    fn execute<'a>(&'a self, grant: &'a ClaimGrant, ctx: &'a JobContext) -> BoxFuture<'a, Execution> {
        Box::pin(self.run(grant, ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::JobEvents;
    use fleet_schemas::JobId;
    use fleet_schemas::robot::RunOutcome;
    use fleet_schemas::workflow::WorkflowFormat;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn grant(workflow: Value, variables: Value) -> ClaimGrant {
        ClaimGrant {
            job_id: JobId::new(),
            attempt: 1,
            lease_ms: 30_000,
            format: WorkflowFormat::Fleet,
            workflow,
            variables: variables.as_object().cloned().unwrap_or_default(),
            timeout_s: None,
            workflow_name: "t".into(),
            secrets: Default::default(),
        }
    }

    async fn run(engine: &StepEngine, g: &ClaimGrant) -> (Execution, JobEvents, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (ctx, events) = JobContext::detached(dir.path().to_owned());
        let exec = tokio::time::timeout(Duration::from_secs(20), engine.execute(g, &ctx)).await.unwrap();
        (exec, events, dir)
    }

    fn report(e: Execution) -> RunReport {
        match e {
            Execution::Finished(r) => r,
            Execution::Rejected(r) => panic!("rejected: {r}"),
        }
    }

    fn logs(events: &mut JobEvents) -> Vec<(String, Option<String>, String)> {
        let mut out = Vec::new();
        while let Ok(e) = events.logs.try_recv() {
            out.push((e.stream.as_str().to_owned(), e.step, e.line));
        }
        out
    }

    #[tokio::test]
    async fn log_set_and_templates() {
        let wf = json!({"steps": [
            {"id": "hello", "kind": "log", "message": "hi {{customer}}"},
            {"id": "calc", "kind": "set", "variables": {"n2": "{{ n * 2 }}", "label": "n={{ n }}"}},
            {"id": "again", "kind": "log", "message": "{{ steps.calc.label }} {{ n2 }}"}
        ]});
        let (exec, mut events, _d) =
            run(&StepEngine::new(true), &grant(wf, json!({"customer": "ACME", "n": 2}))).await;
        let r = report(exec);
        assert_eq!(r.outcome, RunOutcome::Completed, "{r:?}");
        assert_eq!(r.output["variables"]["n2"], json!(4));
        assert_eq!(r.output["steps"]["hello"]["message"], json!("hi ACME"));
        assert_eq!(r.output["steps"]["again"]["message"], json!("n=2 4"));
        let l = logs(&mut events);
        assert!(l.contains(&("fleet".into(), Some("hello".into()), "hi ACME".into())), "{l:?}");
        assert_eq!(
            *events.progress.borrow(),
            Some(super::super::Progress { percent: 100, node: Some("again".into()) })
        );
    }

    #[tokio::test]
    async fn undefined_variable_fails_the_step() {
        let wf = json!({"steps": [
            {"id": "a", "kind": "log", "message": "ok"},
            {"id": "b", "kind": "shell", "argv": ["echo", "{{ customer }}"]}
        ]});
        let r = report(run(&StepEngine::new(true), &grant(wf, json!({}))).await.0);
        assert_eq!(r.outcome, RunOutcome::Failed);
        assert_eq!(r.failed_step.as_deref(), Some("b"));
        assert_eq!(r.error.as_deref(), Some("argv[1]: undefined variable `customer`"));
        assert_eq!(r.output["steps"]["a"]["message"], json!("ok"), "what ran is kept");
    }

    #[tokio::test]
    async fn shell_captures_stdout_and_fails_on_exit_status() {
        let wf = json!({"steps": [
            {"id": "ok", "kind": "shell", "argv": ["sh", "-c", "echo out-$X; echo err >&2"], "env": {"X": "{{ x }}"}},
            {"id": "bad", "kind": "shell", "argv": ["sh", "-c", "echo first >&2; echo last words >&2; exit 4"]}
        ]});
        let (exec, mut events, _d) = run(&StepEngine::new(true), &grant(wf, json!({"x": "42"}))).await;
        let r = report(exec);
        assert_eq!(r.output["steps"]["ok"], json!({"exit_code": 0, "stdout": "out-42\n", "stderr": "err\n"}));
        assert_eq!(r.outcome, RunOutcome::Failed);
        assert_eq!(r.failed_step.as_deref(), Some("bad"));
        assert_eq!(r.error.as_deref(), Some("exit status 4: last words"));
        assert_eq!(r.output["steps"]["bad"]["exit_code"], json!(4));
        let l = logs(&mut events);
        assert!(l.contains(&("stdout".into(), Some("ok".into()), "out-42".into())), "{l:?}");
        assert!(l.contains(&("stderr".into(), Some("ok".into()), "err".into())), "{l:?}");
    }

    #[tokio::test]
    async fn shell_step_timeout() {
        let wf = json!({"steps": [{"id": "slow", "kind": "shell", "argv": ["sleep", "30"], "timeout_s": 1}]});
        let r = report(run(&StepEngine::new(true), &grant(wf, json!({}))).await.0);
        assert_eq!(r.outcome, RunOutcome::Failed);
        assert_eq!(r.error.as_deref(), Some("timed out after 1s"));
    }

    #[tokio::test]
    async fn no_shell_rejects_shell_workflows() {
        let wf = json!({"steps": [{"id": "s", "kind": "shell", "argv": ["true"]}]});
        let exec = run(&StepEngine::new(false), &grant(wf, json!({}))).await.0;
        assert!(matches!(exec, Execution::Rejected(r) if r.contains("--no-shell")));
    }

    #[tokio::test]
    async fn fail_step() {
        let wf = json!({"steps": [{"id": "x", "kind": "fail", "message": "no invoice for {{ customer }}"}]});
        let r = report(run(&StepEngine::new(true), &grant(wf, json!({"customer": "ACME"}))).await.0);
        assert_eq!(r.outcome, RunOutcome::Failed);
        assert_eq!(r.error.as_deref(), Some("no invoice for ACME"));
        assert_eq!(r.failed_step.as_deref(), Some("x"));
    }

    #[tokio::test]
    async fn sleep_is_cancellable() {
        let wf = json!({"steps": [{"id": "nap", "kind": "sleep", "ms": 60_000}, {"id": "after", "kind": "log", "message": "x"}]});
        let g = grant(wf, json!({}));
        let dir = tempfile::tempdir().unwrap();
        let (ctx, _events) = JobContext::detached(dir.path().to_owned());
        let engine = StepEngine::new(true);
        let cancel = ctx.cancel.clone();
        let run = engine.execute(&g, &ctx);
        cancel.cancel();
        let r = report(tokio::time::timeout(Duration::from_secs(5), run).await.expect("sleep did not stop"));
        assert_eq!(r.outcome, RunOutcome::Cancelled);
        assert_eq!(r.failed_step.as_deref(), Some("nap"));
        assert!(r.output["steps"].get("after").is_none());
    }

    /// A one-connection HTTP server answering a fixed response; returns its URL and the request.
    async fn serve_once(response: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            // Read until the end of the headers plus the announced body.
            loop {
                let n = sock.read(&mut buf).await.unwrap();
                req.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&req).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap())
                        })
                        .unwrap_or(0);
                    if req.len() >= end + 4 + len {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            sock.write_all(response.as_bytes()).await.unwrap();
            sock.shutdown().await.ok();
            String::from_utf8_lossy(&req).to_string()
        });
        (url, task)
    }

    #[tokio::test]
    async fn http_step_parses_json_and_keeps_non_2xx() {
        let (url, server) = serve_once(
            "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\nx-test: yes\r\ncontent-length: 13\r\nconnection: close\r\n\r\n{\"missing\":1}",
        )
        .await;
        let wf = json!({"steps": [
            {"id": "fetch", "kind": "http", "method": "post", "url": format!("{url}/customers/{{{{ customer }}}}"),
             "headers": {"x-customer": "{{ customer }}"}, "body": {"name": "{{ customer }}"}},
            {"id": "check", "kind": "log", "message": "status {{ steps.fetch.status }} missing={{ steps.fetch.body.missing }}"}
        ]});
        let r = report(run(&StepEngine::new(true), &grant(wf, json!({"customer": "acme"}))).await.0);
        assert_eq!(r.outcome, RunOutcome::Completed, "{r:?}");
        assert_eq!(r.output["steps"]["fetch"]["status"], json!(404));
        assert_eq!(r.output["steps"]["fetch"]["body"], json!({"missing": 1}));
        assert_eq!(r.output["steps"]["fetch"]["headers"]["x-test"], json!("yes"));
        assert_eq!(r.output["steps"]["check"]["message"], json!("status 404 missing=1"));
        let req = tokio::time::timeout(Duration::from_secs(5), server).await.unwrap().unwrap();
        assert!(req.starts_with("POST /customers/acme HTTP/1.1"), "{req}");
        assert!(req.contains("x-customer: acme"), "{req}");
        assert!(req.ends_with("{\"name\":\"acme\"}"), "{req}");
    }

    #[tokio::test]
    async fn http_text_body_and_transport_error() {
        let (url, _server) =
            serve_once("HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello").await;
        let wf = json!({"steps": [{"id": "get", "kind": "http", "url": url}]});
        let r = report(run(&StepEngine::new(true), &grant(wf, json!({}))).await.0);
        assert_eq!(r.output["steps"]["get"]["body"], json!("hello"));
        assert_eq!(r.output["steps"]["get"]["status"], json!(200));

        // A port nobody listens on: bind one, note it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let wf =
            json!({"steps": [{"id": "down", "kind": "http", "url": format!("http://127.0.0.1:{port}/")}]});
        let r = report(run(&StepEngine::new(true), &grant(wf, json!({}))).await.0);
        assert_eq!(r.outcome, RunOutcome::Failed);
        assert_eq!(r.failed_step.as_deref(), Some("down"));
        assert!(r.error.as_deref().unwrap_or_default().contains("HTTP request"), "{r:?}");
    }
}
