//! The locked nats-server configuration and the service keys, written into one folder by
//! `fleet-orchestrator nats-setup --dir D` and read back by the orchestrator
//! (`FLEET_NATS_AUTH_DIR=D`).
//!
//! Files (secrets mode 0600):
//! - `nats.conf`: accounts `FLEET` (JetStream) and `SYS`; the three service users as nkeys with
//!   their permissions from [`crate::permissions`]; and `auth_callout`, so every other
//!   connection (robots, observers, anyone) is decided by the orchestrator, which answers with a
//!   user JWT signed by the issuer key. Nothing connects anonymously.
//! - `issuer.nk`: the callout issuer's account seed (the orchestrator signs with it).
//! - `orchestrator.nk`, `orchestrator-sys.nk`: the orchestrator's user seeds (FLEET and SYS).
//! - `gateway.nk`: the gateway's user seed (`FLEET_NATS_CREDS=D/gateway.nk`).
//!
//! Writing again keeps the existing keys (so running services keep working) and rewrites
//! `nats.conf`; `rotate` makes new keys.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use nkeys::KeyPair;

use crate::jwt::{ACCOUNT, Issuer, SYS_ACCOUNT};
use crate::permissions::{self, Permissions};

pub const CONF_FILE: &str = "nats.conf";
pub const ISSUER_FILE: &str = "issuer.nk";
pub const ORCHESTRATOR_FILE: &str = "orchestrator.nk";
pub const ORCHESTRATOR_SYS_FILE: &str = "orchestrator-sys.nk";
pub const GATEWAY_FILE: &str = "gateway.nk";

/// How long a client has to authenticate, callout included (seconds): nats-server's default.
/// A client whose callout goes unanswered waits this long before it can try again: after a
/// nats-server restart, robots reconnect in the same instant as the orchestrator that answers,
/// and a first try that comes before its subscription is back costs this long (measured: robots
/// back 2.5 s after the restart). A job lease must therefore stay well above it (the default is
/// 30 s). Shorter would refuse robots whenever the callout is slow (a loaded database, a fleet
/// reconnecting at once), which costs more than it saves.
const AUTH_TIMEOUT_S: u32 = 2;

/// What `nats.conf` says beyond the accounts and users.
#[derive(Debug, Clone, Default)]
pub struct ConfOptions {
    /// `host:port` the server listens on; none = the server's default (0.0.0.0:4222) unless the
    /// command line says otherwise.
    pub listen: Option<String>,
    /// HTTP monitoring port.
    pub monitor_port: Option<u16>,
    /// JetStream store directory; none = the command line's `-sd`.
    pub store_dir: Option<PathBuf>,
    /// A `tls { … }` block, so clients must use TLS.
    pub tls_block: Option<String>,
}

/// The keys the orchestrator loads from the folder.
#[derive(Debug)]
pub struct ServiceKeys {
    pub issuer: Issuer,
    /// Seed of the orchestrator's FLEET user.
    pub orchestrator: String,
    /// Seed of the orchestrator's SYS user.
    pub orchestrator_sys: String,
}

/// Write (or refresh) the folder. Returns the path of `nats.conf`.
pub fn write(dir: &Path, options: &ConfOptions, rotate: bool) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let issuer = key(dir, ISSUER_FILE, rotate, KeyPair::new_account)?;
    let orchestrator = key(dir, ORCHESTRATOR_FILE, rotate, KeyPair::new_user)?;
    let sys = key(dir, ORCHESTRATOR_SYS_FILE, rotate, KeyPair::new_user)?;
    let gateway = key(dir, GATEWAY_FILE, rotate, KeyPair::new_user)?;
    let conf = conf_text(&issuer, &orchestrator, &sys, &gateway, options);
    let path = dir.join(CONF_FILE);
    write_secret(&path, &conf)?;
    Ok(path)
}

/// Read the orchestrator's keys from a folder written by [`write`].
pub fn load(dir: &Path) -> anyhow::Result<ServiceKeys> {
    let read = |name: &str| -> anyhow::Result<String> {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (write the folder with `fleet-orchestrator nats-setup --dir {}`)",
                path.display(),
                dir.display()
            )
        })?;
        KeyPair::from_seed(text.trim())
            .map_err(|e| anyhow::anyhow!("{} is not an nkey seed: {e}", path.display()))?;
        Ok(text.trim().to_owned())
    };
    let issuer = Issuer::from_seed(&read(ISSUER_FILE)?)
        .with_context(|| format!("{}", dir.join(ISSUER_FILE).display()))?;
    Ok(ServiceKeys {
        issuer,
        orchestrator: read(ORCHESTRATOR_FILE)?,
        orchestrator_sys: read(ORCHESTRATOR_SYS_FILE)?,
    })
}

/// The existing key in `dir/name`, or a new one written there.
fn key(dir: &Path, name: &str, rotate: bool, new: fn() -> KeyPair) -> anyhow::Result<KeyPair> {
    let path = dir.join(name);
    if !rotate && path.exists() {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        return KeyPair::from_seed(text.trim())
            .map_err(|e| anyhow::anyhow!("{} is not an nkey seed: {e}", path.display()));
    }
    let pair = new();
    let seed = pair.seed().map_err(|e| anyhow::anyhow!("encoding a seed: {e}"))?;
    write_secret(&path, &format!("{seed}\n"))?;
    Ok(pair)
}

