//! Rate limits end to end, on a gateway without development mode: a key's own limit (set when it
//! is made, kept when it is rotated) and the gateway's default, both by key id; requests without
//! a valid key by peer IP; 429 with `Retry-After`, then recovery once it has passed.
//!
//! Limits are counted in time, so these tests send requests until the first 429 (a bounded
//! number of them) rather than exactly as many as the burst: a stalled machine may refill a
//! bucket meanwhile, but can never refuse before the burst is used up.

mod common;

use std::time::Duration;

use common::{Secure, Stack};
use fleet_gateway::config::RateLimit;
use fleet_schemas::api::{ApiRequest, Endpoint, VerifyKey};
use fleet_schemas::codec::decode;
use fleet_schemas::keys::{Rate, Role};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

/// How a request presents its key.
#[derive(Clone, Copy)]
enum Present {
    Both,
    Bearer,
    XApiKey,
}

/// Send `GET /api/v1/metrics/fleet` with `key` until the first 429, at most `max` times; returns
/// how many were answered 200 before it, and the 429's `Retry-After` in seconds. Each request
/// presents the key a different way, which must not matter: the bucket is the key's.
async fn until_limited(secure: &Secure, key: &str, max: usize) -> (usize, u64) {
    let ways = [Present::Both, Present::Bearer, Present::XApiKey];
    for i in 0..max {
        let mut req = secure.http.get(format!("{}/api/v1/metrics/fleet", secure.base));
        req = match ways[i % ways.len()] {
            Present::Both => req.bearer_auth(key).header("x-api-key", key),
            Present::Bearer => req.bearer_auth(key),
            Present::XApiKey => req.header("x-api-key", key),
        };
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        if status == 429 {
            let retry_after = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], "rate_limited", "{body}");
            return (i, retry_after);
        }
        assert_eq!(status, 200, "request {i}: {:?}", r.text().await);
    }
    panic!("no 429 within {max} requests");
}

/// Make a key over HTTP; returns the key and its object.
async fn make_key(secure: &Secure, admin: &str, body: Value) -> (String, Value) {
    let (status, made) = secure.send(Method::POST, "/api/v1/api-keys", Some(admin), Some(body)).await;
    assert_eq!(status, 200, "{made}");
    (made["api_key"].as_str().unwrap().to_owned(), made["key"].clone())
}

/// A key's own limit applies to it alone, by key id (whichever header carries it, and after
/// rotation), and recovers once `Retry-After` has passed; keys without one get the default.
#[tokio::test]
async fn a_keys_own_limit_applies_to_that_key_alone_and_recovers() {
    let stack = Stack::start().await;
    // Default: 20 at once, then one a second.
    let default = RateLimit { requests: 20, per: Duration::from_secs(20), burst: 20 };
    let secure = Secure::start_with(&stack, |c| c.rate_limit = Some(default)).await;
    // The admin's own limit keeps the setup requests out of the default's way.
    let admin = stack.cli_key("acme", Role::Admin, Some(Rate::parse("1000/min").unwrap())).await;

    let (low, low_object) =
        make_key(&secure, &admin, json!({"name": "low", "role": "viewer", "rate_limit": "2/s"})).await;
    let (busy, _) =
        make_key(&secure, &admin, json!({"name": "busy", "role": "viewer", "rate_limit": "100/min"})).await;
    let (plain, plain_object) = make_key(&secure, &admin, json!({"name": "plain", "role": "viewer"})).await;
    assert_eq!((&low_object["rate_limit"], &plain_object["rate_limit"]), (&json!("2/s"), &Value::Null));
    let (status, list) = secure.send(Method::GET, "/api/v1/api-keys", Some(&admin), None).await;
    assert_eq!(status, 200, "{list}");
    let listed = |name: &str| -> Value {
        list["keys"].as_array().unwrap().iter().find(|k| k["name"] == name).unwrap()["rate_limit"].clone()
    };
    assert_eq!(
        (listed("low"), listed("busy"), listed("plain"), listed("cli")),
        (json!("2/s"), json!("100/min"), Value::Null, json!("1000/min")),
        "the key list shows each key's own limit"
    );

    // The low key: its burst of 2, then 429 with Retry-After; the other keys are unaffected.
    let (served, retry_after) = until_limited(&secure, &low, 50).await;
    assert!(served >= 2, "the burst is the whole second's allowance: {served}");
    assert_eq!(retry_after, 1, "one request every 500 ms: Retry-After rounds up to 1 s");
    let (status, _) = secure.send(Method::GET, "/api/v1/metrics/fleet", Some(&plain), None).await;
    assert_eq!(status, 200, "another key of the same tenant is not limited by it");
    // Recovery: after Retry-After the key is served again (a client honouring it never sees
    // two 429s in a row).
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let (status, body) = secure.send(Method::GET, "/api/v1/metrics/fleet", Some(&low), None).await;
    assert_eq!(status, 200, "after Retry-After: {body}");

    // Without a limit of its own a key gets the default (20), with one it may go higher (100).
    let (served, _) = until_limited(&secure, &plain, 100).await;
    assert!((20..40).contains(&served), "the default's burst is 20: {served}");
    let (served, _) = until_limited(&secure, &busy, 200).await;
    assert!(served >= 100, "a key's own limit may be above the default: {served}");

    // Rotation keeps the key, and so its limit and its bucket.
    let low_id = low_object["id"].as_str().unwrap();
    let (status, rotated) =
        secure.send(Method::POST, &format!("/api/v1/api-keys/{low_id}/rotate"), Some(&admin), None).await;
    assert_eq!((status, &rotated["key"]["rate_limit"]), (200, &json!("2/s")), "{rotated}");
    let (served, _) = until_limited(&secure, rotated["api_key"].as_str().unwrap(), 50).await;
    assert!(served < 20, "the rotated key is still limited at 2/s, not the default: {served}");

    // A bad limit is a 422 naming the field.
    for bad in [json!("fast"), json!("0/min"), json!("10/week"), json!("2000000000/s"), json!(5)] {
        let body = json!({"name": "x", "role": "viewer", "rate_limit": bad});
        let (status, answer) = secure.send(Method::POST, "/api/v1/api-keys", Some(&admin), Some(body)).await;
        assert_eq!((status, answer["error"]["field"].as_str()), (422, Some("rate_limit")), "{bad}: {answer}");
    }
    drop(secure);
    stack.stop().await;
}

