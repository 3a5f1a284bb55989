//! Budgets for what a robot sends, so that no report is ever larger than the server accepts.
//!
//! A NATS message larger than the server's `max_payload` (1 MiB by default) is refused before it
//! leaves the client, and retrying it cannot help: a completion that large used to be retried as
//! "unavailable" forever, holding the job `running` and the robot's slot with it. A value the
//! database cannot store (U+0000 in a string) did the same. So every report is cut to a budget
//! derived from the `max_payload` the server announced, and what is cut stays readable:
//!
//! - **Output** (the job's result): at most [`OUTPUT_BUDGET`] bytes of JSON. A larger output
//!   keeps its shape; its longest strings are cut in the middle (head and tail kept, with a
//!   `…[N bytes cut…]…` marker), and the output gets a top-level
//!   `"truncated": {"original_bytes", "kept_bytes", "in": "log", "log_stream": "output"}`. The
//!   full output, as JSON text, goes into the job's log (`FLEET_LOGS`) as consecutive lines of
//!   stream `output`: concatenated, they are the whole output. An output whose shape alone is
//!   over budget is recorded as `{"truncated": …}` only.
//! - **Text** (error message, reject reason): at most [`ERROR_BUDGET`] bytes; names (failed step,
//!   current node): at most [`NAME_BUDGET`].
//! - **Log lines**: a line longer than [`LOG_LINE_BUDGET`] bytes is split into several lines.
//! - U+0000 becomes U+FFFD in everything that is stored (PostgreSQL refuses U+0000); the log keeps
//!   the original text.
//! - Log lines are best effort (a job never waits for NATS): when some were dropped, the output
//!   says how many (`log_lines_dropped`), so a marker pointing into the log is not taken for the
//!   whole text.
//!
//! Every budget is also capped by a share of the server's own `max_payload` (less
//! [`HEADROOM`] for the subject, reply inbox and framing), so a server configured smaller still
//! gets reports that fit.

use serde_json::{Map, Value, json};

/// Room kept in every message for what is not the report's text: subject, reply inbox, headers,
/// MessagePack framing and the fixed fields.
pub const HEADROOM: usize = 8 * 1024;
/// Largest recorded output, as JSON text. A quarter of the default max payload: big enough for
/// any result people read in a job view, small enough that the rest of the report always fits.
pub const OUTPUT_BUDGET: usize = 256 * 1024;
/// Largest error message or reason: the start of a failure explains it; more belongs in the log.
pub const ERROR_BUDGET: usize = 8 * 1024;
/// Largest step or node name.
pub const NAME_BUDGET: usize = 512;
/// Longest log line sent as one message (the process reader already splits at this length).
pub const LOG_LINE_BUDGET: usize = 16 * 1024;
/// The log stream name of the chunks of a truncated output.
pub const OUTPUT_LOG_STREAM: &str = "output";

/// The budgets for one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    /// The server's max payload: no message may be larger.
    pub max_payload: usize,
    pub output: usize,
    pub error: usize,
    pub name: usize,
    pub log_line: usize,
}

impl Budgets {
    /// The budgets for a server announcing `max_payload` (0, unknown, means the 1 MiB default).
    pub fn for_max_payload(max_payload: usize) -> Self {
        let max_payload = if max_payload == 0 { 1024 * 1024 } else { max_payload };
        let room = max_payload.saturating_sub(HEADROOM).max(1024);
        Self {
            max_payload,
            output: OUTPUT_BUDGET.min(room / 2),
            error: ERROR_BUDGET.min(room / 8),
            name: NAME_BUDGET.min(room / 16),
            log_line: LOG_LINE_BUDGET.min(room / 4),
        }
    }
}

/// An output cut to its budget.
#[derive(Debug, Clone, PartialEq)]
pub struct BoundedOutput {
    /// What is recorded.
    pub output: Value,
    /// The full output as JSON text, when it was truncated (it goes into the job's log).
    pub full: Option<String>,
}

