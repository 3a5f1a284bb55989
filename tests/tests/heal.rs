//! The fabric heals itself: each JetStream object Fleet owns is deleted under load, as an
//! operator's `nats consumer rm` / `nats stream rm` / `nats kv del` would, and the orchestrator
//! recreates it, every job submitted before, during and after still completes exactly once, and
//! what the object carries (offers, events, log lines, heartbeats, commands) flows again.
//!
//! Regression tests for issue 11 ("The fabric heals itself"): with a class consumer deleted the
//! class's jobs stayed queued for good (the orchestrator answered re-registrations from a cache of
//! consumers it believed existed); with `FLEET_JOBS` deleted no job of any tenant ran again.
//!
//! The offer watchdog's delay (`offer_check_after`) is set far beyond every bound here, so what
//! heals the fabric is the reconciler reacting to the loss, not the watchdog's slow backstop.
//! Each test holds [`SERIAL`]: they load the machine and their bounds assume they have it.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use common::{Stack, WAIT};
use fleet_schemas::subjects;
use fleet_schemas::{Class, RobotId, TenantId};
use fleet_tests::wait_for;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Time between two submissions of the load: a steady flow of short jobs, some always waiting.
const SUBMIT_EVERY: Duration = Duration::from_millis(40);
/// Jobs that must complete after the repair before the load stops: work flows again.
const AFTER_REPAIR: usize = 10;

/// One job: a log line (for `FLEET_LOGS`) and a short sleep, so offers queue up behind busy
/// slots while the object is deleted.
fn job(target: Option<&str>) -> Value {
    let mut body = json!({
        "workflow_name": "heal",
        "workflow_json": {"id": "heal", "steps": [
            {"id": "say", "kind": "log", "message": "still here"},
            {"id": "nap", "kind": "sleep", "ms": 30},
        ]},
    });
    if let Some(robot) = target {
        body["target_robot_id"] = json!(robot);
    }
    body
}

/// Jobs submitted continuously through the HTTP API, every third aimed at robot `r1` (so its
/// own consumer carries offers too), until stopped.
struct Load {
    ids: Arc<Mutex<Vec<String>>>,
    refused: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(stack: &Stack) -> Load {
        let (ids, refused) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
        let stop = CancellationToken::new();
        let (http, url) = (stack.http.clone(), format!("{}/api/v1/workflows", stack.base));
        let task = tokio::spawn({
            let (ids, refused, stop) = (ids.clone(), refused.clone(), stop.clone());
            async move {
                for n in 0u64.. {
                    let body = job((n % 3 == 0).then_some("r1"));
                    match http.post(&url).json(&body).send().await {
                        Ok(r) if r.status() == 200 => {
                            let answer: Value = r.json().await.unwrap_or(Value::Null);
                            match answer["job_id"].as_str() {
                                Some(id) => ids.lock().unwrap().push(id.to_owned()),
                                None => refused.lock().unwrap().push(answer.to_string()),
                            }
                        }
                        Ok(r) => refused.lock().unwrap().push(format!("{}", r.status())),
                        Err(e) => refused.lock().unwrap().push(e.to_string()),
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(SUBMIT_EVERY) => {}
                    }
                }
            }
        });
        Load { ids, refused, stop, task }
    }

    /// Submit `n` slower jobs at once, so offers wait in the stream behind busy slots.
    async fn burst(&self, stack: &Stack, n: usize) {
        for _ in 0..n {
            let mut body = job(None);
            body["workflow_json"]["steps"][1]["ms"] = json!(300);
            let id = stack.submit(body).await["job_id"].as_str().unwrap().to_owned();
            self.ids.lock().unwrap().push(id);
        }
    }

    fn submitted(&self) -> Vec<String> {
        self.ids.lock().unwrap().clone()
    }

    async fn stop(self) -> Vec<String> {
        self.stop.cancel();
        self.task.await.unwrap();
        let refused = self.refused.lock().unwrap().clone();
        assert!(refused.is_empty(), "submissions refused while the fabric healed: {refused:?}");
        self.ids.lock().unwrap().clone()
    }
}

fn uuids(ids: &[String]) -> Vec<Uuid> {
    ids.iter().map(|i| Uuid::parse_str(i).unwrap()).collect()
}

