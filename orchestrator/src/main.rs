//! `fleet-orchestrator`: loads configuration, sets up logging, runs until SIGTERM or Ctrl-C.

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Fleet's orchestrator: admits jobs, routes offers to robots, records every state change.
///
/// Needs NATS_URL and DATABASE_URL; everything else has defaults. Configuration layers:
/// built-in defaults < fleet.toml (or the file named by FLEET_CONFIG) < FLEET_* environment
/// variables (FLEET_HEARTBEAT_TIMEOUT=90s, FLEET_JOB_LEASE=30s, FLEET_LEADER_LEASE=10s, …).
/// FLEET_HEARTBEAT_INTERVAL defaults to a third of FLEET_HEARTBEAT_TIMEOUT, at most 10s; set it
/// only to override that (it must stay shorter than the timeout).
/// Start as many as you like: one leads, the others stand by and take over within seconds.
#[derive(Parser, Debug)]
#[command(name = "fleet-orchestrator", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Run the orchestrator (the default).
    Run,
    /// Manage API keys directly in the database (for the first admin key of a tenant).
    #[command(subcommand)]
    ApiKey(ApiKeyCommand),
    /// Check the tamper-evident audit trail of the history (needs only DATABASE_URL).
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(clap::Subcommand, Debug)]
enum AuditCommand {
    /// Walk each tenant's hash chain against the history rows and name the first row that was
    /// edited, deleted or inserted out of order. Prints one line per tenant (OK with the count of
    /// sealed rows and the head hash, or BROKEN naming the row); exits 1 if any trail is broken.
    Verify {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// A head hash recorded earlier (from a `fleet.events.<tenant>.audit.sealed` event or an
        /// earlier verify); it must still be in the chain, else the chain was rewritten.
        #[arg(long, requires = "tenant")]
        expect_head: Option<String>,
    },
}

#[derive(clap::Subcommand, Debug)]
enum ApiKeyCommand {
    /// Create a key and print it once (only its hash is stored).
    Create {
        /// The tenant the key belongs to ([a-z0-9-]{1,63}).
        #[arg(long)]
        tenant: String,
        /// admin (keys, robots), operator (submit, cancel, retry, robot commands) or viewer (read only).
        #[arg(long, default_value = "admin")]
        role: String,
        /// A name to recognise the key by.
        #[arg(long, default_value = "cli")]
        name: String,
        /// The key's own rate limit at the gateway, e.g. 1000/min, 20/s or 5000/h (all of it may
        /// come at once); without it the gateway's --rate-limit applies.
        #[arg(long, value_parser = parse_rate)]
        rate_limit: Option<fleet_schemas::keys::Rate>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        // Logs go to stderr, coloured only on a terminal (not in log files).
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match fleet_orchestrator::Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleet-orchestrator: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleet-orchestrator: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Some(Command::ApiKey(ApiKeyCommand::Create { tenant, role, name, rate_limit })) = cli.command {
        return runtime.block_on(create_key(config, tenant, role, name, rate_limit));
    }
    if let Some(Command::Audit(AuditCommand::Verify { tenant, expect_head })) = cli.command {
        return runtime.block_on(audit_verify(config, tenant, expect_head));
    }
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            signal.cancel();
        });
        match fleet_orchestrator::run(config, shutdown).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fleet-orchestrator: {e:#}");
                std::process::ExitCode::FAILURE
            }
        }
    })
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn parse_rate(s: &str) -> Result<fleet_schemas::keys::Rate, String> {
    fleet_schemas::keys::Rate::parse(s)
}

async fn create_key(
    config: fleet_orchestrator::Config,
    tenant: String,
    role: String,
    name: String,
    rate_limit: Option<fleet_schemas::keys::Rate>,
) -> std::process::ExitCode {
    let tenant = match fleet_schemas::TenantId::new(tenant) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("fleet-orchestrator: --tenant: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let Some(role) = fleet_schemas::keys::Role::parse(&role) else {
        eprintln!("fleet-orchestrator: --role must be admin, operator or viewer");
        return std::process::ExitCode::from(2);
    };
    match fleet_orchestrator::keys::create_with_config(&config, &tenant, role, &name, rate_limit).await {
        Ok(key) => {
            println!("{key}");
            let limit = rate_limit.map_or_else(|| "the gateway's default".to_owned(), |r| r.to_string());
            eprintln!(
                "API key for tenant {tenant} with role {role} and rate limit {limit} created; \
                 it is shown only this once."
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleet-orchestrator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn audit_verify(
    config: fleet_orchestrator::Config,
    tenant: Option<String>,
    expect_head: Option<String>,
) -> std::process::ExitCode {
    if let Some(t) = &tenant
        && let Err(e) = fleet_schemas::TenantId::new(t.as_str())
    {
        eprintln!("fleet-orchestrator: --tenant: {e}");
        return std::process::ExitCode::from(2);
    }
    if let Some(h) = &expect_head
        && (h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()))
    {
        eprintln!(
            "fleet-orchestrator: --expect-head must be a SHA-256 hash in hex (64 characters), got {h:?}"
        );
        return std::process::ExitCode::from(2);
    }
    match fleet_orchestrator::audit::verify_with_config(&config, tenant.as_deref(), expect_head.as_deref())
        .await
    {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("fleet-orchestrator: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
