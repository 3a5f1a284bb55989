//! API keys end to end: a gateway without development mode, keys made with the orchestrator's
//! CLI function and the HTTP API, roles, tenant isolation, revocation and rotation.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Secure, Stack, WAIT};
use fleet_schemas::TenantId;
use fleet_schemas::keys::Role;
use fleet_tests::wait_for;
use reqwest::Method;
use serde_json::{Value, json};

fn workflow() -> Value {
    json!({"workflow_name": "keyed", "workflow_json": {"steps": [{"id": "a", "kind": "log", "message": "x"}]}})
}

#[tokio::test]
async fn keys_roles_tenants_revocation_and_rotation() {
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
    // The three user keys, and the robot key the acme robot enrolled with.
    assert_eq!((status, list["total"].as_u64()), (200, Some(4)), "{list}");
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

/// One endpoint of the matrix.
struct Case {
    method: Method,
    /// Its route, as `fleet_gateway::routes::ROUTES` lists it.
    route: &'static str,
    path: String,
    body: Option<Value>,
    /// The least role allowed; the roles below get 403.
    least: Role,
    /// An id of tenant acme in `path`, and one that exists nowhere: another tenant asking for the
    /// first gets exactly the answer of the second (404).
    ids: Option<(String, String)>,
    /// A request with bad input (path and body), and the field its 422 names.
    bad: Option<(String, Option<Value>, &'static str)>,
    /// A live stream, whose success path is checked on its own.
    stream: bool,
    /// A robot-facing route: only a robot key may call it (every user key gets 403), and it is
    /// called with the robot key of an HTTP robot of acme (another tenant's: beta's).
    robot: bool,
}

fn case(
    method: Method,
    route: &'static str,
    path: impl Into<String>,
    body: Option<Value>,
    least: Role,
) -> Case {
    Case { method, route, path: path.into(), body, least, ids: None, bad: None, stream: false, robot: false }
}

impl Case {
    fn owns(mut self, id: &str, missing: &str) -> Self {
        self.ids = Some((id.to_owned(), missing.to_owned()));
        self
    }

    fn bad(mut self, path: impl Into<String>, body: Option<Value>, field: &'static str) -> Self {
        self.bad = Some((path.into(), body, field));
        self
    }

    fn stream(mut self) -> Self {
        self.stream = true;
        self
    }

    fn robot(mut self) -> Self {
        self.robot = true;
        self
    }
}

/// The first event of `GET /api/v1/events?since=0` as Server-Sent Events.
async fn first_event(secure: &Secure, key: &str) -> Value {
    let mut r = secure
        .http
        .get(format!("{}/api/v1/events?since=0", secure.base))
        .bearer_auth(key)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut text = String::new();
    tokio::time::timeout(WAIT, async {
        loop {
            let chunk = r.chunk().await.unwrap().expect("the stream stays open");
            text.push_str(&String::from_utf8_lossy(&chunk));
            // An event ends with a blank line; keepalive comments carry no `data:`.
            let complete = text.rsplit_once("\n\n").map_or("", |(complete, _)| complete);
            let data = complete.split("\n\n").find_map(|event| {
                event.lines().find_map(|l| l.strip_prefix("data:")).map(|d| d.trim().to_owned())
            });
            if let Some(data) = data {
                return serde_json::from_str(&data).unwrap();
            }
        }
    })
    .await
    .expect("an event in time")
}

/// The Canvas's live view opened with `token` (the upgrade itself succeeds either way; a bad
/// token is answered on the socket).
async fn live_view(
    secure: &Secure,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = format!("{}/ws/monitoring/live-jobs?token={token}", secure.base.replace("http://", "ws://"));
    let (socket, response) =
        tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url)).await.unwrap().unwrap();
    assert_eq!(response.status(), 101);
    socket
}

