//! MessagePack codec for robot and API traffic (named fields, so fields can be added without
//! breaking older peers: unknown fields are ignored, missing required ones are an error).

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A payload could not be decoded; the message names what was wrong.
#[derive(Debug, thiserror::Error)]
#[error("malformed {what} payload: {source}")]
pub struct DecodeError {
    pub what: &'static str,
    #[source]
    pub source: rmp_serde::decode::Error,
}

/// Encode with named fields. Encoding our own types cannot fail (no maps with non-string keys,
/// no unsupported types), so a failure is a programming error and panics loudly in tests.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(value).expect("Fleet message types always encode")
}

/// Decode a payload; `what` names the message kind for the error.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, DecodeError> {
    rmp_serde::from_slice(bytes).map_err(|source| DecodeError { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct V1 {
        a: u32,
        b: String,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct V2 {
        a: u32,
        b: String,
        #[serde(default)]
        c: Option<u32>,
    }

    #[test]
    fn unknown_fields_ignored_missing_default() {
        let v2 = V2 { a: 1, b: "x".into(), c: Some(3) };
        let old: V1 = decode("v1", &encode(&v2)).unwrap();
        assert_eq!(old, V1 { a: 1, b: "x".into() });
        let new: V2 = decode("v2", &encode(&old)).unwrap();
        assert_eq!(new.c, None);
    }

    #[test]
    fn garbage_is_an_error_naming_the_kind() {
        let err = decode::<V1>("claim", b"\xc1garbage").unwrap_err();
        assert!(err.to_string().contains("claim"), "{err}");
        assert!(decode::<V1>("claim", b"").is_err());
    }

    #[test]
    fn json_values_survive() {
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct W {
            v: serde_json::Value,
        }
        let w = W { v: serde_json::json!({"a": [1, 2.5, "x", null, {"b": true}]}) };
        assert_eq!(decode::<W>("w", &encode(&w)).unwrap(), w);
    }
}
