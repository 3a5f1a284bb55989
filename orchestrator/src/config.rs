//! Orchestrator configuration: defaults < `fleet.toml` (or `FLEET_CONFIG`) < `FLEET_…`
//! environment variables, plus the conventional `NATS_URL` and `DATABASE_URL`.
//!
//! The defaults work for a local run; tests shorten the intervals. Durations accept `90s`, `2m`
//! or a bare number of seconds, in the file and in the environment alike.
//!
//! The heartbeat interval follows the timeout unless it is given itself, because people tune one
//! knob ("notice a dead robot within 5 s") and a fixed default interval made a short timeout
//! unusable. Only a pair given explicitly can be wrong, and then the message says what to change.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A secret that never prints (database URLs carry passwords).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// NATS server URL (`NATS_URL`).
    pub nats_url: String,
    /// TLS of the NATS connection: `[nats_tls]` with `ca`, `cert`, `key`, `require` in the file,
    /// or `FLEET_NATS_CA`, `FLEET_NATS_CERT`, `FLEET_NATS_KEY`, `FLEET_NATS_TLS` (the names the
    /// other programs' flags use).
    #[serde(default)]
    pub nats_tls: fleet_connect::NatsTls,
    /// PostgreSQL URL (`DATABASE_URL`).
    pub database_url: Secret,
    /// Connections in the PostgreSQL pool.
    pub db_pool_size: u32,
    /// How often robots write their heartbeat (robots learn it at registration). When not given,
    /// a third of `heartbeat_timeout`, at most [`MAX_DERIVED_INTERVAL`].
    #[serde(with = "duration")]
    pub heartbeat_interval: Duration,
    /// A robot whose last heartbeat is older than this is offline (`FLEET_HEARTBEAT_TIMEOUT`).
    #[serde(with = "duration")]
    pub heartbeat_timeout: Duration,
    /// Lease of a running job; robots renew it every third of it.
    #[serde(with = "duration")]
    pub job_lease: Duration,
    /// Lease of the active orchestrator; a standby takes over when it lapses.
    #[serde(with = "duration")]
    pub leader_lease: Duration,
    /// Attempts a job gets before a lost lease fails it.
    pub max_attempts: i32,
    /// `ack_wait` of class consumers: it only covers receive-to-claim.
    #[serde(with = "duration")]
    pub offer_ack_wait: Duration,
    /// A job queued longer than this has its offer checked by the watchdog.
    #[serde(with = "duration")]
    pub offer_check_after: Duration,
    /// How long events are kept in `FLEET_EVENTS`.
    #[serde(with = "duration")]
    pub events_max_age: Duration,
    /// Size cap of `FLEET_EVENTS` in bytes.
    pub events_max_bytes: i64,
    /// How long job log lines are kept in `FLEET_LOGS`.
    #[serde(with = "duration")]
    pub logs_max_age: Duration,
    /// How often the sweeper and admission pass run when nothing wakes them earlier.
    #[serde(with = "duration")]
    pub sweep_interval: Duration,
    /// Unclaimed offers a class may hold beyond its free slots, so robots find their next offer
    /// already waiting. Priority stays strict: a higher job that comes recalls them (fleet.rs).
    pub prefetch: u32,
    /// Rejections after which a job fails instead of being offered again.
    pub max_rejections: i32,
    /// How often the leader checks that the streams, consumers and buckets it owns exist and
    /// recreates what is missing (a missing-object error triggers a check at once as well).
    #[serde(with = "duration")]
    pub fabric_check_interval: Duration,
    /// The folder `fleet-orchestrator nats-setup` wrote (`FLEET_NATS_AUTH_DIR`): the
    /// orchestrator connects with its keys from there and answers the server's auth callout.
    /// Without it, it connects without credentials (only an unlocked server accepts that).
    #[serde(default)]
    pub nats_auth_dir: Option<PathBuf>,
    /// File holding the secrets master key (32 bytes, hex or base64; `fleet-orchestrator
    /// secrets-key create --out FILE` makes one). Unset: the secrets API answers 503.
    #[serde(default)]
    pub secrets_key_file: Option<PathBuf>,
    /// How often the leader seals new history rows into the audit chain (see `audit`): the
    /// longest a committed row stays unsealed while the leader is healthy.
    #[serde(with = "duration")]
    pub audit_seal_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            nats_tls: fleet_connect::NatsTls::default(),
            database_url: Secret("postgres://postgres@127.0.0.1:5432/fleet".to_owned()),
            db_pool_size: 16,
            heartbeat_interval: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(90),
            job_lease: Duration::from_secs(30),
            leader_lease: Duration::from_secs(10),
            max_attempts: 3,
            offer_ack_wait: Duration::from_secs(30),
            offer_check_after: Duration::from_secs(30),
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            events_max_bytes: 1 << 30,
            logs_max_age: Duration::from_secs(7 * 24 * 3600),
            sweep_interval: Duration::from_secs(1),
            prefetch: 2,
            max_rejections: 5,
            fabric_check_interval: Duration::from_secs(5),
            nats_auth_dir: None,
            secrets_key_file: None,
            audit_seal_interval: Duration::from_secs(1),
        }
    }
}

