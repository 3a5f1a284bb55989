//! Fleet's end-to-end tests live in `tests/tests/`: a real nats-server, a real PostgreSQL and
//! the real Fleet parts.
//!
//! The harness they use (`NatsServer`, `TestDb`, `wait_for`, …) lives in `testkit/`
//! (`fleet-testkit`), where the robot's and the gateway's own tests can use it too; it is
//! re-exported here so the end-to-end tests keep writing `fleet_tests::…`.

pub use fleet_testkit::*;
