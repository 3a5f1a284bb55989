//! The robot against a real nats-server and a fake orchestrator that answers the robot protocol
//! with scripted replies. No PostgreSQL, no real orchestrator: these tests pin down the robot's
//! side of the contract (claim before ack, term on refusal, no report after a refused renewal,
//! heartbeats with a TTL, clean shutdown).
//!
//! They need nats-server 2.11+ (`FLEET_NATS_SERVER`, else the one `scripts/install-nats` puts in
//! `.tools/`), and fail with a message saying so without one: see `fleet_testkit::NatsServer`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use fleet_robot::RobotConfig;
use fleet_schemas::codec;
use fleet_schemas::robot::*;
use fleet_schemas::subjects::{self, RobotVerb};
use fleet_schemas::workflow::WorkflowFormat;
use fleet_schemas::{Class, JobId, RobotId, TenantId};
use fleet_testkit::NatsServer;

const WAIT: Duration = Duration::from_secs(20);

fn tenant() -> TenantId {
    TenantId::new("acme").unwrap()
}

/// What the orchestrator owns on JetStream: the offer stream, the robot's consumers, the bucket.
async fn setup_jetstream(js: &jetstream::Context, robot: &RobotId, class: &Class) {
    js.create_stream(stream::Config {
        name: subjects::JOBS_STREAM.into(),
        subjects: vec![subjects::JOBS_SUBJECTS.into()],
        retention: stream::RetentionPolicy::WorkQueue,
        ..Default::default()
    })
    .await
    .unwrap();
    let s = js.get_stream(subjects::JOBS_STREAM).await.unwrap();
    for (name, filter) in [
        (subjects::class_consumer(&tenant(), class), subjects::class_offers(&tenant(), class)),
        (subjects::robot_consumer(&tenant(), robot), subjects::robot_offers(&tenant(), robot)),
    ] {
        s.create_consumer(consumer::pull::Config {
            durable_name: Some(name),
            filter_subject: filter,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_waiting: 4096,
            priority_policy: consumer::PriorityPolicy::Prioritized,
            priority_groups: vec![subjects::PULL_GROUP.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    js.create_key_value(kv::Config {
        bucket: subjects::ROBOTS_BUCKET.into(),
        limit_markers: Some(Duration::from_secs(1)),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// A request the fake orchestrator received.
#[derive(Debug, Clone)]
enum Seen {
    Register(RegisterRequest),
    Claim(ClaimRequest),
    Renew(RenewRequest),
    Complete(CompleteRequest),
    Reject(RejectRequest),
    Release(ReleaseRequest),
    Progress(ProgressReport),
}

/// How the fake answers.
#[derive(Clone)]
struct Script {
    claim: Arc<Mutex<RobotReply<ClaimGrant>>>,
    renew: Arc<Mutex<RobotReply<RenewGrant>>>,
}

fn grant_for(job_id: JobId, workflow: Value) -> ClaimGrant {
    ClaimGrant {
        job_id,
        attempt: 1,
        lease_ms: 600,
        format: WorkflowFormat::Fleet,
        workflow,
        variables: json!({"customer": "ACME"}).as_object().cloned().unwrap_or_default(),
        timeout_s: None,
        workflow_name: "test".into(),
    }
}

async fn fake_orchestrator(
    client: async_nats::Client,
    robot: RobotId,
    class: Class,
    script: Script,
) -> mpsc::UnboundedReceiver<Seen> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut sub = client.subscribe(subjects::ROBOT_REQUESTS).await.unwrap();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Some((_, _, verb)) = subjects::parse_robot_request(&msg.subject) else { continue };
            let p = &msg.payload;
            let (seen, reply): (Seen, Vec<u8>) = match verb {
                RobotVerb::Register => (
                    Seen::Register(codec::decode("register", p).unwrap()),
                    codec::encode(&RobotReply::Accepted(RegisterGrant {
                        heartbeat_interval_ms: 500,
                        heartbeat_ttl_ms: 3000,
                        lease_ms: 600,
                        class_consumer: subjects::class_consumer(&tenant(), &class),
                        robot_consumer: subjects::robot_consumer(&tenant(), &robot),
                    })),
                ),
                RobotVerb::Claim => {
                    let req: ClaimRequest = codec::decode("claim", p).unwrap();
                    let mut reply = script.claim.lock().unwrap().clone();
                    if let RobotReply::Accepted(g) = &mut reply {
                        g.job_id = req.job_id;
                    }
                    (Seen::Claim(req), codec::encode(&reply))
                }
                RobotVerb::Renew => (
                    Seen::Renew(codec::decode("renew", p).unwrap()),
                    codec::encode(&*script.renew.lock().unwrap()),
                ),
                RobotVerb::Complete => (
                    Seen::Complete(codec::decode("complete", p).unwrap()),
                    codec::encode(&RobotReply::Accepted(Ack {})),
                ),
                RobotVerb::Reject => (
                    Seen::Reject(codec::decode("reject", p).unwrap()),
                    codec::encode(&RobotReply::Accepted(Ack {})),
                ),
                RobotVerb::Release => (
                    Seen::Release(codec::decode("release", p).unwrap()),
                    codec::encode(&RobotReply::Accepted(Ack {})),
                ),
                RobotVerb::Progress => (Seen::Progress(codec::decode("progress", p).unwrap()), Vec::new()),
            };
            if let Some(reply_to) = msg.reply {
                client.publish(reply_to, reply.into()).await.unwrap();
            }
            let _ = tx.send(seen);
        }
    });
    rx
}

struct Harness {
    _server: NatsServer,
    client: async_nats::Client,
    js: jetstream::Context,
    seen: mpsc::UnboundedReceiver<Seen>,
    script: Script,
    shutdown: CancellationToken,
    robot: tokio::task::JoinHandle<anyhow::Result<()>>,
    robot_id: RobotId,
    class: Class,
    _state: tempfile::TempDir,
}

async fn start(claim: RobotReply<ClaimGrant>) -> Harness {
    let server = NatsServer::start().await.expect("nats-server starts");
    let client = server.client().await.unwrap();
    let js = jetstream::new(client.clone());
    let robot_id = RobotId::new("r7").unwrap();
    let class = Class::parse(["shell"]).unwrap();
    setup_jetstream(&js, &robot_id, &class).await;
    let script = Script {
        claim: Arc::new(Mutex::new(claim)),
        renew: Arc::new(Mutex::new(RobotReply::Accepted(RenewGrant { lease_ms: 600, cancel: false }))),
    };
    let seen = fake_orchestrator(client.clone(), robot_id.clone(), class.clone(), script.clone()).await;
    let state = tempfile::tempdir().unwrap();
    let mut config = RobotConfig::new(tenant());
    config.nats_url = server.url();
    config.id = Some(robot_id.clone());
    config.state_dir = state.path().to_owned();
    config.shutdown_grace = Duration::from_secs(1);
    let shutdown = CancellationToken::new();
    let robot = tokio::spawn(fleet_robot::run(config, shutdown.clone()));
    Harness { _server: server, client, js, seen, script, shutdown, robot, robot_id, class, _state: state }
}

impl Harness {
    async fn offer(&self, job_id: JobId) {
        let offer = Offer { v: 1, job_id, offer_no: 1 };
        let subject = subjects::class_offers(&tenant(), &self.class);
        self.js.publish(subject, codec::encode(&offer).into()).await.unwrap().await.unwrap();
    }

    /// The next request matching `pick`, skipping others.
    async fn next<T>(&mut self, what: &str, mut pick: impl FnMut(Seen) -> Option<T>) -> T {
        let seen = &mut self.seen;
        let found = async {
            while let Some(s) = seen.recv().await {
                if let Some(t) = pick(s) {
                    return t;
                }
            }
            panic!("fake orchestrator stopped");
        };
        tokio::time::timeout(WAIT, found).await.unwrap_or_else(|_| panic!("no {what} in time"))
    }

    async fn pending_offers(&self) -> (u64, usize) {
        let s = self.js.get_stream(subjects::JOBS_STREAM).await.unwrap();
        let mut c: consumer::PullConsumer =
            s.get_consumer(&subjects::class_consumer(&tenant(), &self.class)).await.unwrap();
        let info = c.info().await.unwrap();
        (info.num_pending, info.num_ack_pending)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(WAIT, self.robot).await.expect("robot did not shut down").unwrap();
        result.expect("clean shutdown");
    }
}

#[tokio::test]
async fn claims_acks_runs_and_completes() {
    let workflow = json!({"steps": [
        {"id": "hello", "kind": "log", "message": "hi {{customer}}"},
        {"id": "echo", "kind": "shell", "argv": ["sh", "-c", "echo out-{{ customer }}"]}
    ]});
    let mut h = start(RobotReply::Accepted(grant_for(JobId::new(), workflow))).await;
    let reg = h.next("register", |s| if let Seen::Register(r) = s { Some(r) } else { None }).await;
    assert_eq!(reg.capabilities, ["shell"]);
    assert!(!reg.state_dir_id.is_empty());

    // The heartbeat lands in the bucket with a TTL.
    let kv = h.js.get_key_value(subjects::ROBOTS_BUCKET).await.unwrap();
    let key = subjects::heartbeat_key(&tenant(), &h.robot_id);
    let beat = async {
        loop {
            if let Some(v) = kv.get(&key).await.unwrap() {
                return codec::decode::<Heartbeat>("heartbeat", &v).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let hb = tokio::time::timeout(WAIT, beat).await.expect("no heartbeat");
    assert_eq!(hb.session_id, reg.session_id);
    assert_eq!(hb.state, RobotRunState::Online);

    let mut logs = h.client.subscribe("fleet.logs.acme.>").await.unwrap();
    h.client.flush().await.unwrap();
    let job_id = JobId::new();
    h.offer(job_id).await;
    let claim = h.next("claim", |s| if let Seen::Claim(c) = s { Some(c) } else { None }).await;
    assert_eq!((claim.job_id, claim.offer_no), (job_id, 1));
    let mut progress = Vec::new();
    let done = h
        .next("complete", |s| match s {
            Seen::Complete(c) => Some(c),
            Seen::Progress(p) => {
                progress.push(p);
                None
            }
            _ => None,
        })
        .await;
    assert_eq!(
        progress.last().map(|p| p.progress),
        Some(100),
        "the last progress is always sent: {progress:?}"
    );
    assert_eq!(done.outcome, RunOutcome::Completed, "{done:?}");
    assert_eq!(done.attempt, 1);
    assert_eq!(done.output["steps"]["echo"]["stdout"], json!("out-ACME\n"));
    assert_eq!(h.pending_offers().await, (0, 0), "the claimed offer was acked");

    // Log lines went to the job's log subject as JSON.
    let hello = async {
        while let Some(m) = logs.next().await {
            let line: LogLine = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(m.subject.as_str(), subjects::job_logs(&tenant(), &job_id));
            if line.line == "hi ACME" {
                return line;
            }
        }
        panic!("log subscription ended");
    };
    let line = tokio::time::timeout(WAIT, hello).await.expect("no log line");
    assert_eq!((line.step.as_deref(), line.stream.as_str()), (Some("hello"), "fleet"));
    h.stop().await;
}

#[tokio::test]
async fn refused_claim_terminates_the_offer() {
    let mut h = start(RobotReply::Refused { reason: "already claimed".into() }).await;
    h.next("register", |s| if let Seen::Register(r) = s { Some(r) } else { None }).await;
    h.offer(JobId::new()).await;
    h.next("claim", |s| if let Seen::Claim(c) = s { Some(c) } else { None }).await;
    let settled = async {
        loop {
            if h.pending_offers().await == (0, 0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(WAIT, settled).await.expect("the refused offer was not terminated");
    h.stop().await;
}

#[tokio::test]
async fn refused_renewal_stops_the_job_without_a_report() {
    let workflow = json!({"steps": [{"id": "nap", "kind": "sleep", "ms": 60000}]});
    let mut h = start(RobotReply::Accepted(grant_for(JobId::new(), workflow))).await;
    h.next("register", |s| if let Seen::Register(r) = s { Some(r) } else { None }).await;
    *h.script.renew.lock().unwrap() = RobotReply::Refused { reason: "superseded".into() };
    let job_id = JobId::new();
    h.offer(job_id).await;
    h.next("renew", |s| if let Seen::Renew(r) = s { Some(r) } else { None }).await;
    // The slot comes free without any report: the robot pulls (and claims) again.
    h.offer(JobId::new()).await;
    let mut saw_complete = false;
    h.next("second claim", |s| match s {
        Seen::Complete(_) => {
            saw_complete = true;
            None
        }
        Seen::Claim(c) if c.job_id != job_id => Some(c),
        _ => None,
    })
    .await;
    assert!(!saw_complete, "a fenced job must not be reported");
    h.stop().await;
}

#[tokio::test]
async fn shutdown_past_grace_releases_running_jobs() {
    let workflow = json!({"steps": [{"id": "nap", "kind": "sleep", "ms": 60000}]});
    let mut h = start(RobotReply::Accepted(grant_for(JobId::new(), workflow))).await;
    h.next("register", |s| if let Seen::Register(r) = s { Some(r) } else { None }).await;
    let job_id = JobId::new();
    h.offer(job_id).await;
    h.next("renew", |s| if let Seen::Renew(r) = s { Some(r) } else { None }).await;
    h.shutdown.cancel();
    let release = h.next("release", |s| if let Seen::Release(r) = s { Some(r) } else { None }).await;
    assert_eq!(release.job_id, job_id);
    assert_eq!(release.reason, "robot shutting down");
    let result = tokio::time::timeout(WAIT, h.robot).await.expect("robot did not stop").unwrap();
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn a_format_without_executor_is_rejected_after_claim() {
    let mut grant = grant_for(JobId::new(), json!({"nodes": {}, "connections": []}));
    grant.format = WorkflowFormat::Casare;
    grant.attempt = 3;
    let mut h = start(RobotReply::Accepted(grant)).await;
    h.next("register", |s| if let Seen::Register(r) = s { Some(r) } else { None }).await;
    let job_id = JobId::new();
    h.offer(job_id).await;
    let reject = h.next("reject", |s| if let Seen::Reject(r) = s { Some(r) } else { None }).await;
    assert_eq!((reject.job_id, reject.offer_no, reject.attempt), (job_id, 1, Some(3)));
    assert!(reject.reason.contains("casare"), "{}", reject.reason);
    h.stop().await;
}