/// Longest heartbeat interval derived from the timeout: the default pair (10 s, 90 s) is kept.
pub const MAX_DERIVED_INTERVAL: Duration = Duration::from_secs(10);

/// The heartbeat interval for `timeout` when none is given: a third of it (two beats may be lost
/// before the robot is declared offline), at most [`MAX_DERIVED_INTERVAL`].
pub fn derived_heartbeat_interval(timeout: Duration) -> Duration {
    (timeout / 3).min(MAX_DERIVED_INTERVAL)
}

/// A configuration that does not load; the message names the key and the source.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    /// Load from the layered sources: defaults, `fleet.toml` (or the file `FLEET_CONFIG` names),
    /// `FLEET_…` variables, `NATS_URL`, `DATABASE_URL`.
    pub fn load() -> Result<Self, ConfigError> {
        let file = std::env::var_os("FLEET_CONFIG").map(PathBuf::from);
        if let Some(path) = &file
            && !path.exists()
        {
            return Err(ConfigError(format!("FLEET_CONFIG names {}, which does not exist", path.display())));
        }
        let file = file.unwrap_or_else(|| PathBuf::from("fleet.toml"));
        let given = |base: Figment| {
            base.merge(Toml::file(&file))
                .merge(Env::prefixed("FLEET_").only(&Self::KEYS))
                .merge(Self::nats_tls_env())
                .merge(Env::raw().only(&["NATS_URL", "DATABASE_URL"]))
        };
        // Whether the interval was set by the user, as opposed to filled in by the defaults.
        let interval_given = given(Figment::new()).contains("heartbeat_interval");
        Self::from_figment(given(Figment::from(Serialized::defaults(Config::default()))), interval_given)
    }

    /// Keys settable with a `FLEET_` variable.
    const KEYS: [&'static str; 19] = [
        "prefetch",
        "max_rejections",
        "db_pool_size",
        "heartbeat_interval",
        "heartbeat_timeout",
        "job_lease",
        "leader_lease",
        "max_attempts",
        "offer_ack_wait",
        "offer_check_after",
        "events_max_age",
        "events_max_bytes",
        "logs_max_age",
        "sweep_interval",
        "fabric_check_interval",
        "audit_seal_interval",
        "nats_url",
        "nats_auth_dir",
        "secrets_key_file",
    ];

    /// `FLEET_NATS_CA`, `_CERT`, `_KEY` and `FLEET_NATS_TLS` as the `nats_tls` table.
    fn nats_tls_env() -> Env {
        // Keys arrive as the variable spelled them (upper case); compare without case.
        Env::prefixed("FLEET_NATS_").only(&["ca", "cert", "key", "tls"]).map(|key| {
            let key = key.as_str().to_ascii_lowercase();
            if key == "tls" { "nats_tls.require".into() } else { format!("nats_tls.{key}").into() }
        })
    }

    /// Where and how to connect to NATS.
    pub fn nats_client(&self) -> fleet_connect::NatsClient {
        fleet_connect::NatsClient::new(self.nats_url.clone(), self.nats_tls.clone())
    }

    /// Extract and check a configuration; without `interval_given` the heartbeat interval is
    /// derived from the timeout (see [`derived_heartbeat_interval`]).
    pub fn from_figment(figment: Figment, interval_given: bool) -> Result<Self, ConfigError> {
        let mut config: Config = figment.extract().map_err(|e| ConfigError(e.to_string()))?;
        if !interval_given {
            config.heartbeat_interval = derived_heartbeat_interval(config.heartbeat_timeout);
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let min = |name: &str, d: Duration, min: Duration| {
            if d < min {
                Err(ConfigError(format!("{name} must be at least {}", humantime::format_duration(min))))
            } else {
                Ok(())
            }
        };
        min("heartbeat_interval", self.heartbeat_interval, Duration::from_millis(100))?;
        min("heartbeat_timeout", self.heartbeat_timeout, Duration::from_secs(1))?;
        if self.heartbeat_timeout <= self.heartbeat_interval {
            let show = |d: Duration| humantime::format_duration(d).to_string();
            return Err(ConfigError(format!(
                "heartbeat_timeout ({}) must be longer than heartbeat_interval ({}), or every robot \
                 flaps offline between beats: lower heartbeat_interval (FLEET_HEARTBEAT_INTERVAL), or \
                 leave it unset to use a third of the timeout, or raise heartbeat_timeout \
                 (FLEET_HEARTBEAT_TIMEOUT)",
                show(self.heartbeat_timeout),
                show(self.heartbeat_interval),
            )));
        }
        min("job_lease", self.job_lease, Duration::from_millis(300))?;
        min("leader_lease", self.leader_lease, Duration::from_millis(300))?;
        min("offer_ack_wait", self.offer_ack_wait, Duration::from_secs(1))?;
        min("sweep_interval", self.sweep_interval, Duration::from_millis(10))?;
        min("fabric_check_interval", self.fabric_check_interval, Duration::from_millis(100))?;
        min("audit_seal_interval", self.audit_seal_interval, Duration::from_millis(10))?;
        if self.max_rejections < 1 {
            return Err(ConfigError("max_rejections must be at least 1".into()));
        }
        if self.max_attempts < 1 {
            return Err(ConfigError("max_attempts must be at least 1".into()));
        }
        if self.db_pool_size < 2 {
            return Err(ConfigError("db_pool_size must be at least 2".into()));
        }
        Ok(())
    }

    /// Heartbeat TTL in whole seconds (the server's per-message TTL granularity), at least 1.
    pub fn heartbeat_ttl(&self) -> Duration {
        Duration::from_secs(self.heartbeat_timeout.as_secs_f64().ceil().max(1.0) as u64)
    }
}

