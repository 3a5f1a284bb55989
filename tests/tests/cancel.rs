//! Cancel that always works, and robot reports that always fit (issue 11): a job whose output is
//! larger than the server's max payload completes with its output truncated (the full text in
//! the job's log) and frees its slot; cancel of a running job ends it at once, kills its process
//! and frees the robot's slot; a late report from a cancelled attempt is refused.

mod common;

use std::time::Duration;

use common::{Stack, WAIT};
use fleet_tests::wait_for;
use serde_json::{Value, json};

/// All log lines of a job, read page by page.
async fn all_logs(stack: &Stack, id: &str) -> Vec<Value> {
    let mut lines = Vec::new();
    let mut since: Option<u64> = None;
    loop {
        let path = match since {
            Some(s) => format!("/api/v1/jobs/{id}/logs?limit=10000&since={s}"),
            None => format!("/api/v1/jobs/{id}/logs?limit=10000"),
        };
        let (status, page) = stack.get(&path).await;
        assert_eq!(status, 200, "{page}");
        let logs = page["logs"].as_array().cloned().unwrap_or_default();
        if logs.is_empty() {
            return lines;
        }
        lines.extend(logs);
        since = page["next_since"].as_u64();
        if since.is_none() {
            return lines;
        }
    }
}

/// A shell step printing `lines` lines of 1000 bytes each (999 characters and a newline), each
/// starting with its number so the reassembled text can be checked.
fn printing(lines: usize) -> Value {
    let script = format!("i=0; while [ $i -lt {lines} ]; do printf '%08d%0991d\\n' $i 0; i=$((i+1)); done");
    json!({
        "workflow_name": "Loud",
        "workflow_json": {"steps": [{"id": "loud", "kind": "shell", "argv": ["sh", "-c", script]}]},
    })
}

async fn large_output_completes(lines: usize) {
    let mut stack = Stack::start().await;
    let mut config = stack.robot_config("r1", &[]);
    config.max_jobs = 1;
    stack.start_robot(config);
    let id = stack.submit(printing(lines)).await["job_id"].as_str().unwrap().to_owned();
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "completed", "{job}");
    stack.stop().await;
}

#[tokio::test]
async fn a_job_printing_1_8_mb_completes_and_frees_its_slot() {
    large_output_completes(1800).await;
}

async fn script_completes(script: &str) {
    let mut stack = Stack::start().await;
    let mut config = stack.robot_config("r1", &[]);
    config.max_jobs = 1;
    stack.start_robot(config);
    let id = stack
        .submit(json!({
            "workflow_name": "Loud",
            "workflow_json": {"steps": [{"id": "loud", "kind": "shell", "argv": ["sh", "-c", script]}]},
        }))
        .await["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let job = stack.finished(&id).await;
    eprintln!("{}", job.to_string().len());
    assert_eq!(job["status"], "completed", "{}", &job.to_string()[..300]);
    stack.stop().await;
}

#[tokio::test]
async fn probe_zero() {
    script_completes("head -c 1800000 /dev/zero").await;
}
#[tokio::test]
async fn probe_random() {
    script_completes("head -c 1800000 /dev/urandom").await;
}
#[tokio::test]
async fn probe_ctrl() {
    script_completes("head -c 1800000 /dev/zero | tr '\\0' '\\1'").await;
}
