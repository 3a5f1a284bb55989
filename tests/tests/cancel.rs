//! Cancel that always works, and robot reports that always fit (issue 11).
//!
//! Before: a job whose report could not be sent or stored (larger than the server's max payload,
//! or holding U+0000) was retried as "unavailable" forever, the job stayed `running` and its
//! robot's slot stayed taken; cancel of a running job only set a flag the next lease renewal
//! carried, so the job showed `cancelled` a renewal later and a wedged robot never stopped. Now
//! every report is cut to a budget (the full text kept in the job's log), and cancel ends a
//! running job in the record at once, frees the slot and pushes the cancel to the robot.

mod common;

use std::time::{Duration, Instant};

use common::{Stack, WAIT};
use fleet_schemas::codec::{decode, encode};
use fleet_schemas::robot::{Ack, CompleteRequest, RenewGrant, RenewRequest, RobotReply, RunOutcome};
use fleet_schemas::subjects::{self, RobotVerb};
use fleet_schemas::{JobId, RobotId, SessionId, TenantId};
use fleet_tests::{TcpProxy, wait_for};
use serde_json::{Value, json};

/// All log lines of a job, read page by page.
async fn all_logs(stack: &Stack, id: &str) -> Vec<Value> {
    let mut lines = Vec::new();
    let mut path = format!("/api/v1/jobs/{id}/logs?limit=10000");
    loop {
        let (status, page) = stack.get(&path).await;
        assert_eq!(status, 200, "{page}");
        let logs = page["logs"].as_array().cloned().unwrap_or_default();
        let Some(next) = page["next_since"].as_u64().filter(|_| !logs.is_empty()) else {
            lines.extend(logs);
            return lines;
        };
        lines.extend(logs);
        path = format!("/api/v1/jobs/{id}/logs?limit=10000&since={next}");
    }
}

/// The text of the log lines of one stream (and step, if given), in order.
fn log_text(lines: &[Value], stream: &str, step: Option<&str>) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l["stream"] == stream && step.is_none_or(|s| l["step"] == s))
        .map(|l| l["line"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The history kinds of a job, in order.
async fn history(stack: &Stack, id: &str) -> Vec<String> {
    let pool = stack.db.pool().await.unwrap();
    sqlx::query_scalar("SELECT kind FROM job_history WHERE job_id = $1 ORDER BY seq")
        .bind(uuid::Uuid::parse_str(id).unwrap())
        .fetch_all(&pool)
        .await
        .unwrap()
}

fn count(kinds: &[String], kind: &str) -> usize {
    kinds.iter().filter(|k| *k == kind).count()
}

/// A stack with one 1-slot robot `r1`.
async fn one_slot_stack(adjust: impl FnOnce(&mut fleet_orchestrator::Config)) -> Stack {
    let mut stack = Stack::start_with(adjust).await;
    let mut config = stack.robot_config("r1", &[]);
    config.max_jobs = 1;
    stack.start_robot(config);
    stack.wait_robots_online(1).await;
    stack
}

fn workflow(name: &str, steps: Value) -> Value {
    json!({"workflow_name": name, "workflow_json": {"steps": steps}})
}

fn shell(id: &str, script: &str) -> Value {
    json!({"id": id, "kind": "shell", "argv": ["sh", "-c", script]})
}

async fn submit(stack: &Stack, body: Value) -> String {
    stack.submit(body).await["job_id"].as_str().unwrap().to_owned()
}

/// The next job on the robot runs to its end: the slot was freed.
async fn next_job_runs(stack: &Stack) {
    let id = submit(stack, workflow("Next", json!([shell("say", "echo next")]))).await;
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "completed", "the next job on the 1-slot robot: {job}");
}

/// A shell step printing `lines` lines of 1000 bytes (each starts with its number): its output
/// keeps the tail and says so, every line is in the log, and the robot's slot frees.
async fn large_output_completes(lines: usize) {
    let stack = one_slot_stack(|_| {}).await;
    let script = format!("i=0; while [ $i -lt {lines} ]; do printf '%08d%0991d\\n' $i 0; i=$((i+1)); done");
    let id = submit(&stack, workflow("Loud", json!([shell("loud", &script)]))).await;
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "completed", "{}", &job.to_string()[..job.to_string().len().min(2000)]);
    let step = &job["output"]["steps"]["loud"];
    let cut = &step["truncated"]["stdout"];
    assert_eq!(cut["original_bytes"], json!(lines * 1000), "the marker names the full size: {cut}");
    assert_eq!(cut["in"], "log", "{cut}");
    let kept = step["stdout"].as_str().unwrap();
    assert_eq!(cut["kept_bytes"], json!(kept.len()), "{cut}");
    assert!(kept.len() < 100 * 1024, "the recorded output is bounded: {} bytes", kept.len());
    assert!(kept.ends_with(&format!("{:08}{:0991}\n", lines - 1, 0)), "the tail is kept");

    let logged = log_text(&all_logs(&stack, &id).await, "stdout", Some("loud"));
    assert_eq!(logged.len(), lines, "every line is in the log");
    for (i, line) in logged.iter().enumerate() {
        assert_eq!(line, &format!("{i:08}{:0991}", 0), "line {i} of the log");
    }
    next_job_runs(&stack).await;
    stack.stop().await;
}

