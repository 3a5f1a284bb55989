//! `GET /ws/monitoring/live-jobs?token=<key>`: the Canvas's live view, a WebSocket of text JSON
//! messages with a top-level `type`:
//!
//! - `job_update` (`job_id`, `status`, `progress`, `current_node`, `error_message`), from the
//!   tenant's job events (`job.started` → `running`, `job.completed` → `completed`, …) and from
//!   the live progress ticks on `fleet.live.<tenant>.job.progress`;
//! - `robot_status` (`robot_id`, `status`, `cpu_percent`, `memory_mb`, `current_job`), from the
//!   live heartbeats on `fleet.live.<tenant>.robot.heartbeat` and the robot events;
//! - `queue_metrics` (`depth`, `active_jobs`, `completed_today`, `failed_today`) every
//!   [`QUEUE_METRICS_EVERY`], from the orchestrator's fleet summary.
//!
//! A text `ping` is answered `pong`. The Canvas cannot set headers on a WebSocket, so the key
//! comes in the `token` query parameter (and only there: [`crate::auth::presented`]); it goes
//! through the same [`Caller`] check and rate limit as a header key would, and a refused key
//! closes the socket with code 4001 (what the Canvas expects). The token is never logged: the
//! request log records the path only, and nothing here logs the URI.
//!
//! Only live data is sent (no history): the Canvas asks the REST endpoints for the current
//! state when it opens the view.

use std::time::Duration;

use async_nats::Subscriber;
use axum::extract::ws::{
    CloseFrame, Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
};
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use fleet_schemas::api::{Empty, Endpoint, FleetSummary, RobotStatus};
use fleet_schemas::event::Event;
use fleet_schemas::{RequestId, TenantId, subjects};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};

use super::events::{KEEPALIVE, SEND_TIMEOUT, going_away};
use crate::AppState;
use crate::auth::Caller;
use crate::error::HttpError;

/// How often queue figures are sent.
pub const QUEUE_METRICS_EVERY: Duration = Duration::from_secs(5);
/// Deadline of the fleet-summary call behind each `queue_metrics` (short: a late figure is
/// skipped, the next one comes soon).
pub const SUMMARY_DEADLINE: Duration = Duration::from_secs(2);
/// Close code the Canvas reads as "bad key".
pub const CLOSE_UNAUTHORIZED: u16 = 4001;

/// The route's path (keys come in its `token` query parameter: [`crate::auth::presented`]).
pub const PATH: &str = "/ws/monitoring/live-jobs";
/// Consecutive event-consumer errors after which the live view drops the consumer and opens a
/// new one (the stream may have been deleted and recreated).
const EVENT_ERRORS: u32 = 5;
/// Longest pause between attempts to open the events consumer again.
const REOPEN_MAX: Duration = Duration::from_secs(10);

/// The caller named by the `token` query parameter, or why there is none: a refused key is
/// answered on the socket (close code 4001), not with an HTTP status.
pub struct TokenCaller(pub Result<Caller, HttpError>);

impl FromRequestParts<AppState> for TokenCaller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        Ok(Self(Caller::from_request_parts(parts, state).await))
    }
}

#[utoipa::path(
    get,
    path = "/ws/monitoring/live-jobs",
    tag = "events",
    responses(
        (status = 101, description = "WebSocket of text JSON messages: `job_update`, `robot_status`, `queue_metrics`; `ping` is answered `pong`; closed with 4001 on a bad key"),
        (status = 400, description = "Not a WebSocket upgrade", body = crate::openapi::ErrorBody),
    ),
    // The key comes as `?token=` (a WebSocket cannot carry headers); a plain request with a bad
    // one answers 401, an upgrade with a bad one is closed with 4001.
    security(("token" = []))
)]
pub async fn live_jobs(
    TokenCaller(caller): TokenCaller,
    State(state): State<AppState>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            return match caller {
                Err(e) => e.into_response(),
                Ok(_) => HttpError::from_status(rejection.status()).into_response(),
            };
        }
    };
    match caller {
        Ok(caller) => ws.on_upgrade(move |socket| serve(socket, state, caller.tenant)).into_response(),
        Err(e) => ws
            .on_upgrade(move |mut socket| async move {
                let frame = CloseFrame { code: CLOSE_UNAUTHORIZED, reason: e.message.into() };
                let _ = tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Close(Some(frame)))).await;
            })
            .into_response(),
    }
}

