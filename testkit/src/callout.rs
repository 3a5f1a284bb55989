//! A stand-in for the orchestrator's auth callout, for tests that run a robot without an
//! orchestrator (the robot crate's own tests): it admits every robot that presents a
//! well-formed key, as a robot of `tenant` with exactly the rights the real callout would give
//! it (the same [`fleet_nats_auth::permissions::robot`]), so those tests run against the same
//! permissions production enforces.

use fleet_nats_auth::jwt;
use fleet_nats_auth::permissions::{self, RobotScope};
use fleet_schemas::ids::{Capability, Class, RobotId, TenantId};
use futures::StreamExt;

use crate::NatsServer;

/// Answer the server's authorization requests until the returned task is aborted (or the
/// server goes away). A robot's class is `class` when given (as a test's fake orchestrator
/// grants it), else what it offers.
pub async fn admit_robots(
    server: &NatsServer,
    tenant: TenantId,
    class: Option<Class>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let client = server.client().await?;
    let issuer = server.issuer();
    let mut requests = client.subscribe("$SYS.REQ.USER.AUTH").await?;
    let mut whoami = client.subscribe(permissions::WHOAMI_REQUESTS).await?;
    client.flush().await?;
    let answers = client.clone();
    let who = fleet_schemas::robot::WhoAmI {
        v: fleet_schemas::robot::ROBOT_PROTOCOL_VERSION,
        tenant: tenant.clone(),
        robot_id: None,
        capabilities: None,
    };
    tokio::spawn(async move {
        while let Some(msg) = whoami.next().await {
            if let Some(reply) = msg.reply {
                let answer: Result<_, String> = Ok(who.clone());
                let _ = answers.publish(reply, fleet_schemas::codec::encode(&answer).into()).await;
            }
        }
    });
    Ok(tokio::spawn(async move {
        while let Some(msg) = requests.next().await {
            let Ok(request) = jwt::decode_request(&msg.payload) else { continue };
            let outcome = (|| {
                let key = request.connect.pass.as_deref().ok_or("no key")?;
                let key_id = fleet_nats_auth::client::key_id(key).map_err(|e| e.to_string())?;
                let user = request.connect.user.as_deref().ok_or("no user")?;
                if user == permissions::ENROL_USER {
                    return issuer
                        .user_jwt(
                            &request.user_nkey,
                            &format!("enrol:{key_id}"),
                            &permissions::enrol(&key_id),
                            None,
                        )
                        .map_err(|e| e.to_string());
                }
                let robot = RobotId::new(user).map_err(|e| e.to_string())?;
                let (_, offered) = request
                    .connect
                    .name
                    .as_deref()
                    .and_then(permissions::parse_robot_connection_name)
                    .ok_or("no robot connection name")?;
                let caps = offered
                    .into_iter()
                    .map(Capability::new)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                let class = match &class {
                    Some(c) => c.clone(),
                    None => Class::new(caps).map_err(|e| e.to_string())?,
                };
                let scope = RobotScope { tenant: tenant.clone(), robot, key_id: key_id.clone(), class };
                issuer
                    .user_jwt(
                        &request.user_nkey,
                        &format!("robot:{key_id}"),
                        &permissions::robot(&scope),
                        None,
                    )
                    .map_err(|e| e.to_string())
            })();
            let Ok(answer) = issuer.respond(&request, outcome) else { continue };
            if let Some(reply) = msg.reply {
                let _ = client.publish(reply, answer.into()).await;
            }
        }
    }))
}

/// A well-formed robot key (the stand-in checks only its shape).
pub fn any_robot_key() -> String {
    fleet_schemas::keys::new_key().2
}
