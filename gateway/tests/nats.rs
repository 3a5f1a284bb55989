//! The translation to NATS requests, against a real nats-server and a fake orchestrator that
//! answers canned `ApiResult`s: the envelope sent, the status mapping, and the answer shapes.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use fleet_gateway::{AppState, GatewayConfig};
use fleet_schemas::api::{
    ApiError, ApiRequest, ApiResult, Cancelled, Empty, Endpoint, FleetSummary, GetById, JobStatus, JobView,
    ListJobs, ListRobots, Pong, RobotStatus, RobotView, SubmitJob, Submitted,
};
use fleet_schemas::codec::{decode, encode};
use fleet_schemas::{JobId, RobotId, TenantId};
use fleet_testkit::NatsServer;
use serde_json::{Value, json};
use time::OffsetDateTime;

/// A gateway router on a real NATS connection, and the fake orchestrator behind it.
async fn setup(config: GatewayConfig, answer: Answer) -> (NatsServer, axum::Router, FakeOrchestrator) {
    let nats = NatsServer::start().await.expect("nats-server starts");
    let fake = FakeOrchestrator::start(nats.client().await.expect("connect to nats-server"), answer).await;
    let config =
        GatewayConfig { nats_url: nats.url(), nats_credentials: nats.gateway_credentials(), ..config };
    let router =
        fleet_gateway::router(AppState::new(config, nats.client().await.expect("connect to nats-server")));
    (nats, router, fake)
}

fn ok<T: serde::Serialize>(v: T) -> Option<Vec<u8>> {
    Some(encode(&ApiResult::<T>::Ok(v)))
}

fn err(e: ApiError) -> Option<Vec<u8>> {
    Some(encode(&ApiResult::<Empty>::Err(e)))
}

fn job_view(id: JobId) -> JobView {
    JobView {
        job_id: id,
        workflow_id: "hello".into(),
        workflow_name: "Hello".into(),
        status: JobStatus::Pending,
        robot_id: None,
        robot_name: None,
        attempt: 0,
        priority: 10,
        required_capabilities: vec![],
        progress: 0,
        current_node: None,
        created_at: OffsetDateTime::UNIX_EPOCH,
        claimed_at: None,
        started_at: None,
        completed_at: None,
        duration_ms: None,
        output: None,
        error_message: None,
        error_type: None,
        waiting_reason: Some("no online robot".into()),
        retry_count: 0,
        target_robot_id: None,
        trigger_type: "manual".into(),
        execution_mode: "lan".into(),
        request_id: None,
    }
}

fn robot_view(id: &str) -> RobotView {
    RobotView {
        robot_id: id.into(),
        name: id.into(),
        hostname: "host".into(),
        status: RobotStatus::Busy,
        state: "online".into(),
        desired_state: "online".into(),
        environment: "default".into(),
        capabilities: vec!["shell".into()],
        offered_capabilities: vec![],
        granted_capabilities: None,
        tags: vec![],
        max_concurrent_jobs: 2,
        current_job_ids: vec!["j1".into()],
        current_job: Some("j1".into()),
        cpu_percent: None,
        memory_mb: Some(512.0),
        last_heartbeat: None,
        last_seen: Some(OffsetDateTime::UNIX_EPOCH),
        created_at: OffsetDateTime::UNIX_EPOCH,
        version: None,
    }
}

const SUBMITTED_KEYS: [&str; 7] =
    ["workflow_id", "job_id", "schedule_id", "status", "message", "created_at", "waiting_reason"];

