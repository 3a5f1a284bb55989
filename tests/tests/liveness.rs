//! Liveness: how soon the fabric knows a robot is gone or not taking work, and what it does
//! about it. A robot killed mid-job has its job started again within the heartbeat timeout (not
//! its lease); a robot restarted under the same id has its old session's job re-offered at once;
//! a robot that exits gracefully shows `offline` within 2 s; a paused robot shows `maintenance`;
//! a heartbeat timeout given alone is enough to start the orchestrator binary.
//!
//! Robots whose death is the fault are real `fleet-robot` processes ([`fleet_tests::Process`]);
//! the orchestrator and gateway run in-process ([`common::Stack`]), except in the configuration
//! test, which is about the binary. Tests with time bounds hold [`SERIAL`], as those of
//! `faults.rs` do, so two of them never compete for the machine's cores. The binaries are not
//! built by `cargo test --test liveness`: run
//! `cargo build --bins -p fleet-robot -p fleet-orchestrator` first.

mod common;

use std::time::Duration;

use common::{Stack, WAIT};
use fleet_schemas::{Capability, RobotId, TenantId, subjects};
use fleet_tests::{NatsServer, Process, ProcessSpec, TestDb, wait_for};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::time::Instant;
use uuid::Uuid;

/// Held for the whole of each timed test: the bounds assume the test has the machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A `fleet-robot` process of tenant `default` with one slot and its state in `<dirs>/<id>`.
fn robot(stack: &Stack, id: &str) -> Process {
    let spec = ProcessSpec::fleet(format!("robot-{id}"), "fleet-robot")
        .expect("fleet-robot binary")
        .args(["--tenant", "default", "--id", id, "--max-jobs", "1", "--shutdown-grace", "5s"])
        .arg("--state-dir")
        .arg(stack.dirs.path().join(id))
        .env("NATS_URL", stack.nats.url())
        .env("FLEET_ROBOT_KEY", &stack.robot_key)
        .env("RUST_LOG", "info,async_nats=warn");
    Process::spawn(spec).expect("robot starts")
}

/// A job of one built-in `sleep` step: it dies with its robot's process.
fn sleep_job(name: &str, ms: u64) -> Value {
    json!({"workflow_name": name, "workflow_json": {"steps": [{"id": "nap", "kind": "sleep", "ms": ms}]}})
}

async fn robot_status(stack: &Stack, id: &str) -> Value {
    stack.get(&format!("/api/v1/metrics/robots/{id}")).await.1
}

/// Waits until the robot is online and takes work.
async fn wait_ready(stack: &Stack, id: &str) {
    wait_for(format!("robot {id} ready"), WAIT, || async {
        let r = robot_status(stack, id).await;
        (r["status"] == "online" && r["state"] == "online").then_some(())
    })
    .await
    .unwrap();
}

