//! The event relay: publishes `job_history` rows to `FLEET_EVENTS`, in order.
//!
//! Rows are written in the same statement as the state change they describe, so an event exists
//! exactly when the change committed; a trigger puts each new row's id in `event_outbox`. The
//! relay publishes a batch in id order with pipelined acks, then deletes those ids from the
//! outbox. A crash between the two republishes the batch; the stream
//! drops the copies by `Nats-Msg-Id` (the row id) within its duplicate window. Per job, rows are
//! created under the job's row lock, so their ids — and hence the events — are in job order.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use fleet_schemas::TenantId;
use fleet_schemas::event::{EVENT_VERSION, Event};
use sqlx::types::Json;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Core;

/// Rows per batch: large enough to amortise the round trips, small enough that one batch's
/// publishes stay well inside the server's pending-ack limits.
const BATCH: i64 = 512;
/// Poll interval when nothing wakes the relay (covers rows written by a previous leader).
const IDLE_POLL: Duration = Duration::from_millis(500);

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    tenant: String,
    job_id: Option<Uuid>,
    robot_id: Option<String>,
    seq: Option<i32>,
    kind: String,
    attempt: Option<i32>,
    data: Json<serde_json::Value>,
    occurred_at: OffsetDateTime,
}

pub async fn run(core: Arc<Core>, token: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match relay_batch(&core).await {
            Ok(n) if n as i64 == BATCH => continue,
            Ok(_) => backoff = Duration::from_millis(100),
            Err(e) => {
                // FLEET_EVENTS may be gone: the fabric reconciler recreates it.
                core.fabric.wake.notify_one();
                tracing::warn!(error = %e, "event relay failed; retrying");
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = core.wake_relay.notified() => {}
            _ = tokio::time::sleep(IDLE_POLL) => {}
        }
    }
}

/// Publish one batch; returns how many rows it published.
async fn relay_batch(core: &Core) -> anyhow::Result<usize> {
    let rows: Vec<Row> = sqlx::query_as(
        // The ids first, then each row by its key (a join invites a merge join that walks the
        // whole history from its first row).
        "SELECT id, tenant, job_id, robot_id, seq, kind, attempt, data, occurred_at FROM job_history
         WHERE id = ANY(ARRAY(SELECT id FROM event_outbox ORDER BY id LIMIT $1)) ORDER BY id",
    )
    .bind(BATCH)
    .fetch_all(core.store.writer())
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut acks = Vec::with_capacity(rows.len());
    for row in &rows {
        let tenant = match TenantId::new(row.tenant.as_str()) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(id = row.id, error = %e, "history row with an invalid tenant; skipped");
                continue;
            }
        };
        let event = Event {
            v: EVENT_VERSION,
            id: row.id,
            kind: row.kind.clone(),
            tenant,
            occurred_at: row.occurred_at,
            job_id: row.job_id.map(|j| j.to_string()),
            robot_id: row.robot_id.clone(),
            seq: row.seq,
            attempt: row.attempt,
            data: row.data.0.clone(),
        };
        let payload = serde_json::to_vec(&event)?;
        let publish = PublishMessage::build().message_id(format!("h{}", row.id)).payload(payload.into());
        acks.push(core.fabric.js.send_publish(event.subject(), publish).await?);
    }
    for ack in acks {
        ack.await?;
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    sqlx::query("DELETE FROM event_outbox WHERE id = ANY($1)")
        .bind(&ids)
        .execute(core.store.writer())
        .await?;
    Ok(rows.len())
}