#[tokio::test]
async fn a_job_printing_1_8_mb_completes_with_a_marker_and_its_full_text_in_the_log() {
    large_output_completes(1800).await;
}

#[tokio::test]
async fn a_job_printing_5_mb_completes_with_a_marker_and_its_full_text_in_the_log() {
    large_output_completes(5000).await;
}

/// Twelve steps each keeping 128 KiB (stdout and stderr tails) make an output of 1.5 MiB, more
/// than one message holds: it used to be retried as "unavailable" forever. Now the recorded
/// output is cut to its budget with a top-level marker, and the full output's JSON is in the
/// log (stream `output`), whole.
#[tokio::test]
async fn an_output_larger_than_max_payload_is_truncated_and_kept_whole_in_the_log() {
    let stack = one_slot_stack(|_| {}).await;
    let print = "head -c 70000 /dev/zero | tr '\\0' a; echo; head -c 70000 /dev/zero | tr '\\0' b >&2";
    let steps: Vec<Value> = (0..12).map(|i| shell(&format!("s{i}"), print)).collect();
    let id = submit(&stack, workflow("Wide", Value::Array(steps))).await;
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "completed", "{}", &job.to_string()[..job.to_string().len().min(2000)]);
    let recorded = job["output"].to_string().len();
    assert!(recorded <= 256 * 1024 + 1024, "recorded output is bounded: {recorded} bytes");
    let marker = &job["output"]["truncated"];
    assert_eq!(marker["in"], "log", "{marker}");
    assert_eq!(marker["log_stream"], "output", "{marker}");
    let original = marker["original_bytes"].as_u64().unwrap() as usize;
    assert!(original > 1024 * 1024, "{marker}");
    assert!(job["output"]["steps"]["s11"]["stdout"].as_str().unwrap().contains("bytes cut"), "shape kept");

    let full = log_text(&all_logs(&stack, &id).await, "output", None).concat();
    assert_eq!(full.len(), original, "the full output is in the log");
    let full: Value = serde_json::from_str(&full).expect("the chunks join into the output's JSON");
    for i in 0..12 {
        let stdout = full["steps"][format!("s{i}")]["stdout"].as_str().unwrap();
        assert!(stdout.len() > 64 * 1024 - 100 && stdout.bytes().all(|b| b == b'a' || b == b'\n'), "s{i}");
    }
    next_job_runs(&stack).await;
    stack.stop().await;
}

/// PostgreSQL refuses U+0000; an output full of it used to be answered "unavailable" (a
/// database error) and retried forever.
#[tokio::test]
async fn an_output_holding_nul_characters_completes() {
    let stack = one_slot_stack(|_| {}).await;
    let id = submit(&stack, workflow("Zeros", json!([shell("zeros", "head -c 100000 /dev/zero")]))).await;
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "completed", "{}", &job.to_string()[..job.to_string().len().min(2000)]);
    let stdout = job["output"]["steps"]["zeros"]["stdout"].as_str().unwrap();
    assert!(stdout.starts_with('\u{FFFD}') && !stdout.contains('\0'), "NUL is stored as U+FFFD");
    next_job_runs(&stack).await;
    stack.stop().await;
}

