//! The locked fabric (issue 12): what an outsider, another tenant's robot, an observer and the
//! gateway try on NATS, each refused by the server, while the real work goes on untouched.
//!
//! Every attack is made against a stack started the way users start one (the configuration
//! `nats-setup` writes, the orchestrator answering the auth callout). "Refused" means the server
//! said so: a permissions violation reported to the attacker's connection, or the connection
//! itself refused. Each attack's side effect is checked as well where there is one (the stream
//! is still there, the job still runs, nothing was received).

mod common;

use std::time::Duration;

use common::{Stack, WAIT};
use fleet_nats_auth::Credentials;
use fleet_nats_auth::permissions::robot_connection_name;
use fleet_schemas::RobotId;
use fleet_schemas::codec;
use fleet_schemas::robot::{ClaimGrant, RobotReply};
use fleet_tests::wait_for;
use futures::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;

/// How long an attack waits for the server's verdict.
const VERDICT: Duration = Duration::from_secs(5);

/// A connection that records the errors the server sends it.
struct Probe {
    client: async_nats::Client,
    errors: mpsc::UnboundedReceiver<String>,
    disconnected: tokio::sync::watch::Receiver<bool>,
}

impl Probe {
    async fn connect(
        stack: &Stack,
        credentials: &Credentials,
        name: Option<String>,
    ) -> anyhow::Result<Probe> {
        let (tx, errors) = mpsc::unbounded_channel();
        let (gone_tx, disconnected) = tokio::sync::watch::channel(false);
        let mut options = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |event| {
                let tx = tx.clone();
                let gone_tx = gone_tx.clone();
                async move {
                    match event {
                        async_nats::Event::ServerError(e) => {
                            let _ = tx.send(e.to_string());
                        }
                        async_nats::Event::Disconnected => {
                            let _ = gone_tx.send(true);
                        }
                        _ => {}
                    }
                }
            });
        if let Some(name) = name {
            options = options.name(name);
        }
        let client = credentials.apply(options)?.connect(stack.nats.url()).await?;
        Ok(Probe { client, errors, disconnected })
    }

    /// Wait for the server to report a permissions violation naming `subject`.
    async fn refused(&mut self, what: &str, subject: &str) {
        let wanted = subject.to_lowercase();
        let found = tokio::time::timeout(VERDICT, async {
            while let Some(e) = self.errors.recv().await {
                let e = e.to_lowercase();
                if e.contains("permissions violation") && e.contains(&wanted) {
                    return;
                }
            }
        })
        .await;
        assert!(found.is_ok(), "{what}: the server did not refuse {subject} within {VERDICT:?}");
    }

    async fn publish_refused(&mut self, what: &str, subject: &str) {
        self.client.publish(subject.to_owned(), "x".into()).await.unwrap();
        self.client.flush().await.unwrap();
        self.refused(what, subject).await;
    }

    /// A subscription to `subject` is refused, and nothing arrives on it.
    async fn subscribe_refused(&mut self, what: &str, subject: &str) -> async_nats::Subscriber {
        let sub = self.client.subscribe(subject.to_owned()).await.unwrap();
        self.client.flush().await.unwrap();
        self.refused(what, subject).await;
        sub
    }
}

/// A robot connection as `fleet-robot` makes it: its id as user, its key as password, its
/// offered capabilities in the connection name.
async fn robot_probe(stack: &Stack, key: &str, robot: &str, caps: &[&str]) -> anyhow::Result<Probe> {
    let caps: Vec<String> = caps.iter().map(|c| c.to_string()).collect();
    let name = robot_connection_name(&RobotId::new(robot).unwrap(), &caps);
    Probe::connect(stack, &Credentials::robot(key, robot)?, Some(name)).await
}

/// Jobs of tenant `default` that must all complete exactly once whatever is tried meanwhile.
async fn submit_jobs(stack: &Stack, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let answer = stack
            .submit(json!({
                "workflow_name": format!("during-attack-{i}"),
                "workflow_json": {"steps": [{"id": "s", "kind": "sleep", "ms": 20}]},
            }))
            .await;
        ids.push(answer["job_id"].as_str().unwrap().to_owned());
    }
    ids
}

