//! The robot against a real nats-server and a fake orchestrator that answers the robot protocol
//! with scripted replies (see `common`): claim before ack, term on refusal, no report after a
//! refused renewal, heartbeats with a TTL, clean shutdown.

mod common;

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

use common::*;
use fleet_schemas::JobId;
use fleet_schemas::codec;
use fleet_schemas::robot::*;
use fleet_schemas::subjects;
use fleet_schemas::workflow::WorkflowFormat;

#[tokio::test]
async fn claims_acks_runs_and_completes() {
    let workflow = json!({"steps": [
        {"id": "hello", "kind": "log", "message": "hi {{customer}}"},
        {"id": "echo", "kind": "shell", "argv": ["sh", "-c", "echo out-{{ customer }}"]}
    ]});
    let mut h = start(RobotReply::Accepted(grant_for(JobId::new(), workflow))).await;
    let reg = h.next("register", |s| if let Seen::Register(r) = s { Some(r) } else { None }).await;
    assert_eq!(reg.capabilities, ["shell"]);
    assert!(!reg.state_dir_id.is_empty());

    // The heartbeat lands in the bucket with a TTL.
    let kv = h.js.get_key_value(subjects::ROBOTS_BUCKET).await.unwrap();
    let key = subjects::heartbeat_key(&tenant(), &h.robot_id);
    let beat = async {
        loop {
            if let Some(v) = kv.get(&key).await.unwrap() {
                return codec::decode::<Heartbeat>("heartbeat", &v).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let hb = tokio::time::timeout(WAIT, beat).await.expect("no heartbeat");
    assert_eq!(hb.session_id, reg.session_id);
    assert_eq!(hb.state, RobotRunState::Online);

    let mut logs = h.client.subscribe("fleet.logs.acme.>").await.unwrap();
    h.client.flush().await.unwrap();
    let job_id = JobId::new();
    h.offer(job_id).await;
    let claim = h.next("claim", |s| if let Seen::Claim(c) = s { Some(c) } else { None }).await;
    assert_eq!((claim.job_id, claim.offer_no), (job_id, 1));
    let mut progress = Vec::new();
    let done = h
        .next("complete", |s| match s {
            Seen::Complete(c) => Some(c),
            Seen::Progress(p) => {
                progress.push(p);
                None
            }
            _ => None,
        })
        .await;
    assert_eq!(
        progress.last().map(|p| p.progress),
        Some(100),
        "the last progress is always sent: {progress:?}"
    );
    assert_eq!(done.outcome, RunOutcome::Completed, "{done:?}");
    assert_eq!(done.attempt, 1);
    assert_eq!(done.output["steps"]["echo"]["stdout"], json!("out-ACME\n"));
    assert_eq!(h.pending_offers().await, (0, 0), "the claimed offer was acked");

    // Log lines went to the job's log subject as JSON.
    let hello = async {
        while let Some(m) = logs.next().await {
            let line: LogLine = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(m.subject.as_str(), subjects::job_logs(&tenant(), &job_id));
            if line.line == "hi ACME" {
                return line;
            }
        }
        panic!("log subscription ended");
    };
    let line = tokio::time::timeout(WAIT, hello).await.expect("no log line");
    assert_eq!((line.step.as_deref(), line.stream.as_str()), (Some("hello"), "fleet"));
    h.stop().await;
}

#[tokio::test]
async fn refused_claim_terminates_the_offer() {
    let mut h = start(RobotReply::Refused { reason: "already claimed".into() }).await;
    h.next("register", |s| if let Seen::Register(r) = s { Some(r) } else { None }).await;
    h.offer(JobId::new()).await;
    h.next("claim", |s| if let Seen::Claim(c) = s { Some(c) } else { None }).await;
    let settled = async {
        loop {
            if h.pending_offers().await == (0, 0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(WAIT, settled).await.expect("the refused offer was not terminated");
    h.stop().await;
}

#[tokio::test]
async fn refused_renewal_stops_the_job_without_a_report() {
    let workflow = json!({"steps": [{"id": "nap", "kind": "sleep", "ms": 60000}]});
    let mut h = start(RobotReply::Accepted(grant_for(JobId::new(), workflow))).await;
    h.next("register", |s| if let Seen::Register(r) = s { Some(r) } else { None }).await;
    *h.script.renew.lock().unwrap() = RobotReply::Refused { reason: "superseded".into() };
    let job_id = JobId::new();
    h.offer(job_id).await;
    h.next("renew", |s| if let Seen::Renew(r) = s { Some(r) } else { None }).await;
    // The slot comes free without any report: the robot pulls (and claims) again.
    h.offer(JobId::new()).await;
    let mut saw_complete = false;
    h.next("second claim", |s| match s {
        Seen::Complete(_) => {
            saw_complete = true;
            None
        }
        Seen::Claim(c) if c.job_id != job_id => Some(c),
        _ => None,
    })
    .await;
    assert!(!saw_complete, "a fenced job must not be reported");
    h.stop().await;
}

#[tokio::test]
async fn shutdown_past_grace_releases_running_jobs() {
    let workflow = json!({"steps": [{"id": "nap", "kind": "sleep", "ms": 60000}]});
    let mut h = start(RobotReply::Accepted(grant_for(JobId::new(), workflow))).await;
    h.next("register", |s| if let Seen::Register(r) = s { Some(r) } else { None }).await;
    let job_id = JobId::new();
    h.offer(job_id).await;
    h.next("renew", |s| if let Seen::Renew(r) = s { Some(r) } else { None }).await;
    h.shutdown.cancel();
    let release = h.next("release", |s| if let Seen::Release(r) = s { Some(r) } else { None }).await;
    assert_eq!(release.job_id, job_id);
    assert_eq!(release.reason, "robot shutting down");
    let result = tokio::time::timeout(WAIT, h.robot).await.expect("robot did not stop").unwrap();
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn a_format_without_executor_is_rejected_after_claim() {
    let mut grant = grant_for(JobId::new(), json!({"nodes": {}, "connections": []}));
    grant.format = WorkflowFormat::Casare;
    grant.attempt = 3;
    let mut h = start(RobotReply::Accepted(grant)).await;
    h.next("register", |s| if let Seen::Register(r) = s { Some(r) } else { None }).await;
    let job_id = JobId::new();
    h.offer(job_id).await;
    let reject = h.next("reject", |s| if let Seen::Reject(r) = s { Some(r) } else { None }).await;
    assert_eq!((reject.job_id, reject.offer_no, reject.attempt), (job_id, 1, Some(3)));
    assert!(reject.reason.contains("casare"), "{}", reject.reason);
    h.stop().await;
}

/// A robot that exits gracefully deletes its heartbeat, so the orchestrator's watcher sees it go
/// at once instead of a heartbeat timeout later.
#[tokio::test]
async fn a_clean_exit_deletes_the_heartbeat() {
    let workflow = json!({"steps": []});
    let h = start(RobotReply::Accepted(grant_for(JobId::new(), workflow))).await;
    let kv = h.js.get_key_value(subjects::ROBOTS_BUCKET).await.unwrap();
    let key = subjects::heartbeat_key(&tenant(), &h.robot_id);
    h.heartbeat_where("any", |_| true).await;
    let mut watch = kv.watch(&key).await.unwrap();
    h.shutdown.cancel();
    let result = tokio::time::timeout(WAIT, h.robot).await.expect("robot did not stop").unwrap();
    assert!(result.is_ok(), "{result:?}");
    // The robot has exited: after its last beats (`stopping`) comes a delete, and nothing after.
    let deleted = async {
        while let Some(entry) = watch.next().await {
            if entry.unwrap().operation == async_nats::jetstream::kv::Operation::Delete {
                return;
            }
        }
    };
    tokio::time::timeout(WAIT, deleted).await.expect("the heartbeat deleted on exit");
    assert!(kv.get(&key).await.unwrap().is_none(), "no beat after the delete");
}
