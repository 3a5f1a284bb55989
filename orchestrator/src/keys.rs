//! API keys: creation (once shown, then only a hash is kept), verification for the gateway,
//! listing, revocation, rotation.
//!
//! Keys are not job state, so these writes are not leader-fenced: any instance may create one
//! (`fleet-orchestrator api-key create` runs without NATS), and a revocation is a plain update.
//! Verification is one indexed lookup that also records when the key was last used; the gateway
//! caches the answer for a few seconds, which bounds how late a revocation takes effect.
//!
//! Robot keys (role `robot`) may be bound to a robot id and grant capabilities; a robot bound to
//! one ([`crate::store::Store::bind_robot_key`]) claims only what it offers that the key grants.
//! A revocation (or deletion, or expiry, found by the leader's sweep) must also reach robots
//! already running with the key, which a key check at the gateway alone would not do:
//! [`on_revoked`] takes them offline and offers their running jobs again at once.

use fleet_schemas::TenantId;
use fleet_schemas::api::{
    ApiError, ApiRequest, ApiResult, CreateKey, CreatedKey, KeyAction, KeyIdentity, KeyList, KeyView,
    ListKeys, VerifyKey,
};
use fleet_schemas::keys::{self, Rate, RatePeriod, Role};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use crate::Core;
use crate::store::StoreError;

/// Longest key name.
const MAX_NAME: usize = 200;

const SELECT: &str = "SELECT k.*, r.name AS robot_name FROM api_keys k
    LEFT JOIN robots r ON r.tenant = k.tenant AND r.robot_id = k.robot_id";

/// A key's own rate from its two columns (`None`: the gateway's default). The table's checks
/// keep them both set or both null, with a known period.
fn stored_rate(requests: Option<i32>, period_s: Option<i32>) -> Option<Rate> {
    let requests = u32::try_from(requests?).ok().filter(|n| *n > 0)?;
    let period = RatePeriod::from_seconds(u32::try_from(period_s?).ok()?)?;
    Some(Rate { requests, period })
}

/// The two columns of a key's own rate.
fn rate_columns(rate: Option<Rate>) -> (Option<i32>, Option<i32>) {
    match rate {
        // `Rate::MAX_REQUESTS` fits an `integer`, and so does every period.
        Some(r) => (i32::try_from(r.requests).ok(), i32::try_from(r.period.seconds()).ok()),
        None => (None, None),
    }
}

fn view(row: &PgRow) -> KeyView {
    let revoked: Option<time::OffsetDateTime> = row.get("revoked_at");
    let expires_at: Option<time::OffsetDateTime> = row.get("expires_at");
    let status = if revoked.is_some() {
        "revoked"
    } else if expires_at.is_some_and(|e| e <= time::OffsetDateTime::now_utc()) {
        "expired"
    } else {
        "active"
    };
    let name: String = row.get("name");
    let role: String = row.get("role");
    KeyView {
        capabilities: row.get("capabilities"),
        id: row.get("key_id"),
        key_name: name.clone(),
        name,
        description: row.get("description"),
        role: Role::parse(&role).unwrap_or(Role::Viewer),
        status: status.to_owned(),
        robot_id: row.get("robot_id"),
        robot_name: row.get("robot_name"),
        created_at: row.get("created_at"),
        expires_at,
        last_used_at: row.get("last_used_at"),
        last_used_ip: row.get("last_used_ip"),
        rate_limit: stored_rate(row.get("rate_limit_requests"), row.get("rate_limit_period_s")),
    }
}