/// A log line, a step result and an error message of 1.6 MB each (rendered from a template):
/// the line is split into pieces that join into the whole text, the error is cut to its budget
/// with a marker, and the job fails with it rather than staying `running`.
#[tokio::test]
async fn a_huge_log_line_and_error_message_are_bounded() {
    let stack = one_slot_stack(|_| {}).await;
    let huge = "{% for i in range(100) %}{{ steps.a.stdout }}{% endfor %}";
    let steps = json!([
        shell("a", "printf '%016000d' 7"),
        {"id": "big", "kind": "log", "message": huge},
        {"id": "boom", "kind": "fail", "message": huge},
    ]);
    let id = submit(&stack, workflow("Huge", steps)).await;
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "failed", "{}", &job.to_string()[..job.to_string().len().min(2000)]);
    let error = job["error_message"].as_str().unwrap();
    assert!(error.starts_with("step boom failed: 0000"), "{}", &error[..100]);
    assert!(error.len() <= 8 * 1024 + 64, "the error is bounded: {} bytes", error.len());
    assert!(error.ends_with("more bytes; see the job log]"), "{}", &error[error.len() - 60..]);
    assert_eq!(job["output"]["truncated"]["in"], "log", "the 1.6 MB step result is truncated");

    let logs = all_logs(&stack, &id).await;
    let line = log_text(&logs, "fleet", Some("big"));
    assert!(line.len() > 1, "the line went as several messages: {}", line.len());
    assert!(line.iter().all(|l| l.len() <= 16 * 1024));
    assert_eq!(line.concat(), format!("{}7\n", "0".repeat(15_999)).repeat(100), "split, not cut");
    stack.stop().await;
}

/// The robot's session and the attempt of a job, from the record.
async fn attempt_of(stack: &Stack, id: &str) -> (SessionId, i32) {
    let pool = stack.db.pool().await.unwrap();
    let (session, attempt): (uuid::Uuid, i32) =
        sqlx::query_as("SELECT session_id, attempt FROM jobs WHERE job_id = $1")
            .bind(uuid::Uuid::parse_str(id).unwrap())
            .fetch_one(&pool)
            .await
            .unwrap();
    (SessionId(session), attempt)
}

/// A long job that writes its shell's pid, then (much later) a marker file.
fn long_job(stack: &Stack, name: &str) -> (Value, std::path::PathBuf, std::path::PathBuf) {
    let dir = stack.dir(name);
    let (pid, marker) = (dir.join("pid"), dir.join("still-running"));
    let script = format!("echo $$ > {}; sleep 30; touch {}", pid.display(), marker.display());
    (workflow(name, json!([shell("long", &script)])), pid, marker)
}

async fn wait_running(stack: &Stack, id: &str) {
    wait_for("the job to run", WAIT, || async { (stack.job(id).await["status"] == "running").then_some(()) })
        .await
        .unwrap();
}

async fn read_pid(path: &std::path::Path) -> u32 {
    wait_for("the script's pid", WAIT, || async { std::fs::read_to_string(path).ok()?.trim().parse().ok() })
        .await
        .unwrap()
}

/// Wait (bounded) until a process no longer runs (gone, or a zombie).
async fn wait_gone(pid: u32, within: Duration) -> Result<(), String> {
    wait_for(format!("process {pid} to be killed"), within, || async {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => Some(()),
            Ok(stat) => {
                stat.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z')).then_some(())
            }
        }
    })
    .await
    .map_err(|e| e.to_string())
}

/// Start a long job on `stack` and wait until it runs: its id, its shell's pid, the marker path.
async fn running_long_job(stack: &Stack, name: &str) -> (String, u32, std::path::PathBuf) {
    let (body, pid_file, marker) = long_job(stack, name);
    let id = submit(stack, body).await;
    wait_running(stack, &id).await;
    let pid = read_pid(&pid_file).await;
    (id, pid, marker)
}

async fn cancel(stack: &Stack, id: &str) -> (u16, Value) {
    stack.post(&format!("/api/v1/jobs/{id}/cancel"), &json!({})).await
}

