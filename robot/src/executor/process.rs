//! Child processes of a job: own process group, streamed output, bounded capture, group kill.
//!
//! Each process is started in its own process group (`process_group(0)`), so stopping it kills
//! everything it started (`kill -KILL -<pgid>`), not only the direct child: an RPA script that
//! starts a browser must not leave the browser running after a cancel. The group is also killed
//! once the main process has exited, so no step leaves stray background processes behind (and
//! none can keep our pipes open forever).
//!
//! Output is read line by line (a line longer than [`MAX_LINE`] is split) and handed to the caller
//! as it comes; the last [`TAIL_BYTES`] of each stream are kept for the step's result, which then
//! says what was cut ([`Finished::truncation`]): every line is in the job's log.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::LogStream;

/// Longest line handed on in one piece.
pub const MAX_LINE: usize = 16 * 1024;
/// Output kept per stream for the result (the last bytes, since the end explains a failure).
pub const TAIL_BYTES: usize = 64 * 1024;
/// How long output may keep coming after the main process exited before we stop reading.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);
/// Lines in flight between the pipe readers and the caller; bounded so a chatty process is slowed
/// down by its pipe rather than filling memory.
const LINE_BUFFER: usize = 256;

/// Variables of the robot's environment every step gets, when the robot has them: what
/// programs need to find themselves, their home, their locale and a temporary directory.
pub const BASE_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM", "TMPDIR", "TMP",
    "TEMP",
];

/// `PATH` when the robot has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Prefixes of names `--step-env` may not pass through: the robot's own settings and NATS
/// connection (URL, credentials, keys), which a step must never see.
pub const WITHHELD_PREFIXES: &[&str] = &["FLEET_", "NATS_"];

/// Whether `--step-env` may pass `name` (a plain variable name, not one of the robot's own).
pub fn check_pass_name(name: &str) -> Result<(), String> {
    let plain = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !plain {
        return Err(format!("{name:?} is not a variable name (letters, digits, _)"));
    }
    if let Some(p) = WITHHELD_PREFIXES.iter().find(|p| name.starts_with(*p)) {
        return Err(format!("{name}: {p}* variables are the robot's own and never reach a step"));
    }
    Ok(())
}

/// The environment a step starts from: [`BASE_ENV`] and the `pass` names, from the robot's
/// environment where it has them.
pub fn base_env(pass: &[String]) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for name in BASE_ENV.iter().copied().chain(pass.iter().map(String::as_str)) {
        if let Ok(value) = std::env::var(name) {
            env.insert(name.to_owned(), value);
        }
    }
    env.entry("PATH".to_owned()).or_insert_with(|| DEFAULT_PATH.to_owned());
    env
}

/// A program to start.
#[derive(Debug, Clone)]
pub struct Spawn {
    pub program: String,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    /// The whole environment of the process: start from [`base_env`], never from the robot's
    /// own (which holds its NATS URL and, with the security work, its key and credentials).
    pub env: BTreeMap<String, String>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exited(i32),
    Signalled(i32),
    /// Killed because the job was cancelled.
    Cancelled,
    /// Killed because its own time limit passed.
    TimedOut,
}

/// A finished process and the tail of its output.
#[derive(Debug, Clone)]
pub struct Finished {
    pub ended: Ended,
    pub stdout: String,
    pub stderr: String,
    pub last_stderr_line: Option<String>,
    /// How many bytes each stream produced in all (lines and their newlines).
    pub stdout_bytes: usize,
    pub stderr_bytes: usize,
}

impl Finished {
    /// Which streams were cut to their tail, for the step's result:
    /// `{"stdout": {"original_bytes", "kept_bytes", "kept": "tail", "in": "log"}}`; `None` when
    /// both are whole. Every line of both streams is in the job's log.
    pub fn truncation(&self) -> Option<serde_json::Value> {
        let mut cut = serde_json::Map::new();
        for (name, text, total) in
            [("stdout", &self.stdout, self.stdout_bytes), ("stderr", &self.stderr, self.stderr_bytes)]
        {
            if total > text.len() {
                cut.insert(
                    name.into(),
                    serde_json::json!({"original_bytes": total, "kept_bytes": text.len(), "kept": "tail", "in": "log"}),
                );
            }
        }
        (!cut.is_empty()).then_some(serde_json::Value::Object(cut))
    }
}

/// The last `cap` bytes of a stream.
#[derive(Debug)]
pub struct Tail {
    buf: VecDeque<u8>,
    cap: usize,
    /// Bytes pushed in all.
    seen: usize,
}

