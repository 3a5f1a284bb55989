//! `fleet-robot`: parse flags, set up tracing and signals, run the robot.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use fleet_robot::cli::Cli;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Cli::parse().into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleet-robot: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        // Logs go to stderr, coloured only on a terminal (not in log files).
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match fleet_robot::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
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
