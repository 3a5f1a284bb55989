//! API keys: their shape, their roles, and the hash that is all Fleet stores of them.
//!
//! A key reads `crpa_<key id>_<secret>`: the `crpa_` prefix is what the Canvas's settings accept
//! and what secret scanners look for; the key id (32 hex digits) finds the record; the secret (64
//! hex digits, 244 random bits) is checked against its SHA-256. A fast hash is enough because the
//! secret is long and random — there is nothing to brute-force — and it keeps the request path
//! cheap (no slow password hash per request).
//!
//! A key may carry its own request [`Rate`] (`1000/min`), which the gateway applies instead of
//! its global default; it is stored with the key, so rotating the key keeps it.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Prefix of every key.
pub const KEY_PREFIX: &str = "crpa_";

/// What a key may do. Each role includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read only.
    Viewer,
    /// Submit, cancel, retry, robot commands.
    Operator,
    /// Keys and robots too.
    Admin,
    /// A robot's own key: only what a robot does (register itself, heartbeat, claim, report
    /// its jobs), nothing of the users' roles. Outside the viewer ⊂ operator ⊂ admin chain.
    Robot,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Operator, Role::Admin, Role::Robot];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Robot => "robot",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Does this role include `needed`? The user roles nest; `robot` allows only itself and is
    /// allowed by no user role (an admin key is not a robot's identity).
    pub fn allows(self, needed: Role) -> bool {
        match (self, needed) {
            (Role::Robot, Role::Robot) => true,
            (Role::Robot, _) | (_, Role::Robot) => false,
            _ => self >= needed,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The period of a [`Rate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RatePeriod {
    Second,
    Minute,
    Hour,
}

impl RatePeriod {
    pub const ALL: [RatePeriod; 3] = [RatePeriod::Second, RatePeriod::Minute, RatePeriod::Hour];

    pub fn seconds(self) -> u32 {
        match self {
            RatePeriod::Second => 1,
            RatePeriod::Minute => 60,
            RatePeriod::Hour => 3600,
        }
    }

    pub fn from_seconds(seconds: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.seconds() == seconds)
    }

    /// The unit as written after the `/` (the canonical spelling).
    pub fn unit(self) -> &'static str {
        match self {
            RatePeriod::Second => "s",
            RatePeriod::Minute => "min",
            RatePeriod::Hour => "h",
        }
    }

    fn parse(unit: &str) -> Option<Self> {
        match unit {
            "s" | "sec" | "second" => Some(RatePeriod::Second),
            "m" | "min" | "minute" => Some(RatePeriod::Minute),
            "h" | "hour" => Some(RatePeriod::Hour),
            _ => None,
        }
    }
}

/// A request rate, written `1000/min`, `20/s` or `5000/h`: `requests` per `period`, all of which
/// may come at once. On the wire and in JSON it is that string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Rate {
    pub requests: u32,
    pub period: RatePeriod,
}

impl Rate {
    /// Most requests per period (it must fit PostgreSQL's `integer`; a billion per second is
    /// unlimited in practice).
    pub const MAX_REQUESTS: u32 = 1_000_000_000;
    /// What a rate looks like, for error messages.
    pub const RULE: &'static str = "a rate such as 1000/min, 20/s or 5000/h (at least 1 request)";

    /// Parse `N/unit` (units `s`, `sec`, `second`, `m`, `min`, `minute`, `h`, `hour`). `N` may
    /// be 0: the caller decides what that means (the gateway's global limit reads it as off).
    pub fn parse_allowing_zero(s: &str) -> Result<Rate, String> {
        let s = s.trim();
        let err = || format!("{s:?} is not {}", Rate::RULE);
        let (n, unit) = s.split_once('/').ok_or_else(err)?;
        let requests: u32 = n.trim().parse().map_err(|_| err())?;
        let period = RatePeriod::parse(unit.trim()).ok_or_else(err)?;
        if requests > Rate::MAX_REQUESTS {
            return Err(format!("{s:?} is too high: at most {} requests per period", Rate::MAX_REQUESTS));
        }
        Ok(Rate { requests, period })
    }

    /// Parse a rate of at least one request.
    pub fn parse(s: &str) -> Result<Rate, String> {
        let rate = Self::parse_allowing_zero(s)?;
        if rate.requests == 0 {
            return Err(format!("{:?} is not {}", s.trim(), Rate::RULE));
        }
        Ok(rate)
    }

    pub fn period(self) -> Duration {
        Duration::from_secs(u64::from(self.period.seconds()))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.requests, self.period.unit())
    }
}

impl From<Rate> for String {
    fn from(r: Rate) -> String {
        r.to_string()
    }
}

impl TryFrom<String> for Rate {
    type Error = String;

    fn try_from(s: String) -> Result<Rate, String> {
        Rate::parse(&s)
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
    fn rates_parse_and_print() {
        let r = Rate::parse("1000/min").unwrap();
        assert_eq!((r.requests, r.period, r.period()), (1000, RatePeriod::Minute, Duration::from_secs(60)));
        assert_eq!(r.to_string(), "1000/min");
        assert_eq!(Rate::parse(" 5 / second ").unwrap().to_string(), "5/s");
        assert_eq!(Rate::parse("7/hour").unwrap().period(), Duration::from_secs(3600));
        assert_eq!(Rate::parse_allowing_zero("0/min").unwrap().requests, 0);
        for bad in ["", "100", "0/min", "x/min", "10/week", "-1/s", "1000000001/s", "off"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
        assert!(Rate::parse("1000000001/s").unwrap_err().contains("at most"));
        // On the wire and in JSON a rate is its string, and a bad one does not deserialize.
        assert_eq!(serde_json::to_value(r).unwrap(), serde_json::json!("1000/min"));
        assert_eq!(serde_json::from_value::<Rate>(serde_json::json!("20/s")).unwrap().requests, 20);
        assert!(serde_json::from_value::<Rate>(serde_json::json!("fast")).is_err());
        let packed = rmp_serde::to_vec_named(&Some(r)).unwrap();
        assert_eq!(rmp_serde::from_slice::<Option<Rate>>(&packed).unwrap(), Some(r));
        for p in RatePeriod::ALL {
            assert_eq!(RatePeriod::from_seconds(p.seconds()), Some(p));
        }
    }

    #[test]
    fn roles_nest() {
        assert!(Role::Admin.allows(Role::Operator));
        assert!(Role::Operator.allows(Role::Viewer));
        assert!(!Role::Viewer.allows(Role::Operator));
        assert_eq!(Role::parse("operator"), Some(Role::Operator));
        assert_eq!(Role::parse("robot"), Some(Role::Robot));
        for user in [Role::Viewer, Role::Operator, Role::Admin] {
            assert!(!Role::Robot.allows(user), "a robot key is no {user}");
            assert!(!user.allows(Role::Robot), "a {user} key is no robot");
        }
        assert!(Role::Robot.allows(Role::Robot));
    }
}
