//! Fleet's robot agent: pulls job offers for its capabilities, claims them from the
//! orchestrator, runs them and reports back.
//!
//! The pieces, in the order a job meets them:
//! - [`config`] and [`cli`]: who the robot is and what it can run;
//! - [`agent`]: connect, register, serve, shut down ([`run`] is the whole robot);
//! - [`heartbeat`]: the robot's KV entry with a per-message TTL;
//! - [`pull`]: one job slot, one pull, least busy robot first;
//! - [`job`]: claim, ack, run, report: the steppable part ([`job::handle_offer`], [`job::run_job`]);
//! - [`lease`]: renewals, and why a job stops;
//! - [`report`]: log lines, progress;
//! - [`executor`]: the step engine for Fleet v1 and external runners;
//! - [`rpc`]: the request/reply plumbing with backoff.
//!
//! PostgreSQL (through the orchestrator) is the truth about who runs what: JetStream only
//! delivers offers. So the robot acks an offer only after its claim is accepted, stops a job only
//! when the orchestrator refuses its lease (never merely because it cannot reach it), and retries
//! its reports until they are answered.

pub mod agent;
pub mod cli;
pub mod config;
pub mod executor;
pub mod heartbeat;
pub mod job;
pub mod lease;
pub mod pull;
pub mod report;
pub mod rpc;

pub use agent::{Robot, run, run_with_executors};
pub use config::{RobotConfig, RunnerSpec};
pub use executor::{Execution, Executor, Executors, JobContext, RunReport};
pub use job::{JobEnd, OfferOutcome};
