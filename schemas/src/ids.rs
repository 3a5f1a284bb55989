//! Typed, validated identifiers.
//!
//! Every id that ends up inside a NATS subject, a consumer name or a KV key is validated here,
//! once, at the edge. The token rules are chosen so that names built from them are unambiguous:
//! a tenant id has no `_`, so the consumer name `<tenant>_<class>` splits in exactly one way, and
//! no id may contain `.`, `*`, `>` or whitespace, so it is always exactly one subject token.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {rule}")]
pub struct IdError {
    pub what: &'static str,
    pub value: String,
    pub rule: &'static str,
}

fn check(
    what: &'static str,
    value: &str,
    max: usize,
    allow_underscore: bool,
    rule: &'static str,
) -> Result<(), IdError> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (allow_underscore && b == b'_')
        });
    if ok { Ok(()) } else { Err(IdError { what, value: value.to_owned(), rule }) }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:literal, $underscore:literal, $rule:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// The rule this id follows, for error messages and docs.
            pub const RULE: &'static str = $rule;

            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check($what, &value, $max, $underscore, $rule)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_id!(
    /// A tenant: `[a-z0-9-]{1,63}`.
    TenantId, "tenant id", 63, false, "1 to 63 characters of a-z, 0-9 and -"
);
string_id!(
    /// A robot: `[a-z0-9-]{1,64}`.
    RobotId, "robot id", 64, false, "1 to 64 characters of a-z, 0-9 and -"
);
string_id!(
    /// A capability name: `[a-z0-9_-]{1,32}`.
    Capability, "capability", 32, true, "1 to 32 characters of a-z, 0-9, _ and -"
);

impl TenantId {
    /// The tenant used by the gateway's development mode.
    pub fn default_tenant() -> Self {
        Self("default".to_owned())
    }
}

impl RobotId {
    /// A fresh random robot id (`r-` and 12 hex digits), for robots started without `--id`.
    pub fn random() -> Self {
        let hex = Uuid::new_v4().simple().to_string();
        Self(format!("r-{}", &hex[..12]))
    }
}

/// Capabilities every robot understands natively, listed in docs and `--help`.
pub const BUILTIN_CAPABILITIES: &[&str] =
    &["browser", "desktop", "gpu", "high_memory", "secure", "cloud", "on_premise"];

/// The implicit capability of a robot that may run `shell` steps.
pub const SHELL_CAPABILITY: &str = "shell";

/// The capability of a robot whose NATS connection presented a client certificate the server
/// verified (mutual TLS): attested by the server through the auth callout, never taken from
/// what a robot says. Jobs with `execution_mode: internet` require it.
pub const TLS_CAPABILITY: &str = "tls";

/// A canonical capability set: sorted, deduplicated. Its [`Class::name`] is the names joined
/// with `+`, or `any` for the empty set, and names the class consumer.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Class(BTreeSet<Capability>);

/// Longest class name allowed, so consumer names stay well inside NATS limits.
pub const MAX_CLASS_LEN: usize = 200;

impl Class {
    pub fn new(caps: impl IntoIterator<Item = Capability>) -> Result<Self, IdError> {
        let class = Self(caps.into_iter().collect());
        let name = class.name();
        if name.len() > MAX_CLASS_LEN {
            return Err(IdError {
                what: "capability set",
                value: name,
                rule: "at most 200 bytes when joined with +",
            });
        }
        Ok(class)
    }

    /// Parse names (already split), validating each.
    pub fn parse<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Result<Self, IdError> {
        let caps =
            names.into_iter().map(|n| Capability::new(n.as_ref().trim())).collect::<Result<Vec<_>, _>>()?;
        Self::new(caps)
    }

    /// Parse a class name as built by [`Class::name`].
    pub fn from_name(name: &str) -> Result<Self, IdError> {
        if name == "any" {
            return Ok(Self::default());
        }
        Self::parse(name.split('+'))
    }

    pub fn name(&self) -> String {
        if self.0.is_empty() {
            "any".to_owned()
        } else {
            self.0.iter().map(Capability::as_str).collect::<Vec<_>>().join("+")
        }
    }

    pub fn contains(&self, cap: &str) -> bool {
        self.0.iter().any(|c| c.as_str() == cap)
    }

    pub fn insert(&mut self, cap: Capability) {
        self.0.insert(cap);
    }

    pub fn extend(&mut self, other: &Class) {
        self.0.extend(other.0.iter().cloned());
    }

    /// True when every capability of `required` is in `self`.
    pub fn is_superset(&self, required: &Class) -> bool {
        self.0.is_superset(&required.0)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Capability> {
        self.0.iter()
    }

    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|c| c.0.clone()).collect()
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl fmt::Debug for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Class({})", self.name())
    }
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new time-ordered id (UUIDv7), so ids sort roughly by creation.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, uuid::Error> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// A job. The same id is kept across its attempts and retries.
    JobId
);
uuid_id!(
    /// One run of a robot process: a restarted robot has the same [`RobotId`] and a new session.
    SessionId
);
uuid_id!(
    /// One HTTP request, carried to the orchestrator and recorded with what it committed.
    RequestId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_rules() {
        assert!(TenantId::new("acme-2").is_ok());
        assert!(TenantId::new("").is_err());
        assert!(TenantId::new("a_b").is_err(), "underscore would make consumer names ambiguous");
        assert!(TenantId::new("a.b").is_err());
        assert!(TenantId::new("A").is_err());
        assert!(TenantId::new("x".repeat(63)).is_ok());
        assert!(TenantId::new("x".repeat(64)).is_err());
        assert!(RobotId::new("x".repeat(64)).is_ok());
        assert!(RobotId::new("x".repeat(65)).is_err());
    }

    #[test]
    fn capability_rules() {
        assert!(Capability::new("high_memory").is_ok());
        assert!(Capability::new("gpu>").is_err());
        assert!(Capability::new("x".repeat(33)).is_err());
    }

    #[test]
    fn class_is_canonical() {
        let a = Class::parse(["shell", "browser", "gpu", "browser"]).unwrap();
        assert_eq!(a.name(), "browser+gpu+shell");
        assert_eq!(Class::from_name("browser+gpu+shell").unwrap(), a);
        assert_eq!(Class::default().name(), "any");
        assert_eq!(Class::from_name("any").unwrap(), Class::default());
        let b = Class::parse(["gpu"]).unwrap();
        assert!(a.is_superset(&b));
        assert!(!b.is_superset(&a));
        assert!(a.is_superset(&Class::default()));
    }

    #[test]
    fn class_length_bounded() {
        let names: Vec<String> = (0..10).map(|i| format!("{i}{}", "c".repeat(30))).collect();
        assert!(Class::parse(&names).is_err());
    }

    #[test]
    fn ids_roundtrip_serde() {
        let t: TenantId = serde_json::from_str("\"acme\"").unwrap();
        assert_eq!(t.as_str(), "acme");
        assert!(serde_json::from_str::<TenantId>("\"ACME\"").is_err());
        let j = JobId::new();
        let s = serde_json::to_string(&j).unwrap();
        assert_eq!(serde_json::from_str::<JobId>(&s).unwrap(), j);
    }

    #[test]
    fn random_robot_id_is_valid() {
        let r = RobotId::random();
        assert!(RobotId::new(r.as_str()).is_ok());
    }
}
