//! The robot process: connect, register, pull, heartbeat, shut down.
//!
//! [`Robot`] holds the shared state ([`Agent`]); [`Robot::serve`] runs the background loops and
//! the shutdown, and the steppable pieces ([`Robot::register`], [`Robot::handle_offer`],
//! [`Robot::run_job`]) let tests drive one offer or one job at a time.
//!
//! **Registration.** A robot announces itself (session, capabilities, slots) and gets its
//! heartbeat cadence, lease and consumer names back; the orchestrator creates the consumers before
//! answering. `Unavailable` is retried forever (until shutdown); `Refused` is fatal (e.g. the same
//! robot id is live with another state directory). After the NATS connection comes back the robot
//! registers again, so an orchestrator that lost track of it (or its consumers) learns of it.
//!
//! **Shutdown** in three steps (STYLE.md habit 7): stop pulling and say `Stopping`; let running
//! jobs finish for `shutdown_grace`; then stop the rest and release them (retried briefly), give
//! up on reports that still cannot get through, publish a last heartbeat and drain the connection.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use fleet_schemas::robot::{
    ClaimGrant, ROBOT_PROTOCOL_VERSION, RegisterGrant, RegisterRequest, RobotRunState, RunningJob,
};
use fleet_schemas::subjects::RobotVerb;
use fleet_schemas::{JobId, RobotId, SessionId};

use crate::config::{RobotConfig, StateDir};
use crate::executor::Executors;
use crate::heartbeat::{self, CpuSampler};
use crate::job::{self, JobEnd, OfferOutcome};
use crate::lease::{Stop, StopReason};
use crate::pull;
use crate::rpc::{Answer, Orchestrator};

/// Oldest nats-server the robot works with: per-message TTL (heartbeats) arrived in 2.11.
pub const MIN_SERVER: (u64, u64) = (2, 11);
/// Extra time after the grace period for releases to be sent before reports are abandoned.
const RELEASE_WINDOW: Duration = Duration::from_secs(15);
/// Time for tasks to notice they were abandoned.
const ABANDON_WINDOW: Duration = Duration::from_secs(5);
/// Time for the final drain of the connection.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A job the robot is running.
#[derive(Debug, Clone)]
pub struct RunningEntry {
    pub attempt: i32,
    pub stop: Stop,
}

/// State shared by the robot's tasks.
pub struct Agent {
    pub config: RobotConfig,
    pub robot_id: RobotId,
    pub session_id: SessionId,
    pub name: String,
    pub hostname: String,
    /// Declared and implicit, canonical.
    pub capabilities: Vec<String>,
    pub state_dir_id: String,
    pub jobs_dir: PathBuf,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub orch: Orchestrator,
    pub executors: Executors,
    /// One permit per job slot.
    pub slots: Arc<Semaphore>,
    pub state: watch::Sender<RobotRunState>,
    grant: watch::Sender<Option<Arc<RegisterGrant>>>,
    running: Mutex<BTreeMap<JobId, RunningEntry>>,
    /// Beat now (the running set changed).
    pub heartbeat_now: Notify,
    /// Register again (a consumer was missing).
    pub reregister: Notify,
    /// Counts NATS (re)connections.
    connections: watch::Receiver<u64>,
    /// Stop taking work: the caller's shutdown, or a fatal error.
    pub shutdown: CancellationToken,
    /// Give up retrying reports (late in shutdown).
    pub abandon: CancellationToken,
    fatal: Mutex<Option<String>>,
}

impl Agent {
    pub fn grant(&self) -> Option<Arc<RegisterGrant>> {
        self.grant.borrow().clone()
    }

    pub fn grant_watch(&self) -> watch::Receiver<Option<Arc<RegisterGrant>>> {
        self.grant.subscribe()
    }

