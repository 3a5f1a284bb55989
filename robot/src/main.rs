//! `fleet-robot`: parse flags, set up tracing and signals, run the robot; re-execute itself when
//! a restart was ordered.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use fleet_robot::Exit;
use fleet_robot::cli::Cli;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        // Logs go to stderr, coloured only on a terminal (not in log files).
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match fleet_robot::enrol::into_config_enrolled(cli).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleet-robot: {e}");
            return ExitCode::from(2);
        }
    };

    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match fleet_robot::run_until_exit(config, shutdown).await {
        Ok(Exit::Stopped) => ExitCode::SUCCESS,
        Ok(Exit::Restart) => {
            let error = restart();
            tracing::error!(error = %error, "could not restart");
            eprintln!("fleet-robot: could not restart: {error}");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "robot failed");
            eprintln!("fleet-robot: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C or SIGTERM starts a graceful shutdown; a second one exits at once.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            None
        }
    };
    let signal = async {
        match term.as_mut() {
            Some(t) => tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = t.recv() => {}
            },
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    signal.await;
    tracing::info!("signal received: draining (send it again to exit at once)");
    shutdown.cancel();
    let again = async {
        match term.as_mut() {
            Some(t) => tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = t.recv() => {}
            },
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    again.await;
    eprintln!("fleet-robot: second signal, exiting now");
    std::process::exit(130);
}

/// Replace this process with a fresh run of the same binary, with the same arguments and
/// environment: the same state directory, so the same robot id, with a new session. Returns only
/// when the exec failed. (`exec` is safe; the workspace forbids `unsafe`.)
fn restart() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let argv0 = args.next();
    // The binary may have been replaced on disk (an upgrade is a common reason to restart); on
    // Linux the link of the running one then ends in " (deleted)" and its path names the new one.
    let exe = match std::env::current_exe() {
        Ok(path) => {
            let text = path.to_string_lossy();
            match text.strip_suffix(" (deleted)") {
                Some(stripped) => std::path::PathBuf::from(stripped),
                None => path,
            }
        }
        Err(_) => match argv0.clone() {
            Some(a) => a.into(),
            None => return std::io::Error::other("cannot tell which binary this is"),
        },
    };
    tracing::info!(exe = %exe.display(), "re-executing the robot");
    let mut cmd = std::process::Command::new(&exe);
    if let Some(argv0) = argv0 {
        cmd.arg0(argv0);
    }
    cmd.args(args).exec()
}
