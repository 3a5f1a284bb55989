//! The tamper-evident audit trail end to end: a stack runs jobs, key and robot changes; the
//! leader seals the history into its hash chain; `audit verify` (the library function and the
//! binary) passes. Then history rows are edited, deleted and inserted with plain SQL, each on a
//! fresh database, and the verifier must name exactly that row. Also: who did it (`actor`) is the
//! submitting key for a submit and the robot for a completion.

mod common;

use std::time::Duration;

use common::{Secure, Stack, WAIT};
use fleet_orchestrator::audit::{self, BrokenKind, TenantAudit};
use fleet_schemas::keys::{Role, parse_key};
use fleet_tests::wait_for;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::PgPool;

const TENANT: &str = "default";
const ROBOT: &str = "audit-robot";

/// A stack whose history holds jobs submitted with an operator key and run by a robot, key
/// creations and a revocation, and a robot registered over the API, all sealed.
struct Trail {
    stack: Stack,
    pool: PgPool,
    admin_id: String,
    operator_id: String,
    jobs: Vec<String>,
    /// `audit.sealed` events seen from the start.
    sealed: async_nats::Subscriber,
}

fn ok(what: &str, (status, body): (u16, Value)) -> Value {
    assert_eq!(status, 200, "{what}: {body}");
    body
}

async fn trail() -> Trail {
    let mut stack = Stack::start_with(|c| c.audit_seal_interval = Duration::from_millis(100)).await;
    let client = stack.nats.client().await.unwrap();
    let sealed = client.subscribe(format!("fleet.events.{TENANT}.audit.sealed")).await.unwrap();
    stack.start_robot(stack.robot_config(ROBOT, &[]));
    stack.wait_robots_online(1).await;
    let secure = Secure::start(&stack).await;
    let admin = stack.cli_key(TENANT, Role::Admin, None).await;
    let admin_id = parse_key(&admin).unwrap().key_id;
    let key = |role: &'static str| {
        let (secure, admin) = (&secure, admin.clone());
        async move {
            let body = json!({"name": role, "role": role});
            let made =
                ok("key", secure.send(Method::POST, "/api/v1/api-keys", Some(&admin), Some(body)).await);
            (made["api_key"].as_str().unwrap().to_owned(), made["key"]["id"].as_str().unwrap().to_owned())
        }
    };
    let (operator, operator_id) = key("operator").await;
    let (_, viewer_id) = key("viewer").await;
    let mut jobs = Vec::new();
    for i in 0..3 {
        let body = json!({"workflow_name": format!("audited-{i}"),
                          "workflow_json": {"steps": [{"id": "a", "kind": "log", "message": "x"}]}});
        let answer =
            ok("submit", secure.send(Method::POST, "/api/v1/workflows", Some(&operator), Some(body)).await);
        jobs.push(answer["job_id"].as_str().unwrap().to_owned());
    }
    for id in &jobs {
        assert_eq!(stack.finished(id).await["status"], "completed");
    }
    let robot = json!({"robot_id": "audit-extra", "name": "extra", "hostname": "h"});
    ok("register", secure.send(Method::POST, "/api/v1/robots/register", Some(&admin), Some(robot)).await);
    let revoke = format!("/api/v1/api-keys/{viewer_id}/revoke");
    ok("revoke", secure.send(Method::POST, &revoke, Some(&admin), Some(json!({}))).await);

    let pool = stack.db.pool().await.unwrap();
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT kind FROM job_history").fetch_all(&pool).await.unwrap();
    for kind in
        ["job.submitted", "job.completed", "robot.registered", "robot.created", "key.created", "key.revoked"]
    {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} row in the history: {kinds:?}");
    }
    sealed_all(&pool).await;
    Trail { stack, pool, admin_id, operator_id, jobs, sealed }
}

/// Wait until every history row is sealed; returns the tenant's verdict.
async fn sealed_all(pool: &PgPool) -> TenantAudit {
    wait_for("every history row to be sealed", WAIT, || async {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM job_history").fetch_one(pool).await.ok()?;
        let report = one(audit::verify(pool, Some(TENANT), None).await.unwrap());
        assert_eq!(report.broken, None, "an untouched trail verifies: {report}");
        (report.sealed as i64 == rows && report.pending == 0).then_some(report)
    })
    .await
    .unwrap()
}

fn one(mut report: Vec<TenantAudit>) -> TenantAudit {
    assert_eq!(report.len(), 1, "{report:?}");
    report.remove(0)
}

