//! The robot's configuration, its external runner specs and its state directory.
//!
//! [`RobotConfig`] is one typed struct with defaults that work for a local run; the CLI (see
//! [`crate::cli`]) and tests both build it, and nothing below reads the environment again
//! (except the default state directory, computed once in [`default_state_dir`]).
//!
//! The state directory keeps two small files that make a robot the same robot across restarts:
//! `robot-id` (made once when no `--id` is given) and `instance-id` (a uuid made once, sent at
//! registration as `state_dir_id`, so the orchestrator can refuse a second process that claims the
//! same robot id from another directory while the first is alive).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use fleet_schemas::ids::{Capability, Class, IdError, RobotId, SHELL_CAPABILITY, TenantId};
use fleet_schemas::workflow::WorkflowFormat;

/// Default NATS server, the conventional local one.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// How long running jobs may take to finish after shutdown was asked for.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

/// A robot key (`crpa_…`, role robot): how the robot proves to NATS who it is. Its Debug form
/// shows only the key id.
#[derive(Clone, PartialEq, Eq)]
pub struct RobotKey(String);

impl RobotKey {
    /// Checks the shape (`crpa_<key id>_<secret>`); the error names it.
    pub fn new(raw: &str) -> Result<RobotKey, String> {
        fleet_nats_auth::client::key_id(raw).map_err(|e| e.to_string())?;
        Ok(RobotKey(raw.trim().to_owned()))
    }

    pub fn key_id(&self) -> String {
        fleet_nats_auth::client::key_id(&self.0).unwrap_or_default()
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for RobotKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RobotKey({}, <secret>)", self.key_id())
    }
}

/// Everything a robot process needs to know; see the CLI flags for what each field means.
#[derive(Debug, Clone)]
pub struct RobotConfig {
    pub nats_url: String,
    /// The robot's key; `None` connects without credentials (refused by a locked server).
    pub key: Option<RobotKey>,
    /// TLS of the NATS connection (`--nats-ca`, `--nats-cert`, `--nats-key`, `--nats-tls`).
    pub nats_tls: fleet_connect::NatsTls,
    pub tenant: TenantId,
    /// `None`: read `state_dir/robot-id`, else make one ([`RobotId::random`]) and store it.
    pub id: Option<RobotId>,
    /// Display name; default: the robot id.
    pub name: Option<String>,
    /// Declared capabilities (the implicit ones are added by [`RobotConfig::capabilities`]).
    pub capabilities: Vec<Capability>,
    /// Jobs run at once, at least 1.
    pub max_jobs: u32,
    /// Without it the robot may run `shell` steps and has the implicit capability `shell`.
    pub no_shell: bool,
    /// External runners; each adds its format as an implicit capability.
    pub runners: Vec<RunnerSpec>,
    /// Keeps `robot-id` and `instance-id`.
    pub state_dir: PathBuf,
    /// Where job directories go; default `state_dir/jobs`.
    pub work_dir: Option<PathBuf>,
    /// How long running jobs may finish after shutdown before they are released.
    pub shutdown_grace: Duration,
    pub environment: String,
    pub tags: Vec<String>,
    /// Reported host name; default: the machine's.
    pub hostname: Option<String>,
    /// Custom metrics sent with every heartbeat (names checked by
    /// [`crate::metrics::check_name`], at most [`crate::metrics::MAX_METRICS`]); runners may add
    /// more while jobs run.
    pub metrics: BTreeMap<String, f64>,
    /// Variables of the robot's environment passed to steps and runners besides the basics
    /// (`--step-env`; checked by [`crate::executor::process::check_pass_name`]).
    pub step_env: Vec<String>,
}

impl RobotConfig {
    /// A config with the defaults of a local run for `tenant`.
    pub fn new(tenant: TenantId) -> Self {
        let state_dir = default_state_dir(&tenant);
        Self {
            nats_url: DEFAULT_NATS_URL.to_owned(),
            key: None,
            nats_tls: fleet_connect::NatsTls::default(),
            tenant,
            id: None,
            name: None,
            capabilities: Vec::new(),
            max_jobs: 1,
            no_shell: false,
            runners: Vec::new(),
            state_dir,
            work_dir: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            environment: String::new(),
            tags: Vec::new(),
            hostname: None,
            metrics: BTreeMap::new(),
            step_env: Vec::new(),
        }
    }

