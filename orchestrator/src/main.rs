//! `fleet-orchestrator`: loads configuration, sets up logging, runs until SIGTERM or Ctrl-C.

use clap::Parser;
use fleet_schemas::api::CreateKey;
use fleet_schemas::keys::Role;
use tokio_util::sync::CancellationToken;

/// Fleet's orchestrator: admits jobs, routes offers to robots, records every state change.
///
/// Needs NATS_URL and DATABASE_URL; everything else has defaults. Configuration layers:
/// built-in defaults < fleet.toml (or the file named by FLEET_CONFIG) < FLEET_* environment
/// variables (FLEET_HEARTBEAT_TIMEOUT=90s, FLEET_JOB_LEASE=30s, FLEET_LEADER_LEASE=10s, …).
/// FLEET_HEARTBEAT_INTERVAL defaults to a third of FLEET_HEARTBEAT_TIMEOUT, at most 10s; set it
/// only to override that (it must stay shorter than the timeout).
/// TLS to NATS: FLEET_NATS_CA (the CA that signed the server), FLEET_NATS_CERT and FLEET_NATS_KEY
/// (a client certificate, for a server that verifies clients), FLEET_NATS_TLS=true (refuse a
/// server without TLS); or [nats_tls] with ca, cert, key, require in fleet.toml.
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
    /// Write the locked nats-server configuration and the service keys into a folder:
    /// nats.conf (run `nats-server -c DIR/nats.conf`), issuer.nk, orchestrator.nk,
    /// orchestrator-sys.nk (the orchestrator reads them with FLEET_NATS_AUTH_DIR=DIR) and
    /// gateway.nk (the gateway's FLEET_NATS_CREDS). Running it again keeps the keys and rewrites
    /// nats.conf.
    NatsSetup {
        /// The folder to write (created if missing).
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Address the server listens on, host:port (default: the server's, 0.0.0.0:4222).
        #[arg(long)]
        listen: Option<String>,
        /// HTTP monitoring port of the server.
        #[arg(long)]
        monitor_port: Option<u16>,
        /// JetStream store directory (default: DIR/jetstream).
        #[arg(long)]
        store_dir: Option<std::path::PathBuf>,
        /// Make new keys (every service and robot must then reconnect with the new files).
        #[arg(long)]
        rotate: bool,
        /// Require TLS from every client with this server certificate (PEM; needs --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// The private key of --tls-cert (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
        /// The CA client certificates must chain to; with it, every client must present one
        /// (mutual TLS, for robots across the internet).
        #[arg(long, requires = "tls_cert")]
        tls_ca: Option<std::path::PathBuf>,
    },
    /// Issue or revoke NATS credentials for people and tools: an observer's nkey file reads
    /// one tenant's events live (`nats sub --nkey FILE 'fleet.events.TENANT.>'`). Needs
    /// FLEET_NATS_AUTH_DIR and DATABASE_URL.
    NatsCreds {
        /// The tenant whose events the credentials may read.
        #[arg(long, required_unless_present = "revoke")]
        tenant: Option<String>,
        /// The only role: observer (read-only, one tenant's events and live events).
        #[arg(long, default_value = "observer")]
        role: String,
        /// Where to write the nkey seed file (mode 0600; an existing file is refused).
        #[arg(long, required_unless_present = "revoke")]
        out: Option<std::path::PathBuf>,
        /// A name to recognise the credentials by.
        #[arg(long, default_value = "cli")]
        name: String,
        /// How long the credentials last, e.g. 30d or 12h (default: until revoked).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<std::time::Duration>,
        /// Revoke the credentials with this id instead (their connections are dropped).
        #[arg(long, conflicts_with_all = ["tenant", "out"])]
        revoke: Option<String>,
    },
    /// Manage the master key that encrypts job secrets at rest.
    #[command(subcommand)]
    SecretsKey(SecretsKeyCommand),
    /// Check the tamper-evident audit trail of the history (needs only DATABASE_URL).
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(clap::Subcommand, Debug)]
enum SecretsKeyCommand {
    /// Write a new random key (32 bytes, hex) to a file readable only by its owner; point
    /// secrets_key_file (FLEET_SECRETS_KEY_FILE) at it. An existing file is never overwritten:
    /// the secrets encrypted under a key are lost with it.
    Create {
        /// The file to write.
        #[arg(long)]
        out: std::path::PathBuf,
    },
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
        /// admin (keys, robots), operator (submit, cancel, retry, robot commands), viewer (read
        /// only) or robot (a robot's own key: only what a robot does).
        #[arg(long, default_value = "admin")]
        role: String,
        /// For a robot key: the only robot id it may act as (without it, any robot id of the tenant
        /// it is first used for).
        #[arg(long)]
        robot_id: Option<String>,
        /// For a robot key: a capability its robot may claim (repeat it; `shell` and the runner
        /// formats too). Without any, the key does not restrict what the robot offers.
        #[arg(long = "capability", value_name = "C")]
        capabilities: Vec<String>,
        /// The key stops working after this long, e.g. 30d, 12h or 90m; without it, never.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<std::time::Duration>,
        /// Write the key to this file (created with mode 0600) instead of printing it.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
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
    if let Some(Command::SecretsKey(SecretsKeyCommand::Create { out })) = &cli.command {
        return match fleet_orchestrator::secrets::SecretsKey::create_file(out) {
            Ok(()) => {
                eprintln!(
                    "secrets key written to {}; set FLEET_SECRETS_KEY_FILE={} (keep a copy: secrets \
                     cannot be read without it)",
                    out.display(),
                    out.display()
                );
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("fleet-orchestrator: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
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
    match cli.command {
        Some(Command::ApiKey(create)) => return runtime.block_on(create_key(config, create)),
        Some(Command::NatsSetup {
            dir,
            listen,
            monitor_port,
            store_dir,
            rotate,
            tls_cert,
            tls_key,
            tls_ca,
        }) => {
            let tls_block = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => {
                    Some(fleet_connect::server_tls_block(&cert, &key, tls_ca.as_deref(), tls_ca.is_some()))
                }
                _ => None,
            };
            return nats_setup(&dir, listen, monitor_port, store_dir, rotate, tls_block);
        }
        Some(Command::NatsCreds { tenant, role, out, name, expires_in, revoke }) => {
            return runtime.block_on(nats_creds(config, tenant, role, out, name, expires_in, revoke));
        }
        Some(Command::Audit(AuditCommand::Verify { tenant, expect_head })) => {
            return runtime.block_on(audit_verify(config, tenant, expect_head));
        }
        Some(Command::SecretsKey(_)) | Some(Command::Run) | None => {}
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

fn usage_error(message: String) -> std::process::ExitCode {
    eprintln!("fleet-orchestrator: {message}");
    std::process::ExitCode::from(2)
}

/// The key's request from the command line; a bad flag is named.
fn key_request(create: &ApiKeyCommand) -> Result<(fleet_schemas::TenantId, CreateKey), String> {
    let ApiKeyCommand::Create { tenant, role, name, rate_limit, robot_id, capabilities, expires_in, .. } =
        create;
    let tenant = fleet_schemas::TenantId::new(tenant.as_str()).map_err(|e| format!("--tenant: {e}"))?;
    let role = Role::parse(role).ok_or("--role must be admin, operator, viewer or robot")?;
    if role != Role::Robot && (robot_id.is_some() || !capabilities.is_empty()) {
        return Err("--robot-id and --capability are for --role robot only".into());
    }
    let robot_id = robot_id
        .as_deref()
        .map(|r| fleet_schemas::RobotId::new(r).map_err(|e| format!("--robot-id: {e}")))
        .transpose()?;
    let capabilities = (!capabilities.is_empty())
        .then(|| {
            capabilities
                .iter()
                .map(|c| fleet_schemas::Capability::new(c.trim()).map_err(|e| format!("--capability: {e}")))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let expires_at = expires_in
        .map(|d| {
            time::Duration::try_from(d)
                .ok()
                .and_then(|d| time::OffsetDateTime::now_utc().checked_add(d))
                .ok_or("--expires-in is too long")
        })
        .transpose()?;
    let req = CreateKey {
        name: name.clone(),
        role,
        description: None,
        expires_at,
        robot_id,
        rate_limit: *rate_limit,
        capabilities,
    };
    Ok((tenant, req))
}

/// Write the key to `path`, readable by its owner only.
fn write_key(path: &std::path::Path, key: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    // An existing file keeps its mode on open: make it 0600 in any case.
    #[cfg(unix)]
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    writeln!(file, "{key}")
}

async fn create_key(config: fleet_orchestrator::Config, create: ApiKeyCommand) -> std::process::ExitCode {
    let (tenant, req) = match key_request(&create) {
        Ok(r) => r,
        Err(e) => return usage_error(e),
    };
    let ApiKeyCommand::Create { out, .. } = create;
    match fleet_orchestrator::keys::create_with_config(&config, &tenant, &req).await {
        Ok(key) => {
            if let Some(path) = &out {
                if let Err(e) = write_key(path, &key) {
                    eprintln!("fleet-orchestrator: --out {}: {e}", path.display());
                    return std::process::ExitCode::FAILURE;
                }
            } else {
                println!("{key}");
            }
            let limit = req.rate_limit.map_or_else(|| "the gateway's default".to_owned(), |r| r.to_string());
            let place = out.map_or_else(
                || "it is shown only this once".to_owned(),
                |p| format!("written to {}", p.display()),
            );
            eprintln!(
                "API key for tenant {tenant} with role {} and rate limit {limit} created; {place}.",
                req.role
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleet-orchestrator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn nats_setup(
    dir: &std::path::Path,
    listen: Option<String>,
    monitor_port: Option<u16>,
    store_dir: Option<std::path::PathBuf>,
    rotate: bool,
    tls_block: Option<String>,
) -> std::process::ExitCode {
    let absolute = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let store_dir = store_dir.unwrap_or_else(|| dir.join("jetstream"));
    let options = fleet_nats_auth::setup::ConfOptions {
        listen,
        monitor_port,
        store_dir: Some(absolute(&store_dir)),
        tls_block,
    };
    match fleet_nats_auth::setup::write(dir, &options, rotate) {
        Ok(conf) => {
            println!("{}", conf.display());
            eprintln!(
                "wrote {conf}; start the server with `nats-server -c {conf}`, the orchestrator with \
                 FLEET_NATS_AUTH_DIR={dir} and the gateway with FLEET_NATS_CREDS={gateway}",
                conf = conf.display(),
                dir = absolute(dir).display(),
                gateway = absolute(&dir.join(fleet_nats_auth::setup::GATEWAY_FILE)).display(),
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleet-orchestrator nats-setup: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn nats_creds(
    config: fleet_orchestrator::Config,
    tenant: Option<String>,
    role: String,
    out: Option<std::path::PathBuf>,
    name: String,
    expires_in: Option<std::time::Duration>,
    revoke: Option<String>,
) -> std::process::ExitCode {
    let fail = |e: anyhow::Error| {
        eprintln!("fleet-orchestrator nats-creds: {e:#}");
        std::process::ExitCode::FAILURE
    };
    let pool = match fleet_orchestrator::cli_pool(&config).await {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    if let Some(id) = revoke {
        return match fleet_orchestrator::nats_admin::revoke(&pool, &id).await {
            Ok(true) => {
                eprintln!("credentials {id} revoked; their connections are dropped");
                std::process::ExitCode::SUCCESS
            }
            Ok(false) => fail(anyhow::anyhow!("no live credentials with id {id}")),
            Err(e) => fail(e),
        };
    }
    if role != "observer" {
        eprintln!("fleet-orchestrator nats-creds: --role must be observer (the only role issued this way)");
        return std::process::ExitCode::from(2);
    }
    let tenant = match fleet_schemas::TenantId::new(tenant.unwrap_or_default()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("fleet-orchestrator nats-creds: --tenant: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let Some(dir) = config.nats_auth_dir.clone() else {
        return fail(anyhow::anyhow!("FLEET_NATS_AUTH_DIR is not set (the folder nats-setup wrote)"));
    };
    let Some(out) = out else { return fail(anyhow::anyhow!("--out is required")) };
    let expires_at = match expires_in.map(time::Duration::try_from).transpose() {
        Ok(d) => d.map(|d| time::OffsetDateTime::now_utc() + d),
        Err(e) => return fail(anyhow::anyhow!("--expires-in: {e}")),
    };
    match fleet_orchestrator::nats_admin::create_observer(&pool, &dir, &tenant, &name, expires_at, &out).await
    {
        Ok(issued) => {
            println!("{}", issued.id);
            eprintln!(
                "observer credentials {} for tenant {tenant} written to {}; tail its events with\n  \
                 nats sub --nkey {} 'fleet.events.{tenant}.>'\nrevoke with `fleet-orchestrator nats-creds --revoke {}`",
                issued.id,
                out.display(),
                out.display(),
                issued.id
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => fail(e),
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
