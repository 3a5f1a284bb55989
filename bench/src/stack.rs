//! A whole Fleet stack inside the bench process, started like the end-to-end tests start theirs.
//!
//! nats-server and the database come from `fleet_testkit` (random port, throwaway database).
//! The orchestrator, the gateway and the robots run through their own `run` functions, each part
//! on a tokio runtime of its own whose threads carry the part's name (`fleet-orch`, `fleet-gw`,
//! `fleet-robots`): every task a part spawns lands on its runtime, so the CPU time of each part
//! can be read per thread from `/proc/self/task` (see [`crate::procfs`]). This is also closer to
//! production, where each part is a process with its own runtime, than one shared runtime.
//!
//! Robots get a no-op executor for the Fleet format, so a job costs the fabric's work only and
//! no process is spawned per job.

use std::net::{Ipv4Addr, TcpListener as StdListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use fleet_orchestrator::config::Secret;
use fleet_robot::{Execution, Executor, Executors, JobContext, RobotConfig, RunReport};
use fleet_schemas::api::{API_VERSION, ApiRequest, ApiResult, Empty, Endpoint, Pong, SubmitJob, Submitted};
use fleet_schemas::codec::{decode, encode};
use fleet_schemas::robot::ClaimGrant;
use fleet_schemas::workflow::WorkflowFormat;
use fleet_schemas::{Capability, RequestId, RobotId, TenantId};
use fleet_testkit::{NatsServer, TestDb, wait_for};
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Bound on start-up waits (leader elected, robots registered, gateway healthy). The parts start
/// in about a second here; a loaded 2-core machine gets ample room without hiding a hang.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on a graceful stop of one part.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Time one bench request to the orchestrator may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A robot executor that does nothing and succeeds: the job costs only the fabric's work.
pub struct NoOp;

impl Executor for NoOp {
    fn execute<'a>(&'a self, _grant: &'a ClaimGrant, _ctx: &'a JobContext) -> BoxFuture<'a, Execution> {
        Box::pin(async { Execution::Finished(RunReport::completed(serde_json::Value::Null)) })
    }
}

/// How to start the stack.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Worker threads of each part's runtime.
    pub worker_threads: usize,
    /// Orchestrator PostgreSQL pool size.
    pub db_pool_size: u32,
    /// Start the HTTP gateway.
    pub gateway: bool,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// The orchestrator's `prefetch`; `None` keeps its default.
    pub prefetch: Option<u32>,
}

impl Default for StackOptions {
    fn default() -> Self {
        let defaults = fleet_orchestrator::Config::default();
        Self {
            worker_threads: 2,
            db_pool_size: defaults.db_pool_size,
            gateway: true,
            heartbeat_interval: defaults.heartbeat_interval,
            heartbeat_timeout: defaults.heartbeat_timeout,
            prefetch: None,
        }
    }
}

/// One running part: its shutdown token and task.
struct Part {
    token: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Part {
    async fn stop(self, what: &str) -> anyhow::Result<()> {
        self.token.cancel();
        match tokio::time::timeout(STOP_TIMEOUT, self.task).await {
            Ok(Ok(result)) => result.with_context(|| format!("{what} ended with an error")),
            Ok(Err(e)) => bail!("{what} panicked: {e}"),
            Err(_) => bail!("{what} did not stop within {STOP_TIMEOUT:?}"),
        }
    }
}

/// The bench's own connection to the test database. Every statement the bench itself runs is
/// counted, so that the per-job commit figures can leave them out.
#[derive(Clone)]
pub struct BenchDb {
    pub pool: PgPool,
    pub name: String,
    statements: Arc<AtomicU64>,
}

impl BenchDb {
    /// The pool, counting one statement (one autocommit transaction) against the bench.
    pub fn counted(&self) -> &PgPool {
        self.statements.fetch_add(1, Ordering::Relaxed);
        &self.pool
    }

    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }
}

