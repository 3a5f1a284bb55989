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
//! **Commands** (see [`crate::commands`]): before pulling anything the robot reads its desired
//! state from the `fleet_commands` bucket and then watches it; `paused` and `maintenance` stop the
//! pulling (running jobs go on), a stop order for this session starts the shutdown below.
//!
//! **Shutdown** in three steps (STYLE.md habit 7): stop pulling and say `Stopping`; let running
//! jobs finish for `shutdown_grace` (or, for a forced stop order, not at all); then stop the rest
//! and release them (retried briefly), give up on reports that still cannot get through, delete
//! the heartbeat (so the robot shows offline at once) and drain the connection. The caller's shutdown (SIGTERM, Ctrl-C) and a stop
//! order take the same path; [`run_until_exit`] says which [`Exit`] it was, so `main` can
//! re-execute the robot for a restart order.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use fleet_schemas::robot::{
    ClaimGrant, ROBOT_PROTOCOL_VERSION, RegisterGrant, RegisterRequest, RobotMode, RobotRunState, RunningJob,
    StopOrder,
};
use fleet_schemas::subjects::RobotVerb;
use fleet_schemas::{JobId, RobotId, SessionId};

use crate::commands::{self, Exit};
use crate::config::{RobotConfig, StateDir};
use crate::executor::Executors;
use crate::heartbeat;
use crate::job::{self, JobEnd, OfferOutcome};
use crate::lease::{Stop, StopReason};
use crate::metrics::Metrics;
use crate::pull;
use crate::rpc::{Answer, Orchestrator};

/// Oldest nats-server the robot works with: per-message TTL (heartbeats) arrived in 2.11.
pub const MIN_SERVER: (u64, u64) = (2, 11);
/// Extra time after the grace period for releases to be sent before reports are abandoned.
const RELEASE_WINDOW: Duration = Duration::from_secs(15);
/// Time for tasks to notice they were abandoned.
const ABANDON_WINDOW: Duration = Duration::from_secs(5);
/// Why a job stopped by a pushed cancel stopped.
const CANCELLED: &str = "the job was cancelled";
/// Time for the final drain of the connection.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A job the robot is running.
#[derive(Debug, Clone)]
pub struct RunningEntry {
    pub attempt: i32,
    pub stop: Stop,
}

/// The running jobs, and whether every job must stop at once (late in shutdown), so that a job
/// whose claim was still in flight is stopped as soon as it starts.
#[derive(Default)]
struct Running {
    jobs: BTreeMap<JobId, RunningEntry>,
    stop_all: Option<StopReason>,
    /// Cancels pushed for attempts not (yet) running here: one can overtake its job's start
    /// (the claim is answered, the offer is being acked). Bounded: only the newest
    /// [`EARLY_CANCELS`] are kept, and the renewal refusal covers any other.
    early_cancels: VecDeque<(JobId, i32)>,
}

