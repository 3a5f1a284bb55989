//! Faults: the real binaries (`fleet-orchestrator`, `fleet-robot`) are killed, frozen and
//! restarted, NATS is killed, PostgreSQL is cut off, and no job is lost or recorded twice.
//!
//! Every test runs real processes ([`fleet_tests::Process`]) against a real nats-server and
//! PostgreSQL; the gateway runs in-process (it holds no state and is not what is being faulted).
//! Each timing bound is derived from the intervals the test configures ([`Timing`]), and every
//! test holds [`SERIAL`] for its whole length, so two of them never compete for the machine's two
//! cores and skew each other's timings.
//!
//! The binaries are not built by `cargo test --test faults`: run
//! `cargo build --bins -p fleet-robot -p fleet-orchestrator -p fleet-gateway` first
//! (`cargo test --workspace` builds them).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fleet_tests::{NatsServer, Process, ProcessSpec, TcpProxy, TestDb, wait_for};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Held for the whole of each test: the timing bounds assume the test has the machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Bound for things with no interval of their own (a process starting, an HTTP answer).
const STARTUP: Duration = Duration::from_secs(20);
/// How long a robot binary may take to exit after SIGTERM or a fatal error.
const EXIT: Duration = Duration::from_secs(15);

/// The orchestrator's liveness settings for one test, passed to the binaries as `FLEET_…`
/// variables; the tests' bounds are computed from them.
#[derive(Debug, Clone, Copy)]
struct Timing {
    heartbeat_interval: Duration,
    heartbeat_timeout: Duration,
    job_lease: Duration,
    leader_lease: Duration,
    sweep_interval: Duration,
    offer_check_after: Duration,
    max_attempts: u32,
}

impl Timing {
    /// Short intervals, so each fault plays out in seconds.
    const FAST: Timing = Timing {
        heartbeat_interval: Duration::from_millis(500),
        heartbeat_timeout: Duration::from_secs(3),
        job_lease: Duration::from_secs(2),
        leader_lease: Duration::from_secs(1),
        sweep_interval: Duration::from_millis(100),
        offer_check_after: Duration::from_secs(3),
        max_attempts: 3,
    };

    fn with_job_lease(self, job_lease: Duration) -> Timing {
        Timing { job_lease, ..self }
    }

    /// Longest time from a robot's death to its job being offered again by lease expiry: the
    /// lease was renewed at most now (so it lapses within one lease), plus one sweep.
    fn lease_expiry(&self) -> Duration {
        self.job_lease + self.sweep_interval
    }

    /// The environment of an orchestrator binary.
    fn env(&self) -> Vec<(&'static str, String)> {
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        vec![
            ("FLEET_HEARTBEAT_INTERVAL", ms(self.heartbeat_interval)),
            ("FLEET_HEARTBEAT_TIMEOUT", ms(self.heartbeat_timeout)),
            ("FLEET_JOB_LEASE", ms(self.job_lease)),
            ("FLEET_LEADER_LEASE", ms(self.leader_lease)),
            ("FLEET_SWEEP_INTERVAL", ms(self.sweep_interval)),
            ("FLEET_OFFER_CHECK_AFTER", ms(self.offer_check_after)),
            ("FLEET_MAX_ATTEMPTS", self.max_attempts.to_string()),
            ("FLEET_DB_POOL_SIZE", "4".to_owned()),
        ]
    }
}

/// A running part of the stack in this process (the gateway).
struct Task {
    token: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

/// nats-server, database and an in-process gateway; orchestrators and robots are processes the
/// test starts itself.
struct Fleet {
    /// A robot key of tenant `default` for every robot binary.
    robot_key: String,
    timing: Timing,
    nats: NatsServer,
    db: TestDb,
    pool: PgPool,
    dirs: tempfile::TempDir,
    http: reqwest::Client,
    base: String,
    gateway: Task,
}

impl Fleet {
    async fn start(timing: Timing) -> Fleet {
        Self::start_with_gateway_timeout(timing, Duration::from_secs(5)).await
    }

    async fn start_with_gateway_timeout(timing: Timing, request_timeout: Duration) -> Fleet {
        fleet_tests::init_tracing();
        let nats = NatsServer::start().await.expect("nats-server starts");
        let db = TestDb::create().await.expect("test database");
        let pool = db.pool().await.expect("test database pool");
        let dirs = tempfile::tempdir().expect("temporary directory");
        // An empty config file, so a fleet.toml in the current directory cannot change the test.
        std::fs::write(dirs.path().join("fleet.toml"), "").expect("empty fleet.toml");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("gateway port");
        let base = format!("http://{}", listener.local_addr().expect("gateway address"));
        let token = CancellationToken::new();
        // The tests poll the API far more often than the default per-key limit allows, and rate
        // limiting is not what they test (gateway_config sets no limit).
        let config = fleet_gateway::GatewayConfig { request_timeout, ..common::gateway_config(&nats, true) };
        let task = tokio::spawn(fleet_gateway::run(config, listener, token.clone()));
        let robot_key = common::robot_key(db.url(), "default", None, None).await;
        Fleet {
            robot_key,
            timing,
            nats,
            db,
            pool,
            dirs,
            http: reqwest::Client::builder().timeout(Duration::from_secs(15)).build().expect("http client"),
            base,
            gateway: Task { token, task },
        }
    }

    /// An orchestrator binary with this test's timing. Its PostgreSQL connections carry `name`
    /// as their application name, so the database can tell which orchestrator wrote what.
    fn orchestrator_spec(&self, name: &str, database_url: &str) -> ProcessSpec {
        let sep = if database_url.contains('?') { '&' } else { '?' };
        let mut spec = ProcessSpec::fleet(name, "fleet-orchestrator")
            .expect("fleet-orchestrator binary")
            .env("NATS_URL", self.nats.url())
            .env("FLEET_NATS_AUTH_DIR", self.nats.auth_dir())
            .env("DATABASE_URL", format!("{database_url}{sep}application_name={name}"))
            .env("FLEET_CONFIG", self.dirs.path().join("fleet.toml"))
            .env("RUST_LOG", "info,async_nats=warn,sqlx=warn");
        for (key, value) in self.timing.env() {
            spec = spec.env(key, value);
        }
        spec
    }

