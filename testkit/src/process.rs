//! Fleet's real binaries as child processes a test can crash, freeze and restart.
//!
//! In-process parts (a `run` future on the test's runtime) cannot be frozen, and aborting a task
//! is not the same as a process dying: sockets close differently, child processes of shell steps
//! survive or not, the OS reaps what a process held. Fault tests therefore run
//! `fleet-orchestrator`, `fleet-robot` and `fleet-gateway` as processes ([`Process`]) and send
//! them the signals production sees: SIGKILL (a crash), SIGSTOP/SIGCONT (a freeze: a long GC
//! pause, a suspended VM), SIGTERM (a graceful stop).
//!
//! The binaries are the ones cargo built next to the test executable (`target/<profile>/`); they
//! are not rebuilt here, so a test run must be preceded by `cargo build --bins` (which
//! `cargo test --workspace` does on its own). Each process writes stdout and stderr to one log
//! file in a temporary directory, appended across restarts; when a test panics the directory is
//! kept and its path and the log's last lines printed.

use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use rustix::process::{Pid, Signal, kill_process};
use tempfile::TempDir;
use tokio::time::Instant;

/// Lines of log shown on a failed test.
const TAIL_LINES: usize = 60;
/// Pause between polls of a log file.
const LOG_POLL: Duration = Duration::from_millis(50);

/// The path of a Fleet binary (`fleet-robot`, `fleet-orchestrator`, `fleet-gateway`) next to the
/// running test executable, which lives in `target/<profile>/deps/`.
pub fn fleet_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the test executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .with_context(|| format!("{} is not in target/<profile>/deps", exe.display()))?;
    let binary = profile_dir.join(name);
    if !binary.is_file() {
        bail!(
            "{} is missing: build the binaries first with `cargo build --bins` \
             (cargo test --workspace builds them too)",
            binary.display()
        );
    }
    Ok(binary)
}

/// What to run: program, arguments, environment. Kept so that [`Process::restart`] can start the
/// same command again.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
}

impl ProcessSpec {
    /// `name` labels the process in logs and file names (`robot-r1`).
    pub fn new(name: impl Into<String>, program: impl Into<PathBuf>) -> Self {
        Self { name: name.into(), program: program.into(), args: Vec::new(), env: Vec::new() }
    }

    /// A Fleet binary found with [`fleet_binary`].
    pub fn fleet(name: impl Into<String>, binary: &str) -> anyhow::Result<Self> {
        Ok(Self::new(name, fleet_binary(binary)?))
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets a variable (a later one with the same key wins).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env.push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A running (or exited) child process with its log. Dropping it kills the process.
pub struct Process {
    spec: ProcessSpec,
    child: tokio::process::Child,
    pid: u32,
    /// `None` only after `Drop` kept the directory for a failed test.
    dir: Option<TempDir>,
    status: Option<ExitStatus>,
}

impl Process {
    /// Starts `spec` with its output going to a fresh log file.
    pub fn spawn(spec: ProcessSpec) -> anyhow::Result<Process> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("fleet-{}-", spec.name))
            .tempdir()
            .context("cannot create a directory for the process log")?;
        let (child, pid) = start(&spec, &dir.path().join(log_name(&spec.name)))?;
        Ok(Process { spec, child, pid, dir: Some(dir), status: None })
    }