/// Requests without a valid key are charged to their peer: after as many 401s as the default
/// allows, wrong keys and no key from that address get 429 (and are not even looked up), while
/// another address is unaffected; the address recovers after `Retry-After`.
#[tokio::test]
async fn wrong_keys_from_one_address_are_limited_by_address() {
    let stack = Stack::start().await;
    // Default: 5 at once, then one a second.
    let default = RateLimit { requests: 5, per: Duration::from_secs(5), burst: 5 };
    let secure = Secure::start_with(&stack, |c| c.rate_limit = Some(default)).await;
    let wrong = |i: usize| format!("crpa_{:032x}_{}", i, "0".repeat(64));

    let mut unauthorized = 0;
    let retry_after = loop {
        assert!(unauthorized < 50, "no 429 after {unauthorized} wrong keys");
        let (status, headers, body) =
            secure.send_full(Method::GET, "/api/v1/metrics/jobs", Some(&wrong(unauthorized)), None).await;
        if status == 429 {
            assert_eq!(body["error"]["code"], "rate_limited", "{body}");
            break headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap();
        }
        assert_eq!(status, 401, "{body}");
        unauthorized += 1;
    };
    assert!(unauthorized >= 5, "the default's burst of 5 is answered 401 first: {unauthorized}");
    assert_eq!(retry_after, 1);
    // Watch the orchestrator's key lookups from here on.
    let nats = stack.nats.client().await.unwrap();
    let mut lookups = nats.subscribe(Endpoint::VerifyKey.subject()).await.unwrap();
    nats.flush().await.unwrap();
    // The same address, with more wrong keys, without a key or with a malformed one: limited
    // too, and its keys are not looked up.
    for i in 0..10 {
        let (status, body) =
            secure.send(Method::GET, "/api/v1/metrics/jobs", Some(&wrong(100 + i)), None).await;
        assert_eq!(status, 429, "{body}");
    }
    for key in [None, Some("nope")] {
        let (status, body) = secure.send(Method::GET, "/api/v1/metrics/jobs", key, None).await;
        assert_eq!(status, 429, "{key:?}: {body}");
    }
    // Another address is not limited, and its key is looked up: the first lookup since the
    // subscription (one gateway connection, so lookups arrive in the order they were sent).
    let elsewhere = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let other = Secure { http: elsewhere, ..secure.clone() };
    let (status, body) = other.send(Method::GET, "/api/v1/metrics/jobs", Some(&wrong(999)), None).await;
    assert_eq!(status, 401, "{body}");
    let lookup = tokio::time::timeout(common::WAIT, lookups.next()).await.unwrap().unwrap();
    let lookup: ApiRequest<VerifyKey> = decode("verify request", &lookup.payload).unwrap();
    assert_eq!(lookup.body.key_id, format!("{:032x}", 999), "the limited address's keys were not looked up");
    // The first address recovers after Retry-After.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let (status, body) = secure.send(Method::GET, "/api/v1/metrics/jobs", Some(&wrong(1000)), None).await;
    assert_eq!(status, 401, "{body}");
    drop((secure, other));
    stack.stop().await;
}

/// `--rate-limit off` turns the default off (keys without a limit of their own, and peers), but
/// a key's own limit still applies.
#[tokio::test]
async fn with_the_default_off_only_keys_own_limits_apply() {
    let stack = Stack::start().await;
    let secure = Secure::start_with(&stack, |c| c.rate_limit = None).await;
    let admin = stack.cli_key("acme", Role::Admin, None).await;
    let (low, _) =
        make_key(&secure, &admin, json!({"name": "low", "role": "viewer", "rate_limit": "3/min"})).await;
    for i in 0..150 {
        let (status, body) = secure.send(Method::GET, "/api/v1/metrics/fleet", Some(&admin), None).await;
        assert_eq!(status, 200, "admin request {i}: {body}");
        let (status, body) = secure.send(Method::GET, "/api/v1/metrics/fleet", Some("wrong"), None).await;
        assert_eq!(status, 401, "wrong key {i}: {body}");
    }
    let (served, retry_after) = until_limited(&secure, &low, 20).await;
    assert!((3..6).contains(&served), "3/min: {served}");
    assert!((1..=20).contains(&retry_after), "one request every 20 s: {retry_after}");
    drop(secure);
    stack.stop().await;
}
