//! Fleet's wire contract: typed ids, subject and stream names, message types and codecs.
//!
//! No I/O lives here, so every other crate can depend on it and the contract can be read in one
//! place. MessagePack (named fields) for robot and API traffic, JSON for events.

pub mod api;
pub mod codec;
pub mod event;
pub mod ids;
pub mod keys;
pub mod robot;
pub mod secrets;
pub mod subjects;
pub mod text;
pub mod workflow;

pub use ids::{Capability, Class, IdError, JobId, RequestId, RobotId, SessionId, TenantId};
