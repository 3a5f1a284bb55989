//! The rest of the Canvas API end to end: retry, the robot registry, analytics, activity,
//! keyset paging of the job list, `Idempotency-Key`, and the roles these endpoints need.

mod common;

use std::collections::BTreeSet;

use common::{Stack, WAIT, send};
use fleet_schemas::keys::Role;
use fleet_tests::wait_for;
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

async fn call(stack: &Stack, method: Method, path: &str, body: Option<Value>) -> (u16, HeaderMap, Value) {
    send(&stack.http, &stack.base, method, path, None, body).await
}

fn shell(name: &str, script: &str) -> Value {
    json!({"workflow_name": name, "workflow_json": {"steps": [{"id": "run", "kind": "shell", "argv": ["sh", "-c", script]}]}})
}

fn id_of(answer: &Value) -> String {
    answer["job_id"].as_str().unwrap_or_else(|| panic!("no job_id in {answer}")).to_owned()
}

#[tokio::test]
async fn retry_runs_a_failed_job_again_as_its_next_attempt_under_the_same_id() {
    let mut stack = Stack::start().await;
    stack.start_robot(stack.robot_config("r1", &[]));
    // Fails the first time (leaving a marker), succeeds the second.
    let marker = stack.dir("retry").join("ran-once");
    let script = format!("if [ -e {m} ]; then echo second; else touch {m}; exit 3; fi", m = marker.display());
    let id = id_of(&stack.submit(shell("Flaky", &script)).await);
    let job = stack.finished(&id).await;
    assert_eq!((job["status"].as_str(), job["attempt"].as_i64()), (Some("failed"), Some(1)), "{job}");

    let (status, _, answer) = call(&stack, Method::POST, &format!("/api/v1/jobs/{id}/retry"), None).await;
    assert_eq!(status, 200, "{answer}");
    for key in ["job_id", "new_job_id", "original_job_id"] {
        assert_eq!(answer[key], id.as_str(), "{key} is the same job: {answer}");
    }
    assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()), "{answer}");
    assert_eq!(answer["next_attempt"], 2, "{answer}");

    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "completed", "the retry ran again: {job}");
    assert_eq!(job["attempt"], 2, "{job}");
    assert_eq!(job["retry_count"], 1, "{job}");
    assert_eq!(job["error_message"], Value::Null, "the old error is cleared: {job}");
    assert!(job["output"]["steps"]["run"]["stdout"].as_str().unwrap_or_default().contains("second"), "{job}");

    // A completed job cannot be retried.
    let (status, _, body) = call(&stack, Method::POST, &format!("/api/v1/jobs/{id}/retry"), None).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("completed"), "{body}");

    // Nor can a running one.
    let long = id_of(&stack.submit(shell("Long", "sleep 30")).await);
    wait_for("the long job to run", WAIT, || async {
        (stack.job(&long).await["status"] == "running").then_some(())
    })
    .await
    .unwrap();
    let (status, _, body) = call(&stack, Method::POST, &format!("/api/v1/jobs/{long}/retry"), None).await;
    assert_eq!(status, 409, "{body}");
    let (status, _, _) = call(&stack, Method::POST, &format!("/api/v1/jobs/{long}/cancel"), None).await;
    assert_eq!(status, 200);
    let job = stack.finished(&long).await;
    assert_eq!(job["status"], "cancelled", "{job}");

    // A cancelled job can: it runs again (and is cancelled again, to end the test quickly).
    let (status, _, answer) = call(&stack, Method::POST, &format!("/api/v1/jobs/{long}/retry"), None).await;
    assert_eq!((status, answer["previous_status"].as_str()), (200, Some("cancelled")), "{answer}");
    wait_for("the retried job to run", WAIT, || async {
        let job = stack.job(&long).await;
        (job["status"] == "running" && job["attempt"] == 2).then_some(())
    })
    .await
    .unwrap();
    call(&stack, Method::POST, &format!("/api/v1/jobs/{long}/cancel"), None).await;
    stack.finished(&long).await;

    // Unknown ids are 404.
    let unknown = fleet_schemas::JobId::new();
    let (status, _, _) = call(&stack, Method::POST, &format!("/api/v1/jobs/{unknown}/retry"), None).await;
    assert_eq!(status, 404);
    let (status, _, _) = call(&stack, Method::POST, "/api/v1/jobs/not-an-id/retry", None).await;
    assert_eq!(status, 404);
    stack.stop().await;
}

