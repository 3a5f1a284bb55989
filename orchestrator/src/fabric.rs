//! The JetStream layout the orchestrator owns: streams, class and robot consumers, the heartbeat
//! and commands buckets, and the reconciler that keeps them there.
//!
//! Creating them once at start is not enough: an operator's `nats consumer rm`, a store lost on
//! a node or a stream deleted by mistake would otherwise leave a class (or every tenant) without
//! work for good. So the active orchestrator reconciles them ([`run`]): on a timer and whenever
//! something meets a missing object (an offer or event publish fails, a robot re-registers
//! because its consumer is gone, the heartbeat watch fails), it looks at what exists, recreates
//! what is missing from configuration, and puts back what PostgreSQL says belongs in it: the
//! queued jobs' offers in a recreated `FLEET_JOBS`, the desired states in a recreated
//! `fleet_commands`. The consumers it needs follow from the leader's view of online robots (one
//! per class and one per robot), not from a memory of what was once created. Every step is
//! idempotent (create only what is absent), so a pass may run at any time and twice.
//!
//! The consumer cache below only spares the hot path (one admission per job) a lookup; each pass
//! replaces it with what the server lists, and a robot's registration checks the server itself.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use fleet_schemas::subjects;
use fleet_schemas::{Class, RobotId, TenantId};
use futures::TryStreamExt;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::Core;
use crate::config::Config;

/// Oldest nats-server with per-message TTL and KV delete markers, which liveness relies on.
pub const MIN_SERVER: (u64, u64) = (2, 11);

/// Consumers `FLEET_JOBS` may have: one per robot plus one per class, for a large fleet.
const MAX_CONSUMERS: i32 = 1_000_000;

/// Pull requests a class consumer may hold at once. It cannot be changed after creation, so it
/// is generous: one waiting pull per robot slot of the class, for large classes.
const MAX_WAITING: i64 = 4096;

/// Shortest gap between two passes: a burst of failures (every robot's pull, every offer
/// publish) asks for a check at once, and one pass answers them all.
const MIN_GAP: Duration = Duration::from_millis(250);

/// Queued offers republished into a recreated `FLEET_JOBS` per pass; the watchdog catches any
/// beyond (their recorded sequences no longer match, see [`crate::offers::Offers::holds`]).
const REPUBLISH_LIMIT: i64 = 100_000;

/// Offers republished at once: enough to pipeline, bounded so a large backlog does not hold
/// thousands of publishes in flight.
const REPUBLISH_IN_FLIGHT: usize = 256;

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

/// Handles to the streams and the buckets, the consumer cache, and the reconciler's signals.
/// The handles address objects by name, so they stay valid when an object is recreated.
pub struct Fabric {
    pub js: jetstream::Context,
    pub jobs: stream::Stream,
    pub robots_kv: kv::Store,
    /// Desired state of each robot (commands); each robot watches its own key.
    pub commands_kv: kv::Store,
    known_consumers: Mutex<HashSet<String>>,
    ack_wait: Duration,
    streams: [stream::Config; 3],
    /// Asks the reconciler for a pass now: something met a missing object.
    pub wake: Arc<Notify>,
    /// Counts recreations of the heartbeat bucket, so the heartbeat watcher watches the new one.
    robots_bucket: watch::Sender<u64>,
}

/// What one pass found missing and recreated.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Repairs {
    pub streams: Vec<String>,
    pub buckets: Vec<&'static str>,
    pub consumers: Vec<String>,
}

impl Repairs {
    fn stream(&self, name: &str) -> bool {
        self.streams.iter().any(|s| s == name)
    }

    fn bucket(&self, name: &str) -> bool {
        self.buckets.contains(&name)
    }
}

