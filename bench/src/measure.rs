//! What a measured window cost: CPU and memory of every process and part, PostgreSQL commits and
//! tuples, WAL, JetStream API calls and stream messages, and (with `--tap`) every NATS message
//! by kind.
//!
//! [`Meter::start`] snapshots the counters and starts a sampler for the peak memory of
//! nats-server and PostgreSQL; [`Meter::finish`] snapshots again and turns the differences into
//! report rows, per unit of work (a job, or a heartbeat).
//!
//! NATS message counts: nats-server's monitoring port (`-m`) would give them directly, but the
//! testkit's `NatsServer` starts the server with fixed flags and no monitoring port, so the bench
//! uses what the client side can see instead: JetStream account info (API calls), stream states
//! (offers, events, heartbeats written) and, with `--tap`, a wiretap subscription on `>` that
//! counts every message the server routes, by kind (a JetStream delivery keeps the subject it
//! was published on, so an offer counts twice under `fleet.jobs`: published and delivered). The
//! tap costs a delivery per message, so it
//! is off by default and its runs are not used for the timing figures.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::procfs;
use crate::report::{Cost, ProcessUsage, Report};
use crate::stack::BenchDb;

/// How often the memory sampler looks at nats-server and PostgreSQL.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// PostgreSQL backends publish their statistics at most once a second (PGSTAT_MIN_INTERVAL);
/// the end snapshot waits this long after the work so that it sees all of it.
pub const PG_STATS_FLUSH: Duration = Duration::from_millis(1500);

#[derive(Debug, Clone, Default)]
struct PgDb {
    xact_commit: i64,
    xact_rollback: i64,
    tup_inserted: i64,
    tup_updated: i64,
    tup_deleted: i64,
    tup_fetched: i64,
}

#[derive(Debug, Clone, Default)]
struct PgWal {
    records: i64,
    bytes: i64,
    write: i64,
    sync: i64,
}

#[derive(Debug, Clone, Default)]
struct JsCounters {
    api_total: u64,
    api_errors: u64,
    /// Last sequence of each stream (messages ever written).
    streams: BTreeMap<String, u64>,
}

struct Snapshot {
    at: Instant,
    parts: HashMap<&'static str, u64>,
    process: u64,
    nats: u64,
    pg: HashMap<u32, u64>,
    pg_db: Option<PgDb>,
    pg_wal: Option<PgWal>,
    js: Option<JsCounters>,
    /// Rows read per index and per table scan (where the database's reads go).
    reads: BTreeMap<String, i64>,
    bench_statements: u64,
}

/// Where the processes are.
#[derive(Clone)]
pub struct Targets {
    pub nats_pid: Option<u32>,
    pub db: Option<BenchDb>,
    pub js: Option<jetstream::Context>,
}

/// Peaks seen by the sampler.
#[derive(Debug, Default, Clone)]
struct Peaks {
    nats_kib: u64,
    pg_kib: u64,
    /// CPU ticks of PostgreSQL processes seen during the window (first and last sample).
    pg_first: HashMap<u32, u64>,
    pg_last: HashMap<u32, u64>,
}

pub struct Meter {
    targets: Targets,
    start: Snapshot,
    peaks: Arc<Mutex<Peaks>>,
    stop: CancellationToken,
    sampler: tokio::task::JoinHandle<()>,
    tap: Option<Tap>,
}

async fn pg_pids(db: &BenchDb) -> Vec<u32> {
    // The test database's backends, plus the cluster's background writers (shared with any other
    // database on the server: their CPU is the cluster's, noted in the report).
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity
         WHERE datname = current_database()
            OR (datname IS NULL AND backend_type IN ('walwriter', 'checkpointer', 'background writer'))",
    )
    .fetch_all(db.counted())
    .await
    .unwrap_or_default();
    pids.into_iter().map(|p| p as u32).collect()
}

