//! Fleet's NATS security: who may do what ([`permissions`]), the locked server configuration
//! and service keys ([`setup`]), how each program presents its credentials ([`client`]), and
//! the JWTs of the auth callout the orchestrator answers ([`jwt`]).
//!
//! Why an auth callout (DESIGN notes): robots enrol by API key, keys are created and revoked in
//! PostgreSQL at any time, and a robot's rights depend on its tenant, id and attested class.
//! With the callout the server asks the orchestrator at every connect, so a new key works at
//! once and a revoked one can never reconnect, without restarting or reloading nats-server and
//! without an operator/account JWT hierarchy to run. The services (orchestrator, gateway) are
//! static nkey users with fixed permissions, so they connect even when no orchestrator is up.

pub mod client;
pub mod jwt;
pub mod permissions;
pub mod setup;

pub use client::Credentials;
pub use jwt::{AuthorizationRequest, Issuer};
pub use permissions::{Permissions, RobotScope};
