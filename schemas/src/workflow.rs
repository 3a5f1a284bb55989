//! The workflow formats a job can carry, detected by shape, and Fleet's own format v1.
//!
//! Parsing here is pure: it validates and names the first bad field (as a JSON path below
//! `workflow_json`), and computes the capabilities a workflow requires. Executing steps is the
//! robot's business.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ids::{Capability, Class, SHELL_CAPABILITY};

/// How a workflow is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkflowFormat {
    /// Fleet's own format v1 (`steps`), run by the robot's built-in step engine.
    Fleet,
    /// The Canvas graph format (`nodes` + `connections`), run by an external runner.
    Casare,
}

impl WorkflowFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkflowFormat::Fleet => "fleet",
            WorkflowFormat::Casare => "casare",
        }
    }

    /// Formats an external runner may be configured for.
    pub const EXTERNAL: [WorkflowFormat; 1] = [WorkflowFormat::Casare];

    pub fn parse_external(name: &str) -> Option<Self> {
        Self::EXTERNAL.into_iter().find(|f| f.as_str() == name)
    }
}

/// A workflow that does not validate: `field` is a path such as `workflow_json.steps[1].argv`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct WorkflowError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> WorkflowError {
    WorkflowError { field: field.into(), message: message.into() }
}

/// A Fleet v1 workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetWorkflow {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub requires: Vec<String>,
    #[serde(default)]
    pub timeout_s: Option<u64>,
    #[serde(default)]
    pub variables: Map<String, Value>,
    pub steps: Vec<Step>,
}

/// One step: an `id`, a `kind` and that kind's fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub id: String,
    #[serde(flatten)]
    pub kind: StepKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StepKind {
    /// Write a log line.
    Log { message: String },
    /// Wait.
    Sleep { ms: u64 },
    /// Set variables (values may be templates).
    Set { variables: Map<String, Value> },
    /// Run a program; stdout and stderr become log lines; non-zero exit fails the step.
    Shell {
        argv: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
        #[serde(default)]
        cwd: Option<String>,
        #[serde(default)]
        timeout_s: Option<u64>,
    },
    /// An HTTP request; status, headers and body are saved as the step's result.
    Http {
        #[serde(default = "default_method")]
        method: String,
        url: String,
        #[serde(default)]
        headers: BTreeMap<String, String>,
        #[serde(default)]
        body: Option<Value>,
        #[serde(default)]
        timeout_s: Option<u64>,
    },
    /// Fail the job with a message.
    Fail { message: String },
}

fn default_method() -> String {
    "GET".to_owned()
}

/// Names of the step kinds, for error messages.
pub const STEP_KINDS: &str = "log, sleep, set, shell, http, fail";

/// A workflow, validated, with its format and what it requires.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedWorkflow {
    pub format: WorkflowFormat,
    /// The workflow's own capability requirements (v1 `requires`, implicit ones of its steps or
    /// of its format).
    pub requires: Class,
    /// The workflow's own id (`id`, or the Canvas's `metadata.id`/`metadata.workflow_id`).
    pub id: Option<String>,
    pub name: Option<String>,
    pub timeout_s: Option<u64>,
    /// Default variables the workflow declares.
    pub variables: Map<String, Value>,
}

/// Validate a workflow given as JSON (`workflow_json`), detecting its format by shape.
pub fn parse(workflow: &Value) -> Result<ParsedWorkflow, WorkflowError> {
    let root = "workflow_json";
    let obj =
        workflow.as_object().ok_or_else(|| err(root, "must be a JSON object (or a string holding one)"))?;
    if obj.contains_key("steps") {
        parse_fleet(workflow)
    } else if obj.contains_key("nodes") && obj.contains_key("connections") {
        parse_casare(obj)
    } else {
        Err(err(
            root,
            "unknown workflow format: expected `steps` (Fleet v1) or `nodes` and `connections` (Canvas graph)",
        ))
    }
}

fn parse_fleet(workflow: &Value) -> Result<ParsedWorkflow, WorkflowError> {
    // Check each step on its own first, so the error names the step and the field.
    if let Some(steps) = workflow.get("steps") {
        let steps = steps.as_array().ok_or_else(|| err("workflow_json.steps", "must be a list of steps"))?;
        let mut seen = std::collections::BTreeSet::new();
        for (i, step) in steps.iter().enumerate() {
            let at = format!("workflow_json.steps[{i}]");
            check_step(&at, step)?;
            let id = step.get("id").and_then(Value::as_str).unwrap_or_default();
            if !seen.insert(id.to_owned()) {
                return Err(err(format!("{at}.id"), format!("duplicate step id {id:?}")));
            }
        }
    }
    let wf: FleetWorkflow = serde_path_error(workflow)?;
    if wf.steps.is_empty() {
        return Err(err("workflow_json.steps", "must hold at least one step"));
    }
    let mut requires =
        Class::parse(&wf.requires).map_err(|e| err("workflow_json.requires", e.to_string()))?;
    if wf.steps.iter().any(|s| matches!(s.kind, StepKind::Shell { .. })) {
        requires.insert(Capability::new(SHELL_CAPABILITY).expect("valid"));
    }
    if wf.timeout_s == Some(0) {
        return Err(err("workflow_json.timeout_s", "must be at least 1 second"));
    }
    Ok(ParsedWorkflow {
        format: WorkflowFormat::Fleet,
        requires,
        id: wf.id.clone(),
        name: wf.name.clone(),
        timeout_s: wf.timeout_s,
        variables: wf.variables,
    })
}

