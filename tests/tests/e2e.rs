//! End to end: workflows submitted over HTTP run on real robot agents, against a real
//! nats-server and PostgreSQL, and their results and events come back.

mod common;

use std::time::Duration;

use common::{Stack, WAIT};
use fleet_tests::wait_for;
use futures::StreamExt;
use serde_json::{Value, json};

fn shell_workflow(argv: &[&str]) -> Value {
    json!({
        "workflow_name": "Hello shell",
        "workflow_json": {"id": "hello", "steps": [{"id": "say", "kind": "shell", "argv": argv}]},
        "variables": {"customer": "ACME"},
    })
}

#[tokio::test]
async fn shell_workflow_completes_with_its_stdout() {
    let mut stack = Stack::start().await;
    stack.start_robot(stack.robot_config("r1", &[]));
    let answer = stack.submit(shell_workflow(&["echo", "hi {{customer}}"])).await;
    for key in ["workflow_id", "job_id", "schedule_id", "status", "message", "created_at"] {
        assert!(answer.get(key).is_some(), "submit answer lacks {key}: {answer}");
    }
    assert_eq!(answer["workflow_id"], "hello");
    assert_eq!(answer["schedule_id"], Value::Null);
    let id = answer["job_id"].as_str().unwrap().to_owned();
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["robot_id"], "r1");
    assert_eq!(job["progress"], 100);
    let stdout = job["output"]["steps"]["say"]["stdout"].as_str().unwrap_or_default();
    assert!(stdout.contains("hi ACME"), "stdout in the output: {job}");
    // Every documented field is present (null when unknown).
    for key in [
        "job_id",
        "workflow_id",
        "workflow_name",
        "status",
        "robot_id",
        "robot_name",
        "attempt",
        "priority",
        "required_capabilities",
        "progress",
        "current_node",
        "created_at",
        "started_at",
        "completed_at",
        "duration_ms",
        "output",
        "error_message",
        "waiting_reason",
    ] {
        assert!(job.get(key).is_some(), "job lacks {key}: {job}");
    }
    assert_eq!(job["required_capabilities"], json!(["shell"]));

    let (status, list) = stack.get("/api/v1/metrics/jobs?status=completed&limit=10").await;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "bare array: {list}");
    let (status, robots) = stack.get("/api/v1/metrics/robots").await;
    assert_eq!(status, 200);
    assert_eq!(robots[0]["robot_id"], "r1", "{robots}");
    assert_eq!(robots[0]["capabilities"], json!(["shell"]));
    let (status, fleet) = stack.get("/api/v1/metrics/fleet").await;
    assert_eq!(status, 200);
    assert_eq!(fleet["total_robots"], 1, "{fleet}");
    assert_eq!(fleet["jobs_by_status"]["completed"], 1, "{fleet}");
    stack.stop().await;
}

#[tokio::test]
async fn failing_step_fails_the_job_with_the_steps_error() {
    let mut stack = Stack::start().await;
    stack.start_robot(stack.robot_config("r1", &[]));
    let answer = stack
        .submit(json!({
            "workflow_name": "Fails",
            "workflow_json": {"steps": [
                {"id": "ok", "kind": "log", "message": "fine"},
                {"id": "boom", "kind": "shell", "argv": ["sh", "-c", "echo broken >&2; exit 3"]},
                {"id": "never", "kind": "log", "message": "not reached"}
            ]},
        }))
        .await;
    let job = stack.finished(answer["job_id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error_message"].as_str().unwrap_or_default();
    assert!(error.contains('3') && error.contains("boom"), "error names the step and exit status: {job}");
    assert!(job["output"]["steps"].get("never").is_none(), "later steps did not run: {job}");
    stack.stop().await;
}

#[tokio::test]
async fn events_arrive_as_json_in_order() {
    let mut stack = Stack::start().await;
    let client = stack.nats.client().await.unwrap();
    let mut events = client.subscribe("fleet.events.>").await.unwrap();
    stack.start_robot(stack.robot_config("r1", &[]));
    let answer = stack.submit(shell_workflow(&["true"])).await;
    let id = answer["job_id"].as_str().unwrap().to_owned();
    let mut seen = Vec::new();
    let mut registered = false;
    tokio::time::timeout(WAIT, async {
        while let Some(msg) = events.next().await {
            let event: Value = serde_json::from_slice(&msg.payload).expect("events are JSON objects");
            assert!(event["occurred_at"].is_string() && event["tenant"] == "default", "{event}");
            if event["type"] == "robot.registered" {
                registered = true;
            }
            if event["job_id"] == id.as_str() {
                seen.push((event["type"].as_str().unwrap().to_owned(), event["seq"].as_i64().unwrap()));
                if event["type"] == "job.completed" {
                    break;
                }
            }
        }
    })
    .await
    .expect("job events within the wait");
    let kinds: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["job.submitted", "job.assigned", "job.started", "job.completed"]);
    assert_eq!(seen.iter().map(|(_, s)| *s).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert!(registered, "robot.registered seen");
    stack.stop().await;
}

#[tokio::test]
async fn a_job_submitted_with_no_robot_runs_when_one_starts() {
    let mut stack = Stack::start().await;
    let answer = stack.submit(shell_workflow(&["echo", "late"])).await;
    assert_eq!(answer["status"], "pending", "{answer}");
    let id = answer["job_id"].as_str().unwrap().to_owned();
    let job = stack.job(&id).await;
    assert_eq!(job["waiting_reason"], "no online robot of tenant default has capabilities shell");
    stack.start_robot(stack.robot_config("late-robot", &[]));
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["waiting_reason"], Value::Null);
    stack.stop().await;
}

