//! Process shutdown: one [`CancellationToken`] per process, cancelled by SIGTERM
//! or Ctrl-C. Services take the token as their `shutdown` argument, so tests can
//! cancel it directly instead of sending signals.

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT. A second signal exits at
/// once, for an operator who does not want to wait for the drain.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    crate::spawn("signals", async move {
        wait_for_signal().await?;
        tracing::info!("shutdown requested; draining");
        trigger.cancel();
        wait_for_signal().await?;
        tracing::warn!("second signal; exiting without drain");
        std::process::exit(130);
        #[allow(unreachable_code)]
        Ok::<(), std::io::Error>(())
    });
    token
}

async fn wait_for_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
