//! TLS end to end, with a CA and certificates each test generates (`TestPki`): the gateway over
//! HTTPS (REST, SSE and WebSocket), a nats-server that requires mutual TLS with the orchestrator
//! and a robot running a job through it, and the refusals: a robot whose certificate comes from
//! another CA never registers, a client that trusts another CA refuses the server, plain HTTP to
//! the HTTPS port gets nothing, and unusable certificate files are named at start.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Stack, WAIT};
use fleet_connect::{NatsClient, NatsTls};
use fleet_gateway::GatewayConfig;
use fleet_gateway::config::HttpsFiles;
use fleet_tests::tls::CertFiles;
use fleet_tests::{NatsOptions, NatsServer, TestPki, wait_for};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

fn shell_job(script: &str) -> Value {
    json!({"workflow_name": "tls", "workflow_json": {"steps": [{"id": "run", "kind": "shell", "argv": ["sh", "-c", script]}]}})
}

/// An HTTPS gateway (dev mode) on the stack's NATS; its address and the token that stops it.
async fn https_gateway(stack: &Stack, pki: &TestPki) -> (SocketAddr, tokio_util::sync::DropGuard) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let config = GatewayConfig {
        https: Some(HttpsFiles { cert: pki.server.cert.clone(), key: pki.server.key.clone() }),
        ..common::gateway_config(&stack.nats, true)
    };
    tokio::spawn(fleet_gateway::run(config, listener, token.clone()));
    (addr, token.drop_guard())
}

