//! The orchestrator's robot protocol, driven by hand against a real nats-server and PostgreSQL:
//! a test plays the robot one message at a time, so each fencing rule of DESIGN.md is checked
//! exactly, independent of the robot agent.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use fleet_schemas::api::{
    ApiError, ApiRequest, ApiResult, Empty, Endpoint, GetById, JobStatus, JobView, Pong, SubmitJob, Submitted,
};
use fleet_schemas::codec::{decode, encode};
use fleet_schemas::event::Event;
use fleet_schemas::robot::{
    Ack, ClaimGrant, ClaimRequest, CompleteRequest, Heartbeat, Offer, RegisterGrant, RegisterRequest,
    RenewGrant, RenewRequest, RobotReply, RobotRunState, RunOutcome,
};
use fleet_schemas::subjects::{self, RobotVerb};
use fleet_schemas::{JobId, RequestId, RobotId, SessionId, TenantId};
use fleet_tests::{NatsServer, TestDb, wait_for};
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

fn tenant() -> TenantId {
    TenantId::new("acme").unwrap()
}

fn config(nats: &NatsServer, db: &TestDb) -> fleet_orchestrator::Config {
    fleet_orchestrator::Config {
        nats_url: nats.url(),
        database_url: fleet_orchestrator::config::Secret(db.url().to_owned()),
        // Fake robots beat once: keep them online for the whole test.
        heartbeat_interval: Duration::from_millis(500),
        heartbeat_timeout: Duration::from_secs(60),
        job_lease: Duration::from_secs(2),
        leader_lease: Duration::from_secs(1),
        sweep_interval: Duration::from_millis(100),
        offer_check_after: Duration::from_secs(2),
        db_pool_size: 4,
        nats_auth_dir: Some(nats.auth_dir()),
        ..Default::default()
    }
}

struct Fabric {
    nats: NatsServer,
    db: TestDb,
    client: async_nats::Client,
    shutdown: CancellationToken,
    orchestrator: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Fabric {
    async fn start() -> Fabric {
        fleet_tests::init_tracing();
        let nats = NatsServer::start().await.unwrap();
        let db = TestDb::create().await.unwrap();
        let shutdown = CancellationToken::new();
        let orchestrator = tokio::spawn(fleet_orchestrator::run(config(&nats, &db), shutdown.clone()));
        let client = nats.client().await.unwrap();
        let fabric = Fabric { nats, db, client, shutdown, orchestrator };
        wait_for("the orchestrator to lead", WAIT, || async {
            let pong: Pong = fabric.api(Endpoint::Ping, Empty {}).await.ok()?;
            pong.leader.then_some(())
        })
        .await
        .unwrap();
        fabric
    }

    async fn api<T: Serialize, R: DeserializeOwned>(&self, endpoint: Endpoint, body: T) -> ApiResult<R> {
        let req = ApiRequest {
            v: 1,
            actor: None,
            request_id: RequestId::new(),
            tenant: tenant(),
            deadline_unix_ms: (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64 + 5_000,
            body,
        };
        let msg = tokio::time::timeout(
            Duration::from_secs(6),
            self.client.request(endpoint.subject(), encode(&req).into()),
        )
        .await
        .map_err(|_| ApiError::Internal { message: "timeout".into() })?
        .map_err(|e| ApiError::Unavailable { message: e.to_string(), retry_after_s: 1 })?;
        decode::<ApiResult<R>>("reply", &msg.payload).unwrap()
    }

    async fn job(&self, id: JobId) -> JobView {
        self.api(Endpoint::GetJob, GetById { id }).await.unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.orchestrator).await.unwrap().unwrap().unwrap();
        drop(self.nats);
        self.db.drop_database().await.unwrap();
    }
}

/// A robot played by the test.
struct FakeRobot {
    id: RobotId,
    session: SessionId,
    client: async_nats::Client,
    grant: RegisterGrant,
}

impl FakeRobot {
    async fn register(fabric: &Fabric, id: &str, caps: &[&str]) -> FakeRobot {
        let id = RobotId::new(id).unwrap();
        let session = SessionId::new();
        let client = fabric.nats.client().await.unwrap();
        let req = RegisterRequest {
            v: 1,
            session_id: session,
            name: id.to_string(),
            hostname: "test".into(),
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            max_jobs: 1,
            version: "test".into(),
            environment: String::new(),
            tags: vec![],
            state_dir_id: "dir-1".into(),
        };
        let grant = match call::<_, RegisterGrant>(&client, &id, RobotVerb::Register, &req).await {
            RobotReply::Accepted(g) => g,
            other => panic!("register: {other:?}"),
        };
        let robot = FakeRobot { id, session, client, grant };
        robot.heartbeat(caps).await;
        robot
    }

