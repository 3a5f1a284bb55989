//! The scenarios, one module each. Each is a library function taking a params struct (also the
//! scenario's command-line options), so the `cargo test` smoke runs the same code with tiny
//! parameters that the benchmark runs at full size.

pub mod api;
pub mod fleet_scale;
pub mod latency;
pub mod raw_jetstream;
pub mod routing;
pub mod throughput;

use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::measure::{Meter, Targets};
use crate::stack::{Stack, StackOptions};

/// Options every Fleet scenario takes.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct Common {
    /// Worker threads of each part's tokio runtime (orchestrator, gateway, robots each have one).
    #[arg(long, default_value_t = 2)]
    pub worker_threads: usize,
    /// Size of the orchestrator's PostgreSQL pool.
    #[arg(long, default_value_t = 16)]
    pub db_pool: u32,
    /// Count every NATS message by kind with a wiretap subscription on `>` (the per-job message
    /// breakdown). The tap adds a delivery per message: use it for the cost table, not for
    /// timing.
    #[arg(long)]
    pub tap: bool,
    /// The orchestrator's `prefetch`: offers a class may hold beyond its free slots (default:
    /// the orchestrator's own default).
    #[arg(long)]
    pub prefetch: Option<u32>,
    /// Fail when no job finishes for this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "as_secs")]
    pub stall: Duration,
}

impl Default for Common {
    fn default() -> Self {
        Self { worker_threads: 2, db_pool: 16, tap: false, prefetch: None, stall: Duration::from_secs(60) }
    }
}

impl Common {
    pub fn stack_options(&self) -> StackOptions {
        StackOptions {
            worker_threads: self.worker_threads,
            db_pool_size: self.db_pool,
            prefetch: self.prefetch,
            ..Default::default()
        }
    }
}

/// Durations print as seconds in the JSON summary.
pub fn as_secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Start measuring a stack: its nats-server, database and JetStream, plus the tap if asked.
pub async fn meter(stack: &Stack, common: &Common) -> anyhow::Result<Meter> {
    let targets = Targets {
        nats_pid: stack.nats.pid(),
        db: Some(stack.bench_db.clone()),
        js: Some(async_nats::jetstream::new(stack.client.clone())),
    };
    let tap = if common.tap { Some(stack.nats.client().await?) } else { None };
    Meter::start(targets, tap).await
}
