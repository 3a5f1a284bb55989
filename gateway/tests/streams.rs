//! The live streams and the log endpoints against a real nats-server with JetStream: events over
//! SSE and WebSocket with resume, the Canvas live view, and job and robot logs from
//! `FLEET_LOGS`. A fake orchestrator answers the lookups.

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use fleet_gateway::{AppState, GatewayConfig};
use fleet_schemas::api::{
    ApiError, ApiResult, Empty, Endpoint, FleetSummary, JobStatus, JobView, RobotStatus, RobotView,
};
use fleet_schemas::codec::encode;
use fleet_schemas::event::Event;
use fleet_schemas::robot::LogLine;
use fleet_schemas::{JobId, RobotId, TenantId, subjects};
use fleet_testkit::NatsServer;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

struct Env {
    nats: NatsServer,
    js: jetstream::Context,
    _fake: FakeOrchestrator,
}

/// A nats-server with the events and logs streams, and a fake orchestrator that knows job
/// `known_job` and robot `r1`.
async fn env(known_job: JobId) -> Env {
    let nats = NatsServer::start().await.expect("nats-server starts");
    let js = jetstream::new(nats.client().await.expect("connect"));
    for (name, subject) in [
        (subjects::EVENTS_STREAM, subjects::EVENTS_SUBJECTS),
        (subjects::LOGS_STREAM, subjects::LOGS_SUBJECTS),
    ] {
        js.create_stream(stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            ..Default::default()
        })
        .await
        .expect("create stream");
    }
    let answer: Answer = Box::new(move |endpoint, payload| {
        use fleet_schemas::api::{ApiRequest, GetById};
        use fleet_schemas::codec::decode;
        let job = || decode::<ApiRequest<GetById<JobId>>>("get job", payload).expect("envelope").body.id;
        let robot =
            || decode::<ApiRequest<GetById<RobotId>>>("get robot", payload).expect("envelope").body.id;
        Some(match endpoint {
            Endpoint::GetJob if job() == known_job => encode(&ApiResult::Ok(job_view(known_job))),
            Endpoint::GetRobot if robot().as_str() == "r1" => encode(&ApiResult::Ok(robot_view("r1"))),
            Endpoint::GetJob => encode(&ApiResult::<Empty>::Err(ApiError::NotFound { what: "job".into() })),
            Endpoint::GetRobot => {
                encode(&ApiResult::<Empty>::Err(ApiError::NotFound { what: "robot".into() }))
            }
            Endpoint::FleetSummary => encode(&ApiResult::Ok(summary())),
            _ => return None,
        })
    });
    let fake = FakeOrchestrator::start(nats.client().await.expect("connect"), answer).await;
    Env { nats, js, _fake: fake }
}

fn summary() -> FleetSummary {
    FleetSummary {
        total_robots: 1,
        active_robots: 1,
        idle_robots: 0,
        busy_robots: 1,
        offline_robots: 0,
        maintenance_robots: 0,
        active_jobs: 1,
        queue_depth: 3,
        total_jobs_today: 9,
        average_job_duration_seconds: 1.5,
        jobs_by_status: [("completed".to_owned(), 4), ("failed".to_owned(), 1)].into_iter().collect(),
    }
}

fn job_view(id: JobId) -> JobView {
    JobView {
        job_id: id,
        workflow_id: "w".into(),
        workflow_name: "W".into(),
        status: JobStatus::Running,
        robot_id: Some("r1".into()),
        robot_name: None,
        attempt: 1,
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
        waiting_reason: None,
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
        cpu_percent: Some(12.5),
        memory_mb: Some(512.0),
        last_heartbeat: Some(OffsetDateTime::UNIX_EPOCH),
        last_seen: Some(OffsetDateTime::UNIX_EPOCH),
        created_at: OffsetDateTime::UNIX_EPOCH,
        version: None,
    }
}

