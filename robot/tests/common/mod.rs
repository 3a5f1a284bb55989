//! The harness of the robot tests: a real nats-server, the JetStream objects the orchestrator
//! owns, and a fake orchestrator that answers the robot protocol with scripted replies and
//! records what it was asked. No PostgreSQL, no real orchestrator: these tests pin down the
//! robot's side of the contract.
//!
//! They need nats-server 2.11+ (`FLEET_NATS_SERVER`, else the one `scripts/install-nats` puts in
//! `.tools/`), and fail with a message saying so without one: see `fleet_testkit::NatsServer`.

#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use fleet_robot::{Exit, RobotConfig};
use fleet_schemas::codec;
use fleet_schemas::robot::*;
use fleet_schemas::subjects::{self, RobotVerb};
use fleet_schemas::workflow::WorkflowFormat;
use fleet_schemas::{Class, JobId, RobotId, TenantId};
use fleet_testkit::NatsServer;

/// Bound of every wait for something that should happen.
pub const WAIT: Duration = Duration::from_secs(20);
/// How long a test watches for something that must not happen (a claim by a paused robot).
/// A robot that pulls gets an offer within milliseconds, so two seconds of silence is telling.
pub const QUIET: Duration = Duration::from_secs(2);
/// Heartbeat cadence the fake orchestrator grants.
pub const HEARTBEAT_INTERVAL_MS: u64 = 500;
/// Lease the fake orchestrator grants (renewals every 200 ms).
pub const LEASE_MS: u64 = 600;

pub fn tenant() -> TenantId {
    TenantId::new("acme").unwrap()
}

/// What the orchestrator owns on JetStream: the offer stream, the robot's consumers, the
/// heartbeat bucket. Desired states are kept by the fake orchestrator ([`Fabric::put_desired`]).
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
pub enum Seen {
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
pub struct Script {
    pub claim: Arc<Mutex<RobotReply<ClaimGrant>>>,
    pub renew: Arc<Mutex<RobotReply<RenewGrant>>>,
    pub complete: Arc<Mutex<RobotReply<Ack>>>,
}

pub fn grant_for(job_id: JobId, workflow: Value) -> ClaimGrant {
    ClaimGrant {
        job_id,
        attempt: 1,
        lease_ms: LEASE_MS,
        format: WorkflowFormat::Fleet,
        workflow,
        variables: json!({"customer": "ACME"}).as_object().cloned().unwrap_or_default(),
        timeout_s: None,
        workflow_name: "test".into(),
        secrets: Default::default(),
    }
}

/// A Fleet v1 workflow that sleeps for `ms`.
pub fn sleeping(ms: u64) -> Value {
    json!({"steps": [{"id": "nap", "kind": "sleep", "ms": ms}]})
}

async fn fake_orchestrator(
    client: async_nats::Client,
    robot: RobotId,
    class: Class,
    script: Script,
    desired: Arc<Mutex<Option<DesiredState>>>,
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
                        heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
                        heartbeat_ttl_ms: 3000,
                        lease_ms: LEASE_MS,
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
                    codec::encode(&*script.complete.lock().unwrap()),
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
                RobotVerb::Desired => {
                    let current = desired.lock().unwrap().clone();
                    let reply = RobotReply::Accepted(DesiredReply { v: 1, desired: current });
                    if let Some(reply_to) = msg.reply {
                        client.publish(reply_to, codec::encode(&reply).into()).await.unwrap();
                    }
                    continue;
                }
            };
            if let Some(reply_to) = msg.reply {
                client.publish(reply_to, reply.into()).await.unwrap();
            }
            let _ = tx.send(seen);
        }
    });
    rx
}

/// The server, the fake orchestrator and a robot config, before the robot starts: tests adjust
/// the config or write a desired state first, then [`Fabric::launch`].
pub struct Fabric {
    pub server: NatsServer,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub seen: mpsc::UnboundedReceiver<Seen>,
    pub script: Script,
    pub robot_id: RobotId,
    pub class: Class,
    pub config: RobotConfig,
    pub state: tempfile::TempDir,
    /// What the fake orchestrator answers the robot's `desired` request with.
    pub desired: Arc<Mutex<Option<DesiredState>>>,
    /// The auth callout stand-in (admits the robot as one of tenant acme).
    pub callout: tokio::task::JoinHandle<()>,
}

/// A running robot and its fabric.
pub struct Harness {
    pub fabric: Fabric,
    pub shutdown: CancellationToken,
    pub robot: tokio::task::JoinHandle<anyhow::Result<Exit>>,
}

impl std::ops::Deref for Harness {
    type Target = Fabric;
    fn deref(&self) -> &Fabric {
        &self.fabric
    }
}

impl std::ops::DerefMut for Harness {
    fn deref_mut(&mut self) -> &mut Fabric {
        &mut self.fabric
    }
}

/// Start the fabric and a robot answering claims with `claim`.
pub async fn start(claim: RobotReply<ClaimGrant>) -> Harness {
    prepare(claim).await.launch()
}

