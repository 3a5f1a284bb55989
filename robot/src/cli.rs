//! Command line: every flag is also an environment variable `FLEET_ROBOT_<FLAG>` (plus the
//! conventional `NATS_URL`), validated into a [`RobotConfig`] with errors that name the flag.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use fleet_schemas::ids::{BUILTIN_CAPABILITIES, Capability, RobotId, SHELL_CAPABILITY, TenantId};

use crate::config::{RobotConfig, RobotKey, RunnerSpec, default_state_dir};

fn after_help() -> String {
    format!(
        "Built-in capabilities: {}.\n\
         Custom capability names are allowed: 1 to 32 characters of a-z, 0-9, _ and -.\n\
         Implicit capabilities: `{SHELL_CAPABILITY}` unless --no-shell, and the format of each --runner.\n\
         \n\
         Runner commands are split into words like a simple shell would (quotes, backslash), without\n\
         running a shell; {{workflow}}, {{variables}} and {{job_dir}} become absolute paths. The runner\n\
         runs in the job directory; a stdout line `FLEET_PROGRESS <0-100> [node]` reports progress,\n\
         a line `FLEET_METRIC <name> <number>` sets a robot metric (sent with the heartbeat);\n\
         result.json in the job directory becomes the job's output.\n\
         \n\
         Job directories of completed jobs are removed; those of failed jobs are kept for inspection.",
        BUILTIN_CAPABILITIES.join(", ")
    )
}

/// Fleet robot: pulls job offers for its capabilities, claims them, runs the workflows and
/// reports back. Stop it with Ctrl-C or SIGTERM: running jobs get --shutdown-grace to finish.
/// It also obeys the commands the orchestrator keeps for it (pause, maintenance, drain, stop,
/// restart: a restart re-executes the binary with the same arguments).
#[derive(Debug, Parser)]
#[command(name = "fleet-robot", version, about, long_about = None, after_help = after_help())]
pub struct Cli {
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = crate::config::DEFAULT_NATS_URL)]
    pub nats_url: String,

    #[command(flatten)]
    pub nats_tls: fleet_connect::NatsTlsArgs,

    /// The robot's key (crpa_…, role robot; create one with POST /api/v1/robot-api-keys or
    /// `fleet-orchestrator api-key create --role robot`). Its tenant, bound robot id and the
    /// capabilities it may claim come from the key.
    #[arg(long, env = "FLEET_ROBOT_KEY", hide_env_values = true, conflicts_with = "key_file")]
    pub key: Option<String>,

    /// A file holding the robot's key (safer than --key: not in the process list).
    #[arg(long, env = "FLEET_ROBOT_KEY_FILE")]
    pub key_file: Option<PathBuf>,

    /// Tenant the robot works for; default: the key's. A tenant that disagrees with the key's is
    /// an error.
    #[arg(long, env = "FLEET_ROBOT_TENANT")]
    pub tenant: Option<String>,

    /// Robot id; default: the one kept in the state directory, or a new random one.
    #[arg(long, env = "FLEET_ROBOT_ID")]
    pub id: Option<String>,

    /// Display name; default: the robot id.
    #[arg(long, env = "FLEET_ROBOT_NAME")]
    pub name: Option<String>,

    /// Declared capabilities, comma separated (e.g. browser,desktop).
    #[arg(long, env = "FLEET_ROBOT_CAPABILITIES", value_delimiter = ',')]
    pub capabilities: Vec<String>,

    /// Jobs run at once.
    #[arg(long, env = "FLEET_ROBOT_MAX_JOBS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_jobs: u32,

    /// Do not run shell steps (and do not have the `shell` capability).
    #[arg(long, env = "FLEET_ROBOT_NO_SHELL")]
    pub no_shell: bool,

    /// External runner FORMAT=COMMAND, e.g. "casare=python3 run.py {workflow} {variables}";
    /// repeatable (the environment variable holds one).
    #[arg(long = "runner", env = "FLEET_ROBOT_RUNNER", value_name = "FORMAT=COMMAND")]
    pub runners: Vec<String>,

    /// State directory (robot id, instance id); default $XDG_STATE_HOME/fleet-robot/<tenant>
    /// or ~/.local/state/fleet-robot/<tenant>.
    #[arg(long, env = "FLEET_ROBOT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// Where job directories go; default <state-dir>/jobs.
    #[arg(long, env = "FLEET_ROBOT_WORK_DIR")]
    pub work_dir: Option<PathBuf>,

    /// Time running jobs get to finish on shutdown before they are released (e.g. 60s, 2m).
    #[arg(long, env = "FLEET_ROBOT_SHUTDOWN_GRACE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Environment label reported to the orchestrator (e.g. production).
    #[arg(long, env = "FLEET_ROBOT_ENVIRONMENT", default_value = "")]
    pub environment: String,

    /// Tags reported to the orchestrator, comma separated.
    #[arg(long, env = "FLEET_ROBOT_TAGS", value_delimiter = ',')]
    pub tags: Vec<String>,

    /// Host name reported to the orchestrator; default: this machine's.
    #[arg(long, env = "FLEET_ROBOT_HOSTNAME")]
    pub hostname: Option<String>,

    /// Custom metric NAME=VALUE sent with every heartbeat (NAME: 1 to 32 of a-z, 0-9, _; VALUE: a
    /// number); repeatable, the environment variable holds a comma separated list.
    #[arg(long = "metric", env = "FLEET_ROBOT_METRIC", value_name = "NAME=VALUE", value_delimiter = ',')]
    pub metrics: Vec<String>,

    /// Pass the robot's environment variable NAME on to shell steps and runners; repeatable
    /// (the environment variable holds a comma separated list). Steps otherwise get only PATH,
    /// HOME, USER, LOGNAME, SHELL, LANG, LC_*, TZ, TERM, TMPDIR/TMP/TEMP, their own `env` and
    /// FLEET_JOB_ID/FLEET_ATTEMPT/FLEET_JOB_DIR; FLEET_* and NATS_* can never be passed.
    #[arg(long = "step-env", env = "FLEET_ROBOT_STEP_ENV", value_name = "NAME", value_delimiter = ',')]
    pub step_env: Vec<String>,
}