/// Waits until the robot shows `offline`; returns the time waited.
async fn wait_offline(stack: &Stack, id: &str, within: Duration) -> Duration {
    let started = Instant::now();
    wait_for(format!("robot {id} offline"), within, || async {
        (robot_status(stack, id).await["status"] == "offline").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    started.elapsed()
}

/// Waits until the job runs as `attempt` on `robot`; returns the time waited.
async fn wait_running(stack: &Stack, id: &str, robot: &str, attempt: i64, within: Duration) -> Duration {
    let started = Instant::now();
    wait_for(format!("job {id} attempt {attempt} running on {robot}"), within, || async {
        let j = stack.job(id).await;
        (j["status"] == "running" && j["robot_id"] == robot && j["attempt"] == attempt).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    started.elapsed()
}

/// `(kind, reason)` of each history row of a job, in order.
async fn history(stack: &Stack, id: &str) -> Vec<(String, Option<String>)> {
    let pool = stack.db.pool().await.unwrap();
    let rows = sqlx::query_as("SELECT kind, data->>'reason' FROM job_history WHERE job_id = $1 ORDER BY seq")
        .bind(Uuid::parse_str(id).unwrap())
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows
}

/// Reasons of a robot's `robot.disconnected` rows.
async fn disconnects(stack: &Stack, robot: &str) -> Vec<String> {
    let pool = stack.db.pool().await.unwrap();
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT data->>'reason' FROM job_history WHERE robot_id = $1 AND kind = 'robot.disconnected' ORDER BY id",
    )
    .bind(robot)
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    rows.into_iter().map(|(r,)| r).collect()
}

fn count(history: &[(String, Option<String>)], kind: &str) -> usize {
    history.iter().filter(|(k, _)| k == kind).count()
}

/// A robot killed mid-job (SIGKILL, no goodbye) with a 30 s lease and a 3 s heartbeat timeout:
/// the job's next attempt starts on another robot within the timeout plus a few seconds of the
/// kill, not after the lease, and is recorded complete once.
#[tokio::test]
async fn a_killed_robots_job_starts_again_within_the_heartbeat_timeout_not_its_lease() {
    let _serial = SERIAL.lock().await;
    let timeout = Duration::from_secs(3);
    let lease = Duration::from_secs(30);
    let stack = Stack::start_with(|c| {
        c.heartbeat_timeout = timeout;
        c.job_lease = lease;
    })
    .await;
    let started = Instant::now();
    let mut r1 = robot(&stack, "r1");
    wait_ready(&stack, "r1").await;
    let id = stack.submit(sleep_job("orphan", 4_000)).await["job_id"].as_str().unwrap().to_owned();
    wait_running(&stack, &id, "r1", 1, WAIT).await;
    let _r2 = robot(&stack, "r2");
    wait_ready(&stack, "r2").await;
    // The leader takes back an offline robot's jobs only once it has been healthy for a
    // heartbeat timeout (an outage must not re-run the fleet's work); nothing announces that
    // moment, so be sure the test is past it.
    tokio::time::sleep_until(started + timeout).await;

    r1.kill().await.unwrap();
    let killed = Instant::now();
    let bound = timeout + Duration::from_secs(3);
    wait_running(&stack, &id, "r2", 2, bound).await;
    let restarted = killed.elapsed();
    eprintln!("attempt 2 started {restarted:?} after SIGKILL (bound {bound:?}, lease {lease:?})");

    let job = stack.finished(&id).await;
    assert_eq!((job["status"].as_str(), job["robot_id"].as_str()), (Some("completed"), Some("r2")), "{job}");
    assert_eq!(job["attempt"], 2, "{job}");
    let h = history(&stack, &id).await;
    assert_eq!(count(&h, "job.completed"), 1, "{h:?}");
    assert_eq!(count(&h, "job.started"), 2, "{h:?}");
    let requeued: Vec<_> = h.iter().filter(|(k, _)| k == "job.requeued").collect();
    assert_eq!(requeued.len(), 1, "{h:?}");
    assert_eq!(requeued[0].1.as_deref(), Some("robot offline"), "{h:?}");
    assert_eq!(disconnects(&stack, "r1").await, ["heartbeat expired"]);
    stack.stop().await;
}

/// A robot killed and started again at once under the same id (a new session) has its old
/// session's job re-offered as it registers: long before the heartbeat timeout (20 s) or the
/// lease (30 s) could.
#[tokio::test]
async fn a_replaced_session_has_its_job_reoffered_at_once() {
    let _serial = SERIAL.lock().await;
    let stack = Stack::start_with(|c| {
        c.heartbeat_timeout = Duration::from_secs(20);
        c.job_lease = Duration::from_secs(30);
    })
    .await;
    let mut r1 = robot(&stack, "r1");
    wait_ready(&stack, "r1").await;
    let id = stack.submit(sleep_job("replaced", 2_000)).await["job_id"].as_str().unwrap().to_owned();
    wait_running(&stack, &id, "r1", 1, WAIT).await;
    r1.kill().await.unwrap();
    let killed = Instant::now();
    let _again = robot(&stack, "r1");
    let bound = Duration::from_secs(10);
    wait_running(&stack, &id, "r1", 2, bound).await;
    eprintln!("attempt 2 started {:?} after the kill and restart (bound {bound:?})", killed.elapsed());
    let job = stack.finished(&id).await;
    assert_eq!((job["status"].as_str(), job["attempt"].as_i64()), (Some("completed"), Some(2)), "{job}");
    let h = history(&stack, &id).await;
    assert_eq!(count(&h, "job.completed"), 1, "{h:?}");
    assert!(h.iter().any(|(k, r)| k == "job.requeued" && r.as_deref() == Some("robot restarted")), "{h:?}");
    stack.stop().await;
}

/// A robot told to stop, and one sent SIGTERM, exit and show `offline` within 2 s of exiting,
/// with a heartbeat timeout (30 s) far longer: they delete their heartbeat on the way out.
#[tokio::test]
async fn a_robot_that_exits_gracefully_shows_offline_within_two_seconds() {
    let _serial = SERIAL.lock().await;
    let stack = Stack::start_with(|c| c.heartbeat_timeout = Duration::from_secs(30)).await;
    let mut told = robot(&stack, "told");
    let mut termed = robot(&stack, "termed");
    wait_ready(&stack, "told").await;
    wait_ready(&stack, "termed").await;
    let bound = Duration::from_secs(2);

    let (status, answer) = stack.post("/api/v1/robots/told/stop", &json!({"force": false})).await;
    assert_eq!(status, 200, "{answer}");
    let exit = told.wait(WAIT).await.unwrap();
    assert!(exit.success(), "clean exit on a stop order: {exit}");
    let after = wait_offline(&stack, "told", bound).await;
    eprintln!("stopped robot offline {after:?} after it exited (bound {bound:?})");

    termed.term().unwrap();
    let exit = termed.wait(WAIT).await.unwrap();
    assert!(exit.success(), "clean exit on SIGTERM: {exit}");
    let after = wait_offline(&stack, "termed", bound).await;
    eprintln!("SIGTERMed robot offline {after:?} after it exited (bound {bound:?})");

    assert_eq!(disconnects(&stack, "told").await, ["robot stopped"]);
    assert_eq!(disconnects(&stack, "termed").await, ["robot stopped"]);
    // The record stays offline: no heartbeat written before the goodbye brings it back.
    let pool = stack.db.pool().await.unwrap();
    let online: Vec<(String,)> =
        sqlx::query_as("SELECT robot_id FROM robots WHERE online").fetch_all(&pool).await.unwrap();
    pool.close().await;
    assert!(online.is_empty(), "{online:?}");
    stack.stop().await;
}

/// A paused robot shows `status: maintenance` (the Canvas reads only `status`) with `state:
/// paused`, in its view, in the lists filtered by status and in the fleet summary; resumed, it is
/// `online` again.
#[tokio::test]
async fn a_paused_robot_shows_maintenance() {
    let mut stack = Stack::start().await;
    stack.start_robot(stack.robot_config("napper", &[]));
    wait_ready(&stack, "napper").await;
    let (status, answer) = stack.post("/api/v1/robots/napper/pause", &Value::Null).await;
    assert_eq!(status, 200, "{answer}");
    wait_for("the robot to report paused", WAIT, || async {
        (robot_status(&stack, "napper").await["state"] == "paused").then_some(())
    })
    .await
    .unwrap();
    let r = robot_status(&stack, "napper").await;
    assert_eq!((r["status"].as_str(), r["state"].as_str()), (Some("maintenance"), Some("paused")), "{r}");
    let ids = |v: Value| -> Vec<String> {
        v.as_array().unwrap().iter().map(|r| r["robot_id"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(ids(stack.get("/api/v1/metrics/robots?status=maintenance").await.1), ["napper"]);
    assert!(ids(stack.get("/api/v1/metrics/robots?status=idle").await.1).is_empty());
    assert!(ids(stack.get("/api/v1/metrics/robots?status=online").await.1).is_empty());
    let (_, fleet) = stack.get("/api/v1/metrics/fleet").await;
    assert_eq!(
        (fleet["maintenance_robots"].as_u64(), fleet["idle_robots"].as_u64()),
        (Some(1), Some(0)),
        "{fleet}"
    );

    let (status, answer) = stack.post("/api/v1/robots/napper/resume", &Value::Null).await;
    assert_eq!(status, 200, "{answer}");
    wait_ready(&stack, "napper").await;
    assert_eq!(ids(stack.get("/api/v1/metrics/robots?status=idle").await.1), ["napper"]);
    stack.stop().await;
}

/// The orchestrator binary with only `FLEET_HEARTBEAT_TIMEOUT=5s` starts (the interval is
/// derived, a third of it), and robots learn that interval: they beat every ~1.7 s, neither at
/// the old 10 s default nor at their own 5 s fallback.
#[tokio::test]
async fn a_heartbeat_timeout_alone_starts_the_orchestrator_and_sets_the_beat() {
    let _serial = SERIAL.lock().await;
    fleet_tests::init_tracing();
    let nats = NatsServer::start().await.expect("nats-server starts");
    let db = TestDb::create().await.expect("test database");
    let dirs = tempfile::tempdir().unwrap();
    // An empty config file, so a fleet.toml in the current directory cannot change the test.
    std::fs::write(dirs.path().join("fleet.toml"), "").unwrap();
    let spec = ProcessSpec::fleet("orchestrator", "fleet-orchestrator")
        .expect("fleet-orchestrator binary")
        .env("NATS_URL", nats.url())
        .env("FLEET_NATS_AUTH_DIR", nats.auth_dir())
        .env("DATABASE_URL", db.url())
        .env("FLEET_CONFIG", dirs.path().join("fleet.toml"))
        .env("FLEET_HEARTBEAT_TIMEOUT", "5s")
        .env("FLEET_DB_POOL_SIZE", "4")
        .env("RUST_LOG", "info,async_nats=warn,sqlx=warn");
    let mut orchestrator = Process::spawn(spec).expect("orchestrator starts");

    let mut config = fleet_robot::RobotConfig::new(TenantId::default_tenant());
    config.nats_url = nats.url();
    let key = common::robot_key(db.url(), "default", None, None).await;
    config.key = Some(fleet_robot::RobotKey::new(&key).unwrap());
    config.id = Some(RobotId::new("beater").unwrap());
    config.capabilities = vec![Capability::new("gpu").unwrap()];
    config.state_dir = dirs.path().join("beater");
    let token = tokio_util::sync::CancellationToken::new();
    let robot = tokio::spawn(fleet_robot::run(config, token.clone()));

    let js = async_nats::jetstream::new(nats.client().await.unwrap());
    let kv = wait_for("the heartbeat bucket", WAIT, || async {
        js.get_key_value(subjects::ROBOTS_BUCKET).await.ok()
    })
    .await
    .unwrap();
    let key = subjects::heartbeat_key(&TenantId::default_tenant(), &RobotId::new("beater").unwrap());
    let mut watch = kv.watch(&key).await.unwrap();
    // The first beats come with registration and the desired state; count the steady ones.
    let mut beats = Vec::new();
    let collected = tokio::time::timeout(WAIT, async {
        while let Some(entry) = watch.next().await {
            if entry.unwrap().operation == async_nats::jetstream::kv::Operation::Put {
                beats.push(Instant::now());
            }
            if beats.len() == 6 {
                break;
            }
        }
    })
    .await;
    assert!(collected.is_ok(), "6 beats within {WAIT:?}; got {}\n{}", beats.len(), orchestrator.log_tail(20));
    let gaps: Vec<Duration> = beats.windows(2).skip(2).map(|w| w[1] - w[0]).collect();
    eprintln!("beat gaps {gaps:?} (derived interval 5s / 3)");
    for gap in &gaps {
        assert!(
            (Duration::from_millis(1_200)..=Duration::from_millis(2_500)).contains(gap),
            "beats every 5s / 3: {gaps:?}"
        );
    }
    assert!(orchestrator.is_running(), "{}", orchestrator.log_tail(20));
    assert!(!orchestrator.log().contains("heartbeat_timeout must be longer"));

    token.cancel();
    tokio::time::timeout(WAIT, robot).await.unwrap().unwrap().unwrap();
    orchestrator.term().unwrap();
    orchestrator.wait(WAIT).await.unwrap();
    drop(nats);
    db.drop_database().await.unwrap();
}

/// nats-server is down for longer than the heartbeat timeout, and a robot running a job is
/// frozen (SIGSTOP) through the outage, so its heartbeat has lapsed when the server is back and it
/// is declared offline then. The leader has not been healthy for a heartbeat timeout at that
/// moment, so the job is not taken back: the robot resumes, beats, renews and finishes it as
/// attempt 1. (Declaring offline while the leader itself was cut off must not re-run the fleet's
/// work; the lease still decides for such robots.)
#[tokio::test]
async fn a_robot_declared_offline_right_after_an_outage_keeps_its_job() {
    let _serial = SERIAL.lock().await;
    let timeout = Duration::from_secs(3);
    let mut stack = Stack::start_with(|c| {
        c.heartbeat_timeout = timeout;
        c.job_lease = Duration::from_secs(30);
    })
    .await;
    let started = Instant::now();
    let r1 = robot(&stack, "r1");
    wait_ready(&stack, "r1").await;
    let id =
        stack.submit(sleep_job("through the outage", 8_000)).await["job_id"].as_str().unwrap().to_owned();
    wait_running(&stack, &id, "r1", 1, WAIT).await;
    // Past the point where a death would re-offer at once, so only the outage guard holds it.
    tokio::time::sleep_until(started + timeout).await;

    r1.stop().unwrap();
    stack.nats.kill().unwrap();
    // The outage itself: longer than the heartbeat timeout, so the robot's heartbeat lapses.
    tokio::time::sleep(timeout + Duration::from_secs(1)).await;
    stack.nats.restart().await.unwrap();
    let back = Instant::now();
    wait_for("r1 declared offline after the outage", WAIT, || async {
        (!disconnects(&stack, "r1").await.is_empty()).then_some(())
    })
    .await
    .unwrap();
    let declared = back.elapsed();
    assert!(declared < timeout, "declared offline {declared:?} after the outage, past the guard");
    r1.cont().unwrap();

    let job = stack.finished(&id).await;
    assert_eq!((job["status"].as_str(), job["attempt"].as_i64()), (Some("completed"), Some(1)), "{job}");
    let h = history(&stack, &id).await;
    assert_eq!((count(&h, "job.started"), count(&h, "job.requeued")), (1, 0), "{h:?}");
    stack.stop().await;
}
