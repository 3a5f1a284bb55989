//! Fleet's orchestrator: the brain of the fabric.
//!
//! It owns PostgreSQL (the record of jobs and robots), admits jobs to robot classes, publishes
//! offers on JetStream, records claims, renewals and completions with fencing, watches robot
//! heartbeats, sweeps expired leases and relays the history outbox as events. Several instances
//! may run; one leads (see [`leader`]) and the others stand by.

pub mod analytics;
pub mod api;
pub mod audit;
pub mod batch;
pub mod callout;
pub mod commands;
pub mod config;
pub mod fabric;
pub mod fleet;
pub mod heartbeats;
pub mod http_robots;
pub mod job_pages;
pub mod keys;
pub mod leader;
pub mod nats_admin;
pub mod offers;
pub mod registry;
pub mod relay;
pub mod retry;
pub mod robots;
pub mod secrets;
pub mod store;
pub mod sweeper;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::fabric::Fabric;
use crate::fleet::FleetView;
use crate::leader::Leadership;
use crate::offers::Offers;
use crate::store::Store;

/// Requests handled at once per subscription. Past it, new requests wait in the subscription's
/// buffer (and, past that, NATS reports slow consumer), which bounds memory under overload.
const MAX_IN_FLIGHT: usize = 1024;

/// Everything the leader's tasks share.
pub struct Core {
    pub config: Config,
    pub client: async_nats::Client,
    pub fabric: Fabric,
    pub store: Store,
    pub fleet: FleetView,
    pub leadership: Arc<Leadership>,
    pub offers: Offers,
    /// Wakes the relay after a commit that wrote history rows.
    pub wake_relay: Notify,
    /// Wakes the admission pass (a slot freed, a robot came online, a job went pending).
    pub wake_admission: Notify,
    pub health: sweeper::Health,
    /// Where admission resumes reading the pending queue.
    pub admission: sweeper::AdmissionCursor,
    /// One at a time per HTTP robot: the choice of its session.
    pub http_sessions: http_robots::SessionLocks,
    /// The auth callout's issuer and system connection (`None` on an unlocked server).
    pub auth: Option<callout::Auth>,
    /// The secrets master key; `None` when `secrets_key_file` is not set (see [`secrets`]).
    pub secrets: Option<secrets::SecretsKey>,
}

