//! A whole Fleet stack for one test: nats-server, database, orchestrator, gateway and robots,
//! each part in-process through its `run` function with its own shutdown token, so a test can
//! stop, crash (abort) and restart any of them.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use fleet_schemas::keys::{Rate, Role};
use fleet_schemas::{Capability, RobotId, TenantId};
use fleet_tests::{NatsServer, TestDb, wait_for};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(20);

/// One running part: its shutdown token and task.
pub struct Part {
    pub token: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl Part {
    /// Graceful stop, bounded.
    pub async fn stop(self) {
        self.token.cancel();
        match tokio::time::timeout(WAIT, self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("part ended with an error: {e:#}"),
            Ok(Err(e)) => panic!("part panicked: {e}"),
            Err(_) => panic!("part did not stop within {WAIT:?}"),
        }
    }

    /// A crash: the task is dropped where it stands, with no goodbye.
    pub async fn crash(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// A gateway without development mode on a stack's NATS, and a client for it; the gateway stops
/// when the last clone is dropped. Clone it with another `http` to send from another address.
#[derive(Clone)]
pub struct Secure {
    pub base: String,
    pub http: reqwest::Client,
    pub guard: std::sync::Arc<tokio_util::sync::DropGuard>,
}

impl Secure {
    pub async fn start(stack: &Stack) -> Secure {
        Self::start_with(stack, |_| {}).await
    }

    /// With the gateway's configuration adjusted (it starts with no rate limit).
    pub async fn start_with(stack: &Stack, adjust: impl FnOnce(&mut fleet_gateway::GatewayConfig)) -> Secure {
        let (base, guard) = stack.start_secure_gateway_with(adjust).await;
        Secure { base, http: stack.http.clone(), guard: std::sync::Arc::new(guard) }
    }

    /// One request with `key` in both headers (as the Canvas sends it): status and JSON body.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let (status, _, body) = self.send_full(method, path, key, body).await;
        (status, body)
    }

    /// Like [`Secure::send`], with the response headers.
    pub async fn send_full(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        send(&self.http, &self.base, method, path, key, body).await
    }
}

/// One request with an optional key (in both headers, as the Canvas sends it) and body; answers
/// status, headers and JSON body.
pub async fn send(
    http: &reqwest::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = http.request(method, format!("{base}{path}"));
    if let Some(key) = key {
        req = req.bearer_auth(key).header("x-api-key", key);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.json().await.unwrap_or(Value::Null))
}

pub struct Stack {
    /// A robot key of tenant `default`, unbound, granting whatever a robot offers: what
    /// [`Stack::robot_config`] gives every robot.
    pub robot_key: String,
    pub nats: NatsServer,
    pub db: TestDb,
    pub orchestrator: Option<Part>,
    pub gateway: Part,
    pub base: String,
    pub http: reqwest::Client,
    pub robots: Vec<Part>,
    pub dirs: tempfile::TempDir,
}

pub fn orchestrator_config(nats: &NatsServer, db: &TestDb) -> fleet_orchestrator::Config {
    fleet_orchestrator::Config {
        nats_url: nats.url(),
        // The harness's client TLS when the server requires TLS; nothing otherwise.
        nats_tls: nats.nats_client().tls,
        database_url: fleet_orchestrator::config::Secret(db.url().to_owned()),
        heartbeat_interval: Duration::from_millis(500),
        heartbeat_timeout: Duration::from_secs(3),
        job_lease: Duration::from_secs(3),
        leader_lease: Duration::from_secs(1),
        sweep_interval: Duration::from_millis(100),
        offer_check_after: Duration::from_secs(3),
        db_pool_size: 4,
        nats_auth_dir: Some(nats.auth_dir()),
        ..Default::default()
    }
}

/// A gateway configuration on `nats` with the gateway's credentials.
pub fn gateway_config(nats: &NatsServer, dev_mode: bool) -> fleet_gateway::GatewayConfig {
    fleet_gateway::GatewayConfig {
        nats_url: nats.url(),
        nats_credentials: nats.gateway_credentials(),
        nats_tls: nats.nats_client().tls,
        dev_mode,
        request_timeout: Duration::from_secs(5),
        // Tests poll the API far faster than a person would.
        rate_limit: None,
        ..Default::default()
    }
}

/// A robot key of `tenant` (role robot) written straight into the database at `db_url` (its
/// migrations applied first), bound to `robot` when given, granting `caps` when given (else
/// whatever the robot offers). Returns the raw key.
pub async fn robot_key(db_url: &str, tenant: &str, robot: Option<&str>, caps: Option<&[&str]>) -> String {
    let config = fleet_orchestrator::Config {
        database_url: fleet_orchestrator::config::Secret(db_url.to_owned()),
        db_pool_size: 1,
        ..Default::default()
    };
    let pool = fleet_orchestrator::cli_pool(&config).await.expect("test database for a robot key");
    let (key_id, secret, full) = fleet_schemas::keys::new_key();
    sqlx::query(
        "INSERT INTO api_keys (key_id, tenant, name, role, secret_sha256, robot_id, capabilities)
         VALUES ($1, $2, 'test robot key', 'robot', $3, $4, $5)",
    )
    .bind(&key_id)
    .bind(tenant)
    .bind(fleet_schemas::keys::secret_hash(&secret))
    .bind(robot)
    .bind(caps.map(|c| c.iter().map(|s| s.to_string()).collect::<Vec<_>>()))
    .execute(&pool)
    .await
    .expect("inserting a robot key");
    pool.close().await;
    full
}

impl Stack {
    /// nats-server, database, orchestrator and gateway (dev mode); no robots yet.
    pub async fn start() -> Stack {
        Self::start_with(|_| {}).await
    }

    /// Like [`Stack::start`], with the orchestrator's configuration adjusted.
    pub async fn start_with(adjust: impl FnOnce(&mut fleet_orchestrator::Config)) -> Stack {
        fleet_tests::init_tracing();
        let nats = NatsServer::start().await.expect("nats-server starts");
        Self::start_on(nats, adjust).await
    }

    /// Like [`Stack::start_with`], on a server the test started itself (e.g. one requiring TLS,
    /// which every part then connects with: see [`NatsServer::nats_client`]).
    pub async fn start_on(nats: NatsServer, adjust: impl FnOnce(&mut fleet_orchestrator::Config)) -> Stack {
        fleet_tests::init_tracing();
        let db = TestDb::create().await.expect("test database");
        let mut config = orchestrator_config(&nats, &db);
        adjust(&mut config);
        let token = CancellationToken::new();
        let task = tokio::spawn(fleet_orchestrator::run(config, token.clone()));
        let orchestrator = Some(Part { token, task });
        let robot_key = robot_key(db.url(), "default", None, None).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let token = CancellationToken::new();
        let config = gateway_config(&nats, true);
        let task = tokio::spawn(fleet_gateway::run(config, listener, token.clone()));
        let stack = Stack {
            robot_key,
            nats,
            db,
            orchestrator,
            gateway: Part { token, task },
            base,
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap(),
            robots: Vec::new(),
            dirs: tempfile::tempdir().unwrap(),
        };
        stack.wait_healthy().await;
        stack
    }

    /// A second gateway on the same NATS, without development mode (keys required), for tests of
    /// keys and roles. Returns its base URL; it stops when the guard is dropped.
    pub async fn start_secure_gateway(&self) -> (String, tokio_util::sync::DropGuard) {
        self.start_secure_gateway_with(|_| {}).await
    }

    /// Like [`Stack::start_secure_gateway`], with the gateway's configuration adjusted (it starts
    /// with no rate limit).
    pub async fn start_secure_gateway_with(
        &self,
        adjust: impl FnOnce(&mut fleet_gateway::GatewayConfig),
    ) -> (String, tokio_util::sync::DropGuard) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let token = CancellationToken::new();
        let mut config = gateway_config(&self.nats, false);
        adjust(&mut config);
        tokio::spawn(fleet_gateway::run(config, listener, token.clone()));
        wait_for("the secure gateway", WAIT, || async {
            let r = self.http.get(format!("{base}/health")).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await
        .unwrap();
        (base, token.drop_guard())
    }

    /// A key of `tenant` made as `fleet-orchestrator api-key create` makes it, with its own rate
    /// limit if `rate` is given.
    pub async fn cli_key(&self, tenant: &str, role: Role, rate: Option<Rate>) -> String {
        let req = fleet_schemas::api::CreateKey {
            name: "cli".into(),
            role,
            description: None,
            expires_at: None,
            robot_id: None,
            rate_limit: rate,
            capabilities: None,
        };
        self.cli_key_with(tenant, &req).await
    }

    /// A key of `tenant` made as `fleet-orchestrator api-key create` makes it, exactly as `req`
    /// says (a robot key with its robot and grant, say).
    pub async fn cli_key_with(&self, tenant: &str, req: &fleet_schemas::api::CreateKey) -> String {
        let config = orchestrator_config(&self.nats, &self.db);
        let tenant = TenantId::new(tenant).unwrap();
        fleet_orchestrator::keys::create_with_config(&config, &tenant, req).await.unwrap()
    }

    pub fn spawn_orchestrator(nats: &NatsServer, db: &TestDb) -> Part {
        let token = CancellationToken::new();
        let task = tokio::spawn(fleet_orchestrator::run(orchestrator_config(nats, db), token.clone()));
        Part { token, task }
    }

    pub async fn wait_healthy(&self) {
        wait_for("the gateway to report healthy", WAIT, || async {
            let r = self.http.get(format!("{}/health", self.base)).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await
        .unwrap();
    }

    /// A robot config for tenant `default` with its own state directory.
    pub fn robot_config(&self, name: &str, caps: &[&str]) -> fleet_robot::RobotConfig {
        let mut c = fleet_robot::RobotConfig::new(TenantId::default_tenant());
        c.nats_url = self.nats.url();
        c.key = Some(fleet_robot::RobotKey::new(&self.robot_key).unwrap());
        c.nats_tls = self.nats.nats_client().tls;
        c.id = Some(RobotId::new(name).unwrap());
        c.name = Some(name.to_owned());
        c.capabilities = caps.iter().map(|s| Capability::new(*s).unwrap()).collect();
        c.state_dir = self.dirs.path().join(name);
        c.shutdown_grace = Duration::from_secs(5);
        c
    }

    pub fn start_robot(&mut self, config: fleet_robot::RobotConfig) {
        let token = CancellationToken::new();
        let keyed = self.keyed(config);
        let stop = token.clone();
        let task = tokio::spawn(async move { fleet_robot::run(keyed.await, stop).await });
        self.robots.push(Part { token, task });
    }

    /// A robot with executors of the test's choosing.
    pub fn start_robot_with(&mut self, config: fleet_robot::RobotConfig, executors: fleet_robot::Executors) {
        let token = CancellationToken::new();
        let keyed = self.keyed(config);
        let stop = token.clone();
        let task =
            tokio::spawn(async move { fleet_robot::run_with_executors(keyed.await, executors, stop).await });
        self.robots.push(Part { token, task });
    }

    /// `config` with a key of its tenant: a test that moved a robot to another tenant than
    /// `default` (and kept the stack's key) gets a robot key of that tenant, as an operator of
    /// that tenant would create it.
    fn keyed(
        &self,
        mut config: fleet_robot::RobotConfig,
    ) -> impl std::future::Future<Output = fleet_robot::RobotConfig> + use<> {
        let default_key = fleet_robot::RobotKey::new(&self.robot_key).unwrap();
        let db_url = self.db.url().to_owned();
        async move {
            if config.key.as_ref() == Some(&default_key) && config.tenant.as_str() != "default" {
                let key = robot_key(&db_url, config.tenant.as_str(), None, None).await;
                config.key = Some(fleet_robot::RobotKey::new(&key).unwrap());
            }
            config
        }
    }

    /// Wait until `n` robots are online and report that they take work (a robot that has just
    /// started reports `online` only once it has read its desired state).
    pub async fn wait_robots_online(&self, n: usize) {
        wait_for(format!("{n} robots online"), WAIT, || async {
            let (_, robots) = self.get("/api/v1/metrics/robots").await;
            let online = robots
                .as_array()?
                .iter()
                .filter(|r| {
                    r["status"] != "offline" && r["state"] == "online" && r["last_heartbeat"].is_string()
                })
                .count();
            (online >= n).then_some(())
        })
        .await
        .unwrap();
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        let p = self.dirs.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.http.post(format!("{}{path}", self.base)).json(body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_raw(&self, path: &str, body: &'static str) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(format!("{}{path}", self.base)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Submit over HTTP; asserts 200 and returns the answer.
    pub async fn submit(&self, body: Value) -> Value {
        let (status, answer) = self.post("/api/v1/workflows", &body).await;
        assert_eq!(status, 200, "submit answered {status}: {answer}");
        answer
    }

    pub async fn job(&self, id: &str) -> Value {
        let (status, job) = self.get(&format!("/api/v1/metrics/jobs/{id}")).await;
        assert_eq!(status, 200, "job {id}: {job}");
        job
    }

    /// Wait until the job reaches a terminal status; returns it.
    pub async fn finished(&self, id: &str) -> Value {
        wait_for(format!("job {id} to finish"), WAIT, || async {
            let (status, job) = self.get(&format!("/api/v1/metrics/jobs/{id}")).await;
            let s = job["status"].as_str().unwrap_or_default().to_owned();
            (status == 200 && ["completed", "failed", "cancelled", "timed_out"].contains(&s.as_str()))
                .then_some(job)
        })
        .await
        .unwrap()
    }

    pub async fn stop(mut self) {
        for robot in self.robots.drain(..) {
            robot.stop().await;
        }
        self.gateway.stop().await;
        if let Some(o) = self.orchestrator.take() {
            o.stop().await;
        }
        drop(self.nats);
        self.db.drop_database().await.unwrap();
    }
}