    /// Declared and implicit capabilities, canonical (sorted, deduplicated): `shell` unless
    /// `no_shell`, and one per runner format.
    pub fn capabilities(&self) -> Result<Class, IdError> {
        let mut caps: BTreeSet<Capability> = self.capabilities.iter().cloned().collect();
        if !self.no_shell {
            caps.insert(Capability::new(SHELL_CAPABILITY)?);
        }
        for runner in &self.runners {
            caps.insert(Capability::new(runner.format.as_str())?);
        }
        Class::new(caps)
    }

    /// Directory that job directories are made in.
    pub fn jobs_dir(&self) -> PathBuf {
        self.work_dir.clone().unwrap_or_else(|| self.state_dir.join("jobs"))
    }
}

/// `$XDG_STATE_HOME/fleet-robot/<tenant>`, else `~/.local/state/fleet-robot/<tenant>`, else
/// `./.fleet-robot/<tenant>` when there is no home directory.
pub fn default_state_dir(tenant: &TenantId) -> PathBuf {
    let base =
        std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()).map(PathBuf::from).or_else(|| {
            std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".local/state"))
        });
    match base {
        Some(base) => base.join("fleet-robot").join(tenant.as_str()),
        None => PathBuf::from(".fleet-robot").join(tenant.as_str()),
    }
}

/// An external runner: `FORMAT=COMMAND`, e.g. `casare=python3 run.py {workflow} {variables}`.
///
/// The command is split into words once, here, with simple shell-words rules (whitespace
/// separates words; `'…'` is literal; `"…"` allows `\"` and `\\`; a backslash outside quotes
/// escapes the next character). No shell is involved, so nothing in a path needs quoting: the
/// placeholders `{workflow}`, `{variables}` and `{job_dir}` are replaced inside each word by
/// absolute paths after splitting. Wrap the command in `sh -c '…'` yourself if you need a shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerSpec {
    pub format: WorkflowFormat,
    pub command: String,
}

/// Why a `--runner` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunnerSpecError {
    #[error("expected FORMAT=COMMAND, e.g. \"casare=python3 run.py {{workflow}} {{variables}}\"")]
    MissingEquals,
    #[error("unknown runner format {0:?} (known: {known})", known = external_formats())]
    UnknownFormat(String),
    #[error("the command is empty")]
    EmptyCommand,
    #[error("the command has an unclosed quote")]
    UnclosedQuote,
}

fn external_formats() -> String {
    WorkflowFormat::EXTERNAL.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(", ")
}

impl RunnerSpec {
    /// The command split into words (placeholders not yet replaced).
    pub fn argv(&self) -> Result<Vec<String>, RunnerSpecError> {
        let words = split_words(&self.command)?;
        if words.is_empty() {
            return Err(RunnerSpecError::EmptyCommand);
        }
        Ok(words)
    }
}

impl FromStr for RunnerSpec {
    type Err = RunnerSpecError;

    fn from_str(s: &str) -> Result<Self, RunnerSpecError> {
        let (format, command) = s.split_once('=').ok_or(RunnerSpecError::MissingEquals)?;
        let format = format.trim();
        let format = WorkflowFormat::parse_external(format)
            .ok_or_else(|| RunnerSpecError::UnknownFormat(format.to_owned()))?;
        let spec = RunnerSpec { format, command: command.trim().to_owned() };
        spec.argv()?;
        Ok(spec)
    }
}

/// Split a command line into words with the simple rules described on [`RunnerSpec`].
pub fn split_words(command: &str) -> Result<Vec<String>, RunnerSpecError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = command.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err(RunnerSpecError::UnclosedQuote),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err(RunnerSpecError::UnclosedQuote),
                        },
                        Some(c) => word.push(c),
                        None => return Err(RunnerSpecError::UnclosedQuote),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(c) = chars.next() {
                    word.push(c);
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// The robot's state directory: where its id and instance id are kept.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

/// A state directory file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds an invalid robot id: {source}")]
    BadRobotId {
        path: PathBuf,
        #[source]
        source: IdError,
    },
}

const ROBOT_ID_FILE: &str = "robot-id";
const INSTANCE_ID_FILE: &str = "instance-id";

impl StateDir {
    /// Open (creating it if needed) a state directory.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, StateDirError> {
        let path = path.into();
        std::fs::create_dir_all(&path).map_err(|source| StateDirError::Io { path: path.clone(), source })?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The robot id: `configured` when given, else the stored one, else a new random one that is
    /// stored so the next start is the same robot.
    pub fn robot_id(&self, configured: Option<&RobotId>) -> Result<RobotId, StateDirError> {
        if let Some(id) = configured {
            return Ok(id.clone());
        }
        let file = self.path.join(ROBOT_ID_FILE);
        if let Some(text) = self.read(&file)? {
            return RobotId::new(text.trim())
                .map_err(|source| StateDirError::BadRobotId { path: file, source });
        }
        let id = RobotId::random();
        self.write(&file, id.as_str())?;
        Ok(id)
    }