/// Run an orchestrator until `shutdown`: connect, migrate, set up JetStream, then lead or stand
/// by. Safe to start any number of times against the same database and NATS.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // A key file that is set but unreadable stops the start: running on would refuse every
    // job that uses a secret, far from the cause.
    let secrets_key = config.secrets_key_file.as_deref().map(secrets::SecretsKey::load).transpose()?;
    let pool = connect_db(&config, &shutdown).await?;
    let Some(pool) = pool else { return Ok(()) };
    sqlx::migrate!("../migrations").run(&pool).await.context("applying database migrations")?;

    let keys = match &config.nats_auth_dir {
        Some(dir) => Some(fleet_nats_auth::setup::load(dir).context("FLEET_NATS_AUTH_DIR")?),
        None => None,
    };
    let credentials = |seed: Option<&String>| match seed {
        Some(seed) => fleet_nats_auth::Credentials::Nkey { seed: seed.clone(), inbox_prefix: None },
        None => fleet_nats_auth::Credentials::None,
    };
    let nats = config.nats_client();
    // A refused certificate is an error now, not a silent retry loop (see check_tls).
    nats.check_tls().await?;
    let connect = |name: &'static str, credentials: fleet_nats_auth::Credentials| {
        let url = config.nats_url.clone();
        let options = nats.options();
        async move {
            let options = options?
                .name(name)
                .retry_on_initial_connect()
                .reconnect_delay_callback(fleet_nats_auth::client::reconnect_delay);
            credentials
                .apply(options)?
                .connect(url.as_str())
                .await
                .with_context(|| format!("connecting to NATS at {url}"))
        }
    };
    let client = connect("fleet-orchestrator", credentials(keys.as_ref().map(|k| &k.orchestrator))).await?;
    let auth = match keys {
        Some(keys) => {
            let sys = connect("fleet-orchestrator-sys", credentials(Some(&keys.orchestrator_sys))).await?;
            Some(callout::Auth { issuer: keys.issuer, sys })
        }
        None => None,
    };
    let fabric = loop {
        // The first connection happens in the background with retry_on_initial_connect; wait
        // for it (bounded by shutdown) so the server version can be checked.
        if client.connection_state() == async_nats::connection::State::Connected {
            match Fabric::setup(&client, &config).await {
                Ok(f) => break f,
                Err(e @ fabric::FabricError::ServerTooOld(_)) => return Err(e.into()),
                Err(e) => tracing::warn!(error = %e, "JetStream set-up failed; retrying"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    };

    let leadership = Leadership::new();
    let store = Store::new(pool.clone(), writer_pool(&config)?, leadership.clone());
    let core = Arc::new(Core {
        offers: Offers::new(fabric.js.clone(), fabric.wake.clone()),
        config: config.clone(),
        client: client.clone(),
        fabric,
        store,
        fleet: FleetView::new(config.prefetch),
        leadership: leadership.clone(),
        wake_relay: Notify::new(),
        wake_admission: Notify::new(),
        health: sweeper::Health::default(),
        admission: sweeper::AdmissionCursor::default(),
        http_sessions: Default::default(),
        auth,
        secrets: secrets_key,
    });

    // Served by every instance, leader or not: robots and observers connect (and enrol) while
    // leadership changes hands.
    let mut always = JoinSet::new();
    if core.auth.is_some() {
        always.spawn(serve(core.clone(), callout::AUTH_REQUESTS, shutdown.clone(), callout::handle));
        always.spawn(serve(
            core.clone(),
            fleet_nats_auth::permissions::WHOAMI_REQUESTS,
            shutdown.clone(),
            callout::whoami,
        ));
        always.spawn(callout::watch_revocations(core.clone(), shutdown.clone()));
    }

    // Aborted if this future is dropped (a crash in tests): a lease kept alive by a detached
    // task would keep every standby from taking over.
    let lease_task = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(leader::run(
        leadership.clone(),
        pool.clone(),
        config.leader_lease,
        shutdown.clone(),
    )));
    let mut changes = leadership.subscribe();
    let mut leading: Option<(CancellationToken, JoinSet<()>)> = None;
    loop {
        let epoch = *changes.borrow_and_update();
        match (epoch, leading.is_some()) {
            (Some(epoch), false) => {
                tracing::info!(epoch, "became the active orchestrator");
                let token = shutdown.child_token();
                let tasks = start_leading(core.clone(), token.clone()).await;
                leading = Some((token, tasks));
            }
            (None, true) => {
                tracing::warn!("no longer the active orchestrator; stopping leader tasks");
                if let Some((token, tasks)) = leading.take() {
                    token.cancel();
                    tasks.join_all().await;
                }
            }
            _ => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = changes.changed() => if changed.is_err() { break },
        }
    }
    // Stop serving before giving up the lease, so a standby takes over a quiet fabric.
    if let Some((token, tasks)) = leading.take() {
        token.cancel();
        tasks.join_all().await;
    }
    let _ = lease_task.await;
    always.join_all().await;
    let _ = client.drain().await;
    core.store.close().await;
    Ok(())
}

/// The connections of the hot path's batch writers ([`store`]'s batched statements). Unlike the
/// main pool, they keep PostgreSQL's plan cache: planning a batched statement costs about twice
/// as much as running it (EXPLAIN ANALYZE: 0.45 ms against 0.25 ms for a claim), and at moderate
/// load most batches hold one job. A generic plan made while `jobs` is empty would scan the
/// table; these statements find every row by its key, so sequential scans are switched off for
/// them and the generic plan uses the primary key whatever the table's size.
fn writer_pool(config: &Config) -> anyhow::Result<sqlx::PgPool> {
    let options = config
        .database_url
        .0
        .parse::<sqlx::postgres::PgConnectOptions>()
        .map_err(|e| anyhow::anyhow!("DATABASE_URL is not a valid PostgreSQL URL: {e}"))?
        .options([("enable_seqscan", "off")]);
    Ok(PgPoolOptions::new()
        .max_connections(WRITER_CONNECTIONS)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options))
}

/// One per batch writer (submits, claims, completions, heartbeats, progress, offer sequences)
/// and the event relay.
const WRITER_CONNECTIONS: u32 = 7;

