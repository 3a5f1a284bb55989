//! The tamper-evident audit trail: every history row sealed into a per-tenant hash chain, and
//! the verifier that walks it (`fleet-orchestrator audit verify`).
//!
//! Why a sealer instead of chaining in the writer's transaction: chaining at write time needs
//! the tenant's chain head, so every job write of a tenant would queue behind one row lock, and
//! the hot path (one batched statement per kind) would lose its batching across tenants and its
//! throughput within one. Instead writers append history as before; the outbox trigger also
//! puts each new row's id into `audit_queue` in the writer's own transaction, and this leader-only
//! task seals what has committed every `audit_seal_interval`: per tenant, in id order, entry
//! `seq` = SHA-256(canonical row ‖ writer xid ‖ seal horizon ‖ previous entry's hash).
//!
//! Rows can commit out of id order (a later id committing first); the chain follows the order
//! the sealer saw them commit, which is fine for the hash. What must not pass is a row inserted
//! afterwards with an old id. Each queued row carries its writer's transaction id, and each
//! seal records its horizon (the first transaction id not started when its snapshot was taken).
//! A row that legitimately committed after a higher id was sealed had its transaction running
//! during that seal, so its xid is below that seal's horizon; a row inserted later has a newer
//! xid. The verifier flags the latter as inserted out of order. (One narrow window remains: a
//! writer whose id was drawn just before its transaction got an xid, with a seal in between; the
//! writers draw ids after their first write in all but the robot-row statements.)
//!
//! What the chain proves: an edited row no longer matches its hash, a deleted row leaves its
//! entry without a row, a deleted entry leaves a gap in `seq`, an inserted row has no entry or an
//! entry that is out of order. Someone who can write the database can also recompute the whole
//! chain; against that, each seal publishes `fleet.events.<tenant>.audit.sealed` with the head
//! hash, an outside observer records heads, and `--expect-head` checks a recorded head is still
//! in the chain.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use fleet_schemas::TenantId;
use fleet_schemas::api::ApiRequest;
use fleet_schemas::event::{EVENT_VERSION, Event};
use futures::TryStreamExt;
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Postgres, Row, Transaction};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Core;
use crate::leader::fenced;

/// The actor of rows no caller caused (sweeper, admission, watchdog): the column's default.
pub const SYSTEM: &str = "system";
/// The actor of an API request that came without a key (dev mode, internal callers).
pub const ANONYMOUS: &str = "anonymous";
/// Longest actor kept; key ids and robot ids are far shorter, so only garbage is cut.
const MAX_ACTOR: usize = 128;
/// `prev_hash` of a tenant's first entry.
pub const GENESIS: [u8; 32] = [0; 32];
/// Rows sealed per transaction: one seal stays short (its queue rows are locked until commit)
/// and a backlog is worked off in a few rounds without waiting for the interval.
const BATCH: i64 = 2000;
/// Domain separation of the hash, so the encoding can change (v2) without ambiguity.
const DOMAIN: &[u8] = b"fleet-audit-v1\0";

/// The actor recorded for an API request: the caller's key id as the gateway set it.
pub fn actor_of<T>(req: &ApiRequest<T>) -> String {
    match req.actor.as_deref().map(str::trim) {
        Some(a) if !a.is_empty() => a.chars().take(MAX_ACTOR).collect(),
        _ => ANONYMOUS.to_owned(),
    }
}

/// A history row as hashed.
#[derive(Debug, Clone, sqlx::FromRow)]
struct HistoryRow {
    id: i64,
    tenant: String,
    job_id: Option<Uuid>,
    robot_id: Option<String>,
    seq: Option<i32>,
    kind: String,
    attempt: Option<i32>,
    /// `data::text`: PostgreSQL prints a jsonb value one way only (keys sorted, fixed spacing).
    data: String,
    occurred_us: i64,
    actor: String,
}

/// The columns of [`HistoryRow`], for `SELECT … FROM job_history h`.
const ROW_COLUMNS: &str =
    "h.id, h.tenant, h.job_id, h.robot_id, h.seq, h.kind, h.attempt, h.data::text AS data,
    (extract(epoch FROM h.occurred_at) * 1000000)::int8 AS occurred_us, h.actor";

