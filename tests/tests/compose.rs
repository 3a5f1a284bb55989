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
        command(nats).contains(&format!("{AUTH}/nats.conf")),
        "nats does not run the configuration nats-setup writes: {}",
        command(nats)
    );
    assert_eq!(
        nats["depends_on"]["nats-setup"]["condition"].as_str(),
        Some("service_completed_successfully"),
        "nats must wait for its configuration"
    );
    assert!(!nats["healthcheck"]["test"].is_null(), "nats has no healthcheck");
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

/// Where compose keeps nats.conf and the credentials (the `fleet-auth` volume).
const AUTH: &str = "/var/lib/fleet/auth";

/// A service mounts the `fleet-auth` volume at [`AUTH`].
fn mounts_auth(service: &Value) -> bool {
    service["volumes"].as_sequence().is_some_and(|v| {
        v.iter().filter_map(Value::as_str).any(|m| m.starts_with(&format!("fleet-auth:{AUTH}")))
    })
}

#[test]
fn every_part_connects_with_its_own_credentials() -> anyhow::Result<()> {
    let compose = compose()?;
    let setup = service(&compose, "nats-setup")?;
    assert!(
        command(setup).starts_with(&format!("fleet-orchestrator nats-setup --dir {AUTH}")),
        "{}",
        command(setup)
    );
    let orchestrator = service(&compose, "orchestrator")?;
    assert_eq!(env_var(orchestrator, "FLEET_NATS_AUTH_DIR").as_deref(), Some(AUTH));
    let gateway = service(&compose, "gateway")?;
    assert_eq!(env_var(gateway, "FLEET_NATS_CREDS"), Some(format!("{AUTH}/gateway.nk")));
    let robot = service(&compose, "robot")?;
    assert_eq!(env_var(robot, "FLEET_ROBOT_KEY_FILE"), Some(format!("{AUTH}/robot.key")));
    let robot_key = service(&compose, "robot-key")?;
    assert!(
        command(robot_key).contains("api-key create --tenant default --role robot")
            && command(robot_key).contains(&format!("--out {AUTH}/robot.key")),
        "{}",
        command(robot_key)
    );
    assert_eq!(
        robot["depends_on"]["robot-key"]["condition"].as_str(),
        Some("service_completed_successfully")
    );
    for (name, part) in [
        ("nats-setup", setup),
        ("robot-key", robot_key),
        ("nats", service(&compose, "nats")?),
        ("orchestrator", orchestrator),
        ("gateway", gateway),
        ("robot", robot),
    ] {
        assert!(mounts_auth(part), "{name} does not mount fleet-auth at {AUTH}");
    }
    assert!(compose["volumes"].get("fleet-auth").is_some(), "no fleet-auth volume");
    Ok(())
}

/// What `nats-setup` writes with compose's flags, read as compose's nats service runs it: no
/// anonymous access anywhere, the callout deciding everything but the service users.
#[test]
fn the_compose_nats_configuration_is_locked() -> anyhow::Result<()> {
    let compose = compose()?;
    let args: Vec<String> = command(service(&compose, "nats-setup")?).split(' ').map(str::to_owned).collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let dir = tempfile::tempdir()?;
    let options = fleet_nats_auth::setup::ConfOptions {
        listen: flag("--listen"),
        monitor_port: flag("--monitor-port").map(|p| p.parse()).transpose()?,
        store_dir: flag("--store-dir").map(PathBuf::from),
        tls_block: None,
    };
    let conf = std::fs::read_to_string(fleet_nats_auth::setup::write(dir.path(), &options, false)?)?;
    for needle in [
        "listen: \"0.0.0.0:4222\"",
        "http_port: 8222",
        "store_dir: \"/data\"",
        "auth_callout {",
        "account: FLEET",
    ] {
        assert!(conf.contains(needle), "the compose nats.conf lacks `{needle}`:\n{conf}");
    }
    for forbidden in ["no_auth_user", "allow_non_tls"] {
        assert!(!conf.contains(forbidden), "the compose nats.conf has `{forbidden}`");
    }
    assert!(!workspace_file("nats/nats.conf").exists(), "an unlocked nats/nats.conf is still shipped");
    Ok(())
}