pub(crate) async fn connect_db(
    config: &Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<sqlx::PgPool>> {
    let mut delay = Duration::from_millis(200);
    loop {
        let options = match config.database_url.0.parse::<sqlx::postgres::PgConnectOptions>() {
            // Plan every statement with the table as it is now. A generic plan cached while
            // `jobs` was empty picks a partial index over the primary key (they cost the same on
            // an empty table) and keeps it: claims then walked every queued job
            // (fleet-bench: thousands of rows read per job). Planning these short statements
            // each time costs far less than that.
            Ok(o) => o.options([("plan_cache_mode", "force_custom_plan")]),
            Err(e) => anyhow::bail!("DATABASE_URL is not a valid PostgreSQL URL: {e}"),
        };
        let attempt = PgPoolOptions::new()
            .max_connections(config.db_pool_size)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await;
        match attempt {
            Ok(pool) => return Ok(Some(pool)),
            Err(sqlx::Error::Configuration(e)) => {
                anyhow::bail!("DATABASE_URL is not a valid PostgreSQL URL: {e}")
            }
            // A missing database is created (as `sqlx database create` would); bad credentials
            // are not fixed by waiting: say so and stop.
            Err(sqlx::Error::Database(e)) if e.code().is_some_and(|c| c == "3D000") => {
                use sqlx::migrate::MigrateDatabase;
                tracing::info!("database does not exist yet; creating it");
                sqlx::Postgres::create_database(&config.database_url.0).await.map_err(|create| {
                    anyhow::anyhow!("DATABASE_URL: {} and creating it failed: {create}", e.message())
                })?;
                continue;
            }
            Err(sqlx::Error::Database(e)) if e.code().is_some_and(|c| c.starts_with("28")) => {
                anyhow::bail!("DATABASE_URL: {} (fix the credentials)", e.message())
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "cannot reach PostgreSQL yet");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// A database pool for a one-shot command (`api-key`, `nats-creds`): the orchestrator's
/// connection rules (a missing database is created), migrations applied, but giving up after
/// 30 s instead of waiting for PostgreSQL forever.
pub async fn cli_pool(config: &Config) -> anyhow::Result<sqlx::PgPool> {
    let give_up = CancellationToken::new();
    let timer = give_up.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        timer.cancel();
    });
    let pool = connect_db(config, &give_up)
        .await?
        .context("PostgreSQL did not answer within 30 s (DATABASE_URL)")?;
    sqlx::migrate!("../migrations").run(&pool).await.context("applying database migrations")?;
    Ok(pool)
}

/// Start everything only the leader does.
async fn start_leading(core: Arc<Core>, token: CancellationToken) -> JoinSet<()> {
    core.fleet.clear();
    core.fabric.forget_consumers();
    core.health.reset();
    core.admission.reset();
    let mut tasks = JoinSet::new();
    tasks.spawn(serve(core.clone(), fleet_schemas::subjects::API_REQUESTS, token.clone(), api::handle));
    tasks.spawn(serve(core.clone(), fleet_schemas::subjects::ROBOT_REQUESTS, token.clone(), robots::handle));
    tasks.spawn(heartbeats::run(core.clone(), token.clone()));
    tasks.spawn(relay::run(core.clone(), token.clone()));
    tasks.spawn(audit::run(core.clone(), token.clone()));
    tasks.spawn(sweeper::run(core.clone(), token.clone()));
    tasks.spawn(offers::record_seqs(core.clone(), token.clone()));
    tasks.spawn(fabric::run(core.clone(), token.clone()));
    tasks
}

/// Serve one subject wildcard in the orchestrators' queue group until `token` is cancelled.
async fn serve<F, Fut>(core: Arc<Core>, subject: &'static str, token: CancellationToken, handler: F)
where
    F: Fn(Arc<Core>, async_nats::Message) -> Fut + Send + Sync + 'static + Copy,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let sub = core
            .client
            .queue_subscribe(subject, fleet_schemas::subjects::ORCHESTRATOR_QUEUE.to_owned())
            .await;
        let mut sub = match sub {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, subject, "cannot subscribe; retrying");
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        loop {
            let msg = tokio::select! {
                _ = token.cancelled() => {
                    let _ = sub.unsubscribe().await;
                    // Let in-flight handlers finish before reporting stopped.
                    let _ = limit.acquire_many(MAX_IN_FLIGHT as u32).await;
                    return;
                }
                msg = sub.next() => msg,
            };
            let Some(msg) = msg else { break };
            let Ok(permit) = limit.clone().acquire_owned().await else { return };
            let core = core.clone();
            tokio::spawn(async move {
                handler(core, msg).await;
                drop(permit);
            });
        }
    }
}

/// Reply to a request, logging (not failing) when the reply cannot be sent: the requester
/// times out and retries, and every request is idempotent.
pub(crate) async fn reply(core: &Core, msg: &async_nats::Message, payload: Vec<u8>) {
    if let Some(reply) = &msg.reply
        && let Err(e) = core.client.publish(reply.clone(), payload.into()).await
    {
        tracing::warn!(error = %e, subject = %msg.subject, "could not send reply");
    }
}