    /// Starts the same command again, appending to the same log; the previous process must have
    /// exited (kill or wait for it first).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.try_status()?.is_none() {
            bail!("{} (pid {}) is still running; kill it before restarting", self.spec.name, self.pid);
        }
        append_marker(&self.log_path(), "---- restarted ----");
        let (child, pid) = start(&self.spec, &self.log_path())?;
        self.child = child;
        self.pid = pid;
        self.status = None;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir().join(log_name(&self.spec.name))
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read(self.log_path()).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until the log contains `needle`; returns the time waited. The error shows the log.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            if self.log().contains(needle) {
                return Ok(start.elapsed());
            }
            if start.elapsed() >= timeout {
                bail!(
                    "{}: {needle:?} not in the log within {timeout:?}; last lines:\n{}",
                    self.spec.name,
                    self.log_tail(TAIL_LINES)
                );
            }
            tokio::time::sleep(LOG_POLL).await;
        }
    }

    /// SIGKILL (a crash), then reaps it. Does nothing when it already exited.
    pub async fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_status()? {
            return Ok(status);
        }
        self.signal(Signal::KILL)?;
        self.wait(Duration::from_secs(10)).await
    }

    /// SIGSTOP: the process is frozen where it stands (its children, such as a shell step's
    /// process, are not).
    pub fn stop(&self) -> anyhow::Result<()> {
        self.signal(Signal::STOP)
    }

    /// SIGCONT: a frozen process resumes.
    pub fn cont(&self) -> anyhow::Result<()> {
        self.signal(Signal::CONT)
    }

    /// SIGTERM: a graceful stop; use [`wait`](Self::wait) for the exit.
    pub fn term(&self) -> anyhow::Result<()> {
        self.signal(Signal::TERM)
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => {
                let status = status.with_context(|| format!("cannot wait for {}", self.spec.name))?;
                self.status = Some(status);
                Ok(status)
            }
            Err(_) => bail!(
                "{} (pid {}) did not exit within {timeout:?}; last lines of its log:\n{}",
                self.spec.name,
                self.pid,
                self.log_tail(TAIL_LINES)
            ),
        }
    }

    /// The exit status if it has exited, without waiting.
    pub fn try_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status =
                self.child.try_wait().with_context(|| format!("cannot check on {}", self.spec.name))?;
        }
        Ok(self.status)
    }

    /// Whether it is still running (a frozen process counts as running).
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_status(), Ok(None))
    }

    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        if self.status.is_some() {
            bail!("{} (pid {}) has exited; cannot send it {signal:?}", self.spec.name, self.pid);
        }
        let pid = Pid::from_raw(self.pid as i32).context("pid is positive")?;
        kill_process(pid, signal)
            .with_context(|| format!("cannot send {signal:?} to {} (pid {})", self.spec.name, self.pid))
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().map(TempDir::path).expect("log directory present until drop")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.status.is_none() {
            // SIGKILL works on a frozen process too; tokio reaps it (kill_on_drop is set as well).
            let _ = self.child.start_kill();
        }
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let path = dir.keep();
            eprintln!(
                "{} log kept for the failed test: {}\n--- last lines ---\n{}",
                self.spec.name,
                path.join(log_name(&self.spec.name)).display(),
                tail_of(&path.join(log_name(&self.spec.name)), TAIL_LINES)
            );
        }
    }
}

fn log_name(name: &str) -> String {
    format!("{name}.log")
}

fn start(spec: &ProcessSpec, log_path: &Path) -> anyhow::Result<(tokio::process::Child, u32)> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut command = tokio::process::Command::new(&spec.program);
    command
        .args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("cannot duplicate the log file handle")?)
        .stderr(log)
        .kill_on_drop(true);
    let child = command.spawn().with_context(|| format!("cannot start {}", spec.program.display()))?;
    let pid = child.id().context("a just spawned child has a pid")?;
    Ok((child, pid))
}

fn append_marker(path: &Path, text: &str) {
    use std::io::Write;
    if let Ok(mut f) = OpenOptions::new().append(true).open(path) {
        let _ = writeln!(f, "{text}");
    }
}

fn tail_of(path: &Path, lines: usize) -> String {
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
    use super::*;

    fn sh(name: &str, script: &str) -> ProcessSpec {
        ProcessSpec::new(name, "/bin/sh").args(["-c", script])
    }

    #[tokio::test]
    async fn logs_output_and_reports_the_exit() -> anyhow::Result<()> {
        let mut p = Process::spawn(
            sh("echo", "echo out; echo err >&2; echo $GREETING; exit 3").env("GREETING", "hi"),
        )?;
        let status = p.wait(Duration::from_secs(10)).await?;
        assert_eq!(status.code(), Some(3));
        let log = p.log();
        assert!(log.contains("out") && log.contains("err") && log.contains("hi"), "{log}");
        p.restart()?;
        p.wait(Duration::from_secs(10)).await?;
        assert!(p.log().contains("restarted"), "{}", p.log());
        Ok(())
    }

    #[tokio::test]
    async fn stop_cont_term_and_kill() -> anyhow::Result<()> {
        // The shell's trap shows it ran after SIGCONT; `wait` lets the trap run during sleep.
        let mut p = Process::spawn(sh(
            "sleeper",
            "trap 'echo got-term; exit 0' TERM; echo ready; while :; do sleep 0.1; done",
        ))?;
        p.wait_for_log("ready", Duration::from_secs(5)).await?;
        p.stop()?;
        assert!(p.is_running(), "a stopped process still counts as running");
        p.cont()?;
        p.term()?;
        let status = p.wait(Duration::from_secs(10)).await?;
        assert!(status.success(), "{status}");
        p.wait_for_log("got-term", Duration::from_secs(5)).await?;

        p.restart()?;
        p.stop()?;
        let status = p.kill().await?;
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
        assert!(p.term().is_err(), "no signals to an exited process");
        Ok(())
    }

    #[tokio::test]
    async fn wait_is_bounded() -> anyhow::Result<()> {
        let mut p = Process::spawn(sh("forever", "sleep 30"))?;
        let started = Instant::now();
        assert!(p.wait(Duration::from_millis(200)).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
        p.kill().await?;
        Ok(())
    }

    #[test]
    fn a_missing_binary_says_how_to_build_it() {
        let error = fleet_binary("fleet-no-such-binary").unwrap_err().to_string();
        assert!(error.contains("cargo build --bins"), "{error}");
    }
}
