//! Fleet's robot agent: pulls job offers for its capabilities, claims them from the
//! orchestrator, runs them and reports back.
//!
//! The pieces, in the order a job meets them:
//! - [`config`] and [`cli`]: who the robot is and what it can run;
//! - [`agent`]: connect, register, serve, shut down ([`run`] and [`run_until_exit`] are the whole
//!   robot);
//! - [`commands`]: the desired state the orchestrator keeps for the robot (pause, maintenance,
//!   drain, stop, restart), watched in the `fleet_commands` bucket;
//! - [`heartbeat`]: the robot's KV entry with a per-message TTL;
//! - [`metrics`]: custom metrics in the heartbeat (`--metric`, runners' `FLEET_METRIC` lines);
//! - [`pull`]: one job slot, one pull, least busy robot first;
//! - [`job`]: claim, ack, run, report: the steppable part ([`job::handle_offer`], [`job::run_job`]);
//! - [`lease`]: renewals, and why a job stops;
//! - [`report`]: log lines, progress;
//! - [`bound`]: the budgets that keep every report below the server's max payload;
//! - [`executor`]: the step engine for Fleet v1 and external runners;
//! - [`rpc`]: the request/reply plumbing with backoff.
//!
//! PostgreSQL (through the orchestrator) is the truth about who runs what: JetStream only
//! delivers offers. So the robot acks an offer only after its claim is accepted, stops a job only
//! when the orchestrator refuses its lease (never merely because it cannot reach it), and retries
//! its reports until they are answered.

pub mod agent;
pub mod bound;
pub mod cli;
pub mod commands;
pub mod config;
pub mod enrol;
pub mod executor;
pub mod heartbeat;
pub mod job;
pub mod lease;
pub mod metrics;
pub mod pull;
pub mod redact;
pub mod report;
pub mod rpc;

pub use agent::{Robot, run, run_until_exit, run_with_executors, run_with_executors_until_exit};
pub use commands::Exit;
pub use config::{RobotConfig, RobotKey, RunnerSpec};
pub use executor::{Execution, Executor, Executors, JobContext, RunReport};
pub use job::{JobEnd, OfferOutcome};
