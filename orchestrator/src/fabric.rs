//! The JetStream layout the orchestrator owns: streams, class and robot consumers, the heartbeat
//! bucket. Everything here is idempotent (create or update), so any instance may run it at start.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use fleet_schemas::subjects;
use fleet_schemas::{Class, RobotId, TenantId};

use crate::config::Config;

/// Oldest nats-server with per-message TTL and KV delete markers, which liveness relies on.
pub const MIN_SERVER: (u64, u64) = (2, 11);

/// Consumers `FLEET_JOBS` may have: one per robot plus one per class, for a large fleet.
const MAX_CONSUMERS: i32 = 1_000_000;

/// Pull requests a class consumer may hold at once. It cannot be changed after creation, so it
/// is generous: one waiting pull per robot slot of the class, for large classes.
const MAX_WAITING: i64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    #[error(
        "nats-server {0} is too old: Fleet needs {major}.{minor} or newer (per-message TTL and KV delete markers); scripts/install-nats installs 2.15.1",
        major = MIN_SERVER.0,
        minor = MIN_SERVER.1
    )]
    ServerTooOld(String),
    #[error("setting up JetStream {what}: {source}")]
    Setup {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn setup(what: impl Into<String>) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> FabricError {
    let what = what.into();
    move |source| FabricError::Setup { what, source }
}

/// Refuse servers older than [`MIN_SERVER`].
pub fn check_server_version(version: &str) -> Result<(), FabricError> {
    let mut parts = version.trim_start_matches('v').split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    if (major, minor) < MIN_SERVER { Err(FabricError::ServerTooOld(version.to_owned())) } else { Ok(()) }
}

/// Handles to the streams and the bucket, plus a cache of consumers known to exist.
pub struct Fabric {
    pub js: jetstream::Context,
    pub jobs: stream::Stream,
    pub robots_kv: kv::Store,
    /// Desired state of each robot (commands); each robot watches its own key.
    pub commands_kv: kv::Store,
    known_consumers: Mutex<HashSet<String>>,
    ack_wait: Duration,
}

impl Fabric {
    /// Create or update the streams and the bucket.
    pub async fn setup(client: &async_nats::Client, config: &Config) -> Result<Self, FabricError> {
        check_server_version(&client.server_info().version)?;
        let js = jetstream::new(client.clone());
        js.create_or_update_stream(stream::Config {
            name: subjects::JOBS_STREAM.to_owned(),
            description: Some("Fleet job offers (ids only), one work queue for all classes".into()),
            subjects: vec![subjects::JOBS_SUBJECTS.to_owned()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            // One consumer per class and one per robot: nats-server 2.15 caps a stream at 1,000
            // consumers unless the stream says otherwise, which a fleet of a thousand robots
            // reaches (fleet-bench fleet-scale).
            max_consumers: MAX_CONSUMERS,
            ..Default::default()
        })
        .await
        .map_err(|e| setup(subjects::JOBS_STREAM)(e.into()))?;
        let jobs =
            js.get_stream(subjects::JOBS_STREAM).await.map_err(|e| setup(subjects::JOBS_STREAM)(e.into()))?;
        js.create_or_update_stream(stream::Config {
            name: subjects::EVENTS_STREAM.to_owned(),
            description: Some("Fleet events (JSON), one per state change".into()),
            subjects: vec![subjects::EVENTS_SUBJECTS.to_owned()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: config.events_max_age,
            max_bytes: config.events_max_bytes,
            deny_delete: true,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| setup(subjects::EVENTS_STREAM)(e.into()))?;
        js.create_or_update_stream(stream::Config {
            name: subjects::LOGS_STREAM.to_owned(),
            description: Some("Fleet job log lines (JSON)".into()),
            subjects: vec![subjects::LOGS_SUBJECTS.to_owned()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: config.logs_max_age,
            ..Default::default()
        })
        .await
        .map_err(|e| setup(subjects::LOGS_STREAM)(e.into()))?;
        let robots_kv = match js.get_key_value(subjects::ROBOTS_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: subjects::ROBOTS_BUCKET.to_owned(),
                    description: "Fleet robot heartbeats; each entry expires after the heartbeat timeout"
                        .into(),
                    history: 1,
                    storage: stream::StorageType::File,
                    // Markers make expiry visible to watchers: the orchestrator sees a robot vanish.
                    limit_markers: Some(Duration::from_secs(1)),
                    ..Default::default()
                })
                .await
                .map_err(|e| setup(subjects::ROBOTS_BUCKET)(e.into()))?,
        };
        let commands_kv = match js.get_key_value(subjects::COMMANDS_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: subjects::COMMANDS_BUCKET.to_owned(),
                    description:
                        "Fleet robots' desired state (pause, maintenance, stop); robots watch their key"
                            .into(),
                    history: 1,
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| setup(subjects::COMMANDS_BUCKET)(e.into()))?,
        };
        Ok(Self {
            js,
            jobs,
            robots_kv,
            commands_kv,
            known_consumers: Mutex::new(HashSet::new()),
            ack_wait: config.offer_ack_wait,
        })
    }

    /// Make sure the consumer of a class exists (before any offer is published to it: a message
    /// on a subject no consumer covers would stay in the work queue forever).
    pub async fn ensure_class_consumer(
        &self,
        tenant: &TenantId,
        class: &Class,
    ) -> Result<String, FabricError> {
        let name = subjects::class_consumer(tenant, class);
        self.ensure_consumer(&name, subjects::class_offers(tenant, class)).await?;
        Ok(name)
    }

    /// Make sure the consumer of a robot's targeted offers exists.
    pub async fn ensure_robot_consumer(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
    ) -> Result<String, FabricError> {
        let name = subjects::robot_consumer(tenant, robot);
        self.ensure_consumer(&name, subjects::robot_offers(tenant, robot)).await?;
        Ok(name)
    }

    async fn ensure_consumer(&self, name: &str, filter: String) -> Result<(), FabricError> {
        if self.known_consumers.lock().expect("not poisoned").contains(name) {
            return Ok(());
        }
        self.jobs
            .get_or_create_consumer(
                name,
                consumer::pull::Config {
                    durable_name: Some(name.to_owned()),
                    description: Some("Fleet offers; robots pull one at a time, least busy first".into()),
                    filter_subject: filter,
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: self.ack_wait,
                    max_waiting: MAX_WAITING,
                    priority_policy: consumer::PriorityPolicy::Prioritized,
                    priority_groups: vec![subjects::PULL_GROUP.to_owned()],
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| setup(format!("consumer {name}"))(e.into()))?;
        self.known_consumers.lock().expect("not poisoned").insert(name.to_owned());
        Ok(())
    }

    /// Forget cached consumers (after a NATS server restart they may be gone with its store).
    pub fn forget_consumers(&self) {
        self.known_consumers.lock().expect("not poisoned").clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_check() {
        assert!(check_server_version("2.9.25").is_err());
        assert!(check_server_version("2.10.0").is_err());
        assert!(check_server_version("2.11.0").is_ok());
        assert!(check_server_version("2.15.1").is_ok());
        assert!(check_server_version("3.0.0").is_ok());
        let msg = check_server_version("2.9.25").unwrap_err().to_string();
        assert!(msg.contains("2.9.25") && msg.contains("2.11"), "{msg}");
    }
}