async fn pg_db(db: &BenchDb) -> Option<PgDb> {
    let row: (i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, tup_fetched
         FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(db.counted())
    .await
    .ok()?;
    Some(PgDb {
        xact_commit: row.0,
        xact_rollback: row.1,
        tup_inserted: row.2,
        tup_updated: row.3,
        tup_deleted: row.4,
        tup_fetched: row.5,
    })
}

async fn pg_wal(db: &BenchDb) -> Option<PgWal> {
    let row: (i64, i64, i64, i64) =
        sqlx::query_as("SELECT wal_records, wal_bytes::bigint, wal_write, wal_sync FROM pg_stat_wal")
            .fetch_one(db.counted())
            .await
            .ok()?;
    Some(PgWal { records: row.0, bytes: row.1, write: row.2, sync: row.3 })
}

async fn pg_reads(db: &BenchDb) -> BTreeMap<String, i64> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT 'index ' || indexrelname, idx_tup_read FROM pg_stat_user_indexes
         UNION ALL
         SELECT 'seq scan ' || relname, coalesce(seq_tup_read, 0) FROM pg_stat_user_tables",
    )
    .fetch_all(db.counted())
    .await
    .unwrap_or_default();
    rows.into_iter().collect()
}

async fn js_counters(js: &jetstream::Context) -> Option<JsCounters> {
    let account = js.query_account().await.ok()?;
    let mut streams = BTreeMap::new();
    let mut names = js.stream_names();
    while let Some(Ok(name)) = names.next().await {
        if let Ok(mut stream) = js.get_stream(&name).await
            && let Ok(info) = stream.info().await
        {
            streams.insert(name, info.state.last_sequence);
        }
    }
    Some(JsCounters { api_total: account.requests.total, api_errors: account.requests.errors, streams })
}

async fn snapshot(targets: &Targets) -> Snapshot {
    let (mut pg, mut pg_db_stats, mut wal, mut reads) = (HashMap::new(), None, None, BTreeMap::new());
    if let Some(db) = &targets.db {
        for pid in pg_pids(db).await {
            if let Some(t) = procfs::process_ticks(pid) {
                pg.insert(pid, t);
            }
        }
        pg_db_stats = pg_db(db).await;
        wal = pg_wal(db).await;
        reads = pg_reads(db).await;
    }
    let js = match &targets.js {
        Some(js) => js_counters(js).await,
        None => None,
    };
    Snapshot {
        at: Instant::now(),
        parts: procfs::ticks_by_part(),
        process: procfs::process_ticks(std::process::id()).unwrap_or(0),
        nats: targets.nats_pid.and_then(procfs::process_ticks).unwrap_or(0),
        pg,
        pg_db: pg_db_stats,
        pg_wal: wal,
        js,
        reads,
        bench_statements: targets.db.as_ref().map(BenchDb::statements).unwrap_or(0),
    }
}

fn secs(ticks: u64) -> f64 {
    ticks as f64 / procfs::TICKS_PER_SECOND
}

impl Meter {
    /// Snapshot now and sample memory until [`Meter::finish`]. With `tap`, count every NATS
    /// message by kind through `tap_client`.
    pub async fn start(targets: Targets, tap_client: Option<async_nats::Client>) -> anyhow::Result<Meter> {
        let tap = match tap_client {
            Some(client) => Some(Tap::start(client).await?),
            None => None,
        };
        let start = snapshot(&targets).await;
        let peaks = Arc::new(Mutex::new(Peaks { pg_first: start.pg.clone(), ..Default::default() }));
        let stop = CancellationToken::new();
        let sampler = tokio::spawn(sample(targets.clone(), peaks.clone(), stop.clone()));
        Ok(Meter { targets, start, peaks, stop, sampler, tap })
    }