fn event(id: i64, kind: &str, job: &str, data: Value) -> Event {
    Event {
        v: 1,
        id,
        kind: kind.into(),
        tenant: TenantId::default_tenant(),
        occurred_at: OffsetDateTime::now_utc(),
        job_id: Some(job.into()),
        robot_id: Some("r1".into()),
        seq: Some(1),
        attempt: Some(1),
        data,
    }
}

/// Publish an event to JetStream and wait for the store's ack; returns its stream sequence.
async fn publish_event(js: &jetstream::Context, e: &Event) -> u64 {
    let ack = js.publish(e.subject(), serde_json::to_vec(e).unwrap().into()).await.expect("publish");
    ack.await.expect("stored").sequence
}

fn config(nats: &NatsServer) -> GatewayConfig {
    GatewayConfig {
        nats_url: nats.url(),
        nats_credentials: nats.gateway_credentials(),
        rate_limit: None,
        ..dev_config()
    }
}

async fn router(nats: &NatsServer, config: GatewayConfig) -> axum::Router {
    fleet_gateway::router(AppState::new(config, nats.client().await.expect("connect")))
}

/// The gateway served on a socket (for WebSockets); stopped on drop of the token.
struct Served {
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn serve(config: GatewayConfig) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let dev_mode = config.dev_mode;
    tokio::spawn(fleet_gateway::run(config, listener, shutdown.clone()));
    let served = Served { addr, shutdown };
    if dev_mode {
        // `run` returns before NATS is connected; wait until the gateway says it is.
        let deadline = Instant::now() + WAIT;
        while !http_get(addr, "/metrics").await.contains("fleet_gateway_nats_connected 1") {
            assert!(Instant::now() < deadline, "the gateway did not connect to NATS in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    served
}

/// A plain HTTP/1.1 GET over a socket; the whole answer as text ("" if it fails).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return String::new() };
    let req = format!("GET {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// An SSE response body read event by event.
struct SseReader {
    body: axum::body::BodyDataStream,
    buf: String,
}

impl SseReader {
    /// The next event's `id` and JSON `data`, or `None` if none comes within `wait`.
    async fn next(&mut self, wait: Duration) -> Option<(u64, Value)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                let mut id = None;
                let mut data = String::new();
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if let Some(id) = id {
                    return Some((id, serde_json::from_str(&data).expect("data is JSON")));
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.next()).await.ok()??.ok()?;
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

async fn sse(router: &axum::Router, last_event_id: Option<u64>) -> SseReader {
    let mut req = Request::get("/api/v1/events").header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id.to_string());
    }
    let resp = tokio::time::timeout(WAIT, router.clone().oneshot(req.body(Body::empty()).unwrap()))
        .await
        .expect("answer in time")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    SseReader { body: resp.into_body().into_data_stream(), buf: String::new() }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws(addr: std::net::SocketAddr, path_and_query: &str) -> Ws {
    let url = format!("ws://{addr}{path_and_query}");
    let (ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .expect("upgrade");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

/// The next text message as JSON (pings are skipped), or `None` within `wait`.
async fn ws_next(ws: &mut Ws, wait: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await.ok()?? {
            Ok(WsMessage::Text(t)) => {
                return Some(serde_json::from_str(&t).unwrap_or_else(|_| Value::String(t.to_string())));
            }
            Ok(WsMessage::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// A small deterministic generator for the reconnect points.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test]
async fn events_arrive_over_sse_and_websocket() {
    let env = env(JobId::new()).await;
    let router = router(&env.nats, config(&env.nats)).await;
    let served = serve(config(&env.nats)).await;

    // New events only, without `since`.
    let before = publish_event(&env.js, &event(1, "job.completed", "j0", json!({}))).await;
    let mut reader = sse(&router, None).await;
    let mut socket = ws(served.addr, "/api/v1/events").await;
    // Another tenant's event is never seen.
    let mut other = event(2, "job.completed", "jx", json!({}));
    other.tenant = TenantId::new("acme").unwrap();
    publish_event(&env.js, &other).await;
    let seq = publish_event(&env.js, &event(3, "job.completed", "j1", json!({"status": "completed"}))).await;

    let (id, data) = reader.next(WAIT).await.expect("an SSE event");
    assert_eq!(id, seq);
    assert_eq!((data["type"].as_str(), data["job_id"].as_str()), (Some("job.completed"), Some("j1")));
    assert_eq!(data["stream_seq"], seq);
    let msg = ws_next(&mut socket, WAIT).await.expect("a WebSocket event");
    assert_eq!((msg["stream_seq"].as_u64(), msg["id"].as_i64()), (Some(seq), Some(3)));

    // Resuming replays from the given sequence, for both.
    let mut reader = sse(&router, Some(before - 1)).await;
    assert_eq!(reader.next(WAIT).await.unwrap().0, before);
    assert_eq!(reader.next(WAIT).await.unwrap().0, seq, "the other tenant's event is skipped");
    let mut socket = ws(served.addr, &format!("/api/v1/events?since={before}")).await;
    assert_eq!(ws_next(&mut socket, WAIT).await.unwrap()["stream_seq"], seq);

    // Neither SSE nor WebSocket.
    let r = send(
        &router,
        Request::get("/api/v1/events").header("accept", "application/json").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!((r.status, r.error().0.as_str()), (StatusCode::NOT_ACCEPTABLE, "not_acceptable"));
    let r = send(&router, get("/api/v1/events?since=yesterday")).await;
    assert_eq!(r.error(), ("invalid".to_owned(), Some("since".to_owned())));
}

/// 100 disconnects at random points while events are being published: every event arrives
/// exactly once and in order, resuming by `Last-Event-ID` (SSE) and `?since=` (WebSocket).
#[tokio::test]
async fn resume_across_100_reconnects_has_no_gap_or_duplicate() {
    const EVENTS: u64 = 300;
    let env = env(JobId::new()).await;
    let router = router(&env.nats, config(&env.nats)).await;
    let served = serve(config(&env.nats)).await;

    let js = env.js.clone();
    let publisher = tokio::spawn(async move {
        for i in 1..=EVENTS {
            let seq =
                publish_event(&js, &event(i as i64, "job.completed", &format!("j{i}"), json!({}))).await;
            assert_eq!(seq, i);
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    });

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut seen: Vec<u64> = Vec::new();
    let started = Instant::now();
    for round in 0..=100u32 {
        let last = seen.last().copied().unwrap_or(0);
        // The last round reads everything that is left.
        let (take, idle) =
            if round == 100 { (u64::MAX, WAIT) } else { (rng.below(8), Duration::from_millis(150)) };
        let mut got = 0;
        if round % 2 == 0 {
            let mut reader = sse(&router, Some(last)).await;
            while got < take && seen.len() < EVENTS as usize {
                let Some((id, data)) = reader.next(idle).await else { break };
                assert_eq!(data["stream_seq"], id);
                seen.push(id);
                got += 1;
            }
        } else {
            let mut socket = ws(served.addr, &format!("/api/v1/events?since={last}")).await;
            while got < take && seen.len() < EVENTS as usize {
                let Some(msg) = ws_next(&mut socket, idle).await else { break };
                seen.push(msg["stream_seq"].as_u64().expect("stream_seq"));
                got += 1;
            }
            if rng.below(2) == 0 {
                let _ = socket.close(None).await;
            } // else: just dropped, like a lost connection
        }
        assert!(started.elapsed() < Duration::from_secs(120), "took too long");
    }
    tokio::time::timeout(WAIT, publisher).await.expect("publisher done").unwrap();
    let expected: Vec<u64> = (1..=EVENTS).collect();
    assert_eq!(seen, expected, "every event exactly once, in order");
}

#[tokio::test]
async fn the_canvas_live_view_follows_a_job() {
    let env = env(JobId::new()).await;
    let served = serve(config(&env.nats)).await;
    let client = env.nats.client().await.unwrap();
    let mut socket = ws(served.addr, "/ws/monitoring/live-jobs?token=anything").await;

    // Queue figures come first (and then every few seconds).
    let first = ws_next(&mut socket, WAIT).await.expect("queue_metrics");
    assert_eq!(first["type"], "queue_metrics");
    assert_eq!((first["depth"].as_u64(), first["active_jobs"].as_u64()), (Some(3), Some(1)));
    assert_eq!((first["completed_today"].as_u64(), first["failed_today"].as_u64()), (Some(4), Some(1)));

    // `ping` → `pong`; once answered, the view's subscriptions are in place.
    socket.send(WsMessage::Text("ping".into())).await.unwrap();
    next_of(&mut socket, "pong").await;

    let job = JobId::new().to_string();
    publish_event(&env.js, &event(1, "job.started", &job, json!({}))).await;
    let m = next_of(&mut socket, "job_update").await;
    assert_eq!((m["job_id"].as_str(), m["status"].as_str()), (Some(job.as_str()), Some("running")));
    for key in ["progress", "current_node", "error_message"] {
        assert!(m.get(key).is_some(), "job_update lacks {key}");
    }

    let live = subjects::live(&TenantId::default_tenant(), "job", "progress");
    let tick =
        json!({"type": "job.progress", "job_id": job, "attempt": 1, "progress": 50, "current_node": "n2"});
    client.publish(live, tick.to_string().into()).await.unwrap();
    let m = next_of(&mut socket, "job_update").await;
    assert_eq!(
        (m["progress"].as_i64(), m["current_node"].as_str(), m["status"].as_str()),
        (Some(50), Some("n2"), Some("running"))
    );

    publish_event(&env.js, &event(2, "job.completed", &job, json!({"status": "completed"}))).await;
    let m = next_of(&mut socket, "job_update").await;
    assert_eq!((m["status"].as_str(), m["progress"].as_i64()), (Some("completed"), Some(100)));

    let hb = subjects::live(&TenantId::default_tenant(), "robot", "heartbeat");
    let beat = json!({"type": "robot.heartbeat", "robot_id": "r1", "state": "online", "running": 1, "max_jobs": 2, "cpu_percent": 7.5, "memory_mb": 100.0});
    client.publish(hb, beat.to_string().into()).await.unwrap();
    let m = next_of(&mut socket, "robot_status").await;
    assert_eq!(
        (m["robot_id"].as_str(), m["status"].as_str(), m["cpu_percent"].as_f64()),
        (Some("r1"), Some("busy"), Some(7.5))
    );
    assert!(m.get("current_job").is_some() && m.get("memory_mb").is_some());

    // Another tenant's progress never shows.
    let other = subjects::live(&TenantId::new("acme").unwrap(), "job", "progress");
    client.publish(other, json!({"job_id": "secret", "progress": 1}).to_string().into()).await.unwrap();
    socket.send(WsMessage::Text("ping".into())).await.unwrap();
    loop {
        let m = ws_next(&mut socket, WAIT).await.expect("pong");
        assert_ne!(m["job_id"], "secret");
        if m == "pong" {
            break;
        }
    }
}

#[tokio::test]
async fn the_live_view_closes_with_4001_without_a_valid_key() {
    let env = env(JobId::new()).await;
    let served = serve(GatewayConfig { dev_mode: false, ..config(&env.nats) }).await;
    let mut socket = ws(served.addr, "/ws/monitoring/live-jobs?token=crpa_not_a_real_key").await;
    let frame = loop {
        match tokio::time::timeout(WAIT, socket.next()).await.expect("a close in time") {
            Some(Ok(WsMessage::Close(frame))) => break frame.expect("a close frame"),
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(frame.code, CloseCode::from(4001));
    assert!(!frame.reason.is_empty());
    // No token at all: the same.
    let mut socket = ws(served.addr, "/ws/monitoring/live-jobs").await;
    let Some(Ok(WsMessage::Close(Some(frame)))) = tokio::time::timeout(WAIT, socket.next()).await.unwrap()
    else {
        panic!("expected a close frame");
    };
    assert_eq!(frame.code, CloseCode::from(4001));
}

/// The next message of type `kind` (or the text `kind`), skipping others.
async fn next_of(socket: &mut Ws, kind: &str) -> Value {
    loop {
        let m = ws_next(socket, WAIT).await.unwrap_or_else(|| panic!("no {kind} message"));
        if m == kind || m["type"] == kind {
            return m;
        }
    }
}

fn log_line(job: JobId, robot: &str, n: usize) -> LogLine {
    LogLine {
        job_id: job,
        attempt: 1,
        robot_id: RobotId::new(robot).unwrap(),
        stream: "stdout".into(),
        step: Some("s1".into()),
        line: format!("line {n}"),
        at: OffsetDateTime::now_utc(),
    }
}

#[tokio::test]
async fn logs_come_from_the_logs_stream() {
    let job = JobId::new();
    let env = env(job).await;
    let router = router(&env.nats, config(&env.nats)).await;
    let tenant = TenantId::default_tenant();
    let other_job = JobId::new();
    for n in 0..5 {
        let (j, robot) = if n % 2 == 0 { (job, "r1") } else { (other_job, "r2") };
        let subject = subjects::job_logs(&tenant, &j);
        env.js
            .publish(subject, serde_json::to_vec(&log_line(j, robot, n)).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // The same job id in another tenant is not this job's.
    let acme = subjects::job_logs(&TenantId::new("acme").unwrap(), &job);
    env.js
        .publish(acme, serde_json::to_vec(&log_line(job, "r1", 99)).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();

    let r = send(&router, get(&format!("/api/v1/jobs/{job}/logs"))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["job_id"], job.to_string());
    let lines: Vec<&str> =
        r.body["logs"].as_array().unwrap().iter().map(|l| l["line"].as_str().unwrap()).collect();
    assert_eq!(lines, ["line 0", "line 2", "line 4"]);
    let r = send(&router, get(&format!("/api/v1/jobs/{job}/logs?limit=2"))).await;
    assert_eq!(r.body["logs"].as_array().unwrap().len(), 2);
    let next = r.body["next_since"].as_u64().expect("next_since");
    let r = send(&router, get(&format!("/api/v1/jobs/{job}/logs?since={next}"))).await;
    assert_eq!(r.body["logs"][0]["line"], "line 4", "paging on with next_since");
    assert_eq!(r.body["logs"].as_array().unwrap().len(), 1);

    let r = send(&router, get(&format!("/api/v1/jobs/{}/logs", JobId::new()))).await;
    assert_eq!((r.status, r.error().0.as_str()), (StatusCode::NOT_FOUND, "not_found"));
    let r = send(&router, get(&format!("/api/v1/jobs/{job}/logs?limit=0"))).await;
    assert_eq!(r.error(), ("invalid".to_owned(), Some("limit".to_owned())));

    let r = send(&router, get("/api/v1/robots/r1/logs?limit=2")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let lines: Vec<&str> =
        r.body["logs"].as_array().unwrap().iter().map(|l| l["line"].as_str().unwrap()).collect();
    assert_eq!(lines, ["line 2", "line 4"], "the newest of r1's lines, oldest first");
    let r = send(&router, get("/api/v1/robots/r9/logs")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let r = send(&router, get("/api/v1/robots/r1/metrics")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!((r.body["cpu_percent"].as_f64(), r.body["current_jobs"].as_u64()), (Some(12.5), Some(1)));
    assert!(r.body["last_heartbeat"].is_string() && r.body["max_concurrent_jobs"] == 2);
    let r = send(&router, get("/api/v1/robots/r9/metrics")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}
