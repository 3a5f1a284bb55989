//! Test helpers: a fake orchestrator, and one-shot requests against the router without a socket.
//! The nats-server comes from the shared harness, `fleet_testkit::NatsServer`.
#![allow(dead_code)] // each test file uses a different part

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use fleet_gateway::{AppState, GatewayConfig};
use fleet_schemas::api::Endpoint;
use futures::StreamExt;
use serde_json::Value;
use tower::ServiceExt;

/// Every wait in the tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);

/// What the fake orchestrator answers: `None` never answers.
pub type Answer = Box<dyn Fn(Endpoint, &[u8]) -> Option<Vec<u8>> + Send + Sync>;

/// A fake orchestrator serving `fleet.api.>` with canned answers; every request it receives is
/// also sent to `requests` for the test to inspect.
pub struct FakeOrchestrator {
    pub requests: tokio::sync::mpsc::UnboundedReceiver<(Endpoint, Vec<u8>)>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeOrchestrator {
    pub async fn start(client: async_nats::Client, answer: Answer) -> Self {
        let mut sub = client.subscribe(fleet_schemas::subjects::API_REQUESTS).await.expect("subscribe");
        // The subscription must be known to the server before a test sends requests.
        client.flush().await.expect("flush");
        let (tx, requests) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(endpoint) = Endpoint::from_subject(&msg.subject) else { continue };
                let _ = tx.send((endpoint, msg.payload.to_vec()));
                if let (Some(reply), Some(bytes)) = (msg.reply, answer(endpoint, &msg.payload)) {
                    client.publish(reply, bytes.into()).await.expect("publish reply");
                }
            }
        });
        Self { requests, task }
    }

    /// The next request the fake received.
    pub async fn next_request(&mut self) -> (Endpoint, Vec<u8>) {
        tokio::time::timeout(WAIT, self.requests.recv()).await.expect("a request in time").expect("open")
    }
}

impl Drop for FakeOrchestrator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn dev_config() -> GatewayConfig {
    GatewayConfig { dev_mode: true, ..GatewayConfig::default() }
}

/// A router whose NATS connection never comes up (port 1 refuses): for everything that must be
/// decided before the orchestrator is asked.
pub async fn offline_router(config: GatewayConfig) -> Router {
    let config = GatewayConfig { nats_url: "nats://127.0.0.1:1".into(), ..config };
    fleet_gateway::router(AppState::connect(config).await.expect("state"))
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub raw: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Assert the error shape and return `(code, field)`.
    pub fn error(&self) -> (String, Option<String>) {
        let e = &self.body["error"];
        assert!(e.is_object(), "not the error shape: {}", String::from_utf8_lossy(&self.raw));
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", self.body);
        assert_eq!(self.header("content-type"), Some("application/json"));
        let id = self.header("x-request-id").expect("x-request-id header");
        assert_eq!(self.body["request_id"], id, "body and header carry the same request id");
        (e["code"].as_str().unwrap_or_default().to_owned(), e["field"].as_str().map(str::to_owned))
    }
}

pub async fn send(router: &Router, req: Request<Body>) -> Reply {
    let resp = tokio::time::timeout(WAIT, router.clone().oneshot(req))
        .await
        .expect("answer in time")
        .expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let raw = axum::body::to_bytes(resp.into_body(), usize::MAX).await.expect("body").to_vec();
    let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    Reply { status, headers, body, raw }
}

pub fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

pub fn post_json(uri: &str, body: &Value) -> Request<Body> {
    Request::post(uri)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

pub fn fleet_workflow() -> Value {
    serde_json::json!({"steps": [{"id": "hello", "kind": "log", "message": "hi"}]})
}