    async fn heartbeat(&self, caps: &[&str]) {
        let hb = Heartbeat {
            v: 1,
            tenant: tenant(),
            robot_id: self.id.clone(),
            session_id: self.session,
            name: self.id.to_string(),
            hostname: "test".into(),
            state: RobotRunState::Online,
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            max_jobs: 1,
            running: vec![],
            cpu_percent: None,
            memory_mb: None,
            version: "test".into(),
            metrics: Default::default(),
            sent_at: OffsetDateTime::now_utc(),
        };
        let js = jetstream::new(self.client.clone());
        let publish = jetstream::message::PublishMessage::build()
            .ttl(Duration::from_millis(self.grant.heartbeat_ttl_ms))
            .payload(encode(&hb).into());
        js.send_publish(subjects::heartbeat_subject(&tenant(), &self.id), publish)
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn pull(&self) -> (Offer, jetstream::Message) {
        let js = jetstream::new(self.client.clone());
        let stream = js.get_stream(subjects::JOBS_STREAM).await.unwrap();
        let consumer: consumer::PullConsumer = stream.get_consumer(&self.grant.class_consumer).await.unwrap();
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(5))
            .group(subjects::PULL_GROUP)
            .priority(0)
            .messages()
            .await
            .unwrap();
        let msg = batch.next().await.expect("an offer").unwrap();
        (decode("offer", &msg.payload).unwrap(), msg)
    }

    async fn claim(&self, offer: &Offer) -> RobotReply<ClaimGrant> {
        let req =
            ClaimRequest { v: 1, session_id: self.session, job_id: offer.job_id, offer_no: offer.offer_no };
        call(&self.client, &self.id, RobotVerb::Claim, &req).await
    }

    async fn renew(&self, job_id: JobId, attempt: i32) -> RobotReply<RenewGrant> {
        let req = RenewRequest { v: 1, session_id: self.session, job_id, attempt };
        call(&self.client, &self.id, RobotVerb::Renew, &req).await
    }

