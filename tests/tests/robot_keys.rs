//! Robot keys (issue 12): a `robot` role that does only what a robot does, attested
//! capabilities (a robot gets what it offers that its key grants), reports fenced on the session
//! holding the attempt, no registration without a state directory id, and revocation that takes
//! a bound robot offline and offers its running job again at once. Real gateway, orchestrator,
//! nats-server and PostgreSQL; robots are played over HTTP (the seed's agent) and, where the
//! NATS protocol is the point, one message at a time.

mod common;

use std::time::Duration;

use common::{Secure, Stack, WAIT};
use fleet_schemas::codec::{decode, encode};
use fleet_schemas::keys::Role;
use fleet_schemas::robot::{
    Ack, ClaimGrant, ClaimRequest, CompleteRequest, ProgressReport, RegisterGrant, RegisterRequest,
    RobotReply, RunOutcome,
};
use fleet_schemas::subjects::{self, RobotVerb};
use fleet_schemas::{JobId, RobotId, SessionId, TenantId};
use fleet_tests::wait_for;
use reqwest::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const TENANT: &str = "acme";

/// A tenant's admin on a secure gateway.
struct Admin {
    secure: Secure,
    key: String,
}

impl Admin {
    async fn new(stack: &Stack) -> Admin {
        let secure = Secure::start(stack).await;
        Admin { key: stack.cli_key(TENANT, Role::Admin, None).await, secure }
    }

    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.secure.send(method, path, Some(&self.key), body).await
    }

    /// A robot key made over HTTP, bound to `robot`, granting `grant` (`None`: no list).
    async fn robot_key(&self, robot: &str, grant: Option<&[&str]>) -> String {
        let mut body = json!({"name": format!("{robot} key"), "robot_id": robot});
        if let Some(grant) = grant {
            body["capabilities"] = json!(grant);
        }
        let (status, made) = self.send(Method::POST, "/api/v1/robot-api-keys", Some(body)).await;
        assert_eq!(status, 200, "robot key of {robot}: {made}");
        assert_eq!(made["key"]["role"], "robot", "{made}");
        made["api_key"].as_str().unwrap().to_owned()
    }

    async fn submit(&self, name: &str, caps: &[&str]) -> String {
        let body = json!({
            "workflow_name": name,
            "workflow_json": {"steps": [{"id": "a", "kind": "log", "message": name}]},
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

    async fn robot(&self, id: &str) -> Value {
        let (status, robot) = self.send(Method::GET, &format!("/api/v1/metrics/robots/{id}"), None).await;
        assert_eq!(status, 200, "robot {id}: {robot}");
        robot
    }

    /// Wait until the job waits with a reason.
    async fn waiting(&self, id: &str) -> Value {
        wait_for(format!("job {id} to wait with a reason"), WAIT, || async {
            let job = self.job(id).await;
            (job["status"] == "pending" && job["waiting_reason"].is_string()).then_some(job)
        })
        .await
        .unwrap()
    }
}

/// An HTTP robot: its id and robot key.
struct Agent {
    secure: Secure,
    robot: String,
    key: String,
}

impl Agent {
    /// Register the robot with its own key, offering `offers`.
    async fn enrol(admin: &Admin, robot: &str, offers: &[&str], grant: Option<&[&str]>) -> Agent {
        let key = admin.robot_key(robot, grant).await;
        let agent = Agent { secure: admin.secure.clone(), robot: robot.to_owned(), key };
        let body = json!({"robot_id": robot, "name": robot, "hostname": "h", "capabilities": offers});
        let (status, answer) = agent.send(Method::POST, "/api/v1/robots/register", Some(body)).await;
        assert_eq!(status, 200, "register {robot} with its key: {answer}");
        agent
    }

    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.secure.send(method, path, Some(&self.key), body).await
    }

    async fn heartbeat(&self) -> (u16, Value) {
        self.send(Method::POST, &format!("/api/v1/robots/{}/heartbeat", self.robot), Some(json!({}))).await
    }

    async fn claim(&self) -> (u16, Value) {
        self.send(Method::POST, "/api/v1/jobs/claim", Some(json!({"visibility_timeout_seconds": 30}))).await
    }

    /// Claim until a job comes.
    async fn claim_next(&self) -> Value {
        wait_for(format!("{} to claim a job", self.robot), WAIT, || async {
            let (status, job) = self.claim().await;
            assert_eq!(status, 200, "claim: {job}");
            (!job.is_null()).then_some(job)
        })
        .await
        .unwrap()
    }

    async fn complete(&self, job: &str) -> (u16, Value) {
        let body = json!({"result": {"by": self.robot}});
        self.send(Method::POST, &format!("/api/v1/jobs/{job}/complete"), Some(body)).await
    }
}

/// One robot request over NATS, answered.
async fn nats_call<Q: Serialize, A: DeserializeOwned>(
    client: &async_nats::Client,
    robot: &str,
    verb: RobotVerb,
    req: &Q,
) -> RobotReply<A> {
    let (tenant, robot) = (TenantId::new(TENANT).unwrap(), RobotId::new(robot).unwrap());
    let subject = subjects::robot_request(&tenant, &robot, verb);
    let msg = tokio::time::timeout(Duration::from_secs(6), client.request(subject, encode(req).into()))
        .await
        .expect("robot request answered in time")
        .expect("robot request");
    decode("robot reply", &msg.payload).unwrap()
}

fn register_request(caps: &[&str], state_dir_id: &str) -> RegisterRequest {
    RegisterRequest {
        v: 1,
        session_id: SessionId::new(),
        name: "played".into(),
        hostname: "test".into(),
        capabilities: caps.iter().map(|c| c.to_string()).collect(),
        max_jobs: 1,
        version: "test".into(),
        environment: String::new(),
        tags: vec![],
        state_dir_id: state_dir_id.into(),
    }
}

fn job_id(text: &str) -> JobId {
    text.parse().unwrap()
}

/// Robot keys over HTTP: made (role robot, its grant checked and stored), listed, revoked; a
/// robot key does nothing but a robot's calls (the whole matrix); a key bound to one robot
/// cannot act as another.
#[tokio::test]
async fn robot_keys_do_only_what_a_robot_does() {
    let stack = Stack::start().await;
    let admin = Admin::new(&stack).await;

    // Made, with a grant; a bad capability names its field; role robot only on this route.
    let body = json!({"name": "zone a", "robot_id": "r1", "capabilities": ["browser", "shell", "browser"]});
    let (status, made) = admin.send(Method::POST, "/api/v1/robot-api-keys", Some(body)).await;
    assert_eq!(status, 200, "{made}");
    assert_eq!(made["key"]["capabilities"], json!(["browser", "shell"]), "{made}");
    let key_id = made["key"]["id"].as_str().unwrap().to_owned();
    let body = json!({"name": "bad", "capabilities": ["browser", "Bad!"]});
    let (status, bad) = admin.send(Method::POST, "/api/v1/robot-api-keys", Some(body)).await;
    assert_eq!((status, bad["error"]["field"].as_str()), (422, Some("capabilities[1]")), "{bad}");
    let body = json!({"name": "x", "role": "robot"});
    let (status, bad) = admin.send(Method::POST, "/api/v1/api-keys", Some(body)).await;
    assert_eq!(status, 422, "{bad}");
    assert!(bad["error"]["message"].as_str().unwrap().contains("robot-api-keys"), "{bad}");
    // An unbound robot key is listed with the robot keys too.
    let (status, _) =
        admin.send(Method::POST, "/api/v1/robot-api-keys", Some(json!({"name": "unbound"}))).await;
    assert_eq!(status, 200);
    let (status, list) = admin.send(Method::GET, "/api/v1/robot-api-keys", None).await;
    assert_eq!(status, 200, "{list}");
    let names: Vec<&str> =
        list["keys"].as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"zone a") && names.contains(&"unbound"), "{list}");

    // The robot's own calls work with its key.
    let r1 = Agent::enrol(&admin, "r1", &["browser"], None).await;
    let (status, beat) = r1.heartbeat().await;
    assert_eq!(status, 200, "{beat}");
    let (status, claimed) = r1.claim().await;
    assert_eq!((status, &claimed), (200, &Value::Null));

    // Everything else is 403, with a message saying why.
    let job = admin.submit("someone's", &["secure"]).await;
    let denied: Vec<(Method, String, Option<Value>)> = vec![
        (Method::POST, "/api/v1/workflows".into(), Some(json!({"workflow_json": {"steps": []}}))),
        (Method::POST, format!("/api/v1/jobs/{job}/cancel"), None),
        (Method::POST, format!("/api/v1/jobs/{job}/retry"), None),
        (Method::GET, "/api/v1/metrics/jobs".into(), None),
        (Method::GET, format!("/api/v1/metrics/jobs/{job}"), None),
        (Method::GET, "/api/v1/metrics/robots".into(), None),
        (Method::GET, "/api/v1/metrics/robots/r1".into(), None),
        (Method::POST, "/api/v1/robots/commands".into(), Some(json!({"command": "pause"}))),
        (Method::POST, "/api/v1/robots/r1/pause".into(), None),
        (Method::PUT, "/api/v1/robots/r1".into(), Some(json!({"name": "mine"}))),
        (Method::DELETE, "/api/v1/robots/r1".into(), None),
        (Method::GET, "/api/v1/api-keys".into(), None),
        (Method::POST, "/api/v1/api-keys".into(), Some(json!({"name": "escalate", "role": "admin"}))),
        (Method::POST, "/api/v1/robot-api-keys".into(), Some(json!({"name": "another"}))),
        (Method::POST, format!("/api/v1/api-keys/{key_id}/revoke"), None),
        (Method::GET, "/api/v1/events".into(), None),
        (Method::GET, "/api/v1/metrics/fleet".into(), None),
    ];
    for (method, path, body) in denied {
        let (status, answer) = r1.send(method.clone(), &path, body).await;
        assert_eq!(status, 403, "{method} {path} with a robot key: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("robot key may only do what a robot does"), "{method} {path}: {answer}");
    }
    // It reports its own status only.
    let (status, answer) =
        r1.send(Method::PUT, "/api/v1/robots/r2/status", Some(json!({"status": "paused"}))).await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(admin.job(&job).await["status"], "pending", "the job was not touched");

    // Bound to r1: it cannot register, beat or report as r2.
    let body = json!({"robot_id": "r2", "name": "r2", "hostname": "h", "capabilities": []});
    let (status, answer) = r1.send(Method::POST, "/api/v1/robots/register", Some(body)).await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("bound to robot r1"), "{answer}");
    let (status, _) = r1.send(Method::POST, "/api/v1/robots/r2/heartbeat", Some(json!({}))).await;
    assert_eq!(status, 404, "another robot is one that does not exist to this key");

    stack.stop().await;
}