    pub fn run_state(&self) -> RobotRunState {
        *self.state.borrow()
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, BTreeMap<JobId, RunningEntry>> {
        self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn running_jobs(&self) -> Vec<RunningJob> {
        self.lock_running().iter().map(|(id, e)| RunningJob { job_id: *id, attempt: e.attempt }).collect()
    }

    pub fn add_running(&self, job_id: JobId, entry: RunningEntry) {
        self.lock_running().insert(job_id, entry);
        self.heartbeat_now.notify_one();
    }

    pub fn remove_running(&self, job_id: JobId) {
        self.lock_running().remove(&job_id);
        self.heartbeat_now.notify_one();
    }

    /// Stop every running job with `reason`.
    pub fn stop_all(&self, reason: StopReason) {
        for entry in self.lock_running().values() {
            entry.stop.stop(reason.clone());
        }
    }

    fn fail(&self, message: String) {
        let mut fatal = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
        fatal.get_or_insert(message);
        self.shutdown.cancel();
    }

    fn register_request(&self) -> RegisterRequest {
        RegisterRequest {
            v: ROBOT_PROTOCOL_VERSION,
            session_id: self.session_id,
            name: self.name.clone(),
            hostname: self.hostname.clone(),
            capabilities: self.capabilities.clone(),
            max_jobs: self.config.max_jobs,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            environment: self.config.environment.clone(),
            tags: self.config.tags.clone(),
            state_dir_id: self.state_dir_id.clone(),
        }
    }
}

/// A robot: its shared state and the handles to drive it.
#[derive(Clone)]
pub struct Robot {
    agent: Arc<Agent>,
}

/// Start a robot with the executors its config describes and serve until `shutdown` (see
/// [`Robot::serve`]). Returns an error on a fatal condition, such as a refused registration.
pub async fn run(config: RobotConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let executors = Executors::from_config(&config).context("--runner")?;
    run_with_executors(config, executors, shutdown).await
}

/// [`run`] with the executors given (tests add fake ones).
pub async fn run_with_executors(
    config: RobotConfig,
    executors: Executors,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let robot = Robot::connect(config, executors, shutdown).await?;
    robot.serve().await
}

fn machine_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "unknown".to_owned())
}

