//! The losing pull of a round (issue 11, found by the fabric-healing tests): a robot pulls its
//! class consumer and its own consumer at once with one slot, and takes the first offer. When
//! both consumers hold an offer, the server hands one to each pull before the robot can withdraw
//! the other. That offer used to sit unacked on this robot until the consumer's `ack_wait`
//! (30 s here); it must now be handed back at once and run as soon as the slot frees.

mod common;

use std::time::Duration;

use common::*;
use fleet_schemas::robot::{Offer, RobotReply};
use fleet_schemas::{JobId, codec, subjects};

#[tokio::test]
async fn an_offer_the_losing_pull_received_runs_without_waiting_for_ack_wait() {
    let fabric = prepare(RobotReply::Accepted(grant_for(JobId::new(), sleeping(200)))).await;
    // One offer on each consumer before the robot starts: its first round's two pulls are both
    // answered at once.
    let (class_job, robot_job) = (JobId::new(), JobId::new());
    for (job_id, subject) in [
        (class_job, subjects::class_offers(&tenant(), &fabric.class)),
        (robot_job, subjects::robot_offers(&tenant(), &fabric.robot_id)),
    ] {
        let offer = Offer { v: 1, job_id, offer_no: 1 };
        fabric.js.publish(subject, codec::encode(&offer).into()).await.unwrap().await.unwrap();
    }
    let mut h = fabric.launch();
    h.registered().await;
    let mut claimed = Vec::new();
    // Far below the consumers' 30 s ack_wait: the second offer is claimed once the first job
    // (200 ms) frees the robot's only slot.
    let within = Duration::from_secs(5);
    while claimed.len() < 2 {
        let claim = h
            .next_within(within, |s| match s {
                Seen::Claim(c) if !claimed.contains(&c.job_id) => Some(c.job_id),
                _ => None,
            })
            .await;
        let Some(job_id) = claim else {
            panic!("only {claimed:?} claimed within {within:?} of {class_job} and {robot_job}")
        };
        claimed.push(job_id);
    }
    claimed.sort();
    let mut expected = vec![class_job, robot_job];
    expected.sort();
    assert_eq!(claimed, expected);
    h.stop().await;
}
