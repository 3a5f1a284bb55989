//! Test harness shared by Fleet's tests: real dependencies, started per test.
//!
//! Every test gets its own nats-server ([`NatsServer`]: random port, temporary JetStream store,
//! killed on drop, restartable on the same port and store) and its own PostgreSQL database
//! ([`TestDb`]: created from an admin connection, dropped on drop), so tests are isolated from
//! each other and from anything else running on the machine, and can kill and restart the parts
//! they depend on. Every wait is bounded ([`wait_until`], [`wait_for`]); when a test fails, the
//! nats-server's files and log and the database are kept and their location printed.
//!
//! For fault tests: [`Process`] runs Fleet's real binaries (found with [`fleet_binary`]) so a test
//! can SIGKILL, SIGSTOP/SIGCONT or SIGTERM them, with their logs kept when a test fails; and
//! [`TcpProxy`] stands between one part and a server (PostgreSQL) so the test can cut that link
//! alone, without stopping the shared server.
//!
//! [`TestPki`] makes a CA and certificates for TLS tests, and [`NatsServer::start_with`] starts a
//! server that requires TLS with them.
//!
//! This crate depends on no Fleet crate but the leaf `fleet-connect`, so that each part's own tests (robot/, gateway/) can
//! dev-depend on it, and so can `fleet-tests`, the end-to-end tests that depend on all parts.
//!
//! Where the dependencies come from:
//! - nats-server ([`nats_server_binary`]): `FLEET_NATS_SERVER`, else the repository's
//!   `.tools/nats/bin/nats-server` (found above the current directory, or where this crate was
//!   built), else a `nats-server` on `PATH` of 2.11 or newer (older ones are skipped with a note),
//!   else the pinned 2.15.1 is installed into `.tools/nats` as `scripts/install-nats` does. When
//!   none of that works the test fails with a message naming what was tried: tests are never
//!   skipped for want of it.
//! - PostgreSQL: the admin URL `FLEET_TEST_DATABASE_URL`, default
//!   `postgres://postgres@127.0.0.1:5432/postgres` (`.ci/run` makes sure it answers).

pub mod callout;
mod db;
mod nats;
mod process;
mod proxy;
mod telemetry;
pub mod tls;
mod wait;

use std::path::{Path, PathBuf};

pub use db::{DEFAULT_ADMIN_URL, TestDb};
pub use nats::{NatsOptions, NatsServer, ServerTls, free_port, nats_server_binary};
pub use process::{Process, ProcessSpec, fleet_binary};
pub use proxy::TcpProxy;
pub use telemetry::init_tracing;
pub use tls::TestPki;
pub use wait::{wait_for, wait_until};

/// The workspace root (the folder holding the top-level `Cargo.toml`), found from this crate's
/// manifest directory (`<workspace>/testkit`) at compile time, so it does not depend on the
/// current directory.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards against the root being computed from the wrong crate after the harness moved from
    /// tests/ to testkit/: the nats-server lookup and the fixtures depend on it.
    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"), "{}", workspace_root().display());
        assert!(workspace_root().join("testkit/src/lib.rs").is_file());
    }
}
