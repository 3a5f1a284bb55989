//! Enrolment: a robot started with only its key learns from the orchestrator which tenant it
//! works for, which robot id the key is bound to and which capabilities it may claim.
//!
//! The robot connects with its key as user `_enrol` (the auth callout gives that connection one
//! right: asking `fleet.whoami.<key id>`), asks, and disconnects. A `--tenant` or `--id` that
//! disagrees with the key is a clear error before anything else happens.

use std::time::Duration;

use anyhow::Context;
use fleet_nats_auth::Credentials;
use fleet_nats_auth::permissions::whoami;
use fleet_schemas::codec;
use fleet_schemas::robot::WhoAmI;

use crate::cli::{Cli, CliError};
use crate::config::{RobotConfig, RobotKey, default_state_dir};

/// How long one question waits for its answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// Tries before giving up (the orchestrator may still be starting): about a minute in all.
const ATTEMPTS: u32 = 12;

/// Ask who `key` is.
pub async fn ask(nats_url: &str, key: &RobotKey) -> anyhow::Result<WhoAmI> {
    let credentials = Credentials::enrol(key.expose())?;
    let mut last = None;
    for attempt in 1..=ATTEMPTS {
        match ask_once(nats_url, &credentials, key).await {
            Ok(who) => return Ok(who),
            Err(e) => {
                tracing::info!(attempt, error = format!("{e:#}"), "enrolment not answered yet; retrying");
                last = Some(e);
            }
        }
        tokio::time::sleep(Duration::from_secs(u64::from(attempt.min(5)))).await;
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no answer")).context(
        "the key was not accepted: it is unknown, revoked, expired or not of role robot, or no orchestrator answers",
    ))
}

async fn ask_once(nats_url: &str, credentials: &Credentials, key: &RobotKey) -> anyhow::Result<WhoAmI> {
    let options = async_nats::ConnectOptions::new()
        .name("fleet-robot enrol")
        .connection_timeout(ASK_TIMEOUT)
        .max_reconnects(Some(1));
    let client = credentials
        .apply(options)?
        .connect(nats_url)
        .await
        .with_context(|| format!("connecting to {nats_url}"))?;
    let asked =
        tokio::time::timeout(ASK_TIMEOUT, client.request(whoami(&key.key_id()), Vec::new().into())).await;
    let _ = client.drain().await;
    let answer = asked.context("no answer in time")?.context("asking who the key is")?;
    codec::decode::<Result<WhoAmI, String>>("whoami", &answer.payload)?.map_err(anyhow::Error::msg)
}

/// Parse the command line and complete it from the key: the tenant, robot id and capability
/// grants it carries. A robot needs its key.
pub async fn into_config_enrolled(cli: Cli) -> Result<RobotConfig, CliError> {
    let tenant_given = cli.tenant.clone();
    let state_dir_given = cli.state_dir.is_some();
    let mut config = cli.into_config()?;
    let Some(key) = config.key.clone() else {
        return Err(CliError {
            flag: "--key",
            message: "a robot needs its key: --key, FLEET_ROBOT_KEY or --key-file (create one with \
                      POST /api/v1/robot-api-keys or `fleet-orchestrator api-key create --role robot`)"
                .into(),
        });
    };
    let who = ask(&config.nats_url, &key)
        .await
        .map_err(|e| CliError { flag: "--key", message: format!("{e:#}") })?;
    if let Some(given) = tenant_given
        && given.trim() != who.tenant.as_str()
    {
        return Err(CliError {
            flag: "--tenant",
            message: format!(
                "{} disagrees with the key, which belongs to tenant {}",
                given.trim(),
                who.tenant
            ),
        });
    }
    if let (Some(bound), Some(id)) = (&who.robot_id, &config.id)
        && bound != id
    {
        return Err(CliError {
            flag: "--id",
            message: format!("{id} disagrees with the key, which is bound to robot {bound}"),
        });
    }
    if config.id.is_none() {
        config.id = who.robot_id.clone();
    }
    if !state_dir_given {
        config.state_dir = default_state_dir(&who.tenant);
    }
    config.tenant = who.tenant;
    if let Some(granted) = &who.capabilities {
        let offered =
            config.capabilities().map_err(|e| CliError { flag: "--capabilities", message: e.to_string() })?;
        let refused: Vec<String> =
            offered.to_strings().into_iter().filter(|c| !granted.contains(c)).collect();
        if !refused.is_empty() {
            tracing::warn!(
                refused = refused.join(","),
                "the key does not grant these capabilities; jobs needing them will not be offered to this robot"
            );
        }
    }
    Ok(config)
}
