//! The NATS auth callout: nats-server asks the orchestrator about every connection that is not
//! one of the static service users, and the answer (a user JWT scoped to that connection, or a
//! refusal) is what the server enforces.
//!
//! Who may connect (DESIGN notes, "Security"):
//! - **A robot**: user = its robot id, password = its robot key (`crpa_…`, role `robot`, live),
//!   connection name `fleet-robot <id> <offered caps>`. A key bound to a robot id admits only
//!   that id. The robot's effective capabilities are what it offers ∩ what the key grants
//!   ([`fleet_schemas::robot::attest`]); they decide its class, so the one class consumer it may
//!   pull from. Its JWT is named `robot:<key id>` and expires with the key. A robot whose
//!   connection presented a client certificate the server verified also offers `tls` (and only
//!   then: a `tls` it names itself is dropped), which `execution_mode: internet` jobs require.
//! - **An enrolling robot**: user `_enrol`, password = its key: may only ask [`whoami`] which
//!   tenant, robot id and capabilities the key carries.
//! - **An observer**: an nkey seed file from `fleet-orchestrator nats-creds` (`nats sub --nkey
//!   FILE …`); admitted while its public key is live in `nats_credentials`, with read rights on
//!   one tenant's events. (Not a `.creds` file: nats-server does not pass a presented user JWT
//!   to the auth callout outside operator mode, so the nonce signed by an nkey is the proof.)
//!
//! Everything else is refused with a reason the server logs. Every orchestrator instance answers
//! (leader or standby: it only reads), so robots can connect while the leader changes.
//!
//! Revoking a key or credential also disconnects what it admitted ([`disconnect`]): the
//! orchestrator's system-account connection finds those connections (`CONNZ`) and kicks them;
//! they cannot come back because the next callout refuses them.

use std::sync::Arc;
use std::time::Duration;

use fleet_nats_auth::jwt::{self, AuthorizationRequest};
use fleet_nats_auth::permissions::{self, ENROL_USER, RobotScope};
use fleet_nats_auth::{Issuer, Permissions};
use fleet_schemas::ids::{Capability, Class, RobotId, TLS_CAPABILITY, TenantId};
use fleet_schemas::robot::WhoAmI;
use fleet_schemas::{codec, keys};
use serde::Deserialize;
use time::OffsetDateTime;

use crate::Core;

/// Subject the server sends authorization requests on (in the callout account).
pub const AUTH_REQUESTS: &str = "$SYS.REQ.USER.AUTH";
/// How long an enrolment connection's JWT lasts: it only asks one question.
const ENROL_TTL: time::Duration = time::Duration::minutes(5);
/// How long a kick waits for the server to list connections.
const CONNZ_TIMEOUT: Duration = Duration::from_secs(3);

/// What the orchestrator needs to answer callouts and kick connections.
pub struct Auth {
    pub issuer: Issuer,
    /// The orchestrator's connection in the system account.
    pub sys: async_nats::Client,
}

/// A robot key's record, as the callout reads it.
#[derive(Debug, Clone)]
pub struct RobotKey {
    pub key_id: String,
    pub tenant: TenantId,
    pub robot_id: Option<RobotId>,
    /// What robots admitted with it may claim; `None`: whatever they offer.
    pub granted: Option<Vec<Capability>>,
    pub expires_at: Option<OffsetDateTime>,
}

/// The live robot key `raw` (role robot, not revoked, not expired), if it is one.
pub async fn robot_key(pool: &sqlx::PgPool, raw: &str) -> Result<Option<RobotKey>, sqlx::Error> {
    let Some(parsed) = keys::parse_key(raw.trim()) else { return Ok(None) };
    type Row = (String, Option<String>, Option<Vec<String>>, Option<OffsetDateTime>);
    let row: Option<Row> = sqlx::query_as(
        "SELECT tenant, robot_id, capabilities, expires_at FROM api_keys
         WHERE key_id = $1 AND secret_sha256 = $2 AND role = 'robot' AND revoked_at IS NULL
           AND (expires_at IS NULL OR expires_at > now())",
    )
    .bind(&parsed.key_id)
    .bind(keys::secret_hash(&parsed.secret))
    .fetch_optional(pool)
    .await?;
    let Some((tenant, robot_id, granted, expires_at)) = row else { return Ok(None) };
    let Ok(tenant) = TenantId::new(tenant) else { return Ok(None) };
    Ok(Some(RobotKey {
        key_id: parsed.key_id,
        tenant,
        robot_id: robot_id.and_then(|r| RobotId::new(r).ok()),
        granted: granted.map(|g| g.into_iter().filter_map(|c| Capability::new(c).ok()).collect()),
        expires_at,
    }))
}

