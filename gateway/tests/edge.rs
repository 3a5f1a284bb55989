//! What the gateway decides on its own, without an orchestrator: rate limits, the OpenAPI
//! document against the routes served, `/metrics`, and refusing unknown fields on Fleet's own
//! bodies.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use fleet_gateway::GatewayConfig;
use fleet_gateway::config::RateLimit;
use serde_json::json;

fn with_key(uri: &str, key: &str) -> Request<Body> {
    Request::get(uri).header("x-api-key", key).body(Body::empty()).unwrap()
}

/// Requests without a valid key are charged to their peer (here, without a socket, all requests
/// are one peer), whatever key string they carry; buckets of valid keys are tested end to end in
/// `tests/tests/rate_limits.rs`.
#[tokio::test]
async fn rate_limit_answers_429_then_recovers() {
    // 2 requests per 400 ms, both at once: the third is refused, and one is free again 200 ms on.
    let rate = RateLimit { requests: 2, per: Duration::from_millis(400), burst: 2 };
    let router = offline_router(GatewayConfig { rate_limit: Some(rate), ..dev_config() }).await;
    assert_ne!(
        send(&router, with_key("/api/v1/metrics/jobs", "key-a")).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_ne!(send(&router, get("/api/v1/metrics/jobs")).await.status, StatusCode::TOO_MANY_REQUESTS);
    let r = send(&router, with_key("/api/v1/metrics/jobs", "key-b")).await;
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "a key that is not valid does not get a bucket of its own"
    );
    assert_eq!(r.error().0, "rate_limited");
    let retry_after: u64 = r.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&retry_after));
    assert_eq!(send(&router, get("/api/v1/metrics/jobs")).await.status, StatusCode::TOO_MANY_REQUESTS);

    // /health is never limited.
    for _ in 0..5 {
        assert_ne!(send(&router, get("/health")).await.status, StatusCode::TOO_MANY_REQUESTS);
    }

    // Recovery, within a bounded wait.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let r = send(&router, with_key("/api/v1/metrics/jobs", "key-a")).await;
        if r.status != StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        assert!(Instant::now() < deadline, "the limit did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Off: no limit at all for requests without a key of their own limit.
    let router = offline_router(GatewayConfig { rate_limit: None, ..dev_config() }).await;
    for _ in 0..50 {
        assert_ne!(send(&router, get("/api/v1/metrics/jobs")).await.status, StatusCode::TOO_MANY_REQUESTS);
    }
}

#[tokio::test]
async fn openapi_lists_every_route_served() {
    let router = offline_router(dev_config()).await;
    let r = send(&router, get("/api/v1/openapi.json")).await;
    assert_eq!(r.status, StatusCode::OK);
    let doc = &r.body;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{}", doc["openapi"]);
    assert!(doc["info"]["title"].is_string());
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                documented.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    let listed: BTreeSet<(String, String)> =
        fleet_gateway::routes::ROUTES.iter().map(|(m, p)| ((*m).to_owned(), (*p).to_owned())).collect();
    assert_eq!(documented, listed, "the document and the route list differ");
    // Schemas referenced by the document exist.
    let text = doc.to_string();
    for name in ["ErrorBody", "Job", "Robot", "SubmitBody", "LogLine"] {
        assert!(doc["components"]["schemas"][name].is_object(), "schema {name} missing");
    }
    assert!(!text.contains("#/components/schemas/\""));
    // Every `$ref` resolves (a path word's enum, named by no body, once pointed nowhere).
    fn refs<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(|r| r.as_str()) {
                    out.push(r);
                }
                m.values().for_each(|v| refs(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    refs(doc, &mut found);
    for r in found {
        let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("{r} is not local"));
        assert!(doc.pointer(pointer).is_some(), "{r} points nowhere");
    }
    // What the edge answers on its own is documented wherever it can happen (schemathesis found
    // 401, 400 and 413 undocumented on every route).
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let has = |status: &str| op["responses"].get(status).is_some();
            let mut expected = Vec::new();
            if op.get("security").is_some() {
                expected.extend(["401", "429", "503"]);
            }
            if op.get("requestBody").is_some() {
                expected.extend(["400", "413"]);
            }
            for status in expected {
                assert!(has(status), "{method} {path} does not document {status}");
            }
            // `?limit=` means no limit given, as the document says (schemathesis found `limit=`
            // accepted against an integer schema).
            for p in op["parameters"].as_array().into_iter().flatten().filter(|p| p["in"] == "query") {
                assert_eq!(p["allowEmptyValue"], true, "{method} {path} {}", p["name"]);
            }
        }
    }

    // Every listed route is served: the router does not answer "no such endpoint" or 405.
    for (method, path) in fleet_gateway::routes::ROUTES {
        let concrete = path
            .replace("{job_id}", "0190f1d2-7a3b-7c4d-8e5f-6a7b8c9d0e1f")
            .replace("{robot_id}", "r1")
            .replace("{action}", "pause");
        let req = Request::builder().method(*method).uri(&concrete).body(Body::empty()).unwrap();
        let r = send(&router, req).await;
        assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert!(
            !(r.status == StatusCode::NOT_FOUND && r.body["error"]["message"] == "no such endpoint"),
            "{method} {path} is not served"
        );
    }
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let router = offline_router(dev_config()).await;
    send(&router, get("/api/v1/metrics/jobs/0190f1d2-7a3b-7c4d-8e5f-6a7b8c9d0e1f")).await;
    send(&router, get("/nope")).await;
    let r = send(&router, get("/metrics")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let text = String::from_utf8(r.raw).unwrap();
    assert!(
        text.contains(
            "fleet_gateway_requests_total{route=\"/api/v1/metrics/jobs/{job_id}\",method=\"GET\",status=\"503\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("route=\"unmatched\",method=\"GET\",status=\"404\"} 1"), "{text}");
    assert!(text.contains("fleet_gateway_request_duration_seconds_bucket{route=\"/api/v1/metrics/jobs/{job_id}\",method=\"GET\",le=\"+Inf\"} 1"));
    assert!(text.contains("fleet_gateway_requests_in_flight 1"), "the /metrics request itself");
    assert!(text.contains("fleet_gateway_nats_connected 0"));
    // Like everything but /health, it needs a key.
    let router = offline_router(GatewayConfig::default()).await;
    assert_eq!(send(&router, get("/metrics")).await.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn unknown_fields_on_fleets_own_bodies_are_422() {
    let router = offline_router(dev_config()).await;
    let r =
        send(&router, post_json("/api/v1/robots/commands", &json!({"command": "pause", "colour": "red"})))
            .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body["error"]["message"].as_str().unwrap().contains("colour"));
    let req = Request::put("/api/v1/robots/r1/status")
        .header("content-type", "application/json")
        .body(Body::from(json!({"status": "maintenance", "why": 1}).to_string()))
        .unwrap();
    assert_eq!(send(&router, req).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = send(&router, post_json("/api/v1/robots/r1/stop", &json!({"force": true, "now": true}))).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
}
