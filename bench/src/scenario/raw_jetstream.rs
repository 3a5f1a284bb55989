//! `raw-jetstream`: the physical limit for Fleet's shape of work on this machine, with no Fleet
//! code. A work-queue stream with `FLEET_JOBS`'s settings (file storage, 120 s duplicate
//! window, publishes carrying a `Nats-Msg-Id`), one durable pull consumer configured like a class
//! consumer (explicit ack, `prioritized` policy, `max_waiting` 4096) shared by N pullers on their
//! own connections, as the robots of one class share theirs. Each puller fetches `batch`
//! messages (1 = a robot's shape) and double-acks each, as a robot acks a claimed offer.
//! Publishes are pipelined (`window` in flight).
//!
//! Publish-to-receive latency is measured under saturation (everything is published as fast as
//! possible), so it includes the time messages wait in the stream.

use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer, message::PublishMessage, stream};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::measure::{Meter, Targets};
use crate::report::{Recorder, Report};
use crate::stack::runtime;

const STREAM: &str = "BENCH_RAW";
const SUBJECT: &str = "bench.raw.default.any";
/// Payload size: about an offer's (MessagePack job id and offer number) plus the timestamp.
const PAYLOAD: usize = 64;

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct RawParams {
    /// Messages to publish.
    #[arg(long, default_value_t = 50_000)]
    pub messages: u64,
    /// Pullers sharing the one durable consumer, each on its own connection (like the robots of
    /// a class).
    #[arg(long, default_value_t = 50)]
    pub consumers: usize,
    /// Messages per pull (1 is a robot's shape: one offer at a time).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Publishes in flight (their acks are awaited as they come back).
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Worker threads of the pullers' runtime.
    #[arg(long, default_value_t = 2)]
    pub worker_threads: usize,
    /// Count every NATS message by kind with a wiretap on `>`.
    #[arg(long)]
    pub tap: bool,
}

impl Default for RawParams {
    fn default() -> Self {
        Self { messages: 50_000, consumers: 50, batch: 1, window: 256, worker_threads: 2, tap: false }
    }
}

/// Time without any message received after which the run fails.
const STALL: Duration = Duration::from_secs(30);