    async fn complete(&self, job_id: JobId, attempt: i32) -> RobotReply<Ack> {
        let req = CompleteRequest {
            v: 1,
            session_id: self.session,
            job_id,
            attempt,
            outcome: RunOutcome::Completed,
            output: json!({"done": attempt}),
            error: None,
            failed_step: None,
        };
        call(&self.client, &self.id, RobotVerb::Complete, &req).await
    }
}

async fn call<Q: Serialize, A: DeserializeOwned>(
    client: &async_nats::Client,
    robot: &RobotId,
    verb: RobotVerb,
    req: &Q,
) -> RobotReply<A> {
    let subject = subjects::robot_request(&tenant(), robot, verb);
    let msg = tokio::time::timeout(Duration::from_secs(6), client.request(subject, encode(req).into()))
        .await
        .expect("robot request answered in time")
        .expect("robot request");
    decode("robot reply", &msg.payload).unwrap()
}

fn shell_job() -> SubmitJob {
    SubmitJob {
        workflow_name: "Invoice sync".into(),
        workflow: json!({"steps": [{"id": "hi", "kind": "shell", "argv": ["echo", "hi"]}]}),
        priority: 10,
        trigger_type: "manual".into(),
        execution_mode: "lan".into(),
        variables: Default::default(),
        required_capabilities: vec![],
        target_robot_id: None,
        timeout_s: None,
        metadata: Default::default(),
        idempotency_key: None,
    }
}

/// Events of one job from `FLEET_EVENTS`, as JSON, in stream order.
async fn job_events(client: &async_nats::Client, job: JobId, until_kind: &str) -> Vec<Event> {
    let js = jetstream::new(client.clone());
    wait_for(format!("event {until_kind} of job {job}"), WAIT, || async {
        let stream = js.get_stream(subjects::EVENTS_STREAM).await.ok()?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: "fleet.events.acme.job.>".into(),
                ..Default::default()
            })
            .await
            .ok()?;
        let info = stream.get_info().await.ok()?;
        let mut messages = consumer.messages().await.ok()?;
        let mut events = Vec::new();
        let mut seen = 0;
        while seen < info.state.messages {
            let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(2), messages.next()).await
            else {
                break;
            };
            seen += 1;
            let event: Event = serde_json::from_slice(&msg.payload).expect("events are JSON");
            if event.job_id.as_deref() == Some(job.to_string().as_str()) {
                events.push(event);
            }
        }
        events.iter().any(|e| e.kind == until_kind).then_some(events)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn claim_complete_and_fencing() {
    let fabric = Fabric::start().await;

    // No robot yet: the job waits, and says why.
    let submitted: Submitted = fabric.api(Endpoint::SubmitJob, shell_job()).await.unwrap();
    assert_eq!(submitted.status, JobStatus::Pending);
    assert_eq!(submitted.workflow_id, "invoice-sync");
    assert_eq!(
        submitted.waiting_reason.as_deref(),
        Some("no online robot of tenant acme has capabilities shell")
    );

    // A robot that cannot run shell steps does not get it.
    let _browser = FakeRobot::register(&fabric, "b1", &["browser"]).await;
    let robot = FakeRobot::register(&fabric, "r1", &["shell"]).await;
    let job = submitted.job_id;
    wait_for("the job to be offered", WAIT, || async {
        (fabric.job(job).await.status == JobStatus::Queued).then_some(())
    })
    .await
    .unwrap();

    let (offer, msg) = robot.pull().await;
    assert_eq!(offer.job_id, job);
    assert_eq!(offer.offer_no, 1);
    let grant = match robot.claim(&offer).await {
        RobotReply::Accepted(g) => g,
        other => panic!("claim: {other:?}"),
    };
    assert_eq!(grant.attempt, 1);
    assert_eq!(grant.workflow["steps"][0]["id"], "hi");
    msg.double_ack().await.unwrap();

    // A repeated claim by the same session is answered the same; another session is refused.
    assert!(matches!(robot.claim(&offer).await, RobotReply::Accepted(g) if g.attempt == 1));
    let intruder =
        FakeRobot { session: SessionId::new(), ..FakeRobot::register(&fabric, "r2", &["shell"]).await };
    assert!(matches!(intruder.claim(&offer).await, RobotReply::Refused { .. }));

    assert!(matches!(robot.renew(job, 1).await, RobotReply::Accepted(RenewGrant { cancel: false, .. })));
    assert!(matches!(robot.renew(job, 2).await, RobotReply::Refused { .. }));
    assert!(matches!(robot.complete(job, 1).await, RobotReply::Accepted(_)));
    // Idempotent for the same attempt; a superseded attempt is refused.
    assert!(matches!(robot.complete(job, 1).await, RobotReply::Accepted(_)));
    assert!(matches!(robot.complete(job, 2).await, RobotReply::Refused { .. }));

    let view = fabric.job(job).await;
    assert_eq!(view.status, JobStatus::Completed);
    assert_eq!(view.robot_id.as_deref(), Some("r1"));
    assert_eq!(view.output, Some(json!({"done": 1})));
    assert!(view.duration_ms.is_some());

    let events = job_events(&fabric.client, job, "job.completed").await;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["job.submitted", "job.assigned", "job.started", "job.completed"]);
    let seqs: Vec<i32> = events.iter().map(|e| e.seq.unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4], "one event per state change, in order, no gaps");
    fabric.stop().await;
}

