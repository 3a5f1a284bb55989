//! Custom metrics: a small robot-wide map of name to number that rides in every heartbeat.
//!
//! Two sources fill it: the robot's config (`--metric NAME=VALUE`, validated at start, so a typo
//! stops the robot with an error naming the flag), and external runners, whose stdout line
//! `FLEET_METRIC <name> <number>` sets a metric while a job runs. Metrics belong to the robot,
//! not to a job: the last value written wins and it stays after the job ends, so a runner can
//! report things like a licence count or a queue length of the application it drives.
//!
//! The map is bounded ([`MAX_METRICS`] names): a heartbeat is a KV value the orchestrator decodes
//! on every beat, and a runner printing a new name per line must not grow it without end. A new
//! name past the limit is ignored with one warning; known names keep updating. `free_slots` is
//! reserved: the robot computes it itself for every beat.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Most custom metric names a robot keeps (config and runners together).
pub const MAX_METRICS: usize = 32;
/// Longest metric name.
pub const MAX_NAME: usize = 32;
/// Names the robot fills in itself.
pub const RESERVED: &[&str] = &["free_slots"];
/// Prefix of a runner's stdout line that sets a metric.
pub const RUNNER_PREFIX: &str = "FLEET_METRIC ";

/// Why a metric was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricError {
    #[error("expected NAME=VALUE, e.g. queue_depth=12")]
    MissingEquals,
    #[error("metric name {0:?} must be 1 to {MAX_NAME} characters of a-z, 0-9 and _")]
    BadName(String),
    #[error("metric name {0:?} is reserved (the robot reports it itself)")]
    Reserved(String),
    #[error("value {value:?} of metric {name:?} is not a finite number")]
    BadValue { name: String, value: String },
    #[error("more than {MAX_METRICS} metric names")]
    TooMany,
    #[error("expected `FLEET_METRIC <name> <number>`")]
    BadLine,
}

/// Check a metric name: `[a-z0-9_]{1,32}`, not reserved.
pub fn check_name(name: &str) -> Result<(), MetricError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        return Err(MetricError::BadName(name.to_owned()));
    }
    if RESERVED.contains(&name) {
        return Err(MetricError::Reserved(name.to_owned()));
    }
    Ok(())
}

fn parse_value(name: &str, value: &str) -> Result<f64, MetricError> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| MetricError::BadValue { name: name.to_owned(), value: value.to_owned() })
}

/// `NAME=VALUE` (a `--metric` value).
pub fn parse_assignment(s: &str) -> Result<(String, f64), MetricError> {
    let (name, value) = s.split_once('=').ok_or(MetricError::MissingEquals)?;
    let name = name.trim();
    check_name(name)?;
    Ok((name.to_owned(), parse_value(name, value)?))
}

/// Several `NAME=VALUE`s into one map (a later value of the same name wins), at most
/// [`MAX_METRICS`] names.
pub fn parse_assignments<'a>(
    values: impl IntoIterator<Item = &'a str>,
) -> Result<BTreeMap<String, f64>, MetricError> {
    let mut map = BTreeMap::new();
    for v in values.into_iter().map(str::trim).filter(|v| !v.is_empty()) {
        let (name, value) = parse_assignment(v)?;
        map.insert(name, value);
    }
    if map.len() > MAX_METRICS {
        return Err(MetricError::TooMany);
    }
    Ok(map)
}

/// A runner's stdout line `FLEET_METRIC <name> <number>`: `None` when the line is not a metric
/// line at all, `Some(Err)` when it is one but malformed.
pub fn parse_runner_line(line: &str) -> Option<Result<(String, f64), MetricError>> {
    let rest = line.strip_prefix(RUNNER_PREFIX)?.trim();
    let mut words = rest.split_whitespace();
    let (Some(name), Some(value), None) = (words.next(), words.next(), words.next()) else {
        return Some(Err(MetricError::BadLine));
    };
    Some(check_name(name).and_then(|()| Ok((name.to_owned(), parse_value(name, value)?))))
}

/// The robot's metrics, shared by the heartbeat and the running jobs.
#[derive(Debug, Default)]
pub struct Metrics {
    values: Mutex<BTreeMap<String, f64>>,
    /// A new name was refused for the limit: warn once, not on every line of a chatty runner.
    warned_full: AtomicBool,
}