#[tokio::test]
async fn robots_are_registered_updated_and_deleted() {
    let mut stack = Stack::start().await;
    let body = json!({
        "robot_id": "bot-a", "name": "Bot A", "hostname": "host-a", "capabilities": ["gpu", "browser"],
        "environment": "prod", "max_concurrent_jobs": 3, "tags": ["eu"],
    });
    let (status, _, robot) = call(&stack, Method::POST, "/api/v1/robots/register", Some(body.clone())).await;
    assert_eq!(status, 200, "{robot}");
    assert_eq!(robot["robot_id"], "bot-a");
    assert_eq!(robot["capabilities"], json!(["browser", "gpu"]), "canonical order: {robot}");
    assert_eq!((robot["max_concurrent_jobs"].as_u64(), robot["status"].as_str()), (Some(3), Some("offline")));
    assert_eq!((robot["tags"].clone(), robot["environment"].clone()), (json!(["eu"]), json!("prod")));
    // The same object as GET answers.
    let (_, got) = stack.get("/api/v1/metrics/robots/bot-a").await;
    assert_eq!(robot, got);

    // An upsert: registering again changes the record.
    let mut again = body.clone();
    again["name"] = json!("Bot A2");
    let (status, _, robot) = call(&stack, Method::POST, "/api/v1/robots/register", Some(again)).await;
    assert_eq!((status, robot["name"].as_str()), (200, Some("Bot A2")), "{robot}");
    let (_, robots) = stack.get("/api/v1/metrics/robots").await;
    assert_eq!(robots.as_array().map(Vec::len), Some(1), "{robots}");

    // A partial update changes only what it names.
    let (status, _, robot) =
        call(&stack, Method::PUT, "/api/v1/robots/bot-a", Some(json!({"hostname": "host-b", "tags": []})))
            .await;
    assert_eq!(status, 200, "{robot}");
    assert_eq!((robot["hostname"].as_str(), robot["name"].as_str()), (Some("host-b"), Some("Bot A2")));
    assert_eq!((robot["tags"].clone(), robot["max_concurrent_jobs"].as_u64()), (json!([]), Some(3)));
    let (status, _, _) = call(&stack, Method::PUT, "/api/v1/robots/nobody", Some(json!({"name": "x"}))).await;
    assert_eq!(status, 404);

    // Bad input is 422 naming the field.
    for (path, method, body, field) in [
        (
            "/api/v1/robots/register",
            Method::POST,
            json!({"robot_id": "Bad_Id", "name": "x", "hostname": "h"}),
            "robot_id",
        ),
        (
            "/api/v1/robots/register",
            Method::POST,
            json!({"robot_id": "ok", "name": "x", "hostname": "h", "capabilities": ["gpu", "Bad!"]}),
            "capabilities[1]",
        ),
        ("/api/v1/robots/register", Method::POST, json!({"robot_id": "ok", "hostname": "h"}), "name"),
        (
            "/api/v1/robots/register",
            Method::POST,
            json!({"robot_id": "ok", "name": " ", "hostname": "h"}),
            "name",
        ),
        (
            "/api/v1/robots/register",
            Method::POST,
            json!({"robot_id": "ok", "name": "x", "hostname": "h", "max_concurrent_jobs": 0}),
            "max_concurrent_jobs",
        ),
        ("/api/v1/robots/bot-a", Method::PUT, json!({"capabilities": ["UPPER"]}), "capabilities[0]"),
    ] {
        let (status, _, answer) = call(&stack, method, path, Some(body.clone())).await;
        assert_eq!((status, answer["error"]["field"].as_str()), (422, Some(field)), "{body}: {answer}");
    }
    let (status, _, answer) =
        call(&stack, Method::PUT, "/api/v1/robots/bot-a", Some(json!({"colour": "red"}))).await;
    assert_eq!(status, 422, "unknown fields are refused: {answer}");

    // Delete forgets it.
    let (status, _, answer) = call(&stack, Method::DELETE, "/api/v1/robots/bot-a", None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!((answer["deleted"].as_bool(), answer["robot_id"].as_str()), (Some(true), Some("bot-a")));
    let (status, _) = stack.get("/api/v1/metrics/robots/bot-a").await;
    assert_eq!(status, 404);
    let (status, _, _) = call(&stack, Method::DELETE, "/api/v1/robots/bot-a", None).await;
    assert_eq!(status, 404);

    // Deleting a running robot stops it: its `run` ends, and its jobs keep its id.
    stack.start_robot(stack.robot_config("r2", &[]));
    stack.wait_robots_online(1).await;
    let id = id_of(&stack.submit(shell("Quick", "true")).await);
    assert_eq!(stack.finished(&id).await["robot_id"], "r2");
    let (status, _, answer) = call(&stack, Method::DELETE, "/api/v1/robots/r2", None).await;
    assert_eq!((status, answer["stopped"].as_bool()), (200, Some(true)), "{answer}");
    let robot = stack.robots.pop().unwrap();
    match tokio::time::timeout(WAIT, robot.task).await {
        Ok(Ok(Ok(()))) => {}
        other => panic!("the deleted robot did not stop cleanly: {other:?}"),
    }
    let (status, _) = stack.get("/api/v1/metrics/robots/r2").await;
    assert_eq!(status, 404, "the record is gone");
    assert_eq!(stack.job(&id).await["robot_id"], "r2", "jobs keep the robot id");

    // A robot binary registering with that id re-creates it.
    stack.start_robot(stack.robot_config("r2", &[]));
    stack.wait_robots_online(1).await;
    let (status, robot) = stack.get("/api/v1/metrics/robots/r2").await;
    assert_eq!((status, robot["status"].as_str()), (200, Some("online")), "{robot}");
    stack.stop().await;
}

#[tokio::test]
async fn analytics_and_activity_describe_the_tenants_jobs() {
    let mut stack = Stack::start().await;
    stack.start_robot(stack.robot_config("r1", &[]));
    let mut ids = Vec::new();
    for (name, script) in [
        ("Fast", "true"),
        ("Fast", "true"),
        ("Slow", "sleep 0.3"),
        ("Broken", "exit 3"),
        ("Broken", "exit 4"),
    ] {
        ids.push(id_of(&stack.submit(shell(name, script)).await));
    }
    for id in &ids {
        stack.finished(id).await;
    }

    let (status, _, a) = call(&stack, Method::GET, "/api/v1/metrics/analytics", None).await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(
        (a["total_jobs"].as_u64(), a["jobs_completed"].as_u64(), a["jobs_failed"].as_u64()),
        (Some(5), Some(3), Some(2)),
        "{a}"
    );
    assert_eq!((a["success_rate"].as_f64(), a["failure_rate"].as_f64()), (Some(60.0), Some(40.0)), "{a}");
    assert_eq!(a["job_status_distribution"], json!({"completed": 3, "failed": 2}), "{a}");
    assert_eq!(a["error_distribution"], json!([{"error_type": "workflow_error", "count": 2}]), "{a}");
    let ms = |k: &str| a[k].as_f64().unwrap_or_else(|| panic!("{k} in {a}"));
    assert!(
        ms("p50_duration_ms") <= ms("p90_duration_ms") && ms("p90_duration_ms") <= ms("p99_duration_ms"),
        "{a}"
    );
    assert!(ms("p99_duration_ms") >= 300.0, "the slow job is in the tail: {a}");
    assert_eq!(ms("average_duration_ms"), ms("avg_duration_ms"));
    assert_eq!(a["self_healing_success_rate"], 0.0);
    assert_eq!(a["days"], 7, "the default window");
    let slowest = a["slowest_workflows"].as_array().unwrap();
    assert_eq!(slowest[0]["workflow_name"], "Slow", "{a}");
    assert_eq!(slowest.len(), 2, "only workflows with completed runs: {a}");
    let per_workflow: u64 =
        a["throughput_per_workflow"].as_array().unwrap().iter().map(|w| w["jobs"].as_u64().unwrap()).sum();
    let per_hour: u64 =
        a["throughput_per_hour"].as_array().unwrap().iter().map(|h| h["jobs"].as_u64().unwrap()).sum();
    assert_eq!((per_workflow, per_hour), (5, 5), "{a}");
    assert!(a["throughput_per_hour"][0]["hour"].as_str().unwrap().ends_with('Z'), "ISO hours: {a}");
    for bad in ["days=0", "days=91", "days=week"] {
        let (status, _, body) =
            call(&stack, Method::GET, &format!("/api/v1/metrics/analytics?{bad}"), None).await;
        assert_eq!((status, body["error"]["field"].as_str()), (422, Some("days")), "{bad}");
    }

    // Activity: the job's start and completion, newest first, with titles people read.
    let first = &ids[0];
    let (status, _, activity) = call(&stack, Method::GET, "/api/v1/metrics/activity?limit=200", None).await;
    assert_eq!(status, 200, "{activity}");
    let events = activity["events"].as_array().unwrap();
    assert_eq!(activity["total"].as_u64(), Some(events.len() as u64), "{activity}");
    let of_first: Vec<&Value> = events.iter().filter(|e| e["job_id"] == first.as_str()).collect();
    let types: Vec<&str> = of_first.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["job_completed", "job_started", "job_assigned", "job_submitted"],
        "newest first: {activity}"
    );
    let done = of_first[0];
    assert!(done["title"].as_str().unwrap().contains("completed on r1"), "{done}");
    assert_eq!(done["robot_id"], "r1");
    for key in ["id", "timestamp", "details"] {
        assert!(!done[key].is_null(), "{key}: {done}");
    }
    assert!(events.iter().any(|e| e["type"] == "robot_online" && e["robot_id"] == "r1"), "{activity}");
    let stamps: Vec<&str> = events.iter().map(|e| e["timestamp"].as_str().unwrap()).collect();
    let parsed: Vec<time::OffsetDateTime> = stamps
        .iter()
        .map(|s| time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap())
        .collect();
    assert!(parsed.windows(2).all(|w| w[0] >= w[1]), "newest first: {stamps:?}");

    let (_, _, failed) =
        call(&stack, Method::GET, "/api/v1/metrics/activity?event_type=job_failed&limit=1", None).await;
    assert_eq!(
        (failed["total"].as_u64(), failed["events"].as_array().map(Vec::len)),
        (Some(2), Some(1)),
        "{failed}"
    );
    assert_eq!(failed["events"][0]["type"], "job_failed");
    let (_, _, none) =
        call(&stack, Method::GET, "/api/v1/metrics/activity?since=2999-01-01T00:00:00", None).await;
    assert_eq!(
        (none["total"].as_u64(), none["events"].as_array().map(Vec::len)),
        (Some(0), Some(0)),
        "{none}"
    );
    for (bad, field) in [
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("since=yesterday", "since"),
        ("event_type=Job-Done", "event_type"),
    ] {
        let (status, _, body) =
            call(&stack, Method::GET, &format!("/api/v1/metrics/activity?{bad}"), None).await;
        assert_eq!((status, body["error"]["field"].as_str()), (422, Some(field)), "{bad}: {body}");
    }
    stack.stop().await;
}