async fn all_completed_once(stack: &Stack, ids: &[String]) {
    for id in ids {
        let job = stack.finished(id).await;
        assert_eq!(job["status"], "completed", "{job}");
    }
    let pool = stack.db.pool().await.unwrap();
    let completions: Vec<(String, i64)> = sqlx::query_as(
        "SELECT job_id::text, count(*) FROM job_history WHERE kind = 'job.completed' GROUP BY job_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for id in ids {
        let n = completions.iter().find(|(j, _)| j == id).map_or(0, |(_, n)| *n);
        assert_eq!(n, 1, "job {id} recorded completed {n} times");
    }
}

#[tokio::test]
async fn no_connection_without_credentials_and_no_robot_with_a_bad_key() {
    let stack = Stack::start().await;
    let anonymous = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(stack.nats.url())
        .await;
    assert!(anonymous.is_err(), "an anonymous client connected");

    let forged = fleet_schemas::keys::new_key().2;
    assert!(robot_probe(&stack, &forged, "r1", &[]).await.is_err(), "a made-up key connected");
    // A user key (not of role robot) does not make a robot.
    let admin = stack.cli_key("default", fleet_schemas::keys::Role::Admin, None).await;
    assert!(robot_probe(&stack, &admin, "r1", &[]).await.is_err(), "an admin key connected as a robot");
    // A key bound to one robot does not admit another id.
    let bound = common::robot_key(stack.db.url(), "default", Some("r1"), None).await;
    assert!(robot_probe(&stack, &bound, "r2", &[]).await.is_err(), "a key bound to r1 connected as r2");
    assert!(robot_probe(&stack, &bound, "r1", &[]).await.is_ok(), "the bound robot itself is admitted");
    // A robot that does not name its connection the way robots do is refused.
    assert!(Probe::connect(&stack, &Credentials::robot(&bound, "r1").unwrap(), None).await.is_err());
    stack.stop().await;
}

#[tokio::test]
async fn another_tenants_robot_can_touch_nothing_of_this_tenant() {
    let mut stack = Stack::start().await;
    stack.start_robot(stack.robot_config("worker", &[]));
    stack.wait_robots_online(1).await;
    let before = submit_jobs(&stack, 10).await;

    let key_b = common::robot_key(stack.db.url(), "b", Some("rb"), None).await;
    let mut rb = robot_probe(&stack, &key_b, "rb", &[]).await.unwrap();

    // Reading what is not its own.
    let mut sniff = rb.subscribe_refused("everything", ">").await;
    for subject in [
        "fleet.jobs.default.>",
        "fleet.events.default.>",
        "fleet.logs.default.>",
        "fleet.live.default.>",
        "_INBOX.>",
        "_INBOX_gateway.>",
        "fleet.cmd.default.worker",
        "$KV.fleet_robots.>",
        "$SYS.REQ.USER.AUTH",
    ] {
        rb.subscribe_refused("another tenant's traffic", subject).await;
    }
    // Offers, claims and reports of tenant default.
    for subject in [
        "$JS.API.CONSUMER.MSG.NEXT.FLEET_JOBS.default_any",
        "$JS.API.CONSUMER.INFO.FLEET_JOBS.default_any",
        "$JS.API.CONSUMER.CREATE.FLEET_JOBS.spy",
        "$JS.API.DIRECT.GET.KV_fleet_commands.$KV.fleet_commands.default.worker",
        "$JS.API.STREAM.INFO.KV_fleet_commands",
        "fleet.robot.default.worker.claim",
        "fleet.robot.default.worker.renew",
        "fleet.robot.default.worker.complete",
        "fleet.robot.default.worker.progress",
        "fleet.robot.default.worker.register",
        "$KV.fleet_robots.default.worker",
        "$KV.fleet_robots.default.ghost",
        "$KV.fleet_robots.b.someone-else",
        "fleet.cmd.default.worker",
    ] {
        rb.publish_refused("a robot of tenant b", subject).await;
    }
    // The orchestrator's API, directly, and answering in its place.
    for subject in
        ["fleet.api.jobs.list", "fleet.api.jobs.submit", "fleet.api.keys.create", "fleet.api.keys.verify"]
    {
        rb.publish_refused("the orchestrator's API", subject).await;
    }
    let _q = rb.client.queue_subscribe("fleet.api.>", "fleet-orchestrator".into()).await.unwrap();
    rb.client.flush().await.unwrap();
    rb.refused("serving the API in the orchestrators' queue group", "fleet.api.>").await;
    // JetStream's admin API.
    for subject in [
        "$JS.API.STREAM.PURGE.FLEET_EVENTS",
        "$JS.API.STREAM.DELETE.FLEET_JOBS",
        "$JS.API.STREAM.UPDATE.FLEET_EVENTS",
        "$JS.API.CONSUMER.DELETE.FLEET_JOBS.default_any",
        "$JS.API.STREAM.LIST",
        "fleet.events.default.job.completed",
        "fleet.jobs.default.any",
    ] {
        rb.publish_refused("JetStream administration", subject).await;
    }
    // Hostile MessagePack on its own subjects: an error answer, and the orchestrator serves on.
    for junk in [vec![0xdd, 0xff, 0xff, 0xff, 0xff], vec![0x91; 4096], b"\xc1 not msgpack".to_vec()] {
        let answer = tokio::time::timeout(WAIT, rb.client.request("fleet.robot.b.rb.claim", junk.into()))
            .await
            .expect("answered")
            .expect("an answer");
        let reply: RobotReply<ClaimGrant> = codec::decode("claim", &answer.payload).unwrap();
        assert!(matches!(reply, RobotReply::Refused { .. }), "{reply:?}");
    }

    let during = submit_jobs(&stack, 10).await;
    all_completed_once(&stack, &[before, during].concat()).await;
    // Nothing of it reached the attacker's refused subscriptions.
    assert!(tokio::time::timeout(Duration::from_millis(200), sniff.next()).await.is_err());
    // The streams it tried to purge and delete are intact.
    let js = async_nats::jetstream::new(stack.nats.client().await.unwrap());
    let mut events = js.get_stream("FLEET_EVENTS").await.unwrap();
    assert!(events.info().await.unwrap().state.messages > 0, "FLEET_EVENTS was purged");
    js.get_stream("FLEET_JOBS").await.expect("FLEET_JOBS still exists");
    stack.stop().await;
}