/// How many of `ids` are completed.
async fn completed(pool: &sqlx::PgPool, ids: &[String]) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE job_id = ANY($1) AND status = 'completed'")
        .bind(uuids(ids))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Wait until at least `at_least` of the jobs submitted so far have completed.
async fn wait_completions(stack: &Stack, load: &Load, pool: &sqlx::PgPool, at_least: i64, what: &str) {
    wait_for(what, WAIT, || async { (completed(pool, &load.submitted()).await >= at_least).then_some(()) })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", stack.nats.log_tail()));
}

/// Every job completed, each exactly once: one `job.completed` row, one start, attempt 1.
async fn assert_each_ran_once(pool: &sqlx::PgPool, ids: &[String], js: &jetstream::Context) {
    let all = wait_for(format!("all {} jobs to complete", ids.len()), WAIT, || async {
        (completed(pool, ids).await == ids.len() as i64).then_some(())
    })
    .await;
    if let Err(e) = all {
        panic!("{e}\n{}", offers_state(js).await);
    }
    let rows: Vec<(Uuid, i64, i64, i32)> = sqlx::query_as(
        "SELECT j.job_id,
                (SELECT count(*) FROM job_history h WHERE h.job_id = j.job_id AND h.kind = 'job.completed'),
                (SELECT count(*) FROM job_history h WHERE h.job_id = j.job_id AND h.kind = 'job.started'),
                j.attempt
         FROM jobs j WHERE j.job_id = ANY($1)",
    )
    .bind(uuids(ids))
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), ids.len());
    let twice: Vec<_> =
        rows.iter().filter(|(_, done, started, attempt)| (*done, *started, *attempt) != (1, 1, 1)).collect();
    assert!(twice.is_empty(), "jobs not run exactly once (id, completions, starts, attempt): {twice:?}");
}

/// A stack with two robots of two slots each, the watchdog out of the way, and the load running
/// until `AFTER_REPAIR` jobs have completed.
async fn loaded_stack() -> (Stack, Load, sqlx::PgPool, jetstream::Context) {
    let mut stack = Stack::start_with(|c| {
        c.offer_check_after = Duration::from_secs(600);
        // A consumer recreated under load delivers its backlog at once; an offer that reaches a
        // robot's pull just as its other pull won (pull.rs) comes back after `ack_wait`, the
        // bound DESIGN.md gives it ("short, it only covers receive-to-claim").
        c.offer_ack_wait = Duration::from_secs(2);
    })
    .await;
    for name in ["r1", "r2"] {
        let mut config = stack.robot_config(name, &[]);
        config.max_jobs = 2;
        stack.start_robot(config);
    }
    stack.wait_robots_online(2).await;
    let pool = stack.db.pool().await.unwrap();
    let js = jetstream::new(stack.nats.client().await.unwrap());
    let load = Load::start(&stack);
    wait_completions(&stack, &load, &pool, AFTER_REPAIR as i64, "the load to flow").await;
    (stack, load, pool, js)
}

/// After the repair: more jobs complete, then the load stops and every job ran exactly once.
/// Returns the stack for the caller's last checks (and to stop it).
async fn finish(stack: Stack, load: Load, pool: &sqlx::PgPool, js: &jetstream::Context) -> Stack {
    let so_far = load.submitted().len() as i64;
    wait_completions(
        &stack,
        &load,
        pool,
        so_far + AFTER_REPAIR as i64,
        "jobs to flow again after the repair",
    )
    .await;
    let ids = load.stop().await;
    assert_each_ran_once(pool, &ids, js).await;
    stack
}

/// What the offer consumers hold, for a failure message.
async fn offers_state(js: &jetstream::Context) -> String {
    let Ok(mut stream) = js.get_stream(subjects::JOBS_STREAM).await else { return "no FLEET_JOBS".into() };
    let mut out = format!("{:?}\n", stream.info().await.map(|i| i.state.clone()));
    let mut names = stream.consumer_names();
    while let Some(Ok(name)) = names.next().await {
        if let Ok(mut c) = stream.get_consumer::<consumer::pull::Config>(&name).await
            && let Ok(i) = c.info().await
        {
            out += &format!(
                "{name}: pending {} ack_pending {} waiting {} delivered {:?} ack_floor {:?}\n",
                i.num_pending, i.num_ack_pending, i.num_waiting, i.delivered, i.ack_floor
            );
        }
    }
    out
}

