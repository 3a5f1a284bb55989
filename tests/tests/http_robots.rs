//! The seed's HTTP robot agent, as it talks to the gateway: a robot key in `X-Api-Key`,
//! `POST /api/v1/robots/{id}/heartbeat`, `PUT …/status`, and the robot-facing job calls of the
//! Canvas contract (`claim`, `extend-lease`, `complete`, `fail`, `release`), on the same claim,
//! lease and fencing as NATS robots (real gateway, orchestrator, nats-server and PostgreSQL).
//!
//! Regression: every one of these calls answered 404 or 422 before, so the seed's own robot
//! could not join a Fleet stack.

mod common;

use std::time::Duration;

use common::{Secure, Stack, WAIT};
use fleet_schemas::TenantId;
use fleet_schemas::keys::Role;
use fleet_tests::wait_for;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A tenant's admin and the secure gateway.
struct Tenant {
    secure: Secure,
    admin: String,
}

/// One HTTP robot: its id and robot key.
#[derive(Clone)]
struct Agent {
    secure: Secure,
    robot: String,
    key: String,
}

impl Tenant {
    async fn new(stack: &Stack, secure: &Secure, tenant: &str) -> Tenant {
        Tenant { secure: secure.clone(), admin: stack.cli_key(tenant, Role::Admin, None).await }
    }

    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.secure.send(method, path, Some(&self.admin), body).await
    }

    /// Register a robot as an admin would (`POST /api/v1/robots/register`) and make its key.
    async fn robot(&self, id: &str, caps: &[&str], slots: u32) -> Agent {
        let body = json!({"robot_id": id, "name": id, "hostname": "seed-host", "capabilities": caps,
            "max_concurrent_jobs": slots, "environment": "production"});
        let (status, answer) = self.send(Method::POST, "/api/v1/robots/register", Some(body)).await;
        assert_eq!(status, 200, "register {id}: {answer}");
        let body = json!({"robot_id": id, "name": format!("{id} key")});
        let (status, made) = self.send(Method::POST, "/api/v1/robot-api-keys", Some(body)).await;
        assert_eq!(status, 200, "robot key of {id}: {made}");
        Agent {
            secure: self.secure.clone(),
            robot: id.to_owned(),
            key: made["api_key"].as_str().unwrap().to_owned(),
        }
    }

    async fn submit(&self, name: &str, priority: u32, caps: &[&str]) -> String {
        let body = json!({
            "workflow_name": name,
            "workflow_json": {"steps": [{"id": "a", "kind": "log", "message": name}], "variables": {"who": name}},
            "priority": priority,
            "required_capabilities": caps,
        });
        let (status, answer) = self.send(Method::POST, "/api/v1/workflows", Some(body)).await;
        assert_eq!(status, 200, "submit {name}: {answer}");
        answer["job_id"].as_str().unwrap().to_owned()
    }

    async fn job(&self, id: &str) -> Value {
        let (status, job) = self.send(Method::GET, &format!("/api/v1/metrics/jobs/{id}"), None).await;
        assert_eq!(status, 200, "job {id}: {job}");
        job
    }

    async fn robot_view(&self, id: &str) -> Value {
        let (status, robot) = self.send(Method::GET, &format!("/api/v1/metrics/robots/{id}"), None).await;
        assert_eq!(status, 200, "robot {id}: {robot}");
        robot
    }
}

impl Agent {
    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.secure.send(method, path, Some(&self.key), body).await
    }

    async fn heartbeat(&self) -> (u16, Value) {
        let path = format!("/api/v1/robots/{}/heartbeat", self.robot);
        self.send(Method::POST, &path, Some(json!({"cpu_percent": 12.5, "memory_mb": null}))).await
    }

    /// Heartbeat every half second until `stop` (what the seed's agent does on its own timer).
    fn keep_alive(&self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let agent = self.clone();
        tokio::spawn(async move {
            loop {
                let (status, answer) = agent.heartbeat().await;
                assert_eq!(status, 200, "heartbeat of {}: {answer}", agent.robot);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        })
    }

    async fn claim(&self, lease_s: u32) -> (u16, Value) {
        let body = json!({"environment": "production", "limit": 1, "visibility_timeout_seconds": lease_s});
        self.send(Method::POST, "/api/v1/jobs/claim", Some(body)).await
    }

    /// Claim until a job comes (offers are published just after the submit's answer).
    async fn claim_next(&self, lease_s: u32) -> Value {
        wait_for(format!("{} to claim a job", self.robot), WAIT, || async {
            let (status, job) = self.claim(lease_s).await;
            assert_eq!(status, 200, "claim: {job}");
            (!job.is_null()).then_some(job)
        })
        .await
        .unwrap()
    }

    async fn report(&self, job: &str, verb: &str, body: Option<Value>) -> (u16, Value) {
        self.send(Method::POST, &format!("/api/v1/jobs/{job}/{verb}"), body).await
    }
}

