//! API keys: their shape, their roles, and the hash that is all Fleet stores of them.
//!
//! A key reads `crpa_<key id>_<secret>`: the `crpa_` prefix is what the Canvas's settings accept
//! and what secret scanners look for; the key id (32 hex digits) finds the record; the secret (64
//! hex digits, 244 random bits) is checked against its SHA-256. A fast hash is enough because the
//! secret is long and random — there is nothing to brute-force — and it keeps the request path
//! cheap (no slow password hash per request).

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Prefix of every key.
pub const KEY_PREFIX: &str = "crpa_";

/// What a key may do. Each role includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read only.
    Viewer,
    /// Submit, cancel, retry, robot commands.
    Operator,
    /// Keys and robots too.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Does this role include `needed`?
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A key split into its id and secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ParsedKey {
    pub key_id: String,
    pub secret: String,
}

impl fmt::Debug for ParsedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ParsedKey({}, <secret>)", self.key_id)
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Is `s` a key id (32 lowercase hex digits)?
pub fn is_key_id(s: &str) -> bool {
    is_hex(s, 32)
}

/// Split `crpa_<32 hex>_<64 hex>`; anything else is not a Fleet key.
pub fn parse_key(key: &str) -> Option<ParsedKey> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (is_hex(id, 32) && is_hex(secret, 64))
        .then(|| ParsedKey { key_id: id.to_owned(), secret: secret.to_owned() })
}

/// A new key: (key id, secret, full key). Randomness comes from UUIDv4s (the OS generator).
pub fn new_key() -> (String, String, String) {
    let key_id = uuid::Uuid::new_v4().simple().to_string();
    let secret = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let full = format!("{KEY_PREFIX}{key_id}_{secret}");
    (key_id, secret, full)
}

/// Hex SHA-256 of a secret: what is stored and compared.
pub fn secret_hash(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_roundtrip_and_are_long() {
        let (id, secret, full) = new_key();
        assert!(full.len() >= 40, "the Canvas accepts only keys of at least 40 characters");
        let parsed = parse_key(&full).unwrap();
        assert_eq!((parsed.key_id.as_str(), parsed.secret.as_str()), (id.as_str(), secret.as_str()));
        assert!(!format!("{parsed:?}").contains(&secret));
        assert_ne!(new_key().2, full);
    }

    #[test]
    fn malformed_keys_are_refused() {
        for bad in [
            "",
            "crpa_",
            "crpa_abc_def",
            "xxxx_0123456789abcdef0123456789abcdef_x",
            &format!("crpa_{}_{}", "A".repeat(32), "0".repeat(64)),
        ] {
            assert!(parse_key(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(secret_hash("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn roles_nest() {
        assert!(Role::Admin.allows(Role::Operator));
        assert!(Role::Operator.allows(Role::Viewer));
        assert!(!Role::Viewer.allows(Role::Operator));
        assert_eq!(Role::parse("operator"), Some(Role::Operator));
    }
}