/// An HTTP client that trusts only `ca`.
fn https_client(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[tokio::test]
async fn the_gateway_serves_https_and_its_live_streams_work_over_it() {
    let pki = TestPki::new().unwrap();
    let mut stack = Stack::start().await;
    stack.start_robot(stack.robot_config("r1", &[]));
    stack.wait_robots_online(1).await;
    let (addr, _gateway) = https_gateway(&stack, &pki).await;
    let base = format!("https://{addr}");
    let http = https_client(&pki.ca_cert);
    wait_for("the HTTPS gateway to report healthy", WAIT, || async {
        let r = http.get(format!("{base}/health")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await
    .unwrap();

    // The WebSocket and SSE streams are opened first, so the job's events arrive on them live.
    let mut ws = websocket(addr, &pki.ca_cert, "/ws/monitoring/live-jobs").await;
    let mut sse =
        http.get(format!("{base}/api/v1/events")).header("accept", "text/event-stream").send().await.unwrap();
    assert_eq!(sse.status(), 200);
    assert_eq!(sse.headers()["content-type"], "text/event-stream");

    let r =
        http.post(format!("{base}/api/v1/workflows")).json(&shell_job("echo over-tls")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let job_id = r.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_owned();
    let job = stack.finished(&job_id).await;
    assert_eq!(job["status"], "completed", "{job}");

    // SSE over TLS: the job's completion arrives as an event.
    let mut seen = String::new();
    tokio::time::timeout(WAIT, async {
        while !(seen.contains(&job_id) && seen.contains("completed")) {
            let chunk = sse.chunk().await.unwrap().expect("the event stream stays open");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no completion event for {job_id} over SSE; got {seen}"));

    // The WebSocket over TLS: the live view says something about this job.
    tokio::time::timeout(WAIT, async {
        loop {
            let message = ws.next().await.expect("the WebSocket stays open").unwrap();
            if message.to_text().is_ok_and(|t| t.contains(&job_id)) {
                break;
            }
        }
    })
    .await
    .expect("the live-jobs WebSocket shows the job");
    let _ = ws.close(None).await;

    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let r = plain.get(format!("http://{addr}/health")).send().await;
    assert!(r.is_err(), "plain HTTP to the HTTPS port was answered: {r:?}");

    // A client that trusts another CA refuses the gateway's certificate.
    let r = https_client(&pki.other_ca_cert).get(format!("{base}/health")).send().await;
    let e = r.expect_err("a client trusting another CA accepted the gateway");
    assert!(format!("{e:?}").to_lowercase().contains("certificate"), "{e:?}");
}

/// A WebSocket over TLS to `path`, trusting only `ca`.
async fn websocket(
    addr: SocketAddr,
    ca: &Path,
    path: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let roots = fleet_connect::pem::load_roots("test CA", ca).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(fleet_connect::pem::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    let (ws, response) = tokio_tungstenite::client_async(format!("wss://{addr}{path}"), tls).await.unwrap();
    assert_eq!(response.status(), 101);
    ws
}

/// A nats-server that requires TLS and a client certificate from the test CA.
async fn mutual_tls_server(pki: &TestPki) -> NatsServer {
    NatsServer::start_with(NatsOptions { tls: Some(pki.server_tls(true).unwrap()) }).await.unwrap()
}

#[tokio::test]
async fn over_mutual_tls_a_job_runs_end_to_end_and_plain_clients_are_refused() {
    let pki = TestPki::new().unwrap();
    let nats = mutual_tls_server(&pki).await;
    let url = nats.url();
    // Orchestrator and gateway connect with the harness's certificate, the robot with its own.
    let mut stack = Stack::start_on(nats, |_| {}).await;
    let mut robot = stack.robot_config("r1", &[]);
    robot.nats_tls = pki.client_tls("r1").unwrap();
    stack.start_robot(robot);
    stack.wait_robots_online(1).await;
    let job_id = stack.submit(shell_job("echo mutual")).await["job_id"].as_str().unwrap().to_owned();
    let job = stack.finished(&job_id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert!(job["output"]["steps"]["run"]["stdout"].as_str().unwrap_or_default().contains("mutual"), "{job}");
    // Its verified certificate makes it a `tls` robot (the server's word, through the callout),
    // and so a robot for jobs across the internet.
    let (_, view) = stack.get("/api/v1/metrics/robots/r1").await;
    assert!(view["capabilities"].as_array().unwrap().contains(&json!("tls")), "{view}");
    let mut internet = shell_job("echo far");
    internet["execution_mode"] = json!("internet");
    let job_id = stack.submit(internet).await["job_id"].as_str().unwrap().to_owned();
    assert_eq!(stack.finished(&job_id).await["status"], "completed");

    // No TLS at all: refused (the client requires nothing, the server requires TLS).
    let plain = probe(&url, NatsTls::default());
    assert!(plain.connect(&url).await.is_err(), "a plaintext client connected to a TLS-only server");
    // TLS with the right CA but no client certificate: refused by the server's verify.
    let anonymous = NatsTls { ca: Some(pki.ca_cert.clone()), require: true, ..NatsTls::default() };
    let client = probe(&url, anonymous);
    assert!(connects(client, &url).await.is_err(), "a client without a certificate was let in");
}

/// Client settings that trust `ca` and present `files`.
fn trusting(ca: &Path, files: CertFiles) -> NatsTls {
    NatsTls { ca: Some(ca.to_owned()), cert: Some(files.cert), key: Some(files.key), require: true }
}

/// Options for one bounded connection attempt with `tls`.
fn probe(url: &str, tls: NatsTls) -> async_nats::ConnectOptions {
    NatsClient::new(url, tls).options().unwrap().connection_timeout(Duration::from_secs(3))
}

/// The error a part's `run` stops with at start (bounded), with its causes.
async fn start_error(run: impl std::future::Future<Output = anyhow::Result<()>>) -> String {
    let e = tokio::time::timeout(WAIT, run).await.expect("run returns at once").unwrap_err();
    format!("{e:#}")
}

/// Connect and make one round trip: with TLS 1.3 the server's refusal of a client certificate
/// can arrive just after the client considers the handshake done.
async fn connects(options: async_nats::ConnectOptions, url: &str) -> Result<(), String> {
    let client = options.connect(url).await.map_err(|e| e.to_string())?;
    let flushed = tokio::time::timeout(Duration::from_secs(3), client.flush()).await;
    match flushed {
        Ok(Ok(())) if client.connection_state() == async_nats::connection::State::Connected => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

#[tokio::test]
async fn a_robot_with_a_certificate_from_another_ca_never_registers() {
    let pki = TestPki::new().unwrap();
    let nats = mutual_tls_server(&pki).await;
    let url = nats.url();
    let stack = Stack::start_on(nats, |_| {}).await;
    let wrong = pki.wrong_client("intruder").unwrap();
    let tls = trusting(&pki.ca_cert, wrong);

    // What the robot's connection meets, seen directly: an error, not a session.
    let options = probe(&url, tls.clone());
    let refused = connects(options, &url).await;
    assert!(refused.is_err(), "a certificate from another CA was accepted");

    // The robot itself stops at start with that reason, before it registers.
    let mut robot = stack.robot_config("intruder", &[]);
    robot.nats_tls = tls;
    let e = start_error(fleet_robot::run(robot, CancellationToken::new())).await;
    assert!(e.contains("refused each other's TLS certificates") && e.contains("UnknownCA"), "{e}");
    assert!(
        stack.nats.log_tail().contains("certificate signed by unknown authority"),
        "{}",
        stack.nats.log_tail()
    );
    let (status, robots) = stack.get("/api/v1/metrics/robots").await;
    assert_eq!(status, 200);
    assert_eq!(robots, json!([]), "the robot registered: {robots}");
}

#[tokio::test]
async fn a_client_trusting_another_ca_refuses_the_server() {
    let pki = TestPki::new().unwrap();
    let nats = mutual_tls_server(&pki).await;
    let url = nats.url();
    let mine = pki.client("r1").unwrap();
    let tls = trusting(&pki.other_ca_cert, mine);
    let options = probe(&url, tls.clone());
    let e = options.connect(&url).await.expect_err("the client accepted a server its CA did not sign");
    assert!(e.to_string().contains("invalid peer certificate: UnknownIssuer"), "{e}");
    // The same client with the right CA connects: the refusal above was the CA's doing.
    let options = NatsClient::new(url.clone(), pki.client_tls("r1").unwrap()).options().unwrap();
    connects(nats.orchestrator_credentials().apply(options).unwrap(), &url).await.unwrap();

    // A gateway set up that way stops at start with the reason instead of retrying in silence.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = GatewayConfig { nats_url: url.clone(), nats_tls: tls, ..GatewayConfig::default() };
    let e = start_error(fleet_gateway::run(config, listener, CancellationToken::new())).await;
    assert!(e.contains("refused each other's TLS certificates") && e.contains("UnknownIssuer"), "{e}");
}

#[tokio::test]
async fn unusable_certificate_files_are_named_at_start() {
    let pki = TestPki::new().unwrap();
    let client = pki.client("r1").unwrap();
    let missing = pki.dir().join("missing-key.pem");

    // NATS client: a key file that does not exist.
    let tls = NatsTls {
        ca: Some(pki.ca_cert.clone()),
        cert: Some(client.cert.clone()),
        key: Some(missing.clone()),
        require: true,
    };
    let e = NatsClient::new("nats://127.0.0.1:1", tls).options().unwrap_err().to_string();
    assert!(e.contains(&missing.display().to_string()) && e.contains("--nats-key"), "{e}");
    // A key that belongs to another certificate.
    let tls =
        NatsTls { cert: Some(client.cert.clone()), key: Some(pki.server.key.clone()), ..NatsTls::default() };
    let e = NatsClient::new("nats://127.0.0.1:1", tls).options().unwrap_err().to_string();
    assert!(
        e.contains("is not the key of the certificate") && e.contains(&client.cert.display().to_string()),
        "{e}"
    );

    // Gateway: the HTTPS key is missing; run fails before serving, naming the file.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = GatewayConfig {
        https: Some(HttpsFiles { cert: pki.server.cert.clone(), key: missing.clone() }),
        ..GatewayConfig::default()
    };
    let e = start_error(fleet_gateway::run(config, listener, CancellationToken::new())).await;
    assert!(e.contains(&missing.display().to_string()) && e.contains("TLS key"), "{e}");

    // Robot: a CA file that is not PEM; connect fails before any connection is tried.
    let garbage = pki.dir().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let dirs = tempfile::tempdir().unwrap();
    let mut robot = fleet_robot::RobotConfig::new(fleet_schemas::TenantId::default_tenant());
    robot.state_dir = dirs.path().to_owned();
    robot.nats_tls = NatsTls { ca: Some(garbage.clone()), ..NatsTls::default() };
    let e = start_error(fleet_robot::run(robot, CancellationToken::new())).await;
    assert!(e.contains(&garbage.display().to_string()) && e.contains("--nats-ca"), "{e}");
}

/// On a server without client certificates no robot is a `tls` robot, whatever it says of
/// itself: a job for the internet waits, naming what it needs.
#[tokio::test]
async fn internet_jobs_wait_for_a_robot_with_a_verified_certificate() {
    let mut stack = Stack::start().await;
    stack.start_robot(stack.robot_config("claims-tls", &["tls"]));
    stack.wait_robots_online(1).await;
    let (_, view) = stack.get("/api/v1/metrics/robots/claims-tls").await;
    assert!(
        !view["capabilities"].as_array().unwrap().contains(&json!("tls")),
        "self-declared tls kept: {view}"
    );
    let mut internet = shell_job("echo far");
    internet["execution_mode"] = json!("internet");
    let job_id = stack.submit(internet).await["job_id"].as_str().unwrap().to_owned();
    let lan = stack.submit(shell_job("echo near")).await["job_id"].as_str().unwrap().to_owned();
    assert_eq!(stack.finished(&lan).await["status"], "completed", "the robot works");
    let job = stack.job(&job_id).await;
    assert_eq!(job["status"], "pending", "{job}");
    assert!(job["waiting_reason"].as_str().unwrap_or_default().contains("tls"), "{job}");
    stack.stop().await;
}
