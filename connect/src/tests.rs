//! What can be checked without certificates; the handshakes themselves (right CA, wrong CA,
//! mutual TLS) run against a real nats-server in `tests/tests/tls.rs`.

use std::path::Path;

use clap::Parser;
use figment::providers::Format;

use super::*;

#[test]
fn nothing_set_is_a_plain_connection() {
    let client = NatsClient::plain("nats://127.0.0.1:4222");
    assert!(!client.tls.is_set());
    assert!(client.options().is_ok());
}

#[test]
fn a_missing_ca_file_is_named_with_its_flag() {
    let tls = NatsTls { ca: Some("/nonexistent/ca.pem".into()), ..NatsTls::default() };
    let e = NatsClient::new("nats://127.0.0.1:4222", tls).options().unwrap_err().to_string();
    assert!(e.contains("/nonexistent/ca.pem") && e.contains("--nats-ca") && e.contains("cannot read"), "{e}");
}

#[test]
fn a_file_that_is_not_pem_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "hello").unwrap();
    let tls = NatsTls { ca: Some(ca.clone()), ..NatsTls::default() };
    let e = NatsClient::new("nats://127.0.0.1:4222", tls).options().unwrap_err().to_string();
    assert!(e.contains(&ca.display().to_string()) && e.contains("no PEM certificate"), "{e}");

    let key = dir.path().join("key.pem");
    std::fs::write(&key, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
    let e = pem::load_key("TLS key", &key).unwrap_err().to_string();
    assert!(e.contains(&key.display().to_string()) && e.contains("no PEM private key"), "{e}");
}

#[test]
fn a_certificate_needs_its_key() {
    let tls = NatsTls { cert: Some("c.pem".into()), ..NatsTls::default() };
    let e = NatsClient::new("nats://x:1", tls).options().unwrap_err().to_string();
    assert!(e.contains("--nats-cert") && e.contains("without --nats-key"), "{e}");
    let tls = NatsTls { key: Some("k.pem".into()), ..NatsTls::default() };
    let e = NatsClient::new("nats://x:1", tls).options().unwrap_err().to_string();
    assert!(e.contains("--nats-key") && e.contains("without --nats-cert"), "{e}");
}

#[test]
fn server_block_quotes_paths_and_verifies_on_request() {
    let block = server_tls_block(
        Path::new("/d/server.pem"),
        Path::new("/d/k\"ey.pem"),
        Some(Path::new("/d/ca.pem")),
        true,
    );
    assert_eq!(
        block,
        "tls {\n  cert_file: \"/d/server.pem\"\n  key_file: \"/d/k\\\"ey.pem\"\n  ca_file: \"/d/ca.pem\"\n  verify: true\n  timeout: 5\n}\n"
    );
    let block = server_tls_block(Path::new("a"), Path::new("b"), None, false);
    assert!(!block.contains("ca_file") && block.contains("verify: false"), "{block}");
}

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    tls: NatsTlsArgs,
}

#[test]
fn flags_make_the_settings() {
    let cli = Cli::try_parse_from([
        "x",
        "--nats-ca",
        "ca.pem",
        "--nats-cert",
        "c.pem",
        "--nats-key",
        "k.pem",
        "--nats-tls",
    ])
    .unwrap();
    assert_eq!(
        NatsTls::from(cli.tls),
        NatsTls {
            ca: Some("ca.pem".into()),
            cert: Some("c.pem".into()),
            key: Some("k.pem".into()),
            require: true
        }
    );
    let e = Cli::try_parse_from(["x", "--nats-cert", "c.pem"]).unwrap_err().to_string();
    assert!(e.contains("--nats-key"), "{e}");
}

#[test]
#[allow(clippy::result_large_err)] // figment's Jail closures return its large error type
fn serde_form_for_figment() {
    #[derive(Deserialize)]
    struct Config {
        #[serde(default)]
        nats_tls: NatsTls,
    }
    figment::Jail::expect_with(|jail| {
        jail.create_file("f.toml", "[nats_tls]\nca = \"/ca.pem\"\nrequire = true\n")?;
        let c: Config = figment::Figment::from(figment::providers::Toml::file("f.toml")).extract()?;
        assert_eq!(c.nats_tls, NatsTls { ca: Some("/ca.pem".into()), require: true, ..NatsTls::default() });
        jail.create_file("g.toml", "[nats_tls]\ncolour = 1\n")?;
        let e = figment::Figment::from(figment::providers::Toml::file("g.toml"))
            .extract::<Config>()
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("colour")));
        Ok(())
    });
}