#[tokio::test]
async fn the_gateway_and_an_enrolling_robot_hold_only_their_own_rights() {
    let stack = Stack::start().await;
    let mut gateway = Probe::connect(&stack, &stack.nats.gateway_credentials(), None).await.unwrap();
    for subject in [
        "$JS.API.STREAM.PURGE.FLEET_EVENTS",
        "$JS.API.STREAM.DELETE.FLEET_JOBS",
        "$JS.API.CONSUMER.DELETE.FLEET_JOBS.default_any",
        "fleet.robot.default.worker.complete",
        "$KV.fleet_robots.default.worker",
        "fleet.events.default.job.completed",
        "fleet.cmd.default.worker",
    ] {
        gateway.publish_refused("the gateway", subject).await;
    }
    gateway.subscribe_refused("the gateway", "fleet.robot.>").await;
    gateway.subscribe_refused("the gateway", "$SYS.REQ.USER.AUTH").await;

    let key = common::robot_key(stack.db.url(), "default", None, None).await;
    let mut enrol = Probe::connect(&stack, &Credentials::enrol(&key).unwrap(), None).await.unwrap();
    enrol.publish_refused("an enrolling robot", "fleet.robot.default.r1.register").await;
    enrol.subscribe_refused("an enrolling robot", "fleet.cmd.default.r1").await;
    let key_id = fleet_nats_auth::client::key_id(&key).unwrap();
    let answer =
        enrol.client.request(fleet_nats_auth::permissions::whoami(&key_id), "".into()).await.unwrap();
    let who: Result<fleet_schemas::robot::WhoAmI, String> = codec::decode("whoami", &answer.payload).unwrap();
    assert_eq!(who.unwrap().tenant.as_str(), "default");
    stack.stop().await;
}