#[tokio::test]
async fn lapsed_lease_reoffers_and_fences_the_old_attempt() {
    let fabric = Fabric::start().await;
    let robot = FakeRobot::register(&fabric, "r1", &["shell"]).await;
    let submitted: Submitted = fabric.api(Endpoint::SubmitJob, shell_job()).await.unwrap();
    assert_eq!(submitted.status, JobStatus::Queued);
    let (offer, msg) = robot.pull().await;
    assert!(matches!(robot.claim(&offer).await, RobotReply::Accepted(g) if g.attempt == 1));
    msg.double_ack().await.unwrap();

    // The robot goes quiet: no renewal. After the lease, the job is offered again (offer 2).
    let job = submitted.job_id;
    let view = wait_for("the lapsed job to be offered again", WAIT, || async {
        let v = fabric.job(job).await;
        (v.status == JobStatus::Queued).then_some(v)
    })
    .await
    .unwrap();
    assert_eq!(view.attempt, 1);
    let (offer2, msg2) = robot.pull().await;
    assert_eq!(offer2.offer_no, 2);
    assert!(matches!(robot.claim(&offer2).await, RobotReply::Accepted(g) if g.attempt == 2));
    msg2.double_ack().await.unwrap();
    // The first attempt's late report is refused; the second's is recorded.
    assert!(matches!(robot.renew(job, 1).await, RobotReply::Refused { .. }));
    assert!(matches!(robot.complete(job, 1).await, RobotReply::Refused { .. }));
    assert!(matches!(robot.complete(job, 2).await, RobotReply::Accepted(_)));
    let view = fabric.job(job).await;
    assert_eq!(view.status, JobStatus::Completed);
    assert_eq!(view.output, Some(json!({"done": 2})));
    let completions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM job_history WHERE job_id = $1 AND kind = 'job.completed'")
            .bind(job.0)
            .fetch_one(&fabric.db.pool().await.unwrap())
            .await
            .unwrap();
    assert_eq!(completions, 1, "recorded complete exactly once");
    fabric.stop().await;
}

/// Requests of one kind share a statement: a value PostgreSQL refuses (here a NUL character,
/// which the API refuses before it gets this far) fails its own request only, never the others
/// batched with it. Straight on the store, past the API's validation.
#[tokio::test]
async fn a_value_the_database_refuses_fails_only_its_own_request_in_a_batch() {
    use fleet_orchestrator::leader::Leadership;
    use fleet_orchestrator::store::{NewJob, Placement, Store};
    let db = TestDb::create().await.unwrap();
    let pool = db.pool().await.unwrap();
    sqlx::migrate!("../migrations").run(&pool).await.unwrap();
    let leadership = Leadership::new();
    let shutdown = CancellationToken::new();
    let lease = tokio::spawn(fleet_orchestrator::leader::run(
        leadership.clone(),
        pool.clone(),
        Duration::from_secs(10),
        shutdown.clone(),
    ));
    wait_for("the lease", WAIT, || async { leadership.is_leader().then_some(()) }).await.unwrap();
    let store = Store::new(pool.clone(), pool.clone(), leadership.clone());
    let job = |name: &str| NewJob {
        job_id: JobId::new(),
        tenant: tenant(),
        workflow_id: "w".into(),
        workflow_name: name.into(),
        format: fleet_schemas::workflow::WorkflowFormat::Fleet,
        workflow: json!({"steps": []}),
        variables: Default::default(),
        metadata: Default::default(),
        requires: vec![],
        priority: 10,
        trigger_type: "manual".into(),
        execution_mode: "lan".into(),
        target_robot_id: None,
        timeout_s: None,
        max_attempts: 3,
        request_id: RequestId::new(),
        idempotency_key: None,
        deadline_unix_ms: None,
        actor: "test".to_owned(),
    };
    let jobs: Vec<NewJob> = (0..40).map(|i| job(if i == 20 { "bad\u{0}name" } else { "good" })).collect();
    let placement = Placement::Pending { reason: "no robot".into() };
    let answers = futures::future::join_all(jobs.iter().map(|j| store.insert_job(j, &placement))).await;
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(answer.is_ok(), i != 20, "request {i}: {answer:?}");
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&pool).await.unwrap();
    assert_eq!(stored, 39);
    shutdown.cancel();
    lease.await.unwrap();
}