#[tokio::test]
async fn submit_sends_the_envelope_and_answers_the_canvas_shape() {
    let job_id = JobId::new();
    let answer: Answer = Box::new(move |endpoint, payload| {
        assert_eq!(endpoint, Endpoint::SubmitJob);
        let req: ApiRequest<SubmitJob> = decode("submit", payload).unwrap();
        let status = if req.body.target_robot_id.is_some() { JobStatus::Pending } else { JobStatus::Queued };
        ok(Submitted {
            job_id,
            workflow_id: "hello".into(),
            status,
            waiting_reason: (status == JobStatus::Pending).then(|| "target robot r7 is offline".into()),
            created_at: OffsetDateTime::UNIX_EPOCH,
        })
    });
    let (_nats, router, mut fake) = setup(dev_config(), answer).await;

    let body = json!({
        "workflow_name": "Hello",
        "workflow_json": fleet_workflow().to_string(),
        "priority": 15,
        "metadata": {"robot_id": "r7", "variables": {"a": 1}, "submitted_from": "canvas"},
        "variables": {"b": 2},
        "required_capabilities": ["browser"],
        "extra_canvas_field": [1, 2, 3]
    });
    let mut req = post_json("/api/v1/workflows", &body);
    req.headers_mut().insert("idempotency-key", "key-1".parse().unwrap());
    let before_ms = OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let reply = send(&router, req).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let mut keys: Vec<&str> = reply.body.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut expected = SUBMITTED_KEYS.to_vec();
    expected.sort_unstable();
    assert_eq!(keys, expected, "exactly the submit answer's keys");
    assert_eq!(reply.body["job_id"], job_id.to_string());
    assert_eq!(reply.body["workflow_id"], "hello");
    assert_eq!(reply.body["schedule_id"], Value::Null);
    assert_eq!(reply.body["status"], "pending");
    assert_eq!(reply.body["message"], "Job pending: target robot r7 is offline");
    assert_eq!(reply.body["created_at"], "1970-01-01T00:00:00Z");
    assert_eq!(reply.body["waiting_reason"], "target robot r7 is offline");

    let (_, payload) = fake.next_request().await;
    let req: ApiRequest<SubmitJob> = decode("submit", &payload).unwrap();
    assert_eq!(req.v, 1);
    assert_eq!(req.tenant, TenantId::default_tenant());
    assert_eq!(req.request_id.to_string(), reply.header("x-request-id").unwrap());
    let timeout_ms = 10_000;
    assert!(
        req.deadline_unix_ms >= before_ms + timeout_ms - 1000
            && req.deadline_unix_ms <= before_ms + timeout_ms + 5000,
        "deadline is now + request_timeout"
    );
    let job = req.body;
    assert_eq!(job.workflow, fleet_workflow());
    assert_eq!(job.priority, 15);
    assert_eq!(job.target_robot_id, Some(RobotId::new("r7").unwrap()));
    assert_eq!(Value::Object(job.variables), json!({"a": 1, "b": 2}));
    assert_eq!(job.required_capabilities, ["browser"]);
    assert_eq!(job.idempotency_key.as_deref(), Some("key-1"));
    assert_eq!(job.metadata["submitted_from"], "canvas");

    // Without a target the fake admits it at once.
    let body = json!({"workflow_name": "Hello", "workflow_json": fleet_workflow()});
    let reply = send(&router, post_json("/api/v1/workflows", &body)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        (reply.body["status"].as_str(), reply.body["message"].as_str()),
        (Some("queued"), Some("Job queued"))
    );
    assert_eq!(reply.body["waiting_reason"], Value::Null);
}

#[tokio::test]
async fn orchestrator_errors_map_to_statuses() {
    let answer: Answer = Box::new(|endpoint, _| match endpoint {
        Endpoint::GetJob => err(ApiError::NotFound { what: "job".into() }),
        Endpoint::FleetSummary => {
            err(ApiError::Unavailable { message: "database down".into(), retry_after_s: 7 })
        }
        Endpoint::SubmitJob => {
            err(ApiError::Invalid { field: "target_robot_id".into(), message: "no such robot".into() })
        }
        Endpoint::CancelJob => err(ApiError::Conflict { message: "job already completed".into() }),
        Endpoint::ListJobs => {
            err(ApiError::Internal { message: "connection pool exhausted at db.internal:5432".into() })
        }
        _ => None,
    });
    let (_nats, router, _fake) = setup(dev_config(), answer).await;

    let reply = send(&router, get(&format!("/api/v1/metrics/jobs/{}", JobId::new()))).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error(), ("not_found".into(), None));

    let reply = send(&router, get("/api/v1/metrics/fleet")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.error().0, "unavailable");
    assert_eq!(reply.header("retry-after"), Some("7"));

    let body = json!({"workflow_name": "Hello", "workflow_json": fleet_workflow()});
    let reply = send(&router, post_json("/api/v1/workflows", &body)).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reply.error(), ("invalid".into(), Some("target_robot_id".into())));

    let req = Request::post(format!("/api/v1/jobs/{}/cancel", JobId::new())).body(Body::empty()).unwrap();
    let reply = send(&router, req).await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
    assert_eq!(reply.error().0, "conflict");

    let reply = send(&router, get("/api/v1/metrics/jobs")).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.error().0, "internal");
    assert!(!String::from_utf8_lossy(&reply.raw).contains("db.internal"), "internals stay in the log");
}

