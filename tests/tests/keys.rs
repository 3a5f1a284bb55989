//! API keys end to end: a gateway without development mode, keys made with the orchestrator's
//! CLI function and the HTTP API, roles, tenant isolation, revocation and rotation.

mod common;

use std::time::Duration;

use common::{Stack, WAIT};
use fleet_schemas::TenantId;
use fleet_schemas::keys::Role;
use fleet_tests::wait_for;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

struct Secure {
    base: String,
    http: reqwest::Client,
    _token: tokio_util::sync::DropGuard,
}

impl Secure {
    async fn start(stack: &Stack) -> Secure {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let token = CancellationToken::new();
        let config = fleet_gateway::GatewayConfig {
            nats_url: stack.nats.url(),
            dev_mode: false,
            request_timeout: Duration::from_secs(5),
            rate_limit: None,
            ..Default::default()
        };
        tokio::spawn(fleet_gateway::run(config, listener, token.clone()));
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
        let secure = Secure { base, http, _token: token.drop_guard() };
        wait_for("the secure gateway", WAIT, || async {
            let r = secure.http.get(format!("{}/health", secure.base)).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await
        .unwrap();
        secure
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(key) = key {
            // As the Canvas does: both headers, same key.
            req = req.bearer_auth(key).header("x-api-key", key);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

fn workflow() -> Value {
    json!({"workflow_name": "keyed", "workflow_json": {"steps": [{"id": "a", "kind": "log", "message": "x"}]}})
}

#[tokio::test]
async fn keys_roles_tenants_revocation_and_rotation() {
    use reqwest::Method;
    let mut stack = Stack::start().await;
    let mut robot = stack.robot_config("acme-robot", &[]);
    robot.tenant = TenantId::new("acme").unwrap();
    stack.start_robot(robot);
    let secure = Secure::start(&stack).await;
    let mut config = common::orchestrator_config(&stack.nats, &stack.db);
    config.nats_url = stack.nats.url();
    let admin = fleet_orchestrator::keys::create_with_config(
        &config,
        &TenantId::new("acme").unwrap(),
        Role::Admin,
        "first",
    )
    .await
    .unwrap();

    // No key, a malformed one, a made-up one: 401.
    for key in [
        None,
        Some("nope"),
        Some(
            "crpa_00000000000000000000000000000000_0000000000000000000000000000000000000000000000000000000000000000",
        ),
    ] {
        let (status, body) = secure.send(Method::GET, "/api/v1/metrics/jobs", key, None).await;
        assert_eq!(status, 401, "{key:?}: {body}");
    }
    // The admin makes an operator and a viewer key.
    let make = |role: &'static str| {
        let secure = &secure;
        let admin = admin.clone();
        async move {
            let (status, body) = secure
                .send(
                    Method::POST,
                    "/api/v1/api-keys",
                    Some(&admin),
                    Some(json!({"name": role, "role": role})),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            (body["api_key"].as_str().unwrap().to_owned(), body["key"]["id"].as_str().unwrap().to_owned())
        }
    };
    let (operator, _) = make("operator").await;
    let (viewer, viewer_id) = make("viewer").await;

    // The viewer reads but may not submit; the operator submits; neither manages keys.
    let (status, _) = secure.send(Method::POST, "/api/v1/workflows", Some(&viewer), Some(workflow())).await;
    assert_eq!(status, 403);
    let (status, answer) =
        secure.send(Method::POST, "/api/v1/workflows", Some(&operator), Some(workflow())).await;
    assert_eq!(status, 200, "{answer}");
    let job_id = answer["job_id"].as_str().unwrap().to_owned();
    let (status, _) = secure.send(Method::GET, "/api/v1/api-keys", Some(&operator), None).await;
    assert_eq!(status, 403);
    let job = wait_for("the acme job to complete", WAIT, || async {
        let (_, job) =
            secure.send(Method::GET, &format!("/api/v1/metrics/jobs/{job_id}"), Some(&viewer), None).await;
        (job["status"] == "completed").then_some(job)
    })
    .await
    .unwrap();
    assert_eq!(job["robot_id"], "acme-robot", "the job ran in its key's tenant");
    // Tenant `default` (the dev-mode gateway) cannot see it.
    let (status, _) = stack.get(&format!("/api/v1/metrics/jobs/{job_id}")).await;
    assert_eq!(status, 404);

    // Revocation takes effect within 5 s.
    let (status, body) =
        secure.send(Method::POST, &format!("/api/v1/api-keys/{viewer_id}/revoke"), Some(&admin), None).await;
    assert_eq!((status, body["revoked"].as_bool()), (200, Some(true)), "{body}");
    let revoked_at = std::time::Instant::now();
    wait_for("the revoked key to stop working", Duration::from_secs(6), || async {
        let (status, _) = secure.send(Method::GET, "/api/v1/metrics/fleet", Some(&viewer), None).await;
        (status == 401).then_some(())
    })
    .await
    .unwrap();
    assert!(revoked_at.elapsed() <= Duration::from_secs(5), "revocation took {:?}", revoked_at.elapsed());

    // Rotation: a new secret for the same key, the old one stops working.
    let (status, list) = secure.send(Method::GET, "/api/v1/api-keys", Some(&admin), None).await;
    assert_eq!((status, list["total"].as_u64()), (200, Some(3)), "{list}");
    let operator_id =
        list["keys"].as_array().unwrap().iter().find(|k| k["name"] == "operator").unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
    let (status, rotated) = secure
        .send(Method::POST, &format!("/api/v1/api-keys/{operator_id}/rotate"), Some(&admin), None)
        .await;
    assert_eq!(status, 200, "{rotated}");
    let new_operator = rotated["api_key"].as_str().unwrap().to_owned();
    assert_ne!(new_operator, operator);
    let (status, _) = secure.send(Method::GET, "/api/v1/metrics/fleet", Some(&new_operator), None).await;
    assert_eq!(status, 200);
    wait_for("the old secret to stop working", Duration::from_secs(6), || async {
        let (status, _) = secure.send(Method::GET, "/api/v1/metrics/fleet", Some(&operator), None).await;
        (status == 401).then_some(())
    })
    .await
    .unwrap();
    stack.stop().await;
}