/// Submissions share one statement: a value PostgreSQL refuses (a NUL character, which JSON
/// allows and a text column does not) fails its own submission only, never the others that were
/// batched with it.
#[tokio::test]
async fn a_submission_the_database_refuses_fails_alone() {
    let fabric = Fabric::start().await;
    let mut poisoned = shell_job();
    poisoned.workflow_name = "bad\u{0}name".into();
    let jobs: Vec<SubmitJob> =
        (0..40).map(|i| if i == 20 { poisoned.clone() } else { shell_job() }).collect();
    let answers = futures::future::join_all(
        jobs.into_iter().map(|job| fabric.api::<_, Submitted>(Endpoint::SubmitJob, job)),
    )
    .await;
    for (i, answer) in answers.iter().enumerate() {
        if i == 20 {
            assert!(
                matches!(answer, Err(ApiError::Invalid { field, .. }) if field == "workflow_name"),
                "the poisoned submission is refused naming its field: {answer:?}"
            );
        } else {
            let submitted = answer.as_ref().unwrap_or_else(|e| panic!("submission {i} failed: {e:?}"));
            assert_eq!(fabric.job(submitted.job_id).await.workflow_name, "Invoice sync");
        }
    }
    fabric.stop().await;
}

#[tokio::test]
async fn bad_submissions_name_the_field() {
    let fabric = Fabric::start().await;
    let mut job = shell_job();
    job.priority = 99;
    let err = fabric.api::<_, Submitted>(Endpoint::SubmitJob, job).await.unwrap_err();
    assert!(matches!(err, ApiError::Invalid { ref field, .. } if field == "priority"), "{err:?}");
    let mut job = shell_job();
    job.target_robot_id = Some(RobotId::new("ghost").unwrap());
    let err = fabric.api::<_, Submitted>(Endpoint::SubmitJob, job).await.unwrap_err();
    assert!(matches!(err, ApiError::Invalid { ref field, .. } if field == "target_robot_id"), "{err:?}");
    let err = fabric.api::<_, JobView>(Endpoint::GetJob, GetById { id: JobId::new() }).await.unwrap_err();
    assert!(matches!(err, ApiError::NotFound { .. }));
    // A garbage payload is an error naming the payload, never a crash.
    let reply = fabric.client.request(Endpoint::SubmitJob.subject(), "not msgpack".into()).await.unwrap();
    let result: ApiResult<Submitted> = decode("reply", &reply.payload).unwrap();
    assert!(matches!(result, Err(ApiError::Invalid { ref field, .. }) if field == "payload"));
    fabric.stop().await;
}