    /// The instance id: a uuid made once per state directory.
    pub fn instance_id(&self) -> Result<String, StateDirError> {
        let file = self.path.join(INSTANCE_ID_FILE);
        if let Some(text) = self.read(&file)? {
            let text = text.trim();
            if !text.is_empty() {
                return Ok(text.to_owned());
            }
        }
        let id = uuid::Uuid::new_v4().to_string();
        self.write(&file, &id)?;
        Ok(id)
    }

    fn read(&self, file: &Path) -> Result<Option<String>, StateDirError> {
        match std::fs::read_to_string(file) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateDirError::Io { path: file.to_owned(), source }),
        }
    }

    /// Write through a temporary file and rename, so a crash never leaves half an id behind.
    fn write(&self, file: &Path, contents: &str) -> Result<(), StateDirError> {
        let tmp = file.with_extension("tmp");
        let io = |source| StateDirError::Io { path: file.to_owned(), source };
        std::fs::write(&tmp, format!("{contents}\n")).map_err(io)?;
        std::fs::rename(&tmp, file).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_spec_parses() {
        let spec: RunnerSpec = "casare=python3 run.py {workflow} {variables}".parse().unwrap();
        assert_eq!(spec.format, WorkflowFormat::Casare);
        assert_eq!(spec.argv().unwrap(), ["python3", "run.py", "{workflow}", "{variables}"]);
        assert_eq!("nope".parse::<RunnerSpec>(), Err(RunnerSpecError::MissingEquals));
        assert!(matches!("fleet=x".parse::<RunnerSpec>(), Err(RunnerSpecError::UnknownFormat(_))));
        assert!(matches!("canvas=x".parse::<RunnerSpec>(), Err(RunnerSpecError::UnknownFormat(_))));
        assert_eq!("casare=  ".parse::<RunnerSpec>(), Err(RunnerSpecError::EmptyCommand));
        assert_eq!("casare=run 'oops".parse::<RunnerSpec>(), Err(RunnerSpecError::UnclosedQuote));
        let msg = "canvas=x".parse::<RunnerSpec>().unwrap_err().to_string();
        assert!(msg.contains("canvas") && msg.contains("casare"), "{msg}");
    }

    #[test]
    fn split_words_quotes() {
        let w = split_words(r#"sh -c 'echo "a b"; exit 3' "x \"y\" \\z" a\ b {workflow}"#).unwrap();
        assert_eq!(w, ["sh", "-c", r#"echo "a b"; exit 3"#, r#"x "y" \z"#, "a b", "{workflow}"]);
        assert_eq!(split_words("  ").unwrap(), Vec::<String>::new());
        assert_eq!(split_words("''").unwrap(), [""]);
        assert_eq!(split_words(r#""a"#), Err(RunnerSpecError::UnclosedQuote));
    }

    #[test]
    fn capabilities_include_implicit_ones() {
        let mut c = RobotConfig::new(TenantId::new("acme").unwrap());
        c.capabilities = vec![Capability::new("gpu").unwrap(), Capability::new("browser").unwrap()];
        assert_eq!(c.capabilities().unwrap().name(), "browser+gpu+shell");
        c.no_shell = true;
        c.runners = vec!["casare=run {workflow}".parse().unwrap()];
        assert_eq!(c.capabilities().unwrap().name(), "browser+casare+gpu");
        c.capabilities.clear();
        c.runners.clear();
        assert_eq!(c.capabilities().unwrap().name(), "any");
    }

    #[test]
    fn robot_id_is_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path().join("s")).unwrap();
        let first = state.robot_id(None).unwrap();
        let again = StateDir::open(dir.path().join("s")).unwrap().robot_id(None).unwrap();
        assert_eq!(first, again, "a restarted robot keeps its id");
        let given = RobotId::new("r7").unwrap();
        assert_eq!(state.robot_id(Some(&given)).unwrap(), given);
        assert_eq!(state.robot_id(None).unwrap(), first, "a given id does not overwrite the stored one");
        let instance = state.instance_id().unwrap();
        assert_eq!(state.instance_id().unwrap(), instance);
        assert!(uuid::Uuid::parse_str(&instance).is_ok());
    }

    #[test]
    fn bad_stored_robot_id_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("robot-id"), "Not Valid\n").unwrap();
        let err = StateDir::open(dir.path()).unwrap().robot_id(None).unwrap_err().to_string();
        assert!(err.contains("robot-id") && err.contains("invalid robot id"), "{err}");
    }
}