async fn secure_stack(adjust: impl FnOnce(&mut fleet_orchestrator::Config)) -> (Stack, Secure) {
    let stack = Stack::start_with(adjust).await;
    let secure = Secure::start(&stack).await;
    (stack, secure)
}

/// Register, heartbeat → online; claim → `null`; a job → claim returns it with every field the
/// contract lists; extend the lease; complete → `completed` with the result; fail → `failed`;
/// `PUT …/status` takes every word of the contract; keys of the wrong kind or tenant are refused.
#[tokio::test]
async fn an_http_robot_joins_claims_and_reports() {
    let (stack, secure) = secure_stack(|_| {}).await;
    let acme = Tenant::new(&stack, &secure, "acme").await;
    let agent = acme.robot("seed-1", &[], 1).await;

    // Heartbeats: the robot goes online; `{}`, no body and nulls are fine; another id is 404.
    let (status, _) = agent.send(Method::POST, "/api/v1/robots/seed-1/heartbeat", Some(json!({}))).await;
    assert_eq!(status, 200);
    let (status, _) = agent.send(Method::POST, "/api/v1/robots/seed-1/heartbeat", None).await;
    assert_eq!(status, 200, "no body at all");
    let (status, answer) = agent.send(Method::POST, "/api/v1/robots/nobody/heartbeat", Some(json!({}))).await;
    assert_eq!(status, 404, "unknown robot: {answer}");
    let (status, beat) = agent.heartbeat().await;
    assert_eq!(status, 200, "{beat}");
    assert_eq!(beat["ok"], true);
    let at = beat["timestamp"].as_str().unwrap_or_default();
    assert!(
        time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).is_ok(),
        "{beat}"
    );
    let robot = wait_for("seed-1 online", WAIT, || async {
        let robot = acme.robot_view("seed-1").await;
        (robot["status"] == "online" && robot["cpu_percent"] == 12.5).then_some(robot)
    })
    .await
    .unwrap();
    assert!(robot["last_heartbeat"].is_string(), "{robot}");
    // From here on it heartbeats on its own timer, as the seed's agent does.
    let stop = CancellationToken::new();
    let beats = agent.keep_alive(stop.clone());

    // Nothing to do: JSON null, at once.
    let asked = std::time::Instant::now();
    let (status, none) = agent.claim(30).await;
    assert!(asked.elapsed() < Duration::from_secs(1), "an empty claim took {:?}", asked.elapsed());
    assert_eq!((status, &none), (200, &Value::Null));

    // A job: claimed with every listed field.
    let job_id = acme.submit("invoice", 7, &[]).await;
    let claimed = agent.claim_next(30).await;
    assert_eq!(claimed["job_id"], job_id.as_str(), "{claimed}");
    let workflow: Value = serde_json::from_str(claimed["workflow_json"].as_str().expect("a string")).unwrap();
    assert_eq!(workflow["steps"][0]["message"], "invoice");
    assert_eq!(claimed["workflow_name"], "invoice");
    assert!(claimed["workflow_id"].as_str().is_some_and(|w| !w.is_empty()), "{claimed}");
    assert_eq!(claimed["priority"], 7);
    assert_eq!(claimed["environment"], "production");
    assert_eq!(claimed["variables"]["who"], "invoice", "{claimed}");
    for at in ["created_at", "claimed_at"] {
        let text = claimed[at].as_str().unwrap_or_else(|| panic!("{at}: {claimed}"));
        assert!(
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).is_ok(),
            "{at}"
        );
    }
    assert_eq!((claimed["retry_count"].as_i64(), claimed["max_retries"].as_i64()), (Some(0), Some(2)));
    let job = acme.job(&job_id).await;
    assert_eq!((job["status"].as_str(), job["robot_id"].as_str()), (Some("running"), Some("seed-1")));
    // One slot, taken: nothing more.
    let (status, none) = agent.claim(30).await;
    assert_eq!((status, &none), (200, &Value::Null), "a second job for a 1-slot robot");

    let (status, answer) =
        agent.report(&job_id, "extend-lease", Some(json!({"extension_seconds": 120}))).await;
    assert_eq!((status, &answer), (200, &json!({"job_id": job_id, "extended": true})));
    let (status, answer) = agent.report(&job_id, "extend-lease", Some(json!({"extension_seconds": 1}))).await;
    assert_eq!((status, answer["error"]["field"].as_str()), (422, Some("extension_seconds")), "{answer}");
    let result = json!({"executed_nodes": 3, "duration_ms": 42, "recovered": false});
    let (status, answer) = agent.report(&job_id, "complete", Some(json!({"result": result}))).await;
    assert_eq!((status, &answer), (200, &json!({"job_id": job_id, "completed": true})));
    let (status, _) = agent.report(&job_id, "complete", Some(json!({"result": result}))).await;
    assert_eq!(status, 200, "a repeated completion (its answer lost) is answered as the first");
    let job = acme.job(&job_id).await;
    assert_eq!((job["status"].as_str(), &job["output"]), (Some("completed"), &result), "{job}");
    // Done: no longer held.
    let (status, answer) = agent.report(&job_id, "extend-lease", None).await;
    assert_eq!(status, 409, "{answer}");

    // A failure ends the job failed, as a NATS robot's failed run does.
    let job_id = acme.submit("payroll", 10, &[]).await;
    assert_eq!(agent.claim_next(30).await["job_id"], job_id.as_str());
    let (status, answer) = agent.report(&job_id, "fail", Some(json!({"error_message": " "}))).await;
    assert_eq!((status, answer["error"]["field"].as_str()), (422, Some("error_message")), "{answer}");
    let (status, answer) =
        agent.report(&job_id, "fail", Some(json!({"error_message": "x".repeat(5001)}))).await;
    assert_eq!((status, answer["error"]["field"].as_str()), (422, Some("error_message")), "{answer}");
    let (status, answer) =
        agent.report(&job_id, "fail", Some(json!({"error_message": "selector not found"}))).await;
    assert_eq!((status, &answer), (200, &json!({"job_id": job_id, "status": "failed"})));
    let job = acme.job(&job_id).await;
    assert_eq!(job["status"], "failed");
    assert!(job["error_message"].as_str().unwrap().contains("selector not found"), "{job}");

    // Every status word of the contract.
    for word in ["busy", "idle", "online", "error", "maintenance", "online"] {
        let (status, answer) =
            agent.send(Method::PUT, "/api/v1/robots/seed-1/status", Some(json!({"status": word}))).await;
        assert_eq!(status, 200, "{word}: {answer}");
        assert_eq!(answer["robot_id"], "seed-1");
    }
    let (status, answer) =
        agent.send(Method::PUT, "/api/v1/robots/seed-1/status", Some(json!({"status": "sleepy"}))).await;
    assert_eq!((status, answer["error"]["field"].as_str()), (422, Some("status")));

    // A user key is not a robot: 403 on the robot-facing calls.
    let operator = stack.cli_key("acme", Role::Operator, None).await;
    for (path, body) in [
        ("/api/v1/jobs/claim".to_owned(), json!({})),
        ("/api/v1/robots/seed-1/heartbeat".to_owned(), json!({})),
        (format!("/api/v1/jobs/{job_id}/release"), json!({})),
    ] {
        let (status, answer) = secure.send(Method::POST, &path, Some(&operator), Some(body)).await;
        assert_eq!((status, answer["error"]["code"].as_str()), (403, Some("forbidden")), "{path}: {answer}");
    }
    // Another tenant's robot and job: 404, as ids that do not exist.
    let beta = Tenant::new(&stack, &secure, "beta").await;
    let other = beta.robot("seed-1", &[], 1).await;
    assert_eq!(other.heartbeat().await.0, 200, "beta's own seed-1 is another robot");
    let stranger = beta.robot("beta-2", &[], 1).await;
    let (status, _) = stranger.send(Method::POST, "/api/v1/robots/seed-1/heartbeat", Some(json!({}))).await;
    assert_eq!(status, 404, "another robot's id");
    let (status, _) =
        stranger.send(Method::PUT, "/api/v1/robots/seed-1/status", Some(json!({"status": "busy"}))).await;
    assert_eq!(status, 404, "another robot's status");
    let (status, _) = other.report(&job_id, "complete", Some(json!({"result": {}}))).await;
    assert_eq!(status, 404, "another tenant's job");
    stop.cancel();
    beats.await.unwrap();
    stack.stop().await;
}