async fn serve(socket: WebSocket, state: AppState, tenant: TenantId) {
    let client = state.orchestrator().client().clone();
    let subscribe = |entity: &'static str, event: &'static str| {
        let client = client.clone();
        let subject = subjects::live(&tenant, entity, event);
        async move { client.subscribe(subject).await.ok() }
    };
    let mut progress = subscribe("job", "progress").await;
    let mut heartbeats = subscribe("robot", "heartbeat").await;
    let _ = client.flush().await;
    // Without the events stream the view still gets progress, heartbeats and queue figures.
    let open_events = || async {
        match super::events::open(&state, subjects::tenant_events(&tenant), None).await {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, detail = e.log_detail.as_deref(), "live view without job events for now");
                None
            }
        }
    };
    let mut events = open_events().await;
    // Without a consumer, try again with a growing pause: the stream may be recreated.
    let mut reopen_in = Duration::from_secs(1);
    let mut reopen_at = tokio::time::Instant::now() + reopen_in;
    let mut event_errors = 0;
    let stop = state.streams_token().clone();
    let (mut sink, mut incoming) = socket.split();
    let mut metrics_tick = tokio::time::interval(QUEUE_METRICS_EVERY);
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.reset();
    loop {
        let out: Option<Message> = tokio::select! {
            () = stop.cancelled() => Some(Message::Close(Some(going_away()))),
            msg = incoming.next() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(Message::Text(t))) if t.trim().eq_ignore_ascii_case("ping") => Some(Message::Text("pong".into())),
                Some(Ok(_)) => None,
            },
            Some(msg) = next_live(&mut progress) => job_progress(&msg.payload).map(text),
            Some(msg) = next_live(&mut heartbeats) => heartbeat(&msg.payload).map(text),
            Some(next) = next_event(&mut events) => match next {
                Ok(msg) => {
                    event_errors = 0;
                    reopen_in = Duration::from_secs(1);
                    serde_json::from_slice::<Event>(&msg.payload).ok().and_then(|e| from_event(&e)).map(text)
                }
                Err(e) => {
                    event_errors += 1;
                    tracing::debug!(error = %e, "live view event consumer error");
                    if event_errors >= EVENT_ERRORS {
                        tracing::warn!(error = %e, "live view lost its event consumer; opening a new one");
                        events = None;
                        event_errors = 0;
                        reopen_at = tokio::time::Instant::now() + reopen_in;
                    }
                    None
                }
            },
            _ = tokio::time::sleep_until(reopen_at), if events.is_none() => {
                events = open_events().await;
                reopen_in = (reopen_in * 2).min(REOPEN_MAX);
                reopen_at = tokio::time::Instant::now() + reopen_in;
                None
            }
            _ = metrics_tick.tick() => queue_metrics(&state, &tenant).await.map(text),
            _ = keepalive.tick() => Some(Message::Ping(Vec::new().into())),
        };
        let Some(out) = out else { continue };
        let closing = matches!(out, Message::Close(_));
        // A client that does not take a message within the timeout is stalled: drop it rather
        // than let its messages pile up (it reconnects and reloads the state).
        if !matches!(tokio::time::timeout(SEND_TIMEOUT, sink.send(out)).await, Ok(Ok(()))) || closing {
            break;
        }
    }
}

