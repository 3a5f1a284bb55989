//! compose.yaml and the Dockerfile cannot be run here (no Docker engine), so this test holds
//! them to what the README promises by reading them: the five services, the pinned NATS
//! version, the settings each Fleet part needs, a robot service that scales, and an image that
//! contains all three binaries.

use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_norway::Value;

fn workspace_file(name: &str) -> PathBuf {
    fleet_tests::workspace_root().join(name)
}

fn compose() -> anyhow::Result<Value> {
    let path = workspace_file("compose.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut compose: Value =
        serde_norway::from_str(&text).with_context(|| format!("{} is not valid YAML", path.display()))?;
    // Resolve `<<: *fleet` as Docker Compose does, so services show what they inherit.
    compose.apply_merge().context("compose.yaml has a bad `<<` merge")?;
    Ok(compose)
}

fn service<'a>(compose: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    compose["services"].get(name).with_context(|| format!("compose.yaml has no service `{name}`"))
}

/// A service's environment variable, whether `environment` is a map or a `KEY=value` list.
fn env_var(service: &Value, key: &str) -> Option<String> {
    match &service["environment"] {
        Value::Mapping(map) => map.get(key).map(|value| match value {
            Value::String(s) => s.clone(),
            other => serde_norway::to_string(other).unwrap_or_default().trim().to_string(),
        }),
        Value::Sequence(items) => items.iter().filter_map(Value::as_str).find_map(|item| {
            let (name, value) = item.split_once('=')?;
            (name == key).then(|| value.to_string())
        }),
        _ => None,
    }
}

/// A service's command as one string, whether written as a list or a string.
fn command(service: &Value) -> String {
    match &service["command"] {
        Value::Sequence(items) => items.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" "),
        Value::String(s) => s.clone(),
        _ => String::new(),
    }
}

#[test]
fn compose_has_every_part_of_the_stack() -> anyhow::Result<()> {
    let compose = compose()?;
    for name in ["nats", "postgres", "orchestrator", "gateway", "robot"] {
        service(&compose, name)?;
    }
    Ok(())
}

#[test]
fn nats_is_the_pinned_version_with_jetstream_config_and_a_healthcheck() -> anyhow::Result<()> {
    let compose = compose()?;
    let nats = service(&compose, "nats")?;
    let image = nats["image"].as_str().context("nats has no image")?;
    // The pinned version; a variant suffix (-alpine, which has a shell for the healthcheck) is fine.
    let Some(tag) = image.strip_prefix("nats:") else {
        bail!("nats image is {image}, not the official nats image")
    };
    assert!(tag == "2.15.1" || tag.starts_with("2.15.1-"), "nats image tag is {tag}, expected 2.15.1");
    assert!(
        command(nats).contains("/etc/nats/nats.conf"),
        "nats does not use nats/nats.conf: {}",
        command(nats)
    );
    assert!(!nats["healthcheck"]["test"].is_null(), "nats has no healthcheck");
    assert!(env_var(nats, "FLEET_NATS_STORE_DIR").is_some(), "nats.conf needs FLEET_NATS_STORE_DIR");
    let postgres = service(&compose, "postgres")?;
    assert!(postgres["image"].as_str().is_some_and(|image| image.starts_with("postgres:15")));
    assert!(!postgres["healthcheck"]["test"].is_null(), "postgres has no healthcheck");
    Ok(())
}