#[tokio::test]
async fn a_second_orchestrator_stands_by_and_takes_over_when_the_leader_dies() {
    let fabric = Fabric::start().await;
    let standby_token = CancellationToken::new();
    let standby =
        tokio::spawn(fleet_orchestrator::run(config(&fabric.nats, &fabric.db), standby_token.clone()));
    let pool = fabric.db.pool().await.unwrap();
    let lease = || async {
        sqlx::query_as::<_, (Option<uuid::Uuid>, i64)>("SELECT holder, epoch FROM leader_lease")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    // The standby does not take the lease while the leader renews it.
    let (holder, epoch) = lease().await;
    let robot = FakeRobot::register(&fabric, "r1", &["shell"]).await;
    let first: Submitted = fabric.api(Endpoint::SubmitJob, shell_job()).await.unwrap();
    assert_eq!(lease().await, (holder, epoch), "one leader, no flapping");

    // The leader dies without a word; the standby leads within a few lease periods.
    fabric.orchestrator.abort();
    let started = std::time::Instant::now();
    wait_for("the standby to lead", WAIT, || async {
        let (h, e) = lease().await;
        (h != holder && e > epoch).then_some(())
    })
    .await
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(4), "takeover took {:?}", started.elapsed());
    // The new leader serves the robot and the API: the job queued by the old one still runs.
    let submitted: Submitted = wait_for("the new leader to accept a submit", WAIT, || async {
        fabric.api(Endpoint::SubmitJob, shell_job()).await.ok()
    })
    .await
    .unwrap();
    for job in [first.job_id, submitted.job_id] {
        let (offer, msg) = robot.pull().await;
        let grant = match robot.claim(&offer).await {
            RobotReply::Accepted(g) => g,
            other => panic!("claim: {other:?}"),
        };
        msg.double_ack().await.unwrap();
        assert!(matches!(robot.complete(grant.job_id, grant.attempt).await, RobotReply::Accepted(_)));
        let _ = job;
    }
    for job in [first.job_id, submitted.job_id] {
        assert_eq!(fabric.job(job).await.status, JobStatus::Completed);
    }
    standby_token.cancel();
    tokio::time::timeout(WAIT, standby).await.unwrap().unwrap().unwrap();
    drop(fabric.nats);
    fabric.db.drop_database().await.unwrap();
}

#[tokio::test]
async fn a_deposed_leader_cannot_write() {
    let fabric = Fabric::start().await;
    let pool = fabric.db.pool().await.unwrap();
    // Someone else takes the lease (as a standby would after a pause of the leader).
    sqlx::query("UPDATE leader_lease SET holder = gen_random_uuid(), epoch = epoch + 1, expires_at = now() + interval '1 hour'")
        .execute(&pool)
        .await
        .unwrap();
    // The old leader still believes it leads until its next renewal; whatever it tries to write
    // in that window matches no row, and the client is told to retry (nothing committed).
    let result = fabric.api::<_, Submitted>(Endpoint::SubmitJob, shell_job()).await;
    match result {
        Err(ApiError::Unavailable { .. }) => {}
        Err(ApiError::Internal { message }) if message == "timeout" => {}
        other => panic!("a deposed leader's submit must not succeed: {other:?}"),
    }
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&pool).await.unwrap();
    assert_eq!(jobs, 0, "nothing written by the deposed leader");
    fabric.shutdown.cancel();
    let _ = tokio::time::timeout(WAIT, fabric.orchestrator).await;
    drop(fabric.nats);
    fabric.db.drop_database().await.unwrap();
}

#[tokio::test]
async fn a_vanished_offer_is_noticed_and_offered_again() {
    let fabric = Fabric::start().await;
    let robot = FakeRobot::register(&fabric, "r1", &["shell"]).await;
    let submitted: Submitted = fabric.api(Endpoint::SubmitJob, shell_job()).await.unwrap();
    assert_eq!(submitted.status, JobStatus::Queued);
    // The offer message disappears (terminated by mistake, purged, lost with a consumer).
    let pool = fabric.db.pool().await.unwrap();
    let seq: i64 = wait_for("the offer's sequence to be recorded", WAIT, || async {
        sqlx::query_scalar::<_, Option<i64>>("SELECT offer_seq FROM jobs WHERE job_id = $1")
            .bind(submitted.job_id.0)
            .fetch_one(&pool)
            .await
            .ok()
            .flatten()
    })
    .await
    .unwrap();
    let js = jetstream::new(fabric.client.clone());
    let stream = js.get_stream(subjects::JOBS_STREAM).await.unwrap();
    assert!(stream.delete_message(seq as u64).await.unwrap());
    // The watchdog notices (after `offer_check_after`) and offers the job again as offer 2.
    let (offer, msg) = robot.pull().await;
    assert_eq!((offer.job_id, offer.offer_no), (submitted.job_id, 2));
    assert!(matches!(robot.claim(&offer).await, RobotReply::Accepted(_)));
    msg.double_ack().await.unwrap();
    let events = job_events(&fabric.client, submitted.job_id, "job.started").await;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    // Up to the start: this fake robot never renews, so on a slow machine its 2 s lease may
    // already have lapsed (`job.requeued`) by the time the events are read.
    let started = kinds.iter().position(|k| *k == "job.started").expect("started") + 1;
    assert_eq!(
        kinds[..started],
        ["job.submitted", "job.assigned", "job.recalled", "job.assigned", "job.started"],
        "{kinds:?}"
    );
    fabric.stop().await;
}

