//! Routing rules of DESIGN.md with several robots at once: capabilities and supersets, tenants,
//! targeted jobs, best fit, balance, `--max-jobs`, `--no-shell`, rejections, priorities and
//! waiting reasons. Robots run in-process with a recording executor, so every start and stop is
//! measured by the robots themselves, not read back from the API.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Stack, WAIT};
use fleet_robot::{Execution, Executor, Executors, JobContext, RunReport};
use fleet_schemas::robot::ClaimGrant;
use fleet_schemas::workflow::WorkflowFormat;
use fleet_tests::wait_for;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio::sync::Notify;

/// One run as a robot saw it.
#[derive(Debug, Clone)]
struct Run {
    robot: String,
    job: String,
    started: Instant,
    ended: Instant,
}

#[derive(Default, Clone)]
struct Log(Arc<Mutex<Vec<Run>>>);

impl Log {
    fn runs(&self) -> Vec<Run> {
        self.0.lock().unwrap().clone()
    }

    fn by_robot(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for run in self.runs() {
            *counts.entry(run.robot).or_default() += 1;
        }
        counts
    }

    /// Most runs overlapping at any instant on `robot`.
    fn max_concurrent(&self, robot: &str) -> usize {
        let mut edges: Vec<(Instant, i32)> = Vec::new();
        for run in self.runs().into_iter().filter(|r| r.robot == robot) {
            edges.push((run.started, 1));
            edges.push((run.ended, -1));
        }
        // Ends sort before starts at the same instant.
        edges.sort_by_key(|&(at, d)| (at, d));
        let (mut now, mut max) = (0i32, 0i32);
        for (_, d) in edges {
            now += d;
            max = max.max(now);
        }
        max as usize
    }
}

/// Runs a Fleet-format job by sleeping `variables.ms` (default 20) and recording it; or, when
/// told to, rejects every job (after `hold` is notified, if set).
struct Recording {
    robot: String,
    log: Log,
    reject: Option<String>,
    hold: Option<Arc<Notify>>,
}

impl Executor for Recording {
    fn execute<'a>(&'a self, grant: &'a ClaimGrant, ctx: &'a JobContext) -> BoxFuture<'a, Execution> {
        Box::pin(async move {
            if let Some(hold) = &self.hold {
                hold.notified().await;
            }
            if let Some(reason) = &self.reject {
                return Execution::Rejected(reason.clone());
            }
            let started = Instant::now();
            let ms = grant.variables.get("ms").and_then(Value::as_u64).unwrap_or(20);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                _ = ctx.cancel.cancelled() => {}
            }
            self.log.0.lock().unwrap().push(Run {
                robot: self.robot.clone(),
                job: grant.job_id.to_string(),
                started,
                ended: Instant::now(),
            });
            Execution::Finished(RunReport::completed(json!({"robot": self.robot})))
        })
    }
}

fn executors(robot: &str, log: &Log, reject: Option<&str>, hold: Option<Arc<Notify>>) -> Executors {
    let mut e = Executors::default();
    let rec =
        Recording { robot: robot.to_owned(), log: log.clone(), reject: reject.map(str::to_owned), hold };
    e.insert(WorkflowFormat::Fleet, Arc::new(rec));
    e
}

impl Stack {
    fn robot(&mut self, log: &Log, name: &str, caps: &[&str], max_jobs: u32) {
        let mut config = self.robot_config(name, caps);
        config.max_jobs = max_jobs;
        self.start_robot_with(config, executors(name, log, None, None));
    }
}