async fn next_live(sub: &mut Option<Subscriber>) -> Option<async_nats::Message> {
    match sub {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

async fn next_event(
    events: &mut Option<async_nats::jetstream::consumer::pull::Ordered>,
) -> Option<Result<async_nats::jetstream::Message, async_nats::jetstream::consumer::pull::OrderedError>> {
    match events {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

fn text(v: Value) -> Message {
    Message::Text(v.to_string().into())
}

/// A `job_update` from a job event, a `robot_status` from a robot event.
pub fn from_event(e: &Event) -> Option<Value> {
    let (entity, name) = e.entity_and_name();
    match entity {
        "job" => {
            let status = match name {
                "submitted" | "requeued" | "released" | "recalled" | "retried" => "pending",
                "assigned" => "queued",
                "started" => "running",
                "completed" => "completed",
                "failed" => "failed",
                "cancelled" => "cancelled",
                "timed_out" => "timed_out",
                _ => return None,
            };
            let progress = match status {
                "completed" => Some(100),
                "pending" | "queued" | "running" => Some(0),
                _ => None,
            };
            let error = e.data.get("error").and_then(Value::as_str);
            Some(json!({
                "type": "job_update",
                "job_id": e.job_id,
                "status": status,
                "progress": progress,
                "current_node": Value::Null,
                "error_message": error,
                "robot_id": e.robot_id,
                "timestamp": e.occurred_at.unix_timestamp(),
            }))
        }
        "robot" => {
            let status = match name {
                "registered" => "idle".to_owned(),
                "disconnected" => "offline".to_owned(),
                "status_changed" => {
                    let to = e.data.get("to").and_then(Value::as_str)?;
                    canvas_status(RobotStatus::parse(not_taking_work(to))?).to_owned()
                }
                _ => return None,
            };
            Some(json!({
                "type": "robot_status",
                "robot_id": e.robot_id,
                "status": status,
                "cpu_percent": Value::Null,
                "memory_mb": Value::Null,
                "current_job": Value::Null,
            }))
        }
        _ => None,
    }
}

/// The Canvas's robot statuses (`idle` where Fleet says `online`).
fn canvas_status(s: RobotStatus) -> &'static str {
    match s {
        RobotStatus::Online => "idle",
        other => other.as_str(),
    }
}

/// The status word for a robot's run state: a paused robot takes no work, as one in maintenance
/// does, and the Canvas (which reads only the status) must not show it ready.
fn not_taking_work(state: &str) -> &str {
    if state == "paused" { "maintenance" } else { state }
}

/// A `job_update` from a live progress tick (`job_id`, `progress`, `current_node`).
pub fn job_progress(payload: &[u8]) -> Option<Value> {
    let p: Value = serde_json::from_slice(payload).ok()?;
    let job_id = p.get("job_id")?.as_str()?;
    Some(json!({
        "type": "job_update",
        "job_id": job_id,
        "status": "running",
        "progress": p.get("progress").cloned().unwrap_or(Value::Null),
        "current_node": p.get("current_node").cloned().unwrap_or(Value::Null),
        "error_message": Value::Null,
    }))
}

/// A `robot_status` from a live heartbeat (`robot_id`, `state`, `running`, `max_jobs`,
/// `cpu_percent`, `memory_mb`). The heartbeat carries the number of running jobs, not their
/// ids, so `current_job` stays null here.
pub fn heartbeat(payload: &[u8]) -> Option<Value> {
    let h: Value = serde_json::from_slice(payload).ok()?;
    let robot_id = h.get("robot_id")?.as_str()?;
    let running = h.get("running").and_then(Value::as_u64).unwrap_or(0);
    let status = match not_taking_work(h.get("state").and_then(Value::as_str).unwrap_or("online")) {
        "maintenance" => "maintenance",
        _ if running > 0 => "busy",
        _ => "idle",
    };
    Some(json!({
        "type": "robot_status",
        "robot_id": robot_id,
        "status": status,
        "cpu_percent": h.get("cpu_percent").cloned().unwrap_or(Value::Null),
        "memory_mb": h.get("memory_mb").cloned().unwrap_or(Value::Null),
        "current_job": Value::Null,
        "running_jobs": running,
        "max_jobs": h.get("max_jobs").cloned().unwrap_or(Value::Null),
    }))
}

/// `queue_metrics` from the fleet summary; `None` (skipped) when the orchestrator does not
/// answer in time. `completed_today`/`failed_today` are the tenant's completed and failed jobs
/// as the summary counts them (by status, not per day, until the summary carries daily figures).
async fn queue_metrics(state: &AppState, tenant: &TenantId) -> Option<Value> {
    let summary: FleetSummary = state
        .orchestrator()
        .call_with_deadline(
            Endpoint::FleetSummary,
            RequestId::new(),
            tenant,
            Empty {},
            SUMMARY_DEADLINE,
            Duration::from_millis(500),
        )
        .await
        .map_err(|e| tracing::debug!(error = %e, "no queue figures this time"))
        .ok()?;
    let count = |s: &str| summary.jobs_by_status.get(s).copied().unwrap_or(0);
    Some(json!({
        "type": "queue_metrics",
        "depth": summary.queue_depth,
        "active_jobs": summary.active_jobs,
        "completed_today": count("completed"),
        "failed_today": count("failed"),
        "total_jobs_today": summary.total_jobs_today,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;

    fn event(kind: &str, data: Value) -> Event {
        Event {
            v: 1,
            id: 1,
            kind: kind.into(),
            tenant: TenantId::default_tenant(),
            occurred_at: OffsetDateTime::UNIX_EPOCH,
            job_id: Some("j1".into()),
            robot_id: Some("r1".into()),
            seq: Some(1),
            attempt: Some(1),
            data,
        }
    }

    #[test]
    fn job_events_map_to_canvas_statuses() {
        for (kind, status) in [
            ("job.submitted", "pending"),
            ("job.assigned", "queued"),
            ("job.started", "running"),
            ("job.completed", "completed"),
            ("job.failed", "failed"),
            ("job.cancelled", "cancelled"),
            ("job.timed_out", "timed_out"),
            ("job.requeued", "pending"),
        ] {
            let v = from_event(&event(kind, json!({}))).unwrap();
            assert_eq!(
                (v["type"].as_str(), v["status"].as_str()),
                (Some("job_update"), Some(status)),
                "{kind}"
            );
            for key in ["job_id", "progress", "current_node", "error_message"] {
                assert!(v.get(key).is_some(), "{kind} lacks {key}");
            }
        }
        let v = from_event(&event("job.failed", json!({"error": "boom"}))).unwrap();
        assert_eq!(v["error_message"], "boom");
        assert!(from_event(&event("job.cancel_requested", json!({}))).is_none());
    }

    #[test]
    fn a_paused_robot_is_in_maintenance_live_too() {
        let v =
            from_event(&event("robot.status_changed", json!({"from": "online", "to": "paused"}))).unwrap();
        assert_eq!((v["type"].as_str(), v["status"].as_str()), (Some("robot_status"), Some("maintenance")));
        let hb = json!({"robot_id": "r1", "state": "paused", "running": 1, "max_jobs": 4});
        assert_eq!(heartbeat(hb.to_string().as_bytes()).unwrap()["status"], "maintenance");
    }

    #[test]
    fn robot_events_and_heartbeats() {
        let v = from_event(&event("robot.status_changed", json!({"from": "busy", "to": "online"}))).unwrap();
        assert_eq!((v["type"].as_str(), v["status"].as_str()), (Some("robot_status"), Some("idle")));
        let v = from_event(&event("robot.disconnected", json!({}))).unwrap();
        assert_eq!(v["status"], "offline");
        let hb = json!({"robot_id": "r1", "state": "online", "running": 2, "max_jobs": 4, "cpu_percent": 12.5, "memory_mb": 300.0});
        let v = heartbeat(hb.to_string().as_bytes()).unwrap();
        assert_eq!((v["status"].as_str(), v["cpu_percent"].as_f64()), (Some("busy"), Some(12.5)));
        for key in ["robot_id", "status", "cpu_percent", "memory_mb", "current_job"] {
            assert!(v.get(key).is_some(), "lacks {key}");
        }
        let v = job_progress(br#"{"job_id": "j1", "progress": 40, "current_node": "n2"}"#).unwrap();
        assert_eq!((v["progress"].as_i64(), v["current_node"].as_str()), (Some(40), Some("n2")));
        assert!(job_progress(b"nope").is_none());
    }
}
