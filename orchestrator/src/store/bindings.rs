//! Robots bound to the robot key they enrolled with, and their attested capabilities.
//!
//! A robot's own word about what it can do is not enough: a robot that says `gpu` would be
//! offered gpu jobs. So a robot key carries the capabilities it grants, and a robot bound to the
//! key may claim only what it offers **and** the key grants (its effective set). The binding is
//! its own table because it is made when the robot connects (the NATS auth callout calls
//! [`Store::bind_robot_key`]) or registers over HTTP, possibly before its robot row exists.
//!
//! When the key stops working (revoked, expired, deleted) the binding is marked revoked, which
//! refuses the robot's registration, claims and heartbeats (see `crate::keys::on_revoked`).

use fleet_schemas::robot::attest;
use fleet_schemas::{Capability, RobotId, TenantId};
use time::OffsetDateTime;

use super::{Store, StoreError, StoreResult};

/// The capability sets of a bound robot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attested {
    /// What the robot says it can do.
    pub offered: Vec<Capability>,
    /// What its key grants; `None`: the key does not restrict (all offered are effective).
    pub granted: Option<Vec<Capability>>,
    /// What it may claim: `offered ∩ granted`, sorted, deduplicated.
    pub effective: Vec<Capability>,
}

impl Attested {
    pub fn new(offered: Vec<Capability>, granted: Option<Vec<Capability>>) -> Attested {
        let effective = match &granted {
            Some(g) => attest(&offered, g),
            None => attest(&offered, &offered),
        };
        Attested { offered, granted, effective }
    }

    pub fn effective_strings(&self) -> Vec<String> {
        self.effective.iter().map(|c| c.as_str().to_owned()).collect()
    }
}

