//! Request extractors whose failures are [`HttpError`]s that name what is wrong.
//!
//! axum's `Json` rejects with plain text and without the field at fault, and refuses a body
//! without `Content-Type`. [`JsonBody`] instead reads the body (within the configured limit:
//! 413 above it), answers 400 `malformed_json` when it is not JSON at all and 422 naming the
//! field (`metadata.robot_id`, `required_capabilities[2]`) when it is JSON of the wrong shape.
//! A missing `Content-Type` is taken as JSON, because the Canvas and `curl -d` users do not
//! always send one; an explicit non-JSON content type gets 415.
//!
//! No string anywhere in a body may hold U+0000: PostgreSQL's `text` and `jsonb` cannot store
//! it, so such a body could only fail later, in the database, as a 500. It is refused here with
//! 422 naming the field.
//!
//! Handlers that need no body take no body extractor at all, so a POST with no body and no
//! `Content-Type` (what the Canvas sends to `/cancel`) is simply accepted. Handlers whose body is
//! optional (`…/stop`'s `{"force": true}`) read it with [`optional_json`], whatever the content
//! type, since the Canvas posts them with none.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::error::HttpError;

/// A JSON body deserialized into `T`.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
            let essence = ct.split(';').next().unwrap_or_default().trim();
            let json = essence == "application/json" || essence.ends_with("+json");
            if !json {
                return Err(HttpError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    format!("expected a JSON body (Content-Type: application/json), got {essence:?}"),
                ));
            }
        }
        let limit = state.config().body_limit_bytes;
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                HttpError::payload_too_large(limit)
            } else {
                HttpError::new(StatusCode::BAD_REQUEST, "bad_request", "could not read the request body")
                    .with_log_detail(rejection.body_text())
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parse in two steps so syntax and shape errors are told apart: first into a `Value` (400 if
/// that fails), then into `T` with the path of the first bad field (422).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, HttpError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(HttpError::malformed_json("the request body is empty; expected a JSON object"));
    }
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| HttpError::malformed_json(format!("the request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(HttpError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "the request body must be a JSON object",
        ));
    }
    if let Some(field) = nul_at(&value) {
        return Err(HttpError::invalid(field, NUL_MESSAGE));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        let (field, message) = field_of(&path, &message);
        HttpError::invalid(field, message)
    })
}

pub use fleet_schemas::text::{NUL_MESSAGE, nul_at};

/// An optional JSON body: none at all (or only whitespace, or JSON `null`) is `T::default()`;
/// anything else is checked like a required body, unknown fields included, so a body is never
/// silently ignored.
pub fn optional_json<T: DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, HttpError> {
    let text = bytes.trim_ascii();
    if text.is_empty() || text == b"null" { Ok(T::default()) } else { parse_json(text) }
}

/// The field a serde error is about. serde reports a missing field at its parent's path, with
/// the name only in the message, so join them.
fn field_of(path: &str, message: &str) -> (String, String) {
    let parent = if path == "." { "" } else { path };
    if let Some(name) =
        message.strip_prefix("missing field `").and_then(|rest| rest.split_once('`')).map(|(name, _)| name)
    {
        let field = if parent.is_empty() { name.to_owned() } else { format!("{parent}.{name}") };
        return (field, "is required".to_owned());
    }
    (parent.to_owned(), message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct T {
        name: String,
        n: Option<u32>,
        inner: Option<Inner>,
        list: Option<Vec<u32>>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        x: String,
    }

    #[test]
    fn syntax_is_400_shape_is_422() {
        assert_eq!(parse_json::<T>(b"{nope").unwrap_err().code, "malformed_json");
        assert_eq!(parse_json::<T>(b"  ").unwrap_err().code, "malformed_json");
        let e = parse_json::<T>(b"{}").unwrap_err();
        assert_eq!((e.status.as_u16(), e.field.as_deref()), (422, Some("name")));
        let e = parse_json::<T>(br#"{"name": "a", "n": "x"}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("n"));
        let e = parse_json::<T>(br#"{"name": "a", "inner": {}}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("inner.x"));
        let e = parse_json::<T>(br#"{"name": "a", "list": [1, "b"]}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("list[1]"));
        let e = parse_json::<T>(b"[1]").unwrap_err();
        assert_eq!((e.status.as_u16(), e.field), (422, None));
        assert!(parse_json::<T>(br#"{"name": "a", "unknown": 1}"#).is_ok());
    }

    /// Regression (schemathesis, `POST /api/v1/robots/register` with a tag holding U+0000):
    /// PostgreSQL refused the text and the API answered 500; now it is 422 naming the field.
    #[test]
    fn nul_characters_are_refused_naming_the_field() {
        let e = parse_json::<T>(b"{\"name\": \"a\\u0000b\"}").unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.field.as_deref(), e.message.as_str()),
            (422, Some("name"), NUL_MESSAGE)
        );
        let e = parse_json::<T>(br#"{"name": "a", "list": [1, 2], "inner": {"x": ["ok", "\u0000"]}}"#)
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("inner.x[1]"), "{e}");
        let e = parse_json::<T>(br#"{"name": "a", "extra": [{"k": "\u0000"}]}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("extra[0].k"), "even in a field the handler ignores: {e}");
        let e = parse_json::<T>(br#"{"name": "a", "m": {"\u0000k": 1}}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("m.\\0k"), "in a key: {e}");
        assert!(parse_json::<T>(br#"{"name": "a\u0001 \\u0000 is fine as text"}"#).is_ok());
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Opt {
        #[serde(default)]
        force: bool,
    }

    #[test]
    fn optional_body() {
        for none in [&b""[..], b" \n", b"null", b" null "] {
            assert!(!optional_json::<Opt>(none).unwrap().force, "{none:?}");
        }
        assert!(optional_json::<Opt>(br#"{"force": true}"#).unwrap().force);
        let e = optional_json::<Opt>(br#"{"force": true, "x": 1}"#).unwrap_err();
        assert_eq!(e.status.as_u16(), 422, "unknown fields are refused: {e}");
        assert_eq!(optional_json::<Opt>(b"{nope").unwrap_err().code, "malformed_json");
        assert_eq!(optional_json::<Opt>(b"[]").unwrap_err().status.as_u16(), 422);
    }
}
