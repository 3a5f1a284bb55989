//! What a running job tells the world: log lines, progress, and its end.
//!
//! Every line, name and progress node is cut to the budgets of [`crate::bound`] first (a long
//! line is split, never dropped), so no message is refused for its size.
//!
//! Log lines go as JSON ([`LogLine`]) with core NATS publish to `fleet.logs.<tenant>.<job>`, where
//! the `FLEET_LOGS` stream captures them; JSON so that `nats sub 'fleet.logs.>'` is readable.
//! Progress is fire-and-forget, at most [`PROGRESS_EVERY`] apart per job, and the last value is
//! always sent before the job's end is reported (a watch channel keeps only the latest, so a
//! runner printing progress in a tight loop costs nothing).
//!
//! The end of a job (complete, reject after claim) is retried with backoff until the orchestrator
//! answers `Accepted` or `Refused`, also through NATS outages: the claim in PostgreSQL is the
//! truth and only an answer settles it. The only way out without an answer is the robot's own
//! "abandon" signal late in shutdown; the job's lease then expires and the sweeper re-offers it.

use std::time::Duration;

use fleet_schemas::robot::{LogLine, ProgressReport, ROBOT_PROTOCOL_VERSION};
use fleet_schemas::subjects::{self, RobotVerb};
use fleet_schemas::{JobId, RobotId, SessionId, TenantId};

use crate::bound::{self, Budgets};
use crate::executor::JobEvents;
use crate::rpc::Orchestrator;

/// Least time between two progress reports of one job (so at most ~4 per second).
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Who a job's lines and progress are from.
#[derive(Clone, Debug)]
pub struct JobAddress {
    pub tenant: TenantId,
    pub robot_id: RobotId,
    pub session_id: SessionId,
    pub job_id: JobId,
    pub attempt: i32,
}

/// Publish a job's log lines and progress until the executor drops its sink. Returns how many
/// lines were dropped on the way (the sink's buffer was full), for the job's record.
pub async fn forward(
    client: async_nats::Client,
    orch: Orchestrator,
    addr: JobAddress,
    budgets: Budgets,
    mut events: JobEvents,
) -> u64 {
    let subject = subjects::job_logs(&addr.tenant, &addr.job_id);
    let mut last_sent: Option<tokio::time::Instant> = None;
    let mut last_value = None;
    let mut pending = false;
    let mut progress_open = true;
    loop {
        let wait = match (pending, last_sent) {
            (true, Some(at)) => at + PROGRESS_EVERY,
            (true, None) => tokio::time::Instant::now(),
            (false, _) => tokio::time::Instant::now() + Duration::from_secs(3600),
        };
        tokio::select! {
            entry = events.logs.recv() => match entry {
                Some(entry) => {
                    let step = entry.step.map(|s| bound::bound_text(&s, budgets.name));
                    // A line too long for one message goes as several, in order.
                    for piece in bound::split_line(&entry.line, budgets.log_line) {
                        let line = LogLine {
                            job_id: addr.job_id,
                            attempt: addr.attempt,
                            robot_id: addr.robot_id.clone(),
                            stream: entry.stream.as_str().to_owned(),
                            step: step.clone(),
                            line: piece.to_owned(),
                            at: entry.at,
                        };
                        publish_line(&client, &subject, &line).await;
                    }
                }
                None => break,
            },
            changed = events.progress.changed(), if progress_open => {
                if changed.is_err() {
                    progress_open = false;
                } else {
                    pending = true;
                }
            }
            _ = tokio::time::sleep_until(wait), if pending => {
                last_value = send_progress(&orch, &addr, &budgets, &mut events).await;
                pending = false;
                last_sent = Some(tokio::time::Instant::now());
            }
        }
    }
    // The sink is gone: send the last progress if it was held back by the rate limit or not
    // seen yet. Compare values rather than asking `has_changed`, which reports an error (not
    // "changed") once the sender is dropped: the final 100 % would be lost when the executor
    // finishes right after setting it.
    let latest = events.progress.borrow().clone();
    if latest.is_some() && latest != last_value {
        send_progress(&orch, &addr, &budgets, &mut events).await;
    }
    let dropped = events.dropped();
    if dropped > 0 {
        tracing::warn!(dropped, "log lines were dropped because NATS could not keep up");
    }
    dropped
}

/// Send the latest progress; returns what was sent.
async fn send_progress(
    orch: &Orchestrator,
    addr: &JobAddress,
    budgets: &Budgets,
    events: &mut JobEvents,
) -> Option<crate::executor::Progress> {
    let latest = events.progress.borrow_and_update().clone();
    let p = latest.clone()?;
    let report = ProgressReport {
        v: ROBOT_PROTOCOL_VERSION,
        session_id: addr.session_id,
        job_id: addr.job_id,
        attempt: addr.attempt,
        progress: p.percent,
        current_node: p.node.map(|n| bound::bound_text(&n, budgets.name)),
    };
    orch.publish(RobotVerb::Progress, &report).await;
    latest
}

async fn publish_line(client: &async_nats::Client, subject: &str, line: &LogLine) {
    match serde_json::to_vec(line) {
        Ok(bytes) => {
            if let Err(e) = client.publish(subject.to_owned(), bytes.into()).await {
                tracing::debug!(error = %e, "could not publish a log line");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not encode a log line"),
    }
}

/// Put the full text of a truncated output into the job's log, as consecutive lines of stream
/// [`bound::OUTPUT_LOG_STREAM`] (concatenated, they are the output's JSON), and flush them so
/// they are in the log before the record that points there. Best effort, like every log line: a
/// NATS outage loses them, never the job.
pub async fn publish_output(client: &async_nats::Client, addr: &JobAddress, full: &str, budget: usize) {
    let subject = subjects::job_logs(&addr.tenant, &addr.job_id);
    let at = time::OffsetDateTime::now_utc();
    // JSON escaping can make a line's message larger than its text: leave room for it.
    for piece in bound::split_line(full, budget / 2) {
        let line = LogLine {
            job_id: addr.job_id,
            attempt: addr.attempt,
            robot_id: addr.robot_id.clone(),
            stream: bound::OUTPUT_LOG_STREAM.to_owned(),
            step: None,
            line: piece.to_owned(),
            at,
        };
        publish_line(client, &subject, &line).await;
    }
    if let Err(e) = client.flush().await {
        tracing::debug!(error = %e, "could not flush the output's log lines");
    }
}