fn job(requires: &[&str], extra: Value) -> Value {
    let mut body = json!({
        "workflow_name": "routed",
        "workflow_json": {"requires": requires, "steps": [{"id": "work", "kind": "log", "message": "x"}]},
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

async fn submit_all(stack: &Stack, bodies: Vec<Value>) -> Vec<String> {
    let mut ids = Vec::new();
    for body in bodies {
        ids.push(stack.submit(body).await["job_id"].as_str().unwrap().to_owned());
    }
    ids
}

async fn all_finished(stack: &Stack, ids: &[String]) -> Vec<Value> {
    let mut jobs = Vec::new();
    for id in ids {
        jobs.push(stack.finished(id).await);
    }
    jobs
}

#[tokio::test]
async fn jobs_go_only_to_robots_whose_capabilities_contain_theirs() {
    let log = Log::default();
    let mut stack = Stack::start().await;
    stack.robot(&log, "browser", &["browser"], 2);
    stack.robot(&log, "browser-gpu", &["browser", "gpu"], 2);
    stack.robot(&log, "desktop", &["desktop"], 2);
    stack.wait_robots_online(3).await;
    let mut bodies = Vec::new();
    for _ in 0..6 {
        bodies.push(job(&["browser"], json!({})));
        bodies.push(job(&["gpu"], json!({})));
        bodies.push(job(&[], json!({"required_capabilities": ["desktop"]})));
    }
    let ids = submit_all(&stack, bodies).await;
    for job in all_finished(&stack, &ids).await {
        assert_eq!(job["status"], "completed", "{job}");
        let robot = job["robot_id"].as_str().unwrap();
        let caps: Vec<&str> =
            job["required_capabilities"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        let has: &[&str] = match robot {
            "browser" => &["browser"],
            "browser-gpu" => &["browser", "gpu"],
            "desktop" => &["desktop"],
            other => panic!("unknown robot {other}"),
        };
        assert!(caps.iter().all(|c| *c == "shell" || has.contains(c)), "{caps:?} ran on {robot}");
    }
    // Nobody has browser+desktop: that job waits, saying why.
    let waiting = stack.submit(job(&["browser", "desktop"], json!({}))).await;
    assert_eq!(waiting["status"], "pending");
    let view = stack.job(waiting["job_id"].as_str().unwrap()).await;
    assert_eq!(view["waiting_reason"], "no online robot of tenant default has capabilities browser+desktop");
    stack.stop().await;
}

#[tokio::test]
async fn best_fit_keeps_browser_jobs_off_the_gpu_robot_while_browser_robots_have_room() {
    let log = Log::default();
    let mut stack = Stack::start_with(|c| c.prefetch = 0).await;
    stack.robot(&log, "browser", &["browser"], 4);
    stack.robot(&log, "gpu", &["browser", "gpu"], 4);
    stack.wait_robots_online(2).await;
    // Four browser jobs fit the browser robot's four slots: none goes to the idle GPU robot.
    let ids =
        submit_all(&stack, (0..4).map(|_| job(&["browser"], json!({"variables": {"ms": 300}}))).collect())
            .await;
    for job in all_finished(&stack, &ids).await {
        assert_eq!(job["robot_id"], "browser", "{job}");
    }
    // Eight at once: the browser robot's four slots fill, the rest may use the GPU robot.
    let ids =
        submit_all(&stack, (0..8).map(|_| job(&["browser"], json!({"variables": {"ms": 500}}))).collect())
            .await;
    let on_gpu = all_finished(&stack, &ids).await.iter().filter(|j| j["robot_id"] == "gpu").count();
    assert!(on_gpu > 0, "overflow went to the GPU robot");
    stack.stop().await;
}

#[tokio::test]
async fn load_spreads_evenly_across_equal_robots_and_max_jobs_holds() {
    let log = Log::default();
    let mut stack = Stack::start().await;
    for name in ["e1", "e2", "e3"] {
        stack.robot(&log, name, &[], 2);
    }
    stack.wait_robots_online(3).await;
    let bodies: Vec<Value> = (0..300).map(|_| job(&[], json!({"variables": {"ms": 5}}))).collect();
    let ids = submit_all(&stack, bodies).await;
    all_finished(&stack, &ids).await;
    let counts = stack_counts(&log);
    for (robot, n) in &counts {
        assert!((80..=120).contains(n), "robot {robot} ran {n} of 300 (±20% of 100): {counts:?}");
        assert!(log.max_concurrent(robot) <= 2, "{robot} ran more than --max-jobs 2 at once");
    }
    assert_eq!(counts.values().sum::<usize>(), 300, "every job ran exactly once");
    stack.stop().await;
}

fn stack_counts(log: &Log) -> HashMap<String, usize> {
    log.by_robot()
}

#[tokio::test]
async fn a_no_shell_robot_never_receives_a_shell_job() {
    let mut stack = Stack::start().await;
    let mut no_shell = stack.robot_config("no-shell", &[]);
    no_shell.no_shell = true;
    stack.start_robot(no_shell);
    stack.start_robot(stack.robot_config("shell", &[]));
    stack.wait_robots_online(2).await;
    let bodies: Vec<Value> = (0..20)
        .map(|i| {
            json!({"workflow_name": format!("sh {i}"),
                   "workflow_json": {"steps": [{"id": "s", "kind": "shell", "argv": ["true"]}]}})
        })
        .collect();
    let ids = submit_all(&stack, bodies).await;
    for job in all_finished(&stack, &ids).await {
        assert_eq!(job["robot_id"], "shell", "{job}");
    }
    // A job that needs no shell may run on either.
    let ids = submit_all(&stack, (0..10).map(|_| job(&[], json!({}))).collect()).await;
    assert!(all_finished(&stack, &ids).await.iter().all(|j| j["status"] == "completed"));
    stack.stop().await;
}

#[tokio::test]
async fn targeted_jobs_run_on_their_robot_and_wait_while_it_is_offline() {
    let log = Log::default();
    let mut stack = Stack::start().await;
    for name in ["t1", "t2", "t3"] {
        stack.robot(&log, name, &[], 1);
    }
    stack.wait_robots_online(3).await;
    let ids = submit_all(&stack, (0..6).map(|_| job(&[], json!({"target_robot_id": "t2"}))).collect()).await;
    for job in all_finished(&stack, &ids).await {
        assert_eq!(job["robot_id"], "t2", "{job}");
    }
    // The Canvas's metadata.robot_id means the same.
    let id = submit_all(&stack, vec![job(&[], json!({"metadata": {"robot_id": "t3"}}))]).await;
    assert_eq!(stack.finished(&id[0]).await["robot_id"], "t3");
    // Unknown robot: 422 naming the field.
    let (status, body) =
        stack.post("/api/v1/workflows", &job(&[], json!({"target_robot_id": "nobody"}))).await;
    assert_eq!((status, body["error"]["field"].as_str()), (422, Some("target_robot_id")), "{body}");
    // A known robot that went offline: the job waits, saying why, and runs when it is back.
    let t1 = stack.robots.remove(0);
    t1.stop().await;
    let answer = stack.submit(job(&[], json!({"target_robot_id": "t1"}))).await;
    let id = answer["job_id"].as_str().unwrap().to_owned();
    wait_for("the job to wait for t1", WAIT, || async {
        (stack.job(&id).await["waiting_reason"] == "target robot t1 is offline").then_some(())
    })
    .await
    .unwrap();
    stack.robot(&log, "t1", &[], 1);
    assert_eq!(stack.finished(&id).await["robot_id"], "t1");
    stack.stop().await;
}

#[tokio::test]
async fn a_rejected_job_runs_on_another_robot_and_the_rejection_is_in_its_history() {
    let log = Log::default();
    let mut stack = Stack::start().await;
    let hold = Arc::new(Notify::new());
    let config = stack.robot_config("picky", &[]);
    stack.start_robot_with(
        config,
        executors("picky", &log, Some("runner program missing"), Some(hold.clone())),
    );
    stack.wait_robots_online(1).await;
    let answer = stack.submit(job(&[], json!({}))).await;
    let id = answer["job_id"].as_str().unwrap().to_owned();
    wait_for("picky to claim the job", WAIT, || async {
        (stack.job(&id).await["robot_id"] == "picky").then_some(())
    })
    .await
    .unwrap();
    // A second robot comes online, then the first rejects the job at run time.
    stack.robot(&log, "willing", &[], 1);
    stack.wait_robots_online(2).await;
    hold.notify_one();
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["robot_id"], "willing");
    let pool = stack.db.pool().await.unwrap();
    let requeued: (String, i32) = sqlx::query_as(
        "SELECT data->>'previous_robot_id', (data->>'rejected_by_count')::int FROM job_history
         WHERE job_id = $1 AND kind = 'job.requeued'",
    )
    .bind(uuid::Uuid::parse_str(&id).unwrap())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(requeued, ("picky".to_owned(), 1));
    stack.stop().await;
}

#[tokio::test]
async fn a_job_every_robot_rejects_fails_with_the_reasons() {
    let log = Log::default();
    let mut stack = Stack::start().await;
    for (name, why) in [("r1", "draining"), ("r2", "runner program missing")] {
        let config = stack.robot_config(name, &[]);
        stack.start_robot_with(config, executors(name, &log, Some(why), None));
    }
    stack.wait_robots_online(2).await;
    let answer = stack.submit(job(&[], json!({}))).await;
    let job = stack.finished(answer["job_id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error_message"].as_str().unwrap();
    assert!(error.contains("r1 (draining)") && error.contains("r2 (runner program missing)"), "{error}");
    stack.stop().await;
}

#[tokio::test]
async fn max_rejections_fails_the_job() {
    let log = Log::default();
    let mut stack = Stack::start_with(|c| c.max_rejections = 2).await;
    for name in ["a", "b", "c", "d"] {
        let config = stack.robot_config(name, &[]);
        stack.start_robot_with(config, executors(name, &log, Some("not today"), None));
    }
    stack.wait_robots_online(4).await;
    let answer = stack.submit(job(&[], json!({}))).await;
    let job = stack.finished(answer["job_id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error_message"].as_str().unwrap().matches("not today").count(), 2, "{job}");
    stack.stop().await;
}

#[tokio::test]
async fn on_a_saturated_class_the_highest_priority_waiting_job_starts_next() {
    let log = Log::default();
    let mut stack = Stack::start_with(|c| c.prefetch = 0).await;
    stack.robot(&log, "solo", &[], 1);
    stack.wait_robots_online(1).await;
    let blocker = submit_all(&stack, vec![job(&[], json!({"variables": {"ms": 800}}))]).await;
    wait_for("the blocker to run", WAIT, || async {
        (stack.job(&blocker[0]).await["status"] == "running").then_some(())
    })
    .await
    .unwrap();
    let priorities = [5, 15, 10, 15, 0, 20, 10, 5];
    let bodies =
        priorities.iter().map(|p| job(&[], json!({"priority": p, "variables": {"ms": 5}}))).collect();
    let ids = submit_all(&stack, bodies).await;
    // While they wait, each says where it stands.
    let view = stack.job(&ids[0]).await;
    assert!(
        view["waiting_reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("all 1 eligible robot busy (position "),
        "{view}"
    );
    all_finished(&stack, &ids).await;
    let order: Vec<String> = log.runs().into_iter().map(|r| r.job).filter(|j| ids.contains(j)).collect();
    let mut expected: Vec<(i32, usize)> = priorities.iter().enumerate().map(|(i, p)| (-p, i)).collect();
    expected.sort();
    let expected: Vec<String> = expected.into_iter().map(|(_, i)| ids[i].clone()).collect();
    assert_eq!(order, expected, "highest priority first, equal priority first come first served");
    stack.stop().await;
}

#[tokio::test]
async fn queues_show_each_class_with_its_load() {
    let log = Log::default();
    let mut stack = Stack::start_with(|c| c.prefetch = 0).await;
    stack.robot(&log, "q1", &["browser"], 1);
    stack.robot(&log, "q2", &["browser"], 1);
    stack.wait_robots_online(2).await;
    let ids =
        submit_all(&stack, (0..5).map(|_| job(&["browser"], json!({"variables": {"ms": 1500}}))).collect())
            .await;
    let queues = wait_for("the queue view", WAIT, || async {
        let (status, queues) = stack.get("/api/v1/queues").await;
        (status == 200 && queues[0]["running"] == 2 && queues[0]["waiting"] == 3).then_some(queues)
    })
    .await
    .unwrap();
    assert_eq!(queues.as_array().unwrap().len(), 1, "{queues}");
    let q = &queues[0];
    assert_eq!(q["class"], "browser+shell");
    assert_eq!((q["capacity"].as_u64(), q["online_robots"].as_u64()), (Some(2), Some(2)), "{q}");
    // Two busy robots: the others wait, with their position.
    let waiting: Vec<String> = {
        let mut reasons = Vec::new();
        for id in &ids {
            if let Some(r) = stack.job(id).await["waiting_reason"].as_str() {
                reasons.push(r.to_owned());
            }
        }
        reasons
    };
    assert!(waiting.iter().any(|r| r.starts_with("all 2 eligible robots busy (position")), "{waiting:?}");
    all_finished(&stack, &ids).await;
    stack.stop().await;
}

#[tokio::test]
async fn tenants_never_see_each_others_jobs_or_robots() {
    use fleet_schemas::api::{ApiRequest, ApiResult, Endpoint, SubmitJob, Submitted};
    use fleet_schemas::codec::{decode, encode};
    use fleet_schemas::{RequestId, TenantId};

    let log = Log::default();
    let mut stack = Stack::start().await;
    stack.robot(&log, "ours", &[], 2);
    let mut theirs = stack.robot_config("theirs", &[]);
    theirs.tenant = TenantId::new("other").unwrap();
    stack.start_robot_with(theirs, executors("theirs", &log, None, None));
    stack.wait_robots_online(1).await;

    // Tenant `other` submits through the orchestrator API (the dev-mode gateway is `default`).
    let client = stack.nats.client().await.unwrap();
    let mut other_ids = Vec::new();
    for _ in 0..10 {
        let req = ApiRequest {
            v: 1,
            actor: None,
            request_id: RequestId::new(),
            tenant: TenantId::new("other").unwrap(),
            deadline_unix_ms: (time::OffsetDateTime::now_utc().unix_timestamp() + 10) * 1000,
            body: SubmitJob {
                workflow_name: "theirs".into(),
                workflow: json!({"steps": [{"id": "a", "kind": "log", "message": "x"}]}),
                priority: 10,
                trigger_type: "manual".into(),
                execution_mode: "lan".into(),
                variables: Default::default(),
                required_capabilities: vec![],
                target_robot_id: None,
                timeout_s: None,
                metadata: Default::default(),
                idempotency_key: None,
            },
        };
        let reply = client.request(Endpoint::SubmitJob.subject(), encode(&req).into()).await.unwrap();
        let submitted: ApiResult<Submitted> = decode("reply", &reply.payload).unwrap();
        other_ids.push(submitted.unwrap().job_id.to_string());
    }
    let ours = submit_all(&stack, (0..10).map(|_| job(&[], json!({}))).collect()).await;
    for job in all_finished(&stack, &ours).await {
        assert_eq!(job["robot_id"], "ours", "{job}");
    }
    wait_for("tenant other's jobs to run", WAIT, || async {
        (log.runs().iter().filter(|r| r.robot == "theirs").count() == 10).then_some(())
    })
    .await
    .unwrap();
    let theirs_ran: Vec<String> =
        log.runs().into_iter().filter(|r| r.robot == "theirs").map(|r| r.job).collect();
    let mut sorted = theirs_ran.clone();
    sorted.sort();
    let mut expected = other_ids.clone();
    expected.sort();
    assert_eq!(sorted, expected, "the other tenant's robot ran exactly the other tenant's jobs");
    // Tenant default sees none of it: their job is 404, their robot is not listed.
    let (status, _) = stack.get(&format!("/api/v1/metrics/jobs/{}", other_ids[0])).await;
    assert_eq!(status, 404);
    let (_, robots) = stack.get("/api/v1/metrics/robots").await;
    let names: Vec<&str> = robots.as_array().unwrap().iter().filter_map(|r| r["robot_id"].as_str()).collect();
    assert_eq!(names, ["ours"]);
    let (status, _) = stack.get("/api/v1/metrics/robots/theirs").await;
    assert_eq!(status, 404);
    // A target in another tenant is refused exactly like an unknown id.
    let (status, body) =
        stack.post("/api/v1/workflows", &job(&[], json!({"target_robot_id": "theirs"}))).await;
    assert_eq!((status, body["error"]["field"].as_str()), (422, Some("target_robot_id")), "{body}");
    stack.stop().await;
}

/// Wait until job `id` has `status`.
async fn wait_status(stack: &Stack, id: &str, status: &str) {
    wait_for(format!("job {id} to be {status}"), WAIT, || async {
        (stack.job(id).await["status"] == status).then_some(())
    })
    .await
    .unwrap();
}

/// The jobs of `ids` in the order the robots started them.
fn start_order(log: &Log, ids: &[String]) -> Vec<String> {
    let mut runs: Vec<Run> = log.runs().into_iter().filter(|r| ids.contains(&r.job)).collect();
    runs.sort_by_key(|r| r.started);
    runs.into_iter().map(|r| r.job).collect()
}

/// Regression (issue 11): with the shipped prefetch, a busy class held two priority-2 offers
/// when a priority-18 job came, and both ran before it. The outranked offers are recalled.
#[tokio::test]
async fn with_the_default_prefetch_a_higher_priority_job_starts_before_lower_offers() {
    let log = Log::default();
    let mut stack = Stack::start().await;
    stack.robot(&log, "solo", &[], 1);
    stack.wait_robots_online(1).await;
    let blocker = submit_all(&stack, vec![job(&[], json!({"variables": {"ms": 4000}}))]).await;
    wait_status(&stack, &blocker[0], "running").await;
    let low = submit_all(
        &stack,
        (0..5).map(|_| job(&[], json!({"priority": 2, "variables": {"ms": 5}}))).collect(),
    )
    .await;
    // The prefetch at work: the first two are offered while the slot is still taken.
    for id in &low[..2] {
        assert_eq!(stack.job(id).await["status"], "queued", "the scenario needs prefetched offers");
    }
    let high = submit_all(&stack, vec![job(&[], json!({"priority": 18, "variables": {"ms": 5}}))]).await;
    // It takes the place of the class's offers at the head, before the slot frees.
    let (offered, blocker_status) =
        wait_for("the priority-18 job offered or the slot freed", WAIT, || async {
            let offered = stack.job(&high[0]).await["status"] == "queued";
            let blocker_status = stack.job(&blocker[0]).await["status"].clone();
            (offered || blocker_status != "running").then_some((offered, blocker_status))
        })
        .await
        .unwrap();
    assert!(
        offered && blocker_status == "running",
        "the priority-18 job was not offered while the slot was busy (blocker {blocker_status})"
    );
    let mut all = low.clone();
    all.push(high[0].clone());
    all_finished(&stack, &all).await;
    let order = start_order(&log, &all);
    assert_eq!(order.first(), Some(&high[0]), "priority 18 starts first: {order:?}");
    // Ties stay first come, first served.
    assert_eq!(order[1..], low[..], "the priority-2 jobs in submission order");
    stack.stop().await;
}

/// The same with several robots in two classes: a job both classes can run starts on the
/// first slot that frees, in either class, before lower jobs either class holds or could take.
#[tokio::test]
async fn across_classes_the_first_freed_slot_goes_to_the_highest_priority_job_it_can_run() {
    let log = Log::default();
    let mut stack = Stack::start().await;
    for name in ["a1", "a2"] {
        stack.robot(&log, name, &["browser"], 1);
    }
    stack.robot(&log, "g1", &["browser", "gpu"], 1);
    stack.wait_robots_online(3).await;
    // Every slot busy; the GPU robot's frees first.
    let blockers = submit_all(
        &stack,
        [("a1", 6000), ("a2", 6000), ("g1", 3000)]
            .into_iter()
            .map(|(robot, ms)| job(&[], json!({"target_robot_id": robot, "variables": {"ms": ms}})))
            .collect(),
    )
    .await;
    for id in &blockers {
        wait_status(&stack, id, "running").await;
    }
    // Lower jobs: some only the GPU class can run, some both classes can.
    let low = submit_all(
        &stack,
        [&["gpu"][..], &["browser"], &["gpu"], &["browser"], &["gpu"]]
            .into_iter()
            .map(|requires| job(requires, json!({"priority": 2, "variables": {"ms": 5}})))
            .collect(),
    )
    .await;
    assert_eq!(stack.job(&low[0]).await["status"], "queued", "the scenario needs a prefetched offer");
    let high =
        submit_all(&stack, vec![job(&["browser"], json!({"priority": 18, "variables": {"ms": 5}}))]).await;
    // No class keeps a lower offer it could hand out first.
    wait_for("the priority-2 offers to be recalled", WAIT, || async {
        for id in &low {
            if stack.job(id).await["status"] != "pending" {
                return None;
            }
        }
        Some(())
    })
    .await
    .unwrap();
    assert_eq!(stack.job(&blockers[2]).await["status"], "running", "the GPU blocker ended too soon to tell");
    let mut all = low.clone();
    all.push(high[0].clone());
    all_finished(&stack, &all).await;
    let order = start_order(&log, &all);
    assert_eq!(order.first(), Some(&high[0]), "priority 18 starts first: {order:?}");
    let first = log.runs().into_iter().find(|r| r.job == high[0]).unwrap();
    assert_eq!(first.robot, "g1", "on the slot that freed first");
    stack.stop().await;
}
