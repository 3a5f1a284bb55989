//! A real nats-server for one test: random port, temporary JetStream file store.
//!
//! The server runs as a child process so a test can do to it what production will: kill it
//! (SIGKILL, as a crash), stop it (SIGTERM), and start it again on the same port with the same
//! store, which is how Fleet's "nothing is lost when NATS restarts" is tested. It is started
//! with command-line flags only (`-a 127.0.0.1 -p PORT -js -sd DIR`), not with `nats/nats.conf`,
//! because the port and store are per test.
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

/// A nats-server child process with JetStream, owned by one test. Dropping it kills the server.
pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    /// `None` only after `Drop` kept the directory for a failed test.
    dir: Option<TempDir>,
    /// `None` while the server is not running (after `kill` or `stop`).
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a nats-server on a free loopback port with a fresh store, and returns once it
    /// accepts clients and JetStream answers.
    pub async fn start() -> anyhow::Result<NatsServer> {
        let binary = nats_server_binary()?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("fleet-nats-")
                .tempdir()
                .context("cannot create a temporary directory for nats-server")?;
            let mut server =
                NatsServer { binary: binary.clone(), port: free_port()?, dir: Some(dir), child: None };
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

    /// A client connected to this server (plain async-nats defaults: it reconnects).
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        async_nats::connect(self.url()).await.with_context(|| format!("cannot connect to {}", self.url()))
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
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(1))
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

/// The nats-server binary the tests use, checked once per process to be 2.11 or newer:
/// `FLEET_NATS_SERVER` if set, else `<workspace>/.tools/nats/bin/nats-server`.
pub fn nats_server_binary() -> anyhow::Result<PathBuf> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let binary = find_binary()?;
            check_version(&binary)?;
            Ok(binary)
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

fn find_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("FLEET_NATS_SERVER") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(format!("FLEET_NATS_SERVER is set to {}, which is not a file", path.display()));
        }
        return Ok(path);
    }
    let installed = workspace_root().join(".tools/nats/bin/nats-server");
    if installed.is_file() {
        return Ok(installed);
    }
    Err(format!(
        "no nats-server for the tests: FLEET_NATS_SERVER is not set and {} does not exist; \
         run scripts/install-nats to install the pinned nats-server 2.15.1 there",
        installed.display()
    ))
}

fn check_version(binary: &Path) -> Result<(), String> {
    let output = Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {} --version: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = parse_version(&text)
        .ok_or_else(|| format!("cannot read the version of {} from {:?}", binary.display(), text.trim()))?;
    if (version.0, version.1) < MIN_VERSION {
        return Err(format!(
            "{} is nats-server {}.{}.{}; Fleet needs {}.{} or newer (the tests pin 2.15.1): \
             run scripts/install-nats, or point FLEET_NATS_SERVER at a newer server",
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
