//! Waiting for jobs to finish, and checking that every job completed exactly once.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;

use anyhow::bail;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::report::Correctness;
use crate::stack::BenchDb;

/// How often the bench looks at the completions it has seen.
const TICK: Duration = Duration::from_millis(50);
/// How often the database is asked as a backstop (an event the subscription missed). Rarely:
/// each ask looks up every job id, and the bench must not load the database it measures.
const DB_BACKSTOP: Duration = Duration::from_secs(5);

/// Job ids whose terminal event (`job.completed`, `job.failed`, …) arrived on a core
/// subscription to `fleet.events.*.job.>`. Watching events instead of polling the database
/// keeps the bench's own load off PostgreSQL while it measures; the database has the last word
/// (see [`wait_completed`]). Start it before the first submit.
pub struct Completions {
    seen: Arc<Mutex<HashSet<Uuid>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Completions {
    pub async fn watch(client: &async_nats::Client) -> anyhow::Result<Completions> {
        let mut sub = client.subscribe("fleet.events.*.job.>").await?;
        client.flush().await?;
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let terminal = ["completed", "failed", "cancelled", "timed_out"]
                    .iter()
                    .any(|k| msg.subject.as_str().ends_with(&format!(".job.{k}")));
                if !terminal {
                    continue;
                }
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&msg.payload) else { continue };
                if let Some(id) = v["job_id"].as_str().and_then(|i| i.parse().ok()) {
                    s.lock().expect("not poisoned").insert(id);
                }
            }
        });
        Ok(Completions { seen, task })
    }

    fn count(&self, ids: &[Uuid]) -> usize {
        let seen = self.seen.lock().expect("not poisoned");
        ids.iter().filter(|id| seen.contains(id)).count()
    }
}

impl Drop for Completions {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn finished_in_db(db: &BenchDb, ids: &[Uuid]) -> anyhow::Result<(usize, Option<OffsetDateTime>)> {
    let (done, last): (i64, Option<OffsetDateTime>) = sqlx::query_as(
        "SELECT count(*), max(completed_at) FROM jobs
         WHERE job_id = ANY($1) AND status IN ('completed', 'failed', 'cancelled', 'timed_out')",
    )
    .bind(ids)
    .fetch_one(db.counted())
    .await?;
    Ok((done as usize, last))
}

/// Wait until `ids` have all finished (completed, or failed for good). Fails when nothing moves
/// for `stall` or `timeout` passes. Returns the time of the last completion as the database
/// recorded it (`max(completed_at)`).
pub async fn wait_completed(
    db: &BenchDb,
    completions: &Completions,
    ids: &[Uuid],
    timeout: Duration,
    stall: Duration,
) -> anyhow::Result<OffsetDateTime> {
    let start = Instant::now();
    let mut last_progress = Instant::now();
    let mut last_asked = Instant::now();
    let mut last_done = 0;
    loop {
        let mut done = completions.count(ids);
        if done >= ids.len() || last_asked.elapsed() >= DB_BACKSTOP {
            last_asked = Instant::now();
            let (in_db, last) = finished_in_db(db, ids).await?;
            if in_db >= ids.len() {
                return Ok(last.unwrap_or_else(OffsetDateTime::now_utc));
            }
            done = done.max(in_db);
        }
        if done != last_done {
            last_done = done;
            last_progress = Instant::now();
        }
        if last_progress.elapsed() > stall {
            bail!("no job finished for {stall:?}: {done} of {} finished", ids.len());
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?}: {done} of {} finished", ids.len());
        }
        tokio::time::sleep(TICK).await;
    }
}

/// Check that each of `ids` is `completed` and has exactly one `job.completed` history row, and
/// that the database holds no jobs the bench did not submit (`expect_only`).
pub async fn jobs_completed_once(
    db: &BenchDb,
    ids: &[Uuid],
    expect_only: bool,
) -> anyhow::Result<Correctness> {
    let mut c = Correctness { ok: true, expected: ids.len() as u64, ..Default::default() };
    let (completed, other, retried): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'completed'),
                count(*) FILTER (WHERE status <> 'completed'),
                count(*) FILTER (WHERE attempt > 1)
         FROM jobs WHERE job_id = ANY($1)",
    )
    .bind(ids)
    .fetch_one(db.counted())
    .await?;
    c.completed = completed as u64;
    if completed as usize != ids.len() {
        c.fail(format!("{completed} of {} jobs completed ({other} in another status)", ids.len()));
    }
    let (once, twice, none): (i64, i64, i64) = sqlx::query_as(
        "WITH h AS (
            SELECT job_id, count(*) AS n FROM job_history WHERE kind = 'job.completed' AND job_id = ANY($1)
            GROUP BY job_id
         )
         SELECT count(*) FILTER (WHERE n = 1), count(*) FILTER (WHERE n > 1),
                cardinality($1::uuid[]) - count(*)
         FROM h",
    )
    .bind(ids)
    .fetch_one(db.counted())
    .await?;
    c.completed_twice = twice as u64;
    if twice > 0 {
        c.fail(format!("{twice} jobs have more than one job.completed event"));
    }
    if none > 0 {
        c.fail(format!("{none} jobs have no job.completed event ({once} have one)"));
    }
    if retried > 0 {
        c.problems.push(format!("note: {retried} jobs needed more than one attempt"));
    }
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT x) FROM unnest($1::uuid[]) AS x")
        .bind(ids)
        .fetch_one(db.counted())
        .await?;
    if distinct as usize != ids.len() {
        c.fail(format!("the orchestrator returned {distinct} distinct ids for {} submits", ids.len()));
    }
    if expect_only {
        let all: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(db.counted()).await?;
        if all as usize != ids.len() {
            c.fail(format!("the database holds {all} jobs, the bench submitted {}", ids.len()));
        }
    }
    Ok(c)
}

/// Per job, from the database: created, claimed (started) and completed times, and when the
/// offer was made.
pub struct JobTimes {
    pub job_id: Uuid,
    pub created_at: OffsetDateTime,
    pub offered_at: Option<OffsetDateTime>,
    pub started_at: Option<OffsetDateTime>,
    pub completed_at: Option<OffsetDateTime>,
    pub requires: Vec<String>,
    pub robot_id: Option<String>,
}

pub async fn job_times(db: &BenchDb, ids: &[Uuid]) -> anyhow::Result<Vec<JobTimes>> {
    type Row = (
        Uuid,
        OffsetDateTime,
        Option<OffsetDateTime>,
        Option<OffsetDateTime>,
        Option<OffsetDateTime>,
        Vec<String>,
        Option<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT job_id, created_at, offered_at, started_at, completed_at, requires, robot_id
         FROM jobs WHERE job_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(db.counted())
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| JobTimes {
            job_id: r.0,
            created_at: r.1,
            offered_at: r.2,
            started_at: r.3,
            completed_at: r.4,
            requires: r.5,
            robot_id: r.6,
        })
        .collect())
}

/// Microseconds from `a` to `b`.
pub fn us_between(a: OffsetDateTime, b: OffsetDateTime) -> i64 {
    ((b - a).whole_microseconds()).clamp(i64::MIN as i128, i64::MAX as i128) as i64
}