#[tokio::test]
async fn an_orchestrator_crash_between_submit_and_completion_loses_nothing() {
    let mut stack = Stack::start().await;
    stack.start_robot(stack.robot_config("r1", &[]));
    let mut ids = Vec::new();
    for i in 0..6 {
        let answer = stack
            .submit(json!({
                "workflow_name": format!("slow {i}"),
                "workflow_json": {"steps": [{"id": "wait", "kind": "sleep", "ms": 300}]},
            }))
            .await;
        ids.push(answer["job_id"].as_str().unwrap().to_owned());
    }
    // Crash the orchestrator while the robot works through the queue, then start a new one.
    wait_for("the first job to start", WAIT, || async {
        (stack.job(&ids[0]).await["status"] == "running").then_some(())
    })
    .await
    .unwrap();
    stack.orchestrator.take().unwrap().crash().await;
    tokio::time::sleep(Duration::from_millis(500)).await; // the robot keeps working meanwhile
    stack.orchestrator = Some(Stack::spawn_orchestrator(&stack.nats, &stack.db));
    for id in &ids {
        let job = stack.finished(id).await;
        assert_eq!(job["status"], "completed", "{job}");
    }
    let pool = stack.db.pool().await.unwrap();
    let doubled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT job_id FROM job_history WHERE kind = 'job.completed'
         GROUP BY job_id HAVING count(*) > 1) d",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(doubled, 0, "no job recorded complete twice");
    stack.stop().await;
}

fn canvas_body(robot_id: Option<&str>) -> Value {
    // Exactly what the Canvas desktop app sends (path A), extra fields included.
    json!({
        "workflow_name": "Invoice sync",
        "workflow_json": {
            "metadata": {"name": "Invoice sync", "description": "", "version": "1.0.0"},
            "nodes": {
                "start-1": {"node_id": "start-1", "node_type": "StartNode", "config": {}, "position": [0, 0]},
                "log-2": {"node_id": "log-2", "node_type": "LogNode", "config": {"message": "hello"}},
                "end-3": {"node_id": "end-3", "node_type": "EndNode", "config": {}}
            },
            "connections": [
                {"source_node": "start-1", "source_port": "exec_out", "target_node": "log-2", "target_port": "exec_in"},
                {"source_node": "log-2", "source_port": "exec_out", "target_node": "end-3", "target_port": "exec_in"}
            ],
            "variables": {"customer": {"type": "String", "default_value": "ACME"}},
            "frames": [],
            "settings": {"stop_on_error": true}
        },
        "trigger_type": "manual",
        "execution_mode": "lan",
        "priority": 10,
        "metadata": {
            "robot_id": robot_id,
            "variables": {"invoice": 42},
            "submitted_from": "canvas",
            "canvas_file": "C:/flows/invoice.json"
        }
    })
}