    fn orchestrator(&self, name: &str) -> Process {
        Process::spawn(self.orchestrator_spec(name, self.db.url())).expect("orchestrator starts")
    }

    /// A robot binary of tenant `default` keeping its state in `<dirs>/<state>`; `id` `None`
    /// lets it make (or reuse) the id kept there.
    fn robot_spec(&self, id: Option<&str>, state: &str, max_jobs: u32) -> ProcessSpec {
        let mut spec = ProcessSpec::fleet(format!("robot-{state}"), "fleet-robot")
            .expect("fleet-robot binary")
            .args(["--tenant", "default", "--max-jobs", &max_jobs.to_string(), "--shutdown-grace", "5s"])
            .arg("--state-dir")
            .arg(self.state_dir(state))
            .env("NATS_URL", self.nats.url())
            .env("FLEET_ROBOT_KEY", &self.robot_key)
            .env("RUST_LOG", "info,async_nats=warn");
        if let Some(id) = id {
            spec = spec.args(["--id", id]);
        }
        spec
    }

    fn robot(&self, id: &str, max_jobs: u32) -> Process {
        Process::spawn(self.robot_spec(Some(id), id, max_jobs)).expect("robot starts")
    }

    fn state_dir(&self, state: &str) -> PathBuf {
        self.dirs.path().join(state)
    }

    async fn wait_healthy(&self, within: Duration) -> Duration {
        let started = Instant::now();
        wait_for("the gateway to report healthy", within, || async {
            let r = self.http.get(format!("{}/health", self.base)).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await
        .unwrap();
        started.elapsed()
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        match self.http.get(format!("{}{path}", self.base)).send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.json().await.unwrap_or(Value::Null))
            }
            Err(e) => (0, json!({"transport_error": e.to_string()})),
        }
    }

