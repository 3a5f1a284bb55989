//! A seconds-long smoke of every scenario with tiny parameters, so `cargo test --workspace`
//! (what `.ci/run` runs) checks the benchmark still works: correctness only (every job completed,
//! none twice), never timings.

use std::time::Duration;

use fleet_bench::Report;
use fleet_bench::scenario::Common;
use fleet_bench::scenario::api::{self, ApiParams};
use fleet_bench::scenario::fleet_scale::{self, FleetScaleParams};
use fleet_bench::scenario::latency::{self, LatencyParams};
use fleet_bench::scenario::raw_jetstream::{self, RawParams};
use fleet_bench::scenario::routing::{self, RoutingParams};
use fleet_bench::scenario::throughput::{self, ThroughputParams, Via};

/// One worker thread per part and a short stall limit: the smoke runs beside other tests.
fn common() -> Common {
    Common { worker_threads: 1, stall: Duration::from_secs(20), ..Default::default() }
}

fn assert_ok(reports: &[Report]) {
    for r in reports {
        assert!(r.correctness.ok, "{}", r.table());
        assert!(r.correctness.completed > 0, "{}", r.table());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_jetstream_smoke() {
    let p = RawParams { messages: 500, consumers: 5, worker_threads: 1, ..Default::default() };
    assert_ok(&[raw_jetstream::run(&p).await.unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_smoke() {
    let p = ThroughputParams {
        jobs: 200,
        concurrency: 16,
        robots: 5,
        via: vec![Via::Nats, Via::Http],
        raw_messages: 200,
        timeout: Duration::from_secs(60),
        common: common(),
        ..Default::default()
    };
    let reports = throughput::run(&p).await.unwrap();
    assert_eq!(reports.len(), 3, "raw reference + two phases");
    assert_ok(&reports);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_smoke() {
    let p = LatencyParams {
        rate: 100.0,
        duration: Duration::from_secs(2),
        robots: 5,
        common: common(),
        ..Default::default()
    };
    assert_ok(&[latency::run(&p).await.unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_scale_smoke() {
    let p = FleetScaleParams {
        robots: 50,
        connections: 2,
        interval: Duration::from_secs(1),
        ttl: Duration::from_secs(3),
        idle: Duration::from_secs(1),
        offline: 10,
        offline_ttl: Duration::from_secs(1),
        register_concurrency: 16,
        common: common(),
    };
    assert_ok(&[fleet_scale::run(&p).await.unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_smoke() {
    let p = RoutingParams {
        robots: 5,
        rate: 100.0,
        duration: Duration::from_secs(2),
        common: common(),
        ..Default::default()
    };
    let report = routing::run(&p).await.unwrap();
    assert_ok(std::slice::from_ref(&report));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_smoke() {
    let p = ApiParams {
        sim_robots: 20,
        robots: 5,
        rate: 50.0,
        duration: Duration::from_secs(2),
        probe_interval: Duration::from_millis(200),
        interval: Duration::from_secs(1),
        connections: 1,
        common: common(),
    };
    assert_ok(&[api::run(&p).await.unwrap()]);
}