impl Robot {
    /// Read the state directory, connect to NATS (in the background: the client keeps retrying
    /// and reconnects by itself later). Does not register.
    pub async fn connect(
        config: RobotConfig,
        executors: Executors,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Robot> {
        anyhow::ensure!(config.max_jobs >= 1, "max_jobs must be at least 1");
        let state_dir = StateDir::open(&config.state_dir)?;
        let robot_id = state_dir.robot_id(config.id.as_ref())?;
        let state_dir_id = state_dir.instance_id()?;
        let capabilities = config.capabilities().context("capabilities")?.to_strings();
        let jobs_dir = config.jobs_dir();
        std::fs::create_dir_all(&jobs_dir)
            .with_context(|| format!("work directory {}", jobs_dir.display()))?;

        let (conn_tx, connections) = watch::channel(0u64);
        let conn_tx = Arc::new(conn_tx);
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .name(format!("fleet-robot {}/{robot_id}", config.tenant))
            .event_callback(move |event| {
                let conn_tx = conn_tx.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => conn_tx.send_modify(|n| *n += 1),
                        async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                        other => tracing::debug!(event = %other, "NATS event"),
                    }
                }
            })
            .connect(config.nats_url.as_str())
            .await
            .with_context(|| format!("NATS_URL {}", config.nats_url))?;
        let js = jetstream::new(client.clone());
        let orch = Orchestrator::new(client.clone(), config.tenant.clone(), robot_id.clone());
        let name = config.name.clone().unwrap_or_else(|| robot_id.to_string());
        let hostname = config.hostname.clone().unwrap_or_else(machine_hostname);
        let slots = Arc::new(Semaphore::new(config.max_jobs as usize));
        let agent = Agent {
            robot_id,
            session_id: SessionId::new(),
            name,
            hostname,
            capabilities,
            state_dir_id,
            jobs_dir,
            client,
            js,
            orch,
            executors,
            slots,
            state: watch::channel(RobotRunState::Online).0,
            grant: watch::channel(None).0,
            running: Mutex::new(BTreeMap::new()),
            heartbeat_now: Notify::new(),
            reregister: Notify::new(),
            connections,
            shutdown: shutdown.child_token(),
            abandon: CancellationToken::new(),
            fatal: Mutex::new(None),
            config,
        };
        Ok(Robot { agent: Arc::new(agent) })
    }

    pub fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }

    pub fn robot_id(&self) -> &RobotId {
        &self.agent.robot_id
    }

    pub fn session_id(&self) -> SessionId {
        self.agent.session_id
    }

    pub fn capabilities(&self) -> &[String] {
        &self.agent.capabilities
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.agent.client
    }

    /// Register, retrying while the orchestrator is unavailable. `Ok(None)` when shut down first;
    /// an error when refused.
    pub async fn register(&self) -> anyhow::Result<Option<Arc<RegisterGrant>>> {
        let agent = &self.agent;
        let req = agent.register_request();
        match agent
            .orch
            .call_retrying::<_, RegisterGrant>(RobotVerb::Register, &req, None, &agent.shutdown)
            .await
        {
            Ok(Answer::Accepted(grant)) => {
                tracing::info!(class_consumer = %grant.class_consumer, robot_consumer = %grant.robot_consumer,
                    lease_ms = grant.lease_ms, "registered");
                let grant = Arc::new(grant);
                agent.grant.send_replace(Some(grant.clone()));
                Ok(Some(grant))
            }
            Ok(Answer::Refused(reason)) => anyhow::bail!("registration refused: {reason}"),
            Err(_) => Ok(None),
        }
    }

    /// Handle one pulled offer (waits for a free slot first).
    pub async fn handle_offer(&self, msg: jetstream::Message) -> OfferOutcome {
        let permit = match self.agent.slots.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return OfferOutcome::ClaimUnavailable,
        };
        job::handle_offer(self.agent.clone(), msg, permit).await
    }

    /// Run one already claimed job to its reported end.
    pub async fn run_job(&self, grant: ClaimGrant, offer_no: i32) -> JobEnd {
        job::run_job(self.agent.clone(), grant, offer_no).await
    }

    /// The run state (commands will change it; for now only shutdown does).
    pub fn set_state(&self, state: RobotRunState) {
        self.agent.state.send_replace(state);
    }

    /// Register, then pull, run and heartbeat until shutdown; then shut down gracefully.
    pub async fn serve(self) -> anyhow::Result<()> {
        let agent = self.agent.clone();
        let span = tracing::info_span!("robot", tenant = %agent.config.tenant, robot = %agent.robot_id,
            session = %agent.session_id);
        let _entered = span.enter();
        tracing::info!(capabilities = ?agent.capabilities, max_jobs = agent.config.max_jobs, "robot starting");
        drop(_entered);

        let first = self.register().await;
        match first {
            Ok(Some(_)) => {}
            Ok(None) => {
                tracing::info!("shut down before registering");
                let _ = tokio::time::timeout(DRAIN_TIMEOUT, agent.client.drain()).await;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        check_server_version(&agent.client)?;

        let beats_stop = CancellationToken::new();
        let beats = tokio::spawn(heartbeat::heartbeat_loop(agent.clone(), beats_stop.clone()));
        let session = tokio::spawn(session_loop(self.clone()));
        let jobs = TaskTracker::new();
        let pulling = tokio::spawn(pull::pull_loop(agent.clone(), jobs.clone()));

        agent.shutdown.cancelled().await;
        tracing::info!("shutting down: no new work");
        agent.state.send_replace(RobotRunState::Stopping);
        let _ = pulling.await;
        session.abort();
        jobs.close();

        let grace = agent.config.shutdown_grace;
        if tokio::time::timeout(grace, jobs.wait()).await.is_err() {
            let left = agent.running_jobs().len();
            tracing::warn!(left, ?grace, "grace period over; stopping and releasing running jobs");
            agent.stop_all(StopReason::Shutdown);
            if tokio::time::timeout(RELEASE_WINDOW, jobs.wait()).await.is_err() {
                tracing::error!("reports still undelivered; abandoning them (leases will expire)");
                agent.abandon.cancel();
                let _ = tokio::time::timeout(ABANDON_WINDOW, jobs.wait()).await;
            }
        }

        beats_stop.cancel();
        let _ = beats.await;
        heartbeat::beat(&agent, RobotRunState::Stopping, &mut CpuSampler::default()).await;
        if tokio::time::timeout(DRAIN_TIMEOUT, agent.client.drain()).await.is_err() {
            tracing::warn!("NATS drain did not finish in time");
        }
        let fatal = agent.fatal.lock().unwrap_or_else(|p| p.into_inner()).take();
        match fatal {
            Some(message) => Err(anyhow::anyhow!(message)),
            None => {
                tracing::info!("robot stopped");
                Ok(())
            }
        }
    }
}

/// Register again after a reconnect or when a consumer went missing.
async fn session_loop(robot: Robot) {
    let agent = robot.agent.clone();
    let mut connections = agent.connections.clone();
    let mut seen = *connections.borrow_and_update();
    loop {
        let why = tokio::select! {
            changed = connections.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = *connections.borrow_and_update();
                if now <= seen {
                    continue;
                }
                seen = now;
                "reconnected to NATS"
            }
            _ = agent.reregister.notified() => "offer consumers missing",
            _ = agent.shutdown.cancelled() => return,
        };
        tracing::info!(why, "registering again");
        match robot.register().await {
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "registration refused; stopping");
                agent.fail(e.to_string());
                return;
            }
        }
    }
}

/// Refuse a server without per-message TTL (heartbeats would never expire).
fn check_server_version(client: &async_nats::Client) -> anyhow::Result<()> {
    let version = client.server_info().version;
    let mut parts = version.split(['.', '-']).map(|p| p.parse::<u64>());
    if let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next())
        && (major, minor) < MIN_SERVER
    {
        anyhow::bail!(
            "nats-server {version} is too old: Fleet needs {}.{} or newer (per-message TTL)",
            MIN_SERVER.0,
            MIN_SERVER.1
        );
    }
    Ok(())
}