/// Cut `output` to at most `budget` bytes of JSON (see the module docs for how).
pub fn bound_output(output: Value, budget: usize) -> BoundedOutput {
    let original = serde_json::to_string(&output).unwrap_or_default();
    let mut clean = output;
    replace_nul(&mut clean);
    if original.len() <= budget {
        return BoundedOutput { output: clean, full: None };
    }
    // The marker itself takes room; numbers in it are at most 20 digits.
    let marker_room = 160;
    let target = budget.saturating_sub(marker_room);
    let longest = longest_string(&clean);
    // The largest string length that fits: more kept text is better, so search for it.
    let (mut lo, mut hi) = (0usize, longest);
    let mut best: Option<Value> = None;
    while lo <= hi {
        let mid = lo + (hi - lo) / 2;
        let candidate = cap_strings(&clean, mid);
        if json_len(&candidate) <= target {
            best = Some(candidate);
            lo = mid + 1;
        } else if mid == 0 {
            break;
        } else {
            hi = mid - 1;
        }
    }
    let mut kept = match best {
        Some(Value::Object(map)) => Value::Object(map),
        Some(other) => json!({ "value": other }),
        // The shape alone is over budget: keep only the marker.
        None => json!({}),
    };
    let kept_bytes = json_len(&kept);
    if let Value::Object(map) = &mut kept {
        map.insert(
            "truncated".into(),
            json!({
                "original_bytes": original.len(),
                "kept_bytes": kept_bytes,
                "in": "log",
                "log_stream": OUTPUT_LOG_STREAM,
            }),
        );
    }
    BoundedOutput { output: kept, full: Some(original) }
}

/// Cut `text` to at most `budget` bytes, keeping its start and saying how much was cut; U+0000
/// becomes U+FFFD.
pub fn bound_text(text: &str, budget: usize) -> String {
    let text = if text.contains('\0') { text.replace('\0', "\u{FFFD}") } else { text.to_owned() };
    if text.len() <= budget {
        return text;
    }
    let marker = format!(" …[{} more bytes; see the job log]", text.len());
    let keep = floor_char_boundary(&text, budget.saturating_sub(marker.len()));
    let mut out = text[..keep].to_owned();
    if out.len() + marker.len() <= budget {
        out.push_str(&marker);
    }
    out
}

/// Split a log line into pieces of at most `budget` bytes, at character boundaries.
pub fn split_line(line: &str, budget: usize) -> Vec<&str> {
    let budget = budget.max(4);
    let mut pieces = Vec::with_capacity(line.len() / budget + 1);
    let mut rest = line;
    while rest.len() > budget {
        let cut = floor_char_boundary(rest, budget);
        pieces.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    pieces.push(rest);
    pieces
}

fn json_len(v: &Value) -> usize {
    serde_json::to_string(v).map_or(usize::MAX, |s| s.len())
}

/// Largest index ≤ `at` on a character boundary of `s`.
fn floor_char_boundary(s: &str, at: usize) -> usize {
    if at >= s.len() {
        return s.len();
    }
    (0..=at).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0)
}

/// Smallest index ≥ `at` on a character boundary of `s`.
fn ceil_char_boundary(s: &str, at: usize) -> usize {
    (at..=s.len()).find(|i| s.is_char_boundary(*i)).unwrap_or(s.len())
}

/// Replace U+0000 in every string and key; true when there was one.
fn replace_nul(v: &mut Value) -> bool {
    match v {
        Value::String(s) if s.contains('\0') => {
            *s = s.replace('\0', "\u{FFFD}");
            true
        }
        Value::Array(items) => items.iter_mut().fold(false, |acc, item| replace_nul(item) | acc),
        Value::Object(map) => {
            let mut found = false;
            if map.keys().any(|k| k.contains('\0')) {
                let old = std::mem::take(map);
                *map = old.into_iter().map(|(k, v)| (k.replace('\0', "\u{FFFD}"), v)).collect::<Map<_, _>>();
                found = true;
            }
            map.values_mut().fold(found, |acc, item| replace_nul(item) | acc)
        }
        _ => false,
    }
}

fn longest_string(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(longest_string).max().unwrap_or(0),
        Value::Object(map) => map.values().map(longest_string).max().unwrap_or(0),
        _ => 0,
    }
}

/// A copy of `v` whose strings longer than `cap` bytes keep their head and tail around a marker.
fn cap_strings(v: &Value, cap: usize) -> Value {
    match v {
        Value::String(s) if s.len() > cap => Value::String(cut_middle(s, cap)),
        Value::Array(items) => Value::Array(items.iter().map(|i| cap_strings(i, cap)).collect()),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, i)| (k.clone(), cap_strings(i, cap))).collect())
        }
        other => other.clone(),
    }
}