    /// Snapshot again and add the window's cost to `report`, per `units` of work (`unit` names
    /// it: "job", "heartbeat").
    pub async fn finish(self, report: &mut Report, unit: &str, units: u64) {
        if self.targets.db.is_some() {
            tokio::time::sleep(PG_STATS_FLUSH).await;
        }
        let end = snapshot(&self.targets).await;
        self.stop.cancel();
        let _ = self.sampler.await;
        let peaks = self.peaks.lock().expect("not poisoned").clone();
        let elapsed = end.at.duration_since(self.start.at).as_secs_f64();
        let per = |x: f64| if units > 0 { x / units as f64 } else { 0.0 };
        report.unit = unit.to_owned();
        report.units = units;
        report.window_s = elapsed;

        let usage = |name: &str, ticks: u64, rss_kib: Option<u64>, note: &str| {
            let cpu = secs(ticks);
            ProcessUsage {
                name: name.to_owned(),
                cpu_s: cpu,
                cores: if elapsed > 0.0 { cpu / elapsed } else { 0.0 },
                cpu_s_per_1000: per(cpu) * 1000.0,
                cpu_us_per_unit: per(cpu) * 1e6,
                peak_rss_mib: rss_kib.map(|k| k as f64 / 1024.0),
                note: note.to_owned(),
            }
        };
        let process = end.process.saturating_sub(self.start.process);
        let bench_rss = procfs::status_kib(std::process::id(), "VmHWM");
        report.processes.push(usage(
            "fleet-bench process (all Fleet parts + load)",
            process,
            bench_rss,
            "one process: orchestrator, gateway, robots and load generator; peak RSS is the whole process",
        ));
        let mut named = 0;
        for (_, part) in procfs::PARTS {
            let ticks = end
                .parts
                .get(part)
                .copied()
                .unwrap_or(0)
                .saturating_sub(self.start.parts.get(part).copied().unwrap_or(0));
            named += ticks;
            report.processes.push(usage(&format!("  {part}"), ticks, None, "threads of its runtime"));
        }
        report.processes.push(usage(
            "  other threads",
            process.saturating_sub(named),
            None,
            "main/test thread, exited blocking threads, sampler",
        ));
        if self.targets.nats_pid.is_some() {
            report.processes.push(usage(
                "nats-server",
                end.nats.saturating_sub(self.start.nats),
                Some(
                    peaks
                        .nats_kib
                        .max(self.targets.nats_pid.and_then(|p| procfs::status_kib(p, "VmHWM")).unwrap_or(0)),
                ),
                "separate process; peak RSS = VmHWM",
            ));
        }
        if self.targets.db.is_some() {
            let mut pg_ticks = 0;
            let mut last = peaks.pg_last.clone();
            for (pid, t) in &end.pg {
                last.insert(*pid, *t);
            }
            for (pid, t) in &last {
                pg_ticks += t.saturating_sub(peaks.pg_first.get(pid).copied().unwrap_or(0));
            }
            report.processes.push(usage(
                "postgresql",
                pg_ticks,
                Some(peaks.pg_kib),
                "test database's backends + walwriter/checkpointer/bgwriter (those are cluster-wide); \
                 peak RSS = max of sum(RssAnon) + max(RssShmem)",
            ));
        }

        // PostgreSQL: every statement Fleet runs is its own autocommit transaction (the store
        // puts each transition in one statement), so commits are statements.
        if let (Some(a), Some(b)) = (&self.start.pg_db, &end.pg_db) {
            let bench = end.bench_statements.saturating_sub(self.start.bench_statements) as i64;
            let commits = (b.xact_commit - a.xact_commit - bench).max(0);
            let mut cost = |name: &str, total: i64, note: &str| {
                report.cost.push(Cost {
                    name: name.to_owned(),
                    total: total as f64,
                    per_unit: per(total as f64),
                    note: note.to_owned(),
                })
            };
            cost(
                "pg commits (= statements)",
                commits,
                "pg_stat_database.xact_commit of the test db, less the bench's own statements; \
                 pg_stat_statements is not preloaded on this server",
            );
            cost("pg rollbacks", b.xact_rollback - a.xact_rollback, "");
            cost("pg rows inserted", b.tup_inserted - a.tup_inserted, "");
            cost("pg rows updated", b.tup_updated - a.tup_updated, "");
            cost("pg rows deleted", b.tup_deleted - a.tup_deleted, "");
            cost("pg rows fetched", b.tup_fetched - a.tup_fetched, "includes the bench's polls");
        }
        // The three biggest readers: which index or table scan the rows fetched come from.
        let mut reads: Vec<(String, i64)> = end
            .reads
            .iter()
            .map(|(k, v)| (k.clone(), v - self.start.reads.get(k).copied().unwrap_or(0)))
            .filter(|(_, n)| *n > 0)
            .collect();
        reads.sort_by_key(|(_, n)| -n);
        for (name, n) in reads.into_iter().take(3) {
            report.cost.push(Cost {
                name: format!("  pg rows read: {name}"),
                total: n as f64,
                per_unit: per(n as f64),
                note: "pg_stat_user_indexes.idx_tup_read / pg_stat_user_tables.seq_tup_read".into(),
            });
        }
        if let (Some(a), Some(b)) = (&self.start.pg_wal, &end.pg_wal) {
            let mut cost = |name: &str, total: i64, note: &str| {
                report.cost.push(Cost {
                    name: name.to_owned(),
                    total: total as f64,
                    per_unit: per(total as f64),
                    note: note.to_owned(),
                })
            };
            let note = "pg_stat_wal: whole cluster";
            cost("pg WAL records", b.records - a.records, note);
            cost("pg WAL bytes", b.bytes - a.bytes, note);
            cost("pg WAL writes", b.write - a.write, note);
            cost("pg WAL fsyncs", b.sync - a.sync, note);
        }
        if let (Some(a), Some(b)) = (&self.start.js, &end.js) {
            report.cost.push(Cost {
                name: "JetStream API calls".into(),
                total: (b.api_total - a.api_total) as f64,
                per_unit: per((b.api_total - a.api_total) as f64),
                note: "account info api.total: consumer/stream calls, not pulls, acks or publishes".into(),
            });
            if b.api_errors > a.api_errors {
                report.cost.push(Cost {
                    name: "JetStream API errors".into(),
                    total: (b.api_errors - a.api_errors) as f64,
                    per_unit: per((b.api_errors - a.api_errors) as f64),
                    note: String::new(),
                });
            }
            for (stream, last) in &b.streams {
                let before = a.streams.get(stream).copied().unwrap_or(0);
                let n = last.saturating_sub(before) as f64;
                report.cost.push(Cost {
                    name: format!("messages stored in {stream}"),
                    total: n,
                    per_unit: per(n),
                    note: "stream last_seq delta".into(),
                });
            }
        }
        if let Some(tap) = self.tap {
            let counts = tap.stop().await;
            let total: u64 = counts.values().sum();
            report.cost.push(Cost {
                name: "NATS messages routed (tap)".into(),
                total: total as f64,
                per_unit: per(total as f64),
                note: "every message on `>`, replies and JetStream deliveries included".into(),
            });
            for (kind, n) in counts {
                report.cost.push(Cost {
                    name: format!("  tap: {kind}"),
                    total: n as f64,
                    per_unit: per(n as f64),
                    note: String::new(),
                });
            }
        }
        for p in &mut report.processes {
            if p.cpu_s == 0.0 && p.name.starts_with("  ") && p.peak_rss_mib.is_none() {
                p.note.push_str(" (idle)");
            }
        }
    }
}