impl Tail {
    pub fn new(cap: usize) -> Self {
        Self { buf: VecDeque::new(), cap, seen: 0 }
    }

    /// Bytes pushed in all, kept or not.
    pub fn seen(&self) -> usize {
        self.seen
    }

    pub fn push_line(&mut self, line: &str) {
        self.seen += line.len() + 1;
        self.buf.extend(line.as_bytes());
        self.buf.push_back(b'\n');
        let excess = self.buf.len().saturating_sub(self.cap);
        self.buf.drain(..excess);
    }

    pub fn into_string(mut self) -> String {
        let bytes = self.buf.make_contiguous();
        // The cut may have split a character: skip continuation bytes at the front.
        let start = bytes.iter().position(|b| (*b as i8) >= -0x40).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }
}

/// Run a process to its end. `on_line` sees every line (stream, text) and returns whether it is
/// a log line (it is also kept in the tail either way). A spawn failure is returned as the
/// `io::Error`, so the caller can tell "program not found" from a failed run.
pub async fn run(
    spawn: &Spawn,
    cancel: &CancellationToken,
    timeout: Option<Duration>,
    mut on_line: impl FnMut(LogStream, &str) + Send,
) -> std::io::Result<Finished> {
    let mut cmd = Command::new(&spawn.program);
    cmd.args(&spawn.args)
        .current_dir(&spawn.cwd)
        .env_clear()
        .envs(&spawn.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let pgid = child.id();

    let (tx, mut lines) = mpsc::channel::<(LogStream, String)>(LINE_BUFFER);
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(read_lines(out, LogStream::Stdout, tx.clone())));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(read_lines(err, LogStream::Stderr, tx.clone())));
    }
    drop(tx);

    let mut stdout = Tail::new(TAIL_BYTES);
    let mut stderr = Tail::new(TAIL_BYTES);
    let mut last_stderr_line = None;
    let mut handle = |stream: LogStream, line: String| {
        match stream {
            LogStream::Stderr => {
                stderr.push_line(&line);
                if !line.trim().is_empty() {
                    last_stderr_line = Some(line.clone());
                }
            }
            _ => stdout.push_line(&line),
        }
        on_line(stream, &line);
    };

    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);

    let mut lines_open = true;
    let ended = loop {
        tokio::select! {
            line = lines.recv(), if lines_open => match line {
                Some((stream, line)) => handle(stream, line),
                None => lines_open = false,
            },
            status = child.wait() => {
                break match status {
                    Ok(status) => exit_kind(status),
                    Err(_) => Ended::Signalled(9),
                };
            }
            _ = cancel.cancelled() => {
                kill_group(pgid, &mut child).await;
                let _ = child.wait().await;
                break Ended::Cancelled;
            }
            _ = &mut deadline => {
                kill_group(pgid, &mut child).await;
                let _ = child.wait().await;
                break Ended::TimedOut;
            }
        }
    };

    // Take what is still in the pipes, but not forever: a background process of the group may
    // hold them open.
    let drain = async {
        while let Some((stream, line)) = lines.recv().await {
            handle(stream, line);
        }
    };
    let _ = tokio::time::timeout(DRAIN_AFTER_EXIT, drain).await;
    kill_group(pgid, &mut child).await;
    for r in readers {
        r.abort();
    }
    let (stdout_bytes, stderr_bytes) = (stdout.seen(), stderr.seen());
    Ok(Finished {
        ended,
        stdout: stdout.into_string(),
        stderr: stderr.into_string(),
        last_stderr_line,
        stdout_bytes,
        stderr_bytes,
    })
}

fn exit_kind(status: std::process::ExitStatus) -> Ended {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Ended::Exited(code),
        (None, Some(sig)) => Ended::Signalled(sig),
        (None, None) => Ended::Signalled(0),
    }
}

/// SIGKILL the whole process group; falls back to killing the child alone if `kill` cannot be
/// run. Killing a group that is already gone is harmless.
pub async fn kill_group(pgid: Option<u32>, child: &mut tokio::process::Child) {
    if let Some(pgid) = pgid {
        let status = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{pgid}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if status.is_ok() {
            return;
        }
        tracing::warn!(pgid, "could not run `kill` for the process group; killing the child only");
    }
    let _ = child.start_kill();
}