/// Length-prefixed fields, so no two different rows encode the same bytes.
struct Canonical(Sha256);

impl Canonical {
    fn bytes(&mut self, b: &[u8]) {
        self.0.update((b.len() as u64).to_be_bytes());
        self.0.update(b);
    }
    fn opt(&mut self, b: Option<&[u8]>) {
        match b {
            Some(b) => {
                self.0.update([1]);
                self.bytes(b);
            }
            None => self.0.update([0]),
        }
    }
}

/// The hash of chain entry `seq` over `row`, written by transaction `xid`, sealed under
/// `horizon`, following `prev`.
fn entry_hash(prev: &[u8], seq: i64, row: &HistoryRow, xid: i64, horizon: i64) -> [u8; 32] {
    let mut c = Canonical(Sha256::new());
    c.bytes(DOMAIN);
    c.bytes(prev);
    c.bytes(&seq.to_be_bytes());
    c.bytes(&row.id.to_be_bytes());
    c.bytes(row.tenant.as_bytes());
    c.opt(row.job_id.as_ref().map(|j| j.as_bytes().as_slice()));
    c.opt(row.robot_id.as_deref().map(str::as_bytes));
    c.opt(row.seq.map(i32::to_be_bytes).as_ref().map(|b| b.as_slice()));
    c.bytes(row.kind.as_bytes());
    c.opt(row.attempt.map(i32::to_be_bytes).as_ref().map(|b| b.as_slice()));
    c.bytes(row.data.as_bytes());
    c.bytes(&row.occurred_us.to_be_bytes());
    c.bytes(row.actor.as_bytes());
    c.bytes(&xid.to_be_bytes());
    c.bytes(&horizon.to_be_bytes());
    c.0.finalize().into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Record a change of API key `key_id` (`key.created`, `key.revoked`, …) as a history row, so
/// it is relayed as an event and sealed like any other. `data` never holds a secret.
pub async fn key_changed(
    pool: &PgPool,
    tenant: &TenantId,
    kind: &str,
    key_id: &str,
    actor: &str,
    mut data: serde_json::Value,
) -> Result<(), sqlx::Error> {
    if let Some(map) = data.as_object_mut() {
        map.insert("key_id".into(), json!(key_id));
    }
    sqlx::query("INSERT INTO job_history (tenant, kind, data, actor) VALUES ($1, $2, $3, $4)")
        .bind(tenant.as_str())
        .bind(kind)
        .bind(sqlx::types::Json(data))
        .bind(actor)
        .execute(pool)
        .await?;
    Ok(())
}

// ----- the sealer -----------------------------------------------------------------------------

/// Seal every `audit_seal_interval` until `token` (leader only).
pub async fn run(core: Arc<Core>, token: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let wait = match seal(&core).await {
            Ok(n) if n as i64 == BATCH => continue,
            Ok(_) => {
                backoff = Duration::from_millis(100);
                core.config.audit_seal_interval
            }
            Err(e) => {
                tracing::warn!(error = %e, "audit sealer failed; retrying");
                backoff = (backoff * 2).min(Duration::from_secs(5));
                backoff
            }
        };
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// A tenant's chain head after a seal.
struct Sealed {
    tenant: String,
    seq: i64,
    hash: [u8; 32],
    rows: usize,
}

/// Seal one batch of committed rows; returns how many queue entries it took.
pub async fn seal(core: &Core) -> anyhow::Result<usize> {
    let epoch = core.leadership.epoch();
    if epoch == 0 {
        return Ok(0);
    }
    let mut tx = core.store.pool.begin().await?;
    // One snapshot for the horizon and the rows, so every row read is below the horizon.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ").execute(&mut *tx).await?;
    let horizon: i64 = sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8")
        .fetch_one(&mut *tx)
        .await?;
    let queued: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT id, xid::text::int8 FROM audit_queue ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    if queued.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = queued.iter().map(|q| q.0).collect();
    let rows: Vec<HistoryRow> = sqlx::query_as(&format!(
        "SELECT {ROW_COLUMNS} FROM job_history h WHERE h.id = ANY($1) ORDER BY h.id"
    ))
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    if rows.len() < ids.len() {
        // Deleted before it was sealed: nothing left to seal. The verifier cannot see such a
        // row; say so where an operator looks.
        tracing::warn!(missing = ids.len() - rows.len(), "history rows deleted before they were sealed");
    }
    let xids: std::collections::HashMap<i64, i64> = queued.into_iter().collect();
    let sealed = chain(&mut tx, &rows, &xids, horizon, epoch).await?;
    sqlx::query("DELETE FROM audit_queue WHERE id = ANY($1)").bind(&ids).execute(&mut *tx).await?;
    tx.commit().await?;
    publish(core, &sealed).await;
    Ok(ids.len())
}

/// Append `rows` (in id order) to their tenants' chains.
async fn chain(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[HistoryRow],
    xids: &std::collections::HashMap<i64, i64>,
    horizon: i64,
    epoch: i64,
) -> anyhow::Result<Vec<Sealed>> {
    let mut tenants: Vec<String> = rows.iter().map(|r| r.tenant.clone()).collect();
    tenants.sort();
    tenants.dedup();
    let heads: Vec<(String, Option<i64>, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT t.tenant, c.seq, c.hash FROM unnest($1::text[]) AS t(tenant)
         LEFT JOIN LATERAL (SELECT seq, hash FROM audit_chain WHERE audit_chain.tenant = t.tenant
                            ORDER BY seq DESC LIMIT 1) c ON true",
    )
    .bind(&tenants)
    .fetch_all(&mut **tx)
    .await?;
    let mut sealed: Vec<Sealed> = heads
        .into_iter()
        .map(|(tenant, seq, hash)| {
            let hash = hash.and_then(|h| <[u8; 32]>::try_from(h).ok()).unwrap_or(GENESIS);
            Sealed { tenant, seq: seq.unwrap_or(0), hash, rows: 0 }
        })
        .collect();
    let mut cols = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for row in rows {
        let Some(head) = sealed.iter_mut().find(|s| s.tenant == row.tenant) else { continue };
        let xid = xids.get(&row.id).copied().unwrap_or_default();
        let seq = head.seq + 1;
        let hash = entry_hash(&head.hash, seq, row, xid, horizon);
        cols.0.push(row.tenant.clone());
        cols.1.push(seq);
        cols.2.push(row.id);
        cols.3.push(xid);
        cols.4.push(hash.to_vec());
        cols.5.push(head.hash.to_vec());
        *head = Sealed { tenant: row.tenant.clone(), seq, hash, rows: head.rows + 1 };
    }
    let inserted = sqlx::query(&format!(
        "INSERT INTO audit_chain (tenant, seq, history_id, xid, horizon, hash, prev_hash)
         SELECT tenant, seq, history_id, x::text::xid8, $7::text::xid8, hash, prev
         FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::bytea[], $6::bytea[])
             AS u(tenant, seq, history_id, x, hash, prev)
         WHERE {}",
        fenced(8)
    ))
    .bind(&cols.0)
    .bind(&cols.1)
    .bind(&cols.2)
    .bind(&cols.3)
    .bind(&cols.4)
    .bind(&cols.5)
    .bind(horizon)
    .bind(epoch)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    anyhow::ensure!(inserted as usize == cols.0.len(), "no longer the leader; seal not written");
    Ok(sealed.into_iter().filter(|s| s.rows > 0).collect())
}

/// Tell observers each tenant's new head. Best effort: the chain is committed, and the next
/// seal publishes a newer head.
async fn publish(core: &Core, sealed: &[Sealed]) {
    for s in sealed {
        let Ok(tenant) = TenantId::new(s.tenant.as_str()) else { continue };
        let event = Event {
            v: EVENT_VERSION,
            id: s.seq,
            kind: "audit.sealed".to_owned(),
            tenant,
            occurred_at: OffsetDateTime::now_utc(),
            job_id: None,
            robot_id: None,
            seq: None,
            attempt: None,
            data: json!({ "seq": s.seq, "head_hash": hex(&s.hash), "rows": s.rows }),
        };
        let Ok(payload) = serde_json::to_vec(&event) else { continue };
        let msg = PublishMessage::build()
            .message_id(format!("audit.{}.{}", s.tenant, s.seq))
            .payload(payload.into());
        let sent = match core.fabric.js.send_publish(event.subject(), msg).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = sent {
            tracing::warn!(tenant = %s.tenant, seq = s.seq, error = %e, "could not publish the audit head");
        }
    }
}

// ----- the verifier ---------------------------------------------------------------------------

/// What is wrong with a tenant's trail, at the first row found broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokenKind {
    /// The row no longer matches its sealed hash.
    Edited,
    /// A sealed row is gone (or its chain entry is).
    Deleted,
    /// A row that was not written the way history is written: no chain entry and not queued,
    /// or queued or sealed after a later id although it was written after that was sealed.
    InsertedOutOfOrder,
    /// `--expect-head` is not in the chain: the chain was rewritten or cut back.
    HeadMissing,
}