#[tokio::test]
async fn an_observer_sees_its_tenants_events_live_and_nothing_else() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pool = stack.db.pool().await.unwrap();
    let file = dir.path().join("observer.nk");
    let tenant = fleet_schemas::TenantId::default_tenant();
    let issued = fleet_orchestrator::nats_admin::create_observer(
        &pool,
        &stack.nats.auth_dir(),
        &tenant,
        "t",
        None,
        &file,
    )
    .await
    .unwrap();
    let creds = Credentials::from_file(&file).unwrap();
    let mut observer = Probe::connect(&stack, &creds, None).await.unwrap();
    let mut events = observer.client.subscribe("fleet.events.default.>").await.unwrap();
    observer.client.flush().await.unwrap();
    observer.subscribe_refused("an observer of default", "fleet.events.b.>").await;
    observer.subscribe_refused("an observer of default", ">").await;
    observer.publish_refused("an observer", "fleet.api.jobs.list").await;
    observer.publish_refused("an observer", "fleet.events.default.job.completed").await;

    let answer = stack
        .submit(json!({"workflow_name": "watched", "workflow_json": {"steps": [{"id": "s", "kind": "sleep", "ms": 1}]}}))
        .await;
    let job_id = answer["job_id"].as_str().unwrap().to_owned();
    let seen = tokio::time::timeout(WAIT, async {
        while let Some(msg) = events.next().await {
            let event: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
            if event.to_string().contains(&job_id) {
                return msg.subject.to_string();
            }
        }
        String::new()
    })
    .await
    .expect("the observer saw the job's event live");
    assert!(seen.starts_with("fleet.events.default."), "{seen}");

    // Revoked: disconnected at once, and refused when it comes back.
    assert!(fleet_orchestrator::nats_admin::revoke(&pool, &issued.id).await.unwrap());
    let mut gone = observer.disconnected.clone();
    tokio::time::timeout(Duration::from_secs(5), gone.wait_for(|d| *d))
        .await
        .expect("the revoked observer was disconnected within 5 s")
        .unwrap();
    assert!(Probe::connect(&stack, &creds, None).await.is_err(), "revoked credentials connected again");
    stack.stop().await;
}

#[tokio::test]
async fn a_revoked_robot_key_is_disconnected_and_cannot_come_back() {
    let mut stack = Stack::start().await;
    let admin = stack.cli_key("default", fleet_schemas::keys::Role::Admin, None).await;
    let secure = common::Secure::start(&stack).await;
    let (status, created) = secure
        .send(reqwest::Method::POST, "/api/v1/robot-api-keys", Some(&admin), Some(json!({"name": "doomed"})))
        .await;
    assert_eq!(status, 200, "{created}");
    let key = created["api_key"].as_str().unwrap().to_owned();
    let key_id = created["key"]["id"].as_str().unwrap().to_owned();
    let mut config = stack.robot_config("doomed", &[]);
    config.key = Some(fleet_robot::RobotKey::new(&key).unwrap());
    stack.start_robot(config);
    stack.wait_robots_online(1).await;
    let probe = robot_probe(&stack, &key, "doomed-2", &[]).await.unwrap();

    let (status, body) = secure
        .send(reqwest::Method::POST, &format!("/api/v1/robot-api-keys/{key_id}/revoke"), Some(&admin), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let mut gone = probe.disconnected.clone();
    tokio::time::timeout(Duration::from_secs(5), gone.wait_for(|d| *d))
        .await
        .expect("a connection of the revoked key was disconnected within 5 s")
        .unwrap();
    assert!(robot_probe(&stack, &key, "doomed-3", &[]).await.is_err(), "a revoked key connected again");
    wait_for("the revoked robot to go offline", WAIT, || async {
        let (_, robot) = stack.get("/api/v1/metrics/robots/doomed").await;
        (robot["status"] == "offline").then_some(())
    })
    .await
    .unwrap();
    for robot in stack.robots.drain(..) {
        robot.crash().await;
    }
    stack.stop().await;
}

#[tokio::test]
async fn a_robot_started_for_another_tenant_than_its_keys_is_a_clear_error() {
    let stack = Stack::start().await;
    let state = stack.dir("wrong-tenant");
    let run = |tenant: &str| {
        tokio::process::Command::new(fleet_tests::fleet_binary("fleet-robot").unwrap())
            .args(["--tenant", tenant, "--id", "rx", "--state-dir"])
            .arg(&state)
            .env("NATS_URL", stack.nats.url())
            .env("FLEET_ROBOT_KEY", &stack.robot_key)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output()
    };
    let out = tokio::time::timeout(WAIT, run("b")).await.expect("the robot exits at once").unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--tenant") && stderr.contains("belongs to tenant default"), "{stderr}");
    // Without a key at all, it says what it needs.
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(fleet_tests::fleet_binary("fleet-robot").unwrap())
            .args(["--tenant", "default"])
            .env("NATS_URL", stack.nats.url())
            .env_remove("FLEET_ROBOT_KEY")
            .output(),
    )
    .await
    .expect("the robot exits at once")
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("a robot needs its key"), "{out:?}");
    stack.stop().await;
}
