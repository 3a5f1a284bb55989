//! Fleet's benchmark program (`fleet-bench`), as a library so the `cargo test` smoke runs the
//! same scenarios with tiny parameters.
//!
//! Each scenario starts its own nats-server and throwaway database exactly as the tests do
//! ([`fleet_testkit`]), runs Fleet's parts in-process through their `run` functions (see
//! [`stack`]), drives load ([`load`], [`sim`]), measures what it cost ([`measure`], [`procfs`]),
//! checks that every job completed exactly once ([`check`]) and returns a [`report::Report`]
//! with a table for people and JSON for tools. The scenarios and what they measure are in
//! [`scenario`]; BENCHMARKS.md at the repository root has the commands and the latest figures.

pub mod check;
pub mod load;
pub mod measure;
pub mod procfs;
pub mod report;
pub mod scenario;
pub mod sim;
pub mod stack;

pub use report::Report;
