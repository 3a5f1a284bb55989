//! Secrets of a tenant, as they travel: names, the write-only API messages, the values a claim
//! reply carries, and how a workflow's references to them are found.
//!
//! A workflow names a secret as `{{ secrets.NAME }}` in any string of its steps. The references
//! are found by scanning the workflow's strings ([`references`]) rather than by asking the
//! template engine, because the orchestrator must know them without rendering anything: it
//! refuses a submission naming a secret that does not exist, and a claim reply carries exactly
//! the referenced values, never the rest of the tenant's secrets.
//!
//! [`SecretValues`] is the one type that holds plain values; its `Debug` prints names only, so a
//! grant logged by mistake shows `SecretValues(["DB_PASSWORD"])` and no value.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

/// Longest secret name.
pub const MAX_NAME: usize = 64;
/// Largest secret value, in bytes: enough for a certificate or a service-account JSON, small
/// enough that a claim reply with a few of them stays far below NATS's 1 MiB message limit.
pub const MAX_VALUE: usize = 16 * 1024;
/// The rule a name follows, for error messages.
pub const NAME_RULE: &str = "must be 1 to 64 characters of A-Z, 0-9 and _";

/// Whether `name` is a valid secret name (`[A-Z0-9_]{1,64}`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// The secret names a workflow refers to as `secrets.NAME` (in any string of it).
pub fn references(workflow: &Value) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    collect(workflow, &mut found);
    found
}

fn collect(value: &Value, found: &mut BTreeSet<String>) {
    match value {
        Value::String(s) => scan(s, found),
        Value::Array(items) => items.iter().for_each(|v| collect(v, found)),
        Value::Object(map) => map.values().for_each(|v| collect(v, found)),
        _ => {}
    }
}

fn scan(s: &str, found: &mut BTreeSet<String>) {
    const WORD: &str = "secrets.";
    let bytes = s.as_bytes();
    let mut from = 0;
    while let Some(at) = s[from..].find(WORD) {
        let start = from + at;
        let name_start = start + WORD.len();
        // `mysecrets.X` is another variable's field, not a reference.
        let standalone =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let len = bytes[name_start..].iter().take_while(|b| b.is_ascii_alphanumeric() || **b == b'_').count();
        if standalone && len > 0 {
            found.insert(s[name_start..name_start + len].to_owned());
        }
        from = name_start;
    }
}

/// Values of the secrets a job refers to, by name. Only a claim reply carries them.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretValues(pub BTreeMap<String, String>);

impl fmt::Debug for SecretValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SecretValues").field(&self.0.keys().collect::<Vec<_>>()).finish()
    }
}

impl SecretValues {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Store a secret (`PUT /api/v1/secrets/{name}`): created or replaced.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutSecret {
    pub name: String,
    pub value: String,
}

impl fmt::Debug for PutSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PutSecret").field("name", &self.name).finish_non_exhaustive()
    }
}

/// Name one secret (delete).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretName {
    pub name: String,
}

/// A secret as listed: its name and when it was last written, never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SecretView {
    pub name: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// The tenant's secrets, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SecretList {
    pub secrets: Vec<SecretView>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_follow_the_rule() {
        assert!(valid_name("DB_PASSWORD"));
        assert!(valid_name("A1"));
        assert!(!valid_name(""));
        assert!(!valid_name("db_password"));
        assert!(!valid_name("A-B"));
        assert!(!valid_name(&"A".repeat(65)));
    }

    #[test]
    fn references_are_found_in_every_string() {
        let wf = json!({"steps": [
            {"id": "a", "kind": "shell", "argv": ["sh", "-c", "echo {{ secrets.TOKEN }} {{secrets.DB_PW}}"],
             "env": {"X": "{{ secrets.TOKEN }}"}},
            {"id": "b", "kind": "log", "message": "{{ mysecrets.NOPE }} secrets. {{ other }}"}
        ]});
        let refs: Vec<_> = references(&wf).into_iter().collect();
        assert_eq!(refs, ["DB_PW", "TOKEN"]);
        assert!(references(&json!({"steps": []})).is_empty());
    }

    #[test]
    fn debug_never_shows_values() {
        let v = SecretValues(BTreeMap::from([("TOKEN".to_owned(), "hunter2".to_owned())]));
        let shown = format!("{v:?}");
        assert!(shown.contains("TOKEN") && !shown.contains("hunter2"), "{shown}");
        let p = PutSecret { name: "TOKEN".into(), value: "hunter2".into() };
        assert!(!format!("{p:?}").contains("hunter2"));
    }
}