/// Release hands the job back at once to another robot; a stale owner (its lease lapsed and the
/// job was claimed again) gets 409 on every report.
#[tokio::test]
async fn release_and_a_stale_owner() {
    let (stack, secure) = secure_stack(|_| {}).await;
    let acme = Tenant::new(&stack, &secure, "acme").await;
    let (first, second) = (acme.robot("seed-a", &[], 1).await, acme.robot("seed-b", &[], 1).await);
    let stop = CancellationToken::new();
    let beats = [first.keep_alive(stop.clone()), second.keep_alive(stop.clone())];

    let job_id = acme.submit("released", 10, &[]).await;
    assert_eq!(first.claim_next(30).await["job_id"], job_id.as_str());
    let (status, answer) = second.report(&job_id, "release", None).await;
    assert_eq!(status, 409, "not the holder: {answer}");
    let (status, answer) = first.report(&job_id, "release", None).await;
    assert_eq!((status, &answer), (200, &json!({"job_id": job_id, "released": true})));
    // Offered again at once: the other robot gets it (the first stays busy with nothing, so it
    // is not the one asking).
    let again = second.claim_next(5).await;
    assert_eq!((again["job_id"].as_str(), again["retry_count"].as_i64()), (Some(job_id.as_str()), Some(1)));
    let (status, _) = first.report(&job_id, "complete", Some(json!({"result": {}}))).await;
    assert_eq!(status, 409, "released: no longer the first robot's");

    // The second robot lets its 5 s lease lapse; the job is claimed again by the first.
    let lapsed = first.claim_next(30).await;
    assert_eq!((lapsed["job_id"].as_str(), lapsed["retry_count"].as_i64()), (Some(job_id.as_str()), Some(2)));
    for (verb, body) in [
        ("extend-lease", Some(json!({"extension_seconds": 30}))),
        ("complete", Some(json!({"result": {}}))),
        ("fail", Some(json!({"error_message": "late"}))),
        ("release", None),
    ] {
        let (status, answer) = second.report(&job_id, verb, body).await;
        assert_eq!((status, answer["error"]["code"].as_str()), (409, Some("conflict")), "{verb}: {answer}");
    }
    let (status, _) = first.report(&job_id, "complete", Some(json!({"result": {"ok": true}}))).await;
    assert_eq!(status, 200);
    let job = acme.job(&job_id).await;
    assert_eq!(
        (job["status"].as_str(), job["robot_id"].as_str()),
        (Some("completed"), Some("seed-a")),
        "{job}"
    );
    assert_eq!(job["output"], json!({"ok": true}), "the stale owner's reports changed nothing");
    stop.cancel();
    for beat in beats {
        beat.await.unwrap();
    }
    stack.stop().await;
}