pub async fn run(p: &RawParams) -> anyhow::Result<Report> {
    let mut report = Report::new("raw-jetstream", p);
    let nats = fleet_testkit::NatsServer::start().await?;
    let client = nats.client().await?;
    let js = jetstream::new(client.clone());
    let stream = js
        .create_stream(stream::Config {
            name: STREAM.to_owned(),
            subjects: vec!["bench.raw.>".to_owned()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .context("creating the stream")?;
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("bench_raw".to_owned()),
            filter_subject: SUBJECT.to_owned(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_waiting: 4096,
            priority_policy: consumer::PriorityPolicy::Prioritized,
            priority_groups: vec!["robots".to_owned()],
            ..Default::default()
        })
        .await
        .context("creating the consumer")?;

    let rt = runtime("fleet-robots", p.worker_threads)?;
    let base = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let duplicates = Arc::new(AtomicU64::new(0));
    let seen: Arc<Vec<AtomicBool>> = Arc::new((0..p.messages).map(|_| AtomicBool::new(false)).collect());
    let latency = Recorder::default();
    let done = CancellationToken::new();
    let done_at = Arc::new(OnceLock::new());
    let errors = Arc::new(AtomicU64::new(0));
    let mut pullers = Vec::new();
    for _ in 0..p.consumers {
        let c = nats.client().await?;
        let consumer: consumer::PullConsumer = jetstream::new(c.clone())
            .get_stream(STREAM)
            .await?
            .get_consumer("bench_raw")
            .await
            .map_err(|e| anyhow::anyhow!("looking up the consumer: {e}"))?;
        let (received, duplicates, seen, latency, done, done_at, errors) = (
            received.clone(),
            duplicates.clone(),
            seen.clone(),
            latency.clone(),
            done.clone(),
            done_at.clone(),
            errors.clone(),
        );
        let (total, batch) = (p.messages, p.batch.max(1));
        pullers.push(rt.spawn(async move {
            while !done.is_cancelled() {
                let fetched = consumer
                    .fetch()
                    .max_messages(batch)
                    .expires(Duration::from_secs(1))
                    .group("robots")
                    .priority(8)
                    .messages()
                    .await;
                let mut messages = match fetched {
                    Ok(m) => m,
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                while let Some(m) = tokio::select! {
                    m = messages.next() => m,
                    _ = done.cancelled() => None,
                } {
                    let Ok(m) = m else {
                        errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let (i, sent) = decode(&m.payload);
                    latency.record_us((base.elapsed().as_nanos() as u64).saturating_sub(sent) / 1000);
                    if m.double_ack().await.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    match seen.get(i as usize) {
                        Some(flag) if !flag.swap(true, Ordering::Relaxed) => {}
                        _ => {
                            duplicates.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                    if received.fetch_add(1, Ordering::Relaxed) + 1 >= total {
                        let _ = done_at.set(Instant::now());
                        done.cancel();
                    }
                }
            }
            drop(c);
        }));
    }

    let targets = Targets { nats_pid: nats.pid(), db: None, js: Some(js.clone()) };
    let tap = if p.tap { Some(nats.client().await?) } else { None };
    let meter = Meter::start(targets, tap).await?;
    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    let mut publish_errors = 0u64;
    for i in 0..p.messages {
        let sent = base.elapsed().as_nanos() as u64;
        let publish = PublishMessage::build().message_id(format!("{i}:1")).payload(encode(i, sent).into());
        in_flight.push(js.send_publish(SUBJECT, publish).await?.into_future());
        if in_flight.len() >= p.window.max(1) && matches!(in_flight.next().await, Some(Err(_))) {
            publish_errors += 1;
        }
    }
    while let Some(ack) = in_flight.next().await {
        if ack.is_err() {
            publish_errors += 1;
        }
    }
    let published = started.elapsed();

    let mut last = received.load(Ordering::Relaxed);
    let mut last_move = Instant::now();
    while !done.is_cancelled() {
        tokio::select! {
            _ = done.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let now = received.load(Ordering::Relaxed);
        if now != last {
            (last, last_move) = (now, Instant::now());
        } else if last_move.elapsed() > STALL {
            done.cancel();
            bail!("raw-jetstream stalled: {now} of {} messages received", p.messages);
        }
    }
    let elapsed = done_at.get().copied().unwrap_or_else(Instant::now).duration_since(started);
    meter.finish(&mut report, "message", p.messages).await;
    for puller in pullers {
        let _ = puller.await;
    }
    drop(rt);

    report.rate("publish (pipelined, acked)", p.messages, published);
    let per_second = report.rate("publish → pull → double-ack, end to end", p.messages, elapsed);
    report.latencies.push(latency.summary("publish → received (under saturation)"));
    report.figure("messages/s end to end", per_second, "msg/s", "");
    report.correctness.expected = p.messages;
    report.correctness.completed = received.load(Ordering::Relaxed);
    report.correctness.completed_twice = duplicates.load(Ordering::Relaxed);
    if report.correctness.completed != p.messages {
        report
            .correctness
            .fail(format!("{} of {} messages received", report.correctness.completed, p.messages));
    }
    if report.correctness.completed_twice > 0 {
        report.correctness.fail(format!("{} messages delivered twice", report.correctness.completed_twice));
    }
    if publish_errors > 0 {
        report.correctness.fail(format!("{publish_errors} publishes failed"));
    }
    let pull_errors = errors.load(Ordering::Relaxed);
    if pull_errors > 0 {
        report.note(format!("{pull_errors} pull or ack errors (retried)"));
    }
    Ok(report)
}

fn encode(i: u64, sent_ns: u64) -> Vec<u8> {
    let mut payload = Vec::with_capacity(PAYLOAD);
    payload.extend_from_slice(&i.to_le_bytes());
    payload.extend_from_slice(&sent_ns.to_le_bytes());
    payload.resize(PAYLOAD, 0);
    payload
}

fn decode(payload: &[u8]) -> (u64, u64) {
    let word = |at: usize| {
        payload.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).unwrap_or(u64::MAX)
    };
    (word(0), word(8))
}