fn check_step(at: &str, step: &Value) -> Result<(), WorkflowError> {
    let obj = step.as_object().ok_or_else(|| err(at, "must be an object with `id` and `kind`"))?;
    match obj.get("id") {
        Some(Value::String(s)) if !s.is_empty() && !s.contains('.') => {}
        Some(Value::String(_)) => {
            return Err(err(format!("{at}.id"), "must be a non-empty string without `.`"));
        }
        Some(_) => return Err(err(format!("{at}.id"), "must be a string")),
        None => return Err(err(format!("{at}.id"), "is required")),
    }
    let kind = match obj.get("kind") {
        Some(Value::String(k)) => k.as_str(),
        Some(_) => return Err(err(format!("{at}.kind"), "must be a string")),
        None => return Err(err(format!("{at}.kind"), format!("is required (one of {STEP_KINDS})"))),
    };
    let mut body = obj.clone();
    body.remove("id");
    let parsed: Result<StepKind, _> = from_value(&Value::Object(body));
    match parsed {
        Ok(StepKind::Shell { argv, .. }) if argv.is_empty() => {
            Err(err(format!("{at}.argv"), "must name a program to run"))
        }
        Ok(StepKind::Http { url, .. })
            if !(url.starts_with("http://") || url.starts_with("https://") || url.contains("{{")) =>
        {
            Err(err(format!("{at}.url"), "must be an http:// or https:// URL"))
        }
        Ok(_) => Ok(()),
        Err(e) => {
            let msg = e.to_string();
            if msg.contains("unknown variant") {
                Err(err(format!("{at}.kind"), format!("unknown step kind {kind:?} (one of {STEP_KINDS})")))
            } else if let Some(field) = quoted_after(&msg, "missing field ") {
                Err(err(format!("{at}.{field}"), format!("is required for a {kind} step")))
            } else if let Some(field) = quoted_after(&msg, "unknown field ") {
                Err(err(format!("{at}.{field}"), format!("is not a field of a {kind} step")))
            } else {
                Err(err(at, format!("{kind} step: {msg}")))
            }
        }
    }
}

fn quoted_after<'a>(msg: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = &msg[msg.find(prefix)? + prefix.len()..];
    let rest = rest.strip_prefix('`')?;
    Some(&rest[..rest.find('`')?])
}

fn from_value<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, serde_json::Error> {
    T::deserialize(v)
}

fn serde_path_error(workflow: &Value) -> Result<FleetWorkflow, WorkflowError> {
    FleetWorkflow::deserialize(workflow).map_err(|e| {
        let msg = e.to_string();
        if let Some(field) = quoted_after(&msg, "unknown field ") {
            err(format!("workflow_json.{field}"), "is not a field of a Fleet v1 workflow")
        } else if let Some(field) = quoted_after(&msg, "missing field ") {
            err(format!("workflow_json.{field}"), "is required")
        } else {
            err("workflow_json", msg)
        }
    })
}

fn parse_casare(obj: &Map<String, Value>) -> Result<ParsedWorkflow, WorkflowError> {
    let nodes = obj
        .get("nodes")
        .and_then(Value::as_object)
        .ok_or_else(|| err("workflow_json.nodes", "must be an object keyed by node id"))?;
    for (id, node) in nodes {
        if !node.is_object() {
            return Err(err(format!("workflow_json.nodes.{id}"), "must be an object"));
        }
    }
    if !obj.get("connections").is_some_and(Value::is_array) {
        return Err(err("workflow_json.connections", "must be a list"));
    }
    let variables = match obj.get("variables") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => canvas_variables(m),
        Some(_) => return Err(err("workflow_json.variables", "must be an object")),
    };
    let meta = obj.get("metadata").and_then(Value::as_object);
    let meta_str = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str).map(str::to_owned);
    let id = obj
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| meta_str("id"))
        .or_else(|| meta_str("workflow_id"));
    let mut requires = Class::default();
    requires.insert(Capability::new(WorkflowFormat::Casare.as_str()).expect("valid"));
    Ok(ParsedWorkflow {
        format: WorkflowFormat::Casare,
        requires,
        id,
        name: meta_str("name"),
        timeout_s: None,
        variables,
    })
}

