//! CPU time and memory of processes and threads, read from `/proc` (Linux only).
//!
//! Fleet's parts run inside the bench process, each on its own tokio runtime whose threads carry
//! the part's name (see [`crate::stack`]), so the CPU time of a part is the sum over the threads
//! of that name in `/proc/self/task`. Memory cannot be split that way: it is reported for the
//! process as a whole. nats-server and PostgreSQL are separate processes, read by pid.

use std::collections::HashMap;
use std::fs;

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ): 100 on every Linux this runs on, and
/// reading it with sysconf would need unsafe code, which the workspace forbids.
pub const TICKS_PER_SECOND: f64 = 100.0;

/// Thread name prefixes of the runtimes, and the part each stands for.
pub const PARTS: [(&str, &str); 4] = [
    ("fleet-orch", "orchestrator"),
    ("fleet-gw", "gateway"),
    ("fleet-robots", "robots"),
    ("bench-load", "load generator"),
];

/// utime + stime of a process or thread, in ticks, from its `stat` file.
pub fn stat_ticks(path: &str) -> Option<u64> {
    let stat = fs::read_to_string(path).ok()?;
    // The command name may hold spaces and parentheses; the fields after it start at the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The command name in a `stat` file.
fn stat_comm(path: &str) -> Option<String> {
    let stat = fs::read_to_string(path).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    Some(stat[open + 1..close].to_owned())
}

/// CPU ticks of a process (all its threads, including ones that exited).
pub fn process_ticks(pid: u32) -> Option<u64> {
    stat_ticks(&format!("/proc/{pid}/stat"))
}

/// A `kB` field of `/proc/<pid>/status` (`VmHWM`, `VmRSS`, `RssAnon`, `RssShmem`), in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU ticks of this process's threads, summed by part (thread-name prefix); threads of no
/// known part count as "other".
pub fn ticks_by_part() -> HashMap<&'static str, u64> {
    let mut out: HashMap<&'static str, u64> = HashMap::new();
    let Ok(tasks) = fs::read_dir("/proc/self/task") else { return out };
    for task in tasks.flatten() {
        let path = format!("{}/stat", task.path().display());
        let (Some(comm), Some(ticks)) = (stat_comm(&path), stat_ticks(&path)) else { continue };
        let part =
            PARTS.iter().find(|(prefix, _)| comm.starts_with(prefix)).map(|(_, p)| *p).unwrap_or("other");
        *out.entry(part).or_default() += ticks;
    }
    out
}

/// Machine facts for the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_mib: u64,
}

pub fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total_mib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .unwrap_or(0);
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    Machine { nproc, cpu_model, mem_total_mib }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        assert!(process_ticks(std::process::id()).is_some());
        assert!(status_kib(std::process::id(), "VmHWM").is_some_and(|k| k > 0));
        assert!(!ticks_by_part().is_empty());
        assert!(machine().nproc >= 1);
    }
}