async fn read_lines(
    reader: impl AsyncRead + Unpin,
    stream: LogStream,
    tx: mpsc::Sender<(LogStream, String)>,
) {
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = match (&mut reader).take(MAX_LINE as u64).read_until(b'\n', &mut buf).await {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        }
        let line = String::from_utf8_lossy(&buf).into_owned();
        if tx.send((stream, line)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn step_env_names_are_checked_and_the_base_is_scrubbed() {
        assert!(check_pass_name("HTTPS_PROXY").is_ok());
        for bad in ["NATS_URL", "FLEET_ROBOT_KEY", "", "1X", "A-B"] {
            assert!(check_pass_name(bad).is_err(), "{bad:?} accepted");
        }
        let env = base_env(&[]);
        assert!(env.contains_key("PATH"));
        assert!(env.keys().all(|k| BASE_ENV.contains(&k.as_str())), "{env:?}");
    }

    fn sh(script: &str, dir: &std::path::Path) -> Spawn {
        Spawn {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            cwd: dir.to_owned(),
            env: BTreeMap::from([("GREETING".to_owned(), "hello".to_owned())]),
        }
    }

    #[test]
    fn tail_keeps_the_end() {
        let mut t = Tail::new(8);
        t.push_line("abcdef");
        t.push_line("xyz");
        assert_eq!(t.into_string(), "def\nxyz\n");
        let mut t = Tail::new(4);
        t.push_line("ééé");
        assert_eq!(t.seen(), 7);
        assert_eq!(t.into_string(), "é\n", "a split character is dropped, not mangled");
    }

    #[tokio::test]
    async fn streams_lines_and_exit_status() {
        let dir = tempfile::tempdir().unwrap();
        let mut seen = Vec::new();
        let spawn = sh("echo $GREETING; echo oops >&2; printf 'no newline'; exit 3", dir.path());
        let f = tokio::time::timeout(
            Duration::from_secs(10),
            run(&spawn, &CancellationToken::new(), None, |s, l| seen.push((s, l.to_owned()))),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(f.ended, Ended::Exited(3));
        assert_eq!(f.stdout, "hello\nno newline\n");
        assert_eq!(f.last_stderr_line.as_deref(), Some("oops"));
        assert!(seen.contains(&(LogStream::Stdout, "hello".into())));
        assert!(seen.contains(&(LogStream::Stderr, "oops".into())));
    }

    #[tokio::test]
    async fn output_past_the_tail_says_what_was_cut() {
        let dir = tempfile::tempdir().unwrap();
        // 200 lines of 1000 bytes: more than the tail keeps.
        let spawn = sh(
            "i=0; while [ $i -lt 200 ]; do printf '%0999d\\n' $i; i=$((i+1)); done; echo e >&2",
            dir.path(),
        );
        let mut lines = 0;
        let f = tokio::time::timeout(
            Duration::from_secs(10),
            run(&spawn, &CancellationToken::new(), None, |s, _| lines += usize::from(s == LogStream::Stdout)),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(lines, 200, "every line is handed on");
        assert_eq!(f.stdout_bytes, 200_000);
        assert!(f.stdout.len() <= TAIL_BYTES);
        let cut = f.truncation().expect("stdout was cut");
        assert_eq!(cut["stdout"]["original_bytes"], 200_000);
        assert_eq!(cut["stdout"]["kept_bytes"], f.stdout.len());
        assert_eq!(cut["stdout"]["in"], "log");
        assert!(cut.get("stderr").is_none(), "stderr was whole: {cut}");
    }

    #[tokio::test]
    async fn missing_program_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let spawn = Spawn {
            program: "/nonexistent/fleet-test-program".into(),
            args: vec![],
            cwd: dir.path().to_owned(),
            env: BTreeMap::new(),
        };
        let err = run(&spawn, &CancellationToken::new(), None, |_, _| {}).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn timeout_kills_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let spawn = sh("sleep 30 & echo $! > bg.pid; wait", dir.path());
        let f = tokio::time::timeout(
            Duration::from_secs(10),
            run(&spawn, &CancellationToken::new(), Some(Duration::from_millis(300)), |_, _| {}),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(f.ended, Ended::TimedOut);
        let pid: u32 = std::fs::read_to_string(dir.path().join("bg.pid")).unwrap().trim().parse().unwrap();
        wait_gone(pid).await;
    }

    /// Wait (bounded) until a process no longer runs (gone, or a zombie nobody has reaped yet).
    pub(crate) async fn wait_gone(pid: u32) {
        let gone = async {
            loop {
                match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                    Err(_) => return,
                    Ok(stat) if stat.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z')) => {
                        return;
                    }
                    Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), gone)
            .await
            .unwrap_or_else(|_| panic!("process {pid} still runs after its group was killed"));
    }
}
