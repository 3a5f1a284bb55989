//! `GET /api/v1/events`: the caller's tenant's events, live, as Server-Sent Events or over a
//! WebSocket (on upgrade), with resume.
//!
//! Events come straight from the JetStream stream `FLEET_EVENTS`, through an ordered consumer
//! (ephemeral, in memory, recreated by the client library on any gap) filtered on
//! `fleet.events.<tenant>.>`, so a caller never sees another tenant's events. Each event is
//! identified by its stream sequence: the SSE `id:` line, and a `stream_seq` field added to the
//! JSON. A client that reconnects with the last sequence it saw (`Last-Event-ID`, which browsers'
//! `EventSource` sends by itself, or `?since=<seq>`) gets every event after it, in order: the
//! consumer starts at `since + 1`, and the stream, not the gateway, holds what was missed.
//! Without either, the stream starts with new events only. Stream sequences are global to the
//! stream, so a tenant's sequences increase but are not consecutive.
//!
//! One task per client reads the consumer into a bounded buffer ([`CLIENT_BUFFER`]); the
//! response drains it. A client that falls that far behind is disconnected rather than buffered
//! without limit: it loses nothing, because it can resume from its last sequence, while an
//! unbounded buffer would let one stalled client grow the gateway's memory for ever. Keepalive
//! comments (SSE) or pings (WebSocket) go out every [`KEEPALIVE`] so proxies keep the connection.

use std::convert::Infallible;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use fleet_schemas::subjects;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::QueryParams;
use crate::AppState;
use crate::auth::Caller;
use crate::error::HttpError;

/// Events buffered per client before a slow one is disconnected. A few seconds of a busy
/// tenant's events: enough to ride out a hiccup, small enough (a few hundred KiB) to hold for
/// thousands of clients.
pub const CLIENT_BUFFER: usize = 256;
/// Keepalive period (proxies commonly drop connections idle for 30–60 s).
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// How long one WebSocket send may take before the client counts as stalled.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// One event for a client: its stream sequence and its JSON with `stream_seq` added.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    pub seq: u64,
    pub json: Value,
}

#[utoipa::path(
    get,
    path = "/api/v1/events",
    tag = "events",
    params(
        ("since" = Option<i64>, Query, minimum = 0, description = "Resume after this stream sequence (exclusive)"),
        // A string, as every header is (and as the SSE standard has it), of digits.
        ("Last-Event-ID" = Option<String>, Header, nullable = false, pattern = "^[0-9]{1,19}$", description = "Resume after this stream sequence; wins over `since`"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events (`Accept: text/event-stream`): `id:` is the stream sequence, `data:` the event JSON with `stream_seq`", content_type = "text/event-stream", body = crate::openapi::SseEvent),
        (status = 101, description = "WebSocket upgrade: text messages, each an event JSON with `stream_seq`"),
        (status = 406, description = "Neither a WebSocket upgrade nor an Accept allowing text/event-stream", body = crate::openapi::ErrorBody),
        (status = 422, description = "`since` or `Last-Event-ID` is not a stream sequence", body = crate::openapi::ErrorBody),
        (status = 503, description = "The event stream is not available", body = crate::openapi::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn events(
    caller: Caller,
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, HttpError> {
    let query = QueryParams::from_uri(&uri)?;
    // Both are checked even when both are given (the header wins), so a bad one is never
    // silently ignored.
    let from_query = query
        .get("since")
        .map(|s| sequence(s).ok_or_else(|| HttpError::invalid("since", SEQUENCE_RULE)))
        .transpose()?;
    let from_header = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| sequence(s.trim()))
                .ok_or_else(|| HttpError::invalid("Last-Event-ID", SEQUENCE_RULE))
        })
        .transpose()?;
    let since = from_header.or(from_query);
    if ws.is_err() && !accepts_event_stream(&headers) {
        return Err(HttpError::new(
            StatusCode::NOT_ACCEPTABLE,
            "not_acceptable",
            "this endpoint streams text/event-stream, or a WebSocket on upgrade",
        ));
    }
    let filter = subjects::tenant_events(&caller.tenant);
    let messages = open(&state, filter, since).await?;
    let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
    let stop = state.streams_token().clone();
    tokio::spawn(forward(messages, tx, stop.clone()));
    match ws {
        Ok(ws) => Ok(ws.on_upgrade(move |socket| serve_socket(socket, rx, stop)).into_response()),
        Err(_) => Ok(sse(rx).into_response()),
    }
}

const SEQUENCE_RULE: &str = "must be a stream sequence number (digits, at most 9223372036854775807)";

/// A stream sequence as a client sends it back: digits only, within what the OpenAPI document
/// promises (`int64`). JetStream sequences are `u64` but never come near `i64::MAX`.
fn sequence(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u64>().ok().filter(|n| i64::try_from(*n).is_ok())
}

fn accepts_event_stream(headers: &HeaderMap) -> bool {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else { return true };
    accept.split(',').map(|m| m.split(';').next().unwrap_or_default().trim()).any(|m| {
        m.eq_ignore_ascii_case("text/event-stream") || m == "*/*" || m.eq_ignore_ascii_case("text/*")
    })
}

/// An ordered consumer on `filter`: after `since` when given, else new messages only.
pub(crate) async fn open(state: &AppState, filter: String, since: Option<u64>) -> Result<Ordered, HttpError> {
    if !state.orchestrator().is_connected() {
        return Err(HttpError::unavailable("the gateway is not connected to NATS; try again shortly", 1));
    }
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        HttpError::unavailable("the event stream is not available; try again shortly", 2)
            .with_log_detail(format!("{what}: {e}"))
    };
    let stream = state
        .jetstream()
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .map_err(|e| unavailable("get stream", &e))?;
    let last = stream.cached_info().state.last_sequence;
    let deliver_policy = match since {
        // Past the stream's end: the client's sequence is from a stream since deleted and
        // recreated (sequences start at 1 again), so everything in this one is new to it.
        Some(seq) if seq > last => DeliverPolicy::All,
        Some(seq) => DeliverPolicy::ByStartSequence { start_sequence: seq.saturating_add(1) },
        None => DeliverPolicy::New,
    };
    let consumer = stream
        .create_consumer(OrderedConfig { filter_subject: filter, deliver_policy, ..Default::default() })
        .await
        .map_err(|e| unavailable("create consumer", &e))?;
    consumer.messages().await.map_err(|e| unavailable("consume", &e))
}

