//! Commands and heartbeats: the robot obeys the desired state the (fake) orchestrator writes into
//! the `fleet_commands` bucket, shows it in its heartbeat, and reports custom metrics.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use common::*;
use fleet_robot::{Exit, RunnerSpec};
use fleet_schemas::robot::*;
use fleet_schemas::workflow::WorkflowFormat;
use fleet_schemas::{JobId, SessionId};

fn claim_of(s: Seen) -> Option<ClaimRequest> {
    if let Seen::Claim(c) = s { Some(c) } else { None }
}

fn complete_of(s: Seen) -> Option<CompleteRequest> {
    if let Seen::Complete(c) = s { Some(c) } else { None }
}

/// A robot whose claims are granted with `workflow`.
async fn start_running(workflow: serde_json::Value) -> Harness {
    start(RobotReply::Accepted(grant_for(JobId::new(), workflow))).await
}

/// A robot whose claims are granted with `workflow`, with a shutdown grace of `grace`.
async fn start_with_grace(workflow: serde_json::Value, grace: Duration) -> Harness {
    let mut fabric = prepare(RobotReply::Accepted(grant_for(JobId::new(), workflow))).await;
    fabric.config.shutdown_grace = grace;
    fabric.launch()
}

#[tokio::test]
async fn paused_robot_takes_nothing_until_resumed() {
    let mut h = start_running(json!({"steps": []})).await;
    h.registered().await;
    h.put_desired(&desired(1, RobotMode::Paused, None)).await;
    h.heartbeat_where("paused", |hb| hb.state == RobotRunState::Paused).await;

    let job_id = JobId::new();
    h.offer(job_id).await;
    let claim = h.next_within(QUIET, claim_of).await;
    assert!(claim.is_none(), "a paused robot claimed {claim:?}");
    assert_eq!(h.pending_offers().await, (1, 0), "the offer waits in the consumer, untouched");

    h.put_desired(&desired(2, RobotMode::Online, None)).await;
    let claim = h.next("claim after resume", claim_of).await;
    assert_eq!(claim.job_id, job_id);
    let done = h.next("complete", complete_of).await;
    assert_eq!(done.outcome, RunOutcome::Completed);
    h.heartbeat_where("online", |hb| hb.state == RobotRunState::Online).await;
    h.stop().await;
}

#[tokio::test]
async fn maintenance_shows_in_the_heartbeat_and_a_deleted_key_means_online() {
    let mut h = start_running(json!({"steps": []})).await;
    h.registered().await;
    h.put_desired(&desired(1, RobotMode::Maintenance, None)).await;
    h.heartbeat_where("maintenance", |hb| hb.state == RobotRunState::Maintenance).await;
    h.offer(JobId::new()).await;
    assert!(h.next_within(QUIET, claim_of).await.is_none(), "a robot in maintenance claimed");

    // The orchestrator forgetting the robot's desired state means: online, no stop.
    h.forget_desired().await;
    h.heartbeat_where("online", |hb| hb.state == RobotRunState::Online).await;
    h.next("claim after the key was deleted", claim_of).await;
    h.stop().await;
}

#[tokio::test]
async fn desired_state_written_before_start_is_obeyed_at_start() {
    let fabric = prepare(RobotReply::Accepted(grant_for(JobId::new(), json!({"steps": []})))).await;
    fabric.put_desired(&desired(4, RobotMode::Paused, None)).await;
    let job_id = JobId::new();
    // The offer is there before the robot: it would be the first thing it pulls.
    fabric.offer(job_id).await;
    let mut h = fabric.launch();
    h.registered().await;
    let claim = h.next_within(QUIET, claim_of).await;
    assert!(claim.is_none(), "a robot started paused claimed {claim:?}");
    let hb = h.heartbeat_where("paused", |_| true).await;
    assert_eq!(hb.state, RobotRunState::Paused, "the first heartbeat already says paused");

    h.put_desired(&desired(5, RobotMode::Online, None)).await;
    assert_eq!(h.next("claim after resume", claim_of).await.job_id, job_id);
    h.stop().await;
}

#[tokio::test]
async fn stop_order_drains_the_running_job_then_exits() {
    let mut h = start_with_grace(sleeping(1500), Duration::from_secs(60)).await;
    let session = h.registered().await.session_id;
    let job_id = JobId::new();
    h.offer(job_id).await;
    h.next("renew (the job runs)", |s| if let Seen::Renew(r) = s { Some(r) } else { None }).await;

    let stop = StopOrder { session_id: session, force: false, restart: false };
    h.put_desired(&desired(1, RobotMode::Online, Some(stop))).await;
    h.heartbeat_where("stopping", |hb| hb.state == RobotRunState::Stopping).await;
    // Nothing new is taken while draining.
    h.offer(JobId::new()).await;

    let mut releases = Vec::new();
    let mut claims = Vec::new();
    let done = h
        .next("complete of the drained job", |s| match s {
            Seen::Complete(c) => Some(c),
            Seen::Release(r) => {
                releases.push(r);
                None
            }
            Seen::Claim(c) => {
                claims.push(c);
                None
            }
            _ => None,
        })
        .await;
    assert_eq!((done.job_id, done.outcome), (job_id, RunOutcome::Completed), "{done:?}");
    assert!(releases.is_empty(), "a drained job finishes, it is not released: {releases:?}");
    assert_eq!(h.exited().await.unwrap(), Exit::Stopped);
    assert!(claims.is_empty(), "a draining robot claimed {claims:?}");
    assert!(h.next_within(Duration::ZERO, claim_of).await.is_none());
}