impl Metrics {
    /// Start with the configured metrics (already validated).
    pub fn new(initial: BTreeMap<String, f64>) -> Self {
        Self { values: Mutex::new(initial), warned_full: AtomicBool::new(false) }
    }

    /// Set a metric; a new name past [`MAX_METRICS`] is refused (warned about once).
    pub fn set(&self, name: &str, value: f64) -> Result<(), MetricError> {
        check_name(name)?;
        if !value.is_finite() {
            return Err(MetricError::BadValue { name: name.to_owned(), value: value.to_string() });
        }
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        if !values.contains_key(name) && values.len() >= MAX_METRICS {
            drop(values);
            if !self.warned_full.swap(true, Ordering::Relaxed) {
                tracing::warn!(name, limit = MAX_METRICS, "too many metric names; ignoring new ones");
            }
            return Err(MetricError::TooMany);
        }
        values.insert(name.to_owned(), value);
        Ok(())
    }

    /// The metrics as they are now.
    pub fn snapshot(&self) -> BTreeMap<String, f64> {
        self.values.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments() {
        assert_eq!(parse_assignment("queue_depth=12"), Ok(("queue_depth".into(), 12.0)));
        assert_eq!(parse_assignment(" licences = 2.5 "), Ok(("licences".into(), 2.5)));
        assert_eq!(parse_assignment("x"), Err(MetricError::MissingEquals));
        assert!(matches!(parse_assignment("Bad=1"), Err(MetricError::BadName(_))));
        assert!(matches!(parse_assignment("a-b=1"), Err(MetricError::BadName(_))));
        assert!(matches!(parse_assignment("=1"), Err(MetricError::BadName(_))));
        assert!(matches!(parse_assignment(&format!("{}=1", "a".repeat(33))), Err(MetricError::BadName(_))));
        assert!(matches!(parse_assignment("free_slots=1"), Err(MetricError::Reserved(_))));
        for bad in ["a=", "a=x", "a=NaN", "a=inf", "a=-inf", "a=1e999"] {
            assert!(matches!(parse_assignment(bad), Err(MetricError::BadValue { .. })), "{bad}");
        }
        let many: Vec<String> = (0..33).map(|i| format!("m{i}=1")).collect();
        assert_eq!(parse_assignments(many.iter().map(String::as_str)), Err(MetricError::TooMany));
        let map = parse_assignments(["a=1", "b=2", "a=3", ""]).unwrap();
        assert_eq!(map, BTreeMap::from([("a".into(), 3.0), ("b".into(), 2.0)]));
    }

    #[test]
    fn runner_lines() {
        assert_eq!(parse_runner_line("FLEET_METRIC rows 42"), Some(Ok(("rows".into(), 42.0))));
        assert_eq!(parse_runner_line("FLEET_METRIC rows -1.5 "), Some(Ok(("rows".into(), -1.5))));
        assert_eq!(parse_runner_line("hello"), None);
        assert_eq!(parse_runner_line("FLEET_PROGRESS 4"), None);
        for bad in ["FLEET_METRIC rows", "FLEET_METRIC rows x", "FLEET_METRIC Rows 1", "FLEET_METRIC a 1 2"] {
            assert!(matches!(parse_runner_line(bad), Some(Err(_))), "{bad}");
        }
    }

    #[test]
    fn bounded_and_last_value_wins() {
        let m = Metrics::new(BTreeMap::from([("configured".into(), 1.0)]));
        m.set("configured", 2.0).unwrap();
        for i in 1..MAX_METRICS {
            m.set(&format!("m{i}"), i as f64).unwrap();
        }
        assert_eq!(m.set("one_too_many", 1.0), Err(MetricError::TooMany));
        m.set("m1", 100.0).unwrap();
        let snap = m.snapshot();
        assert_eq!(snap.len(), MAX_METRICS);
        assert_eq!((snap["configured"], snap["m1"]), (2.0, 100.0));
        assert!(!snap.contains_key("one_too_many"));
        assert!(m.set("free_slots", 1.0).is_err());
    }
}
