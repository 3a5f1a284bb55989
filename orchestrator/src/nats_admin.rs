//! NATS credentials for people and tools: `fleet-orchestrator nats-creds`.
//!
//! An observer's credentials are an nkey seed file (`nats sub --nkey FILE …`; the server never
//! sees the seed, only the nonce signed with it). The auth callout admits its holder while the
//! `nats_credentials` row of its public key is live, with read rights on one tenant's events
//! ([`fleet_nats_auth::permissions::observer`]); revoking the row locks the file out and
//! disconnects its connections.

use std::path::Path;

use anyhow::Context;
use fleet_nats_auth::setup;
use fleet_schemas::TenantId;
use sqlx::PgPool;
use time::OffsetDateTime;

use crate::callout;

/// A credential written to a file.
#[derive(Debug)]
pub struct IssuedCreds {
    pub id: String,
    pub expires_at: Option<OffsetDateTime>,
}

/// Create observer credentials for `tenant` (for the server `auth_dir` was written for) and
/// write the nkey seed to `out` (mode 0600; an existing file is refused).
pub async fn create_observer(
    pool: &PgPool,
    auth_dir: &Path,
    tenant: &TenantId,
    name: &str,
    expires_at: Option<OffsetDateTime>,
    out: &Path,
) -> anyhow::Result<IssuedCreds> {
    anyhow::ensure!(!out.exists(), "{} exists; choose another --out or remove it first", out.display());
    // The folder must be a nats-setup one: credentials are for that server's callout.
    setup::load(auth_dir)?;
    let id = uuid::Uuid::now_v7().simple().to_string();
    let user = nkeys::KeyPair::new_user();
    let public_key = user.public_key();
    let text = format!("{}\n", user.seed().map_err(|e| anyhow::anyhow!("encoding the seed: {e}"))?);
    sqlx::query(
        "INSERT INTO nats_credentials (id, tenant, role, name, public_key, expires_at)
         VALUES ($1, $2, 'observer', $3, $4, $5)",
    )
    .bind(&id)
    .bind(tenant.as_str())
    .bind(name)
    .bind(&public_key)
    .bind(expires_at)
    .execute(pool)
    .await
    .context("recording the credentials")?;
    setup::write_secret(out, &text)?;
    Ok(IssuedCreds { id, expires_at })
}

/// Revoke credentials by id; returns whether a live one was revoked. Running orchestrators
/// disconnect what it admitted ([`crate::callout::announce_revoked`]).
pub async fn revoke(pool: &PgPool, id: &str) -> anyhow::Result<bool> {
    let n =
        sqlx::query("UPDATE nats_credentials SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL")
            .bind(id)
            .execute(pool)
            .await
            .context("revoking the credentials")?
            .rows_affected();
    if n > 0 {
        callout::announce_revoked(pool, &callout::observer_user(id)).await;
    }
    Ok(n > 0)
}
