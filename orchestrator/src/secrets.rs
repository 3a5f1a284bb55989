//! Secrets for jobs: a tenant's named values, encrypted at rest, written and listed over the
//! API but never read back; only the claim reply of a job that refers to one carries its value.
//!
//! Encryption is XChaCha20-Poly1305 under one master key, read from the file `secrets_key_file`
//! names (`FLEET_SECRETS_KEY_FILE`; 32 random bytes as hex or base64, made by
//! `fleet-orchestrator secrets-key create --out FILE`). The key lives outside the database, so a
//! dump of PostgreSQL alone reveals nothing. Each write draws a fresh 192-bit random nonce (the
//! extended nonce makes random nonces safe without a counter). The associated data is the tenant
//! and the name, so a row copied to another tenant or renamed fails to decrypt instead of handing
//! one tenant's value to another's jobs.
//!
//! Without a key file the orchestrator runs as before; only the secrets API and submissions that
//! refer to secrets answer `Unavailable`, naming the setting.
//!
//! References are checked at submit: a workflow naming a secret the tenant does not have is
//! refused (422, `workflow_json`), so a typo is found before a robot is taken. A secret deleted
//! after submit is simply absent from the claim reply and the step that renders it fails with
//! "undefined variable `secrets.NAME`".

use std::collections::BTreeSet;
use std::path::Path;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use fleet_schemas::TenantId;
use fleet_schemas::api::{ApiError, ApiRequest, ApiResult, Empty};
use fleet_schemas::secrets::{self, PutSecret, SecretList, SecretName, SecretValues, SecretView};

use crate::Core;
use crate::store::StoreError;

/// The setting that enables secrets, named in every "not configured" answer.
pub const SETTING: &str = "secrets_key_file (FLEET_SECRETS_KEY_FILE)";

/// A master key that could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading the secrets key file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the secrets key file {path} must hold 32 bytes as 64 hex digits or as base64, {found}")]
    Format { path: String, found: String },
    #[error("{path} already exists; not overwriting a secrets key (the secrets it encrypts would be lost)")]
    Exists { path: String },
    #[error("writing the secrets key file {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

/// A value that did not decrypt: wrong key, or a row moved to another tenant or name.
#[derive(Debug, thiserror::Error)]
#[error("secret {name} does not decrypt with this key (wrong key, or the row was moved)")]
pub struct DecryptError {
    pub name: String,
}

/// The master key.
#[derive(Clone)]
pub struct SecretsKey {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretsKey(…)")
    }
}

fn aad(tenant: &TenantId, name: &str) -> Vec<u8> {
    // A tenant id has no NUL, so the pair is unambiguous.
    let mut aad = Vec::with_capacity(tenant.as_str().len() + name.len() + 1);
    aad.extend_from_slice(tenant.as_str().as_bytes());
    aad.push(0);
    aad.extend_from_slice(name.as_bytes());
    aad
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

impl SecretsKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self { cipher: XChaCha20Poly1305::new(bytes.into()) }
    }

    /// Parse a key file's text: 64 hex digits or base64 of 32 bytes (surrounding space ignored).
    pub fn parse(path: &str, text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let bytes = decode_hex(text)
            .or_else(|| base64::engine::general_purpose::STANDARD.decode(text).ok())
            .ok_or_else(|| KeyError::Format { path: path.to_owned(), found: "found neither".into() })?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| KeyError::Format {
            path: path.to_owned(),
            found: format!("found {} bytes", b.len()),
        })?;
        Ok(Self::from_bytes(&bytes))
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| KeyError::Read { path: shown.clone(), source })?;
        Self::parse(&shown, &text)
    }

    /// Write a new random key to `path` (hex, mode 0600); an existing file is never replaced.
    pub fn create_file(path: &Path) -> Result<(), KeyError> {
        use std::io::Write as _;
        let shown = path.display().to_string();
        let key = XChaCha20Poly1305::generate_key(&mut OsRng);
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => KeyError::Exists { path: shown.clone() },
            _ => KeyError::Write { path: shown.clone(), source },
        })?;
        writeln!(file, "{hex}").map_err(|source| KeyError::Write { path: shown, source })
    }

    /// Encrypt a value: `(nonce, ciphertext)`.
    pub fn seal(&self, tenant: &TenantId, name: &str, value: &str) -> (Vec<u8>, Vec<u8>) {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = aad(tenant, name);
        // Encryption fails only for plaintexts beyond 256 GiB; values are capped far below.
        let sealed =
            self.cipher.encrypt(&nonce, Payload { msg: value.as_bytes(), aad: &aad }).unwrap_or_default();
        (nonce.to_vec(), sealed)
    }

    /// Decrypt a stored value.
    pub fn open(
        &self,
        tenant: &TenantId,
        name: &str,
        nonce: &[u8],
        sealed: &[u8],
    ) -> Result<String, DecryptError> {
        let fail = || DecryptError { name: name.to_owned() };
        if nonce.len() != 24 {
            return Err(fail());
        }
        let aad = aad(tenant, name);
        let plain = self
            .cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: sealed, aad: &aad })
            .map_err(|_| fail())?;
        String::from_utf8(plain).map_err(|_| fail())
    }
}