/// A robot bound to a key that grants `browser` offers `browser`, `gpu` and `shell`: it is
/// recorded with all three sets, gpu and shell jobs are never offered to it (they wait with a
/// reason), a browser job is; and a direct claim of the gpu job over NATS is refused.
#[tokio::test]
async fn capabilities_are_what_the_key_grants() {
    let stack = Stack::start().await;
    let admin = Admin::new(&stack).await;
    let r1 = Agent::enrol(&admin, "r1", &["browser", "gpu", "shell"], Some(&["browser"])).await;
    let view = admin.robot("r1").await;
    assert_eq!(view["capabilities"], json!(["browser"]), "{view}");
    assert_eq!(view["offered_capabilities"], json!(["browser", "gpu", "shell"]), "{view}");
    assert_eq!(view["granted_capabilities"], json!(["browser"]), "{view}");
    let (status, _) = r1.heartbeat().await;
    assert_eq!(status, 200);

    let gpu = admin.submit("gpu job", &["gpu"]).await;
    let shell = admin.submit("shell job", &["shell"]).await;
    for job in [&gpu, &shell] {
        let waiting = admin.waiting(job).await;
        let reason = waiting["waiting_reason"].as_str().unwrap();
        assert!(reason.contains("no online robot"), "job {job}: {waiting}");
    }
    let browser = admin.submit("browser job", &["browser"]).await;
    let claimed = r1.claim_next().await;
    assert_eq!(claimed["job_id"], browser.as_str(), "only the browser job reaches the robot");
    let (status, done) = r1.complete(&browser).await;
    assert_eq!(status, 200, "{done}");
    let (status, none) = r1.claim().await;
    assert_eq!((status, &none), (200, &Value::Null), "gpu and shell jobs are never offered to r1");
    let view = admin.robot("r1").await;
    assert_eq!(
        view["offered_capabilities"],
        json!(["browser", "gpu", "shell"]),
        "its session keeps the offer: {view}"
    );
    assert_eq!(view["capabilities"], json!(["browser"]), "{view}");

    // The same robot over NATS (its binding is the key's), once the HTTP one said goodbye (a live
    // robot's id is not taken over): a claim of the gpu job is refused.
    let (status, answer) =
        r1.send(Method::PUT, "/api/v1/robots/r1/status", Some(json!({"status": "offline"}))).await;
    assert_eq!(status, 200, "a robot key says its goodbye: {answer}");
    wait_for("r1 offline", WAIT, || async { (admin.robot("r1").await["status"] == "offline").then_some(()) })
        .await
        .unwrap();
    let client = stack.nats.client().await.unwrap();
    let reg = register_request(&["browser", "gpu"], "dir-nats");
    let session = reg.session_id;
    match nats_call::<_, RegisterGrant>(&client, "r1", RobotVerb::Register, &reg).await {
        RobotReply::Accepted(grant) => {
            assert!(!grant.class_consumer.contains("gpu"), "pulls from its effective class: {grant:?}")
        }
        other => panic!("register over NATS: {other:?}"),
    }
    let claim = ClaimRequest { v: 1, session_id: session, job_id: job_id(&gpu), offer_no: 0 };
    match nats_call::<_, ClaimGrant>(&client, "r1", RobotVerb::Claim, &claim).await {
        RobotReply::Refused { reason } => assert!(reason.contains("does not grant"), "{reason}"),
        other => panic!("a claim outside the grant must be refused: {other:?}"),
    }
    assert_eq!(admin.job(&gpu).await["status"], "pending");
    assert_eq!(admin.robot("r1").await["capabilities"], json!(["browser"]), "heartbeats do not widen it");

    stack.stop().await;
}

