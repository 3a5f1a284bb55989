//! Secrets for jobs end to end: stored write-only over the API, encrypted in the database,
//! handed to a robot only in the claim reply of a job whose workflow names them, masked in
//! everything the robot reports, isolated per tenant; and shell steps that run with a scrubbed
//! environment (no NATS_URL, no FLEET_* of the robot, nothing of the test process beyond the
//! basics unless `--step-env` passes it).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use common::{Secure, Stack, WAIT};
use fleet_schemas::api::Endpoint;
use fleet_schemas::keys::Role;
use fleet_schemas::robot::{ClaimGrant, RobotReply};
use fleet_tests::wait_for;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

const VALUE: &str = "s3cr3t-Value-42";

async fn send(stack: &Stack, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let (status, _, body) = common::send(&stack.http, &stack.base, method, path, None, body).await;
    (status, body)
}

/// Messages seen on the NATS server: (subject, payload).
type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Every message on the NATS server, as (subject, payload), from now on.
fn sniff(client: async_nats::Client, subscriber: async_nats::Subscriber) -> Seen {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let into = seen.clone();
    tokio::spawn(async move {
        let _client = client;
        let mut subscriber = subscriber;
        while let Some(msg) = subscriber.next().await {
            into.lock().unwrap().push((msg.subject.to_string(), msg.payload.to_vec()));
        }
    });
    seen
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn secrets_reach_only_the_jobs_that_use_them_and_never_show() {
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("secrets.key");
    fleet_orchestrator::secrets::SecretsKey::create_file(&key_file).unwrap();
    let mut stack = Stack::start_with(|c| c.secrets_key_file = Some(key_file.clone())).await;

    // Everything on the wire from before the secret is stored.
    // (As the orchestrator: the only role that may read everything.)
    let client = stack.nats.client().await.unwrap();
    let subscriber = client.subscribe(">").await.unwrap();
    client.flush().await.unwrap();
    let seen = sniff(client, subscriber);

    // Stored, listed by name only; bad names and values are refused naming the field.
    let (status, body) =
        send(&stack, Method::PUT, "/api/v1/secrets/DB_PASSWORD", Some(json!({"value": VALUE}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "DB_PASSWORD");
    assert!(!body.to_string().contains(VALUE), "{body}");
    let (status, body) =
        send(&stack, Method::PUT, "/api/v1/secrets/lower", Some(json!({"value": "x"}))).await;
    assert_eq!((status, body["error"]["field"].as_str()), (422, Some("name")), "{body}");
    let big = "x".repeat(fleet_schemas::secrets::MAX_VALUE + 1);
    let (status, body) = send(&stack, Method::PUT, "/api/v1/secrets/BIG", Some(json!({"value": big}))).await;
    assert_eq!((status, body["error"]["field"].as_str()), (422, Some("value")), "{body}");
    let (status, body) = send(&stack, Method::PUT, "/api/v1/secrets/X", Some(json!({"valu": "x"}))).await;
    assert_eq!(status, 422, "an unknown field is refused: {body}");
    let (status, list) = send(&stack, Method::GET, "/api/v1/secrets", None).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["secrets"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["secrets"][0]["name"], "DB_PASSWORD");
    assert!(list["secrets"][0]["updated_at"].is_string(), "{list}");
    assert!(!list.to_string().contains(VALUE), "{list}");

    // At rest it is ciphertext.
    let pool = sqlx::PgPool::connect(stack.db.url()).await.unwrap();
    let stored: Vec<u8> = sqlx::query_scalar("SELECT ciphertext FROM secrets WHERE name = 'DB_PASSWORD'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!contains(&stored, VALUE), "stored in plain text");

    // A robot whose executor records every grant it gets (what its claim replies carried), and
    // which passes one variable of the test process on with --step-env.
    let grants: Arc<Mutex<BTreeMap<String, ClaimGrant>>> = Arc::default();
    let mut config = stack.robot_config("vault-robot", &[]);
    let passed = std::env::vars()
        .map(|(k, _)| k)
        .find(|k| {
            !fleet_robot::executor::process::BASE_ENV.contains(&k.as_str())
                && fleet_robot::executor::process::check_pass_name(k).is_ok()
        })
        .expect("the test process has a variable to pass on");
    config.step_env = vec![passed.clone()];
    let engine: Arc<dyn fleet_robot::executor::Executor> =
        Arc::new(fleet_robot::executor::steps::StepEngine::new(true).passing_env(config.step_env.clone()));
    let mut executors = fleet_robot::Executors::default();
    executors.insert(
        fleet_schemas::workflow::WorkflowFormat::Fleet,
        Arc::new(Recording { inner: engine, grants: grants.clone() }),
    );
    stack.start_robot_with(config, executors);
    stack.wait_robots_online(1).await;

    let out = stack.dir("out");
    let secret_file = out.join("secret.txt");
    let uses = stack
        .submit(json!({"workflow_name": "uses-secret", "workflow_json": {"steps": [
            {"id": "write", "kind": "shell", "env": {"PW": "{{ secrets.DB_PASSWORD }}"},
             "argv": ["sh", "-c", format!("printf %s \"$PW\" > '{}'; echo \"pw is $PW\"", secret_file.display())]},
            {"id": "env", "kind": "shell", "argv": ["env"]},
            {"id": "say", "kind": "log", "message": "the password is {{ secrets.DB_PASSWORD }}"}
        ]}}))
        .await;
    let uses_id = uses["job_id"].as_str().unwrap().to_owned();
    let plain = stack
        .submit(json!({"workflow_name": "no-secret", "workflow_json": {"steps": [
            {"id": "a", "kind": "log", "message": "nothing secret"}]}}))
        .await;
    let plain_id = plain["job_id"].as_str().unwrap().to_owned();
    let fails = stack
        .submit(json!({"workflow_name": "fails-with-secret", "workflow_json": {"steps": [
            {"id": "boom", "kind": "fail", "message": "bad {{ secrets.DB_PASSWORD }}"}]}}))
        .await;
    let fails_id = fails["job_id"].as_str().unwrap().to_owned();

    let job = stack.finished(&uses_id).await;
    assert_eq!(job["status"], "completed", "{job}");
    // The step got the value...
    assert_eq!(std::fs::read_to_string(&secret_file).unwrap(), VALUE);
    // ...and the record shows only the mask.
    assert!(!job.to_string().contains(VALUE), "the job record holds the value: {job}");
    let text = job.to_string();
    assert!(text.contains("pw is ***") && text.contains("the password is ***"), "{job}");

    // The step's environment: the basics, its own env, the passed variable; nothing else of
    // the robot's process, no NATS_URL and no FLEET_* but the job's own three.
    let env_out = job["output"]["steps"]["env"]["stdout"].as_str().unwrap_or_default().to_owned();
    let step_env: BTreeMap<&str, &str> = env_out.lines().filter_map(|l| l.split_once('=')).collect();
    assert!(step_env.contains_key("PATH") && step_env.contains_key("FLEET_JOB_ID"), "{env_out}");
    assert!(step_env.contains_key(passed.as_str()), "--step-env {passed} did not pass it: {env_out}");
    for name in step_env.keys() {
        assert!(!name.starts_with("NATS_"), "{name} reached a step");
        assert!(
            !name.starts_with("FLEET_") || ["FLEET_JOB_ID", "FLEET_ATTEMPT", "FLEET_JOB_DIR"].contains(name),
            "{name} reached a step"
        );
    }
    for (name, _) in std::env::vars() {
        if !fleet_robot::executor::process::BASE_ENV.contains(&name.as_str()) && name != passed {
            assert!(!step_env.contains_key(name.as_str()), "the robot's {name} reached a step");
        }
    }

    let job = stack.finished(&fails_id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(job["error_message"].as_str().unwrap_or_default().contains("bad ***"), "{job}");
    assert!(!job.to_string().contains(VALUE), "{job}");
    let job = stack.finished(&plain_id).await;
    assert_eq!(job["status"], "completed", "{job}");

    // The claim replies: the secret only for the jobs that name it.
    {
        let grants = grants.lock().unwrap();
        assert_eq!(grants[&uses_id].secrets.0.get("DB_PASSWORD").map(String::as_str), Some(VALUE));
        assert_eq!(grants[&fails_id].secrets.0.len(), 1);
        assert!(grants[&plain_id].secrets.is_empty(), "a job without references got secrets");
    }

    // The job's log shows the mask.
    let logs = wait_for("the job's log lines", WAIT, || async {
        let (_, logs) = send(&stack, Method::GET, &format!("/api/v1/jobs/{uses_id}/logs"), None).await;
        let text = logs.to_string();
        (text.contains("pw is ***") && text.contains("the password is ***")).then_some(logs)
    })
    .await
    .unwrap();
    assert!(!logs.to_string().contains(VALUE), "{logs}");

    // On the wire, the value travelled only in the write and in the claim replies of the two
    // jobs that use it: never in an event, a log line, a completion or another reply.
    wait_for("the events of the three jobs", WAIT, || async {
        let seen = seen.lock().unwrap();
        let done = seen
            .iter()
            .filter(|(s, _)| s.starts_with("fleet.events.") && s.ends_with(".job.completed"))
            .count();
        (done >= 2).then_some(())
    })
    .await
    .unwrap();
    let put_subject = Endpoint::PutSecret.subject();
    let mut claim_replies = 0;
    for (subject, payload) in seen.lock().unwrap().iter() {
        if !contains(payload, VALUE) || *subject == put_subject {
            continue;
        }
        let reply: RobotReply<ClaimGrant> = fleet_schemas::codec::decode("claim reply", payload)
            .unwrap_or_else(|e| panic!("the value was sent on {subject} in something else ({e})"));
        let RobotReply::Accepted(grant) = reply else { panic!("on {subject}: not a grant") };
        let id = grant.job_id.to_string();
        assert!(id == uses_id || id == fails_id, "the claim reply of {id} carried the value");
        claim_replies += 1;
    }
    assert!(claim_replies >= 2, "the value was seen in {claim_replies} claim replies");

    // Another tenant sees none of it and cannot use it.
    let secure = Secure::start(&stack).await;
    let other = stack.cli_key("other", Role::Operator, None).await;
    let (status, list) = secure.send(Method::GET, "/api/v1/secrets", Some(&other), None).await;
    assert_eq!((status, list["secrets"].as_array().map(Vec::len)), (200, Some(0)), "{list}");
    let (status, body) = secure.send(Method::DELETE, "/api/v1/secrets/DB_PASSWORD", Some(&other), None).await;
    assert_eq!(status, 404, "{body}");
    let wf = json!({"workflow_name": "steal", "workflow_json": {"steps": [
        {"id": "a", "kind": "log", "message": "{{ secrets.DB_PASSWORD }}"}]}});
    let (status, body) = secure.send(Method::POST, "/api/v1/workflows", Some(&other), Some(wf)).await;
    assert_eq!((status, body["error"]["field"].as_str()), (422, Some("workflow_json")), "{body}");
    assert!(body.to_string().contains("DB_PASSWORD"), "{body}");
    let admin = stack.cli_key("default", Role::Admin, None).await;
    let (status, robot_key) = secure
        .send(
            Method::POST,
            "/api/v1/robot-api-keys",
            Some(&admin),
            Some(json!({"robot_id": "vault-robot", "name": "robot"})),
        )
        .await;
    assert_eq!(status, 200, "{robot_key}");
    let robot_key = robot_key["api_key"].as_str().unwrap().to_owned();
    let (status, body) = secure.send(Method::GET, "/api/v1/secrets", Some(&robot_key), None).await;
    assert_eq!(status, 403, "a robot key may not list secrets: {body}");
    let viewer = stack.cli_key("default", Role::Viewer, None).await;
    let (status, _) = secure.send(Method::GET, "/api/v1/secrets", Some(&viewer), None).await;
    assert_eq!(status, 403, "a viewer may not list secrets");

    // A reference to a secret the tenant does not have is refused at submit.
    let (status, body) = stack
        .post(
            "/api/v1/workflows",
            &json!({"workflow_name": "typo", "workflow_json": {"steps": [
                {"id": "a", "kind": "log", "message": "{{ secrets.DB_PASWORD }}"}]}}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("DB_PASWORD"), "{body}");

    // Deleted: gone from the list, a second delete is 404.
    let (status, body) = send(&stack, Method::DELETE, "/api/v1/secrets/DB_PASSWORD", None).await;
    assert_eq!((status, body["deleted"].as_bool()), (200, Some(true)), "{body}");
    let (_, list) = send(&stack, Method::GET, "/api/v1/secrets", None).await;
    assert_eq!(list["secrets"].as_array().map(Vec::len), Some(0), "{list}");
    let (status, _) = send(&stack, Method::DELETE, "/api/v1/secrets/DB_PASSWORD", None).await;
    assert_eq!(status, 404);
    drop(secure);
    stack.stop().await;
}

#[tokio::test]
async fn without_a_key_file_the_secrets_api_says_what_to_set_and_jobs_still_run() {
    let mut stack = Stack::start().await;
    let (status, body) =
        send(&stack, Method::PUT, "/api/v1/secrets/TOKEN", Some(json!({"value": "x"}))).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("secrets_key_file"), "{body}");
    let (status, body) = send(&stack, Method::GET, "/api/v1/secrets", None).await;
    assert_eq!(status, 503, "{body}");
    let robot = stack.robot_config("plain-robot", &[]);
    stack.start_robot(robot);
    let job = stack
        .submit(json!({"workflow_name": "plain", "workflow_json": {"steps": [
            {"id": "a", "kind": "log", "message": "fine"}]}}))
        .await;
    let job = stack.finished(job["job_id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "completed", "{job}");
    stack.stop().await;
}

/// The step engine, recording each grant it is given.
struct Recording {
    inner: Arc<dyn fleet_robot::executor::Executor>,
    grants: Arc<Mutex<BTreeMap<String, ClaimGrant>>>,
}

impl fleet_robot::executor::Executor for Recording {
    fn execute<'a>(
        &'a self,
        grant: &'a ClaimGrant,
        ctx: &'a fleet_robot::executor::JobContext,
    ) -> futures::future::BoxFuture<'a, fleet_robot::executor::Execution> {
        self.grants.lock().unwrap().insert(grant.job_id.to_string(), grant.clone());
        self.inner.execute(grant, ctx)
    }
}