/// Every endpoint: the success path; no key or a wrong one → 401; a role too low → 403; another
/// tenant's id → 404, exactly as an id that does not exist; bad input → 422 naming the field.
#[tokio::test]
async fn every_endpoint_checks_key_role_tenant_and_input() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    // With a secrets key, so the secrets routes answer (without one they say 503).
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("secrets.key");
    fleet_orchestrator::secrets::SecretsKey::create_file(&key_file).unwrap();
    let mut stack = Stack::start_with(|c| c.secrets_key_file = Some(key_file.clone())).await;
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
    let key_of = |role: Role| match role {
        Role::Viewer => &viewer,
        Role::Operator => &operator,
        Role::Admin => &admin,
        Role::Robot => panic!("robot keys are the HTTP robots' own"),
    };
    let ok = |what: &str, (status, answer): (u16, Value)| -> Value {
        assert_eq!(status, 200, "{what}: {answer}");
        answer
    };
    // Objects of tenant acme to act on: a job that runs, one that waits (nothing has a gpu) to be
    // cancelled and then retried, keys to revoke, rotate and delete, a robot key, a robot to
    // delete.
    let submit = |body: Value| secure.send(Method::POST, "/api/v1/workflows", Some(&operator), Some(body));
    let job = ok("submit", submit(workflow()).await)["job_id"].as_str().unwrap().to_owned();
    let mut waiting = workflow();
    waiting["required_capabilities"] = json!(["gpu"]);
    let waiting = ok("submit", submit(waiting).await)["job_id"].as_str().unwrap().to_owned();
    let new_key = |name: &'static str| {
        let body = json!({"name": name, "role": "viewer"});
        secure.send(Method::POST, "/api/v1/api-keys", Some(&admin), Some(body))
    };
    let [to_revoke, to_rotate, to_delete] = [
        ok("key", new_key("revoke").await),
        ok("key", new_key("rotate").await),
        ok("key", new_key("delete").await),
    ]
    .map(|made| made["key"]["id"].as_str().unwrap().to_owned());
    wait_for("acme's robot", WAIT, || async {
        let (s, _) = secure.send(Method::GET, "/api/v1/metrics/robots/acme-r", Some(&viewer), None).await;
        (s == 200).then_some(())
    })
    .await
    .unwrap();
    let robot_key = json!({"robot_id": "acme-r", "name": "rk"});
    let (status, made) =
        secure.send(Method::POST, "/api/v1/robot-api-keys", Some(&admin), Some(robot_key.clone())).await;
    let robot_key_id = ok("robot key", (status, made))["key"]["id"].as_str().unwrap().to_owned();
    let gone = json!({"robot_id": "acme-gone", "name": "g", "hostname": "h"});
    ok("register", secure.send(Method::POST, "/api/v1/robots/register", Some(&admin), Some(gone)).await);
    // An HTTP robot of each tenant with its robot key; acme's holds three jobs to report on.
    let http_robot = |key: String, id: &'static str| {
        let secure = &secure;
        async move {
            let body = json!({"robot_id": id, "name": id, "hostname": "h", "max_concurrent_jobs": 3});
            ok(
                "register",
                secure.send(Method::POST, "/api/v1/robots/register", Some(&key), Some(body)).await,
            );
            let body = json!({"robot_id": id, "name": "agent"});
            let made =
                ok("key", secure.send(Method::POST, "/api/v1/robot-api-keys", Some(&key), Some(body)).await);
            let robot_key = made["api_key"].as_str().unwrap().to_owned();
            let path = format!("/api/v1/robots/{id}/heartbeat");
            ok("heartbeat", secure.send(Method::POST, &path, Some(&robot_key), Some(json!({}))).await);
            robot_key
        }
    };
    let (http_key, beta_robot) =
        (http_robot(admin.clone(), "acme-http").await, http_robot(other.clone(), "beta-http").await);
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut targeted = workflow();
        targeted["target_robot_id"] = json!("acme-http");
        let id = ok("submit", submit(targeted).await)["job_id"].as_str().unwrap().to_owned();
        let claimed = wait_for("acme-http to claim its job", WAIT, || async {
            let (_, job) =
                secure.send(Method::POST, "/api/v1/jobs/claim", Some(&http_key), Some(json!({}))).await;
            (job["job_id"] == id.as_str()).then_some(())
        })
        .await;
        claimed.unwrap();
        held.push(id);
    }
    let [extended, failed, released] = [held[0].clone(), held[1].clone(), held[2].clone()];
    // Another tenant's own objects, so that its key has something to see.
    let (status, _) = secure.send(Method::POST, "/api/v1/workflows", Some(&other), Some(workflow())).await;
    assert_eq!(status, 200);

    // Ids that exist nowhere, of the same shapes.
    let no_job = fleet_schemas::JobId::new().to_string();
    let no_key = "0".repeat(32);
    let no_robot = "no-such-robot";
    let (v, o, a) = (Role::Viewer, Role::Operator, Role::Admin);
    let get = Method::GET;
    let post = Method::POST;
    let put = Method::PUT;
    let delete = Method::DELETE;
    // In the order their success paths run (each may depend on the ones before).
    let cases = vec![
        case(get.clone(), "/metrics", "/metrics", None, v),
        case(get.clone(), "/api/v1/openapi.json", "/api/v1/openapi.json", None, v),
        case(get.clone(), "/api/v1/metrics/jobs", "/api/v1/metrics/jobs", None, v).bad(
            "/api/v1/metrics/jobs?limit=0",
            None,
            "limit",
        ),
        case(get.clone(), "/api/v1/metrics/jobs/{job_id}", format!("/api/v1/metrics/jobs/{job}"), None, v)
            .owns(&job, &no_job),
        case(get.clone(), "/api/v1/jobs/{job_id}/logs", format!("/api/v1/jobs/{job}/logs"), None, v)
            .owns(&job, &no_job)
            .bad(format!("/api/v1/jobs/{job}/logs?limit=0"), None, "limit"),
        case(get.clone(), "/api/v1/metrics/robots", "/api/v1/metrics/robots", None, v).bad(
            "/api/v1/metrics/robots?status=sleepy",
            None,
            "status",
        ),
        case(get.clone(), "/api/v1/metrics/robots/{robot_id}", "/api/v1/metrics/robots/acme-r", None, v)
            .owns("acme-r", no_robot),
        case(get.clone(), "/api/v1/robots/{robot_id}/logs", "/api/v1/robots/acme-r/logs", None, v)
            .owns("acme-r", no_robot)
            .bad("/api/v1/robots/acme-r/logs?since=yesterday", None, "since"),
        case(get.clone(), "/api/v1/robots/{robot_id}/metrics", "/api/v1/robots/acme-r/metrics", None, v)
            .owns("acme-r", no_robot),
        case(get.clone(), "/api/v1/metrics/fleet", "/api/v1/metrics/fleet", None, v),
        case(get.clone(), "/api/v1/metrics/analytics", "/api/v1/metrics/analytics", None, v).bad(
            "/api/v1/metrics/analytics?days=0",
            None,
            "days",
        ),
        case(get.clone(), "/api/v1/metrics/activity", "/api/v1/metrics/activity", None, v).bad(
            "/api/v1/metrics/activity?since=soon",
            None,
            "since",
        ),
        case(get.clone(), "/api/v1/queues", "/api/v1/queues", None, v),
        case(get.clone(), "/api/v1/events", "/api/v1/events", None, v)
            .bad("/api/v1/events?since=latest", None, "since")
            .stream(),
        case(get.clone(), "/ws/monitoring/live-jobs", "/ws/monitoring/live-jobs", None, v).stream(),
        case(post.clone(), "/api/v1/workflows", "/api/v1/workflows", Some(workflow()), o).bad(
            "/api/v1/workflows",
            Some(json!({"workflow_json": {}})),
            "workflow_name",
        ),
        case(
            put.clone(),
            "/api/v1/secrets/{name}",
            "/api/v1/secrets/TOKEN",
            Some(json!({"value": "s3cret"})),
            o,
        )
        .bad("/api/v1/secrets/not-a-name", Some(json!({"value": "x"})), "name"),
        case(get.clone(), "/api/v1/secrets", "/api/v1/secrets", None, o),
        case(delete.clone(), "/api/v1/secrets/{name}", "/api/v1/secrets/TOKEN", None, o),
        case(post.clone(), "/api/v1/jobs/{job_id}/cancel", format!("/api/v1/jobs/{waiting}/cancel"), None, o)
            .owns(&waiting, &no_job),
        case(post.clone(), "/api/v1/jobs/{job_id}/retry", format!("/api/v1/jobs/{waiting}/retry"), None, o)
            .owns(&waiting, &no_job),
        case(post.clone(), "/api/v1/robots/{robot_id}/{action}", "/api/v1/robots/acme-r/pause", None, o)
            .owns("acme-r", no_robot)
            .bad("/api/v1/robots/acme-r/stop", Some(json!({"force": "yes"})), "force"),
        case(
            put.clone(),
            "/api/v1/robots/{robot_id}/status",
            "/api/v1/robots/acme-r/status",
            Some(json!({"status": "online"})),
            o,
        )
        .owns("acme-r", no_robot)
        .bad("/api/v1/robots/acme-r/status", Some(json!({"status": "sleepy"})), "status"),
        case(
            post.clone(),
            "/api/v1/robots/commands",
            "/api/v1/robots/commands",
            Some(json!({"command": "resume"})),
            o,
        )
        .bad("/api/v1/robots/commands", Some(json!({"command": "explode"})), "command"),
        case(get.clone(), "/api/v1/api-keys", "/api/v1/api-keys", None, a).bad(
            "/api/v1/api-keys?status=lost",
            None,
            "status",
        ),
        case(
            post.clone(),
            "/api/v1/api-keys",
            "/api/v1/api-keys",
            Some(json!({"name": "new", "role": "viewer"})),
            a,
        )
        .bad("/api/v1/api-keys", Some(json!({"name": "x", "role": "root"})), "role"),
        case(
            post.clone(),
            "/api/v1/api-keys/{key_id}/{action}",
            format!("/api/v1/api-keys/{to_revoke}/revoke"),
            Some(json!({"reason": "matrix"})),
            a,
        )
        .owns(&to_revoke, &no_key)
        .bad(format!("/api/v1/api-keys/{to_revoke}/revoke"), Some(json!({"reason": 5})), "reason"),
        case(
            post.clone(),
            "/api/v1/api-keys/{key_id}/{action}",
            format!("/api/v1/api-keys/{to_rotate}/rotate"),
            None,
            a,
        )
        .owns(&to_rotate, &no_key),
        case(delete.clone(), "/api/v1/api-keys/{key_id}", format!("/api/v1/api-keys/{to_delete}"), None, a)
            .owns(&to_delete, &no_key),
        case(get.clone(), "/api/v1/robot-api-keys", "/api/v1/robot-api-keys", None, a).bad(
            "/api/v1/robot-api-keys?limit=5000",
            None,
            "limit",
        ),
        case(post.clone(), "/api/v1/robot-api-keys", "/api/v1/robot-api-keys", Some(robot_key), a).bad(
            "/api/v1/robot-api-keys",
            Some(json!({"robot_id": "Not Ok", "name": "x"})),
            "robot_id",
        ),
        case(
            post.clone(),
            "/api/v1/robot-api-keys/{key_id}/{action}",
            format!("/api/v1/robot-api-keys/{robot_key_id}/revoke"),
            None,
            a,
        )
        .owns(&robot_key_id, &no_key),
        case(
            post.clone(),
            "/api/v1/robots/register",
            "/api/v1/robots/register",
            Some(json!({"robot_id": "acme-new", "name": "n", "hostname": "h", "capabilities": ["gpu"]})),
            a,
        )
        .bad("/api/v1/robots/register", Some(json!({"name": "x", "hostname": "h"})), "robot_id"),
        case(
            put.clone(),
            "/api/v1/robots/{robot_id}",
            "/api/v1/robots/acme-r",
            Some(json!({"name": "renamed"})),
            a,
        )
        .owns("acme-r", no_robot)
        .bad("/api/v1/robots/acme-r", Some(json!({"name": " "})), "name"),
        case(delete.clone(), "/api/v1/robots/{robot_id}", "/api/v1/robots/acme-gone", None, a)
            .owns("acme-gone", no_robot),
        case(
            post.clone(),
            "/api/v1/robots/{robot_id}/heartbeat",
            "/api/v1/robots/acme-http/heartbeat",
            Some(json!({"cpu_percent": null})),
            a,
        )
        .robot()
        .owns("acme-http", no_robot),
        case(post.clone(), "/api/v1/jobs/claim", "/api/v1/jobs/claim", Some(json!({"limit": 1})), a)
            .robot()
            .bad(
                "/api/v1/jobs/claim",
                Some(json!({"visibility_timeout_seconds": 1})),
                "visibility_timeout_seconds",
            ),
        case(
            post.clone(),
            "/api/v1/jobs/{job_id}/extend-lease",
            format!("/api/v1/jobs/{extended}/extend-lease"),
            Some(json!({"extension_seconds": 60})),
            a,
        )
        .robot()
        .owns(&extended, &no_job)
        .bad(
            format!("/api/v1/jobs/{extended}/extend-lease"),
            Some(json!({"extension_seconds": 0})),
            "extension_seconds",
        ),
        case(
            post.clone(),
            "/api/v1/jobs/{job_id}/complete",
            format!("/api/v1/jobs/{extended}/complete"),
            Some(json!({"result": {"executed_nodes": 1}})),
            a,
        )
        .robot()
        .owns(&extended, &no_job),
        case(
            post.clone(),
            "/api/v1/jobs/{job_id}/fail",
            format!("/api/v1/jobs/{failed}/fail"),
            Some(json!({"error_message": "matrix"})),
            a,
        )
        .robot()
        .owns(&failed, &no_job)
        .bad(
            format!("/api/v1/jobs/{failed}/fail"),
            Some(json!({"error_message": ""})),
            "error_message",
        ),
        case(
            post.clone(),
            "/api/v1/jobs/{job_id}/release",
            format!("/api/v1/jobs/{released}/release"),
            None,
            a,
        )
        .robot()
        .owns(&released, &no_job),
    ];
    // The matrix covers every route but /health (which needs no key).
    let covered: BTreeSet<(String, &str)> = cases.iter().map(|c| (c.method.to_string(), c.route)).collect();
    let routes: BTreeSet<(String, &str)> = fleet_gateway::routes::ROUTES
        .iter()
        .filter(|(_, route)| *route != "/health")
        .map(|(method, route)| (method.to_string(), *route))
        .collect();
    assert_eq!(covered, routes, "the matrix and the routes served differ");

    let made_up = format!("crpa_{}_{}", "1".repeat(32), "2".repeat(64));
    for c in &cases {
        let (method, path) = (&c.method, c.path.as_str());
        for key in [None, Some("nope"), Some(made_up.as_str())] {
            let (status, answer) = secure.send(method.clone(), path, key, c.body.clone()).await;
            assert_eq!(
                (status, answer["error"]["code"].as_str()),
                (401, Some("unauthorized")),
                "{method} {path} with {key:?}: {answer}"
            );
        }
        // A robot-facing route refuses every user key.
        for lower in Role::ALL.into_iter().filter(|r| *r != Role::Robot && (c.robot || *r < c.least)) {
            let (status, answer) =
                secure.send(method.clone(), path, Some(key_of(lower)), c.body.clone()).await;
            assert_eq!(status, 403, "{method} {path} as {lower}: {answer}");
        }
        // A robot key does only what a robot does: every other route is 403 for it (the live view
        // reads its key from `?token=` only, so a key in the headers is none to it).
        let robot_route = fleet_gateway::auth::ROBOT_ROUTES.contains(&(c.method.as_str(), c.route));
        if !robot_route && c.route != "/ws/monitoring/live-jobs" {
            let (status, answer) = secure.send(method.clone(), path, Some(&http_key), c.body.clone()).await;
            assert_eq!(status, 403, "{method} {path} with a robot key: {answer}");
        }
        if let Some((id, missing)) = &c.ids {
            let (theirs_key, own_key) = if c.robot { (&beta_robot, &http_key) } else { (&other, &admin) };
            let (status, theirs) = secure.send(method.clone(), path, Some(theirs_key), c.body.clone()).await;
            let nowhere = path.replace(id.as_str(), missing);
            let (missing_status, none) =
                secure.send(method.clone(), &nowhere, Some(own_key), c.body.clone()).await;
            assert_eq!(
                (status, &theirs["error"]),
                (404, &none["error"]),
                "{method} {path} from another tenant, and {nowhere} ({missing_status}): {theirs} vs {none}"
            );
        }
        if let Some((path, body, field)) = &c.bad {
            let key = if c.robot { &http_key } else { &admin };
            let (status, answer) = secure.send(method.clone(), path, Some(key), body.clone()).await;
            assert_eq!(
                (status, answer["error"]["field"].as_str()),
                (422, Some(*field)),
                "{method} {path}: {answer}"
            );
        }
    }
    // The success paths, with the least role allowed.
    for c in cases.iter().filter(|c| !c.stream) {
        let key = if c.robot { &http_key } else { key_of(c.least) };
        let (status, answer) = secure.send(c.method.clone(), &c.path, Some(key), c.body.clone()).await;
        assert_eq!(status, 200, "{} {} as {}: {answer}", c.method, c.path, c.least);
    }
    let (_, robots) = secure.send(Method::GET, "/api/v1/metrics/robots", Some(&viewer), None).await;
    let names: BTreeSet<&str> =
        robots.as_array().unwrap().iter().filter_map(|r| r["robot_id"].as_str()).collect();
    assert_eq!(names, BTreeSet::from(["acme-http", "acme-new", "acme-r"]), "registered and deleted");
    // The live streams: each tenant's events from the start are its own (acme's came first).
    assert_eq!(first_event(&secure, &viewer).await["tenant"], "acme");
    assert_eq!(first_event(&secure, &other).await["tenant"], "beta");
    // The Canvas's live view: a valid token is served (ping → pong), a wrong one closed with 4001.
    let mut socket = live_view(&secure, &viewer).await;
    socket.send(Message::text("ping")).await.unwrap();
    let pong = tokio::time::timeout(WAIT, async {
        while let Some(m) = socket.next().await {
            if let Message::Text(t) = m.unwrap()
                && t.as_str() == "pong"
            {
                return;
            }
        }
        panic!("the live view closed before answering the ping");
    })
    .await;
    assert!(pong.is_ok(), "no pong within {WAIT:?}");
    let mut socket = live_view(&secure, &made_up).await;
    let closed = tokio::time::timeout(WAIT, socket.next()).await.unwrap();
    assert!(
        matches!(closed, Some(Ok(Message::Close(Some(ref f)))) if u16::from(f.code) == 4001),
        "{closed:?}"
    );
    stack.stop().await;
}