#[tokio::test]
async fn a_bad_database_url_is_a_clear_error_not_a_retry_loop() {
    let nats = NatsServer::start().await.unwrap();
    let config = fleet_orchestrator::Config {
        nats_url: nats.url(),
        database_url: fleet_orchestrator::config::Secret(
            "postgres://no-such-role@127.0.0.1:5432/fleet".into(),
        ),
        ..Default::default()
    };
    let result = tokio::time::timeout(WAIT, fleet_orchestrator::run(config, CancellationToken::new()))
        .await
        .expect("fails at once instead of retrying");
    let message = format!("{:#}", result.unwrap_err());
    assert!(message.contains("DATABASE_URL") && message.contains("no-such-role"), "{message}");
}

#[tokio::test]
async fn commands_set_the_desired_state_robots_watch() {
    use fleet_schemas::api::{CommandResult, CommandTarget, RobotCommand, RobotCommandRequest};
    use fleet_schemas::robot::{DesiredState, RobotMode};

    let fabric = Fabric::start().await;
    let r1 = FakeRobot::register(&fabric, "r1", &["browser"]).await;
    let _r2 = FakeRobot::register(&fabric, "r2", &["desktop"]).await;
    let js = jetstream::new(fabric.client.clone());
    let kv = js.get_key_value(subjects::COMMANDS_BUCKET).await.unwrap();
    let desired = |robot: &'static str| {
        let kv = kv.clone();
        async move {
            let value = kv.get(format!("acme.{robot}")).await.unwrap()?;
            Some(decode::<DesiredState>("desired state", &value).unwrap())
        }
    };
    // Registration publishes the recorded desired state (online).
    assert_eq!(desired("r1").await.map(|d| d.mode), Some(RobotMode::Online));

    let pause = RobotCommandRequest {
        target: CommandTarget::Robot { robot_id: RobotId::new("r1").unwrap() },
        command: RobotCommand::Pause,
    };
    let result: CommandResult = fabric.api(Endpoint::RobotCommand, pause).await.unwrap();
    assert_eq!(result.robots, ["r1"]);
    assert_eq!(desired("r1").await.map(|d| d.mode), Some(RobotMode::Paused));
    assert_eq!(desired("r2").await.map(|d| d.mode), Some(RobotMode::Online));

    // Bulk, by capability: only the browser robot is told to stop, for its current session.
    let stop = RobotCommandRequest {
        target: CommandTarget::Filter { status: None, capabilities: vec!["browser".into()] },
        command: RobotCommand::Stop { force: true },
    };
    let result: CommandResult = fabric.api(Endpoint::RobotCommand, stop).await.unwrap();
    assert_eq!(result.robots, ["r1"]);
    let d = desired("r1").await.unwrap();
    let order = d.stop.expect("a stop order");
    assert_eq!((order.session_id, order.force, order.restart), (r1.session, true, false));
    assert_eq!(d.mode, RobotMode::Paused, "stopping keeps the mode");

    // Unknown robots are 404; a command to another tenant's robot is the same.
    let ghost = RobotCommandRequest {
        target: CommandTarget::Robot { robot_id: RobotId::new("ghost").unwrap() },
        command: RobotCommand::Resume,
    };
    let err = fabric.api::<_, CommandResult>(Endpoint::RobotCommand, ghost).await.unwrap_err();
    assert!(matches!(err, ApiError::NotFound { .. }), "{err:?}");
    let pool = fabric.db.pool().await.unwrap();
    let commands: i64 = sqlx::query_scalar("SELECT count(*) FROM job_history WHERE kind = 'robot.command'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(commands, 2, "one history row per robot told");
    fabric.stop().await;
}