/// Reports are accepted only from the session holding the attempt: another session's
/// completion, progress and release are refused, and the job still completes once from the right
/// one. A registration without a state directory id is refused.
#[tokio::test]
async fn reports_are_fenced_on_the_session() {
    let stack = Stack::start().await;
    let admin = Admin::new(&stack).await;
    let r1 = Agent::enrol(&admin, "r1", &[], None).await;
    let job = admin.submit("fenced", &[]).await;
    let claimed = r1.claim_next().await;
    assert_eq!(claimed["job_id"], job.as_str());
    let attempt = admin.job(&job).await["attempt"].as_i64().unwrap_or(1) as i32;

    // An impostor on r1's subjects with a session of its own.
    let client = stack.nats.client().await.unwrap();
    let forged = SessionId::new();
    let progress = ProgressReport {
        v: 1,
        session_id: forged,
        job_id: job_id(&job),
        attempt,
        progress: 77,
        current_node: None,
    };
    let subject = subjects::robot_request(
        &TenantId::new(TENANT).unwrap(),
        &RobotId::new("r1").unwrap(),
        RobotVerb::Progress,
    );
    client.publish(subject, encode(&progress).into()).await.unwrap();
    client.flush().await.unwrap();
    let release = fleet_schemas::robot::ReleaseRequest {
        v: 1,
        session_id: forged,
        job_id: job_id(&job),
        attempt,
        reason: "forged".into(),
    };
    match nats_call::<_, Ack>(&client, "r1", RobotVerb::Release, &release).await {
        RobotReply::Refused { reason } => assert!(reason.contains("session"), "{reason}"),
        other => panic!("a release from another session must be refused: {other:?}"),
    }
    let complete = CompleteRequest {
        v: 1,
        session_id: forged,
        job_id: job_id(&job),
        attempt,
        outcome: RunOutcome::Completed,
        output: json!({"forged": true}),
        error: None,
        failed_step: None,
    };
    match nats_call::<_, Ack>(&client, "r1", RobotVerb::Complete, &complete).await {
        RobotReply::Refused { reason } => assert!(reason.contains("another robot session"), "{reason}"),
        other => panic!("a completion from another session must be refused: {other:?}"),
    }
    let view = admin.job(&job).await;
    assert_eq!(view["status"], "running", "{view}");
    assert_ne!(view["progress"], 77, "forged progress is not recorded: {view}");

    // The holder completes it, once.
    let (status, done) = r1.complete(&job).await;
    assert_eq!(status, 200, "{done}");
    let view = admin.job(&job).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(view["output"], json!({"by": "r1"}), "the holder's output, not the forged one");
    match nats_call::<_, Ack>(&client, "r1", RobotVerb::Complete, &complete).await {
        RobotReply::Refused { .. } => {}
        other => panic!("a forged repeat after the end is refused too: {other:?}"),
    }

    // No state directory id: refused, naming it.
    let reg = register_request(&[], "");
    match nats_call::<_, RegisterGrant>(&client, "r9", RobotVerb::Register, &reg).await {
        RobotReply::Refused { reason } => assert!(reason.contains("state_dir_id"), "{reason}"),
        other => panic!("a registration without state_dir_id must be refused: {other:?}"),
    }

    stack.stop().await;
}