/// Durations as `90s`, `2m`, `1h 30m` or a bare number of seconds.
pub mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Float(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(Duration::from_secs(s)),
            Raw::Float(f) if f.is_finite() && f >= 0.0 => Ok(Duration::from_secs_f64(f)),
            Raw::Float(f) => Err(serde::de::Error::custom(format!("invalid duration {f}"))),
            Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
        }
    }

    /// Parse `90s`, `2m` or `90` (seconds).
    pub fn parse(text: &str) -> Result<Duration, String> {
        let t = text.trim();
        if let Ok(secs) = t.parse::<u64>() {
            return Ok(Duration::from_secs(secs));
        }
        humantime::parse_duration(t)
            .map_err(|e| format!("invalid duration {text:?} ({e}); use e.g. 90s, 2m or 90"))
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail closures return its large error type
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn env_and_file_layers() {
        Jail::expect_with(|jail| {
            jail.create_file("fleet.toml", "heartbeat_timeout = \"2m\"\njob_lease = 20\n")?;
            jail.set_env("NATS_URL", "nats://example:4333");
            jail.set_env("FLEET_HEARTBEAT_INTERVAL", "5s");
            let c = Config::load().map_err(|e| e.to_string())?;
            assert_eq!(c.heartbeat_timeout, Duration::from_secs(120));
            assert_eq!(c.job_lease, Duration::from_secs(20));
            assert_eq!(c.heartbeat_interval, Duration::from_secs(5));
            assert_eq!(c.nats_url, "nats://example:4333");
            assert!(!c.nats_tls.is_set());
            jail.set_env("FLEET_NATS_CA", "/etc/fleet/ca.pem");
            jail.set_env("FLEET_NATS_TLS", "true");
            let c = Config::load().map_err(|e| e.to_string())?;
            assert_eq!(c.nats_tls.ca.as_deref(), Some(std::path::Path::new("/etc/fleet/ca.pem")));
            assert!(c.nats_tls.require && c.nats_tls.cert.is_none());
            jail.set_env("FLEET_HEARTBEAT_TIMEOUT", "90");
            let c = Config::load().map_err(|e| e.to_string())?;
            assert_eq!(c.heartbeat_timeout, Duration::from_secs(90));
            Ok(())
        });
    }

    #[test]
    fn bad_values_name_the_key() {
        Jail::expect_with(|jail| {
            jail.set_env("FLEET_HEARTBEAT_TIMEOUT", "soon");
            let e = Config::load().unwrap_err().to_string();
            assert!(e.to_lowercase().contains("heartbeat_timeout"), "{e}");
            jail.set_env("FLEET_HEARTBEAT_TIMEOUT", "1s");
            jail.set_env("FLEET_HEARTBEAT_INTERVAL", "5s");
            let e = Config::load().unwrap_err().to_string();
            assert!(e.contains("heartbeat_timeout (1s) must be longer than heartbeat_interval (5s)"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.create_file("fleet.toml", "colour = \"red\"\n")?;
            let e = Config::load().unwrap_err().to_string();
            assert!(e.contains("colour"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn a_timeout_alone_sets_the_interval_to_a_third_of_it() {
        Jail::expect_with(|jail| {
            jail.set_env("FLEET_HEARTBEAT_TIMEOUT", "5s");
            let c = Config::load().map_err(|e| e.to_string())?;
            assert_eq!(c.heartbeat_timeout, Duration::from_secs(5));
            assert_eq!(c.heartbeat_interval, Duration::from_secs(5) / 3);
            // A long timeout keeps the default interval's ceiling.
            jail.set_env("FLEET_HEARTBEAT_TIMEOUT", "10m");
            let c = Config::load().map_err(|e| e.to_string())?;
            assert_eq!(c.heartbeat_interval, MAX_DERIVED_INTERVAL);
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.create_file("fleet.toml", "heartbeat_timeout = \"6s\"\n")?;
            let c = Config::load().map_err(|e| e.to_string())?;
            assert_eq!(c.heartbeat_interval, Duration::from_secs(2), "derived from the file's timeout too");
            Ok(())
        });
    }

    #[test]
    fn neither_given_keeps_the_defaults() {
        Jail::expect_with(|_| {
            let c = Config::load().map_err(|e| e.to_string())?;
            assert_eq!(
                (c.heartbeat_interval, c.heartbeat_timeout),
                (Duration::from_secs(10), Duration::from_secs(90))
            );
            Ok(())
        });
    }

    #[test]
    fn an_explicit_pair_is_kept_or_refused_naming_what_to_change() {
        Jail::expect_with(|jail| {
            jail.set_env("FLEET_HEARTBEAT_TIMEOUT", "5s");
            jail.set_env("FLEET_HEARTBEAT_INTERVAL", "2s");
            let c = Config::load().map_err(|e| e.to_string())?;
            assert_eq!(
                (c.heartbeat_interval, c.heartbeat_timeout),
                (Duration::from_secs(2), Duration::from_secs(5))
            );
            // An explicit interval is not capped: only the timeout bounds it.
            jail.set_env("FLEET_HEARTBEAT_TIMEOUT", "2m");
            jail.set_env("FLEET_HEARTBEAT_INTERVAL", "30s");
            let c = Config::load().map_err(|e| e.to_string())?;
            assert_eq!(c.heartbeat_interval, Duration::from_secs(30));
            // An interval given alone that the default timeout (90 s) cannot outlast.
            jail.clear_env();
            jail.set_env("FLEET_HEARTBEAT_INTERVAL", "90s");
            let e = Config::load().unwrap_err().to_string();
            assert!(e.contains("lower heartbeat_interval (FLEET_HEARTBEAT_INTERVAL)"), "{e}");
            assert!(e.contains("raise heartbeat_timeout (FLEET_HEARTBEAT_TIMEOUT)"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.create_file("fleet.toml", "heartbeat_timeout = \"5s\"\nheartbeat_interval = \"10s\"\n")?;
            let e = Config::load().unwrap_err().to_string();
            assert!(e.contains("heartbeat_timeout (5s) must be longer than heartbeat_interval (10s)"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn the_fabric_check_interval_is_tunable_and_bounded() {
        Jail::expect_with(|jail| {
            jail.set_env("FLEET_FABRIC_CHECK_INTERVAL", "2s");
            assert_eq!(
                Config::load().map_err(|e| e.to_string())?.fabric_check_interval,
                Duration::from_secs(2)
            );
            jail.set_env("FLEET_FABRIC_CHECK_INTERVAL", "1ms");
            let e = Config::load().unwrap_err().to_string();
            assert!(e.contains("fabric_check_interval must be at least"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn the_audit_seal_interval_defaults_to_a_second_and_is_tunable_and_bounded() {
        Jail::expect_with(|jail| {
            assert_eq!(
                Config::load().map_err(|e| e.to_string())?.audit_seal_interval,
                Duration::from_secs(1)
            );
            jail.set_env("FLEET_AUDIT_SEAL_INTERVAL", "250ms");
            assert_eq!(
                Config::load().map_err(|e| e.to_string())?.audit_seal_interval,
                Duration::from_millis(250)
            );
            jail.set_env("FLEET_AUDIT_SEAL_INTERVAL", "1ms");
            let e = Config::load().unwrap_err().to_string();
            assert!(e.contains("audit_seal_interval must be at least"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Config::default();
        assert!(!format!("{c:?}").contains("postgres://"));
    }

    #[test]
    fn ttl_rounds_up_to_seconds() {
        let c = Config { heartbeat_timeout: Duration::from_millis(2500), ..Config::default() };
        assert_eq!(c.heartbeat_ttl(), Duration::from_secs(3));
    }
}
