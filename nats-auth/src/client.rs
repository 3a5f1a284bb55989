//! How each Fleet program proves who it is when it connects to NATS.

use std::path::Path;

use anyhow::Context;
use async_nats::ConnectOptions;

use crate::permissions::{self, ENROL_USER, GATEWAY_INBOX};

/// A connection's credentials.
#[derive(Clone, Default)]
pub enum Credentials {
    /// None: refused by a locked server.
    #[default]
    None,
    /// A service user's nkey seed (orchestrator, gateway).
    Nkey { seed: String, inbox_prefix: Option<String> },
    /// A `.creds` file's text (observers, and tests acting as one).
    Creds(String),
    /// A robot: its robot id as user and its API key as password, answered by the callout.
    Robot { key_id: String, robot: String, key: String },
    /// A robot key asking who it is before the robot knows its tenant and id.
    Enrol { key_id: String, key: String },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::Nkey { .. } => f.write_str("Nkey(<redacted>)"),
            Credentials::Creds(_) => f.write_str("Creds(<redacted>)"),
            Credentials::Robot { key_id, robot, .. } => write!(f, "Robot({robot}, key {key_id})"),
            Credentials::Enrol { key_id, .. } => write!(f, "Enrol(key {key_id})"),
        }
    }
}

impl Credentials {
    /// Credentials from a file: a `.creds` file (JWT and seed), or a file holding one nkey
    /// seed (`S…`, as `nats-setup` writes for the services). The gateway's file gets the
    /// gateway's inbox prefix.
    pub fn from_file(path: &Path) -> anyhow::Result<Credentials> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading NATS credentials {}", path.display()))?;
        if text.contains("BEGIN NATS USER JWT") {
            return Ok(Credentials::Creds(text));
        }
        let seed = text.trim().to_owned();
        nkeys::KeyPair::from_seed(&seed).map_err(|e| {
            anyhow::anyhow!("{} is neither a .creds file nor an nkey seed: {e}", path.display())
        })?;
        Ok(Credentials::Nkey { seed, inbox_prefix: None })
    }

    /// The gateway's credentials: its seed file, read replies only under its inbox prefix.
    pub fn gateway(path: &Path) -> anyhow::Result<Credentials> {
        Ok(match Credentials::from_file(path)? {
            Credentials::Nkey { seed, .. } => {
                Credentials::Nkey { seed, inbox_prefix: Some(GATEWAY_INBOX.to_owned()) }
            }
            other => other,
        })
    }

    /// A robot's credentials from its raw key (`crpa_<key id>_<secret>`).
    pub fn robot(key: &str, robot: &str) -> anyhow::Result<Credentials> {
        Ok(Credentials::Robot { key_id: key_id(key)?, robot: robot.to_owned(), key: key.to_owned() })
    }

    /// An enrolment connection for a raw robot key.
    pub fn enrol(key: &str) -> anyhow::Result<Credentials> {
        Ok(Credentials::Enrol { key_id: key_id(key)?, key: key.to_owned() })
    }

    /// Add these credentials (and the matching inbox prefix) to `options`.
    pub fn apply(&self, options: ConnectOptions) -> anyhow::Result<ConnectOptions> {
        Ok(match self {
            Credentials::None => options,
            Credentials::Nkey { seed, inbox_prefix } => {
                let options = options.nkey(seed.clone());
                match inbox_prefix {
                    Some(prefix) => options.custom_inbox_prefix(prefix),
                    None => options,
                }
            }
            Credentials::Creds(text) => options.credentials(text).context("reading the .creds file")?,
            Credentials::Robot { key_id, robot, key } => options
                .user_and_password(robot.clone(), key.clone())
                .custom_inbox_prefix(permissions::robot_inbox_prefix(key_id, robot)),
            Credentials::Enrol { key_id, key } => options
                .user_and_password(ENROL_USER.to_owned(), key.clone())
                .custom_inbox_prefix(permissions::robot_inbox_prefix(key_id, ENROL_USER)),
        })
    }
}

/// The key id part of a raw key `crpa_<key id>_<secret>`, or an error naming the shape.
pub fn key_id(key: &str) -> anyhow::Result<String> {
    let parsed = fleet_schemas::keys::parse_key(key.trim())
        .context("not a Fleet key: a robot key reads crpa_<32 hex digits>_<64 hex digits>")?;
    Ok(parsed.key_id)
}

/// How long a client waits before its next reconnection attempt: at once, then 100 ms more per
/// attempt, at most one second. async-nats's default doubles up to four seconds, which after a
/// nats-server restart can keep a robot away longer than a job lease: its first attempts may
/// come before the orchestrator answering the auth callout is back, and are refused.
pub fn reconnect_delay(attempts: usize) -> std::time::Duration {
    let steps = u64::try_from(attempts.saturating_sub(1)).unwrap_or(u64::MAX);
    std::time::Duration::from_millis(steps.saturating_mul(100).min(1000))
}