pub struct Stack {
    pub nats: NatsServer,
    pub db: TestDb,
    pub bench_db: BenchDb,
    /// The bench's own NATS connection (load, probes).
    pub client: async_nats::Client,
    pub http: reqwest::Client,
    /// `http://127.0.0.1:<port>` of the gateway, when started.
    pub base: Option<String>,
    pub tenant: TenantId,
    pub options: StackOptions,
    orchestrator: Option<Part>,
    gateway: Option<Part>,
    robots: Vec<(String, Part)>,
    runtimes: Vec<PartRuntime>,
    robot_rt: usize,
    dirs: tempfile::TempDir,
    /// The key every bench robot connects with.
    robot_key: String,
}

/// A runtime for one part, whose threads are all named `name`. Dropping it shuts it down
/// without waiting (dropping a runtime inside another one would panic).
pub struct PartRuntime(Option<Runtime>);

impl std::ops::Deref for PartRuntime {
    type Target = Runtime;

    fn deref(&self) -> &Runtime {
        self.0.as_ref().expect("present until dropped")
    }
}

impl Drop for PartRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

pub fn runtime(name: &str, threads: usize) -> anyhow::Result<PartRuntime> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name(name)
        .enable_all()
        .build()
        .with_context(|| format!("cannot build the {name} runtime"))?;
    Ok(PartRuntime(Some(rt)))
}

impl Stack {
    /// nats-server, a fresh database, the orchestrator (leading) and, if asked, the gateway
    /// (dev mode, so requests act as tenant `default`). No robots yet.
    pub async fn start(options: StackOptions) -> anyhow::Result<Stack> {
        let nats = NatsServer::start().await.context("starting nats-server")?;
        let db = TestDb::create().await.context("creating the test database")?;
        let orch_rt = runtime("fleet-orch", options.worker_threads)?;
        let gw_rt = runtime("fleet-gw", options.worker_threads)?;
        let robot_rt = runtime("fleet-robots", options.worker_threads)?;

        let defaults = fleet_orchestrator::Config::default();
        let config = fleet_orchestrator::Config {
            nats_url: nats.url(),
            database_url: Secret(db.url().to_owned()),
            db_pool_size: options.db_pool_size,
            heartbeat_interval: options.heartbeat_interval,
            heartbeat_timeout: options.heartbeat_timeout,
            prefetch: options.prefetch.unwrap_or(defaults.prefetch),
            nats_auth_dir: Some(nats.auth_dir()),
            ..defaults
        };
        let token = CancellationToken::new();
        let task = orch_rt.spawn(fleet_orchestrator::run(config, token.clone()));
        let orchestrator = Some(Part { token, task });

        let client = nats
            .orchestrator_credentials()
            .apply(nats.nats_client().options()?.name("fleet-bench").request_timeout(Some(REQUEST_TIMEOUT)))?
            .connect(nats.url())
            .await
            .context("bench connection to NATS")?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect(db.url())
            .await
            .context("bench connection to the test database")?;
        let bench_db = BenchDb { pool, name: db.name().to_owned(), statements: Arc::new(AtomicU64::new(0)) };
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(4096)
            .build()
            .context("HTTP client")?;

        let mut stack = Stack {
            nats,
            db,
            bench_db,
            client,
            http,
            base: None,
            tenant: TenantId::default_tenant(),
            options: options.clone(),
            orchestrator,
            gateway: None,
            robots: Vec::new(),
            runtimes: vec![orch_rt, gw_rt, robot_rt],
            robot_rt: 2,
            dirs: tempfile::tempdir().context("robot state directories")?,
            robot_key: String::new(),
        };
        stack.wait_leader().await?;
        stack.robot_key = stack.insert_robot_key().await?;
        if options.gateway {
            stack.start_gateway().await?;
        }
        Ok(stack)
    }

