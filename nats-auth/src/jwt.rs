//! The NATS JWTs of the auth callout: reading the server's authorization request, and signing
//! the user JWT and the authorization response with the callout issuer's account key.
//!
//! A NATS JWT is `base64url(header).base64url(claims).base64url(ed25519 signature)` with the
//! header `{"typ":"JWT","alg":"ed25519-nkey"}`; the signing key is an nkey whose public form is
//! the claims' `iss`. In the server's configuration (no operator), a user JWT issued by the
//! callout places the user in the account its `aud` names ([`ACCOUNT`]) with the permissions in
//! its claims, and expires it at `exp`.
//!
//! Written here rather than taken from a JWT crate: the few claims the callout needs are small
//! and stable, and the generic NATS JWT crates on crates.io refuse requests whose optional
//! fields they do not model.

use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use nkeys::KeyPair;
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::permissions::Permissions;

/// The account every Fleet connection lives in (JetStream is enabled there).
pub const ACCOUNT: &str = "FLEET";
/// The system account (server monitoring and kicking connections).
pub const SYS_ACCOUNT: &str = "SYS";

const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

/// Why a JWT was refused.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("not a JWT (expected three base64url parts separated by dots)")]
    Shape,
    #[error("JWT {0} is not valid base64url JSON")]
    Encoding(&'static str),
    #[error("JWT issuer {0:?} is not a valid public nkey")]
    Issuer(String),
    #[error("JWT signature does not verify against its issuer")]
    Signature,
    #[error("JWT is a {found:?}, not a {expected:?}")]
    Type { expected: &'static str, found: String },
    #[error("signing failed: {0}")]
    Sign(String),
}

/// What the server tells the callout about a connecting client (the subset Fleet reads).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AuthorizationRequest {
    /// The server's public nkey (the response's audience).
    pub server_id: String,
    /// The public nkey the server made for this connection: the user JWT's subject.
    pub user_nkey: String,
    pub client_host: String,
    pub client_id: u64,
    pub nonce: String,
    pub connect: ConnectOpts,
    /// Whether the client connected over TLS with a certificate the server verified against
    /// its CA (`client_tls.verified_chains` is not empty).
    pub verified_client_cert: bool,
}

/// The client's CONNECT options.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ConnectOpts {
    /// The public nkey a client authenticating by nkey presents (it signs the nonce: `sig`).
    pub nkey: Option<String>,
    pub sig: Option<String>,
    pub user: Option<String>,
    pub pass: Option<String>,
    pub name: Option<String>,
}

#[derive(Deserialize)]
struct RequestClaims {
    nats: RequestBody,
}

