//! Events on `FLEET_EVENTS` (JSON, one object per event, readable with `nats sub`).
//!
//! Job events carry a per-job sequence number (`seq`): the history row's number, so a consumer
//! can tell a gap from a duplicate. `id` is the history row id, unique across the stream.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::ids::TenantId;

/// Schema version of events.
pub const EVENT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Event {
    pub v: u32,
    /// Unique, increasing id of the event (the history row id for job events).
    pub id: i64,
    /// `job.submitted`, `job.assigned`, `job.started`, `job.completed`, `robot.registered`, …
    #[serde(rename = "type")]
    pub kind: String,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub tenant: TenantId,
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub robot_id: Option<String>,
    /// Per-job sequence number (1, 2, 3… for each job), absent for robot events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
    /// Event-specific fields (`status`, `error`, `class`, `reason`…).
    #[serde(default)]
    pub data: Value,
}

impl Event {
    /// The entity and event parts of the subject, from `kind` (`job.completed` → `job`, `completed`).
    pub fn entity_and_name(&self) -> (&str, &str) {
        self.kind.split_once('.').unwrap_or(("fleet", &self.kind))
    }

    pub fn subject(&self) -> String {
        let (entity, name) = self.entity_and_name();
        crate::subjects::event(&self.tenant, entity, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let e = Event {
            v: 1,
            id: 7,
            kind: "job.completed".into(),
            tenant: TenantId::new("acme").unwrap(),
            occurred_at: OffsetDateTime::UNIX_EPOCH,
            job_id: Some("j".into()),
            robot_id: None,
            seq: Some(4),
            attempt: Some(1),
            data: serde_json::json!({"status": "completed"}),
        };
        let v: Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "job.completed");
        assert_eq!(v["occurred_at"], "1970-01-01T00:00:00Z");
        assert!(v.get("robot_id").is_none());
        assert_eq!(e.subject(), "fleet.events.acme.job.completed");
    }
}
