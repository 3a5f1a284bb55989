//! Redaction of a job's secret values from everything the robot reports about it.
//!
//! A job's claim reply carries the values of the secrets its workflow refers to; a step may
//! print one (`echo $TOKEN`, a tool's verbose mode). Every log line, the output and the error
//! the robot sends for that job pass through the job's [`Redactor`], which replaces each value
//! with `***`. Longer values are replaced first, so a value containing a shorter one is hidden
//! whole. A value of several lines is also hidden line by line, since output reaches us one
//! line at a time. What this cannot catch: a value the step transforms (base64, reversed), and
//! a value cut by the 16 KiB split of an overlong line (see `executor::process::MAX_LINE`).

use std::borrow::Cow;

use fleet_schemas::secrets::SecretValues;
use serde_json::Value;

/// What a secret value is replaced with.
pub const MASK: &str = "***";

/// The values to hide in one job's reports.
#[derive(Debug, Default, Clone)]
pub struct Redactor {
    /// Longest first, no empty ones.
    values: Vec<String>,
}

impl Redactor {
    pub fn new(secrets: &SecretValues) -> Self {
        let mut values: Vec<String> = Vec::new();
        for value in secrets.0.values() {
            values.push(value.clone());
            if value.contains('\n') {
                values.extend(value.lines().map(str::trim_end).filter(|l| !l.is_empty()).map(str::to_owned));
            }
        }
        values.retain(|v| !v.is_empty());
        values.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        values.dedup();
        Self { values }
    }

    /// Nothing to hide (a job without secrets).
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// `text` with every value replaced by [`MASK`].
    pub fn text<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for value in &self.values {
            if out.contains(value.as_str()) {
                out = Cow::Owned(out.replace(value.as_str(), MASK));
            }
        }
        out
    }

    pub fn string(&self, text: String) -> String {
        match self.text(&text) {
            Cow::Borrowed(_) => text,
            Cow::Owned(s) => s,
        }
    }

    /// A JSON value with every string (and object key) redacted.
    pub fn value(&self, value: Value) -> Value {
        if self.is_empty() {
            return value;
        }
        match value {
            Value::String(s) => Value::String(self.string(s)),
            Value::Array(items) => Value::Array(items.into_iter().map(|v| self.value(v)).collect()),
            Value::Object(map) => {
                Value::Object(map.into_iter().map(|(k, v)| (self.string(k), self.value(v))).collect())
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn redactor(values: &[(&str, &str)]) -> Redactor {
        Redactor::new(&SecretValues(
            values.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<BTreeMap<_, _>>(),
        ))
    }

    #[test]
    fn values_are_masked_in_text_and_json() {
        let r = redactor(&[("A", "hunter2"), ("B", "hunter2-long"), ("E", "")]);
        assert_eq!(r.text("pw=hunter2-long and hunter2."), "pw=*** and ***.");
        assert_eq!(r.text("nothing here"), "nothing here");
        let v = r.value(json!({"stdout": "hunter2\n", "n": 1, "hunter2": ["x hunter2"]}));
        assert_eq!(v, json!({"stdout": "***\n", "n": 1, "***": ["x ***"]}));
    }

    #[test]
    fn lines_of_a_multiline_value_are_masked_one_by_one() {
        let r = redactor(&[("K", "-----BEGIN-----\nc2VjcmV0\n-----END-----")]);
        assert_eq!(r.text("c2VjcmV0"), "***");
        assert!(!r.text("-----BEGIN-----\nc2VjcmV0\n-----END-----").contains("c2VjcmV0"));
    }

    #[test]
    fn no_secrets_changes_nothing() {
        let r = Redactor::default();
        assert!(r.is_empty());
        assert_eq!(r.value(json!({"a": "b"})), json!({"a": "b"}));
    }
}
