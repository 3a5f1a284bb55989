//! Tracing for tests: output goes through the test writer, so `cargo test` shows it only for
//! failing tests (or with `--nocapture`).

use std::sync::Once;

use tracing_subscriber::EnvFilter;

/// Installs a tracing subscriber for the test process: `RUST_LOG` if set, else `warn`.
/// Safe to call from every test: only the first call in a process installs anything, and a
/// subscriber installed by someone else first is left in place.
pub fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
        // An error here means another global subscriber exists already; that one then serves.
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}