impl fmt::Display for BrokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BrokenKind::Edited => "edited",
            BrokenKind::Deleted => "deleted",
            BrokenKind::InsertedOutOfOrder => "inserted out of order",
            BrokenKind::HeadMissing => "chain rewritten",
        })
    }
}

/// The first broken row of a tenant's trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub kind: BrokenKind,
    /// The history row (`job_history.id`), when one is to blame.
    pub history_id: Option<i64>,
    /// The chain entry, when the row has one.
    pub seq: Option<i64>,
    pub detail: String,
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(id) = self.history_id {
            write!(f, ": history row {id}")?;
        }
        if let Some(seq) = self.seq {
            write!(f, " (chain seq {seq})")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// The verdict on one tenant's trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantAudit {
    pub tenant: String,
    /// Chain entries checked.
    pub sealed: u64,
    /// Committed rows not sealed yet (in `audit_queue`, in order).
    pub pending: u64,
    /// The hash of the last entry checked (hex).
    pub head: Option<String>,
    pub broken: Option<Broken>,
}

impl fmt::Display for TenantAudit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.broken {
            None => write!(
                f,
                "tenant {}: OK, {} rows sealed, head {}, {} pending",
                self.tenant,
                self.sealed,
                self.head.as_deref().unwrap_or("(empty chain)"),
                self.pending
            ),
            Some(b) => write!(f, "tenant {}: BROKEN, {b}", self.tenant),
        }
    }
}