/// The key, or the answer that says secrets are not configured.
fn key(core: &Core) -> ApiResult<&SecretsKey> {
    core.secrets.as_ref().ok_or_else(|| ApiError::Unavailable {
        message: format!("secrets are not configured on this orchestrator: set {SETTING}"),
        retry_after_s: 60,
    })
}

fn check_name(name: &str) -> ApiResult<()> {
    if secrets::valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::Invalid { field: "name".into(), message: secrets::NAME_RULE.into() })
    }
}

pub async fn put(core: &Core, req: ApiRequest<PutSecret>) -> ApiResult<SecretView> {
    let key = key(core)?;
    let PutSecret { name, value } = &req.body;
    check_name(name)?;
    if value.len() > secrets::MAX_VALUE {
        return Err(ApiError::Invalid {
            field: "value".into(),
            message: format!("must be at most {} bytes", secrets::MAX_VALUE),
        });
    }
    if crate::api::past_deadline(&req) {
        return Err(crate::api::deadline_error());
    }
    let (nonce, sealed) = key.seal(&req.tenant, name, value);
    let (created_at, updated_at) = sqlx::query_as(
        "INSERT INTO secrets (tenant, name, nonce, ciphertext) VALUES ($1, $2, $3, $4)
         ON CONFLICT (tenant, name) DO UPDATE
           SET nonce = EXCLUDED.nonce, ciphertext = EXCLUDED.ciphertext, updated_at = now()
         RETURNING created_at, updated_at",
    )
    .bind(req.tenant.as_str())
    .bind(name)
    .bind(nonce)
    .bind(sealed)
    .fetch_one(&core.store.pool)
    .await
    .map_err(StoreError::from)?;
    tracing::info!(tenant = %req.tenant, secret = %name, "secret stored");
    Ok(SecretView { name: name.clone(), created_at, updated_at })
}

pub async fn list(core: &Core, req: ApiRequest<Empty>) -> ApiResult<SecretList> {
    key(core)?;
    let rows: Vec<(String, time::OffsetDateTime, time::OffsetDateTime)> =
        sqlx::query_as("SELECT name, created_at, updated_at FROM secrets WHERE tenant = $1 ORDER BY name")
            .bind(req.tenant.as_str())
            .fetch_all(&core.store.pool)
            .await
            .map_err(StoreError::from)?;
    Ok(SecretList {
        secrets: rows
            .into_iter()
            .map(|(name, created_at, updated_at)| SecretView { name, created_at, updated_at })
            .collect(),
    })
}

pub async fn delete(core: &Core, req: ApiRequest<SecretName>) -> ApiResult<SecretView> {
    key(core)?;
    // A name that cannot exist is not found, like any other.
    if !secrets::valid_name(&req.body.name) {
        return Err(ApiError::NotFound { what: "secret".into() });
    }
    let row: Option<(time::OffsetDateTime, time::OffsetDateTime)> = sqlx::query_as(
        "DELETE FROM secrets WHERE tenant = $1 AND name = $2 RETURNING created_at, updated_at",
    )
    .bind(req.tenant.as_str())
    .bind(&req.body.name)
    .fetch_optional(&core.store.pool)
    .await
    .map_err(StoreError::from)?;
    let (created_at, updated_at) = row.ok_or_else(|| ApiError::NotFound { what: "secret".into() })?;
    tracing::info!(tenant = %req.tenant, secret = %req.body.name, "secret deleted");
    Ok(SecretView { name: req.body.name.clone(), created_at, updated_at })
}