async fn sample(targets: Targets, peaks: Arc<Mutex<Peaks>>, stop: CancellationToken) {
    let mut pids: Vec<u32> = Vec::new();
    let mut rounds = 0u32;
    loop {
        // The set of backends hardly changes (pools keep their connections): refresh it now and
        // then rather than on every sample.
        if rounds.is_multiple_of(8)
            && let Some(db) = &targets.db
        {
            pids = pg_pids(db).await;
        }
        rounds += 1;
        let nats = targets.nats_pid.and_then(|p| procfs::status_kib(p, "VmRSS")).unwrap_or(0);
        let (mut anon, mut shmem) = (0, 0);
        let mut ticks = Vec::new();
        for pid in &pids {
            anon += procfs::status_kib(*pid, "RssAnon").unwrap_or(0);
            shmem = shmem.max(procfs::status_kib(*pid, "RssShmem").unwrap_or(0));
            if let Some(t) = procfs::process_ticks(*pid) {
                ticks.push((*pid, t));
            }
        }
        {
            let mut p = peaks.lock().expect("not poisoned");
            p.nats_kib = p.nats_kib.max(nats);
            p.pg_kib = p.pg_kib.max(anon + shmem);
            for (pid, t) in ticks {
                // A backend first seen now started during the window: all its CPU counts.
                p.pg_first.entry(pid).or_insert(0);
                p.pg_last.insert(pid, t);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
    }
}

/// A wiretap on `>`: counts messages by kind.
struct Tap {
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// The kind of a message, from its subject.
pub fn kind(subject: &str) -> String {
    let parts: Vec<&str> = subject.split('.').collect();
    match parts.as_slice() {
        ["fleet", "api", area, verb, ..] => format!("fleet.api.{area}.{verb} (API request)"),
        ["fleet", "robot", _, _, verb] => format!("fleet.robot.*.*.{verb} (robot request)"),
        ["fleet", "jobs", ..] => "fleet.jobs.> (offer: publish + delivery to a robot)".into(),
        ["fleet", "events", ..] => "fleet.events.> (event publish)".into(),
        ["fleet", "live", ..] => "fleet.live.> (live event)".into(),
        ["fleet", "logs", ..] => "fleet.logs.> (job log line)".into(),
        ["$KV", ..] => "$KV.> (heartbeat: publish + delivery to the watch)".into(),
        ["$JS", "ACK", ..] => "$JS.ACK.> (offer ack)".into(),
        ["$JS", "API", "CONSUMER", "MSG", "NEXT", ..] => "$JS.API.CONSUMER.MSG.NEXT (pull)".into(),
        ["$JS", "API", rest @ ..] => {
            format!("$JS.API.{} (JetStream API)", rest.iter().take(2).copied().collect::<Vec<_>>().join("."))
        }
        ["$JS", "EVENT", ..] => "$JS.EVENT.> (advisory)".into(),
        ["$JS", ..] => "$JS.> (other JetStream)".into(),
        ["_INBOX", ..] => "_INBOX.> (replies, publish acks, ack acks, pull status)".into(),
        _ => "other".into(),
    }
}

impl Tap {
    async fn start(client: async_nats::Client) -> anyhow::Result<Tap> {
        let mut sub = client.subscribe(">").await?;
        // Make sure the server has the subscription before the window starts.
        client.flush().await?;
        let counts = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = CancellationToken::new();
        let (c, s) = (counts.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut local: HashMap<String, u64> = HashMap::new();
            loop {
                tokio::select! {
                    _ = s.cancelled() => break,
                    msg = sub.next() => match msg {
                        Some(m) => *local.entry(kind(m.subject.as_str())).or_default() += 1,
                        None => break,
                    },
                }
            }
            let mut counts = c.lock().expect("not poisoned");
            for (k, v) in local {
                *counts.entry(k).or_default() += v;
            }
        });
        Ok(Tap { counts, stop, task })
    }

    async fn stop(self) -> BTreeMap<String, u64> {
        self.stop.cancel();
        let _ = self.task.await;
        self.counts.lock().expect("not poisoned").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::kind;

    #[test]
    fn kinds() {
        assert_eq!(kind("fleet.robot.default.r1.claim"), "fleet.robot.*.*.claim (robot request)");
        assert_eq!(kind("fleet.api.jobs.submit"), "fleet.api.jobs.submit (API request)");
        assert_eq!(kind("$JS.API.CONSUMER.MSG.NEXT.FLEET_JOBS.x"), "$JS.API.CONSUMER.MSG.NEXT (pull)");
        assert_eq!(kind("$JS.API.STREAM.INFO.X"), "$JS.API.STREAM.INFO (JetStream API)");
        assert_eq!(kind("$KV.fleet_robots.default.r1"), "$KV.> (heartbeat: publish + delivery to the watch)");
    }
}