#[tokio::test]
async fn the_job_list_pages_by_cursor_and_idempotency_keys_return_the_first_job() {
    let stack = Stack::start().await;
    // No robot: the jobs stay pending, which is all paging needs.
    let mut submitted = Vec::new();
    for i in 0..25 {
        submitted.push(id_of(&stack.submit(json!({"workflow_name": format!("page {i}"), "workflow_json": {"steps": [{"id": "a", "kind": "log", "message": "x"}]}})).await));
    }
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => "/api/v1/metrics/jobs?limit=10".to_owned(),
            Some(c) => format!("/api/v1/metrics/jobs?limit=10&cursor={c}"),
        };
        let (status, headers, page) = call(&stack, Method::GET, &path, None).await;
        assert_eq!(status, 200, "{page}");
        let ids: Vec<String> = page.as_array().expect("a bare array").iter().map(id_of).collect();
        pages.push(ids);
        cursor = headers.get("x-next-cursor").map(|v| v.to_str().unwrap().to_owned());
        if cursor.is_none() || pages.len() > 5 {
            break;
        }
    }
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5], "three pages");
    let all: Vec<String> = pages.concat();
    assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), 25, "no duplicates");
    let newest_first: Vec<String> = submitted.iter().rev().cloned().collect();
    assert_eq!(all, newest_first, "the full set, newest first");
    // Filters apply to every page.
    let (_, headers, page) =
        call(&stack, Method::GET, "/api/v1/metrics/jobs?status=pending&limit=20", None).await;
    let next = headers.get("x-next-cursor").unwrap().to_str().unwrap().to_owned();
    let (_, headers, rest) = call(
        &stack,
        Method::GET,
        &format!("/api/v1/metrics/jobs?status=pending&limit=20&cursor={next}"),
        None,
    )
    .await;
    assert_eq!((page.as_array().unwrap().len(), rest.as_array().unwrap().len()), (20, 5));
    assert!(headers.get("x-next-cursor").is_none());
    for bad in ["nope", "0123", &format!("{next}00")] {
        let (status, _, body) =
            call(&stack, Method::GET, &format!("/api/v1/metrics/jobs?cursor={bad}"), None).await;
        assert_eq!((status, body["error"]["field"].as_str()), (422, Some("cursor")), "{bad}: {body}");
    }

    // The same Idempotency-Key returns the first job.
    let body = json!({"workflow_name": "once", "workflow_json": {"steps": [{"id": "a", "kind": "log", "message": "x"}]}});
    let mut answers = Vec::new();
    for _ in 0..2 {
        let r = stack
            .http
            .post(format!("{}/api/v1/workflows", stack.base))
            .header("idempotency-key", "order-4711")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        answers.push(r.json::<Value>().await.unwrap());
    }
    assert_eq!(answers[0]["job_id"], answers[1]["job_id"], "{answers:?}");
    let other = stack.submit(body).await;
    assert_ne!(other["job_id"], answers[0]["job_id"], "no key, a new job");
    stack.stop().await;
}