/// `s` cut to about `cap` bytes of its own text: the start and the end (the end of a log often
/// explains a failure), with how much was cut in between.
fn cut_middle(s: &str, cap: usize) -> String {
    let head = floor_char_boundary(s, cap / 2);
    let tail = ceil_char_boundary(s, s.len() - (cap - cap / 2));
    format!("{}…[{} bytes cut; the full output is in the job log]…{}", &s[..head], tail - head, &s[tail..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_follow_the_server() {
        let b = Budgets::for_max_payload(1024 * 1024);
        assert_eq!(
            (b.output, b.error, b.name, b.log_line),
            (OUTPUT_BUDGET, ERROR_BUDGET, NAME_BUDGET, LOG_LINE_BUDGET)
        );
        let small = Budgets::for_max_payload(64 * 1024);
        assert!(small.output <= (64 - 8) * 1024 / 2, "{small:?}");
        assert!(small.log_line <= (64 - 8) * 1024 / 4, "{small:?}");
        assert_eq!(Budgets::for_max_payload(0), b, "unknown means the default");
    }

    #[test]
    fn small_output_is_kept_as_it_is() {
        let out = json!({"steps": {"a": {"stdout": "hello\n"}}});
        assert_eq!(bound_output(out.clone(), OUTPUT_BUDGET), BoundedOutput { output: out, full: None });
    }

    #[test]
    fn large_output_is_cut_to_the_budget_with_a_marker_and_the_full_text() {
        let big = "x".repeat(900_000);
        let out = json!({"steps": {"a": {"stdout": format!("start{big}end"), "exit_code": 0}, "b": {"message": "short"}}});
        let original = serde_json::to_string(&out).unwrap();
        let b = bound_output(out, OUTPUT_BUDGET);
        assert!(json_len(&b.output) <= OUTPUT_BUDGET, "{} bytes", json_len(&b.output));
        assert_eq!(b.full.as_deref(), Some(original.as_str()), "the full text is handed on for the log");
        let marker = &b.output["truncated"];
        assert_eq!(marker["original_bytes"], json!(original.len()));
        assert_eq!(marker["in"], "log");
        assert_eq!(marker["log_stream"], OUTPUT_LOG_STREAM);
        let kept = b.output["steps"]["a"]["stdout"].as_str().unwrap();
        assert!(kept.starts_with("start") && kept.ends_with("end"), "head and tail kept");
        assert!(kept.contains("bytes cut; the full output is in the job log"));
        assert!(kept.len() > OUTPUT_BUDGET / 2, "most of the budget is used: {}", kept.len());
        assert_eq!(b.output["steps"]["b"]["message"], "short", "short strings are untouched");
        assert_eq!(b.output["steps"]["a"]["exit_code"], 0, "the shape is kept");
    }

    #[test]
    fn output_whose_shape_is_over_budget_keeps_only_the_marker() {
        let out = Value::Array((0..100_000).map(|i| json!(i)).collect());
        let b = bound_output(out, 4096);
        assert_eq!(b.output.as_object().map(|m| m.len()), Some(1), "{}", b.output);
        assert!(b.output["truncated"]["original_bytes"].as_u64().unwrap() > 4096);
        assert!(b.full.is_some());
    }

    #[test]
    fn nul_is_replaced_in_what_is_stored() {
        let out = json!({"a\u{0}": ["x\u{0}y"]});
        let b = bound_output(out, OUTPUT_BUDGET);
        assert_eq!(b.output, json!({"a\u{FFFD}": ["x\u{FFFD}y"]}));
        assert_eq!(bound_text("boom\u{0}", 100), "boom\u{FFFD}");
    }

    #[test]
    fn text_is_cut_at_a_character_boundary_with_a_marker() {
        let long = "é".repeat(10_000);
        let cut = bound_text(&long, ERROR_BUDGET);
        assert!(cut.len() <= ERROR_BUDGET, "{}", cut.len());
        assert!(cut.ends_with("more bytes; see the job log]"), "{}", &cut[cut.len() - 40..]);
        assert_eq!(bound_text("short", ERROR_BUDGET), "short");
    }

    #[test]
    fn long_lines_are_split_without_losing_text() {
        let line = "ab€".repeat(10_000);
        let pieces = split_line(&line, LOG_LINE_BUDGET);
        assert!(pieces.len() > 1);
        assert!(pieces.iter().all(|p| p.len() <= LOG_LINE_BUDGET));
        assert_eq!(pieces.concat(), line);
        assert_eq!(split_line("short", LOG_LINE_BUDGET), vec!["short"]);
    }
}