/// Revoking a robot key takes its robot offline and offers its running job again at once: the
/// other robot runs it and it completes exactly once; the revoked robot can no longer report it.
#[tokio::test]
async fn revocation_reoffers_the_running_job() {
    let stack = Stack::start().await;
    let admin = Admin::new(&stack).await;
    let r1 = Agent::enrol(&admin, "r1", &[], None).await;
    let job = admin.submit("moved", &[]).await;
    assert_eq!(r1.claim_next().await["job_id"], job.as_str());
    let r2 = Agent::enrol(&admin, "r2", &[], None).await;
    assert_eq!(r2.heartbeat().await.0, 200);

    let (status, keys) = admin.send(Method::GET, "/api/v1/robot-api-keys?robot_id=r1", None).await;
    assert_eq!(status, 200, "{keys}");
    let key_id = keys["keys"][0]["id"].as_str().unwrap().to_owned();
    let revoked_at = std::time::Instant::now();
    let (status, answer) =
        admin.send(Method::POST, &format!("/api/v1/robot-api-keys/{key_id}/revoke"), None).await;
    assert_eq!(status, 200, "{answer}");

    // Re-offered at once (well inside its 30 s lease): r2 gets it.
    let moved = r2.claim_next().await;
    assert_eq!(moved["job_id"], job.as_str());
    assert!(
        revoked_at.elapsed() < Duration::from_secs(10),
        "re-offered promptly: {:?}",
        revoked_at.elapsed()
    );
    assert_eq!(admin.robot("r1").await["status"], "offline");
    let (status, done) = r2.complete(&job).await;
    assert_eq!(status, 200, "{done}");
    let (status, _) = r1.complete(&job).await;
    assert!(status == 401 || status == 409, "the revoked robot's report is refused ({status})");
    let view = admin.job(&job).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(view["output"], json!({"by": "r2"}), "completed once, by r2: {view}");

    stack.stop().await;
}