#[tokio::test]
async fn retry_needs_an_operator_and_the_registry_an_admin() {
    let stack = Stack::start().await;
    let (base, _guard) = stack.start_secure_gateway().await;
    let admin = stack.cli_key("default", Role::Admin, None).await;
    let mut keys = std::collections::HashMap::new();
    for role in ["operator", "viewer"] {
        let (status, _, body) = send(
            &stack.http,
            &base,
            Method::POST,
            "/api/v1/api-keys",
            Some(&admin),
            Some(json!({"name": role, "role": role})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        keys.insert(role, body["api_key"].as_str().unwrap().to_owned());
    }
    let job = fleet_schemas::JobId::new();
    let register = json!({"robot_id": "bot-r", "name": "R", "hostname": "h"});
    let retry = format!("/api/v1/jobs/{job}/retry");
    let cases: [(&str, Method, &str, Option<Value>, u16); 7] = [
        ("viewer", Method::POST, retry.as_str(), None, 403),
        ("viewer", Method::POST, "/api/v1/robots/register", Some(register.clone()), 403),
        ("viewer", Method::DELETE, "/api/v1/robots/bot-r", None, 403),
        ("operator", Method::POST, "/api/v1/robots/register", Some(register.clone()), 403),
        ("operator", Method::PUT, "/api/v1/robots/bot-r", Some(json!({"name": "x"})), 403),
        ("operator", Method::DELETE, "/api/v1/robots/bot-r", None, 403),
        // Past the role check: the job does not exist.
        ("operator", Method::POST, retry.as_str(), None, 404),
    ];
    for (role, method, path, body, expected) in cases {
        let (status, _, answer) =
            send(&stack.http, &base, method.clone(), path, Some(&keys[role]), body).await;
        assert_eq!(status, expected, "{role} {method} {path}: {answer}");
        if expected == 403 {
            assert_eq!(answer["error"]["code"], "forbidden", "{answer}");
        }
    }
    // The admin may; readers see the result.
    let (status, _, robot) =
        send(&stack.http, &base, Method::POST, "/api/v1/robots/register", Some(&admin), Some(register)).await;
    assert_eq!((status, robot["robot_id"].as_str()), (200, Some("bot-r")), "{robot}");
    let (status, _, _) =
        send(&stack.http, &base, Method::GET, "/api/v1/metrics/analytics", Some(&keys["viewer"]), None).await;
    assert_eq!(status, 200);
    let (status, _, _) =
        send(&stack.http, &base, Method::GET, "/api/v1/metrics/activity", Some(&keys["viewer"]), None).await;
    assert_eq!(status, 200);
    // Another tenant's ids are 404, exactly like ids that do not exist.
    let acme = stack.cli_key("acme", Role::Admin, None).await;
    let ours = id_of(&stack.submit(json!({"workflow_name": "mine", "workflow_json": {"steps": [{"id": "a", "kind": "log", "message": "x"}]}})).await);
    let their_view: [(Method, String, Option<Value>); 3] = [
        (Method::POST, format!("/api/v1/jobs/{ours}/retry"), None),
        (Method::PUT, "/api/v1/robots/bot-r".to_owned(), Some(json!({"name": "taken"}))),
        (Method::DELETE, "/api/v1/robots/bot-r".to_owned(), None),
    ];
    for (method, path, body) in their_view {
        let (status, _, answer) = send(&stack.http, &base, method.clone(), &path, Some(&acme), body).await;
        assert_eq!(status, 404, "acme {method} {path}: {answer}");
    }
    // No key: 401.
    let (status, _, _) = send(&stack.http, &base, Method::DELETE, "/api/v1/robots/bot-r", None, None).await;
    assert_eq!(status, 401);
    let (status, _, answer) =
        send(&stack.http, &base, Method::DELETE, "/api/v1/robots/bot-r", Some(&admin), None).await;
    assert_eq!((status, answer["deleted"].as_bool()), (200, Some(true)), "{answer}");
    stack.stop().await;
}

/// Regressions found by schemathesis (`scripts/api-fuzz`), end to end where the database is
/// what failed: a NUL character (U+0000) anywhere in a body or query, or a key id of the wrong
/// shape in a path, reached PostgreSQL, which refused it, and the API answered 500. Now a body or
/// query answers 422 naming the field and a path 404, like any unknown id. Also: a repeated
/// query parameter, and a body a robot or key action would have ignored, are refused instead of
/// silently dropped; and a job-list cursor with a time before 1970 (which PostgreSQL could not
/// hold either) is 422 like any cursor this list never made.
#[tokio::test]
async fn input_the_database_cannot_hold_is_refused_at_the_edge() {
    let stack = Stack::start().await;
    let register = json!({"robot_id": "bot-n", "name": "N", "hostname": "h", "tags": ["ok", "\u{0}x"]});
    let wf = json!({"steps": [{"id": "a", "kind": "log", "message": "x"}]});
    let bodies = [
        ("/api/v1/robots/register", register, "tags[1]"),
        ("/api/v1/workflows", json!({"workflow_name": "a\u{0}", "workflow_json": wf}), "workflow_name"),
        (
            "/api/v1/workflows",
            json!({"workflow_name": "a", "workflow_json": wf, "metadata": {"note": "\u{0}"}}),
            "metadata.note",
        ),
        ("/api/v1/api-keys", json!({"name": "k\u{0}"}), "name"),
    ];
    for (path, body, field) in bodies {
        let (status, _, answer) = call(&stack, Method::POST, path, Some(body.clone())).await;
        assert_eq!(
            (status, answer["error"]["field"].as_str()),
            (422, Some(field)),
            "{path} {body}: {answer}"
        );
    }
    for (query, field) in [
        ("/api/v1/metrics/jobs?workflow_id=a%00b", "workflow_id"),
        ("/api/v1/api-keys?robot_id=%00", "robot_id"),
        ("/api/v1/api-keys?offset=false&offset=", "offset"),
        ("/api/v1/events?since=9223372036854775808", "since"),
        // A cursor whose time is before 1970 went to PostgreSQL out of its range: 500.
        ("/api/v1/metrics/jobs?cursor=FbC1a6E1eE98de1DC6D8a9ACd0F7A0B0b80f0F69BDeb88aF", "cursor"),
    ] {
        let (status, _, answer) = call(&stack, Method::GET, query, None).await;
        assert_eq!((status, answer["error"]["field"].as_str()), (422, Some(field)), "{query}: {answer}");
    }
    let well_formed = "0123456789abcdef0123456789abcdef";
    for (method, path) in [
        (Method::DELETE, "/api/v1/api-keys/%00".to_owned()),
        (Method::POST, "/api/v1/api-keys/a%00b/revoke".to_owned()),
        (Method::POST, "/api/v1/robot-api-keys/not-a-key-id/rotate".to_owned()),
        (Method::DELETE, format!("/api/v1/api-keys/{well_formed}")),
        (Method::POST, format!("/api/v1/api-keys/{well_formed}/nothing")),
        // Path segments that are not UTF-8 answered 400 on these routes, 404 on the others.
        (Method::POST, "/api/v1/robots/%FF/start".to_owned()),
        (Method::POST, "/api/v1/api-keys/%FF/rotate".to_owned()),
    ] {
        let (status, _, answer) = call(&stack, method.clone(), &path, None).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{method} {path}: {answer}"
        );
    }
    // Optional bodies are checked for every action, not only the one that reads them.
    let junk = json!({"force": false, "colour": "red"});
    for path in ["/api/v1/robots/bot-n/start", &format!("/api/v1/api-keys/{well_formed}/rotate")] {
        let (status, _, answer) = call(&stack, Method::POST, path, Some(junk.clone())).await;
        assert_eq!(status, 422, "{path}: {answer}");
    }
    let (status, _, answer) =
        call(&stack, Method::POST, "/api/v1/robots/bot-n/pause", Some(Value::Null)).await;
    assert_eq!(status, 404, "JSON null is no body; the robot does not exist: {answer}");
    stack.stop().await;
}

/// GET `path`, asserting 200.
async fn list(stack: &Stack, path: &str) -> Value {
    let (status, _, body) = call(stack, Method::GET, path, None).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

/// GET `path`, asserting a 422 that names `field`.
async fn refused(stack: &Stack, path: &str, field: &str) {
    let (status, _, body) = call(stack, Method::GET, path, None).await;
    assert_eq!((status, body["error"]["field"].as_str()), (422, Some(field)), "{path}: {body}");
}

/// The values of `key` in a list of objects.
fn values(items: &Value, key: &str) -> BTreeSet<String> {
    items
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {items}"))
        .iter()
        .map(|i| i[key].to_string())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|i| Value::from(*i).to_string()).collect()
}

/// Regression (issue 11): `?capability=gpu` returned every robot.
#[tokio::test]
async fn the_robot_list_filters_by_status_and_capability() {
    let mut stack = Stack::start().await;
    stack.start_robot(stack.robot_config("r1", &["browser"]));
    stack.wait_robots_online(1).await;
    let gpu = json!({"robot_id": "bot-gpu", "name": "G", "hostname": "g", "capabilities": ["gpu"]});
    let (status, _, body) = call(&stack, Method::POST, "/api/v1/robots/register", Some(gpu)).await;
    assert_eq!(status, 200, "{body}");
    let path = "/api/v1/metrics/robots";
    assert_eq!(values(&list(&stack, path).await, "robot_id"), set(&["r1", "bot-gpu"]));
    assert_eq!(values(&list(&stack, &format!("{path}?capability=gpu")).await, "robot_id"), set(&["bot-gpu"]));
    assert_eq!(values(&list(&stack, &format!("{path}?capability=browser")).await, "robot_id"), set(&["r1"]));
    // Implicit capabilities count.
    assert_eq!(values(&list(&stack, &format!("{path}?capability=shell")).await, "robot_id"), set(&["r1"]));
    assert_eq!(values(&list(&stack, &format!("{path}?capability=secure")).await, "robot_id"), set(&[]));
    let (_, r1) = stack.get("/api/v1/metrics/robots/r1").await;
    let online = r1["status"].as_str().unwrap().to_owned();
    assert_ne!(online, "offline", "{r1}");
    assert_eq!(values(&list(&stack, &format!("{path}?status={online}")).await, "robot_id"), set(&["r1"]));
    assert_eq!(values(&list(&stack, &format!("{path}?status=offline")).await, "robot_id"), set(&["bot-gpu"]));
    // Both at once.
    assert_eq!(
        values(&list(&stack, &format!("{path}?status=offline&capability=browser")).await, "robot_id"),
        set(&[])
    );
    refused(&stack, &format!("{path}?capability=Bad!"), "capability").await;
    refused(&stack, &format!("{path}?status=asleep"), "status").await;
    stack.stop().await;
}

#[tokio::test]
async fn the_job_list_filters_by_status_workflow_robot_and_limit() {
    let mut stack = Stack::start().await;
    stack.start_robot(stack.robot_config("r1", &[]));
    let done = stack.submit(shell("Done", "true")).await;
    stack.finished(&id_of(&done)).await;
    let mut waits = shell("Waits", "true");
    waits["required_capabilities"] = json!(["gpu"]);
    let waits = stack.submit(waits).await;
    let (done_id, waits_id) = (id_of(&done), id_of(&waits));
    let path = "/api/v1/metrics/jobs";
    let ids = |body: Value| values(&body, "job_id");
    assert_eq!(ids(list(&stack, path).await), set(&[&done_id, &waits_id]));
    assert_eq!(ids(list(&stack, &format!("{path}?status=completed")).await), set(&[&done_id]));
    assert_eq!(ids(list(&stack, &format!("{path}?status=pending")).await), set(&[&waits_id]));
    let workflow = waits["workflow_id"].as_str().unwrap();
    assert_eq!(ids(list(&stack, &format!("{path}?workflow_id={workflow}")).await), set(&[&waits_id]));
    assert_eq!(ids(list(&stack, &format!("{path}?robot_id=r1")).await), set(&[&done_id]));
    assert_eq!(ids(list(&stack, &format!("{path}?robot_id=r2")).await), set(&[]));
    // Newest first.
    assert_eq!(ids(list(&stack, &format!("{path}?limit=1")).await), set(&[&waits_id]));
    assert_eq!(
        ids(list(&stack, &format!("{path}?status=completed&robot_id=r1&limit=1")).await),
        set(&[&done_id])
    );
    refused(&stack, &format!("{path}?status=nope"), "status").await;
    refused(&stack, &format!("{path}?robot_id=R!"), "robot_id").await;
    refused(&stack, &format!("{path}?limit=0"), "limit").await;
    refused(&stack, &format!("{path}?cursor=zz"), "cursor").await;
    stack.stop().await;
}

#[tokio::test]
async fn the_activity_list_filters_by_type_time_and_limit() {
    let mut stack = Stack::start().await;
    stack.start_robot(stack.robot_config("r1", &[]));
    let first = id_of(&stack.submit(shell("First", "true")).await);
    stack.finished(&first).await;
    let path = "/api/v1/metrics/activity";
    // A time after the first job's events and before the second's (the API's own clock).
    let newest = list(&stack, &format!("{path}?limit=1")).await;
    let between = newest["events"][0]["timestamp"].as_str().unwrap().to_owned();
    assert!(newest["total"].as_u64().unwrap() > 1, "the limit leaves some out: {newest}");
    assert_eq!(newest["events"].as_array().map(Vec::len), Some(1), "{newest}");
    let second = id_of(&stack.submit(shell("Second", "true")).await);
    stack.finished(&second).await;
    let completed = list(&stack, &format!("{path}?event_type=job_completed&limit=200")).await;
    assert_eq!(values(&completed["events"], "job_id"), set(&[&first, &second]), "{completed}");
    assert_eq!(values(&completed["events"], "type"), set(&["job_completed"]), "{completed}");
    let since = list(&stack, &format!("{path}?since={}&limit=200", between.replace('+', "%2B"))).await;
    let jobs = values(&since["events"], "job_id");
    assert!(jobs.contains(&Value::from(second.as_str()).to_string()), "{since}");
    assert!(!jobs.contains(&Value::from(first.as_str()).to_string()), "{since}");
    refused(&stack, &format!("{path}?limit=201"), "limit").await;
    refused(&stack, &format!("{path}?since=soon"), "since").await;
    refused(&stack, &format!("{path}?event_type=Job-Done"), "event_type").await;
    stack.stop().await;
}

#[tokio::test]
async fn the_log_lists_filter_by_limit_and_since() {
    let mut stack = Stack::start().await;
    stack.start_robot(stack.robot_config("r1", &[]));
    let id = id_of(&stack.submit(shell("Chatty", "echo one; echo two; echo three")).await);
    stack.finished(&id).await;
    let job_path = format!("/api/v1/jobs/{id}/logs");
    let lines = |body: &Value| -> Vec<String> {
        body["logs"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|l| l["line"].as_str().map(str::to_owned))
            .collect()
    };
    let all = list(&stack, &job_path).await;
    let every = lines(&all);
    for word in ["one", "two", "three"] {
        assert!(every.iter().any(|l| l == word), "{all}");
    }
    let page = list(&stack, &format!("{job_path}?limit=1")).await;
    assert_eq!(lines(&page), every[..1], "{page}");
    let rest = list(&stack, &format!("{job_path}?since={}", page["next_since"])).await;
    assert_eq!(lines(&rest), every[1..], "{rest}");
    let later = list(&stack, &format!("{job_path}?since=2999-01-01T00:00:00Z")).await;
    assert_eq!(lines(&later), Vec::<String>::new(), "{later}");
    refused(&stack, &format!("{job_path}?limit=0"), "limit").await;
    refused(&stack, &format!("{job_path}?since=soon"), "since").await;

    let robot_path = "/api/v1/robots/r1/logs";
    let all = list(&stack, robot_path).await;
    assert_eq!(lines(&all), every, "the robot wrote the same lines: {all}");
    let newest = list(&stack, &format!("{robot_path}?limit=1")).await;
    assert_eq!(lines(&newest), every[every.len() - 1..], "the newest: {newest}");
    let earlier = list(&stack, &format!("{robot_path}?since=2000-01-01T00:00:00")).await;
    assert_eq!(lines(&earlier), every, "{earlier}");
    let later = list(&stack, &format!("{robot_path}?since=2999-01-01T00:00:00Z")).await;
    assert_eq!(lines(&later), Vec::<String>::new(), "{later}");
    refused(&stack, &format!("{robot_path}?limit=10001"), "limit").await;
    refused(&stack, &format!("{robot_path}?since=soon"), "since").await;
    stack.stop().await;
}

/// Regression (issue 11): `GET /api/v1/robot-api-keys` paged over every key and then dropped
/// the ones of no robot, so a page could come back empty and `total` counted only the page.
#[tokio::test]
async fn the_key_lists_filter_by_robot_status_and_page() {
    let stack = Stack::start().await;
    for robot in ["bot-k", "bot-j"] {
        let body = json!({"robot_id": robot, "name": robot, "hostname": "h"});
        let (status, _, answer) = call(&stack, Method::POST, "/api/v1/robots/register", Some(body)).await;
        assert_eq!(status, 200, "{answer}");
    }
    let mut robot_keys = Vec::new();
    for (robot, name) in [("bot-k", "k1"), ("bot-k", "k2"), ("bot-j", "j1")] {
        let (status, made) =
            stack.post("/api/v1/robot-api-keys", &json!({"robot_id": robot, "name": name})).await;
        assert_eq!(status, 200, "{made}");
        robot_keys.push(made["key"]["id"].as_str().unwrap().to_owned());
    }
    // Newer than the robot keys, so they come first in the list.
    let mut api_keys = Vec::new();
    for name in ["a1", "a2", "a3"] {
        let (status, made) = stack.post("/api/v1/api-keys", &json!({"name": name, "role": "viewer"})).await;
        assert_eq!(status, 200, "{made}");
        api_keys.push(made["key"]["id"].as_str().unwrap().to_owned());
    }
    let (status, _) = stack.post(&format!("/api/v1/api-keys/{}/revoke", api_keys[0]), &json!({})).await;
    assert_eq!(status, 200);
    let ids = |body: &Value| values(&body["keys"], "id");
    let strs = |v: &[String]| -> BTreeSet<String> {
        v.iter().map(|s| Value::from(s.as_str()).to_string()).collect()
    };

    let all = list(&stack, "/api/v1/api-keys?limit=1000").await;
    let everything: BTreeSet<String> = strs(&api_keys).union(&strs(&robot_keys)).cloned().collect();
    assert!(ids(&all).is_superset(&everything), "{all}");
    let revoked = list(&stack, "/api/v1/api-keys?status=revoked").await;
    assert_eq!(ids(&revoked), strs(&api_keys[..1]), "{revoked}");
    let active = list(&stack, "/api/v1/api-keys?status=active&limit=1000").await;
    assert!(!ids(&active).contains(&Value::from(api_keys[0].as_str()).to_string()), "{active}");
    assert!(ids(&active).is_superset(&strs(&robot_keys)), "{active}");
    let of_k = list(&stack, "/api/v1/api-keys?robot_id=bot-k").await;
    assert_eq!(ids(&of_k), strs(&robot_keys[..2]), "{of_k}");
    let total = all["total"].as_u64().unwrap();
    let page = list(&stack, "/api/v1/api-keys?limit=2&offset=1").await;
    assert_eq!(
        (page["keys"].as_array().map(Vec::len), page["total"].as_u64()),
        (Some(2), Some(total)),
        "{page}"
    );
    let skipped: Vec<Value> = all["keys"].as_array().unwrap()[1..3].iter().map(|k| k["id"].clone()).collect();
    assert_eq!(page["keys"].as_array().unwrap().iter().map(|k| k["id"].clone()).collect::<Vec<_>>(), skipped);

    // The robot-key list pages over robot keys only (the three, and the stack's own robot key).
    let robots = list(&stack, "/api/v1/robot-api-keys").await;
    let mut all_robot_keys = robot_keys.clone();
    all_robot_keys.push(fleet_nats_auth::client::key_id(&stack.robot_key).unwrap());
    assert_eq!((ids(&robots), robots["total"].as_u64()), (strs(&all_robot_keys), Some(4)), "{robots}");
    let first = list(&stack, "/api/v1/robot-api-keys?limit=1").await;
    assert_eq!(
        (first["keys"].as_array().map(Vec::len), first["total"].as_u64()),
        (Some(1), Some(4)),
        "{first}"
    );
    let last = list(&stack, "/api/v1/robot-api-keys?limit=2&offset=2").await;
    let oldest = [robot_keys[0].clone(), all_robot_keys[3].clone()];
    assert_eq!(ids(&last), strs(&oldest), "the oldest robot keys: {last}");
    let of_j = list(&stack, "/api/v1/robot-api-keys?robot_id=bot-j&status=active").await;
    assert_eq!(ids(&of_j), strs(&robot_keys[2..]), "{of_j}");
    refused(&stack, "/api/v1/robot-api-keys?status=lost", "status").await;
    refused(&stack, "/api/v1/api-keys?limit=1001", "limit").await;
    refused(&stack, "/api/v1/api-keys?offset=-1", "offset").await;
    stack.stop().await;
}