/// Answer one authorization request.
pub async fn handle(core: Arc<Core>, msg: async_nats::Message) {
    let Some(auth) = core.auth.as_ref() else { return };
    let request = match jwt::decode_request(&msg.payload) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "unreadable authorization request; ignored");
            return;
        }
    };
    let outcome = decide(&core, auth, &request).await;
    match &outcome {
        Ok(_) => {
            tracing::debug!(client = request.client_id, host = %request.client_host, "connection admitted")
        }
        Err(reason) => tracing::info!(
            client = request.client_id,
            host = %request.client_host,
            user = request.connect.user.as_deref().unwrap_or(""),
            %reason,
            "connection refused"
        ),
    }
    match auth.issuer.respond(&request, outcome) {
        Ok(answer) => crate::reply(&core, &msg, answer.into_bytes()).await,
        Err(e) => tracing::error!(error = %e, "cannot sign the authorization response"),
    }
}

async fn decide(core: &Core, auth: &Auth, req: &AuthorizationRequest) -> Result<String, String> {
    if let Some(nkey) = req.connect.nkey.as_deref() {
        return observer(core, auth, req, nkey).await;
    }
    let (Some(user), Some(pass)) = (req.connect.user.as_deref(), req.connect.pass.as_deref()) else {
        return Err("credentials required: a robot connects with its robot id and key, an observer \
                    with a creds file from `fleet-orchestrator nats-creds`"
            .into());
    };
    let key = robot_key(&core.store.pool, pass)
        .await
        .map_err(|e| format!("cannot check the key now ({e}); try again"))?
        .ok_or("not a live robot key (unknown, revoked, expired, or not of role robot)")?;
    let sign = |name: String, p: &Permissions, exp: Option<OffsetDateTime>| {
        auth.issuer.user_jwt(&req.user_nkey, &name, p, exp).map_err(|e| e.to_string())
    };
    if user == ENROL_USER {
        let exp = OffsetDateTime::now_utc() + ENROL_TTL;
        let exp = key.expires_at.map_or(exp, |k| k.min(exp));
        return sign(format!("enrol:{}", key.key_id), &permissions::enrol(&key.key_id), Some(exp));
    }
    let robot = RobotId::new(user).map_err(|e| format!("user must be the robot id: {e}"))?;
    if let Some(bound) = &key.robot_id
        && bound != &robot
    {
        return Err(format!("this key is bound to robot {bound}, not {robot}"));
    }
    let offered = req
        .connect
        .name
        .as_deref()
        .and_then(permissions::parse_robot_connection_name)
        .filter(|(id, _)| id == robot.as_str())
        .ok_or("a robot names its connection `fleet-robot <robot id> <capabilities>`")?
        .1;
    let mut offered: Vec<Capability> =
        offered.into_iter().map(Capability::new).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    // `tls` is the server's word, never the robot's: present exactly when the connection
    // carries a client certificate the server verified.
    offered.retain(|c| c.as_str() != TLS_CAPABILITY);
    if req.verified_client_cert {
        offered.push(Capability::new(TLS_CAPABILITY).map_err(|e| e.to_string())?);
    }
    // Recorded on the robot (both sets visible in the robot API); register, claims and
    // heartbeats hold it to the effective set.
    let attested = core
        .store
        .bind_robot_key(&key.tenant, &robot, &key.key_id, &offered)
        .await
        .map_err(|e| format!("cannot bind robot {robot} to this key: {e}"))?;
    let class = Class::new(attested.effective).map_err(|e| e.to_string())?;
    let scope = RobotScope { tenant: key.tenant.clone(), robot, key_id: key.key_id.clone(), class };
    sign(robot_user(&key.key_id), &permissions::robot(&scope), key.expires_at)
}

/// The user name robot connections admitted with `key_id` carry.
pub fn robot_user(key_id: &str) -> String {
    format!("robot:{key_id}")
}

/// The user name observer connections of credential `id` carry.
pub fn observer_user(id: &str) -> String {
    format!("observer:{id}")
}

async fn observer(
    core: &Core,
    auth: &Auth,
    req: &AuthorizationRequest,
    nkey: &str,
) -> Result<String, String> {
    jwt::verify_nkey(nkey, &req.nonce, req.connect.sig.as_deref())
        .map_err(|e| format!("nkey not accepted: {e}"))?;
    type Row = (String, String, Option<OffsetDateTime>);
    let row: Option<Row> = sqlx::query_as(
        "SELECT id, tenant, expires_at FROM nats_credentials
         WHERE public_key = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
    )
    .bind(nkey)
    .fetch_optional(&core.store.pool)
    .await
    .map_err(|e| format!("cannot check the credentials now ({e}); try again"))?;
    let (id, tenant, expires_at) = row.ok_or("unknown, revoked or expired observer nkey")?;
    let tenant = TenantId::new(tenant).map_err(|e| e.to_string())?;
    auth.issuer
        .user_jwt(&req.user_nkey, &observer_user(&id), &permissions::observer(&tenant), expires_at)
        .map_err(|e| e.to_string())
}

