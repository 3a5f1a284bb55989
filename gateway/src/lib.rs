//! Fleet's HTTP edge: the API the Canvas desktop client (and `curl`, scripts, the dashboard)
//! speaks, translated call by call into NATS requests to the orchestrator.
//!
//! The gateway is stateless and holds no database connection: everything it answers comes from
//! the orchestrator (`fleet.api.<area>.<verb>`, see `fleet_schemas::api`), so any number of
//! gateways can run side by side and one can be restarted at any time. What it does own:
//!
//! - who the caller is and which tenant it acts as ([`auth`]);
//! - checking input at the edge, with errors that name the field ([`extract`], [`routes`]);
//! - the one mapping from failures to HTTP statuses and the one JSON error shape ([`error`]);
//! - request ids, deadlines and what a lost answer means ([`request`], [`orchestrator`]);
//! - rate limits ([`rate_limit`]) and its own Prometheus figures ([`metrics`]);
//! - the live streams: events read straight from JetStream (`FLEET_EVENTS`, `FLEET_LOGS`) and
//!   the core-NATS live subjects, filtered to the caller's tenant ([`routes::events`],
//!   [`routes::live`], [`routes::logs`]);
//! - the OpenAPI document, generated from the handlers ([`openapi`]).
//!
//! `main.rs` only reads the command line and calls [`run`]; tests call [`run`] with their own
//! listener and shutdown token, or drive [`router`] without a socket.

pub mod auth;
pub mod config;
pub mod error;
pub mod extract;
pub mod metrics;
pub mod openapi;
pub mod orchestrator;
pub mod rate_limit;
pub mod request;
pub mod routes;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::GatewayConfig;
pub use error::HttpError;
pub use orchestrator::Orchestrator;
pub use routes::router;

/// What every handler shares: the configuration, the orchestrator handle, JetStream for the
/// live streams, the rate limiter and the request figures.
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: GatewayConfig,
    orchestrator: Orchestrator,
    jetstream: async_nats::jetstream::Context,
    limiter: rate_limit::Limiter,
    metrics: metrics::Metrics,
    keys: auth::KeyCache,
    /// Cancelled at shutdown: ends the long-lived streams (SSE, WebSockets), which graceful
    /// shutdown would otherwise wait for forever.
    streams: CancellationToken,
}

impl AppState {
    /// State around an existing NATS client (tests connect their own).
    pub fn new(config: GatewayConfig, client: async_nats::Client) -> Self {
        let orchestrator = Orchestrator::new(client.clone(), config.request_timeout);
        let jetstream = async_nats::jetstream::new(client);
        let limiter = rate_limit::Limiter::new(config.rate_limit);
        Self {
            inner: Arc::new(Inner {
                config,
                orchestrator,
                jetstream,
                limiter,
                metrics: metrics::Metrics::default(),
                keys: auth::KeyCache::default(),
                streams: CancellationToken::new(),
            }),
        }
    }

    /// Connect to NATS and build the state. Returns at once even when NATS is not up yet: the
    /// client keeps trying in the background, and until it is connected requests get 503 (and
    /// `/health` says why), so the gateway can start before NATS does.
    pub async fn connect(config: GatewayConfig) -> anyhow::Result<Self> {
        let nats = config.nats_client();
        // A refused certificate is an error now, not a silent retry loop (see check_tls).
        nats.check_tls().await?;
        let options = nats.options()?.name("fleet-gateway").retry_on_initial_connect();
        let client = config
            .nats_credentials
            .apply(options)?
            .connect(config.nats_url.as_str())
            .await
            // Not the URL itself: it may carry credentials.
            .context("cannot use the NATS URL")?;
        Ok(Self::new(config, client))
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.inner.config
    }

    pub fn orchestrator(&self) -> &Orchestrator {
        &self.inner.orchestrator
    }

    pub fn jetstream(&self) -> &async_nats::jetstream::Context {
        &self.inner.jetstream
    }

    pub fn limiter(&self) -> &rate_limit::Limiter {
        &self.inner.limiter
    }

    pub fn metrics(&self) -> &metrics::Metrics {
        &self.inner.metrics
    }

    pub fn key_cache(&self) -> &auth::KeyCache {
        &self.inner.keys
    }

    /// Cancelled when the gateway shuts down; every long-lived stream ends with it.
    pub fn streams_token(&self) -> &CancellationToken {
        &self.inner.streams
    }
}

/// Serve the gateway on `listener` until `shutdown` is cancelled: HTTPS when the configuration
/// has a certificate ([`GatewayConfig::https`]), plain HTTP otherwise.
///
/// Shutdown happens in three steps: stop accepting connections, let in-flight requests finish
/// (each is bounded by the request timeout plus the reply grace), then drain the NATS
/// connection.
pub async fn run(
    config: GatewayConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if config.dev_mode {
        tracing::warn!(
            "DEVELOPMENT MODE (FLEET_DEV_MODE=true): requests WITHOUT an API key act as tenant \
             \"default\" with the admin role. Never run like this where anyone else can reach the gateway."
        );
    }
    let addr = listener.local_addr().context("listener has no local address")?;
    // Read before connecting anything, so a bad certificate path is the error at start.
    let tls = match &config.https {
        Some(files) => Some(files.server_config().context("cannot serve HTTPS")?),
        None => None,
    };
    let state = AppState::connect(config).await?;
    tracing::info!(%addr, https = tls.is_some(), "fleet-gateway listening");
    // Live streams never end on their own: end them when shutdown starts, so that the server's
    // graceful shutdown (which waits for open connections) can finish.
    let streams = state.streams_token().clone();
    let stop_streams = shutdown.clone();
    tokio::spawn(async move {
        stop_streams.cancelled().await;
        streams.cancel();
    });
    // Peer addresses feed the per-IP rate limit of requests without a key.
    let app = router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    match tls {
        None => axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .context("HTTP server failed")?,
        Some(tls) => serve_https(listener, app, tls, shutdown).await?,
    }
    tracing::info!("HTTP server stopped; draining the NATS connection");
    state.orchestrator().drain().await;
    Ok(())
}

/// The same router over rustls. axum-server stops accepting on `graceful_shutdown` and waits
/// for open connections as `axum::serve` does; the live streams end with the streams token, so
/// the wait is bounded by the longest in-flight request.
async fn serve_https(
    listener: TcpListener,
    app: axum::extract::connect_info::IntoMakeServiceWithConnectInfo<axum::Router, SocketAddr>,
    tls: rustls::ServerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let handle = axum_server::Handle::new();
    let stop = handle.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        stop.graceful_shutdown(None);
    });
    let config = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls));
    let listener = listener.into_std().context("HTTPS listener")?;
    axum_server::from_tcp_rustls(listener, config)
        .handle(handle)
        .serve(app)
        .await
        .context("HTTPS server failed")
}
