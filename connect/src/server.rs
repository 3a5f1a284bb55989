//! The nats-server side of the same TLS: the `tls { … }` block of its configuration file, so the
//! code that writes a server configuration (tests, the setup command) and the clients above agree
//! on one shape.

use std::fmt::Write;
use std::path::Path;

/// How long the server waits for a client's TLS handshake, in seconds. nats-server's default is
/// 0.5 s, which a loaded two-core CI machine (or a robot on a slow link) can miss; 5 s still
/// bounds what a stalled client holds.
pub const HANDSHAKE_TIMEOUT_SECS: u32 = 5;

/// The `tls { … }` block for a nats-server configuration file: the server's certificate and key,
/// the CA that client certificates must chain to, and with `verify_clients` every client must
/// present one (mutual TLS; a client without a certificate from `ca` is refused in the
/// handshake; without `ca` the server checks client certificates against the system's roots).
///
/// Paths are written as quoted strings with `\` and `"` escaped, so any path is safe to include.
pub fn server_tls_block(cert: &Path, key: &Path, ca: Option<&Path>, verify_clients: bool) -> String {
    let mut block = String::from("tls {\n");
    let mut line = |name: &str, value: &str| {
        let _ = writeln!(block, "  {name}: {value}");
    };
    line("cert_file", &quote(cert));
    line("key_file", &quote(key));
    if let Some(ca) = ca {
        line("ca_file", &quote(ca));
    }
    line("verify", if verify_clients { "true" } else { "false" });
    line("timeout", &HANDSHAKE_TIMEOUT_SECS.to_string());
    block.push_str("}\n");
    block
}

fn quote(path: &Path) -> String {
    let text = path.to_string_lossy();
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