/// Create a key; returns the raw key (shown once) and its record.
pub async fn create(pool: &PgPool, tenant: &TenantId, req: &CreateKey) -> Result<CreatedKey, ApiError> {
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME {
        return Err(ApiError::Invalid {
            field: "name".into(),
            message: format!("must be 1 to {MAX_NAME} characters"),
        });
    }
    if req.expires_at.is_some_and(|e| e <= time::OffsetDateTime::now_utc()) {
        return Err(ApiError::Invalid {
            field: "expires_at".into(),
            message: "must be in the future".into(),
        });
    }
    if let Some(rate) = req.rate_limit
        && (rate.requests == 0 || rate.requests > Rate::MAX_REQUESTS)
    {
        return Err(ApiError::Invalid {
            field: "rate_limit".into(),
            message: format!("must be {}", Rate::RULE),
        });
    }
    if req.role != Role::Robot && (req.capabilities.is_some() || req.robot_id.is_some()) {
        return Err(ApiError::Invalid {
            field: if req.robot_id.is_some() { "robot_id" } else { "capabilities" }.into(),
            message: "only a robot key is bound to a robot or grants capabilities".into(),
        });
    }
    let (rate_requests, rate_period_s) = rate_columns(req.rate_limit);
    let (key_id, secret, full) = keys::new_key();
    let granted: Option<Vec<String>> = req.capabilities.as_ref().map(|caps| {
        let mut names: Vec<String> = caps.iter().map(|c| c.as_str().to_owned()).collect();
        names.sort();
        names.dedup();
        names
    });
    sqlx::query(
        "INSERT INTO api_keys (key_id, tenant, name, description, role, secret_sha256, robot_id, expires_at,
                               rate_limit_requests, rate_limit_period_s, capabilities)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(&key_id)
    .bind(tenant.as_str())
    .bind(name)
    .bind(req.description.as_deref())
    .bind(req.role.as_str())
    .bind(keys::secret_hash(&secret))
    .bind(req.robot_id.as_ref().map(|r| r.as_str()))
    .bind(req.expires_at)
    .bind(rate_requests)
    .bind(rate_period_s)
    .bind(granted)
    .execute(pool)
    .await
    .map_err(StoreError::from)?;
    let key = get(pool, tenant, &key_id)
        .await?
        .ok_or_else(|| ApiError::Internal { message: "key vanished".into() })?;
    Ok(CreatedKey { api_key: full, key })
}

async fn get(pool: &PgPool, tenant: &TenantId, key_id: &str) -> Result<Option<KeyView>, ApiError> {
    let row = sqlx::query(&format!("{SELECT} WHERE k.tenant = $1 AND k.key_id = $2"))
        .bind(tenant.as_str())
        .bind(key_id)
        .fetch_optional(pool)
        .await
        .map_err(StoreError::from)?;
    Ok(row.as_ref().map(view))
}

pub async fn verify(core: &Core, req: ApiRequest<VerifyKey>) -> ApiResult<KeyIdentity> {
    type Row = (String, String, Option<i32>, Option<i32>, Option<String>, Option<Vec<String>>);
    let row: Option<Row> = sqlx::query_as(
        "UPDATE api_keys SET last_used_at = now()
         WHERE key_id = $1 AND secret_sha256 = $2 AND revoked_at IS NULL
           AND (expires_at IS NULL OR expires_at > now())
         RETURNING tenant, role, rate_limit_requests, rate_limit_period_s, robot_id, capabilities",
    )
    .bind(&req.body.key_id)
    .bind(&req.body.secret_sha256)
    .fetch_optional(&core.store.pool)
    .await
    .map_err(StoreError::from)?;
    let (tenant, role, rate_requests, rate_period_s, robot_id, capabilities) =
        row.ok_or_else(|| ApiError::NotFound { what: "key".into() })?;
    Ok(KeyIdentity {
        key_id: req.body.key_id,
        tenant: TenantId::new(tenant).map_err(|e| ApiError::Internal { message: e.to_string() })?,
        role: Role::parse(&role).unwrap_or(Role::Viewer),
        rate_limit: stored_rate(rate_requests, rate_period_s),
        // Stored through `RobotId`, so it parses; a key whose robot id does not is a user key.
        robot_id: robot_id.and_then(|r| fleet_schemas::RobotId::new(r).ok()),
        // Stored through `Capability`, so they parse.
        capabilities: capabilities
            .map(|caps| caps.into_iter().filter_map(|c| fleet_schemas::Capability::new(c).ok()).collect()),
    })
}