/// Seals seen so far while walking a chain: (horizon, highest history id sealed up to it), both
/// non-decreasing along the chain.
#[derive(Default)]
struct Seals(Vec<(i64, i64)>);

impl Seals {
    fn push(&mut self, horizon: i64, id: i64) {
        match self.0.last_mut() {
            Some((h, max)) if *h == horizon => *max = (*max).max(id),
            Some((_, max)) => {
                let max = (*max).max(id);
                self.0.push((horizon, max));
            }
            None => self.0.push((horizon, id)),
        }
    }

    /// A row `id` written by `xid`, seen after these seals, fits only if no seal that was taken
    /// before its transaction began (horizon ≤ xid) already held a higher id. Returns that id.
    fn overtaken(&self, id: i64, xid: i64) -> Option<i64> {
        let before = self.0.partition_point(|(h, _)| *h <= xid);
        let (_, max) = *self.0.get(before.checked_sub(1)?)?;
        (max > id).then_some(max)
    }
}

/// Walk the chain of `tenant` (every tenant with history or a chain when `None`) against the
/// live rows, in one snapshot. `expect_head` (hex) must be an entry of the walked chain.
pub async fn verify(
    pool: &PgPool,
    tenant: Option<&str>,
    expect_head: Option<&str>,
) -> Result<Vec<TenantAudit>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
    let tenants: Vec<String> = match tenant {
        Some(t) => vec![t.to_owned()],
        None => {
            sqlx::query_scalar(
                "SELECT tenant FROM (SELECT DISTINCT tenant FROM job_history
                                     UNION SELECT DISTINCT tenant FROM audit_chain) t ORDER BY tenant",
            )
            .fetch_all(&mut *tx)
            .await?
        }
    };
    let mut out = Vec::with_capacity(tenants.len());
    for t in tenants {
        out.push(verify_tenant(&mut tx, t, expect_head.map(str::to_ascii_lowercase)).await?);
    }
    tx.rollback().await?;
    Ok(out)
}