    /// One submit: status, `Retry-After` and body. Status 0 is a transport error.
    async fn try_submit(&self, body: &Value, idempotency_key: Option<&str>) -> (u16, Option<String>, Value) {
        let mut request = self.http.post(format!("{}/api/v1/workflows", self.base)).json(body);
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        match request.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let retry_after =
                    r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
                (status, retry_after, r.json().await.unwrap_or(Value::Null))
            }
            Err(e) => (0, None, json!({"transport_error": e.to_string()})),
        }
    }

    /// Submit; asserts 200 and returns the job id.
    async fn submit(&self, body: &Value) -> String {
        let (status, _, answer) = self.try_submit(body, None).await;
        assert_eq!(status, 200, "submit answered {status}: {answer}");
        answer["job_id"].as_str().expect("job_id in the answer").to_owned()
    }

    async fn job(&self, id: &str) -> Value {
        let (status, job) = self.get(&format!("/api/v1/metrics/jobs/{id}")).await;
        assert_eq!(status, 200, "job {id}: {job}");
        job
    }

    /// Waits until the job satisfies `done`; returns it.
    async fn wait_job(&self, id: &str, what: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
        wait_for(format!("job {id} {what}"), within, || async {
            let (status, job) = self.get(&format!("/api/v1/metrics/jobs/{id}")).await;
            (status == 200 && done(&job)).then_some(job)
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
    }

    async fn wait_status(&self, id: &str, status: &str, within: Duration) -> Value {
        self.wait_job(id, &format!("to be {status}"), within, |j| j["status"] == status).await
    }

    async fn robot_view(&self, id: &str) -> Value {
        self.get(&format!("/api/v1/metrics/robots/{id}")).await.1
    }

    /// Waits until the robot's status in the API satisfies `ok`; returns the time waited.
    async fn wait_robot(
        &self,
        id: &str,
        what: &str,
        within: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> Duration {
        let started = Instant::now();
        wait_for(format!("robot {id} {what}"), within, || async {
            let (status, robot) = self.get(&format!("/api/v1/metrics/robots/{id}")).await;
            (status == 200 && ok(robot["status"].as_str().unwrap_or_default())).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        started.elapsed()
    }

    async fn wait_online(&self, id: &str) -> Duration {
        self.wait_robot(id, "online", STARTUP, |s| s != "offline" && !s.is_empty()).await
    }

    /// `(kind, attempt, robot_id)` of each history row of a job, in order.
    async fn history(&self, id: &str) -> Vec<(String, Option<i32>, Option<String>)> {
        sqlx::query_as("SELECT kind, attempt, robot_id FROM job_history WHERE job_id = $1 ORDER BY seq")
            .bind(Uuid::parse_str(id).expect("job id is a uuid"))
            .fetch_all(&self.pool)
            .await
            .expect("history rows")
    }

    /// How many history rows of `kind` each job has (jobs with none are absent).
    async fn count_kind(&self, kind: &str) -> HashMap<Uuid, i64> {
        let rows: Vec<(Uuid, i64)> =
            sqlx::query_as("SELECT job_id, count(*) FROM job_history WHERE kind = $1 GROUP BY job_id")
                .bind(kind)
                .fetch_all(&self.pool)
                .await
                .expect("history counts");
        rows.into_iter().collect()
    }

    /// Asserts that every job in `ids` is completed and has exactly one `job.completed` row, and
    /// that no job in the database has two.
    async fn assert_each_completed_once(&self, ids: &[String]) {
        let completed = self.count_kind("job.completed").await;
        let doubled: Vec<_> = completed.iter().filter(|(_, n)| **n > 1).collect();
        assert!(doubled.is_empty(), "jobs recorded complete more than once: {doubled:?}");
        let statuses: Vec<(Uuid, String)> = sqlx::query_as("SELECT job_id, status FROM jobs")
            .fetch_all(&self.pool)
            .await
            .expect("job statuses");
        let statuses: HashMap<Uuid, String> = statuses.into_iter().collect();
        for id in ids {
            let uuid = Uuid::parse_str(id).expect("job id is a uuid");
            assert_eq!(statuses.get(&uuid).map(String::as_str), Some("completed"), "job {id}");
            assert_eq!(completed.get(&uuid), Some(&1), "job {id} has one job.completed row");
        }
    }

    /// Waits until every job in `ids` is completed (or any ended otherwise, which fails).
    async fn wait_all_completed(&self, ids: &[String], within: Duration) -> Duration {
        let started = Instant::now();
        let uuids: Vec<Uuid> = ids.iter().map(|i| Uuid::parse_str(i).expect("uuid")).collect();
        wait_for(format!("{} jobs to complete", ids.len()), within, || async {
            let rows: Vec<(String, i64)> =
                sqlx::query_as("SELECT status, count(*) FROM jobs WHERE job_id = ANY($1) GROUP BY status")
                    .bind(&uuids)
                    .fetch_all(&self.pool)
                    .await
                    .ok()?;
            let by: HashMap<String, i64> = rows.into_iter().collect();
            for bad in ["failed", "cancelled", "timed_out"] {
                assert_eq!(by.get(bad), None, "a job ended {bad}: {by:?}");
            }
            (by.get("completed") == Some(&(ids.len() as i64))).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        started.elapsed()
    }

    async fn stop(self) {
        self.gateway.token.cancel();
        match tokio::time::timeout(STARTUP, self.gateway.task).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!("gateway did not stop cleanly: {other:?}"),
        }
        self.pool.close().await;
        drop(self.nats);
        self.db.drop_database().await.expect("drop the test database");
    }
}

/// A job of built-in `sleep` steps: it runs inside the robot process, so it freezes and dies
/// with it.
fn sleep_job(name: &str, ms: u128) -> Value {
    json!({
        "workflow_name": name,
        "workflow_json": {"steps": [{"id": "nap", "kind": "sleep", "ms": ms as u64}]},
    })
}

/// Whether a history row of `kind` exists.
fn has(history: &[(String, Option<i32>, Option<String>)], kind: &str) -> usize {
    history.iter().filter(|(k, _, _)| k == kind).count()
}

/// Robots are killed mid-job: their jobs run again elsewhere and complete exactly once, and the
/// dead robot is marked offline within the heartbeat timeout plus 2 s, from its heartbeat's
/// expiry alone (it says no goodbye).
#[tokio::test]
async fn a_robot_killed_mid_job_has_its_jobs_rerun_elsewhere_exactly_once() {
    let _serial = SERIAL.lock().await;
    let t = Timing::FAST;
    let fleet = Fleet::start(t).await;
    let _orchestrator = fleet.orchestrator("orchestrator");
    fleet.wait_healthy(STARTUP).await;
    let mut r1 = fleet.robot("r1", 2);
    let _r2 = fleet.robot("r2", 2);
    fleet.wait_online("r1").await;
    fleet.wait_online("r2").await;

    let job_ms = t.job_lease.as_millis() * 3 / 2;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(fleet.submit(&sleep_job(&format!("kill {i}"), job_ms)).await);
    }
    // Kill r1 as soon as it runs one of them.
    let on_r1 = wait_for("a job running on r1", STARTUP, || async {
        for id in &ids {
            let job = fleet.job(id).await;
            if job["status"] == "running" && job["robot_id"] == "r1" {
                return Some(id.clone());
            }
        }
        None
    })
    .await
    .unwrap();
    let running_on_r1: Vec<String> = {
        let mut v = Vec::new();
        for id in &ids {
            let job = fleet.job(id).await;
            if job["status"] == "running" && job["robot_id"] == "r1" {
                v.push(id.clone());
            }
        }
        v
    };
    r1.kill().await.unwrap();
    let killed_at = Instant::now();

    // Offline from the heartbeat's expiry: within the timeout plus 2 s of the kill.
    let offline_bound = t.heartbeat_timeout + Duration::from_secs(2);
    let offline_after = fleet.wait_robot("r1", "offline", offline_bound, |s| s == "offline").await;
    eprintln!("r1 offline {offline_after:?} after SIGKILL (bound {offline_bound:?})");

    // Re-offered after the lease lapses; r2 runs the whole backlog (two at a time).
    let bound = t.lease_expiry() + Duration::from_millis(job_ms as u64) * 3 + STARTUP;
    fleet.wait_all_completed(&ids, bound).await;
    eprintln!("all {} jobs completed {:?} after the kill", ids.len(), killed_at.elapsed());
    fleet.assert_each_completed_once(&ids).await;
    for id in &running_on_r1 {
        let job = fleet.job(id).await;
        assert_eq!(job["robot_id"], "r2", "the killed robot's job ran again on r2: {job}");
        assert_eq!(job["attempt"], 2, "{job}");
        let history = fleet.history(id).await;
        assert_eq!(has(&history, "job.requeued"), 1, "{history:?}");
        assert_eq!(has(&history, "job.started"), 2, "{history:?}");
    }
    assert!(running_on_r1.contains(&on_r1));
    fleet.stop().await;
}

/// A robot frozen (SIGSTOP) past its lease loses the job to another robot; when it resumes its
/// renewal is refused and it stops the job without reporting it, so the job has one completion,
/// by the other robot.
#[tokio::test]
async fn a_frozen_robot_is_fenced_off_its_job_when_it_resumes() {
    let _serial = SERIAL.lock().await;
    let t = Timing::FAST;
    let fleet = Fleet::start(t).await;
    let _orchestrator = fleet.orchestrator("orchestrator");
    fleet.wait_healthy(STARTUP).await;
    let mut frozen = fleet.robot("frozen", 1);
    fleet.wait_online("frozen").await;

    // Step one sleeps in the robot (it freezes with it) for three leases; step two leaves a
    // marker in the state directory of the robot that ran it (a shell step's working directory
    // is <state>/jobs/<job>-<attempt>).
    let nap = 3 * t.job_lease.as_millis() as u64;
    let id = fleet
        .submit(&json!({
            "workflow_name": "frozen",
            "workflow_json": {"steps": [
                {"id": "nap", "kind": "sleep", "ms": nap},
                {"id": "mark", "kind": "shell", "argv": ["sh", "-c", "touch ../../step-two-ran"]}
            ]},
        }))
        .await;
    fleet
        .wait_job(&id, "to run on frozen", STARTUP, |j| j["status"] == "running" && j["robot_id"] == "frozen")
        .await;
    let _other = fleet.robot("other", 1);
    fleet.wait_online("other").await;

    frozen.stop().unwrap();
    let stopped_at = Instant::now();
    // The lease lapses (no renewals), the sweeper re-offers it and the other robot claims it.
    let bound = t.lease_expiry() + t.heartbeat_timeout + Duration::from_secs(2);
    fleet
        .wait_job(&id, "to be claimed by other", bound, |j| {
            j["status"] == "running" && j["robot_id"] == "other"
        })
        .await;
    let taken_after = stopped_at.elapsed();
    // The robot renews every third of a lease, so its last renewal was at most a third of a
    // lease before it froze: the lease lapses no sooner than two thirds of a lease after.
    let earliest = t.job_lease * 2 / 3;
    assert!(taken_after >= earliest, "re-offered before the lease lapsed: {taken_after:?} < {earliest:?}");
    frozen.cont().unwrap();
    eprintln!("job taken over {taken_after:?} after SIGSTOP (lease {:?})", t.job_lease);

    // The resumed robot's renewal is refused at once (its timer is overdue) and it stops.
    frozen.wait_for_log("lease renewal refused", Duration::from_secs(5)).await.unwrap();
    let job = fleet.wait_status(&id, "completed", Duration::from_millis(nap) + STARTUP).await;
    assert_eq!(job["robot_id"], "other", "{job}");
    assert_eq!(job["attempt"], 2, "{job}");
    let history = fleet.history(&id).await;
    assert_eq!(has(&history, "job.completed"), 1, "{history:?}");
    let completed = history.iter().find(|(k, _, _)| k == "job.completed").unwrap();
    assert_eq!((completed.1, completed.2.as_deref()), (Some(2), Some("other")), "{history:?}");
    assert!(fleet.state_dir("other").join("step-two-ran").exists(), "the other robot ran step two");
    assert!(
        !fleet.state_dir("frozen").join("step-two-ran").exists(),
        "the fenced robot went on to step two:\n{}",
        frozen.log_tail(30)
    );
    assert!(!frozen.log().contains("completion refused"), "it stopped rather than reporting");
    // Back to work: it beats again, is online and runs nothing.
    fleet.wait_online("frozen").await;
    wait_for("the resumed robot to report no running job", STARTUP, || async {
        let robot = fleet.robot_view("frozen").await;
        (robot["current_jobs"] == 0 && robot["status"] != "offline").then_some(())
    })
    .await
    .unwrap();
    assert!(frozen.is_running());
    fleet.stop().await;
}

/// A robot killed and started again at once with the same state directory is the same robot
/// (same id in the API, one robot), and its old session's job is offered again as soon as it
/// registers, long before the 30 s lease would lapse.
#[tokio::test]
async fn a_restarted_robot_keeps_its_identity_and_its_old_jobs_are_reoffered_at_once() {
    let _serial = SERIAL.lock().await;
    let t = Timing::FAST.with_job_lease(Duration::from_secs(30));
    let fleet = Fleet::start(t).await;
    let _orchestrator = fleet.orchestrator("orchestrator");
    fleet.wait_healthy(STARTUP).await;
    // No --id: the robot makes its id and keeps it in its state directory.
    let mut robot = Process::spawn(fleet.robot_spec(None, "keeper", 1)).unwrap();
    let id = wait_for("the robot to register", STARTUP, || async {
        let (_, robots) = fleet.get("/api/v1/metrics/robots").await;
        robots.as_array()?.first()?["robot_id"].as_str().map(str::to_owned)
    })
    .await
    .unwrap();
    fleet.wait_online(&id).await;

    let job = fleet.submit(&sleep_job("restart", 2000)).await;
    fleet.wait_job(&job, "to run", STARTUP, |j| j["status"] == "running").await;
    robot.kill().await.unwrap();
    robot.restart().unwrap();
    let restarted_at = Instant::now();

    // Re-offered on registration, not after the lease: a quarter of it is a generous bound
    // (a process start and one registration take well under a second here).
    let bound = t.job_lease / 4;
    fleet.wait_job(&job, "to be re-offered (attempt 2)", bound, |j| j["attempt"] == 2).await;
    let reoffered = restarted_at.elapsed();
    eprintln!("old session's job re-offered {reoffered:?} after the restart (lease {:?})", t.job_lease);
    let done = fleet.wait_status(&job, "completed", STARTUP).await;
    assert_eq!(done["robot_id"], id.as_str(), "{done}");
    let history = fleet.history(&job).await;
    let requeued: Vec<_> = history.iter().filter(|(k, _, _)| k == "job.requeued").collect();
    assert_eq!(requeued.len(), 1, "{history:?}");
    let reason: String = sqlx::query_scalar(
        "SELECT data->>'reason' FROM job_history WHERE job_id = $1 AND kind = 'job.requeued'",
    )
    .bind(Uuid::parse_str(&job).unwrap())
    .fetch_one(&fleet.pool)
    .await
    .unwrap();
    assert_eq!(reason, "robot restarted");
    assert_eq!(has(&history, "job.completed"), 1, "{history:?}");

    // One robot, the same one, online.
    let (_, robots) = fleet.get("/api/v1/metrics/robots").await;
    let robots = robots.as_array().cloned().unwrap_or_default();
    assert_eq!(robots.len(), 1, "{robots:?}");
    assert_eq!(robots[0]["robot_id"], id.as_str());
    assert_ne!(robots[0]["status"], "offline");
    fleet.stop().await;
}

/// A job whose shell step kills its robot (`kill -9 $PPID`) is tried `max_attempts` times, the
/// robot being restarted after each crash, and then fails with a reason that says so, instead of
/// killing robots forever.
#[tokio::test]
async fn a_job_that_crashes_its_robot_fails_after_max_attempts() {
    let _serial = SERIAL.lock().await;
    let t = Timing::FAST;
    let fleet = Fleet::start(t).await;
    let _orchestrator = fleet.orchestrator("orchestrator");
    fleet.wait_healthy(STARTUP).await;
    let mut robot = fleet.robot("victim", 1);
    fleet.wait_online("victim").await;

    let id = fleet
        .submit(&json!({
            "workflow_name": "robot killer",
            "workflow_json": {"steps": [{"id": "boom", "kind": "shell", "argv": ["sh", "-c", "kill -9 $PPID"]}]},
        }))
        .await;

    // Restart the robot whenever it dies, until the job is decided. Each round is a restart and
    // a registration (which expires the old session's job at once); bound it by a lease per
    // attempt in case expiry only comes from the sweeper.
    let per_attempt = t.lease_expiry() + Duration::from_secs(5);
    let deadline = Instant::now() + per_attempt * (t.max_attempts + 2);
    let mut crashes = 0;
    let job = loop {
        assert!(Instant::now() < deadline, "job {id} not decided after {crashes} crashes");
        let job = fleet.job(&id).await;
        if ["failed", "completed", "cancelled", "timed_out"].contains(&job["status"].as_str().unwrap_or("")) {
            break job;
        }
        if let Some(status) = robot.try_status().unwrap() {
            crashes += 1;
            assert!(crashes <= t.max_attempts + 1, "robot crashed {crashes} times; the job cycles");
            eprintln!("robot died ({status}); restarting it (crash {crashes})");
            robot.restart().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempt"], t.max_attempts, "{job}");
    let error = job["error_message"].as_str().unwrap_or_default();
    assert!(error.contains(&format!("gave up after {} attempts", t.max_attempts)), "clear reason: {job}");
    assert_eq!(crashes, t.max_attempts, "one crash per attempt");
    let history = fleet.history(&id).await;
    assert_eq!(has(&history, "job.started"), t.max_attempts as usize, "{history:?}");
    assert_eq!(has(&history, "job.failed"), 1, "{history:?}");
    assert_eq!(has(&history, "job.completed"), 0, "{history:?}");

    // The last robot is not offered it again, and stays up to run other work.
    let after = fleet.submit(&sleep_job("after", 100)).await;
    fleet.wait_status(&after, "completed", STARTUP).await;
    assert!(robot.is_running(), "the robot keeps running once the job is failed");
    fleet.stop().await;
}

/// A job running three leases long, on a robot that renews, is never offered again: one
/// attempt, no `job.requeued`, while another robot waits idle for work.
#[tokio::test]
async fn a_job_longer_than_its_lease_is_not_reoffered_while_renewed() {
    let _serial = SERIAL.lock().await;
    let t = Timing::FAST;
    let fleet = Fleet::start(t).await;
    let _orchestrator = fleet.orchestrator("orchestrator");
    fleet.wait_healthy(STARTUP).await;
    let _r1 = fleet.robot("r1", 1);
    let _r2 = fleet.robot("r2", 1);
    fleet.wait_online("r1").await;
    fleet.wait_online("r2").await;

    let ms = 3 * t.job_lease.as_millis();
    let id = fleet.submit(&sleep_job("long", ms)).await;
    let job = fleet.wait_status(&id, "completed", Duration::from_millis(ms as u64) + STARTUP).await;
    assert_eq!(job["attempt"], 1, "{job}");
    let history = fleet.history(&id).await;
    let kinds: Vec<&str> = history.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(kinds, ["job.submitted", "job.assigned", "job.started", "job.completed"], "{history:?}");
    fleet.stop().await;
}

/// The orchestrator is killed while robots work and started again after more than a lease:
/// jobs that finished meanwhile have their completions recorded (the robots retry them), the
/// rest run, each completes exactly once.
///
/// Guards against a finished job losing its result across the outage: a robot stops renewing
/// once the work ends and retries the completion with a backoff of up to 5 s, so a new leader
/// that expires lapsed leases one job lease after it starts can refuse that completion and run
/// the job again (seen 2026-11: "completion refused (superseded attempt?)", then attempt 2).
#[tokio::test]
async fn an_orchestrator_killed_and_restarted_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let t = Timing::FAST;
    let fleet = Fleet::start(t).await;
    let mut orchestrator = fleet.orchestrator("orchestrator");
    fleet.wait_healthy(STARTUP).await;
    let _r1 = fleet.robot("r1", 2);
    let _r2 = fleet.robot("r2", 2);
    fleet.wait_online("r1").await;
    fleet.wait_online("r2").await;

    let ms = t.job_lease.as_millis() / 2;
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(fleet.submit(&sleep_job(&format!("busy {i}"), ms)).await);
    }
    let running = wait_for("robots to be busy", STARTUP, || async {
        let mut running = Vec::new();
        for id in &ids {
            if fleet.job(id).await["status"] == "running" {
                running.push(id.clone());
            }
        }
        (running.len() >= 2).then_some(running)
    })
    .await
    .unwrap();
    orchestrator.kill().await.unwrap();
    // Down for two leases: the running jobs end meanwhile, their leases lapse, and their robots
    // retry the completions (with backoff) until an orchestrator answers.
    tokio::time::sleep(t.job_lease * 2).await;
    orchestrator.restart().unwrap();
    let restarted = Instant::now();
    fleet.wait_all_completed(&ids, STARTUP * 2).await;
    eprintln!("all jobs completed {:?} after the restart", restarted.elapsed());
    fleet.assert_each_completed_once(&ids).await;
    for id in &running {
        let job = fleet.job(id).await;
        assert_eq!(job["attempt"], 1, "completion of a job running at the crash recorded, not re-run: {job}");
    }
    let requeued = fleet.count_kind("job.requeued").await;
    assert!(requeued.is_empty(), "no job re-offered: {requeued:?}");
    fleet.stop().await;
}

/// Installs an audit of who writes history rows: each row's writer (the connection's
/// application name, one per orchestrator) and the database time of the write.
async fn audit_history_writers(pool: &PgPool) {
    for statement in [
        "CREATE TABLE history_writer (history_id bigint, app text, at timestamptz)",
        "CREATE FUNCTION record_history_writer() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO history_writer VALUES (NEW.id, current_setting('application_name'), clock_timestamp());
             RETURN NULL;
         END $$",
        "CREATE TRIGGER history_writer AFTER INSERT ON job_history
         FOR EACH ROW EXECUTE FUNCTION record_history_writer()",
    ] {
        sqlx::query(statement).execute(pool).await.expect("audit trigger");
    }
}

/// The current leader epoch and the database's clock.
async fn leader_epoch(pool: &PgPool) -> (i64, time::OffsetDateTime) {
    sqlx::query_as("SELECT epoch, clock_timestamp() FROM leader_lease WHERE id = 1")
        .fetch_one(pool)
        .await
        .expect("leader lease row")
}

/// Waits until an orchestrator's lease loop runs (its connection's last statement touched the
/// lease): it is then ready to take over.
async fn wait_standing_by(pool: &PgPool, name: &str) {
    wait_for(format!("{name} to try the leader lease"), STARTUP, || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND query LIKE '%leader_lease%'",
        )
        .bind(name)
        .fetch_one(pool)
        .await
        .ok()?;
        (n > 0).then_some(())
    })
    .await
    .unwrap();
}

/// Submits jobs `range` with one idempotency key each, retrying 503 and outcome-unknown
/// answers (never anything else); returns the job ids and the non-200 statuses seen.
async fn submit_load(
    base: String,
    range: std::ops::Range<usize>,
    tag: &'static str,
    pace: Duration,
) -> (Vec<String>, Vec<u16>) {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
    let mut ids = Vec::new();
    let mut refusals = Vec::new();
    for i in range {
        let body = json!({
            "workflow_name": format!("load {i}"),
            "workflow_json": {"steps": [{"id": "note", "kind": "log", "message": "job {{n}}"}]},
            "variables": {"n": i},
        });
        let key = format!("{tag}-{i}");
        let deadline = Instant::now() + STARTUP * 2;
        loop {
            assert!(Instant::now() < deadline, "submit {key} not accepted in time; refusals {refusals:?}");
            let answer = http
                .post(format!("{base}/api/v1/workflows"))
                .header("Idempotency-Key", &key)
                .json(&body)
                .send()
                .await;
            match answer {
                Ok(r) if r.status() == 200 => {
                    let v: Value = r.json().await.unwrap();
                    ids.push(v["job_id"].as_str().unwrap().to_owned());
                    break;
                }
                Ok(r) => {
                    let status = r.status().as_u16();
                    let v: Value = r.json().await.unwrap_or(Value::Null);
                    assert!(
                        status == 503 || (status == 500 && v["error"]["code"] == "outcome_unknown"),
                        "submit answered {status}: {v}"
                    );
                    refusals.push(status);
                }
                Err(_) => refusals.push(0),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(pace).await;
    }
    (ids, refusals)
}

/// Two orchestrators; the leader is killed under load (200 submitted jobs): the standby takes
/// over within three leader leases and every job completes exactly once. Then the new leader is
/// frozen past its lease, the restarted one takes over, and when the frozen one resumes it
/// writes nothing (an audit trigger records which orchestrator wrote each history row).
#[tokio::test]
async fn the_standby_takes_over_from_a_killed_leader_and_a_deposed_leader_cannot_write() {
    let _serial = SERIAL.lock().await;
    let t = Timing::FAST;
    let fleet = Fleet::start_with_gateway_timeout(t, Duration::from_secs(2)).await;
    let mut a = fleet.orchestrator("orch-a");
    fleet.wait_healthy(STARTUP).await;
    audit_history_writers(&fleet.pool).await;
    let mut b = fleet.orchestrator("orch-b");
    wait_standing_by(&fleet.pool, "orch-b").await;
    let _r1 = fleet.robot("r1", 4);
    let _r2 = fleet.robot("r2", 4);
    fleet.wait_online("r1").await;
    fleet.wait_online("r2").await;

    // Bound on a takeover: the dead leader's lease lapses at most one lease after its last
    // renewal, the standby tries every third of a lease, so the new epoch exists within
    // 4/3 leases; three leases leave room for a loaded two-core machine.
    let takeover_bound = t.leader_lease * 3;

    let load = tokio::spawn(submit_load(fleet.base.clone(), 0..150, "first", Duration::ZERO));
    wait_for("50 jobs committed", STARTUP, || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&fleet.pool).await.ok()?;
        (n >= 50).then_some(())
    })
    .await
    .unwrap();
    assert!(a.log().contains("became the active orchestrator"), "orch-a leads:\n{}", a.log_tail(20));
    let (epoch, _) = leader_epoch(&fleet.pool).await;
    a.kill().await.unwrap();
    let killed = Instant::now();
    wait_for("the standby to take the lease", takeover_bound, || async {
        (leader_epoch(&fleet.pool).await.0 > epoch).then_some(())
    })
    .await
    .unwrap();
    let takeover = killed.elapsed();
    b.wait_for_log("became the active orchestrator", takeover_bound).await.unwrap();
    eprintln!("standby took the lease {takeover:?} after the leader's SIGKILL (bound {takeover_bound:?})");

    let (mut ids, refusals) = load.await.unwrap();
    eprintln!("first 150 submitted; answers other than 200 while taking over: {refusals:?}");
    assert_eq!(ids.len(), 150);
    let took = fleet.wait_all_completed(&ids, STARTUP * 2).await;
    eprintln!("150 jobs completed {took:?} after the last submit");

    // The killed leader comes back as the standby; freeze the current leader past its lease.
    a.restart().unwrap();
    wait_standing_by(&fleet.pool, "orch-a").await;
    let (epoch, _) = leader_epoch(&fleet.pool).await;
    b.stop().unwrap();
    let frozen = Instant::now();
    // Submitted while orch-b is frozen, paced to last past the takeover: requests the server
    // still routes to the frozen orchestrator go unanswered (the gateway says 500
    // outcome_unknown, and the retry with the same key is then safe).
    // Five clients at once, so that some requests are in flight at every moment of the freeze.
    let loads: Vec<_> = (0..5)
        .map(|c| {
            let range = 150 + c * 10..160 + c * 10;
            tokio::spawn(submit_load(fleet.base.clone(), range, "second", t.leader_lease / 10))
        })
        .collect();
    let taken_at = wait_for("orch-a to take over from the frozen leader", takeover_bound, || async {
        let (now_epoch, at) = leader_epoch(&fleet.pool).await;
        (now_epoch > epoch).then_some(at)
    })
    .await
    .unwrap();
    eprintln!("orch-a took over {:?} after orch-b froze", frozen.elapsed());
    // Frozen past its lease (the takeover proves it lapsed), and a while longer, so requests
    // routed to it pile up unanswered; then it resumes with a stale epoch.
    tokio::time::sleep(t.leader_lease * 2).await;
    b.cont().unwrap();
    b.wait_for_log("lease taken by another orchestrator; standing by", takeover_bound).await.unwrap();

    let mut refusals = Vec::new();
    for load in loads {
        let (more, refused) = load.await.unwrap();
        ids.extend(more);
        refusals.extend(refused);
    }
    eprintln!("last 50 submitted; answers other than 200 meanwhile: {refusals:?}");
    assert_eq!(ids.len(), 200);
    fleet.wait_all_completed(&ids, STARTUP * 2).await;
    fleet.assert_each_completed_once(&ids).await;

    let late: Vec<(i64, String)> = sqlx::query_as(
        "SELECT w.history_id, h.kind FROM history_writer w JOIN job_history h ON h.id = w.history_id
         WHERE w.app = 'orch-b' AND w.at > $1 ORDER BY w.history_id",
    )
    .bind(taken_at)
    .fetch_all(&fleet.pool)
    .await
    .unwrap();
    assert!(late.is_empty(), "the deposed leader wrote history after the takeover: {late:?}");
    let writers: Vec<(String, i64)> =
        sqlx::query_as("SELECT app, count(*) FROM history_writer GROUP BY app ORDER BY app")
            .fetch_all(&fleet.pool)
            .await
            .unwrap();
    eprintln!("history rows by writer: {writers:?}");
    assert!(writers.iter().any(|(app, _)| app == "orch-b"), "orch-b led in between: {writers:?}");
    assert!(a.is_running() && b.is_running(), "both orchestrators still run");
    fleet.stop().await;
}

/// nats-server is killed and started again on the same store while jobs run and wait: robots
/// and the orchestrator reconnect on their own, running jobs finish, queued jobs run, each
/// completes exactly once.
#[tokio::test]
async fn nats_killed_and_restarted_loses_nothing() {
    let _serial = SERIAL.lock().await;
    // A lease above a robot's reconnection time: since NATS is locked, reconnecting includes the
    // auth callout, and a robot that tries before the orchestrator's subscription is back waits
    // out the server's 2 s authorization timeout (nats-auth/src/setup.rs). FAST's 2 s lease is
    // shorter than that; the default lease is 30 s.
    let t = Timing::FAST.with_job_lease(Duration::from_secs(5));
    let mut fleet = Fleet::start(t).await;
    let mut orchestrator = fleet.orchestrator("orchestrator");
    fleet.wait_healthy(STARTUP).await;
    let mut r1 = fleet.robot("r1", 2);
    let mut r2 = fleet.robot("r2", 2);
    fleet.wait_online("r1").await;
    fleet.wait_online("r2").await;

    let ms = t.job_lease.as_millis();
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(fleet.submit(&sleep_job(&format!("through nats {i}"), ms)).await);
    }
    wait_for("four jobs running", STARTUP, || async {
        let mut n = 0;
        for id in &ids {
            if fleet.job(id).await["status"] == "running" {
                n += 1;
            }
        }
        (n >= 4).then_some(())
    })
    .await
    .unwrap();
    fleet.nats.kill().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.nats.restart().await.unwrap();
    let restarted = Instant::now();
    fleet.wait_healthy(STARTUP).await;
    eprintln!("gateway healthy {:?} after nats-server restarted", restarted.elapsed());
    // New work after the restart runs too.
    for i in 0..2 {
        ids.push(fleet.submit(&sleep_job(&format!("after nats {i}"), 100)).await);
    }
    fleet.wait_all_completed(&ids, STARTUP * 2).await;
    eprintln!("all {} jobs completed {:?} after the restart", ids.len(), restarted.elapsed());
    fleet.assert_each_completed_once(&ids).await;
    // The jobs running through the outage finished where they ran: none expired and re-run.
    let requeued = fleet.count_kind("job.requeued").await;
    assert!(requeued.is_empty(), "jobs re-offered after the NATS restart: {requeued:?}");
    assert!(orchestrator.is_running() && r1.is_running() && r2.is_running(), "nothing exited");
    fleet.stop().await;
}

/// The upstream address of a PostgreSQL URL.
async fn pg_addr(url: &str) -> SocketAddr {
    let url = reqwest::Url::parse(url).expect("database URL");
    let host = url.host_str().expect("host").to_owned();
    let port = url.port().unwrap_or(5432);
    tokio::net::lookup_host((host.as_str(), port)).await.expect("resolve").next().expect("an address")
}

/// The orchestrator loses PostgreSQL for two job leases (its connection goes through a proxy the
/// test cuts): submits get 503 with Retry-After meanwhile, never 200; robots keep running; a job
/// that ended during the outage has its completion applied afterwards; no running job is
/// expired because of the outage; the orchestrator rides it out without exiting.
///
/// The job that ends during the outage guards against the same loss as in
/// `an_orchestrator_killed_and_restarted_loses_nothing`: its completion must not lose to the
/// sweeper once the leader is back.
#[tokio::test]
async fn a_postgres_outage_longer_than_the_lease_expires_nothing_and_answers_503() {
    let _serial = SERIAL.lock().await;
    let t = Timing::FAST;
    let fleet = Fleet::start(t).await;
    let proxy = TcpProxy::start(pg_addr(fleet.db.url()).await).await.unwrap();
    let mut proxied = reqwest::Url::parse(fleet.db.url()).unwrap();
    proxied.set_port(Some(proxy.port())).unwrap();
    let mut orchestrator = Process::spawn(fleet.orchestrator_spec("orchestrator", proxied.as_str())).unwrap();
    fleet.wait_healthy(STARTUP).await;
    let mut r1 = fleet.robot("r1", 2);
    fleet.wait_online("r1").await;

    let outage = t.job_lease * 2;
    // One job ends during the outage, one runs through it and beyond.
    let ends_during = fleet.submit(&sleep_job("ends during the outage", outage.as_millis() / 2)).await;
    let runs_through = fleet.submit(&sleep_job("runs through the outage", outage.as_millis() * 2)).await;
    for id in [&ends_during, &runs_through] {
        fleet.wait_status(id, "running", STARTUP).await;
    }

    proxy.cut();
    let cut_at = Instant::now();
    let mut answers = Vec::new();
    while cut_at.elapsed() < outage {
        let (status, retry_after, body) = fleet.try_submit(&sleep_job("during", 10), None).await;
        assert_ne!(status, 200, "a submit succeeded while PostgreSQL was unreachable: {body}");
        answers.push((cut_at.elapsed(), status, retry_after.clone(), body["error"]["code"].clone()));
        assert_eq!(status, 503, "submit during the outage: {body}");
        assert!(retry_after.is_some(), "503 carries Retry-After: {body}");
        assert!(orchestrator.is_running(), "the orchestrator exited during the outage");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    proxy.restore();
    let restored = Instant::now();
    eprintln!("answers during the outage: {answers:?}");

    let back = fleet.wait_status(&ends_during, "completed", STARTUP).await;
    eprintln!("completion of the job that ended during the outage applied {:?} after", restored.elapsed());
    assert_eq!(back["attempt"], 1, "{back}");
    let through = fleet.wait_status(&runs_through, "completed", outage * 2 + STARTUP).await;
    assert_eq!(through["attempt"], 1, "{through}");
    for id in [&ends_during, &runs_through] {
        let history = fleet.history(id).await;
        assert_eq!(has(&history, "job.requeued"), 0, "expired because of the outage: {history:?}");
        assert_eq!(has(&history, "job.completed"), 1, "{history:?}");
    }
    let after = fleet.submit(&sleep_job("after", 10)).await;
    fleet.wait_status(&after, "completed", STARTUP).await;
    assert!(orchestrator.is_running() && r1.is_running(), "nothing exited");
    let restarts = orchestrator.log().matches("became the active orchestrator").count();
    eprintln!("orchestrator became leader {restarts} times; proxy refused {} connections", proxy.refused());
    fleet.stop().await;
}

/// A second robot with the id of a live robot but another state directory exits non-zero with
/// a message naming the id; the live robot stays online and keeps working.
#[tokio::test]
async fn an_impostor_with_a_live_robots_id_exits_and_the_robot_is_undisturbed() {
    let _serial = SERIAL.lock().await;
    let t = Timing::FAST;
    let fleet = Fleet::start(t).await;
    let _orchestrator = fleet.orchestrator("orchestrator");
    fleet.wait_healthy(STARTUP).await;
    let mut live = fleet.robot("twin", 1);
    fleet.wait_online("twin").await;

    let mut impostor = Process::spawn(fleet.robot_spec(Some("twin"), "impostor", 1)).unwrap();
    let status = impostor.wait(EXIT).await.unwrap();
    assert!(!status.success(), "the impostor exits non-zero: {status}");
    let log = impostor.log();
    assert!(log.contains("twin") && log.contains("already live"), "message names the id:\n{log}");

    // Undisturbed: still online, and it runs a job (over more than a heartbeat timeout, so a
    // disturbed heartbeat would show).
    let id = fleet.submit(&sleep_job("still works", t.heartbeat_timeout.as_millis())).await;
    let job = fleet.wait_status(&id, "completed", t.heartbeat_timeout + STARTUP).await;
    assert_eq!(job["robot_id"], "twin");
    assert_eq!(job["attempt"], 1);
    let robot = fleet.robot_view("twin").await;
    assert_ne!(robot["status"], "offline", "{robot}");
    assert!(live.is_running());
    fleet.stop().await;
}