#[tokio::test]
async fn api_keys_verify_until_revoked_or_rotated() {
    use fleet_schemas::api::{
        CreateKey, CreatedKey, KeyAction, KeyIdentity, KeyList, KeyView, ListKeys, VerifyKey,
    };
    use fleet_schemas::keys::{Role, parse_key, secret_hash};

    let fabric = Fabric::start().await;
    let own_rate = fleet_schemas::keys::Rate::parse("1000/min").unwrap();
    let create = CreateKey {
        name: "ci".into(),
        role: Role::Operator,
        description: None,
        expires_at: None,
        robot_id: None,
        rate_limit: Some(own_rate),
        capabilities: None,
    };
    let created: CreatedKey = fabric.api(Endpoint::CreateKey, create).await.unwrap();
    assert_eq!(created.key.rate_limit, Some(own_rate));
    assert!(created.api_key.starts_with("crpa_") && created.api_key.len() >= 40);
    let verify = |key: &str| {
        let parsed = parse_key(key).unwrap();
        VerifyKey { key_id: parsed.key_id, secret_sha256: secret_hash(&parsed.secret) }
    };
    let who: KeyIdentity = fabric.api(Endpoint::VerifyKey, verify(&created.api_key)).await.unwrap();
    assert_eq!((who.tenant, who.role, who.rate_limit), (tenant(), Role::Operator, Some(own_rate)));
    // A wrong secret for a real key id is refused like an unknown key.
    let mut wrong = verify(&created.api_key);
    wrong.secret_sha256 = secret_hash("guess");
    assert!(matches!(
        fabric.api::<_, KeyIdentity>(Endpoint::VerifyKey, wrong).await,
        Err(ApiError::NotFound { .. })
    ));
    // The database holds only the hash.
    let pool = fabric.db.pool().await.unwrap();
    let stored: String =
        sqlx::query_scalar("SELECT secret_sha256 FROM api_keys").fetch_one(&pool).await.unwrap();
    assert!(!created.api_key.contains(&stored));

    // Rotation: the new secret works, the old one stops.
    let rotated: CreatedKey = fabric
        .api(Endpoint::RotateKey, KeyAction { id: created.key.id.clone(), reason: None })
        .await
        .unwrap();
    let who: KeyIdentity = fabric.api(Endpoint::VerifyKey, verify(&rotated.api_key)).await.unwrap();
    assert_eq!(who.rate_limit, Some(own_rate), "a rotated key keeps its own rate limit");
    assert!(fabric.api::<_, KeyIdentity>(Endpoint::VerifyKey, verify(&created.api_key)).await.is_err());
    // Revocation: refused from then on, listed as revoked.
    let revoked: KeyView = fabric
        .api(Endpoint::RevokeKey, KeyAction { id: created.key.id.clone(), reason: Some("leaked".into()) })
        .await
        .unwrap();
    assert_eq!(revoked.status, "revoked");
    assert!(fabric.api::<_, KeyIdentity>(Endpoint::VerifyKey, verify(&rotated.api_key)).await.is_err());
    let list: KeyList = fabric
        .api(
            Endpoint::ListKeys,
            ListKeys { robot_id: None, status: None, limit: 50, offset: 0, robot_keys: false },
        )
        .await
        .unwrap();
    assert_eq!((list.total, list.keys[0].status.as_str()), (1, "revoked"));
    fabric.stop().await;
}