/// With a 30 s lease the renewal comes every 10 s: everything here within 2 s is the push.
#[tokio::test]
async fn cancel_ends_a_running_job_at_once_kills_its_process_and_frees_the_slot() {
    let stack = one_slot_stack(|c| c.job_lease = Duration::from_secs(30)).await;
    let (id, pid, marker) = running_long_job(&stack, "long").await;
    // Waits behind the long job on the 1-slot robot.
    let next = submit(&stack, workflow("Next", json!([shell("say", "echo next")]))).await;

    let asked = Instant::now();
    let (status, answer) = cancel(&stack, &id).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["cancelled"], true, "{answer}");
    assert_eq!(answer["previous_status"], "running", "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("told to stop it now"), "{answer}");
    let job = stack.job(&id).await;
    assert_eq!(job["status"], "cancelled", "cancelled in the record as the cancel answers: {job}");
    assert!(asked.elapsed() < Duration::from_secs(2), "{:?}", asked.elapsed());

    wait_gone(pid, Duration::from_secs(2)).await.expect("the step's process is killed within 2 s");
    eprintln!("cancel to the step's process killed: {:?}", asked.elapsed());
    let done = stack.finished(&next).await;
    assert_eq!(done["status"], "completed", "{done}");
    let freed = asked.elapsed();
    eprintln!("cancel to the next job's completion: {freed:?}");
    assert!(freed < Duration::from_secs(2), "the slot freed long after the cancel: {freed:?}");
    assert!(!marker.exists(), "the cancelled script went on");

    // Repeated: harmless, says so, changes nothing.
    let (status, again) = cancel(&stack, &id).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["cancelled"], false, "{again}");
    assert_eq!(again["previous_status"], "cancelled", "{again}");
    let kinds = history(&stack, &id).await;
    assert_eq!(count(&kinds, "job.cancelled"), 1, "{kinds:?}");
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("job.cancelled"),
        "nothing after the cancel: {kinds:?}"
    );
    stack.stop().await;
}

/// A completion (and a renewal) of the cancelled attempt arriving after the cancel is refused,
/// and changes nothing in the record.
#[tokio::test]
async fn a_late_report_from_a_cancelled_attempt_is_refused_and_recorded_nowhere() {
    let stack = one_slot_stack(|c| c.job_lease = Duration::from_secs(30)).await;
    let (id, _, _) = running_long_job(&stack, "late").await;
    let (session, attempt) = attempt_of(&stack, &id).await;
    let (status, answer) = cancel(&stack, &id).await;
    assert_eq!((status, &answer["cancelled"]), (200, &json!(true)), "{answer}");

    let client = stack.nats.client().await.unwrap();
    let (tenant, robot) = (TenantId::default_tenant(), RobotId::new("r1").unwrap());
    let job_id = JobId(uuid::Uuid::parse_str(&id).unwrap());
    let late = CompleteRequest {
        v: 1,
        session_id: session,
        job_id,
        attempt,
        outcome: RunOutcome::Completed,
        output: json!({"late": true}),
        error: None,
        failed_step: None,
    };
    let ask = |verb: RobotVerb, payload: Vec<u8>| {
        let subject = subjects::robot_request(&tenant, &robot, verb);
        let client = client.clone();
        async move { client.request(subject, payload.into()).await.unwrap().payload }
    };
    let reply: RobotReply<Ack> = decode("reply", &ask(RobotVerb::Complete, encode(&late)).await).unwrap();
    assert!(matches!(reply, RobotReply::Refused { .. }), "late completion: {reply:?}");
    let renew = RenewRequest { v: 1, session_id: session, job_id, attempt };
    let reply: RobotReply<RenewGrant> =
        decode("reply", &ask(RobotVerb::Renew, encode(&renew)).await).unwrap();
    assert!(matches!(reply, RobotReply::Refused { .. }), "late renewal: {reply:?}");

    let job = stack.job(&id).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert_ne!(job["output"], json!({"late": true}), "{job}");
    let kinds = history(&stack, &id).await;
    assert_eq!(count(&kinds, "job.cancelled"), 1, "{kinds:?}");
    assert_eq!(count(&kinds, "job.completed"), 0, "{kinds:?}");
    stack.stop().await;
}

/// The robot is gone (crashed mid-job): cancel still ends the job at once.
#[tokio::test]
async fn cancel_of_a_job_whose_robot_is_dead_ends_it_at_once() {
    let mut stack = one_slot_stack(|c| c.job_lease = Duration::from_secs(30)).await;
    let (id, _, _) = running_long_job(&stack, "orphan").await;
    stack.robots.pop().unwrap().crash().await;
    let (status, answer) = cancel(&stack, &id).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["cancelled"], true, "{answer}");
    assert_eq!(stack.job(&id).await["status"], "cancelled");
    assert_eq!(count(&history(&stack, &id).await, "job.cancelled"), 1);
    stack.stop().await;
}