pub async fn create_api(core: &Core, req: ApiRequest<CreateKey>) -> ApiResult<CreatedKey> {
    // A robot key may be made before its robot exists (it enrols with it); a user key bound to
    // a robot (older Canvas robot keys) names one that does.
    if let Some(robot) = &req.body.robot_id
        && req.body.role != Role::Robot
        && !core.store.robot_exists(&req.tenant, robot).await?
    {
        return Err(ApiError::Invalid {
            field: "robot_id".into(),
            message: format!("no robot {robot} in this tenant"),
        });
    }
    let created = create(&core.store.pool, &req.tenant, &req.body).await?;
    let k = &created.key;
    let data = serde_json::json!({ "name": k.name, "role": k.role.as_str(), "robot_id": k.robot_id });
    let actor = crate::audit::actor_of(&req);
    crate::audit::key_changed(&core.store.pool, &req.tenant, "key.created", &k.id, &actor, data)
        .await
        .map_err(StoreError::from)?;
    core.wake_relay.notify_one();
    Ok(created)
}

pub async fn list(core: &Core, req: ApiRequest<ListKeys>) -> ApiResult<KeyList> {
    let q = &req.body;
    let rows = sqlx::query(&format!(
        "{SELECT} WHERE k.tenant = $1 AND ($2::text IS NULL OR k.robot_id = $2)
           AND (NOT $3 OR k.robot_id IS NOT NULL OR k.role = 'robot')
         ORDER BY k.created_at DESC, k.key_id"
    ))
    .bind(req.tenant.as_str())
    .bind(q.robot_id.as_deref())
    .bind(q.robot_keys)
    .fetch_all(&core.store.pool)
    .await
    .map_err(StoreError::from)?;
    let all: Vec<KeyView> =
        rows.iter().map(view).filter(|k| q.status.as_deref().is_none_or(|s| k.status == s)).collect();
    let total = all.len() as u32;
    let keys = all.into_iter().skip(q.offset as usize).take(q.limit.clamp(1, 1000) as usize).collect();
    Ok(KeyList { keys, total })
}

pub async fn revoke(core: &Core, req: ApiRequest<KeyAction>) -> ApiResult<KeyView> {
    let n = sqlx::query(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()), revoke_reason = coalesce($3, revoke_reason)
         WHERE tenant = $1 AND key_id = $2",
    )
    .bind(req.tenant.as_str())
    .bind(&req.body.id)
    .bind(req.body.reason.as_deref())
    .execute(&core.store.pool)
    .await
    .map_err(StoreError::from)?
    .rows_affected();
    if n == 0 {
        return Err(ApiError::NotFound { what: "key".into() });
    }
    crate::callout::announce_revoked(&core.store.pool, &crate::callout::robot_user(&req.body.id)).await;
    revoke_lapsed(core).await;
    let data = serde_json::json!({ "reason": req.body.reason });
    key_history(core, &req, "key.revoked", data).await?;
    get(&core.store.pool, &req.tenant, &req.body.id)
        .await?
        .ok_or_else(|| ApiError::NotFound { what: "key".into() })
}

/// A new secret for the same key record; the old secret stops working at once.
pub async fn rotate(core: &Core, req: ApiRequest<KeyAction>) -> ApiResult<CreatedKey> {
    let (_, secret, _) = keys::new_key();
    let n = sqlx::query(
        "UPDATE api_keys SET secret_sha256 = $3 WHERE tenant = $1 AND key_id = $2 AND revoked_at IS NULL",
    )
    .bind(req.tenant.as_str())
    .bind(&req.body.id)
    .bind(keys::secret_hash(&secret))
    .execute(&core.store.pool)
    .await
    .map_err(StoreError::from)?
    .rows_affected();
    if n == 0 {
        return Err(ApiError::NotFound { what: "active key".into() });
    }
    crate::callout::announce_revoked(&core.store.pool, &crate::callout::robot_user(&req.body.id)).await;
    key_history(core, &req, "key.rotated", serde_json::json!({})).await?;
    let key = get(&core.store.pool, &req.tenant, &req.body.id)
        .await?
        .ok_or_else(|| ApiError::NotFound { what: "key".into() })?;
    Ok(CreatedKey { api_key: format!("{}{}_{secret}", keys::KEY_PREFIX, req.body.id), key })
}