/// The id of the history row of `job` of `kind`.
async fn row_of(pool: &PgPool, job: &str, kind: &str) -> i64 {
    sqlx::query_scalar("SELECT id FROM job_history WHERE job_id = $1::uuid AND kind = $2")
        .bind(job)
        .bind(kind)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Run `fleet-orchestrator audit verify` against the stack's database.
fn verify_binary(trail: &Trail, args: &[&str]) -> (Option<i32>, String) {
    let binary = fleet_tests::fleet_binary("fleet-orchestrator").unwrap();
    let out = std::process::Command::new(binary)
        .args(["audit", "verify"])
        .args(args)
        .env("DATABASE_URL", trail.stack.db.url())
        .env("NATS_URL", trail.stack.nats.url())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

/// Verify, expecting the trail broken at `history_id` with `kind`.
async fn broken_at(trail: &Trail, kind: BrokenKind, history_id: i64) {
    let report = one(audit::verify(&trail.pool, Some(TENANT), None).await.unwrap());
    let broken = report.broken.as_ref().unwrap_or_else(|| panic!("tampering went unnoticed: {report}"));
    assert_eq!((broken.kind, broken.history_id), (kind, Some(history_id)), "{report}");
}

#[tokio::test]
async fn a_sealed_trail_verifies_with_its_actors_and_its_head_published() {
    let mut trail = trail().await;
    let report = sealed_all(&trail.pool).await;
    let head = report.head.clone().unwrap();

    // Who did it: the operator's key submitted, the robot completed, the admin made keys.
    let actor = |id: i64| {
        let pool = trail.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT actor FROM job_history WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    for job in &trail.jobs {
        assert_eq!(actor(row_of(&trail.pool, job, "job.submitted").await).await, trail.operator_id);
        assert_eq!(actor(row_of(&trail.pool, job, "job.completed").await).await, ROBOT);
    }
    let key_actors: Vec<String> = sqlx::query_scalar(
        "SELECT actor FROM job_history WHERE kind IN ('key.created', 'key.revoked') ORDER BY id",
    )
    .fetch_all(&trail.pool)
    .await
    .unwrap();
    assert_eq!(key_actors[0], "cli", "the first admin key comes from the CLI");
    assert!(key_actors[1..].iter().all(|a| *a == trail.admin_id), "{key_actors:?}");

    // The head reached observers as an event.
    let seen = tokio::time::timeout(WAIT, async {
        while let Some(msg) = trail.sealed.next().await {
            let event: Value = serde_json::from_slice(&msg.payload).unwrap();
            if event["data"]["head_hash"] == head.as_str() {
                return event;
            }
        }
        panic!("the subscription ended");
    })
    .await
    .expect("an audit.sealed event with the head hash");
    assert_eq!(seen["type"], "audit.sealed");
    assert_eq!(seen["data"]["seq"], report.sealed);

    // The binary agrees, and checks a recorded head.
    let (code, out) = verify_binary(&trail, &["--tenant", TENANT, "--expect-head", &head]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("tenant {TENANT}: OK, {} rows sealed, head {head}", report.sealed)),
        "{out}"
    );
    let (code, out) = verify_binary(&trail, &["--tenant", TENANT, "--expect-head", &"ab".repeat(32)]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("chain rewritten"), "{out}");
    let (code, out) = verify_binary(&trail, &["--expect-head", "xyz"]);
    assert_eq!(code, Some(2), "--expect-head without --tenant is refused: {out}");
    trail.stack.stop().await;
}

#[tokio::test]
async fn an_edited_row_is_named() {
    let trail = trail().await;
    let row = row_of(&trail.pool, &trail.jobs[1], "job.completed").await;
    sqlx::query("UPDATE job_history SET data = data || '{\"status\": \"failed\"}' WHERE id = $1")
        .bind(row)
        .execute(&trail.pool)
        .await
        .unwrap();
    broken_at(&trail, BrokenKind::Edited, row).await;
    let (code, out) = verify_binary(&trail, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("tenant {TENANT}: BROKEN, edited: history row {row} ")), "{out}");
    trail.stack.stop().await;
}

#[tokio::test]
async fn a_deleted_row_is_named() {
    let trail = trail().await;
    let row = row_of(&trail.pool, &trail.jobs[0], "job.started").await;
    sqlx::query("DELETE FROM job_history WHERE id = $1").bind(row).execute(&trail.pool).await.unwrap();
    broken_at(&trail, BrokenKind::Deleted, row).await;
    trail.stack.stop().await;
}

#[tokio::test]
async fn a_row_inserted_out_of_order_is_named() {
    let trail = trail().await;
    // A completion forged below the sealed rows, the way someone would back-date history. The
    // outbox trigger queues it and the sealer may even chain it: it is named either way.
    let forged: i64 = sqlx::query_scalar(
        "INSERT INTO job_history (id, tenant, job_id, robot_id, seq, kind, attempt, data, actor, occurred_at)
         SELECT min(id) - 1, $1, NULL, $2, NULL, 'robot.command', NULL, '{}', 'system', min(occurred_at)
         FROM job_history RETURNING id",
    )
    .bind(TENANT)
    .bind(ROBOT)
    .fetch_one(&trail.pool)
    .await
    .unwrap();
    broken_at(&trail, BrokenKind::InsertedOutOfOrder, forged).await;
    // Once the sealer has had its turn, still named.
    wait_for("the forged row to leave the queue", WAIT, || async {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM audit_queue").fetch_one(&trail.pool).await.ok()?;
        (left == 0).then_some(())
    })
    .await
    .unwrap();
    broken_at(&trail, BrokenKind::InsertedOutOfOrder, forged).await;
    trail.stack.stop().await;
}