#[test]
fn fleet_parts_get_their_settings() -> anyhow::Result<()> {
    let compose = compose()?;
    for name in ["orchestrator", "gateway", "robot"] {
        let part = service(&compose, name)?;
        assert_eq!(env_var(part, "NATS_URL").as_deref(), Some("nats://nats:4222"), "{name} NATS_URL");
        assert!(command(part).starts_with(&format!("fleet-{name}")), "{name} runs `{}`", command(part));
        // All three run the one image built from the Dockerfile.
        assert_eq!(part["build"]["dockerfile"].as_str(), Some("Dockerfile"), "{name} is not built here");
        assert_eq!(part["image"].as_str(), Some("fleet:dev"), "{name} image");
    }
    let orchestrator = service(&compose, "orchestrator")?;
    let database_url = env_var(orchestrator, "DATABASE_URL").context("orchestrator has no DATABASE_URL")?;
    assert!(
        database_url.starts_with("postgres://") && database_url.contains("@postgres:5432/"),
        "{database_url}"
    );
    for dependency in ["nats", "postgres"] {
        assert_eq!(
            orchestrator["depends_on"][dependency]["condition"].as_str(),
            Some("service_healthy"),
            "orchestrator should wait for a healthy {dependency}"
        );
    }
    Ok(())
}

#[test]
fn gateway_listens_on_all_interfaces_and_publishes_8080() -> anyhow::Result<()> {
    let compose = compose()?;
    let gateway = service(&compose, "gateway")?;
    assert!(command(gateway).contains("--listen 0.0.0.0:8080"), "{}", command(gateway));
    let ports = gateway["ports"].as_sequence().context("gateway publishes no port")?;
    let published = ports.iter().any(|port| match port {
        Value::String(s) => s.ends_with(":8080") || s == "8080",
        Value::Mapping(_) => port["target"].as_u64() == Some(8080),
        _ => false,
    });
    assert!(published, "gateway does not publish 8080: {ports:?}");
    Ok(())
}

#[test]
fn robots_scale() -> anyhow::Result<()> {
    let compose = compose()?;
    let robot = service(&compose, "robot")?;
    assert!(robot.get("container_name").is_none(), "a container_name prevents `--scale robot=N`");
    assert!(robot.get("ports").is_none(), "a published port prevents `--scale robot=N`");
    assert_eq!(robot["deploy"]["replicas"].as_u64(), Some(2));
    assert!(command(robot).contains("--tenant default"), "{}", command(robot));
    // The state directory (which keeps the robot's id) must be per container: an anonymous
    // volume, not a named volume or bind mount that replicas would share.
    let state_dir = "/var/lib/fleet/robot";
    assert!(command(robot).contains(&format!("--state-dir {state_dir}")), "{}", command(robot));
    let volumes = robot["volumes"].as_sequence().context("robot has no state volume")?;
    assert!(volumes.iter().any(|v| v.as_str() == Some(state_dir)), "robot volumes: {volumes:?}");
    Ok(())
}

#[test]
fn dockerfile_builds_all_three_binaries_into_a_slim_non_root_image() -> anyhow::Result<()> {
    let path = workspace_file("Dockerfile");
    let dockerfile =
        std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    assert!(dockerfile.contains("FROM rust:1-bookworm AS builder"));
    assert!(dockerfile.contains("FROM debian:bookworm-slim"));
    assert!(dockerfile.contains("cargo build --release"));
    for binary in ["fleet-orchestrator", "fleet-gateway", "fleet-robot"] {
        assert!(dockerfile.contains(&format!("--bin {binary}")), "Dockerfile does not build {binary}");
        assert!(
            dockerfile.contains(&format!("target/release/{binary}")),
            "Dockerfile does not copy {binary}"
        );
    }
    let user = dockerfile.lines().rev().find_map(|line| line.trim().strip_prefix("USER "));
    assert!(user.is_some_and(|user| user.trim() != "root" && user.trim() != "0"), "image runs as root");
    Ok(())
}

#[test]
fn nats_conf_enables_jetstream_with_limits() -> anyhow::Result<()> {
    let path = workspace_file("nats/nats.conf");
    let conf = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    for needle in [
        "jetstream {",
        "store_dir: $FLEET_NATS_STORE_DIR",
        "max_file_store",
        "max_memory_store",
        "http: 8222",
    ] {
        assert!(conf.contains(needle), "nats.conf lacks `{needle}`");
    }
    Ok(())
}
