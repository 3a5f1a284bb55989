//! API keys end to end: a gateway without development mode, keys made with the orchestrator's
//! CLI function and the HTTP API, roles, tenant isolation, revocation and rotation.

mod common;

use std::time::Duration;

use common::{Secure, Stack, WAIT};
use fleet_schemas::TenantId;
use fleet_schemas::keys::Role;
use fleet_tests::wait_for;
use serde_json::{Value, json};

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
    let admin = stack.cli_key("acme", Role::Admin, None).await;

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

/// Every endpoint: no key → 401; a role too low → 403; another tenant's id → 404 exactly as an
/// unknown one; bad input → 422 naming the field.
#[tokio::test]
async fn every_endpoint_checks_key_role_tenant_and_input() {
    use reqwest::Method;
    let mut stack = Stack::start().await;
    let mut robot = stack.robot_config("acme-r", &[]);
    robot.tenant = TenantId::new("acme").unwrap();
    stack.start_robot(robot);
    let secure = Secure::start(&stack).await;
    let (admin, operator, viewer, other) = (
        stack.cli_key("acme", Role::Admin, None).await,
        stack.cli_key("acme", Role::Operator, None).await,
        stack.cli_key("acme", Role::Viewer, None).await,
        stack.cli_key("beta", Role::Admin, None).await,
    );
    let (_, job) = secure.send(Method::POST, "/api/v1/workflows", Some(&operator), Some(workflow())).await;
    let job = job["job_id"].as_str().unwrap().to_owned();
    let (_, made) = secure
        .send(Method::POST, "/api/v1/api-keys", Some(&admin), Some(json!({"name": "k", "role": "viewer"})))
        .await;
    let key_id = made["key"]["id"].as_str().unwrap().to_owned();
    wait_for("acme's robot", WAIT, || async {
        let (s, _) = secure.send(Method::GET, "/api/v1/metrics/robots/acme-r", Some(&viewer), None).await;
        (s == 200).then_some(())
    })
    .await
    .unwrap();

    // (method, path, body, least role, names an object of tenant acme)
    let v = Role::Viewer;
    let o = Role::Operator;
    let a = Role::Admin;
    let endpoints: Vec<(Method, String, Option<Value>, Role, bool)> = vec![
        (Method::GET, "/api/v1/metrics/jobs".into(), None, v, false),
        (Method::GET, format!("/api/v1/metrics/jobs/{job}"), None, v, true),
        (Method::GET, format!("/api/v1/jobs/{job}/logs"), None, v, true),
        (Method::GET, "/api/v1/metrics/robots".into(), None, v, false),
        (Method::GET, "/api/v1/metrics/robots/acme-r".into(), None, v, true),
        (Method::GET, "/api/v1/robots/acme-r/logs".into(), None, v, true),
        (Method::GET, "/api/v1/robots/acme-r/metrics".into(), None, v, true),
        (Method::GET, "/api/v1/metrics/fleet".into(), None, v, false),
        (Method::GET, "/api/v1/metrics/analytics".into(), None, v, false),
        (Method::GET, "/api/v1/metrics/activity".into(), None, v, false),
        (Method::GET, "/api/v1/queues".into(), None, v, false),
        (Method::GET, "/api/v1/openapi.json".into(), None, v, false),
        (Method::POST, "/api/v1/workflows".into(), Some(workflow()), o, false),
        (Method::POST, "/api/v1/robots/acme-r/pause".into(), None, o, true),
        (Method::PUT, "/api/v1/robots/acme-r/status".into(), Some(json!({"status": "online"})), o, true),
        (Method::POST, "/api/v1/robots/commands".into(), Some(json!({"command": "resume"})), o, false),
        (Method::POST, format!("/api/v1/jobs/{job}/retry"), None, o, true),
        (Method::GET, "/api/v1/api-keys".into(), None, a, false),
        (Method::GET, "/api/v1/robot-api-keys".into(), None, a, false),
        (Method::POST, format!("/api/v1/api-keys/{key_id}/revoke"), None, a, true),
        (Method::PUT, "/api/v1/robots/acme-r".into(), Some(json!({"name": "renamed"})), a, true),
    ];
    for (method, path, body, least, owned) in &endpoints {
        let (status, answer) = secure.send(method.clone(), path, None, body.clone()).await;
        assert_eq!(status, 401, "{method} {path} without a key: {answer}");
        if *least > Role::Viewer {
            let (status, answer) = secure.send(method.clone(), path, Some(&viewer), body.clone()).await;
            assert_eq!(status, 403, "{method} {path} as viewer: {answer}");
        }
        if *least > Role::Operator {
            let (status, answer) = secure.send(method.clone(), path, Some(&operator), body.clone()).await;
            assert_eq!(status, 403, "{method} {path} as operator: {answer}");
        }
        if *owned {
            let (status, answer) = secure.send(method.clone(), path, Some(&other), body.clone()).await;
            assert_eq!(status, 404, "{method} {path} from another tenant: {answer}");
        }
    }
    // Bad input names the field.
    let bad: Vec<(Method, &str, Option<Value>, &str)> = vec![
        (Method::GET, "/api/v1/metrics/jobs?limit=0", None, "limit"),
        (Method::GET, "/api/v1/metrics/robots?status=sleepy", None, "status"),
        (Method::GET, "/api/v1/metrics/analytics?days=0", None, "days"),
        (Method::POST, "/api/v1/workflows", Some(json!({"workflow_json": {}})), "workflow_name"),
        (Method::PUT, "/api/v1/robots/acme-r/status", Some(json!({"status": "busy"})), "status"),
        (Method::POST, "/api/v1/robots/commands", Some(json!({"command": "explode"})), "command"),
        (Method::POST, "/api/v1/api-keys", Some(json!({"name": "x", "role": "root"})), "role"),
        (Method::POST, "/api/v1/robots/register", Some(json!({"name": "x", "hostname": "h"})), "robot_id"),
    ];
    for (method, path, body, field) in bad {
        let (status, answer) = secure.send(method.clone(), path, Some(&admin), body).await;
        assert_eq!(
            (status, answer["error"]["field"].as_str()),
            (422, Some(field)),
            "{method} {path}: {answer}"
        );
    }
    stack.stop().await;
}