/// How many pushed cancels for attempts not running yet are remembered (far more than can race
/// the few jobs a robot starts at once).
const EARLY_CANCELS: usize = 64;

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
    /// The desired state has been read once (or found absent): the pull loop waits for it, so a
    /// robot started while paused never claims.
    pub desired_known: watch::Sender<bool>,
    /// The stop order being obeyed, once one for this session arrived.
    pub stop_order: watch::Sender<Option<StopOrder>>,
    /// Custom metrics sent with every heartbeat.
    pub metrics: Arc<Metrics>,
    grant: watch::Sender<Option<Arc<RegisterGrant>>>,
    running: Mutex<Running>,
    /// Beat now (the running set changed).
    pub heartbeat_now: Notify,
    /// Register again (a consumer was missing).
    pub reregister: Notify,
    /// Counts NATS (re)connections.
    connections: watch::Receiver<u64>,
    /// Stop taking work: the caller's shutdown, a stop order, or a fatal error.
    pub shutdown: CancellationToken,
    /// The caller's own shutdown (of which `shutdown` is a child).
    caller_shutdown: CancellationToken,
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

    fn lock_running(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn running_jobs(&self) -> Vec<RunningJob> {
        self.lock_running()
            .jobs
            .iter()
            .map(|(id, e)| RunningJob { job_id: *id, attempt: e.attempt })
            .collect()
    }

    /// A job started; stopped at once when every job has been told to stop already.
    pub fn add_running(&self, job_id: JobId, entry: RunningEntry) {
        let mut running = self.lock_running();
        if let Some(reason) = running.stop_all.clone() {
            entry.stop.stop(reason);
        }
        if let Some(i) = running.early_cancels.iter().position(|c| *c == (job_id, entry.attempt)) {
            running.early_cancels.remove(i);
            entry.stop.stop(StopReason::Fenced(CANCELLED.to_owned()));
        }
        running.jobs.insert(job_id, entry);
    }

    // Jobs starting and ending do not trigger a heartbeat: the orchestrator records claims and
    // completions itself, and a heartbeat per job start and end cost three KV writes, three
    // robot-row updates and a live event per job (fleet-bench `api`). The periodic heartbeat
    // carries the running set.
    pub fn remove_running(&self, job_id: JobId) {
        self.lock_running().jobs.remove(&job_id);
    }

    /// The orchestrator ended this attempt of a job (a cancel pushed on the command subject):
    /// stop it as no longer ours. True when it was running here; a push for another attempt of
    /// a running job changes nothing, and one for a job not running here is remembered in case
    /// the job is just starting.
    pub fn withdraw(&self, job_id: JobId, attempt: i32) -> bool {
        let mut running = self.lock_running();
        match running.jobs.get(&job_id) {
            Some(entry) if entry.attempt == attempt => {
                entry.stop.stop(StopReason::Fenced(CANCELLED.to_owned()));
                true
            }
            Some(_) => false,
            None => {
                if running.early_cancels.len() == EARLY_CANCELS {
                    running.early_cancels.pop_front();
                }
                running.early_cancels.push_back((job_id, attempt));
                false
            }
        }
    }

    /// The report budgets for the server this robot is connected to.
    pub fn budgets(&self) -> crate::bound::Budgets {
        crate::bound::Budgets::for_max_payload(self.client.server_info().max_payload)
    }

    /// Stop every running job with `reason`, and every job that starts from now on.
    pub fn stop_all(&self, reason: StopReason) {
        let mut running = self.lock_running();
        running.stop_all.get_or_insert(reason.clone());
        for entry in running.jobs.values() {
            entry.stop.stop(reason.clone());
        }
    }

    /// Counts NATS (re)connections.
    pub fn connections(&self) -> watch::Receiver<u64> {
        self.connections.clone()
    }

    /// Take work or not, as `mode` says; true when the state changed. A robot that is draining
    /// or stopping stays so.
    pub fn set_mode(&self, mode: RobotMode) -> bool {
        let target = commands::state_for(mode);
        self.state.send_if_modified(|state| {
            if matches!(*state, RobotRunState::Draining | RobotRunState::Stopping) || *state == target {
                return false;
            }
            *state = target;
            true
        })
    }

    /// Obey a stop order for this session: start the shutdown. A later order can make a drain
    /// forced (running jobs cannot be un-released) and decides about the restart. True when it
    /// changed anything.
    pub fn order_stop(&self, order: StopOrder) -> bool {
        let changed = self.stop_order.send_if_modified(|current| {
            let next = match current {
                None => order,
                Some(c) => StopOrder { force: c.force || order.force, ..order },
            };
            if current.as_ref() == Some(&next) {
                return false;
            }
            *current = Some(next);
            true
        });
        self.shutdown.cancel();
        changed
    }

    /// The stop order being obeyed asks to release running jobs at once.
    fn forced(&self) -> bool {
        self.stop_order.borrow().as_ref().is_some_and(|o| o.force)
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

/// Start a robot with the executors its config describes and serve until `shutdown` or a stop
/// order (see [`Robot::serve`]). Returns an error on a fatal condition, such as a refused
/// registration. A restart order ends it like a stop: use [`run_until_exit`] to tell them apart.
pub async fn run(config: RobotConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_until_exit(config, shutdown).await.map(|_| ())
}

/// [`run`], saying how the robot ended: [`Exit::Restart`] when a stop order asked for a restart
/// (the caller starts the robot again; `main` re-executes itself).
pub async fn run_until_exit(config: RobotConfig, shutdown: CancellationToken) -> anyhow::Result<Exit> {
    let executors = Executors::from_config(&config).context("--runner")?;
    run_with_executors_until_exit(config, executors, shutdown).await
}

/// [`run`] with the executors given (tests add fake ones).
pub async fn run_with_executors(
    config: RobotConfig,
    executors: Executors,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with_executors_until_exit(config, executors, shutdown).await.map(|_| ())
}

/// [`run_until_exit`] with the executors given.
pub async fn run_with_executors_until_exit(
    config: RobotConfig,
    executors: Executors,
    shutdown: CancellationToken,
) -> anyhow::Result<Exit> {
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
        let credentials = match &config.key {
            Some(key) => fleet_nats_auth::Credentials::robot(key.expose(), robot_id.as_str())?,
            None => fleet_nats_auth::Credentials::None,
        };
        // The name carries the capabilities the robot offers: the auth callout reads them there
        // (the key decides which it may claim).
        let nats = fleet_connect::NatsClient::new(config.nats_url.clone(), config.nats_tls.clone());
        // A certificate the server refuses (or a server the CA did not sign) is an error now,
        // with the reason: in the background the client would retry forever, saying "IO error".
        nats.check_tls().await?;
        let options = nats
            .options()?
            .retry_on_initial_connect()
            .reconnect_delay_callback(fleet_nats_auth::client::reconnect_delay)
            .name(fleet_nats_auth::permissions::robot_connection_name(&robot_id, &capabilities));
        let client = credentials
            .apply(options)?
            .event_callback(move |event| {
                let conn_tx = conn_tx.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => conn_tx.send_modify(|n| *n += 1),
                        async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                        // A refused TLS handshake (wrong CA, no client certificate) or an
                        // unreachable server: said at warn, since the robot keeps retrying.
                        async_nats::Event::ClientError(e) => {
                            tracing::warn!(error = %e, "cannot connect to NATS")
                        }
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
        let metrics = Arc::new(Metrics::new(config.metrics.clone()));
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
            desired_known: watch::channel(false).0,
            stop_order: watch::channel(None).0,
            metrics,
            grant: watch::channel(None).0,
            running: Mutex::new(Running::default()),
            heartbeat_now: Notify::new(),
            reregister: Notify::new(),
            connections,
            shutdown: shutdown.child_token(),
            caller_shutdown: shutdown,
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

    /// Set the run state directly (commands and shutdown normally do).
    pub fn set_state(&self, state: RobotRunState) {
        self.agent.state.send_replace(state);
    }

    /// Register, then obey the desired state, pull, run and heartbeat until shutdown or a stop
    /// order; then shut down gracefully. Says whether a restart was ordered.
    pub async fn serve(self) -> anyhow::Result<Exit> {
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
                return Ok(Exit::Stopped);
            }
            Err(e) => return Err(e),
        }
        check_server_version(&agent.client)?;

        let beats_stop = CancellationToken::new();
        let beats = tokio::spawn(heartbeat::heartbeat_loop(agent.clone(), beats_stop.clone()));
        let session = tokio::spawn(session_loop(self.clone()));
        // The command watcher outlives the pulling: a drain can still be made forced.
        let commands_stop = CancellationToken::new();
        let commands = tokio::spawn(commands::command_loop(agent.clone(), commands_stop.clone()));
        let jobs = TaskTracker::new();
        let pulling = tokio::spawn(pull::pull_loop(agent.clone(), jobs.clone()));

        agent.shutdown.cancelled().await;
        match agent.stop_order.borrow().as_ref() {
            Some(order) => tracing::info!(
                force = order.force,
                restart = order.restart,
                "stop order: shutting down, no new work"
            ),
            None => tracing::info!("shutting down: no new work"),
        }
        agent.state.send_replace(RobotRunState::Stopping);
        let _ = pulling.await;
        session.abort();
        jobs.close();

        let grace = agent.config.shutdown_grace;
        let mut orders = agent.stop_order.subscribe();
        let forced = async {
            while !orders.borrow_and_update().as_ref().is_some_and(|o| o.force) {
                if orders.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        let finished = tokio::select! {
            done = tokio::time::timeout(grace, jobs.wait()) => done.is_ok(),
            _ = forced => false,
        };
        if !finished {
            let left = agent.running_jobs().len();
            if agent.forced() {
                tracing::info!(left, "forced stop: stopping and releasing running jobs at once");
            } else {
                tracing::warn!(left, ?grace, "grace period over; stopping and releasing running jobs");
            }
            agent.stop_all(StopReason::Shutdown);
            if tokio::time::timeout(RELEASE_WINDOW, jobs.wait()).await.is_err() {
                tracing::error!("reports still undelivered; abandoning them (leases will expire)");
                agent.abandon.cancel();
                let _ = tokio::time::timeout(ABANDON_WINDOW, jobs.wait()).await;
            }
        }
        commands_stop.cancel();
        let _ = commands.await;

        beats_stop.cancel();
        let _ = beats.await;
        heartbeat::goodbye(&agent).await;
        if tokio::time::timeout(DRAIN_TIMEOUT, agent.client.drain()).await.is_err() {
            tracing::warn!("NATS drain did not finish in time");
        }
        let fatal = agent.fatal.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(message) = fatal {
            return Err(anyhow::anyhow!(message));
        }
        // The caller's own shutdown (a signal) overrides a restart order: it asked for an exit.
        let restart = agent.stop_order.borrow().as_ref().is_some_and(|o| o.restart)
            && !agent.caller_shutdown.is_cancelled();
        if restart {
            tracing::info!("robot stopped; restarting as ordered");
            Ok(Exit::Restart)
        } else {
            tracing::info!("robot stopped");
            Ok(Exit::Stopped)
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
