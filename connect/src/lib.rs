//! How every Fleet program connects to NATS, written once.
//!
//! The orchestrator, the gateway, robots and the benchmark all build their connection from a
//! [`NatsClient`]: the URL plus what the connection must present and trust. Today that is TLS
//! ([`NatsTls`]: the CA that signs the server's certificate, a client certificate for mutual TLS,
//! and whether a server without TLS is refused); credentials are added in the same place, on top
//! of [`NatsClient::options`], so no program grows its own variant of "how to connect".
//!
//! Why TLS at all: a robot across the internet talks to NATS over networks nobody in the fleet
//! controls. With the server's `tls { verify: true }` block ([`server_tls_block`]) every
//! connection is encrypted and every client proves, with a certificate from the fleet's CA, that
//! it was let in; a robot holding a certificate from any other CA is refused during the TLS
//! handshake, before it can send a single byte of NATS protocol.
//!
//! Files are read and checked when the options are built, not when the connection is first
//! tried ([`pem`] says why), so a wrong path is an error at start naming the file and its flag.
//!
//! The same settings come from three places, with the same names: command-line flags
//! ([`NatsTlsArgs`], flattened into a binary's clap parser: `--nats-ca` / `FLEET_NATS_CA`, …),
//! and the orchestrator's figment configuration (`[nats_tls]` in `fleet.toml`, or the same
//! `FLEET_NATS_…` variables; [`NatsTls`] is its serde form).

pub mod pem;
mod server;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use pem::TlsFileError;
pub use server::server_tls_block;

/// TLS settings of a NATS connection. All empty (the default): plain TCP, as before.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsTls {
    /// PEM file of the CA that signed the server's certificate; when given it is the only root
    /// trusted (a private fleet CA), otherwise the system's roots are.
    pub ca: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (mutual TLS). Needs `key`.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Refuse a server that does not speak TLS (a `tls://` URL means the same).
    pub require: bool,
}

impl NatsTls {
    /// Whether any TLS setting is given.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some() || self.require
    }

    /// Read and check the files; `None` when there is nothing to configure beyond defaults.
    /// With a CA the rustls configuration is built here (CA roots only, client certificate if
    /// given); with only a client certificate it is handed to async-nats, which adds it to the
    /// system roots.
    fn client_config(&self) -> Result<Option<rustls::ClientConfig>, ConnectError> {
        let identity = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(pem::load_identity(
                "NATS client certificate (--nats-cert, FLEET_NATS_CERT)",
                cert,
                "NATS client key (--nats-key, FLEET_NATS_KEY)",
                key,
            )?),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConnectError::Incomplete(
                    "--nats-cert (FLEET_NATS_CERT) is given without --nats-key (FLEET_NATS_KEY): a client certificate needs its key",
                ));
            }
            (None, Some(_)) => {
                return Err(ConnectError::Incomplete(
                    "--nats-key (FLEET_NATS_KEY) is given without --nats-cert (FLEET_NATS_CERT): a client key needs its certificate",
                ));
            }
        };
        let Some(ca) = &self.ca else { return Ok(None) };
        let roots = pem::load_roots("NATS CA (--nats-ca, FLEET_NATS_CA)", ca)?;
        let builder = rustls::ClientConfig::builder_with_provider(pem::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConnectError::Tls(e.to_string()))?
            .with_root_certificates(roots);
        let config = match identity {
            Some((chain, key)) => {
                builder.with_client_auth_cert(chain, key).map_err(|e| ConnectError::Tls(e.to_string()))?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(Some(config))
    }
}

/// Where and how to connect to NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsClient {
    /// `nats://host:port` (or `tls://host:port`, which requires TLS); may list several,
    /// comma separated, as async-nats accepts.
    pub url: String,
    pub tls: NatsTls,
}

/// Connection settings that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    File(#[from] TlsFileError),
    #[error("{0}")]
    Incomplete(&'static str),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error(
        "the NATS server and this program refused each other's TLS certificates ({0}): --nats-ca \
         (FLEET_NATS_CA) must be the CA that signed the server's certificate, and --nats-cert \
         (FLEET_NATS_CERT) a certificate signed by the CA the server trusts"
    )]
    Refused(String),
}