/// PostgreSQL unreachable: cancel answers 503 and does nothing (the job keeps running, its
/// process too); once it is back, cancel works.
#[tokio::test]
async fn cancel_while_postgres_is_unreachable_answers_503_and_changes_nothing() {
    let proxy = TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await.unwrap();
    let port = proxy.port();
    let stack = one_slot_stack(|c| {
        c.job_lease = Duration::from_secs(30);
        c.database_url.0 = c.database_url.0.replace("127.0.0.1:5432", &format!("127.0.0.1:{port}"));
    })
    .await;
    let (id, pid, _) = running_long_job(&stack, "outage").await;

    proxy.cut();
    let (status, answer) = cancel(&stack, &id).await;
    proxy.restore();
    assert_eq!(status, 503, "{answer}");
    assert!(wait_gone(pid, Duration::from_millis(500)).await.is_err(), "the job's process was killed");
    let (status, answer) = wait_for("cancel after the outage", WAIT, || async {
        let (status, answer) = cancel(&stack, &id).await;
        (status == 200).then_some((status, answer))
    })
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(answer["previous_status"], "running", "nothing was half-done: {answer}");
    wait_gone(pid, Duration::from_secs(2)).await.expect("killed once the cancel went through");
    assert_eq!(count(&history(&stack, &id).await, "job.cancelled"), 1);
    stack.stop().await;
}

/// Cancel and completion arriving together: exactly one wins, with one event, and the cancel's
/// answer says which. The cancels are spread around the moment each job ends (a 300 ms step,
/// cancelled 0–550 ms after it is seen running), so some land before and some after.
#[tokio::test]
async fn cancel_racing_the_completion_has_exactly_one_winner() {
    let stack = one_slot_stack(|_| {}).await;
    let mut outcomes = Vec::new();
    for i in 0..12u64 {
        let id = submit(&stack, workflow("Race", json!([shell("nap", "sleep 0.3")]))).await;
        wait_running(&stack, &id).await;
        tokio::time::sleep(Duration::from_millis(i * 50)).await;
        let (status, answer) = cancel(&stack, &id).await;
        assert_eq!(status, 200, "{answer}");
        let job = stack.finished(&id).await;
        let kinds = history(&stack, &id).await;
        let (completed, cancelled) = (count(&kinds, "job.completed"), count(&kinds, "job.cancelled"));
        assert_eq!(completed + cancelled, 1, "one terminal event: {kinds:?}");
        let won = answer["cancelled"] == true;
        assert_eq!(job["status"], if won { "cancelled" } else { "completed" }, "{answer} {job}");
        assert_eq!(cancelled == 1, won, "{answer} {kinds:?}");
        outcomes.push(won);
    }
    eprintln!("cancel won {} of {} races", outcomes.iter().filter(|w| **w).count(), outcomes.len());
    next_job_runs(&stack).await;
    stack.stop().await;
}

/// A runner reporting progress with a 15 KB node name: the job's `current_node` is cut to its
/// 512-byte budget (it used to be stored whole). The runner then waits to be cancelled, which
/// kills it like a step.
#[tokio::test]
async fn a_huge_progress_node_is_bounded() {
    let mut stack = Stack::start_with(|c| c.job_lease = Duration::from_secs(30)).await;
    let dir = stack.dir("runner");
    let script = dir.join("runner.sh");
    std::fs::write(
        &script,
        "printf 'FLEET_PROGRESS 50 %s\\n' \"$(head -c 15000 /dev/zero | tr '\\0' n)\"\nsleep 30\n",
    )
    .unwrap();
    let mut config = stack.robot_config("canvas", &[]);
    config.runners =
        vec![format!("casare=sh {} {{workflow}}", script.display()).parse().expect("runner spec")];
    stack.start_robot(config);
    let graph = json!({
        "nodes": {"start-1": {"node_id": "start-1", "node_type": "StartNode", "config": {}}},
        "connections": [],
    });
    let id = submit(&stack, json!({"workflow_name": "Graph", "workflow_json": graph})).await;
    let job = wait_for("the progress", WAIT, || async {
        let job = stack.job(&id).await;
        job["current_node"].is_string().then_some(job)
    })
    .await
    .unwrap();
    let node = job["current_node"].as_str().unwrap();
    assert!(node.len() <= 512, "current_node is bounded: {} bytes", node.len());
    assert!(node.starts_with("nnnn") && node.ends_with("see the job log]"), "{node}");
    assert_eq!(job["progress"], 50, "{job}");
    let (status, answer) = cancel(&stack, &id).await;
    assert_eq!((status, &answer["cancelled"]), (200, &json!(true)), "{answer}");
    stack.stop().await;
}