fn stream_configs(config: &Config) -> [stream::Config; 3] {
    [
        stream::Config {
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
        },
        stream::Config {
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
        },
        stream::Config {
            name: subjects::LOGS_STREAM.to_owned(),
            description: Some("Fleet job log lines (JSON)".into()),
            subjects: vec![subjects::LOGS_SUBJECTS.to_owned()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: config.logs_max_age,
            ..Default::default()
        },
    ]
}

fn bucket_config(bucket: &'static str) -> kv::Config {
    if bucket == subjects::ROBOTS_BUCKET {
        kv::Config {
            bucket: bucket.to_owned(),
            description: "Fleet robot heartbeats; each entry expires after the heartbeat timeout".into(),
            history: 1,
            storage: stream::StorageType::File,
            // Markers make expiry visible to watchers: the orchestrator sees a robot vanish.
            limit_markers: Some(Duration::from_secs(1)),
            ..Default::default()
        }
    } else {
        kv::Config {
            bucket: bucket.to_owned(),
            description: "Fleet robots' desired state (pause, maintenance, stop); robots watch their key"
                .into(),
            history: 1,
            storage: stream::StorageType::File,
            ..Default::default()
        }
    }
}

const BUCKETS: [&str; 2] = [subjects::ROBOTS_BUCKET, subjects::COMMANDS_BUCKET];

fn is_stream_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(err)
        if err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// The consumers the fleet needs, by name with their filter subjects: one per class of an
/// online robot (shared by the class), one per online robot (its targeted offers).
pub fn needed_consumers<'a>(
    online: impl IntoIterator<Item = (&'a TenantId, &'a RobotId, &'a Class)>,
) -> BTreeMap<String, String> {
    let mut needed = BTreeMap::new();
    for (tenant, robot, class) in online {
        needed.insert(subjects::class_consumer(tenant, class), subjects::class_offers(tenant, class));
        needed.insert(subjects::robot_consumer(tenant, robot), subjects::robot_offers(tenant, robot));
    }
    needed
}

/// Needed consumers the server does not list.
pub fn missing_consumers(
    needed: &BTreeMap<String, String>,
    existing: &HashSet<String>,
) -> Vec<(String, String)> {
    needed.iter().filter(|(name, _)| !existing.contains(*name)).map(|(n, f)| (n.clone(), f.clone())).collect()
}

impl Fabric {
    /// Create or update the streams and the buckets.
    pub async fn setup(client: &async_nats::Client, config: &Config) -> Result<Self, FabricError> {
        check_server_version(&client.server_info().version)?;
        let js = jetstream::new(client.clone());
        let streams = stream_configs(config);
        for s in &streams {
            js.create_or_update_stream(s.clone()).await.map_err(|e| setup(s.name.clone())(e.into()))?;
        }
        let jobs =
            js.get_stream(subjects::JOBS_STREAM).await.map_err(|e| setup(subjects::JOBS_STREAM)(e.into()))?;
        let bucket = |name: &'static str| {
            let js = js.clone();
            async move {
                match js.get_key_value(name).await {
                    Ok(kv) => Ok(kv),
                    Err(_) => {
                        js.create_key_value(bucket_config(name)).await.map_err(|e| setup(name)(e.into()))
                    }
                }
            }
        };
        let robots_kv = bucket(subjects::ROBOTS_BUCKET).await?;
        let commands_kv = bucket(subjects::COMMANDS_BUCKET).await?;
        Ok(Self {
            js,
            jobs,
            robots_kv,
            commands_kv,
            known_consumers: Mutex::new(HashSet::new()),
            ack_wait: config.offer_ack_wait,
            streams,
            wake: Arc::new(Notify::new()),
            robots_bucket: watch::Sender::new(0),
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
        self.ensure_consumer(&name, subjects::class_offers(tenant, class), false).await?;
        Ok(name)
    }

    /// Make sure the consumer of a robot's targeted offers exists.
    pub async fn ensure_robot_consumer(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
    ) -> Result<String, FabricError> {
        let name = subjects::robot_consumer(tenant, robot);
        self.ensure_consumer(&name, subjects::robot_offers(tenant, robot), false).await?;
        Ok(name)
    }

    /// A robot registers: check both of its consumers on the server, not in the cache. A robot
    /// re-registers when it finds a consumer missing, so the cache is exactly what must not
    /// answer.
    pub async fn verify_robot_consumers(
        &self,
        tenant: &TenantId,
        class: &Class,
        robot: &RobotId,
    ) -> Result<(String, String), FabricError> {
        let class_name = subjects::class_consumer(tenant, class);
        let robot_name = subjects::robot_consumer(tenant, robot);
        self.ensure_consumer(&class_name, subjects::class_offers(tenant, class), true).await?;
        self.ensure_consumer(&robot_name, subjects::robot_offers(tenant, robot), true).await?;
        Ok((class_name, robot_name))
    }

    fn consumer_config(&self, name: &str, filter: String) -> consumer::pull::Config {
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
        }
    }

    async fn ensure_consumer(&self, name: &str, filter: String, verify: bool) -> Result<(), FabricError> {
        if !verify && self.known_consumers.lock().expect("not poisoned").contains(name) {
            return Ok(());
        }
        let created = self.jobs.get_or_create_consumer(name, self.consumer_config(name, filter)).await;
        if let Err(e) = created {
            // Most likely the stream itself is gone: ask for a pass.
            self.known_consumers.lock().expect("not poisoned").remove(name);
            self.wake.notify_one();
            return Err(setup(format!("consumer {name}"))(e.into()));
        }
        self.known_consumers.lock().expect("not poisoned").insert(name.to_owned());
        Ok(())
    }

    /// Forget cached consumers (after a NATS server restart they may be gone with its store).
    pub fn forget_consumers(&self) {
        self.known_consumers.lock().expect("not poisoned").clear();
    }

    /// Changes whenever the heartbeat bucket was recreated.
    pub fn robots_bucket_recreated(&self) -> watch::Receiver<u64> {
        self.robots_bucket.subscribe()
    }

    /// Recreate missing streams and buckets from configuration.
    async fn repair_streams_and_buckets(&self, repairs: &mut Repairs) -> Result<(), FabricError> {
        for config in &self.streams {
            let name = config.name.as_str();
            match self.js.get_stream(name).await {
                Ok(_) => {}
                Err(e) if is_stream_not_found(&e) => {
                    self.js.create_stream(config.clone()).await.map_err(|e| setup(name)(e.into()))?;
                    tracing::warn!(stream = name, "stream was missing; recreated it from configuration");
                    repairs.streams.push(name.to_owned());
                }
                Err(e) => return Err(setup(name)(e.into())),
            }
        }
        for bucket in BUCKETS {
            match self.js.get_stream(subjects::bucket_stream(bucket)).await {
                Ok(_) => {}
                Err(e) if is_stream_not_found(&e) => {
                    self.js
                        .create_key_value(bucket_config(bucket))
                        .await
                        .map_err(|e| setup(bucket)(e.into()))?;
                    tracing::warn!(bucket, "KV bucket was missing; recreated it from configuration");
                    repairs.buckets.push(bucket);
                }
                Err(e) => return Err(setup(bucket)(e.into())),
            }
        }
        Ok(())
    }

    /// Recreate the consumers `needed` that the server does not list, and make the cache what
    /// the server holds.
    async fn repair_consumers(
        &self,
        needed: &BTreeMap<String, String>,
        repairs: &mut Repairs,
    ) -> Result<(), FabricError> {
        let existing: HashSet<String> = self
            .jobs
            .consumer_names()
            .try_collect()
            .await
            .map_err(|e| setup(format!("consumers of {}", subjects::JOBS_STREAM))(e.into()))?;
        *self.known_consumers.lock().expect("not poisoned") = existing.clone();
        for (name, filter) in missing_consumers(needed, &existing) {
            self.ensure_consumer(&name, filter, true).await?;
            tracing::warn!(consumer = %name, "offer consumer was missing; recreated it");
            repairs.consumers.push(name);
        }
        Ok(())
    }
}

/// One reconciliation pass: recreate what is missing, then put back what PostgreSQL says
/// belongs in it.
pub async fn reconcile(core: &Core) -> Result<Repairs, FabricError> {
    let fabric = &core.fabric;
    let mut repairs = Repairs::default();
    fabric.repair_streams_and_buckets(&mut repairs).await?;
    let online = core.fleet.online_robots();
    let needed = needed_consumers(online.iter().map(|(t, r, c)| (t, r, c)));
    fabric.repair_consumers(&needed, &mut repairs).await?;
    if repairs.stream(subjects::JOBS_STREAM) {
        republish_queued(core).await;
    }
    if repairs.bucket(subjects::ROBOTS_BUCKET) {
        // No robot could beat while the bucket was gone: give every online one a full timeout
        // from now to beat into the new bucket, and have the watcher watch it.
        core.fleet.touch_online();
        fabric.robots_bucket.send_modify(|n| *n += 1);
    }
    if repairs.bucket(subjects::COMMANDS_BUCKET) {
        refill_commands(core).await;
    }
    if repairs.stream(subjects::EVENTS_STREAM) {
        core.wake_relay.notify_one();
    }
    Ok(repairs)
}

/// The stream was recreated: every queued job's offer went with it. Publish each again as the
/// same offer (same `offer_no`): nothing about the job changed, a robot that claimed it from
/// the old stream holds it already and the copy is refused at claim, and the new sequences are
/// recorded for the watchdog.
async fn republish_queued(core: &Core) {
    match core.store.all_queued_offers(REPUBLISH_LIMIT).await {
        Ok(offers) => {
            tracing::warn!(
                jobs = offers.len(),
                stream = subjects::JOBS_STREAM,
                "re-offering the queued jobs whose offers were lost with the stream"
            );
            for chunk in offers.chunks(REPUBLISH_IN_FLIGHT) {
                futures::future::join_all(chunk.iter().map(|o| core.offers.publish_or_log(o))).await;
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot list queued jobs to re-offer; the watchdog will"),
    }
}

/// The commands bucket was recreated empty: write every robot's desired state back from
/// PostgreSQL (robots re-watch their key and read it).
async fn refill_commands(core: &Core) {
    let robots = match core.store.online_robots().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list robots to refill the commands bucket; registration re-sends");
            return;
        }
    };
    let mut written = 0;
    for (tenant, robot) in robots {
        let (Ok(tenant), Ok(robot)) = (TenantId::new(tenant), RobotId::new(robot)) else { continue };
        match core.store.desired_state(&tenant, &robot).await {
            Ok(Some(desired)) => {
                crate::commands::publish_desired(core, &tenant, &robot, &desired).await;
                written += 1;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, %robot, "cannot read a desired state to refill"),
        }
    }
    tracing::warn!(robots = written, bucket = subjects::COMMANDS_BUCKET, "desired states written back");
}

/// How often a pass runs unasked: the configured interval, but never more than a third of the
/// heartbeat timeout, so a deleted heartbeat bucket is back well before the staleness check
/// could take silent robots offline.
pub fn check_interval(config: &Config) -> Duration {
    config.fabric_check_interval.min(config.heartbeat_timeout / 3).max(MIN_GAP)
}

/// Reconcile until `token` is cancelled: on the timer and whenever [`Fabric::wake`] is notified.
pub async fn run(core: Arc<Core>, token: CancellationToken) {
    let interval = check_interval(&core.config);
    let mut backoff = MIN_GAP;
    loop {
        if let Err(e) = reconcile(&core).await {
            // NATS down or slow: wakes would only repeat the failure, so back off (up to the
            // interval) whatever asks; nothing is lost meanwhile.
            tracing::debug!(error = %e, retry_in = ?backoff, "fabric check failed");
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(interval);
            continue;
        }
        backoff = MIN_GAP;
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(MIN_GAP) => {}
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = core.fabric.wake.notified() => {}
            _ = tokio::time::sleep(interval.saturating_sub(MIN_GAP)) => {}
        }
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

    fn t(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    fn r(s: &str) -> RobotId {
        RobotId::new(s).unwrap()
    }

    fn c(s: &str) -> Class {
        Class::parse(s.split('+')).unwrap()
    }

    #[test]
    fn consumers_follow_from_online_robots() {
        let (acme, beta) = (t("acme"), t("beta"));
        let (r1, r2, r3) = (r("r1"), r("r2"), r("r3"));
        let (shell, gpu) = (c("shell"), c("gpu+shell"));
        let online = [(&acme, &r1, &shell), (&acme, &r2, &shell), (&beta, &r3, &gpu)];
        let needed = needed_consumers(online);
        let names: Vec<&str> = needed.keys().map(String::as_str).collect();
        // One class consumer per (tenant, class), however many robots share it; one per robot.
        assert_eq!(
            names,
            ["acme_ROBOT_r1", "acme_ROBOT_r2", "acme_shell", "beta_ROBOT_r3", "beta_gpuPshell"]
        );
        assert_eq!(needed["acme_shell"], "fleet.jobs.acme.shell");
        assert_eq!(needed["beta_ROBOT_r3"], "fleet.jobs.beta.robot.r3");
    }

    #[test]
    fn only_what_the_server_lacks_is_recreated() {
        let (acme, r1, shell) = (t("acme"), r("r1"), c("shell"));
        let needed = needed_consumers([(&acme, &r1, &shell)]);
        // A deleted class consumer; the robot's own one is there, and a consumer nobody needs
        // (an offline robot's) is left alone.
        let existing: HashSet<String> = ["acme_ROBOT_r1".to_owned(), "acme_ROBOT_gone".to_owned()].into();
        assert_eq!(
            missing_consumers(&needed, &existing),
            vec![("acme_shell".to_owned(), "fleet.jobs.acme.shell".to_owned())]
        );
        assert!(missing_consumers(&needed, &needed.keys().cloned().collect()).is_empty());
        // A recreated stream has no consumers: all are recreated.
        assert_eq!(missing_consumers(&needed, &HashSet::new()).len(), 2);
    }

    #[test]
    fn the_check_interval_stays_below_the_heartbeat_timeout() {
        let config = Config::default();
        assert_eq!(check_interval(&config), Duration::from_secs(5));
        let short = Config { heartbeat_timeout: Duration::from_secs(3), ..Config::default() };
        assert_eq!(check_interval(&short), Duration::from_secs(1));
        let tiny = Config { fabric_check_interval: Duration::from_millis(100), ..Config::default() };
        assert_eq!(check_interval(&tiny), MIN_GAP);
    }
}
