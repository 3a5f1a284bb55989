//! Templates in step fields (minijinja, strict).
//!
//! Every string in a step is a template rendered against `{...variables, steps: {<id>: result}}`,
//! so `{{customer}}` and `{{steps.fetch.status}}` work. Undefined values are an error
//! ([`UndefinedBehavior::Strict`]): a typo must fail the step with a message naming the variable,
//! not run a shell command with an empty argument.
//!
//! In JSON-valued fields (`set.variables`, an `http` body) a string that is exactly one
//! expression, `"{{ steps.fetch.body.count }}"`, keeps the expression's type (a number stays a
//! number, an object an object); any other string renders to a string.

use minijinja::{Environment, UndefinedBehavior};
use serde_json::{Map, Value};

/// A template that could not be rendered; `field` says where (`argv[1]`, `url`…).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct TemplateError {
    pub field: String,
    pub message: String,
}

/// The template environment, built once per engine.
pub struct Templates {
    env: Environment<'static>,
}

impl Default for Templates {
    fn default() -> Self {
        Self::new()
    }
}

fn is_template(s: &str) -> bool {
    s.contains("{{") || s.contains("{%") || s.contains("{#")
}

/// The expression inside `{{ … }}` when `s` is exactly one.
fn single_expression(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    let inner = inner.strip_prefix('-').unwrap_or(inner);
    let inner = inner.strip_suffix('-').unwrap_or(inner);
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") || inner.contains("%}") {
        return None;
    }
    Some(inner.trim())
}

impl Templates {
    pub fn new() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        Self { env }
    }

    /// Render one string field.
    pub fn render_str(&self, field: &str, template: &str, ctx: &Value) -> Result<String, TemplateError> {
        if !is_template(template) {
            return Ok(template.to_owned());
        }
        self.env.render_str(template, ctx).map_err(|e| self.error(field, template, ctx, e))
    }

    /// Render every string inside a JSON value (see the module docs for typed expressions).
    pub fn render_value(&self, field: &str, value: &Value, ctx: &Value) -> Result<Value, TemplateError> {
        match value {
            Value::String(s) if is_template(s) => {
                if let Some(expr) = single_expression(s) {
                    return self.eval(field, s, expr, ctx);
                }
                self.render_str(field, s, ctx).map(Value::String)
            }
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| self.render_value(&format!("{field}[{i}]"), v, ctx))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array),
            Value::Object(map) => {
                let mut out = Map::new();
                for (k, v) in map {
                    out.insert(k.clone(), self.render_value(&format!("{field}.{k}"), v, ctx)?);
                }
                Ok(Value::Object(out))
            }
            other => Ok(other.clone()),
        }
    }

    fn eval(&self, field: &str, source: &str, expr: &str, ctx: &Value) -> Result<Value, TemplateError> {
        let compiled = self.env.compile_expression(expr).map_err(|e| self.error(field, source, ctx, e))?;
        let value = compiled.eval(ctx).map_err(|e| self.error(field, source, ctx, e))?;
        if value.is_undefined() {
            return Err(self.undefined(field, source, ctx));
        }
        serde_json::to_value(&value)
            .map_err(|e| TemplateError { field: field.to_owned(), message: format!("not a JSON value: {e}") })
    }

    fn error(&self, field: &str, source: &str, ctx: &Value, e: minijinja::Error) -> TemplateError {
        if e.kind() == minijinja::ErrorKind::UndefinedError {
            return self.undefined(field, source, ctx);
        }
        let detail = e.detail().map(|d| format!(": {d}")).unwrap_or_default();
        TemplateError { field: field.to_owned(), message: format!("template error: {}{detail}", e.kind()) }
    }

    /// Name the first variable the template uses that the context lacks.
    fn undefined(&self, field: &str, source: &str, ctx: &Value) -> TemplateError {
        let mut names: Vec<String> = self
            .env
            .template_from_str(source)
            .map(|t| t.undeclared_variables(true).into_iter().collect())
            .unwrap_or_default();
        names.sort();
        let missing = names.iter().find_map(|n| missing_prefix(ctx, n));
        let message = match missing {
            Some(name) => format!("undefined variable `{name}`"),
            None => "undefined value".to_owned(),
        };
        TemplateError { field: field.to_owned(), message }
    }
}

/// The shortest prefix of the dotted path `name` that the context does not have.
fn missing_prefix(ctx: &Value, name: &str) -> Option<String> {
    let mut at = ctx;
    let mut path = Vec::new();
    for part in name.split('.') {
        path.push(part);
        match at.get(part) {
            Some(v) => at = v,
            None => return Some(path.join(".")),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> Value {
        json!({"customer": "ACME", "n": 3, "steps": {"fetch": {"status": 200, "body": {"count": 7}}}})
    }

    #[test]
    fn renders_variables_and_step_results() {
        let t = Templates::new();
        assert_eq!(t.render_str("f", "hi {{customer}}", &ctx()).unwrap(), "hi ACME");
        assert_eq!(t.render_str("f", "{{ steps.fetch.status }}", &ctx()).unwrap(), "200");
        assert_eq!(t.render_str("f", "{{ n + 1 }}", &ctx()).unwrap(), "4");
        assert_eq!(t.render_str("f", "plain {text}", &ctx()).unwrap(), "plain {text}");
    }

    #[test]
    fn undefined_variable_is_an_error_naming_it() {
        let t = Templates::new();
        let e = t.render_str("argv[1]", "hi {{ custmer }}", &ctx()).unwrap_err();
        assert_eq!(e.field, "argv[1]");
        assert_eq!(e.message, "undefined variable `custmer`");
        let e = t.render_str("url", "{{ steps.fetc.status }}", &ctx()).unwrap_err();
        assert_eq!(e.message, "undefined variable `steps.fetc`", "{e}");
        let e = t.render_value("variables.x", &json!("{{ nope }}"), &ctx()).unwrap_err();
        assert_eq!(e.to_string(), "variables.x: undefined variable `nope`");
    }

    #[test]
    fn single_expressions_keep_their_type() {
        let t = Templates::new();
        let v = t
            .render_value(
                "variables",
                &json!({"count": "{{ steps.fetch.body.count }}", "body": "{{ steps.fetch.body }}",
                        "label": "n={{ n }}", "list": ["{{ n }}", 1], "flag": true}),
                &ctx(),
            )
            .unwrap();
        assert_eq!(
            v,
            json!({"count": 7, "body": {"count": 7}, "label": "n=3", "list": [3, 1], "flag": true})
        );
    }

    #[test]
    fn syntax_errors_are_reported() {
        let t = Templates::new();
        let e = t.render_str("message", "{{ oops", &ctx()).unwrap_err();
        assert!(e.message.starts_with("template error"), "{e}");
    }
}