/// Admission decides for HTTP robots as for NATS robots: a job needing `gpu` is not handed to a
/// robot without it, and when a slot frees, the highest-priority waiting job comes next.
#[tokio::test]
async fn capabilities_and_priority_hold_for_http_robots() {
    // No prefetch: every waiting job is pending, so the order is admission's alone.
    let (stack, secure) = secure_stack(|c| c.prefetch = 0).await;
    let acme = Tenant::new(&stack, &secure, "acme").await;
    let plain = acme.robot("plain", &[], 1).await;
    assert_eq!(plain.heartbeat().await.0, 200);

    let gpu_job = acme.submit("render", 10, &["gpu"]).await;
    let first = acme.submit("first", 10, &[]).await;
    assert_eq!(plain.claim_next(30).await["job_id"], first.as_str(), "the gpu job is not plain's");
    // Busy: jobs wait, the urgent one last.
    let low = [acme.submit("low-1", 2, &[]).await, acme.submit("low-2", 2, &[]).await];
    let urgent = acme.submit("urgent", 18, &[]).await;
    let (status, _) = plain.report(&first, "complete", Some(json!({"result": {}}))).await;
    assert_eq!(status, 200);
    assert_eq!(plain.claim_next(30).await["job_id"], urgent.as_str(), "priority first");
    let (status, _) = plain.report(&urgent, "complete", Some(json!({"result": {}}))).await;
    assert_eq!(status, 200);
    let next = plain.claim_next(30).await;
    assert!(low.iter().any(|j| next["job_id"] == j.as_str()), "then the others: {next}");
    assert_eq!(acme.job(&gpu_job).await["status"], "pending", "still waiting for a gpu robot");

    let gpu = acme.robot("gpu-box", &["gpu"], 1).await;
    assert_eq!(gpu.heartbeat().await.0, 200);
    assert_eq!(gpu.claim_next(30).await["job_id"], gpu_job.as_str());
    stack.stop().await;
}