    async fn start_gateway(&mut self) -> anyhow::Result<()> {
        let listener = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the gateway port")?;
        listener.set_nonblocking(true)?;
        let base = format!("http://{}", listener.local_addr()?);
        let config = fleet_gateway::GatewayConfig {
            nats_url: self.nats.url(),
            nats_credentials: self.nats.gateway_credentials(),
            dev_mode: true,
            // The benchmark measures the fabric, not the per-key limit (issue 6: "rate limits
            // raised by configuration").
            rate_limit: None,
            ..Default::default()
        };
        let token = CancellationToken::new();
        let shutdown = token.clone();
        let task = self.runtimes[1].spawn(async move {
            // Registered with the gateway's own runtime, so its I/O is driven by its threads.
            let listener = tokio::net::TcpListener::from_std(listener)?;
            fleet_gateway::run(config, listener, shutdown).await
        });
        self.gateway = Some(Part { token, task });
        let http = self.http.clone();
        let health = format!("{base}/health");
        wait_for("the gateway to report healthy", START_TIMEOUT, || async {
            let r = http.get(&health).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await?;
        self.base = Some(base);
        Ok(())
    }

    /// A robot key of the bench tenant (unbound, granting what robots offer), as an operator
    /// would create one; every bench robot enrols with it.
    async fn insert_robot_key(&self) -> anyhow::Result<String> {
        let (key_id, secret, full) = fleet_schemas::keys::new_key();
        sqlx::query(
            "INSERT INTO api_keys (key_id, tenant, name, role, secret_sha256) VALUES ($1, $2, 'bench robots', 'robot', $3)",
        )
        .bind(&key_id)
        .bind(self.tenant.as_str())
        .bind(fleet_schemas::keys::secret_hash(&secret))
        .execute(&self.bench_db.pool)
        .await
        .context("creating the bench robots' key")?;
        Ok(full)
    }

    async fn wait_leader(&self) -> anyhow::Result<()> {
        wait_for("the orchestrator to lead", START_TIMEOUT, || async {
            let pong: Pong = self.api(Endpoint::Ping, Empty {}).await.ok()?;
            pong.leader.then_some(())
        })
        .await
    }

    /// One API request over NATS, as the gateway makes it.
    pub async fn api<B: Serialize, R: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        body: B,
    ) -> anyhow::Result<R> {
        api_call(&self.client, &self.tenant, endpoint, body).await
    }

    /// Start `count` robots named `<prefix>-<i>` with `caps`, each with `max_jobs` slots and the
    /// no-op executor, and wait until the orchestrator has them all online.
    pub async fn start_robots(
        &mut self,
        prefix: &str,
        count: usize,
        caps: &[&str],
        max_jobs: u32,
    ) -> anyhow::Result<Vec<String>> {
        let mut names = Vec::with_capacity(count);
        for i in 0..count {
            let name = format!("{prefix}-{i}");
            let mut config = RobotConfig::new(self.tenant.clone());
            config.nats_url = self.nats.url();
            config.key = Some(fleet_robot::RobotKey::new(&self.robot_key).map_err(anyhow::Error::msg)?);
            config.id = Some(RobotId::new(&name)?);
            config.name = Some(name.clone());
            config.capabilities = caps.iter().map(|c| Capability::new(*c)).collect::<Result<_, _>>()?;
            config.max_jobs = max_jobs;
            config.state_dir = self.dirs.path().join(&name);
            config.shutdown_grace = Duration::from_secs(5);
            let mut executors = Executors::default();
            executors.insert(WorkflowFormat::Fleet, Arc::new(NoOp));
            let token = CancellationToken::new();
            let task = self.runtimes[self.robot_rt].spawn(fleet_robot::run_with_executors(
                config,
                executors,
                token.clone(),
            ));
            self.robots.push((name.clone(), Part { token, task }));
            names.push(name);
        }
        let db = self.bench_db.clone();
        let wanted = names.clone();
        wait_for(format!("{count} robots to register"), START_TIMEOUT, || async {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM robots WHERE online AND robot_id = ANY($1)")
                    .bind(&wanted)
                    .fetch_one(db.counted())
                    .await
                    .ok()?;
            (n as usize == wanted.len()).then_some(())
        })
        .await?;
        Ok(names)
    }

    /// Stop robots, gateway and orchestrator gracefully (in that order), then the runtimes.
    /// The database is dropped with the stack unless the caller keeps it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        let robots: Vec<_> = self.robots.drain(..).collect();
        for (_, robot) in &robots {
            robot.token.cancel();
        }
        for (name, robot) in robots {
            if let Err(e) = robot.stop(&format!("robot {name}")).await {
                problems.push(format!("{e:#}"));
            }
        }
        if let Some(gw) = self.gateway.take()
            && let Err(e) = gw.stop("gateway").await
        {
            problems.push(format!("{e:#}"));
        }
        if let Some(o) = self.orchestrator.take()
            && let Err(e) = o.stop("orchestrator").await
        {
            problems.push(format!("{e:#}"));
        }
        self.bench_db.pool.close().await;
        self.runtimes.clear();
        if problems.is_empty() { Ok(()) } else { bail!("stopping the stack: {}", problems.join("; ")) }
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms_now() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// One API request over NATS with the gateway's envelope and a deadline of [`REQUEST_TIMEOUT`].
pub async fn api_call<B: Serialize, R: DeserializeOwned>(
    client: &async_nats::Client,
    tenant: &TenantId,
    endpoint: Endpoint,
    body: B,
) -> anyhow::Result<R> {
    let envelope = ApiRequest {
        v: API_VERSION,
        actor: None,
        request_id: RequestId::new(),
        tenant: tenant.clone(),
        deadline_unix_ms: unix_ms_now() + REQUEST_TIMEOUT.as_millis() as i64,
        body,
    };
    let request = async_nats::client::Request::new()
        .payload(encode(&envelope).into())
        .timeout(Some(REQUEST_TIMEOUT + Duration::from_secs(2)));
    let reply = client
        .send_request(endpoint.subject(), request)
        .await
        .with_context(|| format!("{} request", endpoint.subject()))?;
    let result: ApiResult<R> = decode("API reply", &reply.payload)?;
    Ok(result?)
}

/// The no-op workflow every bench job runs (the robots' no-op executor ignores its steps; they
/// only have to validate).
pub fn noop_workflow() -> serde_json::Value {
    serde_json::json!({"steps": [{"id": "noop", "kind": "log", "message": "noop"}]})
}

/// A submission of the no-op workflow named `name` requiring `requires`.
pub fn noop_job(name: &str, requires: &[&str]) -> SubmitJob {
    SubmitJob {
        workflow_name: name.to_owned(),
        workflow: noop_workflow(),
        priority: 10,
        trigger_type: "manual".into(),
        execution_mode: "lan".into(),
        variables: Default::default(),
        required_capabilities: requires.iter().map(|s| (*s).to_owned()).collect(),
        target_robot_id: None,
        timeout_s: None,
        metadata: Default::default(),
        idempotency_key: None,
    }
}

/// Submit over NATS; returns the committed job id.
pub async fn submit_nats(
    client: &async_nats::Client,
    tenant: &TenantId,
    job: &SubmitJob,
) -> anyhow::Result<uuid::Uuid> {
    let submitted: Submitted = api_call(client, tenant, Endpoint::SubmitJob, job).await?;
    Ok(submitted.job_id.0)
}

/// Submit over HTTP (`POST /api/v1/workflows`); returns the committed job id.
pub async fn submit_http(
    http: &reqwest::Client,
    base: &str,
    name: &str,
    requires: &[&str],
) -> anyhow::Result<uuid::Uuid> {
    let body = serde_json::json!({
        "workflow_name": name,
        "workflow_json": noop_workflow(),
        "required_capabilities": requires,
    });
    let response = http.post(format!("{base}/api/v1/workflows")).json(&body).send().await?;
    let status = response.status();
    let answer: serde_json::Value = response.json().await.unwrap_or_default();
    if status != 200 {
        bail!("submit answered {status}: {answer}");
    }
    let id = answer["job_id"].as_str().context("submit answer without job_id")?;
    Ok(id.parse()?)
}