async fn verify_tenant(
    tx: &mut Transaction<'_, Postgres>,
    tenant: String,
    expect_head: Option<String>,
) -> Result<TenantAudit, sqlx::Error> {
    let mut audit = TenantAudit { tenant, sealed: 0, pending: 0, head: None, broken: None };
    let mut seals = Seals::default();
    let mut prev = GENESIS.to_vec();
    let mut head_found = expect_head.is_none();
    {
        let sql = format!(
            "SELECT c.seq AS chain_seq, c.history_id, c.xid::text::int8 AS xid, c.horizon::text::int8 AS horizon, c.hash,
                    h.id IS NOT NULL AS present, {ROW_COLUMNS}
             FROM audit_chain c LEFT JOIN job_history h ON h.id = c.history_id
             WHERE c.tenant = $1 ORDER BY c.seq"
        );
        let mut entries = sqlx::query(&sql).bind(&audit.tenant).fetch(&mut **tx);
        while let Some(e) = entries.try_next().await? {
            let seq: i64 = e.get("chain_seq");
            let history_id: i64 = e.get("history_id");
            let (xid, horizon): (i64, i64) = (e.get("xid"), e.get("horizon"));
            let stored: Vec<u8> = e.get("hash");
            let at =
                |kind, detail: String| Broken { kind, history_id: Some(history_id), seq: Some(seq), detail };
            let expected = audit.sealed as i64 + 1;
            if seq != expected {
                audit.broken = Some(Broken {
                    kind: BrokenKind::Deleted,
                    history_id: None,
                    seq: Some(expected),
                    detail: format!("chain entries {expected} to {} are missing", seq - 1),
                });
                break;
            }
            if !e.get::<bool, _>("present") {
                audit.broken = Some(at(BrokenKind::Deleted, "the row was sealed and is gone".into()));
                break;
            }
            let row = <HistoryRow as sqlx::FromRow<_>>::from_row(&e)?;
            if row.tenant != audit.tenant || entry_hash(&prev, seq, &row, xid, horizon).as_slice() != stored {
                audit.broken = Some(at(BrokenKind::Edited, "the row does not match its sealed hash".into()));
                break;
            }
            if let Some(later) = seals.overtaken(row.id, xid) {
                audit.broken = Some(at(
                    BrokenKind::InsertedOutOfOrder,
                    format!("written after row {later} was sealed, yet with an older id"),
                ));
                break;
            }
            seals.push(horizon, row.id);
            head_found |= expect_head.as_deref() == Some(hex(&stored).as_str());
            prev = stored;
            audit.sealed += 1;
        }
    }
    audit.head = (audit.sealed > 0).then(|| hex(&prev));
    if audit.broken.is_some() {
        return Ok(audit);
    }
    // Rows without an entry: legitimately only committed rows waiting in the queue.
    let unsealed: Vec<(i64, Option<i64>)> = sqlx::query_as(
        "SELECT h.id, q.xid::text::int8 FROM job_history h LEFT JOIN audit_queue q ON q.id = h.id
         WHERE h.tenant = $1 AND NOT EXISTS (SELECT 1 FROM audit_chain c WHERE c.history_id = h.id)
         ORDER BY h.id",
    )
    .bind(&audit.tenant)
    .fetch_all(&mut **tx)
    .await?;
    for (id, xid) in unsealed {
        let broken = |detail: String| Broken {
            kind: BrokenKind::InsertedOutOfOrder,
            history_id: Some(id),
            seq: None,
            detail,
        };
        match xid {
            None => {
                audit.broken = Some(broken("no chain entry and not queued for sealing".into()));
                break;
            }
            Some(xid) => {
                if let Some(later) = seals.overtaken(id, xid) {
                    audit.broken =
                        Some(broken(format!("written after row {later} was sealed, yet with an older id")));
                    break;
                }
                audit.pending += 1;
            }
        }
    }
    if audit.broken.is_none() && !head_found {
        audit.broken = Some(Broken {
            kind: BrokenKind::HeadMissing,
            history_id: None,
            seq: None,
            detail: format!(
                "the recorded head {} is not in the chain",
                expect_head.as_deref().unwrap_or_default()
            ),
        });
    }
    Ok(audit)
}