/// Heartbeats stop: the robot goes offline within the heartbeat timeout and its job is offered
/// again (at the latest when its lease lapses) to another robot, a NATS robot here. A robot that
/// says `offline` is offline at once.
#[tokio::test]
async fn a_silent_http_robot_goes_offline_and_its_job_runs_elsewhere() {
    let (mut stack, secure) = secure_stack(|_| {}).await;
    let acme = Tenant::new(&stack, &secure, "acme").await;
    let agent = acme.robot("seed-gone", &[], 1).await;
    assert_eq!(agent.heartbeat().await.0, 200);
    let job_id = acme.submit("orphan", 10, &[]).await;
    assert_eq!(agent.claim_next(5).await["job_id"], job_id.as_str());
    let silent_at = std::time::Instant::now();

    // No more heartbeats, no more renewals.
    wait_for("seed-gone offline", WAIT, || async {
        (acme.robot_view("seed-gone").await["status"] == "offline").then_some(())
    })
    .await
    .unwrap();
    let offline_after = silent_at.elapsed();
    assert!(offline_after < Duration::from_secs(3 + 3), "offline after {offline_after:?} (timeout 3 s)");
    // A NATS robot of the tenant takes the job over.
    let mut robot = stack.robot_config("acme-nats", &[]);
    robot.tenant = TenantId::new("acme").unwrap();
    stack.start_robot(robot);
    let job = wait_for("the orphaned job to complete elsewhere", WAIT, || async {
        let job = acme.job(&job_id).await;
        (job["status"] == "completed").then_some(job)
    })
    .await
    .unwrap();
    assert_eq!((job["robot_id"].as_str(), job["attempt"].as_i64()), (Some("acme-nats"), Some(2)), "{job}");
    let (status, _) = agent.report(&job_id, "complete", Some(json!({"result": {}}))).await;
    assert_eq!(status, 409, "the silent robot's late report is refused");

    // Back, then a goodbye: offline at once. (It waits for the heartbeat's figures to be
    // recorded first: a goodbye within milliseconds of a heartbeat can still be overwritten by
    // that heartbeat's batched write, see the liveness work of issue 11.)
    let path = "/api/v1/robots/seed-gone/heartbeat";
    let (status, _) = agent.send(Method::POST, path, Some(json!({"cpu_percent": 33.0}))).await;
    assert_eq!(status, 200);
    wait_for("seed-gone online again", WAIT, || async {
        let robot = acme.robot_view("seed-gone").await;
        (robot["status"] != "offline" && robot["cpu_percent"] == 33.0).then_some(())
    })
    .await
    .unwrap();
    let (status, answer) =
        agent.send(Method::PUT, "/api/v1/robots/seed-gone/status", Some(json!({"status": "offline"}))).await;
    assert_eq!(status, 200, "{answer}");
    wait_for("seed-gone offline after its goodbye", Duration::from_secs(2), || async {
        (acme.robot_view("seed-gone").await["status"] == "offline").then_some(())
    })
    .await
    .unwrap();
    stack.stop().await;
}

/// A robot never runs more jobs than its `max_concurrent_jobs`, even when it asks for several at
/// once (with the default prefetch, offers wait beyond its one slot).
#[tokio::test]
async fn claims_at_once_never_overfill_an_http_robot() {
    let (stack, secure) = secure_stack(|c| c.prefetch = 2).await;
    let acme = Tenant::new(&stack, &secure, "acme").await;
    let agent = acme.robot("one-slot", &[], 1).await;
    assert_eq!(agent.heartbeat().await.0, 200);
    let jobs =
        [acme.submit("a", 10, &[]).await, acme.submit("b", 10, &[]).await, acme.submit("c", 10, &[]).await];
    // All three offered (one slot plus the prefetch of two) before the robot asks.
    wait_for("three offers", WAIT, || async {
        let mut queued = 0;
        for j in &jobs {
            queued += usize::from(acme.job(j).await["status"] == "queued");
        }
        (queued == 3).then_some(())
    })
    .await
    .unwrap();
    let claims = futures::future::join_all((0..3).map(|_| agent.claim(30))).await;
    let got: Vec<&Value> = claims
        .iter()
        .map(|(s, j)| {
            assert_eq!(*s, 200, "{j}");
            j
        })
        .filter(|j| !j.is_null())
        .collect();
    assert_eq!(got.len(), 1, "one slot, one job: {claims:?}");
    stack.stop().await;
}