/// `fleet-orchestrator api-key create --role robot` makes a robot key without HTTP: bound to its
/// robot, with its grant and expiry, written to a file only its owner can read; the key works for
/// that robot. A bad flag is a usage error naming it. (Needs `cargo build --bins`.)
#[tokio::test]
async fn cli_makes_robot_keys() {
    use std::os::unix::fs::PermissionsExt;

    let stack = Stack::start().await;
    let admin = Admin::new(&stack).await;
    let binary = fleet_tests::fleet_binary("fleet-orchestrator").expect("fleet-orchestrator binary");
    let cli = |args: &[&str]| {
        std::process::Command::new(&binary)
            .args(["api-key", "create", "--tenant", TENANT])
            .args(args)
            .env("NATS_URL", stack.nats.url())
            .env("DATABASE_URL", stack.db.url())
            .output()
            .expect("the CLI runs")
    };
    let out = stack.dirs.path().join("r7.key");
    let made = cli(&[
        "--role",
        "robot",
        "--robot-id",
        "r7",
        "--capability",
        "browser",
        "--capability",
        "shell",
        "--expires-in",
        "30d",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    assert!(made.stdout.is_empty(), "the key goes to the file only");
    assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600);
    let key = std::fs::read_to_string(&out).unwrap().trim().to_owned();
    assert!(fleet_schemas::keys::parse_key(&key).is_some(), "a Fleet key in the file");

    let (status, keys) = admin.send(Method::GET, "/api/v1/robot-api-keys?robot_id=r7", None).await;
    assert_eq!(status, 200, "{keys}");
    let listed = &keys["keys"][0];
    assert_eq!((&listed["role"], &listed["capabilities"]), (&json!("robot"), &json!(["browser", "shell"])));
    assert!(listed["expires_at"].is_string(), "{listed}");
    let agent = Agent { secure: admin.secure.clone(), robot: "r7".into(), key };
    let body = json!({"robot_id": "r7", "name": "r7", "hostname": "h", "capabilities": ["gpu", "shell"]});
    let (status, answer) = agent.send(Method::POST, "/api/v1/robots/register", Some(body)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["capabilities"], json!(["shell"]), "{answer}");

    for (args, flag) in [
        (vec!["--role", "robot", "--capability", "Bad!"], "--capability"),
        (vec!["--role", "viewer", "--robot-id", "r7"], "--robot-id"),
        (vec!["--role", "root"], "--role"),
    ] {
        let refused = cli(&args);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?} names {flag}: {stderr}");
    }

    stack.stop().await;
}