/// Write a file only its owner can read (mode 0600 on Unix), replacing it atomically.
pub fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("writing {}", tmp.display()))?;
    file.sync_all().with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn quoted(list: &[String]) -> String {
    let items: Vec<String> = list.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", items.join(", "))
}

/// A `permissions { … }` value in nats-server configuration syntax.
fn conf_permissions(p: &Permissions) -> String {
    let side = |list: &[String]| {
        if list.is_empty() {
            r#"{ deny: [">"] }"#.to_owned()
        } else {
            format!("{{ allow: {} }}", quoted(list))
        }
    };
    let mut s = format!("{{ publish: {}, subscribe: {}", side(&p.publish), side(&p.subscribe));
    if p.allow_responses {
        s.push_str(", allow_responses: true");
    }
    s.push_str(" }");
    s
}

fn conf_text(
    issuer: &KeyPair,
    orchestrator: &KeyPair,
    sys: &KeyPair,
    gateway: &KeyPair,
    o: &ConfOptions,
) -> String {
    let mut c = String::new();
    let _ = writeln!(
        c,
        "# Fleet's locked nats-server configuration, written by `fleet-orchestrator nats-setup`."
    );
    let _ = writeln!(
        c,
        "# Every connection needs credentials: the services by nkey, robots and observers through"
    );
    let _ = writeln!(c, "# the orchestrator's auth callout. Regenerate rather than edit.\n");
    if let Some(listen) = &o.listen {
        let _ = writeln!(c, "listen: {listen:?}");
    }
    if let Some(port) = o.monitor_port {
        let _ = writeln!(c, "http_port: {port}");
    }
    let _ = writeln!(c, "max_payload: 1MB\n");
    match &o.store_dir {
        Some(dir) => {
            let _ = writeln!(c, "jetstream {{ store_dir: {:?} }}\n", dir.display().to_string());
        }
        None => {
            let _ = writeln!(c, "jetstream: enabled\n");
        }
    }
    if let Some(tls) = &o.tls_block {
        let _ = writeln!(c, "{tls}\n");
    }
    let _ = writeln!(c, "accounts {{");
    let _ = writeln!(c, "  {ACCOUNT} {{");
    let _ = writeln!(c, "    jetstream: enabled");
    let _ = writeln!(c, "    users: [");
    let _ = writeln!(
        c,
        "      {{ nkey: {}, permissions: {} }}",
        orchestrator.public_key(),
        conf_permissions(&permissions::orchestrator())
    );
    let _ = writeln!(
        c,
        "      {{ nkey: {}, permissions: {} }}",
        gateway.public_key(),
        conf_permissions(&permissions::gateway())
    );
    let _ = writeln!(c, "    ]");
    let _ = writeln!(c, "  }}");
    let _ = writeln!(c, "  {SYS_ACCOUNT} {{");
    let _ = writeln!(
        c,
        "    users: [ {{ nkey: {}, permissions: {} }} ]",
        sys.public_key(),
        conf_permissions(&permissions::orchestrator_sys())
    );
    let _ = writeln!(c, "  }}");
    let _ = writeln!(c, "}}");
    let _ = writeln!(c, "system_account: {SYS_ACCOUNT}\n");
    let _ = writeln!(c, "authorization {{");
    let _ = writeln!(c, "  timeout: {AUTH_TIMEOUT_S}");
    let _ = writeln!(c, "  auth_callout {{");
    let _ = writeln!(c, "    issuer: {}", issuer.public_key());
    let _ = writeln!(c, "    account: {ACCOUNT}");
    let _ = writeln!(
        c,
        "    auth_users: [ {}, {}, {} ]",
        orchestrator.public_key(),
        gateway.public_key(),
        sys.public_key()
    );
    let _ = writeln!(c, "  }}");
    let _ = writeln!(c, "}}");
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writing_again_keeps_the_keys_and_rotating_replaces_them() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &ConfOptions::default(), false).unwrap();
        let first = load(dir.path()).unwrap();
        write(
            dir.path(),
            &ConfOptions { listen: Some("127.0.0.1:4333".into()), ..Default::default() },
            false,
        )
        .unwrap();
        let again = load(dir.path()).unwrap();
        assert_eq!(first.issuer.public_key(), again.issuer.public_key());
        assert_eq!(first.orchestrator, again.orchestrator);
        let conf = std::fs::read_to_string(dir.path().join(CONF_FILE)).unwrap();
        assert!(conf.contains("listen: \"127.0.0.1:4333\""), "{conf}");
        assert!(conf.contains(&format!("issuer: {}", first.issuer.public_key())), "{conf}");
        write(dir.path(), &ConfOptions::default(), true).unwrap();
        assert_ne!(load(dir.path()).unwrap().issuer.public_key(), first.issuer.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(ISSUER_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_missing_folder_is_named() {
        let err = load(Path::new("/nonexistent/fleet-auth")).unwrap_err();
        assert!(format!("{err:#}").contains("nats-setup --dir /nonexistent/fleet-auth"), "{err:#}");
    }
}
