//! The router without a socket and without an orchestrator: everything the gateway decides on
//! its own (input checks, error shapes, auth, request ids, limits).

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use fleet_gateway::GatewayConfig;
use serde_json::{Value, json};

fn submission() -> Value {
    json!({"workflow_name": "Hello", "workflow_json": fleet_workflow()})
}

#[tokio::test]
async fn malformed_json_is_400() {
    let r = offline_router(dev_config()).await;
    let req = Request::post("/api/v1/workflows")
        .header("content-type", "application/json")
        .body(Body::from("{\"workflow_name\": "))
        .unwrap();
    let reply = send(&r, req).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error(), ("malformed_json".into(), None));
}

#[tokio::test]
async fn each_bad_field_is_422_naming_it() {
    let r = offline_router(dev_config()).await;
    let with = |k: &str, v: Value| {
        let mut b = submission();
        match v {
            Value::Null => {
                b.as_object_mut().unwrap().remove(k);
            }
            v => b[k] = v,
        }
        b
    };
    let cases = [
        (with("workflow_name", Value::Null), "workflow_name"),
        (with("workflow_json", Value::Null), "workflow_json"),
        (with("workflow_name", json!(7)), "workflow_name"),
        (with("workflow_name", json!("x".repeat(201))), "workflow_name"),
        (with("workflow_json", json!("not json at all")), "workflow_json"),
        (
            with("workflow_json", json!({"steps": [{"id": "a", "kind": "shell"}]})),
            "workflow_json.steps[0].argv",
        ),
        (
            with("workflow_json", json!({"steps": [{"id": "a", "kind": "teleport"}]}).to_string().into()),
            "workflow_json.steps[0].kind",
        ),
        (with("priority", json!(21)), "priority"),
        (with("priority", json!(2.5)), "priority"),
        (with("trigger_type", json!("scheduled")), "trigger_type"),
        (with("execution_mode", json!("moon")), "execution_mode"),
        (with("required_capabilities", json!(["gpu", "no spaces"])), "required_capabilities[1]"),
        (with("target_robot_id", json!("Robot_1")), "target_robot_id"),
        (with("metadata", json!({"robot_id": "has.dot"})), "metadata.robot_id"),
        (with("variables", json!("x")), "variables"),
        (with("timeout_s", json!(0)), "timeout_s"),
    ];
    for (body, field) in cases {
        let reply = send(&r, post_json("/api/v1/workflows", &body)).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {}", reply.body);
        assert_eq!(reply.error(), ("invalid".into(), Some(field.into())), "{body}");
    }
    let reply = send(&r, post_json("/api/v1/workflows", &with("trigger_type", json!("scheduled")))).await;
    assert!(reply.body["error"]["message"].as_str().unwrap().contains("not supported yet"));

    for (uri, field) in [
        ("/api/v1/metrics/jobs?limit=0", "limit"),
        ("/api/v1/metrics/jobs?limit=501", "limit"),
        ("/api/v1/metrics/jobs?status=exploded", "status"),
        ("/api/v1/metrics/robots?status=sleepy", "status"),
    ] {
        let reply = send(&r, get(uri)).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{uri}");
        assert_eq!(reply.error(), ("invalid".into(), Some(field.into())), "{uri}");
    }
}

#[tokio::test]
async fn idempotency_key_is_checked() {
    let r = offline_router(dev_config()).await;
    let mut req = post_json("/api/v1/workflows", &submission());
    req.headers_mut().insert("idempotency-key", "k".repeat(256).parse().unwrap());
    let reply = send(&r, req).await;
    assert_eq!(reply.error(), ("invalid".into(), Some("Idempotency-Key".into())));
}

#[tokio::test]
async fn body_over_the_limit_is_413() {
    let r = offline_router(dev_config()).await;
    let limit = GatewayConfig::default().body_limit_bytes;
    let mut big = submission();
    big["padding"] = json!("x".repeat(limit));
    let reply = send(&r, post_json("/api/v1/workflows", &big)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.error().0, "payload_too_large");

    // Also when the client streams the body without announcing its length.
    let r = offline_router(GatewayConfig { body_limit_bytes: 64, ..dev_config() }).await;
    let chunks: Vec<Result<_, std::io::Error>> = vec![Ok(vec![b' '; 50]), Ok(vec![b' '; 50])];
    let req = Request::post("/api/v1/workflows")
        .header("content-type", "application/json")
        .body(Body::from_stream(futures::stream::iter(chunks)))
        .unwrap();
    let reply = send(&r, req).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.error().0, "payload_too_large");
}

