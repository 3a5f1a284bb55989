//! `fleet-gateway`: reads the command line (and its environment variables), sets up logging and
//! signal handling, and calls [`fleet_gateway::run`]. Everything else lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fleet_gateway::GatewayConfig;
use fleet_gateway::config::{DEFAULT_BODY_LIMIT_BYTES, DEFAULT_NATS_URL, HttpsFiles, RateLimit};
use tokio_util::sync::CancellationToken;

/// Fleet's HTTP edge: the Canvas API over NATS requests to the orchestrator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "FLEET_GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = DEFAULT_NATS_URL, hide_env_values = true)]
    nats_url: String,

    /// The gateway's NATS credentials: the gateway.nk that `fleet-orchestrator nats-setup`
    /// wrote (a locked server refuses a gateway without it).
    #[arg(long, env = "FLEET_NATS_CREDS")]
    nats_creds: Option<std::path::PathBuf>,
    #[command(flatten)]
    nats_tls: fleet_connect::NatsTlsArgs,

    /// Serve HTTPS with this PEM certificate chain (needs --tls-key); without both, plain HTTP.
    #[arg(long, env = "FLEET_GATEWAY_TLS_CERT", value_name = "PEM")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "FLEET_GATEWAY_TLS_KEY", value_name = "PEM")]
    tls_key: Option<PathBuf>,

    /// Development mode: no API keys, every request acts as tenant "default". Local use only.
    #[arg(long, env = "FLEET_DEV_MODE", value_parser = clap::builder::BoolishValueParser::new())]
    dev_mode: bool,

    /// Deadline given to the orchestrator for each request (e.g. 10s, 1500ms).
    #[arg(long, env = "FLEET_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    request_timeout: Duration,

    /// Largest accepted request body in bytes (keep it under the NATS max payload).
    #[arg(long, env = "FLEET_BODY_LIMIT_BYTES", default_value_t = DEFAULT_BODY_LIMIT_BYTES)]
    body_limit_bytes: usize,

    /// Default rate limit, of each API key without a limit of its own and of each client address
    /// for requests without a valid key: e.g. 100/min, 20/s, 5000/h, or off (0) for benchmarks
    /// (keys with a limit of their own stay limited).
    #[arg(long, env = "FLEET_RATE_LIMIT", default_value = "100/min", value_parser = parse_rate)]
    rate_limit: RateArg,

    /// How many of those requests may come at once (default: the whole period's allowance).
    #[arg(long, env = "FLEET_RATE_BURST", value_parser = clap::value_parser!(u32).range(1..))]
    rate_burst: Option<u32>,
}

/// A parsed `--rate-limit` (`None` = off); a newtype so clap does not read the `Option` as
/// "flag may be absent".
#[derive(Debug, Clone, Copy)]
struct RateArg(Option<RateLimit>);

fn parse_rate(s: &str) -> Result<RateArg, String> {
    RateLimit::parse(s).map(RateArg)
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 10s or 1500ms)"))?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(600) {
        return Err("must be between 100ms and 10m".to_owned());
    }
    Ok(d)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Logs go to stderr, coloured only on a terminal (not in log files).
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    // Checked before the port is taken: a half-configured HTTPS must not start as plain HTTP.
    let https = match HttpsFiles::from_flags(args.tls_cert, args.tls_key) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("fleet-gateway: {e}");
            std::process::exit(2);
        }
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if https.is_some() { "https" } else { "http" };
    println!("fleet-gateway listening on {scheme}://{addr}");

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let nats_credentials = match &args.nats_creds {
        Some(path) => {
            fleet_nats_auth::Credentials::gateway(path).context("--nats-creds (FLEET_NATS_CREDS)")?
        }
        None => fleet_nats_auth::Credentials::None,
    };
    let config = GatewayConfig {
        nats_url: args.nats_url,
        nats_credentials,
        nats_tls: args.nats_tls.into(),
        https,
        dev_mode: args.dev_mode,
        request_timeout: args.request_timeout,
        body_limit_bytes: args.body_limit_bytes,
        rate_limit: args.rate_limit.0.map(|r| RateLimit { burst: args.rate_burst.unwrap_or(r.burst), ..r }),
    };
    fleet_gateway::run(config, listener, shutdown).await
}

/// Cancel `shutdown` on Ctrl-C or SIGTERM.
async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
    shutdown.cancel();
}
