//! The figures of one run: a table for people, the same as JSON for tools.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::procfs::Machine;

/// Latencies of one kind, recorded in microseconds. Cheap to clone and share between tasks.
#[derive(Clone)]
pub struct Recorder {
    histogram: Arc<Mutex<Histogram<u64>>>,
}

impl Default for Recorder {
    fn default() -> Self {
        // 3 significant digits, auto-resizing: exact enough for p99.9 and max.
        Self { histogram: Arc::new(Mutex::new(Histogram::new(3).expect("3 significant digits is valid"))) }
    }
}

impl Recorder {
    pub fn record(&self, d: Duration) {
        self.record_us(d.as_micros().min(u64::MAX as u128) as u64);
    }

    pub fn record_us(&self, us: u64) {
        let _ = self.histogram.lock().expect("not poisoned").record(us.max(1));
    }

    /// Record a signed difference in microseconds; negative ones (clock noise) count as 1 µs.
    pub fn record_signed_us(&self, us: i64) {
        self.record_us(us.max(1) as u64);
    }

    pub fn count(&self) -> u64 {
        self.histogram.lock().expect("not poisoned").len()
    }

    pub fn summary(&self, name: &str) -> Latency {
        let h = self.histogram.lock().expect("not poisoned");
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            name: name.to_owned(),
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
            anchor: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub name: String,
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// A published figure to compare with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anchor: Option<String>,
}

impl Latency {
    pub fn with_anchor(mut self, anchor: &str) -> Self {
        self.anchor = Some(anchor.to_owned());
        self
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    pub name: String,
    pub count: u64,
    pub seconds: f64,
    pub per_second: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessUsage {
    pub name: String,
    pub cpu_s: f64,
    /// Average cores busy over the window.
    pub cores: f64,
    pub cpu_s_per_1000: f64,
    pub cpu_us_per_unit: f64,
    pub peak_rss_mib: Option<f64>,
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cost {
    pub name: String,
    pub total: f64,
    pub per_unit: f64,
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// Whether the run did what it should: every job completed, none twice.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Correctness {
    pub ok: bool,
    pub expected: u64,
    pub completed: u64,
    pub completed_twice: u64,
    pub problems: Vec<String>,
}

impl Correctness {
    pub fn fail(&mut self, problem: impl Into<String>) {
        self.ok = false;
        self.problems.push(problem.into());
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub machine: Machine,
    pub params: serde_json::Value,
    /// What the per-unit figures are per ("job", "heartbeat", "message").
    pub unit: String,
    pub units: u64,
    /// Length of the measured window (seconds).
    pub window_s: f64,
    pub rates: Vec<Rate>,
    pub latencies: Vec<Latency>,
    pub figures: Vec<Figure>,
    pub processes: Vec<ProcessUsage>,
    pub cost: Vec<Cost>,
    pub correctness: Correctness,
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(scenario: &str, params: &impl Serialize) -> Self {
        Self {
            scenario: scenario.to_owned(),
            machine: crate::procfs::machine(),
            params: serde_json::to_value(params).unwrap_or_default(),
            unit: "job".into(),
            units: 0,
            window_s: 0.0,
            rates: Vec::new(),
            latencies: Vec::new(),
            figures: Vec::new(),
            processes: Vec::new(),
            cost: Vec::new(),
            correctness: Correctness { ok: true, ..Default::default() },
            notes: Vec::new(),
        }
    }

    pub fn rate(&mut self, name: &str, count: u64, elapsed: Duration) -> f64 {
        let seconds = elapsed.as_secs_f64();
        let per_second = if seconds > 0.0 { count as f64 / seconds } else { 0.0 };
        self.rates.push(Rate { name: name.to_owned(), count, seconds, per_second });
        per_second
    }

    pub fn figure(&mut self, name: &str, value: f64, unit: &str, note: &str) {
        self.figures.push(Figure {
            name: name.to_owned(),
            value,
            unit: unit.to_owned(),
            note: note.to_owned(),
        });
    }

    /// Take the checked correctness, keeping what went wrong earlier in the run.
    pub fn set_correctness(&mut self, mut checked: Correctness) {
        checked.ok &= self.correctness.ok;
        checked.problems.append(&mut self.correctness.problems);
        self.correctness = checked;
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// The human table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "\n=== {} === ({} cores, {}, {} MiB RAM)",
            self.scenario, m.nproc, m.cpu_model, m.mem_total_mib
        );
        let _ = writeln!(out, "params: {}", self.params);
        if !self.rates.is_empty() {
            let _ =
                writeln!(out, "\n{:<58} {:>10} {:>9} {:>12}", "throughput", "count", "seconds", "per second");
            for r in &self.rates {
                let _ =
                    writeln!(out, "{:<58} {:>10} {:>9.2} {:>12.1}", r.name, r.count, r.seconds, r.per_second);
            }
        }
        if !self.latencies.is_empty() {
            let _ = writeln!(
                out,
                "\n{:<46} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8}  anchor",
                "latency (ms)", "n", "p50", "p90", "p99", "p99.9", "max"
            );
            for l in &self.latencies {
                let _ = writeln!(
                    out,
                    "{:<46} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  {}",
                    l.name,
                    l.count,
                    l.p50_ms,
                    l.p90_ms,
                    l.p99_ms,
                    l.p999_ms,
                    l.max_ms,
                    l.anchor.as_deref().unwrap_or("")
                );
            }
        }
        if !self.figures.is_empty() {
            let _ = writeln!(out, "\n{:<58} {:>12} {:<8} note", "figure", "value", "unit");
            for f in &self.figures {
                let _ = writeln!(out, "{:<58} {:>12.3} {:<8} {}", f.name, f.value, f.unit, f.note);
            }
        }
        if !self.processes.is_empty() {
            let _ = writeln!(
                out,
                "\n{:<46} {:>8} {:>6} {:>10} {:>11} {:>9}",
                "process (window)",
                "cpu s",
                "cores",
                format!("s/1k {}", short(&self.unit)),
                format!("µs/{}", short(&self.unit)),
                "peak MiB"
            );
            for p in &self.processes {
                let rss = p.peak_rss_mib.map(|r| format!("{r:.1}")).unwrap_or_else(|| "-".into());
                let _ = writeln!(
                    out,
                    "{:<46} {:>8.2} {:>6.2} {:>10.3} {:>11.1} {:>9}",
                    p.name, p.cpu_s, p.cores, p.cpu_s_per_1000, p.cpu_us_per_unit, rss
                );
            }
        }
        if !self.cost.is_empty() {
            let _ = writeln!(
                out,
                "\n{:<58} {:>12} {:>10}",
                format!("cost ({} {}s)", self.units, self.unit),
                "total",
                format!("per {}", short(&self.unit))
            );
            for c in &self.cost {
                let _ = writeln!(out, "{:<58} {:>12.0} {:>10.2}", c.name, c.total, c.per_unit);
            }
        }
        let c = &self.correctness;
        let _ = writeln!(
            out,
            "\ncorrectness: {} (expected {}, completed {}, completed twice {})",
            if c.ok { "OK" } else { "FAILED" },
            c.expected,
            c.completed,
            c.completed_twice
        );
        for p in &c.problems {
            let _ = writeln!(out, "  problem: {p}");
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }
}

fn short(unit: &str) -> &str {
    match unit {
        "heartbeat" => "hb",
        "message" => "msg",
        other => other,
    }
}