/// Check at submit that every secret the workflow refers to exists in the tenant.
pub async fn check_references(core: &Core, tenant: &TenantId, workflow: &serde_json::Value) -> ApiResult<()> {
    let wanted = secrets::references(workflow);
    if wanted.is_empty() {
        return Ok(());
    }
    key(core)?;
    let names: Vec<String> = wanted.iter().cloned().collect();
    let have: Vec<String> =
        sqlx::query_scalar("SELECT name FROM secrets WHERE tenant = $1 AND name = ANY($2)")
            .bind(tenant.as_str())
            .bind(&names)
            .fetch_all(&core.store.pool)
            .await
            .map_err(StoreError::from)?;
    let have: BTreeSet<String> = have.into_iter().collect();
    let missing: Vec<&str> = wanted.iter().filter(|n| !have.contains(*n)).map(String::as_str).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Invalid {
            field: "workflow_json".into(),
            message: format!("refers to secrets this tenant does not have: {}", missing.join(", ")),
        })
    }
}

/// The values of the secrets a claimed workflow refers to, for its claim reply. Secrets deleted
/// since the submission are left out (the step that uses one fails naming it).
pub async fn for_claim(
    core: &Core,
    tenant: &TenantId,
    workflow: &serde_json::Value,
) -> Result<SecretValues, StoreError> {
    let wanted: Vec<String> = secrets::references(workflow).into_iter().collect();
    let mut values = SecretValues::default();
    if wanted.is_empty() {
        return Ok(values);
    }
    let Some(key) = core.secrets.as_ref() else {
        tracing::warn!(%tenant, "a claimed job refers to secrets but no secrets key is configured");
        return Ok(values);
    };
    let rows: Vec<(String, Vec<u8>, Vec<u8>)> =
        sqlx::query_as("SELECT name, nonce, ciphertext FROM secrets WHERE tenant = $1 AND name = ANY($2)")
            .bind(tenant.as_str())
            .bind(&wanted)
            .fetch_all(&core.store.pool)
            .await?;
    for (name, nonce, sealed) in rows {
        match key.open(tenant, &name, &nonce, &sealed) {
            Ok(value) => {
                values.0.insert(name, value);
            }
            Err(e) => tracing::error!(%tenant, error = %e, "secret left out of a claim reply"),
        }
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(t: &str) -> TenantId {
        TenantId::new(t.to_owned()).unwrap()
    }

    #[test]
    fn a_value_decrypts_only_for_its_tenant_and_name() {
        let key = SecretsKey::from_bytes(&[7; 32]);
        let (nonce, sealed) = key.seal(&tenant("a"), "TOKEN", "hunter2");
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"), "stored in plain text");
        assert_eq!(key.open(&tenant("a"), "TOKEN", &nonce, &sealed).unwrap(), "hunter2");
        assert!(key.open(&tenant("b"), "TOKEN", &nonce, &sealed).is_err(), "moved to another tenant");
        assert!(key.open(&tenant("a"), "OTHER", &nonce, &sealed).is_err(), "renamed");
        let other = SecretsKey::from_bytes(&[8; 32]);
        assert!(other.open(&tenant("a"), "TOKEN", &nonce, &sealed).is_err(), "another key");
        let (nonce2, _) = key.seal(&tenant("a"), "TOKEN", "hunter2");
        assert_ne!(nonce, nonce2, "a nonce is drawn per write");
    }

    #[test]
    fn key_files_are_hex_or_base64_of_32_bytes() {
        let hex = "00".repeat(32);
        assert!(SecretsKey::parse("k", &format!("{hex}\n")).is_ok());
        let b64 = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        assert!(SecretsKey::parse("k", &b64).is_ok());
        let e = SecretsKey::parse("k", "abcd").unwrap_err().to_string();
        assert!(e.contains("32 bytes") && e.contains("found 2 bytes"), "{e}");
        let e = SecretsKey::parse("k", "not a key!").unwrap_err().to_string();
        assert!(e.contains("found neither"), "{e}");
    }

    #[test]
    fn create_file_refuses_to_overwrite_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        SecretsKey::create_file(&path).unwrap();
        assert!(SecretsKey::load(&path).is_ok());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let before = std::fs::read(&path).unwrap();
        assert!(matches!(SecretsKey::create_file(&path), Err(KeyError::Exists { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }
}