#[tokio::test]
async fn forced_stop_releases_the_running_job_at_once() {
    // A grace period far beyond the test's wait: only the force can release the job in time.
    let mut h = start_with_grace(sleeping(60_000), Duration::from_secs(600)).await;
    let session = h.registered().await.session_id;
    let job_id = JobId::new();
    h.offer(job_id).await;
    h.next("renew (the job runs)", |s| if let Seen::Renew(r) = s { Some(r) } else { None }).await;

    let stop = StopOrder { session_id: session, force: true, restart: false };
    h.put_desired(&desired(1, RobotMode::Online, Some(stop))).await;
    let release = h.next("release", |s| if let Seen::Release(r) = s { Some(r) } else { None }).await;
    assert_eq!((release.job_id, release.attempt), (job_id, 1));
    assert_eq!(h.exited().await.unwrap(), Exit::Stopped);
}

#[tokio::test]
async fn drain_made_forced_releases_at_once() {
    let mut h = start_with_grace(sleeping(60_000), Duration::from_secs(600)).await;
    let session = h.registered().await.session_id;
    h.offer(JobId::new()).await;
    h.next("renew (the job runs)", |s| if let Seen::Renew(r) = s { Some(r) } else { None }).await;

    let drain = StopOrder { session_id: session, force: false, restart: false };
    h.put_desired(&desired(1, RobotMode::Online, Some(drain.clone()))).await;
    h.heartbeat_where("stopping", |hb| hb.state == RobotRunState::Stopping).await;
    let force = StopOrder { force: true, ..drain };
    h.put_desired(&desired(2, RobotMode::Online, Some(force))).await;
    h.next("release", |s| if let Seen::Release(r) = s { Some(r) } else { None }).await;
    assert_eq!(h.exited().await.unwrap(), Exit::Stopped);
}

#[tokio::test]
async fn restart_order_ends_with_restart() {
    let mut h = start_running(json!({"steps": []})).await;
    let session = h.registered().await.session_id;
    let stop = StopOrder { session_id: session, force: false, restart: true };
    h.put_desired(&desired(1, RobotMode::Online, Some(stop))).await;
    assert_eq!(h.exited().await.unwrap(), Exit::Restart);
}

#[tokio::test]
async fn stop_order_for_another_session_is_ignored() {
    let mut h = start_running(json!({"steps": []})).await;
    let session = h.registered().await.session_id;
    let earlier = StopOrder { session_id: SessionId::new(), force: true, restart: false };
    assert_ne!(earlier.session_id, session);
    // Maintenance shows that the value was read, and that the robot did not start stopping.
    h.put_desired(&desired(1, RobotMode::Maintenance, Some(earlier.clone()))).await;
    h.heartbeat_where("maintenance", |hb| hb.state == RobotRunState::Maintenance).await;
    h.put_desired(&desired(2, RobotMode::Online, Some(earlier))).await;
    let job_id = JobId::new();
    h.offer(job_id).await;
    assert_eq!(h.next("claim", claim_of).await.job_id, job_id);
    h.next("complete", complete_of).await;
    assert!(!h.robot.is_finished(), "the robot stopped on an order for another session");
    h.stop().await;
}