/// Start the fabric; the robot is started by [`Fabric::launch`].
pub async fn prepare(claim: RobotReply<ClaimGrant>) -> Fabric {
    let server = NatsServer::start().await.expect("nats-server starts");
    let client = server.client().await.unwrap();
    let js = jetstream::new(client.clone());
    let robot_id = RobotId::new("r7").unwrap();
    let class = Class::parse(["shell"]).unwrap();
    setup_jetstream(&js, &robot_id, &class).await;
    let script = Script {
        claim: Arc::new(Mutex::new(claim)),
        renew: Arc::new(Mutex::new(RobotReply::Accepted(RenewGrant { lease_ms: LEASE_MS, cancel: false }))),
        complete: Arc::new(Mutex::new(RobotReply::Accepted(Ack {}))),
    };
    let desired = Arc::new(Mutex::new(None));
    let seen =
        fake_orchestrator(client.clone(), robot_id.clone(), class.clone(), script.clone(), desired.clone())
            .await;
    let callout = fleet_testkit::callout::admit_robots(&server, tenant(), Some(class.clone())).await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut config = RobotConfig::new(tenant());
    config.nats_url = server.url();
    config.key = Some(fleet_robot::RobotKey::new(&fleet_testkit::callout::any_robot_key()).unwrap());
    config.id = Some(robot_id.clone());
    config.state_dir = state.path().to_owned();
    config.shutdown_grace = Duration::from_secs(1);
    Fabric { server, client, js, seen, script, robot_id, class, config, state, desired, callout }
}

impl Fabric {
    /// Start the robot (with [`fleet_robot::run_until_exit`]).
    pub fn launch(self) -> Harness {
        let shutdown = CancellationToken::new();
        let robot = tokio::spawn(fleet_robot::run_until_exit(self.config.clone(), shutdown.clone()));
        Harness { fabric: self, shutdown, robot }
    }

    /// Publish an offer (offer number 1) for the robot's class.
    pub async fn offer(&self, job_id: JobId) {
        let offer = Offer { v: 1, job_id, offer_no: 1 };
        let subject = subjects::class_offers(&tenant(), &self.class);
        self.js.publish(subject, codec::encode(&offer).into()).await.unwrap().await.unwrap();
    }

    /// The next request matching `pick`, skipping others.
    pub async fn next<T>(&mut self, what: &str, pick: impl FnMut(Seen) -> Option<T>) -> T {
        self.next_within(WAIT, pick).await.unwrap_or_else(|| panic!("no {what} in time"))
    }

    /// The next request matching `pick` within `within`, skipping others; `None` when none came.
    pub async fn next_within<T>(
        &mut self,
        within: Duration,
        mut pick: impl FnMut(Seen) -> Option<T>,
    ) -> Option<T> {
        let seen = &mut self.seen;
        let found = async {
            while let Some(s) = seen.recv().await {
                if let Some(t) = pick(s) {
                    return t;
                }
            }
            panic!("fake orchestrator stopped");
        };
        tokio::time::timeout(within, found).await.ok()
    }

    pub async fn registered(&mut self) -> RegisterRequest {
        self.next("register", |s| if let Seen::Register(r) = s { Some(r) } else { None }).await
    }

    pub async fn pending_offers(&self) -> (u64, usize) {
        let s = self.js.get_stream(subjects::JOBS_STREAM).await.unwrap();
        let mut c: consumer::PullConsumer =
            s.get_consumer(&subjects::class_consumer(&tenant(), &self.class)).await.unwrap();
        let info = c.info().await.unwrap();
        (info.num_pending, info.num_ack_pending)
    }

    /// Set the robot's desired state as the orchestrator does: kept (answered to the robot's
    /// `desired` requests) and pushed on its command subject.
    pub async fn put_desired(&self, desired: &DesiredState) {
        *self.desired.lock().unwrap() = Some(desired.clone());
        let push = RobotPush::Desired { v: 1, desired: desired.clone() };
        let subject = subjects::robot_command(&tenant(), &self.robot_id);
        self.client.publish(subject, codec::encode(&push).into()).await.unwrap();
        self.client.flush().await.unwrap();
    }

    /// Forget the robot's desired state and nudge it (an empty push), as an orchestrator that
    /// lost it would; the robot reads "none" and goes online.
    pub async fn forget_desired(&self) {
        *self.desired.lock().unwrap() = None;
        let subject = subjects::robot_command(&tenant(), &self.robot_id);
        self.client.publish(subject, Vec::new().into()).await.unwrap();
        self.client.flush().await.unwrap();
    }

    /// Wait (bounded) for a heartbeat satisfying `pred`, watching the robot's heartbeat key.
    pub async fn heartbeat_where(&self, what: &str, mut pred: impl FnMut(&Heartbeat) -> bool) -> Heartbeat {
        let kv = self.js.get_key_value(subjects::ROBOTS_BUCKET).await.unwrap();
        let key = subjects::heartbeat_key(&tenant(), &self.robot_id);
        let mut watch = kv.watch_with_history(&key).await.unwrap();
        let found = async {
            while let Some(entry) = watch.next().await {
                let entry = entry.unwrap();
                if entry.operation != kv::Operation::Put {
                    continue;
                }
                let hb: Heartbeat = codec::decode("heartbeat", &entry.value).unwrap();
                if pred(&hb) {
                    return hb;
                }
            }
            panic!("heartbeat watch ended");
        };
        tokio::time::timeout(WAIT, found).await.unwrap_or_else(|_| panic!("no heartbeat {what} in time"))
    }
}

impl Harness {
    /// Shut the robot down through its token and expect a clean stop.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(WAIT, self.robot).await.expect("robot did not shut down").unwrap();
        assert_eq!(result.expect("clean shutdown"), Exit::Stopped);
    }

    /// Wait (bounded) for the robot to end on its own.
    pub async fn exited(&mut self) -> anyhow::Result<Exit> {
        tokio::time::timeout(WAIT, &mut self.robot).await.expect("robot did not exit").unwrap()
    }
}

/// A desired state.
pub fn desired(revision: i64, mode: RobotMode, stop: Option<StopOrder>) -> DesiredState {
    DesiredState { v: 1, mode, stop, revision }
}