/// Turn one stored event into what clients get; `None` for a payload that is not a JSON object
/// (Fleet never publishes one; skipping it is not a gap, since it was never an event).
pub(crate) fn stream_event(msg: &async_nats::jetstream::Message) -> Option<StreamEvent> {
    let seq = msg.info().ok()?.stream_sequence;
    let mut json: Value = serde_json::from_slice(&msg.payload).ok()?;
    json.as_object_mut()?.insert("stream_seq".to_owned(), Value::from(seq));
    Some(StreamEvent { seq, json })
}

/// Read the consumer into the client's buffer until the client goes, falls behind, or the
/// gateway shuts down.
async fn forward(mut messages: Ordered, tx: mpsc::Sender<StreamEvent>, stop: CancellationToken) {
    let mut errors = 0;
    loop {
        let next = tokio::select! {
            () = tx.closed() => return,
            () = stop.cancelled() => return,
            next = messages.next() => next,
        };
        match next {
            None => return,
            Some(Err(e)) => {
                // The ordered consumer recreates itself after most failures; give up only when
                // it keeps failing (the client resumes from its last sequence).
                errors += 1;
                tracing::debug!(error = %e, errors, "event consumer error");
                if errors >= 5 {
                    tracing::warn!(error = %e, "event stream unavailable; closing the client's stream so it resumes");
                    return;
                }
            }
            Some(Ok(msg)) => {
                errors = 0;
                let Some(event) = stream_event(&msg) else {
                    tracing::warn!(subject = %msg.subject, "skipping an event that is not a JSON object");
                    continue;
                };
                match tx.try_send(event) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::info!(
                            "event client too slow ({CLIENT_BUFFER} events behind); disconnecting it"
                        );
                        return;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
        }
    }
}

fn sse(rx: mpsc::Receiver<StreamEvent>) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        let sse = SseEvent::default().id(event.seq.to_string()).data(event.json.to_string());
        Some((Ok(sse), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEPALIVE))
}

async fn serve_socket(socket: WebSocket, mut rx: mpsc::Receiver<StreamEvent>, stop: CancellationToken) {
    let (mut sink, mut incoming) = socket.split();
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.reset();
    loop {
        let out = tokio::select! {
            () = stop.cancelled() => Some(Message::Close(Some(going_away()))),
            event = rx.recv() => match event {
                Some(e) => Some(Message::Text(e.json.to_string().into())),
                // The forwarder stopped (slow client, consumer failure): close so the client resumes.
                None => Some(Message::Close(Some(going_away()))),
            },
            msg = incoming.next() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => None,
            },
            _ = keepalive.tick() => Some(Message::Ping(Vec::new().into())),
        };
        let Some(out) = out else { continue };
        let closing = matches!(out, Message::Close(_));
        if !matches!(tokio::time::timeout(SEND_TIMEOUT, sink.send(out)).await, Ok(Ok(()))) || closing {
            return;
        }
    }
}

pub(crate) fn going_away() -> axum::extract::ws::CloseFrame {
    axum::extract::ws::CloseFrame {
        code: axum::extract::ws::close_code::AWAY,
        reason: "stream ended; resume from the last stream_seq".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (schemathesis, `GET /api/v1/events?since=9223372036854775808`): a sequence past
    /// the documented `int64` was accepted, and `+5` or ` 5` were too.
    #[test]
    fn sequences_are_digits_within_int64() {
        assert_eq!(sequence("0"), Some(0));
        assert_eq!(sequence("9223372036854775807"), Some(i64::MAX as u64));
        for bad in ["9223372036854775808", "18446744073709551615", "+5", " 5", "-1", "", "1e3", "x"] {
            assert_eq!(sequence(bad), None, "{bad:?}");
        }
    }
}
