//! `fleet-bench <scenario> [options]`: runs one scenario, prints its table and a JSON summary,
//! and exits non-zero when a correctness check failed (a job not completed, or completed twice).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleet_bench::Report;
use fleet_bench::scenario::api::{self, ApiParams};
use fleet_bench::scenario::fleet_scale::{self, FleetScaleParams};
use fleet_bench::scenario::latency::{self, LatencyParams};
use fleet_bench::scenario::raw_jetstream::{self, RawParams};
use fleet_bench::scenario::routing::{self, RoutingParams};
use fleet_bench::scenario::throughput::{self, ThroughputParams};

/// Fleet's benchmarks. Each scenario starts its own nats-server (FLEET_NATS_SERVER, else the
/// clone's .tools/nats/bin/nats-server, else a nats-server >= 2.11 on PATH, else the pinned one
/// installed into .tools/nats) and a throwaway PostgreSQL database (FLEET_TEST_DATABASE_URL,
/// default postgres://postgres@127.0.0.1:5432/postgres), runs Fleet's parts in this process,
/// and prints a table and a JSON summary. Build with --release.
#[derive(Parser)]
#[command(name = "fleet-bench", version)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Also write the JSON summary to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Scenario {
    /// The physical limit: a work-queue stream with FLEET_JOBS's settings, pipelined publishes,
    /// N pullers fetching and double-acking; messages/s and publish-to-receive latency.
    RawJetstream(RawParams),
    /// N no-op jobs as fast as accepted, over the NATS API and then the HTTP gateway, run by
    /// in-process robots; jobs/s from first submit to last completion, beside raw-jetstream.
    Throughput(ThroughputParams),
    /// Open-loop arrivals over HTTP (no coordinated omission): submit, submit-to-start and
    /// submit-to-complete percentiles.
    Latency(LatencyParams),
    /// Many simulated robots heartbeating: orchestrator CPU while idle, KV watch lag, and how
    /// long the fleet view takes to notice robots going offline.
    FleetScale(FleetScaleParams),
    /// Robots in five capability classes, jobs requiring subsets: offers/s, submit-to-start,
    /// routing correctness and best-fit share.
    Routing(RoutingParams),
    /// The seed's API table (list robots, submit, assignment, heartbeat, event) measured under
    /// a steady background load, beside the seed's figures.
    Api(ApiParams),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // The load generator's runtime; each Fleet part gets its own (see fleet_bench::stack).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-load")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleet-bench: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("fleet-bench: correctness check FAILED (see the tables above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("fleet-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let reports: Vec<Report> = match &cli.scenario {
        Scenario::RawJetstream(p) => vec![raw_jetstream::run(p).await?],
        Scenario::Throughput(p) => throughput::run(p).await?,
        Scenario::Latency(p) => vec![latency::run(p).await?],
        Scenario::FleetScale(p) => vec![fleet_scale::run(p).await?],
        Scenario::Routing(p) => vec![routing::run(p).await?],
        Scenario::Api(p) => vec![api::run(p).await?],
    };
    for r in &reports {
        println!("{}", r.table());
    }
    let json = serde_json::to_string_pretty(&reports)?;
    println!("\n--- JSON summary ---\n{json}");
    if let Some(path) = &cli.json {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(reports.iter().all(|r| r.correctness.ok))
}