/// A flag with a bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag}: {message}")]
pub struct CliError {
    pub flag: &'static str,
    pub message: String,
}

fn bad(flag: &'static str, message: impl ToString) -> CliError {
    CliError { flag, message: message.to_string() }
}

impl Cli {
    /// The key from --key or --key-file, if either was given.
    pub fn key(&self) -> Result<Option<RobotKey>, CliError> {
        let raw = match (&self.key, &self.key_file) {
            (Some(k), _) => k.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| bad("--key-file", format!("cannot read {}: {e}", path.display())))?,
            (None, None) => return Ok(None),
        };
        let flag = if self.key.is_some() { "--key" } else { "--key-file" };
        RobotKey::new(&raw).map(Some).map_err(|e| bad(flag, e))
    }

    /// Validate into a config without asking anyone: the tenant is `--tenant` (default
    /// `default`), the key as given. [`crate::enrol::into_config_enrolled`] completes it from
    /// the key.
    pub fn into_config(self) -> Result<RobotConfig, CliError> {
        if self.nats_url.trim().is_empty() {
            return Err(bad("--nats-url (NATS_URL)", "must not be empty"));
        }
        let key = self.key()?;
        let tenant = TenantId::new(self.tenant.as_deref().unwrap_or("default").trim())
            .map_err(|e| bad("--tenant", e))?;
        let id = self.id.map(|i| RobotId::new(i.trim())).transpose().map_err(|e| bad("--id", e))?;
        let mut capabilities = Vec::new();
        for name in self.capabilities.iter().map(|c| c.trim()).filter(|c| !c.is_empty()) {
            let cap = Capability::new(name).map_err(|e| bad("--capabilities", e))?;
            if self.no_shell && name == SHELL_CAPABILITY {
                return Err(bad("--capabilities", "`shell` is declared together with --no-shell"));
            }
            capabilities.push(cap);
        }
        let runners = self
            .runners
            .iter()
            .map(|r| r.parse::<RunnerSpec>().map_err(|e| bad("--runner", format!("{r:?}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(name) = &self.name
            && name.trim().is_empty()
        {
            return Err(bad("--name", "must not be empty"));
        }
        let tags = self.tags.into_iter().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).collect();
        let metrics = crate::metrics::parse_assignments(self.metrics.iter().map(String::as_str))
            .map_err(|e| bad("--metric", e))?;
        let step_env: Vec<String> =
            self.step_env.iter().map(|n| n.trim().to_owned()).filter(|n| !n.is_empty()).collect();
        for name in &step_env {
            crate::executor::process::check_pass_name(name).map_err(|e| bad("--step-env", e))?;
        }
        let state_dir = self.state_dir.unwrap_or_else(|| default_state_dir(&tenant));
        let config = RobotConfig {
            nats_url: self.nats_url,
            key,
            nats_tls: self.nats_tls.into(),
            tenant,
            id,
            name: self.name,
            capabilities,
            max_jobs: self.max_jobs,
            no_shell: self.no_shell,
            runners,
            state_dir,
            work_dir: self.work_dir,
            shutdown_grace: self.shutdown_grace,
            environment: self.environment,
            tags,
            hostname: self.hostname,
            metrics,
            step_env,
        };
        config.capabilities().map_err(|e| bad("--capabilities", e))?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn parse(args: &[&str]) -> Result<RobotConfig, String> {
        let mut argv = vec!["fleet-robot"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map_err(|e| e.to_string())?.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn full_command_line() {
        let c = parse(&[
            "--tenant",
            "acme",
            "--id",
            "r7",
            "--capabilities",
            "browser, desktop",
            "--max-jobs",
            "3",
            "--runner",
            "casare=python3 run.py {workflow} {variables}",
            "--shutdown-grace",
            "2m",
            "--tags",
            "a,b",
            "--state-dir",
            "/tmp/x",
            "--metric",
            "licences=3",
            "--metric",
            "queue_depth=1.5,licences=4",
        ])
        .unwrap();
        assert_eq!(c.metrics, BTreeMap::from([("licences".into(), 4.0), ("queue_depth".into(), 1.5)]));
        assert_eq!(c.tenant.as_str(), "acme");
        assert_eq!(c.id.as_ref().map(|i| i.as_str()), Some("r7"));
        assert_eq!(c.max_jobs, 3);
        assert_eq!(c.shutdown_grace, Duration::from_secs(120));
        assert_eq!(c.tags, ["a", "b"]);
        assert_eq!(c.capabilities().unwrap().name(), "browser+casare+desktop+shell");
        assert_eq!(c.state_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn defaults() {
        let c = parse(&["--tenant", "acme"]).unwrap();
        assert_eq!(c.max_jobs, 1);
        assert_eq!(c.shutdown_grace, Duration::from_secs(60));
        assert!(c.state_dir.ends_with("fleet-robot/acme"), "{}", c.state_dir.display());
        assert_eq!(c.capabilities().unwrap().name(), "shell");
    }

    #[test]
    fn errors_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--tenant", "Acme"], "--tenant"),
            (&["--tenant", "a_b"], "--tenant"),
            (&["--id", "R 7"], "--id"),
            (&["--capabilities", "browser,GPU"], "--capabilities"),
            (&["--no-shell", "--capabilities", "shell"], "--capabilities"),
            (&["--runner", "canvas=run"], "--runner"),
            (&["--runner", "casare"], "--runner"),
            (&["--max-jobs", "0"], "--max-jobs"),
            (&["--max-jobs", "many"], "--max-jobs"),
            (&["--shutdown-grace", "soon"], "--shutdown-grace"),
            (&["--name", " "], "--name"),
            (&["--metric", "rows"], "--metric"),
            (&["--metric", "Rows=1"], "--metric"),
            (&["--metric", "rows=many"], "--metric"),
            (&["--metric", "rows=NaN"], "--metric"),
            (&["--metric", "free_slots=3"], "--metric"),
            (&["--metric", &(0..33).map(|i| format!("m{i}=1")).collect::<Vec<_>>().join(",")], "--metric"),
        ];
        for (args, flag) in cases {
            let err = parse(args).expect_err(&format!("{args:?} should fail"));
            assert!(err.contains(flag), "{args:?}: {err}");
        }
    }

    #[test]
    fn help_lists_builtin_capabilities() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        for cap in BUILTIN_CAPABILITIES {
            assert!(help.contains(cap), "{cap} missing from --help");
        }
        assert!(help.contains("FLEET_ROBOT_TENANT"));
    }
}
