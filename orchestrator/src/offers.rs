//! Publishing offers on `FLEET_JOBS`, and remembering their stream sequences.
//!
//! An offer is published after the transaction that queued the job commits, so a robot that
//! receives it always finds the job. If the orchestrator stops in between, the job is queued
//! without a recorded sequence and the next leader publishes it again (same `Nats-Msg-Id`, so
//! the stream drops the copy if the first one made it). Sequences are recorded in batches off
//! the hot path: they are only needed by the watchdog.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use fleet_schemas::JobId;
use fleet_schemas::codec::{decode, encode};
use fleet_schemas::robot::{Offer, ROBOT_PROTOCOL_VERSION};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::Core;
use crate::store::ToOffer;

/// Sequences waiting to be recorded. Past this the publisher waits: a bounded queue keeps a
/// stalled database from growing memory without limit.
const SEQ_QUEUE: usize = 16 * 1024;
/// Sequences recorded per statement.
const SEQ_BATCH: usize = 1000;

pub struct Offers {
    js: jetstream::Context,
    seq_tx: mpsc::Sender<(JobId, i32, u64)>,
    seq_rx: tokio::sync::Mutex<mpsc::Receiver<(JobId, i32, u64)>>,
    /// The fabric reconciler's wake-up: a failed publish may mean a deleted stream.
    repair: Arc<Notify>,
}

impl Offers {
    pub fn new(js: jetstream::Context, repair: Arc<Notify>) -> Self {
        let (seq_tx, seq_rx) = mpsc::channel(SEQ_QUEUE);
        Self { js, seq_tx, seq_rx: tokio::sync::Mutex::new(seq_rx), repair }
    }

    /// Publish an offer and wait for the stream to store it. Returns the stream sequence.
    pub async fn publish(&self, offer: &ToOffer) -> anyhow::Result<u64> {
        let msg = Offer { v: ROBOT_PROTOCOL_VERSION, job_id: offer.job_id, offer_no: offer.offer_no };
        let publish = PublishMessage::build().message_id(msg.msg_id()).payload(encode(&msg).into());
        let ack = self.js.send_publish(offer.subject.clone(), publish).await?.await?;
        if self.seq_tx.send((offer.job_id, offer.offer_no, ack.sequence)).await.is_err() {
            tracing::debug!("sequence recorder stopped");
        }
        Ok(ack.sequence)
    }

    /// Publish, logging a failure: the job stays queued without a sequence and the watchdog
    /// publishes it again.
    pub async fn publish_or_log(&self, offer: &ToOffer) {
        if let Err(e) = self.publish(offer).await {
            self.repair.notify_one();
            tracing::warn!(job_id = %offer.job_id, error = %e, "offer not published yet; the watchdog will retry");
        }
    }

    /// Whether the stream still holds this offer at `seq`. The message there must be the offer
    /// itself, not merely some message: a recreated stream numbers its messages from 1 again,
    /// so an old offer's sequence may name another job's offer.
    pub async fn holds(
        &self,
        stream: &jetstream::stream::Stream,
        seq: u64,
        job_id: JobId,
        offer_no: i32,
    ) -> bool {
        match stream.get_raw_message(seq).await {
            Ok(msg) => decode::<Offer>("offer", &msg.payload)
                .is_ok_and(|o| o.job_id == job_id && o.offer_no == offer_no),
            Err(e) => {
                // Gone, or the whole stream is: let the fabric reconciler look.
                if !matches!(e.kind(), jetstream::stream::LastRawMessageErrorKind::NoMessageFound) {
                    self.repair.notify_one();
                }
                false
            }
        }
    }

    /// Delete an offer's message (recall); a missing message is fine.
    pub async fn delete(&self, stream: &jetstream::stream::Stream, seq: u64) {
        if let Err(e) = stream.delete_message(seq).await {
            tracing::debug!(seq, error = %e, "offer message already gone");
        }
    }
}

/// Record offer sequences in batches until `token` is cancelled.
pub async fn record_seqs(core: Arc<Core>, token: CancellationToken) {
    let mut rx = core.offers.seq_rx.lock().await;
    let mut batch = Vec::with_capacity(SEQ_BATCH);
    loop {
        let n = tokio::select! {
            _ = token.cancelled() => break,
            n = rx.recv_many(&mut batch, SEQ_BATCH) => n,
        };
        if n == 0 {
            break;
        }
        // Retry a few times: losing a batch only means the watchdog republishes those offers
        // (deduplicated by message id), so this need not be perfect.
        for attempt in 0..3 {
            match core.store.record_offer_seqs(&batch).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "recording offer sequences failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        batch.clear();
    }
}
