//! The `fleet-orchestrator` binary's command line: help, and bad input refused with a message
//! naming what is wrong (before any connection is tried). Having this integration test also
//! makes `cargo test --workspace` build the binary, which the fault tests run as a process.

use std::process::Command;

fn orchestrator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fleet-orchestrator"))
}

#[test]
fn help_lists_the_commands_and_configuration() {
    let out = orchestrator().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("api-key") && text.contains("DATABASE_URL") && text.contains("FLEET_HEARTBEAT_TIMEOUT"),
        "{text}"
    );
}

#[test]
fn bad_flags_and_config_are_refused_with_a_clear_message() {
    let out = orchestrator().args(["api-key", "create", "--tenant", "Not_Valid"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--tenant"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out =
        orchestrator().args(["api-key", "create", "--tenant", "acme", "--role", "root"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--role"));

    let out = orchestrator().env("FLEET_HEARTBEAT_TIMEOUT", "soon").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("heartbeat_timeout"), "{err}");
}