/// Canvas variables are either plain values or `{"type", "default_value"|"value", …}` objects;
/// the runner receives the values.
fn canvas_variables(m: &Map<String, Value>) -> Map<String, Value> {
    m.iter()
        .map(|(k, v)| {
            let value = match v {
                Value::Object(o) if o.contains_key("default_value") => o["default_value"].clone(),
                Value::Object(o) if o.contains_key("value") && o.contains_key("type") => o["value"].clone(),
                other => other.clone(),
            };
            (k.clone(), value)
        })
        .collect()
}

/// A stable id for a workflow: its own id, else a slug of its name (`Invoice sync` →
/// `invoice-sync`), else `workflow`.
pub fn workflow_id(own_id: Option<&str>, name: &str) -> String {
    if let Some(id) = own_id.map(str::trim).filter(|s| !s.is_empty()) {
        return id.chars().take(128).collect();
    }
    let mut slug = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.ends_with('-') && !slug.is_empty() {
            slug.push('-');
        }
    }
    let slug = slug.trim_end_matches('-');
    if slug.is_empty() { "workflow".to_owned() } else { slug.chars().take(128).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fleet_v1_parses_and_requires_shell() {
        let wf = json!({"id": "hello", "requires": ["browser"], "steps": [
            {"id": "a", "kind": "log", "message": "hi"},
            {"id": "b", "kind": "shell", "argv": ["echo", "hi {{customer}}"]},
            {"id": "c", "kind": "http", "url": "http://127.0.0.1/x"},
            {"id": "d", "kind": "sleep", "ms": 5},
            {"id": "e", "kind": "set", "variables": {"x": 1}},
            {"id": "f", "kind": "fail", "message": "no"}
        ]});
        let p = parse(&wf).unwrap();
        assert_eq!(p.format, WorkflowFormat::Fleet);
        assert_eq!(p.requires.name(), "browser+shell");
        assert_eq!(p.id.as_deref(), Some("hello"));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({"steps": [{"id": "a", "kind": "shell"}]}), "workflow_json.steps[0].argv"),
            (json!({"steps": [{"id": "a", "kind": "teleport"}]}), "workflow_json.steps[0].kind"),
            (json!({"steps": [{"kind": "log", "message": "x"}]}), "workflow_json.steps[0].id"),
            (
                json!({"steps": [{"id": "a", "kind": "log", "message": "x", "extra": 1}]}),
                "workflow_json.steps[0].extra",
            ),
            (json!({"steps": [{"id": "a", "kind": "sleep", "ms": "soon"}]}), "workflow_json.steps[0]"),
            (json!({"steps": "nope"}), "workflow_json.steps"),
            (json!({"steps": []}), "workflow_json.steps"),
            (
                json!({"steps": [{"id": "a", "kind": "log", "message": "x"}], "requires": ["GPU"]}),
                "workflow_json.requires",
            ),
            (
                json!({"steps": [{"id": "a", "kind": "log", "message": "x"}], "colour": "red"}),
                "workflow_json.colour",
            ),
            (
                json!({"steps": [{"id": "a", "kind": "log", "message": "x"}, {"id": "a", "kind": "log", "message": "y"}]}),
                "workflow_json.steps[1].id",
            ),
            (json!({"steps": [{"id": "a", "kind": "shell", "argv": []}]}), "workflow_json.steps[0].argv"),
            (json!({"steps": [{"id": "a", "kind": "http", "url": "ftp://x"}]}), "workflow_json.steps[0].url"),
            (json!([1, 2]), "workflow_json"),
            (json!({"hello": 1}), "workflow_json"),
            (json!({"nodes": [], "connections": []}), "workflow_json.nodes"),
            (json!({"nodes": {}, "connections": {}}), "workflow_json.connections"),
        ];
        for (wf, field) in cases {
            let e = parse(&wf).unwrap_err();
            assert_eq!(e.field, field, "{wf} gave {e}");
        }
    }

    #[test]
    fn canvas_graph_requires_casare() {
        let wf = json!({
            "metadata": {"name": "Invoice", "id": "wf-123"},
            "nodes": {"n1": {"node_id": "n1", "node_type": "StartNode", "config": {}}},
            "connections": [],
            "variables": {"customer": {"type": "String", "default_value": "ACME"}, "n": 3},
            "settings": {}
        });
        let p = parse(&wf).unwrap();
        assert_eq!(p.format, WorkflowFormat::Casare);
        assert_eq!(p.requires.name(), "casare");
        assert_eq!(p.id.as_deref(), Some("wf-123"));
        assert_eq!(p.variables["customer"], json!("ACME"));
        assert_eq!(p.variables["n"], json!(3));
    }

    #[test]
    fn workflow_ids() {
        assert_eq!(workflow_id(None, "Invoice sync"), "invoice-sync");
        assert_eq!(workflow_id(None, "  Ünïcode!! Flow  "), "n-code-flow");
        assert_eq!(workflow_id(Some("wf-1"), "x"), "wf-1");
        assert_eq!(workflow_id(Some(" "), "!!!"), "workflow");
    }
}