#[tokio::test]
async fn metrics_from_config_and_runner_lines_are_in_the_heartbeat() {
    let mut grant = grant_for(JobId::new(), json!({"nodes": {}, "connections": []}));
    grant.format = WorkflowFormat::Casare;
    let mut fabric = prepare(RobotReply::Accepted(grant)).await;
    let script = fabric.state.path().join("runner.sh");
    std::fs::write(&script, "echo FLEET_METRIC rows_done 41\necho FLEET_METRIC rows_done 42\n").unwrap();
    fabric.config.runners =
        vec![RunnerSpec { format: WorkflowFormat::Casare, command: format!("sh '{}'", script.display()) }];
    fabric.config.metrics = BTreeMap::from([("licences".to_owned(), 3.0)]);
    // (The fake orchestrator grants the `shell` class consumer whatever the robot declares.)
    let mut h = fabric.launch();
    h.registered().await;
    let hb = h.heartbeat_where("with the configured metric", |hb| hb.metrics.contains_key("licences")).await;
    let names: Vec<&str> = hb.metrics.keys().map(String::as_str).collect();
    assert_eq!(names, ["free_slots", "licences"], "the robot's own free_slots stays beside custom metrics");
    assert_eq!(hb.metrics["licences"], 3.0);

    h.offer(JobId::new()).await;
    let done = h.next("complete", complete_of).await;
    assert_eq!(done.outcome, RunOutcome::Completed, "{done:?}");
    let hb = h.heartbeat_where("with the runner's metric", |hb| hb.metrics.contains_key("rows_done")).await;
    assert_eq!(hb.metrics.get("rows_done"), Some(&42.0), "the last value wins: {:?}", hb.metrics);
    assert_eq!(hb.metrics.get("licences"), Some(&3.0));
    h.stop().await;
}

/// An offer that reaches a robot after it stopped taking work (the pull raced the command):
/// a paused robot hands it back without a reject (so the job is not kept away from it once
/// resumed); a stopping robot rejects it without claiming.
#[tokio::test]
async fn an_offer_that_raced_the_command_is_handed_back_or_rejected() {
    use async_nats::jetstream::consumer::PullConsumer;
    use futures::StreamExt;

    let mut fabric = prepare(RobotReply::Accepted(grant_for(JobId::new(), json!({"steps": []})))).await;
    let robot = fleet_robot::Robot::connect(
        fabric.config.clone(),
        fleet_robot::Executors::from_config(&fabric.config).unwrap(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    let stream = fabric.js.get_stream(fleet_schemas::subjects::JOBS_STREAM).await.unwrap();
    let consumer: PullConsumer = stream
        .get_consumer(&fleet_schemas::subjects::class_consumer(&tenant(), &fabric.class))
        .await
        .unwrap();
    let pull = || async {
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(WAIT)
            .group(fleet_schemas::subjects::PULL_GROUP)
            .messages()
            .await
            .unwrap();
        batch.next().await.expect("an offer").unwrap()
    };

    let job_id = JobId::new();
    fabric.offer(job_id).await;
    robot.set_state(RobotRunState::Paused);
    let outcome = tokio::time::timeout(WAIT, robot.handle_offer(pull().await)).await.unwrap();
    assert_eq!(outcome, fleet_robot::OfferOutcome::HandedBack);
    let again = pull().await;
    assert!(fabric.next_within(Duration::ZERO, Some).await.is_none(), "nothing was asked");

    robot.set_state(RobotRunState::Stopping);
    let outcome = tokio::time::timeout(WAIT, robot.handle_offer(again)).await.unwrap();
    assert_eq!(outcome, fleet_robot::OfferOutcome::Declined);
    let reject = fabric.next("reject", |s| if let Seen::Reject(r) = s { Some(r) } else { None }).await;
    assert_eq!((reject.job_id, reject.attempt), (job_id, None));
    assert_eq!(fabric.pending_offers().await, (0, 0), "the rejected offer was settled");
}

/// The binary re-executes itself on a restart order: same process, same robot id, new session;
/// a plain stop order then makes it exit with status 0.
#[tokio::test]
async fn the_binary_restarts_itself_and_exits_zero_on_stop() {
    let mut fabric = prepare(RobotReply::Accepted(grant_for(JobId::new(), json!({"steps": []})))).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleet-robot"))
        .args(["--tenant", "acme", "--id", fabric.robot_id.as_str(), "--shutdown-grace", "1s"])
        .env("FLEET_ROBOT_KEY", fleet_testkit::callout::any_robot_key())
        .arg("--state-dir")
        .arg(fabric.state.path())
        .env("NATS_URL", fabric.server.url())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id();
    let first = fabric.registered().await;
    let stop = StopOrder { session_id: first.session_id, force: false, restart: true };
    fabric.put_desired(&desired(1, RobotMode::Online, Some(stop))).await;
    let second = fabric.registered().await;
    assert_ne!(second.session_id, first.session_id, "a restarted robot has a new session");
    assert_eq!(second.state_dir_id, first.state_dir_id, "and the same state directory");
    assert!(child.try_wait().unwrap().is_none(), "the process re-executed itself instead of exiting");
    assert_eq!(child.id(), pid);

    // The restart order names the old session: the new one keeps working.
    let job_id = JobId::new();
    fabric.offer(job_id).await;
    assert_eq!(fabric.next("claim", claim_of).await.job_id, job_id);

    let stop = StopOrder { session_id: second.session_id, force: false, restart: false };
    fabric.put_desired(&desired(2, RobotMode::Online, Some(stop))).await;
    let status = tokio::time::timeout(WAIT, child.wait()).await.expect("the robot did not exit").unwrap();
    assert!(status.success(), "{status}");
}