pub async fn delete(core: &Core, req: ApiRequest<KeyAction>) -> ApiResult<KeyView> {
    let key = get(&core.store.pool, &req.tenant, &req.body.id)
        .await?
        .ok_or_else(|| ApiError::NotFound { what: "key".into() })?;
    sqlx::query("DELETE FROM api_keys WHERE tenant = $1 AND key_id = $2")
        .bind(req.tenant.as_str())
        .bind(&req.body.id)
        .execute(&core.store.pool)
        .await
        .map_err(StoreError::from)?;
    crate::callout::announce_revoked(&core.store.pool, &crate::callout::robot_user(&req.body.id)).await;
    revoke_lapsed(core).await;
    key_history(core, &req, "key.deleted", serde_json::json!({ "name": key.name })).await?;
    Ok(key)
}

/// The history row of a change to the key `req` names (see [`crate::audit`]).
async fn key_history(
    core: &Core,
    req: &ApiRequest<KeyAction>,
    kind: &str,
    data: serde_json::Value,
) -> ApiResult<()> {
    let actor = crate::audit::actor_of(req);
    crate::audit::key_changed(&core.store.pool, &req.tenant, kind, &req.body.id, &actor, data)
        .await
        .map_err(StoreError::from)?;
    core.wake_relay.notify_one();
    Ok(())
}

/// Robot keys stopped working (revoked, deleted or expired): the robots bound to them go offline
/// now and their running jobs are offered again at once; their bindings are marked revoked, so
/// they can neither register, claim nor beat again with these keys. This is the one place a
/// revocation takes effect on robots: the NATS side (kicking the robot's connection) belongs here
/// too.
pub async fn on_revoked(core: &Core, key_ids: &[String]) {
    if key_ids.is_empty() {
        return;
    }
    let robots = match core.store.revoke_bindings(key_ids).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "could not mark the bindings of revoked robot keys");
            return;
        }
    };
    for (tenant, robot) in robots {
        let (Ok(tenant), Ok(robot)) = (TenantId::new(tenant), fleet_schemas::RobotId::new(robot)) else {
            continue;
        };
        core.fleet.set_grant(&tenant, &robot, crate::fleet::Grant::Revoked);
        crate::heartbeats::take_offline(core, &tenant, &robot, "robot key revoked", true).await;
        tracing::info!(%tenant, %robot, "robot key revoked: robot taken offline");
    }
    core.wake_relay.notify_one();
    core.wake_admission.notify_one();
}

/// Find bound robot keys that stopped working and apply [`on_revoked`] to them. Only the leader
/// does (taking jobs back is fenced); another instance's revocation is picked up by the leader's
/// next sweep.
pub async fn revoke_lapsed(core: &Core) {
    if !core.leadership.is_leader() {
        return;
    }
    match core.store.lapsed_binding_keys().await {
        Ok(keys) => on_revoked(core, &keys).await,
        Err(e) => tracing::warn!(error = %e, "could not look for revoked robot keys"),
    }
}

/// Load every robot's grant into the fleet view (at a reload, e.g. when this instance leads).
pub async fn reload_grants(core: &Core) {
    let rows = match core.store.robot_grants().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "could not load the robots' key grants");
            return;
        }
    };
    let mut all = std::collections::HashMap::with_capacity(rows.len());
    for (tenant, robot, granted, revoked) in rows {
        let (Ok(tenant), Ok(robot)) = (TenantId::new(tenant), fleet_schemas::RobotId::new(robot)) else {
            continue;
        };
        let grant = if revoked {
            crate::fleet::Grant::Revoked
        } else {
            let granted: Option<Vec<fleet_schemas::Capability>> = granted
                .map(|g| g.into_iter().filter_map(|c| fleet_schemas::Capability::new(c).ok()).collect());
            crate::fleet::Grant::of(granted.as_deref())
        };
        all.insert((tenant, robot), grant);
    }
    core.fleet.replace_grants(all);
}

/// For `fleet-orchestrator api-key create`: connect, migrate, create, return the raw key.
/// `req` says what the key is (role, its own rate limit, for a robot key its robot and grant).
pub async fn create_with_config(
    config: &crate::Config,
    tenant: &TenantId,
    req: &CreateKey,
) -> anyhow::Result<String> {
    let pool = crate::cli_pool(config).await?;
    let created = create(&pool, tenant, req).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let data = serde_json::json!({ "name": req.name, "role": req.role.as_str(), "source": "cli" });
    crate::audit::key_changed(&pool, tenant, "key.created", &created.key.id, "cli", data).await?;
    pool.close().await;
    Ok(created.api_key)
}