#[tokio::test]
async fn unknown_route_and_wrong_method_are_json() {
    let r = offline_router(dev_config()).await;
    let reply = send(&r, get("/api/v1/nothing-here")).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error().0, "not_found");

    let reply = send(&r, get("/api/v1/workflows")).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.error().0, "method_not_allowed");
    assert_eq!(reply.header("allow"), Some("POST"));

    let req = Request::delete("/health").body(Body::empty()).unwrap();
    let reply = send(&r, req).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.error().0, "method_not_allowed");
}

#[tokio::test]
async fn ids_that_are_not_ids_are_404() {
    let r = offline_router(dev_config()).await;
    for uri in ["/api/v1/metrics/jobs/not-a-uuid", "/api/v1/metrics/robots/Not_A_Robot"] {
        let reply = send(&r, get(uri)).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(reply.error(), ("not_found".into(), None));
    }
    let req = Request::post("/api/v1/jobs/12345/cancel").body(Body::empty()).unwrap();
    assert_eq!(send(&r, req).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn without_dev_mode_everything_but_health_is_401() {
    let r = offline_router(GatewayConfig::default()).await;
    for req in [
        post_json("/api/v1/workflows", &submission()),
        get("/api/v1/metrics/jobs"),
        get("/api/v1/metrics/fleet"),
        get("/api/v1/anything"),
        Request::get("/api/v1/metrics/robots")
            .header("authorization", "Bearer some-key")
            .header("x-api-key", "some-key")
            .body(Body::empty())
            .unwrap(),
    ] {
        let reply = send(&r, req).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        assert_eq!(reply.error(), ("unauthorized".into(), None));
        assert!(reply.body["error"]["message"].as_str().unwrap().contains("API key"), "{}", reply.body);
    }
    // Health needs no key; it is 503 here only because NATS is not up.
    let reply = send(&r, get("/health")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn every_response_has_a_request_id() {
    let r = offline_router(dev_config()).await;
    let reply = send(&r, get("/health")).await;
    let id = reply.header("x-request-id").expect("header");
    assert!(id.parse::<uuid::Uuid>().is_ok(), "{id}");

    // A UUID from the client is honoured, anything else replaced.
    let mine = uuid::Uuid::new_v4().to_string();
    let req = Request::get("/nope").header("x-request-id", &mine).body(Body::empty()).unwrap();
    let reply = send(&r, req).await;
    assert_eq!(reply.header("x-request-id"), Some(mine.as_str()));
    assert_eq!(reply.body["request_id"], mine.as_str());
    let req = Request::get("/nope").header("x-request-id", "hello; DROP TABLE").body(Body::empty()).unwrap();
    let reply = send(&r, req).await;
    assert_ne!(reply.header("x-request-id"), Some("hello; DROP TABLE"));
    assert!(reply.header("x-request-id").unwrap().parse::<uuid::Uuid>().is_ok());
}

#[tokio::test]
async fn health_says_nats_is_down() {
    let r = offline_router(dev_config()).await;
    let reply = send(&r, get("/health")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.body["status"], "unhealthy");
    assert_eq!(reply.body["service"], "fleet-gateway");
    assert_eq!(reply.body["nats"], "disconnected");
    assert_eq!(reply.body["orchestrator"], "unknown");
    assert_eq!(reply.body["leader"], false);
    assert!(reply.body["timestamp"].as_str().is_some());
}

#[tokio::test]
async fn post_without_body_or_content_type_is_accepted() {
    // The Canvas posts cancel with no body and no Content-Type: the request must get past every
    // check and reach the orchestrator, which is down here, hence a retryable 503 (never 415).
    let r = offline_router(dev_config()).await;
    let req =
        Request::post(format!("/api/v1/jobs/{}/cancel", uuid::Uuid::now_v7())).body(Body::empty()).unwrap();
    let reply = send(&r, req).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.body);
    assert_eq!(reply.error().0, "unavailable");
    assert_eq!(reply.header("retry-after"), Some("1"));
}

#[tokio::test]
async fn content_type_rules_for_the_submission() {
    let r = offline_router(dev_config()).await;
    // No Content-Type: taken as JSON (gets as far as the orchestrator, down here).
    let req = Request::post("/api/v1/workflows")
        .body(Body::from(serde_json::to_vec(&submission()).unwrap()))
        .unwrap();
    assert_eq!(send(&r, req).await.status, StatusCode::SERVICE_UNAVAILABLE);
    // Explicitly something else: 415 in the JSON shape.
    let req = Request::post("/api/v1/workflows")
        .header("content-type", "text/plain")
        .body(Body::from(serde_json::to_vec(&submission()).unwrap()))
        .unwrap();
    let reply = send(&r, req).await;
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(reply.error().0, "unsupported_media_type");
    // Empty body on a route that needs one: 400, not 415.
    let req = Request::post("/api/v1/workflows").body(Body::empty()).unwrap();
    let reply = send(&r, req).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error().0, "malformed_json");
}