#[tokio::test]
async fn a_canvas_graph_runs_through_its_runner_and_waits_for_one() {
    let mut stack = Stack::start().await;
    // A robot without the runner: the graph waits, with a reason.
    stack.start_robot(stack.robot_config("plain", &[]));
    let answer = stack.submit(canvas_body(None)).await;
    let id = answer["job_id"].as_str().unwrap().to_owned();
    assert_eq!(answer["status"], "pending", "{answer}");
    assert_eq!(
        stack.job(&id).await["waiting_reason"],
        "no online robot of tenant default has capabilities casare"
    );

    let runner = fleet_tests::workspace_root().join("tests/fixtures/run_canvas.py");
    let mut config = stack.robot_config("canvas", &["desktop"]);
    config.runners = vec![
        format!("casare=python3 {} {{workflow}} {{variables}}", runner.display())
            .parse()
            .expect("runner spec"),
    ];
    stack.start_robot(config);
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["robot_id"], "canvas");
    assert_eq!(job["output"]["executed_nodes"], json!(["start-1", "log-2", "end-3"]), "{job}");
    // Workflow defaults and the submission's variables both reach the runner.
    assert_eq!(job["output"]["variables"]["customer"], "ACME");
    assert_eq!(job["output"]["variables"]["invoice"], 42);
    // The last node is recorded without the completion waiting for it, so it may land just
    // after the job finished (before, a node that lost that race was dropped for good).
    wait_for("the job to show the node it ended on", WAIT, || async {
        (stack.job(&id).await["current_node"] == "end-3").then_some(())
    })
    .await
    .unwrap();

    // Targeted at a robot that lacks the runner: waits with that reason.
    let answer = stack.submit(canvas_body(Some("plain"))).await;
    let job = stack.job(answer["job_id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "pending");
    assert_eq!(job["waiting_reason"], "target robot plain lacks capabilities casare", "{job}");
    stack.stop().await;
}

#[tokio::test]
async fn bad_input_gets_400_or_422_never_500() {
    let stack = Stack::start().await;
    let (status, body) = stack.post_raw("/api/v1/workflows", "{not json").await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["code"].is_string() && body["request_id"].is_string(), "{body}");
    let cases = [
        (json!({"workflow_json": {"steps": []}}), "workflow_name"),
        (json!({"workflow_name": "x"}), "workflow_json"),
        (json!({"workflow_name": "x", "workflow_json": "not json"}), "workflow_json"),
        (
            json!({"workflow_name": "x", "workflow_json": {"steps": [{"id": "a", "kind": "shell"}]}}),
            "workflow_json.steps[0].argv",
        ),
        (
            json!({"workflow_name": "x", "workflow_json": {"steps": [{"id": "a", "kind": "log", "message": "m"}]}, "priority": 21}),
            "priority",
        ),
        (
            json!({"workflow_name": "x", "workflow_json": {"steps": [{"id": "a", "kind": "log", "message": "m"}]}, "priority": "high"}),
            "priority",
        ),
        (
            json!({"workflow_name": "x", "workflow_json": {"steps": [{"id": "a", "kind": "log", "message": "m"}]}, "trigger_type": "scheduled"}),
            "trigger_type",
        ),
        (
            json!({"workflow_name": "x", "workflow_json": {"steps": [{"id": "a", "kind": "log", "message": "m"}]}, "required_capabilities": ["GPU!"]}),
            "required_capabilities[0]",
        ),
        (
            json!({"workflow_name": "x", "workflow_json": {"steps": [{"id": "a", "kind": "log", "message": "m"}]}, "target_robot_id": "nobody"}),
            "target_robot_id",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = stack.post("/api/v1/workflows", &body).await;
        assert_eq!(status, 422, "{body} → {answer}");
        assert_eq!(answer["error"]["field"], field, "{body} → {answer}");
    }
    let (status, _) = stack.get("/api/v1/metrics/jobs/not-a-uuid").await;
    assert_eq!(status, 404);
    let (status, _) = stack.get(&format!("/api/v1/metrics/jobs/{}", uuid::Uuid::new_v4())).await;
    assert_eq!(status, 404);
    stack.stop().await;
}

#[tokio::test]
async fn a_job_past_its_timeout_ends_timed_out() {
    let mut stack = Stack::start().await;
    stack.start_robot(stack.robot_config("r1", &[]));
    let answer = stack
        .submit(json!({
            "workflow_name": "Too slow",
            "workflow_json": {"steps": [{"id": "nap", "kind": "sleep", "ms": 60000}]},
            "timeout_s": 1,
        }))
        .await;
    let job = stack.finished(answer["job_id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "timed_out", "{job}");
    assert!(job["error_message"].as_str().unwrap_or_default().contains("timed out"), "{job}");
    stack.stop().await;
}

#[tokio::test]
async fn cancelling_a_running_job_kills_its_process() {
    let mut stack = Stack::start().await;
    stack.start_robot(stack.robot_config("r1", &[]));
    let marker = stack.dir("marker").join("still-running");
    let script = format!("sleep 3; touch {}", marker.display());
    let answer = stack
        .submit(json!({
            "workflow_name": "Long",
            "workflow_json": {"steps": [{"id": "long", "kind": "shell", "argv": ["sh", "-c", script]}]},
        }))
        .await;
    let id = answer["job_id"].as_str().unwrap().to_owned();
    wait_for("the job to run", WAIT, || async {
        (stack.job(&id).await["status"] == "running").then_some(())
    })
    .await
    .unwrap();
    let r = stack.http.post(format!("{}/api/v1/jobs/{id}/cancel", stack.base)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["cancelled"], true, "{body}");
    assert_eq!(body["previous_status"], "running", "{body}");
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    // The shell's process group was killed: the script never reaches its `touch`.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!marker.exists(), "the cancelled job's process kept running");
    stack.stop().await;
}

/// The `fleet-robot` binary next to the test executable (cargo builds it for the workspace's
/// tests; `cargo build --bins` otherwise).
fn robot_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
    let bin = dir.join("fleet-robot");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --bins` (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

#[tokio::test]
async fn the_robot_binary_runs_jobs_and_drains_on_sigterm() {
    let stack = Stack::start().await;
    let state = stack.dir("binary-robot");
    let mut child = tokio::process::Command::new(robot_binary())
        .args(["--tenant", "default", "--id", "bin-robot", "--capabilities", "desktop", "--max-jobs", "2"])
        .arg("--state-dir")
        .arg(&state)
        .env("NATS_URL", stack.nats.url())
        .env("FLEET_ROBOT_KEY", &stack.robot_key)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let answer = stack
        .submit(json!({
            "workflow_name": "Binary",
            "workflow_json": {"requires": ["desktop"], "steps": [{"id": "say", "kind": "shell", "argv": ["echo", "from the binary"]}]},
        }))
        .await;
    let job = stack.finished(answer["job_id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["robot_id"], "bin-robot");
    let (_, robots) = stack.get("/api/v1/metrics/robots").await;
    assert_eq!(robots[0]["capabilities"], json!(["desktop", "shell"]), "{robots}");
    assert_eq!(robots[0]["max_concurrent_jobs"], 2);

    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(WAIT, child.wait()).await.expect("robot exits after SIGTERM").unwrap();
    assert!(exit.success(), "clean exit on SIGTERM: {exit}");
    // Its instance id (which tells this robot from an impostor with the same id) is kept.
    assert!(state.join("instance-id").exists());
    stack.stop().await;
}

#[tokio::test]
async fn robots_obey_pause_maintenance_resume_and_stop_commands() {
    let mut stack = Stack::start().await;
    stack.start_robot(stack.robot_config("cmd", &[]));
    wait_for("the robot to be online", WAIT, || async {
        let (_, r) = stack.get("/api/v1/metrics/robots/cmd").await;
        (r["status"] == "online").then_some(())
    })
    .await
    .unwrap();

    // Pause: the robot stays online but takes no work; a job waits and says why.
    let (status, answer) = stack.post("/api/v1/robots/cmd/pause", &Value::Null).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], true, "{answer}");
    wait_for("the robot to report paused", WAIT, || async {
        (stack.get("/api/v1/metrics/robots/cmd").await.1["state"] == "paused").then_some(())
    })
    .await
    .unwrap();
    let id = stack.submit(shell_workflow(&["echo", "later"])).await["job_id"].as_str().unwrap().to_owned();
    let job = wait_for("the job to wait for a paused robot", WAIT, || async {
        let job = stack.job(&id).await;
        job["waiting_reason"].as_str().is_some_and(|r| r.contains("paused")).then_some(job)
    })
    .await
    .unwrap();
    assert_eq!(job["status"], "pending", "{job}");

    // Maintenance through the Canvas's status endpoint, then back online: the job runs.
    let r = stack
        .http
        .put(format!("{}/api/v1/robots/cmd/status", stack.base))
        .json(&json!({"status": "maintenance"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_for("the robot to report maintenance", WAIT, || async {
        (stack.get("/api/v1/metrics/robots/cmd").await.1["status"] == "maintenance").then_some(())
    })
    .await
    .unwrap();
    let (status, answer) = stack.post("/api/v1/robots/commands", &json!({"command": "online"})).await;
    assert_eq!((status, answer["count"].as_u64()), (200, Some(1)), "{answer}");
    assert_eq!(stack.finished(&id).await["status"], "completed");

    // Stop: the robot finishes and exits on its own.
    let (status, _) = stack.post("/api/v1/robots/cmd/stop", &json!({"force": false})).await;
    assert_eq!(status, 200);
    let robot = stack.robots.remove(0);
    tokio::time::timeout(WAIT, robot.task).await.expect("the robot stops when told").unwrap().unwrap();
    let (status, body) = stack.post("/api/v1/robots/nobody/pause", &Value::Null).await;
    assert_eq!(status, 404, "{body}");
    stack.stop().await;
}
