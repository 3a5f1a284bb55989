//! Text the database cannot hold.
//!
//! PostgreSQL's `text` and `jsonb` refuse U+0000, which JSON and MessagePack allow: every input
//! that is stored is checked with [`nul_at`] at the edge (the gateway, and the orchestrator for
//! requests over NATS), so the caller is told which field is wrong instead of getting a database
//! error.

/// What a field holding U+0000 is told.
pub const NUL_MESSAGE: &str = "must not contain the NUL character (U+0000)";

/// The path (`tags[1]`, `metadata.note`) of the first string or object key holding U+0000. The
/// path is only built on the way back from a find, so a clean body costs no allocation.
pub fn nul_at(value: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    // `head` then the child's own path: `a` + `b[0]` = `a.b[0]`, `a` + `[0]` = `a[0]`.
    fn join(head: String, rest: String) -> String {
        match rest.chars().next() {
            None => head,
            Some('[') => head + &rest,
            Some(_) => format!("{head}.{rest}"),
        }
    }
    match value {
        Value::String(s) => s.contains('\0').then(String::new),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| nul_at(item).map(|rest| join(format!("[{i}]"), rest))),
        Value::Object(map) => map.iter().find_map(|(key, item)| {
            if key.contains('\0') {
                return Some(key.replace('\0', "\\0"));
            }
            nul_at(item).map(|rest| join(key.clone(), rest))
        }),
        _ => None,
    }
}
