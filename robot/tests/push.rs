//! A cancel pushed on the robot's command subject (issue 11): the robot kills the job's process
//! and frees its slot at once, reports nothing, and stops retrying a report it was still sending.
//! The fake orchestrator (see `common`) accepts every renewal, so only the push can stop a job.

mod common;

use std::time::Duration;

use serde_json::json;

use common::*;
use fleet_schemas::JobId;
use fleet_schemas::codec;
use fleet_schemas::robot::*;
use fleet_schemas::subjects;

async fn push_cancel(h: &Harness, job_id: JobId, attempt: i32) {
    let push = RobotPush::Cancel { v: ROBOT_PROTOCOL_VERSION, job_id, attempt };
    h.client
        .publish(subjects::robot_command(&tenant(), &h.robot_id), codec::encode(&push).into())
        .await
        .unwrap();
    h.client.flush().await.unwrap();
}

/// The slot is free when the robot claims another offer; nothing was reported for `job_id`.
async fn next_claim_without_a_report(h: &mut Harness, job_id: JobId, within: Duration) {
    h.offer(JobId::new()).await;
    let mut reported = false;
    let claim = h
        .next_within(within, |s| match s {
            Seen::Complete(c) if c.job_id == job_id => {
                reported = true;
                None
            }
            Seen::Claim(c) if c.job_id != job_id => Some(c),
            _ => None,
        })
        .await;
    assert!(claim.is_some(), "the slot did not free within {within:?}");
    assert!(!reported, "a cancelled job must not be reported");
}

#[tokio::test]
async fn a_pushed_cancel_stops_the_job_and_frees_the_slot_without_a_report() {
    // (That the step's process group is killed is checked end to end in tests/tests/cancel.rs.)
    let workflow = json!({"steps": [{"id": "long", "kind": "shell", "argv": ["sleep", "60"]}]});
    let mut h = start(RobotReply::Accepted(grant_for(JobId::new(), workflow))).await;
    h.registered().await;
    let job_id = JobId::new();
    h.offer(job_id).await;
    // A renewal means the job runs (the robot renews only jobs it started).
    h.next("renew", |s| if let Seen::Renew(r) = s { (r.job_id == job_id).then_some(r) } else { None }).await;
    // A push for another attempt changes nothing; the one for this attempt stops it.
    push_cancel(&h, job_id, 2).await;
    push_cancel(&h, job_id, 1).await;
    next_claim_without_a_report(&mut h, job_id, Duration::from_secs(2)).await;
    h.stop().await;
}

/// A completion answered "unavailable" is retried while the job is ours; once its cancel is
/// pushed the robot gives up on it and the slot frees (the record is final already).
#[tokio::test]
async fn a_pushed_cancel_stops_a_report_being_retried() {
    let workflow = json!({"steps": [{"id": "hi", "kind": "log", "message": "hi"}]});
    let mut h = start(RobotReply::Accepted(grant_for(JobId::new(), workflow))).await;
    h.registered().await;
    *h.script.complete.lock().unwrap() = RobotReply::Unavailable { reason: "database down".into() };
    let job_id = JobId::new();
    h.offer(job_id).await;
    for retry in 0..2 {
        h.next(&format!("completion {retry}"), |s| match s {
            Seen::Complete(c) if c.job_id == job_id => Some(c),
            _ => None,
        })
        .await;
    }
    push_cancel(&h, job_id, 1).await;
    *h.script.complete.lock().unwrap() = RobotReply::Accepted(Ack {});
    h.offer(JobId::new()).await;
    let claim = h
        .next_within(Duration::from_secs(2), |s| match s {
            Seen::Claim(c) if c.job_id != job_id => Some(c),
            _ => None,
        })
        .await;
    assert!(claim.is_some(), "the report kept being retried after the cancel");
    h.stop().await;
}