fn default_tenant() -> TenantId {
    TenantId::default_tenant()
}

/// The class both robots share (no declared capabilities, `shell` implied).
fn robots_class() -> Class {
    Class::parse(["shell"]).unwrap()
}

async fn consumer_exists(js: &jetstream::Context, name: &str) -> bool {
    match js.get_stream(subjects::JOBS_STREAM).await {
        Ok(stream) => stream.get_consumer::<consumer::pull::Config>(name).await.is_ok(),
        Err(_) => false,
    }
}

async fn wait_stream(js: &jetstream::Context, name: &str) {
    wait_for(format!("stream {name} to be recreated"), WAIT, || async {
        js.get_stream(name).await.ok().map(|_| ())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_deleted_class_consumer_is_recreated_and_its_jobs_run() {
    let _serial = SERIAL.lock().await;
    let (stack, load, pool, js) = loaded_stack().await;
    let name = subjects::class_consumer(&default_tenant(), &robots_class());
    let stream = js.get_stream(subjects::JOBS_STREAM).await.unwrap();
    assert!(stream.delete_consumer(&name).await.unwrap().success);
    wait_for("the class consumer to be recreated", WAIT, || async {
        consumer_exists(&js, &name).await.then_some(())
    })
    .await
    .unwrap();
    finish(stack, load, &pool, &js).await.stop().await;
}

#[tokio::test]
async fn a_deleted_robot_consumer_is_recreated_and_its_targeted_jobs_run() {
    let _serial = SERIAL.lock().await;
    let (stack, load, pool, js) = loaded_stack().await;
    let name = subjects::robot_consumer(&default_tenant(), &RobotId::new("r1").unwrap());
    let stream = js.get_stream(subjects::JOBS_STREAM).await.unwrap();
    assert!(stream.delete_consumer(&name).await.unwrap().success);
    wait_for("the robot consumer to be recreated", WAIT, || async {
        consumer_exists(&js, &name).await.then_some(())
    })
    .await
    .unwrap();
    finish(stack, load, &pool, &js).await.stop().await;
}

/// The offers in the stream go with it: the queued jobs are offered again from PostgreSQL, the
/// consumers come back, and no job runs twice (a robot holding an old offer is fenced).
#[tokio::test]
async fn a_deleted_jobs_stream_is_recreated_and_its_queued_jobs_offered_again() {
    let _serial = SERIAL.lock().await;
    let (stack, load, pool, js) = loaded_stack().await;
    load.burst(&stack, 20).await;
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'queued'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(queued > 0, "offers wait in the stream when it is deleted");
    assert!(js.delete_stream(subjects::JOBS_STREAM).await.unwrap().success);
    wait_stream(&js, subjects::JOBS_STREAM).await;
    let class = subjects::class_consumer(&default_tenant(), &robots_class());
    wait_for("the consumers to be recreated", WAIT, || async {
        let robot = subjects::robot_consumer(&default_tenant(), &RobotId::new("r2").unwrap());
        (consumer_exists(&js, &class).await && consumer_exists(&js, &robot).await).then_some(())
    })
    .await
    .unwrap();
    finish(stack, load, &pool, &js).await.stop().await;
}

/// Events that were in the stream are gone with it (PostgreSQL's history keeps them); events
/// of what happens afterwards flow into the recreated stream.
#[tokio::test]
async fn a_deleted_events_stream_is_recreated_and_new_events_flow() {
    let _serial = SERIAL.lock().await;
    let (stack, load, pool, js) = loaded_stack().await;
    let mut old = js.get_stream(subjects::EVENTS_STREAM).await.unwrap();
    let old_last = old.info().await.unwrap().state.last_sequence;
    assert!(old_last > 0, "the load wrote events");
    assert!(js.delete_stream(subjects::EVENTS_STREAM).await.unwrap().success);
    wait_stream(&js, subjects::EVENTS_STREAM).await;
    let id = stack.submit(job(None)).await["job_id"].as_str().unwrap().to_owned();
    // A client resuming from its last sequence in the old stream gets the new stream's events
    // (sequences start at 1 again), not only those numbered past its old position.
    let mut sse = stack
        .http
        .get(format!("{}/api/v1/events?since={old_last}", stack.base))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let resumed = tokio::time::timeout(WAIT, async {
        let mut body = String::new();
        while let Ok(Some(chunk)) = sse.chunk().await {
            body.push_str(&String::from_utf8_lossy(&chunk));
            if body.lines().any(|l| l.contains(id.as_str()) && l.contains("\"job.completed\"")) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(resumed, Ok(true), "a client resuming after {old_last} sees job.completed of {id}");
    drop(sse);
    let stream = js.get_stream(subjects::EVENTS_STREAM).await.unwrap();
    let events = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subjects::EVENTS_SUBJECTS.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = events.messages().await.unwrap();
    let seen = tokio::time::timeout(WAIT, async {
        while let Some(Ok(msg)) = messages.next().await {
            let event: Value = serde_json::from_slice(&msg.payload).unwrap();
            if event["job_id"] == id.as_str() && event["type"] == "job.completed" {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(seen, Ok(true), "job.completed of {id} in the recreated {}", subjects::EVENTS_STREAM);
    finish(stack, load, &pool, &js).await.stop().await;
}

#[tokio::test]
async fn a_deleted_logs_stream_is_recreated_and_log_lines_land_again() {
    let _serial = SERIAL.lock().await;
    let (stack, load, pool, js) = loaded_stack().await;
    assert!(js.delete_stream(subjects::LOGS_STREAM).await.unwrap().success);
    wait_stream(&js, subjects::LOGS_STREAM).await;
    let id = stack.submit(job(None)).await["job_id"].as_str().unwrap().to_owned();
    let job_id = fleet_schemas::JobId(Uuid::parse_str(&id).unwrap());
    let subject = subjects::job_logs(&default_tenant(), &job_id);
    wait_for("the new job's log line in the recreated stream", WAIT, || async {
        let stream = js.get_stream(subjects::LOGS_STREAM).await.ok()?;
        stream.get_last_raw_message_by_subject(&subject).await.ok().map(|_| ())
    })
    .await
    .unwrap();
    finish(stack, load, &pool, &js).await.stop().await;
}

/// No robot can beat while the bucket is gone. The gap must not take them offline: the bucket
/// is recreated, the robots' beats land in it, and the orchestrator's watcher sees them.
#[tokio::test]
async fn a_deleted_heartbeat_bucket_is_recreated_without_robots_going_offline() {
    let _serial = SERIAL.lock().await;
    let (stack, load, pool, js) = loaded_stack().await;
    let since = time::OffsetDateTime::now_utc();
    assert!(js.delete_key_value(subjects::ROBOTS_BUCKET).await.unwrap().success);
    wait_for("the heartbeat bucket to be recreated with both robots in it", WAIT, || async {
        let kv = js.get_key_value(subjects::ROBOTS_BUCKET).await.ok()?;
        let mut keys = kv.keys().await.ok()?.filter_map(|k| async move { k.ok() }).collect::<Vec<_>>().await;
        keys.sort();
        (keys == ["default.r1", "default.r2"]).then_some(())
    })
    .await
    .unwrap();
    // The watcher reads the new bucket: the robots' recorded heartbeats move past the deletion.
    wait_for("heartbeats after the deletion to be recorded", WAIT, || async {
        let (_, robots) = stack.get("/api/v1/metrics/robots").await;
        let fresh = robots.as_array()?.iter().filter(|r| {
            r["last_heartbeat"].as_str().and_then(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            }) > Some(since)
        });
        (fresh.count() == 2).then_some(())
    })
    .await
    .unwrap();
    let stack = finish(stack, load, &pool, &js).await;
    let offline: i64 =
        sqlx::query_scalar("SELECT count(*) FROM job_history WHERE kind = 'robot.disconnected'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(offline, 0, "a robot was declared offline because the bucket was missing");
    stack.stop().await;
}

/// The bucket comes back with every robot's desired state from PostgreSQL, and robots watch
/// their key in the new bucket: a command given afterwards is obeyed.
#[tokio::test]
async fn a_deleted_commands_bucket_is_recreated_refilled_and_watched() {
    let _serial = SERIAL.lock().await;
    let (stack, load, pool, js) = loaded_stack().await;
    // r2 gets a desired state in PostgreSQL (paused, then online again) before the deletion.
    for action in ["pause", "resume"] {
        let (status, answer) = stack.post(&format!("/api/v1/robots/r2/{action}"), &Value::Null).await;
        assert_eq!(status, 200, "{answer}");
    }
    let key = subjects::command_key(&default_tenant(), &RobotId::new("r2").unwrap());
    assert!(js.delete_key_value(subjects::COMMANDS_BUCKET).await.unwrap().success);
    wait_for("the commands bucket to be recreated and refilled", WAIT, || async {
        let kv = js.get_key_value(subjects::COMMANDS_BUCKET).await.ok()?;
        kv.get(&key).await.ok()?.map(|_| ())
    })
    .await
    .unwrap();
    let robot_state = |state: &'static str| {
        let stack = &stack;
        async move {
            wait_for(format!("r1 to report {state}"), WAIT, || async {
                (stack.get("/api/v1/metrics/robots/r1").await.1["state"] == state).then_some(())
            })
            .await
            .unwrap();
        }
    };
    let (status, answer) = stack.post("/api/v1/robots/r1/pause", &Value::Null).await;
    assert_eq!(status, 200, "{answer}");
    robot_state("paused").await;
    let (status, answer) = stack.post("/api/v1/robots/r1/resume", &Value::Null).await;
    assert_eq!(status, 200, "{answer}");
    robot_state("online").await;
    finish(stack, load, &pool, &js).await.stop().await;
}

/// The watchdog checks an offer by what the recorded sequence holds, not by whether it holds
/// anything: in a recreated stream (sequences from 1 again) an old job's sequence may name
/// another job's offer. Here job A's offer is gone and its recorded sequence names another
/// job's offer that stays in the stream (on a class no robot serves); A is recalled and offered
/// again rather than left queued for good.
#[tokio::test]
async fn the_watchdog_recalls_an_offer_whose_sequence_names_another_jobs_message() {
    let _serial = SERIAL.lock().await;
    let mut stack = Stack::start_with(|c| c.offer_check_after = Duration::from_secs(1)).await;
    let mut config = stack.robot_config("r1", &[]);
    config.max_jobs = 1;
    stack.start_robot(config);
    stack.wait_robots_online(1).await;
    let pool = stack.db.pool().await.unwrap();
    let js = jetstream::new(stack.nats.client().await.unwrap());
    // The only slot is busy, so the next job waits as an offer in the stream (prefetch).
    let mut busy = job(None);
    busy["workflow_json"]["steps"][1]["ms"] = json!(2000);
    let busy = stack.submit(busy).await["job_id"].as_str().unwrap().to_owned();
    wait_for("the slot to be taken", WAIT, || async {
        (stack.job(&busy).await["status"] == "running").then_some(())
    })
    .await
    .unwrap();
    let a = stack.submit(job(None)).await["job_id"].as_str().unwrap().to_owned();
    let a_id = Uuid::parse_str(&a).unwrap();
    let seq = wait_for("the offer's sequence to be recorded", WAIT, || async {
        sqlx::query_scalar::<_, Option<i64>>(
            "SELECT offer_seq FROM jobs WHERE job_id = $1 AND status = 'queued'",
        )
        .bind(a_id)
        .fetch_one(&pool)
        .await
        .ok()
        .flatten()
    })
    .await
    .unwrap();
    let stream = js.get_stream(subjects::JOBS_STREAM).await.unwrap();
    assert!(stream.delete_message(seq as u64).await.unwrap());
    let other = fleet_schemas::robot::Offer {
        v: fleet_schemas::robot::ROBOT_PROTOCOL_VERSION,
        job_id: fleet_schemas::JobId(Uuid::now_v7()),
        offer_no: 1,
    };
    let nobody = subjects::class_offers(&default_tenant(), &Class::parse(["nobody"]).unwrap());
    let ack = js.publish(nobody, fleet_schemas::codec::encode(&other).into()).await.unwrap().await.unwrap();
    sqlx::query("UPDATE jobs SET offer_seq = $2 WHERE job_id = $1")
        .bind(a_id)
        .bind(ack.sequence as i64)
        .execute(&pool)
        .await
        .unwrap();
    assert_each_ran_once(&pool, &[busy, a.clone()], &js).await;
    let recalled: i64 =
        sqlx::query_scalar("SELECT count(*) FROM job_history WHERE job_id = $1 AND kind = 'job.recalled'")
            .bind(a_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(recalled, 1, "job {a} was recalled by the watchdog");
    stack.stop().await;
}
