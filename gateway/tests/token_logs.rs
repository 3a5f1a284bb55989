//! A key in a WebSocket URL (`?token=`) must never reach a log: every line the gateway writes,
//! at every level, is captured here while the live view is used with a token (accepted and
//! refused) and while other paths are called with one, and none may contain it.
//!
//! Its own test binary, because it installs the process-wide tracing subscriber.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::WAIT;
use fleet_gateway::GatewayConfig;
use fleet_testkit::NatsServer;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "crpa_0123456789abcdef_SuperSecretTokenValue42";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn serve(config: GatewayConfig) -> (std::net::SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(fleet_gateway::run(config, listener, shutdown.clone()));
    (addr, shutdown)
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_token_in_the_url_is_never_logged() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let nats = NatsServer::start().await.expect("nats-server starts");
    let base = GatewayConfig {
        nats_url: nats.url(),
        nats_credentials: nats.gateway_credentials(),
        rate_limit: None,
        ..GatewayConfig::default()
    };
    let (dev, stop_dev) = serve(GatewayConfig { dev_mode: true, ..base.clone() }).await;
    let (prod, stop_prod) = serve(base).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !http_get(dev, "/metrics").await.contains("fleet_gateway_nats_connected 1") {
        assert!(tokio::time::Instant::now() < deadline, "gateway did not connect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Accepted (dev mode): a ping round trip.
    let url = format!("ws://{dev}/ws/monitoring/live-jobs?token={TOKEN}");
    let (mut ws, _) =
        tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url)).await.unwrap().unwrap();
    ws.send(Message::Text("ping".into())).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("pong in time") {
            Some(Ok(Message::Text(t))) if t.as_str() == "pong" => break,
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    drop(ws);
    // Refused (no keys yet): closed with 4001.
    let url = format!("ws://{prod}/ws/monitoring/live-jobs?token={TOKEN}");
    let (mut ws, _) =
        tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url)).await.unwrap().unwrap();
    let closed = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert!(
        matches!(closed, Some(Ok(Message::Close(Some(ref f)))) if u16::from(f.code) == 4001),
        "{closed:?}"
    );
    // A token on other paths: refused, unknown, not a WebSocket, malformed query.
    for (addr, path) in [
        (prod, format!("/api/v1/metrics/jobs?token={TOKEN}")),
        (dev, format!("/no/such/path?token={TOKEN}")),
        (dev, format!("/ws/monitoring/live-jobs?token={TOKEN}")),
        (dev, format!("/api/v1/events?since=x&token={TOKEN}")),
        (dev, format!("/api/v1/metrics/jobs?limit=0&token={TOKEN}&%zz")),
    ] {
        let answer = http_get(addr, &path).await;
        assert!(answer.starts_with("HTTP/1.1 4"), "{path}: {answer}");
        assert!(!answer.contains(TOKEN), "the answer echoes the token: {answer}");
    }
    stop_dev.cancel();
    stop_prod.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    // The test's own WebSocket client logs its handshake request at trace level; that line is
    // the client's, not the gateway's (axum does the server side of the handshake itself).
    let logs: String = logs
        .lines()
        .filter(|l| !l.contains("tungstenite::handshake::client"))
        .flat_map(|l| [l, "\n"])
        .collect();
    assert!(logs.contains("/ws/monitoring/live-jobs"), "the requests were logged at all:\n{logs}");
    assert!(!logs.contains(TOKEN), "the token was logged:\n{logs}");
    assert!(!logs.contains("SuperSecret"), "part of the token was logged");
}
