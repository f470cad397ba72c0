//! How every long-running subcommand (`kennel driver`, `kennel retention`) learns it must stop.

/// Resolves when the process is asked to stop (SIGTERM or SIGINT); never, if the handlers
/// cannot be installed (logged: only SIGKILL stops it then).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