impl NatsClient {
    pub fn new(url: impl Into<String>, tls: NatsTls) -> Self {
        Self { url: url.into(), tls }
    }

    /// A plain connection to `url` (tests, local runs).
    pub fn plain(url: impl Into<String>) -> Self {
        Self::new(url, NatsTls::default())
    }

    /// The async-nats options for this connection, files already read and checked. Callers add
    /// what is theirs (name, event callback, `retry_on_initial_connect`) and connect to
    /// [`NatsClient::url`].
    pub fn options(&self) -> Result<async_nats::ConnectOptions, ConnectError> {
        let mut options = async_nats::ConnectOptions::new();
        match self.tls.client_config()? {
            Some(config) => options = options.tls_client_config(config),
            None => {
                if let (Some(cert), Some(key)) = (&self.tls.cert, &self.tls.key) {
                    options = options.add_client_certificate(cert.clone(), key.clone());
                }
            }
        }
        let tls_url = self.url.split(',').any(|u| u.trim().starts_with("tls://"));
        if self.tls.require || tls_url {
            options = options.require_tls(true);
        }
        Ok(options)
    }
}

/// What rustls says when a handshake is refused, by the client (the server's certificate does
/// not chain to the trusted CA) or by the server (the client's certificate does not chain to its
/// CA, or there is none): rustls's `InvalidCertificate` and `AlertReceived` errors.
const TLS_REFUSALS: [&str; 2] = ["invalid peer certificate", "received fatal alert"];

/// How long [`NatsClient::check_tls`] waits for the server. An unreachable server is not its
/// error (the programs retry in the background), so this only bounds the delay at start.
pub const TLS_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

impl NatsClient {
    /// One connection attempt, to tell a refused TLS handshake from a server that is merely not
    /// up yet: [`ConnectError::Refused`] with rustls's reason only for the first. Programs that
    /// keep retrying in the background (`retry_on_initial_connect`) call it at start, because
    /// retrying never fixes a certificate and async-nats reports each failed attempt only as
    /// "IO error". Without TLS settings it does nothing.
    pub async fn check_tls(&self) -> Result<(), ConnectError> {
        if !self.tls.is_set() && !self.url.contains("tls://") {
            return Ok(());
        }
        let options = self.options()?.connection_timeout(TLS_CHECK_TIMEOUT);
        match options.connect(self.url.as_str()).await {
            Ok(client) => {
                // Only a probe; closing it is all that is left to do.
                let _ = client.drain().await;
                Ok(())
            }
            Err(e) => {
                let text = e.to_string();
                if TLS_REFUSALS.iter().any(|m| text.contains(m)) {
                    Err(ConnectError::Refused(text))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// The TLS flags of a binary that connects to NATS; flatten into its clap parser with
/// `#[command(flatten)]`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NatsTlsArgs {
    /// PEM file of the CA that signs the NATS server's certificate (trusted instead of the
    /// system's roots).
    #[arg(long = "nats-ca", env = "FLEET_NATS_CA", value_name = "PEM")]
    pub nats_ca: Option<PathBuf>,
    /// PEM client certificate for a NATS server that verifies clients (mutual TLS); needs
    /// --nats-key.
    #[arg(long = "nats-cert", env = "FLEET_NATS_CERT", value_name = "PEM", requires = "nats_key")]
    pub nats_cert: Option<PathBuf>,
    /// PEM private key of --nats-cert.
    #[arg(long = "nats-key", env = "FLEET_NATS_KEY", value_name = "PEM", requires = "nats_cert")]
    pub nats_key: Option<PathBuf>,
    /// Refuse a NATS server that does not speak TLS (as a tls:// URL does).
    #[arg(long = "nats-tls", env = "FLEET_NATS_TLS", value_parser = clap::builder::BoolishValueParser::new())]
    pub nats_tls: bool,
}

impl From<NatsTlsArgs> for NatsTls {
    fn from(a: NatsTlsArgs) -> Self {
        NatsTls { ca: a.nats_ca, cert: a.nats_cert, key: a.nats_key, require: a.nats_tls }
    }
}

#[cfg(test)]
mod tests;