/// Answer "who am I" for the key in the subject (`fleet.whoami.<key id>`). Only connections
/// admitted with that key may publish there (and the orchestrator), so the subject is proof.
pub async fn whoami(core: Arc<Core>, msg: async_nats::Message) {
    let key_id = msg.subject.as_str().rsplit('.').next().unwrap_or_default().to_owned();
    type Row = (String, Option<String>, Option<Vec<String>>);
    let row: Result<Option<Row>, _> = sqlx::query_as(
        "SELECT tenant, robot_id, capabilities FROM api_keys
         WHERE key_id = $1 AND role = 'robot' AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
    )
    .bind(&key_id)
    .fetch_optional(&core.store.pool)
    .await;
    let answer: Result<WhoAmI, String> = match row {
        Ok(Some((tenant, robot_id, granted))) => match TenantId::new(tenant) {
            Ok(tenant) => Ok(WhoAmI {
                v: fleet_schemas::robot::ROBOT_PROTOCOL_VERSION,
                tenant,
                robot_id: robot_id.and_then(|r| RobotId::new(r).ok()),
                capabilities: granted,
            }),
            Err(e) => Err(e.to_string()),
        },
        Ok(None) => Err("not a live robot key".into()),
        Err(e) => Err(format!("cannot read the key now: {e}")),
    };
    crate::reply(&core, &msg, codec::encode(&answer)).await;
}

#[derive(Deserialize)]
struct Connz {
    #[serde(default)]
    data: ConnzData,
    #[serde(default)]
    server: ConnzServer,
}

#[derive(Deserialize, Default)]
struct ConnzData {
    #[serde(default)]
    connections: Vec<ConnInfo>,
}

#[derive(Deserialize, Default)]
struct ConnzServer {
    #[serde(default)]
    id: String,
}

#[derive(Deserialize)]
struct ConnInfo {
    cid: u64,
    #[serde(default)]
    authorized_user: String,
    #[serde(default)]
    name: String,
}

/// Disconnect every connection admitted as `user` (a [`robot_user`] or [`observer_user`]).
/// Returns how many were kicked.
pub async fn disconnect(core: &Core, user: &str) -> anyhow::Result<usize> {
    let Some(auth) = core.auth.as_ref() else { return Ok(0) };
    let query = serde_json::json!({ "auth": true, "limit": 100_000 });
    let answer = tokio::time::timeout(
        CONNZ_TIMEOUT,
        auth.sys.request("$SYS.REQ.SERVER.PING.CONNZ", query.to_string().into()),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the server did not list its connections in time"))??;
    let connz: Connz = serde_json::from_slice(&answer.payload)?;
    let mut kicked = 0;
    for conn in connz.data.connections.iter().filter(|c| c.authorized_user == user) {
        let subject = format!("$SYS.REQ.SERVER.{}.KICK", connz.server.id);
        let body = serde_json::json!({ "cid": conn.cid }).to_string();
        match tokio::time::timeout(CONNZ_TIMEOUT, auth.sys.request(subject, body.into())).await {
            Ok(Ok(_)) => {
                tracing::info!(cid = conn.cid, user, name = %conn.name, "disconnected a revoked connection");
                kicked += 1;
            }
            Ok(Err(e)) => tracing::warn!(cid = conn.cid, error = %e, "kick failed"),
            Err(_) => tracing::warn!(cid = conn.cid, "kick not answered in time"),
        }
    }
    Ok(kicked)
}

/// The PostgreSQL channel revocations are announced on.
const REVOKED_CHANNEL: &str = "fleet_nats_revoked";

/// Tell every running orchestrator to disconnect what `user` admitted (a key revoked, rotated
/// or deleted, a credential revoked), from whichever process made the change (API or CLI).
/// A failure is logged: the JWT still expires with the key, and the callout refuses a reconnect.
pub async fn announce_revoked(pool: &sqlx::PgPool, user: &str) {
    if let Err(e) =
        sqlx::query("SELECT pg_notify($1, $2)").bind(REVOKED_CHANNEL).bind(user).execute(pool).await
    {
        tracing::warn!(error = %e, user, "cannot announce a revocation; its connections stay until they drop");
    }
}

/// Listen for revocations and kick their connections, until `stop`.
pub async fn watch_revocations(core: Arc<Core>, stop: tokio_util::sync::CancellationToken) {
    loop {
        let listened = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&core.store.pool).await?;
            listener.listen(REVOKED_CHANNEL).await?;
            loop {
                let note = listener.recv().await?;
                let user = note.payload().to_owned();
                let core = core.clone();
                tokio::spawn(async move {
                    if let Err(e) = disconnect(&core, &user).await {
                        tracing::warn!(error = %e, %user, "cannot disconnect a revoked user");
                    }
                });
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            result = listened => if let Err(e) = result {
                tracing::warn!(error = %e, "revocation listener failed; listening again");
            },
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