#[tokio::test]
async fn no_orchestrator_is_a_retryable_503() {
    let nats = NatsServer::start().await.expect("nats-server starts");
    let config =
        GatewayConfig { nats_url: nats.url(), nats_credentials: nats.gateway_credentials(), ..dev_config() };
    let router =
        fleet_gateway::router(AppState::new(config, nats.client().await.expect("connect to nats-server")));
    let body = json!({"workflow_name": "Hello", "workflow_json": fleet_workflow()});
    for req in [post_json("/api/v1/workflows", &body), get("/api/v1/metrics/robots")] {
        let reply = send(&router, req).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.error().0, "unavailable");
        assert_eq!(reply.header("retry-after"), Some("1"));
        assert_eq!(reply.body["error"]["message"], "no orchestrator is running");
    }
    let reply = send(&router, get("/health")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.body["nats"], "connected");
    assert_eq!(reply.body["orchestrator"], "unreachable");
}

#[tokio::test]
async fn lost_answers_unknown_outcome_for_submit_503_for_reads() {
    // Regression guard for DESIGN.md invariant 1: a submit whose outcome is unknown must never be
    // answered with a status the Canvas retries blindly (it retries 429/502/503/504).
    let answer: Answer = Box::new(|endpoint, _| match endpoint {
        Endpoint::CancelJob => Some(b"\xc1 not msgpack".to_vec()),
        Endpoint::FleetSummary => Some(b"\xc1 not msgpack".to_vec()),
        _ => None, // never answers
    });
    let config = GatewayConfig { request_timeout: Duration::from_millis(50), ..dev_config() };
    let (_nats, router, _fake) = setup(config, answer).await;

    let body = json!({"workflow_name": "Hello", "workflow_json": fleet_workflow()});
    let (submit, read) = tokio::join!(
        send(&router, post_json("/api/v1/workflows", &body)),
        send(&router, get(&format!("/api/v1/metrics/jobs/{}", JobId::new())))
    );
    assert_eq!(submit.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(submit.error().0, "outcome_unknown");
    let id = submit.header("x-request-id").unwrap();
    assert!(submit.body["error"]["message"].as_str().unwrap().contains(id), "names the request id");
    assert!(submit.header("retry-after").is_none());

    assert_eq!(read.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(read.error().0, "unavailable");

    // An answer that does not decode: 502 for a read or a cancel (both safe to repeat).
    let reply = send(&router, get("/api/v1/metrics/fleet")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.error().0, "bad_gateway");
    let req = Request::post(format!("/api/v1/jobs/{}/cancel", JobId::new())).body(Body::empty()).unwrap();
    let reply = send(&router, req).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn reads_answer_views_and_bare_arrays() {
    let job = JobId::new();
    let answer: Answer = Box::new(move |endpoint, payload| match endpoint {
        Endpoint::ListJobs => {
            let req: ApiRequest<ListJobs> = decode("list", payload).unwrap();
            assert_eq!(req.body.status, Some(JobStatus::Running));
            assert_eq!(req.body.limit, 5);
            assert_eq!(req.body.workflow_id.as_deref(), Some("hello"));
            ok(vec![job_view(job), job_view(JobId::new())])
        }
        Endpoint::GetJob => {
            let req: ApiRequest<GetById<JobId>> = decode("get", payload).unwrap();
            ok(job_view(req.body.id))
        }
        Endpoint::ListRobots => {
            let req: ApiRequest<ListRobots> = decode("robots", payload).unwrap();
            assert_eq!(req.body.status, Some(RobotStatus::Online), "idle means online");
            ok(vec![robot_view("r1")])
        }
        Endpoint::GetRobot => {
            let req: ApiRequest<GetById<RobotId>> = decode("robot", payload).unwrap();
            ok(robot_view(req.body.id.as_str()))
        }
        Endpoint::FleetSummary => ok(FleetSummary {
            total_robots: 3,
            active_robots: 2,
            idle_robots: 1,
            busy_robots: 1,
            offline_robots: 1,
            maintenance_robots: 0,
            active_jobs: 1,
            queue_depth: 4,
            total_jobs_today: 9,
            average_job_duration_seconds: 1.5,
            jobs_by_status: [("queued".to_owned(), 4)].into(),
        }),
        Endpoint::CancelJob => {
            let req: ApiRequest<GetById<JobId>> = decode("cancel", payload).unwrap();
            ok(Cancelled {
                job_id: req.body.id,
                cancelled: true,
                previous_status: JobStatus::Queued,
                message: "Job cancelled".into(),
            })
        }
        _ => None,
    });
    let (_nats, router, _fake) = setup(dev_config(), answer).await;

    let reply = send(&router, get("/api/v1/metrics/jobs?status=running&limit=5&workflow_id=hello")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let list = reply.body.as_array().expect("a bare array");
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["job_id"], job.to_string());

    let reply = send(&router, get(&format!("/api/v1/metrics/jobs/{job}"))).await;
    assert_eq!(reply.status, StatusCode::OK);
    let view = reply.body.as_object().unwrap();
    for key in [
        "job_id",
        "workflow_id",
        "workflow_name",
        "robot_id",
        "robot_name",
        "status",
        "progress",
        "current_node",
        "created_at",
        "claimed_at",
        "started_at",
        "completed_at",
        "duration_ms",
        "error_message",
        "error_type",
        "retry_count",
        "waiting_reason",
    ] {
        assert!(view.contains_key(key), "{key} is always present");
    }
    assert_eq!(view["robot_id"], Value::Null);
    assert_eq!(view["node_executions"], json!([]));
    assert_eq!(view["created_at"], "1970-01-01T00:00:00Z");

    let reply = send(&router, get("/api/v1/metrics/robots?status=idle")).await;
    assert_eq!(reply.status, StatusCode::OK);
    let robots = reply.body.as_array().expect("a bare array");
    assert_eq!(robots[0]["robot_id"], "r1");
    assert_eq!(robots[0]["current_jobs"], 1);
    assert_eq!(robots[0]["current_job_id"], "j1");

    let reply = send(&router, get("/api/v1/metrics/robots/r2")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["robot_id"], "r2");
    assert_eq!(reply.body["jobs_completed_today"], 0);
    assert_eq!(reply.body["jobs_failed_today"], 0);
    assert_eq!(reply.body["average_job_duration_seconds"], Value::Null);
    assert_eq!(reply.body["memory_percent"], Value::Null);
    assert_eq!(reply.body["last_seen"], "1970-01-01T00:00:00Z");

    let reply = send(&router, get("/api/v1/metrics/fleet")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["queue_depth"], 4);
    assert_eq!(reply.body["total_robots"], 3);

    let req = Request::post(format!("/api/v1/jobs/{job}/cancel")).body(Body::empty()).unwrap();
    let reply = send(&router, req).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.body,
        json!({"job_id": job.to_string(), "cancelled": true,
        "previous_status": "queued", "message": "Job cancelled"})
    );
}

#[tokio::test]
async fn health_is_200_when_an_orchestrator_answers() {
    let answer: Answer = Box::new(|endpoint, _| match endpoint {
        Endpoint::Ping => ok(Pong { leader: true, version: "test".into() }),
        _ => None,
    });
    let (_nats, router, _fake) = setup(GatewayConfig::default(), answer).await;
    // No key and not in dev mode: health needs none.
    let reply = send(&router, get("/health")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["status"], "healthy");
    assert_eq!(reply.body["service"], "fleet-gateway");
    assert_eq!(reply.body["nats"], "connected");
    assert_eq!(reply.body["orchestrator"], "reachable");
    assert_eq!(reply.body["leader"], true);
    let ts = reply.body["timestamp"].as_str().unwrap();
    assert!(OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).is_ok(), "{ts}");
}

#[tokio::test]
async fn run_serves_on_a_socket_and_shuts_down() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let nats = NatsServer::start().await.expect("nats-server starts");
    let answer: Answer = Box::new(|endpoint, _| match endpoint {
        Endpoint::Ping => ok(Pong { leader: false, version: "test".into() }),
        _ => None,
    });
    let _fake = FakeOrchestrator::start(nats.client().await.expect("connect to nats-server"), answer).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let config = GatewayConfig {
        nats_url: nats.url(),
        nats_credentials: nats.gateway_credentials(),
        ..GatewayConfig::default()
    };
    let server = tokio::spawn(fleet_gateway::run(config, listener, shutdown.clone()));

    // The gateway connects to NATS in the background; health turns 200 once it has.
    let deadline = tokio::time::Instant::now() + WAIT;
    let response = loop {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut response = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut response)).await.unwrap().unwrap();
        if response.starts_with("HTTP/1.1 200") || tokio::time::Instant::now() > deadline {
            break response;
        }
        tokio::task::yield_now().await;
    };
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.to_ascii_lowercase().contains("x-request-id:"));
    assert!(response.contains("\"leader\":false"));

    shutdown.cancel();
    let result = tokio::time::timeout(WAIT, server).await.expect("run returns after shutdown").unwrap();
    assert!(result.is_ok(), "{result:?}");
}