/// For `fleet-orchestrator audit verify`: connect (no NATS needed), verify, print one line per
/// tenant; `Ok(false)` when any trail is broken.
pub async fn verify_with_config(
    config: &crate::Config,
    tenant: Option<&str>,
    expect_head: Option<&str>,
) -> anyhow::Result<bool> {
    use anyhow::Context;
    let pool = crate::cli_pool(config).await?;
    let report = verify(&pool, tenant, expect_head).await.context("reading the audit trail")?;
    pool.close().await;
    if report.is_empty() {
        println!("no history yet{}", tenant.map(|t| format!(" for tenant {t}")).unwrap_or_default());
    }
    for t in &report {
        println!("{t}");
    }
    Ok(report.iter().all(|t| t.broken.is_none()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> HistoryRow {
        HistoryRow {
            id: 7,
            tenant: "a".into(),
            job_id: None,
            robot_id: Some("r1".into()),
            seq: None,
            kind: "robot.registered".into(),
            attempt: None,
            data: "{}".into(),
            occurred_us: 1,
            actor: "r1".into(),
        }
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = entry_hash(&GENESIS, 1, &row(), 10, 11);
        let mut moved = row();
        moved.actor = "k1".into();
        assert_ne!(entry_hash(&GENESIS, 1, &moved, 10, 11), base);
        // The boundary between fields matters: "r1" + "" differs from "r" + "1".
        let mut shifted = row();
        shifted.robot_id = Some("r".into());
        shifted.kind = "1robot.registered".into();
        assert_ne!(entry_hash(&GENESIS, 1, &shifted, 10, 11), base);
        assert_ne!(entry_hash(&GENESIS, 2, &row(), 10, 11), base);
        assert_ne!(entry_hash(&GENESIS, 1, &row(), 9, 11), base);
        assert_ne!(entry_hash(&base, 1, &row(), 10, 11), base);
    }

    #[test]
    fn a_row_written_after_a_seal_with_an_older_id_is_overtaken() {
        let mut seals = Seals::default();
        seals.push(100, 5);
        seals.push(100, 9);
        seals.push(120, 12);
        // Its transaction ran during the first seal (xid 99 < 100): a late commit, fine.
        assert_eq!(seals.overtaken(8, 99), None);
        // Began after the first seal, yet older than what that seal held: inserted.
        assert_eq!(seals.overtaken(8, 105), Some(9));
        assert_eq!(seals.overtaken(3, 130), Some(12));
        // A new id is never overtaken.
        assert_eq!(seals.overtaken(13, 130), None);
    }

    #[test]
    fn actors_come_from_the_request_or_are_anonymous() {
        let req = |actor: Option<&str>| ApiRequest {
            v: 1,
            request_id: fleet_schemas::RequestId::new(),
            tenant: TenantId::default_tenant(),
            deadline_unix_ms: 0,
            body: (),
            actor: actor.map(str::to_owned),
        };
        assert_eq!(actor_of(&req(Some("k1"))), "k1");
        assert_eq!(actor_of(&req(Some("  "))), ANONYMOUS);
        assert_eq!(actor_of(&req(None)), ANONYMOUS);
        assert_eq!(actor_of(&req(Some(&"x".repeat(500)))).len(), MAX_ACTOR);
    }
}