#[derive(Deserialize)]
struct RequestBody {
    #[serde(default)]
    r#type: String,
    server_id: ServerId,
    user_nkey: String,
    #[serde(default)]
    client_info: ClientInfo,
    #[serde(default)]
    connect_opts: ConnectOpts,
    #[serde(default)]
    client_tls: Option<ClientTls>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ClientTls {
    verified_chains: Vec<Vec<String>>,
}

#[derive(Deserialize)]
struct ServerId {
    id: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ClientInfo {
    host: String,
    id: u64,
    nonce: String,
}

/// Split and check a JWT: returns its claims after verifying the signature against the
/// claims' `iss`.
fn verified_claims(token: &str) -> Result<(String, Value), JwtError> {
    let mut parts = token.trim().split('.');
    let (Some(header), Some(claims), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Shape);
    };
    let claims_json = decode_b64(claims).ok_or(JwtError::Encoding("claims"))?;
    let sig = decode_b64(sig).ok_or(JwtError::Encoding("signature"))?;
    let claims: Value = serde_json::from_slice(&claims_json).map_err(|_| JwtError::Encoding("claims"))?;
    let iss = claims.get("iss").and_then(Value::as_str).unwrap_or_default().to_owned();
    let key = KeyPair::from_public_key(&iss).map_err(|_| JwtError::Issuer(iss.clone()))?;
    let signed = format!("{header}.{}", claims_part(token));
    key.verify(signed.as_bytes(), &sig).map_err(|_| JwtError::Signature)?;
    Ok((iss, claims))
}

fn claims_part(token: &str) -> &str {
    token.trim().split('.').nth(1).unwrap_or_default()
}

fn decode_b64(s: &str) -> Option<Vec<u8>> {
    [URL_SAFE_NO_PAD, URL_SAFE, STANDARD_NO_PAD, STANDARD].iter().find_map(|e| e.decode(s).ok())
}

/// Read the server's authorization request (`$SYS.REQ.USER.AUTH` payload, not encrypted). Its
/// `exp` (the server's authentication deadline, in whole seconds) is not checked: the server
/// drops an answer that comes too late itself, and a check here would refuse requests whose
/// deadline second has just begun.
pub fn decode_request(token: &[u8]) -> Result<AuthorizationRequest, JwtError> {
    let token = std::str::from_utf8(token).map_err(|_| JwtError::Shape)?;
    let (_, claims) = verified_claims(token)?;
    let claims: RequestClaims = serde_json::from_value(claims).map_err(|_| JwtError::Encoding("claims"))?;
    if claims.nats.r#type != "authorization_request" {
        return Err(JwtError::Type { expected: "authorization_request", found: claims.nats.r#type });
    }
    Ok(AuthorizationRequest {
        server_id: claims.nats.server_id.id,
        user_nkey: claims.nats.user_nkey,
        client_host: claims.nats.client_info.host,
        client_id: claims.nats.client_info.id,
        nonce: claims.nats.client_info.nonce,
        connect: claims.nats.connect_opts,
        verified_client_cert: claims
            .nats
            .client_tls
            .is_some_and(|t| t.verified_chains.iter().any(|c| !c.is_empty())),
    })
}

fn encode(claims: &Value, key: &KeyPair) -> Result<String, JwtError> {
    let header = URL_SAFE_NO_PAD.encode(HEADER);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{body}");
    let sig = key.sign(signed.as_bytes()).map_err(|e| JwtError::Sign(e.to_string()))?;
    Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

/// A unique JWT id (the server does not check how it is made).
fn jti() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let now = OffsetDateTime::now_utc().unix_timestamp_nanos();
    format!("{now:x}{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The `pub`/`sub` permission object of a user JWT. An empty allow list would mean "anything"
/// to the server, so "nothing" is written as a deny of everything.
fn jwt_permission(allow: &[String]) -> Value {
    if allow.is_empty() { json!({ "deny": [">"] }) } else { json!({ "allow": allow }) }
}

/// The callout issuer: the account key whose public form is `auth_callout.issuer` in the
/// server configuration.
pub struct Issuer {
    key: KeyPair,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Issuer({})", self.key.public_key())
    }
}

impl Issuer {
    /// From the account seed (`SA…`).
    pub fn from_seed(seed: &str) -> anyhow::Result<Issuer> {
        let key = KeyPair::from_seed(seed.trim()).map_err(|e| anyhow::anyhow!("not an nkey seed: {e}"))?;
        anyhow::ensure!(
            key.public_key().starts_with('A'),
            "the callout issuer must be an account key (seed SA…)"
        );
        Ok(Issuer { key })
    }

    pub fn public_key(&self) -> String {
        self.key.public_key()
    }

    /// A user JWT for `user_nkey` in [`ACCOUNT`], named `name` (what the server's connection
    /// list shows as the user), with `permissions`, expiring at `expires` if given.
    pub fn user_jwt(
        &self,
        user_nkey: &str,
        name: &str,
        permissions: &Permissions,
        expires: Option<OffsetDateTime>,
    ) -> Result<String, JwtError> {
        let mut nats = json!({
            "pub": jwt_permission(&permissions.publish),
            "sub": jwt_permission(&permissions.subscribe),
            "subs": -1, "data": -1, "payload": -1,
            "type": "user", "version": 2,
        });
        if permissions.allow_responses {
            nats["resp"] = json!({ "max": 1, "ttl": 0 });
        }
        let mut claims = json!({
            "jti": jti(),
            "iat": OffsetDateTime::now_utc().unix_timestamp(),
            "iss": self.key.public_key(),
            "name": name,
            "sub": user_nkey,
            "aud": ACCOUNT,
            "nats": nats,
        });
        if let Some(exp) = expires {
            claims["exp"] = json!(exp.unix_timestamp());
        }
        encode(&claims, &self.key)
    }

    /// The callout's answer to `request`: the user JWT, or the reason it is refused.
    pub fn respond(
        &self,
        request: &AuthorizationRequest,
        outcome: Result<String, String>,
    ) -> Result<String, JwtError> {
        let mut nats = json!({ "type": "authorization_response", "version": 2 });
        match outcome {
            Ok(jwt) => nats["jwt"] = json!(jwt),
            Err(error) => nats["error"] = json!(error),
        }
        let claims = json!({
            "jti": jti(),
            "iat": OffsetDateTime::now_utc().unix_timestamp(),
            "iss": self.key.public_key(),
            "sub": request.user_nkey,
            "aud": request.server_id,
            "nats": nats,
        });
        encode(&claims, &self.key)
    }
}

/// Check that `sig` is the nonce signed by the private key of `nkey` (a client authenticating
/// by nkey proves it holds the seed this way).
pub fn verify_nkey(nkey: &str, nonce: &str, sig: Option<&str>) -> Result<(), JwtError> {
    let user = KeyPair::from_public_key(nkey).map_err(|_| JwtError::Issuer(nkey.to_owned()))?;
    let sig = sig.and_then(decode_b64).ok_or(JwtError::Signature)?;
    user.verify(nonce.as_bytes(), &sig).map_err(|_| JwtError::Signature)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> Issuer {
        Issuer::from_seed(&KeyPair::new_account().seed().unwrap()).unwrap()
    }

    #[test]
    fn a_user_jwt_verifies_and_carries_its_permissions() {
        let issuer = issuer();
        let user = KeyPair::new_user();
        let p = Permissions { publish: vec!["a.>".into()], subscribe: vec![], allow_responses: false };
        let jwt = issuer.user_jwt(&user.public_key(), "robot:k1", &p, None).unwrap();
        let (iss, claims) = verified_claims(&jwt).unwrap();
        assert_eq!(iss, issuer.public_key());
        assert_eq!(claims["aud"], ACCOUNT);
        assert_eq!(claims["nats"]["pub"]["allow"][0], "a.>");
        assert_eq!(claims["nats"]["sub"]["deny"][0], ">", "an empty allow list must deny everything");
        let nonce = "abc";
        let sig = URL_SAFE_NO_PAD.encode(user.sign(nonce.as_bytes()).unwrap());
        assert!(verify_nkey(&user.public_key(), nonce, Some(&sig)).is_ok());
        let other = KeyPair::new_user();
        let forged = URL_SAFE_NO_PAD.encode(other.sign(nonce.as_bytes()).unwrap());
        assert!(matches!(verify_nkey(&user.public_key(), nonce, Some(&forged)), Err(JwtError::Signature)));
        assert!(matches!(verify_nkey(&user.public_key(), nonce, None), Err(JwtError::Signature)));
    }

    #[test]
    fn tampered_jwts_are_refused_and_exp_is_carried() {
        let issuer = issuer();
        let p = Permissions::default();
        let jwt = issuer.user_jwt("UX", "n", &p, None).unwrap();
        let other = issuer.user_jwt("UY", "n", &p, None).unwrap();
        let other_claims = other.split('.').nth(1).unwrap().to_owned();
        let spliced =
            format!("{}.{}.{}", jwt.split('.').next().unwrap(), other_claims, jwt.split('.').nth(2).unwrap());
        assert!(matches!(verified_claims(&spliced), Err(JwtError::Signature)));
        let past = OffsetDateTime::now_utc() - time::Duration::minutes(1);
        let expiring = issuer.user_jwt("UX", "n", &p, Some(past)).unwrap();
        assert_eq!(
            verified_claims(&expiring).unwrap().1["exp"],
            past.unix_timestamp(),
            "the server enforces exp"
        );
        assert!(matches!(decode_request(b"garbage"), Err(JwtError::Shape)));
    }
}