/// Why a robot may not be bound to a key.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("unknown robot key")]
    UnknownKey,
    #[error("the robot key was revoked")]
    Revoked,
    #[error("the robot key has expired")]
    Expired,
    #[error("the key's role is {0}, not robot")]
    NotRobotKey(String),
    #[error("the robot key belongs to another tenant")]
    OtherTenant,
    #[error("the robot key is bound to robot {0}")]
    OtherRobot(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The binding of a robot, as registration and claims read it.
#[derive(Debug, Clone)]
pub struct Binding {
    pub key_id: String,
    /// `None`: the key does not restrict.
    pub granted: Option<Vec<String>>,
    pub effective: Vec<String>,
    /// The key stopped working (or the binding was revoked).
    pub revoked: bool,
}

fn caps(names: Option<Vec<String>>) -> Option<Vec<Capability>> {
    // Stored through `Capability`, so they parse; one that does not is dropped (never granted).
    names.map(|n| n.into_iter().filter_map(|c| Capability::new(c).ok()).collect())
}

fn names(caps: &[Capability]) -> Vec<String> {
    caps.iter().map(|c| c.as_str().to_owned()).collect()
}

impl Store {
    /// Bind `robot_id` of `tenant` to robot key `key_id`, recording what it offers, what the key
    /// grants and the effective set. The key must be live, of role robot, of the same tenant,
    /// and, when it is bound to a robot id, bound to this one.
    pub async fn bind_robot_key(
        &self,
        tenant: &TenantId,
        robot_id: &RobotId,
        key_id: &str,
        offered: &[Capability],
    ) -> Result<Attested, BindError> {
        type Row = (
            String,
            String,
            Option<String>,
            Option<Vec<String>>,
            Option<OffsetDateTime>,
            Option<OffsetDateTime>,
        );
        let row: Option<Row> = sqlx::query_as(
            "SELECT tenant, role, robot_id, capabilities, revoked_at, expires_at FROM api_keys WHERE key_id = $1",
        )
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::from)?;
        let (key_tenant, role, bound_to, granted, revoked_at, expires_at) =
            row.ok_or(BindError::UnknownKey)?;
        if key_tenant != tenant.as_str() {
            return Err(BindError::OtherTenant);
        }
        if revoked_at.is_some() {
            return Err(BindError::Revoked);
        }
        if expires_at.is_some_and(|e| e <= OffsetDateTime::now_utc()) {
            return Err(BindError::Expired);
        }
        if role != "robot" {
            return Err(BindError::NotRobotKey(role));
        }
        if let Some(bound) = bound_to.filter(|b| b != robot_id.as_str()) {
            return Err(BindError::OtherRobot(bound));
        }
        let attested = Attested::new(offered.to_vec(), caps(granted));
        sqlx::query(
            "INSERT INTO robot_bindings (tenant, robot_id, key_id, offered, granted, effective)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (tenant, robot_id) DO UPDATE SET key_id = EXCLUDED.key_id, offered = EXCLUDED.offered,
                 granted = EXCLUDED.granted, effective = EXCLUDED.effective, bound_at = now(), revoked_at = NULL",
        )
        .bind(tenant.as_str())
        .bind(robot_id.as_str())
        .bind(key_id)
        .bind(names(&attested.offered))
        .bind(attested.granted.as_deref().map(names))
        .bind(names(&attested.effective))
        .execute(&self.pool)
        .await
        .map_err(StoreError::from)?;
        Ok(attested)
    }

    /// The robot's binding, if it has one; `revoked` also when its key stopped working since.
    pub async fn binding_of(&self, tenant: &TenantId, robot: &RobotId) -> StoreResult<Option<Binding>> {
        type Row = (String, Option<Vec<String>>, Vec<String>, bool);
        let row: Option<Row> = sqlx::query_as(
            "SELECT b.key_id, b.granted, b.effective,
                    b.revoked_at IS NOT NULL OR k.key_id IS NULL OR k.revoked_at IS NOT NULL
                        OR coalesce(k.expires_at <= now(), false)
             FROM robot_bindings b LEFT JOIN api_keys k ON k.key_id = b.key_id
             WHERE b.tenant = $1 AND b.robot_id = $2",
        )
        .bind(tenant.as_str())
        .bind(robot.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(key_id, granted, effective, revoked)| Binding { key_id, granted, effective, revoked }))
    }

    /// Record what a bound robot offers at registration, with the effective set that follows.
    pub async fn record_offer(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
        attested: &Attested,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE robot_bindings SET offered = $3, effective = $4 WHERE tenant = $1 AND robot_id = $2",
        )
        .bind(tenant.as_str())
        .bind(robot.as_str())
        .bind(names(&attested.offered))
        .bind(names(&attested.effective))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Keys of bindings not yet marked revoked whose key stopped working (revoked, expired,
    /// deleted).
    pub async fn lapsed_binding_keys(&self) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT b.key_id FROM robot_bindings b
             WHERE b.revoked_at IS NULL AND NOT EXISTS (
                 SELECT 1 FROM api_keys k WHERE k.key_id = b.key_id AND k.revoked_at IS NULL
                   AND (k.expires_at IS NULL OR k.expires_at > now()))",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Mark the bindings of these keys revoked: `(tenant, robot)` of each robot bound to one.
    pub async fn revoke_bindings(&self, key_ids: &[String]) -> StoreResult<Vec<(String, String)>> {
        Ok(sqlx::query_as(
            "UPDATE robot_bindings SET revoked_at = coalesce(revoked_at, now())
             WHERE key_id = ANY($1) RETURNING tenant, robot_id",
        )
        .bind(key_ids)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every binding's grant, for the fleet view: `(tenant, robot, granted, revoked)`.
    pub async fn robot_grants(&self) -> StoreResult<Vec<(String, String, Option<Vec<String>>, bool)>> {
        Ok(sqlx::query_as("SELECT tenant, robot_id, granted, revoked_at IS NOT NULL FROM robot_bindings")
            .fetch_all(&self.pool)
            .await?)
    }

    /// Why the robot may not claim the job, if it may not: its binding was revoked, or the job
    /// requires a capability outside its effective set. `None` for an unbound robot.
    pub async fn claim_refusal(
        &self,
        tenant: &TenantId,
        robot: &RobotId,
        job: fleet_schemas::JobId,
    ) -> StoreResult<Option<String>> {
        let Some(binding) = self.binding_of(tenant, robot).await? else { return Ok(None) };
        if binding.revoked {
            return Ok(Some(format!("robot {robot}'s key was revoked")));
        }
        let requires: Option<Vec<String>> =
            sqlx::query_scalar("SELECT requires FROM jobs WHERE job_id = $1 AND tenant = $2")
                .bind(job.0)
                .bind(tenant.as_str())
                .fetch_optional(&self.pool)
                .await?;
        let missing: Vec<String> =
            requires.unwrap_or_default().into_iter().filter(|c| !binding.effective.contains(c)).collect();
        Ok((!missing.is_empty()).then(|| {
            format!(
                "job {job} requires {} which robot {robot}'s key does not grant (effective: {})",
                missing.join("+"),
                if binding.effective.is_empty() { "none".to_owned() } else { binding.effective.join("+") }
            )
        }))
    }
}
